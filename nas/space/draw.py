"""Drawing candidates from a search space: ``build_config(trial, space)`` and its inverse ``encode``.

The space is conditional (N changes how many experts exist), so it is written as an
Optuna *define-by-run* function: :func:`build_config` calls ``trial.suggest_*`` and
returns a validated :class:`MemeConfig` at the TARGET shape. (Loading a space from
YAML is ``nas.space.space``'s job; this module only draws from one.)

Structural rules hold by construction, never by sample-and-reject:

* d_h/d non-increasing with depth and with expert index: every ratio is drawn as a
  *position* in [0, 1) among the legal values between its upper bound (the previous
  stage of the same expert, the same stage of the previous expert, the grid's top) and
  its lower bound (``max_drop_depth`` / ``max_drop_experts`` below the upper one, the
  grid's floor). A uniform position is a uniform draw among the legal values, so random
  start-up trials spread over the space instead of piling onto its floor;
* p_n non-increasing: the same, over the choices at or below p_{n-1}
  (at most ``max_decrement`` choice steps below);
* widths (``search.widths``: an expert's decoder, or with ``scope: network`` its every
  channel) non-increasing with n under ``wider_near_data``: a position among the widths
  at or below the previous expert's. A network width is drawn before the expert's ratios,
  whose grids are those of its own channels.

Parameter names do not depend on N (``e{n}_s{s}`` is the same parameter for every N
that has expert n), so TPE pools what trials with different N learn about shared
experts. The schema is documented in ``search_spaces/README.md``.
"""
from __future__ import annotations

import dataclasses
import itertools
from fractions import Fraction
from typing import Any, Optional, Protocol

from meme.model.config import ConfigError, MemeConfig, ShareConfig, require, uniform_boundaries
from nas.space.clusters import boundaries_for
from nas.space.space import BOUNDARY_CHOICES, SearchSpace


class TrialLike(Protocol):
    """What build_config needs from an Optuna trial (real, Ray's captor, or a fixed dict)."""

    number: int

    def suggest_int(self, name: str, low: int, high: int) -> int: ...

    def suggest_float(self, name: str, low: float, high: float) -> float: ...

    def suggest_categorical(self, name: str, choices: list) -> Any: ...


def pick(choices: list, u: float) -> Any:
    """The value at position u in [0, 1]: equal-width bins, one per choice."""
    return choices[min(len(choices) - 1, max(0, int(float(u) * len(choices))))]


def _position(choices: list, value: Any) -> float:
    """Inverse of _pick: the centre of value's bin."""
    return (choices.index(value) + 0.5) / len(choices)


def ratio_choices(space: SearchSpace, base: int, stage: int, above: Optional[Fraction],
                  previous_expert: Optional[Fraction]) -> list[Fraction]:
    """Legal d_h/d of one stage given the stage above and the previous expert (ascending)."""
    rules, grid = space.ratios, space.stage_grid(base, stage)
    hi, drop = grid[-1], None
    if rules.monotone_depth and above is not None:
        hi, drop = min(hi, above), rules.max_drop_depth
    if rules.monotone_experts and previous_expert is not None:
        hi, drop = min(hi, previous_expert), rules.max_drop_experts
    lo = grid[0] if drop is None else hi - drop
    legal = [g for g in grid if lo <= g <= hi]
    return legal or [max([g for g in grid if g <= hi], default=grid[0])]


def prob_choices(space: SearchSpace, previous: Optional[int]) -> list[int]:
    """Legal indices into probs.choices given p_{n-1}'s index."""
    top = len(space.probs.choices) - 1
    if not space.probs.monotone or previous is None:
        return list(range(top + 1))
    return list(range(max(0, previous - space.probs.max_decrement), previous + 1))


def sample_ratios(trial: TrialLike, space: SearchSpace, n_experts: int, base: int,
                  shared_stages: int = 0, widths: Optional[tuple[str, ...]] = None) -> list[tuple[str, ...]]:
    """Per-expert, per-stage d_h/d; monotone rules hold by construction.

    The first ``shared_stages`` stages are one module for all experts (``MemeConfig.share``),
    so expert 1 draws them and the others take its values (equal values keep every rule).
    ``widths``: each expert's width when widths scale the whole network (its grids are those
    of its own channels).
    """
    out: list[list[Fraction]] = []
    for n in range(n_experts):
        row: list[Fraction] = []
        own = space.expert_base(base, widths[n]) if widths else base
        for s in range(space.num_stages):
            if n and s < shared_stages:
                row.append(out[0][s])
                continue
            legal = ratio_choices(space, own, s, row[s - 1] if s else None, out[n - 1][s] if n else None)
            row.append(pick(legal, trial.suggest_float(f"e{n}_s{s}", 0.0, 1.0)))
        out.append(row)
    return [tuple(str(r) for r in row) for row in out]


def width_choices(space: SearchSpace, previous: Optional[str]) -> list[str]:
    """Legal decoder widths of an expert given the previous expert's (ascending)."""
    choices = list(space.widths.choices)
    if space.widths.monotone != "wider_near_data" or previous is None:
        return choices
    return [w for w in choices if Fraction(w) <= Fraction(previous)]


