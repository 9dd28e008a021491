"""Plot the loss curves of one or more runs (their metrics.jsonl) into one PNG.

    python -m pretrain.plot work/demo/runs/metalm work/demo/runs/gpt --out work/demo/loss.png

Left: training loss per step (light) with a moving average; right: validation loss. One colour per run, labelled
with the run directory's name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from data_tools.durable import save_figure


def read_metrics(run_dir: str) -> tuple[list, list, list, list]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a training run directory?)")
    ts, tl, vs, vl = [], [], [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not JSON") from None
            if "loss" in rec:
                ts.append(rec["step"])
                tl.append(rec["loss"])
            if "valid_loss" in rec:
                vs.append(rec["step"])
                vl.append(rec["valid_loss"])
    return ts, tl, vs, vl


def plot(run_dirs: Sequence[str], out: str, smooth: int = 10) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, run in enumerate(run_dirs):
        ts, tl, vs, vl = read_metrics(run)
        name = os.path.basename(os.path.normpath(run))
        c = f"C{i}"
        if tl:
            a.plot(ts, tl, color=c, alpha=0.25, lw=0.8)
            k = max(1, min(smooth, len(tl)))
            avg = np.convolve(tl, np.ones(k) / k, mode="valid")
            a.plot(ts[k - 1:], avg, color=c, lw=1.6, label=name)
        if vl:
            b.plot(vs, vl, "o-", color=c, label=name)
    a.set(title="training loss", xlabel="step", ylabel="loss")
    b.set(title="validation loss", xlabel="step", ylabel="loss")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, out, dpi=120)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window for the training loss")
    args = p.parse_args(argv)
    try:
        print(f"wrote {plot(args.runs, args.out, args.smooth)}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
