"""Measured time of one denoising step: what a user pays per sampling step, in milliseconds.

MACs are not time: attention over many tokens and the memory-bound passes of iFormer
blocks (slices, concatenations, GELU, norms, depthwise convs) cost more time per MAC
than big convs. ``meme-nas latency NAME_OR_YAML`` times each expert's network
forward at the target shape through the same fast path sampling uses
(``meme.common.fastpath``: channels_last, bf16 where it picks it, optionally compiled), at
batch 1 and at a sampling batch, and gives the interval-weighted per-step figure the way
``meme.model.macs`` gives GFLOPs.

Each figure is the median of ``repeats`` timed forwards after ``warmup`` untimed ones;
the spread is the interquartile range over the repeats. On a CPU with one torch thread
the clock is the thread's CPU time (``clock='auto'``): on an idle machine it equals the
wall time, and on a shared one it leaves out the time the scheduler kept the step
waiting, which is the other users' cost, not the design's (contention for caches and
memory bandwidth stays in). The spread is the honest error bar; only ratios measured in
one run compare designs.

Results are cached on disk (``$MEME_LATENCY_CACHE``, ``0``/``off`` disables; default
``~/.cache/meme-nas/latency``), keyed by the architecture, the data shape, the device
name (CPU model and thread count on a CPU), the batch, the precision the fast path
resolves to, compilation, the clock, the torch version and a hash of the network code.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import statistics
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from meme.common.command import CommandParser, add_fast_path_flag, main_guard
from meme.common.device import pick_device
from meme.common.errors import UserError
from meme.common.fastpath import PRECISIONS, compile_for_inference, fast_path_for_width
from meme.model.config import ArchConfig, DataShape, MemeConfig, arch_dict
from meme.model.macs import cost_of_meme, disk_get, disk_put, env_cache_dir, source_fingerprint
from meme.model.experts import build_network, wake_zero_init
from meme.model.references import reference_names, resolve
from meme.sampling.graphs import capture_graph
from meme.sampling.sample import use_cuda_graphs
from meme.speed.timing import device_name, time_runs, warm_clocks

LATENCY_VERSION = 2           # bump when what is timed changes: invalidates the disk cache
SAMPLING_BATCH = 8            # the second batch the CLI times by default (a small sampling batch)
TIMESTEP = 500                # any t: a network's time does not depend on it
CLOCKS = ("auto", "wall", "cpu")


@dataclass(frozen=True)
class Setting:
    """Where and how a step is timed."""

    device: str = "cpu"
    batch: int = 1
    precision: str = "auto"     # meme.common.fastpath: 'auto' (bf16 where it pays), 'bf16', 'fp32'
    compile: bool = False       # torch.compile with frozen weights (meme.common.fastpath.compile_for_inference)
    repeats: int = 5            # timed forwards (median reported)
    warmup: int = 2             # untimed forwards first
    clock: str = "auto"         # 'wall', 'cpu' (thread CPU time), 'auto': 'cpu' on a CPU with one torch thread
    threads: int = 1            # torch CPU threads while timing (a CPU's figures belong to a thread count)
    graphs: Optional[bool] = None  # CUDA: time replays of a CUDA graph, as the sampler runs (None: on CUDA
                                   # unless --no-fast-path); a CPU has none

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch < 1 or self.repeats < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError("batch, repeats and threads must be >= 1 and warmup >= 0")
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {self.clock!r}")

    def resolved_clock(self) -> str:
        """'cpu' only where it equals idle-machine wall time: a CPU device and one torch thread."""
        if self.clock != "auto":
            return self.clock
        return "cpu" if self.on_cpu and self.threads == 1 else "wall"

    @property
    def on_cpu(self) -> bool:
        return torch.device(self.device).type == "cpu"

    def uses_graphs(self) -> bool:
        """Whether forwards are timed as CUDA-graph replays (what ``meme.sampling.sample`` runs)."""
        return use_cuda_graphs(torch.device(self.device), self.graphs)

    def label(self) -> str:
        """The device a time belongs to: GPU name, or CPU model and the thread count."""
        name = device_name(torch.device(self.device))
        return f"{name}, {self.threads} thread{'s' if self.threads > 1 else ''}" if self.on_cpu else name


@contextlib.contextmanager
def threads_of(setting: Setting) -> Iterator[None]:
    """torch's CPU thread count set to the setting's while timing, restored afterwards."""
    old = torch.get_num_threads()
    if setting.on_cpu and old != setting.threads:
        torch.set_num_threads(setting.threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


@dataclass(frozen=True)
class Timing:
    """Time of one network forward (one denoising step of one expert)."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    repeats: int

    @property
    def spread_ms(self) -> float:
        """Interquartile range over the repeats."""
        return self.q75_ms - self.q25_ms

    @classmethod
    def of(cls, seconds: list[float]) -> "Timing":
        ms = sorted(1e3 * s for s in seconds)
        if len(ms) >= 2:
            q25, _, q75 = statistics.quantiles(ms, n=4, method="inclusive")
        else:
            q25 = q75 = ms[0]
        return cls(median_ms=float(statistics.median(ms)), q25_ms=float(q25), q75_ms=float(q75), repeats=len(ms))


