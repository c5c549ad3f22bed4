"""The exact best width schedules of one slimmable supernet, at every budget at once.

A schedule gives each of K bins of t (equal or not) one width of the supernet. Its
cost per sampling step is the bin-weighted mean of its widths' costs (GFLOPs, or
measured ms), and its cheap score is the sum over bins of the held-out eps-MSE of its
width on that bin: both are sums of per-bin terms, so the set of schedules on the
(cost, loss) Pareto front is found exactly by the project's one chain optimiser
(``nas.space.pareto_chain``): positions are bins, a bin's choice is its width, and the
``wider_near_data`` rule limits a bin's widths by the bin before it. The front answers
every budget: the best schedule at B is the front's lowest loss at cost <= B.

Bins with the same width next to each other become one expert (``to_schedule``), so a
schedule of K bins has 1 to K experts. ``tests/nas/studies/test_schedule_opt.py`` checks
the front against brute force.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from meme.common.errors import UserError
from meme.model.schedule import Choice, Schedule
from nas.space import pareto_chain
from nas.space.pareto_chain import pareto

MONOTONE = ("free", "wider_near_data")


@dataclass(frozen=True)
class Point:
    """One schedule on the front: a width index per bin (bin 0 next to the data)."""

    cost: float                   # bin-weighted mean cost per step
    loss: float                   # sum over bins of that bin's held-out loss at its width
    widths: tuple[int, ...]       # index into the width list, per bin


def front(losses: Sequence[Sequence[float]],      # [width][bin] held-out loss
          costs: Sequence[float],                  # [width] cost per step
          weights: Sequence[float],                # [bin] fraction of sampling steps (sums to 1)
          monotone: str = "free") -> list[Point]:
    """The exact (cost, loss) Pareto front of all width-per-bin schedules (module docstring).

    ``monotone='wider_near_data'``: a bin's width is never wider than the bin before it
    (closer to the data); widths must then be listed narrow to wide.
    """
    if monotone not in MONOTONE:
        raise UserError(f"monotone must be one of {list(MONOTONE)}, got {monotone!r}")
    n_w, n_b = len(costs), len(weights)
    if len(losses) != n_w or any(len(row) != n_b for row in losses):
        raise UserError(f"losses must be [width][bin] = [{n_w}][{n_b}]")
    if monotone != "free" and list(costs) != sorted(costs):
        raise UserError("wider_near_data needs the widths listed narrow to wide")

    def options(b: int, previous: Optional[int]) -> list[int]:
        if monotone == "free" or previous is None:
            return list(range(n_w))
        return list(range(previous + 1))

    designs = pareto_chain.front(n_b, options, lambda b, w: (weights[b] * costs[w], losses[w][b]))
    return [Point(d.cost, d.loss, d.choices) for d in designs]


def best_under(points: list[Point], budget: float) -> Optional[Point]:
    """The front's lowest loss at cost <= budget (None if nothing fits)."""
    return pareto_chain.best_under(points, budget)


def to_schedule(point: Point, widths: Sequence[str], bounds: Sequence[int], supernet: str = "",
                name: str = "schedule") -> Schedule:
    """Bins of one width next to each other merged into one expert."""
    cuts, choices = [bounds[0]], []
    for b, w in enumerate(point.widths):
        if choices and choices[-1].width == widths[w]:
            cuts[-1] = bounds[b + 1]
        else:
            choices.append(Choice(widths[w]))
            cuts.append(bounds[b + 1])
    return Schedule(tuple(cuts), tuple(choices), supernet, name)


def reverse(point: Point, costs: Sequence[float], losses: Sequence[Sequence[float]],
            weights: Sequence[float]) -> Point:
    """The same widths in the opposite order of t (the control: wide where this one is narrow)."""
    ws = point.widths[::-1]
    return Point(sum(weights[b] * costs[w] for b, w in enumerate(ws)), sum(losses[w][b] for b, w in enumerate(ws)), ws)
