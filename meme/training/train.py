"""Training every expert of a MEME: ``meme-nas train --config NAME_OR_YAML``.

Schedules (``--schedule``):

* ``interleaved`` (default): step k trains expert ``k mod N``. Every expert gets an
  equal share at every moment, so a stopped or resumed run is always samplable and the
  sample grids during training show the whole model improving.
* ``sequential``: the paper's way, expert 1 for the first S/N steps, then expert 2...
  Same total budget and per-expert share; useful to reproduce the paper exactly.
* ``weighted``: each expert trains on its interval's share of the steps, interleaved
  (``meme.training.compute.weighted_order``), as one network trained on uniform t spends
  them. For experts of different per-step cost (decoders of different widths), a run
  then costs steps x the interval-weighted cost per step, the compute of one network
  at that per-step cost: what an equal-compute comparison needs.

Each expert's timesteps come from the soft-expert sampler (its own interval with
probability p_n, otherwise uniform over [0, T)). AdamW with linear warm-up, EMA
weights (used for sampling), gradient clipping; the network runs on the device's
fast path (``meme.common.fastpath``: channels_last, bf16 autocast on CUDA and on AMX CPUs for
networks wide enough to gain). Checkpoints are atomic and carry every RNG so ``--resume`` continues
bit-for-bit.

Experts from shared weights (``meme.training.branching``): ``--branch-at F`` trains one parent
network on all t for the first F of the steps, then splits it into the N experts
(``--split-optimizer carry|fresh``); ``--init-from SOURCE`` starts every expert from a
trained supernet or a run of one network. A run writes ``compute.json``: its training
TFLOPs, charged in full and amortised (``meme.training.compute``).

Under ``torchrun`` (or Ray Train) the same command trains on many processes: data-parallel
ranks, or ``--expert-parallel`` groups that train different experts at once
(``meme.training.distributed``); only rank 0 writes.

What a run is asked for (``TrainOptions`` and its flags) is ``meme.training.options``. This
module stays above ~400 lines because the ``Trainer`` is one state machine (step, EMA,
split, checkpoint, resume, snapshot) whose parts must agree on every field they save:
split across files, a resume that forgets one field would pass unnoticed.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from meme.common import checkpoint
from meme.common.checkpoint import atomic_write_json
from meme.common.command import CommandParser, add_fast_path_flag, main_guard, setup_logging
from meme.common.device import pick_device
from meme.common.errors import UserError
from meme.common.fastpath import PRECISIONS, FastPath, fast_path
from meme.common.images import decode, save_grid
from meme.data.autoencoder import load_decoder
from meme.data.dataset import load_data
from meme.data.latents import latent_info
from meme.model.config import MemeConfig, check_config
from meme.model.diffusion import Diffusion
from meme.model.experts import SoftExpertSampler, build_denoiser
from meme.model.references import resolve
from meme.model.resources import check_fits
from meme.model.supernet import SuperNet
from meme.sampling.sample import SamplingPlan, generate
from meme.training import distributed
from meme.training.branching import (
    AllTimesteps,
    BranchPlan,
    activate,
    carried_optimizer_state,
    expert_state,
    init_from_source,
    load_experts,
    parent_network,
)
from meme.training.compute import expert_after_split, parent_expert, run_compute, source_tflops
from meme.training.options import TrainOptions, add_option_flags, options_from

log = logging.getLogger("meme.training.train")
SCHEDULES = ("interleaved", "sequential", "weighted")


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept untouched."""


class NonFiniteLoss(ArithmeticError):
    """The loss of a step was NaN or infinite (``step``: the first such step, when known)."""

    def __init__(self, value: float, step: Optional[int] = None):
        super().__init__(f"loss is {value}" + ("" if step is None else f" at step {step}"))
        self.value, self.step = value, step


