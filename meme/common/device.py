"""Which torch device a command runs on."""
from __future__ import annotations

import torch

from meme.common.errors import UserError


def pick_device(name: "str | torch.device | None" = None) -> torch.device:
    """``None``/``'auto'`` -> CUDA when available, else CPU; an unavailable CUDA is a UserError."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available here")
    return torch.device(name)
