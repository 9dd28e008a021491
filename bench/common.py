"""What the CPU benchmarks share: the fetched corpora and a tokenizer trained on them, cached under --work."""
from __future__ import annotations

import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corpora_and_tokenizer(work: str, vocab_size: int = 8000) -> tuple[list[str], str]:
    """(the corpus jsonl files, the SentencePiece model path), fetching and training once."""
    from data_tools import corpora, tokenizer_train

    raw = os.path.join(work, "raw")
    for name in corpora.CORPORA:
        corpora.fetch(name, raw, log=lambda *a: None)
    inputs = sorted(glob.glob(os.path.join(raw, "*.jsonl")))
    model = os.path.join(work, "spm.model")
    if not os.path.exists(model):
        tokenizer_train.train_tokenizer(inputs, model[: -len(".model")], vocab_size=vocab_size)
    return inputs, model
