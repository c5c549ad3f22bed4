"""A search space's latency table, and how well it and MACs predict measured time.

``meme-nas latency-table table --space S`` measures every distinct iFormer block the space
can build and one calibration network per macro shape (``meme.speed.latency_model``), and
saves the table where ``nas.search --budget-ms`` finds it.

``meme-nas latency-table report --space S --n 30`` draws random candidates, times each
one's experts whole (``meme.speed.latency``), prices them from the table, and writes to
``--out``: ``candidates.csv``, ``scatter.png`` (GFLOPs against measured ms, and the
model against measured ms) and ``report.md`` with the model's MAPE and Spearman rank
correlation, the rank correlation of GFLOPs with time, and the worst inversions: pairs
that MACs order one way and time the other, with what their slower members share.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import optuna
import torch
from scipy.stats import spearmanr

from meme.common.command import CommandParser, add_fast_path_flag, main_guard
from meme.common.device import pick_device
from meme.common.errors import UserError
from meme.common.fastpath import PRECISIONS
from meme.model.config import MemeConfig
from meme.model.iunet import macro_key
from meme.model.macs import cost_of_meme
from meme.speed.latency import CLOCKS, Setting, build_timed, precision_of, time_network
from meme.speed.latency_model import LatencyTable, default_table_path, load_or_new
from meme.speed.timing import warm_clocks
from nas.space.draw import build_config
from nas.space.space import SearchSpace, load_space


def calibration_archs(space: SearchSpace, base: int, blocks: int, pools: tuple[int, ...], k: int = 3,
                      width: str = "1") -> list:
    """Up to three networks of one macro (and decoder width): every stage at the top of its grid,
    at the bottom, between."""
    grids = [space.stage_grid(space.expert_base(base, width), s) for s in range(space.num_stages)]
    chains = [[g[-1] for g in grids], [g[0] for g in grids], [g[len(g) // 2] for g in grids]][:k]
    return [space.arch(base, blocks, pools, tuple(str(r) for r in c), width) for c in chains]


def probe_archs(space: SearchSpace):
    """Experts that together hold every distinct iFormer block of the space: one per
    (base, pools, stage, ratio), that stage at the ratio and the others at the top."""
    widths = space.widths.choices if space.widths.whole_network else ("1",)   # a network width: blocks of its own
    for base, width in itertools.product(space.macro.base_channels, widths):
        own = space.expert_base(base, width)
        top = [space.stage_grid(own, s)[-1] for s in range(space.num_stages)]
        for pools in space.macro.pool_strides:
            for s in range(space.num_stages):
                for r in space.stage_grid(own, s):
                    ratios = list(top)
                    ratios[s] = r
                    yield space.arch(base, min(space.macro.num_res_blocks), tuple(pools),
                                     tuple(str(x) for x in ratios), width)


def build_space_table(space: SearchSpace, table: LatencyTable, log: Callable[[str], None] = print,
                      calibrations: int = 3) -> LatencyTable:
    """Fill ``table`` with everything ``space`` can need (entries it has are kept);
    ``calibrations`` networks per macro give its rest and overhead."""
    t0 = time.perf_counter()
    n0 = len(table.blocks)
    for base, blocks, width in itertools.product(space.macro.base_channels, space.macro.num_res_blocks,
                                                 space.widths.choices):   # a width is a macro of its own
        archs = calibration_archs(space, base, blocks, tuple(space.macro.pool_strides[0]), calibrations, width)
        if macro_key(archs[0], space.data) not in table.macros:
            t1 = time.perf_counter()
            table.calibrate(archs, space.data)
            table.build_s += time.perf_counter() - t1
            decoder = "" if width == "1" else f", {'width' if space.widths.whole_network else 'decoder'} x{width}"
            log(f"  calibrated base {base}, {blocks} block(s){decoder}: {time.perf_counter() - t1:.0f} s")
    for arch in probe_archs(space):
        table.ensure(arch, space.data)
    log(f"latency table for {space.name}: {len(table.blocks)} blocks ({len(table.blocks) - n0} new), "
        f"{len(table.macros)} macros, {time.perf_counter() - t0:.0f} s this run, "
        f"{table.build_s:.0f} s of measuring in all")
    return table


def space_table(space: SearchSpace, setting: Setting, path: Optional[Path] = None,
                log: Callable[[str], None] = print) -> tuple[LatencyTable, Optional[Path]]:
    """The space's table for ``setting``: loaded from ``path`` (default: the cache's), completed, saved.

    An explicit ``path`` measured under another setting is refused (UserError).
    """
    if path is not None and Path(path).is_file():
        try:
            table = LatencyTable.load(path, setting)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    else:
        table = load_or_new(path, setting)
    build_space_table(space, table, log)
    out = path or default_table_path(setting)
    if out is not None:
        table.save(out)
    return table, out


def random_candidates(space: SearchSpace, n: int, seed: int = 0) -> list[MemeConfig]:
    """``n`` candidates drawn uniformly by the space's own define-by-run sampler."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [build_config(study.ask(), space, name=f"{space.name}-r{i}") for i in range(n)]


