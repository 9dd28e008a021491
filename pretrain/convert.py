"""Checkpoint conversion: consolidate, reshard, Hugging Face export and import.

    python -m pretrain.convert consolidate --checkpoint RUN/checkpoints/step_00001000 --out exported/metalm
    python -m pretrain.convert reshard --checkpoint RUN/checkpoints/step_00001000 --out exported/reshard
        # then: python -m pretrain.launch ... -- checkpoint.init_from=exported/reshard parallel.tp=4 ...
    python -m pretrain.convert export-hf --model exported/metalm --out hf/metalm-decoder
    python -m pretrain.convert import-hf --hf hf/some-llama --out exported/from-hf [--encoder-preset tiny-cpu]
    python -m pretrain.convert import-encoder --hf hf/minilm --into exported/metalm --out exported/metalm-minilm
        [--trainable-top-layers 2]   # --into a preset (a fresh decoder) takes --tokenizer-model too
    python -m pretrain.convert export-encoder --model exported/metalm-minilm --out hf/minilm-finetuned

The consolidated format (also the self-contained export of the full MetaLM: encoders, connector, decoder):
    DIR/model.safetensors   every parameter under its `MetaLM` name, full (unsharded) tensors, fp32 or bf16
    DIR/config.yaml         the resolved training config (its `model` section builds the model)
    DIR/tokenizer.model     the SentencePiece model
    DIR/metalm.json         format, version, source checkpoint, step and consumed samples
Load it with `pretrain.model_io.load(DIR)` or `load_consolidated(DIR)` (no DeepSpeed, no launcher). Every output is
written under a temporary name and renamed when complete. Reading checkpoints, the format itself and loading live in
pretrain/model_io.py; the Hugging Face mapping is a state-dict adapter (pretrain/hf_adapters.py); this file is the
four commands.

A BERT / RoBERTa / ELECTRA encoder docks as the text encoder with its own tokenizer (pretrain/hf_encoders.py: its
blocks are a configuration of ours, post-norm LayerNorm with biases, GELU, learned positions). Not supported, and
why: optimizer state is not carried across a reshard (AdamW moments restart; weights, step, LR schedule position and
data position are kept).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Sequence

import torch

from pretrain.hf_adapters import LlamaAdapter
# the model I/O names this module has always offered (`from pretrain.convert import load_consolidated`, ...)
from pretrain.model_io import (FORMAT, ConvertError, load_consolidated, load_into, read_checkpoint,  # noqa: F401
                               read_consolidated, read_model, resolve_tokenizer, source_config, write_consolidated,
                               write_dir)


def _export_tokenizer(tok, tmp: str, max_len: int) -> None:
    """The tokenizer's files in a form transformers' AutoTokenizer loads offline, plus our tokenizer_meta.json (so
    import-hf gets the same tokenizer back, end-of-document id included)."""
    from transformers import AutoTokenizer

    from data_tools.tokenizer import copy_to_dir

    copy_to_dir(tok, tmp)
    piece = tok.id_to_piece
    special = {"bos_token": piece(tok.ids.bos), "eos_token": piece(tok.ids.eos), "pad_token": piece(tok.ids.pad)}
    if tok.ids.unk is not None:
        special["unk_token"] = piece(tok.ids.unk)
    if tok.ids.eod not in (tok.ids.eos, tok.ids.bos, tok.ids.pad, tok.ids.unk):  # our </d>: a stop id in generation
        special["additional_special_tokens"] = [piece(tok.ids.eod)]
    if tok.kind == "HuggingFaceTokenizer":
        # tokenizer.json as the user gave it, with the config files it came with; the special tokens the model was
        # trained with filled in where those files lack them (or where there were none: without them transformers
        # sees eos_token=None and pad_token=None, and cannot pad a batch or stop generating)
        conf = {}
        path = os.path.join(tmp, "tokenizer_config.json")
        if os.path.isfile(path):
            conf = json.load(open(path, encoding="utf-8"))
        conf.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        for k, v in special.items():
            if conf.get(k) is None:
                conf[k] = v
        conf.setdefault("model_max_length", max_len)
        with open(path, "w") as f:
            json.dump(conf, f, indent=2)
        with open(os.path.join(tmp, "special_tokens_map.json"), "w") as f:
            json.dump({k: conf[k] for k in special}, f, indent=2)
        return
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
    adapter = LlamaAdapter(cfg)
    hf = adapter.to_hf(sd)

    def write(tmp):
        with torch.device("meta"):
            model = LlamaForCausalLM(adapter.hf_config(tok))
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

    return write_dir(out, write)


def export_encoder_part(model: str, out: str, part: str = "auto", vision_type: str = "", dtype: str = "fp32") -> str:
    """export-encoder: the text encoder (pretrain/hf_encoders.py) or the vision encoder (pretrain/hf_vision.py)."""
    from pretrain.hf_encoders import export_encoder
    from pretrain.hf_vision import export_vision

    if part == "auto":  # the encoder that has a Hugging Face form (an imported one, or a tower of CLIP/SigLIP shape)
        from pretrain.hf_encoders import MODEL_TYPES
        from pretrain.hf_vision import EXPORT_TYPES, check_exportable

        cfg = source_config(model)
        e, v = cfg.model.encoder, cfg.model.vision
        text = e is not None and e.hf_model_type in MODEL_TYPES

        def fits(kind):
            try:
                check_exportable(v, kind)
                return True
            except ConvertError:
                return False

        vision = v is not None and (bool(v.hf_model_type) or any(fits(k) for k in EXPORT_TYPES.values()))
        if text and vision:
            raise ConvertError(f"{model} has a text and a vision encoder: --part text or --part vision")
        part = "vision" if vision or (v is not None and (vision_type or e is None)) else "text"
    if part == "vision":
        return export_vision(model, out, vision_type, dtype)
    return export_encoder(model, out, dtype)


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
    dec = LlamaAdapter.stack_config(hc, cfg_path)
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
    sd = {k: v.float() for k, v in LlamaAdapter(cfg).from_hf(hf).items()}
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
    ie = sub.add_parser("import-encoder", help="Hugging Face BertModel / RobertaModel / ElectraModel directory -> the "
                        "text encoder (with its own tokenizer) of a MetaLM; CLIP / SigLIP / ViT -> its vision encoder "
                        "(with its preprocessing)")
    ie.add_argument("--hf", required=True, help="the encoder's directory (config.json, weights, tokenizer files or "
                    "preprocessor_config.json)")
    ie.add_argument("--into", required=True, help="a consolidated dir or checkpoint whose decoder is kept, or a "
                    "preset name (a fresh decoder)")
    ie.add_argument("--out", required=True)
    ie.add_argument("--trainable-top-layers", type=int, default=-1,
                    help="train only the top k encoder layers (paper: 2); -1: all (default)")
    ie.add_argument("--tokenizer-model", default="", help="the decoder's tokenizer (required with a preset)")
    ie.add_argument("--image-size", type=int, default=0, help="vision: train at this image size (positions "
                    "interpolated as transformers' interpolate_pos_encoding); 0: the checkpoint's")
    ie.add_argument("--feature-layer", type=int, default=None, help="vision: dock transformers' hidden_states[k] "
                    "(-2: LLaVA's) instead of the tower's output")
    ie.add_argument("--drop-class-token", action="store_true", help="vision: dock the patch features only")
    ie.add_argument("--freeze-vision", action="store_true", help="vision: the whole tower frozen (the connector "
                    "trains)")
    ie.add_argument("--keep-connector", action="store_true", help="vision: keep --into's vision connector (a tower "
                    "exported from that model, docked back) instead of a new one")
    ie.add_argument("--seed", type=int, default=1234, help="for the new connector (and a preset's fresh decoder)")
    ee = sub.add_parser("export-encoder", help="the text encoder of a consolidated dir or checkpoint -> its own "
                        "Hugging Face type")
    ee.add_argument("--model", required=True)
    ee.add_argument("--out", required=True)
    ee.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ee.add_argument("--part", choices=["auto", "text", "vision"], default="auto",
                    help="which encoder (auto: the one the model has)")
    ee.add_argument("--vision-type", choices=["clip", "siglip"], default="",
                    help="vision: the Hugging Face type to write (default: the imported tower's, else the one the "
                         "tower's structure matches)")
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
            from pretrain.model_io import CONSOLIDATED, locate

            if locate(src)[0] == CONSOLIDATED:
                print(f"wrote {export_hf(src, args.out, args.dtype)}")
            else:  # a checkpoint: consolidated into a temporary directory first, removed afterwards
                import tempfile

                cfg, sd, info = read_checkpoint(src)
                with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.out)) or None) as tmp:
                    cons = write_consolidated(os.path.join(tmp, "consolidated"), cfg, sd,
                                              resolve_tokenizer(cfg, args.tokenizer_model), info)
                    print(f"wrote {export_hf(cons, args.out, args.dtype)}")
        elif args.cmd == "import-encoder":
            from pretrain.hf_encoders import MODEL_TYPES, import_encoder, read_hf_config
            from pretrain.hf_vision import CONTAINERS, TOWERS, import_vision, is_vision_dir

            kind = read_hf_config(args.hf).get("model_type")
            if kind not in MODEL_TYPES + TOWERS + tuple(CONTAINERS):
                raise ConvertError(f"{os.path.join(args.hf, 'config.json')}: model_type {kind!r} cannot be imported "
                                   f"as an encoder (text: {', '.join(MODEL_TYPES)}; vision: "
                                   f"{', '.join(TOWERS + tuple(CONTAINERS))})")
            if is_vision_dir(args.hf):
                out = import_vision(args.hf, args.into, args.out, args.image_size, args.feature_layer,
                                    not args.drop_class_token, args.trainable_top_layers, args.freeze_vision,
                                    args.tokenizer_model, args.seed, args.keep_connector)
            else:
                out = import_encoder(args.hf, args.into, args.out, args.trainable_top_layers, args.tokenizer_model,
                                     args.seed)
            print(f"wrote {out}")
        elif args.cmd == "export-encoder":
            print(f"wrote {export_encoder_part(args.model, args.out, args.part, args.vision_type, args.dtype)}")
        else:
            print(f"wrote {import_hf(args.hf, args.out, args.encoder_preset)}")
    except (ConvertError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
