"""Train the weight-shared supernets of a space: ``meme-nas supernet train --space S``.

One supernet (``meme.model.supernet.SuperNet``) per macro shape of the space (base width x
iFormer blocks per stage), at the proxy's scale and on the proxy's data, so that a
candidate's experts can be scored as sub-networks of it (``nas.evaluators.supernet_score``) instead of
being trained from scratch.

Training rule: **sandwich** (BigNAS). Every step draws one batch per sub-network for
the legal chain with the most conv channels (every high slice at its largest), the
legal chain with the most attention (every low slice at its largest), and ``random``
chains drawn the way the search draws an expert (uniform positions under the space's
depth rules); their losses are averaged into one AdamW step. The two extremes keep
every weight slice trained on every step (a uniform draw alone reaches the top of a
deep stage's grid only when every stage above is at its top too), the random ones train
the interactions in between. Timesteps are uniform over all of [0, T): the supernet
has to score every sub-network on every interval. Pool strides are drawn per
sub-network from the space's macro list.

**Slimmable** (``--widths 1/4,1/2,3/4,1``): the supernet also runs every width of the list
(``meme.model.supernet``, DDSM's slimmable network with per-segment slicing and groups
of a fixed size). The sandwich is then the full width with the most conv channels, the
narrowest width with its most attention, and random sub-networks of a uniformly drawn
width (at full width drawn as above, narrower uniformly among that width's legal splits).
``--distill`` adds in-place distillation (BigNAS, US-Nets): all sub-networks of a step see
one batch; the full-width one learns the true noise, every other one the full-width
prediction (detached). ``--distill-batch own`` gives each sub-network its own batch instead
(the very batches training without ``--distill`` draws) and runs the full width again on it
for the target. Training FLOPs count every sub-network's forward and backward, and those
teacher forwards.
``--ema-decay`` keeps an EMA of the weights (as ``meme-nas train`` does) and writes it as
``supernet.pt``: what a schedule samples should be averaged like a stand-alone network is.

Outputs, in ``--out`` (default ``results/supernet-<space>``): ``supernet.json`` (the
index: space, proxy, per macro its spec, digest, steps, training GFLOPs, wall time),
and per macro ``b<base>-r<blocks>/``: ``checkpoint.pt`` (atomic; weights, optimizer
and generator state, loadable with ``weights_only=True``), ``metrics.csv`` and, when
done, ``supernet.pt`` (weights only). Running the same command again resumes; a larger
``--steps`` continues a finished supernet (the learning rate is constant after warm-up).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import torch

from meme.common.checkpoint import applying, atomic_save, atomic_write_json
from meme.common.checkpoint import load as load_file
from meme.common.command import CommandParser, add_fast_path_flag, main_guard
from meme.common.device import pick_device
from meme.common.errors import ConfigError, UserError
from meme.common.fastpath import fast_path
from meme.model.config import ArchConfig, MemeConfig, parse_fraction
from meme.model.diffusion import Diffusion
from meme.model.macs import cost_of_network
from meme.model.supernet import INDEX, SuperNet, SupernetSpec
from meme.training.train import EMA, NonFiniteLoss, warmup_lr
from nas.space.draw import pick, ratio_choices
from nas.space.proxy import proxy_arch
from nas.space.proxy_data import proxy_dataset
from nas.space.space import SearchSpace, load_space


def macro_name(base: int, blocks: int) -> str:
    """Directory of one macro shape's supernet (target-scale base width)."""
    return f"b{base}-r{blocks}"


def macro_of(cfg_or_arch: MemeConfig | ArchConfig) -> tuple[int, int]:
    a = cfg_or_arch.experts[0] if isinstance(cfg_or_arch, MemeConfig) else cfg_or_arch
    return a.base_channels, a.num_res_blocks


