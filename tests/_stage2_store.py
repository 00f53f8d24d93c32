"""Small synthetic embeddings stores, written with the real StoreWriter, for Stage 2 tests.

Each layer carries the label along a few directions with a strength that peaks at `best_layer`,
so the right answer of scoring is known; every layer has its own scale (as decoders do).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline.store.writer import SplitRows, StoreWriter

ROWS = {"train": 240, "validation": 80, "test": 120}


def make_store(root: Path, model: str, dataset: str = "toy", *, num_layers: int = 6, dim: int = 16,
               best_layer: int = 3, classes: int = 2, decoder: bool = False, seed: int = 0,
               signal_dims: slice = slice(0, 4), poolings=("mean", "last"), dtype: str = "float32",
               compressor: dict | None = None, rebuild: bool = False) -> Path:
    path = Path(root) / "embeddings" / dataset / model
    names = [f"c{i}" for i in range(classes)]
    writer = StoreWriter(path, {"dataset": {"name": dataset, "label_names": names}, "model": {"name": model}},
                         {"decoder": decoder}, num_layers=num_layers, dim=dim, poolings=list(poolings),
                         block_rows=64, dtype=dtype, compressor=compressor or {"codec": "none"}, rebuild=rebuild)
    rng = np.random.default_rng(seed)
    label_rng = np.random.default_rng(1234)           # same rows and labels for every model
    centres = np.random.default_rng(99).normal(size=(classes, dim)).astype(np.float32)
    mask = np.zeros(dim, np.float32)
    mask[signal_dims] = 1
    for split, n in ROWS.items():
        y = label_rng.integers(classes, size=n).astype(np.int32)
        rows = SplitRows(labels=y, text_id=np.array([f"{split}-{i}" for i in range(n)]),
                         source_index=np.arange(n, dtype=np.int64), token_count=np.full(n, 5, np.int32),
                         truncated=np.zeros(n, bool))
        writer.init_split(split, rows, [])
        strength = np.array([1.6 * np.exp(-abs(l - best_layer)) for l in range(num_layers)], np.float32)
        scale = np.array([10.0 ** (l % 3) for l in range(num_layers)], np.float32)
        x = rng.normal(size=(n, num_layers, dim)).astype(np.float32)
        x += strength[None, :, None] * (centres[y] * mask)[:, None, :]
        x *= scale[None, :, None]
        for block in range(writer.num_blocks(n)):
            a, b = writer.block_range(split, block)
            writer.write_block(split, block, {p: x[a:b] + (0.1 if p == "last" else 0.0) for p in poolings})
    return path


def remove_test_split(store_path: Path) -> None:
    """Delete the test split's arrays: any reader of test now fails loudly."""
    shutil.rmtree(Path(store_path) / "test")
