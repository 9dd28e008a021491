"""What is checked before training starts, in one place: by every rank at start-up and once by the launcher
before any process is spawned (`preflight`), so a bad config, a missing file or a tokenizer that does not fit the
model is one `error:` line, not one per rank plus torchrun's report.

- `check_config(cfg, world, mode)`: the checks that need the world size and the files (types and values were checked
  when loading), then the mode's own (`mode.check`, pretrain/modes/).
- `absolute_paths(cfg, mode)`: every path of the config made absolute, so the config saved with the run still
  points at its files from anywhere.
- `resolve_tokenizer(cfg)`: the run's tokenizer, written back into `cfg.data`; refuses a dataset made with another
  one, and a tokenizer larger than `model.vocab_size`.
"""
from __future__ import annotations

import os

from pretrain.config import ConfigError, TrainConfig


def uses_pipeline(cfg: TrainConfig) -> bool:
    return cfg.parallel.pp > 1 or cfg.parallel.pipeline_engine


def check_config(cfg: TrainConfig, world: int | None, mode) -> None:
    """`world` None (a hostfile launch: the world size is known only to the runner) skips what needs it."""
    p, m = cfg.parallel, cfg.model
    for name, value in (("parallel.micro_batch", p.micro_batch), ("parallel.grad_accum", p.grad_accum),
                        ("parallel.tp", p.tp), ("parallel.pp", p.pp),
                        ("schedule.train_steps", cfg.schedule.train_steps)):
        if value < 1:
            raise ConfigError(f"{name}={value}: must be at least 1")
    try:
        os.makedirs(cfg.run_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir={cfg.run_dir}: cannot be created ({e.strerror})") from None
    if not os.access(cfg.run_dir, os.W_OK):
        raise ConfigError(f"run_dir={cfg.run_dir}: not writable")
    if p.pp > m.decoder.layers:
        raise ConfigError(f"parallel.pp={p.pp} exceeds model.decoder.layers={m.decoder.layers}")
    if uses_pipeline(cfg) and not m.tie_embeddings:
        raise ConfigError("parallel.pp>1 needs a model with tied embeddings (model.tie_embeddings=true)")
    if world is not None and world % (p.tp * p.pp):
        raise ConfigError(f"parallel: world size {world} is not divisible by tp*pp = {p.tp * p.pp}")
    stacks = [("model.decoder", m.decoder)] + ([("model.encoder", m.encoder)] if m.encoder else [])
    for name, s in stacks:
        if s.heads % p.tp:
            raise ConfigError(f"{name}.heads={s.heads} is not divisible by parallel.tp={p.tp}")
        if s.kv_heads % p.tp:
            raise ConfigError(f"{name}.kv_heads={s.kv_heads} is not divisible by parallel.tp={p.tp} (each rank "
                              "holds whole key/value groups)")
        if s.ffn_hidden % p.tp:
            raise ConfigError(f"{name}.ffn_hidden={s.ffn_hidden} is not divisible by parallel.tp={p.tp}")
    if m.vocab_size % p.tp:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp}")
    if m.encoder is not None and m.encoder.vocab_size % p.tp:
        raise ConfigError(f"model.encoder.vocab_size={m.encoder.vocab_size} is not divisible by parallel.tp={p.tp}")
    if m.encoder is not None and m.encoder.tokenizer and not os.path.exists(m.encoder.tokenizer):
        raise ConfigError(f"model.encoder.tokenizer: not found: {m.encoder.tokenizer}")
    if m.encoder is not None and m.encoder.vocab_size and not m.encoder.tokenizer:
        raise ConfigError("model.encoder.vocab_size is the encoder's own vocabulary: model.encoder.tokenizer (its "
                          "tokenizer) is required with it")
    if cfg.data.seq_length > m.max_seq_length:
        src = getattr(m, "from_init", "")
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} exceeds model.max_seq_length={m.max_seq_length}"
                          + (f" (the init model's, checkpoint.init_from={src})" if src else ""))
    mode.check(cfg, uses_pipeline(cfg))
    check_init_from(cfg)
    d = cfg.data
    for key in ("tokenizer_model", "vocab_file", "merge_file"):
        path = getattr(d, key)
        if path and not os.path.exists(path):
            raise ConfigError(f"data.{key}: not found: {path}")
    if world is not None:
        from pretrain.engine import deepspeed_config

        deepspeed_config(cfg, world // (p.tp * p.pp))  # the DeepSpeed JSON exists and agrees with the config
    if cfg.optimizer.loss_normalization == "per_token" and uses_pipeline(cfg):
        raise ConfigError("optimizer.loss_normalization=per_token: not available under pipeline parallelism "
                          "(DeepSpeed's pipeline schedule averages the micro-batch losses itself)")
    if cfg.logging.downstream_tasks and uses_pipeline(cfg):
        raise ConfigError("logging.downstream_tasks: in-loop downstream evaluation is not available under pipeline "
                          "parallelism (score a consolidated checkpoint with python -m eval.score instead)")


def absolute_paths(cfg: TrainConfig, mode) -> None:
    """Resolve the file paths of the config against the current directory, so the config saved with the run and its
    checkpoints still points at them from anywhere (conversion, evaluation, resume from another directory)."""
    d = cfg.data
    for key in ("tokenizer_model", "vocab_file", "merge_file"):
        if getattr(d, key):
            setattr(d, key, os.path.abspath(getattr(d, key)))
    from data_tools.datasets import parse_blend  # the one reader of Megatron's `prefix | w1 p1 w2 p2 ...` form

    if d.data_path:
        prefixes, weights = parse_blend(d.data_path)
        prefixes = [os.path.abspath(p) for p in prefixes]
        d.data_path = prefixes if weights is None else [x for wp in zip(weights, prefixes) for x in wp]
    # megatron-core's sample-index cache: under the run (on the file system every node of the job sees; never in
    # the user's data directory, which may be read-only or shared) unless data.cache_dir names one
    d.cache_dir = os.path.abspath(d.cache_dir or os.path.join(cfg.run_dir, "index-cache"))
    if cfg.checkpoint.init_from:
        cfg.checkpoint.init_from = os.path.abspath(cfg.checkpoint.init_from)
    if cfg.model.encoder is not None and cfg.model.encoder.tokenizer:
        cfg.model.encoder.tokenizer = os.path.abspath(cfg.model.encoder.tokenizer)
    if cfg.logging.downstream_tasks:
        cfg.logging.downstream_data = os.path.abspath(cfg.logging.downstream_data)
    mode.absolute_paths(cfg)
    cfg.run_dir = os.path.abspath(cfg.run_dir)


def resolve_tokenizer(cfg: TrainConfig):
    """The run's tokenizer: the one `data.tokenizer_*` names, else the one preprocessing recorded beside the first
    dataset (PREFIX.tokenizer.json). A dataset recorded with another tokenizer (other vocabulary size, or other
    end-of-document / eos / bos id) is refused, and so is a tokenizer with more pieces than `model.vocab_size`. The
    resolved type, files and eod id are written back into cfg.data, so the config saved with the run and its
    checkpoints names the tokenizer exactly."""
    from data_tools.cli import UserError
    from data_tools.datasets import parse_blend
    from data_tools.tokenizer import (dataset_tokenizer_spec, from_data_config, load_tokenizer_spec,
                                      write_to_data_config)

    d = cfg.data
    prefixes, _ = parse_blend(d.data_path) if d.data_path else ([], None)
    try:
        recorded = [(p, s) for p in prefixes if (s := dataset_tokenizer_spec(p)) is not None]
        if d.tokenizer_model or d.vocab_file:
            tok = from_data_config(d)
        elif recorded:
            tok = load_tokenizer_spec(recorded[0][1])
        else:
            raise ConfigError("data.tokenizer_model: required (the datasets have no PREFIX.tokenizer.json naming "
                              "their tokenizer)")
    except UserError as e:
        raise ConfigError(f"data.tokenizer_*: {e}") from None
    for prefix, spec in recorded:
        ids, mine = spec.get("ids", {}), vars(tok.ids)
        diff = [f"{k} {ids[k]} vs {mine[k]}" for k in ("eod", "eos", "bos") if k in ids and ids[k] != mine[k]]
        if spec.get("vocab_size") not in (None, tok.vocab_size):
            diff.append(f"vocabulary {spec['vocab_size']} vs {tok.vocab_size}")
        if diff:
            raise ConfigError(f"dataset {prefix} was made with another tokenizer ({spec.get('type')} "
                              f"{spec.get('model') or spec.get('vocab_file')}) than the configured one "
                              f"({tok.describe()}): {', '.join(diff)}")
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size} ({tok.describe()})")
    write_to_data_config(tok, d)
    return tok


