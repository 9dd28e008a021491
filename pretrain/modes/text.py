"""Text mode: semi-causal (MetaLM, `data.mode=sclm`) or causal (GPT, `gpt`) language modelling on Megatron-format
indexed datasets (data_tools/datasets.py). Validation: `valid` is always the plain causal-LM view (no spans, every
target counted), so perplexities of a MetaLM and its GPT baseline compare; a semi-causal run also reports its own
objective on the same samples as `valid_sclm`."""
from __future__ import annotations

import dataclasses
import sys

import torch.distributed as dist

from pretrain.config import ConfigError
from pretrain.modes.base import Mode, train_rows, valid_rows


def data_mode(cfg) -> str:
    if cfg.data.mode == "auto":
        return "sclm" if cfg.model.encoder is not None else "gpt"
    if cfg.data.mode not in ("sclm", "gpt"):
        raise ConfigError(f"data.mode: expected auto, sclm or gpt, got {cfg.data.mode!r}")
    return cfg.data.mode


def build_text(cfg, tokenizer, num_samples):
    """[train, valid, test] text datasets of the run: its `data.*` section, its seed, its resolved data mode."""
    from data_tools.datasets import build_datasets

    return build_datasets(cfg.data, tokenizer, num_samples, seed=cfg.seed, mode=data_mode(cfg),
                          aligner=encoder_aligner(cfg, tokenizer))


def encoder_aligner(cfg, tokenizer):
    """Re-tokenization for a text encoder with its own tokenizer (an imported BERT-family one), else None."""
    from data_tools.cli import UserError
    from data_tools.encoder_tokens import aligner_for

    try:
        return aligner_for(cfg.model.encoder, tokenizer)
    except UserError as e:
        raise ConfigError(f"model.encoder.tokenizer: {e}") from None


def valid_sets(valid_ds) -> dict:
    """Validation sets by metric prefix (see the module docstring)."""
    from data_tools.datasets import SemiCausalDataset

    if valid_ds is None:
        return {}
    sets = {"valid": SemiCausalDataset(valid_ds.gpt, dataclasses.replace(valid_ds.cfg, mode="gpt"))}
    if valid_ds.cfg.mode == "sclm":
        sets["valid_sclm"] = valid_ds
    return sets


def check_text_data(cfg) -> None:
    """Text rows: a dataset to read (and its files there), a text encoder for the semi-causal objective."""
    from data_tools.cli import UserError, check_dataset_prefix
    from data_tools.datasets import parse_blend

    if not cfg.data.data_path:
        raise ConfigError("data.data_path: required (a dataset prefix, or weight/prefix pairs)")
    try:
        for prefix in parse_blend(cfg.data.data_path)[0]:
            check_dataset_prefix(prefix)
    except UserError as e:
        raise ConfigError(f"data.data_path: {e}") from None
    if data_mode(cfg) == "sclm" and cfg.model.encoder is None:
        raise ConfigError("data.mode=sclm needs model.encoder (a GPT baseline trains with data.mode=gpt)")


def warn_if_span_cap_binds(cfg) -> None:
    d = cfg.data
    if not (d.max_spans and data_mode(cfg) == "sclm" and dist.get_rank() == 0):
        return
    from data_tools.objective import SpanConfig, reached_coverage

    reached = reached_coverage(SpanConfig(d.span_length, d.span_coverage, d.max_spans), d.seq_length)
    if reached < 0.95 * reached_coverage(SpanConfig(d.span_length, d.span_coverage), d.seq_length):
        print(f"warning: data.max_spans={d.max_spans} binds: span coverage {reached:.3f} instead of about "
              f"{d.span_coverage} (seq_length {d.seq_length}, span_length {d.span_length}); 0 = no cap",
              file=sys.stderr)


class TextMode(Mode):
    def __init__(self, cfg):
        self.name = data_mode(cfg)

    def configure(self, cfg) -> None:
        """Continued pretraining (`checkpoint.model_from_init`): the model of checkpoint.init_from, with a text or
        vision encoder of the config's added where it has none (pretrain/modes/base.py model_from_init)."""
        if cfg.checkpoint.init_from and cfg.checkpoint.model_from_init:
            from pretrain.modes.base import model_from_init

            self.added = model_from_init(cfg, add_parts=True)
        self.name = data_mode(cfg)

    def check(self, cfg, pipeline: bool) -> None:
        if cfg.model.vision is not None:
            raise ConfigError("model.vision is set but data.image_path is empty: a vision-language model trains on "
                              "image-text data (python -m data_tools.images fetch ...)")
        check_text_data(cfg)

    def check_tokenizer(self, cfg, tokenizer) -> None:
        """After the run's tokenizer is resolved: the splits the run reads get documents."""
        from data_tools.cli import UserError
        from data_tools.datasets import check_splits

        try:
            check_splits(cfg.data, need_valid=cfg.logging.eval_interval > 0 and cfg.logging.eval_iters > 0)
        except UserError as e:
            raise ConfigError(f"data.split: {e}") from None

    def build_data(self, cfg, tokenizer, dp: int):
        warn_if_span_cap_binds(cfg)
        train_ds, valid_ds, _ = build_text(cfg, tokenizer, [train_rows(cfg, dp), valid_rows(cfg, dp), 0])
        return train_ds, valid_sets(valid_ds)

    def prepare_model(self, cfg, model, train_ds, tokenizer) -> str:
        return alignment_line(train_ds)


def alignment_line(ds, n: int = 64) -> str:
    """For an encoder with its own tokenizer: what re-tokenizing the spans of the first n samples gave."""
    aligner = getattr(ds, "aligner", None)
    if aligner is None or len(ds) == 0:
        return ""
    from data_tools.encoder_tokens import AlignStats

    aligner.stats = AlignStats()
    for i in range(min(n, len(ds))):
        ds[i]
    st = aligner.stats
    return (f"text encoder tokenizer {aligner.encoder_tok.file}: first {min(n, len(ds))} samples: {st.spans} spans "
            f"encoded ({st.slots} decoder slots -> {st.encoder_tokens} encoder tokens, {st.unk_slots} slots on the "
            f"unknown token); back to causal: {st.dropped_empty} empty, {st.dropped_long} too long, "
            f"{st.dropped_row_full} past the encoder row ({ds.cfg.encoder_row} positions)")
