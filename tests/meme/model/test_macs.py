"""MAC counting: hand-computed counts, attention matmuls, references, cache, CLI."""
from __future__ import annotations

import io
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from meme.model.config import ArchConfig, DataShape, MemeConfig
from meme.model.macs import cost_of_meme, cost_of_network, count_module, sdpa_macs
from nas.space.space import load_space

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never read or write the user's on-disk MACs cache from tests."""
    monkeypatch.setenv("MEME_MACS_CACHE", str(tmp_path / "macs-cache"))


def _networks():
    import meme.model.experts  # a broken import fails the test, never skips it

    return meme.model.experts


class ConvLinearAttention(nn.Module):
    """One conv, one linear, one SDPA call with shapes easy to count by hand."""

    def __init__(self, bare_sdpa: bool = False):
        super().__init__()
        from meme.model.blocks import ScaledDotProductAttention

        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # 3x8x8 -> 8x8x8
        self.qkv = nn.Linear(8, 24)                # 64 tokens x 8 -> 64 x (3 x 2 heads x 4)
        self.attention = F.scaled_dot_product_attention if bare_sdpa else ScaledDotProductAttention()

    def forward(self, x, t):
        h = self.conv(x).flatten(2).transpose(1, 2)                       # B, 64, 8
        q, k, v = self.qkv(h).reshape(x.shape[0], 64, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return self.attention(q, k, v)                                    # B, 2, 64, 4


# Hand counts for ConvLinearAttention at 3x8x8, batch 1.
CONV_MACS = 8 * 8 * 8 * (3 * 3 * 3) + 8 * 8 * 8   # per output: 27 MACs, + bias per output
LINEAR_MACS = 64 * (8 * 24 + 24)                  # per token: 8x24 weights + 24 bias
ATTN_MACS = 2 * 64 * 64 * 4 + 2 * 64 * 64 * 4     # heads x Lq x Lk x (Dqk + Dv)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_hand_count_conv_linear_attention(device):
    with torch.device(device):
        net = ConvLinearAttention()
    cost = count_module(net, (3, 8, 8))
    assert cost.macs_hooks == CONV_MACS + LINEAR_MACS
    assert cost.macs == CONV_MACS + LINEAR_MACS + ATTN_MACS
    assert cost.attention_macs == ATTN_MACS
    assert cost.params == (8 * 27 + 8) + (8 * 24 + 24)
    assert cost.gflops == pytest.approx(2 * cost.macs / 1e9)
    assert cost.paper_units == pytest.approx(3 * cost.macs_hooks / 1e9)


def test_sdpa_formula_handles_distinct_value_dim_and_cross_attention():
    q = torch.empty(2, 3, 10, 8, device="meta")
    k = torch.empty(2, 3, 7, 8, device="meta")
    v = torch.empty(2, 3, 7, 5, device="meta")
    assert sdpa_macs(q, k, v) == 2 * 3 * 10 * 7 * (8 + 5)


class FunctionalOps(nn.Module):
    """Matmul-like work done outside modules: one op at a time, by ``op``."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))

    def forward(self, x, t):
        h = self.w.flatten(1)[:, :8]  # 8 x 8
        if self.op == "conv2d":
            return F.conv2d(x, self.w, padding=1)
        if self.op == "einsum":
            return x + torch.einsum("ij,jk->ik", h, h).sum()
        return x + (h @ h).sum()


def _ptflops_default(net: nn.Module, shape) -> int:
    from ptflops import get_model_complexity_info

    from meme.model.macs import _WithTimestep
    macs, _ = get_model_complexity_info(_WithTimestep(net), shape, as_strings=False,
                                        print_per_layer_stat=False, ost=io.StringIO())
    return macs


@pytest.mark.parametrize("op", ["conv2d", "einsum", "matmul-operator"])
def test_matmul_work_the_counter_cannot_see_is_refused(op):
    """A budget that silently under-prices a design is worse than no budget."""
    with pytest.raises(RuntimeError, match="matmul/conv MACs but only"):
        count_module(FunctionalOps(op), (3, 8, 8))


def test_bare_sdpa_call_is_refused_not_undercounted():
    with pytest.raises(RuntimeError, match="ScaledDotProductAttention"):
        count_module(ConvLinearAttention(bare_sdpa=True), (3, 8, 8))


def _flop_counter_macs(net: nn.Module, shape) -> tuple[int, int]:
    """torch's own counter, SDPA forced onto its math path so that QK^T and AV show up as
    batched matmuls (a fused CPU kernel would be invisible to it): (total, attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    x = torch.randn(1, *shape)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x, torch.zeros(1, dtype=torch.long))
    by_op = fc.get_flop_counts()["Global"]
    return fc.get_total_flops() // 2, by_op.get(torch.ops.aten.bmm, 0) // 2


def test_agrees_with_torch_flop_counter_on_hand_module():
    net = ConvLinearAttention()
    cost = count_module(net, (3, 8, 8))
    assert cost.macs_hooks == _ptflops_default(net, (3, 8, 8))
    total, attn = _flop_counter_macs(net, (3, 8, 8))
    assert attn == cost.attention_macs
    biases = 8 * 8 * 8 + 64 * 24   # torch's counter leaves bias adds out
    assert total + biases == cost.macs


# ---- networks ---------------------------------------------------------------------

TINY_DATA = DataShape(channels=3, resolution=16, latent=False)
TINY_UNET = ArchConfig(kind="unet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attention_ds=(2,), head_channels=8)


def _unet_attention_macs(arch: ArchConfig, data: DataShape) -> int:
    """LDM UNetModel: attention after each ResBlock at attention_ds (encoder num_res_blocks,
    decoder num_res_blocks + 1 per level) and once in the middle block; QK^T + AV = 2 L^2 C."""
    total, deepest = 0, 2 ** (arch.num_stages - 1)
    for level, ch in enumerate(arch.stage_channels()):
        ds = 2 ** level
        L = (data.resolution // ds) ** 2
        per_block = 2 * L * L * ch
        if ds in arch.attention_ds:
            total += (2 * arch.num_res_blocks + 1) * per_block
        if ds == deepest:
            total += per_block  # middle block always attends
    return total


TINY_IUNET = ArchConfig(kind="iunet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attention_ds=(), head_channels=8, high_ratios=("1/2", "1/2"), pool_strides=(2, 1))


def _iunet_attention_macs(arch: ArchConfig, data: DataShape) -> int:
    """iU-Net: each encoder iFormer block attends over its d_l channels on the avg-pooled
    map; the middle block keeps LDM's full-width attention; the decoder has none."""
    total = 0
    for s, (width, d_h) in enumerate(zip(arch.stage_channels(), arch.high_channels())):
        side = -(-(data.resolution // 2 ** s) // arch.pool_strides[s])  # ceil-mode pooling
        L = side * side
        total += arch.num_res_blocks * 2 * L * L * (width - d_h)
    L = (data.resolution // 2 ** (arch.num_stages - 1)) ** 2
    return total + 2 * L * L * arch.stage_channels()[-1]


def test_tiny_iunet_hooks_miss_exactly_the_attention_matmuls():
    _networks()
    cost = cost_of_network(TINY_IUNET, TINY_DATA)
    # stage 1: 16x16 pooled to 8x8, d_l = 8; stage 2: 8x8, d_l = 16; middle: 8x8, 32 channels
    assert _iunet_attention_macs(TINY_IUNET, TINY_DATA) == 2 * 64 * 64 * (8 + 16 + 32)
    assert cost.macs - cost.macs_hooks == _iunet_attention_macs(TINY_IUNET, TINY_DATA)


def test_tiny_unet_hooks_miss_exactly_the_attention_matmuls():
    _networks()
    cost = cost_of_network(TINY_UNET, TINY_DATA)
    assert cost.macs - cost.macs_hooks == _unet_attention_macs(TINY_UNET, TINY_DATA)


@pytest.mark.parametrize("arch", [TINY_UNET, TINY_IUNET], ids=["unet", "iunet"])
def test_tiny_net_agrees_with_torch_flop_counter(arch):
    networks = _networks()
    net = networks.build_network(arch, TINY_DATA).eval()
    cost = count_module(net, (3, 16, 16))
    assert cost.macs_hooks == _ptflops_default(net, (3, 16, 16))  # counting beside it changes nothing
    total, attn = _flop_counter_macs(net, (3, 16, 16))
    assert attn == cost.attention_macs
    # torch counts only conv/matmul (no bias, norm, activation): a little less, never more
    assert total <= cost.macs
    assert cost.macs - total < 0.1 * cost.macs


@pytest.mark.parametrize("arch", [TINY_UNET, TINY_IUNET], ids=["unet", "iunet"])
def test_meta_and_cpu_counts_agree(arch):
    networks = _networks()
    with torch.device("meta"):
        meta = networks.build_network(arch, TINY_DATA)
    cpu = networks.build_network(arch, TINY_DATA)
    assert count_module(meta, (3, 16, 16)) == count_module(cpu, (3, 16, 16))


@pytest.mark.parametrize("space_name", ["tiny", "fmnist32"])
def test_iunet_counted_by_parts_equals_whole_counts(space_name):
    """rest(macro) + the sum of its iFormer blocks counted alone == one whole-network count,
    integer for integer; two macros per space, three random splits and pools each (the
    first of a macro sets its rest, the other two test the sum)."""
    networks = _networks()
    space = load_space(space_name)
    rng = random.Random(0)
    macros = sorted({(b, k) for b in space.macro.base_channels for k in space.macro.num_res_blocks})
    for base, blocks in rng.sample(macros, min(2, len(macros))):
        for _ in range(3):
            pools = tuple(rng.choice(space.macro.pool_strides))
            chain = tuple(str(rng.choice(space.stage_grid(base, s))) for s in range(space.num_stages))
            arch = space.arch(base, blocks, pools, chain)
            with torch.device("meta"):
                net = networks.build_network(arch, space.data)
            whole = count_module(net, (space.data.channels, space.data.resolution, space.data.resolution))
            assert cost_of_network(arch, space.data) == whole, (base, blocks, pools, chain)


def test_ldm_s_matches_reference():
    _networks()
    from meme.model.references import resolve
    cost = cost_of_meme(resolve("ldm-s")).experts[0]
    # latent-diffusion's own UNetModel (CompVis/latent-diffusion, openaimodel.py) counted at 3x64x64:
    # 89.54M params, 34.33 GMACs with attention, 31.4 hook GMACs (paper Table 3: 94.2G = 3 x 31.4)
    assert cost.params / 1e6 == pytest.approx(89.54, rel=0.01)
    assert cost.gmacs == pytest.approx(34.33, rel=0.02)
    assert cost.gmacs_hooks == pytest.approx(31.4, rel=0.02)
    assert cost.paper_units == pytest.approx(94.2, rel=0.02)
    assert cost.attention_macs == _unet_attention_macs(resolve("ldm-s").experts[0], resolve("ldm-s").data)


def test_table4_experts_cost_less_than_ldm_s_and_attention_is_counted():
    _networks()
    from meme.model.references import resolve
    ldm = cost_of_meme(resolve("ldm-s"))
    meme = cost_of_meme(resolve("meme-table4"))
    cfg = resolve("meme-table4")
    for arch, cost in zip(cfg.experts, meme.experts):
        assert cost.attention_macs == _iunet_attention_macs(arch, cfg.data)
        # paper Table 4 params (82.56 .. 83.32M): within 1%
    assert [c.params / 1e6 for c in meme.experts] == pytest.approx([82.56, 82.85, 83.11, 83.32], rel=0.01)
    assert meme.gflops_mean < ldm.gflops_mean


def test_meme_cost_is_interval_weighted_mean_and_cached():
    _networks()
    small = TINY_UNET
    big = ArchConfig(kind="unet", base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_ds=(2,), head_channels=8)
    cfg = MemeConfig(name="two", experts=(small, big, small), data=TINY_DATA,
                     boundaries=(0, 100, 700, 1000)).validate()
    cost = cost_of_meme(cfg)
    a, b = cost_of_network(small, TINY_DATA), cost_of_network(big, TINY_DATA)
    assert cost.experts[0] is cost.experts[2] is a  # identical experts: counted once
    assert cost.intervals == [(0, 100), (100, 700), (700, 1000)]
    expect = (0.1 * a.macs + 0.6 * b.macs + 0.3 * a.macs) / 1e9
    assert cost.gmacs_mean == pytest.approx(expect)
    assert cost.gflops_mean == pytest.approx(2 * expect)
    assert cost.gflops_max == pytest.approx(b.gflops)
    assert cost.params_total == 2 * a.params + b.params


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    _networks()
    import meme.model.macs as macs
    monkeypatch.setenv("MEME_MACS_CACHE", str(tmp_path / "c"))
    arch = ArchConfig(kind="unet", base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attention_ds=(), head_channels=8)
    first = cost_of_network(arch, TINY_DATA)
    files = list((tmp_path / "c").glob("*.json"))
    assert len(files) == 1
    cost_of_network.cache_clear()
    assert cost_of_network(arch, TINY_DATA) == first  # now read back from disk
    assert json.loads(files[0].read_text())["macs"] == first.macs
    assert macs.cost_key(arch, TINY_DATA) == files[0].stem


# ---- CLI ----------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "meme.model.macs", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_json(tmp_path):
    _networks()
    cfg = MemeConfig(name="tiny", experts=(TINY_UNET, TINY_UNET), data=TINY_DATA)
    path = cfg.save(tmp_path / "tiny.yaml")
    res = _cli(str(path), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) == {"experts", "gmacs_mean", "gflops_mean", "params_total", "params_unique"}
    assert [e["interval"] for e in out["experts"]] == [[0, 500], [500, 1000]]
    assert set(out["experts"][0]) == {"params", "gmacs", "gflops", "paper_units", "interval"}
    expect = cost_of_network(TINY_UNET, TINY_DATA)
    assert out["experts"][0]["params"] == expect.params
    assert math.isclose(out["gflops_mean"], expect.gflops)


def test_cli_unknown_name_exits_2_with_one_line():
    res = _cli("no-such-model", "--json")
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no-such-model" in lines[0]


@pytest.mark.parametrize("text", [None, "experts: [kind: unet\n  - : :\n", "experts: []\n"],
                         ids=["missing", "malformed", "no-experts"])
def test_cli_bad_yaml_exits_2_with_one_line(tmp_path, capsys, text):
    from meme.model.macs import main
    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_cli_table_lists_every_expert(capsys):
    _networks()
    from meme.model.macs import main
    assert main(["multi-expert-s"]) == 0
    out = capsys.readouterr().out
    assert "[750,1000)" in out and "94.2G" in out and "mean" in out
