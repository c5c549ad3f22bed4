"""The search end to end on the tiny space: real SQLite, real local Ray, real dashboard.

Properties checked on every study: no over-budget candidate was ever trained, every
trained one was within budget, attributes are recorded, outputs exist and load.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from meme.model.config import MemeConfig
from meme.training.distributed import free_local_port
from nas import search
from nas.evaluators.supernet_training import train_all
from tests.nas.evaluators.test_supernet_search import spawned_workers
from nas.space.budget import cheapest_config
from nas.space.space import load_space

REPO = Path(__file__).resolve().parents[3]
PY = sys.executable
TINY = str(REPO / "search_spaces" / "tiny.yaml")
ATTRS = ("gflops", "gflops_per_expert", "params", "config_yaml", "stopped_early", "trained_steps", "constraint")
TOTAL_STEPS = 24   # tiny.yaml proxy.steps: optimizer steps in all, whatever N
FIRST_RUNG = 8     # max(steps / 3, warmup) rounded up to a report (eval_every 4)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _budget() -> float:
    """Between the cheapest tiny candidate and the wide ones: some rejections are certain."""
    _, cmin = cheapest_config(load_space("tiny"))
    return round(cmin * 2.0, 3)


def _study(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / name / 'optuna.db'}")


def _check_readable(t) -> None:
    """What a person sees in the dashboard: the decoded design, and what happened to it."""
    cfg = MemeConfig.from_yaml(t.user_attrs["config_yaml"])
    assert t.user_attrs["N"] == cfg.num_experts
    assert t.user_attrs["params_M"] == pytest.approx(t.user_attrs["params"] / 1e6, abs=0.01)
    for n, e in enumerate(cfg.experts, 1):
        assert t.user_attrs[f"expert_{n}"] == " ".join(e.high_ratios)
    assert t.user_attrs["p_n"] == " ".join(f"{p:g}" for p in cfg.resolved_probs())
    assert t.user_attrs["boundaries"].split() == [str(b) for b in cfg.resolved_boundaries()]
    # the constraint in the list form optuna-dashboard reads, and Optuna's samplers too
    assert t.system_attrs["constraints"] == [t.user_attrs["constraint"]]
    assert list(t.constraints.values()) == [t.user_attrs["constraint"]]


def _check_budget_respected(study: optuna.Study, budget: float) -> None:
    assert study.metric_names[0] == "held-out loss"
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL and "interrupted" in t.user_attrs.get("fail_reason", ""):
            assert t.user_attrs["status"] == "failed: interrupted"
            continue
        for k in ATTRS:
            assert k in t.user_attrs, f"trial {t.number} lacks {k}"
        if t.state != TrialState.FAIL:
            _check_readable(t)
        status = t.user_attrs["status"]
        over = t.user_attrs["gflops"] > budget
        assert over == (t.user_attrs["constraint"] > 0)
        if over:  # never trained
            assert t.state == TrialState.PRUNED and t.user_attrs["trained_steps"] == 0
            assert not t.intermediate_values
            assert status == f"rejected: over budget by {t.user_attrs['gflops'] - budget:.2f} GFLOPs"
        elif t.state == TrialState.COMPLETE and "duplicate_of" in t.user_attrs:
            twin = study.trials[t.user_attrs["duplicate_of"]]  # reused, not retrained
            assert status == f"duplicate of #{twin.number}"
            assert t.user_attrs["trained_steps"] == 0 and t.values == twin.values
            assert t.user_attrs["config_hash"] == twin.user_attrs["config_hash"]
        elif t.state == TrialState.COMPLETE:  # fully trained: the same training compute whatever N
            assert t.user_attrs["train_steps_total"] == t.user_attrs["trained_steps"] == TOTAL_STEPS
            assert t.user_attrs["train_gflops_total"] > 0 and not t.user_attrs["stopped_early"]
            assert status == "trained" and max(t.intermediate_values, default=TOTAL_STEPS) == TOTAL_STEPS
            for k in ("wall_s", "peak_mem_mb", "device"):
                assert k in t.user_attrs
        elif t.state == TrialState.PRUNED:  # stopped by the scheduler, never before the first rung
            assert t.user_attrs["stopped_early"]
            last = max(t.intermediate_values)
            assert FIRST_RUNG <= last < TOTAL_STEPS and t.user_attrs["trained_steps"] == last
            assert status == f"stopped early at step {last}"
        elif t.state == TrialState.FAIL:
            assert status == f"failed: {t.user_attrs['fail_reason']}"


def _run(argv: list[str]) -> int:
    return search.main(argv)


@pytest.fixture(scope="module")
def optuna_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("optuna")
    budget = _budget()
    rc = _run(["--space", TINY, "--budget-gflops", str(budget), "--executor", "optuna", "--trials", "8",
               "--out", str(out), "--study", "s", "--quiet", "--rerank-top", "2", "--rerank-seeds", "2"])
    assert rc == 0
    return out, budget


def test_optuna_executor_outputs(optuna_study):
    out, budget = optuna_study
    study = _study(out, "s")
    trials = study.get_trials()
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 8
    assert study.user_attrs["space"] == "tiny"  # a shipped space by name: the DB opens on any install
    assert any(t.user_attrs["constraint"] > 0 for t in trials)    # the budget did reject some
    assert any(t.state == TrialState.COMPLETE for t in trials)
    # the pruner did stop some (PRUNED, with their values), and they are not mistaken for rejections
    stopped = [t for t in trials if t.state == TrialState.PRUNED and t.user_attrs["constraint"] <= 0]
    assert stopped and all(t.intermediate_values for t in stopped)
    _check_budget_respected(study, budget)
    d = out / "s"
    df = pd.read_csv(d / "trials.csv")
    assert len(df) == len(trials) and {"gflops", "status", "ratios", "train_steps_total",
                                       "train_gflops_total"} <= set(df.columns)
    assert set(df.loc[df.status == "complete", "train_steps_total"]) == {TOTAL_STEPS}
    assert (df.loc[df.status == "stopped", "train_steps_total"] < TOTAL_STEPS).all()
    assert (d / "pareto.png").stat().st_size > 1000
    best = MemeConfig.load(d / "best.yaml")
    best_trial = min((t for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs["stopped_early"]),
                     key=lambda t: t.value)
    assert best.hash() == MemeConfig.from_yaml(best_trial.user_attrs["config_yaml"]).hash()
    ref = json.loads((d / "reference.json").read_text())
    assert ref["name"] == "tiny-hand" and ref["objective"] > 0 and ref["trained_steps"] == TOTAL_STEPS
    # intermediate values sit at optimizer steps, every eval_every = 4
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert set(t.intermediate_values) <= set(range(4, TOTAL_STEPS + 1, 4))


def test_search_ends_with_a_rerank_on_fresh_seeds(optuna_study):
    out, _ = optuna_study
    rr = json.loads((out / "s" / "rerank.json").read_text())
    assert rr["seeds"] == [1, 2]                    # not the search's seed 0
    names = [r["name"] for r in rr["designs"]]
    assert names[0] == "tiny-hand" and len(names) == 3 and all(n.startswith("trial ") for n in names[1:])
    for row in rr["designs"]:
        assert row["n"] == 2 and row["train_steps_total"] == [TOTAL_STEPS]
        assert row["mean"] == pytest.approx(np.mean(row["values"]))
        assert row["std"] == pytest.approx(np.std(row["values"], ddof=1))
    for row in rr["designs"][1:]:
        assert row["vs_first"]["diff"] == pytest.approx(row["mean"] - rr["designs"][0]["mean"])
        assert row["vs_first"]["verdict"] in ("better", "worse", "cannot tell apart")


def test_export_writes_the_ranked_config(optuna_study, tmp_path):
    out, _ = optuna_study
    r = subprocess.run([PY, "-m", "nas.promote.export", "--study", str(out / "s"), "--rank", "1", "--out",
                        str(tmp_path / "x.yaml")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert MemeConfig.load(tmp_path / "x.yaml").hash() == MemeConfig.load(out / "s" / "best.yaml").hash()


def test_dashboard_serves_the_study(optuna_study):
    out, _ = optuna_study
    exe = Path(PY).parent / "optuna-dashboard"
    port = free_local_port()
    proc = subprocess.Popen([str(exe), f"sqlite:///{out / 's' / 'optuna.db'}", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body, deadline = None, time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, "dashboard did not answer"
        assert "s" in [s["study_name"] for s in body["study_summaries"]]
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_multi_objective_pareto(tmp_path):
    budget = _budget()
    rc = _run(["--space", TINY, "--budget-gflops", str(budget), "--executor", "optuna", "--trials", "4",
               "--objectives", "loss,gflops", "--out", str(tmp_path), "--study", "mo", "--no-reference", "--quiet", "--rerank-top", "0"])
    assert rc == 0
    study = _study(tmp_path, "mo")
    assert len(study.directions) == 2
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert done and all(t.values[1] == pytest.approx(t.user_attrs["gflops"]) for t in done)
    _check_budget_respected(study, budget)
    assert (tmp_path / "mo" / "pareto.png").exists()


def _nan_space(tmp_path: Path) -> str:
    """The tiny space on a data file full of NaN: every trained trial diverges at step 1."""
    np.save(tmp_path / "nan.npy", np.full((400, 1, 16, 16), np.nan, dtype=np.float32))
    text = Path(TINY).read_text().replace("data: fashion-mnist", f"data: {tmp_path / 'nan.npy'}")
    (tmp_path / "nan.yaml").write_text(text)
    return str(tmp_path / "nan.yaml")


def test_failing_trials_are_recorded_and_the_search_goes_on(tmp_path):
    rc = _run(["--space", _nan_space(tmp_path), "--budget-gflops", "100", "--executor", "optuna", "--trials", "2",
               "--out", str(tmp_path), "--study", "nan", "--no-reference", "--quiet", "--rerank-top", "0"])
    assert rc == 0
    trials = _study(tmp_path, "nan").get_trials()
    fails = [t for t in trials if t.state == TrialState.FAIL]
    assert len(fails) >= 2  # it kept going after the first failure
    for t in fails:
        assert "TrialDiverged" in t.user_attrs["fail_reason"] and "nan" in t.user_attrs["fail_reason"]
        assert t.user_attrs["status"] == f"failed: {t.user_attrs['fail_reason']}"


def _states_readonly(db: Path) -> list[str]:
    import sqlite3
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return [r[0] for r in con.execute("SELECT state FROM trials")]
        finally:
            con.close()
    except sqlite3.Error:  # tables not created yet, or locked for a moment
        return []


def test_kill_9_then_resume_keeps_finished_trials(tmp_path):
    budget = _budget()
    cmd = [PY, "-m", "nas.search", "--space", TINY, "--budget-gflops", str(budget), "--executor", "optuna",
           "--trials", "6", "--out", str(tmp_path), "--study", "k", "--no-reference", "--quiet", "--rerank-top", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "k" / "optuna.db"
    finished = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            states = _states_readonly(db)  # never write to the DB the search is creating
            finished = [s for s in states if s in ("COMPLETE", "PRUNED")]
            if finished and "RUNNING" in states:
                break
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert finished, "no trial finished before the kill"
    before = {t.number: (t.state, t.values, t.user_attrs.get("config_hash")) for t in _study(tmp_path, "k").get_trials()
              if t.state.is_finished()}
    # without --resume the study is protected
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr
    assert _run([*cmd[3:], "--resume"]) == 0  # fails the killed run's trials once they are stale
    after = {t.number: t for t in _study(tmp_path, "k").get_trials()}
    for n, (state, values, h) in before.items():
        assert after[n].state == state and after[n].values == values and after[n].user_attrs["config_hash"] == h
    counted = [t for t in after.values() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 6
    interrupted = [t for t in after.values() if t.state == TrialState.FAIL]
    assert interrupted and not [t for t in after.values() if t.state == TrialState.RUNNING]
    assert all("interrupted" in t.user_attrs["fail_reason"] for t in interrupted)
    assert all(t.user_attrs["status"] == "failed: interrupted" for t in interrupted)


def test_heartbeat_keeps_live_trials_and_fails_stale_ones(tmp_path):
    """Another driver's live trial is never failed; one nobody stamps is, once stale."""
    from nas.engine.heartbeat import Heartbeat, fail_stale_running
    from nas.engine.study import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'hb.db'}")
    study = optuna.create_study(storage=storage, study_name="hb")
    live, orphan = study.ask(), study.ask()
    with Heartbeat(storage, "hb", interval=0.1, stale_after=1.5) as beat:
        beat.add(live.number)
        time.sleep(2.5)  # the orphan's start is now older than stale_after; live was stamped
        assert beat.cleaned == [orphan.number]  # the heartbeat's own sweep found it
        assert fail_stale_running(storage, "hb", stale_after=1.5) == []  # and nothing else is stale
    states = {t.number: t for t in study.get_trials()}
    assert states[live.number].state == TrialState.RUNNING
    assert states[orphan.number].state == TrialState.FAIL
    assert states[orphan.number].user_attrs["status"] == "failed: interrupted"


