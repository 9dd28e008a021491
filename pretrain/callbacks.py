"""What hangs off the training loop, as callbacks (OLMo-core's pattern): the loop in pretrain/trainer.py calls
each hook of every callback in list order; a callback reads what it needs from the trainer (`cfg`, `engine`,
`state`, `reporter`, `valid_sets`, ...).

    on_train_start(trainer)          after set-up (resume included), before the first step
    on_step_start(trainer)           before each optimizer step
    on_step_end(trainer, metrics)    after it, with the step's metrics (loss, lr, grad_norm, step_s, ...)
    on_evaluate(trainer) -> bool     at every `logging.eval_interval` and at the end; True asks for a checkpoint now
    on_save_start(trainer)           before a checkpoint is written
    on_save_end(trainer, tag)        after it is complete (tag: step_NNNNNNNN)
    on_train_end(trainer)            after the last step (not after a stop request or a failure)
    state_dict() / load_state_dict() what the callback keeps in checkpoints (under its `name`)

Here: `StepLog` (throughput, MFU, metrics.jsonl / TensorBoard / progress bar / ETA) and `ValidationLoss`. Above
the trainer, eval/callbacks.py adds in-loop downstream scoring and finetuning's best checkpoint. `from_specs` builds
the config's `callbacks` list ({path: module.Class, ...keyword arguments}): a user's own, or what tests install
(tests/fault_injection.py).
"""
from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

from pretrain.config import ConfigError


class Callback:
    name = ""  # key of its state in checkpoints; what a mode asks for in `required_callbacks`

    def on_train_start(self, trainer) -> None: ...

    def on_step_start(self, trainer) -> None: ...

    def on_step_end(self, trainer, metrics: dict) -> None: ...

    def on_evaluate(self, trainer) -> bool:
        return False

    def on_save_start(self, trainer) -> None: ...

    def on_save_end(self, trainer, tag: str) -> None: ...

    def on_train_end(self, trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class StepLog(Callback):
    """Throughput (tokens/s, samples/s), MFU on GPUs (PaLM's formula, `logging.peak_tflops`), and the step's line:
    metrics.jsonl, TensorBoard, the progress bar, `logging.log_interval` log lines with the ETA."""
    name = "step_log"

    def on_step_end(self, trainer, m: dict) -> None:
        cfg = trainer.cfg
        samples = cfg.parallel.micro_batch * cfg.parallel.grad_accum * trainer.dp
        tokens = samples * cfg.data.seq_length
        m["tokens_per_s"], m["samples_per_s"] = tokens / m["step_s"], samples / m["step_s"]
        if torch.cuda.is_available():
            m["mfu"] = (m["tokens_per_s"] * cfg.model.flops_per_token(cfg.data.seq_length)
                        / (dist.get_world_size() * cfg.logging.peak_tflops * 1e12))
        trainer.reporter.step(trainer.state.step, m, tokens=tokens)


class ValidationLoss(Callback):
    """Token-weighted loss and perplexity of each validation set the mode built (`valid`, `valid_sclm`,
    `valid_image`), over `logging.eval_iters` micro-batches."""
    name = "validation"

    def on_evaluate(self, trainer) -> bool:
        if trainer.valid_sets and trainer.cfg.logging.eval_iters:
            from pretrain.steps import validation_loss

            out = {}
            for name, ds in trainer.valid_sets.items():
                out[f"{name}_loss"], out[f"{name}_ppl"] = validation_loss(trainer.engine, ds, trainer.cfg,
                                                                           trainer.device)
            trainer.reporter.valid(trainer.state.step, out)
            trainer.last_eval.update(out)
        return False


def from_specs(specs) -> list[Callback]:
    """`callbacks: [{path: package.module.Class, arg: value, ...}, ...]` (or just the path) -> instances."""
    out = []
    for i, spec in enumerate(specs or ()):
        spec = {"path": spec} if isinstance(spec, str) else dict(spec)
        path = str(spec.pop("path", ""))
        module, _, cls = path.rpartition(".")
        try:
            factory = getattr(importlib.import_module(module), cls) if module else None
        except ImportError as e:
            raise ConfigError(f"callbacks[{i}].path={path!r}: cannot import {module} ({e})") from None
        if factory is None:
            raise ConfigError(f"callbacks[{i}].path={path!r}: expected package.module.Class")
        try:
            out.append(factory(**spec))
        except TypeError as e:
            raise ConfigError(f"callbacks[{i}] ({path}): {e}") from None
    return out
