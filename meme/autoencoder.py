"""First-stage autoencoder for latent diffusion (HF diffusers): encode images, decode samples.

    python -m meme.autoencoder encode --vae PATH_OR_ID --data IMAGES --out latents.pt
    python -m meme.autoencoder train  --data fashion-mnist --out runs/ae

``encode`` writes ``{'latents': scaling_factor * z, 'autoencoder': LatentInfo}``, so that
training, sampling and FID all know which autoencoder decodes the file. z is the
posterior mean (deterministic) unless ``--sample``. The scaling factor is *measured*
(1 / std of z over the whole file, as LDM does on a batch) unless ``--scaling config``
asks for the autoencoder's own. Work is cut into chunks written atomically to
``OUT.parts/``; a rerun continues after the last finished chunk.

``train`` fits a small AutoencoderKL (``meme.autoencoder_train``).

Autoencoders load with ``from_pretrained`` from a local directory or a hub id; a hub id
is read offline when its files are cached. diffusers is imported here only.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from meme import checkpoint
from meme.cli import UserError, main_guard, pick_device, setup_logging
from meme.config import DataShape
from meme.latents import METADATA_KEY, SCALINGS, LatentInfo, is_latent_file

log = logging.getLogger("meme.autoencoder")
CLASSES = {"AutoencoderKL": "kl", "VQModel": "vq"}


# ---- loading ----------------------------------------------------------------------------
def _looks_like_path(ref: str) -> bool:
    """Hub ids are 'owner/name'; anything absolute, relative-dotted or deeper is a path."""
    return ref.startswith(("/", ".", "~")) or ref.count("/") != 1


def load_autoencoder(ref: str | Path, device: "str | torch.device" = "cpu") -> "FirstStage":
    """AutoencoderKL or VQModel from a local directory or hub id, in eval mode on ``device``."""
    import diffusers

    ref = str(ref)
    local = Path(ref).expanduser()
    if not local.exists() and _looks_like_path(ref):
        raise UserError(f"autoencoder not found: {local} (a diffusers directory with config.json, or a hub id)")
    source = str(local) if local.exists() else ref
    offline = local.exists() or _cached(ref)
    try:
        config = diffusers.AutoencoderKL.load_config(source, local_files_only=offline)
        name = config.get("_class_name")
        if name not in CLASSES:
            raise UserError(f"{ref} is a {name}, not one of {sorted(CLASSES)}")
        model = getattr(diffusers, name).from_pretrained(source, local_files_only=offline, low_cpu_mem_usage=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load autoencoder {ref}: {str(exc).splitlines()[0]}") from None
    return FirstStage(model.eval().requires_grad_(False).to(pick_device(device)), CLASSES[name],
                      str(local.resolve()) if local.exists() else ref)


def _cached(hub_id: str) -> bool:
    """True when the hub id's config is already in the local cache (then no network is used)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


class FirstStage:
    """One diffusers autoencoder behind two calls: images -> z and z -> images, both in [-1, 1]."""

    def __init__(self, model: torch.nn.Module, kind: str, ref: str):
        self.model, self.kind, self.ref = model, kind, ref
        self.device = next(model.parameters()).device

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Unscaled latents z; KL: posterior mean (or a draw); VQ: pre-quantisation latents."""
        out = self.model.encode(images.to(self.device))
        if self.kind == "vq":
            return out.latents.float().cpu()
        dist = out.latent_dist
        if not sample:
            return dist.mean.float().cpu()
        eps = torch.randn(dist.mean.shape, generator=generator).to(self.device)
        return (dist.mean + dist.std * eps).float().cpu()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (VQ quantises first, as LDM does at decode time)."""
        return self.model.decode(z.to(self.device)).sample.float().clamp(-1, 1).cpu()


class LatentDecoder:
    """``meme.images.Decoder`` for stored latents: divide by the scaling factor, decode in batches."""

    def __init__(self, first_stage: FirstStage, scaling_factor: float, batch_size: int = 64):
        self.first_stage, self.scaling_factor, self.batch_size = first_stage, float(scaling_factor), batch_size

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        parts = [self.first_stage.decode(latents[i:i + self.batch_size].float() / self.scaling_factor)
                 for i in range(0, len(latents), self.batch_size)]
        return torch.cat(parts)


# ---- encoding ----------------------------------------------------------------------------
def encode_images(images: torch.Tensor,              # [N, C, H, W] in [-1, 1]
                  ae: FirstStage,
                  parts: Path,                       # folder of finished chunks (resumable)
                  chunk: int = 4096,                 # images per chunk file
                  batch_size: int = 64,
                  sample: bool = False,
                  seed: int = 0,                     # --sample: noise keyed by (seed, chunk)
                  progress: bool = True) -> torch.Tensor:
    """Unscaled latents of every image; finished chunks are read back instead of re-encoded."""
    parts.mkdir(parents=True, exist_ok=True)
    out = []
    bar = tqdm(total=len(images), desc="encode", unit="img", disable=not progress)
    for k, start in enumerate(range(0, len(images), chunk)):
        path = parts / f"chunk-{k:06d}.pt"
        x = images[start:start + chunk]
        if path.is_file():
            z = checkpoint.load(path, what="encoded chunk")
        else:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
            z = torch.cat([ae.encode(x[i:i + batch_size], sample, gen) for i in range(0, len(x), batch_size)])
            checkpoint.atomic_save(z, path)
        out.append(z)
        bar.update(len(x))
    bar.close()
    return torch.cat(out)


