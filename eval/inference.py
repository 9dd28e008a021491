"""The one inference seam shared by scoring, perplexity, generation, in-loop evaluation and the demo.

- `load_model(path)`: a consolidated directory (`metalm.json`), a run directory, its `checkpoints/` folder or one
  checkpoint tag -> (MetaLM in eval mode, TrainConfig, Tokenizer, info). No DeepSpeed engine, no launcher.
- `target_logprobs(model, batch)`: log p(labels) per position [B, T] from megatron-core's vocab-parallel cross
  entropy, so it works on a live TP>1 model without gathering the vocabulary (collective: every TP rank calls it
  and gets the same values).
- `pair_logprobs(model, batch, rows, positions, labels)`: the same for answer choices packed after their shared
  prompt (one forward per item instead of one per choice; exact: each choice sees the prompt and itself only).
- `decode_step(model, batch, mask, cache)`: one cached forward (docking included) -> full-vocabulary logits of the
  new positions (gathered over TP ranks); `step_mask` builds its attention mask: causal over the cache, keys
  restricted to real (non-padding) tokens.
Everything runs under `torch.no_grad()` in eval mode; the caller's train/eval mode is restored.

Legend: B rows, T positions, S cached + new positions, V vocabulary.
"""
from __future__ import annotations

import contextlib

import torch

from pretrain.model.attention import AttentionMask


class ModelLoadError(ValueError):
    """The model path is not something we can load (one line, exit status 2)."""


def load_model(path: str):
    """(model, cfg, tokenizer, info) from a consolidated directory or a DeepSpeed checkpoint of pretrain.train
    (pretrain.model_io.load, the one loader)."""
    from data_tools.cli import UserError
    from pretrain.model_io import ConvertError, load

    try:
        return load(path)
    except (ConvertError, UserError) as e:
        raise ModelLoadError(str(e)) from None


@contextlib.contextmanager
def inference_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def target_logprobs(model, batch: dict) -> torch.Tensor:
    """log p(labels[b, t] | inputs up to t) for every position [B, T] (float32; padding positions are garbage)."""
    from pretrain.model.metalm import token_losses

    with inference_mode(model):
        dev = model_device(model)
        batch = {k: v.to(dev) for k, v in batch.items()}
        return -token_losses(model.logits(batch), batch["labels"])


def pair_logprobs(model, batch: dict, rows, positions, labels) -> torch.Tensor:
    """log p(labels[i] | row rows[i] up to positions[i]) [N] for a batch from
    `data_tools.task_samples.collate_shared` (answer choices sharing their prompt; mask from `segments`)."""
    from pretrain.model import masks
    from pretrain.model.metalm import token_losses

    with inference_mode(model):
        dev = model_device(model)
        batch = {k: v.to(dev) for k, v in batch.items()}
        B, T = batch["tokens"].shape
        mask = AttentionMask.build(masks.shared_prefix(batch["segments"]), B, T, None, dev, "sdpa")
        flat = torch.as_tensor(rows, device=dev) * T + torch.as_tensor(positions, device=dev)
        sel = model.logits(batch, mask, select_N=flat)  # only the N scored positions are projected: [N, V/tp]
        return -token_losses(sel[None], torch.as_tensor(labels, device=dev)[None])[0]


def gather_vocab(logits_BTv: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits_BTv
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits_BTv)


def new_cache(model, B: int, max_len: int):
    from pretrain.model.blocks import KVCache

    attn = model.decoder.stack.layers[0].attn
    p = next(model.parameters())
    return KVCache(len(model.decoder.stack.layers), B, attn.local_kv_heads, max_len, attn.head_dim, p.dtype, p.device)


def step_mask(key_valid_BS: torch.Tensor, offset: int, n_new: int) -> AttentionMask:
    """Dense [B, 1, n_new, S] mask for queries at absolute positions offset..offset+n_new-1: causal, keys that are
    real tokens only; a padding query also sees itself (no empty row: dense SDPA would give NaN)."""
    S = offset + n_new
    if bool(key_valid_BS[:, :S].all()):  # no padding: SDPA's mask-free paths (faster, same numbers)
        if n_new == 1:
            return AttentionMask("sdpa", None)  # one new query sees every cached key
        if offset == 0:
            return AttentionMask("sdpa", None, is_causal=True)
    q = torch.arange(offset, S, device=key_valid_BS.device)[:, None]
    kv = torch.arange(S, device=key_valid_BS.device)[None, :]
    allowed = (kv <= q)[None] & key_valid_BS[:, None, :S]
    allowed = allowed | (kv == q)[None]
    return AttentionMask("sdpa", allowed[:, None])


def decode_step(model, batch: dict, mask: AttentionMask, cache, last_only: bool = False) -> torch.Tensor:
    """Embed (and dock, when the batch has encoder pieces) the new positions, run the decoder over them with the
    cache, advance it; full-vocabulary logits [B, n_new, V] in float32. `last_only`: only the last position is
    projected onto the vocabulary ([B, 1, V]; a prompt's prefill needs no more, as transformers' logits_to_keep=1)."""
    x = model.embed_and_dock(batch)
    B, T = batch["tokens"].shape
    select = torch.arange(B, device=x.device) * T + (T - 1) if last_only and T > 1 else None
    logits = model.decoder(x, batch["position_ids"], mask, cache, select_N=select)
    if select is not None:
        logits = logits[:, None]
    if cache is not None:
        cache.advance(T)
    return gather_vocab(logits).float()


def model_aligner(model, tok):
    """Re-tokenization for a text encoder with its own tokenizer (data_tools/encoder_tokens.py), built once per
    model; None for encoders that share the decoder's vocabulary."""
    from data_tools.encoder_tokens import aligner_for

    cfg = getattr(getattr(model, "module", model), "cfg", None)
    if not hasattr(model, "_metalm_aligner"):
        model._metalm_aligner = aligner_for(getattr(cfg, "encoder", None), tok)
    return model._metalm_aligner
