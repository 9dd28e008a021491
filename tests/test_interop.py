"""Interoperability with the Megatron-LM / Llama / Hugging Face world: tokenizers users bring (SentencePiece with
its default ids, Llama-2-style, tokenizer.json, GPT-2 BPE files), preprocessing byte-identical to Megatron-LM's
`tools/preprocess_data.py`, and Llama checkpoints with grouped-query attention and rope scaling imported exactly."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_tools.cli import UserError
from data_tools.preprocess import output_prefixes, preprocess
from data_tools.tokenizer import GPT2BPETokenizer, HFTokenizer, Tokenizer, load_tokenizer
from test_train import ROOT, env, launch

HERE = Path(__file__).resolve().parent
SHARED = Path(ROOT).parent / "shared" / "fixtures" / "megatron_preprocess"
# the reference outputs of Megatron-LM's own tool (core_v0.16.1); the team's copy in ../shared when it is there,
# else the copy in tests/fixtures (the same files: their sha256 are checked against the fixture README below)
FIX = SHARED if (SHARED / "small.jsonl").is_file() else HERE / "fixtures" / "megatron_preprocess"
SHA256 = {"spm_text_document.bin": "7b00763ba39c78dee2478cfb1fbe93569ae8ea1dd1ccb167f7f004db90f7bcff",
          "spm_text_document.idx": "a8728d03e3e064e9fc0384d535dc633c673d93f3a0dba63f2c40078193eeb678",
          "hf_text_document.bin": "13b2cab6d0d37373443d1a4eeb85a3d91612d7056ee736be62e836c5cdc9e81a",
          "hf_text_document.idx": "3776ca68c4f0507e04512e3d6f92058e4d0b952805d382051e2ea00ecd6ed244",
          "small.jsonl": "2118ce10c1630cb124cd36cf06dc54ba8a6c07c57eef4e68ec094e16bf20a80e"}
QUIET = dict(progress=False, log=lambda *a, **k: None)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def texts_of(path):
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8")]


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """A GPT-2-format BPE (vocab.json + merges.txt) trained offline with the `tokenizers` package."""
    from tokenizers import ByteLevelBPETokenizer

    d = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts_of(FIX / "small.jsonl"), vocab_size=1500, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.model.save(str(d))
    return str(d / "vocab.json"), str(d / "merges.txt")


@pytest.fixture(scope="module")
def spm_nopad(tmp_path_factory):
    """A SentencePiece model with SentencePiece's defaults (pad = -1) and no byte fallback: id 3 is a word piece."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    (d / "lines.txt").write_text("\n".join(t for t in texts_of(FIX / "small.jsonl") if t.strip()))
    spm.SentencePieceTrainer.Train(input=str(d / "lines.txt"), model_prefix=str(d / "nopad"), vocab_size=800,
                                   minloglevel=2)
    return str(d / "nopad.model")


# ------------------------------------------------------------------ byte identity with Megatron-LM's tool
@pytest.mark.parametrize("name,kind,model", [("spm", "SentencePieceTokenizer", "spm_bpe2k.model"),
                                             ("hf", "HuggingFaceTokenizer", "hf_bpe3k")])
