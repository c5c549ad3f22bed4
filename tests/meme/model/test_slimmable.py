"""The width-elastic (slimmable) supernet: every width exact, counted, isolated, sliced per segment."""
from __future__ import annotations

import random

import pytest
import torch

from meme.model.config import ArchConfig, ConfigError, DataShape, MemeConfig
from meme.model.iunet import IUNet
from meme.model.experts import count_params, wake_zero_init
from meme.model.supernet import SuperNet, SupernetSpec, arch_key

DATA = DataShape(channels=1, resolution=16, latent=False)
WIDTHS = ("1/4", "1/2", "3/4", "1")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_spec(widths=WIDTHS, group_channels=4) -> SupernetSpec:
    """Base 32, stages 32/64, 8-channel heads: at width 1/4 stage 1 has 8 channels (one head, d_h = 0)."""
    template = ArchConfig(kind="iunet", base_channels=32, channel_mult=(1, 2), num_res_blocks=1, head_channels=8,
                          high_ratios=("0", "0"), pool_strides=(1, 1), attention_ds=(),
                          group_channels=group_channels)
    ratios = (("0", "1/4", "1/2"), ("0", "1/4", "1/2", "3/4"))
    return SupernetSpec(template, DATA, ratios, ((1, 2), (1,)), widths).validate()


def random_arch(spec: SupernetSpec, rng: random.Random, width: str) -> ArchConfig:
    n = len(spec.ratios)
    return spec.arch([rng.choice(spec.legal_ratios(s, width)) for s in range(n)],
                     [rng.choice(p) for p in spec.pool_strides], width)


def test_every_width_is_exact_and_has_its_own_parameter_count():
    spec = make_spec()
    torch.manual_seed(0)
    sn = wake_zero_init(SuperNet(spec))
    rng = random.Random(0)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 400, 999])
    archs = [spec.largest(), spec.narrowest()] + [random_arch(spec, rng, w) for w in WIDTHS for _ in range(2)]
    outputs = {}
    for arch in archs:
        net = sn.extract(arch)
        assert type(net) is IUNet
        assert count_params(net) == count_params(IUNet(arch, DATA)) == sn.sub_param_count(arch), arch_key(arch, 32)
        with torch.no_grad():
            got, want = sn.activate(arch)(x, t), net(x, t)
        assert want.abs().max() > 1e-3
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (arch_key(arch, 32), (got - want).abs().max())
        outputs[arch_key(arch, 32)] = got
    # narrower is fewer parameters, and a different function of the same weights
    counts = [sn.sub_param_count(spec.arch(["0", "0"], [1, 1], w)) for w in WIDTHS]
    assert counts == sorted(counts) and len(set(counts)) == len(WIDTHS)
    assert (outputs[arch_key(spec.largest(), 32)] - outputs[arch_key(spec.narrowest(), 32)]).abs().max() > 1e-4


def test_groups_keep_their_size_and_the_time_embedding_stays_whole():
    spec = make_spec()
    for w in WIDTHS:
        net = IUNet(spec.arch(["0", "0"], [1, 1], w), DATA)
        norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(m.num_channels // m.num_groups == 4 for m in norms), w
        assert net.time_embed.mlp[0].in_features == 32 and net.time_embed.mlp[2].out_features == 128, w
    assert spec.arch(["0", "0"], [1, 1], "1/2").time_channels == 32
    assert spec.arch(["0", "0"], [1, 1], "1").time_channels == 0       # full width: the template as it is


def test_a_step_at_one_width_changes_only_the_weights_it_uses():
    spec = make_spec()
    torch.manual_seed(1)
    sn = wake_zero_init(SuperNet(spec))
    arch = spec.arch(["0", "1/4"], [2, 1], "1/2")
    with torch.no_grad():     # which entries the sub-network reads: its slices, traced by value
        for p in sn.parameters():
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape))
        read = {}
        index = {id(p): n for n, p in sn.named_parameters()}
        for n, p in sn.named_parameters():
            read[n] = torch.zeros(p.shape, dtype=torch.bool)
        sub = sn.sub_state_dict(arch)
    # a slice's values are its entries' indices; which tensor it came from: the mixer slices by name, the rest 1:1
    mixer_of = {f"{name}.{k}": name for name, m in sn.named_modules() if hasattr(m, "sub_parameters")
                for k in m.sub_parameters(arch.high_channels()[m.stage], arch.stage_channels()[m.stage])}
    for k, v in sub.items():
        src = k if k not in mixer_of else f"{mixer_of[k]}.{k.split('.')[-2]}.{k.split('.')[-1]}"
        read[src].view(-1)[v.reshape(-1).long()] = True
    assert sum(int(m.sum()) for m in read.values()) == count_params(IUNet(arch, DATA))   # each read once
    torch.manual_seed(1)
    sn = wake_zero_init(SuperNet(spec))
    before = {n: p.detach().clone() for n, p in sn.named_parameters()}
    opt = torch.optim.SGD(sn.parameters(), lr=0.1)
    sn.activate(arch)(torch.randn(4, 1, 16, 16), torch.tensor([1, 300, 600, 900])).square().mean().backward()
    opt.step()
    outside = sum(int(((p.detach() != before[n]) & ~read[n]).sum()) for n, p in sn.named_parameters())
    moved = sum(int(((p.detach() != before[n]) & read[n]).sum()) for n, p in sn.named_parameters())
    assert outside == 0 and moved > 0.5 * count_params(IUNet(arch, DATA))
    assert index  # (keeps the id map honest: parameters were enumerated)


