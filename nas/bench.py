"""Performance benchmarks, side by side in one process: ``python -m nas.bench``.

What a user of a searched MEME pays for, measured on the machine at hand:

* **fastpath** -- one network forward of an iU-Net expert and of LDM-L under each
  numeric path (fp32, channels_last, bf16 autocast, both, and compiled with
  ``--compile``): speed-up over fp32 eager, relative error against it, and how much of
  the MACs ratio between the two models each path realises.
* **sampling** -- DDIM images/s at batch 32 and latency at batch 1 through the real
  sampler path (``meme.sample.generate`` on its default fast path: one expert per
  interval, switching as t falls), for the reference models; each model's speed-up over LDM-L is printed beside
  its MACs ratio (``meme.macs``: the ideal speed-up if time followed MACs).
* **training** -- step time, images/s and MFU of one iU-Net expert and of LDM-S through
  ``meme.train.Trainer.step`` on the trainer's own fast path (``meme.fastpath``). Model
  FLOPs are 3 x 2 x MACs per sample (forward + backward); the peak is a large matmul in
  the dtype the trainer ran, measured in the same run, so MFU here is relative to what
  the device actually delivers, not to its datasheet.
* **memory** -- peak device memory of normal vs low-memory sampling (one expert on the
  device at a time). On a CPU there is no device memory: the growth of the process's
  resident set is reported instead, labelled as such.
* **search** -- time to check one candidate's MACs (no cache), and each trial engine's
  overhead per trial: (engine wall - trial body wall) / trial body wall.

Timing follows the usual profiling recipe (EDM2+ Sec. 4.4): warm-up first, then
repeats timed with CUDA events on a GPU (``time.perf_counter`` on a CPU, where every
op is synchronous), medians reported. Nothing is estimated: a figure this run could
not measure is printed as such ("not yet measured", "pending", "n/a (cpu)").
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as _dt
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from meme.config import MemeConfig

SECTIONS = ("fastpath", "sampling", "training", "memory", "search")
SAMPLING_MODELS = ("meme-table4", "multi-expert-s", "iu-ldm-s", "ldm-s", "ldm-l")
REFERENCE = "ldm-l"                    # sampling speed-ups are relative to this model
TRAINING_MODELS = ("iunet-expert0", "ldm-s")
ENGINES = ("optuna", "ray")
COLUMNS = ("section", "item", "metric", "value", "unit", "vs_ref", "macs_ratio", "target", "shape", "note")
NOT_MEASURED = "not yet measured"
PENDING = "pending"


@dataclass
class Row:
    """One line of the table and of the CSV."""

    section: str                    # fastpath | sampling | training | memory | search | compile | device | target
    item: str                       # model or thing measured
    metric: str                     # what was measured
    value: float | int | str        # the figure, or why there is none
    unit: str = ""
    vs_ref: float | str = ""        # measured ratio against the reference (LDM-L for sampling)
    macs_ratio: float | str = ""    # the same ratio in MACs: the ideal
    target: str = ""                # the goal this figure is held to, if any
    shape: str = ""                 # data shape, batch and steps it was measured at
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        return {c: _fmt(getattr(self, c)) for c in COLUMNS}


@dataclass(frozen=True)
class BenchOptions:
    """Sizes of every measurement (``--quick`` shrinks them for a CPU)."""

    device: str = "cpu"
    quick: bool = False
    resolution: int = 64            # data resolution (paper target: 3x64x64 latents)
    batch: int = 32                 # sampling throughput batch
    steps: int = 8                  # DDIM steps per timed sampling run (>= number of experts)
    repeats: int = 5                # timed repeats (median reported)
    warmup: int = 1                 # untimed runs first
    train_batch: int = 32           # training batch
    train_steps: int = 5            # optimizer steps per timed repeat
    matmul_n: int = 8192            # side of the square matmul that measures the peak
    engine_trials: int = 3          # trials per engine in the overhead measurement
    engines: tuple[str, ...] = ENGINES
    space: str = "tiny"             # search space whose proxy trial the engines run
    compile: bool = False
    only: tuple[str, ...] = SECTIONS

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def default_options(device: str, quick: bool) -> BenchOptions:
    if quick:
        return BenchOptions(device=device, quick=True, resolution=32, batch=4, steps=4, repeats=2, warmup=1,
                            train_batch=4, train_steps=1, matmul_n=1024, engine_trials=2)
    if device.startswith("cuda"):
        return BenchOptions(device=device, steps=50, repeats=5, warmup=1, train_batch=64, train_steps=10,
                            matmul_n=8192, engine_trials=4)
    return BenchOptions(device=device, matmul_n=2048)


# ---- timing --------------------------------------------------------------------------

def time_runs(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds of each timed call: CUDA events on a GPU, perf_counter on a CPU."""
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
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def cold_compile():
    """Compile from nothing: inductor's in-memory caches cleared and a fresh, temporary
    on-disk cache, so a compile time measured inside is what a user's first run pays
    (not a hit on kernels an earlier section or an earlier bench run left behind)."""
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    with fresh_cache():
        yield


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
    from meme.fastpath import cpu_has_fast_bf16

    if device.type == "cuda":
        return (torch.bfloat16,)
    return (torch.float32, torch.bfloat16) if cpu_has_fast_bf16() else (torch.float32,)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- configs ---------------------------------------------------------------------------

