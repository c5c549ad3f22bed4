"""Training on many processes: data-parallel ranks (DDP) and expert-parallel groups.

A run starts under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address) or under a launcher that has initialised the process group already
(Ray Train's ``TorchTrainer``); with neither it is one process and nothing here does
anything. The backend is NCCL on CUDA and gloo on the CPU.

**Data.** ``--batch-size`` is the global batch. Every rank draws the whole global batch
(indices, timesteps, noise) from the run's generator, whose state is the same on every
rank, and keeps only its own rows (:meth:`Parallel.rows`). The data stream therefore
depends on the seed alone, not on the number of ranks: one step of K ranks x B/K equals
one step of one process x B up to float rounding (DDP averages the gradients of equal
slices, so clipping and EMA see what one process would), and a checkpoint written under
K ranks resumes under K' on the very same stream. What changes with K' is each rank's
share and the order of the float sums in the all-reduce, so the continuation agrees up
to rounding, not bit for bit. Drawing the full batch costs each rank one ``randn`` of
the global batch per step, which is small beside a forward and backward pass.

**Expert-parallel** (``--expert-parallel``). Experts share nothing while they train,
so the world splits into groups that train different experts at once, each group
data-parallel inside (:func:`plan_layout`): with W >= N ranks, N groups of W/N ranks,
one expert each; with W < N, W one-rank groups taking experts ``e`` with ``e mod W``
equal to their index, in turn. Every expert then draws from its own generator keyed
by (seed, expert) (:func:`expert_generators`), so an expert's updates do not depend on
which group trains it or on how many ranks there are: two groups give each expert the
update that training it alone on its stream gives. Every rank walks all global steps
(it trains the ones its experts own and updates the EMA at each, as one process does),
so step k means the same thing everywhere. At a checkpoint the group leaders send
their experts' weights, EMA, optimizer moments and generators to rank 0
(:meth:`Parallel.collect`), which writes the usual ``last.pt``: the run is samplable
whenever every group has reached a checkpoint.

Only rank 0 writes (checkpoints, metrics, grids); each write is atomic (``meme.common.checkpoint``).
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from meme.common.errors import UserError

log = logging.getLogger("meme.training.distributed")
TIMEOUT = datetime.timedelta(minutes=30)   # a rank sampling a grid keeps the others waiting


@dataclass(frozen=True)
class Layout:
    """Who trains what: the ranks of each group, and the group that owns each expert."""

    world: int
    rank: int
    groups: tuple[tuple[int, ...], ...]   # ranks of group g, in order; ranks[0] is its leader
    owners: tuple[int, ...]               # owners[e] = the group that trains expert e
    expert_parallel: bool = False

    @property
    def group(self) -> int:
        return next(g for g, ranks in enumerate(self.groups) if self.rank in ranks)

    @property
    def experts(self) -> tuple[int, ...]:
        """The experts this rank trains."""
        return plan_experts(self, self.group)

    @property
    def is_leader(self) -> bool:
        return self.groups[self.group][0] == self.rank

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch: an equal share within its group."""
        ranks = self.groups[self.group]
        share = batch_size // len(ranks)
        i = ranks.index(self.rank)
        return slice(i * share, (i + 1) * share)


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a service started next
    (torchrun's rendezvous, a test's Ray or PostgreSQL): the OS picks it; between this
    call and the service binding it another process could take it, so callers that start
    a service retry or fail loudly rather than assume."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan_layout(world: int, rank: int, num_experts: int, expert_parallel: bool) -> Layout:
    """Data-parallel: one group of every rank. Expert-parallel: see the module docstring."""
    if not expert_parallel:
        return Layout(world, rank, (tuple(range(world)),), (0,) * num_experts)
    if world < num_experts:
        return Layout(world, rank, tuple((r,) for r in range(world)),
                      tuple(e % world for e in range(num_experts)), True)
    if world % num_experts:
        raise UserError(f"--expert-parallel: {world} ranks do not split into {num_experts} equal groups (one per "
                        f"expert); use a multiple of {num_experts} ranks, or fewer ranks than experts")
    m = world // num_experts
    return Layout(world, rank, tuple(tuple(range(g * m, (g + 1) * m)) for g in range(num_experts)),
                  tuple(range(num_experts)), True)


