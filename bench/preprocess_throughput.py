"""Preprocessing throughput and memory on real text: our tool (N workers) vs Megatron-style baselines.

    python -m bench.preprocess_throughput [--mb 100 400] [--workers 2]

Input: the fetched corpora (Shakespeare, State of the Union, Moby-Dick) repeated into jsonl files of the given
sizes. Baselines, in the same run:
- "per-line": what Megatron's tools/preprocess_data.py does per worker: per line `json.loads`, SentencePiece
  `EncodeAsIds` (a Python list), append the end of document, `IndexedDatasetBuilder.add_document`, one process;
- "megatron-core tokenizer": the same loop through megatron-core's own tokenizer classes
  (`megatron.core.tokenizers` SentencePieceTokenizer / HuggingFaceTokenizer `text_to_ids`, the classes its tools
  wrap). Megatron-LM's tools/preprocess_data.py itself is not in the megatron-core package and cannot be fetched
  offline, so this is the closest runnable stand-in; with the Hugging Face tokenizer as well.
Machines are shared, so each row also gives tokens per CPU-second (user + system time of the process and its
workers) beside wall time. Each configuration runs in a fresh subprocess; peak RSS is getrusage's.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

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


CPU = r"""
def cpu_seconds():
    import resource
    return sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for a in ("ru_utime", "ru_stime"))
"""

# Megatron's Encoder.encode loop (one document per line, no sentence splitting, the end of document appended to
# non-empty documents, IndexedDatasetBuilder.add_document), tokenizing with: "raw" sentencepiece EncodeAsIds (the
# per-line baseline), or megatron-core's own tokenizer classes ("spm", "hf")
LOOP = CPU + r"""
import json, sys, time, resource, warnings
warnings.simplefilter("ignore")
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, DType
inp, kind, model, prefix, eod = sys.argv[1:6]
if kind == "raw":
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    encode, vocab = sp.EncodeAsIds, sp.GetPieceSize()
else:
    if kind == "spm":
        from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import SentencePieceTokenizer as T
    else:
        from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer as T
    tok = T(model)
    encode, vocab = tok.text_to_ids, tok.vocab_size
eod = int(eod)
b = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab))
t0 = time.perf_counter(); c0 = cpu_seconds(); n = 0
with open(inp, encoding="utf-8") as f:
    for line in f:
        ids = encode(json.loads(line)["text"])
        if ids:
            ids.append(eod)
        b.add_document(ids, [len(ids)] if ids else [])
        n += len(ids)
