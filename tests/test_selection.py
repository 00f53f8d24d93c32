"""Selection with uncertainty and test-set significance, against hand computations, and the one-SE
rule on a store with a planted near-tie."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from pipeline.select.probe import Protocol, resampled_metric
from pipeline.core.records import LeaderboardRow
from pipeline.select.scoring import score_layers
from pipeline.select.selection import Evidence, choose, stratified_halves
from pipeline.select.significance import TestRows, add_test_uncertainty
from pipeline.store.reader import EmbeddingStore
from pipeline.store.writer import SplitRows, StoreWriter

Y = np.array([0, 0, 1, 1, 2, 2, 0, 1])
A = np.array([0, 1, 1, 1, 2, 0, 0, 1])      # 6 of 8 right
B = np.array([0, 0, 1, 0, 2, 2, 1, 1])      # 6 of 8 right, different rows
COUNTS = np.array([[1, 1, 1, 1, 1, 1, 1, 1], [2, 0, 0, 3, 1, 0, 2, 0], [0, 0, 4, 0, 0, 2, 1, 1]], np.float32)


def test_resampled_accuracy_and_macro_f1_match_a_hand_computation():
    counts = torch.from_numpy(COUNTS)
    acc = resampled_metric(torch.from_numpy(A), torch.from_numpy(Y), counts, 3, "accuracy")
    f1 = resampled_metric(torch.from_numpy(A), torch.from_numpy(Y), counts, 3, "macro_f1")
    for b, weights in enumerate(COUNTS):
        rows = np.repeat(np.arange(8), weights.astype(int))          # the resample, written out
        assert acc[b] == pytest.approx(np.mean(A[rows] == Y[rows]))
        assert f1[b] == pytest.approx(f1_score(Y[rows], A[rows], average="macro", labels=[0, 1, 2],
                                               zero_division=0))


def test_paired_comparison_is_the_bootstrap_of_the_difference():
    evidence = Evidence(torch.from_numpy(Y), 3, "accuracy", resamples=100, seed=0)
    for key, pred in (("a", A), ("b", B)):
        evidence.add(key, {"_predictions": torch.as_tensor(np.stack([pred, 1 - pred % 2])), "_alpha_index": 0})
    comparison = evidence.compare("a", "b")
    hand = []
    for weights in evidence.counts.numpy():
        rows = np.repeat(np.arange(8), weights.astype(int))
        hand.append(np.mean(A[rows] == Y[rows]) - np.mean(B[rows] == Y[rows]))
    assert comparison.diff == pytest.approx(0.0)
    assert comparison.se == pytest.approx(np.std(hand, ddof=1), rel=1e-5)
    assert comparison.low == pytest.approx(np.quantile(hand, 0.025), abs=1e-6)
    assert comparison.high == pytest.approx(np.quantile(hand, 0.975), abs=1e-6)
    assert comparison.se > 0 and evidence.compare("a", "a").se == 0


def test_test_intervals_and_paired_p_value_match_a_hand_computation():
    rows = TestRows(Y, 3, resamples=500, seed=3)
    seeds_a, seeds_b = np.stack([A, A]), np.stack([B, Y])           # b's second seed is perfect
    interval = rows.interval(seeds_a)
    hand = [np.mean(A[r] == Y[r]) for r in (np.repeat(np.arange(8), w.astype(int)) for w in rows.counts.numpy())]
    assert interval["test_accuracy_low"] == pytest.approx(np.quantile(hand, 0.025), abs=1e-5)
    assert interval["test_accuracy_high"] == pytest.approx(np.quantile(hand, 0.975), abs=1e-5)
    test = rows.paired(seeds_a, seeds_b)
    observed = np.mean(A == Y) - (np.mean(B == Y) + 1.0) / 2
    diffs = []
    for w in rows.counts.numpy():
        r = np.repeat(np.arange(8), w.astype(int))
        diffs.append(np.mean(A[r] == Y[r]) - (np.mean(B[r] == Y[r]) + 1.0) / 2)
    diffs = np.array(diffs)
    assert test["diff"] == pytest.approx(observed, abs=1e-5)
    assert test["p_value"] == pytest.approx(np.mean(np.abs(diffs - observed) >= abs(observed)), abs=1e-4)
    assert test["significant"] == (test["p_value"] < 0.05)


def test_a_large_gap_is_significant_and_a_tiny_one_is_not():
    rng = np.random.default_rng(0)
    y = rng.integers(2, size=1000)
    good = np.where(rng.random(1000) < 0.9, y, 1 - y)
    close = good.copy()                               # 12 rows disagree, 7 to 5: a 0.2-point gap
    flips = np.concatenate([np.flatnonzero(good == y)[:7], np.flatnonzero(good != y)[:5]])
    close[flips] = 1 - close[flips]
    bad = np.where(rng.random(1000) < 0.6, y, 1 - y)
    rows = TestRows(y, 2, resamples=1000, seed=0)
    assert rows.paired(good[None], bad[None])["significant"]
    assert rows.paired(good[None], close[None])["diff"] == pytest.approx(0.002)
    assert not rows.paired(good[None], close[None])["significant"]


def test_halves_are_stratified_disjoint_and_cover_every_row():
    y = torch.as_tensor(np.repeat([0, 1, 2], [10, 7, 4]))
    a, b = stratified_halves(y, seed=1)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(21))
    counts = [(int((y[a] == c).sum()), int((y[b] == c).sum())) for c in range(3)]
    assert counts[0] == (5, 5) and counts[2] == (2, 2) and sorted(counts[1]) == [3, 4]   # within one row
    assert stratified_halves(y, seed=1)[0].tolist() == a.tolist() and stratified_halves(y, seed=2)[0].tolist() != a.tolist()


def planted_store(root: Path) -> Path:
    """Layers 4 and 1 carry the label nearly as strongly, each with its own noise (a near-tie); layer 2 is
    clearly worse; the rest is noise."""
    path = root / "embeddings" / "tie" / "toy"
    writer = StoreWriter(path, {"dataset": {"name": "tie", "label_names": ["a", "b"]}, "model": {"name": "toy"}},
                         {"decoder": False}, num_layers=6, dim=8, poolings=["mean"], block_rows=1024,
                         dtype="float32", compressor={"codec": "none"})
    rng = np.random.default_rng(7)
    for split, n in (("train", 600), ("validation", 400), ("test", 100)):
        y = rng.integers(2, size=n).astype(np.int32)
        writer.init_split(split, SplitRows(labels=y, text_id=np.array([f"{split}{i}" for i in range(n)]),
                                           source_index=np.arange(n), token_count=np.full(n, 3, np.int32),
                                           truncated=np.zeros(n, bool)), [])
        x = rng.normal(size=(n, 6, 8)).astype(np.float32)
        signal = (2 * y - 1)[:, None].astype(np.float32)
        x[:, 4, :2] += 0.9 * signal
        x[:, 1, :2] += 0.85 * signal                   # as strong, nearly, with its own noise
        x[:, 2, :2] += 0.3 * signal
        writer.write_block(split, 0, {"mean": x})
    return path


def test_one_se_on_a_store_with_a_planted_near_tie(tmp_path):
    """Layers 1 and 4 nearly tie; fusions of them tie with each other. `best` takes the top of each list;
    `one_se` takes, among the candidates within one paired SE of the top, the simplest."""
    from pipeline.config.sections import FuseSettings
    from pipeline.select.fusion import candidate_key, fuse_settings, search_dataset
    from pipeline.select.selection import simplicity
    path = planted_store(tmp_path)
    results = {}
    for rule in ("best", "one_se"):
        protocol = Protocol(name="validation", rank=0, bootstrap=500, select_rule=rule)
        scores = {"toy": score_layers(EmbeddingStore(path), protocol, "toy")}
        results[rule] = (scores["toy"], search_dataset(tmp_path / "embeddings", "tie", ["toy"], scores, protocol,
                                                       fuse_settings(FuseSettings(top_k=3))))
    layers, search = results["one_se"]
    rows = {r.layer: r for r in layers["rows"]}
    assert rows[1].within_one_se and rows[4].within_one_se                            # the planted near-tie
    assert not rows[2].within_one_se and not rows[0].within_one_se
    assert results["best"][0]["chosen"].layer == layers["best"].layer
    assert layers["chosen"].layer == 1            # one_se: of the near-tie, the shallower layer (fewer blocks)
    assert rows[4].vs_reference_low > 0                                              # beats the last layer (5)
    board = search.leaderboard
    leader, pick = board[0], search.chosen.chosen
    assert results["best"][1].chosen.chosen.candidate == leader.candidate
    within = [r for r in board if r.within_one_se]
    assert pick in within and simplicity(pick) == min(simplicity(r) for r in within)
    assert len(within) > 1 and simplicity(pick) < simplicity(leader)                 # a simpler near-tie exists
    best_half, se_half = search.chosen.optimism["overall (best)"], search.chosen.optimism["overall"]
    assert best_half["score_choosing_half"] >= se_half["score_choosing_half"]      # best maximises that half
    assert best_half["drop"] == pytest.approx(best_half["score_choosing_half"] - best_half["score_fresh_half"], abs=2e-5)


def board_row(name: str, score: float, layers: list[int], model: str = "m", alpha: float = 1.0) -> LeaderboardRow:
    """A leaderboard row of one model's mean pooling with the given score (other probe figures zero)."""
    return LeaderboardRow(candidate=name, family="single", operator="mean", layers=layers, models=[model],
                          pooling="mean", width=8 * len(layers), accuracy=score, accuracy_std=0.0, macro_f1=score,
                          macro_f1_std=0.0, alpha=alpha, score=score, std=0.0, seconds=0.0,
                          groups=[{"model": model, "pooling": "mean", "layers": layers, "operator": "mean"}])


