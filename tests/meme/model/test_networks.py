"""Networks: parameter counts against the paper, and tiny real models end to end."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from meme.model.blocks import AttentionBlock, IFormerBlock, ResBlock, timestep_embedding
from meme.model.config import ArchConfig, ConfigError, DataShape, head_step_grid
from meme.model.experts import build_network, count_params, wake_zero_init
from meme.model.references import TABLE4_HIGH_RATIOS, resolve

# Paper Table 3 (LDM-S / LDM-L, exact figures from latent-diffusion's code) and Table 4.
PAPER_LDM = {"ldm-s": 89.54e6, "ldm-l": 274.06e6}
PAPER_TABLE4 = [82.56e6, 82.85e6, 83.11e6, 83.32e6]

TINY = DataShape(channels=1, resolution=16, latent=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_unet(**kw) -> ArchConfig:
    return ArchConfig(kind="unet", base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attention_ds=(2,), head_channels=8, **kw)


def tiny_iunet(high=("1/2", "1/4"), pools=(2, 1), **kw) -> ArchConfig:
    return ArchConfig(kind="iunet", base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      head_channels=8, high_ratios=tuple(high), pool_strides=tuple(pools), **kw)


def wake(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """At init the network outputs exactly 0 and no gradient reaches anything but the last conv."""
    return wake_zero_init(net, seed)


def params(arch: ArchConfig, data: DataShape) -> int:
    with torch.device("meta"):  # shapes only: full-size models count in well under a second
        return count_params(build_network(arch, data))


# ---- parameter counts vs the paper ------------------------------------------------

@pytest.mark.parametrize("name", ["ldm-s", "ldm-l"])
def test_ldm_param_count_matches_paper(name):
    cfg = resolve(name)
    n = params(cfg.experts[0], cfg.data)
    assert abs(n - PAPER_LDM[name]) <= 0.005e6 + 1e-4 * PAPER_LDM[name]  # paper rounds to 0.01M


def test_table4_experts_match_paper_and_trend():
    cfg = resolve("meme-table4")
    ours = [params(e, cfg.data) for e in cfg.experts]
    for n, ref in zip(ours, PAPER_TABLE4):
        assert abs(n - ref) / ref < 0.005, (ours, PAPER_TABLE4)
    # More attention (lower d_h/d) in deeper stages costs parameters: counts rise with n.
    assert ours == sorted(ours) and len(set(ours)) == 4
    # Expert-to-expert increments track the paper's (0.29, 0.26, 0.21 M) within 0.05 M.
    for (a, b), (ra, rb) in zip(zip(ours, ours[1:]), zip(PAPER_TABLE4, PAPER_TABLE4[1:])):
        assert abs((b - a) - (rb - ra)) < 0.05e6


def test_iu_ldm_s_is_table4_expert_1():
    cfg = resolve("iu-ldm-s")
    assert cfg.experts[0].high_ratios == TABLE4_HIGH_RATIOS[0]
    assert params(cfg.experts[0], cfg.data) == params(resolve("meme-table4").experts[0], cfg.data)


def test_iformer_block_params_by_hand():
    d, d_h, emb = 64, 16, 128
    d_l, cat = d - d_h, (d - d_h) + 2 * d_h
    expected = (
        2 * d + emb * d + d                          # norm1, time projection
        + (d_h // 2) * d_h + 9 * d_h                 # eq 5: 1x1 to 2x (no bias), depthwise 3x3
        + (d_h // 2) * d_h + d_h                     # eq 4: max-pool, 1x1 to 2x
        + 3 * d_l * d_l + 3 * d_l                    # eq 6: qkv (no output projection)
        + 9 * cat + cat * d + d                      # eq 8: depthwise on Y_c, 1x1 back to d
        + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)  # norm2, MLP ratio 4
    )
    assert count_params(IFormerBlock(d, d_h, emb, head_channels=16, pool_stride=2)) == expected
    # d_h = 0: pure attention mixer, no high branch.
    expected0 = 2 * d + emb * d + d + 3 * d * d + 3 * d + 9 * d + d * d + d + 2 * d + 8 * d * d + 5 * d
    assert count_params(IFormerBlock(d, 0, emb, head_channels=16)) == expected0


def test_resblock_and_attention_params_by_hand():
    cin, cout, emb = 32, 64, 128
    expected = (2 * cin + 9 * cin * cout + cout + emb * cout + cout + 2 * cout + 9 * cout * cout + cout
                + cin * cout + cout)
    assert count_params(ResBlock(cin, cout, emb)) == expected
    assert count_params(AttentionBlock(64, 32)) == 2 * 64 + 3 * 64 * 64 + 3 * 64 + 64 * 64 + 64


# ---- tiny real models -------------------------------------------------------------

@pytest.mark.parametrize("arch", [tiny_unet(), tiny_iunet()], ids=["unet", "iunet"])
def test_forward_shape_t_dependence_and_gradients(arch):
    torch.manual_seed(0)
    net = wake(build_network(arch, TINY))
    x = torch.randn(3, 1, 16, 16)
    t = torch.tensor([0, 500, 999])
    y = net(x, t)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # Output depends on t; float and int timesteps agree.
    assert not torch.allclose(net(x, torch.tensor([7, 7, 7])), net(x, torch.tensor([900, 900, 900])))
    torch.testing.assert_close(net(x, t.float()), y)
    # No mixing across the batch: each sample's output is its own.
    torch.testing.assert_close(net(x[1:2], t[1:2]), y[1:2], atol=1e-5, rtol=1e-4)
    # Every parameter receives a gradient.
    y.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_fresh_network_predicts_zero():
    """Zero-init output conv (LDM): an untrained denoiser starts at eps = 0."""
    net = build_network(tiny_iunet(), TINY)
    assert net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2])).abs().max() == 0


def test_channels_last_input_gives_same_output():
    net = wake(build_network(tiny_iunet(), TINY))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 800])
    y = net(x, t)
    net_cl = net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net_cl(x.to(memory_format=torch.channels_last), t), y, atol=1e-5, rtol=1e-4)


def test_low_precision_runs():
    """bf16 under autocast and as bf16 weights (norms still computed in fp32)."""
    net = wake(build_network(tiny_iunet(), TINY))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 900])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(net(x, t).float()).all()
    y = net.to(torch.bfloat16)(x.bfloat16(), t)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("high,pools", [
    (("0", "0"), (1, 1)),          # pure attention (d_h = 0), no pooling
    (("3/4", "7/8"), (2, 2)),      # conv-heavy, pooled attention
    (("1/2", "0"), (4, 1)),        # stride 4 at 16x16
])
def test_iunet_variants_run(high, pools):
    net = wake(build_network(tiny_iunet(high, pools), TINY))
    x = torch.randn(2, 1, 16, 16)
    assert net(x, torch.tensor([1, 2])).shape == x.shape


@pytest.mark.parametrize("width", [32, 64])
def test_every_head_step_ratio_builds_and_runs(width):
    heads = 8
    x = torch.randn(1, width, 8, 8)
    emb = torch.randn(1, 16)
    for r in head_step_grid(width, heads):
        d_h = int(r * width)
        for stride in (1, 2):
            block = IFormerBlock(width, d_h, 16, head_channels=heads, pool_stride=stride)
            assert block(x, emb).shape == x.shape, (r, stride)
    # And as whole networks: every grid ratio is accepted by config validation.
    for r in head_step_grid(32, heads):
        build_network(tiny_iunet((str(r), str(Fraction(1, 8))), (2, 1)), TINY)


def test_printed_model_shows_resolutions():
    for arch in (tiny_unet(), tiny_iunet()):
        text = str(build_network(arch, TINY))
        for key in ("16x16_conv", "16x16_block0", "8x8_down", "8x8_block0", "8x8_mid0", "8x8_up"):
            assert f"({key})" in text, (arch.kind, key)
    assert "AttentionBlock" in str(build_network(tiny_unet(), TINY))


def test_iunet_decoder_has_attention_only_in_the_middle():
    net = build_network(tiny_iunet(), TINY)
    attn = [n for n, m in net.named_modules() if isinstance(m, AttentionBlock)]
    assert attn == ["decoder.mid.8x8_mid0.attn"]


def test_bad_resolution_is_a_config_error():
    with pytest.raises(ConfigError, match="divisible"):
        build_network(tiny_unet(), DataShape(channels=1, resolution=15, latent=False))


def test_timestep_embedding_is_cos_sin():
    e = timestep_embedding(torch.tensor([0.0, 1.0]), 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    torch.testing.assert_close(e[1, 0], torch.cos(torch.tensor(1.0)))


def test_full_size_iunet_forward_batch1():
    cfg = resolve("iu-ldm-s")
    net = build_network(cfg.experts[0], cfg.data).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 3, 64, 64), torch.tensor([500]))
    assert y.shape == (1, 3, 64, 64)


def test_layer_scale_option_adds_two_vectors_per_iformer_block():
    from meme.model.iunet import IUNet
    arch = tiny_iunet()
    plain, scaled = IUNet(arch, TINY), IUNet(arch, TINY, layer_scale=1e-5)
    widths = arch.stage_channels()
    assert count_params(scaled) - count_params(plain) == sum(2 * d * arch.num_res_blocks for d in widths)
    y = wake(scaled)(torch.randn(1, 1, 16, 16), torch.tensor([5]))
    assert y.shape == (1, 1, 16, 16)
