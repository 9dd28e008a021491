"""Where BIG-bench and BIG-Bench Hard task files come from, and how BBH items become task items.

BIG-bench (`benchmark_tasks/TASK/task.json`) is looked for, in this order:
1. a local folder: `--bigbench DIR` or `METALM_BIGBENCH=DIR` — a BIG-bench checkout (`DIR/bigbench/benchmark_tasks`),
   the `bigbench` package folder (`DIR/benchmark_tasks`) or a `benchmark_tasks` folder itself (`DIR/TASK/task.json`).
   This is what an offline cluster has;
2. the download cache (task files kept from an earlier sdist fetch; they stay as they are);
3. the public repository's raw task files, where the network allows: `--bigbench-url URL` or
   `METALM_BIGBENCH_URL=URL` (the base that `TASK/task.json` is appended to, e.g. `BIGBENCH_REPO_URL`; downloads
   are cached per URL). Opt-in: a machine without that network must not wait on a time-out before every fetch;
4. the `bigbench==1.0.0` sdist when the package index serves it (358 MB; only the task files used are kept).
When none works, one `SourceUnavailable` error names the three ways and why each failed.

BIG-Bench Hard (27 tasks, `TASK.json` = `{"examples": [{"input", "target"}]}`, MIT) is read from `--bbh DIR` /
`METALM_BBH=DIR` (the repository checkout, `DIR/bbh/TASK.json`, or its `bbh` folder, `DIR/TASK.json`), or from
`--bbh-url URL` / `METALM_BBH_URL=URL` (e.g. `BBH_REPO_URL`). A BBH task is multiple choice when its target is one
of a fixed set (`BBH_TASKS`: True/False, Yes/No, yes/no, valid/invalid) or an option letter listed in the input
(`(A)`..`(R)`: the choices are the listed letters, as BBH scores them), and generative otherwise (word sorting,
Dyck languages, arithmetic, counting: a free `target` string).

Why written here: BIG-bench's own loader (`bigbench.api`) needs the sdist that is gone, and BBH ships no loader.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass

from data_tools.cli import UserError
from data_tools.packages import cache_subdir

BIGBENCH_SDIST = "bigbench==1.0.0"
BIGBENCH_ENV, BIGBENCH_URL_ENV = "METALM_BIGBENCH", "METALM_BIGBENCH_URL"
BIGBENCH_REPO_URL = "https://raw.githubusercontent.com/google/BIG-bench/main/bigbench/benchmark_tasks"
BBH_ENV, BBH_URL_ENV = "METALM_BBH", "METALM_BBH_URL"
BBH_REPO_URL = "https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/main/bbh"
BBH_LICENCE = "MIT (BIG-Bench Hard, Suzgun et al. 2022)"
URL_TIMEOUT_S = 60

LETTERS = "letters"  # the answer is an option letter listed in the input
GENERATIVE = "generative"  # a free target string
# BBH's 27 tasks (repository commit 9ee07bd) and the kind of their targets
BBH_TASKS: dict[str, str | tuple[str, ...]] = {
    "boolean_expressions": ("True", "False"),
    "causal_judgement": ("Yes", "No"),
    "date_understanding": LETTERS,
    "disambiguation_qa": LETTERS,
    "dyck_languages": GENERATIVE,
    "formal_fallacies": ("valid", "invalid"),
    "geometric_shapes": LETTERS,
    "hyperbaton": LETTERS,
    "logical_deduction_five_objects": LETTERS,
    "logical_deduction_seven_objects": LETTERS,
    "logical_deduction_three_objects": LETTERS,
    "movie_recommendation": LETTERS,
    "multistep_arithmetic_two": GENERATIVE,
    "navigate": ("Yes", "No"),
    "object_counting": GENERATIVE,
    "penguins_in_a_table": LETTERS,
    "reasoning_about_colored_objects": LETTERS,
    "ruin_names": LETTERS,
    "salient_translation_error_detection": LETTERS,
    "snarks": LETTERS,
    "sports_understanding": ("yes", "no"),
    "temporal_sequences": LETTERS,
    "tracking_shuffled_objects_five_objects": LETTERS,
    "tracking_shuffled_objects_seven_objects": LETTERS,
    "tracking_shuffled_objects_three_objects": LETTERS,
    "web_of_lies": ("Yes", "No"),
    "word_sorting": GENERATIVE,
}

# the BBH paper's two families (Suzgun et al. 2022, Table 2): algorithmic and multi-step arithmetic vs natural-language
# understanding; kept as metadata (`family`), they make the clusters of instruction tuning
BBH_ALGORITHMIC = ("boolean_expressions", "dyck_languages", "geometric_shapes", "logical_deduction_five_objects",
                   "logical_deduction_seven_objects", "logical_deduction_three_objects", "multistep_arithmetic_two",
                   "navigate", "object_counting", "temporal_sequences", "tracking_shuffled_objects_five_objects",
                   "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects",
                   "web_of_lies", "word_sorting")


def bbh_family(task: str) -> str:
    return "algorithmic" if task in BBH_ALGORITHMIC else "nlp"


class SourceUnavailable(UserError):
    """No place this task's files can come from is reachable here (a missing optional source, not a bad input).
    `brief`: the reason in a few words, for a summary line."""

    def __init__(self, message: str, brief: str):
        super().__init__(message)
        self.brief = brief


@dataclass(frozen=True)
class Locations:
    """Where the user said BIG-bench / BBH are (flags win over the environment variables)."""
    bigbench: str | None = None
    bigbench_url: str | None = None
    bbh: str | None = None
    bbh_url: str | None = None

    @classmethod
    def resolve(cls, bigbench=None, bigbench_url=None, bbh=None, bbh_url=None) -> "Locations":
        env = os.environ
        return cls(bigbench or env.get(BIGBENCH_ENV) or None, bigbench_url or env.get(BIGBENCH_URL_ENV) or None,
                   bbh or env.get(BBH_ENV) or None, bbh_url or env.get(BBH_URL_ENV) or None)


@dataclass(frozen=True)
class TaskFile:
    path: str
    origin: str  # where it came from, for meta.json: "local folder", "bigbench==1.0.0 sdist", "repository URL"


def add_location_args(p) -> None:
    p.add_argument("--bigbench", metavar="DIR", help=f"a local BIG-bench checkout, package or benchmark_tasks "
                   f"folder (default: ${BIGBENCH_ENV})")
    p.add_argument("--bigbench-url", metavar="URL", help=f"base URL of BIG-bench's benchmark_tasks, e.g. "
                   f"{BIGBENCH_REPO_URL} (default: ${BIGBENCH_URL_ENV}; no network is tried without it)")
    p.add_argument("--bbh", metavar="DIR", help=f"a local BIG-Bench-Hard checkout or its bbh folder (default: "
                   f"${BBH_ENV})")
    p.add_argument("--bbh-url", metavar="URL", help=f"base URL of BBH's bbh folder, e.g. {BBH_REPO_URL} (default: "
                   f"${BBH_URL_ENV})")


def locations_from_args(args) -> Locations:
    return Locations.resolve(args.bigbench, args.bigbench_url, args.bbh, args.bbh_url)


# ---------------------------------------------------------------- finding the files
def _in_folder(root: str, candidates: list[str]) -> str | None:
    return next((os.path.join(root, c) for c in candidates if os.path.isfile(os.path.join(root, c))), None)


def read_task_json(path: str, what: str) -> dict:
    """A BIG-bench / BBH task file: a JSON object with an `examples` list, or a UserError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a {what} file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise UserError(f"{path}: not a {what} file (no 'examples' list)")
    return data