def test_one_se_takes_the_simpler_candidate_within_one_paired_se():
    """Planted predictions with designed margins: a 2-layer leader at 80%, a single layer at 79% that
    disagrees with it on 20% of rows (paired SE ~1.4 points: within), a single layer at 70% (outside)."""
    y = torch.zeros(1000, dtype=torch.long)
    leader = torch.zeros(1000, dtype=torch.long)
    leader[:200] = 1                                           # 80% right
    near = torch.zeros(1000, dtype=torch.long)
    near[100:310] = 1                                          # 79% right, 210 rows differ from the leader
    weak = torch.zeros(1000, dtype=torch.long)
    weak[:300] = 1                                             # 70% right
    evidence = Evidence(y, 2, "accuracy", resamples=1000, seed=0)
    rows = []
    for name, pred, layers in (("pair", leader, [1, 4]), ("near", near, [4]), ("weak", weak, [2])):
        evidence.add(name, {"_predictions": pred[None].to(torch.int16), "_alpha_index": 0})
        rows.append(board_row(name, evidence.value(name), layers))
    key = lambda r: r.candidate                                # noqa: E731
    assert evidence.se("pair", "near") == pytest.approx(0.0145, abs=0.002)
    assert choose(rows, key, evidence, "best").candidate == "pair"
    assert choose(rows, key, evidence, "one_se").candidate == "near"
    assert choose([rows[0], rows[2]], key, evidence, "one_se").candidate == "pair"      # 10 points: outside