def spec_for(space: SearchSpace, base: int, blocks: int, widths: tuple[str, ...] = ("1",),
             group_channels: int = 0) -> SupernetSpec:
    """The supernet of one macro shape, at the proxy's scale (head-step grids are identical there);
    with several ``widths``, slimmable, its GroupNorm groups ``group_channels`` wide (0: auto)."""
    pools = sorted({tuple(p) for p in space.macro.pool_strides})
    strides = tuple(tuple(sorted({p[s] for p in pools})) for s in range(space.num_stages))
    grids = tuple(tuple(str(g) for g in space.stage_grid(base, s)) for s in range(space.num_stages))
    target = space.arch(base, blocks, pools[0], tuple(g[0] for g in grids))
    template = proxy_arch(target, space.proxy, where=f"{space.source}: supernet (base {base})")
    if len(widths) > 1:
        template = dataclasses.replace(template, group_channels=group_channels or template.group_channels
                                       or auto_group_channels(template.base_channels, widths))
    try:
        return SupernetSpec(template, space.proxy.shape(), grids, strides, tuple(widths)).validate()
    except ConfigError as exc:
        raise UserError(f"{space.source} (base {base}, proxy base {template.base_channels}): {exc}") from None


def auto_group_channels(base: int, widths: tuple[str, ...]) -> int:
    """Channels per GroupNorm group of a slimmable supernet: the largest that divides every
    width's base channels, at most 8 (a group at the narrowest width is then still several
    channels wherever the widths allow it)."""
    subs = [parse_fraction(w, "width") * base for w in widths]
    g = math.gcd(*[int(b) for b in subs if b.denominator == 1]) if all(b.denominator == 1 for b in subs) else 1
    return max(1, min(g, 8))


def slimmable_widths(space: SearchSpace, widths: Optional[tuple[str, ...]], group_channels: int) -> tuple[str, ...]:
    """The widths a supernet of ``space`` trains: the asked ones, by default the space's own.

    A space whose experts are widths of one network (``search.widths`` scope network) draws
    sub-networks that the supernet must run: every width of the space, and GroupNorm groups
    of the space's ``group_channels``; anything else is refused here, not at the first score."""
    drawn = space.widths.choices if space.widths.whole_network else ("1",)
    widths = tuple(widths) if widths else drawn
    missing = [w for w in drawn if w not in widths]
    if missing:
        raise UserError(f"{space.source} draws experts of widths {list(drawn)}: the supernet needs {missing} too "
                        f"(--widths {','.join(sorted(set(widths) | set(drawn), key=Fraction))})")
    own = space.template.group_channels
    if space.widths.whole_network and group_channels and own and group_channels != own:
        raise UserError(f"{space.source}: its experts have GroupNorm groups of {own} channels "
                        f"(target.expert.group_channels), not {group_channels}; leave --group-channels out")
    return widths


