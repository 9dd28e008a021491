"""Model I/O in one place: what a model path is, reading DeepSpeed checkpoints and consolidated directories,
writing the consolidated format, loading weights into a (TP-sliced, pipeline-stage) model, and the one loader that
evaluation, conversion and finetuning use.

- `locate(path)`: a consolidated directory (`metalm.json`) or a training checkpoint (a run directory, its
  `checkpoints/` folder, or one tag); the only place that decides.
- `read_model(path)` -> (TrainConfig, full state dict under MetaLM names, info); `source_config(path)` reads the
  config alone.
- `load(path)` -> (MetaLM in eval mode on CPU, TrainConfig, tokenizer, info): no DeepSpeed, no launcher.
- `write_consolidated` / `read_consolidated`: the format of pretrain/convert.py's docstring, written under a
  temporary name and renamed when complete.
- `load_into(model, sd, tp_rank, tp, pipeline_layers)`: full weights into this rank's part of a model.
Foreign formats (Hugging Face) are state-dict adapters of their own (pretrain/hf_adapters.py).

Where the weights come from: ZeRO-3, and ZeRO-1/2 at TP=1 without pipelining, go through DeepSpeed's
`zero_to_fp32` (the fp32 master weights); otherwise the per-rank module / per-layer files DeepSpeed wrote (in the
training dtype), merged over TP ranks along each layer's partition dimension and renamed from pipeline layers.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import torch

from data_tools.durable import fsync_dir, fsync_tree

FORMAT = "metalm-consolidated"
TP_DIM = {"embedding.weight": 0, "word.weight": 0, "qkv.weight": 0, "gate.weight": 0, "up.weight": 0,
          "qkv.bias": 0, "gate.bias": 0, "up.bias": 0,
          "output.weight": 0, "proj.weight": 1, "down.weight": 1}


# the files of a text encoder's own tokenizer (Hugging Face), copied with a consolidated model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt")


class ConvertError(Exception):
    """A bad model path or file (path, architecture, missing shard, vocabulary): one line, exit status 2."""


CONSOLIDATED, CHECKPOINT = "consolidated", "checkpoint"


def locate(path: str) -> tuple[str, str]:
    """(CONSOLIDATED, path) for a consolidated directory; else (CHECKPOINT, dir) where dir is a run directory's
    `checkpoints/` folder or the path as given (a checkpoints folder or one tag, checked when read)."""
    if os.path.isfile(os.path.join(path, "metalm.json")):
        return CONSOLIDATED, path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return CHECKPOINT, os.path.join(path, "checkpoints")
    return CHECKPOINT, path


def tp_dim(name: str) -> int | None:
    """Partition dimension of a tensor-parallel parameter (megatron Column/Row/VocabParallel), None if replicated.
    The connectors and the vision encoder's patch / position / class / prefix embeddings are replicated; its blocks
    are tensor-parallel like the decoder's."""
    if name.startswith(("connector", "vision_connector")) or (name.startswith("vision.")
                                                               and not name.startswith("vision.stack.")):
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
    kind, where = locate(path)
    if kind == CONSOLIDATED:
        return _relative_files(_load_config(where), where)
    return _load_config(resolve_tag_dir(where, checksums=False))


ENCODER_TOKENIZER_DIR = "encoder_tokenizer"


def _relative_files(cfg, base: str):
    """A consolidated directory names its text encoder's own tokenizer relative to itself: made absolute here."""
    e = cfg.model.encoder
    if e is not None and e.tokenizer and not os.path.isabs(e.tokenizer):
        e.tokenizer = os.path.join(os.path.abspath(base), e.tokenizer)
    return cfg


def read_model(path: str) -> tuple[object, dict, dict]:
    """(cfg, full state dict, info) from a consolidated dir or a run / checkpoint dir."""
    kind, where = locate(path)
    return read_consolidated(where) if kind == CONSOLIDATED else read_checkpoint(where)


def load(path: str, tokenizer_override: str = ""):
    """(MetaLM in eval mode on CPU, TrainConfig, tokenizer, info) from any model path `locate` knows: the
    consolidated directory's own tokenizer files, or the tokenizer a checkpoint's config names."""
    from data_tools.tokenizer import load_from_dir
    from pretrain.parallel import init_distributed, init_model_parallel

    if not os.path.isdir(path):
        raise ConvertError(f"model not found: {path}")
    kind, where = locate(path)
    if kind == CHECKPOINT and not any(os.path.isfile(os.path.join(where, f)) for f in ("latest", "COMPLETE")):
        raise ConvertError(f"{path}: neither a consolidated model (metalm.json) nor a run / checkpoint directory of "
                           "pretrain.train (latest, COMPLETE)")
    cfg, sd, info = read_consolidated(where) if kind == CONSOLIDATED else read_checkpoint(where)
    tok = (load_from_dir(where) if kind == CONSOLIDATED and not tokenizer_override
           else resolve_tokenizer(cfg, tokenizer_override))
    init_distributed("gloo")
    init_model_parallel(1, 1)
    from pretrain.model.metalm import MetaLM

    model = MetaLM(cfg.model)
    load_into(model, sd)
    return model.eval(), cfg, tok, dict(info, path=os.path.abspath(path))