def test_one_se_breaks_ties_by_the_shallowest_deepest_layer():
    """Two single layers of the same width within one SE of a pair: the shallower one costs fewer blocks."""
    y = torch.zeros(1000, dtype=torch.long)
    leader, deep, shallow = (torch.zeros(1000, dtype=torch.long) for _ in range(3))
    leader[:200] = 1                                           # 80% right
    deep[100:305] = 1                                          # 79.5%, within one SE of the leader
    shallow[120:330] = 1                                       # 79%, within too, and lower than `deep`
    evidence = Evidence(y, 2, "accuracy", resamples=1000, seed=0)
    rows = []
    for name, pred, layers in (("pair", leader, [1, 4]), ("deep", deep, [5]), ("shallow", shallow, [2])):
        evidence.add(name, {"_predictions": pred[None].to(torch.int16), "_alpha_index": 0})
        rows.append(board_row(name, evidence.value(name), layers))
    assert choose(rows, lambda r: r.candidate, evidence, "one_se").candidate == "shallow"


def test_choose_refuses_an_unknown_rule():
    evidence = Evidence(torch.from_numpy(Y), 3, "accuracy")
    with pytest.raises(ValueError, match="unknown selection rule"):
        choose([board_row("k", 1.0, [0])], lambda r: "k", evidence, "median")


