"""The project's errors: each says what is wrong and how to fix it, so stages can print them bare."""

from __future__ import annotations

import _thread
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


class StoreAccessError(PipelineError):
    """A store could not be read for a reason outside its bytes: memory, permissions, open-file or thread
    limits, the network. Not damage: nothing is marked or deleted, and the same read may work on a retry."""


FAILURE_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs", "adlfs")


def is_failure(error: BaseException) -> bool:
    """True for I/O, permission, memory, thread and connection errors (anywhere in the cause chain); False
    for what counts as damage: a missing object (FileNotFoundError, KeyError) or bytes that do not decode."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, FileNotFoundError):
            return False
        if isinstance(error, (MemoryError, OSError, ConnectionError, TimeoutError)):
            return True
        if isinstance(error, RuntimeError) and "thread" in str(error):
            return True
        if type(error).__module__.split(".")[0] in FAILURE_MODULES and "NoSuchKey" not in type(error).__name__:
            return True
        error = error.__cause__ or error.__context__
    return False


EXIT_FAILURE = 75
"""Exit status of a stage or command stopped by a failure (is_failure): sysexits' EX_TEMPFAIL, retry later."""


def failure_exit_message(error: BaseException) -> str:
    return (f"{type(error).__name__}: {error}: a failure of the machine or the network (memory, permissions, open "
            f"files, threads, connection); nothing was recorded as done. Fix the cause and rerun")


def failure_message(where, error: BaseException) -> str:
    return (f"{where} could not be read ({type(error).__name__}: {error}): a failure of the machine or the network "
            f"(memory, permissions, open files, threads, connection), not damage to the store; nothing was "
            f"marked or deleted. Fix the cause and retry")


class StoreChangedError(PipelineError):
    """The store was rebuilt (or its rebuild began) while a reader read it: what it read would mix two builds."""


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


SIGNAL_RESEND_SECONDS = 3.0


@contextlib.contextmanager
def exit_status_on_signals() -> Iterator[None]:
    """Run a stage or command so that SIGTERM (what SLURM and Kubernetes send on preemption) and SIGINT end
    it with status 143 / 130, whatever the code inside does with the exception or with SystemExit: a killed
    stage never reports success to DVC, make, a scheduler or a shell `&&`.

    Python prints and drops an exception raised inside a weakref callback or a `__del__` ("Exception ignored
    in ..."), and the garbage collector runs those at any bytecode: a signal that lands there would leave the
    run going as if never told. So the signal is delivered again every few seconds until a Terminated has
    reached this frame."""
    if threading.current_thread() is not threading.main_thread():     # handlers can only be set there
        yield
        return
    received: list[int] = []
    arrived = threading.Event()        # set when a Terminated (or what the code made of it) reaches this frame

    def resend() -> None:
        while not arrived.wait(SIGNAL_RESEND_SECONDS):
            _thread.interrupt_main(received[0])    # runs `stop` again in the main thread, as a real signal would

    resender = threading.Thread(target=resend, daemon=True, name="signal-resend")

    def stop(signum: int, _frame) -> None:
        if arrived.is_set():
            return                     # on the way out already: let the cleanup run
        if not received:
            received.append(signum)
            resender.start()
        raise Terminated(received[0])

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except BaseException:
        if not received:
            raise
    finally:
        arrived.set()
        if resender.ident is not None:          # started
            resender.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            print(f"stopped by {signal.Signals(received[0]).name}: nothing was recorded as done", file=sys.stderr)
            sys.exit(128 + received[0])
