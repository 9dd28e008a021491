"""Our imported text encoder vs transformers' own BertModel on the same spans: forward tokens/s on one CPU thread.

    python -m bench.encoder_forward [--spans 32] [--span-length 128] [--repeats 5]

The encoder is the real all-MiniLM-L6-v2 (data_tools.models fetch), imported into MetaLM's text encoder
(pretrain/hf_encoders.py: our post-norm LayerNorm blocks with biases on megatron-core layers, fused QKV, SDPA with
the block-diagonal mask of packed spans). The batch: spans as the sampler makes them (L/2+1..L tokens, plus
[CLS]/[SEP]). Rows: transformers' BertModel (eager and SDPA attention) with one span per row padded to the longest
and an attention mask; ours on that same padded layout; ours with the spans packed into rows of the encoder row
length of a T=2048 sample (how the loader feeds them: no padding tokens computed). tokens/s counts real span tokens.
Outputs are checked equal to BertModel's (1e-5) before timing; timings are the best of interleaved repeats.
Target: ours >= 1.0x BertModel.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from bench.common import ROOT


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spans", type=int, default=32)
    p.add_argument("--span-length", type=int, default=128, help="L: spans of L/2+1..L tokens (+2 special tokens)")
    p.add_argument("--row", type=int, default=832, help="packed encoder row length (T=2048, L=128: 832)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work", default=os.path.join(ROOT, "work", "bench"))
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from transformers import BertModel

    from data_tools.models import fetch
    from pretrain.config import ModelConfig, StackConfig
    from pretrain.hf_encoders import load_hf_encoder
    from pretrain.model.metalm import MetaLM, encoder_mask
    from pretrain.model_io import load_into
    from pretrain.parallel import init_distributed, init_model_parallel

    minilm = fetch("all-minilm-l6-v2", os.path.join(args.work, "models"), log=lambda *a: None)
    init_distributed("gloo")
    init_model_parallel(1, 1)
    enc, sd = load_hf_encoder(minilm)
    cfg = ModelConfig(vocab_size=512, max_seq_length=64, decoder=StackConfig(1, 32, 2), encoder=enc,
                      attention_backend="sdpa")
    ours = MetaLM(cfg).eval()
    load_into(ours, sd, partial=True)
    g = torch.Generator().manual_seed(0)
    L = args.span_length
    lengths = (torch.randint(L // 2 + 1, L + 1, (args.spans,), generator=g) + 2).tolist()
    spans = [torch.cat([torch.tensor([101]), torch.randint(1000, 30000, (n - 2,), generator=g), torch.tensor([102])])
             for n in lengths]
    n_tokens = sum(lengths)
    # padded: one span per row (what BertModel takes)
    Lmax = max(lengths)
    ids = torch.zeros(len(spans), Lmax, dtype=torch.long)
    am = torch.zeros(len(spans), Lmax, dtype=torch.long)
    seg = torch.full((len(spans), Lmax), -1, dtype=torch.int32)
    for b, s in enumerate(spans):
        ids[b, :len(s)], am[b, :len(s)], seg[b, :len(s)] = s, 1, 0
    pos = torch.arange(Lmax).expand(len(spans), Lmax)
    # packed: spans filled into rows of args.row positions (block-diagonal segments, positions restarting)
    rows, cur = [], []
    for s in spans:
        if sum(len(x) for x in cur) + len(s) > args.row:
            rows.append(cur)
            cur = []
        cur.append(s)
    rows.append(cur)
    packed = torch.zeros(len(rows), args.row, dtype=torch.long)
    pseg = torch.full((len(rows), args.row), -1, dtype=torch.int32)
    ppos = torch.zeros(len(rows), args.row, dtype=torch.long)
    where = []
    for r, row in enumerate(rows):
        j = 0
        for k, s in enumerate(row):
            packed[r, j:j + len(s)], pseg[r, j:j + len(s)], ppos[r, j:j + len(s)] = s, k, torch.arange(len(s))
            where.append((r, j, len(s)))
            j += len(s)
    runs = {}
    with torch.no_grad():
        for impl in ("eager", "sdpa"):
            hf = BertModel.from_pretrained(minilm, attn_implementation=impl).eval()
            runs[f"transformers BertModel ({impl}), padded rows"] = (
                lambda hf=hf: hf(ids, attention_mask=am).last_hidden_state)
        ref = runs["transformers BertModel (sdpa), padded rows"]()
        mask = encoder_mask(cfg, seg)
        pmask = encoder_mask(cfg, pseg)
        runs["ours, the same padded rows"] = lambda: ours.encoder(ids, pos, mask)
        runs[f"ours, spans packed in rows of {args.row}"] = lambda: ours.encoder(packed, ppos, pmask)
        for name in list(runs)[2:]:
            h = runs[name]()
            for b, (r, j, n) in enumerate(where):
                x = h[b, :n] if "padded" in name else h[r, j:j + n]
                err = (x - ref[b, :n]).abs().max().item()
                assert err < 1e-5, f"{name}: span {b} differs from BertModel by {err}"
        best = {name: float("inf") for name in runs}
        for f in runs.values():
            f()  # warm-up
        for _ in range(args.repeats):  # interleaved, best of the repeats: fair on a machine doing other work
            for name, f in runs.items():
                t0 = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - t0)
        rates = {name: n_tokens / t for name, t in best.items()}
    base = rates["transformers BertModel (sdpa), padded rows"]
    print(f"\nall-MiniLM-L6-v2 forward: {len(spans)} spans of {min(lengths)}..{max(lengths)} tokens ({n_tokens:,} "
          f"tokens; padded to {Lmax}: {len(spans) * Lmax:,}; packed: {len(rows)} rows of {args.row}), best of "
          f"{args.repeats} interleaved repeats, 1 thread; outputs equal within 1e-5")
    print(f"{'encoder':48s} {'tokens/s':>10s} {'vs BertModel (sdpa)':>20s}")
    for name, r in rates.items():
        print(f"{name:48s} {r:10,.0f} {r / base:19.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