def test_multi_model_rows_are_tested_against_the_best_single_model():
    y = np.array([0, 1] * 50)
    results, predictions = [], {}
    rng = np.random.default_rng(0)
    for model, accuracy in (("m1", 0.6), ("m2", 0.7)):
        for kind, label in (("last", "last layer"), ("best_layer", "best single layer")):
            row = f"{model}: {label}"
            results.append({"row": row, "kind": kind, "head": "linear", "groups": [{"model": model}],
                            "validation_accuracy": accuracy + (0.01 if kind == "best_layer" else 0)})
            predictions[(row, "linear")] = np.where(rng.random((2, 100)) < accuracy, y, 1 - y)
    results.append({"row": "multi-model: best fusion", "kind": "best_multi", "head": "linear",
                    "groups": [{"model": "m1"}, {"model": "m2"}], "validation_accuracy": 0.9})
    predictions[("multi-model: best fusion", "linear")] = np.stack([y, y])
    add_test_uncertainty(results, predictions, TestRows(y, 2, resamples=300))
    multi = results[-1]["paired_tests"]
    assert multi["best single model"]["against"] == "m2: best single layer (linear)"
    assert multi["last layer"]["against"] == "m2: last layer (linear)" and multi["best single model"]["significant"]
    assert "last layer" not in results[0]["paired_tests"] and "best single layer" in results[0]["paired_tests"]
    assert results[-1]["test_accuracy_low"] == results[-1]["test_accuracy_high"] == 1.0


def test_the_audit_judges_both_protocols_and_rules_on_test(tmp_path):
    from _stage2_store import make_store
    from pipeline.select.audit import PROTOCOLS, TestJudge, audit_dataset, summarise_audits
    from pipeline.config.sections import FuseSettings
    from pipeline.select.fusion import fuse_settings
    from pipeline.select.probe import evaluate_features, make_folds
    from pipeline.store.reader import open_store
    make_store(tmp_path, "enc-a", num_layers=5, best_layer=4, signal_dims=slice(0, 2), seed=1)
    make_store(tmp_path, "dec-b", num_layers=7, best_layer=3, signal_dims=slice(2, 4), seed=2, decoder=True)
    protocol = Protocol(rank=8, folds=3)
    audit = audit_dataset(tmp_path / "embeddings", "toy", ["enc-a", "dec-b"], protocol, fuse_settings(FuseSettings(top_k=3)))
    assert set(audit["protocols"]) == set(PROTOCOLS)
    for name, result in audit["protocols"].items():
        for rule in ("best", "one_se"):
            picks = result["choices"][rule]
            assert set(picks) == {"enc-a: best layer", "enc-a: best fusion", "dec-b: best layer", "dec-b: best fusion",
                                  "multi-model", "overall"}
            for label, pick in picks.items():
                assert result["regret"][rule][label] == pytest.approx(result["top_test_accuracy"][label]
                                                                      - pick["test_accuracy"], abs=1e-4)
        assert len(result["layers"]["dec-b"]["test_by_layer"]) == 7
    # the judge's test score of a single layer is the probe fitted on train and scored on test, by hand
    store = open_store(tmp_path / "embeddings", "enc-a", "toy")
    judge = TestJudge(tmp_path / "embeddings", "toy", protocol)
    row = board_row("enc-a:L4", 0.0, [4], model="enc-a")
    bank, _ = judge._scorer("enc-a", "mean")
    folds = make_folds(store.labels("train"), store.labels("test"), dataclasses.replace(protocol, name="validation"), 2)
    assert torch.equal(bank.folds.y, folds.y)
    by_hand = evaluate_features(bank.F[:, 4], folds, dataclasses.replace(protocol, name="validation", alphas=(1.0,)))
    assert judge.score(row)["test_accuracy"] == pytest.approx(by_hand["accuracy"], abs=1e-5)
    summary = summarise_audits([audit])
    assert len(summary["table"]) == 4 and summary["winner"] in summary["table"].values()


