"""A weight-shared iU-Net supernet: every legal d_h/d split and pool stride on one set of weights.

One supernet serves one macro shape (base width, stage multipliers, iFormer blocks per
stage, head width). Each iFormer block's token mixer is elastic: it runs any d_h of its
stage's grid and any pool stride the spec allows. Everything else (time embedding,
input conv, ResBlocks, stride-2 convs, norms, the time projection and MLP of each
iFormer block, the middle block and the whole decoder) does not depend on the split
and is one plain module, used by every sub-network as it is.

Weight layout of an elastic mixer
---------------------------------
Width d, stage grid d_h in {D_min .. D_max}; H = D_max / 2 (largest high half),
h_min = D_min / 2, L = d - D_min (largest low width), cat = 4H + L. A sub-network with
split d_h (h = d_h / 2, d_l = d - d_h = n heads x c) uses:

==================  ====================  =================================================
tensor              supernet shape        slice a split d_h uses
==================  ====================  =================================================
conv_fc.weight      [2H, H, 1, 1]         [:2h, :h]           (reads x[0:h])
conv_dw.weight      [2H, 1, 3, 3]         [:2h]
pool_fc.weight      [2H, 2H - h_min]      [:2h, h - h_min : 2h - h_min]  (reads x[h:2h])
pool_fc.bias        [2H]                  [:2h]
qkv.weight          [3L, L, 1, 1]         rows k*L + [0, d_l) for k = q, k, v (the first n
                                          heads of each); columns [d_h - D_min, L)
                                          (reads x[d_h:d])
qkv.bias            [3L]                  the same rows
fuse_dw.weight      [cat, 1, 3, 3]        slots [0, 2h) + [2H, 2H + 2h) + [4H, 4H + d_l)
proj.weight         [d, cat, 1, 1]        the same slots as columns
proj.bias           [d]                   all
==================  ====================  =================================================

Two rules give this layout. **Inputs are tied to channels**: a weight column always
reads the same channel of the block's normalised input (channel c is channel c of the
residual stream whatever the split), so the conv branch reads columns [0, h), the pool
branch the columns of channels [h, 2h), the low branch those of [d_h, d). **Outputs
take the first k slots** of their branch, OFA/BigNAS style: the conv and pool branches
their first 2h output channels, attention its first n heads (q, k and v alike); the
fusion depthwise conv and the projection index the same slots of the concatenation
[conv | pool | low]. A pool stride has no weights.

A sub-network's forward runs the very ``InceptionMixer`` code of a plain ``IUNet``
(``torch.func.functional_call`` on a parameter-less template with the slices above), so
``extract(arch)`` -- a plain ``IUNet`` holding copies of those slices -- computes the
same function, and has exactly that ``IUNet``'s parameters.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call

from meme.common.checkpoint import load as load_file
from meme.common.errors import UserError
from meme.model.blocks import IFormerBlock, InceptionMixer
from meme.model.config import ArchConfig, ConfigError, DataShape, MemeConfig, parse_fraction, plain, require
from meme.model.iunet import IUNet

INDEX = "supernet.json"     # a trained supernet directory: this index + one folder per macro shape


@dataclass(frozen=True)
class SupernetSpec:
    """The macro shape a supernet serves, and the splits and strides each stage may run."""

    template: ArchConfig                       # kind iunet: base, mult, blocks, head width (ratios ignored)
    data: DataShape                            # the shape it is trained on
    ratios: tuple[tuple[str, ...], ...]        # per stage: legal d_h/d, ascending ("1/8", ...)
    pool_strides: tuple[tuple[int, ...], ...]  # per stage: legal avg-pool strides

    def validate(self) -> "SupernetSpec":
        n = self.template.num_stages
        require(self.template.kind == "iunet", "supernet: template.kind must be 'iunet'")
        require(len(self.ratios) == n and len(self.pool_strides) == n,
                f"supernet: needs one ratio list and one stride list per stage ({n})")
        for s in range(n):
            require(bool(self.ratios[s]) and bool(self.pool_strides[s]), f"supernet: stage {s + 1} has no choice")
            for r in self.ratios[s]:
                probe = [self.ratios[st][0] for st in range(n)]
                probe[s] = r
                self.arch(probe, [p[0] for p in self.pool_strides]).validate("supernet")
        return self

    def arch(self, ratios, pools) -> ArchConfig:
        """The sub-network with these per-stage ratios and strides (a plain ArchConfig)."""
        return dataclasses.replace(self.template, high_ratios=tuple(str(parse_fraction(r, "ratio")) for r in ratios),
                                   pool_strides=tuple(int(p) for p in pools))

    def high_channels(self, stage: int) -> list[int]:
        width = self.template.stage_channels()[stage]
        return [int(parse_fraction(r, "ratio") * width) for r in self.ratios[stage]]

    def check(self, arch: ArchConfig) -> None:
        """Raise a one-line ConfigError unless ``arch`` is a sub-network of this supernet."""
        same = dataclasses.replace(arch, high_ratios=self.template.high_ratios, pool_strides=self.template.pool_strides)
        require(same == self.template, f"architecture is not of this supernet's macro shape "
                                       f"(base {self.template.base_channels}, blocks {self.template.num_res_blocks}, "
                                       f"head {self.template.head_channels}, mult {list(self.template.channel_mult)})")
        for s, (r, p) in enumerate(zip(arch.high_fractions(), arch.pool_strides)):
            require(str(r) in self.ratios[s], f"stage {s + 1}: d_h/d {r} is not one of the supernet's "
                                              f"{list(self.ratios[s])}")
            require(p in self.pool_strides[s], f"stage {s + 1}: pool stride {p} is not one of {list(self.pool_strides[s])}")

    def largest(self) -> ArchConfig:
        """Most conv channels everywhere (uses every high slice)."""
        return self.arch([r[-1] for r in self.ratios], [p[0] for p in self.pool_strides])

    def smallest(self) -> ArchConfig:
        """Most attention everywhere (uses every low slice)."""
        return self.arch([r[0] for r in self.ratios], [p[0] for p in self.pool_strides])

    def to_dict(self) -> dict[str, Any]:
        return {"template": plain(dataclasses.asdict(self.template)), "data": dataclasses.asdict(self.data),
                "ratios": [list(r) for r in self.ratios], "pool_strides": [list(p) for p in self.pool_strides]}

    @classmethod
    def from_dict(cls, d: Any, source: str = "supernet spec") -> "SupernetSpec":
        require(isinstance(d, dict) and {"template", "data", "ratios", "pool_strides"} <= set(d),
                f"{source}: needs template, data, ratios and pool_strides")
        try:
            template = MemeConfig.from_dict({"name": "t", "experts": [d["template"]], "data": d["data"]},
                                            source).experts[0]
            spec = cls(template=template, data=DataShape(**d["data"]),
                       ratios=tuple(tuple(str(parse_fraction(r, source)) for r in row) for row in d["ratios"]),
                       pool_strides=tuple(tuple(int(p) for p in row) for row in d["pool_strides"]))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return spec.validate()

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def arch_key(arch: ArchConfig) -> str:
    """A sub-network's name inside its supernet: 'ratios|strides', e.g. '3/4,1/2|2,1'."""
    return ",".join(arch.high_ratios) + "|" + ",".join(str(p) for p in arch.pool_strides)


