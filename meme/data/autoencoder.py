"""First-stage autoencoder for latent diffusion (HF diffusers): encode images, decode samples.

The library half: load an autoencoder, encode images in resumable chunks, measure the
scaling factor, and decode stored latents (:func:`load_decoder`). Its command line
(``meme-nas autoencoder encode|train``, ``meme-nas autoencoder``) lives at the
edge, in ``meme.training.first_stage_cli``: the CLI imports this module, never the other way, so
the library (sampling, training, FID) never loads the command line.

Autoencoders load with ``from_pretrained`` from a local directory or a hub id; a hub id
is read offline when its files are cached. diffusers is imported here only, inside the
loaders: it is an optional dependency (extra ``[latent]``), and the pixel path never
needs it.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from meme.common import checkpoint
from meme.common.device import pick_device
from meme.common.errors import UserError, one_line
from meme.data.latents import LatentInfo

log = logging.getLogger(__name__)
CLASSES = {"AutoencoderKL": "kl", "VQModel": "vq"}


# ---- loading ----------------------------------------------------------------------------
def _looks_like_path(ref: str) -> bool:
    """Hub ids are 'owner/name'; anything absolute, relative-dotted or deeper is a path."""
    return ref.startswith(("/", ".", "~")) or ref.count("/") != 1


def load_autoencoder(ref: str | Path, device: "str | torch.device" = "cpu") -> "FirstStage":
    """AutoencoderKL or VQModel from a local directory or hub id, in eval mode on ``device``."""
    import diffusers  # optional dependency (extra [latent])

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
        raise UserError(f"cannot load autoencoder {ref}: {one_line(exc)}") from None
    return FirstStage(model.eval().requires_grad_(False).to(pick_device(device)), CLASSES[name],
                      str(local.resolve()) if local.exists() else ref)


def _cached(hub_id: str) -> bool:
    """True when the hub id's config is already in the local cache (then no network is used)."""
    from huggingface_hub import try_to_load_from_cache  # comes with diffusers (optional)

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
    """``meme.common.images.Decoder`` for stored latents: divide by the scaling factor, decode in batches."""

    def __init__(self, first_stage: FirstStage, scaling_factor: float, batch_size: int = 64):
        self.first_stage, self.scaling_factor, self.batch_size = first_stage, float(scaling_factor), batch_size

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        parts = [self.first_stage.decode(latents[i:i + self.batch_size].float() / self.scaling_factor)
                 for i in range(0, len(latents), self.batch_size)]
        return torch.cat(parts)


def load_decoder(info: LatentInfo, device: "str | torch.device" = "cpu", batch_size: int = 64) -> LatentDecoder:
    """A ``meme.common.images.Decoder`` for latents described by ``info``; imports diffusers."""
    return LatentDecoder(load_autoencoder(info.autoencoder, device), info.scaling_factor, batch_size)


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


if __name__ == "__main__":  # an old habit: say where the command line went (exit 2, as every refusal)
    print("error: the autoencoder's command line is `meme-nas autoencoder encode|train` "
          "(or `meme-nas autoencoder`)", file=sys.stderr)
    raise SystemExit(2)
