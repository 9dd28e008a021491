"""Vision-language evaluation of a MetaLM with a vision encoder, with the paper's prompts (METHOD.md §4).

    python -m eval.vl --model work/vl/runs/tiny-vl --images work/vl/images --out work/vl/eval [--shots 0,1,2,4]

- Captioning (zero-shot): each held-out image of `--caption-source` (Tux Paint's test split) in
  `<s> <image> [slots] </image> Summarize this image:`, greedy continuation (KV cache) up to `--max-new-tokens` or
  `</s>`; also without the prompt (the training format: the caption right after `</image>`). Scored with CIDEr-D,
  pycocoevalcap's `Cider` (n=4, sigma=6), on captions lower-cased with punctuation removed (what COCO's PTB
  tokenizer does; its Java is not used), one reference per image; document frequencies from the evaluated
  references, as in COCO's evaluation.
- VQA-style classification (`--vqa-source`, Fashion-MNIST's test split): each class name scored after
  `question: what is this? answer:`; with k shots, k demonstrations `<image> question: what is this? answer:
  <its class>` from the train split (validation for the evaluation-only `cifar10`) precede the query image (k <= 4,
  seeded per item). `--vqa-source cifar10` (`data_tools.images fetch --name cifar10`) scores CIFAR-10 the same way. acc = highest summed
  log-probability of the answer tokens, acc_norm = highest per answer character (lm-eval's definitions); chance is
  1/classes. acc_calibrated subtracts each answer's log-probability given a blank query image (contextual
  calibration with a content-free input, Zhao et al. 2021): the class prior the decoder learned from text is
  removed, what the image adds remains. Each seed draws its own items and demonstrations; reports give mean ± sd
  over seeds.
Reports: NAME.json (every record and caption), NAME.md, NAME.png (accuracy by shots with the spread, chance line).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Sequence

import numpy as np
import torch

from data_tools.image_text import CAPTION_PROMPT, VQA_PROMPT
from data_tools.vl_samples import Pair, VLIds, build_vl_row, collate_vl, image_loader

# COCO's PTBTokenizer drops these tokens after tokenising
_PUNCT = re.compile(r"[.,?!:;\-'`\"()\[\]{}]+")


def coco_tokens(text: str) -> str:
    """Lower-case, punctuation removed, whitespace-normalised: the form COCO's caption evaluation scores."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def cider(references: Sequence[str], candidates: Sequence[str]) -> tuple[float, list[float]]:
    """Corpus CIDEr-D (pycocoevalcap) and the per-image scores; one reference per image."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [coco_tokens(r)] for i, r in enumerate(references)}
    res = {i: [coco_tokens(c)] for i, c in enumerate(candidates)}
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


class VLModel:
    """A loaded model with what building its rows needs."""

    def __init__(self, model, cfg, tok):
        m = cfg.model
        if m.vision is None:
            raise ValueError("this model has no vision encoder (train one with configs/tiny-vl.yaml)")
        self.model, self.cfg, self.tok = model, cfg, tok
        self.ids = VLIds.of(tok)
        self.slots, self.patches, self.size = m.image_slots(), m.vision.patches, m.vision.image_size
        self.prefix = m.vision.caption_prefix
        self.load = image_loader(m.vision)  # an imported tower's own preprocessing, or ours

    def row(self, pairs: list[Pair], T: int) -> dict:
        return build_vl_row(pairs, self.slots, T, self.ids, self.prefix, self.patches)

    def length(self, pairs: list[Pair]) -> int:
        return 1 + sum(2 + self.slots + len(p.caption) for p in pairs)  # <s>, markers, slots, text (no </s>)


@torch.no_grad()
def caption_images(vm: VLModel, images: list[bytes], prompt: str, max_new_tokens: int = 20,
                   batch_size: int = 16) -> list[str]:
    """Greedy captions after `<s> <image> [slots] </image> prompt` (KV-cached decoding)."""
    from eval.inference import decode_step, inference_mode, model_device, new_cache, step_mask

    model, tok = vm.model, vm.tok
    dev = model_device(model)
    p_ids = tok.encode(prompt) if prompt else []
    n = vm.length([Pair(p_ids)])
    stop = {tok.ids.eos, tok.ids.eod}
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        rows = [dict(vm.row([Pair(p_ids, counted_from=len(p_ids))], n), images=vm.load(im)[None])
                for im in chunk]
        batch = {k: v.to(dev) for k, v in collate_vl(rows).items()}
        B = len(chunk)
        valid = torch.ones(B, n + max_new_tokens, dtype=torch.bool, device=dev)
        ids: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        with inference_mode(model):
            cache = new_cache(model, B, n + max_new_tokens)
            logits = decode_step(model, batch, step_mask(valid, 0, n), cache, last_only=True)[:, -1]
            pos = batch["position_ids"][:, -1:]
            for t in range(max_new_tokens):
                logits[:, tok.vocab_size:] = float("-inf")
                nxt = logits.argmax(-1)
                for b in range(B):
                    if not done[b]:
                        if int(nxt[b]) in stop:
                            done[b] = True
                        else:
                            ids[b].append(int(nxt[b]))
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                pos = pos + 1
                step = {"tokens": nxt[:, None], "position_ids": pos}
                logits = decode_step(model, step, step_mask(valid, n + t, 1), cache)[:, -1]
        out += [tok.decode(x).strip() for x in ids]
    return out


def vqa_pairs(vm: VLModel, demos: list[str], classes: list[str]) -> list[list[Pair]]:
    """One pair list per class: k demonstrations (their class names; nothing counted), then the query with that
    class as the answer (only the answer counted)."""
    tok = vm.tok
    prompt = tok.encode(VQA_PROMPT)
    demo_ids = [prompt + tok.encode(" " + c) for c in demos]
    demo_pairs = [Pair(d, counted_from=len(d)) for d in demo_ids]
    return [demo_pairs + [Pair(prompt + tok.encode(" " + c), counted_from=len(prompt))] for c in classes]


def vqa_rows(vm: VLModel, groups: list[tuple[list[list[Pair]], np.ndarray]]) -> list[dict]:
    """Rows of one batch (one length T for all): per item, its class rows with the item's images."""
    T = max(vm.length(p) for pairs, _ in groups for p in pairs)
    if T > vm.cfg.model.max_seq_length:
        raise ValueError(f"the demonstrations need {T} positions, more than the model's max_seq_length "
                         f"{vm.cfg.model.max_seq_length}")
    rows = []
    for pairs, imgs in groups:
        for p in pairs:
            r = vm.row(p, T)
            r["loss_mask"][vm.length(p) - 1] = 0.0  # the `</s>` after the answer is not part of it
            r["images"] = imgs
            rows.append(r)
    return rows


