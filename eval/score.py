"""Zero/few-shot scoring of tasks: multiple choice by the log-likelihood of each verbalised answer, generative
tasks by generating the answer (greedy or beam search) and comparing it with the target.

    python -m eval.score --model exported/metalm --data work/tasks --tasks spam,polarity --shots 0,1,4 \
        --placement causal,encoder --seeds 3 --templates all --out results/
    python -m eval.score --model exported/metalm --tasks my_task.yaml,bbh:word_sorting --num-beams 4 --out results/

- Classification and multiple choice alike: every answer choice is scored by the summed log-probability of its
  tokens after the prompt; `acc` = the argmax is the label, `acc_norm` = the argmax of the log-likelihood divided
  by the answer's length in characters, `acc_mutual_info` = the argmax of log p(answer | prompt) - log p(answer)
  (the answer's unconditional log-likelihood after `<s>`: removes the model's prior for an answer word)
  (lm-evaluation-harness' definitions).
- Placements (data_tools/task_samples.py): `causal` (everything in the decoder, exactly like a GPT; the only
  placement for the GPT baseline) and `encoder` (MetaLM: each task input, demonstrations' included, through the
  text encoder as its own span, docked into its decoder slots; answers are decoder tokens; `</s>` between examples).
- Demonstrations: `k` items of the train split per query, drawn with numpy's generator seeded by (seed, item
  index); seeds 0..S-1. A 0-shot setting has no randomness and is scored once.
- The choices of an item share one forward pass: its prompt once, then each choice's tokens, each seeing the
  prompt and itself only (exactly what separate rows give, without recomputing the prompt k times).
- Inputs longer than the encoder limit (`--max-encoder-length`, default the model's max_seq_length) or the decoder's
  (`max_seq_length`) are truncated from the left; the report counts truncated sequences and tokens. The one
  difference from lm-evaluation-harness: we keep `<s>` and cut the tokens after it (the model always saw `<s>`
  first), lm-eval keeps the last `max_length + 1` tokens, so an over-long input loses one more context token with
  us and starts without `<s>` with lm-eval (up to ~0.03 nats apart on a long email; tests/test_tasks.py checks the
  rule; inputs that fit score identically).
- Tasks: names (`python -m data_tools.tasks list`), task file paths, or NAME.yaml in `--tasks-dir`
  (data_tools/task_files.py). `--templates all` scores every template of a task; the report then gives each
  template's rows, their average and the best template (the paper's reading).
- Generative tasks (`output_type: generate_until`, BBH's free-target tasks): the prompt is the scorer's context
  (demonstrations, input, cue), generation stops at an end token, a stop string (`until`, default a blank line) or
  `max_gen_toks`; greedy decoding is batched with the KV cache, beam search (`--num-beams 4`, length penalty 0.6, as
  the paper) batches an item's beams. The prediction is the continuation with surrounding whitespace removed;
  metrics from their libraries (eval/gen_metrics.py: exact_match, squad_em, f1, rougeL, bleu, chrf). The encoder
  placement generates zero-shot (the input as the encoder's passage, the cue as the prompt; its few-shot settings
  are skipped with a line).
- `--model` is a consolidated directory or a run / checkpoint directory of pretrain.train.
Writes OUT/NAME.json (one record per task x template x placement x shots x seed: model, step, n, metrics,
truncations, chance and majority-class rates; `templates`: the average and best over templates) and OUT/NAME.md;
`--log-samples` also OUT/NAME.samples.jsonl (one line per item and setting: choices, log-likelihoods and each
metric's prediction, or the generation, prediction, target and per-item scores); `python -m eval.report OUT/*.json`
compares models.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from data_tools.task_samples import PLACEMENTS, build_sequences, collate_shared, generation_prompt, sample_demos
from data_tools.task_samples import Sequence as TaskSequence  # (typing's Sequence is used for hints here)
from data_tools.tasks import Task, get_task, load_split


def check_placement(model, placement: str) -> None:
    if placement == "encoder" and getattr(model, "encoder", None) is None:
        raise ValueError("placement 'encoder' needs a model with a text encoder (this one is a GPT baseline: use "
                         "--placement causal)")


@dataclass
class TaskScores:
    lls: list[list[float]]  # per item, per choice
    unconditional: list[list[float]]  # log p(" " + choice | <s>) per item, per choice (for acc_mutual_info)
    labels: list[int]
    choice_chars: list[list[int]]
    truncated_sequences: int
    truncated_tokens: int

    def predictions(self) -> list[dict[str, int]]:
        """Per item, the choice each metric picks: the argmax of the log-likelihood (acc), of it per character
        (acc_norm), of it minus the unconditional one (acc_mutual_info)."""
        return [{"acc": int(np.argmax(l)), "acc_norm": int(np.argmax(np.array(l) / np.array(c, dtype=float))),
                 "acc_mutual_info": int(np.argmax(np.array(l) - np.array(u)))}
                for l, u, c in zip(self.lls, self.unconditional, self.choice_chars)]

    def metrics(self) -> dict:
        picks = self.predictions()
        acc, acc_norm, mi = ([int(p[m] == y) for p, y in zip(picks, self.labels)]
                             for m in ("acc", "acc_norm", "acc_mutual_info"))
        n = len(self.labels)
        counts = np.bincount(self.labels) if n else np.zeros(1)
        return {"acc": float(np.mean(acc)) if n else float("nan"),
                "acc_norm": float(np.mean(acc_norm)) if n else float("nan"),
                "acc_mutual_info": float(np.mean(mi)) if n else float("nan"),
                "chance": float(np.mean([1.0 / len(l) for l in self.lls])) if n else float("nan"),
                "majority": float(counts.max() / n) if n else float("nan")}


def score_items(model, tok, task: Task, items: list[dict], pool: list[dict], placement: str, shots: int, seed: int,
                dec_limit: int, enc_limit: int, batch_size: int = 16, progress=None) -> TaskScores:
    """Log-likelihood of every choice of every item. Collective under TP (every rank passes the same items)."""
    from eval.inference import pair_logprobs

    check_placement(model, placement)
    from eval.inference import model_aligner

    aligner = model_aligner(model, tok) if placement == "encoder" else None
    seqs = []
    for i, item in enumerate(items):
        demos = sample_demos(pool, shots, np.random.default_rng([seed, i]), exclude_id=item.get("id"))
        for s in build_sequences(task, item, demos, placement, tok, dec_limit, enc_limit):
            s.meta["item"] = i
            seqs.append(s)
    # the choices of one item share their prompt: one row per item (collate_shared); choices whose prompts differ
    # (left truncation cut them differently) get rows of their own
    groups: list[list] = []
    for s in seqs:
        g = groups[-1] if groups else None
        if g is not None and g[0].meta["item"] == s.meta["item"] and g[0].pieces == s.pieces:
            g.append(s)
        else:
            groups.append([s])
    lls = [[0.0] * len(task.choices(it)) for it in items]
    order = sorted(range(len(groups)), key=lambda j: -sum(g.length() for g in groups[j]))  # similar lengths batch
    for start in range(0, len(order), batch_size):
        chunk = [groups[j] for j in order[start:start + batch_size]]
        batch, (rows, pos, labels, owner) = collate_shared(chunk, tok.ids.bos, tok.ids.pad, placement == "encoder",
                                                           aligner)
        lp = pair_logprobs(model, batch, rows, pos, labels).double().cpu().numpy()
        flat = [s for g in chunk for s in g]
        totals = np.bincount(owner, weights=lp, minlength=len(flat))
        for s, total in zip(flat, totals):
            lls[s.meta["item"]][s.meta["choice"]] = float(total)
        if progress is not None:
            progress.update(len(flat))
    # unconditional answer log-likelihoods (lm-eval's acc_mutual_info: log p(choice | ctx) - log p(choice)): every
    # distinct answer after <s>, up to 32 answers sharing a row. encode(answer): the tokens an answer gets after a
    # word boundary (SentencePiece would make the leading space of " answer" a piece of its own; lm-eval's HF
    # tokenizer does not)
    answers = sorted({c for it in items for c in task.choices(it)})
    groups = [[TaskSequence([], tok.encode(a), meta={"answer": a}) for a in answers[i:i + 32]]
              for i in range(0, len(answers), 32)]
    prior = {}
    for start in range(0, len(groups), batch_size):
        chunk = groups[start:start + batch_size]
        batch, (rows, pos, labels, owner) = collate_shared(chunk, tok.ids.bos, tok.ids.pad, False)
        lp = pair_logprobs(model, batch, rows, pos, labels).double().cpu().numpy()
        flat = [s for g in chunk for s in g]
        prior.update(zip((s.meta["answer"] for s in flat), np.bincount(owner, weights=lp, minlength=len(flat))))
    return TaskScores(lls=lls, unconditional=[[float(prior[c]) for c in task.choices(it)] for it in items],
                      labels=[it["label"] for it in items],
                      choice_chars=[[max(1, len(c)) for c in task.choices(it)] for it in items],
                      truncated_sequences=sum(1 for s in seqs if s.truncated),
                      truncated_tokens=sum(s.truncated for s in seqs))


@dataclass
class GenScores:
    """A generative setting: per item the raw continuation, the prediction (it with surrounding whitespace removed)
    and the target; corpus metrics and per-item ones (eval/gen_metrics.py)."""
    raw: list[str]
    predictions: list[str]
    targets: list[str]
    metrics: dict
    per_item: dict
    truncated_sequences: int
    truncated_tokens: int
    stopped_by: list[str]


GENERATION_DEFAULTS = {"until": ["\n\n"], "max_gen_toks": 32, "num_beams": 1, "length_penalty": 0.6}


def generation_settings(task: Task, override: dict | None = None) -> dict:
    """The task file's generation_kwargs over the defaults (lm-eval's `until` = the few-shot delimiter), then the
    command line's."""
    g = {**GENERATION_DEFAULTS, **task.generation, **{k: v for k, v in (override or {}).items() if v is not None}}
    if g.get("do_sample") or g.get("temperature", 0):
        raise ValueError(f"task {task.name}: generation_kwargs ask for sampling; scoring decodes greedily or by beam "
                         "search (do_sample: false, temperature: 0)")
    return g


