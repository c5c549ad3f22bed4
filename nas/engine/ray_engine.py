"""Ray Tune engine: Optuna ask/tell behind Ray's public ``Searcher`` API, ASHA over a cluster.

:class:`StudySearcher` is a plain Tune ``Searcher`` that asks the study for each new
trial and tells it the outcome, so both engines write the same study:

* intermediate values are stored at the real training step (``result['step']``);
* a trial ASHA stops is told PRUNED with every value it reported (Tune does not pass
  the result it stopped on to ``on_trial_result``, so that one is reported on
  completion): TPE never mistakes a rung value for a final objective;
* over-budget candidates are told PRUNED with their ``constraint`` attr (the trainable
  returns at once for them, so no compute is spent), failures FAIL with a reason;
* measurements (wall time, memory, device, training compute) become user attrs.

Every outcome is turned into a ``nas.engine.record.Outcome`` and recorded by
``nas.engine.record.finish``, as under the plain Optuna engine.

The trainable wraps :func:`nas.evaluators.trial.run_trial`; that function knows nothing of Ray.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

import optuna

import meme
import nas
from meme.common.device import pick_device
from meme.common.errors import UserError, one_line
from meme.model.config import MemeConfig
from meme.training.compute import train_gflops_per_step, training_gflops
from nas.engine import record
from nas.engine.heartbeat import Heartbeat
from nas.engine.settings import Deadline, Settings
from nas.evaluators.device_share import share_for_search
from nas.evaluators.trial import peak_memory_mb, run_trial
from nas.space.proxy import proxy_config

log = logging.getLogger(__name__)
METRIC = "objective"
SETTLED_PER_SUGGEST = 200  # over-budget / duplicate candidates recorded in one suggest() before Tune gets control back
PROGRESS_ATTRS = ("trained_steps", "train_steps_total", "train_gflops_total", "wall_s", "peak_mem_mb", "device",
                  "params_proxy", "seed", "node")


def init_ray(address: Optional[str]) -> bool:
    """Join ``address`` (or $RAY_ADDRESS), else start a quiet local instance.

    Returns True when this call connected (so the caller should shut Ray down), False
    when Ray was already initialised in this process (e.g. by a test fixture).
    """
    import ray  # optional dependency: only the Ray engine needs it

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env=code_runtime_env())
        except Exception as exc:  # ConnectionError, RuntimeError, TimeoutError...
            raise UserError(f"cannot join Ray cluster at {address}: {one_line(exc)}") from None
        return True
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=True)
    return True


def code_runtime_env() -> dict[str, Any]:
    """Ship this process's ``meme`` and ``nas`` packages to every worker of the cluster.

    A worker node then needs only Python, the dependencies and the proxy's data; it
    runs exactly the code the driver runs, whatever (if anything) is installed there.
    """
    dirs = [str(Path(m.__file__).resolve().parent) for m in (meme, nas)]
    return {"py_modules": dirs, "excludes": ["__pycache__", "*.pyc"]}


def default_gpus_per_trial(requested: Optional[float], s: Optional[Settings] = None) -> float:
    """The GPU share of a trial: an explicit value wins; none when the *cluster* has no GPUs
    (a CPU-only head must still use its workers' GPUs); else 1 / ``--trials-at-once``, or
    1 / what one GPU holds (``nas.evaluators.device_share``, measured by a task on one
    worker GPU). Supernet scores keep half a GPU each: a score is one forward per interval."""
    import ray  # optional dependency

    if requested is not None:
        return requested
    if ray.cluster_resources().get("GPU", 0) <= 0:
        return 0.0
    if s is None or s.space.proxy.evaluator == "supernet":
        return 0.5
    if s.trials_at_once:
        return 1.0 / s.trials_at_once
    share = ray.get(ray.remote(share_for_search).options(num_gpus=1, num_cpus=1).remote(
        s.space, "cuda", s.quality, s.cpus_per_trial))
    print(share.describe())
    return 1.0 / share.trials


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes: ray.init keeps retrying an address nobody answers."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address must look like HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot join Ray cluster at {address}: {exc.strerror or exc}") from None


def trainable(config: dict, proxy=None, objective: str = "loss", device: Optional[str] = None,
              multi: bool = False, threads: int = 1) -> None:
    """One Tune trial: run_trial on the candidate, reporting to Tune; never raises."""
    import ray  # optional dependency: this runs inside a Ray worker
    from ray import tune

    node = ray.get_runtime_context().get_node_id()[:12]  # which cluster node trained it
    t0 = time.perf_counter()
    dev = pick_device(device)
    dev_name = str(dev)
    steps = [0]
    per = proxy.steps_per_budget_step(int(config["num_experts_"]))
    step_gflops: list[float] = []
    last: dict[str, Any] = {}

    def report(step: int, value: float) -> bool:
        n = steps[0] = step * per
        row = {METRIC: value, "step": step, "trained_steps": n, "train_steps_total": n,
               "train_gflops_total": training_gflops(step_gflops, n),
               "wall_s": time.perf_counter() - t0, "peak_mem_mb": peak_memory_mb(dev), "device": dev_name,
               "seed": proxy.seed, "stopped_early": False, "node": node}
        if multi:
            row["cost"] = config["cost"]
        last.update(row)
        tune.report(row)
        return False  # Tune stops a trial by not resuming it

    try:
        cfg = MemeConfig.from_yaml(config["config_yaml"], "candidate")
        step_gflops += train_gflops_per_step(proxy_config(cfg, proxy), proxy.batch_size)
        res = run_trial(cfg, proxy, report, objective=objective, device=device, threads=threads)
        # Reached only when no scheduler stopped it: the trial ran to its end (a supernet score
        # reports once, at budget step 0). Its whole record travels as the Optuna engine's does.
        tune.report({**last, METRIC: res.objective, "completed": 1,
                     "attrs_json": json.dumps({**record.result_attrs(res), "node": node})})
    except Exception as exc:  # recorded FAIL with the reason; the search goes on
        tune.report({"fail_reason": one_line(exc, typed=True), "trained_steps": steps[0], "node": node})


def _make_searcher_class():
    from ray.tune.search import Searcher  # optional dependency: defined once Ray is imported

    class StudySearcher(Searcher):
        """Tune searcher over one Optuna study (public APIs of both libraries only)."""

        def __init__(self, settings: Settings, study: optuna.Study, remaining: int, bar=None, metric=None,
                     mode=None, beat: Optional[Heartbeat] = None, deadline: Optional[Deadline] = None):
            super().__init__(metric=metric, mode=mode)
            self.settings = settings
            self.remaining = remaining  # trials this run may add to the study, rejected ones included
            self.asked = 0
            self.bar = bar
            self.beat = beat  # stamps the trials in flight
            self.study = study
            self.live: dict[str, optuna.Trial] = {}
            self.cands: dict[str, record.Candidate] = {}
            self.reported: dict[str, int] = {}
            self.deadline = deadline or Deadline(settings.time_budget)
            self.deadline_said = False

        def __getstate__(self) -> dict:
            """Tune pickles its searcher into the experiment state (for ``Tuner.restore``, which
            this search does not use: ``--resume`` reads the study's RDB). The heartbeat thread,
            the progress bar, the deadline (its reserve is a closure) and the live study (NSGA-II's
            sampler holds a lock) stay with the driver."""
            state = self.__dict__.copy()
            state["beat"] = state["bar"] = state["deadline"] = state["study"] = None
            state["live"] = {}
            return state

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True  # the space is the study's define-by-run function, not a Tune config

        def write(self, line: str) -> None:
            (self.bar.write if self.bar else print)(line)

        def suggest(self, trial_id: str):
            """The next candidate worth a worker. Over-budget and duplicate candidates are
            recorded here, on the driver, and never scheduled: a Tune trial costs about a
            second of start-up and bookkeeping, as much as a supernet score."""
            for _ in range(SETTLED_PER_SUGGEST):
                if self.deadline.passed():  # no new trial; running ones finish normally
                    if not self.deadline_said:
                        self.deadline_said = True
                        self.write("time budget reached (time kept for the re-rank included): no new trial")
                    return Searcher.FINISHED
                if self.asked >= self.remaining:
                    return Searcher.FINISHED
                self.asked += 1
                trial = self.study.ask()
                try:
                    cand = record.prepare(trial, self.settings)
                except Exception as exc:  # recorded, and the search goes on (as in the Optuna engine)
                    record.finish(self.study, trial, record.failed(one_line(exc, typed=True)), None, write=self.write)
                    continue
                outcome = record.settled(cand)
                if outcome is not None:
                    record.finish(self.study, trial, outcome, cand, write=self.write)
                    if self.bar is not None:
                        self.bar.update(1)
                    continue
                if self.beat is not None:
                    self.beat.add(trial.number)
                self.live[trial_id], self.cands[trial_id] = trial, cand
                return {"config_yaml": cand.config.to_yaml(),
                        "cost": cand.pareto_cost(self.settings),  # a Pareto search's second value (trainable reports it)
                        "num_experts_": cand.config.num_experts}
            return None  # Tune asks again

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            ot = self.live.get(trial_id)
            if ot is None or self.settings.multi or METRIC not in result or result.get("completed"):
                return
            step = int(result.get("step", 0))
            ot.report(float(result[METRIC]), step)
            self.reported[trial_id] = step
            for k, v in progress_attrs(result).items():
                ot.set_user_attr(k, v)

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            ot = self.live.pop(trial_id, None)
            if ot is None:
                return
            cand = self.cands.pop(trial_id)
            reported = self.reported.pop(trial_id, None)
            outcome = self.outcome(ot, cand, result or {}, error, reported)
            try:
                record.finish(self.study, ot, outcome, cand, write=self.write)
            except Exception as exc:  # never lose the run over one bookkeeping error
                log.warning("could not record trial %s: %s", ot.number, one_line(exc))
            if self.beat is not None:
                self.beat.discard(ot.number)
            if self.bar is not None and outcome.kind != "failed":
                self.bar.update(1)

        def outcome(self, ot: optuna.Trial, cand: record.Candidate, result: dict, error: bool,
                    reported: Optional[int]) -> record.Outcome:
            """Tune's last result for a trial -> its Outcome."""
            s = self.settings
            if error or "fail_reason" in result or METRIC not in result:
                reason = result.get("fail_reason") or ("trial errored in Ray (its worker or node died)" if error
                                                      else "no result reported")
                return record.failed(reason, progress_attrs(result))
            value, step = float(result[METRIC]), int(result.get("step", 0))
            if not s.multi and reported != step and math.isfinite(value):
                ot.report(value, step)  # the result ASHA stopped on never reached on_trial_result
            if result.get("completed"):   # ran to its end: its own record says whether it stopped early
                attrs = json.loads(result["attrs_json"])
                return record.judged(value, step, bool(attrs["stopped_early"]), float(attrs["wall_s"]), cand, s, attrs)
            return record.judged(value, step, step < s.space.proxy.steps, float(result.get("wall_s", 0)), cand, s,
                                 progress_attrs(result))

        # Tune checkpoints searchers; the study lives in the RDB storage and --resume
        # reads it from there, so there is nothing else to save.
        def save(self, checkpoint_path: str) -> None:
            return None

        def restore(self, checkpoint_path: str) -> None:
            return None

    return StudySearcher


def progress_attrs(result: dict) -> dict[str, Any]:
    """Measurements a trial reported -> user attrs (same names as the Optuna engine)."""
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items() if k in PROGRESS_ATTRS}


def run(s: Settings, study: optuna.Study, remaining: int, bar=None, reference_job=None,
        beat: Optional[Heartbeat] = None, deadline: Optional[Deadline] = None) -> Any:
    """Run ``remaining`` more trials through Ray Tune; returns the reference job's result.

    ``study`` comes from ``nas.engine.study.open_study`` (its sampler attached)."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a failed trial reports no metric
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray  # optional dependency
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    StudySearcher = _make_searcher_class()
    proxy = s.space.proxy
    mode = ["min", "min"] if s.multi else "min"
    metric = [METRIC, "cost"] if s.multi else METRIC
    search = StudySearcher(s, study, remaining, bar=bar, metric=metric, mode=mode, beat=beat, deadline=deadline)
    scheduler = None
    if not s.multi:  # rungs from proxy.first_rung(): past warm-up and a third of the budget
        scheduler = ASHAScheduler(time_attr="step", metric=METRIC, mode="min", max_t=proxy.steps,
                                  grace_period=proxy.first_rung(), reduction_factor=proxy.reduction_factor)
    fn = tune.with_parameters(trainable, proxy=proxy, objective=s.quality, device=s.device, multi=s.multi,
                              threads=max(1, int(s.cpus_per_trial)))
    fn = tune.with_resources(fn, {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    total = int(ray.cluster_resources().get("CPU", 1))
    concurrent = max(1, int(total // max(s.cpus_per_trial, 1e-6)))
    tuner = tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=remaining,
                                    max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=s.study_name, storage_path=str((s.out / "ray").resolve()), verbose=0,
                                  log_to_file=True,
                                  # a trial whose node dies is started again once, elsewhere
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    tuner.fit()
    return ray.get(reference_job) if reference_job is not None else None