def expert_generators(seed: int, num_experts: int) -> list[torch.Generator]:
    """One data generator per expert, keyed by (seed, expert) through numpy's SeedSequence."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, e]).generate_state(1)[0]))
            for e in range(num_experts)]


def launched_world() -> tuple[int, int, int]:
    """(world size, rank, local rank): from an initialised process group, else torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return dist.get_world_size(), dist.get_rank(), local
    env = os.environ
    return int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))


@dataclass
class Parallel:
    """The live side of a :class:`Layout`: process groups, DDP wrapping and the collectives."""

    layout: Layout
    device: torch.device
    _groups: list[Any] = field(default_factory=list)    # one process group per layout group (world > 1)
    _objects: Any = None                                # a gloo group for Python objects (NCCL moves tensors only)
    _started: bool = False                              # this process initialised the default group

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def is_main(self) -> bool:
        return self.layout.rank == 0

    def owns(self, expert: int) -> bool:
        return self.layout.owners[expert] == self.layout.group

    def rows(self, batch_size: int) -> slice:
        return self.layout.rows(batch_size)

    def _group(self, expert: Optional[int]) -> Any:
        """The process group that trains ``expert`` (None: the whole world, e.g. a parent network)."""
        if expert is None:
            return None
        return self._groups[self.layout.owners[expert]]

    def _size(self, expert: Optional[int]) -> int:
        return self.world if expert is None else len(self.layout.groups[self.layout.owners[expert]])

    def wrap(self, module: nn.Module, expert: Optional[int] = None, find_unused: bool = False) -> nn.Module:
        """``module`` under DDP over the ranks that train it (itself when that is one rank)."""
        if self._size(expert) == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, process_group=self._group(expert),
                                       find_unused_parameters=find_unused)

    def mean(self, value: torch.Tensor, expert: Optional[int] = None) -> torch.Tensor:
        """The mean of a per-rank scalar over the ranks that train ``expert`` (the global batch's loss)."""
        if self._size(expert) == 1:
            return value
        v = value.detach().float().reshape(1).clone()
        dist.all_reduce(v, group=self._group(expert))
        return v[0] / self._size(expert)

    def window_loss(self, losses: Sequence[float]) -> float:
        """Mean loss of the steps in a logging window, over every group (collective in expert-parallel)."""
        if not self.layout.expert_parallel or self.world == 1:
            return sum(losses) / max(len(losses), 1)
        lead = self.layout.is_leader
        v = torch.tensor([sum(losses) if lead else 0.0, len(losses) if lead else 0.0], dtype=torch.float64)
        dist.all_reduce(v, group=self._objects)
        return float(v[0] / v[1].clamp_min(1))

    def collect_experts(self, experts: nn.ModuleList, ema_experts: nn.ModuleList, opt: torch.optim.Optimizer,
                        gens: Sequence[torch.Generator]) -> None:
        """Expert-parallel: rank 0 receives every expert another group trains, weights, EMA, AdamW
        state and generator, into its live objects (collective; nothing to do otherwise)."""
        if not self.layout.expert_parallel or self.world == 1:
            return
        send = self.layout.is_leader and not self.is_main
        mine = {e: expert_piece(experts[e], ema_experts[e], opt, gens[e]) for e in self.layout.experts} if send else None
        got: Optional[list] = [None] * self.world if self.is_main else None
        dist.gather_object(mine, got, dst=0, group=self._objects)
        for part in got or []:
            for e, piece in (part or {}).items():
                apply_piece(piece, experts[e], ema_experts[e], opt, gens[e])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self._objects)

    def close(self) -> None:
        if self._started and dist.is_initialized():
            dist.destroy_process_group()
            self._started = False


def _attempt_store(rank: int, world: int) -> dist.Store:
    """torchrun's store, under a prefix of its own for each restart: a store that outlives a
    killed generation still holds that generation's addresses, which the next one must not read."""
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=TIMEOUT))
    return dist.PrefixStore(f"meme/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def setup(device: torch.device, num_experts: int, expert_parallel: bool) -> Parallel:
    """The run's :class:`Parallel`: joins the process group when launched on several ranks."""
    world, rank, local = launched_world()
    layout = plan_layout(world, rank, num_experts, expert_parallel)
    if world == 1:
        return Parallel(layout, device)
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    started = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=_attempt_store(rank, world),
                                rank=rank, world_size=world, timeout=TIMEOUT)
        started = True
    # new_group is collective over the world: every rank creates every group, in one order.
    groups = [dist.new_group(list(ranks)) for ranks in layout.groups]
    objects = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Parallel(layout, device, groups, objects, started)


