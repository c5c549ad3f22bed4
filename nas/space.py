"""Search spaces: a YAML file -> :class:`SearchSpace`, and ``build_config(trial, space)``.

The space is conditional (N changes how many experts exist), so it is written as an
Optuna *define-by-run* function: :func:`build_config` calls ``trial.suggest_*`` and
returns a validated :class:`MemeConfig` at the TARGET shape.

Structural rules hold by construction, never by sample-and-reject:

* d_h/d non-increasing with depth and with expert index: every ratio is drawn as a
  *position* in [0, 1) among the legal values between its upper bound (the previous
  stage of the same expert, the same stage of the previous expert, the grid's top) and
  its lower bound (``max_drop_depth`` / ``max_drop_experts`` below the upper one, the
  grid's floor). A uniform position is a uniform draw among the legal values, so random
  start-up trials spread over the space instead of piling onto its floor;
* p_n non-increasing: the same, over the choices at or below p_{n-1}
  (at most ``max_decrement`` choice steps below).

Parameter names do not depend on N (``e{n}_s{s}`` is the same parameter for every N
that has expert n), so TPE pools what trials with different N learn about shared
experts. The schema is documented in ``search_spaces/README.md``.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional, Protocol


from meme.branching import SPLIT_OPTIMIZERS
from meme.cli import pick_device
from meme.resources import check_fits
from meme.config import (ArchConfig, ConfigError, DataShape, DiffusionConfig, MemeConfig, ShareConfig, check_keys,
                         coerce_fields, coerce_value, from_mapping, head_step_grid, parse_fraction, parse_yaml,
                         require, uniform_boundaries)

def _spaces_dir() -> Path:
    """The shipped spaces: search_spaces/ in a checkout, the package data nas.spaces when installed."""
    checkout = Path(__file__).resolve().parent.parent / "search_spaces"
    if checkout.is_dir():
        return checkout
    from importlib.resources import files

    return Path(str(files("nas.spaces")))


SPACES_DIR = _spaces_dir()
EVALUATORS = ("scratch", "supernet")
INITS = ("scratch", "branch")       # promote.init: how a promoted design's experts start
DEFAULT_SPACE = "meme_ffhq256"
BOUNDARY_MODES = ("uniform", "searchable", "cluster")
BOUNDARY_CHOICES = ("uniform", "cluster")   # what a trial picks from in mode 'cluster'


class TrialLike(Protocol):
    """What build_config needs from an Optuna trial (real, Ray's captor, or a fixed dict)."""

    number: int

    def suggest_int(self, name: str, low: int, high: int) -> int: ...

    def suggest_float(self, name: str, low: float, high: float) -> float: ...

    def suggest_categorical(self, name: str, choices: list) -> Any: ...


@dataclass(frozen=True)
class RatioRules:
    """How per-expert, per-stage d_h/d are drawn."""

    min: str = "step"                  # 'step' (one head step of high channels) or a fraction
    max: str = "grid"                  # 'grid' (largest legal: one attention head left) or a fraction
    max_drop_depth: Fraction = Fraction(1, 2)    # largest drop from the stage above (fraction of d)
    max_drop_experts: Fraction = Fraction(1, 4)  # largest drop from the previous expert (fraction of d)
    monotone_depth: bool = True        # d_h/d non-increasing with stage index
    monotone_experts: bool = True      # d_h/d non-increasing with expert index (toward t = T)


@dataclass(frozen=True)
class ProbRules:
    """How the soft-expert probabilities p_n are drawn."""

    choices: tuple[float, ...] = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)  # sorted ascending
    monotone: bool = True              # p_n non-increasing with n
    max_decrement: int = 3             # largest drop between p_n and p_{n+1}, in choice steps


@dataclass(frozen=True)
class BoundaryRules:
    """Interval boundaries: uniform, or searchable via integer interval weights."""

    mode: str = "uniform"              # 'uniform', 'searchable' or 'cluster' (uniform or clustered, searched)
    weight_levels: int = 3             # searchable: interval n has length prop. to w_n in 1..levels


