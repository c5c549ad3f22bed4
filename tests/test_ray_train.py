"""nas.promote's Ray Train path: one promoted training on 2 Ray Train workers (TorchTrainer,
gloo) of a real two-node Ray cluster on loopback with token authentication."""
from __future__ import annotations

import pytest
import torch

from meme import checkpoint
from meme.train import train
from nas.promote import Design, Protocol, RayPlacement, run_dir, run_pipelines
from nas.space import PromoteRecipe
from tests.test_cluster import RAY_TOKEN, ray_cluster  # noqa: F401 (a head and one worker node)
from tests.test_train import opts, tiny_cfg

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
    protocol = Protocol(data=str(blobs), recipe=recipe, device="cpu", fid=False)
    place = RayPlacement(ray_cluster.address, cpus_per_run=0.5, workers_per_run=2)
    [row] = run_pipelines([(Design("tiny", cfg), 1, tmp_path, protocol)], ray=place)
    run = run_dir(tmp_path, Design("tiny", cfg), 1)
    assert row["heldout_loss"] > 0 and "data-parallel over 2 ranks" in (run / "promote.log").read_text()
    ck = checkpoint.load_training(run / "checkpoints" / "last.pt")
    assert ck["step"] == 4 and ck["parallel"]["world_size"] == 2
    one = train(cfg, opts(blobs, steps=4, seed=1, ema_decay=0.999, ckpt_every=2), tmp_path / "one", progress=False)
    # the same run as one process, up to float rounding (AdamW's first steps amplify it to ~2e-5)
    assert all(torch.allclose(ck["model"][k], v, atol=1e-4) for k, v in one.model.state_dict().items())
