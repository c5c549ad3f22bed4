"""The per-step compute budget: what a candidate costs, and whether the space can meet B.

Cost unit: GFLOPs = 2 x MACs of one forward pass at batch 1 at the TARGET shape,
attention matmuls included (``meme.model.macs``). A MEME pays expert n's cost on its share
of the sampling steps, so ``mean`` mode bounds the interval-weighted mean; ``max``
mode bounds every expert.

The cheapest point of a space is found without sampling. Cost grows with base width and
blocks and falls with the pool stride, so only the smallest macro shape matters. Along
the ratios it is not monotone (more d_h is cheaper in the high-resolution stages, where
attention is quadratic in tokens, and dearer in the deep ones, where the doubled high
branches dominate), but it is a sum of per-stage terms (stage s's blocks depend only on
its own d_h/d): a few corner chains settle most budgets, and otherwise each stage's
cost is tabulated over its grid (one stage changed at a time) and minimised over
non-increasing chains by dynamic programming. All experts sharing the cheapest chain
satisfies every rule, and no mix of experts is cheaper in mean or max mode.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from meme.common.errors import UserError
from meme.model.config import MemeConfig
from meme.model.macs import cost_of_meme, cost_of_network
from meme.model.references import resolve
from meme.speed.latency_model import LatencyTable, Priced

MODES = ("mean", "max")
REFERENCE_NAMES = ("ldm-s", "meme-table4", "ldm-l")


@dataclass(frozen=True)
class Budget:
    gflops: float          # B: GFLOPs per denoising step at the target shape
    mode: str = "mean"     # 'mean' (interval-weighted) or 'max' (every expert)
    source: str = "flag"   # 'flag' or the reference name it was taken from

    @property
    def bounded(self) -> bool:
        """False when only a time budget (``--budget-ms``) bounds the search."""
        return math.isfinite(self.gflops)

    def describe(self) -> str:
        how = "interval-weighted mean over experts" if self.mode == "mean" else "every expert"
        if not self.bounded:
            return f"no GFLOPs bound ({how} for the time budget)"
        src = "" if self.source == "flag" else f" (= {self.source})"
        return f"{self.gflops:.2f} GFLOPs per denoising step, {how}{src}"


@dataclass
class LatencyBudget:
    """Milliseconds per sampling step on one device, priced by a latency table
    (``meme.speed.latency_model``); ``ms`` None: time is an objective, not a bound."""

    ms: Optional[float]
    mode: str                        # as Budget.mode
    table: LatencyTable
    table_path: str

    @property
    def device(self) -> str:
        return self.table.meta["device"]

    def describe(self) -> str:
        bound = "no bound" if self.ms is None else f"{self.ms:g} ms per denoising step"
        how = "interval-weighted mean over experts" if self.mode == "mean" else "every expert"
        return (f"{bound}, {how}, on {self.device} at batch {self.table.setting.batch} (latency table "
                f"{self.table_path}: {len(self.table.blocks)} blocks, {self.table.build_s:.0f} s of measuring)")

    def price(self, cfg: MemeConfig) -> Priced:
        """The candidate's step time from the table (entries it lacks are measured now)."""
        return Priced([self.price_arch(a, cfg.data) for a in cfg.experts], cfg.interval_weights())

    def price_arch(self, arch, data) -> float:
        if self.table.missing(arch, data):
            self.table.ensure(arch, data)
        return self.table.price(arch, data)

    def cost(self, priced: Priced) -> float:
        return priced.ms_mean if self.mode == "mean" else priced.ms_max


@dataclass(frozen=True)
class Cost:
    """What the study records for a candidate."""

    gflops: float                    # the budgeted figure (mean or max, per the mode)
    gflops_mean: float
    gflops_max: float
    gflops_per_expert: list[float]
    params: int                      # all experts together
    params_unique: int               # what the model holds: parts the experts share counted once
    paper_units: float               # the paper's 'MACs' column (3 x hook GMACs), weighted mean


