"""The search's own costs, for ``python -m nas.bench`` (its "search" section).

* time to check one candidate's MACs (no cache);
* each trial engine's overhead per trial: (engine wall - trial body wall) / trial body
  wall, over a few proxy trials of a small space (``SearchBenchOptions.space``);
* per-candidate scoring, from-scratch proxy against the weight-shared supernet;
* distinct candidates a whole supernet search ranks per minute, under each engine.

``SearchBenchOptions`` is ``meme.speed.model_bench.BenchOptions`` plus what only these
measurements size: the engines, their trial count and the space.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
import torch

from meme.common.errors import one_line
from meme.model import macs
from meme.model.references import resolve
from meme.speed.bench_report import PENDING, Row
from meme.speed.model_bench import SECTIONS as MODEL_SECTIONS
from meme.speed.model_bench import BenchOptions
from meme.speed.model_bench import default_options as model_default_options
from meme.speed.timing import median
from nas import search
from nas.engine import optuna_engine, ray_engine
from nas.engine.settings import Settings
from nas.engine.study import open_study, storage_url_for
from nas.evaluators.device_share import measure_share, usable_cores
from nas.evaluators.supernet_score import SharedScorer
from nas.evaluators.supernet_training import macro_of, train_all
from nas.evaluators.trial import run_trial
from nas.space.budget import Budget
from nas.space.draw import build_config
from nas.space.space import load_space

ENGINES = ("optuna", "ray")              # trial engines timed (SearchBenchOptions.engines)
SECTIONS = MODEL_SECTIONS + ("search",)  # every section nas.bench.run runs by default


@dataclass(frozen=True)
class SearchBenchOptions(BenchOptions):
    """The model benchmarks' sizes plus the search section's."""

    engine_trials: int = 3          # trials per engine in the overhead measurement
    engines: tuple[str, ...] = ENGINES
    space: str = "tiny"             # search space whose proxy trial the engines run
    only: tuple[str, ...] = SECTIONS


def default_options(device: str, quick: bool) -> SearchBenchOptions:
    """``meme.speed.model_bench.default_options`` for the mode, with the engines' trial count for it."""
    base = model_default_options(device, quick)
    trials = 2 if quick else (4 if device.startswith("cuda") else 3)
    sizes = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return SearchBenchOptions(**dict(sizes, only=SECTIONS), engine_trials=trials)


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def bench_macs_check(o: SearchBenchOptions) -> list[Row]:
    """cost_of_meme on the target-shape Table 4 MEME, disk cache off: cold (the macro's
    one whole count + every block), and as a search meets a new candidate of a macro it
    has seen (every block new, the macro's rest known)."""
    cfg = resolve("meme-table4")   # always the search's target shape (3x64x64)

    def timed(rests: bool) -> float:
        times = []
        with _env("MEME_MACS_CACHE", "0"):
            for _ in range(max(o.repeats, 2)):
                macs.clear_caches(rests=rests)
                t0 = time.perf_counter()
                macs.cost_of_meme(cfg)
                times.append(time.perf_counter() - t0)
        return median(times)

    cold, known = timed(rests=True), timed(rests=False)
    macs.clear_caches()
    label = f"{cfg.data.channels}x{cfg.data.resolution}x{cfg.data.resolution} b1"
    note = f"meme.model.macs.cost_of_meme, {cfg.num_experts} distinct experts of one macro, MEME_MACS_CACHE=0"
    return [
        Row("search", "macs_check", "s_per_candidate_cold", cold, "s", shape=label,
            note=note + ", every in-process cache cleared: one whole count + the blocks"),
        Row("search", "macs_check", "s_per_candidate", known, "s", target="<= 1 s", shape=label,
            note=note + ", the macro's rest known, every block new (a search's new candidate, worst case)"),
        Row("search", "macs_check", "by_parts_speedup", cold / known, "x", shape=label,
            note="cold / known-macro, same run"),
    ]


def _engine_settings(engine: str, space: str, trials: int, out: Path, dev: torch.device):
    return Settings(space=load_space(space), budget=Budget(gflops=1e9), objectives=("loss",), trials=trials,
                    study_name=f"bench-{engine}", out=out, storage_url=storage_url_for(out, None),
                    seed=0, device=str(dev), cpus_per_trial=float(os.cpu_count() or 1),
                    gpus_per_trial=1.0 if dev.type == "cuda" else 0.0, progress=False)


