"""Stage report: the Markdown report, its figures and the headline metrics, into reports/."""

import time

from pipeline.config import load_params
from pipeline.report import write_report
from stages import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", help="report folder (default: params.yaml report.out)")
    args = parser.parse_args()
    start = time.perf_counter()
    params = load_params(args.params)
    path = write_report(params, params.root / (args.out or params.report.out))
    print(f"report: {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    run_stage(main)