def test_skip_concatenations_and_attention_heads_are_sliced_per_segment():
    """By hand, on the decoder's first block at 16 -> 8 x 8 (input [64 from below | 64 skip]) and the middle
    attention (64 channels, 8 heads of 8): at width 1/2 each segment keeps its first half."""
    spec = make_spec()
    torch.manual_seed(2)
    sn = SuperNet(spec)
    arch = spec.arch(["0", "0"], [1, 1], "1/2")
    sub = sn.sub_state_dict(arch)
    name = next(n for n in sn.decoder.concat_channels)
    assert sn.decoder.concat_channels[name] == (64, 64)
    full_w = sn.decoder.dec[name].res.in_layers[2].weight             # [64, 128, 3, 3]
    got = sub[f"decoder.dec.{name}.res.in_layers.2.weight"]            # [32, 64, 3, 3]
    assert torch.equal(got[:, :32], full_w[:32, :32]) and torch.equal(got[:, 32:], full_w[:32, 64:96])
    norm = sub[f"decoder.dec.{name}.res.in_layers.0.weight"]
    assert torch.equal(norm, torch.cat([sn.decoder.dec[name].res.in_layers[0].weight[:32],
                                        sn.decoder.dec[name].res.in_layers[0].weight[64:96]]))
    mid = next(iter(sn.decoder.mid))
    qkv = sn.decoder.mid[mid].attn.qkv.weight                          # [192, 64, 1, 1]: q, k, v of 8 heads
    got = sub[f"decoder.mid.{mid}.attn.qkv.weight"]                    # [96, 32, 1, 1]: q, k, v of 4 heads
    for k in range(3):
        assert torch.equal(got[32 * k:32 * (k + 1)], qkv[64 * k:64 * k + 32, :32])


def test_refuses_what_is_not_a_sub_network():
    spec = make_spec()
    sn = SuperNet(spec)
    with pytest.raises(ConfigError, match=r"width 5/8"):
        sn.activate(spec.arch(["0", "0"], [1, 1], "5/8"))
    with pytest.raises(ConfigError, match=r"d_h/d 1/2 is not one of .* at width 1/4"):   # 8 channels: d_h 4 leaves half a head
        sn.activate(spec.arch(["1/2", "0"], [1, 1], "1/4"))
    with pytest.raises(ConfigError, match="time_channels"):
        import dataclasses
        sn.activate(dataclasses.replace(spec.arch(["0", "0"], [1, 1], "1/2"), time_channels=0))
    with pytest.raises(ConfigError, match="group_channels"):
        make_spec(group_channels=0)


def test_slimmable_spec_and_sub_network_configs_round_trip():
    spec = make_spec()
    again = SupernetSpec.from_dict(spec.to_dict())
    assert again == spec and again.digest() == spec.digest()
    one = make_spec(widths=("1",))
    assert "widths" not in one.to_dict()            # one width: written as before
    cfg = MemeConfig(name="w", experts=(spec.arch(["0", "1/4"], [2, 1], "1/2"),), data=DATA)
    assert MemeConfig.from_yaml(cfg.to_yaml()) == cfg
    plain = MemeConfig(name="p", experts=(spec.template,), data=DATA)
    assert "time_channels" not in plain.to_yaml()   # unset fields are not written: old hashes stay