def at_resolution(cfg: MemeConfig, resolution: int) -> MemeConfig:
    """The same model on another data resolution (quick mode)."""
    if cfg.data.resolution == resolution:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=resolution)).validate()


def training_config(name: str, resolution: int) -> MemeConfig:
    """'iunet-expert0' = meme-table4's first expert alone; else a reference name."""
    from meme.references import resolve

    if name == "iunet-expert0":
        t4 = resolve("meme-table4")
        cfg = MemeConfig(name=name, experts=(t4.experts[0],), data=t4.data, diffusion=t4.diffusion)
    else:
        cfg = resolve(name)
    return at_resolution(cfg, resolution)


def shape_label(cfg: MemeConfig, batch: int, steps: Optional[int] = None) -> str:
    d = cfg.data
    s = f"{d.channels}x{d.resolution}x{d.resolution} b{batch}"
    return s + (f" {steps} steps" if steps else "")


def gmacs_mean(cfg: MemeConfig) -> float:
    from meme.macs import cost_of_meme

    return cost_of_meme(cfg).gmacs_mean


# ---- sections --------------------------------------------------------------------------

def bench_sampling(o: BenchOptions, dev: torch.device, log: Callable[[str], None]) -> list[Row]:
    from meme.diffusion import Diffusion
    from meme.experts import build_denoiser
    from meme.fastpath import fast_path
    from meme.references import resolve
    from meme.sample import SamplingPlan, generate

    speed: dict[str, dict[str, float]] = {}
    paths: dict[str, str] = {}
    macs: dict[str, float] = {}
    labels: dict[str, tuple[str, str]] = {}
    for name in SAMPLING_MODELS:
        cfg = at_resolution(resolve(name), o.resolution)
        macs[name] = gmacs_mean(cfg)
        torch.manual_seed(0)
        den = build_denoiser(cfg)
        diff = Diffusion(cfg.diffusion)
        shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        speed[name] = {}
        paths[name] = fast_path(dev, "auto", den).describe()
        for key, b in (("thr", o.batch), ("lat", 1)):
            plan = SamplingPlan(n=b, steps=o.steps, batch_size=b, seed=0)
            s = median(time_runs(lambda: generate(den, diff, shape, plan, dev), dev, o.repeats, o.warmup))
            speed[name][key] = s
            log(f"  sampling {name:<15} batch {b:>3}: {s:.3f} s for {o.steps} steps")
        labels[name] = (shape_label(cfg, o.batch, o.steps), shape_label(cfg, 1, o.steps))
        del den
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    ref = speed[REFERENCE]
    for name in SAMPLING_MODELS:
        s = speed[name]
        ips = o.batch / s["thr"]
        ref_ips = o.batch / ref["thr"]
        mr = macs[REFERENCE] / macs[name]
        rows += [
            Row("sampling", name, "img_per_s", ips, "img/s", ips / ref_ips, mr,
                ">= 3.2x ldm-l (GPU)" if name == "meme-table4" else "", labels[name][0],
                f"DDIM via meme.sample.generate ({paths[name]}); {macs[name]:.2f} GMACs/step/img"),
            Row("sampling", name, "ms_per_step", 1e3 * s["thr"] / o.steps, "ms", ref["thr"] / s["thr"], mr,
                "", labels[name][0], "one denoiser forward + DDIM update, whole batch"),
            Row("sampling", name, "latency_per_img", s["lat"], "s", ref["lat"] / s["lat"], mr,
                "", labels[name][1], f"batch 1, {o.steps} DDIM steps"),
        ]
    return rows


def _latent_file(folder: Path, cfg: MemeConfig, n: int = 64) -> Path:
    """Random latents for Trainer's data loader: training speed does not depend on the data."""
    d = cfg.data
    path = folder / f"latents-{d.channels}x{d.resolution}.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.standard_normal((n, d.channels, d.resolution, d.resolution)).astype(np.float32))
    return path


