"""Does the proxy rank designs the way real training does? ``meme-nas fidelity --space S``.

Picks architectures from the space (its reference among them, spread over N and
GFLOPs), trains each with several seeds on the space's proxy and on a higher fidelity
(wider and longer: ``--high width_mult=1/4,steps=720``), and reports the rank
correlation of the seed-mean objectives (Spearman, Kendall, bootstrap CIs over
architectures), plus each fidelity's own seed-to-seed rank correlation: the ceiling a
proxy can reach against a noisy target.

Shorter proxies come for free: the learning rate is constant after warm-up and the
held-out test uses its own random stream, so the objective a run reports at step k is
exactly what a k-step run would end with (tested). Each proxy run is therefore trained
to ``--proxy-steps-max`` and scored at every report, and the table lists the
correlation and measured cost of every step count. Other settings (resolution, width,
evaluation grid) are compared with ``--variant key=value,...``; every run is cached, so
adding a variant retrains only that variant.

Outputs in ``--out``: fidelity.json, fidelity.md (the table), fidelity.png (scatter),
runs.jsonl (every run; resume by running the same command again).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optuna
import yaml

from meme.common.checkpoint import atomic_write_json
from meme.common.command import CommandParser, add_fast_path_flag, main_guard
from meme.common.errors import UserError
from meme.model.config import MemeConfig
from meme.training.compute import train_gflops_per_step, training_gflops
from nas.engine.replicates import Run, default_jobs, run_all
from nas.engine.stats import rank_correlation, summarize
from nas.space.budget import cost_of
from nas.space.draw import build_config
from nas.space.proxy import ProxySpec, proxy_config
from nas.space.space import SearchSpace, load_space, parse_proxy
from nas.studies import supernet_fidelity as shared_fidelity

TARGET_SPEARMAN = 0.6
SEPARATED_Z = 2.0   # a difference counts as real when it exceeds this many sqrt(sd_a^2 + sd_b^2) over seeds


# ---- which architectures ----------------------------------------------------------------

def draws(space: SearchSpace, *, budget: Optional[float] = None, pool: int = 60,
          seed: int = 0) -> list[tuple[str, MemeConfig, float]]:
    """``pool`` random candidates (uniform over the space's parametrisation), distinct and within ``budget``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out, seen = [], set()
    for i in range(pool):
        cfg = build_config(study.ask(), space, name=f"{space.name}-draw{i}")
        g = cost_of(cfg).gflops
        if (budget is None or g <= budget) and cfg.hash() not in seen:
            seen.add(cfg.hash())
            out.append((f"N{cfg.num_experts}-{g:.3g}G-{cfg.hash()[:6]}", cfg, g))
    return out


def pick_architectures(space: SearchSpace, k: int, *, budget: Optional[float] = None, pool: int = 60,
                       seed: int = 0) -> list[tuple[str, MemeConfig, float]]:
    """The reference plus k-1 random draws spread over N and GFLOPs: (name, config, gflops).

    Keeps the ``draws`` within ``budget``, then takes the N groups in turn and, inside
    a group, GFLOPs at evenly spaced quantiles, so the set covers both axes the search
    trades off.
    """
    by_n: dict[int, list[tuple[str, MemeConfig, float]]] = {}
    for d in draws(space, budget=budget, pool=pool, seed=seed):
        by_n.setdefault(d[1].num_experts, []).append(d)
    out: list[tuple[str, MemeConfig, float]] = []
    if space.reference is not None:
        out.append((space.reference.name, space.reference, cost_of(space.reference).gflops))
    groups = {n: sorted(v, key=lambda x: x[2]) for n, v in sorted(by_n.items())}
    want = {n: 0 for n in groups}
    while len(out) + sum(want.values()) < k and any(want[n] < len(groups[n]) for n in groups):
        for n in groups:  # round-robin over N
            if want[n] < len(groups[n]) and len(out) + sum(want.values()) < k:
                want[n] += 1
    for n, group in groups.items():
        m = want[n]
        idx = sorted({round(j * (len(group) - 1) / max(m - 1, 1)) for j in range(m)}) if m else []
        out += [group[j] for j in idx]
    if len(out) < k:
        raise UserError(f"only {len(out)} distinct architectures within budget among {pool} draws; "
                        f"raise --pool or the budget")
    return out


def kept_architectures(path: Path) -> list[tuple[str, MemeConfig, float]]:
    """The architectures of an earlier fidelity.json, as they were (their YAML is stored).

    The random draws of ``pick_architectures`` follow the space's parametrisation, which
    changes when the space gains a dimension, so a committed study cannot always be
    re-drawn; its designs can always be read back.
    """
    try:
        arch = json.loads(Path(path).read_text())["architectures"]
        return [(a["name"], MemeConfig.from_yaml(a["config_yaml"]), float(a["gflops"])) for a in arch]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--keep {path}: not a nas.studies.fidelity output ({e})") from e


def top_up(kept: list[tuple[str, MemeConfig, float]], pool: list[tuple[str, MemeConfig, float]],
           k: int) -> list[tuple[str, MemeConfig, float]]:
    """``kept`` plus designs from ``pool`` until there are ``k``, each filling the widest gap.

    Greedy: the next design is the one farthest in GFLOPs from every kept design of its
    N (an N not yet kept is infinitely far), ties broken by pool order, so the set
    keeps covering both axes the search trades off.
    """
    out = list(kept)
    seen = {c.hash() for _, c, _ in out}
    rest = [a for a in pool if a[1].hash() not in seen]
    while len(out) < k and rest:
        def gap(a: tuple[str, MemeConfig, float]) -> float:
            same = [g for _, c, g in out if c.num_experts == a[1].num_experts]
            return min((abs(a[2] - g) for g in same), default=float("inf"))
        best = max(rest, key=gap)
        out.append(best)
        rest.remove(best)
    if len(out) < k:
        raise UserError(f"only {len(out)} distinct architectures; raise --pool or the budget")
    return out


# ---- fidelities -------------------------------------------------------------------------

def with_overrides(proxy: ProxySpec, text: str, where: str) -> ProxySpec:
    """``width_mult=1/4,steps=720`` applied to a proxy (values parsed as YAML scalars)."""
    d = {**proxy.digest()}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"{where}: expected key=value, got {item!r}")
        d[key.strip()] = yaml.safe_load(value)
    return parse_proxy(d, where)


