"""Routing of mixed batches to timestep experts, and soft-expert timestep statistics."""
from __future__ import annotations

import math

import pytest
import torch

from meme.model.config import ArchConfig, DataShape, DiffusionConfig, MemeConfig
from meme.model.experts import MultiExpertDenoiser, SoftExpertSampler, build_denoiser
from tests.tiny_models import TinyEps


def meme_cfg(n: int = 4, probs=(0.8, 0.4, 0.2, 0.1), boundaries=()) -> MemeConfig:
    arch = ArchConfig(kind="unet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_ds=(2,), head_channels=16)
    return MemeConfig(name="tiny", experts=(arch,) * n, data=DataShape(channels=2, resolution=8, latent=False),
                      diffusion=DiffusionConfig(), boundaries=tuple(boundaries),
                      expert_probs=tuple(probs)).validate()


def tiny_denoiser(boundaries=(0, 250, 500, 750, 1000)) -> MultiExpertDenoiser:
    torch.manual_seed(0)
    return MultiExpertDenoiser([TinyEps() for _ in range(len(boundaries) - 1)], list(boundaries))


def test_expert_index_follows_half_open_intervals():
    den = tiny_denoiser((0, 100, 600, 1000))
    t = torch.tensor([0, 99, 100, 599, 600, 999])
    assert den.expert_index(t).tolist() == [0, 0, 1, 1, 2, 2]
    assert den.expert_index(torch.tensor([99.5, 100.0])).tolist() == [0, 1]


def test_mixed_batch_routing_equals_each_expert_on_its_samples():
    den = tiny_denoiser()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 2, 8, 8, generator=g)
    t = torch.tensor([999, 0, 300, 260, 740, 10, 500, 751, 249])
    out = den(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype
    owner = [3, 0, 1, 1, 2, 0, 2, 3, 0]
    for i in range(9):
        ref = den.experts[owner[i]](x[i: i + 1], t[i: i + 1])
        torch.testing.assert_close(out[i: i + 1], ref)
    # gradients reach exactly the experts present in the batch
    den(x[:2], t[:2]).sum().backward()
    assert [e.conv.weight.grad is not None for e in den.experts] == [True, False, False, True]


def test_single_interval_batch_and_expert_override():
    den = tiny_denoiser()
    x = torch.randn(4, 2, 8, 8)
    t = torch.full((4,), 600)
    torch.testing.assert_close(den(x, t), den.experts[2](x, t))
    torch.testing.assert_close(den(x, 600), den.experts[2](x, t))
    # soft-expert training: expert 0 on a t outside its interval
    torch.testing.assert_close(den(x, t, expert=0), den.experts[0](x, t))
    idx = torch.tensor([3, 1, 3, 0])
    out = den(x, t, expert=idx)
    for i, n in enumerate(idx.tolist()):
        torch.testing.assert_close(out[i: i + 1], den.experts[n](x[i: i + 1], t[i: i + 1]))


def test_one_expert_denoiser():
    den = tiny_denoiser((0, 1000))
    x = torch.randn(3, 2, 8, 8)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(den(x, t), den.experts[0](x, t))
    assert den.expert_index(t).tolist() == [0, 0, 0]


def test_bad_boundaries_are_rejected():
    with pytest.raises(ValueError):
        MultiExpertDenoiser([TinyEps(), TinyEps()], [0, 500])
    with pytest.raises(ValueError):
        MultiExpertDenoiser([TinyEps(), TinyEps()], [0, 600, 500])


def test_state_dict_and_buffers_hold_only_expert_tensors():
    den = tiny_denoiser()
    assert all(k.startswith("experts.") for k in den.state_dict())
    assert all(k.startswith("experts.") for k, _ in den.named_buffers())
    # EMA that averages buffers too (as meme.training.train does) works on a denoiser
    ema = torch.optim.swa_utils.AveragedModel(den, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9),
                                              use_buffers=True)
    ema.update_parameters(den)
    ema.update_parameters(den)


def test_build_denoiser_from_config():
    """Real networks of two kinds behind one denoiser; routing matches direct calls."""
    unet = ArchConfig(kind="unet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_ds=(2,), head_channels=16)
    iunet = ArchConfig(kind="iunet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       head_channels=8, high_ratios=("1/2", "1/4"), pool_strides=(2, 1))
    cfg = MemeConfig(name="mixed", experts=(iunet, unet), data=DataShape(channels=2, resolution=8, latent=False),
                     boundaries=(0, 300, 1000)).validate()
    torch.manual_seed(0)
    den = build_denoiser(cfg).eval()
    assert den.num_experts == 2 and den.boundaries == [0, 300, 1000]
    x = torch.randn(3, 2, 8, 8)
    t = torch.tensor([900, 10, 299])
    with torch.no_grad():
        out = den(x, t)
        assert out.shape == x.shape
        torch.testing.assert_close(out[1:], den.experts[0](x[1:], t[1:]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[:1], den.experts[1](x[:1], t[:1]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("boundaries", [(), (0, 100, 300, 600, 1000)])
def test_soft_expert_frequencies(boundaries):
    cfg = meme_cfg(boundaries=boundaries)
    s = SoftExpertSampler(cfg)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    T = cfg.diffusion.timesteps
    for e, ((lo, hi), p) in enumerate(zip(cfg.intervals(), cfg.resolved_probs())):
        t = s.sample(e, n, generator=g)
        assert t.dtype == torch.long and t.shape == (n,)
        assert t.min() >= 0 and t.max() < T
        q = p + (1 - p) * (hi - lo) / T
        frac = ((t >= lo) & (t < hi)).float().mean().item()
        assert abs(frac - q) < 4 * math.sqrt(q * (1 - q) / n), (e, frac, q)
        # outside the own interval the draw is uniform: mean of the outside part
        out = t[(t < lo) | (t >= hi)].double()
        if out.numel():
            outside = [v for v in range(T) if not lo <= v < hi]
            assert out.mean().item() == pytest.approx(sum(outside) / len(outside), rel=0.02)


def test_hard_experts_stay_in_their_interval():
    cfg = meme_cfg(probs=(1.0, 1.0, 1.0, 1.0))
    s = SoftExpertSampler(cfg)
    g = torch.Generator().manual_seed(1)
    for e, (lo, hi) in enumerate(cfg.intervals()):
        t = s.sample(e, 50_000, generator=g)
        assert t.min().item() == lo and t.max().item() == hi - 1
        # uniform inside: every value of the interval appears
        assert torch.unique(t).numel() == hi - lo


def test_sample_is_reproducible_with_generator():
    s = SoftExpertSampler(meme_cfg())
    a = s.sample(2, 100, generator=torch.Generator().manual_seed(3))
    b = s.sample(2, 100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
