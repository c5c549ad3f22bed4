"""The statistics behind every "A beats B" and "the proxy ranks like the real thing".

* :func:`summarize`: mean, sample standard deviation (n - 1) and n of one design's seeds.
* :func:`welch`: Welch's unequal-variance t-test, two-sided. Chosen over a bootstrap
  for the seed comparison because a bootstrap of 2-5 values per side has almost no
  resamples to draw from, and over Student's t because designs differ in their seed
  spread (measured: +-0.5% for meme-table4, 5-6% for some N=2/3 designs).
* :func:`rank_correlation`: Spearman and Kendall with percentile bootstrap confidence
  intervals over architectures (resampling whole architectures, so ties from repeated
  draws behave as in the data).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps

ALPHA = 0.05


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float        # sample standard deviation (ddof = 1); 0 for a single value
    n: int

    def describe(self, digits: int = 5) -> str:
        return f"{self.mean:.{digits}f} +- {self.std:.{digits}f} (n={self.n})"


def summarize(values: Sequence[float]) -> Summary:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to summarize")
    return Summary(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0, int(x.size))


@dataclass(frozen=True)
class Comparison:
    """``a`` against the baseline ``b`` (lower objective is better)."""

    diff: float           # mean(a) - mean(b)
    rel_diff: float       # diff / mean(b)
    t: float
    df: float
    p_value: float        # two-sided Welch t-test; nan when it cannot be computed (n < 2)
    verdict: str          # 'better', 'worse' or 'cannot tell apart'

    def to_dict(self) -> dict:
        return asdict(self)


def welch(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> Comparison:
    """Is design a better (lower) than baseline b beyond their seed spread?"""
    sa, sb = summarize(a), summarize(b)
    diff = sa.mean - sb.mean
    rel = diff / sb.mean if sb.mean else math.nan
    if sa.n < 2 or sb.n < 2:
        return Comparison(diff, rel, math.nan, math.nan, math.nan, "cannot tell apart")
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    if va + vb == 0:  # identical, noiseless values: the difference is exact
        verdict = "cannot tell apart" if diff == 0 else ("better" if diff < 0 else "worse")
        return Comparison(diff, rel, math.copysign(math.inf, diff) if diff else 0.0, math.nan,
                          0.0 if diff else 1.0, verdict)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    p = float(2 * sps.t.sf(abs(t), df))
    verdict = "cannot tell apart" if p >= alpha else ("better" if diff < 0 else "worse")
    return Comparison(diff, rel, float(t), float(df), p, verdict)


@dataclass(frozen=True)
class Correlation:
    value: float
    ci_low: float
    ci_high: float

    def describe(self) -> str:
        return f"{self.value:+.2f} [{self.ci_low:+.2f}, {self.ci_high:+.2f}]"


def rank_correlation(x: Sequence[float], y: Sequence[float], *, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, Correlation]:
    """Spearman and Kendall tau of x vs y, each with a bootstrap CI over the pairs."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size != y.size or x.size < 3:
        raise ValueError(f"need >= 3 paired values, got {x.size} and {y.size}")
    fns = {"spearman": lambda a, b: sps.spearmanr(a, b).statistic,
           "kendall": lambda a, b: sps.kendalltau(a, b).statistic}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    out = {}
    for name, fn in fns.items():
        boot = []
        for row in idx:
            a, b = x[row], y[row]
            if np.ptp(a) > 0 and np.ptp(b) > 0:  # a resample of one repeated pair has no ranking
                boot.append(float(fn(a, b)))
        lo, hi = (np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]) if boot else (math.nan, math.nan))
        out[name] = Correlation(float(fn(x, y)), float(lo), float(hi))
    return out
