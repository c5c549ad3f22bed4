"""How many proxy trials one GPU runs at once, from one trial's measured memory and busy time.

A proxy trial of the default space keeps an H100 busy a few percent of the time: its
kernels are small and the host launches them one by one. Trials in separate processes
overlap their launch gaps, so a GPU holds several, until memory or the GPU's own time
runs out:

    trials = min(memory: floor(USABLE x free / (peak + CONTEXT_MIB)),
                 time:   ceil(1 / busy),
                 cores:  the CPU cores (each trial's host work needs one),
                 MAX_TRIALS)

``peak`` is the memory the allocator reserved for the largest candidate's trial up to its
first rung (the space's widest experts, most experts: every other candidate needs less)
and ``busy`` the share of that trial's wall time the GPU spent in kernels
(``torch.profiler``; the wall time includes building the model and loading the data, as a
trial's does). A search with the FID objective also samples and runs the Inception network
at each rung, which this measurement (the held-out loss) leaves out: such a search runs one
trial at a time unless ``--trials-at-once`` says otherwise. Both are measured on the
GPU the trials will use, once per search; a measurement that fails (out of memory, a
profiler error) leaves the search running one trial at a time, and says why. The cores
limit counts trials of ``--cpus-per-trial`` cores each. The Optuna engine runs that many
trial processes on its GPU; under Ray the default ``--gpus-per-trial`` becomes 1 / trials.
"""
from __future__ import annotations

import gc
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from meme.common.device import pick_device
from meme.common.errors import UserError, one_line
from meme.model.config import MemeConfig
from nas.evaluators.trial import run_trial
from nas.space.space import SearchSpace, largest_candidate

USABLE = 0.8            # share of the free memory the trials may fill
CONTEXT_MIB = 500.0     # each trial process's own CUDA context and allocator slack
MAX_TRIALS = 8


@dataclass(frozen=True)
class DeviceShare:
    """Trials at once on one device, and the measurements that chose the number."""

    trials: int
    peak_mib: float = 0.0       # one trial's peak device memory
    free_mib: float = 0.0       # the device's free memory when measured
    busy: float = 1.0           # share of a trial's wall time the GPU is busy
    cores: int = 1
    limit: str = "cpu"          # what set the number: memory, time, cores, cap; cpu, objective or failed: not measured
    why: str = ""               # limit 'failed': the measurement's error

    def describe(self) -> str:
        if self.limit == "cpu":
            return "1 trial at a time (a CPU device)"
        if self.limit == "objective":
            return ("1 trial at a time: the measured share covers the held-out loss, not an objective that "
                    "samples at every rung; pass --trials-at-once N to run N")
        if self.limit == "failed":
            return f"1 trial at a time: measuring one trial's memory and GPU time failed ({self.why})"
        return (f"{self.trials} trials at once on the GPU: one trial peaks at {self.peak_mib:.0f} MiB of "
                f"{self.free_mib:.0f} free and keeps the GPU busy {100 * self.busy:.0f}% of its time "
                f"(limited by {self.limit})")


def trials_at_once(peak_mib: float, free_mib: float, busy: float, cores: int) -> DeviceShare:
    """The rule of the module docstring, from measured numbers."""
    by = {"memory": max(1, math.floor(USABLE * free_mib / (peak_mib + CONTEXT_MIB))),
          "time": max(1, math.ceil(1.0 / max(busy, 1e-3))),
          "cores": max(1, cores),
          "cap": MAX_TRIALS}
    limit = min(by, key=lambda k: (by[k], list(by).index(k)))
    return DeviceShare(by[limit], peak_mib, free_mib, busy, cores, limit)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def trial_cores(cpus_per_trial: float = 1.0) -> int:
    """Trials whose host work the usable cores hold, at ``cpus_per_trial`` cores each."""
    return max(1, usable_cores() // max(1, math.ceil(cpus_per_trial)))


def share_for_search(space: SearchSpace, device: Optional[str], objective: str = "loss",
                     cpus_per_trial: float = 1.0) -> DeviceShare:
    """What both engines run: one trial at a time where the measurement does not apply
    (an objective other than the held-out loss) or fails; else ``measure_share``."""
    if objective != "loss":
        return DeviceShare(1, limit="objective")
    try:
        return measure_share(space, device, cpus_per_trial)
    except UserError:
        raise
    except Exception as exc:  # the search goes on without the measurement
        return DeviceShare(1, limit="failed", why=one_line(exc, typed=True))


def measure_share(space: SearchSpace, device: Optional[str] = None, cpus_per_trial: float = 1.0) -> DeviceShare:
    """Train the space's largest candidate to its first rung on ``device`` and apply the rule.

    On a CPU nothing is measured: one trial at a time, with the cores it was given.
    """
    dev = pick_device(device)
    if dev.type != "cuda":
        return DeviceShare(1)
    cfg: MemeConfig = largest_candidate(space)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            run_trial(cfg, space.proxy, lambda step, value: True, objective="loss", device=str(dev))
            torch.cuda.synchronize(dev)
            wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_reserved(dev) / 2 ** 20   # reserved: what the allocator held, slack included
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages()
                        if e.device_type == torch.autograd.DeviceType.CUDA
                        and not getattr(e, "is_user_annotation", False))
    finally:    # the trial's memory goes back to the GPU, for the trials that follow, measured or failed
        gc.collect()
        torch.cuda.empty_cache()
    return trials_at_once(peak, free / 2 ** 20, kernel_us / 1e6 / wall, trial_cores(cpus_per_trial))
