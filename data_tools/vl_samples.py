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
                             "samples need a model trained by data_tools.tokenizer")
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
