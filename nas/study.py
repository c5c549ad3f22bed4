"""What every engine shares: the study's storage, sampler, metric names, and resume rules.

One Optuna RDB storage per study (``results/<study>/optuna.db`` or a PostgreSQL/MySQL
URL); how each trial is drawn and recorded lives in ``nas.record``, so optuna-dashboard,
``trials.csv`` and ``--resume`` see one format whichever engine ran the trial.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from nas.budget import Budget, LatencyBudget
from nas.space import SearchSpace
from nas.supernet import load_index

log = logging.getLogger("nas.search")

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # toward --trials (infeasible ones are PRUNED)


@dataclass
class Settings:
    """Everything a search run needs, resolved from the CLI."""

    space: SearchSpace
    budget: Budget
    objectives: tuple[str, ...]        # ('loss',), ('fid',), or with 'gflops'/'latency' second: Pareto search
    trials: int                        # total counted trials wanted in the study
    study_name: str
    out: Path                          # results/<study>
    storage_url: str
    seed: int = 0
    time_budget: Optional[float] = None  # seconds; no new trial starts after it
    device: Optional[str] = None       # torch device for trials ('auto' when None)
    cpus_per_trial: float = 1.0
    gpus_per_trial: Optional[float] = None  # None: 0.5 when the Ray cluster has GPUs
    address: Optional[str] = None      # Ray cluster address
    progress: bool = True
    extra: dict = field(default_factory=dict)
    latency: Optional[LatencyBudget] = None  # --budget-ms / objective 'latency': the time budget and its table

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


def open_storage(url: str, attempts: int = 4) -> optuna.storages.RDBStorage:
    """An RDBStorage object (OptunaSearch wants an object, not a URL).

    Drivers started together on a fresh database race to create Optuna's schema (on
    PostgreSQL the loser gets a duplicate-type error): the loser tries again, and then
    finds the schema made.
    """
    import sqlalchemy.exc

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            log.info("the study schema is being created by another driver: trying again")
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def constraint_of(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Over budget, in the budget's unit (<= 0: feasible); trials without the attr count as feasible."""
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


METRIC_NAMES = {"loss": "held-out loss", "fid": "FID", "gflops": "GFLOPs per step", "latency": "ms per step"}


def name_metrics(study: optuna.Study, objectives: tuple[str, ...]) -> None:
    """The dashboard's axes and best-trial card say what is measured, not 'Objective 0'."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([METRIC_NAMES[o] for o in objectives])


def counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


# A driver stamps every trial it runs this often; a RUNNING trial unstamped for
# STALE_AFTER_S belongs to a driver that died (kill -9, lost node, lost network).
HEARTBEAT_S = 5.0
STALE_AFTER_S = float(os.environ.get("MEME_NAS_STALE_AFTER_S", 30.0))  # tests shorten it
ALIVE_ATTR = "alive_at"  # unix time of the last stamp (a user attr: visible in the dashboard)


def fail_stale_running(storage: optuna.storages.BaseStorage, study_name: str,
                       stale_after: float = STALE_AFTER_S) -> list[int]:
    """RUNNING trials no live driver has stamped for ``stale_after`` s -> FAIL, with the reason.

    Safe beside other live drivers (distributed search): their trials are stamped every
    ``HEARTBEAT_S`` s and are left alone. Returns the numbers of the trials failed.
    """
    try:
        sid = storage.get_study_id_from_name(study_name)
    except KeyError:
        return []
    from nas.record import status_text

    now, failed = time.time(), []
    for t in storage.get_all_trials(sid, deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        started = t.datetime_start.timestamp() if t.datetime_start else 0.0
        if now - float(t.user_attrs.get(ALIVE_ATTR, started)) < stale_after:
            continue
        tid = storage.get_trial_id_from_study_id_trial_number(sid, t.number)
        try:
            storage.set_trial_user_attr(tid, "fail_reason", "interrupted: its driver stopped (killed or lost)")
            storage.set_trial_user_attr(tid, "status", status_text("failed", reason="interrupted"))
            storage.set_trial_state_values(tid, TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue  # finished meanwhile: its driver was alive after all
        failed.append(t.number)
    return failed


class Heartbeat:
    """Stamps the trials this driver runs, and fails those dead drivers left RUNNING.

    A background thread; storage errors (a database restart) are logged, never raised,
    so a short outage costs stamps, not the search.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, study_name: str, interval: float = HEARTBEAT_S,
                 stale_after: float = STALE_AFTER_S):
        self.storage, self.study_name = storage, study_name
        self.study_id = storage.get_study_id_from_name(study_name)  # the study exists: the driver opened it
        self.interval, self.stale_after = interval, stale_after
        self.live: set[int] = set()
        self.cleaned: list[int] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="trial-heartbeat", daemon=True)
        importlib.import_module("nas.record")  # here, not in the thread: a slow first import would delay stamps

    def add(self, number: int) -> None:
        with self._lock:
            self.live.add(number)
        self._stamp(number)

    def discard(self, number: int) -> None:
        with self._lock:
            self.live.discard(number)

    def _stamp(self, number: int) -> None:
        try:
            tid = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
            self.storage.set_trial_user_attr(tid, ALIVE_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            self.discard(number)
        except Exception as exc:  # database down: keep trying, the trials keep running
            log.warning("heartbeat of trial %d not recorded: %s", number, str(exc).splitlines()[0] if str(exc) else exc)

    def sweep(self) -> None:
        try:
            self.cleaned += fail_stale_running(self.storage, self.study_name, self.stale_after)
        except Exception as exc:
            log.warning("stale-trial clean-up skipped: %s", str(exc).splitlines()[0] if str(exc) else exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                live = sorted(self.live)
            for n in live:
                self._stamp(n)
            self.sweep()

    def wait_for_others(self, study: optuna.Study, limit: Optional[float] = None) -> None:
        """Before the final outputs: give trials other drivers left RUNNING the time to
        finish or to go stale (then they are failed), at most ``limit`` seconds."""
        deadline = time.time() + (self.stale_after + self.interval if limit is None else limit)
        while time.time() < deadline:
            running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       if t.number not in self.live]
            if not running:
                return
            time.sleep(min(self.interval, max(0.0, deadline - time.time())))
            self.sweep()

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)


