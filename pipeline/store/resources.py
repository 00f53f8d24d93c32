"""What a store cost: its size (a folder or an fsspec URL) and its extraction runs, for the train
stage's resources.json and `python -m pipeline inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core import location
from pipeline.store.reader import open_store


def store_bytes(path: location.Location) -> int:
    """Bytes of every file under a folder, or of every object under a URL prefix."""
    if location.is_url(path):
        fs, inner = location.filesystem(str(path))
        return int(fs.du(inner))
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def resources_of(embeddings_root: Path, dataset: str, models: list[str]) -> dict[str, Any]:
    """Extraction cost and store size per model, from the store's own attributes."""
    out = {}
    for model in models:
        store = open_store(embeddings_root, model, dataset)
        runs = store.attrs.get("runs", [])
        last = runs[-1] if runs else {}
        out[model] = {"extraction_seconds": round(sum(r.get("seconds", 0) for r in runs), 1),
                      "tokens_per_s": last.get("tokens_per_s"), "peak_rss_mb": last.get("peak_rss_mb"),
                      "device": last.get("device"), "store_bytes": store_bytes(store.path),
                      "layers": store.num_layers, "dim": store.dim}
    return out