# ---- the report -----------------------------------------------------------------------

@dataclass
class Point:
    name: str
    gflops: float              # interval-weighted, as the budget
    measured_ms: float         # interval-weighted median of whole-network timings
    spread_ms: float           # interval-weighted IQR of them
    model_ms: float            # from the table
    price_ms: float            # wall time of pricing it from the table
    config: MemeConfig

    def features(self) -> dict[str, str]:
        a = self.config.experts
        return {"N": str(len(a)), "base": str(a[0].base_channels), "blocks": str(a[0].num_res_blocks),
                "pools": ",".join(map(str, a[0].pool_strides)),
                "stage1_dh": " ".join(e.high_ratios[0] for e in a),
                "stage2_dh": " ".join(e.high_ratios[1] for e in a)}


def time_experts(cands: list[MemeConfig], setting: Setting, label: str,
                 log: Callable[[str], None] = print) -> dict:
    """Every distinct expert of ``cands`` timed whole, fresh (no cache): arch -> Timing."""
    archs = list(dict.fromkeys(a for c in cands for a in c.experts))
    out = {}
    t0 = time.perf_counter()
    for i, arch in enumerate(archs):
        out[arch] = time_network(build_timed(arch, cands[0].data), arch, cands[0].data, setting)
        if (i + 1) % 10 == 0 or i + 1 == len(archs):
            log(f"  {label}: {i + 1}/{len(archs)} experts timed ({time.perf_counter() - t0:.0f} s)")
    return out


def measure_points(cands: list[MemeConfig], table: LatencyTable, before: dict, after: dict) -> list[Point]:
    """Each candidate's measured per-step ms (the mean of the passes before and after the
    table was built, so a steady drift in the machine's load cancels) and its model price."""
    pts = []
    for cfg in cands:
        t0 = time.perf_counter()
        priced = table.price_meme(cfg)
        price_s = time.perf_counter() - t0
        w = cfg.interval_weights()
        ms = sum(wi * (before[a].median_ms + after[a].median_ms) / 2 for wi, a in zip(w, cfg.experts))
        spread = sum(wi * (before[a].spread_ms + after[a].spread_ms) / 2 for wi, a in zip(w, cfg.experts))
        pts.append(Point(cfg.name, cost_of_meme(cfg).gflops_mean, ms, spread, priced.ms_mean, 1e3 * price_s, cfg))
    return pts


def mape(pts: list[Point]) -> float:
    return 100 * sum(abs(p.model_ms - p.measured_ms) / p.measured_ms for p in pts) / len(pts)


def inversions(pts: list[Point], k: int = 8) -> list[tuple[Point, Point, float]]:
    """Pairs (cheap, dear) in GFLOPs where the cheap one is slower, worst first.

    Severity: the smaller of the two log-ratios (GFLOPs apart and time apart the other
    way), so a pair counts only when both orders are clear, not noise.
    """
    import math

    out = []
    for a, b in itertools.combinations(pts, 2):
        cheap, dear = (a, b) if a.gflops < b.gflops else (b, a)
        if cheap.measured_ms > dear.measured_ms:
            sev = min(math.log(dear.gflops / cheap.gflops), math.log(cheap.measured_ms / dear.measured_ms))
            out.append((cheap, dear, sev))
    return sorted(out, key=lambda x: -x[2])[:k]


def common_traits(pairs: list[tuple[Point, Point, float]]) -> list[str]:
    """What the slower-but-cheaper members of the pairs have that their partners lack."""
    lines = []
    for key in ("N", "base", "blocks", "pools", "stage1_dh", "stage2_dh"):
        differ = [(c.features()[key], d.features()[key]) for c, d, _ in pairs if c.features()[key] != d.features()[key]]
        if not differ:
            continue
        if key in ("N", "base", "blocks"):
            more = sum(float(x) > float(y) for x, y in differ)
            lines.append(f"{key}: differs in {len(differ)}/{len(pairs)} pairs; the slower-but-cheaper one has the "
                         f"larger {key} in {more} of them")
        elif key == "pools":
            less = sum(sum(map(int, x.split(","))) < sum(map(int, y.split(","))) for x, y in differ)
            lines.append(f"pool strides: differ in {len(differ)}/{len(pairs)} pairs; the slower-but-cheaper one pools "
                         f"less (attention over more tokens) in {less} of them")
        else:
            def mean_dh(s: str) -> float:
                from fractions import Fraction
                return float(sum(Fraction(x) for x in s.split())) / len(s.split())
            more = sum(mean_dh(x) > mean_dh(y) for x, y in differ)
            lines.append(f"{key} (mean d_h/d over experts): differs in {len(differ)}/{len(pairs)} pairs; the "
                         f"slower-but-cheaper one has more conv (high-frequency) channels in {more} of them")
    return lines


