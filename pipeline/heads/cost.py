"""What a configuration costs at predict time, in seconds per 1,000 texts, from per-model cost curves.

A configuration reads some layers of some models; predict runs each of those models once, stopped after the
deepest layer it reads (pipeline/heads/predict.py). Its cost is therefore the sum, over its models, of one forward pass
to that depth, read off a line fitted to the model's timings at a few depths (pipeline/heads/predict_timing.py): every
block of a model costs about the same. Plain arithmetic, so the report can use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fit_curve(depths: list[int], seconds: list[float]) -> dict[str, float]:
    """A fixed part (tokenising and the embeddings: the timing at depth 0) plus a cost per block, the
    least-squares slope through the other timings. A line rather than point-to-point interpolation, so one noisy
    timing moves every estimate a little rather than some a lot."""
    depths_, seconds_ = np.asarray(depths, float), np.asarray(seconds, float)
    fixed = float(seconds_[depths_ == 0].mean()) if (depths_ == 0).any() else 0.0
    blocks = depths_ > 0
    per_block = float(np.sum(depths_[blocks] * (seconds_[blocks] - fixed)) / np.sum(depths_[blocks] ** 2))
    return {"fixed": round(fixed, 4), "per_block": round(max(per_block, 0.0), 4)}


def model_seconds(curve: dict[str, Any], depth: int) -> float:
    """A forward pass stopped after `depth`, on the model's fitted line."""
    return curve["fixed"] + curve["per_block"] * depth


def deepest_layers(groups: list[dict[str, Any]]) -> dict[str, int]:
    """The deepest layer each model of a configuration reads: where its forward pass can stop."""
    deepest: dict[str, int] = {}
    for group in groups:
        deepest[group["model"]] = max(deepest.get(group["model"], 0), max(int(l) for l in group["layers"]))
    return deepest


def estimate_seconds(groups: list[dict[str, Any]], curves: dict[str, dict[str, Any]]) -> float:
    """Seconds per 1,000 texts of a configuration: one pass per model it reads, to its deepest layer."""
    return round(sum(model_seconds(curves[model], depth) for model, depth in deepest_layers(groups).items()), 4)


def pareto_front(costs: list[float], scores: list[float]) -> list[int]:
    """Indices of the configurations no other one beats on both counts (at most the cost and at least the
    score, better on one), cheapest first."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i]))
    front, best = [], -np.inf
    for i in order:
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return front


def cheapest_within_one_se(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The cheapest configuration whose probe score is within one paired standard error of the top (the fuse
    stage's `within_one_se`); on a tie in cost, the higher score."""
    close = [row for row in rows if row["within_one_se"]]
    return min(close, key=lambda row: (row["seconds_per_1000"], -row["score"]))
