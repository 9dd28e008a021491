"""Text generation from a MetaLM (or GPT baseline) decoder: KV cache, greedy or sampled, batched, stop strings.

    python -m eval.generate --model exported/metalm --prompt "Call me Ishmael." --max-new-tokens 64
    python -m eval.generate --model RUN --prompts prompts.txt --temperature 0.8 --top-p 0.9 --seed 1
    python -m eval.generate --model exported/metalm --encode "a passage for the encoder" --prompt "In short,"

- Each row is `<s>`, optionally a passage given to the text encoder (`--encode`: docked into one decoder slot per
  passage token, as a span is in pretraining), then the prompt tokens. A batch is left-padded; padding is masked
  out of attention and positions count real tokens only, so a batch gives what each prompt gives alone.
- KV cache (`eval.inference.decode_step`): the prompt is run once, then one position per step. `--no-cache`
  recomputes the whole sequence every step (the reference the cache is tested against; `bench/eval_throughput.py`
  times both).
- Decoding: greedy (`--temperature 0`), or temperature / top-k / top-p sampling from a `torch.Generator` seeded
  with `--seed` (same seed, same text). Stops at `</s>` or the end-of-document token `</d>`, at any `--stop`
  string (cut before it), or after `--max-new-tokens`. `max_seq_length` guard, lm-evaluation-harness' rule: a
  prompt keeps its last `max_seq_length - max_new_tokens` tokens (a note says how many were cut), so the
  continuation keeps its whole budget; only where that would leave no prompt token is room left for fewer new
  tokens (capped, with a note). Each row of a batch has its own budget: batched equals one by one.
- The text of the new tokens is decoded as it continues the prompt (a leading space is kept).
- Collective under tensor parallelism: logits are gathered over TP ranks and the chosen tokens broadcast from TP
  rank 0, so every rank returns the same text.

Legend: B rows, P padded prompt length, V vocabulary.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    stop: tuple[str, ...] = ()
    use_cache: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 0 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("max_new_tokens >= 0, temperature >= 0, top_k >= 0 and 0 < top_p <= 1 are required")


@dataclass
class Generation:
    ids: list[int]
    text: str = ""
    stopped_by: str = "length"  # length | eos | stop string
    prompt_truncated: int = 0
    notes: list[str] = field(default_factory=list)


def _filter(logits_BV: torch.Tensor, g: GenerationConfig) -> torch.Tensor:
    logits_BV = logits_BV / g.temperature
    if g.top_k:
        kth = torch.topk(logits_BV, min(g.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if g.top_p < 1.0:
        sorted_l, idx = torch.sort(logits_BV, descending=True, dim=-1)
        probs = sorted_l.softmax(-1)
        drop = probs.cumsum(-1) - probs > g.top_p  # keep the smallest prefix whose mass reaches top_p
        logits_BV = logits_BV.scatter(-1, idx, sorted_l.masked_fill(drop, float("-inf")))
    return logits_BV


def choose(logits_BV: torch.Tensor, g: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    if g.temperature == 0:
        return logits_BV.argmax(-1)
    probs = _filter(logits_BV.float(), g).softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(logits_BV.device)


def _tp_broadcast(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        import torch.distributed as dist

        dist.broadcast(t, parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
    return t


def _prefill_batch(rows: list[tuple[list[int], list[int]]], P: int, pad: int, dev, aligner=None
                   ) -> tuple[dict, torch.Tensor]:
    """Left-padded batch of rows (passage ids for the encoder, decoder ids after <s>... as given), with docking.
    `aligner`: an encoder with its own tokenizer (each passage re-tokenized, data_tools/encoder_tokens.py)."""
    if aligner is not None:
        return _prefill_retokenized(rows, P, pad, dev, aligner)
    B = len(rows)
    Te = max([len(p) for p, _ in rows] + [0])
    tokens = torch.full((B, P), pad, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    enc = torch.full((B, Te), pad, dtype=torch.long)
    enc_pos = torch.zeros(B, Te, dtype=torch.long)
    enc_seg = torch.full((B, Te), -1, dtype=torch.int32)
    dst = torch.full((B, Te), B * P, dtype=torch.long)
    for b, (passage, dec) in enumerate(rows):
        n = len(dec)
        tokens[b, P - n:] = torch.tensor(dec)
        valid[b, P - n:] = True
        m = len(passage)
        if m:  # the passage's slots are dec[1:1+m] (right after <s>)
            enc[b, :m] = torch.tensor(passage)
            enc_pos[b, :m] = torch.arange(m)
            enc_seg[b, :m] = 0
            dst[b, :m] = b * P + (P - n) + 1 + torch.arange(m)
    batch = {"tokens": tokens, "position_ids": (valid.long().cumsum(1) - 1).clamp(min=0)}
    if Te:
        batch.update(enc_tokens=enc, enc_positions=enc_pos, enc_segments=enc_seg,
                     dock_src=torch.arange(B * Te), dock_dst=dst.reshape(-1))
    return {k: v.to(dev) for k, v in batch.items()}, valid.to(dev)


def _prefill_retokenized(rows, P: int, pad: int, dev, aligner) -> tuple[dict, torch.Tensor]:
    B = len(rows)
    got = [aligner.align_piece(p)[0] if p else None for p, _ in rows]
    for b, ((passage, _), g) in enumerate(zip(rows, got)):
        if passage and g is None:
            raise ValueError(f"row {b}: the passage does not fit the text encoder ({aligner.max_length} tokens) or "
                             "gives it no token")
    Te = max([len(g[0]) for g in got if g is not None] + [0])
    N = max([len(p) for p, _ in rows] + [0])
    tokens = torch.full((B, P), pad, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    enc = torch.full((B, Te), aligner.encoder_tok.pad_id, dtype=torch.long)
    enc_pos = torch.zeros(B, Te, dtype=torch.long)
    enc_seg = torch.full((B, Te), -1, dtype=torch.int32)
    src = torch.zeros(B, N, dtype=torch.long)
    dst = torch.full((B, N), B * P, dtype=torch.long)
    for b, ((passage, dec), g) in enumerate(zip(rows, got)):
        n = len(dec)
        tokens[b, P - n:] = torch.tensor(dec)
        valid[b, P - n:] = True
        if g is not None:
            e_ids, slot_src = g
            enc[b, :len(e_ids)] = torch.from_numpy(e_ids)
            enc_pos[b, :len(e_ids)] = torch.arange(len(e_ids))
            enc_seg[b, :len(e_ids)] = 0
            src[b, :len(passage)] = b * Te + torch.from_numpy(slot_src)
            dst[b, :len(passage)] = b * P + (P - n) + 1 + torch.arange(len(passage))
    batch = {"tokens": tokens, "position_ids": (valid.long().cumsum(1) - 1).clamp(min=0)}
    if Te:
        batch.update(enc_tokens=enc, enc_positions=enc_pos, enc_segments=enc_seg, dock_src=src.reshape(-1),
                     dock_dst=dst.reshape(-1))
    return {k: v.to(dev) for k, v in batch.items()}, valid.to(dev)


def fit_prompt(prompt: Sequence[int], n_passage: int, max_new_tokens: int, max_seq_length: int, where: str = ""
               ) -> tuple[list[int], int]:
    """(the prompt as generation sees it, tokens cut from its left). lm-evaluation-harness' rule: the context keeps
    its last max_seq_length - max_new_tokens tokens, so the continuation has its full budget; only where that leaves
    no prompt token at all, room for one new token. `<s>` and the passage's slots come before the prompt."""
    head = 1 + n_passage
    if head + 1 > max_seq_length:
        raise ValueError(f"{where}the passage alone ({n_passage} tokens) leaves no room under "
                         f"max_seq_length={max_seq_length}")
    keep = max_seq_length - max_new_tokens - head
    if keep < 1:
        keep = max_seq_length - 1 - head
    over = max(0, len(prompt) - keep)
    return list(prompt)[over:], over


