"""Checkpoints: DeepSpeed's files plus the trainer's extra state, completeness markers, an atomic `latest`,
keep-last-K, and `--resume auto`.

Layout of `RUN/checkpoints/`:
    step_00000100/                 DeepSpeed's save_checkpoint(tag) files (model states, ZeRO shards)
    step_00000100/extra/rank_R.pt  per rank: RNG states (torch, numpy, python), consumed samples, counters
    step_00000100/config.yaml      the resolved training config
    step_00000100/COMPLETE         written last, by rank 0, after every rank finished writing
    latest                         the newest complete tag (written to a temporary file, then renamed)
A tag directory without COMPLETE (a save cut off by a crash or kill -9) is never resumed from: `find_resume`
warns about it and takes the newest complete one.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def code_version() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: str, step: int, extra: dict, config_yaml: str, keep_last: int, log=print) -> str:
    """Save on all ranks; returns the tag. Collective: every rank must call it."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step}, save_latest=False)
    tag_dir = os.path.join(ckpt_dir, tag)
    os.makedirs(os.path.join(tag_dir, "extra"), exist_ok=True)
    path = os.path.join(tag_dir, "extra", f"rank_{rank}.pt")
    torch.save({**extra, "rng": rng_state()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tag_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)
        with open(os.path.join(tag_dir, COMPLETE), "w") as f:
            f.write(f"step {step}\nworld_size {dist.get_world_size()}\ncode {code_version()}\n")
        with open(os.path.join(ckpt_dir, "latest.tmp"), "w") as f:
            f.write(tag)
        os.replace(os.path.join(ckpt_dir, "latest.tmp"), os.path.join(ckpt_dir, "latest"))
        prune(ckpt_dir, keep_last)
        log(f"saved checkpoint {tag_dir}")
    dist.barrier()
    return tag


def complete_tags(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir)
                  if t.startswith("step_") and os.path.isfile(os.path.join(ckpt_dir, t, COMPLETE)))


def prune(ckpt_dir: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for tag in complete_tags(ckpt_dir)[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def find_resume(ckpt_dir: str, resume: str, log=print) -> str | None:
    """The tag directory to resume from: `auto` = newest complete checkpoint (None if none), `none` = None, or a
    given tag directory (which must be complete)."""
    if resume == "none":
        return None
    if resume != "auto":
        if not os.path.isfile(os.path.join(resume, COMPLETE)):
            raise FileNotFoundError(f"checkpoint.resume: {resume} is not a complete checkpoint (no {COMPLETE})")
        return os.path.abspath(resume)
    if not os.path.isdir(ckpt_dir):
        return None
    complete = complete_tags(ckpt_dir)
    newest = complete[-1] if complete else None
    for t in sorted(os.listdir(ckpt_dir)):
        if t.startswith("step_") and t not in complete and (newest is None or t > newest):
            log(f"warning: skipping incomplete checkpoint {os.path.join(ckpt_dir, t)} (no {COMPLETE} marker)",
                file=sys.stderr)
    return os.path.join(ckpt_dir, newest) if newest else None


def load(engine, tag_dir: str) -> dict:
    """Load DeepSpeed's state and this rank's extra state (RNG restored); returns the extra dict."""
    ckpt_dir, tag = os.path.split(tag_dir.rstrip("/"))
    load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rank = dist.get_rank()
    path = os.path.join(tag_dir, "extra", f"rank_{rank}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tag_dir}: no extra state for rank {rank} (saved with another world size?)")
    extra = torch.load(path, weights_only=False)
    set_rng_state(extra.pop("rng"))
    return extra
