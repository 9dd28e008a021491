"""Faults the tests install as a training callback (the trainer has no test hooks of its own):

    callbacks=[{path: tests.fault_injection.FaultInjection, die_at_step: 6, die_rank: 1}]

- `die_at_step` / `die_rank`: SIGKILL that rank just before that step (a rank dying mid-run); the time of death is
  written to RUN/fault_injection.died_at.
- `nan_at_steps` / `nan_count`: on rank 0, the first `nan_count` micro-batch losses of the listed steps become NaN
  (wrapping the engine's forward; not under pipeline parallelism, whose schedule calls its own).
- `slow_save_s`: every checkpoint save first sleeps this long (a save that outlives the preemption grace).
"""
from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist

from pretrain.callbacks import Callback


class FaultInjection(Callback):
    name = "fault_injection"

    def __init__(self, die_at_step: int = 0, die_rank: int = 0, nan_at_steps=(), nan_count: int = 1,
                 slow_save_s: float = 0.0):
        self.die_at_step, self.die_rank = die_at_step, die_rank
        self.nan_at_steps, self.nan_count, self.slow_save_s = list(nan_at_steps), nan_count, slow_save_s
        self.poison = 0

    def on_train_start(self, trainer) -> None:
        if not self.nan_at_steps:
            return
        engine, forward = trainer.engine, trainer.engine.forward

        def poisoned(*args, **kwargs):
            loss = forward(*args, **kwargs)
            if self.poison > 0 and dist.get_rank() == 0:
                loss = loss * float("nan")
            self.poison -= 1
            return loss

        engine.forward = poisoned

    def on_step_start(self, trainer) -> None:
        step = trainer.state.step + 1
        if self.die_at_step == step and dist.get_rank() == self.die_rank:
            with open(os.path.join(trainer.cfg.run_dir, "fault_injection.died_at"), "w") as f:
                f.write(repr(time.time()))  # when, for the test that times how fast the job ends
            os.kill(os.getpid(), signal.SIGKILL)
        self.poison = self.nan_count if step in self.nan_at_steps else 0

    def on_save_start(self, trainer) -> None:
        if self.slow_save_s:
            time.sleep(float(self.slow_save_s))
