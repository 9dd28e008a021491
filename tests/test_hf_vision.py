"""Pretrained vision towers docked into MetaLM (pretrain/hf_vision.py): parity with transformers' CLIPVisionModel,
SiglipVisionModel and ViTModel on random weights built from configs (class token kept or dropped, the last and the
-2 layer, interpolated positions), the checkpoint's own preprocessing against transformers' image processors on real
images, refusals, export and round trip, freezing by layer index, TP=2 = TP=1, and training with an imported tower
(frozen tensors untouched, kill -9 + resume bit for bit with loader workers)."""
import json
import os

import numpy as np
import pytest
import torch

from pretrain.convert import main as convert_main

QUIET = dict(log=lambda *a, **k: None)


def random_tower(kind: str, out, layers=3, hidden=32, image_size=16, patch_size=4, processor=None, **kw):
    """A randomly initialised transformers vision tower saved with its image processor (norms and biases moved off
    their fresh values so that a mapping mistake shows)."""
    import transformers as T

    os.makedirs(out, exist_ok=True)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size, **kw)
    torch.manual_seed(0)
    if kind == "clip":
        model = T.CLIPVisionModel(T.CLIPVisionConfig(**common))
        proc = processor or T.CLIPImageProcessor(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size})
    elif kind == "clip_full":  # a whole CLIPModel directory: the tower is its vision_config / vision_model.*
        text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=99)
        model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=common, projection_dim=8))
        proc = processor or T.CLIPImageProcessor(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size})
    elif kind == "siglip":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**common))
        proc = processor or T.SiglipImageProcessor(size={"height": image_size, "width": image_size})
    else:
        model = T.ViTModel(T.ViTConfig(**common), add_pooling_layer=False)
        proc = processor or T.ViTImageProcessor(size={"height": image_size, "width": image_size})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return model.eval()


def tower_of(model_or_vcfg, sd=None):
    """Our VisionEncoder alone (TP=1) with the imported weights."""
    from pretrain.model.encoders import VisionEncoder
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    enc = VisionEncoder(model_or_vcfg, 0.02)
    missing, unexpected = enc.load_state_dict({k[len("vision."):]: t for k, t in sd.items()}, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("_extra_state")], (missing, unexpected)
    return enc.eval()


def ours(enc, images):
    from pretrain.model import masks
    from pretrain.model.attention import AttentionMask

    with torch.no_grad():
        return enc(images, AttentionMask.build(masks.full, images.shape[0], enc.cfg.tokens, None, images.device,
                                               "sdpa"))


CASES = [("clip", None, True, 0), ("clip", -2, False, 0), ("clip", 1, True, 0), ("clip", None, True, 24),
         ("clip_full", -2, True, 0), ("siglip", None, True, 0), ("siglip", -1, True, 24), ("vit", None, True, 0),
         ("vit", -2, False, 24)]


@pytest.mark.parametrize("kind,layer,keep_cls,size", CASES)
def test_parity_with_transformers(kind, layer, keep_cls, size, tmp_path):
    """Our tower = transformers' last_hidden_state, or hidden_states[k]; class token kept or dropped; trained at
    another image size = interpolate_pos_encoding=True."""
    from pretrain.hf_vision import load_hf_tower

    hf = random_tower(kind, tmp_path / "hf")
    hf = hf.vision_model if kind == "clip_full" else hf
    v, sd = load_hf_tower(str(tmp_path / "hf"), image_size=size, feature_layer=layer, keep_class_token=keep_cls)
    enc = tower_of(v, sd)
    x = torch.randn(3, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(1))
    got = ours(enc, x)
    with torch.no_grad():
        out = hf(x, output_hidden_states=True, interpolate_pos_encoding=bool(size))
    ref = out.last_hidden_state if layer is None else out.hidden_states[layer]
    if v.class_token and not keep_cls:
        ref = ref[:, 1:]
    assert got.shape == ref.shape and got.shape[1] == v.features
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    if layer is not None:  # the blocks above the feature layer are never run: frozen, no optimizer state
        run = v.blocks_run
        assert all(not p.requires_grad for p in enc.stack.layers[run:].parameters())
        assert all(p.requires_grad for p in enc.stack.layers[:run].parameters())


def images_for_preprocessing(tmp_path_factory):
    from data_tools import images

    out = str(tmp_path_factory.mktemp("images"))
    rows = []
    for name, limit in (("tuxpaint", 40), ("fashion_mnist", 20)):
        d = images.fetch(name, out, limit=limit, **QUIET)
        rows += [r["image"] for r in images.read_rows(d, "train")[:12]]
    return rows


