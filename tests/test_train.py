"""The trainer under DeepSpeed on CPU/gloo: ZeRO 0-3 and TP=2 match one process, exact resume after kill -9,
incomplete checkpoints skipped, multi-node rendezvous, a dead rank, NaN handling, bad configs."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import parity
from pretrain.checkpoint import COMPLETE, find_resume
from pretrain.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["model.vocab_size=1000", "model.max_seq_length=128",
         "model.decoder.layers=2", "model.decoder.hidden=64", "model.decoder.heads=4", "model.decoder.ffn_hidden=128",
         "model.encoder.layers=1", "model.encoder.hidden=32", "model.encoder.heads=2", "model.encoder.ffn_hidden=64",
         "data.seq_length=128", "data.span_length=32", "data.split=90,10,0",
         "optimizer.lr=3e-3", "schedule.warmup_steps=2", "logging.log_interval=1", "logging.eval_interval=0",
         "logging.eval_iters=0", "logging.tensorboard=false", "parallel.micro_batch=2", "parallel.timeout_s=60"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")


def launch(run_dir, tok_model, prefix, *overrides, nproc=1, steps=6, extra_launch=(), timeout=900, check=True):
    cmd = [sys.executable, "-m", "pretrain.launch", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), *extra_launch, "--", f"run_dir={run_dir}",
           *([f"data.tokenizer_model={tok_model}"] if tok_model else []),
           f"data.data_path=[{prefix}]", f"schedule.train_steps={steps}", *SMALL, *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def wait_steps(run_dir, n, timeout=600):
    """Until metrics.jsonl has n step records; generous, since CI machines can be several times slower than a quiet
    one (a signal sent before the trainer's handlers are installed would test nothing)."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(metrics) and sum('"loss"' in l for l in open(metrics)) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps within {timeout}s")


def losses(run_dir):
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def final_weights(run_dir):
    ckpt = os.path.join(run_dir, "checkpoints")
    tag = open(os.path.join(ckpt, "latest")).read().strip()
    sd = torch.load(os.path.join(ckpt, tag, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    return tag, sd


@pytest.fixture(scope="module")
def single(tmp_path_factory, tok_model, moby_prefix):
    """Reference: one process, accumulating 2 micro-batches = the global batch of 2 ranks x 1 micro-batch."""
    run = tmp_path_factory.mktemp("single")
    launch(run, tok_model, moby_prefix, "parallel.grad_accum=2", "parallel.deepspeed=zero0")
    return losses(run)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["0", "1", "2", "3", "3_offload"])
def test_data_parallel_zero_stages_match_one_process(stage, single, tmp_path, tok_model, moby_prefix):
    launch(tmp_path, tok_model, moby_prefix, f"parallel.deepspeed=zero{stage}", nproc=2)
    got = losses(tmp_path)
    assert sorted(got) == sorted(single) == list(range(1, 7))
    for step in single:
        assert got[step] == pytest.approx(single[step], rel=1e-5, abs=1e-6), (stage, step)
    assert single[6] < single[1] - 0.3, "it learns"


@pytest.mark.slow
def test_tensor_parallel_2_matches_1(tmp_path, tok_model, moby_prefix):
    launch(tmp_path / "tp1", tok_model, moby_prefix, "parallel.deepspeed=zero1", steps=4)
    launch(tmp_path / "tp2", tok_model, moby_prefix, "parallel.deepspeed=zero1", "parallel.tp=2", nproc=2, steps=4)
    a, b = losses(tmp_path / "tp1"), losses(tmp_path / "tp2")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    parity.check("metalm_tp2", tmp_path / "tp2", parity.inputs_digest(tok_model, moby_prefix))


@pytest.mark.slow
def test_exact_resume_after_kill_9(tmp_path, tok_model, moby_prefix):
    common = ["parallel.deepspeed=zero2", "checkpoint.save_interval=4", "checkpoint.keep_last=5"]
    launch(tmp_path / "straight", tok_model, moby_prefix, *common, nproc=2, steps=8)
    r = launch(tmp_path / "cut", tok_model, moby_prefix, *common, "callbacks=[{path: tests.fault_injection.FaultInjection, die_at_step: 6, die_rank: 1}]",
               nproc=2, steps=8, check=False)
    assert r.returncode != 0
    assert not os.path.exists(tmp_path / "cut" / "checkpoints" / "step_00000008")
    launch(tmp_path / "cut", tok_model, moby_prefix, *common, nproc=2, steps=8)  # resume auto from step 4
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "cut")
    assert a == b, "identical losses, bit for bit, including the data order and the spans"
    tag_a, wa = final_weights(tmp_path / "straight")
    tag_b, wb = final_weights(tmp_path / "cut")
    assert tag_a == tag_b == "step_00000008"
    assert wa.keys() == wb.keys()
    tensors = [k for k in wa if isinstance(wa[k], torch.Tensor)]  # megatron layers also store _extra_state=None
    assert len(tensors) > 20
    for k in tensors:
        assert torch.equal(wa[k], wb[k]), k
    inputs = parity.inputs_digest(tok_model, moby_prefix)
    parity.check("metalm_zero2_dp2", tmp_path / "straight", inputs)
    parity.check("metalm_zero2_kill9_resume", tmp_path / "cut", inputs)


def test_incomplete_checkpoint_is_never_resumed(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False)):
        d = ckpt / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (d / COMPLETE).write_text("ok")
    warnings = []
    got = find_resume(str(ckpt), "auto", log=lambda m, **k: warnings.append(m))
    assert got.endswith("step_00000008")
    assert warnings and "step_00000012" in warnings[0] and "incomplete" in warnings[0]
    assert find_resume(str(ckpt), "none") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_resume(str(ckpt / "step_00000012"), str(ckpt / "step_00000012"))


