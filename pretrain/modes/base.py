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
