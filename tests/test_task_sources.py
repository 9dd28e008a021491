"""Where BIG-bench and BIG-Bench Hard come from (data_tools.bigbench): a local folder, the sdist when the index serves
it, a repository URL (served here from loopback); one clear error when none works; BBH from the workplace's copy in
../shared (skipped with the reason where it is absent), parsed into multiple-choice or generative items, fetched
deterministically and scored."""
import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from data_tools.bigbench import BBH_TASKS, Locations, SourceUnavailable, bigbench_task_file, parse_bbh, sdist_served
from data_tools.cli import UserError
from data_tools.tasks import TASKS, fetch, fetch_available, get_task, load_split, task_dir
from test_train import ROOT, env

BBH = Path(ROOT).parent / "shared" / "data" / "bbh"
needs_bbh = pytest.mark.skipif(not (BBH / "navigate.json").is_file(),
                               reason=f"the workplace's BIG-Bench Hard copy is not at {BBH} (../shared absent)")
PRESUPPOSITIONS = {"examples": [
    {"input": "Sentence 1: It rained.\nSentence 2: Water fell.\n\nThe answer is: ",
     "target_scores": {"entailment": 1, "neutral": 0, "contradiction": 0}},
    {"input": "Sentence 1: Ann left.\nSentence 2: Ann stayed.\n",
     "target_scores": {"entailment": 0, "neutral": 0, "contradiction": 1}},
    {"input": "Sentence 1: Bo sang.\nSentence 2: Bo is a bird.\n",
     "target_scores": {"entailment": 0, "neutral": 1, "contradiction": 0}},
    {"input": "no structure here", "target_scores": {"entailment": 1, "neutral": 0}},
]}


def clean_env():
    e = env()
    for k in ("METALM_BIGBENCH", "METALM_BIGBENCH_URL", "METALM_BBH", "METALM_BBH_URL"):
        e.pop(k, None)
    return e


def digest(folder) -> str:
    h = hashlib.sha256()
    for dp, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(os.path.relpath(os.path.join(dp, name), folder).encode())
            h.update(open(os.path.join(dp, name), "rb").read())
    return h.hexdigest()


def write_task(root: Path, task: str, data: dict) -> Path:
    path = root / task / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def no_sdist():
    """The no-source paths ask the index for the sdist; where it is served they would download 358 MB instead."""
    served, why = sdist_served()
    if served:
        pytest.skip(f"{why}: the error for 'no source reachable' cannot be shown here")


