"""One slimmable network, every budget: ``meme-nas slimmable front|study|standalone``.

``front``: per-interval held-out loss of every width of a trained slimmable supernet
(``meme-nas supernet train --widths``), and from it the exact best width schedule at
every budget (``nas.studies.schedule_opt``): ``front.json``, ``front.png``, and with
``--budget-gflops`` or ``--budget-ms`` the best schedule as ``best.yaml``.

``study``: what a width schedule buys, measured on one or more supernets (training
seeds). For each supernet: the uniform widths, the best schedules at the uniform widths'
mean GMACs (``--match``), and each best schedule reversed in t (the control for "any
non-uniform schedule helps"). Every schedule is sampled with the same ``--seeds``
(keyed noise: same initial noise and same noise at every step for every schedule of a
supernet), so schedules compare **paired**: per seed the FID difference, then its mean
and spread. Outputs in ``--out``: ``sets/`` (one JSON per supernet, widths per bin
and seed; resumable, and a schedule met twice is sampled once), ``study.json``, ``study.md`` and ``study.png`` (FID against sampling GMACs).
``--standalone RUN,...`` adds networks trained alone at one width (``meme-nas train`` of a
uniform schedule's YAML, from scratch, for the supernet's training FLOPs): the answer to "is
the slimmable network worse than training the size you need?"; ``standalone --study OUT --runs
RUN,...`` joins runs trained later to a finished study. ``--schedules FILE,...`` adds schedules found
elsewhere (``interval-opt``'s, a search winner's) as designs of their own, paired with the rest and
with the front's schedule of the nearest cost. ``--against STUDY`` sets this study's first
supernet beside another study's, design by design (another training recipe, e.g. ``--distill``).
Sampling time is measured per schedule as thread CPU time of its experts' steps
(``meme.speed.latency``, one thread, batch ``--batch-size``) and given as a ratio to the
full width measured in the same run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from meme.common.checkpoint import atomic_write_json
from meme.common.command import CommandParser, add_fast_path_flag, main_guard, setup_logging
from meme.common.device import pick_device
from meme.common.errors import UserError
from meme.common.fastpath import fast_path
from meme.common.images import to_uint8
from meme.common.markdown import markdown_table
from meme.model.config import ConfigError, DataShape, DiffusionConfig
from meme.model.diffusion import Diffusion
from meme.model.macs import cost_of_meme
from meme.model.schedule import Schedule, TrainedSupernet, schedule_denoiser
from meme.model.supernet import INDEX, SuperNet
from meme.sampling.evaluate import evaluate_samples
from meme.sampling.graphs import release
from meme.sampling.sample import SamplingPlan, generate, load_run
from meme.speed.latency import Setting, measure_meme
from nas.studies.schedule_opt import MONOTONE, Point, best_under, front, reverse, to_schedule
from nas.engine.stats import rank_correlation, summarize, welch
from nas.space.proxy_data import heldout_images, heldout_noise
from nas.space.space import load_space

log = logging.getLogger("nas.studies.slimmable")


# ---- the cheap score: held-out loss of every width on every bin ------------------------------

def bin_bounds(T: int, bins: int) -> list[int]:
    return [round(i * T / bins) for i in range(bins + 1)]


def bin_timesteps(bounds: Sequence[int], per_bin: int) -> list[list[int]]:
    """``per_bin`` evenly spaced t inside each bin [lo, hi)."""
    return [[lo + int((j + 0.5) * (hi - lo) / per_bin) for j in range(per_bin)] for lo, hi in zip(bounds, bounds[1:])]


@torch.no_grad()
def t_losses(net: SuperNet, arch, diffusion: Diffusion, x0: torch.Tensor, noise: torch.Tensor,
             ts: Sequence[int]) -> list[float]:
    """eps-MSE of one sub-network at each t on the given images and noise."""
    out = []
    for t in ts:
        tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
        eps = net.run(arch, diffusion.q_sample(x0, tt, noise), tt).float()
        out.append(float(torch.nn.functional.mse_loss(eps, noise.float())))
    return out


def _heldout(net: SuperNet, images: torch.Tensor, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    fp = fast_path(device, "fp32", net)
    net.eval()
    return fp.input(images, device), fp.input(heldout_noise(images, seed), device)


def interval_losses(net: SuperNet, archs: Sequence, diffusion: Diffusion, images: torch.Tensor,
                    bounds: Sequence[int], per_bin: int, seed: int, device: torch.device) -> list[list[float]]:
    """[width][bin] eps-MSE on fixed held-out images: ``per_bin`` evenly spaced t inside each bin,
    the same images, t and noise for every width (paired by construction)."""
    x0, noise = _heldout(net, images, seed, device)
    return [[sum(v) / len(v) for v in (t_losses(net, arch, diffusion, x0, noise, ts)
                                       for ts in bin_timesteps(bounds, per_bin))] for arch in archs]


def schedule_loss(net: SuperNet, schedule: Schedule, diffusion: Diffusion, images: torch.Tensor,
                  bounds: Sequence[int], per_bin: int, seed: int, device: torch.device) -> tuple[float, list[str]]:
    """Any schedule's score on the front's protocol: per bin, the mean over its t of the loss of the
    expert that owns each t, summed over bins (for a schedule whose cuts are bin edges, the front's
    own number); and the width(s) owning each bin, for reading."""
    x0, noise = _heldout(net, images, seed, device)
    archs = schedule.archs(net.spec)
    cuts = schedule.boundaries

    def owner(t: int) -> int:
        return next(n for n in range(len(archs)) if cuts[n] <= t < cuts[n + 1])
    total, widths = 0.0, []
    for ts in bin_timesteps(bounds, per_bin):
        owners = [owner(t) for t in ts]
        total += sum(t_losses(net, archs[o], diffusion, x0, noise, [t])[0] for o, t in zip(owners, ts)) / len(ts)
        widths.append("+".join(dict.fromkeys(schedule.experts[o].width for o in owners)))
    return total, widths


@dataclass
class Fronts:
    """One supernet's per-bin losses, width costs and exact schedule front."""

    trained: TrainedSupernet
    widths: list[str]
    bounds: list[int]
    losses: list[list[float]]       # [width][bin]
    gflops: list[float]             # [width] per step
    weights: list[float]            # [bin] fraction of steps
    points: list[Point]
    images: Optional[torch.Tensor] = None   # the held-out images the losses are on
    seed: int = 0                           # and the seed of their noise

    def schedule(self, p: Point, name: str) -> Schedule:
        return to_schedule(p, self.widths, self.bounds, str(self.trained.path), name)

    def uniform(self, w: int) -> Point:
        k = len(self.bounds) - 1
        return Point(self.gflops[w], sum(self.losses[w]), (w,) * k)

    def to_dict(self) -> dict[str, Any]:
        return {"supernet": str(self.trained.path), "widths": self.widths, "bounds": self.bounds,
                "gflops_per_width": self.gflops, "losses": self.losses,
                "front": [{"gflops": p.cost, "loss": p.loss, "widths": [self.widths[w] for w in p.widths]}
                          for p in self.points]}


