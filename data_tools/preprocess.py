"""Preprocess jsonl (plain or .gz) / parquet / txt into Megatron indexed datasets (`.bin` + `.idx`).

    python -m data_tools.preprocess --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-model tok.model --append-eod --workers 2
    python -m data_tools.preprocess --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/tokenizer_dir --append-eod

writes `data/corpus_text_document.bin/.idx` (one pair per `--json-keys` key, Megatron's naming), byte-compatible
with megatron-core's `IndexedDataset` (it is written by megatron-core's own `IndexedDatasetBuilder`), and
`data/corpus_text_document.tokenizer.json` (the tokenizer's type, files and special ids).

Megatron-LM's `tools/preprocess_data.py` flags are accepted where they mean something here (`--tokenizer-type`,
`--tokenizer-model`, `--vocab-file`, `--merge-file`, `--append-eod`, `--json-keys`, `--workers`, `--log-interval`,
`--keep-newlines`, `--partitions`); the others are refused by name. Documents are handled as Megatron-LM handles
them: each is the tokenizer's ids of its text plus the end-of-document id (`--append-eod`; the tokenizer's eos, or
`</d>` for models from data_tools.tokenizer); a document whose text tokenizes to no ids is dropped (reported), but
keeps its place in the document index as Megatron's writer does, so document i is still input record i and the
files are byte-identical to Megatron's for the same tokenizer.

How it is fast and bounded:
- the main process only cuts input into chunks of raw lines and writes results; workers do UTF-8 decoding, JSON
  parsing and SentencePiece encoding of a whole chunk at once (batch encode straight to numpy, no per-token Python
  ints), so both JSON and tokenization run in parallel;
- at most `2 * workers + 2` chunks are in flight, submitted by hand instead of `Pool.imap` (whose feeder thread reads
  the whole input ahead of the workers, so its memory grows with the input), and results are written in input order.
Bad records are skipped and counted per reason (`--strict`: the first one fails the run). Outputs are written under
a temporary name and renamed only when complete; an interrupted run leaves no dataset that looks finished.
"""
from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from data_tools.cli import UserError, discard_dataset, import_indexed_dataset, publish_dataset, run_cli
from data_tools.readers import BadRecord, Chunk, check_inputs, iter_chunks, parse_chunk


@dataclass
class EncodedChunk:
    tokens: list[np.ndarray]  # per key: all documents' tokens concatenated
    lengths: list[np.ndarray]  # per key: int64 document lengths
    bad: list[BadRecord]
    nbytes: int


@dataclass
class Summary:
    documents: int = 0
    tokens: dict = field(default_factory=dict)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    input_bytes: int = 0
    seconds: float = 0.0
    outputs: list = field(default_factory=list)
    peak_rss_mb: dict = field(default_factory=dict)  # "main" and "largest worker", from getrusage

    def lines(self) -> list[str]:
        out = [f"documents: {self.documents:,}"]
        for key, n in self.tokens.items():
            out.append(f"tokens[{key}]: {n:,}")
        rate = sum(self.tokens.values()) / max(self.seconds, 1e-9)
        out.append(f"time: {self.seconds:.1f}s ({rate:,.0f} tokens/s, "
                   f"{self.input_bytes / 1e6 / max(self.seconds, 1e-9):.1f} MB/s)")
        skipped = sum(self.skipped.values())
        out.append(f"skipped: {skipped:,}" + (" (" + ", ".join(f"{r}: {n}" for r, n in self.skipped.most_common()) + ")"
                                              if skipped else ""))
        if self.peak_rss_mb:
            out.append("peak RSS: " + ", ".join(f"{k} {v:,.0f} MB" for k, v in self.peak_rss_mb.items()))
        out += [f"wrote: {p}" for p in self.outputs]
        return out


MAX_REPORTED = 20  # bad records printed one per line; the rest are only counted


# ---------------------------------------------------------------- worker side
_TOKENIZER = None
_KEYS: Sequence[str] = ()
_APPEND_EOD = False
_DTYPE = np.uint16
NO_TOKENS = "tokenizes to no ids"  # the one reason Megatron-LM drops a document


def _init_worker(tokenizer, keys: Sequence[str], append_eod: bool, dtype) -> None:
    global _TOKENIZER, _KEYS, _APPEND_EOD, _DTYPE
    _TOKENIZER, _KEYS, _APPEND_EOD, _DTYPE = tokenizer, tuple(keys), append_eod, dtype


def _encode_chunk(chunk: Chunk) -> EncodedChunk:
    docs, bad = parse_chunk(chunk, _KEYS)
    tokens, lengths = [], []
    where = "row" if chunk.kind == "parquet" else "line"
    for k in range(len(_KEYS)):
        texts = [fields[k] for _, fields in docs]
        encoded = _TOKENIZER.encode_batch_numpy(texts)  # one thread per worker; the workers are the parallelism
        for (n, _), e in zip(docs, encoded):
            if len(e) == 0:  # kept as an empty document (no sequence), as Megatron's writer does
                bad.append(BadRecord(chunk.path, f"{where} {n}" if chunk.kind != "text" else "whole file",
                                     NO_TOKENS, f"field {_KEYS[k]!r} gives no token ids; dropped"))
        if _APPEND_EOD:  # Megatron appends the end of document to non-empty documents only
            eod = np.array([_TOKENIZER.eod], dtype=np.int32)
            encoded = [np.concatenate([e, eod]) if len(e) else e for e in encoded]
        lengths.append(np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded)))
        tokens.append(np.concatenate(encoded).astype(_DTYPE, copy=False) if encoded else np.zeros(0, _DTYPE))
    return EncodedChunk(tokens, lengths, bad, chunk.nbytes)


