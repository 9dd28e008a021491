"""Task items -> scored sequences -> batches of the batch contract (one builder; scoring uses it now, finetuning next).

A sequence is `<s>` followed by pieces and a target (the answer tokens, the only ones scored):
- placement `causal` (a GPT, or MetaLM used as one): one decoder string, lm-evaluation-harness' recipe exactly:
  context = demonstrations joined by "\n\n" + the query's input and cue; continuation = " " + answer; trailing
  spaces of the context move to the continuation; tokens = encode(context + continuation), the continuation being
  what follows encode(context) (so scores equal lm-eval's on the same model).
- placement `encoder` (MetaLM, the paper's in-context protocol, METHOD.md §7): the task input of the query and of
  each demonstration is its own encoder piece (its own span in the packed encoder row, docked into one decoder slot
  per token); cues and answers are ordinary decoder tokens; examples are separated by `</s>`. Answers are never
  encoded.
Truncation: an encoder piece longer than the encoder limit, or a sequence longer than the decoder limit, loses
tokens from the left (never `<s>`, never the target); the sequence records how many, the report counts it.

`collate_sequences` pads on the right (causal attention: padding at the end changes nothing before it), packs the
encoder pieces of each row with positions restarting per piece, and flattens the dock pairs exactly as pretraining
does (padding pairs go to the scratch slot B*T).

Legend: B rows, T decoder length, Te encoder row length.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data_tools.tasks import Task

PLACEMENTS = ("causal", "encoder")
CAUSAL_FEWSHOT_DELIMITER = "\n\n"  # GPT-3 / lm-eval
TARGET_DELIMITER = " "  # lm-eval's default between context and answer
EOS_MARKER = "</s>"


@dataclass
class Sequence:
    pieces: list[tuple[str, list[int]]]  # ("dec" | "enc", ids) after <s>; an enc piece fills one slot per id
    target: list[int]  # answer ids, scored
    truncated: int = 0  # tokens cut from the left
    meta: dict = field(default_factory=dict)  # (item index, choice index, ...) for the caller

    def length(self) -> int:
        return 1 + sum(len(p) for _, p in self.pieces) + len(self.target)


def encode(tok, text: str) -> list[int]:
    """Text -> ids, with `</s>` written in a template standing for the end-of-sentence token itself."""
    parts = text.split(EOS_MARKER)
    ids: list[int] = []
    for i, part in enumerate(parts):
        if i:
            ids.append(tok.ids.eos)
        if part.strip():
            ids.extend(tok.encode(part.strip()))
    return ids


def split_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness' `_encode_pair` for causal models."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = encode(tok, context + continuation) if EOS_MARKER in context else tok.encode(context + continuation)
    ctx = encode(tok, context) if EOS_MARKER in context else tok.encode(context)
    return ctx, whole[len(ctx):]


def causal_context(task: Task, item: dict, demos: list[dict]) -> str:
    def one(it):
        return f"{task.render(it)} {task.cue}".strip() if task.cue else task.render(it).strip()

    shots = [f"{one(d)}{TARGET_DELIMITER}{task.answer(d)}" for d in demos]
    return CAUSAL_FEWSHOT_DELIMITER.join(shots + [one(item)])


def build_sequences(task: Task, item: dict, demos: list[dict], placement: str, tok, dec_limit: int,
                    enc_limit: int) -> list[Sequence]:
    """One sequence per answer choice of `item`, with `demos` (labelled items) as in-context examples."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    seqs = []
    if placement == "causal":
        ctx = causal_context(task, item, demos)
        for c, answer in enumerate(task.choices(item)):
            ctx_ids, target = split_pair(tok, ctx, TARGET_DELIMITER + answer)
            seqs.append(Sequence([("dec", ctx_ids)], target, meta={"choice": c}))
    else:
        pieces: list[tuple[str, list[int]]] = []
        for d in demos:
            pieces.append(("enc", encode(tok, task.render(d))))
            pieces.append(("dec", (tok.encode(task.cue) if task.cue else [])
                           + tok.encode(task.answer(d)) + [tok.ids.eos]))
        pieces.append(("enc", encode(tok, task.render(item))))
        if task.cue:
            pieces.append(("dec", tok.encode(task.cue)))
        for c, answer in enumerate(task.choices(item)):
            seqs.append(Sequence([(k, list(v)) for k, v in pieces], tok.encode(answer), meta={"choice": c}))
    # causal: per sequence, as lm-eval does; encoder: every choice keeps the same context (cut for the longest)
    longest = max(len(s.target) for s in seqs)
    for s in seqs:
        truncate(s, dec_limit, enc_limit, target_room=len(s.target) if placement == "causal" else longest)
    return seqs


