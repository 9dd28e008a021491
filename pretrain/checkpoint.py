"""Checkpoints: DeepSpeed's files plus the trainer's extra state, completeness markers, an atomic `latest`,
keep-last-K, and `--resume auto`.

Layout of `RUN/checkpoints/`:
    step_00000100/                 DeepSpeed's save_checkpoint(tag) files (model states, ZeRO shards)
    step_00000100/extra/rank_R.pt  per rank: RNG states (torch, numpy, python), consumed samples, counters
    step_00000100/config.yaml      the resolved training config
    step_00000100/COMPLETE         written last, by rank 0, after every rank finished writing: JSON with the step,
                                   world size, code version and a manifest (every file's size)
    latest                         the newest complete tag (written to a temporary file, then renamed)
A tag directory without COMPLETE (a save cut off by a crash or kill -9) is never resumed from: `find_resume`
warns about it and takes the newest complete one; so is one whose files do not match its manifest (a marker that
reached the disk before its data: a power loss on a file system that reorders writes).

Durability (data_tools/durable.py): DeepSpeed writes its files without fsync, so after every rank has written,
the first process of each node fsyncs every file of the tag directory (the node's own writes are what its page
cache holds; on a shared file system every writer node flushes its own) and the directories; only then does rank 0
write config.yaml, the COMPLETE marker and `latest`, each fsynced, renamed into place, its directory fsynced.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import torch
import torch.distributed as dist

from data_tools.durable import fsync_file, fsync_tree, write_durable

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


def save(engine, ckpt_dir: str, step: int, extra: dict, config_yaml: str, keep_last: int, log=print,
         checksums: bool = True) -> str:
    """Save on all ranks; returns the tag. Collective: every rank must call it."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step}, save_latest=False)
    tag_dir = os.path.join(ckpt_dir, tag)
    os.makedirs(os.path.join(tag_dir, "extra"), exist_ok=True)
    path = os.path.join(tag_dir, "extra", f"rank_{rank}.pt")
    torch.save({**extra, "rng": rng_state()}, path + ".tmp")
    fsync_file(path + ".tmp")
    os.replace(path + ".tmp", path)
    dist.barrier()  # every rank has written its files
    if int(os.environ.get("LOCAL_RANK", rank)) == 0:
        fsync_tree(tag_dir)
    dist.barrier()  # ... and every node has flushed them
    if rank == 0:
        write_durable(os.path.join(tag_dir, "config.yaml"), config_yaml)
        marker = {"step": step, "world_size": dist.get_world_size(), "code": code_version(),
                  "files": manifest(tag_dir, checksums)}
        write_durable(os.path.join(tag_dir, COMPLETE), json.dumps(marker, indent=1))
        write_durable(os.path.join(ckpt_dir, "latest"), tag)
        prune(ckpt_dir, keep_last)
        log(f"saved checkpoint {tag_dir}")
    dist.barrier()
    return tag


def crc32(path: str) -> int:
    import zlib

    c = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            c = zlib.crc32(block, c)
    return c


def manifest(tag_dir: str, checksums: bool = True) -> dict[str, dict]:
    """Every file of a checkpoint: relative path -> {bytes, crc32 (when checksums)}, except the COMPLETE marker and
    config.yaml (a human-editable copy of the config: editing it must not make the checkpoint look damaged).
    Checksums re-read the checkpoint once (just written: mostly from the page cache); `checkpoint.checksums=false`
    keeps sizes only."""
    out = {}
    for dirpath, _, files in os.walk(tag_dir):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, tag_dir)
            if rel not in (COMPLETE, "config.yaml") and ".tmp" not in name:
                out[rel] = {"bytes": os.path.getsize(path), **({"crc32": crc32(path)} if checksums else {})}
    return dict(sorted(out.items()))


def damage(tag_dir: str, checksums: bool = False) -> str | None:
    """Why a checkpoint with a COMPLETE marker cannot be trusted (None: it matches its manifest): a file missing,
    of another size, or (checksums=True) with other contents. Markers without a manifest are accepted as they are."""
    for rel, want in marker(tag_dir).get("files", {}).items():
        want = want if isinstance(want, dict) else {"bytes": want}
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != want["bytes"]:
            return f"{rel} has {os.path.getsize(path)} bytes, the manifest says {want['bytes']}"
        if checksums and "crc32" in want and crc32(path) != want["crc32"]:
            return f"{rel} does not match its checksum (overwritten or corrupted)"
    return None


