"""Image-text samples of the batch contract (vision-language MetaLM, METHOD.md §4), and image preprocessing.

A sample is `<s> (<image> [S image slots] </image>)×k caption </s>` followed by padding: each image's S connector
outputs are docked into its S slots (`image_dst`), the caption is ordinary decoder tokens, and only the caption
tokens and the closing `</s>` are targets — never an image slot, never `<image>` / `</image>` (the loss mask is 0
wherever the *label* is a slot or a marker, and on padding).

`collate_vl` stacks samples and flattens the slot positions over the batch (`image_dst` indexes the flat decoder
input [B*T], in the order of the stacked `images` [M, 3, H, W] and their slots), as `MetaLM.embed_and_dock` reads
them. `load_image` decodes, resizes and normalises with Pillow and numpy only (no torchvision): the same bytes give
the same array, so a loader is deterministic from (seed, sample index).

Legend: T decoder length, S slots per image, M images in a batch.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

# CLIP's normalisation constants (the usual ones for a ViT; ours is trained from scratch, any fixed pair works)
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class VLIds:
    bos: int
    eos: int
    pad: int
    image: int
    image_end: int

    @classmethod
    def of(cls, tok) -> "VLIds":
        ids = tok.ids
        if ids.image is None or ids.image_end is None:
            raise ValueError(f"the tokenizer ({tok.describe()}) has no <image> / </image> tokens: vision-language "
                             "rows need them (python -m data_tools.tokenizer add-image-tokens --tokenizer TOK --out "
                             "DIR [--datasets PREFIX ...] adds them to a tokenizer.json; a SentencePiece model gets "
                             "them from data_tools.tokenizer train)")
        return cls(ids.bos, ids.eos, ids.pad, ids.image, ids.image_end)


def load_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> float32 [3, size, size]: RGB (transparency composited on white, as the stamps are drawn),
    bicubic resize, scaled to [0, 1] and normalised per channel."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im)
        im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        x = np.asarray(im, dtype=np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1).copy()


# A pretrained tower's preprocessing (its preprocessor_config.json), reproduced with Pillow + numpy in the order and
# arithmetic of transformers' PIL image processors (convert to RGB over white, resize with the checkpoint's filter,
# centre crop padding with zeros when the image is smaller, rescale in float64, normalise in float32), so the loader
# needs neither transformers nor torchvision and gives the pixel values the tower was trained on. The defaults of
# each processor type are transformers' class defaults, used where the file leaves a key out.
CLIP_PROCESSOR = dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                      crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                      do_normalize=True, image_mean=MEAN.tolist(), image_std=STD.tolist(), do_convert_rgb=True)
PROCESSOR_DEFAULTS = {
    "clip": (CLIP_PROCESSOR, False),  # (defaults, default_to_square for an integer size)
    "siglip": (dict(CLIP_PROCESSOR, size={"height": 224, "width": 224}, do_center_crop=False,
                    image_mean=[0.5] * 3, image_std=[0.5] * 3), True),
    "vit": (dict(CLIP_PROCESSOR, size={"height": 224, "width": 224}, resample=2, do_center_crop=False,
                 image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=False), True),
}
PROCESSOR_TYPES = {"CLIPImageProcessor": "clip", "CLIPFeatureExtractor": "clip", "SiglipImageProcessor": "siglip",
                   "ViTImageProcessor": "vit", "ViTFeatureExtractor": "vit"}
KNOWN_KEYS = set(CLIP_PROCESSOR) | {"image_processor_type", "feature_extractor_type", "processor_class",
                                    "default_to_square", "use_square_size", "type"}


def preprocessor_config(raw: dict, where: str) -> dict:
    """A preprocessor_config.json as the fields `Preprocessor` runs (defaults filled in, sizes as dicts), or
    ValueError naming the field: other processor types, functions we do not reproduce (`do_pad`, ...), a
    resize without a fixed output size."""
    name = raw.get("image_processor_type") or raw.get("feature_extractor_type") or ""
    base = name.removesuffix("Fast").removesuffix("Pil")
    kind = raw.get("type") or PROCESSOR_TYPES.get(base)
    if kind not in PROCESSOR_DEFAULTS:
        raise ValueError(f"{where}: image_processor_type {name!r} is not supported (supported: "
                         f"{', '.join(sorted(PROCESSOR_TYPES))})")
    defaults, square = PROCESSOR_DEFAULTS[kind]
    for key, value in raw.items():
        if key not in KNOWN_KEYS and key.startswith("do_") and value:
            raise ValueError(f"{where}: {key}={value!r} is not reproduced by our loader")
    cfg = {k: raw.get(k, v) for k, v in defaults.items()}
    square = raw.get("default_to_square", square)

    def as_size(v, field, square):
        if isinstance(v, int):
            return {"height": v, "width": v} if square else {"shortest_edge": v}
        if isinstance(v, dict) and set(v) == {"shortest_edge"} and isinstance(v["shortest_edge"], int):
            return {"shortest_edge": v["shortest_edge"]}
        if isinstance(v, dict) and set(v) == {"height", "width"} and all(isinstance(x, int) for x in v.values()):
            return {"height": v["height"], "width": v["width"]}
        raise ValueError(f"{where}: {field} {v!r}: expected an integer, {{'shortest_edge': n}} or "
                         "{'height': h, 'width': w}")

    cfg["size"] = as_size(cfg["size"], "size", square)
    if raw.get("use_square_size") and "shortest_edge" in cfg["size"]:
        n = cfg["size"]["shortest_edge"]
        cfg["size"] = {"height": n, "width": n}
    cfg["crop_size"] = as_size(cfg["crop_size"], "crop_size", True)
    if "shortest_edge" in cfg["crop_size"]:
        raise ValueError(f"{where}: crop_size needs a height and a width")
    if cfg["resample"] not in range(6):
        raise ValueError(f"{where}: resample {cfg['resample']!r}: expected a PIL filter number 0..5")
    for key in ("image_mean", "image_std"):
        v = cfg[key]
        v = [v] * 3 if isinstance(v, (int, float)) else v
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise ValueError(f"{where}: {key} {cfg[key]!r}: expected 3 numbers (RGB)")
        cfg[key] = [float(x) for x in v]
    out = {k: cfg[k] for k in defaults}
    out["type"] = kind
    if output_size(out) is None:
        raise ValueError(f"{where}: resizing the shortest edge without a centre crop gives no fixed image size")
    return out


def output_size(p: dict) -> tuple[int, int] | None:
    """(height, width) of what the preprocessor produces, or None when it depends on the image."""
    if p["do_center_crop"]:
        return p["crop_size"]["height"], p["crop_size"]["width"]
    if p["do_resize"] and "height" in p["size"]:
        return p["size"]["height"], p["size"]["width"]
    return None


def resized_to(p: dict, size: int) -> dict:
    """The same preprocessing for square images of `size` (a tower whose positions were interpolated): the
    resize and crop scaled to it."""
    q = dict(p)
    q["size"] = ({"shortest_edge": size} if "shortest_edge" in p["size"] else {"height": size, "width": size})
    if p["do_center_crop"]:
        q["crop_size"] = {"height": size, "width": size}
    return q


def to_rgb(im):
    """RGB, with transparency composited on white (transformers' convert_to_rgb and our own loader agree)."""
    from PIL import Image

    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


class Preprocessor:
    """bytes -> float32 [3, H, W] by a checkpoint's preprocessing (`preprocessor_config` output); picklable, for
    DataLoader workers."""

    def __init__(self, p: dict):
        self.p = p
        self.mean = np.array(p["image_mean"], dtype=np.float32)
        self.std = np.array(p["image_std"], dtype=np.float32)

    def __call__(self, data: bytes) -> np.ndarray:
        """Without do_convert_rgb transformers takes the image's channels as they are; a 3-channel tower needs RGB,
        so a grey or RGBA image is converted by Pillow's own rule (alpha dropped, as a viewer without a
        background would show it) rather than refused."""
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return self.array(to_rgb(im) if self.p["do_convert_rgb"] else im.convert("RGB"))

    def array(self, im) -> np.ndarray:
        p = self.p
        if p["do_resize"]:
            w, h = im.size
            if "shortest_edge" in p["size"]:
                n = p["size"]["shortest_edge"]
                short, long = (w, h) if w <= h else (h, w)
                new_long = int(n * long / short)
                out_h, out_w = (new_long, n) if w <= h else (n, new_long)
            else:
                out_h, out_w = p["size"]["height"], p["size"]["width"]
            im = im.resize((out_w, out_h), resample=p["resample"])
        x = np.asarray(im)  # [H, W, 3] uint8
        if p["do_center_crop"]:
            x = center_crop(x, p["crop_size"]["height"], p["crop_size"]["width"])
        if p["do_rescale"]:
            x = (x.astype(np.float64) * p["rescale_factor"]).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if p["do_normalize"]:
            x = (x - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """[H, W, C] centre crop; an image smaller than the crop is padded with zeros around it (transformers'
    rule: the padding's odd pixel goes before)."""
    H, W = x.shape[:2]
    top, left = (H - ch) // 2, (W - cw) // 2
    if top >= 0 and left >= 0:
        return x[top:top + ch, left:left + cw]
    nh, nw = max(ch, H), max(cw, W)
    out = np.zeros((nh, nw) + x.shape[2:], dtype=x.dtype)
    tp, lp = -(-(nh - H) // 2), -(-(nw - W) // 2)
    out[tp:tp + H, lp:lp + W] = x
    top, left = top + tp, left + lp
    return out[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def image_loader(vision_cfg) -> "Preprocessor | OwnPreprocessing":
    """What turns image bytes into the tower's pixel values: the checkpoint's preprocessing for an imported tower,
    our own (`load_image`) otherwise."""
    if vision_cfg.preprocessor:
        return Preprocessor(vision_cfg.preprocessor)
    return OwnPreprocessing(vision_cfg.image_size)


class OwnPreprocessing:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, data: bytes) -> np.ndarray:
        return load_image(data, self.size)


@dataclass(frozen=True)
class Pair:
    """One image and the text after it: `caption` ids, targets counted from caption index `counted_from` (VQA: the
    answer only; a few-shot demonstration: none = len(caption)), the first `prefix` caption tokens also read by
    the vision encoder (paper variant; 0 = none)."""
    caption: list
    counted_from: int = 0
    prefix: int = 0


def build_vl_row(pairs: list[Pair], slots: int, T: int, ids: VLIds, caption_prefix: int = 0,
                 patches: int = 0) -> dict[str, np.ndarray]:
    """`<s> (<image> [slots] </image> caption)… </s>`, padded to T; see the module docstring for the loss rule.

    Counted targets: caption tokens from `counted_from` on, except those predicted from inside the caption prefix
    (positions s..e-2 of the prefix span, METHOD.md §1), and `</s>` when the last pair counts anything.
    `image_dst` [k*S] (or [k*(P+Lp)] with `caption_prefix` Lp: the P slots, then the Lp prefix positions, -1 where
    the prefix is shorter) indexes this row; with Lp also `image_text` [k, Lp] and `image_segments` [k, P+Lp]."""
    seq, counted, dst = [ids.bos], [False], []
    texts = np.full((len(pairs), caption_prefix), ids.pad, dtype=np.int64)
    segs = np.full((len(pairs), patches + caption_prefix), -1, dtype=np.int32)
    for j, p in enumerate(pairs):
        if p.prefix > caption_prefix or p.prefix > len(p.caption):
            raise ValueError(f"caption prefix {p.prefix} exceeds vision.caption_prefix={caption_prefix} or the "
                             f"caption ({len(p.caption)} tokens)")
        seq.append(ids.image)
        counted.append(False)
        dst += list(range(len(seq), len(seq) + slots))
        seq += [ids.pad] * slots  # placeholders: overwritten by the docked image features
        seq.append(ids.image_end)
        counted += [False] * (slots + 1)
        start = len(seq)
        seq += list(p.caption)
        # label index i of the caption counts unless before counted_from or inside the prefix (1 <= i < prefix)
        counted += [i >= p.counted_from and not 1 <= i < p.prefix for i in range(len(p.caption))]
        if caption_prefix:
            texts[j, :p.prefix] = p.caption[:p.prefix]
            segs[j, :patches + p.prefix] = 0
            dst += list(range(start, start + p.prefix)) + [-1] * (caption_prefix - p.prefix)
    seq.append(ids.eos)
    counted.append(bool(pairs) and pairs[-1].counted_from < len(pairs[-1].caption))
    if len(seq) > T + 1:
        raise ValueError(f"{len(pairs)} image(s) of {slots} slots and {sum(len(p.caption) for p in pairs)} caption "
                         f"tokens need {len(seq) - 1} positions, more than T={T}")
    n = len(seq) - 1
    tokens = np.full(T, ids.pad, dtype=np.int64)
    labels = np.zeros(T, dtype=np.int64)
    loss_mask = np.zeros(T, dtype=np.float32)
    tokens[:n], labels[:n] = seq[:-1], seq[1:]
    loss_mask[:n] = np.asarray(counted[1:], dtype=np.float32)  # position p predicts seq[p+1]
    out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
           "position_ids": np.arange(T, dtype=np.int64),
           "document_ids": np.where(np.arange(T) < n, 0, -1).astype(np.int32),
           "image_dst": np.array(dst, dtype=np.int64)}
    if caption_prefix:
        out.update(image_text=texts, image_segments=segs)
    return out


def build_vl_sample(caption_ids: list[int], n_images: int, slots: int, T: int, ids: VLIds) -> dict[str, np.ndarray]:
    """`<s> (<image> [S] </image>)×n caption </s>`: several images, then one caption."""
    pairs = [Pair([], 0) for _ in range(n_images - 1)] + [Pair(list(caption_ids))]
    return build_vl_row(pairs, slots, T, ids)


def collate_vl(samples: list[dict], images: list[np.ndarray] | None = None):
    """Stack samples into the batch contract. Image rows carry `image_dst` (and their decoded `images` [k, 3, H, W]
    unless `images` lists every sample's images in order); `image_dst` is flattened over the batch (row b's
    positions + b*T; padding entries -> the scratch slot B*T), in the order of the stacked `images`. Rows without
    images (text rows of a mixed micro-batch) may carry the text encoder's fields; missing ones are filled empty
    (every batch has the contract's encoder keys, Te = 0 when no row has spans)."""
    import torch

    B = len(samples)
    T = len(samples[0]["tokens"])
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples]))
             for k in ("tokens", "labels", "loss_mask", "position_ids", "document_ids")}
    # text rows of a semi-causal model bring their encoder row and docking; otherwise the row is empty (Te = 0)
    Te = max(len(s.get("enc_tokens", ())) for s in samples)
    enc = {k: [] for k in ("enc_tokens", "enc_positions", "enc_segments")}
    dst = np.full((B, Te), B * T, dtype=np.int64)
    for b, s in enumerate(samples):
        if "enc_tokens" in s:
            enc["enc_tokens"].append(s["enc_tokens"])
            enc["enc_positions"].append(s["enc_positions"])
            enc["enc_segments"].append(s["enc_segments"])
            dst[b] = np.where(s["dock_dst"] >= 0, s["dock_dst"] + b * T, B * T)
        else:
            enc["enc_tokens"].append(np.zeros(Te, dtype=np.int64))
            enc["enc_positions"].append(np.zeros(Te, dtype=np.int64))
            enc["enc_segments"].append(np.full(Te, -1, dtype=np.int32))
    batch.update({k: torch.from_numpy(np.stack(v)) for k, v in enc.items()})
    batch["dock_src"] = torch.arange(B * Te, dtype=torch.int64)
    batch["dock_dst"] = torch.from_numpy(dst.reshape(-1))
    with_images = [(b, s) for b, s in enumerate(samples) if "image_dst" in s]
    dst = [np.where(s["image_dst"] >= 0, s["image_dst"] + b * T, B * T) for b, s in with_images]
    batch["image_dst"] = torch.from_numpy(np.concatenate(dst) if dst else np.zeros(0, dtype=np.int64))
    if images is None:
        images = [im for _, s in with_images for im in s["images"]]
    batch["images"] = torch.from_numpy(np.stack(images)) if len(images) else torch.zeros(0, 3, 1, 1)
    if any("image_text" in s for _, s in with_images):
        batch["image_text"] = torch.from_numpy(np.concatenate([s["image_text"] for _, s in with_images]))
        batch["image_segments"] = torch.from_numpy(np.concatenate([s["image_segments"] for _, s in with_images]))
    return batch