def parse_widths(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """'1/4,1/2,1' -> ('1/4', '1/2', '1'), sorted, 1 added when missing; None when not given."""
    if not text:
        return None
    try:
        fracs = sorted({parse_fraction(w, "--widths") for w in text.split(",") if w.strip()} | {parse_fraction(1, "")})
    except ConfigError as exc:
        raise UserError(f"--widths: {exc}") from None
    if fracs[0] <= 0 or fracs[-1] > 1:
        raise UserError(f"--widths must lie in (0, 1], got {text}")
    return tuple(str(f) for f in fracs)


def sandwich(space: SearchSpace, spec: SupernetSpec, base: int, gen: torch.Generator,
             random_subnets: int) -> list[ArchConfig]:
    """One step's sub-networks: the largest, the smallest, then ``random_subnets`` random ones."""
    n = space.num_stages
    top = spec.arch(*sample_chain(space, base, gen, 1.0))
    if len(spec.widths) == 1:
        bottom = spec.arch(*sample_chain(space, base, gen, 0.0))
    else:
        bottom = spec.narrowest()
    out = [top, bottom]
    for _ in range(random_subnets):
        w = spec.widths[int(torch.randint(len(spec.widths), (), generator=gen))] if len(spec.widths) > 1 else "1"
        if w == "1":
            out.append(spec.arch(*sample_chain(space, base, gen)))
            continue
        ratios = []
        for s in range(n):
            legal = spec.legal_ratios(s, w)
            ratios.append(legal[int(torch.randint(len(legal), (), generator=gen))])
        pools = space.macro.pool_strides[int(torch.randint(len(space.macro.pool_strides), (), generator=gen))]
        out.append(spec.arch(ratios, pools, w))
    return out


def sample_chain(space: SearchSpace, base: int, gen: torch.Generator, position: Optional[float] = None) -> tuple:
    """(ratios, pools) of one expert drawn as the search draws expert 1 (``position``: fixed, else uniform)."""
    row = []
    for s in range(space.num_stages):
        legal = ratio_choices(space, base, s, row[s - 1] if s else None, None)
        u = position if position is not None else float(torch.rand((), generator=gen))
        row.append(pick(legal, u))
    pools = space.macro.pool_strides[int(torch.randint(len(space.macro.pool_strides), (), generator=gen))]
    return tuple(str(r) for r in row), tuple(pools)


@dataclass(frozen=True)
class TrainPlan:
    """One supernet's training run (picklable: it crosses to a worker process)."""

    space: str                 # space path
    base: int                  # target-scale macro shape
    blocks: int
    out: str                   # this macro's directory
    steps: int
    random_subnets: int = 2    # random chains per step, besides the two extremes
    lr: float = 1e-3
    warmup: int = 10
    batch_size: int = 32
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    widths: tuple[str, ...] = ("1",)   # slimmable: the widths a sub-network may run
    group_channels: int = 0            # slimmable: channels per GroupNorm group (0: auto)
    distill: bool = False              # slimmable: narrower sub-networks learn the full width's prediction
    distill_batch: str = "shared"      # distill: 'shared' (one batch per step) or 'own' (each its own, teacher re-run)
    ema_decay: float = 0.0             # > 0: supernet.pt holds the EMA of the weights
    device: Optional[str] = None
    progress: bool = True
    position: int = 0          # progress bar row


def _uniform_t(T: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, T, (n,), generator=gen)


def train_supernet(plan: TrainPlan) -> dict[str, Any]:
    """Train (or resume) one macro's supernet; returns its index entry."""
    torch.set_num_threads(1)
    space = load_space(plan.space)
    spec = spec_for(space, plan.base, plan.blocks, plan.widths, plan.group_channels)
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    dev = pick_device(plan.device)
    proxy = space.proxy
    diffusion = Diffusion(proxy.diffusion or space.diffusion)
    train = proxy_dataset(proxy.data, proxy.shape(), "train", proxy.limit_data)

    torch.manual_seed(plan.seed)
    net = SuperNet(spec)
    fp = fast_path(dev, proxy.precision, net)
    fp.prepare(net, dev)
    opt = torch.optim.AdamW(net.parameters(), lr=plan.lr, weight_decay=0.0)
    ema = EMA(net, plan.ema_decay) if plan.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(plan.seed + 1)
    step, train_gflops, wall = 0, 0.0, 0.0
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        state = load_file(ckpt, what="supernet checkpoint")
        with applying(ckpt, "supernet checkpoint"):
            if state["spec_digest"] != spec.digest():
                raise UserError(f"{ckpt}: a supernet of another shape (spec {state['spec_digest']}, "
                                f"this space gives {spec.digest()}); use another --out")
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if ema is not None:
                if "ema" not in state:
                    raise UserError(f"{ckpt}: trained without --ema-decay; resume without it or use another --out")
                ema.module.load_state_dict(state["ema"])
                ema.n_averaged.fill_(int(state["ema_n"]))
            gen.set_state(state["generator"])
            step, train_gflops, wall = int(state["step"]), float(state["train_gflops"]), float(state["wall_s"])
    if step >= plan.steps:
        return _finish(ema.module if ema else net, spec, plan, out, step, train_gflops, wall)

    def fwd_gflops(arch: ArchConfig) -> float:   # iU-Nets are counted by parts: a new chain costs its new blocks
        return cost_of_network(arch, spec.data).gflops

    metrics = out / "metrics.csv"
    if metrics.is_file():  # rows written after the last checkpoint are trained again: drop them
        rows = metrics.read_text().splitlines()
        keep = rows[:1] + [r for r in rows[1:] if r.split(",")[0].isdigit() and int(r.split(",")[0]) <= step]
        metrics.write_text("\n".join(keep) + "\n")
    new_file = not metrics.is_file()
    bar = None
    if plan.progress:
        from tqdm import tqdm
        bar = tqdm(total=plan.steps, initial=step, desc=macro_name(plan.base, plan.blocks), unit="step",
                   position=plan.position, file=sys.stdout, disable=None, leave=True)
    t0 = time.perf_counter() - wall
    with open(metrics, "a", newline="") as fh:
        w = csv.writer(fh)
        if new_file:
            # loss_most_attention: the narrowest width's when slimmable (against the full width's prediction
            # under --distill)
            w.writerow(["step", "loss_mean", "loss_most_conv", "loss_most_attention", "lr", "train_gflops", "wall_s"])
        net.train()
        while step < plan.steps:
            archs = sandwich(space, spec, plan.base, gen, plan.random_subnets)
            lr = warmup_lr(plan.lr, step, plan.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            losses = []
            teacher = None
            own_batches = not plan.distill or plan.distill_batch == "own"
            for k, arch in enumerate(archs):
                if k == 0 or own_batches:   # shared distillation: one batch for all, the first draws it
                    idx = torch.randint(len(train), (plan.batch_size,), generator=gen)
                    x0 = fp.input(train[idx], dev)
                    t = _uniform_t(diffusion.T, plan.batch_size, gen).to(dev)
                    noise = fp.input(torch.randn(x0.shape, generator=gen), dev)
                    x_t = diffusion.q_sample(x0, t, noise)
                with fp.autocast():
                    eps = net.run(arch, x_t, t).float()
                if teacher is not None and own_batches:   # the full width again, on this student's batch
                    with torch.no_grad(), fp.autocast():
                        teacher = net.run(archs[0], x_t, t).float()
                    train_gflops += plan.batch_size * fwd_gflops(archs[0])
                target = teacher if teacher is not None else noise.float()
                loss = torch.nn.functional.mse_loss(eps, target)
                if plan.distill and teacher is None:
                    teacher = eps.detach()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteLoss(value)
                (loss / len(archs)).backward()
                losses.append(value)
                train_gflops += 3.0 * plan.batch_size * fwd_gflops(arch)
            if plan.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), plan.grad_clip)
            opt.step()
            if ema is not None:
                ema.update_parameters(net)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", refresh=False)
            w.writerow([step, round(sum(losses) / len(losses), 6), round(losses[0], 6), round(losses[1], 6),
                        lr, round(train_gflops, 1), round(time.perf_counter() - t0, 2)])
            if step % plan.checkpoint_every == 0 or step == plan.steps:
                fh.flush()
                atomic_save({"model": net.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                             "step": step, "train_gflops": train_gflops, "wall_s": time.perf_counter() - t0,
                             "spec_digest": spec.digest(),
                             **({"ema": ema.module.state_dict(), "ema_n": int(ema.n_averaged)} if ema else {})}, ckpt)
    if bar is not None:
        bar.close()
    return _finish(ema.module if ema else net, spec, plan, out, step, train_gflops, time.perf_counter() - t0)


