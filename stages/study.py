"""`make study`: every selected model x corpus of a params profile (default study.yaml), stage by stage.

The same stage entry points as dvc.yaml, run in its order, each in its own process: prepare the models
and corpora, extract model by model (resumes block by block after a kill; a complete store is skipped
in a second), then per corpus score, fuse, train and the selection audit (`--jobs` corpora at once:
Stage 2 runs on one thread per process), then the predict cost of each corpus, one at a time (a timing beside
another corpus's work would be a timing of both), then the report and the study report. Stage 2 reruns each time.
"""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from pipeline.config import load_params
from stages import run_stage, stage_parser

STEPS = ("prepare", "extract", "score", "fuse", "train", "audit", "cost", "report")
PER_CORPUS = ("score", "fuse", "train", "audit")


class StepFailed(Exception):
    pass


def run(args: list[str], params: str) -> None:
    print("study:", " ".join([*args, "--params", params]), flush=True)
    if subprocess.run([sys.executable, "-m", *args, "--params", params]).returncode != 0:
        raise StepFailed(" ".join(args))


def run_all(commands: list[list[str]], params: str) -> None:
    for command in commands:
        run(command, params)


def main() -> None:
    parser = stage_parser(__doc__)
    parser.set_defaults(params="study.yaml")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="run only these steps")
    parser.add_argument("--jobs", type=int, default=2, help="corpora whose Stage 2 runs at once (default 2)")
    args = parser.parse_args()
    params = load_params(args.params)
    models, datasets = params.selected_models, params.selected_datasets
    started = time.perf_counter()
    per_corpus = {
        "score": lambda d: [["stages.score", "--model", m, "--dataset", d] for m in models],
        "fuse": lambda d: [["stages.fuse", "--dataset", d]],
        "train": lambda d: [["stages.train", "--dataset", d, "--head", h] for h in params.train.heads]
                           + [["stages.compare", "--dataset", d]],
        "audit": lambda d: [["stages.audit", "--dataset", d]],
    }
    try:
        if "prepare" in args.steps:
            run_all([["stages.prepare_model", "--model", m] for m in models]
                    + [["stages.prepare_data", "--dataset", d] for d in datasets], args.params)
        if "extract" in args.steps:              # model by model: every corpus gets each model in turn
            run_all([["stages.extract", "--model", m, "--dataset", d, "--no-progress"]
                     for m in models for d in datasets], args.params)
        chains = {d: [c for step in PER_CORPUS if step in args.steps for c in per_corpus[step](d)] for d in datasets}
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for future in [pool.submit(run_all, chain, args.params) for chain in chains.values()]:
                future.result()
        if "cost" in args.steps:
            run_all([["stages.cost", "--dataset", d] for d in datasets], args.params)
        if "report" in args.steps:
            run_all([["stages.report"], ["stages.study_report"]], args.params)
    except StepFailed as failed:
        sys.exit(f"study: {failed} failed; fix it and rerun `make study` (finished work is kept)")
    print(f"study: {len(models)} models x {len(datasets)} corpora, steps {args.steps}, "
          f"{time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    run_stage(main)
