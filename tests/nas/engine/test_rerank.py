"""nas.engine.rerank and nas.studies.fidelity on the tiny space: real training, statistics checked by hand."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from meme.common.errors import UserError
from nas.engine import rerank
from nas.engine.replicates import Run, load_cache
from nas.evaluators.trial import run_trial
from nas.space.space import load_space
from nas.studies import fidelity

REPO = Path(__file__).resolve().parents[3]
TINY = str(REPO / "search_spaces" / "tiny.yaml")


def _other_design(tmp_path: Path) -> Path:
    """A second hand design in the tiny space: one expert, hard (p = 1)."""
    ref = load_space("tiny").reference
    cfg = dataclasses.replace(ref, name="tiny-single", experts=ref.experts[:1], expert_probs=(1.0,))
    return cfg.save(tmp_path / "single.yaml")


def test_rerank_cli_statistics_and_resume(tmp_path, capsys):
    out = tmp_path / "rr.json"
    argv = ["reference", str(_other_design(tmp_path)), "--space", TINY, "--seeds", "3", "--json", str(out),
            "--quiet", "--jobs", "2"]
    assert rerank.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["seeds"] == [1, 2, 3] and res["baseline"] == "tiny-hand"
    base, other = res["designs"]
    for row in (base, other):
        assert row["n"] == 3 and row["train_steps_total"] == [24]   # equal training whatever N
        assert row["mean"] == pytest.approx(np.mean(row["values"]))
        assert row["std"] == pytest.approx(np.std(row["values"], ddof=1))
        assert len(set(row["values"])) == 3                          # the seed really changes the run
    cmp = other["vs_first"]
    assert cmp["diff"] == pytest.approx(other["mean"] - base["mean"])
    assert cmp["p_value"] == pytest.approx(sps.ttest_ind(other["values"], base["values"], equal_var=False).pvalue)
    text = capsys.readouterr().out
    assert "tiny-hand" in text and "(baseline)" in text and cmp["verdict"] in text
    # a run is the same with the same seed (so cached results are the results)
    space = load_space("tiny")
    again = run_trial(space.reference, space.proxy, lambda s, v: False, threads=1, seed=2).objective
    assert again == pytest.approx(base["values"][base["seeds"].index(2)], rel=1e-6)
    # resume: every run is in the cache, nothing is retrained
    cache_file = out.with_suffix(".runs.jsonl")
    assert len(load_cache(cache_file)) == 6 and len(cache_file.read_text().splitlines()) == 6
    assert rerank.main(argv) == 0
    assert len(cache_file.read_text().splitlines()) == 6                # no run appended: none retrained
    assert json.loads(out.read_text())["designs"][0]["values"] == base["values"]


def test_unknown_design_is_a_one_line_error(capsys):
    assert rerank.main(["no-such-design", "--space", TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-design" in err[0]


def test_a_shorter_proxy_is_a_prefix_of_a_longer_one():
    """What nas.studies.fidelity relies on to score every step count from one run."""
    space = load_space("tiny")
    p = space.proxy
    long = run_trial(space.reference, dataclasses.replace(p, steps=24, eval_every=4), lambda s, v: False,
                     threads=1, seed=3)
    short = run_trial(space.reference, dataclasses.replace(p, steps=12, eval_every=4), lambda s, v: False,
                      threads=1, seed=3)
    assert long.history[:3] == short.history
    assert long.train_gflops == pytest.approx(2 * short.train_gflops)


def test_fidelity_study_end_to_end(tmp_path):
    out = tmp_path / "fid"
    argv = ["--space", TINY, "--archs", "4", "--seeds", "2", "--pool", "12", "--high", "width_mult=1,steps=36",
            "--out", str(out), "--quiet", "--jobs", "2"]
    assert fidelity.main(argv) == 0
    res = json.loads((out / "fidelity.json").read_text())
    archs = res["architectures"]
    assert len(archs) == 4 and archs[0]["name"] == "tiny-hand"
    assert len({a["num_experts"] for a in archs}) >= 2            # spread over N
    rows = [r for r in res["rows"] if r["proxy"] == "space proxy"]
    assert [r["steps"] for r in rows] == list(range(4, 49, 4))     # every report of the 48-step runs
    full = rows[-1]
    lo = [full["means"][a["name"]] for a in archs]
    hi = [a["high_mean"] for a in archs]
    assert full["spearman"]["value"] == pytest.approx(sps.spearmanr(lo, hi).statistic)
    assert full["kendall"]["value"] == pytest.approx(sps.kendalltau(lo, hi).statistic)
    assert full["spearman"]["ci_low"] <= full["spearman"]["value"] <= full["spearman"]["ci_high"]
    # same-N pairs: every pair of equal N is listed, with z-scores recomputed here by hand
    within = full["within_n"]
    same_n = [(a["name"], b["name"]) for i, a in enumerate(archs) for b in archs[i + 1:]
              if a["num_experts"] == b["num_experts"]]
    assert [(p["a"], p["b"]) for p in within["pairs"]] == same_n
    for p in within["pairs"]:
        a, b = (next(x for x in archs if x["name"] == n) for n in (p["a"], p["b"]))
        z = (a["high_mean"] - b["high_mean"]) / np.hypot(a["high_std"], b["high_std"])
        assert p["z_high"] == pytest.approx(z) and p["separated"] == (abs(z) > 2)
    assert within["separated"] == sum(p["separated"] for p in within["pairs"])
    # costs are measured, and the high fidelity costs more than any proxy row
    assert all(0 < r["cost_vs_high"] < 1 for r in rows)
    assert rows[0]["train_gflops_per_run"] * 12 == pytest.approx(full["train_gflops_per_run"], rel=1e-6)
    assert (out / "fidelity.png").stat().st_size > 1000 and "Spearman" in (out / "fidelity.md").read_text()
    runs = load_cache(out / "runs.jsonl")
    assert len(runs) == 4 * 2 * 2                                   # archs x seeds x (proxy, high)
    assert Run("x", load_space("tiny").reference, load_space("tiny").proxy, 0).key() not in runs  # keyed by proxy

    # --keep: the same designs read back from fidelity.json, one more added; only the new one trains
    assert fidelity.main(argv[:3] + ["5", *argv[4:], "--keep", str(out / "fidelity.json")]) == 0
    grown = json.loads((out / "fidelity.json").read_text())["architectures"]
    assert [a["config_yaml"] for a in grown[:4]] == [a["config_yaml"] for a in archs]
    assert grown[4]["config_yaml"] not in {a["config_yaml"] for a in archs}
    assert len(load_cache(out / "runs.jsonl")) == 5 * 2 * 2


def test_top_up_fills_the_widest_gap_in_gflops_within_each_n():
    pool = fidelity.draws(load_space("tiny"), pool=30)
    by_n = {}
    for _, c, _ in pool:
        by_n.setdefault(c.num_experts, []).append(c)
    (n1, one), (n2, other) = [(n, cs) for n, cs in sorted(by_n.items()) if len(cs) >= 3][:1] + \
        [(n, cs) for n, cs in sorted(by_n.items())][-1:]
    assert n1 != n2
    kept = [("k", one[0], 10.0)]
    rest = [("near", one[1], 11.0), ("far", one[2], 30.0), ("new-n", other[0], 10.5)]
    assert [x[0] for x in fidelity.top_up(kept, rest, 3)] == ["k", "new-n", "far"]   # an unseen N first
    assert [x[0] for x in fidelity.top_up(kept, rest, 4)][-1] == "near"
    with pytest.raises(UserError):
        fidelity.top_up(kept, rest, 5)


def test_fidelity_refuses_a_high_fidelity_that_is_not_higher(tmp_path, capsys):
    assert fidelity.main(["--space", TINY, "--high", "steps=12", "--out", str(tmp_path)]) == 2
    assert "--high" in capsys.readouterr().err
