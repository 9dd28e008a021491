"""Hugging Face state-dict adapters (torchtitan's `state_dict_adapter` shape): one class per foreign architecture,
each mapping our state dict to theirs and back, building their config from ours and ours from theirs.

    adapter = ADAPTERS["llama"](cfg)      # cfg: our TrainConfig
    hf_sd = adapter.to_hf(sd)             # MetaLM names -> LlamaForCausalLM names
    sd = adapter.from_hf(hf_sd)
    adapter.hf_config(tokenizer)          # transformers.LlamaConfig
    LlamaAdapter.stack_config(hc, where)  # config.json -> our StackConfig, refusing what we cannot run as-is

pretrain/convert.py's export-hf / import-hf use them; an encoder adapter (a BERT-family text encoder, a vision tower)
is another class beside `LlamaAdapter`. Every refusal is a `ConvertError` naming the field.
"""
from __future__ import annotations

import torch

from pretrain.model_io import ConvertError


class StateDictAdapter:
    """Maps the parameters of one part of a MetaLM to a Hugging Face model of `model_type` and back."""
    model_type = ""

    def __init__(self, cfg):
        self.cfg = cfg

    def to_hf(self, sd: dict) -> dict:
        raise NotImplementedError

    def from_hf(self, hf: dict) -> dict:
        raise NotImplementedError


