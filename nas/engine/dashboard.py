"""Open a study in optuna-dashboard: ``meme-nas dashboard [STUDY] [--port 8080]``.

STUDY is a study name (looked up as ``results/<name>/optuna.db``, then
``results/curated/<name>/optuna.db``), a study directory, an ``optuna.db`` file, or an
RDB URL (``postgresql+psycopg://...``). Default: the curated default study shipped with
the repository, so a fresh clone has something to look at.

A SQLite path that does not exist is a one-line error: opening it would create an empty
database, leave it behind, and fail inside the dashboard with ``no such table``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meme.common.command import CommandParser, main_guard
from meme.common.errors import UserError

DEFAULT_STUDY = "meme-ffhq256-b95"


def resolve_storage(spec: str, results: Path = Path("results")) -> str:
    """An RDB URL for ``spec``; raises UserError (nothing created) when no database exists."""
    if "://" in spec and not spec.startswith("sqlite"):
        return spec
    if spec.startswith("sqlite:///"):
        path = Path(spec[len("sqlite:///"):])
    else:
        cands = [Path(spec), Path(spec) / "optuna.db", results / spec / "optuna.db",
                 results / "curated" / spec / "optuna.db"]
        path = next((c for c in cands if c.is_file()), None)
        if path is None:
            tried = ", ".join(str(c) for c in cands[1:])
            raise UserError(f"no study database for {spec!r} (looked for {tried}); run nas.search first "
                            f"or pass an optuna.db path / RDB URL")
    if not path.is_file() or path.stat().st_size == 0:
        raise UserError(f"study database not found or empty: {path}")
    return f"sqlite:///{path.resolve()}"


def parse_args(argv=None) -> argparse.Namespace:
    p = CommandParser(prog="meme-nas dashboard", description=__doc__.splitlines()[0])
    p.add_argument("study", nargs="?", default=DEFAULT_STUDY,
                   help="study name under results/ (or results/curated/), a directory, an optuna.db or an "
                        "RDB URL (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port (default %(default)s)")
    p.add_argument("--results", type=Path, default=Path("results"), help="results root (default %(default)s)")
    return p.parse_args(argv)


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    url = resolve_storage(args.study, args.results)
    try:
        import optuna_dashboard
    except ImportError:
        raise UserError("optuna-dashboard is not installed: pip install 'optuna-dashboard>=0.15,<0.22'") from None
    print(f"serving {url} at http://{args.host}:{args.port}/dashboard/  (Ctrl-C to stop)", flush=True)
    optuna_dashboard.run_server(url, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
