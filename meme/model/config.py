"""Configuration dataclasses for one expert network and for a whole MEME.

Everything a run needs to rebuild a model lives here and round-trips through YAML
exactly (``MemeConfig.from_yaml(cfg.to_yaml()) == cfg``). Validation raises
:class:`ConfigError` with a one-line message naming the field and what is allowed;
the CLIs turn that into ``error: ...`` and exit code 2.

Conventions
-----------
* Timesteps are integers ``t in [0, T)``. ``boundaries`` has N+1 increasing integers
  ``0 = b_0 < b_1 < ... < b_N = T``; expert n (0-based) owns ``b_n <= t < b_{n+1}``.
  This is the paper's ``I_n = ((n-1)T/N, nT/N]`` written for 0-based t.
* ``high_ratios`` are the per-stage d_h/d of an iU-Net, written as fractions
  (``"3/4"``) so that YAML round-trips exactly and the head-step rule is checkable.

Values from YAML are converted to the type each field declares (:func:`coerce_fields`:
``16.0`` is the int 16, ``"5e-4"`` the float 5e-4; ``true`` is no number) and sizes are
capped (``MAX_WIDTH`` channels, ``MAX_RESOLUTION``, ``MAX_TIMESTEPS``...): a config from
elsewhere with 10^9 channels is refused here in one line, before anything is allocated.
What a config within the caps would cost on this machine is ``meme.model.resources``' job.

Longer than the project's other modules (~520 lines) on purpose: this file *is* the
config schema, every dataclass beside the validation and YAML coercion of its fields, so
what a YAML key means, which values it takes and why one is refused are read in one place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml

from meme.common.errors import ConfigError, UserError

NetworkKind = Literal["unet", "iunet"]
BetaSchedule = Literal["linear", "sqrt_linear"]
NETWORK_KINDS = ("unet", "iunet")
BETA_SCHEDULES = ("linear", "sqrt_linear")
# Sanity caps, far above any real design (LDM-L is 896 channels wide, 64x64, T = 1000):
MAX_WIDTH = 2 ** 16          # channels of any stage, and of the data
MAX_RESOLUTION = 2 ** 14     # side of the data
MAX_TIMESTEPS = 10 ** 6      # T
MAX_BLOCKS = 64              # blocks per stage
MAX_STAGES = 16
MAX_EXPERTS = 256


def require(cond: bool, msg: str) -> None:
    """Raise a one-line ConfigError unless cond holds."""
    if not cond:
        raise ConfigError(msg)


def parse_yaml(text: str, source: str) -> Any:
    """yaml.safe_load with a one-line error naming the source and line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or exc  # ReaderError: reason
        raise ConfigError(f"{source}: malformed YAML{where}: {' '.join(str(problem).split())}") from None


def parse_fraction(value: Any, where: str) -> Fraction:
    """Parse ``"3/4"``, ``0.75`` or ``Fraction(3, 4)``; floats must be exact dyadic-ish."""
    try:
        if isinstance(value, Fraction):
            return value
        if isinstance(value, (int, float)):
            return Fraction(value).limit_denominator(1024)
        return Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError, OverflowError, TypeError):
        raise ConfigError(f"{where}: {value!r} is not a fraction like '3/4'") from None


@dataclass(frozen=True)
class DataShape:
    """Shape of what the denoiser sees: pixels or pre-encoded latents."""

    channels: int = 3          # input/output channels (3 for RGB or LDM f=4 latents)
    resolution: int = 64       # square side in pixels/latent cells
    latent: bool = True        # True: LDM latents (3x64x64 = a 256x256 image)

    def validate(self) -> None:
        require(1 <= self.channels <= MAX_WIDTH, f"data.channels must lie in [1, {MAX_WIDTH}], got {self.channels}")
        require(4 <= self.resolution <= MAX_RESOLUTION,
                f"data.resolution must lie in [4, {MAX_RESOLUTION}], got {self.resolution}")


