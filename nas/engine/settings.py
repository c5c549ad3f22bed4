"""What a search run was asked for (``Settings``) and when it must stop (``Deadline``).

Imports nothing of ``nas`` at run time, so every search module can read it without an
import circle.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # annotations only
    from nas.space.budget import Budget, LatencyBudget
    from nas.space.space import SearchSpace

STALE_AFTER_S = 30.0  # default --stale-after: a RUNNING trial unstamped this long lost its driver


@dataclass
class Settings:
    """Everything a search run needs, resolved from the CLI."""

    space: "SearchSpace"
    budget: "Budget"
    objectives: tuple[str, ...]        # ('loss',), ('fid',), or with 'gflops'/'latency' second: Pareto search
    trials: int                        # total counted trials wanted in the study
    study_name: str
    out: Path                          # results/<study>
    storage_url: str
    seed: int = 0
    sampler_seed: Optional[int] = None   # the sampler's own seed (None: ``seed``), the evaluator left as it is
    time_budget: Optional[float] = None  # seconds for the whole job (trials, reference and re-rank)
    device: Optional[str] = None       # torch device for trials ('auto' when None)
    cpus_per_trial: float = 1.0
    gpus_per_trial: Optional[float] = None  # None: 0.5 when the Ray cluster has GPUs
    address: Optional[str] = None      # Ray cluster address
    progress: bool = True
    stale_after: float = STALE_AFTER_S  # seconds before another driver's unstamped RUNNING trial is failed
    latency: Optional["LatencyBudget"] = None  # --budget-ms / objective 'latency': the time budget and its table
    sampler: str = "auto"              # 'tpe', 'nsga2', or 'auto' (nas.engine.study.make_sampler chooses)
    trials_at_once: Optional[int] = None  # trained trials at once on one device (None: measured on a GPU, else 1)

    @property
    def quality(self) -> str:
        return self.objectives[0]

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        return ["minimize"] * len(self.objectives)


class Deadline:
    """A moment after which no new work starts (``None`` seconds: never).

    ``reserve`` (seconds, asked at every check) keeps time back for work that must still
    follow, so the trials of a search stop early enough for its re-rank to fit.
    """

    def __init__(self, seconds: Optional[float], reserve: Optional[Callable[[], float]] = None,
                 end: Optional[float] = None):
        self.end = end if end is not None else (None if not seconds else time.monotonic() + seconds)
        self.reserve = reserve

    def holding_back(self, reserve: Callable[[], float]) -> "Deadline":
        """The same end, with ``reserve()`` seconds kept back for what comes after."""
        return Deadline(None, reserve=reserve, end=self.end)

    def left(self) -> Optional[float]:
        if self.end is None:
            return None
        kept = float(self.reserve()) if self.reserve is not None else 0.0
        return max(0.0, self.end - kept - time.monotonic())

    def passed(self) -> bool:
        left = self.left()
        return left is not None and left <= 0.0