def portable_space_ref(source: str) -> str:
    """A shipped space by its name (loads on any install), any other by its absolute path."""
    from nas.space import SPACES_DIR

    path = Path(source).resolve()
    return path.stem if path.parent == SPACES_DIR.resolve() else str(path)


def study_attrs(s: Settings) -> dict[str, Any]:
    """Study-level user attrs: what this study searched and under which budget."""
    return {"space": portable_space_ref(s.space.source), "space_name": s.space.name,
            "budget_gflops": s.budget.gflops if s.budget.bounded else None,
            "budget_mode": s.budget.mode, "budget_source": s.budget.source,
            "objectives": list(s.objectives), "proxy": s.space.proxy.digest(), "seed": s.seed,
            "evaluator": s.space.proxy.evaluator, **supernet_attrs(s.space.proxy), **latency_attrs(s)}


def latency_attrs(s: Settings) -> dict[str, Any]:
    """The time budget and the device whose latency table priced the trials."""
    if s.latency is None:
        return {}
    return {"budget_ms": s.latency.ms, "latency_device": s.latency.device, "latency_table": s.latency.table_path}


def supernet_attrs(proxy) -> dict[str, Any]:
    """Which supernet scored the study's trials: its directory and the digest of its weights."""
    if proxy.evaluator != "supernet" or not proxy.supernet:
        return {}
    index = load_index(proxy.supernet)
    return {"supernet": str(proxy.supernet), "supernet_digest": index.get("digest"),
            "supernet_train_gflops": index.get("train_gflops_total")}


def check_compatible(study: optuna.Study, s: Settings) -> None:
    """--resume with another budget/space/objective would mix incomparable trials."""
    from meme.cli import UserError

    old = study.user_attrs
    if not old:
        return
    for key in ("space_name", "budget_gflops", "budget_mode", "objectives", "proxy", "supernet_digest",
                "budget_ms", "latency_device"):
        new = study_attrs(s).get(key)
        if key in old and old[key] != new:
            raise UserError(f"study {s.study_name!r} was run with {key}={old[key]!r}, not {new!r}: "
                            f"use another --study or the same settings")


class Deadline:
    def __init__(self, seconds: Optional[float]):
        self.end = None if not seconds else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def left(self) -> Optional[float]:
        return None if self.end is None else max(0.0, self.end - time.monotonic())
