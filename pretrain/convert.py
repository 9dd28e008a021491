"""Checkpoint conversion: consolidate, reshard, Hugging Face export and import.

    python -m pretrain.convert consolidate --checkpoint RUN/checkpoints/step_00001000 --out exported/metalm
    python -m pretrain.convert reshard --checkpoint RUN/checkpoints/step_00001000 --out exported/reshard
        # then: python -m pretrain.launch ... -- checkpoint.init_from=exported/reshard parallel.tp=4 ...
    python -m pretrain.convert export-hf --model exported/metalm --out hf/metalm-decoder
    python -m pretrain.convert import-hf --hf hf/some-llama --out exported/from-hf [--encoder-preset tiny-cpu]

The consolidated format (also the self-contained export of the full MetaLM: encoders, connector, decoder):
    DIR/model.safetensors   every parameter under its `MetaLM` name, full (unsharded) tensors, fp32 or bf16
    DIR/config.yaml         the resolved training config (its `model` section builds the model)
    DIR/tokenizer.model     the SentencePiece model
    DIR/metalm.json         format, version, source checkpoint, step and consumed samples
Load it with `load_consolidated(DIR)` (no DeepSpeed, no launcher). Every output is written under a temporary name
and renamed when complete.

Where the weights come from: ZeRO-3, and ZeRO-1/2 at TP=1 without pipelining, go through DeepSpeed's
`zero_to_fp32` (the fp32 master weights); otherwise the per-rank module / per-layer files DeepSpeed wrote (in the
training dtype), merged over TP ranks along each layer's partition dimension and renamed from pipeline layers.

Not supported, and why: a BERT-family encoder cannot be imported into our text encoder: BERT blocks are post-norm
LayerNorm with biases, learned absolute positions and a GELU MLP, ours are pre-norm RMSNorm, rotary, SwiGLU without
biases; no weight mapping preserves the function. Optimizer state is not carried across a reshard (AdamW moments
restart; weights, step, LR schedule position and data position are kept).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
from typing import Sequence

import torch

from data_tools.durable import fsync_dir, fsync_tree

FORMAT = "metalm-consolidated"
TP_DIM = {"embedding.weight": 0, "word.weight": 0, "qkv.weight": 0, "gate.weight": 0, "up.weight": 0,
          "output.weight": 0, "proj.weight": 1, "down.weight": 1}


class ConvertError(Exception):
    """A bad input for conversion (path, architecture, missing shard, vocabulary): one line, exit status 2."""


def tp_dim(name: str) -> int | None:
    """Partition dimension of a tensor-parallel parameter (megatron Column/Row/VocabParallel), None if replicated.
    Vision and connector parameters are replicated."""
    if name.startswith(("vision", "connector")):
        return None
    for suffix, dim in TP_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


# ---------------------------------------------------------------- reading DeepSpeed checkpoints
def _load_config(tag_dir: str):
    from pretrain.config import load_config

    path = os.path.join(tag_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConvertError(f"{tag_dir}: no config.yaml (not a checkpoint written by pretrain.train)")
    return load_config(path)


def source_config(path: str):
    """The training config saved with a consolidated dir or a run / checkpoint dir (no weights read)."""
    if os.path.isfile(os.path.join(path, "metalm.json")):
        return _load_config(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    return _load_config(resolve_tag_dir(path))


def read_model(path: str) -> tuple[object, dict, dict]:
    """(cfg, full state dict, info) from a consolidated dir or a run / checkpoint dir."""
    if os.path.isfile(os.path.join(path, "metalm.json")):
        return read_consolidated(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    return read_checkpoint(path)


def resolve_tag_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise ConvertError(f"checkpoint not found: {path}")
    if os.path.isfile(os.path.join(path, "latest")):
        path = os.path.join(path, open(os.path.join(path, "latest")).read().strip())
    if not os.path.isfile(os.path.join(path, "COMPLETE")):
        raise ConvertError(f"{path}: not a complete checkpoint (no COMPLETE marker: cut off while saving?)")
    from pretrain.checkpoint import damage

    if why := damage(path, checksums=True):
        raise ConvertError(f"{path}: damaged checkpoint: {why}")
    return path


def _torch_load(path: str):
    if not os.path.isfile(path):
        raise ConvertError(f"missing shard: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def _merge_tp(shards: list[dict]) -> dict:
    out = {}
    for name, t in shards[0].items():
        if not isinstance(t, torch.Tensor):
            continue
        dim = tp_dim(name)
        out[name] = torch.cat([s[name] for s in shards], dim=dim) if dim is not None and len(shards) > 1 else t
    return out


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


def read_checkpoint(path: str) -> tuple[object, dict, dict]:
    """(TrainConfig, full fp32 state dict under MetaLM names, extra info) from a DeepSpeed checkpoint tag dir."""
    tag_dir = resolve_tag_dir(path)
    cfg = _load_config(tag_dir)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    first = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(first):  # ZeRO-3 names its model states per data-parallel rank
        first = os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    states = _torch_load(first)
    stage = states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    layer_files = sorted(glob.glob(os.path.join(tag_dir, "layer_*-model_states.pt")))
    if layer_files:
        sd = {}
        n_layers = cfg.model.decoder.layers
        for layer in sorted({int(os.path.basename(f)[6:8]) for f in layer_files}):
            shards = [_torch_load(os.path.join(tag_dir, f"layer_{layer:02d}-model_{r:02d}-model_states.pt"))
                      for r in range(tp)]
            for name, t in _merge_tp(shards).items():
                target = pipeline_to_metalm(layer, name, n_layers)
                if target is not None:
                    sd[target] = t.float()
        source = "pipeline layer files"
    elif stage >= 1 and tp == 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ckpt_dir, tag = os.path.split(tag_dir)
        try:
            full = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
        except (ValueError, FileNotFoundError) as e:  # DeepSpeed names the missing or extra shard files
            raise ConvertError(f"{tag_dir}: {e}") from None
        sd = {k: v.float() for k, v in full.items() if isinstance(v, torch.Tensor)}
        source = f"zero_to_fp32 (ZeRO-{stage})"
        # frozen parameters (finetuning) have no fp32 master in the optimizer; DeepSpeed records them for
        # zero_to_fp32 at some stages only, but under ZeRO-1/2 the module states always hold them whole
        frozen = [k for k, v in states["module"].items() if isinstance(v, torch.Tensor) and k not in sd
                  and not k.endswith("._extra_state")]
        if frozen and stage >= 3:
            raise ConvertError(f"{tag_dir}: ZeRO-3 checkpoint without its frozen parameters ({frozen[0]}, ...)")
        sd.update({k: states["module"][k].float() for k in frozen})
    elif stage == 3:
        raise ConvertError(f"{tag_dir}: ZeRO-3 with tensor parallelism (tp={tp}) is not supported by zero_to_fp32")
    else:
        shards = [states] + [_torch_load(os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt"))
                             for r in range(1, tp)]
        sd = {k: v.float() for k, v in _merge_tp([s["module"] for s in shards]).items()}
        source = f"module states ({tp} TP ranks)"
    sd = {k: v for k, v in sd.items() if not k.endswith("._extra_state")}  # megatron's (empty) TE hook state
    extra_path = os.path.join(tag_dir, "extra", "rank_0.pt")
    extra = torch.load(extra_path, weights_only=False)["state"] if os.path.isfile(extra_path) else {}
    from pretrain.checkpoint import marker

    world = marker(tag_dir).get("world_size")
    return cfg, sd, {"source": tag_dir, "read_from": source, **extra,
                     **({"world_size": int(world)} if world is not None else {})}


def resolve_tokenizer(cfg, override: str = ""):
    """The tokenizer of a checkpoint: `override` (--tokenizer-model) if given, else the one its config names (type,
    files, eod id; absolute paths since runs save resolved paths; older runs saved them as given)."""
    from data_tools.cli import UserError
    from data_tools.tokenizer import from_data_config

    try:
        return from_data_config(cfg.data, override)
    except UserError as e:
        raise ConvertError(f"tokenizer of the checkpoint's config: {e} (from {os.getcwd()}); "
                           "pass --tokenizer-model PATH") from None


# ---------------------------------------------------------------- the consolidated format
def _write_dir(out: str, write) -> str:
    """Run write(tmp_dir), then rename tmp_dir to out (replacing an older out); nothing partial is left."""
    out = os.path.abspath(out.rstrip("/"))
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        fsync_tree(tmp)  # every file on disk before the directory gets its final name
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(os.path.dirname(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_against_model(cfg, sd: dict) -> None:
    """The state dict must be exactly what cfg.model builds (names and shapes): catches another architecture."""
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    from pretrain.model.metalm import MetaLM

    with torch.device("meta"):
        ref = {k: v.shape for k, v in MetaLM(cfg.model).state_dict().items()
               if isinstance(v, torch.Tensor) and not k.endswith("._extra_state")}
    missing, unexpected = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
    if missing or unexpected:
        raise ConvertError(f"weights do not match the configured architecture: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    bad = [(k, tuple(sd[k].shape), tuple(ref[k])) for k in ref if tuple(sd[k].shape) != tuple(ref[k])]
    if bad:
        raise ConvertError(f"shape mismatch for {bad[0][0]}: weights {bad[0][1]}, architecture {bad[0][2]}")


def write_consolidated(out: str, cfg, sd: dict, tokenizer, info: dict, dtype: str = "fp32") -> str:
    """`tokenizer`: a data_tools.tokenizer object (or a path): its files are copied in, with its spec
    (tokenizer_meta.json), which is what readers of the directory load (`data_tools.tokenizer.load_from_dir`)."""
    import yaml
    from safetensors.torch import save_file

    from data_tools.cli import UserError
    from data_tools.tokenizer import BaseTokenizer, copy_to_dir, load_tokenizer
    from pretrain.config import config_to_dict

    check_against_model(cfg, sd)
    if not isinstance(tokenizer, BaseTokenizer):
        try:
            tokenizer = load_tokenizer(tokenizer)
        except UserError as e:
            raise ConvertError(str(e)) from None
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]

    def write(tmp):
        save_file({k: v.to(tdtype).contiguous() for k, v in sorted(sd.items())}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": FORMAT})
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
        copy_to_dir(tokenizer, tmp)
        with open(os.path.join(tmp, "metalm.json"), "w") as f:
            json.dump({"format": FORMAT, "version": 1, "dtype": dtype, **info}, f, indent=2)

    return _write_dir(out, write)


def read_consolidated(path: str) -> tuple[object, dict, dict]:
    from safetensors.torch import load_file

    from pretrain.config import load_config

    meta = os.path.join(path, "metalm.json")
    if not os.path.isfile(meta):
        raise ConvertError(f"{path}: not a consolidated MetaLM directory (no metalm.json)")
    info = json.load(open(meta))
    if info.get("format") != FORMAT:
        raise ConvertError(f"{path}: format {info.get('format')!r}, expected {FORMAT!r}")
    for name in ("config.yaml", "model.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ConvertError(f"{path}: {name} is missing (an incomplete copy of a consolidated directory?)")
    cfg = load_config(os.path.join(path, "config.yaml"))
    return cfg, {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}, info


def load_consolidated(path: str):
    """(MetaLM in eval mode on CPU, TrainConfig, Tokenizer): no DeepSpeed, no launcher (a one-process group)."""
    from data_tools.tokenizer import load_from_dir
    from pretrain.parallel import init_distributed, init_model_parallel

    cfg, sd, _ = read_consolidated(path)
    init_distributed("gloo")
    init_model_parallel(1, 1)
    from pretrain.model.metalm import MetaLM

    model = MetaLM(cfg.model)
    load_into(model, sd)
    return model.eval(), cfg, load_from_dir(path)


def load_into(model: torch.nn.Module, sd: dict, tp_rank: int = 0, tp: int = 1, pipeline_layers: int = 0) -> None:
    """Copy full weights into a (possibly TP-sharded, possibly pipeline) model, slicing each TP parameter."""
    own = model.state_dict()
    n_set = 0
    with torch.no_grad():
        for name, full in sd.items():
            target = name
            if pipeline_layers:
                where = metalm_to_pipeline(name, pipeline_layers)
                if where is None:
                    continue
                # DeepSpeed registers layers under their index, tied ones under tied_modules.<key>
                target = f"tied_modules.embed.{where[1]}" if where[0] == 0 else f"{where[0]}.{where[1]}"
                if target not in own:  # this pipeline stage does not hold the layer
                    continue
            if target not in own:
                raise ConvertError(f"parameter {name} has no place in the model being loaded")
            dim = tp_dim(name)
            value = full.chunk(tp, dim=dim)[tp_rank] if dim is not None and tp > 1 else full
            if tuple(value.shape) != tuple(own[target].shape):
                raise ConvertError(f"{name}: shape {tuple(value.shape)} does not fit {tuple(own[target].shape)}")
            own[target].copy_(value.to(own[target].dtype))
            n_set += 1
    if not pipeline_layers:
        expected = [k for k, v in own.items() if isinstance(v, torch.Tensor) and not k.endswith("._extra_state")]
        if n_set != len(expected):
            raise ConvertError(f"loaded {n_set} of {len(expected)} parameters")


# ---------------------------------------------------------------- Hugging Face
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


def to_hf_state_dict(cfg, sd: dict) -> dict:
    d = cfg.model.decoder
    H, K, D = d.heads, d.kv_heads, d.head_dim
    g = H // K
    out = {}
    for ours, theirs in _hf_names(d.layers).items():
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


def from_hf_state_dict(cfg, hf: dict) -> dict:
    d = cfg.model.decoder
    H, K, D = d.heads, d.kv_heads, d.head_dim
    g = H // K
    out = {}
    for ours, theirs in _hf_names(d.layers).items():
        if theirs in hf and not (ours == "decoder.output.weight" and cfg.model.tie_embeddings):
            out[ours] = hf[theirs]
    for i in range(d.layers):
        p = f"model.layers.{i}.self_attn."
        q = hf[p + "q_proj.weight"].view(K, g, D, d.hidden)
        k = hf[p + "k_proj.weight"].view(K, 1, D, d.hidden)
        v = hf[p + "v_proj.weight"].view(K, 1, D, d.hidden)
        out[f"decoder.stack.layers.{i}.attn.qkv.weight"] = torch.cat([q, k, v], 1).reshape((H + 2 * K) * D, d.hidden)
    return out


def _rope_parameters(d) -> dict:
    """Our rotary settings in transformers' `rope_parameters` form."""
    params = {"rope_type": "default", "rope_theta": d.rope_theta}
    if d.rope_scaling:
        params.update({k: v for k, v in d.rope_scaling.items() if k != "type"}, rope_type=d.rope_scaling["type"])
    return params


