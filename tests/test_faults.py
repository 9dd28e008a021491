"""Cluster faults: a frozen rank ends the job (watchdog + the launcher's grace), checkpoints are written durably
in order and a marker without its data is refused, the preemption grace belongs to the launcher, and bad steps
in a row stop the run."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pretrain.checkpoint import COMPLETE
from test_train import ROOT, SMALL, env, free_port, launch, losses, wait_steps


def start(run_dir, tok_model, prefix, *overrides, grace=3, nproc=2, new_session=False):
    cmd = [sys.executable, "-m", "pretrain.launch", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "--grace-s", str(grace), "--", f"run_dir={run_dir}", f"data.tokenizer_model={tok_model}",
           f"data.data_path=[{prefix}]", "schedule.train_steps=100000", *SMALL, *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT,
                            start_new_session=new_session)


def worker(launcher_pid, rank):
    import psutil

    from pretrain.launch import training_processes

    for p in training_processes(launcher_pid):
        if p.environ().get("RANK") == str(rank):
            return p
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job(tmp_path, tok_model, moby_prefix):
    """kill -STOP of rank 1 at random moments (mid-step, in the optimizer step, in a save: saves every step):
    rank 0's watchdog names it and exits; the launcher kills the frozen rank after its grace."""
    timeout, grace = 4, 3
    times = []
    for trial in range(int(os.environ.get("METALM_FAULT_TRIALS", "1"))):
        run = tmp_path / f"t{trial}"
        proc = start(run, tok_model, moby_prefix, f"parallel.step_timeout_s={timeout}", "checkpoint.save_interval=1",
                     "checkpoint.keep_last=2", grace=grace)
        try:
            wait_steps(run, 3)
            time.sleep(random.Random(trial).uniform(0.0, 1.0))
            frozen = worker(proc.pid, 1)
            frozen.send_signal(signal.SIGSTOP)
            t0 = time.time()
            out = proc.communicate(timeout=300)[0]
            took = time.time() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 4, out[-2000:]  # the watchdog's status, through the launcher
        assert took <= timeout + grace + 20, (took, out[-2000:])
        assert not frozen.is_running() or frozen.status() == "zombie"
        stack = (run / "watchdog" / "rank_0.stack.txt").read_text()
        assert "rank 1: unresponsive" in stack and "Thread" in stack, stack[:1500]
        assert "watchdog: rank 0 stuck in" in out
        latest = (run / "checkpoints" / "latest").read_text()
        assert (run / "checkpoints" / latest / COMPLETE).exists()  # the last complete checkpoint is untouched
        phase = stack.split(" stuck in ")[1].split(" of step")[0]
        times.append((round(took, 1), phase))
    print(f"frozen-rank trials (seconds from SIGSTOP to the job's exit, rank 0's phase): {times}")


def test_watchdog_limit_and_peer_report(tmp_path):
    from pretrain.watchdog import Watchdog

    wd = Watchdog(str(tmp_path), 0, 3, timeout_s=0, floor_s=50, interval_s=0.1)
    try:
        assert wd.limit() == 50
        wd.step_done(4.0)
        assert wd.limit() == 80  # 20 x the slowest step
        wd.enter("train step", 7)
        time.sleep(0.3)
        now = time.time()
        json.dump({"rank": 1, "host": "h", "pid": 1, "step": 7, "phase": "train step", "phase_s": 0, "alive": now - 60},
                  open(tmp_path / "watchdog" / "heartbeat_rank_1.json", "w"))
        json.dump({"rank": 2, "host": "h", "pid": 2, "step": 6, "phase": "checkpoint save", "phase_s": 0,
                   "alive": now}, open(tmp_path / "watchdog" / "heartbeat_rank_2.json", "w"))
        peers = wd.peers()
        assert peers[0].startswith("rank 1: unresponsive for 60s") and peers[1].startswith("rank 2: in checkpoint save")
        assert json.load(open(tmp_path / "watchdog" / "heartbeat_rank_0.json"))["step"] == 7
    finally:
        wd.close()


