"""One writer per store: an exclusive run lock beside the store folder.

`run_lock(store_path)` guards one *run* (one launch of an extraction, or a `verify --repair`): it
takes `<store>.lock` (a sibling of the store, so `--rebuild`, which deletes the store folder, never
deletes the lock) with `fcntl.flock` and writes the holder's pid, host, command and start time into
it. The kernel drops a flock when its process dies, SIGKILL included, so a lock is never stale: a
lock file left behind by a killed run is simply taken by the next one. A second writer either fails
at once with a StoreLockedError naming the holder, or (`wait=True`) waits for it to finish.

Multi-process launches: rank 0 takes the lock for the whole run (`enabled=rank == 0`), the other
ranks write disjoint blocks under it. Stores behind fsspec URLs (s3://...) have no flock; for those
`run_lock` is a no-op that says so (a conditional put of a `.lock` key is the extension point).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import PipelineError
from pipeline.core.location import is_url


class StoreLockedError(PipelineError):
    """Another process is writing the same store."""


def lock_path(store_path: str | Path) -> Path:
    path = Path(store_path)
    return path.with_name(path.name + ".lock")


def read_holder(store_path: str | Path) -> dict:
    """Who holds (or last held) the lock: {pid, host, command, started}; {} when unknown."""
    try:
        return json.loads(lock_path(store_path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process (holder unknown)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
            f"({holder.get('command', '?')})")


def _try_lock(path: Path) -> int | None:
    """An fd holding the flock on `path`, or None when someone else holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        # the previous holder may have unlinked the file between our open and our flock: retry on the new one
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def run_lock(store_path: str | Path, *, wait: bool = False, timeout: float | None = None,
             enabled: bool = True, poll: float = 0.2) -> Iterator[dict]:
    """Hold the store's run lock for the `with` block; yields the holder record written into it."""
    if not enabled or is_url(store_path):
        if enabled:
            print(f"note: no run lock for {store_path} (not a local path); run one writer at a time",
                  file=sys.stderr)
        yield {}
        return
    path = lock_path(store_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    announced = False
    while (fd := _try_lock(path)) is None:
        holder = read_holder(store_path)
        if not wait:
            raise StoreLockedError(
                f"{store_path} is being written by {describe(holder)}. Wait for it to finish, rerun with "
                f"--wait to queue behind it, or stop it; the lock ({path}) frees itself when its holder exits")
        if timeout is not None and time.monotonic() - started > timeout:
            raise StoreLockedError(f"gave up after {timeout:.0f} s waiting for {describe(holder)} to release "
                                   f"{path}")
        if not announced:
            print(f"waiting for {describe(holder)} to finish writing {store_path} ...", file=sys.stderr)
            announced = True
        time.sleep(poll)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
        yield holder
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)          # unlink while still holding it: waiters re-check the inode (see _try_lock)
        os.close(fd)
