"""The training loop: set-up once, then steps, with everything else hung off hooks (pretrain/callbacks.py) and
what the run trains on behind one seam (pretrain/modes/).

`Trainer(cfg, callbacks).fit()` reads top to bottom. A checkpoint is saved every `checkpoint.save_interval` steps,
at the end, when a callback asks (finetuning's new best), and on SIGTERM/SIGINT (then the run exits 0); the one
`evaluate_and_save` path serves all of them. A watchdog thread (pretrain/watchdog.py) ends a rank whose step, save
or evaluation outlives `parallel.step_timeout_s` (exit 4). Non-finite losses: pretrain/steps.py.
"""
from __future__ import annotations

import os
import sys
import time

import torch.distributed as dist

from pretrain.callbacks import StepLog, ValidationLoss, from_specs
from pretrain.checks import (absolute_paths, check_config, configure_model, resolve_tokenizer, uses_pipeline,
                             vocab_note)
from pretrain.config import ConfigError, TrainConfig, config_to_dict
from pretrain.steps import StopFlag, TrainingAborted, TrainState, train_step


def every(interval: int, step: int) -> bool:
    return bool(interval) and step % interval == 0


class Trainer:
    def __init__(self, cfg: TrainConfig, callbacks=()):
        """`callbacks`: added after the trainer's own (StepLog, ValidationLoss) and the mode's, before the config's
        `callbacks` list."""
        self.cfg, self.extra_callbacks = cfg, list(callbacks)
        self.last_eval: dict = {}
        self.evaluated_at = self.saved_at = -1

    # ------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Process groups, data, model, DeepSpeed engine, callbacks, and the training position (resume or
        init_from)."""
        from megatron.core import parallel_state

        from data_tools.datasets import MicroBatches
        from pretrain import checkpoint
        from pretrain.engine import build_engine
        from pretrain.metrics import Reporter
        from pretrain.modes import pick_mode
        from pretrain.parallel import init_distributed, init_model_parallel, seed_everything

        cfg = self.cfg
        init_distributed(timeout_s=cfg.parallel.timeout_s)
        world, rank = dist.get_world_size(), dist.get_rank()
        configure_model(cfg)
        self.mode = mode = pick_mode(cfg)
        mode.configure(cfg)
        check_config(cfg, world, mode)
        absolute_paths(cfg, mode)
        init_model_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.seed)
        seed_everything(cfg.seed)
        self.tokenizer = resolve_tokenizer(cfg)
        if hasattr(mode, "check_tokenizer"):
            mode.check_tokenizer(cfg, self.tokenizer)
        if rank == 0 and not os.environ.get("METALM_LAUNCHER_CHECKED") and (note := vocab_note(cfg, self.tokenizer)):
            print(note, file=sys.stderr)  # under pretrain.launch the launcher said it once
        self.dp = dp = parallel_state.get_data_parallel_world_size()
        self.train_ds, self.valid_sets = mode.build_data(cfg, self.tokenizer, dp)
        model = self.build_model()
        self.ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
        say = print if rank == 0 else (lambda *a, **k: None)
        # rank 0 picks the checkpoint (verifying its checksums: one read of it) and tells the others
        pick = [checkpoint.find_resume(self.ckpt_dir, cfg.checkpoint.resume, log=say,
                                       checksums=cfg.checkpoint.checksums) if rank == 0 else None]
        dist.broadcast_object_list(pick, src=0)
        resume_from = pick[0]
        if resume_from and (why := checkpoint.layout_mismatch(resume_from, config_to_dict(cfg), world)):
            raise ConfigError(f"checkpoint.resume: {why}")
        self.state = TrainState()
        if resume_from is None and cfg.checkpoint.init_from:
            self.state = self.init_weights(model) or self.state
            say(f"initialised from {cfg.checkpoint.init_from} at step {self.state.step}")
            for part in getattr(mode, "added", ()):
                say(f"{part}: from the config, fresh (the init model has none)")
        elif resume_from is None:  # pretrained parts named in the config (model.encoder / model.vision.from_hf)
            for part, sub in (("text encoder", cfg.model.encoder), ("vision encoder", cfg.model.vision)):
                if sub is not None and sub.from_hf:
                    self.init_weights(model, hf_part="vision" if sub is cfg.model.vision else "text")
                    say(f"{part} initialised from {sub.from_hf} ({sub.hf_model_type})")
        mode_msg = mode.prepare_model(cfg, model, self.train_ds, self.tokenizer)  # before the optimizer is built
        self.trainable = [sum(p.numel() for p in model.parameters() if p.requires_grad == t) for t in (True, False)]
        if cfg.parallel.compile:  # per block, where the engine is built (pretrain/compile.py)
            from pretrain.compile import compile_model
            from pretrain.engine import load_ds_json

            zero3 = load_ds_json(cfg.parallel.deepspeed).get("zero_optimization", {}).get("stage", 0) == 3
            n = compile_model(model, fullgraph=not zero3)
            say(f"compile: torch.compile on {n} blocks and connectors (inductor, static shapes"
                f"{'; ZeRO-3: a graph break at each submodule, where its parameter-gathering hooks run' if zero3 else ''}"
                "; the first steps include compilation)")
        self.engine = build_engine(cfg, model, dp, pipeline=uses_pipeline(cfg))
        self.device = self.engine.device
        if self.state.step:  # a resharded checkpoint: continue its LR schedule too
            self.engine.lr_scheduler.last_epoch = self.state.step - 1
            self.engine.lr_scheduler.step()
        self.callbacks = [StepLog(), ValidationLoss(), *mode.callbacks(cfg), *self.extra_callbacks,
                          *from_specs(cfg.callbacks)]
        have = {cb.name for cb in self.callbacks}
        if missing := [n for n in mode.required_callbacks if n not in have]:
            raise ConfigError(f"the {mode.name} mode needs the callback(s) {', '.join(missing)} (installed by "
                              "python -m pretrain.train from eval/callbacks.py)")
        if resume_from:
            extra = checkpoint.load(self.engine, resume_from)
            self.state = self.load_state(extra)
            say(f"resumed from {resume_from} at step {self.state.step} ({self.state.consumed_samples} samples "
                "consumed)")
        self.config_yaml = self.write_config()
        self.reporter = rep = Reporter(cfg.run_dir, cfg.schedule.train_steps, self.state.step,
                                       cfg.logging.log_interval, cfg.logging.tensorboard, cfg.logging.progress_bar,
                                       enabled=rank == 0)
        rep.log(self.describe(world, dp))
        if mode_msg:
            rep.log(mode_msg)
        # The global sample order is fixed; this rank reads its slice of each global micro-step.
        batches = iter(MicroBatches(self.train_ds, cfg.parallel.micro_batch, self.state.consumed_samples,
                                    parallel_state.get_data_parallel_rank(), dp, workers=cfg.data.workers))
        if uses_pipeline(cfg):
            from pretrain.pipeline import input_keys, pipeline_batches

            batches = pipeline_batches(batches, input_keys(cfg.model))
        self.batches = batches
        self.resumed_step = int(os.path.basename(resume_from)[len("step_"):]) if resume_from else -1

    def build_model(self):
        cfg = self.cfg
        if uses_pipeline(cfg):
            from pretrain.pipeline import build_pipeline_module

            return build_pipeline_module(cfg.model, cfg.parallel.pp, cfg.parallel.tp, self.dp, cfg.seed)
        from pretrain.model.metalm import MetaLM

        return MetaLM(cfg.model)

    def init_weights(self, model, hf_part: str = "") -> TrainState | None:
        """Load a consolidated directory (or, `hf_part` text | vision, the encoder of `model.encoder.from_hf` /
        `model.vision.from_hf` alone) into this rank's (TP-sliced, pipeline-stage) model; returns the training
        position when the directory came from `pretrain.convert reshard`."""
        from megatron.core import parallel_state

        from pretrain.hf_encoders import hf_encoder_weights
        from pretrain.hf_vision import hf_tower_weights
        from pretrain.model_io import ConvertError, load_into, read_model

        cfg = self.cfg
        where = {"text": "model.encoder.from_hf", "vision": "model.vision.from_hf"}.get(hf_part,
                                                                                      "checkpoint.init_from")
        try:
            if hf_part:
                weights = hf_encoder_weights if hf_part == "text" else hf_tower_weights
                src_cfg, sd, info = None, weights(cfg.model), {}
            else:
                src_cfg, sd, info = read_model(cfg.checkpoint.init_from)
            # parts the init model lacks (model_from_init added them from the config) keep their fresh values
            added = bool(getattr(self.mode, "added", ())) and not hf_part
            load_into(model, sd, parallel_state.get_tensor_model_parallel_rank(), cfg.parallel.tp,
                      pipeline_layers=cfg.model.decoder.layers if uses_pipeline(cfg) else 0,
                      partial=bool(hf_part) or added)
        except ConvertError as e:  # not there, damaged, another architecture: one line, exit 2
            raise ConfigError(f"{where}: {e}") from None
        if not (info.get("resume_position") and "step" in info):
            return None
        p, q = cfg.parallel, src_cfg.parallel
        new_gb = p.micro_batch * p.grad_accum * dist.get_world_size() // (p.tp * p.pp)
        old_gb = (q.micro_batch * q.grad_accum * int(info["world_size"]) // (q.tp * q.pp)
                  if info.get("world_size") else None)
        if old_gb is not None and old_gb != new_gb and dist.get_rank() == 0:
            print(f"warning: the global batch changes from {old_gb} to {new_gb} samples at step {info['step']}: the "
                  f"data continues after sample {info['consumed_samples']}, the LR schedule by steps (so each step "
                  "now sees a different number of samples)", file=sys.stderr)
        return TrainState(step=int(info["step"]), consumed_samples=int(info["consumed_samples"]),
                          skipped=int(info.get("skipped", 0)))

    def load_state(self, extra: dict) -> TrainState:
        """The loop's position and each callback's state from a checkpoint's extra state (older checkpoints kept
        finetuning's best score among the loop's fields)."""
        state = dict(extra["state"])
        legacy = {k: state.pop(k) for k in ("best_metric", "best_step") if k in state}
        saved = extra.get("callbacks", {"finetune_best": legacy} if legacy else {})
        for cb in self.callbacks:
            if cb.name in saved:
                cb.load_state_dict(saved[cb.name])
        return TrainState(**state)

    def write_config(self) -> str:
        import yaml

        text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        if dist.get_rank() == 0:
            os.makedirs(self.cfg.run_dir, exist_ok=True)
            with open(os.path.join(self.cfg.run_dir, "config.yaml"), "w") as f:
                f.write(text)
        return text

    def describe(self, world: int, dp: int) -> str:
        cfg = self.cfg
        counts = cfg.model.param_count()
        v = cfg.model.vision
        frozen = (f" ({counts['vision'] / 1e6:.2f}M in the frozen vision encoder: no gradients, no optimizer state)"
                  if v is not None and cfg.model.freeze_vision else
                  f" (vision encoder: the top {v.trainable_top_layers} of {v.blocks_run} blocks run train)"
                  if v is not None and v.trainable_top_layers >= 0 else "")
        shard = " per TP rank" if cfg.parallel.tp > 1 or cfg.parallel.pp > 1 else ""
        split = f" ({self.trainable[0] / 1e6:.2f}M trainable, {self.trainable[1] / 1e6:.2f}M frozen{shard})"
        return (f"model: {counts['total'] / 1e6:.1f}M parameters{split}{frozen} | world {world} (dp {dp}, "
                f"tp {cfg.parallel.tp}, pp {cfg.parallel.pp}) | {cfg.parallel.deepspeed} | {cfg.parallel.precision} | "
                f"data mode {self.mode.name} | train samples {len(self.train_ds):,} | global batch "
                f"{cfg.parallel.micro_batch * cfg.parallel.grad_accum * dp} x {cfg.data.seq_length} tokens")

    # ------------------------------------------------------------ the loop
    def fire(self, hook: str, *args) -> list:
        return [getattr(cb, hook)(self, *args) for cb in self.callbacks]

    def step(self) -> dict:
        """One optimizer step and what it knows about itself."""
        state, engine = self.state, self.engine
        t0 = time.perf_counter()
        skipped_before = state.skipped
        m = train_step(self.cfg, engine, self.batches, state, self.device)
        dt = time.perf_counter() - t0
        if state.skipped > skipped_before:
            self.reporter.log(f"step {state.step}: {state.skipped - skipped_before} micro-batch(es) with a "
                              f"non-finite loss skipped ({state.skipped} so far)")
        gn = engine.get_global_grad_norm()
        m.update(lr=engine.get_lr()[0], grad_norm=float(gn) if gn is not None else float("nan"), step_s=dt,
                 skipped=state.skipped, consumed_samples=state.consumed_samples)
        return m

    def save(self) -> None:
        from pretrain import checkpoint

        self.watchdog.enter("checkpoint save", self.state.step)
        self.fire("on_save_start")
        cb_state = {cb.name: s for cb in self.callbacks if (s := cb.state_dict())}
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.state.step,
                                  {"state": vars(self.state).copy(), "callbacks": cb_state}, self.config_yaml,
                                  self.cfg.checkpoint.keep_last, log=self.reporter.log,
                                  checksums=self.cfg.checkpoint.checksums)
        self.saved_at = self.state.step
        self.fire("on_save_end", tag)

    def evaluate_and_save(self, evaluate: bool, save: bool) -> None:
        """The one path for the interval, the end of the run and a stop request: evaluate (once per step), then
        save (once per step) when asked or when an evaluation callback asks (a new best)."""
        step = self.state.step
        if evaluate and self.evaluated_at != step:
            self.watchdog.enter("evaluation", step)
            save = any(self.fire("on_evaluate")) or save
            self.evaluated_at = step
        if save and self.saved_at != step and step > self.resumed_step:
            self.save()

    def fit(self) -> dict:
        """Train to `schedule.train_steps`; returns the last metrics (and the engine and tokenizer)."""
        from pretrain.watchdog import Watchdog

        self.setup()
        cfg, state, rep = self.cfg, self.state, self.reporter
        total, stop = cfg.schedule.train_steps, StopFlag()
        self.watchdog = wd = Watchdog(cfg.run_dir, dist.get_rank(), dist.get_world_size(),
                                      cfg.parallel.step_timeout_s, cfg.parallel.step_timeout_floor_s)
        last: dict = {}
        try:
            self.fire("on_train_start")
            while state.step < total:
                wd.enter("train step", state.step + 1)
                self.fire("on_step_start")
                last = self.step()
                wd.step_done(last["step_s"])
                self.fire("on_step_end", last)
                final = state.step == total
                self.evaluate_and_save(every(cfg.logging.eval_interval, state.step) or final,
                                       every(cfg.checkpoint.save_interval, state.step) or final)
                wd.enter("stop check", state.step)
                if stop.agreed():
                    rep.log(f"stop requested: saving at step {state.step} and exiting")
                    self.evaluate_and_save(evaluate=False, save=True)
                    rep.close()
                    return {"stopped": True, **last}
            self.evaluate_and_save(evaluate=True, save=True)  # a run resumed at its end: its final evaluation
            self.fire("on_train_end")
        except TrainingAborted as e:
            rep.log(f"error: {e}")
            rep.close()
            raise
        finally:
            wd.close()
        rep.close()
        return {**last, **self.last_eval, "engine": self.engine, "tokenizer": self.tokenizer}


def train(cfg: TrainConfig, callbacks=()) -> dict:
    return Trainer(cfg, callbacks).fit()
