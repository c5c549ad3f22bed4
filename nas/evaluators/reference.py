"""The hand-designed baseline every study is compared with (default: paper Table 4's MEME).

It is trained by the same ``run_trial`` on the same proxy with the same seed as the
candidates, so "beat the reference" means beating the paper's design under identical
training, not a number copied from a table. Stored in ``reference.json`` (reused on
``--resume`` when proxy, objective and seed match).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from meme.common.checkpoint import atomic_write_json
from meme.common.errors import one_line
from nas.evaluators.trial import run_trial
from nas.space.budget import cost_of


def run_reference(cfg, proxy, objective: str, budget_mode: str, device: Optional[str] = None,
                  threads: Optional[int] = None) -> dict[str, Any]:
    """Train the reference on the proxy; a JSON-ready record (never raises)."""
    c = cost_of(cfg, budget_mode)
    rec: dict[str, Any] = {"name": cfg.name, "config_hash": cfg.hash(), "gflops": c.gflops, "gflops_mean": c.gflops_mean,
                           "gflops_max": c.gflops_max, "gflops_per_expert": c.gflops_per_expert,
                           "params": c.params, "paper_units": c.paper_units, "num_experts": cfg.num_experts,
                           "objective_name": objective, "proxy": proxy.digest()}
    try:
        res = run_trial(cfg, proxy, lambda step, value: False, objective=objective, device=device,
                        threads=threads)
        rec.update(objective=res.objective, trained_steps=res.steps, wall_s=round(res.wall_s, 2),
                   peak_mem_mb=round(res.peak_mem_mb, 1), device=res.device, history=res.history)
    except Exception as exc:
        rec.update(objective=None, fail_reason=one_line(exc, typed=True))
    return rec


def load(path: Path, cfg, proxy, objective: str) -> Optional[dict[str, Any]]:
    """A stored record, if it was made for the same config, proxy and objective."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if rec.get("config_hash") != cfg.hash() or rec.get("proxy") != proxy.digest() or rec.get("objective_name") != objective or rec.get("objective") is None:
        return None
    return rec


def save(path: Path, rec: dict[str, Any]) -> None:
    atomic_write_json(rec, path)
