"""Evaluation on the session's tiny trained model: scoring equals lm-evaluation-harness, the encoder placement never
encodes answers, KV-cached generation equals uncached and transformers, batched equals one by one, sampling is
reproducible, perplexity windows are exact, reports and in-loop scoring work, and every rank agrees under TP."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_tools.task_samples import build_sequences, causal_context, collate_sequences
from data_tools.tasks import get_task, load_split
from test_train import ROOT, env, launch


@pytest.fixture(scope="module")
def loaded(trained):
    from eval.inference import load_model

    return load_model(str(trained[1]))


def test_load_model_from_run_dir_equals_consolidated(trained, loaded):
    from eval.inference import load_model

    model, cfg, tok, info = loaded
    m2, _, _, info2 = load_model(str(trained[0]))
    assert info2["step"] == info["step"] == 4
    for (n, a), (_, b) in zip(model.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n


def test_causal_scores_equal_lm_eval(loaded, trained, task_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from eval.lm_eval_bridge import make_task, run
    from eval.score import score_items

    model, cfg, tok, _ = loaded
    task = get_task("polarity")
    items = load_split(str(task_dir), "polarity", "test")[:24]
    with open(tmp_path / "items.jsonl", "w") as f:
        for it in items:
            f.write(json.dumps({"context": causal_context(task, it, []), "choices": task.choices(it),
                                "label": it["label"]}) + "\n")
    make_task("polarity_local", str(tmp_path / "items.jsonl"), str(tmp_path / "tasks"))
    res = run(str(trained[1]), ["polarity_local"], str(tmp_path / "tasks"), log_samples=True)
    ours = score_items(model, tok, task, items, [], "causal", 0, 0, cfg.model.max_seq_length,
                       cfg.model.max_seq_length, batch_size=5)
    samples = sorted(res["samples"]["polarity_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    for s, ll in zip(samples, ours.lls):
        np.testing.assert_allclose(ll, [r[0][0] for r in s["resps"]][:len(ll)], atol=1e-4, rtol=0)
    m = ours.metrics()
    assert res["results"]["polarity_local"]["acc,none"] == pytest.approx(m["acc"], abs=1e-12)
    assert res["results"]["polarity_local"]["acc_norm,none"] == pytest.approx(m["acc_norm"], abs=1e-12)
    assert res["results"]["polarity_local"]["acc_mutual_info,none"] == pytest.approx(m["acc_mutual_info"], abs=1e-12)
    uncond = [r[0][0] for r in samples[0]["resps"][len(ours.lls[0]):]]  # lm-eval's ("", " choice") requests
    np.testing.assert_allclose(uncond, ours.unconditional[0], atol=1e-4, rtol=0)


def test_encoder_placement_never_sees_the_answer(loaded, task_dir):
    from eval.inference import target_logprobs

    model, cfg, tok, _ = loaded
    task = get_task("polarity")
    items = load_split(str(task_dir), "polarity", "test")[:3]
    pool = load_split(str(task_dir), "polarity", "train")
    seqs = build_sequences(task, items[0], pool[:2], "encoder", tok, 128, 128)
    assert seqs[0].pieces == seqs[1].pieces  # every choice: the same encoder input
    batch, start, n = collate_sequences(seqs, tok.ids.bos, tok.ids.pad, True)
    B, T = batch["tokens"].shape
    base = target_logprobs(model, batch)
    # 1. the decoder tokens under the docked slots (where an encoded answer would sit) are overwritten: any value
    #    there, including the answer's own ids, changes nothing
    poked = {k: v.clone() for k, v in batch.items()}
    slots = batch["dock_dst"][batch["dock_dst"] < B * T]
    flat = poked["tokens"].view(-1)
    for r, s in enumerate(seqs):
        rows = slots[(slots >= r * T) & (slots < (r + 1) * T)]
        flat[rows] = torch.tensor(s.target * len(rows))[:len(rows)]
    torch.testing.assert_close(target_logprobs(model, poked), base, atol=0, rtol=0)
    # 2. the answer's log-likelihood does not depend on the answer's own tokens: change them, the scores of the
    #    earlier answer tokens (from everything before them) stay the same
    for r, s in enumerate(seqs):
        p = {k: v.clone() for k, v in batch.items()}
        p["tokens"][r, start[r] + 1:start[r] + n[r]] = tok.ids.unk
        lp = target_logprobs(model, p)
        assert torch.equal(lp[r, start[r]], base[r, start[r]])
    # 3. and the encoder is used: another input in the encoder changes the scores
    other = build_sequences(task, items[1], pool[:2], "encoder", tok, 128, 128)
    b2, s2, n2 = collate_sequences(other, tok.ids.bos, tok.ids.pad, True)
    assert not torch.allclose(target_logprobs(model, b2)[0, s2[0]], base[0, start[0]])


def test_score_cli_report_and_errors(trained, task_dir, tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "eval.score", "--model", str(trained[1]), "--data", str(task_dir), "--tasks",
           "polarity,spam", "--shots", "0,1", "--placement", "causal,encoder", "--seeds", "2", "--limit", "12",
           "--max-encoder-length", "48", "--out", str(out)]
    r = subprocess.run(cmd + ["--log-samples"], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = json.load(open(out / "metalm.json"))["records"]
    assert len(recs) == 2 * 2 * (1 + 2)  # tasks x placements x (0-shot once + 1-shot x 2 seeds)
    items = [json.loads(l) for l in open(out / "metalm.samples.jsonl")]
    assert len(items) == 12 * len(recs)
    for rec in recs:  # the per-item records give the setting's metrics
        mine = [i for i in items if all(i[k] == rec[k] for k in ("task", "placement", "shots", "seed"))]
        assert len(mine) == 12 and all(len(i["loglikelihoods"]) == len(i["choices"]) for i in mine)
        for m in ("acc", "acc_norm", "acc_mutual_info"):
            assert sum(i["correct"][m] for i in mine) / 12 == pytest.approx(rec["metrics"][m])
    for rec in recs:
        assert rec["n"] == 12 and rec["step"] == 4 and 0 <= rec["metrics"]["acc"] <= 1
        assert {"acc", "acc_norm", "acc_mutual_info"} == set(rec["metrics"]) and "truncated_sequences" in rec
    assert any(r["truncated_sequences"] > 0 for r in recs if r["task"] == "spam" and r["placement"] == "encoder")
    assert (out / "metalm.md").read_text().count("\n") == len(recs) + 2
    rep = subprocess.run([sys.executable, "-m", "eval.report", str(out / "metalm.json"), "--out",
                          str(tmp_path / "summary")], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "summary.png").stat().st_size > 1000 and "± " in rep.stdout
    bad = subprocess.run(cmd[:5] + ["--data", str(task_dir), "--tasks", "nope"], capture_output=True, text=True,
                         env=env(), cwd=ROOT)
    assert bad.returncode == 2 and "unknown task 'nope'" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "eval.score", "--model", str(tmp_path), "--tasks", "spam"],
                         capture_output=True, text=True, env=env(), cwd=ROOT)
    assert bad.returncode == 2 and "neither a consolidated model" in bad.stderr


# ---------------------------------------------------------------- generation
def prompts(tok, moby_jsonl):
    text = json.loads(open(moby_jsonl).readline())["text"]
    ids = tok.encode(text)
    return [ids[:5], ids[40:61], ids[100:111]]


def test_cached_generation_equals_uncached_batched_equals_single(loaded, moby_jsonl):
    from eval.generate import GenerationConfig, generate_batch

    model, cfg, tok, _ = loaded
    ps = prompts(tok, moby_jsonl)
    L = cfg.model.max_seq_length
    cached = generate_batch(model, tok, ps, GenerationConfig(40), L, stop_ids=())
    uncached = generate_batch(model, tok, ps, GenerationConfig(40, use_cache=False), L, stop_ids=())
    assert [o.ids for o in cached] == [o.ids for o in uncached]
    assert all(len(o.ids) == 40 for o in cached)
    single = [generate_batch(model, tok, [p], GenerationConfig(40), L, stop_ids=())[0].ids for p in ps]
    assert [o.ids for o in cached] == single
    passage = tok.encode("Call me Ishmael. Some years ago, never mind how long precisely.")
    e1 = generate_batch(model, tok, ps, GenerationConfig(12), L, passages=[passage] * 3, stop_ids=())
    e2 = generate_batch(model, tok, ps, GenerationConfig(12, use_cache=False), L, passages=[passage] * 3,
                        stop_ids=())
    assert [o.ids for o in e1] == [o.ids for o in e2]


def test_generation_equals_transformers(loaded, trained, tmp_path, moby_jsonl):
    from transformers import GenerationConfig as HFGen
    from transformers import LlamaForCausalLM

    from eval.generate import GenerationConfig, generate_batch
    from pretrain.convert import export_hf

    model, cfg, tok, _ = loaded
    hf_dir = export_hf(str(trained[1]), str(tmp_path / "hf"))
    gc = HFGen.from_pretrained(hf_dir)
    assert gc.eos_token_id == [tok.ids.eos, tok.ids.eod]  # exported generation stops at </d> as well
    hf = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    for p in prompts(tok, moby_jsonl):
        ours = generate_batch(model, tok, [p], GenerationConfig(24), cfg.model.max_seq_length, stop_ids=())[0].ids
        theirs = hf.generate(torch.tensor([[tok.ids.bos] + p]), max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.ids.pad)[0, len(p) + 1:].tolist()
        assert ours == theirs


def test_sampling_stop_strings_and_length_guard(loaded, moby_jsonl):
    from eval.generate import GenerationConfig, generate_batch

    model, cfg, tok, _ = loaded
    ps = prompts(tok, moby_jsonl)
    L = cfg.model.max_seq_length
    g = GenerationConfig(30, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a = generate_batch(model, tok, ps, g, L, stop_ids=())
    b = generate_batch(model, tok, ps, g, L, stop_ids=())
    c = generate_batch(model, tok, ps, GenerationConfig(30, temperature=1.0, top_k=50, top_p=0.95, seed=8), L,
                       stop_ids=())
    assert [o.ids for o in a] == [o.ids for o in b] and [o.ids for o in a] != [o.ids for o in c]
    greedy = generate_batch(model, tok, ps[:1], GenerationConfig(30), L, stop_ids=())[0]
    stop = tok.decode(greedy.ids[3:5]).strip()
    if stop:
        s = generate_batch(model, tok, ps[:1], GenerationConfig(30, stop=(stop,)), L, stop_ids=())[0]
        assert s.stopped_by == "stop string" and stop not in s.text and len(s.ids) < 30
    eos_first = generate_batch(model, tok, ps[:1], GenerationConfig(30), L, stop_ids=(greedy.ids[0],))[0]
    assert eos_first.ids == [] and eos_first.stopped_by == "eos"
    long = list(range(10, 10 + L + 20))
    o = generate_batch(model, tok, [long], GenerationConfig(8), L, stop_ids=())[0]
    # lm-eval's rule: the context keeps its last L - 8 tokens (<s> included), the continuation all 8
    assert o.prompt_truncated == 29 and len(o.ids) == 8 and o.notes
    o = generate_batch(model, tok, [long], GenerationConfig(L), L, stop_ids=())[0]
    assert o.prompt_truncated == 22 and len(o.ids) == 1  # no prompt would be left: room for one new token


def test_batched_generation_gives_each_row_its_own_budget(loaded, moby_jsonl):
    """Prompts of very different lengths near max_seq_length: each row's budget is its own (before: every row was
    capped by the longest prompt), batched equals one by one; the decoded text keeps its leading space."""
    from eval.generate import GenerationConfig, continuation_text, generate_batch

    model, cfg, tok, _ = loaded
    L = cfg.model.max_seq_length
    text = json.loads(open(moby_jsonl).readline())["text"]
    ids = tok.encode(text)
    ps = [ids[:2], ids[10:30], ids[50:50 + L - 10]]
    for g in (GenerationConfig(24), GenerationConfig(L - 1)):
        batched = generate_batch(model, tok, ps, g, L, stop_ids=())
        single = [generate_batch(model, tok, [p], g, L, stop_ids=())[0] for p in ps]
        assert [o.ids for o in batched] == [o.ids for o in single]
        assert [o.text for o in batched] == [o.text for o in single]
        want = [24, 24, 24] if g.max_new_tokens == 24 else [L - 3, L - 21, 9]
        assert [len(o.ids) for o in batched] == want, [len(o.ids) for o in batched]
    assert batched[2].prompt_truncated == 0 and "capped at 9" in batched[2].notes[0]
    words = tok.encode("The whale swam on")
    assert continuation_text(tok, words[:2], words[2:]) == " swam on" and tok.decode(words[2:]) == "swam on"


def test_generate_cli(trained, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("Call me Ishmael.\nThe whale\n")
    r = subprocess.run([sys.executable, "-m", "eval.generate", "--model", str(trained[1]), "--prompts", str(f),
                        "--max-new-tokens", "8", "--encode", "A passage for the encoder.", "--temperature", "0.7",
                        "--seed", "3"], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("continuation:") == 2 and "tokens/s" in r.stderr


# ---------------------------------------------------------------- perplexity
def test_perplexity_windows_are_exact(loaded, moby_prefix):
    from data_tools.cli import import_indexed_dataset
    from eval.inference import target_logprobs
    from eval.perplexity import score_documents, windows

    for n, w, s in ((10, 4, 2), (100, 128, 64), (300, 128, 50), (7, 2, 1)):
        covered = []
        for b, e, k in windows(n, w, s):
            assert e - b <= w and k >= 1
            covered += list(range(e - k, e))
        assert covered == list(range(1, n))  # every target exactly once
    model, cfg, tok, _ = loaded
    ds = import_indexed_dataset().IndexedDataset(moby_prefix)  # keep it alive: its items are views of its mmap
    doc = np.concatenate([[tok.ids.eod], ds[0][:100]]).astype(np.int64)
    nll, count = score_documents(model, [doc], window=128, stride=64)
    t = torch.as_tensor(doc)
    ref = -target_logprobs(model, {"tokens": t[None, :-1], "labels": t[None, 1:],
                                   "position_ids": torch.arange(len(doc) - 1)[None],
                                   "document_ids": torch.zeros(1, len(doc) - 1, dtype=torch.int32)}).sum().item()
    assert count == 100 and nll == pytest.approx(ref, rel=1e-6)
    nll_w, count_w = score_documents(model, [doc], window=40, stride=20)
    assert count_w == 100 and math.isfinite(nll_w) and nll_w != pytest.approx(ref, rel=1e-9)


def test_perplexity_cli(trained, moby_prefix, moby_jsonl, tmp_path):
    for data in (moby_prefix, moby_jsonl):
        r = subprocess.run([sys.executable, "-m", "eval.perplexity", "--model", str(trained[1]), "--data", data,
                            "--limit", "2", "--window", "64", "--out", str(tmp_path / "ppl.json")],
                           capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        res = json.load(open(tmp_path / "ppl.json"))
        assert res["documents"] == 2 and res["perplexity"] == pytest.approx(math.exp(res["nll"]))
    assert "bits_per_byte" in res


# ---------------------------------------------------------------- in-loop evaluation and tensor parallelism
@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])  # items split over ranks; ZeRO-3: all ranks score all items
def test_in_loop_downstream_scores_are_logged(tmp_path, tok_model, moby_prefix, task_dir, zero):
    r = launch(tmp_path, tok_model, moby_prefix, f"parallel.deepspeed={zero}", "logging.eval_interval=2",
               "logging.eval_iters=1",
               "logging.tensorboard=true", "logging.downstream_tasks=[polarity,spam]",
               "logging.downstream_shots=[0,1]", f"logging.downstream_data={task_dir}",
               "logging.downstream_items=6", nproc=2, steps=4)
    recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if "down/" in l]
    assert [rec["step"] for rec in recs] == [2, 4]
    keys = {k for k in recs[0] if k.startswith("down/")}
    assert {"down/polarity/causal/0shot/acc", "down/spam/encoder/1shot/acc_norm"} <= keys and len(keys) == 24
    assert all(v in {i / 6 for i in range(7)} for k, v in recs[0].items() if k.startswith("down/"))
    assert "downstream acc | polarity/causal/0shot" in r.stdout


@pytest.mark.slow
def test_scoring_and_generation_agree_across_tp_ranks(tmp_path, tok_model, task_dir):
    import torch.multiprocessing as tmp

    import tp_worker
    from test_model import free_port

    items = load_split(str(task_dir), "polarity", "test")[:4]
    for world in (1, 2):
        tmp.start_processes(tp_worker.run_eval, args=(world, free_port(), str(tmp_path), tok_model, items),
                            nprocs=world, start_method="spawn", join=True)
    ref = torch.load(tmp_path / "eval_tp1_rank0.pt", weights_only=False)
    r0, r1 = (torch.load(tmp_path / f"eval_tp2_rank{r}.pt", weights_only=False) for r in (0, 1))
    # every rank the same scores and the same text
    assert np.array_equal(r0["lls"], r1["lls"]) and r0["gen"] == r1["gen"] and r0["sampled"] == r1["sampled"]
    assert r0["gen"] == ref["gen"] and r0["sampled"] == ref["sampled"]
    np.testing.assert_allclose(r0["lls"], ref["lls"], atol=1e-4)


@pytest.mark.parametrize("placement", ["causal", "encoder"])
def test_shared_prompt_rows_score_like_separate_rows(loaded, task_dir, placement):
    """The scorer packs an item's choices after one prompt (masks.shared_prefix); each choice must score what it
    scores alone in its own row (collate_sequences), multi-token answers and few-shot prompts included."""
    from eval.inference import target_logprobs
    from eval.score import score_items

    model, cfg, tok, _ = loaded
    task = get_task("social_iqa")
    items = [{"id": f"q{i}", "text": t, "choices": ["Make a new plan", "Go home and see Riley", "sleep"],
              "label": i % 3} for i, t in enumerate(["Tracy did not go home that evening.", "Riley ran fast."])]
    got = score_items(model, tok, task, items, items, placement, 1, 0, 128, 48, batch_size=2).lls
    for i, item in enumerate(items):
        demos = [items[1 - i]]
        seqs = build_sequences(task, item, demos, placement, tok, 128, 48)
        batch, start, n = collate_sequences(seqs, tok.ids.bos, tok.ids.pad, placement == "encoder")
        lp = target_logprobs(model, batch)
        alone = [lp[r, start[r]:start[r] + n[r]].sum().item() for r in range(len(seqs))]
        np.testing.assert_allclose(got[i], alone, atol=1e-4, rtol=0)
        assert max(len(s.target) for s in seqs) > 1


def test_unconditional_answer_scores_over_many_answers(loaded):
    """acc_mutual_info's log p(answer | <s>), packed 32 answers a row: equal to each answer scored alone."""
    from eval.inference import target_logprobs
    from eval.score import score_items

    model, cfg, tok, _ = loaded
    words = [f"word{i} sea whale" for i in range(40)]
    items = [{"id": "a", "text": "Call me Ishmael.", "choices": words[:20], "label": 0},
             {"id": "b", "text": "The sea.", "choices": words[20:], "label": 3}]
    sc = score_items(model, tok, get_task("social_iqa"), items, [], "causal", 0, 0, 128, 128, batch_size=1)
    for it, unc in zip(items, sc.unconditional):
        for word, got in zip(it["choices"], unc):
            ids = [tok.ids.bos] + tok.encode(word)
            t = torch.tensor([ids])
            lp = target_logprobs(model, {"tokens": t[:, :-1], "labels": t[:, 1:],
                                         "position_ids": torch.arange(len(ids) - 1)[None],
                                         "document_ids": torch.zeros(1, len(ids) - 1, dtype=torch.int32)})
            assert got == pytest.approx(lp.sum().item(), abs=1e-4)
