"""Connectors from encoder features to decoder slots; replicated (not tensor-parallel): they are small, and their
output must be identical on every TP rank, which replicated weights fed identical inputs guarantee.

- `linear`: one linear layer d_enc -> d_dec (paper, text default).
- `mlp`: three linear layers with GELU in between (paper, vision default).
- `resampler`: a fixed number of learned queries cross-attending to the encoder output, then an MLP (the later
  Kosmos-1 design): a fixed slot count per image whatever the patch count. Vision only (text spans need one slot
  per span token).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPConnector(nn.Sequential):
    def __init__(self, d_in: int, d_out: int):
        super().__init__(nn.Linear(d_in, d_out, bias=False), nn.GELU(), nn.Linear(d_out, d_out, bias=False),
                         nn.GELU(), nn.Linear(d_out, d_out, bias=False))


class Resampler(nn.Module):
    def __init__(self, d_in: int, d_out: int, queries: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, d_out) * 0.02)
        self.kv_norm = nn.RMSNorm(d_in)
        self.k = nn.Linear(d_in, d_out, bias=False)
        self.v = nn.Linear(d_in, d_out, bias=False)
        self.q = nn.Linear(d_out, d_out, bias=False)
        self.o = nn.Linear(d_out, d_out, bias=False)
        self.q_norm = nn.RMSNorm(d_out)
        self.mlp_norm = nn.RMSNorm(d_out)
        self.mlp = nn.Sequential(nn.Linear(d_out, 4 * d_out, bias=False), nn.GELU(),
                                 nn.Linear(4 * d_out, d_out, bias=False))
        self.heads = heads

    def forward(self, x_MPd: torch.Tensor) -> torch.Tensor:
        M = x_MPd.shape[0]
        kv = self.kv_norm(x_MPd)
        q = self.q(self.q_norm(self.queries)).expand(M, -1, -1)

        def heads(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(q), heads(self.k(kv)), heads(self.v(kv)))
        x = self.queries + self.o(o.transpose(1, 2).flatten(2))
        return x + self.mlp(self.mlp_norm(x))  # [M, Q, d_out]


def build_connector(kind: str, d_in: int, d_out: int, queries: int = 0, heads: int = 1) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out, bias=False)
    if kind == "mlp":
        return MLPConnector(d_in, d_out)
    if kind == "resampler":
        return Resampler(d_in, d_out, queries, heads)
    raise ValueError(f"unknown connector {kind!r}")