def bench_training(o: BenchOptions, dev: torch.device, peaks: dict[torch.dtype, float],
                   log: Callable[[str], None]) -> list[Row]:
    from meme.train import Trainer, TrainOptions

    rows = []
    runs = [(name, False) for name in TRAINING_MODELS]
    if o.compile and not o.quick:
        runs.append((TRAINING_MODELS[0], True))
    with tempfile.TemporaryDirectory(prefix="meme-bench-") as tmp:
        for name, compiled in runs:
            cfg = training_config(name, o.resolution)
            data = _latent_file(Path(tmp), cfg, n=max(2 * o.train_batch, 16))
            opts = TrainOptions(data=str(data), steps=10 ** 9, batch_size=o.train_batch, warmup=1,
                                device=str(dev), sample_every=0, seed=0, compile=compiled)
            trainer = Trainer(cfg, opts, Path(tmp) / f"{name}-{compiled}")
            k = o.train_steps

            def run_k() -> None:
                for _ in range(k):
                    trainer.step()

            first_s = None
            if compiled:
                with cold_compile():
                    first_s = time_runs(trainer.step, dev, 1, 0)[0]
            step_s = median(time_runs(run_k, dev, o.repeats, o.warmup)) / k
            macs = gmacs_mean(cfg) * 1e9
            achieved = o.train_batch * 6 * macs / step_s
            label = shape_label(cfg, o.train_batch)
            prec = trainer.fast.describe()
            peak_dtype = torch.bfloat16 if trainer.fast.bf16 else torch.float32
            peak, peak_label = peaks[peak_dtype], dtype_name(peak_dtype)
            log(f"  training {name:<15} {step_s * 1e3:.1f} ms/step, MFU {100 * achieved / peak:.1f}%"
                + (f" (compiled; first step {first_s:.1f} s)" if compiled else ""))
            if compiled:
                eager = next(r.value for r in rows if (r.item, r.metric) == (name, "step_time"))
                rows += [
                    Row("training", name, "step_time_compiled", 1e3 * step_s, "ms", eager / (1e3 * step_s),
                        shape=label, note=f"TrainOptions(compile=True), {prec}; vs_ref = eager step / this"),
                    Row("training", name, "compile_time", first_s - step_s, "s", shape=label,
                        note="first compiled step minus a steady one (forward + backward graphs, cold caches)"),
                    Row("training", name, "mfu_compiled", 100 * achieved / peak, "%", shape=label,
                        note=f"vs measured {peak_label} matmul peak {peak / 1e12:.2f} TFLOP/s"),
                ]
            else:
                rows += [
                    Row("training", name, "step_time", 1e3 * step_s, "ms", note=f"meme.train.Trainer.step, {prec}",
                        shape=label),
                    Row("training", name, "img_per_s", o.train_batch / step_s, "img/s", shape=label),
                    Row("training", name, "model_tflops_per_s", achieved / 1e12, "TFLOP/s", shape=label,
                        note=f"3 x 2 x {macs / 1e9:.2f} GMACs per sample"),
                    Row("training", name, "mfu", 100 * achieved / peak, "%", shape=label,
                        target=">= 35% (iU-Net, H100/H200 bf16)" if name == "iunet-expert0" else "",
                        note=f"vs measured {peak_label} matmul peak {peak / 1e12:.2f} TFLOP/s"),
                ]
            del trainer
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def bench_memory(o: BenchOptions, dev: torch.device, log: Callable[[str], None]) -> list[Row]:
    """Peak device memory of meme-table4 sampling, all experts resident vs one at a time."""
    from meme.diffusion import Diffusion
    from meme.experts import build_denoiser
    from meme.references import resolve
    from meme.sample import SamplingPlan, generate

    cfg = at_resolution(resolve("meme-table4"), o.resolution)
    label = shape_label(cfg, o.batch, o.steps)
    modes = (("normal", False), ("low_memory", True))
    if dev.type != "cuda":
        note = "no device memory on a CPU: both modes keep every expert in host memory"
        return [Row("memory", "meme-table4", f"peak_device_mem_{m}", "n/a (cpu)", "MiB", shape=label, note=note)
                for m, _ in modes] + [Row("memory", "meme-table4", "low_memory_saving", "n/a (cpu)", "x",
                                          shape=label, note=note)]
    torch.manual_seed(0)
    den = build_denoiser(cfg)
    diff = Diffusion(cfg.diffusion)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    plan = SamplingPlan(n=o.batch, steps=o.steps, batch_size=o.batch, seed=0)
    rows, peaks = [], {}
    for mode, low in modes:
        den.cpu()                                  # every mode starts with all experts on the host
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        generate(den, diff, shape, plan, dev, low_memory=low)
        peaks[mode] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
        rows.append(Row("memory", "meme-table4", f"peak_device_mem_{mode}", peaks[mode], "MiB", shape=label,
                        note="torch.cuda.max_memory_allocated over one meme.sample.generate call"))
        log(f"  memory {mode}: {peaks[mode]:.0f} MiB")
    rows.append(Row("memory", "meme-table4", "low_memory_saving", peaks["normal"] / peaks["low_memory"], "x",
                    shape=label, note="normal peak / low-memory peak"))
    del den
    torch.cuda.empty_cache()
    return rows


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def bench_macs_check(o: BenchOptions) -> list[Row]:
    """cost_of_meme on the target-shape Table 4 MEME with both caches off."""
    from meme import macs
    from meme.references import resolve

    cfg = resolve("meme-table4")   # always the search's target shape (3x64x64)
    times = []
    with _env("MEME_MACS_CACHE", "0"):
        for _ in range(max(o.repeats, 2)):
            macs.cost_of_network.cache_clear()
            t0 = time.perf_counter()
            macs.cost_of_meme(cfg)
            times.append(time.perf_counter() - t0)
    macs.cost_of_network.cache_clear()
    per = median(times)
    label = f"{cfg.data.channels}x{cfg.data.resolution}x{cfg.data.resolution} b1"
    return [
        Row("search", "macs_check", "s_per_candidate", per, "s", target="<= 1 s", shape=label,
            note=f"meme.macs.cost_of_meme, {cfg.num_experts} distinct experts, MEME_MACS_CACHE=0, lru cleared"),
        Row("search", "macs_check", "s_per_network", per / cfg.num_experts, "s", shape=label),
    ]


