"""Performance benchmarks, side by side in one process: ``python -m nas.bench``.

Runs the model benchmarks of ``meme.speed.model_bench`` and ``meme.speed.forward_bench`` (fast paths,
iFormer blocks, sampling, training, memory; see there), the search's own costs
(``nas.bench.search_costs``) and:

* **fastpath** also times a default-space search proxy (``PROXY_ITEM``), the model a
  trial actually trains;
* **target** rows compare what was measured with the figures the project aims at.

Results go to a CSV per run and to one section per device of ``BENCHMARKS.md``; until a
CUDA run is recorded there, a note (``GPU_PENDING``) says what no GPU has measured yet.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from meme.common.command import CommandParser, add_fast_path_flag, main_guard
from meme.common.errors import UserError
from meme.common.fastpath import fast_path_enabled, set_up_cuda
from meme.common.markdown import markdown_table
from meme.model.references import resolve
from meme.speed.bench_report import COLUMNS, NOT_MEASURED, Row, format_table, update_markdown, write_csv
from meme.speed.forward_bench import Model, bench_fast_paths, bench_iformer, bench_iformer_budget, bench_mixers
from meme.speed.model_bench import bench_compile, bench_memory, bench_sampling, bench_training
from meme.speed.scaling import bench_scaling, unmeasured_gpu_rows
from meme.speed.timing import device_name, dtype_name, matmul_peak_flops, peak_dtypes
from nas.bench.search_costs import (
    ENGINES,
    SECTIONS,
    SearchBenchOptions,
    bench_engine,
    bench_evaluators,
    bench_macs_check,
    bench_supernet_search,
    bench_trials_at_once,
    default_options,
)
from nas.space.proxy import proxy_config
from nas.space.space import load_space

OPTIONAL_SECTIONS = ("scaling",)            # only with --only (several training runs of their own)
PROXY_ITEM = "search-proxy"                 # meme-table4's first expert as a default-space trial trains it

MD_HEADER = """# Benchmarks

Written by `python -m nas.bench` (one section per device; a rerun replaces its section).
Timings are medians after warm-up (CUDA events on GPU, perf_counter on CPU). `vs_ref` is
the measured ratio against LDM-L, `macs_ratio` the ideal one from `meme.model.macs` (GMACs per
step, attention included). Figures a run could not measure say so; none are estimated.
"""

GPU_PENDING = f"""<!-- bench:cuda (pending) -->
## GPU (H100 / H200): {NOT_MEASURED}

No GPU run has been recorded yet. To fill this section on a CUDA machine:

    python -m nas.bench --device cuda --compile

