"""A weight-shared iU-Net supernet: every legal width, d_h/d split and pool stride on one set of weights.

One supernet serves one macro shape (base width, stage multipliers, iFormer blocks per
stage, head width). A sub-network picks a **width** (a fraction of every channel count
from ``spec.widths``: slimmable, as DDSM), a d_h/d **split** per stage from the stage's grid,
and a **pool stride** per stage. With one width (the default) only the splits and strides
are elastic, and every weight outside the token mixers is used whole.

Width slicing (every module but the mixers)
-------------------------------------------
Channels are prefixes: a sub-network of width w runs the first w x C channels of every
C-channel feature map, so each weight takes its leading rows (outputs) and columns
(inputs). Three places are not one feature map, and are sliced per segment:

* a decoder ResBlock reads the concatenation [from below | skip]: its input norm, its
  first conv and its skip conv take the first channels of *each* segment (DDSM slices
  the concatenation as one prefix, so skip channels meet weights trained for the other
  path);
* an attention block's qkv conv writes [q | k | v]: each takes its first heads;
* the time embedding is not sliced at all: every width reads the full-width embedding
  (``ArchConfig.time_channels``), whose cost is per image, not per pixel.

A decoder narrower than the template's (``SupernetSpec.decoder_channels``, experts of
different decoder widths branching from one parent) is cut by the same rules, the encoder
whole: its blocks read [from below | the encoder's skip], and only the first segment narrows.

GroupNorm keeps a fixed number of channels per group (``ArchConfig.group_channels``, which
a supernet with several widths must set), so a group means the same at every width,
where DDSM's fixed 32 groups shrink to one channel at a quarter width.

Weight layout of an elastic mixer
---------------------------------
Width d (full), d_h in {D_min .. D_max} over every width's legal splits; H = D_max / 2
(largest high half), h_min = D_min / 2, L = d - D_min (largest low width), cat = 4H + L.
A sub-network of width d' <= d with split d_h (h = d_h / 2, d_l = d' - d_h = n heads x c)
uses:

==================  ====================  =================================================
tensor              supernet shape        slice a split d_h uses
==================  ====================  =================================================
conv_fc.weight      [2H, H, 1, 1]         [:2h, :h]           (reads x[0:h])
conv_dw.weight      [2H, 1, 3, 3]         [:2h]
pool_fc.weight      [2H, 2H - h_min]      [:2h, h - h_min : 2h - h_min]  (reads x[h:2h])
pool_fc.bias        [2H]                  [:2h]
qkv.weight          [3L, L, 1, 1]         rows k*L + [0, d_l) for k = q, k, v (the first n
                                          heads of each); columns [d_h - D_min, d' - D_min)
                                          (reads x[d_h:d'])
qkv.bias            [3L]                  the same rows
fuse_dw.weight      [cat, 1, 3, 3]        slots [0, 2h) + [2H, 2H + 2h) + [4H, 4H + d_l)
proj.weight         [d, cat, 1, 1]        rows [:d'], the same slots as columns
proj.bias           [d]                   [:d']
==================  ====================  =================================================

Two rules give this layout. **Inputs are tied to channels**: a weight column always
reads the same channel of the block's normalised input (channel c is channel c of the
residual stream whatever the split), so the conv branch reads columns [0, h), the pool
branch the columns of channels [h, 2h), the low branch those of [d_h, d'). **Outputs
take the first k slots** of their branch, OFA/BigNAS style: the conv and pool branches
their first 2h output channels, attention its first n heads (q, k and v alike); the
fusion depthwise conv and the projection index the same slots of the concatenation
[conv | pool | low]. A pool stride has no weights.

A sub-network's forward runs the very code of a plain ``IUNet(arch)``
(``torch.func.functional_call`` on a parameter-less template of it, with the slices
above), so ``extract(arch)`` -- a plain ``IUNet`` holding copies of those slices --
computes the same function, and has exactly that ``IUNet``'s parameters.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call

from meme.common.checkpoint import load as load_file
from meme.common.errors import UserError
from meme.model.blocks import IFormerBlock
from meme.model.config import (ArchConfig, ConfigError, DataShape, MemeConfig, arch_dict, is_head_step,
                               parse_fraction, plain, require)
from meme.model.iunet import IUNet

INDEX = "supernet.json"     # a trained supernet directory: this index + one folder per macro shape
TEMPLATES_KEPT = 64         # parameter-less sub-network templates a SuperNet keeps (oldest dropped first)


@dataclass(frozen=True)
class SupernetSpec:
    """The macro shape a supernet serves, and the splits and strides each stage may run."""

    template: ArchConfig                       # kind iunet: base, mult, blocks, head width (ratios ignored)
    data: DataShape                            # the shape it is trained on
    ratios: tuple[tuple[str, ...], ...]        # per stage: legal d_h/d at full width, ascending ("1/8", ...)
    pool_strides: tuple[tuple[int, ...], ...]  # per stage: legal avg-pool strides
    widths: tuple[str, ...] = ("1",)           # channel fractions a sub-network may run, ascending, last "1"
    decoder_channels: tuple[int, ...] = ()     # narrower decoders a sub-network may run (the template's is the widest)

    def validate(self) -> "SupernetSpec":
        n = self.template.num_stages
        require(self.template.kind == "iunet", "supernet: template.kind must be 'iunet'")
        require(len(self.ratios) == n and len(self.pool_strides) == n,
                f"supernet: needs one ratio list and one stride list per stage ({n})")
        fracs = [parse_fraction(w, "supernet: widths") for w in self.widths]
        require(bool(fracs) and fracs == sorted(set(fracs)) and fracs[-1] == 1 and fracs[0] > 0,
                f"supernet: widths must be distinct fractions in (0, 1], ascending, ending with 1; got {list(self.widths)}")
        require(len(fracs) == 1 or self.template.group_channels > 0,
                "supernet: several widths need template.group_channels (a fixed number of channels per GroupNorm "
                "group), so that a group means the same at every width")
        for w in self.widths:
            base = parse_fraction(w, "width") * self.template.base_channels
            require(base.denominator == 1, f"supernet: width {w} of base {self.template.base_channels} channels "
                                           f"is not a whole number of channels")
        for s in range(n):
            require(bool(self.ratios[s]) and bool(self.pool_strides[s]), f"supernet: stage {s + 1} has no choice")
            for r in self.ratios[s]:
                probe = [self.ratios[st][0] for st in range(n)]
                probe[s] = r
                self.arch(probe, [p[0] for p in self.pool_strides]).validate("supernet")
            for w in self.widths:
                require(bool(self.legal_ratios(s, w)), f"supernet: at width {w}, stage {s + 1} "
                                                       f"({self.stage_width(s, w)} channels) has no legal d_h/d among "
                                                       f"{list(self.ratios[s])} (d_l must be whole heads of "
                                                       f"{self.template.head_channels})")
        for w in self.widths:
            self.arch([self.legal_ratios(s, w)[0] for s in range(n)], [p[0] for p in self.pool_strides], w
                      ).validate(f"supernet: width {w}")
        if self.decoder_channels:   # decoders cut from the widest by prefix, per segment of their inputs
            widest = self.template.decoder_stage_channels()[0]
            require(self.widths == ("1",), "supernet: narrower decoders are offered at full width only")
            require(self.template.group_channels > 0, "supernet: decoders of several widths need "
                                                      "template.group_channels, so that a group means the same in each")
            for c in self.decoder_channels:
                require(0 < c < widest and c % self.template.group_channels == 0,
                        f"supernet: decoder width {c} must be a whole number of groups narrower than the "
                        f"template's {widest}")
        return self

    def stage_width(self, stage: int, width: str = "1") -> int:
        return int(parse_fraction(width, "width") * self.template.stage_channels()[stage])

    def legal_ratios(self, stage: int, width: str = "1") -> list[str]:
        """The stage's ratios that are head steps at this width (all of them at full width)."""
        d = self.stage_width(stage, width)
        return [r for r in self.ratios[stage]
                if is_head_step(parse_fraction(r, "ratio"), d, self.template.head_channels)]

    def arch(self, ratios, pools, width: str = "1") -> ArchConfig:
        """The sub-network with this width and these per-stage ratios and strides (a plain ArchConfig)."""
        return dataclasses.replace(at_width(self.template, width),
                                   high_ratios=tuple(str(parse_fraction(r, "ratio")) for r in ratios),
                                   pool_strides=tuple(int(p) for p in pools))

    def width_of(self, arch: ArchConfig) -> str:
        return str(Fraction(arch.base_channels, self.template.base_channels))

    def high_channels(self, stage: int) -> list[int]:
        """Every d_h the stage's mixer runs, over every width and its legal splits."""
        return sorted({int(parse_fraction(r, "ratio") * self.stage_width(stage, w))
                       for w in self.widths for r in self.legal_ratios(stage, w)})

    def check(self, arch: ArchConfig) -> None:
        """Raise a one-line ConfigError unless ``arch`` is a sub-network of this supernet."""
        t = self.template
        width = self.width_of(arch)
        same = dataclasses.replace(arch, high_ratios=t.high_ratios, pool_strides=t.pool_strides,
                                   base_channels=t.base_channels, time_channels=t.time_channels,
                                   decoder_channels=t.decoder_channels)
        require(same == t, f"architecture is not of this supernet's macro shape "
                           f"(base {t.base_channels}, blocks {t.num_res_blocks}, "
                           f"head {t.head_channels}, mult {list(t.channel_mult)}, "
                           f"groups of {t.group_channels or 'LDM'} channels)")
        if t.decoder_channels or self.decoder_channels:     # decoders of their own widths (validate: full width)
            decoders = {t.decoder_stage_channels()[0], *self.decoder_channels}
            require(arch.decoder_stage_channels()[0] in decoders,
                    f"decoder width {arch.decoder_stage_channels()[0]} is not one of the supernet's {sorted(decoders)}")
        else:                                               # a decoder follows its sub-network's width
            require(not arch.decoder_channels, f"decoder width {arch.decoder_channels}: this supernet's decoders are "
                                               f"as wide as their encoders ({arch.base_channels})")
        require(width in self.widths, f"width {width} ({arch.base_channels} base channels) is not one of the "
                                      f"supernet's {list(self.widths)}")
        for s, (r, p) in enumerate(zip(arch.high_fractions(), arch.pool_strides)):
            require(str(r) in self.legal_ratios(s, width),
                    f"stage {s + 1}: d_h/d {r} is not one of the supernet's {self.legal_ratios(s, width)}"
                    + (f" at width {width}" if width != "1" else ""))
            require(p in self.pool_strides[s], f"stage {s + 1}: pool stride {p} is not one of {list(self.pool_strides[s])}")
        want = dataclasses.replace(self.arch(arch.high_ratios, arch.pool_strides, width),
                                   decoder_channels=arch.decoder_channels)
        require(arch == want, f"width {width}: time_channels must be {want.time_channels}"
                              f" (the full-width time embedding), got {arch.time_channels}")

    def largest(self) -> ArchConfig:
        """Full width, most conv channels everywhere (uses every high slice)."""
        return self.arch([r[-1] for r in self.ratios], [p[0] for p in self.pool_strides])

    def smallest(self) -> ArchConfig:
        """At full width: most attention everywhere (uses every low slice). The narrowest
        sub-network is ``narrowest()``."""
        return self.arch([r[0] for r in self.ratios], [p[0] for p in self.pool_strides])

    def narrowest(self) -> ArchConfig:
        """The smallest width, with its most attention-heavy legal split (the sandwich rule's bottom)."""
        w = self.widths[0]
        return self.arch([self.legal_ratios(s, w)[0] for s in range(len(self.ratios))],
                         [p[0] for p in self.pool_strides], w)

    def to_dict(self) -> dict[str, Any]:
        d = {"template": arch_dict(self.template), "data": dataclasses.asdict(self.data),
             "ratios": [list(r) for r in self.ratios], "pool_strides": [list(p) for p in self.pool_strides]}
        if self.widths != ("1",):   # one width is not written: digests of earlier supernets stay the same
            d["widths"] = list(self.widths)
        if self.decoder_channels:
            d["decoder_channels"] = list(self.decoder_channels)
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "supernet spec") -> "SupernetSpec":
        require(isinstance(d, dict) and {"template", "data", "ratios", "pool_strides"} <= set(d),
                f"{source}: needs template, data, ratios and pool_strides")
        try:
            template = MemeConfig.from_dict({"name": "t", "experts": [d["template"]], "data": d["data"]},
                                            source).experts[0]
            spec = cls(template=template, data=DataShape(**d["data"]),
                       ratios=tuple(tuple(str(parse_fraction(r, source)) for r in row) for row in d["ratios"]),
                       pool_strides=tuple(tuple(int(p) for p in row) for row in d["pool_strides"]),
                       widths=tuple(str(parse_fraction(w, source)) for w in d.get("widths", ["1"])),
                       decoder_channels=tuple(int(c) for c in d.get("decoder_channels", [])))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return spec.validate()

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def at_width(arch: ArchConfig, width: str) -> ArchConfig:
    """``arch`` narrowed to ``width`` of its channels, as a slimmable supernet runs it: every
    channel count scaled, the time embedding kept at full width (it costs per image, not per
    pixel). The one rule ``SupernetSpec.arch`` and a space of network widths both follow."""
    base = int(parse_fraction(width, "width") * arch.base_channels)
    features = arch.time_channels or arch.base_channels
    return dataclasses.replace(arch, base_channels=base, time_channels=0 if base == features else features)