def write_report(space: SearchSpace, pts: list[Point], table: LatencyTable, table_path: Optional[Path],
                 out: Path, command: str, wall_s: float, seed: int = 0,
                 drift: float = 1.0, passes: int = 2) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with (out / "candidates.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "gflops", "measured_ms", "measured_iqr_ms", "model_ms", "price_ms", "N", "base",
                    "blocks", "pools", "stage1_dh", "stage2_dh", "experts_high_ratios"])
        for p in pts:
            ft = p.features()
            w.writerow([p.name, f"{p.gflops:.4f}", f"{p.measured_ms:.3f}", f"{p.spread_ms:.3f}", f"{p.model_ms:.3f}",
                        f"{p.price_ms:.3f}", ft["N"], ft["base"], ft["blocks"], ft["pools"], ft["stage1_dh"],
                        ft["stage2_dh"], " | ".join(" ".join(e.high_ratios) for e in p.config.experts)])
    g = [p.gflops for p in pts]
    m = [p.measured_ms for p in pts]
    mod = [p.model_ms for p in pts]
    rho_model = float(spearmanr(mod, m).statistic)
    rho_gflops = float(spearmanr(g, m).statistic)
    err = mape(pts)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    axes[0].scatter(g, m, s=18)
    axes[0].set_xlabel("GFLOPs per step (interval-weighted)")
    axes[0].set_ylabel("measured ms per step")
    axes[0].set_title(f"{space.name}: MACs vs time (Spearman {rho_gflops:.2f})")
    axes[1].scatter(mod, m, s=18)
    lo, hi = min(mod + m), max(mod + m)
    axes[1].plot([lo, hi], [lo, hi], "k--", lw=0.8)
    axes[1].set_xlabel("latency model ms per step")
    axes[1].set_ylabel("measured ms per step")
    axes[1].set_title(f"model vs measured (MAPE {err:.1f}%, Spearman {rho_model:.2f})")
    fig.tight_layout()
    fig.savefig(out / "scatter.png", dpi=110)
    plt.close(fig)
    inv = inversions(pts)
    s = table.setting
    lines = [
        f"# Latency: {space.name} ({space.source})", "",
        f"Command: `{command}`", "",
        f"- device: {table.meta['device']}; torch {table.meta['torch']}; batch {s.batch}; precision {s.precision} "
        f"(fast path: {', '.join(sorted({precision_of(a, s) for p in pts for a in p.config.experts}))}) + channels_last"
        f"{' + compile' if s.compile else ''}; clock: {s.resolved_clock()} (thread CPU time on a CPU with one thread: "
        "the time the scheduler kept a step waiting is left out)",
        f"- load average at the end (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())} -- a shared "
        "machine: timings are noisy; every figure is a median of repeats, the table and the candidates were "
        "measured in this one run",
        f"- {len(pts)} random candidates (optuna RandomSampler, seed {seed}) of the space; each expert "
        f"timed whole: median of {s.repeats} forwards after {s.warmup} warm-up, "
        + (f"once before and once after the table was built (measured = the mean of the two; median after/before "
           f"ratio {drift:.3f}: how far the machine's load moved meanwhile)" if passes == 2 else
           "once, before the table was built (--passes 1)")
        + "; per-step figure = interval-weighted mean over experts, as the GFLOPs budget",
        f"- table: {len(table.blocks)} iFormer blocks + {len(table.macros)} macro calibrations, "
        f"{table.build_s:.0f} s of measuring (file: `{table_path}`)",
        f"- pricing one candidate from the table: median {sorted(p.price_ms for p in pts)[len(pts) // 2]:.3f} ms, "
        f"max {max(p.price_ms for p in pts):.3f} ms (target <= 50 ms)",
        f"- whole report run: {wall_s:.0f} s", "",
        "## Latency model against measurement", "",
        "| metric | value | target |", "|---|---|---|",
        f"| MAPE | {err:.1f}% | <= 10% |",
        f"| Spearman (model, measured) | {rho_model:.3f} | >= 0.9 |",
        f"| Spearman (GFLOPs, measured) | {rho_gflops:.3f} | (what MACs alone give) |",
        f"| median IQR / median of the measurements | "
        f"{100 * sorted(p.spread_ms / p.measured_ms for p in pts)[len(pts) // 2]:.1f}% | (noise floor) |", "",
        "![scatter](scatter.png)", "",
        "## Where MACs mislead: the worst inversions", "",
        "Pairs that GFLOPs order one way and measured time the other, worst first (severity = the smaller of "
        "the two log-ratios).", "",
        "| cheaper in GFLOPs (slower) | GFLOPs | ms | dearer in GFLOPs (faster) | GFLOPs | ms | features (slower / faster) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, d, _ in inv:
        fc, fd = c.features(), d.features()
        feats = "; ".join(f"{k} {fc[k]} / {fd[k]}" for k in fc if fc[k] != fd[k])
        lines.append(f"| {c.name} | {c.gflops:.3f} | {c.measured_ms:.2f} | {d.name} | {d.gflops:.3f} | "
                     f"{d.measured_ms:.2f} | {feats} |")
    n_inv = sum(1 for a, b in itertools.combinations(pts, 2)
                if (a.gflops - b.gflops) * (a.measured_ms - b.measured_ms) < 0)
    lines += ["", f"{n_inv} of {len(pts) * (len(pts) - 1) // 2} pairs are inverted in all.", "",
              "What the slower-but-cheaper members of the listed pairs have in common:", ""]
    lines += [f"- {x}" for x in common_traits(inv)] or ["- (no inversions)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


# ---- CLI -------------------------------------------------------------------------------

def setting_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True, help="search space YAML or name in search_spaces/")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch", type=int, default=1, help="batch the table is measured at (default 1, as GFLOPs)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="fast path precision (default auto)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per figure (median; default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards first (default 2)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads torch uses (default 1)")
    p.add_argument("--clock", default="auto", choices=CLOCKS, help="'wall', 'cpu' or 'auto' (meme.speed.latency; default)")
    p.add_argument("--table", type=Path, default=None, help="latency table JSON file (default: this device's, in the latency cache)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA: time eager forwards instead of CUDA-graph replays (the sampler's default path)")
    add_fast_path_flag(p)


