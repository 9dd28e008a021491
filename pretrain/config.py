"""Model configuration and named presets (presets as code; `tiny-cpu` is what tests and the CPU demo use).

Sizes not stated by the paper are decisions, kept switchable: SwiGLU FFN of 8/3·d rounded up to a multiple of 64
(256 for d >= 1024), vocabulary 64,000 for the paper-shaped presets, RoPE theta 10,000, RMSNorm eps 1e-5.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field

from data_tools.data_config import DataConfig


class ConfigError(ValueError):
    """A mistake in a config file or override, naming the field."""


ROPE_SCALING = {  # supported rope_scaling types and their keys (transformers' names), see RotaryEmbedding
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


NORMS, NORM_POSITIONS, ACTIVATIONS, POSITIONS = ("rmsnorm", "layernorm"), ("pre", "post"), \
    ("swiglu", "gelu", "gelu_tanh", "quick_gelu"), ("rope", "learned")


@dataclass
class StackConfig:
    """A stack of transformer blocks. Our own stacks: pre-norm RMSNorm, RoPE, SwiGLU, no biases (the defaults). The
    variants are configuration of the same block (pretrain/model/blocks.py), for imported models: BERT-family
    encoders are post-norm LayerNorm with biases, a GELU MLP and learned absolute positions."""
    layers: int
    hidden: int
    heads: int
    ffn_hidden: int = 0  # 0: SwiGLU default 8/3 * hidden, rounded up
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    kv_heads: int = 0  # 0: = heads; fewer: grouped-query attention (heads a multiple of kv_heads)
    head_dim: int = 0  # 0: hidden // heads; Llama-family configs may set it explicitly
    rope_scaling: dict | None = None  # None, {"type": "linear", "factor": f} or {"type": "llama3", ...} (ROPE_SCALING)
    norm: str = "rmsnorm"  # rmsnorm | layernorm (with bias)
    norm_position: str = "pre"  # pre (norm -> sublayer -> add; a final norm) | post (add -> norm, BERT; no final norm)
    activation: str = "swiglu"  # swiglu | gelu (erf) | gelu_tanh | quick_gelu (CLIP): a two-matrix MLP with that one
    bias: bool = False  # biases on the attention and MLP linear layers
    positions: str = "rope"  # rope | learned (absolute positions added to the embedding: encoders only)
    hidden_dropout: float = 0.0  # on each sublayer's output (and the embedding), in training mode only
    attention_dropout: float = 0.0  # on the attention probabilities, in training mode only
    final_norm: bool = True  # pre-norm stacks: a norm after the last block (CLIP's vision tower has none)

    def __post_init__(self):
        for key, allowed in (("norm", NORMS), ("norm_position", NORM_POSITIONS), ("activation", ACTIVATIONS),
                             ("positions", POSITIONS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: expected {' | '.join(allowed)}, got {getattr(self, key)!r}")
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key}: expected a probability in [0, 1), got {getattr(self, key)}")
        if not self.head_dim:
            if self.hidden % self.heads:
                raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
            self.head_dim = self.hidden // self.heads
        if not self.kv_heads:
            self.kv_heads = self.heads
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (rotary embedding)")
        if not self.ffn_hidden and self.activation != "swiglu":
            self.ffn_hidden = 4 * self.hidden
        elif not self.ffn_hidden:
            mult = 256 if self.hidden >= 1024 else 64
            self.ffn_hidden = int(math.ceil(8 * self.hidden / 3 / mult) * mult)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            if kind not in ROPE_SCALING:
                raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_SCALING)})")
            missing = [k for k in ROPE_SCALING[kind] if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling {kind}: missing {', '.join(missing)}")

    def block_params(self) -> int:
        d, f, q, kv = self.hidden, self.ffn_hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        mlp = (3 if self.activation == "swiglu" else 2) * d * f  # gate/up/down, or up/down
        biases = (q + 2 * kv + d + (2 if self.activation == "swiglu" else 1) * f + d) if self.bias else 0
        return 2 * d * q + 2 * d * kv + mlp + self.norm_params() * 2 + biases  # q + out, k + v, mlp, two norms

    def norm_params(self) -> int:
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    def final_norm_params(self) -> int:
        return self.norm_params() if self.norm_position == "pre" and self.final_norm else 0


@dataclass
class EncoderConfig(StackConfig):
    """The text encoder: a stack plus its embedding. Our own encoders share the decoder's vocabulary and use rotary
    positions. An imported one (pretrain/hf_encoders.py: BERT, RoBERTa, ELECTRA) keeps its own vocabulary and
    tokenizer (the loader re-tokenizes each span, data_tools/encoder_tokens.py), learned positions, token-type
    embeddings and an embedding LayerNorm."""
    vocab_size: int = 0  # 0: the decoder's vocabulary (model.vocab_size); else the encoder's own (padded for TP)
    hf_vocab_size: int = 0  # an imported encoder's vocabulary before padding (what export-encoder writes)
    tokenizer: str = ""  # the encoder's own tokenizer (a tokenizer.json or its directory); "": the decoder's
    pad_id: int = 0  # encoder row padding (own tokenizer only)
    max_positions: int = 0  # learned positions: the table size (BERT 512); also the longest encoder piece
    position_offset: int = 0  # first position id of a span (RoBERTa: padding_idx + 1 = 2)
    type_vocab_size: int = 0  # token-type embeddings (every span is type 0); 0: none
    embedding_norm: bool = False  # LayerNorm (eps norm_eps) on the summed embeddings
    embedding_size: int = 0  # 0: hidden; smaller (ELECTRA): a linear projection to hidden after the embedding
    # the paper's freezing (METHOD.md): embeddings and the bottom layers frozen, the top k trained; -1: not used
    # (model.freeze_encoder_layers decides)
    trainable_top_layers: int = -1
    from_hf: str = ""  # a BertModel / RobertaModel / ElectraModel directory: architecture, weights and tokenizer
    hf_model_type: str = ""  # set from from_hf / import-encoder: bert | roberta | electra (what export-encoder writes)

    def __post_init__(self):
        super().__post_init__()
        if self.positions == "learned" and self.max_positions < 1:
            raise ValueError("positions=learned needs max_positions (the position table size)")
        if self.trainable_top_layers < -1 or self.trainable_top_layers > self.layers:
            raise ValueError(f"trainable_top_layers {self.trainable_top_layers} not in -1..{self.layers}")

    @property
    def own_vocabulary(self) -> bool:
        return bool(self.vocab_size)

    def embedding_params(self, shared_vocab: int) -> int:
        e = self.embedding_size or self.hidden
        n = (self.vocab_size or shared_vocab) * e + self.max_positions * e * (self.positions == "learned")
        n += self.type_vocab_size * e + (2 * e if self.embedding_norm else 0)
        return n + ((e * self.hidden + self.hidden) if self.embedding_size and self.embedding_size != self.hidden
                    else 0)


@dataclass
class VisionConfig:
    """ViT: patch embedding + learned positions + bidirectional blocks (no RoPE). Our own towers: no class token, a
    patch-embedding bias, pre-norm blocks with a final norm. Imported ones (pretrain/hf_vision.py: CLIP, SigLIP, ViT)
    set the rest: a class token, CLIP's LayerNorm before the blocks, no final norm, their preprocessing."""
    stack: StackConfig
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    # paper variant (METHOD.md §4): the encoder also reads up to this many caption-prefix tokens, bidirectionally
    # with the patches; their outputs dock into the prefix's decoder positions (0 = images only)
    caption_prefix: int = 0
    class_token: bool = False  # a learned class embedding before the patches (CLIP, ViT)
    patch_bias: bool = True  # the patch embedding's bias (CLIP has none)
    pre_norm: bool = False  # a LayerNorm on the embeddings before the blocks (CLIP's pre_layrnorm)
    # which features dock: None = the tower's output (transformers' last_hidden_state: after the final norm where
    # the tower has one); k = transformers' hidden_states[k] (0 the embeddings, -1 the last block, -2 LLaVA's);
    # blocks above it are not run and not trained
    feature_layer: int | None = None
    keep_class_token: bool = True  # with class_token: its feature docks too (False: patches only, as LLaVA)
    # freezing by layer index: the patch/position embeddings and the bottom blocks frozen, the top k trained;
    # -1: not used (model.freeze_vision decides: all or nothing)
    trainable_top_layers: int = -1
    from_hf: str = ""  # a CLIP / SigLIP / ViT directory: architecture, weights at step 0, preprocessing
    interpolate_to: int = 0  # from_hf: train at this image size (positions interpolated); 0: the checkpoint's
    hf_model_type: str = ""  # set from from_hf / import-encoder: clip_vision_model | siglip_vision_model | vit
    # the checkpoint's preprocessor_config.json (validated, data_tools/vl_samples.Preprocessor); None: our own
    # (bicubic resize to image_size, CLIP's mean/std)
    preprocessor: dict | None = None

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.class_token and self.caption_prefix:
            raise ValueError("caption_prefix with a class token is not supported (the prefix rows follow the "
                             "patches)")
        n = self.stack.layers
        if self.feature_layer is not None and not -(n + 1) <= self.feature_layer <= n:
            raise ValueError(f"feature_layer {self.feature_layer} not in {-(n + 1)}..{n} ({n} blocks)")
        if not -1 <= self.trainable_top_layers <= n:
            raise ValueError(f"trainable_top_layers {self.trainable_top_layers} not in -1..{n}")

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        """The encoder row per image: patches and the class token."""
        return self.patches + self.class_token

    @property
    def features(self) -> int:
        """Image features that dock per image (before a resampler)."""
        return self.patches + (self.class_token and self.keep_class_token)

    @property
    def blocks_run(self) -> int:
        """Blocks the features need (feature_layer k: the first k)."""
        n, k = self.stack.layers, self.feature_layer
        return n if k is None else (k if k >= 0 else n + 1 + k)

    @property
    def frozen_layers(self) -> int:
        """Bottom blocks that do not train with trainable_top_layers k: all but the top k of the blocks run
        (model.freeze_vision freezes the whole tower instead)."""
        return max(0, self.blocks_run - self.trainable_top_layers) if self.trainable_top_layers >= 0 else 0


