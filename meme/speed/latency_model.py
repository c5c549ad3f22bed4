"""A per-block latency table: a candidate's step time priced without timing its network.

FBNet and OFA price candidates from per-operator tables measured on the device; this
table does the same at the grain the search varies. A search moves the d_h/d split
and the pool stride of each stage's iFormer blocks; everything else of an iU-Net (the
stem, the ResBlocks, the down convs, the middle, the whole decoder) depends only on
its *macro* shape (base width, stage widths, blocks per stage, data shape). So:

    ms(expert) = rest(macro) + overhead(macro) + sum over its iFormer blocks of ms(block)

* ``ms(block)``: each distinct iFormer block (width, d_h, resolution, pool stride,
  embedding width, precision) timed once, alone, on its real input shape;
* ``rest(macro)``: every other top-level block of a calibration network of that macro,
  each timed alone on the input it receives there (forward pre-hooks);
* ``overhead(macro)``: a calibration network's whole forward minus all its blocks
  timed alone: skip concatenations, the Python between blocks, cache effects.
  Both are medians over a few calibration networks of the macro.

Pricing from a built table is dictionary look-ups (microseconds); a missing entry is
measured on demand by ``ensure``. A table belongs to one device, batch, precision
setting, torch version and network code (``table_key``); its JSON file records them,
and how many seconds of measuring went into it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from meme.common.checkpoint import atomic_write_json
from meme.model.blocks import IFormerBlock
from meme.model.config import ArchConfig, DataShape, MemeConfig
from meme.model.iunet import IFormerSpec, iformer_specs, macro_key
from meme.model.macs import source_fingerprint
from meme.speed.latency import LATENCY_VERSION, Setting, build_timed, cache_dir, precision_of, time_module, time_network

TABLE_VERSION = 1


def table_meta(setting: Setting) -> dict:
    """What a table's figures depend on, besides the blocks themselves."""
    return {"device": setting.label(), "batch": setting.batch, "precision": setting.precision,
            "compile": setting.compile, "clock": setting.resolved_clock(), "torch": torch.__version__, "src": source_fingerprint(),
            **({"graphs": True} if setting.uses_graphs() else {}),
            "version": [LATENCY_VERSION, TABLE_VERSION]}


def table_key(setting: Setting) -> str:
    return hashlib.sha1(json.dumps(table_meta(setting), sort_keys=True).encode()).hexdigest()[:16]


def default_table_path(setting: Setting) -> Optional[Path]:
    d = cache_dir()
    return None if d is None else d / f"table-{table_key(setting)}.json"


def block_key(spec: IFormerSpec, precision: str) -> str:
    return (f"iformer d{spec.width} dh{spec.high} r{spec.resolution} p{spec.pool_stride} e{spec.emb} "
            f"hc{spec.head_channels} drop{spec.dropout:g} {precision}")


@dataclass
class MacroEntry:
    rest_ms: float              # every non-iFormer block, each timed alone
    overhead_ms: float          # whole forward - every block timed alone (calibration network)
    whole_ms: float             # a calibration network's forward (median over them)
    calibrated_on: str          # the calibration networks' high_ratios / pool_strides


@dataclass(frozen=True)
class Priced:
    """A candidate's step time from the table."""

    experts_ms: list[float]
    weights: list[float]

    @property
    def ms_mean(self) -> float:
        return sum(w * m for w, m in zip(self.weights, self.experts_ms))

    @property
    def ms_max(self) -> float:
        return max(self.experts_ms)


