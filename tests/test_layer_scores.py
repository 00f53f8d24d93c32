"""Label-free layer scores against numpy on known matrices, gradient importance on a store whose label
lives in one layer, and the agreement of score rankings with the probe's (issue 14, parts 2-4)."""

from __future__ import annotations

import numpy as np
import pytest

from _stage2_store import make_store, remove_test_split
from pipeline.select.layer_agreement import agreement, compare, summarise
from pipeline.select.layer_geometry import anisotropy, effective_rank, gram_spectrum, sample_rows, spectrum_entropy
from pipeline.select.probe import Protocol
from pipeline.select.scoring import score_layers
from pipeline.store.reader import open_store


def numpy_scores(Z: np.ndarray, alpha: float = 1.0) -> tuple[float, float]:
    """Matrix entropy and RankMe straight from numpy's singular values (eigenvalues of Z Zᵀ are s²)."""
    s = np.linalg.svd(Z.astype(np.float64), compute_uv=False)
    lam = s ** 2 / np.sum(s ** 2)
    lam = lam[lam > 1e-15]
    entropy = -np.sum(lam * np.log(lam)) if alpha == 1 else np.log(np.sum(lam ** alpha)) / (1 - alpha)
    p = s[s > 1e-12] / s.sum()
    return float(entropy), float(np.exp(-np.sum(p * np.log(p))))


def matrix_entropy(Z: np.ndarray, alpha: float = 1.0) -> float:
    """The score stage's matrix entropy of Z: its Gram spectrum, then the entropy of that spectrum."""
    return spectrum_entropy(gram_spectrum(Z), alpha)


def test_identity_has_full_entropy_and_rank():
    assert matrix_entropy(np.eye(6)) == pytest.approx(np.log(6))
    assert effective_rank(np.eye(6)) == pytest.approx(6)


def test_rank_one_has_zero_entropy_and_rank_one():
    Z = np.outer(np.arange(1, 8), np.array([1.0, -2.0, 0.5]))
    assert matrix_entropy(Z) == pytest.approx(0, abs=1e-6)
    assert effective_rank(Z) == pytest.approx(1, abs=1e-5)


def test_diagonal_with_known_eigenvalues():
    lam = np.array([0.4, 0.3, 0.2, 0.1])                    # eigenvalues of Z Zᵀ, already trace 1
    Z = np.diag(np.sqrt(lam))
    assert matrix_entropy(Z) == pytest.approx(-np.sum(lam * np.log(lam)))
    assert matrix_entropy(Z, alpha=2) == pytest.approx(-np.log(np.sum(lam ** 2)))
    p = np.sqrt(lam) / np.sqrt(lam).sum()
    assert effective_rank(Z) == pytest.approx(np.exp(-np.sum(p * np.log(p))))


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])     # both sides of the smaller Gram matrix
def test_random_matrices_match_numpy(shape):
    Z = np.random.default_rng(1).normal(size=shape) * np.linspace(0.1, 3, shape[1])
    entropy, rank = numpy_scores(Z)
    assert matrix_entropy(Z) == pytest.approx(entropy, rel=1e-9)
    assert effective_rank(Z) == pytest.approx(rank, rel=1e-9)
    assert matrix_entropy(Z, alpha=2) == pytest.approx(numpy_scores(Z, alpha=2)[0], rel=1e-9)
    assert 1 < rank < min(shape)


def test_anisotropy_of_known_vectors():
    assert anisotropy(np.tile([[1.0, 2.0, -1.0]], (5, 1))) == pytest.approx(1)
    assert anisotropy(np.eye(4) * 3) == pytest.approx(0)
    assert anisotropy(np.array([[1.0, 1.0], [-2.0, -2.0]])) == pytest.approx(-1)  # pairs are never a row with itself
    rng = np.random.default_rng(0)
    shifted = rng.normal(size=(300, 20)) + 5                  # a common offset: the cone anisotropy measures
    assert anisotropy(shifted) > 0.9 > 0.1 > abs(anisotropy(rng.normal(size=(300, 20))))


def test_agreement_on_hand_made_rankings():
    probe = [0.60, 0.70, 0.90, 0.80, 0.65]
    same = agreement(probe, [1, 3, 5, 4, 2])
    assert (same["spearman"], same["kendall"], same["top1"], same["top3"]) == (1.0, 1.0, True, True)
    flipped = agreement(probe, [5, 3, 1, 2, 4], sign=-1)        # lower is better: the same ranking
    assert (flipped["spearman"], flipped["spearman_raw"], flipped["top1"]) == (1.0, -1.0, True)
    second = agreement(probe, [1, 5, 4, 3, 2])                  # the probe's best is the score's second
    assert (second["top1"], second["top3"], second["score_top"], second["probe_top"]) == (False, True, 1, 2)
    worst = agreement(probe, [5, 3, 1, 2, 4])
    assert worst["spearman"] == -1.0 and not worst["top3"]