def _engine_settings(engine: str, space: str, trials: int, out: Path, dev: torch.device):
    from nas.budget import Budget
    from nas.space import load_space
    from nas.study import Settings, storage_url_for

    return Settings(space=load_space(space), budget=Budget(gflops=1e9), objectives=("loss",), trials=trials,
                    study_name=f"bench-{engine}", out=out, storage_url=storage_url_for(out, None),
                    seed=0, device=str(dev), cpus_per_trial=float(os.cpu_count() or 1),
                    gpus_per_trial=1.0 if dev.type == "cuda" else 0.0, progress=False)


@dataclass
class TrialTimes:
    """Per-trial times from the study: body (run_trial's own wall) and span (asked -> told)."""

    bodies: list[float]
    spans: list[float]


def _trial_times(storage, study_name: str) -> TrialTimes:
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = [t for t in study.get_trials(deepcopy=False)
              if "wall_s" in t.user_attrs and t.datetime_start and t.datetime_complete]
    return TrialTimes(bodies=[float(t.user_attrs["wall_s"]) for t in trials],
                      spans=[(t.datetime_complete - t.datetime_start).total_seconds() for t in trials])


def bench_engine(engine: str, o: BenchOptions, dev: torch.device, log: Callable[[str], None]) -> list[Row]:
    """Run a few tiny-space trials under ``engine``; overhead = (wall - body) / body."""
    label = f"{o.space} space proxy, {o.engine_trials} trials, serial"
    if engine not in o.engines:
        return [Row("search", f"engine_{engine}", "overhead", "skipped (--engines)", "%", shape=label,
                    target="<= 5% of a proxy trial")]
    rows = []
    try:
        from nas.study import open_storage
        with tempfile.TemporaryDirectory(prefix=f"meme-bench-{engine}-") as tmp:
            s = _engine_settings(engine, o.space, o.engine_trials, Path(tmp), dev)
            storage = open_storage(s.storage_url)
            if engine == "optuna":
                from nas import optuna_engine
                t0 = time.perf_counter()
                optuna_engine.run(s, storage)
                wall = time.perf_counter() - t0
            else:
                from nas import ray_engine
                t0 = time.perf_counter()
                ray_engine.init_ray(None)
                startup = time.perf_counter() - t0
                rows.append(Row("search", "engine_ray", "startup", startup, "s", shape=label,
                                note="ray.init (once per search, not per trial)"))
                t0 = time.perf_counter()
                ray_engine.run(s, storage, o.engine_trials)
                wall = time.perf_counter() - t0
                import ray
                ray.shutdown()
            times = _trial_times(storage, s.study_name)
            if hasattr(storage, "engine"):
                storage.engine.dispose()    # release the SQLite file before the folder goes
    except Exception as exc:  # the search is still being built: report, do not invent
        msg = str(exc).strip().splitlines()
        return rows + [Row("search", f"engine_{engine}", "overhead", PENDING, "%", shape=label,
                           target="<= 5% of a proxy trial",
                           note=f"{type(exc).__name__}: {msg[0] if msg else ''}"[:200])]
    if not times.bodies:
        return rows + [Row("search", f"engine_{engine}", "overhead", PENDING, "%", shape=label,
                           target="<= 5% of a proxy trial", note="no trial recorded wall_s")]
    body, span, n = sum(times.bodies), sum(times.spans), len(times.bodies)
    gaps = [max(sp - b, 0.0) for sp, b in zip(times.spans, times.bodies)]
    # The first trial also pays a fresh worker's start-up (a Ray actor imports torch):
    # once per worker, so the steady per-trial overhead is taken over the later trials.
    later_gaps, later_bodies = (gaps[1:], times.bodies[1:]) if n > 1 else (gaps, times.bodies)
    log(f"  engine {engine}: wall {wall:.1f} s, trial spans {span:.1f} s, trial bodies {body:.1f} s over {n} trials; "
        f"first trial overhead {gaps[0]:.2f} s, later {sum(later_gaps) / len(later_gaps):.2f} s each")
    return rows + [
        Row("search", f"engine_{engine}", "wall_per_trial", wall / n, "s", shape=label),
        Row("search", f"engine_{engine}", "body_per_trial", body / n, "s", shape=label,
            note="nas.trial.run_trial wall (user attr wall_s)"),
        Row("search", f"engine_{engine}", "fixed_startup", max(wall - span, 0.0), "s", shape=label,
            note="engine wall outside every trial's span: set-up and tear-down, once per search"),
        Row("search", f"engine_{engine}", "first_trial_overhead", gaps[0], "s", shape=label,
            note="span minus body of the first trial: includes starting a worker (once per worker)"),
        Row("search", f"engine_{engine}", "overhead_s_per_trial", sum(later_gaps) / len(later_gaps), "s",
            shape=label, note="span (asked -> told) minus body, later trials: sampler, storage, scheduling"),
        Row("search", f"engine_{engine}", "overhead", 100 * sum(later_gaps) / sum(later_bodies), "%", shape=label,
            target="<= 5% of a proxy trial", note="sum(span - body) / sum(body) over the trials after the first"),
        Row("search", f"engine_{engine}", "overhead_incl_startup", 100 * (wall - body) / body, "%", shape=label,
            note=f"(engine wall - bodies) / bodies: every start-up spread over only {n} trials"),
    ]