def cost_of(cfg: MemeConfig, mode: str = "mean") -> Cost:
    c = cost_of_meme(cfg)
    return Cost(gflops=c.gflops_mean if mode == "mean" else c.gflops_max,
                gflops_mean=c.gflops_mean, gflops_max=c.gflops_max,
                gflops_per_expert=[e.gflops for e in c.experts], params=c.params_total,
                params_unique=c.params_unique, paper_units=c.paper_units_mean)


def resolve_budget(gflops: Optional[float], like: Optional[str], mode: str, ms: Optional[float] = None) -> Budget:
    """--budget-gflops B or --budget-like NAME (exactly one, or neither beside --budget-ms) -> Budget."""
    if mode not in MODES:
        raise UserError(f"--budget-mode must be one of {list(MODES)}, got {mode!r}")
    if ms is not None and (not math.isfinite(ms) or ms <= 0):
        raise UserError(f"--budget-ms must be a positive number, got {ms}")
    if ms is not None and gflops is None and like is None:
        return Budget(math.inf, mode, "none")
    if (gflops is None) == (like is None):
        raise UserError("give exactly one of --budget-gflops B or --budget-like NAME (or --budget-ms X)")
    if like is not None:
        return Budget(cost_of(resolve(like), mode).gflops, mode, like)
    if not math.isfinite(gflops) or gflops <= 0:
        raise UserError(f"--budget-gflops must be a positive number, got {gflops}")
    return Budget(float(gflops), mode, "flag")


def reference_costs(mode: str = "mean") -> dict[str, Cost]:
    return {name: cost_of(resolve(name), mode) for name in REFERENCE_NAMES}


# ---- the cheapest point of a space ----------------------------------------------------

def _stage_tables(space, base: int, blocks: int, pools: tuple[int, ...],
                  cost_of_arch=None) -> tuple[float, list[dict[Fraction, float]]]:
    """Cost at the all-top corner, and per stage: value -> cost change from the top.

    ``cost_of_arch(arch)``: GFLOPs by default; any cost that is a sum of per-stage terms.
    """
    grids = [space.stage_grid(space.expert_base(base, space.widths.choices[0]), s) for s in range(space.num_stages)]
    top = [g[-1] for g in grids]
    cost_of_arch = cost_of_arch or (lambda arch: cost_of_network(arch, space.data).gflops)

    def cost(ratios: list[Fraction]) -> float:
        return cost_of_arch(space.arch(base, blocks, pools, tuple(str(r) for r in ratios), space.widths.choices[0]))

    c_top = cost(top)
    tables = []
    for s, grid in enumerate(grids):
        row = {}
        for v in grid:
            probe = list(top)
            probe[s] = v
            row[v] = cost(probe) - c_top
        tables.append(row)
    return c_top, tables


def _cheapest_chain(space, tables: list[dict[Fraction, float]]) -> tuple[float, list[Fraction]]:
    """Min of sum_s table_s[r_s] over chains the depth rule allows (DP over stages)."""
    best: dict[Fraction, tuple[float, list[Fraction]]] = {v: (c, [v]) for v, c in tables[0].items()}
    for table in tables[1:]:
        nxt = {}
        for v, c in table.items():
            prev = [(pc, pr) for pv, (pc, pr) in best.items()
                    if not space.ratios.monotone_depth or v <= pv]
            if prev:
                pc, pr = min(prev, key=lambda x: x[0])
                nxt[v] = (pc + c, pr + [v])
        best = nxt
    return min(best.values(), key=lambda x: x[0])


def _cheap_macros(space) -> list[tuple[int, int, tuple[int, ...]]]:
    """Cost grows with width and depth and falls with pool stride: only these can be cheapest."""
    pools = [p for p in space.macro.pool_strides
             if not any(q != p and all(a >= b for a, b in zip(q, p)) for q in space.macro.pool_strides)]
    return [(min(space.macro.base_channels), min(space.macro.num_res_blocks), p) for p in pools]


