"""How well the weight-shared evaluator ranks, against stand-alone training (``nas.studies.fidelity --evaluator supernet``).

Three questions, each answered beside the from-scratch proxy on the same designs:

(a) **across designs and N**: the designs of an earlier ``nas.studies.fidelity`` run (``--reuse
    DIR``: their high-fidelity stand-alone seed means are reused, nothing retrained),
    ranked by their supernet score;
(b) **ratio-only, one N and macro**: single-expert chains spanning the grid (all-floor,
    all-max, Table 4's first and last experts' chains, flat ones), each trained
    stand-alone with ``--seeds`` seeds for ``--high-steps``; the from-scratch proxy is
    the same training read at ``proxy.steps`` (the prefix property), seed 0 only, as a
    search sees it;
(c) **per interval**: the same chains ranked on each interval of the t grid by their
    inherited score there, against their stand-alone loss on that interval. This tests
    MEME's premise directly: if the best split depends on t, the argmin moves between
    intervals.

Rank agreement is Spearman and Kendall with bootstrap CIs over designs (``nas.engine.stats``);
the stand-alone seed-to-seed agreement is the ceiling any evaluator can reach.
Every stand-alone run is cached in ``OUT/shared_runs.jsonl``: the same command resumes.
"""
from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from meme.common.checkpoint import atomic_write_json
from meme.common.errors import UserError
from meme.common.fastpath import fast_path
from meme.model.config import MemeConfig
from meme.model.diffusion import Diffusion
from meme.model.experts import SoftExpertSampler, build_denoiser
from meme.training.train import draw_batch, train_step, warmup_lr
from nas.engine.stats import rank_correlation
from nas.evaluators.supernet_score import SharedScorer
from nas.space.draw import ratio_choices
from nas.space.proxy import proxy_config
from nas.space.proxy_data import proxy_dataset
from nas.space.space import SearchSpace, load_space

# Single-expert chains of the default space's base-128 macro (all legal under its rules).
RATIO_DESIGNS = {
    "all-floor": ("1/8", "1/16", "1/24", "1/32"),
    "all-max": ("7/8", "7/8", "7/8", "7/8"),
    "table4-e1": ("3/4", "5/8", "1/2", "1/4"),
    "table4-e4": ("3/4", "1/4", "1/8", "1/16"),
    "flat-1/2": ("1/2", "1/2", "1/2", "1/2"),
    "flat-1/4": ("1/4", "1/4", "1/4", "1/4"),
    "steep-7/8": ("7/8", "3/8", "1/8", "1/16"),
    "mid-fall": ("1/2", "1/4", "1/8", "1/16"),
}


@dataclass(frozen=True)
class StandAlone:
    name: str
    config_yaml: str
    space: str
    seed: int
    steps: int
    read_at: tuple[int, ...]
    supernet: str

    def key(self) -> str:
        return json.dumps([self.name, MemeConfig.from_yaml(self.config_yaml).hash(), self.seed, self.steps,
                           list(self.read_at)])


