"""Perplexity of a model on documents, in the causal-LM view (no spans, every token predicted from its left context),
so a MetaLM and its GPT baseline compare directly.

    python -m eval.perplexity --model exported/metalm --data work/data/corpus_text_document --limit 200
    python -m eval.perplexity --model RUN --data held_out.jsonl [--json-key text] --window 512 --stride 256

- `--data` is a Megatron dataset prefix (PREFIX.bin/.idx: each document as preprocessed, end-of-document token
  included when it was appended) or a jsonl file (each line's `--json-key` text, tokenized with the model's
  tokenizer, followed by the end-of-document token as preprocessing with --append-eod does).
- Each document is scored on its own, after one start token (`--start`: `eod`, default, the token every
  pretraining document follows; `bos`; or `none`, then the first token is not predicted).
- Long documents: a sliding window of `--window` tokens (default: max_seq_length) moved by `--stride` (default:
  half the window); each window predicts only the tokens not predicted by the one before, with the rest of the
  window as context (the Hugging Face recipe). Token-weighted: perplexity = exp(total NLL / total predicted tokens).
Prints tokens, mean NLL (nats/token), perplexity and bits per byte (jsonl input, from the UTF-8 size), and writes
JSON with `--out`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Iterator, Sequence

import numpy as np
import torch


def windows(n_tokens: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, n_new): score tokens [end - n_new, end) of ids[begin:end] (positions 1..n-1 are targets)."""
    prev_end = 1  # the first token (the start token) is never a target
    begin = 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        yield begin, end, end - prev_end
        prev_end = end
        begin += stride
        begin = min(begin, max(prev_end - 1, 0))  # never skip a target


def score_documents(model, docs: Sequence[np.ndarray], window: int, stride: int, batch_size: int = 8,
                    progress=None) -> tuple[float, int]:
    """Total NLL (nats) and number of predicted tokens over documents (each an id array incl. its start token)."""
    from eval.inference import target_logprobs

    jobs = []  # (ids, n_new)
    for ids in docs:
        for b, e, n_new in windows(len(ids), window, stride):
            jobs.append((ids[b:e], n_new))
    jobs.sort(key=lambda j: -len(j[0]))
    total, count = 0.0, 0
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s:s + batch_size]
        T = max(len(ids) for ids, _ in chunk) - 1
        B = len(chunk)
        tokens = torch.zeros(B, T, dtype=torch.long)
        labels = torch.zeros(B, T, dtype=torch.long)
        for r, (ids, _) in enumerate(chunk):
            t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
            tokens[r, :len(t) - 1], labels[r, :len(t) - 1] = t[:-1], t[1:]
        batch = {"tokens": tokens, "labels": labels, "position_ids": torch.arange(T).expand(B, T).contiguous(),
                 "document_ids": torch.zeros(B, T, dtype=torch.int32)}
        lp = target_logprobs(model, batch).double()
        for r, (ids, n_new) in enumerate(chunk):
            n = len(ids) - 1
            total -= lp[r, n - n_new:n].sum().item()
            count += n_new
        if progress is not None:
            progress.update(len(chunk))
    return total, count


def read_documents(path: str, tok, json_key: str, start: str, limit: int | None) -> tuple[list[np.ndarray], int]:
    """Documents as id arrays with the start token prepended, and their UTF-8 size (0 when unknown)."""
    from data_tools.cli import UserError

    first = {"eod": [tok.ids.eod], "bos": [tok.ids.bos], "none": []}[start]
    docs, n_bytes = [], 0
    if path.endswith((".jsonl", ".json")):
        if not os.path.isfile(path):
            raise UserError(f"data file not found: {path}")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if limit is not None and len(docs) >= limit:
                    break
                try:
                    text = json.loads(line)[json_key]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path}:{n}: expected a JSON object with a string field {json_key!r}") from None
                if not isinstance(text, str) or not text.strip():
                    continue
                n_bytes += len(text.encode("utf-8"))
                docs.append(np.array(first + tok.encode(text) + [tok.ids.eod], dtype=np.int64))
        return docs, n_bytes
    from data_tools.cli import check_dataset_prefix, import_indexed_dataset

    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    check_dataset_prefix(prefix)
    ds = import_indexed_dataset().IndexedDataset(prefix)
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        docs.append(np.concatenate([np.array(first, dtype=np.int64), ds[i].astype(np.int64)]))
    return docs, 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.perplexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="consolidated directory, or run / checkpoint directory")
    p.add_argument("--data", required=True, help="dataset prefix (.bin/.idx) or a .jsonl file")
    p.add_argument("--json-key", default="text")
    p.add_argument("--limit", type=int, help="first N documents only")
    p.add_argument("--window", type=int, help="tokens per window (default: the model's max_seq_length)")
    p.add_argument("--stride", type=int, help="window step (default: half the window)")
    p.add_argument("--start", choices=("eod", "bos", "none"), default="eod")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    from tqdm import tqdm

    from data_tools.cli import UserError
    from eval.inference import ModelLoadError, load_model

    try:
        model, cfg, tok, info = load_model(args.model)
        window = args.window or cfg.model.max_seq_length
        stride = args.stride or max(1, window // 2)
        if not 2 <= window <= cfg.model.max_seq_length or not 1 <= stride <= window:
            raise ValueError(f"need 2 <= --window <= max_seq_length ({cfg.model.max_seq_length}) and "
                             f"1 <= --stride <= --window")
        docs, n_bytes = read_documents(args.data, tok, args.json_key, args.start, args.limit)
        if not docs:
            raise ValueError(f"{args.data}: no documents")
    except (UserError, ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_jobs = sum(1 for d in docs for _ in windows(len(d), window, stride))
    with tqdm(total=n_jobs, desc="windows", disable=not sys.stderr.isatty()) as bar:
        nll, n = score_documents(model, docs, window, stride, args.batch_size, progress=bar)
    res = {"model": os.path.abspath(args.model), "step": info.get("step"), "data": os.path.abspath(args.data),
           "documents": len(docs), "tokens": n, "window": window, "stride": stride, "start": args.start,
           "nll": nll / n, "perplexity": math.exp(min(nll / n, 50.0))}
    if n_bytes:
        res["bits_per_byte"] = nll / math.log(2) / n_bytes
    print(f"{len(docs)} documents, {n} tokens: NLL {res['nll']:.4f} nats/token, perplexity {res['perplexity']:.2f}"
          + (f", {res['bits_per_byte']:.4f} bits/byte" if n_bytes else ""))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
