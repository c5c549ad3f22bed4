"""Cost of one denoising step: parameters and multiply-accumulates (MACs), measured.

The search's budget unit is GFLOPs = 2 x MACs of one forward pass at batch 1 at the
data shape, **attention matmuls included**. Module-hook counters (ptflops' default)
only see ``nn.Module`` forwards, and a fused SDPA kernel hides QK^T and AV from
``torch.utils.flop_counter`` as well. All attention in our networks therefore runs
through one leaf module, ``meme.model.blocks.ScaledDotProductAttention``, and we count, in one
forward pass and through public APIs only:

* ``macs_hooks`` -- ptflops' default count (pytorch backend). The paper's "MACs" column
  is exactly 3x this (LDM-S 94.2G, LDM-L 288.2G), reported as ``paper_units``.
* ``macs`` -- ``macs_hooks`` plus the two attention matmuls of every
  ``ScaledDotProductAttention`` call, by formula from q/k/v shapes (a ptflops custom
  module hook).

A cross-check guards the count: torch's own ``FlopCounterMode``, run in the same pass
with SDPA on its math path, sees every conv and matmul wherever it happens (bias,
norm and activation aside). If it sees more than ``macs``, some matmul work escaped
the count (an attention call outside the leaf module, a bare ``einsum``) and counting
fails loudly instead of under-pricing a design.

The network is built on the meta device (no weight initialisation) and given
uninitialised CPU storage: the forward pass computes garbage at full speed, and only
shapes matter. Results are cached in-process and on disk.

An iU-Net is counted **by parts**. A search varies each stage's d_h/d and pool stride,
and each changes that stage's encoder iFormer blocks and nothing else
(``meme.model.iunet.iformer_specs``; the rest depends only on ``macro_key``). Both counters
sum per module, so an iU-Net's count is exactly

    rest(macro) + sum over its iFormer blocks of count(block alone, on its input shape)

with ``rest(macro)`` = one whole count of the first network of that macro minus its
blocks. A new candidate then costs the blocks it adds (a fraction of a second each,
once) instead of a whole-network count (seconds at 3x64x64), which is what lets a
weight-shared search price hundreds of candidates. ``tests/meme/model/test_macs.py`` checks the
sum against whole counts, integer for integer.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from meme.common.checkpoint import atomic_write_json
from meme.common.command import CommandParser, main_guard
from meme.model.blocks import ScaledDotProductAttention, reference_mixers
from meme.model.config import ArchConfig, DataShape, MemeConfig, ShareConfig, arch_dict
from meme.model.experts import build_network
from meme.model.iunet import IFormerSpec, iformer_specs, macro_key
from meme.model.references import reference_names, resolve
from meme.model.shared_parts import shared_paths

log = logging.getLogger(__name__)

# Bump when the counting rules change: invalidates the on-disk cache.
COUNTER_VERSION = 2
# Source files whose edits change what a config builds (and so its cost).
_NETWORK_SOURCES = ("networks.py", "blocks.py", "unet.py", "iunet.py", "macs.py")
_LOCK = threading.Lock()  # ptflops patches torch.nn.functional globally while it counts


@dataclass(frozen=True)
class NetCost:
    """Cost of one expert network: one forward at batch 1 at the data shape."""

    params: int      # trainable + frozen parameters
    macs: int        # multiply-accumulates, attention matmuls included
    macs_hooks: int  # ptflops' default count (misses the attention matmuls)

    def __add__(self, other: "NetCost") -> "NetCost":
        return NetCost(self.params + other.params, self.macs + other.macs, self.macs_hooks + other.macs_hooks)

    def __sub__(self, other: "NetCost") -> "NetCost":
        return NetCost(self.params - other.params, self.macs - other.macs, self.macs_hooks - other.macs_hooks)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        """The search's budget unit: 2 FLOPs per multiply-accumulate."""
        return 2 * self.macs / 1e9

    @property
    def gmacs_hooks(self) -> float:
        return self.macs_hooks / 1e9

    @property
    def paper_units(self) -> float:
        """The paper's "MACs" column (Tables 3-4): 3 x ptflops' module-hook GMACs."""
        return 3 * self.macs_hooks / 1e9

    @property
    def attention_macs(self) -> int:
        """What module hooks miss: mostly the QK^T and AV products."""
        return self.macs - self.macs_hooks