@pytest.fixture(scope="module")
def real_images(tmp_path_factory):
    return images_for_preprocessing(tmp_path_factory)


PROCESSORS = [
    ("CLIPImageProcessor", dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})),
    ("CLIPImageProcessor", dict(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36})),
    ("CLIPImageProcessor", dict(size={"shortest_edge": 20}, crop_size={"height": 32, "width": 32})),  # pads
    ("SiglipImageProcessor", dict(size={"height": 224, "width": 224})),
    ("ViTImageProcessor", dict(size={"height": 48, "width": 48})),
]


@pytest.mark.parametrize("name,kw", PROCESSORS)
def test_preprocessing_equals_transformers_on_real_images(name, kw, real_images, tmp_path):
    """Tux Paint stamps (transparent PNGs of many shapes: composited on white, shortest-edge resize, centre crop)
    and Fashion-MNIST (grey 28x28): our pixel values = transformers' (PIL backend) within 1e-5, read back from
    the saved preprocessor_config.json as the importer reads it."""
    import io

    import transformers
    from PIL import Image

    from data_tools.vl_samples import Preprocessor, preprocessor_config

    proc = getattr(transformers, name)(**kw)
    proc.save_pretrained(tmp_path)
    ours_p = Preprocessor(preprocessor_config(json.load(open(tmp_path / "preprocessor_config.json")), "test"))
    sizes = set()
    for data in real_images:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if not proc.do_convert_rgb:  # ViT's processor takes RGB images as given (ours converts them the same)
                im = im.convert("RGB")
            ref = proc(images=im, return_tensors="np")["pixel_values"][0]
            sizes.add(im.size)
        got = ours_p(data)
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert len(sizes) > 3  # stamps of several shapes, not one size


def test_a_config_default_missing_from_the_file_is_the_processor_class_default():
    from data_tools.vl_samples import preprocessor_config

    p = preprocessor_config({"image_processor_type": "CLIPImageProcessor", "size": 336, "crop_size": 336}, "x")
    assert p["size"] == {"shortest_edge": 336} and p["crop_size"] == {"height": 336, "width": 336}
    assert p["resample"] == 3 and p["do_center_crop"] and p["image_mean"][0] == pytest.approx(0.48145466)
    v = preprocessor_config({"image_processor_type": "ViTImageProcessorFast", "size": 64}, "x")
    assert v["size"] == {"height": 64, "width": 64} and v["resample"] == 2 and not v["do_center_crop"]


def edit_json(path, **changes):
    d = json.load(open(path))
    d.update(changes)
    json.dump(d, open(path, "w"))


REFUSALS = [
    ("config", dict(model_type="dinov2"), "model_type 'dinov2' cannot be imported as an encoder (text: bert, "
                                          "roberta, electra; vision: clip_vision_model, siglip_vision_model, vit"),
    ("config", dict(hidden_act="relu"), "hidden_act 'relu' is not supported"),
    ("config", dict(num_attention_heads=5), "hidden_size 32 is not divisible by num_attention_heads 5"),
    ("config", dict(intermediate_size=48), "encoder.layers.0.mlp.fc1.weight has shape (64, 32), config.json "
                                           "implies (48, 32)"),
    ("vitconfig", dict(qkv_bias=False), "qkv_bias=false is not supported"),
    ("processor", dict(image_processor_type="DonutImageProcessor"), "image_processor_type 'DonutImageProcessor' "
                                                                    "is not supported"),
    ("processor", dict(do_pad=True), "do_pad=True is not reproduced by our loader"),
    ("processor", dict(do_center_crop=False), "resizing the shortest edge without a centre crop gives no fixed "
                                              "image size"),
    ("noprocessor", {}, "no preprocessor_config.json"),
]


