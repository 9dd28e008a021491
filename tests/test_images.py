"""Image-text data (data_tools/images.py): parquet shards from registry packages, decodable images only (the others
reported by id), deterministic, and never a partial shard under a final name."""
import io
import json
import os

import numpy as np
import pytest

from data_tools import images
from data_tools.cli import UserError

QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    images.fetch("mnist", str(out), limit=200, shard_size=64, **QUIET)
    images.fetch("fashion_mnist", str(out), limit=100, **QUIET)
    return out


def test_shards_meta_and_images(fetched):
    from PIL import Image

    meta = json.load(open(fetched / "mnist" / "meta.json"))
    assert meta["counts"] == {"train": 160, "validation": 20, "test": 20} and meta["archive_sha256"]
    assert sorted(os.listdir(fetched / "mnist"))[:4] == ["meta.json", "test-00000.parquet", "train-00000.parquet",
                                                         "train-00001.parquet"]  # 160 train rows in shards of 64
    rows = images.read_rows(str(fetched / "mnist"), "train")
    assert len(rows) == 160 and set(rows[0]) == set(images.COLUMNS)
    labels = {r["label"] for r in rows}
    assert len(labels) >= 8  # a seeded subset of a file sorted by digit, not its first 200 rows
    for r in rows[:20]:
        im = Image.open(io.BytesIO(r["image"]))
        assert im.format == "PNG" and im.size == (28, 28) == (r["width"], r["height"])
        assert images.DIGIT_NAMES[r["label"]] in r["caption"]
    fm = json.load(open(fetched / "fashion_mnist" / "meta.json"))
    assert fm["counts"]["test"] == 100 and fm["counts"]["train"] + fm["counts"]["validation"] == 100
    row = images.read_rows(str(fetched / "fashion_mnist"), "test")[0]
    assert images.FASHION_CLASSES[row["label"]] in row["caption"]


def test_fetch_is_deterministic(fetched, tmp_path):
    images.fetch("mnist", str(tmp_path), limit=200, shard_size=64, **QUIET)
    a = images.read_rows(str(fetched / "mnist"))
    b = images.read_rows(str(tmp_path / "mnist"))
    assert a == b


def png(pixels):
    return images.png_bytes(np.asarray(pixels, dtype=np.uint8))


def test_corrupt_images_skipped_by_id(tmp_path):
    good = png(np.full((8, 8), 200))
    truncated = good[: len(good) // 2]
    recs = iter([images.Record("ok-1", good, "a grey square."), images.Record("cut-1", truncated, "cut."),
                 images.Record("junk-1", b"not an image at all", "junk."), images.Record("ok-2", good, "again.")])
    meta = images.write_dataset("synthetic", recs, str(tmp_path), {"licence": "CC0"}, **QUIET)
    assert sum(meta["counts"].values()) == 2
    ids = meta["skipped"]["undecodable image"]["ids"]
    assert [i.split(" ")[0] for i in ids] == ["cut-1", "junk-1"]
    assert json.load(open(tmp_path / "synthetic" / "meta.json"))["skipped"] == meta["skipped"]
    with pytest.raises(UserError, match="no decodable images"):
        images.write_dataset("bad", iter([images.Record("x", b"zz", "x")]), str(tmp_path), {"licence": "CC0"},
                             **QUIET)


def test_no_partial_shard_when_writing_fails(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    real = pq.write_table
    calls = []

    def failing(table, where, *a, **k):
        calls.append(where)
        if len(calls) == 2:  # the second shard: half a file on disk, then the process "dies"
            with open(where, "wb") as f:
                f.write(b"PAR1 partial")
            raise OSError(28, "No space left on device")
        return real(table, where, *a, **k)

    monkeypatch.setattr(pq, "write_table", failing)
    recs = iter([images.Record(f"r{i}", png(np.full((4, 4), i)), f"square {i}.") for i in range(10)])
    with pytest.raises(OSError, match="No space left"):
        images.write_dataset("squares", recs, str(tmp_path), {"licence": "CC0"}, shard_size=3, **QUIET)
    left = sorted(os.listdir(tmp_path / "squares"))
    assert "meta.json" not in left and not [f for f in left if ".tmp" in f], left
    for f in left:  # whatever has a final name is a complete parquet file
        assert len(pq.read_table(tmp_path / "squares" / f)) == 3
    with pytest.raises(UserError, match="no meta.json"):
        images.read_rows(str(tmp_path / "squares"))


def test_inspect_and_cli(fetched, tmp_path):
    import subprocess
    import sys

    from test_train import ROOT, env

    text = images.inspect(str(fetched), str(tmp_path / "sheet.png"), per_source=3)
    assert "mnist: 200 images" in text and "28x28" in text and (tmp_path / "sheet.png").stat().st_size > 1000
    r = subprocess.run([sys.executable, "-m", "data_tools.images", "fetch", "--name", "nope", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 2 and "unknown image source 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_cifar10_from_bigbench_hex(tmp_path):
    """BIG-bench's cifar10_classification/hex format: 1,024 `#rrggbb` pixels (a newline after each row of 32),
    target_scores as a Python dict literal; a malformed example is skipped and reported by id."""
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    text = "".join("".join(f"#{r:02x}{g:02x}{b:02x}" for r, g, b in row) + "\n" for row in pix)
    scores = {c: int(c == "cat") for c in images.CIFAR_CLASSES}
    task = {"examples": [{"input": text, "target_scores": str(scores)},
                         {"input": text[:-200], "target_scores": str(scores)}]}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    skipped: dict = {}
    recs = list(images.read_cifar10(str(path), 0, skipped))
    assert len(recs) == 1 and recs[0].label == images.CIFAR_CLASSES.index("cat") and "a cat" in recs[0].caption
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(recs[0].image))), pix)
    assert list(skipped) == ["bad example"] and skipped["bad example"][0].startswith("test-00001")
