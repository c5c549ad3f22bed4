"""Which RUNNING trials still have a live driver: the heartbeat and the stale-trial sweep.

A driver stamps every trial it runs every ``HEARTBEAT_S`` seconds; a RUNNING trial
unstamped for ``stale_after`` seconds belongs to a driver that died (kill -9, lost node,
lost network) and is failed with the reason, so a distributed or resumed search never
waits on it.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import optuna
from optuna.trial import TrialState

from meme.common.errors import one_line
from nas.engine.record import status_text
from nas.engine.settings import STALE_AFTER_S

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
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

    def add(self, number: int) -> None:
        with self._lock:
            self.live.add(number)
        self.stamp(number)

    def discard(self, number: int) -> None:
        with self._lock:
            self.live.discard(number)

    def stamp(self, number: int) -> None:
        """Record that trial ``number`` still has a live driver (now)."""
        try:
            tid = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
            self.storage.set_trial_user_attr(tid, ALIVE_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            self.discard(number)
        except Exception as exc:  # database down: keep trying, the trials keep running
            log.warning("heartbeat of trial %d not recorded: %s", number, one_line(exc))

    def sweep(self) -> None:
        try:
            self.cleaned += fail_stale_running(self.storage, self.study_name, self.stale_after)
        except Exception as exc:
            log.warning("stale-trial clean-up skipped: %s", one_line(exc))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                live = sorted(self.live)
            for n in live:
                self.stamp(n)
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