@pytest.mark.slow
def test_two_nodes_on_one_machine(tmp_path, tok_model, moby_prefix):
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "pretrain.launch", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node",
               "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "--",
               f"run_dir={tmp_path}", f"data.tokenizer_model={tok_model}", f"data.data_path=[{moby_prefix}]",
               "schedule.train_steps=3", *SMALL]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                                      cwd=ROOT))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "world 2 (dp 2, tp 1, pp 1)" in outs[0] and sorted(losses(tmp_path)) == [1, 2, 3]


@pytest.mark.slow
def test_dead_rank_ends_the_job_with_its_name(tmp_path, tok_model, moby_prefix):
    r = launch(tmp_path, tok_model, moby_prefix, "callbacks=[{path: tests.fault_injection.FaultInjection, die_at_step: 2, die_rank: 1}]", nproc=2,
               check=False, timeout=900)
    ended = time.time()
    died = float((tmp_path / "fault_injection.died_at").read_text())  # written by the rank just before its SIGKILL
    # torchrun sees the dead rank and stops the other (SIGTERM, SIGKILL ~30 s later); no wait for a collective timeout
    assert r.returncode != 0 and ended - died < 120, ended - died
    text = r.stdout + r.stderr
    assert "local_rank: 1" in text and "Signal 9 (SIGKILL)" in text, text[-2000:]
    assert "training failed" in r.stderr


@pytest.mark.slow
def test_nan_loss_skipped_then_k_in_a_row_stops(tmp_path, tok_model, moby_prefix):
    launch(tmp_path / "one", tok_model, moby_prefix, "callbacks=[{path: tests.fault_injection.FaultInjection, nan_at_steps: [3]}]", nproc=2, steps=5)
    got = losses(tmp_path / "one")
    assert sorted(got) == [1, 2, 3, 4, 5]
    last = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl")][-1]
    assert last["skipped"] == 1
    r = launch(tmp_path / "many", tok_model, moby_prefix, "callbacks=[{path: tests.fault_injection.FaultInjection, nan_at_steps: [3], nan_count: 3}]", "max_bad_steps=3",
               "checkpoint.save_interval=2", nproc=2, steps=6, check=False)
    assert r.returncode == 3  # the worker's own status, through torchrun and the launcher
    assert "3 non-finite losses in a row" in r.stdout + r.stderr
    assert "exitcode  : 3" in r.stderr and "Traceback" not in r.stderr  # torchrun's report, not its traceback
    assert open(tmp_path / "many" / "checkpoints" / "latest").read() == "step_00000002"