@torch.no_grad()
def generate_batch(model, tok, prompts: Sequence[list[int]], g: GenerationConfig, max_seq_length: int,
                   passages: Sequence[list[int]] | None = None, stop_ids: Sequence[int] | None = None
                   ) -> list[Generation]:
    """Generate after each `<s> [passage slots] prompt` (prompt ids without <s>). Returns one Generation per row."""
    from eval.inference import decode_step, inference_mode, model_device, new_cache, step_mask

    dev = model_device(model)
    B = len(prompts)
    passages = list(passages) if passages is not None else [[] for _ in range(B)]
    stop_ids = set(stop_ids if stop_ids is not None else (tok.ids.eos, tok.ids.eod))
    outs = [Generation([]) for _ in range(B)]
    rows, limits, prompt_ids = [], [], []
    for b, (passage, prompt) in enumerate(zip(passages, prompts)):
        prompt, over = fit_prompt(prompt, len(passage), g.max_new_tokens, max_seq_length, f"row {b}: ")
        if over:
            outs[b].prompt_truncated = over
            outs[b].notes.append(f"prompt cut by {over} tokens from the left (max_seq_length {max_seq_length})")
        prompt_ids.append(list(prompt))
        rows.append((list(passage), [tok.ids.bos] + list(passage) + list(prompt)))
        # each row's own budget: what its own length leaves (a batch gives what each prompt gives alone)
        limits.append(max(0, min(g.max_new_tokens, max_seq_length - len(rows[-1][1]))))
        if limits[-1] < g.max_new_tokens:
            outs[b].notes.append(f"max_new_tokens capped at {limits[-1]} by max_seq_length {max_seq_length}")
    P = max(len(d) for _, d in rows)
    new = max(limits)
    from eval.inference import model_aligner

    aligner = model_aligner(model, tok) if any(p for p, _ in rows) else None
    batch, valid_prompt = _prefill_batch(rows, P, tok.ids.pad, dev, aligner)
    valid = torch.cat([valid_prompt, torch.ones(B, max(new, 0), dtype=torch.bool, device=dev)], 1)
    gen = torch.Generator().manual_seed(g.seed)
    vocab = tok.vocab_size
    done = torch.tensor([n == 0 for n in limits], dtype=torch.bool, device=dev)  # a row with no budget is done
    with inference_mode(model):
        cache = new_cache(model, B, P + new) if g.use_cache else None
        logits = decode_step(model, batch, step_mask(valid, 0, P), cache, last_only=True)[:, -1]
        pos = batch["position_ids"][:, -1:]
        seq = batch["tokens"]
        for t in range(new):
            logits[:, vocab:] = float("-inf")  # model rows beyond the tokenizer's vocabulary
            nxt = _tp_broadcast(choose(logits, g, gen))
            for b in range(B):
                if done[b]:
                    continue
                i = int(nxt[b])
                if i in stop_ids:
                    done[b] = True
                    outs[b].stopped_by = "eos"
                    continue
                outs[b].ids.append(i)
                if g.stop:
                    text = continuation_text(tok, prompt_ids[b], outs[b].ids)
                    if any(s in text for s in g.stop):
                        done[b] = True
                        outs[b].stopped_by = "stop string"
                if not done[b] and len(outs[b].ids) >= limits[b]:
                    done[b] = True  # this row's budget (stopped_by stays "length")
            if bool(done.all()) or t == new - 1:
                break
            nxt = torch.where(done, torch.full_like(nxt, tok.ids.pad), nxt)
            pos = pos + 1
            seq = torch.cat([seq, nxt[:, None]], 1)
            if cache is not None:
                step = {"tokens": nxt[:, None], "position_ids": pos}
                logits = decode_step(model, step, step_mask(valid, P + t, 1), cache)[:, -1]
            else:  # recompute everything (the reference for the cache)
                full = dict(batch, tokens=seq, position_ids=torch.cat([batch["position_ids"],
                                                                       _positions_after(batch, t + 1)], 1))
                if "dock_dst" in full:
                    T = seq.shape[1]
                    d = batch["dock_dst"]
                    full["dock_dst"] = torch.where(d == B * P, B * T, d // P * T + d % P)
                logits = decode_step(model, full, step_mask(valid, 0, P + t + 1), None, last_only=True)[:, -1]
    for b, o in enumerate(outs):
        o.text = continuation_text(tok, prompt_ids[b], o.ids)
        if g.stop and o.stopped_by == "stop string":
            cut = min(o.text.index(s) for s in g.stop if s in o.text)
            o.text = o.text[:cut]
    return outs


@dataclass
class BeamResult:
    ids: list[int]  # the best hypothesis' new tokens (without the stop token)
    score: float  # its sum of token log-probabilities (stop token included) / length ** length_penalty
    logprob: float  # its sum of token log-probabilities
    text: str = ""
    stopped_by: str = "length"
    prompt_truncated: int = 0  # prompt tokens cut from the left (lm-eval's rule, as generate_batch)


@torch.no_grad()
def beam_search(model, tok, prompt: list[int], num_beams: int, max_new_tokens: int, max_seq_length: int,
                length_penalty: float = 0.6, stop: Sequence[str] = (), passage: Sequence[int] = (),
                stop_ids: Sequence[int] | None = None) -> BeamResult:
    """Beam search after `<s> [passage] prompt`: the k beams of one prompt are one batch of k rows sharing the KV
    cache (reordered by beam after each step). A hypothesis ends at an end token (`</s>`, `</d>`: its
    log-probability counts), when its text reaches a stop string (cut before it), or after `max_new_tokens`; its
    score is its summed log-probability / (number of tokens ** length_penalty) -- transformers' rule, the paper's
    beam 4 and length penalty 0.6. Search ends once `num_beams` hypotheses are finished (fairseq's rule,
    transformers' `early_stopping=True`) or the budget is spent (the running beams then finish by length); the best
    score wins. With one beam this is greedy decoding exactly (the same tokens as `generate_batch`), which is why
    this rule and not transformers' default. Collective under TP (every rank passes the same prompt)."""
    from eval.inference import decode_step, inference_mode, model_aligner, model_device, new_cache, step_mask

    if num_beams < 1:
        raise ValueError("num_beams must be >= 1")
    dev = model_device(model)
    k, passage = num_beams, list(passage)
    stop_ids = set(stop_ids if stop_ids is not None else (tok.ids.eos, tok.ids.eod))
    prompt, cut = fit_prompt(prompt, len(passage), max_new_tokens, max_seq_length)
    row = [tok.ids.bos] + passage + prompt
    new = max(0, min(max_new_tokens, max_seq_length - len(row)))
    P = len(row)
    aligner = model_aligner(model, tok) if passage else None
    batch, valid_prompt = _prefill_batch([(passage, row)] * k, P, tok.ids.pad, dev, aligner)
    valid = torch.ones(k, P + new, dtype=torch.bool, device=dev)
    vocab = tok.vocab_size
    finished: list[tuple[float, float, list[int], str]] = []  # (score, logprob, ids, stopped_by)

    def norm(logprob: float, n: int) -> float:
        return logprob / (max(n, 1) ** length_penalty)

    def add(logprob: float, ids: list[int], why: str) -> None:
        finished.append((norm(logprob, len(ids) + (why == "eos")), logprob, ids, why))
        finished.sort(key=lambda h: -h[0])
        del finished[k:]

    beams: list[list[int]] = [[] for _ in range(k)]
    scores = torch.full((k,), float("-inf"), dtype=torch.float64, device=dev)
    scores[0] = 0.0  # the k rows start identical: only one is live, or the first step would pick k copies
    with inference_mode(model):
        cache = new_cache(model, k, P + new)
        logits = decode_step(model, batch, step_mask(valid_prompt, 0, P), cache, last_only=True)[:, -1]
        pos = batch["position_ids"][:, -1:]
        for t in range(new):
            logits[:, vocab:] = float("-inf")
            logp = torch.log_softmax(logits.double(), -1)
            cand = (scores[:, None] + logp).reshape(-1)
            top_s, top_i = torch.topk(cand, min(2 * k, cand.numel()))  # enough to refill k beams past end tokens
            picked = _tp_broadcast(torch.stack([top_i, top_s.view(torch.int64)]))
            top_i, top_s = picked[0].tolist(), picked[1].view(torch.float64).tolist()
            V = logp.shape[-1]
            nxt_beams, nxt_ids, nxt_scores = [], [], []
            for rank, (i, sc) in enumerate(zip(top_i, top_s)):
                if sc == float("-inf"):
                    break
                b, v = divmod(i, V)
                ids = beams[b] + [v]
                if v in stop_ids:
                    if rank < k:  # an end token ranked below the k best continues nothing (transformers' rule)
                        add(sc, beams[b], "eos")
                    continue
                if stop:
                    text = continuation_text(tok, prompt, ids)
                    if any(x in text for x in stop):
                        add(sc, ids, "stop string")
                        continue
                nxt_beams.append(b)
                nxt_ids.append(ids)
                nxt_scores.append(sc)
                if len(nxt_ids) == k:
                    break
            if len(finished) == k or not nxt_ids:
                break  # k hypotheses finished (fairseq's rule, transformers' early_stopping=True)
            if t == new - 1:
                for b_ids, sc in zip(nxt_ids, nxt_scores):
                    add(sc, b_ids, "length")
                break
            while len(nxt_ids) < k:  # fewer live candidates than beams: pad with dead rows
                nxt_beams.append(nxt_beams[0])
                nxt_ids.append(nxt_ids[0])
                nxt_scores.append(float("-inf"))
            order = torch.tensor(nxt_beams, device=dev)
            cache.k, cache.v = cache.k[:, order], cache.v[:, order]
            beams, scores = nxt_ids, torch.tensor(nxt_scores, dtype=torch.float64, device=dev)
            pos = pos + 1
            step = {"tokens": torch.tensor([ids[-1] for ids in beams], device=dev)[:, None], "position_ids": pos}
            logits = decode_step(model, step, step_mask(valid, P + t, 1), cache)[:, -1]
    if not finished:  # no budget at all
        return BeamResult([], 0.0, 0.0, "", "length", cut)
    score, logprob, ids, why = finished[0]
    text = continuation_text(tok, prompt, ids)
    if why == "stop string":
        text = text[:min(text.index(x) for x in stop if x in text)]
    return BeamResult(ids, score, logprob, text, why, cut)


def sequence_logprob(model, tok, prompt: list[int], new: list[int], end: bool = False,
                     passage: Sequence[int] = ()) -> float:
    """log p(new [+ </s> when `end`] | <s> [passage] prompt): the score beam search gives a hypothesis."""
    from eval.inference import decode_step, inference_mode, model_aligner, model_device, step_mask

    dev = model_device(model)
    row = [tok.ids.bos] + list(passage) + list(prompt) + list(new)
    target = list(new) + ([tok.ids.eos] if end else [])
    aligner = model_aligner(model, tok) if passage else None
    batch, valid = _prefill_batch([(list(passage), row)], len(row), tok.ids.pad, dev, aligner)
    with inference_mode(model):
        logits = decode_step(model, batch, step_mask(valid, 0, len(row)), None)[0]
    logits[:, tok.vocab_size:] = float("-inf")
    logp = torch.log_softmax(logits.double(), -1)
    first = len(row) - len(new) - 1  # the position whose next token is new[0]
    return float(sum(logp[first + j, v] for j, v in enumerate(target)))


def continuation_text(tok, prompt: list[int], new: list[int]) -> str:
    """The new tokens' text as it continues the prompt: decoding them alone loses a leading space (SentencePiece
    drops a leading '▁'; byte-level BPE keeps it); the prompt's decoded text is taken off the whole text's."""
    if not new:
        return ""
    tail = prompt[-16:]  # enough context for the boundary; decoding the whole prompt each step costs more
    head = tok.decode(tail)
    whole = tok.decode(tail + list(new))
    return whole[len(head):] if whole.startswith(head) else tok.decode(new)


def _positions_after(batch: dict, n: int) -> torch.Tensor:
    last = batch["position_ids"][:, -1:]
    return last + torch.arange(1, n + 1, device=last.device)[None]


def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: tuple[int, ...] = (),
                 max_seq_length: int = 1 << 30) -> list[int]:
    """Greedy continuation of prompt_ids (which include <s> when wanted), cached; stops only at eos_ids."""
    from types import SimpleNamespace

    ids_only = SimpleNamespace(ids=SimpleNamespace(bos=prompt_ids[0], pad=0, eos=-1, eod=-1), vocab_size=1 << 62,
                               decode=lambda ids: "")  # the prompt comes as ids: nothing to decode
    return generate_batch(model, ids_only, [list(prompt_ids[1:])], GenerationConfig(max_new_tokens=max_new_tokens),
                          max_seq_length, stop_ids=eos_ids)[0].ids


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, max_seq_length: int = 1 << 30) -> str:
    """Greedy continuation of a text prompt (the trainer's --generate)."""
    return generate_batch(model, tokenizer, [tokenizer.encode(prompt)], GenerationConfig(max_new_tokens),
                          max_seq_length)[0].text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="consolidated directory, or run / checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="a file with one prompt per line")
    p.add_argument("--encode", default="", help="a passage for the text encoder, docked before the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-cache", action="store_true", help="recompute every step (reference / benchmark)")
    args = p.parse_args(argv)
    from eval.inference import ModelLoadError, load_model

    try:
        g = GenerationConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                             tuple(args.stop), not args.no_cache)
        if args.prompts:
            if not os.path.isfile(args.prompts):
                raise ValueError(f"--prompts: file not found: {args.prompts}")
            prompts = [l.rstrip("\n") for l in open(args.prompts, encoding="utf-8") if l.strip()]
        else:
            prompts = [args.prompt]
        model, cfg, tok, _ = load_model(args.model)
        if args.encode and model.encoder is None:
            raise ValueError("--encode needs a model with a text encoder (this one is a GPT baseline)")
    except (ValueError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    passage = tok.encode(args.encode) if args.encode else []
    t0, n_new = time.perf_counter(), 0
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        outs = generate_batch(model, tok, [tok.encode(x) for x in chunk], g, cfg.model.max_seq_length,
                              passages=[passage] * len(chunk))
        for prompt, o in zip(chunk, outs):
            n_new += len(o.ids)
            for note in o.notes:
                print(f"warning: {note}", file=sys.stderr)
            print(f"prompt: {prompt!r}\ncontinuation: {o.text!r}  [{len(o.ids)} tokens, stopped by {o.stopped_by}]")
    dt = time.perf_counter() - t0
    print(f"{n_new} tokens in {dt:.1f}s ({n_new / max(dt, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
