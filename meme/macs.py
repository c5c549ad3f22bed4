"""Cost of one denoising step: parameters and multiply-accumulates (MACs), measured.

The search's budget unit is GFLOPs = 2 x MACs of one forward pass at batch 1 at the
data shape, **attention matmuls included**. Module-hook counters (ptflops' default)
only see ``nn.Module`` forwards, so the QK^T and AV products inside
``F.scaled_dot_product_attention`` are invisible to them, and the fused CPU SDPA
kernel is invisible to ``torch.utils.flop_counter`` too. We therefore count:

* ``macs_hooks`` -- ptflops' default count (pytorch backend): module hooks plus the
  functional ops ptflops patches. The paper's "MACs" column is exactly 3x this
  (LDM-S 94.2G, LDM-L 288.2G), reported as ``paper_units``.
* ``macs`` -- ``macs_hooks`` plus every matmul-like op ptflops cannot see: the two
  attention matmuls of each SDPA call (by formula, from q/k/v shapes) and any conv,
  linear, einsum or ``@`` executed outside a module ptflops hooks.

Counting runs on the meta device (shapes only, no weights, no arithmetic), so a
full-size expert costs well under a second; results are cached in-process and on disk.
"""
from __future__ import annotations

import argparse
import contextlib
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
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from meme.checkpoint import atomic_write_json
from meme.config import ArchConfig, DataShape, MemeConfig

log = logging.getLogger(__name__)

# Bump when the counting rules change: invalidates the on-disk cache.
COUNTER_VERSION = 1
# Source files whose edits change what a config builds (and so its cost).
_NETWORK_SOURCES = ("networks.py", "blocks.py", "unet.py", "iunet.py", "macs.py")
_LOCK = threading.Lock()  # ptflops patches torch.nn.functional globally


@dataclass(frozen=True)
class NetCost:
    """Cost of one expert network: one forward at batch 1 at the data shape."""

    params: int      # trainable + frozen parameters
    macs: int        # multiply-accumulates, attention matmuls included
    macs_hooks: int  # ptflops' default count (misses the attention matmuls)

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
        """Every expert holds its own weights, identical architectures included."""
        return sum(e.params for e in self.experts)


# ---- counting ---------------------------------------------------------------------

def sdpa_macs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """MACs of QK^T (Lq x Lk x Dqk) plus AV (Lq x Lk x Dv), per batch x head."""
    *lead, lq, dqk = q.shape
    lk, dv = k.shape[-2], v.shape[-1]
    bh = 1
    for n in torch.broadcast_shapes(tuple(lead), tuple(k.shape[:-2]), tuple(v.shape[:-2])):
        bh *= n
    return bh * lq * lk * (dqk + dv)


_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
# Matmul-like ops that module hooks never see when called outside a hooked module.
_MATMUL_LIKE = {
    torch.conv1d, torch.conv2d, torch.conv3d,
    torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
    F.linear, torch.einsum, torch.tensordot,
    torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
    torch._C.TensorBase.matmul, torch._C.TensorBase.__matmul__, torch.Tensor.__rmatmul__,
    torch._C.TensorBase.mm, torch._C.TensorBase.bmm, torch._C.TensorBase.addmm,
}


def _ptflops_wrapper_code():
    try:
        from ptflops.pytorch_engine import torch_function_wrapper
        return torch_function_wrapper.__call__.__code__
    except (ImportError, AttributeError):
        return None


def _is_ptflops_patch(func) -> bool:
    """ptflops replaces ops by callables with ``.op`` (a class instance or a closure)."""
    mod = getattr(func, "__module__", None) or type(func).__module__
    return hasattr(func, "op") and str(mod).startswith("ptflops")


def _called_by_ptflops(code, depth: int = 4) -> bool:
    """True when ptflops' own functional patch already counted this op (no double count)."""
    if code is None:
        return False
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


