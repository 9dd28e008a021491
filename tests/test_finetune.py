"""Finetuning as a trainer data mode: which parameters train in each mode (and hold optimizer state), the loss on
answer tokens only, packed examples isolated by the document mask, validation accuracy with the best checkpoint,
and exact resume after kill -9."""
import glob
import os

import numpy as np
import parity
import pytest
import torch

from data_tools.task_samples import Sequence
from data_tools.datasets import blend_order
from data_tools.task_rows import TaskRows
from pretrain.modes.finetune import apply_mode
from data_tools.objective import collate
from test_train import final_weights, launch, losses


@pytest.fixture(scope="module")
def ft_base(trained, task_dir, tmp_path_factory):
    """Finetuning overrides: the session's tiny trained MetaLM as init_from, spam + polarity task data."""
    _, model_dir = trained
    return [f"checkpoint.init_from={model_dir}", f"finetune.data_dir={task_dir}", "data.seq_length=128",
            "finetune.eval_items=16", "finetune.max_items=64", "logging.eval_interval=3", "logging.log_interval=1",
            "parallel.micro_batch=2", "optimizer.lr=1e-3"]


def run_ft(run_dir, base, *extra, steps=4, nproc=1, check=True):
    # the model and tokenizer come from init_from (finetune.model_from_init); SMALL's model keys are ignored
    return launch(run_dir, "", "", *base, *extra, nproc=nproc, steps=steps, check=check)


def consolidated_state(model_dir):
    from pretrain.model_io import read_consolidated

    return read_consolidated(str(model_dir))[1]


# ------------------------------------------------------------------ modes
def test_modes_select_the_trainable_parameters():
    from pretrain.config import ModelConfig, StackConfig
    from pretrain.engine import param_groups
    from pretrain.model.metalm import MetaLM
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    model = MetaLM(ModelConfig(vocab_size=300, max_seq_length=64, decoder=StackConfig(2, 32, 2),
                               encoder=StackConfig(1, 16, 2)))
    for mode, prefixes in (("encoder", ("encoder.", "connector.")), ("decoder", ("decoder.",)),
                           ("full", ("encoder.", "connector.", "decoder."))):
        counts = apply_mode(model, mode)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert names == {n for n, _ in model.named_parameters() if n.startswith(prefixes)}, mode
        in_opt = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
        assert in_opt == {id(p) for n, p in model.named_parameters() if n in names}, mode
        assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_encoder_mode_keeps_the_decoder_bitwise_and_holds_no_optimizer_state_for_it(tmp_path, ft_base, trained):
    from pretrain.model_io import read_checkpoint

    # ZeRO-1: DeepSpeed does not list frozen parameters for zero_to_fp32 there; conversion must still find them
    run_ft(tmp_path, ft_base, "finetune.tasks=[spam]", "finetune.mode=encoder", "checkpoint.save_interval=4",
           "parallel.deepspeed=zero1")
    _, model_dir = trained
    before = consolidated_state(model_dir)
    _, after, info = read_checkpoint(str(tmp_path / "checkpoints"))
    assert info["read_from"] == "zero_to_fp32 (ZeRO-1)" and after.keys() == before.keys()
    dec = [k for k in before if k.startswith("decoder.")]
    assert len(dec) > 10 and all(torch.equal(before[k], after[k]) for k in dec), "decoder changed"
    enc = [k for k in before if k.startswith(("encoder.", "connector."))]
    changed = [k for k in enc if not torch.equal(before[k], after[k])]
    assert len(changed) == len(enc), f"unchanged: {sorted(set(enc) - set(changed))[:3]}"
    # the optimizer's state: exactly the encoder + connector parameters (ZeRO's flat fp32 copy and Adam moments)
    trainable = sum(before[k].numel() for k in enc)
    opt = torch.load(glob.glob(str(tmp_path / "checkpoints" / "step_00000004" / "*optim_states.pt"))[0],
                     weights_only=False)["optimizer_state_dict"]
    flat = sum(t.numel() for t in opt["single_partition_of_fp32_groups"])
    assert flat - sum(opt["group_paddings"]) == trainable
    moments = sum(v["exp_avg"].numel() for v in opt["base_optimizer_state"]["state"].values())
    assert moments == flat


# ------------------------------------------------------------------ rows: loss mask and packing
class Tok:
    class ids:
        bos, pad = 1, 3