b.finalize(prefix + ".idx")
dt = time.perf_counter() - t0
print(json.dumps({"tokens": n, "seconds": dt, "cpu": cpu_seconds() - c0,
                  "rss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


OURS = CPU + r"""
import json, sys
from data_tools.preprocess import preprocess
inp, model, prefix, workers = sys.argv[1:5]
c0 = cpu_seconds()
s = preprocess([inp], prefix, model, workers=int(workers), append_eod=True, progress=False, log=lambda *a, **k: None)
print(json.dumps({"tokens": sum(s.tokens.values()), "seconds": s.seconds, "cpu": cpu_seconds() - c0,
                  "rss_main": s.peak_rss_mb["main"], "rss_worker": s.peak_rss_mb.get("largest worker", 0)}))
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
    from data_tools.tokenizer import load_tokenizer

    eod = load_tokenizer(model).eod
    base_u = run(LOOP, unique, "raw", model, os.path.join(args.work, "base_unique"), eod)
    rows += [(f"ours, {args.workers} workers (unique text)", umb, ours_u),
             ("per-line baseline (unique text)", umb, base_u)]
    mcore_u = run(LOOP, unique, "spm", model, os.path.join(args.work, "mcore_unique"), eod)
    rows.append(("megatron-core tokenizer (unique text)", umb, mcore_u))
    same_mcore = all(open(os.path.join(args.work, "mcore_unique") + ext, "rb").read()
                     == open(os.path.join(args.work, "ours_unique_text_document") + ext, "rb").read()
                     for ext in (".bin", ".idx"))
    # a Hugging Face tokenizer.json (the fixture's byte-level BPE), ours vs megatron-core's HuggingFaceTokenizer
    hf = os.path.join(ROOT, "tests", "fixtures", "megatron_preprocess", "hf_bpe3k")
    ours_hf = run(OURS, unique, hf, os.path.join(args.work, "ours_hf"), args.workers)
    mcore_hf = run(LOOP, unique, "hf", hf, os.path.join(args.work, "mcore_hf"), load_tokenizer(hf).eod)
    rows += [(f"ours HF tokenizer, {args.workers} workers (unique)", umb, ours_hf),
             ("megatron-core HF tokenizer (unique text)", umb, mcore_hf)]
    same_hf = all(open(os.path.join(args.work, "mcore_hf") + ext, "rb").read()
                  == open(os.path.join(args.work, "ours_hf_text_document") + ext, "rb").read()
                  for ext in (".bin", ".idx"))
    print(f"outputs byte-identical to the megatron-core-tokenizer loop's: SentencePiece {same_mcore}, "
          f"Hugging Face {same_hf}")
    for i, mb in enumerate(args.mb):
        inp = make_input(raw, os.path.join(args.work, f"input_{mb}mb.jsonl"), mb)
        ours = run(OURS, inp, model, os.path.join(args.work, f"ours_{mb}"), args.workers)
        rows.append((f"ours, {args.workers} workers", mb, ours))
        if i == 0:
            base = run(LOOP, inp, "raw", model, os.path.join(args.work, f"base_{mb}"), eod)
            rows.append(("per-line baseline (Megatron-style, 1 process)", mb, base))
            speedup = base["seconds"] / ours["seconds"]
            assert base["tokens"] == ours["tokens"], (base["tokens"], ours["tokens"])
            same = all(open(os.path.join(args.work, f"{w}_{mb}_text_document" if w == "ours" else f"base_{mb}") + ext,
                            "rb").read() == open(os.path.join(args.work, f"base_{mb}") + ext, "rb").read()
                       for w in ("ours",) for ext in (".bin", ".idx"))
            print(f"outputs byte-identical to the baseline's: {same}")
    print(f"\n{'configuration':46s} {'input MB':>8s} {'tokens/s':>11s} {'tokens/CPU-s':>13s} {'MB/s':>6s} "
          f"{'peak RSS main':>14s} {'peak RSS worker':>16s}")
    for name, mb, r in rows:
        print(f"{name:46s} {mb:8.0f} {r['tokens'] / r['seconds']:11,.0f} {r['tokens'] / max(r['cpu'], 1e-9):13,.0f} "
              f"{mb / r['seconds']:6.1f} {r['rss_main']:11,.0f} MB {r.get('rss_worker', 0):13,.0f} MB")
    print(f"\nspeed-up vs per-line baseline: {base_u['seconds'] / ours_u['seconds']:.2f}x wall, "
          f"{ours_u['tokens'] / ours_u['cpu'] / (base_u['tokens'] / base_u['cpu']):.2f}x per CPU-second on unique "
          f"text ({umb:.0f} MB); {speedup:.2f}x wall at {args.mb[0]} MB (corpora repeated)")
    print(f"vs megatron-core tokenizer loop: SentencePiece {mcore_u['seconds'] / ours_u['seconds']:.2f}x wall, "
          f"{ours_u['tokens'] / ours_u['cpu'] / (mcore_u['tokens'] / mcore_u['cpu']):.2f}x per CPU-second; "
          f"Hugging Face {mcore_hf['seconds'] / ours_hf['seconds']:.2f}x wall, "
          f"{ours_hf['tokens'] / ours_hf['cpu'] / (mcore_hf['tokens'] / mcore_hf['cpu']):.2f}x per CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
