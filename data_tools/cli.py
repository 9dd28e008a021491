"""Small helpers shared by the data_tools command-line entry points."""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A mistake in the user's input (bad path, bad flag, bad file): reported as one line, exit status 2."""


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run `main`; turn UserError into a one-line message on stderr and exit status 2 (no traceback)."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def import_indexed_dataset():
    """Import megatron-core's indexed dataset module without its Transformer-Engine/Apex warnings.

    Imported lazily by the commands that need it (`import megatron.core` takes seconds), so --help stays fast.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def check_dataset_prefix(prefix: str) -> None:
    """A dataset exists only when both files do (the .idx is written last, after the .bin is complete)."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            hint = " (an interrupted preprocessing run leaves no .idx)" if ext == ".idx" else ""
            raise UserError(f"dataset {prefix}: {prefix + ext} not found{hint}")


def publish_dataset(prefix: str, tmp: str) -> None:
    """Rename a finished PREFIX.bin/.idx + tmp pair into place. The old .idx goes first and the new .idx last, so
    at no moment does a .bin sit beside an .idx that does not describe it."""
    from data_tools.durable import fsync_dir, fsync_file

    for ext in (".bin", ".idx"):  # the data on disk before the names say it is complete
        fsync_file(prefix + ext + tmp)
    if os.path.exists(prefix + ".idx"):
        os.remove(prefix + ".idx")
    os.replace(prefix + ".bin" + tmp, prefix + ".bin")
    os.replace(prefix + ".idx" + tmp, prefix + ".idx")
    fsync_dir(os.path.dirname(os.path.abspath(prefix)))


def discard_dataset(prefix: str, tmp: str, builder) -> None:
    """Close an unfinished builder and remove its temporary files (a failed or interrupted run)."""
    builder.data_file.close()
    for ext in (".bin", ".idx"):
        if os.path.exists(prefix + ext + tmp):
            os.remove(prefix + ext + tmp)
