"""From configs to denoisers: one network per ``ArchConfig``, and N timestep experts behind one forward.

``build_network`` is the one entry point from an ``ArchConfig`` to ``eps = net(x_t, t)``: every
network takes ``x`` [B, C, H, W] and ``t`` [B] (int or float timesteps in [0, T)) and returns
eps with x's shape; nothing else needs to know which kind of network an expert is.

Timestep experts: N denoisers, each owning an interval of t, and soft-expert t-sampling.

Expert n (0-based) owns ``boundaries[n] <= t < boundaries[n+1]`` (the paper's
``I_n = ((n-1)T/N, nT/N]`` for 0-based t). At sampling time step t is denoised only by
its owner, so the per-step cost is that expert's cost.

Training is per expert: under the soft-expert strategy (paper Sec. "Soft Expert
Strategy") expert n also sees timesteps *outside* its interval, so a training step must
call ``denoiser.experts[n]`` (or ``forward(x, t, expert=n)``) directly rather than
route by t.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from meme.model.config import ArchConfig, ConfigError, DataShape, MemeConfig
from meme.model.iunet import IUNet
from meme.model.shared_parts import tie
from meme.model.unet import UNet

_BUILDERS = {"unet": UNet, "iunet": IUNet}


def build_network(arch: ArchConfig, data: DataShape) -> nn.Module:
    """Validate ``arch`` against ``data`` and build its network (on the current default device)."""
    arch.validate()
    data.validate()
    if data.resolution % (2 ** (arch.num_stages - 1)):
        raise ConfigError(f"data.resolution {data.resolution} is not divisible by "
                          f"2^{arch.num_stages - 1} (one halving per stage)")
    try:
        builder = _BUILDERS[arch.kind]
    except KeyError:
        raise ConfigError(f"arch.kind must be one of {sorted(_BUILDERS)}, got {arch.kind!r}") from None
    return builder(arch, data)


def count_params(net: nn.Module) -> int:
    """All parameters, each counted once (a part the experts share counts once)."""
    return sum(p.numel() for p in net.parameters())


def wake_zero_init(net: nn.Module, seed: int = 0, scale: float = 0.02) -> nn.Module:
    """Give zero-initialised parameters small random values (in place; returned).

    A fresh denoiser outputs exactly 0 (LDM's zero-init output convs), so comparing two
    numeric paths of an untrained network compares zeros; tests and ``nas.bench.run``
    wake it first so every layer contributes to the output and its gradients.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


class MultiExpertDenoiser(nn.Module):
    """N experts behind one ``forward(x, t)`` that routes each sample to the owner of its t."""

    def __init__(self,
                 experts: Sequence[nn.Module],   # one network per interval, ordered by t
                 boundaries: Sequence[int],      # N+1 increasing ints 0 = b_0 < ... < b_N = T
                 ) -> None:
        super().__init__()
        b = [int(v) for v in boundaries]
        if len(b) != len(experts) + 1 or b[0] != 0 or any(x >= y for x, y in zip(b, b[1:])):
            raise ValueError(f"need N+1 = {len(experts) + 1} increasing boundaries from 0, got {b}")
        self.experts = nn.ModuleList(experts)
        self.boundaries = b
        self.T = b[-1]
        # Inner boundaries for bucketize, kept as a plain tensor per device rather than a
        # buffer: checkpoints then hold only expert weights, and weight averaging that
        # also averages buffers (EMA with use_buffers=True) never meets an integer tensor.
        self._inner: dict[torch.device, torch.Tensor] = {}

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_index(self, t: torch.Tensor) -> torch.Tensor:
        """Owner of each timestep: n with b_n <= t < b_{n+1} (LongTensor, same shape as t)."""
        t = torch.as_tensor(t).contiguous()
        inner = self._inner.get(t.device)
        if inner is None:
            inner = self._inner[t.device] = torch.tensor(self.boundaries[1:-1], dtype=torch.long,
                                                         device=t.device)
        if t.is_floating_point():
            inner = inner.to(t.dtype)
        return torch.bucketize(t, inner, right=True)

    def forward(self,
                x: torch.Tensor,                                   # x_t [B, C, H, W]
                t: torch.Tensor | int,                             # timesteps [B] (or a scalar)
                expert: Optional[torch.Tensor | int] = None,       # override routing: int or LongTensor [B]
                ) -> torch.Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B).contiguous()
        if expert is None:
            idx = self.expert_index(t)
        elif isinstance(expert, int):
            return self.experts[expert](x, t)
        else:
            idx = torch.as_tensor(expert, device=x.device).long().expand(B)
        if self.num_experts == 1:
            return self.experts[0](x, t)
        present = torch.unique(idx).tolist()
        if len(present) == 1:                      # the sampling case: one t per batch
            return self.experts[present[0]](x, t)
        # Mixed batch: gather each expert's samples, run it once, undo the permutation.
        sels, outs = [], []
        for n in present:
            sel = (idx == n).nonzero().squeeze(1)
            sels.append(sel)
            outs.append(self.experts[n](x.index_select(0, sel), t.index_select(0, sel)))
        dtype = outs[0].dtype
        perm = torch.cat(sels)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(B, device=perm.device)
        return torch.cat([o.to(dtype) for o in outs]).index_select(0, inverse)


def build_denoiser(cfg: MemeConfig) -> MultiExpertDenoiser:
    """One network per ``cfg.experts`` entry (``meme.model.experts.build_network``), N = 1 allowed;
    the parts ``cfg.share`` names are one module for all experts (``meme.model.shared_parts``)."""
    cfg.validate()
    experts = [build_network(a, cfg.data) for a in cfg.experts]
    tie(experts, cfg.share, cfg.data)
    return MultiExpertDenoiser(experts, cfg.resolved_boundaries())


class SoftExpertSampler:
    """Training timesteps for soft experts (paper Sec. "Soft Expert Strategy").

    A sample for expert n lies in n's own interval with probability p_n and is otherwise
    uniform over all of [0, T); p_n = 1 is the hard-expert baseline. The fraction of
    draws inside the own interval is therefore p_n + (1 - p_n) * |I_n| / T.
    """

    def __init__(self,
                 cfg: MemeConfig,    # intervals (boundaries), p_n and T
                 ) -> None:
        self.T = cfg.diffusion.timesteps
        self.intervals = cfg.intervals()
        self.probs = cfg.resolved_probs()
        self.weights = cfg.interval_weights()
        self._lo = torch.tensor([lo for lo, _ in self.intervals], dtype=torch.long)
        self._width = torch.tensor([hi - lo for lo, hi in self.intervals], dtype=torch.long)
        self._p = torch.tensor(self.probs, dtype=torch.float64)

    @property
    def num_experts(self) -> int:
        return len(self.intervals)

    def sample(self,
               expert: int,                                   # which expert is being trained
               batch: int,                                    # number of timesteps
               generator: Optional[torch.Generator] = None,   # CPU generator keying the draw
               ) -> torch.Tensor:
        """LongTensor [batch] of t for one expert (on the CPU)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} outside [0, {self.num_experts})")
        return self._draw(torch.full((batch,), expert, dtype=torch.long), generator)

    def _draw(self, experts: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        n = experts.shape[0]
        own = torch.rand(n, generator=generator, dtype=torch.float64) < self._p[experts]
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        width = self._width[experts]
        t_own = self._lo[experts] + (u * width).long().clamp_max(width - 1)
        t_all = torch.randint(0, self.T, (n,), generator=generator)
        return torch.where(own, t_own, t_all)
