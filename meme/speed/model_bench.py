"""Model benchmarks: what a user of a trained MEME pays for, measured on the machine at hand.

Sections (``python -m nas.bench`` runs them beside the search's own benchmark, in one
process, so every ratio is against a baseline measured in the same run; the network
forward sections, fast paths and iFormer blocks, are ``meme.speed.forward_bench``):

* **sampling** -- DDIM images/s at batch 32 and latency at batch 1 through the real
  sampler path (``meme.sampling.sample.generate`` on its default fast path: one expert per
  interval, switching as t falls), for the reference models; each model's speed-up over
  LDM-L is printed beside its MACs ratio (``meme.model.macs``: the ideal speed-up if time
  followed MACs). On a GPU also batches 8 and 128, each eager and from CUDA graphs
  (``meme.sampling.graphs``), with each model's own graph gain and the MEME / LDM-L
  ratio eager against eager and fastest against fastest. Every (model, path, batch) is
  timed interleaved with the others.
* **training** -- step time, images/s and MFU of one iU-Net expert (on a GPU also at
  batch 256) and of LDM-S through
  ``meme.training.train.Trainer.step`` on the trainer's own fast path (``meme.common.fastpath``). Model
  FLOPs are 3 x 2 x MACs per sample (forward + backward); the peak is a large matmul in
  the dtype the trainer ran, measured in the same run, so MFU here is relative to what
  the device actually delivers, not to its datasheet.
* **memory** -- peak device memory of normal vs low-memory sampling (one expert on the
  device at a time). On a CPU there is no device memory: the rows say "n/a (cpu)".
* **compile** (``--compile``) -- sampling with every expert compiled: compile time apart
  from steady-state speed.

Timing follows ``meme.speed.timing`` (EDM2+ Sec. 4.4): warm-up first, then repeats timed with
CUDA events on a GPU (``time.perf_counter`` on a CPU), medians reported. Nothing is
estimated: a figure this run could not measure is printed as such ("not yet measured",
"pending", "n/a (cpu)").
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from meme.common.fastpath import fast_path
from meme.model.config import MemeConfig
from meme.model.diffusion import Diffusion
from meme.model.experts import build_denoiser
from meme.model.macs import cost_of_meme
from meme.model.references import resolve
from meme.sampling.sample import SamplingPlan, generate, use_cuda_graphs
from meme.speed.bench_report import PENDING, Row
from meme.speed.timing import cold_compile, dtype_name, median, time_runs
from meme.training.train import Trainer, TrainOptions

SECTIONS = ("fastpath", "sampling", "training", "memory")
SAMPLING_MODELS = ("meme-table4", "multi-expert-s", "iu-ldm-s", "ldm-s", "ldm-l")
REFERENCE = "ldm-l"                    # sampling speed-ups are relative to this model
MATRIX_MODELS = ("meme-table4", "ldm-s", REFERENCE)   # timed at every batch and path (the others: default path)
TRAINING_MODELS = ("iunet-expert0", "ldm-s")


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
    compile: bool = False
    only: tuple[str, ...] = SECTIONS
    sampling_batches: tuple[int, ...] = ()   # () = the device's default (sampling_batches)
    train_batches: tuple[int, ...] = ()      # more training batches beside train_batch (GPU default: 256)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def default_options(device: str, quick: bool) -> BenchOptions:
    if quick:
        return BenchOptions(device=device, quick=True, resolution=32, batch=4, steps=4, repeats=2, warmup=1,
                            train_batch=4, train_steps=1, matmul_n=1024)
    if device.startswith("cuda"):
        return BenchOptions(device=device, steps=50, repeats=5, warmup=1, train_batch=64, train_steps=10,
                            matmul_n=8192)
    return BenchOptions(device=device, matmul_n=2048)


# ---- configs ---------------------------------------------------------------------------

def at_resolution(cfg: MemeConfig, resolution: int) -> MemeConfig:
    """The same model on another data resolution (quick mode)."""
    if cfg.data.resolution == resolution:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=resolution)).validate()


def training_config(name: str, resolution: int) -> MemeConfig:
    """'iunet-expert0' = meme-table4's first expert alone; else a reference name."""
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
    return cost_of_meme(cfg).gmacs_mean


# ---- sections --------------------------------------------------------------------------

def sampling_batches(o: BenchOptions, dev: torch.device) -> tuple[int, ...]:
    """Batches the sampling section times: the throughput batch and 1, and on a GPU also
    8 and 128 (where launches, then MACs, set the time)."""
    if o.sampling_batches:
        return tuple(sorted(set(o.sampling_batches) | {1, o.batch}))
    extra = (8, 128) if dev.type == "cuda" and not o.quick else ()
    return tuple(sorted({1, o.batch, *extra}))


