"""The paper's Table 1 at our scale: ``meme-nas compare --study DIR --seeds 2``.

Four kinds of denoiser, trained and scored by one recipe (``nas.promote.promote``'s):

* ``single``: one iU-Net for every t (the hand design's middle expert, alone);
* ``multi-expert``: N copies of that same architecture, one per interval, with the
  hand design's p_n and boundaries (the paper's "Multi-Expert");
* ``hand``: the space's hand design (MEME-style ratios falling with t);
* ``search``: the study's winner (best re-ranked mean if ``rerank.json`` exists, else
  the best trial), plus ``--top K`` more;
* ``--add-design TAG=CONFIG`` (repeatable): any other config, a reference name or a YAML
  file (a Multistage design, another study's winner). One whose experts differ in per-step
  cost trains with ``--schedule weighted`` (each expert its interval's share of the
  steps), so that its training compute is the steps x its interval-weighted per-step cost,
  as for every other row.

Equal cost is checked, not assumed: every design's per-step GFLOPs must lie within
``--tolerance`` (5%) of the hand design's, or the command refuses; every design trains
the same total steps x batch. Each design is trained on ``--seeds`` seeds and scored by
FID (clean-fid protocol, our Inception weights) on the same number of samples; each is
compared with the hand design by Welch's t-test over seeds. Outputs in ``OUT``:
``comparison.json``/``.csv``/``.md``, ``comparison.png`` (FID bars, seed dots), ``grids/*.png``
and ``runs.csv``. Resumable (the runs are ``nas.promote.promote`` pipelines).

``--init scratch,branch`` adds, for every multi-expert design, a row whose experts
branch from shared weights (``hand+branch``...); ``--budgets S1,S2,...`` trains every
design at several total budgets and writes the crossover study (``nas.studies.crossover``):
FID and per-interval held-out loss against training compute, charged in full.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch

from meme.common.checkpoint import atomic_write_json
from meme.common.command import CommandParser, add_fast_path_flag, main_guard, setup_logging
from meme.common.errors import UserError
from meme.common.markdown import markdown_table
from meme.model.config import MemeConfig
from meme.model.diffusion import Diffusion
from meme.model.experts import build_denoiser
from meme.model.macs import cost_of_meme
from meme.model.references import resolve
from meme.sampling.graphs import release
from meme.sampling.sample import SamplingPlan, generate
from meme.speed.timing import time_runs
from nas.engine.stats import Summary, summarize, welch
from nas.promote.export import open_study
from nas.promote.promote import (
    Design,
    PromoteProtocol,
    add_protocol_flags,
    check_counts,
    check_target_data,
    make_protocol,
    ray_placement,
    run_all,
    run_dir,
    study_space,
    top_designs,
)
from nas.space.space import INITS
from nas.studies import crossover

log = logging.getLogger("nas.studies.compare")
TOLERANCE = 0.05
UNEQUAL_EXPERTS = 0.01   # experts whose per-step costs differ by more train --schedule weighted


# ---- the four rows ---------------------------------------------------------------------

def baseline_designs(hand: MemeConfig) -> list[Design]:
    """single, multi-expert (same architecture N times) and the hand design itself."""
    d = hand.to_dict()
    middle = d["experts"][(hand.num_experts - 1) // 2]
    base = {k: v for k, v in d.items() if k not in ("name", "experts", "expert_probs", "boundaries")}
    single = MemeConfig.from_dict({**base, "name": "single", "experts": [middle]}, "compare").validate()
    multi = MemeConfig.from_dict({**d, "name": "multi-expert", "experts": [middle] * hand.num_experts},
                                 "compare").validate()
    return [Design("single", single, {"role": "one iU-Net for all t (the hand design's middle expert)"}),
            Design("multi-expert", multi, {"role": f"{hand.num_experts} copies of that iU-Net, one per interval"}),
            Design("hand", hand, {"role": f"hand design {hand.name} (ratios fall with t)"})]


def search_designs(study_dir: Path, study, top: int, trial: Optional[int] = None) -> list[Design]:
    """The search's winner, then the next best trials by the search's objective.

    The winner is ``trial`` when given; else the re-rank's (``rerank.json``: lowest mean over
    fresh seeds) when the search ran one, wherever its single-seed value ranked it;
    otherwise the best trial."""
    designs = top_designs(study, len(study.trials))
    rerank = Path(study_dir) / "rerank.json"
    best = trial
    if best is None and rerank.is_file():  # designs there are named 'trial N'; the reference is not a trial
        trials = [d for d in json.loads(rerank.read_text()).get("designs", [])
                  if str(d.get("name", "")).startswith("trial ") and d.get("n")]
        if trials:
            best = int(min(trials, key=lambda d: d["mean"])["name"].split()[1])
    if best is not None:
        if best not in {d.info["trial"] for d in designs}:
            raise UserError(f"--search-trial {best}: not a finished trial of {study.study_name} "
                            f"({sorted(d.info['trial'] for d in designs)})")
        designs.sort(key=lambda d: d.info["trial"] != best)  # stable: the chosen winner first
    out = []
    for i, d in enumerate(designs[:top]):
        tag = "search" if i == 0 else f"search-{i + 1}"
        cfg = MemeConfig.from_dict({**d.cfg.to_dict(), "name": tag}, "compare")
        out.append(Design(tag, cfg, {"role": f"search trial #{d.info['trial']}", "trial": d.info["trial"]}))
    return out


def added_designs(specs: list[str]) -> list[Design]:
    """``--add-design TAG=CONFIG`` rows; experts of unequal per-step cost (beyond 1%) train weighted."""
    out = []
    for spec in specs:
        tag, sep, source = spec.partition("=")
        if not sep or not tag.strip() or not source.strip():
            raise UserError(f"--add-design {spec!r}: write TAG=CONFIG (a reference name or a YAML file)")
        tag = tag.strip()
        cfg = MemeConfig.from_dict({**resolve(source.strip()).to_dict(), "name": tag}, source)
        costs = [e.gflops for e in cost_of_meme(cfg).experts]
        weighted = max(costs) > (1 + UNEQUAL_EXPERTS) * min(costs)
        role = f"added: {source.strip()}" + ("; experts trained on their intervals' shares of the steps "
                                             "(--schedule weighted)" if weighted else "")
        out.append(Design(tag, cfg, {"role": role}, schedule="weighted" if weighted else "interleaved"))
    return out


def check_equal_cost(designs: list[Design], tolerance: float) -> dict[str, float]:
    """Per-step GFLOPs of each design; refuses any beyond ``tolerance`` of the hand design."""
    gflops = {d.tag: cost_of_meme(d.cfg).gflops_mean for d in designs}
    hand = gflops[crossover.reference_tag(list(gflops))]
    off = {tag: g / hand - 1 for tag, g in gflops.items() if abs(g / hand - 1) > tolerance}
    if off:
        listed = ", ".join(f"{t} {gflops[t]:.3f} ({100 * r:+.1f}%)" for t, r in off.items())
        raise UserError(f"not at equal per-step cost: {listed} vs hand {hand:.3f} GFLOPs "
                        f"(tolerance {100 * tolerance:g}%; --tolerance to change)")
    return gflops


# ---- measurements beside FID ------------------------------------------------------------

def sampling_rate(cfg: MemeConfig, steps: int, n: int = 32, device: str = "cpu", repeats: int = 3) -> float:
    """Images per second for a whole ``steps``-step DDIM trajectory: the best of ``repeats``
    timed runs after a full warm-up run, one process, measured after the trainings so that
    no other work of ours shares the cores."""
    den, diffusion = build_denoiser(cfg), Diffusion(cfg.diffusion)
    plan = SamplingPlan(n=n, steps=steps, batch_size=n, clip_x0=not cfg.data.latent)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    dev = torch.device(device)
    rate = n / min(time_runs(lambda: generate(den, diffusion, shape, plan, dev), dev, repeats, warmup=1))
    release(den)        # the graphs (CUDA) kept for the timed runs
    return rate


def table(designs: list[Design], rows: list[dict[str, Any]], gflops: dict[str, float], protocol: PromoteProtocol,
          rates: dict[str, float]) -> pd.DataFrame:
    """One row per design: FID mean +- std over seeds, cost, compute, and the test against hand."""
    runs = pd.DataFrame(rows)
    hand_fids = runs.loc[runs.design == "hand", "fid"].dropna().tolist()
    ref_cost = gflops[crossover.reference_tag(list(gflops))]
    rec = protocol.recipe
    out = []
    for d in designs:
        fids = runs.loc[runs.design == d.tag, "fid"].dropna().tolist()
        s = summarize(fids) if fids else Summary(float("nan"), float("nan"), 0)   # FID not asked for
        cost = cost_of_meme(d.cfg)
        row = {"design": d.tag, "N": d.cfg.num_experts, "fid_mean": s.mean, "fid_std": s.std, "seeds": s.n,
               "precision": runs.loc[runs.design == d.tag, "precision"].mean(),
               "recall": runs.loc[runs.design == d.tag, "recall"].mean(),
               "gflops_per_step": gflops[d.tag], "vs_hand_cost_pct": 100 * (gflops[d.tag] / ref_cost - 1),
               "params_M": cost.params_total / 1e6, "train_steps": rec.steps, "train_images": rec.steps * rec.batch_size,
               "train_tflops": 3 * gflops[d.tag] * rec.steps * rec.batch_size / 1e3,
               "sample_img_per_s": rates.get(d.tag)}
        if d.tag == "hand" or len(hand_fids) < 2 or len(fids) < 2:
            row.update(vs_hand_fid_pct=0.0 if d.tag == "hand" else None, p_value=None,
                       verdict="(reference)" if d.tag == "hand" else "n/a")
        else:
            c = welch(fids, hand_fids)
            row.update(vs_hand_fid_pct=100 * c.rel_diff, p_value=c.p_value,
                       verdict=c.verdict if c.verdict == "cannot tell apart" else f"{c.verdict} than hand")
        out.append(row)
    return pd.DataFrame(out)


def plot(df: pd.DataFrame, runs: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(df) + 2, 3.6))
    x = range(len(df))
    ax.bar(x, df.fid_mean, yerr=df.fid_std.fillna(0), capsize=4, color="#8fb3d9", edgecolor="#2b5d8c")
    for i, tag in enumerate(df.design):
        seeds = runs.loc[runs.design == tag, "fid"]
        ax.scatter([i] * len(seeds), seeds, color="#1b1b1b", s=14, zorder=3)
    ax.set_xticks(list(x), [f"{t}\nN={n}, {g:.3f} GF" for t, n, g in zip(df.design, df.N, df.gflops_per_step)],
                  fontsize=8)
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_report(out: Path, df: pd.DataFrame, runs: pd.DataFrame, designs: list[Design], protocol: PromoteProtocol,
                 command: str) -> None:
    rec = protocol.recipe
    cols = ["design", "N", "fid_mean", "fid_std", "seeds", "vs_hand_fid_pct", "p_value", "verdict", "precision",
            "recall", "gflops_per_step", "vs_hand_cost_pct", "params_M", "train_images", "train_tflops",
            "sample_img_per_s"]
    lines = [f"# Does the search pay off? ({len(designs)} designs x {int(df.seeds.max())} seeds)", "",
             f"Command: `{command}`", "",
             f"Every design: {rec.steps} optimizer steps in all at batch {rec.batch_size} on {protocol.data}, "
             f"lr {rec.lr:g}, EMA {rec.ema_decay:g}; FID of {rec.fid_samples} samples ({rec.sample_steps} DDIM "
             f"steps) against {rec.fid_reference} real training images. p: Welch's t-test vs hand over seeds. "
             f"sample_img_per_s: a whole {rec.sample_steps}-step trajectory at batch 32, best of 3 after a warm-up, "
             f"one process, measured after the trainings.", "",
             markdown_table(cols, df[cols].itertuples(index=False)), ""]
    lines += [f"- `{d.tag}`: {d.info.get('role', '')}; ratios "
              f"{' | '.join(' '.join(e.high_ratios) for e in d.cfg.experts)}; p_n "
              f"{' '.join(f'{p:g}' for p in d.cfg.resolved_probs())}" for d in designs]
    lines += ["", "Sample grids: " + ", ".join(f"[{d.tag}](grids/{d.tag}.png)" for d in designs), ""]
    (out / "comparison.md").write_text("\n".join(lines))
    atomic_write_json({"command": command, "recipe": dataclasses.asdict(rec), "data": protocol.data,
                       "designs": crossover.records(df), "runs": crossover.records(runs)},
                      out / "comparison.json")


# ---- CLI ----------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(prog="meme-nas compare", description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, type=Path, help="study directory of a search (results/<study>)")
    p.add_argument("--top", type=int, default=1, help="search designs compared, best first (default %(default)s)")
    p.add_argument("--search-trial", type=int, default=None,
                   help="the trial compared as the search's winner (default: the re-rank's lowest mean, else the "
                        "best trial)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="largest per-step GFLOPs difference from the hand design (default %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="output folder for runs and the report (default: STUDY/compare)")
    p.add_argument("--storage", default=None, help="Optuna RDB URL if the study is not in STUDY/optuna.db")
    p.add_argument("--name", default=None, help="study name when the storage holds several")
    p.add_argument("--add-design", action="append", default=[], metavar="TAG=CONFIG",
                   help="one more row: a reference name or config YAML under the name TAG (repeatable), e.g. "
                        "multistage=multistage-fmnist16")
    c = p.add_argument_group("crossover study (nas.studies.crossover)")
    c.add_argument("--budgets", default=None,
                   help="total optimizer steps to train every design at, e.g. 250,1000,2000 (default: the recipe's)")
    c.add_argument("--init", dest="inits", default="scratch",
                   help="comma-separated: scratch, branch (each multi-expert design once per init; default %(default)s)")
    c.add_argument("--designs", default=None,
                   help="only these rows, e.g. single,multi-expert,hand,hand+branch,search+branch")
    c.add_argument("--small-seeds", type=int, default=None,
                   help="seeds at every budget but the largest (default: --seeds)")
    c.add_argument("--fid-budgets", default="all", choices=("all", "largest", "none"),
                   help="FID at every budget, at the largest only, or nowhere (held-out loss is scored at all; "
                        "default %(default)s); a later run with FID adds it to the same trained runs")
    add_protocol_flags(p, init_flag=False)
    add_fast_path_flag(p)
    args = p.parse_args(argv)
    return args


@main_guard
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    check_counts(args)
    if args.seeds < 2:
        raise UserError("--seeds must be >= 2: a difference means nothing without the seed spread")
    study = open_study(args.study, args.storage, args.name)
    space = study_space(study)
    if space is None or space.reference is None:
        raise UserError(f"study {study.study_name}: its space (or the space's hand-designed reference) cannot be "
                        f"loaded, so there is no hand design to compare with")
    protocol = make_protocol(args, space)
    inits = [x.strip() for x in args.inits.split(",") if x.strip()]
    if not inits or set(inits) - set(INITS):
        raise UserError(f"--init must list scratch and/or branch, got {args.inits!r}")
    designs = crossover.with_inits(baseline_designs(space.reference)
                                   + search_designs(args.study, study, args.top, args.search_trial)
                                   + added_designs(args.add_design),
                                   inits, args.designs.split(",") if args.designs else None)
    tags = [d.tag for d in designs]
    if len(set(tags)) != len(tags):
        raise UserError(f"--add-design: a TAG repeats a row's name ({sorted({t for t in tags if tags.count(t) > 1})})")
    for d in designs:
        check_target_data(d.cfg, protocol.data)
    budgets = crossover.parse_budgets(args.budgets, protocol.recipe.steps)
    small_seeds = args.small_seeds or args.seeds
    if small_seeds > args.seeds:
        raise UserError(f"--small-seeds ({small_seeds}) cannot exceed --seeds ({args.seeds}): smaller budgets "
                        f"are scored from the largest budget's runs")
    gflops = check_equal_cost(designs, args.tolerance)
    crossover.check_equal_compute(designs, protocol, budgets, args.tolerance)
    out = args.out or Path(args.study) / "compare"
    log.info("comparing %s x %d seeds, %s steps each, %d at a time -> %s", ", ".join(d.tag for d in designs),
             args.seeds, ",".join(map(str, budgets)), args.jobs, out)
    study_mode = len(budgets) > 1 or inits != ["scratch"] or args.fid_budgets != "all"
    if args.fid_budgets == "none":
        protocol = dataclasses.replace(protocol, fid=False)
    if study_mode:
        all_rows = crossover.run_budgets(designs, budgets, args.seeds, small_seeds, out, protocol, args.jobs,
                                         ray_placement(args), args.fid_budgets, crossover.load_recorded(out))
        rows = [r for r in all_rows if r["budget_steps"] == max(budgets)]
        protocol = crossover.at_budget(protocol, max(budgets))
        runs_root = out / f"steps{max(budgets)}"
    else:
        rows = run_all(designs, range(1, args.seeds + 1), out / "runs", protocol, args.jobs, ray_placement(args))
        runs_root = out / "runs"
    runs = pd.DataFrame(rows)
    device = "cpu" if protocol.device == "auto" else protocol.device
    by_cfg: dict[str, float] = {}
    for d in designs:  # a branched row samples with the very network of its from-scratch row
        if d.cfg.hash() not in by_cfg:
            by_cfg[d.cfg.hash()] = sampling_rate(d.cfg, protocol.recipe.sample_steps, device=device)
    rates = {d.tag: by_cfg[d.cfg.hash()] for d in designs}
    df = table(designs, rows, gflops, protocol, rates)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    for d in designs:
        grid = run_dir(runs_root, d, 1) / "samples" / "grid.png"
        if grid.is_file():   # no samples where FID was not asked for
            shutil.copyfile(grid, out / "grids" / f"{d.tag}.png")
    runs.to_csv(out / "runs.csv", index=False)
    df.to_csv(out / "comparison.csv", index=False)
    command = "meme-nas compare " + " ".join(sys.argv[1:] if argv is None else argv)
    write_report(out, df, runs, designs, protocol, command)
    plot(df, runs, out / "comparison.png",
         f"{study.study_name}: FID, {args.seeds} seeds, equal per-step GFLOPs and training compute")
    print(df.to_string(index=False))
    print(f"table: {out / 'comparison.md'}; plot: {out / 'comparison.png'}")
    if study_mode:
        every = pd.DataFrame(all_rows)
        every.to_csv(out / crossover.RUNS_FILE, index=False)
        cross_table = crossover.summary(every)
        found = crossover.write(out, every, cross_table, protocol, budgets, command)
        print(cross_table.to_string(index=False))
        print(f"beats single from: {found}; crossover: {out / 'crossover.md'}, {out / 'crossover.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