@dataclass(frozen=True)
class MemeCost:
    """Cost of a whole MEME: a sampler pays expert n's cost on its interval's steps."""

    experts: list[NetCost]
    intervals: list[tuple[int, int]]  # half-open 0-based t range of each expert
    weights: list[float]              # fraction of sampling steps each expert serves
    shared_params: int = 0            # parameters all experts hold in common (``MemeConfig.share``), counted once

    @property
    def gmacs_mean(self) -> float:
        return sum(w * e.gmacs for w, e in zip(self.weights, self.experts))

    @property
    def gflops_mean(self) -> float:
        """Per-step budget cost (interval-weighted mean over experts)."""
        return 2 * self.gmacs_mean

    @property
    def gflops_max(self) -> float:
        """Cost of the most expensive expert (``--budget-mode max``)."""
        return max(e.gflops for e in self.experts)

    @property
    def paper_units_mean(self) -> float:
        return sum(w * e.paper_units for w, e in zip(self.weights, self.experts))

    @property
    def params_total(self) -> int:
        """Every expert's weights, summed (identical architectures included)."""
        return sum(e.params for e in self.experts)

    @property
    def params_unique(self) -> int:
        """What the model holds: a shared part counted once, not once per expert."""
        return self.params_total - (len(self.experts) - 1) * self.shared_params


# ---- counting ---------------------------------------------------------------------

# Attention cost: QK^T is Lq x Lk x Dqk MACs, AV is Lq x Lk x Dv, per batch x head.
def sdpa_macs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """MACs of QK^T plus AV for one SDPA call, broadcast over batch and heads."""
    *lead, lq, dqk = q.shape
    lk, dv = k.shape[-2], v.shape[-1]
    bh = 1
    for n in torch.broadcast_shapes(tuple(lead), tuple(k.shape[:-2]), tuple(v.shape[:-2])):
        bh *= n
    return bh * lq * lk * (dqk + dv)


class AttentionTally:
    """A ptflops custom module hook for ``ScaledDotProductAttention`` that also keeps
    its own total, so the attention share can be told apart from ptflops' default."""

    def __init__(self):
        self.macs = 0

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        n = sdpa_macs(*inputs[:3])
        self.macs += n
        module.__flops__ += n  # ptflops' documented custom-hook contract


class _WithEmbedding(nn.Module):
    """(x) -> block(x, emb=0): an iFormer block counted alone, fed as in its network."""

    def __init__(self, block: nn.Module, emb: int):
        super().__init__()
        self.block, self.emb = block, emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, x.new_zeros(x.shape[0], self.emb))


