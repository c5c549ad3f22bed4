"""Plain Optuna engine: ask/tell loop in this process, successive-halving pruning.

Used where Ray is absent (``--executor optuna``) and for single-GPU boxes: the trial
body is the same ``run_trial`` the Ray engine runs, and every outcome is recorded by
``nas.record.finish``, as under Ray.
"""
from __future__ import annotations

from typing import Optional

import optuna
from tqdm import tqdm

from meme.errors import one_line
from nas import record
from nas.heartbeat import Heartbeat
from nas.settings import Deadline, Settings
from nas.study import counted
from nas.trial import run_trial


def run(s: Settings, study: optuna.Study, beat: Optional[Heartbeat] = None,
        deadline: Optional[Deadline] = None) -> optuna.Study:
    """Trials until the study counts ``s.trials`` (or ``deadline`` passes); ``study`` comes
    from ``nas.study.open_study`` (its sampler and pruner attached)."""
    deadline = deadline or Deadline(s.time_budget)
    bar = tqdm(total=s.trials, initial=counted(study), desc="trials", unit="trial",
               disable=None if s.progress else True)
    attempts = 0
    while counted(study) < s.trials and attempts < 3 * s.trials:
        if deadline.passed():
            bar.write("time budget reached (time kept for the re-rank included): no new trial")
            break
        attempts += 1
        trial = study.ask()
        if beat is not None:
            beat.add(trial.number)
        cand = None
        try:
            cand = record.prepare(trial, s)
            outcome = record.settled(cand) or _train(trial, cand, s)
        except Exception as exc:  # recorded, and the search goes on
            outcome = record.failed(one_line(exc, typed=True))
        record.finish(study, trial, outcome, cand, write=bar.write)
        if beat is not None:
            beat.discard(trial.number)
        if outcome.kind != "failed":
            bar.update(1)
    bar.close()
    return study


def _train(trial: optuna.Trial, cand: record.Candidate, s: Settings) -> record.Outcome:
    per = s.space.proxy.steps_per_budget_step(cand.config.num_experts)

    def report(step: int, value: float) -> bool:
        trial.set_user_attr("trained_steps", step * per)
        if s.multi:
            return False
        trial.report(value, step)
        return trial.should_prune()

    res = run_trial(cand.config, s.space.proxy, report, objective=s.quality, device=s.device,
                    threads=max(1, int(s.cpus_per_trial)))
    return record.judged(res.objective, res.history[-1][0] if res.history else 0, res.stopped_early, res.wall_s,
                         cand, s, record.result_attrs(res))
