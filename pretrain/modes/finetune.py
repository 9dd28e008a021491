"""Finetuning mode: registry tasks -> packed rows of the batch contract (data_tools/task_rows.py), the paper's
finetuning types (which parameters train), validation accuracy and the best checkpoint (eval/callbacks.py).

    python -m pretrain.train --config finetune finetune.tasks=[spam] finetune.mode=encoder \\
        checkpoint.init_from=exported/metalm run_dir=runs/ft-spam

- **Modes** (`finetune.mode`, the paper's `ft_type`): `encoder` trains the text encoder + connector with the decoder
  frozen (MetaLM's single-task setting), `full` trains everything, `decoder` trains the decoder only (the GPT
  baseline: all its parameters). Frozen parameters have requires_grad=False: no gradients, no optimizer state
  (`engine.param_groups` leaves them out); the frozen decoder still runs with autograd on its activations because
  the encoder's gradients flow through it.
- **Placement**: a MetaLM's task input goes through the encoder (`encoder`), a GPT keeps it in the decoder
  (`causal`); training rows and validation scoring use the same one.
- **Validation**: every `logging.eval_interval` and at the end, the validation split of each task is scored with
  the evaluation scorer (`eval.score.score_items`, the run's placement, `finetune.eval_shots` demonstrations); the
  mean accuracy over tasks picks the best checkpoint: saved then and linked as `RUN/checkpoints/best`
  (`best.json` holds its step and scores; pruning never deletes it). That callback (`finetune_best`) lives in
  eval/callbacks.py, above the trainer; this mode requires it.
- **Instruction tuning**: `finetune.templates=all` renders item i of a task in its template i mod n (a mixture of
  formats), `finetune.held_out=[CLUSTER, ...]` refuses any task of those clusters (task metadata `cluster`), which
  are then scored zero-shot (`data_tools.task_rows.tuning_tasks` splits a candidate list).
- **From init_from** (`finetune.model_from_init`): the model settings (and, when the config names none, the
  tokenizer) are the source's, so `checkpoint.init_from=DIR` is all a finetuning config needs.
"""
from __future__ import annotations

import os

from pretrain.config import ConfigError
from pretrain.modes.base import Mode, train_rows

MODES = ("auto", "encoder", "full", "decoder")


def resolve_mode(mode: str, has_encoder: bool) -> str:
    if mode not in MODES:
        raise ValueError(f"finetune.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return "encoder" if has_encoder else "decoder"
    if mode == "encoder" and not has_encoder:
        raise ValueError("finetune.mode=encoder needs a model with a text encoder (this one is a GPT baseline: "
                         "use decoder or full)")
    return mode


def resolve_placement(placement: str, has_encoder: bool, mode: str) -> str:
    if placement == "auto":
        return "encoder" if has_encoder else "causal"
    if placement not in ("causal", "encoder"):
        raise ValueError(f"finetune.placement must be auto, causal or encoder, got {placement!r}")
    if placement == "encoder" and not has_encoder:
        raise ValueError("finetune.placement=encoder needs a model with a text encoder")
    if mode == "encoder" and placement == "causal":
        raise ValueError("finetune.mode=encoder with placement=causal would train parameters the data never uses")
    return placement


def trainable(name: str, mode: str) -> bool:
    """Whether parameter `name` of MetaLM trains in `mode`."""
    if mode == "full":
        return True
    if mode == "encoder":
        return name.startswith(("encoder.", "connector."))
    return name.startswith("decoder.")


def apply_mode(model, mode: str) -> dict:
    """Freeze what `mode` does not train; what the model itself freezes (an imported encoder's bottom layers,
    `model.encoder.trainable_top_layers`; a frozen vision encoder) stays frozen. Returns {"trainable": n,
    "frozen": n} parameter counts."""
    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        keep = trainable(name, mode) and not getattr(p, "frozen_by_model", False)
        p.requires_grad_(keep)
        counts["trainable" if keep else "frozen"] += p.numel()
    if counts["trainable"] == 0:
        raise ValueError(f"finetune.mode={mode}: no parameter of this model trains")
    return counts


def resolved(cfg) -> tuple[str, str]:
    """(mode, placement) of a finetuning config for its model."""
    has_enc = cfg.model.encoder is not None
    mode = resolve_mode(cfg.finetune.mode, has_enc)
    return mode, resolve_placement(cfg.finetune.placement, has_enc, mode)


class FinetuneMode(Mode):
    name = "finetune"
    required_callbacks = ("finetune_best",)

    def configure(self, cfg) -> None:
        """The source's model settings (finetune.model_from_init); packed examples get the document mask."""
        from pretrain.modes.base import model_from_init

        f, init = cfg.finetune, cfg.checkpoint.init_from
        if f.tasks and init and f.model_from_init:
            model_from_init(cfg, add_parts=False)
        if f.pack and not cfg.model.document_mask:
            cfg.model.document_mask = True  # packed examples must not see each other

    def check(self, cfg, pipeline: bool) -> None:
        """Tasks known and fetched, mode and placement fit the model."""
        from data_tools.cli import UserError
        from data_tools.tasks import get_task, task_available, task_dir

        f = cfg.finetune
        if pipeline:
            raise ConfigError("finetune.tasks: finetuning is not available under pipeline parallelism "
                              "(parallel.pp=1)")
        try:
            tasks = [get_task(t, data_dir=f.data_dir) for t in f.tasks]
            resolved(cfg)
            from data_tools.task_rows import check_held_out

            check_held_out(tasks, f.held_out)
            if f.templates not in ("first", "all"):
                raise ValueError(f"finetune.templates must be first or all, got {f.templates!r}")
        except (UserError, ValueError) as e:
            raise ConfigError(f"finetune: {e}") from None
        for task in tasks:
            if task.source != "files":  # a built-in task: fetched under finetune.data_dir
                train = os.path.join(task_dir(f.data_dir, task.name), "train.jsonl")
                if not os.path.isfile(train):
                    raise ConfigError(f"finetune.data_dir: {train} not found (run `python -m data_tools.tasks "
                                      f"fetch --name {task.name} --out {f.data_dir}`)")
            elif (why := task_available(f.data_dir, task)) is not None:  # a task file: its own data, read, checked
                raise ConfigError(f"finetune.tasks: {why}")

    def absolute_paths(self, cfg) -> None:
        from data_tools.task_files import is_task_file

        cfg.finetune.data_dir = os.path.abspath(cfg.finetune.data_dir)
        cfg.finetune.tasks = [os.path.abspath(t) if is_task_file(t) else t for t in cfg.finetune.tasks]

    def build_data(self, cfg, tokenizer, dp: int):
        """Task rows; validation is accuracy (the finetune_best callback), not perplexity."""
        from data_tools.task_rows import build_task_rows
        from pretrain.modes.text import encoder_aligner

        f = cfg.finetune
        rows = build_task_rows(f.tasks, f.data_dir, tokenizer, cfg.data.seq_length, train_rows(cfg, dp),
                               resolved(cfg)[1], cfg.seed, f.max_items, f.weights, f.pack,
                               encoder_aligner(cfg, tokenizer), f.templates, f.held_out)
        return rows, {}

    def prepare_model(self, cfg, model, train_ds, tokenizer) -> str:
        mode, placement = resolved(cfg)
        counts = apply_mode(model, mode)
        return (f"finetuning {', '.join(cfg.finetune.tasks)}: mode {mode} ({counts['trainable'] / 1e6:.2f}M "
                f"trainable, {counts['frozen'] / 1e6:.2f}M frozen parameters), {placement} placement, "
                f"{train_ds.examples_drawn:,} examples in {len(train_ds):,} rows")
