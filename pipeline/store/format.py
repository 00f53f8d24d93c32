"""What a store is on disk: its format name, compressors, block digests (xxh3, and the blake2b of
old stores), the fingerprint defaults of old stores, the stored dtype of a block, and the root attributes.

Layout of a split group:
  <pooling>      [N, L+1, D] float16|float32, one shard per row block, inner chunks (rows, 1, D):
                 reading one layer reads only that layer's bytes
  labels         [N] int32, indices into the root attribute `label_names`
  text_id        [N] str;  source_index [N] int64 (row in the source split)
  token_count    [N] int32 (before truncation);  truncated [N] bool
  attention_entropy  [N, L+1] float32 (stores with root attribute `attention_entropy` only): per text
                 and layer, the mean entropy (nats) of the attention distributions over its real tokens,
                 heads averaged; column 0 (embedding output: no attention) and rows outside the sample are NaN
  attention_sampled  [N] bool, row metadata: the seeded sample of rows per block whose entropy is computed
  _digest        [blocks, poolings] uint64, a checksum of each block of each pooling array (root
                 attribute `digest`: xxh3_64; stores without it used blake2b-64)
  _entropy_digest  [blocks] uint64, the same for attention_entropy (algorithm: attention_entropy's `digest`)
  _done          [blocks] uint8, set only after the block's data and digests are written

"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import xxhash
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

from pipeline.core import location
from pipeline.hidden_states.attention import TRANSFORMERS_DEFAULT
from pipeline.core.errors import StoreMissingError

FORMAT = "layerfuse.embeddings/1"
SPLITS = ("train", "validation", "test")
FLOAT16_MAX = float(np.finfo(np.float16).max)
FLOAT16_ROUNDS_TO_INF = 65520.0   # the smallest float32 that float16 rounds to inf (65504 + half an ulp)


def compressors_for(config: dict[str, Any]) -> list:
    codec = config.get("codec", "none")
    if codec == "none":
        return []
    if codec == "zstd":
        return [ZstdCodec(level=int(config.get("level", 1)))]
    return [BloscCodec(cname=config.get("cname", "lz4"), clevel=int(config.get("clevel", 1)),
                       shuffle=BloscShuffle[config.get("shuffle", "shuffle")])]


DIGEST = "xxh3_64"          # new stores; a store records its own in attrs["digest"]
LEGACY_DIGEST = "blake2b-64"  # stores written before attrs["digest"] existed


def block_digest(block: np.ndarray, algorithm: str = DIGEST) -> int:
    """64-bit checksum of a block's bytes as stored (xxh3: ~40x faster than blake2b, which cost the
    writer thread 0.3 s of CPU per SmolLM2 block; this guards against bit rot and torn writes, not tampering)."""
    data = memoryview(np.ascontiguousarray(block)).cast("B")
    if algorithm == DIGEST:
        return xxhash.xxh3_64_intdigest(data)
    if algorithm == LEGACY_DIGEST:
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    raise ValueError(f"unknown block digest {algorithm!r}")


LEGACY_EXTRACT = {"attention": TRANSFORMERS_DEFAULT, "token_budget": 1024, "attention_entropy_rows": 0}
"""What stores written before a key entered the fingerprint ran with: transformers' default attention,
and params.yaml's token_budget since the commit that made it 1024 (the value is not recorded anywhere
reliable: a store resumed with another budget was accepted and its `runs` name only the last one); no
attention entropy (such a store resumes only with extract.attention_entropy_rows: 0)."""
POSITIONS_KEY = "position_ids_from"
"""extract.<this key> in a fingerprint: the first position id of a model that does not number from 0
(RoBERTa, XLM-R, MPNet: padding_idx + 1). Stores written before it fed such models 0-based positions."""
ENTROPY = "attention_entropy"
SAMPLED = "attention_sampled"
ENTROPY_DIGEST = "_entropy_digest"


def entropy_sample(rows: int, block_rows: int, per_block: int, seed: int, split: str) -> np.ndarray:
    """Which rows get attention entropy: `per_block` rows of each block, drawn with a generator seeded by
    (seed, split, block), so a block's sample depends only on that block and a resumed store is identical."""
    sampled = np.zeros(rows, dtype=bool)
    for block, start in enumerate(range(0, rows, block_rows)):
        size = min(block_rows, rows - start)
        rng = np.random.default_rng([seed, SPLITS.index(split), block])
        sampled[start + rng.choice(size, size=min(per_block, size), replace=False)] = True
    return sampled


