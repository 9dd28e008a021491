"""Training-time reporting, hung off the loop as one callback object: console lines, a progress bar,
TensorBoard and a metrics.jsonl file (one JSON object per step or validation), all on rank 0 only.

Console lines read well without a terminal too (make, SLURM, CI logs): each step line carries step N/total,
elapsed time, ETA and tokens seen; `close()` prints a summary (steps, time, tokens, last validation perplexity,
last checkpoint). Every console line is also appended to RUN/train.log."""
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
        self.total, self.start_step = total_steps, start_step
        self.t0 = time.perf_counter()
        self.tokens = 0  # this run's; the console's column and each record's "tokens" add what came before a resume
        self.tokens_before = 0
        self.last_valid: dict = {}
        self.last_accuracy: tuple = ()  # (step, what, value) of finetuning's validation accuracy or in-loop scoring
        self.last_checkpoint = ""
        self.last_step = start_step
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        self.logfile = open(os.path.join(run_dir, "train.log"), "a")
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
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line torn by a kill during a write: dropped
                    print(f"warning: {self.path}: dropping a torn line ({line[:40]!r}...)", file=sys.stderr)
                    continue
                if rec.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
                    self.tokens_before = rec.get("tokens", self.tokens_before)
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        self.logfile.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        self.logfile.flush()
        if msg.startswith("saved checkpoint "):
            self.last_checkpoint = msg[len("saved checkpoint "):]
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, flush=True)

    def step(self, step: int, m: dict, tokens: int = 0) -> None:
        """m: the step's metrics; tokens: tokens this step consumed (all ranks)."""
        if not self.enabled:
            return
        self.tokens += tokens
        self.last_step = step
        self.file.write(json.dumps({"step": step, **m, "tokens": self.tokens_before + self.tokens}) + "\n")
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
            elapsed = time.perf_counter() - self.t0
            done = step - self.start_step
            eta = elapsed / done * (self.total - step) if done else float("nan")
            self.log(f"step {step:6d}/{self.total} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | grad norm "
                     f"{m['grad_norm']:.3f} | {m['tokens_per_s']:,.0f} tokens/s"
                     + (f" ({m['samples_per_s']:.1f} samples/s)" if "samples_per_s" in m else "")
                     + f" | skipped {m['skipped']}{extra} | "
                     f"tokens {(self.tokens_before + self.tokens) / 1e6:.2f}M | elapsed {_hms(elapsed)} | eta {_hms(eta)}")

    def valid(self, step: int, metrics: dict) -> None:
        """metrics: valid_loss / valid_ppl (causal-LM view) and, for semi-causal runs, valid_sclm_loss / _ppl;
        vision-language runs add valid_image_loss / _ppl (captions of the image validation split)."""
        if not self.enabled:
            return
        metrics = {k: v for k, v in metrics.items() if k.startswith("valid")}
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k.replace("valid_", "valid/", 1), v, step)
        self.last_valid = dict(metrics, step=step)
        line = f"step {step:6d} | validation"
        if "valid_loss" in metrics:
            line += f" loss {metrics['valid_loss']:.4f} | perplexity {metrics['valid_ppl']:.2f}"
        if "valid_sclm_loss" in metrics:
            line += f" | semi-causal objective {metrics['valid_sclm_loss']:.4f}"
        if "valid_image_loss" in metrics:
            line += f" | caption loss {metrics['valid_image_loss']:.4f} (ppl {metrics['valid_image_ppl']:.2f})"
        self.log(line)

    def _scalars(self, step: int, metrics: dict) -> None:
        """One metrics.jsonl record and a TensorBoard scalar per key."""
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def downstream(self, step: int, metrics: dict) -> None:
        """metrics: down/TASK/PLACEMENT/Kshot/acc|acc_norm -> value (in-loop zero/few-shot scoring)."""
        if not self.enabled or not metrics:
            return
        self._scalars(step, metrics)
        parts = [f"{k[len('down/'):-len('/acc')]} {v:.3f}" for k, v in metrics.items() if k.endswith("/acc")]
        accs = [v for k, v in metrics.items() if k.endswith("/acc")]
        if accs:
            self.last_accuracy = (step, "downstream accuracy (mean)", sum(accs) / len(accs))
        self.log(f"step {step:6d} | downstream acc | " + " | ".join(parts))

    def finetune(self, step: int, metrics: dict) -> None:
        """metrics: ft/TASK/acc|acc_norm|acc_mutual_info and ft/mean_acc (validation accuracy while finetuning)."""
        if not self.enabled or not metrics:
            return
        self._scalars(step, metrics)
        parts = [f"{k[len('ft/'):-len('/acc')]} {v:.3f}" for k, v in metrics.items()
                 if k.endswith("/acc") and k != "ft/mean_acc"]
        self.last_accuracy = (step, "validation accuracy", metrics["ft/mean_acc"])
        self.log(f"step {step:6d} | validation accuracy | " + " | ".join(parts)
                 + f" | mean {metrics['ft/mean_acc']:.3f}")

    def close(self) -> None:
        if not self.enabled or self.file.closed:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        v = self.last_valid or {}
        parts = [f"validation perplexity {v['valid_ppl']:.2f}"] if "valid_ppl" in v else []
        parts += [f"caption perplexity {v['valid_image_ppl']:.2f}"] if "valid_image_ppl" in v else []
        valid = [f"{', '.join(parts)} at step {v['step']}"] if parts else []
        if self.last_accuracy:
            at, what, value = self.last_accuracy
            valid.append(f"{what} {value:.3f} at step {at}")
        valid = "; ".join(valid) or "no validation"
        self.log(f"summary: steps {self.start_step}->{self.last_step} of {self.total} in "
                 f"{_hms(time.perf_counter() - self.t0)} | {self.tokens / 1e6:.2f}M tokens this run | {valid} | "
                 f"last checkpoint {self.last_checkpoint or 'none this run'}")
        if self.tb is not None:
            self.tb.close()
        self.file.close()
        self.logfile.close()


def _hms(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # nan: not known yet
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