def generate_items(model, tok, task: Task, items: list[dict], pool: list[dict], placement: str, shots: int,
                   seed: int, dec_limit: int, generation: dict | None = None, batch_size: int = 16,
                   progress=None) -> GenScores:
    """Generate every item's answer (greedy, batched with the KV cache; or beam search, the k beams of an item
    batched) and score it against its target. Collective under TP (every rank passes the same items)."""
    from eval import gen_metrics
    from eval.generate import GenerationConfig, beam_search, generate_batch

    check_placement(model, placement)
    g = generation_settings(task, generation)
    if not items:
        return GenScores([], [], [], {m: float("nan") for m in task.metrics}, {}, 0, 0, [])
    rows = []
    for i, item in enumerate(items):
        demos = sample_demos(pool, shots, np.random.default_rng([seed, i]), exclude_id=item.get("id"))
        rows.append(generation_prompt(task, item, demos, placement, tok))
    raw, why, cut = [""] * len(items), [""] * len(items), [0] * len(items)
    if g["num_beams"] == 1:
        cfg = GenerationConfig(max_new_tokens=g["max_gen_toks"], stop=tuple(g["until"]))
        order = sorted(range(len(rows)), key=lambda j: -len(rows[j][1]) - len(rows[j][0]))  # similar lengths batch
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            outs = generate_batch(model, tok, [rows[j][1] for j in chunk], cfg, dec_limit,
                                  passages=[rows[j][0] for j in chunk])
            for j, o in zip(chunk, outs):
                raw[j], why[j], cut[j] = o.text, o.stopped_by, o.prompt_truncated
            if progress is not None:
                progress.update(len(chunk))
    else:
        for j, (passage, prompt) in enumerate(rows):
            r = beam_search(model, tok, prompt, g["num_beams"], g["max_gen_toks"], dec_limit, g["length_penalty"],
                            tuple(g["until"]), passage)
            raw[j], why[j], cut[j] = r.text, r.stopped_by, r.prompt_truncated
            if progress is not None:
                progress.update(1)
    preds = [x.strip() for x in raw]
    targets = [task.answer(it) for it in items]
    metrics, per_item = gen_metrics.compute(task.metrics, preds, targets)
    return GenScores(raw, preds, targets, metrics, per_item, sum(1 for c in cut if c), sum(cut), why)


