"""The seam between the trainer and what it trains on.

A mode owns, for its kind of run: the config checks that need files (`check`), the settings it takes from elsewhere
before any check (`configure`), its paths (`absolute_paths`), the training rows and the validation sets
(`build_data`), which parameters train (`prepare_model`), and the callbacks it needs (`callbacks`, and by name
`required_callbacks` for the ones the layer above supplies: finetuning's validation accuracy is scored by eval/).
"""
from __future__ import annotations


class Mode:
    name = ""  # the start-up line's "data mode ..."
    required_callbacks: tuple[str, ...] = ()  # Callback.name values this mode cannot run without

    def configure(self, cfg) -> None:
        """Settings taken from elsewhere before any check (finetuning: the model of checkpoint.init_from)."""

    def check(self, cfg, pipeline: bool) -> None:
        """The mode's own checks (raise ConfigError naming the field)."""

    def absolute_paths(self, cfg) -> None:
        """The mode's own paths, made absolute."""

    def build_data(self, cfg, tokenizer, dp: int) -> tuple[object, dict]:
        """(training rows: a map-style dataset of the batch contract, {metric prefix: validation set})."""
        raise NotImplementedError

    def prepare_model(self, cfg, model, train_ds, tokenizer) -> str:
        """Called before the optimizer sees the parameters (freezing); returns a line for the log, or ''."""
        return ""

    def callbacks(self, cfg) -> list:
        """Callbacks of pretrain/callbacks.py this mode adds."""
        return []


def train_rows(cfg, dp: int) -> int:
    """Rows the run can consume: the schedule's plus room for skipped micro-batches (a non-finite loss consumes its
    micro-batch)."""
    global_batch = cfg.parallel.micro_batch * cfg.parallel.grad_accum * dp
    return (cfg.schedule.train_steps + cfg.max_bad_steps + 1) * global_batch


def valid_rows(cfg, dp: int) -> int:
    """Rows of each validation set: `logging.eval_iters` micro-batches per data-parallel rank (0: none)."""
    n_evals = cfg.schedule.train_steps // max(1, cfg.logging.eval_interval) + 2
    n_valid = cfg.logging.eval_iters * cfg.parallel.micro_batch * dp if cfg.logging.eval_iters else 0
    return n_valid if n_evals else 0


# model settings that belong to how this run executes, not to the weights: the config's stay
RUNTIME_MODEL_KEYS = ("attention_backend", "activation_checkpointing", "document_mask")


def model_from_init(cfg, add_parts: bool) -> list[str]:
    """cfg.model := the model of `checkpoint.init_from` (its config, no weights read), keeping RUNTIME_MODEL_KEYS;
    the tokenizer too when the config names none. `add_parts`: a text or vision encoder that the source lacks and
    the config has (a preset's) is kept from the config, to be freshly initialised around the loaded weights.
    Returns the parts so added."""
    from pretrain.config import ConfigError
    from pretrain.model_io import CONSOLIDATED, ConvertError, locate, source_config

    init = cfg.checkpoint.init_from
    try:
        src = source_config(init)
    except ConvertError as e:
        raise ConfigError(f"checkpoint.init_from: {e}") from None
    mine, new = cfg.model, src.model
    for k in RUNTIME_MODEL_KEYS:
        setattr(new, k, getattr(mine, k))
    added = []
    if add_parts and new.encoder is None and mine.encoder is not None:
        new.encoder, new.connector, new.freeze_encoder_layers = mine.encoder, mine.connector, mine.freeze_encoder_layers
        added.append("text encoder + connector")
    if add_parts and new.vision is None and mine.vision is not None:
        new.vision, new.vision_connector, new.resampler_queries, new.freeze_vision = (
            mine.vision, mine.vision_connector, mine.resampler_queries, mine.freeze_vision)
        added.append("vision encoder + connector")
    cfg.model = new
    cfg.model.__post_init__()
    cfg.model.from_init = init  # named by the checks whose limits come from it (not a config field: not saved)
    if not (cfg.data.tokenizer_model or cfg.data.vocab_file):
        if locate(init)[0] == CONSOLIDATED:  # a consolidated dir carries its tokenizer files
            from data_tools.tokenizer import load_from_dir, write_to_data_config

            write_to_data_config(load_from_dir(init), cfg.data)
        else:
            for k in ("tokenizer_model", "tokenizer_type", "vocab_file", "merge_file", "eod_id"):
                setattr(cfg.data, k, getattr(src.data, k, getattr(cfg.data, k)))
    return added
