"""Diffusion schedules, forward process and reverse steps, checked against hand formulas."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from meme.model.config import DiffusionConfig
from meme.model.diffusion import Diffusion
from meme.model.experts import MultiExpertDenoiser
from meme.sampling.sample import SamplingPlan, generate, keyed_noise
from tests.tiny_models import TinyEps

LDM = DiffusionConfig(timesteps=1000, schedule="sqrt_linear", beta_start=0.0015, beta_end=0.0195)
DDPM = DiffusionConfig.ddpm_pixels()




class CountingExpert(TinyEps):
    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def forward(self, x, t):
        self.seen.update(t.tolist())
        return super().forward(x, t)


def test_linear_schedule_matches_ddpm():
    d = Diffusion(DDPM)
    assert d.betas.dtype == torch.float32 and d.betas.shape == (1000,)
    assert d.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert d.betas[-1].item() == pytest.approx(2e-2, rel=1e-6)
    assert d.betas[1].item() == pytest.approx(1e-4 + (2e-2 - 1e-4) / 999, rel=1e-6)
    assert d.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, rel=1e-7)
    assert d.alphas_cumprod[1].item() == pytest.approx((1 - 1e-4) * (1 - d.betas[1].item()), rel=1e-6)
    # Known value for DDPM's schedule: alpha_bar_T ~ 4.04e-5.
    expected = np.prod(1 - np.linspace(1e-4, 2e-2, 1000))
    assert d.alphas_cumprod[-1].item() == pytest.approx(expected, rel=1e-5)
    assert 4.0e-5 < expected < 4.1e-5


def test_sqrt_linear_schedule_matches_ldm():
    d = Diffusion(LDM)
    assert d.betas[0].item() == pytest.approx(0.0015, rel=1e-6)
    assert d.betas[-1].item() == pytest.approx(0.0195, rel=1e-6)
    mid = (math.sqrt(0.0015) + (math.sqrt(0.0195) - math.sqrt(0.0015)) * 500 / 999) ** 2
    assert d.betas[500].item() == pytest.approx(mid, rel=1e-6)
    ac = np.cumprod(1 - np.linspace(math.sqrt(0.0015), math.sqrt(0.0195), 1000) ** 2)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ac, rtol=1e-6)
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])


def test_q_sample_statistics():
    d = Diffusion(LDM)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.5)
    for t in (0, 300, 999):
        noise = torch.randn(x0.shape, generator=g)
        xt = d.q_sample(x0, torch.full((n,), t), noise)
        a = d.alphas_cumprod[t].item()
        # mean sqrt(a) x0, std sqrt(1 - a); tolerance 5 standard errors
        assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.5, abs=5 * math.sqrt((1 - a) / n))
        assert xt.std().item() == pytest.approx(math.sqrt(1 - a), rel=0.01)
    # per-sample t in one batch: exact formula
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    xt = d.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        a = d.alphas_cumprod[ti].item()
        torch.testing.assert_close(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i])


def test_training_loss_is_mse_on_eps():
    d = Diffusion(LDM)
    torch.manual_seed(0)
    model = TinyEps()
    x0, noise = torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8)
    t = torch.tensor([1, 10, 100, 999])
    loss = d.training_loss(model, x0, t, noise)
    eps = model(d.q_sample(x0, t, noise), t)
    assert loss.item() == pytest.approx(((eps - noise) ** 2).mean().item(), rel=1e-6)
    per = d.training_loss(model, x0, t, noise, reduction="none")
    assert per.shape == (4,) and per.mean().item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert model.conv.weight.grad is not None


def test_ddim_timesteps_uniform_descending():
    d = Diffusion(LDM)
    ts = d.ddim_timesteps(50)
    assert ts == list(range(980, -1, -20))
    assert d.ddim_timesteps(1000) == list(range(999, -1, -1))
    assert d.ddim_timesteps(3) == [666, 333, 0]
    with pytest.raises(ValueError):
        d.ddim_timesteps(0)


def test_ddim_step_with_true_noise_recovers_x0():
    """x_t built from (x0, eps); one eta=0 step to t_prev = -1 must return x0 exactly."""
    d = Diffusion(LDM)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for t in (0, 250, 999):
        xt = d.q_sample(x0, torch.full((2,), t), eps)
        out = d.ddim_step(xt, t, -1, eps, eta=0.0)
        torch.testing.assert_close(out, x0, atol=2e-4 if t == 999 else 1e-5, rtol=1e-5)
        # to an intermediate t_prev: lands on the same trajectory, q_sample(x0, t_prev, eps)
        if t > 0:
            tp = t // 2
            mid = d.ddim_step(xt, t, tp, eps, eta=0.0)
            torch.testing.assert_close(mid, d.q_sample(x0, torch.full((2,), tp), eps), atol=1e-4, rtol=1e-4)


def test_ddpm_step_equals_ddim_eta1_and_hand_formula():
    d = Diffusion(DDPM)
    g = torch.Generator().manual_seed(2)
    x, eps, z = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    t = 600
    beta, a_t = d.betas[t].item(), d.alphas_cumprod[t].item()
    a_prev = d.alphas_cumprod[t - 1].item()
    # DDPM eq. 11 with sigma^2 = beta_tilde
    hand = (x - beta / math.sqrt(1 - a_t) * eps) / math.sqrt(1 - beta) \
        + math.sqrt(beta * (1 - a_prev) / (1 - a_t)) * z
    torch.testing.assert_close(d.ddpm_step(x, t, eps, z), hand, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(d.ddim_step(x, t, t - 1, eps, eta=1.0, noise=z), hand, atol=1e-5, rtol=1e-4)
    # respaced: t -> t_prev far below
    torch.testing.assert_close(d.ddpm_step(x, t, eps, z, t_prev=200),
                               d.ddim_step(x, t, 200, eps, eta=1.0, noise=z), atol=1e-5, rtol=1e-4)
    # last step adds no noise
    torch.testing.assert_close(d.ddpm_step(x, 0, eps, None), d.ddim_step(x, 0, -1, eps, 0.0))


def _plan(**kw) -> SamplingPlan:
    return SamplingPlan(**{"n": 2, "steps": 10, "batch_size": 2, **kw})


def test_ddim_eta0_sampling_is_the_hand_chain_and_deterministic():
    """generate() = x_T from the plan's keyed noise, then ddim_step down the DDIM timesteps."""
    d = Diffusion(LDM)
    torch.manual_seed(0)
    model = TinyEps().eval()
    den = MultiExpertDenoiser([model], [0, 1000]).eval()
    shape = (2, 8, 8)
    a = generate(den, d, shape, _plan(seed=5), precision="fp32")
    b = generate(den, d, shape, _plan(seed=5), precision="fp32")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = keyed_noise(5, 0, -1, (2, *shape))
    ts = d.ddim_timesteps(10)
    with torch.no_grad():
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            x = d.ddim_step(x, t, t_prev, model(x, torch.full((2,), t)), 0.0)
    torch.testing.assert_close(a, x, rtol=1e-5, atol=1e-5)
    # ancestral sampling draws fresh noise at every step: another seed, other samples
    f = generate(den, d, shape, _plan(seed=5, sampler="ddpm"), precision="fp32")
    h = generate(den, d, shape, _plan(seed=6, sampler="ddpm"), precision="fp32")
    assert not torch.equal(f, h) and torch.isfinite(f).all()


def test_sampler_switches_experts_at_boundaries():
    d = Diffusion(LDM)
    torch.manual_seed(0)
    experts = [CountingExpert() for _ in range(4)]
    den = MultiExpertDenoiser(experts, [0, 250, 500, 750, 1000]).eval()
    generate(den, d, (2, 8, 8), SamplingPlan(n=3, steps=50, batch_size=3), precision="fp32")
    # DDIM steps are 980, 960, ..., 0: 13 in [0,250), 12 in [250,500), 13 in [500,750), 12 in [750,1000)
    assert [sum(e.seen.values()) // 3 for e in experts] == [13, 12, 13, 12]
    ts = d.ddim_timesteps(50)
    for n, (lo, hi) in enumerate([(0, 250), (250, 500), (500, 750), (750, 1000)]):
        assert sorted(experts[n].seen) == sorted(t for t in ts if lo <= t < hi)
        assert all(c == 3 for c in experts[n].seen.values())
