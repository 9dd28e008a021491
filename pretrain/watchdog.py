"""A step watchdog on every rank: a stuck rank (or a rank stuck waiting for a frozen peer) ends the job instead of
hanging it.

The training loop says which phase it is in (`enter("step", 12)`, `enter("save", 12)`, ...); a daemon thread checks
every second how long the current phase has run. Past its limit the rank logs the phase and step, names the peers
that look responsible, dumps every thread's Python stack to `RUN/watchdog/rank_R.stack.txt`, and exits with status
4 (`os._exit`: no cleanup that could block on the stuck collective). The launcher sees a failed worker and tears the
job down; the last complete checkpoint is untouched (a save cut off here has no COMPLETE marker).

Limit: `parallel.step_timeout_s` when set (> 0), for every phase; otherwise derived: the larger of
`parallel.step_timeout_floor_s` and 20 x the slowest step measured so far (so a save, an evaluation or a slow step
is not mistaken for a hang, and the very first steps, which compile and warm up, get the floor).

Peers: the same thread writes `RUN/watchdog/heartbeat_rank_R.json` every second (host, pid, step, phase, a wall-clock
`alive` stamp). When it fires, a peer whose `alive` stamp is stale is reported as unresponsive (a frozen process:
SIGSTOP, a hung node, swapped out), a peer at an earlier step or phase as behind. This needs RUN on a file system
all nodes share (the usual set-up); otherwise peers are reported as not visible.

Why a Python thread works while the main thread waits in a collective: torch.distributed's `Work.wait` (gloo and
NCCL) releases the GIL. For NCCL, the launcher also sets TORCH_NCCL_ASYNC_ERROR_HANDLING=1 so that a collective that
does time out (`parallel.timeout_s`) raises instead of hanging; the watchdog covers what that misses (a rank that
never reaches the collective, a wait without a timeout as in ZeRO-2's all-gather).
"""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time

from pretrain.exits import EXIT_WATCHDOG, report_exit


class Watchdog:
    def __init__(self, run_dir: str, rank: int, world: int, timeout_s: float = 0.0, floor_s: float = 300.0,
                 interval_s: float = 1.0):
        self.dir = os.path.join(run_dir, "watchdog")
        os.makedirs(self.dir, exist_ok=True)
        self.rank, self.world = rank, world
        self.timeout_s, self.floor_s = timeout_s, floor_s
        self.interval = min(interval_s, max(0.1, (timeout_s or floor_s) / 4))
        self.phase, self.step, self.since = "setup", 0, time.monotonic()
        self.armed = False
        self.slowest_step = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metalm-watchdog", daemon=True)
        self._thread.start()

    # ---- called by the training loop (cheap: no I/O)
    def enter(self, phase: str, step: int) -> None:
        self.phase, self.step, self.since, self.armed = phase, step, time.monotonic(), True

    def step_done(self, seconds: float) -> None:
        self.slowest_step = max(self.slowest_step, seconds)

    def limit(self) -> float:
        if self.timeout_s > 0:
            return self.timeout_s
        return max(self.floor_s, 20.0 * self.slowest_step)

    def close(self) -> None:
        self.armed = False
        self._stop.set()
        self._thread.join(timeout=5)

    # ---- the thread
    def _heartbeat_path(self, rank: int) -> str:
        return os.path.join(self.dir, f"heartbeat_rank_{rank}.json")

    def _beat(self) -> None:
        rec = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": self.step,
               "phase": self.phase, "phase_s": round(time.monotonic() - self.since, 1), "alive": time.time()}
        path = self._heartbeat_path(self.rank)
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(rec, f)
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # a full or read-only disk must not stop training; the watchdog itself still works

    def _run(self) -> None:
        while True:  # beat first: a rank frozen right after start-up must still have left a heartbeat
            self._beat()
            if self.armed and time.monotonic() - self.since > self.limit():
                self._fire()
            if self._stop.wait(self.interval):
                return

    def peers(self) -> list[str]:
        """What the other ranks' heartbeats say: unresponsive (stale) or behind."""
        now, out = time.time(), []
        stale_after = 3 * self.interval  # the thread writes every interval; three missed beats: not running
        for r in range(self.world):
            if r == self.rank:
                continue
            try:
                hb = json.load(open(self._heartbeat_path(r)))
            except (OSError, ValueError):
                out.append(f"rank {r}: no heartbeat visible")
                continue
            age = now - hb["alive"]
            where = f"{hb['phase']} of step {hb['step']} on {hb['host']} (pid {hb['pid']})"
            if age > stale_after:
                out.append(f"rank {r}: unresponsive for {age:.0f}s (frozen or hung process?), last in {where}")
            elif (hb["step"], hb["phase"]) != (self.step, self.phase):
                out.append(f"rank {r}: in {where}")
        return out

    def _fire(self) -> None:
        elapsed = time.monotonic() - self.since
        peers = self.peers()
        culprits = [p for p in peers if "unresponsive" in p] or peers
        msg = (f"watchdog: rank {self.rank} stuck in {self.phase} of step {self.step} for {elapsed:.0f}s (limit "
               f"{self.limit():.0f}s, parallel.step_timeout_s); "
               + ("; ".join(culprits) if culprits else "every other rank is alive and at the same point")
               + f"; stacks in {self.dir}/rank_{self.rank}.stack.txt; exiting with status {EXIT_WATCHDOG}")
        try:
            with open(os.path.join(self.dir, f"rank_{self.rank}.stack.txt"), "w") as f:
                f.write(msg + "\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            pass
        print(msg, file=sys.stderr, flush=True)
        os._exit(report_exit(EXIT_WATCHDOG))
