"""Launch training on one node or many, wrapping the standard launchers (nothing home-made about process
management or rendezvous):

    python -m pretrain.launch --nproc-per-node 2 -- --config configs/tiny-cpu.yaml
    python -m pretrain.launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 \\
        --nproc-per-node 8 -- --config cfg.yaml                      # torchrun, static rendezvous, run on each node
    python -m pretrain.launch --nnodes 2 --rdzv-endpoint host:29400 --rdzv-id job1 --nproc-per-node 8 -- ...
                                                                     # torchrun, c10d rendezvous (elastic agent)
    python -m pretrain.launch --hostfile hosts --nproc-per-node 8 -- ...   # the deepspeed launcher (pdsh/ssh)
    python -m pretrain.launch --slurm --nnodes 4 --nproc-per-node 8 --print -- ...  # a SLURM batch script

The torchrun agent watches its workers: when one dies, it stops the others and exits non-zero, naming the failed
rank; with several nodes the rendezvous spreads the failure to the other agents. Collectives time out after
`parallel.timeout_s` as a last resort, and every rank runs a step watchdog (pretrain/watchdog.py). The environment
every worker gets (thread counts, NCCL/gloo settings, DeepSpeed's accelerator) is set in one place, `worker_env`.

Signals and the grace period (`--grace-s`, default 120): this launcher, not torchrun (whose teardown waits a fixed
30 s before SIGKILL), owns it. torchrun runs in its own session, so a terminal's Ctrl-C reaches only the launcher.
On SIGTERM or SIGINT the launcher sends SIGTERM straight to the training processes, which finish their step, save
a checkpoint and exit 0 (then the launcher exits 0); if they are not done within the grace period it says so and
kills them (the interrupted save has no COMPLETE marker; resume takes the last complete checkpoint). A second
signal kills at once. When a worker ends while the others still run (a failure, the watchdog), the others get the
same grace to wind down before they are killed, so a frozen rank cannot hold the job. If the launcher itself is
killed (even `kill -9`), torchrun gets SIGTERM (parent-death signal) and stops the workers, which save and exit.
Under SLURM, `#SBATCH --signal=TERM@<grace + 60>` makes the scheduler send that SIGTERM before the time limit.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Sequence

TRAIN_MODULE = "pretrain.train"


def worker_env(nproc_per_node: int, cuda: bool) -> dict:
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(1, nproc_per_node))))
    env.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a hung NCCL collective raises instead of hanging
    env.setdefault("NCCL_DEBUG", "WARN")
    env.setdefault("PYTHONUNBUFFERED", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["METALM_LAUNCHER_CHECKED"] = "1"  # the launcher ran the start-up checks and printed their warnings once
    return env


def torchrun_command(args, train_args: Sequence[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node}",
           f"--nnodes={args.nnodes}"]
    if args.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id}"]
    elif args.nnodes > 1:
        cmd += [f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr or '127.0.0.1'}",
                f"--master-port={args.master_port}"]
    else:
        cmd += ["--standalone"] if args.master_port == 0 else [f"--master-addr={args.master_addr or '127.0.0.1'}",
                                                                f"--master-port={args.master_port}"]
    if args.max_restarts:
        cmd.append(f"--max-restarts={args.max_restarts}")
    return cmd + ["-m", TRAIN_MODULE, *train_args]


def deepspeed_runner() -> str | None:
    """DeepSpeed's `deepspeed` runner: the one installed beside this interpreter first (a venv used without being
    activated), then PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return beside if os.access(beside, os.X_OK) else shutil.which("deepspeed")


def deepspeed_command(args, train_args: Sequence[str]) -> list[str]:
    exe = deepspeed_runner()
    if exe is None:
        raise SystemExit(f"error: DeepSpeed's `deepspeed` runner is neither beside {sys.executable} nor on PATH "
                         "(pip install deepspeed)")
    # the master address comes from the hostfile (its first host) unless given: never force a loopback address
    addr = [f"--master_addr={args.master_addr}"] if args.master_addr else []
    return [exe, f"--hostfile={args.hostfile}", f"--num_gpus={args.nproc_per_node}", *addr,
            f"--master_port={args.master_port or 29500}", "--module", TRAIN_MODULE, *train_args]


