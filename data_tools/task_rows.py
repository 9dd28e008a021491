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


def example_sequences(task, items: list[dict], tok, placement: str, T: int, enc_limit: int,
                      templates: str = "first") -> list:
    """The correct-answer sequence of every item (demonstration-free), cut to fit one row. `templates`: `first`
    (every item in the task's first template) or `all` (item i in template i mod n: instruction tuning's mixture
    of formats)."""
    from data_tools.task_samples import build_sequences

    if templates not in ("first", "all"):
        raise ValueError(f"finetune.templates must be first or all, got {templates!r}")
    n = len(task.templates) if templates == "all" else 1
    out = []
    for i, it in enumerate(items):
        seqs = build_sequences(task.using(i % n), it, [], placement, tok, T, enc_limit)
        out.append(seqs[it.get("label", 0)])  # a generative item's one "choice" is its target
    return out


class TaskRows:
    """Rows of the batch contract from task examples (see the module docstring); `len` = rows available."""

    def __init__(self, seqs_by_task: list[list], weights: list[float], tok, T: int, num_rows: int, seed: int,
                 pack: bool = True, aligner=None):
        """`aligner`: an encoder with its own tokenizer; each encoder piece is re-tokenized once here
        (data_tools/encoder_tokens.py) and rows are packed within both the decoder length and the encoder row."""
        self.seqs, self.T, self.bos, self.pad = seqs_by_task, T, tok.ids.bos, tok.ids.pad
        self.aligner = aligner
        self.Te = T
        if aligner is not None:
            from data_tools.task_samples import fit_piece

            for seqs in seqs_by_task:
                for sq in seqs:
                    fitted = [(k, *fit_piece(aligner, list(ids))) if k == "enc" else (k, list(ids), None)
                              for k, ids in sq.pieces]
                    sq.pieces = [(k, ids) for k, ids, _ in fitted]
                    sq.meta["aligned"] = [got for _, _, got in fitted]
            enc_len = [[sum(len(g[0]) for g in sq.meta["aligned"] if g is not None) for sq in seqs]
                       for seqs in seqs_by_task]
            self.Te = int(np.ceil(max([1.25 * T] + [n for lens in enc_len for n in lens]) / 64) * 64)
        self.rows: list[list[tuple[int, int]]] = []
        sizes = [len(s) for s in seqs_by_task]
        if min(sizes) == 0:
            raise ValueError("a finetuning task has no train items")
        draws, d = [], 0
        row, used, used_enc = [], 0, 0
        while len(self.rows) < num_rows:
            if d == len(draws):  # draw more examples as needed (deterministic: the same prefix every time)
                draws = blend_order(sizes, weights, max(2 * len(draws), 1024), seed)
            t, i = draws[d]
            n = seqs_by_task[t][i].length() - 1  # decoder inputs of the example
            n_enc = enc_len[t][i] if aligner is not None else 0
            if n > T:
                raise ValueError(f"a task example has {n} tokens, more than data.seq_length={T}")
            if row and (not pack or used + n > T or used_enc + n_enc > self.Te):
                self.rows.append(row)
                row, used, used_enc = [], 0, 0
                continue
            row.append((t, i))
            used += n
            used_enc += n_enc
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
        Te, own = self.Te, self.aligner is not None
        enc_tokens = np.full(Te, self.aligner.encoder_tok.pad_id if own else self.pad, dtype=np.int64)
        enc_positions = np.zeros(Te, dtype=np.int64)
        enc_segments = np.full(Te, -1, dtype=np.int32)
        dock_dst = np.full(T if own else Te, -1, dtype=np.int64)
        dock_src = np.zeros(T, dtype=np.int64)
        at, j, seg, q = 0, 0, 0, 0
        for doc, (t, i) in enumerate(self.rows[r]):
            s = self.seqs[t][i]
            full, slot = [self.bos], 1
            for p, (kind, ids) in enumerate(s.pieces):
                got = s.meta["aligned"][p] if own else (ids, np.arange(len(ids)))
                if kind == "enc" and got is not None:  # its own encoder segment, docked into this example's slots
                    e_ids, src = got
                    n, m = len(e_ids), len(ids)
                    enc_tokens[j:j + n] = e_ids
                    enc_positions[j:j + n] = np.arange(n)
                    enc_segments[j:j + n] = seg
                    if own:  # explicit pairs, one per decoder slot
                        dock_src[q:q + m] = j + src
                        dock_dst[q:q + m] = at + slot + np.arange(m)
                        q += m
                    else:
                        dock_dst[j:j + m] = at + slot + np.arange(m)
                    j += n
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
        out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
               "document_ids": document_ids, "enc_tokens": enc_tokens, "enc_positions": enc_positions,
               "enc_segments": enc_segments, "dock_dst": dock_dst}
        if own:
            out["dock_src"] = dock_src
        return out


def check_held_out(tasks, held_out) -> None:
    """Instruction tuning's rule: no task of a held-out cluster is tuned on (it is scored zero-shot after)."""
    bad = [t.name for t in tasks if t.cluster in set(held_out)]
    if bad:
        raise ValueError(f"finetune.held_out: {', '.join(bad)} belong(s) to a held-out cluster "
                         f"({', '.join(sorted({t.cluster for t in tasks if t.name in bad}))}); tune on the others")


def tuning_tasks(candidates, held_out) -> tuple[list[str], list[str]]:
    """(tasks to tune on, tasks to score): the candidates outside the held-out clusters, and those inside."""
    from data_tools.tasks import get_task

    tune = [t for t in candidates if get_task(t).cluster not in set(held_out)]
    return tune, [t for t in candidates if t not in tune]


def build_task_rows(task_names, data_dir: str, tok, T: int, num_rows: int, placement: str, seed: int,
                    max_items: int = 0, weights=None, pack: bool = True, aligner=None, templates: str = "first",
                    held_out=()) -> TaskRows:
    """Rows of `num_rows` x `T` tokens from the train splits of the named tasks (built-in ones fetched under
    `data_dir`, task files read from their own data files); `weights` default to the tasks' sizes."""
    from data_tools.tasks import get_task, load_split

    tasks = [get_task(t, data_dir=data_dir) for t in task_names]  # generative tasks too: the target is the answer
    check_held_out(tasks, held_out)
    enc_limit = T  # an example (its encoder piece docked into decoder slots) fits one row, cut from the left
    seqs = []
    for task in tasks:
        items = load_split(data_dir, task, "train")
        if max_items:
            items = items[:max_items]
        seqs.append(example_sequences(task, items, tok, placement, T, enc_limit, templates))
    weights = [float(w) for w in weights] if weights else [float(len(s)) for s in seqs]
    if len(weights) != len(tasks) or min(weights) <= 0:
        raise ValueError(f"finetune.weights: one positive weight per task expected, got {list(weights)}")
    return TaskRows(seqs, weights, tok, T, num_rows, seed, pack, aligner if placement == "encoder" else None)
