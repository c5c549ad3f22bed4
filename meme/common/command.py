"""The edge of every command: expected errors as one line with exit code 2, logging set-up."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from typing import Callable

from meme.common.errors import ConfigError, UserError, one_line
from meme.common.fastpath import FAST_PATH_ENV

EXPECTED_ERRORS = (ConfigError, UserError, FileNotFoundError)


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` names each option's default, unless its text already speaks of one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or "default" in text.lower()
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """The parser of every command: defaults shown in ``--help`` (sub-commands inherit it)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class _NoFastPath(argparse.Action):
    """Sets ``MEME_FAST_PATH=0`` as it is parsed, so every fast path built after (and every
    process started after: trials, training runs, Ray workers) is the plain one."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        os.environ[FAST_PATH_ENV] = "0"
        setattr(namespace, self.dest, True)


def add_fast_path_flag(p: argparse.ArgumentParser) -> None:
    """``--no-fast-path``: the debugging switch of every command that runs a network."""
    p.add_argument("--no-fast-path", action=_NoFastPath,
                   help="run plain fp32: no bf16 autocast, no channels_last, no TF32, no cudnn.benchmark "
                        "(for debugging; also MEME_FAST_PATH=0)")


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
