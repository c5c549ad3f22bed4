"""How a trial is drawn, judged and recorded: the same under both engines.

Each engine turns its own events into an :class:`Outcome` and calls :func:`finish`, the
one place a trial's state, values, ``status`` and attributes reach the study.

How each outcome looks in the study (and in optuna-dashboard's state column):

==============  ==========  ================================================================
outcome         state       why
==============  ==========  ================================================================
trained         COMPLETE    its objective (and GFLOPs or ms per step for a Pareto search)
duplicate       COMPLETE    the result of the identical trial it names (``duplicate_of``)
stopped         PRUNED      the scheduler (ASHA) or pruner stopped it at a rung
rejected        PRUNED      over budget, never trained; ``constraint`` > 0, ``status``
                            ``rejected: ...``. PRUNED because TPE and NSGA-II read the
                            budget constraint only from COMPLETE and PRUNED trials (a FAIL
                            would hide the infeasible region from the sampler); the dashboard
                            draws these as "Infeasible Trial" in its plots and shows
                            ``status`` beside the state in the trial table
failed          FAIL        ``fail_reason``: one line
==============  ==========  ================================================================

User attributes of every trial (what ``trials.csv`` and the dashboard show):

========================  ==========================================================
``gflops``                budgeted cost (mean or max per --budget-mode), target shape
``gflops_mean/_max``      both figures; ``gflops_per_expert`` the list
``params``                parameters of all experts at the target shape
``params_unique``         the same with parts the experts share counted once
``share``                 what the experts hold in common (``ShareConfig.describe``: none, dec3...)
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
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from meme.model.config import MemeConfig
from nas.engine.settings import Settings
from nas.evaluators.trial import TrialResult
from nas.space.budget import cost_of
from nas.space.draw import build_config


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


def constraint_of(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Over budget, in the budget's unit (<= 0: feasible); trials without the attr count as feasible."""
    return [float(trial.user_attrs.get("constraint", 0.0))]


def set_constraint(trial: Any, value: float) -> None:
    """Record how far over budget a candidate is; the sampler reads it through constraint_of."""
    trial.set_user_attr("constraint", value)


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
             "gflops_per_expert": c.gflops_per_expert, "params": c.params, "params_unique": c.params_unique,
             "share": cfg.share.describe(), "paper_units": c.paper_units,
             "num_experts": cfg.num_experts, "config_yaml": cfg.to_yaml(), "config_hash": cfg.hash(),
             "trained_steps": 0, "stopped_early": False, **readable_attrs(cfg, c.params),
             "status": "running"}
    if s.space.widths.whole_network:   # every trial shows its widths, full-width ones too
        attrs["widths"] = " ".join(s.space.macro_and_width(e)[1] for e in cfg.experts)
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
    if any(e.decoder_channels for e in cfg.experts):   # experts of their own decoder widths
        out["decoder_channels"] = " ".join(str(e.decoder_channels or e.base_channels) for e in cfg.experts)
    return out


def status_text(kind: str, *, twin: Optional[int] = None, step: Optional[int] = None, reason: str = "") -> str:
    """The ``status`` attr: what happened to a trial, in words (same under both engines)."""
    return {"trained": "trained",
            "rejected": f"rejected: {reason}",
            "duplicate": f"duplicate of #{twin}",
            "stopped": f"stopped early at step {step}",
            "failed": f"failed: {reason}"}[kind]


STATES = {"trained": TrialState.COMPLETE, "duplicate": TrialState.COMPLETE, "stopped": TrialState.PRUNED,
          "rejected": TrialState.PRUNED, "failed": TrialState.FAIL}


@dataclass
class Outcome:
    """How one trial ended, in the terms of the study (the table in this module's docstring)."""

    kind: str                                   # a key of STATES
    status: str                                 # the ``status`` attr (status_text)
    note: str                                   # the tail of the trial's log line
    values: Optional[list[float]] = None        # told to the study (COMPLETE only)
    value: Optional[float] = None               # the objective, for the log line
    attrs: dict[str, Any] = field(default_factory=dict)  # measurements -> user attrs

    @property
    def state(self) -> TrialState:
        return STATES[self.kind]


def rejected(cand: Candidate) -> Outcome:
    return Outcome("rejected", status_text("rejected", reason=cand.rejection),
                   "REJECTED (over budget, not trained)")


def duplicate(cand: Candidate) -> Outcome:
    return Outcome("duplicate", status_text("duplicate", twin=cand.duplicate_of),
                   f"COMPLETE  (duplicate of trial {cand.duplicate_of}: result reused)",
                   values=list(cand.duplicate_values or []),
                   value=cand.duplicate_values[0] if cand.duplicate_values else None)


def settled(cand: Candidate) -> Optional[Outcome]:
    """The outcome of a candidate that needs no training (over budget, or a duplicate); None if it does."""
    if not cand.feasible:
        return rejected(cand)
    if cand.duplicate_of is not None:
        return duplicate(cand)
    return None


def failed(reason: str, attrs: Optional[dict[str, Any]] = None, value: Optional[float] = None) -> Outcome:
    return Outcome("failed", status_text("failed", reason=reason), f"FAIL  {reason}", value=value,
                   attrs={**(attrs or {}), "fail_reason": reason})


def judged(value: float, step: int, stopped_early: bool, wall_s: float, cand: Candidate, s: Settings,
           attrs: dict[str, Any]) -> Outcome:
    """A trial that trained and reported ``value`` at budget step ``step``."""
    attrs = {**attrs, "stopped_early": stopped_early}
    if not math.isfinite(value):
        return failed(f"objective is {value}", attrs, value)
    if stopped_early:
        return Outcome("stopped", status_text("stopped", step=step), f"PRUNED at step {step}  ({wall_s:.0f} s)",
                       value=value, attrs=attrs)
    return Outcome("trained", status_text("trained"), f"COMPLETE  ({wall_s:.0f} s)",
                   values=values_for(value, cand.pareto_cost(s), s), value=value, attrs=attrs)


def finish(study: optuna.Study, trial: optuna.Trial, outcome: Outcome, cand: Optional[Candidate],
           write: Callable[[str], None] = print) -> None:
    """Record ``outcome`` for ``trial``: attributes, status, state and values; one log line."""
    for k, v in outcome.attrs.items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("status", outcome.status)
    study.tell(trial, outcome.values, state=outcome.state)
    log_trial(trial.number, cand.config.num_experts if cand else None, cand.gflops if cand else None,
              outcome.value, outcome.note, write=write)


def result_attrs(res: TrialResult) -> dict[str, Any]:
    return {"trained_steps": res.steps, "train_steps_total": res.steps, "train_gflops_total": round(res.train_gflops, 1),
            "seed": res.seed, "stopped_early": res.stopped_early, "wall_s": round(res.wall_s, 2),
            "peak_mem_mb": round(res.peak_mem_mb, 1), "device": res.device, "params_proxy": res.params_proxy,
            **res.extra}


def values_for(objective: float, cost: float, s: Settings) -> list[float]:
    """Values told to the study: the objective, and in a Pareto search its cost (``Candidate.pareto_cost``)."""
    return [objective, cost] if s.multi else [objective]


def log_trial(number: int, n_experts: Optional[int], gflops: Optional[float], value: Optional[float],
              state: str, extra: str = "", write: Callable[[str], None] = print) -> None:
    v = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.5f}"
    g = "-" if gflops is None else f"{gflops:.2f}"
    n = "-" if n_experts is None else str(n_experts)
    write(f"trial {number:>3}  N={n}  gflops={g:>7}  objective={v:>9}  {state}{'  ' + extra if extra else ''}")