def configure_model(cfg: TrainConfig) -> None:
    """Model settings that come from files: `model.encoder.from_hf` (a pretrained BERT-family encoder's
    architecture and tokenizer, pretrain/hf_encoders.py) and `model.vision.from_hf` (a CLIP / SigLIP / ViT tower's
    architecture and preprocessing, pretrain/hf_vision.py)."""
    from pretrain import hf_encoders, hf_vision
    from pretrain.model_io import ConvertError

    for key, apply in (("model.encoder.from_hf", hf_encoders.apply_from_hf),
                       ("model.vision.from_hf", hf_vision.apply_from_hf)):
        try:
            apply(cfg.model)
        except (ConvertError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None


SHAPE_KEYS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn_hidden", "norm", "activation", "bias",
              "positions", "vocab_size", "max_positions", "type_vocab_size", "embedding_size", "embedding_norm")


def shape_fields(m) -> dict:
    """The model settings that decide its parameters' names and shapes (what a checkpoint must match)."""
    out = {"model.vocab_size": m.vocab_size, "model.tie_embeddings": m.tie_embeddings,
           "model.connector": m.connector if m.encoder is not None else None}
    for part, stack in (("decoder", m.decoder), ("encoder", m.encoder),
                        ("vision", m.vision.stack if m.vision is not None else None)):
        out[f"model.{part}"] = "present" if stack is not None else "none"
        for k in SHAPE_KEYS if stack is not None else ():
            if hasattr(stack, k):
                out[f"model.{part}{'.stack' if part == 'vision' else ''}.{k}"] = getattr(stack, k)
    if m.vision is not None:
        out.update({f"model.vision.{k}": getattr(m.vision, k) for k in ("image_size", "patch_size", "class_token")})
        out["model.vision_connector"] = m.vision_connector
    return out


