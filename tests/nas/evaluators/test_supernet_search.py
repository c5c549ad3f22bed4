"""Supernet training -> weight-shared search -> re-rank on the tiny space; the exact interval optimiser."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch

from meme.common.fastpath import fast_path
from meme.model.config import MemeConfig
from meme.model.diffusion import Diffusion
from meme.model.experts import MultiExpertDenoiser
from meme.model.supernet import SuperNet, load_index, load_supernet
from nas import search
from nas.engine import optuna_engine
from nas.engine.interval_opt import optimise
from nas.engine.replicates import default_jobs
from nas.engine.study import make_sampler
from nas.evaluators.supernet_score import SharedScorer
from nas.evaluators.supernet_training import train_all
from nas.space.budget import cost_of
from nas.space.draw import FixedTrial, build_config, encode
from nas.space.proxy import proxy_arch
from nas.space.proxy_data import eval_timesteps, heldout_images, heldout_loss
from nas.space.space import load_space
from tests.nas.evaluators.exhaustive import brute_force_optimum
from tests.tiny_models import single_thread


@pytest.fixture(scope="module")
def tiny_supernet(tmp_path_factory):
    """One thread while this module's tests run (tiny models), restored for the next module."""
    with single_thread():
        out = tmp_path_factory.mktemp("supernet")
        train_all("tiny", out, 4, jobs=1, progress=False)
        yield out