@pytest.mark.parametrize("what,edit,message", REFUSALS)
def test_refusals_are_one_line_exit_2_nothing_written(what, edit, message, tmp_path, tok_model, capsys):
    hf = tmp_path / "hf"
    random_tower("vit" if what == "vitconfig" else "clip", hf)
    if what in ("config", "vitconfig"):
        edit_json(hf / "config.json", **edit)
    elif what == "processor":
        edit_json(hf / "preprocessor_config.json", **edit)
    else:
        os.remove(hf / "preprocessor_config.json")
    capsys.readouterr()
    out = tmp_path / "out"
    rc = convert_main(["import-encoder", "--hf", str(hf), "--into", "tiny-vl", "--out", str(out),
                       "--tokenizer-model", str(tok_model)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def import_into_vl(hf_dir, out, tok_model, *extra):
    assert convert_main(["import-encoder", "--hf", str(hf_dir), "--into", "tiny-vl", "--out", str(out),
                         "--tokenizer-model", str(tok_model), *extra]) == 0
    from pretrain.model_io import load

    model, cfg, tok, _ = load(str(out))
    return model, cfg


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_import_export_round_trip(kind, tmp_path, tok_model):
    """import-encoder into the tiny-vl preset (fresh decoder, new vision connector sized to the tower), then
    export-encoder: transformers loads its own type with the same features, the written preprocessor gives our
    pixel values, and importing the export again is bit-identical."""
    import transformers
    from safetensors.torch import load_file

    hf = random_tower(kind, tmp_path / "hf")
    model, cfg = import_into_vl(tmp_path / "hf", tmp_path / "m", tok_model)
    v = cfg.model.vision
    assert v.hf_model_type == f"{kind}_vision_model" and cfg.model.image_slots() == v.features
    assert model.vision_connector is not None
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours(model.vision.eval(), x), hf(x).last_hidden_state, atol=1e-5, rtol=0)
    assert convert_main(["export-encoder", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "exp")]) == 0
    cls = {"clip": transformers.CLIPVisionModel, "siglip": transformers.SiglipVisionModel}[kind]
    back = cls.from_pretrained(tmp_path / "exp").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).last_hidden_state, hf(x).last_hidden_state, atol=1e-6, rtol=0)
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path / "exp")
    import io

    from PIL import Image

    from data_tools.vl_samples import Preprocessor

    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 27, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    np.testing.assert_allclose(Preprocessor(v.preprocessor)(buf.getvalue()),
                               proc(images=im, return_tensors="np")["pixel_values"][0], atol=1e-5, rtol=0)
    _, cfg2 = import_into_vl(tmp_path / "exp", tmp_path / "m2", tok_model)
    a, b = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "m2" / "model.safetensors")
    vision = [k for k in a if k.startswith("vision.")]
    assert vision and all(torch.equal(a[k], b[k]) for k in vision)


def test_our_own_tower_export_is_refused_by_name(tmp_path, tok_model, capsys):
    """tiny-vl's own tower (RMSNorm, SwiGLU, no biases) has no CLIP/SigLIP form: refused, naming what differs."""
    hf = tmp_path / "hf"
    random_tower("siglip", hf)
    import_into_vl(hf, tmp_path / "m", tok_model)
    from pretrain.config import PRESETS, TrainConfig
    from pretrain.hf_vision import check_exportable
    from pretrain.model_io import ConvertError

    with pytest.raises(ConvertError, match="stack.norm='rmsnorm'.*stack.bias=False.*swiglu"):
        check_exportable(TrainConfig(model=PRESETS["tiny-vl"]()).model.vision, "siglip_vision_model")


@pytest.mark.parametrize("setting,trainable", [
    (dict(freeze_vision=True), set()),
    (dict(trainable_top_layers=0), set()),
    (dict(trainable_top_layers=1), {"stack.layers.2"}),
    (dict(trainable_top_layers=1, feature_layer=-2), {"stack.layers.1"}),  # the top block is not run
    (dict(trainable_top_layers=3), {"stack.layers.0", "stack.layers.1", "stack.layers.2", "patch", "pos", "cls",
                                    "pre_norm"}),
])
def test_freezing_trains_exactly_the_top_layers(setting, trainable, tmp_path):
    """The exact trainable set; frozen parts stay in eval mode after train() and run without autograd."""
    from pretrain.config import ModelConfig, StackConfig
    from pretrain.hf_vision import load_hf_tower
    from pretrain.model.metalm import MetaLM
    from pretrain.parallel import init_distributed, init_model_parallel

    random_tower("clip", tmp_path / "hf", attention_dropout=0.1)
    freeze = setting.pop("freeze_vision", False)
    v, _ = load_hf_tower(str(tmp_path / "hf"), **setting)
    init_distributed("gloo")
    init_model_parallel(1, 1)
    cfg = ModelConfig(vocab_size=512, max_seq_length=64, decoder=StackConfig(1, 32, 2), vision=v,
                      freeze_vision=freeze)
    model = MetaLM(cfg).train()
    got = {n[len("vision."):].rsplit(".", 1)[0] if n.count(".") > 1 else n[len("vision."):]
           for n, p in model.named_parameters() if n.startswith("vision.") and p.requires_grad}
    got = {".".join(g.split(".")[:3]) if g.startswith("stack.layers") else g.split(".")[0] for g in got}
    assert got == trainable
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("vision_connector."))
    for name, m in model.vision.named_modules():
        params = list(m.parameters())
        if name and params and not any(p.requires_grad for p in params):
            assert not m.training, name  # e.g. attention dropout off in the frozen blocks
    from pretrain.model import masks
    from pretrain.model.attention import AttentionMask

    h = model.vision(torch.randn(2, 3, 16, 16), AttentionMask.build(masks.full, 2, v.tokens, None, "cpu", "sdpa"))
    assert h.requires_grad == bool(trainable)  # nothing trainable: the tower ran without autograd