def top_blocks(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks a network's forward calls one after another: every entry of its
    ModuleDicts, plus the time embedding and the output head."""
    out = []
    for name, m in net.named_modules():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if isinstance(net.get_submodule(parent) if parent else net, nn.ModuleDict) or \
                name in ("time_embed", "decoder.out"):
            out.append((name, m))
    return out


@dataclass
class LatencyTable:
    setting: Setting
    meta: dict
    blocks: dict[str, float] = field(default_factory=dict)
    macros: dict[str, MacroEntry] = field(default_factory=dict)
    build_s: float = 0.0        # seconds of measuring spent on this table

    @classmethod
    def empty(cls, setting: Setting) -> "LatencyTable":
        return cls(setting, table_meta(setting))

    # ---- pricing ----

    def missing(self, arch: ArchConfig, data: DataShape) -> bool:
        prec = precision_of(arch, self.setting)
        return macro_key(arch, data) not in self.macros or any(
            block_key(s, prec) not in self.blocks for s in iformer_specs(arch, data))

    def price(self, arch: ArchConfig, data: DataShape) -> float:
        """ms of one expert's forward; KeyError when the table lacks an entry (see ``ensure``)."""
        if arch.kind != "iunet":
            raise KeyError(f"the latency table prices iU-Net experts only, not {arch.kind!r}")
        m = self.macros[macro_key(arch, data)]
        prec = precision_of(arch, self.setting)
        return m.rest_ms + m.overhead_ms + sum(self.blocks[block_key(s, prec)] for s in iformer_specs(arch, data))

    def price_meme(self, cfg: MemeConfig) -> Priced:
        return Priced([self.price(a, cfg.data) for a in cfg.experts], cfg.interval_weights())

    # ---- measuring ----

    def ensure(self, arch: ArchConfig, data: DataShape) -> bool:
        """Measure whatever ``price(arch)`` needs and the table lacks; True when anything was."""
        t0 = time.perf_counter()
        added = False
        if macro_key(arch, data) not in self.macros:
            self.calibrate([arch], data)
            added = True
        prec = precision_of(arch, self.setting)
        for spec in iformer_specs(arch, data):
            key = block_key(spec, prec)
            if key not in self.blocks:
                self.blocks[key] = self.time_block(spec, arch.base_channels)
                added = True
        self.build_s += time.perf_counter() - t0
        return added

    def time_block(self, spec: IFormerSpec, base_width: int) -> float:
        torch.manual_seed(0)
        block = spec.build()
        b = self.setting.batch
        x = torch.randn(b, spec.width, spec.resolution, spec.resolution)
        emb = torch.randn(b, spec.emb)
        return time_module(block, (x, emb), self.setting, base_width).median_ms

    def calibrate(self, archs: list[ArchConfig], data: DataShape) -> None:
        """Time networks of one macro whole and block by block: its rest and overhead are
        the medians over them (several networks average out a noisy one)."""
        keys = {macro_key(a, data) for a in archs}
        assert len(keys) == 1, "calibration networks must share one macro"
        rests, overheads, wholes = [], [], []
        for arch in archs:
            rest, inner, whole = self._time_by_block(arch, data)
            rests.append(rest)
            overheads.append(whole - rest - inner)
            wholes.append(whole)
        self.macros[keys.pop()] = MacroEntry(
            rest_ms=statistics.median(rests), overhead_ms=statistics.median(overheads),
            whole_ms=statistics.median(wholes),
            calibrated_on="; ".join(f"{' '.join(a.high_ratios)} / {','.join(map(str, a.pool_strides))}" for a in archs))

    def _time_by_block(self, arch: ArchConfig, data: DataShape) -> tuple[float, float, float]:
        """(non-iFormer blocks, iFormer blocks, whole forward) of one network, ms."""
        net = build_timed(arch, data).eval()
        blocks = top_blocks(net)
        inputs: dict[str, tuple] = {}
        hooks = [m.register_forward_pre_hook(
            lambda mod, args, name=name: inputs.__setitem__(name, tuple(a.detach().clone() for a in args)))
            for name, m in blocks]
        b = self.setting.batch
        with torch.no_grad():
            net(torch.randn(b, data.channels, data.resolution, data.resolution),
                torch.full((b,), 500, dtype=torch.long))
        for h in hooks:
            h.remove()
        whole = time_network(net, arch, data, dataclasses.replace(self.setting, repeats=2 * self.setting.repeats))
        prec = precision_of(arch, self.setting)
        specs = iter(iformer_specs(arch, data))
        rest = inner = 0.0
        for name, m in blocks:
            ms = time_module(m, inputs[name], self.setting, arch.base_channels).median_ms
            if isinstance(m, IFormerBlock):
                spec = next(specs)
                assert inputs[name][0].shape[1:] == (spec.width, spec.resolution, spec.resolution), \
                    f"iformer_specs disagrees with the network at {name}"
                inner += self.blocks.setdefault(block_key(spec, prec), ms)
            else:
                rest += ms
        return rest, inner, whole.median_ms

    # ---- files ----

    def save(self, path: Path) -> Path:
        atomic_write_json({"setting": dataclasses.asdict(self.setting), "meta": self.meta, "build_s": self.build_s,
                           "blocks": self.blocks,
                           "macros": {k: dataclasses.asdict(v) for k, v in self.macros.items()}}, Path(path))
        return Path(path)

    @classmethod
    def load(cls, path: Path, setting: Optional[Setting] = None) -> "LatencyTable":
        """A saved table; with ``setting``, refused (ValueError) when it was measured elsewhere."""
        d = json.loads(Path(path).read_text())
        saved = Setting(**d["setting"])
        if setting is not None and d["meta"] != table_meta(setting):
            diff = sorted(k for k in d["meta"] if d["meta"].get(k) != table_meta(setting).get(k))
            raise ValueError(f"latency table {path} was measured under another {', '.join(diff)}")
        return cls(saved, d["meta"], dict(d["blocks"]),
                   {k: MacroEntry(**v) for k, v in d["macros"].items()}, float(d.get("build_s", 0.0)))


def load_or_new(path: Optional[Path], setting: Setting) -> LatencyTable:
    """The table at ``path`` (default: the cache's for this setting) if it matches, else an empty one."""
    path = path or default_table_path(setting)
    if path is not None and Path(path).is_file():
        try:
            return LatencyTable.load(path, setting)
        except (ValueError, KeyError, TypeError):
            pass
    return LatencyTable.empty(setting)