def _finish(net: SuperNet, spec: SupernetSpec, plan: TrainPlan, out: Path, step: int, train_gflops: float,
            wall: float) -> dict[str, Any]:
    weights = out / "supernet.pt"
    atomic_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, weights)
    return {"dir": out.name, "base": plan.base, "blocks": plan.blocks, "spec": spec.to_dict(),
            "spec_digest": spec.digest(), "steps": step, "random_subnets": plan.random_subnets,
            "subnets_per_step": 2 + plan.random_subnets, "lr": plan.lr, "batch_size": plan.batch_size,
            "seed": plan.seed, "train_gflops": round(train_gflops, 1), "wall_s": round(wall, 1),
            "widths": list(spec.widths), "distill": plan.distill,
            **({"distill_batch": plan.distill_batch} if plan.distill else {}), "ema_decay": plan.ema_decay, "diffusion": dataclasses.asdict(diffusion_of(plan)),
            "weights_sha1": _sha1(weights)}


def diffusion_of(plan: TrainPlan):
    """The noise schedule the supernet was trained on (a schedule samples with it)."""
    space = load_space(plan.space)
    return space.proxy.diffusion or space.diffusion


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def macros_to_train(space: SearchSpace, wanted: Optional[str]) -> list[tuple[int, int]]:
    """Every (base, blocks) of the space, or those named in ``wanted`` ('128:1,128:2').

    A candidate whose macro has no supernet cannot be scored: the search records it
    FAIL with that reason, so train every macro the budget admits.
    """
    every = [(b, r) for b in space.macro.base_channels for r in space.macro.num_res_blocks]
    if not wanted:
        return every
    out = []
    for part in wanted.split(","):
        try:
            b, r = (int(x) for x in part.split(":"))
        except ValueError:
            raise UserError(f"--macros: {part!r} is not BASE:BLOCKS (e.g. 128:2)") from None
        if (b, r) not in every:
            raise UserError(f"--macros: {b}:{r} is not a macro shape of {space.source} ({every})")
        out.append((b, r))
    return out


