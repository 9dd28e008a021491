"""Attention behind one small seam: an `AttentionMask` built once per forward from a mask_mod, and `attend(q, k,
v, mask)` that dispatches on the backend chosen when the mask was built.

Backends:
- "flex": `create_block_mask` + compiled `flex_attention` (CUDA default): the mask is evaluated per 128x128 block,
  fully masked blocks are skipped, so a semi-causal + document mask costs about as much as flash causal.
- "sdpa": `F.scaled_dot_product_attention` with the dense boolean mask from the same mask_mod (CPU default:
  FlexAttention has no backward on CPU in torch 2.13). A plain causal mask takes SDPA's `is_causal` path instead.
- "flex_eager": uncompiled flex_attention, forward only on CPU: used by tests to check flex against sdpa.
Same numbers from all (tests check it).

Legend: B batch, H heads, K key/value heads (H, or fewer with grouped-query attention), L query length, S key
length, D head dim.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pretrain.model import masks

BACKENDS = ("auto", "flex", "sdpa", "flex_eager")


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return name


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@dataclass
class AttentionMask:
    backend: str
    data: Any  # BlockMask (flex*), bool [B,1,L,S] (sdpa), or None with is_causal (sdpa causal fast path)
    is_causal: bool = False

    @classmethod
    def build(cls, mask_mod, B: int, L: int, S: int | None, device: torch.device, backend: str,
              plain_causal: bool = False) -> "AttentionMask":
        backend = resolve_backend(backend, device)
        S = L if S is None else S
        if backend == "sdpa":
            if plain_causal and L == S:
                return cls(backend, None, is_causal=True)
            return cls(backend, masks.dense(mask_mod, B, L, S, device=device))
        from torch.nn.attention.flex_attention import create_block_mask

        return cls(backend, create_block_mask(mask_mod, B, None, L, S, device=device))


def attend(q_BHLD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, mask: AttentionMask,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Keys/values may have fewer heads K than the queries (grouped-query attention: query head h reads kv head
    h // (H / K)); both backends broadcast them (`enable_gqa`) without materialising the repeat. `dropout_p`: on
    the attention probabilities (imported encoders in training; SDPA path only: FlexAttention has no dropout)."""
    gqa = k_BKSD.shape[1] != q_BHLD.shape[1]
    if mask.backend == "sdpa":
        return F.scaled_dot_product_attention(q_BHLD, k_BKSD, v_BKSD, attn_mask=mask.data, is_causal=mask.is_causal,
                                              dropout_p=dropout_p, enable_gqa=gqa)
    if dropout_p:
        raise ValueError("attention dropout needs model.attention_backend=sdpa (FlexAttention has no dropout), or "
                         "model.encoder.attention_dropout=0")
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if mask.backend == "flex" else flex_attention
    return fn(q_BHLD, k_BKSD, v_BKSD, block_mask=mask.data, enable_gqa=gqa)
