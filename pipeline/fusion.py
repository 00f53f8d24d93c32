"""Fusion search: a declared candidate space, scored exhaustively with the layer-scoring probe.

Within one model (on its best pooling): every single layer, every pair, every contiguous window,
every subset of the top-k layers, the last-N layers (LLMEmbed's recipe: last 5, averaged), under
the operators mean, max and concatenation of per-layer standardised vectors. Across models: every
subset of the selected models, each contributing its best layer or its best within-model fusion,
concatenated (widths differ across models, so mean and max do not apply).

Speed comes from sharing: the projected layers F_l of a LayerBank give, once per fold, the Gram
blocks F_l^T F_m of all layer pairs; the statistics of any mean or concatenation are sums or
selections of those blocks, so such a candidate costs one small eigendecomposition per fold.
Only `max` needs its features built (from the float16 standardised layers kept by the bank).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from pipeline.probe import FitStats, Protocol, evaluate_features, fit_stats, solve_and_score
from pipeline.scoring import LayerBank

OPERATORS = ("mean", "max", "concat")


@dataclass(frozen=True)
class Candidate:
    """A set of layers of one model and the operator that fuses them."""
    layers: tuple[int, ...]
    operator: str                   # mean | max | concat (a single layer is `mean` of one)
    family: str                     # single | pair | window | top-k | last-n

    @property
    def name(self) -> str:
        if len(self.layers) == 1:
            return f"L{self.layers[0]}"
        return f"{self.operator}({','.join(map(str, self.layers))})"


def fuse_settings(raw: dict[str, Any]) -> dict[str, Any]:
    section = dict(raw.get("fuse") or {})
    return {"pooling": section.get("pooling", "best"), "top_k": int(section.get("top_k", 6)),
            "last_n": int(section.get("last_n", 5)), "operators": list(section.get("operators", OPERATORS)),
            "wide_max_layers": int(section.get("wide_max_layers", 4)),
            "multi_model": bool(section.get("multi_model", True))}


def build_candidates(num_layers: int, ranking: list[int], top_k: int = 6, last_n: int = 5,
                     operators: Iterable[str] = OPERATORS, wide_max_layers: int = 4) -> list[Candidate]:
    """The within-model candidate space, without duplicates.

    Mean applies to every set; max and concat (whose cost grows with the set: concat's width, max's
    feature pass) to sets of at most `wide_max_layers` layers and to the top-k and last-N sets.
    """
    sets: dict[tuple[int, ...], str] = {}

    def add(layers: Iterable[int], family: str) -> None:
        key = tuple(sorted(set(layers)))
        sets.setdefault(key, family)

    for layer in range(num_layers):
        add([layer], "single")
    for a, b in itertools.combinations(range(num_layers), 2):
        add([a, b], "pair")
    for size in range(3, num_layers + 1):
        for start in range(num_layers - size + 1):
            add(range(start, start + size), "window")
    top = ranking[:top_k]
    for size in range(2, len(top) + 1):
        for subset in itertools.combinations(top, size):
            add(subset, "top-k")
    last = tuple(range(max(num_layers - last_n, 0), num_layers))
    sets[last] = "last-n"
    operators = [op for op in OPERATORS if op in set(operators)]
    out = []
    for layers, family in sets.items():
        if len(layers) == 1:
            out.append(Candidate(layers, "mean", family))
            continue
        for op in operators:
            if op == "mean" or len(layers) <= wide_max_layers or family in ("top-k", "last-n"):
                out.append(Candidate(layers, op, family))
    return out


class BlockScorer:
    """Scores candidates of one LayerBank from per-fold Gram blocks of all its layers."""

    def __init__(self, bank: LayerBank, protocol: Protocol):
        self.bank, self.protocol = bank, protocol
        n, L, r = bank.F.shape
        stats = fit_stats(bank.F.reshape(n, L * r), bank.folds)
        K = stats.G.shape[0]
        self.G = stats.G.reshape(K, L, r, L, r)
        self.s = stats.s.reshape(K, L, r)
        self.XtY = stats.XtY.reshape(K, L, r, -1)
        self.n, self.ysum = stats.n, stats.ysum
        self.position = {layer: j for j, layer in enumerate(bank.layers)}

    def features(self, candidate: Candidate, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The candidate's probe features (projected) for the given probe rows."""
        idx = [self.position[layer] for layer in candidate.layers]
        if candidate.operator == "max":
            Z = self.bank.Z
            if Z is None:
                raise ValueError("the max operator needs a bank loaded with keep_standardised=True")
            return _take(Z, rows, idx).float().amax(1) @ self.bank.basis
        F = _take(self.bank.F, rows, idx)
        return F.mean(1) if candidate.operator == "mean" else F.reshape(F.shape[0], -1)

    def stats(self, candidate: Candidate) -> FitStats:
        idx = torch.tensor([self.position[layer] for layer in candidate.layers])
        K, _, r, _, _ = self.G.shape
        s = len(idx)
        G = self.G.index_select(1, idx).index_select(3, idx)               # [K, s, r, s, r]
        S, XtY = self.s.index_select(1, idx), self.XtY.index_select(1, idx)
        if candidate.operator == "mean":
            w = 1.0 / s
            return FitStats(G.sum((1, 3)) * w * w, S.sum(1) * w, XtY.sum(1) * w, self.n, self.ysum)
        return FitStats(G.reshape(K, s * r, s * r), S.reshape(K, s * r), XtY.reshape(K, s * r, -1), self.n, self.ysum)

    def score(self, candidate: Candidate) -> dict[str, float]:
        folds = self.bank.folds
        if candidate.operator == "max" and len(candidate.layers) > 1:
            return evaluate_features(self.features(candidate), folds, self.protocol)
        evals = [self.features(candidate, e) for e in folds.eval]
        return solve_and_score(self.stats(candidate), evals, folds, self.protocol)


