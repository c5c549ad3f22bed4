"""Will a network fit on this device? Checked before anything is allocated.

A config from elsewhere may describe a network no machine here can hold, and building
it would allocate until the machine falls over. :func:`check_fits` refuses such a
config with one :class:`~meme.model.config.ConfigError` line giving the numbers; ``meme.training.train``
calls it before building the model, ``meme.sampling.sample`` before loading a run, and the search
before a trial starts (``nas.space.space.check_space`` for the largest macro of a space,
``nas.evaluators.trial`` for each candidate).

The estimate costs no memory: the denoiser is built on the meta device (shapes, no
storage) and its parameters counted, then one meta forward of each expert at the
batch size sums the outputs of every leaf module. The bound, rough by design:

* activations = 4 bytes x that sum for the largest expert (one expert trains per
  step): about what autograd keeps for the backward pass in fp32. bf16 keeps less and
  fused attention keeps no score matrix, so this errs large; used for sampling too,
  where nothing is kept for a backward, it errs larger still;
* training = parameters x 20 bytes (fp32 weights, gradients, AdamW's two moments, the
  EMA copy) + activations; inference = parameters x 4 bytes + activations.

Available memory: free CUDA memory (``torch.cuda.mem_get_info``) on a GPU, else
``MemAvailable`` from ``/proc/meminfo`` (``os.sysconf`` where there is none). Where
neither can be read, nothing is refused.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from meme.model.config import ArchConfig, ConfigError, DataShape, MemeConfig
from meme.model.experts import build_network, count_params

TRAIN_BYTES_PER_PARAM = 20   # fp32 weight + gradient + 2 AdamW moments + EMA
INFER_BYTES_PER_PARAM = 4
ACTIVATION_BYTES = 4         # fp32


@dataclass(frozen=True)
class Estimate:
    params: int             # unique parameters of the whole denoiser
    activation_bytes: int   # the bound above, for the largest expert at the batch size
    batch_size: int
    partial: bool = False   # stopped early: activation_bytes is a lower bound

    def bytes(self, training: bool) -> int:
        per = TRAIN_BYTES_PER_PARAM if training else INFER_BYTES_PER_PARAM
        return self.params * per + self.activation_bytes


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.3g} GiB"


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory a new allocation can have on ``device`` now; None when it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _leaf_output_elements(net: nn.Module, shape: tuple[int, ...], batch_size: int) -> int:
    """Sum of the output sizes of every leaf module in one meta forward of ``net``."""
    total = 0

    def hook(_module, _inputs, output) -> None:
        nonlocal total
        outs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(o.numel() for o in outs if isinstance(o, torch.Tensor))

    leaves = [m for m in net.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            net(torch.zeros((batch_size, *shape), device="meta"), torch.zeros(batch_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


@functools.lru_cache(maxsize=256)
def _meta_network(arch: ArchConfig, data: DataShape) -> nn.Module:
    with torch.device("meta"):
        return build_network(arch, data)


@functools.lru_cache(maxsize=256)
def _params(arch: ArchConfig, data: DataShape) -> int:
    return count_params(_meta_network(arch, data))


@functools.lru_cache(maxsize=256)
def _activation_bytes(arch: ArchConfig, data: DataShape, batch_size: int) -> int:
    shape = (data.channels, data.resolution, data.resolution)
    try:
        return _leaf_output_elements(_meta_network(arch, data), shape, batch_size) * ACTIVATION_BYTES
    except RuntimeError:  # a size beyond int64 on the meta device: beyond any memory
        return 2 ** 63


def estimate(cfg: MemeConfig, batch_size: int, limit: Optional[int] = None) -> Estimate:
    """Parameters and the activation bound of ``cfg`` at ``batch_size``, without allocating.

    Each distinct expert architecture is built (on meta) once. ``limit``: stop early, with a
    first-stage lower bound for the activations, once the parameters or that bound alone
    exceed it, so an absurd config costs no meta forward.
    """
    cfg.validate()
    params = sum(_params(a, cfg.data) for a in cfg.experts)
    widest = max(max(e.base_channels, e.decoder_channels) for e in cfg.experts)   # full-resolution maps
    first_stage = batch_size * widest * cfg.data.resolution ** 2 * ACTIVATION_BYTES
    if limit is not None and (params * INFER_BYTES_PER_PARAM > limit or first_stage > limit):
        return Estimate(params, first_stage, batch_size, partial=True)
    act = max(_activation_bytes(a, cfg.data, batch_size) for a in set(cfg.experts))
    return Estimate(params, act, batch_size)


def check_fits(cfg: MemeConfig, batch_size: int, device: torch.device | str, training: bool = True,
               what: str = "config") -> Estimate:
    """Refuse (ConfigError, one line with the numbers) a config whose network would not fit on ``device``."""
    device = torch.device(device)
    avail = available_bytes(device)
    est = estimate(cfg, batch_size, limit=avail)
    need = est.bytes(training)
    if avail is not None and need > avail:
        about = "at least" if est.partial or need >= 2 ** 63 else "about"
        raise ConfigError(
            f"{what}: {cfg.name} needs {about} {gib(need)} to {'train' if training else 'run'} "
            f"({est.params / 1e6:.4g}M parameters, {about} {gib(est.activation_bytes)} of activations at "
            f"batch {batch_size}), but {device} has {gib(avail)} available")
    return est