def test_bigbench_from_a_local_folder_and_the_error_without_one(tmp_path, no_sdist):
    """The CLI with no source: one line naming the three ways, exit 2, no traceback, nothing written; with
    --bigbench pointing at a checkout (bigbench/benchmark_tasks) or at benchmark_tasks itself it works."""
    cmd = [sys.executable, "-m", "data_tools.tasks", "fetch", "--name", "presuppositions_as_nli", "--out",
           str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: BIG-bench task 'presuppositions_as_nli' is not reachable")
    for way in ("--bigbench DIR", "METALM_BIGBENCH=DIR", "bigbench==1.0.0 sdist", "--bigbench-url URL",
                "METALM_BIGBENCH_URL"):
        assert way in lines[0], way
    assert not (tmp_path / "out" / "presuppositions_as_nli").exists()

    checkout = tmp_path / "BIG-bench"
    src = write_task(checkout / "bigbench" / "benchmark_tasks", "presuppositions_as_nli", PRESUPPOSITIONS)
    r = subprocess.run(cmd + ["--bigbench", str(checkout)], capture_output=True, text=True, env=clean_env(), cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "presuppositions_as_nli"
    meta = json.load(open(out / "meta.json"))
    assert sum(meta["counts"].values()) == 3 and meta["skipped"] == {
        "not premise/hypothesis": {"count": 1, "ids": ["presuppositions_as_nli/3"]}}
    assert meta["archive_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert "local folder" in meta["package"] and meta["licence"].startswith("Apache")
    # the same task from a bare benchmark_tasks folder, through the environment variable: the same items
    e = dict(clean_env(), METALM_BIGBENCH=str(checkout / "bigbench" / "benchmark_tasks"))
    cmd2 = [c if c != str(tmp_path / "out") else str(tmp_path / "out2") for c in cmd]
    r = subprocess.run(cmd2, capture_output=True, text=True, env=e, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(tmp_path / "out2" / "presuppositions_as_nli")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.json"))  # nothing downloaded


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def loopback_server(tmp_path):
    """A static file server on 127.0.0.1 standing in for the repository's raw files."""
    root = tmp_path / "www"
    root.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_bigbench_from_a_repository_url_cached(tmp_path, loopback_server, no_sdist):
    root, base = loopback_server
    write_task(root / "bigbench" / "benchmark_tasks", "winowhy", {"examples": [
        {"input": "The man could not lift his son because he was so weak. The reason is the man.",
         "target_scores": {"correct": 1, "incorrect": 0}}]})
    cache = tmp_path / "cache"
    where = Locations(bigbench_url=base + "/bigbench/benchmark_tasks/")
    got = bigbench_task_file("winowhy", str(cache), where)
    assert got.origin == "repository URL" and json.load(open(got.path))["examples"][0]["target_scores"]
    (root / "bigbench" / "benchmark_tasks" / "winowhy" / "task.json").unlink()
    assert bigbench_task_file("winowhy", str(cache), where).path == got.path  # the cached copy, no request
    dest = fetch("winowhy", str(tmp_path / "out"), str(cache), log=lambda *a: None, where=where)
    meta = json.load(open(os.path.join(dest, "meta.json")))
    assert sum(meta["counts"].values()) == 1 and "(repository URL)" in meta["package"]
    with pytest.raises(SourceUnavailable, match=r"HTTP 404") as e:
        bigbench_task_file("social_iqa", str(cache), where)
    assert "URL failed" in e.value.brief
    (root / "bad").mkdir()
    (root / "bad" / "strategyqa").mkdir()
    (root / "bad" / "strategyqa" / "task.json").write_text("<html>not json</html>")
    with pytest.raises(SourceUnavailable, match="not a task file"):
        bigbench_task_file("strategyqa", str(cache), Locations(bigbench_url=base + "/bad"))
    assert not list(cache.rglob("strategyqa"))  # a bad body is never cached


def test_bbh_items_multiple_choice_or_generative(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"examples": [
        {"input": "Which is first?\nOptions:\n(A) one\n(B) two\n(C) three", "target": "(B)"},
        {"input": "Pick.\nOptions:\n(A) x\n(B) y", "target": "Monsters, Inc"},
        {"input": "No options here", "target": "(A)"},
        {"input": "  ", "target": "(A)"},
        {"input": "Q", "target": 3}]}))
    skipped = {}
    items = parse_bbh("movie_recommendation", str(path), lambda r, i: skipped.setdefault(r, []).append(i))
    assert items == [{"id": "movie_recommendation/0", "text": "Which is first?\nOptions:\n(A) one\n(B) two\n(C) three",
                      "choices": ["(A)", "(B)", "(C)"], "label": 1, "options": ["one", "two", "three"]}]
    assert skipped == {"target is not a listed option letter": ["movie_recommendation/1"],
                       "no options listed": ["movie_recommendation/2"], "empty": ["movie_recommendation/3"],
                       "no input/target string": ["movie_recommendation/4"]}
    path.write_text(json.dumps({"examples": [{"input": "Is it? Options:\n- Yes\n- No", "target": "No"},
                                             {"input": "Is it?", "target": "maybe"}]}))
    skipped = {}
    items = parse_bbh("navigate", str(path), lambda r, i: skipped.setdefault(r, []).append(i))
    assert [(it["choices"], it["label"]) for it in items] == [(["Yes", "No"], 1)]
    assert skipped == {"target not one of Yes/No": ["navigate/1"]}
    path.write_text(json.dumps({"examples": [{"input": "Sort: b a", "target": "a b"}]}))
    assert parse_bbh("word_sorting", str(path), None) == [{"id": "word_sorting/0", "text": "Sort: b a",
                                                           "target": "a b"}]
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a BIG-Bench Hard task file"):
        parse_bbh("navigate", str(path), None)


def test_optional_tasks_are_skipped_with_the_reason(tmp_path):
    got, skipped = fetch_available(["bbh:navigate"], str(tmp_path), str(tmp_path / "cache"), log=lambda *a: None,
                                   where=Locations(bbh=str(tmp_path / "nowhere")))
    assert got == [] and list(skipped) == ["bbh:navigate"] and "BIG-Bench Hard not reachable" in skipped["bbh:navigate"]
    assert get_task("bbh:navigate").optional and get_task("social_iqa").optional and not get_task("spam").optional
    r = subprocess.run([sys.executable, "-m", "data_tools.tasks", "fetch", "--name", "bbh", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.count("skipped, an optional task") == 27, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "data_tools.tasks", "fetch", "--name", "bbh:navigate", "--out",
                        str(tmp_path)], capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "--bbh DIR" in r.stderr and "METALM_BBH_URL" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@needs_bbh
def test_bbh_from_the_shared_copy_listed_fetched_deterministically(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_tools.tasks", "list"], capture_output=True, text=True,
                       env=clean_env(), cwd=ROOT)
    listed = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("bbh:")]
    assert r.returncode == 0 and listed == [f"bbh:{t}" for t in BBH_TASKS] and len(listed) == 27
    where = Locations(bbh=str(BBH.parent))  # a checkout layout: DIR/bbh/TASK.json
    names = [f"bbh:{t}" for t in BBH_TASKS]
    got, skipped = fetch_available(names, str(tmp_path / "a"), log=lambda *a: None, where=where)
    assert got == names and skipped == {}
    total, skips = 0, {}
    for name in names:
        meta = json.load(open(Path(task_dir(str(tmp_path / "a"), name)) / "meta.json"))
        src = BBH / f"{name[4:]}.json"
        assert meta["archive_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert meta["licence"].startswith("MIT") and meta["seed"] == 1234
        total += sum(meta["counts"].values()) + sum(v["count"] for v in meta["skipped"].values())
        skips.update({i: r for r, v in meta["skipped"].items() for i in v["ids"]})
        task = get_task(name)
        items = [it for s in ("train", "validation", "test") for it in load_split(str(tmp_path / "a"), name, s)]
        assert len({it["id"] for it in items}) == len(items) == sum(meta["counts"].values())
        if task.generative:
            assert meta["kind"] == "generative" and all(isinstance(it["target"], str) and "label" not in it
                                                        for it in items)
        else:
            assert all(0 <= it["label"] < len(it["choices"]) for it in items)
            assert len({it["label"] for it in items}) > 1  # not all one answer
    assert total == 6511  # the 27 tasks' items, every one kept or skipped by id
    assert skips == {"movie_recommendation/163": "target is not a listed option letter",
                     "ruin_names/99": "target is not a listed option letter",
                     "ruin_names/144": "target is not a listed option letter"}
    assert sorted(t for t in BBH_TASKS if TASKS[f"bbh:{t}"].generative) == [
        "dyck_languages", "multistep_arithmetic_two", "object_counting", "word_sorting"]
    fetch_available(names, str(tmp_path / "b"), log=lambda *a: None, where=Locations(bbh=str(BBH)))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")  # same input, same bytes (checkout or bbh folder)


@needs_bbh
def test_eval_score_on_bbh(trained, tmp_path):
    """The multiple-choice BBH tasks score like any task (letters and a fixed answer set); a generative one is
    scored by generation (exact match), zero-shot through the encoder too."""
    data = tmp_path / "tasks"
    base = [sys.executable, "-m", "eval.score", "--model", str(trained[1]), "--data", str(data)]
    e = dict(clean_env(), METALM_BBH=str(BBH))
    for name in ("bbh:navigate", "bbh:date_understanding", "bbh:word_sorting"):
        r = subprocess.run([sys.executable, "-m", "data_tools.tasks", "fetch", "--name", name, "--out", str(data)],
                           capture_output=True, text=True, env=e, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(base + ["--tasks", "bbh:navigate,bbh:date_understanding", "--shots", "0,1", "--limit", "8",
                               "--placement", "causal,encoder", "--out", str(tmp_path / "res")],
                       capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = json.load(open(tmp_path / "res" / "metalm.json"))["records"]
    assert {r["task"] for r in recs} == {"bbh:navigate", "bbh:date_understanding"} and len(recs) == 2 * 2 * 2
    chance = {r["task"]: r["chance"] for r in recs}
    assert chance["bbh:navigate"] == pytest.approx(0.5) and chance["bbh:date_understanding"] < 0.5
    assert all(r["n"] == 8 and 0 <= r["metrics"]["acc"] <= 1 for r in recs)
    r = subprocess.run(base + ["--tasks", "bbh:word_sorting", "--limit", "4", "--placement", "causal,encoder",
                               "--max-gen-toks", "6", "--out", str(tmp_path / "gen")],
                       capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = json.load(open(tmp_path / "gen" / "metalm.json"))["records"]
    assert [(r["placement"], r["output_type"]) for r in recs] == [("causal", "generate_until"),
                                                                  ("encoder", "generate_until")]
    assert all(set(r["metrics"]) == {"exact_match"} and r["generation"]["max_gen_toks"] == 6 for r in recs)
    r = subprocess.run(base + ["--tasks", "bbh:word_sorting", "--shots", "0,1", "--placement", "encoder", "--limit",
                               "2", "--max-gen-toks", "2", "--out", str(tmp_path / "gen1")],
                       capture_output=True, text=True, env=e, cwd=ROOT)
    assert r.returncode == 0 and "encoder  1-shot: skipped (generation through the encoder is zero-shot" in r.stdout
    assert [r["shots"] for r in json.load(open(tmp_path / "gen1" / "metalm.json"))["records"]] == [0]


def write_bigbench_checkout(root: Path) -> Path:
    """A BIG-bench checkout's layout with the kinds of task folder it has: JSON multiple choice, JSON generative
    (several references), a programmatic task and one with subtasks only."""
    bt = root / "bigbench" / "benchmark_tasks"
    mc = {"keywords": ["logical reasoning", "zero-shot"], "examples": [
        {"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}}
        for i in range(10)]}
    gen = {"keywords": ["arithmetic"], "examples": [
        {"input": f"What is {i} plus {i}?", "target": [str(2 * i), f"{2 * i}."]} for i in range(9)]
        + [{"input": "broken", "target": []}]}
    for name, data in (("even_numbers", mc), ("doubling", gen)):
        (bt / name).mkdir(parents=True)
        (bt / name / "task.json").write_text(json.dumps(data))
    (bt / "programmatic_one").mkdir()
    (bt / "programmatic_one" / "task.py").write_text("# a programmatic task\n")
    (bt / "with_subtasks" / "part_a").mkdir(parents=True)
    (bt / "with_subtasks" / "part_a" / "task.json").write_text(json.dumps(mc))
    return root


def test_any_bigbench_json_task_by_name(tmp_path, trained):
    root = write_bigbench_checkout(tmp_path / "BIG-bench")
    r = subprocess.run([sys.executable, "-m", "data_tools.tasks", "survey", "--bigbench", str(root), "--json",
                        str(tmp_path / "survey.json")], capture_output=True, text=True, env=clean_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "bigbench: 4 tasks: 1 multiple choice, 1 generative (19 items, 1 skipped), 2 not usable" in r.stdout
    sv = json.load(open(tmp_path / "survey.json"))["bigbench"]
    assert sv["programmatic_one"]["error"].startswith("programmatic task")
    assert sv["with_subtasks"]["error"].startswith("no task.json (subtasks only)")
    where = Locations(bigbench=str(root))
    for out in ("a", "b"):
        for name in ("bigbench:even_numbers", "bigbench:doubling"):
            fetch(name, str(tmp_path / out), str(tmp_path / "cache"), log=lambda *a: None, where=where)
    assert digest(tmp_path / "a" / "bigbench") == digest(tmp_path / "b" / "bigbench")  # same bytes
    data = str(tmp_path / "a")
    gen = get_task("bigbench:doubling", data_dir=data)
    assert gen.generative and gen.metadata["keywords"] == ["arithmetic"] and gen.cluster == "bigbench:arithmetic"
    items = [it for s in ("train", "validation", "test") for it in load_split(data, gen, s)]
    assert len(items) == 9 and all(it["targets"][0] == it["target"] for it in items)
    mc = get_task("bigbench:even_numbers", data_dir=data)
    assert not mc.generative and mc.cluster == "bigbench:logical reasoning"
    r = subprocess.run([sys.executable, "-m", "eval.score", "--model", str(trained[1]), "--data", data, "--tasks",
                        "bigbench:even_numbers,bigbench:doubling", "--max-gen-toks", "4", "--out",
                        str(tmp_path / "res")], capture_output=True, text=True, env=clean_env(), cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = {r["task"]: r for r in json.load(open(tmp_path / "res" / "metalm.json"))["records"]}
    assert recs["bigbench:even_numbers"]["output_type"] == "multiple_choice" and "acc" in recs["bigbench:even_numbers"]["metrics"]
    assert set(recs["bigbench:doubling"]["metrics"]) == {"exact_match", "rougeL", "bleu"}
