"""Samples over megatron-core GPTDataset: document ids, blending, cached indices, resume, gpt mode."""
import os

import numpy as np
import pytest

from data_tools.cli import UserError
from data_tools.datasets import DataConfig, MicroBatches, build_datasets, gpt_sample_with_document_ids


@pytest.fixture(scope="module")
def train(moby_prefix, tok, tmp_path_factory):
    cfg = DataConfig(data_path=[moby_prefix], split="90,10,0", seq_length=512,
                     cache_dir=str(tmp_path_factory.mktemp("cache")))
    return build_datasets(cfg, tok, [200, 20, 0])[0]


def test_document_ids_follow_end_of_document_tokens(train, tok):
    for i in range(40):
        text, doc_ids = gpt_sample_with_document_ids(train.gpt, i)
        assert len(text) == len(doc_ids) == 513
        change = np.flatnonzero(np.diff(doc_ids)) # last position of each document but the sample's last
        assert (text[change] == tok.eod).all(), "a document changes exactly after its </d> token"
        inner_eod = np.flatnonzero(text[:-1] == tok.eod)
        np.testing.assert_array_equal(inner_eod, change)


def test_samples_match_megatron_gpt_sample(train):
    for i in (0, 7, 99):
        mc = train.gpt[i]  # megatron-core's own __getitem__
        s = train[i]
        np.testing.assert_array_equal(s["tokens"], mc["tokens"].numpy())
        np.testing.assert_array_equal(s["labels"], mc["labels"].numpy())


def test_spans_never_contain_document_end(train, tok):
    n_spans = 0
    for i in range(100):
        s = train[i]
        for a, b in s["spans"]:
            assert not (s["tokens"][a:b] == tok.eod).any()
            n_spans += 1
    assert n_spans > 100


def test_deterministic_and_cached(moby_prefix, tok, train):
    cache = train.gpt.config.path_to_cache
    assert any(f.endswith("shuffle_index.npy") for f in os.listdir(cache))
    again = build_datasets(DataConfig(data_path=[moby_prefix], split="90,10,0", seq_length=512, cache_dir=cache),
                           tok, [200, 20, 0])[0]
    for i in (0, 5, 150):
        a, b = train[i], again[i]
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_resume_from_consumed_samples(train):
    full = list(MicroBatches(train, micro_batch=4, dp_size=2, dp_rank=1))
    resumed = list(MicroBatches(train, micro_batch=4, dp_size=2, dp_rank=1, consumed_samples=8 * 5))
    assert len(full) == len(resumed) + 5
    for a, b in zip(full[5:], resumed):
        for k in a:
            assert (a[k] == b[k]).all()
    with pytest.raises(ValueError, match="multiple"):
        MicroBatches(train, micro_batch=4, dp_size=2, consumed_samples=6)


def test_blending_follows_weights(work, moby_prefix, tok, tmp_path):
    from data_tools.merge import merge

    other = str(tmp_path / "other")
    merge([moby_prefix], other)
    cfg = DataConfig(data_path=[0.75, moby_prefix, 0.25, other], split="100,0,0", seq_length=256,
                     cache_dir=str(tmp_path / "cache"))
    blended = build_datasets(cfg, tok, [400, 0, 0])[0]
    counts = np.bincount(np.asarray(blended.gpt.dataset_index[:400]), minlength=2)
    assert abs(counts[0] / 400 - 0.75) < 0.01
    assert blended[3]["tokens"].shape == (256,)


def test_gpt_mode_same_tokens_no_spans(moby_prefix, tok, train):
    cfg = DataConfig(data_path=[moby_prefix], split="90,10,0", seq_length=512, mode="gpt",
                     cache_dir=train.gpt.config.path_to_cache)
    gpt = build_datasets(cfg, tok, [200, 20, 0])[0]
    a, b = gpt[3], train[3]
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert a["loss_mask"].all() and a["enc_tokens"].shape == (0,) and len(b["spans"]) > 0


def test_split_without_documents_is_an_error(moby_prefix, tok, tmp_path):
    cfg = DataConfig(data_path=[moby_prefix], split="999,1,0", seq_length=256, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="valid split gets 0 of its 135 documents"):
        build_datasets(cfg, tok, [10, 10, 0])
    with pytest.raises(UserError, match="not found"):
        build_datasets(DataConfig(data_path=[str(tmp_path / "nope")]), tok, [10, 0, 0])