@dataclass
class TrialTimes:
    """Per-trial times from the study: body (run_trial's own wall) and span (asked -> told)."""

    bodies: list[float]
    spans: list[float]


def _trial_times(storage, study_name: str) -> TrialTimes:
    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = [t for t in study.get_trials(deepcopy=False)
              if "wall_s" in t.user_attrs and t.datetime_start and t.datetime_complete]
    return TrialTimes(bodies=[float(t.user_attrs["wall_s"]) for t in trials],
                      spans=[(t.datetime_complete - t.datetime_start).total_seconds() for t in trials])


def bench_engine(engine: str, o: SearchBenchOptions, dev: torch.device, log: Callable[[str], None]) -> list[Row]:
    """Run a few tiny-space trials under ``engine``; overhead = (wall - body) / body."""
    label = f"{o.space} space proxy, {o.engine_trials} trials, serial"
    if engine not in o.engines:
        return [Row("search", f"engine_{engine}", "overhead", "skipped (--engines)", "%", shape=label,
                    target="<= 5% of a proxy trial")]
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix=f"meme-bench-{engine}-") as tmp:
            s = _engine_settings(engine, o.space, o.engine_trials, Path(tmp), dev)
            storage, study = open_study(s, resume=False)
            if engine == "optuna":
                t0 = time.perf_counter()
                optuna_engine.run(s, study)
                wall = time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                ray_engine.init_ray(None)
                startup = time.perf_counter() - t0
                rows.append(Row("search", "engine_ray", "startup", startup, "s", shape=label,
                                note="ray.init (once per search, not per trial)"))
                t0 = time.perf_counter()
                ray_engine.run(s, study, o.engine_trials)
                wall = time.perf_counter() - t0
                import ray  # optional dependency: only the Ray engine needs it
                ray.shutdown()
            times = _trial_times(storage, s.study_name)
            if hasattr(storage, "engine"):
                storage.engine.dispose()    # release the SQLite file before the folder goes
    except Exception as exc:  # an engine that fails here is reported, not invented
        return rows + [Row("search", f"engine_{engine}", "overhead", PENDING, "%", shape=label,
                           target="<= 5% of a proxy trial", note=one_line(exc, typed=True)[:200])]
    if not times.bodies:
        return rows + [Row("search", f"engine_{engine}", "overhead", PENDING, "%", shape=label,
                           target="<= 5% of a proxy trial", note="no trial recorded wall_s")]
    body, span, n = sum(times.bodies), sum(times.spans), len(times.bodies)
    gaps = [max(sp - b, 0.0) for sp, b in zip(times.spans, times.bodies)]
    # The first trial also pays a fresh worker's start-up (a Ray actor imports torch):
    # once per worker, so the steady per-trial overhead is taken over the later trials.
    later_gaps, later_bodies = (gaps[1:], times.bodies[1:]) if n > 1 else (gaps, times.bodies)
    log(f"  engine {engine}: wall {wall:.1f} s, trial spans {span:.1f} s, trial bodies {body:.1f} s over {n} trials; "
        f"first trial overhead {gaps[0]:.2f} s, later {sum(later_gaps) / len(later_gaps):.2f} s each")
    return rows + [
        Row("search", f"engine_{engine}", "wall_per_trial", wall / n, "s", shape=label),
        Row("search", f"engine_{engine}", "body_per_trial", body / n, "s", shape=label,
            note="nas.evaluators.trial.run_trial wall (user attr wall_s)"),
        Row("search", f"engine_{engine}", "fixed_startup", max(wall - span, 0.0), "s", shape=label,
            note="engine wall outside every trial's span: set-up and tear-down, once per search"),
        Row("search", f"engine_{engine}", "first_trial_overhead", gaps[0], "s", shape=label,
            note="span minus body of the first trial: includes starting a worker (once per worker)"),
        Row("search", f"engine_{engine}", "overhead_s_per_trial", sum(later_gaps) / len(later_gaps), "s",
            shape=label, note="span (asked -> told) minus body, later trials: sampler, storage, scheduling"),
        Row("search", f"engine_{engine}", "overhead", 100 * sum(later_gaps) / sum(later_bodies), "%", shape=label,
            target="<= 5% of a proxy trial", note="sum(span - body) / sum(body) over the trials after the first"),
        Row("search", f"engine_{engine}", "overhead_incl_startup", 100 * (wall - body) / body, "%", shape=label,
            note=f"(engine wall - bodies) / bodies: every start-up spread over only {n} trials"),
    ]