@pytest.mark.parametrize("argv, needle", [
    (["--space", "no-such-space", "--budget-gflops", "95"], "search space not found"),
    (["--budget-gflops", "-3"], "positive"),
    (["--space", "tiny", "--budget-gflops", "0.001"], "cheapest candidate"),
    (["--budget-gflops", "95", "--executor", "dask"], "--executor"),
    (["--budget-gflops", "95", "--executor", "ray", "--address", "127.0.0.1:1"], "cannot join Ray cluster"),
    (["--budget-gflops", "95", "--objectives", "gflops,loss"], "objectives"),
    (["--budget-gflops", "95", "--bogus"], "unrecognized"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path):
    rc = _run([*argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_malformed_space_yaml_exits_2_from_the_shell(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsearch: {num_experts: [2, 3\n")
    r = subprocess.run([PY, "-m", "nas.search", "--space", str(bad), "--budget-gflops", "95", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "malformed YAML" in lines[0]


# ---- Ray ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_executor(local_ray, tmp_path):
    budget = _budget()
    rc = _run(["--space", TINY, "--budget-gflops", str(budget), "--executor", "ray", "--trials", "6",
               "--out", str(tmp_path), "--study", "r", "--quiet", "--rerank-top", "0"])
    assert rc == 0
    assert local_ray.is_initialized()  # the search did not shut down a Ray it did not start
    study = _study(tmp_path, "r")
    trials = study.get_trials()
    assert len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 6
    _check_budget_respected(study, budget)
    for t in trials:
        if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs:
            last = max(t.intermediate_values)  # the final value is stored at its real step
            assert t.intermediate_values[last] == pytest.approx(t.value)
            assert last == TOTAL_STEPS and t.user_attrs["trained_steps"] == TOTAL_STEPS
    # ASHA-stopped trials are PRUNED (checked in _check_budget_respected), never COMPLETE
    assert not [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs["stopped_early"]]
    assert (tmp_path / "r" / "best.yaml").exists() and (tmp_path / "r" / "reference.json").exists()
    # over-budget and duplicate candidates are recorded on the driver, never scheduled as Tune trials
    settled = [t for t in trials if t.user_attrs.get("constraint", 0) > 0 or "duplicate_of" in t.user_attrs]
    assert settled, "this seed proposes an over-budget and a duplicate candidate"
    scheduled = [p for p in (tmp_path / "r" / "ray" / "r").iterdir() if p.is_dir() and p.name.startswith("trainable")]
    assert len(scheduled) == len(trials) - len(settled)


def test_ray_executor_with_the_supernet_evaluator(local_ray, tmp_path, monkeypatch):
    """A supernet score is one report at budget step 0: through Ray it is COMPLETE with the
    evaluator's record, as through Optuna, and a relative --supernet reaches the workers."""
    train_all("tiny", tmp_path / "sn", 2, jobs=1, progress=False)
    monkeypatch.chdir(tmp_path)
    rc = _run(["--space", TINY, "--budget-gflops", "1", "--executor", "ray", "--trials", "4", "--supernet", "sn",
               "--out", str(tmp_path), "--study", "rs", "--quiet", "--rerank-top", "0", "--no-reference"])
    assert rc == 0
    scored = [t for t in _study(tmp_path, "rs").get_trials() if "duplicate_of" not in t.user_attrs
              and t.user_attrs.get("constraint", 0) <= 0]
    assert scored and all(t.state == TrialState.COMPLETE for t in scored)
    assert all(t.user_attrs["evaluator"] == "supernet" and t.user_attrs["trained_steps"] == 0 for t in scored)
    assert all(len(t.user_attrs["interval_losses"]) == load_space(TINY).proxy.eval_timesteps for t in scored)


def test_ray_failures_are_recorded(local_ray, tmp_path):
    rc = _run(["--space", _nan_space(tmp_path), "--budget-gflops", "100", "--executor", "ray", "--trials", "2",
               "--out", str(tmp_path), "--study", "rn", "--no-reference", "--quiet", "--rerank-top", "0"])
    assert rc == 0
    fails = [t for t in _study(tmp_path, "rn").get_trials() if t.state == TrialState.FAIL]
    assert len(fails) == 2
    assert all("TrialDiverged" in t.user_attrs["fail_reason"] for t in fails)
    assert all(t.user_attrs["status"].startswith("failed: TrialDiverged") for t in fails)


def test_reproposed_design_is_not_retrained(tmp_path):
    """A space with two designs: from the third trial on, results are reused."""
    text = Path(TINY).read_text()
    for old, new in (("num_experts: [1, 2, 3]", "num_experts: [1]"), ("base_channels: [16, 32]", "base_channels: [16]"),
                     ("choices: [0.2, 0.5, 1.0]", "choices: [1.0]"), ("mode: searchable", "mode: uniform")):
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "two.yaml").write_text(text)
    rc = _run(["--space", str(tmp_path / "two.yaml"), "--budget-gflops", "100", "--executor", "optuna",
               "--trials", "5", "--out", str(tmp_path), "--study", "two", "--no-reference", "--quiet", "--rerank-top", "0"])
    assert rc == 0
    study = _study(tmp_path, "two")
    dups = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert len(dups) >= 1
    _check_budget_respected(study, 100)
    assert len({t.user_attrs["config_hash"] for t in study.trials if "duplicate_of" not in t.user_attrs
                and t.state == TrialState.COMPLETE}) == len([t for t in study.trials if "duplicate_of" not in t.user_attrs
                                                            and t.state == TrialState.COMPLETE])


def test_trials_stop_early_enough_for_the_rerank():
    """The whole job fits the time budget: the trials' deadline keeps back the re-rank's waves."""
    from nas.engine.settings import Deadline
    study = optuna.create_study()
    for wall, dup in ((10.0, None), (20.0, None), (30.0, None), (500.0, 1)):   # a duplicate did not train
        t = study.ask()
        t.set_user_attr("wall_s", wall)
        if dup is not None:
            t.set_user_attr("duplicate_of", dup)
        study.tell(t, 1.0)
    # median trained trial 20 s; 4 re-rank runs on 2 cores = 2 waves, plus the trials still running: 3 x 20 x 1.25
    assert search.rerank_reserve(study, runs=4, jobs=2) == pytest.approx(75.0)
    assert search.rerank_reserve(optuna.create_study(), runs=4, jobs=2) == 0.0    # nothing measured yet
    scored = optuna.create_study()          # supernet scores train nothing: a re-rank run is priced apart
    t = scored.ask()
    t.set_user_attr("wall_s", 0.5)
    t.set_user_attr("evaluator", "supernet")
    scored.tell(t, 1.0)
    assert search.rerank_reserve(scored, runs=4, jobs=2) == 0.0
    assert search.rerank_reserve(scored, runs=4, jobs=2, scratch_s=40.0) == pytest.approx(2 * 40 * 1.25)
    index = {"macros": {"a": {"wall_s": 100.0, "steps": 100, "subnets_per_step": 4},      # 0.25 s per step
                        "b": {"wall_s": 200.0, "steps": 100, "subnets_per_step": 4},      # 0.5
                        "c": {"wall_s": 400.0, "steps": 100, "subnets_per_step": 4}}}     # 1.0
    assert search.scratch_run_s(index, steps=160) == pytest.approx(0.5 * 160)
    job = Deadline(100.0)
    trials = job.holding_back(lambda: search.rerank_reserve(study, runs=4, jobs=2))
    assert trials.left() == pytest.approx(25.0, abs=1.0) and job.left() == pytest.approx(100.0, abs=1.0)
    assert Deadline(None).left() is None


def test_trained_trials_run_at_once_and_are_pruned_by_the_engine(tmp_path):
    """--trials-at-once 2: two trial processes train side by side (their runs overlap in
    time); every report crosses to the engine, which records it and answers with its pruner,
    so the study holds what the serial loop would: intermediate values at every
    eval_every, trials stopped at a rung, budgets respected."""
    budget = _budget()
    rc = _run(["--space", TINY, "--budget-gflops", str(budget), "--executor", "optuna", "--trials", "8",
               "--trials-at-once", "2", "--out", str(tmp_path), "--study", "par", "--no-reference", "--quiet",
               "--rerank-top", "0"])
    assert rc == 0
    study = _study(tmp_path, "par")
    _check_budget_respected(study, budget)
    trained = [t for t in study.get_trials() if t.user_attrs.get("trained_steps", 0) > 0]
    assert len(trained) >= 3
    assert all(sorted(t.intermediate_values) == list(range(4, max(t.intermediate_values) + 1, 4)) for t in trained)
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trained)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two trials trained at the same time"
    assert len([t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 8


def test_a_killed_trial_worker_fails_its_trial_and_the_search_goes_on_one_at_a_time(tmp_path):
    """kill -9 of a trial worker (not the queue manager, spawned before the workers): the
    trials the broken pool held FAIL, the rest train in this process, nothing stays RUNNING."""
    args = ["--space", TINY, "--budget-gflops", "100", "--executor", "optuna", "--trials", "6", "--trials-at-once",
            "2", "--out", str(tmp_path), "--study", "killed", "--rerank-top", "0", "--no-reference", "--quiet"]
    killed: list[int] = []
    stop = threading.Event()

    def kill_a_worker():                       # bounded: 240 s, or until the search returns
        end = time.monotonic() + 240
        while not killed and not stop.is_set() and time.monotonic() < end:
            pids = spawned_workers()
            if len(pids) >= 3:                 # the manager and both pool workers are up
                os.kill(max(pids), signal.SIGKILL)
                killed.append(max(pids))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    try:
        rc = _run(args)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "no trial worker was seen to kill"
    assert rc == 0
    study = _study(tmp_path, "killed")
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and all("BrokenProcessPool" in t.user_attrs["fail_reason"]
                          or "trial worker died" in t.user_attrs["fail_reason"] for t in failed)
    after = [t for t in study.trials if t.number > max(f.number for f in failed) and t.state == TrialState.COMPLETE
             and "duplicate_of" not in t.user_attrs]
    assert after, "nothing was trained after the worker died"
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]


def test_a_report_that_arrives_after_its_trial_left_the_pool_is_dropped():
    """A worker's last report can reach the queue after its trial finished and left ``live``:
    the engine drops it and answers the reports of trials still in the pool."""
    import queue

    from nas.engine.optuna_engine import _answer_reports

    requests, answers = queue.Queue(), queue.Queue()
    requests.put((7, 3, 0.25))                 # trial 7 is gone
    live = {}
    _answer_reports(None, requests, live)      # no KeyError, nothing left waiting
    assert requests.empty() and answers.empty()
