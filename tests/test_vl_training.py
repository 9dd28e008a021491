"""Vision-language training end to end: image-text samples from parquet shards (deterministic, in DataLoader
workers), the image/text mixture, the caption-prefix variant, TP=2 = TP=1 on a VL batch, exact resume of mixed
training after kill -9, and the VL evaluation (CIDEr-D, VQA-style scoring) on the trained model."""
import io
import json
import os

import numpy as np
import parity
import pytest
import torch

from data_tools.datasets import MicroBatches
from data_tools.image_text import ImageSampleConfig, ImageTextDataset, MixedRows, VQA_PROMPT
from data_tools.images import Record, write_dataset
from data_tools.vl_samples import load_image
from tests.test_train import final_weights, launch, losses

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("square", "disc")


def png(colour, shape, seed, size=20):
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(200, 256, 3)))
    d = ImageDraw.Draw(im)
    a, b = int(rng.integers(1, 5)), int(rng.integers(14, 19))
    (d.rectangle if shape == "square" else d.ellipse)([a, a, b, b], fill=COLOURS[colour])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def vl_images(tmp_path_factory):
    """Two small fetched-format datasets: coloured shapes with captions and a colour class; 'plain' captions only."""
    out = str(tmp_path_factory.mktemp("vl_images"))
    classes = list(COLOURS)
    recs = [Record(f"s{i}", png(c, s, i), f"a {c} {s} on a light background.", classes.index(c))
            for i, (c, s) in enumerate((c, s) for _ in range(8) for c in COLOURS for s in SHAPES)]
    write_dataset("shapes", iter(recs), out, {"licence": "test", "classes": classes}, shard_size=16, log=lambda *a: 0)
    plain = [Record(f"p{i}", png(c, "square", 100 + i), f"{c}.") for i, c in enumerate(list(COLOURS) * 6)]
    write_dataset("plain", iter(plain), out, {"licence": "test", "classes": []}, log=lambda *a: 0)
    return out


def dataset(vl_images, tok, n=32, **kw):
    cfg = ImageSampleConfig(**{**dict(seq_length=48, image_size=16, slots=16, patches=16, seed=3), **kw})
    return ImageTextDataset([os.path.join(vl_images, "shapes"), os.path.join(vl_images, "plain")], [3.0, 1.0],
                            "train", cfg, tok, n)


def test_image_text_samples(vl_images, tok):
    ds = dataset(vl_images, tok)
    a, b = ds[5], dataset(vl_images, tok)[5]
    for k in a:
        assert np.array_equal(a[k], b[k]), f"sample 5 differs in {k}: not a function of (seed, index)"
    assert a["images"].shape == (1, 3, 16, 16)
    # blending 3:1 over the two sources (Megatron's rule: exact at every prefix up to rounding)
    src = [s for s, _ in ds.order]
    assert abs(src.count(0) - 3 * src.count(1)) <= 3
    # the caption: decoded targets are the caption and </s>; slots and markers never counted
    counted = a["labels"][a["loss_mask"] == 1]
    assert counted[-1] == tok.ids.eos and tok.ids.image not in counted and tok.ids.image_end not in counted
    s, r = ds.order[5]
    assert tok.decode(counted[:-1].tolist()) == ds.sources[s].captions[r]
    # vqa: only the answer (the class name) counts
    v = dataset(vl_images, tok, task=("vqa", "caption"))
    i = next(i for i in range(len(v)) if v.order[i][0] == 0)
    row = v[i]
    s, r = v.order[i]
    ans = row["labels"][row["loss_mask"] == 1][:-1].tolist()
    assert tok.decode(ans).strip() == v.sources[0].classes[v.sources[0].labels[r]]
    assert VQA_PROMPT in tok.decode(row["tokens"][row["tokens"] != tok.ids.pad].tolist())