class UnhookedOpCounter(TorchFunctionMode):
    """Counts the MACs that ptflops' module hooks cannot see.

    SDPA calls by formula (fused kernels hide them from every other counter); other
    matmul-like ops by ``FlopCounterMode`` on the single call, but only outside modules
    ptflops hooks (those are counted by the hook) and not when ptflops' functional
    patch is the caller.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.attention_macs = 0
        self.other_macs = 0
        self._depth = 0
        self._wrapper_code = _ptflops_wrapper_code()
        self._handles = []
        from ptflops.pytorch_ops import MODULES_MAPPING
        for m in model.modules():
            if type(m) in MODULES_MAPPING:
                self._handles.append(m.register_forward_pre_hook(self._enter))
                self._handles.append(m.register_forward_hook(self._leave))

    def _enter(self, module, args):
        self._depth += 1

    def _leave(self, module, args, output):
        self._depth -= 1

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_ptflops_patch(func):
            # ptflops' patch of this op already counted the call that led here; calling
            # the patch again would count it twice and change ptflops' default count.
            func = func.op
        if self._depth == 0:
            if func in _SDPA:
                q, k, v = (kwargs[n] if n in kwargs else args[i] for i, n in enumerate(("query", "key", "value")))
                self.attention_macs += sdpa_macs(q, k, v)
            elif func in _MATMUL_LIKE and not _called_by_ptflops(self._wrapper_code):
                with FlopCounterMode(display=False) as fc:
                    out = func(*args, **kwargs)
                self.other_macs += fc.get_total_flops() // 2
                return out
        return func(*args, **kwargs)

    @property
    def macs(self) -> int:
        return self.attention_macs + self.other_macs


_DECOMP_MODULES = ("torch._decomp", "torch._refs", "torch._prims", "torch._meta_registrations")


def _from_decomposition(depth: int = 3) -> bool:
    """True when torch's own Python decomposition (meta kernels) made this call."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if str(frame.f_globals.get("__name__", "")).startswith(_DECOMP_MODULES):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _ptflops_as_on_cpu() -> Iterator[None]:
    """Make ptflops' default count on meta equal its count on CPU.

    On meta, ``nn.Linear`` runs torch's Python ``addmm`` decomposition, which calls
    ``torch.mm`` -- an op ptflops patches -- so the layer would be counted twice.
    Calls made by a decomposition are therefore given zero cost while we count.
    """
    from ptflops import pytorch_ops

    saved = {}
    for table in (pytorch_ops.FUNCTIONAL_MAPPING, pytorch_ops.TENSOR_OPS_MAPPING):
        for op, handler in list(table.items()):
            saved[(id(table), op)] = (table, handler)

            def gated(*args, _handler=handler, **kwargs):
                return 0 if _from_decomposition() else _handler(*args, **kwargs)

            table[op] = gated
    try:
        yield
    finally:
        for (_, op), (table, handler) in saved.items():
            table[op] = handler


