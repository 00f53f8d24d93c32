"""Typed result records (issue 12): to_json / from_json round-trip, and a bad file is refused by name."""

from __future__ import annotations

import json

import pytest

from pipeline.core.records import (ChosenFusion, HeadResult, HeadResults, LeaderboardRow, ModelChoice, ResultFileError,
                              ScoreRow, read_record, read_records, read_scores)

PROBE = {"accuracy": 0.8, "accuracy_std": 0.02, "macro_f1": 0.79, "macro_f1_std": 0.03, "alpha": 10.0,
         "score": 0.8, "std": 0.02}


def leaderboard_row(name: str, layers: list[int], score: float = 0.8) -> LeaderboardRow:
    return LeaderboardRow(candidate=f"m:{name}", family="single", operator="mean", layers=layers, models=["m"],
                          pooling="mean", width=16, **{**PROBE, "score": score}, seconds=0.001,
                          groups=[{"model": "m", "pooling": "mean", "layers": layers, "operator": "mean"}])


def chosen_fusion() -> ChosenFusion:
    last, best = leaderboard_row("L5", [5], 0.7), leaderboard_row("L3", [3], 0.8)
    fused = leaderboard_row("mean(2,3)", [2, 3], 0.82)
    model = ModelChoice(pooling="mean", num_layers=6, dim=16, decoder=True, last=last, best_layer=best,
                        best_fusion=fused, llmembed=fused, optimism={"best layer": {"drop": 0.01}})
    return ChosenFusion(dataset="toy", metric="accuracy", protocol="cv", select_rule="best",
                        reference={"models": {"m": "m:L5"}}, models={"m": model}, best_multi=None, chosen=fused,
                        leader=fused, optimism={"overall": {"drop": 0.02}}, timing={"m": {"candidates": 3}},
                        bytes_read=1024, stage_seconds=1.5, note="a note")


def head_result(**extra) -> HeadResult:
    return HeadResult(row="m: last layer", kind="last", head="linear",
                      groups=[{"model": "m", "pooling": "mean", "layers": [5], "operator": "mean"}], probe_score=0.7,
                      probe_std=0.01, seeds=[0, 1], seconds=2.0, validation_accuracy=0.71,
                      validation_accuracy_std=0.01, validation_macro_f1=0.70, validation_macro_f1_std=0.01,
                      test_accuracy=0.69, test_accuracy_std=0.02, test_macro_f1=0.68, test_macro_f1_std=0.02,
                      folder="m-last-layer/linear", test_accuracy_low=0.6, test_accuracy_high=0.75,
                      test_macro_f1_low=0.6, test_macro_f1_high=0.74, **extra)


def test_records_round_trip_through_json_text():
    score = ScoreRow(model="m", pooling="mean", layer=3, layers=[3], models=["m"], width=16, relative_depth=0.6,
                     **PROBE, seconds=0.01, vs_reference=0.05,
                     vs_reference_se=0.01, vs_reference_low=0.03, vs_reference_high=0.07, vs_leader=0.0,
                     vs_leader_se=0.0, vs_leader_low=0.0, vs_leader_high=0.0, within_one_se=True)
    results = HeadResults(dataset="toy", results=[head_result(), head_result(layer_weights=[0.5, 0.5],
                                                                          layer_weights_std=[0.0, 0.0])],
                          bytes_read=4096, seconds=3.0, settings={"seeds": [0, 1]}, stage_seconds=3.5)
    for record in (score, leaderboard_row("L3", [3]), chosen_fusion(), results):
        text = json.dumps(record.to_json())
        assert type(record).from_json(json.loads(text)) == record
    assert isinstance(ChosenFusion.from_json(chosen_fusion().to_json()).models["m"].best_fusion, LeaderboardRow)
    # an optional field is left out when None, so the linear head's row has no layer weights (as results.json had)
    assert "layer_weights" not in head_result().to_json() and results.to_json()["results"][1]["layer_weights"] == [0.5, 0.5]
    assert score["score"] == 0.8 and score["layer"] == 3                      # readers that index by key
    with pytest.raises(KeyError):
        score["nope"]


def test_a_missing_or_unknown_key_is_refused_naming_the_file_and_key(tmp_path):
    path = tmp_path / "chosen.json"
    data = chosen_fusion().to_json()
    del data["models"]["m"]["best_layer"]["score"]
    path.write_text(json.dumps(data))
    with pytest.raises(ResultFileError, match=r"chosen\.json\.models\.m\.best_layer: missing key 'score' in a LeaderboardRow"):
        read_record(path, ChosenFusion)
    data = chosen_fusion().to_json() | {"winner": "m:L3"}
    path.write_text(json.dumps(data))
    with pytest.raises(ResultFileError, match=r"chosen\.json: unknown key 'winner' in a ChosenFusion"):
        read_record(path, ChosenFusion)
    board = tmp_path / "leaderboard.json"
    board.write_text(json.dumps([leaderboard_row("L3", [3]).to_json(), {"candidate": "m:L1"}]))
    with pytest.raises(ResultFileError, match=r"leaderboard\.json\[1\]: missing key 'accuracy'"):
        read_records(board, LeaderboardRow)


@pytest.mark.parametrize("value", ["0.69", True, None, [0.69]])
def test_a_value_of_the_wrong_type_is_refused_naming_its_key(tmp_path, value):
    """Scalars are read strictly: a number written as text or a boolean is damage, not a number."""
    path = tmp_path / "results.json"
    results = HeadResults(dataset="toy", results=[head_result()], bytes_read=1, seconds=1.0, settings={})
    data = results.to_json()
    data["results"][0]["test_accuracy"] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ResultFileError, match=r"results\.json\.results\[0\]\.test_accuracy: input should be a valid "
                                              r"number, found .* in a HeadResult"):
        read_record(path, HeadResults)
    data["results"][0]["test_accuracy"] = 1                  # an integer is a number
    path.write_text(json.dumps(data))
    assert read_record(path, HeadResults).results[0].test_accuracy == 1.0


def test_missing_and_broken_files_are_named(tmp_path):
    with pytest.raises(ResultFileError, match=r"results\.json: no such result file"):
        read_record(tmp_path / "results.json", HeadResults)
    (tmp_path / "scores.json").write_text('{"rows": [')
    with pytest.raises(ResultFileError, match=r"scores\.json: not valid JSON"):
        read_scores(tmp_path / "scores.json")
    (tmp_path / "scores.json").write_text('{"model": "m"}')
    with pytest.raises(ResultFileError, match=r"scores\.json: missing key 'rows'"):
        read_scores(tmp_path / "scores.json")