class FiniteCheck:
    """Where the host learns that a loss went NaN or infinite.

    ``every=1``: at once, before the update (reading the loss each step: free on a CPU,
    a wait for the whole step on a GPU). ``every=k``: the device keeps the first bad step
    and its loss, and the host looks every k steps and whenever it is about to write a
    checkpoint or samples (``confirm``): a GPU never waits in between, the run stops at
    most k - 1 steps later, and no NaN model is ever saved.
    """

    def __init__(self, every: int = 1):
        self.every = max(1, every)
        self._first: Optional[tuple[torch.Tensor, torch.Tensor]] = None   # (step, loss) on the device; step -1: none

    def watch(self, loss: torch.Tensor, step: int) -> None:
        if self.every == 1:
            value = float(loss)
            if not math.isfinite(value):
                raise NonFiniteLoss(value, step)
            return
        if self._first is None:
            self._first = (torch.full((), -1, dtype=torch.long, device=loss.device),
                           torch.zeros((), dtype=loss.dtype, device=loss.device))
        first_step, first_loss = self._first
        new = ~torch.isfinite(loss) & (first_step < 0)
        first_step.copy_(torch.where(new, step, first_step))
        first_loss.copy_(torch.where(new, loss, first_loss))
        if (step + 1) % self.every == 0:
            self.confirm()

    def confirm(self) -> None:
        """Raise NonFiniteLoss if any watched loss was not finite (one read of the device)."""
        if self._first is not None and int(self._first[0]) >= 0:
            raise NonFiniteLoss(float(self._first[1]), int(self._first[0]))


# ---- the training step (shared by meme.training.train and every search trial) ----------------------

def draw_batch(data: torch.Tensor, timesteps: SoftExpertSampler, expert: int, batch_size: int,
               gen: torch.Generator, fast: FastPath, device: torch.device,
               rows: slice = slice(None)) -> tuple[torch.Tensor, ...]:
    """Images, soft-expert timesteps and noise for one step of one expert, in that RNG order.

    ``rows``: the part of the batch this rank keeps; the whole batch is drawn whatever the
    part, so the stream is the same on any number of ranks (``meme.training.distributed``).
    """
    idx = torch.randint(len(data), (batch_size,), generator=gen)
    t = timesteps.sample(expert, batch_size, generator=gen)
    noise = torch.randn((batch_size, *data.shape[1:]), generator=gen)
    return fast.input(data[idx[rows].to(data.device, non_blocking=True)], device), fast.input(t[rows], device), \
        fast.input(noise[rows], device)


DEVICE_DATA_SHARE = 0.25   # the training set moves to the GPU when it takes at most this share of its free memory


def resident(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The training set on the GPU when it fits (batches are then drawn there: no copy of
    images per step); otherwise, and on a CPU, where it is."""
    if device.type != "cuda":
        return data
    free, _ = torch.cuda.mem_get_info(device)
    if data.numel() * data.element_size() > DEVICE_DATA_SHARE * free:
        log.info("training data (%.0f MB) stays in host memory: over %.0f%% of the GPU's free memory",
                 data.numel() * data.element_size() / 2**20, 100 * DEVICE_DATA_SHARE)
        return data
    return data.to(device)


def train_step(net: torch.nn.Module,                    # the expert's training forward (maybe compiled)
               params: Iterable[torch.nn.Parameter],    # its parameters (gradient clipping)
               batch: tuple[torch.Tensor, ...],         # (x0, t, noise) from draw_batch
               diffusion: Diffusion, opt: torch.optim.Optimizer, fast: FastPath,
               lr: float,                               # this step's learning rate (warm-up applied)
               grad_clip: float,                        # max global grad norm (0 = off)
               loss_mean: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,  # over the ranks (DDP)
               check: Optional[FiniteCheck] = None,     # default: look at once (every=1)
               step: int = 0,                           # this step's number, for the check
               ) -> torch.Tensor:
    """One optimizer step on the eps-MSE loss; returns the loss (a 0-d tensor on the device).

    NonFiniteLoss when the loss is NaN/inf: before any update with the default check, at
    the check's next look otherwise (``FiniteCheck``)."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    with fast.autocast():
        loss = diffusion.training_loss(net, *batch)
    value = loss_mean(loss.detach()) if loss_mean else loss.detach()   # every rank decides alike
    (check or FiniteCheck()).watch(value, step)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return value


def warmup_lr(base: float, step: int, warmup: int) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then constant."""
    return base * min(1.0, (step + 1) / max(warmup, 1))


def adamw(params: Iterable[torch.nn.Parameter], opts: TrainOptions, device: torch.device) -> torch.optim.AdamW:
    """AdamW; on CUDA the fused kernel (one launch for every parameter, no host work per
    tensor). On a CPU torch's default, so CPU runs keep their exact numbers."""
    return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay,
                             fused=True if device.type == "cuda" else None)