def _url_download(base: str, rel: str, dest: str) -> str | None:
    """Fetch BASE/REL into dest (a JSON file, checked before it is renamed into place); None on success, else why."""
    url = base.rstrip("/") + "/" + rel
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        return f"{url}: HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"{url}: {getattr(e, 'reason', e)}"
    try:
        data = json.loads(body.decode("utf-8"))
        if not isinstance(data, dict) or "examples" not in data:
            raise ValueError("no 'examples'")
    except (UnicodeDecodeError, ValueError) as e:
        return f"{url}: not a task file ({e})"
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + f".tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(body)
    os.replace(tmp, dest)
    return None


def _from_url(cache: str, kind: str, base: str, rel: str) -> tuple[TaskFile | None, str]:
    """BASE/REL through a per-URL cache (CACHE/KIND/<sha of BASE>/REL): (the file, "") or (None, why not)."""
    dest = os.path.join(cache, kind, hashlib.sha256(base.rstrip("/").encode()).hexdigest()[:12], rel)
    why = None if os.path.isfile(dest) else _url_download(base, rel, dest)
    return (TaskFile(dest, "repository URL"), "") if why is None else (None, why)


def sdist_served(index_cmd: tuple[str, ...] = (sys.executable, "-m", "pip", "index", "versions", "bigbench")
                 ) -> tuple[bool, str]:
    """Does the package index serve bigbench==1.0.0? (asked with `pip index versions`, which downloads nothing)"""
    version = BIGBENCH_SDIST.split("==")[1]
    try:
        r = subprocess.run(list(index_cmd), capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"asking the package index failed ({e})"
    m = re.search(r"Available versions:\s*(.*)", r.stdout)
    if m is None:
        tail = [l for l in (r.stderr or r.stdout).strip().splitlines() if "WARNING: Location" not in l][-1:]
        return False, f"the package index does not list bigbench ({' '.join(tail) or f'exit {r.returncode}'})"
    versions = [v.strip() for v in m.group(1).split(",")]
    if version not in versions:
        return False, f"the package index serves bigbench {', '.join(versions)} only, not {version}"
    return True, f"the package index serves {BIGBENCH_SDIST}"


def _sdist_fetch(task: str, sub: str, keep: tuple[str, ...]) -> str | None:
    """Download the sdist and copy the task files in `keep` (and `task`) into `sub`; None on success, else why.
    `pip download bigbench` always exits 1 (its metadata declares a file:// dependency), but with a private TMPDIR
    and --no-clean the unpacked sdist survives; the rest (about 1.8 GB unpacked) is removed."""
    served, why = sdist_served()
    if not served:
        return why
    parent = os.path.dirname(os.path.dirname(sub))  # CACHE/pypi-sdist: the download unpacks beside its cache entry
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".bigbench-")
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-clean", "--no-build-isolation",
                        "--no-binary", ":all:", BIGBENCH_SDIST, "-d", os.path.join(tmp, "dl")], cwd=tmp,
                       capture_output=True, env=dict(os.environ, TMPDIR=tmp))
        roots = [os.path.join(dp, "benchmark_tasks") for dp, dirs, _ in os.walk(tmp) if "benchmark_tasks" in dirs
                 and dp.endswith("bigbench")]
        if not roots:
            return f"pip download of {BIGBENCH_SDIST} gave no bigbench/benchmark_tasks folder"
        for name in keep + ((task,) if task not in keep else ()):
            src = os.path.join(roots[0], name, "task.json")
            if os.path.isfile(src):
                os.makedirs(os.path.join(sub + ".tmp", name), exist_ok=True)
                shutil.copyfile(src, os.path.join(sub + ".tmp", name, "task.json"))
        if os.path.isdir(sub):
            shutil.rmtree(sub)
        os.makedirs(sub + ".tmp", exist_ok=True)
        os.replace(sub + ".tmp", sub)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(sub + ".tmp", ignore_errors=True)
    return None if os.path.isfile(os.path.join(sub, task, "task.json")) else \
        f"{BIGBENCH_SDIST} has no benchmark_tasks/{task}/task.json"