class _WithTimestep(nn.Module):
    """(x) -> net(x, t=0): ptflops feeds one positional tensor and sizes the batch from it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.net(x, t)


def count_module(net: nn.Module, input_shape: tuple[int, ...], *, takes_t: bool = True) -> NetCost:
    """Count params and MACs of ``net`` for one input of ``input_shape`` (no batch dim).

    ``net`` is called as ``net(x, t)`` (a denoiser) or ``net(x)`` when ``takes_t`` is
    False. Works on meta or CPU modules; the input is made on the module's device.
    """
    from ptflops import get_model_complexity_info

    model = _WithTimestep(net) if takes_t else net
    counter = UnhookedOpCounter(model)
    sink = io.StringIO()
    try:
        with _LOCK, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
                _ptflops_as_on_cpu(), counter, torch.no_grad():
            macs_hooks, _ = get_model_complexity_info(
                model, tuple(input_shape), as_strings=False, print_per_layer_stat=False,
                ost=sink, verbose=False, backend="pytorch")
    finally:
        counter.remove_hooks()
    if macs_hooks is None:  # ptflops swallows the exception and prints it
        lines = [ln for ln in sink.getvalue().splitlines() if ln.strip()]
        raise RuntimeError(f"MAC counting failed: {lines[-1] if lines else 'unknown error'}")
    params = sum(p.numel() for p in net.parameters())
    macs_hooks = int(macs_hooks)
    return NetCost(params=int(params), macs=macs_hooks + counter.macs, macs_hooks=macs_hooks)


def _count_arch(arch: ArchConfig, data: DataShape) -> NetCost:
    from meme.networks import build_network

    shape = (data.channels, data.resolution, data.resolution)
    try:  # meta: no weight init, no arithmetic -- shapes are all a count needs
        with torch.device("meta"):
            net = build_network(arch, data)
        return count_module(net, shape)
    except (NotImplementedError, RuntimeError) as exc:
        log.debug("meta-device count failed (%s); counting on CPU", exc)
    return count_module(build_network(arch, data), shape)


# ---- caching ----------------------------------------------------------------------

def _source_fingerprint() -> str:
    here = Path(__file__).parent
    h = hashlib.sha1()
    for name in _NETWORK_SOURCES:
        p = here / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()


def cost_key(arch: ArchConfig, data: DataShape) -> str:
    """Disk-cache key: config, counting rules, network code, library versions."""
    import ptflops
    payload = json.dumps({
        "arch": dataclasses.asdict(arch), "data": dataclasses.asdict(data),
        "counter": COUNTER_VERSION, "src": _source_fingerprint(),
        "torch": torch.__version__, "ptflops": getattr(ptflops, "__version__", "?"),
    }, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


def cache_dir() -> Path | None:
    """``$MEME_MACS_CACHE`` (``0``/``off`` disables), else ``~/.cache/meme-nas/macs``."""
    env = os.environ.get("MEME_MACS_CACHE")
    if env is not None and env.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "meme-nas" / "macs"


def _disk_get(key: str) -> NetCost | None:
    d = cache_dir()
    if d is None:
        return None
    try:
        return NetCost(**json.loads((d / f"{key}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _disk_put(key: str, cost: NetCost) -> None:
    d = cache_dir()
    if d is None:
        return
    try:
        atomic_write_json(dataclasses.asdict(cost), d / f"{key}.json")  # parallel trials may race
    except OSError as exc:
        log.debug("MACs cache not written (%s)", exc)


@lru_cache(maxsize=512)
def cost_of_network(arch: ArchConfig, data: DataShape) -> NetCost:
    """Params and MACs of one expert at batch 1 at ``data``'s shape (cached)."""
    key = cost_key(arch, data)
    cost = _disk_get(key)
    if cost is None:
        cost = _count_arch(arch, data)
        _disk_put(key, cost)
    return cost


def cost_of_meme(cfg: MemeConfig) -> MemeCost:
    """Per-expert costs and the interval-weighted per-step mean of a MEME."""
    experts = [cost_of_network(a, cfg.data) for a in cfg.experts]  # identical ones hit the cache
    return MemeCost(experts=experts, intervals=cfg.intervals(), weights=cfg.interval_weights())


# ---- CLI ----------------------------------------------------------------------------

def cost_to_dict(cost: MemeCost) -> dict[str, Any]:
    return {
        "experts": [{"params": e.params, "gmacs": e.gmacs, "gflops": e.gflops,
                     "paper_units": e.paper_units, "interval": list(iv)}
                    for e, iv in zip(cost.experts, cost.intervals)],
        "gmacs_mean": cost.gmacs_mean,
        "gflops_mean": cost.gflops_mean,
        "params_total": cost.params_total,
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


def main(argv: list[str] | None = None) -> int:
    from meme.cli import main_guard
    from meme.references import reference_names, resolve

    @main_guard
    def run(argv: list[str] | None) -> int:
        p = argparse.ArgumentParser(prog="python -m meme.macs",
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
