"""The same model as a DeepSpeed `PipelineModule`, for pipeline parallelism (PP > 1).

Stage layout (DeepSpeed's `partition_method="type:BlockPipe"` balances the transformer blocks; what comes before the
first block stays on stage 0, what follows the last block on the last stage):
    stage 0:     EmbeddingPipe (tied)  -> EncodeDockPipe (text / vision encoders + connectors + docking) -> blocks ...
    ...          BlockPipe ...
    last stage:  ... blocks -> FinalNormPipe -> EmbeddingPipe (tied, as the output layer) -> loss_fn
Between stages travel `(hidden, position_ids, document_ids)`; each block builds its mask from them (the plain causal
mask is SDPA's/flex's built-in causal path, so that costs nothing). Tied input/output embeddings are DeepSpeed's
`TiedLayerSpec` (their gradients are all-reduced between the first and last stage).
Layers are seeded per layer index (`seed_layers`), so a PP=2 model starts from the same weights as PP=1.
Built from MetaLM's own pieces (`build_encoders`, `dock_encoders`, `Block`, `masked_mean_loss`): one assembly.

Legend: B batch, T length, d hidden.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn

from pretrain.config import ModelConfig
from pretrain.model.blocks import Block, RotaryEmbedding, init_normal, mp_config
from pretrain.model.metalm import build_encoders, decoder_mask, dock_encoders, masked_mean_loss
from pretrain.parallel import import_mcore

INPUT_KEYS = ("tokens", "position_ids", "document_ids", "enc_tokens", "enc_positions", "enc_segments", "dock_src",
              "dock_dst")
IMAGE_KEYS = ("images", "image_dst")  # vision models: read on stage 0 only, like the text encoder's inputs
PREFIX_KEYS = ("image_text", "image_segments")  # with vision.caption_prefix


def input_keys(cfg: ModelConfig) -> tuple[str, ...]:
    if cfg.vision is None:
        return INPUT_KEYS
    return INPUT_KEYS + IMAGE_KEYS + (PREFIX_KEYS if cfg.vision.caption_prefix else ())
LABEL_KEYS = ("labels", "loss_mask")


class EmbeddingPipe(nn.Module):
    """Vocab-parallel embedding; also the (tied) output layer on the last stage via `lm_head`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tp = import_mcore().tensor_parallel
        self.word = tp.VocabParallelEmbedding(cfg.vocab_size, cfg.decoder.hidden,
                                              init_method=init_normal(cfg.init_std), config=mp_config())

    def forward(self, inputs):
        tokens, *rest = inputs
        return (self.word(tokens), *rest)


def lm_head(module: EmbeddingPipe, h_BTd: torch.Tensor) -> torch.Tensor:
    tp = import_mcore().tensor_parallel
    return torch.matmul(tp.copy_to_tensor_model_parallel_region(h_BTd), module.word.weight.t())


class EncodeDockPipe(nn.Module):
    """Text encoder + connector, vision encoder + connector, and their docking (stage 0): MetaLM's own pieces
    (`build_encoders`, `dock_encoders`). Without encoders it only drops the encoder inputs."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        build_encoders(self, cfg)
        self.keys = input_keys(cfg)

    def forward(self, inputs):
        x, position_ids, document_ids = inputs[:3]
        batch = dict(zip(self.keys[3:], inputs[3:]))
        return dock_encoders(self, x, batch), position_ids, document_ids


class BlockPipe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.rope = RotaryEmbedding(cfg.decoder.head_dim, cfg.decoder.rope_theta, cfg.decoder.rope_scaling)
        self.block = Block(cfg.decoder, cfg.init_std, cfg.decoder.layers)

    def forward(self, inputs):
        x, position_ids, document_ids = inputs
        mask = decoder_mask(self.cfg, document_ids)
        return self.block(x, self.rope(position_ids), mask), position_ids, document_ids


class FinalNormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.decoder.hidden, eps=cfg.decoder.norm_eps)

    def forward(self, inputs):
        return self.norm(inputs[0])


def pipeline_loss(logits_BTv: torch.Tensor, labels) -> torch.Tensor:
    target, loss_mask = labels
    return masked_mean_loss(logits_BTv, target, loss_mask)


def build_pipeline_module(cfg: ModelConfig, pp: int, tp: int, dp: int, seed: int):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from pretrain.parallel import init_deepspeed_comm, seed_everything

    init_deepspeed_comm()  # PipelineModule builds its process groups through deepspeed.comm
    if not cfg.tie_embeddings:
        raise ValueError("pipeline parallelism is implemented for tied embeddings (model.tie_embeddings=true)")
    layers = [TiedLayerSpec("embed", EmbeddingPipe, cfg, tied_weight_attr="word.weight"),
              LayerSpec(EncodeDockPipe, cfg)]
    layers += [LayerSpec(BlockPipe, cfg) for _ in range(cfg.decoder.layers)]
    layers += [LayerSpec(FinalNormPipe, cfg),
               TiedLayerSpec("embed", EmbeddingPipe, cfg, forward_fn=lm_head, tied_weight_attr="word.weight")]
    # megatron-core orders ranks tp fastest, then dp, then pp: the same as this topology's (pipe, data, model)
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    return PipelineModule(layers=layers, topology=topo, loss_fn=pipeline_loss, seed_layers=True, base_seed=seed,
                          seed_fn=seed_everything, partition_method="type:BlockPipe", activation_checkpoint_interval=0)


def pipeline_batches(micro_batches, keys: Sequence[str] = INPUT_KEYS):
    """MicroBatches -> the (inputs, labels) tuples DeepSpeed's pipeline engine reads (`keys`: `input_keys(cfg)`)."""
    empty = {"images": torch.zeros(0, 3, 1, 1), "image_dst": torch.zeros(0, dtype=torch.int64),
             "image_text": torch.zeros(0, 0, dtype=torch.int64), "image_segments": torch.zeros(0, 0, dtype=torch.int32)}
    for batch in micro_batches:  # text-only batches of a vision model (its text validation set): no images
        yield tuple(batch[k] if k in batch else empty[k] for k in keys), tuple(batch[k] for k in LABEL_KEYS)


# ---- parameter names: pipeline layer files <-> MetaLM (pretrain/model_io.py reads and loads with these)
def pipeline_to_metalm(layer: int, name: str, n_layers: int) -> str | None:
    """Name in MetaLM of parameter `name` of pipeline layer `layer` (pretrain/pipeline.py's layout); None for the
    tied output embedding (the same tensor as layer 0's)."""
    if layer == 0:
        return "decoder.embedding." + name.removeprefix("word.")
    if layer == 1:
        return name
    if 2 <= layer < 2 + n_layers:
        return f"decoder.stack.layers.{layer - 2}." + name.removeprefix("block.")
    if layer == 2 + n_layers:
        return "decoder.stack." + name
    return None


def metalm_to_pipeline(name: str, n_layers: int) -> tuple[int, str] | None:
    if name.startswith("decoder.embedding."):
        return 0, "word." + name.removeprefix("decoder.embedding.")
    if name.startswith(("encoder.", "connector.", "vision.", "vision_connector.")):
        return 1, name
    m = re.match(r"decoder\.stack\.layers\.(\d+)\.(.*)", name)
    if m:
        return 2 + int(m.group(1)), "block." + m.group(2)
    if name.startswith("decoder.stack.norm."):
        return 2 + n_layers, name.removeprefix("decoder.stack.")
    return None


