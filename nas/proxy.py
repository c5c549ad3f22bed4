"""Scaling a target-shape candidate down to the proxy a trial trains on.

Same N, p_n, boundaries and d_h/d; data shape from the proxy; every width x
``width_mult``. The head width is scaled by the same factor, so each stage keeps its
number of attention heads and the d_h/d head-step grid is *identical* at both scales
(a target ratio of 5/8 at 256 channels with 16-channel heads is 5/8 at 64 channels with
4-channel heads). ``check_space`` rejects multipliers that would break this.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction

from meme.config import ArchConfig, ConfigError, MemeConfig, head_step_grid


def _scaled(value: int, mult: Fraction, what: str, where: str) -> int:
    v = value * mult
    if v.denominator != 1 or v < 1:
        raise ConfigError(f"{where}: {what} {value} x width_mult {mult} = {v} is not a positive integer")
    return int(v)


def proxy_arch(arch: ArchConfig, proxy, where: str = "proxy") -> ArchConfig:
    """One expert at proxy width; raises ConfigError if a head step would not map exactly."""
    m = Fraction(proxy.width_mult)
    base = _scaled(arch.base_channels, m, "base_channels", where)
    heads = _scaled(arch.head_channels, m, "head_channels", where)
    if base % 8:
        raise ConfigError(f"{where}: proxy base width {base} (= {arch.base_channels} x {m}) must be a multiple of 8")
    out = dataclasses.replace(arch, base_channels=base, head_channels=heads)
    for s, (wt, wp) in enumerate(zip(arch.stage_channels(), out.stage_channels())):
        if head_step_grid(wt, arch.head_channels) != head_step_grid(wp, heads):
            raise ConfigError(f"{where}: stage {s + 1} head-step grid changes at proxy width {wp} "
                              f"(head {heads}): pick a width_mult that keeps d_h even")
    if proxy.resolution % 2 ** (arch.num_stages - 1):
        raise ConfigError(f"{where}: resolution {proxy.resolution} is not divisible by 2^{arch.num_stages - 1}")
    return out


def proxy_config(cfg: MemeConfig, proxy) -> MemeConfig:
    """The candidate as a trial trains it (validated)."""
    experts = tuple(proxy_arch(a, proxy, f"{cfg.name}: experts[{i}]") for i, a in enumerate(cfg.experts))
    return dataclasses.replace(cfg, experts=experts, data=proxy.shape(),
                               diffusion=proxy.diffusion or cfg.diffusion).validate()
