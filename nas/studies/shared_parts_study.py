"""What experts share, measured: ``meme-nas sharing-study --space S --seeds 3``.

Every row is trained by the space's own proxy recipe (``nas.evaluators.trial.run_trial``: the
same total optimizer steps in all, whatever N, interleaved, one AdamW) on each seed and
scored by the held-out eps-MSE on a fixed grid of ``--grid`` timesteps (fixed images and
noise; each t denoised by its owner), reported overall and per quarter of [0, T).

Rows (at the target shape; trained at the proxy's):

* ``single``: the hand design's middle expert for every t;
* ``multi-N2`` / ``multi-N4``: N copies of it, one per uniform interval, p_n the hand
  design's first N (its last repeated where it has fewer);
* ``hand``: the space's hand design (N = 4, ratios falling with t);
* each multi-expert row with ``share`` none, ``dec`` (the whole decoder and output
  head) and ``enc1+dec`` (also the first encoder stage, with the input conv);
* each multi-expert row (no sharing) with clustered boundaries (``nas.space.clusters``).

Equal cost holds by construction and is checked: sharing leaves each expert's forward
unchanged, copies and the hand design cost within ``TOLERANCE`` of the single network
per step, and every row trains the same steps x batch. Each row is compared with
``single`` and with its own unshared row by Welch's t-test over seeds. Outputs:
``sharing.json`` (every run, and the summary), ``sharing.md``, ``sharing.png``.
Resumable: finished runs are kept in ``runs.jsonl`` and skipped.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from meme.common.checkpoint import atomic_write_json
from meme.common.command import CommandParser, main_guard, setup_logging
from meme.common.errors import UserError
from meme.common.markdown import markdown_table
from meme.model.config import ConfigError, MemeConfig, ShareConfig
from meme.model.macs import cost_of_meme
from nas.engine.stats import summarize, welch
from nas.evaluators.trial import run_trial
from nas.space.clusters import boundaries_for
from nas.space.space import SearchSpace, load_space

log = logging.getLogger("nas.studies.shared_parts_study")
SHARES = ("none", "dec", "enc1+dec")
TOLERANCE = 0.05
QUARTERS = 4
REFUSED: dict[str, str] = {}   # rows the config refused, and why (reported beside the table)


@dataclass(frozen=True)
class Row:
    """One design of the study: a config and what it is a variant of."""

    tag: str
    cfg: MemeConfig
    base: str            # the unshared, uniform row it varies ('' for single)
    share: str           # ShareConfig.describe()
    boundaries: str      # 'uniform' or 'cluster'


def hand_design(space: SearchSpace) -> MemeConfig:
    hand = space.reference
    if hand is None:
        raise UserError(f"{space.name}: the study needs the space's hand design (a 'reference:' entry)")
    return hand


BASES = ("multi-N2", "multi-N4", "hand")


def rows(space: SearchSpace, shares: tuple[str, ...] = SHARES, clustered: bool = True,
         bases: tuple[str, ...] = BASES) -> list[Row]:
    hand = hand_design(space)
    d = hand.to_dict()
    middle = d["experts"][(hand.num_experts - 1) // 2]
    probs = list(hand.resolved_probs())
    base = {k: v for k, v in d.items() if k not in ("name", "experts", "expert_probs", "boundaries")}
    single = MemeConfig.from_dict({**base, "name": "single", "experts": [middle]}, "study").validate()
    multis = [MemeConfig.from_dict({**base, "name": f"multi-N{n}", "experts": [middle] * n,
                                   "expert_probs": (probs + probs[-1:] * n)[:n]}, "study").validate()
             for n in (2, 4)]
    multis.append(MemeConfig.from_dict({**d, "name": "hand"}, "study").validate())
    unknown = sorted(set(bases) - {c.name for c in multis})
    if unknown:
        raise UserError(f"--bases: unknown {unknown}; choose from {list(BASES)}")
    out = [Row("single", single, "", "none", "uniform")]
    n_stages = hand.experts[0].num_stages
    for cfg in (c for c in multis if c.name in bases):
        for words in shares:
            share = ShareConfig.parse(words).fit(n_stages)
            tag = cfg.name if not share.any else f"{cfg.name}+{words}"
            try:
                out.append(Row(tag, dataclasses.replace(cfg, name=tag, share=share).validate(), cfg.name,
                               share.describe(), "uniform"))
            except ConfigError as exc:   # e.g. a shared stage the hand design's ratios contradict
                REFUSED[tag] = str(exc)
                log.warning("%s: not a design (%s)", tag, exc)
        if clustered:
            b = boundaries_for(space, cfg.num_experts)
            out.append(Row(f"{cfg.name}+cluster", dataclasses.replace(cfg, name=f"{cfg.name}+cluster",
                                                                        boundaries=b).validate(),
                           cfg.name, "none", "cluster"))
    return out


def check_equal_cost(rows_: list[Row]) -> dict[str, float]:
    """Per-step GFLOPs of every row within TOLERANCE of single's, or a one-line refusal."""
    g = {r.tag: cost_of_meme(r.cfg).gflops_mean for r in rows_}
    ref = g["single"]
    for tag, v in g.items():
        if abs(v / ref - 1) > TOLERANCE:
            raise UserError(f"{tag} costs {v:.3f} GFLOPs per step, single {ref:.3f}: beyond {TOLERANCE:.0%}")
    return g


