"""Exit statuses of the training processes and the launcher, and how a worker reports its own.

    0  done (or stopped on request: SIGTERM/SIGINT, checkpoint saved)
    2  bad input: config, paths, data, tokenizer (one `error:` line naming the field or file)
    3  training stopped: non-finite losses in a row, or a checkpoint/log write that failed (last complete
       checkpoint kept)
    4  the watchdog ended a rank whose phase outlived its limit (pretrain/watchdog.py)
"""
from __future__ import annotations

import os

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_WATCHDOG = 4


def report_exit(code: int) -> int:
    """Leave this rank's exit status where pretrain.launch looks (METALM_STATUS_DIR), so the launcher can exit with
    the workers' own status instead of torchrun's generic 1."""
    status_dir = os.environ.get("METALM_STATUS_DIR")
    if status_dir and code:
        try:
            with open(os.path.join(status_dir, f"rank_{os.environ.get('RANK', '0')}"), "w") as f:
                f.write(str(code))
        except OSError:
            pass
    return code
