"""How a trial is drawn, judged and recorded: the same under both engines.

User attributes of every trial (what ``trials.csv`` and the dashboard show):

========================  ==========================================================
``gflops``                budgeted cost (mean or max per --budget-mode), target shape
``gflops_mean/_max``      both figures; ``gflops_per_expert`` the list
``params``                parameters of all experts at the target shape
``paper_units``           the paper's "MACs" column (3 x ptflops hook GMACs)
``constraint``            gflops - B (> 0: infeasible, never trained); with --budget-ms the larger
                          of that and latency_ms - X (each in its own unit)
``latency_ms``            step time by the latency table (mean or max per --budget-mode), with
                          --budget-ms or objective 'latency'; ``latency_ms_mean/_max/_per_expert``,
                          ``latency_device`` (whose table); ``latency_measured_ms`` for finalists
``config_yaml``           the candidate as MemeConfig YAML (target scale)
``trained_steps``         proxy optimizer steps actually run (0 for infeasible)
``train_steps_total``     the same (all experts together): equal for every fully trained trial
``train_gflops_total``    training compute spent: 3 x forward GFLOPs x images, at the proxy
``seed``                  training seed (the same for every trial of a study)
``stopped_early``         the scheduler/pruner stopped it before proxy.steps
``wall_s/peak_mem_mb/device``  measured while training
``evaluator``             'scratch' (trained on the proxy) or 'supernet' (scored as sub-networks of a
                          trained supernet; ``evaluated_terms``/``cached_terms`` say what it cost)
``fail_reason``           one line, for FAIL trials
``duplicate_of``          same architecture as that fully trained trial: its result is
                          reused (same seed, same training), nothing retrained
``status``                what happened, in words (``status_text``)
``N``, ``expert_k``       number of experts; each expert's d_h/d per stage ("3/4 5/8 1/2 1/4")
``p_n``, ``boundaries``   soft-expert probabilities; interval boundaries in timesteps
``params_M``              parameters in millions
========================  ==========================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from meme.config import MemeConfig
from nas.budget import cost_of
from nas.space import build_config
from nas.study import Settings, set_constraint
from nas.trial import TrialResult


@dataclass
class Candidate:
    config: MemeConfig
    gflops: float
    feasible: bool
    duplicate_of: Optional[int] = None      # an identical, fully trained earlier trial
    duplicate_values: Optional[list[float]] = None
    latency_ms: Optional[float] = None      # by the latency table (mean or max per --budget-mode)
    rejection: str = ""                     # why it is over budget, e.g. 'over budget by 1.20 GFLOPs'

    def pareto_cost(self, s: Settings) -> float:
        """The second objective of a Pareto search: GFLOPs or milliseconds per step."""
        return self.latency_ms if s.objectives[-1] == "latency" else self.gflops


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
    overs = [(c.gflops - s.budget.gflops, "GFLOPs")] if s.budget.bounded else []
    cand = Candidate(cfg, c.gflops, True)
    if s.latency is not None:
        priced = s.latency.price(cfg)
        cand.latency_ms = s.latency.cost(priced)
        attrs.update(latency_ms=cand.latency_ms, latency_ms_mean=priced.ms_mean, latency_ms_max=priced.ms_max,
                     latency_ms_per_expert=priced.experts_ms, latency_device=s.latency.device)
        if s.latency.ms is not None:
            overs.append((cand.latency_ms - s.latency.ms, "ms"))
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    over, unit = max(overs, key=lambda x: x[0]) if overs else (0.0, "")
    set_constraint(trial, over)
    cand.feasible = over <= 0
    cand.rejection = f"over budget by {over:.2f} {unit}"
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
            "rejected": f"rejected: {reason or f'over budget by {over:.2f} GFLOPs'}",
            "duplicate": f"duplicate of #{twin}",
            "stopped": f"stopped early at step {step}",
            "failed": f"failed: {reason}"}[kind]


def result_attrs(res: TrialResult) -> dict[str, Any]:
    return {"trained_steps": res.steps, "train_steps_total": res.steps, "train_gflops_total": round(res.train_gflops, 1),
            "seed": res.seed, "stopped_early": res.stopped_early, "wall_s": round(res.wall_s, 2),
            "peak_mem_mb": round(res.peak_mem_mb, 1), "device": res.device, "params_proxy": res.params_proxy,
            **res.extra}


def values_for(objective: float, cost: float, s: Settings) -> list[float]:
    """Values told to the study: the objective, and in a Pareto search its cost (``Candidate.pareto_cost``)."""
    return [objective, cost] if s.multi else [objective]


def one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:500]


def log_trial(number: int, n_experts: Optional[int], gflops: Optional[float], value: Optional[float],
              state: str, extra: str = "", write: Callable[[str], None] = print) -> None:
    v = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.5f}"
    g = "-" if gflops is None else f"{gflops:.2f}"
    n = "-" if n_experts is None else str(n_experts)
    write(f"trial {number:>3}  N={n}  gflops={g:>7}  objective={v:>9}  {state}{'  ' + extra if extra else ''}")
