"""Merge Megatron indexed datasets into one (`.bin` + `.idx`), in the order given.

    python -m data_tools.merge --input data/a_text_document data/b_text_document --output-prefix data/ab_text_document

Uses megatron-core's `IndexedDatasetBuilder.add_index` (index concatenation + a straight copy of each `.bin`).
All inputs must share one token dtype. The output is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from data_tools.cli import (UserError, check_dataset_prefix, discard_dataset, import_indexed_dataset,
                            publish_dataset, run_cli)
from data_tools.durable import write_durable


def merge(inputs: Sequence[str], output_prefix: str) -> tuple[int, int]:
    """Returns (documents, sequences) of the merged dataset."""
    indexed = import_indexed_dataset()
    if not inputs:
        raise UserError("no input datasets given")
    dtypes = {}
    for prefix in inputs:
        check_dataset_prefix(prefix)
        dtypes[prefix] = indexed.IndexedDataset(prefix).index.dtype
    if len(set(dtypes.values())) != 1:
        raise UserError("inputs have different token dtypes: "
                        + ", ".join(f"{p}: {numpy_name(d)}" for p, d in dtypes.items()))
    spec = _common_tokenizer(inputs)
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in inputs}:
        raise UserError(f"--output-prefix {output_prefix} is also an input")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp = f".tmp-{os.getpid()}"
    builder = indexed.IndexedDatasetBuilder(output_prefix + ".bin" + tmp, dtype=dtypes[inputs[0]])
    done = False
    try:
        for prefix in inputs:
            builder.add_index(prefix)
        builder.finalize(output_prefix + ".idx" + tmp)
        if spec is not None:
            meta = {"tokenizer": {k: v for k, v in spec.items() if k != "vocab_size"},
                    "vocab_size": spec.get("vocab_size")}
            write_durable(output_prefix + ".tokenizer.json", json.dumps(meta, indent=2) + "\n")
        publish_dataset(output_prefix, tmp)
        done = True
    finally:
        if not done:
            discard_dataset(output_prefix, tmp, builder)
    merged = indexed.IndexedDataset(output_prefix)
    return len(merged.document_indices) - 1, len(merged)


def _common_tokenizer(inputs: Sequence[str]) -> dict | None:
    """The tokenizer recorded beside the inputs (PREFIX.tokenizer.json), carried to the output; inputs made with
    different tokenizers (other type, files or special ids) are refused: their ids mean different things."""
    from data_tools.tokenizer import dataset_tokenizer_spec

    specs = {p: dataset_tokenizer_spec(p) for p in inputs}
    known = {p: s for p, s in specs.items() if s is not None}
    if not known:
        return None
    first_p, first = next(iter(known.items()))
    for p, s in known.items():
        if (s.get("type"), s.get("ids")) != (first.get("type"), first.get("ids")):
            raise UserError(f"{p} was made with another tokenizer than {first_p} ({s.get('type')} {s.get('ids')} vs "
                            f"{first.get('type')} {first.get('ids')})")
    return first


def numpy_name(dtype) -> str:
    import numpy as np

    return np.dtype(dtype).name


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes (without .bin/.idx)")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    docs, seqs = merge(args.input, args.output_prefix)
    print(f"merged {len(args.input)} datasets: {docs:,} documents, {seqs:,} sequences -> {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))
