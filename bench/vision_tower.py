"""An imported vision tower's two costs on CPU, each side by side with transformers in one run.

    python -m bench.vision_tower [--images work/bench/images] [--n 96] [--batch 8] [--repeats 3]

1. Preprocessing at 224x224 (CLIP's recipe: RGB over white, bicubic shortest-edge resize, centre crop, rescale,
   normalise) of real images (Tux Paint stamps, mostly 320-400 px, and Fashion-MNIST 28 px, 1:1): ours
   (data_tools/vl_samples.Preprocessor, Pillow + numpy, from the encoded bytes) vs transformers' CLIPImageProcessor
   (its PIL backend: torchvision is not installed), also from the bytes, one image per call as a loader does; in the
   main process (workers 0) and in 2 worker processes (a multiprocessing pool of 2, the same for both). Outputs are
   checked equal within 1e-5 first.
2. Forward of a CLIP ViT-B/16-shaped tower narrowed to width 384 (12 layers, 6 heads, 224x224, 197 tokens; random
   weights: none are reachable), imported into our vision encoder (megatron-core layers, fused QKV, SDPA) vs
   transformers' CLIPVisionModel (SDPA) on the same batch, one thread, best of interleaved repeats; outputs checked
   equal within 1e-4.
Targets: ours >= transformers in both (>= 1.0x).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from bench.common import ROOT

_PROC = {}


def _init(kind: str, cfg: dict):
    if kind == "ours":
        from data_tools.vl_samples import Preprocessor

        _PROC["f"] = Preprocessor(cfg)
    else:
        import io

        import transformers
        from PIL import Image

        proc = transformers.CLIPImageProcessor()

        def f(data):
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return proc(images=im, return_tensors="np")["pixel_values"][0]

        _PROC["f"] = f


def _run(data: bytes) -> np.ndarray:
    return _PROC["f"](data)


def preprocessing(images: list[bytes], cfg: dict) -> list[tuple[str, float]]:
    import multiprocessing as mp

    out = []
    _init("ours", cfg)
    ours = [_run(b) for b in images[:8]]
    _init("hf", cfg)
    theirs = [_run(b) for b in images[:8]]
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5, "preprocessing differs from transformers'"
    for workers in (0, 2):
        for kind, name in (("hf", "transformers CLIPImageProcessor (PIL)"), ("ours", "ours, Preprocessor")):
            t0 = time.perf_counter()
            if workers:
                with mp.get_context("fork").Pool(workers, initializer=_init, initargs=(kind, cfg)) as pool:
                    t0 = time.perf_counter()  # the pool's start-up not timed
                    pool.map(_run, images, chunksize=4)
                    dt = time.perf_counter() - t0
            else:
                _init(kind, cfg)
                for b in images:
                    _run(b)
                dt = time.perf_counter() - t0
            out.append((f"{name}, workers {workers}", len(images) / dt))
    return out


def forward(batch: int, repeats: int) -> list[tuple[str, float]]:
    import torch
    import transformers

    from pretrain.hf_vision import load_hf_tower
    from pretrain.model import masks
    from pretrain.model.attention import AttentionMask
    from pretrain.model.encoders import VisionEncoder
    from pretrain.parallel import init_distributed, init_model_parallel

    torch.manual_seed(0)
    hc = transformers.CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                       num_attention_heads=6, image_size=224, patch_size=16)
    hc._attn_implementation = "sdpa"
    hf = transformers.CLIPVisionModel(hc).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        transformers.CLIPImageProcessor().save_pretrained(d)
        v, sd = load_hf_tower(d)
    init_distributed("gloo")
    init_model_parallel(1, 1)
    ours = VisionEncoder(v, 0.02)
    ours.load_state_dict({k[len("vision."):]: t for k, t in sd.items()}, strict=False)
    ours.eval()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    mask = AttentionMask.build(masks.full, batch, v.tokens, None, x.device, "sdpa")
    runs = {"transformers CLIPVisionModel (sdpa)": lambda: hf(x).last_hidden_state,
            "ours, imported": lambda: ours(x, mask)}
    with torch.no_grad():
        a, b = (f() for f in runs.values())
        assert (a - b).abs().max().item() < 1e-4, "the imported tower differs from transformers'"
        best = {k: float("inf") for k in runs}
        for _ in range(repeats):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t0)
    return [(k, batch / t) for k, t in best.items()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=os.path.join(ROOT, "work", "bench", "images"))
    p.add_argument("--n", type=int, default=96, help="images per preprocessing row")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    from data_tools import images as image_data
    from data_tools.vl_samples import preprocessor_config

    rows = []
    for name in ("tuxpaint", "fashion_mnist"):
        d = image_data.fetch(name, args.images, limit=200, log=lambda *a: None)
        rows.append([r["image"] for r in image_data.read_rows(d, "train", ("image",))[:args.n // 2]])
    data = [b for pair in zip(*rows) for b in pair]
    cfg = preprocessor_config(transformers.CLIPImageProcessor().to_dict(), "CLIPImageProcessor defaults")
    pre = preprocessing(data, cfg)
    fwd = forward(args.batch, args.repeats)
    print(f"\npreprocessing: {len(data)} real images (Tux Paint stamps and Fashion-MNIST, 1:1) -> 3x224x224, "
          "from the encoded bytes; outputs equal within 1e-5")
    print(f"{'preprocessing':48s} {'images/s':>10s} {'vs transformers':>16s}")
    for i, (name, r) in enumerate(pre):
        print(f"{name:48s} {r:10,.1f} {r / pre[i - i % 2][1]:15.2f}x")
    print(f"\nforward: CLIP ViT-B/16 shape at width 384 (12 layers, 197 tokens), batch {args.batch}, 1 thread, best "
          f"of {args.repeats} interleaved; outputs equal within 1e-4")
    print(f"{'tower':48s} {'images/s':>10s} {'vs transformers':>16s}")
    for name, r in fwd:
        print(f"{name:48s} {r:10,.2f} {r / fwd[0][1]:15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
