"""Bit-for-bit parity of short training runs against numbers recorded before a refactor (torchtitan's rule: a
refactor changes no number).

`check(case, run_dir, inputs)` reads the run's per-step loss and grad norm (metrics.jsonl, written with repr so they
round-trip exactly) and a SHA-256 over every tensor of the final checkpoint's model states, and requires them to equal
`tests/fixtures/parity.json[case]`. With METALM_PARITY_RECORD=1 it records them instead (run the tests that call
it on the commit whose numbers are the reference, then commit the file).

The fixture also records what the numbers depend on besides our code: torch's version, the CPU kernel family
(`torch.backends.cpu.get_cpu_capability()`, which picks the vectorised kernels and so the rounding), and a digest of
the inputs (the tokenizer's pieces and scores, the dataset's tokens). Equal inputs on another CPU family or torch
cannot be compared bit for bit: that one check is skipped with the reason; different inputs fail.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

import pytest
import torch

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "parity.json")


def inputs_digest(tok_model: str = "", prefix: str = "", extra: tuple[str, ...] = ()) -> str:
    """What the runs read: the tokenizer's vocabulary (not its file, which records the training paths), the dataset's
    token files, and any further files (task splits, image metadata)."""
    h = hashlib.sha256()
    if tok_model:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tok_model))
        for i in range(sp.vocab_size()):
            h.update(f"{sp.id_to_piece(i)}\t{sp.get_score(i)!r}\n".encode())
    for path in ([f"{prefix}.bin", f"{prefix}.idx"] if prefix else []) + sorted(map(str, extra)):
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def tree(*dirs) -> tuple[str, ...]:
    """Every file under `dirs` (for inputs_digest's `extra`)."""
    return tuple(os.path.join(r, f) for d in dirs for r, _, fs in os.walk(str(d)) for f in fs)


def machine() -> dict:
    """What bit-for-bit numbers depend on: torch, its CPU kernels' level, and the CPU's feature flags (two hosts
    that both report AVX512 can still differ in the last bits of a gradient norm: seen on 2026-12-07)."""
    flags = ""
    if os.path.isfile("/proc/cpuinfo"):
        flags = next((l.split(":", 1)[1] for l in open("/proc/cpuinfo") if l.startswith("flags")), "")
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "cpu_flags": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12],
            "threads": torch.get_num_threads()}


def weights_digest(run_dir) -> str:
    ckpt = os.path.join(str(run_dir), "checkpoints")
    tag = open(os.path.join(ckpt, "latest")).read().strip()
    files = sorted(glob.glob(os.path.join(ckpt, tag, "*model_states.pt")))
    assert files, f"no model states in {ckpt}/{tag}"
    h = hashlib.sha256()
    for path in files:
        sd = torch.load(path, map_location="cpu", weights_only=False)
        sd = sd.get("module", sd)
        if not isinstance(sd, dict):  # a pipeline run's mp_rank file: its weights are in the layer files
            continue
        for name in sorted(k for k, v in sd.items() if isinstance(v, torch.Tensor)):
            t = sd[name].detach().contiguous().cpu()
            h.update(f"{os.path.basename(path)}:{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"{tag}:{h.hexdigest()}"


def observed(run_dir) -> dict:
    steps = {}
    for line in open(os.path.join(str(run_dir), "metrics.jsonl")):
        rec = json.loads(line)
        if "loss" in rec and "grad_norm" in rec:
            steps[str(rec["step"])] = [rec["loss"], rec["grad_norm"]]
    return {"steps": steps, "weights": weights_digest(run_dir)}


def _load() -> dict:
    return json.load(open(FIXTURE)) if os.path.isfile(FIXTURE) else {}


def check(case: str, run_dir, inputs: str) -> None:
    got = {**observed(run_dir), "inputs": inputs, "machine": machine()}
    if os.environ.get("METALM_PARITY_RECORD") == "1":
        data = _load()
        data[case] = got
        tmp = FIXTURE + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, FIXTURE)
        return
    want = _load().get(case)
    assert want is not None, f"{FIXTURE} has no case {case!r} (record it: METALM_PARITY_RECORD=1 on the reference)"
    assert got["inputs"] == want["inputs"], (
        f"{case}: the inputs differ from the recorded ones (tokenizer vocabulary or dataset tokens changed)")
    if got["machine"] != want["machine"]:
        pytest.skip(f"{case}: recorded on {want['machine']}, this machine is {got['machine']}: bit-for-bit parity "
                    "is only defined for the same kernels (the test's other assertions passed)")
    assert sorted(got["steps"], key=int) == sorted(want["steps"], key=int), case
    for step, (loss, gn) in want["steps"].items():
        assert got["steps"][step] == [loss, gn], f"{case} step {step}: (loss, grad norm) {got['steps'][step]} != " \
                                                 f"recorded {[loss, gn]}"
    assert got["weights"] == want["weights"], f"{case}: final weights differ from the recorded ones"
