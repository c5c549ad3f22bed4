"""The trial body: train one candidate on the proxy and report its objective.

A plain function of (config, proxy, report) that knows nothing of Ray or Optuna, so the
Ray trainable, the plain Optuna loop and the tests all run the same code.

* Every trial of a search uses the same seed (init stream, data order, timesteps and
  noise), so two trials differ by their architecture, not their luck; ``nas.engine.rerank``
  trains the finalists again on other seeds to measure how much luck there is.
* Experts are trained interleaved (step k trains expert k mod N, as ``meme.training.train``),
  each on soft-expert timesteps, with one AdamW over all experts. The budget is
  ``proxy.steps`` optimizer steps *in all*, whatever N: every candidate gets the same
  training compute, the way the paper compares designs and the way a promoted winner
  is trained. (``steps_per_expert`` gives N x steps instead; it ranks budgets, not
  designs: with it every top trial of the default search had the largest N.)
  ``report`` and ``eval_every`` count budget steps, so rungs line up across N.
* Objective ``loss``: held-out eps-MSE averaged over a fixed, uniformly spaced t grid
  with fixed noise, each t denoised by the expert that owns it -- what a sampler sees,
  comparable across trials and cheap. ``fid``: clean-fid of DDIM samples vs held-out data.
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import torch

from meme.common.device import pick_device
from meme.common.fastpath import FastPath, fast_path
from meme.common.images import decode, to_uint8
from meme.data.autoencoder import load_decoder
from meme.data.latents import image_reference, is_latent_file, latent_info, require_latent_info
from meme.model.config import MemeConfig
from meme.model.diffusion import Diffusion
from meme.model.experts import MultiExpertDenoiser, SoftExpertSampler, build_denoiser, count_params
from meme.model.resources import check_fits
from meme.sampling.evaluate import evaluate_samples
from meme.sampling.sample import SamplingPlan, generate
from meme.training.compute import train_gflops_per_step, training_gflops
from meme.training.train import FiniteCheck, NonFiniteLoss, draw_batch, train_step, warmup_lr
from nas.evaluators.supernet_score import scorer_for
from nas.space.proxy import ProxySpec, proxy_config
from nas.space.proxy_data import eval_timesteps, heldout_images, heldout_losses, proxy_dataset

Report = Callable[[int, float], bool]   # (step, objective) -> True: stop now
OBJECTIVES = ("loss", "fid")


class TrialDiverged(RuntimeError):
    """Loss became NaN or infinite: the trial is recorded FAIL with this message."""


@dataclass
class TrialResult:
    objective: float                     # last reported value (lower is better)
    steps: int                           # optimizer steps actually trained (all experts)
    stopped_early: bool                  # the engine asked to stop before the full budget
    wall_s: float
    peak_mem_mb: float                   # CUDA max allocated, else process max RSS
    device: str
    params_proxy: int                    # parameters of the proxy-scale model
    train_gflops: float = 0.0            # training compute spent: 3 x forward GFLOPs x images, summed
    seed: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)  # (budget step, objective)
    elapsed: list[float] = field(default_factory=list)  # wall seconds at each history point
    extra: dict = field(default_factory=dict)  # evaluator-specific attributes (recorded as trial attrs)


def sample_fid(model: MultiExpertDenoiser, diffusion: Diffusion, proxy: ProxySpec, device: torch.device,
               fp: FastPath, latent_target: bool = False) -> float:
    """FID of proxy.fid_samples DDIM samples (meme.sampling.sample.generate) against the held-out split.

    A proxy on an encoded latent file decodes the samples with the file's autoencoder and
    scores them against the encoded images' held-out split (same indices, same split).
    A latent target proxied on latents without autoencoder metadata is refused.
    """
    decoder = None
    if is_latent_file(proxy.data) and (latent_target or latent_info(proxy.data)):
        decoder = _decoder(require_latent_info(proxy.data, "--objective fid"), str(device))
    shape = (proxy.channels, proxy.resolution, proxy.resolution)
    plan = SamplingPlan(n=proxy.fid_samples, steps=proxy.fid_steps, seed=proxy.seed + 777, batch_size=64)
    latents = generate(model, diffusion, shape, plan, device, precision="bf16" if fp.bf16 else "fp32",
                       cuda_graphs=False)   # mid-training: graphs would hold their memory and be captured anew each rung
    samples = to_uint8(decode(latents, decoder))
    model.train()
    spec = None if proxy.data in (None, "fashion-mnist") else image_reference(proxy.data)
    return float(evaluate_samples(samples, ref=spec, n_ref=max(proxy.fid_samples, 1000), split="val",
                                  device=device)["fid"])


@lru_cache(maxsize=2)
def _decoder(info, device: str):
    """One first-stage decoder per process: every measurement of every trial reuses it."""
    return load_decoder(info, device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_trial(config: MemeConfig, proxy: ProxySpec, report: Report, *, objective: str = "loss",
              device: Optional[str] = None, threads: Optional[int] = None, seed: Optional[int] = None) -> TrialResult:
    """Train ``config`` (TARGET shape; scaled here) on the proxy; report every eval_every budget steps.

    ``threads``: CPU threads for this trial (restored afterwards). Proxy models are small,
    and OpenMP threads that wait on a busy core slow them down by 100x, so engines pass
    the cores they reserved for the trial (Ray already sets OMP_NUM_THREADS).
    ``seed``: overrides ``proxy.seed`` (init, data order, timesteps, noise); the held-out
    images, their noise and the t grid stay those of ``proxy.seed``, so every seed is
    scored on the same test.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    dev = pick_device(device)
    old_threads = torch.get_num_threads()
    if threads and dev.type == "cpu":
        torch.set_num_threads(max(1, int(threads)))
    try:
        if proxy.evaluator == "supernet":
            if objective != "loss":
                raise ValueError("the supernet evaluator scores the held-out loss; use --objective loss")
            return _score_shared(config, proxy, report, device)
        return _train(config, proxy, report, objective, dev, proxy.seed if seed is None else int(seed))
    finally:
        torch.set_num_threads(old_threads)


