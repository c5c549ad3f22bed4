"""The autoencoder's command line: ``meme-nas autoencoder encode|train`` (``meme-nas autoencoder``).

    meme-nas autoencoder encode --vae PATH_OR_ID --data IMAGES --out latents.pt
    meme-nas autoencoder train  --data fashion-mnist --out runs/ae

``encode`` writes ``{'latents': scaling_factor * z, 'autoencoder': LatentInfo}``, so that
training, sampling and FID all know which autoencoder decodes the file. z is the
posterior mean (deterministic) unless ``--sample``. The scaling factor is *measured*
(1 / std of z over the whole file, as LDM does on a batch) unless ``--scaling config``
asks for the autoencoder's own. Work is cut into chunks written atomically to
``OUT.parts/``; a rerun continues after the last finished chunk.

``train`` fits a small AutoencoderKL (``meme.training.first_stage``).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

from meme.common import checkpoint
from meme.common.command import CommandParser, main_guard, setup_logging
from meme.common.device import pick_device
from meme.common.errors import UserError
from meme.data.autoencoder import data_spec_for_record, encode_images, load_autoencoder, scaling_factor
from meme.data.dataset import load_data
from meme.data.latents import METADATA_KEY, SCALINGS, LatentInfo, is_latent_file
from meme.model.config import DataShape
from meme.training.first_stage import add_train_parser, run_training

log = logging.getLogger(__name__)


def encode(args: argparse.Namespace) -> LatentInfo:
    """The ``encode`` command: checks, encodes (resumably), measures the scale, writes OUT."""
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


def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(prog="meme-nas autoencoder", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("encode", help="encode images into a latent .pt file for meme.training.train --data")
    e.add_argument("--vae", required=True, help="diffusers AutoencoderKL/VQModel: local directory or hub id")
    e.add_argument("--data", required=True, help="images: 'fashion-mnist' or a folder of PNG/JPEG (meme.data.dataset spec)")
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
    e.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)")
    add_train_parser(sub)
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.command == "train":
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