def _step_chains(grids: list[list[Fraction]], monotone: bool) -> list[list[Fraction]]:
    """Corner chains: stages before k at their top, from k on at their bottom (clipped legal)."""
    out = []
    for k in range(len(grids) + 1):
        chain: list[Fraction] = []
        for s, g in enumerate(grids):
            want = g[-1] if s < k else g[0]
            if monotone and chain:
                want = max([x for x in g if x <= min(want, chain[-1])], default=g[0])
            chain.append(want)
        out.append(chain)
    return out


def cheapest_config(space, budget: Optional[float] = None) -> tuple[MemeConfig, float]:
    """A min-cost candidate of the space and its measured cost.

    Corner chains first (a handful of counts); when a budget is given and a corner
    meets it, that is enough. Otherwise the exact minimum by the per-stage DP.
    All experts share the chain and the narrowest width (decoder or network), so mean == max and N does
    not matter.
    """
    best, narrowest = None, space.widths.choices[0]
    for base, blocks, pools in _cheap_macros(space):
        grids = [space.stage_grid(space.expert_base(base, narrowest), s) for s in range(space.num_stages)]
        for chain in _step_chains(grids, space.ratios.monotone_depth):
            c = cost_of_network(space.arch(base, blocks, pools, tuple(str(r) for r in chain), narrowest), space.data).gflops
            if best is None or c < best[0]:
                best = (c, base, blocks, pools, chain)
    if budget is None or best[0] > budget:
        for base, blocks, pools in _cheap_macros(space):
            c_top, tables = _stage_tables(space, base, blocks, pools)
            delta, chain = _cheapest_chain(space, tables)
            if c_top + delta < best[0]:
                best = (c_top + delta, base, blocks, pools, chain)
    _, base, blocks, pools, chain = best
    n = min(space.num_experts)
    arch = space.arch(base, blocks, pools, tuple(str(r) for r in chain), narrowest)
    cfg = MemeConfig(name=f"{space.name}-cheapest", experts=(arch,) * n, data=space.data,
                     diffusion=space.diffusion, expert_probs=(space.probs.choices[-1],) * n).validate()
    return cfg, cost_of(cfg, "mean").gflops_mean


def check_feasible(space, budget: Budget) -> float:
    """Raise a one-line UserError when nothing in the space meets B; else the cheapest cost found."""
    _, cmin = cheapest_config(space, budget.gflops)
    if cmin > budget.gflops:
        raise UserError(f"budget {budget.gflops:.2f} GFLOPs is below the cheapest candidate in "
                        f"{space.source} ({cmin:.2f} GFLOPs per step): raise --budget-gflops to at least "
                        f"{math.ceil(cmin * 100) / 100:.2f} or widen the space")
    return cmin


def cheapest_ms(space, lb: LatencyBudget) -> float:
    """The least step time any candidate of the space can have, by the table.

    A step's time is its macro's rest + overhead plus a sum of per-stage iFormer terms,
    so the same dynamic programme as for GFLOPs finds the exact minimum per macro.
    """
    best = math.inf
    for base, blocks, pools in itertools.product(space.macro.base_channels, space.macro.num_res_blocks,
                                                 space.macro.pool_strides):
        c_top, tables = _stage_tables(space, base, blocks, tuple(pools), lambda a: lb.price_arch(a, space.data))
        best = min(best, c_top + _cheapest_chain(space, tables)[0])
    return best


def check_feasible_ms(space, lb: LatencyBudget) -> float:
    """Raise a one-line UserError when no candidate meets the time budget; else the least ms."""
    cmin = cheapest_ms(space, lb)
    if lb.ms is not None and cmin > lb.ms:
        raise UserError(f"budget {lb.ms:g} ms is below the fastest candidate in {space.source} on {lb.device} "
                        f"({cmin:.2f} ms per step by the latency table): raise --budget-ms to at least "
                        f"{math.ceil(cmin * 100) / 100:.2f} or widen the space")
    return cmin