def compute_front(trained: TrainedSupernet, bins: int, per_bin: int, monotone: str, device: torch.device,
                  costs: Optional[list[float]] = None) -> Fronts:
    spec = trained.spec
    widths = list(spec.widths)
    uniform = [Schedule.uniform(w, trained.diffusion.timesteps).config(spec, trained.diffusion) for w in widths]
    archs = [cfg.experts[0] for cfg in uniform]
    space = load_space(_space_of(trained))
    images = heldout_images(space.proxy)
    bounds = bin_bounds(trained.diffusion.timesteps, bins)
    net = trained.weights(device)
    t0 = time.perf_counter()
    losses = interval_losses(net, archs, Diffusion(trained.diffusion), images, bounds, per_bin, space.proxy.seed, device)
    log.info("held-out loss of %d widths x %d bins in %.1f s", len(widths), bins, time.perf_counter() - t0)
    gflops = [cost_of_meme(cfg).gflops_mean for cfg in uniform]
    weights = [(hi - lo) / bounds[-1] for lo, hi in zip(bounds, bounds[1:])]
    points = front(losses, costs or gflops, weights, monotone)
    return Fronts(trained, widths, bounds, losses, gflops, weights, points, images, space.proxy.seed)


def _space_of(trained: TrainedSupernet) -> str:
    index = json.loads((trained.path / "supernet.json").read_text())
    return index.get("space_source") or index["space"]


# ---- the expensive score: FID of a schedule's samples, paired by seed ------------------------

def sample_set(schedule: Schedule, trained: TrainedSupernet, net: SuperNet, seed: int, n: int, steps: int,
               batch: int, n_ref: int, device: torch.device) -> dict[str, Any]:
    """FID of one schedule's samples at one noise seed (its experts extracted: the deployable form)."""
    denoiser = schedule_denoiser(schedule, net, extract=True)
    rec = fid_of(denoiser, trained.diffusion, trained.spec.data, seed, n, steps, batch, n_ref, device)
    return {"schedule": schedule.to_dict(), **rec}


def fid_of(denoiser: torch.nn.Module, diffusion: DiffusionConfig, data: DataShape, seed: int, n: int, steps: int,
           batch: int, n_ref: int, device: torch.device) -> dict[str, Any]:
    """FID of a denoiser's samples at one noise seed (keyed noise: the same for every denoiser)."""
    plan = SamplingPlan(n, steps, 0.0, "ddim", seed, batch, clip_x0=not data.latent)
    t0 = time.perf_counter()
    samples = generate(denoiser, Diffusion(diffusion), (data.channels, data.resolution, data.resolution), plan, device)
    wall = time.perf_counter() - t0
    release(denoiser)   # its CUDA graphs' memory back before the Inception network runs
    ev = evaluate_samples(to_uint8(samples), ref="fashion-mnist", n_ref=n_ref, split="train", device=device)
    return {"seed": seed, "n": n, "steps": steps, "fid": ev["fid"], "precision": ev["precision"],
            "recall": ev["recall"], "sampling_wall_s": round(wall, 2)}


def fids_over_seeds(key: Callable[[int], Path], sample: Callable[[int], dict[str, Any]], seeds: Sequence[int],
                    what: str) -> list[float]:
    """FID of one design at every noise seed, each set read from ``key(seed)`` when it was sampled
    before (resumable; a design met twice is sampled once), else sampled and written there."""
    fids = []
    for seed in seeds:
        path = key(seed)
        if path.is_file():
            rec = json.loads(path.read_text())
        else:
            t0 = time.perf_counter()
            rec = sample(seed)
            atomic_write_json(rec, path)
            log.info("%s seed %d: FID %.2f (%.0f s)", what, seed, rec["fid"], time.perf_counter() - t0)
        fids.append(rec["fid"])
    return fids


