"""Show a Megatron indexed dataset: header, counts, document-length histogram, and decoded documents.

    python -m data_tools.inspect data/corpus_text_document
    python -m data_tools.inspect data/corpus_text_document --tokenizer-model tok.model --decode 0 --max-tokens 200

Reads any dataset in Megatron's `.bin/.idx` format (ours, Megatron-LM's, GPT-NeoX's), through megatron-core's
`IndexedDataset`; the header fields are also shown raw, as stored.
"""
from __future__ import annotations

import argparse
import struct
import sys
from typing import Sequence

import numpy as np

from data_tools.cli import UserError, check_dataset_prefix, import_indexed_dataset, run_cli

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_NAMES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}


def read_header(idx_path: str) -> dict:
    """The fixed-size .idx header (FORMATS.md), read as stored, to show it and to name a bad file precisely."""
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != MAGIC:
        raise UserError(f"{idx_path}: not a Megatron .idx file (magic {head[:9]!r}, expected {MAGIC!r})")
    version, = struct.unpack("<Q", head[9:17])
    code = head[17]
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    return {"version": version, "dtype_code": code, "dtype": DTYPE_NAMES.get(code, "unknown"),
            "sequences": n_seq, "document_count_field": n_doc}


def document_tokens(ds, i: int) -> np.ndarray:
    docs = ds.document_indices
    if not 0 <= i < len(docs) - 1:
        raise UserError(f"--decode {i}: dataset has documents 0..{len(docs) - 2}")
    parts = [ds[j] for j in range(docs[i], docs[i + 1])]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # an empty document (no sequence)


def histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    if len(lengths) == 0:
        return []
    edges = 2 ** np.arange(0, int(np.ceil(np.log2(max(lengths.max(), 2)))) + 1)
    counts, _ = np.histogram(lengths, bins=np.concatenate([[0], edges]))
    top = counts.max()
    lines = []
    lo = 0
    for hi, c in zip(edges, counts):
        if c:
            lines.append(f"  [{lo:>8,}, {hi:>8,})  {c:>8,}  {'#' * max(1, int(width * c / top))}")
        lo = hi
    return lines


def inspect(prefix: str, tokenizer=None, decode: Sequence[int] = (), max_tokens: int = 400) -> str:
    """`tokenizer`: a tokenizer object, a model path, or None (the one recorded in PREFIX.tokenizer.json)."""
    from data_tools.tokenizer import BaseTokenizer, dataset_tokenizer_spec, load_tokenizer, load_tokenizer_spec

    check_dataset_prefix(prefix)
    header = read_header(prefix + ".idx")
    ds = import_indexed_dataset().IndexedDataset(prefix)
    seq_lengths = ds.sequence_lengths.astype(np.int64)
    doc_idx = ds.document_indices
    # per document: tokens of its sequences (Megatron's writer keeps documents that tokenized to nothing as
    # empty entries: repeated boundaries, zero sequences)
    doc_lengths = np.diff(np.concatenate([[0], np.cumsum(seq_lengths)])[doc_idx]) if len(doc_idx) > 1 else np.zeros(0)
    empty = int(np.count_nonzero(doc_lengths == 0))
    spec = dataset_tokenizer_spec(prefix)
    out = [f"dataset: {prefix}",
           f"header: version {header['version']}, dtype code {header['dtype_code']} ({header['dtype']}), "
           f"{header['sequences']:,} sequences, document field {header['document_count_field']:,}",
           f"documents: {len(doc_idx) - 1:,}"
           + (f" ({empty:,} empty: their text tokenized to no ids)" if empty else ""),
           f"tokens: {int(seq_lengths.sum()):,}"]
    if spec:
        out.append(f"tokenizer (recorded by preprocessing): {spec.get('type')} "
                   f"{spec.get('model') or spec.get('vocab_file', '')}, ids {spec.get('ids')}")
    if len(doc_lengths):
        out.append(f"document length: min {doc_lengths.min():,}, mean {doc_lengths.mean():,.1f}, "
                   f"median {int(np.median(doc_lengths)):,}, max {doc_lengths.max():,}")
        out.append("document length histogram (tokens):")
        out += histogram(doc_lengths)
    if decode:
        if tokenizer is None and spec is None:
            raise UserError("--decode needs --tokenizer-model (no PREFIX.tokenizer.json beside the dataset)")
        tok = (tokenizer if isinstance(tokenizer, BaseTokenizer) else
               load_tokenizer(tokenizer) if tokenizer else load_tokenizer_spec(spec))
        for i in decode:
            ids = document_tokens(ds, i)
            shown = ids[:max_tokens]
            shown_note = f", first {max_tokens}" if len(ids) > max_tokens else ""
            out.append(f"--- document {i} ({len(ids):,} tokens{shown_note}) ---")
            out.append(tok.decode(shown))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    p.add_argument("--tokenizer-model", help="tokenizer to decode documents with (SentencePiece .model or Hugging "
                   "Face tokenizer.json / dir; default: the one recorded in PREFIX.tokenizer.json)")
    p.add_argument("--decode", type=int, nargs="*", default=[], metavar="I", help="document indices to decode")
    p.add_argument("--max-tokens", type=int, default=400, help="decode at most this many tokens per document")
    args = p.parse_args(argv)
    print(inspect(args.prefix, args.tokenizer_model, args.decode, args.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))
