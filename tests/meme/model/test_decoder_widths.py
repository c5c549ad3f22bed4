"""Experts of different widths (``ArchConfig.decoder_channels``): Multistage's shape, one
encoder shared by experts whose decoders have widths of their own, with real tiny networks.
Its cost by parts, its shared parts counted once, its YAML, and the weighted schedule that
trains it at the compute of one network of its per-step cost."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from meme.common.errors import UserError
from meme.model.config import ArchConfig, ConfigError, DataShape, DiffusionConfig, MemeConfig, ShareConfig
from meme.model.experts import build_denoiser, build_network, count_params, wake_zero_init
from meme.model.macs import _count_arch, clear_caches, cost_of_meme, cost_of_network
from meme.model.references import resolve
from meme.model.shared_parts import shared_paths
from meme.training.branching import parent_network, parent_spec
from meme.training.compute import run_compute, steps_per_expert, train_gflops_per_step, weighted_order
from meme.training.train import Trainer, TrainOptions, train

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = DataShape(1, 16, False)
ENC_MID = ShareConfig(encoder_stages=2, mid=True)


def iunet(decoder: int = 0, ratios=("1/2", "1/4"), base: int = 16) -> ArchConfig:
    return ArchConfig(kind="iunet", base_channels=base, channel_mult=(1, 2), num_res_blocks=1, head_channels=4,
                      high_ratios=ratios, pool_strides=(2, 1), group_channels=1, decoder_channels=decoder)


def meme(*archs: ArchConfig, share: ShareConfig = ENC_MID, bounds=()) -> MemeConfig:
    return MemeConfig(name="widths", experts=tuple(archs), data=DATA, diffusion=DiffusionConfig.ddpm_pixels(),
                      boundaries=bounds, share=share).validate()


WIDE, SAME, NARROW = iunet(32), iunet(), iunet(4)


def test_a_decoder_has_its_own_width_and_reads_the_encoders_skips():
    net = build_network(WIDE, DATA)
    assert net.enc["16x16_conv"].conv.out_channels == 16                    # the encoder is the base's
    assert net.decoder.mid["8x8_mid0"].res.out_layers[-1].out_channels == 32  # the middle: encoder's last stage
    # level 1 (8x8) of the decoder: 2 x 32 channels; its first block reads [middle 32 | skip 32]
    assert net.decoder.concat_channels["8x8_block0"] == (32, 32)
    assert net.decoder.dec["8x8_block0"].res.out_layers[-1].out_channels == 64
    # level 0 (16x16): 32 channels, reading [64 from below | the encoder's 16-channel skip]
    assert net.decoder.concat_channels["16x16_block0"] == (64, 16)
    assert net.decoder.out.conv.in_channels == 32
    x = torch.randn(2, 1, 16, 16)
    assert wake_zero_init(net)(x, torch.tensor([3, 700])).shape == x.shape


def test_a_decoder_as_wide_as_the_encoder_is_the_plain_network():
    assert iunet(16) == iunet(0) and iunet(16).decoder_channels == 0             # one way to write it
    assert "decoder_channels" not in meme(iunet(), share=ShareConfig()).to_dict()["experts"][0]   # old hashes stay


@pytest.mark.parametrize("decoder", [4, 8, 24, 32])
def test_cost_by_parts_equals_the_whole_count(decoder):
    """An iU-Net is priced as rest(macro) + its iFormer blocks; the decoder's width is part of
    the macro, so each width has its own rest and the sum matches a whole count exactly."""
    clear_caches()
    cost_of_network(iunet(), DATA)                          # the base width's rest is cached first
    arch = iunet(decoder, ("1/4", "1/4"))
    by_parts, whole = cost_of_network(arch, DATA), _count_arch(arch, DATA)
    assert (by_parts.macs, by_parts.macs_hooks, by_parts.params) == (whole.macs, whole.macs_hooks, whole.params)


def test_shared_encoder_is_counted_once_and_each_decoder_is_its_own():
    cfg = meme(WIDE, SAME, NARROW)
    den = build_denoiser(cfg)
    e0, e1, e2 = den.experts
    for path in ("enc.16x16_conv", "enc.8x8_block0", "decoder.mid"):
        assert e0.get_submodule(path) is e1.get_submodule(path) is e2.get_submodule(path), path
    assert [e.decoder.out.conv.in_channels for e in den.experts] == [32, 16, 4]
    separate = [count_params(build_network(a, DATA)) for a in (WIDE, SAME, NARROW)]
    part = sum(count_params(e0.get_submodule(p)) for p in shared_paths(cfg.share, DATA, e0))
    assert count_params(den) == sum(separate) - 2 * part                 # by hand: two copies of the encoder fewer
    cost = cost_of_meme(cfg)
    assert cost.params_total == sum(separate) and cost.params_unique == count_params(den)
    w = cfg.interval_weights()
    assert cost.gflops_mean == pytest.approx(sum(wi * cost_of_network(a, DATA).gflops
                                                 for wi, a in zip(w, (WIDE, SAME, NARROW))))


def test_yaml_round_trip_and_one_line_refusals(tmp_path):
    cfg = meme(WIDE, SAME, NARROW, bounds=(0, 200, 425, 1000))
    back = MemeConfig.load(cfg.save(tmp_path / "m.yaml"))
    assert back == cfg and back.hash() == cfg.hash()
    with pytest.raises(ConfigError, match=r"a shared decoder has one width.*share the encoder only"):
        meme(WIDE, SAME, share=ShareConfig(encoder_stages=2, decoder_levels=1))
    with pytest.raises(ConfigError, match=r"experts\[0\].decoder_channels must be a positive multiple of 8"):
        meme(dataclasses.replace(SAME, group_channels=0, decoder_channels=12), share=ShareConfig())
    with pytest.raises(ConfigError, match=r"shared parts need one macro shape.*base_channels"):
        meme(iunet(16, base=24), SAME)


def test_the_multistage_reference_costs_what_one_network_costs():
    ms = resolve("multistage-fmnist16")
    single = resolve("fmnist16-meme-small").experts[1]
    assert [e.decoder_stage_channels()[0] for e in ms.experts] == [32, 16, 4] and ms.share.describe() == "enc3+mid"
    assert cost_of_meme(ms).gflops_mean == pytest.approx(cost_of_network(single, ms.data).gflops, rel=0.01)


def test_narrower_decoders_are_cut_exactly_from_the_widest_parent():
    """Branching: one parent with the widest decoder; each expert is its slice, a narrower
    decoder by prefix per input segment (a block whose full width adds its input unchanged gets
    the identity's slice), with exactly the parameters of the expert built alone."""
    ms = resolve("multistage-fmnist16")
    spec = parent_spec(ms)
    assert spec.template.decoder_stage_channels()[0] == 32 and spec.decoder_channels == (4, 16)
    net = wake_zero_init(parent_network(ms))
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 300, 900])
    for arch in ms.experts:
        alone = build_network(arch, ms.data)
        cut = net.extract(arch)
        assert count_params(cut) == count_params(alone)
        assert torch.equal(net.run(arch, x, t), cut(x, t))
    state = net.sub_state_dict(ms.experts[2])    # 4 channels: every decoder block is C -> C' < C
    skip = state["decoder.dec.4x4_block0.res.skip.weight"][:, :, 0, 0]     # 8 of [32 from below | 32 skip]
    assert skip.shape == (8, 64) and torch.equal(skip, torch.eye(8, 64))
    with pytest.raises(ConfigError, match=r"decoder width 8 is not one of the supernet's \[4, 16, 32\]"):
        net.activate(dataclasses.replace(ms.experts[0], decoder_channels=8))
    with pytest.raises(ConfigError, match="need template.group_channels"):
        dataclasses.replace(spec, template=dataclasses.replace(spec.template, group_channels=0),
                            decoder_channels=(16,)).validate()


