"""Data modes of the trainer: what a run trains on, behind one seam (`Mode`, pretrain/modes/base.py).

    text        semi-causal (MetaLM) or causal (GPT) language modelling on indexed datasets   (text.py)
    vl          image-text rows mixed with text rows, for a model with a vision encoder       (vl.py)
    finetune    rows built from registry tasks, with the paper's finetuning types             (finetune.py)

`pick_mode(cfg)` is the one place that decides: `finetune.tasks` set -> finetune; `data.image_path` set -> vl;
else text. The trainer's loop (pretrain/trainer.py) never asks which mode it runs.
"""
from __future__ import annotations

from pretrain.modes.base import Mode


def pick_mode(cfg) -> Mode:
    if cfg.finetune.tasks:
        from pretrain.modes.finetune import FinetuneMode

        return FinetuneMode()
    if cfg.data.image_path:
        from pretrain.modes.vl import VisionLanguageMode

        return VisionLanguageMode(cfg)
    from pretrain.modes.text import TextMode

    return TextMode(cfg)
