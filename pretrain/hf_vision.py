"""Pretrained vision towers (CLIPVisionModel, SiglipVisionModel, ViTModel) docked as MetaLM's vision encoder: config,
weights and preprocessing in, the tower back out as a CLIPVisionModel or SiglipVisionModel.

    python -m pretrain.convert import-encoder --hf DIR --into MODEL|PRESET --out OUT [--image-size 336]
        [--feature-layer -2] [--drop-class-token] [--trainable-top-layers k | --freeze-vision]
    python -m pretrain.convert export-encoder --model OUT --out hf/tower [--vision-type clip|siglip]
    # or in a training config: model.vision.from_hf=DIR (architecture, weights at step 0, preprocessing)

- `vision_config(hc, where, ...)`: our VisionConfig for a config.json (`clip_vision_model`, `siglip_vision_model`,
  `vit`; a full `clip` / `siglip` directory gives its `vision_config`): pre-norm LayerNorm blocks with biases,
  quick_gelu / gelu / gelu_pytorch_tanh, and per family CLIP's class token + pre-LayerNorm + no patch bias + no
  final norm, SigLIP's patch bias + final norm and no class token, ViT's class token + patch bias + final norm.
  Everything else is refused by name (other model types, activations, `qkv_bias=false`, ...).
- `VisionAdapter`: state-dict mapping (separate q/k/v into our fused per-head QKV). Weights of a full CLIPModel /
  SiglipModel (`vision_model.` prefix) or a ViTFor* model (`vit.`) import; heads (SigLIP's attention-pooling head,
  ViT's pooler, CLIP's projection) are not imported: MetaLM docks patch features. CLIP's `post_layernorm` only
  normalises the pooled class token, so it is not imported either; export writes an identity one.
- Positions: when the training image size differs from the checkpoint's, the patch positions are resized once at
  import with the bicubic interpolation of transformers' `interpolate_pos_encoding` (the class position kept), so
  the tower equals `model(pixel_values, interpolate_pos_encoding=True)`.
- Preprocessing: the checkpoint's `preprocessor_config.json`, validated (data_tools/vl_samples.py, which runs it
  with Pillow + numpy), stored in `model.vision.preprocessor`: training, `eval.vl` and export read it from there.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn.functional as F

from pretrain.hf_adapters import StateDictAdapter
from pretrain.model_io import ConvertError

TOWERS = ("clip_vision_model", "siglip_vision_model", "vit")
CONTAINERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}  # full models: their vision_config
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
STRUCTURE = {
    "clip_vision_model": dict(class_token=True, patch_bias=False, pre_norm=True, final_norm=False),
    "siglip_vision_model": dict(class_token=False, patch_bias=True, pre_norm=False, final_norm=True),
    "vit": dict(class_token=True, patch_bias=True, pre_norm=False, final_norm=True),
}
EXPORT_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
PREFIXES = ("vision_model.", "vit.")


def is_vision_dir(hf_dir: str) -> bool:
    from pretrain.hf_encoders import read_hf_config

    return read_hf_config(hf_dir).get("model_type") in TOWERS + tuple(CONTAINERS)


def tower_config(hc: dict, where: str) -> tuple[str, dict]:
    """(tower model type, its config dict) of a config.json (a full CLIP / SigLIP model: its vision_config)."""
    kind = hc.get("model_type")
    if kind in CONTAINERS:
        vc = hc.get("vision_config")
        if not isinstance(vc, dict):
            raise ConvertError(f"{where}: model_type {kind!r} without a vision_config")
        return CONTAINERS[kind], vc
    if kind not in TOWERS:
        raise ConvertError(f"{where}: model_type {kind!r} cannot be imported as a vision encoder (supported: "
                           f"{', '.join(TOWERS + tuple(CONTAINERS))})")
    return kind, hc


def vision_config(hc: dict, where: str, image_size: int = 0, preprocessor: dict | None = None, **keep):
    """VisionConfig for a CLIP / SigLIP / ViT config.json, or ConvertError naming the field. `image_size` (0: the
    checkpoint's) is the training image size; `keep`: feature_layer, keep_class_token, trainable_top_layers, ..."""
    from pretrain.config import StackConfig, VisionConfig

    kind, vc = tower_config(hc, where)
    defaults = {"clip_vision_model": dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, image_size=224,
                                          patch_size=32),
                "siglip_vision_model": dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, image_size=224,
                                            patch_size=16),
                "vit": dict(hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16)}[kind]
    vc = {**defaults, **vc}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                "patch_size"):
        if not isinstance(vc.get(key), int):
            raise ConvertError(f"{where}: {key} missing or not an integer")
    act = vc["hidden_act"]
    if act not in ACTIVATIONS:
        raise ConvertError(f"{where}: hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    if kind == "vit" and vc.get("qkv_bias") is False:
        raise ConvertError(f"{where}: qkv_bias=false is not supported (our attention has one bias setting)")
    if vc["hidden_size"] % vc["num_attention_heads"]:
        raise ConvertError(f"{where}: hidden_size {vc['hidden_size']} is not divisible by num_attention_heads "
                           f"{vc['num_attention_heads']}")
    if vc["image_size"] % vc["patch_size"]:
        raise ConvertError(f"{where}: image_size {vc['image_size']} is not a multiple of patch_size "
                           f"{vc['patch_size']}")
    size = image_size or vc["image_size"]
    if size % vc["patch_size"]:
        raise ConvertError(f"image size {size} is not a multiple of the tower's patch_size {vc['patch_size']}")
    drop = (float(vc.get("hidden_dropout_prob", 0.0)), float(vc.get("attention_probs_dropout_prob", 0.0))) \
        if kind == "vit" else (0.0, float(vc.get("attention_dropout", 0.0)))
    st = STRUCTURE[kind]
    try:
        stack = StackConfig(vc["num_hidden_layers"], vc["hidden_size"], vc["num_attention_heads"],
                            ffn_hidden=vc["intermediate_size"], norm_eps=float(vc["layer_norm_eps"]),
                            norm="layernorm", norm_position="pre", activation=ACTIVATIONS[act], bias=True,
                            positions="learned", hidden_dropout=drop[0], attention_dropout=drop[1],
                            final_norm=st["final_norm"])
        return VisionConfig(stack, image_size=size, patch_size=vc["patch_size"],
                            channels=int(vc.get("num_channels", 3)), class_token=st["class_token"],
                            patch_bias=st["patch_bias"], pre_norm=st["pre_norm"], hf_model_type=kind,
                            preprocessor=preprocessor, **keep)
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from None


def read_preprocessor(hf_dir: str, image_size: int) -> dict:
    """The validated preprocessor_config.json of `hf_dir`, for square images of `image_size` (its resize and crop
    scaled when the training size differs from what the file produces)."""
    from data_tools.vl_samples import output_size, preprocessor_config, resized_to

    path = os.path.join(hf_dir, "preprocessor_config.json")
    if not os.path.isfile(path):
        raise ConvertError(f"{hf_dir}: no preprocessor_config.json (the tower's resize, crop and normalisation)")
    try:
        p = preprocessor_config(json.load(open(path)), path)
    except ValueError as e:  # JSONDecodeError included
        raise ConvertError(str(e) if path in str(e) else f"{path}: {e}") from None
    h, w = output_size(p)
    if h != w:
        raise ConvertError(f"{path}: produces {h}x{w} images; only square images are supported")
    return p if h == image_size else resized_to(p, image_size)


class VisionAdapter(StateDictAdapter):
    """Our `vision.*` parameters <-> CLIPVisionModel / SiglipVisionModel / ViTModel names (no prefix, no head)."""

    def __init__(self, vcfg, kind: str | None = None):
        super().__init__(vcfg)
        self.v = vcfg
        self.kind = kind or vcfg.hf_model_type

    def _layer_names(self, i: int) -> dict:
        p = f"vision.stack.layers.{i}."
        if self.kind == "vit":
            q = f"encoder.layer.{i}."
            pairs = {"attn_norm": "layernorm_before", "attn.proj": "attention.output.dense",
                     "mlp_norm": "layernorm_after", "mlp.up": "intermediate.dense", "mlp.down": "output.dense"}
        else:
            q = f"encoder.layers.{i}."
            pairs = {"attn_norm": "layer_norm1", "attn.proj": "self_attn.out_proj", "mlp_norm": "layer_norm2",
                     "mlp.up": "mlp.fc1", "mlp.down": "mlp.fc2"}
        return {p + f"{a}.{w}": q + f"{b}.{w}" for a, b in pairs.items() for w in ("weight", "bias")}

    def _qkv_names(self, i: int) -> list[str]:
        if self.kind == "vit":
            return [f"encoder.layer.{i}.attention.attention.{n}" for n in ("query", "key", "value")]
        return [f"encoder.layers.{i}.self_attn.{n}_proj" for n in ("q", "k", "v")]

    def _embedding_names(self) -> dict:
        if self.kind == "vit":
            m = {"vision.patch.weight": "embeddings.patch_embeddings.projection.weight",
                 "vision.patch.bias": "embeddings.patch_embeddings.projection.bias"}
        else:
            m = {"vision.patch.weight": "embeddings.patch_embedding.weight"}
            if self.v.patch_bias:
                m["vision.patch.bias"] = "embeddings.patch_embedding.bias"
        if self.v.pre_norm:
            m.update({"vision.pre_norm.weight": "pre_layrnorm.weight", "vision.pre_norm.bias": "pre_layrnorm.bias"})
        if self.v.stack.final_norm:
            final = "layernorm" if self.kind == "vit" else "post_layernorm"
            m.update({"vision.stack.norm.weight": f"{final}.weight", "vision.stack.norm.bias": f"{final}.bias"})
        return m

    def from_hf(self, hf: dict) -> dict:
        v, s = self.v, self.v.stack
        H, D, d = s.heads, s.head_dim, s.hidden
        out = {ours: hf[theirs] for ours, theirs in self._embedding_names().items()}
        for i in range(s.layers):
            out.update({ours: hf[theirs] for ours, theirs in self._layer_names(i).items()})
            names = self._qkv_names(i)
            w = torch.stack([hf[n + ".weight"].view(H, D, d) for n in names], 1)  # our rows: (head, {q,k,v}, D)
            b = torch.stack([hf[n + ".bias"].view(H, D) for n in names], 1)
            out[f"vision.stack.layers.{i}.attn.qkv.weight"] = w.reshape(3 * H * D, d)
            out[f"vision.stack.layers.{i}.attn.qkv.bias"] = b.reshape(3 * H * D)
        if self.kind == "vit":
            pos, cls = hf["embeddings.position_embeddings"][0], hf["embeddings.cls_token"].reshape(d)
        else:
            pos, cls = hf["embeddings.position_embedding.weight"], hf.get("embeddings.class_embedding")
        out["vision.pos"] = interpolate_positions(pos, v.class_token, v.image_size // v.patch_size)
        if v.class_token:
            out["vision.cls"] = cls
        return out

    def to_hf(self, sd: dict) -> dict:
        """Ours -> CLIPVisionModel / SiglipVisionModel names (export)."""
        s = self.v.stack
        H, D, d = s.heads, s.head_dim, s.hidden
        out = {theirs: sd[ours] for ours, theirs in self._embedding_names().items()}
        for i in range(s.layers):
            out.update({theirs: sd[ours] for ours, theirs in self._layer_names(i).items()})
            w = sd[f"vision.stack.layers.{i}.attn.qkv.weight"].view(H, 3, D, d)
            b = sd[f"vision.stack.layers.{i}.attn.qkv.bias"].view(H, 3, D)
            for j, n in enumerate(self._qkv_names(i)):
                out[n + ".weight"] = w[:, j].reshape(H * D, d).contiguous()
                out[n + ".bias"] = b[:, j].reshape(H * D).contiguous()
        out["embeddings.position_embedding.weight"] = sd["vision.pos"]
        if self.v.class_token:
            out["embeddings.class_embedding"] = sd["vision.cls"]
        if self.kind == "clip_vision_model":  # normalises the pooled class token only; MetaLM never uses it
            out["post_layernorm.weight"], out["post_layernorm.bias"] = torch.ones(d), torch.zeros(d)
        return out

    def expected_hf(self) -> dict:
        """HF name -> shape: a checkpoint is checked against its config.json before it is mapped."""
        v, s = self.v, self.v.stack
        d, c, k = s.hidden, v.channels, v.patch_size
        shapes = {theirs: None for theirs in self._embedding_names().values()}
        shapes[self._embedding_names()["vision.patch.weight"]] = (d, c, k, k)
        for i in range(s.layers):
            shapes.update({n + ".weight": (d, d) for n in self._qkv_names(i)})
            up = [t for o, t in self._layer_names(i).items() if o.endswith("mlp.up.weight")][0]
            shapes[up] = (s.ffn_hidden, d)
        if self.kind == "vit":
            shapes["embeddings.cls_token"] = (1, 1, d)
            shapes["embeddings.position_embeddings"] = None
        else:
            shapes["embeddings.position_embedding.weight"] = None
            if v.class_token:
                shapes["embeddings.class_embedding"] = (d,)
        return shapes


def interpolate_positions(pos: torch.Tensor, class_token: bool, grid: int) -> torch.Tensor:
    """[n, d] learned positions (class position first when `class_token`) resized to a grid x grid patch layout,
    as transformers' `interpolate_pos_encoding` computes it (bicubic, align_corners=False); unchanged when the
    grid is the checkpoint's."""
    cls, patch = (pos[:1], pos[1:]) if class_token else (pos[:0], pos)
    n, d = patch.shape
    old = int(n ** 0.5)
    if old * old != n:
        raise ConvertError(f"{n} patch positions do not form a square grid")
    if old != grid:
        p = patch.reshape(1, old, old, d).permute(0, 3, 1, 2)
        p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False)
        patch = p.permute(0, 2, 3, 1).reshape(grid * grid, d)
    return torch.cat([cls, patch]).contiguous()


def read_tower_weights(hf_dir: str, v) -> dict:
    """The tower's tensors of a Hugging Face directory (safetensors, else pytorch_model.bin): a full model's
    `vision_model.` / a ViTFor* model's `vit.` prefix removed, everything else dropped, checked against the
    config."""
    from pretrain.hf_encoders import check_weights, read_weight_files

    hf = read_weight_files(hf_dir)
    for pre in PREFIXES:
        if any(k.startswith(pre) for k in hf):
            hf = {k[len(pre):]: t for k, t in hf.items() if k.startswith(pre)}
            break
    hf = {k: t.float() for k, t in hf.items()}
    check_weights(hf, VisionAdapter(v).expected_hf(), hf_dir, f"{v.hf_model_type}, {v.stack.layers} layers")
    return hf


def load_hf_tower(hf_dir: str, image_size: int = 0, **keep):
    """(VisionConfig, our `vision.*` state dict) of a Hugging Face vision tower directory."""
    from pretrain.hf_encoders import read_hf_config

    where = os.path.join(hf_dir, "config.json")
    hc = read_hf_config(hf_dir)
    size = image_size or tower_config(hc, where)[1].get("image_size", 224)
    v = vision_config(hc, where, image_size=size, preprocessor=read_preprocessor(hf_dir, size), **keep)
    return v, VisionAdapter(v).from_hf(read_tower_weights(hf_dir, v))


KEEP = ("feature_layer", "keep_class_token", "trainable_top_layers", "caption_prefix")


def apply_from_hf(model_cfg) -> None:
    """`model.vision.from_hf=DIR`: the tower's architecture and preprocessing from DIR, at the checkpoint's image
    size or `interpolate_to` (weights: at step 0, `hf_tower_weights`). The preset's own tower settings are replaced
    (its image_size, patch size, stack); `feature_layer`, `keep_class_token`, `trainable_top_layers` are kept. Once
    resolved (`hf_model_type` set, as in a saved config) DIR is not read again."""
    v = model_cfg.vision
    if v is None or not v.from_hf or v.hf_model_type:
        return
    hf_dir = os.path.abspath(v.from_hf)
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"not found: {hf_dir}")
    from pretrain.hf_encoders import read_hf_config

    where = os.path.join(hf_dir, "config.json")
    hc = read_hf_config(hf_dir)
    size = v.interpolate_to or tower_config(hc, where)[1].get("image_size", 224)
    model_cfg.vision = vision_config(hc, where, image_size=size, preprocessor=read_preprocessor(hf_dir, size),
                                     from_hf=hf_dir, interpolate_to=v.interpolate_to,
                                     **{k: getattr(v, k) for k in KEEP})
    model_cfg.__post_init__()


