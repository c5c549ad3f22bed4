"""Budget: cost units, --budget-like, the cheapest point of a space, impossible budgets."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from meme.common.errors import UserError
from meme.model.macs import cost_of_meme, cost_of_network
from meme.model.references import resolve
from nas.space.budget import (
    Budget,
    _cheapest_chain,
    _stage_tables,
    cheapest_config,
    check_feasible,
    cost_of,
    resolve_budget,
)
from nas.space.space import load_space


def test_cost_is_interval_weighted_mean_of_expert_gflops():
    cfg = resolve("meme-table4")
    c = cost_of(cfg, "mean")
    per = [e.gflops for e in cost_of_meme(cfg).experts]
    assert c.gflops_per_expert == per
    assert c.gflops == pytest.approx(sum(per) / 4)          # uniform intervals: weights 1/4
    assert cost_of(cfg, "max").gflops == pytest.approx(max(per))
    # non-uniform boundaries re-weight: expert 1 serves 70% of the steps
    skew = dataclasses.replace(cfg, boundaries=(0, 700, 800, 900, 1000))
    assert cost_of(skew).gflops == pytest.approx(0.7 * per[0] + 0.1 * (per[1] + per[2] + per[3]))


def test_ldm_s_budget_unit_matches_the_design_table():
    # latent-diffusion's own UNetModel at 3x64x64: 34.33 GMACs incl. attention = 68.7 GFLOPs;
    # the paper's Table 3 column: 94.2G (README, 'Parameters and cost against the paper')
    c = cost_of(resolve("ldm-s"))
    assert c.gflops == pytest.approx(68.7, abs=0.05)
    assert c.paper_units == pytest.approx(94.2, abs=0.1)


def test_resolve_budget():
    assert resolve_budget(95, None, "mean") == Budget(95.0, "mean", "flag")
    like = resolve_budget(None, "ldm-s", "mean")
    assert like.gflops == pytest.approx(cost_of(resolve("ldm-s")).gflops) and like.source == "ldm-s"
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match="positive"):
            resolve_budget(bad, None, "mean")
    with pytest.raises(UserError, match="exactly one"):
        resolve_budget(95, "ldm-s", "mean")
    with pytest.raises(UserError, match="exactly one"):
        resolve_budget(None, None, "mean")
    with pytest.raises(UserError, match="budget-mode"):
        resolve_budget(95, None, "median")


def _all_chains(space, base):
    grids = [space.stage_grid(base, s) for s in range(space.num_stages)]
    for chain in itertools.product(*grids):
        if all(a >= b for a, b in zip(chain, chain[1:])):
            yield chain


def test_cheapest_point_equals_brute_force_over_the_tiny_space():
    space = load_space("tiny")
    blocks, pools = 1, (2, 1)
    brute = min((cost_of_network(space.arch(b, blocks, pools, tuple(map(str, ch))), space.data).gflops, b, ch)
                for b in space.macro.base_channels for ch in _all_chains(space, b))
    cfg, cmin = cheapest_config(space)  # no budget: the exact DP path
    assert cmin == pytest.approx(brute[0], rel=1e-9)
    assert cfg.experts[0].base_channels == brute[1]


def test_stage_costs_add_up():
    """The DP relies on per-stage additivity: check it on chains the tables never measured."""
    space = load_space("tiny")
    for base in space.macro.base_channels:
        c_top, tables = _stage_tables(space, base, 1, (2, 1))
        for ch in _all_chains(space, base):
            measured = cost_of_network(space.arch(base, 1, (2, 1), tuple(map(str, ch))), space.data).gflops
            assert measured == pytest.approx(c_top + sum(t[v] for t, v in zip(tables, ch)), rel=1e-9)
        delta, chain = _cheapest_chain(space, tables)
        assert all(a >= b for a, b in zip(chain, chain[1:]))


def test_impossible_budget_names_the_cheapest_cost():
    space = load_space("tiny")
    _, cmin = cheapest_config(space)
    with pytest.raises(UserError, match=f"cheapest candidate .*{cmin:.2f} GFLOPs"):
        check_feasible(space, Budget(cmin * 0.9))
    assert check_feasible(space, Budget(cmin * 1.01)) <= cmin * 1.01