FAST_PATH_MODELS = ("iu-ldm-s", "ldm-l")     # one iU-Net expert and the reference, network forward only
PROXY_ITEM = "search-proxy"                 # meme-table4's first expert as a default-space trial trains it


def fast_path_models(o: BenchOptions) -> list[tuple[str, MemeConfig, int]]:
    """(item, config, batch): the two models at the bench's shape, then a search proxy at its own."""
    from meme.references import resolve
    from nas.proxy import proxy_config
    from nas.space import load_space

    out = [(name, at_resolution(resolve(name), o.resolution), o.batch) for name in FAST_PATH_MODELS]
    proxy = load_space("meme_ffhq256").proxy
    return out + [(PROXY_ITEM, proxy_config(resolve("meme-table4"), proxy), proxy.batch_size)]


@dataclass(frozen=True)
class Variant:
    """One numeric path of a network forward, timed against plain fp32 eager."""

    name: str
    channels_last: bool
    bf16: bool
    compiled: bool = False


def fast_path_variants(compile: bool) -> tuple[Variant, ...]:
    out = (Variant("fp32", False, False), Variant("channels_last", True, False), Variant("bf16", False, True),
           Variant("bf16+channels_last", True, True))
    return out + ((Variant("bf16+channels_last+compile", True, True, compiled=True),) if compile else ())


def bench_fast_paths(o: BenchOptions, dev: torch.device, log: Callable[[str], None]) -> list[Row]:
    """What each fast path buys one denoiser forward, and whether the MACs ratio survives it.

    Every variant runs the same woken network (zero-init convs given random weights,
    so every layer shapes the output) on the same batch; speed-ups and the relative
    L2 error are against fp32 eager of that model, measured in this run.
    """
    from meme.fastpath import FastPath, compile_for_inference
    from meme.networks import build_network, wake_zero_init
    from meme.references import resolve

    variants = fast_path_variants(o.compile)
    times: dict[tuple[str, str], float] = {}
    rows: list[Row] = []
    macs: dict[str, float] = {}
    for name, cfg, b in fast_path_models(o):
        macs[name] = gmacs_mean(cfg)
        label = shape_label(cfg, b)
        torch.manual_seed(0)
        net = wake_zero_init(build_network(cfg.experts[0], cfg.data)).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(b, cfg.data.channels, cfg.data.resolution, cfg.data.resolution, generator=g)
        t = torch.randint(0, cfg.diffusion.timesteps, (b,), generator=g).to(dev)
        ref = None
        for v in variants:
            if v.compiled and name == PROXY_ITEM:
                continue    # a trial never compiles: each candidate would pay it anew
            fp = FastPath(dev.type, bf16=v.bf16, channels_last=v.channels_last)
            fp.prepare(net, dev)
            xv = fp.input(x, dev)
            run = compile_for_inference(net) if v.compiled else net

            def forward():
                with torch.no_grad(), fp.autocast():
                    return run(xv, t)

            compile_s = None
            if v.compiled:
                with cold_compile():
                    compile_s = time_runs(forward, dev, 1, 0)[0]
            s = median(time_runs(forward, dev, o.repeats, o.warmup))
            y = forward().float().cpu()
            if ref is None:
                ref = y
            err = float((y - ref).norm() / ref.norm())
            times[(name, v.name)] = s
            base = times[(name, variants[0].name)]
            log(f"  fast path {name:<9} {v.name:<26} {1e3 * s:8.1f} ms  x{base / s:.2f}  rel.err {err:.1e}")
            rows.append(Row("fastpath", name, f"ms_{v.name}", 1e3 * s, "ms", base / s, "", "", label,
                            f"one forward, no_grad; vs_ref = fp32 eager / this; rel. L2 error vs fp32 {err:.1e}"))
            if compile_s is not None:
                rows.append(Row("fastpath", name, "compile_time", compile_s - s, "s", shape=label,
                                note="first compiled forward minus a steady one (inductor, frozen weights, cold caches)"))
            del run
        del net
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    iu, ref_name = FAST_PATH_MODELS
    label = shape_label(at_resolution(resolve(ref_name), o.resolution), o.batch)
    for v in variants:
        rows.append(Row("fastpath", f"{iu}/{ref_name}", f"speed_ratio_{v.name}",
                        times[(ref_name, v.name)] / times[(iu, v.name)], "x", "", macs[ref_name] / macs[iu],
                        "", label, "how much of the MACs ratio this path realises"))
    return rows


