"""The candidate space, block-built statistics against explicit features, and the search on real stores."""

from __future__ import annotations

import json

import pytest
import torch

from _stage2_store import make_store, remove_test_split
from pipeline.config.sections import FuseSettings
from pipeline.select.fusion import (BlockScorer, Candidate, build_candidates, fuse_settings,
                             search_dataset)
from pipeline.select.probe import Protocol, evaluate_features
from pipeline.core.records import ChosenFusion, LeaderboardRow
from pipeline.select.scoring import load_bank, score_layers
from pipeline.store.reader import open_store


def test_candidate_space_is_exhaustive_and_without_duplicates():
    cands = build_candidates(6, ranking=[3, 2, 4, 1, 5, 0], top_k=3, last_n=5, wide_max_layers=2)
    sets = {c.layers for c in cands}
    assert len(cands) == len({(c.layers, c.operator) for c in cands})
    assert all((l,) in sets for l in range(6))
    assert all((a, b) in sets for a in range(6) for b in range(a + 1, 6))
    assert all(tuple(range(s, s + n)) in sets for n in range(3, 7) for s in range(7 - n))
    assert (2, 3, 4) in sets                                     # top-3 subset
    ops = {(c.layers, c.operator): c.family for c in cands}
    assert "last-n" in ops[((1, 2, 3, 4, 5), "mean")]                # LLMEmbed's recipe
    # max and concat only on small sets, top-k and last-N sets
    assert ((0, 1, 2), "concat") not in ops
    assert ops[((2, 3, 4), "max")] == "window+top-k"
    singles = [c for c in cands if len(c.layers) == 1]
    assert {c.operator for c in singles} == {"mean"}


@pytest.mark.parametrize("protocol", [Protocol(name="validation", rank=8), Protocol(name="cv", folds=3, rank=8)], ids=["val", "cv"])
def test_block_statistics_equal_explicit_features(tmp_path, protocol):
    make_store(tmp_path, "toy-enc")
    store = open_store(tmp_path / "embeddings", "toy-enc", "toy")
    bank = load_bank(store, "mean", protocol, keep_standardised=True)
    scorer = BlockScorer(bank, protocol)
    for cand in (Candidate((1, 3, 4), "mean", "window"), Candidate((2, 5), "concat", "pair"),
                 Candidate((2, 3), "max", "pair"), Candidate((3,), "mean", "single")):
        explicit = evaluate_features(scorer.features(cand), bank.folds, protocol)
        blocks = scorer.score(cand)
        assert blocks["accuracy"] == pytest.approx(explicit["accuracy"], abs=1e-9), cand
        assert blocks["alpha"] == explicit["alpha"]
    # the single-layer candidate reproduces the score stage's number exactly
    scores = score_layers(store, protocol, "toy-enc", poolings=["mean"])
    row = next(r for r in scores["rows"] if r.layer == 3)
    assert scorer.score(Candidate((3,), "mean", "single"))["score"] == pytest.approx(row.score)
    # max of standardised layers really is an elementwise max
    Z = bank.Z.float()
    assert torch.allclose(scorer.features(Candidate((2, 3), "max", "pair")),
                          torch.maximum(Z[:, 2], Z[:, 3]) @ bank.basis, atol=1e-4)


def test_search_across_models_without_reading_test(tmp_path):
    # two models that see different halves of the signal: together they beat either alone
    a = make_store(tmp_path, "enc-a", num_layers=5, best_layer=4, signal_dims=slice(0, 2), seed=1)
    b = make_store(tmp_path, "dec-b", num_layers=7, best_layer=3, signal_dims=slice(2, 4), seed=2, decoder=True)
    for path in (a, b):
        remove_test_split(path)
    protocol = Protocol(name="validation", rank=8)
    scores = {m: score_layers(open_store(tmp_path / "embeddings", m, "toy"), protocol, m) for m in ("enc-a", "dec-b")}
    settings = fuse_settings(FuseSettings(top_k=3))
    search = search_dataset(tmp_path / "embeddings", "toy", ["enc-a", "dec-b"], scores, protocol, settings)
    board, result = search.leaderboard, search.chosen
    assert [r.score for r in board] == sorted((r.score for r in board), reverse=True)
    multi = [r for r in board if r.family == "multi-model"]
    assert len(multi) == 4                                             # 2 x 2 contribution choices
    assert multi[0].groups == [result.models[m].best_layer.groups[0] if len(layers) == 1 else
                               result.models[m].best_fusion.groups[0] for m, layers in zip(multi[0].models, multi[0].layers)]
    assert result.best_multi.score >= max(result.models[m].best_layer.score for m in scores)
    assert result.models["dec-b"].decoder is True
    assert result.models["dec-b"].llmembed.layers == [2, 3, 4, 5, 6]
    assert all(t["candidates_per_s"] > 0 for t in result.timing.values())
    # chosen.json and leaderboard.json round-trip through their records
    assert ChosenFusion.from_json(json.loads(json.dumps(result.to_json()))) == result
    assert [LeaderboardRow.from_json(r.to_json()) for r in board] == board
