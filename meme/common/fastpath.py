"""The numeric fast paths a device gets: bf16 autocast and channels_last memory.

One decision, shared by training, sampling, search trials and the benchmark, so a
speed measured by ``nas.bench.run`` is the speed a user's run gets.

Why these two, and when (measured by ``python -m nas.bench``: the "fastpath" rows of
``results/BENCHMARKS.md``):

* **channels_last** (NHWC): cuDNN and oneDNN run 3x3 and 1x1 convs fastest in it;
  on the CPU alone it bought 1.1-1.5x in fp32. Always on for 4-D activations.
* **bf16 autocast**: the matmul rate of an H100's tensor cores, and of CPUs with
  AMX / AVX512-BF16 (oneDNN), where with channels_last it bought 3.6-3.9x (iU-Net
  expert) and 4.9-6.7x (LDM-L) over fp32 eager for a forward at 3x64x64.
  On a CPU only networks at least ``CPU_BF16_MIN_WIDTH`` channels wide gain (2-core
  AMX Xeon, channels_last, per step: base 128 train 2.4x / infer 3.3x; base 64
  1.5x / 2x; base 32 0.9x / 1.06x; the 16-wide search proxies 0.6x), because
  narrow layers are bound by per-op overhead and bf16 adds format reorders. A CPU
  without native bf16 emulates it and always loses, so there it stays fp32.
  Norms keep fp32 statistics (``meme.model.blocks.GroupNorm32``) and outputs of the
  denoiser are cast back to fp32 before the sampler's update, so only the network's
  interior runs in bf16 (its error is tested in ``tests/meme/speed/test_fast_paths.py``).

``precision='fp32'`` turns bf16 off everywhere, for a bit-faithful reference run.

On CUDA every fast path also sets the process-wide settings a GPU run wants
(``set_up_cuda``): TF32 for the fp32 matmuls and convolutions left outside autocast,
unless the process already chose a precision, and ``cudnn.benchmark`` (each command
runs a few fixed shapes many times, so the one-off search for the fastest conv
algorithm pays back). Building a ``FastPath`` is the one door every command goes
through before it runs a network, so no command can miss them; the FID network does
not use it, so its features stay those of clean-fid.

``--no-fast-path`` on any command (``MEME_FAST_PATH=0``, inherited by trial processes
and Ray workers) turns all of it off for debugging: fp32, contiguous memory, no TF32, no
cudnn.benchmark.

A third, process-wide setting comes with any CPU fast path: ``reuse_freed_cpu_memory``
keeps glibc from handing large freed blocks back to the kernel, so the next
activation of the same size does not page-fault its way into fresh, zeroed memory.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

log = logging.getLogger("meme.common.fastpath")

PRECISIONS = ("auto", "bf16", "fp32")
NATIVE_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}   # CPU flags of native bf16 matmul (x86)
CPU_MALLOC_ENV = "MEME_CPU_MALLOC"  # 'system': leave glibc's allocator settings alone
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # mallopt(3) parameters, from glibc's <malloc.h>
KEEP_FREED_BYTES = 1 << 30          # blocks below this come from (and return to) the heap, never mmap
TRIM_ABOVE_BYTES = (1 << 31) - 1    # free heap top kept up to this (mallopt takes a C int)
CPU_BF16_MIN_WIDTH = 64             # base channels from which bf16 pays on a CPU (measured above)
DYNAMO_ROOM = 8                     # recompiles left to the rest of a process under compile_budget
FAST_PATH_ENV = "MEME_FAST_PATH"    # '0': every fast path off (what --no-fast-path sets)


def fast_path_enabled() -> bool:
    """False when ``--no-fast-path`` (``MEME_FAST_PATH=0``) asked for the plain fp32 path."""
    return os.environ.get(FAST_PATH_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


@dataclass(frozen=True)
class CudaSettings:
    """The process-wide CUDA settings in force (what ``set_up_cuda`` left)."""

    matmul_fp32: str                # torch.backends.cuda.matmul.fp32_precision: 'tf32', 'ieee' or 'none'
    conv_fp32: str                  # torch.backends.cudnn.conv.fp32_precision
    cudnn_benchmark: bool


def set_up_cuda(enabled: bool = True) -> CudaSettings:
    """TF32 and cudnn.benchmark on (or, ``enabled=False``, off); returns what is in force.

    "Unless the process already chose": a matmul precision other than torch's default
    'none' was set by the user's own code and is kept. Only torch's current API
    (``fp32_precision``) is used; mixing it with the legacy ``allow_tf32`` flags is an error
    in torch 2.9+. Setting these needs no GPU, so they are tested on a CPU.
    """
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if enabled:
        if matmul.fp32_precision == "none":
            matmul.fp32_precision = "tf32"
        if conv.fp32_precision == "none":
            conv.fp32_precision = "tf32"
        torch.backends.cudnn.benchmark = True
    else:
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        torch.backends.cudnn.benchmark = False
    return CudaSettings(matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark)


@lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when oneDNN runs bf16 natively here (AMX or AVX512-BF16), not by emulation.

    Read from the CPU flags the kernel reports (``/proc/cpuinfo``), with oneDNN present:
    torch exposes the same test only through private helpers. Elsewhere (no such file):
    False, so the CPU stays fp32, which is always correct, if slower.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool(NATIVE_BF16_FLAGS & set(flags))


@lru_cache(maxsize=None)
def reuse_freed_cpu_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the kernel.

    Why: by default glibc serves a block above its (adaptive, at most 32 MiB) mmap
    threshold with a fresh ``mmap`` and unmaps it on free, and trims the heap top
    beyond twice that. A denoiser's CPU forward frees and reallocates the same
    multi-MB activations at every layer and step, so each one page-faults into
    kernel-zeroed memory again. Measured on a 2-core AMX Xeon (bf16 channels_last): the
    iU-Net FFN at 4x128x64x64 (1x1 conv, GELU, 1x1 conv) took 11.7-15.2 ms in 4 of 5 runs
    (4.2 in the fifth) and 4.2-4.7 ms in all 5 with this set; a whole meme-table4 expert
    forward at batch 4 is 2-10% faster (245 ms against 258 and 274; 241 against 246),
    and its page faults stop once every activation size has been seen. The cost: the
    process keeps what it frees (24 expert forwards at batches 1-8 peaked at 1800 MiB
    RSS, 1817 without; a bare 64 MiB alloc/free loop stops faulting after 2-9 rounds,
    holding 64-512 MiB more), as PyTorch's CUDA caching allocator does on a GPU.
    ``MEME_CPU_MALLOC=system`` turns it off.
    Applied once per process; True when set, False where glibc is absent or it is off.
    """
    if os.environ.get(CPU_MALLOC_ENV, "").lower() == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    ok = (libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES) == 1
          and libc.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE_BYTES) == 1)
    if not ok:
        log.warning("glibc refused the allocator settings; CPU activations keep page-faulting")
    return ok