@dataclass
class ModelConfig:
    vocab_size: int = 8000
    max_seq_length: int = 2048
    decoder: StackConfig = field(default_factory=lambda: StackConfig(4, 256, 4))
    encoder: EncoderConfig | None = None  # bidirectional text encoder over packed spans; None: GPT baseline
    vision: VisionConfig | None = None
    connector: str = "linear"  # text connector: linear | mlp
    vision_connector: str = "mlp"  # linear | mlp | resampler
    resampler_queries: int = 64  # image slots per image with the resampler connector
    tie_embeddings: bool = True
    freeze_encoder_layers: int = 0  # frozen prefix of the text encoder (embedding included when > 0)
    freeze_vision: bool = False  # the vision encoder is not trained (the usual setting for a pretrained one)
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
        if self.vision is not None and self.vision.caption_prefix and self.vision_connector == "resampler":
            raise ValueError("vision.caption_prefix needs a per-position vision connector (linear or mlp): the "
                             "prefix tokens' outputs dock one per token")
        if self.encoder is not None and not isinstance(self.encoder, EncoderConfig):  # a plain StackConfig given
            self.encoder = EncoderConfig(**dataclasses.asdict(self.encoder))
        if self.encoder is not None and self.encoder.trainable_top_layers >= 0:
            frozen = self.encoder.layers - self.encoder.trainable_top_layers
            if self.freeze_encoder_layers not in (0, frozen):
                raise ValueError(f"freeze_encoder_layers {self.freeze_encoder_layers} contradicts "
                                 f"encoder.trainable_top_layers {self.encoder.trainable_top_layers} "
                                 f"({self.encoder.layers} layers); set one of them")
            self.freeze_encoder_layers = frozen
        if self.vision is not None and self.freeze_vision and self.vision.trainable_top_layers > 0:
            raise ValueError(f"freeze_vision=true contradicts vision.trainable_top_layers "
                             f"{self.vision.trainable_top_layers}; set one of them")
        if self.encoder is not None and not 0 <= self.freeze_encoder_layers <= self.encoder.layers:
            raise ValueError(f"freeze_encoder_layers {self.freeze_encoder_layers} not in 0..{self.encoder.layers}")

    def flops_per_token(self, seq_length: int) -> float:
        """Training FLOPs per decoder token, PaLM appendix B: 6·N + 12·layers·d·T, N = parameters without the input
        embedding (tied: the output layer is counted); the text encoder's span tokens are counted the same way at
        the sampled coverage."""
        parts = self.param_count()
        dec = self.decoder
        n_dec = parts["decoder"] - (self.vocab_size * dec.hidden if not self.tie_embeddings else 0)
        flops = 6 * n_dec + 12 * dec.layers * dec.hidden * seq_length
        if self.encoder is not None:  # ~25 % of tokens, spans <= 128; a frozen layer costs its forward only
            enc, k = self.encoder, self.freeze_encoder_layers
            n_train = (enc.layers - k) * enc.block_params() + parts["connector"]
            n_frozen = k * enc.block_params()
            attn = (12 * (enc.layers - k) + 4 * k) * enc.hidden * 128
            flops += 0.25 * (6 * n_train + 2 * n_frozen + attn)
        return float(flops)

    def image_slots(self) -> int:
        if self.vision is None:
            return 0
        return self.resampler_queries if self.vision_connector == "resampler" else self.vision.features

    def param_count(self) -> dict[str, int]:
        """Parameters per part, computed from the shapes (tests check it against a built model)."""
        V, dd = self.vocab_size, self.decoder.hidden
        out = {"decoder": V * dd + self.decoder.layers * self.decoder.block_params() + dd
                          + (0 if self.tie_embeddings else V * dd)}
        if self.encoder is not None:
            de = self.encoder.hidden
            e = self.encoder
            out["encoder"] = e.embedding_params(V) + e.layers * e.block_params() + e.final_norm_params()
            out["connector"] = connector_params(self.connector, de, dd)
        if self.vision is not None:
            v = self.vision
            dv = v.stack.hidden
            out["vision"] = (v.channels * v.patch_size ** 2 * dv + dv * v.patch_bias + v.tokens * dv
                             + dv * v.class_token + 2 * dv * v.pre_norm
                             + v.stack.layers * v.stack.block_params() + v.stack.final_norm_params()
                             + ((V + v.caption_prefix) * dv if v.caption_prefix else 0))
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
    # tiny-vl with a tower of CLIP's structure (class token, pre-LayerNorm, LayerNorm blocks with biases, quick GELU,
    # no final norm): a tower we train ourselves that export-encoder writes as a CLIPVisionModel
    "tiny-vl-clip": lambda: _vl(8000, StackConfig(2, 128, 2), VisionConfig(
        StackConfig(2, 64, 2, norm="layernorm", activation="quick_gelu", bias=True, final_norm=False),
        image_size=32, patch_size=8, class_token=True, pre_norm=True, patch_bias=False), max_seq_length=256),
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


