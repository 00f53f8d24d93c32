"""`make study`: every selected model x corpus of a params profile (default study.yaml), stage by stage.

The same stage entry points as dvc.yaml, run in its order, each in its own process: prepare the models
and corpora, extract (resumes block by block after a kill; a complete store is skipped in a second),
then score, fuse, train, the selection audit and the study report. Stage 2 reruns each time (minutes).
"""

import subprocess
import sys
import time

from pipeline.config import load_params
from stages import run_stage, stage_parser

STEPS = ("prepare", "extract", "score", "fuse", "train", "audit", "report")


def run(args: list[str], params: str) -> None:
    command = [sys.executable, "-m", *args, "--params", params]
    print("study:", " ".join(command[2:]), flush=True)
    if subprocess.run(command).returncode != 0:
        sys.exit(f"study: {' '.join(command[2:])} failed; fix it and rerun `make study` (finished work is kept)")


def main() -> None:
    parser = stage_parser(__doc__)
    parser.set_defaults(params="study.yaml")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="run only these steps")
    args = parser.parse_args()
    params = load_params(args.params)
    models, datasets = params.selected_models, params.selected_datasets
    started = time.perf_counter()
    plan = {
        "prepare": [["stages.prepare_model", "--model", m] for m in models]
                   + [["stages.prepare_data", "--dataset", d] for d in datasets],
        "extract": [["stages.extract", "--model", m, "--dataset", d, "--no-progress"]
                    for m in models for d in datasets],     # model by model: every corpus gets each model in turn
        "score": [["stages.score", "--model", m, "--dataset", d] for d in datasets for m in models],
        "fuse": [["stages.fuse", "--dataset", d] for d in datasets],
        "train": [["stages.train", "--dataset", d] for d in datasets],
        "audit": [["stages.audit", "--dataset", d] for d in datasets],
        "report": [["stages.report"], ["stages.study_report"]],
    }
    for step in STEPS:
        if step in args.steps:
            for command in plan[step]:
                run(command, args.params)
    print(f"study: {len(models)} models x {len(datasets)} corpora, steps {args.steps}, "
          f"{time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    run_stage(main)
