"""MEME-NAS's search: per-interval denoiser architectures under a per-step budget.

Start at ``nas/search.py`` (the ``python -m nas.search`` command). The subpackages, in
the one direction they may import (``docs/design.md`` has the picture; a test checks it):
``space`` <- ``evaluators`` <- ``engine`` <- ``promote`` <- ``studies`` and ``bench``.
Everything here may import ``meme``; nothing in ``meme`` imports ``nas``.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed distribution's version (``meme-nas --version``)."""
    try:
        return version("meme-nas")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown (not installed)"
