"""Tasks from files (written here, not shipped): loaded, scored zero/few-shot over several templates, finetuned on;
malformed files are one line naming file and field; lm-eval's own local-task YAMLs load; the shipped registry is
files with >= 3 templates; generative scoring: greedy equals lm-eval's generate_until on the HF export, beam 1
equals greedy, beam 4 scores at least greedy; generation metrics are the libraries' own."""
import json
import os
import subprocess
import sys

import pytest
import torch

from data_tools.cli import UserError
from data_tools.tasks import TASKS, get_task, load_split
from test_train import ROOT, env, launch

REVIEWS = [("the soup was warm and tasty", "good"), ("cold food and a rude waiter", "bad"),
           ("we loved the fresh bread", "good"), ("the fish smelled off", "bad"), ("a lovely quiet evening", "good"),
           ("the bill was wrong twice", "bad"), ("friendly staff, great wine", "good"), ("noisy and slow", "bad")]


def write_mc_task(d, **extra):
    """A user's multiple-choice task: its own jsonl files, string labels, two templates."""
    os.makedirs(d, exist_ok=True)
    for split, rows in (("train", REVIEWS * 3), ("validation", REVIEWS[::-1]), ("test", REVIEWS)):
        with open(os.path.join(d, f"{split}.jsonl"), "w") as f:
            for i, (text, lab) in enumerate(rows):
                f.write(json.dumps({"review": text, "sentiment": lab, "uid": i}) + "\n")
    spec = {"task": "user_reviews", "dataset": {"data_files": {"train": "train.jsonl", "validation": "validation.jsonl",
                                                               "test": "test.jsonl"}},
            "doc_to_choice": ["bad", "good"], "doc_to_target": "sentiment", "metadata": {"cluster": "reviews"},
            "templates": [{"id": "plain", "doc_to_text": "{{review}}", "cue": "The meal was"},
                          {"id": "options", "doc_to_text": "Review: {{review}} OPTIONS: </s> "
                                                           "{{choices | join(' </s> ')}} </s>", "cue": "TARGET:"}],
            **extra}
    path = os.path.join(d, "user_reviews.yaml")
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    return path


def test_task_file_items_templates_and_lookup(tmp_path, monkeypatch):
    path = write_mc_task(str(tmp_path / "t"))
    task = get_task(path)
    assert task.name == "user_reviews" and task.template_ids() == ["plain", "options"] and task.cluster == "reviews"
    items = load_split("", task, "test")
    assert [it["label"] for it in items] == [1, 0, 1, 0, 1, 0, 1, 0]  # string targets -> index of the choice
    assert task.render(items[0]) == "the soup was warm and tasty"
    assert task.using("options").render(items[0]) == "Review: the soup was warm and tasty OPTIONS: </s> bad </s> good </s>"
    part = get_task(write_mc_task(str(tmp_path / "p"), dataset={"data_files": {"train": "train.jsonl"}}))
    with pytest.raises(UserError, match="user_reviews has no test split"):
        load_split("", part, "test")
    monkeypatch.setenv("METALM_TASKS", str(tmp_path / "t"))  # a tasks directory: found by name
    assert get_task("user_reviews").path == path
    # one file, split by a seeded permutation
    one = write_mc_task(str(tmp_path / "one"), dataset={"data_files": "train.jsonl",
                                                          "split_fractions": [0.5, 0.25, 0.25]})
    t1 = get_task(one)
    sizes = [len(load_split("", t1, s)) for s in ("train", "validation", "test")]
    assert sizes == [12, 6, 6] and load_split("", t1, "test") == load_split("", get_task(one), "test")


def test_shipped_registry_is_task_files_with_three_templates():
    builtin = [t for t in TASKS.values() if not t.name.startswith("bbh:")]
    assert len(builtin) == 8 and all(t.path.endswith(".yaml") and os.path.isfile(t.path) for t in builtin)
    assert all(len(t.templates) >= 3 for t in TASKS.values())
    # template 0 is the one scoring and finetuning used before templates: same text, same cue
    assert get_task("spam").template == "{{text}}" and get_task("spam").cue == "Is this email spam? Answer:"
    assert any("OPTIONS: </s>" in t.text and t.cue == "TARGET:" for t in get_task("polarity").templates)
    assert {TASKS[f"bbh:{n}"].metadata["family"] for n in ("word_sorting", "snarks")} == {"algorithmic", "nlp"}