@pytest.mark.slow
def test_tp2_equals_tp1_on_an_imported_tower(tmp_path, tok_model):
    import torch.multiprocessing as tmp

    import tp_worker
    from test_model import free_port

    random_tower("clip", tmp_path / "hf", hidden=32)
    import_into_vl(tmp_path / "hf", tmp_path / "m", tok_model, "--feature-layer", "-2")
    got = {}
    for world in (1, 2):
        out = tmp_path / f"tp{world}.pt"
        tmp.start_processes(tp_worker.run_imported_vision, args=(world, free_port(), str(tmp_path / "m"), str(out)),
                            nprocs=world, start_method="spawn", join=True)
        got[world] = torch.load(out)
    a, b = got[1], got[2]
    torch.testing.assert_close(b["loss"], a["loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b["feats"], a["feats"], atol=1e-5, rtol=0)
    assert a["grads"].keys() == b["grads"].keys() and any("qkv.bias" in k for k in a["grads"])
    for k in a["grads"]:
        torch.testing.assert_close(b["grads"][k], a["grads"][k], atol=1e-6, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_training_with_an_imported_tower_freezes_and_resumes_bit_for_bit(tmp_path, tok_model, moby_prefix):
    """`model.vision.from_hf` on the tiny-vl preset, top 1 of 3 blocks trainable, ZeRO-2 on 2 ranks with loader
    workers: the tower loaded at step 0 (the frozen part bitwise the checkpoint's, the top block changed), the
    checkpoint's preprocessing used, and kill -9 + resume gives the same losses and weights bit for bit."""
    from pretrain.hf_vision import load_hf_tower
    from tests.test_train import final_weights, launch, losses
    from tests.test_vl_training import VL

    random_tower("clip", tmp_path / "hf")
    v, hf_sd = load_hf_tower(str(tmp_path / "hf"))
    images = tmp_path / "images"
    make_shapes(images)
    args = [a for a in VL if not a.startswith(("model.vision.", "data.workers"))]
    args += [f"model.vision.from_hf={tmp_path / 'hf'}", "model.vision.trainable_top_layers=1",
             f"data.image_path=[{images}/shapes]", "data.workers=1"]
    first = launch(tmp_path / "straight", tok_model, moby_prefix, *args, nproc=2, steps=4)
    r = launch(tmp_path / "cut", tok_model, moby_prefix, *args,
               "callbacks=[{path: tests.fault_injection.FaultInjection, die_at_step: 4, die_rank: 1}]", nproc=2,
               steps=4, check=False)
    assert r.returncode != 0
    launch(tmp_path / "cut", tok_model, moby_prefix, *args, nproc=2, steps=4)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "cut")
    assert a == b and len(a) == 4
    cfg, wa = final_weights(tmp_path / "straight")
    _, wb = final_weights(tmp_path / "cut")
    for k in (k for k in wa if isinstance(wa[k], torch.Tensor)):
        assert torch.equal(wa[k], wb[k]), k
    assert "vision encoder initialised from" in first.stdout and "the top 1 of 3 blocks run train" in first.stdout
    for k, t in hf_sd.items():
        if k.startswith("vision.stack.layers.2."):
            assert not torch.equal(wa[k].float(), t), f"{k}: the trainable top block did not change"
        else:
            assert torch.equal(wa[k].float(), t), f"{k}: a frozen tensor changed"


@pytest.mark.slow
def test_our_own_trained_tower_exports_as_clip_and_docks_back(tmp_path, tok_model, moby_prefix):
    """A tower we train ourselves (the tiny-vl-clip preset: CLIP's structure) -> export-encoder writes a
    CLIPVisionModel that transformers loads with the same features -> docked back into the trained model with its
    connector and decoder: the same VQA-style accuracy and the same captions."""
    import transformers

    from eval import vl
    from pretrain.model_io import load
    from tests.test_train import launch

    images = tmp_path / "images"
    make_shapes(images)
    run = str(tmp_path / "run")
    launch(run, tok_model, moby_prefix, "model.preset=tiny-vl-clip", "model.vocab_size=1000",
           "model.max_seq_length=128", "model.decoder.layers=2", "model.decoder.hidden=64", "model.decoder.heads=4",
           "model.decoder.ffn_hidden=128", "model.vision.image_size=16", "model.vision.patch_size=4",
           "data.seq_length=64", "data.image_fraction=0.5", f"data.image_path=[{images}/shapes]", "data.workers=0",
           "parallel.micro_batch=4", steps=3)
    assert convert_main(["export-encoder", "--model", run, "--out", str(tmp_path / "tower")]) == 0
    assert json.load(open(tmp_path / "tower" / "config.json"))["architectures"] == ["CLIPVisionModel"]
    back = transformers.CLIPVisionModel.from_pretrained(tmp_path / "tower").eval()
    model, _, _, _ = load(run)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x).last_hidden_state, ours(model.vision.eval(), x), atol=1e-5, rtol=0)
    assert convert_main(["import-encoder", "--hf", str(tmp_path / "tower"), "--into", run, "--out",
                         str(tmp_path / "docked"), "--keep-connector"]) == 0
    reports = []
    for name, src in (("trained", run), ("docked", str(tmp_path / "docked"))):
        assert vl.main(["--model", src, "--images", str(images), "--caption-source", "shapes", "--vqa-source",
                        "shapes", "--vqa-items", "6", "--seeds", "1", "--shots", "0", "--max-new-tokens", "4",
                        "--out", str(tmp_path / "eval"), "--name", name]) == 0
        rep = json.load(open(tmp_path / "eval" / f"{name}.json"))
        reports.append(([r["acc"] for r in rep["summary"]],
                        [e for r in rep["records"] if r["task"] == "captioning" for e in r["examples"]]))
    assert reports[0] == reports[1] and reports[0][1]


