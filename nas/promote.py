"""Promote the top-K trials of a study to full training: ``python -m nas.promote --study DIR --top K``.

For each of the K best feasible trials (and the study's hand-designed reference) it
runs, as subprocesses, ``meme.train`` -> ``meme.sample`` -> ``meme.evaluate`` in
``STUDY/promoted/<name>/``, then writes ``comparison.csv`` and ``comparison.md``.
Resumable: a finished stage is skipped (marker files), an interrupted training run is
continued with ``--resume`` from its last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pandas as pd

from meme.cli import UserError, main_guard
from meme.config import MemeConfig
from nas.export import open_study


def _run(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["?"]
        raise UserError(f"{cmd[2]} failed (exit {rc}): {tail[0]} -- full log {log}")


def promote_one(cfg: MemeConfig, run: Path, args) -> dict:
    """Train, sample, evaluate one config in ``run`` (skipping stages already done)."""
    run.mkdir(parents=True, exist_ok=True)
    yaml_path = cfg.save(run / "search_config.yaml")
    log = run / "promote.log"
    py = sys.executable
    if not (run / "train.done").exists():
        cmd = [py, "-m", "meme.train", "--config", str(yaml_path), "--out", str(run)]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        if (run / "checkpoints" / "last.pt").exists():
            cmd.append("--resume")
        cmd += args.train_args
        _run(cmd, log)
        (run / "train.done").write_text("ok\n")
    if not (run / "samples" / "samples.npz").exists():
        _run([py, "-m", "meme.sample", "--run", str(run), "--n", str(args.n)], log)
    if not (run / "eval.json").exists():
        _run([py, "-m", "meme.evaluate", "--run", str(run), "--n", str(args.n)], log)
    return json.loads((run / "eval.json").read_text())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nas.promote", description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, type=Path, help="study directory (results/<study>)")
    p.add_argument("--top", type=int, default=3, help="how many of the best trials (default %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps in all, over every expert: the same for every promoted config, whatever "
                        "its N, as in the search (default: meme.train's)")
    p.add_argument("--n", type=int, default=10000, help="samples for FID (default %(default)s)")
    p.add_argument("--no-reference", action="store_true", help="do not promote the study's reference design")
    p.add_argument("--out", type=Path, default=None, help="default STUDY/promoted")
    p.add_argument("--storage", default=None, help="Optuna RDB URL if the study is not in STUDY/optuna.db")
    p.add_argument("--name", default=None, help="study name when the storage holds several")
    p.add_argument("train_args", nargs="*", help="extra meme.train flags after --, e.g. -- --batch-size 32")
    return p.parse_args(argv)


def _reference(study_dir: Path, study) -> Optional[tuple[MemeConfig, dict]]:
    from nas.space import load_space

    rec_path = study_dir / "reference.json"
    if not rec_path.is_file():
        return None
    rec = json.loads(rec_path.read_text())
    space = study.user_attrs.get("space")
    try:
        cfg = load_space(space).reference_config() if space else None
    except Exception:
        cfg = None
    if cfg is None or cfg.hash() != rec.get("config_hash"):  # space edited since the search
        return None
    return cfg, rec


@main_guard
def main(argv=None) -> int:
    from nas.report import markdown_table, quality, ranked

    args = parse_args(argv)
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    study = open_study(args.study, args.storage, args.name)
    out = args.out or Path(args.study) / "promoted"
    entries = []
    for rank, t in enumerate(ranked(study)[: args.top], 1):
        cfg = MemeConfig.from_yaml(t.user_attrs["config_yaml"], f"trial {t.number}")
        cfg = MemeConfig.from_dict({**cfg.to_dict(), "name": f"{study.study_name}-rank{rank}"}, "promote")
        entries.append((f"rank{rank}", cfg, {"trial": t.number, "gflops": t.user_attrs["gflops"],
                                             "params": t.user_attrs["params"], "proxy_objective": quality(t)}))
    if not entries:
        raise UserError(f"study {study.study_name} has no feasible, fully trained trial to promote")
    ref = None if args.no_reference else _reference(Path(args.study), study)
    if ref:
        cfg, rec = ref
        entries.append((f"reference-{cfg.name}", cfg, {"trial": "reference", "gflops": rec["gflops"],
                                                       "params": rec["params"], "proxy_objective": rec.get("objective")}))
    rows = []
    for tag, cfg, info in entries:
        print(f"== {tag}: {cfg.name} ({cfg.num_experts} experts, {info['gflops']:.2f} GFLOPs)")
        ev = promote_one(cfg, out / tag, args)
        rows.append({"name": tag, **info, "num_experts": cfg.num_experts, "fid": ev.get("fid"),
                     "precision": ev.get("precision"), "recall": ev.get("recall"), "n": ev.get("n"),
                     "run": str(out / tag)})
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(markdown_table(list(df.columns), df.itertuples(index=False)))
    print(df.to_string(index=False))
    print(f"comparison: {out / 'comparison.csv'}, {out / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
