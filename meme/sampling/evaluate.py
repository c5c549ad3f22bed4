"""FID (clean-fid "clean" mode) and precision/recall of generated samples, fully offline.

    meme-nas evaluate --run DIR [--n 10000] [--ref DATA] [--samples PATH]

reads ``DIR/samples/samples.npz`` (uint8 [N,H,W,C] under key ``samples``, written by
``meme.sampling.sample``), compares it with the real data at the samples' resolution, writes
``DIR/eval.json`` and prints it.

Features follow clean-fid's "clean" pipeline exactly: each uint8 image is resized to
299x299 with PIL bicubic in float32 per channel (``cleanfid.resize.build_resizer('clean')``),
then fed as [0,255] floats to the standard TorchScript Inception-v3
(:mod:`meme.sampling.fid_assets`; never downloaded). Grayscale images are repeated to RGB, as
PIL's ``convert('RGB')`` does in clean-fid's folder loader. The reference side (real
images, mu/sigma and features) is cached as ``.npz`` keyed by dataset, split, shape, n
and mode, because it costs as much Inception time as the samples.

Inception on CPU costs about 0.07 s per image on 2 cores (about 14 images/s; the
299x299 resize adds 0.003 s): a 10k-sample FID plus a fresh 10k reference is ~25 min.
On a GPU it is seconds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from cleanfid.fid import frechet_distance
from cleanfid.resize import build_resizer
from tqdm import tqdm

from meme.common.checkpoint import atomic_write
from meme.common.command import CommandParser, main_guard, setup_logging
from meme.common.device import pick_device
from meme.common.errors import UserError
from meme.common.images import to_uint8
from meme.data.dataset import load_data
from meme.data.latents import image_reference, is_latent_file, latent_info, require_latent_info, run_data_spec
from meme.model.config import DataShape, MemeConfig
from meme.sampling.fid_assets import find_inception_weights, load_inception

log = logging.getLogger("meme.sampling.evaluate")

FID_MODE = "clean"            # clean-fid mode: PIL bicubic resize outside the network
CACHE_ENV = "MEME_CACHE_DIR"  # overrides the default cache root ~/.cache/meme


def _as_rgb_uint8(images: np.ndarray) -> np.ndarray:
    """Check [N,H,W,1|3] uint8; grayscale -> RGB by repetition (what PIL convert('RGB') does)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N,H,W,1|3], got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0,255], got {images.dtype}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def inception_features(images_uint8: np.ndarray,                  # [N,H,W,3] or [N,H,W,1] uint8
                       batch_size: int = 32,                      # images per Inception forward
                       device: str | torch.device | None = None,  # None: CUDA if available
                       weights: str | None = None,                # None: meme.sampling.fid_assets search
                       progress: bool = False,                    # tqdm bar
                       ) -> np.ndarray:
    """2048-d Inception pool features [N,2048] float32, identical to clean-fid's "clean" mode."""
    images = _as_rgb_uint8(images_uint8)
    device = pick_device(device)
    model = load_inception(weights, device)
    resize = build_resizer(FID_MODE)  # uint8 HWC -> float32 299x299x3 in [0,255]
    out = np.empty((len(images), 2048), dtype=np.float32)
    bar = tqdm(total=len(images), desc="inception", unit="img", disable=not progress)
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        x = torch.from_numpy(np.stack([resize(img) for img in chunk])).permute(0, 3, 1, 2)
        out[i:i + len(chunk)] = model(x.to(device)).float().cpu().numpy()
        bar.update(len(chunk))
    bar.close()
    return out


# FID: d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))  (Heusel et al. 2017, Eq. 6)
def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64), as clean-fid computes them."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    return float(frechet_distance(mu1, sigma1, mu2, sigma2))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets a [N,D] and b [M,D].

    With as many images as dimensions this is clean-fid's ``frechet_distance`` on mu/sigma.
    With fewer (quick evaluations: N or M < 2048) the covariances are singular, where
    scipy's ``sqrtm`` is slow (minutes for 2048x2048 on 2 cores) and warns that it may be
    inaccurate; there the trace term is computed exactly in the small space instead.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if min(len(a), len(b)) >= a.shape[1]:
        log.info("FID: %dx%d matrix square root (about a minute on 2 CPU cores)", a.shape[1], a.shape[1])
        return fid_from_stats(*feature_stats(a), *feature_stats(b))
    return _fid_low_rank(a, b)


