"""Plain Optuna engine: ask/tell loop in this process, successive-halving pruning.

Used where Ray is absent (``--executor optuna``), for single-GPU boxes, and by default
for the supernet evaluator on one machine: the trial body is the same ``run_trial`` the
Ray engine runs, and every outcome is recorded by ``nas.engine.record.finish``, as under Ray.

Supernet scores (about a second each on a CPU core) are spread over a pool of
single-thread worker processes, one per core: ``ask``, pricing and ``tell`` stay here,
with the study, and each worker keeps its own scorer (``nas.evaluators.supernet_score.scorer_for``)
for the whole search. Measured on 2 cores (README, "supernet evaluator"): a Ray Tune
trial costs more scheduling and bookkeeping than the score it runs, and two threads on
one forward are slower than two processes on two.

Trained trials run several at once when ``--trials-at-once`` says so, or, on a GPU, as
many as ``nas.evaluators.device_share`` measures it holds: each in its own worker process,
which sends every report here and waits for the pruner's answer. The study, its sampler
and its pruner stay in this process, so pruning works as in the serial loop.
"""
from __future__ import annotations

import logging
import multiprocessing
import queue
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Optional

import optuna
import torch
from tqdm import tqdm

from meme.common.errors import one_line
from meme.model.config import MemeConfig
from nas.engine import record
from nas.engine.heartbeat import Heartbeat
from nas.engine.replicates import default_jobs, single_thread_worker
from nas.engine.settings import Deadline, Settings
from nas.engine.study import counted
from nas.evaluators.device_share import share_for_search
from nas.evaluators.trial import TrialResult, run_trial
from nas.space.proxy import ProxySpec

log = logging.getLogger("nas.engine.optuna_engine")
POLL_S = 0.05              # longest wait for a report or a finished trial
REPORT_TIMEOUT_S = 3600.0  # a worker waits this long for the pruner's answer (the engine may be pricing a
                           # candidate, timing it for a latency table) before it gives up


def run(s: Settings, study: optuna.Study, beat: Optional[Heartbeat] = None,
        deadline: Optional[Deadline] = None) -> optuna.Study:
    """Trials until the study counts ``s.trials`` (or ``deadline`` passes); ``study`` comes
    from ``nas.engine.study.open_study`` (its sampler and pruner attached)."""
    deadline = deadline or Deadline(s.time_budget)
    bar = tqdm(total=s.trials, initial=counted(study), desc="trials", unit="trial",
               disable=None if s.progress else True)
    draws = _Draws(s, study, deadline, bar)
    workers = score_workers(s)
    trainers = train_workers(s) if workers == 1 else 1
    if workers > 1:
        _run_pooled(s, study, beat, draws, bar, workers)
    elif trainers > 1:
        _run_trained_pooled(s, study, beat, draws, bar, trainers)
    else:
        _run_serial(s, study, beat, draws, bar)
    bar.close()
    return study