def hf_config(cfg, tokenizer):
    from transformers import LlamaConfig

    m, d = cfg.model, cfg.model.decoder
    return LlamaConfig(vocab_size=m.vocab_size, hidden_size=d.hidden, intermediate_size=d.ffn_hidden,
                       num_hidden_layers=d.layers, num_attention_heads=d.heads, num_key_value_heads=d.kv_heads,
                       head_dim=d.head_dim, hidden_act="silu", max_position_embeddings=m.max_seq_length,
                       rms_norm_eps=d.norm_eps, rope_parameters=_rope_parameters(d),
                       tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False,
                       bos_token_id=tokenizer.ids.bos, eos_token_id=tokenizer.ids.eos,
                       pad_token_id=tokenizer.ids.pad, torch_dtype="float32")


def _export_tokenizer(tok, tmp: str, max_len: int) -> None:
    """The tokenizer's files in a form transformers' AutoTokenizer loads offline, plus our tokenizer_meta.json (so
    import-hf gets the same tokenizer back, end-of-document id included)."""
    from transformers import AutoTokenizer

    from data_tools.tokenizer import copy_to_dir

    copy_to_dir(tok, tmp)
    if tok.kind == "HuggingFaceTokenizer":
        return  # tokenizer.json (+ its config files) as the user gave them
    piece = tok.id_to_piece
    special = {"bos_token": piece(tok.ids.bos), "eos_token": piece(tok.ids.eos), "pad_token": piece(tok.ids.pad)}
    if tok.ids.unk is not None:
        special["unk_token"] = piece(tok.ids.unk)
    if tok.kind == "SentencePieceTokenizer" and tok.model_type == "unigram":
        # transformers' LlamaTokenizer is BPE-only: a unigram model goes out as its unigram SentencePiece class
        # (T5Tokenizer; note it appends eos, not bos, when add_special_tokens=True)
        conf = {"tokenizer_class": "T5Tokenizer", **special, "extra_ids": 0}
    elif tok.kind == "SentencePieceTokenizer":
        conf = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True, "add_eos_token": False,
                "legacy": True}
    else:
        conf = {"tokenizer_class": "GPT2Tokenizer", **special, "add_prefix_space": False}
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({**conf, "model_max_length": max_len}, f, indent=2)
    AutoTokenizer.from_pretrained(tmp).save_pretrained(tmp)  # adds tokenizer.json (fast tokenizer)


