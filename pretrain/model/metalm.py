"""MetaLM: encode -> connect -> dock -> decode -> semi-causal loss (shared/design/METHOD.md).

- Text: the spans of each sample, packed in one encoder row (`enc_tokens`, `enc_positions`, `enc_segments`), go
  through the bidirectional `TextEncoder` (block-diagonal mask) and the connector; `dock_src`/`dock_dst` put each
  span token's feature in its own decoder input slot (one slot per token, length unchanged).
- Vision: `images` [M,3,H,W] through the `VisionEncoder` and the vision connector; `image_dst` [M*S] gives the
  decoder slots of the S image slots of each image, in order. With `vision.caption_prefix` Lp (paper variant) the
  batch also has `image_text` [M, Lp] and `image_segments` [M, P+Lp], and `image_dst` [M*(P+Lp)] also places each
  prefix token's output on its decoder position (padding: the scratch slot B*T). A frozen vision encoder
  (`freeze_vision`) runs without autograd; its connector still trains.
- Decoder: causal over the whole sequence (optionally also document-masked, from `document_ids`).
- Loss: mean over the batch's counted targets of megatron-core's vocab-parallel cross entropy; which targets count
  is the batch's `loss_mask` (METHOD.md §1: positions s..e-2 of each span excluded, built by the loader).
Masks are built once per forward and shared by all layers of a stack. The model never inspects token values to
find spans: everything comes from the batch. Without an encoder (GPT baseline) the same class is a plain causal LM.

Legend: B batch, T decoder length, Te encoder row length, N dock pairs, M images, S slots per image.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.config import ModelConfig
from pretrain.model import masks
from pretrain.model.attention import AttentionMask
from pretrain.model.connector import build_connector
from pretrain.model.decoder import Decoder, dock
from pretrain.model.encoders import TextEncoder, VisionEncoder
from pretrain.parallel import import_mcore


class MetaLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg)
        build_encoders(self, cfg)

    # ---- forward ----
    def encode_spans(self, batch) -> torch.Tensor:
        """Connector output for every encoder position, flat [B*Te, d_dec]."""
        return encode_spans(self, batch)

    def encode_images(self, images, text=None, segments=None) -> torch.Tensor:
        """Connector output for every image slot (and caption-prefix position), flat [M*(S or P+Lp), d_dec]."""
        return encode_images(self.cfg, self.vision, self.vision_connector, images, text, segments)

    def embed_and_dock(self, batch) -> torch.Tensor:
        return dock_encoders(self, self.decoder.embed(batch["tokens"]), batch)

    def logits(self, batch, mask: AttentionMask | None = None, select_N: torch.Tensor | None = None) -> torch.Tensor:
        """Vocab-parallel logits [B, T, V/tp]; `mask` replaces the decoder mask built from `document_ids`
        (inference: e.g. answer choices sharing one prompt, eval/inference.py); `select_N` (flat indices into B*T)
        projects only those positions: [N, V/tp]."""
        mask = mask if mask is not None else decoder_mask(self.cfg, batch["document_ids"])
        return self.decoder(self.embed_and_dock(batch), batch["position_ids"], mask, select_N=select_N)

    def forward(self, batch) -> torch.Tensor:
        """Scalar loss: mean cross entropy over the counted targets (loss_mask)."""
        return masked_mean_loss(self.logits(batch), batch["labels"], batch["loss_mask"])


# ---- the pieces, shared with the pipeline stages of pretrain/pipeline.py (one assembly, two containers)
def build_encoders(module: nn.Module, cfg: ModelConfig) -> None:
    """The text encoder + connector and the vision encoder + vision connector as attributes of `module` (in this
    order: it fixes the initialisation's random stream), or None where the model has no such encoder."""
    module.encoder = TextEncoder(cfg) if cfg.encoder is not None else None
    module.connector = (build_connector(cfg.connector, cfg.encoder.hidden, cfg.decoder.hidden)
                        if cfg.encoder is not None else None)
    module.vision = (VisionEncoder(cfg.vision, cfg.init_std, cfg.vocab_size, frozen=cfg.freeze_vision)
                     if cfg.vision is not None else None)
    module.vision_connector = (build_connector(cfg.vision_connector, cfg.vision.stack.hidden, cfg.decoder.hidden,
                                               cfg.resampler_queries, cfg.decoder.heads)
                               if cfg.vision is not None else None)


def encode_spans(module: nn.Module, batch) -> torch.Tensor:
    """Text encoder + connector over the packed span row: flat [B*Te, d_dec]."""
    mask = encoder_mask(module.cfg, batch["enc_segments"])
    h = module.encoder(batch["enc_tokens"], batch["enc_positions"], mask)
    return module.connector(h).flatten(0, 1)


def dock_encoders(module: nn.Module, x_BTd: torch.Tensor, batch) -> torch.Tensor:
    """Dock the encoders' outputs into the decoder inputs `x_BTd` (span tokens, image slots, caption prefixes);
    batches without encoder inputs (a text validation set of a vision model) pass through."""
    if module.encoder is not None and "enc_tokens" in batch and batch["enc_tokens"].shape[1] > 0:
        feats = encode_spans(module, batch)
        x_BTd = dock(x_BTd, feats.index_select(0, batch["dock_src"]), batch["dock_dst"])
    if module.vision is not None and "images" in batch and batch["images"].shape[0] > 0:
        feats = encode_images(module.cfg, module.vision, module.vision_connector, batch["images"],
                              batch.get("image_text"), batch.get("image_segments"))
        x_BTd = dock(x_BTd, feats, batch["image_dst"])
    return x_BTd


def masked_mean_loss(logits_BTv: torch.Tensor, labels_BT: torch.Tensor, loss_mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the counted targets (METHOD.md's loss; the pipeline's loss_fn too)."""
    losses = token_losses(logits_BTv, labels_BT)
    mask = loss_mask_BT.float()
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def encode_images(cfg: ModelConfig, vision, connector, images, text=None, segments=None) -> torch.Tensor:
    """Vision encoder + connector (shared with pretrain/pipeline.py); flat [M*(S or P+Lp), d_dec]."""
    M = images.shape[0]
    if cfg.vision.caption_prefix and text is not None:
        mm = masks.block_diagonal(segments)
        L = segments.shape[1]
    else:
        mm, L, text = masks.full, cfg.vision.tokens, None
    mask = AttentionMask.build(mm, M, L, None, images.device, cfg.attention_backend)
    images = images.to(vision.patch.weight.dtype)
    feats = vision(images, mask, text)  # a frozen tower (or part) runs without autograd: VisionEncoder.forward
    return connector(feats).flatten(0, 1)


# ---- masks: built once per forward, shared by every layer of a stack (also by pretrain/pipeline.py) ----
def decoder_mask(cfg: ModelConfig, document_ids_BT: torch.Tensor) -> AttentionMask:
    B, T = document_ids_BT.shape
    dev = document_ids_BT.device
    if cfg.document_mask:
        mm = masks.and_masks(masks.causal, masks.document(document_ids_BT))
        return AttentionMask.build(mm, B, T, None, dev, cfg.attention_backend)
    return AttentionMask.build(masks.causal, B, T, None, dev, cfg.attention_backend, plain_causal=True)


def encoder_mask(cfg: ModelConfig, enc_segments_BTe: torch.Tensor) -> AttentionMask:
    """Block-diagonal over the spans; an encoder with attention dropout (imported) uses the dense SDPA path, the one
    backend that drops attention probabilities."""
    B, Te = enc_segments_BTe.shape
    backend = "sdpa" if cfg.encoder.attention_dropout else cfg.attention_backend
    return AttentionMask.build(masks.block_diagonal(enc_segments_BTe), B, Te, None, enc_segments_BTe.device,
                               backend)


def token_losses(logits_BTv: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy [B, T] from vocab-parallel logits (megatron-core; it edits its input in place,
    hence the float() copy)."""
    tp = import_mcore().tensor_parallel
    return tp.vocab_parallel_cross_entropy(logits_BTv.float().clone() if logits_BTv.dtype == torch.float32
                                           else logits_BTv.float(), labels_BT)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer gets: frozen parameters stay out (no optimizer state)."""
    return [p for p in model.parameters() if p.requires_grad]