@dataclass(frozen=True)
class Macro:
    """Macro shape shared by all experts; one-element lists mean fixed."""

    base_channels: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    pool_strides: tuple[tuple[int, ...], ...]

    def combos(self) -> list[tuple[int, int, tuple[int, ...]]]:
        return list(itertools.product(self.base_channels, self.num_res_blocks, self.pool_strides))


@dataclass(frozen=True)
class ProxySpec:
    """Where and how long a trial trains: a small, fast stand-in for the target.

    The candidate is scaled to ``channels x resolution x resolution`` and every width
    (base channels AND head channels) is multiplied by ``width_mult``, so each stage
    keeps its number of heads and every target d_h/d is a legal head step at the proxy.
    """

    data: Optional[str] = "fashion-mnist"  # meme.data spec (None/'fashion-mnist' = embedded default)
    resolution: int = 32                   # proxy side in pixels
    channels: int = 1                      # proxy image channels
    width_mult: Fraction = Fraction(1, 4)  # proxy widths = target widths x this
    diffusion: Optional[DiffusionConfig] = None  # None = the target's schedule
    steps: int = 240                       # training budget: optimizer steps in all, whatever N
                                           # (equal training compute for every candidate, as the paper
                                           # compares designs and as a promoted winner is trained)
    steps_per_expert: bool = False         # True: N x steps (more training for larger N: ranks budgets,
                                           # not architectures; kept as an explicit option)
    batch_size: int = 32                   # images per step
    lr: float = 5e-4                       # AdamW learning rate (after warm-up)
    warmup: int = 20                       # linear warm-up steps
    grad_clip: float = 1.0                 # max global grad norm (0 = off)
    eval_every: int = 20                   # budget steps between objective reports
    prune_from: Optional[int] = None       # first pruning rung (budget step; grace period); None:
                                           # the first report at or after max(steps/3, warmup)
    reduction_factor: int = 3              # successive halving / ASHA: keep 1 in this many per rung
    eval_batch: int = 64                   # held-out images per evaluated t
    eval_timesteps: int = 10               # size of the fixed, uniformly spaced t grid
    fid_samples: int = 256                 # --objective fid: generated samples
    fid_steps: int = 25                    # --objective fid: DDIM steps
    limit_data: Optional[int] = 10000      # use only the first N training images
    seed: int = 0                          # init, data order, t and noise: same for every trial
    precision: str = "auto"                # meme.fastpath: 'auto' (bf16 on GPU; fp32 for narrow CPU proxies),
                                           # 'bf16' or 'fp32'
    evaluator: str = "scratch"             # 'scratch': train every candidate for `steps`; 'supernet': score its
                                           # experts as sub-networks of a trained supernet (nas.shared_eval)
    supernet: Optional[str] = None         # evaluator 'supernet': the directory nas.supernet train wrote
    finetune_steps: int = 0                # evaluator 'supernet': fine-tune steps in all before scoring (0: none)

    def total_steps(self, num_experts: int) -> int:
        """Optimizer steps a candidate with N experts trains for."""
        return self.steps * (num_experts if self.steps_per_expert else 1)

    def steps_per_budget_step(self, num_experts: int) -> int:
        """Optimizer steps in one budget step (reports and rungs count budget steps)."""
        return num_experts if self.steps_per_expert else 1

    def first_rung(self) -> int:
        """Budget step of the first pruning rung: past warm-up and a third of the budget.

        Earlier rungs rank how fast a model leaves the initial loss, not where it ends.
        """
        if self.prune_from is not None:
            return int(self.prune_from)
        start = max(math.ceil(self.steps / 3), self.warmup)
        return min(self.steps, math.ceil(start / self.eval_every) * self.eval_every)

    def shape(self) -> DataShape:
        return DataShape(channels=self.channels, resolution=self.resolution, latent=False)

    def digest(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["width_mult"] = str(self.width_mult)
        d["diffusion"] = dataclasses.asdict(self.diffusion) if self.diffusion else None
        return d

    def training_digest(self) -> dict[str, Any]:
        """What determines a full training run from scratch (the pruning schedule and evaluator do not)."""
        d = self.digest()
        for key in ("prune_from", "reduction_factor", "evaluator", "supernet", "finetune_steps"):
            d.pop(key)
        return d

    def from_scratch(self) -> "ProxySpec":
        """This proxy with the from-scratch evaluator (re-ranking always trains)."""
        return dataclasses.replace(self, evaluator="scratch", supernet=None, finetune_steps=0)


@dataclass(frozen=True)
class PromoteRecipe:
    """How ``nas.promote`` / ``nas.compare`` train and score a design at the target.

    One recipe for every promoted design: the same total optimizer steps and batch
    (equal training compute, whatever N), the same sampler and the same FID protocol.
    """

    steps: int = 20_000          # optimizer steps in all, over every expert
    batch_size: int = 64         # images per step
    lr: float = 2e-4             # AdamW peak learning rate
    warmup: int = 500            # linear warm-up steps
    ema_decay: float = 0.999     # EMA of the weights that are sampled
    fid_samples: int = 10_000    # generated images scored by FID
    fid_reference: int = 10_000  # real images in the FID reference statistics
    sample_steps: int = 50       # DDIM steps
    init: str = "scratch"        # experts from scratch, or 'branch': from shared weights (meme.branching)
    branch_at: float = 0.5       # branch: fraction of the steps trained as one parent on all t
    split_optimizer: str = "carry"   # branch: at the split, carry the parent's AdamW moments or start fresh
    init_from: Optional[str] = None  # branch: experts cut from this supernet / one-network run instead

    def train_flags(self) -> list[str]:
        """meme.train flags (``nas.promote.Design.recipe`` keeps one network, N = 1, from scratch)."""
        flags = ["--steps", str(self.steps), "--batch-size", str(self.batch_size), "--lr", str(self.lr),
                 "--warmup", str(self.warmup), "--ema-decay", str(self.ema_decay)]
        if self.init == "branch":
            if self.init_from:
                flags += ["--init-from", str(self.init_from)]
            else:
                flags += ["--branch-at", str(self.branch_at), "--split-optimizer", self.split_optimizer]
        return flags

    def digest(self) -> dict[str, Any]:
        """What a promoted run is stamped with (a from-scratch recipe: as before branching existed)."""
        d = dataclasses.asdict(self)
        if self.init == "scratch":
            for k in ("init", "branch_at", "split_optimizer", "init_from"):
                d.pop(k)
        return d

    def check(self, where: str) -> "PromoteRecipe":
        require(self.init in INITS, f"{where}: init must be one of {list(INITS)}, got {self.init!r}")
        require(0 < float(self.branch_at) < 1, f"{where}: branch_at must lie in (0, 1), got {self.branch_at}")
        require(self.split_optimizer in SPLIT_OPTIMIZERS,
                f"{where}: split_optimizer must be one of {list(SPLIT_OPTIMIZERS)}, got {self.split_optimizer!r}")
        return self


@dataclass(frozen=True)
class SearchSpace:
    name: str
    source: str
    template: ArchConfig                 # every expert starts from this (ratios filled in)
    data: DataShape                      # target shape (the budget is measured here)
    diffusion: DiffusionConfig
    num_experts: tuple[int, ...]
    ratios: RatioRules
    probs: ProbRules
    boundaries: BoundaryRules
    macro: Macro
    proxy: ProxySpec
    defaults: dict = field(default_factory=dict)  # CLI defaults for this space (trials, ...)
    reference: Optional[MemeConfig] = None        # hand design trained beside the search (None: none)
    dataset: Optional[str] = None                 # meme.data spec of the target's training data (None: not
                                                  # shipped, e.g. latents the user encodes; promote asks for it)
    promote: PromoteRecipe = field(default_factory=PromoteRecipe)  # full-training recipe at the target
    share: tuple[ShareConfig, ...] = (ShareConfig(),)  # what experts may hold in common (searched if > 1)

    @property
    def num_stages(self) -> int:
        return self.template.num_stages

    def arch(self, base: int, blocks: int, pools: tuple[int, ...], ratios: tuple[str, ...]) -> ArchConfig:
        return dataclasses.replace(self.template, base_channels=base, num_res_blocks=blocks,
                                   pool_strides=tuple(pools), high_ratios=tuple(ratios))

    def stage_grid(self, base: int, stage: int) -> list[Fraction]:
        """Legal d_h/d of a stage at this base width within [min, max], ascending."""
        width = base * self.template.channel_mult[stage]
        grid = head_step_grid(width, self.template.head_channels)
        step = Fraction(self.template.head_channels, width)
        lo = step if self.ratios.min == "step" else parse_fraction(self.ratios.min, "ratios.min")
        hi = grid[-1] if self.ratios.max == "grid" else parse_fraction(self.ratios.max, "ratios.max")
        return [g for g in grid if lo <= g <= hi]


# ---- sampling ---------------------------------------------------------------------
#
# Every value is drawn as a *position* u in [0, 1) inside the range the rules leave it
# (upper bound: the previous stage and the previous expert; lower bound: the largest
# allowed drop below that), so a uniform u is a uniform draw among the legal values.
# Decrements drawn from a fixed range and clipped at the grid's floor would instead
# pile random draws (TPE's start-up trials) onto the all-minimum corner.

def _pick(choices: list, u: float) -> Any:
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
                  shared_stages: int = 0) -> list[tuple[str, ...]]:
    """Per-expert, per-stage d_h/d; monotone rules hold by construction.

    The first ``shared_stages`` stages are one module for all experts (``MemeConfig.share``),
    so expert 1 draws them and the others take its values (equal values keep every rule).
    """
    out: list[list[Fraction]] = []
    for n in range(n_experts):
        row: list[Fraction] = []
        for s in range(space.num_stages):
            if n and s < shared_stages:
                row.append(out[0][s])
                continue
            legal = ratio_choices(space, base, s, row[s - 1] if s else None, out[n - 1][s] if n else None)
            row.append(_pick(legal, trial.suggest_float(f"e{n}_s{s}", 0.0, 1.0)))
        out.append(row)
    return [tuple(str(r) for r in row) for row in out]