| target | value |
|---|---|
| meme-table4 / ldm-l sampling img/s at 3x64x64 b32 (target >= 3.2) | {NOT_MEASURED} |
| iU-Net expert training MFU, bf16 (target >= 35%) | {NOT_MEASURED} |
| peak device memory, normal vs low-memory sampling | {NOT_MEASURED} |
| torch.compile time and steady-state gain (sampling and training) | {NOT_MEASURED} |
| fast paths: bf16 + channels_last and compiled speed-ups, iU-Net / LDM-L ratio realised | {NOT_MEASURED} |
<!-- /bench -->
"""


def search_proxy_model() -> Model:
    """meme-table4 scaled to the default space's proxy, at the proxy's batch: what a trial trains."""
    proxy = load_space("meme_ffhq256").proxy
    return PROXY_ITEM, proxy_config(resolve("meme-table4"), proxy), proxy.batch_size


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
                       "", c.macs_ratio, ">= 3.2 on GPU", c.shape, "every expert compiled (meme.sampling.sample --compile)"))
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
    f = next((r for r in rows if r.section == "iformer" and r.metric.startswith("iformer_blocks_ms_b")
              and r.metric[-1].isdigit()), None)
    if f is not None:
        out.append(Row("target", "iFormer blocks", f"time_share/macs_share at the sampling batch ({here})", f.vs_ref,
                       "x", target="<= 1.5", shape=f.shape, note="blocks left out and timed by difference"))
    c = find("search", "macs_check", "s_per_candidate")
    out.append(Row("target", "MACs check", "s_per_candidate", c.value if c else "not run", "s", target="<= 1 s",
                   shape=c.shape if c else ""))
    r = find("search", "evaluator_supernet", "speedup_cold")
    out.append(Row("target", "supernet evaluator", "speedup_per_candidate", r.value if r else "not run", "x",
                   target=">= 10x", shape=r.shape if r else "", note=r.note if r else ""))
    r = find("search", "supernet_search_optuna", "distinct_per_min")
    out.append(Row("target", "supernet search (default engine)", "distinct_in_420s",
                   r.value * 7 if r and isinstance(r.value, float) else "not run", "",
                   target=">= 300", shape=r.shape if r else "", note="distinct_per_min x 7"))
    for e in ENGINES:
        r = find("search", f"engine_{e}", "overhead")
        out.append(Row("target", f"engine overhead ({e})", "pct_of_trial", r.value if r else "not run", "%",
                       target="<= 5%", shape=r.shape if r else "", note=r.note if r else ""))
    return out



# ---- driver ----------------------------------------------------------------------------

def run_meta(o: SearchBenchOptions, dev: torch.device) -> dict[str, str]:
    """Where and how this run measures: the device, torch, threads, date, mode, load."""
    return {"device": device_name(dev), "device_type": dev.type, "torch": torch.__version__,
            "threads": str(torch.get_num_threads()), "date": _dt.date.today().isoformat(),
            "mode": "quick" if o.quick else "full", "only": "" if o.only == SECTIONS else ",".join(o.only),
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def run_bench(o: SearchBenchOptions, log: Callable[[str], None] = print,
              done: Callable[[list[Row]], None] = lambda rows: None) -> list[Row]:
    """Every requested section, in one process; returns the rows (``run_meta`` says where).

    ``done`` is called with the rows so far after each section and once more with the
    target rows, so that a run stopped part-way (a time limit on a lent GPU, Ctrl-C)
    keeps what it finished.
    """
    dev = torch.device(o.device)
    if dev.type == "cuda":
        set_up_cuda(fast_path_enabled())   # what every command's fast path sets (meme.common.fastpath)
    name = device_name(dev)
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
        done(rows)
        rows += bench_iformer(o, dev, log)
        rows += bench_iformer_budget(o, dev, log)
        done(rows)
        rows += bench_mixers(o, dev, log)
        done(rows)
    if "sampling" in o.only:
        log("sampling ...")
        r = bench_sampling(o, dev, log)
        rows += r
        eager_ips = {x.item: x.value for x in r if x.metric == "img_per_s"}
        done(rows)
    if "training" in o.only:
        log("training ...")
        rows += bench_training(o, dev, peaks, log)
        done(rows)
    if "memory" in o.only:
        log("memory ...")
        rows += bench_memory(o, dev, log)
        done(rows)
    if "search" in o.only:
        log("search ...")
        rows += bench_macs_check(o)
        for e in ENGINES:
            rows += bench_engine(e, o, dev, log)
        rows += bench_trials_at_once(o, dev, log)
        done(rows)
        rows += bench_evaluators(o, dev, log)
        rows += bench_supernet_search(o, dev, log)
        done(rows)
    if "scaling" in o.only:
        log("scaling ...")
        rows += bench_scaling(o.device, max(o.train_steps, 4) * 6, o.train_batch, log=log)
        rows += unmeasured_gpu_rows()
        done(rows)
    if o.compile:
        log("compile ...")
        rows += bench_compile(o, dev, eager_ips, log)
        done(rows)
    if set(o.only) - set(OPTIONAL_SECTIONS):
        rows += target_rows(rows, dev, name)
    done(rows)
    return rows


def markdown_section(rows: list[Row], meta: dict[str, str], command: str) -> tuple[str, str]:
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
    p = CommandParser(prog="meme-nas bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="CPU-sized run: 3x32x32, batch 4, 4 steps, 2 repeats")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for the CSV")
    p.add_argument("--md", type=Path, default=Path("results/BENCHMARKS.md"), help="markdown file to update")
    p.add_argument("--no-md", action="store_true", help="do not touch the markdown file")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd experts (not with --quick)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma list of {','.join(SECTIONS)}, or {','.join(OPTIONAL_SECTIONS)} (not in the default: "
                        f"1 vs 2 processes of meme.training.train)")
    p.add_argument("--engines", default=",".join(ENGINES), help="trial engines to time (optuna,ray)")
    p.add_argument("--space", default="tiny", help="search space whose proxy trial the engines run")
    for flag, kind in (("resolution", int), ("batch", int), ("steps", int), ("repeats", int), ("warmup", int),
                       ("train-batch", int), ("train-steps", int), ("matmul-n", int), ("engine-trials", int)):
        p.add_argument(f"--{flag}", type=kind, default=None, help="override the mode's default")
    p.add_argument("--sampling-batches", default=None,
                   help="comma list of sampling batches beside 1 and --batch (default: 8,128 on a GPU, none on a CPU)")
    p.add_argument("--train-batches", default=None,
                   help="comma list of iU-Net expert training batches beside --train-batch (default: 256 on a GPU)")
    add_fast_path_flag(p)
    return p.parse_args(argv)


def int_list(text: Optional[str], flag: str) -> tuple[int, ...]:
    """'8,128' -> (8, 128); None -> () (the mode's default)."""
    if text is None:
        return ()
    try:
        out = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} takes a comma list of whole numbers, got {text!r}") from None
    if not out or min(out) < 1:
        raise UserError(f"{flag} takes batches >= 1, got {text!r}")
    return out


def main(argv: Optional[list[str]] = None) -> int:
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
                                sampling_batches=int_list(args.sampling_batches, "--sampling-batches"),
                                train_batches=int_list(args.train_batches, "--train-batches"),
                                **{k: v for k, v in over.items() if v is not None})
        if o.steps < 4:
            raise UserError("--steps must be >= 4 so that every expert of a 4-expert MEME is timed")
        t0 = time.perf_counter()
        meta = run_meta(o, torch.device(o.device))
        only = f"-{meta['only'].replace(',', '-')}" if meta.get("only") else ""   # a partial run keeps the full one's CSV
        stem = f"bench-{meta['device_type']}{'-quick' if o.quick else ''}{only}-{meta['date']}"
        path = args.out / f"{stem}.csv"
        rows = run_bench(o, log=lambda s: print(s, file=sys.stderr, flush=True),
                         done=lambda rows_so_far: write_csv(rows_so_far, path))
        print(format_table(rows))
        command = "python -m nas.bench " + " ".join(argv if argv is not None else sys.argv[1:])
        if not args.no_md:
            key, section = markdown_section(rows, meta, command.strip())
            update_markdown(args.md, key, section, MD_HEADER, GPU_PENDING)
        print(f"\n{meta['device']}, torch {meta['torch']}; {time.perf_counter() - t0:.0f} s; csv: {path}"
              + ("" if args.no_md else f"; markdown: {args.md}"))
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
