"""GPU-only checks (skipped without CUDA; run by bench/gpu_check.sh on a GPU machine): FlexAttention forward and
backward against the dense SDPA path, and the full model with both backends."""
import pytest
import torch

from pretrain.model import masks
from pretrain.model.attention import AttentionMask, attend

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_flex_forward_backward_matches_dense(dtype, tol):
    from bench.attention_gpu import structure

    dev = torch.device("cuda")
    B, H, L, D = 2, 4, 1024, 64
    docs, spans = structure(B, L, dev)
    mm = masks.and_masks(masks.bidirectional_span(spans), masks.document(docs))
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(B, H, L, D, device=dev, dtype=dtype)
    results = []
    for backend in ("flex", "sdpa"):
        for t in (q, k, v):
            t.grad = None
        out = attend(q, k, v, AttentionMask.build(mm, B, L, None, dev, backend))
        out.backward(g)
        results.append([out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    for a, b in zip(*results):
        assert rel(a, b) <= tol


@cuda
def test_model_flex_equals_sdpa_on_gpu():
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed()
    init_model_parallel(1, 1)
    from pretrain.model.metalm import MetaLM
    from tp_worker import fixed_batch, small_config

    batch = {k: v.cuda() for k, v in fixed_batch().items()}
    losses, grads = [], []
    for backend in ("flex", "sdpa"):
        torch.manual_seed(0)
        model = MetaLM(small_config(attention_backend=backend)).cuda()
        loss = model(batch)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert abs(losses[0] - losses[1]) < 1e-4
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-3)
