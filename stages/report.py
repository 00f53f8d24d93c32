"""Stage report: the Markdown report, its figures and the headline metrics, into reports/."""

import time
from pathlib import Path

from pipeline.core.atomic import staged_folder
from pipeline.config.params import load_params
from pipeline.core.errors import ConfigError
from pipeline.report.dataset_report import write_report
from stages import run_stage, stage_parser


def report_folder(root: Path, store: Path, name: str) -> Path:
    """The report's folder, which is replaced whole on success: never the project, or one holding the store."""
    out = (root / name).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {name}: {out.name} is a file, not a folder; the report needs a folder of its own "
                          f"(it is replaced whole)")
    if out == root.resolve() or out in root.resolve().parents or store.resolve().is_relative_to(out):
        raise ConfigError(f"--out {name}: the report needs a folder of its own (it is replaced whole), "
                          f"not the project folder or one holding the store")
    return out


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", help="report folder (default: params.yaml report.out)")
    args = parser.parse_args()
    start = time.perf_counter()
    params = load_params(args.params)
    out = report_folder(params.root, Path(params.store), args.out or params.report.out)
    # report.md, figures/ and metrics.json replace the old ones in one step; the folder's other files
    # (reports/benchmarks.md, ...) are kept as they are
    with staged_folder(out, keep_others=True) as staged:
        name = write_report(params, staged).name
    print(f"report: {out / name} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    run_stage(main)