def _score_shared(config: MemeConfig, proxy: ProxySpec, report: Report, device: Optional[str]) -> TrialResult:
    """The weight-shared evaluator: one report (budget step 0: nothing trained but any fine-tune)."""
    if not proxy.supernet:
        raise ValueError("proxy.evaluator is 'supernet' but no supernet directory is given (--supernet DIR)")
    scorer = scorer_for(str(proxy.supernet), proxy, device)
    sc = scorer.score(config)
    report(0, sc.objective)
    extra = {"evaluator": "supernet", "evaluated_terms": sc.evaluated, "cached_terms": sc.cached,
             "supernet_macro": sc.supernet["macro"], "finetune_steps": proxy.finetune_steps,
             "interval_losses": [round(r["loss"], 6) for r in sc.terms]}
    return TrialResult(objective=sc.objective, steps=proxy.finetune_steps, stopped_early=False, wall_s=sc.wall_s,
                       peak_mem_mb=peak_memory_mb(scorer.device), device=str(scorer.device),
                       params_proxy=sc.params_proxy, train_gflops=sc.finetune_gflops, seed=proxy.seed,
                       history=[(0, sc.objective)], elapsed=[round(sc.wall_s, 3)], extra=extra)


def _train(config: MemeConfig, proxy: ProxySpec, report: Report, objective: str, dev: torch.device,
           seed: int) -> TrialResult:
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    cfg = proxy_config(config, proxy)
    shape = proxy.shape()
    train = proxy_dataset(proxy.data, shape, "train", proxy.limit_data)
    val = heldout_images(proxy)

    check_fits(cfg, proxy.batch_size, dev, training=True, what=f"candidate {config.name} at the proxy")
    torch.manual_seed(seed)
    model = build_denoiser(cfg)
    fp = fast_path(dev, proxy.precision, model)
    fp.prepare(model, dev)
    params = count_params(model)   # unique: a part the experts share counts once
    diffusion = Diffusion(cfg.diffusion)
    sampler = SoftExpertSampler(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=proxy.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    step_gflops = train_gflops_per_step(cfg, proxy.batch_size)
    grid = eval_timesteps(diffusion.T, proxy.eval_timesteps)
    n_exp = cfg.num_experts

    per_t: list[float] = []

    def measure() -> float:
        if objective == "fid":
            return sample_fid(model, diffusion, proxy, dev, fp, latent_target=config.data.latent)
        per_t[:] = heldout_losses(model, diffusion, val, grid, proxy.seed, dev, fp)
        return sum(per_t) / len(per_t)

    history: list[tuple[int, float]] = []
    elapsed: list[float] = []
    stopped, step, value = False, 0, math.nan
    per = proxy.steps_per_budget_step(n_exp)
    total = proxy.total_steps(n_exp)
    # on a GPU the host reads the loss only at each evaluation (no wait per step); on a CPU every step
    check = FiniteCheck(proxy.eval_every * per if dev.type == "cuda" else 1)
    model.train()
    while step < total:
        e = step % n_exp
        batch = draw_batch(train, sampler, e, proxy.batch_size, gen, fp, dev)
        try:
            train_step(model.experts[e], model.experts[e].parameters(), batch, diffusion, opt, fp,
                       warmup_lr(proxy.lr, step, proxy.warmup), proxy.grad_clip, check=check, step=step)
            if step + 1 == total:
                check.confirm()
        except NonFiniteLoss as exc:
            raise TrialDiverged(f"training loss is {exc.value} at step {exc.step + 1} (expert {exc.step % n_exp + 1} "
                                f"of {n_exp})") from None
        step += 1
        if step % (proxy.eval_every * per) == 0 or step == total:
            value = measure()
            if not math.isfinite(value):
                raise TrialDiverged(f"held-out objective is {value} at step {step}")
            history.append((step // per, value))
            elapsed.append(round(time.perf_counter() - t0, 3))
            if report(step // per, value) and step < total:
                stopped = True
                break
    return TrialResult(objective=value, steps=step, stopped_early=stopped,
                       wall_s=time.perf_counter() - t0, peak_mem_mb=peak_memory_mb(dev),
                       device=str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
                       params_proxy=params, train_gflops=training_gflops(step_gflops, step), seed=seed, history=history,
                       elapsed=elapsed, extra={"evaluator": "scratch",
                                               **({"heldout_by_t": [[t, round(v, 6)] for t, v in zip(grid, per_t)]}
                                                  if per_t else {})})
