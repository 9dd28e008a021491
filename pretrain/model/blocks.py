"""Transformer blocks on megatron-core tensor-parallel layers.

Our own stacks' choices (the StackConfig defaults): pre-norm RMSNorm; rotary positions (Llama's rotate-half convention, so weights export to HF Llama as
they are; Llama's `linear` and `llama3` frequency scaling); SwiGLU MLP; no biases. Attention: fused QKV
`ColumnParallelLinear` with the output laid out per key/value group as (kv_head, {q_1..q_g, k, v}, head_dim) —
Megatron's grouped-query layout; with kv_heads == heads it is (head, {q,k,v}, head_dim) — so a contiguous
tensor-parallel split gives each rank whole groups; output projection `RowParallelLinear`. MLP: gate and up
`ColumnParallelLinear`, down `RowParallelLinear`. Layers run batch-first
([B, L, d]): without sequence parallelism megatron's layers only act on the last dimension.
Weights are initialised on CPU at full size and then split (megatron's `use_cpu_initialization`), so TP=1 and
TP=2 start from the same full weights for the same seed. The same code runs at TP=1.

Variants, as configuration of the same classes (imported models: BERT-family encoders, pretrain/hf_encoders.py):
LayerNorm with bias instead of RMSNorm; post-norm (add, then norm, and no final norm: BERT) instead of pre-norm; a
two-matrix GELU MLP (erf, tanh or CLIP's quick GELU) instead of SwiGLU; biases on every linear layer (a
column-parallel bias is split with its rows, a row-parallel one is added once after the all-reduce); no rotary (learned absolute positions are the
embedding's, pretrain/model/encoders.py); dropout on each sublayer output and on the attention probabilities, active
in training mode only. megatron-core's own TransformerLayer has no post-norm, hence these blocks.

Legend: B batch, L length, d hidden, H local heads (heads / TP), K local kv heads, g = H / K, D head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import StackConfig
from pretrain.model.attention import AttentionMask, attend
from pretrain.parallel import import_mcore, tp_size


def mp_config():
    """megatron-core ModelParallelConfig for the current parallel state (fusions off: megatron's fuser is
    torch.compile, and CPU has none of its kernels)."""
    mcore = import_mcore()
    return mcore.ModelParallelConfig(
        tensor_model_parallel_size=tp_size(),
        sequence_parallel=False,
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )


def init_normal(std: float):
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama's frequency scaling as transformers defines it (`linear`: every
    frequency / factor; `llama3`: low frequencies / factor, high ones kept, a smooth ramp between)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["type"] == "linear":
        return inv_freq / factor
    if scaling["type"] == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {scaling['type']!r} is not supported")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def forward(self, position_ids_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids_BL.float()[..., None] * self.inv_freq  # [B, L, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, D]
        return emb.cos(), emb.sin()


def apply_rope(x_BHLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHLD.chunk(2, dim=-1)
    cos, sin = cos.to(x_BHLD.dtype), sin.to(x_BHLD.dtype)
    return x_BHLD * cos + torch.cat([-x2, x1], dim=-1) * sin


class SelfAttention(nn.Module):
    def __init__(self, cfg: StackConfig, init_std: float, out_std: float):
        super().__init__()
        tp = import_mcore().tensor_parallel
        mp = mp_config()
        n_tp = mp.tensor_model_parallel_size
        if cfg.kv_heads % n_tp:
            what = "heads" if cfg.kv_heads == cfg.heads else "kv_heads"
            raise ValueError(f"{what} {cfg.kv_heads} not divisible by tensor parallel size {n_tp}")
        self.local_heads, self.local_kv_heads = cfg.heads // n_tp, cfg.kv_heads // n_tp
        self.group = cfg.heads // cfg.kv_heads
        self.head_dim = cfg.head_dim
        qkv_out = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.qkv = tp.ColumnParallelLinear(cfg.hidden, qkv_out, config=mp, init_method=init_normal(init_std),
                                           bias=cfg.bias, gather_output=False, skip_bias_add=True)
        self.proj = tp.RowParallelLinear(cfg.heads * cfg.head_dim, cfg.hidden, config=mp,
                                         init_method=init_normal(out_std), bias=cfg.bias, input_is_parallel=True,
                                         skip_bias_add=True)
        self.dropout_p = cfg.attention_dropout
        if cfg.bias:  # megatron-core initialises biases to zero already; said here because HF models do the same
            for layer in (self.qkv, self.proj):
                nn.init.zeros_(layer.bias)

    def forward(self, x_BLd, rope, mask: AttentionMask, cache: "KVCache | None" = None, layer: int = 0):
        B, L, _ = x_BLd.shape
        g, K, D = self.group, self.local_kv_heads, self.head_dim
        qkv = linear(self.qkv, x_BLd).view(B, L, K, g + 2, D)
        q = qkv[:, :, :, :g].reshape(B, L, K * g, D).transpose(1, 2)  # [B,H,L,D]; head h uses kv head h // g
        k, v = qkv[:, :, :, g].transpose(1, 2), qkv[:, :, :, g + 1].transpose(1, 2)  # [B,K,L,D]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # keys/values of this layer: cached ones + these L (the mask spans all of them)
            k, v = cache.update(layer, k, v)
        p = self.dropout_p if self.training and cache is None else 0.0
        o = attend(q, k, v, mask, dropout_p=p).transpose(1, 2).reshape(B, L, self.local_heads * D)
        return linear(self.proj, o, inplace=False)


def linear(layer, x: torch.Tensor, inplace: bool = True) -> torch.Tensor:
    """A megatron-core parallel linear layer built with `skip_bias_add=True`, its bias added in place: the same
    numbers as megatron's own add, without allocating a second output-sized tensor (measured: bench.encoder_forward;
    a column-parallel matmul's output is not saved for backward, so the in-place add is safe under autograd). A
    row-parallel layer's output is its all-reduce's (at TP=1 its input returned as is, a view autograd may not
    modify in place): `inplace=False`."""
    if not torch.is_grad_enabled() and _tp_world() == 1 and not hasattr(layer.weight, "ds_id"):
        # inference at TP=1 (generation, scoring): megatron's own matmul, `torch.matmul(input, weight.t())`, without
        # its autograd Functions and identity region copies around it -- the same numbers, ~15 % less time per
        # decoding step on CPU (bench/eval_throughput.py). Not for a ZeRO-3 partitioned weight (`ds_id`): DeepSpeed
        # gathers it only when the layer itself is called
        out, bias = torch.matmul(x, layer.weight.t()), layer.bias
    else:
        out, bias = layer(x)
    if bias is None:
        return out
    return out.add_(bias) if inplace else out + bias


def _tp_world() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() \
        else 1


class FeedForward(nn.Module):
    """The MLP: column-parallel input matrices (`gate` and `up` for SwiGLU, `up` alone for GELU: BERT's
    intermediate), row-parallel `down` (BERT's output); biases where the stack has them."""

    def __init__(self, cfg: StackConfig, init_std: float, out_std: float):
        super().__init__()
        tp = import_mcore().tensor_parallel
        mp = mp_config()
        if cfg.ffn_hidden % mp.tensor_model_parallel_size:
            raise ValueError(f"ffn_hidden {cfg.ffn_hidden} not divisible by tensor parallel size")
        col = dict(config=mp, init_method=init_normal(init_std), bias=cfg.bias, gather_output=False,
                   skip_bias_add=True)
        self.swiglu = cfg.activation == "swiglu"
        if self.swiglu:
            self.gate = tp.ColumnParallelLinear(cfg.hidden, cfg.ffn_hidden, **col)
        self.up = tp.ColumnParallelLinear(cfg.hidden, cfg.ffn_hidden, **col)
        self.down = tp.RowParallelLinear(cfg.ffn_hidden, cfg.hidden, config=mp, init_method=init_normal(out_std),
                                         bias=cfg.bias, input_is_parallel=True, skip_bias_add=True)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.quick = cfg.activation == "quick_gelu"

    def forward(self, x_BLd):
        u = linear(self.up, x_BLd)
        if self.swiglu:
            h = F.silu(linear(self.gate, x_BLd)) * u
        elif self.quick:  # CLIP's activation, as transformers' QuickGELUActivation computes it
            h = u * torch.sigmoid(1.702 * u)
        else:
            h = F.gelu(u, approximate=self.approximate)
        return linear(self.down, h, inplace=False)


def freeze(module: nn.Module) -> None:
    """Frozen by the model itself (a frozen encoder prefix, a frozen vision tower): no gradients, and marked so that
    finetuning's modes (pretrain/modes/finetune.py) keep it frozen."""
    for p in module.parameters():
        p.requires_grad_(False)
        p.frozen_by_model = True


def make_norm(cfg: StackConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.hidden
    return nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.norm == "layernorm" else nn.RMSNorm(dim, eps=cfg.norm_eps)


class Block(nn.Module):
    """x + sublayer(norm(x)) (pre-norm), or norm(x + sublayer(x)) (post-norm); dropout on each sublayer output."""

    def __init__(self, cfg: StackConfig, init_std: float, n_layers: int):
        super().__init__()
        out_std = init_std / (2.0 * n_layers) ** 0.5  # GPT-2 / Megatron scaled init for residual outputs
        self.attn_norm = make_norm(cfg)
        self.attn = SelfAttention(cfg, init_std, out_std)
        self.mlp_norm = make_norm(cfg)
        self.mlp = FeedForward(cfg, init_std, out_std)
        self.post_norm = cfg.norm_position == "post"
        self.dropout = nn.Dropout(cfg.hidden_dropout) if cfg.hidden_dropout else nn.Identity()

    def forward(self, x_BLd, rope, mask: AttentionMask, cache: "KVCache | None" = None, layer: int = 0):
        if self.post_norm:
            x_BLd = self.attn_norm(x_BLd + self.dropout(self.attn(x_BLd, rope, mask, cache, layer)))
            return self.mlp_norm(x_BLd + self.dropout(self.mlp(x_BLd)))
        x_BLd = x_BLd + self.dropout(self.attn(self.attn_norm(x_BLd), rope, mask, cache, layer))
        return x_BLd + self.dropout(self.mlp(self.mlp_norm(x_BLd)))


class KVCache:
    """Keys and values of every layer for incremental decoding: [layers, B, K, S_max, D] buffers (K: local kv
    heads, so grouped-query attention caches heads/kv_heads times less), `length` filled.
    A forward over L new positions writes them at [length, length+L) in every layer and attends over [0, length+L);
    the caller then calls `advance(L)`. Under TP each rank caches its own heads."""

    def __init__(self, layers: int, B: int, local_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (layers, B, local_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor):
        end = self.length + k_BHLD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions asked for, {self.max_len} allocated")
        self.k[layer, :, :, self.length:end] = k_BHLD
        self.v[layer, :, :, self.length:end] = v_BHLD
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class Stack(nn.Module):
    """Blocks + final norm (pre-norm stacks with `final_norm`; a post-norm stack's last block ends in its norm).
    `frozen_layers` leading blocks run without autograd and stay in eval mode (no dropout) whatever `train()` says;
    `checkpoint` recomputes each block in backward (megatron-core's tensor_parallel.checkpoint, which also restores
    the RNG state)."""

    def __init__(self, cfg: StackConfig, init_std: float, rope: bool = True, frozen_layers: int = 0,
                 checkpoint: bool = False):
        super().__init__()
        self.cfg = cfg
        rope = rope and cfg.positions == "rope"
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) if rope else None
        self.layers = nn.ModuleList(Block(cfg, init_std, cfg.layers) for _ in range(cfg.layers))
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" and cfg.final_norm else nn.Identity()
        self.frozen_layers = frozen_layers
        self.checkpoint = checkpoint
        for layer in self.layers[:frozen_layers]:
            freeze(layer)

    def train(self, mode: bool = True):
        super().train(mode)
        for layer in self.layers[:self.frozen_layers]:
            layer.eval()
        return self

    def forward(self, x_BLd, position_ids_BL, mask: AttentionMask, cache: "KVCache | None" = None,
                upto: int | None = None, final_norm: bool = True):
        """`upto` k: the hidden states after the first k blocks (no final norm unless k is every block), as
        transformers' `hidden_states[k]`; `final_norm=False`: never the final norm (vision towers' hidden_states[k]
        are all before it)."""
        rope = self.rope(position_ids_BL) if self.rope is not None else None
        n = len(self.layers) if upto is None else upto
        for i, layer in enumerate(self.layers[:n]):
            if cache is not None:  # inference with a KV cache (no autograd, no recomputation)
                x_BLd = layer(x_BLd, rope, mask, cache, i)
            elif i < self.frozen_layers:
                with torch.no_grad():
                    x_BLd = layer(x_BLd, rope, mask)
            elif self.checkpoint and torch.is_grad_enabled():
                x_BLd = self._checkpointed(layer, x_BLd, rope, mask)
            else:
                x_BLd = layer(x_BLd, rope, mask)
        return self.norm(x_BLd) if n == len(self.layers) and final_norm else x_BLd

    @staticmethod
    def _checkpointed(layer, x_BLd, rope, mask):
        # megatron's checkpoint saves its positional args with save_for_backward: tensors only
        ckpt = import_mcore().tensor_parallel.checkpoint
        if rope is None:
            return ckpt(lambda x: layer(x, None, mask), False, x_BLd)
        return ckpt(lambda x, cos, sin: layer(x, (cos, sin), mask), False, x_BLd, *rope)
