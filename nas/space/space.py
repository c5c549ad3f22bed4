"""Search spaces: a YAML file -> :class:`SearchSpace`, validated (``load_space``).

A space names the target (data shape, expert template, diffusion), what is searched
(``search:`` rules), how a trial trains (``proxy:``, a :class:`nas.space.proxy.ProxySpec`) and
how a winner is promoted (``promote:``). Drawing candidates from a loaded space is
``nas.space.draw``'s job. The schema is documented in ``search_spaces/README.md``.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from fractions import Fraction
from importlib.resources import files
from pathlib import Path
from typing import Any, Optional

from meme.common.device import pick_device
from meme.common.fastpath import PRECISIONS
from meme.model.config import (
    ArchConfig,
    ConfigError,
    DataShape,
    DiffusionConfig,
    MemeConfig,
    ShareConfig,
    check_keys,
    coerce_fields,
    coerce_value,
    from_mapping,
    head_step_grid,
    parse_fraction,
    parse_yaml,
    require,
)
from meme.model.macs import cost_of_meme
from meme.model.references import reference_names, resolve
from meme.model.schedule import Choice, Schedule
from meme.model.supernet import at_width
from meme.model.resources import check_fits
from meme.training.branching import SPLIT_OPTIMIZERS
from meme.training.options import TrainOptions
from nas.space.proxy import EVALUATORS, ProxySpec, proxy_arch, proxy_config


def _spaces_dir() -> Path:
    """The shipped spaces: search_spaces/ in a checkout, the package data nas.spaces when installed."""
    checkout = Path(__file__).resolve().parents[2] / "search_spaces"
    if checkout.is_dir():
        return checkout
    return Path(str(files("nas.spaces")))


SPACES_DIR = _spaces_dir()
INITS = ("scratch", "branch")       # promote.init: how a promoted design's experts start
DEFAULT_SPACE = "meme_ffhq256"
BOUNDARY_MODES = ("uniform", "searchable", "cluster")
BOUNDARY_CHOICES = ("uniform", "cluster")   # what a trial picks from in mode 'cluster'
WIDTH_MONOTONE = ("wider_near_data", "free")
WIDTH_SCOPES = ("decoder", "network")


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
class WidthRules:
    """Each expert's width, as a fraction of the macro's base width, in one of two scopes.

    ``scope: decoder`` (the default): the expert's decoder width (``ArchConfig.decoder_channels``):
    Multistage's shape, one encoder and decoders of their own widths, as a point of the space.
    The encoder stays the macro's (shared or not), so an expert's width is what it spends on
    rebuilding the image from the encoder's features.

    ``scope: network``: every channel of the expert (``base_channels``), DDSM's slimmable
    sub-networks: the experts of a candidate are widths of one slimmable supernet
    (``meme-nas supernet train --space S``), so the supernet evaluator scores them and the
    samplers and ``nas.engine.interval_opt`` choose a width per interval. Every width reads
    the full-width time embedding and GroupNorm groups of ``target.expert.group_channels``,
    as the supernet's sub-networks do (``meme.model.supernet``).
    """

    choices: tuple[str, ...] = ("1",)      # ascending fractions of the base width; ("1",): not searched
    monotone: str = "free"                 # 'wider_near_data': non-increasing with expert index (toward t = T)
    scope: str = "decoder"                 # 'decoder' or 'network' (WIDTH_SCOPES)

    @property
    def searched(self) -> bool:
        return self.choices != ("1",)

    @property
    def whole_network(self) -> bool:
        return self.scope == "network"

    def channels(self, width: str, base: int) -> int:
        """The base channels at this width (``check_space`` made them whole)."""
        return int(Fraction(width) * base)


@dataclass(frozen=True)
class Macro:
    """Macro shape shared by all experts; one-element lists mean fixed."""

    base_channels: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    pool_strides: tuple[tuple[int, ...], ...]

    def combos(self) -> list[tuple[int, int, tuple[int, ...]]]:
        return list(itertools.product(self.base_channels, self.num_res_blocks, self.pool_strides))


@dataclass(frozen=True)
class PromoteRecipe:
    """How ``nas.promote.promote`` / ``nas.studies.compare`` train and score a design at the target.

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
    init: str = "scratch"        # experts from scratch, or 'branch': from shared weights (meme.training.branching)
    branch_at: float = 0.5       # branch: fraction of the steps trained as one parent on all t
    split_optimizer: str = "carry"   # branch: at the split, carry the parent's AdamW moments or start fresh
    init_from: Optional[str] = None  # branch: experts cut from this supernet / one-network run instead

    def train_options(self, **run: Any) -> TrainOptions:
        """The meme.training.train options of this recipe, plus ``run``'s (data, seed, device...).

        (``nas.promote.promote.Design.recipe`` keeps one network, N = 1, from scratch.)
        """
        opts = TrainOptions(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup=self.warmup,
                            ema_decay=self.ema_decay, **run)
        if self.init != "branch":
            return opts
        if self.init_from:
            return dataclasses.replace(opts, init_from=str(self.init_from))
        return dataclasses.replace(opts, branch_at=float(self.branch_at), split_optimizer=self.split_optimizer)

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
    dataset: Optional[str] = None                 # meme.data.dataset spec of the target's training data (None: not
                                                  # shipped, e.g. latents the user encodes; promote asks for it)
    promote: PromoteRecipe = field(default_factory=PromoteRecipe)  # full-training recipe at the target
    share: tuple[ShareConfig, ...] = (ShareConfig(),)  # what experts may hold in common (searched if > 1)
    widths: WidthRules = WidthRules()                  # per-expert decoder widths (searched if several)

    @property
    def num_stages(self) -> int:
        return self.template.num_stages

    def arch(self, base: int, blocks: int, pools: tuple[int, ...], ratios: tuple[str, ...],
             width: str = "1") -> ArchConfig:
        """The expert of macro ``base`` x ``blocks`` with these strides, d_h/d and width (a plain ArchConfig)."""
        arch = dataclasses.replace(self.template, base_channels=base, num_res_blocks=blocks,
                                   pool_strides=tuple(pools), high_ratios=tuple(ratios))
        if not self.widths.whole_network:
            return dataclasses.replace(arch, decoder_channels=self.widths.channels(width, base))
        return at_width(arch, width)

    def expert_base(self, base: int, width: str) -> int:
        """The base channels an expert of this width runs (its stages' d_h/d grids follow them)."""
        return self.widths.channels(width, base) if self.widths.whole_network else base

    def macro_and_width(self, arch: ArchConfig) -> tuple[int, str]:
        """(macro base width, expert width) of an expert this space draws (inverse of ``arch``)."""
        if not self.widths.whole_network:
            return arch.base_channels, str(Fraction(arch.decoder_channels or arch.base_channels, arch.base_channels))
        for base in self.macro.base_channels:
            width = str(Fraction(arch.base_channels, base))
            if width in self.widths.choices and self.arch(base, arch.num_res_blocks, arch.pool_strides,
                                                          arch.high_ratios, width) == arch:
                return base, width
        raise ConfigError(f"{arch.base_channels} base channels are not a width {list(self.widths.choices)} of a "
                          f"macro base {list(self.macro.base_channels)} of {self.name} (time embedding "
                          f"{arch.time_channels or arch.base_channels}, groups of {arch.group_channels or 'LDM'})")

    def schedule_of(self, cfg: MemeConfig, supernet: str | Path) -> Schedule:
        """A candidate of a space of network widths as the schedule that samples it straight from
        the slimmable supernet (``meme-nas sample --supernet DIR --schedule FILE``)."""
        require(self.widths.whole_network, f"{self.source}: its experts are not widths of one network "
                                           f"(search.widths scope network), so a candidate is not a schedule")
        choices = tuple(Choice(self.macro_and_width(e)[1], tuple(e.high_ratios), tuple(e.pool_strides))
                        for e in cfg.experts)
        return Schedule(tuple(cfg.resolved_boundaries()), choices, str(supernet), cfg.name)

    def stage_grid(self, base: int, stage: int) -> list[Fraction]:
        """Legal d_h/d of a stage at this base width within [min, max], ascending."""
        width = base * self.template.channel_mult[stage]
        grid = head_step_grid(width, self.template.head_channels)
        step = Fraction(self.template.head_channels, width)
        lo = step if self.ratios.min == "step" else parse_fraction(self.ratios.min, "ratios.min")
        hi = grid[-1] if self.ratios.max == "grid" else parse_fraction(self.ratios.max, "ratios.max")
        return [g for g in grid if lo <= g <= hi]