def slurm_script(args, train_args: Sequence[str]) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inner = (f"{shlex.quote(sys.executable)} -m pretrain.launch --nnodes=$SLURM_NNODES "
             f"--nproc-per-node={args.nproc_per_node} --rdzv-endpoint=$MASTER_ADDR:{args.master_port or 29500} "
             f"--rdzv-id=$SLURM_JOB_ID --grace-s={args.grace_s:g} -- {' '.join(shlex.quote(a) for a in train_args)}")
    return "\n".join(line for line in [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={args.nproc_per_node}" if args.gpus else "",
        f"#SBATCH --cpus-per-task={args.cpus_per_task}",
        f"#SBATCH --time={args.time}",
        f"#SBATCH --partition={args.partition}" if args.partition else "",
        f"#SBATCH --account={args.account}" if args.account else "",
        "#SBATCH --requeue" if args.requeue else "",
        f"#SBATCH --signal=TERM@{int(args.grace_s) + 60}",
        "#SBATCH --output=%x-%j.out",
        "set -euo pipefail",
        "# paths in the arguments are relative to where the job was submitted; the code is found through PYTHONPATH",
        'cd "${SLURM_SUBMIT_DIR:-$PWD}"',
        "# a requeued job (preemption, --requeue) resumes from the newest complete checkpoint (checkpoint.resume=auto)",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export PYTHONPATH={shlex.quote(root)}${{PYTHONPATH:+:$PYTHONPATH}}",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}",
    ] if line) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="", help="rendezvous host (default: 127.0.0.1 for torchrun, the "
                   "hostfile's first host for the deepspeed runner)")
    p.add_argument("--master-port", type=int, default=0, help="0: a free port (single node only)")
    p.add_argument("--rdzv-endpoint", default="", help="host:port of a c10d rendezvous (torchrun elastic agent)")
    p.add_argument("--rdzv-id", default="metalm")
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("--hostfile", default="", help="use the deepspeed launcher with this hostfile")
    p.add_argument("--slurm", action="store_true", help="write a SLURM batch script (and submit it with sbatch "
                   "unless --print)")
    p.add_argument("--print", action="store_true", help="with --slurm: print the script instead of submitting")
    p.add_argument("--job-name", default="metalm")
    p.add_argument("--time", default="24:00:00", help="with --slurm: the job's time limit")
    p.add_argument("--partition", default="", help="with --slurm: #SBATCH --partition")
    p.add_argument("--account", default="", help="with --slurm: #SBATCH --account")
    p.add_argument("--requeue", action="store_true", help="with --slurm: #SBATCH --requeue (resumes on requeue)")
    p.add_argument("--cpus-per-task", type=int, default=32)
    p.add_argument("--gpus", action="store_true", help="with --slurm: request --nproc-per-node GPUs per node")
    p.add_argument("--grace-s", type=float, default=120.0, help="seconds the workers get to save and exit after "
                   "SIGTERM/SIGINT (or after another worker failed) before they are killed")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: arguments for pretrain.train")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.nproc_per_node < 1 or args.nnodes < 1:
        print("error: --nproc-per-node and --nnodes must be at least 1", file=sys.stderr)
        return 2
    if args.slurm:
        script = slurm_script(args, train_args)
        if args.print:
            print(script)
            return 0
        err = check_config(train_args, args.nnodes * args.nproc_per_node)  # before anything is queued
        if err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        sbatch = shutil.which("sbatch")
        if sbatch is None:
            print("error: sbatch is not installed here (not a SLURM login node?); use --print to get the script",
                  file=sys.stderr)
            return 2
        path = f"{args.job_name}.sbatch"
        with open(path, "w") as f:
            f.write(script)
        return subprocess.call([sbatch, path])
    import torch

    env = worker_env(args.nproc_per_node, torch.cuda.is_available())
    if args.nnodes > 1 and not args.rdzv_endpoint and args.master_port == 0:
        print("error: several nodes need --master-port (or --rdzv-endpoint)", file=sys.stderr)
        return 2
    # what it is doing while it is quiet (tens of seconds on a small machine); on stdout: an error stays one line
    print("launcher: checking the config, data and tokenizer before starting any process", flush=True)
    err = check_config(train_args, None if args.hostfile else args.nnodes * args.nproc_per_node)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cmd = deepspeed_command(args, train_args) if args.hostfile else torchrun_command(args, train_args)
    where = ("on the hostfile's nodes (deepspeed runner)" if args.hostfile
             else f"{args.nproc_per_node} on this node (torchrun)")
    print(f"launcher: starting the training processes, {where}; each imports DeepSpeed and megatron-core and "
          "builds its data before its first line", flush=True)
    return supervise(cmd, env, args.grace_s)


def check_config(train_args: Sequence[str], world: int | None) -> str | None:
    """Check the training config once, here, before any process is spawned: what every rank checks at start-up
    (pretrain.checks.preflight: the config, each mode's paths and files, the tokenizer against model.vocab_size) and
    whether the checkpoint to resume fits the layout. Otherwise every rank prints the same error, followed by
    torchrun's report. Returns the error line, None when it is fine. `world` None (a hostfile: the runner knows
    the world size) skips what needs it."""
    from data_tools.cli import UserError
    from pretrain.checks import preflight
    from pretrain.config import ConfigError, load_config
    from pretrain.train import build_parser

    try:
        targs = build_parser().parse_args(list(train_args))
    except SystemExit as e:
        return f"bad arguments for pretrain.train (exit {e.code}): {' '.join(train_args)}"
    try:
        cfg = load_config(targs.config, targs.overrides)
        tok = preflight(cfg, world)
        from pretrain.checks import vocab_note

        if note := vocab_note(cfg, tok):
            print(note, file=sys.stderr)
        if world is not None:
            from pretrain import checkpoint
            from pretrain.config import config_to_dict

            resume = checkpoint.find_resume(os.path.join(cfg.run_dir, "checkpoints"), cfg.checkpoint.resume,
                                            log=lambda *a, **k: None)
            if resume and (why := checkpoint.layout_mismatch(resume, config_to_dict(cfg), world)):
                return f"checkpoint.resume: {why}"
    except (ConfigError, FileNotFoundError, UserError) as e:
        return str(e)
    return None


