"""Measured latency: the cache key, the per-block model against measurement, and --budget-ms.

Timings on a shared CPU are noisy, so the model is held to a loose bound here; the
real figures (MAPE, Spearman over 30 random candidates) live in the committed reports
(results/curated/latency-*).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from optuna.trial import TrialState

from meme.model.blocks import IFormerBlock
from meme.model.config import DataShape
from meme.model.iunet import iformer_specs
from meme.model.experts import build_network
from meme.speed.latency import Setting, latency_key, measure_network
from meme.speed.latency_model import LatencyTable
from nas import search
from nas.space.latency_table import build_space_table, random_candidates
from nas.space.space import load_space

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[3]
TINY = str(REPO / "search_spaces" / "tiny.yaml")
QUICK = Setting(repeats=3, warmup=1)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MEME_LATENCY_CACHE", str(tmp_path / "latency"))
    measure_network.cache_clear()
    yield tmp_path / "latency"
    measure_network.cache_clear()


def test_cache_key_names_every_field(monkeypatch):
    space = load_space("tiny")
    arch = space.reference.experts[0]
    data = space.data
    base = latency_key(arch, data, QUICK)
    assert latency_key(arch, data, Setting(repeats=3, warmup=1)) == base          # a pure function of its inputs
    assert latency_key(arch, data, dataclasses.replace(QUICK, repeats=7)) == base   # how long we time is no key
    changed = {
        "arch": latency_key(dataclasses.replace(arch, high_ratios=("1/4", "1/4")), data, QUICK),
        "shape": latency_key(arch, DataShape(channels=1, resolution=32), QUICK),
        "device (thread count)": latency_key(arch, data, dataclasses.replace(QUICK, threads=2)),
        "batch": latency_key(arch, data, dataclasses.replace(QUICK, batch=8)),
        "precision": latency_key(arch, data, dataclasses.replace(QUICK, precision="bf16")),
        "compile": latency_key(arch, data, dataclasses.replace(QUICK, compile=True)),
    }
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    changed["torch version"] = latency_key(arch, data, QUICK)
    for field, key in changed.items():
        assert key != base, f"the latency cache key ignores the {field}"
    assert len(set(changed.values())) == len(changed)


def test_measure_network_is_cached_on_disk(cache):
    space = load_space("tiny")
    arch = space.reference.experts[0]
    first = measure_network(arch, space.data, QUICK)
    files = list(cache.glob("*.json"))
    assert [f.stem for f in files] == [latency_key(arch, space.data, QUICK)]
    assert json.loads(files[0].read_text())["median_ms"] == first.median_ms
    measure_network.cache_clear()
    assert measure_network(arch, space.data, QUICK) == first          # read back, not re-timed
    assert first.repeats == 3 and first.q25_ms <= first.median_ms <= first.q75_ms


def test_iformer_specs_are_the_networks_blocks():
    space = load_space("tiny")
    arch = space.arch(32, 1, (2, 1), ("3/4", "1/2"))
    net = build_network(arch, space.data)
    blocks = [m for m in net.modules() if isinstance(m, IFormerBlock)]
    specs = iformer_specs(arch, space.data)
    assert len(blocks) == len(specs) == 2
    for b, s in zip(blocks, specs):
        assert b.mixer.d_h == s.high and b.norm1.num_channels == s.width
        assert b.mixer.low.stride == s.pool_stride


def test_model_against_measurement_on_tiny_space(cache):
    space = load_space("tiny")
    table = build_space_table(space, LatencyTable.empty(QUICK), log=lambda s: None)
    assert len(table.macros) == 2 and table.blocks and table.build_s > 0
    for cfg in random_candidates(space, 3, seed=1):
        priced = table.price_meme(cfg)
        measured = sum(w * measure_network(a, cfg.data, QUICK).median_ms
                       for w, a in zip(cfg.interval_weights(), cfg.experts))
        # loose, as timings on a shared CPU are: leaving out the overhead or a block type breaks it
        assert 0.4 < priced.ms_mean / measured < 2.5, f"model {priced.ms_mean:.2f} ms vs measured {measured:.2f} ms"
    # a table survives its file, and one measured elsewhere is refused
    path = table.save(cache / "table.json")
    assert LatencyTable.load(path, QUICK).price_meme(cfg).experts_ms == priced.experts_ms
    with pytest.raises(ValueError, match="batch"):
        LatencyTable.load(path, dataclasses.replace(QUICK, batch=4))


def _short_tiny(tmp_path: Path) -> Path:
    """The tiny space with an 8-step proxy: trials in seconds (what is tested happens before training)."""
    d = yaml.safe_load(Path(TINY).read_text())
    d["proxy"].update(steps=8, eval_every=4, warmup=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_budget_ms_rejects_before_training(cache, tmp_path):
    space = load_space(_short_tiny(tmp_path))
    setting = Setting()                         # what nas.search builds its table with
    table = build_space_table(space, LatencyTable.empty(setting), log=lambda s: None)
    path = table.save(tmp_path / "table.json")
    prices = sorted(table.price_meme(c).ms_mean for c in random_candidates(space, 20, seed=0))
    budget = round(prices[2 * len(prices) // 5], 3)    # most candidates are over it, some within
    out = tmp_path / "out"
    rc = search.main(["--space", space.source, "--budget-ms", str(budget), "--latency-table", str(path),
                      "--executor", "optuna", "--trials", "6", "--out", str(out), "--study", "s", "--quiet",
                      "--no-reference", "--rerank-top", "0"])
    assert rc == 0
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 's' / 'optuna.db'}")
    trials = study.get_trials()
    assert study.user_attrs["budget_ms"] == budget and study.user_attrs["budget_gflops"] is None
    rejected = [t for t in trials if t.user_attrs["latency_ms"] > budget]
    trained = [t for t in trials if t.user_attrs["trained_steps"] > 0]
    assert rejected
    for t in rejected:
        assert t.state == TrialState.PRUNED and t.user_attrs["trained_steps"] == 0 and "wall_s" not in t.user_attrs
        assert t.user_attrs["status"] == f"rejected: over budget by {t.user_attrs['latency_ms'] - budget:.2f} ms"
        assert t.user_attrs["constraint"] == pytest.approx(t.user_attrs["latency_ms"] - budget)
    for t in trained:
        assert t.user_attrs["latency_ms"] <= budget
        assert t.user_attrs["latency_device"] == table.meta["device"]
    df = pd.read_csv(out / "s" / "trials.csv")
    assert {"latency_ms", "latency_device", "latency_measured_ms"} <= set(df.columns)
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert df["latency_measured_ms"].notna().sum() == min(len(finished), 3)   # the finalists were timed whole


def test_impossible_budget_ms_is_one_line(cache, tmp_path, capsys):
    space = load_space("tiny")
    table = build_space_table(space, LatencyTable.empty(Setting()), log=lambda s: None)
    path = table.save(tmp_path / "table.json")
    fastest = min(table.price_meme(c).ms_mean for c in random_candidates(space, 12, seed=0))
    rc = search.main(["--space", TINY, "--budget-ms", f"{fastest / 10:.4f}", "--latency-table", str(path),
                      "--executor", "optuna", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is below the fastest candidate" in err[0]
    assert search.main(["--space", TINY, "--budget-ms", "-1"]) == 2
