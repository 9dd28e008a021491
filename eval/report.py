"""Put evaluation results side by side: mean ± spread over seeds, per model / placement / task / shots, and a plot.

    python -m eval.report results/*.json [--metric acc] [--out results/summary]

Reads the JSON written by `python -m eval.score --out` (and by in-loop evaluation's `downstream.json`), groups the
records by (task, model, placement, shots), and prints a Markdown table: mean over seeds ± the sample standard
deviation (0 for a single seed, e.g. 0-shot), the number of seeds, items, majority-class rate and truncations.
With --out it writes OUT.md and OUT.png (accuracy against shots, one panel per task, one line per model/placement,
error bars = the spread, a dotted line at the majority-class rate).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Sequence

import numpy as np


def load_records(paths: Sequence[str]) -> list[dict]:
    records = []
    for path in paths:
        try:
            data = json.load(open(path))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a results JSON ({e})") from None
        recs = data.get("records") if isinstance(data, dict) else None
        if not isinstance(recs, list):
            raise ValueError(f"{path}: no 'records' list (expected the output of eval.score --out)")
        if any("placement" not in r for r in recs):
            raise ValueError(f"{path}: not an eval.score report (records without a placement; eval.vl reports "
                             "are read by eval.vl)")
        records.extend(recs)
    return records


METRICS = ("acc", "acc_norm", "acc_mutual_info", "exact_match", "squad_em", "f1", "rougeL", "bleu", "chrf")


def summarise(records: list[dict], metric: str = "acc") -> list[dict]:
    """One row per (task, model, placement, shots): `mean`/`std` of `metric` (what the plot draws), and
    `all` = {metric: (mean, sd)} for every metric the records carry."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:  # one row per template where a task was scored with several (the template in the task name)
        task = f"{r['task']} [{r['template']}]" if len({x.get('template') for x in records if x['task'] == r['task']}) \
            > 1 else r["task"]
        groups[(task, r.get("model", "?"), r["placement"], int(r["shots"]))].append(r)
    rows = []
    for (task, model, placement, shots), rs in sorted(groups.items()):
        m = metric if metric in rs[0]["metrics"] else next(iter(rs[0]["metrics"]))  # generative: its first metric
        vals = np.array([r["metrics"][m] for r in rs], dtype=float)
        every = {}
        for m in METRICS:
            if all(m in r["metrics"] for r in rs):
                v = np.array([r["metrics"][m] for r in rs], dtype=float)
                every[m] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
        rows.append({"all": every, "task": task, "model": model, "placement": placement, "shots": shots, "metric": m,
                     "mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                     "seeds": len(vals), "n": rs[0]["n"], "majority": rs[0].get("majority", float("nan")),
                     "chance": rs[0].get("chance", float("nan")),
                     "truncated": sum(r.get("truncated_sequences", 0) for r in rs)})
    return rows


def markdown(rows: list[dict]) -> str:
    """Mean ± sd over seeds per metric; `binomial se` = sqrt(p(1-p)/n) of acc, the sampling error of the items."""
    shown = [m for m in METRICS if any(m in r["all"] for r in rows)]
    out = [f"| task | model | placement | shots | {' | '.join(shown)} | seeds | n | binomial se | majority | "
           "truncated |", "|---" * (len(shown) + 9) + "|"]
    for r in rows:
        cells = [f"{r['all'][m][0]:.3f} ± {r['all'][m][1]:.3f}" if m in r["all"] else "" for m in shown]
        acc = r["all"].get("acc", r["all"].get("exact_match", (r["mean"], 0)))[0]
        se = (acc * (1 - acc) / max(r["n"], 1)) ** 0.5 if acc <= 1 else float("nan")
        out.append(f"| {r['task']} | {r['model']} | {r['placement']} | {r['shots']} | {' | '.join(cells)} "
                   f"| {r['seeds']} | {r['n']} | {se:.3f} | {r['majority']:.3f} | {r['truncated']} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        lines = defaultdict(list)
        for r in rows:
            if r["task"] == task:
                lines[(r["model"], r["placement"])].append(r)
        for (model, placement), rs in sorted(lines.items()):
            rs.sort(key=lambda r: r["shots"])
            ax.errorbar([r["shots"] for r in rs], [r["mean"] for r in rs], yerr=[r["std"] for r in rs],
                        marker="o", capsize=3, label=f"{model} ({placement})")
        maj = next(r["majority"] for r in rows if r["task"] == task)
        if maj == maj:  # generative tasks have no majority class
            ax.axhline(maj, ls=":", color="grey", label="majority class")
        ax.set_title(task)
        ax.set_xlabel("shots")
        ax.set_ylabel(next(r["metric"] for r in rows if r["task"] == task))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON files written by eval.score --out")
    p.add_argument("--metric", default="acc", choices=("acc", "acc_norm", "acc_mutual_info"))
    p.add_argument("--out", help="write OUT.md and OUT.png")
    args = p.parse_args(argv)
    try:
        rows = summarise(load_records(args.results), args.metric)
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print("error: no records in the given files", file=sys.stderr)
        return 2
    table = markdown(rows)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".md", "w") as f:
            f.write(table)
        plot(rows, args.out + ".png")
        print(f"wrote {args.out}.md and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