def bench_trials_at_once(o: SearchBenchOptions, dev: torch.device, log: Callable[[str], None]) -> list[Row]:
    """Trained candidates per minute of the Optuna engine, one trial at a time against
    several (on a GPU as many as ``nas.evaluators.device_share`` measures it holds; on a CPU
    one per core), same space, same number of trials, pruning off (a Pareto search: which
    trials a pruner stops depends on their order, and so would the time)."""
    share = measure_share(load_space(o.space), str(dev))
    k = share.trials if dev.type == "cuda" else usable_cores()
    trials = 2 * k if o.quick else max(6 * k, 12)   # enough that starting workers (torch imports) is not the figure
    label = f"{o.space} space proxy, {trials} trials, no pruning"
    if k < 2:
        return [Row("search", "trials_at_once", "candidates_per_min_gain", "n/a (one core)", "x", shape=label)]
    per_min = {}
    try:
        for n in (1, k):
            with tempfile.TemporaryDirectory(prefix="meme-bench-at-once-") as tmp:
                s = dataclasses.replace(_engine_settings("optuna", o.space, trials, Path(tmp), dev),
                                        objectives=("loss", "gflops"), cpus_per_trial=1.0, trials_at_once=n,
                                        study_name=f"bench-at-once-{n}")
                storage, study = open_study(s, resume=False)
                t0 = time.perf_counter()
                optuna_engine.run(s, study)
                wall = time.perf_counter() - t0
                done = sum(1 for t in study.get_trials(deepcopy=False) if "wall_s" in t.user_attrs)
                if hasattr(storage, "engine"):
                    storage.engine.dispose()
            per_min[n] = 60 * done / wall
            log(f"  trials at once {n}: {done} trained in {wall:.1f} s, {per_min[n]:.1f} per minute")
    except Exception as exc:  # reported, not invented
        return [Row("search", "trials_at_once", "candidates_per_min_gain", PENDING, "x", shape=label,
                    note=one_line(exc, typed=True)[:200])]
    why = share.describe() if dev.type == "cuda" else f"{k} CPU cores, one trial each"
    return [Row("search", "trials_at_once_1", "candidates_per_min", per_min[1], "/min", shape=label,
                note="nas.engine.optuna_engine, one trial at a time, one thread"),
            Row("search", f"trials_at_once_{k}", "candidates_per_min", per_min[k], "/min", per_min[k] / per_min[1],
                shape=label, note=f"worker processes ({why}); vs_ref = / one at a time")]


def bench_evaluators(o: SearchBenchOptions, dev: torch.device, log: Callable[[str], None], k: int = 4) -> list[Row]:
    """Per-candidate scoring cost, from-scratch proxy vs the weight-shared supernet, same run.

    ``k`` random default-space candidates (one macro, seed 0; the tiny space with
    ``--quick``). The supernet is trained
    for one step only: what is timed (extract + held-out passes) does not depend on how
    well it is trained, and its one-time training cost is reported from its own FLOPs
    count. Cold = a fresh score cache (every sub-network new), warm = the same candidates
    again (every term cached). The from-scratch figure is one full proxy trial of the
    first candidate (training + held-out loss).
    """
    space = load_space("tiny" if o.quick else "meme_ffhq256")
    label = f"{space.name} space proxy, {k} random candidates, one macro"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    cands = []
    while len(cands) < k:
        cfg = build_config(study.ask(), space)
        if not cands or macro_of(cfg) == macro_of(cands[0]):
            cands.append(cfg)
    base, blocks = macro_of(cands[0])
    with tempfile.TemporaryDirectory(prefix="meme-bench-supernet-") as tmp:
        index = train_all(space.source, Path(tmp), steps=1, macros=f"{base}:{blocks}", device=str(dev), progress=False)
        proxy = dataclasses.replace(space.proxy, evaluator="supernet", supernet=tmp)
        t0 = time.perf_counter()
        scorer = SharedScorer(tmp, proxy, str(dev))
        for c in cands:
            scorer.score(c)
        cold_total = time.perf_counter() - t0        # includes loading the supernet once
        warm = [scorer.score(c).wall_s for c in cands]
    t0 = time.perf_counter()
    run_trial(cands[0], space.proxy.from_scratch(), lambda step, value: None, device=str(dev))
    scratch = time.perf_counter() - t0
    per_cold, per_warm = cold_total / k, median(warm)
    log(f"  evaluators: from scratch {scratch:.1f} s/candidate, supernet cold {per_cold:.2f} s, warm {per_warm:.3f} s")
    return [
        Row("search", "evaluator_scratch", "s_per_candidate", scratch, "s", shape=label,
            note="nas.evaluators.trial.run_trial, from-scratch proxy: train + held-out loss"),
        Row("search", "evaluator_supernet", "s_per_candidate_cold", per_cold, "s", shape=label,
            note="fresh cache: load + extract + held-out passes for every expert"),
        Row("search", "evaluator_supernet", "s_per_candidate_warm", per_warm, "s", shape=label,
            note="every (t, sub-network) term cached"),
        Row("search", "evaluator_supernet", "speedup_cold", scratch / per_cold, "x", shape=label,
            target=">= 10x", note="from-scratch s / supernet cold s, this run (MACs check excluded from both)"),
        Row("search", "evaluator_supernet", "one_time_train_gflops_per_step",
            index["train_gflops_total"], "GFLOP", shape=label,
            note="supernet training, charged once per search (x --steps)"),
    ]