def interleaved_digest(layers: Sequence[np.ndarray], algorithm: str = DIGEST) -> int:
    """block_digest of np.stack(layers, axis=1) [rows, L, D] without building it: a few rows at a time
    go through one small buffer, so verifying a block read layer by layer costs no block-sized copy."""
    if algorithm == DIGEST:
        hasher = xxhash.xxh3_64()
    elif algorithm == LEGACY_DIGEST:
        hasher = hashlib.blake2b(digest_size=8)
    else:
        raise ValueError(f"unknown block digest {algorithm!r}")
    rows, row_bytes = len(layers[0]), len(layers) * layers[0][:1].nbytes
    slab = max(1, 2**21 // max(row_bytes, 1))                   # ~2 MB: stays in cache
    buffer = np.empty((min(slab, rows), len(layers)) + layers[0].shape[1:], dtype=layers[0].dtype)
    for first in range(0, rows, slab):
        part = buffer[:min(slab, rows - first)]
        for index, layer in enumerate(layers):
            part[:, index] = layer[first:first + len(part)]
        hasher.update(memoryview(part).cast("B"))
    return hasher.intdigest() if algorithm == DIGEST else int.from_bytes(hasher.digest(), "little")


def with_legacy_defaults(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A stored fingerprint with LEGACY_EXTRACT filled in for keys it lacks, so an old store resumes
    with `extract.attention: sdpa` and `token_budget: 1024` and is refused, naming the key, otherwise.
    Everything that reads a store's settings reads them through here."""
    extract = fingerprint.get("extract")
    if isinstance(extract, dict) and not LEGACY_EXTRACT.keys() <= extract.keys():
        return {**fingerprint, "extract": {**LEGACY_EXTRACT, **extract}}
    return fingerprint


def build_of(attrs: dict[str, Any]) -> tuple[str | None, str]:
    """What names one build of a store: the generation id written when it was created (stores from before
    generations: their creation time) and its settings. A rebuild changes it; resuming and repair do not."""
    return (attrs.get("generation") or attrs.get("created_at"),
            json.dumps(attrs.get("fingerprint"), sort_keys=True, default=str))


def read_root_attributes(path) -> dict[str, Any]:
    """The root zarr.json's attributes as they are now (zarr caches what it opened), or StoreMissingError."""
    try:
        if location.is_url(path):
            fs, inner = location.filesystem(str(path))
            raw = fs.cat_file(f"{inner}/zarr.json")
        else:
            raw = (Path(path) / "zarr.json").read_bytes()
    except FileNotFoundError:
        raise StoreMissingError(f"no embeddings store at {path}") from None
    return json.loads(raw).get("attributes", {})


def store_digest(attrs: dict[str, Any]) -> str:
    return attrs.get("digest", LEGACY_DIGEST)


class Float16Overflow(Exception):
    """A block's values do not fit float16; the writer promotes that array to float32."""

    def __init__(self, split: str, pooling: str, peak: float):
        super().__init__(f"{split}/{pooling}: |value| up to {peak:.4g} exceeds float16's {FLOAT16_MAX:.0f}")
        self.split, self.pooling, self.peak = split, pooling, peak


def to_stored(values: np.ndarray, dtype: np.dtype, split: str, pooling: str, block: int) -> np.ndarray:
    """float32 vectors as stored, refusing NaN/inf and raising Float16Overflow beyond float16's range.

    One torch.aminmax pass finds both (NaN and inf propagate into it), and torch converts ~4x faster
    than numpy's astype: together ~15 ms per SmolLM2 block and pooling, against ~66 ms with numpy.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    if tensor.numel():
        low, high = (float(v) for v in torch.aminmax(tensor))
        if not (np.isfinite(low) and np.isfinite(high)):
            raise FloatingPointError(f"{split}/{pooling} block {block}: the model produced NaN or inf; "
                                     f"try extract.compute_dtype: float32")
        peak = max(-low, high)
        if dtype == np.float16 and peak >= FLOAT16_ROUNDS_TO_INF:
            raise Float16Overflow(split, pooling, peak)
    return tensor.to(torch.float16 if dtype == np.float16 else torch.float32).numpy()


META_ARRAYS = ("labels", "text_id", "source_index", "token_count", "truncated")


def meta_digest(values: np.ndarray) -> str:
    """Hex checksum of a row-metadata array as written and as read back (strings hashed as JSON)."""
    values = np.asarray(values)
    if values.dtype.kind in "OUST":
        data = json.dumps([str(v) for v in values.tolist()], ensure_ascii=False).encode("utf-8", "surrogatepass")
        return hashlib.blake2b(data, digest_size=8).hexdigest()
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=8).hexdigest()


def is_store(path: str | Path) -> bool:
    """`path` is a folder or an fsspec URL (pipeline/core/location.py)."""
    try:
        return zarr.open_group(location.zarr_store(path, read_only=True), mode="r").attrs.get("format") == FORMAT
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError, ValueError):
        return False


def creation_interrupted(path) -> bool:
    """A run killed while creating a store leaves only a root zarr.json without our attributes and/or
    Zarr's `*.partial` temporary files: nobody's data, so the next run creates the store again."""
    if location.is_url(path):
        return False
    return all(p.name == "zarr.json" or p.name.endswith(".partial") for p in Path(path).iterdir())