# Tr((S_a S_b)^(1/2)) = ||A_c B_c^T||_* / sqrt((N-1)(M-1)) for S = X_c^T X_c / (n-1):
# S_a S_b and (A_c B_c^T)(A_c B_c^T)^T share their non-zero eigenvalues (AB and BA do)
def _fid_low_rank(a: np.ndarray, b: np.ndarray) -> float:
    ac, bc = a - a.mean(axis=0), b - b.mean(axis=0)
    scale = np.sqrt((len(a) - 1) * (len(b) - 1))
    tr_covmean = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / scale
    diff = a.mean(axis=0) - b.mean(axis=0)
    tr_a = (ac * ac).sum() / (len(a) - 1)
    tr_b = (bc * bc).sum() / (len(b) - 1)
    return float(diff @ diff + tr_a + tr_b - 2 * tr_covmean)


# Radius of each point's k-NN ball within its own set (Kynkäänniemi et al. 2019, Eq. 2)
def _knn_radii(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    # k+1: the nearest neighbour of a point within its own set is the point itself
    return torch.cat([torch.cdist(feats[i:i + chunk], feats).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), chunk)])


# Fraction of queries inside the union of the manifold's k-NN balls (Kynkäänniemi et al. 2019, Eq. 1)
def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int) -> float:
    inside = [(torch.cdist(queries[i:i + chunk], manifold) <= radii[None]).any(dim=1)
              for i in range(0, len(queries), chunk)]
    return float(torch.cat(inside).float().mean())


def precision_recall(real_feats: np.ndarray,   # [N,D] features of real images
                     fake_feats: np.ndarray,   # [M,D] features of generated images
                     k: int = 3,               # neighbourhood size of the manifold estimate
                     chunk: int = 1024,        # rows of the distance matrix held at once
                     device: str | torch.device = "cpu",
                     ) -> tuple[float, float]:
    """Improved precision (fakes on the real manifold) and recall (reals on the fake manifold)."""
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set")
    precision = _coverage(real, _knn_radii(real, k, chunk), fake, chunk)
    recall = _coverage(fake, _knn_radii(fake, k, chunk), real, chunk)
    return precision, recall


@dataclass
class ReferenceStats:
    """FID statistics of the real data (features kept for precision/recall)."""

    mu: np.ndarray
    sigma: np.ndarray
    feats: Optional[np.ndarray]  # None for stats-only files
    n: int
    name: str                    # dataset spec as given ('fashion-mnist' for the default)
    path: Optional[Path]         # cache file, or the stats file it was read from


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "meme") / "fid-stats"


def _dataset_key(data_spec: Optional[str]) -> str:
    """File-name-safe dataset name; a path gets its basename plus a hash of its absolute form."""
    if data_spec in (None, "fashion-mnist"):
        return "fashion-mnist"
    p = Path(data_spec).expanduser().resolve()
    return f"{p.stem}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"


def reference_cache_path(data_spec: Optional[str], shape: DataShape, n: int, split: str,
                         cache_dir: Path) -> Path:
    name = f"{_dataset_key(data_spec)}-{split}-{shape.channels}x{shape.resolution}-n{n}-{FID_MODE}.npz"
    return Path(cache_dir) / name


def load_stats_file(path: Path) -> ReferenceStats:
    """Precomputed statistics: an .npz with ``mu`` and ``sigma`` (``feats`` optional)."""
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise UserError(f"{path}: reference statistics need arrays 'mu' and 'sigma'")
        feats = z["feats"] if "feats" in z else None
        n = int(z["n"]) if "n" in z else (len(feats) if feats is not None else -1)
        return ReferenceStats(z["mu"], z["sigma"], feats, n, str(path), Path(path))


