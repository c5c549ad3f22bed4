"""The exact optimiser's yardstick: every candidate of a small space scored one by one."""
from __future__ import annotations

from nas.engine.interval_opt import _config, boundary_choices, options_after
from nas.space.budget import cost_of


def brute_force_optimum(space, scorer, budget: float):
    """Every legal candidate of the space (N, boundaries, every expert's width and chain) scored one by
    one: (best objective, its config) under the budget, None when nothing fits."""
    best = None
    for base, blocks, pools in space.macro.combos():
        for n in space.num_experts:
            for bounds in boundary_choices(space, n):
                def walk(prefix):
                    if len(prefix) == n:
                        yield prefix
                        return
                    for o in options_after(space, base, prefix[-1] if prefix else None):
                        yield from walk(prefix + [o])
                for options in walk([]):
                    cfg = _config(space, base, blocks, pools, options, bounds, space.probs.choices[-1])
                    if cost_of(cfg).gflops_mean > budget:
                        continue
                    v = scorer.score(cfg).objective
                    if best is None or v < best[0]:
                        best = (v, cfg)
    return best
