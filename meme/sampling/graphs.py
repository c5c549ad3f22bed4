"""Sampling without launch overhead: each expert's forward replayed from a CUDA graph.

Why: at the shapes MEME samples (3x64x64 latents, batch 1 to 32) one denoising step of
an expert is a few hundred kernels of a few microseconds each, and the host cannot
launch them as fast as the GPU runs them. On one H200 every network took 17-26 ms per
step at batch 1 whatever its GFLOPs (``results/curated/gpu-h200-2026-12-04``): launch and
Python time. A CUDA graph launches a whole forward in one call. The recipe is PyTorch's
own (``torch.cuda.CUDAGraph``): warm up on a side stream, capture, then copy each step's
inputs into the captured tensors and replay.

Graphs outlive one ``generate`` call: ``graphed_experts`` keeps them with the denoiser
(weakly) and reuses them while its weights are unchanged: same memory, same version
counter. A graph reads its weights by address, but not every tensor it reads is a weight:
the fast iFormer mixer's fused weights are derived from them by Python code that a replay
does not run. So any change, a move (``.to``, ``load_state_dict``) or an update in place
(an optimizer or EMA step), means a fresh capture (``tests/meme/speed/test_cuda.py``).

What a run captures is known before it starts: one graph per (expert, batch size) of its
plan. ``GraphedExperts`` is built with that set and refuses any other call, so a run never
falls back to eager without saying so. The graphs share one memory pool and are all
captured on one side stream: they replay one after another, so their activations can share
memory, which PyTorch allows only for graphs captured on the same stream.

Autocast runs inside a capture with its weight-cast cache off: a cached cast would be
freed when the capture's autocast region closes, under a graph that still reads it. Each
replay then casts the weights again, inside the graph, at no host cost.

The experts may be ``torch.compile``'d (``--compile``): the warm-up compiles them, and the
capture records the compiled kernels, which is what ``mode="reduce-overhead"`` does.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Optional, Sequence

import torch
from torch import nn

from meme.common.fastpath import FastPath
from meme.model.blocks import InceptionMixer

WARMUP_CALLS = 3        # eager calls on a side stream before a capture (cuDNN picks its algorithms, compiles run)


@dataclass
class _Captured:
    """One captured forward: the tensors it reads and the one it writes."""

    graph: "torch.cuda.CUDAGraph"
    x: torch.Tensor         # copied into before each replay
    t: torch.Tensor         # filled with the step's timestep before each replay
    eps: torch.Tensor       # the forward's fp32 output, overwritten by each replay of ANY graph of the pool
    derived: list           # tensors derived from the weights in Python (fused mixer weights), held so the
                            # memory the graph reads stays theirs even if their cache moves on


class GraphedExperts:
    """``forward(e, x, t)`` -> expert ``e``'s fp32 eps at ``x`` and timestep ``t``, from a CUDA
    graph captured on the first call at that batch size.

    ``batch_sizes`` are the only batch sizes the run may call with: the capture budget is
    experts x batch sizes graphs, and a call outside it raises. An expert given as None
    (``--low-memory``: not on the device now) is outside it too.
    """

    def __init__(self, experts: Sequence[Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]],
                 batch_sizes: Iterable[int], fp: FastPath, device: torch.device):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.experts = list(experts)
        self.fp, self.device = fp, device
        self.planned: set[tuple[int, int]] = set()
        self.plan(batch_sizes)
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)     # every capture of the pool on this one stream

    def plan(self, batch_sizes: Iterable[int]) -> None:
        """Allow these batch sizes too (a later run of the same graphs)."""
        self.planned |= {(e, int(b)) for e, ex in enumerate(self.experts) if ex is not None for b in batch_sizes}

    @property
    def budget(self) -> int:
        """Graphs this run may capture: experts x batch sizes."""
        return len(self.planned)

    def __call__(self, e: int, x: torch.Tensor, t: int) -> torch.Tensor:
        key = (e, tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last))
        g = self.graphs.get(key)    # a graph reads its inputs at one shape, dtype and layout
        if g is None:
            if (e, x.shape[0]) not in self.planned:
                sizes = sorted({b for _, b in self.planned})
                raise RuntimeError(f"no CUDA graph planned for expert {e} at batch {x.shape[0]} (planned: "
                                   f"{len(self.experts)} expert(s) x batch sizes {sizes}); sample without CUDA "
                                   f"graphs (--no-cuda-graphs) to run other shapes")
            g = self.graphs[key] = self._capture(e, x)
        g.x.copy_(x)
        g.t.fill_(t)
        g.graph.replay()
        return g.eps.clone()    # the next replay overwrites g.eps; a caller may keep this one

    def _capture(self, e: int, x: torch.Tensor) -> _Captured:
        expert = self.experts[e]
        static_x = x.clone()    # same memory format as the sampler's states
        static_t = torch.zeros(x.shape[0], dtype=torch.long, device=self.device)
        graph, eps = capture_graph(lambda: expert(static_x, static_t).float(), self.fp, self.device, self.pool,
                                   self.stream)
        return _Captured(graph, static_x, static_t, eps, derived_tensors(expert))


@torch.no_grad()
def capture_graph(fn: Callable[[], torch.Tensor], fp: FastPath, device: torch.device,
                  pool=None, stream: Optional["torch.cuda.Stream"] = None) -> tuple["torch.cuda.CUDAGraph", torch.Tensor]:
    """``fn`` (reading tensors it closes over) captured as a CUDA graph on ``fp``'s autocast:
    ``WARMUP_CALLS`` eager calls on a side stream first, then the capture. Returns the graph
    and the tensor each replay overwrites with ``fn``'s result. Graphs sharing a ``pool``
    pass the same ``stream``."""
    with torch.cuda.device(device):     # the capture stream belongs to the tensors' GPU, current or not
        side = stream if stream is not None else torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), fp.autocast(cache=False):
            for _ in range(WARMUP_CALLS):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=side), fp.autocast(cache=False):
            out = fn()
    return graph, out


def derived_tensors(module: nn.Module) -> list:
    """What a forward of ``module`` reads besides its parameters and buffers: the fast
    iFormer mixers' fused weights (``InceptionMixer``'s cache, built by the warm-up)."""
    return [m.fused_cache() for m in module.modules() if isinstance(m, InceptionMixer)]


_KEPT: "weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, GraphedExperts]]" = weakref.WeakKeyDictionary()


def weights_key(modules: Iterable[nn.Module]) -> tuple:
    """Where every parameter and buffer lives, its dtype and its version (bumped by every
    in-place update; the counter the fused-mixer cache reads too): what a graph depends on."""
    return tuple((t.data_ptr(), t.dtype, t._version) for m in modules for t in (*m.parameters(), *m.buffers()))


def release(owner: nn.Module) -> None:
    """Drop ``owner``'s kept graphs and their memory pool (a command done sampling)."""
    _KEPT.pop(owner, None)


def graphed_experts(owner: nn.Module, experts: Sequence[Callable], batch_sizes: Iterable[int], fp: FastPath,
                    device: torch.device, variant: Hashable = None) -> GraphedExperts:
    """The graphs of ``owner``'s experts, kept from an earlier call when no weight they read changed.

    ``variant`` names anything else the graphs depend on (compiled or not); ``experts`` are
    the callables to capture, ``owner.experts`` the modules whose weights they read.
    """
    sizes = list(batch_sizes)
    key = (fp, str(device), variant, weights_key(owner.experts))
    kept = _KEPT.get(owner)
    if kept is not None and kept[0] == key:
        kept[1].plan(sizes)
        return kept[1]
    graphs = GraphedExperts(experts, sizes, fp, device)
    _KEPT[owner] = (key, graphs)
    return graphs
