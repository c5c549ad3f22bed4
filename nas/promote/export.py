"""Write a trial's architecture as a MemeConfig YAML: ``meme-nas export --study DIR``.

``--rank K`` picks the K-th best feasible, fully trained trial (1 = best); ``--trial N``
picks a trial by number. The YAML is at the TARGET scale (what the budget measured),
loadable by ``MemeConfig.load`` and ``meme-nas train --config``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import optuna

from meme.common.command import CommandParser, main_guard
from meme.common.errors import UserError
from meme.model.config import MemeConfig
from nas.engine.report import ranked


def open_study(study_dir: Path, storage: Optional[str] = None, name: Optional[str] = None) -> optuna.Study:
    """The study in DIR/optuna.db (or --storage), by name or the only one there."""
    study_dir = Path(study_dir)
    if storage is None:
        db = study_dir / "optuna.db"
        if not db.is_file():
            raise UserError(f"no study in {study_dir}: {db} not found (run python -m nas.search first)")
        storage = f"sqlite:///{db.resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    name = name or (study_dir.name if study_dir.name in names else (names[0] if len(names) == 1 else None))
    if name not in names:
        raise UserError(f"{storage} holds studies {names}: pick one with --name")
    return optuna.load_study(study_name=name, storage=storage)


def trial_config(study: optuna.Study, rank: Optional[int] = None, number: Optional[int] = None) -> tuple[MemeConfig, int]:
    """(config, trial number) of the rank-th best trial or of trial ``number``."""
    if number is not None:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not trials or "config_yaml" not in trials[0].user_attrs:
            raise UserError(f"study {study.study_name} has no trial {number} with a config")
        t = trials[0]
    else:
        order = ranked(study)
        rank = 1 if rank is None else rank
        if not 1 <= rank <= len(order):
            raise UserError(f"--rank {rank}: study {study.study_name} has {len(order)} feasible, fully trained trials")
        t = order[rank - 1]
    cfg = MemeConfig.from_yaml(t.user_attrs["config_yaml"], f"trial {t.number}")
    return cfg, t.number


def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(prog="meme-nas export", description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, type=Path, help="study directory (results/<study>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, default=None, help="K-th best feasible, fully trained trial (default 1)")
    g.add_argument("--trial", type=int, default=None, help="export this trial number instead (e.g. the re-rank winner)")
    p.add_argument("--out", type=Path, default=None, help="YAML path (default STUDY/rank<K>.yaml or trial<N>.yaml)")
    p.add_argument("--storage", default=None, help="Optuna RDB URL if the study is not in STUDY/optuna.db")
    p.add_argument("--name", default=None, help="study name when the storage holds several")
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rank is not None and args.rank < 1:
        raise UserError(f"--rank must be >= 1 (1 = best), got {args.rank}")
    study = open_study(args.study, args.storage, args.name)
    cfg, number = trial_config(study, args.rank, args.trial)
    tag = f"trial{args.trial}" if args.trial is not None else f"rank{1 if args.rank is None else args.rank}"
    cfg = MemeConfig.from_dict({**cfg.to_dict(), "name": f"{study.study_name}-{tag}"}, "export")
    out = cfg.save(args.out or Path(args.study) / f"{tag}.yaml")
    print(f"trial {number} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