def arch_key(arch: ArchConfig, full_base: Optional[int] = None) -> str:
    """A sub-network's name inside its supernet: 'ratios|strides', e.g. '3/4,1/2|2,1', and
    '@width' when it is not the full width (``full_base``: the supernet's base channels)."""
    key = ",".join(arch.high_ratios) + "|" + ",".join(str(p) for p in arch.pool_strides)
    if full_base is not None and arch.base_channels != full_base:
        key += f"@{Fraction(arch.base_channels, full_base)}"
    return key


class ElasticInceptionMixer(nn.Module):
    """The weights of an iFormer token mixer that runs any split of ``highs`` at any width.

    Stored as the supernet-sized convs whose slices the plain mixer's convs are (layout in
    the module docstring); ``sub_parameters`` gives the slices. It has no forward of its
    own: a sub-network runs the plain ``InceptionMixer`` code on them (``SuperNet``).
    """

    def __init__(self,
        channels: int,              # d
        highs: list[int],           # legal d_h (even), any order; pool strides have no weights
    ):
        super().__init__()
        self.d = channels
        self.highs = sorted(highs)
        d_min, d_max = self.highs[0], self.highs[-1]
        self.H, self.h_min, self.L = d_max // 2, d_min // 2, channels - d_min
        H, L = self.H, self.L
        if H > 0:
            self.conv_fc = nn.Conv2d(H, 2 * H, 1, bias=False)
            self.conv_dw = nn.Conv2d(2 * H, 2 * H, 3, padding=1, groups=2 * H, bias=False)
            self.pool_fc = nn.Conv2d(max(1, 2 * H - self.h_min), 2 * H, 1)
        self.qkv = nn.Conv2d(L, 3 * L, 1)
        cat = 4 * H + L
        self.fuse_dw = nn.Conv2d(cat, cat, 3, padding=1, groups=cat, bias=False)
        self.proj = nn.Conv2d(cat, channels, 1)

    def sub_parameters(self, high: int, channels: Optional[int] = None) -> dict[str, torch.Tensor]:
        """The slices a plain ``InceptionMixer(channels, high, ...)`` is made of, by its parameter
        names (``channels``: the sub-network's width d', default the full d)."""
        d = self.d if channels is None else channels
        if high not in self.highs or not high <= d <= self.d:
            raise ConfigError(f"split d_h={high} at width {d} is not one of d_h {self.highs} (width <= {self.d}) "
                              f"of this block")
        h, H, L = high // 2, self.H, self.L
        d_l = d - high
        out: dict[str, torch.Tensor] = {}
        if h > 0:
            out["high.conv_fc.weight"] = self.conv_fc.weight[:2 * h, :h]
            out["high.conv_dw.weight"] = self.conv_dw.weight[:2 * h]
            out["high.pool_fc.weight"] = self.pool_fc.weight[:2 * h, h - self.h_min:2 * h - self.h_min]
            out["high.pool_fc.bias"] = self.pool_fc.bias[:2 * h]
        off = high - (self.d - L)
        rows = [slice(k * L, k * L + d_l) for k in range(3)]
        out["low.qkv.weight"] = torch.cat([self.qkv.weight[r, off:off + d_l] for r in rows])
        out["low.qkv.bias"] = torch.cat([self.qkv.bias[r] for r in rows])
        slots = [slice(0, 2 * h), slice(2 * H, 2 * H + 2 * h), slice(4 * H, 4 * H + d_l)]
        out["fuse_dw.weight"] = torch.cat([self.fuse_dw.weight[s] for s in slots])
        out["proj.weight"] = torch.cat([self.proj.weight[:d, s] for s in slots], dim=1)
        out["proj.bias"] = self.proj.bias[:d]
        return out