def test_agreement_leaves_out_layers_a_score_does_not_cover():
    """Attention entropy has no value for the embedding output (NaN): correlations over the other layers,
    and that layer is never the score's top, even where the probe's best is there."""
    probe = [0.95, 0.70, 0.90, 0.80, 0.65]
    row = agreement(probe, [np.nan, 2, 4, 3, 1])
    assert (row["spearman"], row["kendall"], row["top1"], row["score_top"], row["probe_top"]) == (1.0, 1.0, False, 2, 0)
    assert row["top3"] is False
    row = agreement([0.60, 0.70, 0.90, 0.80, 0.65], [np.nan, 2, 4, 3, 1])
    assert (row["spearman"], row["top1"], row["top3"]) == (1.0, True, True)


def test_compare_names_layers_and_summary_picks_the_best_predictor():
    layers = [0, 2, 4, 6]
    good = compare([0.5, 0.9, 0.7, 0.6], layers, {"effective_rank": [1, 4, 3, 2], "anisotropy": [0.1, 0.2, 0.3, 0.4]})
    assert good["effective_rank"]["score_top"] == 2 and good["anisotropy"]["score_top"] == 0
    bad = compare([0.9, 0.5, 0.6, 0.7], layers, {"effective_rank": [1, 4, 3, 2], "anisotropy": [0.1, 0.2, 0.3, 0.4]})
    summary = summarise({"m x a": good, "m x b": bad})
    assert summary["best"] == "anisotropy"                      # right on "b", where rank is wrong
    assert summary["table"]["effective_rank"]["top1_rate"] == 0.5
    assert summary["table"]["effective_rank"]["negative"] == ["m x b"]
    assert summary["table"]["anisotropy"]["cases"] == 2


@pytest.mark.parametrize("protocol", [Protocol(name="validation", rank=8), Protocol(name="cv", folds=4, rank=8)])
def test_score_stage_gives_layer_scores_and_importance_finds_the_label_layer(tmp_path, protocol):
    path = make_store(tmp_path, "toy-enc", best_layer=4, num_layers=7)
    remove_test_split(path)                                     # importance never reads test either
    store = open_store(tmp_path / "embeddings", "toy-enc", "toy")
    result = score_layers(store, protocol, "toy-enc", geometry_rows=100)
    for name in ("gradient", "input_x_gradient"):
        assert int(np.argmax(result["importance"][name])) == 4, result["importance"]
        assert result["layer_agreement"][name]["top1"]
    sample = sample_rows(store.num_rows("train"), 100, protocol.seed)
    raw = store.layer("train", result["best_pooling"], 5)[sample]      # unstandardised vectors, as stored
    assert result["geometry"]["effective_rank"][5] == pytest.approx(effective_rank(raw), rel=1e-5)
    assert result["geometry"]["anisotropy"][5] == pytest.approx(anisotropy(raw), abs=1e-5)
    assert result["layer_scores"]["geometry_rows"] == 100 and "curvature" in result["layer_scores"]["left_out"]
    assert set(result["layer_agreement"]) == {"dataset_entropy", "effective_rank", "anisotropy", "gradient",
                                              "input_x_gradient"}


def test_layer_scores_can_be_turned_off(tmp_path):
    make_store(tmp_path, "toy-enc")
    result = score_layers(open_store(tmp_path / "embeddings", "toy-enc", "toy"), Protocol(name="validation", rank=8), "toy-enc", geometry_rows=0,
                          importance_rows=0)
    assert "geometry" not in result and "importance" not in result and result["best"]["layer"] == 3


def test_report_sections_show_the_table_the_plot_and_the_best_predictor(tmp_path):
    from pipeline.report.layer_report import layer_scores_section, study_layer_scores
    make_store(tmp_path, "toy-enc", best_layer=4, num_layers=7)
    result = score_layers(open_store(tmp_path / "embeddings", "toy-enc", "toy"), Protocol(name="validation", rank=8), "toy-enc", geometry_rows=100)
    lines = layer_scores_section({"toy-enc": result}, "toy", tmp_path / "figures")
    assert (tmp_path / "figures" / "toy_toy-enc_layer_scores.png").stat().st_size > 1000
    assert sum(line.startswith("| gradient |") for line in lines) == 1
    study = {"a": {"scores": {"toy-enc": result}}, "b": {"scores": {"toy-enc": None}}}
    lines, summary = study_layer_scores(study, ["toy-enc"])
    assert summary["table"]["gradient"]["cases"] == 1 and summary["best"] in summary["table"]
    assert any(line.startswith("Best predictor of the probe's best layer") for line in lines)
    assert any(line.startswith("- toy-enc x a: probe's best layer 4.") for line in lines)
