"""The edge of every command: expected errors as one line with exit code 2, logging set-up.

``UserError``/``one_line`` live in ``meme.errors``, ``pick_device`` in ``meme.device`` and
``markdown_table`` in ``meme.markdown``; they are re-exported here for the commands that
import them from this module.
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

from meme.config import ConfigError
from meme.device import pick_device  # noqa: F401  (re-exported)
from meme.errors import UserError, one_line
from meme.markdown import markdown_table  # noqa: F401  (re-exported)


EXPECTED_ERRORS = (ConfigError, UserError, FileNotFoundError)


def main_guard(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI ``main``: expected errors print ``error: ...`` and exit 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return int(fn(*args, **kwargs) or 0)
        except EXPECTED_ERRORS as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
