"""Parts all experts hold in common (MemeConfig.share, meme.model.shared_parts): one module object,
counted once, trained by every expert's steps, and every path (YAML, checkpoints, EMA,
low-memory sampling, branching) keeping it one, with real tiny networks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meme.common.errors import UserError
from meme.model.config import ArchConfig, ConfigError, DataShape, DiffusionConfig, MemeConfig, ShareConfig
from meme.model.diffusion import Diffusion
from meme.model.experts import build_denoiser, count_params, wake_zero_init
from meme.model.macs import cost_of_meme
from meme.model.shared_parts import move_private, shared_modules, shared_paths
from meme.sampling.sample import SamplingPlan, generate, load_run
from meme.training.train import Trainer, TrainOptions, train

pytestmark = pytest.mark.usefixtures("one_thread")


def iunet(ratios=("1/2", "1/4"), pools=(2, 1)) -> ArchConfig:
    return ArchConfig(kind="iunet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1, head_channels=4,
                      high_ratios=ratios, pool_strides=pools)


def meme(*archs: ArchConfig, share: ShareConfig = ShareConfig()) -> MemeConfig:
    return MemeConfig(name="shared", experts=tuple(archs), data=DataShape(1, 16, False),
                      diffusion=DiffusionConfig.ddpm_pixels(), expert_probs=(0.8, 0.4, 0.2)[:len(archs)],
                      share=share).validate()


DEC = ShareConfig(decoder_levels=2)                          # the whole decoder of a 2-stage network
ENC_DEC = ShareConfig(encoder_stages=1, mid=True, decoder_levels=2, time_embed=True)
A, B = iunet(("1/2", "1/4")), iunet(("1/2", "1/2"), (2, 2))    # stage 0 alike, stage 1 different


def opts(data: Path, **kw) -> TrainOptions:
    base = dict(data=str(data), steps=6, batch_size=4, lr=1e-3, warmup=2, ckpt_every=100, sample_every=0,
                log_every=1, device="cpu")
    base.update(kw)
    return TrainOptions(**base)


def test_shared_parts_are_one_object_and_counted_once():
    cfg = meme(A, B, A, share=ENC_DEC)
    den = build_denoiser(cfg)
    e0, e1, e2 = den.experts
    for path in ("time_embed", "enc.16x16_conv", "enc.16x16_block0", "decoder.mid", "decoder.dec.8x8_up",
                 "decoder.out"):
        assert e0.get_submodule(path) is e1.get_submodule(path) is e2.get_submodule(path), path
    assert e0.get_submodule("enc.8x8_block0") is not e1.get_submodule("enc.8x8_block0")   # stage 1 is not shared
    # by hand: three separate experts, minus two copies of every shared part
    separate = [count_params(build_denoiser(meme(a)).experts[0]) for a in (A, B, A)]
    part = sum(count_params(e0.get_submodule(p)) for p in shared_paths(ENC_DEC, cfg.data, e0))
    assert count_params(den) == sum(separate) - 2 * part
    cost = cost_of_meme(cfg)
    assert cost.params_total == sum(separate) and cost.params_unique == count_params(den)
    assert cost.gflops_mean == cost_of_meme(meme(A, B, A)).gflops_mean       # per-step cost is unchanged
    assert len(den.state_dict()) == len(build_denoiser(meme(A, B, A)).state_dict())   # every expert's keys remain


def test_yaml_round_trip_and_one_line_refusals():
    cfg = meme(A, B, share=ShareConfig(encoder_stages=1, decoder_levels=1))
    text = cfg.to_yaml()
    assert "share:" in text and MemeConfig.from_yaml(text) == cfg
    assert "share" not in meme(A, B).to_dict()             # no sharing writes nothing: old hashes hold
    assert meme(A, B).hash() == meme(A, B, share=ShareConfig()).hash()
    bad = {
        "share.encoder_stages=2 shares stages 0..1, but experts[1].high_ratios[:2]": dict(encoder_stages=2),
        "share.decoder_levels must lie in [0, 2]": dict(decoder_levels=3),
        "share.encoder_stages must lie in [0, 2]": dict(encoder_stages=-1),
        "unknown field(s) ['decoder']": dict(decoder=True),
        "share.mid must be true or false": dict(mid="yes"),
    }
    base = cfg.to_dict()
    for msg, share in bad.items():
        with pytest.raises(ConfigError) as err:
            MemeConfig.from_dict({**base, "share": share}, "cfg.yaml")
        assert msg in str(err.value) and "\n" not in str(err.value), str(err.value)
    wide = ArchConfig(**{**A.__dict__, "base_channels": 32})
    with pytest.raises(ConfigError, match=r"experts\[1\]\.base_channels=32 differs"):
        meme(A, wide, share=DEC)
    unet = ArchConfig(kind="unet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1, head_channels=4,
                      attention_ds=(2,))
    with pytest.raises(ConfigError, match="put attention at different levels"):
        meme(A, unet, share=DEC)
    meme(A, unet, share=ShareConfig(time_embed=True))      # the time MLP is one shape for both kinds


def test_a_shared_part_is_trained_by_every_experts_steps(tmp_path, blobs):
    """Each step trains one expert; the shared decoder moves on every step, an expert's own
    encoder only on its own, and AdamW keeps one set of moments for the shared part."""
    tr = Trainer(meme(A, B, share=DEC), opts(blobs), tmp_path)
    wake_zero_init(tr.model)           # zero-init output convs would leave every other gradient at zero
    shared = tr.model.experts[0].decoder.out.conv.weight
    own = [e.get_submodule("enc.16x16_conv").conv.weight for e in tr.model.experts]
    assert shared is tr.model.experts[1].decoder.out.conv.weight
    for step in range(4):
        before = [shared.detach().clone()] + [w.detach().clone() for w in own]
        e, _ = tr.step()
        assert e == step % 2
        assert not torch.equal(shared, before[0]), f"the shared decoder did not move on expert {e}'s step"
        assert not torch.equal(own[e], before[1 + e])
        assert torch.equal(own[1 - e], before[2 - e]), "the other expert's own weights moved"
    assert int(tr.opt.state[shared]["step"]) == 4              # one state, stepped by both experts
    assert int(tr.opt.state[own[0]]["step"]) == 2
    assert tr.ema.module.experts[0].decoder.out is tr.ema.module.experts[1].decoder.out   # the EMA copy keeps the tie


@pytest.mark.parametrize("schedule", ["interleaved", "sequential"])
def test_checkpoint_resume_and_sampling_keep_the_tie(tmp_path, blobs, schedule):
    cfg = meme(A, B, share=ENC_DEC)
    straight = train(cfg, opts(blobs, schedule=schedule), tmp_path / "straight", progress=False)
    tr = Trainer(cfg, opts(blobs, schedule=schedule), tmp_path / "resumed")
    for _ in range(3):
        tr.step()
    tr.save()
    resumed = train(cfg, opts(blobs, schedule=schedule), tmp_path / "resumed", resume=True, progress=False)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    _, den, step = load_run(tmp_path / "resumed")
    assert step == 6 and den.experts[0].decoder.mid is den.experts[1].decoder.mid
    plan = SamplingPlan(n=3, steps=4, seed=5, batch_size=2, clip_x0=True)
    diffusion = Diffusion(cfg.diffusion)
    normal = generate(den, diffusion, (1, 16, 16), plan, "cpu")
    low = generate(den, diffusion, (1, 16, 16), plan, "cpu", low_memory=True)
    assert torch.equal(normal, low)


def test_low_memory_moves_an_expert_but_leaves_the_shared_parts_resident():
    """The device a low-memory sampler moves experts between is stood in for by 'meta':
    what moved loses its storage, what stayed keeps it."""
    den = build_denoiser(meme(A, B, share=ENC_DEC))
    shared = shared_modules(den.experts)
    assert {type(m).__name__ for m in shared} >= {"TimeEmbedding", "OutputHead"}
    move_private(den.experts[1], "meta", keep=shared)
    assert all(not p.is_meta for m in shared for p in m.parameters())
    assert den.experts[1].get_submodule("enc.8x8_block0").norm1.weight.is_meta
    assert not den.experts[0].get_submodule("enc.8x8_block0").norm1.weight.is_meta


def test_branching_with_shared_parts_carries_one_moment_per_parameter(tmp_path, blobs):
    tr = Trainer(meme(A, B, share=DEC), opts(blobs, branch_at=0.5), tmp_path)
    for _ in range(3):
        tr.step()
    assert tr.parent is None
    shared = tr.model.experts[0].decoder.out.conv.weight
    assert shared is tr.model.experts[1].decoder.out.conv.weight
    assert len(tr.opt.state) == len(list(tr.model.parameters()))   # every unique parameter, once
    assert int(tr.opt.state[shared]["step"]) == 3
    tr.step()


def test_expert_parallel_refuses_experts_that_share_parts(tmp_path, blobs):
    """Expert-parallel groups train experts apart; a shared part needs every expert's steps."""
    with pytest.raises(UserError, match="shares parts between them"):
        Trainer(meme(A, B, share=DEC), opts(blobs, expert_parallel=True), tmp_path)