def hf_tower_weights(model_cfg) -> dict:
    v = model_cfg.vision
    return load_hf_tower(v.from_hf, image_size=v.image_size, **{k: getattr(v, k) for k in KEEP})[1]


# ---------------------------------------------------------------- the two commands (pretrain/convert.py)
def import_vision(hf_dir: str, into: str, out: str, image_size: int = 0, feature_layer: int | None = None,
                  keep_class_token: bool = True, trainable_top_layers: int = -1, freeze: bool = False,
                  tokenizer_model: str = "", seed: int = 1234, keep_connector: bool = False) -> str:
    """A consolidated MetaLM whose vision encoder is the tower of `hf_dir`, with its preprocessing; the decoder (and
    any text encoder) from `into`; the vision connector new (randomly initialised), or with `keep_connector`
    `into`'s own (a tower exported from it and docked back: its shapes must fit)."""
    from pretrain.hf_encoders import dock_part, target_model
    from pretrain.model_io import write_consolidated

    v, v_sd = load_hf_tower(hf_dir, image_size=image_size, feature_layer=feature_layer,
                            keep_class_token=keep_class_token, trainable_top_layers=trainable_top_layers,
                            from_hf=os.path.abspath(hf_dir))
    cfg, src_sd, tok, info = target_model(into, tokenizer_model)
    if cfg.model.vision is not None and cfg.model.vision.caption_prefix:
        v = dataclasses.replace(v, caption_prefix=cfg.model.vision.caption_prefix)
    cfg.model.vision = v
    cfg.model.freeze_vision = freeze
    if keep_connector and not any(k.startswith("vision_connector.") for k in src_sd):
        raise ConvertError(f"--keep-connector: {into} has no vision connector to keep")
    sd = dock_part(cfg, src_sd, v_sd, ("vision.",) if keep_connector else ("vision.", "vision_connector."), seed)
    return write_consolidated(out, cfg, sd, tok, {"source": os.path.abspath(hf_dir), "imported_from": "hf-vision",
                                                  "vision": v.hf_model_type, **info})