def score_workers(s: Settings) -> int:
    """Worker processes for supernet scores: one per core on a CPU (1: score in this process).
    Trained trials stay in this process: their pruning asks the study at every rung."""
    if s.space.proxy.evaluator != "supernet":
        return 1
    return max(1, int(default_jobs(s.device) // max(1.0, s.cpus_per_trial)))


def train_workers(s: Settings) -> int:
    """Trained trials at once: ``--trials-at-once``, else on a GPU what one GPU holds
    (``nas.evaluators.device_share``, measured once), else 1."""
    if s.space.proxy.evaluator == "supernet":  # scores: one forward per interval, pooled by score_workers
        return 1
    if s.trials_at_once:
        return s.trials_at_once
    share = share_for_search(s.space, s.device, s.quality, s.cpus_per_trial)
    if share.trials > 1 or share.limit != "cpu":
        log.info("%s", share.describe())
    return share.trials


class _Draws:
    """Whether a new trial may start: the study short of ``s.trials`` (with those in
    flight), fewer than 3 x ``s.trials`` draws (duplicates and rejections count, so a
    space that keeps drawing them ends), and the deadline not passed (said once)."""

    def __init__(self, s: Settings, study: optuna.Study, deadline: Deadline, bar):
        self.s, self.study, self.deadline, self.bar = s, study, deadline, bar
        self.attempts = 0
        self.said = False

    def allow(self, in_flight: int = 0) -> bool:
        if counted(self.study) + in_flight >= self.s.trials or self.attempts >= 3 * self.s.trials:
            return False
        if self.deadline.passed():
            if not self.said:
                self.bar.write("time budget reached (time kept for the re-rank included): no new trial")
                self.said = True
            return False
        self.attempts += 1
        return True


def _run_serial(s: Settings, study: optuna.Study, beat: Optional[Heartbeat], draws: _Draws, bar) -> None:
    while draws.allow():
        trial, cand, outcome = _ask(study, s, beat)
        if outcome is None:
            try:
                outcome = _train(trial, cand, s)
            except Exception as exc:  # recorded, and the search goes on
                outcome = record.failed(one_line(exc, typed=True))
        _finish(study, trial, outcome, cand, beat, bar)


def _ask(study: optuna.Study, s: Settings, beat: Optional[Heartbeat]
         ) -> tuple[optuna.Trial, Optional[record.Candidate], Optional[record.Outcome]]:
    """The next candidate, drawn and priced; its outcome already when it needs no run
    (over budget, a duplicate, or a draw that failed), else None."""
    trial = study.ask()
    if beat is not None:
        beat.add(trial.number)
    cand = None
    try:
        cand = record.prepare(trial, s)
        outcome = record.settled(cand)
    except Exception as exc:  # recorded, and the search goes on
        outcome = record.failed(one_line(exc, typed=True))
    return trial, cand, outcome


@dataclass
class _PoolJob:
    """What a pool of worker processes does with each candidate: ``submit`` it, ``judge`` the
    worker's TrialResult, and, while waiting (at most ``poll`` s; None: until one is done),
    ``serve`` the workers (answer their reports)."""

    what: str                                   # 'score' or 'trial': for the messages
    submit: Callable[[ProcessPoolExecutor, optuna.Trial, record.Candidate], Future]
    judge: Callable[[optuna.Trial, record.Candidate, TrialResult], record.Outcome]
    serve: Callable[[], None] = lambda: None
    poll: Optional[float] = None
    done: Callable[[optuna.Trial], None] = lambda trial: None   # a candidate left the pool


def _run_in_pool(s: Settings, study: optuna.Study, beat: Optional[Heartbeat], draws: _Draws, bar,
                 pool: ProcessPoolExecutor, workers: int, job: _PoolJob) -> bool:
    """Ask and price here, one candidate in flight per worker; True when a worker died (the
    pool takes no more, the caller goes on one at a time)."""
    pending: dict[Future, tuple[optuna.Trial, record.Candidate]] = {}
    broken = False
    while True:
        while not broken and len(pending) < workers and draws.allow(len(pending)):
            trial, cand, outcome = _ask(study, s, beat)
            if outcome is not None:
                _finish(study, trial, outcome, cand, beat, bar)
                continue
            try:
                fut = job.submit(pool, trial, cand)
            except BrokenProcessPool:  # a worker died (killed, out of memory): the pool takes no more
                job.done(trial)
                _finish(study, trial, record.failed(f"a {job.what} worker died"), cand, beat, bar)
                broken = True
                break
            pending[fut] = (trial, cand)
        if not pending:
            return broken
        job.serve()
        done, _ = wait(pending, timeout=job.poll, return_when=FIRST_COMPLETED)
        for fut in done:
            trial, cand = pending.pop(fut)
            job.done(trial)
            try:
                outcome = job.judge(trial, cand, fut.result())
            except Exception as exc:  # the worker's error, or a worker that died
                outcome = record.failed(one_line(exc, typed=True))
            _finish(study, trial, outcome, cand, beat, bar)


def _run_pooled(s: Settings, study: optuna.Study, beat: Optional[Heartbeat], draws: _Draws, bar,
                workers: int) -> None:
    """Supernet scores in ``workers`` single-thread processes."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    job = _PoolJob("score", lambda pool, trial, cand: pool.submit(score_one, cand.config.to_yaml(), s.space.proxy,
                                                                  s.device),
                   lambda trial, cand, res: _scored(trial, cand, s, res))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=single_thread_worker) as pool:
        broken = _run_in_pool(s, study, beat, draws, bar, pool, workers, job)
    if broken:  # the search goes on, one score at a time
        bar.write("a score worker died: the rest of the search scores in this process")
        _run_serial(s, study, beat, draws, bar)


def _run_trained_pooled(s: Settings, study: optuna.Study, beat: Optional[Heartbeat], draws: _Draws, bar,
                        workers: int) -> None:
    """Trained trials in ``workers`` processes; reports, pruning and tells stay here.

    A worker's report arrives on ``requests`` as (trial number, step, value); the answer
    (stop or not) goes back on that trial's own queue. The loop waits at most ``POLL_S``
    for either a report or a finished trial.
    """
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads or CUDA
    threads = max(1, int(s.cpus_per_trial))
    live: dict[int, tuple[optuna.Trial, record.Candidate, Any]] = {}
    with ctx.Manager() as manager:
        requests = manager.Queue()

        def submit(pool: ProcessPoolExecutor, trial: optuna.Trial, cand: record.Candidate) -> Future:
            answers = manager.Queue()
            live[trial.number] = (trial, cand, answers)
            return pool.submit(train_one, cand.config.to_yaml(), s.space.proxy, s.quality, s.device, threads,
                               trial.number, requests, answers)

        job = _PoolJob("trial", submit, lambda trial, cand, res: _judged(res, cand, s),
                       serve=lambda: _answer_reports(s, requests, live), poll=POLL_S,
                       done=lambda trial: live.pop(trial.number, None))
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        try:
            broken = _run_in_pool(s, study, beat, draws, bar, pool, workers, job)
        finally:    # stopped by an error or Ctrl-C: workers waiting for an answer are told to stop
            for _, _, answers in live.values():
                answers.put(True)
            pool.shutdown(wait=True, cancel_futures=True)
    if broken:  # the search goes on, one trial at a time
        bar.write("a trial worker died: the rest of the search trains one trial at a time")
        _run_serial(s, study, beat, draws, bar)


def _answer_reports(s: Settings, requests, by_number: dict) -> None:
    """Every report waiting: record it on its trial and send the pruner's answer back."""
    while True:
        try:
            number, step, value = requests.get_nowait()
        except queue.Empty:
            return
        live = by_number.get(number)
        if live is None:    # its trial already left the pool (finished, or stopped): nobody waits for the answer
            continue
        trial, cand, answers = live
        answers.put(_report(trial, cand, s, step, value))


def _report(trial: optuna.Trial, cand: record.Candidate, s: Settings, step: int, value: float) -> bool:
    """One report of a trained trial (budget step, objective) -> stop it now?"""
    trial.set_user_attr("trained_steps", step * s.space.proxy.steps_per_budget_step(cand.config.num_experts))
    if s.multi:
        return False
    trial.report(value, step)
    return trial.should_prune()


def train_one(config_yaml: str, proxy: ProxySpec, objective: str, device: Optional[str], threads: int,
              number: int, requests, answers) -> TrialResult:
    """A worker's job: one trained trial, each report answered by the engine's pruner."""
    torch.set_num_threads(threads)
    cfg = MemeConfig.from_yaml(config_yaml, "candidate")

    def report(step: int, value: float) -> bool:
        requests.put((number, step, value))
        return bool(answers.get(timeout=REPORT_TIMEOUT_S))

    return run_trial(cfg, proxy, report, objective=objective, device=device, threads=threads)


def score_one(config_yaml: str, proxy: ProxySpec, device: Optional[str]) -> TrialResult:
    """A worker's job: one candidate's supernet score (``nas.evaluators.trial.run_trial``, one report)."""
    cfg = MemeConfig.from_yaml(config_yaml, "candidate")
    return run_trial(cfg, proxy, lambda step, value: False, objective="loss", device=device)


def _scored(trial: optuna.Trial, cand: record.Candidate, s: Settings, res: TrialResult) -> record.Outcome:
    if not s.multi:
        for step, value in res.history:
            trial.report(value, step)
    return _judged(res, cand, s)


def _judged(res: TrialResult, cand: record.Candidate, s: Settings) -> record.Outcome:
    """A finished run_trial -> its Outcome (the last reported budget step, its own attrs)."""
    return record.judged(res.objective, res.history[-1][0] if res.history else 0, res.stopped_early, res.wall_s,
                         cand, s, record.result_attrs(res))


def _finish(study: optuna.Study, trial: optuna.Trial, outcome: record.Outcome, cand: Optional[record.Candidate],
            beat: Optional[Heartbeat], bar) -> None:
    record.finish(study, trial, outcome, cand, write=bar.write)
    if beat is not None:
        beat.discard(trial.number)
    if outcome.kind != "failed":
        bar.update(1)


def _train(trial: optuna.Trial, cand: record.Candidate, s: Settings) -> record.Outcome:
    def report(step: int, value: float) -> bool:
        return _report(trial, cand, s, step, value)

    res = run_trial(cand.config, s.space.proxy, report, objective=s.quality, device=s.device,
                    threads=max(1, int(s.cpus_per_trial)))
    return _judged(res, cand, s)
