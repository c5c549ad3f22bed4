"""Fourier analysis of feature maps per expert: ``meme-nas frequency --run DIR``.

The paper's Fig. 3 and 6 (after Park & Kim 2022, "How do vision transformers work?"):
for every block of a network, Fourier-transform its output feature map, take the log
amplitude averaged over batch and channels, read it along the diagonal from the
zero frequency (centre) to the highest (pi), and subtract the value at zero. This
*relative log amplitude* at pi says how much high frequency a block keeps: a
conv-heavy block (high-pass) keeps more, an attention-heavy block (low-pass) less.

We do it for every expert at t in {125, 375, 625, 875} (the centres of the four
uniform intervals; ``--t`` changes them) on noised held-out data x_t = q_sample(x_0, t).
Outputs in ``RUN/frequency/``: ``frequency.csv`` (every curve), ``high_freq.csv``
(the value at pi per block), ``high_freq.png`` (value at pi vs depth, one panel per
expert, one line per t) and ``spectra.png`` (curves of the deepest encoder block).
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Optional

import pandas as pd
import torch
from torch import nn

from meme.common.command import CommandParser, main_guard, setup_logging
from meme.common.errors import UserError
from meme.data.dataset import load_data
from meme.data.latents import run_data_spec
from meme.model.diffusion import Diffusion
from meme.model.experts import MultiExpertDenoiser
from meme.sampling.sample import load_run

log = logging.getLogger("meme.sampling.frequency")
DEFAULT_TIMESTEPS = (125, 375, 625, 875)
# Blocks are the entries of the networks' resolution-keyed ModuleDicts ("enc.32x32_block0", ...).
_BLOCK = re.compile(r"(^|\.)(enc|mid|dec)\.(\d+)x\d+_[A-Za-z0-9_]+$")


# Park & Kim 2022, Sec. 2.2: log |F(x)| averaged over batch and channels, centred.
def log_amplitude(feature: torch.Tensor) -> torch.Tensor:
    f = torch.fft.fftshift(torch.fft.fft2(feature.float()), dim=(-2, -1))
    return (f.abs() + 1e-6).log().mean(dim=(0, 1))


# Relative log amplitude along the diagonal, 0 -> pi: Delta log amplitude of Fig. 3.
def relative_diagonal(log_amp: torch.Tensor) -> torch.Tensor:
    # After fftshift the zero frequency sits at h//2 and -pi (= pi for real input) at 0,
    # so walking the diagonal from the centre down to the corner covers 0 .. pi.
    h = log_amp.shape[-1]
    diag = log_amp.diagonal()[: h // 2 + 1].flip(0)
    return diag - diag[0]


def feature_blocks(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's blocks in forward order (encoder, middle, decoder)."""
    return [(name, m) for name, m in net.named_modules() if _BLOCK.search(name)]


@torch.no_grad()
def analyse_expert(net: nn.Module, x_t: torch.Tensor, t: int) -> list[dict]:
    """One row per (block, frequency) for this expert's features on x_t."""
    feats: dict[str, torch.Tensor] = {}
    blocks = feature_blocks(net)
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=name: feats.__setitem__(n, out))
             for name, m in blocks]
    try:
        net.eval()(x_t, torch.full((len(x_t),), t, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for depth, (name, _) in enumerate(blocks):
        curve = relative_diagonal(log_amplitude(feats[name]))
        n = len(curve)
        for k, v in enumerate(curve.tolist()):
            rows.append({"t": t, "depth": depth, "block": name, "resolution": feats[name].shape[-1],
                         "freq_over_pi": k / max(n - 1, 1), "rel_log_amp": v})
    return rows


def analyse(denoiser: MultiExpertDenoiser, diffusion: Diffusion, x0: torch.Tensor,
            timesteps=DEFAULT_TIMESTEPS, seed: int = 0) -> pd.DataFrame:
    """Every expert at every t, on the same x_0 and noise."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    rows = []
    for t in timesteps:
        x_t = diffusion.q_sample(x0, torch.full((len(x0),), t, dtype=torch.long), noise)
        for e, net in enumerate(denoiser.experts):
            for r in analyse_expert(net, x_t, t):
                rows.append({"expert": e, **r})
    return pd.DataFrame(rows)


def high_frequency_table(df: pd.DataFrame) -> pd.DataFrame:
    """The relative log amplitude at pi per (expert, t, block)."""
    last = df[df["freq_over_pi"] == 1.0]
    return last[["expert", "t", "depth", "block", "resolution", "rel_log_amp"]].reset_index(drop=True)


def _per_expert_figure(frames: dict[int, pd.DataFrame], x: str, xlabel: str, ylabel: str,
                       title: str, path: Path) -> Path:
    """One panel per expert, one line per t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(frames), figsize=(4 * len(frames), 3.2), sharey=True, squeeze=False)
    for ax, (e, frame) in zip(axes[0], frames.items()):
        for t, g in frame.groupby("t"):
            ax.plot(g[x], g["rel_log_amp"], marker=".", label=f"t={t}")
        ax.set_title(title.format(expert=e + 1))
        ax.set_xlabel(xlabel)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(df: pd.DataFrame, out: Path) -> list[Path]:
    """high_freq.png (value at pi vs depth) and spectra.png (deepest encoder block)."""
    hf = high_frequency_table(df)
    experts = sorted(hf["expert"].unique())
    p1 = _per_expert_figure({e: hf[hf["expert"] == e] for e in experts}, "depth", "block depth",
                            "Δ log amplitude at π", "expert {expert}", out / "high_freq.png")
    enc = df[df["block"].str.contains(r"(?:^|\.)enc\.")]
    deepest = enc.groupby("expert")["depth"].max()
    p2 = _per_expert_figure({e: enc[(enc["expert"] == e) & (enc["depth"] == deepest[e])] for e in experts},
                            "freq_over_pi", "frequency / π", "Δ log amplitude",
                            "expert {expert}: deepest encoder block", out / "spectra.png")
    return [p1, p2]


def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(prog="meme-nas frequency", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="training run directory (from meme.training.train)")
    p.add_argument("--data", default=None, help="held-out images to analyse (default: the run's training data spec)")
    p.add_argument("--n", type=int, default=32, help="held-out images to average over")
    p.add_argument("--t", type=int, nargs="+", default=list(DEFAULT_TIMESTEPS), help="timesteps t at which feature maps are analysed")
    p.add_argument("--out", type=Path, default=None, help="output folder for JSON and plots (default: RUN/frequency)")
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    cfg, denoiser, step = load_run(args.run)
    data_spec: Optional[str] = args.data if args.data is not None else run_data_spec(args.run)
    x0 = load_data(data_spec, cfg.data, "val", limit=args.n)
    diffusion = Diffusion(cfg.diffusion)
    bad = [t for t in args.t if not 0 <= t < diffusion.T]
    if bad:
        raise UserError(f"--t values must lie in [0, {diffusion.T}), got {bad}")
    log.info("Fourier analysis of %s (step %d): %d experts x %d timesteps on %d images",
             args.run, step, cfg.num_experts, len(args.t), len(x0))
    df = analyse(denoiser, diffusion, x0, args.t)
    out = args.out or args.run / "frequency"
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "frequency.csv", index=False)
    hf = high_frequency_table(df)
    hf.to_csv(out / "high_freq.csv", index=False)
    plots = plot(df, out)
    summary = hf.groupby(["expert", "t"])["rel_log_amp"].mean().unstack("t")
    print("mean Δ log amplitude at π over blocks (rows: expert, columns: t)")
    print(summary.round(3).to_string())
    print("wrote", out / "frequency.csv", *plots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

