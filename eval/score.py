"""Zero/few-shot scoring of labelled tasks by the log-likelihood of each verbalised answer.

    python -m eval.score --model exported/metalm --data work/tasks --tasks spam,polarity --shots 0,1,4 \
        --placement causal,encoder --seeds 3 --out results/

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
  (`max_seq_length`) are truncated from the left; the report counts truncated sequences and tokens.
- `--model` is a consolidated directory or a run / checkpoint directory of pretrain.train.
Writes OUT/NAME.json (one record per task x placement x shots x seed: model, step, n, metrics, truncations, chance
and majority-class rates) and OUT/NAME.md; `--log-samples` also OUT/NAME.samples.jsonl (one line per item and
setting: choices, log-likelihoods, each metric's prediction); `python -m eval.report OUT/*.json` compares models.
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

from data_tools.task_samples import PLACEMENTS, build_sequences, collate_shared, sample_demos
from data_tools.task_samples import Sequence as TaskSequence  # (typing's Sequence is used for hints here)
from data_tools.tasks import Task, get_task, load_split


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

    if placement == "encoder" and getattr(model, "encoder", None) is None:
        raise ValueError("placement 'encoder' needs a model with a text encoder (this one is a GPT baseline: use "
                         "--placement causal)")
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


def limits(cfg, max_encoder_length: int | None = None) -> tuple[int, int]:
    dec = cfg.model.max_seq_length
    return dec, min(max_encoder_length or dec, dec)


def evaluate(model, cfg, tok, data_dir: str, tasks: Sequence[str], shots: Sequence[int], placements: Sequence[str],
             seeds: int, split: str = "test", limit: int | None = None, batch_size: int = 16,
             max_encoder_length: int | None = None, log=print, meta: dict | None = None,
             samples: list | None = None) -> list[dict]:
    """One record per task x placement x shots x seed. `samples`: a list that receives one record per item of each
    setting (lm-evaluation-harness' `--log_samples`): its choices, their log-likelihoods, what each metric chose."""
    from tqdm import tqdm

    dec_limit, enc_limit = limits(cfg, max_encoder_length)
    records = []
    for name in tasks:
        task = get_task(name, scored=True)
        items = load_split(data_dir, name, split)[:limit]
        pool = load_split(data_dir, name, "train") if max(shots) > 0 else []
        for placement in placements:
            for k in shots:
                for seed in (range(seeds) if k > 0 else [0]):
                    t0 = time.perf_counter()
                    n_seq = sum(len(task.choices(it)) for it in items)
                    with tqdm(total=n_seq, desc=f"{name} {placement} {k}-shot seed {seed}", leave=False,
                              disable=not sys.stderr.isatty()) as bar:
                        sc = score_items(model, tok, task, items, pool, placement, k, seed, dec_limit, enc_limit,
                                         batch_size, progress=bar)
                    m = sc.metrics()
                    rec = {**(meta or {}), "task": name, "split": split, "placement": placement, "shots": k,
                           "seed": seed, "n": len(items),
                           "metrics": {x: m[x] for x in ("acc", "acc_norm", "acc_mutual_info")},
                           "chance": m["chance"], "majority": m["majority"],
                           "truncated_sequences": sc.truncated_sequences, "truncated_tokens": sc.truncated_tokens,
                           "seconds": round(time.perf_counter() - t0, 2)}
                    records.append(rec)
                    if samples is not None:
                        samples.extend(item_records(sc, task, items, {"task": name, "split": split,
                                                                      "placement": placement, "shots": k,
                                                                      "seed": seed}))
                    log(f"{name:22s} {placement:8s} {k}-shot seed {seed}: acc {m['acc']:.3f} acc_norm "
                        f"{m['acc_norm']:.3f} acc_mi {m['acc_mutual_info']:.3f} (n={len(items)}, chance "
                        f"{m['chance']:.2f}, majority {m['majority']:.2f}, truncated {sc.truncated_sequences}) "
                        f"{rec['seconds']:.1f}s")
    return records


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


def markdown(records: list[dict]) -> str:
    lines = ["| model | step | task | placement | shots | seed | n | acc | acc_norm | acc_mutual_info | majority "
             "| truncated |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r.get('model', '')} | {r.get('step', '')} | {r['task']} | {r['placement']} | {r['shots']} "
                     f"| {r['seed']} | {r['n']} | {r['metrics']['acc']:.3f} | {r['metrics']['acc_norm']:.3f} "
                     f"| {r['metrics'].get('acc_mutual_info', float('nan')):.3f} "
                     f"| {r['majority']:.3f} | {r['truncated_sequences']} |")
    return "\n".join(lines) + "\n"


def write_report(records: list[dict], out_dir: str, name: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = (os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md"))
    for path, text in zip(paths, (json.dumps({"records": records}, indent=1), markdown(records))):
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
    p.add_argument("--tasks", required=True, help="comma-separated task names (python -m data_tools.tasks list)")
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
            get_task(t, scored=True)
        model, cfg, tok, info = load_model(args.model)
        name = args.name or model_name(args.model)
        meta = {"model": name, "model_path": os.path.abspath(args.model), "step": info.get("step"),
                "encoder": cfg.model.encoder is not None}
        samples = [] if args.log_samples else None
        records = evaluate(model, cfg, tok, args.data, tasks, args.shots, placements, args.seeds, args.split,
                           args.limit, args.batch_size, args.max_encoder_length, meta=meta, samples=samples)
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
