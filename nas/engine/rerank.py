"""Re-rank designs over seeds: ``meme-nas rerank --space S CONFIG... --seeds K``.

A search trains every trial with one seed, so its ranking carries that seed's luck,
and its top trials are the luckiest ones (selected on the very number being compared).
Re-ranking trains each design again on the space's proxy with K *fresh* seeds (seed
changes init, data order, timesteps and noise; the held-out test stays fixed), and
compares each with the first one by Welch's t-test (``nas.engine.stats``). "Better" is
claimed only when p < 0.05; otherwise the designs cannot be told apart.

CONFIG is a YAML path, a reference name (``meme-table4``, ...) or ``reference`` (the
space's own hand design). ``nas.search`` calls :func:`rerank` on its top-K and the
reference at the end of every search.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from meme.common.checkpoint import atomic_write_json
from meme.common.command import CommandParser, add_fast_path_flag, main_guard
from meme.common.errors import UserError
from meme.model.config import MemeConfig
from meme.model.references import resolve
from nas.engine.replicates import Run, default_jobs, run_all
from nas.engine.settings import Deadline
from nas.engine.stats import ALPHA, summarize, welch
from nas.space.budget import cost_of
from nas.space.space import SearchSpace, load_space

TEST = f"Welch t-test (unequal variances), two-sided, alpha {ALPHA}"


def resolve_design(spec: str, space: SearchSpace) -> MemeConfig:
    """A YAML path, a reference name, or 'reference' (the space's hand design)."""
    if spec == "reference":
        if space.reference is None:
            raise UserError(f"space {space.name} has no reference design")
        return space.reference
    return resolve(spec)  # ConfigError: one line naming the known references


def default_seeds(k: int, search_seed: int) -> list[int]:
    """K seeds that avoid the search's own seed (the top trials were selected on it)."""
    return [search_seed + 1 + i for i in range(k)]


def rerank(designs: Sequence[tuple[str, MemeConfig]], space: SearchSpace, seeds: Sequence[int], *,
           objective: str = "loss", budget_mode: str = "mean", jobs: Optional[int] = None,
           device: Optional[str] = None, cache: Optional[Path] = None, progress: bool = True,
           deadline: Optional[Deadline] = None) -> dict[str, Any]:
    """Train every design with every seed; statistics vs the first design, JSON-ready.

    Seed by seed (every design's first seed, then every design's second...), so a
    ``deadline`` that stops new runs leaves each design with as many seeds as it can.
    """
    if len(designs) < 1 or len(seeds) < 1:
        raise UserError("rerank needs at least one design and one seed")
    proxy = space.proxy.from_scratch()  # re-ranking trains: never a shared score
    runs = [Run(name, cfg, proxy, s, objective) for s in seeds for name, cfg in designs]
    recs = run_all(runs, jobs=jobs or default_jobs(device), device=device, cache=cache, progress=progress,
                   deadline=deadline)
    rows = []
    for name, cfg in designs:
        mine = [recs.get(Run(name, cfg, proxy, s, objective).key()) for s in seeds]
        ok = [r for r in mine if r and r.get("objective") is not None]
        c = cost_of(cfg, budget_mode)
        row = {"name": name, "config_hash": cfg.hash(), "num_experts": cfg.num_experts, "gflops": c.gflops,
               "params": c.params, "seeds": [r["seed"] for r in ok], "values": [r["objective"] for r in ok],
               "failed": [{"seed": r["seed"], "reason": r.get("fail_reason")} for r in mine if r and r not in ok],
               "not_run": [s for s, r in zip(seeds, mine) if r is None],
               "train_steps_total": sorted({r["train_steps_total"] for r in ok}),
               "train_gflops_total": [r["train_gflops_total"] for r in ok],
               "wall_s": [r["wall_s"] for r in ok], "config_yaml": cfg.to_yaml()}
        if ok:
            s = summarize(row["values"])
            row.update(mean=s.mean, std=s.std, n=s.n)
        rows.append(row)
    base = rows[0]
    for row in rows[1:]:
        if row.get("n") and base.get("n"):
            row["vs_first"] = welch(row["values"], base["values"]).to_dict()
    return {"space": space.name, "objective": objective, "seeds": list(seeds), "proxy": space.proxy.digest(),
            "baseline": base["name"], "test": TEST, "designs": rows}


def table_lines(result: dict[str, Any]) -> list[str]:
    """The re-rank as a readable table (mean +- std over seeds, vs the first design)."""
    base = result["baseline"]
    lines = [f"re-rank over seeds {result['seeds']} ({result['objective']}; {result['test']}):",
             f"  {'design':<28} {'N':>2} {'GFLOPs':>7} {'mean':>9} {'std':>8} {'n':>2}  vs {base}"]
    for row in result["designs"]:
        if not row.get("n"):
            why = "not run (time budget)" if len(row.get("not_run", [])) == len(result["seeds"]) else "every seed failed"
            lines.append(f"  {row['name']:<28} {row['num_experts']:>2} {row['gflops']:>7.2f}  {why}")
            continue
        cmp = row.get("vs_first")
        vs = "(baseline)" if row["name"] == base else (
            f"{100 * cmp['rel_diff']:+.1f}%  p={cmp['p_value']:.3f}  {cmp['verdict']}" if cmp else "")
        lines.append(f"  {row['name']:<28} {row['num_experts']:>2} {row['gflops']:>7.2f} {row['mean']:>9.5f} "
                     f"{row['std']:>8.5f} {row['n']:>2}  {vs}")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(prog="meme-nas rerank", description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="designs: YAML paths, reference names, or 'reference'; "
                                              "the first is the baseline the others are tested against")
    p.add_argument("--space", default=None, help="search space whose proxy trains them (default meme_ffhq256)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per design (default %(default)s)")
    p.add_argument("--first-seed", type=int, default=1, help="seeds are FIRST..FIRST+K-1 (default %(default)s: "
                                                              "not the search's seed 0)")
    p.add_argument("--objective", default="loss", choices=("loss", "fid"), help="what is compared (default loss)")
    p.add_argument("--jobs", type=int, default=None, help="runs side by side (default: one per CPU core)")
    p.add_argument("--device", default=None, help="torch device to train on: cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--json", type=Path, default=None, help="write the result here (runs cached beside it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_fast_path_flag(p)
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    space = load_space(args.space)
    designs, names = [], set()
    for spec in args.configs:
        cfg = resolve_design(spec, space)
        name = cfg.name if cfg.name not in names else f"{cfg.name}#{len(names)}"
        names.add(name)
        designs.append((name, cfg))
    cache = args.json.with_suffix(".runs.jsonl") if args.json else None
    result = rerank(designs, space, list(range(args.first_seed, args.first_seed + args.seeds)),
                    objective=args.objective, jobs=args.jobs, device=args.device, cache=cache,
                    progress=not args.quiet)
    for line in table_lines(result):
        print(line)
    if args.json:
        atomic_write_json(result, args.json)
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