def at_step(rec: dict[str, Any], step: int) -> Optional[tuple[float, float]]:
    """(objective, wall seconds) a run had reached at budget step ``step``."""
    for (s, v), t in zip(rec.get("history") or [], rec.get("elapsed") or []):
        if s == step:
            return v, t
    return None


# ---- the study --------------------------------------------------------------------------

def correlate(names: list[str], seeds: list[int], low: dict[tuple[str, int], float],
              high: dict[tuple[str, int], float]) -> dict[str, Any]:
    """Rank agreement of seed means, and each side's seed-to-seed agreement (noise ceiling)."""
    lo = [summarize([low[(n, s)] for s in seeds]).mean for n in names]
    hi = [summarize([high[(n, s)] for s in seeds]).mean for n in names]
    out: dict[str, Any] = {k: dataclasses.asdict(v) for k, v in rank_correlation(lo, hi).items()}
    if len(seeds) >= 2:
        a, b = seeds[0], seeds[1]
        out["seed_to_seed_spearman"] = {
            "proxy": rank_correlation([low[(n, a)] for n in names], [low[(n, b)] for n in names])["spearman"].value,
            "high": rank_correlation([high[(n, a)] for n in names], [high[(n, b)] for n in names])["spearman"].value}
    return out


def within_n_pairs(archs: list[tuple[str, MemeConfig, float]], seeds: list[int], low: dict, high: dict) -> dict:
    """Pairs of the same N that the high fidelity separates beyond seed noise, and whether
    the proxy orders each the same way, also beyond its own noise.

    Across N the ranking is easy (at equal training steps fewer experts win at both
    fidelities), so a high Spearman over all architectures can hide a proxy that cannot
    rank the designs within one N -- which is most of what the search compares.
    """
    def z(values: dict, a: str, b: str) -> float:
        """Difference of seed means over sqrt(sd_a^2 + sd_b^2): per-seed spreads, not standard
        errors of the means (those shrink with more seeds; this does not), so it is stricter."""
        sa, sb = summarize([values[(a, s)] for s in seeds]), summarize([values[(b, s)] for s in seeds])
        se = (sa.std ** 2 + sb.std ** 2) ** 0.5
        return (sa.mean - sb.mean) / se if se > 0 else float(np.sign(sa.mean - sb.mean)) * np.inf

    pairs = []
    for i, (a, ca, _) in enumerate(archs):
        for b, cb, _ in archs[i + 1:]:
            if ca.num_experts == cb.num_experts:
                zh, zl = z(high, a, b), z(low, a, b)
                pairs.append({"a": a, "b": b, "z_high": float(zh), "z_proxy": float(zl),
                              "separated": bool(abs(zh) > SEPARATED_Z),
                              "right": bool(abs(zh) > SEPARATED_Z and np.sign(zh) == np.sign(zl)
                                            and abs(zl) > SEPARATED_Z)})
    sep = [p for p in pairs if p["separated"]]
    return {"pairs": pairs, "separated": len(sep), "right": sum(p["right"] for p in sep)}


