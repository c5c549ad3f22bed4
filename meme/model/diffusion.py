"""DDPM forward process, epsilon-prediction loss, and DDIM / DDPM reverse steps.

Notation follows DDPM (Ho et al. 2020) and DDIM (Song et al. 2021): ``alpha_bar_t`` is
``alphas_cumprod[t]`` for integer ``t in [0, T)``; ``t_prev = -1`` stands for the clean
end of the chain (``alpha_bar = 1``).

Samplers are exposed as single steps (``ddim_step``, ``ddpm_step``); the one chain that
runs them is ``meme.sampling.sample.generate`` (keyed noise, low-memory expert-major order, fast
paths), used by ``meme.sampling.sample``, the trainer's grids and FID trials alike.

Respacing. ``ddpm_step(..., t_prev)`` with ``steps < T`` runs *respaced ancestral* steps
(improved DDPM, Nichol & Dhariwal 2021, Sec. 4): on the sub-sequence from
:meth:`ddim_timesteps` the betas are recomputed as ``1 - alpha_bar_t / alpha_bar_prev``
and the usual posterior is used. This is exactly DDIM with ``eta = 1``; with
``steps == T`` it is the original DDPM sampler.

Coefficients are computed in float64 and stored as float32 tensors (``betas``,
``alphas_cumprod``), like the reference implementations; the reverse steps take their
scalar coefficients from the float64 values.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from meme.model.config import DiffusionConfig

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddim", "ddpm")


# DDPM Sec. 4 / LDM "linear": the beta schedule (float64).
def make_betas(cfg: DiffusionConfig) -> np.ndarray:
    T = cfg.timesteps
    if cfg.schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float64)
    if cfg.schedule == "sqrt_linear":
        return np.linspace(math.sqrt(cfg.beta_start), math.sqrt(cfg.beta_end), T, dtype=np.float64) ** 2
    raise ValueError(f"unknown beta schedule {cfg.schedule!r}")


class Diffusion:
    """The fixed (parameter-free) part of a DDPM: schedule, noising, loss, samplers."""

    def __init__(self,
                 cfg: DiffusionConfig,    # T, beta schedule and its end points
                 ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.T = cfg.timesteps
        betas = make_betas(cfg)
        ac = np.cumprod(1.0 - betas)
        self._ac64 = ac                                          # float64, for sampler scalars
        self.betas = torch.from_numpy(betas).float()
        self.alphas_cumprod = torch.from_numpy(ac).float()
        self._sqrt_ac = torch.from_numpy(np.sqrt(ac)).float()
        self._sqrt_1m_ac = torch.from_numpy(np.sqrt(1.0 - ac)).float()
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ---- helpers -------------------------------------------------------------
    def _gather(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Per-sample coefficient ``name[t]`` shaped [B, 1, 1, ...] on t's device."""
        key = (name, t.device)
        table = self._on_device.get(key)
        if table is None:
            table = self._on_device[key] = getattr(self, name).to(t.device)
        return table[t.long()].reshape(-1, *([1] * (ndim - 1)))

    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t as a float64 scalar; t = -1 is the clean end (1.0)."""
        if not -1 <= t < self.T:
            raise ValueError(f"timestep {t} outside [-1, {self.T})")
        return 1.0 if t < 0 else float(self._ac64[t])

    # ---- forward process and loss --------------------------------------------
    # DDPM eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (self._gather("_sqrt_ac", t, x0.ndim) * x0
                + self._gather("_sqrt_1m_ac", t, x0.ndim) * noise)

    # DDPM eq. 14 (L_simple): || eps - eps_theta(x_t, t) ||^2.
    def training_loss(self,
                      model: Denoiser,                           # (x_t, t) -> eps prediction
                      x0: torch.Tensor,                          # clean data [B, C, H, W]
                      t: torch.Tensor,                           # LongTensor [B] of timesteps
                      noise: Optional[torch.Tensor] = None,      # eps; drawn if None
                      reduction: str = "mean",                   # 'mean' scalar or 'none' per sample [B]
                      ) -> torch.Tensor:
        if noise is None:
            noise = torch.randn_like(x0)
        eps = model(self.q_sample(x0, t, noise), t)
        err = F.mse_loss(eps.float(), noise.float(), reduction="none")
        if reduction == "mean":
            return err.mean()
        if reduction == "none":
            return err.flatten(1).mean(1)
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")

    # ---- reverse process -----------------------------------------------------
    def ddim_timesteps(self, steps: int) -> list[int]:
        """DDIM 'uniform' sub-sequence, descending and ending at 0: (steps-1)c, ..., c, 0 with c = T // steps."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"sampling steps must be in [1, {self.T}], got {steps}")
        c = self.T // steps
        return list(range(c * (steps - 1), -1, -c))

    # DDIM eq. 12 with sigma_t(eta) from eq. 16.
    def ddim_step(self,
                  x: torch.Tensor,                       # x_t
                  t: int,                                # current timestep
                  t_prev: int,                           # next (smaller) timestep; -1 = clean end
                  eps: torch.Tensor,                     # eps_theta(x_t, t)
                  eta: float = 0.0,                      # 0 = deterministic DDIM, 1 = ancestral (DDPM)
                  noise: Optional[torch.Tensor] = None,  # z ~ N(0, I); required when eta > 0
                  clip_x0: bool = False,                 # clamp the x_0 estimate to [-1, 1] (pixels)
                  ) -> torch.Tensor:
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        if t_prev >= t:
            raise ValueError(f"t_prev ({t_prev}) must be smaller than t ({t})")
        eps = eps.to(x.dtype)
        x0 = self._predict_x0(x, a_t, eps, clip_x0)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        out = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0.0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs noise")
            out = out + sigma * noise.to(x)
        return out

    # DDPM eq. 11 (ancestral), written via the posterior mean of eq. 7 so x_0 can be
    # clipped; sigma_t^2 = beta_tilde_t. t_prev < t - 1 gives respaced betas (IDDPM Sec. 4).
    def ddpm_step(self,
                  x: torch.Tensor,                       # x_t
                  t: int,                                # current timestep
                  eps: torch.Tensor,                     # eps_theta(x_t, t)
                  noise: Optional[torch.Tensor] = None,  # z ~ N(0, I); unused at the last step
                  t_prev: Optional[int] = None,          # default t - 1 (plain DDPM)
                  clip_x0: bool = False,                 # clamp the x_0 estimate to [-1, 1] (pixels)
                  ) -> torch.Tensor:
        t_prev = t - 1 if t_prev is None else t_prev
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        if t_prev >= t:
            raise ValueError(f"t_prev ({t_prev}) must be smaller than t ({t})")
        beta = 1.0 - a_t / a_prev
        eps = eps.to(x.dtype)
        x0 = self._predict_x0(x, a_t, eps, clip_x0)
        c0 = math.sqrt(a_prev) * beta / (1.0 - a_t)
        ct = math.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_t)
        out = c0 * x0 + ct * x
        var = beta * (1.0 - a_prev) / (1.0 - a_t)
        if var > 0.0:
            if noise is None:
                raise ValueError("ddpm_step before the last step needs noise")
            out = out + math.sqrt(var) * noise.to(x)
        return out

    # DDPM eq. 15 / DDIM "predicted x_0": x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar).
    @staticmethod
    def _predict_x0(x: torch.Tensor, a_t: float, eps: torch.Tensor, clip: bool) -> torch.Tensor:
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        return x0.clamp(-1.0, 1.0) if clip else x0
