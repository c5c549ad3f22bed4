"""Study outputs: trials.csv, pareto.png, best.yaml and the printed summary table.

Everything is rebuilt from the Optuna storage (plus ``reference.json``), so running it
again after ``--resume`` or on a copied ``optuna.db`` gives the same files.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from meme.model.config import MemeConfig

CSV_ATTRS = ("num_experts", "gflops", "gflops_mean", "gflops_max", "latency_ms", "latency_ms_mean", "latency_ms_max",
             "latency_measured_ms", "latency_device", "constraint", "params", "params_unique", "share", "paper_units",
             "trained_steps", "train_steps_total", "train_gflops_total", "seed", "stopped_early", "wall_s", "peak_mem_mb", "device", "duplicate_of", "fail_reason")


def ratios_summary(cfg_yaml: Optional[str]) -> str:
    """'3/4 5/8 1/2 1/4 | 3/4 ...' -- the searched ratios at a glance."""
    if not cfg_yaml:
        return ""
    cfg = MemeConfig.from_yaml(cfg_yaml, "trial")
    return " | ".join(" ".join(e.high_ratios) for e in cfg.experts)


def quality(t: FrozenTrial) -> Optional[float]:
    if t.state != TrialState.COMPLETE or not t.values:
        return None
    return float(t.values[0])


def is_full(t: FrozenTrial) -> bool:
    """Trained for the whole proxy budget (comparable with the reference)."""
    return quality(t) is not None and not t.user_attrs.get("stopped_early", False)


def status(t: FrozenTrial) -> str:
    if t.state == TrialState.PRUNED and t.user_attrs.get("constraint", 0) > 0:
        return "rejected"
    if t.user_attrs.get("stopped_early"):  # PRUNED by the scheduler (older studies: COMPLETE)
        return "stopped"
    if t.state == TrialState.COMPLETE and t.user_attrs.get("duplicate_of") is not None:
        return "duplicate"
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "fail",
            TrialState.RUNNING: "running"}.get(t.state, t.state.name.lower())


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: Optuna's frame plus the recorded attributes (YAML summarised)."""
    df = study.trials_dataframe(attrs=("number", "value", "values", "state", "params", "duration"), multi_index=False)
    rows = []
    measured = study.user_attrs.get("latency_measured_ms", {})   # finalists' measured step time (nas.search)
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "status": status(t), "detail": t.user_attrs.get("status")}
        for k in CSV_ATTRS:
            v = t.user_attrs.get(k, measured.get(str(t.number)) if k == "latency_measured_ms" else None)
            row[k] = ",".join(f"{x:.3f}" for x in v) if isinstance(v, list) else v
        row["gflops_per_expert"] = ",".join(f"{x:.2f}" for x in t.user_attrs.get("gflops_per_expert", []))
        row["ratios"] = ratios_summary(t.user_attrs.get("config_yaml"))
        cfg_yaml = t.user_attrs.get("config_yaml")
        if cfg_yaml:
            cfg = MemeConfig.from_yaml(cfg_yaml, "trial")
            row["expert_probs"] = " ".join(f"{p:g}" for p in cfg.resolved_probs())
            row["boundaries"] = " ".join(str(b) for b in cfg.resolved_boundaries())
        rows.append(row)
    extra = pd.DataFrame(rows)
    if df.empty:
        return extra
    return df.merge(extra, on="number", how="left")


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible, fully trained, distinct designs (re-proposals left out), best first."""
    full = [t for t in study.get_trials(deepcopy=False) if is_full(t) and t.user_attrs.get("constraint", 0) <= 0
            and t.user_attrs.get("duplicate_of") is None]
    return sorted(full, key=quality)


def best_trial(study: optuna.Study) -> Optional[FrozenTrial]:
    """Lowest quality objective among feasible, fully trained trials."""
    order = ranked(study)
    return order[0] if order else None


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (cost, quality) points, both minimised, sorted by cost."""
    front, best = [], math.inf
    for c, q in sorted(points):
        if q < best:
            front.append((c, q))
            best = q
    return front


