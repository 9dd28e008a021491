"""Training-time reporting, hung off the loop as one callback object: console lines, a progress bar,
TensorBoard and a metrics.jsonl file (one JSON object per step or validation), all on rank 0 only."""
from __future__ import annotations

import json
import os
import sys
import time


class Reporter:
    def __init__(self, run_dir: str, total_steps: int, start_step: int, log_interval: int, tensorboard: bool,
                 progress_bar: bool, enabled: bool):
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.bar = self.tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr)
        self.t_last = time.perf_counter()

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites history after its checkpoint: drop records of steps > step."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, flush=True)

    def step(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **m}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", refresh=False)
        if step % self.log_interval == 0:
            extra = f" | mfu {m['mfu']:.1%}" if "mfu" in m else ""
            self.log(f"step {step:6d} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | grad norm {m['grad_norm']:.3f} | "
                     f"{m['tokens_per_s']:,.0f} tokens/s | skipped {m['skipped']}{extra}")

    def valid(self, step: int, metrics: dict) -> None:
        """metrics: valid_loss / valid_ppl (causal-LM view) and, for semi-causal runs, valid_sclm_loss / _ppl."""
        if not self.enabled:
            return
        metrics = {k: v for k, v in metrics.items() if k.startswith("valid")}
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k.replace("valid_", "valid/", 1), v, step)
        line = f"step {step:6d} | validation loss {metrics['valid_loss']:.4f} | perplexity {metrics['valid_ppl']:.2f}"
        if "valid_sclm_loss" in metrics:
            line += f" | semi-causal objective {metrics['valid_sclm_loss']:.4f}"
        self.log(line)

    def downstream(self, step: int, metrics: dict) -> None:
        """metrics: down/TASK/PLACEMENT/Kshot/acc|acc_norm -> value (in-loop zero/few-shot scoring)."""
        if not self.enabled or not metrics:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        parts = [f"{k[len('down/'):-len('/acc')]} {v:.3f}" for k, v in metrics.items() if k.endswith("/acc")]
        self.log(f"step {step:6d} | downstream acc | " + " | ".join(parts))

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()
