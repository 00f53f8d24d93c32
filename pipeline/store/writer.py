"""The store writer: creates a store for one fingerprint (or resumes the same build), writes each
block's vectors, digests and metadata, and marks the block done last. Each block lives in its own
shard files, and Zarr's local store writes every file atomically (temporary file + rename): a killed
run leaves only whole files.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from pipeline.core import location
from pipeline.core.errors import StoreMismatchError
from pipeline.core.fingerprint import differences
from pipeline.store.format import (DIGEST, ENTROPY, ENTROPY_DIGEST, FORMAT, META_ARRAYS, POSITIONS_KEY, SAMPLED,
                                   Float16Overflow, block_digest, compressors_for, creation_interrupted, is_store,
                                   meta_digest, store_digest, to_stored, with_legacy_defaults)

@dataclass(frozen=True)
class SplitRows:
    """Per-row metadata of one split, known before the model runs."""
    labels: np.ndarray
    text_id: np.ndarray
    source_index: np.ndarray
    token_count: np.ndarray
    truncated: np.ndarray
    attention_sampled: np.ndarray | None = None   # stores with attention entropy only

    def __len__(self) -> int:
        return len(self.labels)


class StoreWriter:
    """Creates or reopens a store whose fingerprint matches, and writes whole row blocks."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], info: dict[str, Any], *,
                 num_layers: int, dim: int, poolings: Sequence[str], block_rows: int, dtype: str,
                 compressor: dict[str, Any], rebuild: bool = False, attention_entropy: dict[str, Any] | None = None):
        """attention_entropy: how the entropy sample is drawn (root attribute), or None: no entropy array."""
        self.path = location.as_location(path)   # a folder, or an fsspec URL such as s3://bucket/prefix
        self.poolings = list(poolings)
        self.block_rows = block_rows
        self.num_layers, self.dim = num_layers, dim
        self.dtype = dtype
        self.compressors = compressors_for(compressor)
        if location.exists(self.path) and (rebuild or not is_store(self.path)):
            if rebuild or not (location.is_empty(self.path) or creation_interrupted(self.path)):
                if not rebuild:
                    raise StoreMismatchError(f"{self.path} exists but is not an embeddings store; "
                                             f"move it away or rerun with --rebuild to replace it")
                # the root zarr.json goes first: from then on a reader of the old build fails its build
                # check (EmbeddingStore.same_build) before it could return a value read from a deleted chunk
                location.remove(self.path, first="zarr.json")
        if is_store(self.path):
            self.root = zarr.open_group(location.zarr_store(self.path), mode="r+")
            diff = differences(with_legacy_defaults(self.root.attrs.get("fingerprint", {})), fingerprint)
            if diff:
                why = ("\nIts vectors were computed with position ids numbered from 0, but this model numbers "
                       "them from padding_idx + 1, so every token got another position's embedding (issue 21): "
                       "they are not what the model computes." if any(f"extract.{POSITIONS_KEY}:" in line
                                                                     for line in diff) else "")
                raise StoreMismatchError(
                    f"{self.path} was written with other settings:\n  - " + "\n  - ".join(diff) + why
                    + "\nRerun with --rebuild to delete it and extract again, or restore the old params.")
        else:
            self.root = zarr.open_group(location.zarr_store(self.path), mode="w")
            # one write of zarr.json: attrs.update() would write it once per key (format first), and a
            # kill in between would leave a store that claims our format but lacks its fingerprint
            self.root.update_attributes({
                "format": FORMAT, "generation": uuid.uuid4().hex, "fingerprint": fingerprint, "info": info,
                "num_layers": num_layers, "dim": dim, "poolings": self.poolings, "block_rows": block_rows,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "dtype_fallback": {}, "dropped": {}, "runs": [], "splits": {}, "digest": DIGEST,
                **({ENTROPY: {**attention_entropy, "digest": DIGEST}} if attention_entropy else {}),
            })
        self.digest = store_digest(self.root.attrs.asdict())
        self.entropy = self.root.attrs.get(ENTROPY)   # the fingerprint matched, so it agrees with the params

    # -- splits -------------------------------------------------------------------------------
    def num_blocks(self, rows: int) -> int:
        return -(-rows // self.block_rows)

    def _pooling_dtype(self, split: str, pooling: str) -> str:
        return "float32" if f"{split}/{pooling}" in self.root.attrs.get("dtype_fallback", {}) else self.dtype

    def _create_vectors(self, group: zarr.Group, split: str, pooling: str, rows: int) -> None:
        group.create_array(
            pooling, shape=(rows, self.num_layers, self.dim), dtype=self._pooling_dtype(split, pooling),
            shards=(self.block_rows, self.num_layers, self.dim), chunks=(self.block_rows, 1, self.dim),
            compressors=self.compressors, fill_value=0, overwrite=True)

    def init_split(self, split: str, rows: SplitRows, dropped: list[dict[str, Any]]) -> None:
        """Create a split's arrays and write its row metadata, unless a previous run already did."""
        splits = dict(self.root.attrs.get("splits", {}))
        if split in splits:
            group = self.root[split]
            if splits[split] != len(rows) or not np.array_equal(group["source_index"][:], rows.source_index):
                raise StoreMismatchError(f"{self.path}/{split} holds other rows than the current corpus; "
                                         f"rerun with --rebuild")
            return
        n, blocks = len(rows), self.num_blocks(len(rows))
        group = self.root.require_group(split)
        meta_chunks = (max(n, 1),)
        for name in ("labels", "source_index", "token_count", "truncated"):
            values = getattr(rows, name)
            array = group.create_array(name, shape=(n,), dtype=values.dtype, chunks=meta_chunks, overwrite=True)
            if n:
                array[:] = values
        ids = group.create_array("text_id", shape=(n,), dtype=str, chunks=meta_chunks, overwrite=True)
        if n:
            ids[:] = rows.text_id.astype(str)
        meta = list(META_ARRAYS)
        if self.entropy:
            if rows.attention_sampled is None:
                raise ValueError(f"{split}: a store with attention entropy needs the rows' entropy sample")
            sampled = group.create_array(SAMPLED, shape=(n,), dtype=bool, chunks=meta_chunks, overwrite=True)
            if n:
                sampled[:] = rows.attention_sampled
            meta.append(SAMPLED)
            group.create_array(ENTROPY, shape=(n, self.num_layers), dtype="float32", fill_value=np.nan,
                               chunks=(self.block_rows, self.num_layers), compressors=self.compressors, overwrite=True)
            group.create_array(ENTROPY_DIGEST, shape=(blocks,), dtype="uint64", chunks=(1,), fill_value=0,
                               overwrite=True)
        for pooling in self.poolings:
            self._create_vectors(group, split, pooling, n)
        group.create_array("_digest", shape=(blocks, len(self.poolings)), dtype="uint64",
                           chunks=(1, len(self.poolings)), fill_value=0, overwrite=True)
        group.create_array("_done", shape=(blocks,), dtype="uint8", chunks=(1,), fill_value=0, overwrite=True)
        dropped_all = dict(self.root.attrs.get("dropped", {}))
        dropped_all[split] = dropped
        splits[split] = n
        digests = dict(self.root.attrs.get("meta_digest", {}))   # checked by `python -m pipeline verify`
        digests[split] = {name: meta_digest(getattr(rows, name)) for name in meta}
        self.root.update_attributes({"splits": splits, "dropped": dropped_all,   # one write; last: marks
                                     "meta_digest": digests})                    # the split created

    def done_blocks(self, split: str) -> np.ndarray:
        return self.root[split]["_done"][:].astype(bool)

    def block_range(self, split: str, block: int) -> tuple[int, int]:
        rows = self.root.attrs["splits"][split]
        return block * self.block_rows, min((block + 1) * self.block_rows, rows)

    # -- blocks -------------------------------------------------------------------------------
    def write_block(self, split: str, block: int, vectors: dict[str, np.ndarray],
                    entropy: np.ndarray | None = None) -> None:
        """Write one row block of every pooling (and its attention entropy [rows, L+1], NaN outside the
        sample, where the store has it), then its digests, then mark it done."""
        group = self.root[split]
        start, stop = self.block_range(split, block)
        stored = {}
        for pooling in self.poolings:
            values = vectors[pooling]
            if values.shape != (stop - start, self.num_layers, self.dim):
                raise ValueError(f"block {block} of {split}/{pooling} has shape {values.shape}, "
                                 f"expected {(stop - start, self.num_layers, self.dim)}")
            stored[pooling] = to_stored(values, group[pooling].dtype, split, pooling, block)
        if self.entropy:
            if entropy is None or entropy.shape != (stop - start, self.num_layers):
                raise ValueError(f"block {block} of {split}: attention entropy of shape "
                                 f"{None if entropy is None else entropy.shape}, expected {(stop - start, self.num_layers)}")
            entropy = np.ascontiguousarray(entropy, dtype=np.float32)
            group[ENTROPY][start:stop] = entropy
            group[ENTROPY_DIGEST][block] = np.uint64(block_digest(entropy, self.entropy["digest"]))
        for pooling in self.poolings:
            group[pooling][start:stop] = stored[pooling]
        group["_digest"][block] = np.array([block_digest(stored[p], self.digest) for p in self.poolings],
                                           dtype=np.uint64)
        group["_done"][block] = 1

    def promote_to_float32(self, overflow: Float16Overflow) -> None:
        """Re-create one array as float32 and clear the split's done marks so it is extracted again.

        Done marks go first: a crash half way leaves blocks to redo, never an array that lies.
        """
        group = self.root[overflow.split]
        blocks = group["_done"].shape[0]
        group.create_array("_done", shape=(blocks,), dtype="uint8", chunks=(1,), fill_value=0, overwrite=True)
        fallback = dict(self.root.attrs.get("dtype_fallback", {}))
        fallback[f"{overflow.split}/{overflow.pooling}"] = str(overflow)
        self.root.attrs["dtype_fallback"] = fallback
        self._create_vectors(group, overflow.split, overflow.pooling, self.root.attrs["splits"][overflow.split])

    def record_run(self, run: dict[str, Any]) -> None:
        self.root.attrs["runs"] = list(self.root.attrs.get("runs", [])) + [run]