def run_study(space: SearchSpace, archs: list[tuple[str, MemeConfig, float]], seeds: list[int], high: ProxySpec,
              proxy_max: ProxySpec, variants: dict[str, ProxySpec], *, jobs: int, device: Optional[str],
              out: Path, progress: bool = True) -> dict[str, Any]:
    fidelities = {"high": high, "proxy": proxy_max, **variants}
    runs = [Run(name, cfg, p, s) for p in fidelities.values() for name, cfg, _ in archs for s in seeds]
    recs = run_all(runs, jobs=jobs, device=device, cache=out / "runs.jsonl", progress=progress)

    def get(p: ProxySpec, name: str, cfg: MemeConfig, s: int) -> dict[str, Any]:
        rec = recs.get(Run(name, cfg, p, s).key())
        if not rec or rec.get("objective") is None:
            raise UserError(f"run {name} seed {s} failed: {rec.get('fail_reason') if rec else 'missing'}")
        return rec

    names = [a[0] for a in archs]
    high_val = {(n, s): get(high, n, c, s)["objective"] for n, c, _ in archs for s in seeds}
    high_gflops = np.mean([get(high, n, c, s)["train_gflops_total"] for n, c, _ in archs for s in seeds])
    high_wall = np.mean([get(high, n, c, s)["wall_s"] for n, c, _ in archs for s in seeds])

    rows = []

    def add_row(label: str, p: ProxySpec, steps: int, values: dict, walls: list[float]) -> None:
        gfl = np.mean([training_gflops(train_gflops_per_step(proxy_config(c, p), p.batch_size),
                                       steps * p.steps_per_budget_step(c.num_experts)) for _, c, _ in archs])
        corr = correlate(names, seeds, values, high_val)
        corr["within_n"] = within_n_pairs(archs, seeds, values, high_val)
        rows.append({"proxy": label, "steps": steps, "resolution": p.resolution, "width_mult": str(p.width_mult),
                     "wall_s_per_run": float(np.mean(walls)), "train_gflops_per_run": float(gfl),
                     "cost_vs_high": float(gfl / high_gflops), **corr,
                     "means": {n: summarize([values[(n, s)] for s in seeds]).mean for n in names},
                     "stds": {n: summarize([values[(n, s)] for s in seeds]).std for n in names}})

    for label, p in [("proxy", proxy_max), *variants.items()]:
        steps_seen = sorted({st for n, c, _ in archs for s in seeds for st, _ in get(p, n, c, s)["history"]})
        for st in steps_seen:
            if st < p.warmup or st < p.eval_every:
                continue
            vals, walls = {}, []
            for n, c, _ in archs:
                for s in seeds:
                    got = at_step(get(p, n, c, s), st)
                    if got is None:
                        break
                    vals[(n, s)], _ = got
                    walls.append(got[1])
            if len(vals) == len(names) * len(seeds):
                add_row(label if label != "proxy" else "space proxy", p, st, vals, walls)

    meeting = [r for r in rows if r["spearman"]["value"] >= TARGET_SPEARMAN
               and r["within_n"]["right"] == r["within_n"]["separated"]]
    cheapest = min(meeting, key=lambda r: r["train_gflops_per_run"]) if meeting else None
    return {
        "space": space.name, "seeds": seeds, "target_spearman": TARGET_SPEARMAN, "separated_z": SEPARATED_Z,
        "high": {**high.digest(), "train_gflops_per_run": float(high_gflops), "wall_s_per_run": float(high_wall)},
        "proxy": proxy_max.digest(), "variants": {k: v.digest() for k, v in variants.items()},
        "architectures": [{"name": n, "num_experts": c.num_experts, "gflops": g, "config_yaml": c.to_yaml(),
                           "high_mean": summarize([high_val[(n, s)] for s in seeds]).mean,
                           "high_std": summarize([high_val[(n, s)] for s in seeds]).std} for n, c, g in archs],
        "rows": rows,
        "cheapest_meeting_target": None if cheapest is None else {k: cheapest[k] for k in ("proxy", "steps",
                                                                                          "train_gflops_per_run")},
    }


