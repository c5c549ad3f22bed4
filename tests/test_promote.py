"""Promotion and the Table-1 comparison end to end on the tiny space: a real search,
real trainings on Fashion-MNIST, real sampling and a real FID (tiny sizes)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from meme.cli import UserError
from meme.config import MemeConfig
from nas import compare, promote, search
from nas.promote import Design, check_target_data
from nas.space import load_space

REPO = Path(__file__).resolve().parent.parent
TINY = load_space("tiny")
STEPS = TINY.promote.steps  # tiny.yaml promote.steps


@pytest.fixture(autouse=True)
def _private_caches(tmp_path_factory, monkeypatch):
    """FID statistics and MAC counts in a private folder (subprocesses inherit it)."""
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("MEME_CACHE_DIR", str(root / "meme-cache"))
    monkeypatch.setenv("MEME_MACS_CACHE", str(root / "macs-cache"))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("promote")
    rc = search.main(["--space", "tiny", "--budget-gflops", "1", "--executor", "optuna", "--trials", "3",
                      "--out", str(out), "--study", "s", "--quiet", "--rerank-top", "1", "--rerank-seeds", "2"])
    assert rc == 0
    return out / "s"


def _trained_steps(run: Path) -> int:
    return int(pd.read_csv(run / "metrics.csv").step.max())


def test_promote_trains_samples_and_scores_on_the_target_data(tiny_study):
    out = tiny_study / "promoted"
    assert promote.main(["--study", str(tiny_study), "--top", "1", "--jobs", "2"]) == 0
    runs = pd.read_csv(out / "promoted.csv")
    assert sorted(runs.design) == ["rank1", "reference-tiny-hand"]
    for row in runs.itertuples():
        run = Path(row.run)
        # the target's data and shape, not the proxy's, and the same steps whatever N
        opts = json.loads((run / "options.json").read_text())
        assert opts["data"] == "fashion-mnist" and opts["steps"] == STEPS and opts["seed"] == 1
        assert MemeConfig.load(run / "config.yaml").data == TINY.data
        assert _trained_steps(run) == STEPS
        ev = json.loads((run / "eval.json").read_text())
        assert ev["n"] == TINY.promote.fid_samples and ev["n_ref"] == TINY.promote.fid_reference
        assert ev["resolution"] == TINY.data.resolution and 0 < row.fid == ev["fid"]
    assert "fid_mean" in (out / "promoted.md").read_text()


def test_promote_resumes_without_redoing_finished_stages(tiny_study):
    logs = sorted((tiny_study / "promoted").glob("*/seed1/promote.log"))
    before = [p.read_text() for p in logs]
    assert promote.main(["--study", str(tiny_study), "--top", "1"]) == 0
    assert [p.read_text() for p in logs] == before  # no stage ran again


def test_promote_refuses_a_run_trained_with_other_settings(tiny_study, capsys):
    assert promote.main(["--study", str(tiny_study), "--top", "1", "--steps", str(STEPS + 1)]) == 2
    assert "was trained with other settings" in capsys.readouterr().err


def test_latent_target_without_latent_data_is_refused_before_anything_is_written(tmp_path):
    study = REPO / "results" / "curated" / "meme-ffhq256-b95"  # a real study of a 3x64x64 latent target
    out = tmp_path / "promoted"
    proc = subprocess.run([sys.executable, "-m", "nas.promote", "--study", str(study), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "latent" in lines[0] and "--data" in lines[0]
    assert not out.exists()


def test_latent_target_refuses_images_and_latents_it_cannot_decode(tmp_path):
    cfg = load_space("meme_ffhq256").reference_config()
    with pytest.raises(UserError, match="not a latent file"):
        check_target_data(cfg, "fashion-mnist")
    import numpy as np
    np.save(tmp_path / "latents.npy", np.zeros((4, 3, 64, 64), dtype=np.float32))
    with pytest.raises(UserError, match="without autoencoder metadata"):  # FID needs the decoder
        check_target_data(cfg, str(tmp_path / "latents.npy"))
    # accepted with the record (tests/test_autoencoder.py); the shape is checked when loaded


def test_compare_four_designs_at_equal_cost(tiny_study):
    out = tiny_study / "compare"
    # tiny's search mixes base widths, so its winner may cost more or less than the hand design
    assert compare.main(["--study", str(tiny_study), "--seeds", "2", "--jobs", "2", "--tolerance", "10"]) == 0
    df = pd.read_csv(out / "comparison.csv")
    assert list(df.design) == ["single", "multi-expert", "hand", "search"]
    assert list(df.N[:3]) == [1, 2, 2]
    assert (df.seeds == 2).all() and (df.train_images == STEPS * TINY.promote.batch_size).all()
    assert (df.fid_mean > 0).all() and (df.sample_img_per_s > 0).all()
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 8 and sorted(set(runs.seed)) == [1, 2]
    hand = df.set_index("design").loc["hand"]
    assert hand.fid_mean == pytest.approx(runs[runs.design == "hand"].fid.mean())
    assert hand.fid_std == pytest.approx(runs[runs.design == "hand"].fid.std())
    for d in df.design:
        assert (out / "grids" / f"{d}.png").is_file()
    assert (out / "comparison.png").is_file() and "| single |" in (out / "comparison.md").read_text()
    rec = json.loads((out / "comparison.json").read_text())
    assert [d["design"] for d in rec["designs"]] == list(df.design) and len(rec["runs"]) == 8
    assert rec["recipe"]["steps"] == STEPS
    # single and multi-expert share the hand design's middle expert
    single = MemeConfig.load(out / "runs" / "single" / "seed1" / "design.yaml")
    multi = MemeConfig.load(out / "runs" / "multi-expert" / "seed1" / "design.yaml")
    assert multi.experts == (single.experts[0],) * 2


def test_compare_refuses_unequal_cost_and_a_single_seed(tiny_study, capsys):
    hand = TINY.reference_config()
    wide = MemeConfig.from_dict({**hand.to_dict(), "name": "wide",
                                 "experts": [{**e, "base_channels": 64} for e in hand.to_dict()["experts"]]}, "t")
    with pytest.raises(UserError, match="not at equal per-step cost"):
        compare.check_equal_cost([Design("hand", hand), Design("search", wide)], 0.05)
    gflops = compare.check_equal_cost([Design("hand", hand), Design("search", hand)], 0.05)
    assert gflops["search"] == gflops["hand"] > 0
    assert compare.main(["--study", str(tiny_study), "--seeds", "1"]) == 2
    assert "--seeds must be >= 2" in capsys.readouterr().err