def _take(A: torch.Tensor, rows: torch.Tensor | slice, idx: list[int]) -> torch.Tensor:
    """A[rows][:, idx] without copying the layers that are not wanted."""
    idx_t = torch.tensor(idx)
    if isinstance(rows, slice):
        return A[rows].index_select(1, idx_t)
    return A[rows[:, None], idx_t[None, :]]


def score_candidates(bank: LayerBank, candidates: list[Candidate], protocol: Protocol,
                     scorer: BlockScorer | None = None) -> list[dict[str, Any]]:
    """Every candidate's probe score (accuracy, macro-F1, their std, alpha) and seconds."""
    scorer = scorer or BlockScorer(bank, protocol)
    rows = []
    for candidate in candidates:
        start = time.perf_counter()
        result = scorer.score(candidate)
        d = bank.Z.shape[2] if bank.Z is not None else bank.basis.shape[0]
        width = d * len(candidate.layers) if candidate.operator == "concat" else d
        rows.append({"candidate": f"{bank.model}:{candidate.name}", "family": candidate.family,
                     "operator": candidate.operator, "layers": list(candidate.layers), "models": [bank.model],
                     "pooling": bank.pooling, "width": width, **result,
                     "seconds": round(time.perf_counter() - start, 5)})
    return rows


def group_of(row: dict[str, Any]) -> dict[str, Any]:
    """A leaderboard row of one model as a head input group (model, pooling, layers, operator)."""
    return {"model": row["models"][0], "pooling": row["pooling"], "layers": list(row["layers"]),
            "operator": row["operator"]}


def score_multi_model(contributions: dict[str, list[tuple[dict[str, Any], torch.Tensor]]], folds,
                      protocol: Protocol) -> list[dict[str, Any]]:
    """Every subset (size >= 2) of models x every choice of each model's contribution, concatenated.

    `contributions[model]` lists (leaderboard row, probe features [N, w]) pairs: the model's best
    layer and its best within-model fusion.
    """
    rows = []
    models = list(contributions)
    for size in range(2, len(models) + 1):
        for subset in itertools.combinations(models, size):
            for choice in itertools.product(*(contributions[m] for m in subset)):
                start = time.perf_counter()
                X = torch.cat([features for _, features in choice], dim=1)
                result = evaluate_features(X, folds, protocol)
                rows.append({"candidate": " + ".join(row["candidate"] for row, _ in choice), "family": "multi-model",
                             "operator": "concat", "layers": [row["layers"] for row, _ in choice],
                             "models": list(subset), "pooling": [row["pooling"] for row, _ in choice],
                             "width": int(sum(row["width"] for row, _ in choice)), **result,
                             "groups": [group_of(row) for row, _ in choice],
                             "seconds": round(time.perf_counter() - start, 5)})
    return rows


def sort_leaderboard(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first; ties go to the narrower, then the simpler candidate."""
    return sorted(rows, key=lambda r: (-r["score"], r["width"], len(str(r["layers"]))))


def aligned(ids_a: np.ndarray, ids_b: np.ndarray) -> bool:
    return len(ids_a) == len(ids_b) and bool(np.all(ids_a == ids_b))
