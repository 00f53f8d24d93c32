"""Extraction throughput on 1 process (all cores as threads) against N processes (cores split between them).

    python -m pipeline.bench.scale_bench --model minilm-l6 --rows 1024 --processes 1 2

Builds a throwaway project in a temporary folder (--rows evenly spaced train rows of a corpus from
paths.data_mirror, the model prepared from params.yaml's registry), runs `python -m stages.extract`
once per process count into a fresh store, and prints texts/s and tokens/s (compute time, and wall
time including start-up) from each run's record, plus the per-rank spread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--dataset", default="mr")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--block-rows", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)

    from pipeline.config.params import load_params
    params = load_params(args.params, models=[args.model], datasets=[args.dataset])
    source = params.dataset(args.dataset)
    folder = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    try:
        mirror = folder / "mirror"
        train = (params.data_mirror / source.local["train"]).read_text(encoding="utf-8").splitlines()
        (mirror / "bench").mkdir(parents=True)
        step = max(1, len(train) // args.rows)       # evenly spaced rows: every label, all lengths
        (mirror / "bench" / "train.jsonl").write_text("\n".join(train[::step][:args.rows]) + "\n", encoding="utf-8")
        raw = yaml.safe_load(Path(args.params).read_text())
        raw["paths"] = {"store": str(folder / "store"), "data_mirror": str(mirror)}
        raw["datasets"]["bench"] = {"text_column": source.text_column, "label_column": source.label_column,
                                    "local": {"train": "bench/train.jsonl"}}
        raw["select"] = {"models": [args.model], "datasets": ["bench"]}
        raw["extract"].update(block_rows=args.block_rows, max_len=args.max_len, device="cpu")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        results = []
        for count in args.processes:
            raw["extract"]["devices"] = count
            path = folder / "params.yaml"
            path.write_text(yaml.safe_dump(raw, sort_keys=False))
            for stage in (["stages.prepare_model", "--model", args.model], ["stages.prepare_data", "--dataset", "bench"]):
                subprocess.run([sys.executable, "-m", *stage, "--params", str(path)], cwd=REPO, env=env, check=True,
                               capture_output=True)
            shutil.rmtree(folder / "store" / "embeddings", ignore_errors=True)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "stages.extract", "--params", str(path), "--model", args.model,
                            "--dataset", "bench", "--no-progress"], cwd=REPO, env=env, check=True, capture_output=True)
            wall = time.perf_counter() - started
            from pipeline.store.reader import open_store
            run = open_store(folder / "store" / "embeddings", args.model, "bench").attrs["runs"][-1]
            results.append({"processes": count, "texts": run["texts"], "tokens": run["tokens"],
                            "seconds": run["seconds"], "tokens_per_s": run["tokens_per_s"],
                            "texts_per_s": run["texts_per_s"], "wall_seconds": round(wall, 2),
                            "spread_seconds": run.get("spread_seconds"),
                            "rank_seconds": [r["seconds"] for r in run.get("ranks", [])]})
        base = results[0]["tokens_per_s"]
        print(f"{args.model} on {args.rows} {args.dataset} train texts, max_len {args.max_len}, "
              f"block_rows {args.block_rows}, {os.cpu_count()} CPUs")
        for r in results:
            print(f"{r['processes']} process(es): {r['tokens_per_s']:,.0f} tokens/s ({r['texts_per_s']:,.1f} texts/s) "
                  f"over {r['seconds']:.1f} s compute, {r['wall_seconds']:.1f} s wall incl. start-up; "
                  f"x{r['tokens_per_s'] / base:.2f}; rank seconds {r['rank_seconds']} spread {r['spread_seconds']}")
        print(json.dumps(results))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
