"""Exact interval-wise optimisation: ``meme-nas interval-opt --space S --supernet DIR --budget-gflops B``.

With the weight-shared evaluator a candidate's objective is a sum of per-expert terms,
expert n contributing sum_{t in grid, t in I_n} loss(t, a_n) for its sub-network a_n,
and its cost is the interval-weighted sum of per-expert costs. So the best sub-networks
for each N, boundary choice and macro shape under the budget are an exact optimisation,
done by the project's one chain optimiser (``nas.space.pareto_chain``): positions are
experts, an expert's choice is its sub-network -- its width (``search.widths`` of scope
network: one slimmable supernet) and its per-stage d_h/d at that width -- and the space's
monotone rules bound each expert by the one before it.

It scores every legal sub-network once, so it is for spaces small enough to enumerate
(``--max-archs``); larger ones say how many they have and are left to TPE.
p_n does not enter the objective without a fine-tune, so the optimum uses the space's
largest p choice for every expert; ``finetune_steps > 0`` is refused here.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Optional

from meme.common.checkpoint import atomic_write_json
from meme.common.command import CommandParser, add_fast_path_flag, main_guard
from meme.common.errors import UserError
from meme.model.config import MemeConfig
from meme.model.macs import cost_of_network
from nas.engine.study import storage_url_for
from nas.evaluators.supernet_score import SharedScorer
from nas.evaluators.supernet_training import macro_name
from nas.space import pareto_chain
from nas.space.draw import FixedTrial, clustered_boundaries, ratio_choices, sample_boundaries, width_choices
from nas.space.proxy import proxy_arch
from nas.space.space import SearchSpace, load_space

Chain = tuple[Fraction, ...]
Option = tuple[str, Chain]          # one expert's sub-network: (width, per-stage d_h/d)


@dataclass
class Optimum:
    config: MemeConfig
    objective: float
    gflops: float
    chains_scored: int


def chains_after(space: SearchSpace, base: int, prev: Optional[Chain]) -> list[Chain]:
    """Every chain an expert of ``base`` channels may take after ``prev`` (None: the first expert), by the space's rules."""
    out: list[Chain] = []

    def walk(row: list[Fraction]) -> None:
        s = len(row)
        if s == space.num_stages:
            out.append(tuple(row))
            return
        for r in ratio_choices(space, base, s, row[s - 1] if s else None, prev[s] if prev else None):
            walk(row + [r])

    walk([])
    return out


def options_after(space: SearchSpace, base: int, prev: Optional[Option]) -> list[Option]:
    """Every (width, chain) an expert of macro ``base`` may take after ``prev``: the space's widths
    (scope network; full width only otherwise) and, at each, the chains of its own channels."""
    widths = width_choices(space, prev[0] if prev else None) if space.widths.whole_network else ["1"]
    return [(w, c) for w in widths for c in chains_after(space, space.expert_base(base, w), prev[1] if prev else None)]


def all_options(space: SearchSpace, base: int, n_max: int) -> set[Option]:
    """Sub-networks reachable by any expert of any N up to n_max."""
    seen: set[Option] = set()
    frontier: set[Optional[Option]] = {None}
    for _ in range(n_max):
        nxt = set()
        for p in frontier:
            for o in options_after(space, base, p):
                if o not in seen:
                    seen.add(o)
                    nxt.add(o)
        frontier = nxt
    return seen


def target_cost(space: SearchSpace, base: int, blocks: int, pools: tuple[int, ...]):
    """GFLOPs of a sub-network at the TARGET shape (``meme.model.macs`` counts iU-Nets by parts: cheap per chain).

    Memoised per option: the DP asks for the same one at every state, and a macro's options
    (up to ``--max-archs``) outnumber ``cost_of_network``'s in-process cache."""
    @lru_cache(maxsize=None)
    def cost(option: Option) -> float:
        return cost_of_network(_arch(space, base, blocks, pools, option), space.data).gflops
    return cost