def quarter_means(by_t: list[list[float]], T: int) -> list[float]:
    """Held-out loss averaged within each quarter of [0, T)."""
    out = []
    for q in range(QUARTERS):
        lo, hi = q * T / QUARTERS, (q + 1) * T / QUARTERS
        vals = [v for t, v in by_t if lo <= t < hi]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def run(space: SearchSpace, rows_: list[Row], seeds: list[int], grid: int, out: Path,
        threads: int = 1, train: bool = True) -> list[dict[str, Any]]:
    """Train every (row, seed) not yet in runs.jsonl (none when not ``train``); returns all runs."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.jsonl"
    done = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    have = {(r["tag"], r["seed"], r["config_hash"]) for r in done}
    proxy = dataclasses.replace(space.proxy, eval_timesteps=grid, eval_every=space.proxy.steps,
                                evaluator="scratch")
    todo = [(r, s) for s in seeds for r in rows_ if (r.tag, s, r.cfg.hash()) not in have] if train else []
    for r, s in tqdm(todo, desc="sharing study", unit="run"):
        res = run_trial(r.cfg, proxy, lambda step, value: False, threads=threads, seed=s)
        rec = {"tag": r.tag, "seed": s, "config_hash": r.cfg.hash(), "heldout": res.objective,
               "heldout_by_t": res.extra["heldout_by_t"], "steps": res.steps, "train_gflops": res.train_gflops,
               "params_proxy": res.params_proxy, "wall_s": round(res.wall_s, 1)}
        done.append(rec)
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    return [r for r in done if any((r["tag"], r["config_hash"]) == (x.tag, x.cfg.hash()) for x in rows_)
            and r["seed"] in seeds]


def summary(space: SearchSpace, rows_: list[Row], runs: list[dict[str, Any]], gflops: dict[str, float]) -> dict:
    T = space.diffusion.timesteps
    by = {r.tag: sorted((x for x in runs if x["tag"] == r.tag), key=lambda x: x["seed"]) for r in rows_}
    table, pending = [], []
    for r in rows_:
        vals = [x["heldout"] for x in by[r.tag]]
        if not vals:
            pending.append(r.tag)
            continue
        quarters = [quarter_means(x["heldout_by_t"], T) for x in by[r.tag]]
        s = summarize(vals)
        cost = cost_of_meme(r.cfg)
        entry = {"tag": r.tag, "num_experts": r.cfg.num_experts, "share": r.share, "boundaries": r.boundaries,
                 "cfg_boundaries": r.cfg.resolved_boundaries(), "gflops": gflops[r.tag],
                 "params_unique_M": cost.params_unique / 1e6, "params_total_M": cost.params_total / 1e6,
                 "train_steps": by[r.tag][0]["steps"] if by[r.tag] else None,
                 "train_gflops": by[r.tag][0]["train_gflops"] if by[r.tag] else None,
                 "n": s.n, "mean": s.mean, "std": s.std, "values": vals,
                 "quarters_mean": [summarize([q[i] for q in quarters]).mean for i in range(QUARTERS)],
                 "quarters_std": [summarize([q[i] for q in quarters]).std for i in range(QUARTERS)]}
        for against, key in (("single", "vs_single"), (r.base, "vs_unshared")):
            if against and against != r.tag and by.get(against):
                c = welch(vals, [x["heldout"] for x in by[against]])
                entry[key] = {"against": against, "rel_diff": c.rel_diff, "p_value": c.p_value, "verdict": c.verdict}
        table.append(entry)
    return {"space": space.name, "proxy_steps": space.proxy.steps, "batch_size": space.proxy.batch_size,
            "seeds": sorted({x["seed"] for x in runs}), "rows": table, "refused": dict(REFUSED),
            "not_run_yet": pending,
            "equal_cost": "per-step GFLOPs within 5% of single (checked); equal steps x batch for every row"}


def _verdict(c: Optional[dict]) -> str:
    if not c:
        return ""
    v = c["verdict"] if c["verdict"] == "cannot tell apart" else f"{c['verdict']} than {c['against']}"
    return f"{c['rel_diff']:+.1%} (p={c['p_value']:.2f}, {v})"


def markdown(res: dict) -> str:
    head = ["design", "N", "share", "bounds", "GFLOPs/step", "unique params (M)", "held-out (mean +- std)",
            "q1 (t<T/4)", "q2", "q3", "q4", "vs single", "vs unshared"]
    body = []
    for r in res["rows"]:
        q = [f"{m:.4f}" for m in r["quarters_mean"]]
        body.append([r["tag"], r["num_experts"], r["share"], r["boundaries"], f"{r['gflops']:.3f}",
                     f"{r['params_unique_M']:.2f}", f"{r['mean']:.5f} +- {r['std']:.5f} (n={r['n']})" if r["n"] > 1
                     else f"{r['mean']:.5f} (n=1)", *q,
                     _verdict(r.get("vs_single")), _verdict(r.get("vs_unshared")) if r["tag"] != r.get(
                         "vs_unshared", {}).get("against") else ""])
    return (f"# Sharing and clustered boundaries on {res['space']}\n\n"
            f"Proxy training: {res['proxy_steps']} steps in all at batch {res['batch_size']}, seeds {res['seeds']}; "
            f"{res['equal_cost']}. Held-out eps-MSE (lower is better); Welch t-test over seeds.\n\n"
            + markdown_table(head, body) + "\n"
            + "".join(f"\n- {tag}: refused, {why}" for tag, why in res.get("refused", {}).items())
            + (f"\n- not run yet: {', '.join(res['not_run_yet'])}" if res.get("not_run_yet") else ""))


def plot(res: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_ = res["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.3, 1]})
    ax = axes[0]
    colours = {"none": "tab:blue", "dec": "tab:orange", "enc1+dec": "tab:green"}
    for i, r in enumerate(rows_):
        key = "enc1+dec" if r["share"].startswith("enc1") else ("dec" if r["share"].startswith("dec") else "none")
        c = "tab:gray" if r["tag"] == "single" else ("tab:purple" if r["boundaries"] == "cluster" else colours[key])
        ax.barh(i, r["mean"], xerr=r["std"], color=c, alpha=0.6)
        ax.plot(r["values"], [i] * len(r["values"]), "k.", ms=4)
    single = next(r for r in rows_ if r["tag"] == "single")["mean"]
    ax.axvline(single, color="tab:gray", ls="--", lw=1)
    ax.set_yticks(range(len(rows_)), [r["tag"] for r in rows_], fontsize=8)
    ax.invert_yaxis()
    lo = min(min(r["values"]) for r in rows_ if r["values"])
    hi = max(max(r["values"]) for r in rows_ if r["values"])
    ax.set_xlim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    ax.set(xlabel="held-out eps-MSE (mean +- std, dots: seeds)", title=f"{res['space']}: equal per-step cost and steps")
    ax = axes[1]
    base = next(r for r in rows_ if r["tag"] == "single")["quarters_mean"]
    for r in rows_:
        if r["tag"] == "single":
            continue
        rel = [100 * (m / b - 1) for m, b in zip(r["quarters_mean"], base)]
        ax.plot(range(1, QUARTERS + 1), rel, marker="o", lw=1, label=r["tag"])
    ax.axhline(0, color="tab:gray", ls="--", lw=1)
    ax.set(xlabel="quarter of [0, T) (1: least noise)", ylabel="held-out vs single (%)", xticks=range(1, 5),
           title="per interval")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@main_guard
def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    p = CommandParser(prog="meme-nas sharing-study", description=__doc__.splitlines()[0])
    p.add_argument("--space", default="meme_ffhq256", help="space name or YAML (default %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (default %(default)s)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST..FIRST+SEEDS-1 (default %(default)s)")
    p.add_argument("--grid", type=int, default=20, help="held-out timesteps (default %(default)s)")
    p.add_argument("--shares", default=",".join(SHARES), help="sharings to try (default %(default)s)")
    p.add_argument("--no-cluster", action="store_true", help="skip the clustered-boundary rows")
    p.add_argument("--bases", default=",".join(BASES), help="multi-expert rows to vary (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="folder (default results/sharing-SPACE)")
    p.add_argument("--only", default=None, help="train only these rows (comma-separated tags); the report "
                                                "still lists every row")
    p.add_argument("--report-only", action="store_true",
                   help="write the summary of the runs finished so far, train nothing")
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise UserError("--seeds must be >= 1")
    space = load_space(args.space)
    rows_ = rows(space, tuple(w.strip() for w in args.shares.split(",") if w.strip()), not args.no_cluster,
                 tuple(b.strip() for b in args.bases.split(",") if b.strip()))
    gflops = check_equal_cost(rows_)
    out = args.out or Path("results") / f"sharing-{space.name}"
    t0 = time.perf_counter()
    only = {t.strip() for t in args.only.split(",")} if args.only else None
    if only and only - {r.tag for r in rows_}:
        raise UserError(f"--only: no such rows {sorted(only - {r.tag for r in rows_})}; rows: {[r.tag for r in rows_]}")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if not args.report_only:
        run(space, [r for r in rows_ if only is None or r.tag in only], seeds, args.grid, out, args.threads)
    runs = run(space, rows_, seeds, args.grid, out, train=False)
    res = summary(space, rows_, runs, gflops)
    res["command"] = "meme-nas sharing-study " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    atomic_write_json(res, out / "sharing.json")
    (out / "sharing.md").write_text(markdown(res))
    plot(res, out / "sharing.png")
    print(markdown(res))
    print(f"wrote {out}/sharing.json, sharing.md, sharing.png ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
