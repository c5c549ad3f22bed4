"""Promote the best designs of a study to full training: ``meme-nas promote --study DIR``.

For each of the K best feasible trials (and the study's hand-designed reference),
and each seed, it runs ``meme.training.train`` -> ``meme.sampling.sample`` -> ``meme.sampling.evaluate`` in
``OUT/<design>/seed<S>/`` on the space's *target* data, then writes
``promoted.csv`` (one row per run) and ``promoted.md`` (FID mean +- std per design).

Every design gets the same recipe (the space's ``promote:`` section, flags override):
the same total optimizer steps and batch whatever its N -- equal training compute,
as in the search -- and the same sampler and FID protocol. ``--jobs J`` runs J
pipelines side by side, one thread each on a CPU. Resumable: a finished stage is
skipped, an interrupted training continues from its last checkpoint, and a run
directory trained under other settings is refused rather than mixed in.

``--init branch`` (or ``promote.init: branch``) starts every multi-expert design's
experts from shared weights (``meme.training.branching``): a parent phase of ``--branch-at`` of
the steps inside the same step budget (equal compute), or ``--init-from`` a trained
source, whose compute is charged in full (``meme.training.compute``; each run's ``compute.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import optuna
import pandas as pd

from meme.common.checkpoint import atomic_write_json
from meme.common.command import CommandParser, add_fast_path_flag, main_guard, setup_logging
from meme.common.errors import UserError
from meme.common.markdown import markdown_table
from meme.data.dataset import LATENT_SUFFIXES
from meme.data.latents import is_latent_file, require_latent_info
from meme.model.config import MemeConfig
from meme.training.branching import SPLIT_OPTIMIZERS
from meme.training.options import to_argv
from nas.engine.report import quality, ranked
from nas.promote.export import open_study
from nas.promote.ray_train import RayWorkers, train_on_workers
from nas.space.space import INITS, PromoteRecipe, SearchSpace, load_space

log = logging.getLogger("nas.promote.promote")


@dataclass(frozen=True)
class Design:
    """One architecture to train at the target, with the columns it brings to the table."""

    tag: str                 # folder and row name, e.g. 'rank1', 'reference-fmnist-meme-small'
    cfg: MemeConfig
    info: dict = field(default_factory=dict)  # trial number, proxy objective, role ...
    init: Optional[str] = None  # 'scratch' | 'branch' for this design; None: the protocol's recipe
    schedule: str = "interleaved"   # meme.training.train --schedule ('weighted' for experts of unequal cost)

    def recipe(self, protocol: "PromoteProtocol") -> PromoteRecipe:
        """The protocol's recipe with this design's init (one network never branches)."""
        rec = protocol.recipe if self.init is None else dataclasses.replace(protocol.recipe, init=self.init)
        return dataclasses.replace(rec, init="scratch") if self.cfg.num_experts == 1 else rec


@dataclass(frozen=True)
class PromoteProtocol:
    """What every promoted run shares: data, recipe, devices (a run records its digest)."""

    data: Optional[str]      # meme.data.dataset spec of the target's training data
    recipe: PromoteRecipe
    train_args: tuple[str, ...] = ()  # extra meme.training.train flags, verbatim
    device: str = "auto"
    threads: Optional[int] = None     # CPU threads per process (1 when pipelines share the cores)
    fid: bool = True                  # sample and score FID (off: train and held-out loss only; a later
                                      # pass with it on adds FID to the same runs)
    ray_workers: Optional[RayWorkers] = None  # train on several Ray Train workers (a run resumes under any K)

    def digest(self, recipe: Optional[PromoteRecipe] = None) -> dict[str, Any]:
        return {"data": self.data, "recipe": (recipe or self.recipe).digest(), "train_args": list(self.train_args)}


def check_target_data(cfg: MemeConfig, data: Optional[str]) -> None:
    """A latent target trains on encoded latents whose autoencoder is recorded (FID decodes
    the samples with it); refuse before anything is written."""
    if cfg.data.latent:
        if data is None:
            raise UserError(f"{cfg.name}: the target is latent ({cfg.data.channels}x{cfg.data.resolution}x"
                            f"{cfg.data.resolution}) and no latent data was given: pass --data LATENTS.npy|.pt "
                            f"(first-stage latents of that shape)")
        if not is_latent_file(data):
            raise UserError(f"{cfg.name}: the target is latent but --data {data} is not a latent file "
                            f"({', '.join(LATENT_SUFFIXES)}): encode the images first")
        require_latent_info(data, f"scoring {cfg.name}")  # samples are decoded for FID
    elif data is None:
        raise UserError(f"{cfg.name}: no training data for the target: the space names no target.dataset, "
                        f"pass --data (fashion-mnist, an image folder)")


def run_dir(out: Path, design: Design, seed: int) -> Path:
    return Path(out) / design.tag / f"seed{seed}"


_PRINT = threading.Lock()


def _stage(cmd: list[str], log_path: Path, env: dict[str, str]) -> None:
    """One subprocess, output appended to the run's log; a failure is one line."""
    with _PRINT:
        print("$ " + " ".join(cmd), flush=True)
    with log_path.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["?"]
        raise UserError(f"{cmd[2]} failed (exit {rc}): {tail[0]} -- full log {log_path}")