def boundary_choices(space: SearchSpace, n: int) -> list[tuple[int, ...]]:
    if space.boundaries.mode == "uniform":
        return [()]
    if space.boundaries.mode == "cluster":     # a trial picks uniform or the clustered ones
        return [()] if n == 1 else [(), clustered_boundaries(space, n)]
    import itertools
    levels = range(1, space.boundaries.weight_levels + 1)
    seen = []
    for w in itertools.product(levels, repeat=n):
        b = sample_boundaries(FixedTrial({f"w{i}": x for i, x in enumerate(w)}), space, n)
        if b not in seen:
            seen.append(b)
    return seen


def optimise(space: SearchSpace, scorer: SharedScorer, budget: float, mode: str = "mean",
             max_archs: int = 2000, progress: bool = True) -> dict:
    """The exact best candidate per (N, boundaries, macro) under the budget, and the overall best."""
    if getattr(scorer.proxy, "finetune_steps", 0):
        raise UserError("interval_opt scores inherited sub-networks; a fine-tune couples p_n in: use TPE")
    if space.widths.searched and not space.widths.whole_network:
        raise UserError(f"{space.source}: decoder widths are not sub-networks of a supernet; interval_opt needs "
                        f"search.widths of scope network or none")
    t0 = time.perf_counter()
    rows, best, scored = [], None, 0
    p_top = space.probs.choices[-1]
    for base, blocks, pools in space.macro.combos():
        options = all_options(space, base, max(space.num_experts))
        if len(options) > max_archs:
            rows.append({"macro": [base, blocks, list(pools)], "skipped": f"{len(options)} sub-networks > --max-archs {max_archs}"})
            continue
        cost = target_cost(space, base, blocks, tuple(pools))
        if min(cost(o) for o in options) > budget:
            rows.append({"macro": [base, blocks, list(pools)], "skipped": "every sub-network is over the budget"})
            continue
        macro = macro_name(base, blocks)
        losses: dict[Option, dict[int, float]] = {}
        for o in _bar(options, progress, f"scoring {macro} {pools}"):
            arch = proxy_arch(_arch(space, base, blocks, pools, o), scorer.proxy)
            vals, _ = scorer.arch_losses(macro, arch, scorer.grid)
            losses[o] = dict(zip(scorer.grid, vals))
        scored += len(options)
        after = lru_cache(maxsize=None)(lambda prev: options_after(space, base, prev))   # asked per state, N, bounds
        for n in space.num_experts:
            for bounds in boundary_choices(space, n):
                cfg0 = _config(space, base, blocks, pools, [after(None)[0]] * n, bounds, p_top)
                owners = scorer.owners(cfg0)
                sol = best_chain(after, n, owners, cfg0.interval_weights(), losses, cost, budget, mode)
                if sol is None:
                    continue
                total_cost, total_loss, assignment = sol
                cfg = _config(space, base, blocks, pools, assignment, bounds, p_top)
                obj = total_loss / len(scorer.grid)
                row = {"macro": [base, blocks, list(pools)], "N": n, "boundaries": list(cfg.resolved_boundaries()),
                       "objective": obj, "gflops": total_cost, "widths": [w for w, _ in assignment],
                       "ratios": [[str(r) for r in c] for _, c in assignment]}
                rows.append(row)
                if best is None or obj < best.objective:
                    best = Optimum(cfg, obj, total_cost, scored)
    return {"budget_gflops": budget, "mode": mode, "rows": rows, "chains_scored": scored,
            "wall_s": round(time.perf_counter() - t0, 1),
            "best": None if best is None else {"objective": best.objective, "gflops": best.gflops,
                                               "config_yaml": best.config.to_yaml()}}