def make_shapes(out):
    from data_tools.images import Record, write_dataset
    from tests.test_vl_training import COLOURS, SHAPES, png

    classes = list(COLOURS)
    recs = [Record(f"s{i}", png(c, s, i), f"a {c} {s} on a light background.", classes.index(c))
            for i, (c, s) in enumerate((c, s) for _ in range(4) for c in COLOURS for s in SHAPES)]
    write_dataset("shapes", iter(recs), str(out), {"licence": "test", "classes": classes}, shard_size=16,
                  log=lambda *a: 0)


def test_the_shipped_config_resolves_a_tower_and_names_a_bad_one(tmp_path):
    """configs/vl-tower.yaml + model.vision.from_hf: the tower's architecture and preprocessing replace the preset's
    tower before the workers start (64 resampler slots, frozen); a directory that is not a tower: one line naming
    the key."""
    from pretrain.checks import configure_model
    from pretrain.config import ConfigError, load_config

    random_tower("siglip", tmp_path / "hf", image_size=32, patch_size=8)
    cfg = load_config("configs/vl-tower.yaml", [f"model.vision.from_hf={tmp_path / 'hf'}"])
    configure_model(cfg)
    v = cfg.model.vision
    assert v.hf_model_type == "siglip_vision_model" and (v.image_size, v.patch_size, v.stack.hidden) == (32, 8, 32)
    assert cfg.model.image_slots() == 64 and cfg.model.freeze_vision and v.preprocessor["type"] == "siglip"
    cfg = load_config("configs/vl-tower.yaml", [f"model.vision.from_hf={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^model.vision.from_hf: .*no config.json"):
        configure_model(cfg)


@pytest.mark.slow
def test_pipeline_parallel_2_with_an_imported_tower_on_stage_0(tmp_path, tok_model, moby_prefix):
    """PP=2 with `model.vision.from_hf` (the tower, loaded at step 0, on stage 0; its top block trains) = the same
    run in the pipeline engine at PP=1."""
    from tests.test_train import launch, losses
    from tests.test_vl_training import VL

    random_tower("siglip", tmp_path / "hf")
    make_shapes(tmp_path / "images")
    common = [a for a in VL if not a.startswith(("model.vision.", "data.workers"))]
    common += [f"model.vision.from_hf={tmp_path / 'hf'}", "model.vision.trainable_top_layers=1",
               f"data.image_path=[{tmp_path / 'images'}/shapes]", "data.workers=0", "parallel.micro_batch=2",
               "parallel.deepspeed=pipeline_zero1", "parallel.pipeline_engine=true", "parallel.grad_accum=2"]
    launch(tmp_path / "pp1", tok_model, moby_prefix, *common, steps=2)
    launch(tmp_path / "pp2", tok_model, moby_prefix, *common, "parallel.pp=2", nproc=2, steps=2)
    a, b = losses(tmp_path / "pp1"), losses(tmp_path / "pp2")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
