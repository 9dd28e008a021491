"""Semi-causal batch building speed on one core: samples/s for B=8, T=2048, from a real preprocessed dataset.

    python -m bench.batch_building [--batches 100]

Rows, in the same run: megatron-core's own GPTDataset.__getitem__ (the reference cost of a plain GPT sample), our
`gpt` mode (no spans) and `sclm` mode (span sampling, loss mask, packed encoder row, dock indices), and `sclm` for an
encoder with its own tokenizer (the fetched all-MiniLM-L6-v2: every span re-tokenized by its WordPiece tokenizer and
each decoder slot aligned to an encoder token, data_tools/encoder_tokens.py), each with `collate` into the batch
contract. Target: >= 1,000 samples/s for sclm, with and without re-tokenization.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from bench.common import ROOT


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--work", default=os.path.join(ROOT, "work", "bench"))
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from bench.common import corpora_and_tokenizer
    from data_tools import datasets, preprocess, tokenizer
    from data_tools.objective import collate

    inputs, model = corpora_and_tokenizer(args.work)
    tok = tokenizer.Tokenizer(model)
    prefix = preprocess.output_prefixes(os.path.join(args.work, "corpus"), ["text"])[0]
    if not os.path.exists(prefix + ".idx"):
        preprocess.preprocess(inputs, os.path.join(args.work, "corpus"), model, workers=2, append_eod=True,
                              progress=False, log=lambda *a, **k: None)
    n = args.batches * args.micro_batch
    B = args.micro_batch
    results = []
    from data_tools.encoder_tokens import EncoderTokenizer, SpanAligner
    from data_tools.models import fetch

    minilm = fetch("all-minilm-l6-v2", os.path.join(args.work, "models"), log=lambda *a: None)
    aligner = SpanAligner(tok, EncoderTokenizer(minilm), 512)
    tokenizer_s = [0.0]  # time inside the encoder's own tokenizer (Hugging Face tokenizers, offsets on)
    encode = aligner.encoder_tok.encode_batch

    def timed_encode(texts):
        t = time.perf_counter()
        out = encode(texts)
        tokenizer_s[0] += time.perf_counter() - t
        return out

    aligner.encoder_tok.encode_batch = timed_encode
    for mode in ("megatron", "gpt", "sclm", "sclm-own"):
        cfg = datasets.DataConfig(data_path=[prefix], split="100,0,0", seq_length=args.seq_length,
                                  mode={"megatron": "gpt", "sclm-own": "sclm"}.get(mode, mode))
        train = datasets.build_datasets(cfg, tok, [n, 0, 0], aligner=aligner if mode == "sclm-own" else None)[0]
        train[0]
        tokenizer_s[0] = 0.0
        t0 = time.perf_counter()
        if mode == "megatron":
            for b in range(args.batches):
                batch = [train.gpt[i] for i in range(b * B, (b + 1) * B)]
                torch.utils.data.default_collate(batch)
        else:
            for b in range(args.batches):
                collate([train[i] for i in range(b * B, (b + 1) * B)])
        dt = time.perf_counter() - t0
        results.append((mode, n / dt))
        if mode == "sclm-own":
            share = tokenizer_s[0] / dt
    ref = results[0][1]
    print(f"\nB={B}, T={args.seq_length}, {n} samples each, 1 thread")
    print(f"{'loader':48s} {'samples/s':>10s} {'vs megatron GPTDataset':>24s}")
    names = {"megatron": "megatron-core GPTDataset + default_collate", "gpt": "ours, gpt mode (+ collate)",
             "sclm": "ours, sclm mode: spans + encoder row + dock",
             "sclm-own": "ours, sclm, spans re-tokenized (MiniLM) + aligned"}
    for mode, rate in results:
        print(f"{names[mode]:48s} {rate:10,.0f} {rate / ref:23.2f}x")
    print(f"of the re-tokenized loader's time, {share:.0%} is the encoder's tokenizer itself (tokenizers' "
          f"encode_batch with offsets: {1e3 * tokenizer_s[0] / n:.2f} ms per sample; alone it would allow "
          f"{n / tokenizer_s[0]:,.0f} samples/s)")
    st = aligner.stats
    print(f"re-tokenization: {st.spans} spans, {st.slots} decoder slots -> {st.encoder_tokens} encoder tokens "
          f"(row {train.cfg.encoder_row}); unknown-token slots {st.unk_slots}; back to causal: {st.dropped_empty} "
          f"empty, {st.dropped_long} too long, {st.dropped_row_full} past the row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
