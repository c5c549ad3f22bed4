"""Experts that start from shared weights: one parent network, split into N timestep experts.

Every multi-expert diffusion model reported to beat a single model at equal compute
(eDiff-I, step-adaptive training, DeMe, Remix-DiT) starts its experts from one trained
network and fine-tunes each on its interval. Trained from scratch, N experts each get
1/N of the updates and lose to one network at small budgets.

The parent
----------
``parent_network(cfg)`` is one network that every expert of ``cfg`` can be cut from:

* experts that all have one architecture (a "multi-expert" MEME): that network, plain;
  an expert is a copy of it;
* experts of one macro shape with different d_h/d splits or pool strides (the hand
  design, a search winner), or decoders of different widths (Multistage's shape): the
  weight-shared ``SuperNet`` whose stages offer exactly the experts' splits and strides, with
  the widest decoder; an expert is ``SuperNet.extract(arch)`` (its slices, a narrower
  decoder by prefix).

A parent step trains the sub-network of expert ``k mod N`` (step k; under ``--schedule
weighted``, the weighted order's expert) on t drawn
uniformly from [0, T): all t, so the parent learns the whole denoising task, and each
step costs what an expert step of that architecture costs. A run with a parent phase
therefore spends exactly the training FLOPs of a from-scratch interleaved run of the
same length: equal compute by construction (``meme.training.train`` records it).

The split
---------
``split(parent, parent_ema, cfg)`` gives each expert its parent's slices, for the model
and its EMA alike. The optimizer is a choice (``--split-optimizer``):

* ``carry``: each expert's AdamW moments are the parent's moments, sliced as the weights
  are, and its step count is the parent's; the learning rate continues;
* ``fresh``: new AdamW state and a new linear warm-up from the split.

Neither is assumed better: ``nas.studies.compare --split-optimizer`` measures them.

Sources from outside the run (``--init-from``): a trained supernet directory
(``nas.evaluators.supernet_training train``, at the target's shape), or a ``meme.training.train`` run of one network
whose architecture every expert shares. They give the experts their initial weights;
the optimizer then starts fresh, since such a source carries no moments for the experts.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from meme.common import checkpoint
from meme.common.errors import UserError, one_line
from meme.model.config import ArchConfig, MemeConfig
from meme.model.experts import build_network
from meme.model.supernet import INDEX, SuperNet, SupernetSpec, supernet_for

SPLIT_OPTIMIZERS = ("carry", "fresh")


@dataclass(frozen=True)
class BranchPlan:
    """When and how a run's experts come from shared weights (saved with the run's options)."""

    at: int = 0                      # split step: parent steps [0, at), expert steps [at, total)
    optimizer: str = "carry"         # at the split: carry the parent's AdamW moments, or fresh + warm-up
    source: Optional[str] = None     # experts' initial weights from outside the run (at = 0 only)

    def validate(self, total_steps: int) -> "BranchPlan":
        if self.optimizer not in SPLIT_OPTIMIZERS:
            raise UserError(f"--split-optimizer must be one of {list(SPLIT_OPTIMIZERS)}, got {self.optimizer!r}")
        if not 0 <= self.at < total_steps:
            raise UserError(f"the split step must lie in [0, {total_steps}) (--branch-at is a fraction of --steps "
                            f"in [0, 1)), got step {self.at}")
        if self.source is not None and self.at > 0:
            raise UserError("--init-from and --branch-at exclude each other: the experts start either from an "
                            "outside source or from this run's own parent phase")
        return self

    @property
    def has_parent_phase(self) -> bool:
        return self.at > 0


def split_step(fraction: float, total_steps: int) -> int:
    """The step at which ``--branch-at FRACTION`` splits a run of ``total_steps``."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"--branch-at must be a fraction of the run in [0, 1), got {fraction}")
    return int(round(fraction * total_steps))


# ---- the parent -------------------------------------------------------------------------

def parent_spec(cfg: MemeConfig) -> Optional[SupernetSpec]:
    """The supernet spec offering exactly the experts' splits and strides; None if they are all one arch."""
    archs = list(dict.fromkeys(cfg.experts))
    if len(archs) == 1:
        return None
    if any(a.kind != "iunet" for a in archs):
        raise UserError(f"{cfg.name}: experts of different architectures can share a parent only as iU-Nets "
                        f"of one macro shape (a weight-shared supernet); got kinds {sorted({a.kind for a in archs})}")
    n = archs[0].num_stages
    ratios = tuple(tuple(sorted({str(a.high_fractions()[s]) for a in archs}, key=Fraction)) for s in range(n))
    pools = tuple(tuple(sorted({a.pool_strides[s] for a in archs})) for s in range(n))
    decoders = sorted({a.decoder_stage_channels()[0] for a in archs})   # the widest is the parent's
    template = dataclasses.replace(archs[0], decoder_channels=decoders[-1])
    spec = SupernetSpec(template, cfg.data, ratios, pools, decoder_channels=tuple(decoders[:-1]))
    try:
        spec.validate()
        for a in archs:
            spec.check(a)
    except Exception as exc:
        raise UserError(f"{cfg.name}: its experts cannot share one parent: {one_line(exc)}") from None
    return spec