class ElasticInceptionMixer(nn.Module):
    """An iFormer token mixer that runs any split of ``highs`` and any stride of ``strides``.

    ``active = (d_h, stride)`` picks the sub-network; the weight layout is in the module
    docstring. The parameters are stored as the supernet-sized convs whose slices the
    plain mixer's convs are.
    """

    def __init__(self,
        channels: int,              # d
        highs: list[int],           # legal d_h (even), any order
        head_channels: int,         # channels per attention head
        strides: list[int],         # legal avg-pool strides
    ):
        super().__init__()
        self.d = channels
        self.highs, self.strides, self.head_channels = sorted(highs), sorted(strides), head_channels
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
        self.active = (d_max, self.strides[0])
        self._templates: dict[tuple[int, int], InceptionMixer] = {}

    def set_active(self, high: int, stride: int) -> None:
        if high not in self.highs or stride not in self.strides:
            raise ConfigError(f"split d_h={high}, stride {stride} is not one of d_h {self.highs}, "
                              f"strides {self.strides} of this {self.d}-channel block")
        self.active = (high, stride)

    def sub_parameters(self, high: int) -> dict[str, torch.Tensor]:
        """The slices a plain ``InceptionMixer(d, high, ...)`` is made of, by its parameter names."""
        h, H, L = high // 2, self.H, self.L
        d_l = self.d - high
        out: dict[str, torch.Tensor] = {}
        if h > 0:
            out["high.conv_fc.weight"] = self.conv_fc.weight[:2 * h, :h]
            out["high.conv_dw.weight"] = self.conv_dw.weight[:2 * h]
            out["high.pool_fc.weight"] = self.pool_fc.weight[:2 * h, h - self.h_min:2 * h - self.h_min]
            out["high.pool_fc.bias"] = self.pool_fc.bias[:2 * h]
        off = high - (self.d - L)
        rows = [slice(k * L, k * L + d_l) for k in range(3)]
        out["low.qkv.weight"] = torch.cat([self.qkv.weight[r, off:] for r in rows])
        out["low.qkv.bias"] = torch.cat([self.qkv.bias[r] for r in rows])
        slots = [slice(0, 2 * h), slice(2 * H, 2 * H + 2 * h), slice(4 * H, 4 * H + d_l)]
        out["fuse_dw.weight"] = torch.cat([self.fuse_dw.weight[s] for s in slots])
        out["proj.weight"] = torch.cat([self.proj.weight[:, s] for s in slots], dim=1)
        out["proj.bias"] = self.proj.bias
        return out

    def template(self, high: int, stride: int) -> InceptionMixer:
        """A parameter-less plain mixer of this split (meta device): the code every split runs."""
        key = (high, stride)
        if key not in self._templates:
            with torch.device("meta"):
                self._templates[key] = InceptionMixer(self.d, high, self.head_channels, stride)
        return self._templates[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high, stride = self.active
        return functional_call(self.template(high, stride), self.sub_parameters(high), (x,))


class SuperNet(IUNet):
    """The iU-Net of a ``SupernetSpec`` with elastic mixers; ``activate(arch)`` picks a sub-network."""

    def __init__(self, spec: SupernetSpec):
        spec.validate()
        self.spec = spec
        super().__init__(spec.largest(), spec.data)
        self.active: Optional[ArchConfig] = None
        self.activate(spec.largest())

    def iformer_block(self, stage: int, width: int, high: int, emb: int, arch: ArchConfig,
                      layer_scale: Optional[float]) -> nn.Module:
        mixer = ElasticInceptionMixer(width, self.spec.high_channels(stage), arch.head_channels,
                                      list(self.spec.pool_strides[stage]))
        mixer.stage = stage
        return IFormerBlock(width, high, emb, arch.head_channels, dropout=arch.dropout,
                            layer_scale=layer_scale, mixer=mixer)

    def mixers(self) -> list[ElasticInceptionMixer]:
        return [m for m in self.modules() if isinstance(m, ElasticInceptionMixer)]

    def activate(self, arch: ArchConfig) -> "SuperNet":
        """Run ``arch`` from now on (one-line ConfigError if it is not a sub-network)."""
        self.spec.check(arch)
        highs = arch.high_channels()
        for m in self.mixers():
            m.set_active(highs[m.stage], arch.pool_strides[m.stage])
        self.active = arch
        return self

    def sub_state_dict(self, arch: ArchConfig) -> dict[str, torch.Tensor]:
        """``IUNet(arch)``'s state dict, as slices of these weights (not copies)."""
        self.spec.check(arch)
        highs = arch.high_channels()
        out: dict[str, torch.Tensor] = {}
        elastic = {name: m for name, m in self.named_modules() if isinstance(m, ElasticInceptionMixer)}
        for name, m in elastic.items():
            for k, v in m.sub_parameters(highs[m.stage]).items():
                out[f"{name}.{k}"] = v
        for name, p in list(self.named_parameters()) + list(self.named_buffers()):
            if not any(name.startswith(e + ".") for e in elastic):
                out[name] = p
        return out

    def sub_param_count(self, arch: ArchConfig) -> int:
        """``IUNet(arch)``'s parameter count, from its slices: no network is built."""
        buffers = {name for name, _ in self.named_buffers()}
        return sum(v.numel() for k, v in self.sub_state_dict(arch).items() if k not in buffers)

    def extract(self, arch: ArchConfig) -> IUNet:
        """A plain ``IUNet(arch)`` holding copies of its slices: same outputs, its own parameters."""
        device = next(self.parameters()).device
        with torch.device(device):
            net = IUNet(arch, self.spec.data)
        net.load_state_dict({k: v.detach().clone() for k, v in self.sub_state_dict(arch).items()}, strict=True)
        return net


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