def run_pipeline(design: Design, seed: int, out: Path, protocol: PromoteProtocol) -> dict[str, Any]:
    """Train, sample and score one (design, seed); stages already done are skipped."""
    run = run_dir(out, design, seed)
    run.mkdir(parents=True, exist_ok=True)
    rec = design.recipe(protocol)
    stamp = {"config_hash": design.cfg.hash(), "seed": seed, **protocol.digest(rec),
             **({"schedule": design.schedule} if design.schedule != "interleaved" else {})}
    stamp_path = run / "promote.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) != stamp:
        raise UserError(f"{run} was trained with other settings (config, seed, data or recipe): "
                        f"delete it or choose another --out")
    atomic_write_json(stamp, stamp_path)
    env = dict(os.environ)
    if protocol.threads:
        env.update(OMP_NUM_THREADS=str(protocol.threads), MKL_NUM_THREADS=str(protocol.threads))
    py, log_path = sys.executable, run / "promote.log"
    yaml_path = design.cfg.save(run / "design.yaml")
    if not (run / "train.done").exists():
        opts = rec.train_options(data=protocol.data, seed=seed, device=protocol.device, threads=protocol.threads,
                                 sample_every=0, ckpt_every=max(rec.steps // 10, 1), schedule=design.schedule)
        cmd = [py, "-m", "meme.training.train", "--config", str(yaml_path), "--out", str(run), *to_argv(opts)]
        if protocol.ray_workers and protocol.ray_workers.workers > 1:   # it passes --resume itself
            with _PRINT:
                print(f"$ {protocol.ray_workers.workers} Ray Train workers: " + " ".join(cmd), flush=True)
            train_on_workers(cmd[3:] + list(protocol.train_args), protocol.ray_workers, run, log_path)
        else:
            if (run / "checkpoints" / "last.pt").exists():
                cmd.append("--resume")
            _stage(cmd + list(protocol.train_args), log_path, env)
        (run / "train.done").write_text("ok\n")
    result = {"design": design.tag, "seed": seed, "run": str(run), **design.info}
    if not (run / "heldout.json").exists():
        _stage([py, "-m", "meme.sampling.heldout", "--run", str(run), "--device", protocol.device], log_path, env)
    held = json.loads((run / "heldout.json").read_text())
    compute = json.loads((run / "compute.json").read_text())
    result.update(init=rec.init, steps=rec.steps, heldout_loss=held["mean"], heldout_bins=held["bins"],
                  charged_tflops=compute["charged_tflops"], amortised_tflops=compute["amortised_tflops"],
                  fid=None, precision=None, recall=None, n=None, n_ref=None, sample_wall_s=None)
    if not protocol.fid and not (run / "eval.json").exists():
        return result   # FID not asked for (one scored earlier is still reported)
    if not (run / "samples" / "sampling.json").exists():
        _stage([py, "-m", "meme.sampling.sample", "--run", str(run), "--n", str(rec.fid_samples), "--steps",
                str(rec.sample_steps), "--seed", str(seed), "--device", protocol.device], log_path, env)
    sampling = json.loads((run / "samples" / "sampling.json").read_text())
    result["sample_wall_s"] = sampling.get("wall_s")
    if not (run / "eval.json").exists():
        _stage([py, "-m", "meme.sampling.evaluate", "--run", str(run), "--n", str(rec.fid_samples), "--n-ref",
                str(rec.fid_reference), "--ref", str(protocol.data), "--device", protocol.device], log_path, env)
    ev = json.loads((run / "eval.json").read_text())
    result.update(fid=ev["fid"], precision=ev.get("precision"), recall=ev.get("recall"), n=ev.get("n"),
                  n_ref=ev.get("n_ref"))
    return result


@dataclass(frozen=True)
class RayPlacement:
    """``--executor ray``: each pipeline is a Ray task with these resources."""

    address: Optional[str] = None  # cluster to join (default $RAY_ADDRESS, else a local instance)
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    retries: int = 2               # a task whose node dies runs again elsewhere, resuming its checkpoint
    workers_per_run: int = 1       # > 1: each training on that many Ray Train workers (DDP), cpus/gpus each


Work = tuple[Design, int, Path, PromoteProtocol]   # one pipeline: design, seed, output folder, protocol


def run_all(designs: Sequence[Design], seeds: Sequence[int], out: Path, protocol: PromoteProtocol,
            jobs: int = 1, ray: Optional[RayPlacement] = None) -> list[dict[str, Any]]:
    """Every (design, seed) pipeline under one protocol, ``jobs`` at a time (or as Ray tasks)."""
    return run_pipelines([(d, s, out, protocol) for d in designs for s in seeds], jobs, ray)


def run_pipelines(work: Sequence[Work], jobs: int = 1, ray: Optional[RayPlacement] = None) -> list[dict[str, Any]]:
    """Pipelines, each with its own folder and protocol, in one pool (or as Ray tasks); results in input order."""
    for d, _, _, protocol in work:
        check_target_data(d.cfg, protocol.data)
    if ray is not None:
        return _run_on_ray(work, ray)
    if jobs <= 1:
        return [run_pipeline(*w) for w in work]
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait on subprocesses
        futures = [pool.submit(run_pipeline, *w) for w in work]
        return [f.result() for f in futures]


def _run_on_ray(work: Sequence[Work], place: RayPlacement) -> list[dict]:
    """Pipelines as Ray tasks spread over the cluster's nodes. Each folder must be a path every
    node sees (a shared file system): a retried task resumes from the run's checkpoint."""
    import ray  # optional dependency, with the placement that needs it

    import nas.promote.promote  # by reference: under `meme-nas promote` this module is __main__
    from nas.engine.ray_engine import init_ray  # imports ray

    started = init_ray(place.address)
    try:
        threads = max(1, int(place.cpus_per_run))
        task = ray.remote(nas.promote.promote._pipeline_on_node).options(num_cpus=place.cpus_per_run, num_gpus=place.gpus_per_run,
                                                     max_retries=place.retries, retry_exceptions=False)
        workers = (RayWorkers(place.workers_per_run, place.cpus_per_run, place.gpus_per_run, place.retries)
                   if place.workers_per_run > 1 else None)
        refs = [task.remote(d, s, Path(out).resolve(),
                            dataclasses.replace(protocol, threads=None if place.gpus_per_run else threads,
                                                device="cuda" if place.gpus_per_run else protocol.device,
                                                ray_workers=workers))
                for d, s, out, protocol in work]
        return ray.get(refs)
    finally:
        if started:
            ray.shutdown()


def _pipeline_on_node(design: Design, seed: int, out: Path, protocol: PromoteProtocol) -> dict[str, Any]:
    import ray

    result = run_pipeline(design, seed, out, protocol)
    result["node"] = ray.get_runtime_context().get_node_id()[:12]
    return result


def summary_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per design: FID mean and sample std over seeds (plus precision/recall means)."""
    df = pd.DataFrame(rows)
    if "fid" not in df:
        return df.groupby("design", sort=False).size().rename("runs").reset_index()
    agg = df.groupby("design", sort=False).agg(
        fid_mean=("fid", "mean"), fid_std=("fid", "std"), seeds=("seed", "count"),
        precision=("precision", "mean"), recall=("recall", "mean"))
    return agg.reset_index()


# ---- which designs --------------------------------------------------------------------

def study_space(study: optuna.Study) -> Optional[SearchSpace]:
    """The space the study searched (by shipped name or path), or None if it is gone; with the
    data the search was given (``nas.search --data``) as its target's dataset."""
    ref = study.user_attrs.get("space")
    if not ref:
        return None
    try:
        space = load_space(ref)
    except (OSError, UserError, ValueError) as exc:
        log.warning("space %s of study %s cannot be loaded (%s): using defaults", ref, study.study_name, exc)
        return None
    data = study.user_attrs.get("data")
    return space if data is None else dataclasses.replace(space, dataset=data)


def top_designs(study: optuna.Study, k: int) -> list[Design]:
    """The k best feasible, fully trained trials at the target shape, best first."""
    designs = []
    for rank, t in enumerate(ranked(study)[:k], 1):
        cfg = MemeConfig.from_yaml(t.user_attrs["config_yaml"], f"trial {t.number}")
        cfg = MemeConfig.from_dict({**cfg.to_dict(), "name": f"{study.study_name}-rank{rank}"}, "promote")
        designs.append(Design(f"rank{rank}", cfg, {"trial": t.number, "gflops": t.user_attrs["gflops"],
                                                   "params": t.user_attrs["params"], "proxy_objective": quality(t)}))
    if not designs:
        raise UserError(f"study {study.study_name} has no feasible, fully trained trial to promote")
    return designs


def reference_design(study_dir: Path, space: Optional[SearchSpace]) -> Optional[Design]:
    """The hand design trained beside the search, if the space still defines the same one."""
    rec_path = Path(study_dir) / "reference.json"
    cfg = space.reference if space else None
    if cfg is None or not rec_path.is_file():
        return None
    rec = json.loads(rec_path.read_text())
    if cfg.hash() != rec.get("config_hash"):  # space edited since the search
        log.warning("the space's reference changed since the search: not promoted")
        return None
    return Design(f"reference-{cfg.name}", cfg, {"trial": "reference", "gflops": rec["gflops"],
                                                 "params": rec["params"], "proxy_objective": rec.get("objective")})


def make_protocol(args: argparse.Namespace, space: Optional[SearchSpace]) -> PromoteProtocol:
    """The space's recipe with command-line overrides; jobs > 1 on a CPU: one thread each."""
    recipe = space.promote if space else PromoteRecipe()
    overrides = {"steps": args.steps, "fid_samples": args.n, "fid_reference": args.n_ref,
                 "sample_steps": args.sample_steps, "batch_size": args.batch_size,
                 "init": getattr(args, "init", None), "branch_at": args.branch_at,
                 "split_optimizer": args.split_optimizer, "init_from": args.init_from}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    recipe.check("nas.promote.promote")
    data = args.data or (space.dataset if space else None)
    threads = 1 if args.jobs > 1 and not str(args.device).startswith("cuda") else None
    return PromoteProtocol(data=data, recipe=recipe, train_args=tuple(args.train_args), device=args.device, threads=threads)


def add_protocol_flags(p: argparse.ArgumentParser, init_flag: bool = True) -> None:
    """Flags shared by promote and compare (defaults: the space's promote recipe). compare sets the
    init per design row (its own ``--init`` lists them), so it asks for no ``--init`` here."""
    g = p.add_argument_group("training and scoring (default: the space's promote: section)")
    g.add_argument("--data", default=None, help="target training data: a folder of images, a latent file or fashion-mnist "
                                                "(default: what the search was given with --data, else the space's "
                                                "target.dataset); a latent target needs a latent file")
    g.add_argument("--steps", type=int, default=None,
                   help="optimizer steps in all, over every expert: the same for every design whatever its N")
    g.add_argument("--batch-size", type=int, default=None, help="images per step")
    g.add_argument("--n", type=int, default=None, help="samples scored by FID")
    g.add_argument("--n-ref", type=int, default=None, help="real images in the FID reference statistics")
    g.add_argument("--sample-steps", type=int, default=None, help="DDIM steps per sample for the FID (default: the space's promote.sample_steps)")
    g.add_argument("--seeds", type=int, default=1, help="training seeds per design, 1..S (default %(default)s)")
    g.add_argument("--jobs", type=int, default=1,
                   help="pipelines side by side (one thread each on a CPU; default %(default)s)")
    g.add_argument("--device", default="auto", help="torch device for every stage (default %(default)s)")
    b = p.add_argument_group("experts from shared weights (default: the space's promote: section; meme.training.branching)")
    if init_flag:
        b.add_argument("--init", default=None, choices=INITS,
                       help="scratch: every expert from random weights; branch: from shared weights")
    b.add_argument("--branch-at", type=float, default=None,
                   help="branch: fraction of the steps trained as one parent network on all t before the split")
    b.add_argument("--split-optimizer", default=None, choices=SPLIT_OPTIMIZERS,
                   help="branch: carry the parent's AdamW moments into the experts, or start fresh with a warm-up")
    b.add_argument("--init-from", default=None,
                   help="branch: cut the experts from this trained supernet directory (at the target's shape) or "
                        "one-network run instead of a parent phase; its training compute is charged in full")
    r = p.add_argument_group("cluster")
    r.add_argument("--executor", default="local", choices=("local", "ray"),
                   help="local: --jobs pipelines on this machine; ray: one Ray task per pipeline, spread over "
                        "the cluster (OUT must be on a file system every node sees)")
    r.add_argument("--address", default=None, help="Ray cluster to join (default $RAY_ADDRESS, else local)")
    r.add_argument("--cpus-per-run", type=float, default=1.0, help="CPU cores per Ray task (default %(default)s)")
    r.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs per Ray task (default %(default)s)")
    r.add_argument("--workers-per-run", type=int, default=1,
                   help="ray: train each design on K Ray Train workers (data-parallel, --cpus/--gpus-per-run each; "
                        "a dead worker restarts all K from the run's checkpoint); 1: one Ray task trains it "
                        "(default %(default)s)")
    g.add_argument("train_args", nargs="*", help="extra meme.training.train flags after --, e.g. -- --grad-clip 0.5")


def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(prog="meme-nas promote", description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, type=Path, help="study directory (results/<study>)")
    p.add_argument("--top", type=int, default=3, help="how many of the best trials (default %(default)s)")
    p.add_argument("--no-reference", action="store_true", help="do not promote the study's reference design")
    p.add_argument("--out", type=Path, default=None, help="output folder for runs and promoted.csv (default: STUDY/promoted)")
    p.add_argument("--storage", default=None, help="Optuna RDB URL if the study is not in STUDY/optuna.db")
    p.add_argument("--name", default=None, help="study name when the storage holds several")
    add_protocol_flags(p)
    add_fast_path_flag(p)
    return p.parse_args(argv)


def ray_placement(args: argparse.Namespace) -> Optional[RayPlacement]:
    if args.executor != "ray":
        if args.workers_per_run != 1:
            raise UserError("--workers-per-run needs --executor ray (on one machine, train with torchrun: "
                            "torchrun --nproc-per-node K -m meme.training.train ...)")
        return None
    if args.cpus_per_run <= 0 or args.gpus_per_run < 0 or args.workers_per_run < 1:
        raise UserError("--cpus-per-run must be > 0, --gpus-per-run >= 0 and --workers-per-run >= 1")
    return RayPlacement(args.address, args.cpus_per_run, args.gpus_per_run, workers_per_run=args.workers_per_run)


def check_counts(args: argparse.Namespace) -> None:
    for key in ("seeds", "jobs", "steps", "batch_size", "n", "n_ref", "sample_steps"):
        v = getattr(args, key, None)
        if v is not None and v < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {v}")


@main_guard
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    check_counts(args)
    place = ray_placement(args)
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    study = open_study(args.study, args.storage, args.name)
    space = study_space(study)
    protocol = make_protocol(args, space)
    designs = top_designs(study, args.top)
    ref = None if args.no_reference else reference_design(args.study, space)
    designs += [ref] if ref else []
    for d in designs:  # every refusal before the first line of progress
        check_target_data(d.cfg, protocol.data)
    out = args.out or Path(args.study) / "promoted"
    log.info("promoting %d designs x %d seeds on %s, %d steps each, %d at a time -> %s", len(designs), args.seeds,
             protocol.data, protocol.recipe.steps, args.jobs, out)
    rows = run_all(designs, range(1, args.seeds + 1), out, protocol, args.jobs, place)
    runs = pd.DataFrame(rows)
    summary = summary_frame(rows)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "promoted.csv", index=False)
    (out / "promoted.md").write_text(markdown_table(list(summary.columns), summary.itertuples(index=False)))
    print(summary.to_string(index=False))
    print(f"runs: {out / 'promoted.csv'}; summary: {out / 'promoted.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