# ---------------------------------------------------------------- main side
def _chunks(paths: Sequence[str], keys: Sequence[str]) -> Iterator[Chunk]:
    for path in paths:
        yield from iter_chunks(path, keys)


def _start_pool(workers: int, init_args: tuple):
    """Worker processes, started before the main process imports torch/megatron-core (the only user of the
    builder), so the workers stay small; None for in-process encoding."""
    if workers <= 1:
        _init_worker(*init_args)
        return None
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    return ctx.Pool(workers, initializer=_init_worker, initargs=init_args)


def _ordered_results(chunks: Iterator[Chunk], pool, workers: int) -> Iterator[EncodedChunk]:
    """Encode chunks, yielding results in input order with at most 2*workers+2 chunks in flight."""
    if pool is None:
        for c in chunks:
            yield _encode_chunk(c)
        return
    pending: collections.deque = collections.deque()
    max_in_flight = 2 * workers + 2
    for c in chunks:
        pending.append(pool.apply_async(_encode_chunk, (c,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def output_prefixes(output_prefix: str, keys: Sequence[str]) -> list[str]:
    """Megatron's naming: one dataset per key, `{prefix}_{key}_document`."""
    return [f"{output_prefix}_{key}_document" for key in keys]


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer,
    json_keys: Sequence[str] = ("text",),
    workers: int = 1,
    append_eod: bool = False,
    strict: bool = False,
    progress: bool | None = None,
    log=print,
    log_interval: int = 0,
) -> Summary:
    """`tokenizer`: a tokenizer object from data_tools.tokenizer, or a path (auto-detected type)."""
    from data_tools.tokenizer import BaseTokenizer, load_tokenizer

    check_inputs(inputs, json_keys)
    tok = tokenizer if isinstance(tokenizer, BaseTokenizer) else load_tokenizer(tokenizer)
    vocab_dtype = np.uint16 if tok.vocab_size < 65500 else np.int32  # what megatron's DType.optimal_dtype picks
    if workers > 1:  # the Rust tokenizers' own thread pool must not be used across fork()
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = _start_pool(workers, (tok, tuple(json_keys), append_eod, vocab_dtype))
    try:
        summary = _preprocess(inputs, output_prefix, tok, json_keys, pool, workers, vocab_dtype, strict, progress,
                              log, log_interval)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    summary.peak_rss_mb = _peak_rss_mb(workers)
    return summary


def _preprocess(inputs, output_prefix, tok, json_keys, pool, workers, dtype, strict, progress, log,
                log_interval=0) -> Summary:
    indexed = import_indexed_dataset()
    IndexedDatasetBuilder = indexed.IndexedDatasetBuilder
    assert np.dtype(indexed.DType.optimal_dtype(tok.vocab_size)) == np.dtype(dtype)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    prefixes = output_prefixes(output_prefix, json_keys)
    tmp = f".tmp-{os.getpid()}"
    builders = [IndexedDatasetBuilder(p + ".bin" + tmp, dtype=dtype) for p in prefixes]
    summary = Summary(tokens={k: 0 for k in json_keys})
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    t0 = time.perf_counter()
    finished = False
    try:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr,
                   disable=True if progress is False else None, mininterval=1.0)  # None: on a terminal only
        for res in _ordered_results(_chunks(inputs, json_keys), pool, workers):
            for bad in res.bad:
                if strict:
                    raise UserError(f"{bad} (--strict)")
                summary.skipped[bad.reason] += 1
                if sum(summary.skipped.values()) <= MAX_REPORTED:
                    log(f"skipped {bad}", file=sys.stderr)
            for b, builder in enumerate(builders):
                offsets = np.concatenate([[0], np.cumsum(res.lengths[b])])
                for d in range(len(res.lengths[b])):
                    n = int(res.lengths[b][d])  # 0: an empty document, no sequence (what Megatron writes)
                    builder.add_document(res.tokens[b][offsets[d]:offsets[d + 1]], [n] if n else [])
                summary.tokens[json_keys[b]] += int(offsets[-1])
            summary.documents += int(np.count_nonzero(res.lengths[0]))
            summary.input_bytes += res.nbytes
            bar.update(res.nbytes)
            before = summary.documents - int(np.count_nonzero(res.lengths[0]))
            if log_interval and summary.documents // log_interval > before // log_interval:
                el = max(time.perf_counter() - t0, 1e-9)
                log(f"processed {summary.documents:,} documents ({summary.documents / el:,.0f} docs/s, "
                    f"{summary.input_bytes / 1e6 / el:.1f} MB/s)", file=sys.stderr)
            bar.set_postfix(docs_per_s=f"{summary.documents / max(time.perf_counter() - t0, 1e-9):,.0f}",
                            refresh=False)
        bar.close()
        if summary.documents == 0:
            raise UserError(f"no documents in {', '.join(inputs)}"
                            + (f" (all skipped: {dict(summary.skipped)})" if summary.skipped else " (empty input)"))
        for prefix, builder in zip(prefixes, builders):
            builder.finalize(prefix + ".idx" + tmp)
        for prefix in prefixes:
            write_tokenizer_meta(prefix, tok, summary.documents)
            publish_dataset(prefix, tmp)
            summary.outputs += [prefix + ".bin", prefix + ".idx"]
        finished = True
    finally:
        if not finished:
            for prefix, builder in zip(prefixes, builders):
                discard_dataset(prefix, tmp, builder)
    summary.seconds = time.perf_counter() - t0
    return summary


def _peak_rss_mb(workers: int) -> dict:
    import resource

    out = {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if workers > 1:  # the pool's processes have been reaped: RUSAGE_CHILDREN holds the largest one
        out["largest worker"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


# Megatron-LM tools/preprocess_data.py flags that have no meaning here: refused by name (not "unrecognized")
MEGATRON_REFUSED = {
    "--split-sentences": "sentence splitting (NLTK) is not supported: each document is one sequence",
    "--lang": "only used with --split-sentences, which is not supported",
    "--keep-sequential-samples": "inputs are always read and written in order here",
    "--tiktoken-pattern": "TikTokenizer is not supported",
    "--tiktoken-num-special-tokens": "TikTokenizer is not supported",
    "--tiktoken-special-tokens": "TikTokenizer is not supported",
    "--vocab-size": "the vocabulary size is read from the tokenizer",
    "--tokenizer-metadata": "the tokenizer is described by its files and --eod-id here",
}
MEGATRON_TYPES_REFUSED = ("BertWordPieceLowerCase", "BertWordPieceCase", "GPTSentencePieceTokenizer",
                          "Llama2Tokenizer", "Llama3Tokenizer", "MistralTokenizer", "TikTokenizer", "NullTokenizer",
                          "MultimodalTokenizer", "HuggingFaceTokenizerCustom")


def write_tokenizer_meta(prefix: str, tok, documents: int) -> str:
    """PREFIX.tokenizer.json: which tokenizer made the dataset (type, files, special ids), so training, evaluation
    and conversion need not guess. Written before the dataset is published."""
    import json

    from data_tools.durable import write_durable

    meta = {"tokenizer": tok.spec(), "vocab_size": tok.vocab_size, "documents": documents}
    path = prefix + ".tokenizer.json"
    write_durable(path, (json.dumps(meta, indent=2) + "\n").encode())
    return path


def build_parser() -> argparse.ArgumentParser:
    from data_tools.tokenizer import add_tokenizer_args

    p = argparse.ArgumentParser(prog="python -m data_tools.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl/.jsonl.gz, parquet or txt files")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    add_tokenizer_args(p)
    p.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl keys / parquet columns to tokenize")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    p.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document id to each document (the tokenizer's eos, as Megatron-LM; "
                        "</d> for models from data_tools.tokenizer; --eod-id to choose)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log-interval", type=int, default=0,
                   help="print a progress line every N documents (Megatron-LM's flag; default: a progress bar on "
                        "a terminal)")
    p.add_argument("--keep-newlines", action="store_true",
                   help="accepted for Megatron-LM compatibility: newlines are always kept (they only matter with "
                        "--split-sentences, which is not supported)")
    p.add_argument("--partitions", type=int, default=1,
                   help="accepted for Megatron-LM compatibility: input is streamed in order, so the output is what "
                        "Megatron writes with any number of partitions")
    return p


def _refuse_megatron_flags(argv: Sequence[str]) -> None:
    for a in argv:
        flag = a.split("=", 1)[0]
        if flag in MEGATRON_REFUSED:
            raise UserError(f"{flag} (a Megatron-LM flag): {MEGATRON_REFUSED[flag]}")
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--tokenizer-type=") else (
            argv[i + 1] if a == "--tokenizer-type" and i + 1 < len(argv) else None)
        if value in MEGATRON_TYPES_REFUSED:
            raise UserError(f"--tokenizer-type {value}: not supported here; use SentencePieceTokenizer, "
                            "HuggingFaceTokenizer or GPT2BPETokenizer")


def main(argv: Sequence[str] | None = None) -> int:
    from data_tools.tokenizer import tokenizer_from_args

    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_megatron_flags(argv)
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.partitions < 1:
        raise UserError("--partitions must be at least 1")
    check_inputs(args.input, args.json_keys)
    tok = tokenizer_from_args(args)
    print(f"tokenizer: {tok.describe()}", file=sys.stderr)
    summary = preprocess(args.input, args.output_prefix, tok, args.json_keys, args.workers,
                         args.append_eod, args.strict, progress=False if args.quiet or args.log_interval else None,
                         log_interval=args.log_interval)
    for line in summary.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))