@dataclass(frozen=True)
class FastPath:
    """What a run on one device uses; build it with ``fast_path``."""

    device_type: str                # 'cuda' or 'cpu'
    bf16: bool                      # run the network under bf16 autocast
    channels_last: bool             # keep weights and 4-D activations NHWC

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, cache: bool = True) -> contextlib.AbstractContextManager:
        """bf16 autocast on this device, or a no-op. ``cache=False``: no weight-cast cache
        (inside a CUDA graph capture, whose region closes before the graph replays)."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=cache)

    def prepare(self, module: nn.Module, device: torch.device | str) -> nn.Module:
        """Move a network to the device in this path's memory format (in place; returned)."""
        return module.to(device, memory_format=self.memory_format)

    def input(self, x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Move a batch to the device in this path's memory format."""
        non_blocking = self.device_type == "cuda"   # the host goes on drawing; the stream orders the copy
        if x.dim() != 4:
            return x.to(device, non_blocking=non_blocking)
        return x.to(device, memory_format=self.memory_format, non_blocking=non_blocking)

    def describe(self) -> str:
        parts = ["bf16 autocast" if self.bf16 else "fp32"]
        if self.channels_last:
            parts.append("channels_last")
        return " + ".join(parts)


def network_width(model: nn.Module) -> int:
    """Output channels of the first conv: the base width of every network ``meme`` builds."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.out_channels if conv is not None else 0


def fast_path(device: torch.device | str, precision: str = "auto", model: nn.Module | None = None) -> FastPath:
    """The fast path for running ``model`` on ``device``.

    'auto': bf16 on CUDA; on a CPU, bf16 when it is native there and ``model`` is at
    least ``CPU_BF16_MIN_WIDTH`` wide (no model given: treated as wide). 'bf16' and
    'fp32' force the choice.
    """
    return fast_path_for_width(device, precision, None if model is None else network_width(model))


def fast_path_for_width(device: torch.device | str, precision: str = "auto", width: int | None = None) -> FastPath:
    """``fast_path`` for a network of base ``width`` channels, known before it is built
    (``meme.speed.latency`` keys its cache by the precision a network will run in)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    kind = torch.device(device).type
    enabled = fast_path_enabled()
    if kind == "cuda":
        set_up_cuda(enabled)
    if kind not in ("cuda", "cpu") or not enabled:
        return FastPath(kind, bf16=False, channels_last=False)
    if kind == "cpu":
        reuse_freed_cpu_memory()
    if precision == "auto":
        wide = width is None or width >= CPU_BF16_MIN_WIDTH
        bf16 = kind == "cuda" or (cpu_has_fast_bf16() and wide)
    else:
        bf16 = precision == "bf16"
    return FastPath(kind, bf16=bf16, channels_last=True)


def compile_for_inference(module: nn.Module) -> nn.Module:
    """``torch.compile`` for sampling: inductor with the weights frozen as constants.

    Freezing lets inductor pre-pack conv weights and fuse them with their pointwise
    neighbours (as constants: a compiled network does not see its weights change in place
    afterwards, so compile for sampling a trained network, not during its training); on a 2-core AMX CPU it turned plain compile's 1.00x into 1.2-1.3x over
    bf16 eager for an iU-Net expert, after ~30 s of compiling. Inductor reads the flag
    when a graph is compiled (at the first call), not when ``torch.compile`` wraps the
    module, so it is set process-wide; it only ever applies to graphs compiled under
    ``torch.no_grad``, so training graphs are unaffected.
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(module)


def compile_budget(graphs: int) -> contextlib.AbstractContextManager:
    """Let ``torch.compile`` hold ``graphs`` compiled graphs per code object, and fail past them.

    Experts of one class share their ``forward``'s code object, so dynamo counts every
    (expert, batch size) against one recompile limit (8 by default): a MEME of 4 experts
    sampled at 3 batch sizes would silently run its last graphs eager. Inside this
    region the limit is ``graphs`` plus dynamo's default room for whatever else the process
    compiled (the count is per process), and hitting it raises instead. Dynamo's
    configuration is ``torch._dynamo.config``, the module torch's compile documentation
    sets these knobs in. ``graphs`` = 0: nothing changes.
    """
    if graphs <= 0:
        return contextlib.nullcontext()
    import torch._dynamo  # deferred: loading dynamo costs seconds, only compiled runs need it

    limit = max(int(torch._dynamo.config.recompile_limit), graphs + DYNAMO_ROOM)
    return torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True)
