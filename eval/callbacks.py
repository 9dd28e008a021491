"""Training callbacks that score with eval's scorer (they live above the trainer, which never imports eval):
python -m pretrain.train installs them (`for_config`).

- `DownstreamScoring` (`logging.downstream_tasks`): in-loop zero/few-shot accuracy (eval/downstream.py).
- `FinetuneBest` (finetuning runs; the finetune mode requires it): validation accuracy of each task with the run's
  placement and `finetune.eval_shots`; a new best mean accuracy is saved at once and linked as `checkpoints/best`
  (`best.json` holds its step and scores). Its best score so far is part of the checkpoint, so a resumed run keeps
  comparing against it.
"""
from __future__ import annotations

import numpy as np
import torch.distributed as dist

from pretrain.callbacks import Callback


def shard_items(trainer) -> bool:
    """Items are split over data-parallel ranks except under ZeRO-3 (eval/downstream.py)."""
    return trainer.engine.zero_optimization_stage() != 3


class DownstreamScoring(Callback):
    name = "downstream"

    def on_train_start(self, trainer) -> None:
        from eval.downstream import Downstream

        self.scorer = Downstream(trainer.cfg, trainer.engine.module, trainer.tokenizer)

    def on_evaluate(self, trainer) -> bool:
        trainer.reporter.downstream(trainer.state.step, self.scorer.run(trainer.engine.module, shard_items(trainer)))
        return False


class FinetuneBest(Callback):
    name = "finetune_best"

    def __init__(self):
        self.best_metric, self.best_step, self.scores, self.pending = float("-inf"), -1, {}, False

    def on_train_start(self, trainer) -> None:
        from eval.downstream import Downstream
        from pretrain.modes.finetune import resolved

        f = trainer.cfg.finetune
        placement = resolved(trainer.cfg)[1]
        self.scorer = Downstream.for_tasks(trainer.cfg, trainer.tokenizer, f.tasks, f.data_dir, "validation",
                                           f.eval_items, [f.eval_shots], [placement])

    def scores_now(self, model, shard: bool) -> dict:
        out = {}
        for key, v in self.scorer.run(model, shard).items():  # down/<task>/<placement>/<k>shot/<metric>
            _, task, _, _, metric = key.split("/")
            out[f"ft/{task}/{metric}"] = v
        accs = [v for k, v in out.items() if k.endswith(("/acc", "/exact_match"))]  # generative: exact match
        out["ft/mean_acc"] = float(np.mean(accs)) if accs else float("nan")
        return out

    def on_evaluate(self, trainer) -> bool:
        scores = self.scores_now(trainer.engine.module, shard_items(trainer))
        trainer.reporter.finetune(trainer.state.step, scores)
        value = scores["ft/mean_acc"]
        if not value > self.best_metric:
            return False
        self.best_metric, self.best_step, self.scores, self.pending = value, trainer.state.step, scores, True
        return True

    def on_save_end(self, trainer, tag: str) -> None:
        if not self.pending:
            return
        from pretrain.checkpoint import mark_best

        self.pending = False
        if dist.get_rank() == 0:
            mark_best(trainer.ckpt_dir, tag, trainer.state.step, self.scores)
        trainer.reporter.log(f"step {trainer.state.step}: best validation accuracy so far ({self.best_metric:.4f}) "
                             "-> checkpoints/best")

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_metric = float(state.get("best_metric", float("-inf")))
        self.best_step = int(state.get("best_step", -1))


def for_config(cfg) -> list[Callback]:
    out: list[Callback] = []
    if cfg.logging.downstream_tasks:
        out.append(DownstreamScoring())
    if cfg.finetune.tasks:
        out.append(FinetuneBest())
    return out
