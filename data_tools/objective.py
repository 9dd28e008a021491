"""The semi-causal objective (MetaLM, arXiv 2206.06336; shared/design/METHOD.md §1-2): span sampling, the loss-mask
rule, and the packed per-sample tensors of the batch contract. Pure numpy, deterministic from (seed, sample index).

Choices:
- Span sampling follows the paper's reference loader: span length L/2+1..L (L=128), candidate windows at
  1, 1+L, 1+2L, ... < n - 1.5L visited in random order, stop once span tokens exceed p*(n-1) (p=0.25; the last span
  may overshoot). A window holding two or more document ends is skipped; with exactly one at q the span is
  [q+1, w+L) (skipped if under `min_tokens_after_eod` tokens); otherwise c ~ U{0..L-1}: c >= L/2 -> [w, w+c+1),
  else [w+c, w+L). Spans never cross a document end and never include position 0 or the tail window.
- Loss rule (paper Eq. 1; targets aligned to inputs, target at p is x[p+1]): loss_mask[p] = 0 for p in [s, e-2].
  p = s-1 still predicts x[s] (the first span token, from causal context) and p = e-1 predicts the token after the
  span. The public descendant code masks [s-1, e-3] instead, in these input-aligned terms (trains x[e-1] from
  slot e-2, which already saw it, and never trains x[s]).
- All spans of a sample are packed in one encoder row of static length `enc_len`: positions restart per span,
  `enc_segments` holds the span id (-1 on padding) for the block-diagonal bidirectional mask.
- Dock pairs map encoder position j to decoder slot s + (j - span start); `collate` flattens them over the batch,
  sending padding pairs to a scratch slot B*T that the model drops (static shapes, no boolean indexing on device).
Document structure comes from explicit per-token document ids provided by the loader, never from token values.

Legend: n = decoder input length T; Te = encoder row length; B = micro-batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SpanConfig:
    span_length: int = 128  # L
    coverage: float = 0.25  # p
    max_spans: int = 0  # optional cap on spans per sample; 0 = none beyond the candidate windows (a cap below their
    # count would lower the coverage silently: T=8192, L=128 has 62 windows)
    min_tokens_after_eod: int = 20

    def __post_init__(self):
        if self.span_length < 2:
            raise ValueError(f"span_length must be >= 2, got {self.span_length}")
        if not 0.0 < self.coverage < 1.0:
            raise ValueError(f"coverage must be in (0, 1), got {self.coverage}")
        if self.max_spans < 0:
            raise ValueError(f"max_spans must be >= 0 (0: no cap), got {self.max_spans}")

    def encoder_length(self, seq_length: int) -> int:
        """Static encoder row length: the most span tokens sampling can produce, rounded up to a multiple of 64."""
        most = math.floor(self.coverage * (seq_length - 1)) + self.span_length
        return min(int(math.ceil(most / 64) * 64), seq_length)


def sample_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def span_windows(n: int, span_length: int) -> np.ndarray:
    """Start positions of the candidate span windows on an n-token row: none when n <= 1.5 * span_length + 1 (a
    row that short is trained causally only)."""
    return np.arange(1, n - 1.5 * span_length, span_length, dtype=np.int64)


def sample_spans(doc_end: np.ndarray, cfg: SpanConfig, rng: np.random.Generator,
                 max_tokens: int | None = None) -> list[tuple[int, int]]:
    """Non-causal spans [s, e) over decoder positions 0..n-1, sorted by start.

    doc_end[p] is True where position p holds the last token of a document (its end-of-document token when
    preprocessing appended one). `max_tokens` caps the total span tokens (the encoder row length).
    """
    n = len(doc_end)
    L = cfg.span_length
    windows = span_windows(n, L)
    if len(windows) == 0:
        return []
    ends_before = np.concatenate([[0], np.cumsum(doc_end, dtype=np.int64)])  # ends in [a, b) = eb[b] - eb[a]
    order = rng.permutation(len(windows))
    cuts = rng.integers(0, L, size=len(windows))
    limit = cfg.coverage * (n - 1)
    spans: list[tuple[int, int]] = []
    covered = 0
    for k in order:
        if covered > limit or (cfg.max_spans and len(spans) >= cfg.max_spans):
            break
        w = int(windows[k])
        n_ends = ends_before[w + L] - ends_before[w]
        if n_ends >= 2:
            continue
        if n_ends == 1:
            q = w + int(np.argmax(doc_end[w:w + L]))
            s, e = q + 1, w + L
            if e - s < cfg.min_tokens_after_eod:
                continue
        else:
            c = int(cuts[k])
            s, e = (w, w + c + 1) if c >= L // 2 else (w + c, w + L)
        if max_tokens is not None and covered + (e - s) > max_tokens:
            break
        spans.append((s, e))
        covered += e - s
    spans.sort()
    return spans


def reached_coverage(cfg: SpanConfig, n: int, samples: int = 32) -> float:
    """Mean span coverage sampling reaches on n-token sequences without document ends (to see what a
    `max_spans` cap costs: it stops sampling before `coverage` when it binds)."""
    no_ends = np.zeros(n, dtype=bool)
    return float(np.mean([sum(e - s for s, e in sample_spans(no_ends, cfg, sample_rng(0, i), cfg.encoder_length(n)))
                          for i in range(samples)]) / max(n - 1, 1))


def semi_causal_loss_mask(n: int, spans: list[tuple[int, int]], target_valid: np.ndarray | None = None) -> np.ndarray:
    """loss_mask[p] = 0 for p in [s, e-2] of every span (METHOD.md §1), and where the target is padding."""
    mask = np.ones(n, dtype=np.float32) if target_valid is None else target_valid.astype(np.float32)
    for s, e in spans:
        mask[s:e - 1] = 0.0
    return mask


@dataclass(frozen=True)
class SampleConfig:
    seq_length: int  # T (decoder inputs); samples carry T+1 tokens
    mode: str = "sclm"  # "sclm" (semi-causal) | "gpt" (causal baseline: no spans, no encoder row)
    spans: SpanConfig = SpanConfig()
    seed: int = 1234
    pad_id: int = 3
    reset_position_ids: bool = False  # positions restart at each document
    # an encoder with its own tokenizer (data_tools/encoder_tokens.py): its row length and padding id; 0 = the
    # shared-vocabulary encoder (the row holds the spans' decoder tokens)
    encoder_row: int = 0
    encoder_pad_id: int = 0

    def __post_init__(self):
        if self.mode not in ("sclm", "gpt"):
            raise ValueError(f"mode must be 'sclm' or 'gpt', got {self.mode!r}")

    @property
    def enc_length(self) -> int:
        return 0 if self.mode == "gpt" else self.spans.encoder_length(self.seq_length)


def build_sample(text: np.ndarray, doc_ids: np.ndarray, index: int, cfg: SampleConfig,
                 aligner=None) -> dict[str, np.ndarray]:
    """One sample of the batch contract from T+1 tokens and their per-token document ids (-1 on padding).
    `aligner` (data_tools.encoder_tokens.SpanAligner, with `cfg.encoder_row`): the spans are re-tokenized for an
    encoder with its own tokenizer; spans it cannot encode go back to the causal objective."""
    T = cfg.seq_length
    if len(text) != T + 1 or len(doc_ids) != T + 1:
        raise ValueError(f"sample {index}: expected {T + 1} tokens and document ids, got {len(text)}/{len(doc_ids)}")
    tokens, labels = text[:T], text[1:]
    doc_in = doc_ids[:T]
    # position p ends a document when the next token belongs to another document (or is padding / the sample end)
    doc_end = np.empty(T, dtype=bool)
    doc_end[:-1] = doc_in[:-1] != doc_in[1:]
    doc_end[-1] = doc_ids[T - 1] != doc_ids[T]
    Te = cfg.enc_length
    spans = [] if cfg.mode == "gpt" else sample_spans(doc_end, cfg.spans, sample_rng(cfg.seed, index), Te)
    encoded = None
    if aligner is not None:
        spans, encoded = encode_spans(tokens, spans, aligner, cfg.encoder_row, Te)
    loss_mask = semi_causal_loss_mask(T, spans, doc_ids[1:] >= 0)
    if cfg.reset_position_ids:
        starts = np.concatenate([[0], np.flatnonzero(doc_end[:-1]) + 1])
        position_ids = np.arange(T, dtype=np.int64) - np.repeat(starts, np.diff(np.concatenate([starts, [T]])))
    else:
        position_ids = np.arange(T, dtype=np.int64)
    out = {
        "tokens": tokens.astype(np.int64),
        "labels": labels.astype(np.int64),
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "document_ids": doc_in.astype(np.int32),
    }
    if encoded is not None:
        out.update(encoded)
    else:
        enc_tokens = np.full(Te, cfg.pad_id, dtype=np.int64)
        enc_positions = np.zeros(Te, dtype=np.int64)
        enc_segments = np.full(Te, -1, dtype=np.int32)
        dock_dst = np.full(Te, -1, dtype=np.int64)
        j = 0
        for k, (s, e) in enumerate(spans):
            m = e - s
            enc_tokens[j:j + m] = tokens[s:e]
            enc_positions[j:j + m] = np.arange(m)
            enc_segments[j:j + m] = k
            dock_dst[j:j + m] = np.arange(s, e)
            j += m
        out.update(enc_tokens=enc_tokens, enc_positions=enc_positions, enc_segments=enc_segments,
                   dock_dst=dock_dst)  # dock_dst: per-sample decoder slot of each encoder position, -1 on padding
    out["spans"] = np.array(spans, dtype=np.int64).reshape(-1, 2)  # for inspection; dropped by collate
    return out


def encode_spans(tokens: np.ndarray, spans: list[tuple[int, int]], aligner, row: int, n_pairs: int):
    """Re-tokenized spans packed in one encoder row of `row` positions: (the spans kept, the row's arrays with
    `n_pairs` (static: the span-token bound) dock pairs, one per decoder slot: `dock_src` (encoder position in the
    row) -> `dock_dst` (decoder slot), -1 on padding)."""
    enc_tokens = np.full(row, aligner.encoder_tok.pad_id, dtype=np.int64)
    enc_positions = np.zeros(row, dtype=np.int64)
    enc_segments = np.full(row, -1, dtype=np.int32)
    dock_src = np.zeros(n_pairs, dtype=np.int64)
    dock_dst = np.full(n_pairs, -1, dtype=np.int64)
    kept, j, q = [], 0, 0
    for (s, e), got in zip(spans, aligner.align([tokens[s:e] for s, e in spans])):
        if got is None:
            continue
        ids, src = got
        if j + len(ids) > row:
            aligner.stats.dropped_row_full += 1
            continue
        k = len(kept)
        enc_tokens[j:j + len(ids)] = ids
        enc_positions[j:j + len(ids)] = np.arange(len(ids))
        enc_segments[j:j + len(ids)] = k
        dock_src[q:q + e - s] = j + src
        dock_dst[q:q + e - s] = np.arange(s, e)
        kept.append((s, e))
        j += len(ids)
        q += e - s
    return kept, {"enc_tokens": enc_tokens, "enc_positions": enc_positions, "enc_segments": enc_segments,
                  "dock_src": dock_src, "dock_dst": dock_dst}


def collate(samples: list[dict[str, np.ndarray]]):
    """Stack samples into the batch contract (torch tensors) and flatten the dock pairs over the batch.

    dock_src[i] indexes the flattened encoder output [B*Te]; dock_dst[i] the flattened decoder input [B*T], where
    the value B*T is a scratch slot for padding pairs (the model appends one row and drops it after the copy).
    """
    import torch

    B = len(samples)
    T = len(samples[0]["tokens"])
    Te = len(samples[0]["enc_tokens"])
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples]))
             for k in ("tokens", "labels", "loss_mask", "position_ids", "document_ids",
                       "enc_tokens", "enc_positions", "enc_segments")}
    if "dock_src" in samples[0]:  # re-tokenized spans: explicit pairs (one per decoder slot)
        dst = np.stack([s["dock_dst"] for s in samples])
        src = np.stack([s["dock_src"] for s in samples]) + (np.arange(B) * Te)[:, None]
        batch["dock_src"] = torch.from_numpy(src.reshape(-1).astype(np.int64))
    else:
        dst = np.stack([s["dock_dst"] for s in samples])  # [B, Te]
        batch["dock_src"] = torch.arange(B * Te, dtype=torch.int64)
    flat_dst = np.where(dst >= 0, dst + (np.arange(B) * T)[:, None], B * T)
    batch["dock_dst"] = torch.from_numpy(flat_dst.reshape(-1).astype(np.int64))
    return batch