def test_caption_prefix_variant(vl_images, tok):
    ds = dataset(vl_images, tok, caption_prefix=6)
    lens = []
    for i in range(16):
        x = ds[i]
        L = int((x["image_segments"][0] == 0).sum()) - 16  # prefix tokens the vision encoder reads
        lens.append(L)
        dst = x["image_dst"][16:16 + L]  # the prefix outputs dock onto the caption's first L decoder positions
        cap0 = int(x["image_dst"][15]) + 2  # after the last slot: </image>, then the caption
        assert dst.tolist() == list(range(cap0, cap0 + L))
        assert x["tokens"][dst].tolist() == x["image_text"][0, :L].tolist()
        assert (x["image_dst"][16 + L:] == -1).all()
        # targets predicted from inside the prefix (positions s..e-2) are not counted, the rest of the caption is
        assert (x["loss_mask"][cap0:cap0 + max(L - 1, 0)] == 0).all()
        assert x["loss_mask"][cap0 - 1] == 1 and (L == 0 or x["loss_mask"][cap0 + L - 1] == 1)
    assert len(set(lens)) > 2, f"prefix lengths should vary with the sample index: {lens}"


def test_loader_workers_and_mixture_are_deterministic(vl_images, tok, moby_prefix):
    from data_tools.datasets import DataConfig, build_datasets

    text, _, _ = build_datasets(DataConfig(data_path=[moby_prefix], split="90,10,0", seq_length=48, mode="sclm",
                                           span_length=16), tok, [64, 0, 0])
    mixed = MixedRows(dataset(vl_images, tok, 40, caption_prefix=4), text, micro_batch=4, image_rows=1)
    inline = list(MicroBatches(mixed, 4, consumed_samples=8, dp_rank=1, dp_size=2))
    workers = list(MicroBatches(mixed, 4, consumed_samples=8, dp_rank=1, dp_size=2, workers=2))
    assert len(inline) == len(workers) > 2
    for x, y in zip(inline, workers):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    b = inline[0]
    assert b["images"].shape[0] == 1 and b["image_text"].shape == (1, 4)  # one image row, three text rows
    assert (b["enc_segments"][0] == -1).all() and (b["enc_segments"][1:] >= 0).any()  # text rows bring spans
    T = b["tokens"].shape[1]
    assert (b["image_dst"][b["image_dst"] < 4 * T] < T).all(), "the image row is row 0 of each micro-batch"


def test_prefix_reaches_slots_and_tp2_equals_tp1(tmp_path):
    from tests.test_model import run_workers
    from tests.tp_worker import vl_batch, vl_config

    from pretrain.model.metalm import MetaLM
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    torch.manual_seed(0)
    model = MetaLM(vl_config()).eval()
    batch = vl_batch()
    with torch.no_grad():
        base = model.logits(batch)
        changed = dict(batch, image_text=batch["image_text"].clone())
        changed["image_text"][0, 1] += 1  # row 0's second prefix token, as the vision encoder reads it
        other = model.logits(changed)
    slots = batch["image_dst"][:16]
    diff = (base[0] - other[0]).abs().amax(-1)
    assert (diff[slots] > 1e-5).all(), "the image slots' features see the caption prefix (bidirectional encoder)"
    assert torch.equal(base[1], other[1]), "the other row is untouched"
    ref = run_workers(1, 1, tmp_path / "tp1.pt", {"vl": True})
    tp2 = run_workers(2, 2, tmp_path / "tp2.pt", {"vl": True})
    torch.testing.assert_close(tp2["loss"], ref["loss"], atol=1e-5, rtol=0)
    assert ref["grads"].keys() == tp2["grads"].keys() and any(k.startswith("vision.text") for k in ref["grads"])
    for n in ref["grads"]:
        torch.testing.assert_close(tp2["grads"][n], ref["grads"][n], atol=1e-6, rtol=1e-4, msg=n)


VL = ["model.preset=tiny-vl", "model.vocab_size=1000", "model.max_seq_length=128", "model.decoder.layers=2",
      "model.decoder.hidden=64", "model.decoder.heads=4", "model.decoder.ffn_hidden=128",
      "model.vision.image_size=16", "model.vision.patch_size=4", "model.vision.caption_prefix=4",
      "data.seq_length=64", "data.image_fraction=0.5", "data.workers=2", "parallel.micro_batch=4",
      "parallel.deepspeed=zero2", "checkpoint.save_interval=2", "checkpoint.keep_last=5"]