def check_init_from(cfg: TrainConfig) -> None:
    """`checkpoint.init_from` with the config's own model (no model_from_init): the source's parameters must fit
    it. Checked from the source's saved config (no weights read), before any process starts."""
    init = cfg.checkpoint.init_from
    if not init or getattr(cfg.model, "from_init", ""):
        return
    from pretrain.model_io import ConvertError, source_config

    try:
        src = source_config(init)
    except ConvertError as e:
        raise ConfigError(f"checkpoint.init_from: {e}") from None
    a, b = shape_fields(src.model), shape_fields(cfg.model)
    diff = [f"{k} {a.get(k)} vs {b.get(k)}" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    if diff:
        switch = ("finetune.model_from_init=true" if cfg.finetune.tasks else "checkpoint.model_from_init=true")
        raise ConfigError(f"checkpoint.init_from: the model of {init} differs from the config's "
                          f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}): set {switch} to take "
                          "the model (and tokenizer) from it" + ("" if cfg.finetune.tasks else
                          "; a text or vision encoder it lacks is then added from the config"))


def preflight(cfg: TrainConfig, world: int | None) -> None:
    """Everything a rank checks at start-up that needs no process group: the launcher runs it once before
    spawning. Raises ConfigError (or data_tools' UserError) with the one line to print."""
    from pretrain.modes import pick_mode

    configure_model(cfg)
    mode = pick_mode(cfg)
    mode.configure(cfg)
    check_config(cfg, world, mode)
    absolute_paths(cfg, mode)  # a mode's own path checks run there (an image path without meta.json)
    tok = resolve_tokenizer(cfg)
    if hasattr(mode, "check_tokenizer"):
        mode.check_tokenizer(cfg, tok)
    return tok


def vocab_note(cfg: TrainConfig, tok) -> str:
    """A warning when model.vocab_size is much larger than the tokenizer's vocabulary (rows no token ever reaches:
    a first loss of ln(model.vocab_size) is the only other hint); '' when it is padding (Megatron-LM pads to a
    multiple of 128 x tp) or equal. A smaller one is refused by resolve_tokenizer."""
    n, v = tok.vocab_size, cfg.model.vocab_size
    step = 128 * cfg.parallel.tp
    if v <= -(-n // step) * step:
        return ""
    return (f"warning: model.vocab_size={v} is larger than the tokenizer's {n} pieces ({tok.describe()}): "
            f"{v - n} embedding rows no token reaches (padding to a multiple of {step} would be "
            f"{-(-n // step) * step}); set model.vocab_size to match")
