"""How every benchmark here times a call, and names the machine it timed it on.

One recipe for all of them (``meme.speed.model_bench``, ``meme.speed.latency``, ``nas.bench.run``), so that
figures from different commands were measured alike: warm-up first, then repeats timed
with CUDA events on a GPU (``time.perf_counter`` on a CPU, where every op is
synchronous), medians reported; the device's practical peak is a large matmul measured
in the same run, not its datasheet.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from meme.common.fastpath import cpu_has_fast_bf16


def time_runs(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
              cpu_clock: bool = False) -> list[float]:
    """Seconds of each timed call: CUDA events on a GPU, perf_counter on a CPU.

    ``cpu_clock``: on a CPU, the calling thread's CPU time instead (``time.thread_time``).
    With one torch thread that is the wall time the call takes on an idle machine, less
    the time a loaded machine's scheduler kept it waiting (``meme.speed.latency``).
    """
    clock = time.thread_time if cpu_clock else time.perf_counter
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = clock()
            fn()
            out.append(clock() - t0)
    return out


@contextlib.contextmanager
def cold_compile():
    """Compile from nothing: inductor's in-memory caches cleared and a fresh, temporary
    on-disk cache, so a compile time measured inside is what a user's first run pays
    (not a hit on kernels an earlier section or an earlier bench run left behind)."""
    from torch._inductor.utils import fresh_cache  # deferred: loading inductor costs seconds, only compiles need it

    torch._dynamo.reset()
    with fresh_cache():
        yield


def warm_clocks(device: torch.device, seconds: float = 2.0, n: int = 4096) -> None:
    """Keep a GPU busy for ``seconds`` with large matmuls before timing anything: an idle GPU
    runs at a low clock and ramps up under load, so the first figures of a run would
    otherwise be slow (on the H200 a latency table moved 1.69x between two passes). A no-op
    on a CPU."""
    if device.type != "cuda":
        return
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(8):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(device)


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def matmul_peak_flops(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Achieved FLOP/s of an n x n x n matmul in ``dtype``: the device's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = median(time_runs(lambda: torch.mm(a, b), device, repeats, warmup=2))
    return 2 * n ** 3 / s


def peak_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The matmul dtypes worth a peak here: those some fast path runs in."""
    if device.type == "cuda":
        return (torch.bfloat16,)
    return (torch.float32, torch.bfloat16) if cpu_has_fast_bf16() else (torch.float32,)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def device_name(dev: torch.device) -> str:
    """The GPU's name, or the CPU model and core count: what a timing was measured on."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"