def test_training_resumes_and_extends(tiny_supernet, tmp_path):
    out = tmp_path / "sn"
    train_all("tiny", out, 2, jobs=1, progress=False, macros="16:1")
    first = load_index(out)["macros"]["b16-r1"]
    train_all("tiny", out, 5, jobs=1, progress=False, macros="16:1")
    again = load_index(out)["macros"]["b16-r1"]
    rows = list(csv.DictReader(open(out / "b16-r1" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]      # continued, nothing retrained
    assert again["steps"] == 5 and again["train_gflops"] > first["train_gflops"] > 0
    # training GFLOPs by hand: 4 sub-networks x 3 (fwd+bwd) x batch x forward GFLOPs, summed over steps
    assert float(rows[-1]["train_gflops"]) == pytest.approx(again["train_gflops"], rel=1e-3)
    state = torch.load(out / "b16-r1" / "checkpoint.pt", weights_only=True)   # nothing in it runs code
    assert state["step"] == 5


def test_shared_score_is_the_proxy_objective_of_the_inherited_experts(tiny_supernet):
    """The cached per-(t, sub-network) terms give exactly heldout_loss of a MEME of extracted experts."""
    space = load_space("tiny")
    scorer = SharedScorer(tiny_supernet, space.proxy)
    cfg = build_config(FixedTrial({"num_experts": 2, "w0": 1, "w1": 2}), space)
    got = scorer.score(cfg)
    assert got.evaluated == space.proxy.eval_timesteps and got.cached == 0
    entry = scorer.index["macros"][got.supernet["macro"]]
    sn: SuperNet = load_supernet(tiny_supernet, entry, torch.device("cpu"))
    experts = [sn.extract(proxy_arch(a, space.proxy)) for a in cfg.experts]
    model = MultiExpertDenoiser(experts, cfg.resolved_boundaries())
    p = space.proxy
    val = heldout_images(p)
    want = heldout_loss(model, Diffusion(space.diffusion), val, eval_timesteps(1000, p.eval_timesteps), p.seed,
                        torch.device("cpu"), fast_path("cpu", p.precision, model))
    assert got.objective == pytest.approx(want, rel=1e-5)
    again = SharedScorer(tiny_supernet, space.proxy).score(cfg)   # a new process: the disk cache answers
    assert again.evaluated == 0 and again.objective == got.objective


def test_interval_optimiser_matches_brute_force(tiny_supernet):
    space = load_space("tiny")
    scorer = SharedScorer(tiny_supernet, space.proxy)
    budget = 0.1
    res = optimise(space, scorer, budget, progress=False)
    best = brute_force_optimum(space, scorer, budget)
    assert best is not None and res["best"] is not None
    assert res["best"]["objective"] == pytest.approx(best[0], rel=1e-9)
    found = load_cfg(res["best"]["config_yaml"])
    encode(found, space)                                  # a member of the space, rules and all
    assert cost_of(found).gflops_mean <= budget
    assert scorer.score(found).objective == pytest.approx(best[0], rel=1e-9)


def test_interval_optimiser_against_a_search_with_the_same_supernet(tiny_supernet, tmp_path):
    from nas.engine import interval_opt
    common = ["--space", "tiny", "--budget-gflops", "0.1"]
    assert search.main([*common, "--executor", "optuna", "--supernet", str(tiny_supernet), "--trials", "6",
                        "--out", str(tmp_path), "--study", "vs", "--rerank-top", "0", "--no-reference", "--quiet"]) == 0
    assert interval_opt.main([*common, "--supernet", str(tiny_supernet), "--against", str(tmp_path / "vs"),
                              "--out", str(tmp_path / "opt"), "--quiet"]) == 0
    res = json.loads((tmp_path / "opt" / "optimum.json").read_text())
    (vs,) = res["against"]
    study = optuna.load_study(study_name="vs", storage=f"sqlite:///{tmp_path / 'vs' / 'optuna.db'}")
    assert vs["best_objective"] == pytest.approx(study.best_value) and vs["sampler"] == "nsga2"
    assert vs["gap_pct"] == pytest.approx(100 * (study.best_value / res["best"]["objective"] - 1))
    assert vs["gap_pct"] >= 0 and vs["trials"] == 6


def load_cfg(text):
    from meme.model.config import MemeConfig
    return MemeConfig.from_yaml(text)


def test_search_with_the_supernet_evaluator_then_rerank(tiny_supernet, tmp_path):
    rc = search.main(["--space", "tiny", "--budget-gflops", "1", "--executor", "optuna", "--supernet",
                      str(tiny_supernet), "--trials", "5", "--out", str(tmp_path), "--study", "sn",
                      "--rerank-top", "1", "--rerank-seeds", "1", "--quiet"])
    assert rc == 0
    study = optuna.load_study(study_name="sn", storage=f"sqlite:///{tmp_path / 'sn' / 'optuna.db'}")
    assert study.user_attrs["evaluator"] == "supernet" and study.user_attrs["sampler"] == "nsga2"
    assert study.user_attrs["supernet_digest"] == load_index(tiny_supernet)["digest"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and "duplicate_of" not in t.user_attrs]          # a duplicate reuses its twin's result
    assert done and all(t.user_attrs["evaluator"] == "supernet" for t in done)
    assert all(t.user_attrs["trained_steps"] == 0 for t in done)       # scored, not trained
    import json
    rerank = json.loads((tmp_path / "sn" / "rerank.json").read_text())
    # re-ranking trains from scratch: every run trained the proxy's full step count
    assert all(row["train_steps_total"] == [load_space("tiny").proxy.steps] for row in rerank["designs"]
               if row.get("n"))


def test_a_relative_supernet_path_reaches_workers_in_another_directory(tiny_supernet, tmp_path, monkeypatch):
    """Ray workers do not run in the driver's directory: --supernet is resolved before any trial."""
    monkeypatch.chdir(tiny_supernet.parent)
    args = search.parse_args(["--space", "tiny", "--budget-gflops", "1", "--supernet", tiny_supernet.name])
    space = search.with_evaluator(load_space("tiny"), args)
    monkeypatch.chdir(tmp_path)
    assert Path(space.proxy.supernet) == tiny_supernet.resolve()
    assert load_index(space.proxy.supernet)["digest"] == load_index(tiny_supernet)["digest"]


def test_a_supernet_study_resumes_from_another_path_to_the_same_supernet(tiny_supernet, tmp_path, monkeypatch):
    """The study compares the supernet's digest, not where it lies (a relative path, a moved checkout)."""
    monkeypatch.chdir(tiny_supernet.parent)
    common = ["--space", "tiny", "--budget-gflops", "1", "--executor", "optuna", "--out", str(tmp_path),
              "--study", "mv", "--rerank-top", "0", "--no-reference", "--quiet"]
    assert search.main(common + ["--supernet", tiny_supernet.name, "--trials", "2"]) == 0
    moved = tmp_path / "moved-supernet"
    shutil.copytree(tiny_supernet, moved)
    assert search.main(common + ["--supernet", str(moved), "--trials", "3", "--resume"]) == 0
    study = optuna.load_study(study_name="mv", storage=f"sqlite:///{tmp_path / 'mv' / 'optuna.db'}")
    assert len(study.trials) == 3


def test_nsga2_samples_under_the_supernet_evaluator_unless_told_otherwise(tiny_supernet, tmp_path):
    base = ["--space", "tiny", "--budget-gflops", "1", "--out", str(tmp_path)]

    def sampler(*argv):
        s, _ = search.make_settings(search.parse_args([*base, *argv]))
        return make_sampler(s)
    assert isinstance(sampler("--supernet", str(tiny_supernet)), optuna.samplers.NSGAIISampler)
    assert isinstance(sampler("--supernet", str(tiny_supernet), "--sampler", "tpe"), optuna.samplers.TPESampler)
    assert isinstance(sampler(), optuna.samplers.TPESampler)
    assert isinstance(sampler("--sampler", "nsga2"), optuna.samplers.NSGAIISampler)

    def first_draws(*argv):   # --sampler-seed seeds the sampler alone: the evaluator's seed stays the space's
        s, _ = search.make_settings(search.parse_args([*base, "--sampler", "random", *argv]))
        assert s.space.proxy.seed == load_space("tiny").proxy.seed
        study = optuna.create_study(sampler=make_sampler(s))
        return [study.ask().suggest_float("u", 0, 1) for _ in range(3)]
    mine = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7))
    assert first_draws("--sampler-seed", "7") == [mine.ask().suggest_float("u", 0, 1) for _ in range(3)]
    assert first_draws("--sampler-seed", "8") != first_draws("--sampler-seed", "7")