def generation_prompt(task: Task, item: dict, demos: list[dict], placement: str, tok) -> tuple[list[int], list[int]]:
    """(encoder passage ids, decoder prompt ids after `<s>`) to generate the answer of `item` from: `causal`, the
    scorer's context (lm-eval's `generate_until` prompt: demonstrations + input + cue, one decoder string);
    `encoder`, the input as the passage docked after `<s>` and the cue as the prompt (zero-shot: generation docks
    one passage per row)."""
    if placement == "causal":
        ctx = causal_context(task, item, demos)
        return [], encode(tok, ctx) if EOS_MARKER in ctx else tok.encode(ctx)
    if placement != "encoder":
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if demos:
        raise ValueError("generation with the encoder placement is zero-shot (one passage per row): use --shots 0 "
                         "or --placement causal")
    return encode(tok, task.render(item)), tok.encode(task.cue) if task.cue else []


def truncate(seq: Sequence, dec_limit: int, enc_limit: int, target_room: int | None = None) -> None:
    """Cut from the left: each encoder piece to enc_limit, then the whole to dec_limit decoder input tokens
    (counting `target_room` target tokens, default the sequence's own)."""
    cut = 0
    for i, (kind, ids) in enumerate(seq.pieces):
        if kind == "enc" and len(ids) > enc_limit:
            cut += len(ids) - enc_limit
            seq.pieces[i] = (kind, ids[len(ids) - enc_limit:])
    room = len(seq.target) if target_room is None else target_room
    over = seq.length() - len(seq.target) + room - 1 - dec_limit  # decoder inputs = all tokens but the last
    if over > 0 and over >= seq.length() - 1 - len(seq.target):
        raise ValueError(f"the answer alone ({len(seq.target)} tokens) does not fit the decoder limit {dec_limit}")
    i = 0
    while over > 0:
        kind, ids = seq.pieces[i]
        drop = min(over, len(ids))
        seq.pieces[i] = (kind, ids[drop:])
        over -= drop
        cut += drop
        i += 1
    seq.pieces = [(k, ids) for k, ids in seq.pieces if ids]
    seq.truncated = cut


def _pack_encoder(rows_pieces: list[list[tuple[str, list[int]]]], T: int, pad: int, with_encoder: bool,
                  aligner=None):
    """Encoder rows of the batch contract for rows whose pieces start right after <s> at decoder slot 1:
    (row tokens [B, T] filled with the pieces, enc_tokens, enc_positions, enc_segments, dock_dst [B, Te]), and
    dock_src (None: encoder position j docks at dock_dst[j]). With `aligner` (an encoder with its own tokenizer)
    each encoder piece is re-tokenized (data_tools/encoder_tokens.py) and the pairs are explicit, one per slot."""
    if aligner is not None and with_encoder:
        return _pack_retokenized(rows_pieces, T, aligner)
    B = len(rows_pieces)
    Te = max([sum(len(ids) for k, ids in r if k == "enc") for r in rows_pieces] + [0]) if with_encoder else 0
    enc = {"enc_tokens": np.full((B, Te), pad, dtype=np.int64), "enc_positions": np.zeros((B, Te), dtype=np.int64),
           "enc_segments": np.full((B, Te), -1, dtype=np.int32)}
    dock_dst = np.full((B, Te), B * T, dtype=np.int64)
    prompts = []
    for b, pieces in enumerate(rows_pieces):
        full, j = [], 0
        for seg, (kind, ids) in enumerate(pieces):
            if kind == "enc" and with_encoder:
                m = len(ids)
                enc["enc_tokens"][b, j:j + m] = ids
                enc["enc_positions"][b, j:j + m] = np.arange(m)
                enc["enc_segments"][b, j:j + m] = seg
                dock_dst[b, j:j + m] = b * T + 1 + len(full) + np.arange(m)
                j += m
            full.extend(ids)
        prompts.append(full)
    return prompts, enc, dock_dst, None


