"""Pretrained BERT-family text encoders (BertModel, RobertaModel, ElectraModel / the ELECTRA discriminator) docked
as MetaLM's text encoder: config, weights and tokenizer in, and the encoder back out as its own Hugging Face type.

    python -m pretrain.convert import-encoder --hf DIR --into MODEL|PRESET --out OUT [--trainable-top-layers 2]
    python -m pretrain.convert export-encoder --model OUT --out hf/encoder
    # or in a training config: model.encoder.from_hf=DIR (architecture, weights at step 0, tokenizer)

- `encoder_config(hc, where)`: our EncoderConfig for a config.json (post-norm LayerNorm blocks with biases, GELU,
  learned positions, token types, embedding LayerNorm, ELECTRA's embeddings_project), refusing by name every
  model type and function-changing field we do not implement (never a silent import with other numbers).
- `BertFamilyAdapter`: the state-dict mapping (HF's separate query/key/value into our fused per-head QKV, biases
  included); the vocabulary is padded to a multiple of 64 rows (zeros) so that any power-of-two TP splits it, and cut
  back on export (Megatron pads its vocabularies the same way).
- The encoder's tokenizer travels as a `tokenizer.json` (Hugging Face `tokenizers`; converted by `transformers`
  when the directory has only vocab.txt / vocab.json + merges.txt) in `OUT/encoder_tokenizer/`; the loader uses it
  (data_tools/encoder_tokens.py). MetaLM never uses the pooler, so it is not imported (export writes none).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import torch

from pretrain.hf_adapters import StateDictAdapter
from pretrain.model_io import ENCODER_TOKENIZER_DIR, TOKENIZER_FILES, ConvertError

MODEL_TYPES = ("bert", "roberta", "electra")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
PREFIXES = ("bert.", "roberta.", "electra.")  # the base model inside a *ForMaskedLM / *ForPreTraining checkpoint
HEADS = ("pooler.", "cls.", "lm_head.", "discriminator_predictions.", "generator_predictions.",
         "generator_lm_head.", "classifier.", "qa_outputs.")
VOCAB_MULTIPLE = 64


def padded(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConvertError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    try:
        return json.load(open(path))
    except ValueError as e:
        raise ConvertError(f"{path}: not JSON ({e})") from None


def encoder_config(hc: dict, where: str, **keep):
    """EncoderConfig for a BERT / RoBERTa / ELECTRA config.json, or ConvertError naming the field."""
    from pretrain.config import EncoderConfig

    kind = hc.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConvertError(f"{where}: model_type {kind!r} cannot be imported as a text encoder (supported: "
                           f"{', '.join(MODEL_TYPES)})")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings"):
        if not isinstance(hc.get(key), int):
            raise ConvertError(f"{where}: {key} missing or not an integer")
    act = hc.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ConvertError(f"{where}: hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    if hc.get("position_embedding_type", "absolute") != "absolute":
        raise ConvertError(f"{where}: position_embedding_type {hc['position_embedding_type']!r}: only absolute "
                           "positions are supported")
    for key in ("is_decoder", "add_cross_attention"):
        if hc.get(key):
            raise ConvertError(f"{where}: {key}=true: only bidirectional encoders without cross-attention dock")
    if hc["hidden_size"] % hc["num_attention_heads"]:
        raise ConvertError(f"{where}: hidden_size {hc['hidden_size']} is not divisible by num_attention_heads "
                           f"{hc['num_attention_heads']}")
    pad = hc.get("pad_token_id")
    pad = 0 if pad is None else int(pad)
    offset = pad + 1 if kind == "roberta" else 0  # RoBERTa's positions start after its padding index
    if offset >= hc["max_position_embeddings"]:
        raise ConvertError(f"{where}: pad_token_id {pad} leaves no positions in max_position_embeddings")
    emb = int(hc.get("embedding_size") or hc["hidden_size"]) if kind == "electra" else 0
    try:
        return EncoderConfig(
            hc["num_hidden_layers"], hc["hidden_size"], hc["num_attention_heads"],
            ffn_hidden=hc["intermediate_size"], norm_eps=float(hc.get("layer_norm_eps", 1e-12)), norm="layernorm",
            norm_position="post", activation=ACTIVATIONS[act], bias=True, positions="learned",
            hidden_dropout=float(hc.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(hc.get("attention_probs_dropout_prob", 0.1)),
            vocab_size=padded(hc["vocab_size"]), hf_vocab_size=hc["vocab_size"], pad_id=pad,
            max_positions=hc["max_position_embeddings"], position_offset=offset,
            type_vocab_size=int(hc.get("type_vocab_size", 2)), embedding_norm=True,
            embedding_size=emb if emb != hc["hidden_size"] else 0, hf_model_type=kind, **keep)
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from None


def hf_config(e):
    """transformers config of our (imported or trained-from-import) encoder."""
    import transformers

    common = dict(vocab_size=e.hf_vocab_size or e.vocab_size, hidden_size=e.hidden, num_hidden_layers=e.layers,
                  num_attention_heads=e.heads, intermediate_size=e.ffn_hidden,
                  hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_new"}[e.activation],
                  hidden_dropout_prob=e.hidden_dropout, attention_probs_dropout_prob=e.attention_dropout,
                  max_position_embeddings=e.max_positions, type_vocab_size=e.type_vocab_size,
                  layer_norm_eps=e.norm_eps, pad_token_id=e.pad_id)
    if e.hf_model_type == "roberta":
        return transformers.RobertaConfig(**common)
    if e.hf_model_type == "electra":
        return transformers.ElectraConfig(**common, embedding_size=e.embedding_size or e.hidden)
    return transformers.BertConfig(**common)


def check_exportable(e) -> None:
    want = dict(norm="layernorm", norm_position="post", bias=True, positions="learned", embedding_norm=True)
    bad = [f"{k}={getattr(e, k)!r}" for k, v in want.items() if getattr(e, k) != v]
    if e.activation == "swiglu":
        bad.append("activation='swiglu'")
    if e.heads != e.kv_heads or e.head_dim * e.heads != e.hidden:
        bad.append(f"kv_heads={e.kv_heads} / head_dim={e.head_dim}")
    if bad or e.hf_model_type not in MODEL_TYPES:
        raise ConvertError(f"the text encoder is not a BERT-family encoder ({', '.join(bad) or 'no hf_model_type'}): "
                           "export-encoder writes encoders imported with import-encoder or model.encoder.from_hf")


class BertFamilyAdapter(StateDictAdapter):
    """Our `encoder.*` parameters <-> BertModel / RobertaModel / ElectraModel names (no prefix, no pooler)."""

    def __init__(self, enc):
        super().__init__(enc)
        self.e = enc

    def _names(self) -> dict:
        m = {"encoder.positions.weight": "embeddings.position_embeddings.weight",
             "encoder.token_types.weight": "embeddings.token_type_embeddings.weight",
             "encoder.emb_norm.weight": "embeddings.LayerNorm.weight", "encoder.emb_norm.bias": "embeddings.LayerNorm.bias",
             "encoder.emb_projection.weight": "embeddings_project.weight",
             "encoder.emb_projection.bias": "embeddings_project.bias"}
        for i in range(self.e.layers):
            p, q = f"encoder.stack.layers.{i}.", f"encoder.layer.{i}."
            for w in ("weight", "bias"):
                m.update({p + f"attn.proj.{w}": q + f"attention.output.dense.{w}",
                          p + f"attn_norm.{w}": q + f"attention.output.LayerNorm.{w}",
                          p + f"mlp.up.{w}": q + f"intermediate.dense.{w}",
                          p + f"mlp.down.{w}": q + f"output.dense.{w}",
                          p + f"mlp_norm.{w}": q + f"output.LayerNorm.{w}"})
        return m

    def to_hf(self, sd: dict) -> dict:
        e = self.e
        H, D, d = e.heads, e.head_dim, e.hidden
        out = {theirs: sd[ours] for ours, theirs in self._names().items() if ours in sd}
        out["embeddings.word_embeddings.weight"] = sd["encoder.embedding.weight"][:e.hf_vocab_size or e.vocab_size]
        for i in range(e.layers):
            p, q = f"encoder.stack.layers.{i}.attn.qkv.", f"encoder.layer.{i}.attention.self."
            w = sd[p + "weight"].view(H, 3, D, d)  # our fused rows: (head, {q, k, v}, head_dim)
            b = sd[p + "bias"].view(H, 3, D)
            for j, n in enumerate(("query", "key", "value")):
                out[q + n + ".weight"] = w[:, j].reshape(H * D, d).contiguous()
                out[q + n + ".bias"] = b[:, j].reshape(H * D).contiguous()
        return out

    def from_hf(self, hf: dict) -> dict:
        e = self.e
        H, D, d = e.heads, e.head_dim, e.hidden
        out = {}
        for ours, theirs in self._names().items():
            if theirs in hf:
                out[ours] = hf[theirs]
        word = hf["embeddings.word_embeddings.weight"]
        out["encoder.embedding.weight"] = torch.cat([word, word.new_zeros(e.vocab_size - word.shape[0], word.shape[1])])
        for i in range(e.layers):
            q = f"encoder.layer.{i}.attention.self."
            w = torch.stack([hf[q + n + ".weight"].view(H, D, d) for n in ("query", "key", "value")], 1)
            b = torch.stack([hf[q + n + ".bias"].view(H, D) for n in ("query", "key", "value")], 1)
            out[f"encoder.stack.layers.{i}.attn.qkv.weight"] = w.reshape(3 * H * D, d)
            out[f"encoder.stack.layers.{i}.attn.qkv.bias"] = b.reshape(3 * H * D)
        return out

    def expected_hf(self) -> dict:
        """HF name -> shape, for checking a checkpoint against its config.json before mapping it."""
        e = self.e
        emb = e.embedding_size or e.hidden
        shapes = {"embeddings.word_embeddings.weight": (e.hf_vocab_size, emb),
                  "embeddings.position_embeddings.weight": (e.max_positions, emb),
                  "embeddings.LayerNorm.weight": (emb,)}
        if e.type_vocab_size:
            shapes["embeddings.token_type_embeddings.weight"] = (e.type_vocab_size, emb)
        if e.embedding_size:
            shapes["embeddings_project.weight"] = (e.hidden, emb)
        for i in range(e.layers):
            q = f"encoder.layer.{i}."
            shapes.update({q + "attention.self.query.weight": (e.hidden, e.hidden),
                           q + "intermediate.dense.weight": (e.ffn_hidden, e.hidden),
                           q + "output.dense.weight": (e.hidden, e.ffn_hidden)})
        return shapes


def read_weight_files(hf_dir: str) -> dict:
    """Every tensor of a Hugging Face directory: its safetensors files, else pytorch_model.bin."""
    from safetensors.torch import load_file

    hf = {}
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    for f in files:
        hf.update(load_file(f))
    if not files and os.path.isfile(os.path.join(hf_dir, "pytorch_model.bin")):
        hf = torch.load(os.path.join(hf_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    if not hf:
        raise ConvertError(f"{hf_dir}: no model.safetensors / pytorch_model.bin weights")
    return hf


def check_weights(hf: dict, expected: dict, hf_dir: str, says: str) -> None:
    """Each expected tensor present with the shape config.json implies (None: any shape), else ConvertError."""
    for name, shape in expected.items():
        if name not in hf:
            raise ConvertError(f"{hf_dir}: weights have no {name} (config.json says {says})")
        if shape is not None and tuple(hf[name].shape) != shape:
            raise ConvertError(f"{hf_dir}: {name} has shape {tuple(hf[name].shape)}, config.json implies {shape}")


def read_hf_weights(hf_dir: str, e) -> dict:
    """The base model's tensors of a Hugging Face directory, prefix removed, heads dropped, checked against the
    config."""
    base = {}
    for k, v in read_weight_files(hf_dir).items():
        for pre in PREFIXES:
            if k.startswith(pre):
                k = k[len(pre):]
                break
        if not k.startswith(HEADS):
            base[k] = v.float()
    check_weights(base, BertFamilyAdapter(e).expected_hf(), hf_dir, f"{e.hf_model_type}, {e.layers} layers")
    return base


def save_tokenizer(hf_dir: str, out_dir: str) -> str:
    """The encoder's tokenizer as `out_dir/tokenizer.json` (+ its vocabulary and config files, for export)."""
    os.makedirs(out_dir, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name))
    if not os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        try:
            from transformers import AutoTokenizer

            fast = AutoTokenizer.from_pretrained(hf_dir, use_fast=True)
            fast.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
        except Exception as e:  # transformers raises many types for a directory without a usable tokenizer
            raise ConvertError(f"{hf_dir}: no tokenizer.json and none could be made from its tokenizer files "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    from data_tools.cli import UserError
    from data_tools.encoder_tokens import EncoderTokenizer

    try:
        EncoderTokenizer(out_dir)  # it loads, and has the special tokens the encoder expects
    except UserError as e:
        raise ConvertError(str(e)) from None
    return out_dir


def load_hf_encoder(hf_dir: str, **keep):
    """(EncoderConfig, our `encoder.*` state dict) of a Hugging Face encoder directory."""
    e = encoder_config(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"), **keep)
    return e, BertFamilyAdapter(e).from_hf(read_hf_weights(hf_dir, e))


def apply_from_hf(model_cfg) -> None:
    """`model.encoder.from_hf=DIR`: the encoder's architecture and tokenizer from DIR (its weights are loaded at step 0
    by the trainer, `hf_encoder_weights`). Once resolved (`hf_model_type` set, as in a saved config) DIR is not read
    again. ConvertError (one line) on a directory that cannot be imported."""
    e = model_cfg.encoder
    if e is None or not e.from_hf or e.hf_model_type:
        return
    hf_dir = os.path.abspath(e.from_hf)
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"not found: {hf_dir}")
    if not e.tokenizer and not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        raise ConvertError(f"model.encoder.from_hf: {hf_dir} has no tokenizer.json (the loader needs a fast "
                           "tokenizer): import it once with `python -m pretrain.convert import-encoder`, which "
                           "converts it, or set model.encoder.tokenizer")
    keep = dict(trainable_top_layers=e.trainable_top_layers, from_hf=hf_dir,
                tokenizer=os.path.abspath(e.tokenizer) if e.tokenizer else hf_dir)
    model_cfg.encoder = encoder_config(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"), **keep)
    if e.trainable_top_layers >= 0:
        model_cfg.freeze_encoder_layers = 0  # recomputed from trainable_top_layers for the new layer count
    model_cfg.__post_init__()


def hf_encoder_weights(model_cfg) -> dict:
    return load_hf_encoder(model_cfg.encoder.from_hf, trainable_top_layers=model_cfg.encoder.trainable_top_layers)[1]


# ---------------------------------------------------------------- the two commands (pretrain/convert.py)
def target_model(into: str, tokenizer_model: str = ""):
    """(TrainConfig, state dict, decoder tokenizer, info) of what an imported encoder docks into: a consolidated
    dir or checkpoint (its decoder and other parts kept), or a preset name (a fresh decoder; `tokenizer_model` is
    its tokenizer)."""
    from data_tools.cli import UserError
    from data_tools.tokenizer import load_from_dir, load_tokenizer, write_to_data_config
    from pretrain.config import PRESETS, TrainConfig
    from pretrain.model_io import CONSOLIDATED, locate, read_model, resolve_tokenizer

    if into in PRESETS:
        if not tokenizer_model:
            raise ConvertError(f"--into {into} is a preset (a fresh decoder): --tokenizer-model names its tokenizer")
        cfg, src_sd, info = TrainConfig(model=PRESETS[into]()), {}, {"decoder": f"preset {into} (fresh)"}
        try:
            tok = load_tokenizer(tokenizer_model)
        except UserError as e:
            raise ConvertError(str(e)) from None
    elif os.path.isdir(into):
        cfg, src_sd, _ = read_model(into)
        tok = (load_from_dir(into) if locate(into)[0] == CONSOLIDATED and not tokenizer_model
               else resolve_tokenizer(cfg, tokenizer_model))
        info = {"decoder": os.path.abspath(into)}
    else:
        raise ConvertError(f"--into {into}: neither a model directory nor a preset ({', '.join(PRESETS)})")
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConvertError(f"the decoder's tokenizer has {tok.vocab_size} pieces, model.vocab_size is "
                           f"{cfg.model.vocab_size}")
    write_to_data_config(tok, cfg.data)
    return cfg, src_sd, tok, info


def dock_part(cfg, src_sd: dict, part_sd: dict, replaced: tuple, seed: int) -> dict:
    """The state dict of `cfg.model` (already holding the imported part's config): the imported tensors, the
    source's tensors outside the `replaced` prefixes, and freshly initialised ones for the rest (the new
    connector; with a preset, everything)."""
    from pretrain.config import ConfigError
    from pretrain.model.metalm import MetaLM
    from pretrain.parallel import init_distributed, init_model_parallel, seed_everything

    try:
        cfg.model.__post_init__()
    except (ValueError, ConfigError) as e:
        raise ConvertError(str(e)) from None
    init_distributed("gloo")
    init_model_parallel(1, 1)
    seed_everything(seed)
    fresh = {k: v for k, v in MetaLM(cfg.model).state_dict().items() if not k.endswith("._extra_state")}
    sd = {k: v for k, v in src_sd.items() if not k.startswith(replaced)}
    sd.update({k: v for k, v in fresh.items() if k.startswith(replaced[1:])})
    sd.update(part_sd)
    sd.update({k: v for k, v in fresh.items() if k not in sd})  # a preset: everything; else what the part adds
    return sd


def import_encoder(hf_dir: str, into: str, out: str, trainable_top_layers: int = -1, tokenizer_model: str = "",
                   seed: int = 1234) -> str:
    """A consolidated MetaLM whose text encoder is the Hugging Face encoder of `hf_dir`, with its tokenizer; the
    decoder (and any vision encoder) from `into` (a consolidated dir or checkpoint, or a preset name: a fresh
    decoder, with `tokenizer_model` as its tokenizer); the text connector is new (randomly initialised)."""
    import tempfile

    from pretrain.model_io import write_consolidated

    enc, enc_sd = load_hf_encoder(hf_dir, trainable_top_layers=trainable_top_layers, from_hf=os.path.abspath(hf_dir))
    cfg, src_sd, tok, info = target_model(into, tokenizer_model)
    cfg.model.freeze_encoder_layers = 0
    cfg.model.encoder = enc
    sd = dock_part(cfg, src_sd, enc_sd, ("encoder.", "connector."), seed)
    out_parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(out_parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_parent, prefix=".encoder-tok-") as tmp:
        enc.tokenizer = save_tokenizer(hf_dir, tmp)
        return write_consolidated(out, cfg, sd, tok, {"source": os.path.abspath(hf_dir), "imported_from": "hf-encoder",
                                                      "encoder": enc.hf_model_type, **info})


def export_encoder(model_path: str, out: str, dtype: str = "fp32") -> str:
    """The (trained) text encoder as its own Hugging Face type (BertModel / RobertaModel / ElectraModel, no pooler)
    with its tokenizer files."""
    import transformers

    from pretrain.model_io import read_model, write_dir

    cfg, sd, _ = read_model(model_path)
    e = cfg.model.encoder
    if e is None:
        raise ConvertError(f"{model_path}: the model has no text encoder (a GPT baseline)")
    check_exportable(e)
    hf = BertFamilyAdapter(e).to_hf(sd)
    hc = hf_config(e)
    cls = {"bert": transformers.BertModel, "roberta": transformers.RobertaModel,
           "electra": transformers.ElectraModel}[e.hf_model_type]
    tok_dir = e.tokenizer if os.path.isdir(e.tokenizer) else os.path.dirname(e.tokenizer)

    def write(tmp):
        kw = {} if e.hf_model_type == "electra" else {"add_pooling_layer": False}
        with torch.device("meta"):
            model = cls(hc, **kw)
        missing, unexpected = model.load_state_dict(hf, strict=False, assign=True)
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left or unexpected:
            raise ConvertError(f"export left parameters unset {left[:3]} / unplaced {list(unexpected)[:3]}")
        model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        model.config.architectures = [cls.__name__]
        model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tok_dir, name)):
                shutil.copyfile(os.path.join(tok_dir, name), os.path.join(tmp, name))

    return write_dir(out, write)
