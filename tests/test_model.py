"""The semi-causal model: mask oracles, flex vs dense, no leak into counted targets, docking, TP=2 == TP=1,
frozen encoder layers, parameter counts."""
import socket

import numpy as np
import pytest
import torch

from pretrain.config import PRESETS, ModelConfig, StackConfig, VisionConfig, preset
from pretrain.model import masks
from pretrain.model.attention import AttentionMask, attend
from tp_worker import fixed_batch, small_config


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1, seed=1)


def build(cfg=None, seed=0):
    from pretrain.model.metalm import MetaLM

    torch.manual_seed(seed)
    m = MetaLM(cfg or small_config())
    return m.eval()


# ---------------------------------------------------------------- masks
def brute(fn, B, L):
    out = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b in range(B):
        for q in range(L):
            for k in range(L):
                out[b, 0, q, k] = bool(fn(b, q, k))
    return out


def random_structure(L=48, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = torch.sort(torch.randint(0, 4, (B, L), generator=g), dim=1).values
    seg = torch.randint(-1, 3, (B, L), generator=g)
    prefix = torch.randint(0, L, (B,), generator=g)
    return docs, seg, prefix


def test_masks_equal_brute_force_definitions():
    docs, seg, prefix = random_structure()
    B, L = docs.shape
    cases = {
        "causal": (masks.causal, lambda b, q, k: q >= k),
        "document_causal": (masks.and_masks(masks.causal, masks.document(docs)),
                            lambda b, q, k: q >= k and docs[b, q] == docs[b, k]),
        "bidirectional_span": (masks.bidirectional_span(seg),
                               lambda b, q, k: q >= k or (seg[b, q] >= 0 and seg[b, q] == seg[b, k])),
        "block_diagonal": (masks.block_diagonal(seg),
                           lambda b, q, k: (seg[b, q] >= 0 and seg[b, q] == seg[b, k]) or q == k),
        "prefix_lm": (masks.prefix_lm(prefix), lambda b, q, k: q >= k or k < prefix[b]),
        "span_and_document": (masks.and_masks(masks.bidirectional_span(seg), masks.document(docs)),
                              lambda b, q, k: (q >= k or (seg[b, q] >= 0 and seg[b, q] == seg[b, k]))
                              and docs[b, q] == docs[b, k]),
    }
    for name, (mm, ref) in cases.items():
        assert torch.equal(masks.dense(mm, B, L), brute(ref, B, L)), name


@pytest.mark.parametrize("kind", ["causal", "document", "span", "block"])
def test_flex_forward_matches_dense_sdpa_on_cpu(kind):
    docs, seg, _ = random_structure(L=256, seed=3)
    mm = {"causal": masks.causal, "document": masks.and_masks(masks.causal, masks.document(docs)),
          "span": masks.bidirectional_span(seg), "block": masks.block_diagonal(seg)}[kind]
    B, L = docs.shape
    q, k, v = (torch.randn(B, 2, L, 16) for _ in range(3))
    dev = torch.device("cpu")
    a = attend(q, k, v, AttentionMask.build(mm, B, L, None, dev, "sdpa"))
    b = attend(q, k, v, AttentionMask.build(mm, B, L, None, dev, "flex_eager"))
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


# ---------------------------------------------------------------- the semi-causal model
def perturb(batch, t, vocab=512):
    """Change decoder token t, and the same token wherever it is docked from the encoder row."""
    b = {k: v.clone() for k, v in batch.items()}
    new = (int(b["tokens"][0, t]) + 1 - 7) % (vocab - 7) + 7
    b["tokens"][0, t] = new
    T, Te = b["tokens"].shape[1], b["enc_tokens"].shape[1]
    hit = (b["dock_dst"] == t).nonzero().flatten()  # sample 0: flat slot == t
    for i in hit.tolist():
        b["enc_tokens"].view(-1)[b["dock_src"][i]] = new
    return b, len(hit) > 0


def spans_of(batch, row=0):
    seg = batch["enc_segments"][row]
    dst = batch["dock_dst"].view(batch["enc_segments"].shape)[row]
    T = batch["tokens"].shape[1]
    out = []
    for k in range(int(seg.max()) + 1):
        pos = (dst[seg == k] - row * T)
        out.append((int(pos.min()), int(pos.max()) + 1))
    return out


def test_no_leak_into_counted_targets():
    model = build()
    batch = fixed_batch()
    spans = spans_of(batch)
    assert len(spans) >= 3
    mask = batch["loss_mask"][0]
    with torch.no_grad():
        base = model.logits(batch)[0]
        probe = sorted({p for s, e in spans for p in (s, s + 1, (s + e) // 2, e - 2, e - 1, e)} | {5, 100, 255})
        for t in probe:
            pert, docked = perturb(batch, t)
            out = model.logits(pert)[0]
            before = torch.arange(t) if t else torch.arange(0)
            counted = before[mask[before] == 1]
            # every counted position p < t predicts x_{p+1} <= x_t from x_0..x_p only: unchanged
            torch.testing.assert_close(out[counted], base[counted], atol=1e-5, rtol=0)
        # and the rule is needed: slot e-2 of a span has seen x_{e-1} through the encoder, so it must not count
        s, e = spans[0]
        pert, docked = perturb(batch, e - 1)
        assert docked and mask[e - 2] == 0
        assert (model.logits(pert)[0][e - 2] - base[e - 2]).abs().max() > 1e-3


def test_docking_changes_decoder_only_from_span_start_and_encoder_sees_only_its_span():
    model = build()
    batch = fixed_batch()
    spans = spans_of(batch)
    with torch.no_grad():
        base = model.logits(batch)[0]
        base_enc = model.encode_spans(batch)
        for k, (s, e) in enumerate(spans):
            pert, docked = perturb(batch, (s + e) // 2)
            assert docked
            out = model.logits(pert)[0]
            torch.testing.assert_close(out[:s], base[:s], atol=1e-5, rtol=0)
            assert (out[s] - base[s]).abs().max() > 1e-4, "the span start slot sees the whole span"
            enc = model.encode_spans(pert)
            Te = batch["enc_tokens"].shape[1]
            seg = batch["enc_segments"][0]
            other = (seg != k).nonzero().flatten()
            torch.testing.assert_close(enc[:Te][other], base_enc[:Te][other], atol=1e-6, rtol=0)
            torch.testing.assert_close(enc[Te:], base_enc[Te:], atol=1e-6, rtol=0)  # other samples


def test_document_mask_isolates_documents():
    model = build(small_config(document_mask=True))
    batch = fixed_batch()
    batch["document_ids"][:] = torch.where(torch.arange(256) < 120, 0, 1).int()
    with torch.no_grad():
        base = model.logits(batch)[0]
        pert, _ = perturb(batch, 50)
        out = model.logits(pert)[0]
    torch.testing.assert_close(out[120:], base[120:], atol=1e-5, rtol=0)


def test_gpt_baseline_is_a_plain_causal_lm():
    cfg = small_config()
    cfg.encoder = None
    model = build(cfg)
    assert model.encoder is None and model.connector is None
    batch = fixed_batch()
    batch["loss_mask"][:] = 1
    loss = model(batch)
    assert torch.isfinite(loss) and abs(loss.item() - np.log(512)) < 0.5


def test_frozen_encoder_layers_get_no_gradient_and_no_optimizer_state():
    from pretrain.model.metalm import trainable_parameters

    model = build(small_config(freeze_encoder_layers=1)).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith("encoder.embedding") or n.startswith("encoder.stack.layers.0.")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model(fixed_batch()).backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in opt.state} == {n for n, _ in model.named_parameters()} - frozen
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, before[n])
    assert not torch.equal(model.encoder.stack.layers[1].attn.qkv.weight, before["encoder.stack.layers.1.attn.qkv.weight"])


def test_activation_checkpointing_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = build(small_config(activation_checkpointing=ckpt)).train()
        model(fixed_batch()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("connector", ["mlp", "resampler"])
def test_vision_language_forward_and_docking(connector):
    cfg = ModelConfig(vocab_size=512, decoder=StackConfig(2, 64, 2, ffn_hidden=128),
                      vision=VisionConfig(StackConfig(1, 32, 2, ffn_hidden=64), image_size=16, patch_size=8),
                      vision_connector=connector, resampler_queries=3)
    model = build(cfg)
    S = cfg.image_slots()
    B, T = 2, 32
    batch = fixed_batch(T=T, B=B, span_length=8)
    g = torch.Generator().manual_seed(0)
    batch["images"] = torch.randn(B, 3, 16, 16, generator=g)
    batch["image_dst"] = torch.cat([torch.arange(2, 2 + S) + b * T for b in range(B)])
    with torch.no_grad():
        base = model.logits(batch)
        pert = dict(batch, images=batch["images"].clone())
        pert["images"][0] += 1.0
        out = model.logits(pert)
    torch.testing.assert_close(out[0, :2], base[0, :2], atol=1e-5, rtol=0)
    assert (out[0, 2:] - base[0, 2:]).abs().max() > 1e-4
    torch.testing.assert_close(out[1], base[1], atol=1e-5, rtol=0)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.param_count()["total"]


@pytest.mark.parametrize("name", ["tiny-cpu", "gpt-baseline-tiny", "tiny-vl"])
def test_param_count_formula_matches_built_model(name):
    model = build(preset(name))
    parts = preset(name).param_count()
    assert sum(p.numel() for p in model.parameters()) == parts["total"]
    assert sum(p.numel() for p in model.decoder.parameters()) == parts["decoder"]


def test_paper_preset_sizes():
    lo = preset("metalm-lo-1.3b").param_count()
    assert 1.25e9 < lo["decoder"] < 1.45e9, lo  # paper: ~1.3B decoder
    assert 0.33e9 < lo["encoder"] < 0.40e9, lo  # paper: ~366M encoder
    assert lo["connector"] == 1024 * 2048
    assert preset("gpt-baseline-1.3b").param_count()["decoder"] == lo["decoder"]
    vl = preset("metalm-vl-350m").param_count()
    assert 0.33e9 < vl["decoder"] < 0.40e9, vl  # paper: GPT-2-medium shape, ~353M
    assert set(PRESETS) >= {"tiny-cpu", "metalm-lo-1.3b", "metalm-vl-350m", "gpt-baseline-1.3b"}
    assert preset("metalm-lo-1.3b").freeze_encoder_layers == 22  # paper: all but the top 2 layers frozen


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(world, tp, out, cfg_kw):
    import torch.multiprocessing as tmp

    import tp_worker

    tmp.start_processes(tp_worker.run, args=(world, tp, free_port(), str(out), cfg_kw), nprocs=world,
                        start_method="spawn", join=True)
    return torch.load(out)


@pytest.mark.slow
def test_tp2_equals_tp1(tmp_path):
    ref = run_workers(1, 1, tmp_path / "tp1.pt", {})
    tp2 = run_workers(2, 2, tmp_path / "tp2.pt", {})
    torch.testing.assert_close(tp2["loss"], ref["loss"], atol=1e-6, rtol=1e-6)
    assert ref["params"].keys() == tp2["params"].keys() and ref["grads"].keys() == tp2["grads"].keys()
    for n in ref["params"]:
        torch.testing.assert_close(tp2["params"][n], ref["params"][n], atol=0, rtol=0, msg=n)
    for n in ref["grads"]:
        torch.testing.assert_close(tp2["grads"][n], ref["grads"][n], atol=1e-6, rtol=1e-4, msg=n)