# ====================================================================== the training config tree
@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1  # not applied to norms, embeddings and biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # per_token: every counted target of a step weighs the same across micro-batches and data-parallel ranks
    # (Megatron's calculate_per_token_loss); per_microbatch: the mean of the micro-batch means
    loss_normalization: str = "per_microbatch"

    def __post_init__(self):
        if self.loss_normalization not in ("per_microbatch", "per_token"):
            raise ConfigError(f"optimizer.loss_normalization: expected per_microbatch or per_token, got "
                              f"{self.loss_normalization!r}")


@dataclass
class ScheduleConfig:
    train_steps: int = 1000
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | constant

    def __post_init__(self):
        if self.decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"schedule.decay: expected cosine, linear or constant, got {self.decay!r}")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    micro_batch: int = 4
    grad_accum: int = 1
    deepspeed: str = "zero2"  # a name in ds_configs/ or a path to a DeepSpeed JSON
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: GPU only, with loss scaling)
    timeout_s: float = 600.0  # collectives: a dead rank makes the others fail after this long
    # watchdog (pretrain/watchdog.py): a step, save or evaluation running longer than this ends the job (exit 4);
    # 0 = derived: max(step_timeout_floor_s, 20 x the slowest step so far)
    step_timeout_s: float = 0.0
    step_timeout_floor_s: float = 300.0
    pipeline_engine: bool = False  # use DeepSpeed's pipeline engine even at pp=1 (always on for pp>1)
    # torch.compile each transformer block and connector (inductor, static shapes; pretrain/compile.py), applied
    # where the engine is built: the model code and the checkpoint names do not change
    compile: bool = False

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"parallel.precision: expected fp32, bf16 or fp16, got {self.precision!r}")