@pytest.mark.slow
def test_mixed_training_resumes_exactly_after_kill_9_and_evaluates(tmp_path, tok_model, moby_prefix, vl_images):
    # launch() adds tests.test_train.SMALL, whose model.encoder.* keys give this VL model a small text encoder too:
    # text rows are semi-causal (spans through the text encoder), image rows dock images and caption prefixes
    images = [f"data.image_path=[3, {vl_images}/shapes, 1, {vl_images}/plain]", "data.image_task=[vqa, caption]"]
    args = [*VL, *images, "data.workers=1"]  # one loader worker per rank: 2 cores, 2 ranks
    launch(tmp_path / "straight", tok_model, moby_prefix, *args, nproc=2, steps=4)
    r = launch(tmp_path / "cut", tok_model, moby_prefix, *args, "callbacks=[{path: tests.fault_injection.FaultInjection, die_at_step: 4, die_rank: 1}]",
               nproc=2, steps=4, check=False)
    assert r.returncode != 0 and not os.path.exists(tmp_path / "cut" / "checkpoints" / "step_00000004")
    launch(tmp_path / "cut", tok_model, moby_prefix, *args, nproc=2, steps=4)  # resumes from step 2
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "cut")
    assert a == b and len(a) == 4, "identical losses, bit for bit (data order, image decoding, prefixes)"
    _, wa = final_weights(tmp_path / "straight")
    _, wb = final_weights(tmp_path / "cut")
    vision = [k for k in wa if k.startswith("vision.") and isinstance(wa[k], torch.Tensor)]
    assert len(vision) > 10
    for k in (k for k in wa if isinstance(wa[k], torch.Tensor)):
        assert torch.equal(wa[k], wb[k]), k
    parity.check("vl_mixed_dp2", tmp_path / "straight",
                 parity.inputs_digest(tok_model, moby_prefix, parity.tree(vl_images)))
    # the evaluation runs on the trained checkpoint and writes its reports
    from eval import vl

    out = tmp_path / "eval"
    assert vl.main(["--model", str(tmp_path / "cut"), "--images", vl_images, "--caption-source", "plain",
                    "--vqa-source", "shapes", "--vqa-items", "4", "--seeds", "2", "--shots", "0,2",
                    "--max-new-tokens", "3", "--out", str(out), "--name", "m"]) == 0
    rep = json.load(open(out / "m.json"))
    caps = [r for r in rep["records"] if r["task"] == "captioning"]
    assert len(caps) == 2 and all(len(r["examples"]) == r["n"] > 0 for r in caps)
    assert sorted(r["shots"] for r in rep["summary"]) == [0, 2] and all(r["seeds"] == 2 for r in rep["summary"])
    assert all(0 <= r["acc"] <= 1 and r["chance"] == 0.25 for r in rep["summary"])
    assert os.path.getsize(out / "m.png") > 1000 and "CIDEr-D" in open(out / "m.md").read()


def test_cider_and_vqa_scoring(vl_images, tok):
    from eval.vl import VLModel, cider, coco_tokens, vqa_pairs, vqa_rows

    assert coco_tokens("A Red, square-shaped thing.") == "a red square shaped thing"
    refs = ["a red square.", "a blue disc on white.", "two green squares."]
    same, _ = cider(refs, refs)
    partial, per = cider(refs, ["a red square", "a blue square", "nothing at all"])
    assert same > partial > 0 and per[0] > per[1] > per[2] == 0.0
    # the VQA rows: per class, the answer tokens alone are counted; demonstrations count nothing
    from pretrain.config import ModelConfig, StackConfig, TrainConfig, VisionConfig

    cfg = TrainConfig(model=ModelConfig(vocab_size=8000, max_seq_length=256, decoder=StackConfig(1, 32, 2),
                                        vision=VisionConfig(StackConfig(1, 32, 2), image_size=16, patch_size=8)))
    vm = VLModel(None, cfg, tok)
    classes = ["red", "green", "blue"]
    groups = [(vqa_pairs(vm, ["blue", "green"], classes), np.zeros((3, 3, 16, 16), np.float32))]
    rows = vqa_rows(vm, groups)
    assert len(rows) == 3
    for row, c in zip(rows, classes):
        assert tok.decode(row["labels"][row["loss_mask"] == 1].tolist()).strip() == c
        assert len(row["image_dst"]) == 3 * 4