def check_exportable(v, kind: str) -> None:
    s = v.stack
    want = dict(STRUCTURE[kind])
    have = dict(class_token=v.class_token, patch_bias=v.patch_bias, pre_norm=v.pre_norm, final_norm=s.final_norm)
    bad = [f"{k}={have[k]}" for k in want if have[k] != want[k]]
    bad += [f"stack.{k}={getattr(s, k)!r}" for k, val in (("norm", "layernorm"), ("norm_position", "pre"),
                                                            ("bias", True)) if getattr(s, k) != val]
    if s.activation == "swiglu":
        bad.append("stack.activation='swiglu'")
    if s.heads != s.kv_heads or s.head_dim * s.heads != s.hidden:
        bad.append(f"stack.kv_heads={s.kv_heads} / head_dim={s.head_dim}")
    if v.caption_prefix:
        bad.append(f"caption_prefix={v.caption_prefix}")
    if bad:
        raise ConvertError(f"the vision encoder cannot be written as a {kind} ({', '.join(bad)})")


def hf_tower_config(v, kind: str):
    import transformers

    s = v.stack
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[s.activation]
    common = dict(hidden_size=s.hidden, intermediate_size=s.ffn_hidden, num_hidden_layers=s.layers,
                  num_attention_heads=s.heads, num_channels=v.channels, image_size=v.image_size,
                  patch_size=v.patch_size, hidden_act=act, layer_norm_eps=s.norm_eps,
                  attention_dropout=s.attention_dropout)
    if kind == "clip_vision_model":
        return transformers.CLIPVisionConfig(**common), transformers.CLIPVisionModel
    return transformers.SiglipVisionConfig(**common, vision_use_head=False), transformers.SiglipVisionModel