def parent_network(cfg: MemeConfig) -> nn.Module:
    """One network every expert of ``cfg`` can be cut from (see the module docstring)."""
    spec = parent_spec(cfg)
    return build_network(cfg.experts[0], cfg.data) if spec is None else SuperNet(spec)


def activate(parent: nn.Module, arch: ArchConfig) -> nn.Module:
    """The parent running ``arch`` (a plain parent runs its only architecture)."""
    if isinstance(parent, SuperNet):
        parent.activate(arch)
    return parent


def expert_state(parent: nn.Module, arch: ArchConfig) -> dict[str, torch.Tensor]:
    """An expert network's state dict cut from the parent (copies, not views)."""
    state = parent.sub_state_dict(arch) if isinstance(parent, SuperNet) else parent.state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


# ---- the split --------------------------------------------------------------------------

def load_experts(experts: nn.ModuleList, parent: nn.Module, cfg: MemeConfig) -> None:
    """Every expert's weights from the parent (in place)."""
    for e, arch in zip(experts, cfg.experts):
        e.load_state_dict(expert_state(parent, arch), strict=True)


def carried_optimizer_state(parent: nn.Module, parent_opt: torch.optim.Optimizer, experts: nn.ModuleList,
                            cfg: MemeConfig, expert_opt: torch.optim.Optimizer) -> dict:
    """A state dict for ``expert_opt`` (AdamW over ``experts``' parameters, in order) that
    carries the parent's moments, sliced exactly as the weights are.

    The moments are put into a copy of the parent as if they were its weights; cutting each
    expert from that copy then slices them with the very code that slices the weights.
    """
    names = {p: n for n, p in parent.named_parameters()}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    step = None
    for p, st in parent_opt.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            moments.setdefault(key, {})[names[p]] = st[key]
        step = st["step"]
    cut: dict[str, list[dict[str, torch.Tensor]]] = {}
    for key, by_name in moments.items():
        holder = copy.deepcopy(parent)
        holder.load_state_dict(by_name, strict=False)
        cut[key] = [expert_state(holder, arch) for arch in cfg.experts]
    state = {}
    # experts.named_parameters() lists each parameter once, in the optimizer's order: a part
    # the experts share (meme.model.shared_parts) appears under the first expert that holds it.
    for index, (full, _) in enumerate(experts.named_parameters()):
        n, name = full.split(".", 1)
        if cut:
            state[index] = {"step": step.clone(), **{key: cut[key][int(n)][name] for key in cut}}
    sd = expert_opt.state_dict()
    sd["state"] = state
    return sd


# ---- sources from outside the run --------------------------------------------------------

def init_from_source(experts: nn.ModuleList, ema_experts: nn.ModuleList, cfg: MemeConfig, source: str,
                     device: torch.device) -> str:
    """Initial weights of every expert (and its EMA) from ``source``; returns what was used, in words."""
    path = Path(source)
    if (path / INDEX).is_file():
        for e, ema_e, arch in zip(experts, ema_experts, cfg.experts):
            net = supernet_for(path, arch, torch.device("cpu"))
            if net.spec.data != cfg.data:
                raise UserError(f"{source}: this supernet was trained at {net.spec.data.channels}x"
                                f"{net.spec.data.resolution}x{net.spec.data.resolution}, the config is at "
                                f"{cfg.data.channels}x{cfg.data.resolution}x{cfg.data.resolution}")
            state = expert_state(net, arch)
            e.load_state_dict(state)
            ema_e.load_state_dict(state)
        return f"supernet {source}"
    ckpt = path / "checkpoints" / "last.pt" if path.is_dir() else path
    if not ckpt.is_file():
        raise UserError(f"--init-from {source}: neither a trained supernet directory (no {INDEX}) nor a "
                        f"meme.training.train run or checkpoint")
    ck = checkpoint.load_training(ckpt, map_location="cpu")
    src = MemeConfig.from_dict(ck["config"], str(ckpt))
    if src.num_experts != 1:
        raise UserError(f"--init-from {source}: a run of {src.num_experts} experts; branching starts from "
                        f"one network (train it with N = 1)")
    if any(a != src.experts[0] for a in cfg.experts) or src.data != cfg.data:
        raise UserError(f"--init-from {source}: its network is not every expert's architecture; a run of one "
                        f"network initialises only experts of that very architecture (use a supernet otherwise)")
    for key, targets in (("model", experts), ("ema", ema_experts)):
        one = {k.split(".", 2)[2]: v for k, v in ck[key].items() if k.startswith("experts.0.")}
        for e in targets:
            e.load_state_dict(one, strict=True)
    return f"run {ckpt} (step {int(ck['step'])})"


class AllTimesteps:
    """The parent's timesteps: uniform over [0, T) whatever expert's sub-network is trained."""

    def __init__(self, T: int):
        self.T = T

    def sample(self, expert: int, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randint(0, self.T, (batch,), generator=generator)
