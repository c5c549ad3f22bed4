"""Training data as one in-memory tensor, plus an infinite random-batch iterator.

``load_data(spec, shape, split)`` returns float32 [N, C, H, W]. ``spec`` is one of

* ``None`` or ``'fashion-mnist'``: the Debian package ``dataset-fashion-mnist``
  (IDX files in ``/usr/share/datasets/fashion-mnist/``, MIT licence): 60k train +
  10k test images pooled into 70k, then split by us. Any directory holding
  ``train-images-idx3-ubyte[.gz]`` is read the same way. The 28x28 images are
  *resized* (bilinear, antialiased when shrinking) to ``shape.resolution`` rather than
  padded, so one rule serves every proxy resolution and the garment fills the frame;
  grey is repeated to ``shape.channels``. Values in [-1, 1].
* a directory of PNG/JPEG files (searched recursively, sorted by path): each image is
  centre-cropped to a square and resized with PIL (bicubic, antialiased) to
  ``shape.resolution``; RGB if ``shape.channels == 3``, otherwise grey repeated to
  ``shape.channels``. Values in [-1, 1].
* a ``.npy`` / ``.pt`` file of pre-encoded latents N x C x H x W (a ``.pt`` may also hold
  a dict with a ``'latents'`` entry; ``meme-nas autoencoder encode`` adds an
  ``'autoencoder'`` record there, see ``meme.data.latents``). C, H and W must match ``shape``. Latents are
  returned **as stored**: the file must already hold ``scale_factor * z`` (LDM's
  ``scale_factor``, e.g. 1/std of the first-stage latents, so the diffusion sees roughly
  unit variance). We never rescale; a warning is logged when the std is far from 1.

An image source handed where the config expects latents (``shape.latent``) is refused:
the denoiser would silently learn pixels in place of first-stage latents.

Split: a fixed permutation (legacy ``numpy.random.RandomState(0)``, whose stream numpy
guarantees never to change) of all N items; the last ``VAL_FRACTION`` (5%, at least one
item) is ``'val'``, the rest ``'train'``. ``limit=n`` keeps the first n of a split, which
is a fixed random subset (used by tests and search proxies). ``'all'`` is every item in
file order: latents encoded from it keep the images' indices, hence the same split.

Decoded sources are cached in memory (``functools.lru_cache``) because a search loads
the same data for every trial; keys include the path's mtime, so a rewritten latent
file is read again (an image folder is re-read when its top-level entries change).
When ``channels > 1`` for a grey source, the result is a broadcast view (``expand``):
no memory is spent on the copies, and in-place writes raise instead of corrupting the
cache.
"""
from __future__ import annotations

import functools
import gzip
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from meme.common import checkpoint
from meme.common.errors import UserError, one_line
from meme.model.config import DataShape

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LATENT_SUFFIXES = (".npy", ".pt", ".pth")
VAL_FRACTION = 0.05
SPLIT_SEED = 0
SPLITS = ("train", "val", "all")  # 'all': every item in file order (what an encoder needs)


def load_data(spec: Optional[str | Path],    # None/'fashion-mnist', image folder, or latent file
              shape: DataShape,              # channels and resolution the denoiser expects
              split: str = "train",          # 'train' or 'val'
              limit: Optional[int] = None,   # keep only the first n items of the split
              ) -> torch.Tensor:
    """The ``split`` of a dataset as float32 [N, C, H, W] (images in [-1, 1], latents as stored)."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {list(SPLITS)}, got {split!r}")
    kind, path = _resolve(spec)
    if shape.latent and kind != "latents":
        raise UserError(f"{spec or 'fashion-mnist'} is images, but the config's data is latent "
                        f"({shape.channels}x{shape.resolution}x{shape.resolution}): encode them first with "
                        f"`meme-nas autoencoder encode --vae AE --data {spec or 'fashion-mnist'} "
                        f"--out LATENTS.pt` and pass the .pt")
    if kind == "latents":
        arr = _latents(str(path), file_stamp(path))
        _check_latents(arr, shape, path)
        idx = _split_indices(len(arr), split, limit, path)
        return arr[torch.from_numpy(idx)]
    if kind == "idx":
        raw = _idx_images(str(path), file_stamp(path))                 # uint8 [N, 28, 28]
        idx = _split_indices(len(raw), split, limit, path)
        x = torch.from_numpy(raw[idx]).unsqueeze(1).float()
        if x.shape[-1] != shape.resolution:
            x = F.interpolate(x, size=(shape.resolution,) * 2, mode="bilinear",
                              antialias=True, align_corners=False)
    else:
        mode = "RGB" if shape.channels == 3 else "L"
        raw = _folder_images(str(path), shape.resolution, mode, file_stamp(path))  # uint8 [N, c, R, R]
        idx = _split_indices(len(raw), split, limit, path)
        x = torch.from_numpy(raw[idx]).float()
    x = (x / 127.5 - 1.0).clamp_(-1.0, 1.0)
    if x.shape[1] != shape.channels:
        x = x.expand(-1, shape.channels, -1, -1)
    return x


# ---- sources -----------------------------------------------------------------------
def _resolve(spec: Optional[str | Path]) -> tuple[str, Path]:
    """(kind, path) with kind in 'idx' | 'folder' | 'latents'; missing input -> UserError."""
    if spec is None or str(spec).lower() in ("fashion-mnist", "fashion_mnist", "fmnist"):
        fashion_mnist_files(FASHION_MNIST_DIR)
        return "idx", FASHION_MNIST_DIR
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data not found: {path}: pass --data an image folder, a .npy/.pt latent "
                        f"file, or omit --data for Fashion-MNIST")
    if path.is_file():
        if path.suffix.lower() not in LATENT_SUFFIXES:
            raise UserError(f"{path}: a data file must be .npy or .pt latents (N x C x H x W); "
                            f"for images pass their folder")
        return "latents", path
    if _find_idx(path, FASHION_MNIST_FILES[0]) is not None:
        fashion_mnist_files(path)
        return "idx", path
    return "folder", path


def fashion_mnist_files(root: Path) -> list[Path]:
    """The two IDX image files under ``root`` (gz or not); UserError naming the fix if absent."""
    found = [_find_idx(Path(root), name) for name in FASHION_MNIST_FILES]
    if any(f is None for f in found):
        raise UserError(f"Fashion-MNIST not found in {root}: run `apt-get install dataset-fashion-mnist` "
                        f"or pass --data DIR (a folder of images or a .npy/.pt latent file)")
    return found  # type: ignore[return-value]


def _find_idx(root: Path, name: str) -> Optional[Path]:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    return None


def file_stamp(path: Path) -> tuple[int, int]:
    """(mtime_ns, size): part of every cache key, so a rewritten file is decoded again."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _idx_images(root: str, stamp: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Train + test images of an IDX dataset, in file order (uint8 [N, H, W])."""
    return np.concatenate([_read_idx(p) for p in fashion_mnist_files(Path(root))])