def limits(cfg, max_encoder_length: int | None = None) -> tuple[int, int]:
    dec = cfg.model.max_seq_length
    return dec, min(max_encoder_length or dec, dec)


def template_list(task: Task, templates) -> list[str]:
    """None: the task's first template; "all": every one; else the ids (or indices) asked for that it has."""
    if not templates:
        return task.template_ids()[:1]
    if templates == "all" or templates == ["all"]:
        return task.template_ids()
    return [task.using(t).template_id for t in templates]


def evaluate(model, cfg, tok, data_dir: str, tasks: Sequence[str], shots: Sequence[int], placements: Sequence[str],
             seeds: int, split: str = "test", limit: int | None = None, batch_size: int = 16,
             max_encoder_length: int | None = None, log=print, meta: dict | None = None,
             samples: list | None = None, templates=None, generation: dict | None = None,
             tasks_dirs: Sequence[str] = ()) -> list[dict]:
    """One record per task x template x placement x shots x seed. Multiple-choice tasks are scored by
    log-likelihood, generative ones by generation (`generation`: until / max_gen_toks / num_beams /
    length_penalty over the task's generation_kwargs). `templates`: None (each task's first), "all", or ids.
    `samples`: a list that receives one record per item of each setting (lm-evaluation-harness' `--log_samples`)."""
    from tqdm import tqdm

    dec_limit, enc_limit = limits(cfg, max_encoder_length)
    records = []
    for name in tasks:
        base = get_task(name, tasks_dirs=tasks_dirs, data_dir=data_dir)
        items = load_split(data_dir, base, split)[:limit]
        pool = load_split(data_dir, base, base.fewshot_split) if max(shots) > 0 else []
        for tid in template_list(base, templates):
            task = base.using(tid)
            for placement in placements:
                for k in shots:
                    if task.generative and placement == "encoder" and k > 0:
                        log(f"{task.name:22s} [{tid}] encoder  {k}-shot: skipped (generation through the encoder is "
                            "zero-shot: one passage per row)")
                        continue
                    for seed in (range(seeds) if k > 0 else [0]):
                        t0 = time.perf_counter()
                        n_seq = len(items) if task.generative else sum(len(task.choices(it)) for it in items)
                        setting = {"task": task.name, "template": task.template_id, "split": split,
                                   "placement": placement, "shots": k, "seed": seed}
                        with tqdm(total=n_seq, desc=f"{task.name} [{tid}] {placement} {k}-shot seed {seed}",
                                  leave=False, disable=not sys.stderr.isatty()) as bar:
                            if task.generative:
                                gs = generate_items(model, tok, task, items, pool, placement, k, seed, dec_limit,
                                                    generation, batch_size, progress=bar)
                            else:
                                sc = score_items(model, tok, task, items, pool, placement, k, seed, dec_limit,
                                                 enc_limit, batch_size, progress=bar)
                        rec = {**(meta or {}), **setting, "n": len(items),
                               "output_type": "generate_until" if task.generative else "multiple_choice"}
                        if task.generative:
                            rec.update(metrics=gs.metrics, truncated_sequences=gs.truncated_sequences,
                                       truncated_tokens=gs.truncated_tokens,
                                       generation=generation_settings(task, generation))
                            shown = " ".join(f"{m} {v:.3f}" for m, v in gs.metrics.items())
                            extra = f"truncated {gs.truncated_sequences}"
                        else:
                            m = sc.metrics()
                            rec.update(metrics={x: m[x] for x in ("acc", "acc_norm", "acc_mutual_info")},
                                       chance=m["chance"], majority=m["majority"],
                                       truncated_sequences=sc.truncated_sequences,
                                       truncated_tokens=sc.truncated_tokens)
                            shown = (f"acc {m['acc']:.3f} acc_norm {m['acc_norm']:.3f} acc_mi "
                                     f"{m['acc_mutual_info']:.3f}")
                            extra = (f"chance {m['chance']:.2f}, majority {m['majority']:.2f}, truncated "
                                     f"{sc.truncated_sequences}")
                        rec["seconds"] = round(time.perf_counter() - t0, 2)
                        records.append(rec)
                        if samples is not None:
                            samples.extend(gen_item_records(gs, items, setting) if task.generative else
                                           item_records(sc, task, items, setting))
                        log(f"{task.name:22s} [{tid}] {placement:8s} {k}-shot seed {seed}: {shown} "
                            f"(n={len(items)}, {extra}) {rec['seconds']:.1f}s")
    return records


