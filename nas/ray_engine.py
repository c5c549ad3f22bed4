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

The trainable wraps :func:`nas.trial.run_trial`; that function knows nothing of Ray.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from meme.cli import UserError
from nas.record import log_trial, prepare, status_text, values_for
from nas.study import Deadline, Settings, make_sampler

log = logging.getLogger("nas.search")
METRIC = "objective"
PROGRESS_ATTRS = ("trained_steps", "train_steps_total", "train_gflops_total", "wall_s", "peak_mem_mb", "device",
                  "params_proxy", "seed", "node")


def init_ray(address: Optional[str]) -> bool:
    """Join ``address`` (or $RAY_ADDRESS), else start a quiet local instance.

    Returns True when this call connected (so the caller should shut Ray down), False
    when Ray was already initialised in this process (e.g. by a test fixture).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env=code_runtime_env())
        except Exception as exc:  # ConnectionError, RuntimeError, TimeoutError...
            msg = str(exc).strip().splitlines()
            raise UserError(f"cannot join Ray cluster at {address}: {msg[0] if msg else type(exc).__name__}") from None
        return True
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=True)
    return True


def code_runtime_env() -> dict[str, Any]:
    """Ship this process's ``meme`` and ``nas`` packages to every worker of the cluster.

    A worker node then needs only Python, the dependencies and the proxy's data; it
    runs exactly the code the driver runs, whatever (if anything) is installed there.
    """
    import meme
    import nas

    dirs = [str(Path(m.__file__).resolve().parent) for m in (meme, nas)]
    return {"py_modules": dirs, "excludes": ["__pycache__", "*.pyc"]}


def default_gpus_per_trial(requested: Optional[float]) -> float:
    """Half a GPU per trial when the *cluster* has GPUs (a CPU-only head must still use
    its workers' GPUs), none otherwise; an explicit value wins."""
    import ray

    if requested is not None:
        return requested
    return 0.5 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes: ray.init keeps retrying an address nobody answers."""
    import socket

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
    from ray import tune

    from meme.cli import pick_device
    from meme.config import MemeConfig
    from nas.record import one_line
    from nas.proxy import proxy_config
    from meme.compute import train_gflops_per_step, training_gflops
    from nas.trial import peak_memory_mb, run_trial

    if not config["feasible"]:  # over budget: nothing is trained
        tune.report({"infeasible": 1, "trained_steps": 0})
        return
    if config.get("duplicate_of") is not None:  # result reused from an identical trial
        tune.report({"duplicate": 1, "trained_steps": 0})
        return
    import ray

    node = ray.get_runtime_context().get_node_id()[:12]  # which cluster node trained it
    t0 = time.perf_counter()
    dev = pick_device(device)
    dev_name = str(dev)
    steps = [0]
    per = proxy.steps_per_budget_step(int(config["num_experts_"]))
    step_gflops: list[float] = []

    def report(step: int, value: float) -> bool:
        n = steps[0] = step * per
        row = {METRIC: value, "step": step, "trained_steps": n, "train_steps_total": n,
               "train_gflops_total": training_gflops(step_gflops, n),
               "wall_s": time.perf_counter() - t0, "peak_mem_mb": peak_memory_mb(dev), "device": dev_name,
               "seed": proxy.seed, "stopped_early": False, "node": node}
        if multi:
            row["cost"] = config["cost"]
        tune.report(row)
        return False  # Tune stops a trial by not resuming it

    try:
        cfg = MemeConfig.from_yaml(config["config_yaml"], "candidate")
        step_gflops += train_gflops_per_step(proxy_config(cfg, proxy), proxy.batch_size)
        run_trial(cfg, proxy, report, objective=objective, device=device, threads=threads)
    except Exception as exc:  # recorded FAIL with the reason; the search goes on
        tune.report({"fail_reason": one_line(exc), "trained_steps": steps[0], "node": node})


def _make_searcher_class():
    from ray.tune.search import Searcher

    class StudySearcher(Searcher):
        """Tune searcher over one Optuna study (public APIs of both libraries only)."""

        def __init__(self, settings: Settings, storage, bar=None, metric=None, mode=None, beat=None):
            super().__init__(metric=metric, mode=mode)
            self.settings = settings
            self.bar = bar
            self.beat = beat  # nas.study.Heartbeat: stamps the trials in flight
            self.study = optuna.create_study(storage=storage, study_name=settings.study_name,
                                             sampler=make_sampler(settings), directions=settings.directions,
                                             load_if_exists=True)
            self.live: dict[str, optuna.Trial] = {}
            self.meta: dict[str, dict[str, Any]] = {}
            self.reported: dict[str, int] = {}
            self.deadline = Deadline(settings.time_budget)
            self.deadline_said = False

        def __getstate__(self) -> dict:
            """Tune pickles its searcher into the experiment state: the heartbeat thread
            and the progress bar stay with the live driver."""
            state = self.__dict__.copy()
            state["beat"] = state["bar"] = None
            return state

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True  # the space is the study's define-by-run function, not a Tune config

        def suggest(self, trial_id: str):
            if self.deadline.passed():  # no new trial; running ones finish normally
                if not self.deadline_said:
                    self.deadline_said = True
                    (self.bar.write if self.bar else print)(
                        f"time budget of {self.settings.time_budget:.0f} s used up: no new trial")
                return Searcher.FINISHED
            trial = self.study.ask()
            if self.beat is not None:
                self.beat.add(trial.number)
            cand = prepare(trial, self.settings)
            params = {"config_yaml": cand.config.to_yaml(), "feasible": cand.feasible, "gflops": cand.gflops,
                      "cost": cand.pareto_cost(self.settings) if self.settings.multi else cand.gflops,
                      "rejection": cand.rejection,
                      "optuna_number": trial.number, "num_experts_": cand.config.num_experts,
                      "duplicate_of": cand.duplicate_of, "duplicate_values": cand.duplicate_values}
            self.live[trial_id], self.meta[trial_id] = trial, params
            return params

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            ot = self.live.get(trial_id)
            if ot is None or self.settings.multi or METRIC not in result:
                return
            step = int(result.get("step", 0))
            ot.report(float(result[METRIC]), step)
            self.reported[trial_id] = step
            record_progress(ot, result)

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            ot = self.live.pop(trial_id, None)
            if ot is None:
                return
            meta = self.meta.pop(trial_id, {})
            result = result or {}
            n, g = meta.get("num_experts_"), meta.get("gflops")
            values, state, value, extra = None, TrialState.FAIL, None, ""
            if not meta.get("feasible", True):
                state, extra = TrialState.PRUNED, "REJECTED (over budget, not trained)"
                status = status_text("rejected", reason=meta.get("rejection", ""))
            elif meta.get("duplicate_of") is not None:
                state, values, value = TrialState.COMPLETE, meta["duplicate_values"], meta["duplicate_values"][0]
                extra = f"COMPLETE  (duplicate of trial {meta['duplicate_of']}: result reused)"
                status = status_text("duplicate", twin=meta["duplicate_of"])
            elif error or "fail_reason" in result or METRIC not in result:
                reason = result.get("fail_reason") or ("trial errored in Ray (its worker or node died)" if error
                                                      else "no result reported")
                ot.set_user_attr("fail_reason", reason)
                record_progress(ot, result)
                extra, status = f"FAIL  {reason}", status_text("failed", reason=reason)
            else:
                value = float(result[METRIC])
                step = int(result.get("step", 0))
                early = step < self.settings.space.proxy.steps
                record_progress(ot, result)
                ot.set_user_attr("stopped_early", early)
                if not self.settings.multi and self.reported.get(trial_id) != step and math.isfinite(value):
                    ot.report(value, step)  # the result ASHA stopped on never reached on_trial_result
                if not math.isfinite(value):
                    ot.set_user_attr("fail_reason", f"objective is {value}")
                    extra, status = f"FAIL  objective is {value}", status_text("failed", reason=f"objective is {value}")
                elif early:
                    state, extra = TrialState.PRUNED, f"PRUNED at step {step}  ({float(result.get('wall_s', 0)):.0f} s)"
                    status = status_text("stopped", step=step)
                else:
                    state, values = TrialState.COMPLETE, values_for(value, meta.get("cost", g), self.settings)
                    extra, status = f"COMPLETE  ({float(result.get('wall_s', 0)):.0f} s)", status_text("trained")
            self.reported.pop(trial_id, None)
            try:
                ot.set_user_attr("status", status)
                self.study.tell(ot, values, state=state)
            except Exception as exc:  # never lose the run over one bookkeeping error
                log.warning("could not record trial %s: %s", ot.number, exc)
            if self.beat is not None:
                self.beat.discard(ot.number)
            log_trial(ot.number, n, g, value, extra, write=self.bar.write if self.bar else print)
            if self.bar is not None and state != TrialState.FAIL:
                self.bar.update(1)

        # Tune checkpoints searchers; the study lives in the RDB storage and --resume
        # reads it from there, so there is nothing else to save.
        def save(self, checkpoint_path: str) -> None:
            return None

        def restore(self, checkpoint_path: str) -> None:
            return None

    return StudySearcher


def record_progress(ot, result: dict) -> None:
    """Measurements a trial reported -> user attrs (same names as the Optuna engine)."""
    for k in PROGRESS_ATTRS:
        if k in result:
            v = result[k]
            ot.set_user_attr(k, round(v, 2) if isinstance(v, float) else v)


def run(s: Settings, storage: optuna.storages.BaseStorage, remaining: int, bar=None,
        reference_job=None, beat=None) -> Any:
    """Run ``remaining`` more trials through Ray Tune; returns the reference job's result."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # infeasible/failed report no metric
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    StudySearcher = _make_searcher_class()
    proxy = s.space.proxy
    mode = ["min", "min"] if s.multi else "min"
    metric = [METRIC, "cost"] if s.multi else METRIC
    search = StudySearcher(s, storage, bar=bar, metric=metric, mode=mode, beat=beat)
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