def bench_supernet_search(o: SearchBenchOptions, dev: torch.device, log: Callable[[str], None],
                          seconds: float = 90.0) -> list[Row]:
    """Distinct candidates a supernet search ranks in a fixed time, per engine, same run.

    The whole ``nas.search`` job (its default sampler, MACs checks, storage, scoring) on
    the default space at its default 95 GFLOPs budget, ``seconds`` each, from a cold
    score cache; the supernets are trained one step (what is timed does not depend on how
    well). The first ``seconds`` include each engine's start-up (Ray's, a pool's workers),
    as a user's search does. ``--quick``: the tiny space, a sixth of the time.
    """
    space, budget = ("tiny", "1") if o.quick else ("meme_ffhq256", "95")
    seconds = seconds / 6 if o.quick else seconds
    label = f"{space} space, {seconds:.0f} s per engine, cold score cache"
    rates: dict[str, float] = {}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="meme-bench-snsearch-") as tmp:
        sn = Path(tmp) / "supernet"
        macros = None if o.quick else "128:1,128:2,128:3"   # base 192 is over 95 GFLOPs: never scored
        train_all(space, sn, steps=1, macros=macros, device=str(dev), progress=False)
        for engine in o.engines:
            (sn / "scores.jsonl").unlink(missing_ok=True)
            t0 = time.perf_counter()
            try:
                search.main(["--space", space, "--budget-gflops", budget, "--supernet", str(sn), "--executor", engine,
                             "--trials", "100000", "--time-budget", str(seconds), "--rerank-top", "0",
                             "--no-reference", "--quiet", "--out", tmp, "--study", f"sn-{engine}",
                             "--device", str(dev)])
            except Exception as exc:  # reported, not invented
                rows.append(Row("search", f"supernet_search_{engine}", "distinct_per_min", PENDING, "/min",
                                shape=label, note=one_line(exc, typed=True)[:200]))
                continue
            wall = time.perf_counter() - t0
            study = optuna.load_study(study_name=f"sn-{engine}", storage=storage_url_for(Path(tmp) / f"sn-{engine}", None))
            distinct = sum(t.state == optuna.trial.TrialState.COMPLETE and "duplicate_of" not in t.user_attrs
                           for t in study.get_trials(deepcopy=False))
            rates[engine] = 60 * distinct / wall
            log(f"  supernet search, {engine}: {distinct} distinct candidates scored in {wall:.0f} s")
            rows.append(Row("search", f"supernet_search_{engine}", "distinct_per_min", rates[engine], "/min",
                            shape=label, target=">= 43/min (300 in 420 s)" if not o.quick else "",
                            note=f"{distinct} distinct scored candidates / {wall:.0f} s of nas.search wall"))
    if "optuna" in rates and "ray" in rates:
        rows.append(Row("search", "supernet_search_optuna/ray", "distinct_ratio", rates["optuna"] / rates["ray"], "x",
                        shape=label, note="the Optuna engine's score-worker pool (the default here) / Ray Tune, "
                                          "same run"))
    return rows