# ---- drawing ---------------------------------------------------------------------
#
# Candidates are drawn in nas.space.draw: every value as a *position* u in [0, 1) inside
# the range the rules leave it (upper bound: the previous stage and the previous expert;
# lower bound: the largest allowed drop below that), so a uniform u is a uniform draw
# among the legal values. Decrements drawn from a fixed range and clipped at the grid's
# floor would instead pile random draws (TPE's start-up trials) onto the all-minimum corner.

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


DATA_REQUIRED = "required"  # proxy.data of a space that trains on the user's data: nas.search needs --data

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
    check_keys(s, {"num_experts", "ratios", "probs", "boundaries", "macro", "share", "widths"}, f"{src}: search")
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
    widths = parse_widths(s.get("widths"), f"{src}: search.widths")
    proxy = parse_proxy(d.get("proxy", {}), src)
    defaults = _map(d.get("defaults", {}), f"{src}: defaults")
    space = SearchSpace(name=str(d.get("name", path.stem)), source=src, template=template, data=data,
                        diffusion=diffusion, num_experts=n_exp, ratios=ratios, probs=probs, boundaries=bounds,
                        macro=macro, proxy=proxy, defaults=dict(defaults),
                        reference=parse_reference(d.get("reference"), path, data),
                        dataset=parse_dataset(target.get("dataset"), path, f"{src}: target.dataset"),
                        promote=parse_promote(d.get("promote"), src), share=share, widths=widths)
    check_space(space)
    return space


