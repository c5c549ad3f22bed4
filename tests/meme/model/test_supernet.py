"""The weight-shared supernet: exact sub-networks, their parameter counts, and isolation."""
from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch

from meme.model.config import ArchConfig, ConfigError, DataShape, head_step_grid
from meme.model.iunet import IUNet
from meme.model.experts import count_params, wake_zero_init
from meme.model.supernet import ElasticInceptionMixer, SuperNet, SupernetSpec, arch_key

DATA = DataShape(channels=1, resolution=16, latent=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_spec(base=16, mult=(1, 2, 3), head=4, blocks=1, top=Fraction(7, 8)) -> SupernetSpec:
    template = ArchConfig(kind="iunet", base_channels=base, channel_mult=mult, num_res_blocks=blocks,
                          head_channels=head, high_ratios=("0",) * len(mult), pool_strides=(1,) * len(mult),
                          attention_ds=())
    grids = tuple(tuple(str(g) for g in head_step_grid(w, head) if 0 < g <= top)
                  for w in template.stage_channels())
    return SupernetSpec(template, DATA, grids, ((1, 2),) * len(mult)).validate()


def used_mask(supernet: SuperNet, arch: ArchConfig) -> dict[str, torch.Tensor]:
    """Per supernet parameter, a boolean mask of the entries ``arch`` reads.

    Measured, not derived from the layout: each parameter is filled with its entry
    indices and the sub-network's slices read back, so it also checks the layout
    (indices are exact in fp32 up to 2^24 entries per tensor).
    """
    masks = {}
    with torch.no_grad():
        saved = {n: p.detach().clone() for n, p in supernet.named_parameters()}
        for n, p in supernet.named_parameters():
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape))
        sub = supernet.sub_state_dict(arch)
        index_of = {}
        for name, m in supernet.named_modules():
            if isinstance(m, ElasticInceptionMixer):
                for k in m.sub_parameters(arch.high_channels()[m.stage]):
                    index_of[f"{name}.{k}"] = (name, k)
        params = dict(supernet.named_parameters())
        for n, p in params.items():
            masks[n] = torch.zeros(p.shape, dtype=torch.bool)
        for k, v in sub.items():
            if k in params and k not in index_of:
                masks[k][...] = True
                continue
            prefix, local = index_of[k]
            conv = local.split(".")[-2]  # conv_fc, conv_dw, pool_fc, qkv, fuse_dw, proj
            target = f"{prefix}.{conv}.{local.split('.')[-1]}"
            masks[target].view(-1)[v.reshape(-1).long()] = True
        for n, p in supernet.named_parameters():
            p.copy_(saved[n])
    return masks


def random_arch(spec: SupernetSpec, rng: random.Random) -> ArchConfig:
    return spec.arch([rng.choice(r) for r in spec.ratios], [rng.choice(p) for p in spec.pool_strides])


def test_random_subnetworks_are_exact_and_have_their_own_parameter_count():
    spec = make_spec(blocks=2)
    torch.manual_seed(0)
    sn = wake_zero_init(SuperNet(spec))
    rng = random.Random(0)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 400, 999])
    archs = [spec.largest(), spec.smallest()] + [random_arch(spec, rng) for _ in range(6)]
    for arch in archs:
        net = sn.extract(arch)
        assert type(net) is IUNet
        assert count_params(net) == count_params(IUNet(arch, DATA)) == sn.sub_param_count(arch), arch_key(arch)
        with torch.no_grad():
            got, want = sn.activate(arch)(x, t), net(x, t)
        assert want.abs().max() > 1e-3            # a real output, not zeros
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (arch_key(arch), (got - want).abs().max())
    # different splits really are different functions of the shared weights
    with torch.no_grad():
        a = sn.activate(spec.largest())(x, t)
        b = sn.activate(spec.smallest())(x, t)
    assert (a - b).abs().max() > 1e-4


def test_a_step_on_one_subnetwork_changes_only_the_weights_it_uses():
    spec = make_spec()
    torch.manual_seed(1)
    sn = wake_zero_init(SuperNet(spec))
    arch = spec.arch([spec.ratios[0][2], spec.ratios[1][3], spec.ratios[2][1]], [2, 1, 2])
    mask = used_mask(sn, arch)
    before = {n: p.detach().clone() for n, p in sn.named_parameters()}
    opt = torch.optim.SGD(sn.parameters(), lr=0.1)
    sn.activate(arch)
    loss = sn(torch.randn(4, 1, 16, 16), torch.tensor([1, 300, 600, 900])).square().mean()
    loss.backward()
    opt.step()
    changed_outside = used_inside = 0
    for n, p in sn.named_parameters():
        moved = p.detach() != before[n]
        changed_outside += int((moved & ~mask[n]).sum())
        used_inside += int(mask[n].sum())
    assert changed_outside == 0
    # the mask is the sub-network's parameter count: every used entry is read exactly once
    assert used_inside == count_params(IUNet(arch, DATA))
    # and a step does move most of what it uses
    moved = sum(int(((p.detach() != before[n]) & mask[n]).sum()) for n, p in sn.named_parameters())
    assert moved > 0.5 * used_inside


def test_weight_layout_of_one_mixer_by_hand():
    """Width 16, 4-channel heads, d_h in {4, 8, 12}: H = 6, h_min = 2, L = 12, cat = 36."""
    spec = make_spec(base=16, mult=(1,), head=4, top=Fraction(3, 4))
    sn = SuperNet(spec)
    m = sn.mixers()[0]
    assert (m.H, m.h_min, m.L) == (6, 2, 12)
    assert tuple(m.conv_fc.weight.shape) == (12, 6, 1, 1)
    assert tuple(m.pool_fc.weight.shape) == (12, 10, 1, 1)
    assert tuple(m.qkv.weight.shape) == (36, 12, 1, 1)
    assert tuple(m.proj.weight.shape) == (16, 36, 1, 1)
    p = m.sub_parameters(8)  # h = 4, d_l = 8 (2 heads)
    assert torch.equal(p["high.pool_fc.weight"], m.pool_fc.weight[:8, 2:6])   # reads channels 4..7
    assert torch.equal(p["low.qkv.weight"][8:16], m.qkv.weight[12:20, 4:])    # k rows, channels 8..15
    assert torch.equal(p["proj.weight"][:, 8:16], m.proj.weight[:, 12:20])    # pool slots start at 2H
    assert torch.equal(p["proj.weight"][:, 16:], m.proj.weight[:, 24:32])     # low slots start at 4H


def test_refuses_an_architecture_outside_the_supernet():
    spec = make_spec()
    sn = SuperNet(spec)
    other = ArchConfig(kind="iunet", base_channels=24, channel_mult=(1, 2, 3), num_res_blocks=1, head_channels=4,
                       high_ratios=("1/2",) * 3, pool_strides=(1, 1, 1))
    with pytest.raises(ConfigError, match="macro shape"):
        sn.activate(other)
    with pytest.raises(ConfigError, match="pool stride 4"):
        sn.activate(spec.arch([r[0] for r in spec.ratios], [4, 1, 1]))


def test_spec_round_trips():
    spec = make_spec()
    again = SupernetSpec.from_dict(spec.to_dict())
    assert again == spec and again.digest() == spec.digest()