def seq(enc, cue, target):
    return Sequence([("enc", list(enc)), ("dec", list(cue))], list(target))


def test_rows_pack_whole_examples_with_answer_only_targets():
    a = [seq(range(10, 20), [50, 51], [60, 61]), seq(range(20, 25), [50], [62])]
    rows = TaskRows([a], [1.0], Tok, T=32, num_rows=3, seed=0)
    r = rows[0]
    docs = r["document_ids"]
    assert set(docs[docs >= 0]) == {0, 1, 2}  # three examples fit in 32 tokens
    for d in range(3):
        at = np.flatnonzero(docs == d)
        assert (r["position_ids"][at] == np.arange(len(at))).all()  # positions restart per example
        assert r["tokens"][at[0]] == Tok.ids.bos
        counted = r["labels"][at][r["loss_mask"][at] == 1]
        t, i = rows.rows[0][d]
        assert counted.tolist() == rows.seqs[t][i].target  # the answer tokens, nothing else
    # every encoder token docks into its own example's slots, at the decoder copy of the same token
    dst = r["dock_dst"][r["dock_dst"] >= 0]
    assert (r["tokens"][dst] == r["enc_tokens"][: len(dst)]).all()
    assert (docs[dst] >= 0).all()


def test_loss_counts_only_answer_tokens_and_packed_examples_do_not_see_each_other():
    from pretrain.config import ModelConfig, StackConfig
    from pretrain.model.metalm import MetaLM
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, max_seq_length=64, decoder=StackConfig(2, 32, 2), encoder=StackConfig(1, 16, 2),
                      document_mask=True)
    model = MetaLM(cfg).eval()
    ex1, ex2 = seq(range(10, 20), [50, 51], [60, 61]), seq(range(20, 26), [52], [62, 63])
    # two one-item tasks with equal weights: ex1 then ex2 (Megatron's blending order), 14 + 9 tokens in a row of 30
    row = TaskRows([[ex1], [ex2]], [1.0, 1.0], Tok, T=30, num_rows=1, seed=0)[0]
    assert set(row["document_ids"][row["document_ids"] >= 0]) == {0, 1}
    batch = collate([row])
    with torch.no_grad():
        base = model(batch).item()
        # a target outside the answers changes nothing
        b2 = {k: v.clone() for k, v in batch.items()}
        off = int(np.flatnonzero(row["loss_mask"] == 0)[3])
        b2["labels"][0, off] = (b2["labels"][0, off] + 7) % 300
        assert model(b2).item() == base
        # an answer token changes the loss
        on = int(np.flatnonzero(row["loss_mask"] == 1)[0])
        b2["labels"][0, on] = (b2["labels"][0, on] + 7) % 300
        assert model(b2).item() != base
        # the second example's logits do not depend on the first's tokens (decoder and encoder), and equal the
        # second example alone in its own row
        logits = model.logits(batch)[0]
        other = seq(range(100, 110), [53, 54], [64, 65])
        row_b = TaskRows([[other], [ex2]], [1.0, 1.0], Tok, T=30, num_rows=1, seed=0)[0]
        alone = TaskRows([[ex2]], [1.0], Tok, T=30, num_rows=1, seed=0, pack=False)[0]
        lb = model.logits(collate([row_b]))[0]
        la = model.logits(collate([alone]))[0]
    p2 = np.flatnonzero(row["document_ids"] == 1)
    q2 = np.flatnonzero(row_b["document_ids"] == 1)
    s2 = np.flatnonzero(alone["document_ids"] == 0)
    assert len(p2) == len(q2) == len(s2)
    assert torch.allclose(logits[p2], lb[q2], atol=1e-5) and torch.allclose(logits[p2], la[s2], atol=1e-5)


def test_multitask_blend_follows_the_weights_and_is_deterministic():
    order = blend_order([50, 10], [3.0, 1.0], 400, seed=1)
    share = sum(1 for t, _ in order if t == 0) / len(order)
    assert abs(share - 0.75) < 0.01
    assert order == blend_order([50, 10], [3.0, 1.0], 400, seed=1)
    # each epoch of a task visits every item once
    firsts = [i for t, i in order if t == 1][:10]
    assert sorted(firsts) == list(range(10))
    assert order != blend_order([50, 10], [3.0, 1.0], 400, seed=2)


