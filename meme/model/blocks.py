"""Building blocks shared by the LDM U-Net and the iU-Net.

Every block that needs the timestep takes ``forward(x, emb)``; blocks that do not
(``Downsample``/``Upsample``) accept and ignore ``emb`` so a network can call every
entry of its ``nn.ModuleDict`` the same way (as NVlabs/edm2 ``networks_edm2.py`` does).

The U-Net blocks follow latent-diffusion's ``openaimodel.py`` exactly where it moves
parameters (so LDM-S/LDM-L counts match the paper): ResBlocks add the embedding after
the first conv (no scale-shift norm), attention is a 1x1 qkv projection to 3C plus a
zero-initialised 1x1 output projection. The iFormer block follows the reference
Inception Transformer (Si et al. 2022, ``sail-sg/iFormer``) token mixer: high channels
first, each high branch doubling its channels, no output projection inside attention
(the fusion 1x1 conv plays that role), qkv with bias, MLP ratio 4.

All attention goes through one leaf module, ``ScaledDotProductAttention`` (fused SDPA
kernels on GPU and CPU): fused kernels hide QK^T and AV from every FLOP counter, so
``meme.model.macs`` hooks this module and counts them by formula. Nothing loops over the
batch in Python.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# ----------------------------------------------------------------------------------
# Timestep embedding (DDPM / LDM sinusoidal features).


# DDPM/LDM sinusoidal timestep features.
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos | sin] of timesteps t [B] (int or float) -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def num_groups(channels: int, groups: int = 32, group_channels: int = 0) -> int:
    """32 groups (LDM) when they divide the width; else the largest divisor of both (tiny models).

    ``group_channels > 0`` fixes the channels per group instead (``ArchConfig.group_channels``):
    what a width-sliced network needs, since a fixed group count shrinks its groups to one
    channel at a quarter width (DDSM's slicing) and its statistics stop meaning the same thing.
    """
    if group_channels:
        assert channels % group_channels == 0, f"{channels} channels is not a whole number of {group_channels}-channel groups"
        return channels // group_channels
    return groups if channels % groups == 0 else math.gcd(channels, groups)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with fp32 statistics, output in x's dtype (LDM's GroupNorm32), with no
    fp32 copy of a bf16/fp16 activation.

    ATen's group_norm kernels accumulate a low-precision input's statistics in fp32
    themselves (``acc_type``), so casting x to fp32 first, as LDM and CUDA autocast do,
    only adds two full passes over the activation (a cast in, a cast back) and doubles
    the bytes the norm reads.
    * CPU: bf16/fp16 x goes straight to ATen's mixed-dtype kernel with the fp32 affine:
      the numbers of casting first, up to one rounding step of the output
      (``tests/meme/speed/test_fast_paths.py``), at ~1/12 the time (0.19 vs 2.4 ms for
      4x256x32x32 bf16 channels_last on 2 cores).
    * CUDA: the kernel wants one dtype for x and the affine, so the affine (C values) is
      cast to x's dtype, and autocast, which would cast x to fp32, is off for the call.
      The two fp32 casts of the activation are gone; ATen's CUDA kernel still makes its
      own NCHW copy of a channels_last input, as it did before. The output differs from
      the fp32 round trip by the rounding of gamma and beta to bf16 (tested on the GPU in
      ``tests/meme/speed/test_cuda.py``, and on a CPU through ``low_precision_group_norm``).
    """

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-5, group_channels: int = 0):
        super().__init__(num_groups(channels, groups, group_channels), channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x.dtype in (torch.bfloat16, torch.float16)
        if low and x.device.type != "cpu":
            return low_precision_group_norm(x, self)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        if low:     # CPU: the mixed-dtype kernel
            return F.group_norm(x, self.num_groups, w, b, self.eps)
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


def low_precision_group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm`` on a bf16/fp16 ``x`` in x's dtype throughout (fp32 statistics inside the kernel)."""
    w = norm.weight.to(x.dtype) if norm.weight is not None else None
    b = norm.bias.to(x.dtype) if norm.bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return F.group_norm(x, norm.num_groups, w, b, norm.eps)


class GELU(nn.GELU):
    """``nn.GELU`` that runs on a channels_last tensor through its NHWC view.

    ATen's CPU GELU takes its slow, unvectorised path for any tensor that is not
    NCHW-contiguous, channels_last included (pytorch/pytorch#79378 optimises that
    path, but it stays there). The NHWC view of a channels_last tensor is plain
    contiguous memory, and GELU is elementwise, so the same function runs the fast
    kernel: on a 2-core AMX Xeon, bf16 4x512x64x64, forward 4.2 to 2.0 ms and forward
    + backward 16.8 to 11.5 ms. Results agree with the NCHW path up to one bf16
    rounding (``tests/meme/speed/test_fast_paths.py``); no parameters, so checkpoints are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return F.gelu(x.permute(0, 2, 3, 1), approximate=self.approximate).permute(0, 3, 1, 2)
        return F.gelu(x, approximate=self.approximate)


def max_pool3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 max-pool, stride 1, padding 1, as two separable passes of elementwise maxima.

    The same values as ``F.max_pool2d(x, 3, 1, 1)`` (a max is exact), for inference:
    ATen's CPU pooling kernel is 1.7-3.6x slower than this at the iU-Net's shapes in
    channels_last bf16 (48 to 256 channels, 64x64). Its gradient would split ties that
    max_pool2d routes to one input, so training keeps ``nn.MaxPool2d``.
    """
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
    return torch.maximum(torch.maximum(rows[..., :-2], rows[..., 1:-1]), rows[..., 2:])


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter: residual branches start as the identity (LDM's init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# softmax(Q K^T / sqrt(d)) V, fused; a module so that MAC counters can hook it.
class ScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention`` as a leaf module (no parameters, no state)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


# ----------------------------------------------------------------------------------
# U-Net blocks (latent-diffusion openaimodel).


# LDM openaimodel.ResBlock (use_scale_shift_norm=False).
class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (LDM openaimodel.ResBlock)."""

    def __init__(self,
        in_channels: int,           # channels of the input feature map
        out_channels: int,          # channels of the output feature map
        emb_channels: int,          # width of the timestep embedding vector
        dropout: float = 0.0,       # dropout before the last conv
        group_channels: int = 0,    # channels per GroupNorm group; 0: LDM's 32 groups
    ):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(in_channels, group_channels=group_channels), nn.SiLU(),
                                       nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels, group_channels=group_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


# LDM openaimodel.AttentionBlock (num_head_channels heads, SDPA).
class AttentionBlock(nn.Module):
    """Spatial self-attention over all H*W positions (LDM openaimodel.AttentionBlock)."""

    def __init__(self,
        channels: int,              # feature channels C
        head_channels: int = 32,    # channels per head; heads = C // head_channels
        group_channels: int = 0,    # channels per GroupNorm group; 0: LDM's 32 groups
    ):
        super().__init__()
        assert channels % head_channels == 0, f"{channels} channels is not a multiple of {head_channels}"
        self.heads = channels // head_channels
        self.norm = GroupNorm32(channels, group_channels=group_channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.attention = ScaledDotProductAttention()
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        qkv = rearrange(self.qkv(self.norm(x)), "b (k n c) h w -> k b n (h w) c", k=3, n=self.heads)
        y = self.attention(qkv[0], qkv[1], qkv[2])
        y = rearrange(y, "b n (h w) c -> b (n c) h w", h=h, w=w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (may also change the width)."""

    def __init__(self,
        in_channels: int,                   # channels in
        out_channels: Optional[int] = None,  # channels out (default: unchanged)
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels or in_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self,
        channels: int,              # channels in and out
    ):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.conv(self.up(x))


class ResAttnBlock(nn.Module):
    """One U-Net level entry: a ResBlock, optionally followed by an AttentionBlock.

    LDM groups the pair into one skip-producing unit; keeping them as one module
    keeps one ModuleDict key per skip connection.
    """

    def __init__(self,
        in_channels: int,           # channels in
        out_channels: int,          # channels out
        emb_channels: int,          # width of the timestep embedding
        attention: bool,            # add an AttentionBlock after the ResBlock
        head_channels: int = 32,    # channels per attention head
        dropout: float = 0.0,       # ResBlock dropout
        group_channels: int = 0,    # channels per GroupNorm group; 0: LDM's 32 groups
    ):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, emb_channels, dropout, group_channels)
        self.attn = AttentionBlock(out_channels, head_channels, group_channels) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


# ----------------------------------------------------------------------------------
# iFormer block (Si et al. 2022), time-conditioned for the iU-Net encoder.


# Paper eqs 4-5: high-frequency mixer, Y_h1 = FC(MP(Z_h1)), Y_h2 = D-Conv(FC(Z_h2)).
class HighMixer(nn.Module):
    """High-frequency mixer on d_h channels -> 2 d_h channels (paper eqs 4-5).

    First half: 1x1 conv to 2x, 3x3 depthwise conv, GELU        (eq 5, D-Conv(FC(Z_h2))).
    Second half: 3x3 max-pool (stride 1), 1x1 conv to 2x, GELU  (eq 4, FC(MP(Z_h1))).
    """

    def __init__(self,
        channels: int,              # d_h (even)
    ):
        super().__init__()
        half = channels // 2
        self.half = half
        # Paper eq 5: Y_h2 = D-Conv(FC(Z_h2)).
        self.conv_fc = nn.Conv2d(half, 2 * half, 1, bias=False)
        self.conv_dw = nn.Conv2d(2 * half, 2 * half, 3, padding=1, groups=2 * half, bias=False)
        # Paper eq 4: Y_h1 = FC(MP(Z_h1)).
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.pool_fc = nn.Conv2d(half, 2 * half, 1)
        self.act = GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cx, px = x[:, :self.half], x[:, self.half:]
        cx = self.act(self.conv_dw(self.conv_fc(cx)))
        px = self.act(self.pool_fc(self.pool(px)))
        return torch.cat([cx, px], dim=1)


# Paper eq 6: low-frequency mixer, Y_l = Up(MHSA(AP(Z_l))).
class LowMixer(nn.Module):
    """Low-frequency mixer: avg-pool, MHSA, upsample back (paper eq 6).

    No output projection: as in the reference iFormer, the fusion 1x1 conv projects.
    """

    def __init__(self,
        channels: int,              # d_l = heads x head_channels
        head_channels: int,         # channels per attention head
        pool_stride: int = 1,       # avg-pool stride before attention (1: none)
    ):
        super().__init__()
        assert channels % head_channels == 0, f"d_l={channels} is not a whole number of {head_channels}-channel heads"
        self.heads = channels // head_channels
        self.stride = pool_stride
        self.pool = (nn.AvgPool2d(pool_stride, stride=pool_stride, ceil_mode=True, count_include_pad=False)
                     if pool_stride > 1 else nn.Identity())
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.attention = ScaledDotProductAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        xa = self.pool(x)
        h, w = xa.shape[-2:]
        qkv = rearrange(self.qkv(xa), "b (k n c) h w -> k b n (h w) c", k=3, n=self.heads)
        y = self.attention(qkv[0], qkv[1], qkv[2])
        if x.stride(1) == 1 < x.shape[1]:
            # channels_last input: so is the output, laid out at the pooled size before the
            # upsample (else the concatenation after it is NCHW and the next conv transposes
            # it at full size: 4 of the 17 ms of a 128 x 64 x 64 mixer). Built as NHWC, then
            # viewed: at batch 1 a plain .contiguous(channels_last) can keep a batch stride
            # that the upsample reads as NCHW
            y = rearrange(y, "b n (h w) c -> b h w (n c)", h=h, w=w).permute(0, 3, 1, 2)
        else:
            y = rearrange(y, "b n (h w) c -> b (n c) h w", h=h, w=w)
        if self.stride > 1:
            y = F.interpolate(y, size=size, mode="nearest")
        return y


# Paper eqs 7-8: Y_c = Concat(Y_h1, Y_h2, Y_l); Y = FC(Y_c + D-Conv(Y_c)).
class InceptionMixer(nn.Module):
    """iFormer token mixer: high/low split, concat, fusion (paper eqs 4-8)."""

    def __init__(self,
        channels: int,              # d = d_h + d_l
        high_channels: int,         # d_h (even, may be 0); the first d_h channels
        head_channels: int,         # channels per attention head of the low mixer
        pool_stride: int = 1,       # avg-pool stride of the low mixer
    ):
        super().__init__()
        self.d_h = high_channels
        low = channels - high_channels
        assert low >= head_channels and high_channels % 2 == 0, (
            f"iFormer split d={channels}, d_h={high_channels} needs even d_h and d_l >= one head")
        self.high = HighMixer(high_channels) if high_channels > 0 else None
        self.low = LowMixer(low, head_channels, pool_stride)
        cat = low + 2 * high_channels
        # Paper eq 8: Y = FC(Y_c + D-Conv(Y_c)).
        self.fuse_dw = nn.Conv2d(cat, cat, 3, padding=1, groups=cat, bias=False)
        self.proj = nn.Conv2d(cat, channels, 1)
        self._fused: Optional[FusedMixerWeights] = None     # fast_forward's weights (not state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or not _FAST_MIXER[0]:
            return self.reference_forward(x)
        return self.fast_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mixer as the paper writes it, one module per operation (training, MACs counting)."""
        # Paper eq 7: Y_c = Concat(Y_h1, Y_h2, Y_l).
        yl = self.low(x[:, self.d_h:])
        yc = torch.cat([self.high(x[:, :self.d_h]), yl], dim=1) if self.high is not None else yl
        return self.proj(yc + self.fuse_dw(yc))

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function with fewer memory-bound passes (inference: eval and no_grad).

        * both high branches' 1x1 convs are one grouped conv over [Z_h2 | MP(Z_h1)]
          (equal groups: half -> 2 half each; the conv branch has no bias, so its half of
          the bias is zero), which replaces their two outputs' concatenation by one of
          their half-sized inputs; in bf16 it runs as a dense conv with a block-diagonal
          weight (on a 2-core AMX Xeon at 1x160x32x32: 0.09 against 1.34 ms grouped);
        * the conv branch's depthwise 3x3 runs over both branches' outputs, with an exact
          identity kernel on the pool branch's, so one GELU covers both and no slice is taken;
        * the fusion residual Y_c + D-Conv(Y_c) is one depthwise conv whose centre tap
          carries the + 1;
        * the 3x3 max-pool is ``max_pool3x3`` (two separable passes, the same values).
        The fused weights are cached (``fused_weights``) and rebuilt only when a parameter
        they come from was written: weights loaded, averaged or stepped into the module are
        always the ones used. Outputs equal ``reference_forward`` up to rounding
        (``tests/meme/speed/test_fast_paths.py``).
        """
        yl = self.low(x[:, self.d_h:])
        dense = torch.is_autocast_enabled(x.device.type) or x.dtype == torch.bfloat16
        fused = self.fused_weights(dense)
        if self.high is not None:
            half = self.high.half
            z = torch.cat([x[:, :half], max_pool3x3(x[:, half:self.d_h])], dim=1)
            y = F.conv2d(z, fused.fc_weight, fused.fc_bias, groups=1 if dense else 2)
            y = F.conv2d(y, fused.dw_weight, None, padding=1, groups=4 * half)
            yc = torch.cat([self.high.act(y), yl], dim=1)
        else:
            yc = yl
        return self.proj(F.conv2d(yc, fused.fuse_weight, None, padding=1, groups=yc.shape[1]))

    def fused_weights(self, dense: bool) -> "FusedMixerWeights":
        """The fast path's weights, built once per parameter version.

        Why a cache: rebuilding them is about a dozen small kernels per block and call,
        which on a GPU at batch 1 costs more than the mixer's convolutions. The key is
        each source parameter's storage and in-place version counter (``Tensor._version``,
        bumped by every optimizer step, ``load_state_dict`` copy and EMA update), so a
        changed weight is never served stale. A write through ``param.data`` is the one
        exception: ``.data`` has a counter of its own, so such a write is not seen; update
        weights in place under ``torch.no_grad()`` instead, as torch.optim and the EMA do.
        ``dense``: the bf16 form (block-diagonal weight for a dense conv, stored in bf16 so
        autocast casts nothing per call) or the fp32 form (two groups). The cache holds the source parameters themselves and
        compares them by identity, so a replaced parameter, or one whose storage moved
        (``.to()``), is rebuilt too.
        """
        sources = [self.fuse_dw.weight]
        if self.high is not None:
            hm = self.high
            sources += [hm.conv_fc.weight, hm.pool_fc.weight, hm.pool_fc.bias, hm.conv_dw.weight]
        if torch.compiler.is_compiling() or not all(isinstance(p, nn.Parameter) for p in sources):
            # compiled: built in the graph, where inductor's freezing folds them into constants;
            # tensors handed in by functional_call (the supernet's slices) are new every call
            return self._build_fused(dense, ())
        key = (dense, *((p.data_ptr(), p._version, p.dtype, p.device) for p in sources))
        cached = self._fused
        if cached is None or cached.key != key or any(a is not b for a, b in zip(cached.sources, sources)):
            with torch.no_grad():
                self._fused = dataclasses.replace(self._build_fused(dense, key), sources=tuple(sources))
        return self._fused

    def fused_cache(self) -> "Optional[FusedMixerWeights]":
        """The fused weights built last (None before the first fast forward): a CUDA graph
        captured after that forward reads them (``meme.sampling.graphs`` holds them)."""
        return self._fused

    def _build_fused(self, dense: bool, key: tuple) -> "FusedMixerWeights":
        fc_w = fc_b = dw_w = None
        if self.high is not None:
            hm, half = self.high, self.high.half
            fc_w = torch.cat([hm.conv_fc.weight, hm.pool_fc.weight])
            fc_b = torch.cat([torch.zeros_like(hm.pool_fc.bias), hm.pool_fc.bias])
            if dense:
                # oneDNN's bf16 grouped 1x1 conv is up to 14x slower than a dense one with
                # twice the MACs (block-diagonal weight, zeros off the groups)
                fc_w = torch.block_diag(fc_w[:2 * half].flatten(1), fc_w[2 * half:].flatten(1))[:, :, None, None]
            identity = torch.zeros_like(hm.conv_dw.weight)
            identity[:, 0, 1, 1] = 1
            dw_w = torch.cat([hm.conv_dw.weight, identity])
        fuse = self.fuse_dw.weight.clone()
        fuse[:, 0, 1, 1] += 1
        cast = (lambda t: None if t is None else t.to(torch.bfloat16)) if dense else (lambda t: t)
        return FusedMixerWeights(key, cast(fc_w), cast(fc_b), cast(dw_w), cast(fuse))


@dataclasses.dataclass(frozen=True)
class FusedMixerWeights:
    """``InceptionMixer.fast_forward``'s weights, and the parameter versions they were built from."""

    key: tuple                            # dense, then (storage, version, dtype, device) per source
    fc_weight: Optional[torch.Tensor]     # both high branches' 1x1 convs as one (grouped or block-diagonal)
    fc_bias: Optional[torch.Tensor]
    dw_weight: Optional[torch.Tensor]     # conv branch's depthwise 3x3 + identity taps for the pool branch
    fuse_weight: torch.Tensor             # fusion depthwise 3x3 with the residual's + 1 on the centre tap
    sources: tuple = ()                   # the parameters they were built from (compared by identity)


_FAST_MIXER = [True]    # InceptionMixer.fast_forward in inference; off inside reference_mixers()


@contextlib.contextmanager
def reference_mixers():
    """Every InceptionMixer runs its reference (one module per operation) forward inside:
    module-hook MAC counters see the convs of the fast path as functional calls."""
    old = _FAST_MIXER[0]
    _FAST_MIXER[0] = False
    try:
        yield
    finally:
        _FAST_MIXER[0] = old


class FeedForward(nn.Module):
    """Pointwise MLP (1x1 convs, hidden = ratio x d, GELU): the transformer FFN on NCHW."""

    def __init__(self,
        channels: int,              # d
        ratio: int = 4,             # hidden width / d
        dropout: float = 0.0,       # dropout after the activation
    ):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, ratio * channels, 1)
        self.act = GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Conv2d(ratio * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


# Paper Fig. 4: iFormer block with timestep conditioning (pre-norm mixer + MLP residuals).
class IFormerBlock(nn.Module):
    """Time-conditioned iFormer block (pre-norm; mixer and MLP each residual).

    x <- x + ls1 * Mixer(Norm(x) + W_t emb)
    x <- x + ls2 * MLP(Norm(x))

    The timestep enters as in a ResBlock: SiLU-Linear(emb -> d) added to the
    normalised features, here the mixer input, so both frequency branches see t.
    ``ls1``/``ls2`` are optional per-channel layer scales (reference iFormer uses
    them in its deep models, init 1e-5); off by default here (and then applied to
    every stage when on), as the LDM parts' zero-init output convs already start
    their residual branches at zero.
    """

    def __init__(self,
        channels: int,              # d
        high_channels: int,         # d_h, channels given to the conv (high-frequency) mixer
        emb_channels: int,          # width of the timestep embedding
        head_channels: int = 32,    # channels per attention head of the low mixer
        pool_stride: int = 1,       # avg-pool stride before attention
        mlp_ratio: int = 4,         # FFN hidden width / d
        dropout: float = 0.0,       # FFN dropout
        layer_scale: Optional[float] = None,  # init of per-channel layer scale; None: off
        mixer: Optional[nn.Module] = None,  # token mixer d -> d; None: InceptionMixer(d, d_h, ...)
        group_channels: int = 0,    # channels per GroupNorm group; 0: LDM's 32 groups
    ):
        super().__init__()
        self.norm1 = GroupNorm32(channels, group_channels=group_channels)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, channels))
        self.mixer = mixer if mixer is not None else InceptionMixer(channels, high_channels, head_channels,
                                                                    pool_stride)
        self.norm2 = GroupNorm32(channels, group_channels=group_channels)
        self.mlp = FeedForward(channels, mlp_ratio, dropout)
        if layer_scale is not None:
            self.ls1 = nn.Parameter(torch.full((channels, 1, 1), float(layer_scale)))
            self.ls2 = nn.Parameter(torch.full((channels, 1, 1), float(layer_scale)))
        else:
            self.ls1 = self.ls2 = None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x) + self.emb_layers(emb).to(x.dtype)[:, :, None, None]
        h = self.mixer(h)
        x = x + (h * self.ls1 if self.ls1 is not None else h)
        h = self.mlp(self.norm2(x))
        return x + (h * self.ls2 if self.ls2 is not None else h)
