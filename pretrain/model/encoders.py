"""Bidirectional encoders that dock into the decoder.

- `TextEncoder`: all spans of a sample packed in one row (positions restart per span, from the batch), a
  block-diagonal bidirectional mask from `enc_segments` (spans see only themselves), its own vocab-parallel
  embedding, the decoder's block type. A frozen prefix (embedding + first k blocks) runs without autograd.
- `VisionEncoder`: ViT: non-overlapping patches through a linear patch embedding (a strided Conv2d), learned
  absolute positions, bidirectional blocks, final norm. With `caption_prefix` Lp > 0 (the paper's variant) each
  image's row also holds up to Lp caption-prefix tokens (own embedding + learned positions) after its P patches;
  the row's mask (block-diagonal over `image_segments`: 0 = real, -1 = padding) lets patches and prefix tokens see
  each other and nothing else. The blocks are tensor-parallel (megatron-core layers, as the decoder's); the patch,
  position and prefix embeddings are replicated: they are small.

Legend: B batch, Te encoder row length, M images, P patches per image, d hidden.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.config import ModelConfig, VisionConfig
from pretrain.model.blocks import Stack, init_normal, mp_config
from pretrain.parallel import import_mcore


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tp = import_mcore().tensor_parallel
        ecfg = cfg.encoder
        self.frozen = cfg.freeze_encoder_layers
        self.embedding = tp.VocabParallelEmbedding(cfg.vocab_size, ecfg.hidden, init_method=init_normal(cfg.init_std),
                                                   config=mp_config())
        self.stack = Stack(ecfg, cfg.init_std, frozen_layers=self.frozen, checkpoint=cfg.activation_checkpointing)
        if self.frozen:
            self.embedding.requires_grad_(False)
            if self.frozen == ecfg.layers:
                self.stack.norm.requires_grad_(False)

    def forward(self, tokens_BTe, positions_BTe, mask):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = self.embedding(tokens_BTe)
        return self.stack(x, positions_BTe, mask)


class VisionEncoder(nn.Module):
    def __init__(self, vcfg: VisionConfig, init_std: float, vocab_size: int = 0):
        super().__init__()
        d = vcfg.stack.hidden
        self.cfg = vcfg
        self.patch = nn.Conv2d(vcfg.channels, d, kernel_size=vcfg.patch_size, stride=vcfg.patch_size)
        self.pos = nn.Parameter(torch.randn(vcfg.patches, d) * init_std)
        self.stack = Stack(vcfg.stack, init_std, rope=False)
        if vcfg.caption_prefix:
            self.text = nn.Embedding(vocab_size, d)
            nn.init.normal_(self.text.weight, std=init_std)
            self.text_pos = nn.Parameter(torch.randn(vcfg.caption_prefix, d) * init_std)

    def forward(self, images_M3HW: torch.Tensor, mask, text_MLp: torch.Tensor | None = None) -> torch.Tensor:
        """[M, P (+ Lp), d]: patch features, then the caption-prefix features when `text_MLp` is given."""
        x = self.patch(images_M3HW).flatten(2).transpose(1, 2) + self.pos  # [M, P, d]
        if text_MLp is not None:
            x = torch.cat([x, self.text(text_MLp) + self.text_pos], 1)
        return self.stack(x, None, mask)