COMPILE_MODELS = ("meme-table4", REFERENCE)


def bench_compile(o: BenchOptions, dev: torch.device, eager_ips: dict[str, float],
                  log: Callable[[str], None]) -> list[Row]:
    """Sampling with every expert compiled (``compile_for_inference``), MEME and LDM-L.

    Compile time is kept apart from steady-state speed; the compiled MEME / LDM-L
    ratio is set beside the MACs ratio, as in the sampling section.
    """
    from meme.diffusion import Diffusion
    from meme.experts import build_denoiser
    from meme.fastpath import compile_for_inference
    from meme.references import resolve
    from meme.sample import SamplingPlan, generate

    rows: list[Row] = []
    ips: dict[str, float] = {}
    macs: dict[str, float] = {}
    label = ""
    for name in COMPILE_MODELS:
        cfg = at_resolution(resolve(name), o.resolution)
        label = shape_label(cfg, o.batch, o.steps)
        if o.quick:
            return [Row("compile", name, "compile_time", "skipped (--quick)", "s", shape=label)]
        macs[name] = gmacs_mean(cfg)
        torch.manual_seed(0)
        den = build_denoiser(cfg)
        for i in range(len(den.experts)):
            den.experts[i] = compile_for_inference(den.experts[i])
        diff = Diffusion(cfg.diffusion)
        shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        plan = SamplingPlan(n=o.batch, steps=o.steps, batch_size=o.batch, seed=0)
        with cold_compile():
            first = time_runs(lambda: generate(den, diff, shape, plan, dev), dev, 1, 0)[0]
        steady = median(time_runs(lambda: generate(den, diff, shape, plan, dev), dev, o.repeats, o.warmup))
        ips[name] = o.batch / steady
        log(f"  compile {name}: first run {first:.1f} s, steady {steady:.3f} s")
        eager = eager_ips.get(name)
        rows += [
            Row("compile", name, "compile_time", first - steady, "s", shape=label,
                note=f"first sampling run minus a steady one ({cfg.num_experts} expert(s) compiled, cold caches)"),
            Row("compile", name, "img_per_s_compiled", ips[name], "img/s", shape=label),
            Row("compile", name, "steady_state_gain", ips[name] / eager if eager else PENDING, "x",
                shape=label, note="compiled img/s / eager img/s (sampling section)"),
        ]
        del den
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    meme, ref = COMPILE_MODELS
    rows.append(Row("compile", f"{meme}/{ref}", "img_per_s_ratio_compiled", ips[meme] / ips[ref], "x", "",
                    macs[ref] / macs[meme], ">= 3.2 (GPU)", label, "both compiled; the MACs ratio is the ideal"))
    return rows