def export_hf(model_dir: str, out: str, dtype: str = "fp32") -> str:
    """The decoder as LlamaForCausalLM (config.json, model.safetensors, tokenizer files)."""
    from transformers import LlamaForCausalLM

    from data_tools.tokenizer import load_from_dir

    cfg, sd, _ = read_consolidated(model_dir)
    tok = load_from_dir(model_dir)
    hf = to_hf_state_dict(cfg, sd)

    def write(tmp):
        with torch.device("meta"):
            model = LlamaForCausalLM(hf_config(cfg, tok))
        model.load_state_dict(hf, strict=False, assign=True)
        if cfg.model.tie_embeddings:
            model.tie_weights()
        model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ConvertError(f"export left parameters unset: {missing[:4]}")
        # stop at the end of a sentence and at the end-of-document id (what pretraining documents end with)
        model.generation_config.eos_token_id = list(dict.fromkeys([tok.ids.eos, tok.ids.eod]))
        model.generation_config.pad_token_id = tok.ids.pad
        model.save_pretrained(tmp, safe_serialization=True)
        _export_tokenizer(tok, tmp, cfg.model.max_seq_length)

    return _write_dir(out, write)


# config.json fields that change what a Llama model computes, and what import-hf does with each
_HF_REFUSED_ACT = "hidden_act {!r}: only silu (SwiGLU) is supported by our decoder"


