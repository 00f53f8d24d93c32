"""`layerfuse` / `python -m pipeline`: commands for people (the DVC stages live in `stages/`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import PipelineError


def _store_paths(args) -> list[Path]:
    if args.paths:
        return [Path(p) for p in args.paths]
    from pipeline.config import load_params
    params = load_params(args.params)
    return [params.embeddings_path(m, d) for d in params.selected_datasets for m in params.selected_models]


def cmd_inspect(args) -> int:
    from pipeline.inspect_store import summarise
    results = [summarise(path) for path in _store_paths(args)]
    return 0 if all(r["complete"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerfuse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="summarise stores (default: every selected model x dataset)")
    inspect.add_argument("paths", nargs="*", help="store folders (store/embeddings/<dataset>/<model>)")
    inspect.add_argument("--params", default="params.yaml")
    inspect.set_defaults(run=cmd_inspect)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (PipelineError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
