"""Check a store end to end, and mark bad blocks so the next extraction rebuilds exactly those.

`verify_store(path)` re-reads everything a reader could trust and returns a list of Problems, each
naming the split, the array and the row block:
  - layout: root attributes, each split's arrays, their shapes and dtypes;
  - completion: splits not created yet, blocks not marked done;
  - integrity: each done block of each pooling array (and of attention_entropy where the store has it) is
    read back and its digest (xxh3-64, or the store's recorded algorithm) compared
    with the one recorded at write time (`_digest`); row metadata against `meta_digest`; chunks that
    no longer decode (a flipped byte in a compressed chunk or a shard index) are named too;
  - values: no NaN or inf in a done block; labels inside `label_names`.
`repair(path, problems)` (`python -m pipeline verify --repair`) clears the done marks of the blocks
named, so `dvc repro` / `python -m stages.extract` recomputes just those; it takes the run lock.

Also here: `space_error` (a full disk or RLIMIT_FSIZE during extraction, as a clear message with
the space still needed).
"""

from __future__ import annotations

import errno
import hashlib
import resource
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from pipeline.core import location
from pipeline.core.errors import PipelineError, is_failure
from pipeline.store.format import (ENTROPY, ENTROPY_DIGEST, FORMAT, META_ARRAYS, SAMPLED, block_digest, creation_interrupted,
                                   meta_digest, store_digest)

SERIOUS = ("unreadable", "checksum", "nonfinite", "shape", "missing", "metadata", "dtype")
FAILURE = "failure"
"""A read that failed for a reason outside the store's bytes (errors.is_failure: memory, permissions, open
files, threads, the network): reported with retry advice, never repaired, and while any is reported
`--repair` changes nothing at all: the store could not be seen whole."""


class StoreSpaceError(PipelineError):
    """The filesystem holding the store is full, or a file hit the file-size limit."""


@dataclass(frozen=True)
class Problem:
    kind: str    # incomplete | leftover | failure | unreadable | checksum | nonfinite | shape | missing | metadata | dtype
    message: str
    split: str | None = None
    array: str | None = None
    block: int | None = None

    @property
    def serious(self) -> bool:
        """Corruption or a broken layout, as opposed to work not done yet."""
        return self.kind in SERIOUS

    def __str__(self) -> str:
        where = "/".join(p for p in (self.split, self.array) if p)
        if self.block is not None:
            where += f" block {self.block}"
        return f"{self.kind}: {where + ': ' if where else ''}{self.message}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Failed(Exception):
    """A read failed for a reason outside the store (errors.is_failure): verify reports it, repairs nothing."""


def _read(array: zarr.Array, selection) -> tuple[np.ndarray | None, str | None]:
    try:
        return array[selection], None
    except Exception as error:  # codecs raise many types for corrupt bytes (blosc, crc32c, zstd, index)
        if is_failure(error):
            raise _Failed(f"{array.path}: {type(error).__name__}: {error}") from error
        return None, f"cannot be decoded ({type(error).__name__}: {error})"


def _open(group: zarr.Group, name: str, split: str, out: list[Problem]) -> zarr.Array | None:
    try:
        return group[name]
    except KeyError:
        out.append(Problem("missing", "array is missing", split, name))
    except Exception as error:
        if is_failure(error):
            raise _Failed(f"{split}/{name}: {type(error).__name__}: {error}") from error
        out.append(Problem("unreadable", f"metadata cannot be read ({type(error).__name__}: {error})", split, name))
    return None


