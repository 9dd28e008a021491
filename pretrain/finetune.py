"""Finetuning as a data mode of the trainer: registry tasks -> packed rows of the batch contract, the paper's
finetuning types (which parameters train), validation accuracy and the best checkpoint.

    python -m pretrain.train --config finetune finetune.tasks=[spam] finetune.mode=encoder \\
        checkpoint.init_from=exported/metalm run_dir=runs/ft-spam

- **Samples** (`TaskRows`): each train item becomes the sequence of its correct answer, built by
  `data_tools.task_samples.build_sequences` (the same builder the scorer uses, so training and scoring see the same
  tokens): a MetaLM's task input goes through the encoder and docks into the decoder (`encoder` placement), a GPT
  keeps it in the decoder (`causal`). Only the answer tokens are targets (`loss_mask`).
- **Multitask mixing**: examples are drawn from the tasks by Megatron's blending rule (the task whose
  weight·slot − count is largest next), each task's items in a fresh seeded permutation per epoch; deterministic from
  (seed, slot), so resume needs only the number of consumed rows.
- **Packing** (T5-style, `finetune.pack`): consecutive examples fill a row of `data.seq_length` tokens, each its own
  document (document ids, positions restarting at 0, the decoder's document mask, encoder pieces in their own
  block-diagonal segments), so packed examples never see each other; no example is split across rows.
- **Modes** (`finetune.mode`, the paper's `ft_type`): `encoder` trains the text encoder + connector with the decoder
  frozen (MetaLM's single-task setting), `full` trains everything, `decoder` trains the decoder only (the GPT
  baseline: all its parameters). Frozen parameters have requires_grad=False: no gradients, no optimizer state
  (`engine.param_groups` leaves them out); the frozen decoder still runs with autograd on its activations because
  the encoder's gradients flow through it.
- **Validation**: every `logging.eval_interval` and at the end, the validation split of each task is scored with
  the evaluation scorer (`eval.score.score_items`, the run's placement, `finetune.eval_shots` demonstrations); the
  mean accuracy over tasks picks the best checkpoint: saved then and linked as `RUN/checkpoints/best`
  (`best.json` holds its step and scores; pruning never deletes it).
"""
from __future__ import annotations

import os

import numpy as np

from data_tools.datasets import blend_order

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
    """Freeze what `mode` does not train; returns {"trainable": n, "frozen": n} parameter counts."""
    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        keep = trainable(name, mode)
        p.requires_grad_(keep)
        counts["trainable" if keep else "frozen"] += p.numel()
    if counts["trainable"] == 0:
        raise ValueError(f"finetune.mode={mode}: no parameter of this model trains")
    return counts


# ---------------------------------------------------------------- data
def example_sequences(task, items: list[dict], tok, placement: str, T: int, enc_limit: int) -> list:
    """The correct-answer sequence of every item (demonstration-free), cut to fit one row."""
    from data_tools.task_samples import build_sequences

    out = []
    for it in items:
        seqs = build_sequences(task, it, [], placement, tok, T, enc_limit)
        out.append(seqs[it["label"]])
    return out