@dataclass
class CheckpointConfig:
    save_interval: int = 100  # steps; 0: only at the end and on SIGTERM/SIGINT
    keep_last: int = 3
    resume: str = "auto"  # auto | none | a checkpoint tag directory
    init_from: str = ""  # a consolidated directory (pretrain.convert) to start from when there is nothing to resume
    # pretraining from init_from: take the model settings (and, when the config names none, the tokenizer) from it;
    # a text encoder / vision encoder the source lacks (an imported Llama) comes from the config, freshly
    # initialised. Finetuning has its own switch (finetune.model_from_init, on by default)
    model_from_init: bool = False
    checksums: bool = True  # crc32 of every file in the COMPLETE manifest, verified (by rank 0) before resuming


@dataclass
class LoggingConfig:
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: float = 989.0  # per GPU, for MFU (H100 SXM dense bf16); MFU is reported on GPUs only
    # in-loop zero/few-shot scoring at every eval_interval (eval.downstream): task names from data_tools.tasks,
    # their fetched data in downstream_data, the first downstream_items items of downstream_split
    downstream_tasks: list = field(default_factory=list)
    downstream_shots: list = field(default_factory=lambda: [0])
    downstream_data: str = "work/tasks"
    downstream_items: int = 64
    downstream_split: str = "validation"


