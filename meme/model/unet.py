"""latent-diffusion's ``UNetModel`` (openaimodel), the paper's LDM-S / LDM-L baseline.

Same structure and parameter count as CompVis/latent-diffusion with
``use_scale_shift_norm=False``, ``conv_resample=True``, ``num_head_channels`` set:
time MLP (mc -> 4mc -> 4mc), input conv, per level ``num_res_blocks`` ResBlocks
(+ attention where the downsample factor is in ``attention_ds``) and a stride-2 conv
between levels, a ResBlock-Attention-ResBlock middle, and a decoder of
``num_res_blocks + 1`` ResBlocks per level fed by skip connections.

Modules are kept in ``nn.ModuleDict``s keyed by resolution (``64x64_block0``,
``32x32_down``, ...), as in NVlabs/edm2, so ``print(model)`` reads as the architecture.
Every encoder entry pushes one skip; every decoder ``block`` entry pops one.
"""
from __future__ import annotations

import torch
from torch import nn

from meme.model.blocks import Downsample, GroupNorm32, ResAttnBlock, Upsample, timestep_embedding, zero_module
from meme.model.config import ArchConfig, DataShape


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t -> MLP (mc -> 4mc -> 4mc), shared by all blocks."""

    def __init__(self,
        model_channels: int,        # width of the sinusoidal features (= base channels)
        emb_channels: int,          # width of the embedding (4 x base in LDM)
    ):
        super().__init__()
        self.model_channels = model_channels
        self.mlp = nn.Sequential(nn.Linear(model_channels, emb_channels), nn.SiLU(),
                                 nn.Linear(emb_channels, emb_channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.model_channels)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class InputConv(nn.Module):
    """3x3 conv from data channels to the base width (``emb`` accepted, unused)."""

    def __init__(self,
        in_channels: int,           # data channels
        out_channels: int,          # base width
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class OutputHead(nn.Module):
    """GroupNorm-SiLU-zero-init 3x3 conv: predicts eps, starting from exactly zero."""

    def __init__(self,
        in_channels: int,           # decoder width at full resolution
        out_channels: int,          # data channels
        group_channels: int = 0,    # channels per GroupNorm group; 0: LDM's 32 groups
    ):
        super().__init__()
        self.norm = GroupNorm32(in_channels, group_channels=group_channels)
        self.act = nn.SiLU()
        self.conv = zero_module(nn.Conv2d(in_channels, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


class UNetDecoder(nn.Module):
    """Middle block + skip-fed decoder + output head, shared by the U-Net and the iU-Net.

    ``skip_channels`` lists the channels of every skip in push order; the decoder
    consumes them in reverse with ``num_res_blocks + 1`` ResBlocks per level.
    """

    def __init__(self,
        arch: ArchConfig,           # widths, depth, attention placement
        data: DataShape,            # output channels and top resolution
        skip_channels: list[int],   # channels of every skip connection, push order
        emb_channels: int,          # timestep embedding width
        attention_ds: tuple[int, ...],  # downsample factors with decoder attention
        mid_attention: bool = True,  # attention between the two middle ResBlocks
    ):
        super().__init__()
        widths = arch.decoder_stage_channels()   # its own width: the skips bring the encoder's
        levels = len(widths)
        hc, drop, gc = arch.head_channels, arch.dropout, arch.group_channels
        skips = list(skip_channels)
        # per decoder block: (channels from below, channels of its skip), the two segments of
        # its input concatenation (a width-sliced supernet slices each one on its own)
        self.concat_channels: dict[str, tuple[int, int]] = {}
        ch = skips[-1]
        ds = 2 ** (levels - 1)
        res = data.resolution // ds
        self.mid = nn.ModuleDict()
        self.mid[f"{res}x{res}_mid0"] = ResAttnBlock(ch, ch, emb_channels, mid_attention, hc, drop, gc)
        self.mid[f"{res}x{res}_mid1"] = ResAttnBlock(ch, ch, emb_channels, False, hc, drop, gc)
        self.dec = nn.ModuleDict()
        for level in reversed(range(levels)):
            out = widths[level]
            for i in range(arch.num_res_blocks + 1):
                skip = skips.pop()
                self.concat_channels[f"{res}x{res}_block{i}"] = (ch, skip)
                self.dec[f"{res}x{res}_block{i}"] = ResAttnBlock(
                    ch + skip, out, emb_channels, ds in attention_ds, hc, drop, gc)
                ch = out
            if level > 0:
                self.dec[f"{res}x{res}_up"] = Upsample(ch)
                ds //= 2
                res *= 2
        assert not skips, "encoder pushed more skips than the decoder consumes"
        self.out = OutputHead(ch, data.channels, gc)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for block in self.mid.values():
            x = block(x, emb)
        for name, block in self.dec.items():
            if "block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out(x)


class UNet(nn.Module):
    """LDM UNetModel: eps = net(x_t, t)."""

    def __init__(self,
        arch: ArchConfig,           # kind='unet': widths, depth, attention_ds, head channels
        data: DataShape,            # channels and resolution of x
    ):
        super().__init__()
        mc = arch.base_channels
        emb = arch.emb_channels()
        self.time_embed = TimeEmbedding(arch.time_channels or mc, emb)
        self.enc = nn.ModuleDict()
        res, ds = data.resolution, 1
        self.enc[f"{res}x{res}_conv"] = InputConv(data.channels, mc)
        skips, ch = [mc], mc
        for level, width in enumerate(arch.stage_channels()):
            if level > 0:
                res //= 2
                ds *= 2
                self.enc[f"{res}x{res}_down"] = Downsample(ch)
                skips.append(ch)
            for i in range(arch.num_res_blocks):
                self.enc[f"{res}x{res}_block{i}"] = ResAttnBlock(
                    ch, width, emb, ds in arch.attention_ds, arch.head_channels, arch.dropout, arch.group_channels)
                ch = width
                skips.append(ch)
        self.decoder = UNetDecoder(arch, data, skips, emb, tuple(arch.attention_ds), mid_attention=True)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(t)
        skips = []
        for block in self.enc.values():
            x = block(x, emb)
            skips.append(x)
        return self.decoder(x, emb, skips)