def reference_stats(data_spec: Optional[str],             # meme.data.dataset spec; None = Fashion-MNIST; or a stats .npz
                    shape: DataShape,                     # channels/resolution the samples have
                    n: int,                               # real images used (fewer if the split is smaller)
                    cache_dir: Optional[Path] = None,     # folder of .npz files; None: default_cache_dir()
                    split: str = "train",                 # meme.data.dataset split the reference is drawn from
                    batch_size: int = 32,
                    device: str | torch.device | None = None,
                    progress: bool = False,
                    ) -> ReferenceStats:
    """mu/sigma/features of n real images, computed once and cached as .npz."""
    if data_spec and str(data_spec).endswith(".npz"):
        return load_stats_file(Path(data_spec))
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = reference_cache_path(data_spec, shape, n, split, cache_dir)
    name = data_spec or "fashion-mnist"
    if path.is_file():
        log.info("reference statistics from cache %s", path)
        stats = load_stats_file(path)
        stats.name = name
        return stats
    data = load_data(data_spec, shape, split)
    if data.shape[1] not in (1, 3):
        raise UserError(f"FID needs 1- or 3-channel images; {name} gives {data.shape[1]} channels")
    # a fixed random subset, so that n < len(data) does not depend on the file order
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n]
    images = to_uint8(data[idx.sort().values])
    log.info("reference: %d %s images (%s split) at %dx%d", len(images), name, split, *images.shape[1:3])
    feats = inception_features(images, batch_size, device, progress=progress)
    mu, sigma = feature_stats(feats)
    # atomic: a concurrent reader never sees half a file
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, feats=feats, n=len(images)))
    return ReferenceStats(mu, sigma, feats, len(images), name, path)


def load_samples(path: Path, n: Optional[int] = None) -> np.ndarray:
    """uint8 [N,H,W,C] from a samples.npz (key 'samples'), first n kept."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: samples file not found; create it with `meme-nas sample --run RUN_DIR`")
    with np.load(path) as z:
        if "samples" not in z:
            raise UserError(f"{path}: no array 'samples' (found {sorted(z.files)})")
        samples = z["samples"]
    if samples.dtype != np.uint8 or samples.ndim != 4 or samples.shape[-1] not in (1, 3):
        raise UserError(f"{path}: 'samples' must be uint8 [N,H,W,1|3], got {samples.dtype} {samples.shape}")
    return samples[:n] if n else samples


def evaluate_samples(samples: np.ndarray,                 # uint8 [N,H,W,C]
                     ref: Optional[str] = None,           # data spec or stats .npz (None = Fashion-MNIST)
                     n_ref: int = 10000,
                     split: str = "train",
                     cache_dir: Optional[Path] = None,
                     k: int = 3,
                     batch_size: int = 32,
                     device: str | torch.device | None = None,
                     progress: bool = False,
                     ) -> dict:
    """FID and precision/recall of samples against the reference; a JSON-ready dict."""
    device = pick_device(device)
    if samples.shape[1] != samples.shape[2]:
        raise UserError(f"samples must be square, got {samples.shape[1]}x{samples.shape[2]}")
    shape = DataShape(channels=samples.shape[-1], resolution=samples.shape[1], latent=False)
    t0 = time.perf_counter()
    reference = reference_stats(ref, shape, n_ref, cache_dir, split, batch_size, device, progress)
    t1 = time.perf_counter()
    feats = inception_features(samples, batch_size, device, progress=progress)
    t2 = time.perf_counter()
    fid = (fid_from_features(reference.feats, feats) if reference.feats is not None
           else fid_from_stats(*feature_stats(feats), reference.mu, reference.sigma))
    result = {"fid": fid,
              "precision": None, "recall": None, "k": k,
              "n": len(samples), "n_ref": reference.n, "ref": reference.name, "ref_split": split,
              "ref_stats": str(reference.path) if reference.path else None,
              "resolution": shape.resolution, "channels": shape.channels, "mode": FID_MODE,
              "weights": str(find_inception_weights()), "device": str(device),
              "inception_img_per_s": round(len(samples) / max(t2 - t1, 1e-9), 2),
              "wall_s": None}
    if reference.feats is not None:
        result["precision"], result["recall"] = precision_recall(reference.feats, feats, k, device=device)
    else:
        log.warning("reference %s has no features: precision/recall skipped", reference.name)
    if len(samples) < 2048 or reference.n < 2048:
        log.warning("FID from %d samples / %d reference images is biased upwards (2048-d covariance); "
                    "use --n 10000 or more for reportable numbers", len(samples), reference.n)
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def reference_for(ref: Optional[str], run: Optional[Path], samples_path: Path) -> Optional[str]:
    """The real images to score against; FID is never computed on latents.

    Default: the run's training data. A latent file stands for the images it encodes
    (its autoencoder metadata names them); samples of a latent run must be decoded.
    """
    ref = ref if ref is not None else run_data_spec(run)
    cfg_path = Path(run) / "config.yaml" if run else None
    if not (cfg_path and cfg_path.is_file() and MemeConfig.load(cfg_path).data.latent):
        return image_reference(ref)
    require_latent_info(run_data_spec(run), f"FID of latent run {run}")
    sampling = samples_path.parent / "sampling.json"
    if sampling.is_file() and json.loads(sampling.read_text()).get("decoded") is False:
        raise UserError(f"{samples_path} holds raw latent channels, not decoded images: "
                        f"sample again without --no-decode")
    ref = image_reference(ref)
    if is_latent_file(ref):
        raise UserError(f"--ref {ref}: FID is computed on images, not latents: pass the images or omit --ref")
    return ref


def check_decoded(samples: np.ndarray, run: Optional[Path], samples_path: Path) -> None:
    """Samples of a latent run have the autoencoder's image shape (older files may be raw)."""
    info = latent_info(run_data_spec(run))
    if info is None:
        return
    image = (info.image_resolution, info.image_resolution, info.image_channels)
    if tuple(samples.shape[1:]) != image:
        raise UserError(f"{samples_path}: samples are {list(samples.shape[1:])}, not decoded {list(image)} "
                        f"images: sample again without --no-decode")


