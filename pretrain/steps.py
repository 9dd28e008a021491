"""The optimizer step and the validation loss: what runs between the trainer's hooks (pretrain/trainer.py).

A non-finite loss skips its micro-batch on every rank (the flag is all-reduced) and is counted; a step with any
such micro-batch is bad, and `max_bad_steps` bad steps in a row (or that many non-finite micro-batches in a row
inside one step) stop the run (TrainingAborted: exit 3, the last good checkpoint kept). Under pipeline parallelism
DeepSpeed's schedule applies the update itself, so a non-finite loss stops the run at once.
"""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pretrain.checks import uses_pipeline
from pretrain.config import TrainConfig


class TrainingAborted(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    skipped: int = 0
    bad_in_row: int = 0  # non-finite micro-batches in a row
    bad_steps_in_row: int = 0  # optimizer steps in a row that had a non-finite micro-batch


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


def forward_backward(engine, batch, scale: float = 1.0) -> float | None:
    """One micro-batch; returns its (mean) loss, or None when it was non-finite on any rank (then nothing is
    applied). `scale` multiplies what is back-propagated (per-token normalisation, see train_step)."""
    loss = engine(batch)
    if any_rank(not torch.isfinite(loss).item()):
        return None
    engine.backward(loss * scale if scale != 1.0 else loss)
    engine.step()
    return loss.item()


def train_step(cfg: TrainConfig, engine, batches, state: TrainState, device) -> dict:
    """One optimizer step over `parallel.grad_accum` micro-batches; returns {"loss": mean over the step}."""
    if uses_pipeline(cfg):
        return pipeline_train_step(cfg, engine, batches, state)
    losses, counts = [], []
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
        loss = forward_backward(engine, batch, scale=count * scale_per_target if scale_per_target else 1.0)
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
def validation_loss(engine, valid_ds, cfg: TrainConfig, device) -> tuple[float, float]:
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
