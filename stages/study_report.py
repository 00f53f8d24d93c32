"""Stage study_report: the cross-corpus study report (study.md, figures, study.json) into report.out."""

import time
from pathlib import Path

from pipeline.core.atomic import staged_folder
from pipeline.config.params import load_params
from pipeline.report.study_report import write_study_report
from stages import run_stage, stage_parser
from stages.report import report_folder


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--compare-store", nargs="+", default=["store/study", "store/study_capped", "store"],
                        help="stores of other runs of the same corpora (the full-size study's, the capped study's, the "
                             "default run's; the first with results on the other side of the caps serves), relative to the params file's project: where one is capped and this "
                             "study is not, or the other way round, the report compares the two")
    args = parser.parse_args()
    start = time.perf_counter()
    params = load_params(args.params)
    out = report_folder(params.root, Path(params.store), params.report.out)
    own = Path(params.store).resolve()
    others = [params.root / s for s in args.compare_store if (params.root / s).resolve() != own]
    with staged_folder(out, keep_others=True) as staged:
        name = write_study_report(params, staged, others).name
    print(f"study report: {out / name} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    run_stage(main)