class EMA(AveragedModel):
    """The EMA of a network, with the usual warm-up of the decay: min(decay, (1+n)/(10+n)).

    Why not ``AveragedModel(multi_avg_fn=...)``: its average function receives the update
    count copied to the device, and the decay's warm-up needs it on the host, so every
    step would copy it there and wait for it. Here the count stays where torch keeps it
    (a CPU buffer, ``n_averaged``, saved in checkpoints as ``ema_n``) and an update is one
    copy or one lerp kernel per dtype, with no host sync; the values are those of the
    ``AveragedModel`` form, bit for bit.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model)
        self.decay = decay

    def update_parameters(self, model: torch.nn.Module) -> None:
        n = int(self.n_averaged)   # a CPU tensor: no device sync
        ema = [p.detach() for p in self.module.parameters()]
        src = [p.detach() for p in model.parameters()]
        if n == 0:
            torch._foreach_copy_(ema, src)
        else:
            torch._foreach_lerp_(ema, src, 1.0 - min(self.decay, (1 + n) / (10 + n)))
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.detach().copy_(b.detach())
        self.n_averaged += 1


class Trainer:
    """Owns model, EMA, optimizer and RNG; one ``step()`` trains one expert on one batch."""

    def __init__(self, cfg: MemeConfig, opts: TrainOptions, out: Path):
        self.cfg, self.opts, self.out = cfg, opts, Path(out)
        self.par = distributed.setup(pick_device(opts.device), cfg.num_experts, opts.expert_parallel)
        self.device = self.par.device
        distributed.check_batch(self.par.layout, opts.batch_size)
        if opts.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {list(PRECISIONS)}, got {opts.precision!r}")
        if opts.threads is not None:
            if opts.threads < 1:
                raise UserError(f"--threads must be >= 1, got {opts.threads}")
            torch.set_num_threads(opts.threads)
        check_fits(cfg, len(range(opts.batch_size)[self.par.rows(opts.batch_size)]), self.device, training=True)
        torch.manual_seed(opts.seed)
        self.model = build_denoiser(cfg)
        self.fast = fast_path(self.device, opts.precision, self.model)
        self.fast.prepare(self.model, self.device)
        self.ema = EMA(self.model, opts.ema_decay)
        # Compiled and DDP wrappers share the experts' parameters: optimizer, EMA and checkpoints
        # keep working on self.model; only the training forward goes through them.
        self.train_nets = [self._forward(self.par.wrap(e, n) if self.par.owns(n) else e)
                           for n, e in enumerate(self.model.experts)]
        self.opt = adamw(self.model.parameters(), opts, self.device)
        self.diffusion = Diffusion(cfg.diffusion)
        self.timesteps = SoftExpertSampler(cfg)
        self.gen = torch.Generator().manual_seed(opts.seed + 1)
        self.gens = distributed.expert_generators(opts.seed, cfg.num_experts) if opts.expert_parallel else None
        if opts.expert_parallel and cfg.share.any:
            raise UserError(f"--expert-parallel trains the experts apart, and {cfg.name} shares parts between them "
                            f"(share: {cfg.share.describe()}), which need every expert's steps")
        if self.par.world > 1 and cfg.share.any:   # one DDP per expert would reduce a shared part's gradient twice
            raise UserError(f"{cfg.name} shares parts between experts (share: {cfg.share.describe()}): "
                            f"training it on several ranks is not supported yet; run one process")
        if opts.expert_parallel and opts.schedule != "interleaved":
            raise UserError("--expert-parallel needs --schedule interleaved: sequential blocks train one expert at a "
                            "time, and weighted shares are unequal, so the groups would wait for each other at every "
                            "log row and checkpoint")
        self.interval_weights = tuple(cfg.interval_weights())   # the weighted schedule's shares
        self.data = load_data(opts.data, cfg.data, "train")
        if opts.limit_data:
            self.data = self.data[: opts.limit_data]
        self.data = resident(self.data, self.device)
        self.step_count = 0
        # a GPU looks at the loss only every log row (and before any write); a CPU, and
        # several ranks (which must stop together), every step
        every = opts.check_every or (opts.log_every if self.device.type == "cuda" and self.par.world == 1 else 1)
        self.finite = FiniteCheck(every if self.par.world == 1 else 1)
        self._decoder: Any = None
        self.branch = opts.branch_plan()
        self.init_source = None
        if self.branch.source:
            self.init_source = init_from_source(self.model.experts, self.ema.module.experts, cfg,
                                                self.branch.source, self.device)
        # The parent phase: one network for all t, trained until the split (meme.training.branching).
        self.parent = self.parent_ema = self.parent_opt = self.parent_net = None
        if self.branch.has_parent_phase:
            if opts.expert_parallel:
                raise UserError("--expert-parallel trains the experts apart, and a --branch-at parent phase is one "
                                "network: use data-parallel ranks (no --expert-parallel) or --init-from")
            self.parent = parent_network(cfg)
            self.fast.prepare(self.parent, self.device)
            self.parent_ema = EMA(self.parent, opts.ema_decay)
            self.parent_opt = adamw(self.parent.parameters(), opts, self.device)
            self.all_t = AllTimesteps(cfg.diffusion.timesteps)
            self.parent_net = self.par.wrap(self.parent, find_unused=isinstance(self.parent, SuperNet))

    def _forward(self, net: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(net) if self.opts.compile else net

    # ---- paths -------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    # ---- one step ------------------------------------------------------------------
    @property
    def in_parent_phase(self) -> bool:
        return self.parent is not None

    def lr_at(self, step: int) -> float:
        at = self.branch.at
        if at and step >= at and self.branch.optimizer == "fresh":
            return warmup_lr(self.opts.lr, step - at, self.opts.warmup)   # a new warm-up from the split
        return warmup_lr(self.opts.lr, step, self.opts.warmup)

    def step(self) -> tuple[int, Optional[torch.Tensor]]:
        """One optimizer step; returns (expert whose architecture was trained, its loss as a 0-d
        tensor on the device, not read by the host; None where another group trained the step)."""
        s, n, rows = self.step_count, self.cfg.num_experts, self.par.rows(self.opts.batch_size)
        group: Optional[int] = None   # the parent trains on every rank
        if self.in_parent_phase:  # parent step s: expert s mod N's sub-network (weighted: its order), all t
            e = parent_expert(s, n, self.opts.schedule, self.interval_weights)
            activate(self.parent, self.cfg.experts[e])
            net, params, opt = self.parent_net, self.parent.parameters(), self.parent_opt
            batch = draw_batch(self.data, self.all_t, 0, self.opts.batch_size, self.gen, self.fast, self.device, rows)
        else:
            e = group = expert_after_split(s, n, self.opts.steps, self.opts.schedule, self.branch.at,
                                           self.interval_weights)
            if not self.par.owns(e):  # expert-parallel: another group trains this step; the EMA still ticks
                return self._tick(e, None)
            net, params, opt = self.train_nets[e], self.model.experts[e].parameters(), self.opt
            gen = self.gens[e] if self.gens else self.gen
            batch = draw_batch(self.data, self.timesteps, e, self.opts.batch_size, gen, self.fast, self.device, rows)
        try:
            loss_value = train_step(net, params, batch, self.diffusion, opt, self.fast, self.lr_at(s),
                                    self.opts.grad_clip, lambda v: self.par.mean(v, group), self.finite, s)
        except NonFiniteLoss as exc:
            raise self._diverged(exc, f" (expert {e})" if exc.step == s else "") from None
        return self._tick(e, loss_value)

    def _diverged(self, exc: NonFiniteLoss, where_in_step: str = "") -> TrainingDiverged:
        last = self.ckpt_path if self.ckpt_path.exists() else "none written yet"
        return TrainingDiverged(f"loss is {exc.value} at step {exc.step}{where_in_step}; stopped. "
                                f"Last good checkpoint: {last}")

    def confirm_finite(self) -> None:
        """Before anything is written: TrainingDiverged if a loss since the last look was NaN/inf."""
        try:
            self.finite.confirm()
        except NonFiniteLoss as exc:
            raise self._diverged(exc) from None

    def _tick(self, e: int, loss_value: Optional[torch.Tensor]) -> tuple[int, Optional[torch.Tensor]]:
        """After step ``step_count`` (trained here or by another group): EMA, count, maybe the split."""
        if self.in_parent_phase:
            self.parent_ema.update_parameters(self.parent)
        else:
            self.ema.update_parameters(self.model)
        self.step_count += 1
        if self.in_parent_phase and self.step_count == self.branch.at:
            self.split()
        return e, loss_value

    def split(self) -> None:
        """The parent becomes the N experts: weights and EMA sliced, the optimizer carried or fresh."""
        load_experts(self.model.experts, self.parent, self.cfg)
        load_experts(self.ema.module.experts, self.parent_ema.module, self.cfg)
        self.ema.n_averaged.copy_(self.parent_ema.n_averaged)
        if self.branch.optimizer == "carry":
            self.opt.load_state_dict(carried_optimizer_state(self.parent, self.parent_opt, self.model.experts,
                                                             self.cfg, self.opt))
        log.info("step %d: the parent split into %d experts (%s optimizer)", self.step_count, self.cfg.num_experts,
                 self.branch.optimizer)
        self.parent = self.parent_ema = self.parent_opt = self.parent_net = None

    def _experts_cut_from(self, parent) -> dict:
        """The experts' state dict a split now would give (parent-phase checkpoints stay samplable)."""
        return {f"experts.{n}.{k}": v for n, arch in enumerate(self.cfg.experts)
                for k, v in expert_state(parent, arch).items()}

    # ---- checkpoints -----------------------------------------------------------------
    def state(self) -> dict:
        common = {"step": self.step_count, "rng": checkpoint.rng_state(), "data_gen": self.gen.get_state(),
                  "config": self.cfg.to_dict(), "options": dataclasses.asdict(self.opts),
                  "branch": dataclasses.asdict(self.branch),
                  "parallel": {"world_size": self.par.world, "expert_parallel": self.opts.expert_parallel,
                               "expert_gens": [g.get_state() for g in self.gens or ()]}}
        if self.in_parent_phase:  # model/ema: the experts as a split now would cut them (meme.sampling.sample reads them)
            return {**common, "phase": "parent", "model": self._experts_cut_from(self.parent),
                    "ema": self._experts_cut_from(self.parent_ema.module), "ema_n": self.parent_ema.n_averaged.clone(),
                    "parent": self.parent.state_dict(), "parent_ema": self.parent_ema.module.state_dict(),
                    "opt": self.parent_opt.state_dict()}
        return {**common, "phase": "experts", "model": self.model.state_dict(), "ema": self.ema.module.state_dict(),
                "ema_n": self.ema.n_averaged.clone(), "opt": self.opt.state_dict()}

    def save(self, path: Optional[Path] = None) -> Path:
        """Rank 0 writes (after gathering the experts other groups train); every rank must call it.
        Never a model that saw a NaN/inf loss: TrainingDiverged instead."""
        self.confirm_finite()
        self.par.collect_experts(self.model.experts, self.ema.module.experts, self.opt, self.gens or ())
        path = path or self.ckpt_path
        return checkpoint.atomic_save(self.state(), path) if self.par.is_main else path

    def snapshot_path(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step{step:07d}.pt"

    def load(self) -> None:
        ck = checkpoint.load_training(self.ckpt_path, map_location=self.device)
        check_config(ck, self.cfg, self.ckpt_path)
        saved_branch = ck.get("branch", {"at": 0, "optimizer": "carry", "source": None})
        if saved_branch != dataclasses.asdict(self.branch):
            raise UserError(f"{self.ckpt_path} was trained with other branching ({saved_branch}, now "
                            f"{dataclasses.asdict(self.branch)}); keep --steps, --branch-at, --split-optimizer and "
                            f"--init-from, or use a new --out")
        parallel = ck.get("parallel", {})
        note = distributed.resume_note(parallel, self.par.layout, self.opts.batch_size, self.ckpt_path)
        if note and self.par.is_main:
            log.warning(note)
        with checkpoint.applying(self.ckpt_path):
            for g, state in zip(self.gens or (), parallel.get("expert_gens", ())):
                g.set_state(state.cpu())
            if ck.get("phase") == "parent":
                self.parent.load_state_dict(ck["parent"])
                self.parent_ema.module.load_state_dict(ck["parent_ema"])
                self.parent_ema.n_averaged.copy_(ck["ema_n"])
                self.parent_opt.load_state_dict(ck["opt"])
            else:
                self.parent = self.parent_ema = self.parent_opt = self.parent_net = None   # past the split
                self.model.load_state_dict(ck["model"])
                self.ema.module.load_state_dict(ck["ema"])
                self.ema.n_averaged.copy_(ck["ema_n"])
                self.opt.load_state_dict(ck["opt"])
            self.step_count = int(ck["step"])
            checkpoint.set_rng_state(ck["rng"])
            self.gen.set_state(ck["data_gen"].cpu())

    # ---- samples -----------------------------------------------------------------------
    def sample_grid(self, n: int = 64) -> Optional[Path]:
        """Rank 0 samples the EMA model (after gathering it); every rank must call it."""
        self.confirm_finite()
        self.par.collect_experts(self.model.experts, self.ema.module.experts, self.opt, self.gens or ())
        if not self.par.is_main:
            return None
        shape = (self.cfg.data.channels, self.cfg.data.resolution, self.cfg.data.resolution)
        plan = SamplingPlan(n=n, steps=self.opts.sample_steps, seed=1234, batch_size=n,
                            clip_x0=not self.cfg.data.latent)
        x = generate(self.ema.module, self.diffusion, shape, plan, self.device, precision=self.opts.precision,
                     cuda_graphs=False)   # a grid now and then: graphs would hold their memory through training
        return save_grid(decode(x, self.grid_decoder()), self.out / "grids" / f"step{self.step_count:07d}.png")

    def grid_decoder(self):
        """Latent runs show decoded grids when their latent file names its autoencoder."""
        if self._decoder is None:
            info = latent_info(self.opts.data) if self.cfg.data.latent else None
            self._decoder = load_decoder(info, self.device) if info else False
        return self._decoder or None


class MetricsLog:
    """Append-only CSV (and TensorBoard when installed); rows past a resumed step are dropped."""

    FIELDS = ["step", "expert", "loss", "lr", "img_per_s", "wall_s"]

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            rows = [r for r in csv.DictReader(path.open()) if int(r["step"]) <= resume_step]
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, self.FIELDS)
                w.writeheader()
                w.writerows(rows)
        else:
            with path.open("w", newline="") as f:
                csv.DictWriter(f, self.FIELDS).writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(path.parent / "tb"), purge_step=resume_step)
        except Exception:  # tensorboard not installed: CSV only
            self.tb = None

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)
        if self.tb:
            for k in ("loss", "lr", "img_per_s"):
                self.tb.add_scalar(k, row[k], row["step"])