# ------------------------------------------------------------------ in the trainer
def test_validation_accuracy_best_checkpoint_and_score(tmp_path, ft_base, task_dir):
    import json
    import subprocess
    import sys

    from test_train import ROOT, env

    run_ft(tmp_path, ft_base, "finetune.tasks=[spam,polarity]", "finetune.weights=[1,1]", steps=6)
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    acc = [r for r in recs if "ft/mean_acc" in r]
    assert [r["step"] for r in acc] == [3, 6] and all(0 <= r["ft/spam/acc"] <= 1 for r in acc)
    best = json.load(open(tmp_path / "checkpoints" / "best.json"))
    assert best["ft/mean_acc"] == max(r["ft/mean_acc"] for r in acc)
    assert os.path.realpath(tmp_path / "checkpoints" / "best").endswith(best["tag"])
    r = subprocess.run([sys.executable, "-m", "eval.score", "--model", str(tmp_path / "checkpoints" / "best"),
                        "--tasks", "spam", "--data", str(task_dir), "--split", "validation", "--limit", "16",
                        "--placement", "encoder", "--out", str(tmp_path / "score")],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.load(open(glob.glob(str(tmp_path / "score" / "*.json"))[0]))["records"][0]
    assert got["step"] == best["step"] and abs(got["metrics"]["acc"] - best["ft/spam/acc"]) < 1e-9


def test_gpt_baseline_finetunes_all_decoder_parameters(tmp_path, task_dir, tok_model, moby_prefix):
    from pretrain.model_io import read_checkpoint, write_consolidated

    launch(tmp_path / "gpt", tok_model, moby_prefix, "model.encoder=null", "checkpoint.save_interval=2", steps=2)
    cfg, sd, info = read_checkpoint(str(tmp_path / "gpt" / "checkpoints"))
    write_consolidated(str(tmp_path / "gpt_c"), cfg, sd, tok_model, info)
    launch(tmp_path / "ft", "", "", f"checkpoint.init_from={tmp_path / 'gpt_c'}", f"finetune.data_dir={task_dir}",
           "finetune.tasks=[polarity]", "finetune.max_items=32", "finetune.eval_items=8", "data.seq_length=128",
           "parallel.micro_batch=2", "logging.eval_interval=0", steps=2)
    text = open(tmp_path / "ft" / "train.log").read()
    assert "mode decoder" in text and "causal placement" in text
    _, after = final_weights(tmp_path / "ft")
    dec = [k for k in sd if k.startswith("decoder.")]
    assert all(not torch.equal(sd[k], after[k]) for k in dec if "norm" not in k)
    inputs = parity.inputs_digest(tok_model, moby_prefix, parity.tree(task_dir / "spam", task_dir / "polarity"))
    parity.check("gpt_baseline", tmp_path / "gpt", inputs)
    parity.check("finetune_decoder", tmp_path / "ft", inputs)


@pytest.mark.slow
def test_exact_resume_after_kill_9_while_finetuning(tmp_path, ft_base, tok_model, moby_prefix, task_dir):
    common = ["finetune.tasks=[spam,polarity]", "checkpoint.save_interval=2", "checkpoint.keep_last=5",
              "parallel.deepspeed=zero2", "logging.eval_interval=0"]
    run_ft(tmp_path / "straight", ft_base, *common, nproc=2, steps=6)
    r = run_ft(tmp_path / "cut", ft_base, *common, "callbacks=[{path: tests.fault_injection.FaultInjection, die_at_step: 5, die_rank: 1}]", nproc=2, steps=6,
               check=False)
    assert r.returncode != 0 and not os.path.exists(tmp_path / "cut" / "checkpoints" / "step_00000006")
    run_ft(tmp_path / "cut", ft_base, *common, nproc=2, steps=6)
    assert losses(tmp_path / "straight") == losses(tmp_path / "cut")
    tag_a, wa = final_weights(tmp_path / "straight")
    tag_b, wb = final_weights(tmp_path / "cut")
    assert tag_a == tag_b == "step_00000006"
    for k in (k for k in wa if isinstance(wa[k], torch.Tensor)):
        assert torch.equal(wa[k], wb[k]), k
    inputs = parity.inputs_digest(tok_model, moby_prefix, parity.tree(task_dir / "spam", task_dir / "polarity"))
    parity.check("finetune_encoder_dp2", tmp_path / "straight", inputs)
    parity.check("finetune_encoder_kill9_resume", tmp_path / "cut", inputs)
