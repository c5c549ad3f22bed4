"""nas.engine.stats against hand computation: seed summaries, Welch's t-test, rank correlations."""
from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from nas.engine.stats import rank_correlation, summarize, welch


def test_summary_is_mean_and_sample_std():
    s = summarize([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3) and s.n == 3
    # sum of squared deviations: (4/3)^2 + (1/3)^2 + (5/3)^2 = 42/9; / (n - 1)
    assert s.std == pytest.approx(math.sqrt(42 / 9 / 2))
    assert summarize([5.0]).std == 0.0


def test_welch_matches_hand_computation():
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]
    c = welch(a, b)
    # var a = 1, var b = 5/3; se^2 = 1/3 + 5/12 = 3/4; t = (2 - 5.5) / sqrt(3/4)
    assert c.diff == pytest.approx(-3.5) and c.rel_diff == pytest.approx(-3.5 / 5.5)
    assert c.t == pytest.approx(-3.5 / math.sqrt(0.75))
    # Welch-Satterthwaite: (3/4)^2 / ((1/3)^2 / 2 + (5/12)^2 / 3)
    assert c.df == pytest.approx(0.5625 / ((1 / 9) / 2 + (25 / 144) / 3))
    assert c.p_value == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    assert c.p_value < 0.05 and c.verdict == "better"
    assert welch(b, a).verdict == "worse"


def test_welch_says_cannot_tell_apart_within_the_noise():
    assert welch([1.0, 3.0, 2.0], [2.5, 1.5, 2.2]).verdict == "cannot tell apart"
    assert welch([1.0], [2.0]).verdict == "cannot tell apart"          # one seed proves nothing
    assert math.isnan(welch([1.0], [2.0]).p_value)
    assert welch([1.0, 1.0], [2.0, 2.0]).verdict == "better"           # noiseless and apart


def test_rank_correlations_by_hand():
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    r = rank_correlation(x, y, n_boot=500)
    # Spearman: 1 - 6 * sum d^2 / (n (n^2 - 1)), d = -1 1 -1 1 0 -> 1 - 24 / 120
    assert r["spearman"].value == pytest.approx(0.8)
    # Kendall: 10 pairs, 2 discordant ((1,2) and (3,4)) -> (8 - 2) / 10
    assert r["kendall"].value == pytest.approx(0.6)
    assert r["spearman"].ci_low <= 0.8 <= r["spearman"].ci_high
    perfect = rank_correlation([1, 2, 3, 4], [10, 20, 30, 40], n_boot=200)["spearman"]
    assert (perfect.value, perfect.ci_low, perfect.ci_high) == (1.0, 1.0, 1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1], n_boot=200)["kendall"].value == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        rank_correlation([1, 2], [1, 2])