def best_chain(after, n, owners, weights, losses, cost, budget, mode):
    """The lowest summed loss of n experts' sub-networks under the budget, by ``nas.space.pareto_chain``:
    positions are experts, an expert's choice is its (width, chain), ``after(prev)`` the ones the
    rules allow after the expert before. 'mean': the interval-weighted cost is summed and bounded;
    'max': every expert alone is under the budget. (total cost, total loss, choices) or None."""
    def options(e: int, prev: Optional[Option]) -> list[Option]:
        return [o for o in after(prev) if mode != "max" or cost(o) <= budget * (1 + 1e-9)]

    def term(e: int, o: Option) -> tuple[float, float]:
        return (weights[e] * cost(o) if mode == "mean" else 0.0), sum(losses[o][t] for t in owners[e])

    best = pareto_chain.best_under(pareto_chain.front(n, options, term, budget), budget)
    if best is None:
        return None
    total = best.cost if mode == "mean" else max(cost(o) for o in best.choices)
    return total, best.loss, best.choices


def against_search(study_dir: Path, optimum: float, digest: Optional[str]) -> dict:
    """How close a search with the same evaluator came to the exact optimum.

    Reads the study in ``study_dir`` (``nas.search --out``'s folder: optuna.db, the study
    named as the folder) and reports its best supernet score, the gap to ``optimum`` and
    after how many trials it came within 0.1% and 0.01% of it. The same evaluator (supernet
    digest) is required: scores of another supernet are not comparable. A best *below*
    the optimum would mean the optimiser missed a candidate of the space: refused.
    """
    import optuna  # the optimiser itself needs no study
    try:
        study = optuna.load_study(study_name=Path(study_dir).name, storage=storage_url_for(study_dir, None))
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"--against {study_dir}: no study {Path(study_dir).name!r} there ({e})") from e
    if study.user_attrs.get("supernet_digest") != digest:
        raise UserError(f"--against {study_dir}: scored by supernet {study.user_attrs.get('supernet_digest')}, "
                        f"not this one ({digest}): the scores are not comparable")
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    scored = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.values
              and "duplicate_of" not in t.user_attrs]
    if not scored:
        raise UserError(f"--against {study_dir}: no scored trial")
    best = min(scored, key=lambda t: t.values[0])
    if best.values[0] < optimum * (1 - 1e-9):
        raise UserError(f"--against {study_dir}: trial {best.number} scores {best.values[0]:.6f}, below the "
                        f"'exact' optimum {optimum:.6f}: the enumeration missed part of the space")

    numbers = {t.number for t in scored}

    def first_within(rel: float) -> Optional[int]:
        return next((i + 1 for i, t in enumerate(trials)
                     if t.number in numbers and t.values[0] <= optimum * (1 + rel)), None)
    so_far, curve = float("inf"), []
    for t in trials:
        if t.number in numbers:
            so_far = min(so_far, t.values[0])
        curve.append(None if so_far == float("inf") else 100 * (so_far / optimum - 1))
    return {"study": str(study_dir), "sampler": study.user_attrs.get("sampler"), "trials": len(trials),
            "distinct_scored": len(scored), "best_trial": best.number, "best_objective": best.values[0],
            "gap_pct": 100 * (best.values[0] / optimum - 1), "trials_to_0.1pct": first_within(1e-3),
            "trials_to_0.01pct": first_within(1e-4), "gap_pct_by_trial": curve}


