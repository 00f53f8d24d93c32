"""Atomic file writes (temporary file + rename): a killed stage never leaves half a file that a
later stage or `dvc repro` would accept. And atomic folders (staged_folder): a stage writes all its
outputs into a temporary sibling folder that then takes the output folder's place in one step, so a
killed stage leaves the old set of files or the new set, never a mix of the two."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from pipeline.core.errors import OutputError


@contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A handle on a temporary file beside `path`, renamed over it only when the block succeeds:
    for streamed outputs too large to build in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(temporary, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=1, ensure_ascii=False) + "\n")


# -- folders written as one unit -------------------------------------------------------------------
#
# POSIX rename() cannot replace a non-empty folder, so the swap uses Linux's renameat2(RENAME_EXCHANGE),
# which exchanges two paths in one step: a reader sees the old folder or the new one, and a kill at any
# moment leaves one of them whole at the output path. The old set then sits under the temporary name
# and is deleted. Where exchange is missing (not Linux, or a filesystem without it) the fallback is two
# renames (output -> .old, new -> output): a reader can then briefly find no folder (never a mix), and
# a kill between the two renames leaves the old set under .old, which the next run moves back.
# Leftovers (`.<name>.staged-<pid>-*`, `.<name>.old-<pid>-*`) are dot-named siblings nobody reads;
# the next run of the same output removes those whose process is gone.

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the system cannot (then nothing changed)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(out: Path) -> list[Path]:
    """Temporary siblings of `out` left by killed runs (their process is gone)."""
    found = []
    for kind in ("staged", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name.removeprefix(f".{out.name}.{kind}-").split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                found.append(path)
    return found


def clean_leftovers(out: Path) -> None:
    """Delete what killed runs left beside `out`; an old set moved aside (fallback swap) goes back."""
    for path in leftovers(out):
        if ".old-" in path.name and not out.exists():
            os.rename(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link `source` (a file or a folder tree) at `target`: instant, and the same files."""
    if source.is_dir() and not source.is_symlink():
        target.mkdir()
        for item in source.iterdir():
            _link_tree(item, target / item.name)
    else:
        os.link(source, target, follow_symlinks=False)


def _sync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(new: Path, out: Path) -> None:
    """Put `new` at `out`; the previous `out`, if any, ends up at `new`'s path (exchange) or is deleted."""
    if not out.exists():
        os.rename(new, out)
    elif not exchange(new, out):
        old = out.with_name(f".{out.name}.old-{new.name.split('.staged-', 1)[1]}")
        os.rename(out, old)
        os.rename(new, out)
        shutil.rmtree(old)
    _sync_folder(out.parent)


@contextmanager
def staged_folder(out: str | Path, keep_others: bool = False) -> Iterator[Path]:
    """A fresh, empty sibling folder of `out` to write a stage's outputs into; when the block succeeds it
    takes `out`'s place in one step (see above), and if it fails `out` is untouched.

    keep_others: entries of `out` the block did not write are kept (hard-linked into the new folder just
    before the swap), for an output folder shared with other producers (reports/); a file another
    process replaces in `out` between that linking and the swap keeps its previous version."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file, not a folder: a stage writes a folder of outputs there and would "
                          f"replace it; choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}.staged-{os.getpid()}-", dir=out.parent))
    try:
        yield new
        if keep_others and out.is_dir():
            written = {item.name for item in new.iterdir()}
            for item in out.iterdir():
                if item.name not in written:
                    _link_tree(item, new / item.name)
        _swap_in(new, out)
    finally:
        shutil.rmtree(new, ignore_errors=True)     # the old set after a swap, the partial new one otherwise
