"""Our imported text encoder vs transformers' own BertModel on the same batch: forward tokens/s on one CPU thread.

    python -m bench.encoder_forward [--rows 8] [--length 256] [--repeats 5]

The encoder is the real all-MiniLM-L6-v2 (data_tools.models fetch), imported into MetaLM's text encoder
(pretrain/hf_encoders.py: our post-norm LayerNorm blocks with biases on megatron-core layers, fused QKV, SDPA with
the block-diagonal mask of packed spans). Rows: transformers' BertModel (eager and SDPA attention) with one
sequence per row and a padding mask, ours with the same sequences, and ours with them packed several per row (how
the loader feeds spans). Outputs are checked equal (1e-5) before timing. Target: ours >= 1.0x BertModel.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from bench.common import ROOT


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=128, help="tokens per sequence ([CLS] ... [SEP])")
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
    B, L = args.rows, args.length
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    seg = torch.zeros(B, L, dtype=torch.int32)
    pos = torch.arange(L).expand(B, L)
    # packed: the same sequences two per row (the loader's layout: block-diagonal segments, positions restart)
    packed = ids.reshape(B // 2, 2 * L)
    pseg = torch.arange(2).repeat_interleave(L).expand(B // 2, 2 * L).to(torch.int32).contiguous()
    ppos = torch.arange(L).repeat(2).expand(B // 2, 2 * L)
    runs = {}
    with torch.no_grad():
        ref = None
        for impl in ("eager", "sdpa"):
            hf = BertModel.from_pretrained(minilm, attn_implementation=impl).eval()
            f = (lambda hf=hf: hf(ids, attention_mask=torch.ones_like(ids)).last_hidden_state)
            ref = f() if ref is None else ref
            runs[f"transformers BertModel ({impl} attention)"] = f
        mask = encoder_mask(cfg, seg)
        f_ours = lambda: ours.encoder(ids, pos, mask)  # noqa: E731
        pmask = encoder_mask(cfg, pseg)
        f_packed = lambda: ours.encoder(packed, ppos, pmask).reshape(B, L, -1)  # noqa: E731
        for name, f in (("ours (one sequence per row)", f_ours), ("ours (two sequences packed per row)", f_packed)):
            err = (f() - ref).abs().max().item()
            assert err < 1e-5, f"{name}: differs from BertModel by {err}"
            runs[name] = f
        best = {name: float("inf") for name in runs}
        for name, f in runs.items():
            f()  # warm-up
        for _ in range(args.repeats):  # interleaved, best of the repeats: fair on a machine doing other work
            for name, f in runs.items():
                t0 = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - t0)
        rates = {name: B * L / t for name, t in best.items()}
    base = rates["transformers BertModel (sdpa attention)"]
    print(f"\nall-MiniLM-L6-v2 forward, {B} sequences x {L} tokens, best of {args.repeats} interleaved repeats, 1 "
          "thread (outputs equal within 1e-5)")
    print(f"{'encoder':44s} {'tokens/s':>10s} {'vs BertModel (sdpa)':>20s}")
    for name, r in rates.items():
        print(f"{name:44s} {r:10,.0f} {r / base:19.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
