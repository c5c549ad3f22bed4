"""The exact width-schedule front against brute force, and its schedules."""
from __future__ import annotations

import itertools
import random

import pytest

from meme.common.errors import UserError
from nas.studies.schedule_opt import Point, best_under, front, pareto, reverse, to_schedule


def brute(losses, costs, weights, monotone):
    pts = []
    for ws in itertools.product(range(len(costs)), repeat=len(weights)):
        if monotone == "wider_near_data" and any(a < b for a, b in zip(ws, ws[1:])):
            continue
        pts.append(Point(sum(weights[b] * costs[w] for b, w in enumerate(ws)), sum(losses[w][b] for b, w in enumerate(ws)),
                         ws))
    return pts


@pytest.mark.parametrize("monotone", ["free", "wider_near_data"])
@pytest.mark.parametrize("seed", range(4))
def test_front_is_the_brute_force_front_and_answers_every_budget(seed, monotone):
    rng = random.Random(seed)
    n_w, n_b = 3, 5
    costs = sorted(rng.uniform(0.05, 1.0) for _ in range(n_w))
    weights = [rng.uniform(0.5, 1.5) for _ in range(n_b)]
    weights = [w / sum(weights) for w in weights]
    # narrower is worse, by an amount that depends on the bin (what makes a schedule pay)
    losses = [[rng.uniform(0.02, 0.1) + (n_w - 1 - w) * rng.uniform(0.0, 0.05) for _ in range(n_b)] for w in range(n_w)]
    everything = brute(losses, costs, weights, monotone)
    got = front(losses, costs, weights, monotone)
    want = pareto(everything)
    assert [(round(p.cost, 12), round(p.loss, 12)) for p in got] == [(round(p.cost, 12), round(p.loss, 12)) for p in want]
    for budget in [min(costs) - 1e-3] + [rng.uniform(min(costs), max(costs)) for _ in range(10)]:
        fits = [p for p in everything if p.cost <= budget]
        best = best_under(got, budget)
        if not fits:
            assert best is None
        else:
            assert best.loss == pytest.approx(min(p.loss for p in fits), abs=1e-12)


def test_adjacent_bins_of_one_width_are_one_expert_and_reverse_is_the_mirror():
    pt = Point(0.0, 0.0, (2, 2, 1, 0, 0))
    s = to_schedule(pt, ["1/4", "1/2", "1"], [0, 200, 400, 600, 800, 1000], "sn", "x")
    assert s.boundaries == (0, 400, 600, 1000) and s.widths() == ["1", "1/2", "1/4"] and s.supernet == "sn"
    costs, weights = [0.1, 0.3, 1.0], [0.2] * 5
    losses = [[1.0, 2.0, 3.0, 4.0, 5.0]] * 3
    back = reverse(Point(0.0, 0.0, (2, 2, 1, 0, 0)), costs, losses, weights)
    assert back.widths == (0, 0, 1, 2, 2) and back.cost == pytest.approx(0.2 * (0.1 * 2 + 0.3 + 2.0))


def test_refuses_bad_shapes():
    with pytest.raises(UserError, match=r"\[width\]\[bin\]"):
        front([[1.0, 2.0]], [0.1, 0.2], [0.5, 0.5])
    with pytest.raises(UserError, match="narrow to wide"):
        front([[1.0], [2.0]], [0.5, 0.1], [1.0], "wider_near_data")