def setting_from(args) -> Setting:
    try:
        return Setting(str(pick_device(args.device)), args.batch, args.precision, False, args.repeats, args.warmup,
                       args.clock, args.threads, graphs=False if getattr(args, "no_cuda_graphs", False) else None)
    except ValueError as exc:
        raise UserError(str(exc)) from None


@main_guard
def main(argv: Optional[list[str]] = None) -> int:
    p = CommandParser(prog="meme-nas latency-table", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    setting_args(sub.add_parser("table", help="measure the space's latency table"))
    r = sub.add_parser("report", help="model and GFLOPs against measured time on random candidates")
    setting_args(r)
    r.add_argument("--n", type=int, default=30, help="random candidates (default 30)")
    r.add_argument("--calibrations", type=int, default=3, choices=(1, 2, 3),
                   help="calibration networks per macro shape (default 3)")
    r.add_argument("--passes", type=int, default=2, choices=(1, 2),
                   help="time the candidates before and after building the table (2, default: a steady drift in "
                        "the machine's load cancels) or only before (1)")
    r.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    r.add_argument("--out", type=Path, default=None, help="folder (default results/latency-<space>)")
    args = p.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    setting = setting_from(args)
    space = load_space(args.space)
    if args.cmd == "table":
        warm_clocks(torch.device(setting.device))
        table, path = space_table(space, setting, args.table, log)
        print(f"{path}: {len(table.blocks)} blocks, {len(table.macros)} macros, {table.build_s:.0f} s of measuring")
        return 0
    if args.n < 3:
        raise UserError("--n must be >= 3")
    cands = random_candidates(space, args.n, args.seed)
    warm_clocks(torch.device(setting.device))   # a GPU at its working clock before the first pass
    before = time_experts(cands, setting, "whole networks, pass 1", log)
    table = build_space_table(space, LatencyTable.empty(setting), log, args.calibrations)  # fresh: this run
    path = table.save(args.table or default_table_path(setting) or Path(args.out or ".") / "table.json")
    after = time_experts(cands, setting, "whole networks, pass 2", log) if args.passes == 2 else before
    pts = measure_points(cands, table, before, after)
    drift = statistics.median(after[a].median_ms / before[a].median_ms for a in before)
    command = "meme-nas latency-table " + " ".join(argv if argv is not None else sys.argv[1:])
    out = write_report(space, pts, table, path, args.out or Path("results") / f"latency-{space.name}",
                       command.strip(), time.perf_counter() - t0, args.seed, drift, args.passes)
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
