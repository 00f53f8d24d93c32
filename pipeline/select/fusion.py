"""Fusion search: a declared candidate space, scored exhaustively with the layer-scoring probe.

Within one model (on its best pooling): every single layer, every pair, every contiguous window,
every subset of the top-k layers, the last-N layers (LLMEmbed's recipe: last 5, averaged), under
the operators mean, max and concatenation of per-layer standardised vectors. Across models: every
subset of the selected models, each contributing its best layer or its best within-model fusion,
concatenated (widths differ across models, so mean and max do not apply).

Speed comes from sharing: the projected layers F_l of a LayerBank give, once per fold, the Gram
blocks F_l^T F_m of all layer pairs; the statistics of any mean or concatenation are sums or
selections of those blocks, so such a candidate costs one small eigendecomposition (all folds: see
probe.ridge_weights). Only `max` (and means of many layers, where s^2 blocks cost more than a pass
over the rows) build their features: from the float16 standardised layers kept by the bank.

Public entry points (also used by pipeline/bench): `build_candidates` (the candidate list) and
`score_candidates(bank, candidates, protocol)` / `BlockScorer(bank, protocol).score(candidate)`
on a bank from `pipeline.select.scoring.load_bank(store, pooling, protocol, keep_standardised=True)`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from pipeline.config.sections import FuseSettings
from pipeline.select.probe import (ALPHA_INDEX, PREDICTIONS, FitStats, Protocol, evaluate_features, fit_stats, held_out_labels,
                            single_thread, solve_and_score)
from pipeline.core.records import ChosenFusion, LeaderboardRow, ModelChoice
from pipeline.select.selection import Evidence, annotate, choose, optimism, rank_key
from pipeline.select.scoring import LayerBank, load_bank

OPERATORS = ("mean", "max", "concat")
MEAN_BLOCKS_MAX = 4         # a mean of more layers gets its statistics from its features


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


def fuse_settings(fuse: FuseSettings) -> dict[str, Any]:
    """The search's settings from params.yaml's `fuse:` section (typed and validated by pipeline.config)."""
    return fuse.as_dict()


def build_candidates(num_layers: int, ranking: list[int], top_k: int = 6, last_n: int = 5,
                     operators: Iterable[str] = OPERATORS, wide_max_layers: int = 4) -> list[Candidate]:
    """The within-model candidate space, without duplicates.

    Mean applies to every set; max and concat (whose cost grows with the set: concat's width, max's
    feature pass) to sets of at most `wide_max_layers` layers and to the top-k and last-N sets.
    """
    sets: dict[tuple[int, ...], list[str]] = {}

    def add(layers: Iterable[int], family: str) -> None:
        families = sets.setdefault(tuple(sorted(set(layers))), [])
        if family not in families:
            families.append(family)

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
    add(range(max(num_layers - last_n, 0), num_layers), "last-n")
    operators = [op for op in OPERATORS if op in set(operators)]
    out = []
    for layers, families in sets.items():
        family = "+".join(families)
        if len(layers) == 1:
            out.append(Candidate(layers, "mean", family))
            continue
        wide = len(layers) <= wide_max_layers or "top-k" in families or "last-n" in families
        for op in operators:
            if op == "mean" or wide:
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
        if candidate.operator == "max" and len(idx) > 1:
            Z = self.bank.Z
            if Z is None:
                raise ValueError("the max operator needs a bank loaded with keep_standardised=True")
            Zr = Z[rows]
            top = torch.maximum(Zr[:, idx[0]], Zr[:, idx[1]])                 # float16, exact
            for i in idx[2:]:
                top = torch.maximum(top, Zr[:, i])
            return top.float() @ self.bank.basis
        F = _take(self.bank.F, rows, idx)
        if F.shape[1] == 1:
            return F[:, 0]
        return F.mean(1) if candidate.operator == "mean" else F.reshape(F.shape[0], -1)

    def stats(self, candidate: Candidate) -> FitStats:
        idx = torch.tensor([self.position[layer] for layer in candidate.layers])
        K, _, r, _, _ = self.G.shape
        s = len(idx)
        if s == 1:
            i = int(idx[0])
            return FitStats(self.G[:, i, :, i, :], self.s[:, i], self.XtY[:, i], self.n, self.ysum)
        G = torch.stack([torch.stack([self.G[:, a, :, b, :] for b in idx.tolist()], 2)
                         for a in idx.tolist()], 1)                         # [K, s, r, s, r]
        S, XtY = self.s.index_select(1, idx), self.XtY.index_select(1, idx)
        if candidate.operator == "mean":
            w = 1.0 / s
            return FitStats(G.sum((1, 3)) * w * w, S.sum(1) * w, XtY.sum(1) * w, self.n, self.ysum)
        return FitStats(G.reshape(K, s * r, s * r), S.reshape(K, s * r), XtY.reshape(K, s * r, -1), self.n, self.ysum)

    def score(self, candidate: Candidate) -> dict[str, float]:
        """The probe's score of one candidate (accuracy, macro-F1, their std, alpha)."""
        with single_thread():
            return self._score(candidate)

    def _score(self, candidate: Candidate) -> dict[str, float]:
        folds = self.bank.folds
        X = self.features(candidate)                                       # all probe rows, once
        evals = [X[e] for e in folds.eval_slices()]                         # views
        if self.explicit(candidate):
            return solve_and_score(fit_stats(X, folds), evals, folds, self.protocol)
        return solve_and_score(self.stats(candidate), evals, folds, self.protocol)

    @staticmethod
    def explicit(candidate: Candidate) -> bool:
        """Statistics from the features rather than from Gram blocks: max (not linear in the layers), and
        means of many layers (s^2 blocks cost more than one pass over the rows)."""
        s = len(candidate.layers)
        return s > 1 and (candidate.operator == "max" or (candidate.operator == "mean" and s > MEAN_BLOCKS_MAX))