def test_lm_eval_local_task_yaml_loads(tmp_path):
    """lm-eval's own form of a local task: dataset_path json, data_files by split keys, *_split names."""
    d = tmp_path / "lm"
    write_mc_task(str(d))
    (d / "lm.yaml").write_text(
        "task: lm_reviews\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    tr: train.jsonl\n    te: "
        "test.jsonl\ntraining_split: tr\ntest_split: te\noutput_type: multiple_choice\n"
        "doc_to_text: \"Review: {{review}}\\nSentiment:\"\ndoc_to_choice: ['bad', 'good']\n"
        "doc_to_target: \"{{sentiment}}\"\nmetric_list:\n  - metric: acc\n")
    task = get_task(str(d / "lm.yaml"))
    items = load_split("", task, "test")
    assert len(items) == 8 and items[1]["label"] == 0 and task.render(items[0]).endswith("tasty\nSentiment:")


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s.pop("task"), "'task'"),
    (lambda s: s.update(output_type="ranking"), "'output_type'"),
    (lambda s: s.update(doc_to_choice=[]), "'doc_to_choice'"),
    (lambda s: s.update(templates=[{"id": "a", "cue": "x"}]), "'templates[0].doc_to_text'"),
    (lambda s: s.update(templates=[{"id": "a", "doc_to_text": "{{ review"}]), "'templates[0].doc_to_text'"),
    (lambda s: s.update(dataset={"data_files": {"train": "nope.jsonl"}}), "'dataset.data_files.train'"),
    (lambda s: s.update(metric_list=["bleu"]), "'metric_list[0]'"),
    (lambda s: s.update(doc_to_txt="{{review}}"), "'doc_to_txt'"),
])
def test_malformed_task_file_is_one_line_naming_the_field(tmp_path, mutate, field):
    import yaml

    path = write_mc_task(str(tmp_path / "t"))
    spec = yaml.safe_load(open(path))
    mutate(spec)
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    with pytest.raises(UserError) as e:
        get_task(path)
    msg = str(e.value)
    assert msg.startswith(path) and field in msg and "\n" not in msg


def test_bad_data_line_and_cli_exit_2(tmp_path, trained):
    path = write_mc_task(str(tmp_path / "t"))
    with open(tmp_path / "t" / "test.jsonl", "a") as f:
        f.write(json.dumps({"review": "fine", "sentiment": "meh"}) + "\n")
    with pytest.raises(UserError, match=r"test.jsonl:9: doc_to_target gave 'meh', not one of the choices"):
        load_split("", get_task(path), "test")
    (tmp_path / "bad.yaml").write_text("task: x\ndataset: {source: spam}\ndoc_to_text: '{{text}}'\n")
    r = subprocess.run([sys.executable, "-m", "eval.score", "--model", str(trained[1]), "--tasks",
                        str(tmp_path / "bad.yaml")], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.yaml'}: field 'doc_to_choice': expected the "
                                             "answer choices of a multiple_choice task"]


@pytest.mark.slow
def test_task_file_is_scored_over_templates_and_finetuned(tmp_path, trained, tok_model, moby_prefix):
    path = write_mc_task(str(tmp_path / "t"))
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "eval.score", "--model", str(trained[1]), "--tasks", path,
                        "--shots", "0,2", "--seeds", "2", "--templates", "all", "--placement", "causal,encoder",
                        "--out", str(out), "--log-samples"], capture_output=True, text=True, env=env(), cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.load(open(out / "metalm.json"))
    recs = rep["records"]
    assert len(recs) == 2 * 2 * (1 + 2) and {r["template"] for r in recs} == {"plain", "options"}
    assert all(r["task"] == "user_reviews" and r["n"] == 8 for r in recs)
    for row in rep["templates"]:  # average over templates and the best one, per setting
        mine = [r for r in recs if (r["placement"], r["shots"]) == (row["placement"], row["shots"])]
        per_t = {t: sum(r["metrics"]["acc"] for r in mine if r["template"] == t) /
                 sum(1 for r in mine if r["template"] == t) for t in ("plain", "options")}
        assert row["average"]["acc"] == pytest.approx(sum(per_t.values()) / 2)
        assert row["best"]["acc"] == pytest.approx(max(per_t.values()))
        assert row["best_template"]["acc"] in per_t
    assert "Over templates" in (out / "metalm.md").read_text()
    # finetuning on the same file, no code change: the rows come from its train split
    run = tmp_path / "ft"
    launch(run, "", "", f"checkpoint.init_from={trained[1]}", f"finetune.tasks=[{path}]", "data.seq_length=64",
           "finetune.eval_items=0", "logging.eval_interval=2", "parallel.micro_batch=2", steps=2)
    log = open(run / "metrics.jsonl").read()
    assert '"ft/user_reviews/acc"' in log and '"ft/mean_acc"' in log