# ---- outputs ----------------------------------------------------------------------------

def table(result: dict[str, Any]) -> str:
    hi = result["high"]
    lines = [f"High fidelity: width x{hi['width_mult']}, {hi['resolution']}x{hi['resolution']}, {hi['steps']} steps, "
             f"{hi['train_gflops_per_run']:.0f} training GFLOPs and {hi['wall_s_per_run']:.0f} s per run; "
             f"{len(result['architectures'])} architectures x seeds {result['seeds']}.",
             "",
             "| proxy | steps | res | width | train GFLOPs/run | vs high | wall s/run | Spearman [95% CI] "
             "| Kendall [95% CI] | proxy seed-to-seed | high seed-to-seed | same-N pairs right |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        sp, kd = r["spearman"], r["kendall"]
        s2s = r.get("seed_to_seed_spearman", {})
        lines.append(f"| {r['proxy']} | {r['steps']} | {r['resolution']} | {r['width_mult']} | "
                     f"{r['train_gflops_per_run']:.0f} | {r['cost_vs_high']:.3f} | {r['wall_s_per_run']:.1f} | "
                     f"{sp['value']:+.2f} [{sp['ci_low']:+.2f}, {sp['ci_high']:+.2f}] | "
                     f"{kd['value']:+.2f} [{kd['ci_low']:+.2f}, {kd['ci_high']:+.2f}] | "
                     f"{s2s.get('proxy', float('nan')):+.2f} | {s2s.get('high', float('nan')):+.2f} | "
                     f"{r['within_n']['right']}/{r['within_n']['separated']} |")
    c = result["cheapest_meeting_target"]
    lines += ["", f"Same-N pairs right: of the pairs of equal N that the high fidelity separates (difference of "
              f"seed means > {result['separated_z']:g} x sqrt(sd_a^2 + sd_b^2), the per-seed spreads), how many the "
              f"proxy orders the same way, also beyond {result['separated_z']:g} x its own spreads.",
              "", f"Cheapest proxy with Spearman >= {result['target_spearman']} and every separated same-N pair right: "
              + (f"{c['proxy']} at {c['steps']} steps ({c['train_gflops_per_run']:.0f} training GFLOPs per run)."
                 if c else "none of those measured.")]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path, steps: Optional[int] = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["proxy"] == "space proxy"]
    row = next((r for r in rows if r["steps"] == steps), rows[-1] if rows else None)
    if row is None:
        return
    archs = result["architectures"]
    fig, ax = plt.subplots(figsize=(6, 5))
    for a in archs:
        x, xe = row["means"][a["name"]], row["stds"][a["name"]]
        y, ye = a["high_mean"], a["high_std"]
        ref = a["name"] == archs[0]["name"]
        ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="*" if ref else "o", ms=12 if ref else 6, capsize=2,
                    color=f"C{a['num_experts'] % 10}")
        ax.annotate(f"N={a['num_experts']} {a['gflops']:.0f}G" + (" (ref)" if ref else ""), (x, y), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    sp, kd = row["spearman"], row["kendall"]
    ax.set_xlabel(f"proxy objective ({row['steps']} steps, width x{row['width_mult']}, {row['resolution']}px)")
    hi = result["high"]
    ax.set_ylabel(f"high-fidelity objective ({hi['steps']} steps, width x{hi['width_mult']})")
    ax.set_title(f"Spearman {sp['value']:+.2f} [{sp['ci_low']:+.2f},{sp['ci_high']:+.2f}], "
                 f"Kendall {kd['value']:+.2f}  (mean +- std, seeds {result['seeds']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(prog="meme-nas fidelity", description=__doc__.splitlines()[0])
    p.add_argument("--space", default=None, help="search space (default meme_ffhq256)")
    p.add_argument("--archs", type=int, default=9, help="architectures, the reference included (>= 8 for a "
                                                        "meaningful correlation; default %(default)s)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per architecture and fidelity (default %(default)s)")
    p.add_argument("--budget-gflops", type=float, default=None, help="only architectures within this budget")
    p.add_argument("--pool", type=int, default=60, help="random draws the architectures are picked from")
    p.add_argument("--keep", type=Path, default=None,
                   help="start from the architectures of this earlier fidelity.json and add picks up to --archs "
                        "(their cached runs are reused)")
    p.add_argument("--high", default="width_mult=1/4,steps=720",
                   help="high fidelity as overrides of the space's proxy (default %(default)s)")
    p.add_argument("--proxy-steps-max", type=int, default=None,
                   help="train proxy runs this long and score every report (default: 2x the space's steps)")
    p.add_argument("--variant", action="append", default=[],
                   help="another proxy, NAME:key=value,... over the --proxy-steps-max proxy "
                        "(e.g. res32:resolution=32); repeatable")
    p.add_argument("--jobs", type=int, default=None, help="runs side by side (default: one per CPU core)")
    p.add_argument("--device", default=None, help="torch device to train on: cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--out", type=Path, default=None, help="output folder for rows, report and plots (default: results/fidelity-<space>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--evaluator", default="scratch", choices=("scratch", "supernet"),
                   help="'supernet': rank by a trained supernet against stand-alone training (nas.studies.supernet_fidelity)")
    p.add_argument("--supernet", default=None, help="--evaluator supernet: the trained supernet directory")
    p.add_argument("--reuse", type=Path, default=None,
                   help="--evaluator supernet: an earlier nas.studies.fidelity output whose high-fidelity runs rank (a)")
    p.add_argument("--high-steps", type=int, default=240,
                   help="--evaluator supernet: stand-alone steps of the ratio-only designs (default %(default)s)")
    add_fast_path_flag(p)
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.evaluator == "supernet":
        return _shared(args, argv)
    if args.archs < 3 or args.seeds < 1:
        raise UserError("--archs must be >= 3 and --seeds >= 1")
    space = load_space(args.space)
    out = args.out or Path("results") / f"fidelity-{space.name}"
    out.mkdir(parents=True, exist_ok=True)
    base = space.proxy
    high = with_overrides(base, args.high, "--high")
    high = dataclasses.replace(high, eval_every=high.steps)
    steps_max = args.proxy_steps_max or 2 * base.steps
    proxy_max = dataclasses.replace(base, steps=steps_max)
    ratio = high.steps * float(high.width_mult) ** 2 / (base.steps * float(base.width_mult) ** 2)
    if high.steps < base.steps or (high.width_mult <= base.width_mult and high.resolution <= base.resolution):
        raise UserError("--high must train longer and at a larger width or resolution than the proxy")
    variants = {}
    for v in args.variant:
        name, colon, rest = v.partition(":")
        if not colon:
            raise UserError(f"--variant must be NAME:key=value,..., got {v!r}")
        variants[name] = with_overrides(proxy_max, rest, f"--variant {name}")
    if args.keep is not None:
        archs = top_up(kept_architectures(args.keep), draws(space, budget=args.budget_gflops, pool=args.pool),
                       args.archs)
    else:
        archs = pick_architectures(space, args.archs, budget=args.budget_gflops, pool=args.pool)
    seeds = list(range(args.seeds))
    print(f"{len(archs)} architectures x {len(seeds)} seeds; proxy {steps_max} steps (scored every "
          f"{base.eval_every}), high fidelity {high.steps} steps at width x{high.width_mult} "
          f"(~{ratio:.0f}x the proxy's compute by width^2 x steps; measured below)")
    for name, cfg, g in archs:
        print(f"  {name:<24} N={cfg.num_experts}  {g:7.2f} GFLOPs")
    result = run_study(space, archs, seeds, high, proxy_max, variants, jobs=args.jobs or default_jobs(args.device),
                       device=args.device, out=out, progress=not args.quiet)
    result["command"] = "meme-nas fidelity " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write_json(result, out / "fidelity.json")
    (out / "fidelity.md").write_text(table(result))
    plot(result, out / "fidelity.png", steps=base.steps)
    print(table(result))
    print(f"outputs in {out}/: fidelity.json, fidelity.md, fidelity.png, runs.jsonl")
    return 0


def _shared(args, argv) -> int:
    if not args.supernet:
        raise UserError("--evaluator supernet needs --supernet DIR")
    space = load_space(args.space)
    out = args.out or Path("results") / f"fidelity-supernet-{space.name}"
    out.mkdir(parents=True, exist_ok=True)
    command = "meme-nas fidelity " + " ".join(sys.argv[1:] if argv is None else argv)
    result = shared_fidelity.run(space, args.supernet, out, reuse=args.reuse, seeds=args.seeds,
                                 high_steps=args.high_steps, jobs=args.jobs or default_jobs(args.device),
                                 command=command)
    print(shared_fidelity.table(result))
    print(f"outputs in {out}/: shared_fidelity.json, shared_fidelity.md, shared_runs.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
