"""Predict cost arithmetic (pipeline/heads/cost.py), each against a computation written out here: the fitted line
against numpy's least squares, the Pareto front against the brute-force definition, a configuration's cost
against its per-model sum by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.heads.cost import cheapest_within_one_se, deepest_layers, estimate_seconds, fit_curve, pareto_front


def test_the_fitted_line_keeps_the_depth0_timing_and_is_least_squares_through_the_others():
    rng = np.random.default_rng(0)
    depths = np.array([0, 10, 20, 30])
    seconds = 0.4 + 0.9 * depths + rng.normal(0, 0.5, size=4)
    fit = fit_curve(depths.tolist(), seconds.tolist())
    # independent: lstsq of (seconds - seconds[0]) on depth, no intercept, over depths > 0
    slope, *_ = np.linalg.lstsq(depths[1:, None].astype(float), seconds[1:] - seconds[0], rcond=None)
    assert fit["fixed"] == pytest.approx(seconds[0], abs=1e-4)
    assert fit["per_block"] == pytest.approx(slope[0], abs=1e-4)
    assert fit["per_block"] == pytest.approx(0.9, abs=0.05)         # noise of 0.5 s over 30 blocks


def test_a_configuration_costs_one_pass_per_model_to_its_deepest_layer():
    curves = {"a": {"fixed": 0.5, "per_block": 1.0}, "b": {"fixed": 0.2, "per_block": 0.1}}
    groups = [{"model": "a", "layers": [3, 7]}, {"model": "b", "layers": [2]}, {"model": "a", "layers": [5]}]
    assert deepest_layers(groups) == {"a": 7, "b": 2}
    assert estimate_seconds(groups, curves) == pytest.approx((0.5 + 7 * 1.0) + (0.2 + 2 * 0.1))
    assert estimate_seconds([{"model": "b", "layers": [0]}], curves) == pytest.approx(0.2)   # embeddings only


def test_the_pareto_front_is_exactly_the_undominated_configurations():
    rng = np.random.default_rng(1)
    for _ in range(20):
        costs, scores = rng.uniform(0, 10, 60).tolist(), rng.uniform(0.5, 0.9, 60).tolist()
        brute = {i for i in range(60) if not any(
            costs[j] <= costs[i] and scores[j] >= scores[i] and (costs[j] < costs[i] or scores[j] > scores[i])
            for j in range(60))}
        front = pareto_front(costs, scores)
        assert set(front) == brute
        assert [costs[i] for i in front] == sorted(costs[i] for i in front)      # cheapest first


def test_the_cheapest_within_one_se_ignores_cheaper_rows_outside_it():
    rows = [{"candidate": "top", "score": 0.85, "within_one_se": True, "seconds_per_1000": 9.0},
            {"candidate": "close", "score": 0.84, "within_one_se": True, "seconds_per_1000": 4.0},
            {"candidate": "close, dearer", "score": 0.845, "within_one_se": True, "seconds_per_1000": 6.0},
            {"candidate": "cheap, worse", "score": 0.70, "within_one_se": False, "seconds_per_1000": 0.5}]
    assert cheapest_within_one_se(rows)["candidate"] == "close"