def test_a_branched_run_of_unequal_experts_costs_its_from_scratch_run(tmp_path, blobs):
    """Parent steps follow the weighted order too, so the parent phase is priced as the experts' steps."""
    cfg = meme(WIDE, SAME, NARROW, bounds=(0, 200, 425, 1000))
    opts = TrainOptions(data=str(blobs), steps=8, batch_size=4, lr=1e-3, warmup=2, ckpt_every=100, sample_every=0,
                        log_every=1, device="cpu", schedule="weighted", branch_at=0.5)
    tr = Trainer(cfg, opts, tmp_path / "branched")
    trained = [tr.step()[0] for _ in range(8)]               # parent steps 0-3, expert steps 4-7
    assert trained == weighted_order(cfg.interval_weights(), 8)
    per_step = train_gflops_per_step(cfg, 4)
    by_hand = sum(per_step[e] for e in trained) / 1e3         # what was run, priced step by step
    priced = run_compute(cfg, 8, 4, "weighted", split_at=4)
    assert priced.own_tflops == pytest.approx(by_hand) == pytest.approx(run_compute(cfg, 8, 4, "weighted").own_tflops)
    assert priced.parent_phase_tflops == pytest.approx(sum(per_step[e] for e in trained[:4]) / 1e3)


def test_weighted_schedule_gives_each_expert_its_intervals_share_at_every_step():
    w = (0.2, 0.225, 0.575)
    order = weighted_order(w, 2000)
    for k in range(1, 2001):
        counts = [order[:k].count(n) for n in range(3)] if k % 97 == 0 or k == 2000 else None
        if counts:
            assert all(abs(c - k * wn) <= 1 for c, wn in zip(counts, w)), (k, counts)
    assert weighted_order(w, 50) == order[:50]                   # a prefix of a run is a run
    assert steps_per_expert(4, 10, "weighted", 0, (0.25,) * 4) == steps_per_expert(4, 10, "interleaved")
    assert weighted_order((0.25,) * 4, 12) == [k % 4 for k in range(12)]


