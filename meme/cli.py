"""Shared CLI plumbing: one-line errors with exit code 2, logging set-up."""
from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable, Iterable, Sequence

from meme.config import ConfigError


class UserError(Exception):
    """Bad input from the user (missing data, impossible budget...): one line, exit 2."""


EXPECTED_ERRORS = (ConfigError, UserError, FileNotFoundError)


def main_guard(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI ``main``: expected errors print ``error: ...`` and exit 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return int(fn(*args, **kwargs) or 0)
        except EXPECTED_ERRORS as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"error: {msg}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def pick_device(name: "str | torch.device | None" = None) -> "torch.device":
    """``None``/``'auto'`` -> CUDA when available, else CPU; an unavailable CUDA is a UserError."""
    import torch

    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available here")
    return torch.device(name)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-style table (no optional 'tabulate' dependency); floats to 4 significant digits."""
    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
        return text.replace("|", "/")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