def target_rows(rows: list[Row], dev: torch.device, device_name: str) -> list[Row]:
    """The four targets as ratios from this run; GPU targets stay unmeasured on a CPU."""
    def find(section: str, item: str, metric: str) -> Optional[Row]:
        return next((r for r in rows if (r.section, r.item, r.metric) == (section, item, metric)), None)

    out = []
    here = "cuda" if dev.type == "cuda" else "cpu"
    s = find("sampling", "meme-table4", "img_per_s")
    out.append(Row("target", "meme-table4/ldm-l sampling", f"img_per_s_ratio ({here})",
                   s.vs_ref if s else "not run", "x", "", s.macs_ratio if s else "", ">= 3.2 on GPU",
                   s.shape if s else "", "eager, default fast path"))
    c = find("compile", "meme-table4/ldm-l", "img_per_s_ratio_compiled")
    if c is not None:
        out.append(Row("target", "meme-table4/ldm-l sampling", f"img_per_s_ratio compiled ({here})", c.value, "x",
                       "", c.macs_ratio, ">= 3.2 on GPU", c.shape, "every expert compiled (meme.sample --compile)"))
    m = find("training", "iunet-expert0", "mfu")
    out.append(Row("target", "iU-Net expert training", f"mfu ({here})", m.value if m else "not run", "%",
                   target=">= 35% on H100/H200 bf16", shape=m.shape if m else "", note=m.note if m else ""))
    if dev.type != "cuda":
        out.append(Row("target", "meme-table4/ldm-l sampling", "img_per_s_ratio (H100/H200)", NOT_MEASURED, "x",
                       target=">= 3.2", shape="3x64x64 b32 50 steps", note="needs a GPU run"))
        out.append(Row("target", "iU-Net expert training", "mfu (H100/H200 bf16)", NOT_MEASURED, "%",
                       target=">= 35%", shape="3x64x64 b64", note="needs a GPU run"))
    c = find("search", "macs_check", "s_per_candidate")
    out.append(Row("target", "MACs check", "s_per_candidate", c.value if c else "not run", "s", target="<= 1 s",
                   shape=c.shape if c else ""))
    for e in ENGINES:
        r = find("search", f"engine_{e}", "overhead")
        out.append(Row("target", f"engine overhead ({e})", "pct_of_trial", r.value if r else "not run", "%",
                       target="<= 5%", shape=r.shape if r else "", note=r.note if r else ""))
    return out


# ---- output ----------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        return f"{v:.3g}" if a < 0.01 and v else (f"{v:.2f}" if a < 1000 else f"{v:.0f}")
    return str(v)


def format_table(rows: list[Row]) -> str:
    cols = ("section", "item", "metric", "value", "unit", "vs_ref", "macs_ratio", "target", "shape")
    cells = [[_fmt(getattr(r, c)) for c in cols] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, width)).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in width])] + [line(x) for x in cells])


