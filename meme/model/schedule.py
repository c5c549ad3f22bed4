"""A schedule: which sub-network of one slimmable supernet denoises each interval of t.

Train one supernet, then sample at whatever budget a deployment has: a schedule picks,
for every interval of timesteps, a width (and a d_h/d split and pool strides) of the
same weights. Nothing is retrained, and every schedule of one supernet shares its
weights, so two schedules compare paired (same weights, same initial noise).

Written as YAML::

    supernet: results/supernet-fmnist32-slim   # a trained supernet directory (meme-nas supernet train)
    boundaries: [0, 300, 650, 1000]            # N+1 timesteps; interval n is [b_n, b_{n+1}), t = 0 is data
    experts:                                    # one per interval, from the data end
      - {width: "1", ratios: ["1/4", "1/2"], pool_strides: [2, 1]}
      - {width: "3/4"}
      - {width: "1/2"}                          # ratios / pool_strides left out: the supernet's first legal

A schedule *is* a MEME (``config``): its experts are the sub-networks' plain
``ArchConfig``s, so ``meme-nas macs`` prices it (interval-weighted GMACs per step),
``meme-nas latency`` times it, and ``meme-nas train --init-from`` can cut its experts
from the supernet for fine-tuning.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from meme.common.errors import UserError
from meme.model.config import (ArchConfig, DiffusionConfig, MemeConfig, check_keys, from_mapping, parse_fraction,
                               parse_yaml, require)
from meme.model.experts import MultiExpertDenoiser
from meme.model.supernet import SuperNet, SupernetSpec, load_index, load_supernet

SCHEDULE_KEYS = {"supernet", "boundaries", "experts", "name"}


@dataclass(frozen=True)
class Choice:
    """One interval's sub-network: a width and, optionally, its splits and strides."""

    width: str = "1"
    ratios: tuple[str, ...] = ()          # per stage d_h/d; (): the first legal at this width
    pool_strides: tuple[int, ...] = ()    # per stage; (): the supernet's first

    def arch(self, spec: SupernetSpec) -> ArchConfig:
        n = len(spec.ratios)
        require(self.width in spec.widths, f"width {self.width} (of base {spec.template.base_channels} channels) "
                                           f"is not one of the supernet's {list(spec.widths)}")
        ratios = self.ratios or tuple(spec.legal_ratios(s, self.width)[0] for s in range(n))
        pools = self.pool_strides or tuple(p[0] for p in spec.pool_strides)
        arch = spec.arch(ratios, pools, self.width)
        spec.check(arch)
        return arch

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"width": self.width}
        if self.ratios:
            d["ratios"] = list(self.ratios)
        if self.pool_strides:
            d["pool_strides"] = list(self.pool_strides)
        return d


@dataclass(frozen=True)
class Schedule:
    """Per-interval choices of one supernet's sub-networks (module docstring)."""

    boundaries: tuple[int, ...]           # N+1 timesteps, 0 .. T
    experts: tuple[Choice, ...]           # N choices, from the data end
    supernet: str = ""                    # the trained supernet directory
    name: str = "schedule"

    @classmethod
    def uniform(cls, width: str, T: int, supernet: str = "", name: str = "") -> "Schedule":
        """One width for all of [0, T): the slimmable network's plain sub-network."""
        return cls((0, T), (Choice(str(parse_fraction(width, "width"))),), supernet, name or f"uniform-{width}")

    def archs(self, spec: SupernetSpec) -> list[ArchConfig]:
        return [c.arch(spec) for c in self.experts]

    def config(self, spec: SupernetSpec, diffusion: DiffusionConfig) -> MemeConfig:
        """The MEME this schedule runs: one plain expert per interval."""
        require(len(self.boundaries) == len(self.experts) + 1,
                f"schedule {self.name}: {len(self.experts)} experts need {len(self.experts) + 1} boundaries, "
                f"got {len(self.boundaries)}")
        return MemeConfig(name=self.name, experts=tuple(self.archs(spec)), data=spec.data, diffusion=diffusion,
                          boundaries=tuple(self.boundaries)).validate()

    def widths(self) -> list[str]:
        return [c.width for c in self.experts]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.supernet:
            d["supernet"] = self.supernet
        d.update(boundaries=list(self.boundaries), experts=[c.to_dict() for c in self.experts])
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))
        return path

    @classmethod
    def from_dict(cls, d: Any, source: str = "schedule") -> "Schedule":
        require(isinstance(d, dict), f"{source}: top level must be a mapping")
        check_keys(d, SCHEDULE_KEYS, source)
        require(isinstance(d.get("experts"), list) and d["experts"], f"{source}: 'experts' must be a non-empty list")
        experts = []
        for i, e in enumerate(d["experts"]):
            where = f"{source}: experts[{i}]"
            require(isinstance(e, dict), f"{where} must be a mapping")
            e = dict(e)
            e["width"] = str(parse_fraction(e.get("width", "1"), f"{where}.width"))
            if "ratios" in e:
                require(isinstance(e["ratios"], list), f"{where}.ratios must be a list")
                e["ratios"] = tuple(str(parse_fraction(r, f"{where}.ratios")) for r in e["ratios"])
            experts.append(from_mapping(Choice, e, where))
        bounds = d.get("boundaries")
        require(isinstance(bounds, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds),
                f"{source}: 'boundaries' must be a list of N+1 integer timesteps")
        return cls(tuple(bounds), tuple(experts), str(d.get("supernet", "")), str(d.get("name", Path(source).stem)))

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"schedule file not found: {path}")
        return cls.from_dict(parse_yaml(path.read_text(), str(path)), str(path))