def train(cfg: MemeConfig, opts: TrainOptions, out: Path, resume: bool = False, progress: bool = True) -> Trainer:
    """Run (or continue) training to ``opts.steps``; returns the trainer."""
    out = Path(out)
    if opts.schedule not in SCHEDULES:
        raise UserError(f"--schedule must be one of {list(SCHEDULES)}, got {opts.schedule!r}")
    if opts.steps < 1 or opts.batch_size < 1:
        raise UserError("--steps and --batch-size must be >= 1")
    trainer = Trainer(cfg, opts, out)
    if trainer.ckpt_path.exists():
        if not resume:
            raise UserError(f"{out} already holds a checkpoint: pass --resume to continue or choose a new --out")
        trainer.load()
        log.info("resumed %s at step %d", out, trainer.step_count)
    main = trainer.par.is_main   # only rank 0 writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        (out / "options.json").write_text(json.dumps(dataclasses.asdict(opts), indent=2))
        atomic_write_json(training_compute(cfg, opts, trainer.branch).to_dict(), out / "compute.json")
    metrics = MetricsLog(out / "metrics.csv", trainer.step_count) if main else None
    if trainer.branch.has_parent_phase:
        log.info("parent phase: steps [0, %d) train one shared network on all t, then it splits (%s optimizer)",
                 trainer.branch.at, trainer.branch.optimizer)
    if trainer.init_source:
        log.info("experts start from %s", trainer.init_source)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log.info("training %s: %d experts, %.2fM params, %d images, %s schedule, on %s (%s%s, %d threads)%s",
             cfg.name, cfg.num_experts, n_params / 1e6, len(trainer.data), opts.schedule, trainer.device,
             trainer.fast.describe(), ", compiled" if opts.compile else "", torch.get_num_threads(),
             distributed.describe(trainer.par.layout, opts.batch_size))
    snapshots = opts.snapshot_steps()
    bar = tqdm(total=opts.steps, initial=trainer.step_count, disable=not (progress and main), desc="train",
               unit="step")
    t_window, imgs, losses, t_start = time.perf_counter(), 0, [], time.perf_counter()
    while trainer.step_count < opts.steps:
        e, loss = trainer.step()
        if loss is not None:   # None: another group trained this step
            losses.append(loss)
        imgs += opts.batch_size
        s = trainer.step_count
        bar.update(1)
        if s % opts.log_every == 0 or s == opts.steps:
            trainer.confirm_finite()
            mean_loss = trainer.par.window_loss(torch.stack(losses).double().tolist() if losses else [])
            now = time.perf_counter()
            row = {"step": s, "expert": e, "loss": mean_loss, "lr": trainer.lr_at(s - 1),
                   "img_per_s": imgs / max(now - t_window, 1e-9), "wall_s": now - t_start}
            if metrics:
                metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}")
            t_window, imgs, losses = now, 0, []
        if s % opts.ckpt_every == 0 or s == opts.steps:
            trainer.save()
        if s in snapshots:
            trainer.save(trainer.snapshot_path(s))
        if opts.sample_every and (s % opts.sample_every == 0 or s == opts.steps):
            trainer.sample_grid()
    bar.close()
    return trainer


