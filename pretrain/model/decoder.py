"""Causal decoder LM with a docking hook, on megatron-core tensor-parallel layers.

Choices: vocab-parallel embedding (all-reduced output, identical on every TP rank, so docking happens after it and
before any sequence-parallel split); pre-norm blocks (blocks.py); tied input/output embeddings by default (paper:
tied), else a column-parallel output layer; logits stay vocab-parallel and the loss is megatron-core's
`vocab_parallel_cross_entropy`.

Docking (`dock`): flat index tensors from the loader, `index_select` from the connector output and an out-of-place
`index_copy` into the flattened decoder input, with one scratch row (index B*T) that padding pairs write to and
that is dropped afterwards. No boolean indexing, no host sync, static shapes.

Legend: B batch, T length, d hidden, N dock pairs, V/tp local vocabulary shard.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.config import ModelConfig
from pretrain.model.blocks import Stack, init_normal, mp_config
from pretrain.parallel import import_mcore


def dock(x_BTd: torch.Tensor, values_Nd: torch.Tensor, dst_N: torch.Tensor) -> torch.Tensor:
    """Write values_Nd into the flat decoder slots dst_N (B*T = scratch slot for padding pairs)."""
    B, T, d = x_BTd.shape
    flat = torch.cat([x_BTd.reshape(B * T, d), x_BTd.new_zeros(1, d)])
    flat = flat.index_copy(0, dst_N, values_Nd.to(flat.dtype))
    return flat[: B * T].view(B, T, d)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tp = import_mcore().tensor_parallel
        mp = mp_config()
        d = cfg.decoder.hidden
        self.cfg = cfg
        self.embedding = tp.VocabParallelEmbedding(cfg.vocab_size, d, init_method=init_normal(cfg.init_std),
                                                   config=mp)
        self.stack = Stack(cfg.decoder, cfg.init_std, checkpoint=cfg.activation_checkpointing)
        self.output = None if cfg.tie_embeddings else tp.ColumnParallelLinear(
            d, cfg.vocab_size, config=mp, init_method=init_normal(cfg.init_std), bias=False, gather_output=False)

    def embed(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens_BT)

    def forward(self, x_BTd: torch.Tensor, position_ids_BT: torch.Tensor, mask, cache=None,
                select_N: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder input embeddings (docked) -> vocab-parallel logits [B, T, V/tp]. With a `KVCache` (inference),
        the T positions continue the cached ones and `mask` spans [B, 1, T, cached + T]. With `select_N` (flat
        indices into B*T) only those positions are projected: logits [N, V/tp] (scoring). The projection stays
        inside this forward: under ZeRO-3 the tied embedding weight is gathered only while it runs."""
        h = self.stack(x_BTd, position_ids_BT, mask, cache)
        if select_N is not None:
            h = h.flatten(0, 1).index_select(0, select_N)
        return self.project(h)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., d] -> vocab-parallel logits [..., V/tp] (tied embedding or output layer)."""
        if self.output is not None:
            logits, _ = self.output(h)
            return logits
        tp = import_mcore().tensor_parallel
        return torch.matmul(tp.copy_to_tensor_model_parallel_region(h), self.embedding.weight.t())
