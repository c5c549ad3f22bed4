"""Files from elsewhere: checkpoints load without running code, bad files are one-line refusals."""
from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from meme.common import checkpoint
from meme.common.errors import UserError
from meme.model.config import ConfigError
from meme.model.references import resolve
from meme.model.resources import check_fits
from meme.sampling import sample
from meme.training import train as train_cli
from nas.space.space import SPACES_DIR, load_space
from tests.meme.training.test_train import opts, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[3]


class Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    blobs = root / "blobs.npy"
    np.save(blobs, (torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).numpy())
    train_cli.train(tiny_cfg(), opts(blobs, steps=2, ckpt_every=2), root / "run", progress=False)
    return root / "run", blobs


def _copy_run(run: Path, dest: Path, ckpt: bytes | None = None) -> Path:
    (dest / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "options.json", "metrics.csv"):
        (dest / name).write_bytes((run / name).read_bytes())
    (dest / "checkpoints" / "last.pt").write_bytes(ckpt if ckpt is not None else
                                                   (run / "checkpoints" / "last.pt").read_bytes())
    return dest


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_no_torch_load_in_the_project_can_unpickle_code():
    calls = [(p, m.group(0)) for p in [*REPO.glob("meme/**/*.py"), *REPO.glob("nas/**/*.py")]
             for m in re.finditer(r"torch\.load\([^)]*\)", p.read_text())]
    assert calls and all("weights_only=True" in c for _, c in calls), calls


def test_crafted_checkpoint_does_not_run_its_payload(tmp_path, run, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"evil\.pt: refused: it would import io\.open.*nothing in it was run"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not marker.exists()
    # the same file as a run's checkpoint: `meme.sampling.sample` and `meme.training.train --resume` refuse in one line
    bad = _copy_run(run[0], tmp_path / "run", (tmp_path / "evil.pt").read_bytes())
    before = _snapshot(bad)
    assert sample.main(["--run", str(bad), "--n", "1", "--steps", "1"]) == 2
    assert "refused" in _one_error_line(capsys)
    assert train_cli.main(["--config", str(bad / "config.yaml"), "--out", str(bad), "--resume", "--data",
                           str(run[1]), "--steps", "4", "--device", "cpu"]) == 2
    assert "refused" in _one_error_line(capsys)
    assert not marker.exists() and _snapshot(bad) == before


def test_truncated_checkpoint_is_refused_and_the_run_left_as_it_was(tmp_path, run, capsys):
    data = (run[0] / "checkpoints" / "last.pt").read_bytes()
    bad = _copy_run(run[0], tmp_path / "run", data[: len(data) // 2])
    before = _snapshot(bad)
    assert train_cli.main(["--config", str(bad / "config.yaml"), "--out", str(bad), "--resume", "--data",
                           str(run[1]), "--steps", "4", "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "last.pt: not a complete checkpoint (truncated" in line
    assert _snapshot(bad) == before


def test_checkpoint_from_another_config_is_refused(tmp_path, run, capsys):
    other = dataclasses.replace(tiny_cfg(), expert_probs=(1.0, 1.0))
    bad = _copy_run(run[0], tmp_path / "run")
    other.save(bad / "config.yaml")
    before = _snapshot(bad)
    assert sample.main(["--run", str(bad), "--n", "1", "--steps", "1"]) == 2
    assert "was trained with a different config" in _one_error_line(capsys)
    assert _snapshot(bad) == before


def test_older_checkpoint_is_refused_with_the_command_that_converts_it(tmp_path, run):
    ck = checkpoint.load(run[0] / "checkpoints" / "last.pt")
    ck["rng"]["numpy"] = np.random.get_state()   # the format before: numpy's state as an array
    old = tmp_path / "old.pt"
    torch.save(ck, old)
    with pytest.raises(UserError, match=r"older format.*meme-nas checkpoint convert"):
        checkpoint.load(old)
    assert checkpoint.main(["convert", str(old), str(tmp_path / "new.pt")]) == 0
    new = checkpoint.load_training(tmp_path / "new.pt")
    assert np.array_equal(new["rng"]["numpy"]["keys"].numpy(), ck["rng"]["numpy"][1])
    # converting runs no code either
    marker = tmp_path / "pwned"
    torch.save({"rng": {"numpy": Payload(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refused"):
        checkpoint.convert(tmp_path / "evil.pt", tmp_path / "evil-new.pt")
    assert not marker.exists() and not (tmp_path / "evil-new.pt").exists()


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = checkpoint.atomic_save({"rng": checkpoint.rng_state()}, tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    assert (random.random(), np.random.rand()) == want[:2] and torch.equal(torch.rand(1), want[2])


def test_latent_file_with_wrong_dtype_or_lying_shape_is_refused(tmp_path, capsys):
    from meme.data.dataset import load_data
    from meme.model.config import DataShape

    ints = tmp_path / "ints.pt"
    torch.save({"latents": torch.zeros(8, 1, 16, 16, dtype=torch.int64)}, ints)
    with pytest.raises(UserError, match=r"ints\.pt: latents must be floating point"):
        load_data(str(ints), DataShape(1, 16, False), "train")
    lying = tmp_path / "lying.npy"
    np.save(lying, np.zeros((8, 1, 16, 16), np.float32))
    raw = lying.read_bytes()
    lying.write_bytes(raw.replace(b"(8, 1, 16, 16)", b"(9, 1, 16, 16)"))
    with pytest.raises(UserError, match=r"lying\.npy: header says \[9, 1, 16, 16\]"):
        load_data(str(lying), DataShape(1, 16, False), "train")


def test_configs_too_large_for_the_machine_are_refused_with_the_number(tmp_path, capsys):
    base = resolve("fmnist-meme-small").to_dict()
    huge = tmp_path / "huge.yaml"
    base["experts"][0]["base_channels"] = 10 ** 9
    huge.write_text(yaml.safe_dump(base))
    assert train_cli.main(["--config", str(huge), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert re.search(r"huge\.yaml: experts\[0\]: a stage \d+ channels wide is beyond 65536", _one_error_line(capsys))
    negative = tmp_path / "negative.yaml"
    base["experts"][0]["base_channels"] = -64
    negative.write_text(yaml.safe_dump(base))
    assert train_cli.main(["--config", str(negative), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "negative.yaml: experts[0].base_channels must be a positive multiple of 8, got -64" in _one_error_line(capsys)
    wide = tmp_path / "wide.yaml"
    base["experts"] = [dict(e, base_channels=8192) for e in base["experts"]]
    wide.write_text(yaml.safe_dump(base))
    assert train_cli.main(["--config", str(wide), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert re.search(r"needs at least [\d.e+]+ GiB to train \([\d.e+]+M parameters.*cpu has [\d.]+ GiB available", line)
    assert not (tmp_path / "out").exists()
    # the activation bound alone: a small network at a huge resolution and batch
    tall = dataclasses.replace(resolve("fmnist-meme-small"), data=dataclasses.replace(
        resolve("fmnist-meme-small").data, resolution=8192)).validate()
    with pytest.raises(ConfigError, match=r"4\.7\d*M parameters, at least [\d.]+ GiB of activations at batch 64"):
        check_fits(tall, 64, "cpu")


def test_search_refuses_a_space_whose_trials_would_not_fit(tmp_path):
    d = yaml.safe_load((SPACES_DIR / "tiny.yaml").read_text())
    d["proxy"]["resolution"] = 8192
    d["proxy"]["batch_size"] = 4096
    d.pop("reference")
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"big\.yaml: proxy: 3 experts of base 16 .* needs at least .* GiB to train"):
        load_space(path)