def _take(A: torch.Tensor, rows: torch.Tensor | slice, idx: list[int]) -> torch.Tensor:
    """A[rows][:, idx] without copying the layers that are not wanted."""
    if isinstance(rows, slice):
        if idx == list(range(idx[0], idx[-1] + 1)):
            return A[rows, idx[0]:idx[-1] + 1]
        return A[rows].index_select(1, torch.tensor(idx))
    return A[rows[:, None], torch.tensor(idx)[None, :]]


def score_candidates(bank: LayerBank, candidates: list[Candidate], protocol: Protocol,
                     scorer: BlockScorer | None = None, evidence: Evidence | None = None) -> list[LeaderboardRow]:
    """Every candidate's probe score (accuracy, macro-F1, their std, alpha) and seconds; `evidence`
    keeps each one's held-out predictions (by candidate name) for paired comparisons."""
    scorer = scorer or BlockScorer(bank, protocol)
    rows = []
    for candidate in candidates:
        start = time.perf_counter()
        result = scorer.score(candidate)
        name = f"{bank.model}:{candidate.name}"
        result = evidence.add(name, result) if evidence is not None else strip_evidence(result)
        d = bank.Z.shape[2] if bank.Z is not None else bank.basis.shape[0]
        width = d * len(candidate.layers) if candidate.operator == "concat" else d
        group = {"model": bank.model, "pooling": bank.pooling, "layers": list(candidate.layers),
                 "operator": candidate.operator}                             # the head's input group
        rows.append(LeaderboardRow(candidate=name, family=candidate.family, operator=candidate.operator,
                                   layers=list(candidate.layers), models=[bank.model], pooling=bank.pooling,
                                   width=width, **result, seconds=round(time.perf_counter() - start, 5),
                                   groups=[group]))
    return rows


def score_multi_model(contributions: dict[str, list[tuple[LeaderboardRow, torch.Tensor]]], folds,
                      protocol: Protocol, evidence: Evidence | None = None) -> list[LeaderboardRow]:
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
                name = " + ".join(row.candidate for row, _ in choice)
                result = evidence.add(name, result) if evidence is not None else strip_evidence(result)
                rows.append(LeaderboardRow(candidate=name, family="multi-model", operator="concat",
                                           layers=[row.layers for row, _ in choice], models=list(subset),
                                           pooling=[row.pooling for row, _ in choice],
                                           width=int(sum(row.width for row, _ in choice)), **result,
                                           seconds=round(time.perf_counter() - start, 5),
                                           groups=[row.groups[0] for row, _ in choice]))
    return rows


def strip_evidence(result: dict[str, Any]) -> dict[str, Any]:
    """A probe result without its held-out predictions (callers that make no paired comparisons)."""
    return {k: v for k, v in result.items() if k not in (PREDICTIONS, ALPHA_INDEX)}


def candidate_key(row: LeaderboardRow) -> str:
    return row.candidate


def sort_leaderboard(rows: list[LeaderboardRow]) -> list[LeaderboardRow]:
    """Best first; ties go to the narrower, then the simpler candidate."""
    return sorted(rows, key=rank_key)


@dataclass
class SearchResult:
    """A dataset's search: what it chose (chosen.json), the whole leaderboard (leaderboard.json), and the
    held-out predictions behind every score (pipeline/select/audit.py compares choices with them; never written)."""
    chosen: ChosenFusion
    leaderboard: list[LeaderboardRow]
    evidence: Evidence


def aligned(ids_a: np.ndarray, ids_b: np.ndarray) -> bool:
    return len(ids_a) == len(ids_b) and bool(np.all(ids_a == ids_b))


