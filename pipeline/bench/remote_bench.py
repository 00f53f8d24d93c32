"""One-layer read throughput: a store on S3 (an S3-compatible server) against the same store on local disk.

    python -m pipeline.bench.remote_bench                      # starts moto's S3 server on loopback itself
    python -m pipeline.bench.remote_bench --endpoint URL --bucket B   # a real endpoint (credentials from AWS_* env)

Writes one store-shaped array ([rows, layers, dim] float16, one shard per block of rows, inner chunks
(rows, 1, dim), blosc lz4 as in params.yaml) to a local folder and to s3://bucket/..., then reads one
layer (what Stage 2 does per layer) with zarr's `async.concurrency` at several settings; medians of
repeats, MB/s of decoded float16 bytes, and each remote rate as a fraction of the local one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import zarr

from pipeline.core import location
from pipeline.bench.s3_server import start_moto_server
from pipeline.store.format import compressors_for


def write_store(target, rows: int, layers: int, dim: int, block_rows: int, seed: int = 0) -> None:
    root = zarr.open_group(location.zarr_store(target), mode="w")
    array = root.create_array("mean", shape=(rows, layers, dim), dtype="float16", shards=(block_rows, layers, dim),
                              chunks=(block_rows, 1, dim), fill_value=0,
                              compressors=compressors_for({"codec": "blosc", "cname": "lz4", "clevel": 1}))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        array[start:stop] = rng.standard_normal((stop - start, layers, dim), dtype=np.float32).astype(np.float16)


def read_layer_rate(target, layer: int, concurrency: int, repeats: int) -> tuple[float, float]:
    """(median MB/s, median seconds) reading one layer, with a fresh store object per repeat."""
    seconds = []
    with zarr.config.set({"async.concurrency": concurrency}):
        for _ in range(repeats):
            array = zarr.open_group(location.zarr_store(target, read_only=True), mode="r")["mean"]
            started = time.perf_counter()
            values = array[:, layer, :]
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return values.nbytes / 2**20 / median, median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--block-rows", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 64])
    parser.add_argument("--endpoint", help="S3 endpoint URL (default: start moto's server on 127.0.0.1)")
    parser.add_argument("--bucket", help="existing bucket (default: a new one on the moto server)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    server = None
    if args.endpoint is None:
        server, args.endpoint = start_moto_server()
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.setdefault(key, "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ["AWS_ENDPOINT_URL_S3"] = args.endpoint
    try:
        if args.bucket is None:
            import boto3
            args.bucket = f"bench-{uuid.uuid4().hex[:10]}"
            boto3.client("s3", endpoint_url=args.endpoint).create_bucket(Bucket=args.bucket)
        shape = (args.rows, args.layers, args.dim)
        layer = args.layers // 2
        layer_mb = args.rows * args.dim * 2 / 2**20
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / "store"
            remote = f"s3://{args.bucket}/bench-{uuid.uuid4().hex[:8]}/store"
            for target in (local, remote):
                started = time.perf_counter()
                write_store(target, *shape, args.block_rows)
                print(f"wrote {shape} float16 to {target} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            results = {"shape": shape, "block_rows": args.block_rows, "layer": layer, "layer_mb": round(layer_mb, 2),
                       "repeats": args.repeats, "endpoint": args.endpoint, "reads": []}
            for name, target in (("local", local), ("s3", remote)):
                for concurrency in args.concurrency:
                    rate, seconds = read_layer_rate(target, layer, concurrency, args.repeats)
                    results["reads"].append({"store": name, "concurrency": concurrency,
                                             "mb_per_s": round(rate, 1), "seconds": round(seconds, 4)})
            location.remove(remote)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    local_best = max(r["mb_per_s"] for r in results["reads"] if r["store"] == "local")
    s3_serial = next(r["mb_per_s"] for r in results["reads"] if r["store"] == "s3" and r["concurrency"] == min(args.concurrency))
    print(f"one layer = {layer_mb:.2f} MB of float16 ({args.rows} rows x {args.dim}), "
          f"{-(-args.rows // args.block_rows)} shards; median of {args.repeats}")
    print(f"{'store':6} {'async.concurrency':>18} {'MB/s':>9} {'s':>8} {'vs local':>9} {'vs serial':>10}")
    for r in results["reads"]:
        print(f"{r['store']:6} {r['concurrency']:>18} {r['mb_per_s']:>9.1f} {r['seconds']:>8.4f} "
              f"{r['mb_per_s'] / local_best:>9.2f} "
              f"{(r['mb_per_s'] / s3_serial if r['store'] == 's3' else float('nan')):>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
