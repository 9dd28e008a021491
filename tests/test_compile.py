"""`parallel.compile` (pretrain/compile.py): no host synchronisation in forward + backward, no graph breaks in a
block or connector at TP=1, compiled = eager (losses over 20 steps, gradients after one), and a compiled run's
checkpoint resumes eagerly and back under ZeRO-2."""
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.tp_worker import fixed_batch, small_config, vl_batch, vl_config

# ops that make the host wait for a value computed by the device (or shapes that depend on data)
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "item", "unique", "is_nonzero", "equal",
            "masked_scatter")


class SyncDetector(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            self.hits[name] = self.hits.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def models():
    return {"metalm": (small_config(), fixed_batch()),
            "gpt": (dataclasses.replace(small_config(), encoder=None), fixed_batch()),
            "vl": (vl_config(), vl_batch())}


def build(cfg, seed=0):
    from pretrain.model.metalm import MetaLM
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    torch.manual_seed(seed)
    return MetaLM(cfg)


def test_no_host_sync_in_forward_and_backward():
    """Counted by a dispatch mode over one forward + backward (the detector sees a deliberate .item())."""
    with SyncDetector() as d:
        torch.ones(2).sum().item()
    assert d.hits == {"_local_scalar_dense": 1}
    for name, (cfg, batch) in models().items():
        model = build(cfg)
        with SyncDetector() as d:
            model(batch).backward()
        assert d.hits == {}, f"{name}: host syncs in the step: {d.hits}"


@pytest.mark.slow
def test_no_graph_breaks_in_blocks_and_connectors():
    from pretrain.compile import explain

    for name, (cfg, batch) in models().items():
        got = explain(build(cfg), batch)
        kinds = {k.split(".")[0] for k in got}
        assert {"decoder"} <= kinds and ("vision" in kinds if name == "vl" else True), got
        assert all(graphs == 1 and breaks == 0 for graphs, breaks in got.values()), (name, got)


@pytest.mark.slow
def test_compiled_equals_eager_over_20_steps():
    from pretrain.compile import compile_model

    for name, (cfg, batch) in models().items():
        runs = {}
        for compiled in (False, True):
            model = build(cfg)
            if compiled:
                assert compile_model(model) > 0
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            losses, grads = [], None
            for step in range(20):
                loss = model(batch)
                loss.backward()
                if step == 0:
                    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            runs[compiled] = (losses, grads, sorted(model.state_dict()))
        (le, ge, ke), (lc, gc, kc) = runs[False], runs[True]
        assert ke == kc, "state-dict names changed by compiling"
        for a, b in zip(le, lc):
            assert b == pytest.approx(a, rel=1e-5), (name, le, lc)
        assert ge.keys() == gc.keys()
        for n in ge:
            torch.testing.assert_close(gc[n], ge[n], atol=1e-5, rtol=1e-5, msg=f"{name}: {n}")


@pytest.mark.slow
def test_checkpoints_interchange_between_compiled_and_eager(tmp_path, tok_model, moby_prefix):
    """ZeRO-2, one 6-step schedule: steps 1-2 compiled (killed before step 3), 3-4 eager resumed from that checkpoint
    (killed before step 5), 5-6 compiled again = 6 eager steps, within 1e-5. (ZeRO-3 compiled works too, with a graph
    break at each submodule where ZeRO-3 gathers parameters, but recompiles for minutes on CPU: measured by hand, in
    the closing note, not in the suite.)"""
    from tests.test_train import launch, losses

    common = ["parallel.deepspeed=zero2", "checkpoint.save_interval=2"]
    launch(tmp_path / "eager", tok_model, moby_prefix, *common, steps=6)
    said = []
    for die_at, compiled in ((3, True), (5, False), (0, True)):
        r = launch(tmp_path / "mixed", tok_model, moby_prefix, *common,
                   *(["parallel.compile=true"] if compiled else []),
                   *([f"callbacks=[{{path: tests.fault_injection.FaultInjection, die_at_step: {die_at}}}]"] if die_at
                     else []), steps=6, check=not die_at)
        said.append(("compile: torch.compile on 4 blocks and connectors" in r.stdout, "resumed from" in r.stdout))
    assert said == [(True, False), (False, True), (True, True)]
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "mixed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)