def scaling_factor(z: torch.Tensor, ae: FirstStage, scaling: str) -> float:
    """1 / std of z ('measured'), or the autoencoder config's own factor ('config')."""
    if scaling == "config":
        value = getattr(ae.config, "scaling_factor", None)
        if value is None:
            raise UserError(f"{ae.ref} has no scaling_factor in its config: use --scaling measured")
        return float(value)
    return float(1.0 / z.float().std())


def data_spec_for_record(spec: str) -> str:
    """'fashion-mnist' stays a name; a folder becomes absolute, so a later step finds it anywhere."""
    if spec.lower() in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return "fashion-mnist"
    return str(Path(spec).expanduser().resolve())


def encode(args: argparse.Namespace) -> LatentInfo:
    """The ``encode`` command: checks, encodes (resumably), measures the scale, writes OUT."""
    from meme.data import load_data

    out: Path = args.out
    if out.suffix != ".pt":
        raise UserError(f"--out {out}: latents are written as a .pt file (tensor plus autoencoder metadata)")
    if out.exists():
        raise UserError(f"--out {out} already exists: delete it or choose another path")
    if is_latent_file(args.data):
        raise UserError(f"--data {args.data} is a latent file: encode takes images (a folder or fashion-mnist)")
    ae = load_autoencoder(args.vae, pick_device(args.device))
    channels = int(ae.config.in_channels)
    resolution = int(args.resolution or ae.config.sample_size)
    images = load_data(args.data, DataShape(channels, resolution, latent=False), "all", limit=args.limit)
    parts = out.with_name(out.name + ".parts")
    manifest = {"autoencoder": ae.ref, "data": data_spec_for_record(args.data), "resolution": resolution,
                "channels": channels, "n": len(images), "sample": args.sample, "seed": args.seed,
                "chunk": args.chunk}
    mpath = parts / "manifest.json"
    if mpath.is_file() and json.loads(mpath.read_text()) != manifest:
        raise UserError(f"{parts} holds chunks of an encoding with other settings: delete it or change --out")
    log.info("encoding %d %dx%dx%d images from %s with %s (%s)", len(images), channels, resolution, resolution,
             args.data, ae.ref, "posterior sample" if args.sample else "posterior mean")
    checkpoint.atomic_write_json(manifest, mpath)
    z = encode_images(images, ae, parts, args.chunk, args.batch_size, args.sample, args.seed)
    scale = scaling_factor(z, ae, args.scaling)
    info = LatentInfo(autoencoder=ae.ref, kind=ae.kind, scaling_factor=scale, scaling=args.scaling,
                      image_channels=int(ae.config.out_channels), image_resolution=resolution,
                      latent_shape=tuple(z.shape[1:]), data=manifest["data"],
                      posterior="sample" if args.sample else "mean", n=len(z))
    checkpoint.atomic_save({"latents": (z * scale).contiguous(), METADATA_KEY: info.to_dict()}, out)
    shutil.rmtree(parts)
    log.info("wrote %s: %d latents %s, scaling factor %.5g (%s), std of stored latents %.3f", out, len(z),
             list(z.shape[1:]), scale, args.scaling, float((z * scale).std()))
    return info


# ---- command line ---------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m meme.autoencoder", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("encode", help="encode images into a latent .pt file for meme.train --data")
    e.add_argument("--vae", required=True, help="diffusers AutoencoderKL/VQModel: local directory or hub id")
    e.add_argument("--data", required=True, help="images: 'fashion-mnist' or a folder of PNG/JPEG (meme.data spec)")
    e.add_argument("--out", required=True, type=Path, help="latent file to write (.pt)")
    e.add_argument("--resolution", type=int, default=None,
                   help="image side fed to the encoder (default: the autoencoder's sample_size)")
    e.add_argument("--scaling", choices=SCALINGS, default="measured",
                   help="scaling factor: measured = 1/std of the latents; config = the autoencoder's own "
                        "(default %(default)s)")
    e.add_argument("--sample", action="store_true", help="draw z from the posterior instead of its mean")
    e.add_argument("--seed", type=int, default=0, help="noise seed for --sample (default %(default)s)")
    e.add_argument("--batch-size", type=int, default=64, help="images per encoder forward (default %(default)s)")
    e.add_argument("--chunk", type=int, default=4096,
                   help="images per resumable chunk written to OUT.parts/ (default %(default)s)")
    e.add_argument("--limit", type=int, default=None, help="encode only the first N images (file order)")
    e.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda ... (default %(default)s)")
    e.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    from meme.autoencoder_train import add_train_parser
    add_train_parser(sub)
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.command == "train":
        from meme.autoencoder_train import run_training
        print(json.dumps(run_training(args), indent=2))
        return 0
    for flag in ("batch_size", "chunk", "threads", "limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = encode(args)
    print(json.dumps({"out": str(args.out), **info.to_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