class TaskRows:
    """Rows of the batch contract from task examples (see the module docstring); `len` = rows available."""

    def __init__(self, seqs_by_task: list[list], weights: list[float], tok, T: int, num_rows: int, seed: int,
                 pack: bool = True):
        self.seqs, self.T, self.bos, self.pad = seqs_by_task, T, tok.ids.bos, tok.ids.pad
        self.rows: list[list[tuple[int, int]]] = []
        sizes = [len(s) for s in seqs_by_task]
        if min(sizes) == 0:
            raise ValueError("a finetuning task has no train items")
        draws, d = [], 0
        row, used = [], 0
        while len(self.rows) < num_rows:
            if d == len(draws):  # draw more examples as needed (deterministic: the same prefix every time)
                draws = blend_order(sizes, weights, max(2 * len(draws), 1024), seed)
            t, i = draws[d]
            n = seqs_by_task[t][i].length() - 1  # decoder inputs of the example
            if n > T:
                raise ValueError(f"a task example has {n} tokens, more than data.seq_length={T}")
            if row and (not pack or used + n > T):
                self.rows.append(row)
                row, used = [], 0
                continue
            row.append((t, i))
            used += n
            d += 1
        self.examples_drawn = d

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict:
        T = self.T
        tokens = np.full(T, self.pad, dtype=np.int64)
        labels = np.zeros(T, dtype=np.int64)
        loss_mask = np.zeros(T, dtype=np.float32)
        position_ids = np.zeros(T, dtype=np.int64)
        document_ids = np.full(T, -1, dtype=np.int32)
        enc_tokens = np.full(T, self.pad, dtype=np.int64)
        enc_positions = np.zeros(T, dtype=np.int64)
        enc_segments = np.full(T, -1, dtype=np.int32)
        dock_dst = np.full(T, -1, dtype=np.int64)
        at, j, seg = 0, 0, 0
        for doc, (t, i) in enumerate(self.rows[r]):
            s = self.seqs[t][i]
            full, slot = [self.bos], 1
            for kind, ids in s.pieces:
                if kind == "enc":  # its own encoder segment, docked into this example's slots
                    m = len(ids)
                    enc_tokens[j:j + m] = ids
                    enc_positions[j:j + m] = np.arange(m)
                    enc_segments[j:j + m] = seg
                    dock_dst[j:j + m] = at + slot + np.arange(m)
                    j += m
                    seg += 1
                full += ids
                slot += len(ids)
            start = len(full) - 1  # the input position whose label is the first answer token
            full += s.target
            n = len(full) - 1
            tokens[at:at + n], labels[at:at + n] = full[:-1], full[1:]
            loss_mask[at + start:at + n] = 1.0
            position_ids[at:at + n] = np.arange(n)
            document_ids[at:at + n] = doc
            at += n
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
                "document_ids": document_ids, "enc_tokens": enc_tokens, "enc_positions": enc_positions,
                "enc_segments": enc_segments, "dock_dst": dock_dst}


def build_task_rows(cfg, tok, num_rows: int, placement: str) -> TaskRows:
    from data_tools.tasks import get_task, load_split

    f = cfg.finetune
    tasks = [get_task(t, scored=True) for t in f.tasks]
    T = cfg.data.seq_length
    enc_limit = T  # an example (its encoder piece docked into decoder slots) fits one row, cut from the left
    seqs = []
    for task in tasks:
        items = load_split(f.data_dir, task.name, "train")
        if f.max_items:
            items = items[:f.max_items]
        seqs.append(example_sequences(task, items, tok, placement, T, enc_limit))
    weights = [float(w) for w in f.weights] if f.weights else [float(len(s)) for s in seqs]
    if len(weights) != len(tasks) or min(weights) <= 0:
        raise ValueError(f"finetune.weights: one positive weight per task expected, got {f.weights}")
    return TaskRows(seqs, weights, tok, T, num_rows, cfg.seed, f.pack)


# ---------------------------------------------------------------- validation and the best checkpoint
class Validation:
    """Validation accuracy of the live model on each finetuning task (eval.downstream's collective scorer)."""

    def __init__(self, cfg, tok, placement: str):
        from eval.downstream import Downstream

        f = cfg.finetune
        self.scorer = Downstream.for_tasks(cfg, tok, f.tasks, f.data_dir, "validation", f.eval_items,
                                           [f.eval_shots], [placement])
        self.placement, self.shots = placement, f.eval_shots

    def run(self, model, shard: bool) -> dict:
        got = self.scorer.run(model, shard)
        out = {}
        for key, v in got.items():  # down/<task>/<placement>/<k>shot/<metric>
            _, task, _, _, metric = key.split("/")
            out[f"ft/{task}/{metric}"] = v
        accs = [v for k, v in out.items() if k.endswith("/acc")]
        out["ft/mean_acc"] = float(np.mean(accs)) if accs else float("nan")
        return out


