"""Experts from shared weights (meme.training.branching, meme.training.train --branch-at / --init-from) and the
compute they are charged (meme.training.compute), with real tiny networks."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from meme.common.errors import UserError
from meme.model.config import ArchConfig, DataShape, DiffusionConfig, MemeConfig
from meme.model.macs import cost_of_network
from meme.model.supernet import SuperNet
from meme.sampling.sample import load_run
from meme.training.branching import expert_state, parent_network
from meme.training.compute import run_compute, steps_per_expert
from meme.training.train import Trainer, TrainOptions, train

pytestmark = pytest.mark.usefixtures("one_thread")


def iunet(ratios: tuple[str, str], pools=(2, 1)) -> ArchConfig:
    return ArchConfig(kind="iunet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1, head_channels=4,
                      high_ratios=ratios, pool_strides=pools)


def meme(*archs: ArchConfig, name: str = "branchy") -> MemeConfig:
    probs = (0.8, 0.4, 0.2, 0.1)[:len(archs)]
    return MemeConfig(name=name, experts=tuple(archs), data=DataShape(1, 16, False),
                      diffusion=DiffusionConfig.ddpm_pixels(), expert_probs=probs).validate()


HETERO = meme(iunet(("3/4", "1/2")), iunet(("1/2", "1/4"), (1, 1)))   # ratios and strides differ: a supernet parent
HOMO = meme(iunet(("1/2", "1/4")), iunet(("1/2", "1/4")), name="copies")  # one architecture: a plain parent


def opts(data: Path, **kw) -> TrainOptions:
    base = dict(data=str(data), steps=8, batch_size=4, lr=1e-3, warmup=2, ckpt_every=100, sample_every=0,
                log_every=1, device="cpu", branch_at=0.5)
    base.update(kw)
    return TrainOptions(**base)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parent_of_different_splits_is_a_supernet_and_of_copies_a_plain_network():
    assert isinstance(parent_network(HETERO), SuperNet)
    plain = parent_network(HOMO)
    assert not isinstance(plain, SuperNet)
    assert sum(p.numel() for p in plain.parameters()) == sum(
        p.numel() for p in parent_network(meme(HOMO.experts[0])).parameters())


@pytest.mark.parametrize("cfg", [HETERO, HOMO], ids=["supernet-parent", "plain-parent"])
def test_split_gives_each_expert_its_parent_sub_network(tmp_path, blobs, cfg):
    tr = Trainer(cfg, opts(blobs), tmp_path)
    for _ in range(3):
        tr.step()
    parent, parent_ema = tr.parent, tr.parent_ema.module   # still updated in place by step 4, then dropped
    tr.step()                                    # step 4 of 8: the last parent step, then the split
    assert tr.parent is None and tr.step_count == 4
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    want = []
    for arch in cfg.experts:
        if isinstance(parent, SuperNet):
            parent.activate(arch)
        with torch.no_grad():
            want.append((parent(x, t).clone(), None))
    ema_want = [{k: v.clone() for k, v in expert_state(parent_ema, a).items()} for a in cfg.experts]
    for n, e in enumerate(tr.model.experts):
        with torch.no_grad():
            torch.testing.assert_close(e(x, t), want[n][0], rtol=0, atol=1e-6)
        assert _same(tr.ema.module.experts[n].state_dict(), ema_want[n])


def test_carried_moments_are_the_parents_sliced_as_the_weights(tmp_path, blobs):
    tr = Trainer(HETERO, opts(blobs), tmp_path)
    for _ in range(3):
        tr.step()
    names = dict(tr.parent.named_parameters())
    fc_name = next(n for n in names if n.endswith("mixer.conv_fc.weight"))
    emb_name = next(n for n in names if "mixer" not in n and names[n].dim() == 2)
    parent_opt = tr.parent_opt                    # step 4 updates it in place, then the split carries it
    tr.step()
    par_fc = parent_opt.state[names[fc_name]]["exp_avg_sq"]
    par_emb = parent_opt.state[names[emb_name]]["exp_avg"]
    for n, arch in enumerate(HETERO.experts):
        h = arch.high_channels()[0] // 2          # stage 1: the conv branch reads x[0:h], writes 2h channels
        ex = dict(tr.model.experts[n].named_parameters())
        fc = ex[fc_name.replace("mixer.conv_fc", "mixer.high.conv_fc")]
        torch.testing.assert_close(tr.opt.state[fc]["exp_avg_sq"], par_fc[:2 * h, :h], rtol=0, atol=0)
        torch.testing.assert_close(tr.opt.state[ex[emb_name]]["exp_avg"], par_emb, rtol=0, atol=0)
        assert int(tr.opt.state[ex[emb_name]]["step"]) == 4


def test_fresh_split_restarts_the_optimizer_and_the_warm_up(tmp_path, blobs):
    tr = Trainer(HETERO, opts(blobs, split_optimizer="fresh", warmup=4), tmp_path)
    for _ in range(4):
        tr.step()
    assert len(tr.opt.state) == 0
    assert tr.lr_at(4) == pytest.approx(1e-3 / 4) and tr.lr_at(3) == pytest.approx(1e-3)


@pytest.mark.parametrize("stop", [3, 6], ids=["stopped-before-split", "stopped-after-split"])
def test_branched_run_resumes_bit_for_bit_across_the_split(tmp_path, blobs, stop):
    straight = train(HETERO, opts(blobs), tmp_path / "straight", progress=False)
    tr = Trainer(HETERO, opts(blobs), tmp_path / "resumed")
    for _ in range(stop):
        tr.step()
    tr.save()
    resumed = train(HETERO, opts(blobs), tmp_path / "resumed", resume=True, progress=False)
    assert resumed.step_count == 8
    assert _same(straight.model.state_dict(), resumed.model.state_dict())
    assert _same(straight.ema.module.state_dict(), resumed.ema.module.state_dict())


def test_parent_phase_checkpoint_is_samplable_and_refuses_other_branching(tmp_path, blobs):
    tr = Trainer(HETERO, opts(blobs), tmp_path)
    for _ in range(2):
        tr.step()
    tr.save()
    HETERO.save(tmp_path / "config.yaml")
    cfg, den, step = load_run(tmp_path)
    assert step == 2 and den.num_experts == 2
    with pytest.raises(UserError, match="other branching"):
        train(HETERO, opts(blobs, branch_at=0.25), tmp_path, resume=True, progress=False)


def test_init_from_a_run_of_one_network(tmp_path, blobs):
    arch = HOMO.experts[0]
    single = train(meme(arch, name="single"), opts(blobs, branch_at=0.0, steps=3), tmp_path / "single",
                   progress=False)
    tr = Trainer(HOMO, opts(blobs, branch_at=0.0, init_from=str(tmp_path / "single")), tmp_path / "branched")
    for e, ema_e in zip(tr.model.experts, tr.ema.module.experts):
        assert _same(e.state_dict(), single.model.experts[0].state_dict())
        assert _same(ema_e.state_dict(), single.ema.module.experts[0].state_dict())
    with pytest.raises(UserError, match="not every expert's architecture"):
        Trainer(HETERO, opts(blobs, branch_at=0.0, init_from=str(tmp_path / "single")), tmp_path / "x")
    with pytest.raises(UserError, match="exclude each other"):
        Trainer(HOMO, opts(blobs, init_from=str(tmp_path / "single")), tmp_path / "y")


def test_compute_by_hand():
    cfg = meme(iunet(("3/4", "1/2")), iunet(("1/2", "1/4")), iunet(("1/4", "1/4"), (1, 1)))
    # 10 steps, split at 4: parent steps 0..3 train archs 0,1,2,0; expert steps 4..9 continue k mod 3: 1,2,0,1,2,0
    assert steps_per_expert(3, 10, "interleaved", 4) == [4, 3, 3]
    assert steps_per_expert(3, 10, "sequential", 4) == [4, 3, 3]
    assert steps_per_expert(3, 9, "sequential", 0) == [3, 3, 3]
    g = [cost_of_network(a, cfg.data).gflops for a in cfg.experts]
    c = run_compute(cfg, 10, 8, "interleaved", split_at=4, source_tflops=2.0, served=4)
    assert c.own_tflops == pytest.approx(3 * 8 * (4 * g[0] + 3 * g[1] + 3 * g[2]) / 1e3)
    assert c.parent_phase_tflops == pytest.approx(3 * 8 * (2 * g[0] + g[1] + g[2]) / 1e3)
    assert c.charged_tflops == pytest.approx(c.own_tflops + 2.0)
    assert c.amortised_tflops == pytest.approx(c.own_tflops + 0.5)
    scratch = run_compute(cfg, 10, 8, "interleaved")
    assert scratch.own_tflops == pytest.approx(3 * 8 * (4 * g[0] + 3 * g[1] + 3 * g[2]) / 1e3)  # same steps: same cost


def test_run_records_its_compute(tmp_path, blobs):
    train(HETERO, opts(blobs), tmp_path, progress=False)
    import json
    rec = json.loads((tmp_path / "compute.json").read_text())
    want = run_compute(HETERO, 8, 4, "interleaved", split_at=4)
    assert rec["charged_tflops"] == pytest.approx(want.charged_tflops)
    assert rec["parent_phase_tflops"] == pytest.approx(want.parent_phase_tflops) and rec["source_tflops"] == 0
    assert dataclasses.asdict(want)["own_tflops"] == pytest.approx(rec["own_tflops"])


def test_branched_interleaved_run_trains_each_architecture_as_often_as_from_scratch():
    for steps, at in [(6, 3), (10, 5), (7, 2)]:
        assert steps_per_expert(2, steps, "interleaved", at) == steps_per_expert(2, steps, "interleaved")


def test_a_snapshot_of_an_interleaved_run_is_the_shorter_run(tmp_path, blobs):
    long = train(HETERO, opts(blobs, branch_at=0.0, steps=6, snapshot_at="3"), tmp_path / "long", progress=False)
    short = train(HETERO, opts(blobs, branch_at=0.0, steps=3), tmp_path / "short", progress=False)
    from meme.common import checkpoint
    snap = checkpoint.load(tmp_path / "long" / "checkpoints" / "step0000003.pt")
    assert snap["step"] == 3 and long.step_count == 6
    assert _same(snap["ema"], short.ema.module.state_dict()) and _same(snap["model"], short.model.state_dict())
