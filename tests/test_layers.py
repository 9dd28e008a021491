"""The layering stays true: import-linter's contracts of pyproject.toml (data_tools -> pretrain -> eval, imports
pointing one way; no circle between the modules of a package), and the size limits of ARCHITECTURE's layout."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("data_tools", "pretrain", "eval")


def lint(where: str) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    return subprocess.run([exe, "--config", os.path.join(where, "pyproject.toml"), "--no-cache"], cwd=where,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=where))


def test_import_contracts_hold():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("data_tools/cli.py", "from pretrain.config import ConfigError", "layers"),  # data_tools importing pretrain
    ("pretrain/trainer.py", "import eval.downstream", "layers"),  # the loop importing eval
    ("pretrain/exits.py", "import pretrain.watchdog", "no import circle"),  # the old watchdog <-> train circle
])
def test_a_wrong_import_breaks_a_contract(tmp_path, module, line, broken):
    """The contracts can fail: the same tree with one wrong import is refused, naming the contract."""
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(ROOT, pkg), tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{line}  # noqa\n")
    r = lint(str(tmp_path))
    assert r.returncode != 0 and "1 broken" in r.stdout, r.stdout[-3000:]
    assert any(l.startswith(broken) and "BROKEN" in l for l in r.stdout.splitlines()), r.stdout[-3000:]


def test_file_sizes():
    """No module over ~600 lines; the trainer's command line stays thin (the loop is pretrain/trainer.py)."""
    sizes = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    sizes[os.path.relpath(path, ROOT)] = sum(1 for _ in open(path))
    assert len(sizes) > 40
    assert not {p: n for p, n in sizes.items() if n > 620}, "split these modules"
    assert sizes["pretrain/train.py"] <= 300 and sizes["pretrain/trainer.py"] <= 300
