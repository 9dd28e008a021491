"""Eager vs compiled (`parallel.compile`: torch.compile per block and connector, pretrain/compile.py) training
steps on CPU, side by side in one run, with the compile time reported apart.

    python -m bench.compile_cpu [--steps 8] [--micro-batch 4]

Shapes: `tiny-cpu` MetaLM (4 layers, d=256, T=512, spans through the 2-layer encoder) and a larger CPU shape (8
layers, d=512, 8 heads, T=1024, the same encoder). Each step is forward + backward + AdamW on the same batch from the
same initial weights; tokens/s counts decoder tokens; "compile" is the wall time of the first compiled step minus
an eager step (tracing + inductor's C++ code generation). Whatever the ratio, it is reported.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def steps(model, batch, n: int) -> tuple[float, float]:
    """(first step's seconds, mean seconds of the next n)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def one():
        model(batch).backward()
        opt.step()
        opt.zero_grad()

    t0 = time.perf_counter()
    one()
    first = time.perf_counter() - t0
    one()
    t0 = time.perf_counter()
    for _ in range(n):
        one()
    return first, (time.perf_counter() - t0) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    args = p.parse_args()
    import dataclasses

    from data_tools.objective import SampleConfig, build_sample, collate
    from pretrain.compile import compile_model
    from pretrain.config import StackConfig, preset
    from pretrain.model.metalm import MetaLM
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    tiny = preset("tiny-cpu")
    shapes = [("tiny-cpu MetaLM (4 x 256, T=512)", tiny, 512),
              ("MetaLM 8 x 512, T=1024", dataclasses.replace(tiny, decoder=StackConfig(8, 512, 8),
                                                             max_seq_length=1024), 1024)]
    rng = np.random.default_rng(0)
    rows = []
    for name, cfg, T in shapes:
        cfg = dataclasses.replace(cfg, attention_backend="sdpa")
        sc = SampleConfig(seq_length=T, mode="sclm")
        batch = collate([build_sample(rng.integers(7, cfg.vocab_size, T + 1), np.zeros(T + 1, np.int32), i, sc)
                         for i in range(args.micro_batch)])
        out = {}
        for compiled in (False, True):
            torch.manual_seed(0)
            model = MetaLM(cfg).train()
            if compiled:
                compile_model(model)
            out[compiled] = steps(model, batch, args.steps)
        rows.append((name, args.micro_batch * T, out))
    print(f"\nfwd+bwd+AdamW, B={args.micro_batch}, {torch.get_num_threads()} threads, {args.steps} timed steps after "
          "two untimed")
    print(f"{'model':36s} {'eager tok/s':>12s} {'compiled tok/s':>15s} {'ratio':>7s} {'compile (s)':>12s}")
    for name, tokens, out in rows:
        (f_e, e), (f_c, c) = out[False], out[True]
        print(f"{name:36s} {tokens / e:12,.0f} {tokens / c:15,.0f} {e / c:6.2f}x {f_c - f_e:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