def test_images_only_validation_is_reported(tmp_path, capsys):
    """An images-only run (data.image_fraction=1.0: the finetuned-classification recipe) has a caption validation
    loss and no text perplexity; the log line and the closing summary say so."""
    from pretrain.metrics import Reporter

    rep = Reporter(str(tmp_path), 3, 0, 1, False, False, enabled=True)
    rep.valid(3, {"valid_image_loss": 1.0, "valid_image_ppl": 2.718})
    rep.close()
    out = capsys.readouterr().out
    assert "caption loss 1.0000" in out and "caption perplexity 2.72 at step 3" in out


@pytest.mark.slow
def test_pipeline_parallel_2_carries_images_on_stage_0(tmp_path, tok_model, moby_prefix, vl_images):
    """PP=2 (vision encoder, caption prefixes and docking on stage 0) = the same model in the pipeline engine at
    PP=1, on mixed text + image micro-batches, text and caption validation included."""
    common = [*VL, f"data.image_path=[{vl_images}/shapes]", "data.workers=0", "parallel.micro_batch=2",
              "parallel.deepspeed=pipeline_zero1", "parallel.pipeline_engine=true", "parallel.grad_accum=2",
              "logging.eval_interval=2", "logging.eval_iters=2"]
    launch(tmp_path / "pp1", tok_model, moby_prefix, *common, steps=2)
    launch(tmp_path / "pp2", tok_model, moby_prefix, *common, "parallel.pp=2", nproc=2, steps=2)
    a, b = losses(tmp_path / "pp1"), losses(tmp_path / "pp2")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    valid = [json.loads(x) for x in open(tmp_path / "pp2" / "metrics.jsonl") if "valid_image_loss" in x]
    assert valid and np.isfinite(valid[-1]["valid_image_loss"]) and np.isfinite(valid[-1]["valid_loss"])


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers(tmp_path, tok_model, moby_prefix, vl_images):
    """A scheduler's (or Ctrl-C's) signal reaches every process of the group, DataLoader workers included: the
    workers ignore it, the trainer finishes its step, saves a complete checkpoint and exits 0, nothing is left."""
    import signal
    import subprocess
    import sys
    import time

    from pretrain.checkpoint import COMPLETE
    from tests.test_train import ROOT, SMALL, env, wait_steps

    cmd = [sys.executable, "-m", "pretrain.train", f"run_dir={tmp_path}", f"data.tokenizer_model={tok_model}",
           f"data.data_path=[{moby_prefix}]", *SMALL, *VL, f"data.image_path=[{vl_images}/shapes]",
           "schedule.train_steps=100000", "checkpoint.save_interval=0", "parallel.deepspeed=zero0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT,
                            start_new_session=True)
    wait_steps(tmp_path, 3)
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its 2 loader workers
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested: saving at step" in out
    tag = open(tmp_path / "checkpoints" / "latest").read()
    assert os.path.exists(tmp_path / "checkpoints" / tag / COMPLETE)
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process of the group is left


