"""Choosing among probe candidates without chasing noise.

Every probe score comes with its held-out predictions (pipeline/select/probe.py: validation rows, or under
CV every train row's out-of-fold prediction), so candidates scored on the same rows compare pairwise:
a paired bootstrap over those rows (the same resamples for both) gives each difference a standard
error and a 95% percentile interval (Dror et al. 2018; Efron & Tibshirani 1993).

Rules: `best` takes the top score. `one_se` (Breiman et al. 1984's one-standard-error rule) takes the
simplest candidate whose score is within one paired standard error of the top: fewest layers, then
fewest models, then the narrowest input, then the higher score (so among single layers it is `best`:
depth is not complexity, and preferring shallow layers within the noise measured worse on test).

`optimism` says how much a choice's score drops on rows that were not used to make it: choose (alpha
and candidate) on one stratified half of the scoring rows, score the choice on the other half, both
ways round, over several seeded splits.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Any, Callable, Hashable, TypeVar

import numpy as np
import torch

from pipeline.select.probe import (ALPHA_INDEX, PREDICTIONS, accuracy_f1, resampled_metric, single_thread,
                                   stratified_folds)
from pipeline.core.records import LeaderboardRow, ScoreRow

RULES = ("best", "one_se")
C = TypeVar("C", ScoreRow, LeaderboardRow)   # rows the rules choose among: a layer, or a fusion candidate


def one_thread(function):
    """Many small tensor ops: intra-op threads only wait on each other (10x slower on a busy 2-core machine)."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with single_thread():
            return function(*args, **kwargs)
    return wrapped


def bootstrap_counts(n: int, resamples: int, seed: int) -> torch.Tensor:
    """[resamples, n] row counts of seeded bootstrap resamples of n rows."""
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.multinomial(n, np.full(n, 1.0 / n), size=resamples), dtype=torch.float32)


@dataclass(frozen=True)
class Comparison:
    """metric(a) - metric(b) on the same rows, its paired bootstrap standard error and 95% interval."""
    diff: float
    se: float
    low: float
    high: float

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {prefix: round(self.diff, 5), f"{prefix}_se": round(self.se, 5),
                f"{prefix}_low": round(self.low, 5), f"{prefix}_high": round(self.high, 5)}


class Evidence:
    """Held-out predictions of many candidates on the same rows, and shared bootstrap resamples."""

    def __init__(self, y: torch.Tensor, num_classes: int, metric: str, resamples: int = 1000, seed: int = 0):
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.num_classes, self.metric = num_classes, metric
        self.resamples, self.seed = max(int(resamples), 100), seed
        self.counts = bootstrap_counts(len(self.y), self.resamples, seed)
        self.predictions: dict[Hashable, torch.Tensor] = {}     # key -> [alphas, rows]
        self.alpha: dict[Hashable, int] = {}
        self._samples: dict[Hashable, torch.Tensor] = {}
        self._values: dict[Hashable, float] = {}

    def add(self, key: Hashable, result: dict[str, Any]) -> dict[str, Any]:
        """Take a probe result's predictions (popped: they never reach JSON); returns the result."""
        predictions = result.pop(PREDICTIONS)
        if predictions.shape[1] != len(self.y):
            raise ValueError(f"{key}: predictions for {predictions.shape[1]} rows, evidence holds {len(self.y)}")
        self.predictions[key], self.alpha[key] = predictions, int(result.pop(ALPHA_INDEX))
        return result

    def pred(self, key: Hashable) -> torch.Tensor:
        return self.predictions[key][self.alpha[key]].long()

    def value(self, key: Hashable) -> float:
        if key not in self._values:
            acc, f1 = accuracy_f1(self.pred(key), self.y, self.num_classes)
            self._values[key] = float(acc if self.metric == "accuracy" else f1)
        return self._values[key]

    def samples(self, key: Hashable) -> torch.Tensor:
        if key not in self._samples:
            self._samples[key] = resampled_metric(self.pred(key), self.y, self.counts, self.num_classes, self.metric)
        return self._samples[key]

    def se(self, a: Hashable, b: Hashable) -> float:
        """The paired bootstrap standard error of metric(a) - metric(b)."""
        return 0.0 if a == b else float((self.samples(a) - self.samples(b)).std())

    def compare(self, a: Hashable, b: Hashable) -> Comparison:
        if a == b:
            return Comparison(0.0, 0.0, 0.0, 0.0)
        d = self.samples(a) - self.samples(b)
        low, high = torch.quantile(d, torch.tensor([0.025, 0.975])).tolist()
        return Comparison(self.value(a) - self.value(b), float(d.std()), low, high)

    def restricted(self, rows: np.ndarray, seed: int) -> "Evidence":
        """The same candidates on a subset of rows, each with its alpha chosen again on those rows only."""
        sub = Evidence(self.y[rows], self.num_classes, self.metric, self.resamples, seed)
        index = torch.as_tensor(rows)
        for key, predictions in self.predictions.items():
            part = predictions[:, index].long()
            acc, f1 = accuracy_f1(part, sub.y, self.num_classes)               # [alphas]
            sub.predictions[key] = part
            sub.alpha[key] = int(torch.argmax(acc if self.metric == "accuracy" else f1))
        return sub


