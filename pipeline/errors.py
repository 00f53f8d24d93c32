"""The project's errors: each says what is wrong and how to fix it, so stages can print them bare."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator


class PipelineError(Exception):
    """Base class: a user-facing problem (bad config, bad data, mismatched store), not a bug."""


class ConfigError(PipelineError):
    """params.yaml names something unknown or holds a bad value."""


class UnsupportedModelError(PipelineError):
    """A model family whose layers the extraction cannot tap: said before any store is created."""


class DataError(PipelineError):
    """A corpus cannot be read or holds rows we refuse to embed."""


class ModelSourceError(PipelineError):
    """A model cannot be located, assembled or verified."""


class StoreMismatchError(PipelineError):
    """An existing store was written with other settings than the current params."""


class StoreIncompleteError(PipelineError):
    """A reader asked for a split whose extraction has not finished."""


class StoreMissingError(PipelineError, FileNotFoundError):
    """No embeddings store where a reader looked (still a FileNotFoundError for existing callers)."""


class StoreDamagedError(PipelineError):
    """A store's bytes differ from what was written: a missing or altered shard, a bad digest, a damaged
    zarr.json. Readers stop instead of computing on zeros or garbage."""


class ProbeError(PipelineError):
    """The probe cannot score a candidate honestly (e.g. NaN from empty folds): nothing is chosen on it."""


class HeadError(PipelineError):
    """A trained head cannot be used: its files are damaged, or the store it was trained on has been
    rebuilt with other settings since (the head is stale: retrain it)."""


class OutputError(PipelineError):
    """A result cannot be written where asked: a folder without write permission, a file in the way."""


class Terminated(BaseException):
    """SIGTERM or SIGINT arrived: the run stops where it is, and exits 128 + the signal's number.

    A BaseException, so no `except Exception` on the way out treats it as a failure to work around;
    Lightning turns SIGTERM into an exit with status 0 of its own, which `exit_status_on_signals` overrides.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def exit_status_on_signals() -> Iterator[None]:
    """Run a stage or command so that SIGTERM (what SLURM and Kubernetes send on preemption) and SIGINT end
    it with status 143 / 130, whatever the code inside does with the exception or with SystemExit: a killed
    stage never reports success to DVC, make, a scheduler or a shell `&&`."""
    if threading.current_thread() is not threading.main_thread():     # handlers can only be set there
        yield
        return
    received: list[int] = []

    def stop(signum: int, _frame) -> None:
        if not received:
            received.append(signum)
            raise Terminated(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except BaseException:
        if not received:
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            print(f"stopped by {signal.Signals(received[0]).name}: nothing was recorded as done", file=sys.stderr)
            sys.exit(128 + received[0])