def test_several_images_per_sample(vl_images, tok):
    """data.images_per_sample=2: two image-caption pairs per row, each image docked into its own S slots right
    after its own <image> marker, both captions counted (in order), never a slot or a marker."""
    ds = dataset(vl_images, tok, n=8, seq_length=64, images_per_sample=2)
    assert len(ds) == 8 and len(ds.order) == 16
    x = ds[3]
    (s0, r0), (s1, r1) = ds.order[6], ds.order[7]  # row i draws order[2i], order[2i+1]
    src = ds.sources
    assert x["images"].shape == (2, 3, 16, 16)
    assert np.array_equal(x["images"][0], load_image(src[s0].images[r0], 16))
    assert np.array_equal(x["images"][1], load_image(src[s1].images[r1], 16))
    dst = x["image_dst"]
    assert len(dst) == 32
    first, second = dst[:16], dst[16:]
    assert (np.diff(first) == 1).all() and (np.diff(second) == 1).all()
    assert x["tokens"][first[0] - 1] == tok.ids.image and x["tokens"][second[0] - 1] == tok.ids.image
    assert x["tokens"][first[-1] + 1] == tok.ids.image_end and x["tokens"][second[-1] + 1] == tok.ids.image_end
    cap1 = tok.encode(src[s0].captions[r0])
    # between the first </image> and the second <image>: exactly the first caption
    assert x["tokens"][first[-1] + 2:second[0] - 1].tolist() == cap1
    counted = x["labels"][x["loss_mask"] == 1].tolist()
    assert counted[:len(cap1)] == cap1 and counted[-1] == tok.ids.eos
    assert tok.decode(counted[len(cap1):-1]) == src[s1].captions[r1]
    assert not set(counted) & {tok.ids.image, tok.ids.image_end}
    slots = np.concatenate([first, second])
    assert (x["loss_mask"][slots] == 0).all() and (x["loss_mask"][slots - 1] == 0).all()


@pytest.mark.slow
def test_zero3_frozen_vision_encoder_with_two_images_per_sample(tmp_path, tok_model, moby_prefix, vl_images):
    """ZeRO-3 over 2 ranks = one process accumulating the same 2 micro-batches, on rows of 2 images each with
    `model.freeze_vision=true`: the vision encoder does not change from step 1 to step 2 (bitwise) and is the same in
    both runs, its connector and the decoder train, and the log names what is frozen."""
    from pretrain.model_io import read_checkpoint

    common = [*VL, f"data.image_path=[{vl_images}/shapes]", "data.images_per_sample=2", "model.freeze_vision=true",
              "data.workers=0", "checkpoint.save_interval=1"]
    launch(tmp_path / "one", tok_model, moby_prefix, *common, "parallel.deepspeed=zero0", "parallel.grad_accum=2",
           steps=2)
    launch(tmp_path / "z3", tok_model, moby_prefix, *common, "parallel.deepspeed=zero3", nproc=2, steps=2)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "z3")
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    assert "in the frozen vision encoder" in open(tmp_path / "z3" / "train.log").read()
    _, at1, _ = read_checkpoint(str(tmp_path / "z3" / "checkpoints" / "step_00000001"))
    _, at2, info = read_checkpoint(str(tmp_path / "z3" / "checkpoints" / "step_00000002"))
    _, ref = final_weights(tmp_path / "one")
    assert "ZeRO-3" in info["read_from"] and at2.keys() == at1.keys()
    vision = [k for k in at2 if k.startswith("vision.")]
    assert len(vision) > 10
    for k in vision:  # unchanged by step 2's update, and identical in the one-process run (same seed, also frozen)
        assert torch.equal(at1[k], at2[k]) and torch.equal(at2[k], ref[k].float()), k
    for part in ("vision_connector.", "decoder."):
        keys = [k for k in at2 if k.startswith(part)]
        assert keys and all(not torch.equal(at1[k], at2[k]) for k in keys if at2[k].ndim == 2), part


