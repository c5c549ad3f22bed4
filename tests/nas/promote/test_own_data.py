"""A search on one's own folder of images, end to end, as docs/guide/your-own-data.md tells it:
search with --data, export, promote one design for a few steps, train the exported YAML, sample.

The space is search_spaces/examples/custom-images.yaml as shipped, except a proxy of 16 steps
instead of 160 (the pipeline is under test, not the model).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from PIL import Image

from meme.model.config import MemeConfig
from meme.sampling import sample
from meme.training import train
from nas import search
from nas.promote import export, promote
from nas.space.space import load_space

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "search_spaces" / "examples" / "custom-images.yaml"


@pytest.fixture(autouse=True)
def _private_caches(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("MEME_CACHE_DIR", str(root / "meme-cache"))
    monkeypatch.setenv("MEME_MACS_CACHE", str(root / "macs-cache"))


def make_images(folder: Path, n: int = 40) -> Path:
    """``n`` RGB PNGs of three sizes, none square: the crop-and-resize rule has work to do."""
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    for i in range(n):
        h, w = 40 + (i % 3) * 8, 48
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([127 + 120 * np.sin(xx / (3 + i % 5) + c + yy / 17) for c in range(3)], -1)
        img = img + g.normal(0, 10, (h, w, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-data")
    images = make_images(root / "my-images")
    d = yaml.safe_load(EXAMPLE.read_text())
    d["proxy"].update(steps=16, warmup=2, eval_every=8, prune_from=16, eval_timesteps=4, eval_batch=8)
    space = root / "custom-images.yaml"
    space.write_text(yaml.safe_dump(d))
    rc = search.main(["--space", str(space), "--data", str(images), "--budget-gflops", "1", "--executor", "optuna",
                      "--trials", "2", "--rerank-top", "0", "--out", str(root / "results"), "--quiet"])
    assert rc == 0
    return root / "results" / "custom-images-b1", images


def test_the_example_space_needs_data_and_says_so(tmp_path, capsys):
    assert load_space(EXAMPLE).proxy.data == "required"
    rc = search.main(["--space", str(EXAMPLE), "--budget-gflops", "1", "--executor", "optuna", "--out", str(tmp_path)])
    assert rc == 2 and "pass --data DIR" in capsys.readouterr().err
    rc = search.main(["--space", str(EXAMPLE), "--data", str(tmp_path / "nowhere"), "--budget-gflops", "1",
                      "--executor", "optuna", "--out", str(tmp_path)])
    assert rc == 2 and "nowhere" in capsys.readouterr().err


def test_search_trains_on_the_folder_and_records_it(study):
    out, images = study
    attrs = optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'optuna.db'}").user_attrs
    assert attrs["data"] == str(images.resolve()) and attrs["proxy"]["data"] == str(images.resolve())
    assert (out / "trials.csv").is_file() and (out / "best.yaml").is_file()


def test_resume_with_other_data_is_refused(study, tmp_path, capsys):
    out, _ = study
    other = make_images(tmp_path / "other", n=4)
    rc = search.main(["--space", str(out.parent.parent / "custom-images.yaml"),
                      "--data", str(other), "--budget-gflops", "1", "--executor", "optuna", "--trials", "2",
                      "--rerank-top", "0", "--out", str(out.parent), "--resume", "--quiet"])
    assert rc == 2 and "was run with data=" in capsys.readouterr().err


def test_export_promote_train_and_sample_on_the_folder(study, tmp_path):
    out, images = study
    assert export.main(["--study", str(out), "--rank", "1", "--out", str(tmp_path / "winner.yaml")]) == 0
    cfg = MemeConfig.load(tmp_path / "winner.yaml")
    assert (cfg.data.channels, cfg.data.resolution) == (3, 32)

    # promote with no --data: the study's folder is the target data
    assert promote.main(["--study", str(out), "--top", "1", "--no-reference", "--steps", "4", "--batch-size", "4",
                         "--n", "8", "--n-ref", "16", "--sample-steps", "2", "--out", str(tmp_path / "promoted")]) == 0
    run = Path(pd.read_csv(tmp_path / "promoted" / "promoted.csv").run.iloc[0])
    assert json.loads((run / "options.json").read_text())["data"] == str(images.resolve())
    assert json.loads((run / "eval.json").read_text())["fid"] > 0

    # the exported YAML trained directly, then sampled
    run2 = tmp_path / "run"
    assert train.main(["--config", str(tmp_path / "winner.yaml"), "--data", str(images), "--out", str(run2),
                       "--steps", "3", "--batch-size", "4", "--sample-every", "0", "--device", "cpu"]) == 0
    assert sample.main(["--run", str(run2), "--n", "3", "--steps", "2", "--device", "cpu"]) == 0
    samples = np.load(run2 / "samples" / "samples.npz")["samples"]
    assert samples.shape == (3, 32, 32, 3) and samples.dtype == np.uint8   # NHWC, RGB at the target's shape
    assert len(list((run2 / "samples" / "png").glob("*.png"))) == 3
