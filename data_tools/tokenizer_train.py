"""Train the project's SentencePiece models (special tokens at fixed ids: data_tools/special_tokens.py).

    python -m data_tools.tokenizer train --input corpus.jsonl --model-prefix tok --vocab-size 8000
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Iterator, Sequence

from data_tools.cli import UserError
from data_tools.special_tokens import SPECIAL_IDS, SPECIAL_TOKENS


def iter_training_text(paths: Sequence[str], json_key: str = "text") -> Iterator[str]:
    """Yield the text of every document in jsonl (plain or .gz) / parquet / txt files, skipping bad records."""
    from data_tools.readers import iter_documents

    for path in paths:
        for rec in iter_documents(path, json_key):
            if rec.text is not None:
                yield rec.text


_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
MAX_LINE_CHARS = 2000  # SentencePiece's trainer skips lines over max_sentence_length (4192 bytes) silently


def _training_lines(text: str) -> Iterator[str]:
    """Lines for SentencePiece's trainer; paragraph-long lines (one per speech in sotu) are cut at sentence ends."""
    for line in text.splitlines():
        line = line.strip()
        if len(line) <= MAX_LINE_CHARS:
            if line:
                yield line
            continue
        piece = ""
        for sent in _SENTENCE_END.split(line):
            if piece and len(piece) + len(sent) + 1 > MAX_LINE_CHARS:
                yield piece
                piece = ""
            piece = f"{piece} {sent}" if piece else sent[:MAX_LINE_CHARS]
        if piece:
            yield piece


def train_tokenizer(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    json_key: str = "text",
    seed: int = 1234,
) -> str:
    """Train a SentencePiece model with the project's special tokens; returns the .model path.

    Documents are split into lines for SentencePiece's trainer (it samples sentences, one per line); both output
    files are written under a temporary name and renamed when complete.
    """
    import sentencepiece as spm

    if vocab_size <= len(SPECIAL_TOKENS) + 256 * byte_fallback:
        raise UserError(f"--vocab-size {vocab_size} is too small (needs room for special tokens and bytes)")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    n_lines = 0
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".sp-train-") as tmp:
        text_file = os.path.join(tmp, "lines.txt")
        with open(text_file, "w", encoding="utf-8") as f:
            for text in iter_training_text(inputs, json_key):
                for line in _training_lines(text):
                    f.write(line + "\n")
                    n_lines += 1
        if n_lines == 0:
            raise UserError(f"no text found in {', '.join(inputs)} (key {json_key!r})")
        tmp_prefix = os.path.join(tmp, "model")
        spm.set_random_generator_seed(seed)  # deterministic sentence sampling
        spm.SentencePieceTrainer.Train(
            input=text_file,
            model_prefix=tmp_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=1_000_000,
            unk_id=SPECIAL_IDS.unk,
            bos_id=SPECIAL_IDS.bos,
            eos_id=SPECIAL_IDS.eos,
            pad_id=SPECIAL_IDS.pad,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            pad_piece="<pad>",
            user_defined_symbols=[p for p, _ in SPECIAL_TOKENS[4:]],
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        for ext in (".vocab", ".model"):  # .model last: its presence means the pair is complete
            os.replace(tmp_prefix + ext, model_prefix + ext)
    return model_prefix + ".model"