def sample_probs(trial: TrialLike, space: SearchSpace, n_experts: int) -> tuple[float, ...]:
    idx: list[int] = []
    for n in range(n_experts):
        idx.append(_pick(prob_choices(space, idx[-1] if idx else None), trial.suggest_float(f"p{n}", 0.0, 1.0)))
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
    """Boundaries of N intervals from timestep clustering (``nas.clusters``; cached per space and N)."""
    from nas.clusters import boundaries_for  # local: nas.clusters trains with nas.trial, which imports this module

    return boundaries_for(space, n_experts)


def build_config(trial: TrialLike, space: SearchSpace, name: Optional[str] = None) -> MemeConfig:
    """Define-by-run: draw one candidate from the space (target shape), validated."""
    n_experts = trial.suggest_categorical("num_experts", list(space.num_experts))
    base = _maybe(trial, "base_channels", space.macro.base_channels)
    blocks = _maybe(trial, "num_res_blocks", space.macro.num_res_blocks)
    pools = tuple(int(p) for p in str(_maybe(trial, "pool_strides",
                                              tuple(_strides_str(p) for p in space.macro.pool_strides))).split(","))
    share = sample_share(trial, space, n_experts)
    ratios = sample_ratios(trial, space, n_experts, base, share.encoder_stages)
    probs = sample_probs(trial, space, n_experts)
    bounds = sample_boundaries(trial, space, n_experts)
    cfg = MemeConfig(name=name or f"{space.name}-t{getattr(trial, 'number', 0)}",
                     experts=tuple(space.arch(base, blocks, pools, r) for r in ratios),
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
    e0 = cfg.experts[0]
    params: dict[str, Any] = {"num_experts": cfg.num_experts}
    where = f"{cfg.name}: not in space {space.name}"
    require(cfg.num_experts in space.num_experts, f"{where} (N={cfg.num_experts})")
    require(all(dataclasses.replace(e, high_ratios=e0.high_ratios) == e0 for e in cfg.experts),
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
        for s, r in enumerate(row):
            if n and s < cfg.share.encoder_stages:
                continue   # a shared stage: expert 1's value (MemeConfig.validate checked they agree)
            legal = ratio_choices(space, e0.base_channels, s, row[s - 1] if s else None, rows[n - 1][s] if n else None)
            require(r in legal, f"{where} (expert {n + 1} stage {s + 1}: {r} not in {[str(x) for x in legal]})")
            params[f"e{n}_s{s}"] = _position(legal, r)
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


# ---- loading ----------------------------------------------------------------------

def resolve_space_path(spec: str | Path | None) -> Path:
    """A path, or a bare name looked up in search_spaces/ (``tiny`` -> tiny.yaml)."""
    spec = str(spec or DEFAULT_SPACE)
    p = Path(spec)
    if p.is_file():
        return p
    for cand in (SPACES_DIR / spec, SPACES_DIR / f"{spec}.yaml"):
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in SPACES_DIR.glob("*.yaml"))
    raise ConfigError(f"search space not found: {spec} (a YAML path, or one of {known})")


_TOP_KEYS = {"name", "description", "target", "search", "proxy", "defaults", "reference", "promote"}


def load_space(spec: str | Path | None = None) -> SearchSpace:
    """Parse and check a space file; every error is one line naming the field."""
    path = resolve_space_path(spec)
    src = str(path)
    d = parse_yaml(path.read_text(), src)
    require(isinstance(d, dict), f"{src}: top level must be a mapping")
    check_keys(d, _TOP_KEYS, src)
    target = _map(d.get("target"), f"{src}: target")
    check_keys(target, {"data", "dataset", "diffusion", "expert"}, f"{src}: target")
    data = _dc(DataShape, target.get("data", {}), f"{src}: target.data")
    diffusion = _dc(DiffusionConfig, target.get("diffusion", {}), f"{src}: target.diffusion")
    expert = dict(_map(target.get("expert"), f"{src}: target.expert"))
    require(expert.get("kind", "iunet") == "iunet", f"{src}: target.expert.kind must be 'iunet' (ratios are searched)")
    expert.setdefault("kind", "iunet")
    expert.setdefault("attention_ds", [])
    mult = expert.get("channel_mult", ArchConfig().channel_mult)
    require(isinstance(mult, (list, tuple)), f"{src}: target.expert.channel_mult must be a list")
    n_stages = len(mult)
    expert.setdefault("pool_strides", [2] * n_stages)
    expert["high_ratios"] = ["0"] * n_stages  # placeholder, replaced per candidate
    try:
        template = MemeConfig.from_dict({"name": "template", "experts": [expert]}, f"{src}: target.expert").experts[0]
    except ConfigError as exc:
        # placeholder ratio 0 is always legal; any error is about the user's fields
        raise ConfigError(str(exc)) from None

    s = _map(d.get("search"), f"{src}: search")
    check_keys(s, {"num_experts", "ratios", "probs", "boundaries", "macro", "share"}, f"{src}: search")
    n_exp = coerce_value(_list(s.get("num_experts", [4]), f"{src}: search.num_experts"), tuple[int, ...],
                         f"{src}: search.num_experts")
    require(all(n >= 1 for n in n_exp), f"{src}: search.num_experts must be positive ints, got {list(n_exp)}")
    r = _map(s.get("ratios", {}), f"{src}: search.ratios")
    check_keys(r, {f.name for f in dataclasses.fields(RatioRules)}, f"{src}: search.ratios")
    ratios = RatioRules(
        min=str(r.get("min", "step")), max=str(r.get("max", "grid")),
        max_drop_depth=parse_fraction(r.get("max_drop_depth", "1/2"), f"{src}: search.ratios.max_drop_depth"),
        max_drop_experts=parse_fraction(r.get("max_drop_experts", "1/4"), f"{src}: search.ratios.max_drop_experts"),
        monotone_depth=coerce_value(r.get("monotone_depth", True), bool, f"{src}: search.ratios.monotone_depth"),
        monotone_experts=coerce_value(r.get("monotone_experts", True), bool, f"{src}: search.ratios.monotone_experts"))
    for key in ("min", "max"):
        v = getattr(ratios, key)
        if v not in ("step", "grid"):
            f = parse_fraction(v, f"{src}: search.ratios.{key}")
            require(0 <= f < 1, f"{src}: search.ratios.{key} must lie in [0, 1), got {v}")
    p = _map(s.get("probs", {}), f"{src}: search.probs")
    check_keys(p, {f.name for f in dataclasses.fields(ProbRules)}, f"{src}: search.probs")
    choices = tuple(sorted(coerce_value(_list(p.get("choices", list(ProbRules.choices)), f"{src}: search.probs.choices"),
                                        tuple[float, ...], f"{src}: search.probs.choices")))
    require(choices and all(0 <= c <= 1 for c in choices), f"{src}: search.probs.choices must be values in [0, 1]")
    probs = ProbRules(choices=choices, monotone=coerce_value(p.get("monotone", True), bool, f"{src}: search.probs.monotone"),
                      max_decrement=coerce_value(p.get("max_decrement", 3), int, f"{src}: search.probs.max_decrement"))
    b = _map(s.get("boundaries", {}), f"{src}: search.boundaries")
    check_keys(b, {"mode", "weight_levels"}, f"{src}: search.boundaries")
    bounds = BoundaryRules(mode=str(b.get("mode", "uniform")),
                           weight_levels=coerce_value(b.get("weight_levels", 3), int, f"{src}: search.boundaries.weight_levels"))
    require(bounds.mode in BOUNDARY_MODES,
          f"{src}: search.boundaries.mode must be one of {list(BOUNDARY_MODES)}, got {bounds.mode!r}")
    require(bounds.weight_levels >= 1, f"{src}: search.boundaries.weight_levels must be >= 1")
    m = _map(s.get("macro", {}), f"{src}: search.macro")
    check_keys(m, {"base_channels", "num_res_blocks", "pool_strides"}, f"{src}: search.macro")
    pools = m.get("pool_strides", [list(template.pool_strides)])
    require(isinstance(pools, list) and all(isinstance(x, list) and len(x) == n_stages for x in pools),
          f"{src}: search.macro.pool_strides must be a list of per-stage lists ({n_stages} values each)")
    where = f"{src}: search.macro"
    macro = Macro(
        base_channels=coerce_value(_list(m.get("base_channels", [template.base_channels]), f"{where}.base_channels"),
                                   tuple[int, ...], f"{where}.base_channels"),
        num_res_blocks=coerce_value(_list(m.get("num_res_blocks", [template.num_res_blocks]), f"{where}.num_res_blocks"),
                                    tuple[int, ...], f"{where}.num_res_blocks"),
        pool_strides=tuple(coerce_value(x, tuple[int, ...], f"{where}.pool_strides") for x in pools))

    share = parse_share(s.get("share", ["none"]), template, f"{src}: search.share")
    proxy = parse_proxy(d.get("proxy", {}), src)
    defaults = _map(d.get("defaults", {}), f"{src}: defaults")
    space = SearchSpace(name=str(d.get("name", path.stem)), source=src, template=template, data=data,
                        diffusion=diffusion, num_experts=n_exp, ratios=ratios, probs=probs, boundaries=bounds,
                        macro=macro, proxy=proxy, defaults=dict(defaults),
                        reference=parse_reference(d.get("reference"), path, data),
                        dataset=parse_dataset(target.get("dataset"), path, f"{src}: target.dataset"),
                        promote=parse_promote(d.get("promote"), src), share=share)
    check_space(space)
    return space


def parse_share(x: Any, template: ArchConfig, where: str) -> tuple[ShareConfig, ...]:
    """``search.share``: a list of sharings in ``ShareConfig.describe`` words, e.g. [none, dec, enc1+dec]."""
    words = _list(x, where)
    out = tuple(ShareConfig.parse(w, f"{where}[{i}]").fit(template.num_stages) for i, w in enumerate(words))
    require(len({c.describe() for c in out}) == len(out), f"{where}: a choice is listed twice: {words}")
    return out


def parse_reference(x: Any, path: Path, data: DataShape) -> Optional[MemeConfig]:
    """A reference name (meme.references), a YAML path (relative to the space), or inline config.

    Absent: paper Table 4's MEME when the target is its shape, else no reference.
    """
    src = f"{path}: reference"
    if x is None:
        from meme.references import resolve
        table4 = resolve("meme-table4")
        return table4 if table4.data == data else None
    if isinstance(x, dict):
        return MemeConfig.from_dict({"name": "reference", **x}, src)
    require(isinstance(x, str), f"{src} must be a reference name, a YAML path or a config mapping")
    from meme.references import reference_names, resolve
    if x in reference_names():  # built-in references and the configs shipped in meme/configs
        return resolve(x)
    return MemeConfig.load(path.parent / x)


def parse_dataset(x: Any, path: Path, where: str) -> Optional[str]:
    """'fashion-mnist', or a path (relative to the space file) to images or latents."""
    if x is None or x == "":
        return None
    require(isinstance(x, str), f"{where} must be 'fashion-mnist' or a path, got {x!r}")
    if x == "fashion-mnist":
        return x
    p = Path(x).expanduser()
    return str(p if p.is_absolute() else path.parent / p)


def parse_promote(d: Any, src: str) -> PromoteRecipe:
    d = _map(d, f"{src}: promote")
    check_keys(d, {f.name for f in dataclasses.fields(PromoteRecipe)}, f"{src}: promote")
    recipe = from_mapping(PromoteRecipe, d, f"{src}: promote")
    for key in ("steps", "batch_size", "fid_samples", "fid_reference", "sample_steps"):
        require(int(getattr(recipe, key)) >= 1, f"{src}: promote.{key} must be >= 1, got {getattr(recipe, key)}")
    require(recipe.lr > 0 and 0 <= recipe.ema_decay < 1, f"{src}: promote.lr must be > 0 and ema_decay in [0, 1)")
    return recipe.check(f"{src}: promote")


def parse_proxy(d: Any, src: str) -> ProxySpec:
    d = dict(_map(d, f"{src}: proxy"))
    check_keys(d, {f.name for f in dataclasses.fields(ProxySpec)}, f"{src}: proxy")
    if "width_mult" in d:
        d["width_mult"] = parse_fraction(d["width_mult"], f"{src}: proxy.width_mult")
    if d.get("diffusion") is not None:
        d["diffusion"] = _dc(DiffusionConfig, d["diffusion"], f"{src}: proxy.diffusion")
    if "data" in d and d["data"] in ("", "default"):
        d["data"] = None
    proxy = ProxySpec(**coerce_fields(ProxySpec, d, f"{src}: proxy"))
    require(isinstance(proxy.steps_per_expert, bool), f"{src}: proxy.steps_per_expert must be true or false")
    for key in ("resolution", "channels", "steps", "batch_size", "eval_every", "eval_batch", "eval_timesteps"):
        require(int(getattr(proxy, key)) >= 1, f"{src}: proxy.{key} must be >= 1, got {getattr(proxy, key)}")
    require(proxy.reduction_factor >= 2, f"{src}: proxy.reduction_factor must be >= 2, got {proxy.reduction_factor}")
    if proxy.prune_from is not None:
        require(proxy.warmup <= int(proxy.prune_from) <= proxy.steps,
              f"{src}: proxy.prune_from must lie between warmup ({proxy.warmup}) and steps ({proxy.steps}), "
              f"got {proxy.prune_from}: an earlier rung ranks warm-up, not the design")
    require(0 < proxy.width_mult <= 1, f"{src}: proxy.width_mult must lie in (0, 1], got {proxy.width_mult}")
    from meme.fastpath import PRECISIONS
    require(proxy.evaluator in EVALUATORS, f"{src}: proxy.evaluator must be one of {list(EVALUATORS)}, "
                                         f"got {proxy.evaluator!r}")
    require(int(proxy.finetune_steps) >= 0, f"{src}: proxy.finetune_steps must be >= 0, got {proxy.finetune_steps}")
    if proxy.supernet is not None:
        sn = Path(str(proxy.supernet)).expanduser()
        proxy = dataclasses.replace(proxy, supernet=str(sn if sn.is_absolute() else Path(src).parent / sn))
    require(proxy.precision in PRECISIONS, f"{src}: proxy.precision must be one of {list(PRECISIONS)}, "
                                         f"got {proxy.precision!r}")
    return proxy


def check_space(space: SearchSpace) -> None:
    """Every draw must be legal: non-empty grids, rule bounds reachable, proxy exact."""
    src = space.source
    require(space.diffusion.timesteps >= max(space.num_experts) * space.boundaries.weight_levels,
          f"{src}: T={space.diffusion.timesteps} too small for {max(space.num_experts)} searchable intervals")
    for base, blocks, pools in space.macro.combos():
        arch = space.arch(base, blocks, pools, ("0",) * space.num_stages)
        arch.validate(f"{src}: target.expert (base {base})")
        require(space.data.resolution % 2 ** (space.num_stages - 1) == 0,
              f"{src}: target.data.resolution {space.data.resolution} is not divisible by 2^{space.num_stages - 1}")
        grids = [space.stage_grid(base, st) for st in range(space.num_stages)]
        for st, g in enumerate(grids):
            require(bool(g), f"{src}: search.ratios: no legal d_h/d in [min, max] at stage {st + 1} (base {base})")
        if space.ratios.monotone_depth:
            for st in range(1, space.num_stages):
                require(all(any(x <= v for x in grids[st]) for v in grids[st - 1]),
                      f"{src}: search.ratios.min: a stage-{st} ratio leaves no legal stage-{st + 1} ratio "
                      f"below it at base {base}; use min: step")
        # the proxy keeps every target head step exact
        from nas.proxy import proxy_arch, proxy_config  # local: proxy imports this module
        small = proxy_arch(arch, space.proxy, where=f"{src}: proxy (base {base})")
        # the largest candidate of this macro must fit where its trials will train
        n = max(space.num_experts)
        largest = MemeConfig(name=f"{n} experts of base {base} x {blocks} blocks", experts=(small,) * n,
                             data=space.proxy.shape(), diffusion=space.proxy.diffusion or space.diffusion)
        check_fits(largest.validate(), space.proxy.batch_size, pick_device(None), what=f"{src}: proxy")
    ref = space.reference
    if ref is not None:
        require(ref.data == space.data, f"{src}: reference {ref.name} has data {ref.data}, the target is {space.data}")
        proxy_config(ref, space.proxy)


def _map(x: Any, where: str) -> dict:
    if x is None:
        return {}
    require(isinstance(x, dict), f"{where} must be a mapping")
    return x


def _list(x: Any, where: str) -> list:
    require(isinstance(x, list) and len(x) > 0, f"{where} must be a non-empty list")
    return x


def _dc(cls: type, d: Any, where: str):
    obj = from_mapping(cls, _map(d, where), where)
    obj.validate()
    return obj