def fid_row(fids: Sequence[float]) -> dict[str, Any]:
    return {"fid": list(fids), "fid_mean": float(np.mean(fids)),
            "fid_std": float(np.std(fids, ddof=1)) if len(fids) > 1 else 0.0}


# ---- the honest alternative: one network trained at the width it is sampled at ----------------

def standalone_by_width(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per width, the stand-alone runs (training seeds) against the supernets' uniform rows:
    each side one value per training (its FID over the noise seeds), compared by Welch's t.
    This is the comparison the training-seed noise allows: the per-noise-seed pairing of a
    row holds only one training of each side."""
    out = []
    for width in dict.fromkeys(r["width"] for r in rows):
        mine = [r for r in rows if r["width"] == width]
        alone = [r["fid_mean"] for r in mine]
        supernets = list(dict.fromkeys((v["supernet"], v["supernet_fid_mean"]) for r in mine
                                       for v in r["vs_supernets"]))
        theirs = [fid for _, fid in supernets]
        if not theirs:
            continue
        a, b = summarize(alone), summarize(theirs)
        out.append({"width": width, "standalone": [a.mean, a.std, a.n], "supernets": [b.mean, b.std, b.n],
                    "welch": welch(alone, theirs).to_dict()})
    return out


def standalone_rows(runs: Sequence[Path], per_supernet: list[dict[str, Any]], out: Path, seeds: Sequence[int],
                    n: int, steps: int, batch: int, n_ref: int, device: torch.device) -> list[dict[str, Any]]:
    """Each stand-alone run (``meme-nas train`` of one sub-network's architecture, from scratch)
    sampled with the study's noise seeds, against the supernets' uniform row of its width.

    A stand-alone network and a sub-network are different weights, so their difference per
    noise seed is not free of training noise: the spread that matters is the one between
    training seeds (two supernets here, and stand-alone runs of one width on several seeds).
    """
    trained = TrainedSupernet.open(supernet_index(Path(per_supernet[0]["supernet"]), out))
    rows = []
    for run in runs:
        cfg, den, step = load_run(run)
        if cfg.num_experts != 1:
            raise UserError(f"--standalone {run}: a run of one network is compared with a uniform width, "
                            f"this one has {cfg.num_experts} experts")
        try:
            trained.spec.check(cfg.experts[0])
        except ConfigError as exc:
            raise UserError(f"--standalone {run}: not a sub-network of the supernets: {exc}") from None
        width = trained.spec.width_of(cfg.experts[0])
        den.to(device).eval()
        fids = fids_over_seeds(lambda seed: out / "sets" / f"standalone-{run.name}-s{seed}.json",
                               lambda seed: {"run": str(run), **fid_of(den, cfg.diffusion, cfg.data, seed, n, steps,
                                                                       batch, n_ref, device)},
                               seeds, f"stand-alone {run.name}")
        compute = json.loads((Path(run) / "compute.json").read_text())
        row = {"run": str(run), "width": width, "steps": step, "seed": json.loads((Path(run) / "options.json")
                                                                                  .read_text()).get("seed"),
               "train_tflops": compute["charged_tflops"], "gflops": cost_of_meme(cfg).gflops_mean,
               **fid_row(fids), "vs_supernets": []}
        for s in per_supernet:
            uni = {r["design"]: r for r in s["rows"]}.get(f"uniform-{width}")
            if uni:
                row["vs_supernets"].append({"supernet": s["supernet"], "train_tflops": s["entry"]["train_gflops"] / 1e3,
                                            "supernet_fid_mean": uni["fid_mean"],
                                            "same_noise": paired(fids, uni["fid"])})
        rows.append(row)
    return rows


def supernet_index(supernet: Path, out: Path) -> Path:
    """The supernet directory, or the copy of its index kept beside the study (``out/NAME/``)
    once the weights are gone: a stand-alone row needs the supernet's spec, not its weights."""
    if (supernet / INDEX).is_file():
        return supernet
    copy = out / supernet.name
    return copy if (copy / INDEX).is_file() else supernet      # neither: load_index names the missing file


def add_standalone(out: Path, runs: Sequence[Path], device: torch.device, command: str) -> dict[str, Any]:
    """Stand-alone runs joined to a finished study (``out/study.json``), sampled with the study's own
    protocol (seeds, n, DDIM steps, reference images): runs trained after the study join it without
    the supernets being sampled again. A run already in the study is scored again (its cached sets
    reused); rows of runs not named are kept."""
    path = out / "study.json"
    if not path.is_file():
        raise UserError(f"{out}: no study.json; run meme-nas slimmable study --out {out} first")
    result = json.loads(path.read_text())
    proto = result.get("protocol")
    if not proto:
        raise UserError(f"{path}: an unfinished study (no protocol); run the study again to finish it")
    new = standalone_rows(runs, result["supernets"], out, proto["seeds"], proto["n"], proto["steps"],
                          proto.get("batch", 100), proto["n_ref"], device)
    named = {r["run"] for r in new}
    result["standalone"] = [r for r in result.get("standalone", []) if r["run"] not in named] + new
    result["standalone_by_width"] = standalone_by_width(result["standalone"])
    result["standalone_commands"] = [*result.get("standalone_commands", []), command]
    atomic_write_json(result, path)
    (out / "study.md").write_text(report(result))
    plot(result, out / "study.png")
    return result


def against_study(mine: dict[str, Any], other: Path) -> dict[str, Any]:
    """This study's first supernet against another study's first supernet, design by design (a
    different training recipe on the same training seed, e.g. ``--distill``): the FID difference per
    noise seed. Both used the same noise, but they are different weights, so the spread between
    training seeds (the two supernets' full-width rows of one study) is the yardstick, not the
    paired std alone."""
    theirs = _other_study(other)
    by = {r["design"]: r for r in theirs["supernets"][0]["rows"]}
    rows = []
    for r in mine["rows"]:
        t = by.get(r["design"])
        same = t is not None and t["widths_per_bin"] == r["widths_per_bin"]   # a searched schedule may differ
        rows.append({"design": r["design"], "widths_per_bin": r["widths_per_bin"], "fid_mean": r["fid_mean"],
                     "their_widths_per_bin": t["widths_per_bin"] if t else None,
                     "their_fid_mean": t["fid_mean"] if t else None,
                     "their_fid_std": t["fid_std"] if t else None, "their_gflops": t["gflops"] if t else None,
                     "same_noise": paired(r["fid"], t["fid"]) if same else None})
    full = [next(x["fid_mean"] for x in s["rows"] if x["design"] == "uniform-1")
            for s in theirs["supernets"] if any(x["design"] == "uniform-1" for x in s["rows"])]
    return {"study": str(other), "supernet": theirs["supernets"][0]["supernet"],
            "their_entry": theirs["supernets"][0]["entry"], "rows": rows,
            "their_full_width_over_training_seeds": full}


def _other_study(other: Path, protocol: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Another finished study's result, refused when its noise seeds or FID protocol differ."""
    path = other / "study.json"
    if not path.is_file() or "protocol" not in json.loads(path.read_text()):
        raise UserError(f"--against {other}: no finished study there (study.json with its protocol)")
    theirs = json.loads(path.read_text())
    if protocol is not None:
        got = {k: theirs["protocol"].get(k) for k in protocol}
        if got != protocol:
            raise UserError(f"--against {other}: sampled with {got}, this study with {protocol}: "
                            f"not the same noise and FID protocol")
    return theirs


def ms_per_step(schedule: Schedule, trained: TrainedSupernet, batch: int) -> float:
    """Interval-weighted thread-CPU ms of one sampling step at ``batch``, per image."""
    cfg = schedule.config(trained.spec, trained.diffusion)
    lat = measure_meme(cfg, Setting(device="cpu", batch=batch, repeats=5, warmup=2, clock="cpu", threads=1))
    return lat.ms_mean / batch


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """a - b per seed (same noise): mean, sample std, n, and whether the mean exceeds twice its standard error."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    s = summarize(d)
    se = s.std / math.sqrt(s.n) if s.n > 1 else math.nan
    verdict = ("cannot tell apart" if not (se > 0) or abs(s.mean) <= 2 * se
               else ("better" if s.mean < 0 else "worse"))
    return {"diff_mean": s.mean, "diff_std": s.std, "n": s.n, "verdict": verdict}


def design_names(files: Sequence[Path]) -> dict[str, Path]:
    """A name per schedule file: its stem, or folder-stem when two files share a stem (two
    ``interval-opt`` outputs are both ``schedule.yaml``)."""
    stems = [Path(f).stem for f in files]
    names = {(Path(f).stem if stems.count(Path(f).stem) == 1 else f"{Path(f).parent.name}-{Path(f).stem}"): Path(f)
             for f in files}
    if len(names) < len(files):
        raise UserError(f"--schedules: two files share a folder and a name: {[str(f) for f in files]}")
    return names


def study(supernets: Sequence[Path], out: Path, *, bins: int, per_bin: int, match: Sequence[str],
          seeds: Sequence[int], n: int, steps: int, batch: int, n_ref: int, device: torch.device,
          command: str, headline: Optional[Sequence[str]] = None, headline_only: bool = False,
          standalone: Sequence[Path] = (), against: Optional[Path] = None,
          schedules: Sequence[Path] = ()) -> dict[str, Any]:
    """Every design on the first supernet, the headline rows (full width, and the uniform and
    searched schedules at each ``headline`` width) on the others, or everywhere with ``headline_only``.
    ``schedules``: schedule files (e.g. ``interval-opt``'s or a search winner's) sampled on every
    supernet of the study as further designs, paired with the rest."""
    extra = {f"file:{name}": Schedule.load(f) for name, f in design_names(schedules).items()}
    headline = list(match if headline is None else headline)
    if not set(headline) <= set(match):
        raise UserError(f"--headline {headline}: every headline width must be one of --match {list(match)}")
    if against is not None:                      # refused before anything is sampled
        _other_study(against, {"seeds": list(seeds), "n": n, "steps": steps, "n_ref": n_ref})
    out.mkdir(parents=True, exist_ok=True)
    (out / "sets").mkdir(exist_ok=True)
    per_supernet = []
    for k, path in enumerate(supernets):
        trained = TrainedSupernet.open(path)
        fr = compute_front(trained, bins, per_bin, "free", device)
        widths = fr.widths
        full = widths.index("1")
        designs: dict[str, Point] = {f"uniform-{w}": fr.uniform(i) for i, w in enumerate(widths)}
        for w in match:
            if w not in widths:
                raise UserError(f"--match {w}: not one of the supernet's widths {widths}")
            best = best_under(fr.points, fr.gflops[widths.index(w)])
            designs[f"searched@{w}"] = best
            designs[f"reversed@{w}"] = reverse(best, fr.gflops, fr.losses, fr.weights)
        if k > 0 or headline_only:   # other training seeds: the headline rows
            keep = {"uniform-1"} | {f"uniform-{w}" for w in headline} | {f"searched@{w}" for w in headline}
            designs = {name: p for name, p in designs.items() if name in keep}
        net = trained.weights(device)
        rows = []
        for name, p in designs.items():
            sched = fr.schedule(p, name)
            sched.save(out / f"{path.name}-{name.replace('@', '-at-').replace('/', '_')}.yaml")
            widths_key = "-".join(widths[w].replace("/", "_") for w in p.widths)   # by content: a reversed
            fids = fids_over_seeds(lambda seed: out / "sets" / f"{path.name}-{widths_key}-s{seed}.json",  # uniform
                                   lambda seed: sample_set(sched, trained, net, seed, n, steps, batch, n_ref,  # once
                                                           device), seeds, f"{path.name} {name}")
            rows.append({"design": name, "widths_per_bin": [widths[w] for w in p.widths],
                         "schedule": sched.to_dict(), "gflops": p.cost, "heldout_loss_sum": p.loss, **fid_row(fids)})
        for name, given in extra.items():
            sched = Schedule(given.boundaries, given.experts, str(path), name)
            try:
                cfg = sched.config(trained.spec, trained.diffusion)
            except ConfigError as exc:
                raise UserError(f"--schedules {name[5:]}: not a schedule of {path} ({exc})") from None
            loss, owners = schedule_loss(net, sched, Diffusion(trained.diffusion), fr.images, fr.bounds, per_bin,
                                         fr.seed, device)
            content = hashlib.sha1(json.dumps([list(sched.boundaries), [c.to_dict() for c in sched.experts]]
                                              ).encode()).hexdigest()[:10]
            fids = fids_over_seeds(lambda seed: out / "sets" / f"{path.name}-schedule-{content}-s{seed}.json",
                                   lambda seed: sample_set(sched, trained, net, seed, n, steps, batch, n_ref, device),
                                   seeds, f"{path.name} {name}")
            rows.append({"design": name, "widths_per_bin": owners, "schedule": sched.to_dict(),
                         "gflops": cost_of_meme(cfg).gflops_mean, "heldout_loss_sum": loss, **fid_row(fids)})
        by = {r["design"]: r for r in rows}
        full_ms = ms_per_step(fr.schedule(fr.uniform(full), "uniform-1"), trained, batch)
        for r in rows:
            r["ms_per_image_step"] = ms_per_step(Schedule.from_dict(r["schedule"]), trained, batch)
            r["speedup_vs_full"] = full_ms / r["ms_per_image_step"]
            r["gflops_ratio_vs_full"] = r["gflops"] / fr.gflops[full]
            r["vs_full"] = paired(r["fid"], by["uniform-1"]["fid"])
        for w in match:
            if f"searched@{w}" not in by:        # a headline-only supernet: not every width was sampled
                continue
            s = by[f"searched@{w}"]
            s["vs_uniform_same_cost"] = paired(s["fid"], by[f"uniform-{w}"]["fid"])
            if f"reversed@{w}" in by:
                by[f"reversed@{w}"]["vs_searched"] = paired(by[f"reversed@{w}"]["fid"], s["fid"])
        for name in extra:             # against the uniform width nearest its cost, and that cost's front schedule
            r = by[name]
            near = [x for x in match if f"uniform-{x}" in by]
            if not near:
                continue
            w = min(near, key=lambda x: abs(math.log(by[f"uniform-{x}"]["gflops"] / r["gflops"])))
            r["nearest_match"] = w
            r["vs_uniform_same_cost"] = paired(r["fid"], by[f"uniform-{w}"]["fid"])
            if f"searched@{w}" in by:
                r["vs_front_searched"] = paired(r["fid"], by[f"searched@{w}"]["fid"])
        ranking = None
        if len(rows) >= 3:
            ranking = {k2: v.__dict__ for k2, v in rank_correlation([r["heldout_loss_sum"] for r in rows],
                                                                     [r["fid_mean"] for r in rows]).items()}
        per_supernet.append({"supernet": str(path), "entry": {k2: v for k2, v in trained.entry.items() if k2 != "spec"},
                             "front": fr.to_dict(), "rows": rows, "heldout_vs_fid": ranking})
        atomic_write_json({"command": command, "supernets": per_supernet}, out / "study.json")
    result = {"command": command, "headline": headline_rows(per_supernet, headline),
              "protocol": {"bins": bins, "per_bin": per_bin, "seeds": list(seeds), "n": n, "steps": steps,
                           "n_ref": n_ref, "batch": batch, "sampler": "ddim", "timing": f"thread CPU time, 1 thread, batch {batch}"},
              "supernets": per_supernet,
              "standalone": standalone_rows(standalone, per_supernet, out, seeds, n, steps, batch, n_ref, device)}
    result["standalone_by_width"] = standalone_by_width(result["standalone"])
    if against is not None:
        result["against"] = against_study(per_supernet[0], against)
    atomic_write_json(result, out / "study.json")
    (out / "study.md").write_text(report(result))
    plot(result, out / "study.png")
    return result


def headline_rows(per_supernet: list[dict[str, Any]], headline: Sequence[str]) -> list[dict[str, Any]]:
    """Per headline width, the searched schedule against the uniform width of its cost and against
    full width, pooled over supernets: every (supernet, seed) difference is one paired value."""
    out = []
    for w in headline:
        vs_u, vs_f, gflops = [], [], []
        for s in per_supernet:
            by = {r["design"]: r for r in s["rows"]}
            if f"searched@{w}" in by:
                a = by[f"searched@{w}"]
                vs_u += [x - y for x, y in zip(a["fid"], by[f"uniform-{w}"]["fid"])]
                vs_f += [x - y for x, y in zip(a["fid"], by["uniform-1"]["fid"])]
                gflops.append(a["gflops_ratio_vs_full"])
        if vs_u:
            zero = [0.0] * len(vs_u)
            out.append({"width": w, "supernets": len(gflops), "gflops_ratio_vs_full": gflops,
                        "searched_vs_uniform": paired(vs_u, zero), "searched_vs_full": paired(vs_f, zero)})
    return out


def report(result: dict[str, Any]) -> str:
    lines = [f"# Slimmable study\n\nCommand: `{result['command']}`\n"]
    if result.get("headline"):
        table = [["searched at the GFLOPs of", "supernets", "x full GFLOPs", "FID vs uniform, same cost (paired)",
                  "FID vs full width (paired)"]]
        for h in result["headline"]:
            table.append([f"uniform {h['width']}", str(h["supernets"]),
                          ", ".join(f"{g:.2f}" for g in h["gflops_ratio_vs_full"]),
                          _fmt_pair(h["searched_vs_uniform"]) + f" (n={h['searched_vs_uniform']['n']})",
                          _fmt_pair(h["searched_vs_full"]) + f" (n={h['searched_vs_full']['n']})"])
        lines.append("\n## Headline, pooled over supernets and noise seeds\n")
        lines.append(markdown_table(table[0], table[1:]))
    for s in result["supernets"]:
        lines.append(f"\n## {s['supernet']} ({s['entry']['steps']} steps, seed {s['entry']['seed']}, "
                     f"{s['entry']['train_gflops'] / 1e3:.0f} training TFLOPs)\n")
        table = [["design", "widths per bin (t = 0 first)", "GFLOPs/step", "x full", "speed-up (CPU)",
                  "held-out loss", "FID", "paired vs full", "paired vs uniform, same cost"]]
        for r in s["rows"]:
            vs_u = r.get("vs_uniform_same_cost") or r.get("vs_searched")
            if r.get("nearest_match"):
                vs_u = r["vs_uniform_same_cost"]
            table.append([r["design"], " ".join(r["widths_per_bin"]), f"{r['gflops']:.3f}",
                          f"{r['gflops_ratio_vs_full']:.2f}", f"{r['speedup_vs_full']:.2f}x",
                          f"{r['heldout_loss_sum']:.4f}", f"{r['fid_mean']:.2f} +- {r['fid_std']:.2f}",
                          _fmt_pair(r["vs_full"]), _fmt_pair(vs_u) + (" (vs searched)" if "vs_searched" in r else "")
                          if vs_u else ""])
        lines.append(markdown_table(table[0], table[1:]))
        for r in s["rows"]:
            if r.get("vs_front_searched"):
                lines.append(f"\n{r['design']} (schedule file) against the front's searched@{r['nearest_match']}, "
                             f"paired: {_fmt_pair(r['vs_front_searched'])}.")
        if s["heldout_vs_fid"]:
            sp = s["heldout_vs_fid"]["spearman"]
            lines.append(f"\nHeld-out loss vs FID over these designs: Spearman {sp['value']:+.2f} "
                         f"[{sp['ci_low']:+.2f}, {sp['ci_high']:+.2f}].\n")
    if result.get("standalone"):
        lines.append("\n## Stand-alone networks: one width, trained from scratch\n")
        lines.append("Each run trains the sub-network's architecture alone with the supernet's recipe (batch, lr, "
                     "EMA) for the supernet's training FLOPs. FID over the same noise seeds; the difference to a "
                     "supernet's uniform row is per noise seed, so it still holds both trainings' seed noise.\n")
        table = [["width", "run (seed)", "GFLOPs/step", "training TFLOPs", "stand-alone FID",
                  "supernet uniform FID", "stand-alone - supernet (same noise)"]]
        for r in result["standalone"]:
            table.append([r["width"], f"{Path(r['run']).name} ({r['seed']})", f"{r['gflops']:.3f}",
                          f"{r['train_tflops']:.0f} vs " + ", ".join(f"{v['train_tflops']:.0f}" for v in r["vs_supernets"]),
                          f"{r['fid_mean']:.2f} +- {r['fid_std']:.2f}",
                          ", ".join(f"{v['supernet_fid_mean']:.2f}" for v in r["vs_supernets"]),
                          "; ".join(_fmt_pair(v["same_noise"]) for v in r["vs_supernets"])])
        lines.append(markdown_table(table[0], table[1:]))
        summary = standalone_by_width(result["standalone"])
        if any(w["standalone"][2] > 1 for w in summary):
            lines.append("\nOver training seeds (one FID per training, the mean over its noise seeds; Welch's t):\n")
            table = [["width", "stand-alone FID", "supernets' uniform FID", "stand-alone - supernets", "p", "verdict"]]
            for w in summary:
                c = w["welch"]
                table.append([w["width"], f"{w['standalone'][0]:.2f} +- {w['standalone'][1]:.2f} (n={w['standalone'][2]})",
                              f"{w['supernets'][0]:.2f} +- {w['supernets'][1]:.2f} (n={w['supernets'][2]})",
                              f"{c['diff']:+.2f}", f"{c['p_value']:.3f}" if c["p_value"] == c["p_value"] else "n/a",
                              c["verdict"]])
            lines.append(markdown_table(table[0], table[1:]))
    if result.get("against"):
        a = result["against"]
        e = a["their_entry"]
        lines.append(f"\n## Against {a['study']} (its first supernet: {e['steps']} steps, seed {e['seed']}, "
                     f"distill {e.get('distill', False)})\n")
        lines.append("Same noise seeds, different weights: the per-seed difference still holds training noise. "
                     "Full width over that study's training seeds: "
                     + ", ".join(f"{x:.2f}" for x in a["their_full_width_over_training_seeds"]) + ".\n")
        table = [["design", "widths per bin", "FID here", "FID there", "here - there (same noise)"]]
        for r in a["rows"]:
            there = r["their_fid_mean"]
            table.append([r["design"], " ".join(r["widths_per_bin"]), f"{r['fid_mean']:.2f}",
                          "" if there is None else f"{there:.2f}" + ("" if r["same_noise"] else
                                                                      " (" + " ".join(r["their_widths_per_bin"]) + ")"),
                          _fmt_pair(r["same_noise"]) if r["same_noise"] else "other schedule"])
        lines.append(markdown_table(table[0], table[1:]))
    return "\n".join(lines) + "\n"


def _fmt_pair(p: Optional[dict]) -> str:
    if not p:
        return ""
    return f"{p['diff_mean']:+.2f} +- {p['diff_std']:.2f} ({p['verdict']})"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    marks = {"uniform": ("o", "-"), "searched": ("*", ""), "reversed": ("x", ""), "file:": ("P", "")}
    for i, s in enumerate(result["supernets"]):
        for kind, (m, ls) in marks.items():
            rows = sorted([r for r in s["rows"] if r["design"].startswith(kind)], key=lambda r: r["gflops"])
            if rows:
                ax.errorbar([r["gflops"] for r in rows], [r["fid_mean"] for r in rows],
                            yerr=[r["fid_std"] for r in rows], marker=m, linestyle=ls or "none", capsize=3,
                            label=f"{'schedule file' if kind == 'file:' else kind} (supernet {i + 1})",
                            color=f"C{i * len(marks) + list(marks).index(kind)}")
    against = [r for r in (result.get("against") or {}).get("rows", []) if r.get("their_gflops") is not None]
    if against:     # the other recipe's first supernet, same designs, same noise
        ax.errorbar([r["their_gflops"] for r in against], [r["their_fid_mean"] for r in against],
                    yerr=[r["their_fid_std"] for r in against], marker="D", mfc="none", color="0.45",
                    linestyle="none", capsize=3, label=f"against {Path(result['against']['study']).name}")
    for k, r in enumerate(result.get("standalone", [])):
        ax.errorbar([r["gflops"]], [r["fid_mean"]], yerr=[r["fid_std"]], marker="s", color="k", linestyle="none",
                    capsize=3, label="stand-alone, same training FLOPs" if k == 0 else None)
    ax.set_xlabel("sampling GFLOPs per step (interval-weighted)")
    ax.set_ylabel("FID (mean +- std over noise seeds)")
    ax.set_title("One slimmable network: width schedules")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- CLI ------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(prog="meme-nas slimmable", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("front", help="per-interval losses of every width and the best schedule at every budget")
    f.add_argument("--supernet", required=True, type=Path, help="trained slimmable supernet directory")
    f.add_argument("--bins", type=int, default=10, help="intervals of t a schedule gives a width each (default %(default)s)")
    f.add_argument("--per-bin", type=int, default=4, help="timesteps scored per interval (default %(default)s)")
    f.add_argument("--monotone", choices=MONOTONE, default="free",
                   help="free, or wider_near_data: never wider at higher noise (default %(default)s)")
    f.add_argument("--budget-gflops", type=float, default=None, help="write the best schedule at this GFLOPs/step")
    f.add_argument("--budget-ms", type=float, default=None,
                   help="write the best schedule at this measured ms per image and step (CPU, 1 thread, --batch-size)")
    f.add_argument("--batch-size", type=int, default=64, help="batch of the --budget-ms timing (default %(default)s)")
    f.add_argument("--device", default="auto", help="torch device for the losses (default %(default)s)")
    f.add_argument("--out", type=Path, default=None, help="output folder (default SUPERNET/front)")
    add_fast_path_flag(f)
    s = sub.add_parser("study", help="uniform vs searched vs reversed schedules, FID paired over noise seeds")
    s.add_argument("--supernets", required=True, help="comma-separated trained supernet directories (training seeds)")
    s.add_argument("--out", required=True, type=Path, help="output folder of the study (resumable: run again to go on)")
    s.add_argument("--bins", type=int, default=10, help="intervals of t (default %(default)s)")
    s.add_argument("--per-bin", type=int, default=4, help="timesteps scored per interval (default %(default)s)")
    s.add_argument("--match", default="3/4,1/2", help="uniform widths whose GFLOPs the searched schedules match "
                                                     "(default %(default)s)")
    s.add_argument("--headline", default=None,
                   help="widths of the headline rows sampled on every supernet after the first (default: --match)")
    s.add_argument("--headline-only", action="store_true",
                   help="only the headline rows on every supernet (to run one supernet per process)")
    s.add_argument("--seeds", default="0,1,2", help="sampling-noise seeds, the same for every schedule (default %(default)s)")
    s.add_argument("--n", type=int, default=1000, help="samples per FID (default %(default)s)")
    s.add_argument("--n-ref", type=int, default=5000, help="real training images in the FID statistics (default %(default)s)")
    s.add_argument("--steps", type=int, default=25, help="DDIM steps (default %(default)s)")
    s.add_argument("--batch-size", type=int, default=100, help="samples per forward (default %(default)s)")
    s.add_argument("--standalone", default="",
                   help="comma-separated meme-nas train runs of one sub-network's architecture, from scratch (the "
                        "same training compute): each is sampled with --seeds beside its width's uniform rows")
    s.add_argument("--schedules", default="",
                   help="comma-separated schedule files (interval-opt's schedule.yaml, a search winner's) sampled as "
                        "further designs on every supernet, paired with the rest")
    s.add_argument("--against", type=Path, default=None,
                   help="another finished study (same seeds and FID protocol, another training recipe): its first "
                        "supernet's rows against this one's, design by design")
    s.add_argument("--device", default="auto", help="torch device (default %(default)s)")
    add_fast_path_flag(s)
    a = sub.add_parser("standalone", help="add networks trained alone at one width to a finished study, "
                                          "sampled with its protocol (the supernets are not needed again)")
    a.add_argument("--study", required=True, type=Path, help="the study's --out folder")
    a.add_argument("--runs", required=True, help="comma-separated meme-nas train runs of one uniform width's "
                                                 "architecture, trained from scratch")
    a.add_argument("--device", default="auto", help="torch device (default %(default)s)")
    add_fast_path_flag(a)
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.command == "front":
        trained = TrainedSupernet.open(args.supernet)
        if args.bins < 1 or args.per_bin < 1:
            raise UserError("--bins and --per-bin must be >= 1")
        costs = None
        if args.budget_ms is not None:
            costs = [ms_per_step(Schedule.uniform(w, trained.diffusion.timesteps), trained, args.batch_size)
                     for w in trained.spec.widths]
        fr = compute_front(trained, args.bins, args.per_bin, args.monotone, device, costs)
        out = args.out or args.supernet / "front"
        out.mkdir(parents=True, exist_ok=True)
        d = fr.to_dict()
        if costs:
            d["ms_per_width"] = costs
        atomic_write_json(d, out / "front.json")
        budget = args.budget_ms if args.budget_ms is not None else args.budget_gflops
        unit = "ms" if args.budget_ms is not None else "GFLOPs"
        for p in fr.points:
            print(f"{p.cost:8.4f} {unit}  loss {p.loss:.4f}  {' '.join(fr.widths[w] for w in p.widths)}")
        if budget is not None:
            best = best_under(fr.points, budget)
            if best is None:
                raise UserError(f"no schedule fits {budget} {unit}: the narrowest costs {min(p.cost for p in fr.points):.4g}")
            path = fr.schedule(best, f"best-{budget:g}{unit.lower()}").save(out / "best.yaml")
            print(f"best at {budget:g} {unit}: {best.cost:.4g} {unit}, held-out loss {best.loss:.4f} -> {path}")
        return 0
    command = "python -m nas.studies.slimmable " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.command == "standalone":
        add_standalone(args.study, [Path(x) for x in args.runs.split(",") if x.strip()], device, command)
        print((args.study / "study.md").read_text())
        return 0
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    supernets = [Path(x) for x in args.supernets.split(",") if x.strip()]
    result = study(supernets, args.out, bins=args.bins, per_bin=args.per_bin,
                   match=[str(x).strip() for x in args.match.split(",") if x.strip()], seeds=seeds, n=args.n,
                   steps=args.steps, batch=args.batch_size, n_ref=args.n_ref, device=device, command=command,
                   headline=None if args.headline is None else [x.strip() for x in args.headline.split(",") if x.strip()],
                   headline_only=args.headline_only,
                   standalone=[Path(x) for x in args.standalone.split(",") if x.strip()], against=args.against,
                   schedules=[Path(x) for x in args.schedules.split(",") if x.strip()])
    print((args.out / "study.md").read_text())
    return 0 if result else 1


if __name__ == "__main__":
    raise SystemExit(main())
