"""Training a small first-stage AutoencoderKL: ``meme-nas autoencoder train``.

Sized for one CPU core in minutes (Fashion-MNIST 1x32x32 -> 4x8x8 by default, f=4 as
LDM's KL-f4). The loss is LDM's without its perceptual and GAN terms: per-image summed
squared error plus a small KL (``kl_weight``) that keeps the latent space smooth enough
to diffuse in. Reported on held-out images: reconstruction MSE and PSNR (on [0, 1]
pixels), and rFID, the FID of reconstructions against the very images reconstructed
(``meme.sampling.evaluate`` protocol). The model is saved with ``save_pretrained`` (diffusers
format, loadable by ``--vae DIR``) with ``scaling_factor`` set to the measured 1/std of
the latents, beside ``metrics.json`` and a grid of originals over reconstructions.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from meme.common.checkpoint import atomic_write_json
from meme.common.device import pick_device
from meme.common.errors import UserError
from meme.common.images import save_grid, to_uint8
from meme.data.dataset import load_data
from meme.model.config import DataShape
from meme.model.experts import count_params
from meme.sampling.evaluate import fid_from_features, inception_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AETrainOptions:
    """Everything that determines a trained autoencoder (written to metrics.json)."""

    data: str = "fashion-mnist"      # meme.data.dataset image spec
    channels: int = 1                # image channels
    resolution: int = 32             # image side
    latent_channels: int = 4
    widths: tuple[int, ...] = (32, 64, 64)  # encoder blocks; len-1 downsamplings (3 -> f=4)
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-4          # on summed per-image KL vs summed squared error
    seed: int = 0
    n_eval: int = 500                # held-out images for MSE/PSNR/rFID
    device: str = "auto"
    threads: int | None = None


def build_autoencoder(o: AETrainOptions):
    """A small diffusers AutoencoderKL (GroupNorm groups fitted to the narrowest block)."""
    from diffusers import AutoencoderKL  # optional dependency (extra [latent])

    return AutoencoderKL(in_channels=o.channels, out_channels=o.channels, latent_channels=o.latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * len(o.widths),
                         up_block_types=("UpDecoderBlock2D",) * len(o.widths),
                         block_out_channels=tuple(o.widths), layers_per_block=1,
                         norm_num_groups=math.gcd(*o.widths, 32), sample_size=o.resolution)


def loss_terms(vae, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed squared error, KL) per image, averaged over the batch."""
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(x.device)
    recon = vae.decode(z).sample
    sse = (recon - x).pow(2).flatten(1).sum(1).mean()
    return sse, dist.kl().mean()


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructions in [-1, 1], posterior means) of x, deterministic."""
    recons, zs = [], []
    for i in range(0, len(x), batch_size):
        z = vae.encode(x[i:i + batch_size]).latent_dist.mean
        recons.append(vae.decode(z).sample.clamp(-1, 1))
        zs.append(z)
    return torch.cat(recons), torch.cat(zs)


def pixel_metrics(x: torch.Tensor, recon: torch.Tensor) -> dict:
    """MSE and PSNR on [0, 1] pixels."""
    mse = float(((recon - x) / 2).pow(2).mean())
    return {"mse": mse, "psnr_db": 10 * math.log10(1.0 / mse), "n_eval": len(x)}


def reconstruction_fid(x: torch.Tensor, recon: torch.Tensor, device) -> float:
    """rFID: FID of reconstructions against the same originals (meme.sampling.evaluate's features)."""
    real = inception_features(to_uint8(x), device=device, progress=True)
    fake = inception_features(to_uint8(recon), device=device, progress=True)
    return fid_from_features(real, fake)


def train_autoencoder(o: AETrainOptions, out: Path, progress: bool = True) -> dict:
    """Train, measure and save to ``out`` (which must not exist); returns the metrics."""
    if out.exists():
        raise UserError(f"--out {out} already exists: delete it or choose another directory")
    if o.steps < 1 or o.batch_size < 1 or o.n_eval < 2:
        raise UserError("--steps and --batch-size must be >= 1, --n-eval >= 2")
    device = pick_device(o.device)
    if o.threads:
        torch.set_num_threads(o.threads)
    shape = DataShape(o.channels, o.resolution, latent=False)
    train = load_data(o.data, shape, "train")
    val = load_data(o.data, shape, "val", limit=o.n_eval)
    torch.manual_seed(o.seed)
    vae = build_autoencoder(o).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=o.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, o.lr, total_steps=o.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(o.seed + 1)
    pixels = o.channels * o.resolution ** 2
    log.info("training AutoencoderKL %.2fM params on %d images, %d steps", count_params(vae)
             / 1e6, len(train), o.steps)
    bar = tqdm(range(o.steps), desc="autoencoder", unit="step", disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        x = train[torch.randint(len(train), (o.batch_size,), generator=gen)].to(device)
        sse, kl = loss_terms(vae, x, gen)
        loss = (sse + o.kl_weight * kl) / pixels
        value = float(loss.detach())
        if not math.isfinite(value):
            raise UserError(f"autoencoder loss is {value} at step {step}: lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{float(sse.detach()) / pixels / 4:.5f}", kl=f"{float(kl.detach()):.1f}")
    train_s = time.perf_counter() - t0
    vae.eval()
    recon, z = reconstruct(vae, val.to(device))
    recon = recon.cpu()
    scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale)
    metrics = {**pixel_metrics(val, recon), "rfid": None, "scaling_factor": scale, "latent_std": float(z.std()),
               "latent_shape": list(z.shape[1:]), "params": count_params(vae),
               "train_s": round(train_s, 1), "device": str(device), "threads": torch.get_num_threads(),
               "options": dataclasses.asdict(o)}
    _save(vae, metrics, torch.cat([val[:32], recon[:32]]), out, save_grid)  # the model first: rFID is slow
    metrics["rfid"] = reconstruction_fid(val, recon, device)
    atomic_write_json(metrics, out / "metrics.json")
    return metrics


def _save(vae, metrics: dict, grid: torch.Tensor, out: Path, save_grid) -> None:
    """Model, metrics and grid into a temporary sibling, then one rename: never half a directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; a model directory is as readable as any other result
    try:
        vae.save_pretrained(tmp)
        atomic_write_json(metrics, tmp / "metrics.json")
        save_grid(grid, tmp / "reconstructions.png", nrow=8)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def add_train_parser(sub) -> None:
    """The ``train`` subcommand of ``meme-nas autoencoder``; flags mirror AETrainOptions."""
    d = AETrainOptions()
    t = sub.add_parser("train", help="train a small AutoencoderKL and report MSE, PSNR and rFID")
    t.add_argument("--data", default=d.data, help="images: 'fashion-mnist' or a folder (default %(default)s)")
    t.add_argument("--out", required=True, type=Path, help="directory to create (diffusers format + metrics.json)")
    t.add_argument("--channels", type=int, default=d.channels, choices=(1, 3), help="image channels (default %(default)s)")
    t.add_argument("--resolution", type=int, default=d.resolution, help="image side (default %(default)s)")
    t.add_argument("--latent-channels", type=int, default=d.latent_channels, help="latent channels (default %(default)s)")
    t.add_argument("--widths", type=int, nargs="+", default=list(d.widths),
                   help="encoder block widths; k blocks downsample by 2^(k-1) (default %(default)s)")
    t.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step (default %(default)s)")
    t.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate, one-cycle (default %(default)s)")
    t.add_argument("--kl-weight", type=float, default=d.kl_weight, help="weight of the KL term (default %(default)s)")
    t.add_argument("--seed", type=int, default=d.seed, help="init, batches and posterior noise (default %(default)s)")
    t.add_argument("--n-eval", type=int, default=d.n_eval, help="held-out images for MSE/PSNR/rFID (default %(default)s)")
    t.add_argument("--device", default=d.device, help="torch device: auto, cpu, cuda ... (default %(default)s)")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)")


def run_training(args: argparse.Namespace) -> dict:
    o = AETrainOptions(data=args.data, channels=args.channels, resolution=args.resolution,
                       latent_channels=args.latent_channels, widths=tuple(args.widths), steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight, seed=args.seed,
                       n_eval=args.n_eval, device=args.device, threads=args.threads)
    return train_autoencoder(o, args.out)
