"""The study every engine writes: its storage, sampler, metric names, attributes and resume rules.

One Optuna RDB storage per study (``results/<study>/optuna.db`` or a PostgreSQL/MySQL
URL), opened once per run by :func:`open_study` and handed to the engine; how each trial
is drawn and recorded lives in ``nas.engine.record``, so optuna-dashboard, ``trials.csv`` and
``--resume`` see one format whichever engine ran the trial.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from meme.common.errors import UserError
from meme.model.supernet import load_index
from nas.engine.heartbeat import fail_stale_running
from nas.engine.record import constraint_of
from nas.engine.settings import Settings
from nas.space.space import SPACES_DIR

log = logging.getLogger(__name__)

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # toward --trials (infeasible ones are PRUNED)


# ---- storage and study ---------------------------------------------------------------

def storage_url_for(out: Path, url: Optional[str]) -> str:
    return url or f"sqlite:///{(Path(out) / 'optuna.db').resolve()}"


def open_storage(url: str, attempts: int = 4) -> optuna.storages.RDBStorage:
    """An RDBStorage object (OptunaSearch wants an object, not a URL).

    Drivers started together on a fresh database race to create Optuna's schema (on
    PostgreSQL the loser gets a duplicate-type error): the loser tries again, and then
    finds the schema made.
    """
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


def make_pruner(s: Settings) -> optuna.pruners.BasePruner:
    """Successive halving for the plain Optuna engine (Ray's ASHA prunes under Ray)."""
    if s.multi:  # Optuna cannot prune multi-objective trials
        return optuna.pruners.NopPruner()
    proxy = s.space.proxy  # first rung past warm-up and a third of the budget (proxy.first_rung)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=proxy.first_rung(),
                                                  reduction_factor=proxy.reduction_factor)


def sampler_name(s: Settings) -> str:
    """``s.sampler``, with 'auto' resolved: NSGA-II for a Pareto search or the supernet evaluator, else TPE."""
    if s.sampler != "auto":
        return s.sampler
    return "nsga2" if s.multi or s.space.proxy.evaluator == "supernet" else "tpe"


def make_sampler(s: Settings) -> optuna.samplers.BaseSampler:
    """TPE (or NSGA-II for a Pareto search, or for the supernet evaluator; ``--sampler``
    overrides), told about the budget as a constraint.

    Supernet scores cost about a second and lie within a fraction of a percent of each
    other; TPE then re-proposes its best few designs (465 of 572 trials were duplicates in
    the committed default-space run). An evolutionary search, as DDSM's over its supernet,
    keeps proposing new children of the best designs instead.

    The constraint goes through ``constraints_func``: Optuna stores its values as the
    ``constraints`` list that both its constraint-aware samplers and optuna-dashboard
    (0.15-0.21) read. ``Trial.set_constraint`` (Optuna 5) stores them under keys the
    dashboard does not read, so every trial would show no constraint there.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*constraints_func.*", category=FutureWarning)
        # TPE's multivariate `group` mode is marked experimental; it is what a conditional space needs
        warnings.filterwarnings("ignore", message=".*``group``.*", category=optuna.exceptions.ExperimentalWarning)
        name = sampler_name(s)
        seed = s.seed if s.sampler_seed is None else s.sampler_seed
        if name == "random":   # every rule holds by construction, so a uniform draw is a uniform candidate
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "nsga2":
            size = max(4, min(20, s.trials // 3)) if s.multi else max(4, min(50, s.trials // 4))
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=size, constraints_func=constraint_of)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, min(10, s.trials // 3)),
                                          multivariate=True, group=True, constraints_func=constraint_of)


METRIC_NAMES = {"loss": "held-out loss", "fid": "FID", "gflops": "GFLOPs per step", "latency": "ms per step"}


def name_metrics(study: optuna.Study, objectives: tuple[str, ...]) -> None:
    """The dashboard's axes and best-trial card say what is measured, not 'Objective 0'."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([METRIC_NAMES[o] for o in objectives])


def counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def portable_space_ref(source: str) -> str:
    """A shipped space by its name (loads on any install), any other by its absolute path."""
    path = Path(source).resolve()
    return path.stem if path.parent == SPACES_DIR.resolve() else str(path)


def study_attrs(s: Settings) -> dict[str, Any]:
    """Study-level user attrs: what this study searched and under which budget."""
    return {"space": portable_space_ref(s.space.source), "space_name": s.space.name,
            "budget_gflops": s.budget.gflops if s.budget.bounded else None,
            "budget_mode": s.budget.mode, "budget_source": s.budget.source,
            "objectives": list(s.objectives), "proxy": s.space.proxy.digest(), "seed": s.seed,
            "data": s.space.dataset,
            "evaluator": s.space.proxy.evaluator, "sampler": sampler_name(s), **supernet_attrs(s.space.proxy), **latency_attrs(s)}


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
    old = study.user_attrs
    if not old:
        return
    for key in ("space_name", "data", "budget_gflops", "budget_mode", "objectives", "proxy", "supernet_digest",
                "budget_ms", "latency_device"):
        new, was = study_attrs(s).get(key), old.get(key)
        if key == "proxy" and isinstance(new, dict) and isinstance(was, dict):
            # where the supernet lies is not what it is (supernet_digest is): a moved checkout resumes
            new, was = ({k: v for k, v in d.items() if k != "supernet"} for d in (new, was))
        if key in old and was != new:
            raise UserError(f"study {s.study_name!r} was run with {key}={old[key]!r}, not {new!r}: "
                            f"use another --study or the same settings")


def existing_trials(storage: optuna.storages.BaseStorage, name: str) -> int:
    try:
        sid = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(sid, deepcopy=False))


def open_study(s: Settings, resume: bool, storage: Optional[optuna.storages.BaseStorage] = None
               ) -> tuple[optuna.storages.BaseStorage, optuna.Study]:
    """The run's one study object (sampler and pruner attached) in its RDB storage.

    An existing study only with ``resume``, and only if compatible; on resume, trials an
    interrupted run left RUNNING are failed (other live drivers' trials are stamped and
    left alone).
    """
    storage = storage or open_storage(s.storage_url)
    existing = existing_trials(storage, s.study_name)
    if existing and not resume:
        raise UserError(f"study {s.study_name!r} already has {existing} trials in {s.storage_url}: pass --resume "
                        f"to continue it, or --study NAME for a new one")
    if resume:
        failed = fail_stale_running(storage, s.study_name, s.stale_after)
        if failed:
            print(f"resume: {len(failed)} trial(s) left RUNNING by an interrupted run marked FAIL: {failed}")
    study = optuna.create_study(storage=storage, study_name=s.study_name, sampler=make_sampler(s),
                                pruner=make_pruner(s), directions=s.directions, load_if_exists=True)
    check_compatible(study, s)
    name_metrics(study, s.objectives)
    for k, v in study_attrs(s).items():
        study.set_user_attr(k, v)
    return storage, study
