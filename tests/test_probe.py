"""The closed-form probe against a textbook solve, its protocols, and layer scoring on real Zarr stores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _stage2_store import make_store, remove_test_split
from pipeline.select.probe import Protocol, evaluate_features, make_folds, metrics
from pipeline.core.records import ScoreRow, scores_from_json, as_json
from pipeline.select.scoring import score_layers
from pipeline.store.reader import open_store


def test_ridge_matches_a_direct_solve():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 12)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(np.int64)
    protocol = Protocol(name="validation", alphas=(0.1,), bootstrap=0)
    folds = make_folds(y[:200], y[200:], protocol, 2)
    result = evaluate_features(torch.from_numpy(X), folds, protocol)
    # textbook ridge with intercept on one-hot targets, same penalty
    Xf, Yf = X[:200].astype(np.float64), np.eye(2)[y[:200]]
    mu, ymu = Xf.mean(0), Yf.mean(0)
    G = (Xf - mu).T @ (Xf - mu)
    lam = 0.1 * np.trace(G) / G.shape[0]
    W = np.linalg.solve(G + lam * np.eye(12), (Xf - mu).T @ (Yf - ymu))
    pred = ((X[200:] - mu) @ W + ymu).argmax(1)
    assert result["accuracy"] == pytest.approx(metrics(pred, y[200:], 2)["accuracy"])
    assert result["accuracy"] > 0.8


def test_cv_folds_partition_train_and_are_stratified():
    y = np.array([0] * 50 + [1] * 30)
    folds = make_folds(y, None, Protocol(name="cv", folds=5), 2)
    rows = torch.cat(folds.eval).sort().values
    assert torch.equal(rows, torch.arange(80))
    for fit, held in zip(folds.fit, folds.eval):
        assert len(set(fit.tolist()) & set(held.tolist())) == 0
        assert abs(int((folds.y[held] == 1).sum()) - 6) <= 1


def test_scores_find_the_planted_layer_and_never_read_test(tmp_path):
    path = make_store(tmp_path, "toy-enc", best_layer=2)
    remove_test_split(path)
    store = open_store(tmp_path / "embeddings", "toy-enc", "toy")
    with pytest.raises(Exception):
        store.layer("test", "mean", 0)
    for protocol in (Protocol(name="validation", rank=8), Protocol(name="cv", folds=4, rank=8)):
        result = score_layers(store, protocol, "toy-enc")
        assert result["best"].layer == 2, result["ranking"]
        assert result["splits_read"] == (["train", "validation"] if protocol.name == "validation" else ["train"])
        assert len(result["rows"]) == 2 * 6 and all(isinstance(r, ScoreRow) for r in result["rows"])
        assert result["best"].score > result["last"].score
        assert 0 < result["best"].std < 0.2
        assert scores_from_json(json.loads(json.dumps(as_json(result))), "scores.json") == result


def test_cv_solver_matches_a_direct_solve_per_fold():
    """All folds and alphas from one preconditioned solve equal the textbook per-fold ridge."""
    from pipeline.select.probe import ridge_weights
    rng = np.random.default_rng(1)
    K, n, w = 4, 400, 24
    X = rng.normal(size=(K, n, w)) @ rng.normal(size=(w, w)) * np.logspace(0, 2, w)   # ill-conditioned
    Y = rng.normal(size=(K, n, 3))
    G = np.einsum("kni,knj->kij", X, X)
    B = np.einsum("kni,knc->kic", X, Y)
    lam = np.array([1e-3, 1e-1, 1.0])[None, :] * np.trace(G, axis1=1, axis2=2)[:, None] / w
    W = ridge_weights(torch.tensor(G, dtype=torch.float32), torch.tensor(B, dtype=torch.float32),
                      torch.tensor(lam, dtype=torch.float32)).double().numpy()
    for k in range(K):
        for a in range(3):
            direct = np.linalg.solve(G[k] + lam[k, a] * np.eye(w), B[k])
            assert np.abs(W[k, :, a] - direct).max() <= 1e-3 * np.abs(direct).max()
