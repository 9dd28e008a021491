"""Pretrain a MetaLM (or its GPT baseline), or finetune one, under DeepSpeed.

    python -m pretrain.train --config configs/tiny-cpu.yaml [dotted.key=value ...]
    python -m pretrain.launch --nproc-per-node 2 -- --config configs/tiny-cpu.yaml parallel.deepspeed=zero2

The command line of the trainer: it loads the config, installs the callbacks that score with eval/ (in-loop
downstream accuracy, finetuning's best checkpoint: eval/callbacks.py) and runs `pretrain.trainer.Trainer`. The loop
and its hooks: pretrain/trainer.py, pretrain/callbacks.py; what a run trains on: pretrain/modes/; the step and
non-finite losses: pretrain/steps.py. A checkpoint is saved every `checkpoint.save_interval` steps, at the end, and
on SIGTERM/SIGINT (then the run exits 0). Exit statuses (pretrain/exits.py): 2 bad config or input, 3 training
stopped (non-finite losses, a failed write; the last good checkpoint kept), 4 watchdog.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

import torch
import torch.distributed as dist

from pretrain.config import ConfigError, load_config
from pretrain.exits import EXIT_BAD_INPUT, EXIT_STOPPED, report_exit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file, or the name of a shipped one (tiny-cpu: configs/tiny-cpu.yaml)")
    p.add_argument("--generate", default="", help="after training, print a greedy continuation of this prompt")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed runner; LOCAL_RANK in the environment is used
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. model.decoder.layers=8")
    return p


def train(cfg) -> dict:
    """The trainer with the callbacks eval/ supplies for this config."""
    from eval.callbacks import for_config
    from pretrain.trainer import Trainer

    return Trainer(cfg, for_config(cfg)).fit()


def main(argv: Sequence[str] | None = None) -> int:
    return report_exit(_main(argv))


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging

    from data_tools.cli import UserError
    from pretrain.checks import uses_pipeline
    from pretrain.steps import TrainingAborted

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg)
    except (ConfigError, FileNotFoundError, UserError) as e:  # UserError: the data tools' (bad dataset path, ...)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingAborted:
        return EXIT_STOPPED
    except OSError as e:  # a checkpoint or log write that failed: disk full, read-only, permissions
        print(f"error: {e.strerror or e} while writing {e.filename or 'a file'}; the last complete checkpoint is "
              "kept", file=sys.stderr)
        return EXIT_STOPPED
    if args.generate and uses_pipeline(cfg) and dist.get_rank() == 0:
        print("--generate skipped: not available under pipeline parallelism (the stages hold different layers); "
              "generate from the checkpoint with python -m eval.generate --model RUN_DIR", file=sys.stderr)
    if args.generate and "engine" in result and not uses_pipeline(cfg):
        from eval.generate import generate

        text = generate(result["engine"].module, result["tokenizer"], args.generate,
                        max_new_tokens=40, max_seq_length=cfg.model.max_seq_length)
        if dist.get_rank() == 0:
            print(f"\nprompt: {args.generate!r}\ncontinuation: {text!r}")
    result.clear()  # the engine: its async communication handles go now, while the process groups still exist
    shut_down_distributed()
    return 0


def shut_down_distributed() -> None:
    """Release what holds process groups (the engine, megatron-core's group registry), then destroy them, on every
    rank together."""
    if not dist.is_initialized():
        return
    import gc

    from megatron.core import parallel_state

    gc.collect()
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def cli() -> None:
    """The command (`python -m pretrain.train`, `metalm-train`): main(), then an exit that skips the interpreter's
    finalization. Why: a run that finished, saved and destroyed its process groups could still abort at exit
    (SIGABRT, "terminate called without an active exception", seen once in CI on a 2-rank gloo run): C++ objects
    that DeepSpeed or torch keep alive past `destroy_process_group` are destroyed while the interpreter is torn down
    (pytorch/pytorch#179291 describes the gloo case). The launcher would then report a finished run as failed. Every
    file this process writes is closed before main() returns; stdout/stderr and logging are flushed here."""
    import logging

    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    cli()
