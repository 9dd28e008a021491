"""CPU forward+backward speed: our `tiny-cpu` models (megatron-core TP layers, docking, semi-causal loss) vs a
plain-PyTorch reference decoder of the same shape, in the same run, on the same batch.

    python -m bench.model_cpu [--steps 10] [--micro-batch 4] [--seq-length 512]

Rows: the reference (nn.Linear, SDPA causal, F.cross_entropy, tied embeddings); our decoder-only GPT baseline
(`gpt-baseline-tiny`: the cost of megatron-core's layers and vocab-parallel loss); our MetaLM (`tiny-cpu`: the
decoder plus the span encoder, connector and docking). tokens/s counts decoder tokens. Target ratio >= 0.8 for
MetaLM vs the reference.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class RefBlock(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate, self.up, self.down = (nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False),
                                         nn.Linear(ffn, d, bias=False))

    def forward(self, x, cos, sin):
        B, L, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, L, self.heads, 3, -1).permute(3, 0, 2, 1, 4).unbind(0)

        def rope(t):
            t1, t2 = t.chunk(2, -1)
            return t * cos + torch.cat([-t2, t1], -1) * sin

        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, L, d))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class RefDecoder(nn.Module):
    """Plain PyTorch, same shape and math as our decoder."""

    def __init__(self, vocab, d, heads, layers, ffn):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(RefBlock(d, heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-5)
        hd = d // heads
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))

    def forward(self, batch):
        x = self.emb(batch["tokens"])
        f = batch["position_ids"].float()[..., None] * self.inv_freq
        e = torch.cat([f, f], -1)[:, None]
        cos, sin = e.cos(), e.sin()
        for b in self.blocks:
            x = b(x, cos, sin)
        logits = self.norm(x) @ self.emb.weight.t()
        losses = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="none")
        m = batch["loss_mask"].flatten()
        return (losses * m).sum() / m.sum()


def time_steps(model, batch, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        model(batch).backward()
        opt.step()
        opt.zero_grad()
    t0 = time.perf_counter()
    for _ in range(steps):
        model(batch).backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - t0) / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=512)
    args = p.parse_args()
    from pretrain.config import preset
    from pretrain.model.metalm import MetaLM
    from data_tools.objective import SampleConfig, build_sample, collate
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    T, B = args.seq_length, args.micro_batch
    rng = np.random.default_rng(0)
    rows = []
    for name in ("reference", "gpt-baseline-tiny", "tiny-cpu"):
        cfg = preset("tiny-cpu" if name == "reference" else name)
        sc = SampleConfig(seq_length=T, mode="sclm" if name == "tiny-cpu" else "gpt")
        batch = collate([build_sample(rng.integers(7, cfg.vocab_size, T + 1), np.zeros(T + 1, np.int32), i, sc)
                         for i in range(B)])
        torch.manual_seed(0)
        d = cfg.decoder
        model = (RefDecoder(cfg.vocab_size, d.hidden, d.heads, d.layers, d.ffn_hidden) if name == "reference"
                 else MetaLM(cfg))
        dt = time_steps(model.train(), batch, args.steps)
        rows.append((name, B * T / dt, sum(p.numel() for p in model.parameters())))
    ref = rows[0][1]
    print(f"\nB={B}, T={T}, {torch.get_num_threads()} threads, fwd+bwd+AdamW, {args.steps} steps")
    print(f"{'model':42s} {'params':>10s} {'tokens/s':>10s} {'vs reference':>13s}")
    label = {"reference": "plain PyTorch reference decoder", "gpt-baseline-tiny": "ours: gpt-baseline-tiny (decoder)",
             "tiny-cpu": "ours: tiny-cpu MetaLM (decoder+encoder)"}
    for name, tps, n in rows:
        print(f"{label[name]:42s} {n:10,d} {tps:10,.0f} {tps / ref:12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