def training_processes(pid: int) -> list:
    """The training processes below the launcher child (not their own children, e.g. data-loader workers, which
    share their command line)."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    pids = set()
    out = []
    for p in procs:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        # `python [-u] -m pretrain.train ...` (torchrun's own command line names the module too, after its own -m)
        if "-m" in cmd and cmd.index("-m") + 1 < len(cmd) and cmd[cmd.index("-m") + 1] == TRAIN_MODULE:
            out.append(p)
            pids.add(p.pid)
    return [p for p in out if p.ppid() not in pids]


def _say(msg: str) -> None:
    print(f"launcher: {msg}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG), so
    a killed launcher does not leave torchrun and its workers training unsupervised in the run directory (torchrun
    passes the SIGTERM on: the workers save and exit)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: no parent-death signal


def supervise(cmd: Sequence[str], env: dict, grace_s: float) -> int:
    """Run torchrun (or the deepspeed launcher) in its own session and own the grace period (module docstring).
    Exits with the workers' own status when one reported it (pretrain.exits.report_exit), else torchrun's."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="metalm-status-") as status_dir:
        rc = _supervise(cmd, dict(env, METALM_STATUS_DIR=status_dir), grace_s)
        codes = [int(open(os.path.join(status_dir, f)).read() or 0) for f in sorted(os.listdir(status_dir))]
    if rc != 0 and codes:
        rc = max(codes)
    if rc != 0:
        print(f"error: training failed (exit status {rc}); the report above names the failed rank", file=sys.stderr)
    return rc


class TorchrunTracebackFilter:
    """Copies torchrun's stderr through, without torchrun's own Python traceback when a worker failed (the worker's
    error and torchrun's failure report, which names the rank and its exit code, are what the user needs): lines of
    a `Traceback` block that ends in `ChildFailedError` are held back and dropped; anything else passes at once."""

    def __init__(self, src, dst):
        import threading

        self.src, self.dst, self.held = src, dst, []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _emit(self, lines) -> None:
        for line in lines:
            self.dst.write(line)
        self.dst.flush()

    def _run(self) -> None:
        for line in iter(self.src.readline, ""):
            if line.startswith("Traceback (most recent call last):"):
                self._emit(self.held)
                self.held = [line]
            elif self.held and (line.startswith("  ") or line.strip() in ("", "^" * len(line.strip()))):
                self.held.append(line)
            elif self.held and line.startswith("torch.distributed.elastic.multiprocessing.errors.ChildFailedError"):
                self.held = []  # torchrun's traceback: its report follows
            else:
                self._emit(self.held + [line])
                self.held = []
        self._emit(self.held)

    def join(self) -> None:
        self.thread.join(timeout=10)


def _supervise(cmd: Sequence[str], env: dict, grace_s: float) -> int:
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    err = TorchrunTracebackFilter(proc.stderr, sys.stderr)
    st = {"signal": None, "deadline": None, "why": ""}

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if st["signal"] is not None:
            _say(f"second {name}: stopping the workers now")
            st["deadline"] = 0.0
            return
        st["signal"] = name
        workers = training_processes(proc.pid)
        _say(f"{name} received: asking {len(workers)} training process(es) to save and exit (grace period "
             f"{grace_s:g}s, --grace-s)")
        for w in workers:
            try:
                w.send_signal(signal.SIGTERM)
            except Exception:  # noqa: BLE001 (psutil.NoSuchProcess: it ended meanwhile)
                pass
        st["deadline"], st["why"] = time.monotonic() + grace_s, f"after {name}"

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    seen: set[int] = set()
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            alive = {p.pid for p in training_processes(proc.pid)}
            if st["deadline"] is None and seen - alive and alive:  # one ended, others run: failure or finish
                st["deadline"] = time.monotonic() + grace_s
                st["why"] = "after a training process ended while others still ran"
            seen |= alive
            if st["deadline"] is not None and time.monotonic() > st["deadline"]:
                left = training_processes(proc.pid)
                _say(f"the grace period ({grace_s:g}s {st['why']}) ran out with {len(left)} training process(es) "
                     "still running: killing them; an interrupted save has no COMPLETE marker, so resume takes the "
                     "last complete checkpoint")
                for p in left:
                    try:
                        p.kill()
                    except Exception:  # noqa: BLE001
                        pass
                try:
                    rc = proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
                rc = rc or 1
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        err.join()
    if rc == 0 and st["signal"]:
        _say(f"the workers saved and exited after {st['signal']}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
