"""Performance benchmarks, side by side in one process: ``python -m nas.bench``.

Runs the model benchmarks of ``meme.bench`` (fast paths, sampling, training, memory;
see there) and, here, the search's own costs:

* **search** -- time to check one candidate's MACs (no cache), and each trial engine's
  overhead per trial: (engine wall - trial body wall) / trial body wall;
* **fastpath** also times a default-space search proxy (``PROXY_ITEM``), the model a
  trial actually trains;
* **target** rows compare what was measured with the figures the project aims at.

Results go to a CSV per run and to one section per device of ``BENCHMARKS.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from meme.scaling import bench_scaling, unmeasured_gpu_rows
from meme.bench import (COLUMNS, ENGINES, NOT_MEASURED, PENDING, SECTIONS, BenchOptions, Model, Row, bench_compile, bench_fast_paths, bench_iformer, bench_memory, bench_sampling,
                        bench_training, default_options, device_name, dtype_name, format_table, matmul_peak_flops,
                        median, peak_dtypes, update_markdown, write_csv)

OPTIONAL_SECTIONS = ("scaling",)            # only with --only (several training runs of their own)
PROXY_ITEM = "search-proxy"                 # meme-table4's first expert as a default-space trial trains it


def search_proxy_model() -> Model:
    """meme-table4 scaled to the default space's proxy, at the proxy's batch: what a trial trains."""
    from meme.references import resolve
    from nas.proxy import proxy_config
    from nas.space import load_space

    proxy = load_space("meme_ffhq256").proxy
    return PROXY_ITEM, proxy_config(resolve("meme-table4"), proxy), proxy.batch_size


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def bench_macs_check(o: BenchOptions) -> list[Row]:
    """cost_of_meme on the target-shape Table 4 MEME with both caches off."""
    from meme import macs
    from meme.references import resolve

    cfg = resolve("meme-table4")   # always the search's target shape (3x64x64)
    times = []
    with _env("MEME_MACS_CACHE", "0"):
        for _ in range(max(o.repeats, 2)):
            macs.cost_of_network.cache_clear()
            t0 = time.perf_counter()
            macs.cost_of_meme(cfg)
            times.append(time.perf_counter() - t0)
    macs.cost_of_network.cache_clear()
    per = median(times)
    label = f"{cfg.data.channels}x{cfg.data.resolution}x{cfg.data.resolution} b1"
    return [
        Row("search", "macs_check", "s_per_candidate", per, "s", target="<= 1 s", shape=label,
            note=f"meme.macs.cost_of_meme, {cfg.num_experts} distinct experts, MEME_MACS_CACHE=0, lru cleared"),
        Row("search", "macs_check", "s_per_network", per / cfg.num_experts, "s", shape=label),
    ]


def _engine_settings(engine: str, space: str, trials: int, out: Path, dev: torch.device):
    from nas.budget import Budget
    from nas.space import load_space
    from nas.settings import Settings
    from nas.study import storage_url_for

    return Settings(space=load_space(space), budget=Budget(gflops=1e9), objectives=("loss",), trials=trials,
                    study_name=f"bench-{engine}", out=out, storage_url=storage_url_for(out, None),
                    seed=0, device=str(dev), cpus_per_trial=float(os.cpu_count() or 1),
                    gpus_per_trial=1.0 if dev.type == "cuda" else 0.0, progress=False)


@dataclass
class TrialTimes:
    """Per-trial times from the study: body (run_trial's own wall) and span (asked -> told)."""

    bodies: list[float]
    spans: list[float]


def _trial_times(storage, study_name: str) -> TrialTimes:
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = [t for t in study.get_trials(deepcopy=False)
              if "wall_s" in t.user_attrs and t.datetime_start and t.datetime_complete]
    return TrialTimes(bodies=[float(t.user_attrs["wall_s"]) for t in trials],
                      spans=[(t.datetime_complete - t.datetime_start).total_seconds() for t in trials])


def bench_engine(engine: str, o: BenchOptions, dev: torch.device, log: Callable[[str], None]) -> list[Row]:
    """Run a few tiny-space trials under ``engine``; overhead = (wall - body) / body."""
    label = f"{o.space} space proxy, {o.engine_trials} trials, serial"
    if engine not in o.engines:
        return [Row("search", f"engine_{engine}", "overhead", "skipped (--engines)", "%", shape=label,
                    target="<= 5% of a proxy trial")]
    rows = []
    try:
        from nas.study import open_study
        with tempfile.TemporaryDirectory(prefix=f"meme-bench-{engine}-") as tmp:
            s = _engine_settings(engine, o.space, o.engine_trials, Path(tmp), dev)
            storage, study = open_study(s, resume=False)
            if engine == "optuna":
                from nas import optuna_engine
                t0 = time.perf_counter()
                optuna_engine.run(s, study)
                wall = time.perf_counter() - t0
            else:
                from nas import ray_engine
                t0 = time.perf_counter()
                ray_engine.init_ray(None)
                startup = time.perf_counter() - t0
                rows.append(Row("search", "engine_ray", "startup", startup, "s", shape=label,
                                note="ray.init (once per search, not per trial)"))
                t0 = time.perf_counter()
                ray_engine.run(s, study, o.engine_trials)
                wall = time.perf_counter() - t0
                import ray
                ray.shutdown()
            times = _trial_times(storage, s.study_name)
            if hasattr(storage, "engine"):
                storage.engine.dispose()    # release the SQLite file before the folder goes
    except Exception as exc:  # the search is still being built: report, do not invent
        from meme.errors import one_line
        return rows + [Row("search", f"engine_{engine}", "overhead", PENDING, "%", shape=label,
                           target="<= 5% of a proxy trial", note=one_line(exc, typed=True)[:200])]
    if not times.bodies:
        return rows + [Row("search", f"engine_{engine}", "overhead", PENDING, "%", shape=label,
                           target="<= 5% of a proxy trial", note="no trial recorded wall_s")]
    body, span, n = sum(times.bodies), sum(times.spans), len(times.bodies)
    gaps = [max(sp - b, 0.0) for sp, b in zip(times.spans, times.bodies)]
    # The first trial also pays a fresh worker's start-up (a Ray actor imports torch):
    # once per worker, so the steady per-trial overhead is taken over the later trials.
    later_gaps, later_bodies = (gaps[1:], times.bodies[1:]) if n > 1 else (gaps, times.bodies)
    log(f"  engine {engine}: wall {wall:.1f} s, trial spans {span:.1f} s, trial bodies {body:.1f} s over {n} trials; "
        f"first trial overhead {gaps[0]:.2f} s, later {sum(later_gaps) / len(later_gaps):.2f} s each")
    return rows + [
        Row("search", f"engine_{engine}", "wall_per_trial", wall / n, "s", shape=label),
        Row("search", f"engine_{engine}", "body_per_trial", body / n, "s", shape=label,
            note="nas.trial.run_trial wall (user attr wall_s)"),
        Row("search", f"engine_{engine}", "fixed_startup", max(wall - span, 0.0), "s", shape=label,
            note="engine wall outside every trial's span: set-up and tear-down, once per search"),
        Row("search", f"engine_{engine}", "first_trial_overhead", gaps[0], "s", shape=label,
            note="span minus body of the first trial: includes starting a worker (once per worker)"),
        Row("search", f"engine_{engine}", "overhead_s_per_trial", sum(later_gaps) / len(later_gaps), "s",
            shape=label, note="span (asked -> told) minus body, later trials: sampler, storage, scheduling"),
        Row("search", f"engine_{engine}", "overhead", 100 * sum(later_gaps) / sum(later_bodies), "%", shape=label,
            target="<= 5% of a proxy trial", note="sum(span - body) / sum(body) over the trials after the first"),
        Row("search", f"engine_{engine}", "overhead_incl_startup", 100 * (wall - body) / body, "%", shape=label,
            note=f"(engine wall - bodies) / bodies: every start-up spread over only {n} trials"),
    ]



def bench_evaluators(o: BenchOptions, dev: torch.device, log: Callable[[str], None], k: int = 4) -> list[Row]:
    """Per-candidate scoring cost, from-scratch proxy vs the weight-shared supernet, same run.

    ``k`` random default-space candidates (one macro, seed 0; the tiny space with
    ``--quick``). The supernet is trained
    for one step only: what is timed (extract + held-out passes) does not depend on how
    well it is trained, and its one-time training cost is reported from its own FLOPs
    count. Cold = a fresh score cache (every sub-network new), warm = the same candidates
    again (every term cached). The from-scratch figure is one full proxy trial of the
    first candidate (training + held-out loss).
    """
    import optuna

    from nas.shared_eval import SharedScorer
    from nas.space import build_config, load_space
    from nas.supernet import macro_of, train_all
    from nas.trial import run_trial

    space = load_space("tiny" if o.quick else "meme_ffhq256")
    label = f"{space.name} space proxy, {k} random candidates, one macro"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    cands = []
    while len(cands) < k:
        cfg = build_config(study.ask(), space)
        if not cands or macro_of(cfg) == macro_of(cands[0]):
            cands.append(cfg)
    base, blocks = macro_of(cands[0])
    with tempfile.TemporaryDirectory(prefix="meme-bench-supernet-") as tmp:
        index = train_all(space.source, Path(tmp), steps=1, macros=f"{base}:{blocks}", device=str(dev), progress=False)
        proxy = dataclasses.replace(space.proxy, evaluator="supernet", supernet=tmp)
        t0 = time.perf_counter()
        scorer = SharedScorer(tmp, proxy, str(dev))
        cold = [scorer.score(c).wall_s for c in cands]
        cold_total = time.perf_counter() - t0        # includes loading the supernet once
        warm = [scorer.score(c).wall_s for c in cands]
    t0 = time.perf_counter()
    run_trial(cands[0], space.proxy.from_scratch(), lambda step, value: None, device=str(dev))
    scratch = time.perf_counter() - t0
    per_cold, per_warm = cold_total / k, median(warm)
    log(f"  evaluators: from scratch {scratch:.1f} s/candidate, supernet cold {per_cold:.2f} s, warm {per_warm:.3f} s")
    return [
        Row("search", "evaluator_scratch", "s_per_candidate", scratch, "s", shape=label,
            note="nas.trial.run_trial, from-scratch proxy: train + held-out loss"),
        Row("search", "evaluator_supernet", "s_per_candidate_cold", per_cold, "s", shape=label,
            note="fresh cache: load + extract + held-out passes for every expert"),
        Row("search", "evaluator_supernet", "s_per_candidate_warm", per_warm, "s", shape=label,
            note="every (t, sub-network) term cached"),
        Row("search", "evaluator_supernet", "speedup_cold", scratch / per_cold, "x", shape=label,
            target=">= 10x", note="from-scratch s / supernet cold s, this run (MACs check excluded from both)"),
        Row("search", "evaluator_supernet", "one_time_train_gflops_per_step",
            index["train_gflops_total"], "GFLOP", shape=label,
            note="supernet training, charged once per search (x --steps)"),
    ]


def target_rows(rows: list[Row], dev: torch.device, device_name: str) -> list[Row]:
    """The four targets as ratios from this run; GPU targets stay unmeasured on a CPU."""
    def find(section: str, item: str, metric: str) -> Optional[Row]:
        return next((r for r in rows if (r.section, r.item, r.metric) == (section, item, metric)), None)

    out = []
    here = "cuda" if dev.type == "cuda" else "cpu"
    s = find("sampling", "meme-table4", "img_per_s")
    out.append(Row("target", "meme-table4/ldm-l sampling", f"img_per_s_ratio ({here})",
                   s.vs_ref if s else "not run", "x", "", s.macs_ratio if s else "", ">= 3.2 (this CPU and GPU)",
                   s.shape if s else "", "eager, default fast path"))
    c = find("compile", "meme-table4/ldm-l", "img_per_s_ratio_compiled")
    if c is not None:
        out.append(Row("target", "meme-table4/ldm-l sampling", f"img_per_s_ratio compiled ({here})", c.value, "x",
                       "", c.macs_ratio, ">= 3.2 on GPU", c.shape, "every expert compiled (meme.sample --compile)"))
    m = find("training", "iunet-expert0", "mfu")
    out.append(Row("target", "iU-Net expert training", f"mfu ({here})", m.value if m else "not run", "%",
                   target=">= 35% on H100/H200 bf16", shape=m.shape if m else "", note=m.note if m else ""))
    if dev.type != "cuda":
        out.append(Row("target", "meme-table4/ldm-l sampling", "img_per_s_ratio (H100/H200)", NOT_MEASURED, "x",
                       target=">= 3.2", shape="3x64x64 b32 50 steps", note="needs a GPU run"))
        out.append(Row("target", "iU-Net expert training", "mfu (H100/H200 bf16)", NOT_MEASURED, "%",
                       target=">= 35%", shape="3x64x64 b64", note="needs a GPU run"))
    f = find("iformer", "meme-table4 expert 1", "time_share_fast")
    out.append(Row("target", "iFormer blocks", f"time_share/macs_share ({here})", f.vs_ref if f else "not run", "x",
                   target="<= 1.5", shape=f.shape if f else "", note="fast mixer; iformer section"))
    c = find("search", "macs_check", "s_per_candidate")
    out.append(Row("target", "MACs check", "s_per_candidate", c.value if c else "not run", "s", target="<= 1 s",
                   shape=c.shape if c else ""))
    r = find("search", "evaluator_supernet", "speedup_cold")
    out.append(Row("target", "supernet evaluator", "speedup_per_candidate", r.value if r else "not run", "x",
                   target=">= 10x", shape=r.shape if r else "", note=r.note if r else ""))
    for e in ENGINES:
        r = find("search", f"engine_{e}", "overhead")
        out.append(Row("target", f"engine overhead ({e})", "pct_of_trial", r.value if r else "not run", "%",
                       target="<= 5%", shape=r.shape if r else "", note=r.note if r else ""))
    return out



# ---- driver ----------------------------------------------------------------------------

def run_bench(o: BenchOptions, log: Callable[[str], None] = print) -> tuple[list[Row], dict[str, str]]:
    """Every requested section, in one process; returns rows and run metadata."""
    dev = torch.device(o.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    name = device_name(dev)
    meta = {"device": name, "device_type": dev.type, "torch": torch.__version__,
            "threads": str(torch.get_num_threads()), "date": _dt.date.today().isoformat(),
            "mode": "quick" if o.quick else "full", "only": "" if o.only == SECTIONS else ",".join(o.only),
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    rows: list[Row] = []
    peaks = {}
    for dtype in peak_dtypes(dev):
        peaks[dtype] = matmul_peak_flops(dev, o.matmul_n, dtype)
        rows.append(Row("device", name, f"matmul_peak_{dtype_name(dtype)}", peaks[dtype] / 1e12, "TFLOP/s",
                        shape=f"{o.matmul_n}^3",
                        note=f"torch {torch.__version__}, {torch.get_num_threads()} threads"))
        log(f"device: {name}; measured {dtype_name(dtype)} matmul peak {peaks[dtype] / 1e12:.2f} TFLOP/s")
    eager_ips: dict[str, float] = {}
    if "fastpath" in o.only:
        log("fast paths ...")
        rows += bench_fast_paths(o, dev, log, extra=[search_proxy_model()])
        rows += bench_iformer(o, dev, log)
    if "sampling" in o.only:
        log("sampling ...")
        r = bench_sampling(o, dev, log)
        rows += r
        eager_ips = {x.item: x.value for x in r if x.metric == "img_per_s"}
    if "training" in o.only:
        log("training ...")
        rows += bench_training(o, dev, peaks, log)
    if "memory" in o.only:
        log("memory ...")
        rows += bench_memory(o, dev, log)
    if "search" in o.only:
        log("search ...")
        rows += bench_macs_check(o)
        for e in ENGINES:
            rows += bench_engine(e, o, dev, log)
        rows += bench_evaluators(o, dev, log)
    if "scaling" in o.only:
        log("scaling ...")
        rows += bench_scaling(o.device, max(o.train_steps, 4) * 6, o.train_batch, log=log)
        rows += unmeasured_gpu_rows()
    if o.compile:
        log("compile ...")
        rows += bench_compile(o, dev, eager_ips, log)
    if set(o.only) - set(OPTIONAL_SECTIONS):
        rows += target_rows(rows, dev, name)
    return rows, meta


def markdown_section(rows: list[Row], meta: dict[str, str], command: str) -> tuple[str, str]:
    from meme.cli import markdown_table

    key = (f"{meta['device_type']}: {meta['device']}" + (" (quick)" if meta["mode"] == "quick" else "")
           + (f" ({meta['only']})" if meta.get("only") else ""))
    table = markdown_table(COLUMNS, ([r.as_dict()[c] for c in COLUMNS] for r in rows)).rstrip()
    body = (f"<!-- bench:{key} -->\n## {meta['device']}" + (" -- quick mode" if meta["mode"] == "quick" else "")
            + (f" -- {meta['only']} only" if meta.get("only") else "")
            + f"\n\n- date: {meta['date']}\n- torch {meta['torch']}, {meta['threads']} threads\n"
            f"- load average at start (1/5/15 min): {meta['load']} -- a shared machine makes CPU timings noisy\n"
            f"- command: `{command}`\n\n{table}\n<!-- /bench -->\n")
    return key, body


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nas.bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="CPU-sized run: 3x32x32, batch 4, 4 steps, 2 repeats")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for the CSV")
    p.add_argument("--md", type=Path, default=Path("results/BENCHMARKS.md"), help="markdown file to update")
    p.add_argument("--no-md", action="store_true", help="do not touch the markdown file")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd experts (not with --quick)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma list of {','.join(SECTIONS)}, or {','.join(OPTIONAL_SECTIONS)} (not in the default: "
                        f"1 vs 2 processes of meme.train)")
    p.add_argument("--engines", default=",".join(ENGINES), help="trial engines to time (optuna,ray)")
    p.add_argument("--space", default="tiny", help="search space whose proxy trial the engines run")
    for flag, kind in (("resolution", int), ("batch", int), ("steps", int), ("repeats", int), ("warmup", int),
                       ("train-batch", int), ("train-steps", int), ("matmul-n", int), ("engine-trials", int)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="override the mode's default")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from meme.cli import UserError, main_guard

    @main_guard
    def run(argv):
        args = parse_args(argv)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for, but CUDA is not available here")
        only = tuple(s.strip() for s in args.only.split(",") if s.strip())
        bad = [s for s in only if s not in SECTIONS + OPTIONAL_SECTIONS]
        if bad:
            raise UserError(f"--only: unknown section(s) {bad}; choose from {list(SECTIONS + OPTIONAL_SECTIONS)}")
        engines = tuple(s.strip() for s in args.engines.split(",") if s.strip())
        if any(e not in ENGINES for e in engines):
            raise UserError(f"--engines: choose from {list(ENGINES)}")
        o = default_options(device, args.quick)
        over = {k.replace("-", "_"): getattr(args, k.replace("-", "_"))
                for k in ("resolution", "batch", "steps", "repeats", "warmup", "train-batch", "train-steps",
                          "matmul-n", "engine-trials")}
        o = dataclasses.replace(o, only=only, engines=engines, compile=args.compile, space=args.space,
                                **{k: v for k, v in over.items() if v is not None})
        if o.steps < 4:
            raise UserError("--steps must be >= 4 so that every expert of a 4-expert MEME is timed")
        t0 = time.perf_counter()
        rows, meta = run_bench(o, log=lambda s: print(s, file=sys.stderr, flush=True))
        print(format_table(rows))
        stem = f"bench-{meta['device_type']}{'-quick' if o.quick else ''}-{meta['date']}"
        path = write_csv(rows, args.out / f"{stem}.csv")
        command = "python -m nas.bench " + " ".join(argv if argv is not None else sys.argv[1:])
        if not args.no_md:
            key, section = markdown_section(rows, meta, command.strip())
            update_markdown(args.md, key, section, cuda=meta["device_type"] == "cuda")
        print(f"\n{meta['device']}, torch {meta['torch']}; {time.perf_counter() - t0:.0f} s; csv: {path}"
              + ("" if args.no_md else f"; markdown: {args.md}"))
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
