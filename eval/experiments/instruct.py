"""Instruction tuning with held-out clusters (FLAN's protocol, the paper's instruction-following claim), at a size
this machine runs: tune on a mixture of task clusters with one cluster held out, then score the held-out cluster
zero-shot with its own (never seen) templates; MetaLM tunes its encoder + connector with the decoder frozen, the GPT
baseline tunes all its parameters.

    python -m eval.experiments.instruct --work work/instruct        # CPU preset, 2 cores (~40 min)
    make instruct

Protocol (METHOD.md §5, scaled down):
- Models: MetaLM (`tiny-cpu`) and GPT (`gpt-baseline-tiny`) pretrained on the same corpora, tokens, steps and seed
  (`--models-from DIR` takes the `models/` of an earlier `make compare` instead).
- Clusters are the tasks' `cluster` metadata (data_tools/tasks_builtin/*.yaml; BBH's two families of the BBH paper):
  `spam_detection` (spam), `sentiment` (finefoods, polarity), `bbh:algorithmic`, `bbh:nlp` (BBH tasks where
  BIG-Bench Hard is reachable: `METALM_BBH`). For each held-out cluster (`--held-out`, default sentiment and
  bbh:nlp): finetuning on every candidate task outside it (`finetune.held_out` refuses the cluster's tasks,
  `finetune.templates=all` renders item i in template i mod n, `finetune.max_items` caps each task), validation
  accuracy on the tuning tasks picks the checkpoint (the held-out cluster is never looked at), then every task of
  the held-out cluster is scored zero-shot over all its templates (average and best template, the paper's reading),
  against the same model before tuning.
- 3 seeds per cell (finetuning order and initialisation of nothing else: the pretrained model is the same); the
  table gives mean ± sd over seeds of the template average and of the best template.
Writes WORK/results/instruct.json (every record), instruct.md (the table); stages are cached in WORK.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Sequence

from eval.experiments.sclm_vs_causal import ARMS as COMPARE_ARMS
from eval.experiments.sclm_vs_causal import finished, fmt, launch, log, mean_sd, run

ARMS = {a: COMPARE_ARMS[a] for a in ("metalm", "gpt")}
CANDIDATES = ["spam", "finefoods", "polarity", "bbh:boolean_expressions", "bbh:navigate", "bbh:web_of_lies",
              "bbh:word_sorting", "bbh:sports_understanding", "bbh:causal_judgement", "bbh:formal_fallacies",
              "bbh:hyperbaton", "bbh:snarks"]
# the held-out tasks that are scored (the cluster's multiple-choice tasks with short answers: cheap on CPU)
SCORED = {"sentiment": ["finefoods", "polarity"],
          "bbh:nlp": ["bbh:sports_understanding", "bbh:causal_judgement", "bbh:formal_fallacies"],
          "bbh:algorithmic": ["bbh:boolean_expressions", "bbh:navigate", "bbh:web_of_lies"],
          "spam_detection": ["spam"]}
PRESETS = {"cpu": dict(pretrain_steps=300, ft_steps=60, lr=1e-3, ft_micro_batch=4, ft_seq_length=256,
                       max_items=300, ft_eval_items=60, test_items=100),
           "gpu": dict(pretrain_steps=5000, ft_steps=1000, lr=3e-4, ft_micro_batch=16, ft_seq_length=512,
                       max_items=0, ft_eval_items=0, test_items=0)}


def score_all_templates(model_dir: str, task_dir: str, tasks: list[str], items: int, placement: str, name: str):
    from eval.inference import load_model
    from eval.score import evaluate

    model, cfg, tok, info = load_model(model_dir)
    return evaluate(model, cfg, tok, task_dir, tasks, [0], [placement], 1, "test", items or None,
                    log=lambda *a, **k: None, meta={"model": name, "step": info.get("step")}, templates="all")


def cluster_reading(records: list[dict], metric: str = "acc") -> tuple[float, float]:
    """(average over the cluster's tasks of the template average, of the best template)."""
    from eval.score import template_summary

    rows = template_summary(records)
    if not rows:
        return float("nan"), float("nan")
    avg = sum(r["average"][metric] for r in rows) / len(rows)
    best = sum(r["best"][metric] for r in rows) / len(rows)
    return avg, best


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.experiments.instruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work/instruct")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--held-out", default="sentiment,bbh:nlp", help="clusters held out, one experiment each")
    p.add_argument("--models-from", help="a `make compare` work directory whose models/metalm and models/gpt to use")
    p.add_argument("--steps", type=int, default=0, help="pretraining steps (default: the preset's)")
    p.add_argument("--ft-steps", type=int, default=0, help="tuning steps (default: the preset's)")
    p.add_argument("--report-only", action="store_true", help="rewrite instruct.md from WORK/results/instruct.json")
    args = p.parse_args(argv)
    if args.report_only:
        res = os.path.join(os.path.abspath(args.work), "results")
        md = markdown(json.load(open(os.path.join(res, "instruct.json"))))
        with open(os.path.join(res, "instruct.md"), "w") as f:
            f.write(md)
        print(md)
        return 0
    P = dict(PRESETS[args.preset])
    P["pretrain_steps"] = args.steps or P["pretrain_steps"]
    P["ft_steps"] = args.ft_steps or P["ft_steps"]
    work = os.path.abspath(args.work)
    held_out = [c for c in args.held_out.split(",") if c]
    unknown = [c for c in held_out if c not in SCORED]
    if unknown:
        raise SystemExit(f"error: --held-out: unknown cluster {unknown[0]!r} (known: {', '.join(SCORED)})")
    t0 = time.perf_counter()
    out = {"date": time.strftime("%Y-%m-%d"), "settings": P, "seeds": args.seeds,
           "command": "python -m eval.experiments.instruct " + " ".join(argv or sys.argv[1:])}

    from data_tools.task_rows import tuning_tasks
    from data_tools.tasks import fetch_available, get_task

    task_dir = os.path.join(work, "tasks")
    got, skipped = fetch_available(CANDIDATES, task_dir, log=lambda *a, **k: None)
    for t, why in skipped.items():
        log(f"optional task {t} skipped: {why}")
    out.update(skipped_tasks=skipped, clusters={t: get_task(t).cluster for t in got})

    # ---- the pretrained models
    models = {}
    if args.models_from:
        models = {a: os.path.join(os.path.abspath(args.models_from), "models", a) for a in ARMS}
    else:
        if not os.path.isfile(os.path.join(work, "data", "corpus_text_document.idx")):
            log("data: corpora -> tokenizer -> dataset (data_tools.demo)")
            run([sys.executable, "-m", "data_tools.demo", "--work", work, "--seq-length", "512", "--samples", "0"],
                os.path.join(work, "logs", "data.log"))
        from pretrain.model_io import read_checkpoint, resolve_tokenizer, write_consolidated

        for arm, a in ARMS.items():
            rd = os.path.join(work, "runs", arm)
            if not finished(rd, P["pretrain_steps"]):
                log(f"pretraining {arm} ({a['preset']}), {P['pretrain_steps']} steps")
                launch(args.nproc, rd, [f"model.preset={a['preset']}",
                                        f"data.tokenizer_model={os.path.join(work, 'tokenizer', 'spm.model')}",
                                        f"data.data_path=[{os.path.join(work, 'data', 'corpus_text_document')}]",
                                        f"schedule.train_steps={P['pretrain_steps']}",
                                        f"checkpoint.save_interval={P['pretrain_steps']}"],
                       os.path.join(work, "logs", f"pretrain_{arm}.log"), "tiny-cpu")
            models[arm] = os.path.join(work, "models", arm)
            if not os.path.isfile(os.path.join(models[arm], "metalm.json")):
                cfg, sd, info = read_checkpoint(os.path.join(rd, "checkpoints"))
                write_consolidated(models[arm], cfg, sd, resolve_tokenizer(cfg), info)
    for arm, d in models.items():
        if not os.path.isfile(os.path.join(d, "metalm.json")):
            raise SystemExit(f"error: {d}: no consolidated model (metalm.json)")

    # ---- per held-out cluster: before tuning, then tuned on the rest (seeds)
    out["clusters_held_out"] = {}
    for cluster in held_out:
        scored = [t for t in SCORED[cluster] if t in got]
        tune, _ = tuning_tasks(got, [cluster])
        if not scored or not tune:
            log(f"held-out {cluster}: skipped (scored tasks {scored}, tuning tasks {tune})")
            continue
        cell = {"scored": scored, "tuned_on": tune, "arms": {}}
        for arm, a in ARMS.items():
            log(f"held-out {cluster}: {arm} before tuning, zero-shot over all templates of {', '.join(scored)}")
            before = score_all_templates(models[arm], task_dir, scored, P["test_items"], a["placement"],
                                         f"{arm}-pretrained")
            seeds = []
            for seed in range(args.seeds):
                rd = os.path.join(work, "tuned", cluster.replace(":", "_"), arm, f"seed{seed}")
                if not os.path.isfile(os.path.join(rd, "checkpoints", "best.json")) or \
                        not finished(rd, P["ft_steps"]):
                    shutil.rmtree(rd, ignore_errors=True)
                    log(f"held-out {cluster}: tuning {arm} on {len(tune)} tasks ({a['mode']}), seed {seed}")
                    launch(args.nproc, rd, [f"checkpoint.init_from={models[arm]}", f"finetune.tasks=[{','.join(tune)}]",
                                            f"finetune.held_out=[{cluster}]", "finetune.templates=all",
                                            f"finetune.mode={a['mode']}", f"finetune.data_dir={task_dir}",
                                            f"finetune.max_items={P['max_items']}",
                                            f"finetune.weights=[{','.join(['1'] * len(tune))}]",
                                            f"finetune.eval_items={P['ft_eval_items']}", f"optimizer.lr={P['lr']}",
                                            f"optimizer.min_lr={P['lr'] / 10}",
                                            f"schedule.train_steps={P['ft_steps']}",
                                            f"schedule.warmup_steps={max(1, P['ft_steps'] // 10)}",
                                            f"logging.eval_interval={max(1, P['ft_steps'] // 3)}",
                                            f"parallel.micro_batch={P['ft_micro_batch']}",
                                            f"data.seq_length={P['ft_seq_length']}", f"seed={seed}"],
                           os.path.join(work, "logs", f"tune_{cluster.replace(':', '_')}_{arm}_s{seed}.log"),
                           "finetune")
                recs = score_all_templates(os.path.join(rd, "checkpoints", "best"), task_dir, scored,
                                           P["test_items"], a["placement"], f"{arm}-tuned")
                seeds.append({"seed": seed, "run": rd, "records": recs})
            cell["arms"][arm] = {"before": before, "seeds": seeds}
            avg, best = zip(*[cluster_reading(s["records"]) for s in seeds])
            b_avg, b_best = cluster_reading(before)
            log(f"held-out {cluster}: {arm} acc, template average {b_avg:.3f} -> {fmt(mean_sd(avg))}, best "
                f"template {b_best:.3f} -> {fmt(mean_sd(best))}")
        out["clusters_held_out"][cluster] = cell
    out["seconds"] = time.perf_counter() - t0
    res = os.path.join(work, "results")
    os.makedirs(res, exist_ok=True)
    with open(os.path.join(res, "instruct.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    md = markdown(out)
    with open(os.path.join(res, "instruct.md"), "w") as f:
        f.write(md)
    print("\n" + md)
    log(f"wrote {res}/instruct.json and instruct.md ({out['seconds'] / 60:.1f} min)")
    return 0


def markdown(out: dict) -> str:
    lines = [f"Instruction tuning with held-out clusters, {out['date']} (`{out['command']}`; {out['seeds']} seeds, "
             f"mean ± sd; {out['seconds'] / 60:.0f} min). Zero-shot accuracy on the held-out cluster's tasks "
             "(mean over its tasks) with its own templates: the average over templates and the best template.", "",
             "| held-out cluster (scored tasks; majority class) | model | template average: before → tuned | best "
             "template: before → tuned |", "|---|---|---|---|"]
    for cluster, cell in out["clusters_held_out"].items():
        for arm, r in cell["arms"].items():
            b_avg, b_best = cluster_reading(r["before"])
            avg, best = zip(*[cluster_reading(s["records"]) for s in r["seeds"]])
            what = "encoder + connector, decoder frozen" if ARMS[arm]["mode"] == "encoder" else "all parameters"
            maj = {x["task"]: x["majority"] for x in r["before"]}
            majority = sum(maj.values()) / len(maj)
            lines.append(f"| {cluster} ({', '.join(cell['scored'])}; {majority:.3f}) | {ARMS[arm]['label']}, tuned: "
                         f"{what} "
                         f"| {b_avg:.3f} → {fmt(mean_sd(avg))} | {b_best:.3f} → {fmt(mean_sd(best))} |")
    lines += [""] + [f"Tuned on (held out {c}): {', '.join(cell['tuned_on'])}."
                     for c, cell in out["clusters_held_out"].items()]
    lines += [f"Optional task {t} skipped: {why}." for t, why in out.get("skipped_tasks", {}).items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
