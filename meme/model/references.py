"""Reference configs by name, at the paper's target shape (LDM latent 3x64x64).

These are the hand-designed models every search is compared against (paper Tables 3
and 4). ``resolve(name_or_path)`` is what every CLI calls with its config argument.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from meme.model.config import ArchConfig, ConfigError, DataShape, DiffusionConfig, MemeConfig
from meme.model.schedule import is_schedule, load_schedule

LDM_LATENT = DataShape(channels=3, resolution=64, latent=True)
LDM_DIFFUSION = DiffusionConfig(timesteps=1000, schedule="sqrt_linear", beta_start=0.0015, beta_end=0.0195)
PAPER_SOFT_PROBS = (0.8, 0.4, 0.2, 0.1)

# Paper Table 4: d_h/d per encoder stage for each expert (expert 1 owns t near 0).
TABLE4_HIGH_RATIOS = (
    ("3/4", "5/8", "1/2", "1/4"),
    ("3/4", "1/2", "3/8", "1/8"),
    ("3/4", "3/8", "1/4", "1/16"),
    ("3/4", "1/4", "1/8", "1/16"),
)
# Table 4 prints "pool stride 2" for every stage; the reference iFormer would use 1
# in the low-resolution stages. We follow the paper; the search can change it.
TABLE4_POOL_STRIDES = (2, 2, 2, 2)
# 16 channels per head: the smallest head that makes every Table 4 ratio a whole
# number of heads (with 32, stage 3's 3/8 of 384 would leave 7.5 heads).
IUNET_HEAD_CHANNELS = 16


def ldm_unet(base_channels: int) -> ArchConfig:
    """latent-diffusion UNetModel as in paper Table 3 (LDM-S: 128, LDM-L: 224)."""
    return ArchConfig(kind="unet", base_channels=base_channels, channel_mult=(1, 2, 3, 4),
                      num_res_blocks=2, attention_ds=(2, 4, 8), head_channels=32)


def iunet(high_ratios: tuple[str, ...], base_channels: int = 128) -> ArchConfig:
    """iU-Net expert as in paper Table 4 (2 iFormer + 1 ResBlock per encoder stage)."""
    return ArchConfig(kind="iunet", base_channels=base_channels, channel_mult=(1, 2, 3, 4),
                      num_res_blocks=2, attention_ds=(), head_channels=IUNET_HEAD_CHANNELS,
                      high_ratios=tuple(high_ratios), pool_strides=TABLE4_POOL_STRIDES)


def _single(name: str, arch: ArchConfig) -> MemeConfig:
    return MemeConfig(name=name, experts=(arch,), data=LDM_LATENT, diffusion=LDM_DIFFUSION)


REFERENCES: dict[str, Callable[[], MemeConfig]] = {
    "ldm-s": lambda: _single("ldm-s", ldm_unet(128)),
    "ldm-l": lambda: _single("ldm-l", ldm_unet(224)),
    "iu-ldm-s": lambda: _single("iu-ldm-s", iunet(TABLE4_HIGH_RATIOS[0])),
    "multi-expert-s": lambda: MemeConfig(
        name="multi-expert-s", experts=(ldm_unet(128),) * 4, data=LDM_LATENT,
        diffusion=LDM_DIFFUSION, expert_probs=PAPER_SOFT_PROBS),
    "meme-table4": lambda: MemeConfig(
        name="meme-table4", experts=tuple(iunet(r) for r in TABLE4_HIGH_RATIOS), data=LDM_LATENT,
        diffusion=LDM_DIFFUSION, expert_probs=PAPER_SOFT_PROBS),
}


PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # meme/configs/


def packaged_configs() -> dict[str, Path]:
    """Small ready-made configs shipped with the package (e.g. fmnist-meme-small)."""
    return {p.stem: p for p in sorted(PACKAGED_CONFIGS.glob("*.yaml"))}


def reference_names() -> list[str]:
    return list(REFERENCES) + list(packaged_configs())


def resolve(name_or_path: str | Path) -> MemeConfig:
    """A reference name (``ldm-s`` ...) or a YAML path -> validated MemeConfig."""
    key = str(name_or_path)
    if key in REFERENCES:
        return REFERENCES[key]().validate()
    if key in packaged_configs():
        return MemeConfig.load(packaged_configs()[key])
    path = Path(key)
    if path.is_file() and is_schedule(path):     # a supernet schedule runs as the MEME of its sub-networks
        return load_schedule(path)[2]
    if path.suffix in (".yaml", ".yml") or path.exists():
        return MemeConfig.load(path)
    raise ConfigError(f"unknown config {key!r}: not a reference name {reference_names()} nor a YAML file")