def test_byte_identical_to_megatron_preprocess_data(tmp_path, name, kind, model):
    for f, digest in SHA256.items():
        if f.startswith((name, "small")):
            assert sha256(FIX / f) == digest, f"fixture {f} changed"
    r = subprocess.run([sys.executable, "-m", "data_tools.preprocess", "--input", str(FIX / "small.jsonl"),
                        "--output-prefix", str(tmp_path / name), "--tokenizer-type", kind, "--tokenizer-model",
                        str(FIX / model), "--append-eod", "--workers", "1"],
                       capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    for ext in (".bin", ".idx"):
        ours, theirs = tmp_path / f"{name}_text_document{ext}", FIX / f"{name}_text_document{ext}"
        assert ours.read_bytes() == theirs.read_bytes(), f"{ext} differs from Megatron-LM's"
    if name == "spm":  # the two whitespace-only documents tokenize to nothing: dropped, reported with the reason
        assert "skipped: 2 (tokenizes to no ids: 2)" in r.stdout
        assert "small.jsonl:line 4: tokenizes to no ids" in r.stderr
        assert "small.jsonl:line 11: tokenizes to no ids" in r.stderr
    else:
        assert "skipped: 0" in r.stdout
    # more workers, same bytes
    preprocess([str(FIX / "small.jsonl")], str(tmp_path / "w2"), load_tokenizer(str(FIX / model), kind),
               workers=2, append_eod=True, **QUIET)
    assert (tmp_path / "w2_text_document.bin").read_bytes() == (FIX / f"{name}_text_document.bin").read_bytes()
    assert (tmp_path / "w2_text_document.idx").read_bytes() == (FIX / f"{name}_text_document.idx").read_bytes()
    meta = json.loads((tmp_path / f"{name}_text_document.tokenizer.json").read_text())
    assert meta["tokenizer"]["type"] == kind and meta["tokenizer"]["ids"]["eod"] == (2 if name == "spm" else 0)


def test_megatron_tokenizers_agree(tmp_path):
    """Our backends give the ids megatron-core's own tokenizer classes give (the ones its tools wrap)."""
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer
    from megatron.core.tokenizers.text.libraries.sentencepiece_tokenizer import SentencePieceTokenizer

    texts = texts_of(FIX / "small.jsonl")
    sp_theirs = SentencePieceTokenizer(str(FIX / "spm_bpe2k.model"))
    sp_ours = load_tokenizer(str(FIX / "spm_bpe2k.model"))
    hf_theirs = HuggingFaceTokenizer(str(FIX / "hf_bpe3k"))
    hf_ours = load_tokenizer(str(FIX / "hf_bpe3k"))
    assert isinstance(hf_ours, HFTokenizer) and hf_ours.eod == hf_theirs.eos_id == 0
    assert sp_ours.eod == sp_theirs.eos_id == 2
    for t, a, b in zip(texts, sp_ours.encode_batch_numpy(texts), hf_ours.encode_batch_numpy(texts)):
        assert a.tolist() == sp_theirs.text_to_ids(t)
        assert b.tolist() == hf_theirs.text_to_ids(t)


# ------------------------------------------------------------------ Megatron's test_preprocess_data.py checks
@pytest.mark.parametrize("backend", ["spm", "gpt2"])
def test_megatron_preprocess_test_logic(tmp_path, backend, gpt2_files, capfd):
    """The checks of Megatron-LM's tests/unit_tests/data/test_preprocess_data.py (core_v0.16.1), pointed at our
    tools: several jsonl files preprocessed with Megatron's flags (--workers, --log-interval 1, --append-eod), then
    merged; for every raw line, decode(its tokenization) == decode(the processed document) == decode(the merged
    document), and the merged document index is the inputs' indices concatenated."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    raws, data = tmp_path / "raws", tmp_path / "data"
    raws.mkdir()
    data.mkdir()
    # their dummy inputs: ascending numbers, this file's own lines, plus the fixture's edge cases
    (raws / "numbers.jsonl").write_text("".join(json.dumps({"text": " ".join(str(j + 1) for j in range(i + 1))})
                                                + "\n" for i in range(100)))
    (raws / "source.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in open(__file__)))
    shutil.copyfile(FIX / "small.jsonl", raws / "small.jsonl")
    if backend == "spm":
        tok_args = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(FIX / "spm_bpe2k.model")]
    else:
        tok_args = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", gpt2_files[0], "--merge-file",
                    gpt2_files[1]]
    from data_tools import merge
    from data_tools import preprocess as prep

    names = sorted(p.stem for p in raws.iterdir())
    for name in names:  # the command-line entry points, in-process (the CLI itself is run in the byte-identity test)
        assert prep.main(["--input", str(raws / f"{name}.jsonl"), "--output-prefix", str(data / name), *tok_args,
                          "--append-eod", "--workers", "2", "--log-interval", "1", "--partitions", "1",
                          "--keep-newlines"]) == 0
        assert "processed" in capfd.readouterr().err  # --log-interval lines
    assert merge.main(["--input", *[str(data / f"{n}_text_document") for n in names],
                       "--output-prefix", str(data / "merge")]) == 0
    tok = load_tokenizer(str(FIX / "spm_bpe2k.model")) if backend == "spm" else GPT2BPETokenizer(*gpt2_files)
    merged = IndexedDataset(str(data / "merge"))
    merged_index, at = 0, 0
    for name in names:
        ds = IndexedDataset(str(data / f"{name}_text_document"))
        part = merged.document_indices[at:at + len(ds.document_indices)]
        assert (ds.document_indices == part - part[0]).all(), name
        at += len(ds.document_indices) - 1
        i = 0
        for text in texts_of(raws / f"{name}.jsonl"):
            toks = tok.encode_batch_numpy([text])[0].tolist()
            toks = toks + [tok.eod] if toks else toks
            raw = tok.decode(toks)
            processed, merged_toks = [], []
            while len(processed) < len(toks):
                processed.extend(ds[i].tolist())
                i += 1
            while len(merged_toks) < len(toks):
                merged_toks.extend(merged[merged_index].tolist())
                merged_index += 1
            assert raw == tok.decode(processed) == tok.decode(merged_toks), (name, text[:60])
        assert i == len(ds)
    assert merged_index == len(merged)
    meta = json.loads((data / "merge.tokenizer.json").read_text())
    assert meta["tokenizer"]["type"] == tok.kind


def _gpt2_reference_encode(text: str, vocab: dict, merges: list) -> list[int]:
    """GPT-2's published byte-level BPE algorithm (openai/gpt-2 encoder.py: its regex, bytes_to_unicode, lowest-rank
    merge first), written out here as an independent reference for our `tokenizers`-based backend."""
    import regex

    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_enc = dict(zip(bs, map(chr, cs)))
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    out = []
    for piece in pat.findall(text):
        word = tuple(byte_enc[b] for b in piece.encode("utf-8"))
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out += [vocab[w] for w in word]
    return out


def test_gpt2_bpe_matches_the_reference_algorithm(gpt2_files):
    vocab = json.load(open(gpt2_files[0]))
    merges = [m for m in open(gpt2_files[1], encoding="utf-8").read().split("\n")[1:] if m]
    tok = GPT2BPETokenizer(*gpt2_files)
    assert tok.eod == tok.ids.eos == tok.ids.bos == vocab["<|endoftext|>"]
    texts = texts_of(FIX / "small.jsonl") + ["  two  spaces\tand a tab\n\nnew lines ",
                                             "naïve café 😀 <|endoftext|>"]
    for t in texts:
        ids = tok.encode(t)
        assert ids == _gpt2_reference_encode(t, vocab, merges), t[:60]
        assert tok.decode(ids) == t


# ------------------------------------------------------------------ the tokenizers users bring
def test_special_id_rules_for_foreign_tokenizers(tmp_path, spm_nopad):
    nopad = Tokenizer(spm_nopad)
    assert nopad.id_to_piece(3) not in ("<pad>", "<0x00>") and nopad.ids.pad == nopad.ids.eos == nopad.eod == 2
    llama2 = Tokenizer(str(FIX / "spm_bpe2k.model"))
    assert llama2.id_to_piece(3) == "<0x00>" and (llama2.ids.bos, llama2.eod) == (1, 2)
    hf = HFTokenizer(str(FIX / "hf_bpe3k" / "tokenizer.json"))  # the file alone, or its directory
    assert (hf.ids.bos, hf.ids.eos, hf.ids.pad, hf.eod) == (0, 0, 0, 0)
    assert load_tokenizer(str(FIX / "hf_bpe3k"), eod_id=5).eod == 5
    # a tokenizer.json-only directory (Llama-3 style) is found, and what is missing is named
    only = tmp_path / "only"
    only.mkdir()
    shutil.copyfile(FIX / "hf_bpe3k" / "tokenizer.json", only / "tokenizer.json")
    assert load_tokenizer(str(only)).kind == "HuggingFaceTokenizer"
    with pytest.raises(UserError, match="no tokenizer.json, tokenizer.model or vocab.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(UserError, match="GPT2BPETokenizer needs --merge-file"):
        load_tokenizer(kind="GPT2BPETokenizer", vocab_file=str(tmp_path / "bad.json"))


def test_megatron_flags_accepted_or_refused_by_name(tmp_path):
    base = [sys.executable, "-m", "data_tools.preprocess", "--input", str(FIX / "small.jsonl"), "--output-prefix",
            str(tmp_path / "o"), "--tokenizer-model", str(FIX / "spm_bpe2k.model")]
    for extra, msg in ((["--split-sentences"], "--split-sentences (a Megatron-LM flag): sentence splitting"),
                       (["--tokenizer-type", "Llama2Tokenizer"], "--tokenizer-type Llama2Tokenizer: not supported"),
                       (["--lang", "english"], "--lang (a Megatron-LM flag)")):
        r = subprocess.run(base + extra, capture_output=True, text=True, env=env(), cwd=ROOT)
        assert r.returncode == 2 and r.stderr.strip().startswith(f"error: {msg}"), r.stderr
        assert "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_training_reads_the_recorded_tokenizer_and_refuses_another(tmp_path, tok_model):
    from pretrain.config import ConfigError, load_config
    from pretrain.checks import resolve_tokenizer

    preprocess([str(FIX / "small.jsonl")], str(tmp_path / "d"), load_tokenizer(str(FIX / "hf_bpe3k")),
               append_eod=True, **QUIET)
    prefix = output_prefixes(str(tmp_path / "d"), ["text"])[0]
    cfg = load_config(None, [f"data.data_path=[{prefix}]"])
    tok = resolve_tokenizer(cfg)  # no tokenizer in the config: the dataset's record names it
    assert tok.kind == "HuggingFaceTokenizer" and cfg.data.tokenizer_type == "HuggingFaceTokenizer"
    assert cfg.data.tokenizer_model == str(FIX / "hf_bpe3k")
    cfg = load_config(None, [f"data.data_path=[{prefix}]", f"data.tokenizer_model={tok_model}"])
    with pytest.raises(ConfigError, match=r"made with another tokenizer .* eod 0 vs 4"):
        resolve_tokenizer(cfg)


# ------------------------------------------------------------------ Llama checkpoints in and out
def random_llama(out: Path, rope: dict | None = None, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    params = {"rope_type": "default", "rope_theta": 10000.0, **(rope or {})}
    kw = dict(vocab_size=3000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rope_parameters=params,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    model.save_pretrained(out)
    for f in os.listdir(FIX / "hf_bpe3k"):
        shutil.copyfile(FIX / "hf_bpe3k" / f, out / f)
    return model


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    batch = {"tokens": ids, "position_ids": torch.arange(T).expand(B, -1),
             "document_ids": torch.zeros(B, T, dtype=torch.int32)}
    with torch.no_grad():
        return model.logits(batch)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0}, LLAMA3],
                         ids=["gqa", "gqa+linear", "gqa+llama3"])
def test_llama_import_matches_transformers_and_exports_back(tmp_path, rope):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from pretrain.convert import export_hf, import_hf, load_consolidated

    hf = random_llama(tmp_path / "hf", rope)
    ours_dir = import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    model, cfg, tok = load_consolidated(ours_dir)
    d = cfg.model.decoder
    assert (d.heads, d.kv_heads, d.head_dim) == (4, 2, 32) and tok.kind == "HuggingFaceTokenizer"
    ids = torch.randint(0, 3000, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (our_logits(model, ids) - ref).abs().max().item() <= 1e-4
    if rope:  # the scaling matters at these positions: without it the logits are off
        import dataclasses

        from pretrain.model.metalm import MetaLM

        plain = dataclasses.replace(cfg.model, decoder=dataclasses.replace(d, rope_scaling=None))
        m2 = MetaLM(plain).eval()
        m2.load_state_dict(model.state_dict())
        assert (our_logits(m2, ids) - ref).abs().max().item() > 1e-3
    back = export_hf(ours_dir, str(tmp_path / "back"))
    a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hf2 = LlamaForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        assert torch.equal(hf2(ids).logits, ref)
    assert hf2.config.num_key_value_heads == 2 and hf2.config.rope_parameters["rope_type"] == (rope or {}).get(
        "rope_type", "default")


REFUSED = [
    (dict(hidden_act="gelu"), "hidden_act 'gelu': only silu"),
    (dict(attention_bias=True), "attention_bias=true: biases are not supported"),
    (dict(mlp_bias=True), "mlp_bias=true: biases are not supported"),
    (dict(rope=({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
     "rope_scaling type 'yarn' is not supported"),
    (dict(rope=({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5})),
     "partial_rotary_factor=0.5"),
]


def test_unsupported_llama_fields_refused_with_exit_2(tmp_path):
    from pretrain.convert import ConvertError, import_hf

    for i, (over, msg) in enumerate(REFUSED):
        over = dict(over)
        d = tmp_path / f"m{i}"
        random_llama(d, over.pop("rope", None), **over)
        if i == 0:  # the command line: one line, exit 2, no traceback, nothing written
            r = subprocess.run([sys.executable, "-m", "pretrain.convert", "import-hf", "--hf", str(d), "--out",
                                str(tmp_path / "out")], capture_output=True, text=True, env=env(), cwd=ROOT)
            assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
        else:
            with pytest.raises(ConvertError, match=msg.replace("(", r"\(").replace("[", r"\[")):
                import_hf(str(d), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_gqa_under_tensor_parallel_equals_one_process(tmp_path):
    """A GQA model (4 heads, 2 kv heads) split over TP=2 gives the logits of TP=1 (each rank one kv group)."""
    from pretrain.convert import import_hf

    import torch.multiprocessing as tmp

    import tp_worker
    from pretrain.model_io import load_consolidated
    from test_train import free_port

    random_llama(tmp_path / "hf")
    ours = import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"))
    (tmp_path / "tp").mkdir()
    tmp.start_processes(tp_worker.run_gqa_logits, args=(2, free_port(), ours, str(tmp_path / "tp")), nprocs=2,
                        start_method="spawn", join=True)

    model, _, _ = load_consolidated(ours)
    ids = torch.load(tmp_path / "tp" / "ids.pt")
    full = our_logits(model, ids)
    got = torch.load(tmp_path / "tp" / "logits.pt")
    assert (got - full).abs().max().item() <= 1e-5


# ------------------------------------------------------------------ preprocess -> train -> export -> transformers
@pytest.mark.parametrize("which", ["spm_pad_minus_1", "llama2_spm", "tokenizer_json_dir", "tokenizer_json_only"])
def test_foreign_tokenizer_end_to_end(tmp_path, which, spm_nopad):
    """Each tokenizer a user brings goes through preprocess -> train 2 steps -> consolidate -> export-hf, and the
    export's logits in transformers equal ours. The training config names no tokenizer: it is read from the
    dataset's PREFIX.tokenizer.json, and recorded in the checkpoint's config and the exports. The export carries
    the model's special tokens for every kind (a bare tokenizer.json included): transformers pads a batch with it,
    and the lm-eval bridge scores it."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pretrain.convert import export_hf, load_consolidated, read_checkpoint, resolve_tokenizer, write_consolidated

    if which == "tokenizer_json_only":  # what a user's own `tokenizers` training leaves: no config files
        (tmp_path / "own").mkdir()
        shutil.copyfile(FIX / "hf_bpe3k" / "tokenizer.json", tmp_path / "own" / "tokenizer.json")
    model_path = {"spm_pad_minus_1": spm_nopad, "llama2_spm": str(FIX / "spm_bpe2k.model"),
                  "tokenizer_json_dir": str(FIX / "hf_bpe3k"), "tokenizer_json_only": str(tmp_path / "own")}[which]
    tok = load_tokenizer(model_path)
    preprocess([str(FIX / "small.jsonl")], str(tmp_path / "d"), tok, append_eod=True, **QUIET)
    prefix = output_prefixes(str(tmp_path / "d"), ["text"])[0]
    launch(tmp_path / "run", "", prefix, "model.vocab_size=3072", "checkpoint.save_interval=2", steps=2)
    cfg, sd, info = read_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert cfg.data.tokenizer_type == tok.kind and cfg.data.tokenizer_model == os.path.abspath(model_path)
    cons = write_consolidated(str(tmp_path / "cons"), cfg, sd, resolve_tokenizer(cfg), info)
    model, _, tok2 = load_consolidated(cons)
    assert tok2.spec()["ids"] == tok.spec()["ids"]
    hf_dir = export_hf(cons, str(tmp_path / "hf"))
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    text = texts_of(FIX / "small.jsonl")[1]
    ids = torch.tensor([[tok.ids.bos] + tok.encode(text)])
    with torch.no_grad():
        assert (our_logits(model, ids) - hf(ids).logits).abs().max().item() <= 1e-4
    assert hf.generation_config.eos_token_id in (tok.eod, [tok.eod])  # eos and eod are one id here
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    # line by line: transformers' conversion of a SentencePiece model does not reproduce its control-character
    # normalisation (a newline), which is transformers' limitation, not the export's
    for line in text.split("\n"):
        assert hf_tok(line, add_special_tokens=False)["input_ids"] == tok.encode(line), line
    piece = tok.id_to_piece
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.bos_token) == (piece(tok.ids.eos), piece(tok.ids.pad),
                                                                      piece(tok.ids.bos))
    batch = hf_tok(["a whale", "a whale is a very large animal that lives in the sea"], padding=True,
                   add_special_tokens=False)
    short = [i for i, m in zip(batch["input_ids"][0], batch["attention_mask"][0]) if not m]
    assert len(set(map(len, batch["input_ids"]))) == 1 and short and set(short) == {tok.ids.pad}
    if which == "tokenizer_json_only":
        pytest.importorskip("lm_eval")
        from eval.lm_eval_bridge import make_task, run

        lines = [l for l in text.split("\n") if len(l.split()) > 8][:4]
        with open(tmp_path / "items.jsonl", "w") as f:
            for i, l in enumerate(lines):
                words = l.split()
                f.write(json.dumps({"context": " ".join(words[:-4]), "choices": [" ".join(words[-4:]), "no"],
                                    "label": 0}) + "\n")
        make_task("own_mc", str(tmp_path / "items.jsonl"), str(tmp_path / "tasks"))
        res = run(cons, ["own_mc"], str(tmp_path / "tasks"))
        assert res["results"]["own_mc"]["sample_len"] == len(lines)
