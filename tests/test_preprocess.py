"""Preprocessing: Megatron interop both ways, ordering across workers, input formats, and every bad input."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_tools.cli import UserError, import_indexed_dataset
from data_tools.preprocess import output_prefixes, preprocess

indexed = import_indexed_dataset()
QUIET = dict(progress=False, log=lambda *a, **k: None)


def docs_of(path):
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8")]


def read_docs(prefix):
    ds = indexed.IndexedDataset(prefix)
    d = ds.document_indices
    return [np.concatenate([ds[j] for j in range(d[i], d[i + 1])]) for i in range(len(d) - 1)]


def test_written_dataset_read_back_exactly_by_megatron(moby_prefix, moby_jsonl, tok):
    got = read_docs(moby_prefix)
    texts = docs_of(moby_jsonl)
    assert len(got) == len(texts)
    for text, ids in zip(texts, got):
        np.testing.assert_array_equal(ids, tok.encode(text) + [tok.eod])
    assert indexed.IndexedDataset(moby_prefix).index.dtype == np.uint16


def test_workers_preserve_order_and_bytes(tmp_path, moby_jsonl, tok_model, moby_prefix):
    preprocess([moby_jsonl], str(tmp_path / "one"), tok_model, workers=1, append_eod=True, **QUIET)
    one = output_prefixes(str(tmp_path / "one"), ["text"])[0]
    for ext in (".bin", ".idx"):
        assert open(one + ext, "rb").read() == open(moby_prefix + ext, "rb").read()


def test_dataset_written_by_megatron_builder_is_read_by_our_tools(tmp_path, tok_model, tok):
    from data_tools.datasets import DataConfig, build_datasets
    from data_tools.inspect import inspect, read_header
    from data_tools.merge import merge

    prefix = str(tmp_path / "mc")
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(7, 900, size=int(n)), tok.eod) for n in rng.integers(50, 3000, size=40)]
    b = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        b.add_document(d, [len(d)])
    b.finalize(prefix + ".idx")
    assert read_header(prefix + ".idx")["dtype_code"] == 4
    out = inspect(prefix, tok_model, decode=[3])
    assert "documents: 40" in out and f"tokens: {sum(map(len, docs)):,}" in out
    merge([prefix, prefix], str(tmp_path / "mm"))
    merged = read_docs(str(tmp_path / "mm"))
    assert len(merged) == 80
    np.testing.assert_array_equal(merged[45], docs[5])
    train, _, _ = build_datasets(DataConfig(data_path=[prefix], split="100,0,0", seq_length=256), tok, [10, 0, 0])
    flat = np.concatenate(docs)
    s = train[0]
    # the sample is a contiguous run of some shuffled document order; its tokens exist in the data
    assert set(s["tokens"].tolist()) <= set(flat.tolist())


def test_parquet_text_and_gz_inputs(tmp_path, tok_model, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["The whale surfaced.", "Ahab stood on deck,\nwatching.", "Call me Ishmael."]
    pq.write_table(pa.table({"body": texts, "n": [1, 2, 3]}), tmp_path / "a.parquet")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    (tmp_path / "c.txt").write_text(texts[1])
    for name, key in (("a.parquet", "body"), ("b.jsonl.gz", "text"), ("c.txt", "text")):
        s = preprocess([str(tmp_path / name)], str(tmp_path / name), tok_model, json_keys=[key], **QUIET)
        got = read_docs(output_prefixes(str(tmp_path / name), [key])[0])
        want = texts if name != "c.txt" else [texts[1]]
        assert [tok.decode(g) for g in got] == want and s.documents == len(want)


def test_multiple_keys_give_one_dataset_each(tmp_path, tok_model, tok):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"q": "question one", "a": "answer one"}) + "\n"
                 + json.dumps({"q": "question two"}) + "\n")
    s = preprocess([str(p)], str(tmp_path / "qa"), tok_model, json_keys=["q", "a"], **QUIET)
    assert s.documents == 1 and s.skipped["missing key"] == 1
    q, a = output_prefixes(str(tmp_path / "qa"), ["q", "a"])
    assert tok.decode(read_docs(q)[0]) == "question one" and tok.decode(read_docs(a)[0]) == "answer one"


BAD_LINES = [
    (b'{"text": "caf\xe9 au lait"}\n', "invalid UTF-8"),
    (b"this is not json\n", "not JSON"),
    (b'{"title": "no text key"}\n', "missing key"),
    (b'{"text": 42}\n', "not a string"),
    (b'{"text": ""}\n', "tokenizes to no ids"),  # Megatron's one reason to drop a document
    (b'["a", "list"]\n', "not an object"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_record_skipped_counted_and_located(tmp_path, tok_model, line, reason):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"text": "good one"}\n' + line + b'{"text": "good two"}\n')
    msgs = []
    s = preprocess([str(p)], str(tmp_path / "out"), tok_model, progress=False, log=lambda m, **k: msgs.append(m))
    assert s.documents == 2 and s.skipped == {reason: 1}
    assert msgs and f"{p}:line 2: {reason}" in msgs[0]
    with pytest.raises(UserError, match=f"{p}:line 2: {reason}.*--strict"):
        preprocess([str(p)], str(tmp_path / "strict"), tok_model, strict=True, **QUIET)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("strict")], "a failed run leaves no output"


def test_truncated_gzip(tmp_path, tok_model):
    p = tmp_path / "t.jsonl.gz"
    payload = gzip.compress(b"".join(json.dumps({"text": f"document {i} " * 20}).encode() + b"\n"
                                     for i in range(2000)))
    p.write_bytes(payload[: len(payload) // 2])
    s = preprocess([str(p)], str(tmp_path / "t"), tok_model, **QUIET)
    assert s.skipped["truncated or corrupt gzip"] == 1 and 0 < s.documents < 2000
    with pytest.raises(UserError, match=r"t\.jsonl\.gz:line \d+: truncated or corrupt gzip"):
        preprocess([str(p)], str(tmp_path / "t2"), tok_model, strict=True, **QUIET)


def test_parquet_without_column(tmp_path, tok_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match=r"a\.parquet: no column 'text' \(columns: body\)"):
        preprocess([str(tmp_path / "a.parquet")], str(tmp_path / "o"), tok_model, **QUIET)


def test_empty_input_and_all_bad(tmp_path, tok_model):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(UserError, match="no documents.*empty input"):
        preprocess([str(tmp_path / "e.jsonl")], str(tmp_path / "o"), tok_model, **QUIET)
    (tmp_path / "b.jsonl").write_text("nope\n")
    with pytest.raises(UserError, match="all skipped"):
        preprocess([str(tmp_path / "b.jsonl")], str(tmp_path / "o"), tok_model, **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["b.jsonl", "e.jsonl"]


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, moby_jsonl, tok_model, monkeypatch):
    import data_tools.preprocess as pp

    calls = {"n": 0}
    real = pp._encode_chunk

    def dying(chunk):
        calls["n"] += 1
        if calls["n"] == 2:  # the corpus makes two chunks: die on the last one
            raise KeyboardInterrupt
        return real(chunk)

    monkeypatch.setattr(pp, "_encode_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        preprocess([moby_jsonl], str(tmp_path / "x"), tok_model, workers=1, **QUIET)
    assert os.listdir(tmp_path) == []


def test_cli_errors_are_one_line(tmp_path, tok_model):
    r = subprocess.run([sys.executable, "-m", "data_tools.preprocess", "--input", str(tmp_path / "missing.jsonl"),
                        "--output-prefix", str(tmp_path / "o"), "--tokenizer-model", tok_model],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"error: input not found: {tmp_path / 'missing.jsonl'}"
    for mod in ("corpora", "tokenizer", "preprocess", "merge", "inspect", "datasets", "demo"):
        r = subprocess.run([sys.executable, "-m", f"data_tools.{mod}", "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout, mod


def test_foreign_sentencepiece_model_uses_its_own_ids(tmp_path, moby_jsonl):
    """A SentencePiece model not trained by us (default special ids, no pad) is accepted with its own ids: pad and
    end of document fall back to eos (the documented rules), and nothing claims the project's </d> or <image>."""
    import sentencepiece as spm

    from data_tools.tokenizer import Tokenizer

    lines = tmp_path / "l.txt"
    lines.write_text("\n".join(docs_of(moby_jsonl)[0].splitlines()[:3000]))
    spm.SentencePieceTrainer.Train(input=str(lines), model_prefix=str(tmp_path / "f"), vocab_size=300,
                                   minloglevel=2)
    tok = Tokenizer(str(tmp_path / "f.model"))
    assert not tok.native and (tok.ids.unk, tok.ids.bos, tok.ids.eos) == (0, 1, 2)
    assert tok.ids.pad == tok.ids.eos == tok.eod == 2 and tok.ids.image is None
    assert Tokenizer(str(tmp_path / "f.model"), eod_id=7).eod == 7
    with pytest.raises(UserError, match="eod_id 300 is outside the vocabulary"):
        Tokenizer(str(tmp_path / "f.model"), eod_id=300)