def answer_logprobs(vm: VLModel, groups, n_classes: int) -> np.ndarray:
    """Summed log-probability of each class's answer tokens [items, classes]."""
    from eval.inference import target_logprobs

    batch = collate_vl(vqa_rows(vm, groups))
    return (target_logprobs(vm.model, batch) * batch["loss_mask"]).sum(1).view(-1, n_classes).double().numpy()


@torch.no_grad()
def vqa(vm: VLModel, test, train, items: list[int], shots: int, seed: int, batch_items: int = 4) -> dict:
    """Accuracy over `items` (row indices of `test`, an image_text.ImageSource) with `shots` demonstrations."""
    classes = test.classes
    chars = np.array([len(" " + c) for c in classes], dtype=np.float64)
    pred, pred_norm, pred_cal, gold = [], [], [], []
    blank = np.zeros((3, vm.size, vm.size), dtype=np.float32)  # the mean image after normalisation
    for start in range(0, len(items), batch_items):
        groups = []
        for i in items[start:start + batch_items]:
            rng = np.random.default_rng([seed, i])
            d = rng.choice(len(train), size=shots, replace=False).tolist() if shots else []
            imgs = np.stack([vm.load(b) for b in [train.images[j] for j in d] + [test.images[i]]])
            groups.append((vqa_pairs(vm, [train.answer(j) for j in d], classes), imgs))
            gold.append(int(test.labels[i]))
        lp = answer_logprobs(vm, groups, len(classes))
        # calibrated: minus the same answer's log-probability with a blank query image (content-free input)
        lp0 = answer_logprobs(vm, [(pairs, np.concatenate([imgs[:-1], blank[None]])) for pairs, imgs in groups],
                              len(classes))
        pred += lp.argmax(1).tolist()
        pred_norm += (lp / chars).argmax(1).tolist()
        pred_cal += (lp - lp0).argmax(1).tolist()
    gold_a = np.array(gold)
    return {"acc": float(np.mean(np.array(pred) == gold_a)), "acc_norm": float(np.mean(np.array(pred_norm) == gold_a)),
            "acc_calibrated": float(np.mean(np.array(pred_cal) == gold_a)),
            "n": len(items), "chance": 1.0 / len(classes),
            "predicted_classes": int(len(set(pred)))}


