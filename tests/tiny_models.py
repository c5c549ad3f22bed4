"""Small real models, and small helpers around them, shared by the tests."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from torch import nn

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core box OpenMP
    spinning makes them ~100x slower; the setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_space_variant(folder: Path, name: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    """``search_spaces/tiny.yaml`` renamed and changed by ``edit`` (on its parsed YAML), written to ``folder``."""
    d = yaml.safe_load((SPACES / "tiny.yaml").read_text())
    d["name"] = name
    edit(d)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path



class TinyEps(nn.Module):
    """A real (untrained) conv denoiser whose output depends on its weights and on t."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.temb = nn.Linear(1, channels)

    def forward(self, x, t):
        return self.conv(x) + self.temb(t.float()[:, None] / 1000.0)[:, :, None, None]
