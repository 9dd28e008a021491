"""Training-step overhead of DeepSpeed on CPU: `tiny-cpu` MetaLM, same model, batch and optimizer, in one run.

    python -m bench.train_step_cpu [--steps 10] [--micro-batch 4] [--seq-length 512]

Rows: a plain PyTorch loop (forward, backward, clip_grad_norm_, AdamW step) and our DeepSpeed engine at ZeRO-0 and
ZeRO-2 (one process: the engine's own overhead, no communication). Target: the engine within 15 % of the plain
loop. tokens/s counts decoder tokens.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=512)
    args = p.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from pretrain.config import load_config
    from pretrain.engine import build_engine
    from pretrain.model.metalm import MetaLM
    from data_tools.objective import SampleConfig, build_sample, collate
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    T, B = args.seq_length, args.micro_batch
    rng = np.random.default_rng(0)
    batch = collate([build_sample(rng.integers(7, 8000, T + 1), np.zeros(T + 1, np.int32), i,
                                  SampleConfig(seq_length=T)) for i in range(B)])
    rows = []
    for name in ("plain PyTorch loop", "DeepSpeed ZeRO-0", "DeepSpeed ZeRO-2"):
        torch.manual_seed(0)
        cfg = load_config(None, [f"parallel.micro_batch={B}", "schedule.warmup_steps=0", "schedule.decay=constant"])
        model = MetaLM(cfg.model)
        if name.startswith("plain"):
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)

            def step():
                loss = model(batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            cfg.parallel.deepspeed = "zero0" if "0" in name else "zero2"
            engine = build_engine(cfg, model, dp_size=1)

            def step():
                loss = engine(batch)
                engine.backward(loss)
                engine.step()
        for _ in range(2):
            step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        rows.append((name, B * T * args.steps / (time.perf_counter() - t0)))
    base = rows[0][1]
    print(f"\ntiny-cpu MetaLM, B={B}, T={T}, {torch.get_num_threads()} threads, {args.steps} steps")
    print(f"{'training step':24s} {'tokens/s':>10s} {'vs plain':>9s}")
    for name, tps in rows:
        print(f"{name:24s} {tps:10,.0f} {tps / base:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
