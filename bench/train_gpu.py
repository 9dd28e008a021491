"""Training throughput and MFU on one GPU: MetaLM under DeepSpeed vs a plain-PyTorch decoder of the same decoder
shape, in the same run.

    python -m bench.train_gpu                                   # metalm-lo-1.3b, seq 2048, bf16, ZeRO-1
    python -m bench.train_gpu --preset tiny-cpu --seq-length 256 --steps 2 --precision fp32   # CPU smoke run

Rows: the plain-PyTorch reference decoder (eager, and torch.compile with --compile; AdamW fused on CUDA); our GPT
baseline (the same decoder through megatron-core layers and DeepSpeed); our MetaLM (decoder + span encoder +
docking, semi-causal batches). MFU counts PaLM's 6·N + 12·L·d·T FLOPs per decoder token (the encoder's span
tokens added for MetaLM, `ModelConfig.flops_per_token`) against --peak-tflops (H100 SXM dense bf16: 989).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def batch_for(cfg, mode: str, B: int, T: int, device):
    from data_tools.objective import SampleConfig, SpanConfig, build_sample, collate

    rng = np.random.default_rng(0)
    sc = SampleConfig(seq_length=T, mode=mode, spans=SpanConfig(span_length=min(128, T // 4)))
    docs = np.zeros(T + 1, np.int32)
    b = collate([build_sample(rng.integers(7, cfg.vocab_size, T + 1), docs, i, sc) for i in range(B)])
    return {k: v.to(device) for k, v in b.items()}


def timed(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="metalm-lo-1.3b")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--compile", action="store_true", help="add a torch.compile row for the reference")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args()
    import dataclasses
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from bench.model_cpu import RefDecoder
    from pretrain.config import load_config, preset
    from pretrain.engine import build_engine
    from pretrain.model.metalm import MetaLM
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(1, 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    B, T = args.micro_batch, args.seq_length
    metalm_cfg = preset(args.preset)
    gpt_cfg = dataclasses.replace(metalm_cfg, encoder=None, vision=None)
    rows = []

    d = gpt_cfg.decoder
    for compiled in ([False, True] if args.compile else [False]):
        torch.manual_seed(0)
        ref = RefDecoder(gpt_cfg.vocab_size, d.hidden, d.heads, d.layers, d.ffn_hidden).to(device, dtype)
        fwd = torch.compile(ref) if compiled else ref
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=device.type == "cuda")
        batch = batch_for(gpt_cfg, "gpt", B, T, device)

        def ref_step():
            fwd(batch).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        rows.append((f"plain PyTorch decoder{' (compiled)' if compiled else ''}", gpt_cfg,
                     timed(ref_step, args.steps, args.warmup)))
        del ref, opt, fwd

    for name, cfg, mode in (("ours: GPT baseline, DeepSpeed ZeRO-1", gpt_cfg, "gpt"),
                            (f"ours: {args.preset}, DeepSpeed ZeRO-1", metalm_cfg, "sclm")):
        torch.manual_seed(0)
        tcfg = load_config(None, [f"parallel.micro_batch={B}", "parallel.deepspeed=zero1",
                                  f"parallel.precision={args.precision}"])
        tcfg.model = cfg
        engine = build_engine(tcfg, MetaLM(cfg), dp_size=1)
        batch = batch_for(cfg, mode, B, T, engine.device)

        def ds_step():
            engine.backward(engine(batch))
            engine.step()

        rows.append((name, cfg, timed(ds_step, args.steps, args.warmup)))
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{args.preset}, B={B}, T={T}, {args.precision}, {dev}, {args.steps} steps after {args.warmup} warm-up")
    print(f"{'configuration':44s} {'tokens/s':>10s} {'MFU':>7s} {'vs plain':>9s}")
    base = B * T / rows[0][2]
    for name, cfg, dt in rows:
        tps = B * T / dt
        mfu = tps * cfg.flops_per_token(T) / (args.peak_tflops * 1e12)
        print(f"{name:44s} {tps:10,.0f} {mfu:7.1%} {tps / base:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
