"""Checkpoint conversion: consolidation equals the live engine, Hugging Face export equals our model, import/export
round trip, resharding keeps the loss, and bad inputs fail with a named cause and no partial output."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.convert import (ConvertError, export_hf, import_hf, load_consolidated, read_checkpoint,
                              read_consolidated, write_consolidated)
from test_train import ROOT, SMALL, env, launch, losses

transformers = pytest.importorskip("transformers")


def small_cfg(tok_model, prefix, run_dir, *extra):
    return load_config(None, [f"run_dir={run_dir}", f"data.tokenizer_model={tok_model}",
                              f"data.data_path=[{prefix}]", "schedule.train_steps=2", *SMALL, *extra])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_consolidated_equals_live_engine(stage, tmp_path, tok_model, moby_prefix):
    import deepspeed

    from data_tools.datasets import MicroBatches
    from pretrain import checkpoint
    from pretrain.engine import build_engine
    from pretrain.model.metalm import MetaLM
    from pretrain.parallel import init_distributed, init_model_parallel
    from pretrain.modes import pick_mode

    init_distributed("gloo")
    init_model_parallel(1, 1)
    cfg = small_cfg(tok_model, moby_prefix, tmp_path, f"parallel.deepspeed=zero{stage}")
    from data_tools.tokenizer import Tokenizer

    train_ds, _ = pick_mode(cfg).build_data(cfg, Tokenizer(tok_model), 1)
    torch.manual_seed(0)
    engine = build_engine(cfg, MetaLM(cfg.model), 1)
    for _, batch in zip(range(2), MicroBatches(train_ds, 2)):
        engine.backward(engine(batch))
        engine.step()
    import yaml

    from pretrain.config import config_to_dict

    checkpoint.save(engine, str(tmp_path / "ckpt"), 2, {"state": {"step": 2, "consumed_samples": 4}},
                    yaml.safe_dump(config_to_dict(cfg)), keep_last=2, log=lambda *a, **k: None)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        live = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    _, sd, info = read_checkpoint(str(tmp_path / "ckpt"))
    assert info["read_from"].startswith("zero_to_fp32") and info["step"] == 2
    assert sd.keys() == live.keys()
    for n in live:
        assert torch.equal(sd[n], live[n]), n


def real_text_ids(tok, moby_jsonl, n=96):
    text = json.loads(open(moby_jsonl).readline())["text"]
    return [tok.ids.bos] + tok.encode(text)[: n - 1]


def test_export_hf_matches_our_logits_and_generation(trained, tmp_path, moby_jsonl):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from eval.generate import generate_ids

    _, model_dir = trained
    model, cfg, tok = load_consolidated(str(model_dir))
    hf_dir = export_hf(str(model_dir), str(tmp_path / "hf"))
    hf = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = real_text_ids(tok, moby_jsonl)
    T = len(ids)
    batch = {"tokens": torch.tensor([ids]), "position_ids": torch.arange(T)[None],
             "document_ids": torch.zeros(1, T, dtype=torch.int32)}
    with torch.no_grad():
        ours = model.logits(batch)[0]
        theirs = hf(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() <= 1e-4
    prompt = ids[:16]
    ours_gen = generate_ids(model, prompt, 32)
    hf_gen = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.ids.pad)[0, 16:].tolist()
    assert ours_gen == hf_gen
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    for line in open(moby_jsonl).readline().split("\n")[:50]:
        if line and not line[0].isspace():  # HF's converted tokenizer differs only on leading spaces
            assert hf_tok(line)["input_ids"] == [tok.ids.bos] + tok.encode(line), line


def test_import_export_round_trip_bit_identical(trained, tmp_path):
    from safetensors.torch import load_file

    _, model_dir = trained
    hf1 = export_hf(str(model_dir), str(tmp_path / "hf1"))
    ours = import_hf(hf1, str(tmp_path / "imported"))
    hf2 = export_hf(ours, str(tmp_path / "hf2"))
    a, b = load_file(os.path.join(hf1, "model.safetensors")), load_file(os.path.join(hf2, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, sd_orig, _ = read_consolidated(str(model_dir))
    _, sd_imp, _ = read_consolidated(ours)
    dec = [k for k in sd_orig if k.startswith("decoder.")]
    assert all(torch.equal(sd_orig[k], sd_imp[k]) for k in dec)
    enc = import_hf(hf1, str(tmp_path / "with_encoder"), encoder_preset="tiny-cpu")
    cfg, sd, _ = read_consolidated(enc)
    assert cfg.model.encoder is not None and any(k.startswith("encoder.") for k in sd)


@pytest.mark.slow
def test_reshard_tp2_to_tp1_and_pp2_keeps_the_loss(tmp_path, tok_model, moby_prefix):
    common = ["parallel.deepspeed=zero1", "checkpoint.save_interval=4"]
    launch(tmp_path / "tp2", tok_model, moby_prefix, *common, "parallel.tp=2", nproc=2, steps=6)
    r = subprocess.run([sys.executable, "-m", "pretrain.convert", "reshard", "--checkpoint",
                        str(tmp_path / "tp2" / "checkpoints" / "step_00000004"), "--out", str(tmp_path / "rs")],
                       capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    launch(tmp_path / "tp1", tok_model, moby_prefix, *common, f"checkpoint.init_from={tmp_path / 'rs'}", steps=6)
    a, b = losses(tmp_path / "tp2"), losses(tmp_path / "tp1")
    assert sorted(b) == [5, 6], "the resharded run continues at step 5"
    assert b[5] == pytest.approx(a[5], rel=1e-5)
    # and onto two pipeline stages (weights go to DeepSpeed's per-layer modules, the tied embedding included)
    launch(tmp_path / "pp2", tok_model, moby_prefix, "parallel.deepspeed=pipeline_zero1", "parallel.pp=2",
           f"checkpoint.init_from={tmp_path / 'rs'}", nproc=2, steps=6)
    c = losses(tmp_path / "pp2")
    assert sorted(c) == [5, 6] and c[5] == pytest.approx(a[5], rel=1e-5)


def test_pipeline_checkpoint_consolidates(tmp_path, tok_model, moby_prefix):
    launch(tmp_path, tok_model, moby_prefix, "parallel.deepspeed=pipeline_zero1", "parallel.pp=2",
           "checkpoint.save_interval=2", nproc=2, steps=2)
    cfg, sd, info = read_checkpoint(str(tmp_path / "checkpoints"))
    assert info["read_from"] == "pipeline layer files"
    write_consolidated(str(tmp_path / "out"), cfg, sd, tok_model, info)  # checks names and shapes
    model, _, _ = load_consolidated(str(tmp_path / "out"))
    assert torch.equal(model.decoder.embedding.weight, sd["decoder.embedding.weight"])


def test_bad_inputs_name_the_problem_and_leave_nothing(trained, tmp_path, tok_model):
    run, model_dir = trained
    with pytest.raises(ConvertError, match="checkpoint not found: /nope"):
        read_checkpoint("/nope")
    # a checkpoint of another architecture
    cfg, sd, info = read_checkpoint(str(run / "checkpoints"))
    other = load_config(None, ["model.vocab_size=1000", "model.decoder.layers=3"])
    with pytest.raises(ConvertError, match="missing \\['decoder.stack.layers.2"):
        write_consolidated(str(tmp_path / "x"), other, sd, tok_model, info)
    # a missing shard
    broken = tmp_path / "broken"
    shutil.copytree(run / "checkpoints", broken)
    tag = open(broken / "latest").read()
    os.remove(broken / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(ConvertError, match="damaged checkpoint: zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"):
        read_checkpoint(str(broken))  # the COMPLETE marker's manifest names the file
    # a vocabulary mismatch on import: a tokenizer.json with more pieces than the model has rows
    hf = export_hf(str(model_dir), str(tmp_path / "hf"))
    for name in ("tokenizer.model", "tokenizer_meta.json", "tokenizer_config.json"):
        os.remove(os.path.join(hf, name))
    fix = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "megatron_preprocess", "hf_bpe3k")
    shutil.copyfile(os.path.join(fix, "tokenizer.json"), os.path.join(hf, "tokenizer.json"))
    with pytest.raises(ConvertError, match="vocabulary mismatch"):
        import_hf(hf, str(tmp_path / "imp"))
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(("x", "imp"))]
    assert leftovers == [], leftovers
    r = subprocess.run([sys.executable, "-m", "pretrain.convert", "export-hf", "--model", str(tmp_path / "none"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: checkpoint not found")


def test_lm_eval_on_local_task_matches_our_scores(trained, tmp_path, moby_jsonl):
    pytest.importorskip("lm_eval")
    from eval.lm_eval_bridge import make_task, run

    _, model_dir = trained
    rows = [json.loads(l)["text"].split() for l in open(moby_jsonl)]
    rng = np.random.default_rng(0)
    with open(tmp_path / "items.jsonl", "w") as f:
        for i in range(12):
            good, bad = " ".join(rows[i + 3][140:150]), " ".join(rows[i + 60][200:210])
            label = int(rng.integers(2))
            f.write(json.dumps({"context": " ".join(rows[i + 3][100:140]),
                                "choices": [good, bad] if label == 0 else [bad, good], "label": label}) + "\n")
    make_task("moby_mc", str(tmp_path / "items.jsonl"), str(tmp_path / "tasks"))
    res = run(str(model_dir), ["moby_mc"], str(tmp_path / "tasks"), log_samples=True)
    assert res["results"]["moby_mc"]["sample_len"] == 12
    model, _, tok = load_consolidated(str(model_dir))

    def loglik(ctx, cont):  # lm-eval's recipe: BOS + encode(ctx + cont), continuation = what follows encode(ctx)
        whole = tok.encode(ctx + cont)
        n = len(whole) - len(tok.encode(ctx))
        ids = [tok.ids.bos] + whole
        T = len(ids) - 1
        with torch.no_grad():
            lp = torch.log_softmax(model.logits({"tokens": torch.tensor([ids[:-1]]),
                                                 "position_ids": torch.arange(T)[None],
                                                 "document_ids": torch.zeros(1, T, dtype=torch.int32)})[0], -1)
        return lp[torch.arange(T), torch.tensor(ids[1:])][-n:].sum().item()

    correct = 0
    for s in res["samples"]["moby_mc"]:
        k = len(s["doc"]["choices"])  # then come the ("", choice) requests of acc_mutual_info
        ours = [loglik(ctx, cont) for ctx, cont in s["arguments"][:k]]
        theirs = [r[0][0] for r in s["resps"][:k]]
        np.testing.assert_allclose(ours, theirs, atol=1e-3)
        correct += int(np.argmax(ours) == s["target"])
    assert res["results"]["moby_mc"]["acc,none"] == pytest.approx(correct / 12)


def test_paths_resolve_from_anywhere(trained, tmp_path, tok_model):
    """Runs save absolute paths; an older run's relative tokenizer path gives a clear error and --tokenizer-model
    overrides it; export-hf from a checkpoint leaves no intermediate directory."""
    import yaml

    from pretrain.config import load_config
    from pretrain.checks import absolute_paths
    from pretrain.modes import pick_mode

    cfg = load_config(None, ["data.tokenizer_model=tok/spm.model", "data.data_path=[0.5, a/b, 0.5, /c/d]",
                             "run_dir=runs/x"])
    absolute_paths(cfg, pick_mode(cfg))
    assert cfg.data.tokenizer_model == os.path.abspath("tok/spm.model") and cfg.run_dir == os.path.abspath("runs/x")
    assert cfg.data.data_path == [0.5, os.path.abspath("a/b"), 0.5, "/c/d"]
    run, _ = trained
    old = tmp_path / "old"
    shutil.copytree(run / "checkpoints", old)
    tag = old / open(old / "latest").read()
    saved = yaml.safe_load(open(tag / "config.yaml"))
    assert os.path.isabs(saved["data"]["tokenizer_model"])
    saved["data"]["tokenizer_model"] = "work/tok/spm.model"  # as runs saved it before: relative to their cwd
    yaml.safe_dump(saved, open(tag / "config.yaml", "w"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cmd = [sys.executable, "-m", "pretrain.convert", "export-hf", "--model", str(old), "--out", str(elsewhere / "hf")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=elsewhere, timeout=300)
    assert r.returncode == 2 and "pass --tokenizer-model" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["--tokenizer-model", tok_model], capture_output=True, text=True, env=env(),
                       cwd=elsewhere, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(elsewhere)) == ["hf"]  # no hf.consolidated left behind