class _WithTimestep(nn.Module):
    """(x) -> net(x, t=0): ptflops feeds one positional tensor and sizes the batch from it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.net(x, t)


def _on_cpu(net: nn.Module) -> nn.Module:
    """``net`` itself when it holds real tensors; a copy with uninitialised CPU storage
    when it was built on the meta device (counting needs shapes, not values)."""
    tensors = list(net.parameters()) + list(net.buffers())
    if not any(t.is_meta for t in tensors):
        return net
    return copy.deepcopy(net).to_empty(device="cpu")


def count_module(net: nn.Module, input_shape: tuple[int, ...], *, takes_t: bool = True) -> NetCost:
    """Count params and MACs of ``net`` for one input of ``input_shape`` (no batch dim).

    ``net`` is called as ``net(x, t)`` (a denoiser) or ``net(x)`` when ``takes_t`` is
    False. Accepts CPU or meta modules. Raises ``RuntimeError`` when matmul work
    escapes the count (see the module docstring).
    """
    from ptflops import get_model_complexity_info  # third-party; its import is only paid by a count

    model = _on_cpu(_WithTimestep(net) if takes_t else net)
    attention = AttentionTally()
    sink = io.StringIO()
    with _LOCK, reference_mixers(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
            sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as torch_count, torch.no_grad():
        total, _ = get_model_complexity_info(
            model, tuple(input_shape), as_strings=False, print_per_layer_stat=False,
            ost=sink, verbose=False, backend="pytorch",
            custom_modules_hooks={ScaledDotProductAttention: attention})
    if total is None:  # ptflops swallows the exception and prints it
        lines = [ln for ln in sink.getvalue().splitlines() if ln.strip()]
        raise RuntimeError(f"MAC counting failed: {lines[-1] if lines else 'unknown error'}")
    total = int(total)
    matmul_macs = torch_count.get_total_flops() // 2
    if matmul_macs > total:
        raise RuntimeError(
            f"{type(net).__name__}: torch sees {matmul_macs:,} matmul/conv MACs but only {total:,} "
            f"were counted; run attention through meme.model.blocks.ScaledDotProductAttention and "
            f"matmuls through nn.Linear/nn.Conv modules so the budget can price them")
    params = sum(p.numel() for p in net.parameters())
    return NetCost(params=int(params), macs=total, macs_hooks=total - attention.macs)


def _count_arch(arch: ArchConfig, data: DataShape) -> NetCost:
    with torch.device("meta"):  # no weight initialisation: shapes are all a count needs
        net = build_network(arch, data)
    return count_module(net, (data.channels, data.resolution, data.resolution))


# ---- caching ----------------------------------------------------------------------

def source_fingerprint() -> str:
    """Hash of the network code: an edit there changes what a config builds (and how fast it runs)."""
    here = Path(__file__).parent
    h = hashlib.sha1()
    for name in _NETWORK_SOURCES:
        p = here / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()


def cost_key(arch: ArchConfig, data: DataShape) -> str:
    """Disk-cache key: config, counting rules, network code, library versions."""
    return _key({"arch": arch_dict(arch), "data": dataclasses.asdict(data)})


def _key(what: dict) -> str:
    import ptflops  # third-party; its import is only paid by a count
    payload = json.dumps({**what, "counter": COUNTER_VERSION, "src": source_fingerprint(),
                          "torch": torch.__version__, "ptflops": getattr(ptflops, "__version__", "?")},
                         sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


def env_cache_dir(variable: str, default: str) -> Path | None:
    """``$variable`` (``0``/``off`` disables), else ``~/.cache/meme-nas/<default>``."""
    env = os.environ.get(variable)
    if env is not None and env.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "meme-nas" / default


def cache_dir() -> Path | None:
    """``$MEME_MACS_CACHE`` (``0``/``off`` disables), else ``~/.cache/meme-nas/macs``."""
    return env_cache_dir("MEME_MACS_CACHE", "macs")


def disk_get(d: Path | None, key: str, cls: type):
    """The dataclass ``cls`` stored as ``d/key.json``; None when absent, unreadable or off (d None)."""
    if d is None:
        return None
    try:
        return cls(**json.loads((d / f"{key}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def disk_put(d: Path | None, key: str, value) -> None:
    """Store a dataclass as ``d/key.json`` (atomically: parallel trials may race); no-op when off."""
    if d is None:
        return
    try:
        atomic_write_json(dataclasses.asdict(value), d / f"{key}.json")
    except OSError as exc:
        log.debug("cache %s not written (%s)", d, exc)


def _cached(key: str, count) -> NetCost:
    cost = disk_get(cache_dir(), key, NetCost)
    if cost is None:
        cost = count()
        disk_put(cache_dir(), key, cost)
    return cost


@lru_cache(maxsize=4096)
def cost_of_block(spec: IFormerSpec) -> NetCost:
    """One encoder iFormer block alone, at batch 1 on its input shape (cached)."""
    def count() -> NetCost:
        with torch.device("meta"):
            block = spec.build()
        return count_module(_WithEmbedding(block, spec.emb), (spec.width, spec.resolution, spec.resolution),
                            takes_t=False)
    return _cached(_key({"iformer": dataclasses.asdict(spec)}), count)


def _blocks_of(arch: ArchConfig, data: DataShape) -> NetCost:
    return sum((cost_of_block(s) for s in iformer_specs(arch, data)), NetCost(0, 0, 0))


_REST: dict[str, NetCost] = {}


def rest_of_macro(arch: ArchConfig, data: DataShape) -> NetCost:
    """An iU-Net's cost outside its encoder iFormer blocks: one whole count per macro."""
    mk = macro_key(arch, data)
    if mk not in _REST:
        _REST[mk] = _cached(_key({"rest": mk}), lambda: _count_arch(arch, data) - _blocks_of(arch, data))
    return _REST[mk]


@lru_cache(maxsize=512)
def cost_of_network(arch: ArchConfig, data: DataShape) -> NetCost:
    """Params and MACs of one expert at batch 1 at ``data``'s shape (cached; iU-Nets by parts)."""
    arch.validate()
    if arch.kind == "iunet":
        return rest_of_macro(arch, data) + _blocks_of(arch, data)
    return _cached(cost_key(arch, data), lambda: _count_arch(arch, data))