# ---------------------------------------------------------------- generative tasks
def write_gen_task(d, tok, moby_jsonl, n=6):
    """Continue a sentence of Moby-Dick: input = its first words, target = the next three (exact match)."""
    os.makedirs(d, exist_ok=True)
    text = json.loads(open(moby_jsonl).readline())["text"].split()
    rows = [{"id": f"m{i}", "start": " ".join(text[40 * i:40 * i + 12]), "rest": " ".join(text[40 * i + 12:
                                                                                          40 * i + 15])}
            for i in range(2 * n)]
    for split, part in (("train", rows[n:]), ("test", rows[:n])):
        with open(os.path.join(d, f"{split}.jsonl"), "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
    path = os.path.join(d, "moby_next.yaml")
    with open(path, "w") as f:
        f.write("task: moby_next\ndataset: {data_files: {train: train.jsonl, test: test.jsonl}}\n"
                "output_type: generate_until\ndoc_to_text: '{{start}}'\ndoc_to_target: rest\n"
                "generation_kwargs: {until: ['.'], max_gen_toks: 8}\n"
                "metric_list: [exact_match, f1, rougeL, bleu, chrf]\n")
    return path


@pytest.fixture(scope="module")
def loaded(trained):
    from eval.inference import load_model

    return load_model(str(trained[1]))


def test_greedy_generation_equals_lm_eval_generate_until(loaded, trained, tmp_path, moby_jsonl):
    pytest.importorskip("lm_eval")
    from eval.lm_eval_bridge import export_task, run
    from eval.score import generate_items

    model, cfg, tok, _ = loaded
    path = write_gen_task(str(tmp_path / "t"), tok, moby_jsonl)
    task = get_task(path)
    items = load_split("", task, "test")
    ours = generate_items(model, tok, task, items, [], "causal", 0, 0, cfg.model.max_seq_length)
    names = export_task(path, "", str(tmp_path / "lm"))
    res = run(str(trained[1]), names, str(tmp_path / "lm"), log_samples=True)
    samples = sorted(res["samples"][names[0]], key=lambda s: s["doc_id"])
    theirs = [s["filtered_resps"][0] for s in samples]
    assert len(theirs) == len(items) and any(theirs)
    assert theirs == ours.predictions
    assert res["results"][names[0]]["exact_match,strip"] == pytest.approx(ours.metrics["exact_match"], abs=1e-12)


def test_beam_one_is_greedy_and_beam_scores_are_the_sequences(loaded, moby_jsonl):
    from eval.generate import GenerationConfig, beam_search, generate_batch, sequence_logprob

    model, cfg, tok, _ = loaded
    text = json.loads(open(moby_jsonl).readline())["text"]
    ids = tok.encode(text)
    L = cfg.model.max_seq_length
    for p in (ids[:6], ids[50:70], ids[200:209], ids[:L - 4]):  # the last one: cut to leave the budget
        greedy = generate_batch(model, tok, [p], GenerationConfig(12), L)[0]
        one = beam_search(model, tok, p, 1, 12, L)
        assert one.ids == greedy.ids and one.text == greedy.text
        kept = p[-(L - 12 - 1):]
        assert one.logprob == pytest.approx(sequence_logprob(model, tok, kept, greedy.ids,
                                                             end=greedy.stopped_by == "eos"), abs=1e-6)
        four = beam_search(model, tok, p, 4, 12, L, length_penalty=0.6)  # reordered caches give the true scores
        n = len(four.ids) + (four.stopped_by == "eos")
        assert four.logprob == pytest.approx(sequence_logprob(model, tok, kept, four.ids,
                                                              end=four.stopped_by == "eos"), abs=1e-6)
        assert four.score == pytest.approx(four.logprob / n ** 0.6)
        assert four.prompt_truncated == one.prompt_truncated == greedy.prompt_truncated == len(p) - len(kept)


def test_beam_search_finds_the_best_sequence_where_it_is_exhaustive(loaded, moby_jsonl):
    """Beam search is not monotone in the beam width in general (a pruned greedy prefix can end better), so "beam
    k >= greedy" is checked where it is a theorem: with as many beams as tokens and two new tokens the search is
    exhaustive; its best must equal a brute-force maximum computed without the cache, and be at least greedy's."""
    from eval.generate import GenerationConfig, _prefill_batch, beam_search, generate_batch, sequence_logprob
    from eval.inference import decode_step, inference_mode, step_mask

    model, cfg, tok, _ = loaded
    text = json.loads(open(moby_jsonl).readline())["text"]
    p = tok.encode(text)[30:38]
    V, L = tok.vocab_size, cfg.model.max_seq_length
    ends = {tok.ids.eos, tok.ids.eod}
    best = beam_search(model, tok, p, V, 2, L, length_penalty=0.0)
    with inference_mode(model):
        row = [tok.ids.bos] + p
        b, valid = _prefill_batch([([], row)], len(row), tok.ids.pad, "cpu")
        first = torch.log_softmax(decode_step(model, b, step_mask(valid, 0, len(row)), None)[0, -1, :V].double(), -1)
        rows = [([], row + [v]) for v in range(V)]
        b, valid = _prefill_batch(rows, len(row) + 1, tok.ids.pad, "cpu")
        nxt = torch.log_softmax(decode_step(model, b, step_mask(valid, 0, len(row) + 1), None)[:, -1, :V].double(),
                                -1)
    two = first[:, None] + nxt  # [first token, second token]
    for e in ends:
        two[e] = float("-inf")  # an end token ends the sequence: [end] alone
    brute = max(float(two.max()), max(float(first[e]) for e in ends))
    assert best.logprob == pytest.approx(brute, abs=1e-6)
    greedy = generate_batch(model, tok, [p], GenerationConfig(2), L)[0]
    assert best.logprob >= sequence_logprob(model, tok, p, greedy.ids, end=greedy.stopped_by == "eos") - 1e-9


def test_generative_scoring_cli_and_metrics_are_the_libraries(trained, tmp_path, moby_jsonl, tok):
    path = write_gen_task(str(tmp_path / "t"), tok, moby_jsonl)
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "eval.score", "--model", str(trained[1]), "--tasks", path,
                        "--shots", "0,1", "--num-beams", "2", "--out", str(out), "--log-samples"],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = json.load(open(out / "metalm.json"))["records"]
    assert [r["shots"] for r in recs] == [0, 1] and all(r["output_type"] == "generate_until" for r in recs)
    assert recs[0]["generation"]["num_beams"] == 2 and recs[0]["generation"]["until"] == ["."]
    samples = [json.loads(l) for l in open(out / "metalm.samples.jsonl")]
    import sacrebleu
    from rouge_score import rouge_scorer

    for rec in recs:
        mine = [s for s in samples if s["shots"] == rec["shots"]]
        preds, refs = [s["prediction"] for s in mine], [s["target"] for s in mine]
        assert all("." not in s["generation"] for s in mine)  # cut before the stop string
        assert rec["metrics"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
        assert rec["metrics"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
        sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        assert rec["metrics"]["rougeL"] == pytest.approx(sum(sc.score(t, p)["rougeL"].fmeasure
                                                             for p, t in zip(preds, refs)) / len(preds))
        assert rec["metrics"]["exact_match"] == pytest.approx(sum(p == t for p, t in zip(preds, refs)) / len(preds))
    rep = subprocess.run([sys.executable, "-m", "eval.report", str(out / "metalm.json"), "--out",
                          str(tmp_path / "summary")], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert rep.returncode == 0, rep.stderr
    assert "| exact_match |" in rep.stdout and (tmp_path / "summary.png").stat().st_size > 1000


def test_squad_normalisation_of_exact_match_and_f1():
    from eval.gen_metrics import compute

    m, per = compute(["exact_match", "squad_em", "f1"], ["The Cat.", "the cat", "a dog ran"],
                     ["cat", "the cat", "the dog sat down"])
    assert per["exact_match"] == [0.0, 1.0, 0.0]  # lm-eval's: the strings as they are
    assert per["squad_em"] == [1.0, 1.0, 0.0]  # SQuAD's: lower case, no punctuation, no articles
    # "dog ran" vs "dog sat down": 1 common token, precision 1/2, recall 1/3 -> F1 0.4
    assert per["f1"] == pytest.approx([1.0, 1.0, 0.4])
    assert m["f1"] == pytest.approx(0.8)


def test_held_out_cluster_never_reaches_the_tuning_rows(tmp_path, tok):
    from data_tools.task_rows import build_task_rows, tuning_tasks

    held = write_mc_task(str(tmp_path / "held"))  # cluster "reviews"
    topics = str(tmp_path / "topics.yaml")
    with open(tmp_path / "topics.jsonl", "w") as f:
        for i, (text, lab) in enumerate([("the match ended in a draw", "sport"), ("rates rose again", "money")] * 8):
            f.write(json.dumps({"text": f"{text} {i}", "topic": lab}) + "\n")
    with open(topics, "w") as f:
        f.write("task: topics\ndataset: {data_files: topics.jsonl, split_fractions: [0.75, 0.25, 0.0]}\n"
                "doc_to_choice: [sport, money]\ndoc_to_target: topic\nmetadata: {cluster: news}\ntemplates:\n"
                "  - {id: a, doc_to_text: '{{text}}', cue: 'Topic:'}\n"
                "  - {id: b, doc_to_text: 'Headline: {{text}}', cue: 'This is about'}\n"
                "  - {id: c, doc_to_text: '{{text}} OPTIONS: </s> sport </s> money </s>', cue: 'Label:'}\n")
    tune, scored = tuning_tasks([held, topics], ["reviews"])
    assert tune == [topics] and scored == [held]
    with pytest.raises(ValueError, match="held_out: user_reviews belong"):
        build_task_rows([held, topics], "", tok, 64, 8, "causal", 0, held_out=["reviews"])
    rows = build_task_rows(tune, "", tok, 64, 16, "causal", 0, held_out=["reviews"], templates="all")
    text = " ".join(tok.decode([int(x) for x in rows[r]["tokens"] if x != tok.ids.pad]) for r in range(len(rows)))
    assert "Headline:" in text and "This is about" in text and "OPTIONS:" in text  # every tuning template
    held_task = get_task(held)
    for split in ("train", "validation", "test"):
        for it in load_split("", held_task, split):
            assert it["review"] not in text  # no held-out item
    for t in held_task.templates:
        assert t.cue not in text  # no held-out template (its cue, its own words)
    assert "Review:" not in text and "The meal was" not in text


def test_lm_eval_bridge_exports_our_task_files(loaded, trained, task_dir, tmp_path):
    """export-task: lm-eval renders our template itself (the same Jinja) over our items; scores equal ours."""
    pytest.importorskip("lm_eval")
    from eval.lm_eval_bridge import export_task, run
    from eval.score import score_items

    model, cfg, tok, _ = loaded
    names = export_task("polarity", str(task_dir), str(tmp_path / "lm"), ["it_is", "reviewer"])
    assert names == ["polarity_it_is", "polarity_reviewer"]
    res = run(str(trained[1]), names, str(tmp_path / "lm"), limit=16)
    items = load_split(str(task_dir), "polarity", "test")[:16]
    for name, tid in zip(names, ("it_is", "reviewer")):
        ours = score_items(model, tok, get_task("polarity").using(tid), items, [], "causal", 0, 0,
                           cfg.model.max_seq_length, cfg.model.max_seq_length).metrics()
        for m in ("acc", "acc_norm"):
            assert res["results"][name][f"{m},none"] == pytest.approx(ours[m], abs=1e-12), (name, m)


def test_task_file_reads_parquet_and_json_data(tmp_path):
    """The data a user brings: a parquet file (pyarrow) and a JSON list, as well as jsonl."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "t"
    write_mc_task(str(d))
    pq.write_table(pa.Table.from_pylist([{"review": t, "sentiment": s} for t, s in REVIEWS]), d / "test.parquet")
    (d / "validation.json").write_text(json.dumps([{"review": t, "sentiment": s} for t, s in REVIEWS[:3]]))
    import yaml

    spec = yaml.safe_load(open(d / "user_reviews.yaml"))
    spec["dataset"] = {"data_files": {"train": "train.jsonl", "validation": "validation.json", "test": "test.parquet"}}
    (d / "user_reviews.yaml").write_text(yaml.safe_dump(spec))
    task = get_task(str(d / "user_reviews.yaml"))
    test = load_split("", task, "test")
    assert [it["label"] for it in test] == [1, 0, 1, 0, 1, 0, 1, 0] and test[2]["id"] == "test/3"
    assert [it["review"] for it in load_split("", task, "validation")] == [t for t, _ in REVIEWS[:3]]
