"""Checkpoints: atomic on write, and safe on read, whoever wrote the file.

Writing: the file goes to a temporary name in the same directory, is flushed and
fsynced, then moved over the old one with ``os.replace`` (atomic on POSIX). A reader
therefore sees either the previous complete checkpoint or the new complete one.

Reading (:func:`load`, used for every ``.pt`` file the project reads): a checkpoint may
come from elsewhere, and unpickling an arbitrary file runs arbitrary code. So every
file is read with ``torch.load(..., weights_only=True)`` and **no extra allowlist**:
everything a training checkpoint holds is a tensor or a plain value (dict, list,
tuple, str, int, float, bool, None). RNG state is stored in such forms on purpose
(:func:`rng_state`): torch and CUDA states are uint8 tensors, numpy's MT19937 state is
``{'kind', 'keys' (int64 tensor), 'pos', 'has_gauss', 'cached_gaussian'}``, Python's
is the plain tuple ``random.getstate()`` returns; optimizer state is its own
``state_dict`` (tensors, floats, tuples). Before unpickling, the zip container is
checked (a truncated copy has no central directory) and every member's CRC-32 is
verified, because ``torch.load`` itself does not: a bit flip in the weights would
otherwise load as silently different weights. Each failure is one
:class:`~meme.common.errors.UserError` line naming the file; a pickle that names a class
(``os.system``, ``builtins.open``...) is refused before anything in it runs.

Checkpoints from before this format kept numpy's RNG state as a numpy array, which a
weights-only load refuses. ``meme-nas checkpoint convert OLD NEW`` rewrites one;
it reads OLD with exactly the three numpy globals that array needs allowlisted
(``numpy.ndarray``, ``numpy.dtype`` and ``_reconstruct``), so even converting runs no code.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import torch
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

from meme.common.command import CommandParser, main_guard
from meme.common.errors import UserError, one_line

# What a training checkpoint holds (meme.training.train.Trainer.state); load_training checks it.
TRAINING_KEYS = ("model", "ema", "ema_n", "opt", "step", "rng", "data_gen", "config", "options")
RNG_KEYS = ("torch", "numpy", "python")
# The only globals an older checkpoint needs: numpy's RNG keys as an ndarray.
_OLD_NUMPY_GLOBALS = {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                      "numpy._core.multiarray._reconstruct", "numpy.dtypes.UInt32DType"}
CONVERT_COMMAND = "meme-nas checkpoint convert"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically: ``write(f)`` into a temp file, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result file is as readable as any other
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    """A JSON document (indented) written atomically: a reader never sees half of it."""
    data = (json.dumps(obj, indent=2) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data))


# ---- reading files from anywhere --------------------------------------------------------

def _check_container(path: Path, what: str) -> None:
    """A complete zip (torch.save's format) whose every member matches its CRC-32."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a complete {what} (truncated, or not written by torch.save)")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as exc:  # any damage to the container: zlib, struct, bad headers...
        raise UserError(f"{path}: damaged {what}: {one_line(exc)}") from None
    if bad is not None:
        raise UserError(f"{path}: damaged {what}: member {bad} fails its CRC-32 check (a corrupt or partial copy)")


def _refusal(path: Path, what: str) -> str:
    """The one line for a pickle that names globals a weights-only load does not allow."""
    try:
        names = sorted(get_unsafe_globals_in_checkpoint(path))
    except Exception:
        names = []
    if names and set(names) <= _OLD_NUMPY_GLOBALS:
        return (f"{path}: a {what} in the older format (numpy RNG state as an array); convert it once "
                f"with `{CONVERT_COMMAND} {path} NEW.pt` (that reads it without running code)")
    named = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "a foreign object"
    return f"{path}: refused: it would import {named}, which no {what} of this project holds; nothing in it was run"


def load(path: str | Path, map_location: str | torch.device = "cpu", what: str = "checkpoint",
         verify: bool = True, mmap: bool = False) -> Any:
    """Read a ``.pt`` file that may come from anywhere: weights-only, or one UserError line.

    ``verify=False`` skips the CRC pass (for a reader that only wants metadata out of a
    large memory-mapped file); the unpickling is weights-only either way.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if verify:
        _check_container(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UserError(_refusal(path, what)) from None
    except Exception as exc:  # bytes from elsewhere can break the reader anywhere: one line, not a traceback
        raise UserError(f"{path}: cannot read {what}: {one_line(exc)}") from None


def load_training(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A training checkpoint (meme.training.train): :func:`load`, then its keys and their types checked."""
    ck = load(path, map_location)
    if not isinstance(ck, dict):
        raise UserError(f"{path}: not a training checkpoint (holds a {type(ck).__name__}, not a dict)")
    missing = [k for k in TRAINING_KEYS if k not in ck]
    if missing:
        raise UserError(f"{path}: not a complete training checkpoint: lacks {missing}")
    for key in ("model", "ema"):
        state = ck[key]
        if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
            raise UserError(f"{path}: '{key}' must map parameter names to tensors")
    checks = {"step": isinstance(ck["step"], int) and not isinstance(ck["step"], bool) and ck["step"] >= 0,
              "ema_n": isinstance(ck["ema_n"], torch.Tensor) and ck["ema_n"].numel() == 1,
              "opt": isinstance(ck["opt"], dict), "config": isinstance(ck["config"], dict),
              "options": isinstance(ck["options"], dict), "data_gen": isinstance(ck["data_gen"], torch.Tensor),
              "rng": isinstance(ck["rng"], dict) and all(k in ck["rng"] for k in RNG_KEYS)}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise UserError(f"{path}: training checkpoint has malformed {bad}")
    return ck



@contextlib.contextmanager
def applying(path: str | Path, what: str = "checkpoint") -> Iterator[None]:
    """Putting a loaded state into live objects: a state that does not fit is one UserError line."""
    try:
        yield
    except UserError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise UserError(f"{path}: {what} does not fit this model: {one_line(exc)}") from None


# ---- RNG state in plain forms ---------------------------------------------------------------

def rng_state() -> dict:
    """Every RNG a training step touches, so ``--resume`` continues bit-for-bit (tensors and plain values)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- converting older checkpoints -------------------------------------------------------------

def _old_numpy_globals() -> list:
    """numpy.ndarray, numpy.dtype, the array rebuilder and the uint32 dtype class: nothing else."""
    core = np._core if hasattr(np, "_core") else np.core
    rebuild = core.multiarray._reconstruct
    return [np.ndarray, np.dtype, rebuild, type(np.dtype(np.uint32))]


def convert(old: str | Path, new: str | Path) -> Path:
    """Rewrite an older training checkpoint (numpy RNG as an array) in the weights-only format."""
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise FileNotFoundError(f"checkpoint not found: {old}")
    if new.exists():
        raise UserError(f"{new} already exists: choose another NEW path")
    _check_container(old, "checkpoint")
    try:
        with safe_globals(_old_numpy_globals()):
            ck = torch.load(old, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(_refusal(old, "checkpoint").split("; convert")[0]) from None
    except Exception as exc:
        raise UserError(f"{old}: cannot read checkpoint: {one_line(exc)}") from None
    rng = ck.get("rng") if isinstance(ck, dict) else None
    legacy = rng.get("numpy") if isinstance(rng, dict) else None
    if isinstance(legacy, tuple) and len(legacy) == 5:
        kind, keys, pos, has_gauss, cached = legacy
        rng["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    atomic_save(ck, new)
    load(new)  # what was written must read back weights-only, or this command is not done
    return new


@main_guard
def main(argv=None) -> int:
    p = CommandParser(prog="meme-nas checkpoint", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="rewrite an older checkpoint in the weights-only format")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    args = p.parse_args(argv)
    print(f"wrote {convert(args.old, args.new)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
