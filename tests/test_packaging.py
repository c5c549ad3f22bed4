"""The package as a user installs it: a wheel in a fresh venv, used from another directory.

The wheel is built from this checkout and installed with --no-deps into a new venv
whose only link to the project's environment is a .pth line to its site-packages (for
torch, optuna, ...). Our own code therefore comes from the wheel alone: if the search
spaces or the reference configs were not shipped, or an entry point were missing, the
commands below would fail.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pkg")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", REPO],
         cwd=tmp)
    wheel = next((tmp / "dist").glob("meme_nas-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # dependencies only
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", wheel],
         cwd=tmp)
    return venv


def test_wheel_ships_the_spaces_and_configs(installed, tmp_path):
    code = ("import nas, meme.model.references as r; from nas.space.space import load_space, SPACES_DIR; "
            "print(nas.__file__); print(SPACES_DIR); print(load_space().name); print(sorted(r.packaged_configs()))")
    out = _run([installed / "bin" / "python", "-c", code], cwd=tmp_path).stdout.splitlines()
    assert out[0].startswith(str(installed)) and out[1].startswith(str(installed))  # not the checkout
    assert out[2] == "meme-ffhq256" and "fmnist-meme-small" in out[3]


def test_console_script_and_a_short_search_from_another_directory(installed, tmp_path):
    exe = installed / "bin" / "meme-nas"
    helped = _run([exe, "--help"], cwd=tmp_path).stdout
    assert all(c in helped for c in ("search", "rerank", "fidelity", "dashboard", "train", "sample", "macs"))
    assert _run([exe, "--version"], cwd=tmp_path).stdout.strip() == "meme-nas 0.1.0"
    assert "--budget-gflops" in _run([exe, "search", "--help"], cwd=tmp_path).stdout
    _run([exe, "search", "--space", "tiny", "--budget-gflops", "0.3", "--executor", "optuna", "--trials", "2",
          "--rerank-top", "0", "--no-reference", "--quiet", "--out", tmp_path / "out"], cwd=tmp_path)
    assert (tmp_path / "out" / "tiny-b0.3" / "optuna.db").is_file()
