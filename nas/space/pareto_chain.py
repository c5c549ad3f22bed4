"""The one exact optimiser of per-interval choices: the (cost, loss) Pareto front of a chain.

Both exact optimisers of the project ask the same question. A design is a sequence of
choices c_0 .. c_{K-1}, one per position (an expert's sub-network in ``nas.engine.interval_opt``,
a bin's width in ``nas.studies.schedule_opt``); which choices a position may take depends
only on the choice before it (the space's monotone rules); and both the cost (GFLOPs or ms
per step, interval-weighted) and the loss (held-out eps-MSE, summed over the grid) are sums
of per-position terms. So the set of designs no other design beats in both cost and loss
is found exactly by a dynamic program over positions whose state is the last choice,
keeping per state the Pareto set of partial (cost, loss) -- every budget's optimum is then
the front's lowest loss at cost <= budget. A ``budget`` drops partial costs above it early
(terms are non-negative), which is what keeps large enumerations small.

Checked against brute force in ``tests/nas/space/test_pareto_chain.py`` (and through both
callers' own brute-force tests).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Iterable, Optional, Sequence, TypeVar

C = TypeVar("C", bound=Hashable)
TIE = 1e-15            # losses closer than this are one loss (float sums in another order)


@dataclass(frozen=True)
class Design(Generic[C]):
    """One chain of choices with its summed cost and loss."""

    cost: float
    loss: float
    choices: tuple


def pareto(designs: Iterable[Design]) -> list[Design]:
    """The designs no other beats in both cost and loss, by ascending cost (ties: the first kept)."""
    out: list[Design] = []
    for d in sorted(designs, key=lambda d: (d.cost, d.loss)):
        if not out or d.loss < out[-1].loss - TIE:
            out.append(d)
    return out


def front(length: int,
          options: Callable[[int, Optional[C]], Sequence[C]],
          term: Callable[[int, C], tuple[float, float]],
          budget: float = math.inf) -> list[Design]:
    """The exact Pareto front of every legal chain of ``length`` choices (module docstring).

    ``options(k, previous)`` lists the choices position k may take after ``previous`` (None
    at k = 0); ``term(k, c)`` is (cost, loss) of choice c at position k, both >= 0.
    Chains whose cost passes ``budget`` are left out. Empty when nothing fits.
    """
    if length < 1:
        raise ValueError(f"a chain has at least one position, got {length}")
    cache: dict[tuple[int, C], tuple[float, float]] = {}

    def at(k: int, c: C) -> tuple[float, float]:
        if (k, c) not in cache:
            cache[(k, c)] = term(k, c)
        return cache[(k, c)]

    limit = budget * (1 + 1e-9) if math.isfinite(budget) else budget
    states: dict[C, list[Design]] = {}
    for c in options(0, None):
        cost, loss = at(0, c)
        if cost <= limit:
            states.setdefault(c, []).append(Design(cost, loss, (c,)))
    for k in range(1, length):
        nxt: dict[C, list[Design]] = {}
        for prev, partial in states.items():
            for c in options(k, prev):
                cost, loss = at(k, c)
                for d in partial:
                    if d.cost + cost <= limit:
                        nxt.setdefault(c, []).append(Design(d.cost + cost, d.loss + loss, d.choices + (c,)))
        states = {c: pareto(ds) for c, ds in nxt.items()}
    return pareto(d for ds in states.values() for d in ds)


def best_under(designs: Sequence[Design], budget: float) -> Optional[Design]:
    """The lowest loss at cost <= budget (ties: the cheaper); None if nothing fits."""
    fits = [d for d in designs if d.cost <= budget * (1 + 1e-9)]
    return min(fits, key=lambda d: (d.loss, d.cost)) if fits else None
