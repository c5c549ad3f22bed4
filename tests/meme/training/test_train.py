"""meme.training.train / meme.sampling.sample with real tiny models: resume, atomic saves, NaN, low-memory."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from meme.common import checkpoint
from meme.model.config import ArchConfig, DataShape, DiffusionConfig, MemeConfig
from meme.model.diffusion import Diffusion
from meme.model.experts import build_denoiser
from meme.sampling.sample import SamplingPlan, generate
from meme.training.train import Trainer, TrainingDiverged, TrainOptions, train

REPO = Path(__file__).resolve().parents[3]


def tiny_cfg() -> MemeConfig:
    """Two experts of different kinds at 1x16x16: small enough for many steps on CPU."""
    unet = ArchConfig(kind="unet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_ds=(2,), head_channels=8)
    iunet = ArchConfig(kind="iunet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       head_channels=8, high_ratios=("1/2", "1/4"), pool_strides=(2, 1))
    return MemeConfig(name="tiny", experts=(iunet, unet), data=DataShape(1, 16, False),
                      diffusion=DiffusionConfig.ddpm_pixels(), expert_probs=(0.8, 0.4)).validate()


def opts(data: Path, **kw) -> TrainOptions:
    base = dict(data=str(data), steps=6, batch_size=8, lr=1e-3, warmup=2, ckpt_every=3, sample_every=0,
                log_every=1, sample_steps=4, device="cpu")
    base.update(kw)
    return TrainOptions(**base)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_for_bit(tmp_path, blobs):
    cfg = tiny_cfg()
    straight = train(cfg, opts(blobs), tmp_path / "straight", progress=False)
    train(cfg, opts(blobs, steps=3), tmp_path / "resumed", progress=False)
    resumed = train(cfg, opts(blobs), tmp_path / "resumed", resume=True, progress=False)
    assert resumed.step_count == straight.step_count == 6
    assert _states_equal(straight.model.state_dict(), resumed.model.state_dict())
    assert _states_equal(straight.ema.module.state_dict(), resumed.ema.module.state_dict())
    rows = (tmp_path / "resumed" / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(1, 7)]


def test_existing_checkpoint_needs_resume_flag(tmp_path, blobs):
    cfg = tiny_cfg()
    train(cfg, opts(blobs, steps=2), tmp_path / "run", progress=False)
    with pytest.raises(Exception, match="--resume"):
        train(cfg, opts(blobs, steps=4), tmp_path / "run", progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, blobs):
    cfg = tiny_cfg()
    run = tmp_path / "run"
    train(cfg, opts(blobs, steps=3), run, progress=False)
    good = checkpoint.load(run / "checkpoints" / "last.pt")
    bad = tmp_path / "nan.npy"
    np.save(bad, np.full((32, 1, 16, 16), np.nan, dtype=np.float32))
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3 .*last\.pt"):
        train(cfg, opts(bad, steps=6), run, resume=True, progress=False)
    after = checkpoint.load(run / "checkpoints" / "last.pt")
    assert after["step"] == 3 and _states_equal(good["model"], after["model"])


def test_atomic_save_survives_kill_during_save(tmp_path):
    """kill -9 a process while it rewrites a large checkpoint: the file on disk always loads."""
    path = tmp_path / "ck.pt"
    script = (
        "import sys, torch; sys.path.insert(0, %r)\n"
        "from meme.common.checkpoint import atomic_save\n"
        "i = 0\n"
        "while True:\n"
        "    atomic_save({'i': i, 'w': torch.full((16_000_000,), float(i))}, %r); i += 1\n"
        "    print(i, flush=True)\n" % (str(REPO), str(path))
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()            # one complete save exists
    deadline = time.monotonic() + 60  # wait until a later save is under way: its temp file exists
    while not list(tmp_path.glob(".ck.pt.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".ck.pt.*.tmp")), "the kill did not land during a save"  # left by the killed save
    ck = checkpoint.load(path)
    assert torch.all(ck["w"] == float(ck["i"]))


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 1.0)])
def test_low_memory_sampling_matches_normal(tmp_path, sampler, eta):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    den = build_denoiser(cfg)
    with torch.no_grad():  # output layers start at zero: make the denoiser's output depend on its input
        for p in den.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    diff = Diffusion(cfg.diffusion)
    x = torch.randn(2, 1, 16, 16)
    assert den(x, torch.tensor([10, 900])).abs().mean() > 1e-3
    plan = SamplingPlan(n=6, steps=8, eta=eta, sampler=sampler, seed=3, batch_size=4)
    normal = generate(den, diff, (1, 16, 16), plan, "cpu")
    low = generate(den, diff, (1, 16, 16), plan, "cpu", low_memory=True)
    disk = generate(den, diff, (1, 16, 16), plan, "cpu", low_memory=True, offload_dir=tmp_path / "states")
    assert normal.shape == (6, 1, 16, 16)
    assert torch.equal(normal, low) and torch.equal(normal, disk)
    again = generate(den, diff, (1, 16, 16), plan, "cpu")
    assert torch.equal(normal, again)


def test_train_then_sample_cli(tmp_path, blobs):
    cfg_path = tiny_cfg().save(tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "meme.training.train", "--config", str(cfg_path), "--data", str(blobs),
                    "--steps", "4", "--batch-size", "4", "--sample-every", "4", "--sample-steps", "3",
                    "--ckpt-every", "2", "--out", str(run), "--device", "cpu"], check=True, env=env, cwd=tmp_path)
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "config.yaml").is_file()
    assert (run / "grids" / "step0000004.png").is_file()
    subprocess.run([sys.executable, "-m", "meme.sampling.sample", "--run", str(run), "--n", "5", "--steps", "3",
                    "--batch-size", "2", "--device", "cpu"], check=True, env=env, cwd=tmp_path)
    arr = np.load(run / "samples" / "samples.npz")["samples"]
    assert arr.shape == (5, 16, 16, 1) and arr.dtype == np.uint8
    assert len(list((run / "samples" / "png").glob("*.png"))) == 5
    bad = subprocess.run([sys.executable, "-m", "meme.sampling.sample", "--run", str(tmp_path / "nope")],
                         env=env, cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_fashion_mnist_training_lowers_validation_loss(tmp_path):
    """A real tiny model, a few hundred steps on Fashion-MNIST: held-out loss goes down."""
    from meme.data.dataset import load_data

    cfg = MemeConfig(name="fm", experts=tiny_cfg().experts, data=DataShape(1, 16, False),
                     diffusion=DiffusionConfig.ddpm_pixels(), expert_probs=(0.8, 0.4)).validate()
    o = TrainOptions(data="fashion-mnist", steps=300, batch_size=32, lr=2e-3, warmup=20, ckpt_every=10_000,
                     sample_every=0, log_every=50, device="cpu", limit_data=5000)
    val = load_data("fashion-mnist", cfg.data, "val")[:256]

    def val_loss(trainer: Trainer) -> float:
        g = torch.Generator().manual_seed(7)
        t = torch.linspace(0, cfg.diffusion.timesteps - 1, len(val)).long()
        noise = torch.randn(val.shape, generator=g)
        with torch.no_grad():
            return float(trainer.diffusion.training_loss(trainer.model, val, t, noise))

    trainer = Trainer(cfg, o, tmp_path / "fm")
    before = val_loss(trainer)
    trainer = train(cfg, o, tmp_path / "fm", progress=False)
    after = val_loss(trainer)
    assert after < 0.7 * before, (before, after)


def test_train_options_round_trip_through_the_command_line():
    """to_argv is parse_args' inverse for every field, so nas.promote.promote starts the run it describes."""
    import dataclasses

    from meme.training.options import to_argv
    from meme.training.train import parse_args
    changed = {"data": "fashion-mnist", "steps": 7, "batch_size": 3, "lr": 1e-3, "warmup": 2, "weight_decay": 0.1,
               "ema_decay": 0.9, "grad_clip": 0.5, "schedule": "sequential", "seed": 4, "ckpt_every": 5,
               "sample_every": 0, "sample_steps": 3, "log_every": 2, "limit_data": 100, "device": "cpu",
               "precision": "fp32", "threads": 1, "compile": True, "branch_at": 0.5, "split_optimizer": "fresh",
               "snapshot_at": "2,4", "init_from": "runs/x", "expert_parallel": True, "check_every": 3}
    assert set(changed) == {f.name for f in dataclasses.fields(TrainOptions)}   # a new field must join this test
    opts = TrainOptions(**changed)
    assert parse_args(["--config", "tiny", *to_argv(opts)])[1] == opts
    assert to_argv(TrainOptions()) == [] and parse_args(["--config", "tiny"])[1] == TrainOptions()
