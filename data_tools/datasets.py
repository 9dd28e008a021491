"""Training samples: megatron-core's GPTDataset (splits, weighted blending, cached sample indices) plus the
semi-causal fields of `data_tools.objective`, in the batch contract of ARCHITECTURE.md.

    python -m data_tools.datasets --data-path 1.0 data/corpus_text_document --tokenizer-model tok.model \\
        --seq-length 2048 --show 2

- Sample indices (document/sample/shuffle index, blending) are megatron-core's, cached as .npy under `cache_dir`
  keyed by megatron's hash of the dataset description, so datasets move between this project and Megatron-LM.
- On top of each GPT sample (T+1 tokens), `SemiCausalDataset` derives per-token document ids from megatron's
  sample index and the sequence lengths (not from token values), then `data_tools.objective.build_sample` samples
  spans deterministically from (seed, global sample index).
- `MicroBatches` cuts the sample stream into micro-batches for one data-parallel rank, starting from a
  consumed-samples count, so resuming needs only that number.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from typing import Iterator, Sequence

import numpy as np

from data_tools.cli import UserError, check_dataset_prefix, run_cli
from data_tools.data_config import DataConfig
from data_tools.objective import SampleConfig, SpanConfig, build_sample, collate


def parse_blend(data_path: Sequence) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path: `prefix`, or `w1 prefix1 w2 prefix2 ...`."""
    items = [str(x) for x in data_path]
    if not items:
        raise UserError("data_path is empty: give a dataset prefix, or weight/prefix pairs")
    if len(items) == 1:
        return items, None
    if len(items) % 2:
        raise UserError(f"data_path {items}: expected weight/prefix pairs")
    weights, prefixes = [], []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            weights.append(float(w))
        except ValueError:
            raise UserError(f"data_path: {w!r} is not a weight (expected weight/prefix pairs)") from None
        prefixes.append(p)
    if any(w <= 0 for w in weights):
        raise UserError(f"data_path weights must be positive, got {weights}")
    return prefixes, weights


def build_gpt_datasets(cfg: DataConfig, tokenizer, num_samples: Sequence[int | None], seed: int = 1234):
    """[train, valid, test] GPT datasets (BlendedDataset when several prefixes) from megatron-core."""
    prefixes, weights = parse_blend(cfg.data_path)
    for p in prefixes:
        check_dataset_prefix(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    # outside a run (CLI tools, scoring) the user's cache directory, not the data's (training: RUN/index-cache)
    user_cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "metalm",
                              "index-cache")
    cache = cfg.cache_dir or user_cache
    try:  # a config recorded elsewhere (a copied checkpoint) may name a run directory that is not writable here
        os.makedirs(cache, exist_ok=True)
        if not os.access(cache, os.W_OK):
            cache = user_cache
    except OSError:
        cache = user_cache
    gcfg = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=cfg.seq_length,
        blend=(prefixes, weights),
        split=cfg.split,
        path_to_cache=cache,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    _check_splits_nonempty(prefixes, gcfg.split_matrix, num_samples)
    # megatron-core's BlendedDataset asks torch.distributed for the rank when it caches its indices; outside a
    # training job (CLI, tests) this gives it a one-process group, inside one the job's group is already there.
    one_process_group()
    import logging

    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, gcfg).build()


SPLIT_NAMES = ("train", "valid", "test")


def one_process_group(backend: str = "gloo", timeout_s: float = 600.0) -> None:
    """A one-process torch.distributed group on an in-memory store, unless a group exists (pretrain.parallel's
    `init_distributed` uses it when started without a launcher)."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s))


def check_splits(cfg: DataConfig, need_valid: bool = True) -> None:
    """Before any dataset is built (the launcher's check): train, and validation when it is read, get documents
    in every dataset of the blend under data.split."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_config import (  # the builder's own split rule
            convert_split_vector_to_split_matrix, parse_and_normalize_split)

    prefixes, _ = parse_blend(cfg.data_path)
    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split))
    _check_splits_nonempty(prefixes, bounds, [1, 1 if need_valid else None, None])