def sample_widths(trial: TrialLike, space: SearchSpace, n_experts: int) -> tuple[str, ...]:
    """Each expert's width (a fraction of the base width: its decoder's, or with scope network its
    every channel's); all '1' when not searched."""
    if not space.widths.searched:
        return ("1",) * n_experts
    out: list[str] = []
    for n in range(n_experts):
        out.append(pick(width_choices(space, out[-1] if out else None), trial.suggest_float(f"x{n}", 0.0, 1.0)))
    return tuple(out)


def sample_probs(trial: TrialLike, space: SearchSpace, n_experts: int) -> tuple[float, ...]:
    idx: list[int] = []
    for n in range(n_experts):
        idx.append(pick(prob_choices(space, idx[-1] if idx else None), trial.suggest_float(f"p{n}", 0.0, 1.0)))
    return tuple(space.probs.choices[i] for i in idx)


def sample_boundaries(trial: TrialLike, space: SearchSpace, n_experts: int) -> tuple[int, ...]:
    if space.boundaries.mode == "uniform":
        return ()
    if space.boundaries.mode == "cluster":
        if n_experts == 1 or trial.suggest_categorical("boundaries", list(BOUNDARY_CHOICES)) == "uniform":
            return ()
        return clustered_boundaries(space, n_experts)
    T = space.diffusion.timesteps
    w = [trial.suggest_int(f"w{n}", 1, space.boundaries.weight_levels) for n in range(n_experts)]
    total, acc, b = sum(w), 0, [0]
    for x in w:
        acc += x
        b.append(round(T * acc / total))
    return tuple(b)


def clustered_boundaries(space: SearchSpace, n_experts: int) -> tuple[int, ...]:
    """Boundaries of N intervals from timestep clustering (``nas.space.clusters``; cached per space and N)."""
    return boundaries_for(space, n_experts)


def build_config(trial: TrialLike, space: SearchSpace, name: Optional[str] = None) -> MemeConfig:
    """Define-by-run: draw one candidate from the space (target shape), validated."""
    n_experts = trial.suggest_categorical("num_experts", list(space.num_experts))
    base = _maybe(trial, "base_channels", space.macro.base_channels)
    blocks = _maybe(trial, "num_res_blocks", space.macro.num_res_blocks)
    pools = tuple(int(p) for p in str(_maybe(trial, "pool_strides",
                                              tuple(_strides_str(p) for p in space.macro.pool_strides))).split(","))
    share = sample_share(trial, space, n_experts)
    if space.widths.whole_network:   # an expert's width sets its channels, so its ratio grids: drawn first
        widths = sample_widths(trial, space, n_experts)
        ratios = sample_ratios(trial, space, n_experts, base, share.encoder_stages, widths)
    else:
        ratios = sample_ratios(trial, space, n_experts, base, share.encoder_stages)
        widths = sample_widths(trial, space, n_experts)
    if share.decoder_levels:   # a shared decoder has one width: the first expert's
        widths = (widths[0],) * n_experts
    probs = sample_probs(trial, space, n_experts)
    bounds = sample_boundaries(trial, space, n_experts)
    cfg = MemeConfig(name=name or f"{space.name}-t{getattr(trial, 'number', 0)}",
                     experts=tuple(space.arch(base, blocks, pools, r, w) for r, w in zip(ratios, widths)),
                     data=space.data, diffusion=space.diffusion, boundaries=bounds, expert_probs=probs,
                     share=share)
    return cfg.validate()


def sample_share(trial: TrialLike, space: SearchSpace, n_experts: int) -> ShareConfig:
    """What the experts hold in common: one of the space's choices (none for one expert)."""
    if n_experts == 1:
        return ShareConfig()
    words = _maybe(trial, "share", tuple(c.describe() for c in space.share))
    return ShareConfig.parse(words).fit(space.num_stages)


