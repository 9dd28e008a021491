"""Material the project did not make, as a new user brings it: an own byte-level BPE tokenizer.json (with and
without image markers) for vision-language training, a random GQA LlamaForCausalLM imported and pretrained on as a
MetaLM (an encoder added by preset), and the start-up checks that must fail in the launcher, before any process
is spawned (one line, exit 2, no torchrun report)."""
import json
import os
import subprocess
import sys

import pytest

from test_interop import FIX, QUIET, random_llama
from test_train import ROOT, SMALL, env, free_port, launch, losses

VL = ["model.preset=tiny-vl", "model.max_seq_length=128", "model.decoder.layers=2", "model.decoder.hidden=64",
      "model.decoder.heads=4", "model.decoder.ffn_hidden=128", "model.vision.image_size=16", "model.vision.patch_size=4",
      "data.seq_length=64", "data.image_fraction=0.5", "data.workers=0", "parallel.micro_batch=4"]


def launch_args(run_dir, *overrides, nproc=1, steps=2):
    return [sys.executable, "-m", "pretrain.launch", "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
            "--", f"run_dir={run_dir}", f"schedule.train_steps={steps}", *SMALL, *overrides]


def refused_before_spawning(cmd, says):
    """exit 2, one error line naming the problem, and nothing from torchrun or a rank."""
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2, (r.stdout + r.stderr)[-3000:]
    assert says in r.stderr, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr and "Root Cause" not in r.stderr
    assert "[rank" not in r.stderr and "launcher: starting the training processes" not in r.stdout
    return r


