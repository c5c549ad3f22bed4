"""One entry point from an ``ArchConfig`` to a denoiser ``eps = net(x_t, t)``.

Every network takes ``x`` [B, C, H, W] and ``t`` [B] (int or float timesteps in
[0, T)) and returns eps with x's shape. Nothing else in the project needs to know
which kind of network an expert is.
"""
from __future__ import annotations

import torch
from torch import nn

from meme.model.config import ArchConfig, ConfigError, DataShape
from meme.model.iunet import IUNet
from meme.model.unet import UNet

_BUILDERS = {"unet": UNet, "iunet": IUNet}


def build_network(arch: ArchConfig, data: DataShape) -> nn.Module:
    """Validate ``arch`` against ``data`` and build its network (on the current default device)."""
    arch.validate()
    data.validate()
    if data.resolution % (2 ** (arch.num_stages - 1)):
        raise ConfigError(f"data.resolution {data.resolution} is not divisible by "
                          f"2^{arch.num_stages - 1} (one halving per stage)")
    try:
        builder = _BUILDERS[arch.kind]
    except KeyError:
        raise ConfigError(f"arch.kind must be one of {sorted(_BUILDERS)}, got {arch.kind!r}") from None
    return builder(arch, data)


def count_params(net: nn.Module) -> int:
    """All parameters, each counted once (a part the experts share counts once)."""
    return sum(p.numel() for p in net.parameters())


def wake_zero_init(net: nn.Module, seed: int = 0, scale: float = 0.02) -> nn.Module:
    """Give zero-initialised parameters small random values (in place; returned).

    A fresh denoiser outputs exactly 0 (LDM's zero-init output convs), so comparing two
    numeric paths of an untrained network compares zeros; tests and ``nas.bench.run``
    wake it first so every layer contributes to the output and its gradients.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net