def test_search_refuses_a_missing_supernet(tmp_path, capsys):
    rc = search.main(["--space", "tiny", "--budget-gflops", "1", "--executor", "optuna", "--supernet",
                      str(tmp_path / "nope"), "--out", str(tmp_path), "--quiet"])
    assert rc == 2
    assert "not a trained supernet directory" in capsys.readouterr().err


def test_experts_start_from_a_trained_supernet_at_its_shape(tiny_supernet, tmp_path):
    """meme.training.train --init-from SUPERNET: each expert is its sub-network's slices; its compute is charged in full."""
    from meme.common.errors import UserError
    from meme.model.config import MemeConfig
    from meme.training.compute import source_tflops
    from meme.training.train import Trainer, TrainOptions

    entry = load_index(tiny_supernet)["macros"]["b16-r1"]
    sn: SuperNet = load_supernet(tiny_supernet, entry, torch.device("cpu"))
    archs = [sn.spec.largest(), sn.spec.smallest()]
    cfg = MemeConfig(name="from-supernet", experts=tuple(archs), data=sn.spec.data,
                     diffusion=load_space("tiny").diffusion, expert_probs=(0.8, 0.4)).validate()
    data = tmp_path / "x.npy"
    import numpy as np
    np.save(data, np.zeros((16, 1, 16, 16), dtype=np.float32))
    opts = TrainOptions(data=str(data), steps=2, batch_size=2, device="cpu", init_from=str(tiny_supernet))
    tr = Trainer(cfg, opts, tmp_path / "run")
    for e, ema_e, arch in zip(tr.model.experts, tr.ema.module.experts, archs):
        want = sn.extract(arch).state_dict()
        assert all(torch.equal(e.state_dict()[k], want[k]) and torch.equal(ema_e.state_dict()[k], want[k])
                   for k in want)
    assert source_tflops(str(tiny_supernet)) == pytest.approx(load_index(tiny_supernet)["train_gflops_total"] / 1e3)
    target = load_space("tiny").reference       # the target's width: no supernet of that shape here
    with pytest.raises(UserError, match="no trained supernet serves"):
        Trainer(target, opts, tmp_path / "run2")


