"""The data every evaluator of a proxy reads: its training set and its fixed held-out test.

One definition for the from-scratch trials (``nas.evaluators.trial``), the supernet and its scorer
(``nas.evaluators.supernet_training``, ``nas.evaluators.supernet_score``): the same images, the same noise and the same t
grid, so cached scores stay comparable with trained ones.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from meme.common.fastpath import FastPath
from meme.data.dataset import load_data
from meme.model.config import DataShape
from meme.model.diffusion import Diffusion
from meme.model.experts import MultiExpertDenoiser
from nas.space.proxy import ProxySpec


@lru_cache(maxsize=4)
def proxy_dataset(spec: Optional[str], shape: DataShape, split: str, limit: Optional[int]) -> torch.Tensor:
    """Proxy data, loaded once per process (a Ray worker reused across trials keeps it)."""
    x = load_data(None if spec in (None, "fashion-mnist") else spec, shape, split)
    return x[:limit] if limit else x


def eval_timesteps(T: int, k: int) -> list[int]:
    """k uniformly spaced t: centres of k equal bins of [0, T)."""
    return [min(T - 1, int((i + 0.5) * T / k)) for i in range(k)]


def heldout_images(proxy: ProxySpec) -> torch.Tensor:
    """The fixed held-out images every evaluator scores on (``proxy.seed``'s, whatever the training seed)."""
    val = proxy_dataset(proxy.data, proxy.shape(), "val", None)
    g_val = torch.Generator().manual_seed(proxy.seed + 99)
    return val[torch.randperm(len(val), generator=g_val)[: proxy.eval_batch]]


def heldout_noise(val: torch.Tensor, seed: int) -> torch.Tensor:
    """The fixed noise added to the held-out images at every t of the grid."""
    return torch.randn(val.shape, generator=torch.Generator().manual_seed(seed + 12345))


def heldout_loss(model: MultiExpertDenoiser, diffusion: Diffusion, val: torch.Tensor,
                 timesteps: list[int], seed: int, device: torch.device, fp: FastPath) -> float:
    """Mean over the t grid of eps-MSE on fixed held-out images and fixed noise."""
    per_t = heldout_losses(model, diffusion, val, timesteps, seed, device, fp)
    return sum(per_t) / len(per_t)


@torch.no_grad()
def heldout_losses(model: MultiExpertDenoiser, diffusion: Diffusion, val: torch.Tensor,
                   timesteps: list[int], seed: int, device: torch.device, fp: FastPath) -> list[float]:
    """eps-MSE at each t of the grid on fixed held-out images and fixed noise (the owner of t denoises)."""
    model.eval()
    noise = heldout_noise(val, seed)
    x0 = fp.input(val, device)
    noise = fp.input(noise, device)
    out = []
    with fp.autocast():
        for t in timesteps:
            tt = torch.full((len(x0),), t, dtype=torch.long, device=device)
            out.append(float(diffusion.training_loss(model, x0, tt, noise)))
    model.train()
    return out
