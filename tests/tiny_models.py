"""Small real models shared by the tests."""
from __future__ import annotations

from torch import nn


class TinyEps(nn.Module):
    """A real (untrained) conv denoiser whose output depends on its weights and on t."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.temb = nn.Linear(1, channels)

    def forward(self, x, t):
        return self.conv(x) + self.temb(t.float()[:, None] / 1000.0)[:, :, None, None]