def resolve_tag_dir(path: str, checksums: bool = True) -> str:
    """The complete checkpoint tag a checkpoints folder (`latest`) or tag names; its files verified (sizes, and
    CRCs unless `checksums` is False: reading the config alone needs no pass over the weights)."""
    if not os.path.isdir(path):
        raise ConvertError(f"checkpoint not found: {path}")
    if os.path.isfile(os.path.join(path, "latest")):
        path = os.path.join(path, open(os.path.join(path, "latest")).read().strip())
    if not os.path.isfile(os.path.join(path, "COMPLETE")):
        raise ConvertError(f"{path}: not a complete checkpoint (no COMPLETE marker: cut off while saving?)")
    from pretrain.checkpoint import damage

    if why := damage(path, checksums=checksums):
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


def read_checkpoint(path: str) -> tuple[object, dict, dict]:
    """(TrainConfig, full fp32 state dict under MetaLM names, extra info) from a DeepSpeed checkpoint tag dir."""
    tag_dir = resolve_tag_dir(path)
    cfg = _load_config(tag_dir)
    tp = cfg.parallel.tp
    first = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(first):  # ZeRO-3 names its model states per data-parallel rank
        first = os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    states = _torch_load(first)
    stage = states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    layer_files = sorted(glob.glob(os.path.join(tag_dir, "layer_*-model_states.pt")))
    if layer_files:
        from pretrain.pipeline import pipeline_to_metalm

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
def write_dir(out: str, write) -> str:
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
    enc_tok = cfg.model.encoder.tokenizer if cfg.model.encoder is not None else ""
    if enc_tok and not os.path.exists(enc_tok):
        raise ConvertError(f"the text encoder's tokenizer is missing: {enc_tok}")
    if not isinstance(tokenizer, BaseTokenizer):
        try:
            tokenizer = load_tokenizer(tokenizer)
        except UserError as e:
            raise ConvertError(str(e)) from None
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]

    def write(tmp):
        save_file({k: v.to(tdtype).contiguous() for k, v in sorted(sd.items())}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": FORMAT})
        saved = config_to_dict(cfg)
        if enc_tok:  # the encoder's own tokenizer travels inside the directory, named relative to it
            src = enc_tok if os.path.isdir(enc_tok) else os.path.dirname(enc_tok)
            dst = os.path.join(tmp, ENCODER_TOKENIZER_DIR)
            os.makedirs(dst)
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            if not os.path.isdir(enc_tok):
                shutil.copyfile(enc_tok, os.path.join(dst, "tokenizer.json"))
            saved["model"]["encoder"]["tokenizer"] = ENCODER_TOKENIZER_DIR
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(saved, f, sort_keys=False)
        copy_to_dir(tokenizer, tmp)
        with open(os.path.join(tmp, "metalm.json"), "w") as f:
            json.dump({"format": FORMAT, "version": 1, "dtype": dtype, **info}, f, indent=2)

    return write_dir(out, write)


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
    cfg = _relative_files(load_config(os.path.join(path, "config.yaml")), path)
    return cfg, {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}, info


def load_consolidated(path: str):
    """(MetaLM in eval mode on CPU, TrainConfig, Tokenizer) of a consolidated directory."""
    if locate(path)[0] != CONSOLIDATED:
        raise ConvertError(f"{path}: not a consolidated MetaLM directory (no metalm.json)")
    model, cfg, tok, _ = load(path)
    return model, cfg, tok


def load_into(model: torch.nn.Module, sd: dict, tp_rank: int = 0, tp: int = 1, pipeline_layers: int = 0,
              partial: bool = False) -> None:
    """Copy full weights into a (possibly TP-sharded, possibly pipeline) model, slicing each TP parameter;
    `partial`: `sd` is one part of the model (an imported text encoder), the rest keeps its values."""
    own = model.state_dict()
    n_set = 0
    with torch.no_grad():
        for name, full in sd.items():
            target = name
            if pipeline_layers:
                from pretrain.pipeline import metalm_to_pipeline

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
    if partial:  # every parameter of the parts given (e.g. all of `encoder.*`)
        parts = {k.split(".")[0] for k in sd}
        unset = [k for k in own if k.split(".")[0] in parts and k not in sd and not k.endswith("._extra_state")]
        if unset and not pipeline_layers:
            raise ConvertError(f"{len(unset)} parameters of {', '.join(sorted(parts))} were not given ({unset[0]}, ...)")
    elif not pipeline_layers:
        expected = [k for k, v in own.items() if isinstance(v, torch.Tensor) and not k.endswith("._extra_state")]
        if n_set != len(expected):
            raise ConvertError(f"loaded {n_set} of {len(expected)} parameters")
