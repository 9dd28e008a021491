"""Durable writes: what reaches the disk, in which order, before a file or directory is declared complete.

A rename is atomic but not durable: after a power loss or a node crash the new name can be on disk while the data
behind it is not (ext4/xfs order metadata and data only when told to). Every output that marks itself complete
(checkpoints' COMPLETE and `latest`, consolidated exports, preprocessed datasets) therefore follows one rule:
flush + `fsync` every data file, `fsync` the directories that hold them, then write the marker (fsynced, renamed,
its directory fsynced). These helpers are that rule; pretrain/checkpoint.py, pretrain/convert.py and the dataset
writers use them.
"""
from __future__ import annotations

import os


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make the directory's entries (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> list[str]:
    """fsync every file below root, then every directory bottom-up (the root last); returns the files."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fsync_file(path)
                files.append(path)
        fsync_dir(dirpath)
    return files


def write_durable(path: str, data: str | bytes) -> None:
    """Write path atomically and durably: temporary file, flush, fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_figure(fig, path: str, dpi: int = 100) -> None:
    """Write a matplotlib figure atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
