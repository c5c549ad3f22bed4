"""meme.training.distributed: data-parallel ranks and expert-parallel groups, with real torchrun
processes on gloo over loopback (tiny models, few steps, every wait bounded in time).

The layout and the one-process behaviour of ``--expert-parallel`` run in ``make test``;
the torchrun runs take about 20 s each on a loaded 2-core machine, so they are marked
``cluster`` (``make test-cluster``).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from meme.common import checkpoint
from meme.common.errors import UserError
from meme.sampling.sample import load_run
from meme.training.distributed import check_batch, free_local_port, plan_layout, resume_note
from meme.training.train import train
from tests.meme.training.test_train import opts, tiny_cfg

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the layout: who trains what (no processes) -------------------------------------------

def test_data_parallel_layout_is_one_group_of_every_rank():
    lay = plan_layout(4, 2, 3, expert_parallel=False)
    assert lay.groups == ((0, 1, 2, 3),) and lay.owners == (0, 0, 0) and lay.experts == (0, 1, 2)
    assert [plan_layout(4, r, 3, False).rows(8) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6),
                                                                       slice(6, 8)]


def test_expert_parallel_layouts():
    # 4 ranks, 2 experts: two groups of two ranks, one expert each, DDP inside the group
    lay = plan_layout(4, 3, 2, expert_parallel=True)
    assert lay.groups == ((0, 1), (2, 3)) and lay.owners == (0, 1)
    assert lay.group == 1 and lay.experts == (1,) and not lay.is_leader and lay.rows(8) == slice(4, 8)
    # 2 ranks, 4 experts: one-rank groups taking experts e with e mod 2 == group, in turn
    lay = plan_layout(2, 1, 4, expert_parallel=True)
    assert lay.groups == ((0,), (1,)) and lay.owners == (0, 1, 0, 1) and lay.experts == (1, 3)
    assert lay.is_leader and lay.rows(6) == slice(0, 6)
    with pytest.raises(UserError, match="3 ranks do not split into 2 equal groups"):
        plan_layout(3, 0, 2, expert_parallel=True)


def test_global_batch_must_split_evenly():
    check_batch(plan_layout(2, 0, 2, False), 8)
    with pytest.raises(UserError, match="--batch-size 7 is the global batch"):
        check_batch(plan_layout(2, 0, 2, False), 7)


def test_resume_under_another_layout_says_what_changes():
    two = plan_layout(2, 0, 2, False)
    assert resume_note({"world_size": 2, "expert_parallel": False}, two, 8, "ck") is None
    note = resume_note({"world_size": 2, "expert_parallel": False}, plan_layout(1, 0, 2, False), 8, "ck")
    assert "written by 2 rank(s) and resumes on 1" in note and "8 per rank, was 4" in note
    with pytest.raises(UserError, match="trained without --expert-parallel"):
        resume_note({"world_size": 1}, plan_layout(1, 0, 2, True), 8, "ck")


def test_expert_parallel_in_one_process_gives_each_expert_its_own_stream(tmp_path, blobs):
    """One process, --expert-parallel: every expert trained in turn from its own keyed
    generator; the run checkpoints, resumes bit for bit and samples like any other."""
    cfg = tiny_cfg()
    straight = train(cfg, opts(blobs, expert_parallel=True), tmp_path / "ep", progress=False)
    plain = train(cfg, opts(blobs), tmp_path / "plain", progress=False)
    e0 = lambda t: {k: v for k, v in t.model.state_dict().items() if k.startswith("experts.0.")}  # noqa: E731
    assert any(not torch.equal(a, b) for a, b in zip(e0(straight).values(), e0(plain).values()))
    train(cfg, opts(blobs, expert_parallel=True, steps=3), tmp_path / "resumed", progress=False)
    resumed = train(cfg, opts(blobs, expert_parallel=True), tmp_path / "resumed", resume=True, progress=False)
    for a, b in ((straight.model, resumed.model), (straight.ema.module, resumed.ema.module)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    _, denoiser, step = load_run(tmp_path / "resumed")
    assert step == 6
    with pytest.raises(UserError, match="trained with --expert-parallel"):
        train(cfg, opts(blobs, steps=8), tmp_path / "resumed", resume=True, progress=False)


# ---- real torchrun, gloo on loopback -----------------------------------------------------

def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _torchrun(nproc: int, *args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_local_port()), "--max-restarts", str(restarts), "-m", "meme.training.train", *args]


def _train_args(cfg_path: Path, data: Path, out: Path, **kw) -> list[str]:
    flags = {"steps": 1, "batch-size": 8, "lr": 1e-3, "warmup": 2, "ckpt-every": 3, "sample-every": 0,
             "log-every": 1, "device": "cpu", **kw}
    return ["--config", str(cfg_path), "--data", str(data), "--out", str(out),
            *[x for k, v in flags.items() for x in ((f"--{k}",) if v is True else (f"--{k}", str(v)))]]


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _close(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=atol) for k in a)


@pytest.mark.cluster
def test_two_ranks_of_half_a_batch_equal_one_process_of_the_batch(tmp_path, blobs, caplog):
    """2 ranks x B/2 == 1 process x B after one step (weights, EMA, AdamW moments; with
    gradient clipping on), and that checkpoint resumes in one process, saying what changed."""
    cfg = tiny_cfg()
    cfg_path = cfg.save(tmp_path / "tiny.yaml")
    _run(_torchrun(2, *_train_args(cfg_path, blobs, tmp_path / "ddp", **{"grad-clip": 0.05})))
    one = train(cfg, opts(blobs, steps=1, grad_clip=0.05), tmp_path / "one", progress=False)
    ck = checkpoint.load_training(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert ck["parallel"]["world_size"] == 2 and ck["step"] == 1
    assert _close(ck["model"], one.model.state_dict()) and _close(ck["ema"], one.ema.module.state_dict())
    moments = [s["exp_avg"] for s in ck["opt"]["state"].values()]
    assert len(moments) == len(one.opt.state)
    assert all(torch.allclose(a, one.opt.state[p]["exp_avg"], atol=1e-7)
               for a, p in zip(moments, [p for p in one.model.parameters() if p in one.opt.state]))
    rows = pd.read_csv(tmp_path / "ddp" / "metrics.csv")
    assert list(rows.step) == [1] and abs(rows.loss[0] - float(pd.read_csv(tmp_path / "one" / "metrics.csv").loss[0])) < 1e-5
    # the same checkpoint continues in one process: same stream, a note on what changed
    straight = train(cfg, opts(blobs, steps=3, grad_clip=0.05), tmp_path / "straight", progress=False)
    with caplog.at_level(logging.WARNING, logger="meme.training.train"):
        resumed = train(cfg, opts(blobs, steps=3, grad_clip=0.05), tmp_path / "ddp", resume=True, progress=False)
    assert "written by 2 rank(s) and resumes on 1" in caplog.text
    assert _close(resumed.model.state_dict(), straight.model.state_dict(), atol=1e-5)


@pytest.mark.cluster
def test_expert_parallel_groups_give_each_expert_its_update_alone(tmp_path, blobs):
    """Two one-rank groups train the two experts at once; each expert ends exactly where
    training it alone on its own stream (one process, --expert-parallel) ends, and rank 0's
    checkpoint holds both in the format meme.sampling.sample reads."""
    cfg = tiny_cfg()
    cfg_path = cfg.save(tmp_path / "tiny.yaml")
    _run(_torchrun(2, *_train_args(cfg_path, blobs, tmp_path / "ep", steps=6, **{"expert-parallel": True})))
    alone = train(cfg, opts(blobs, expert_parallel=True), tmp_path / "alone", progress=False)
    ck = checkpoint.load_training(tmp_path / "ep" / "checkpoints" / "last.pt")
    for key, ref in (("model", alone.model.state_dict()), ("ema", alone.ema.module.state_dict())):
        assert ck[key].keys() == ref.keys() and all(torch.equal(ck[key][k], ref[k]) for k in ref), key
    assert all(torch.equal(a, g.get_state()) for a, g in zip(ck["parallel"]["expert_gens"], alone.gens))
    assert list(pd.read_csv(tmp_path / "ep" / "metrics.csv").step) == list(range(1, 7))
    load_run(tmp_path / "ep")


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


@pytest.mark.cluster
def test_a_killed_rank_resumes_from_the_last_checkpoint(tmp_path, blobs):
    """torchrun --max-restarts 1: kill -9 one rank mid-run; the restarted ranks continue from
    the last checkpoint, every step is logged once, and the weights are bit for bit those of
    an unbroken run on as many ranks."""
    cfg_path = tiny_cfg().save(tmp_path / "tiny.yaml")
    steps = 30

    def cmd(out: Path) -> list[str]:
        return _torchrun(2, *_train_args(cfg_path, blobs, out, steps=steps, **{"ckpt-every": 5, "resume": True}),
                         restarts=1)

    _run(cmd(tmp_path / "straight"))
    out = tmp_path / "run"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "checkpoints" / "last.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the deadline"
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-3000:]
    assert "resumed" in log, "the restarted ranks did not continue from the checkpoint"
    resumed_at = int(log.split("resumed", 1)[1].split("at step", 1)[1].split()[0])
    assert 0 < resumed_at < steps
    assert list(pd.read_csv(out / "metrics.csv").step) == list(range(1, steps + 1))
    got, want = (checkpoint.load_training(d / "checkpoints" / "last.pt") for d in (out, tmp_path / "straight"))
    assert got["step"] == steps
    for key in ("model", "ema"):
        assert all(torch.equal(got[key][k], want[key][k]) for k in want[key]), key