def test_tokenizer_special_ids(tok):
    assert (tok.ids.unk, tok.ids.bos, tok.ids.eos, tok.ids.pad, tok.ids.eod) == (0, 1, 2, 3, 4)
    assert tok.encode("</d>")[-1] == tok.eod and tok.id_to_piece(tok.ids.image) == "<image>"
    assert tok.decode(tok.encode("Call me Ishmael. 1851 ½")) == "Call me Ishmael. 1851 ½"  # byte fallback


def test_gutenberg_header_stripped():
    from data_tools.corpora import strip_gutenberg

    raw = ("The Project Gutenberg EBook of X\nlicence blah\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
           "Real text.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
    assert strip_gutenberg(raw) == "Real text.\n"
    assert strip_gutenberg("No header here.\n") == "No header here.\n"


def test_corpus_jsonl_has_source_and_ids(moby_jsonl):
    rows = [json.loads(l) for l in open(moby_jsonl)]
    assert len(rows) == 135 and rows[0]["source"] == "moby-dick" and rows[0]["id"] == "moby-dick/chapter_1"
    assert rows[0]["text"].startswith("CHAPTER 1. Loomings.")
    meta = json.load(open(moby_jsonl.replace(".jsonl", ".meta.json")))
    assert meta["licence"] and len(meta["archive_sha256"]) == 64


def test_word_cache_encoding_is_exact(tok, moby_jsonl):
    assert tok.word_cache_exact
    texts = docs_of(moby_jsonl)[:40] + ["", " ", "  lead", "trail  ", "a  b   c", "tab\there", "new\nline x",
                                        "ünï cödé 漢字 x", "1999 2000", " </d> <image> x", "x" * 5000]
    got = tok.encode_batch_numpy(texts) + tok.encode_batch_numpy(texts)  # cold and warm cache
    for t, ids in zip(texts * 2, got):
        assert ids.tolist() == tok.encode(t), t[:40]