def parse_share(x: Any, template: ArchConfig, where: str) -> tuple[ShareConfig, ...]:
    """``search.share``: a list of sharings in ``ShareConfig.describe`` words, e.g. [none, dec, enc1+dec]."""
    words = _list(x, where)
    out = tuple(ShareConfig.parse(w, f"{where}[{i}]").fit(template.num_stages) for i, w in enumerate(words))
    require(len({c.describe() for c in out}) == len(out), f"{where}: a choice is listed twice: {words}")
    return out


def parse_widths(x: Any, where: str) -> WidthRules:
    """``search.widths: {choices: [1/2, 1, 3/2], monotone: wider_near_data | free, scope: decoder | network}``
    (absent: not searched)."""
    if x is None:
        return WidthRules()
    m = _map(x, where)
    check_keys(m, {"choices", "monotone", "scope"}, where)
    fracs = [parse_fraction(v, f"{where}.choices") for v in _list(m.get("choices"), f"{where}.choices")]
    require(all(f > 0 for f in fracs), f"{where}.choices must be positive fractions of the base width, "
                                       f"got {[str(f) for f in fracs]}")
    require(len(set(fracs)) == len(fracs), f"{where}.choices: a width is listed twice: {[str(f) for f in fracs]}")
    monotone = str(m.get("monotone", "free"))
    require(monotone in WIDTH_MONOTONE, f"{where}.monotone must be one of {list(WIDTH_MONOTONE)}, got {monotone!r}")
    scope = str(m.get("scope", "decoder"))
    require(scope in WIDTH_SCOPES, f"{where}.scope must be one of {list(WIDTH_SCOPES)}, got {scope!r}")
    require(scope != "network" or max(fracs) == 1, f"{where}: scope network runs sub-networks of the macro, "
                                                  f"so the widest choice must be 1, got {max(fracs)}")
    return WidthRules(tuple(str(f) for f in sorted(fracs)), monotone, scope)