def _read_idx(path: Path) -> np.ndarray:
    """An IDX3 uint8 image file (magic 0x00000803, big-endian int32 dims)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            buf = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    header = np.frombuffer(buf, dtype=">i4", count=4) if len(buf) >= 16 else None
    if header is None or header[0] != 0x803:
        raise UserError(f"{path} is not an IDX3 uint8 image file")
    n, h, w = (int(v) for v in header[1:])
    if min(n, h, w) < 1 or len(buf) != 16 + n * h * w:
        raise UserError(f"{path} is truncated: expected {n} images of {h}x{w}")
    return np.frombuffer(buf, dtype=np.uint8, offset=16).reshape(n, h, w)


@functools.lru_cache(maxsize=4)
def _folder_images(root: str, resolution: int, mode: str, stamp: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Every PNG/JPEG under ``root``: centre-cropped, resized, uint8 [N, c, R, R]."""
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no PNG/JPEG images in {root}: pass --data a folder of images, "
                        f"a .npy/.pt latent file, or omit it for Fashion-MNIST")

    def one(p: Path) -> np.ndarray:
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                s = min(im.size)
                left, top = (im.width - s) // 2, (im.height - s) // 2
                im = im.crop((left, top, left + s, top + s))
                im = im.resize((resolution, resolution), Image.BICUBIC)
                a = np.asarray(im, dtype=np.uint8)
        except OSError as exc:
            raise UserError(f"cannot read image {p}: {exc}") from None
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=8) as pool:     # PIL decodes without the GIL
        return np.stack(list(pool.map(one, files)))


@functools.lru_cache(maxsize=2)
def _latents(path: str, stamp: tuple[int, int] = (0, 0)) -> torch.Tensor:
    p = Path(path)
    if p.suffix.lower() == ".npy":
        obj = torch.from_numpy(_read_npy(p))
    else:
        obj = checkpoint.load(p, what="latent file")
        if isinstance(obj, dict):
            if "latents" not in obj:
                raise UserError(f"{p}: a .pt dict must have a 'latents' entry, has {sorted(map(str, obj))}")
            obj = obj["latents"]
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"{p}: expected a tensor of latents, got {type(obj).__name__}")
    if not obj.dtype.is_floating_point:
        raise UserError(f"{p}: latents must be floating point, the file holds {obj.dtype}")
    return obj.float().contiguous()


def _read_npy(p: Path) -> np.ndarray:
    """A .npy array whose header is checked against the file's size before anything is allocated."""
    try:
        with p.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_2_0 if version >= (2, 0) else np.lib.format.read_array_header_1_0
            shape, _, dtype = read_header(f)
            offset = f.tell()
        if dtype.hasobject:
            raise ValueError(f"dtype {dtype} holds Python objects")
        claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if claimed != p.stat().st_size - offset:
            raise ValueError(f"header says {list(shape)} {dtype} ({claimed} bytes), "
                             f"the file has {p.stat().st_size - offset} bytes of data")
        return np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, TypeError, SyntaxError) as exc:
        raise UserError(f"cannot read latents {p}: {one_line(exc)}") from None


def _check_latents(arr: torch.Tensor, shape: DataShape, path: Path) -> None:
    want = (shape.channels, shape.resolution, shape.resolution)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != want:
        raise UserError(f"{path}: latents have shape {list(arr.shape)}, config data wants N x "
                        f"{want[0]} x {want[1]} x {want[2]} (set data.channels/resolution to match)")
    std = float(arr[: 4096].std())
    if not 0.25 < std < 4.0:
        log.warning("%s: latent std is %.3g; the file should hold scale_factor * z (std near 1)", path, std)


def _split_indices(n: int, split: str, limit: Optional[int], path: Path) -> np.ndarray:
    """Fixed split: permutation with SPLIT_SEED, last VAL_FRACTION (>= 1 item) is 'val'."""
    if n < 2:
        raise UserError(f"{path}: need at least 2 items to split into train and val, found {n}")
    perm = np.random.RandomState(SPLIT_SEED).permutation(n)
    n_val = max(1, int(round(n * VAL_FRACTION)))
    if split == "all":
        idx = np.arange(n)
    else:
        idx = perm[n - n_val:] if split == "val" else perm[: n - n_val]
    if limit is not None and limit > 0:
        idx = idx[:limit]
    return idx


# ---- batches -------------------------------------------------------------------------