def hf_decoder_config(hc: dict, where: str):
    """StackConfig for a Llama config.json, or ConvertError naming the first field we cannot run as transformers
    does (never a silent import with other numbers)."""
    from pretrain.config import ROPE_SCALING, StackConfig

    if hc.get("model_type") != "llama":
        raise ConvertError(f"{where}: model_type {hc.get('model_type')!r}, only 'llama' can be imported")
    act = hc.get("hidden_act", hc.get("hidden_activation", "silu"))
    if act != "silu":
        raise ConvertError(f"{where}: " + _HF_REFUSED_ACT.format(act))
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


def import_hf(hf_dir: str, out: str, encoder_preset: str = "") -> str:
    """A LlamaForCausalLM directory -> our consolidated format (decoder; optionally a fresh text encoder). Its own
    tokenizer comes along: tokenizer.model (SentencePiece), else tokenizer.json, else vocab.json + merges.txt."""
    import dataclasses

    from safetensors.torch import load_file

    from data_tools.cli import UserError
    from data_tools.tokenizer import META_FILE, load_from_dir, load_tokenizer, write_to_data_config
    from pretrain.config import PRESETS, ModelConfig, TrainConfig

    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConvertError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        hc = json.load(open(cfg_path))
    except ValueError as e:
        raise ConvertError(f"{cfg_path}: not JSON ({e})") from None
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
                "rms_norm_eps", "max_position_embeddings"):
        if key not in hc:
            raise ConvertError(f"{cfg_path}: missing {key}")
    dec = hf_decoder_config(hc, cfg_path)
    try:
        if os.path.isfile(os.path.join(hf_dir, META_FILE)):  # exported by us: the same tokenizer, eod included
            tok = load_from_dir(hf_dir)
        elif os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
            tok = load_tokenizer(os.path.join(hf_dir, "tokenizer.model"), "SentencePieceTokenizer")
        else:
            tok = load_tokenizer(hf_dir)
    except UserError as e:
        raise ConvertError(f"tokenizer of {hf_dir}: {e}") from None
    if tok.vocab_size > hc["vocab_size"]:
        raise ConvertError(f"vocabulary mismatch: tokenizer has {tok.vocab_size} pieces, model {hc['vocab_size']}")
    base = PRESETS[encoder_preset]() if encoder_preset else ModelConfig()
    model_cfg = dataclasses.replace(base, vocab_size=hc["vocab_size"], max_seq_length=hc["max_position_embeddings"],
                                    decoder=dec, tie_embeddings=bool(hc.get("tie_word_embeddings", False)),
                                    encoder=base.encoder if encoder_preset else None)
    cfg = TrainConfig(model=model_cfg)
    write_to_data_config(tok, cfg.data)
    hf = {}
    for f in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        hf.update(load_file(f))
    if not hf:
        raise ConvertError(f"{hf_dir}: no *.safetensors weights")
    for i in range(dec.layers):
        for n, rows in (("q", dec.heads), ("k", dec.kv_heads), ("v", dec.kv_heads)):
            w = hf.get(f"model.layers.{i}.self_attn.{n}_proj.weight")
            if w is None or tuple(w.shape) != (rows * dec.head_dim, dec.hidden):
                raise ConvertError(f"{hf_dir}: model.layers.{i}.self_attn.{n}_proj.weight has shape "
                                   f"{None if w is None else tuple(w.shape)}, config.json implies "
                                   f"{(rows * dec.head_dim, dec.hidden)}")
    sd = {k: v.float() for k, v in from_hf_state_dict(cfg, hf).items()}
    if encoder_preset:  # a fresh (randomly initialised) encoder and connector for continued pretraining
        from pretrain.parallel import init_distributed, init_model_parallel

        init_distributed("gloo")
        init_model_parallel(1, 1)
        from pretrain.model.metalm import MetaLM

        fresh = MetaLM(model_cfg).state_dict()
        sd.update({k: v for k, v in fresh.items()
                   if k.startswith(("encoder.", "connector.")) and not k.endswith("._extra_state")})
    return write_consolidated(out, cfg, sd, tok, {"source": os.path.abspath(hf_dir), "imported_from": "hf"})


