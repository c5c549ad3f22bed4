"""Held-out denoising loss of a trained run, per interval of t: ``meme-nas heldout --run DIR``.

FID says how good the samples are; this says *where in t* a model is good, which is what
timestep experts change. The eps-MSE of the run's EMA model on fixed held-out images
(the data's ``val`` split, a fixed subset), with fixed noise, at ``--per-bin`` evenly
spaced t inside each of ``--bins`` equal bins of [0, T). Every run scored with the same
flags sees the same images, noise and t: differences are the models'.
Writes ``RUN/heldout.json``: the mean, and one value per bin.
"""
from __future__ import annotations

from pathlib import Path

import torch

from meme.common.checkpoint import atomic_write_json
from meme.common.command import CommandParser, main_guard, setup_logging
from meme.common.device import pick_device
from meme.data.dataset import load_data
from meme.data.latents import run_data_spec
from meme.model.diffusion import Diffusion
from meme.sampling.sample import load_run

SEED = 4321    # the held-out subset and its noise: one fixed draw for every run


def bin_timesteps(T: int, bins: int, per_bin: int) -> list[list[int]]:
    """``per_bin`` evenly spaced t at the centres of equal sub-bins of each of ``bins`` bins of [0, T)."""
    width = T / bins
    return [[min(T - 1, int(b * width + (i + 0.5) * width / per_bin)) for i in range(per_bin)] for b in range(bins)]


@torch.no_grad()
def heldout_by_bin(run: Path, bins: int = 4, per_bin: int = 4, images: int = 128,
                   device: str = "auto") -> dict:
    cfg, model, step = load_run(run)
    dev = pick_device(device)
    model = model.to(dev).eval()
    diffusion = Diffusion(cfg.diffusion)
    val = load_data(run_data_spec(run), cfg.data, "val")
    g = torch.Generator().manual_seed(SEED)
    x0 = val[torch.randperm(len(val), generator=g)[:images]]
    noise = torch.randn(x0.shape, generator=g)
    x0, noise = x0.to(dev), noise.to(dev)
    grid = bin_timesteps(cfg.diffusion.timesteps, bins, per_bin)
    per = []
    for ts in grid:
        losses = [float(diffusion.training_loss(model, x0, torch.full((len(x0),), t, dtype=torch.long, device=dev),
                                                 noise)) for t in ts]
        per.append(sum(losses) / len(losses))
    return {"step": step, "mean": sum(per) / len(per), "bins": per, "timesteps": grid, "images": len(x0),
            "seed": SEED}


@main_guard
def main(argv=None) -> int:
    setup_logging()
    p = CommandParser(prog="meme-nas heldout", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="training run directory (from meme.training.train)")
    p.add_argument("--bins", type=int, default=4, help="equal bins of [0, T) (default %(default)s)")
    p.add_argument("--per-bin", type=int, default=4, help="t per bin (default %(default)s)")
    p.add_argument("--images", type=int, default=128, help="held-out images (default %(default)s)")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 ...")
    a = p.parse_args(argv)
    result = heldout_by_bin(a.run, a.bins, a.per_bin, a.images, a.device)
    atomic_write_json(result, a.run / "heldout.json")
    print(f"held-out eps-MSE {result['mean']:.5f}; per bin " + " ".join(f"{v:.5f}" for v in result["bins"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
