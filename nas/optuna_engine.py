"""Plain Optuna engine: ask/tell loop in this process, successive-halving pruning.

Used where Ray is absent (``--executor optuna``) and for single-GPU boxes: the trial
body is the same ``run_trial`` the Ray engine runs, the study the same format.
"""
from __future__ import annotations

import logging
from typing import Optional

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from nas.record import log_trial, one_line, prepare, result_attrs, status_text, values_for
from nas.study import Deadline, Heartbeat, Settings, counted, make_sampler
from nas.trial import run_trial

log = logging.getLogger("nas.search")


def make_pruner(s: Settings) -> optuna.pruners.BasePruner:
    if s.multi:  # Optuna cannot prune multi-objective trials
        return optuna.pruners.NopPruner()
    proxy = s.space.proxy  # first rung past warm-up and a third of the budget (proxy.first_rung)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=proxy.first_rung(),
                                                  reduction_factor=proxy.reduction_factor)


def run(s: Settings, storage: optuna.storages.BaseStorage, beat: Optional[Heartbeat] = None) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=s.study_name, sampler=make_sampler(s),
                                pruner=make_pruner(s), directions=s.directions, load_if_exists=True)
    deadline = Deadline(s.time_budget)
    done = counted(study)
    bar = tqdm(total=s.trials, initial=done, desc="trials", unit="trial", disable=None if s.progress else True)
    attempts = 0
    while counted(study) < s.trials and attempts < 3 * s.trials:
        if deadline.passed():
            bar.write(f"time budget of {s.time_budget:.0f} s used up: no new trial")
            break
        attempts += 1
        trial = study.ask()
        if beat is not None:
            beat.add(trial.number)
        cand = None
        try:
            cand = prepare(trial, s)
            if not cand.feasible:
                trial.set_user_attr("status", status_text("rejected", reason=cand.rejection))
                study.tell(trial, state=TrialState.PRUNED)
                log_trial(trial.number, cand.config.num_experts, cand.gflops, None,
                          "REJECTED (over budget, not trained)", write=bar.write)
                bar.update(1)
                continue
            if cand.duplicate_of is not None:
                trial.set_user_attr("status", status_text("duplicate", twin=cand.duplicate_of))
                study.tell(trial, cand.duplicate_values)
                log_trial(trial.number, cand.config.num_experts, cand.gflops, cand.duplicate_values[0],
                          f"COMPLETE  (duplicate of trial {cand.duplicate_of}: result reused)", write=bar.write)
                bar.update(1)
                continue

            per = s.space.proxy.steps_per_budget_step(cand.config.num_experts)

            def report(step: int, value: float) -> bool:
                trial.set_user_attr("trained_steps", step * per)
                if s.multi:
                    return False
                trial.report(value, step)
                return trial.should_prune()

            res = run_trial(cand.config, s.space.proxy, report, objective=s.quality, device=s.device,
                            threads=max(1, int(s.cpus_per_trial)))
        except Exception as exc:  # recorded, and the search goes on
            trial.set_user_attr("fail_reason", one_line(exc))
            trial.set_user_attr("status", status_text("failed", reason=one_line(exc)))
            study.tell(trial, state=TrialState.FAIL)
            log_trial(trial.number, cand.config.num_experts if cand else None, cand.gflops if cand else None,
                      None, f"FAIL  {one_line(exc)}", write=bar.write)
            continue
        for k, v in result_attrs(res).items():
            trial.set_user_attr(k, v)
        if res.stopped_early:
            trial.set_user_attr("status", status_text("stopped", step=res.history[-1][0]))
            study.tell(trial, state=TrialState.PRUNED)
            state = f"PRUNED at step {res.steps}"
        else:
            trial.set_user_attr("status", status_text("trained"))
            study.tell(trial, values_for(res.objective, cand.pareto_cost(s), s))
            state = "COMPLETE"
        log_trial(trial.number, cand.config.num_experts, cand.gflops, res.objective,
                  f"{state}  ({res.wall_s:.0f} s)", write=bar.write)
        bar.update(1)
    bar.close()
    return study
