"""Process groups and parallel state: torch.distributed + megatron-core parallel_state (TP, PP, DP), seeding, and
the one CPU shim megatron-core needs when CUDA is absent.

megatron-core calls torch.cuda directly in places that have nothing to do with a GPU (current_device for
allocation, the CUDA RNG state in its RNG tracker and activation checkpointing, synchronize, nvtx ranges).
`apply_cpu_shim` redirects exactly those to CPU equivalents, and only when CUDA is unavailable, so the same model
code runs its tensor-parallel layers on CPU/gloo in tests and on NCCL on GPUs.
"""
from __future__ import annotations

import importlib
import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

_SHIM_APPLIED = False


def apply_cpu_shim() -> None:
    """Make megatron-core's torch.cuda calls work on a CPU-only machine (no-op when CUDA is available)."""
    global _SHIM_APPLIED
    if _SHIM_APPLIED or torch.cuda.is_available():
        return
    cuda = torch.cuda

    def get_state(device=None):
        return torch.get_rng_state()

    def set_state(state, device=None):
        torch.set_rng_state(state)

    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.get_rng_state = get_state
    cuda.set_rng_state = set_state
    cuda.random.get_rng_state = get_state
    cuda.random.set_rng_state = set_state
    # torch.manual_seed calls torch.cuda.manual_seed_all: redirecting cuda.manual_seed to it would recurse
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp_random = importlib.import_module("megatron.core.tensor_parallel.random")
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # DeepSpeed compiles a shared-memory allreduce op (~80 s on 2 cores) on its first init_distributed on CPU; it
    # only speeds up intra-node CPU collectives, which gloo does correctly without it.
    try:
        ds_torch = importlib.import_module("deepspeed.comm.torch")
        ds_torch.build_shm_op = lambda: None
    except ImportError:
        pass
    _SHIM_APPLIED = True


def import_mcore():
    """megatron.core with the CPU shim applied and its Transformer-Engine/Apex warnings silenced."""
    apply_cpu_shim()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core  # noqa: F401
        from megatron.core import parallel_state, tensor_parallel  # noqa: F401
    return megatron.core


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """torch.distributed from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), or a one-process
    group on an in-memory store when started without a launcher."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    else:
        from data_tools.datasets import one_process_group

        one_process_group(backend, timeout_s)


def init_deepspeed_comm(backend: str | None = None) -> None:
    """DeepSpeed's comm layer over the already-initialised torch.distributed group."""
    apply_cpu_shim()
    # DeepSpeed's sanity check wants LOCAL_RANK even for one process; set here, where DeepSpeed is used, rather than
    # for every one-process group (a model loaded for evaluation must not leave it in the caller's environment)
    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))


def init_model_parallel(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """megatron-core parallel state for TP x PP (DP is what remains of the world), and its RNG tracker."""
    import_mcore()
    from megatron.core import parallel_state, tensor_parallel

    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor_parallel*pipeline_parallel = {tp * pp}")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()
                ) == (tp, pp):
            # the same layout: keep its groups. megatron-core's destroy_model_parallel drops its references to the
            # groups but does not destroy them, and each gloo group keeps its threads polling: a process that set
            # up the same layout again and again (evaluation loading one model after another; the test suite's
            # process: 2,000 gloo threads, a load average of 200 on 2 cores) slowed down without bound
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def seed_everything(seed) -> None:
    """Python, NumPy and torch generators (also DeepSpeed's per-layer seed_fn, which passes a NumPy integer that
    Python 3.11's random.seed refuses)."""
    import random

    import numpy as np

    random.seed(int(seed))
    np.random.seed(int(seed))
    torch.manual_seed(int(seed))


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()
