"""Training throughput on one process against K processes (``nas.bench.run --only scaling``).

Each figure is a real ``meme.training.train`` run of fmnist-meme-small (4 iU-Net experts,
1x32x32) on random data of its shape: one process, then ``torchrun --nproc-per-node K``
data-parallel, then the same with ``--expert-parallel``, one thread per process, all in
one bench run so that the ratios compare like with like on a shared machine. A run's
throughput is the median ``img_per_s`` of its ``metrics.csv`` windows after the first
(start-up and the first all-reduce); every window of a multi-process run ends in a
collective, so its rate counts every group's images.
"""
from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from meme.model.references import resolve
from meme.speed.bench_report import NOT_MEASURED, Row
from meme.training.distributed import free_local_port

CONFIG = "fmnist-meme-small"
TIMEOUT_S = 600



def _img_per_s(run: Path) -> float:
    with (run / "metrics.csv").open() as f:
        rates = [float(r["img_per_s"]) for r in csv.DictReader(f)][1:]
    return statistics.median(rates)


def _train(cmd_prefix: list[str], data: Path, out: Path, steps: int, batch: int, device: str,
           extra: tuple[str, ...] = (), threads: int = 1) -> float:
    cmd = [*cmd_prefix, "-m", "meme.training.train", "--config", CONFIG, "--data", str(data), "--out", str(out),
           "--steps", str(steps), "--batch-size", str(batch), "--log-every", str(max(steps // 6, 1)),
           "--ckpt-every", str(steps), "--sample-every", "0", "--device", device, "--threads", str(threads), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return _img_per_s(out)


def bench_scaling(device: str, steps: int, batch: int, procs: int = 2,
                  log: Callable[[str], None] = print) -> list[Row]:
    """img/s of 1 process and of ``procs`` processes (DDP, expert-parallel), as ratios from this run."""
    cfg = resolve(CONFIG)
    shape = f"{cfg.data.channels}x{cfg.data.resolution}x{cfg.data.resolution} b{batch} (global), {steps} steps"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                "--master-addr", "127.0.0.1"]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="meme-bench-scaling-") as tmp:
        data = Path(tmp) / "data.npy"
        g = np.random.default_rng(0)
        np.save(data, g.uniform(-1, 1, (512, cfg.data.channels, cfg.data.resolution,
                                        cfg.data.resolution)).astype(np.float32))
        one = _train([sys.executable], data, Path(tmp) / "one", steps, batch, device)
        log(f"  scaling: 1 process {one:.1f} img/s")
        rows.append(Row("scaling", f"{CONFIG} 1 process", "img_per_s", one, "img/s", 1.0, shape=shape,
                        note="meme.training.train, 1 thread"))
        if not device.startswith("cuda"):   # the same cores, used by threads instead of processes
            threaded = _train([sys.executable], data, Path(tmp) / "threads", steps, batch, device, threads=procs)
            log(f"  scaling: 1 process, {procs} threads {threaded:.1f} img/s")
            rows.append(Row("scaling", f"{CONFIG} 1 process {procs} threads", "img_per_s", threaded, "img/s",
                            threaded / one, shape=shape, note=f"the same cores as {procs} processes, used by threads"))
        for label, extra in (("data-parallel", ()), ("expert-parallel", ("--expert-parallel",))):
            rate = _train([*torchrun, "--master-port", str(free_local_port())], data, Path(tmp) / label, steps, batch,
                          device, extra)
            log(f"  scaling: {procs} processes {label} {rate:.1f} img/s ({rate / one:.2f}x)")
            rows.append(Row("scaling", f"{CONFIG} {procs} processes {label}", "img_per_s", rate, "img/s",
                            rate / one, target=f"{procs}x ideal", shape=shape,
                            note=f"torchrun, {'NCCL' if device.startswith('cuda') else 'gloo'}, 1 thread each; "
                                 f"vs_ref = this / 1 process, same bench run"))
    return rows


def unmeasured_gpu_rows() -> list[Row]:
    """The multi-GPU figures a machine with fewer than two GPUs cannot measure."""
    if torch.cuda.device_count() >= 2:
        return []
    return [Row("scaling", f"{CONFIG} {k} GPUs {mode}", "img_per_s", NOT_MEASURED, "img/s",
                note="needs a machine with >= 2 GPUs (torchrun --nproc-per-node K, NCCL)")
            for k in (2, 8) for mode in ("data-parallel", "expert-parallel")]
