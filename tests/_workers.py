"""Child processes for the reliability tests, started from a forkserver that has torch and
transformers imported already: an extraction child starts in a fraction of a second, so a test
can SIGKILL ten of them without paying ten interpreter start-ups."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import signal
from pathlib import Path

PRELOAD = ["_workers", "pipeline.extract.driver", "pipeline.store.verify", "transformers",
           "transformers.models.llama.modeling_llama", "transformers.models.bert.tokenization_bert"]


def context():
    """The forkserver context, with the heavy imports preloaded once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def extract_child(params_path: str, model: str, dataset: str, result_path: str, *, wait: bool = False,
                  fsize_limit: int | None = None) -> None:
    """Run one extraction; write {"ok", "summary"} or {"ok": False, "type", "message"} to result_path."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch's default thread count, as in the test process: float reductions (and so the last bit of a
    # vector) depend on how many threads split them
    if fsize_limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    from pipeline.config.params import load_params
    from pipeline.core.errors import PipelineError
    from pipeline.extract.driver import extract
    try:
        summary = extract(load_params(params_path), model, dataset, show_progress=False, wait_for_lock=wait)
        result = {"ok": True, "summary": summary}
    except PipelineError as error:
        result = {"ok": False, "type": type(error).__name__, "message": str(error)}
    if fsize_limit is not None:
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    Path(result_path).write_text(json.dumps(result))


def late_rank_one(fabric, params_path: str, delay: float) -> None:
    """One rank of a two-process extraction (Fabric ddp_spawn) in which rank 1 opens the store `delay`
    seconds after rank 0, as a rank on a loaded machine does: rank 0 may mark blocks done before rank 1
    looks at what is pending. The real open_extraction runs; only its start is delayed."""
    import time

    import pipeline.extract.driver
    from pipeline.config.params import load_params
    from pipeline.extract.distributed import run_rank

    if fabric.global_rank == 1:
        opened = pipeline.extract.driver.open_extraction

        def late(*args, **kwargs):
            time.sleep(delay)
            return opened(*args, **kwargs)

        pipeline.extract.driver.open_extraction = late
    run_rank(fabric, load_params(params_path), "tiny-llama", "mrslice", show_progress=False)
