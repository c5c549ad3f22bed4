"""Model benchmarks: what a user of a trained MEME pays for, measured on the machine at hand.

Sections (``python -m nas.bench`` runs them beside the search-engine benchmark, in one
process, so every ratio is against a baseline measured in the same run):

* **fastpath** -- one network forward of an iU-Net expert and of LDM-L under each
  numeric path (fp32, channels_last, bf16 autocast, both, and compiled with
  ``--compile``): speed-up over fp32 eager, relative error against it, and how much of
  the MACs ratio between the two models each path realises.
* **sampling** -- DDIM images/s at batch 32 and latency at batch 1 through the real
  sampler path (``meme.sample.generate`` on its default fast path: one expert per
  interval, switching as t falls), for the reference models; each model's speed-up over
  LDM-L is printed beside its MACs ratio (``meme.macs``: the ideal speed-up if time
  followed MACs).
* **training** -- step time, images/s and MFU of one iU-Net expert and of LDM-S through
  ``meme.train.Trainer.step`` on the trainer's own fast path (``meme.fastpath``). Model
  FLOPs are 3 x 2 x MACs per sample (forward + backward); the peak is a large matmul in
  the dtype the trainer ran, measured in the same run, so MFU here is relative to what
  the device actually delivers, not to its datasheet.
* **memory** -- peak device memory of normal vs low-memory sampling (one expert on the
  device at a time). On a CPU there is no device memory: the growth of the process's
  resident set is reported instead, labelled as such.

Timing follows the usual profiling recipe (EDM2+ Sec. 4.4): warm-up first, then
repeats timed with CUDA events on a GPU (``time.perf_counter`` on a CPU, where every
op is synchronous), medians reported. Nothing is estimated: a figure this run could
not measure is printed as such ("not yet measured", "pending", "n/a (cpu)").
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import platform
import re
import statistics
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
COLUMNS = ("section", "item", "metric", "value", "unit", "vs_ref", "macs_ratio", "target", "shape", "note")
ENGINES = ("optuna", "ray")              # search engines nas.bench times (BenchOptions.engines)
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

def time_runs(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
              cpu_clock: bool = False) -> list[float]:
    """Seconds of each timed call: CUDA events on a GPU, perf_counter on a CPU.

    ``cpu_clock``: on a CPU, the calling thread's CPU time instead (``time.thread_time``).
    With one torch thread that is the wall time the call takes on an idle machine, less
    the time a loaded machine's scheduler kept it waiting (``meme.latency``).
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


FAST_PATH_MODELS = ("iu-ldm-s", "ldm-l")     # one iU-Net expert and the reference, network forward only
Model = tuple[str, MemeConfig, int]          # (item, config at its bench shape, batch)


def fast_path_models(o: BenchOptions, extra: Iterable[Model] = ()) -> list[Model]:
    """The two models at the bench's shape, then any extra ones (e.g. a search proxy) at their own."""
    from meme.references import resolve

    return [(name, at_resolution(resolve(name), o.resolution), o.batch) for name in FAST_PATH_MODELS] + list(extra)


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


def bench_fast_paths(o: BenchOptions, dev: torch.device, log: Callable[[str], None],
                     extra: Iterable[Model] = ()) -> list[Row]:
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
    for name, cfg, b in fast_path_models(o, extra):
        macs[name] = gmacs_mean(cfg)
        label = shape_label(cfg, b)
        torch.manual_seed(0)
        net = wake_zero_init(build_network(cfg.experts[0], cfg.data)).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(b, cfg.data.channels, cfg.data.resolution, cfg.data.resolution, generator=g)
        t = torch.randint(0, cfg.diffusion.timesteps, (b,), generator=g).to(dev)
        ref = None
        for v in variants:
            if v.compiled and name not in FAST_PATH_MODELS:
                continue    # extra models are search proxies: a trial never compiles, each would pay it anew
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