def write_csv(rows: list[Row], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(r.as_dict() for r in rows)
    return path


_MD_HEADER = """# Benchmarks

Written by `python -m nas.bench` (one section per device; a rerun replaces its section).
Timings are medians after warm-up (CUDA events on GPU, perf_counter on CPU). `vs_ref` is
the measured ratio against LDM-L, `macs_ratio` the ideal one from `meme.macs` (GMACs per
step, attention included). Figures a run could not measure say so; none are estimated.
"""

_GPU_PENDING_KEY = "cuda (pending)"
_GPU_PENDING = f"""<!-- bench:{_GPU_PENDING_KEY} -->
## GPU (H100 / H200): {NOT_MEASURED}

No GPU run has been recorded yet. To fill this section on a CUDA machine:

    python -m nas.bench --device cuda --compile

| target | value |
|---|---|
| meme-table4 / ldm-l sampling img/s at 3x64x64 b32 (target >= 3.2) | {NOT_MEASURED} |
| iU-Net expert training MFU, bf16 (target >= 35%) | {NOT_MEASURED} |
| peak device memory, normal vs low-memory sampling | {NOT_MEASURED} |
| torch.compile time and steady-state gain (sampling and training) | {NOT_MEASURED} |
| fast paths: bf16 + channels_last and compiled speed-ups, iU-Net / LDM-L ratio realised | {NOT_MEASURED} |
<!-- /bench -->
"""


def update_markdown(path: Path, key: str, section: str, cuda: bool) -> None:
    """Replace (or add) the section marked ``key``; a CUDA run also drops the pending note."""
    text = path.read_text() if path.exists() else _MD_HEADER
    blocks = re.split(r"(?=<!-- bench:)", text)
    head, blocks = blocks[0], blocks[1:]
    keep = []
    for b in blocks:
        m = re.match(r"<!-- bench:(.*?) -->", b)
        k = m.group(1) if m else None
        if k in (key, _GPU_PENDING_KEY):       # the pending note is re-added last when still true
            continue
        keep.append(b.rstrip() + "\n\n")
    keep.append(section.rstrip() + "\n\n")
    has_cuda = any(re.match(r"<!-- bench:cuda", b) for b in keep)
    if not has_cuda:
        keep.append(_GPU_PENDING + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head.rstrip() + "\n\n" + "".join(keep).rstrip() + "\n")


def device_name(dev: torch.device) -> str:
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


# ---- driver ----------------------------------------------------------------------------

def run_bench(o: BenchOptions, log: Callable[[str], None] = print) -> tuple[list[Row], dict[str, str]]:
    """Every requested section, in one process; returns rows and run metadata."""
    dev = torch.device(o.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    name = device_name(dev)
    meta = {"device": name, "device_type": dev.type, "torch": torch.__version__,
            "threads": str(torch.get_num_threads()), "date": _dt.date.today().isoformat(),
            "mode": "quick" if o.quick else "full",
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    rows: list[Row] = []
    peaks = {}
    for dtype in peak_dtypes(dev):
        peaks[dtype] = matmul_peak_flops(dev, o.matmul_n, dtype)
        rows.append(Row("device", name, f"matmul_peak_{dtype_name(dtype)}", peaks[dtype] / 1e12, "TFLOP/s",
                        shape=f"{o.matmul_n}^3",
                        note=f"torch {torch.__version__}, {torch.get_num_threads()} threads"))
        log(f"device: {name}; measured {dtype_name(dtype)} matmul peak {peaks[dtype] / 1e12:.2f} TFLOP/s")
    eager_ips: dict[str, float] = {}
    if "fastpath" in o.only:
        log("fast paths ...")
        rows += bench_fast_paths(o, dev, log)
    if "sampling" in o.only:
        log("sampling ...")
        r = bench_sampling(o, dev, log)
        rows += r
        eager_ips = {x.item: x.value for x in r if x.metric == "img_per_s"}
    if "training" in o.only:
        log("training ...")
        rows += bench_training(o, dev, peaks, log)
    if "memory" in o.only:
        log("memory ...")
        rows += bench_memory(o, dev, log)
    if "search" in o.only:
        log("search ...")
        rows += bench_macs_check(o)
        for e in ENGINES:
            rows += bench_engine(e, o, dev, log)
    if o.compile:
        log("compile ...")
        rows += bench_compile(o, dev, eager_ips, log)
    rows += target_rows(rows, dev, name)
    return rows, meta


def markdown_section(rows: list[Row], meta: dict[str, str], command: str) -> tuple[str, str]:
    from nas.report import markdown_table

    key = f"{meta['device_type']}: {meta['device']}" + (" (quick)" if meta["mode"] == "quick" else "")
    table = markdown_table(COLUMNS, ([r.as_dict()[c] for c in COLUMNS] for r in rows)).rstrip()
    body = (f"<!-- bench:{key} -->\n## {meta['device']}" + (" -- quick mode" if meta["mode"] == "quick" else "")
            + f"\n\n- date: {meta['date']}\n- torch {meta['torch']}, {meta['threads']} threads\n"
            f"- load average at start (1/5/15 min): {meta['load']} -- a shared machine makes CPU timings noisy\n"
            f"- command: `{command}`\n\n{table}\n<!-- /bench -->\n")
    return key, body


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nas.bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="CPU-sized run: 3x32x32, batch 4, 4 steps, 2 repeats")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for the CSV")
    p.add_argument("--md", type=Path, default=Path("results/BENCHMARKS.md"), help="markdown file to update")
    p.add_argument("--no-md", action="store_true", help="do not touch the markdown file")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd experts (not with --quick)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--engines", default=",".join(ENGINES), help="trial engines to time (optuna,ray)")
    p.add_argument("--space", default="tiny", help="search space whose proxy trial the engines run")
    for flag, kind in (("resolution", int), ("batch", int), ("steps", int), ("repeats", int), ("warmup", int),
                       ("train-batch", int), ("train-steps", int), ("matmul-n", int), ("engine-trials", int)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="override the mode's default")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from meme.cli import UserError, main_guard

    @main_guard
    def run(argv):
        args = parse_args(argv)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for, but CUDA is not available here")
        only = tuple(s.strip() for s in args.only.split(",") if s.strip())
        bad = [s for s in only if s not in SECTIONS]
        if bad:
            raise UserError(f"--only: unknown section(s) {bad}; choose from {list(SECTIONS)}")
        engines = tuple(s.strip() for s in args.engines.split(",") if s.strip())
        if any(e not in ENGINES for e in engines):
            raise UserError(f"--engines: choose from {list(ENGINES)}")
        o = default_options(device, args.quick)
        over = {k.replace("-", "_"): getattr(args, k.replace("-", "_"))
                for k in ("resolution", "batch", "steps", "repeats", "warmup", "train-batch", "train-steps",
                          "matmul-n", "engine-trials")}
        o = dataclasses.replace(o, only=only, engines=engines, compile=args.compile, space=args.space,
                                **{k: v for k, v in over.items() if v is not None})
        if o.steps < 4:
            raise UserError("--steps must be >= 4 so that every expert of a 4-expert MEME is timed")
        t0 = time.perf_counter()
        rows, meta = run_bench(o, log=lambda s: print(s, file=sys.stderr, flush=True))
        print(format_table(rows))
        stem = f"bench-{meta['device_type']}{'-quick' if o.quick else ''}-{meta['date']}"
        path = write_csv(rows, args.out / f"{stem}.csv")
        command = "python -m nas.bench " + " ".join(argv if argv is not None else sys.argv[1:])
        if not args.no_md:
            key, section = markdown_section(rows, meta, command.strip())
            update_markdown(args.md, key, section, cuda=meta["device_type"] == "cuda")
        print(f"\n{meta['device']}, torch {meta['torch']}; {time.perf_counter() - t0:.0f} s; csv: {path}"
              + ("" if args.no_md else f"; markdown: {args.md}"))
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