# the data section is data_tools' own config type (one type: the trainer's `data.*` and the dataset builders' input)
DataSection = DataConfig


@dataclass
class FinetuneConfig:
    """Finetuning on registry tasks (pretrain/finetune.py): a non-empty `tasks` turns the trainer's data into task
    rows; the rest of the trainer (DeepSpeed, ZeRO, TP, checkpoints, resume, logging) is unchanged."""
    tasks: list = field(default_factory=list)  # names from data_tools.tasks
    weights: list = field(default_factory=list)  # per-task sampling weights; default: train-split sizes
    data_dir: str = "work/tasks"  # `python -m data_tools.tasks fetch` output
    mode: str = "auto"  # auto (encoder for a MetaLM, decoder for a GPT) | encoder | full | decoder
    placement: str = "auto"  # auto (encoder for a MetaLM, causal for a GPT) | encoder | causal
    pack: bool = True  # several examples per row (document mask), T5-style
    max_items: int = 0  # the first N train items of each task (0: all)
    templates: str = "first"  # first | all (item i of a task rendered with template i mod n: FLAN's mixture)
    held_out: list = field(default_factory=list)  # clusters held out of tuning: a task of one is refused
    eval_items: int = 0  # validation items scored per task at each evaluation (0: all)
    eval_shots: int = 0  # demonstrations when scoring validation accuracy
    model_from_init: bool = True  # take model (and tokenizer) settings from checkpoint.init_from


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=lambda: PRESETS["tiny-cpu"]())
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run_dir: str = "runs/default"
    seed: int = 1234
    # a step is bad when any of its micro-batches had a non-finite loss (skipped, replaced by the next); this many
    # bad steps in a row, or this many non-finite micro-batches in a row inside one step, stop the run (exit 3)
    max_bad_steps: int = 5
    # extra training callbacks (pretrain/callbacks.py): [{path: package.module.Class, keyword: value, ...}, ...]
    callbacks: list = field(default_factory=list)




# ====================================================================== YAML + dotted overrides
def package_dir(name: str) -> str:
    """A data package shipped beside pretrain/ (configs, ds_configs): the source tree's or the installed wheel's."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
    return list(spec.submodule_search_locations)[0]



def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file and `dotted.key=value` overrides (values parsed as YAML). `model.preset`
    (default tiny-cpu) is the base the other `model.*` keys change."""
    import yaml

    raw: dict = {}
    if path and not os.path.exists(path) and "/" not in path and not path.endswith((".yaml", ".yml")):
        named = os.path.join(package_dir("configs"), path + ".yaml")  # by name: configs/NAME.yaml
        if os.path.isfile(named):
            path = named
    if path:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for ov in overrides:
        key, eq, value = ov.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {ov!r}: expected dotted.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return _build(TrainConfig, raw, "")


def _model_base(raw: dict) -> dict:
    name = raw.pop("preset", "tiny-cpu")
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    base = dataclasses.asdict(PRESETS[name]())
    for stack in _stacks(base):  # derived sizes follow the hidden size / heads when those are overridden
        derived = StackConfig(stack["layers"], stack["hidden"], stack["heads"])
        for key in ("ffn_hidden", "head_dim", "kv_heads"):
            if stack[key] == getattr(derived, key):
                stack[key] = 0
    return _merge(base, raw)


def _stacks(d: dict):
    for key in ("decoder", "encoder"):
        if isinstance(d.get(key), dict):
            yield d[key]
    if isinstance(d.get("vision"), dict):
        yield d["vision"]["stack"]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _build(cls, raw: dict, path: str):
    if cls is ModelConfig:
        raw = _model_base(dict(raw))
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"{path}{unknown[0]}: unknown key (known in {path.rstrip('.') or 'the top level'}: "
                          f"{', '.join(sorted(hints))})")
    kwargs = {name: _convert(hints[name], value, f"{path}{name}") for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path.rstrip('.') or 'config'}: {e}") from None


def _convert(tp, value, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a section (mapping), got {value!r}")
        return _build(tp, value, path + ".")
    expect = origin or tp
    if expect is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expect is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if expect is list and isinstance(value, (str, int, float)):
        return [value]
    if expect is int and isinstance(value, bool) or not isinstance(value, expect):
        raise ConfigError(f"{path}: expected {getattr(expect, '__name__', expect)}, got {value!r}")
    return value


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
