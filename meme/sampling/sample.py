"""Sampling a trained MEME: ``meme-nas sample --run DIR``, or a schedule of one slimmable
supernet's sub-networks, nothing retrained: ``meme-nas sample --schedule FILE [--supernet DIR]``.

Two schedules give the same images for the same seed:

* normal: every expert on the accelerator; each batch runs its whole trajectory.
* ``--low-memory`` (paper appendix): one expert on the accelerator at a time. All
  batches run through the interval of the expert owning the largest t, then the
  next expert is loaded, and so on. Intermediate states wait in host memory, or on
  disk (``--offload-dir``) when n is very large.

They agree because every random draw is keyed by (seed, batch, step) instead of
being taken from one running generator, so the order of work does not matter. The same
keying makes two schedules of one supernet, sampled with one seed, a paired comparison:
same weights, same initial noise, same noise at every step.

A schedule's experts are copies of its sub-networks' slices by default (plain networks,
the fastest per step); ``--views`` runs them on the one resident supernet instead (its
weights once, nothing copied; the same numbers up to float rounding).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from meme.common import checkpoint
from meme.common.command import CommandParser, add_fast_path_flag, main_guard, setup_logging
from meme.common.device import pick_device
from meme.common.errors import UserError
from meme.common.fastpath import PRECISIONS, FastPath, compile_budget, compile_for_inference, fast_path, fast_path_enabled
from meme.common.images import Decoder, decode, save_grid, save_pngs, to_uint8
from meme.data.autoencoder import load_decoder
from meme.data.latents import require_latent_info, run_data_spec
from meme.model.config import MemeConfig, check_config
from meme.model.diffusion import Diffusion
from meme.model.experts import MultiExpertDenoiser, build_denoiser
from meme.model.resources import check_fits
from meme.model.schedule import load_schedule, schedule_denoiser
from meme.model.shared_parts import move_private, shared_modules
from meme.sampling.graphs import GraphedExperts, graphed_experts, release

log = logging.getLogger("meme.sampling.sample")
SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class SamplingPlan:
    """What to sample: the same plan gives the same images on either schedule."""

    n: int = 64                 # number of images
    steps: int = 50             # denoising steps
    eta: float = 0.0            # DDIM stochasticity (0 = deterministic)
    sampler: str = "ddim"       # 'ddim' or 'ddpm' (ancestral)
    seed: int = 0               # keys every random draw
    batch_size: int = 64        # images per forward pass
    clip_x0: bool = False       # clamp x_0 estimates to [-1, 1] (pixel models)

    def batches(self) -> list[tuple[int, int]]:
        """(start, size) of each batch."""
        return [(s, min(self.batch_size, self.n - s)) for s in range(0, self.n, self.batch_size)]


def keyed_noise(seed: int, batch: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Gaussian noise that depends only on (seed, batch, step); step -1 is x_T."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + batch) * 100_003 + step + 1)
    return torch.randn(shape, generator=g)


def timestep_pairs(diffusion: Diffusion, plan: SamplingPlan) -> list[tuple[int, int]]:
    """(t, t_prev) for every step, t descending; t_prev = -1 ends at x_0."""
    ts = diffusion.ddim_timesteps(plan.steps)
    return list(zip(ts, ts[1:] + [-1]))


def _step(diffusion: Diffusion, plan: SamplingPlan, x, t, t_prev, eps, noise):
    """One reverse step; 'ddpm' with fewer than T steps is respaced ancestral sampling."""
    if plan.sampler == "ddpm":
        return diffusion.ddpm_step(x, t, eps, noise, t_prev=t_prev, clip_x0=plan.clip_x0)
    return diffusion.ddim_step(x, t, t_prev, eps, plan.eta, noise, clip_x0=plan.clip_x0)


def _needs_noise(plan: SamplingPlan, t_prev: int) -> bool:
    """Deterministic DDIM and the last step draw nothing (saves a host->device copy per step)."""
    return t_prev >= 0 and (plan.sampler == "ddpm" or plan.eta > 0)


Forward = Callable[[int, torch.Tensor, int], torch.Tensor]   # (expert index, x, t) -> fp32 eps


def eager_forward(experts: Sequence[nn.Module], device: torch.device) -> Forward:
    """Each step's forward run op by op (called inside ``_run_steps``'s autocast region)."""
    def forward(e: int, x: torch.Tensor, t: int) -> torch.Tensor:
        return experts[e](x, torch.full((x.shape[0],), t, device=device, dtype=torch.long)).float()
    return forward


@torch.no_grad()
def _run_steps(forward: Forward, e: int, diffusion, plan, x, b, pairs, first_index, device, fp: FastPath):
    """Expert ``e``'s run of steps on one batch, inside ONE autocast region.

    Autocast keeps its bf16 copy of each weight until the region closes, so the weights
    are cast once per run instead of once per step (per step that cast cost meme-table4
    8% and LDM-L 10% of a 3x64x64 batch-4 forward on a 2-core AMX Xeon). It caches only
    leaf tensors that require grad, which every denoiser ``meme`` builds or loads has.
    The sampler's update stays fp32: autocast leaves elementwise ops alone.
    """
    with fp.autocast():
        for i, (t, t_prev) in enumerate(pairs, start=first_index):
            eps = forward(e, x, t)
            noise = fp.input(keyed_noise(plan.seed, b, i, tuple(x.shape)), device) \
                if _needs_noise(plan, t_prev) else None
            x = _step(diffusion, plan, x, t, t_prev, eps, noise)
    return x


def use_cuda_graphs(device: torch.device, asked: Optional[bool]) -> bool:
    """CUDA graphs: on by default on CUDA (unless --no-fast-path), refused elsewhere when asked."""
    if asked is None:
        return device.type == "cuda" and fast_path_enabled()
    if asked and device.type != "cuda":
        raise UserError(f"CUDA graphs need a CUDA device; this run samples on {device}")
    return asked


def _segments(denoiser: MultiExpertDenoiser, pairs):
    """Split the step list into runs that share one expert: (expert index, first step, pairs)."""
    segs: list[tuple[int, int, list]] = []
    for i, (t, tp) in enumerate(pairs):
        e = int(denoiser.expert_index(torch.tensor([t]))[0])
        if segs and segs[-1][0] == e:
            segs[-1][2].append((t, tp))
        else:
            segs.append((e, i, [(t, tp)]))
    return segs


@torch.no_grad()
def generate(denoiser: MultiExpertDenoiser, diffusion: Diffusion, shape: tuple[int, int, int],
             plan: SamplingPlan, device: torch.device | str = "cpu", low_memory: bool = False,
             offload_dir: Optional[Path] = None, progress: bool = False,
             precision: str = "auto", compile: bool = False, cuda_graphs: Optional[bool] = None) -> torch.Tensor:
    """Samples in [-1, 1] on the CPU, [n, C, H, W].

    ``precision`` picks the fast path (``meme.common.fastpath``): 'auto' runs the network in
    bf16 where the device does so natively; the sampler's update is always fp32.
    ``compile`` wraps each expert in ``torch.compile`` (inductor, weights frozen):
    it pays only when n is large, since the first batch waits for the compiler.
    ``cuda_graphs`` replays each expert's forward from a CUDA graph (``meme.sampling.graphs``);
    None: on CUDA unless ``--no-fast-path``. Same images as eager, up to bf16 rounding.
    """
    device = torch.device(device)
    fp = fast_path(device, precision, denoiser)
    graphs = use_cuda_graphs(device, cuda_graphs)
    if compile and low_memory:
        raise UserError("--compile and --low-memory do not combine: compiled experts keep their weights "
                        "on the device they were compiled for")
    denoiser.eval()
    pairs = timestep_pairs(diffusion, plan)
    segs = _segments(denoiser, pairs)
    batches = plan.batches()
    sizes = sorted({size for _, size in batches})
    bar = tqdm(total=len(batches) * len(pairs), disable=not progress, desc="sampling", unit="step")
    if not low_memory:
        fp.prepare(denoiser, device)
        experts = [compile_for_inference(e) for e in denoiser.experts] if compile else list(denoiser.experts)
        forward = graphed_experts(denoiser, experts, sizes, fp, device, variant=compile) if graphs \
            else eager_forward(experts, device)
        out = []
        with compile_budget(len(experts) * len(sizes) if compile else 0):
            for b, (_, size) in enumerate(batches):
                x = fp.input(keyed_noise(plan.seed, b, -1, (size, *shape)), device)
                for e, first, seg in segs:
                    x = _run_steps(forward, e, diffusion, plan, x, b, seg, first, device, fp)
                    bar.update(len(seg))
                out.append(x.float().cpu())
        bar.close()
        return torch.cat(out)
    # Low memory: expert-major order; states wait on the host (or on disk).
    denoiser.cpu()
    store = _StateStore(offload_dir)
    for b, (_, size) in enumerate(batches):
        store.put(b, keyed_noise(plan.seed, b, -1, (size, *shape)))
    shared = shared_modules(denoiser.experts)   # parts every expert holds stay on the device throughout
    for e, first, seg in segs:
        expert = fp.prepare(denoiser.experts[e], device)
        only = [expert if i == e else None for i in range(len(denoiser.experts))]
        forward = GraphedExperts(only, sizes, fp, device) if graphs else eager_forward(only, device)
        for b in range(len(batches)):
            x = _run_steps(forward, e, diffusion, plan, fp.input(store.get(b), device), b, seg, first, device, fp)
            store.put(b, x.float().cpu())
            bar.update(len(seg))
        del forward                             # its graphs (and their memory pool) go with the expert
        move_private(expert, "cpu", keep=shared)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for m in shared:
        m.cpu()
    bar.close()
    return torch.cat([store.get(b) for b in range(len(batches))])


class _StateStore:
    """Host-memory dict of batch states, or .pt files in a folder for very large n."""

    def __init__(self, folder: Optional[Path]):
        self.folder = Path(folder) if folder else None
        self.mem: dict[int, torch.Tensor] = {}
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def put(self, b: int, x: torch.Tensor) -> None:
        if self.folder:
            torch.save(x, self.folder / f"state_{b:06d}.pt")
        else:
            self.mem[b] = x

    def get(self, b: int) -> torch.Tensor:
        return checkpoint.load(self.folder / f"state_{b:06d}.pt", what="sampling state") if self.folder else self.mem[b]


# ---------------------------------------------------------------------------- run dirs
def load_run(run: Path, use_ema: bool = True) -> tuple[MemeConfig, MultiExpertDenoiser, int]:
    """A training run directory -> (config, denoiser with EMA weights, step)."""
    run = Path(run)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{run} is not a training run: {cfg_path} is missing (train with `meme-nas train --out {run}`)")
    cfg = MemeConfig.load(cfg_path)
    path = run / "checkpoints" / "last.pt"
    ckpt = checkpoint.load_training(path)
    check_config(ckpt, cfg, path)
    check_fits(cfg, 1, torch.device("cpu"), training=False, what=str(cfg_path))
    denoiser = build_denoiser(cfg)
    with checkpoint.applying(path):
        denoiser.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    return cfg, denoiser, int(ckpt["step"])


def write_samples(samples: torch.Tensor, out: Path, decoder: Optional[Decoder] = None) -> dict:
    """PNGs, grid.png and samples.npz (uint8 NHWC under key 'samples')."""
    out.mkdir(parents=True, exist_ok=True)
    images = decode(samples, decoder)
    arr = to_uint8(images)
    np.savez_compressed(out / "samples.npz", samples=arr)
    save_pngs(arr, out / "png")
    save_grid(images[:64], out / "grid.png")
    return {"npz": str(out / "samples.npz"), "grid": str(out / "grid.png"), "n": len(arr),
            "decoded": decoder is not None}


def run_decoder(run: Path, cfg: MemeConfig, device: torch.device) -> Optional[Decoder]:
    """The first-stage decoder of a latent run (from its latent file's metadata); None for pixels."""
    if not cfg.data.latent:
        return None
    info = require_latent_info(run_data_spec(run), f"sampling {run}")
    log.info("decoding samples with %s (scaling factor %.5g)", info.autoencoder, info.scaling_factor)
    return load_decoder(info, device)


def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(prog="meme-nas sample", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="training run directory (from meme.training.train)")
    p.add_argument("--schedule", type=Path, default=None,
                   help="instead of --run: a schedule YAML of one slimmable supernet's sub-networks")
    p.add_argument("--supernet", type=Path, default=None,
                   help="with --schedule: the trained supernet directory (default: the one the schedule names)")
    p.add_argument("--views", action="store_true",
                   help="with --schedule: run every expert on the one resident supernet instead of copies")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the sampler per image")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="reverse process (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: same seed, same samples (default %(default)s)")
    p.add_argument("--low-memory", action="store_true", help="one expert on the device at a time")
    p.add_argument("--offload-dir", type=Path, default=None, help="with --low-memory: keep states on disk here")
    p.add_argument("--no-ema", action="store_true", help="sample the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 ... (default %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 where the device runs it natively (GPU, AMX CPUs), else fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each expert first (pays for large --n; not with --low-memory)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA: launch every kernel of every step instead of replaying a CUDA graph per "
                        "expert and batch size (for debugging; --no-fast-path turns them off too)")
    p.add_argument("--no-decode", action="store_true",
                   help="latent runs: write raw latent channels instead of decoded images (not for FID)")
    p.add_argument("--out", type=Path, default=None, help="output folder for samples.npz and PNGs "
                                                           "(default: RUN/samples, or SCHEDULE's folder/<name>-samples)")
    add_fast_path_flag(p)
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.n < 1 or args.steps < 1 or args.batch_size < 1:
        raise UserError("--n, --steps and --batch-size must be >= 1")
    if (args.run is None) == (args.schedule is None):
        raise UserError("give one of --run DIR (a training run) or --schedule FILE (a supernet schedule)")
    if args.run is None and args.no_ema:
        raise UserError("--no-ema: a supernet keeps one set of weights; it has no EMA to turn off")
    if args.run is not None and (args.supernet or args.views):
        raise UserError("--supernet and --views go with --schedule, not --run")
    if args.views and args.low_memory:
        raise UserError("--views keeps the whole supernet resident; --low-memory moves one copied expert at a time")
    device = pick_device(args.device)
    if args.schedule is not None:
        schedule, trained, cfg = load_schedule(args.schedule, args.supernet)
        denoiser, step = schedule_denoiser(schedule, trained.weights("cpu"), extract=not args.views), trained.entry["steps"]
        source = f"schedule {schedule.name} (widths {', '.join(schedule.widths())}) of {trained.path}"
        decoder = None
        default_out = args.schedule.parent / f"{args.schedule.stem}-samples"
    else:
        cfg, denoiser, step = load_run(args.run, use_ema=not args.no_ema)
        decoder = None if args.no_decode else run_decoder(args.run, cfg, device)  # refuse before any work
        source, default_out = str(args.run), args.run / "samples"
    if cfg.data.latent and args.schedule is not None and not args.no_decode:
        raise UserError("a latent supernet's schedule: pass --no-decode (decoding needs a training run's latent file)")
    diffusion = Diffusion(cfg.diffusion)
    if args.sampler not in SAMPLERS:
        raise UserError(f"--sampler must be one of {list(SAMPLERS)}")
    plan = SamplingPlan(args.n, args.steps, args.eta, args.sampler, args.seed, args.batch_size,
                        clip_x0=not cfg.data.latent)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    path = fast_path(device, args.precision, denoiser).describe()
    if use_cuda_graphs(device, False if args.no_cuda_graphs else None):
        path += " + CUDA graphs"
    log.info("sampling %d images from %s (step %d) on %s (%s), %s %d steps%s%s", args.n, source, step, device,
             path, args.sampler, args.steps,
             ", low-memory" if args.low_memory else "", ", compiled" if args.compile else "")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    samples = generate(denoiser, diffusion, shape, plan, device, args.low_memory, args.offload_dir, progress=True,
                       precision=args.precision, compile=args.compile,
                       cuda_graphs=False if args.no_cuda_graphs else None)
    wall = time.perf_counter() - t0
    release(denoiser)                       # the graphs' memory goes back before decoding
    out = args.out or default_out
    info = write_samples(samples, out, decoder)
    info.update(step=step, wall_s=round(wall, 3), img_per_s=round(args.n / wall, 3), device=str(device),
                low_memory=args.low_memory, precision=path,
                compiled=args.compile,
                cuda_graphs=use_cuda_graphs(device, False if args.no_cuda_graphs else None), plan=plan.__dict__, source=source,
                peak_device_mem_mb=(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None))
    (out / "sampling.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