def template_summary(records: list[dict]) -> list[dict]:
    """The paper's reading of several templates: per (model, task, placement, shots), each template's mean over
    seeds, then their average and the best template (with its id)."""
    from collections import defaultdict

    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[(r.get("model", ""), r["task"], r["placement"], r["shots"])][r.get("template", "")].append(r)
    out = []
    for (model, task, placement, shots), by_t in groups.items():
        metrics = list(next(iter(by_t.values()))[0]["metrics"])
        row = {"model": model, "task": task, "placement": placement, "shots": shots, "templates": len(by_t),
               "average": {}, "best": {}, "best_template": {}}
        for m in metrics:
            means = {t: float(np.mean([r["metrics"][m] for r in rs])) for t, rs in by_t.items()}
            best = max(means, key=lambda t: means[t])
            row["average"][m], row["best"][m], row["best_template"][m] = float(np.mean(list(means.values()))), \
                means[best], best
        out.append(row)
    return out


def gen_item_records(gs: GenScores, items: list[dict], setting: dict) -> list[dict]:
    return [{**setting, "item": i, "id": it.get("id", i), "target": t, "generation": raw, "prediction": p,
             "stopped_by": why, "scores": {m: v[i] for m, v in gs.per_item.items()}}
            for i, (it, raw, p, t, why) in enumerate(zip(items, gs.raw, gs.predictions, gs.targets, gs.stopped_by))]


