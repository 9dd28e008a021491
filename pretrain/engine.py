"""DeepSpeed in one place: the DeepSpeed config (from ds_configs/ + the training config's values), the client
AdamW with parameter groups, the LR schedule, megatron-core's parallel state as DeepSpeed's `mpu`, and
`deepspeed.initialize`.

- One source of truth: micro-batch, accumulation, global batch, clipping and precision come from the training
  config; a DeepSpeed JSON that sets any of them differently is refused.
- Parameter groups: no weight decay on norms, embeddings and biases; frozen parameters are left out entirely.
- LR: linear warm-up to `optimizer.lr`, then cosine or linear decay to `optimizer.min_lr` at `train_steps`.
"""
from __future__ import annotations

import json
import math
import os

import torch

from pretrain.config import ConfigError, TrainConfig, package_dir

DS_CONFIG_DIR = package_dir("ds_configs")
OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
              "gradient_clipping")


class MegatronMPU:
    """megatron-core parallel_state under the names DeepSpeed's engine and ZeRO ask for (the older Megatron mpu
    API: get_model_parallel_*, get_data_parallel_*, get_tensor_model_parallel_src_rank)."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()


def load_ds_json(name_or_path: str) -> dict:
    path = name_or_path if name_or_path.endswith(".json") else os.path.join(DS_CONFIG_DIR, name_or_path + ".json")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(DS_CONFIG_DIR) if f.endswith(".json"))
        raise ConfigError(f"parallel.deepspeed: {name_or_path!r} is neither a file nor one of {', '.join(known)}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.deepspeed: {path}: not valid JSON ({e})") from None


def deepspeed_config(cfg: TrainConfig, dp_size: int) -> dict:
    ds = load_ds_json(cfg.parallel.deepspeed)
    p = cfg.parallel
    ours = {"train_micro_batch_size_per_gpu": p.micro_batch, "gradient_accumulation_steps": p.grad_accum,
            "train_batch_size": p.micro_batch * p.grad_accum * dp_size, "gradient_clipping": cfg.optimizer.grad_clip}
    for key in OWNED_KEYS:
        if key in ds and ds[key] != ours[key]:
            raise ConfigError(f"parallel.deepspeed: {key}={ds[key]} in the DeepSpeed JSON disagrees with the "
                              f"training config ({ours[key]}); remove it from the JSON, the training config owns it")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"parallel.deepspeed: the JSON has a {key!r} section; the trainer owns the optimizer "
                              "and LR schedule (see ds_configs/README.md)")
    for key in ("bf16", "fp16"):  # precision is the training config's: a JSON that says otherwise is refused
        said = ds.get(key, {}).get("enabled", "auto")
        if said != "auto" and bool(said) != (p.precision == key):
            raise ConfigError(f"parallel.deepspeed: {key}.enabled={said} in the DeepSpeed JSON disagrees with "
                              f"parallel.precision={p.precision}; remove it or set it to \"auto\"")
    ds.update(ours)
    ds["bf16"] = {"enabled": p.precision == "bf16"}
    ds["fp16"] = {"enabled": p.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16}
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if p.pp > 1 and stage > 1:
        raise ConfigError(f"parallel.deepspeed: pipeline parallel (pp={p.pp}) allows ZeRO stage 0 or 1, got {stage}")
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name.lower()
        is_embedding = "embedding" in name or name.endswith(".pos") or "queries" in name
        (no_decay if param.ndim < 2 or is_norm or is_embedding or leaf == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainConfig):
    o, s = cfg.optimizer, cfg.schedule
    floor = o.min_lr / o.lr if o.lr > 0 else 0.0

    def factor(step: int) -> float:
        if s.warmup_steps and step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.decay == "constant":
            return 1.0
        progress = min(1.0, (step - s.warmup_steps) / max(1, s.train_steps - s.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.decay == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return factor


def build_engine(cfg: TrainConfig, model: torch.nn.Module, dp_size: int, pipeline: bool = False):
    """deepspeed.initialize with our optimizer, schedule and mpu (a PipelineModule brings its own topology);
    returns the engine."""
    import deepspeed

    from pretrain.parallel import init_deepspeed_comm

    init_deepspeed_comm()
    opt = torch.optim.AdamW(param_groups(model, cfg.optimizer.weight_decay), lr=cfg.optimizer.lr,
                            betas=(cfg.optimizer.beta1, cfg.optimizer.beta2), eps=cfg.optimizer.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, dp_size),
                                           mpu=None if pipeline else MegatronMPU(),
                                           dist_init_required=False)
    return engine
