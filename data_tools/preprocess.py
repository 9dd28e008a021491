"""Preprocess jsonl (plain or .gz) / parquet / txt into Megatron indexed datasets (`.bin` + `.idx`).

    python -m data_tools.preprocess --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-model tok.model --append-eod --workers 2

writes `data/corpus_text_document.bin/.idx` (one pair per `--json-keys` key, Megatron's naming), byte-compatible
with megatron-core's `IndexedDataset` (it is written by megatron-core's own `IndexedDatasetBuilder`).

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


def _init_worker(model_path: str, keys: Sequence[str], append_eod: bool, dtype) -> None:
    global _TOKENIZER, _KEYS, _APPEND_EOD, _DTYPE
    from data_tools.tokenizer import Tokenizer

    _TOKENIZER, _KEYS, _APPEND_EOD, _DTYPE = Tokenizer(model_path), tuple(keys), append_eod, dtype


def _encode_chunk(chunk: Chunk) -> EncodedChunk:
    docs, bad = parse_chunk(chunk, _KEYS)
    tokens, lengths = [], []
    for k in range(len(_KEYS)):
        texts = [fields[k] for _, fields in docs]
        encoded = _TOKENIZER.encode_batch_numpy(texts)  # one thread per worker; the workers are the parallelism
        if _APPEND_EOD:
            eod = np.array([_TOKENIZER.eod], dtype=np.int32)
            encoded = [np.concatenate([e, eod]) for e in encoded]
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
    tokenizer_model: str,
    json_keys: Sequence[str] = ("text",),
    workers: int = 1,
    append_eod: bool = False,
    strict: bool = False,
    progress: bool | None = None,
    log=print,
) -> Summary:
    from data_tools.tokenizer import Tokenizer

    check_inputs(inputs, json_keys)
    tok = Tokenizer(tokenizer_model)
    vocab_dtype = np.uint16 if tok.vocab_size < 65500 else np.int32  # what megatron's DType.optimal_dtype picks
    pool = _start_pool(workers, (tok.model_path, tuple(json_keys), append_eod, vocab_dtype))
    try:
        summary = _preprocess(inputs, output_prefix, tok, json_keys, pool, workers, vocab_dtype, strict, progress,
                              log)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    summary.peak_rss_mb = _peak_rss_mb(workers)
    return summary


def _preprocess(inputs, output_prefix, tok, json_keys, pool, workers, dtype, strict, progress, log) -> Summary:
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
                    builder.add_document(res.tokens[b][offsets[d]:offsets[d + 1]], [int(res.lengths[b][d])])
                summary.tokens[json_keys[b]] += int(offsets[-1])
            summary.documents += len(res.lengths[0])
            summary.input_bytes += res.nbytes
            bar.update(res.nbytes)
            bar.set_postfix(docs_per_s=f"{summary.documents / max(time.perf_counter() - t0, 1e-9):,.0f}",
                            refresh=False)
        bar.close()
        if summary.documents == 0:
            raise UserError(f"no documents in {', '.join(inputs)}"
                            + (f" (all skipped: {dict(summary.skipped)})" if summary.skipped else " (empty input)"))
        for prefix, builder in zip(prefixes, builders):
            builder.finalize(prefix + ".idx" + tmp)
        for prefix in prefixes:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl/.jsonl.gz, parquet or txt files")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece model from data_tools.tokenizer")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl keys / parquet columns to tokenize")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document token </d> to each document")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    summary = preprocess(args.input, args.output_prefix, args.tokenizer_model, args.json_keys, args.workers,
                         args.append_eod, args.strict, progress=False if args.quiet else None)
    for line in summary.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))
