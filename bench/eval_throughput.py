"""Evaluation speed, side by side in one run on the same model:
1. scoring: items/s of our scorer (`eval.score`, causal placement) vs lm-evaluation-harness (`hf` backend on the
   Hugging Face export) on the same local task items, 0-shot, end to end and its model call alone (the baseline
   of the ratio); the per-choice log-likelihoods are checked equal;
2. generation: new tokens/s with and without the KV cache (and transformers' `generate` on the export), greedy,
   `--new-tokens` (256) after a short prompt;
3. generation-based scoring: items/s of our generative scorer (`eval.score` on a `generate_until` task: greedy,
   batched with the KV cache) vs lm-evaluation-harness' `generate_until` (`hf` backend on the export, the task
   exported from our task file by `eval.lm_eval_bridge.export_task`) on the same items, prompts and stop strings;
   the predictions are checked equal. The task: the same items answered by generation (target the answer word,
   stop at a new line, `--gen-toks` new tokens at most), written as a task file.

    python -m bench.eval_throughput [--model exported/metalm] [--task polarity] [--items 100] [--new-tokens 256]

Without --model a `tiny-cpu` MetaLM with random weights is built (speed does not depend on the weights) with the
benchmark tokenizer (bench/common.py). Timings exclude model loading for every row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch


def build_model_dir(work: str) -> str:
    from bench.common import corpora_and_tokenizer
    from pretrain.config import TrainConfig
    from pretrain.model_io import write_consolidated
    from pretrain.model.metalm import MetaLM
    from pretrain.parallel import init_distributed, init_model_parallel

    _, spm = corpora_and_tokenizer(work)
    out = os.path.join(work, "eval-bench-model")
    if os.path.isfile(os.path.join(out, "metalm.json")):
        return out
    init_distributed("gloo")
    init_model_parallel(1, 1)
    cfg = TrainConfig()
    cfg.data.tokenizer_model = spm
    torch.manual_seed(0)
    sd = {k: v for k, v in MetaLM(cfg.model).state_dict().items() if isinstance(v, torch.Tensor)}
    return write_consolidated(out, cfg, sd, spm, {"step": 0})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="consolidated directory (default: a random tiny-cpu MetaLM)")
    p.add_argument("--work", default="work/bench")
    p.add_argument("--task", default="polarity")
    p.add_argument("--split", default="train")
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gen-batch", type=int, default=1)
    p.add_argument("--gen-toks", type=int, default=8, help="generation-based scoring: new tokens per item")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    from data_tools.task_samples import causal_context
    from data_tools.tasks import fetch, get_task, load_split
    from eval.generate import GenerationConfig, generate_batch
    from eval.inference import load_model
    from eval.lm_eval_bridge import make_task
    from eval.score import score_items
    from pretrain.convert import export_hf

    model_dir = args.model or build_model_dir(args.work)
    model, cfg, tok, _ = load_model(model_dir)
    task = get_task(args.task)
    fetch(args.task, os.path.join(args.work, "tasks"), log=lambda *a: None)
    items = load_split(os.path.join(args.work, "tasks"), args.task, args.split)[:args.items]
    n_req = sum(len(task.choices(it)) for it in items)
    L = cfg.model.max_seq_length
    rows = []
    # ---- scoring: ours
    score_items(model, tok, task, items[:4], [], "causal", 0, 0, L, L, args.batch_size)  # warm-up
    t0 = time.perf_counter()
    ours = score_items(model, tok, task, items, [], "causal", 0, 0, L, L, args.batch_size)
    t_ours = time.perf_counter() - t0
    rows.append(("scoring", "ours (eval.score, causal)", len(items) / t_ours, "items/s"))
    # ---- scoring: lm-evaluation-harness on the HF export
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(model_dir, os.path.join(tmp, "hf"))
        data = os.path.join(tmp, "items.jsonl")
        with open(data, "w") as f:
            for it in items:
                f.write(json.dumps({"context": causal_context(task, it, []), "choices": task.choices(it),
                                    "label": it["label"]}) + "\n")
        make_task("bench_task", data, os.path.join(tmp, "tasks"))
        lm = HFLM(pretrained=hf_dir, dtype="float32", batch_size=args.batch_size, device="cpu")
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=["bench_task"], log_samples=True,
                                      task_manager=TaskManager(include_path=os.path.join(tmp, "tasks")))
        t_lm = time.perf_counter() - t0
        samples = sorted(res["samples"]["bench_task"], key=lambda s: s["doc_id"])
        diff = max(abs(a - r[0][0]) for s, ll in zip(samples, ours.lls) for a, r in zip(ll, s["resps"]))
        rows.append(("scoring", "lm-evaluation-harness (hf), simple_evaluate end to end", len(items) / t_lm,
                     "items/s"))
        # lm-eval's model call alone (its batching, length sorting, and one forward per context when every
        # continuation is a single token), without task and dataset set-up
        from lm_eval.api.instance import Instance

        reqs = [Instance("loglikelihood", doc={}, arguments=(causal_context(task, it, []), " " + c), idx=j)
                for it in items for j, c in enumerate(task.choices(it))]
        t0 = time.perf_counter()
        lm.loglikelihood(reqs)
        t_core = time.perf_counter() - t0
        rows.append(("scoring", "lm-evaluation-harness (hf), loglikelihood() only", len(items) / t_core, "items/s"))
        # ---- generation-based scoring: ours vs lm-eval generate_until, the same task file
        from eval.lm_eval_bridge import export_task
        from eval.score import generate_items

        gdir = os.path.join(tmp, "gen")
        os.makedirs(gdir)
        with open(os.path.join(gdir, "items.jsonl"), "w") as f:
            for it in items:
                f.write(json.dumps({"id": it["id"], "text": it["text"], "answer": task.answer(it)}) + "\n")
        with open(os.path.join(gdir, "gen.yaml"), "w") as f:
            f.write(f"task: bench_gen\ndataset: {{data_files: {{train: items.jsonl, test: items.jsonl}}}}\n"
                    f"output_type: generate_until\ndoc_to_text: '{{{{text}}}} {task.cue}'\ndoc_to_target: answer\n"
                    f"generation_kwargs: {{until: ['\\n'], max_gen_toks: {args.gen_toks}}}\n")
        gtask = get_task(os.path.join(gdir, "gen.yaml"))
        gitems = load_split("", gtask, "test")
        generate_items(model, tok, gtask, gitems[:4], [], "causal", 0, 0, L, batch_size=args.batch_size)  # warm-up
        t0 = time.perf_counter()
        g_ours = generate_items(model, tok, gtask, gitems, [], "causal", 0, 0, L, batch_size=args.batch_size)
        t_gen = time.perf_counter() - t0
        names = export_task(os.path.join(gdir, "gen.yaml"), "", os.path.join(tmp, "gen_tasks"))
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=names, log_samples=True,
                                      task_manager=TaskManager(include_path=os.path.join(tmp, "gen_tasks")))
        t_lm_gen = time.perf_counter() - t0
        g_theirs = [s["filtered_resps"][0] for s in sorted(res["samples"][names[0]], key=lambda s: s["doc_id"])]
        gen_same = g_theirs == g_ours.predictions
        # lm-eval's model call alone: generate_until() on the same prompts (its batching and stop criteria)
        from data_tools.task_samples import causal_context as ctx_of

        greqs = [Instance("generate_until", doc={}, idx=0, arguments=(
            ctx_of(gtask, it, []), {"until": ["\n"], "max_gen_toks": args.gen_toks, "do_sample": False}))
            for it in gitems]
        t0 = time.perf_counter()
        lm.generate_until(greqs)
        t_lm_core = time.perf_counter() - t0
        rows.append(("generative scoring", f"ours (eval.score generate_until, greedy, batch {args.batch_size})",
                     len(gitems) / t_gen, "items/s"))
        rows.append(("generative scoring", "lm-evaluation-harness (hf) generate_until() only", len(gitems) / t_lm_core,
                     "items/s"))
        rows.append(("generative scoring", "lm-evaluation-harness (hf) generate_until, simple_evaluate",
                     len(gitems) / t_lm_gen, "items/s"))
        # ---- generation
        text = "Call me Ishmael. Some years ago, never mind how long precisely, having little money"
        prompts = [tok.encode(text)] * args.gen_batch
        gen = {}
        for cache in (True, False):
            g = GenerationConfig(args.new_tokens, use_cache=cache)
            generate_batch(model, tok, prompts, GenerationConfig(4, use_cache=cache), L, stop_ids=())
            t0 = time.perf_counter()
            out = generate_batch(model, tok, prompts, g, L, stop_ids=())
            dt = time.perf_counter() - t0
            gen[cache] = out
            rows.append(("generation", f"ours, {'KV cache' if cache else 'no cache (recompute)'}",
                         sum(len(o.ids) for o in out) / dt, "new tokens/s"))
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
        ids = torch.tensor([[tok.ids.bos] + p for p in prompts])
        t0 = time.perf_counter()
        with torch.no_grad():
            hf_out = hf.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=tok.ids.pad)
        dt = time.perf_counter() - t0
        rows.append(("generation", "transformers generate (KV cache)", hf_out[:, ids.shape[1]:].numel() / dt,
                     "new tokens/s"))
    same = all(a.ids == b.ids for a, b in zip(gen[True], gen[False]))
    hf_same = gen[True][0].ids == hf_out[0, ids.shape[1]:].tolist()
    print(f"model {model_dir} ({cfg.model.param_count()['total'] / 1e6:.1f}M parameters), task {args.task} "
          f"{args.split}: {len(items)} items / {n_req} requests; generation: batch {args.gen_batch}, "
          f"{args.new_tokens} new tokens; {torch.get_num_threads()} threads\n")
    print(f"| what | row | speed | unit | vs baseline |\n|---|---|---|---|---|")
    base = {"scoring": rows[2][2], "generative scoring": rows[4][2], "generation": rows[7][2]}
    for what, name, speed, unit in rows:
        print(f"| {what} | {name} | {speed:,.1f} | {unit} | {speed / base[what]:.2f}x |")
    print(f"\nmax |ours - lm-eval| per-choice log-likelihood: {diff:.2e}; cached == uncached tokens: {same}; "
          f"== transformers: {hf_same}; generative predictions == lm-eval's: {gen_same} ({len(gitems)} items, "
          f"{args.gen_toks} new tokens at most)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