def marker(tag_dir: str) -> dict:
    """The COMPLETE marker's content (JSON since manifests; older markers are `key value` lines)."""
    text = open(os.path.join(tag_dir, COMPLETE)).read()
    try:
        return json.loads(text)
    except ValueError:
        return {k: v for k, _, v in (line.partition(" ") for line in text.splitlines() if line)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def layout_mismatch(tag_dir: str, cfg_dict: dict, world: int) -> str | None:
    """Why this run cannot resume from tag_dir as it is (another model shape, TP/PP layout, world size or
    DeepSpeed config): the differing fields, one line; None when they agree."""
    import yaml

    saved_path = os.path.join(tag_dir, "config.yaml")
    if not os.path.isfile(saved_path):
        return None
    saved = yaml.safe_load(open(saved_path))
    free = {"model.attention_backend", "model.activation_checkpointing", "model.document_mask", "model.init_std",
            "model.max_seq_length"}  # change freely on resume: no parameter or optimizer state depends on them
    keys = [k for k in _flat(cfg_dict.get("model", {}), "model.") if k not in free] + \
        ["parallel.tp", "parallel.pp", "parallel.deepspeed", "parallel.pipeline_engine"]
    mine, theirs = _flat(cfg_dict), _flat(saved)
    diff = [f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in keys if k in theirs and theirs.get(k) != mine.get(k)]
    saved_world = marker(tag_dir).get("world_size")
    if saved_world is not None and int(saved_world) != world:
        diff.append(f"world size: {saved_world} -> {world}")
    if not diff:
        return None
    return (f"{tag_dir} was written by another model or layout ({'; '.join(diff[:6])}"
            f"{'; ...' if len(diff) > 6 else ''}); to continue it elsewhere: python -m pretrain.convert reshard "
            f"--checkpoint {tag_dir} --out DIR, then checkpoint.init_from=DIR (or use another run_dir)")


def complete_tags(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir)
                  if t.startswith("step_") and os.path.isfile(os.path.join(ckpt_dir, t, COMPLETE)))


def prune(ckpt_dir: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    best = best_tag(ckpt_dir)  # the best finetuning checkpoint is kept whatever its age
    for tag in complete_tags(ckpt_dir)[:-keep_last]:
        if tag != best:
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)


def mark_best(ckpt_dir: str, tag: str, step: int, scores: dict) -> None:
    """RUN/checkpoints/best -> the tag (a symlink, replaced atomically) and best.json (step, scores)."""
    from data_tools.durable import write_durable

    write_durable(os.path.join(ckpt_dir, "best.json"),
                  json.dumps({"tag": tag, "step": step, **scores}, indent=2) + "\n")
    tmp = os.path.join(ckpt_dir, f".best.tmp-{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(tag, tmp)
    os.replace(tmp, os.path.join(ckpt_dir, "best"))


def best_tag(ckpt_dir: str) -> str | None:
    p = os.path.join(ckpt_dir, "best.json")
    if not os.path.isfile(p):
        return None
    try:
        return json.load(open(p)).get("tag")
    except ValueError:
        return None


def find_resume(ckpt_dir: str, resume: str, log=print, checksums: bool = False) -> str | None:
    """The tag directory to resume from: `auto` = newest complete checkpoint (None if none), `none` = None, or a
    given tag directory (which must be complete)."""
    if resume == "none":
        return None
    if resume != "auto":
        if not os.path.isfile(os.path.join(resume, COMPLETE)):
            raise FileNotFoundError(f"checkpoint.resume: {resume} is not a complete checkpoint (no {COMPLETE})")
        if why := damage(resume, checksums):
            raise FileNotFoundError(f"checkpoint.resume: {resume} is damaged: {why}")
        return os.path.abspath(resume)
    if not os.path.isdir(ckpt_dir):
        return None
    complete = complete_tags(ckpt_dir)
    while complete and (why := damage(os.path.join(ckpt_dir, complete[-1]), checksums)):
        log(f"warning: skipping damaged checkpoint {os.path.join(ckpt_dir, complete[-1])}: {why}", file=sys.stderr)
        complete.pop()
    newest = complete[-1] if complete else None
    for t in sorted(os.listdir(ckpt_dir)):
        if (t.startswith("step_") and not os.path.isfile(os.path.join(ckpt_dir, t, COMPLETE))
                and (newest is None or t > newest)):
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
