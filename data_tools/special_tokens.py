"""The special tokens of the SentencePiece models trained here (data_tools/tokenizer_train.py): fixed ids, the
order is the id. `<unk>`=0, `<s>`=1, `</s>`=2 follow the Llama convention; then `<pad>`=3, the end-of-document token
`</d>`=4, `<image>`=5, `</image>`=6 (data_tools/tokenizer.py explains how other tokenizers' ids are found)."""
from __future__ import annotations

from dataclasses import dataclass

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
    unk: int | None
    bos: int
    eos: int
    pad: int
    eod: int
    image: int | None = None
    image_end: int | None = None


SPECIAL_IDS = SpecialIds(**{attr: i for i, (_, attr) in enumerate(SPECIAL_TOKENS)})