def own_bpe(out_dir, texts, image_markers=False):
    """A byte-level BPE tokenizer.json of the user's, trained with `tokenizers` (no config files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"] + (["<image>", "</image>"] if image_markers else [])
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=special,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(out_dir, exist_ok=True)
    tk.save(os.path.join(out_dir, "tokenizer.json"))
    return str(out_dir)


@pytest.fixture(scope="module")
def own_text(tmp_path_factory, moby_jsonl):
    from data_tools.preprocess import output_prefixes, preprocess
    from data_tools.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("own")
    texts = [json.loads(l)["text"] for l in open(moby_jsonl)][:40]
    tok_dir = own_bpe(out / "tok", texts)
    preprocess([moby_jsonl], str(out / "data" / "own"), load_tokenizer(tok_dir), append_eod=True, **QUIET)
    return tok_dir, output_prefixes(str(out / "data" / "own"), ["text"])[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from data_tools.images import Record, write_dataset
    from tests.test_vl_training import COLOURS, SHAPES, png

    out = str(tmp_path_factory.mktemp("images"))
    recs = [Record(f"s{i}", png(c, s, i), f"a {c} {s}.", list(COLOURS).index(c))
            for i, (c, s) in enumerate((c, s) for _ in range(4) for c in COLOURS for s in SHAPES)]
    write_dataset("shapes", iter(recs), out, {"licence": "test", "classes": list(COLOURS)}, log=lambda *a: 0)
    return os.path.join(out, "shapes")


@pytest.mark.slow
def test_vision_language_with_an_own_tokenizer(tmp_path, own_text, shapes):
    """Without <image> markers: refused in the launcher, naming the command that adds them; with them added (the
    dataset's record updated, token ids unchanged) tiny-vl trains, and the checkpoint records that tokenizer."""
    from data_tools.tokenizer import dataset_tokenizer_spec, load_tokenizer

    tok_dir, prefix = own_text
    common = [*VL, "model.vocab_size=768", f"data.data_path=[{prefix}]", f"data.image_path=[{shapes}]"]
    refused_before_spawning(launch_args(tmp_path / "no", *common), "has no <image> / </image> tokens")
    before = open(prefix + ".bin", "rb").read()
    r = subprocess.run([sys.executable, "-m", "data_tools.tokenizer", "add-image-tokens", "--tokenizer", tok_dir,
                        "--out", str(tmp_path / "tok_img"), "--datasets", prefix], capture_output=True, text=True,
                       env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    old, new = load_tokenizer(tok_dir), load_tokenizer(str(tmp_path / "tok_img"))
    assert (new.ids.image, new.ids.image_end) == (old.vocab_size, old.vocab_size + 1)
    marked = new.encode("a whale <image> and </image>")
    assert new.ids.image in marked and new.ids.image_end in marked and len(marked) < len(old.encode(
        "a whale <image> and </image>"))  # one special token each, found by name
    assert new.encode("Call me Ishmael.") == old.encode("Call me Ishmael.")
    assert dataset_tokenizer_spec(prefix)["model"] == str(tmp_path / "tok_img") and \
        open(prefix + ".bin", "rb").read() == before
    refused_before_spawning(launch_args(tmp_path / "small", *common, f"model.vocab_size={old.vocab_size}"),
                            f"model.vocab_size={old.vocab_size} is smaller than the tokenizer's {new.vocab_size}")
    launch(tmp_path / "run", "", prefix, *common, "checkpoint.save_interval=2", steps=2)
    from pretrain.model_io import read_checkpoint

    cfg, _, _ = read_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert cfg.data.tokenizer_model == str(tmp_path / "tok_img") and sorted(losses(tmp_path / "run")) == [1, 2]


@pytest.mark.slow
def test_continued_pretraining_from_an_imported_llama(tmp_path):
    """A random GQA Llama -> import-hf -> pretraining as a MetaLM with checkpoint.model_from_init: the decoder and
    tokenizer from the import, the text encoder and connector of the config (fresh); resumes exactly after kill -9.
    Without model_from_init the shape mismatch is one line naming the switch; a data.seq_length above the import's
    max_position_embeddings names the init model as where the limit came from."""
    from data_tools.preprocess import output_prefixes, preprocess
    from data_tools.tokenizer import load_tokenizer
    from pretrain.convert import import_hf
    from pretrain.model_io import read_model
    from test_train import final_weights

    random_llama(tmp_path / "hf", max_position_embeddings=128)
    imp = import_hf(str(tmp_path / "hf"), str(tmp_path / "imp"))
    preprocess([str(FIX / "small.jsonl")], str(tmp_path / "d"), load_tokenizer(str(FIX / "hf_bpe3k")),
               append_eod=True, **QUIET)
    prefix = output_prefixes(str(tmp_path / "d"), ["text"])[0]
    common = [f"checkpoint.init_from={imp}", "checkpoint.save_interval=2", f"data.data_path=[{prefix}]"]
    refused_before_spawning(launch_args(tmp_path / "plain", *common),
                            "checkpoint.model_from_init=true")
    refused_before_spawning(launch_args(tmp_path / "long", *common, "checkpoint.model_from_init=true",
                                        "data.seq_length=256"),
                            f"data.seq_length=256 exceeds model.max_seq_length=128 (the init model's, "
                            f"checkpoint.init_from={imp})")
    grow = [*common, "checkpoint.model_from_init=true"]
    r = launch(tmp_path / "straight", "", prefix, *grow, steps=4)
    assert f"initialised from {imp}" in r.stdout and "text encoder + connector: from the config, fresh" in r.stdout
    cut = launch(tmp_path / "cut", "", prefix, *grow, "callbacks=[{path: tests.fault_injection.FaultInjection, "
                 "die_at_step: 3}]", steps=4, check=False)
    assert cut.returncode != 0
    launch(tmp_path / "cut", "", prefix, *grow, steps=4)
    assert losses(tmp_path / "straight") == losses(tmp_path / "cut") and len(losses(tmp_path / "cut")) == 4
    _, wa = final_weights(tmp_path / "straight")
    _, wb = final_weights(tmp_path / "cut")
    assert all(torch_equal(wa[k], wb[k]) for k in wa)
    from pretrain.model_io import read_checkpoint

    cfg, _, _ = read_checkpoint(str(tmp_path / "straight" / "checkpoints"))
    d = cfg.model.decoder
    assert (d.hidden, d.kv_heads, cfg.model.vocab_size, cfg.model.encoder.hidden) == (64, 2, 3000, 32)
    _, src, _ = read_model(imp)
    assert not torch_equal(wa["decoder.stack.layers.0.attn.qkv.weight"],
                           src["decoder.stack.layers.0.attn.qkv.weight"])  # it trained


def torch_equal(a, b):
    import torch

    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.slow
def test_start_up_checks_fail_in_the_launcher(tmp_path, tok_model, moby_prefix, own_text):
    """Each is one line and exit 2 from pretrain.launch, before any process: an image path that is not a dataset, a
    dataset recorded with another tokenizer, a split that leaves the validation split empty. A model vocabulary
    much larger than the tokenizer's is warned once (not once per rank) with both numbers."""
    base = [f"data.tokenizer_model={tok_model}", f"data.data_path=[{moby_prefix}]"]
    (tmp_path / "imgs").mkdir()
    refused_before_spawning(launch_args(tmp_path / "a", *VL, "model.vocab_size=1000", *base,
                                        f"data.image_path=[{tmp_path / 'imgs'}]"),
                            f"data.image_path: {tmp_path / 'imgs'} is not a fetched image dataset (no meta.json")
    refused_before_spawning(launch_args(tmp_path / "b", f"data.tokenizer_model={tok_model}",
                                        f"data.data_path=[{own_text[1]}]"),
                            "was made with another tokenizer")
    refused_before_spawning(launch_args(tmp_path / "c", *base, "data.split=999,1,0", "logging.eval_interval=5",
                                        "logging.eval_iters=2"),
                            "the valid split gets 0 of its 135 documents")
    r = subprocess.run(launch_args(tmp_path / "d", *base, "model.vocab_size=8000", nproc=2, steps=1),
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("warning: model.vocab_size=8000 is larger than the tokenizer's 1000 pieces") == 1