def train_all(space_spec: str, out: Path, steps: int, *, macros: Optional[str] = None, jobs: int = 1,
              random_subnets: int = 2, seed: int = 0, device: Optional[str] = None,
              progress: bool = True, widths: Optional[tuple[str, ...]] = None, group_channels: int = 0,
              distill: bool = False, ema_decay: float = 0.0, distill_batch: str = "shared") -> dict[str, Any]:
    """Every macro's supernet (in ``jobs`` processes), then the index ``supernet.json``.

    ``widths`` None: the space's (``search.widths`` of scope network), else full width only."""
    space = load_space(space_spec)
    widths = slimmable_widths(space, widths, group_channels)
    shapes = macros_to_train(space, macros)
    p = space.proxy
    plans = [TrainPlan(space=space.source, base=b, blocks=r, out=str(out / macro_name(b, r)), steps=steps,
                       random_subnets=random_subnets, lr=p.lr, warmup=p.warmup, batch_size=p.batch_size,
                       grad_clip=p.grad_clip, seed=seed, device=device, progress=progress, position=i,
                       widths=tuple(widths), group_channels=group_channels, distill=distill, ema_decay=ema_decay,
                       distill_batch=distill_batch)
             for i, (b, r) in enumerate(shapes)]
    t0 = time.perf_counter()
    if jobs <= 1:
        entries = [train_supernet(pl) for pl in plans]
    else:
        import multiprocessing as mp
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            entries = list(ex.map(train_supernet, plans))
    old = json.loads((out / INDEX).read_text()) if (out / INDEX).is_file() else {}
    entries = [e for k, e in old.get("macros", {}).items() if k not in {x["dir"] for x in entries}] + entries
    rule = ("sandwich: most conv + most attention + random chains" if len(widths) == 1 else
            "sandwich: full width most conv + narrowest + random widths and chains"
            + (f", in-place distillation from the full width ({distill_batch} batches)" if distill else ""))
    index = {"space": space.name, "space_source": space.source, "proxy": p.training_digest(), "rule": rule,
             "macros": {e["dir"]: e for e in entries},
             "train_gflops_total": round(sum(e["train_gflops"] for e in entries), 1),
             "wall_s_this_run": round(time.perf_counter() - t0, 1)}
    index["digest"] = hashlib.sha1(json.dumps({k: v["weights_sha1"] for k, v in sorted(index["macros"].items())},
                                              sort_keys=True).encode()).hexdigest()[:16]
    atomic_write_json(index, out / INDEX)
    return index