def search_dataset(embeddings_root, dataset: str, models: list[str], scores: dict[str, dict[str, Any]],
                   protocol: Protocol, settings: dict[str, Any]) -> SearchResult:
    """The whole search for one dataset: each model's space on its pooling, then across models.

    `scores[model]` is the score stage's output for that model (best pooling and its ScoreRow rows).
    Returns the leaderboard (best first), the chosen fusions with timings, and the evidence.
    """
    from pipeline.store.reader import open_store
    from pipeline.core.errors import StoreMismatchError

    leaderboard, chosen, timing = [], {}, {}
    contributions: dict[str, list[tuple[LeaderboardRow, torch.Tensor]]] = {}
    folds, reference_ids, bytes_read, evidence = None, None, 0, None
    per_model: dict[str, dict[str, tuple[list[LeaderboardRow], str]]] = {}
    rule = protocol.select_rule
    for model in models:
        score = scores[model]
        pooling = score["best_pooling"] if settings["pooling"] == "best" else settings["pooling"]
        ranking = [r.layer for r in sorted((r for r in score["rows"] if r.pooling == pooling), key=lambda r: -r.score)]
        store = open_store(embeddings_root, model, dataset)
        ids = np.concatenate([store.meta(split, "text_id") for split in ("train", "validation") if split in store.splits])
        if reference_ids is not None and not aligned(ids, reference_ids):
            raise StoreMismatchError(f"{model}'s store on {dataset} holds other rows than {models[0]}'s: "
                                     f"re-extract both from the same prepared corpus")
        reference_ids = ids
        start = time.perf_counter()
        bank = load_bank_for(store, pooling, protocol, "max" in settings["operators"], model)
        bytes_read += bank.bytes_read
        load_seconds = time.perf_counter() - start
        if evidence is None:
            evidence = Evidence(held_out_labels(bank.folds), len(store.label_names), protocol.metric,
                                protocol.bootstrap, protocol.seed)
        candidates = build_candidates(store.num_layers, ranking, settings["top_k"], settings["last_n"],
                                      settings["operators"], settings["wide_max_layers"])
        start = time.perf_counter()
        scorer = BlockScorer(bank, protocol)
        blocks_seconds = time.perf_counter() - start
        rows = score_candidates(bank, candidates, protocol, scorer, evidence)
        search_seconds = time.perf_counter() - start
        last_layers = list(range(max(store.num_layers - settings["last_n"], 0), store.num_layers))
        singles = [r for r in rows if len(r.layers) == 1]
        fusions = [r for r in rows if len(r.layers) > 1] or singles
        info = ModelChoice(pooling=pooling, num_layers=store.num_layers, dim=store.dim,
                           decoder=bool(store.attrs["info"].get("decoder")),
                           last=next(r for r in singles if r.layers == [store.num_layers - 1]),
                           best_layer=choose(singles, candidate_key, evidence, rule),
                           best_fusion=choose(fusions, candidate_key, evidence, rule),
                           llmembed=next(r for r in rows if r.layers == last_layers and r.operator == "mean"))
        per_model[model] = {"best layer": (singles, rule), "best fusion": (fusions, rule)}
        chosen[model] = info
        by_name = {c.name: c for c in candidates}
        contributions[model] = []
        for pick in (info.best_layer, info.best_fusion):
            candidate = by_name[pick.candidate.split(":", 1)[1]]
            if not any(r is pick for r, _ in contributions[model]):
                contributions[model].append((pick, scorer.features(candidate)))
        folds = bank.folds
        timing[model] = {"candidates": len(rows), "load_seconds": round(load_seconds, 3),
                         "blocks_seconds": round(blocks_seconds, 3), "search_seconds": round(search_seconds, 3),
                         "candidates_per_s": round(len(rows) / max(search_seconds, 1e-9), 1)}
        leaderboard += rows
        del bank, scorer
    multi = (score_multi_model(contributions, folds, protocol, evidence)
             if settings["multi_model"] and len(models) > 1 else [])
    leaderboard = sort_leaderboard(leaderboard + multi)
    strongest = max(models, key=lambda m: chosen[m].last.score)
    references = {m: chosen[m].last.candidate for m in models}
    annotate(leaderboard, candidate_key, evidence,
             lambda row: references[row.models[0]] if len(row.models) == 1 else references[strongest],
             leaderboard[0])
    best_multi = choose(multi, candidate_key, evidence, rule) if multi else None
    overall = choose(leaderboard, candidate_key, evidence, rule)
    selections = {"overall": (leaderboard, rule), **({"multi-model": (multi, rule)} if multi else {}),
                  **{f"overall ({other})": (leaderboard, other) for other in ("best", "one_se") if other != rule},
                  **{f"{m}: {label}": pair for m, sets in per_model.items() for label, pair in sets.items()}}
    drops = optimism(selections, candidate_key, evidence, seed=protocol.seed)   # one pass of halvings for all
    for model, sets in per_model.items():
        chosen[model].optimism = {label: drops.pop(f"{model}: {label}") for label in sets}
    result = ChosenFusion(dataset=dataset, metric=protocol.metric, protocol=protocol.name, select_rule=rule,
                          reference={"models": references, "multi-model": references[strongest]}, models=chosen,
                          best_multi=best_multi, chosen=overall, leader=leaderboard[0], optimism=drops, timing=timing,
                          bytes_read=bytes_read)
    return SearchResult(result, leaderboard, evidence)


def load_bank_for(store, pooling: str, protocol: Protocol, keep_standardised: bool, model: str) -> LayerBank:
    return load_bank(store, pooling, protocol, keep_standardised=keep_standardised, model=model)