@dataclass(frozen=True)
class MemeLatency:
    """Per-expert step times of a MEME and what a sampler pays per step."""

    experts: list[Timing]
    intervals: list[tuple[int, int]]
    weights: list[float]                # fraction of sampling steps each expert serves
    device: str                         # Setting.label() of where it was measured
    precision: str                      # 'bf16' or 'fp32' per expert ('mixed' when they differ)

    @property
    def ms_mean(self) -> float:
        """Interval-weighted mean over experts: the per-step figure a budget bounds."""
        return sum(w * e.median_ms for w, e in zip(self.weights, self.experts))

    @property
    def ms_max(self) -> float:
        return max(e.median_ms for e in self.experts)


def precision_of(arch: ArchConfig, setting: Setting) -> str:
    """'bf16' or 'fp32': what the fast path runs this network in on the setting's device."""
    fp = fast_path_for_width(setting.device, setting.precision, arch.base_channels)
    return "bf16" if fp.bf16 else "fp32"


def latency_key(arch: ArchConfig, data: DataShape, setting: Setting) -> str:
    """Disk-cache key: arch, shape, device name, batch, precision, compile, torch, network code."""
    payload = json.dumps({
        "arch": arch_dict(arch), "data": dataclasses.asdict(data),
        "device": setting.label(), "batch": setting.batch,
        "precision": precision_of(arch, setting), "compile": setting.compile, "clock": setting.resolved_clock(),
        **({"graphs": True} if setting.uses_graphs() else {}),
        "torch": torch.__version__, "src": source_fingerprint(), "version": LATENCY_VERSION,
    }, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


def cache_dir() -> Optional[Path]:
    """``$MEME_LATENCY_CACHE`` (``0``/``off`` disables), else ``~/.cache/meme-nas/latency``."""
    return env_cache_dir("MEME_LATENCY_CACHE", "latency")


# ---- timing ---------------------------------------------------------------------------

def time_module(module: nn.Module, inputs: tuple[torch.Tensor, ...], setting: Setting, width: int) -> Timing:
    """Median forward time of ``module(*inputs)`` on the fast path of a ``width``-wide network.

    4-D inputs go channels_last as the fast path keeps them; the output is cast to
    fp32 as the sampler does before its update. Under ``setting.uses_graphs()`` the
    forward is captured once and each timed call is a replay: the GPU's own time, without
    the host's launches, as the sampler pays it.
    """
    dev = torch.device(setting.device)
    fp = fast_path_for_width(dev, setting.precision, width)
    module = fp.prepare(module.eval(), dev)
    xs = tuple(fp.input(x, dev) for x in inputs)
    run = compile_for_inference(module) if setting.compile else module

    def forward():
        return run(*xs).float()

    if setting.uses_graphs():
        with threads_of(setting):
            graph, _ = capture_graph(forward, fp, dev)
        return Timing.of(time_runs(graph.replay, dev, setting.repeats, setting.warmup))
    # one autocast region over warm-up and repeats, as the sampler holds one per run of
    # steps (meme.sampling.sample._run_steps): weights are cast to bf16 once, not per forward
    with threads_of(setting), torch.no_grad(), fp.autocast():
        return Timing.of(time_runs(forward, dev, setting.repeats, setting.warmup,
                                   cpu_clock=setting.resolved_clock() == "cpu" and dev.type == "cpu"))


def time_network(net: nn.Module, arch: ArchConfig, data: DataShape, setting: Setting) -> Timing:
    """One denoiser forward ``net(x_t, t)`` at the setting's batch (no cache)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(setting.batch, data.channels, data.resolution, data.resolution, generator=g)
    t = torch.full((setting.batch,), TIMESTEP, dtype=torch.long)
    return time_module(net, (x, t), setting, arch.base_channels)


def build_timed(arch: ArchConfig, data: DataShape) -> nn.Module:
    """The network to time: built and woken (no all-zero layers a kernel could skip)."""
    torch.manual_seed(0)
    return wake_zero_init(build_network(arch, data))


@lru_cache(maxsize=256)
def measure_network(arch: ArchConfig, data: DataShape, setting: Setting = Setting()) -> Timing:
    """Step time of one expert (cached on disk and in-process)."""
    key = latency_key(arch, data, setting)
    timing = disk_get(cache_dir(), key, Timing)
    if timing is None:
        timing = time_network(build_timed(arch, data), arch, data, setting)
        disk_put(cache_dir(), key, timing)
    return timing


def measure_meme(cfg: MemeConfig, setting: Setting = Setting()) -> MemeLatency:
    """Every expert's step time and the interval-weighted per-step figure."""
    timings = [measure_network(a, cfg.data, setting) for a in cfg.experts]  # identical experts: cache hits
    precisions = {precision_of(a, setting) for a in cfg.experts}
    return MemeLatency(experts=timings, intervals=cfg.intervals(), weights=cfg.interval_weights(),
                       device=setting.label(),
                       precision=precisions.pop() if len(precisions) == 1 else "mixed")


# ---- CLI ----------------------------------------------------------------------------------

def format_table(name: str, lat: dict[int, MemeLatency], gflops: list[float], setting: Setting) -> Iterator[str]:
    first = next(iter(lat.values()))
    yield (f"{name}: one denoising step (network forward) on {first.device}, {first.precision}"
           f"{' + compile' if setting.compile else ''} + channels_last; {setting.resolved_clock()} clock, median of "
           f"{setting.repeats} after {setting.warmup} warm-up, spread = interquartile range")
    yield f"{'expert':>6} {'interval':>11} {'GFLOPs':>8} " + " ".join(
        f"{f'b{b} ms':>10} {'spread':>7} {'ms/img':>8}" for b in lat)
    for i, (g, iv) in enumerate(zip(gflops, first.intervals)):
        cells = " ".join(f"{m.experts[i].median_ms:>10.2f} {m.experts[i].spread_ms:>7.2f} "
                         f"{m.experts[i].median_ms / b:>8.2f}" for b, m in lat.items())
        yield f"{i + 1:>6} {f'[{iv[0]},{iv[1]})':>11} {g:>8.2f} {cells}"
    gmean = sum(w * g for w, g in zip(first.weights, gflops))
    yield f"{'mean':>6} {'(weighted)':>11} {gmean:>8.2f} " + " ".join(
        f"{m.ms_mean:>10.2f} {'':>7} {m.ms_mean / b:>8.2f}" for b, m in lat.items())
    yield "max expert: " + ", ".join(f"b{b} {m.ms_max:.2f} ms" for b, m in lat.items())


def main(argv: Optional[list[str]] = None) -> int:
    @main_guard
    def run(argv: Optional[list[str]]) -> int:
        p = CommandParser(prog="meme-nas latency",
                                    description="Measured milliseconds per denoising step of a MEME.")
        p.add_argument("config", help=f"reference name ({', '.join(reference_names())}) or a YAML file")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--batch", default=f"1,{SAMPLING_BATCH}", help="comma list of batches (default %(default)s)")
        p.add_argument("--precision", default="auto", choices=PRECISIONS, help="fast path precision (default auto)")
        p.add_argument("--compile", action="store_true", help="time torch.compile'd experts (frozen weights)")
        p.add_argument("--repeats", type=int, default=5, help="timed forwards per figure (median; default 5)")
        p.add_argument("--warmup", type=int, default=2, help="untimed forwards first (default 2)")
        p.add_argument("--threads", type=int, default=1, help="CPU threads torch times with (default 1)")
        p.add_argument("--clock", default="auto", choices=CLOCKS,
                       help="'wall', 'cpu' (thread CPU time) or 'auto' (cpu on a CPU with one thread; default)")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        p.add_argument("--no-cuda-graphs", action="store_true",
                       help="on CUDA: time eager forwards (every kernel launched by the host) instead of CUDA-graph "
                            "replays, the sampler's default path")
        add_fast_path_flag(p)
        args = p.parse_args(argv)
        try:
            batches = [int(b) for b in args.batch.split(",") if b.strip()]
            settings = {b: Setting(str(pick_device(args.device)), b, args.precision, args.compile,
                                   args.repeats, args.warmup, args.clock, args.threads,
                                   graphs=False if args.no_cuda_graphs else None) for b in batches}
        except ValueError as exc:
            raise UserError(f"--batch/--repeats/--warmup: {exc}") from None
        cfg = resolve(args.config)
        warm_clocks(torch.device(next(iter(settings.values())).device))
        lat = {b: measure_meme(cfg, s) for b, s in settings.items()}
        gflops = [e.gflops for e in cost_of_meme(cfg).experts]
        if args.json:
            print(json.dumps({"name": cfg.name, "device": next(iter(lat.values())).device, "batches": {
                str(b): {"ms_mean": m.ms_mean, "ms_max": m.ms_max, "precision": m.precision,
                         "experts": [arch_dict(e) for e in m.experts]} for b, m in lat.items()},
                "gflops_per_expert": gflops}))
        else:
            print("\n".join(format_table(cfg.name, lat, gflops, next(iter(settings.values())))))
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
