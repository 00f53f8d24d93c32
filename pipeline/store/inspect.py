"""A store's summary for people: shapes, dtypes, size on disk, fingerprint, completion, runs."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.store.resources import store_bytes
from pipeline.store.format import ENTROPY, with_legacy_defaults
from pipeline.store.reader import EmbeddingStore


def origins(info: dict) -> dict[str, str]:
    """Where the model and the corpus came from: a hub id and revision, or package/local files."""
    model, data = info.get("model_origin") or {}, info.get("dataset_source") or {}
    model_from = (f"hub {model['hub_id']}@{model.get('revision') or 'main'}" if model.get("hub_id")
                  else ", ".join(model.get("files", [])) or "unknown")
    if data.get("kind") == "hub":
        data_from = f"hub {data['path']}@{data.get('revision') or 'main'}"
    else:
        data_from = ", ".join(map(str, (data.get("files") or {}).values())) or "unknown"
    return {"model": model_from, "dataset": data_from}


def summarise(path: str | Path, console: Console | None = None) -> dict:
    """Print one store's summary and return it as a dict (used by tests and the report)."""
    console = console or Console()
    store = EmbeddingStore(path, allow_incomplete=True)
    fingerprint = with_legacy_defaults(store.attrs["fingerprint"])
    table = Table(title=f"{path}", title_justify="left")
    for column in ("split", "rows", "blocks done", "poolings", "shape", "dtype"):
        table.add_column(column)
    splits = {}
    for split in store.splits:
        done, total = store.completion(split)
        group = store.root[split]
        dtypes = sorted({str(group[p].dtype) for p in store.poolings})
        shape = tuple(group[store.poolings[0]].shape)
        splits[split] = {"rows": store.num_rows(split), "done": done, "blocks": total, "shape": shape,
                         "dtypes": dtypes}
        table.add_row(split, f"{store.num_rows(split):,}", f"{done}/{total}" + (" ✓" if done == total else ""),
                      ",".join(store.poolings), "x".join(map(str, shape)), ",".join(dtypes))
    console.print(table)
    size = store_bytes(path)   # a folder, or the objects under an s3://... prefix
    model, extract, dataset = fingerprint["model"], fingerprint["extract"], fingerprint["dataset"]
    console.print(f"model {model['name']} ({store.attrs['info'].get('model_type')}, "
                  f"{'decoder' if store.attrs['info'].get('decoder') else 'encoder'}), "
                  f"{store.num_layers} layers x {store.dim}, weights sha256 {model['weights_sha256'][:16]}…")
    console.print(f"dataset {dataset['name']}: {len(dataset['label_names'])} labels, carve {dataset['carve']}")
    origin = origins(store.attrs["info"])
    console.print(f"model from {origin['model']}; dataset from {origin['dataset']}")
    console.print(f"max_len {extract['max_len']}, stored {extract['dtype']}, computed {extract['compute_dtype']} "
                  f"(attention {extract['attention']}), "
                  f"block_rows {extract['block_rows']}; {size / 2**20:,.1f} MiB on disk")
    entropy = store.attrs.get(ENTROPY)
    if entropy:
        sampled = {s: int(store.root[s]["attention_sampled"][:].sum()) for s in store.splits}
        console.print(f"attention entropy: {entropy['rows_per_block']} sampled rows per block (seed {entropy['seed']}), "
                      f"[N, {store.num_layers}] float32, column 0 NaN; sampled rows "
                      + ", ".join(f"{s} {n:,}" for s, n in sampled.items()))
    else:
        sampled = None
        console.print("attention entropy: none (extract.attention_entropy_rows was 0, or the store predates it)")
    for key, reason in store.attrs.get("dtype_fallback", {}).items():
        console.print(f"[yellow]float32 fallback[/] {key}: {reason}")
    dropped = sum(len(v) for v in store.attrs.get("dropped", {}).values())
    if dropped:
        console.print(f"{dropped} source rows dropped (reasons in the store's `dropped` attribute)")
    for run in store.attrs.get("runs", []):
        console.print(f"run {run.get('finished_at')}: {run['texts']:,} texts, {run['tokens']:,} tokens, "
                      f"{run['seconds']:,.1f} s, {run.get('tokens_per_s', 0):,.0f} tokens/s on {run['device']}, "
                      f"peak RSS {run.get('peak_rss_mb', 0):,.0f} MB")
    complete = all(s["done"] == s["blocks"] for s in splits.values())
    console.print("complete" if complete else "[red]incomplete[/]: rerun the extraction to finish it")
    return {"path": os.fspath(path), "splits": splits, "bytes": size, "complete": complete,
            "num_layers": store.num_layers, "dim": store.dim, "poolings": store.poolings, "origin": origin,
            "attention_entropy": {"rows_per_block": entropy["rows_per_block"], "sampled": sampled} if entropy else None}
