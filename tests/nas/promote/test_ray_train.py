"""nas.promote.promote's Ray Train path: one promoted training on 2 Ray Train workers (TorchTrainer,
gloo) of a real two-node Ray cluster on loopback with token authentication, and a worker
killed mid-run."""
from __future__ import annotations

import os
import signal
import threading
import time

import pandas as pd
import pytest
import torch

from meme.common import checkpoint
from meme.training.train import train
from nas.promote.promote import Design, PromoteProtocol, RayPlacement, run_dir, run_pipelines
from nas.space.space import PromoteRecipe
from tests.meme.training.test_train import opts, tiny_cfg
from tests.nas.engine.test_cluster import RAY_TOKEN, _descendants, _pids_with, ray_cluster  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def _driver_env(monkeypatch):
    """This process is the Ray driver: it presents the cluster's token, on loopback."""
    for key, value in {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN, "OMP_NUM_THREADS": "1",
                       "RAY_USAGE_STATS_ENABLED": "0", "GLOO_SOCKET_IFNAME": "lo"}.items():
        monkeypatch.setenv(key, value)


def test_promote_trains_one_run_on_two_ray_train_workers(ray_cluster, tmp_path, blobs):
    cfg = tiny_cfg()
    recipe = PromoteRecipe(steps=4, batch_size=8, lr=1e-3, warmup=2, ema_decay=0.999)
    protocol = PromoteProtocol(data=str(blobs), recipe=recipe, device="cpu", fid=False)
    place = RayPlacement(ray_cluster.address, cpus_per_run=0.5, workers_per_run=2)
    [row] = run_pipelines([(Design("tiny", cfg), 1, tmp_path, protocol)], ray=place)
    run = run_dir(tmp_path, Design("tiny", cfg), 1)
    assert row["heldout_loss"] > 0 and "data-parallel over 2 ranks" in (run / "promote.log").read_text()
    ck = checkpoint.load_training(run / "checkpoints" / "last.pt")
    assert ck["step"] == 4 and ck["parallel"]["world_size"] == 2
    one = train(cfg, opts(blobs, steps=4, seed=1, ema_decay=0.999, ckpt_every=2), tmp_path / "one", progress=False)
    # the same run as one process, up to float rounding (AdamW's first steps amplify it to ~2e-5)
    assert all(torch.allclose(ck["model"][k], v, atol=1e-4) for k, v in one.model.state_dict().items())


def test_a_dead_ray_train_worker_costs_a_restart_from_the_checkpoint(ray_cluster, tmp_path, blobs):
    """kill -9 one Ray Train worker mid-run: FailureConfig restarts both, the run resumes
    from its last checkpoint and ends with every logged step once."""
    cfg, steps = tiny_cfg(), 600
    protocol = PromoteProtocol(data=str(blobs), recipe=PromoteRecipe(steps=steps, batch_size=8, lr=1e-3, warmup=2),
                        device="cpu", fid=False)
    place = RayPlacement(ray_cluster.address, cpus_per_run=0.5, workers_per_run=2)
    run = run_dir(tmp_path, Design("tiny", cfg), 1)
    done: dict = {}
    driver = threading.Thread(target=lambda: done.update(rows=run_pipelines([(Design("tiny", cfg), 1, tmp_path,
                                                                               protocol)], ray=place)))
    driver.start()
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "last.pt").exists():
        assert driver.is_alive() and time.monotonic() < deadline, "no checkpoint before the deadline"
        time.sleep(0.1)
    ours = set(_descendants([p for port in ray_cluster.nodes.values() for needle in ("node-manager-port",
                             "node_manager_port") for p in _pids_with(f"{needle}={port}")]))
    workers = sorted(set(_pids_with("RayTrainWorker")) & ours)
    assert workers, "no Ray Train worker process found on the cluster's nodes"
    os.kill(workers[-1], signal.SIGKILL)
    driver.join(timeout=400)
    assert not driver.is_alive() and done.get("rows"), "the run did not finish after the worker died"
    log = (run / "promote.log").read_text()
    assert "resumed" in log, log[-3000:]
    assert int(log.split("resumed", 1)[1].split("at step", 1)[1].split()[0]) > 0
    assert list(pd.read_csv(run / "metrics.csv").step) == list(range(50, steps + 1, 50))   # every 50th, once
    assert checkpoint.load_training(run / "checkpoints" / "last.pt")["step"] == steps