def iformer_macs_share(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """Fraction of a forward's matmul/conv MACs inside IFormerBlocks (attention counted: SDPA math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from meme.blocks import IFormerBlock, reference_mixers

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), reference_mixers(), FlopCounterMode(display=False) as fc:
        net(x, t)
    counts = fc.get_flop_counts()
    root = type(net).__name__
    inside = sum(sum(counts.get(f"{root}.{n}", {}).values()) for n, m in net.named_modules()
                 if isinstance(m, IFormerBlock))
    return inside / fc.get_total_flops()


def bench_iformer(o: BenchOptions, dev: torch.device, log: Callable[[str], None]) -> list[Row]:
    """iFormer blocks' share of a Table 4 expert's time against their share of its MACs, for the
    fast mixer (``InceptionMixer.fast_forward``) and the reference one, and the expert's
    forward against LDM-L's, at batch 1 on the default fast path.

    The variants are interleaved: each round times every one once, so a change in the
    machine's load reaches all of them alike; medians over the rounds.
    """
    from meme.blocks import IFormerBlock, reference_mixers
    from meme.fastpath import fast_path
    from meme.networks import build_network, wake_zero_init
    from meme.references import resolve

    t4 = at_resolution(resolve("meme-table4"), o.resolution)
    ref_cfg = at_resolution(resolve(REFERENCE), o.resolution)
    torch.manual_seed(0)
    nets = {"meme-table4 expert 1": wake_zero_init(build_network(t4.experts[0], t4.data)).eval(),
            REFERENCE: wake_zero_init(build_network(ref_cfg.experts[0], ref_cfg.data)).eval()}
    x = torch.randn(1, t4.data.channels, t4.data.resolution, t4.data.resolution)
    t = torch.full((1,), 500, dtype=torch.long)
    share_macs = iformer_macs_share(nets["meme-table4 expert 1"], x, t)
    # one torch thread on a CPU: the thread's CPU time, which leaves out waits a loaded machine imposes
    cpu_clock = dev.type == "cpu" and torch.get_num_threads() == 1
    clock = time.thread_time if cpu_clock else time.perf_counter
    inside = [0.0]
    starts: dict[int, float] = {}
    expert = nets["meme-table4 expert 1"]
    for m in expert.modules():
        if isinstance(m, IFormerBlock):
            m.register_forward_pre_hook(lambda mod, args: starts.__setitem__(id(mod), clock()))
            m.register_forward_hook(lambda mod, args, out: inside.__setitem__(0, inside[0] + clock() - starts[id(mod)]))
    paths = {name: fast_path(dev, "auto", net) for name, net in nets.items()}
    for name, net in nets.items():
        paths[name].prepare(net, dev)
    xs = {name: paths[name].input(x, dev) for name in nets}
    variants = [("fast", "meme-table4 expert 1"), ("reference", "meme-table4 expert 1"),
                ("fast", REFERENCE)]
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    shares: dict[str, list[float]] = {"fast": [], "reference": []}
    for r in range(o.warmup + o.repeats):
        for mixer, name in variants:
            inside[0] = 0.0
            ctx = reference_mixers() if mixer == "reference" else contextlib.nullcontext()
            with ctx, torch.no_grad(), paths[name].autocast():
                s = time_runs(lambda: nets[name](xs[name], t.to(dev)), dev, 1, 0, cpu_clock=cpu_clock)[0]
            if r >= o.warmup:
                times[(mixer, name)].append(s)
                if name != REFERENCE:
                    shares[mixer].append(inside[0] / s)
    ms = {v: 1e3 * median(times[v]) for v in variants}
    share = {k: median(v) for k, v in shares.items()}
    gm_t4, gm_ref = gmacs_mean(MemeConfig(name="e1", experts=(t4.experts[0],), data=t4.data,
                                          diffusion=t4.diffusion)), gmacs_mean(ref_cfg)
    label = shape_label(t4, 1)
    prec = paths["meme-table4 expert 1"].describe()
    for mixer in ("fast", "reference"):
        log(f"  iformer {mixer:<9}: expert {ms[(mixer, 'meme-table4 expert 1')]:.1f} ms, iFormer time share "
            f"{100 * share[mixer]:.0f}% vs MACs share {100 * share_macs:.0f}%")
    e = "meme-table4 expert 1"
    return [
        Row("iformer", e, "ms_fast_mixer", ms[("fast", e)], "ms", ms[("reference", e)] / ms[("fast", e)],
            shape=label, note=f"one forward, {prec}; vs_ref = reference mixer / fast mixer, interleaved rounds; "
                              f"{'thread CPU time (1 thread)' if cpu_clock else 'wall'} clock"),
        Row("iformer", e, "ms_reference_mixer", ms[("reference", e)], "ms", shape=label,
            note="InceptionMixer.reference_forward (meme.blocks.reference_mixers)"),
        Row("iformer", e, "macs_share", 100 * share_macs, "%", shape=label,
            note="IFormerBlocks' matmul/conv MACs over the network's (attention included)"),
        Row("iformer", e, "time_share_fast", 100 * share[("fast")], "%", share["fast"] / share_macs, "",
            "<= 1.5x the MACs share", label, "vs_ref = time share / MACs share; forward hooks on every IFormerBlock"),
        Row("iformer", e, "time_share_reference", 100 * share["reference"], "%", share["reference"] / share_macs,
            shape=label, note="vs_ref = time share / MACs share, reference mixer"),
        Row("iformer", f"{e}/{REFERENCE}", "speed_ratio_fast", ms[("fast", REFERENCE)] / ms[("fast", e)], "x", "",
            gm_ref / gm_t4, "", label, "LDM-L ms / expert ms, both on their default fast path, batch 1"),
        Row("iformer", f"{e}/{REFERENCE}", "speed_ratio_reference", ms[("fast", REFERENCE)] / ms[("reference", e)],
            "x", "", gm_ref / gm_t4, "", label, "the same with the reference mixer"),
    ]


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



# ---- output ----------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        # three significant digits below 10, so a ratio of two printed values stays within ~1%
        return f"{v:.3g}" if a < 10 and v else (f"{v:.2f}" if a < 1000 else f"{v:.0f}")
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
