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


def build_vl_sample(caption_ids: list[int], n_images: int, slots: int, T: int, ids: VLIds) -> dict[str, np.ndarray]:
    """One sample's arrays (see the module docstring); `image_dst` [n_images * S] are positions in this row."""
    seq = [ids.bos]
    dst = []
    for _ in range(n_images):
        seq.append(ids.image)
        dst += list(range(len(seq), len(seq) + slots))
        seq += [ids.pad] * slots  # placeholders: overwritten by the docked image features
        seq.append(ids.image_end)
    caption_start = len(seq)
    seq += list(caption_ids) + [ids.eos]
    if len(seq) > T + 1:
        raise ValueError(f"{n_images} image(s) of {slots} slots and a {len(caption_ids)}-token caption need "
                         f"{len(seq) - 1} positions, more than T={T}")
    n = len(seq) - 1
    tokens = np.full(T, ids.pad, dtype=np.int64)
    labels = np.zeros(T, dtype=np.int64)
    loss_mask = np.zeros(T, dtype=np.float32)
    tokens[:n], labels[:n] = seq[:-1], seq[1:]
    loss_mask[caption_start - 1:n] = 1.0  # labels caption_start..end: the caption tokens and </s>
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": np.arange(T, dtype=np.int64),
            "document_ids": np.where(np.arange(T) < n, 0, -1).astype(np.int32),
            "image_dst": np.array(dst, dtype=np.int64)}


def collate_vl(samples: list[dict], images: list[np.ndarray]):
    """Stack samples; `images` holds every sample's images in order ([3, H, W] each), `image_dst` is flattened over
    the batch (row b's positions + b*T), one entry per slot of each image in that order."""
    import torch

    T = len(samples[0]["tokens"])
    batch = {k: torch.from_numpy(np.stack([s[k] for s in samples]))
             for k in ("tokens", "labels", "loss_mask", "position_ids", "document_ids")}
    dst = [s["image_dst"] + b * T for b, s in enumerate(samples)]
    batch["image_dst"] = torch.from_numpy(np.concatenate(dst) if dst else np.zeros(0, dtype=np.int64))
    batch["images"] = torch.from_numpy(np.stack(images)) if images else torch.zeros(0, 3, 1, 1)
    return batch
