"""The project as a wheel: `pip install` of the built wheel (not editable) into a fresh venv gives working console
scripts that find the shipped configs and DeepSpeed JSONs by name, away from the source tree."""
import glob
import os
import subprocess
import sys
import sysconfig

import pytest

from test_train import ROOT, SMALL


@pytest.mark.slow
def test_wheel_installs_and_trains(tmp_path, tok_model, moby_prefix):
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), ROOT],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = glob.glob(str(dist / "metalm_pretrain-*.whl"))[0]
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True,
                   timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the heavy dependencies (torch, DeepSpeed, ...) come from this test's environment, appended after the venv's
    # own site-packages (a .pth path line: its .pth files, e.g. the editable install's finder, are not processed)
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    away = tmp_path / "elsewhere"
    away.mkdir()
    where = subprocess.run([str(py), "-c", "import pretrain, ds_configs; print(pretrain.__file__, ds_configs.__file__)"],
                           capture_output=True, text=True, env=env, cwd=away, check=True).stdout
    assert where.count(site) == 2, where  # the wheel's copy, not the source tree
    r = subprocess.run([str(venv / "bin" / "metalm-train"), "--help"], capture_output=True, text=True, env=env,
                       cwd=away)
    assert r.returncode == 0 and "usage:" in r.stdout
    r = subprocess.run([str(venv / "bin" / "metalm-train"), "--config", "tiny-cpu", f"run_dir={away / 'run'}",
                        f"data.tokenizer_model={tok_model}", f"data.data_path=[{moby_prefix}]",
                        "schedule.train_steps=2", "parallel.deepspeed=zero1", *SMALL],
                       capture_output=True, text=True, env=env, cwd=away, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (away / "run" / "checkpoints" / "latest").read_text() == "step_00000002"