def sampling_paths(dev: torch.device) -> tuple[str, ...]:
    """'eager' everywhere; on CUDA also 'graphs' (``meme.sampling.graphs``), the default there."""
    return ("eager", "graphs") if use_cuda_graphs(dev, None) else ("eager",)


def bench_sampling(o: BenchOptions, dev: torch.device, log: Callable[[str], None]) -> list[Row]:
    """Every (model, path, batch) timed interleaved: each repeat runs each of them once, so a
    clock or load drift during the section moves every figure alike instead of one model's."""
    batches, paths = sampling_batches(o, dev), sampling_paths(dev)
    default_path = paths[-1]                       # what generate() runs when not told
    nets, macs, fps = {}, {}, {}
    for name in SAMPLING_MODELS:
        cfg = at_resolution(resolve(name), o.resolution)
        macs[name] = gmacs_mean(cfg)
        torch.manual_seed(0)
        den = build_denoiser(cfg)
        nets[name] = (cfg, den, Diffusion(cfg.diffusion), (cfg.data.channels, cfg.data.resolution, cfg.data.resolution))
        fps[name] = fast_path(dev, "auto", den).describe()
    runs = [(name, path, b) for b in batches for name in SAMPLING_MODELS for path in paths
            if name in MATRIX_MODELS or (path == default_path and b in (1, o.batch))]

    def call(run: tuple[str, str, int]) -> Callable[[], object]:
        name, path, b = run
        cfg, den, diff, shape = nets[name]
        plan = SamplingPlan(n=b, steps=o.steps, batch_size=b, seed=0)
        return lambda: generate(den, diff, shape, plan, dev, cuda_graphs=path == "graphs")

    for run in runs:                               # warm-up: cuDNN's algorithm search, graph captures
        time_runs(call(run), dev, 0, o.warmup)
    times: dict[tuple[str, str, int], list[float]] = {run: [] for run in runs}
    for _ in range(o.repeats):
        for run in runs:
            times[run] += time_runs(call(run), dev, 1, 0)
    s = {run: median(ts) for run, ts in times.items()}
    for (name, path, b), sec in s.items():
        log(f"  sampling {name:<15} {path:<6} batch {b:>3}: {sec:.3f} s for {o.steps} steps")
    del nets
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    def label(name: str, b: int) -> str:
        return shape_label(at_resolution(resolve(name), o.resolution), b, o.steps)

    rows = []
    thr, lat = (default_path, o.batch), (default_path, 1)
    for name in SAMPLING_MODELS:
        mr = macs[REFERENCE] / macs[name]
        t, r = s[(name, *thr)], s[(REFERENCE, *thr)]
        how = f"{fps[name]}{' + CUDA graphs' if default_path == 'graphs' else ''}"
        rows += [
            Row("sampling", name, "img_per_s", o.batch / t, "img/s", r / t, mr,
                ">= 3.2x ldm-l (GPU)" if name == "meme-table4" else "", label(name, o.batch),
                f"DDIM via meme.sampling.sample.generate ({how}); {macs[name]:.2f} GMACs/step/img"),
            Row("sampling", name, "ms_per_step", 1e3 * t / o.steps, "ms", r / t, mr,
                "", label(name, o.batch), "one denoiser forward + DDIM update, whole batch"),
            Row("sampling", name, "latency_per_img", s[(name, *lat)], "s", s[(REFERENCE, *lat)] / s[(name, *lat)], mr,
                "", label(name, 1), f"batch 1, {o.steps} DDIM steps"),
        ]
    if len(paths) == 1 and batches == tuple(sorted({1, o.batch})):
        return rows
    for b in batches:                              # the whole matrix: each path, each batch
        for name in MATRIX_MODELS:
            mr = macs[REFERENCE] / macs[name]
            for path in paths:
                t = s[(name, path, b)]
                rows.append(Row("sampling", name, f"img_per_s_b{b}_{path}", b / t, "img/s",
                                s[(REFERENCE, path, b)] / t, mr, "", label(name, b),
                                f"vs_ref = ldm-l on the same path; {o.repeats} interleaved repeats"))
            if "graphs" in paths:
                rows.append(Row("sampling", name, f"graph_gain_b{b}", s[(name, "eager", b)] / s[(name, "graphs", b)],
                                "x", shape=label(name, b), note="eager time / CUDA-graph time: this model's own gain"))
        pair = ("meme-table4", REFERENCE)
        mr = macs[REFERENCE] / macs["meme-table4"]
        best = {n: min(s[(n, p, b)] for p in paths) for n in pair}
        target = {1: ">= 1.2 (GPU)", 32: ">= 2.6 (GPU)", 128: f">= {0.85 * mr:.2f} (85% of MACs, GPU)"}.get(b, "")
        rows += [
            Row("sampling", "meme-table4/ldm-l", f"img_per_s_ratio_b{b}_eager",
                s[(REFERENCE, "eager", b)] / s[("meme-table4", "eager", b)], "x", "", mr, "", label(REFERENCE, b),
                "both eager"),
            Row("sampling", "meme-table4/ldm-l", f"img_per_s_ratio_b{b}_best", best[REFERENCE] / best["meme-table4"],
                "x", "", mr, target, label(REFERENCE, b), "each model on its fastest path"),
        ]
    return rows


