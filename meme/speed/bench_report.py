"""A benchmark's rows and how they are written: a text table, a CSV, a markdown section.

Shared by the model benchmarks (``meme.speed.model_bench``), the scaling runs (``meme.speed.scaling``)
and the search's (``nas.bench.run``), so one run's figures land in one table with one set
of columns. Nothing is estimated: a figure a run could not measure is a string saying
so (``NOT_MEASURED``, ``PENDING``, "n/a (cpu)").
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from meme.common.checkpoint import atomic_write

COLUMNS = ("section", "item", "metric", "value", "unit", "vs_ref", "macs_ratio", "target", "shape", "note")
NOT_MEASURED = "not yet measured"
PENDING = "pending"


@dataclass
class Row:
    """One line of the table and of the CSV."""

    section: str                    # fastpath | sampling | training | memory | search | compile | device | target
    item: str                       # model or thing measured
    metric: str                     # what was measured
    value: float | int | str        # the figure, or why there is none
    unit: str = ""
    vs_ref: float | str = ""        # measured ratio against the reference (LDM-L for sampling)
    macs_ratio: float | str = ""    # the same ratio in MACs: the ideal
    target: str = ""                # the goal this figure is held to, if any
    shape: str = ""                 # data shape, batch and steps it was measured at
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        return {c: _fmt(getattr(self, c)) for c in COLUMNS}


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        # three significant digits below 10, so a ratio of two printed values stays within ~1%
        return f"{v:.3g}" if a < 10 and v else (f"{v:.2f}" if a < 1000 else f"{v:.0f}")
    return str(v)


def format_table(rows: list[Row]) -> str:
    cols = ("section", "item", "metric", "value", "unit", "vs_ref", "macs_ratio", "target", "shape")
    cells = [[_fmt(getattr(r, c)) for c in cols] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, width)).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in width])] + [line(x) for x in cells])


def write_csv(rows: list[Row], path: Path) -> Path:
    """Atomically: a run stopped while it rewrites its CSV after a section keeps the last whole one."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, COLUMNS)
    w.writeheader()
    w.writerows(r.as_dict() for r in rows)
    data = text.getvalue().encode()
    return atomic_write(path, lambda f: f.write(data))


def _marker(block: str) -> str | None:
    m = re.match(r"<!-- bench:(.*?) -->", block)
    return m.group(1) if m else None


def update_markdown(path: Path, key: str, section: str, header: str, pending: str = "") -> None:
    """Replace (or add) the section marked ``key`` in a file of marked sections.

    ``header`` starts the file when there is none. ``pending`` is a marked note of what
    no CUDA run has measured yet: it stays last while no section's key starts with
    "cuda" and is dropped once one does, so a GPU run replaces the note with figures.
    """
    text = path.read_text() if path.exists() else header
    blocks = re.split(r"(?=<!-- bench:)", text)
    head, blocks = blocks[0], blocks[1:]
    skip = {key, _marker(pending) or key}      # the pending note is re-added last when still true
    keep = [b.rstrip() + "\n\n" for b in blocks if _marker(b) not in skip]
    keep.append(section.rstrip() + "\n\n")
    has_cuda = any(re.match(r"<!-- bench:cuda", b) for b in keep)
    if pending and not has_cuda:
        keep.append(pending + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head.rstrip() + "\n\n" + "".join(keep).rstrip() + "\n")