def test_the_audit_keeps_the_alpha_chosen_on_validation(tmp_path):
    """Where the ridge penalty that scores best on test differs from the one validation chose, the audit's
    test figure is the validation alpha's: the judge refits on train with it and only scores test."""
    from _stage2_store import make_store
    from pipeline.select.audit import TestJudge
    from pipeline.select.probe import evaluate_features
    from pipeline.store.reader import open_store
    make_store(tmp_path, "enc-a", num_layers=6, best_layer=1, dim=32, signal_dims=slice(0, 3), seed=5)
    protocol = Protocol(name="validation", rank=32, alphas=(1e-3, 1e-1, 10.0, 100.0))
    rows = score_layers(open_store(tmp_path / "embeddings", "enc-a", "toy"), protocol, "enc-a")["rows"]
    judge = TestJudge(tmp_path / "embeddings", "toy", protocol)
    differing = []
    for row in (r for r in rows if r.pooling == "mean"):
        bank, _ = judge._scorer("enc-a", "mean")
        def on_test(alpha: float) -> float:
            return evaluate_features(bank.F[:, row.layer], bank.folds,
                                     dataclasses.replace(protocol, alphas=(alpha,)))["accuracy"]
        best_on_test = max(on_test(alpha) for alpha in protocol.alphas)
        if best_on_test > on_test(row.alpha) + 1e-9:
            differing.append(row)
            judged = judge.score(board_row(f"enc-a:L{row.layer}", row.score, [row.layer], "enc-a", row.alpha))
            assert judged["test_accuracy"] == pytest.approx(on_test(row.alpha), abs=1e-5)
            assert judged["test_accuracy"] < best_on_test - 1e-6
    assert differing, "the fixture must hold a layer whose best alpha on test is not validation's"


def test_cv_with_more_folds_than_rows_is_refused(tmp_path):
    from _stage2_store import make_store
    from pipeline.core.errors import ConfigError
    from pipeline.store.reader import open_store
    make_store(tmp_path, "enc-a", num_layers=3)
    with pytest.raises(ConfigError, match="score.folds is 500 but train has 240 rows"):
        score_layers(open_store(tmp_path / "embeddings", "enc-a", "toy"), Protocol(name="cv", folds=500, rank=4), "enc-a")


def test_leave_one_corpus_out_judges_the_others_choice_on_the_left_out_corpus():
    """Three corpora whose audits are written by hand: cv/best wins on a and b, validation/one_se on c."""
    from pipeline.select.audit import PROTOCOLS, leave_one_corpus_out

    def audit(dataset: str, accuracy: dict[str, float]) -> dict:
        return {"dataset": dataset, "protocols": {p: {"seconds": 1.0, "choices": {
            r: {"overall": {"test_accuracy": accuracy[f"{p} / {r}"]}} for r in ("best", "one_se")},
            "regret": {r: {"overall": 0.0} for r in ("best", "one_se")}} for p in PROTOCOLS}}

    audits = [audit("a", {"cv / best": 0.90, "cv / one_se": 0.88, "validation / best": 0.87, "validation / one_se": 0.86}),
              audit("b", {"cv / best": 0.80, "cv / one_se": 0.79, "validation / best": 0.77, "validation / one_se": 0.70}),
              audit("c", {"cv / best": 0.60, "cv / one_se": 0.58, "validation / best": 0.62, "validation / one_se": 0.65})]
    rows = {r["dataset"]: r for r in leave_one_corpus_out(audits)}
    # left out a: b + c average cv/best 0.70, cv/one_se 0.685, validation/best 0.695, validation/one_se 0.675
    assert rows["a"]["chosen_by_others"] == "cv / best" and rows["a"]["agrees"] and rows["a"]["cost"] == 0
    # left out c: a + b average cv/best 0.85 is the best -> c would have taken validation / one_se (0.65)
    assert rows["c"]["chosen_by_others"] == "cv / best" and rows["c"]["own_best"] == "validation / one_se"
    assert rows["c"]["cost"] == pytest.approx(0.65 - 0.60)
    # left out b: a + c average cv/best 0.75, cv/one_se 0.73, validation/best 0.745, validation/one_se 0.755
    assert rows["b"]["chosen_by_others"] == "validation / one_se" and rows["b"]["cost"] == pytest.approx(0.80 - 0.70)