class FakeEngine:
    """What checkpoint.save needs of a DeepSpeed engine: it writes its files (as DeepSpeed does, without fsync)."""

    def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
        with open(os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"x" * 4096)


def test_checkpoint_save_is_durable_and_ordered(tmp_path, monkeypatch):
    from pretrain import checkpoint
    from pretrain.model_io import ConvertError, resolve_tag_dir
    from pretrain.parallel import init_distributed

    init_distributed("gloo")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.abspath(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save(FakeEngine(), ckpt, 1, {"state": {"step": 1}}, "a: 1\n", keep_last=3, log=lambda *a, **k: None)
    tag = os.path.join(ckpt, "step_00000001")
    def first_fsync(path):  # of the file itself or of the temporary it was renamed from
        return next(i for i, (e, p) in enumerate(events) if e == "fsync" and (p == path or p.startswith(path + ".tmp")))

    order = {p: i for i, (e, p) in enumerate(events) if e == "replace"}
    marker, latest = order[os.path.join(tag, COMPLETE)], order[os.path.join(ckpt, "latest")]
    for f in ("mp_rank_00_model_states.pt", "extra/rank_0.pt", "config.yaml"):
        assert first_fsync(os.path.join(tag, f)) < marker, f  # data on disk before the marker
    assert events.index(("fsync", tag)) < marker < latest  # the directory too; the marker before latest
    assert ("fsync", ckpt) in events[latest:]  # latest's rename made durable
    manifest = json.load(open(os.path.join(tag, COMPLETE)))["files"]
    assert manifest["mp_rank_00_model_states.pt"]["bytes"] == 4096 and "crc32" in manifest["extra/rank_0.pt"]
    monkeypatch.undo()
    checkpoint.save(FakeEngine(), ckpt, 2, {"state": {"step": 2}}, "a: 1\n", keep_last=3, log=lambda *a, **k: None)
    # a marker that reached the disk before its data: the newer checkpoint is refused, the older one taken
    with open(os.path.join(ckpt, "step_00000002", "mp_rank_00_model_states.pt"), "r+b") as f:
        f.truncate(100)
    warnings = []
    got = checkpoint.find_resume(ckpt, "auto", log=lambda *a, **k: warnings.append(a[0]))
    assert got == tag and "damaged" in warnings[0] and "has 100 bytes, the manifest says 4096" in warnings[0]
    with pytest.raises(FileNotFoundError, match="is damaged"):
        checkpoint.find_resume(ckpt, os.path.join(ckpt, "step_00000002"))
    with pytest.raises(ConvertError, match="damaged checkpoint"):
        resolve_tag_dir(os.path.join(ckpt, "step_00000002"))
    # same size, other bytes (a block overwritten inside a shard): only the checksum sees it
    checkpoint.save(FakeEngine(), ckpt, 3, {"state": {"step": 3}}, "a: 1\n", keep_last=5, log=lambda *a, **k: None)
    with open(os.path.join(ckpt, "step_00000003", "mp_rank_00_model_states.pt"), "r+b") as f:
        f.seek(1000)
        f.write(b"y" * 64)
    warnings.clear()
    assert checkpoint.find_resume(ckpt, "auto", log=lambda *a, **k: None) == os.path.join(ckpt, "step_00000003")
    got = checkpoint.find_resume(ckpt, "auto", log=lambda *a, **k: warnings.append(a[0]), checksums=True)
    assert got == tag and "does not match its checksum" in warnings[0]


@pytest.mark.slow
def test_launcher_owns_the_grace_period(tmp_path, tok_model, moby_prefix):
    # SIGTERM to the launcher: the workers save and exit 0 within the grace
    proc = start(tmp_path / "ok", tok_model, moby_prefix, "checkpoint.save_interval=0", grace=60)
    wait_steps(tmp_path / "ok", 3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "asking 2 training process(es) to save and exit" in out and "stop requested: saving at step" in out
    tag = (tmp_path / "ok" / "checkpoints" / "latest").read_text()
    assert int(tag[5:]) == max(losses(tmp_path / "ok"))
    # a save slower than the grace: the launcher says so and kills; the interrupted save is not marked complete
    proc = start(tmp_path / "slow", tok_model, moby_prefix, "checkpoint.save_interval=2",
                 "callbacks=[{path: tests.fault_injection.FaultInjection, slow_save_s: 30}]", grace=2)
    wait_steps(tmp_path / "slow", 2)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and time.time() - t0 < 30, out[-3000:]  # 2 s of grace, not the 30 s save
    assert "grace period (2s after SIGINT) ran out" in out
    ckpt = tmp_path / "slow" / "checkpoints"
    assert not ckpt.exists() or not (ckpt / "latest").exists() or all(
        (ckpt / t / COMPLETE).exists() for t in os.listdir(ckpt) if t.startswith("step_") and
        t <= (ckpt / "latest").read_text())


def test_bad_steps_in_a_row_stop_the_run(tmp_path, tok_model, moby_prefix):
    cmd = [sys.executable, "-m", "pretrain.train", f"run_dir={tmp_path}", f"data.tokenizer_model={tok_model}",
           f"data.data_path=[{moby_prefix}]", "schedule.train_steps=8", *SMALL,
           "callbacks=[{path: tests.fault_injection.FaultInjection, nan_at_steps: [2, 3, 4]}]", "max_bad_steps=3"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(env(), MASTER_PORT=str(free_port())), cwd=ROOT,
                       timeout=300)
    assert r.returncode == 3, (r.stdout + r.stderr)[-3000:]
    assert "3 steps in a row had a non-finite loss (max_bad_steps=3, last at step 4)" in r.stdout + r.stderr
    assert sorted(losses(tmp_path)) == [1, 2, 3]


@pytest.mark.slow
def test_killed_launcher_takes_the_job_down(tmp_path, tok_model, moby_prefix):
    """kill -9 of the launcher: torchrun gets its parent-death SIGTERM and stops the workers (no orphans training
    into the run directory)."""
    import psutil

    proc = start(tmp_path, tok_model, moby_prefix, "checkpoint.save_interval=0", grace=30, new_session=True)
    wait_steps(tmp_path, 3)
    below = psutil.Process(proc.pid).children(recursive=True)
    assert len(below) >= 3  # torchrun and two workers
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher's whole process group, as a scheduler or a shell would
    proc.wait()
    gone, alive = psutil.wait_procs(below, timeout=120)
    for p in alive:
        p.kill()
    assert not alive, [p.cmdline()[:4] for p in alive]


def test_reporter_survives_a_torn_metrics_line_and_logs_without_a_terminal(tmp_path, capsys):
    from pretrain.metrics import Reporter

    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "loss": 3.0}\n{"step": 4, "lo')
    rep = Reporter(str(tmp_path), 10, 2, 1, tensorboard=False, progress_bar=False, enabled=True)  # resumed at 2
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1, 2]
    m = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0, "samples_per_s": 0.8, "skipped": 0}
    rep.step(3, m, tokens=2048)
    rep.valid(3, {"valid_loss": 2.0, "valid_ppl": 7.39})
    rep.log("saved checkpoint /x/step_00000003")
    rep.close()
    out = capsys.readouterr()
    assert "dropping a torn line" in out.err
    assert "step      3/10 | loss 2.5000" in out.out and "tokens 0.00M" in out.out and "eta 0:00:" in out.out
    assert "100 tokens/s (0.8 samples/s)" in out.out
    summary = [l for l in out.out.splitlines() if l.startswith("summary:")][0]
    assert "steps 2->3 of 10" in summary and "perplexity 7.39 at step 3" in summary and "/x/step_00000003" in summary
    log = (tmp_path / "train.log").read_text()
    assert "step      3/10" in log and "summary:" in log
    # a resume counts on from the tokens before it (console and records); this run's own tokens in the summary;
    # finetuning's validation accuracy is the summary's validation when there is no perplexity
    rep = Reporter(str(tmp_path), 10, 3, 1, tensorboard=False, progress_bar=False, enabled=True)
    rep.step(4, m, tokens=1_000_000)
    rep.finetune(4, {"ft/spam/acc": 0.75, "ft/mean_acc": 0.75})
    rep.close()
    out = capsys.readouterr().out
    assert "tokens 1.00M" in out and json.loads(open(tmp_path / "metrics.jsonl").readlines()[-2])["tokens"] == 1_002_048
    summary = [l for l in out.splitlines() if l.startswith("summary:")][0]
    assert "1.00M tokens this run" in summary and "validation accuracy 0.750 at step 4" in summary
    assert "no validation" not in summary