@dataclass(frozen=True)
class DiffusionConfig:
    """DDPM forward process (epsilon prediction, MSE loss)."""

    timesteps: int = 1000                   # T
    schedule: BetaSchedule = "sqrt_linear"  # 'linear' (DDPM pixels) or 'sqrt_linear' (LDM)
    beta_start: float = 0.0015              # DDPM: 1e-4, LDM: 0.0015
    beta_end: float = 0.0195                # DDPM: 2e-2, LDM: 0.0195

    def validate(self) -> None:
        require(2 <= self.timesteps <= MAX_TIMESTEPS,
                f"diffusion.timesteps must lie in [2, {MAX_TIMESTEPS}], got {self.timesteps}")
        require(self.schedule in BETA_SCHEDULES,
                 f"diffusion.schedule must be one of {list(BETA_SCHEDULES)}, got {self.schedule!r}")
        require(0 < self.beta_start < self.beta_end < 1,
                 f"diffusion betas need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")

    @classmethod
    def ddpm_pixels(cls) -> "DiffusionConfig":
        return cls(schedule="linear", beta_start=1e-4, beta_end=2e-2)


@dataclass(frozen=True)
class ArchConfig:
    """One expert's denoiser network.

    ``kind='unet'`` is the latent-diffusion ``UNetModel`` (ResBlocks + attention at
    ``attention_ds``); ``kind='iunet'`` puts ``num_res_blocks`` iFormer blocks plus one
    ResBlock in every encoder stage with per-stage ``high_ratios`` (d_h/d).
    """

    kind: NetworkKind = "unet"
    base_channels: int = 128                     # channels of stage 1
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)  # stage widths = base x mult
    num_res_blocks: int = 2                      # unet: ResBlocks/level; iunet: iFormer blocks/stage
    attention_ds: tuple[int, ...] = (2, 4, 8)    # unet: downsample factors with attention (32,16,8 at 64)
    head_channels: int = 32                      # channels per attention head
    high_ratios: tuple[str, ...] = ()            # iunet: d_h/d per stage, e.g. ("3/4","5/8","1/2","1/4")
    pool_strides: tuple[int, ...] = ()           # iunet: attention avg-pool stride per stage
    dropout: float = 0.0
    # Two fields a width-sliced sub-network of a slimmable supernet needs (0: as LDM, not written to YAML):
    time_channels: int = 0                       # sinusoidal timestep features (0: base_channels); embedding 4x
    group_channels: int = 0                      # channels per GroupNorm group (0: 32 groups, LDM)
    # An expert's own decoder width (Multistage: one shared encoder, decoders of 192, 128 and 16 channels):
    decoder_channels: int = 0                    # base width of the decoder levels (0: base_channels)

    def __post_init__(self) -> None:
        # A decoder as wide as the encoder is the default written one way only, so that equal
        # networks are equal configs (hashes, sharing checks, caches).
        if self.decoder_channels == self.base_channels:
            object.__setattr__(self, "decoder_channels", 0)

    def emb_channels(self) -> int:
        """Width of the timestep embedding every block reads: 4 x the sinusoidal features."""
        return 4 * (self.time_channels or self.base_channels)

    @property
    def num_stages(self) -> int:
        return len(self.channel_mult)

    def stage_channels(self) -> list[int]:
        """Encoder widths per stage (the middle block runs at the last one)."""
        return [self.base_channels * m for m in self.channel_mult]

    def decoder_stage_channels(self) -> list[int]:
        """Decoder widths per level, level 0 at full resolution."""
        return [(self.decoder_channels or self.base_channels) * m for m in self.channel_mult]

    def high_fractions(self) -> list[Fraction]:
        return [parse_fraction(r, "high_ratios") for r in self.high_ratios]

    def high_channels(self) -> list[int]:
        """d_h per stage (integers; validate() guarantees exactness)."""
        return [int(f * d) for f, d in zip(self.high_fractions(), self.stage_channels())]

    def validate(self, where: str = "arch") -> None:
        require(self.kind in NETWORK_KINDS, f"{where}.kind must be one of {list(NETWORK_KINDS)}, got {self.kind!r}")
        if self.group_channels:   # groups of a fixed size: any whole number of them (a slimmed network)
            require(self.group_channels >= 1 and self.base_channels >= 1 and self.base_channels % self.group_channels == 0,
                    f"{where}.base_channels must be a positive multiple of group_channels={self.group_channels}, "
                    f"got {self.base_channels}")
        else:
            require(self.base_channels >= 8 and self.base_channels % 8 == 0,
                    f"{where}.base_channels must be a positive multiple of 8, got {self.base_channels}")
        require(0 <= self.group_channels <= MAX_WIDTH, f"{where}.group_channels must lie in [0, {MAX_WIDTH}], "
                                                       f"got {self.group_channels}")
        if self.decoder_channels:
            unit = self.group_channels or 8
            require(0 < self.decoder_channels <= MAX_WIDTH and self.decoder_channels % unit == 0,
                    f"{where}.decoder_channels must be a positive multiple of {unit} "
                    f"({'group_channels' if self.group_channels else 'as base_channels'}) up to {MAX_WIDTH}, "
                    f"or 0 (the encoder's width), got {self.decoder_channels}")
        require(0 <= self.time_channels <= MAX_WIDTH and self.time_channels % 2 == 0,
                f"{where}.time_channels must be an even number in [0, {MAX_WIDTH}] (0: base_channels), "
                f"got {self.time_channels}")
        require(1 <= len(self.channel_mult) <= MAX_STAGES and all(m >= 1 for m in self.channel_mult),
                 f"{where}.channel_mult must be a list of 1 to {MAX_STAGES} positive ints, got {list(self.channel_mult)}")
        widest = max(self.base_channels, self.decoder_channels) * max(self.channel_mult)
        require(widest <= MAX_WIDTH, f"{where}: a stage {widest} channels wide is beyond {MAX_WIDTH} channels")
        require(1 <= self.num_res_blocks <= MAX_BLOCKS,
                f"{where}.num_res_blocks must lie in [1, {MAX_BLOCKS}], got {self.num_res_blocks}")
        require(self.head_channels >= 1, f"{where}.head_channels must be >= 1, got {self.head_channels}")
        require(0.0 <= self.dropout < 1.0, f"{where}.dropout must be in [0, 1), got {self.dropout}")
        for c in self.stage_channels():
            require(c % self.head_channels == 0,
                     f"{where}: stage width {c} is not a multiple of head_channels={self.head_channels}")
        if self.kind == "unet":
            for c in self.decoder_stage_channels():   # the U-Net's decoder has attention too
                require(c % self.head_channels == 0,
                        f"{where}: decoder width {c} is not a multiple of head_channels={self.head_channels}")
            allowed = [2 ** i for i in range(self.num_stages)]
            for ds in self.attention_ds:
                require(ds in allowed, f"{where}.attention_ds: {ds} is not a stage downsample factor {allowed}")
            return
        n = self.num_stages
        require(len(self.high_ratios) == n,
                 f"{where}.high_ratios needs one d_h/d per stage ({n}), got {len(self.high_ratios)}")
        require(len(self.pool_strides) == n,
                 f"{where}.pool_strides needs one stride per stage ({n}), got {len(self.pool_strides)}")
        for s, (r, d) in enumerate(zip(self.high_fractions(), self.stage_channels())):
            step = Fraction(self.head_channels, d)
            require(is_head_step(r, d, self.head_channels),
                     f"{where}.high_ratios[{s}]={r} is not a head step for width {d} "
                     f"(multiples of {step} in [0, {largest_head_step(d, self.head_channels)}] with even d_h)")
        for s, p in enumerate(self.pool_strides):
            require(p in (1, 2, 4), f"{where}.pool_strides[{s}] must be 1, 2 or 4, got {p}")