def test_bad_configs_fail_fast_naming_the_field(tmp_path, tok_model, moby_prefix):
    from pretrain.checks import preflight as validate  # what every rank and the launcher check

    with pytest.raises(ConfigError, match="model.decoder.layerz: unknown key"):
        load_config(None, ["model.decoder.layerz=2"])
    with pytest.raises(ConfigError, match="parallel.micro_batch: expected int"):
        load_config(None, ["parallel.micro_batch=two"])
    base = [f"data.tokenizer_model={tok_model}", f"data.data_path=[{moby_prefix}]", "data.split=90,10,0"]
    with pytest.raises(ConfigError, match=r"model.decoder.heads=4 is not divisible by parallel.tp=3"):
        validate(load_config(None, base + ["parallel.tp=3"]), world=3)
    with pytest.raises(ConfigError, match="world size 3 is not divisible by tp\\*pp = 2"):
        validate(load_config(None, base + ["parallel.tp=2"]), world=3)
    with pytest.raises(ConfigError, match="data.tokenizer_model: not found: /nope"):
        validate(load_config(None, ["data.tokenizer_model=/nope", f"data.data_path=[{moby_prefix}]"]), world=1)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("parallel:\n  deepspeed: zero9\n")
    r = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(cfg_file), *base,
                        f"run_dir={tmp_path}"], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "parallel.deepspeed: 'zero9' is neither a file nor one of" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pretrain.train", f"data.tokenizer_model={tok_model}", "data.split=1,0,0",
                        f"data.data_path=[{tmp_path}/missing]", f"run_dir={tmp_path}"],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing.bin not found" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pretrain.train", *base, *SMALL, f"run_dir={tmp_path}/init",
                        f"checkpoint.init_from={tmp_path}/nope"], capture_output=True, text=True, env=env(), cwd=ROOT,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"checkpoint.init_from: checkpoint not found: {tmp_path}/nope" in r.stderr


def test_ds_json_cannot_override_owned_values(tmp_path):
    from pretrain.engine import deepspeed_config

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 99, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=99 in the DeepSpeed JSON disagrees"):
        deepspeed_config(load_config(None, [f"parallel.deepspeed={f}"]), dp_size=1)
    ds = deepspeed_config(load_config(None, ["parallel.micro_batch=3", "parallel.grad_accum=2"]), dp_size=4)
    assert ds["train_batch_size"] == 24 and ds["zero_optimization"]["stage"] == 2


