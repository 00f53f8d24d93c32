"""One thin entry point per DVC stage: parse arguments, read params.yaml, call `pipeline`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Callable

from pipeline.config.params import Params, load_params
from pipeline.core.errors import EXIT_FAILURE, PipelineError, exit_status_on_signals, failure_exit_message, is_failure


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    return parser


def dataset_stage(description: str, *required: str) -> tuple[argparse.Namespace, Params, float]:
    """The start of a per-dataset Stage 2 entry point: its arguments (`--params`, `--dataset` and the `required`
    others, e.g. "head"), the params for that dataset, and the start time its `stage_seconds` counts from."""
    parser = stage_parser(description)
    for name in ("dataset", *required):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    return args, load_params(args.params, datasets=[args.dataset]), start


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage; a PipelineError is the user's to fix, so print its message alone and exit 2; a failure of
    the machine or network (errors.is_failure: an S3 outage, a permission, memory or open-file limit) gets
    one line and exit 75 (retry); SIGTERM and SIGINT exit 143 and 130 (never 0), whatever Lightning or the
    stage does with them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with exit_status_on_signals():
        try:
            main()
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except Exception as error:
            if not is_failure(error):
                raise                      # a bug: its traceback is what a report needs
            print(f"error: {failure_exit_message(error)}", file=sys.stderr)
            sys.exit(EXIT_FAILURE)