@pytest.mark.slow
def test_own_image_folder_imports_trains_and_evaluates(tmp_path, tok_model, moby_prefix):
    """A user's folder (PNGs and JPEGs drawn with Pillow, a caption .txt beside each; one image that does not decode,
    one without a caption) -> `data_tools.images import` -> tiny-vl trains 2 steps -> eval.vl runs. A csv manifest
    with class-name labels gives the same images with labels; a malformed manifest is one line naming file:line:field,
    exit 2. inspect reads a meta.json that lacks the optional keys."""
    import subprocess
    import sys

    from PIL import Image

    from data_tools import images
    from data_tools.images import import_folder, read_rows
    from tests.test_train import ROOT, env

    own = tmp_path / "my photos"
    (own / "sub").mkdir(parents=True)
    rows = []
    for i, (c, s) in enumerate((c, s) for _ in range(4) for c in COLOURS for s in SHAPES):
        where = own / ("sub" if i % 2 else "") / f"img{i:02d}"
        if i % 3:
            where.with_suffix(".png").write_bytes(png(c, s, i))
        else:  # a JPEG, re-encoded as PNG in the shards
            Image.open(io.BytesIO(png(c, s, i))).convert("RGB").save(where.with_suffix(".jpg"), quality=95)
        where.with_suffix(".txt").write_text(f"a {c} {s} on a light background.\n")
        rows.append((os.path.relpath(where, own) + (".png" if i % 3 else ".jpg"), f"a {c} {s}.", c))
    (own / "broken.png").write_bytes(png("red", "disc", 99)[:40])
    (own / "broken.txt").write_text("a truncated file.")
    (own / "nocaption.png").write_bytes(png("blue", "disc", 98))
    r = subprocess.run([sys.executable, "-m", "data_tools.images", "import", "--dir", str(own), "--out",
                        str(tmp_path / "images"), "--name", "mine", "--licence", "CC0"],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.load(open(tmp_path / "images" / "mine" / "meta.json"))
    assert sum(meta["counts"].values()) == 32 and meta["licence"] == "CC0"
    assert meta["skipped"]["no caption"]["ids"] == ["nocaption"]
    assert [i.split(" ")[0] for i in meta["skipped"]["undecodable image"]["ids"]] == ["broken"]
    got = {r["id"]: r for r in read_rows(str(tmp_path / "images" / "mine"))}
    assert got["sub/img01"]["caption"] == "a red disc on a light background." and got["img00"]["width"] == 20
    assert got["img00"]["image"][:8] == b"\x89PNG\r\n\x1a\n"  # the JPEG, decoded and re-encoded
    # a manifest: labels as class names (numbered in sorted order), given splits kept
    with open(tmp_path / "list.csv", "w") as f:
        f.write("path,caption,label,split\n")
        for k, (path, cap, colour) in enumerate(rows):
            f.write(f"{path},{cap},{colour},{('train', 'validation', 'test', 'train')[k % 4]}\n")
    dest = import_folder(str(own), str(tmp_path / "images"), "listed", str(tmp_path / "list.csv"), log=lambda *a: 0)
    meta2 = json.load(open(os.path.join(dest, "meta.json")))
    assert meta2["classes"] == sorted(COLOURS) and meta2["counts"] == {"train": 16, "validation": 8, "test": 8}
    assert {r["label"] for r in read_rows(dest)} == {0, 1, 2, 3}
    (tmp_path / "bad.jsonl").write_text('{"path": "img00.jpg", "caption": "ok"}\n{"path": "img01.png"}\n')
    r = subprocess.run([sys.executable, "-m", "data_tools.images", "import", "--dir", str(own), "--out",
                        str(tmp_path / "images"), "--name", "bad", "--captions", str(tmp_path / "bad.jsonl")],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{tmp_path / 'bad.jsonl'}:2: field 'caption' missing or empty" in r.stderr
    assert not (tmp_path / "images" / "bad").exists()
    # another tool's meta.json with only what the readers need
    os.makedirs(tmp_path / "other" / "x")
    import shutil

    for f in os.listdir(dest):
        if f.endswith(".parquet"):
            shutil.copy(os.path.join(dest, f), tmp_path / "other" / "x" / f)
    (tmp_path / "other" / "x" / "meta.json").write_text("{}")
    assert "x: 32 images" in images.inspect(str(tmp_path / "other"), None)
    # the imported folder trains tiny-vl and evaluates
    launch(tmp_path / "run", tok_model, moby_prefix, *VL, f"data.image_path=[{tmp_path / 'images'}/mine]",
           "data.workers=0", steps=2)
    from eval import vl

    out = tmp_path / "eval"
    assert vl.main(["--model", str(tmp_path / "run"), "--images", str(tmp_path / "images"), "--caption-source",
                    "mine", "--vqa-source", "listed", "--vqa-items", "4", "--seeds", "1", "--shots", "0",
                    "--max-new-tokens", "3", "--out", str(out), "--name", "m"]) == 0
    assert json.load(open(out / "m.json"))["records"]
