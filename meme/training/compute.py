"""Training compute of a run, counted from its schedule: what equal-cost comparisons charge.

Forward + backward = 3 x the forward pass (the usual 1 + 2 rule), attention included;
one optimizer step of an expert costs ``3 x batch x forward GFLOPs`` of that expert.
A run with a parent phase (``meme.training.branching``) trains, at parent step k, the sub-network
of expert ``k mod N``: it is priced as that expert's step.

Two figures for a design whose experts start from shared weights:

* **charged in full**: the run's own steps plus every FLOP of the source its experts
  were cut from (a supernet's whole training, another run's whole training). This is the
  figure ``nas.studies.compare``'s equal-cost check uses: a user who wants this design must pay it.
* **amortised**: the source's FLOPs divided by the number of candidates it served (a
  search's supernet scores hundreds), plus the run's own. Reported beside, never used to
  pass an equal-cost check.

A parent phase inside the run is part of the run's own steps: both figures include it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from meme.common.errors import UserError
from meme.model.config import MemeConfig
from meme.model.macs import cost_of_network


def train_gflops_per_step(cfg: MemeConfig, batch_size: int) -> list[float]:
    """Training GFLOPs of one optimizer step of each expert, at ``cfg``'s shape."""
    return [3.0 * batch_size * cost_of_network(a, cfg.data).gflops for a in cfg.experts]


def training_gflops(step_gflops: list[float], steps: int) -> float:
    """Training GFLOPs after ``steps`` interleaved optimizer steps (step k trains expert k mod N)."""
    n = len(step_gflops)
    full, part = divmod(steps, n)
    return full * sum(step_gflops) + sum(step_gflops[:part])


def expert_for_step(step: int, num_experts: int, total_steps: int, schedule: str) -> int:
    """Which expert an optimizer step trains: interleaved k mod N, or the paper's sequential blocks
    (``weighted``: ``parent_expert``)."""
    if schedule == "sequential":
        return min(step * num_experts // max(total_steps, 1), num_experts - 1)
    return step % num_experts


# weights -> (the order so far, steps per expert in it): extended one step at a time by a run
_WEIGHTED: dict[tuple[float, ...], tuple[list[int], list[int]]] = {}


def weighted_order(weights: tuple[float, ...], length: int) -> list[int]:
    """The first ``length`` experts of the weighted schedule: step k trains the expert furthest
    behind its share, argmax_n (k+1) w_n - steps_n so far (ties: the lower n).

    Every expert stays within one step of its share at every k, and the order does not
    depend on the run's length, so a run's first S steps are a run of S steps. Experts of
    different per-step cost (decoders of different widths) then spend, over a run, the
    interval-weighted mean cost per step: the training compute of one network of that
    per-step cost.
    """
    return list(_weighted(tuple(weights), length)[:length])


def _weighted(weights: tuple[float, ...], length: int) -> list[int]:
    """The cached order, extended to at least ``length`` steps (not a copy)."""
    if not weights or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"the weighted schedule needs non-negative interval weights, got {list(weights)}")
    order, counts = _WEIGHTED.setdefault(weights, ([], [0] * len(weights)))
    if len(order) < length:
        total = sum(weights)
        for k in range(len(order), length):
            n = max(range(len(weights)), key=lambda i: ((k + 1) * weights[i] / total - counts[i], -i))
            counts[n] += 1
            order.append(n)
    return order


def steps_per_expert(num_experts: int, total_steps: int, schedule: str, split_at: int = 0,
                     weights: Sequence[float] = ()) -> list[int]:
    """Optimizer steps spent on each expert's architecture over a whole run.

    Parent steps [0, split_at) train expert k mod N's sub-network; expert steps
    [split_at, total) follow ``expert_after_split``.
    """
    counts = [0] * num_experts
    for k in range(split_at):
        counts[parent_expert(k, num_experts, schedule, weights)] += 1
    for k in range(split_at, total_steps):
        counts[expert_after_split(k, num_experts, total_steps, schedule, split_at, weights)] += 1
    return counts


def parent_expert(step: int, num_experts: int, schedule: str, weights: Sequence[float] = ()) -> int:
    """Whose sub-network parent step ``step`` trains: k mod N, or the weighted order under
    ``weighted`` (so a branched run of experts of unequal cost spends what its from-scratch run does)."""
    return _weighted(tuple(weights), step + 1)[step] if schedule == "weighted" else step % num_experts


def expert_after_split(step: int, num_experts: int, total_steps: int, schedule: str, split_at: int,
                       weights: Sequence[float] = ()) -> int:
    """The expert of step ``step`` >= ``split_at``: interleaved continues k mod N through the split
    (so a branched run trains each architecture exactly as often as a from-scratch one);
    sequential blocks divide the steps after the split; the weighted order continues through it as well."""
    if schedule == "sequential":
        return expert_for_step(step - split_at, num_experts, total_steps - split_at, schedule)
    return parent_expert(step, num_experts, schedule, weights)


@dataclass(frozen=True)
class TrainingCompute:
    """A run's training TFLOPs: its own steps, and the source its experts were cut from."""

    own_tflops: float                    # every optimizer step of this run (a parent phase included)
    parent_phase_tflops: float           # the part of own_tflops spent before the split
    source_tflops: float = 0.0           # training of an outside source (supernet, other run), in full
    source: Optional[str] = None
    served: Optional[int] = None         # candidates the source served (amortisation), if known

    @property
    def charged_tflops(self) -> float:
        return self.own_tflops + self.source_tflops

    @property
    def amortised_tflops(self) -> float:
        share = self.source_tflops / self.served if self.served else self.source_tflops
        return self.own_tflops + share

    def to_dict(self) -> dict:
        return {**asdict(self), "charged_tflops": self.charged_tflops, "amortised_tflops": self.amortised_tflops}


def run_compute(cfg: MemeConfig, total_steps: int, batch_size: int, schedule: str = "interleaved",
                split_at: int = 0, source_tflops: float = 0.0, source: Optional[str] = None,
                served: Optional[int] = None) -> TrainingCompute:
    """The compute of a ``meme.training.train`` run of ``cfg`` (target shape), from its schedule."""
    per_step = train_gflops_per_step(cfg, batch_size)
    weights = cfg.interval_weights()
    counts = steps_per_expert(cfg.num_experts, total_steps, schedule, split_at, weights)
    parent = steps_per_expert(cfg.num_experts, split_at, schedule, split_at, weights)   # the parent steps alone
    own = sum(c * g for c, g in zip(counts, per_step)) / 1e3
    before = sum(c * g for c, g in zip(parent, per_step)) / 1e3
    return TrainingCompute(own, before, source_tflops, source, served)


def source_tflops(source: str) -> float:
    """Training TFLOPs of an ``--init-from`` source: a supernet's index, or a run's ``compute.json``."""
    p = Path(source)
    index = p / "supernet.json"
    if index.is_file():
        return float(json.loads(index.read_text()).get("train_gflops_total", 0.0)) / 1e3
    run = p if p.is_dir() else p.parent.parent
    record = run / "compute.json"
    if record.is_file():
        return float(json.loads(record.read_text())["charged_tflops"])
    raise UserError(f"{source}: its training compute is not recorded (no supernet.json, no compute.json), so a "
                    f"design started from it cannot be charged for it")
