"""Tokenizers: the project's own SentencePiece models (trained by data_tools/tokenizer_train.py) and the ones users
bring, behind one interface.

Backends, named like Megatron-LM's `--tokenizer-type`: `SentencePieceTokenizer` (any .model), `HuggingFaceTokenizer`
(a local tokenizer.json or a directory holding one, via the `tokenizers` package), `GPT2BPETokenizer` (vocab.json +
merges.txt). `load_tokenizer` picks one (auto: from the files given); `spec()` records type, files and special ids.

Models trained here have fixed special ids (`SPECIAL_TOKENS`, the order is the id): `<unk>`=0, `<s>`=1, `</s>`=2
follow the Llama convention so a decoder exports to `LlamaForCausalLM` without remapping; then `<pad>`=3, the
end-of-document token `</d>`=4, `<image>`=5, `</image>`=6. Such a model is recognised by that layout and keeps `</d>`
as end of document; any other tokenizer uses its own ids (rules in `BaseTokenizer`), eos as end of document.

    python -m data_tools.tokenizer train --input corpus.jsonl --model-prefix tok --vocab-size 8000
    python -m data_tools.tokenizer encode --tokenizer-model tok.model "Call me Ishmael."
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Iterable, Sequence

import numpy as np

from data_tools.cli import UserError, run_cli

from data_tools.special_tokens import SPECIAL_IDS, SPECIAL_TOKENS, SpecialIds  # noqa: F401 (part of this API)

TOKENIZER_TYPES = ("auto", "SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer")
META_FILE = "tokenizer_meta.json"  # written beside the tokenizer files in consolidated dirs and HF exports


WORD_CACHE_MAX = 500_000  # distinct segments kept by encode_batch_numpy before the cache is cleared
_WORD_CUT = re.compile(r"(?<=[^ ]) (?=[^ ])")
_CROSSING_PIECE = re.compile("[^\u2581]\u2581")



class BaseTokenizer:
    """What every backend offers: special ids, text <-> ids, and a `spec` that recreates it (recorded in dataset
    side metadata, configs, checkpoints and exports, so nothing downstream guesses).

    Special-id rules for tokenizers we did not train (documented in the README):
    - eos, bos, unk, pad are read from the tokenizer itself; a missing bos is eos (GPT-2's convention, one
      `<|endoftext|>` for both); a missing pad is eos: pad is only a filler in this project (padding positions are
      never targets and never attended to), so any valid id works, and eos is what Hugging Face users set;
    - the end-of-document id (appended by `--append-eod`, a stop id in generation) is eos, as Megatron-LM does,
      unless `eod_id` is given; models trained by `data_tools.tokenizer` keep their own `</d>` (METHOD.md: the
      semi-causal objective and generation distinguish a sentence end from a document end).

    Also satisfies what megatron-core's dataset builders read from a tokenizer (`vocab_size`, `eod`, `pad`,
    `unique_identifiers`), so it can be passed as `GPTDatasetConfig.tokenizer` directly.
    """

    kind = ""
    native = False  # a model trained by data_tools.tokenizer (the project's special-token layout)

    def _set_ids(self, where: str, unk, bos, eos, pad, eod_id, native_eod=None, image=None, image_end=None):
        def norm(i):
            return None if i is None or i < 0 else int(i)

        unk, bos, eos, pad = norm(unk), norm(bos), norm(eos), norm(pad)
        eod = eod_id if eod_id is not None and eod_id >= 0 else native_eod if native_eod is not None else eos
        if eos is None:
            eos = eod
        if eos is None:
            raise UserError(f"{where}: the tokenizer defines no end-of-sentence (eos) token; name the "
                            "end-of-document id with --eod-id (data.eod_id)")
        bos = eos if bos is None else bos
        pad = eos if pad is None else pad
        for name, i in (("eod_id", eod), ("eos", eos), ("bos", bos), ("pad", pad)):
            if not 0 <= i < self.vocab_size:
                raise UserError(f"{where}: {name} {i} is outside the vocabulary (size {self.vocab_size})")
        self.ids = SpecialIds(unk, bos, eos, pad, int(eod), image, image_end)
        self.eod_override = eod_id if eod_id is not None and eod_id >= 0 else None

    # --- what megatron-core's dataset config reads ---
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eod(self) -> int:
        return self.ids.eod

    @property
    def pad(self) -> int:
        return self.ids.pad

    @property
    def unique_identifiers(self) -> dict:
        return {"class": self.kind, **{k: v for k, v in self.spec().items() if k != "type"}}

    # --- encoding ---
    def encode(self, text: str) -> list[int]:
        """The ids of `text` alone: no bos/eos added (callers add the special tokens they need)."""
        raise NotImplementedError

    def encode_batch_numpy(self, texts: Sequence[str]) -> list:
        """What preprocessing writes for each document (before the end-of-document id), as int32 arrays: exactly
        what Megatron-LM's tokenizer of the same type gives for the text."""
        return [np.asarray(self.encode(t), dtype=np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def spec(self) -> dict:
        """type, files and special ids: `load_tokenizer_spec(spec)` recreates this tokenizer."""
        raise NotImplementedError

    def files(self) -> dict[str, str]:
        """name in a model directory -> source path, for consolidated dirs and exports."""
        raise NotImplementedError

    def describe(self) -> str:
        ids = ", ".join(f"{k} {v}" for k, v in vars(self.ids).items() if v is not None)
        return f"{self.kind}{' (project model)' if self.native else ''}, vocab {self.vocab_size:,}, ids: {ids}"

    def __getstate__(self):
        return self.spec()

    def __setstate__(self, state):
        self.__dict__.update(load_tokenizer_spec(state).__dict__)


class Tokenizer(BaseTokenizer):
    """Any SentencePiece model. Special ids come from the model (`unk_id`, `bos_id`, `eos_id`, `pad_id`; -1 means
    absent, SentencePiece's default for pad). A model trained by `data_tools.tokenizer` is recognised by its
    special-token layout (`SPECIAL_TOKENS`) and keeps `</d>` as end of document and its `<image>` tokens.
    Megatron-LM's SentencePieceTokenizer encodes a text as `encode_as_ids(text)`; so does this one."""

    kind = "SentencePieceTokenizer"

    def __init__(self, model_path: str, eod_id: int | None = None):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise UserError(f"tokenizer model not found: {model_path}")
        self.model_path = os.path.abspath(model_path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.model_path)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{model_path}: not a SentencePiece model ({e})") from None
        n = self.sp.GetPieceSize()
        self.native = n > len(SPECIAL_TOKENS) and all(
            self.sp.IdToPiece(i) == piece for i, (piece, _) in enumerate(SPECIAL_TOKENS))
        if self.native:
            s = SPECIAL_IDS
            self._set_ids(model_path, s.unk, s.bos, s.eos, s.pad, eod_id, s.eod, s.image, s.image_end)
        else:
            sp = self.sp
            image, image_end = (i if 0 <= i < n and sp.IdToPiece(i) == t else None
                                for t, i in ((t, sp.PieceToId(t)) for t in IMAGE_MARKERS))
            self._set_ids(model_path, sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id(), eod_id, image=image,
                          image_end=image_end)
        self._word_cache: dict[str, np.ndarray] = {}
        self._word_cache_exact: bool | None = None

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

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

    def _proto(self):
        from sentencepiece import sentencepiece_model_pb2

        m = sentencepiece_model_pb2.ModelProto()
        with open(self.model_path, "rb") as f:
            m.ParseFromString(f.read())
        return m

    @property
    def model_type(self) -> str:
        """unigram | bpe | word | char (SentencePiece's trainer_spec.model_type)."""
        m = self._proto()
        return m.trainer_spec.ModelType.Name(m.trainer_spec.model_type).lower()

    @property
    def word_cache_exact(self) -> bool:
        if self._word_cache_exact is None:
            m = self._proto()
            n = m.normalizer_spec
            # a segment that is whitespace only would lose its spaces to the dummy prefix rules: the cut regex
            # never makes one (it cuts only between two non-space characters)
            self._word_cache_exact = (
                n.name == "identity" and n.add_dummy_prefix and not n.remove_extra_whitespaces
                and n.escape_whitespaces and not m.trainer_spec.treat_whitespace_as_suffix
                and not any(_CROSSING_PIECE.search(p.piece) for p in m.pieces))
        return self._word_cache_exact

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def spec(self) -> dict:
        return {"type": self.kind, "model": self.model_path, "eod_id": self.eod_override, "ids": vars(self.ids)}

    def files(self) -> dict[str, str]:
        return {"tokenizer.model": self.model_path}


def _hf_token(cfg: dict, key: str):
    v = cfg.get(key)
    return v.get("content") if isinstance(v, dict) else v


_EOS_GUESSES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
# vision-language rows' image markers, found by name in any tokenizer that has them (`add-image-tokens` adds them
# to a tokenizer.json)
IMAGE_MARKERS = ("<image>", "</image>")


class _TokenizersBackend(BaseTokenizer):
    """Shared by the Hugging Face and GPT-2 backends: a `tokenizers.Tokenizer` (Rust; batch encoding)."""

    tk = None
    add_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch_numpy(self, texts: Sequence[str]) -> list:
        encs = self.tk.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.tk.id_to_token(int(i))


class HFTokenizer(_TokenizersBackend):
    """A Hugging Face fast tokenizer from a local `tokenizer.json` (or a directory holding it, e.g. a Llama-3
    checkpoint), read with the `tokenizers` package: offline, no transformers import. Special tokens come from the
    directory's `tokenizer_config.json` / `special_tokens_map.json` (`bos_token`, `eos_token`, `unk_token`,
    `pad_token`); without them eos is the first of `_EOS_GUESSES` in the vocabulary.

    Megatron-LM's HuggingFaceTokenizer writes `AutoTokenizer(text).input_ids` per document, i.e. with the
    tokenizer's own post-processor (a Llama-3 tokenizer adds `<|begin_of_text|>`); preprocessing does the same.
    `encode` (for prompts and task samples) adds nothing."""

    kind = "HuggingFaceTokenizer"

    def __init__(self, path: str, eod_id: int | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        self.path = os.path.abspath(path)
        if os.path.isdir(path):
            file = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(file):
                raise UserError(f"{path}: no tokenizer.json in this directory (a Hugging Face fast tokenizer is "
                                "needed; for a SentencePiece model pass its .model file)")
            self.dir = self.path
        elif os.path.isfile(path):
            file, self.dir = self.path, os.path.dirname(self.path)
        else:
            raise UserError(f"tokenizer not found: {path}")
        self.file = file
        try:
            self.tk = RustTokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise UserError(f"{file}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        cfg = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            p = os.path.join(self.dir, name)
            if os.path.isfile(p):
                try:
                    cfg.update({k: v for k, v in json.load(open(p, encoding="utf-8")).items() if v is not None})
                except (ValueError, AttributeError) as e:
                    raise UserError(f"{p}: not a JSON object ({e})") from None
        ids = {}
        for key in ("unk", "bos", "eos", "pad"):
            name = _hf_token(cfg, f"{key}_token")
            ids[key] = self.tk.token_to_id(name) if name else None
            if name and ids[key] is None:
                raise UserError(f"{self.dir}: {key}_token {name!r} is not in the vocabulary of {file}")
        if ids["eos"] is None:
            ids["eos"] = next((self.tk.token_to_id(t) for t in _EOS_GUESSES if self.tk.token_to_id(t) is not None),
                              None)
        image, image_end = (self.tk.token_to_id(t) for t in IMAGE_MARKERS)
        self._set_ids(path, ids["unk"], ids["bos"], ids["eos"], ids["pad"], eod_id, image=image, image_end=image_end)

    def spec(self) -> dict:
        return {"type": self.kind, "model": self.path, "eod_id": self.eod_override, "ids": vars(self.ids)}

    def files(self) -> dict[str, str]:
        out = {"tokenizer.json": self.file}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(self.dir, name)):
                out[name] = os.path.join(self.dir, name)
        return out


class GPT2BPETokenizer(_TokenizersBackend):
    """GPT-2's byte-level BPE from a vocab.json + merges.txt pair (Megatron-LM's `--vocab-file/--merge-file`).
    Built with the `tokenizers` package (byte-level pre-tokenizer with GPT-2's regex, no prefix space, byte-level
    decoder), which tokenizes exactly as GPT-2's reference `bpe` code does (tests check it against transformers'
    pure-Python GPT2Tokenizer). End of document = `<|endoftext|>`, as in Megatron-LM."""

    kind = "GPT2BPETokenizer"
    add_special_tokens = False

    def __init__(self, vocab_file: str, merge_file: str, eod_id: int | None = None):
        from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers

        for flag, p in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not p or not os.path.isfile(p):
                raise UserError(f"GPT2BPETokenizer needs {flag}: {p or '(not given)'} not found")
        self.vocab_file, self.merge_file = os.path.abspath(vocab_file), os.path.abspath(merge_file)
        try:
            tk = RustTokenizer(models.BPE.from_file(self.vocab_file, self.merge_file))
        except Exception as e:
            raise UserError(f"{vocab_file} / {merge_file}: not a GPT-2 vocab.json + merges.txt pair "
                            f"({str(e).splitlines()[0]})") from None
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        self.tk = tk
        eot = tk.token_to_id("<|endoftext|>")
        image, image_end = (tk.token_to_id(t) for t in IMAGE_MARKERS)
        self._set_ids(vocab_file, None, eot, eot, eot, eod_id, image=image, image_end=image_end)

    def spec(self) -> dict:
        return {"type": self.kind, "vocab_file": self.vocab_file, "merge_file": self.merge_file,
                "eod_id": self.eod_override, "ids": vars(self.ids)}

    def files(self) -> dict[str, str]:
        return {"vocab.json": self.vocab_file, "merges.txt": self.merge_file}


def load_tokenizer(model: str = "", kind: str = "auto", vocab_file: str = "", merge_file: str = "",
                   eod_id: int | None = None) -> BaseTokenizer:
    """The tokenizer named Megatron-style: `kind` one of TOKENIZER_TYPES (auto: GPT-2 when vocab/merge files are
    given; a directory with tokenizer.json or a .json file: Hugging Face; a directory with tokenizer.model or any
    other file: SentencePiece)."""
    if kind not in TOKENIZER_TYPES:
        raise UserError(f"--tokenizer-type {kind!r}: expected one of {', '.join(TOKENIZER_TYPES[1:])}")
    eod_id = None if eod_id is None or eod_id < 0 else int(eod_id)
    if kind == "auto":
        if vocab_file or merge_file:
            kind = "GPT2BPETokenizer"
        elif not model:
            raise UserError("no tokenizer given (--tokenizer-model, or --vocab-file and --merge-file)")
        elif os.path.isdir(model):
            if os.path.isfile(os.path.join(model, "tokenizer.json")):
                kind = "HuggingFaceTokenizer"
            elif os.path.isfile(os.path.join(model, "tokenizer.model")):
                kind, model = "SentencePieceTokenizer", os.path.join(model, "tokenizer.model")
            elif all(os.path.isfile(os.path.join(model, f)) for f in ("vocab.json", "merges.txt")):
                kind, vocab_file, merge_file = ("GPT2BPETokenizer", os.path.join(model, "vocab.json"),
                                                os.path.join(model, "merges.txt"))
            else:
                raise UserError(f"{model}: no tokenizer.json, tokenizer.model or vocab.json + merges.txt in this "
                                "directory")
        else:
            kind = "HuggingFaceTokenizer" if model.endswith(".json") else "SentencePieceTokenizer"
    if kind == "SentencePieceTokenizer":
        if os.path.isdir(model) and os.path.isfile(os.path.join(model, "tokenizer.model")):
            model = os.path.join(model, "tokenizer.model")
        return Tokenizer(model, eod_id)
    if kind == "HuggingFaceTokenizer":
        return HFTokenizer(model, eod_id)
    if not vocab_file and os.path.isdir(model):
        vocab_file, merge_file = os.path.join(model, "vocab.json"), os.path.join(model, "merges.txt")
    return GPT2BPETokenizer(vocab_file, merge_file, eod_id)


def load_tokenizer_spec(spec: dict, base_dir: str | None = None) -> BaseTokenizer:
    """Recreate a tokenizer from `spec()`; with `base_dir`, its files are looked up there by their model-dir names
    (a consolidated dir or an export, whose META_FILE holds the spec)."""
    kind, eod = spec.get("type", "SentencePieceTokenizer"), spec.get("eod_id")
    if base_dir is not None:
        if kind == "SentencePieceTokenizer":
            return Tokenizer(os.path.join(base_dir, "tokenizer.model"), eod)
        if kind == "HuggingFaceTokenizer":
            return HFTokenizer(base_dir, eod)
        return GPT2BPETokenizer(os.path.join(base_dir, "vocab.json"), os.path.join(base_dir, "merges.txt"), eod)
    return load_tokenizer(spec.get("model", ""), kind, spec.get("vocab_file", ""), spec.get("merge_file", ""), eod)


def load_from_dir(model_dir: str) -> BaseTokenizer:
    """The tokenizer stored in a consolidated dir or export (META_FILE; older dirs: tokenizer.model)."""
    meta = os.path.join(model_dir, META_FILE)
    if os.path.isfile(meta):
        return load_tokenizer_spec(json.load(open(meta)), base_dir=model_dir)
    return Tokenizer(os.path.join(model_dir, "tokenizer.model"))


def dataset_tokenizer_spec(prefix: str) -> dict | None:
    """The tokenizer spec preprocessing recorded beside a dataset (PREFIX.tokenizer.json), or None."""
    path = prefix + ".tokenizer.json"
    if not os.path.isfile(path):
        return None
    try:
        meta = json.load(open(path))
        return dict(meta["tokenizer"], vocab_size=meta.get("vocab_size"))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a tokenizer record ({e})") from None


def copy_to_dir(tok: BaseTokenizer, out_dir: str) -> None:
    """Copy the tokenizer's files into a model directory and record its spec there (META_FILE)."""
    import shutil

    for name, src in tok.files().items():
        shutil.copyfile(src, os.path.join(out_dir, name))
    spec = {k: v for k, v in tok.spec().items() if k not in ("model", "vocab_file", "merge_file")}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(spec, f, indent=2)


def add_tokenizer_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Megatron-LM's tokenizer flags (the types it shares with this project)."""
    g = p.add_argument_group("tokenizer (Megatron-LM's flags)")
    g.add_argument("--tokenizer-type", default="auto", choices=TOKENIZER_TYPES,
                   help="auto: from the files given (default)")
    g.add_argument("--tokenizer-model", default="",
                   help="SentencePiece .model, or a Hugging Face tokenizer.json / directory")
    g.add_argument("--vocab-file", default="", help="GPT-2 BPE vocab.json (GPT2BPETokenizer)")
    g.add_argument("--merge-file", default="", help="GPT-2 BPE merges.txt (GPT2BPETokenizer)")
    g.add_argument("--eod-id", type=int, default=None,
                   help="end-of-document id (default: the tokenizer's eos; </d> for models from data_tools.tokenizer)")


def from_data_config(d, model_override: str = "") -> BaseTokenizer:
    """The tokenizer of a training config's data section (older configs have only tokenizer_model)."""
    eod = getattr(d, "eod_id", -1)
    eod = None if eod is None or eod < 0 else eod
    return load_tokenizer(model_override or d.tokenizer_model, getattr(d, "tokenizer_type", "auto"),
                          "" if model_override else getattr(d, "vocab_file", ""),
                          "" if model_override else getattr(d, "merge_file", ""), eod)


def write_to_data_config(tok: BaseTokenizer, d) -> None:
    """Name `tok` exactly in a training config's data section (type, files, eod id; -1 = the default rule), so the
    config saved with a run or an export recreates it with `from_data_config`."""
    spec = tok.spec()
    d.tokenizer_type, d.tokenizer_model = tok.kind, spec.get("model", "")
    d.vocab_file, d.merge_file = spec.get("vocab_file", ""), spec.get("merge_file", "")
    d.eod_id = -1 if spec.get("eod_id") is None else spec["eod_id"]


def tokenizer_from_args(args) -> BaseTokenizer:
    return load_tokenizer(args.tokenizer_model, args.tokenizer_type, args.vocab_file, args.merge_file, args.eod_id)


def add_image_tokens(tokenizer: str, out_dir: str, datasets: Sequence[str] = (), log=print) -> str:
    """`add-image-tokens`: a copy of a Hugging Face tokenizer (tokenizer.json, with its config files) with
    IMAGE_MARKERS added as special tokens at the end of the vocabulary (existing ids unchanged, so datasets made
    with the original stay valid), written to OUT_DIR (temporary name, then renamed). `datasets`: their
    PREFIX.tokenizer.json records are rewritten to name the new tokenizer (same special ids; the new vocabulary
    size), so training reads them with it. The model's `model.vocab_size` must cover the new size."""
    import shutil
    import tempfile

    from data_tools.durable import write_durable

    tok = load_tokenizer(tokenizer)
    if tok.kind != "HuggingFaceTokenizer":
        raise UserError(f"{tokenizer}: {tok.kind}: image tokens can be added to a Hugging Face tokenizer.json only "
                        "(a SentencePiece model needs them at training time: python -m data_tools.tokenizer train "
                        "adds them)")
    if tok.ids.image is not None and tok.ids.image_end is not None:
        raise UserError(f"{tokenizer}: already has {' and '.join(IMAGE_MARKERS)} "
                        f"(ids {tok.ids.image}, {tok.ids.image_end}): use it as it is")
    records = []
    for prefix in datasets:
        spec = dataset_tokenizer_spec(prefix)
        if spec is None:
            raise UserError(f"--datasets {prefix}: no {prefix}.tokenizer.json (not made by data_tools.preprocess)")
        if spec.get("vocab_size") != tok.vocab_size or spec.get("ids", {}).get("eod") != tok.ids.eod:
            raise UserError(f"--datasets {prefix}: made with another tokenizer ({spec.get('model')}), not {tokenizer}")
        records.append(prefix)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise UserError(f"--out {out_dir}: already exists")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        for name, src in tok.files().items():
            shutil.copyfile(src, os.path.join(tmp, name))
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        tk = RustTokenizer.from_file(os.path.join(tmp, "tokenizer.json"))
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_MARKERS])
        tk.save(os.path.join(tmp, "tokenizer.json"))
        conf_path = os.path.join(tmp, "tokenizer_config.json")
        if os.path.isfile(conf_path):  # transformers reads its added tokens from here too
            conf = json.load(open(conf_path, encoding="utf-8"))
            extra = [t for t in conf.get("additional_special_tokens") or [] if t not in IMAGE_MARKERS]
            conf["additional_special_tokens"] = extra + list(IMAGE_MARKERS)
            with open(conf_path, "w") as f:
                json.dump(conf, f, indent=2)
        new = load_tokenizer(tmp, eod_id=tok.eod_override)
        if [new.ids.bos, new.ids.eos, new.ids.pad, new.ids.eod] != [tok.ids.bos, tok.ids.eos, tok.ids.pad, tok.ids.eod]:
            raise UserError(f"{tokenizer}: adding the image tokens changed a special id (not written)")
        os.replace(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    new = load_tokenizer(out_dir, eod_id=tok.eod_override)
    for prefix in records:
        path = prefix + ".tokenizer.json"
        meta = json.load(open(path))
        meta.update(tokenizer=new.spec(), vocab_size=new.vocab_size, image_tokens_added_to=tok.spec().get("model"))
        write_durable(path, (json.dumps(meta, indent=2) + "\n").encode())
    log(f"wrote {out_dir}: {' '.join(IMAGE_MARKERS)} = ids {new.ids.image}, {new.ids.image_end} (vocabulary "
        f"{tok.vocab_size} -> {new.vocab_size}; model.vocab_size must be at least {new.vocab_size})"
        + (f"; {len(records)} dataset record(s) now name it" if records else ""))
    return out_dir


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
    e = sub.add_parser("encode", help="print the ids and pieces of a text (and the tokenizer's special ids)")
    add_tokenizer_args(e)
    e.add_argument("--model", dest="model_alias", default="", help=argparse.SUPPRESS)  # the older flag
    e.add_argument("text")
    a = sub.add_parser("add-image-tokens", help="a copy of a tokenizer.json with <image> and </image> added (for "
                       "vision-language training with your own tokenizer)")
    a.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer.json or its directory")
    a.add_argument("--out", required=True, help="the new tokenizer's directory (must not exist)")
    a.add_argument("--datasets", nargs="*", default=[], metavar="PREFIX",
                   help="datasets made with the original: their PREFIX.tokenizer.json records are updated to name "
                        "the new one (token ids are unchanged)")
    args = p.parse_args(argv)
    if args.cmd == "add-image-tokens":
        add_image_tokens(args.tokenizer, args.out, args.datasets)
    elif args.cmd == "train":
        for path in args.input:
            if not os.path.isfile(path):
                raise UserError(f"input not found: {path}")
        from data_tools.tokenizer_train import train_tokenizer

        path = train_tokenizer(args.input, args.model_prefix, args.vocab_size, args.model_type,
                               args.byte_fallback, json_key=args.json_keys,
                               input_sentence_size=args.input_sentence_size)
        tok = Tokenizer(path)
        print(f"wrote {path} (vocab {tok.vocab_size}, special ids "
              f"{json.dumps({a: getattr(tok.ids, a) for _, a in SPECIAL_TOKENS})})")
    else:
        args.tokenizer_model = args.tokenizer_model or args.model_alias
        tok = tokenizer_from_args(args)
        ids = tok.encode(args.text)
        print(json.dumps({"tokenizer": tok.describe(), "ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]},
                         ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))
