"""The heads of one dataset side by side (stage compare): each head type's train stage saved its rows and test
predictions; here they become one table with 95% test intervals, paired tests on the same test rows (against the
baselines, and between heads trained on identical inputs) and Holm's correction over all of them. No training and
no Lightning: a head experiment pays seconds for it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from pipeline.config.sections import HEAD_NAMES
from pipeline.core.records import HeadResult, HeadResults, ResultFileError, read_record
from pipeline.select.significance import SINGLE_MODEL_KINDS, TestRows, add_holm, add_test_uncertainty

KIND_ORDER = ("last", "best_layer", "best_fusion", "llmembed", "all_layers", "best_multi", "cooccurrence")
"""The order of training.plan_runs' rows within a model; the report's table follows it."""


def head_settings(settings: dict[str, Any], head: str) -> dict[str, Any]:
    """What one head's training reads: the shared keys and its own options train.<head>, not the other heads' (the keys of
    its DVC stage's params, so that changing train.mlp retrains the MLP heads alone)."""
    return {key: value for key, value in settings.items() if key not in HEAD_NAMES or key == head}


def add_same_input_tests(results: list[dict[str, Any]], predictions: dict[tuple[str, str], np.ndarray],
                         tests: TestRows) -> None:
    """The gated head against every other head trained on the same inputs (scalar mix, concatenation,
    co-occurrence): paired on the same test rows, like the tests against the baselines."""
    for row in results:
        if row["head"] != "gated":
            continue
        for other in results:
            if other["row"] == row["row"] and other["head"] != "gated":
                test = tests.paired(predictions[(row["row"], "gated")], predictions[(other["row"], other["head"])])
                row["paired_tests"][f"{other['head']} on the same inputs"] = {
                    **test, "against": f"{other['row']} ({other['head']})"}


def test_predictions(heads_root: Path, result: HeadResult, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A head's saved test predictions, [seeds, rows], and the test labels they were scored on."""
    predictions, labels = [], None
    for seed in seeds:
        saved = load_file(str(heads_root / result.folder / f"seed{seed}" / "test_predictions.safetensors"))
        predictions.append(saved["predictions"])
        if labels is not None and not np.array_equal(labels, saved["labels"]):
            raise ResultFileError(f"{heads_root / result.folder}: seeds were scored on different test rows; "
                                  "rerun its train stage")
        labels = saved["labels"]
    return np.stack(predictions), labels


def compare_heads(heads_root: Path, dataset: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Every head type's rows of one dataset in one table (stage compare): 95% test intervals, paired tests on
    the same test rows against the baselines and between heads on identical inputs, Holm over them all. Reads the
    saved test predictions only; returns the HeadResults JSON that results.json holds."""
    start = time.perf_counter()
    parts = {head: read_record(heads_root / head / "results.json", HeadResults) for head in settings["heads"]}
    for head, part in parts.items():
        if part.settings != head_settings(settings, head):
            raise ResultFileError(f"{heads_root / head / 'results.json'} was trained with other train settings "
                                  f"than params.yaml's; rerun its train stage")
    results, predictions, labels = [], {}, None
    for head, part in parts.items():
        for result in part.results:
            predictions[(result.row, head)], rows = test_predictions(heads_root, result, settings["seeds"])
            if labels is not None and not np.array_equal(labels, rows):
                raise ResultFileError(f"{heads_root / result.folder}: scored on other test rows than "
                                      f"{results[0]['folder']}; rerun the train stages of {dataset}")
            labels = rows
            results.append(result.to_json())
    models = list(dict.fromkeys(r["groups"][0]["model"] for r in results if r["kind"] in SINGLE_MODEL_KINDS))

    def planned(row: dict[str, Any]) -> tuple[int, int, int]:
        model = models.index(row["groups"][0]["model"]) if row["kind"] in SINGLE_MODEL_KINDS else len(models)
        return model, KIND_ORDER.index(row["kind"]), settings["heads"].index(row["head"])
    results.sort(key=planned)
    first = heads_root / results[0]["folder"] / f"seed{settings['seeds'][0]}" / "config.json"
    label_names = json.loads(first.read_text(encoding="utf-8"))["label_names"]
    tests = TestRows(labels, len(label_names), seed=int(settings["seeds"][0]))
    add_test_uncertainty(results, predictions, tests)
    add_same_input_tests(results, predictions, tests)
    add_holm(results)
    return HeadResults(dataset=dataset, results=[HeadResult(**row) for row in results],
                       bytes_read=sum(p.bytes_read for p in parts.values()),
                       seconds=round(sum(p.seconds for p in parts.values()) + time.perf_counter() - start, 3),
                       settings=settings, head_stage_seconds={h: p.stage_seconds for h, p in parts.items()}).to_json()