def clear_caches(*, rests: bool = True, blocks: bool = True) -> None:
    """Forget this process's counts (whole networks always; macro rests and blocks as
    asked). The disk cache is ``$MEME_MACS_CACHE``'s business."""
    cost_of_network.cache_clear()
    if rests:
        _REST.clear()
    if blocks:
        cost_of_block.cache_clear()


def cost_of_meme(cfg: MemeConfig) -> MemeCost:
    """Per-expert costs and the interval-weighted per-step mean of a MEME."""
    experts = [cost_of_network(a, cfg.data) for a in cfg.experts]  # identical ones hit the cache
    return MemeCost(experts=experts, intervals=cfg.intervals(), weights=cfg.interval_weights(),
                    shared_params=shared_param_count(cfg))


def shared_param_count(cfg: MemeConfig) -> int:
    """Parameters of the parts ``cfg.share`` names (one expert's copy), from shapes only.

    ``MemeConfig.validate`` refuses a sharing the experts' architectures contradict, so
    expert 0's parts are every expert's: one network is built (on the meta device), not
    N, and a search pricing thousands of candidates asks once per expert-0 architecture."""
    if not cfg.share.any or cfg.num_experts < 2:
        return 0
    cfg.validate()
    return _shared_params_of(cfg.experts[0], cfg.share, cfg.data)


@lru_cache(maxsize=1024)
def _shared_params_of(arch: ArchConfig, share: ShareConfig, data: DataShape) -> int:
    with torch.device("meta"):
        net = build_network(arch, data)
    params = {id(p): p for path in shared_paths(share, data, net) for p in net.get_submodule(path).parameters()}
    return sum(p.numel() for p in params.values())


# ---- CLI ----------------------------------------------------------------------------

def cost_to_dict(cost: MemeCost) -> dict[str, Any]:
    return {
        "experts": [{"params": e.params, "gmacs": e.gmacs, "gflops": e.gflops,
                     "paper_units": e.paper_units, "interval": list(iv)}
                    for e, iv in zip(cost.experts, cost.intervals)],
        "gmacs_mean": cost.gmacs_mean,
        "gflops_mean": cost.gflops_mean,
        "params_total": cost.params_total,
        "params_unique": cost.params_unique,
    }


def format_table(name: str, cost: MemeCost) -> Iterator[str]:
    head = f"{'expert':>6} {'interval':>11} {'params':>9} {'GMACs':>8} {'GFLOPs':>8} {'hookGMACs':>9} {'paper':>7}"
    yield f"{name}: one denoising step at batch 1 (GMACs include attention matmuls; " \
          f"paper = 3 x hook GMACs, the paper's 'MACs' column)"
    yield head
    for i, (e, (lo, hi)) in enumerate(zip(cost.experts, cost.intervals)):
        yield (f"{i + 1:>6} {f'[{lo},{hi})':>11} {e.params / 1e6:>8.2f}M {e.gmacs:>8.2f} "
               f"{e.gflops:>8.2f} {e.gmacs_hooks:>9.2f} {e.paper_units:>6.1f}G")
    hooks_mean = sum(w * e.gmacs_hooks for w, e in zip(cost.weights, cost.experts))
    yield (f"{'mean':>6} {'(weighted)':>11} {cost.params_total / 1e6:>8.2f}M {cost.gmacs_mean:>8.2f} "
           f"{cost.gflops_mean:>8.2f} {hooks_mean:>9.2f} {cost.paper_units_mean:>6.1f}G")
    yield f"max expert: {cost.gflops_max:.2f} GFLOPs; params column of 'mean' row = total over experts"
    if cost.shared_params:
        yield (f"shared parts: {cost.shared_params / 1e6:.2f}M params held once, so the model holds "
               f"{cost.params_unique / 1e6:.2f}M unique params (per-step cost unchanged)")


def main(argv: list[str] | None = None) -> int:
    @main_guard
    def run(argv: list[str] | None) -> int:
        p = CommandParser(prog="meme-nas macs",
                                    description="Params, MACs and GFLOPs per denoising step of a MEME.")
        p.add_argument("config", help=f"reference name ({', '.join(reference_names())}) or a YAML file")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        args = p.parse_args(argv)
        cfg = resolve(args.config)
        cost = cost_of_meme(cfg)
        if args.json:
            print(json.dumps(cost_to_dict(cost)))
        else:
            print("\n".join(format_table(cfg.name, cost)))
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