def test_weighted_run_costs_one_network_of_its_per_step_cost():
    """Decoders of 32, 16 and 4 channels over intervals of 0.2, 0.225, 0.575: trained weighted,
    the run spends steps x the interval-weighted per-step cost, by hand; interleaved it would
    spend the plain mean, far more."""
    cfg = meme(WIDE, SAME, NARROW, bounds=(0, 200, 425, 1000))
    per_step = train_gflops_per_step(cfg, 32)
    by_hand = 2000 * sum(wi * g for wi, g in zip(cfg.interval_weights(), per_step)) / 1e3
    assert run_compute(cfg, 2000, 32, "weighted").own_tflops == pytest.approx(by_hand, abs=max(per_step) / 1e3)
    assert run_compute(cfg, 2000, 32, "interleaved").own_tflops > 1.3 * by_hand


def test_training_follows_the_weighted_order_and_resumes_exactly(tmp_path, blobs):
    cfg = meme(WIDE, SAME, NARROW, bounds=(0, 200, 425, 1000))
    opts = TrainOptions(data=str(blobs), steps=8, batch_size=4, lr=1e-3, warmup=2, ckpt_every=100, sample_every=0,
                        log_every=1, device="cpu", schedule="weighted")
    tr = Trainer(cfg, opts, tmp_path / "resumed")
    wake_zero_init(tr.model)
    shared = tr.model.experts[0].enc["16x16_conv"].conv.weight
    trained = []
    for _ in range(4):
        before = shared.detach().clone()
        trained.append(tr.step()[0])
        assert not torch.equal(shared, before), "the shared encoder did not move on an expert's step"
    assert trained == weighted_order(cfg.interval_weights(), 4)
    straight = train(cfg, opts, tmp_path / "straight", progress=False)
    tr = Trainer(cfg, opts, tmp_path / "resumed2")
    for _ in range(3):
        tr.step()
    tr.save()
    resumed = train(cfg, opts, tmp_path / "resumed2", resume=True, progress=False)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