def rank_key(row: C, score: Callable[[C], float] | None = None) -> tuple:
    """Best first; ties go to the narrower, then the simpler row (the leader of `choose` and the top of
    the leaderboard are one and the same)."""
    return -(score(row) if score else row.score), row.width, len(str(row.layers))


def simplicity(row: C) -> tuple:
    """Sort key of the one-SE rule: fewer layers, fewer models, narrower, then the shallowest deepest layer
    (predict stops after it, so fewer blocks run), then better."""
    layers = row.layers
    flat = [l for part in layers for l in part] if layers and isinstance(layers[0], list) else list(layers)
    return len(flat), len(row.models), row.width, max(flat, default=0), -row.score


@one_thread
def choose(rows: list[C], key: Callable[[C], Hashable], evidence: Evidence,
           rule: str, score: Callable[[C], float] | None = None) -> C:
    """The row the rule picks. `score` defaults to the row's probe score; the paired standard error to
    the leader decides who is within reach of it."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; rules are {list(RULES)}")
    score = score or (lambda row: row.score)
    leader = min(rows, key=lambda r: rank_key(r, score))
    if rule == "best":
        return leader
    top = score(leader)
    within = [r for r in rows if top - score(r) <= evidence.se(key(leader), key(r))]
    return min(within, key=simplicity)


@one_thread
def annotate(rows: list[C], key: Callable[[C], Hashable], evidence: Evidence,
             reference: Callable[[C], Hashable], leader: C) -> None:
    """Fill in each row's paired difference to its reference (with 95% interval) and to the leader."""
    for row in rows:
        for name, value in {**evidence.compare(key(row), reference(row)).as_dict("vs_reference"),
                            **evidence.compare(key(row), key(leader)).as_dict("vs_leader")}.items():
            setattr(row, name, value)
        row.within_one_se = bool(-row.vs_leader <= row.vs_leader_se)


def stratified_halves(y: torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two seeded halves of the rows (sorted indices), each class split evenly."""
    fold_of = stratified_folds(y.numpy(), 2, np.random.default_rng(seed))
    return np.flatnonzero(fold_of == 0), np.flatnonzero(fold_of == 1)


@one_thread
def optimism(selections: dict[str, tuple[list[C], str]], key: Callable[[C], Hashable],
             evidence: Evidence, splits: int = 5, seed: int = 0) -> dict[str, dict[str, Any]]:
    """For each named selection (its candidate rows, its rule): the mean score of the choice on the half of
    the rows that chose it, on the fresh half, and the drop, over `splits` seeded halvings both ways round."""
    scores = {name: ([], []) for name in selections}
    for split in range(splits):
        halves = stratified_halves(evidence.y, seed + split)
        for a, b in (halves, halves[::-1]):
            on_a, fresh_rows = evidence.restricted(a, seed + 100 + split), torch.as_tensor(b)
            for name, (rows, rule) in selections.items():
                pick = key(choose(rows, key, on_a, rule, score=lambda row: on_a.value(key(row))))
                fresh = evidence.predictions[pick][on_a.alpha[pick]][fresh_rows].long()   # a's alpha, on b
                acc, f1 = accuracy_f1(fresh, evidence.y[fresh_rows], evidence.num_classes)
                scores[name][0].append(on_a.value(pick))
                scores[name][1].append(float(acc if evidence.metric == "accuracy" else f1))
    out = {}
    for name, (chosen, fresh) in scores.items():
        drops = np.array(chosen) - np.array(fresh)
        out[name] = {"rule": selections[name][1], "splits": splits, "score_choosing_half": round(float(np.mean(chosen)), 5),
                     "score_fresh_half": round(float(np.mean(fresh)), 5), "drop": round(float(drops.mean()), 5),
                     "drop_std": round(float(drops.std()), 5)}
    return out