# ---------------------------------------------------------------- the trainer's hooks (pretrain/train.py)
def validate_config(cfg, pipeline: bool) -> None:
    """Finetuning settings that need the files: tasks known and fetched, mode and placement fit the model."""
    from data_tools.cli import UserError
    from data_tools.tasks import get_task, task_dir
    from pretrain.config import ConfigError

    f = cfg.finetune
    if pipeline:
        raise ConfigError("finetune.tasks: finetuning is not available under pipeline parallelism (parallel.pp=1)")
    try:
        for t in f.tasks:
            get_task(t, scored=True)
        mode = resolve_mode(f.mode, cfg.model.encoder is not None)
        resolve_placement(f.placement, cfg.model.encoder is not None, mode)
    except (UserError, ValueError) as e:
        raise ConfigError(f"finetune: {e}") from None
    for t in f.tasks:
        train = os.path.join(task_dir(f.data_dir, t), "train.jsonl")
        if not os.path.isfile(train):
            raise ConfigError(f"finetune.data_dir: {train} not found (run "
                              f"`python -m data_tools.tasks fetch --name {t} --out {f.data_dir}`)")
    if f.pack and not cfg.model.document_mask:
        cfg.model.document_mask = True  # packed examples must not see each other


def settings_from_init(cfg) -> None:
    """Finetuning from checkpoint.init_from with finetune.model_from_init: the model settings (and, when the config
    names none, the tokenizer) are the source's, so `checkpoint.init_from=DIR` is all a finetuning config needs."""
    from pretrain.config import ConfigError
    from pretrain.model_io import ConvertError, source_config

    f, init = cfg.finetune, cfg.checkpoint.init_from
    if not (f.tasks and init and f.model_from_init):
        return
    try:
        src = source_config(init)
    except ConvertError as e:
        raise ConfigError(f"checkpoint.init_from: {e}") from None
    keep = {k: getattr(cfg.model, k) for k in ("attention_backend", "activation_checkpointing", "document_mask")}
    cfg.model = src.model
    for k, v in keep.items():
        setattr(cfg.model, k, v)
    if cfg.data.tokenizer_model or cfg.data.vocab_file:
        return
    if os.path.isfile(os.path.join(init, "metalm.json")):  # a consolidated dir carries its tokenizer files
        from data_tools.tokenizer import load_from_dir, write_to_data_config

        write_to_data_config(load_from_dir(init), cfg.data)
        return
    for k in ("tokenizer_model", "tokenizer_type", "vocab_file", "merge_file", "eod_id"):
        setattr(cfg.data, k, getattr(src.data, k, getattr(cfg.data, k)))


def prepare(cfg, model, rows: TaskRows, tok) -> tuple[Validation, str]:
    """Apply the mode to the model (before the optimizer is built); the validation scorer and a log line."""
    has_enc = cfg.model.encoder is not None
    mode = resolve_mode(cfg.finetune.mode, has_enc)
    counts = apply_mode(model, mode)
    placement = resolve_placement(cfg.finetune.placement, has_enc, mode)
    msg = (f"finetuning {', '.join(cfg.finetune.tasks)}: mode {mode} ({counts['trainable'] / 1e6:.2f}M trainable, "
           f"{counts['frozen'] / 1e6:.2f}M frozen parameters), {placement} placement, "
           f"{rows.examples_drawn:,} examples in {len(rows):,} rows")
    return Validation(cfg, tok, placement), msg


def keep_best(run, save) -> bool:
    """Score the validation splits; a new best mean accuracy is saved now (`save(run)`) and linked as
    checkpoints/best. Returns whether it saved."""
    import torch.distributed as dist

    from pretrain.checkpoint import mark_best, tag_for

    shard = run.engine.zero_optimization_stage() != 3
    scores = run.finetune.run(run.engine.module, shard)
    run.reporter.finetune(run.state.step, scores)
    value = scores["ft/mean_acc"]
    if not value > run.state.best_metric:
        return False
    run.state.best_metric, run.state.best_step = value, run.state.step
    save(run)
    if dist.get_rank() == 0:
        mark_best(run.ckpt_dir, tag_for(run.state.step), run.state.step, scores)
    run.reporter.log(f"step {run.state.step}: best validation accuracy so far ({value:.4f}) -> checkpoints/best")
    return True
