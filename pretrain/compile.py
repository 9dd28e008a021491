"""`parallel.compile=true`: torch.compile per transformer block and per connector, as torchtitan and OLMo-core apply
it: after the model is built and its weights loaded, in the one place the engine is built (pretrain/trainer.py), so
that model code does not change. Each module's `forward` is replaced by its compiled version (inductor, static
shapes, `fullgraph=True`): parameters, buffers, hooks and state-dict names stay those of the eager module, so a
compiled run's checkpoint loads into an eager one and back, and DeepSpeed's ZeRO hooks (module hooks, outside the
compiled forward) run as in eager mode. Frozen blocks run compiled too (under no_grad); activation checkpointing
wraps the compiled call.

Graph breaks: megatron-core 0.16's RowParallelLinear passes `tp_group=None` to its own matmul helper, whose
deprecation shim (`get_tensor_model_parallel_group_if_none`) calls `warnings.warn(..., DeprecationWarning)` on rank
0 at every call; dynamo cannot trace that call (7 breaks per block). `quiet_tp_group_shim` returns the same group
without the warning, in megatron's layers module only, when compile is on: 0 breaks per block at TP=1.
`explain(model, batch)` counts graphs and breaks per compiled module (tests/test_compile.py, bench/compile_cpu.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def compiled_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules compiled: every transformer block (decoder, text encoder, vision tower; pipeline stages
    included) and the connectors."""
    from pretrain.model.blocks import Block

    out = []
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, Block) or leaf in ("connector", "vision_connector"):
            out.append((name, m))
    return out


def quiet_tp_group_shim() -> None:
    import megatron.core.tensor_parallel.layers as layers
    from megatron.core import parallel_state

    original = getattr(layers.get_tensor_model_parallel_group_if_none, "__wrapped__", None) or \
        layers.get_tensor_model_parallel_group_if_none

    def group_if_none(tp_group, is_expert=False, check_initialized=True):
        if tp_group is None and torch.distributed.is_initialized() and parallel_state.is_initialized():
            return (parallel_state.get_expert_tensor_parallel_group() if is_expert
                    else parallel_state.get_tensor_model_parallel_group())
        return original(tp_group, is_expert=is_expert, check_initialized=check_initialized)

    group_if_none.__wrapped__ = original
    layers.get_tensor_model_parallel_group_if_none = group_if_none


def compile_model(model: nn.Module, fullgraph: bool = True) -> int:
    """Replace the forward of every block and connector by its torch.compile'd version; returns how many."""
    quiet_tp_group_shim()
    mods = compiled_modules(model)
    for _, m in mods:
        if not hasattr(m, "_eager_forward"):
            m._eager_forward = m.forward
            m.forward = torch.compile(m._eager_forward, dynamic=False, fullgraph=fullgraph)
    return len(mods)


def explain(model: nn.Module, batch: dict) -> dict[str, tuple[int, int]]:
    """{module: (graphs, graph breaks)} from torch._dynamo.explain, for the first module of each kind (the first
    decoder block, the first encoder block, each connector), on the inputs one forward of `model` on `batch` gives
    them."""
    import torch._dynamo as dynamo

    quiet_tp_group_shim()
    calls: dict[str, tuple] = {}
    hooks = []
    for name, m in compiled_modules(model):
        kind = name.split(".layers.")[0] if ".layers." in name else name
        if any(h[0] == kind for h in hooks):
            continue

        def grab(mod, args, kwargs, kind=kind):
            calls.setdefault(kind, (getattr(mod, "_eager_forward", mod.forward), args, kwargs))
        hooks.append((kind, m.register_forward_pre_hook(grab, with_kwargs=True)))
    with torch.no_grad():
        model(batch)
    for _, h in hooks:
        h.remove()
    out = {}
    for kind, (fn, args, kwargs) in calls.items():
        dynamo.reset()
        e = dynamo.explain(fn)(*args, **kwargs)
        out[kind] = (e.graph_count, e.graph_break_count)
    dynamo.reset()
    return out