class LlamaAdapter(StateDictAdapter):
    """Our decoder <-> LlamaForCausalLM (fused QKV split into q/k/v, SwiGLU gate/up, RMSNorm, rotary)."""
    model_type = "llama"

    @staticmethod
    def _hf_names(L: int) -> dict:
        """Our decoder name -> LlamaForCausalLM name (qkv and gate/up handled separately)."""
        m = {"decoder.embedding.weight": "model.embed_tokens.weight", "decoder.stack.norm.weight": "model.norm.weight",
             "decoder.output.weight": "lm_head.weight"}
        for i in range(L):
            p, q = f"decoder.stack.layers.{i}.", f"model.layers.{i}."
            m.update({p + "attn_norm.weight": q + "input_layernorm.weight",
                      p + "mlp_norm.weight": q + "post_attention_layernorm.weight",
                      p + "attn.proj.weight": q + "self_attn.o_proj.weight",
                      p + "mlp.gate.weight": q + "mlp.gate_proj.weight", p + "mlp.up.weight": q + "mlp.up_proj.weight",
                      p + "mlp.down.weight": q + "mlp.down_proj.weight"})
        return m

    def to_hf(self, sd: dict) -> dict:
        d = self.cfg.model.decoder
        H, K, D = d.heads, d.kv_heads, d.head_dim
        g = H // K
        out = {}
        for ours, theirs in self._hf_names(d.layers).items():
            if ours in sd:
                out[theirs] = sd[ours]
        for i in range(d.layers):
            # our fused QKV rows are laid out (kv_head, {q_1..q_g, k, v}, head_dim): split into HF's q/k/v projections
            qkv = sd[f"decoder.stack.layers.{i}.attn.qkv.weight"].view(K, g + 2, D, d.hidden)
            p = f"model.layers.{i}.self_attn."
            out[p + "q_proj.weight"] = qkv[:, :g].reshape(H * D, d.hidden).contiguous()
            out[p + "k_proj.weight"] = qkv[:, g].reshape(K * D, d.hidden).contiguous()
            out[p + "v_proj.weight"] = qkv[:, g + 1].reshape(K * D, d.hidden).contiguous()
        return out

    def from_hf(self, hf: dict) -> dict:
        d = self.cfg.model.decoder
        H, K, D = d.heads, d.kv_heads, d.head_dim
        g = H // K
        out = {}
        for ours, theirs in self._hf_names(d.layers).items():
            if theirs in hf and not (ours == "decoder.output.weight" and self.cfg.model.tie_embeddings):
                out[ours] = hf[theirs]
        for i in range(d.layers):
            p = f"model.layers.{i}.self_attn."
            q = hf[p + "q_proj.weight"].view(K, g, D, d.hidden)
            k = hf[p + "k_proj.weight"].view(K, 1, D, d.hidden)
            v = hf[p + "v_proj.weight"].view(K, 1, D, d.hidden)
            out[f"decoder.stack.layers.{i}.attn.qkv.weight"] = torch.cat([q, k, v], 1).reshape((H + 2 * K) * D, d.hidden)
        return out

    def hf_config(self, tokenizer):
        from transformers import LlamaConfig

        m, d = self.cfg.model, self.cfg.model.decoder
        return LlamaConfig(vocab_size=m.vocab_size, hidden_size=d.hidden, intermediate_size=d.ffn_hidden,
                           num_hidden_layers=d.layers, num_attention_heads=d.heads, num_key_value_heads=d.kv_heads,
                           head_dim=d.head_dim, hidden_act="silu", max_position_embeddings=m.max_seq_length,
                           rms_norm_eps=d.norm_eps, rope_parameters=rope_parameters(d),
                           tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False,
                           bos_token_id=tokenizer.ids.bos, eos_token_id=tokenizer.ids.eos,
                           pad_token_id=tokenizer.ids.pad, torch_dtype="float32")

    @staticmethod
    def stack_config(hc: dict, where: str):
        """StackConfig for a Llama config.json, or ConvertError naming the first field we cannot run as transformers
        does (never a silent import with other numbers)."""
        from pretrain.config import ROPE_SCALING, StackConfig

        if hc.get("model_type") != "llama":
            raise ConvertError(f"{where}: model_type {hc.get('model_type')!r}, only 'llama' can be imported")
        act = hc.get("hidden_act", hc.get("hidden_activation", "silu"))
        if act != "silu":
            raise ConvertError(f"{where}: hidden_act {act!r}: only silu (SwiGLU) is supported by our decoder")
        for key in ("attention_bias", "mlp_bias"):
            if hc.get(key):
                raise ConvertError(f"{where}: {key}=true: biases are not supported by our decoder")
        if (hc.get("pretraining_tp") or 1) != 1:
            raise ConvertError(f"{where}: pretraining_tp={hc['pretraining_tp']}: only 1 is supported")
        rope = dict(hc.get("rope_parameters") or {})
        if hc.get("rope_scaling"):
            rope.update(hc["rope_scaling"])
        theta = float(hc.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        kind = rope.get("rope_type", rope.get("type", "default")) or "default"
        scaling = None
        if kind != "default":
            if kind not in ROPE_SCALING:
                raise ConvertError(f"{where}: rope_scaling type {kind!r} is not supported (supported: default, "
                                   f"{', '.join(ROPE_SCALING)})")
            missing = [k for k in ROPE_SCALING[kind] if k not in rope]
            if missing:
                raise ConvertError(f"{where}: rope_scaling {kind} needs {', '.join(missing)}")
            scaling = {"type": kind, **{k: rope[k] for k in ROPE_SCALING[kind]}}
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConvertError(f"{where}: partial_rotary_factor={rope['partial_rotary_factor']}: only full rotary "
                               "embeddings are supported")
        heads = hc["num_attention_heads"]
        kv = hc.get("num_key_value_heads") or heads
        if heads % kv:
            raise ConvertError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        try:
            return StackConfig(hc["num_hidden_layers"], hc["hidden_size"], heads, ffn_hidden=hc["intermediate_size"],
                               norm_eps=hc["rms_norm_eps"], rope_theta=theta, kv_heads=kv,
                               head_dim=hc.get("head_dim") or 0, rope_scaling=scaling)
        except ValueError as e:
            raise ConvertError(f"{where}: {e}") from None


ADAPTERS = {LlamaAdapter.model_type: LlamaAdapter}


def rope_parameters(d) -> dict:
    """Our rotary settings in transformers' `rope_parameters` form."""
    params = {"rope_type": "default", "rope_theta": d.rope_theta}
    if d.rope_scaling:
        params.update({k: v for k, v in d.rope_scaling.items() if k != "type"}, rope_type=d.rope_scaling["type"])
    return params