def evaluate(vm: VLModel, images_dir: str, tasks: Sequence[str], shots: Sequence[int], seeds: int,
             caption_source: str, vqa_source: str, caption_items: int, vqa_items: int, max_new_tokens: int,
             meta: dict, log=print) -> list[dict]:
    from data_tools.image_text import ImageSource

    records = []
    if "captioning" in tasks:
        src = ImageSource(os.path.join(images_dir, caption_source), "test")
        idx = list(range(len(src)))[:caption_items or None]
        refs = [src.captions[i] for i in idx]
        for name, prompt in (("paper prompt", CAPTION_PROMPT), ("no prompt", "")):
            caps = caption_images(vm, [src.images[i] for i in idx], prompt, max_new_tokens)
            score, per = cider(refs, caps)
            records.append(dict(meta, task="captioning", source=caption_source, prompt=name, n=len(idx),
                                cider=score, examples=[{"id": src.ids[i], "reference": r, "caption": c, "cider": s}
                                                       for i, r, c, s in zip(idx, refs, caps, per)]))
            log(f"captioning ({name}): CIDEr-D {score:.3f} on {len(idx)} {caption_source} test images; e.g. "
                f"{caps[0]!r} for {refs[0]!r}")
    if "vqa" in tasks:
        test = ImageSource(os.path.join(images_dir, vqa_source), "test")
        # demonstrations from the train split; an evaluation-only source (cifar10) keeps them in validation
        pool = "train" if test.meta["counts"].get("train") else "validation"
        train = ImageSource(os.path.join(images_dir, vqa_source), pool)
        for k in shots:
            for s in range(seeds):
                items = np.random.default_rng([s, 7]).permutation(len(test))[:vqa_items].tolist()
                r = vqa(vm, test, train, items, k, s)
                records.append(dict(meta, task="vqa", source=vqa_source, shots=k, seed=s, **r))
                log(f"vqa {vqa_source} {k}-shot seed {s}: acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f} "
                    f"acc_calibrated {r['acc_calibrated']:.3f} "
                    f"(chance {r['chance']:.3f}, n {r['n']}, {r['predicted_classes']} classes predicted)")
    return records


def summary(records: list[dict]) -> list[dict]:
    """VQA records grouped by (model, shots): mean and sd over seeds."""
    groups: dict = {}
    for r in records:
        if r["task"] == "vqa":
            groups.setdefault((r["model"], r["shots"]), []).append(r)
    out = []
    for (model, k), rs in sorted(groups.items()):
        acc = np.array([r["acc"] for r in rs])
        norm = np.array([r["acc_norm"] for r in rs])
        cal = np.array([r["acc_calibrated"] for r in rs])
        out.append({"model": model, "shots": k, "seeds": len(rs), "n": rs[0]["n"], "chance": rs[0]["chance"],
                    "acc": float(acc.mean()), "acc_sd": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
                    "acc_norm": float(norm.mean()), "acc_norm_sd": float(norm.std(ddof=1)) if len(rs) > 1 else 0.0,
                    "acc_calibrated": float(cal.mean()),
                    "acc_calibrated_sd": float(cal.std(ddof=1)) if len(rs) > 1 else 0.0})
    return out


