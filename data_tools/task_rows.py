"""Finetuning rows of the batch contract from registry tasks (the trainer's finetuning mode, pretrain/modes/finetune.py).

- **Samples** (`TaskRows`): each train item becomes the sequence of its correct answer, built by
  `data_tools.task_samples.build_sequences` (the same builder the scorer uses, so training and scoring see the same
  tokens): a MetaLM's task input goes through the encoder and docks into the decoder (`encoder` placement), a GPT
  keeps it in the decoder (`causal`). Only the answer tokens are targets (`loss_mask`).
- **Multitask mixing**: examples are drawn from the tasks by Megatron's blending rule (the task whose
  weight·slot − count is largest next), each task's items in a fresh seeded permutation per epoch; deterministic from
  (seed, slot), so resume needs only the number of consumed rows.
- **Packing** (T5-style): consecutive examples fill a row of T tokens, each its own document (document ids,
  positions restarting at 0, the decoder's document mask, encoder pieces in their own block-diagonal segments), so
  packed examples never see each other; no example is split across rows.
"""
from __future__ import annotations

import numpy as np

from data_tools.datasets import blend_order


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


def build_task_rows(task_names, data_dir: str, tok, T: int, num_rows: int, placement: str, seed: int,
                    max_items: int = 0, weights=None, pack: bool = True) -> TaskRows:
    """Rows of `num_rows` x `T` tokens from the train splits of the named registry tasks (fetched under
    `data_dir`); `weights` default to the tasks' sizes."""
    from data_tools.tasks import get_task, load_split

    tasks = [get_task(t, scored=True) for t in task_names]
    enc_limit = T  # an example (its encoder piece docked into decoder slots) fits one row, cut from the left
    seqs = []
    for task in tasks:
        items = load_split(data_dir, task.name, "train")
        if max_items:
            items = items[:max_items]
        seqs.append(example_sequences(task, items, tok, placement, T, enc_limit))
    weights = [float(w) for w in weights] if weights else [float(len(s)) for s in seqs]
    if len(weights) != len(tasks) or min(weights) <= 0:
        raise ValueError(f"finetune.weights: one positive weight per task expected, got {list(weights)}")
    return TaskRows(seqs, weights, tok, T, num_rows, seed, pack)