def check_batch(layout: Layout, batch_size: int) -> None:
    """The global batch splits evenly over every group's ranks, or one line saying what would."""
    for ranks in layout.groups:
        if batch_size % len(ranks):
            raise UserError(f"--batch-size {batch_size} is the global batch and must divide evenly among the "
                            f"{len(ranks)} ranks that train each expert; use a multiple of {len(ranks)}")


# ---- expert state in transit (expert-parallel checkpoints) ------------------------------------

def expert_piece(expert: nn.Module, ema_expert: nn.Module, opt: torch.optim.Optimizer,
                 gen: torch.Generator) -> dict:
    """One expert's weights, EMA weights, AdamW state and data generator, on the CPU."""
    def cpu(state: dict) -> dict:
        return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    return {"model": cpu(expert.state_dict()), "ema": cpu(ema_expert.state_dict()),
            "opt": [cpu(opt.state[p]) if p in opt.state else None for p in expert.parameters()],
            "gen": gen.get_state()}


def apply_piece(piece: dict, expert: nn.Module, ema_expert: nn.Module, opt: torch.optim.Optimizer,
                gen: torch.Generator) -> None:
    """Put a piece from another group into this rank's live objects (rank 0, before it writes)."""
    expert.load_state_dict(piece["model"])
    ema_expert.load_state_dict(piece["ema"])
    for p, state in zip(expert.parameters(), piece["opt"]):
        if state is not None:   # AdamW keeps 'step' on the CPU, its moments beside the parameter
            opt.state[p] = {k: v if k == "step" else v.to(p.device) for k, v in state.items()}
    gen.set_state(piece["gen"])


def resume_note(saved: dict, layout: Layout, batch_size: int, path: Any) -> Optional[str]:
    """What changes when a checkpoint written under one layout resumes under another (None: nothing).

    A change of the expert-parallel setting is refused: the experts' data streams differ.
    """
    was_ep = bool(saved.get("expert_parallel", False))
    if was_ep != layout.expert_parallel:
        now = "with" if layout.expert_parallel else "without"
        raise UserError(f"{path} was trained {'with' if was_ep else 'without'} --expert-parallel (each expert its "
                        f"own data stream in expert-parallel runs, one shared stream otherwise); it cannot continue "
                        f"{now} it: keep that setting or use a new --out")
    k = int(saved.get("world_size", 1))
    if k == layout.world:
        return None
    return (f"{path} was written by {k} rank(s) and resumes on {layout.world}: the global batch stays {batch_size} "
            f"({batch_size // len(layout.groups[layout.group])} per rank, was "
            f"{batch_size // max(1, len(plan_layout(k, 0, len(layout.owners), layout.expert_parallel).groups[0]))}"
            f"); the data stream is the same (it depends on the seed only); the gradient sums run in another "
            f"order, so the run continues equal up to float rounding, not bit for bit")


def describe(layout: Layout, batch_size: int) -> str:
    """The layout in words for the training log line ('' for one process)."""
    if layout.world == 1 and not layout.expert_parallel:
        return ""
    per_rank = batch_size // len(layout.groups[layout.group])
    if not layout.expert_parallel:
        return f"; data-parallel over {layout.world} ranks, {per_rank} of the {batch_size} images each"
    sizes = sorted({len(r) for r in layout.groups})
    return (f"; expert-parallel: {len(layout.groups)} group(s) of {'/'.join(map(str, sizes))} rank(s), "
            f"{per_rank} images per rank; rank 0's group trains experts {list(plan_experts(layout, 0))}")


def plan_experts(layout: Layout, group: int) -> tuple[int, ...]:
    return tuple(e for e, g in enumerate(layout.owners) if g == group)


def quiet_other_ranks() -> None:
    """Only rank 0 logs progress; the others say only what goes wrong."""
    if launched_world()[1] > 0:
        logging.getLogger().setLevel(logging.WARNING)
