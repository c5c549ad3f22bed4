"""The proxy a trial trains on: its recipe (:class:`ProxySpec`) and the candidate scaled down to it.

Same N, p_n, boundaries and d_h/d; data shape from the proxy; every width x
``width_mult``. The head width is scaled by the same factor, so each stage keeps its
number of attention heads and the d_h/d head-step grid is *identical* at both scales
(a target ratio of 5/8 at 256 channels with 16-channel heads is 5/8 at 64 channels with
4-channel heads). ``check_space`` rejects multipliers that would break this.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

from meme.model.config import ArchConfig, ConfigError, DataShape, DiffusionConfig, MemeConfig, head_step_grid

EVALUATORS = ("scratch", "supernet")   # how a candidate is scored: trained from scratch, or inside a supernet


@dataclass(frozen=True)
class ProxySpec:
    """Where and how long a trial trains: a small, fast stand-in for the target.

    The candidate is scaled to ``channels x resolution x resolution`` and every width
    (base channels AND head channels) is multiplied by ``width_mult``, so each stage
    keeps its number of heads and every target d_h/d is a legal head step at the proxy.
    """

    data: Optional[str] = "fashion-mnist"  # meme.data.dataset spec (None/'fashion-mnist' = embedded default)
    resolution: int = 32                   # proxy side in pixels
    channels: int = 1                      # proxy image channels
    width_mult: Fraction = Fraction(1, 4)  # proxy widths = target widths x this
    diffusion: Optional[DiffusionConfig] = None  # None = the target's schedule
    steps: int = 240                       # training budget: optimizer steps in all, whatever N
                                           # (equal training compute for every candidate, as the paper
                                           # compares designs and as a promoted winner is trained)
    steps_per_expert: bool = False         # True: N x steps (more training for larger N: ranks budgets,
                                           # not architectures; kept as an explicit option)
    batch_size: int = 32                   # images per step
    lr: float = 5e-4                       # AdamW learning rate (after warm-up)
    warmup: int = 20                       # linear warm-up steps
    grad_clip: float = 1.0                 # max global grad norm (0 = off)
    eval_every: int = 20                   # budget steps between objective reports
    prune_from: Optional[int] = None       # first pruning rung (budget step; grace period); None:
                                           # the first report at or after max(steps/3, warmup)
    reduction_factor: int = 3              # successive halving / ASHA: keep 1 in this many per rung
    eval_batch: int = 64                   # held-out images per evaluated t
    eval_timesteps: int = 10               # size of the fixed, uniformly spaced t grid
    fid_samples: int = 256                 # --objective fid: generated samples
    fid_steps: int = 25                    # --objective fid: DDIM steps
    limit_data: Optional[int] = 10000      # use only the first N training images
    seed: int = 0                          # init, data order, t and noise: same for every trial
    precision: str = "auto"                # meme.common.fastpath: 'auto' (bf16 on GPU; fp32 for narrow CPU proxies),
                                           # 'bf16' or 'fp32'
    evaluator: str = "scratch"             # 'scratch': train every candidate for `steps`; 'supernet': score its
                                           # experts as sub-networks of a trained supernet (nas.evaluators.supernet_score)
    supernet: Optional[str] = None         # evaluator 'supernet': the directory nas.evaluators.supernet_training train wrote
    finetune_steps: int = 0                # evaluator 'supernet': fine-tune steps in all before scoring (0: none)

    def total_steps(self, num_experts: int) -> int:
        """Optimizer steps a candidate with N experts trains for."""
        return self.steps * (num_experts if self.steps_per_expert else 1)

    def steps_per_budget_step(self, num_experts: int) -> int:
        """Optimizer steps in one budget step (reports and rungs count budget steps)."""
        return num_experts if self.steps_per_expert else 1

    def first_rung(self) -> int:
        """Budget step of the first pruning rung: past warm-up and a third of the budget.

        Earlier rungs rank how fast a model leaves the initial loss, not where it ends.
        """
        if self.prune_from is not None:
            return int(self.prune_from)
        start = max(math.ceil(self.steps / 3), self.warmup)
        return min(self.steps, math.ceil(start / self.eval_every) * self.eval_every)

    def shape(self) -> DataShape:
        return DataShape(channels=self.channels, resolution=self.resolution, latent=False)

    def digest(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["width_mult"] = str(self.width_mult)
        d["diffusion"] = dataclasses.asdict(self.diffusion) if self.diffusion else None
        return d

    def training_digest(self) -> dict[str, Any]:
        """What determines a full training run from scratch (the pruning schedule and evaluator do not)."""
        d = self.digest()
        for key in ("prune_from", "reduction_factor", "evaluator", "supernet", "finetune_steps"):
            d.pop(key)
        return d

    def from_scratch(self) -> "ProxySpec":
        """This proxy with the from-scratch evaluator (re-ranking always trains)."""
        return dataclasses.replace(self, evaluator="scratch", supernet=None, finetune_steps=0)


def _scaled(value: int, mult: Fraction, what: str, where: str) -> int:
    v = value * mult
    if v.denominator != 1 or v < 1:
        raise ConfigError(f"{where}: {what} {value} x width_mult {mult} = {v} is not a positive integer")
    return int(v)


def proxy_arch(arch: ArchConfig, proxy: ProxySpec, where: str = "proxy") -> ArchConfig:
    """One expert at proxy width; raises ConfigError if a head step would not map exactly."""
    m = Fraction(proxy.width_mult)
    base = _scaled(arch.base_channels, m, "base_channels", where)
    heads = _scaled(arch.head_channels, m, "head_channels", where)
    if base % 8:
        raise ConfigError(f"{where}: proxy base width {base} (= {arch.base_channels} x {m}) must be a multiple of 8")
    decoder = _scaled(arch.decoder_channels, m, "decoder_channels", where) if arch.decoder_channels else 0
    time = _scaled(arch.time_channels, m, "time_channels", where) if arch.time_channels else 0
    out = dataclasses.replace(arch, base_channels=base, head_channels=heads, decoder_channels=decoder,
                              time_channels=time)
    for s, (wt, wp) in enumerate(zip(arch.stage_channels(), out.stage_channels())):
        if head_step_grid(wt, arch.head_channels) != head_step_grid(wp, heads):
            raise ConfigError(f"{where}: stage {s + 1} head-step grid changes at proxy width {wp} "
                              f"(head {heads}): pick a width_mult that keeps d_h even")
    if proxy.resolution % 2 ** (arch.num_stages - 1):
        raise ConfigError(f"{where}: resolution {proxy.resolution} is not divisible by 2^{arch.num_stages - 1}")
    return out


def proxy_config(cfg: MemeConfig, proxy: ProxySpec) -> MemeConfig:
    """The candidate as a trial trains it (validated)."""
    experts = tuple(proxy_arch(a, proxy, f"{cfg.name}: experts[{i}]") for i, a in enumerate(cfg.experts))
    return dataclasses.replace(cfg, experts=experts, data=proxy.shape(),
                               diffusion=proxy.diffusion or cfg.diffusion).validate()
