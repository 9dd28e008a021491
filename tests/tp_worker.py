"""Spawned by tests: build a small MetaLM at a given TP size on gloo, run one forward/backward on a fixed batch,
and save loss, full (gathered) parameters and gradients from rank 0."""
import os

import numpy as np
import torch
import torch.distributed as dist


def small_config(**kw):
    from pretrain.config import ModelConfig, StackConfig

    return ModelConfig(vocab_size=512, max_seq_length=256, decoder=StackConfig(2, 64, 4, ffn_hidden=128),
                       encoder=StackConfig(2, 32, 2, ffn_hidden=64), **kw)


def fixed_batch(T=256, B=2, span_length=32, vocab=512, seed=0):
    from data_tools.objective import SampleConfig, SpanConfig, build_sample, collate

    rng = np.random.default_rng(seed)
    sc = SampleConfig(seq_length=T, spans=SpanConfig(span_length=span_length))
    docs = (np.arange(T + 1) // 150).astype(np.int32)
    return collate([build_sample(rng.integers(7, vocab, T + 1), docs, i, sc) for i in range(B)])


def vl_config():
    """A small vision-language model with the caption-prefix variant (vision encoder reads 4 prefix tokens)."""
    from pretrain.config import ModelConfig, StackConfig, VisionConfig

    return ModelConfig(vocab_size=512, max_seq_length=64, decoder=StackConfig(2, 64, 4, ffn_hidden=128),
                       vision=VisionConfig(StackConfig(2, 32, 2, ffn_hidden=64), image_size=16, patch_size=4,
                                           caption_prefix=4), vision_connector="mlp")


def vl_batch(T=48, seed=0):
    """Two rows: one image with a 3-token caption prefix; two images (interleaved captions)."""
    from data_tools.vl_samples import Pair, VLIds, build_vl_row, collate_vl

    rng = np.random.default_rng(seed)
    ids = VLIds(bos=1, eos=2, pad=3, image=5, image_end=6)
    cap = [rng.integers(7, 512, n).tolist() for n in (8, 5, 6)]
    rows = [build_vl_row([Pair(cap[0], prefix=3)], 16, T, ids, 4, 16),
            build_vl_row([Pair(cap[1], prefix=0), Pair(cap[2], prefix=4)], 16, T, ids, 4, 16)]
    images = [rng.standard_normal((3, 16, 16)).astype(np.float32) for _ in range(3)]
    return collate_vl(rows, images)


def gather_full(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    if not getattr(p, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return t.detach().clone()
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=p.partition_dim)


def join_group(rank: int, world: int, port: int) -> None:
    """This spawned process as rank `rank` of a gloo group of `world` on this machine, one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from pretrain.parallel import init_distributed

    init_distributed("gloo")


def run(rank: int, world: int, tp: int, port: int, out: str, cfg_kw: dict):
    join_group(rank, world, port)
    from pretrain.parallel import init_model_parallel

    init_model_parallel(tp=tp, pp=1, seed=1)
    from pretrain.model.metalm import MetaLM

    torch.manual_seed(0)
    vl = cfg_kw.pop("vl", False)
    model = MetaLM(vl_config() if vl else small_config(**cfg_kw))
    loss = model(vl_batch() if vl else fixed_batch())
    loss.backward()
    params = {n: gather_full(p, p) for n, p in model.named_parameters()}
    grads = {n: gather_full(p, p.grad) for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"loss": loss.detach(), "params": params, "grads": grads}, out)
    dist.barrier()
    dist.destroy_process_group()


def run_eval(rank: int, world: int, port: int, out_dir: str, tok_model: str, items: list):
    """Score polarity items (both placements) and generate (greedy and sampled, with an encoded passage) at TP=world;
    every rank saves what it got."""
    join_group(rank, world, port)
    from pretrain.parallel import init_model_parallel

    init_model_parallel(tp=world, pp=1, seed=1)
    from data_tools.tasks import get_task
    from data_tools.tokenizer import Tokenizer
    from eval.generate import GenerationConfig, generate_batch
    from eval.score import score_items
    from pretrain.config import ModelConfig, StackConfig
    from pretrain.model.metalm import MetaLM

    tok = Tokenizer(tok_model)
    torch.manual_seed(0)
    model = MetaLM(ModelConfig(vocab_size=1000, max_seq_length=256, decoder=StackConfig(2, 64, 4, ffn_hidden=128),
                               encoder=StackConfig(2, 32, 2, ffn_hidden=64))).eval()
    task = get_task("polarity")
    lls = [score_items(model, tok, task, items, items, p, k, 0, 256, 64, batch_size=3).lls
           for p in ("causal", "encoder") for k in (0, 1)]
    prompts = [tok.encode("Call me Ishmael."), tok.encode("The whale")]
    passage = [tok.encode("Some years ago, never mind how long.")] * 2
    gen = [o.ids for o in generate_batch(model, tok, prompts, GenerationConfig(12), 256, passages=passage,
                                         stop_ids=())]
    sampled = [o.ids for o in generate_batch(model, tok, prompts, GenerationConfig(12, temperature=1.0, seed=5), 256,
                                             stop_ids=())]
    torch.save({"lls": np.array(lls), "gen": gen, "sampled": sampled},
               os.path.join(out_dir, f"eval_tp{world}_rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_gqa_logits(rank: int, world: int, port: int, model_dir: str, out_dir: str):
    """Load a consolidated (grouped-query attention) model split over TP=world and save the full logits of a fixed
    batch from rank 0 (the vocab-parallel shards gathered)."""
    join_group(rank, world, port)
    from pretrain.parallel import init_model_parallel

    init_model_parallel(tp=world, pp=1, seed=1)
    from pretrain.model_io import load_into, read_consolidated
    from pretrain.model.metalm import MetaLM

    cfg, sd, _ = read_consolidated(model_dir)
    model = MetaLM(cfg.model).eval()
    load_into(model, sd, tp_rank=rank, tp=world)
    assert model.decoder.stack.layers[0].attn.local_kv_heads == cfg.model.decoder.kv_heads // world
    ids = torch.randint(0, cfg.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3))
    batch = {"tokens": ids, "position_ids": torch.arange(64).expand(2, -1),
             "document_ids": torch.zeros(2, 64, dtype=torch.int32)}
    with torch.no_grad():
        part = model.logits(batch).contiguous()
    parts = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(parts, part)
    if rank == 0:
        torch.save(ids, os.path.join(out_dir, "ids.pt"))
        torch.save(torch.cat(parts, dim=-1), os.path.join(out_dir, "logits.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_imported(rank: int, world: int, port: int, model_dir: str, out: str, tok_model: str, text: str):
    """A consolidated MetaLM with an imported (BERT-family, own tokenizer) text encoder at TP=world: one
    forward/backward (eval mode: no dropout) on re-tokenized spans; rank 0 saves the loss, the encoder output and the
    encoder's full gradients."""
    join_group(rank, world, port)
    from pretrain.parallel import init_model_parallel

    init_model_parallel(tp=world, pp=1, seed=1)
    from data_tools.encoder_tokens import aligner_for
    from data_tools.objective import SampleConfig, SpanConfig, build_sample, collate
    from data_tools.tokenizer import Tokenizer
    from pretrain.model.metalm import MetaLM, encoder_mask
    from pretrain.model_io import load_into, read_consolidated

    cfg, sd, _ = read_consolidated(model_dir)
    model = MetaLM(cfg.model).eval()
    load_into(model, sd, tp_rank=rank, tp=world)
    tok = Tokenizer(tok_model)
    aligner = aligner_for(cfg.model.encoder, tok)
    scfg = SampleConfig(seq_length=128, spans=SpanConfig(span_length=32), encoder_row=256,
                        encoder_pad_id=cfg.model.encoder.pad_id)
    ids = np.array((tok.encode(text) * 3)[:129])
    batch = collate([build_sample(ids, np.zeros(129, dtype=np.int32), i, scfg, aligner) for i in range(2)])
    loss = model(batch)
    loss.backward()
    with torch.no_grad():
        h = model.encoder(batch["enc_tokens"], batch["enc_positions"], encoder_mask(cfg.model, batch["enc_segments"]))
    grads = {n: gather_full(p, p.grad) for n, p in model.named_parameters()
             if p.grad is not None and n.startswith("encoder.")}
    if rank == 0:
        torch.save({"loss": loss.detach(), "enc": h, "grads": grads}, out)
    dist.barrier()
    dist.destroy_process_group()


def run_imported_vision(rank: int, world: int, port: int, model_dir: str, out: str):
    """A consolidated MetaLM with an imported vision tower at TP=world: one forward/backward (eval mode) on two rows
    of image-caption pairs; rank 0 saves the loss, the tower's features and the vision encoder's full gradients."""
    join_group(rank, world, port)
    from pretrain.parallel import init_model_parallel

    init_model_parallel(tp=world, pp=1, seed=1)
    from data_tools.vl_samples import Pair, VLIds, build_vl_row, collate_vl
    from pretrain.model.metalm import MetaLM
    from pretrain.model_io import load_into, read_consolidated

    cfg, sd, _ = read_consolidated(model_dir)
    model = MetaLM(cfg.model).eval()
    load_into(model, sd, tp_rank=rank, tp=world)
    v, slots = cfg.model.vision, cfg.model.image_slots()
    rng = np.random.default_rng(0)
    ids = VLIds(bos=1, eos=2, pad=3, image=5, image_end=6)
    cap = [rng.integers(7, 500, n).tolist() for n in (8, 5, 6)]
    T = 3 * slots + 32
    rows = [build_vl_row([Pair(cap[0])], slots, T, ids), build_vl_row([Pair(cap[1]), Pair(cap[2])], slots, T, ids)]
    images = [rng.standard_normal((3, v.image_size, v.image_size)).astype(np.float32) for _ in range(3)]
    batch = collate_vl(rows, images)
    loss = model(batch)
    loss.backward()
    with torch.no_grad():
        from pretrain.model import masks
        from pretrain.model.attention import AttentionMask

        feats = model.vision(batch["images"], AttentionMask.build(masks.full, 3, v.tokens, None,
                                                                  batch["images"].device, "sdpa"))
    grads = {n: gather_full(p, p.grad) for n, p in model.named_parameters()
             if p.grad is not None and n.startswith("vision.")}
    if rank == 0:
        torch.save({"loss": loss.detach(), "feats": feats, "grads": grads}, out)
    dist.barrier()
    dist.destroy_process_group()
