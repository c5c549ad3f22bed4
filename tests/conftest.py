"""Fixtures shared by several test modules."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny_models import single_thread


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core box
    OpenMP spinning makes them ~100x slower; restore the setting afterwards.
    Modules that want it for every test say ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with single_thread():
        yield


@pytest.fixture()
def blobs(tmp_path) -> Path:
    """256 smooth random 1x16x16 images in [-1, 1] saved as a latent .npy file: training data
    tiny runs learn something from in a few steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(256, 1, 4, 4, generator=g), size=16, mode="bilinear")
    path = tmp_path / "blobs.npy"
    np.save(path, (x * 2 - 1).numpy().astype(np.float32))
    return path
