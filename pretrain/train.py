"""Pretrain a MetaLM (or its GPT baseline) under DeepSpeed.

    python -m pretrain.train --config configs/tiny.yaml [dotted.key=value ...]
    python -m pretrain.launch --nproc-per-node 2 -- --config configs/tiny.yaml parallel.deepspeed=zero2

Reads top to bottom: `train()` sets up and loops over `train_step()`, which runs `forward_backward()` per
micro-batch. Reporting, validation and checkpointing hang off the loop. A checkpoint is saved every
`checkpoint.save_interval` steps, at the end, and on SIGTERM/SIGINT (then the run exits 0). A non-finite loss skips
its micro-batch on every rank (the flag is all-reduced) and is counted; a step with any such micro-batch is bad, and
`max_bad_steps` bad steps in a row (or that many non-finite micro-batches in a row inside one step) stop the run with
exit 3, the last good checkpoint kept. A watchdog thread (pretrain/watchdog.py) ends a rank whose step, save or
evaluation outlives `parallel.step_timeout_s` (exit 4).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import ConfigError, TrainConfig, config_to_dict, load_config


class TrainingAborted(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    skipped: int = 0
    bad_in_row: int = 0  # non-finite micro-batches in a row
    bad_steps_in_row: int = 0  # optimizer steps in a row that had a non-finite micro-batch
    best_metric: float = float("-inf")  # finetuning: best mean validation accuracy so far
    best_step: int = -1


# ---------------------------------------------------------------- set-up
def validate(cfg: TrainConfig, world: int) -> None:
    """Checks that need the world size and the files; config types/values were checked when loading."""
    p, m = cfg.parallel, cfg.model
    for name, value in (("parallel.micro_batch", p.micro_batch), ("parallel.grad_accum", p.grad_accum),
                        ("parallel.tp", p.tp), ("parallel.pp", p.pp),
                        ("schedule.train_steps", cfg.schedule.train_steps)):
        if value < 1:
            raise ConfigError(f"{name}={value}: must be at least 1")
    try:
        os.makedirs(cfg.run_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir={cfg.run_dir}: cannot be created ({e.strerror})") from None
    if not os.access(cfg.run_dir, os.W_OK):
        raise ConfigError(f"run_dir={cfg.run_dir}: not writable")
    if p.pp > m.decoder.layers:
        raise ConfigError(f"parallel.pp={p.pp} exceeds model.decoder.layers={m.decoder.layers}")
    if uses_pipeline(cfg) and not m.tie_embeddings:
        raise ConfigError("parallel.pp>1 needs a model with tied embeddings (model.tie_embeddings=true)")
    if m.vision is not None and not cfg.data.image_path and not cfg.finetune.tasks:
        raise ConfigError("model.vision is set but data.image_path is empty: a vision-language model trains on "
                          "image-text data (python -m data_tools.images fetch ...)")
    if cfg.data.image_path and m.vision is None:
        raise ConfigError("data.image_path is set but the model has no vision encoder (model.preset=tiny-vl, or "
                          "model.vision=...)")
    if cfg.data.image_path and not 0 < cfg.data.image_fraction <= 1:
        raise ConfigError(f"data.image_fraction={cfg.data.image_fraction}: expected a share in (0, 1]")
    if world % (p.tp * p.pp):
        raise ConfigError(f"parallel: world size {world} is not divisible by tp*pp = {p.tp * p.pp}")
    stacks = [("model.decoder", m.decoder)] + ([("model.encoder", m.encoder)] if m.encoder else [])
    for name, s in stacks:
        if s.heads % p.tp:
            raise ConfigError(f"{name}.heads={s.heads} is not divisible by parallel.tp={p.tp}")
        if s.kv_heads % p.tp:
            raise ConfigError(f"{name}.kv_heads={s.kv_heads} is not divisible by parallel.tp={p.tp} (each rank "
                              "holds whole key/value groups)")
        if s.ffn_hidden % p.tp:
            raise ConfigError(f"{name}.ffn_hidden={s.ffn_hidden} is not divisible by parallel.tp={p.tp}")
    if m.vocab_size % p.tp:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp}")
    if cfg.data.seq_length > m.max_seq_length:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} exceeds model.max_seq_length={m.max_seq_length}")
    if not cfg.data.data_path and not cfg.finetune.tasks:
        raise ConfigError("data.data_path: required (a dataset prefix, or weight/prefix pairs)")
    if cfg.finetune.tasks:
        from pretrain.finetune import validate_config

        validate_config(cfg, uses_pipeline(cfg))
    d = cfg.data
    for key in ("tokenizer_model", "vocab_file", "merge_file"):
        path = getattr(d, key)
        if path and not os.path.exists(path):
            raise ConfigError(f"data.{key}: not found: {path}")
    from pretrain.engine import deepspeed_config

    deepspeed_config(cfg, world // (p.tp * p.pp))  # the DeepSpeed JSON exists and agrees with the config
    if cfg.optimizer.loss_normalization == "per_token" and uses_pipeline(cfg):
        raise ConfigError("optimizer.loss_normalization=per_token: not available under pipeline parallelism "
                          "(DeepSpeed's pipeline schedule averages the micro-batch losses itself)")
    if cfg.logging.downstream_tasks and uses_pipeline(cfg):
        raise ConfigError("logging.downstream_tasks: in-loop downstream evaluation is not available under pipeline "
                          "parallelism (score a consolidated checkpoint with python -m eval.score instead)")
    mode = data_mode(cfg)
    if mode == "sclm" and m.encoder is None and not cfg.finetune.tasks:
        raise ConfigError("data.mode=sclm needs model.encoder (a GPT baseline trains with data.mode=gpt)")


def resolve_tokenizer(cfg: TrainConfig):
    """The run's tokenizer: the one `data.tokenizer_*` names, else the one preprocessing recorded beside the first
    dataset (PREFIX.tokenizer.json). A dataset recorded with another tokenizer (other vocabulary size, or other
    end-of-document / eos / bos id) is refused. The resolved type, files and eod id are written back into
    cfg.data, so the config saved with the run and its checkpoints names the tokenizer exactly."""
    from data_tools.cli import UserError
    from data_tools.datasets import parse_blend
    from data_tools.tokenizer import (dataset_tokenizer_spec, from_data_config, load_tokenizer_spec,
                                      write_to_data_config)

    d = cfg.data
    prefixes, _ = parse_blend(d.data_path) if d.data_path else ([], None)
    try:
        recorded = [(p, s) for p in prefixes if (s := dataset_tokenizer_spec(p)) is not None]
        if d.tokenizer_model or d.vocab_file:
            tok = from_data_config(d)
        elif recorded:
            tok = load_tokenizer_spec(recorded[0][1])
        else:
            raise ConfigError("data.tokenizer_model: required (the datasets have no PREFIX.tokenizer.json naming "
                              "their tokenizer)")
    except UserError as e:
        raise ConfigError(f"data.tokenizer_*: {e}") from None
    for prefix, spec in recorded:
        ids, mine = spec.get("ids", {}), vars(tok.ids)
        diff = [f"{k} {ids[k]} vs {mine[k]}" for k in ("eod", "eos", "bos") if k in ids and ids[k] != mine[k]]
        if spec.get("vocab_size") not in (None, tok.vocab_size):
            diff.append(f"vocabulary {spec['vocab_size']} vs {tok.vocab_size}")
        if diff:
            raise ConfigError(f"dataset {prefix} was made with another tokenizer ({spec.get('type')} "
                              f"{spec.get('model') or spec.get('vocab_file')}) than the configured one "
                              f"({tok.describe()}): {', '.join(diff)}")
    write_to_data_config(tok, d)
    return tok


def absolute_paths(cfg: TrainConfig) -> None:
    """Resolve the file paths of the config against the current directory, so the config saved with the run and its
    checkpoints still points at them from anywhere (conversion, evaluation, resume from another directory)."""
    d = cfg.data
    for key in ("tokenizer_model", "vocab_file", "merge_file"):
        if getattr(d, key):
            setattr(d, key, os.path.abspath(getattr(d, key)))
    from data_tools.datasets import parse_blend  # the one reader of Megatron's `prefix | w1 p1 w2 p2 ...` form

    if d.data_path:
        prefixes, weights = parse_blend(d.data_path)
        prefixes = [os.path.abspath(p) for p in prefixes]
        d.data_path = prefixes if weights is None else [x for wp in zip(weights, prefixes) for x in wp]
    if cfg.finetune.tasks:
        cfg.finetune.data_dir = os.path.abspath(cfg.finetune.data_dir)
    if d.cache_dir:
        d.cache_dir = os.path.abspath(d.cache_dir)
    if cfg.checkpoint.init_from:
        cfg.checkpoint.init_from = os.path.abspath(cfg.checkpoint.init_from)
    if cfg.logging.downstream_tasks:
        cfg.logging.downstream_data = os.path.abspath(cfg.logging.downstream_data)
    if cfg.data.image_path:
        from data_tools.image_text import parse_image_path

        dirs, weights = parse_image_path(cfg.data.image_path)
        for d in dirs:
            if not os.path.isfile(os.path.join(d, "meta.json")):
                raise ConfigError(f"data.image_path: {d} is not a fetched image dataset (no meta.json; "
                                  "python -m data_tools.images fetch --name NAME --out DIR)")
        cfg.data.image_path = [os.path.abspath(d) for d in dirs] if not weights else [
            x for w, d in zip(weights, dirs) for x in (w, os.path.abspath(d))]
    cfg.run_dir = os.path.abspath(cfg.run_dir)


def uses_pipeline(cfg: TrainConfig) -> bool:
    return cfg.parallel.pp > 1 or cfg.parallel.pipeline_engine


def data_mode(cfg: TrainConfig) -> str:
    if cfg.data.mode == "auto":
        return "sclm" if cfg.model.encoder is not None else "gpt"
    if cfg.data.mode not in ("sclm", "gpt"):
        raise ConfigError(f"data.mode: expected auto, sclm or gpt, got {cfg.data.mode!r}")
    return cfg.data.mode


def build_data(cfg: TrainConfig, tokenizer, dp_size: int):
    from data_tools.datasets import build_datasets

    d = cfg.data
    global_batch = cfg.parallel.micro_batch * cfg.parallel.grad_accum * dp_size
    # room for skipped micro-batches (a non-finite loss consumes its micro-batch)
    n_train = (cfg.schedule.train_steps + cfg.max_bad_steps + 1) * global_batch
    if cfg.finetune.tasks:  # task rows; validation is accuracy (pretrain.finetune.Validation), not perplexity
        from pretrain.finetune import build_task_rows, resolve_mode, resolve_placement

        has_enc = cfg.model.encoder is not None
        placement = resolve_placement(cfg.finetune.placement, has_enc, resolve_mode(cfg.finetune.mode, has_enc))
        return build_task_rows(cfg, tokenizer, n_train, placement), {}
    n_evals = cfg.schedule.train_steps // max(1, cfg.logging.eval_interval) + 2
    n_valid = cfg.logging.eval_iters * cfg.parallel.micro_batch * dp_size if cfg.logging.eval_iters else 0
    if d.image_path:
        return build_vl_data(cfg, tokenizer, n_train, n_valid if n_evals else 0)
    train_ds, valid_ds, _ = build_datasets(text_data_config(cfg), tokenizer, [n_train, n_valid if n_evals else 0, 0])
    return train_ds, valid_sets(valid_ds)


def text_data_config(cfg: TrainConfig):
    from data_tools.datasets import DataConfig

    d = cfg.data
    return DataConfig(data_path=d.data_path, split=d.split, seq_length=d.seq_length, seed=cfg.seed,
                      mode=data_mode(cfg), span_length=d.span_length, span_coverage=d.span_coverage,
                      max_spans=d.max_spans, reset_position_ids=d.reset_position_ids, cache_dir=d.cache_dir or None)


def build_vl_data(cfg: TrainConfig, tokenizer, n_train: int, n_valid: int):
    """The image-text / text mixture (data_tools/image_text.py) and its validation sets: `valid` (text, causal
    view) and `valid_sclm` as for text runs, `valid_image` (the caption loss on the image datasets' validation
    split)."""
    from data_tools.datasets import build_datasets
    from data_tools.image_text import ImageSampleConfig, ImageTextDataset, MixedRows, image_rows, parse_image_path

    d, m, mb = cfg.data, cfg.model, cfg.parallel.micro_batch
    k = image_rows(d.image_fraction, mb)
    dirs, weights = parse_image_path(d.image_path)
    n_img = n_train // mb * k
    try:  # no train rows, a source without classes for vqa, a tokenizer without <image>, a bad image_task
        icfg = ImageSampleConfig(seq_length=d.seq_length, image_size=m.vision.image_size, slots=m.image_slots(),
                                 patches=m.vision.patches, seed=cfg.seed,
                                 task=d.image_task[0] if len(d.image_task) == 1 else tuple(d.image_task),
                                 images_per_sample=d.images_per_sample, caption_prefix=m.vision.caption_prefix)
        images = ImageTextDataset(dirs, weights, "train", icfg, tokenizer, n_img)
        valid_images = ImageTextDataset(dirs, weights, "validation", icfg, tokenizer, n_valid) if n_valid else None
    except ValueError as e:
        raise ConfigError(f"data.image_path: {e}") from None
    text, valid = None, {}
    if k < mb:
        if not d.data_path:
            raise ConfigError(f"data.image_fraction={d.image_fraction} leaves {mb - k} text row(s) per micro-batch "
                              "but data.data_path is empty (image_fraction=1.0 trains on images only)")
        n_text = n_train // mb * (mb - k)
        text, valid_ds, _ = build_datasets(text_data_config(cfg), tokenizer, [n_text, n_valid, 0])
        valid = valid_sets(valid_ds)
    if valid_images is not None:
        valid["valid_image"] = valid_images
    if dist.get_rank() == 0:
        print(f"data: {k} image-text row(s) + {mb - k} text row(s) per micro-batch (data.image_fraction="
              f"{d.image_fraction} -> {k / mb:.3f}); image sources {', '.join(os.path.basename(x) for x in dirs)}")
    return MixedRows(images, text, mb, k), valid


def valid_sets(valid_ds) -> dict:
    """Validation sets by metric prefix. `valid` is always the plain causal-LM view (no spans, every target
    counted), so perplexities of a MetaLM and its GPT baseline compare; a semi-causal run also reports its own
    objective on the same samples as `valid_sclm`."""
    import dataclasses

    from data_tools.datasets import SemiCausalDataset

    if valid_ds is None:
        return {}
    sets = {"valid": SemiCausalDataset(valid_ds.gpt, dataclasses.replace(valid_ds.cfg, mode="gpt"))}
    if valid_ds.cfg.mode == "sclm":
        sets["valid_sclm"] = valid_ds
    return sets


def init_weights(cfg: TrainConfig, model) -> TrainState | None:
    """Load a consolidated directory into this rank's (TP-sliced, pipeline-stage) model; returns the training
    position when the directory came from `pretrain.convert reshard`."""
    from megatron.core import parallel_state

    from pretrain.model_io import load_into, read_model

    src_cfg, sd, info = read_model(cfg.checkpoint.init_from)
    load_into(model, sd, parallel_state.get_tensor_model_parallel_rank(), cfg.parallel.tp,
              pipeline_layers=cfg.model.decoder.layers if uses_pipeline(cfg) else 0)
    if info.get("resume_position") and "step" in info:
        p, q = cfg.parallel, src_cfg.parallel
        world = dist.get_world_size()
        new_gb = p.micro_batch * p.grad_accum * world // (p.tp * p.pp)
        old_gb = (q.micro_batch * q.grad_accum * int(info["world_size"]) // (q.tp * q.pp)
                  if info.get("world_size") else None)
        if old_gb is not None and old_gb != new_gb and dist.get_rank() == 0:
            print(f"warning: the global batch changes from {old_gb} to {new_gb} samples at step {info['step']}: the "
                  f"data continues after sample {info['consumed_samples']}, the LR schedule by steps (so each step "
                  "now sees a different number of samples)", file=sys.stderr)
        return TrainState(step=int(info["step"]), consumed_samples=int(info["consumed_samples"]),
                          skipped=int(info.get("skipped", 0)))
    return None


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- the loop
class StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the end of the current step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        return any_rank(self.requested)


def any_rank(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_backward(engine, batch, inject: bool = False, scale: float = 1.0) -> float | None:
    """One micro-batch; returns its (mean) loss, or None when it was non-finite on any rank (then nothing is
    applied). `scale` multiplies what is back-propagated (per-token normalisation, see train_step)."""
    loss = engine(batch)
    if inject:
        loss = loss * float("nan")
    if any_rank(not torch.isfinite(loss).item()):
        return None
    engine.backward(loss * scale if scale != 1.0 else loss)
    engine.step()
    return loss.item()


def train_step(cfg: TrainConfig, engine, batches, state: TrainState, device) -> dict:
    if uses_pipeline(cfg):
        return pipeline_train_step(cfg, engine, batches, state)
    losses, counts = [], []
    fi = cfg.fault_injection  # tests: poison the first `nan_count` micro-batches of the listed steps on rank 0
    poisoned = fi.get("nan_count", 1) if state.step + 1 in fi.get("nan_at_steps", ()) else 0
    bad_before = state.skipped
    # per-token normalisation (optimizer.loss_normalization=per_token, Megatron's calculate_per_token_loss): every
    # counted target of the step weighs the same, whichever micro-batch or rank it is in. DeepSpeed divides by the
    # accumulation steps and averages over data-parallel ranks; scaling micro-batch i's mean loss by n_i * GA * DP / N
    # (N: the step's counted targets, all ranks) makes the applied gradient that of sum(token losses) / N.
    pending, scale_per_target = [], 0.0
    if cfg.optimizer.loss_normalization == "per_token":
        from megatron.core import parallel_state

        pending = [next(batches) for _ in range(cfg.parallel.grad_accum)]
        n = torch.tensor([sum(float(b["loss_mask"].sum()) for b in pending)], dtype=torch.float64)
        dist.all_reduce(n, group=parallel_state.get_data_parallel_group())
        total = max(n.item(), 1.0)
        scale_per_target = cfg.parallel.grad_accum * dp_world() / total
    while len(losses) < cfg.parallel.grad_accum:
        batch = to_device(pending.pop(0) if pending else next(batches), device)
        count = float(batch["loss_mask"].sum())
        loss = forward_backward(engine, batch, inject=poisoned > 0 and dist.get_rank() == 0,
                                scale=count * scale_per_target if scale_per_target else 1.0)
        poisoned -= 1
        state.consumed_samples += cfg.parallel.micro_batch * dp_world()
        if loss is None:  # skipped on every rank; the next micro-batch takes its place
            state.skipped += 1
            state.bad_in_row += 1
            if state.bad_in_row >= cfg.max_bad_steps:
                raise TrainingAborted(f"{state.bad_in_row} non-finite losses in a row (max_bad_steps="
                                      f"{cfg.max_bad_steps}); stopping, last good checkpoint kept")
            continue
        state.bad_in_row = 0
        losses.append(loss)
        counts.append(count)
    state.step += 1
    state.bad_steps_in_row = state.bad_steps_in_row + 1 if state.skipped > bad_before else 0
    if state.bad_steps_in_row >= cfg.max_bad_steps:
        raise TrainingAborted(f"{state.bad_steps_in_row} steps in a row had a non-finite loss (max_bad_steps="
                              f"{cfg.max_bad_steps}, last at step {state.step}); stopping, last good checkpoint kept")
    if scale_per_target:  # the per-token mean over the step (all data-parallel ranks)
        from megatron.core import parallel_state

        t = torch.tensor([sum(l * c for l, c in zip(losses, counts)), sum(counts)], dtype=torch.float64)
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
        return {"loss": (t[0] / t[1].clamp(min=1)).item()}
    mean = torch.tensor([float(np.mean(losses))])
    dist.all_reduce(mean)
    return {"loss": mean.item() / dist.get_world_size()}


def pipeline_train_step(cfg: TrainConfig, engine, batches, state: TrainState) -> dict:
    """DeepSpeed's pipeline schedule runs all micro-batches of the step and applies the update itself, so a
    non-finite loss cannot be skipped here: it stops the run at once (the last good checkpoint is kept)."""
    loss = float(engine.train_batch(data_iter=batches))
    state.consumed_samples += cfg.parallel.micro_batch * cfg.parallel.grad_accum * dp_world()
    if not math.isfinite(loss):
        raise TrainingAborted(f"non-finite loss at step {state.step + 1} under pipeline parallelism (the update "
                              "was already applied); stopping, last good checkpoint kept")
    state.step += 1
    return {"loss": loss}


def dp_world() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


@torch.no_grad()
def validate_all(run) -> dict:
    out = {}
    for name, ds in run.valid_ds.items():
        out[f"{name}_loss"], out[f"{name}_ppl"] = evaluate(run.engine, ds, run.cfg, run.device)
    return out


def downstream_eval(run) -> None:
    """In-loop zero/few-shot scoring (eval.downstream), logged beside validation."""
    if run.downstream is not None:
        shard = run.engine.zero_optimization_stage() != 3
        run.reporter.downstream(run.state.step, run.downstream.run(run.engine.module, shard))


def finetune_eval(run) -> bool:
    """Finetuning: validation accuracy; a new best is saved now and linked as checkpoints/best (whether it saved)."""
    if run.finetune is None:
        return False
    from pretrain.finetune import keep_best

    return keep_best(run, save)


def evaluate(engine, valid_ds, cfg: TrainConfig, device) -> tuple[float, float]:
    """Token-weighted mean loss over `eval_iters` micro-batches of a validation set, and its perplexity."""
    from data_tools.datasets import MicroBatches
    from megatron.core import parallel_state
    from pretrain.model.metalm import token_losses

    it = MicroBatches(valid_ds, cfg.parallel.micro_batch, 0, parallel_state.get_data_parallel_rank(), dp_world())
    if uses_pipeline(cfg):  # mean of micro-batch means, over eval_iters // grad_accum pipeline batches
        from pretrain.pipeline import input_keys, pipeline_batches

        data = pipeline_batches(it, input_keys(cfg.model))
        n = max(1, cfg.logging.eval_iters // cfg.parallel.grad_accum)
        loss = float(np.mean([float(engine.eval_batch(data_iter=data)) for _ in range(n)]))
        return loss, math.exp(min(loss, 50.0))
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for _, batch in zip(range(cfg.logging.eval_iters), it):
        batch = to_device(batch, device)
        losses = token_losses(engine.module.logits(batch), batch["labels"])
        mask = batch["loss_mask"].float()
        total += torch.tensor([(losses * mask).sum().item(), mask.sum().item()], dtype=torch.float64)
    engine.train()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    loss = (total[0] / total[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50.0))


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""
    cfg: TrainConfig
    engine: object
    tokenizer: object
    train_ds: object
    valid_ds: dict  # metric prefix -> validation set (see valid_sets)
    batches: object
    state: TrainState
    reporter: object
    ckpt_dir: str
    config_yaml: str
    resumed_step: int  # the step of the checkpoint resumed from (-1: none)
    device: object
    downstream: object = None  # eval.downstream.Downstream when logging.downstream_tasks is set
    finetune: object = None  # pretrain.finetune.Validation when finetune.tasks is set


def setup(cfg: TrainConfig) -> Run:
    """Process groups, data, model, DeepSpeed engine, and the training position (resume or init_from)."""
    from pretrain import checkpoint
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed(timeout_s=cfg.parallel.timeout_s)
    world, rank = dist.get_world_size(), dist.get_rank()
    from pretrain.finetune import settings_from_init

    settings_from_init(cfg)
    validate(cfg, world)
    absolute_paths(cfg)
    init_model_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.seed)
    seed_everything(cfg.seed)
    import yaml

    from data_tools.datasets import MicroBatches
    from megatron.core import parallel_state
    from pretrain.engine import build_engine
    from pretrain.metrics import Reporter
    from pretrain.model.metalm import MetaLM

    tokenizer = resolve_tokenizer(cfg)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ({tokenizer.describe()})")
    dp = dp_world()
    d = cfg.data
    if d.max_spans and data_mode(cfg) == "sclm" and rank == 0:
        from data_tools.objective import SpanConfig, reached_coverage

        spans = SpanConfig(d.span_length, d.span_coverage, d.max_spans)
        reached = reached_coverage(spans, d.seq_length)
        if reached < 0.95 * reached_coverage(SpanConfig(d.span_length, d.span_coverage), d.seq_length):
            print(f"warning: data.max_spans={d.max_spans} binds: span coverage {reached:.3f} instead of about "
                  f"{d.span_coverage} (seq_length {d.seq_length}, span_length {d.span_length}); 0 = no cap",
                  file=sys.stderr)
    train_ds, valid_ds = build_data(cfg, tokenizer, dp)
    if uses_pipeline(cfg):
        from pretrain.pipeline import build_pipeline_module

        model = build_pipeline_module(cfg.model, cfg.parallel.pp, cfg.parallel.tp, dp, cfg.seed)
    else:
        model = MetaLM(cfg.model)
    ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
    say = print if rank == 0 else (lambda *a, **k: None)
    # rank 0 picks the checkpoint (verifying its checksums: one read of it) and tells the others
    pick = [checkpoint.find_resume(ckpt_dir, cfg.checkpoint.resume, log=say, checksums=cfg.checkpoint.checksums)
            if rank == 0 else None]
    dist.broadcast_object_list(pick, src=0)
    resume_from = pick[0]
    if resume_from and (why := checkpoint.layout_mismatch(resume_from, config_to_dict(cfg), world)):
        raise ConfigError(f"checkpoint.resume: {why}")
    state = TrainState()
    if resume_from is None and cfg.checkpoint.init_from:
        state = init_weights(cfg, model) or state
        say(f"initialised from {cfg.checkpoint.init_from} at step {state.step}")
    ft, ft_msg = None, ""
    if cfg.finetune.tasks:  # freeze what the mode does not train, before the optimizer sees the parameters
        from pretrain.finetune import prepare

        ft, ft_msg = prepare(cfg, model, train_ds, tokenizer)
    engine = build_engine(cfg, model, dp, pipeline=uses_pipeline(cfg))
    if state.step:  # a resharded checkpoint: continue its LR schedule too
        engine.lr_scheduler.last_epoch = state.step - 1
        engine.lr_scheduler.step()
    if resume_from:
        state = TrainState(**checkpoint.load(engine, resume_from)["state"])
        say(f"resumed from {resume_from} at step {state.step} ({state.consumed_samples} samples consumed)")
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)
    rep = Reporter(cfg.run_dir, cfg.schedule.train_steps, state.step, cfg.logging.log_interval,
                   cfg.logging.tensorboard, cfg.logging.progress_bar, enabled=rank == 0)
    counts = cfg.model.param_count()
    frozen = (f" ({counts['vision'] / 1e6:.2f}M in the frozen vision encoder: no gradients, no optimizer state)"
              if cfg.model.vision is not None and cfg.model.freeze_vision else "")
    rep.log(f"model: {counts['total'] / 1e6:.1f}M parameters{frozen} | world {world} (dp {dp}, "
            f"tp {cfg.parallel.tp}, pp {cfg.parallel.pp}) | {cfg.parallel.deepspeed} | {cfg.parallel.precision} | "
            f"data mode {'finetune' if cfg.finetune.tasks else data_mode(cfg)} | train samples {len(train_ds):,} | "
            f"global batch "
            f"{cfg.parallel.micro_batch * cfg.parallel.grad_accum * dp} x {cfg.data.seq_length} tokens")
    if ft_msg:
        rep.log(ft_msg)
    # The global sample order is fixed; this rank reads its slice of each global micro-step.
    batches = iter(MicroBatches(train_ds, cfg.parallel.micro_batch, state.consumed_samples,
                                parallel_state.get_data_parallel_rank(), dp, workers=cfg.data.workers))
    if uses_pipeline(cfg):
        from pretrain.pipeline import input_keys, pipeline_batches

        batches = pipeline_batches(batches, input_keys(cfg.model))
    resumed_step = int(os.path.basename(resume_from)[len("step_"):]) if resume_from else -1
    downstream = None
    if cfg.logging.downstream_tasks:
        from eval.downstream import Downstream

        downstream = Downstream(cfg, engine.module, tokenizer)
    return Run(cfg, engine, tokenizer, train_ds, valid_ds, batches, state, rep, ckpt_dir, config_yaml,
               resumed_step, engine.device, downstream, ft)


def save(run: Run) -> None:
    from pretrain import checkpoint

    if run.cfg.fault_injection.get("slow_save_s"):  # tests: a save that outlives the preemption grace
        time.sleep(float(run.cfg.fault_injection["slow_save_s"]))

    checkpoint.save(run.engine, run.ckpt_dir, run.state.step, {"state": vars(run.state).copy()}, run.config_yaml,
                    run.cfg.checkpoint.keep_last, log=run.reporter.log, checksums=run.cfg.checkpoint.checksums)


def every(interval: int, step: int) -> bool:
    return bool(interval) and step % interval == 0


def timed_step(run: Run) -> dict:
    """One optimizer step and its metrics."""
    cfg, state, engine = run.cfg, run.state, run.engine
    fi = cfg.fault_injection
    if fi.get("die_at_step") == state.step + 1 and dist.get_rank() == fi.get("die_rank", 0):
        os.kill(os.getpid(), signal.SIGKILL)  # tests: a rank dying mid-run
    t0 = time.perf_counter()
    skipped_before = state.skipped
    m = train_step(cfg, engine, run.batches, state, run.device)
    dt = time.perf_counter() - t0
    if state.skipped > skipped_before:
        run.reporter.log(f"step {state.step}: {state.skipped - skipped_before} micro-batch(es) with a non-finite "
                         f"loss skipped ({state.skipped} so far)")
    gn = engine.get_global_grad_norm()
    tokens = cfg.parallel.micro_batch * cfg.parallel.grad_accum * dp_world() * cfg.data.seq_length
    m.update(lr=engine.get_lr()[0], grad_norm=float(gn) if gn is not None else float("nan"), tokens_per_s=tokens / dt,
             step_s=dt, samples_per_s=cfg.parallel.micro_batch * cfg.parallel.grad_accum * dp_world() / dt,
             skipped=state.skipped, consumed_samples=state.consumed_samples)
    if torch.cuda.is_available():
        m["mfu"] = (m["tokens_per_s"] * cfg.model.flops_per_token(cfg.data.seq_length)
                    / (dist.get_world_size() * cfg.logging.peak_tflops * 1e12))
    return m


def train(cfg: TrainConfig) -> dict:
    """Train to `schedule.train_steps`; returns the last metrics (and the engine and tokenizer). A watchdog
    (pretrain/watchdog.py) ends the rank when a phase of the loop outlives `parallel.step_timeout_s`."""
    from pretrain.watchdog import Watchdog

    run = setup(cfg)
    state, rep = run.state, run.reporter
    stop = StopFlag()
    wd = Watchdog(cfg.run_dir, dist.get_rank(), dist.get_world_size(), cfg.parallel.step_timeout_s,
                  cfg.parallel.step_timeout_floor_s)
    last: dict = {}
    saved_at = -1
    step_tokens = cfg.parallel.micro_batch * cfg.parallel.grad_accum * dp_world() * cfg.data.seq_length
    try:
        while state.step < cfg.schedule.train_steps:
            wd.enter("train step", state.step + 1)
            last = timed_step(run)
            wd.step_done(last["step_s"])
            rep.step(state.step, last, tokens=step_tokens)
            best_saved = False
            if every(cfg.logging.eval_interval, state.step):
                wd.enter("evaluation", state.step)
                if run.valid_ds:
                    rep.valid(state.step, validate_all(run))
                downstream_eval(run)
                best_saved = finetune_eval(run)
            saved = every(cfg.checkpoint.save_interval, state.step) or best_saved
            if saved and not best_saved:
                wd.enter("checkpoint save", state.step)
                save(run)
            if saved:
                saved_at = state.step
            wd.enter("stop check", state.step)
            if stop.agreed():
                rep.log(f"stop requested: saving at step {state.step} and exiting")
                if not saved:
                    wd.enter("checkpoint save", state.step)
                    save(run)
                rep.close()
                return {"stopped": True, **last}
        result = dict(last)
        if not every(cfg.logging.eval_interval, state.step):
            wd.enter("evaluation", state.step)
            if run.valid_ds and cfg.logging.eval_iters:
                result.update(validate_all(run))
                rep.valid(state.step, result)
            downstream_eval(run)
            if finetune_eval(run):
                saved_at = state.step
        if saved_at != state.step and state.step > run.resumed_step:
            wd.enter("checkpoint save", state.step)
            save(run)
    except TrainingAborted as e:
        rep.log(f"error: {e}")
        rep.close()
        raise
    finally:
        wd.close()
    rep.close()
    result["engine"] = run.engine
    result["tokenizer"] = run.tokenizer
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file, or the name of a shipped one (tiny-cpu: configs/tiny-cpu.yaml)")
    p.add_argument("--generate", default="", help="after training, print a greedy continuation of this prompt")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed runner; LOCAL_RANK in the environment is used
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. model.decoder.layers=8")
    return p


def report_exit(code: int) -> int:
    """Leave this rank's exit status where pretrain.launch looks (METALM_STATUS_DIR), so the launcher can exit with
    the workers' own status (2 config, 3 stopped, 4 watchdog) instead of torchrun's generic 1."""
    status_dir = os.environ.get("METALM_STATUS_DIR")
    if status_dir and code:
        try:
            with open(os.path.join(status_dir, f"rank_{os.environ.get('RANK', '0')}"), "w") as f:
                f.write(str(code))
        except OSError:
            pass
    return code


def main(argv: Sequence[str] | None = None) -> int:
    return report_exit(_main(argv))


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted:
        return 3
    except OSError as e:  # a checkpoint or log write that failed: disk full, read-only, permissions
        print(f"error: {e.strerror or e} while writing {e.filename or 'a file'}; the last complete checkpoint is "
              "kept", file=sys.stderr)
        return 3
    except Exception as e:  # a user-facing error from the data tools (bad dataset path, ...)
        from data_tools.cli import UserError

        if isinstance(e, UserError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    if args.generate and uses_pipeline(cfg) and dist.get_rank() == 0:
        print("--generate skipped: not available under pipeline parallelism (the stages hold different layers); "
              "generate from the checkpoint with python -m eval.generate --model RUN_DIR", file=sys.stderr)
    if args.generate and "engine" in result and not uses_pipeline(cfg):
        from eval.generate import generate

        text = generate(result["engine"].module, result["tokenizer"], args.generate,
                        max_new_tokens=40, max_seq_length=cfg.model.max_seq_length)
        if dist.get_rank() == 0:
            print(f"\nprompt: {args.generate!r}\ncontinuation: {text!r}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