def train_standalone(run: StandAlone) -> dict[str, Any]:
    """Train one design from scratch as a trial does (same seeds, data, optimiser); per-t losses at ``read_at``."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    space = load_space(run.space)
    proxy = space.proxy.from_scratch()
    scorer = SharedScorer(run.supernet, proxy)
    cfg = proxy_config(MemeConfig.from_yaml(run.config_yaml), proxy)
    train = proxy_dataset(proxy.data, proxy.shape(), "train", proxy.limit_data)
    dev = torch.device("cpu")
    torch.manual_seed(run.seed)
    model = build_denoiser(cfg)
    fp = fast_path(dev, proxy.precision, model)
    fp.prepare(model, dev)
    diffusion = Diffusion(cfg.diffusion)
    sampler = SoftExpertSampler(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=proxy.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(run.seed + 1)
    out: dict[str, Any] = {"name": run.name, "seed": run.seed, "per_t": {}}
    model.train()
    for step in range(1, run.steps + 1):
        e = (step - 1) % cfg.num_experts
        batch = draw_batch(train, sampler, e, proxy.batch_size, gen, fp, dev)
        train_step(model.experts[e], model.experts[e].parameters(), batch, diffusion, opt, fp,
                   warmup_lr(proxy.lr, step - 1, proxy.warmup), proxy.grad_clip)
        if step in run.read_at:
            model.eval()
            out["per_t"][str(step)] = scorer.losses(model, scorer.grid)
            model.train()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def _check_chain(space: SearchSpace, base: int, ratios) -> None:
    """Refuse a chain the space's depth rules do not allow for an expert (its first expert's rules)."""
    row: list[Fraction] = []
    for s, r in enumerate(ratios):
        legal = ratio_choices(space, base, s, row[s - 1] if s else None, None)
        if Fraction(r) not in legal:
            raise UserError(f"chain {' '.join(ratios)}: stage {s + 1} ratio {r} breaks {space.source}'s rules")
        row.append(Fraction(r))


def _corr(x, y) -> dict[str, Any]:
    c = rank_correlation(list(x), list(y))
    return {k: {"value": v.value, "ci": [v.ci_low, v.ci_high]} for k, v in c.items()}


def run(space: SearchSpace, supernet: str, out: Path, *, reuse: Optional[Path], seeds: int, high_steps: int,
        macro: tuple[int, int, tuple[int, ...]] = (128, 2, (2, 2, 2, 2)), intervals: int = 4,
        jobs: int = 2, command: str = "") -> dict[str, Any]:
    scorer = SharedScorer(supernet, space.proxy)
    result: dict[str, Any] = {"command": command, "space": space.name, "supernet": supernet,
                              "supernet_digest": scorer.index.get("digest"),
                              "supernet_train_gflops": scorer.index.get("train_gflops_total"), "grid": scorer.grid}

    # (a) across designs: reuse an earlier study's stand-alone high-fidelity runs
    if reuse is not None:
        fid = json.loads((reuse / "fidelity.json").read_text())
        row = next(r for r in fid["rows"] if r["proxy"] == "space proxy" and r["steps"] == space.proxy.steps)
        names, shared, proxy_v, high = [], [], [], []
        for a in fid["architectures"]:
            cfg = MemeConfig.from_yaml(a["config_yaml"])
            try:
                s = scorer.score(cfg).objective
            except UserError as exc:  # a macro without a supernet
                print(f"(a) {a['name']}: skipped ({exc})")
                continue
            names.append(a["name"])
            shared.append(s)
            proxy_v.append(row["means"][a["name"]])
            high.append(a["high_mean"])
        result["a_across_designs"] = {
            "reused": str(reuse), "designs": names, "supernet": shared, "scratch_proxy_seed_mean": proxy_v,
            "high_seed_mean": high, "high": fid["high"],
            "supernet_vs_high": _corr(shared, high), "scratch_proxy_vs_high": _corr(proxy_v, high)}

    # (b) + (c): single-expert chains trained stand-alone
    base, blocks, pools = macro
    designs = {}
    for name, ratios in RATIO_DESIGNS.items():
        arch = space.arch(base, blocks, pools, ratios)
        cfg = MemeConfig(name=name, experts=(arch,), data=space.data, diffusion=space.diffusion,
                         expert_probs=(1.0,)).validate()
        _check_chain(space, base, ratios)
        designs[name] = cfg
    cache = out / "shared_runs.jsonl"
    done: dict[str, dict] = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[rec["key"]] = rec
            except (json.JSONDecodeError, KeyError):
                continue
    read_at = tuple(sorted({space.proxy.steps, high_steps}))
    runs = [StandAlone(n, c.to_yaml(), space.source, s, high_steps, read_at, supernet)
            for n, c in designs.items() for s in range(seeds)]
    todo = [r for r in runs if r.key() not in done]
    if todo:
        import multiprocessing as mp

        from tqdm import tqdm
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            for r, rec in tqdm(zip(todo, ex.map(train_standalone, todo)), total=len(todo), desc="stand-alone",
                               file=sys.stdout, disable=None):
                rec["key"] = r.key()
                done[rec["key"]] = rec
                with open(cache, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    per_t = {(r.name, r.seed, st): np.array(done[r.key()]["per_t"][str(st)]) for r in runs for st in read_at}
    names = list(designs)
    grid = scorer.grid
    shared_t = {n: np.array(scorer.arch_losses(f"b{base}-r{blocks}", proxy_config(designs[n], space.proxy).experts[0],
                                               grid)[0]) for n in names}
    hi = high_steps
    lo = space.proxy.steps

    def mean_over(n, st, idx):
        return float(np.mean([per_t[(n, s, st)][idx].mean() for s in range(seeds)]))

    all_idx = np.arange(len(grid))
    b = {"designs": names, "ratios": {n: list(RATIO_DESIGNS[n]) for n in names}, "macro": [base, blocks, list(pools)],
         "high_steps": hi, "proxy_steps": lo, "seeds": seeds,
         "supernet": [float(shared_t[n].mean()) for n in names],
         "scratch_proxy_seed0": [float(per_t[(n, 0, lo)].mean()) for n in names],
         "high_mean": [mean_over(n, hi, all_idx) for n in names],
         "high_std": [float(np.std([per_t[(n, s, hi)].mean() for s in range(seeds)], ddof=1)) if seeds > 1 else 0.0
                      for n in names]}
    b["supernet_vs_high"] = _corr(b["supernet"], b["high_mean"])
    b["scratch_proxy_vs_high"] = _corr(b["scratch_proxy_seed0"], b["high_mean"])
    if seeds > 1:
        b["high_seed_to_seed"] = _corr([per_t[(n, 0, hi)].mean() for n in names],
                                       [per_t[(n, 1, hi)].mean() for n in names])
    result["b_ratio_only"] = b

    T = scorer.diffusion.T
    c_rows = []
    for k in range(intervals):
        lo_t, hi_t = k * T // intervals, (k + 1) * T // intervals
        idx = np.array([i for i, t in enumerate(grid) if lo_t <= t < hi_t])
        if not len(idx):
            continue
        sh = [float(shared_t[n][idx].mean()) for n in names]
        hv = [mean_over(n, hi, idx) for n in names]
        pv = [float(per_t[(n, 0, lo)][idx].mean()) for n in names]
        row = {"interval": [lo_t, hi_t], "t": [grid[i] for i in idx], "supernet": sh, "high_mean": hv,
               "scratch_proxy_seed0": pv, "supernet_vs_high": _corr(sh, hv), "scratch_proxy_vs_high": _corr(pv, hv),
               "best_by_supernet": names[int(np.argmin(sh))], "best_by_high": names[int(np.argmin(hv))]}
        if seeds > 1:
            row["high_seed_to_seed"] = _corr([per_t[(n, 0, hi)][idx].mean() for n in names],
                                             [per_t[(n, 1, hi)][idx].mean() for n in names])
            # is the best split really different between intervals? margin of the best over the runner-up
            order = np.argsort(hv)
            spread = [np.std([per_t[(names[j], s, hi)][idx].mean() for s in range(seeds)], ddof=1) for j in order[:2]]
            row["best_margin_over_seed_sd"] = float((hv[order[1]] - hv[order[0]]) / max(1e-12, np.hypot(*spread)))
        c_rows.append(row)
    result["c_per_interval"] = c_rows
    atomic_write_json(result, out / "shared_fidelity.json")
    (out / "shared_fidelity.md").write_text(table(result))
    return result


def _fmt(c: dict) -> str:
    return f"{c['value']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]"


def table(r: dict[str, Any]) -> str:
    lines = [f"Supernet {r['supernet']} (digest {r['supernet_digest']}, {r['supernet_train_gflops'] / 1e3:.0f} training "
             f"TFLOPs at the proxy). Spearman / Kendall with 95% bootstrap CIs over designs.", ""]
    if "a_across_designs" in r:
        a = r["a_across_designs"]
        lines += [f"(a) {len(a['designs'])} designs across N, against stand-alone high fidelity "
                  f"(width x{a['high']['width_mult']}, {a['high']['steps']} steps, seed mean, reused from {a['reused']}):",
                  "", "| evaluator | Spearman | Kendall |", "|---|---|---|",
                  f"| supernet | {_fmt(a['supernet_vs_high']['spearman'])} | {_fmt(a['supernet_vs_high']['kendall'])} |",
                  f"| from-scratch proxy | {_fmt(a['scratch_proxy_vs_high']['spearman'])} | "
                  f"{_fmt(a['scratch_proxy_vs_high']['kendall'])} |", ""]
    b = r["b_ratio_only"]
    lines += [f"(b) {len(b['designs'])} ratio-only single-expert designs (macro {b['macro']}), against stand-alone "
              f"training for {b['high_steps']} steps ({b['seeds']} seeds, mean):", "",
              "| design | ratios | supernet | scratch proxy (seed 0) | stand-alone mean +- std |", "|---|---|---|---|---|"]
    for i, n in enumerate(b["designs"]):
        lines.append(f"| {n} | {' '.join(b['ratios'][n])} | {b['supernet'][i]:.5f} | {b['scratch_proxy_seed0'][i]:.5f} | "
                     f"{b['high_mean'][i]:.5f} +- {b['high_std'][i]:.5f} |")
    lines += ["", "| evaluator | Spearman | Kendall |", "|---|---|---|",
              f"| supernet | {_fmt(b['supernet_vs_high']['spearman'])} | {_fmt(b['supernet_vs_high']['kendall'])} |",
              f"| from-scratch proxy ({b['proxy_steps']} steps) | {_fmt(b['scratch_proxy_vs_high']['spearman'])} | "
              f"{_fmt(b['scratch_proxy_vs_high']['kendall'])} |"]
    if "high_seed_to_seed" in b:
        lines.append(f"| stand-alone seed 0 vs seed 1 (ceiling) | {_fmt(b['high_seed_to_seed']['spearman'])} | "
                     f"{_fmt(b['high_seed_to_seed']['kendall'])} |")
    lines += ["", "(c) per interval (same designs, each scored on the grid t of that interval only):", "",
              "| interval | supernet Spearman | scratch proxy Spearman | seed-to-seed | best (supernet) | best (stand-alone) | best margin / seed sd |",
              "|---|---|---|---|---|---|---|"]
    for c in r["c_per_interval"]:
        lines.append(f"| [{c['interval'][0]}, {c['interval'][1]}) | {_fmt(c['supernet_vs_high']['spearman'])} | "
                     f"{_fmt(c['scratch_proxy_vs_high']['spearman'])} | "
                     f"{_fmt(c['high_seed_to_seed']['spearman']) if 'high_seed_to_seed' in c else '-'} | "
                     f"{c['best_by_supernet']} | {c['best_by_high']} | {c.get('best_margin_over_seed_sd', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"
