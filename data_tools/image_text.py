"""Image-text training data: the parquet shards of `data_tools.images` as vision-language samples, and the mixture
with text documents that vision-language pretraining trains on.

- `ImageTextDataset`: sample i draws a (source, row) by Megatron's blending rule over per-source weights (rows of a
  source in a seeded permutation per epoch of it), decodes and normalises its image(s) with Pillow
  (`vl_samples.load_image`, or an imported tower's own preprocessing: `vl_samples.Preprocessor`) and builds
  `<s> <image> [slots] </image> caption </s>` (`vl_samples.build_vl_row`).
  `task="vqa"` builds `question: what is this? answer: <class name>` with only the answer counted (finetuned
  classification, or VQA-format supervision on some sources; `task` may list one task per source);
  `images_per_sample` k > 1 interleaves k image-caption pairs in one row. With the model's
  `vision.caption_prefix` Lp > 0 (the paper's variant) a random-length prefix of each caption (0..min(Lp, n-1)
  tokens) is also read by the vision encoder, bidirectionally with the patches. Everything random in a sample comes
  from `np.random.default_rng([seed, i])`: a sample is a function of (seed, index), whichever worker builds it.
- `MixedRows`: the mixture. Every micro-batch holds the same number of image-text rows (the first
  `image_rows`) and text rows (the rest, semi-causal or causal samples of `data_tools.datasets`). Chosen over one
  source per micro-batch and over rows mixed at random because it keeps shapes static (the same number of images,
  hence slots, in every micro-batch: no recompilation on GPU, a fixed pipeline schedule), every micro-batch trains
  both the vision encoder and the text objective (no parameter goes without a gradient on any data-parallel
  rank, which ZeRO's gradient partitioning expects), and the ratio is exact at every step instead of in
  expectation. The cost: the image share is quantised to 1/micro_batch (`data.image_fraction` is rounded, and
  the rounding is reported). Between image sources the weights are Megatron's blend (`data.image_path` =
  [w1, dir1, w2, dir2, …] like `data.data_path`); between text sources, `data.data_path`'s own.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data_tools.datasets import blend_order
from data_tools.vl_samples import OwnPreprocessing, Pair, Preprocessor, VLIds, build_vl_row, collate_vl

VQA_PROMPT = "question: what is this? answer:"
CAPTION_PROMPT = "Summarize this image:"


@dataclass(frozen=True)
class ImageSampleConfig:
    seq_length: int  # T
    image_size: int
    slots: int  # decoder slots per image
    patches: int  # vision encoder positions per image (= slots unless a resampler)
    seed: int = 1234
    task: str | tuple = "caption"  # caption | vqa, or one per source (in data.image_path's order)
    images_per_sample: int = 1
    caption_prefix: int = 0  # the model's vision.caption_prefix (0: off)
    preprocessor: dict | None = None  # an imported tower's preprocessing (vl_samples.Preprocessor); None: ours

    def __post_init__(self):
        for t in ([self.task] if isinstance(self.task, str) else self.task):
            if t not in ("caption", "vqa"):
                raise ValueError(f"data.image_task: expected caption or vqa (or a list of them, one per source), "
                                 f"got {t!r}")
        if self.images_per_sample < 1:
            raise ValueError(f"data.images_per_sample={self.images_per_sample}: must be at least 1")


class ImageSource:
    """One fetched dataset directory (`data_tools.images fetch`), one split, in memory (encoded images)."""

    def __init__(self, path: str, split: str):
        from data_tools.images import read_rows

        self.path = path
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        self.classes = list(self.meta.get("classes") or [])
        rows = read_rows(path, split, ("id", "image", "caption", "label"))
        if not rows:
            raise ValueError(f"{path}: no {split!r} rows (splits: {self.meta.get('counts')})"
                             + ("; an evaluation-only source (cifar10) cannot be trained on" if split == "train"
                                else ""))
        self.ids = [r["id"] for r in rows]
        self.images = [r["image"] for r in rows]
        self.captions = [r["caption"] for r in rows]
        self.labels = np.array([r["label"] for r in rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def answer(self, i: int) -> str:
        if self.labels[i] < 0 or not self.classes:
            raise ValueError(f"{self.path}: row {self.ids[i]} has no class label (data.image_task=vqa needs a "
                             "classification source, e.g. fashion_mnist)")
        return self.classes[self.labels[i]]


def parse_image_path(image_path: Sequence) -> tuple[list[str], list[float]]:
    """[dir, …] (weights = sizes) or [w1, dir1, w2, dir2, …]."""
    items = [str(x) for x in image_path]
    try:
        float(items[0])
        weighted = True
    except ValueError:
        weighted = False
    if not weighted:
        return items, []
    if len(items) % 2:
        raise ValueError(f"data.image_path: weights and directories must alternate, got {items}")
    return items[1::2], [float(w) for w in items[0::2]]


class ImageTextDataset:
    """Vision-language samples (numpy dicts with their decoded `images`); see the module docstring."""

    def __init__(self, paths: Sequence[str], weights: Sequence[float], split: str, cfg: ImageSampleConfig, tokenizer,
                 num_samples: int):
        self.cfg = cfg
        self.sources = [ImageSource(p, split) for p in paths]
        self.weights = list(weights) or [float(len(s)) for s in self.sources]
        self.ids = VLIds.of(tokenizer)
        self.tok = tokenizer
        self.order = blend_order([len(s) for s in self.sources], self.weights, num_samples * cfg.images_per_sample,
                                 cfg.seed)
        tasks = [cfg.task] * len(paths) if isinstance(cfg.task, str) else list(cfg.task)
        if len(tasks) != len(paths):
            raise ValueError(f"data.image_task lists {len(tasks)} tasks for {len(paths)} image sources")
        self.tasks = tasks
        for src, task in zip(self.sources, tasks):
            if task == "vqa" and (not src.classes or (src.labels < 0).any()):
                raise ValueError(f"{src.path}: image_task vqa needs a class label on every row (a classification "
                                 "source such as fashion_mnist or mnist)")
        self.prompt = tokenizer.encode(VQA_PROMPT)
        vqa = [len(tokenizer.encode(" " + c)) for src, t in zip(self.sources, tasks) if t == "vqa" for c in src.classes]
        need = cfg.images_per_sample * (cfg.slots + 2 + len(self.prompt) + max(vqa, default=0)) + 1
        if vqa and need > cfg.seq_length:  # checked here, not in a loader worker mid-run
            raise ValueError(f"data.seq_length={cfg.seq_length} is too short for VQA rows: {need} positions for "
                             f"{cfg.images_per_sample} image(s) of {cfg.slots} slots, the question and the longest "
                             "answer")

    def __len__(self) -> int:
        return len(self.order) // self.cfg.images_per_sample

    def pair(self, s: int, row: int, rng) -> Pair:
        c, src = self.cfg, self.sources[s]
        if self.tasks[s] == "vqa":
            answer = self.tok.encode(" " + src.answer(row))
            return Pair(self.prompt + answer, counted_from=len(self.prompt))
        ids = self.tok.encode(src.captions[row])
        prefix = int(rng.integers(0, min(c.caption_prefix, len(ids) - 1) + 1)) if c.caption_prefix and ids else 0
        return Pair(ids, prefix=prefix)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        c = self.cfg
        rng = np.random.default_rng([c.seed, i])
        draws = self.order[i * c.images_per_sample:(i + 1) * c.images_per_sample]
        pairs = [self.pair(s, r, rng) for s, r in draws]
        budget = c.seq_length + 1 - 2 - len(pairs) * (c.slots + 2)  # <s>, </s>, markers and slots
        over = sum(len(p.caption) for p in pairs) - budget
        if over > 0:  # long captions are cut at the end (the last pair's first); the task's answer is never cut
            for j in reversed(range(len(pairs))):
                room = len(pairs[j].caption) - 1 if pairs[j].counted_from == 0 else 0  # VQA pairs stay whole
                cut = min(over, room)
                if cut > 0:
                    keep = len(pairs[j].caption) - cut
                    pairs[j] = Pair(pairs[j].caption[:keep], pairs[j].counted_from, min(pairs[j].prefix, keep - 1))
                    over -= cut
            if over > 0:
                raise ValueError(f"data.seq_length={c.seq_length} is too short for {len(pairs)} image(s) of "
                                 f"{c.slots} slots and their text")
        sample = build_vl_row(pairs, c.slots, c.seq_length, self.ids, c.caption_prefix, c.patches)
        load = Preprocessor(c.preprocessor) if c.preprocessor else OwnPreprocessing(c.image_size)
        sample["images"] = np.stack([load(self.sources[s].images[r]) for s, r in draws])
        return sample

    collate = staticmethod(collate_vl)


class MixedRows:
    """Rows of the mixture: in every micro-batch of `micro_batch` rows the first `image_rows` are image-text
    samples, the rest text samples (module docstring: why). Global row i -> micro-batch j = i // micro_batch."""

    def __init__(self, images: ImageTextDataset, text, micro_batch: int, image_rows: int):
        if not 1 <= image_rows <= micro_batch:
            raise ValueError(f"image rows per micro-batch must be in 1..{micro_batch}, got {image_rows}")
        if image_rows < micro_batch and text is None:
            raise ValueError("text rows are asked for but there is no text dataset (data.data_path)")
        self.images, self.text, self.mb, self.k = images, text, micro_batch, image_rows
        n = len(images) // image_rows
        if image_rows < micro_batch:
            n = min(n, len(text) // (micro_batch - image_rows))
        self.n = n * micro_batch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        j, r = divmod(i, self.mb)
        if r < self.k:
            return self.images[j * self.k + r]
        return self.text[j * (self.mb - self.k) + r - self.k]

    collate = staticmethod(collate_vl)


def image_rows(fraction: float, micro_batch: int) -> int:
    """Image-text rows per micro-batch for a requested share: rounded, at least 1."""
    return min(micro_batch, max(1, round(fraction * micro_batch)))
