"""iU-Net: a U-Net whose encoder mixes convolution and attention per stage (MEME).

The encoder stages use time-conditioned iFormer blocks (``meme.model.blocks.IFormerBlock``)
whose split d_h/d (conv "high-frequency" channels vs attention "low-frequency"
channels) is set per stage by ``arch.high_ratios``; the middle block, decoder and
output head are latent-diffusion's, built by ``meme.model.unet.UNetDecoder``.

Choices the paper (MEME, AAAI 2024, Table 4 and Fig. 4) leaves open, and why
-------------------------------------------------------------------------------
Each was picked to reproduce the paper's parameter counts with the reference
iFormer's block internals; with them the four Table 4 experts build with
82.45 / 82.74 / 82.99 / 83.16 M parameters (paper: 82.56 / 82.85 / 83.11 / 83.32 M,
all within 0.2%, same increasing trend; tests/meme/model/test_networks.py checks this).
Their cost in the paper's "MACs" unit (3 x ptflops module-hook GMACs, see
``meme.model.macs``) is 88.4G for iU-LDM-S (paper 90.5G) and 88.3G averaged over the four
experts (paper 90.4G): within 2.5%, and falling with more attention as in the paper.

* **Stage layout.** Stage s = [stride-2 conv (s > 0, width kept)] -> ResBlock
  (d_{s-1} -> d_s) -> ``num_res_blocks`` iFormer blocks at d_s. Table 4 lists the
  ResBlock after the iFormer blocks, but an iFormer block cannot change width, and
  the alternatives (widening in the stride-2 conv, as the reference iFormer's patch
  embedding does, or in a final ResBlock to d_{s+1}) land at 84.8 M and 90.7 M+.
  The ResBlock placed first is also where LDM's encoder changes width.
* **Skips.** Every iFormer block output is a skip (plus the input conv and each
  stride-2 conv), i.e. exactly as many as LDM's encoder pushes, so the decoder is
  LDM's unchanged: ``num_res_blocks + 1`` ResBlocks per level.
* **Attention outside the encoder.** The decoder has *no* attention blocks (plain
  ResBlocks: the paper's "asymmetric" merge); the middle keeps LDM's
  ResBlock-Attention-ResBlock. With decoder attention the experts would be 88.2 M+,
  without the middle attention 81.4 M.
* **Time conditioning.** SiLU-Linear(emb -> d) added to the pre-normalised mixer
  input (see ``IFormerBlock``); norms are GroupNorm32 (LDM) rather than LayerNorm
  (same parameter count); no positional embeddings (the U-Net's convs give position).
* **Attention heads.** ``arch.head_channels`` channels per head in every stage
  (16 in the reference configs, so every Table 4 ratio is a whole number of heads);
  qkv with bias and no separate output projection, as the reference iFormer.
* **Pool stride.** ``arch.pool_strides[s]`` (Table 4 prints 2 everywhere); stride 1
  skips the pool/upsample pair.
* **Layer scale.** Off by default (``layer_scale=None``; ``ArchConfig`` has no field
  for it): the LDM parts' zero-initialised output convs already start their residual
  branches at zero; ``IUNet(..., layer_scale=1e-5)`` turns it on in every stage.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from meme.model.blocks import Downsample, IFormerBlock, ResBlock
from meme.model.config import ArchConfig, DataShape, arch_dict
from meme.model.unet import InputConv, TimeEmbedding, UNetDecoder

# Encoder entries whose output is not a skip connection (suffix of the ModuleDict key).
_NO_SKIP = "_res"


@dataclass(frozen=True)
class IFormerSpec:
    """What one encoder iFormer block of an iU-Net is: all its cost depends on."""

    width: int                  # d
    high: int                   # d_h
    resolution: int             # H = W of its input
    pool_stride: int            # attention avg-pool stride
    emb: int                    # timestep embedding width
    head_channels: int
    dropout: float

    def build(self) -> IFormerBlock:
        """The block exactly as ``IUNet`` builds it (layer scale off, its default)."""
        return IFormerBlock(self.width, self.high, self.emb, self.head_channels, self.pool_stride,
                            dropout=self.dropout)


def macro_key(arch: ArchConfig, data: DataShape) -> str:
    """Everything of an expert but its iFormer splits and pool strides: what the rest
    of an iU-Net (stem, ResBlocks, down convs, middle, decoder) depends on."""
    d = arch_dict(arch)
    d.pop("high_ratios"), d.pop("pool_strides")
    return json.dumps({"arch": d, "data": dataclasses.asdict(data)}, sort_keys=True)


def iformer_specs(arch: ArchConfig, data: DataShape) -> list[IFormerSpec]:
    """The encoder's iFormer blocks in build order (``IUNet`` builds exactly these)."""
    highs, emb = arch.high_channels(), arch.emb_channels()
    return [IFormerSpec(width, highs[s], data.resolution // 2 ** s, arch.pool_strides[s], emb,
                        arch.head_channels, arch.dropout)
            for s, width in enumerate(arch.stage_channels()) for _ in range(arch.num_res_blocks)]


class IUNet(nn.Module):
    """iU-Net: eps = net(x_t, t)."""

    def __init__(self,
        arch: ArchConfig,           # kind='iunet': widths, depth, high_ratios, pool_strides, head channels
        data: DataShape,            # channels and resolution of x
        layer_scale: Optional[float] = None,  # iFormer layer-scale init; None: off
    ):
        super().__init__()
        mc, gc = arch.base_channels, arch.group_channels
        emb = arch.emb_channels()
        self.time_embed = TimeEmbedding(arch.time_channels or mc, emb)
        self.enc = nn.ModuleDict()
        res = data.resolution
        self.enc[f"{res}x{res}_conv"] = InputConv(data.channels, mc)
        skips, ch = [mc], mc
        highs = arch.high_channels()
        for s, width in enumerate(arch.stage_channels()):
            if s > 0:
                res //= 2
                self.enc[f"{res}x{res}_down"] = Downsample(ch)
                skips.append(ch)
            self.enc[f"{res}x{res}{_NO_SKIP}"] = ResBlock(ch, width, emb, arch.dropout, gc)
            ch = width
            for i in range(arch.num_res_blocks):
                self.enc[f"{res}x{res}_block{i}"] = self.iformer_block(s, width, highs[s], emb, arch, layer_scale)
                skips.append(ch)
        self.decoder = UNetDecoder(arch, data, skips, emb, attention_ds=(), mid_attention=True)

    def iformer_block(self, stage: int, width: int, high: int, emb: int, arch: ArchConfig,
                      layer_scale: Optional[float]) -> nn.Module:
        """One encoder iFormer block of ``stage`` (the weight-shared supernet overrides this)."""
        return IFormerBlock(width, high, emb, arch.head_channels, arch.pool_strides[stage],
                            dropout=arch.dropout, layer_scale=layer_scale, group_channels=arch.group_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(t)
        skips = []
        for name, block in self.enc.items():
            x = block(x, emb)
            if not name.endswith(_NO_SKIP):
                skips.append(x)
        return self.decoder(x, emb, skips)