def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(prog="meme-nas evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=None, help="run directory: reads RUN/samples/samples.npz, writes RUN/eval.json")
    p.add_argument("--samples", type=Path, default=None, help="samples .npz to evaluate (default RUN/samples/samples.npz)")
    p.add_argument("--n", type=int, default=10000, help="samples used (default %(default)s)")
    p.add_argument("--n-ref", type=int, default=None, help="real images in the reference statistics (default: --n)")
    p.add_argument("--ref", default=None, help="real data (meme.data.dataset spec) or a stats .npz with mu/sigma; "
                                                "default: the run's training data, else Fashion-MNIST")
    p.add_argument("--split", default="train", choices=("train", "val"), help="split of the real data")
    p.add_argument("--cache-dir", type=Path, default=None, help=f"folder of cached reference statistics (default: ${CACHE_ENV}/fid-stats or ~/.cache/meme/fid-stats)")
    p.add_argument("--k", type=int, default=3, help="k of k-NN precision/recall")
    p.add_argument("--batch-size", type=int, default=32, help="images per Inception forward (default %(default)s)")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 ... (default %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default RUN/eval.json)")
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.run is None and args.samples is None:
        raise UserError("give --run DIR (with DIR/samples/samples.npz) or --samples PATH")
    if args.n < 2 or args.batch_size < 1 or args.k < 1:
        raise UserError("--n must be >= 2, --batch-size and --k >= 1")
    samples_path = args.samples or args.run / "samples" / "samples.npz"
    out = args.out or (args.run / "eval.json" if args.run else samples_path.parent / "eval.json")
    find_inception_weights()  # fail before any slow work when the weights are missing
    ref = reference_for(args.ref, args.run, samples_path)
    samples = load_samples(samples_path, args.n)
    check_decoded(samples, args.run, samples_path)
    if len(samples) < args.n:
        log.warning("%s holds %d samples, fewer than --n %d", samples_path, len(samples), args.n)
    log.info("evaluating %d samples %s against %s", len(samples), samples.shape[1:], ref or "fashion-mnist")
    result = evaluate_samples(samples, ref, args.n_ref or args.n, args.split, args.cache_dir, args.k,
                              args.batch_size, args.device, progress=True)
    result["samples"] = str(samples_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
