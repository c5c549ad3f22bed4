"""What every engine shares: the study's storage, sampler, and how a trial is recorded.

One Optuna RDB storage per study (``results/<study>/optuna.db`` or a PostgreSQL/MySQL
URL), the same user attributes whichever engine ran the trial, so optuna-dashboard,
``trials.csv`` and ``--resume`` see one format:

========================  ==========================================================
``gflops``                budgeted cost (mean or max per --budget-mode), target shape
``gflops_mean/_max``      both figures; ``gflops_per_expert`` the list
``params``                parameters of all experts at the target shape
``paper_units``           the paper's "MACs" column (3 x ptflops hook GMACs)
``constraint``            gflops - B (> 0: infeasible, never trained)
``config_yaml``           the candidate as MemeConfig YAML (target scale)
``trained_steps``         proxy optimizer steps actually run (0 for infeasible)
``train_steps_total``     the same (all experts together): equal for every fully trained trial
``train_gflops_total``    training compute spent: 3 x forward GFLOPs x images, at the proxy
``seed``                  training seed (the same for every trial of a study)
``stopped_early``         the scheduler/pruner stopped it before proxy.steps
``wall_s/peak_mem_mb/device``  measured while training
``fail_reason``           one line, for FAIL trials
``duplicate_of``          same architecture as that fully trained trial: its result is
                          reused (same seed, same training), nothing retrained
========================  ==========================================================
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from meme.config import MemeConfig
from nas.budget import Budget, cost_of
from nas.space import SearchSpace, build_config
from nas.trial import TrialResult

log = logging.getLogger("nas.search")

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # toward --trials (infeasible ones are PRUNED)


@dataclass
class Settings:
    """Everything a search run needs, resolved from the CLI."""

    space: SearchSpace
    budget: Budget
    objectives: tuple[str, ...]        # ('loss',), ('fid',), or with 'gflops' second: Pareto search
    trials: int                        # total counted trials wanted in the study
    study_name: str
    out: Path                          # results/<study>
    storage_url: str
    seed: int = 0
    time_budget: Optional[float] = None  # seconds; no new trial starts after it
    device: Optional[str] = None       # torch device for trials ('auto' when None)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    address: Optional[str] = None      # Ray cluster address
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def quality(self) -> str:
        return self.objectives[0]

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        return ["minimize"] * len(self.objectives)


# ---- storage and study ---------------------------------------------------------------

def storage_url_for(out: Path, url: Optional[str]) -> str:
    return url or f"sqlite:///{(Path(out) / 'optuna.db').resolve()}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDBStorage object (OptunaSearch wants an object, not a URL)."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def constraint_of(trial: optuna.trial.FrozenTrial) -> list[float]:
    """GFLOPs over budget (<= 0: feasible); trials without the attr count as feasible."""
    return [float(trial.user_attrs.get("constraint", 0.0))]


def set_constraint(trial: Any, value: float) -> None:
    """Record how far over budget a candidate is; the sampler reads it through constraint_of."""
    trial.set_user_attr("constraint", value)


def make_sampler(s: Settings) -> optuna.samplers.BaseSampler:
    """TPE (or NSGA-II for a Pareto search), told about the budget as a constraint.

    The constraint goes through ``constraints_func``: Optuna stores its values as the
    ``constraints`` list that both its constraint-aware samplers and optuna-dashboard
    (0.15-0.21) read. ``Trial.set_constraint`` (Optuna 5) stores them under keys the
    dashboard does not read, so every trial would show no constraint there.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
        # TPE's multivariate `group` mode is marked experimental; it is what a conditional space needs
        warnings.filterwarnings("ignore", message=".*``group``.*", category=optuna.exceptions.ExperimentalWarning)
        if s.multi:
            return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=max(4, min(20, s.trials // 3)),
                                                 constraints_func=constraint_of)
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=max(3, min(10, s.trials // 3)),
                                          multivariate=True, group=True, constraints_func=constraint_of)


METRIC_NAMES = {"loss": "held-out loss", "fid": "FID", "gflops": "GFLOPs per step"}


def name_metrics(study: optuna.Study, objectives: tuple[str, ...]) -> None:
    """The dashboard's axes and best-trial card say what is measured, not 'Objective 0'."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([METRIC_NAMES[o] for o in objectives])


def counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def fail_stale_running(storage: optuna.storages.BaseStorage, study_name: str) -> int:
    """Trials left RUNNING by a killed run -> FAIL (their work is lost; finished ones are kept)."""
    try:
        sid = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    n = 0
    for t in storage.get_all_trials(sid, deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted: the search process was killed")
        storage.set_trial_user_attr(t._trial_id, "status", status_text("failed", reason="interrupted"))
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        n += 1
    return n


def study_attrs(s: Settings) -> dict[str, Any]:
    """Study-level user attrs: what this study searched and under which budget."""
    return {"space": s.space.source, "space_name": s.space.name, "budget_gflops": s.budget.gflops,
            "budget_mode": s.budget.mode, "budget_source": s.budget.source,
            "objectives": list(s.objectives), "proxy": s.space.proxy.digest(), "seed": s.seed}


def check_compatible(study: optuna.Study, s: Settings) -> None:
    """--resume with another budget/space/objective would mix incomparable trials."""
    from meme.cli import UserError

    old = study.user_attrs
    if not old:
        return
    for key in ("space_name", "budget_gflops", "budget_mode", "objectives", "proxy"):
        new = study_attrs(s)[key]
        if key in old and old[key] != new:
            raise UserError(f"study {s.study_name!r} was run with {key}={old[key]!r}, not {new!r}: "
                            f"use another --study or the same settings")


# ---- one trial ------------------------------------------------------------------------

@dataclass
class Candidate:
    config: MemeConfig
    gflops: float
    feasible: bool
    duplicate_of: Optional[int] = None      # an identical, fully trained earlier trial
    duplicate_values: Optional[list[float]] = None


def find_duplicate(study: optuna.Study, config_hash: str) -> Optional[optuna.trial.FrozenTrial]:
    """A COMPLETE, fully trained trial of the same architecture (same seed: same result)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if (t.user_attrs.get("config_hash") == config_hash and not t.user_attrs.get("stopped_early")
                and t.user_attrs.get("duplicate_of") is None and t.values):
            return t
    return None


def prepare(trial: Any, s: Settings) -> Candidate:
    """Define-by-run body: draw the candidate, measure its cost, record it, judge it."""
    cfg = build_config(trial, s.space, name=f"{s.study_name}-t{trial.number}")
    c = cost_of(cfg, s.budget.mode)
    attrs = {"gflops": c.gflops, "gflops_mean": c.gflops_mean, "gflops_max": c.gflops_max,
             "gflops_per_expert": c.gflops_per_expert, "params": c.params, "paper_units": c.paper_units,
             "num_experts": cfg.num_experts, "config_yaml": cfg.to_yaml(), "config_hash": cfg.hash(),
             "trained_steps": 0, "stopped_early": False, **readable_attrs(cfg, c.params),
             "status": "running"}
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    set_constraint(trial, c.gflops - s.budget.gflops)
    cand = Candidate(cfg, c.gflops, c.gflops <= s.budget.gflops)
    dup = find_duplicate(trial.study, cfg.hash()) if cand.feasible else None
    if dup is not None:  # TPE re-proposed a trained design: reuse, do not retrain
        cand.duplicate_of, cand.duplicate_values = dup.number, list(dup.values)
        trial.set_user_attr("duplicate_of", dup.number)
        for k in ("wall_s", "peak_mem_mb", "device", "params_proxy"):
            if k in dup.user_attrs:
                trial.set_user_attr(k, dup.user_attrs[k])
        for step, v in dup.intermediate_values.items():
            if not s.multi:
                trial.report(v, step)
    return cand


def readable_attrs(cfg: MemeConfig, params: int) -> dict[str, Any]:
    """The architecture as a person reads it in the dashboard (one sortable column each)."""
    out: dict[str, Any] = {"N": cfg.num_experts, "params_M": round(params / 1e6, 2),
                           "p_n": " ".join(f"{p:g}" for p in cfg.resolved_probs()),
                           "boundaries": " ".join(str(b) for b in cfg.resolved_boundaries())}
    for n, e in enumerate(cfg.experts, 1):
        out[f"expert_{n}"] = " ".join(e.high_ratios)
    return out


def status_text(kind: str, *, over: float = 0.0, twin: Optional[int] = None, step: Optional[int] = None,
                reason: str = "") -> str:
    """The ``status`` attr: what happened to a trial, in words (same under both engines)."""
    return {"trained": "trained",
            "rejected": f"rejected: over budget by {over:.2f} GFLOPs",
            "duplicate": f"duplicate of #{twin}",
            "stopped": f"stopped early at step {step}",
            "failed": f"failed: {reason}"}[kind]


def result_attrs(res: TrialResult) -> dict[str, Any]:
    return {"trained_steps": res.steps, "train_steps_total": res.steps, "train_gflops_total": round(res.train_gflops, 1),
            "seed": res.seed, "stopped_early": res.stopped_early, "wall_s": round(res.wall_s, 2),
            "peak_mem_mb": round(res.peak_mem_mb, 1), "device": res.device, "params_proxy": res.params_proxy}


def values_for(objective: float, gflops: float, s: Settings) -> list[float]:
    return [objective, gflops] if s.multi else [objective]


def one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:500]


def log_trial(number: int, n_experts: Optional[int], gflops: Optional[float], value: Optional[float],
              state: str, extra: str = "", write: Callable[[str], None] = print) -> None:
    v = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.5f}"
    g = "-" if gflops is None else f"{gflops:.2f}"
    n = "-" if n_experts is None else str(n_experts)
    write(f"trial {number:>3}  N={n}  gflops={g:>7}  objective={v:>9}  {state}{'  ' + extra if extra else ''}")


class Deadline:
    def __init__(self, seconds: Optional[float]):
        self.end = None if not seconds else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def left(self) -> Optional[float]:
        return None if self.end is None else max(0.0, self.end - time.monotonic())