def parse_reference(x: Any, path: Path, data: DataShape) -> Optional[MemeConfig]:
    """A reference name (meme.model.references), a YAML path (relative to the space), or inline config.

    Absent: paper Table 4's MEME when the target is its shape, else no reference.
    """
    src = f"{path}: reference"
    if x is None:
        table4 = resolve("meme-table4")
        return table4 if table4.data == data else None
    if isinstance(x, dict):
        return MemeConfig.from_dict({"name": "reference", **x}, src)
    require(isinstance(x, str), f"{src} must be a reference name, a YAML path or a config mapping")
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
    require(not (space.widths.searched and not space.widths.whole_network and space.proxy.evaluator == "supernet"),
            f"{src}: search.widths varies the experts' decoder widths, which the supernet evaluator does not "
            f"slice: use proxy.evaluator scratch (or scope: network, widths of one slimmable supernet)")
    if space.widths.whole_network and space.widths.searched:
        require(space.template.group_channels > 0,
                f"{src}: search.widths scope network needs target.expert.group_channels (a fixed number of channels "
                f"per GroupNorm group, as the slimmable supernet's), so that a group means the same at every width")
        require(all(not c.any for c in space.share),
                f"{src}: search.share: experts of different widths hold nothing in common; use share: [none]")
    require(space.diffusion.timesteps >= max(space.num_experts) * space.boundaries.weight_levels,
          f"{src}: T={space.diffusion.timesteps} too small for {max(space.num_experts)} searchable intervals")
    for base, blocks, pools in space.macro.combos():
        arch = space.arch(base, blocks, pools, ("0",) * space.num_stages)
        arch.validate(f"{src}: target.expert (base {base})")
        require(space.data.resolution % 2 ** (space.num_stages - 1) == 0,
              f"{src}: target.data.resolution {space.data.resolution} is not divisible by 2^{space.num_stages - 1}")
        for w in space.widths.choices:   # every decoder width builds, at the target and at the proxy
            channels = Fraction(w) * base
            require(channels.denominator == 1, f"{src}: search.widths: {w} of base {base} is not a whole number "
                                               f"of channels")
            wide = space.arch(base, blocks, pools, ("0",) * space.num_stages, w)
            wide.validate(f"{src}: search.widths {w} (base {base})")
            widest = proxy_arch(wide, space.proxy, where=f"{src}: proxy, search.widths {w} (base {base})")
            for st in range(space.num_stages):
                require(bool(space.stage_grid(space.expert_base(base, w), st)),
                        f"{src}: search.ratios: no legal d_h/d in [min, max] at stage {st + 1} (base {base}, "
                        f"width {w}: {space.expert_base(base, w) * space.template.channel_mult[st]} channels in "
                        f"heads of {space.template.head_channels})")
        grids = [space.stage_grid(base, st) for st in range(space.num_stages)]
        if space.ratios.monotone_depth:
            for st in range(1, space.num_stages):
                require(all(any(x <= v for x in grids[st]) for v in grids[st - 1]),
                      f"{src}: search.ratios.min: a stage-{st} ratio leaves no legal stage-{st + 1} ratio "
                      f"below it at base {base}; use min: step")
        # the proxy keeps every target head step exact
        proxy_arch(arch, space.proxy, where=f"{src}: proxy (base {base})")
        # the largest candidate of this macro (the widest decoder) must fit where its trials train
        check_fits(largest_of_macro(space, widest, base, blocks), space.proxy.batch_size, pick_device(None),
                   what=f"{src}: proxy")
    ref = space.reference
    if ref is not None:
        require(ref.data == space.data, f"{src}: reference {ref.name} has data {ref.data}, the target is {space.data}")
        proxy_config(ref, space.proxy)


def largest_of_macro(space: SearchSpace, widest: ArchConfig, base: int, blocks: int) -> MemeConfig:
    """The most experts the space draws, each ``widest`` (the proxy-scale expert of the macro
    of target ``base`` and ``blocks``): what a trial of this macro can cost at most in memory."""
    n = max(space.num_experts)
    return MemeConfig(name=f"{n} experts of base {base} x {blocks} blocks",
                      experts=(widest,) * n, data=space.proxy.shape(),
                      diffusion=space.proxy.diffusion or space.diffusion).validate()


def largest_candidate(space: SearchSpace) -> MemeConfig:
    """The space's costliest trial at the proxy (most MACs per step over every macro, widest
    decoder, most experts, d_h/d 0: every channel in the attention branch), as a
    TARGET-shape config ``run_trial`` scales itself."""
    best, best_cost = None, -1.0
    for base, blocks, pools in space.macro.combos():
        arch = space.arch(base, blocks, pools, ("0",) * space.num_stages, space.widths.choices[-1])
        cfg = MemeConfig(name=f"largest of base {base} x {blocks} blocks", experts=(arch,) * max(space.num_experts),
                         data=space.data, diffusion=space.diffusion).validate()
        cost = cost_of_meme(proxy_config(cfg, space.proxy)).gmacs_mean
        if cost > best_cost:
            best, best_cost = cfg, cost
    assert best is not None, "a space has at least one macro"
    return best


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
