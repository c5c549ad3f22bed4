"""Where multi-expert overtakes one network: ``nas.studies.compare --budgets S1,S2,... --init scratch,branch``.

Every design of ``nas.studies.compare`` is trained at several total budgets (optimizer steps
in all, the same for every design at a budget) and scored at each by FID and by the
held-out loss per interval of t (``meme.sampling.heldout``). A design whose experts branch from
shared weights (``meme.training.branching``) trains its parent inside the same step budget, so
its compute, charged in full (``meme.training.compute``), equals the from-scratch designs' at that
budget; the equal-compute check refuses any design (an ``--init-from`` source charged in
full, say) more than ``--tolerance`` away from the hand design's.

One run serves several budgets where the schedule allows: a from-scratch interleaved
run's first S steps *are* a run of S steps (constant LR after warm-up, nothing depends
on the total), so the largest budget's run keeps snapshots (``meme.training.train --snapshot-at``)
and each smaller budget samples from one. A branched run splits at a fraction of its own
budget, so each budget is its own run.

Seeds: ``--seeds`` at the largest budget, ``--small-seeds`` at the others. At every
budget each design is compared with ``single`` by Welch's t-test over seeds; the report
names the smallest budget, if any, from which a multi-expert design beats it.
Outputs beside ``nas.studies.compare``'s: ``crossover.json`` (every run), ``crossover.md``,
``crossover.png`` (FID against charged training compute, one line per design).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from meme.common.checkpoint import atomic_write_json
from meme.common.errors import UserError
from meme.common.markdown import markdown_table
from meme.model.config import MemeConfig
from meme.training.branching import parent_spec
from meme.training.compute import TrainingCompute
from meme.training.options import to_argv
from meme.training.train import parse_args as parse_train_args
from meme.training.train import training_compute
from nas.engine.stats import summarize, welch
from nas.promote.promote import Design, PromoteProtocol, RayPlacement, run_dir, run_pipelines

log = logging.getLogger("nas.studies.crossover")
BRANCH_SUFFIX = "+branch"


def parse_budgets(text: Optional[str], default: int) -> list[int]:
    if not text:
        return [default]
    try:
        budgets = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--budgets must be comma-separated step counts, got {text!r}") from None
    if not budgets or budgets[0] < 1:
        raise UserError(f"--budgets must be >= 1 steps each, got {text!r}")
    return budgets


def with_inits(designs: Sequence[Design], inits: Sequence[str], wanted: Optional[Sequence[str]] = None) -> list[Design]:
    """Each design once per init ('hand', 'hand+branch'); one network has nothing to branch."""
    out = []
    for d in designs:
        for init in inits:
            if init == "branch" and (d.cfg.num_experts == 1 or not branchable(d.cfg)):
                continue
            tag = d.tag + (BRANCH_SUFFIX if init == "branch" else "")
            role = d.info.get("role", "") + ("; experts branched from shared weights" if init == "branch" else "")
            out.append(dataclasses.replace(d, tag=tag, init=init, info={**d.info, "role": role}))
    if wanted:
        unknown = sorted(set(wanted) - {d.tag for d in out})
        if unknown:
            raise UserError(f"--designs: {unknown} not among {[d.tag for d in out]}")
        out = [d for d in out if d.tag in wanted]
    return out


def branchable(cfg: MemeConfig) -> bool:
    """Whether the experts can be cut from one parent network (``meme.training.branching``)."""
    try:
        parent_spec(cfg)
    except UserError as exc:
        log.info("%s has no +branch row: %s", cfg.name, exc)
        return False
    return True


def reference_tag(tags: Sequence[str]) -> str:
    """The row every cost is compared with: the hand design, else the first row."""
    return "hand" if "hand" in tags else tags[0]


def at_budget(protocol: PromoteProtocol, steps: int) -> PromoteProtocol:
    return dataclasses.replace(protocol, recipe=dataclasses.replace(protocol.recipe, steps=steps))


def charged_compute(design: Design, protocol: PromoteProtocol) -> TrainingCompute:
    """The design's training compute at the protocol's budget, its source charged in full."""
    flags = [*to_argv(design.recipe(protocol).train_options(schedule=design.schedule)), *protocol.train_args]
    _, opts = parse_train_args(["--config", design.cfg.name, *flags])   # meme.training.train's own reading of extra flags
    return training_compute(design.cfg, opts, opts.branch_plan())       # what the run will record


def check_equal_compute(designs: Sequence[Design], protocol: PromoteProtocol, budgets: Sequence[int],
                        tolerance: float) -> dict[tuple[str, int], TrainingCompute]:
    """Charged-in-full training compute of every design at every budget; refuses one off the hand design's."""
    out = {(d.tag, s): charged_compute(d, at_budget(protocol, s)) for d in designs for s in budgets}
    hand = reference_tag([d.tag for d in designs])
    for s in budgets:
        ref = out[(hand, s)].charged_tflops
        off = {d.tag: out[(d.tag, s)].charged_tflops for d in designs
               if abs(out[(d.tag, s)].charged_tflops / ref - 1) > tolerance}
        if off:
            listed = ", ".join(f"{t} {v:.3f}" for t, v in off.items())
            raise UserError(f"not at equal training compute at {s} steps (charged in full, a source's training "
                            f"included): {listed} vs {hand} {ref:.3f} TFLOPs (tolerance {100 * tolerance:g}%)")
    return out


