"""Labelled task data: real fetches are deterministic and counted, bad items are skipped by id, failures name the
package; the registry renders the paper's templates; the sample builder's truncation and encoder pieces."""
import hashlib
import json
import os

import numpy as np
import pytest

from data_tools.cli import UserError
from data_tools.task_samples import build_sequences, collate_sequences, encode, split_pair
from data_tools.tasks import TASKS, Fetched, email_text, fetch, get_task, load_split, parse_bigbench, split_items


def digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        h.update(name.encode() + open(os.path.join(folder, name), "rb").read())
    return h.hexdigest()


def test_fetch_is_deterministic_and_counted(task_dir, tmp_path):
    for name, total, choices in (("spam", 6046, 2), ("polarity", 200, 2)):
        again = fetch(name, str(tmp_path), log=lambda *a: None)
        assert digest(task_dir / name) == digest(again)
        meta = json.load(open(os.path.join(again, "meta.json")))
        assert sum(meta["counts"].values()) == total, meta["counts"]
        assert meta["archive_sha256"] and meta["licence"] and meta["seed"] == 1234
        for split, n in meta["counts"].items():
            items = load_split(str(tmp_path), name, split)
            assert len(items) == n
            assert all(isinstance(it["label"], int) and 0 <= it["label"] < choices and it["text"].strip()
                       for it in items)
        ids = [it["id"] for s in ("train", "validation", "test") for it in load_split(str(tmp_path), name, s)]
        assert len(set(ids)) == len(ids) == total  # splits are disjoint
    spam = load_split(str(tmp_path), "spam", "train")
    assert {it["label"] for it in spam} == {0, 1} and all(it["text"].startswith("Subject:") for it in spam)


@pytest.mark.slow
def test_finefoods_from_the_debian_package(tmp_path):
    try:
        out = fetch("finefoods", str(tmp_path), log=lambda *a: None)
    except UserError as e:
        if "apt-get" in str(e):
            pytest.skip(f"Debian packages not reachable here: {e}")
        raise
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["counts"] == {"train": 3600, "validation": 400, "test": 1000}
    assert meta["label_counts"]["test"] == [658, 342]  # great / other in modeldata's testing_data


def test_bad_items_are_skipped_by_id_and_splits_are_seeded():
    out = Fetched([], "pkg", "lic", "sha", fractions=(0.6, 0.2, 0.2))
    parse_bigbench("social_iqa", {"examples": [
        {"input": "Q one?", "target_scores": {"a": 0, "b": 1}},
        {"input": "   ", "target_scores": {"a": 1, "b": 0}},
        {"input": "Q three?", "target_scores": {"a": 0, "b": 0}},
        {"input": "Q four?", "target_scores": {"a": 1, "b": 1}},
        {"input": "Q five?"},
        {"input": "Q six?", "target_scores": {"x": 1, "y": 0, "z": 0}},
    ]}, out)
    assert [it["id"] for it in out.items] == ["social_iqa/0", "social_iqa/5"]
    assert out.items[0]["choices"] == ["a", "b"] and out.items[0]["label"] == 1
    assert out.skipped == {"empty": ["social_iqa/1"], "unlabeled": ["social_iqa/2", "social_iqa/3", "social_iqa/4"]}
    nli = Fetched([], "pkg", "lic", "sha")
    parse_bigbench("presuppositions_as_nli", {"examples": [
        {"input": "Sentence 1: It rained. \nSentence 2: Water fell.\n\nThe answer is: ",
         "target_scores": {"entailment": 1, "neutral": 0, "contradiction": 0}},
        {"input": "no structure here", "target_scores": {"entailment": 1, "neutral": 0}}]}, nli)
    assert nli.items[0]["premise"] == "It rained." and nli.items[0]["hypothesis"] == "Water fell."
    assert nli.skipped == {"not premise/hypothesis": ["presuppositions_as_nli/1"]}
    many = Fetched([{"id": str(i), "text": "t", "label": 0} for i in range(100)], "p", "l", "s", (0.8, 0.1, 0.1))
    a, b = split_items(many), split_items(many)
    assert a == b and [len(a[s]) for s in ("train", "validation", "test")] == [80, 10, 10]
    assert [it["id"] for it in a["test"]] != [str(i) for i in range(90, 100)]  # permuted, not a tail cut


def test_email_text_reads_subject_and_plain_or_html_body():
    raw = ("From: a@b\nSubject: Cheap   offer\nContent-Type: multipart/alternative; boundary=X\n\n--X\n"
           "Content-Type: text/html\n\n<p>Buy <b>now</b> &amp; save</p>\n--X--\n")
    assert email_text(raw) == "Subject: Cheap offer\nBuy now & save"


def test_unfetchable_package_names_the_package(tmp_path):
    from data_tools import packages

    with pytest.raises(UserError, match="no-such-package-metalm-xyz"):
        packages.download("npm", "@stdlib/no-such-package-metalm-xyz@0.0.1", str(tmp_path))
    assert not os.path.exists(packages.cache_subdir(str(tmp_path), "npm", "@stdlib/no-such-package-metalm-xyz@0.0.1"))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".dl-")] == []  # no half-downloaded leftovers


