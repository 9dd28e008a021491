"""An encoder with its own tokenizer: each span (or task piece) chosen in decoder tokens is re-tokenized by the
encoder's tokenizer, and every decoder slot of it is given the encoder token that covers its first character.

The rule (ARCHITECTURE.md, "An encoder may keep its own tokenizer"):
- The span's text is the concatenation of its decoder tokens' surface bytes (SentencePiece `▁` = a space, byte
  pieces `<0xNN>` = that byte; byte-level BPE through GPT-2's byte table; WordPiece `##`), decoded as UTF-8. This is
  the span's own text, character for character (checked against the decoder's `decode` when the aligner is built).
- The encoder tokenizer (Hugging Face `tokenizers`, with the special tokens its post-processor adds: `[CLS] … [SEP]`,
  `<s> … </s>`) encodes that text; its character offsets are offsets into that same text, also for tokenizers that
  lower-case or strip accents (the offsets map back through normalisation).
- A decoder slot's character is the first non-whitespace character of its token's surface (a whitespace-only or
  empty token: its first character). The slot gets the encoder token whose offsets cover that character; if none
  does (whitespace, or a character the tokenizer drops), the first encoder token after it; at the end, the last.
- A span whose text gives no encoder token, or more tokens than the encoder's positions allow, is not encoded: it
  goes back to the causal objective (its targets count again) and is counted (`AlignStats`). A slot mapped to the
  encoder's unknown token is counted too.
The batch contract is unchanged: `dock_src` may name one encoder position for several decoder slots.

Legend: m decoder tokens of a span; n encoder tokens (specials included).
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from data_tools.cli import UserError

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_WS = b" \t\n\r\x0b\x0c"


class EncoderTokenizer:
    """The encoder's own tokenizer: a `tokenizer.json` (or its directory), encoded with the special tokens it expects."""

    def __init__(self, path: str, pad_id: int | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise UserError(f"encoder tokenizer not found: {file} (model.encoder.tokenizer: a tokenizer.json or its "
                            "directory)")
        try:
            self.tk = RustTokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise UserError(f"{file}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        self.file = os.path.abspath(file)
        self.tk.no_truncation()
        self.tk.no_padding()
        empty = self.tk.encode("", add_special_tokens=True)
        self.specials = len(empty.ids)  # tokens the post-processor adds around one text ([CLS] [SEP]: 2)
        if not self.specials:
            raise UserError(f"{file}: the tokenizer adds no special tokens ([CLS]/[SEP] or <s>/</s>): not the "
                            "tokenizer of a BERT-family encoder")
        unk = getattr(self.tk.model, "unk_token", None)
        self.unk_id = self.tk.token_to_id(unk) if unk else None
        self.pad_id = pad_id if pad_id is not None else (self.tk.token_to_id("[PAD]") or self.tk.token_to_id("<pad>")
                                                         or 0)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]):
        return self.tk.encode_batch(texts, add_special_tokens=True)

    def __getstate__(self):  # DataLoader workers: rebuilt from the file
        return {"file": self.file, "pad_id": self.pad_id}

    def __setstate__(self, state):
        self.__init__(state["file"], state["pad_id"])


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character stand-ins for bytes, inverted (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_surfaces(tok) -> list[bytes]:
    """The bytes each decoder token id stands for inside a text (`data_tools.tokenizer` objects: SentencePiece,
    Hugging Face tokenizer.json, GPT-2 BPE). Special / control tokens stand for nothing."""
    n = tok.vocab_size
    special = {i for i in vars(tok.ids).values() if isinstance(i, int) and i >= 0}
    out: list[bytes] = []
    if tok.kind == "SentencePieceTokenizer":
        sp = tok.sp
        for i in range(n):
            piece = sp.IdToPiece(i)
            if i in special or sp.IsControl(i) or sp.IsUnknown(i):
                out.append(b"")
            elif sp.IsByte(i):
                out.append(bytes([int(_BYTE_PIECE.match(piece).group(1), 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out
    tk = tok.tk
    decoder = json.loads(tk.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
    added = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
    byte_level = "ByteLevel" in kinds
    table = _gpt2_byte_decoder() if byte_level else {}
    for i in range(n):
        piece = tk.id_to_token(i)
        if piece is None or i in added or i in special:
            out.append(b"")
        elif byte_level:
            out.append(bytes(table[c] for c in piece if c in table))
        elif "WordPiece" in kinds:
            out.append(piece[2:].encode() if piece.startswith("##") else b" " + piece.encode())
        elif m := _BYTE_PIECE.match(piece):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


@dataclass
class AlignStats:
    spans: int = 0  # spans encoded
    slots: int = 0  # decoder slots docked
    unk_slots: int = 0  # slots whose encoder token is the unknown token
    dropped_empty: int = 0  # spans whose text gave no encoder token (back to causal)
    dropped_long: int = 0  # spans over the encoder's length limit (back to causal)
    dropped_row_full: int = 0  # spans that did not fit the static encoder row (back to causal)
    encoder_tokens: int = 0  # encoder tokens of the encoded spans, specials included

    def add(self, other: "AlignStats") -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class SpanAligner:
    """Decoder-token pieces -> (encoder ids with specials, per-slot encoder index) by the rule of the module
    docstring. `max_length`: the most encoder tokens one piece may have (the encoder's positions)."""
    decoder_tok: object
    encoder_tok: EncoderTokenizer
    max_length: int
    stats: AlignStats = field(default_factory=AlignStats)

    def __post_init__(self):
        surf = token_surfaces(self.decoder_tok)
        self.surfaces = surf
        self.lengths = np.array([len(s) for s in surf], dtype=np.int64)
        self.lead_ws = np.array([len(s) - len(s.lstrip(_WS)) if s.strip(_WS) else 0 for s in surf], dtype=np.int64)
        self._check_surfaces()

    def _check_surfaces(self) -> None:
        probe = ("The quick brown fox, naïve café; 12.5% of \"tests\" — passed!\nNew line:  two spaces. "
                 "Zürich's Œuvre")
        unk = self.decoder_tok.ids.unk  # characters outside the decoder's vocabulary decode as a mark, not text
        ids = [i for i in self.decoder_tok.encode(probe) if i != unk]
        mine = b"".join(self.surfaces[i] for i in ids).decode("utf-8", errors="replace")
        theirs = self.decoder_tok.decode(ids)
        if mine.split() != theirs.split():
            raise UserError(f"decoder tokenizer {self.decoder_tok.describe()}: its tokens cannot be mapped to "
                            f"characters (decoded {theirs[:40]!r}, surfaces give {mine[:40]!r}); an encoder with "
                            "its own tokenizer needs a SentencePiece, byte-level BPE or WordPiece decoder tokenizer")

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("surfaces", "lengths", "lead_ws"):
            state.pop(k)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    def text_and_chars(self, ids: np.ndarray) -> tuple[str, np.ndarray]:
        """(the piece's text, the character index of each slot's first non-whitespace character)."""
        ids = np.asarray(ids, dtype=np.int64)
        lens = self.lengths[ids]
        starts = np.cumsum(lens) - lens
        first = starts + self.lead_ws[ids]
        raw = b"".join([self.surfaces[i] for i in ids.tolist()])
        b = np.frombuffer(raw, dtype=np.uint8)
        # a character cut by the span's edges (byte pieces): its bytes inside the span are not text of the span
        head = int(np.argmax((b & 0xC0) != 0x80)) if len(b) and ((b & 0xC0) == 0x80).any() else 0
        if len(b) and ((b & 0xC0) == 0x80).all():
            head = len(b)
        tail = len(b)
        starts_at = np.flatnonzero((b & 0xC0) != 0x80)
        if len(starts_at) and starts_at[-1] >= head:
            last = int(starts_at[-1])
            need = 1 + int(b[last] >= 0xC0) + int(b[last] >= 0xE0) + int(b[last] >= 0xF0)
            if last + need > len(b):
                tail = last
        try:
            text = raw[head:tail].decode("utf-8")
            lead = np.zeros(len(b), dtype=bool)
            lead[head:tail] = (b[head:tail] & 0xC0) != 0x80
            char_of = np.concatenate([np.maximum(np.cumsum(lead) - 1, 0), [len(text)]])
            char_of[tail:] = len(text)
            return text, char_of[first]
        except UnicodeDecodeError:
            pass
        # invalid UTF-8 inside the span (not a cut character): each token decoded on its own
        parts = [self.surfaces[i].decode("utf-8", errors="replace") for i in ids.tolist()]
        plen = np.array([len(p) for p in parts], dtype=np.int64)
        pws = np.array([len(p) - len(p.lstrip()) if p.strip() else 0 for p in parts], dtype=np.int64)
        return "".join(parts), np.cumsum(plen) - plen + pws

    def texts_and_chars(self, pieces: list[np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
        """`text_and_chars` for all pieces of a sample at once (one join and one pass over the bytes; the batch
        loader's hot path, bench/batch_building.py); a piece with invalid UTF-8 inside falls back to
        `text_and_chars`."""
        n = np.array([len(p) for p in pieces], dtype=np.int64)
        ids = np.concatenate(pieces).astype(np.int64, copy=False)
        lens = self.lengths[ids]
        tok_end = np.cumsum(lens)
        first = tok_end - lens + self.lead_ws[ids]  # byte of each slot's first non-whitespace character
        raw = b"".join([self.surfaces[i] for i in ids.tolist()])
        b = np.frombuffer(raw, dtype=np.uint8)
        lead = (b & 0xC0) != 0x80
        lead_at = np.flatnonzero(lead)
        leads_upto = np.concatenate([[0], np.cumsum(lead)])  # leads_upto[x]: lead bytes in b[:x]
        piece_end_tok = np.cumsum(n)
        piece_end = np.where(piece_end_tok > 0, tok_end[np.maximum(piece_end_tok - 1, 0)], 0)
        piece_start = np.concatenate([[0], piece_end[:-1]])
        texts, heads, tails, bad = [], [], [], []
        for k, (ps, pe) in enumerate(zip(piece_start.tolist(), piece_end.tolist())):
            i = int(np.searchsorted(lead_at, ps))
            head = int(lead_at[i]) if i < len(lead_at) and lead_at[i] < pe else pe  # a cut character's tail bytes
            tail = pe
            j = int(np.searchsorted(lead_at, pe)) - 1
            if j >= 0 and lead_at[j] >= head:  # a character cut by the span's end: not the span's text
                last = int(lead_at[j])
                need = 1 + int(b[last] >= 0xC0) + int(b[last] >= 0xE0) + int(b[last] >= 0xF0)
                if last + need > pe:
                    tail = last
            try:
                texts.append(raw[head:tail].decode("utf-8"))
            except UnicodeDecodeError:
                texts.append("")
                bad.append(k)
            heads.append(head)
            tails.append(tail)
        head_s, tail_s = np.repeat(heads, n), np.repeat(tails, n)
        nchar_s = np.repeat([len(t) for t in texts], n)
        c = np.maximum(leads_upto[np.minimum(first + 1, len(b))] - leads_upto[head_s] - 1, 0)
        c = np.where(first >= tail_s, nchar_s, c)
        chars = np.split(c, piece_end_tok[:-1])
        for k in bad:  # invalid UTF-8 inside the span (not a cut character): each token decoded on its own
            texts[k], chars[k] = self.text_and_chars(pieces[k])
        return texts, chars

    def align(self, pieces: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """For each piece: (encoder ids [n], encoder index of each decoder slot [m]) or None (not encodable:
        counted in `stats`)."""
        if not pieces:
            return []
        texts, chars = self.texts_and_chars(pieces)
        out = []
        st = self.stats
        for got, why in self._place_all(self.encoder_tok.encode_batch(texts), chars):
            if why == "empty":
                st.dropped_empty += 1
            elif why == "long":
                st.dropped_long += 1
            else:
                ids, src = got
                st.spans += 1
                st.slots += len(src)
                st.encoder_tokens += len(ids)
                if self.encoder_tok.unk_id is not None:
                    st.unk_slots += int((ids[src] == self.encoder_tok.unk_id).sum())
            out.append(got)
        return out

    def _place_all(self, encs, chars: list[np.ndarray]) -> list:
        """Per piece: ((encoder ids, each slot's encoder index), "") or (None, "empty" | "long"). A slot gets the
        real (non-special) encoder token whose character range covers its character, else the next real token (the
        last one at the end). All pieces of a sample in one pass: their tokens' and slots' characters are shifted
        apart by piece and searched together."""
        ids_l = [e.ids for e in encs]
        n = np.array([len(x) for x in ids_l], dtype=np.int64)
        special = np.fromiter(itertools.chain.from_iterable(e.special_tokens_mask for e in encs), dtype=np.int64,
                              count=int(n.sum()))
        off = np.array(list(itertools.chain.from_iterable(e.offsets for e in encs)), dtype=np.int64).reshape(-1, 2)
        piece_of = np.repeat(np.arange(len(encs)), n)
        within = np.arange(len(special)) - np.repeat(np.cumsum(n) - n, n)  # position inside its piece's ids
        real = np.flatnonzero(special == 0)
        n_real = np.bincount(piece_of[real], minlength=len(encs))
        out: list = []
        ok = [k for k in range(len(encs)) if n_real[k] and n[k] <= self.max_length]
        if ok:
            shift = int(max(off[:, 1].max(initial=0), max(int(c.max(initial=0)) for c in chars)) + 1)
            keys = off[real, 0] + piece_of[real] * shift
            lo = np.searchsorted(piece_of[real], np.arange(len(encs)))  # first real token of each piece
            c_all = np.concatenate([chars[k] for k in ok])
            k_all = np.repeat(ok, [len(chars[k]) for k in ok])
            g = np.searchsorted(keys, c_all + k_all * shift, side="right") - 1
            covered = (g >= lo[k_all]) & (off[real[np.maximum(g, 0)], 1] > c_all)
            g = np.clip(np.where(covered, g, g + 1), lo[k_all], lo[k_all] + n_real[k_all] - 1)
            src_all = np.split(within[real[g]], np.cumsum([len(chars[k]) for k in ok])[:-1])
            placed = dict(zip(ok, src_all))
        for k in range(len(encs)):
            if not n_real[k]:
                out.append((None, "empty"))
            elif n[k] > self.max_length:
                out.append((None, "long"))
            else:
                out.append(((np.array(ids_l[k], dtype=np.int64), placed[k]), ""))
        return out

    def align_piece(self, ids) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
        """One piece, not counted: (alignment or None, "" | "empty" | "long")."""
        text, c = self.text_and_chars(ids)
        return self._place_all(self.encoder_tok.encode_batch([text]), [c])[0]


def aligner_for(encoder_cfg, decoder_tok) -> SpanAligner | None:
    """The aligner of a model's text encoder config (pretrain.config.EncoderConfig) when it keeps its own tokenizer,
    else None (our own encoders share the decoder's vocabulary)."""
    if encoder_cfg is None or not getattr(encoder_cfg, "tokenizer", ""):
        return None
    enc_tok = EncoderTokenizer(encoder_cfg.tokenizer, encoder_cfg.pad_id)
    limit = (encoder_cfg.max_positions - encoder_cfg.position_offset) if encoder_cfg.max_positions else 1 << 30
    return SpanAligner(decoder_tok, enc_tok, limit)


def encoder_row_length(dec_row: int, span_length: int, seq_length: int) -> int:
    """Static encoder row length for re-tokenized spans: 1.25 x the decoder-token row (tokenizers differ in how many
    tokens a text takes) plus each candidate span's special tokens, rounded up to a multiple of 64."""
    spans = max(1, seq_length // span_length)
    return int(np.ceil((1.25 * dec_row + 2 * spans) / 64) * 64)
