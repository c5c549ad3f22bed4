"""What a latent file says about itself: which autoencoder made it and how to decode it.

``meme-nas autoencoder encode`` writes a ``.pt`` dict ``{'latents': scale * z,
'autoencoder': {...}}``. The second entry (:class:`LatentInfo`) is what every later
step needs to turn samples back into pictures: sample grids, ``samples.npz`` and FID
are computed on decoded images, scored against the images that were encoded.

This module reads that record without importing diffusers, so the pixel path never
pays for it. The decoder it describes is built by ``meme.data.autoencoder.load_decoder``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from meme.common import checkpoint
from meme.common.errors import UserError
from meme.data.dataset import LATENT_SUFFIXES, file_stamp

METADATA_KEY = "autoencoder"
AUTOENCODER_KINDS = ("kl", "vq")
SCALINGS = ("measured", "config")


@dataclass(frozen=True)
class LatentInfo:
    """How latents were made: enough to decode them and to find the images they came from."""

    autoencoder: str                    # local directory (absolute) or hub id, for from_pretrained
    kind: str                           # 'kl' (AutoencoderKL) or 'vq' (VQModel, pre-quantisation latents)
    scaling_factor: float               # stored latents = scaling_factor * z
    scaling: str                        # 'measured' (1 / std of z) or 'config' (the autoencoder's own)
    image_channels: int                 # what the decoder gives back
    image_resolution: int
    latent_shape: tuple[int, int, int]  # C, H, W of one latent
    data: str                           # meme.data.dataset spec of the encoded images (FID reference)
    posterior: str = "mean"             # 'mean' (deterministic) or 'sample'
    n: int = 0                          # images encoded

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "LatentInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise UserError(f"{source}: autoencoder metadata lacks {missing}: encode again with "
                            f"`meme-nas autoencoder encode`")
        kw = {k: v for k, v in d.items() if k in names}
        shape = kw["latent_shape"]
        checks = {
            "autoencoder": isinstance(kw["autoencoder"], str) and bool(kw["autoencoder"]),
            "kind": kw["kind"] in AUTOENCODER_KINDS,
            "scaling_factor": _number(kw["scaling_factor"]) and 0 < kw["scaling_factor"] < float("inf"),
            "scaling": kw["scaling"] in SCALINGS,
            "image_channels": _count(kw["image_channels"]), "image_resolution": _count(kw["image_resolution"]),
            "latent_shape": isinstance(shape, (list, tuple)) and len(shape) == 3 and all(map(_count, shape)),
            "data": isinstance(kw["data"], str),
            "posterior": kw.get("posterior", "mean") in ("mean", "sample"),
            "n": _count(kw.get("n", 0), allow_zero=True),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise UserError(f"{source}: autoencoder metadata has malformed {bad}: encode again with "
                            f"`meme-nas autoencoder encode`")
        kw["latent_shape"] = tuple(shape)
        kw["scaling_factor"] = float(kw["scaling_factor"])
        return cls(**kw)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _count(x, allow_zero: bool = False) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= (0 if allow_zero else 1)


def is_latent_file(spec: Optional[str | Path]) -> bool:
    """True when a meme.data.dataset spec names a latent tensor file (not images, not Fashion-MNIST)."""
    return spec is not None and Path(str(spec)).suffix.lower() in LATENT_SUFFIXES


def latent_info(spec: Optional[str | Path]) -> Optional[LatentInfo]:
    """The autoencoder record of a latent file; None for other specs and for bare tensors."""
    if not is_latent_file(spec):
        return None
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise UserError(f"latent file not found: {path}")
    return _read_info(str(path.resolve()), file_stamp(path))


@functools.lru_cache(maxsize=8)
def _read_info(path: str, stamp: tuple[int, int]) -> Optional[LatentInfo]:
    if Path(path).suffix.lower() == ".npy":
        return None                      # a bare array has nowhere to keep a record
    obj = checkpoint.load(path, what="latent file", verify=False, mmap=True)  # metadata only: no CRC pass
    meta = obj.get(METADATA_KEY) if isinstance(obj, dict) else None
    return LatentInfo.from_dict(meta, path) if isinstance(meta, dict) else None


def require_latent_info(spec: Optional[str | Path], purpose: str) -> LatentInfo:
    """The record of ``spec``, or a one-line error saying why there is nothing to decode with."""
    if not is_latent_file(spec):
        raise UserError(f"{spec or 'fashion-mnist'} is images, not a latent file: {purpose} needs latents "
                        f"from `meme-nas autoencoder encode --data IMAGES --out LATENTS.pt`")
    info = latent_info(spec)
    if info is None:
        raise UserError(f"{spec} holds latents without autoencoder metadata, so {purpose} cannot decode them: "
                        f"encode with `meme-nas autoencoder encode`")
    return info


def image_reference(spec: Optional[str]) -> Optional[str]:
    """The images FID compares with: a latent file's source images, any other spec itself."""
    info = latent_info(spec)
    return info.data if info is not None else spec


def run_data_spec(run: Optional[Path]) -> Optional[str]:
    """The dataset a run was trained on (meme.training.train writes it to RUN/options.json)."""
    opts = Path(run) / "options.json" if run else None
    if opts and opts.is_file():
        return json.loads(opts.read_text()).get("data")
    return None