def _check_splits_nonempty(prefixes, split_matrix, num_samples) -> None:
    """megatron-core loops forever building a split that got no documents (GPTDataset._get_num_epochs), even when
    no samples are asked of it; name the dataset and split instead. Same boundaries as megatron's builder."""
    from data_tools.inspect import read_header

    for prefix in prefixes:
        n = read_header(prefix + ".idx")["sequences"]
        for i, bounds in enumerate(split_matrix):
            if bounds is None or num_samples[i] is None:
                continue
            beg, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
            if end <= beg:
                raise UserError(f"dataset {prefix}: the {SPLIT_NAMES[i]} split gets 0 of its {n} documents "
                                f"(split {bounds[0]:.4f}-{bounds[1]:.4f}); change data.split so that it gets "
                                f"at least one document, or weight 0 (e.g. 98,2,0)")


def _leaf(dataset, idx: int):
    """(GPTDataset, index inside it) for index idx of a GPTDataset or megatron BlendedDataset."""
    if hasattr(dataset, "dataset_index"):
        if dataset.dataset_index is None:
            dataset[0]  # megatron loads its blend indices lazily on first access
        return dataset.datasets[int(dataset.dataset_index[idx])], int(dataset.dataset_sample_index[idx])
    return dataset, idx


def gpt_sample_with_document_ids(dataset, idx: int) -> tuple[np.ndarray, np.ndarray]:
    """T+1 tokens of GPT sample idx (megatron-core's own lookup) and per-token sample-local document ids.

    Document ids count the documents the sample touches (0, 1, ...) and are -1 on padding; lengths come from
    megatron's sample index (document, offset pairs) and the sequence lengths of the indexed dataset.
    """
    ds, i = _leaf(dataset, idx)
    text, _ = ds._query_document_sample_shuffle_indices(i)
    j = ds.shuffle_index[i]
    (beg, beg_off), (end, end_off) = ds.sample_index[j], ds.sample_index[j + 1]
    extra = int(ds.config.add_extra_token_to_sequence)
    if beg == end:
        parts = [int(end_off - beg_off + extra)]
    else:
        lengths = ds.dataset.sequence_lengths
        parts = [int(lengths[ds.document_index[beg]] - beg_off)]
        parts += [int(lengths[ds.document_index[k]]) for k in range(beg + 1, end)]
        parts.append(int(end_off + extra))
    doc_ids = np.repeat(np.arange(len(parts), dtype=np.int32), parts)
    if len(doc_ids) < len(text):
        doc_ids = np.concatenate([doc_ids, np.full(len(text) - len(doc_ids), -1, dtype=np.int32)])
    return text, doc_ids


class SemiCausalDataset:
    """Samples of the batch contract (numpy dicts) over a megatron-core GPT dataset."""

    def __init__(self, gpt_dataset, cfg: SampleConfig, aligner=None):
        """`aligner`: spans re-tokenized for an encoder with its own tokenizer (data_tools/encoder_tokens.py)."""
        self.gpt = gpt_dataset
        self.cfg = cfg
        self.aligner = aligner if cfg.mode == "sclm" else None

    def __len__(self) -> int:
        return len(self.gpt)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        text, doc_ids = gpt_sample_with_document_ids(self.gpt, idx)
        return build_sample(text, doc_ids, idx, self.cfg, self.aligner)


def resolved_mode(cfg: DataConfig) -> str:
    """The data mode without a model to ask: `auto` is semi-causal (the trainer resolves it from the model)."""
    return "sclm" if cfg.mode == "auto" else cfg.mode


def sample_config(cfg: DataConfig, pad_id: int, seed: int = 1234, mode: str | None = None) -> SampleConfig:
    return SampleConfig(
        seq_length=cfg.seq_length, mode=mode or resolved_mode(cfg), seed=seed, pad_id=pad_id,
        reset_position_ids=cfg.reset_position_ids,
        spans=SpanConfig(span_length=cfg.span_length, coverage=cfg.span_coverage, max_spans=cfg.max_spans))