def fit_piece(aligner, ids: list[int]) -> tuple[list[int], tuple | None]:
    """(the piece's decoder ids, its alignment), cut from the left (as `truncate` cuts) until its encoder tokens
    fit the encoder's length; alignment None if its text gives no encoder token."""
    while ids:
        got, why = aligner.align_piece(ids)
        if why != "long":
            return ids, got
        ids = ids[max(1, len(ids) // 8):]
    return ids, None


def _pack_retokenized(rows_pieces, T: int, aligner):
    B = len(rows_pieces)
    rows = []
    for pieces in rows_pieces:
        fitted = [(kind, *fit_piece(aligner, list(ids))) if kind == "enc" else (kind, list(ids), None)
                  for kind, ids in pieces]
        rows.append(fitted)
    Te = max([sum(len(got[0]) for k, _, got in r if got is not None) for r in rows] + [0])
    N = max([sum(len(ids) for k, ids, got in r if got is not None) for r in rows] + [0])
    enc = {"enc_tokens": np.full((B, Te), aligner.encoder_tok.pad_id, dtype=np.int64),
           "enc_positions": np.zeros((B, Te), dtype=np.int64), "enc_segments": np.full((B, Te), -1, dtype=np.int32)}
    dock_src = np.broadcast_to((np.arange(B) * Te)[:, None], (B, N)).copy()
    dock_dst = np.full((B, N), B * T, dtype=np.int64)
    prompts = []
    for b, pieces in enumerate(rows):
        full, j, q = [], 0, 0
        for seg, (kind, ids, got) in enumerate(pieces):
            if got is not None:
                e_ids, src = got
                n, m = len(e_ids), len(ids)
                enc["enc_tokens"][b, j:j + n] = e_ids
                enc["enc_positions"][b, j:j + n] = np.arange(n)
                enc["enc_segments"][b, j:j + n] = seg
                dock_src[b, q:q + m] = b * Te + j + src
                dock_dst[b, q:q + m] = b * T + 1 + len(full) + np.arange(m)
                j, q = j + n, q + m
            full.extend(ids)
        prompts.append(full)
    return prompts, enc, dock_dst, dock_src


def _as_batch(tokens, positions, enc, dock_dst, extra=None, dock_src=None):
    import torch

    B, T = tokens.shape
    batch = {"tokens": torch.from_numpy(tokens), "position_ids": torch.from_numpy(positions),
             "document_ids": torch.zeros(B, T, dtype=torch.int32),
             **{k: torch.from_numpy(v) for k, v in enc.items()},
             "dock_src": (torch.arange(dock_dst.size, dtype=torch.int64) if dock_src is None
                          else torch.from_numpy(dock_src.reshape(-1))),
             "dock_dst": torch.from_numpy(dock_dst.reshape(-1))}
    batch.update({k: torch.from_numpy(v) for k, v in (extra or {}).items()})
    return batch


def collate_sequences(seqs: list[Sequence], bos: int, pad: int, with_encoder: bool, aligner=None):
    """Batch contract tensors (labels and loss_mask on the targets) + where each row's target sits:
    (batch, target_start [B], target_len [B]). `with_encoder=False` (causal placement) fills encoder pieces into
    the decoder as ordinary tokens; `aligner`: an encoder with its own tokenizer."""
    B = len(seqs)
    T = max(s.length() - 1 for s in seqs)
    prompts, enc, dock_dst, dock_src = _pack_encoder([s.pieces for s in seqs], T, pad, with_encoder, aligner)
    tokens = np.full((B, T), pad, dtype=np.int64)
    labels = np.zeros((B, T), dtype=np.int64)
    loss_mask = np.zeros((B, T), dtype=np.float32)
    start = np.zeros(B, dtype=np.int64)
    n_target = np.zeros(B, dtype=np.int64)
    for b, (s, prompt) in enumerate(zip(seqs, prompts)):
        full = [bos] + prompt + s.target
        n = len(full) - 1
        start[b], n_target[b] = len(prompt), len(s.target)
        tokens[b, :n], labels[b, :n] = full[:-1], full[1:]
        loss_mask[b, start[b]:n] = 1.0
    positions = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
    return (_as_batch(tokens, positions, enc, dock_dst, {"labels": labels, "loss_mask": loss_mask}, dock_src), start,
            n_target)


def collate_shared(groups: list[list[Sequence]], bos: int, pad: int, with_encoder: bool, aligner=None):
    """One row per group of sequences with the same pieces (the answer choices of one item): `<s>`, the shared
    pieces, then every choice's tokens but its last, each block at the positions that follow the prompt. The
    attention mask (pretrain.model.masks.shared_prefix over `segments`: 0 prompt, c+1 choice c, -1 padding) lets
    a choice see the prompt and itself only, so each choice scores exactly as alone in its own row, and the
    prompt is computed once. Returns (batch, pairs): pairs = (row, position, label, owner) arrays [N]; the
    log-probability of `label` at (row, position) belongs to sequence `owner` (groups flattened in order)."""
    B = len(groups)
    lengths = [1 + sum(len(ids) for _, ids in g[0].pieces) + sum(len(s.target) - 1 for s in g) for g in groups]
    T = max(lengths)
    prompts, enc, dock_dst, dock_src = _pack_encoder([g[0].pieces for g in groups], T, pad, with_encoder, aligner)
    tokens = np.full((B, T), pad, dtype=np.int64)
    positions = np.zeros((B, T), dtype=np.int64)
    segments = np.full((B, T), -1, dtype=np.int32)
    rows, pos, labels, owner = [], [], [], []
    k = 0
    for b, (g, prompt) in enumerate(zip(groups, prompts)):
        n = 1 + len(prompt)
        tokens[b, :n] = [bos] + prompt
        positions[b, :n] = np.arange(n)
        segments[b, :n] = 0
        at = n
        for c, s in enumerate(g):
            m = len(s.target)
            tokens[b, at:at + m - 1] = s.target[:-1]
            positions[b, at:at + m - 1] = np.arange(n, n + m - 1)
            segments[b, at:at + m - 1] = c + 1
            rows += [b] * m
            pos += [n - 1] + list(range(at, at + m - 1))
            labels += s.target
            owner += [k] * m
            at += m - 1
            k += 1
    pairs = tuple(np.array(x, dtype=np.int64) for x in (rows, pos, labels, owner))
    return _as_batch(tokens, positions, enc, dock_dst, {"segments": segments}, dock_src), pairs


def sample_demos(pool: list[dict], k: int, rng: np.random.Generator, exclude_id: str | None = None) -> list[dict]:
    """k labelled demonstrations drawn without replacement from the train split (never the query itself)."""
    if k == 0:
        return []
    cand = [i for i in range(len(pool)) if pool[i].get("id") != exclude_id] if exclude_id is not None else \
        list(range(len(pool)))
    if len(cand) < k:
        raise ValueError(f"{k} demonstrations asked for, the train split has {len(cand)} items")
    return [pool[i] for i in rng.choice(cand, size=k, replace=False)]
