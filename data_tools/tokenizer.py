"""SentencePiece tokenizer with the project's special tokens: train, load, and the one place that defines ids.

Special-token ids are fixed by `SPECIAL_TOKENS` (the order is the id): `<unk>`=0, `<s>`=1, `</s>`=2 follow the
Llama convention so a decoder exports to `LlamaForCausalLM` without remapping; then `<pad>`=3, the end-of-document
token `</d>`=4, `<image>`=5, `</image>`=6. Every model trained by `train_tokenizer` has exactly these ids;
`Tokenizer` checks it on load, so a foreign model with other ids is refused instead of silently mis-tokenized.

    python -m data_tools.tokenizer train --input corpus.jsonl --model-prefix tok --vocab-size 8000
    python -m data_tools.tokenizer encode --model tok.model "Call me Ishmael."
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from data_tools.cli import UserError, run_cli

# (name in the vocabulary, attribute name); the position is the id.
SPECIAL_TOKENS: tuple[tuple[str, str], ...] = (
    ("<unk>", "unk"),
    ("<s>", "bos"),
    ("</s>", "eos"),
    ("<pad>", "pad"),
    ("</d>", "eod"),
    ("<image>", "image"),
    ("</image>", "image_end"),
)


@dataclass(frozen=True)
class SpecialIds:
    unk: int
    bos: int
    eos: int
    pad: int
    eod: int
    image: int
    image_end: int


WORD_CACHE_MAX = 500_000  # distinct segments kept by encode_batch_numpy before the cache is cleared
_WORD_CUT = re.compile(r"(?<=[^ ]) (?=[^ ])")
_CROSSING_PIECE = re.compile("[^\u2581]\u2581")

SPECIAL_IDS = SpecialIds(**{attr: i for i, (_, attr) in enumerate(SPECIAL_TOKENS)})


class Tokenizer:
    """A loaded SentencePiece model with the project's special ids.

    Also satisfies what megatron-core's dataset builders read from a tokenizer (`vocab_size`, `eod`, `pad`,
    `unique_identifiers`), so it can be passed as `GPTDatasetConfig.tokenizer` directly.
    """

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise UserError(f"tokenizer model not found: {model_path}")
        self.model_path = os.path.abspath(model_path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.model_path)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{model_path}: not a SentencePiece model ({e})") from None
        for i, (piece, _) in enumerate(SPECIAL_TOKENS):
            got = self.sp.IdToPiece(i) if i < self.sp.GetPieceSize() else None
            if got != piece:
                raise UserError(
                    f"{model_path}: id {i} is {got!r}, expected {piece!r}; train the model with "
                    "`python -m data_tools.tokenizer train` so the special tokens have the project's ids"
                )
        self.ids = SPECIAL_IDS
        self._word_cache: dict[str, np.ndarray] = {}
        self._word_cache_exact: bool | None = None
        self.unique_identifiers = {"class": "SentencePieceTokenizer", "model": self.model_path}

    # --- what megatron-core's dataset config reads ---
    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def eod(self) -> int:
        return self.ids.eod

    @property
    def pad(self) -> int:
        return self.ids.pad

    # --- encoding ---
    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def encode_batch_numpy(self, texts: Sequence[str]) -> list:
        """Encode many texts; numpy int32 arrays, identical to `sp.Encode(text)` for every text.

        Fast path (why we wrote it: SentencePiece has no word cache, and its per-token cost dominates
        preprocessing): when the model allows it (`word_cache_exact`), texts are cut before every single space
        that sits between two non-space characters and each distinct segment is encoded once and cached. This is
        exact: SentencePiece's dummy prefix turns a segment "word" into "▁word", exactly what it is inside the
        whole text, and BPE/unigram can only differ if a vocabulary piece spans the cut, i.e. contains a
        non-space character followed by ▁, which `word_cache_exact` rules out from the model itself.
        """
        if not self.word_cache_exact:
            return self.sp.Encode(list(texts), out_type="numpy", num_threads=1)
        cache = self._word_cache
        if len(cache) > WORD_CACHE_MAX:
            cache.clear()
        split = [_WORD_CUT.split(t) for t in texts]
        missing = list({seg for segs in split for seg in segs if seg not in cache})
        if missing:
            for seg, ids in zip(missing, self.sp.Encode(missing, out_type="numpy", num_threads=1)):
                cache[seg] = ids
        empty = np.zeros(0, dtype=np.int32)
        return [np.concatenate([cache[seg] for seg in segs]) if segs else empty for segs in split]

    @property
    def word_cache_exact(self) -> bool:
        if self._word_cache_exact is None:
            from sentencepiece import sentencepiece_model_pb2

            m = sentencepiece_model_pb2.ModelProto()
            with open(self.model_path, "rb") as f:
                m.ParseFromString(f.read())
            n = m.normalizer_spec
            self._word_cache_exact = (
                n.name == "identity" and n.add_dummy_prefix and not n.remove_extra_whitespaces
                and n.escape_whitespaces and not m.trainer_spec.treat_whitespace_as_suffix
                and not any(_CROSSING_PIECE.search(p.piece) for p in m.pieces))
        return self._word_cache_exact

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])


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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a SentencePiece model with the project's special tokens")
    t.add_argument("--input", nargs="+", required=True, help="jsonl (.gz), parquet or txt files")
    t.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                   help="disable byte fallback (unknown characters become <unk>)")
    t.add_argument("--json-keys", default="text", help="jsonl key / parquet column holding the text")
    t.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="lines sampled for training (SentencePiece's input_sentence_size)")
    e = sub.add_parser("encode", help="print the ids and pieces of a text")
    e.add_argument("--model", required=True)
    e.add_argument("text")
    args = p.parse_args(argv)
    if args.cmd == "train":
        for path in args.input:
            if not os.path.isfile(path):
                raise UserError(f"input not found: {path}")
        path = train_tokenizer(args.input, args.model_prefix, args.vocab_size, args.model_type,
                               args.byte_fallback, json_key=args.json_keys,
                               input_sentence_size=args.input_sentence_size)
        tok = Tokenizer(path)
        print(f"wrote {path} (vocab {tok.vocab_size}, special ids "
              f"{json.dumps({a: getattr(tok.ids, a) for _, a in SPECIAL_TOKENS})})")
    else:
        tok = Tokenizer(args.model)
        ids = tok.encode(args.text)
        print(json.dumps({"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))