def encode(cfg: MemeConfig, space: SearchSpace) -> dict[str, Any]:
    """The study parameters that draw ``cfg`` (inverse of build_config), e.g. to enqueue it.

    Raises ConfigError if cfg is not in the space (wrong macro shape, a rule broken).
    """
    params: dict[str, Any] = {"num_experts": cfg.num_experts}
    where = f"{cfg.name}: not in space {space.name}"
    require(cfg.num_experts in space.num_experts, f"{where} (N={cfg.num_experts})")
    try:
        macro = [space.macro_and_width(e) for e in cfg.experts]
    except ConfigError as exc:
        raise ConfigError(f"{where} ({exc})") from None
    base, widths = macro[0][0], [w for _, w in macro]
    e0 = space.arch(base, cfg.experts[0].num_res_blocks, cfg.experts[0].pool_strides, cfg.experts[0].high_ratios)

    def shape(e):   # what every expert has in common: all but its ratios and width
        return dataclasses.replace(e, high_ratios=(), decoder_channels=0, base_channels=0, time_channels=0)
    require(all(b == base for b, _ in macro) and all(shape(e) == shape(cfg.experts[0]) for e in cfg.experts),
            f"{where} (experts differ in macro shape)")
    for key, choices in (("base_channels", space.macro.base_channels), ("num_res_blocks", space.macro.num_res_blocks),
                         ("pool_strides", tuple(_strides_str(p) for p in space.macro.pool_strides))):
        value = _strides_str(e0.pool_strides) if key == "pool_strides" else getattr(e0, key)
        require(value in choices, f"{where} ({key}={value})")
        if len(choices) > 1:
            params[key] = value
    if cfg.num_experts > 1:
        share_words = [c.describe() for c in space.share]
        require(cfg.share.describe() in share_words, f"{where} (share {cfg.share.describe()} not in {share_words})")
        if len(share_words) > 1:
            params["share"] = cfg.share.describe()
    else:
        require(not cfg.share.any, f"{where} (one expert shares nothing)")
    rows = [[Fraction(r) for r in e.high_ratios] for e in cfg.experts]
    for n, row in enumerate(rows):
        own = space.expert_base(base, widths[n])
        for s, r in enumerate(row):
            if n and s < cfg.share.encoder_stages:
                continue   # a shared stage: expert 1's value (MemeConfig.validate checked they agree)
            legal = ratio_choices(space, own, s, row[s - 1] if s else None, rows[n - 1][s] if n else None)
            require(r in legal, f"{where} (expert {n + 1} stage {s + 1}: {r} not in {[str(x) for x in legal]})")
            params[f"e{n}_s{s}"] = _position(legal, r)
    for n, (e, w) in enumerate(zip(cfg.experts, widths)):   # what the macro draws does not say: heads, groups...
        drawn = space.arch(base, e.num_res_blocks, e.pool_strides, e.high_ratios, w)
        off = [f.name for f in dataclasses.fields(e) if getattr(e, f.name) != getattr(drawn, f.name)]
        require(not off, f"{where} (expert {n + 1}'s {', '.join(off)} differ from the space's target.expert)")
    what = "width" if space.widths.whole_network else "decoder width"
    if space.widths.searched:
        for n, w in enumerate(widths):
            if n and cfg.share.decoder_levels:
                continue   # a shared decoder: expert 1's width (MemeConfig.validate checked they agree)
            legal = width_choices(space, widths[n - 1] if n else None)
            require(w in legal, f"{where} (expert {n + 1}'s {what} {w} not in {legal})")
            params[f"x{n}"] = _position(legal, w)
    else:
        require(set(widths) == {"1"}, f"{where} ({what}s {widths}: the space does not search widths)")
    idx: list[int] = []
    for n, p in enumerate(cfg.resolved_probs()):
        require(p in space.probs.choices, f"{where} (p_{n + 1}={p})")
        legal = prob_choices(space, idx[-1] if idx else None)
        i = space.probs.choices.index(p)
        require(i in legal, f"{where} (p_{n + 1}={p} breaks the p_n rule)")
        params[f"p{n}"] = _position(legal, i)
        idx.append(i)
    if space.boundaries.mode == "cluster" and cfg.num_experts > 1:
        clustered = list(clustered_boundaries(space, cfg.num_experts))
        require(not cfg.boundaries or cfg.resolved_boundaries() in (
            clustered, uniform_boundaries(cfg.diffusion.timesteps, cfg.num_experts)),
            f"{where} (boundaries {cfg.resolved_boundaries()} are neither uniform nor the clustered {clustered})")
        params["boundaries"] = "cluster" if cfg.boundaries and cfg.resolved_boundaries() == clustered else "uniform"
    elif space.boundaries.mode == "searchable":
        levels = range(1, space.boundaries.weight_levels + 1)
        for w in itertools.product(levels, repeat=cfg.num_experts):
            trial = FixedTrial({**params, **{f"w{n}": x for n, x in enumerate(w)}})
            if list(sample_boundaries(trial, space, cfg.num_experts)) == cfg.resolved_boundaries():
                params.update({f"w{n}": x for n, x in enumerate(w)})
                break
        else:
            raise ConfigError(f"{where} (boundaries {cfg.resolved_boundaries()})")
    elif space.boundaries.mode == "uniform":
        require(not cfg.boundaries, f"{where} (the space's boundaries are uniform)")
    return params


def _maybe(trial: TrialLike, name: str, choices: tuple) -> Any:
    """A categorical only when there is a choice (fixed knobs stay out of the study)."""
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))


def _strides_str(p: tuple[int, ...]) -> str:
    return ",".join(str(x) for x in p)


class FixedTrial:
    """Replays a dict of parameters (missing ones: int low, position 1 = largest legal value, first choice)."""

    def __init__(self, params: dict[str, Any], number: int = 0):
        self.params, self.number = dict(params), number

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return int(min(max(self.params.get(name, low), low), high))

    def suggest_float(self, name: str, low: float, high: float) -> float:
        return float(min(max(self.params.get(name, high), low), high))

    def suggest_categorical(self, name: str, choices: list) -> Any:
        return self.params.get(name, choices[0])