def uniform_boundaries(T: int, n: int) -> list[int]:
    """N+1 boundaries cutting [0, T) into n equal intervals (the default when none are given)."""
    return [round(i * T / n) for i in range(n + 1)]


def is_head_step(ratio: Fraction, width: int, head_channels: int) -> bool:
    """``ratio in head_step_grid(width, head_channels)``, without listing the grid."""
    d_h = ratio * width
    if d_h.denominator != 1 or d_h < 0:
        return False
    d_l = width - int(d_h)
    return int(d_h) % 2 == 0 and d_l >= head_channels and d_l % head_channels == 0


def largest_head_step(width: int, head_channels: int) -> Fraction:
    """The last entry of ``head_step_grid``: one attention head left (two when d_h would be odd)."""
    for heads in (1, 2):
        d_h = width - heads * head_channels
        if d_h >= 0 and d_h % 2 == 0:
            return Fraction(d_h, width)
    return Fraction(0)


def head_step_grid(width: int, head_channels: int) -> list[Fraction]:
    """All legal d_h/d for a stage: d_l a whole number (>= 1) of heads, d_h even.

    d_h = 0 (pure attention) is allowed; d_l >= one head keeps the low mixer alive.
    """
    out = []
    for heads in range(width // head_channels, 0, -1):
        d_h = width - heads * head_channels
        if d_h % 2 == 0:
            out.append(Fraction(d_h, width))
    return out


@dataclass(frozen=True)
class ShareConfig:
    """Which parts of the network every expert holds in common (one module object for all).

    MEME shares nothing (the default); the multi-stage multi-decoder design shares the
    encoder and keeps a decoder per stage; one network for all t shares everything. A
    shared part runs in every expert's forward, so it gets the gradient of every
    training step whatever N is, while per-step cost is unchanged (each step still runs
    one whole expert). Parts, by the module names of ``meme.model.iunet`` / ``meme.model.unet``:

    * ``time_embed``: the timestep MLP;
    * ``encoder_stages``: the first k encoder stages (stage 0 with the input conv);
    * ``mid``: the middle ResBlock-Attention-ResBlock;
    * ``decoder_levels``: the last k decoder levels, counted from the output (level 0 is
      full resolution and brings the output head); ``num_stages`` shares the whole decoder.
    """

    time_embed: bool = False
    encoder_stages: int = 0
    mid: bool = False
    decoder_levels: int = 0

    @property
    def any(self) -> bool:
        return self.time_embed or self.mid or self.encoder_stages > 0 or self.decoder_levels > 0

    def describe(self) -> str:
        """Short words for tables: 'none', 'dec', 'dec+enc1', 'all'..."""
        parts = ([f"enc{self.encoder_stages}"] if self.encoder_stages else []) + (["mid"] if self.mid else []) \
            + ([f"dec{self.decoder_levels}"] if self.decoder_levels else []) + (["temb"] if self.time_embed else [])
        return "+".join(parts) or "none"

    @classmethod
    def parse(cls, text: str, where: str = "share") -> "ShareConfig":
        """The words of :meth:`describe` back: 'none', 'dec', 'enc1+dec2', 'enc+mid+dec+temb'...

        ``enc``/``dec`` without a number mean every stage/level (``MAX_STAGES`` here, cut to
        the network's own count by :meth:`fit`).
        """
        fields = dict(time_embed=False, encoder_stages=0, mid=False, decoder_levels=0)
        words = [w.strip() for w in str(text).split("+") if w.strip()]
        require(bool(words), f"{where}: empty sharing; write 'none' or parts like 'enc1+dec'")
        for w in words:
            if w == "none" and len(words) == 1:
                continue
            if w in ("temb", "mid"):
                fields["time_embed" if w == "temb" else "mid"] = True
                continue
            for prefix, key in (("enc", "encoder_stages"), ("dec", "decoder_levels")):
                if w.startswith(prefix) and (w[len(prefix):].isdigit() or w == prefix):
                    fields[key] = int(w[len(prefix):]) if w != prefix else MAX_STAGES
                    break
            else:
                raise ConfigError(f"{where}: {w!r} is not a part; parts are temb, encK, mid, decK "
                                  f"(K stages/levels, or all without K), joined by '+', or 'none'")
        return cls(**fields)

    def fit(self, num_stages: int) -> "ShareConfig":
        """'every stage/level' (``enc``/``dec``) written as the network's own count."""
        return dataclasses.replace(self, encoder_stages=min(self.encoder_stages, num_stages),
                                   decoder_levels=min(self.decoder_levels, num_stages))

    def validate(self, experts: tuple["ArchConfig", ...], where: str = "share") -> None:
        """Every shared part must be one architecture for all experts: refused in one line otherwise."""
        n_stages = experts[0].num_stages
        require(0 <= self.encoder_stages <= n_stages,
                f"{where}.encoder_stages must lie in [0, {n_stages}] (the experts' stages), got {self.encoder_stages}")
        require(0 <= self.decoder_levels <= n_stages,
                f"{where}.decoder_levels must lie in [0, {n_stages}] (the experts' levels), got {self.decoder_levels}")
        if not self.any:
            return
        first = experts[0]
        for i, e in enumerate(experts[1:], start=1):
            for f in _MACRO_FIELDS:
                require(getattr(e, f) == getattr(first, f),
                        f"{where}: shared parts need one macro shape, but experts[{i}].{f}={_show(getattr(e, f))} "
                        f"differs from experts[0].{f}={_show(getattr(first, f))}")
            if self.decoder_levels:   # an expert's own decoder may have its own width; a shared one may not
                require(e.decoder_stage_channels() == first.decoder_stage_channels(),
                        f"{where}.decoder_levels={self.decoder_levels}: a shared decoder has one width, but "
                        f"experts[{i}]'s decoder is {e.decoder_stage_channels()} channels wide and experts[0]'s "
                        f"{first.decoder_stage_channels()}; share the encoder only (e.g. 'enc+mid') to give "
                        f"experts decoders of their own widths")
            if self.mid or self.decoder_levels:
                require(_decoder_attention(e) == _decoder_attention(first),
                        f"{where}: a shared decoder/mid needs one decoder, but experts[{i}] ({e.kind}) and "
                        f"experts[0] ({first.kind}) put attention at different levels")
            k = self.encoder_stages
            if k:
                require(e.kind == first.kind, f"{where}.encoder_stages={k}: experts[{i}] is a {e.kind}, "
                                              f"experts[0] a {first.kind}")
                for name in ("high_ratios", "pool_strides") if e.kind == "iunet" else ():
                    mine, theirs = list(getattr(e, name))[:k], list(getattr(first, name))[:k]
                    require(mine == theirs, f"{where}.encoder_stages={k} shares stages 0..{k - 1}, but experts[{i}]."
                                            f"{name}[:{k}]={mine} contradicts experts[0].{name}[:{k}]={theirs}")
                if e.kind == "unet":
                    in_k = lambda a: sorted(d for d in a.attention_ds if d < 2 ** k)  # noqa: E731
                    require(in_k(e) == in_k(first), f"{where}.encoder_stages={k}: experts[{i}] puts attention "
                                                    f"at {in_k(e)} in the shared stages, experts[0] at {in_k(first)}")


# What every shared part needs in common: the encoder's widths, depth and heads, its norms and
# time embedding (the decoder's width, ``decoder_channels``, only when the decoder is shared).
_MACRO_FIELDS = ("base_channels", "channel_mult", "num_res_blocks", "head_channels", "dropout",
                 "time_channels", "group_channels")


def _decoder_attention(a: "ArchConfig") -> tuple[int, ...]:
    """Downsample factors with decoder attention (the iU-Net's decoder has none)."""
    return tuple(sorted(a.attention_ds)) if a.kind == "unet" else ()


def _show(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


@dataclass(frozen=True)
class MemeConfig:
    """A whole multi-expert denoiser: N experts, their intervals and p_n."""

    name: str
    experts: tuple[ArchConfig, ...]
    data: DataShape = DataShape()
    diffusion: DiffusionConfig = DiffusionConfig()
    boundaries: tuple[int, ...] = ()       # N+1 ints 0..T; empty = uniform
    expert_probs: tuple[float, ...] = ()   # p_n (soft-expert); empty = all 1 (hard experts)
    share: ShareConfig = ShareConfig()     # parts all experts hold in common; default: none

    # ---- derived -------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def resolved_boundaries(self) -> list[int]:
        if self.boundaries:
            return list(self.boundaries)
        return uniform_boundaries(self.diffusion.timesteps, self.num_experts)

    def resolved_probs(self) -> list[float]:
        return list(self.expert_probs) if self.expert_probs else [1.0] * self.num_experts

    def intervals(self) -> list[tuple[int, int]]:
        b = self.resolved_boundaries()
        return [(b[i], b[i + 1]) for i in range(self.num_experts)]

    def interval_weights(self) -> list[float]:
        """Fraction of sampling steps each expert serves (uniform t)."""
        T = self.diffusion.timesteps
        return [(hi - lo) / T for lo, hi in self.intervals()]

    # ---- validation ----------------------------------------------------------
    def validate(self) -> "MemeConfig":
        require(bool(self.name) and isinstance(self.name, str), "name must be a non-empty string")
        require(1 <= self.num_experts <= MAX_EXPERTS, f"experts must list 1 to {MAX_EXPERTS} experts")
        self.data.validate()
        self.diffusion.validate()
        require(self.num_experts <= self.diffusion.timesteps,
                f"{self.num_experts} experts need at least as many timesteps, T = {self.diffusion.timesteps}")
        for i, e in enumerate(self.experts):
            e.validate(f"experts[{i}]")
            require(self.data.resolution % (2 ** (e.num_stages - 1)) == 0,
                     f"experts[{i}]: data.resolution {self.data.resolution} is not divisible by "
                     f"2^{e.num_stages - 1} (one halving per stage)")
        T = self.diffusion.timesteps
        if self.boundaries:
            b = list(self.boundaries)
            require(len(b) == self.num_experts + 1,
                     f"boundaries needs N+1 = {self.num_experts + 1} values (0 .. {T}), got {len(b)}")
            require(b[0] == 0 and b[-1] == T, f"boundaries must start at 0 and end at T={T}, got {b}")
            require(all(x < y for x, y in zip(b, b[1:])), f"boundaries must be strictly increasing, got {b}")
        if self.expert_probs:
            require(len(self.expert_probs) == self.num_experts,
                     f"expert_probs needs one p_n per expert ({self.num_experts}), got {len(self.expert_probs)}")
            require(all(0.0 <= p <= 1.0 for p in self.expert_probs),
                     f"expert_probs must lie in [0, 1], got {list(self.expert_probs)}")
        self.share.validate(self.experts)
        return self

    # ---- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = plain(dataclasses.asdict(self))
        d["experts"] = [arch_dict(e) for e in self.experts]
        if not self.share.any:   # no sharing is not written: configs, hashes and checkpoints stay as they were
            d.pop("share")
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    def hash(self) -> str:
        """Stable content hash (name excluded): caches MACs and identifies trials."""
        d = self.to_dict()
        d.pop("name")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> "MemeConfig":
        require(isinstance(d, dict), f"{source}: top level must be a mapping, got {type(d).__name__}")
        check_keys(d, {f.name for f in dataclasses.fields(cls)}, source)
        require("experts" in d and isinstance(d["experts"], list) and d["experts"],
                 f"{source}: 'experts' must be a non-empty list")
        require(len(d["experts"]) <= MAX_EXPERTS, f"{source}: experts must list 1 to {MAX_EXPERTS} experts")
        experts = tuple(_arch_from_dict(e, f"{source}: experts[{i}]") for i, e in enumerate(d["experts"]))
        data = from_mapping(DataShape, d.get("data", {}), f"{source}: data")
        diffusion = from_mapping(DiffusionConfig, d.get("diffusion", {}), f"{source}: diffusion")
        lists = coerce_fields(cls, {k: d.get(k) or () for k in ("boundaries", "expert_probs")}, source)
        share = from_mapping(ShareConfig, d.get("share") or {}, f"{source}: share")
        cfg = cls(name=str(d.get("name", Path(source).stem)), experts=experts, data=data, diffusion=diffusion,
                  share=share, **lists)
        try:
            return cfg.validate()
        except ConfigError as exc:  # name the file the bad value came from
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, text: str, source: str = "config") -> "MemeConfig":
        return cls.from_dict(parse_yaml(text, source), source)

    @classmethod
    def load(cls, path: str | Path) -> "MemeConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return cls.from_yaml(path.read_text(), str(path))


def arch_dict(arch: ArchConfig) -> dict[str, Any]:
    """An expert as YAML and every cache key see it: the slimmable and decoder-width fields only when set, so
    every config, hash, MACs and latency key written before they existed stays the same."""
    d = plain(dataclasses.asdict(arch))
    for name in ("time_channels", "group_channels", "decoder_channels"):
        if not d[name]:
            d.pop(name)
    return d


def plain(x: Any) -> Any:
    """Tuples -> lists, recursively, so YAML stays plain."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def check_keys(d: dict, allowed: set[str], where: str) -> None:
    """Unknown fields are an error that lists the allowed ones (typos never pass silently)."""
    unknown = sorted(set(d) - allowed)
    require(not unknown, f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def from_mapping(cls: type, d: Any, where: str):
    """A dataclass from a YAML mapping; wrong type, unknown field or bad value: one line."""
    require(isinstance(d, dict), f"{where} must be a mapping")
    check_keys(d, {f.name for f in dataclasses.fields(cls)}, where)
    return cls(**coerce_fields(cls, d, where))


def coerce_fields(cls: type, d: dict, where: str) -> dict:
    """Each value converted to the type its dataclass field declares, or a one-line ConfigError.

    int: an int, an integral float or a numeric string (never a bool); float: any finite
    number or numeric string (YAML reads ``5e-4`` as a string); bool and str: only
    themselves; ``tuple[X, ...]``: a list of X; ``Optional[X]``: None or X. Other field
    types (fractions, nested configs) are left to their own parsers.
    """
    hints = typing.get_type_hints(cls)
    return {k: coerce_value(v, hints.get(k), f"{where}.{k}") for k, v in d.items()}


def coerce_value(v: Any, hint: Any, where: str) -> Any:
    """One value to the type ``hint`` (the rules of :func:`coerce_fields`), or a one-line ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return None if v is None else coerce_value(v, inner[0] if len(inner) == 1 else None, where)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        require(isinstance(v, (list, tuple)), f"{where} must be a list, got {v!r}")
        return tuple(coerce_value(x, args[0], f"{where}[{i}]") for i, x in enumerate(v))
    if hint is int:
        require(not isinstance(v, bool), f"{where} must be an integer, got {v!r}")
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            return int(v)
        if isinstance(v, str):
            try:
                return int(v.strip())
            except ValueError:
                pass
        require(isinstance(v, int), f"{where} must be an integer, got {v!r}")
        return v
    if hint is float:
        require(not isinstance(v, bool), f"{where} must be a number, got {v!r}")
        try:
            x = float(v) if isinstance(v, (int, float, str)) else math.nan
        except (ValueError, OverflowError):
            x = math.nan
        require(math.isfinite(x), f"{where} must be a finite number, got {v!r}")
        return x
    if hint is bool:
        require(isinstance(v, bool), f"{where} must be true or false, got {v!r}")
    elif hint is str or origin is Literal:
        require(isinstance(v, str), f"{where} must be a string, got {v!r}")
    return v


def _arch_from_dict(d: Any, where: str) -> ArchConfig:
    require(isinstance(d, dict), f"{where} must be a mapping")
    check_keys(d, {f.name for f in dataclasses.fields(ArchConfig)}, where)
    d = dict(d)
    if "high_ratios" in d:
        require(isinstance(d["high_ratios"], (list, tuple)), f"{where}.high_ratios must be a list")
        d["high_ratios"] = tuple(str(parse_fraction(v, f"{where}.high_ratios")) for v in d["high_ratios"])
    return ArchConfig(**coerce_fields(ArchConfig, d, where))


def check_config(ck: dict, cfg: MemeConfig, path: object) -> None:
    """The checkpoint was trained with ``cfg`` (names aside), else one line saying so."""
    try:
        saved = MemeConfig.from_dict(ck["config"], f"{path}: config")
    except ConfigError as exc:
        raise UserError(f"{path}: its config is invalid: {exc}") from None
    if saved.hash() != cfg.hash():
        raise UserError(f"{path} was trained with a different config ({saved.name}, {saved.hash()}; "
                        f"this run is {cfg.name}, {cfg.hash()}); use a new --out or that config")
