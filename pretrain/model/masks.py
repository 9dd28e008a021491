"""Attention masks written once as FlexAttention `mask_mod`s, composable with `and_masks` / `or_masks`, plus a
dense builder from the same functions (the CPU backend and the test oracle).

A mask_mod is `f(b, h, q_idx, kv_idx) -> bool` (True = may attend). Per-batch structure (document ids, span ids,
encoder segments, prefix lengths) comes from the batch as tensors captured by the factories below; nothing is
inferred from token values.

- `causal`: q >= kv.
- `document(doc_ids)`: same document (packed documents do not see each other); `and` it with causal.
- `bidirectional_span(span_ids)`: semi-causal single stack: causal, or both positions in the same span
  (span id >= 0), a prefix-LM generalisation with several bidirectional islands.
- `block_diagonal(segments)`: encoder rows holding several packed spans: attend within the same segment only;
  padding (segment -1) attends to itself alone, so no row is empty (an empty row gives NaN in dense SDPA).
- `prefix_lm(prefix_len)`: kv < prefix_len[b] (bidirectional prefix), or causal.
- `shared_prefix(segments)`: answer choices packed after one shared prompt (scoring): causal, each continuation
  sees the prompt and itself only.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention.flex_attention import and_masks, create_mask, or_masks  # noqa: F401  (re-exported)

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def document(doc_ids_BL: torch.Tensor) -> MaskMod:
    def document_mask(b, h, q_idx, kv_idx):
        return doc_ids_BL[b, q_idx] == doc_ids_BL[b, kv_idx]

    return document_mask


def same_span(span_ids_BL: torch.Tensor) -> MaskMod:
    def same_span_mask(b, h, q_idx, kv_idx):
        s = span_ids_BL[b, q_idx]
        return (s >= 0) & (s == span_ids_BL[b, kv_idx])

    return same_span_mask


def bidirectional_span(span_ids_BL: torch.Tensor) -> MaskMod:
    return or_masks(causal, same_span(span_ids_BL))


def block_diagonal(segments_BL: torch.Tensor) -> MaskMod:
    def block_diagonal_mask(b, h, q_idx, kv_idx):
        s = segments_BL[b, q_idx]
        return ((s >= 0) & (s == segments_BL[b, kv_idx])) | (q_idx == kv_idx)

    return block_diagonal_mask


def prefix_lm(prefix_len_B: torch.Tensor) -> MaskMod:
    def prefix_mask(b, h, q_idx, kv_idx):
        return kv_idx < prefix_len_B[b]

    return or_masks(causal, prefix_mask)


def shared_prefix(segments_BL: torch.Tensor) -> MaskMod:
    """Several continuations of one prompt in one row (scoring answer choices): segment 0 is the shared prompt,
    segment c > 0 continuation c, -1 padding. Causal; a continuation sees the prompt and itself, never another
    continuation; padding sees itself alone (no empty row)."""
    def shared_prefix_mask(b, h, q_idx, kv_idx):
        s_q, s_kv = segments_BL[b, q_idx], segments_BL[b, kv_idx]
        return ((q_idx >= kv_idx) & (s_kv >= 0) & ((s_kv == 0) | (s_q == s_kv))) | (q_idx == kv_idx)

    return shared_prefix_mask


def full(b, h, q_idx, kv_idx):
    return q_idx >= 0  # everything (ViT patches)


def dense(mask_mod: MaskMod, B: int, L: int, S: int | None = None, device="cpu") -> torch.Tensor:
    """Boolean [B, 1, L, S] mask from a mask_mod (torch's own create_mask evaluates the same function)."""
    return create_mask(mask_mod, B, 1, L, L if S is None else S, device=device)
