"""The project's errors for bad input (a user's flag or file, a config value), and how any
exception is told in one line."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (missing data, impossible budget...): one line, exit 2."""


class ConfigError(ValueError):
    """A config value is invalid; the message is one line naming the field."""


def one_line(exc: BaseException, typed: bool = False) -> str:
    """An exception's first non-empty line (its type's name when it says nothing), at most
    500 characters; ``typed``: prefixed with the type, as a trial's ``fail_reason``."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if typed:
        return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]
    return (lines[0] if lines else type(exc).__name__)[:500]