def training_compute(cfg: MemeConfig, opts: TrainOptions, branch: BranchPlan):
    """This run's training TFLOPs (its own steps, parent phase included) and its source's, in full."""
    src = source_tflops(branch.source) if branch.source else 0.0
    return run_compute(cfg, opts.steps, opts.batch_size, opts.schedule, branch.at, src, branch.source)


def parse_args(argv=None) -> tuple[argparse.Namespace, TrainOptions]:
    p = CommandParser(prog="meme-nas train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="reference name (ldm-s, meme-table4, ...) or YAML path")
    p.add_argument("--out", type=Path, default=None, help="run directory (default results/train/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    add_option_flags(p)
    add_fast_path_flag(p)
    args = p.parse_args(argv)
    return args, options_from(args)


@main_guard
def main(argv=None) -> int:
    setup_logging()
    distributed.quiet_other_ranks()
    args, opts = parse_args(argv)
    cfg = resolve(args.config)
    out = args.out or Path("results") / "train" / cfg.name
    trainer = train(cfg, opts, out, resume=args.resume)
    trainer.par.close()
    if not trainer.par.is_main:
        return 0
    print(f"done: {trainer.step_count} steps; checkpoint {trainer.ckpt_path}; "
          f"sample with: meme-nas sample --run {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
