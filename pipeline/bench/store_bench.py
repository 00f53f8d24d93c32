"""Benchmark 2: the store's write MB/s, one-layer vs all-layer reads, bytes on disk vs raw.

Arrays have the store's shape and layout ([rows, layers, D] float16, one shard per block of rows,
inner chunks (block_rows, 1, D), as pipeline/store/writer.py writes them); values are real pooled vectors
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
from pipeline.store.format import compressors_for


def sample_vectors(params, rows: int, layers: int = 31, dim: int = 576) -> tuple[np.ndarray, str]:
    from pipeline.store.reader import EmbeddingStore
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


# -- verified reads: what checking every block's digest costs Stage 2 --------------------------------
def synthetic_store(path: Path, rows: dict[str, int], layers: int, dim: int, poolings: list[str],
                    block_rows: int = 1024) -> Path:
    """A store of the given shape written by the real StoreWriter (float16, zstd 1), values from a seeded
    Gaussian with a label signal, for when no extracted store of that size exists."""
    from pipeline.store.writer import SplitRows, StoreWriter
    writer = StoreWriter(path, {"dataset": {"name": "bench", "label_names": ["a", "b"]}, "model": {"name": "bench"}},
                         {"decoder": True}, num_layers=layers, dim=dim, poolings=poolings, block_rows=block_rows,
                         dtype="float16", compressor={"codec": "zstd", "level": 1})
    rng = np.random.default_rng(0)
    for split, n in rows.items():
        y = rng.integers(2, size=n).astype(np.int32)
        writer.init_split(split, SplitRows(y, np.array([f"{split}-{i}" for i in range(n)]), np.arange(n),
                                           np.full(n, 9, np.int32), np.zeros(n, bool)), [])
        for block in range(writer.num_blocks(n)):
            a, b = writer.block_range(split, block)
            x = rng.standard_normal((b - a, layers, dim), dtype=np.float32)
            x[:, :, :8] += y[a:b, None, None]
            writer.write_block(split, block, {p: x for p in poolings})
    return path


def verify_cost(path: Path, repeats: int, protocol=None) -> dict[str, Any]:
    """Median seconds (wall, and CPU of this process: steadier on a shared machine) of the score stage's
    work (`score_layers`) and of a two-layer read of every split (what train and predict read), with and
    without verified reads. Verified runs start with an empty verification cache, as a fresh stage
    process does; runs alternate so machine load hits both alike."""
    from pipeline.select.probe import Protocol
    from pipeline.select.scoring import score_layers
    from pipeline.store.reader import _VERIFIED, EmbeddingStore
    protocol = protocol or Protocol(name="validation")

    def score(store) -> None:
        score_layers(store, protocol, "bench")

    def two_layers(store) -> None:
        for split in store.splits:
            for layer in (store.num_layers // 2, -1):
                store.layer(split, store.poolings[0], layer)

    def timed(fn, verified: bool) -> tuple[float, float]:
        _VERIFIED.clear()
        store = EmbeddingStore(path, verified=verified)
        wall, cpu = time.perf_counter(), time.process_time()
        fn(store)
        return time.perf_counter() - wall, time.process_time() - cpu

    out: dict[str, Any] = {"store": str(path), "repeats": repeats}
    timed(score, False)                                   # warm-up: imports, allocator, page cache
    for name, fn in (("score_layers", score), ("two_layer_read", two_layers)):
        runs = {True: [], False: []}
        for _ in range(repeats):
            for verified in (False, True):
                runs[verified].append(timed(fn, verified))
        row = {}
        for unit, i in (("wall", 0), ("cpu", 1)):
            plain = statistics.median(t[i] for t in runs[False])
            checked = statistics.median(t[i] for t in runs[True])
            row[unit] = {"unverified_s": r(plain), "verified_s": r(checked), "ratio": r(checked / plain),
                         "all_unverified_s": [r(t[i]) for t in runs[False]],
                         "all_verified_s": [r(t[i]) for t in runs[True]]}
        out[name] = row
    return out


if __name__ == "__main__":
    import argparse
    import json
    parser = argparse.ArgumentParser(description="cost of verified reads: python -m pipeline.bench.store_bench STORE")
    parser.add_argument("store", help="an embeddings store folder; created with --make if missing")
    parser.add_argument("--make", default=None, help="write a synthetic store of rows,layers,dim first, e.g. "
                                                     "6397,711,3554,31,576 (SmolLM2-135M on mr)")
    parser.add_argument("--poolings", default="mean,last,first,max,mean_nospecial")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.make and not Path(args.store).exists():
        train, validation, test, layers, dim = map(int, args.make.split(","))
        synthetic_store(Path(args.store), {"train": train, "validation": validation, "test": test}, layers, dim,
                        args.poolings.split(","))
    print(json.dumps(verify_cost(Path(args.store), args.repeats), indent=1))
