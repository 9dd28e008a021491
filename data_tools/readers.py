"""Streaming readers for jsonl (plain or .gz), parquet and plain-text inputs, with precise error locations.

Reading is split in two so preprocessing can parallelise the expensive half:
- `iter_chunks(path)` runs in the main process and only cuts the input into `Chunk`s of raw records (bytes lines of
  jsonl, strings of a parquet column, the text of a .txt file) with their line/row numbers; memory is bounded by the
  chunk size whatever the file size.
- `parse_chunk(chunk, keys)` runs in a worker: UTF-8 decode, JSON parse, key and type checks. Every bad record becomes
  a `BadRecord` naming file, line (or row) and the problem; nothing is dropped silently.
A file-level problem (missing file, parquet without the column, a truncated .gz stream) is a `UserError` or, for a
stream cut short after some good records, a `BadRecord` on the line where it stopped.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from data_tools.cli import UserError

JSONL_EXTS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_EXTS = (".parquet",)
TEXT_EXTS = (".txt", ".txt.gz")


@dataclass
class Chunk:
    path: str
    kind: str  # "jsonl" | "parquet" | "text"
    first: int  # 1-based line (jsonl, text) or 0-based row (parquet) of items[0]
    items: list = field(default_factory=list)
    nbytes: int = 0  # input bytes this chunk covers (for progress and MB/s)
    error: "BadRecord | None" = None  # a stream-level problem found after the items (e.g. truncated .gz)


@dataclass(frozen=True)
class BadRecord:
    path: str
    where: str  # "line 12" / "row 7" / "end of file"
    reason: str  # short category used for the summary counts
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.where}: {self.reason}: {self.detail}"


def input_kind(path: str) -> str:
    low = path.lower()
    if low.endswith(JSONL_EXTS):
        return "jsonl"
    if low.endswith(PARQUET_EXTS):
        return "parquet"
    if low.endswith(TEXT_EXTS):
        return "text"
    raise UserError(f"{path}: unknown input type (expected one of {', '.join(JSONL_EXTS + PARQUET_EXTS + TEXT_EXTS)})")


def check_inputs(paths: Sequence[str], keys: Sequence[str]) -> None:
    """Fail fast, before any work, on missing files and parquet files without the requested columns."""
    if not paths:
        raise UserError("no input files given")
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"input not found: {path}")
        if input_kind(path) == "parquet":
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(path)
            except Exception as e:  # pyarrow raises several types for a corrupt footer
                raise UserError(f"{path}: not a readable parquet file ({e})") from None
            for key in keys:
                if key not in schema.names:
                    raise UserError(f"{path}: no column {key!r} (columns: {', '.join(schema.names)})")
                typ = str(schema.field(key).type)
                if typ not in ("string", "large_string"):
                    raise UserError(f"{path}: column {key!r} has type {typ}, expected string")
        elif input_kind(path) == "text" and len(keys) != 1:
            raise UserError(f"{path}: plain-text input holds one field, but --json-keys names {len(keys)}")


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def iter_chunks(path: str, keys: Sequence[str], chunk_bytes: int = 1 << 20, chunk_items: int = 512) -> Iterator[Chunk]:
    kind = input_kind(path)
    if kind == "parquet":
        yield from _iter_parquet_chunks(path, keys, chunk_items)
        return
    if kind == "text":
        with _open_binary(path) as f:
            try:
                data = f.read()
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                yield Chunk(path, kind, 1, [], 0, BadRecord(path, "end of file", "truncated or corrupt gzip", str(e)))
                return
        yield Chunk(path, kind, 1, [data], os.path.getsize(path))
        return
    chunk = Chunk(path, kind, 1)
    line_no = 0
    with _open_binary(path) as f:
        try:
            for line_no, line in enumerate(f, 1):
                chunk.items.append(line)
                chunk.nbytes += len(line)
                if chunk.nbytes >= chunk_bytes or len(chunk.items) >= chunk_items:
                    yield chunk
                    chunk = Chunk(path, kind, line_no + 1)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
            chunk.error = BadRecord(path, f"line {line_no + 1}", "truncated or corrupt gzip",
                                    f"stream ends after {line_no} complete lines ({e})")
    if chunk.items or chunk.error:
        yield chunk


def _iter_parquet_chunks(path: str, keys: Sequence[str], chunk_items: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    total_rows = max(pf.metadata.num_rows, 1)
    bytes_per_row = os.path.getsize(path) / total_rows
    row = 0
    for batch in pf.iter_batches(batch_size=chunk_items, columns=list(keys)):
        cols = [batch.column(k).to_pylist() for k in keys]
        items = list(zip(*cols))
        yield Chunk(path, "parquet", row, items, int(bytes_per_row * len(items)))
        row += len(items)


def parse_chunk(chunk: Chunk, keys: Sequence[str]) -> tuple[list[tuple[int, list[str]]], list[BadRecord]]:
    """Turn a chunk's raw items into (line/row number, [text per key]) documents and BadRecords."""
    docs: list[tuple[int, list[str]]] = []
    bad: list[BadRecord] = []
    if chunk.kind == "jsonl":
        for i, raw in enumerate(chunk.items):
            n = chunk.first + i
            if not raw.strip():
                bad.append(BadRecord(chunk.path, f"line {n}", "blank line", "no JSON object on this line"))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(BadRecord(chunk.path, f"line {n}", "invalid UTF-8", f"byte {e.start}: {e.reason}"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                bad.append(BadRecord(chunk.path, f"line {n}", "not JSON", f"column {e.colno}: {e.msg}"))
                continue
            fields = _fields(obj, keys, chunk.path, f"line {n}", bad)
            if fields is not None:
                docs.append((n, fields))
    elif chunk.kind == "parquet":
        for i, values in enumerate(chunk.items):
            n = chunk.first + i
            fields = _fields(dict(zip(keys, values)), keys, chunk.path, f"row {n}", bad)
            if fields is not None:
                docs.append((n, fields))
    else:
        for i, raw in enumerate(chunk.items):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(BadRecord(chunk.path, f"byte {e.start}", "invalid UTF-8", e.reason))
                continue
            fields = _fields({keys[0]: text}, keys, chunk.path, "whole file", bad)
            if fields is not None:
                docs.append((chunk.first, fields))
    if chunk.error is not None:
        bad.append(chunk.error)
    return docs, bad


def _fields(obj, keys: Sequence[str], path: str, where: str, bad: list[BadRecord]) -> list[str] | None:
    if not isinstance(obj, dict):
        bad.append(BadRecord(path, where, "not an object", f"expected a JSON object, got {type(obj).__name__}"))
        return None
    out = []
    for key in keys:
        if key not in obj or obj[key] is None:
            bad.append(BadRecord(path, where, "missing key", f"no {key!r} field"))
            return None
        value = obj[key]
        if not isinstance(value, str):
            bad.append(BadRecord(path, where, "not a string",
                                 f"field {key!r} is {type(value).__name__}, expected a string"))
            return None
        # an empty or whitespace-only text is not rejected here: as in Megatron-LM, a document is dropped only
        # when its text tokenizes to no ids (preprocess reports that), and "   " does tokenize under many models
        out.append(value)
    return out


@dataclass
class Document:
    path: str
    where: int
    text: str | None


def iter_documents(path: str, key: str = "text") -> Iterator[Document]:
    """Sequential convenience reader (tokenizer training, tests): yields good documents of one key."""
    check_inputs([path], [key])
    for chunk in iter_chunks(path, [key]):
        docs, _ = parse_chunk(chunk, [key])
        for n, fields in docs:
            yield Document(path, n, fields[0])
