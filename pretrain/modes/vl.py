"""Vision-language mode: image-text rows (data_tools/image_text.py) mixed with text rows of the text mode, for a
model with a vision encoder. Validation: `valid` (text, causal view) and `valid_sclm` as for text runs, and
`valid_image` (the caption loss on the image datasets' validation split)."""
from __future__ import annotations

import os

import torch.distributed as dist

from pretrain.config import ConfigError
from pretrain.modes.base import train_rows, valid_rows
from pretrain.modes.text import TextMode, build_text, check_text_data, valid_sets, warn_if_span_cap_binds


class VisionLanguageMode(TextMode):
    def check(self, cfg, pipeline: bool) -> None:
        if cfg.model.vision is None:
            raise ConfigError("data.image_path is set but the model has no vision encoder (model.preset=tiny-vl, "
                              "or model.vision=...)")
        if not 0 < cfg.data.image_fraction <= 1:
            raise ConfigError(f"data.image_fraction={cfg.data.image_fraction}: expected a share in (0, 1]")
        if cfg.model.encoder is not None and cfg.model.encoder.tokenizer:
            raise ConfigError("model.encoder.tokenizer: a text encoder with its own tokenizer is not available in "
                              "vision-language training yet (text-only pretraining and finetuning dock it)")
        check_text_data(cfg)

    def check_tokenizer(self, cfg, tokenizer) -> None:
        """The image markers: found by name in any tokenizer (data_tools/tokenizer.py), or added to a
        tokenizer.json by `python -m data_tools.tokenizer add-image-tokens`."""
        super().check_tokenizer(cfg, tokenizer)
        from data_tools.vl_samples import VLIds

        try:
            VLIds.of(tokenizer)
        except ValueError as e:
            raise ConfigError(f"data.tokenizer_model: {e}") from None

    def absolute_paths(self, cfg) -> None:
        from data_tools.image_text import parse_image_path

        dirs, weights = parse_image_path(cfg.data.image_path)
        for d in dirs:
            if not os.path.isfile(os.path.join(d, "meta.json")):
                raise ConfigError(f"data.image_path: {d} is not a fetched image dataset (no meta.json; "
                                  "python -m data_tools.images fetch --name NAME --out DIR)")
        cfg.data.image_path = [os.path.abspath(d) for d in dirs] if not weights else [
            x for w, d in zip(weights, dirs) for x in (w, os.path.abspath(d))]

    def build_data(self, cfg, tokenizer, dp: int):
        from data_tools.image_text import ImageSampleConfig, ImageTextDataset, MixedRows, image_rows, parse_image_path

        warn_if_span_cap_binds(cfg)
        d, m, mb = cfg.data, cfg.model, cfg.parallel.micro_batch
        n_train, n_valid = train_rows(cfg, dp), valid_rows(cfg, dp)
        k = image_rows(d.image_fraction, mb)
        dirs, weights = parse_image_path(d.image_path)
        n_img = n_train // mb * k
        try:  # no train rows, a source without classes for vqa, a tokenizer without <image>, a bad image_task
            icfg = ImageSampleConfig(seq_length=d.seq_length, image_size=m.vision.image_size, slots=m.image_slots(),
                                     patches=m.vision.patches, seed=cfg.seed,
                                     task=d.image_task[0] if len(d.image_task) == 1 else tuple(d.image_task),
                                     images_per_sample=d.images_per_sample, caption_prefix=m.vision.caption_prefix,
                                     preprocessor=m.vision.preprocessor)
            images = ImageTextDataset(dirs, weights, "train", icfg, tokenizer, n_img)
            valid_images = ImageTextDataset(dirs, weights, "validation", icfg, tokenizer, n_valid) if n_valid else None
        except ValueError as e:
            raise ConfigError(f"data.image_path: {e}") from None
        text, valid = None, {}
        if k < mb:
            if not d.data_path:
                raise ConfigError(f"data.image_fraction={d.image_fraction} leaves {mb - k} text row(s) per "
                                  "micro-batch but data.data_path is empty (image_fraction=1.0 trains on images only)")
            n_text = n_train // mb * (mb - k)
            text, valid_ds, _ = build_text(cfg, tokenizer, [n_text, n_valid, 0])
            valid = valid_sets(valid_ds)
        if valid_images is not None:
            valid["valid_image"] = valid_images
        if dist.get_rank() == 0:
            print(f"data: {k} image-text row(s) + {mb - k} text row(s) per micro-batch (data.image_fraction="
                  f"{d.image_fraction} -> {k / mb:.3f}); image sources {', '.join(os.path.basename(x) for x in dirs)}")
        return MixedRows(images, text, mb, k), valid