def prefix_reusable(design: Design, protocol: PromoteProtocol) -> bool:
    """A from-scratch interleaved run's prefix is a shorter run (no split, no sequential blocks)."""
    args = list(protocol.train_args)
    sequential = design.schedule == "sequential" or (
        "--schedule" in args and args[args.index("--schedule") + 1:][:1] == ["sequential"])
    return design.recipe(protocol).init == "scratch" and not sequential


def derive_prefix_run(src: Path, dst: Path, steps: int, design: Design, protocol: PromoteProtocol) -> None:
    """A run directory of ``steps`` made of a longer run's snapshot (training marked done)."""
    snap = src / "checkpoints" / f"step{steps:07d}.pt"
    if not snap.is_file():
        raise UserError(f"{src}: no snapshot at step {steps} to score that budget from")
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "options.json", "design.yaml"):
        shutil.copyfile(src / name, dst / name)
    shutil.copyfile(snap, dst / "checkpoints" / "last.pt")
    atomic_write_json(charged_compute(design, protocol).to_dict(), dst / "compute.json")
    (dst / "train.done").write_text(f"prefix of {src} (step {steps})\n")


Task = tuple[Design, int, Path, PromoteProtocol, int]     # design, seed, budget folder, protocol, budget


Recorded = dict[tuple[str, int, int], dict[str, Any]]   # (design tag, seed, budget steps) -> finished row
RUNS_FILE = "crossover_runs.csv"


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts (NaN, e.g. the hand design's own p-value, as null)."""
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


def load_recorded(out: Path) -> Recorded:
    """The rows of an earlier ``crossover_runs.csv`` in ``out``, by (design, seed, budget).

    Run directories (checkpoints, samples) are not committed; their rows are. So a clone
    of a committed study can resume it (an FID pass left half done, say) without
    retraining the runs whose numbers are already on record.
    """
    path = out / RUNS_FILE
    if not path.is_file():
        return {}
    rows = records(pd.read_csv(path))
    for r in rows:
        if isinstance(r.get("heldout_bins"), str):
            r["heldout_bins"] = json.loads(r["heldout_bins"])
    return {(r["design"], int(r["seed"]), int(r["budget_steps"])): r for r in rows}


def from_record(task: Task, recorded: Recorded) -> Optional[dict[str, Any]]:
    """The recorded row that stands in for a task, or None if the task must run.

    Only where the run directory was never started here (no ``train.done``): a run that
    exists is always resumed from its own files. A row stands in when it has everything
    the task asks for: held-out loss, and FID where the protocol scores it.
    """
    design, seed, folder, protocol, steps = task
    if (run_dir(folder, design, seed) / "train.done").exists():
        return None
    row = recorded.get((design.tag, seed, steps))
    if row is None or row.get("heldout_loss") is None or (protocol.fid and row.get("fid") is None):
        return None
    mine, theirs = design.info.get("trial"), row.get("trial")
    if theirs is not None and theirs == theirs and (mine is None or int(theirs) != int(mine)):   # NaN: no trial
        raise UserError(f"{folder.parent}: the recorded {design.tag} rows are search trial #{int(theirs)}, this "
                        f"run's {design.tag} is {'#' + str(mine) if mine is not None else 'no trial'}: pass "
                        f"--search-trial {int(theirs)} to extend that study, or use another --out")
    return dict(row)


def check_reproduced(rows: Sequence[dict[str, Any]], recorded: Recorded, rel: float = 1e-4) -> None:
    """A retrained run should give its recorded held-out loss again (same seed, same recipe)."""
    for r in rows:
        old = recorded.get((r["design"], int(r["seed"]), int(r["budget_steps"])))
        if old is None or old.get("heldout_loss") is None:
            continue
        a, b = float(r["heldout_loss"]), float(old["heldout_loss"])
        if abs(a - b) > rel * abs(b):
            log.warning("%s seed %d at %d steps: held-out loss %.6g retrained, %.6g on record (%+.2f%%)",
                        r["design"], r["seed"], r["budget_steps"], a, b, 100 * (a - b) / b)


def run_tasks(tasks: Sequence[Task], jobs: int, ray: Optional[RayPlacement],
              recorded: Optional[Recorded] = None) -> list[dict[str, Any]]:
    """Pipelines of different budgets and protocols in one pool (no core idles between groups).

    Tasks with a standing row in ``recorded`` are not run (``from_record``).
    """
    recorded = recorded or {}
    stand_in = [from_record(t, recorded) for t in tasks]
    todo = [t for t, r in zip(tasks, stand_in) if r is None]
    if len(todo) < len(tasks):
        log.info("%d of %d runs taken from %s (their run folders are not here)", len(tasks) - len(todo),
                 len(tasks), RUNS_FILE)
    done = run_pipelines([t[:4] for t in todo], jobs, ray) if todo else []   # no Ray start for nothing
    ran = [{**r, "budget_steps": t[4]} for r, t in zip(done, todo)]
    check_reproduced(ran, recorded)
    fresh = iter(ran)
    return [r if r is not None else next(fresh) for r in stand_in]


def run_budgets(designs: Sequence[Design], budgets: Sequence[int], seeds: int, small_seeds: int, out: Path,
                protocol: PromoteProtocol, jobs: int, ray: Optional[RayPlacement],
                fid_budgets: str = "all", recorded: Optional[Recorded] = None) -> list[dict[str, Any]]:
    """Every (design, budget, seed) pipeline; from-scratch designs score smaller budgets from snapshots.

    Order: every training and held-out loss first, FID last and seed by seed (every
    design's seed 1, then seed 2...), so an interrupted study has its cheap, precise
    numbers and an equal number of FID seeds per design. ``fid_budgets``: 'all', or
    'largest' (FID at the largest budget only: on a CPU FID costs more than the trainings).
    ``recorded``: finished rows of an earlier run of the study (``load_recorded``).
    """
    recorded = recorded or {}
    big, small = max(budgets), [s for s in budgets if s < max(budgets)]
    reuse = [d for d in designs if prefix_reusable(d, protocol)]
    snap = ("--snapshot-at", ",".join(str(s) for s in small)) if small else ()

    def proto(d: Design, steps: int, fid: bool) -> PromoteProtocol:
        p = dataclasses.replace(at_budget(protocol, steps), fid=fid)
        return dataclasses.replace(p, train_args=tuple(p.train_args) + snap) if d in reuse and steps == big else p

    def task(d: Design, seed: int, steps: int, fid: bool) -> Task:
        return d, seed, out / f"steps{steps}", proto(d, steps, fid), steps

    def derived(steps: int, fid: bool) -> list[Task]:
        tasks = []
        for d in reuse:
            for seed in range(1, small_seeds + 1):
                dst = run_dir(out / f"steps{steps}", d, seed)
                if from_record(task(d, seed, steps, fid), recorded) is None and not (dst / "train.done").exists():
                    derive_prefix_run(run_dir(out / f"steps{big}", d, seed), dst, steps, d, proto(d, steps, fid))
                tasks.append(task(d, seed, steps, fid))
        return tasks

    own_small = [task(d, seed, s, False) for s in small for d in designs if d not in reuse
                 for seed in range(1, small_seeds + 1)]
    run_tasks([task(d, seed, big, False) for d in designs for seed in range(1, seeds + 1)] + own_small, jobs, ray,
              recorded)
    run_tasks([t for s in small for t in derived(s, False)], jobs, ray, recorded)
    fid_small = protocol.fid and fid_budgets == "all"
    rows = run_tasks([task(d, seed, big, protocol.fid) for seed in range(1, seeds + 1) for d in designs], jobs, ray,
                     recorded)
    rows += run_tasks([task(d, seed, s, fid_small) for s in small for seed in range(1, small_seeds + 1)
                       for d in designs], jobs, ray, recorded)
    return rows


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (design, budget): FID and held-out loss mean +- std over seeds, compute, and the test against single."""
    out = []
    for (tag, steps), g in runs.groupby(["design", "budget_steps"], sort=False):
        fids = [float(v) for v in g.fid if v is not None and v == v]
        fid = summarize(fids) if fids else None
        held = summarize(g.heldout_loss.tolist())
        at = runs[(runs.design == "single") & (runs.budget_steps == steps)]
        single = [float(v) for v in at.fid if v is not None and v == v]
        row = {"design": tag, "budget_steps": steps, "init": g.init.iloc[0],
               "fid_mean": fid.mean if fid else None, "fid_std": fid.std if fid else None,
               "fid_seeds": fid.n if fid else 0, "seeds": held.n, "heldout_mean": held.mean, "heldout_std": held.std,
               "charged_tflops": g.charged_tflops.mean(), "amortised_tflops": g.amortised_tflops.mean()}
        bins = pd.DataFrame(g.heldout_bins.tolist())
        row.update({f"heldout_bin{i + 1}": bins[i].mean() for i in bins.columns})
        row.update(_versus("fid", fids, single, tag))
        row.update(_versus("heldout", g.heldout_loss.tolist(), at.heldout_loss.tolist(), tag))
        out.append(row)
    return pd.DataFrame(out).sort_values(["budget_steps", "design"], kind="stable").reset_index(drop=True)


def _versus(metric: str, values: list, single: list, tag: str) -> dict[str, Any]:
    """``metric``'s difference from single, Welch over seeds (lower is better for FID and loss)."""
    if tag == "single":
        return {f"{metric}_vs_single_pct": None, f"{metric}_p": None, f"{metric}_verdict": "(reference)"}
    if len(values) < 2 or len(single) < 2:
        return {f"{metric}_vs_single_pct": None, f"{metric}_p": None, f"{metric}_verdict": "not measured"}
    c = welch(values, single)
    return {f"{metric}_vs_single_pct": 100 * c.rel_diff, f"{metric}_p": c.p_value,
            f"{metric}_verdict": c.verdict if c.verdict == "cannot tell apart" else f"{c.verdict} than single"}


def crossover_points(table: pd.DataFrame, metric: str = "fid") -> dict[str, Optional[int]]:
    """Per multi-expert design: the smallest budget from which it is 'better than single' at every larger one
    (budgets where ``metric`` was not measured are skipped)."""
    out: dict[str, Optional[int]] = {}
    for tag, g in table[table.design != "single"].groupby("design", sort=False):
        g = g[g[f"{metric}_verdict"] != "not measured"].sort_values("budget_steps")
        better = [v == "better than single" for v in g[f"{metric}_verdict"]]
        first = None
        for i in range(len(better)):
            if all(better[i:]):
                first = int(g.budget_steps.iloc[i])
                break
        out[tag] = first
    return out


def plot(table: pd.DataFrame, runs: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one compute axis for both: FID is often scored at the largest budget only, and a panel
    # of its own would zoom into the 1% the designs of one budget differ by
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, (mean, std, each, label) in zip(axes, [("fid_mean", "fid_std", "fid", "FID (lower is better)"),
                                                   ("heldout_mean", "heldout_std", "heldout_loss",
                                                    "held-out eps-MSE, all t (lower is better)")]):
        for tag, g in table.groupby("design", sort=False):
            g = g[g[mean].notna()].sort_values("charged_tflops")
            if g.empty:
                continue
            style = "--" if tag.endswith(BRANCH_SUFFIX) else "-"
            line = ax.errorbar(g.charged_tflops, g[mean].astype(float), yerr=g[std].astype(float).fillna(0),
                               fmt="o" + style, capsize=3, label=tag, ms=4)
            r = runs[(runs.design == tag) & runs[each].notna()]
            ax.scatter(r.charged_tflops, r[each].astype(float), s=8, color=line[0].get_color(), alpha=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("training compute, charged in full (TFLOPs)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write(out: Path, runs: pd.DataFrame, table: pd.DataFrame, protocol: PromoteProtocol, budgets: Sequence[int],
          command: str) -> dict[str, Optional[int]]:
    cross = {"fid": crossover_points(table, "fid"), "heldout": crossover_points(table, "heldout")}
    rec = protocol.recipe
    cols = ["design", "budget_steps", "fid_mean", "fid_std", "fid_seeds", "fid_vs_single_pct", "fid_p", "fid_verdict",
            "heldout_mean", "heldout_std", "seeds", "heldout_vs_single_pct", "heldout_p", "heldout_verdict"] + \
           [c for c in table.columns if c.startswith("heldout_bin")] + ["charged_tflops", "amortised_tflops"]
    lines = [f"# Where multi-expert overtakes one network ({len(budgets)} budgets)", "", f"Command: `{command}`", "",
             f"Budgets {', '.join(map(str, budgets))} optimizer steps in all at batch {rec.batch_size}, lr {rec.lr:g}, "
             f"EMA {rec.ema_decay:g}; branched designs train a parent for {rec.branch_at:g} of their steps "
             f"({rec.split_optimizer} optimizer at the split). FID of {rec.fid_samples} samples ({rec.sample_steps} "
             f"DDIM steps) against {rec.fid_reference} real training images; held-out eps-MSE per quarter of [0, T) "
             f"(meme.sampling.heldout). p: Welch's t-test vs single over seeds. Compute: charged in full (a parent phase is "
             f"part of the run's own steps).", "",
             markdown_table(cols, table[cols].itertuples(index=False)), "",
             "Beats single from (every larger budget too), by FID: " +
             ", ".join(f"{t}: {v if v is not None else 'no budget here'}" for t, v in cross["fid"].items()),
             "", "by held-out loss: " +
             ", ".join(f"{t}: {v if v is not None else 'no budget here'}" for t, v in cross["heldout"].items()), ""]
    (out / "crossover.md").write_text("\n".join(lines))
    atomic_write_json({"command": command, "budgets": list(budgets), "recipe": dataclasses.asdict(rec),
                       "data": protocol.data, "crossover": cross, "summary": records(table), "runs": records(runs)},
                      out / "crossover.json")
    plot(table, runs, out / "crossover.png", f"FID vs training compute ({int(table.seeds.max())} seeds at most)")
    return cross