class SuperNet(IUNet):
    """The iU-Net of a ``SupernetSpec``, full width, with elastic mixers; ``activate(arch)`` picks
    the sub-network that ``forward`` runs."""

    def __init__(self, spec: SupernetSpec):
        spec.validate()
        self.spec = spec
        super().__init__(spec.largest(), spec.data)
        self.active: Optional[ArchConfig] = None
        self._templates: dict[ArchConfig, IUNet] = {}
        self.activate(spec.largest())

    def iformer_block(self, stage: int, width: int, high: int, emb: int, arch: ArchConfig,
                      layer_scale: Optional[float]) -> nn.Module:
        mixer = ElasticInceptionMixer(width, self.spec.high_channels(stage))
        mixer.stage = stage
        return IFormerBlock(width, high, emb, arch.head_channels, dropout=arch.dropout,
                            layer_scale=layer_scale, mixer=mixer, group_channels=arch.group_channels)

    def mixers(self) -> list[ElasticInceptionMixer]:
        return [m for m in self.modules() if isinstance(m, ElasticInceptionMixer)]

    def activate(self, arch: ArchConfig) -> "SuperNet":
        """Run ``arch`` from now on (one-line ConfigError if it is not a sub-network)."""
        self.spec.check(arch)
        self.active = arch
        return self

    def template(self, arch: ArchConfig) -> IUNet:
        """A parameter-less plain ``IUNet(arch)`` (meta device): the code every sub-network runs.
        Built once per architecture, after ``spec.check`` (so a forward does not re-check)."""
        if arch not in self._templates:
            self.spec.check(arch)
            if len(self._templates) >= TEMPLATES_KEPT:      # a search activates hundreds: keep the latest
                self._templates.pop(next(iter(self._templates)))
            with torch.device("meta"):
                self._templates[arch] = IUNet(arch, self.spec.data)
        return self._templates[arch]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.run(self.active, x, t)

    def run(self, arch: ArchConfig, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``IUNet(arch)(x, t)`` on these weights' slices, whatever is active."""
        return functional_call(self.template(arch), self.sub_state_dict(arch), (x, t))

    def sub_network(self, arch: ArchConfig) -> "SubNetwork":
        """A module that runs ``arch`` on these weights (no copy): a schedule's expert."""
        self.spec.check(arch)
        return SubNetwork(self, arch)

    def sub_state_dict(self, arch: ArchConfig) -> dict[str, torch.Tensor]:
        """``IUNet(arch)``'s state dict, as slices of these weights (views where one slice
        suffices, a concatenation where the layout takes several)."""
        sub = self.template(arch)
        highs, widths = arch.high_channels(), arch.stage_channels()
        out: dict[str, torch.Tensor] = {}
        elastic = {name: m for name, m in self.named_modules() if isinstance(m, ElasticInceptionMixer)}
        for name, m in elastic.items():
            for k, v in m.sub_parameters(highs[m.stage], widths[m.stage]).items():
                out[f"{name}.{k}"] = v
        full = dict(self.named_parameters())
        full.update(self.named_buffers())
        for name, target in list(sub.named_parameters()) + list(sub.named_buffers()):
            if name in out:
                continue
            if name in full:
                out[name] = _width_slice(name, full[name], tuple(target.shape), self, sub)
            else:   # a 1x1 skip conv where the full network's ResBlock is in == out: its identity, cut
                out[name] = _identity_slice(name, tuple(target.shape), self, sub, next(self.parameters()))
        return out

    def sub_param_count(self, arch: ArchConfig) -> int:
        """``IUNet(arch)``'s parameter count, from its slices: no network is built."""
        return sum(p.numel() for p in self.template(arch).parameters())

    def extract(self, arch: ArchConfig) -> IUNet:
        """A plain ``IUNet(arch)`` holding copies of its slices: same outputs, its own parameters."""
        device = next(self.parameters()).device
        with torch.device(device):
            net = IUNet(arch, self.spec.data)
        net.load_state_dict({k: v.detach().clone() for k, v in self.sub_state_dict(arch).items()}, strict=True)
        return net


class SubNetwork(nn.Module):
    """One sub-network of a ``SuperNet`` as a denoiser of its own, holding no weights of its
    own: several of them (a schedule's experts) run on one resident supernet."""

    def __init__(self, supernet: SuperNet, arch: ArchConfig):
        super().__init__()
        self.supernet, self.arch = supernet, arch

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.supernet.run(self.arch, x, t)


# A decoder ResBlock's parameters that read its input, the concatenation [from below | skip],
# by the dimension that indexes the input channels.
_CONCAT_INPUTS = {"res.in_layers.0.weight": 0, "res.in_layers.0.bias": 0, "res.in_layers.2.weight": 1,
                  "res.skip.weight": 1}


def _segments(full: tuple[int, ...], sub: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """Indices of the first ``sub[i]`` entries of each of the segments ``full`` lays end to end,
    made on ``device`` (a view's forward may run inside a CUDA graph capture, where a copy
    from host memory is not allowed)."""
    starts = [sum(full[:i]) for i in range(len(full))]
    return torch.cat([torch.arange(a, a + n, device=device) for a, n in zip(starts, sub)])


def _input_index(name: str, n: int, full_net: IUNet, sub_net: IUNet, device: torch.device | None = None) -> torch.Tensor:
    """Which of the full network's input channels a sub-network's weight ``name`` reads: the
    first of each segment of a decoder block's concatenation, else the first ``n``."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "dec"] and ".".join(parts[3:]) in _CONCAT_INPUTS:
        return _segments(full_net.decoder.concat_channels[parts[2]], sub_net.decoder.concat_channels[parts[2]],
                         device)
    return torch.arange(n, device=device)


def _identity_slice(name: str, shape: tuple[int, ...], full_net: IUNet, sub_net: IUNet,
                    like: torch.Tensor) -> torch.Tensor:
    """A sub-network's 1x1 skip conv where the full network adds the block's input unchanged
    (a narrower decoder's block maps C -> C' < C): the slice of that identity, output c reading
    input channel c. A constant, since the full network holds no weight there."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    idx = _input_index(name, shape[1], full_net, sub_net, like.device)
    eye = idx[None, :] == torch.arange(shape[0], device=like.device)[:, None]
    return eye.to(like.dtype)[:, :, None, None]


def _width_slice(name: str, weight: torch.Tensor, shape: tuple[int, ...], full_net: IUNet,
                 sub_net: IUNet) -> torch.Tensor:
    """A non-mixer weight of the full-width network cut to a narrower network's ``shape``:
    leading entries of every dimension, except the per-segment inputs of a decoder
    ResBlock and the [q | k | v] outputs of an attention block (module docstring)."""
    if tuple(weight.shape) == shape:
        return weight
    parts = name.split(".")
    if parts[:2] == ["decoder", "dec"] and ".".join(parts[3:]) in _CONCAT_INPUTS:
        dim = _CONCAT_INPUTS[".".join(parts[3:])]
        idx = _input_index(name, 0, full_net, sub_net, weight.device)
        weight = weight.index_select(dim, idx)
    elif parts[-2] == "qkv" and parts[-3] == "attn":
        idx = _segments((weight.shape[0] // 3,) * 3, (shape[0] // 3,) * 3, weight.device)
        weight = weight.index_select(0, idx)
    return weight[tuple(slice(0, n) for n in shape)]


# ---- trained supernet directories (written by nas.evaluators.supernet_training train) ----------------------

def load_index(path: str | Path) -> dict[str, Any]:
    """A supernet directory's index, with a one-line error when it is not one."""
    p = Path(path) / INDEX
    if not p.is_file():
        raise UserError(f"{path}: not a trained supernet directory (no {INDEX}); "
                        f"make one with meme-nas supernet train --space S --out {path}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: damaged index ({exc.msg} at line {exc.lineno})") from None


def load_supernet(path: str | Path, entry: dict[str, Any], device: torch.device) -> SuperNet:
    """One macro's trained supernet, on ``device`` (weights only: nothing in the file runs)."""
    spec = SupernetSpec.from_dict(entry["spec"], f"{path}/{entry['dir']}/spec")
    net = SuperNet(spec)
    weights = Path(path) / entry["dir"] / "supernet.pt"
    try:
        state = load_file(weights, what="supernet weights")
        net.load_state_dict(state)
    except (RuntimeError, OSError, KeyError, EOFError) as exc:
        raise UserError(f"{weights}: cannot load this supernet ({str(exc).splitlines()[0][:200]})") from None
    return net.to(device).eval()


def supernet_for(path: str | Path, arch: ArchConfig, device: torch.device) -> SuperNet:
    """The trained supernet in ``path`` whose macro shape serves ``arch`` (one-line error if none)."""
    index = load_index(path)
    for name, entry in sorted(index.get("macros", {}).items()):
        spec = SupernetSpec.from_dict(entry["spec"], f"{path}/{name}/spec")
        try:
            spec.check(arch)
        except ConfigError:
            continue
        return load_supernet(path, entry, device)
    raise UserError(f"{path}: no trained supernet serves this architecture (a search trains its supernets at "
                    f"the proxy's shape; macros "
                    f"{sorted(index.get('macros', {}))}; base {arch.base_channels}, blocks {arch.num_res_blocks}, "
                    f"ratios {list(arch.high_ratios)}, pools {list(arch.pool_strides)})")