def test_unknown_task_and_missing_data_are_clear(tmp_path):
    with pytest.raises(UserError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(UserError, match="data_tools.tasks fetch --name spam"):
        load_split(str(tmp_path), "spam", "test")


def test_registry_templates(tok):
    nli = get_task("presuppositions_as_nli")
    item = {"id": "x", "premise": "It rained.", "hypothesis": "Water fell.", "choices": ["entailment", "neutral"],
            "label": 0}
    ids = encode(tok, nli.render(item))
    assert ids.count(tok.ids.eos) == 2 and ids[-1] == tok.ids.eos  # the paper's `... </s> Hypothesis: ... </s>`
    assert set(TASKS) >= {"spam", "finefoods", "polarity", "presuppositions_as_nli", "social_iqa", "winowhy"}
    assert get_task("finefoods").answers == ("great", "other")


def test_causal_split_follows_lm_eval(tok):
    ctx, cont = split_pair(tok, "The whale is ", "white")  # trailing space moves to the continuation
    assert ctx == tok.encode("The whale is") and ctx + cont == tok.encode("The whale is white")


def test_encoder_pieces_truncation_and_collate(tok):
    task = get_task("polarity")
    pool = [{"id": f"d{i}", "text": f"demo sentence number {i}", "label": i % 2} for i in range(2)]
    item = {"id": "q", "text": "word " * 300, "label": 1}
    seqs = build_sequences(task, item, pool, "encoder", tok, dec_limit=120, enc_limit=50)
    assert len(seqs) == 2
    for s in seqs:
        assert s.truncated > 0 and s.length() - 1 <= 120
        assert s.pieces[-2][0] == "enc" and len(s.pieces[-2][1]) <= 50  # the query input, cut from the left
    assert seqs[0].pieces == seqs[1].pieces and seqs[0].target != seqs[1].target  # answers never encoded
    batch, start, n = collate_sequences(seqs, tok.ids.bos, tok.ids.pad, with_encoder=True)
    B, T = batch["tokens"].shape
    valid = batch["dock_dst"] < B * T
    assert int(valid.sum()) == sum(len(p) for s in seqs for k, p in s.pieces if k == "enc")
    flat = batch["tokens"].reshape(-1)
    assert bool((flat[batch["dock_dst"][valid]] == batch["enc_tokens"].reshape(-1)[valid]).all())
    for r, s in enumerate(seqs):
        assert batch["labels"][r, start[r]:start[r] + n[r]].tolist() == s.target
        assert batch["tokens"][r, 0] == tok.ids.bos
    short = build_sequences(task, {"id": "s", "text": "fine", "label": 0}, [], "causal", tok, 120, 50)
    assert all(s.truncated == 0 for s in short)
    np.testing.assert_array_equal(collate_sequences(short, 1, 3, False)[0]["enc_tokens"].shape, (2, 0))


@pytest.mark.slow
def test_bigbench_task_from_the_sdist(tmp_path):
    """The real BIG-bench sdist (fetched once into the download cache, only the task files kept) where the index
    still serves it; the parsing and splitting are tested on fixtures either way (test_task_sources.py)."""
    from data_tools.bigbench import bigbench_task_file, sdist_served
    from data_tools.packages import DEFAULT_CACHE

    try:
        bigbench_task_file("presuppositions_as_nli", DEFAULT_CACHE)  # the cache (or a local folder) may have it
    except UserError:
        served, why = sdist_served()
        if not served:
            pytest.skip(f"{why} (since 2026-12; BIG-bench from a folder or URL: test_task_sources.py)")
        raise
    out = fetch("presuppositions_as_nli", str(tmp_path / "a"), log=lambda *a: None)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["counts"] == {"train": 441, "validation": 147, "test": 147} and meta["skipped"] == {}
    item = load_split(str(tmp_path / "a"), "presuppositions_as_nli", "test")[0]
    assert item["premise"] and item["hypothesis"] and item["choices"] == ["entailment", "neutral", "contradiction"]
    again = fetch("presuppositions_as_nli", str(tmp_path / "b"), log=lambda *a: None)
    assert digest(out) == digest(again)


def test_truncation_keeps_bos_and_cuts_after_it(tok):
    """Documented difference from lm-eval (eval/score.py): an over-long causal input keeps `<s>` and loses its
    oldest context tokens; lm-eval keeps the last max_length + 1 tokens (no `<s>`, one more context token)."""
    from data_tools.task_samples import causal_context

    task = get_task("polarity")
    item = {"id": "q", "text": "word " * 400, "label": 1}
    for c, s in enumerate(build_sequences(task, item, [], "causal", tok, dec_limit=100, enc_limit=100)):
        ctx, target = split_pair(tok, causal_context(task, item, []), " " + task.choices(item)[c])
        assert s.length() == 101 and s.target == target  # <s> + context + target: 100 decoder inputs
        assert s.pieces == [("dec", ctx[-(100 - len(target)):])] and s.truncated == len(ctx) - (100 - len(target))
        lm_eval = (ctx + target)[-(100 + 1):]  # lm-eval's rule, for the same limit
        assert lm_eval[1:] == s.pieces[0][1] + target and lm_eval[0] != tok.ids.bos
