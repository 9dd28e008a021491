"""Vision-language data and training throughput on CPU, side by side in one run.

    python -m bench.vl_throughput [--images work/vl/images] [--batches 60] [--steps 30]

1. Loader: images/s of image-text micro-batches (decode PNG, RGB, bicubic resize to 224x224, normalise, build the
   rows, collate) from the fetched parquet shards (Tux Paint stamps, mostly 320-400 px, and Fashion-MNIST 28 px,
   blended 1:1), with the micro-batches built in the training process (workers 0) and in 2 DataLoader workers.
2. Training: tokens/s of forward + backward + AdamW on the `tiny-vl` preset with half of each micro-batch image-text
   rows (16 slots per 32x32 image) vs the same decoder trained on text only (vision encoder removed), same
   batch shape (tokens/s counts every decoder position of the batch in both rows).
Fetches Tux Paint and Fashion-MNIST into --images first if they are not there (`data_tools.images fetch`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch


def loader_rows(images_dir: str, work: str, batches: int, micro_batch: int, size: int) -> list[tuple[str, float]]:
    from bench.common import corpora_and_tokenizer
    from data_tools.datasets import MicroBatches
    from data_tools.image_text import ImageSampleConfig, ImageTextDataset
    from data_tools.tokenizer import load_tokenizer

    tok = load_tokenizer(corpora_and_tokenizer(work)[1])
    cfg = ImageSampleConfig(seq_length=320, image_size=size, slots=196, patches=196, seed=0)
    ds = ImageTextDataset([os.path.join(images_dir, "tuxpaint"), os.path.join(images_dir, "fashion_mnist")],
                          [1.0, 1.0], "train", cfg, tok, batches * micro_batch)
    out = []
    for workers in (0, 2):
        it = iter(MicroBatches(ds, micro_batch, workers=workers))
        next(it)  # start-up (worker processes) not timed
        t0 = time.perf_counter()
        n = sum(b["images"].shape[0] for _, b in zip(range(batches - 1), it))
        out.append((f"loader, {size}x{size}, workers {workers}", n / (time.perf_counter() - t0)))
    return out


def train_rows(steps: int, micro_batch: int, seq: int) -> list[tuple[str, float]]:
    from data_tools.vl_samples import Pair, VLIds, build_vl_row, collate_vl
    from pretrain.config import preset
    from pretrain.model.metalm import MetaLM
    from data_tools.objective import SampleConfig, build_sample, collate
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    rng = np.random.default_rng(0)
    vl_cfg = preset("tiny-vl")
    ids = VLIds(bos=1, eos=2, pad=0, image=5, image_end=6)
    text = [build_sample(rng.integers(7, 8000, seq + 1), np.zeros(seq + 1, np.int32), i,
                         SampleConfig(seq_length=seq, mode="gpt")) for i in range(micro_batch)]
    half = micro_batch // 2
    img_rows = [dict(build_vl_row([Pair(rng.integers(7, 8000, 12).tolist())], vl_cfg.image_slots(), seq, ids),
                     images=rng.standard_normal((1, 3, 32, 32)).astype(np.float32)) for _ in range(half)]
    batches = {"VL (tiny-vl, half the rows image-text)": collate_vl(img_rows + text[half:]),
               "text only (same decoder, no vision encoder)": collate(text)}
    out = []
    for name, batch in batches.items():
        torch.manual_seed(0)
        cfg = vl_cfg if name.startswith("VL") else preset("tiny-vl", vision=None)
        model = MetaLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = model(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        out.append((f"train step, {name}", steps * micro_batch * seq / (time.perf_counter() - t0)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vl_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="work/vl/images")
    p.add_argument("--work", default="work/bench", help="the benchmarks' corpora and tokenizer (made once)")
    p.add_argument("--batches", type=int, default=60, help="loader micro-batches per row (the first is not timed)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    from data_tools.images import fetch

    for name in ("tuxpaint", "fashion_mnist"):  # fetched once (cached afterwards)
        fetch(name, args.images, log=lambda *a: None)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    load = loader_rows(args.images, args.work, args.batches, args.micro_batch, 224)
    train = train_rows(args.steps, 8, 128)
    print("| row | images/s or tokens/s | vs baseline |\n|---|---|---|")
    for rows in (load, train):
        base = rows[0][1] if rows is load else rows[1][1]
        for name, v in rows:
            print(f"| {name} | {v:,.0f} | {v / base:.2f}x |")
    print(f"\n({os.cpu_count()} CPUs; loader baseline: workers 0; training baseline: text only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
