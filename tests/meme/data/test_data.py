"""Data loading: Fashion-MNIST IDX files, image folders, latent files, split, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meme.common.errors import UserError
from meme.data import dataset as data
from meme.data.dataset import fashion_mnist_files, load_data
from meme.model.config import DataShape

HAVE_FMNIST = all(data._find_idx(data.FASHION_MNIST_DIR, n) for n in data.FASHION_MNIST_FILES)
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")


@needs_fmnist
def test_fashion_mnist_split_sizes_range_and_determinism():
    shape = DataShape(channels=1, resolution=28, latent=False)
    train = load_data(None, shape, "train")
    val = load_data("fashion-mnist", shape, "val")
    assert train.shape == (66_500, 1, 28, 28) and val.shape == (3_500, 1, 28, 28)
    assert len(train) + len(val) == 70_000
    assert train.dtype == torch.float32
    assert train.min().item() == -1.0 and train.max().item() == 1.0
    # same split on a second call, and train/val are disjoint (compare exact pixel rows)
    torch.testing.assert_close(load_data(None, shape, "val"), val, rtol=0, atol=0)
    raw = data._idx_images(str(data.FASHION_MNIST_DIR), data.file_stamp(data.FASHION_MNIST_DIR))
    assert raw.shape == (70_000, 28, 28)
    # first val item is a fixed raw image scaled to [-1, 1]
    perm = np.random.RandomState(0).permutation(70_000)
    expected = torch.from_numpy(raw[perm[-3500]].astype(np.float32)) / 127.5 - 1
    torch.testing.assert_close(val[0, 0], expected)


@needs_fmnist
def test_fashion_mnist_resize_channels_and_limit():
    shape = DataShape(channels=3, resolution=32, latent=False)
    x = load_data(None, shape, "train", limit=100)
    assert x.shape == (100, 3, 32, 32)
    assert x.min().item() >= -1.0 and x.max().item() <= 1.0
    torch.testing.assert_close(x[:, 0], x[:, 2])
    small = load_data(None, DataShape(channels=1, resolution=16, latent=False), "train", limit=100)
    assert small.shape == (100, 1, 16, 16)
    # limit takes the first items of the same fixed split
    full = load_data(None, DataShape(channels=1, resolution=16, latent=False), "train", limit=200)
    torch.testing.assert_close(full[:100], small)


def _write_pngs(folder: Path, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(n):
        a = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)   # non-square: centre crop
        arrays.append(a)
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(sub / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    return arrays


def test_folder_loader(tmp_path):
    arrays = _write_pngs(tmp_path, 20)
    shape = DataShape(channels=3, resolution=12, latent=False)
    train = load_data(str(tmp_path), shape, "train")
    val = load_data(tmp_path, shape, "val")
    assert train.shape == (19, 3, 12, 12) and val.shape == (1, 3, 12, 12)
    assert train.min() >= -1 and train.max() <= 1
    # resolution equals the crop side: pixels are the centre crop, exactly
    crops = {i: torch.from_numpy(a[:, 2:14].transpose(2, 0, 1).astype(np.float32)) / 127.5 - 1
             for i, a in enumerate(arrays)}
    assert any(torch.allclose(val[0], c) for c in crops.values())
    grey = load_data(tmp_path, DataShape(channels=1, resolution=8, latent=False), "train", limit=5)
    assert grey.shape == (5, 1, 8, 8)


def test_latent_npy_and_pt_loader(tmp_path):
    z = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    torch.save({"latents": torch.from_numpy(z)}, tmp_path / "z.pt")
    shape = DataShape(channels=3, resolution=8, latent=True)
    train = load_data(str(tmp_path / "z.npy"), shape, "train")
    val = load_data(str(tmp_path / "z.npy"), shape, "val")
    assert train.shape == (38, 3, 8, 8) and val.shape == (2, 3, 8, 8)
    # values unchanged (no scaling), and the union is the whole file
    both = torch.cat([train, val]).flatten(1)
    ref = torch.from_numpy(z).flatten(1)
    assert sorted(both[:, 0].tolist()) == sorted(ref[:, 0].tolist())
    torch.testing.assert_close(load_data(str(tmp_path / "z.pt"), shape, "val"), val)
    with pytest.raises(UserError, match=r"latents have shape \[40, 3, 8, 8\].*4 x 8 x 8"):
        load_data(str(tmp_path / "z.npy"), DataShape(channels=4, resolution=8), "train")
    # a rewritten file is read again, not served from the cache
    np.save(tmp_path / "z.npy", z[:20])
    assert len(load_data(str(tmp_path / "z.npy"), shape, "train")) == 19


def test_missing_data_errors_name_path_and_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=f"data not found: {missing}.*--data"):
        load_data(str(missing), DataShape(), "train")
    with pytest.raises(UserError, match=f"Fashion-MNIST not found in {tmp_path}: run `apt-get install "
                                        "dataset-fashion-mnist` or pass --data DIR"):
        fashion_mnist_files(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no PNG/JPEG images in"):
        load_data(str(tmp_path / "empty"), DataShape(latent=False), "train")
    with pytest.raises(UserError, match="is images, but the config's data is latent"):
        load_data(str(tmp_path / "empty"), DataShape(latent=True), "train")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(UserError, match=r"\.npy or \.pt"):
        load_data(str(tmp_path / "x.csv"), DataShape(), "train")
    with pytest.raises(UserError, match="split"):
        load_data(str(tmp_path / "x.csv"), DataShape(), "test")


def test_idx_folder_via_data_dir(tmp_path):
    """A copy of the IDX layout in any folder is read as Fashion-MNIST (here synthetic)."""
    import gzip
    for name, n in (("train-images-idx3-ubyte", 30), ("t10k-images-idx3-ubyte", 10)):
        header = np.array([0x803, n, 28, 28], dtype=">i4").tobytes()
        body = np.full((n, 28, 28), 255 if n == 30 else 0, dtype=np.uint8).tobytes()
        with gzip.open(tmp_path / f"{name}.gz", "wb") as f:
            f.write(header + body)
    x = load_data(str(tmp_path), DataShape(channels=1, resolution=28, latent=False), "train")
    v = load_data(str(tmp_path), DataShape(channels=1, resolution=28, latent=False), "val")
    assert len(x) + len(v) == 40 and len(v) == 2
    assert set(torch.cat([x, v]).amax((1, 2, 3)).tolist()) == {-1.0, 1.0}