def test_pooled_scores_are_the_in_process_scores_of_the_same_candidates(tiny_supernet, tmp_path):
    """The worker pool (one process per core) must give each trial its own candidate's score."""
    fresh = tmp_path / "fresh-supernet"        # no scores.jsonl: every term is computed again here
    shutil.copytree(tiny_supernet, fresh)
    (fresh / "scores.jsonl").unlink(missing_ok=True)
    pooled = tmp_path / "pooled-supernet"
    shutil.copytree(fresh, pooled)
    args = ["--space", "tiny", "--budget-gflops", "1", "--executor", "optuna", "--supernet", str(pooled),
            "--trials", "8", "--out", str(tmp_path), "--study", "pool", "--rerank-top", "0", "--no-reference",
            "--quiet"]
    s, _ = search.make_settings(search.parse_args(args))
    assert optuna_engine.score_workers(s) == default_jobs(None)   # one single-thread worker per core
    assert optuna_engine.score_workers(dataclasses.replace(s, cpus_per_trial=float(default_jobs(None)))) == 1
    scratch = dataclasses.replace(s, space=load_space("tiny"))
    assert optuna_engine.score_workers(scratch) == 1           # trained trials prune in this process
    assert search.main(args) == 0
    study = optuna.load_study(study_name="pool", storage=f"sqlite:///{tmp_path / 'pool' / 'optuna.db'}")
    scored = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
              and "duplicate_of" not in t.user_attrs]
    assert len(scored) >= 3
    here = SharedScorer(fresh, s.space.proxy)
    for t in scored:
        cfg = MemeConfig.from_yaml(t.user_attrs["config_yaml"], "again")
        assert t.value == pytest.approx(here.score(cfg).objective, rel=1e-6, abs=0), t.number
    assert len({t.value for t in scored}) > 1                   # distinct candidates, distinct scores


def spawned_workers() -> list[int]:
    """This process's children that are multiprocessing spawn workers (not its resource tracker)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmd:
                pids.append(int(pid))
    return pids


def test_a_killed_score_worker_fails_its_trials_and_the_search_goes_on(tiny_supernet, tmp_path):
    """kill -9 of a score worker mid-search: the trials the broken pool held FAIL, the rest
    are scored in this process, and the search ends with its trial count and exit 0."""
    fresh = tmp_path / "supernet"              # no scores.jsonl: every candidate needs a score
    shutil.copytree(tiny_supernet, fresh)
    (fresh / "scores.jsonl").unlink(missing_ok=True)
    args = ["--space", "tiny", "--budget-gflops", "1", "--executor", "optuna", "--supernet", str(fresh),
            "--trials", "8", "--out", str(tmp_path), "--study", "killed", "--rerank-top", "0", "--no-reference",
            "--quiet"]
    killed: list[int] = []
    stop = threading.Event()

    def kill_the_first_worker():               # bounded: 240 s, or until the search returns
        end = time.monotonic() + 240
        while not killed and not stop.is_set() and time.monotonic() < end:
            pids = spawned_workers()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_first_worker, daemon=True)
    killer.start()
    try:
        rc = search.main(args)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "no score worker was seen to kill"
    assert rc == 0
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{tmp_path / 'killed' / 'optuna.db'}")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all("BrokenProcessPool" in t.user_attrs["fail_reason"]
                          or "score worker died" in t.user_attrs["fail_reason"] for t in failed)
    after = [t for t in study.trials if t.number > max(f.number for f in failed)
             and t.state == optuna.trial.TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert after, "nothing was scored after the worker died"
    assert len(study.trials) >= 8 and not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