def bigbench_task_file(task: str, cache: str, where: Locations | None = None,
                       keep: tuple[str, ...] = ()) -> TaskFile:
    """`benchmark_tasks/TASK/task.json` from the first source that has it (module docstring)."""
    where = where or Locations.resolve()
    rel = f"{task}/task.json"
    tried = []
    if where.bigbench:
        found = _in_folder(where.bigbench, [rel, f"benchmark_tasks/{rel}", f"bigbench/benchmark_tasks/{rel}"])
        if found:
            return TaskFile(found, "local folder")
        tried.append(f"{where.bigbench} has no {rel}, benchmark_tasks/{rel} or bigbench/benchmark_tasks/{rel}")
    else:
        tried.append(f"none given (--bigbench DIR or {BIGBENCH_ENV}=DIR: a BIG-bench checkout or benchmark_tasks "
                     f"folder)")
    sub = os.path.join(cache_subdir(cache, "pypi-sdist", BIGBENCH_SDIST), "benchmark_tasks")
    if os.path.isfile(os.path.join(sub, rel)):
        return TaskFile(os.path.join(sub, rel), f"{BIGBENCH_SDIST} sdist")
    # a URL the user named comes before the automatic sdist attempt (which may be a 358 MB download)
    if where.bigbench_url:
        found, url_why = _from_url(cache, "bigbench-url", where.bigbench_url, rel)
        if found:
            return found
    else:
        url_why = (f"not tried (--bigbench-url URL or {BIGBENCH_URL_ENV}=URL, e.g. {BIGBENCH_REPO_URL}, where the "
                   f"network allows)")
    why = _sdist_fetch(task, sub, keep)
    if why is None:
        return TaskFile(os.path.join(sub, rel), f"{BIGBENCH_SDIST} sdist")
    tried += [why, url_why]
    raise SourceUnavailable(f"BIG-bench task {task!r} is not reachable: (1) local folder: {tried[0]}; (2) the "
                            f"{BIGBENCH_SDIST} sdist: {tried[1]}; (3) the repository's raw files: {tried[2]}",
                            f"BIG-bench not reachable (no local folder, {tried[1]}, "
                            f"{'URL failed' if where.bigbench_url else 'no URL set'})")