def item_records(sc: TaskScores, task: Task, items: list[dict], setting: dict) -> list[dict]:
    """Per-item records of one setting (TaskScores.predictions: what TaskScores.metrics averages)."""
    return [{**setting, "item": i, "id": it.get("id", i), "label": int(y), "choices": list(task.choices(it)),
             "loglikelihoods": [float(x) for x in ll], "unconditional": [float(x) for x in un],
             "choice_chars": [int(c) for c in cc], "predictions": picks,
             "correct": {m: int(c == y) for m, c in picks.items()}}
            for i, (it, ll, un, cc, y, picks) in enumerate(zip(items, sc.lls, sc.unconditional, sc.choice_chars,
                                                                  sc.labels, sc.predictions()))]


def write_samples(samples: list[dict], out_dir: str, name: str) -> str:
    """OUT/NAME.samples.jsonl, one line per scored item (temporary name, then renamed)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.samples.jsonl")
    with open(path + ".tmp", "w") as f:
        for rec in samples:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path


def _metric_cells(metrics: dict) -> str:
    return ", ".join(f"{m} {v:.3f}" for m, v in metrics.items())


def markdown(records: list[dict]) -> str:
    lines = ["| model | step | task | template | placement | shots | seed | n | metrics | majority | truncated |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        majority = f"{r['majority']:.3f}" if "majority" in r else ""  # generative tasks have none
        lines.append(f"| {r.get('model', '')} | {r.get('step', '')} | {r['task']} | {r.get('template', '')} "
                     f"| {r['placement']} | {r['shots']} | {r['seed']} | {r['n']} | {_metric_cells(r['metrics'])} "
                     f"| {majority} | {r['truncated_sequences']} |")
    summary = [row for row in template_summary(records) if row["templates"] > 1]
    if summary:
        lines += ["", "Over templates (each template's mean over seeds): their average, and the best template",
                  "", "| model | task | placement | shots | templates | average | best (template) |",
                  "|---|---|---|---|---|---|---|"]
        for row in summary:
            best = ", ".join(f"{m} {v:.3f} ({row['best_template'][m]})" for m, v in row["best"].items())
            lines.append(f"| {row['model']} | {row['task']} | {row['placement']} | {row['shots']} "
                         f"| {row['templates']} | {_metric_cells(row['average'])} | {best} |")
    return "\n".join(lines) + "\n"


def write_report(records: list[dict], out_dir: str, name: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = (os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md"))
    body = {"records": records, "templates": template_summary(records)}
    for path, text in zip(paths, (json.dumps(body, indent=1), markdown(records))):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return paths


def model_name(path: str) -> str:
    path = os.path.abspath(path.rstrip("/"))
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base == "checkpoints" or base.startswith("step_") else base


def int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="consolidated directory, or run / checkpoint directory")
    p.add_argument("--data", default="work/tasks", help="task data directory (python -m data_tools.tasks fetch)")
    p.add_argument("--tasks", required=True, help="comma-separated task names (python -m data_tools.tasks list) or "
                   "task file paths (data_tools/task_files.py)")
    p.add_argument("--tasks-dir", action="append", default=[], help="a directory of NAME.yaml task files "
                   "(repeatable; also $METALM_TASKS)")
    p.add_argument("--templates", default="", help="template ids or indices, comma-separated, or all (default: "
                   "each task's first); several give their average and the best in the report")
    p.add_argument("--num-beams", type=int, help="generative tasks: beam search with this many beams (default: "
                   "the task's, else 1 = greedy)")
    p.add_argument("--length-penalty", type=float, help="beam search: score / length ** this (default 0.6)")
    p.add_argument("--max-gen-toks", type=int, help="generative tasks: new-token limit (default: the task's, "
                   "else 32)")
    p.add_argument("--until", action="append", help="generative tasks: a stop string (repeatable; default: the "
                   "task's, else a blank line)")
    p.add_argument("--shots", type=int_list, default=[0], help="comma-separated, e.g. 0,1,4")
    p.add_argument("--placement", default="causal", help="causal, encoder, or both comma-separated")
    p.add_argument("--seeds", type=int, default=1, help="demonstration samples per few-shot setting")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--limit", type=int, help="score only the first N items of the split")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-encoder-length", type=int, help="encoder piece limit (default: model max_seq_length)")
    p.add_argument("--name", help="model name in the report (default: from the path)")
    p.add_argument("--out", help="directory for NAME.json and NAME.md")
    p.add_argument("--log-samples", action="store_true",
                   help="also OUT/NAME.samples.jsonl: every item's choices, log-likelihoods and predictions "
                        "(lm-evaluation-harness' --log_samples)")
    args = p.parse_args(argv)
    if args.log_samples and not args.out:
        print("error: --log-samples needs --out (where NAME.samples.jsonl goes)", file=sys.stderr)
        return 2
    from data_tools.cli import UserError
    from eval.inference import ModelLoadError, load_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        placements = [x.strip() for x in args.placement.split(",") if x.strip()]
        bad = [x for x in placements if x not in PLACEMENTS]
        if bad:
            raise ValueError(f"--placement: {bad[0]!r} is not one of {', '.join(PLACEMENTS)}")
        if any(k < 0 for k in args.shots):
            raise ValueError("--shots: must be >= 0")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        for t in tasks:
            get_task(t, tasks_dirs=args.tasks_dir)
        templates = "all" if args.templates == "all" else [t for t in args.templates.split(",") if t] or None
        if args.num_beams is not None and args.num_beams < 1:
            raise ValueError("--num-beams: must be >= 1")
        generation = {"num_beams": args.num_beams, "length_penalty": args.length_penalty,
                      "max_gen_toks": args.max_gen_toks, "until": args.until}
        model, cfg, tok, info = load_model(args.model)
        name = args.name or model_name(args.model)
        meta = {"model": name, "model_path": os.path.abspath(args.model), "step": info.get("step"),
                "encoder": cfg.model.encoder is not None}
        samples = [] if args.log_samples else None
        records = evaluate(model, cfg, tok, args.data, tasks, args.shots, placements, args.seeds, args.split,
                           args.limit, args.batch_size, args.max_encoder_length, meta=meta, samples=samples,
                           templates=templates, generation=generation, tasks_dirs=args.tasks_dir)
    except (UserError, ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(records))
    if args.out:
        for path in write_report(records, args.out, name):
            print(f"wrote {path}")
        if samples is not None:
            print(f"wrote {write_samples(samples, args.out, name)} ({len(samples)} items)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