def is_schedule(path: str | Path) -> bool:
    """A YAML file that is a schedule (it names a supernet and no diffusion/data of its own)."""
    try:
        d = parse_yaml(Path(path).read_text(), str(path))
    except (OSError, UserError):
        return False
    return isinstance(d, dict) and "supernet" in d and "experts" in d and "data" not in d


@dataclass(frozen=True)
class TrainedSupernet:
    """A trained slimmable supernet's directory, as a schedule uses it: its spec and diffusion."""

    path: Path
    entry: dict[str, Any]
    spec: SupernetSpec
    diffusion: DiffusionConfig

    @classmethod
    def open(cls, path: str | Path, macro: Optional[str] = None) -> "TrainedSupernet":
        """The (one, or ``macro``) supernet of a directory: index and spec only, no weights read."""
        index = load_index(path)
        macros = index.get("macros", {})
        if macro is None:
            if len(macros) != 1:
                raise UserError(f"{path}: {len(macros)} supernets ({sorted(macros)}); a schedule needs one: "
                                f"name it as DIR/MACRO")
            macro = next(iter(macros))
        if macro not in macros:
            raise UserError(f"{path}: no supernet {macro!r} (has {sorted(macros)})")
        entry = macros[macro]
        spec = SupernetSpec.from_dict(entry["spec"], f"{path}/{macro}/spec")
        diffusion = from_mapping(DiffusionConfig, entry.get("diffusion") or {}, f"{path}/{macro}: diffusion")
        return cls(Path(path), entry, spec, diffusion)

    def weights(self, device: torch.device | str = "cpu") -> SuperNet:
        return load_supernet(self.path, self.entry, torch.device(device))


def supernet_of(schedule: Schedule, supernet: Optional[str | Path] = None,
                schedule_path: Optional[Path] = None) -> TrainedSupernet:
    """The supernet a schedule runs on: ``supernet`` if given, else the one it names
    (a relative path is tried from the working directory, then from the schedule file's)."""
    where = supernet or schedule.supernet
    if not where:
        raise UserError(f"schedule {schedule.name} names no supernet: add `supernet: DIR` or pass --supernet DIR")
    p = Path(where)
    if not p.exists() and schedule_path is not None and (schedule_path.parent / p).exists():
        p = schedule_path.parent / p
    macro = None
    if not (p / "supernet.json").is_file() and (p.parent / "supernet.json").is_file():
        p, macro = p.parent, p.name
    return TrainedSupernet.open(p, macro)


def load_schedule(path: str | Path, supernet: Optional[str | Path] = None) -> tuple[Schedule, TrainedSupernet, MemeConfig]:
    """A schedule file -> (schedule, its supernet, the MEME it runs); one-line errors."""
    schedule = Schedule.load(path)
    trained = supernet_of(schedule, supernet, Path(path))
    return schedule, trained, schedule.config(trained.spec, trained.diffusion)


def schedule_denoiser(schedule: Schedule, net: SuperNet, extract: bool = False) -> MultiExpertDenoiser:
    """The schedule as a denoiser on a loaded supernet (``TrainedSupernet.weights``), on its device.
    By default every expert is a ``SubNetwork`` view of the one resident supernet (its weights once,
    nothing copied); ``extract`` copies each expert's slices into a plain network instead (the
    deployable form, fastest per step; low-memory sampling moves one at a time)."""
    archs = schedule.archs(net.spec)
    experts = [net.extract(a) for a in archs] if extract else [net.sub_network(a) for a in archs]
    return MultiExpertDenoiser(experts, schedule.boundaries).eval()
