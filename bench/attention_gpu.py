"""GPU attention benchmark (needs CUDA): FlexAttention vs SDPA, same masks, forward+backward, bf16.

    python -m bench.attention_gpu [--lengths 2048 4096 8192] [--tokens 16384] [--heads 16] [--head-dim 128]

For each L (batch = tokens / L): (1) numerics: compiled FlexAttention with the semi-causal + document mask vs SDPA
with the dense mask from the same mask_mod, forward output and q/k/v gradients, relative error (target <= 1e-2 in
bf16); (2) time of fwd+bwd: SDPA causal (flash, the baseline), FlexAttention causal, FlexAttention semi-causal +
document, SDPA with the dense semi-causal + document mask. Prints one table; ratios are against flash causal.
"""
from __future__ import annotations

import argparse
import sys

import torch

from pretrain.model import masks
from pretrain.model.attention import AttentionMask, attend


def structure(B, L, device, seed=0):
    """Documents of ~L/2 tokens and bidirectional spans of 65..128 tokens covering ~25%, as in training."""
    import numpy as np

    from data_tools.objective import SpanConfig, sample_rng, sample_spans

    docs = torch.zeros(B, L, dtype=torch.int32)
    spans = torch.full((B, L), -1, dtype=torch.int32)
    for b in range(B):
        ends = np.zeros(L, bool)
        ends[np.arange(L // 2 - 1, L, L // 2)] = True
        docs[b] = torch.from_numpy(np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int32))
        for k, (s, e) in enumerate(sample_spans(ends, SpanConfig(), sample_rng(seed, b))):
            spans[b, s:e] = k
    return docs.to(device), spans.to(device)


def bench(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: bench.attention_gpu needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    rows = []
    for L in args.lengths:
        B = max(1, args.tokens // L)
        docs, spans = structure(B, L, dev)
        semi = masks.and_masks(masks.bidirectional_span(spans), masks.document(docs))
        q, k, v = (torch.randn(B, args.heads, L, args.head_dim, device=dev, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        g = torch.randn_like(q)
        m_flex = AttentionMask.build(semi, B, L, None, dev, "flex")
        m_dense = AttentionMask.build(semi, B, L, None, dev, "sdpa")
        m_causal_flex = AttentionMask.build(masks.causal, B, L, None, dev, "flex")
        m_flash = AttentionMask.build(masks.causal, B, L, None, dev, "sdpa", plain_causal=True)

        def fwd_bwd(mask):
            def run():
                out = attend(q, k, v, mask)
                out.backward(g)
                return out
            return run

        outs = {}
        for name, mask in (("flex", m_flex), ("dense", m_dense)):
            q.grad = k.grad = v.grad = None
            o = fwd_bwd(mask)()
            outs[name] = (o.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone())
        err = max(rel(a, b) for a, b in zip(outs["flex"], outs["dense"]))
        t = {name: bench(fwd_bwd(m)) for name, m in (("flash causal", m_flash), ("flex causal", m_causal_flex),
                                                     ("flex semi-causal+doc", m_flex),
                                                     ("sdpa dense semi-causal+doc", m_dense))}
        rows.append((L, B, err, t))
    print(f"\n{'L':>6s} {'B':>3s} {'max rel err':>12s}  " + "  ".join(f"{n:>28s}" for n in rows[0][3]))
    for L, B, err, t in rows:
        base = t["flash causal"]
        print(f"{L:6d} {B:3d} {err:12.2e}  " + "  ".join(f"{v:9.3f} ms ({v / base:5.2f}x flash)" for v in t.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
