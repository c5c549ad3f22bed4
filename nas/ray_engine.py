"""Ray Tune engine: OptunaSearch (define-by-run, constraints) + ASHA over a Ray cluster.

Ray's OptunaSearch is subclassed (:class:`StudySearch`) to keep the study in the same
format as the plain Optuna loop:

* intermediate values are stored at the real training step (``result['step']``), not
  at Tune's report counter;
* a trial ASHA stops never gets its last result reported (Tune skips the searcher on
  a STOP decision) and is told COMPLETE: we store that last value as an intermediate
  value and set ``stopped_early`` while the trial is still RUNNING, then tell;
* over-budget candidates are told PRUNED with their ``constraint`` attr (the trainable
  returns at once for them, so no compute is spent), failures FAIL with a reason;
* measurements (wall time, memory, device, trained steps) become user attrs.

The trainable wraps :func:`nas.trial.run_trial`; that function knows nothing of Ray.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from meme.cli import UserError
from nas.study import Deadline, Settings, log_trial, make_sampler, prepare, values_for

log = logging.getLogger("nas.search")
METRIC = "objective"


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
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as exc:  # ConnectionError, RuntimeError, TimeoutError...
            msg = str(exc).strip().splitlines()
            raise UserError(f"cannot join Ray cluster at {address}: {msg[0] if msg else type(exc).__name__}") from None
        return True
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=True)
    return True


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
    from nas.study import one_line
    from nas.trial import peak_memory_mb, run_trial

    if not config["feasible"]:  # over budget: nothing is trained
        tune.report({"infeasible": 1, "trained_steps": 0})
        return
    if config.get("duplicate_of") is not None:  # result reused from an identical trial
        tune.report({"duplicate": 1, "trained_steps": 0})
        return
    t0 = time.perf_counter()
    dev = pick_device(device)
    dev_name = str(dev)
    steps = [0]
    per = int(config["num_experts_"]) if proxy.steps_per_expert else 1

    def report(step: int, value: float) -> bool:
        steps[0] = step * per
        row = {METRIC: value, "step": step, "trained_steps": step * per, "wall_s": time.perf_counter() - t0,
               "peak_mem_mb": peak_memory_mb(dev), "device": dev_name, "stopped_early": False}
        if multi:
            row["gflops"] = config["gflops"]
        tune.report(row)
        return False  # Tune stops a trial by not resuming it

    try:
        cfg = MemeConfig.from_yaml(config["config_yaml"], "candidate")
        run_trial(cfg, proxy, report, objective=objective, device=device, threads=threads)
    except Exception as exc:  # recorded FAIL with the reason; the search goes on
        tune.report({"fail_reason": one_line(exc), "trained_steps": steps[0]})


def _make_search_class():
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        """OptunaSearch that records trials the way the plain Optuna engine does."""

        def __init__(self, settings: Settings, storage, bar=None, **kwargs):
            self.settings = settings
            self.bar = bar
            self.meta: dict[str, dict[str, Any]] = {}
            self.reported: dict[str, int] = {}
            self.deadline = Deadline(settings.time_budget)
            self.deadline_said = False
            super().__init__(space=self._define, storage=storage, study_name=settings.study_name,
                             sampler=make_sampler(settings), **kwargs)

        def _define(self, trial) -> dict[str, Any]:
            cand = prepare(trial, self.settings)
            return {"config_yaml": cand.config.to_yaml(), "feasible": cand.feasible, "gflops": cand.gflops,
                    "optuna_number": trial.number, "num_experts_": cand.config.num_experts,
                    "duplicate_of": cand.duplicate_of, "duplicate_values": cand.duplicate_values}

        def suggest(self, trial_id: str):
            if self.deadline.passed():  # no new trial; running ones finish normally
                if not self.deadline_said:
                    self.deadline_said = True
                    (self.bar.write if self.bar else print)(
                        f"time budget of {self.settings.time_budget:.0f} s used up: no new trial")
                return Searcher.FINISHED
            params = super().suggest(trial_id)
            if params is not None:
                self.meta[trial_id] = params
            return params

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.settings.multi or METRIC not in result or trial_id in self._completed_trials:
                return
            ot = self._ot_trials[trial_id]
            step = int(result.get("step", 0))
            ot.report(float(result[METRIC]), step)
            self.reported[trial_id] = step
            self._attrs(ot, result)

        @staticmethod
        def _attrs(ot, result: dict) -> None:
            for k in ("trained_steps", "wall_s", "peak_mem_mb", "device", "params_proxy"):
                if k in result:
                    v = result[k]
                    ot.set_user_attr(k, round(v, 2) if isinstance(v, float) else v)

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            if trial_id in self._completed_trials:
                return
            ot = self._ot_trials[trial_id]
            meta = self.meta.get(trial_id, {})
            result = result or {}
            n, g = meta.get("num_experts_"), meta.get("gflops")
            state, value, extra = TrialState.FAIL, None, ""
            if not meta.get("feasible", True):
                state, extra = TrialState.PRUNED, "REJECTED (over budget, not trained)"
            elif meta.get("duplicate_of") is not None:
                state, value = TrialState.COMPLETE, meta["duplicate_values"][0]
                extra = f"COMPLETE  (duplicate of trial {meta['duplicate_of']}: result reused)"
            elif error or "fail_reason" in result or METRIC not in result:
                reason = result.get("fail_reason") or ("trial errored in Ray" if error else "no result reported")
                ot.set_user_attr("fail_reason", reason)
                self._attrs(ot, result)
                extra = f"FAIL  {reason}"
            else:
                value = float(result[METRIC])
                step = int(result.get("step", 0))
                early = step < self.settings.space.proxy.steps
                self._attrs(ot, result)
                ot.set_user_attr("stopped_early", early)
                if not self.settings.multi and self.reported.get(trial_id) != step:
                    ot.report(value, step)  # the result ASHA stopped on never reached on_trial_result
                if not math.isfinite(value):
                    ot.set_user_attr("fail_reason", f"objective is {value}")
                    extra = f"FAIL  objective is {value}"
                else:
                    state = TrialState.COMPLETE
                    extra = f"COMPLETE{f'  (stopped at step {step})' if early else ''}" \
                            f"  ({float(result.get('wall_s', 0)):.0f} s)"
            try:
                if state == TrialState.COMPLETE and meta.get("duplicate_of") is not None:
                    self._ot_study.tell(ot, meta["duplicate_values"], state=state)
                elif state == TrialState.COMPLETE:
                    self._ot_study.tell(ot, values_for(value, g, self.settings), state=state)
                else:
                    self._ot_study.tell(ot, state=state)
            except Exception as exc:  # never lose the run over one bookkeeping error
                log.warning("could not record trial %s: %s", ot.number, exc)
            self._completed_trials.add(trial_id)
            log_trial(ot.number, n, g, value, extra, write=self.bar.write if self.bar else print)
            if self.bar is not None and state != TrialState.FAIL:
                self.bar.update(1)

        # Tune checkpoints searchers by pickling them; the study lives in the RDB storage
        # and --resume reads it from there, so there is nothing else to save.
        def save(self, checkpoint_path: str) -> None:
            return None

        def restore(self, checkpoint_path: str) -> None:
            return None

    return StudySearch


def run(s: Settings, storage: optuna.storages.BaseStorage, remaining: int, bar=None,
        reference_job=None) -> Any:
    """Run ``remaining`` more trials through Ray Tune; returns the reference job's result."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # infeasible/failed report no metric
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    StudySearch = _make_search_class()
    proxy = s.space.proxy
    mode = ["min", "min"] if s.multi else "min"
    metric = [METRIC, "gflops"] if s.multi else METRIC
    search = StudySearch(s, storage, bar=bar, metric=metric, mode=mode)
    scheduler = None
    if not s.multi:
        scheduler = ASHAScheduler(time_attr="step", metric=METRIC, mode="min", max_t=proxy.steps,
                                  grace_period=proxy.eval_every, reduction_factor=3)
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
                                  log_to_file=True),
    )
    tuner.fit()
    return ray.get(reference_job) if reference_job is not None else None