def test_launcher_validates_once_and_finds_the_deepspeed_runner(tmp_path, tok_model, moby_prefix):
    """A bad config fails in the launcher, before any process is spawned: one line, exit 2, no torchrun traceback."""
    from pretrain.launch import build_parser, deepspeed_command

    base = [sys.executable, "-m", "pretrain.launch", "--nproc-per-node", "2", "--", f"run_dir={tmp_path}",
            f"data.tokenizer_model={tok_model}", f"data.data_path=[{moby_prefix}]", *SMALL]
    for bad, says in (("parallel.micro_batch=0", "parallel.micro_batch=0: must be at least 1"),
                      ("parallel.tp=3", "world size 2 is not divisible by tp*pp = 3"),
                      ("run_dir=/etc/hostname/run", "run_dir=/etc/hostname/run: cannot be created")):
        t0 = time.time()
        r = subprocess.run(base + [bad], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
        assert r.returncode == 2 and says in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1 and "[rank" not in r.stderr
    # what each mode checks is in that one check too (the launcher's own function, without spawning): a missing
    # dataset, a tokenizer the model's vocabulary cannot hold, a finetuning task that was never fetched
    from pretrain.launch import check_config

    for bad, says in (([f"data.data_path=[{tmp_path}/missing]"], "missing.bin not found"),
                      (["model.vocab_size=512"], "model.vocab_size=512 is smaller than the tokenizer's 1000"),
                      (["finetune.tasks=[spam]", f"finetune.data_dir={tmp_path}/tasks"], "train.jsonl not found")):
        err = check_config(base[base.index("--") + 1:] + bad, 2)
        assert err is not None and says in err, err
    assert check_config(base[base.index("--") + 1:], 2) is None
    # the deepspeed runner: the one beside this interpreter (an unactivated venv), no forced loopback address
    args = build_parser().parse_args(["--hostfile", "hosts", "--nproc-per-node", "8"])
    cmd = deepspeed_command(args, ["--config", "c.yaml"])
    assert cmd[0] == os.path.join(os.path.dirname(sys.executable), "deepspeed")
    assert not any(a.startswith("--master_addr") for a in cmd) and cmd[-3:] == ["pretrain.train", "--config", "c.yaml"]
    from pretrain.train import build_parser as train_parser

    assert train_parser().parse_args(["--local_rank=3", "a.b=1"]).overrides == ["a.b=1"]  # what deepspeed passes


def test_precision_in_the_deepspeed_json_must_agree(tmp_path):
    from pretrain.config import ConfigError, load_config
    from pretrain.engine import deepspeed_config

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="bf16.enabled=True in the DeepSpeed JSON disagrees with "
                                          "parallel.precision=fp32"):
        deepspeed_config(load_config(None, [f"parallel.deepspeed={f}"]), 1)
    f.write_text(json.dumps({"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 1}}))
    assert deepspeed_config(load_config(None, [f"parallel.deepspeed={f}", "parallel.precision=bf16"]), 1)["bf16"] == \
        {"enabled": True}


def test_disk_errors_while_saving_are_one_line(tmp_path, monkeypatch, capsys):
    """A save that hits a full disk: the error names the cause and the file, exit 3, no traceback."""
    import errno

    from pretrain import train as train_mod

    def full_disk(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt" / "step_00000002"))

    monkeypatch.setattr(train_mod, "train", full_disk)
    monkeypatch.setattr(train_mod, "load_config", lambda *a, **k: None)
    rc = train_mod.main([])
    err = capsys.readouterr().err
    assert rc == 3 and err.startswith("error: No space left on device while writing ") and "step_00000002" in err
    assert "last complete checkpoint is kept" in err


@pytest.mark.slow
def test_slurm_script_runs_under_fake_slurm(tmp_path, tok_model, moby_prefix):
    """The generated batch script, run by shims of sbatch / scontrol / srun, trains from the submit directory with a
    config path relative to it; without sbatch: one line, exit 2, no leftover script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {"sbatch": 'export SLURM_JOB_ID=77 SLURM_NNODES=1 SLURM_JOB_NODELIST=node1 SLURM_SUBMIT_DIR="$PWD"\n'
                       'exec bash "$1"',  # runs the job at once, in the foreground
             "scontrol": "echo 127.0.0.1",
             "srun": 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"'}
    for name, body in shims.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    submit = tmp_path / "submit"
    submit.mkdir()
    (submit / "exp.yaml").write_text("schedule:\n  train_steps: 2\n")
    args = [sys.executable, "-m", "pretrain.launch", "--slurm", "--nproc-per-node", "2", "--master-port",
            str(free_port()), "--grace-s", "10", "--", "--config", "exp.yaml", "run_dir=runs/exp",
            f"data.tokenizer_model={tok_model}", f"data.data_path=[{moby_prefix}]",
            *[o for o in SMALL if not o.startswith("schedule.")]]
    r = subprocess.run(args, capture_output=True, text=True, cwd=submit, timeout=300,
                       env=dict(env(), PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (submit / "metalm.sbatch").exists() and (submit / "runs" / "exp" / "checkpoints" / "latest").exists()
    assert sorted(losses(submit / "runs" / "exp")) == [1, 2]
    os.remove(submit / "metalm.sbatch")
    path = ":".join(p for p in os.environ["PATH"].split(":") if not os.path.exists(os.path.join(p, "sbatch")))
    r = subprocess.run(args, capture_output=True, text=True, cwd=submit, timeout=300, env=dict(env(), PATH=path))
    assert r.returncode == 2 and "sbatch is not installed" in r.stderr and "Traceback" not in r.stderr
    assert not (submit / "metalm.sbatch").exists()


def test_resume_with_another_shape_or_layout_is_one_line(tmp_path, tok_model, moby_prefix):
    launch(tmp_path, tok_model, moby_prefix, nproc=1, steps=2)
    # another model shape, resumed directly and through the launcher; another world size (a TP/DP layout change)
    cmd = [sys.executable, "-m", "pretrain.train", f"run_dir={tmp_path}", f"data.tokenizer_model={tok_model}",
           f"data.data_path=[{moby_prefix}]", "schedule.train_steps=4", *SMALL, "model.decoder.layers=3"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(env(), MASTER_PORT=str(free_port())), cwd=ROOT,
                       timeout=300)
    assert r.returncode == 2 and "model.decoder.layers: 2 -> 3" in r.stderr and "convert reshard" in r.stderr
    assert "Traceback" not in r.stderr
    r = launch(tmp_path, tok_model, moby_prefix, nproc=2, steps=4, check=False)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "world size: 1 -> 2" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_reshard_that_changes_the_global_batch_warns(tmp_path, trained, tok_model, moby_prefix):
    run, _ = trained  # 2 processes, micro-batch 2: global batch 4
    out = tmp_path / "rs"
    r = subprocess.run([sys.executable, "-m", "pretrain.convert", "reshard", "--checkpoint", str(run / "checkpoints"),
                        "--out", str(out)], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = launch(tmp_path / "new", tok_model, moby_prefix, f"checkpoint.init_from={out}", nproc=1, steps=5)
    assert "the global batch changes from 4 to 2 samples at step 4" in r.stderr


@pytest.mark.slow
def test_per_token_loss_equals_one_big_batch(tmp_path, tok_model, moby_prefix):
    """optimizer.loss_normalization=per_token: 2 processes x 2 accumulated micro-batches of 1 give the loss and the gradient of
    one micro-batch of 4 samples (the same samples) in one process; the mean of micro-batch means does not."""
    def step1(name, *ov, nproc):
        launch(tmp_path / name, tok_model, moby_prefix, *ov, nproc=nproc, steps=1)
        rec = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl") if '"loss"' in l][0]
        return rec["loss"], rec["grad_norm"]

    big = step1("big", "optimizer.loss_normalization=per_token", "parallel.micro_batch=4", nproc=1)
    split = step1("split", "optimizer.loss_normalization=per_token", "parallel.micro_batch=1", "parallel.grad_accum=2", nproc=2)
    means = step1("means", "parallel.micro_batch=1", "parallel.grad_accum=2", nproc=2)
    assert split[0] == pytest.approx(big[0], rel=1e-5) and split[1] == pytest.approx(big[1], rel=1e-4)
    assert abs(means[1] - big[1]) > 1e-4 * big[1]  # micro-batches with different target counts weigh alike there


def test_library_calls_leave_the_environment_alone(trained, tmp_path, moby_prefix, tok_model):
    """load_consolidated (a one-process group for evaluation) and the lm-eval bridge restore what they touch; the
    datasets CLI's default split works on a small dataset (135 documents); a consolidated directory without its
    weights is a named error."""
    from pretrain.model_io import ConvertError, load_consolidated, read_consolidated

    before = {k: os.environ.get(k) for k in ("LOCAL_RANK", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    load_consolidated(str(trained[1]))
    from eval.lm_eval_bridge import offline

    with offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert {k: os.environ.get(k) for k in before} == before
    r = subprocess.run([sys.executable, "-m", "data_tools.datasets", "--data-path", "0.7", moby_prefix, "0.3",
                        moby_prefix, "--tokenizer-model", tok_model, "--seq-length", "128", "--show", "0"],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "samples: train" in r.stdout, r.stderr[-1500:]
    assert "--span-length 128 leaves no span window in --seq-length 128" in r.stderr  # the default L=128
    r = subprocess.run([sys.executable, "-m", "data_tools.datasets", "--data-path", moby_prefix, "--tokenizer-model",
                        tok_model, "--seq-length", "128", "--span-length", "32", "--show", "1"],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "warning" not in r.stderr and "spans=0" not in r.stdout, r.stdout[-1500:]
    broken = tmp_path / "cons"
    shutil.copytree(trained[1], broken)
    os.remove(broken / "model.safetensors")
    with pytest.raises(ConvertError, match="model.safetensors is missing"):
        read_consolidated(str(broken))


@pytest.mark.slow
def test_deepspeed_runner_and_ctrl_c_on_the_process_group(tmp_path, tok_model, moby_prefix):
    """DeepSpeed's own runner starts pretrain.train (which takes its --local_rank); Ctrl-C as a terminal sends it
    (SIGINT to the launcher's whole process group) gives one clean save and exit 0, no traceback."""
    runner = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    r = subprocess.run([runner, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pretrain.train",
                        f"run_dir={tmp_path / 'ds'}", f"data.tokenizer_model={tok_model}",
                        f"data.data_path=[{moby_prefix}]", "schedule.train_steps=2", *SMALL],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (tmp_path / "ds" / "checkpoints" / "latest").read_text() == "step_00000002"
    cmd = [sys.executable, "-m", "pretrain.launch", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "--", f"run_dir={tmp_path / 'ctrlc'}", f"data.tokenizer_model={tok_model}", f"data.data_path=[{moby_prefix}]",
           "schedule.train_steps=100000", "checkpoint.save_interval=0", *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT,
                            start_new_session=True)
    wait_steps(tmp_path / "ctrlc", 3)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "Traceback" not in out and "SignalException" not in out, out[-3000:]
    assert "SIGINT received" in out and "stop requested: saving at step" in out
