"""Architecture search over timestep experts: ``python -m nas.search --budget-gflops 95``.

Samples MEME candidates from a search space (``search_spaces/*.yaml``), rejects those
over the per-step compute budget before any training, trains the rest on a small proxy
(all experts, soft-expert sampling), and records everything in one Optuna study that
``optuna-dashboard`` opens. Outputs in ``results/<study>/``: optuna.db, trials.csv,
pareto.png, best.yaml (loadable by ``meme.training.train``), reference.json.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from tqdm import tqdm

from meme.common.checkpoint import atomic_write_json
from meme.common.command import CommandParser, add_fast_path_flag, main_guard
from meme.common.device import pick_device
from meme.common.errors import UserError, one_line
from meme.data.dataset import load_data
from meme.data.latents import is_latent_file
from meme.model.config import MemeConfig
from meme.model.supernet import load_index
from meme.speed.latency import Setting, measure_meme
from nas import package_version
from nas.engine import optuna_engine, report
from nas.engine import rerank as rr
from nas.engine.heartbeat import Heartbeat
from nas.engine.replicates import default_jobs
from nas.engine.settings import STALE_AFTER_S, Deadline, Settings
from nas.engine.study import counted, open_study, sampler_name, storage_url_for
from nas.evaluators import reference as ref_mod
from nas.space.budget import LatencyBudget, check_feasible, check_feasible_ms, reference_costs, resolve_budget
from nas.space.draw import clustered_boundaries
from nas.space.latency_table import space_table
from nas.space.space import DATA_REQUIRED, DEFAULT_SPACE, SearchSpace, load_space

EXECUTORS = ("ray", "optuna")


class _Parser(CommandParser):
    """Bad flags -> one-line 'error: ...' and exit 2 (argparse prints the usage too)."""

    def error(self, message: str):
        raise UserError(f"{message} (see python -m nas.search --help)")


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.tune") is not None


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m nas.search", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"meme-nas {package_version()}")
    p.add_argument("--space", default=DEFAULT_SPACE, help="search space YAML or name in search_spaces/ (default %(default)s)")
    b = p.add_argument_group("budget")
    b.add_argument("--budget-gflops", type=float, default=None, help="GFLOPs per denoising step at the target shape")
    b.add_argument("--budget-like", default=None, help="take the budget from a reference config (ldm-s, meme-table4, ...)")
    b.add_argument("--budget-mode", default="mean", choices=("mean", "max"),
                   help="'mean' (interval-weighted, default) or 'max' (every expert)")
    b.add_argument("--budget-ms", type=float, default=None,
                   help="milliseconds per denoising step at batch 1 on the trial device, priced by its latency "
                        "table (alone or beside a GFLOPs budget)")
    b.add_argument("--latency-table", default=None,
                   help="latency table JSON (meme-nas latency-table table); default: the one in the latency cache "
                        "for this device, built now when missing")
    r = p.add_argument_group("run")
    r.add_argument("--data", default=None,
                   help="your training data: a folder of images (center-cropped and resized to the space's "
                        "resolutions), a latent file, or fashion-mnist; replaces the space's target.dataset and, "
                        "for images, its proxy.data; recorded in the study, so promote trains on it "
                        "(default: the space's)")
    r.add_argument("--trials", type=int, default=None, help="trials in the study, rejected ones included (default: space's)")
    r.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole job, re-rank included: new trials stop early enough for the "
                        "re-rank to fit (default: the space's)")
    r.add_argument("--objective", default="loss", choices=("loss", "fid"),
                   help="'loss' (held-out denoising loss, default) or 'fid'")
    r.add_argument("--sampler", default="auto", choices=("auto", "tpe", "nsga2", "random"),
                   help="'auto': NSGA-II for a Pareto search or the supernet evaluator (whose near-equal scores "
                        "make TPE re-propose its best designs), TPE otherwise; 'random': uniform draws, the "
                        "baseline a sampler must beat")
    r.add_argument("--evaluator", default=None, choices=("scratch", "supernet"),
                   help="'scratch' (train each candidate on the proxy) or 'supernet' (score its experts as "
                        "sub-networks of --supernet DIR); default: the space's proxy.evaluator")
    r.add_argument("--supernet", default=None, help="trained supernet directory (meme-nas supernet train)")
    r.add_argument("--finetune-steps", type=int, default=None,
                   help="supernet evaluator: fine-tune steps in all before scoring (default: the space's, 0)")
    r.add_argument("--objectives", default=None,
                   help="multi-objective, 'loss,gflops' or 'loss,latency' (NSGA-II, Pareto front)")
    r.add_argument("--executor", default=None, choices=EXECUTORS,
                   help="'ray' (default when installed) or 'optuna' (default for a supernet search on one "
                        "machine: a pool of score workers, one per core)")
    r.add_argument("--study", default=None, help="study name (default <space>-b<budget>)")
    r.add_argument("--out", default="results", help="results root; the study lives in OUT/<study> (default %(default)s)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted study (finished trials are kept)")
    r.add_argument("--seed", type=int, default=None, help="sampler and training seed (default: space's proxy seed)")
    r.add_argument("--sampler-seed", type=int, default=None,
                   help="the sampler's seed alone (default: --seed): repeat a search with the same evaluator, e.g. "
                        "the same supernet scores, to see how the sampler's result spreads")
    r.add_argument("--device", default=None, help="torch device for trials (default: cuda when available)")
    r.add_argument("--no-reference", action="store_true", help="skip training the paper's Table 4 reference")
    r.add_argument("--rerank-top", type=int, default=3,
                   help="re-train the K best trials and the reference on fresh seeds at the end (0: off; default 3)")
    r.add_argument("--rerank-seeds", type=int, default=3, help="seeds per re-ranked design (default %(default)s)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    c = p.add_argument_group("cluster")
    c.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPU cores reserved per trial (default %(default)s)")
    c.add_argument("--gpus-per-trial", type=float, default=None,
                   help="fractions allowed (default, when the Ray cluster has GPUs: 1 / --trials-at-once, or 1 / "
                        "what one GPU holds, measured on a worker's GPU)")
    c.add_argument("--trials-at-once", type=int, default=None,
                   help="trained trials at once on one device: with --executor optuna, worker processes on this "
                        "machine's device; under Ray, --gpus-per-trial 1/N (default on a GPU: as many as one proxy "
                        "trial's measured memory and busy time allow; on a CPU 1)")
    c.add_argument("--address", default=None, help="Ray cluster to join (default $RAY_ADDRESS, else local)")
    c.add_argument("--stale-after", type=float, default=STALE_AFTER_S,
                   help="seconds a RUNNING trial of another driver may go unstamped before it is failed as "
                        "lost (default %(default)s)")
    c.add_argument("--storage", default=None, help="Optuna RDB URL (postgresql://..., mysql://...); default sqlite in OUT/<study>")
    add_fast_path_flag(p)
    return p.parse_args(argv)


def parse_objectives(args) -> tuple[str, ...]:
    objs = tuple(o.strip() for o in (args.objectives or args.objective).split(",") if o.strip())
    if not objs or objs[0] not in ("loss", "fid") or len(objs) > 2 or (len(objs) == 2 and objs[1] not in
                                                                       ("gflops", "latency")):
        raise UserError(f"objectives must be 'loss' or 'fid', optionally followed by ',gflops' or ',latency'; "
                        f"got {','.join(objs)!r}")
    return objs


def dashboard_command(url: str, out: Path) -> str:
    """How to open this study in optuna-dashboard (our wrapper refuses a missing database)."""
    return f"meme-nas dashboard {out if url.startswith('sqlite') else url}"


@main_guard
def main(argv=None) -> int:
    """Check the request, open the study, run the trials, then write outputs and re-rank."""
    t_start = time.perf_counter()
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    s, refs = make_settings(args)
    executor = choose_executor(args, s.space.proxy.evaluator)
    job = Deadline(s.time_budget)  # the whole job: trials, reference and re-rank
    storage, study = open_study(s, args.resume)
    done = counted(study)
    print(f"study {s.study_name}: {done}/{s.trials} trials done; executor {executor}; "
          f"sampler {sampler_name(s)}; objective{'s' if s.multi else ''} {','.join(s.objectives)}; {describe_proxy(s)}")
    print(f"watch it:  {dashboard_command(s.storage_url, s.out)}")

    ref_cfg = None if args.no_reference else s.space.reference
    rerank_on = args.rerank_top > 0 and args.rerank_seeds > 0
    runs = rerank_runs(args.rerank_top, ref_cfg is not None, args.rerank_seeds) if rerank_on else 0
    jobs = default_jobs(s.device)
    scratch_s = (scratch_run_s(load_index(s.space.proxy.supernet), s.space.proxy.steps)
                 if s.space.proxy.evaluator == "supernet" else 0.0)
    if scratch_s and runs and s.time_budget:
        kept = rerank_reserve(study, runs, jobs, scratch_s=scratch_s)
        print(f"time budget {s.time_budget:.0f} s: {kept:.0f} s kept for the re-rank ({runs} from-scratch runs of "
              f"~{scratch_s:.0f} s, by the supernet's training speed); the trials get the rest"
              + ("" if kept < 0.75 * s.time_budget else
                 " -- raise --time-budget or lower --rerank-top / --rerank-seeds to search longer"))
    trials_deadline = job.holding_back(lambda: rerank_reserve(study, runs, jobs, scratch_s=scratch_s))
    with storage_errors(s.storage_url), Heartbeat(storage, s.study_name, stale_after=s.stale_after) as beat:
        reference = run_trials(s, study, executor, ref_cfg, remaining=max(0, s.trials - done), beat=beat,
                               deadline=trials_deadline)
        beat.wait_for_others(study)  # trials a killed driver left RUNNING: failed once stale
        if beat.cleaned:
            print(f"{len(beat.cleaned)} trial(s) left RUNNING by a stopped driver marked FAIL: {beat.cleaned}")
    _outputs(study, s, reference, refs)
    if rerank_on:
        _rerank(study, s, ref_cfg, args.rerank_top, args.rerank_seeds, job)
    print(f"wall time {time.perf_counter() - t_start:.0f} s")
    print(f"open the study:  {dashboard_command(s.storage_url, s.out)}")
    return 0


def rerank_runs(top: int, with_reference: bool, seeds: int) -> int:
    return (top + int(with_reference)) * seeds


def rerank_reserve(study: optuna.Study, runs: int, jobs: int, margin: float = 1.25, scratch_s: float = 0.0) -> float:
    """Seconds to keep back for the re-rank and for the trials still running when the last
    one starts: waves of ``jobs`` runs, each as long as the study's median trained trial
    (same proxy, same steps; measured on this machine under its present load).

    Trials the supernet scored trained nothing, so they say nothing of a re-rank run;
    then ``scratch_s`` (``scratch_run_s``) prices one, and a scored trial still running
    is about a second, so no extra wave is kept for it."""
    walls = [float(t.user_attrs["wall_s"]) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
             if "wall_s" in t.user_attrs and t.user_attrs.get("duplicate_of") is None
             and t.user_attrs.get("evaluator") != "supernet"]
    waves = math.ceil(runs / max(1, jobs))
    if walls:
        return margin * statistics.median(walls) * (waves + 1)
    return margin * scratch_s * waves


def scratch_run_s(index: dict, steps: int) -> float:
    """One from-scratch proxy run's seconds, read from a supernet's own training on this
    space's proxy: the median macro's seconds per sub-network step x ``steps``."""
    per = [e["wall_s"] / (e["steps"] * e["subnets_per_step"]) for e in index.get("macros", {}).values()
           if e.get("steps") and e.get("subnets_per_step")]
    return statistics.median(per) * steps if per else 0.0


def choose_executor(args, evaluator: str = "scratch") -> str:
    """Ray Tune when installed (and the cluster answers), else the plain Optuna loop.

    A supernet search on this machine alone (no --address, no $RAY_ADDRESS) scores in
    the Optuna engine's worker pool: a Tune trial costs more than the one-second score it
    would run (README, "supernet evaluator": 2x the candidates in the same time)."""
    cluster = bool(args.address or os.environ.get("RAY_ADDRESS"))
    local_scores = evaluator == "supernet" and not cluster
    executor = args.executor or ("ray" if ray_available() and not local_scores else "optuna")
    if executor == "ray" and not ray_available():
        raise UserError("--executor ray: Ray Tune is not installed here; use --executor optuna")
    if executor == "ray" and cluster:
        from nas.engine.ray_engine import check_reachable  # Ray is optional: imported only when asked for
        check_reachable(args.address or os.environ["RAY_ADDRESS"])
    return executor


def make_settings(args) -> tuple[Settings, dict]:
    """Flags + space -> Settings; prints the budget and the reference costs; refuses the impossible."""
    if args.trials is not None and args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    if args.cpus_per_trial <= 0 or (args.gpus_per_trial is not None and args.gpus_per_trial < 0):
        raise UserError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    if args.trials_at_once is not None and args.trials_at_once < 1:
        raise UserError(f"--trials-at-once must be >= 1, got {args.trials_at_once}")
    objectives = parse_objectives(args)
    space = load_space(args.space)
    if args.seed is not None:
        space = dataclasses.replace(space, proxy=dataclasses.replace(space.proxy, seed=args.seed))
    space = with_evaluator(with_data(space, args.data), args)
    budget = resolve_budget(args.budget_gflops, args.budget_like, args.budget_mode, args.budget_ms)
    latency = latency_budget(space, args, budget.mode, objectives)

    refs = reference_costs(budget.mode)
    print(f"budget: {budget.describe()}")
    print("  reference costs (GFLOPs per step, attention included; paper 'MACs' column = 3 x hook GMACs):")
    for name, c in refs.items():
        print(f"    {name:<12} {c.gflops:>8.2f} GFLOPs  {c.params / 1e6:>7.1f}M params  paper {c.paper_units:>6.1f}G")
    if budget.bounded:
        cmin = check_feasible(space, budget)
        print(f"space {space.name} ({space.source}): cheapest candidate {cmin:.2f} GFLOPs -- budget is feasible")
    if latency is not None:
        print(f"time budget: {latency.describe()}")
        fastest = check_feasible_ms(space, latency)
        print(f"space {space.name}: fastest candidate {fastest:.2f} ms per step by the table"
              + (" -- time budget is feasible" if latency.ms is not None else ""))
    if space.boundaries.mode == "cluster":   # once, before any trial: workers then read the cached result
        for n in sorted(n for n in space.num_experts if n > 1):
            print(f"  clustered boundaries for N={n}: {list(clustered_boundaries(space, n))} (nas.space.clusters)")

    time_budget = args.time_budget if args.time_budget is not None else space.defaults.get("time_budget")
    if args.stale_after <= 0:
        raise UserError(f"--stale-after must be > 0 seconds, got {args.stale_after}")
    if time_budget is not None and float(time_budget) <= 0:
        raise UserError(f"--time-budget must be > 0 seconds, got {time_budget}")
    cost_tag = (f"b{budget.gflops:g}" if budget.bounded else "") + (
        f"{'-' if budget.bounded else ''}ms{latency.ms:g}" if latency is not None and latency.ms is not None else "")
    study_name = args.study or f"{space.name}-{cost_tag}" + ("" if budget.mode == "mean" else "-max")
    out = Path(args.out) / study_name
    out.mkdir(parents=True, exist_ok=True)
    gpus = args.gpus_per_trial  # None: decided from the cluster's resources once Ray is up
    s = Settings(space=space, budget=budget, objectives=objectives,
                 trials=args.trials or int(space.defaults.get("trials", 16)), study_name=study_name, out=out,
                 storage_url=storage_url_for(out, args.storage),
                 seed=args.seed if args.seed is not None else space.proxy.seed, sampler_seed=args.sampler_seed,
                 time_budget=float(time_budget) if time_budget else None, device=args.device,
                 cpus_per_trial=args.cpus_per_trial, gpus_per_trial=gpus, address=args.address,
                 progress=not args.quiet, stale_after=args.stale_after, latency=latency,
                 sampler=args.sampler, trials_at_once=args.trials_at_once)
    return s, refs


def latency_budget(space, args, mode: str, objectives: tuple[str, ...]) -> Optional[LatencyBudget]:
    """--budget-ms or objective 'latency': the trial device's latency table for the space (built when missing).

    The table is of the device trials run on (``--device``; batch 1, one thread on a CPU),
    so a budget in ms is a step's time there.
    """
    if args.budget_ms is None and "latency" not in objectives:
        return None
    setting = Setting(device=str(pick_device(args.device)))
    path = Path(args.latency_table) if args.latency_table else None
    table, out = space_table(space, setting, path, log=lambda line: print(line, flush=True))
    return LatencyBudget(args.budget_ms, mode, table, str(out))


def with_data(space: SearchSpace, spec: Optional[str]) -> SearchSpace:
    """The space trained on ``spec`` (``--data``): the target's data, and the proxy's when it is images.

    A path is made absolute (trial workers may run in another directory or on another
    node) and read once here, so a missing folder or a latent file for a pixel target
    fails before any trial, in one line.
    """
    if spec is None:
        if space.proxy.data == DATA_REQUIRED:
            raise UserError(f"space {space.name} trains on your data: pass --data DIR (a folder of images) "
                            f"or a latent file")
        return space
    named = str(spec).lower() in ("fashion-mnist", "fashion_mnist", "fmnist")
    spec = "fashion-mnist" if named else str(Path(spec).expanduser().resolve())
    proxy = space.proxy
    if is_latent_file(spec):
        if not space.data.latent:
            raise UserError(f"--data {spec} is a latent file, but space {space.name}'s target is pixels "
                            f"({space.data.channels}x{space.data.resolution}x{space.data.resolution}): "
                            "pass the image folder")
        load_data(spec, space.data, limit=1)   # shape and autoencoder record checked now
        print(f"data: target trains on {spec}; the proxy keeps {proxy.data or 'fashion-mnist'} (a proxy is pixels)")
    else:
        if space.data.latent:
            raise UserError(f"--data {spec} is images, but space {space.name}'s target is latent: encode them "
                            "first (meme-nas autoencoder encode) and pass the latent file")
        proxy = dataclasses.replace(proxy, data=spec)
        load_data(spec, proxy.shape(), limit=1)
        print(f"data: target and proxy train on {spec}")
    return dataclasses.replace(space, dataset=spec, proxy=proxy)


def with_evaluator(space, args):
    """The space with --evaluator/--supernet/--finetune-steps applied, checked before any trial."""
    proxy = space.proxy
    supernet = None if args.supernet is None else str(Path(args.supernet).expanduser().resolve())  # workers run elsewhere
    changes = {k: v for k, v in (("evaluator", args.evaluator), ("supernet", supernet),
                                 ("finetune_steps", args.finetune_steps)) if v is not None}
    if args.supernet is not None and "evaluator" not in changes:
        changes["evaluator"] = "supernet"
    proxy = dataclasses.replace(proxy, **changes)
    if proxy.finetune_steps < 0:
        raise UserError(f"--finetune-steps must be >= 0, got {proxy.finetune_steps}")
    if proxy.evaluator == "supernet":
        if space.widths.searched and not space.widths.whole_network:
            raise UserError(f"{space.source} searches decoder widths (search.widths), which the supernet evaluator "
                            f"does not slice: use --evaluator scratch")
        if not proxy.supernet:
            raise UserError("--evaluator supernet needs --supernet DIR (train one with meme-nas supernet train "
                            f"--space {space.name})")
        index = load_index(proxy.supernet)
        if index.get("space") != space.name:
            raise UserError(f"{proxy.supernet}: supernets of space {index.get('space')!r}, not {space.name!r}")
        if any(index.get("proxy", {}).get(k) != v for k, v in proxy.training_digest().items()
               if k in ("data", "resolution", "channels", "width_mult", "diffusion", "limit_data")):
            raise UserError(f"{proxy.supernet}: trained on another proxy (data, shape or width) than {space.source}'s")
        if args.objective != "loss" or args.objectives:
            raise UserError("--evaluator supernet scores the held-out loss: use --objective loss")
    return dataclasses.replace(space, proxy=proxy)


def describe_proxy(s: Settings) -> str:
    p = s.space.proxy
    if p.evaluator == "supernet":
        return (f"evaluator supernet {p.supernet} (sub-networks scored on their own intervals"
                f"{f', {p.finetune_steps} fine-tune steps' if p.finetune_steps else ''})"
                f"{f'; time budget {s.time_budget:g} s' if s.time_budget else ''}")
    return (f"proxy {p.channels}x{p.resolution}x{p.resolution} {p.data or 'fashion-mnist'}, width x{p.width_mult}, "
            f"{p.steps} steps{' per expert' if p.steps_per_expert else ' in all (equal for every N)'}"
            f"{f'; time budget {s.time_budget:g} s' if s.time_budget else ''}")


@contextlib.contextmanager
def storage_errors(url: str):
    """A database that goes away mid-search is one line with the way back, not a traceback."""
    try:
        yield
    except Exception as exc:
        chain, cause = [], exc
        while cause is not None and len(chain) < 50:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        found = [c for c in chain if _is_storage_error(c)]
        if not found:
            raise
        cause = found[-1]  # the deepest one says why (Optuna's wrapper only says a commit failed)
        raise UserError(f"lost the study storage {_safe_url(url)} ({one_line(cause)}); when it is back, continue with "
                        f"--resume (finished trials are kept)") from None


def _safe_url(url: str) -> str:
    """The storage URL with any password shown as ***."""
    return make_url(url).render_as_string(hide_password=True)


def _is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                            optuna.exceptions.StorageInternalError))


def run_trials(s: Settings, study: optuna.Study, executor: str, ref_cfg, remaining: int,
               beat: Optional[Heartbeat] = None, deadline: Optional[Deadline] = None):
    """The trials (Ray Tune or the plain Optuna loop) and the reference beside them; its record."""
    ref_path = s.out / "reference.json"
    reference = None if ref_cfg is None else ref_mod.load(ref_path, ref_cfg, s.space.proxy, s.quality)
    need_ref = ref_cfg is not None and reference is None
    threads = max(1, int(s.cpus_per_trial))
    verb = "scoring" if s.space.proxy.evaluator == "supernet" else "training"   # of the reference
    if executor == "ray":
        import ray  # optional dependency, with the engine that needs it

        from nas.engine import ray_engine
        started_ray = ray_engine.init_ray(s.address)
        s = dataclasses.replace(s, gpus_per_trial=ray_engine.default_gpus_per_trial(s.gpus_per_trial, s))
        job = None
        if need_ref:
            job = ray.remote(ref_mod.run_reference).options(num_cpus=s.cpus_per_trial, num_gpus=s.gpus_per_trial) \
                .remote(ref_cfg, s.space.proxy, s.quality, s.budget.mode, s.device, threads)
            print(f"{verb} the reference {ref_cfg.name} on the proxy (in parallel with the trials)")
        bar = _bar(s, s.trials - remaining)
        got = (ray_engine.run(s, study, remaining, bar=bar, reference_job=job, beat=beat, deadline=deadline)
               if remaining else None)
        if job is not None and got is None:
            got = ray.get(job)
        if bar is not None:
            bar.close()
        reference = got or reference
        if started_ray:
            ray.shutdown()  # frees the cores for the re-rank
    else:
        if need_ref:
            print(f"{verb} the reference {ref_cfg.name} on the proxy first")
            reference = ref_mod.run_reference(ref_cfg, s.space.proxy, s.quality, s.budget.mode, s.device,
                                              threads=threads)
        if remaining:
            optuna_engine.run(s, study, beat, deadline=deadline)
    if need_ref and reference is not None:
        ref_mod.save(ref_path, reference)
        if reference.get("objective") is None:
            print(f"reference {ref_cfg.name} failed: {reference.get('fail_reason')}")
    return reference


def _rerank(study, s: Settings, ref_cfg, top: int, n_seeds: int, deadline: Optional[Deadline] = None) -> None:
    """Top-K trials and the reference on fresh seeds: the only basis for 'beats the reference'."""
    designs = [] if ref_cfg is None else [(ref_cfg.name, ref_cfg)]
    for t in report.ranked(study)[:top]:
        designs.append((f"trial {t.number}", MemeConfig.from_yaml(t.user_attrs["config_yaml"], f"trial {t.number}")))
    if len(designs) < 2:
        print("re-rank skipped: no fully trained trial" + ("" if ref_cfg is not None else " or no reference"))
        return
    seeds = rr.default_seeds(n_seeds, s.seed)
    print(f"\nre-ranking {len(designs) - (ref_cfg is not None)} best trial(s)"
          f"{' and the reference' if ref_cfg is not None else ''} on seeds {seeds} (not the search's seed {s.seed})")
    result = rr.rerank(designs, s.space, seeds, objective=s.quality, budget_mode=s.budget.mode, device=s.device,
                       cache=s.out / "rerank.runs.jsonl", progress=s.progress, deadline=deadline)
    atomic_write_json(result, s.out / "rerank.json")
    for line in rr.table_lines(result) + report.rerank_verdict(result):
        print(line)


def _bar(s: Settings, done: int):
    if not s.progress:
        return None
    # disable=None: a bar on a terminal, plain log lines when stdout is a file
    return tqdm(total=s.trials, initial=done, desc="trials", unit="trial", file=sys.stdout, disable=None)


def _outputs(study, s: Settings, reference, refs) -> None:
    if s.latency is not None:
        measure_finalists(study, s)
    df = report.trials_frame(study)
    df.to_csv(s.out / "trials.csv", index=False)
    report.plot_pareto(study, s.out / "pareto.png", s.budget.gflops, reference,
                       {k: v.gflops for k, v in refs.items()}, s.quality)
    best = report.write_best(study, s.out)
    print()
    for line in report.summary_lines(study, reference, s.budget.gflops):
        print(line)
    print(f"outputs in {s.out}/: optuna.db, trials.csv, pareto.png"
          + (", best.yaml" if best else "") + (", reference.json" if reference else ""))
    if best and s.space.widths.whole_network and s.space.proxy.evaluator == "supernet":
        schedule = s.space.schedule_of(MemeConfig.load(best), s.space.proxy.supernet).save(s.out / "schedule.yaml")
        print(f"the winner is a schedule of the supernet; sample it, nothing to train:  meme-nas sample "
              f"--supernet {s.space.proxy.supernet} --schedule {schedule}")
    elif best:
        data = f" --data {s.space.dataset}" if s.space.dataset else ""
        print(f"train the winner at full scale:  meme-nas train --config {best}{data}")
        print(f"or train, sample and score the top designs:  meme-nas promote --study {s.out}")


def measure_finalists(study, s: Settings, k: int = 3) -> None:
    """Time the k best trials whole on the table's device (``meme.speed.latency``), beside the table's price:
    a study attr ``latency_measured_ms`` {trial number: ms} that trials.csv and the dashboard show."""
    measured = dict(study.user_attrs.get("latency_measured_ms", {}))
    for t in report.ranked(study)[:k]:
        if str(t.number) in measured:
            continue
        lat = measure_meme(MemeConfig.from_yaml(t.user_attrs["config_yaml"], "trial"), s.latency.table.setting)
        measured[str(t.number)] = lat.ms_mean if s.latency.mode == "mean" else lat.ms_max
        print(f"trial {t.number}: measured {measured[str(t.number)]:.2f} ms per step on {lat.device} "
              f"(table: {t.user_attrs.get('latency_ms', float('nan')):.2f} ms)")
    study.set_user_attr("latency_measured_ms", measured)


if __name__ == "__main__":
    sys.exit(main())
