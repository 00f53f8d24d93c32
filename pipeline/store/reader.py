"""The store reader: a read-only view of a finished store whose every read is verified against the
digests recorded at write time, and `open_store`, which every Stage 2 reader goes through.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from pipeline.core import location
from pipeline.core.errors import (StoreAccessError, StoreChangedError, StoreDamagedError, StoreIncompleteError,
                                  StoreMismatchError, StoreMissingError, failure_message, is_failure)
from pipeline.store.format import (ENTROPY, ENTROPY_DIGEST, FORMAT, META_ARRAYS, SAMPLED, SPLITS, block_digest, build_of,
                                   interleaved_digest, meta_digest, read_root_attributes, store_digest)


def repair_hint(path) -> str:
    """What to run when a block is damaged: verify names every damaged block and marks it for re-extraction."""
    return (f"run `python -m pipeline verify --repair {location.display(path)}`, then rerun the extraction "
            f"(`dvc repro`, or python -m stages.extract) to rebuild exactly the damaged blocks")


def open_root(path) -> tuple[zarr.Group, dict[str, Any]]:
    """The root group and its attributes, or a clear error: no store (StoreMissingError) or a damaged
    root zarr.json (StoreDamagedError), not a misleading 'run dvc repro'."""
    try:
        root = zarr.open_group(location.zarr_store(path, read_only=True), mode="r")
        attrs = root.attrs.asdict()
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise StoreMissingError(f"no embeddings store at {path}: run `dvc repro` (stage extract) first") from None
    except Exception as error:      # zarr.json that no longer parses: JSONDecodeError, UnicodeDecodeError, ...
        if is_failure(error):       # ... but not a permission, memory, thread or network failure
            raise StoreAccessError(failure_message(f"{path}/zarr.json", error)) from error
        raise StoreDamagedError(f"{path}: the store's root metadata (zarr.json) is damaged and cannot be read "
                                f"({type(error).__name__}: {error}); rebuild the store with "
                                f"`python -m stages.extract --model M --dataset D --rebuild`") from error
    if attrs.get("format") == FORMAT:
        return root, attrs
    if any(key in attrs for key in ("fingerprint", "poolings", "splits")):
        raise StoreDamagedError(f"{path}: the store's root metadata (zarr.json) is damaged: it holds store attributes "
                                f"but not format {FORMAT!r}; rebuild the store with "
                                f"`python -m stages.extract --model M --dataset D --rebuild`")
    raise StoreMissingError(f"no embeddings store at {path} (its zarr.json has no store attributes: creation was "
                            f"interrupted, or it is something else): run `dvc repro` (stage extract) first")


_VERIFIED: set[tuple] = set()
"""Shard files whose block digest matched in this process, by path and identity (see
EmbeddingStore._identity): reading the block again costs one stat, and a rewritten file is checked again."""
HELD_BYTES = 512 * 2**20
"""Blocks decoded to check their digests are kept (one pooling at a time, up to this many bytes) and
later one-layer reads of those blocks are sliced from them: the score stage, which reads every layer,
then decodes each block once, not twice."""


class EmbeddingStore:
    """Read-only view of a finished store: layers as float32 arrays, labels and metadata.

    Every read is verified: the first read of a block of a pooling checks the block's done mark and its
    digest recorded at write time (one full decode of that block), then caches the result by the shard
    file's identity; a missing shard or a mismatch raises StoreDamagedError naming `verify --repair`.
    The decoded blocks of the pooling read last are held (HELD_BYTES) and serve later one-layer reads.
    `verified=False` skips the digests (benchmarks only).

    One build per read: the reader pins the build it opened (`build_of`) and checks, after every read and
    before returning its values, that the store is still that build; `--rebuild` retires the old build's
    zarr.json before it deletes anything, so a read that passes the check read only the build it opened.
    """

    def __init__(self, path: str | Path, allow_incomplete: bool = False, verified: bool = True):
        self.path = location.as_location(path)   # a folder, or an fsspec URL such as s3://bucket/prefix
        self.root, self.attrs = open_root(self.path)
        self.build = build_of(self.attrs)
        self.allow_incomplete = allow_incomplete
        self.verified = verified
        self._fs = None      # a remote store's fsspec filesystem, for shard identities
        self._held: dict[tuple[str, int], tuple[tuple, list[np.ndarray]]] = {}   # (split, block) -> (identity, layers)
        self._held_pooling: str | None = None

    @property
    def num_layers(self) -> int:
        """Layers including the embedding output (index 0)."""
        return int(self.attrs["num_layers"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def poolings(self) -> list[str]:
        return list(self.attrs["poolings"])

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.attrs.get("splits", {})]

    @property
    def label_names(self) -> list[str]:
        return list(self.attrs["fingerprint"]["dataset"]["label_names"])

    def num_rows(self, split: str) -> int:
        return int(self.attrs["splits"][split])

    def completion(self, split: str) -> tuple[int, int]:
        """(blocks done, blocks in all) for a split."""
        done = self._node(split, "_done")[:]
        return int(done.sum()), int(done.shape[0])

    def is_complete(self, split: str) -> bool:
        done, total = self.completion(split)
        return done == total

    def same_build(self) -> None:
        """Raise StoreChangedError when the store is no longer the build this reader opened."""
        try:
            now = build_of(read_root_attributes(self.path))
        except StoreMissingError:
            now = None
        except (ValueError, UnicodeDecodeError) as error:     # a zarr.json being rewritten, or damaged
            now = (f"unreadable: {type(error).__name__}",)
        except Exception as error:
            if is_failure(error):
                raise StoreAccessError(failure_message(f"{self.path}/zarr.json", error)) from error
            raise
        if now != self.build:
            state = "is being rebuilt or was removed" if now is None else "was rebuilt"
            raise StoreChangedError(f"{self.path} {state} while this process read it (it opened generation "
                                    f"{self.build[0]}): its results would mix two builds; rerun this step "
                                    f"once the extraction has finished")

    def _damaged(self, split: str, name: str, block: int | None, what: str) -> StoreDamagedError:
        where = f"{split}/{name}" + ("" if block is None else f" block {block}")
        return StoreDamagedError(f"{self.path}: {where} is damaged: {what}; {repair_hint(self.path)}")

    def _unreadable(self, error: Exception, split: str, name: str, block: int | None, what: str) -> Exception:
        """A read that raised: a failure of the machine or network (StoreAccessError), else damage."""
        if is_failure(error):
            where = f"{split}/{name}" + ("" if block is None else f" block {block}")
            return StoreAccessError(failure_message(f"{self.path}: {where}", error))
        return self._damaged(split, name, block, what)

    def _node(self, split: str, name: str | None = None):
        """A split group or one of its arrays; a missing or unreadable one is damage, not an empty read."""
        try:
            group = self.root[split]
            return group if name is None else group[name]
        except Exception as error:
            what = "missing" if isinstance(error, KeyError) else f"unreadable ({type(error).__name__}: {error})"
            raise self._unreadable(error, split, name or "(group)", None, f"its metadata is {what}") from error

    def _group(self, split: str) -> zarr.Group:
        if split not in self.attrs.get("splits", {}):
            raise KeyError(f"{self.path} has no split {split!r}; it has {self.splits}")
        if not self.allow_incomplete and not self.is_complete(split):
            done, total = self.completion(split)
            marks = self._node(split, "_done")[:].astype(bool)
            written = [int(b) for b in np.flatnonzero(~marks & self._node(split, "_digest")[:].any(axis=1))]
            lost = (f"; block(s) {written[:10]} hold vectors and digests but no done mark (a kill between those "
                    f"writes, or a deleted _done file): the extraction redoes them" if written else "")
            raise StoreIncompleteError(f"{self.path}/{split} is incomplete ({done}/{total} blocks){lost}: "
                                       f"finish the extraction (rerun `dvc repro`) before reading it")
        return self._node(split)

    def _pooling(self, split: str, pooling: str) -> zarr.Array:
        if pooling not in self.poolings:
            raise KeyError(f"{self.path} has no pooling {pooling!r}; it has {self.poolings}")
        self._group(split)
        return self._node(split, pooling)

    # -- verified reads -------------------------------------------------------------------------
    def _identity(self, array: zarr.Array, block: int) -> tuple | None:
        """(shard path, what changes when it is rewritten), or None when the shard file is missing.

        Local files: (inode, size, mtime_ns, ctime_ns); ctime also catches a copy that restores mtime.
        Remote objects: (size, ETag), else (size, last modified); neither known: not cached (checked on
        every read).
        """
        key = f"{array.path}/{array.metadata.encode_chunk_key((block,) + (0,) * (array.ndim - 1))}"
        if not location.is_url(self.path):
            file = os.path.join(self.path, key)
            try:
                stat = os.stat(file)
            except FileNotFoundError:
                return None
            return file, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns
        if self._fs is None:
            self._fs = location.filesystem(str(self.path))
        fs, inner = self._fs
        try:
            info = fs.info(f"{inner}/{key}")
        except FileNotFoundError:
            return None
        tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
        return (f"{self.path}/{key}", info.get("size"), str(tag)) if tag is not None else (f"{self.path}/{key}", None)

    def _verify_rows(self, split: str, pooling: str, array: zarr.Array, rows: slice,
                     hold: bool = True) -> list[list[np.ndarray]] | None:
        """Check each block that `rows` touches, the first time it is read (cached by shard identity).
        Returns the touched blocks (a [rows, D] array per layer) when every one is held, else None."""
        start, stop, _ = rows.indices(array.shape[0])
        if not self.verified or stop <= start:
            return None
        block_rows = int(self.attrs["block_rows"])
        touched = range(start // block_rows, (stop - 1) // block_rows + 1)
        done, held, unchecked = None, {}, {}
        for block in touched:
            identity = self._identity(array, block)
            kept = self._held.get((split, block)) if self._held_pooling == pooling else None
            if kept is not None and kept[0] == identity:
                held[block] = kept[1]
                continue
            if identity in _VERIFIED:
                continue
            if done is None:
                done = self._node(split, "_done")[:]
            if not done[block]:          # only with allow_incomplete: nothing recorded to check against
                continue
            if identity is None:
                raise self._damaged(split, pooling, block, "its shard file is missing (it would read back as zeros)")
            unchecked[block] = identity
        room = HELD_BYTES - (self._held_bytes() if pooling == self._held_pooling else 0)
        for block, values in self._verify_blocks(split, pooling, array, list(unchecked), max(room, 0)):
            if unchecked[block][-1] is not None:
                _VERIFIED.add(unchecked[block])
            if hold and self._hold(split, pooling, block, unchecked[block], values):
                held[block] = values
        return [held[b] for b in touched] if len(held) == len(touched) else None

    def _verify_blocks(self, split: str, pooling: str, array: zarr.Array, blocks: list[int], room: int):
        """Yield (block, its layers: a [rows, D] array each) after checking each block's digest against the
        one recorded at write time. Blocks are decoded layer by layer over runs of consecutive blocks, as
        one-layer reads decode them (zarr's whole-shard read costs over twice the CPU); the first run fills
        `room` (bytes still free for held blocks), the others hold a block at a time."""
        block_rows, rows = int(self.attrs["block_rows"]), array.shape[0]
        per_block = block_rows * array.shape[1] * array.shape[2] * array.dtype.itemsize
        runs: list[list[int]] = []
        for block in blocks:
            if runs and block == runs[-1][-1] + 1 and len(runs) == 1 and (len(runs[-1]) + 1) * per_block <= room:
                runs[-1].append(block)
            else:
                runs.append([block])
        for run in runs:
            first, last = run[0] * block_rows, min((run[-1] + 1) * block_rows, rows)
            try:
                layers = [array[first:last, layer, :] for layer in range(array.shape[1])]
            except Exception as error:
                if is_failure(error):
                    raise self._unreadable(error, split, pooling, run[0], "") from error
                for block in run:                 # name the block that does not decode
                    self._verify_block(split, pooling, array, block)
                raise self._damaged(split, pooling, run[0], f"blocks {run[0]}-{run[-1]} cannot be decoded "
                                                            f"({type(error).__name__}: {error})") from error
            recorded = self._recorded_digests(split, pooling, slice(run[0], run[-1] + 1))
            for block, expected in zip(run, recorded):
                part = slice(block * block_rows - first, min((block + 1) * block_rows, rows) - first)
                values = [layer[part] for layer in layers]
                self._check_digest(split, pooling, block, interleaved_digest(values, store_digest(self.attrs)),
                                   int(expected))
                yield block, values

    def _hold(self, split: str, pooling: str, block: int, identity: tuple, values: list[np.ndarray]) -> bool:
        """Keep a verified block for later reads: one pooling at a time, the first HELD_BYTES of it (score
        reads layer after layer over all blocks, so evicting would only thrash)."""
        if pooling != self._held_pooling:
            self.release()
            self._held_pooling = pooling
        if self._held_bytes() + sum(layer.nbytes for layer in values) > HELD_BYTES:
            return False
        self._held[(split, block)] = (identity, values)
        return True

    def _held_bytes(self) -> int:
        return sum(layer.nbytes for _, layers in self._held.values() for layer in layers)

    def release(self) -> None:
        """Drop the held decoded blocks (a reader done with this store's vectors frees their memory)."""
        self._held, self._held_pooling = {}, None

    def _verify_block(self, split: str, pooling: str, array: zarr.Array, block: int) -> None:
        """Decode one whole block (zarr's own read path), naming it when its shard does not decode."""
        block_rows = int(self.attrs["block_rows"])
        first, last = block * block_rows, min((block + 1) * block_rows, array.shape[0])
        try:
            values = array[first:last]
        except Exception as error:  # codecs raise many types for corrupt bytes (zstd, blosc, crc32c, index)
            raise self._unreadable(error, split, pooling, block, f"its shard cannot be decoded "
                                                                 f"({type(error).__name__}: {error})") from error
        expected = int(self._recorded_digests(split, pooling, slice(block, block + 1))[0])
        self._check_digest(split, pooling, block, block_digest(values, store_digest(self.attrs)), expected)

    def _recorded_digests(self, split: str, pooling: str, blocks: slice) -> np.ndarray:
        """The digests written with these blocks of one pooling (one read of `_digest`)."""
        try:
            return self._node(split, "_digest")[blocks, self.poolings.index(pooling)]
        except StoreDamagedError:
            raise
        except Exception as error:
            raise self._unreadable(error, split, "_digest", blocks.start,
                                   f"cannot be decoded ({type(error).__name__})") from error

    def _check_digest(self, split: str, pooling: str, block: int, actual: int, expected: int) -> None:
        """A block's digest as read against the one recorded when it was written."""
        if actual != expected:
            raise self._damaged(split, pooling, block, f"its digest {actual:016x} differs from {expected:016x} "
                                                       f"recorded at write time")

    def _verified_meta(self, split: str, name: str) -> np.ndarray:
        """A row-metadata array, checked against the checksum recorded when the split was created."""
        array = self._node(split, name)
        try:
            values = array[:]
        except Exception as error:
            raise self._unreadable(error, split, name, None, f"it cannot be decoded ({type(error).__name__})") from error
        recorded = self.attrs.get("meta_digest", {}).get(split, {}).get(name)
        if self.verified and recorded is not None and meta_digest(values) != recorded:
            raise self._damaged(split, name, None, f"its checksum {meta_digest(values)} differs from {recorded} "
                                                   f"recorded at write time")
        return values

    def check(self, poolings: Iterable[str], splits: Iterable[str] | None = None) -> None:
        """Verify every block of these poolings and every row-metadata array, for readers that rely on a
        store without reading its vectors (predict: the head was trained on them)."""
        for split in splits or self.splits:
            for pooling in poolings:
                self._verify_rows(split, pooling, self._pooling(split, pooling), slice(None), hold=False)
            for name in META_ARRAYS:
                self._verified_meta(split, name)
        self.same_build()

    # -- reads ----------------------------------------------------------------------------------
    def layer(self, split: str, pooling: str, layer: int, rows: slice = slice(None)) -> np.ndarray:
        """One layer as float32 [N, D]; negative indices count from the last layer."""
        index = range(self.num_layers)[layer]
        array = self._pooling(split, pooling)
        held = self._verify_rows(split, pooling, array, rows)
        if held is None:
            values = np.asarray(array[rows, index, :], dtype=np.float32)
        else:
            values = self._from_held(held, index, rows.indices(array.shape[0]))
        self.same_build()
        return values

    def _from_held(self, held: list[list[np.ndarray]], index: int, span: tuple[int, int, int]) -> np.ndarray:
        """One layer's rows sliced from held blocks, converted to float32 in one pass as zarr's read is."""
        start, stop, step = span
        base = start - start % int(self.attrs["block_rows"])
        if step != 1 or len(held) == 1:
            values = held[0][index] if len(held) == 1 else np.concatenate([block[index] for block in held])
            return np.asarray(values[start - base:stop - base:step], dtype=np.float32)
        out = np.empty((stop - start,) + held[0][index].shape[1:], dtype=np.float32)
        first = base
        for block in held:
            part = block[index][max(start - first, 0):stop - first]
            out[max(first - start, 0):max(first - start, 0) + len(part)] = part
            first += len(block[index])
        return out

    def layers(self, split: str, pooling: str, layers: Iterable[int] | None = None,
               rows: slice = slice(None)) -> np.ndarray:
        """Several layers as float32 [N, len(layers), D], reading only those layers' chunks."""
        array = self._pooling(split, pooling)
        self._verify_rows(split, pooling, array, rows, hold=False)
        wanted = list(range(self.num_layers)) if layers is None else [range(self.num_layers)[i] for i in layers]
        if wanted == list(range(self.num_layers)):
            values = np.asarray(array[rows], dtype=np.float32)
        else:
            values = np.stack([np.asarray(array[rows, i, :], dtype=np.float32) for i in wanted], axis=1)
        self.same_build()
        return values

    @property
    def has_attention_entropy(self) -> bool:
        return bool(self.attrs.get(ENTROPY))

    def attention_entropy(self, split: str) -> np.ndarray:
        """Attention entropy [N, L+1] float32 (nats): column i is block i's, column 0 (embedding output)
        NaN, rows outside the sample NaN (attention_sampled). Every done block is checked against its digest."""
        self._require_entropy()
        self._group(split)
        array = self._node(split, ENTROPY)
        try:
            values = array[:]
        except Exception as error:
            raise self._unreadable(error, split, ENTROPY, None,
                                   f"it cannot be decoded ({type(error).__name__}: {error})") from error
        if self.verified:
            block_rows = int(self.attrs["block_rows"])
            done = self._node(split, "_done")[:].astype(bool)
            recorded = self._node(split, ENTROPY_DIGEST)[:]
            for block in np.flatnonzero(done):
                part = values[block * block_rows:(block + 1) * block_rows]
                self._check_digest(split, ENTROPY, int(block), block_digest(part, self.attrs[ENTROPY]["digest"]),
                                   int(recorded[block]))
        self.same_build()
        return values

    def attention_sampled(self, split: str) -> np.ndarray:
        """[N] bool: the rows whose attention entropy was computed."""
        self._require_entropy()
        return self.meta(split, SAMPLED).astype(bool)

    def _require_entropy(self) -> None:
        if not self.has_attention_entropy:
            raise StoreMismatchError(f"{self.path} holds no attention entropy (extracted with "
                                     f"extract.attention_entropy_rows: 0, or before it existed); set it and rerun "
                                     f"the extraction with --rebuild")

    def labels(self, split: str) -> np.ndarray:
        return self.meta(split, "labels").astype(np.int64)

    def meta(self, split: str, name: str) -> np.ndarray:
        """Row metadata: text_id, source_index, token_count or truncated."""
        self._group(split)
        values = self._verified_meta(split, name)
        self.same_build()
        return values

    def stored_digests(self, split: str) -> np.ndarray:
        return self.root[split]["_digest"][:]


def open_store(embeddings_root: str | Path, model: str, dataset: str, allow_incomplete: bool = False
               ) -> EmbeddingStore:
    """Open the store of one model x dataset under the embeddings root (`Params.embeddings_root`: paths.embeddings,
    a folder or URL, else store/embeddings), the one place every reader finds a store."""
    from pipeline.config.params import check_name
    path = location.join(location.as_location(embeddings_root), check_name(dataset, "dataset"),
                         check_name(model, "model"))
    return EmbeddingStore(path, allow_incomplete=allow_incomplete)
