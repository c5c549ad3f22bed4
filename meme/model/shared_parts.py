"""Parts every expert holds in common (``MemeConfig.share``), as real parameter sharing.

After the N experts are built, each shared part of expert 0 replaces the same part of
every other expert: one module object, so its parameters are counted once
(``nn.Module.parameters`` removes duplicates), stored once in a checkpoint (torch
saves a storage once however many keys name it) and held once in memory.

Training needs nothing else. ``meme.training.train`` and ``nas.evaluators.trial`` run one AdamW over the
denoiser's unique parameters with ``zero_grad(set_to_none=True)``: an expert's own
parameters have a gradient (and take an AdamW step, with their own moments) only on
that expert's steps, while a shared part has one on every step, so it is updated every
step with one set of moments, exactly as if one network owned it. Gradient clipping
sees the stepped expert's parameters, the shared ones included.

Which module names make each part (the ``ModuleDict`` keys of ``meme.model.iunet`` and
``meme.model.unet``, prefixed by resolution): encoder stage s is every ``enc`` entry at
resolution R/2^s (stage 0 also holds the input conv); decoder level l is every
``decoder.dec`` entry at R/2^l (its blocks and, for l > 0, its upsampler), and level 0
brings ``decoder.out``.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from meme.model.config import ConfigError, DataShape, ShareConfig


def shared_paths(share: ShareConfig, data: DataShape, net: nn.Module) -> list[str]:
    """Dotted module paths of ``net`` (a U-Net or iU-Net) that ``share`` names."""
    res = data.resolution
    enc = list(net.get_submodule("enc").keys())
    dec = list(net.get_submodule("decoder.dec").keys())
    paths = ["time_embed"] if share.time_embed else []
    for s in range(share.encoder_stages):
        paths += [f"enc.{k}" for k in enc if k.startswith(f"{res >> s}x{res >> s}_")]
    if share.mid:
        paths.append("decoder.mid")
    for level in range(share.decoder_levels):
        r = res >> level
        paths += [f"decoder.dec.{k}" for k in dec if k.startswith(f"{r}x{r}_")]
    if share.decoder_levels:
        paths.append("decoder.out")
    return paths


def _signature(module: nn.Module) -> tuple:
    """What must agree for two modules to be one: their structure and every parameter's shape."""
    return repr(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def tie(experts: Sequence[nn.Module], share: ShareConfig, data: DataShape) -> list[str]:
    """Make every shared part of ``experts`` the very module of expert 0 (in place); returns its paths.

    ``MemeConfig.validate`` already refused a sharing the experts' architectures
    contradict; the structural check here is the last line, for configs built in code.
    """
    if not share.any or len(experts) < 2:
        return []
    paths = shared_paths(share, data, experts[0])
    for path in paths:
        owner = experts[0].get_submodule(path)
        for i, e in enumerate(experts[1:], start=1):
            try:
                mine = e.get_submodule(path)
            except AttributeError:
                raise ConfigError(f"share: experts[{i}] has no module {path!r} to share") from None
            if _signature(mine) != _signature(owner):
                raise ConfigError(f"share: {path} of experts[{i}] is not the architecture of experts[0]'s")
            e.set_submodule(path, owner)
    return paths


def shared_modules(experts: Sequence[nn.Module]) -> list[nn.Module]:
    """The outermost modules of expert 0 that other experts hold too (the shared parts)."""
    others = {id(m) for e in experts[1:] for m in e.modules()}
    found: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        if id(m) in others:
            found.append(m)
            return
        for child in m.children():
            walk(child)

    if len(experts) > 1:
        walk(experts[0])
    return found


def unique_params(net: nn.Module) -> int:
    """Parameters counted once each, however many experts hold them."""
    return sum(p.numel() for p in net.parameters())


def move_private(expert: nn.Module, device: torch.device | str, keep: Sequence[nn.Module]) -> nn.Module:
    """Move ``expert`` to ``device`` except the modules in ``keep`` (a shared part stays where it is).

    Low-memory sampling moves one expert at a time to the device and back; the shared
    parts, needed by every expert, stay resident instead of travelling N times.
    """
    kept = {id(m) for m in keep}
    for m in _private_leaves(expert, kept):
        m.to(device)
    return expert


def _private_leaves(module: nn.Module, kept: set[int]) -> Iterator[nn.Module]:
    """The largest submodules that contain nothing kept."""
    if id(module) in kept:
        return
    if not any(id(m) in kept for m in module.modules()):
        yield module
        return
    if next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) is not None:
        raise ValueError(f"{type(module).__name__} holds its own tensors beside a shared child")
    for child in module.children():
        yield from _private_leaves(child, kept)
