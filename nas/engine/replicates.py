"""Train many (config, proxy, seed) runs side by side, resumably: the engine of
``nas.engine.rerank`` and ``nas.studies.fidelity``.

Runs go to a pool of spawned worker processes, one CPU thread each (small proxy
models gain nothing from a second thread and lose a lot to a busy core), or one
process per GPU share on CUDA. Every finished run is appended as one JSON line to a
cache file, keyed by (config, proxy, seed, objective): an interrupted study resumes
where it stopped, and a second study that needs the same run (another proxy variant
against the same high-fidelity runs, say) reuses it instead of retraining.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from tqdm import tqdm

from meme.common.device import pick_device
from meme.common.errors import one_line
from meme.model.config import MemeConfig
from nas.engine.settings import Deadline
from nas.evaluators.trial import run_trial
from nas.space.proxy import ProxySpec


@dataclass(frozen=True)
class Run:
    """One training of a TARGET-shape config on a proxy with one seed."""

    label: str                 # what reports call it (a design name)
    config: MemeConfig
    proxy: ProxySpec
    seed: int
    objective: str = "loss"

    def key(self) -> str:
        digest = json.dumps([self.config.hash(), self.proxy.training_digest(), self.seed, self.objective], sort_keys=True,
                            default=str)
        return hashlib.sha1(digest.encode()).hexdigest()[:16]


def train_one(run: Run, device: Optional[str] = None, threads: int = 1) -> dict[str, Any]:
    """Train one run; a JSON-ready record (failures recorded, never raised)."""
    rec: dict[str, Any] = {"key": run.key(), "label": run.label, "config_hash": run.config.hash(),
                           "seed": run.seed, "objective_name": run.objective}
    try:
        res = run_trial(run.config, run.proxy, lambda step, value: False, objective=run.objective,
                        device=device, threads=threads, seed=run.seed)
        rec.update(objective=res.objective, train_steps_total=res.steps, train_gflops_total=round(res.train_gflops, 1),
                   wall_s=round(res.wall_s, 2), device=res.device, history=res.history,
                   elapsed=res.elapsed)
    except Exception as exc:
        rec.update(objective=None, fail_reason=one_line(exc, typed=True))
    return rec


def load_cache(path: Optional[Path]) -> dict[str, dict[str, Any]]:
    """Finished runs by key (a line cut short by a kill is ignored)."""
    out: dict[str, dict[str, Any]] = {}
    if path is None or not Path(path).is_file():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("objective") is not None:
            out[rec["key"]] = rec
    return out


def _append(path: Optional[Path], rec: dict[str, Any]) -> None:
    if path is None:
        return
    with Path(path).open("a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


def single_thread_worker() -> None:
    """Pool initializer: one intra-op thread per worker process (workers = cores)."""
    torch.set_num_threads(1)


def default_jobs(device: Optional[str]) -> int:
    """One run per core on a CPU; one at a time on a single GPU."""
    if pick_device(device).type == "cuda":
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_all(runs: Iterable[Run], *, jobs: int = 1, device: Optional[str] = None, cache: Optional[Path] = None,
            progress: bool = True, deadline: Optional[Deadline] = None) -> dict[str, dict[str, Any]]:
    """Train every run not in ``cache``, in order; returns records by run key (cached ones included).

    No run starts once ``deadline`` has passed (those running finish); the runs left out
    have no record.
    """
    deadline = deadline or Deadline(None)
    runs = list(runs)
    done = load_cache(cache)
    todo = [r for r in dict((r.key(), r) for r in runs).values() if r.key() not in done]
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=None if progress else True)
    if todo and len(runs) > len(todo):
        bar.write(f"{len(runs) - len(todo)} run(s) already in {cache}: reused")

    def finish(rec: dict) -> None:
        done[rec["key"]] = rec
        _append(cache, rec)
        state = f"{rec['objective']:.5f}" if rec.get("objective") is not None else f"FAIL {rec.get('fail_reason')}"
        bar.write(f"  {rec['label']:<28} seed {rec['seed']:>3}  {state}  ({rec.get('wall_s', 0):.0f} s)")
        bar.update(1)

    if jobs <= 1 or len(todo) <= 1:
        for r in todo:
            if deadline.passed():
                break
            finish(train_one(r, device, threads=1))
    else:
        ctx = multiprocessing.get_context("spawn")
        queue = list(reversed(todo))
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=single_thread_worker) as pool:
            pending: set = set()
            while queue or pending:
                while queue and len(pending) < jobs and not deadline.passed():
                    pending.add(pool.submit(train_one, queue.pop(), device, 1))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    finish(fut.result())
    left = sum(r.key() not in done for r in todo)
    if left:
        bar.write(f"time budget reached: {left} run(s) not started")
    bar.close()
    return done
