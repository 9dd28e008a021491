"""Model configuration and named presets (presets as code; `tiny-cpu` is what tests and the CPU demo use).

Sizes not stated by the paper are decisions, kept switchable: SwiGLU FFN of 8/3·d rounded up to a multiple of 64
(256 for d >= 1024), vocabulary 64,000 for the paper-shaped presets, RoPE theta 10,000, RMSNorm eps 1e-5.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class StackConfig:
    """A stack of pre-norm transformer blocks (RMSNorm, RoPE, SwiGLU, no biases)."""
    layers: int
    hidden: int
    heads: int
    ffn_hidden: int = 0  # 0: SwiGLU default 8/3 * hidden, rounded up
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if not self.ffn_hidden:
            mult = 256 if self.hidden >= 1024 else 64
            self.ffn_hidden = int(math.ceil(8 * self.hidden / 3 / mult) * mult)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_params(self) -> int:
        d, f = self.hidden, self.ffn_hidden
        return 4 * d * d + 3 * d * f + 2 * d  # qkv + out, gate/up/down, two norms


@dataclass
class VisionConfig:
    """ViT: patch embedding + learned positions + bidirectional blocks (no RoPE)."""
    stack: StackConfig
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ModelConfig:
    vocab_size: int = 8000
    max_seq_length: int = 2048
    decoder: StackConfig = field(default_factory=lambda: StackConfig(4, 256, 4))
    encoder: StackConfig | None = None  # bidirectional text encoder over packed spans; None: GPT baseline
    vision: VisionConfig | None = None
    connector: str = "linear"  # text connector: linear | mlp
    vision_connector: str = "mlp"  # linear | mlp | resampler
    resampler_queries: int = 64  # image slots per image with the resampler connector
    tie_embeddings: bool = True
    freeze_encoder_layers: int = 0  # frozen prefix of the text encoder (embedding included when > 0)
    document_mask: bool = False  # decoder attention stays inside each packed document
    attention_backend: str = "auto"  # auto | flex | sdpa | flex_eager
    activation_checkpointing: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        if self.connector not in ("linear", "mlp"):
            raise ValueError(f"connector must be linear or mlp for text spans (one slot per span token), "
                             f"got {self.connector!r}")
        if self.vision_connector not in ("linear", "mlp", "resampler"):
            raise ValueError(f"vision_connector must be linear, mlp or resampler, got {self.vision_connector!r}")
        if self.encoder is not None and not 0 <= self.freeze_encoder_layers <= self.encoder.layers:
            raise ValueError(f"freeze_encoder_layers {self.freeze_encoder_layers} not in 0..{self.encoder.layers}")

    def image_slots(self) -> int:
        if self.vision is None:
            return 0
        return self.resampler_queries if self.vision_connector == "resampler" else self.vision.patches

    def param_count(self) -> dict[str, int]:
        """Parameters per part, computed from the shapes (tests check it against a built model)."""
        V, dd = self.vocab_size, self.decoder.hidden
        out = {"decoder": V * dd + self.decoder.layers * self.decoder.block_params() + dd
                          + (0 if self.tie_embeddings else V * dd)}
        if self.encoder is not None:
            de = self.encoder.hidden
            out["encoder"] = V * de + self.encoder.layers * self.encoder.block_params() + de
            out["connector"] = connector_params(self.connector, de, dd)
        if self.vision is not None:
            v = self.vision
            dv = v.stack.hidden
            out["vision"] = (v.channels * v.patch_size ** 2 * dv + dv + v.patches * dv
                             + v.stack.layers * v.stack.block_params() + dv)
            out["vision_connector"] = connector_params(self.vision_connector, dv, dd, self.resampler_queries)
        out["total"] = sum(out.values())
        return out


def connector_params(kind: str, d_in: int, d_out: int, queries: int = 0) -> int:
    if kind == "linear":
        return d_in * d_out
    if kind == "mlp":
        return d_in * d_out + 2 * d_out * d_out
    # resampler: queries, kv projection, q/out projection, norms, SwiGLU-free 4x MLP
    return queries * d_out + 2 * d_in * d_out + 2 * d_out * d_out + 2 * d_out + d_in + 8 * d_out * d_out


def _vl(vocab: int, dec: StackConfig, vis: VisionConfig, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, decoder=dec, vision=vis, vision_connector="mlp", **kw)


PRESETS = {
    "tiny-cpu": lambda: ModelConfig(vocab_size=8000, max_seq_length=512, decoder=StackConfig(4, 256, 4),
                                    encoder=StackConfig(2, 128, 2), connector="linear"),
    "gpt-baseline-tiny": lambda: ModelConfig(vocab_size=8000, max_seq_length=512, decoder=StackConfig(4, 256, 4)),
    "tiny-vl": lambda: _vl(8000, StackConfig(2, 128, 2), VisionConfig(StackConfig(2, 64, 2), image_size=32,
                                                                       patch_size=8), max_seq_length=256),
    "metalm-lo-1.3b": lambda: ModelConfig(vocab_size=64000, max_seq_length=2048, decoder=StackConfig(24, 2048, 32),
                                          encoder=StackConfig(24, 1024, 16), connector="linear",
                                          freeze_encoder_layers=22),
    "gpt-baseline-1.3b": lambda: ModelConfig(vocab_size=64000, max_seq_length=2048, decoder=StackConfig(24, 2048, 32)),
    "metalm-vl-350m": lambda: _vl(64000, StackConfig(24, 1024, 16),
                                  VisionConfig(StackConfig(12, 1024, 16), image_size=224, patch_size=16)),
    "gpt-baseline-350m": lambda: ModelConfig(vocab_size=64000, max_seq_length=2048, decoder=StackConfig(24, 1024, 16)),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    cfg = PRESETS[name]()
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
