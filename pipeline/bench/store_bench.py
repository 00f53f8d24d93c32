"""Benchmark 2: the store's write MB/s, one-layer vs all-layer reads, bytes on disk vs raw.

Arrays have the store's shape and layout ([rows, layers, D] float16, one shard per block of rows,
inner chunks (block_rows, 1, D), as pipeline/store.py writes them); values are real pooled vectors
from an existing store when there is one (compression depends on them), else Gaussian noise.
Layouts: the configured compressor and alternatives (zstd, none), and unsharded (block, L, D) chunks.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.bench.common import r
from pipeline.store import compressors_for


def sample_vectors(params, rows: int, layers: int = 31, dim: int = 576) -> tuple[np.ndarray, str]:
    from pipeline.store import EmbeddingStore
    for model in dict.fromkeys(("smollm2-135m", *params.selected_models)):
        try:
            store = EmbeddingStore(params.embeddings_path(model, (params.selected_datasets or ["mr"])[0]))
            array = store.root["train"]["mean"]
            take = min(rows, array.shape[0])
            return np.asarray(array[:take]).astype(np.float16), f"{model} train/mean, first {take} rows"
        except Exception:     # noqa: BLE001 - no store yet: fall back to noise
            continue
    rng = np.random.default_rng(0)
    return rng.standard_normal((rows, layers, dim)).astype(np.float16), "Gaussian noise"


def layouts(params) -> dict[str, dict[str, Any]]:
    chosen = params.extract.compressor
    name = ", ".join(f"{k}={v}" for k, v in chosen.items())
    return {
        f"chosen: {name}; shard per block, chunks (block,1,D)": {"compressor": chosen, "sharded": True},
        "zstd level 1; shard per block, chunks (block,1,D)": {"compressor": {"codec": "zstd", "level": 1},
                                                               "sharded": True},
        "no compression; shard per block, chunks (block,1,D)": {"compressor": {"codec": "none"}, "sharded": True},
        f"{name}; unsharded chunks (block,L,D)": {"compressor": chosen, "sharded": False},
    }


def _create(path: Path, shape, block: int, layout: dict[str, Any]) -> zarr.Array:
    rows, layers, dim = shape
    kwargs = {"shards": (block, layers, dim), "chunks": (block, 1, dim)} if layout["sharded"] else \
        {"chunks": (block, layers, dim)}
    return zarr.create_array(str(path), shape=shape, dtype="float16", compressors=compressors_for(layout["compressor"]),
                             fill_value=0, **kwargs)


def run(params, rows: int, repeats: int) -> dict[str, Any]:
    data, origin = sample_vectors(params, rows)
    block = min(params.extract.block_rows, len(data))
    raw = data.nbytes
    out: dict[str, Any] = {"rows": len(data), "shape": list(data.shape), "raw_mb": r(raw / 2**20),
                           "values": origin, "block_rows": block, "layouts": {}}
    layer = data.shape[1] // 2
    with tempfile.TemporaryDirectory(prefix="layerfuse-store-bench-") as tmp:
        for label, layout in layouts(params).items():
            writes, ones, alls, disk = [], [], [], 0
            for rep in range(repeats):
                path = Path(tmp) / f"a{rep}"
                start = time.perf_counter()
                array = _create(path, data.shape, block, layout)
                for first in range(0, len(data), block):       # block by block, as extraction writes
                    array[first:first + block] = data[first:first + block]
                writes.append(time.perf_counter() - start)
                disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                reader = zarr.open_array(str(path), mode="r")
                start = time.perf_counter()
                one = reader[:, layer, :]
                ones.append(time.perf_counter() - start)
                start = time.perf_counter()
                full = reader[:]
                alls.append(time.perf_counter() - start)
                assert np.array_equal(one, data[:, layer]) and np.array_equal(full, data)
                shutil.rmtree(path)
            w, o, a = statistics.median(writes), statistics.median(ones), statistics.median(alls)
            out["layouts"][label] = {"write_mb_s": r(raw / w / 2**20), "read_one_layer_s": r(o),
                                     "read_all_s": r(a), "one_layer_speedup": r(a / o),
                                     "disk_mb": r(disk / 2**20), "disk_vs_raw": r(disk / raw)}
    return out