# ---------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consolidate", help="DeepSpeed checkpoint (any ZeRO stage, TP, PP) -> consolidated dir")
    c.add_argument("--checkpoint", required=True, help="a checkpoint tag dir, or RUN/checkpoints (uses latest)")
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    c.add_argument("--tokenizer-model", default="", help="override the tokenizer path saved in the run's config")
    r = sub.add_parser("reshard", help="checkpoint -> weights + step + data position, for "
                                      "checkpoint.init_from at another TP/PP/DP layout")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--tokenizer-model", default="", help="override the tokenizer path saved in the run's config")
    e = sub.add_parser("export-hf", help="consolidated dir (or checkpoint) -> LlamaForCausalLM directory")
    e.add_argument("--model", required=True, help="a consolidated dir, or a checkpoint (consolidated first)")
    e.add_argument("--out", required=True)
    e.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    e.add_argument("--tokenizer-model", default="", help="with a checkpoint: override the tokenizer path saved in "
                   "the run's config")
    i = sub.add_parser("import-hf", help="LlamaForCausalLM directory -> consolidated dir")
    i.add_argument("--hf", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--encoder-preset", default="", help="add a fresh text encoder + connector of this preset")
    args = p.parse_args(argv)
    import warnings

    from data_tools.cli import UserError

    warnings.filterwarnings("ignore")
    try:
        if args.cmd in ("consolidate", "reshard"):
            cfg, sd, info = read_checkpoint(args.checkpoint)
            info["resume_position"] = args.cmd == "reshard"  # the trainer then keeps step and data position
            out = write_consolidated(args.out, cfg, sd, resolve_tokenizer(cfg, args.tokenizer_model), info,
                                     getattr(args, "dtype", "fp32"))
            print(f"wrote {out} ({len(sd)} tensors from {info['read_from']}, step {info.get('step', '?')})")
        elif args.cmd == "export-hf":
            src = args.model
            if os.path.isfile(os.path.join(src, "metalm.json")):
                print(f"wrote {export_hf(src, args.out, args.dtype)}")
            else:  # a checkpoint: consolidated into a temporary directory first, removed afterwards
                import tempfile

                cfg, sd, info = read_checkpoint(src)
                with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.out)) or None) as tmp:
                    cons = write_consolidated(os.path.join(tmp, "consolidated"), cfg, sd,
                                              resolve_tokenizer(cfg, args.tokenizer_model), info)
                    print(f"wrote {export_hf(cons, args.out, args.dtype)}")
        else:
            print(f"wrote {import_hf(args.hf, args.out, args.encoder_preset)}")
    except (ConvertError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