def plot_against(against: list[dict], path: Path, title: str) -> None:
    """Best-so-far gap to the exact optimum against trials, one line per search."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    samplers = list(dict.fromkeys(a["sampler"] for a in against))   # a colour per sampler, a dash per repeat
    seen: dict[str, int] = {}
    for a in against:
        k = seen[a["sampler"]] = seen.get(a["sampler"], -1) + 1
        xs = [i + 1 for i, g in enumerate(a["gap_pct_by_trial"]) if g is not None]
        ys = [max(g, 1e-4) for g in a["gap_pct_by_trial"] if g is not None]
        ax.step(xs, ys, where="post", color=f"C{samplers.index(a['sampler'])}", linestyle=("-", "--", ":", "-.")[k % 4],
                label=f"{Path(a['study']).name} ({a['sampler']})")
    ax.set_yscale("log")
    ax.axhline(0.1, color="0.6", linestyle=":", linewidth=1)
    ax.set_xlabel("trials (rejected and duplicates included)")
    ax.set_ylabel("best so far: % above the exact optimum (floor 1e-4)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _arch(space: SearchSpace, base: int, blocks: int, pools, option: Option):
    width, chain = option
    return space.arch(base, blocks, tuple(pools), tuple(str(r) for r in chain), width)


def _config(space, base, blocks, pools, options, bounds, p) -> MemeConfig:
    experts = tuple(_arch(space, base, blocks, pools, o) for o in options)
    return MemeConfig(name=f"{space.name}-optimum", experts=experts, data=space.data, diffusion=space.diffusion,
                      boundaries=tuple(bounds), expert_probs=(p,) * len(options)).validate()


def _bar(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm import tqdm
    return tqdm(sorted(items), desc=desc, unit="sub-network", file=sys.stdout, disable=None, leave=False)


def parse_args(argv=None):
    p = CommandParser(prog="meme-nas interval-opt", description=__doc__.splitlines()[0])
    p.add_argument("--space", default=None, help="search space YAML or name (default: meme_ffhq256); the one the supernet was trained for")
    p.add_argument("--supernet", required=True, help="trained supernet directory")
    p.add_argument("--budget-gflops", type=float, required=True, help="GFLOPs per denoising step at the target shape")
    p.add_argument("--budget-mode", default="mean", choices=("mean", "max"),
                   help="'mean' (interval-weighted over experts) or 'max' (every expert under the budget)")
    p.add_argument("--max-archs", type=int, default=2000, help="largest number of chains per macro to enumerate")
    p.add_argument("--device", default=None, help="torch device for scoring (default: cuda when available)")
    p.add_argument("--out", type=Path, default=None, help="writes optimum.json and optimum.yaml here")
    p.add_argument("--against", type=Path, action="append", default=[],
                   help="a nas.search study folder scored by the same supernet: how close its best came (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_fast_path_flag(p)
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    space = load_space(args.space)
    scorer = SharedScorer(args.supernet, space.proxy, args.device)
    res = optimise(space, scorer, args.budget_gflops, args.budget_mode, args.max_archs, not args.quiet)
    for r in res["rows"]:
        if "skipped" in r:
            print(f"macro {r['macro']}: skipped ({r['skipped']})")
    if res["best"] is None:
        raise UserError(f"no enumerable candidate of {space.source} fits {args.budget_gflops} GFLOPs")
    print(f"exact optimum over {res['chains_scored']} scored chains in {res['wall_s']:.0f} s: "
          f"loss {res['best']['objective']:.6f} at {res['best']['gflops']:.3f} GFLOPs")
    res["against"] = [against_search(d, res["best"]["objective"], scorer.index.get("digest")) for d in args.against]
    for a in res["against"]:
        print(f"  {a['study']} ({a['sampler']}): best {a['best_objective']:.6f} (trial {a['best_trial']} of "
              f"{a['trials']}, {a['distinct_scored']} distinct scored), {a['gap_pct']:+.3f}% vs the optimum; "
              f"within 0.1% after {a['trials_to_0.1pct']} trials, within 0.01% after {a['trials_to_0.01pct']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(res, args.out / "optimum.json")
        (args.out / "optimum.yaml").write_text(res["best"]["config_yaml"])
        wrote = "optimum.json, optimum.yaml"
        if res["against"]:
            plot_against(res["against"], args.out / "against.png",
                         f"{space.name}, {args.budget_gflops:g} GFLOPs: searches against the exact optimum")
            wrote += ", against.png"
        if space.widths.whole_network:
            space.schedule_of(MemeConfig.from_yaml(res["best"]["config_yaml"]), args.supernet).save(
                args.out / "schedule.yaml")
            wrote += (f", schedule.yaml (sample it: meme-nas sample --supernet {args.supernet} "
                      f"--schedule {args.out / 'schedule.yaml'})")
        print(f"wrote {args.out}/{wrote}")
    else:
        print(json.dumps(res["best"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