def plot_pareto(study: optuna.Study, path: Path, budget: float, reference: Optional[dict],
                references_cost: dict[str, float], objective: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    trials = study.get_trials(deepcopy=False)
    full = [(t.user_attrs["gflops"], quality(t)) for t in trials if is_full(t)]
    stopped = [(t.user_attrs["gflops"], t.intermediate_values[max(t.intermediate_values)]) for t in trials
               if status(t) == "stopped" and t.intermediate_values]
    rejected = [t.user_attrs["gflops"] for t in trials if status(t) == "rejected"]
    if full:
        ax.scatter(*zip(*full), c="tab:blue", label="feasible, fully trained", zorder=3)
        front = pareto_front(full)
        ax.step(*zip(*front), where="post", c="tab:blue", alpha=0.5, label="Pareto front")
    if stopped:
        ax.scatter(*zip(*stopped), c="tab:blue", alpha=0.3, marker="o", label="stopped early (last value before the pruner stopped it)")
    qs = [q for _, q in full + stopped] + ([reference["objective"]] if reference and reference.get("objective") else [])
    y_top = max(qs) if qs else 1.0
    if rejected:
        ax.scatter(rejected, [y_top] * len(rejected), c="tab:red", marker="x",
                   label="over budget (rejected, not trained)", zorder=3)
    if reference and reference.get("objective") is not None:
        ax.scatter([reference["gflops"]], [reference["objective"]], c="tab:orange", marker="*", s=220,
                   label=f"{reference['name']} (hand design, same proxy)", zorder=4)
    if math.isfinite(budget):
        ax.axvline(budget, c="k", ls="--", lw=1, label=f"budget {budget:.1f} GFLOPs")
    for name, g in references_cost.items():
        ax.axvline(g, c="gray", ls=":", lw=1)
        ax.text(g, ax.get_ylim()[1], f" {name}", rotation=90, va="top", fontsize=8, color="gray")
    ax.set_xlabel("GFLOPs per denoising step at the target shape (attention included)")
    ax.set_ylabel(f"proxy {objective} (lower is better)")
    ax.set_title(f"study {study.study_name}: cost vs quality")
    ax.legend(fontsize=8, loc="best")
    if qs and min(qs) > 0:
        ax.set_yscale("log")  # stopped-early losses would otherwise squash the front
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_best(study: optuna.Study, out: Path) -> Optional[Path]:
    t = best_trial(study)
    if t is None:
        return None
    cfg = MemeConfig.from_yaml(t.user_attrs["config_yaml"], f"trial {t.number}")
    cfg = MemeConfig.from_dict({**cfg.to_dict(), "name": f"{study.study_name}-best"}, "best")
    return cfg.save(out / "best.yaml")


def summary_lines(study: optuna.Study, reference: Optional[dict], budget: float, top: int = 5) -> list[str]:
    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[status(t)] = counts.get(status(t), 0) + 1
    lines = ["trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
             f"{'':3}{'trial':>7} {'N':>2} {'GFLOPs':>8} {'params':>9} {'objective':>10}  ratios (per expert) / p_n"]
    ref_q = reference.get("objective") if reference else None
    for i, t in enumerate(ranked(study)[:top]):
        cfg = MemeConfig.from_yaml(t.user_attrs["config_yaml"], "trial")
        mark = ""
        lines.append(f"{i + 1:>2} {t.number:>7} {cfg.num_experts:>2} {t.user_attrs['gflops']:>8.2f} "
                     f"{t.user_attrs['params'] / 1e6:>8.1f}M {quality(t):>10.5f}  "
                     f"{ratios_summary(t.user_attrs['config_yaml'])} / p={list(cfg.resolved_probs())}"
                     + (f" / widths {t.user_attrs['widths']}" if "widths" in t.user_attrs else "") + mark)
    if reference:
        q = f"{ref_q:>10.5f}" if ref_q is not None else f"{'failed':>10}"
        over = "  (over budget)" if reference["gflops"] > budget else ""
        lines.append(f"{'ref':>3} {reference['name']:>7} {reference['num_experts']:>2} {reference['gflops']:>8.2f} "
                     f"{reference['params'] / 1e6:>8.1f}M {q}  hand-designed reference, same proxy and seed{over}")
    best = best_trial(study)
    if best is not None and ref_q is not None:
        d = (quality(best) - ref_q) / ref_q * 100
        lines.append(f"best trial {best.number} vs {reference['name']} on the search's one seed: {quality(best):.5f} vs "
                     f"{ref_q:.5f} ({d:+.1f}%), cost {best.user_attrs['gflops']:.2f} vs {reference['gflops']:.2f} "
                     f"GFLOPs -- one seed ranks, it does not prove: see the re-rank")
    elif best is None:
        lines.append("no feasible trial was fully trained: no best.yaml")
    return lines


def rerank_verdict(result: dict[str, Any]) -> list[str]:
    """The headline: does the best re-ranked trial beat the reference beyond seed noise?"""
    rows = [r for r in result["designs"] if r.get("n")]
    base = result["designs"][0]
    trials = [r for r in rows if r["name"] != base["name"] and r.get("vs_first")]
    if not base.get("n") or not trials:
        return ["re-rank: nothing to compare"]
    best = min(trials, key=lambda r: r["mean"])
    c = best["vs_first"]
    head = (f"{best['name']} ({best['gflops']:.2f} GFLOPs, N={best['num_experts']}): {best['mean']:.5f} +- "
            f"{best['std']:.5f} vs {base['name']} ({base['gflops']:.2f} GFLOPs): {base['mean']:.5f} +- "
            f"{base['std']:.5f} over {best['n']}/{base['n']} seeds, {100 * c['rel_diff']:+.1f}%, p={c['p_value']:.3f}")
    word = {"better": "BEATS the reference", "worse": "is WORSE than the reference",
            "cannot tell apart": "cannot be told apart from the reference"}[c["verdict"]]
    return [f"verdict: {head} -> {word}"]