def _verify_split(root: zarr.Group, attrs: dict[str, Any], split: str, rows: int) -> list[Problem]:
    out: list[Problem] = []
    try:
        group = root[split]
    except Exception as error:
        if is_failure(error):
            raise _Failed(f"{split}: {type(error).__name__}: {error}") from error
        return [Problem("unreadable", f"split group cannot be opened ({error})", split)]
    block_rows, poolings = int(attrs["block_rows"]), list(attrs["poolings"])
    layers, dim = int(attrs["num_layers"]), int(attrs["dim"])
    blocks = -(-rows // block_rows)
    fallback = attrs.get("dtype_fallback", {})
    stored_dtype = attrs.get("fingerprint", {}).get("extract", {}).get("dtype", "float16")
    labels = len(attrs.get("fingerprint", {}).get("dataset", {}).get("label_names", [])) or None
    entropy = attrs.get(ENTROPY)                       # one more array, with digests of its own

    for name in META_ARRAYS + ((SAMPLED,) if entropy else ()):
        array = _open(group, name, split, out)
        if array is None:
            continue
        if array.shape != (rows,):
            out.append(Problem("shape", f"shape {array.shape}, expected {(rows,)}", split, name))
            continue
        values, error = _read(array, slice(None))
        if error:
            out.append(Problem("unreadable", error, split, name))
            continue
        recorded = attrs.get("meta_digest", {}).get(split, {}).get(name)
        if recorded is not None and meta_digest(values) != recorded:
            out.append(Problem("metadata", f"checksum {meta_digest(values)} differs from {recorded} recorded at "
                                            f"write time", split, name))
        elif name == "labels" and labels and rows and (values.min() < 0 or values.max() >= labels):
            out.append(Problem("metadata", f"labels outside 0..{labels - 1}", split, name))

    done = np.zeros(blocks, dtype=bool)
    done_array = _open(group, "_done", split, out)
    if done_array is not None:
        if done_array.shape != (blocks,):
            out.append(Problem("shape", f"shape {done_array.shape}, expected {(blocks,)}", split, "_done"))
        else:
            for block in range(blocks):
                mark, error = _read(done_array, block)
                if error:
                    out.append(Problem("unreadable", error, split, "_done", block))
                else:
                    done[block] = bool(mark)
    digests = np.zeros((blocks, len(poolings)), dtype=np.uint64)
    digest_array = _open(group, "_digest", split, out)
    if digest_array is not None:
        if digest_array.shape != (blocks, len(poolings)):
            out.append(Problem("shape", f"shape {digest_array.shape}, expected {(blocks, len(poolings))}",
                               split, "_digest"))
        else:
            for block in np.flatnonzero(done):
                row, error = _read(digest_array, int(block))
                if error:
                    out.append(Problem("unreadable", error, split, "_digest", int(block)))
                    done[block] = False          # cannot be trusted: reported, data not checked against it
                else:
                    digests[block] = row

    if entropy:
        out += _verify_entropy(group, split, rows, layers, block_rows, done, entropy.get("digest", store_digest(attrs)))
    for index, pooling in enumerate(poolings):
        array = _open(group, pooling, split, out)
        if array is None:
            continue
        if array.shape != (rows, layers, dim):
            out.append(Problem("shape", f"shape {array.shape}, expected {(rows, layers, dim)}", split, pooling))
            continue
        expected = "float32" if f"{split}/{pooling}" in fallback else stored_dtype
        if str(array.dtype) != expected:
            out.append(Problem("dtype", f"dtype {array.dtype}, expected {expected}", split, pooling))
        for block in np.flatnonzero(done):
            block = int(block)
            start, stop = block * block_rows, min((block + 1) * block_rows, rows)
            values, error = _read(array, slice(start, stop))
            if error:
                out.append(Problem("unreadable", f"rows {start}-{stop - 1} {error}", split, pooling, block))
                continue
            actual = block_digest(values, store_digest(attrs))
            if actual != int(digests[block, index]):
                out.append(Problem("checksum", f"rows {start}-{stop - 1}: digest {actual:016x} differs from "
                                               f"{int(digests[block, index]):016x} recorded at write time",
                                   split, pooling, block))
            elif not np.isfinite(values).all():
                out.append(Problem("nonfinite", f"rows {start}-{stop - 1} hold NaN or inf", split, pooling, block))
    pending = [b for b in range(blocks) if not done[b]]
    if done_array is not None and pending:
        shown = ", ".join(map(str, pending[:10])) + (" ..." if len(pending) > 10 else "")
        out.append(Problem("incomplete", f"{len(pending)}/{blocks} blocks not done ({shown})", split))
    return out


def _verify_entropy(group: zarr.Group, split: str, rows: int, layers: int, block_rows: int, done: np.ndarray,
                    algorithm: str) -> list[Problem]:
    """attention_entropy's done blocks against _entropy_digest (NaN is its value outside the sample)."""
    out: list[Problem] = []
    array, recorded = _open(group, ENTROPY, split, out), _open(group, ENTROPY_DIGEST, split, out)
    if array is None or recorded is None:
        return out
    if array.shape != (rows, layers) or str(array.dtype) != "float32":
        return [Problem("shape", f"shape {array.shape} {array.dtype}, expected {(rows, layers)} float32", split, ENTROPY)]
    for block in np.flatnonzero(done):
        block = int(block)
        start, stop = block * block_rows, min((block + 1) * block_rows, rows)
        values, error = _read(array, slice(start, stop))
        expected, digest_error = _read(recorded, block)
        if error or digest_error:
            out.append(Problem("unreadable", f"rows {start}-{stop - 1} {error or digest_error}", split, ENTROPY, block))
        elif block_digest(values, algorithm) != int(expected):
            out.append(Problem("checksum", f"rows {start}-{stop - 1}: digest {block_digest(values, algorithm):016x} "
                                           f"differs from {int(expected):016x} recorded at write time", split, ENTROPY, block))
    return out


def verify_store(path: str | Path) -> list[Problem]:
    """Every problem of one store (empty list: complete and intact). `path` may be an fsspec URL. A read
    that fails for a reason outside the store ends the check with one `failure` problem."""
    path = location.as_location(path)   # a folder, or s3://... (pipeline/core/location.py)
    try:
        return _verify(path)
    except _Failed as failed:
        return [_failure(str(failed))]
    except Exception as error:
        if is_failure(error):
            return [_failure(f"{type(error).__name__}: {error}")]
        raise


def _failure(what: str) -> Problem:
    return Problem(FAILURE, f"{what}: a failure of the machine or the network (memory, permissions, open files, "
                            f"threads, connection), not damage; nothing was judged, marked or deleted. Fix the "
                            f"cause and run verify again")


def _verify(path: location.Location) -> list[Problem]:
    if not location.exists(path):
        return [Problem("missing", f"no store at {path}: run the extraction first")]
    try:
        root = zarr.open_group(location.zarr_store(path, read_only=True), mode="r")
        attrs = root.attrs.asdict()
    except Exception as error:
        if is_failure(error):
            raise _Failed(f"zarr.json: {type(error).__name__}: {error}") from error
        return [Problem("unreadable", f"{path} cannot be opened as a Zarr group ({type(error).__name__}: {error}); "
                                      f"rerun the extraction with --rebuild")]
    if attrs.get("format") != FORMAT:
        if creation_interrupted(path):
            return [Problem("incomplete", "store creation was interrupted; the next extraction creates it again")]
        return [Problem("missing", f"{path} is not an embeddings store (no format {FORMAT!r} in its attributes); "
                                   f"an extraction killed while creating it just starts again")]
    required = ("fingerprint", "num_layers", "dim", "poolings", "block_rows", "splits")
    if missing := [key for key in required if key not in attrs]:
        return [Problem("metadata", f"root attributes lack {missing}; rerun the extraction with --rebuild")]
    out: list[Problem] = []
    expected = list(attrs["fingerprint"].get("dataset", {}).get("sha256", {}))
    for split in expected:
        if split not in attrs["splits"]:
            out.append(Problem("incomplete", "split not created yet", split))
    for split, rows in attrs["splits"].items():
        out.extend(_verify_split(root, attrs, split, int(rows)))
    leftovers = [] if location.is_url(path) else sorted(p for p in path.rglob("*.partial"))   # object stores: none
    if leftovers:
        out.append(Problem("leftover", f"{len(leftovers)} temporary file(s) of killed writes, e.g. "
                                       f"{leftovers[0].relative_to(path)} (harmless; --repair deletes them)"))
    return out


def repair(path: str | Path, problems: Iterable[Problem]) -> dict[str, Any]:
    """Clear the done marks (and digests) of every block named in `problems`; a split whose row
    metadata or layout is broken is dropped from `splits`, so the next run recreates it whole."""
    from pipeline.core.lock import run_lock
    path = location.as_location(path)   # a folder, or s3://... as verify takes it
    problems = list(problems)
    if failed := [p for p in problems if p.kind == FAILURE]:
        raise PipelineError(f"{path}: not repaired: verify could not read it all ({failed[0].message})")
    problems = [p for p in problems if p.serious]
    if any(p.split is None for p in problems):
        raise PipelineError(f"{path}: the store's root is damaged; rerun the extraction with --rebuild")
    whole = {p.split for p in problems if p.block is None}
    blocks = {(p.split, p.block) for p in problems if p.block is not None and p.split not in whole}
    with run_lock(path):
        root = zarr.open_group(location.zarr_store(path), mode="r+")
        for split, block in sorted(blocks):
            group = root[split]
            group["_done"][block] = 0          # first: a crash half way leaves the block to redo
            group["_digest"][block] = np.zeros(group["_digest"].shape[1], dtype=np.uint64)
        if whole:
            splits = {s: n for s, n in root.attrs["splits"].items() if s not in whole}
            root.attrs["splits"] = splits
        removed = remove_leftovers(path)
        cache = ({"removed": [], "not_found": 0} if location.is_url(path)     # no DVC cache links to an object store
                 else remove_cache_twins(path, damaged_files(path, problems)))
    return {"blocks": sorted(blocks), "splits": sorted(whole), "temporary_files_removed": removed,
            "cache_objects_removed": cache["removed"], "links_not_found": cache["not_found"]}


def damaged_files(path: Path, problems: Iterable[Problem]) -> list[Path]:
    """The chunk/shard files of the damaged arrays: of the named block, or all of an array's."""
    files: list[Path] = []
    for problem in problems:
        if problem.split and problem.array:
            folder = path / problem.split / problem.array / "c"
            if problem.block is not None:
                folder = folder / str(problem.block)
            candidates = folder.rglob("*") if folder.is_dir() else [folder] if folder.exists() else []
            files += [f for f in candidates if f.is_symlink() or f.is_file()]
    return files


def dvc_cache_dir(path: Path) -> Path | None:
    """The DVC cache of the repository holding `path` (`.dvc/cache`, or cache.dir in .dvc/config)."""
    import configparser
    for folder in Path(path).resolve().parents:
        if (folder / ".dvc").is_dir():
            config = configparser.ConfigParser()
            config.read([folder / ".dvc" / "config", folder / ".dvc" / "config.local"])
            configured = config.get("cache", "dir", fallback=None)
            return (folder / ".dvc" / configured).resolve() if configured else folder / ".dvc" / "cache"
    return None


def remove_cache_twins(path: Path, files: list[Path]) -> dict[str, Any]:
    """A DVC-tracked store's files can be hard links or symlinks into DVC's cache (cache.type hardlink or
    symlink): damage to such a file is damage to the cache object, and once DVC has committed the damaged
    file (by copy) that object is no longer linked to it. DVC trusts its read-only objects, so after the
    re-extraction writes the original bytes it would link the damaged object back. Delete the damaged
    files, every cache object that is the same file, and every object of the same size whose content no
    longer matches its md5 name: the re-extracted bytes then go into the cache afresh."""
    removed: list[str] = []
    inodes: dict[tuple[int, int], int] = {}            # (device, inode) -> other links still to find
    sizes = {f.stat().st_size for f in files if f.exists()}
    for file in files:
        if file.is_symlink():
            target = file.resolve()
            if target.is_file():
                target.unlink()
                removed.append(str(target))
            file.unlink()
        elif file.stat().st_nlink > 1:
            stat = file.stat()
            inodes[(stat.st_dev, stat.st_ino)] = stat.st_nlink - 1
            file.unlink()
    cache = dvc_cache_dir(path) if files else None
    if cache is not None and cache.is_dir():
        for item in cache.rglob("*"):
            stat = item.lstat()
            if not item.is_file() or item.is_symlink():
                continue
            twin = (stat.st_dev, stat.st_ino) in inodes
            if twin or (stat.st_size in sizes and _misnamed(item)):
                item.unlink()
                removed.append(str(item))
                if twin:
                    inodes[(stat.st_dev, stat.st_ino)] -= 1
    return {"removed": removed, "not_found": sum(inodes.values())}


def _misnamed(item: Path) -> bool:
    """A DVC cache object (files/md5/ab/cdef...) whose bytes no longer hash to its name."""
    name = item.parent.name + item.name
    if len(name) != 32 or any(c not in "0123456789abcdef" for c in name):
        return False                                  # a .dir manifest or not an object
    digest = hashlib.md5()
    with open(item, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() != name


def remove_leftovers(path: str | Path) -> int:
    """Delete Zarr's `*.partial` temporary files that killed writes left in a local store; only while
    holding the run lock (a live writer's temporary files look the same)."""
    if location.is_url(path) or not Path(path).is_dir():
        return 0
    path = Path(path)
    removed = 0
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed


# -- disk full ----------------------------------------------------------------------------------
def _mib(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
    return f"{size / 2**10:,.1f} KiB"


def _remaining(path: Path, settings) -> tuple[int, int, float]:
    """(blocks done, blocks left, bytes per block) of a store, estimated from what is on disk."""
    try:
        root = zarr.open_group(str(path), mode="r")
        attrs = root.attrs.asdict()
        per_block_raw = (attrs["block_rows"] * attrs["num_layers"] * attrs["dim"] * len(attrs["poolings"])
                         * np.dtype(settings.dtype).itemsize)
        done_count = left = 0
        written = 0
        for split in attrs["splits"]:
            done = root[split]["_done"][:].astype(bool)
            done_count += int(done.sum())
            left += int((~done).sum())
            for block in np.flatnonzero(done)[:8]:
                written += sum(f.stat().st_size for p in attrs["poolings"]
                               for f in (path / split / p / "c" / str(block)).rglob("*") if f.is_file())
        sampled = min(done_count, 8 * len(attrs["splits"]))
        per_block = written / sampled if sampled and written else per_block_raw
        return done_count, left, per_block
    except Exception:
        return 0, 0, 0.0


def space_error(error: OSError, path: str | Path, settings) -> StoreSpaceError | None:
    """A StoreSpaceError for a full disk (ENOSPC/EDQUOT) or a file-size limit (EFBIG); None otherwise."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return None
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    done, left, per_block = _remaining(path, settings)
    need = (f"the unfinished part needs about {_mib(left * per_block)} more ({left} blocks of ~{_mib(per_block)})"
            if left else "the store needs room for its metadata and blocks")
    kept = f"{done} finished blocks are kept and only the rest is extracted" if done else "it starts where it stopped"
    if error.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        message = (f"writing {path} hit the file-size limit (ulimit -f / RLIMIT_FSIZE = {limit} bytes); one block's "
                   f"shard file is about {_mib(per_block / max(1, len(settings.poolings)))}; {need}. Raise the limit "
                   f"(ulimit -f unlimited) or lower extract.block_rows, then rerun: {kept}")
    else:
        message = (f"no space left on the filesystem holding {path} ({_mib(free)} free): {need}. Free space there or "
                   f"set paths.store to a bigger disk, then rerun: {kept}")
    result = StoreSpaceError(message)
    result.__cause__ = error
    return result
