"""Clustered interval boundaries for a space: ``meme-nas clusters --space S``.

``search.boundaries.mode: cluster`` lets every multi-expert trial choose between uniform
intervals and the ones found here (``meme.sampling.timestep_clusters``: timesteps grouped by the
cosine similarity of a reference network's loss gradients, split into contiguous runs
exactly). The reference network is one iU-Net for all t (the space's hand design's
middle expert, else the template at mid-grid ratios), trained on the space's own proxy
recipe (``proxy.steps`` steps, its batch, lr and seed), so the profile costs about one
trial. Its gradients are taken on the proxy's fixed held-out batch and noise at
``--grid`` timesteps.

The result depends only on the space (its target, proxy and reference), so it is
computed once and cached on disk, keyed by that content, for every N the space offers;
``nas.search`` computes it before the first trial, so workers only read the file.
The command writes ``clusters.json`` (boundaries per N beside uniform, the similarity
matrix) and ``clusters.png`` (the matrix, with both sets of boundaries).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import torch

from meme.common.checkpoint import atomic_write_json
from meme.common.command import CommandParser, main_guard, setup_logging
from meme.common.device import pick_device
from meme.common.fastpath import fast_path
from meme.model.config import MemeConfig, uniform_boundaries
from meme.model.diffusion import Diffusion
from meme.model.experts import SoftExpertSampler, build_denoiser
from meme.sampling.timestep_clusters import boundaries_from_runs, gradient_profile, segment
from meme.training.train import draw_batch, train_step, warmup_lr
from nas.space.proxy import proxy_config
from nas.space.proxy_data import eval_timesteps, heldout_images, heldout_noise, proxy_dataset
from nas.space.space import SearchSpace, load_space

log = logging.getLogger("nas.space.clusters")
GRID = 40            # timesteps profiled
PROFILE_BATCH = 32   # held-out images the gradients are taken on
VERSION = 1          # bump when the method changes: cached results are then recomputed


def reference_network(space: SearchSpace) -> MemeConfig:
    """One iU-Net for all t, at the target shape: the hand design's middle expert, else mid-grid ratios."""
    if space.reference is not None:
        ref = space.reference
        arch = ref.experts[(ref.num_experts - 1) // 2]
    else:
        base = space.macro.base_channels[0]
        ratios = []
        for s in range(space.num_stages):
            grid = [g for g in space.stage_grid(base, s) if not ratios or g <= Fraction(ratios[-1])]
            ratios.append(str(grid[len(grid) // 2]))
        arch = space.arch(base, space.macro.num_res_blocks[0], space.macro.pool_strides[0], tuple(ratios))
    return MemeConfig(name=f"{space.name}-cluster-reference", experts=(arch,), data=space.data,
                      diffusion=space.diffusion).validate()


def cache_key(space: SearchSpace, grid: int) -> str:
    payload = json.dumps({"reference": reference_network(space).to_dict(), "proxy": dataclasses.asdict(space.proxy),
                          "grid": grid, "version": VERSION, "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


def cache_dir() -> Path:
    env = os.environ.get("MEME_CLUSTERS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "meme-nas" / "clusters"


def profile(space: SearchSpace, grid: int = GRID, device: Optional[str] = None) -> dict[str, Any]:
    """Train the reference network on the proxy and cluster its gradients: boundaries for every N."""
    t0 = time.perf_counter()
    proxy = space.proxy
    dev = pick_device(device)
    reference = reference_network(space)
    cfg = proxy_config(reference, proxy)
    torch.manual_seed(proxy.seed)
    model = build_denoiser(cfg)
    fp = fast_path(dev, "fp32", model)
    fp.prepare(model, dev)
    diffusion = Diffusion(cfg.diffusion)
    data = proxy_dataset(proxy.data, proxy.shape(), "train", proxy.limit_data)
    sampler = SoftExpertSampler(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=proxy.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(proxy.seed + 1)
    model.train()
    for step in range(proxy.steps):
        batch = draw_batch(data, sampler, 0, proxy.batch_size, gen, fp, dev)
        train_step(model.experts[0], model.experts[0].parameters(), batch, diffusion, opt, fp,
                   warmup_lr(proxy.lr, step, proxy.warmup), proxy.grad_clip)
    val = heldout_images(proxy)[:PROFILE_BATCH]
    x0, noise = fp.input(val, dev), fp.input(heldout_noise(val, proxy.seed), dev)
    ts = eval_timesteps(diffusion.T, grid)
    feats = gradient_profile(model.experts[0], diffusion, x0, noise, ts).cpu()
    T = diffusion.T
    found = {}
    for n in sorted(set(space.num_experts) | {2, 3, 4}):
        if 1 < n <= grid:
            found[str(n)] = list(boundaries_from_runs(ts, segment(feats, n), T))
    uniform = {n: uniform_boundaries(T, int(n)) for n in found}
    return {"space": space.name, "timesteps": ts, "boundaries": found, "uniform": uniform,
            "similarity": (feats @ feats.T).tolist(), "reference": reference.to_dict()["experts"][0],
            "proxy_steps": proxy.steps, "seconds": round(time.perf_counter() - t0, 1), "version": VERSION}


_MEMO: dict[str, dict[str, Any]] = {}   # per process: a worker reads the file once


def _cached(space: SearchSpace) -> dict[str, Any]:
    key = cache_key(space, GRID)
    if key in _MEMO:
        return _MEMO[key]
    path = cache_dir() / f"{key}.json"
    try:
        _MEMO[key] = json.loads(path.read_text())
        return _MEMO[key]
    except (OSError, ValueError):
        pass
    log.info("clustering timesteps for %s (trains one reference network on the proxy)", space.name)
    res = profile(space)
    try:
        atomic_write_json(res, path)
    except OSError as exc:
        log.warning("clustered boundaries not cached (%s)", exc)
    _MEMO[key] = res
    return res


def boundaries_for(space: SearchSpace, n_experts: int) -> tuple[int, ...]:
    """The clustered boundaries of ``n_experts`` intervals for ``space`` (computed once, then cached)."""
    found = _cached(space)["boundaries"]
    if str(n_experts) not in found:
        raise ValueError(f"no clustered boundaries for N={n_experts} (grid of {GRID} timesteps)")
    return tuple(found[str(n_experts)])


def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = res["uniform"][next(iter(res["uniform"]))][-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 1.2]})
    ax = axes[0]
    im = ax.imshow(res["similarity"], extent=(0, T, T, 0), cmap="viridis", vmin=-1, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="cosine of loss gradients")
    for b in res["boundaries"].get("4", [])[1:-1]:
        ax.axhline(b, color="w", lw=1)
        ax.axvline(b, color="w", lw=1)
    ax.set(title=f"{res['space']}: gradient similarity across t (N=4 clusters)", xlabel="t", ylabel="t")
    ax = axes[1]
    for i, n in enumerate(sorted(res["boundaries"], key=int)):
        for kind, y, c in (("uniform", i - 0.15, "0.6"), ("boundaries", i + 0.15, "tab:red")):
            b = res[kind][n]
            ax.hlines(y, 0, T, color=c, lw=1)
            ax.plot(b, [y] * len(b), "|", color=c, ms=14, mew=2)
    ax.set_yticks(range(len(res["boundaries"])), [f"N={n}" for n in sorted(res["boundaries"], key=int)])
    ax.set(xlabel="t", xlim=(0, T), title="boundaries: clustered (red) vs uniform (grey)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@main_guard
def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    p = CommandParser(prog="meme-nas clusters", description=__doc__.splitlines()[0])
    p.add_argument("--space", default="meme_ffhq256", help="space name or YAML (default %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="folder for clusters.json/.png (default results/clusters-SPACE)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    space = load_space(args.space)
    res = _cached(space)
    out = args.out or Path("results") / f"clusters-{space.name}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(res, out / "clusters.json")
    plot(res, out / "clusters.png")
    for n in sorted(res["boundaries"], key=int):
        print(f"N={n}: clustered {res['boundaries'][n]}   uniform {res['uniform'][n]}")
    print(f"wrote {out / 'clusters.json'} and {out / 'clusters.png'} ({res['seconds']} s to compute)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
