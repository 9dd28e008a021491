"""Bidirectional encoders that dock into the decoder.

- `TextEncoder`: all spans of a sample packed in one row (positions restart per span, from the batch), a
  block-diagonal bidirectional mask from `enc_segments` (spans see only themselves), its own vocab-parallel
  embedding, the decoder's block type. A frozen prefix (embedding + first k blocks) runs without autograd and in
  eval mode. An imported (BERT-family) encoder's embedding is word + learned absolute position (+ offset, RoBERTa)
  + token type 0, then LayerNorm and dropout, then (ELECTRA, embedding_size < hidden) a linear projection; its
  vocabulary is its own (the loader re-tokenized the spans with its tokenizer).
- `VisionEncoder`: ViT: non-overlapping patches through a linear patch embedding (a strided Conv2d), learned
  absolute positions, bidirectional blocks, final norm. Imported towers (pretrain/hf_vision.py) add a class token
  before the patches, CLIP's LayerNorm before the blocks, no final norm, and a feature layer below the top (the
  blocks above it are neither run nor trained); `trainable_top_layers` k freezes the embeddings and the bottom
  blocks (run without autograd, in eval mode), `freeze_vision` the whole tower. With `caption_prefix` Lp > 0 (the
  paper's variant) each image's row also holds up to Lp caption-prefix tokens (own embedding + learned positions) after its P patches;
  the row's mask (block-diagonal over `image_segments`: 0 = real, -1 = padding) lets patches and prefix tokens see
  each other and nothing else. The blocks are tensor-parallel (megatron-core layers, as the decoder's); the patch,
  position and prefix embeddings are replicated: they are small.

Legend: B batch, Te encoder row length, M images, P patches per image, d hidden.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.config import ModelConfig, VisionConfig
from pretrain.model.blocks import Stack, freeze, init_normal, make_norm, mp_config
from pretrain.parallel import import_mcore


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tp = import_mcore().tensor_parallel
        ecfg = cfg.encoder
        e = ecfg.embedding_size or ecfg.hidden
        self.frozen = cfg.freeze_encoder_layers
        self.embedding = tp.VocabParallelEmbedding(ecfg.vocab_size or cfg.vocab_size, e,
                                                   init_method=init_normal(cfg.init_std), config=mp_config())
        self.learned_positions = ecfg.positions == "learned"
        self.position_offset = ecfg.position_offset
        if self.learned_positions:  # replicated: small, and identical on every TP rank
            self.positions = nn.Embedding(ecfg.max_positions, e)
            nn.init.normal_(self.positions.weight, std=cfg.init_std)
        if ecfg.type_vocab_size:
            self.token_types = nn.Embedding(ecfg.type_vocab_size, e)
            nn.init.normal_(self.token_types.weight, std=cfg.init_std)
        self.emb_norm = make_norm(ecfg, e) if ecfg.embedding_norm else nn.Identity()
        self.emb_dropout = nn.Dropout(ecfg.hidden_dropout) if ecfg.hidden_dropout else nn.Identity()
        self.emb_projection = nn.Linear(e, ecfg.hidden) if e != ecfg.hidden else None
        self.stack = Stack(ecfg, cfg.init_std, frozen_layers=self.frozen, checkpoint=cfg.activation_checkpointing)
        if self.frozen:
            for m in self.embedding_modules():
                freeze(m)
            if self.frozen == ecfg.layers:
                freeze(self.stack.norm)

    def embedding_modules(self) -> list[nn.Module]:
        return [m for m in (self.embedding, getattr(self, "positions", None), getattr(self, "token_types", None),
                            self.emb_norm, self.emb_dropout, self.emb_projection) if m is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            for m in self.embedding_modules():
                m.eval()
        return self

    def forward(self, tokens_BTe, positions_BTe, mask, upto: int | None = None):
        """[B, Te, d]: the last hidden states, or (`upto` k) those after the first k blocks."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = self.embedding(tokens_BTe)
            if self.learned_positions:
                x = x + self.positions(positions_BTe + self.position_offset)
            if hasattr(self, "token_types"):
                x = x + self.token_types.weight[0]  # every span is one segment of type 0
            x = self.emb_dropout(self.emb_norm(x))
            if self.emb_projection is not None:
                x = self.emb_projection(x)
        return self.stack(x, positions_BTe, mask, upto=upto)


class VisionEncoder(nn.Module):
    def __init__(self, vcfg: VisionConfig, init_std: float, vocab_size: int = 0, frozen: bool = False):
        super().__init__()
        d = vcfg.stack.hidden
        self.cfg = vcfg
        self.patch = nn.Conv2d(vcfg.channels, d, kernel_size=vcfg.patch_size, stride=vcfg.patch_size,
                               bias=vcfg.patch_bias)
        self.pos = nn.Parameter(torch.randn(vcfg.tokens, d) * init_std)
        if vcfg.class_token:
            self.cls = nn.Parameter(torch.randn(d) * init_std)
        self.pre_norm = nn.LayerNorm(d, eps=vcfg.stack.norm_eps) if vcfg.pre_norm else None
        run = vcfg.blocks_run
        self.frozen = vcfg.stack.layers if frozen else min(vcfg.frozen_layers, run)
        self.stack = Stack(vcfg.stack, init_std, rope=False, frozen_layers=self.frozen)
        for layer in self.stack.layers[run:]:  # above the feature layer: never run, never trained
            freeze(layer)
        self.all_frozen = frozen or self.frozen >= run
        if run < vcfg.stack.layers or self.all_frozen:
            freeze(self.stack.norm)
        if vcfg.caption_prefix:
            self.text = nn.Embedding(vocab_size, d)
            nn.init.normal_(self.text.weight, std=init_std)
            self.text_pos = nn.Parameter(torch.randn(vcfg.caption_prefix, d) * init_std)
        if frozen:
            freeze(self)
        elif self.frozen:
            for m in self.embedding_modules():
                freeze(m)
            for p in self.embedding_parameters():
                p.requires_grad_(False)
                p.frozen_by_model = True

    def embedding_modules(self) -> list[nn.Module]:
        return [self.patch] + ([self.pre_norm] if self.pre_norm is not None else [])

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.pos] + ([self.cls] if self.cfg.class_token else [])

    def train(self, mode: bool = True):
        super().train(mode)
        if self.all_frozen:
            super().train(False)
        else:  # the frozen embeddings, and the blocks above the feature layer (never run)
            unused = list(self.stack.layers[self.cfg.blocks_run:])
            for m in (self.embedding_modules() if self.frozen else []) + unused:
                m.eval()
        return self

    def forward(self, images_M3HW: torch.Tensor, mask, text_MLp: torch.Tensor | None = None) -> torch.Tensor:
        """[M, F (+ Lp), d]: the image features (F: patches, after the class token's when it is kept), then the
        caption-prefix features when `text_MLp` is given."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = self.patch(images_M3HW).flatten(2).transpose(1, 2)  # [M, P, d]
            if self.cfg.class_token:
                x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1)
            x = x + self.pos
            if self.pre_norm is not None:
                x = self.pre_norm(x)
        if text_MLp is not None:
            x = torch.cat([x, self.text(text_MLp) + self.text_pos], 1)
        x = self.stack(x, None, mask, upto=self.cfg.blocks_run, final_norm=self.cfg.feature_layer is None)
        if self.cfg.class_token and not self.cfg.keep_class_token:
            x = x[:, 1:]
        return x
