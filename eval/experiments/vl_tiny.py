"""The tiny vision-language MetaLM end to end, over training seeds: data -> mixed image-text/text pretraining ->
zero-shot captioning (CIDEr-D) and VQA-style classification zero/few-shot -> finetuned classification.

    python -m eval.experiments.vl_tiny --work work/vl            # about 12 minutes per seed on 2 cores
    make vl

Protocol:
- Data: the demo's text corpus and tokenizer (`data_tools.demo`, shared with `make demo` under work/demo), the image
  sources of `data_tools.images fetch --name all` (Tux Paint stamps, Fashion-MNIST, MNIST).
- Pretraining (configs/tiny-vl.yaml, one process): half of every micro-batch image-text rows (Tux Paint and
  Fashion-MNIST as captions, MNIST in the VQA format with its digits' names as answers), half text; one run per seed.
- Zero-shot: captioning of the held-out Tux Paint test images with the paper's prompt and without one (CIDEr-D);
  Fashion-MNIST VQA-style classification (`question: what is this? answer:` over its 10 class names) with 0, 1, 2
  and 4 image demonstrations from its train split. Fashion-MNIST never appears in the VQA format in pretraining.
- Finetuned: each pretrained model trained further on Fashion-MNIST train images in the VQA format (answer tokens
  counted, images only), then scored 0-shot on the same test items.
Writes WORK/report/vl.json (every number), vl.md (mean ± sd over seeds) and vl.png. Every stage is cached.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from eval.experiments.sclm_vs_causal import ROOT, fmt, log, mean_sd, run


def finished(run_dir: str, steps: int) -> bool:
    return os.path.isfile(os.path.join(run_dir, "checkpoints", f"step_{steps:08d}", "COMPLETE"))


def train(run_dir: str, overrides: list[str], log_path: str, steps: int) -> None:
    if finished(run_dir, steps):
        return
    run([sys.executable, "-m", "pretrain.train", "--config", os.path.join(ROOT, "configs", "tiny-vl.yaml"),
         f"run_dir={run_dir}", f"schedule.train_steps={steps}", "logging.progress_bar=false",
         "logging.tensorboard=false", *overrides], log_path)


def evaluate(model: str, out: str, name: str, args: list[str], log_path: str) -> dict:
    path = os.path.join(out, f"{name}.json")
    if not os.path.isfile(path):
        run([sys.executable, "-m", "eval.vl", "--model", model, "--out", out, "--name", name, *args], log_path)
    with open(path) as f:
        return json.load(f)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.experiments.vl_tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work/vl")
    p.add_argument("--demo-work", default="work/demo", help="the text corpus and tokenizer (data_tools.demo)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--ft-steps", type=int, default=300)
    p.add_argument("--vqa-items", type=int, default=200)
    p.add_argument("--shots", default="0,1,2,4")
    args = p.parse_args(argv)
    work, demo = os.path.abspath(args.work), os.path.abspath(args.demo_work)
    t0 = time.perf_counter()
    log("data: text corpus + tokenizer (data_tools.demo), images (data_tools.images)")
    if not os.path.isfile(os.path.join(demo, "data", "corpus_text_document.idx")):
        run([sys.executable, "-m", "data_tools.demo", "--work", demo, "--seq-length", "512", "--samples", "0"],
            os.path.join(work, "logs", "data.log"))
    images = os.path.join(work, "images")
    run([sys.executable, "-m", "data_tools.images", "fetch", "--name", "all", "--out", images],
        os.path.join(work, "logs", "images.log"))
    data = [f"data.tokenizer_model={demo}/tokenizer/spm.model", f"data.data_path=[{demo}/data/corpus_text_document]",
            f"data.image_path=[1, {images}/tuxpaint, 2, {images}/fashion_mnist, 1, {images}/mnist]"]
    ev = os.path.join(work, "eval")
    records = {"pretrained": [], "finetuned": []}
    for s in range(args.seeds):
        seed = 1234 + s
        run_dir = os.path.join(work, "runs", f"tiny-vl-seed{seed}")
        log(f"seed {seed}: pretraining {args.steps} steps -> {run_dir}")
        train(run_dir, [*data, f"seed={seed}"], os.path.join(work, "logs", f"pretrain-{seed}.log"), args.steps)
        log(f"seed {seed}: zero/few-shot evaluation")
        r = evaluate(run_dir, ev, f"pretrained-seed{seed}", ["--images", images, "--shots", args.shots, "--seeds",
                                                            "1", "--vqa-items", str(args.vqa_items)],
                     os.path.join(work, "logs", f"eval-{seed}.log"))
        records["pretrained"].append(r)
        ft_dir = os.path.join(work, "runs", f"tiny-vl-ft-seed{seed}")
        log(f"seed {seed}: finetuning on Fashion-MNIST VQA ({args.ft_steps} steps) -> {ft_dir}")
        train(ft_dir, [*data, f"seed={seed}", f"checkpoint.init_from={run_dir}",
                       f"data.image_path=[{images}/fashion_mnist]", "data.image_task=[vqa]", "data.image_fraction=1.0",
                       "schedule.warmup_steps=20", f"logging.eval_interval={args.ft_steps}",
                       f"checkpoint.save_interval={args.ft_steps}"],
              os.path.join(work, "logs", f"finetune-{seed}.log"), args.ft_steps)
        r = evaluate(ft_dir, ev, f"finetuned-seed{seed}", ["--images", images, "--tasks", "vqa", "--shots", "0",
                                                          "--seeds", "1", "--vqa-items", str(args.vqa_items)],
                     os.path.join(work, "logs", f"eval-ft-{seed}.log"))
        records["finetuned"].append(r)
    out = {"date": time.strftime("%Y-%m-%d"), "command": "python -m eval.experiments.vl_tiny "
           + " ".join(argv if argv is not None else sys.argv[1:]), "seeds": [1234 + s for s in range(args.seeds)],
           "steps": args.steps, "ft_steps": args.ft_steps, "table": table(records), "records": records}
    res = os.path.join(work, "report")
    os.makedirs(res, exist_ok=True)
    with open(os.path.join(res, "vl.json"), "w") as f:
        json.dump(out, f, indent=1)
    md = markdown(out)
    with open(os.path.join(res, "vl.md"), "w") as f:
        f.write(md)
    plot(out, os.path.join(res, "vl.png"))
    print(md)
    log(f"wrote {res}/vl.json, vl.md, vl.png (this invocation: {(time.perf_counter() - t0) / 60:.1f} min; cached "
        "stages are not rerun)")
    return 0


def table(records: dict) -> list[dict]:
    """Rows of mean ± sd over training seeds."""
    rows = []
    for prompt in ("paper prompt", "no prompt"):
        xs = [r["cider"] for rep in records["pretrained"] for r in rep["records"]
              if r["task"] == "captioning" and r["prompt"] == prompt]
        if xs:
            rows.append({"what": f"captioning CIDEr-D, Tux Paint test ({prompt})", "metric": "cider",
                         "value": mean_sd(xs), "n": len(xs)})
    for kind in ("pretrained", "finetuned"):
        shots = sorted({r["shots"] for rep in records[kind] for r in rep["summary"]})
        for k in shots:
            for metric in ("acc", "acc_norm", "acc_calibrated"):
                xs = [r[metric] for rep in records[kind] for r in rep["summary"] if r["shots"] == k]
                rows.append({"what": f"Fashion-MNIST VQA, {kind}, {k}-shot", "metric": metric, "shots": k,
                             "kind": kind, "value": mean_sd(xs), "n": len(xs),
                             "chance": records[kind][0]["summary"][0]["chance"]})
    return rows


def markdown(out: dict) -> str:
    lines = [f"Tiny VL MetaLM ({out['steps']} pretraining steps, {out['ft_steps']} finetuning steps), mean ± sd over "
             f"{len(out['seeds'])} training seeds {out['seeds']}; {out['date']}, `{out['command']}`", "",
             "| measurement | metric | value | chance |", "|---|---|---|---|"]
    for r in out["table"]:
        lines.append(f"| {r['what']} | {r['metric']} | {fmt(tuple(r['value']))} | "
                     f"{r['chance']:.3f} |" if "chance" in r else f"| {r['what']} | {r['metric']} | "
                     f"{fmt(tuple(r['value']))} | — |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for metric, style in (("acc", "-o"), ("acc_calibrated", "--s")):
        rs = [r for r in out["table"] if r.get("kind") == "pretrained" and r["metric"] == metric]
        ax.errorbar([r["shots"] for r in rs], [r["value"][0] for r in rs], yerr=[r["value"][1] for r in rs],
                    fmt=style, capsize=3, label=f"pretrained, {metric}")
    ft = [r for r in out["table"] if r.get("kind") == "finetuned" and r["metric"] == "acc"]
    if ft:
        ax.errorbar([0], [ft[0]["value"][0]], yerr=[ft[0]["value"][1]], fmt="*", ms=12, capsize=3,
                    label="finetuned (VQA format), acc")
        ax.axhline(ft[0]["chance"], color="grey", ls=":", label="chance")
    cider = [r for r in out["table"] if r["metric"] == "cider"]
    ax.set_title("Fashion-MNIST VQA-style classification (tiny VL MetaLM)\n"
                 + "; ".join(f"CIDEr-D {r['what'].split('(')[-1][:-1]}: {fmt(tuple(r['value']))}" for r in cider),
                 fontsize=8)
    ax.set_xticks(sorted({r["shots"] for r in out["table"] if "shots" in r}))
    ax.set_xlabel("image demonstrations (shots)")
    ax.set_ylabel(f"accuracy, mean ± sd over {len(out['seeds'])} seeds")
    ax.legend(fontsize=7)
    from data_tools.durable import save_figure

    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