def test_lr_schedule_and_param_groups():
    from pretrain.engine import lr_lambda, param_groups
    from pretrain.model.metalm import MetaLM
    from pretrain.parallel import init_distributed, init_model_parallel

    cfg = load_config(None, ["schedule.train_steps=100", "schedule.warmup_steps=10", "optimizer.lr=1.0",
                             "optimizer.min_lr=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55)
    init_distributed("gloo")
    init_model_parallel(1, 1)
    cfg = load_config(None, ["model.encoder.layers=1", "model.freeze_encoder_layers=1"])
    model = MetaLM(cfg.model)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" not in names[id(p)] and "embedding" not in names[id(p)] for p in decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    assert not any(names[id(p)].startswith("encoder.stack.layers.0") for g in (decay, no_decay) for p in g["params"])


def test_plot(tmp_path):
    from pretrain.plot import plot

    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        with open(tmp_path / run / "metrics.jsonl", "w") as f:
            for s in range(1, 30):
                f.write(json.dumps({"step": s, "loss": 5 - s / 10}) + "\n")
            f.write(json.dumps({"step": 29, "valid_loss": 2.5, "valid_ppl": 12.2}) + "\n")
    out = plot([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "loss.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_pipeline_parallel_2_matches_1(tmp_path, tok_model, moby_prefix):
    common = ["parallel.deepspeed=pipeline_zero1", "parallel.pipeline_engine=true", "parallel.grad_accum=2",
              "checkpoint.save_interval=4"]
    launch(tmp_path / "pp1", tok_model, moby_prefix, *common, steps=4)
    r = launch(tmp_path / "pp2", tok_model, moby_prefix, *common, "parallel.pp=2", "--generate", "The whale", nproc=2,
               steps=4)
    assert "--generate skipped: not available under pipeline parallelism" in r.stderr  # said, not silently ignored
    a, b = losses(tmp_path / "pp1"), losses(tmp_path / "pp2")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    layer_files = [f for f in os.listdir(tmp_path / "pp2" / "checkpoints" / "step_00000004") if f.startswith("layer_")]
    assert len(layer_files) >= 5, "DeepSpeed's per-layer pipeline checkpoint"
    parity.check("metalm_pp2", tmp_path / "pp2", parity.inputs_digest(tok_model, moby_prefix))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, tok_model, moby_prefix):
    cmd = [sys.executable, "-m", "pretrain.launch", "--nproc-per-node", "2", "--master-port", str(free_port()), "--",
           f"run_dir={tmp_path}", f"data.tokenizer_model={tok_model}", f"data.data_path=[{moby_prefix}]",
           "schedule.train_steps=100000", "checkpoint.save_interval=0", *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT)
    wait_steps(tmp_path, 3)
    workers = subprocess.run(["pgrep", "-f", f"python -u -m pretrain.train .*run_dir={tmp_path}"], capture_output=True,
                             text=True).stdout.split()
    workers = [int(p) for p in workers if int(p) != proc.pid]
    assert len(workers) == 2, workers
    for pid in workers:  # what a scheduler's preemption does: SIGTERM to every worker
        os.kill(pid, signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested: saving at step" in out
    tag = open(tmp_path / "checkpoints" / "latest").read()
    assert os.path.exists(tmp_path / "checkpoints" / tag / COMPLETE)
    assert int(tag[5:]) == max(losses(tmp_path))


def test_slurm_script_and_launcher_help():
    r = subprocess.run([sys.executable, "-m", "pretrain.launch", "--slurm", "--print", "--nnodes", "4",
                        "--nproc-per-node", "8", "--gpus", "--", "--config", "c.yaml", "parallel.tp=2"],
                       capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 0
    s = r.stdout
    assert "#SBATCH --nodes=4" in s and "#SBATCH --gpus-per-node=8" in s
    assert "-m pretrain.launch --nnodes=$SLURM_NNODES --nproc-per-node=8 --rdzv-endpoint=$MASTER_ADDR:29500" in s
    assert "--grace-s=120 -- --config c.yaml parallel.tp=2" in s and "srun --kill-on-bad-exit=1" in s
    assert "#SBATCH --signal=TERM@180" in s
    for mod in ("pretrain.train", "pretrain.launch", "pretrain.plot", "pretrain.convert"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, env=env(), cwd=ROOT)
        assert r.returncode == 0 and "usage:" in r.stdout, mod


def test_flops_per_token_matches_reference_formula():
    from pretrain.config import preset

    gpt = preset("gpt-baseline-1.3b")
    d = gpt.decoder
    n = gpt.param_count()["decoder"]  # tied: the embedding matrix is the output layer
    assert gpt.flops_per_token(2048) == 6 * n + 12 * d.layers * d.hidden * 2048
    assert preset("metalm-lo-1.3b").flops_per_token(2048) > gpt.flops_per_token(2048)


@pytest.mark.slow
def test_bf16_trains(tmp_path, tok_model, moby_prefix):
    launch(tmp_path, tok_model, moby_prefix, "parallel.precision=bf16", "parallel.deepspeed=zero2", nproc=2, steps=3)
    got = losses(tmp_path)
    assert sorted(got) == [1, 2, 3] and all(np.isfinite(v) for v in got.values())


def test_validation_perplexity_is_the_causal_lm_view(tok_model, tok, moby_prefix, tmp_path):
    from pretrain.modes import pick_mode

    def build_data(cfg, tok, dp):
        return pick_mode(cfg).build_data(cfg, tok, dp)

    cfg = load_config(None, [f"run_dir={tmp_path}", f"data.tokenizer_model={tok_model}",
                             f"data.data_path=[{moby_prefix}]", "logging.eval_iters=2", *SMALL[:-5]])
    _, valid = build_data(cfg, tok, 1)
    assert set(valid) == {"valid", "valid_sclm"}
    lm, sclm = valid["valid"][0], valid["valid_sclm"][0]
    np.testing.assert_array_equal(lm["tokens"], sclm["tokens"])
    assert lm["loss_mask"].all() and lm["enc_tokens"].shape == (0,)
    assert len(sclm["spans"]) > 0 and not sclm["loss_mask"].all()
    gpt_cfg = load_config(None, [f"run_dir={tmp_path}", f"data.tokenizer_model={tok_model}",
                                 f"data.data_path=[{moby_prefix}]", "model.encoder=null", "logging.eval_iters=2",
                                 *[o for o in SMALL[:-5] if not o.startswith("model.encoder")]])
    assert set(build_data(gpt_cfg, tok, 1)[1]) == {"valid"}


@pytest.mark.slow
def test_exact_resume_under_pipeline_parallelism(tmp_path, tok_model, moby_prefix):
    common = ["parallel.deepspeed=pipeline_zero1", "parallel.pp=2", "checkpoint.save_interval=3"]
    launch(tmp_path / "straight", tok_model, moby_prefix, *common, nproc=2, steps=6)
    r = launch(tmp_path / "cut", tok_model, moby_prefix, *common, "callbacks=[{path: tests.fault_injection.FaultInjection, die_at_step: 5, die_rank: 0}]",
               nproc=2, steps=6, check=False)
    assert r.returncode != 0
    launch(tmp_path / "cut", tok_model, moby_prefix, *common, nproc=2, steps=6)
    assert losses(tmp_path / "straight") == losses(tmp_path / "cut")
