"""The one chain optimiser against brute force: every budget's best chain, rules and all."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from nas.space.pareto_chain import Design, best_under, front, pareto


def brute(length, options, term, budget=math.inf):
    out = []
    for chain in itertools.product(range(5), repeat=length):
        if chain[0] not in options(0, None) or any(c not in options(k, chain[k - 1])
                                                   for k, c in enumerate(chain) if k):
            continue
        cost = sum(term(k, c)[0] for k, c in enumerate(chain))
        if cost <= budget:
            out.append(Design(cost, sum(term(k, c)[1] for k, c in enumerate(chain)), chain))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_the_front_is_brute_forces_and_answers_every_budget(seed):
    rng = random.Random(seed)
    length = 4
    cost = {(k, c): rng.uniform(0.0, 1.0) * (c + 1) for k in range(length) for c in range(5)}
    loss = {(k, c): rng.uniform(0.0, 1.0) / (c + 1) + rng.uniform(0.0, 0.3) for k in range(length) for c in range(5)}

    def options(k, prev):          # a rule tied to the previous choice: never more than one step wider
        return list(range(5)) if prev is None else [c for c in range(5) if c <= prev + 1]

    def term(k, c):
        return cost[(k, c)], loss[(k, c)]

    everything = brute(length, options, term)
    got, want = front(length, options, term), pareto(everything)
    assert [(round(d.cost, 12), round(d.loss, 12)) for d in got] == [(round(d.cost, 12), round(d.loss, 12)) for d in want]
    for budget in [rng.uniform(0.5, 10.0) for _ in range(8)]:
        bounded = front(length, options, term, budget)          # pruned early: the same answer
        fits = [d for d in everything if d.cost <= budget]
        for answer in (best_under(got, budget), best_under(bounded, budget)):
            assert (answer is None) == (not fits)
            if fits:
                assert answer.loss == pytest.approx(min(d.loss for d in fits), abs=1e-12)
                assert all(c in options(k, answer.choices[k - 1] if k else None) for k, c in enumerate(answer.choices))


def test_nothing_fits_and_a_chain_needs_a_position():
    assert front(2, lambda k, p: [0, 1], lambda k, c: (1.0, 0.0), budget=1.5) == []
    with pytest.raises(ValueError):
        front(0, lambda k, p: [0], lambda k, c: (0.0, 0.0))