def export_vision(model_path: str, out: str, kind: str = "", dtype: str = "fp32") -> str:
    """The (trained) vision encoder as a CLIPVisionModel or SiglipVisionModel directory with the
    preprocessor_config.json of its preprocessing (ours: resize to image_size, bicubic, CLIP's mean/std)."""
    from data_tools.vl_samples import MEAN, STD
    from pretrain.model_io import read_model, write_dir

    cfg, sd, _ = read_model(model_path)
    v = cfg.model.vision
    if v is None:
        raise ConvertError(f"{model_path}: the model has no vision encoder")
    kind = EXPORT_TYPES.get(kind, kind) or (v.hf_model_type if v.hf_model_type in EXPORT_TYPES.values() else
                                            "siglip_vision_model" if not v.class_token else "clip_vision_model")
    if kind not in EXPORT_TYPES.values():
        raise ConvertError(f"--vision-type {kind!r}: expected clip or siglip")
    check_exportable(v, kind)
    hf = VisionAdapter(v, kind).to_hf(sd)
    hc, cls = hf_tower_config(v, kind)
    pre = v.preprocessor or dict(type="clip", do_resize=True, size={"height": v.image_size, "width": v.image_size},
                                 resample=3, do_center_crop=False, crop_size={"height": v.image_size,
                                                                              "width": v.image_size},
                                 do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                 image_mean=MEAN.tolist(), image_std=STD.tolist(), do_convert_rgb=True)
    pre_json = {k: val for k, val in pre.items() if k != "type"}
    pre_json["image_processor_type"] = "CLIPImageProcessor" if kind == "clip_vision_model" else \
        "SiglipImageProcessor"

    def write(tmp):
        with torch.device("meta"):
            model = cls(hc)
        missing, unexpected = model.load_state_dict(hf, strict=False, assign=True)
        left = [n for n, p in model.named_parameters() if p.is_meta]
        if left or unexpected:
            raise ConvertError(f"export left parameters unset {left[:3]} / unplaced {list(unexpected)[:3]}")
        model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        model.config.architectures = [cls.__name__]
        model.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(pre_json, f, indent=2)

    return write_dir(out, write)