def _latent_file(folder: Path, cfg: MemeConfig, n: int = 64) -> Path:
    """Random latents for Trainer's data loader: training speed does not depend on the data."""
    d = cfg.data
    path = folder / f"latents-{d.channels}x{d.resolution}.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.standard_normal((n, d.channels, d.resolution, d.resolution)).astype(np.float32))
    return path


def training_batches(o: BenchOptions, dev: torch.device) -> tuple[int, ...]:
    """Batches the iU-Net expert trains at: train_batch, and on a GPU also 256 (MFU wants work)."""
    if o.train_batches:
        return tuple(sorted(set(o.train_batches) | {o.train_batch}))
    return tuple(sorted({o.train_batch, *((256,) if dev.type == "cuda" and not o.quick else ())}))


def bench_training(o: BenchOptions, dev: torch.device, peaks: dict[torch.dtype, float],
                   log: Callable[[str], None]) -> list[Row]:
    rows = []
    runs = [(name, False, o.train_batch) for name in TRAINING_MODELS]
    runs += [(TRAINING_MODELS[0], False, b) for b in training_batches(o, dev) if b != o.train_batch]
    if o.compile and not o.quick:
        runs.append((TRAINING_MODELS[0], True, o.train_batch))
    with tempfile.TemporaryDirectory(prefix="meme-bench-") as tmp:
        for name, compiled, batch in runs:
            cfg = training_config(name, o.resolution)
            data = _latent_file(Path(tmp), cfg, n=max(2 * batch, 16))
            opts = TrainOptions(data=str(data), steps=10 ** 9, batch_size=batch, warmup=1,
                                device=str(dev), sample_every=0, seed=0, compile=compiled)
            trainer = Trainer(cfg, opts, Path(tmp) / f"{name}-{compiled}-{batch}")
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
            achieved = batch * 6 * macs / step_s
            label = shape_label(cfg, batch)
            prec = trainer.fast.describe()
            peak_dtype = torch.bfloat16 if trainer.fast.bf16 else torch.float32
            peak, peak_label = peaks[peak_dtype], dtype_name(peak_dtype)
            log(f"  training {name:<15} batch {batch:>3}: {step_s * 1e3:.1f} ms/step, MFU {100 * achieved / peak:.1f}%"
                + (f" (compiled; first step {first_s:.1f} s)" if compiled else ""))
            if batch != o.train_batch:
                rows += [
                    Row("training", name, f"step_time_b{batch}", 1e3 * step_s, "ms", shape=label,
                        note=f"meme.training.train.Trainer.step, {prec}"),
                    Row("training", name, f"mfu_b{batch}", 100 * achieved / peak, "%", shape=label,
                        target=">= 30% (H100/H200 bf16)" if batch >= 256 else "",
                        note=f"vs measured {peak_label} matmul peak {peak / 1e12:.2f} TFLOP/s"),
                ]
            elif compiled:
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
                    Row("training", name, "step_time", 1e3 * step_s, "ms", note=f"meme.training.train.Trainer.step, {prec}",
                        shape=label),
                    Row("training", name, "img_per_s", batch / step_s, "img/s", shape=label),
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
                        note="torch.cuda.max_memory_allocated over one meme.sampling.sample.generate call"))
        log(f"  memory {mode}: {peaks[mode]:.0f} MiB")
    rows.append(Row("memory", "meme-table4", "low_memory_saving", peaks["normal"] / peaks["low_memory"], "x",
                    shape=label, note="normal peak / low-memory peak"))
    del den
    torch.cuda.empty_cache()
    return rows


COMPILE_MODELS = ("meme-table4", REFERENCE)


def bench_compile(o: BenchOptions, dev: torch.device, eager_ips: dict[str, float],
                  log: Callable[[str], None]) -> list[Row]:
    """Sampling with every expert compiled (``generate(compile=True)``: inductor, and on CUDA
    the compiled kernels replayed from CUDA graphs, as ``mode="reduce-overhead"`` does), MEME
    and LDM-L.

    Compile time is kept apart from steady-state speed; the compiled MEME / LDM-L
    ratio is set beside the MACs ratio, as in the sampling section.
    """
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
        diff = Diffusion(cfg.diffusion)
        shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        plan = SamplingPlan(n=o.batch, steps=o.steps, batch_size=o.batch, seed=0)
        with cold_compile():
            first = time_runs(lambda: generate(den, diff, shape, plan, dev, compile=True), dev, 1, 0)[0]
        steady = median(time_runs(lambda: generate(den, diff, shape, plan, dev, compile=True), dev, o.repeats,
                                  o.warmup))
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