def markdown(records: list[dict]) -> str:
    lines = []
    caps = [r for r in records if r["task"] == "captioning"]
    if caps:
        lines += ["| model | step | captioning | prompt | n | CIDEr-D |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r.get('step', '')} | {r['source']} test | {r['prompt']} | {r['n']} "
                  f"| {r['cider']:.3f} |" for r in caps]
        lines.append("")
    rows = summary(records)
    if rows:
        lines += ["| model | VQA-style classification | shots | seeds | n | acc | acc_norm | acc_calibrated | chance |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {records[0].get('vqa_source', 'fashion_mnist')} test | {r['shots']} | "
                  f"{r['seeds']} | {r['n']} | {r['acc']:.3f} ± {r['acc_sd']:.3f} | {r['acc_norm']:.3f} ± "
                  f"{r['acc_norm_sd']:.3f} | {r['acc_calibrated']:.3f} ± {r['acc_calibrated_sd']:.3f} | "
                  f"{r['chance']:.3f} |"
                  for r in rows]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(records)
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model]
        ax.errorbar([r["shots"] for r in rs], [r["acc"] for r in rs], yerr=[r["acc_sd"] for r in rs], marker="o",
                    capsize=3, label=model)
    if rows:
        ax.axhline(rows[0]["chance"], color="grey", ls="--", label="chance")
    caps = [f"{r['model']} ({r['prompt']}): {r['cider']:.3f}" for r in records if r["task"] == "captioning"]
    ax.set_title("VQA-style classification" + ("\nCIDEr-D " + "; ".join(caps) if caps else ""), fontsize=8)
    ax.set_xticks(sorted({r["shots"] for r in rows}))
    ax.set_xlabel("image demonstrations (shots)")
    ax.set_ylabel("accuracy (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    from data_tools.durable import save_figure

    save_figure(fig, path)


def write_report(records: list[dict], out_dir: str, name: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "md", "png")]
    for path, text in zip(paths, (json.dumps({"records": records, "summary": summary(records)}, indent=1),
                                  markdown(records))):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    plot(records, paths[2])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    from eval.score import int_list, model_name

    p = argparse.ArgumentParser(prog="python -m eval.vl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="consolidated directory, or run / checkpoint directory")
    p.add_argument("--images", default="work/vl/images", help="python -m data_tools.images fetch --out DIR")
    p.add_argument("--tasks", default="captioning,vqa", help="captioning, vqa, or both comma-separated")
    p.add_argument("--caption-source", default="tuxpaint")
    p.add_argument("--vqa-source", default="fashion_mnist")
    p.add_argument("--caption-items", type=int, default=0, help="first N test images (0: all)")
    p.add_argument("--vqa-items", type=int, default=200, help="test images per seed")
    p.add_argument("--shots", type=int_list, default=[0, 1, 2, 4], help="comma-separated, each 0..4")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--name", help="model name in the report (default: from the path)")
    p.add_argument("--out", help="directory for NAME.json, NAME.md and NAME.png")
    args = p.parse_args(argv)
    from data_tools.cli import UserError
    from eval.inference import ModelLoadError, load_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if t not in ("captioning", "vqa")]
        if bad:
            raise ValueError(f"--tasks: {bad[0]!r} is not captioning or vqa")
        if any(not 0 <= k <= 4 for k in args.shots):
            raise ValueError("--shots: each must be 0..4 (the paper's few-shot VQA uses up to 4 demonstrations)")
        model, cfg, tok, info = load_model(args.model)
        name = args.name or model_name(args.model)
        vm = VLModel(model, cfg, tok)
        meta = {"model": name, "model_path": os.path.abspath(args.model), "step": info.get("step"),
                "vqa_source": args.vqa_source}
        records = evaluate(vm, args.images, tasks, args.shots, args.seeds, args.caption_source, args.vqa_source,
                           args.caption_items, args.vqa_items, args.max_new_tokens, meta)
    except (UserError, ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(records))
    if args.out:
        for path in write_report(records, args.out, name):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