def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(prog="meme-nas supernet", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) every macro shape's supernet of a space")
    t.add_argument("--space", default=None, help="search space (default meme_ffhq256)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps per supernet (default: space's "
                                                           "supernet_steps, else 400)")
    t.add_argument("--random-subnets", type=int, default=2, help="random chains per step besides the two extremes")
    t.add_argument("--macros", default=None, help="only these macro shapes, BASE:BLOCKS,... (default: all)")
    t.add_argument("--jobs", type=int, default=None, help="supernets trained side by side (default: CPU cores, max 2)")
    t.add_argument("--seed", type=int, default=0, help="seed of initial weights, batches and sub-network draws")
    t.add_argument("--widths", default=None,
                   help="slimmable: channel widths a sub-network may run, e.g. 1/4,1/2,3/4,1 (default: the space's "
                        "search.widths of scope network, else full width only)")
    t.add_argument("--group-channels", type=int, default=0,
                   help="slimmable: channels per GroupNorm group (default 0: the largest dividing every width, max 8)")
    t.add_argument("--ema-decay", type=float, default=0.0,
                   help="keep an EMA of the weights with this decay and write it as supernet.pt (default 0: none)")
    t.add_argument("--distill", action="store_true",
                   help="slimmable: in-place distillation, narrower sub-networks learn the full width's prediction "
                        "(on fmnist32-slim it made every width 87-155 FID worse, with one batch or own batches: "
                        "docs/results/slimmable.md)")
    t.add_argument("--distill-batch", choices=("shared", "own"), default="shared",
                   help="--distill: 'shared', one batch per step for every sub-network (the full width's prediction "
                        "on it is the target); 'own', each sub-network its own batch, as without --distill, the full "
                        "width run again on it (one more forward each)")
    t.add_argument("--device", default=None, help="torch device to train on (default: cuda when available)")
    t.add_argument("--out", type=Path, default=None, help="output folder for the supernets (default: results/supernet-<space>)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    add_fast_path_flag(t)
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    import os

    args = parse_args(argv)
    space = load_space(args.space)
    steps = args.steps if args.steps is not None else int(space.defaults.get("supernet_steps", 400))
    if steps < 1 or args.random_subnets < 0:
        raise UserError("--steps must be >= 1 and --random-subnets >= 0")
    out = args.out or Path("results") / f"supernet-{space.name}"
    jobs = args.jobs or min(2, os.cpu_count() or 1)
    widths = slimmable_widths(space, parse_widths(args.widths), args.group_channels)
    if not 0.0 <= args.ema_decay < 1.0:
        raise UserError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
    if args.group_channels < 0:
        raise UserError("--group-channels must be >= 0")
    if (args.distill or args.group_channels) and len(widths) == 1:
        raise UserError("--distill and --group-channels need --widths with more than one width")
    index = train_all(space.source, out, steps, macros=args.macros, jobs=jobs,
                      random_subnets=args.random_subnets, seed=args.seed, device=args.device, progress=not args.quiet,
                      widths=widths, group_channels=args.group_channels, distill=args.distill,
                      distill_batch=args.distill_batch,
                      ema_decay=args.ema_decay)
    for name, e in index["macros"].items():
        print(f"{name}: {e['steps']} steps x {e['subnets_per_step']} sub-networks, "
              f"{e['train_gflops'] / 1e3:.1f} training TFLOPs, {e['wall_s']:.0f} s")
    print(f"supernets of {space.name} in {out}/ (digest {index['digest']}); search with:\n"
          f"  python -m nas.search --space {args.space or space.name} --evaluator supernet --supernet {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
