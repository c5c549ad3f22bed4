"""nas.engine.dashboard: finds studies, refuses missing ones without creating files; and the
dashboard checked in a real headless Chromium (skipped, with the reason, where absent)."""
from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest

from nas import search
from nas.engine import dashboard

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tools"))
import dashboard_check  # noqa: E402


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dash")
    assert search.main(["--space", "tiny", "--budget-gflops", "0.3", "--executor", "optuna", "--trials", "6",
                        "--out", str(out), "--study", "tinydash", "--quiet", "--rerank-top", "0"]) == 0
    return out


def test_finds_a_study_by_name_dir_or_file(tiny_study):
    db = (tiny_study / "tinydash" / "optuna.db").resolve()
    want = f"sqlite:///{db}"
    assert dashboard.resolve_storage("tinydash", results=tiny_study) == want
    assert dashboard.resolve_storage(str(tiny_study / "tinydash")) == want
    assert dashboard.resolve_storage(str(db)) == want
    assert dashboard.resolve_storage("postgresql+psycopg://u@127.0.0.1/db") == "postgresql+psycopg://u@127.0.0.1/db"


def test_the_curated_default_study_ships_its_database(tmp_path):
    """A fresh clone has no results/<study>/ of its own: the curated copy is found and opens."""
    (tmp_path / "curated").symlink_to(REPO / "results" / "curated")
    url = dashboard.resolve_storage(dashboard.DEFAULT_STUDY, results=tmp_path)
    assert url.endswith("results/curated/meme-ffhq256-b95/optuna.db")
    study = optuna.load_study(study_name=dashboard.DEFAULT_STUDY, storage=url)
    assert study.metric_names == ["held-out loss"] and len(study.trials) >= 20
    assert all("status" in t.user_attrs and "expert_1" in t.user_attrs for t in study.trials)


def test_missing_study_is_one_line_and_creates_nothing(tmp_path, capsys):
    assert dashboard.main(["nope", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no study database for 'nope'" in err[0]
    assert dashboard.main([f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert list(tmp_path.iterdir()) == []  # no empty database left behind


@pytest.mark.browser
def test_dashboard_in_a_real_browser(tiny_study, tmp_path):
    why = dashboard_check.available()
    if why:
        pytest.skip(f"browser check needs Chromium: {why}")
    db = tiny_study / "tinydash" / "optuna.db"
    results = dashboard_check.check(str(db), tmp_path / "shots", dashboard_check.expectations(db))
    failed = [what for what, ok in results if not ok]
    assert not failed, failed
    assert all((tmp_path / "shots" / f).stat().st_size > 10_000 for f in ("1-study-list.png", "2-study.png",
                                                                           "3-trials.png"))
