"""One entry point from an ``ArchConfig`` to a denoiser ``eps = net(x_t, t)``.

Every network takes ``x`` [B, C, H, W] and ``t`` [B] (int or float timesteps in
[0, T)) and returns eps with x's shape. Nothing else in the project needs to know
which kind of network an expert is.
"""
from __future__ import annotations

from torch import nn

from meme.config import ArchConfig, ConfigError, DataShape
from meme.iunet import IUNet
from meme.unet import UNet

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
    """All parameters (every expert holds its own)."""
    return sum(p.numel() for p in net.parameters())