def build_datasets(cfg: DataConfig, tokenizer, num_samples: Sequence[int | None], seed: int = 1234,
                   mode: str | None = None, aligner=None) -> list[SemiCausalDataset | None]:
    """[train, valid, test] of the batch contract; `seed` the run's (sample indices and spans), `mode` sclm | gpt
    (default: the config's, `auto` meaning sclm); `aligner` for an encoder with its own tokenizer."""
    scfg = sample_config(cfg, tokenizer.pad, seed, mode)
    if aligner is not None:
        from data_tools.encoder_tokens import encoder_row_length

        scfg = dataclasses.replace(scfg, encoder_row=encoder_row_length(scfg.enc_length, cfg.span_length,
                                                                        cfg.seq_length),
                                   encoder_pad_id=aligner.encoder_tok.pad_id)
    return [None if d is None else SemiCausalDataset(d, scfg, aligner)
            for d in build_gpt_datasets(cfg, tokenizer, num_samples, seed)]


def blend_order(sizes: Sequence[int], weights: Sequence[float], n: int, seed: int) -> list[tuple[int, int]]:
    """The first n (source, item) draws: sources by Megatron's blending rule (largest weight·(slot+1) − count, as
    megatron-core's `build_blending_indices`), items of a source in a seeded permutation per epoch of that source.
    Written out because megatron-core's helper returns only the source and its sample counter, not a shuffled item
    of a source that is not a GPT dataset."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = np.zeros(len(sizes), dtype=np.int64)
    perms: dict[tuple[int, int], np.ndarray] = {}
    out = []
    for slot in range(n):
        t = int(np.argmax(w * (slot + 1) - counts))
        epoch, pos = divmod(int(counts[t]), sizes[t])
        key = (t, epoch)
        if key not in perms:
            perms[key] = np.random.default_rng([seed, t, epoch]).permutation(sizes[t])
        out.append((t, int(perms[key][pos])))
        counts[t] += 1
    return out


class MicroBatches:
    """Micro-batches for one data-parallel rank, in Megatron's order, resumable from `consumed_samples`.

    Global sample order is 0, 1, 2, ...; each global step of `micro_batch * dp_size` samples gives rank r the
    slice [r * micro_batch, (r + 1) * micro_batch). Resuming at `consumed_samples` (a multiple of the global
    micro-step) continues exactly where the previous run stopped.
    """

    def __init__(self, dataset: SemiCausalDataset, micro_batch: int, consumed_samples: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, workers: int = 0):
        step = micro_batch * dp_size
        if consumed_samples % step:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of micro_batch*dp_size {step}")
        self.dataset, self.micro_batch, self.dp_rank, self.dp_size = dataset, micro_batch, dp_rank, dp_size
        self.consumed_samples = consumed_samples
        self.workers = workers

    def batch(self, j: int) -> dict:
        """This rank's j-th micro-batch (global micro-step j), collated by the dataset's own rule if it has one."""
        first = j * self.micro_batch * self.dp_size + self.dp_rank * self.micro_batch
        samples = [self.dataset[i] for i in range(first, first + self.micro_batch)]
        return getattr(self.dataset, "collate", collate)(samples)

    def __iter__(self) -> Iterator[dict]:
        step = self.micro_batch * self.dp_size
        start, stop = self.consumed_samples // step, len(self.dataset) // step
        if self.workers:  # decoding images in DataLoader workers; each micro-batch is a function of its index
            import torch

            it = torch.utils.data.DataLoader(_Indexed(self), sampler=range(start, stop), batch_size=None,
                                             num_workers=self.workers, prefetch_factor=4, persistent_workers=False,
                                             worker_init_fn=_ignore_stop_signals)
        else:
            it = (self.batch(j) for j in range(start, stop))
        for batch in it:
            self.consumed_samples += step
            yield batch


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGINT to the training process: a scheduler or Ctrl-C signals the whole
    process group, and a worker dying of it would fail the step the trainer is about to checkpoint (the trainer
    saves, then closes its loader; a worker whose parent is gone exits by torch's own watchdog)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Indexed:
    """Map-style view of MicroBatches for torch's DataLoader: item j = micro-batch j."""

    def __init__(self, mb: "MicroBatches"):
        self.mb = mb

    def __len__(self) -> int:
        return len(self.mb.dataset) // (self.mb.micro_batch * self.mb.dp_size)

    def __getitem__(self, j: int) -> dict:
        return self.mb.batch(j)