def bbh_task_file(task: str, cache: str, where: Locations | None = None) -> TaskFile:
    """BBH's `TASK.json` from a local folder or the repository URL (module docstring)."""
    if task not in BBH_TASKS:
        raise UserError(f"BIG-Bench Hard has no task {task!r} (known: {', '.join(BBH_TASKS)})")
    where = where or Locations.resolve()
    rel = f"{task}.json"
    tried = []
    if where.bbh:
        found = _in_folder(where.bbh, [rel, f"bbh/{rel}"])
        if found:
            return TaskFile(found, "local folder")
        tried.append(f"{where.bbh} has no {rel} or bbh/{rel}")
    else:
        tried.append(f"none given (--bbh DIR or {BBH_ENV}=DIR: a BIG-Bench-Hard checkout or its bbh folder)")
    if where.bbh_url:
        found, why = _from_url(cache, "bbh-url", where.bbh_url, rel)
        if found:
            return found
        tried.append(why)
    else:
        tried.append(f"not tried (--bbh-url URL or {BBH_URL_ENV}=URL, e.g. {BBH_REPO_URL}, where the network "
                     f"allows)")
    raise SourceUnavailable(f"BIG-Bench Hard task {task!r} is not reachable: (1) local folder: {tried[0]}; "
                            f"(2) the repository's raw files: {tried[1]}",
                            f"BIG-Bench Hard not reachable ({'folder lacks it' if where.bbh else 'no local folder'}, "
                            f"{'URL failed' if where.bbh_url else 'no URL set'})")


# ---------------------------------------------------------------- BBH items
_OPTION = re.compile(r"^\(([A-R])\)\s*(.*?)\s*$", re.M)


def parse_bbh(task: str, path: str, skip) -> list[dict]:
    """BBH examples -> task items: multiple choice (`choices`, `label`; letter tasks also keep the option texts as
    `options`) or generative (`target`). An item whose target does not fit its task's kind is skipped by id."""
    kind = BBH_TASKS[task]
    items = []
    for n, ex in enumerate(read_task_json(path, "BIG-Bench Hard task")["examples"]):
        item_id = f"{task}/{n}"
        text, target = ex.get("input"), ex.get("target")
        if not isinstance(text, str) or not isinstance(target, str):
            skip("no input/target string", item_id)
            continue
        text, target = text.strip(), target.strip()
        if not text:
            skip("empty", item_id)
            continue
        item = {"id": item_id, "text": text}
        if kind == GENERATIVE:
            item["target"] = target
        elif kind == LETTERS:
            opts = _OPTION.findall(text)
            letters = [f"({c})" for c, _ in opts]
            if not opts:
                skip("no options listed", item_id)
                continue
            if target not in letters:
                skip("target is not a listed option letter", item_id)
                continue
            item.update(choices=letters, label=letters.index(target), options=[t for _, t in opts])
        else:
            if target not in kind:
                skip(f"target not one of {'/'.join(kind)}", item_id)
                continue
            item.update(choices=list(kind), label=kind.index(target))
        items.append(item)
    return items
