"""Greedy generation from a MetaLM decoder (no spans: the decoder alone, as a causal LM).

Recomputes the whole prefix at every step (no KV cache): this is for short demo continuations and checks, not for
serving. Collective under tensor parallelism and ZeRO-3 (every rank must call it); all ranks return the same text.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: tuple[int, ...] = ()) -> list[int]:
    from megatron.core import tensor_parallel

    device = next(model.parameters()).device
    ids = list(prompt_ids)
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        T = tokens.shape[1]
        batch = {"tokens": tokens, "position_ids": torch.arange(T, device=device)[None],
                 "document_ids": torch.zeros(1, T, dtype=torch.int32, device=device)}
        logits = model.logits(batch)[:, -1]  # vocab-parallel shard
        full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        nxt = int(full.float().argmax(-1).item())
        ids.append(nxt)
        if nxt in eos_ids:
            break
    model.train(was_training)
    return ids[len(prompt_ids):]


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    ids = generate_ids(model, [tokenizer.ids.bos] + tokenizer.encode(prompt), max_new_tokens,
                       eos_ids=(tokenizer.ids.eos, tokenizer.ids.eod))
    return tokenizer.decode(ids)
