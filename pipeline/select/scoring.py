"""Layer scoring: the probe on every layer of every pooling of one model x dataset.

Layers are read one at a time from the store (train, plus validation under protocol `validation`;
never test), standardised with train statistics, and projected on a basis shared by all layers of
that pooling: the top principal directions of the standardised train rows of every layer. Ridge on
that basis is principal-component ridge; because the basis is shared, the mean of projected layers
is the projection of the mean, which lets the fusion search build any mean or concatenation from
per-layer blocks (pipeline/select/fusion.py) and score single layers exactly as done here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from pipeline.select.layer_agreement import layer_scores
from pipeline.select.layer_geometry import mean_attention_entropy, sample_rows
from pipeline.select.probe import (Folds, Protocol, evaluate_features, held_out_labels, make_folds, single_thread,
                            standardise_stats)
from pipeline.core.records import ScoreRow
from pipeline.select.selection import RULES, Evidence, annotate, choose, optimism
from pipeline.store.reader import EmbeddingStore

PROBE_SPLITS = {"validation": ("train", "validation"), "cv": ("train",)}


def probe_splits(protocol: Protocol) -> tuple[str, ...]:
    """The only splits the probe reads: the test split is not among them."""
    return PROBE_SPLITS[protocol.name]


@dataclass
class LayerBank:
    """One model x pooling: standardised layers (optional, float16) and their projections F."""
    model: str
    pooling: str
    layers: list[int]
    num_layers: int
    mean: np.ndarray                  # [len(layers), D] train statistics
    std: np.ndarray
    basis: torch.Tensor               # [D, r]
    F: torch.Tensor                   # [N, len(layers), r] projected probe rows
    folds: Folds
    Z: torch.Tensor | None = None     # [N, len(layers), D] standardised, float16 (for max)
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    samples: list[np.ndarray] | None = None   # raw train rows `sample` of each layer (label-free scores)


def load_bank(store: EmbeddingStore, pooling: str, protocol: Protocol, layers: list[int] | None = None,
              keep_standardised: bool = False, model: str = "", judge_on_test: bool = False,
              sample: np.ndarray | None = None) -> LayerBank:
    """Read the layers (probe splits only), standardise, fit the shared basis, project.

    Probe rows follow `folds` (under CV: train rows grouped by fold). Each layer is read once; the
    standardised layers are held as float16 (half the bytes read) until the basis is known.
    `judge_on_test` (pipeline/select/audit.py only, which judges selection methods and never chooses):
    fit on train, score on test.
    """
    start = time.perf_counter()
    layers = list(range(store.num_layers)) if layers is None else [range(store.num_layers)[i] for i in layers]
    splits = ("train", "test") if judge_on_test else probe_splits(protocol)
    if judge_on_test:
        protocol = replace(protocol, name="validation")
    y_train = store.labels("train")
    y_val = store.labels(splits[1]) if len(splits) > 1 else None
    folds = make_folds(y_train, y_val, protocol, len(store.label_names))
    n, d = len(folds.y), store.dim
    n_train = len(y_train)
    Z = torch.empty((n, len(layers), d), dtype=torch.float16)
    means, stds = np.empty((len(layers), d), np.float32), np.empty((len(layers), d), np.float32)
    rng = np.random.default_rng(protocol.seed)
    sub = np.sort(rng.choice(n_train, size=min(n_train, protocol.pca_rows), replace=False))
    if folds.order is not None:                       # PCA rows: the same train rows, at their probe positions
        sub = np.sort(np.argsort(folds.order)[sub])
    sub_t = torch.as_tensor(sub)
    order = None if folds.order is None else torch.as_tensor(folds.order)
    cov = torch.zeros((d, d), dtype=torch.float64)
    bytes_read, samples = 0, None if sample is None else []
    for j, layer in enumerate(layers):
        parts = [store.layer(split, pooling, layer) for split in splits]
        bytes_read += sum(p.nbytes for p in parts)
        if samples is not None:                   # raw train rows, before the in-place standardisation
            samples.append(parts[0][sample])
        means[j], stds[j] = standardise_stats(parts[0])
        z = torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))
        del parts
        z.sub_(torch.from_numpy(means[j])).div_(torch.from_numpy(stds[j]))
        if order is not None:
            z = z[order]
        Z[:, j] = z
        zs = z[sub_t]
        cov += (zs.T @ zs).double()
        del z, zs
    read_s = time.perf_counter() - start
    rank = d if protocol.rank <= 0 else min(protocol.rank, d)
    with single_thread():                  # LAPACK's threaded eigensolver crawls on a busy 2-core machine
        _, vectors = torch.linalg.eigh(cov)
    basis = vectors[:, -rank:].flip(1).float().contiguous()
    F = torch.empty((n, len(layers), rank), dtype=torch.float32)
    for j in range(len(layers)):
        F[:, j] = Z[:, j].float() @ basis
    seconds = {"read": read_s, "project": time.perf_counter() - start - read_s}
    return LayerBank(model, pooling, layers, store.num_layers, means, stds, basis, F, folds,
                     Z if keep_standardised else None, seconds, bytes_read, samples)


def relative_depth(layer: int, num_layers: int) -> float:
    return layer / max(num_layers - 1, 1)


def probe_layers(store: EmbeddingStore, protocol: Protocol, model: str, poolings: list[str] | None = None,
                 sample: np.ndarray | None = None) -> tuple[list[ScoreRow], Evidence, int, LayerBank]:
    """The probe's score of every pooling x layer, the held-out predictions behind them, bytes read, and the
    bank of the pooling with the top score (kept for the layer scores of pipeline/select/layer_agreement.py)."""
    rows, evidence, bytes_read, kept, top = [], None, 0, None, -np.inf
    for pooling in poolings or store.poolings:
        bank = load_bank(store, pooling, protocol, model=model, sample=sample)
        bytes_read += bank.bytes_read
        if evidence is None:
            evidence = Evidence(held_out_labels(bank.folds), len(store.label_names), protocol.metric,
                                protocol.bootstrap, protocol.seed)
        for j, layer in enumerate(bank.layers):
            t = time.perf_counter()
            result = evidence.add((pooling, layer), evaluate_features(bank.F[:, j], bank.folds, protocol))
            rows.append(ScoreRow(model=model, pooling=pooling, layer=layer, layers=[layer], models=[model],
                                 width=store.dim, relative_depth=round(relative_depth(layer, store.num_layers), 4),
                                 **result, seconds=round(time.perf_counter() - t, 4)))
        if max(r.score for r in rows if r.pooling == pooling) > top:
            kept, top = bank, max(r.score for r in rows if r.pooling == pooling)
        del bank
    return rows, evidence, bytes_read, kept


def layer_key(row: ScoreRow) -> tuple[str, int]:
    return row.pooling, row.layer


def score_layers(store: EmbeddingStore, protocol: Protocol, model: str, poolings: list[str] | None = None,
                 geometry_rows: int = 1000, importance_rows: int = 8192) -> dict[str, Any]:
    """Every pooling x layer scored, each against the last layer (its best pooling) with a paired 95%
    interval; the best pooling, the ranking of its layers, and the layer the selection rule picks; for the
    best pooling, label-free and gradient layer scores and their agreement with the probe (0 rows: off).
    Rows are ScoreRow records (records.as_json gives the JSON of scores.json)."""
    start = time.perf_counter()
    sample = sample_rows(store.num_rows("train"), geometry_rows, protocol.seed) if geometry_rows else None
    rows, evidence, bytes_read, bank = probe_layers(store, protocol, model, poolings, sample)
    by_pooling = {}
    for row in rows:
        best = by_pooling.get(row.pooling)
        if best is None or row.score > best.score:
            by_pooling[row.pooling] = row
    best_pooling = max(by_pooling, key=lambda p: by_pooling[p].score)
    ranking = sorted((r for r in rows if r.pooling == best_pooling), key=lambda r: -r.score)
    last_layer = store.num_layers - 1
    last = next(r for r in rows if r.pooling == best_pooling and r.layer == last_layer)
    reference = max((r for r in rows if r.layer == last_layer), key=lambda r: r.score)
    annotate(rows, layer_key, evidence, lambda _: layer_key(reference), ranking[0])
    rule = protocol.select_rule
    chosen = choose(ranking, layer_key, evidence, rule)
    return {
        "model": model, "num_layers": store.num_layers, "dim": store.dim, "decoder": bool(store.attrs["info"].get("decoder")),
        "protocol": protocol.__dict__ | {"alphas": list(protocol.alphas)}, "splits_read": list(probe_splits(protocol)),
        "metric": protocol.metric, "best_pooling": best_pooling,
        "best_layer_per_pooling": {p: r.layer for p, r in by_pooling.items()},
        "ranking": [r.layer for r in ranking], "best": ranking[0], "last": last, "reference": reference,
        "select_rule": rule, "chosen": chosen,
        "optimism": optimism({f"best layer ({r})": (ranking, r) for r in RULES}, layer_key, evidence, seed=protocol.seed),
        "rows": rows, "bytes_read": bytes_read,
        **layer_scores(bank, [r for r in rows if r.pooling == best_pooling], importance_rows, protocol.seed,
                       mean_attention_entropy(store)),
        "seconds": round(time.perf_counter() - start, 3),
    }
