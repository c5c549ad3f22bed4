"""Converting model outputs to images: uint8 arrays, PNG files and grids.

Model space is [-1, 1]. A ``Decoder`` is any callable mapping latents [N,C,h,w] to
images [N,c,H,W] in [-1, 1]; latent runs get theirs from the autoencoder their latent
file names (``meme.data.latents``), so grids and samples.npz show pictures, not latents.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

Decoder = Callable[[torch.Tensor], torch.Tensor]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1,1] float NCHW -> uint8 NHWC (rounded, clipped)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def decode(x: torch.Tensor, decoder: Optional[Decoder] = None) -> torch.Tensor:
    return decoder(x) if decoder is not None else x


def grid_image(x: torch.Tensor, nrow: Optional[int] = None) -> Image.Image:
    """A square-ish grid of a batch in [-1,1] as one PIL image."""
    nrow = nrow or max(1, int(np.ceil(np.sqrt(len(x)))))
    grid = make_grid(x.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=2, pad_value=1.0)
    arr = to_uint8(grid[None])[0]
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def save_grid(x: torch.Tensor, path: str | Path, nrow: Optional[int] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(x, nrow).save(path)
    return path


def save_pngs(images: np.ndarray, folder: str | Path, start: int = 0) -> None:
    """uint8 NHWC -> folder/000000.png ... (grayscale stays single-channel)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{start + i:06d}.png")