def describe_sample(sample: dict, tokenizer, max_chars: int = 160) -> str:
    """Human-readable view of one sample: spans with their text, loss-mask counts."""
    spans = sample["spans"]
    T = len(sample["tokens"])
    lines = [f"T={T}, documents={len(np.unique(sample['document_ids'][sample['document_ids'] >= 0]))}, "
             f"spans={len(spans)}, span tokens={int(sum(e - s for s, e in spans))} "
             f"({sum(e - s for s, e in spans) / T:.1%}), counted targets={int(sample['loss_mask'].sum())}"]
    prev = 0
    for s, e in spans:
        before = tokenizer.decode(sample["tokens"][max(prev, s - 12):s])
        inside = tokenizer.decode(sample["tokens"][s:e])
        if len(inside) > max_chars:
            inside = inside[:max_chars // 2] + " ... " + inside[-max_chars // 2:]
        lines.append(f"  span [{s}, {e}) len {e - s}: ...{before!r} <<ENC {inside!r} ENC>>")
        prev = e
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.datasets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", nargs="+", required=True, help="prefix, or weight/prefix pairs (Megatron style)")
    from data_tools.tokenizer import add_tokenizer_args

    add_tokenizer_args(p)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--split", default="98,2,0", help="train,valid,test weights (by documents; Megatron style)")
    p.add_argument("--mode", choices=["sclm", "gpt"], default="sclm")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--train-samples", type=int, default=1000)
    p.add_argument("--span-length", type=int, default=DataConfig.span_length,
                   help=f"span length L (data.span_length; default {DataConfig.span_length})")
    p.add_argument("--span-coverage", type=float, default=DataConfig.span_coverage,
                   help=f"span coverage p (data.span_coverage; default {DataConfig.span_coverage})")
    p.add_argument("--show", type=int, default=2, help="samples to print")
    args = p.parse_args(argv)
    from data_tools.tokenizer import dataset_tokenizer_spec, load_tokenizer_spec, tokenizer_from_args

    if args.tokenizer_model or args.vocab_file:
        tok = tokenizer_from_args(args)
    else:  # the tokenizer preprocessing recorded beside the (first) dataset
        spec = dataset_tokenizer_spec(parse_blend(args.data_path)[0][0])
        if spec is None:
            raise UserError("--tokenizer-model: required (the dataset has no PREFIX.tokenizer.json)")
        tok = load_tokenizer_spec(spec)
    cfg = DataConfig(data_path=args.data_path, split=args.split, seq_length=args.seq_length, mode=args.mode,
                     span_length=args.span_length, span_coverage=args.span_coverage)
    from data_tools.objective import span_windows

    if args.mode == "sclm" and not len(span_windows(args.seq_length, args.span_length)):
        print(f"warning: --span-length {args.span_length} leaves no span window in --seq-length {args.seq_length} "
              f"(rows need more than 1.5 x span length + 1 tokens): every sample has spans=0, i.e. is causal only; "
              f"pass a smaller --span-length (data.span_length in training)", file=sys.stderr)
    train, valid, test = build_datasets(cfg, tok, [args.train_samples, 10, 10], seed=args.seed)
    print(f"samples: train {len(train):,}, valid {len(valid) if valid else 0:,}, test {len(test) if test else 0:,} "
          f"(seq_length {args.seq_length}, encoder row {train.cfg.enc_length})")
    for i in range(args.show):
        print(f"--- train sample {i} ---")
        print(describe_sample(train[i], tok))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))
