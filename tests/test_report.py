"""The report from a small real Stage 2 run (score, fuse, train on synthetic stores): built from per-section
functions over the result records, it shows every head's test figures and the choices; a damaged result
file is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from _stage2_store import make_store
from pipeline.core.atomic import write_json_atomic
from pipeline.config.sections import FuseSettings, TrainSettings
from pipeline.select.fusion import fuse_settings, search_dataset
from pipeline.select.probe import Protocol
from pipeline.core.records import ChosenFusion, HeadResults, ResultFileError, as_json, read_record
from pipeline.report.dataset_report import heads_section, load_dataset, write_report
from pipeline.store.resources import resources_of
from pipeline.select.scoring import score_layers
from pipeline.store.reader import open_store
from pipeline.heads.training import quiet_lightning, train_dataset, train_settings

MODELS = ["enc-a", "dec-b"]


@pytest.fixture(scope="module")
def stage2(tmp_path_factory) -> Path:
    """store/{scores,fusion,heads}/toy as the stages write them: two models, linear and scalar-mix heads."""
    root = tmp_path_factory.mktemp("report") / "store"
    make_store(root, "enc-a", num_layers=4, best_layer=2, signal_dims=slice(0, 2), seed=1)
    make_store(root, "dec-b", num_layers=5, best_layer=3, signal_dims=slice(2, 4), seed=2, decoder=True)
    protocol = Protocol(name="validation", rank=8, bootstrap=100)
    scores = {}
    for model in MODELS:
        scores[model] = score_layers(open_store(root / "embeddings", model, "toy"), protocol, model, geometry_rows=100,
                                     importance_rows=200) | {"dataset": "toy", "stage_seconds": 1.5}
        write_json_atomic(root / "scores" / "toy" / model / "scores.json", as_json(scores[model]))
    search = search_dataset(root / "embeddings", "toy", MODELS, scores, protocol, fuse_settings(FuseSettings(top_k=3)))
    search.chosen.stage_seconds, search.chosen.note = 2.5, "a note on the search"
    write_json_atomic(root / "fusion" / "toy" / "leaderboard.json", as_json(search.leaderboard))
    write_json_atomic(root / "fusion" / "toy" / "chosen.json", search.chosen.to_json())
    quiet_lightning()
    settings = train_settings(TrainSettings(seeds=(0, 1), max_epochs=2, patience=1, batch_size=64,
                                            heads=("linear", "scalar_mix")))
    chosen = json.loads((root / "fusion" / "toy" / "chosen.json").read_text())
    heads = train_dataset(root / "embeddings", "toy", chosen, settings, root / "heads" / "toy")
    heads = as_json(heads)
    heads["stage_seconds"] = 3.5
    write_json_atomic(root / "compare" / "toy" / "results.json", heads)       # what stage compare writes
    write_json_atomic(root / "compare" / "toy" / "resources.json", resources_of(root / "embeddings", "toy", MODELS))
    write_json_atomic(root / "compare" / "toy" / "gate_weights.json", [])
    return root


def render(store: Path, out: Path) -> tuple[str, dict]:
    params = SimpleNamespace(store=str(store), selected_datasets=["toy"], selected_models=MODELS)
    path = write_report(params, out)
    return path.read_text(), json.loads((out / "metrics.json").read_text())


def test_the_report_shows_every_head_and_every_choice(stage2, tmp_path):
    text, metrics = render(stage2, tmp_path / "reports")
    data = load_dataset(stage2, "toy", MODELS)
    results = data.heads.results
    assert {r.kind for r in results} >= {"last", "best_layer", "best_fusion", "llmembed", "all_layers", "best_multi"}
    for row in results:                                     # one table line per head, with its test figures
        line = next(l for l in text.splitlines() if l.startswith(f"| {row.row} | {row.head} |"))
        assert f"{row.test_accuracy:.4f} ± {row.test_accuracy_std:.4f}" in line
        assert f"{row.test_accuracy_low:.4f} – {row.test_accuracy_high:.4f}" in line
        assert f"{row.test_macro_f1:.4f} ± {row.test_macro_f1_std:.4f}" in line
    headings = [l for l in text.splitlines() if l.startswith("#")]
    assert headings == ["# Layer scores, fusions and heads", "## Recommendation", "### toy",
                        "## toy", "### Heads on test (read once, after training)",
                        "### Selection", "### Layers (probe)",
                        "### Label-free and gradient layer scores against the probe",
                        "### Fusion search (probe, top 10)", "### Train cost", "### Resources", "## Stage wall time"]
    cost = text.split("### Train cost")[1].split("###")[0]
    assert [l.split(" | ")[0] for l in cost.splitlines() if l.startswith("| ") and "---" not in l][1:] == [
        "| linear", "| scalar_mix"]                 # one row per head type's train stage
    chosen = data.chosen
    assert f"| overall | {chosen.chosen.candidate} | {chosen.chosen.score:.4f} |" in text
    for model in MODELS:
        best = data.scores[model]["best"]
        assert f"| {model} | {data.scores[model]['best_pooling']} | {best.layer} of " in text
        assert f"best within-model fusion {chosen.models[model].best_fusion.candidate}" in text
        assert f"| score {model} x toy | 1.5 |" in text
    assert "| fuse toy | 2.5 |" in text and "| compare toy | 3.5 |" in text and "| train toy linear | " in text
    assert "a note on the search" in text
    assert "![scalar mix weights](figures/toy_scalar_mix_weights.png)" in text
    assert (tmp_path / "reports" / "figures" / "toy_scalar_mix_weights.png").stat().st_size > 1000
    top = data.leaderboard[0]
    assert f"| 1 | {top.candidate} | {top.operator} | {top.width} | {top.score:.4f} |" in text
    best_head = max(results, key=lambda r: r.validation_accuracy)
    assert metrics["toy"]["test_accuracy"] == round(best_head.test_accuracy, 4)
    assert metrics["toy"]["head_chosen_on_validation"] == f"{best_head.row} / {best_head.head}"
    assert metrics["toy"]["chosen_fusion"] == chosen.chosen.candidate
    # the report opens with the head chosen on validation, its test figures and its gain over the last layer
    opening = text.split("\n## toy")[0]
    assert f"**Use {best_head.row} with the `{best_head.head}` head**" in opening
    assert f"Test accuracy {best_head.test_accuracy:.4f} [{best_head.test_accuracy_low:.3f}, " in opening
    assert "Cost not measured: run stage cost" in opening and metrics["toy"]["predict_seconds_per_1000_texts"] is None


def test_the_plain_words_name_each_paired_test(stage2):
    results = read_record(stage2 / "compare" / "toy" / "results.json", HeadResults).results
    lines = heads_section(results, "accuracy")
    tests = [(r, against) for r in results if r.kind != "last" for against in r.paired_tests]
    assert tests and sum(l.startswith("- ") for l in lines) == len(tests)
    for row, against in tests:
        assert any(l.startswith(f"- {row.row} ({row.head}): ") and f"vs {against} (" in l for l in lines)


def test_results_files_round_trip_and_a_damaged_one_is_named(stage2, tmp_path):
    for path, cls in ((stage2 / "compare" / "toy" / "results.json", HeadResults),
                      (stage2 / "fusion" / "toy" / "chosen.json", ChosenFusion)):
        record = read_record(path, cls)
        assert record.to_json() == json.loads(path.read_text()) and cls.from_json(record.to_json()) == record
    broken = tmp_path / "store"
    shutil.copytree(stage2, broken)
    results = broken / "compare" / "toy" / "results.json"
    raw = json.loads(results.read_text())
    del raw["results"][2]["test_accuracy"]
    results.write_text(json.dumps(raw))
    with pytest.raises(ResultFileError, match=r"results\.json\.results\[2\]: missing key 'test_accuracy'"):
        render(broken, tmp_path / "reports")
    assert not (tmp_path / "reports" / "report.md").exists()


def test_a_report_covers_the_corpora_that_have_run_and_names_the_rest(stage2, tmp_path):
    """A study runs corpus by corpus: its report covers the corpora with results and names the others; with none
    run there is nothing to report, and the missing file is named."""
    params = SimpleNamespace(store=str(stage2), selected_datasets=["later", "toy"], selected_models=MODELS)
    text = write_report(params, tmp_path / "partial").read_text()
    assert "Not run yet: later (no `compare` results in the store" in text
    assert "## toy" in text and "## later" not in text
    assert list(json.loads((tmp_path / "partial" / "metrics.json").read_text())) == ["toy"]
    params.selected_datasets = ["later"]
    with pytest.raises(ResultFileError, match=r"later"):
        write_report(params, tmp_path / "none")


def _study_copy(stage2: Path, folder: Path, train_rows: int, capped: bool) -> Path:
    """A copy of the stage-2 store as one run of a study: its corpus meta (caps or none), and a corpus `later`
    with scores but no compared heads (a corpus still running)."""
    shutil.copytree(stage2, folder)
    caps = {"caps": {"train": {"cap": train_rows, "rows_before": 120}}} if capped else {}
    write_json_atomic(folder / "data" / "toy" / "meta.json", {"rows": {"train": train_rows}, **caps})
    shutil.copytree(folder / "scores" / "toy", folder / "scores" / "later")
    if capped:       # the capped run's last-layer accuracy changed, so that the sides can be told apart
        results = json.loads((folder / "compare" / "toy" / "results.json").read_text())
        for row in results["results"]:
            if row["head"] == "linear" and row["row"].endswith(": last layer"):
                row["test_accuracy"] = 0.111
        write_json_atomic(folder / "compare" / "toy" / "results.json", results)
    return folder


@pytest.mark.parametrize("this_study", ["full", "capped"])
def test_the_study_report_reads_the_same_records(stage2, tmp_path, this_study):
    """The cross-corpus table from the stage records; the caps table puts the capped run of the same corpus on the
    capped side whichever side this study is on, and never compares a run with one on its own side; a corpus
    whose heads are not compared yet is named, not shown."""
    from pipeline.report.study_report import write_study_report
    full = _study_copy(stage2, tmp_path / "full", 120, capped=False)
    capped = _study_copy(stage2, tmp_path / "capped", 40, capped=True)
    own, other = (full, capped) if this_study == "full" else (capped, full)
    params = SimpleNamespace(store=str(own), selected_datasets=["toy", "later"], selected_models=MODELS,
                             extract_for=lambda dataset: SimpleNamespace(max_len=64),
                             score=SimpleNamespace(protocol="cv", select_rule="best"),
                             data=SimpleNamespace(max_rows={"train": 40} if this_study == "capped" else {}))
    text = write_study_report(params, tmp_path / "study", other_stores=[tmp_path / "none", stage2, other]).read_text()
    assert ("`make study-capped`" in text) == (this_study == "capped")
    assert "Not run yet: later (no `compare` results" in text and "| later |" not in text
    data = load_dataset(own, "toy", MODELS)
    linear = {r.row: r for r in data.heads.results if r.head == "linear"}
    for i, model in enumerate(MODELS):
        layer = data.chosen.models[model].best_layer.layers[0]
        line = next(l for l in text.splitlines() if l.startswith(f"| {'toy' if i == 0 else ''} | {model} | {layer} of "))
        for kind in ("last layer", "best single layer", "best within-model fusion"):
            assert f"{linear[f'{model}: {kind}'].test_accuracy:.3f} [" in line
        best = data.scores[model]["best"]
        chosen = f"{linear[f'{model}: best single layer'].test_accuracy:.3f}"
        last = next(f"{r.test_accuracy:.3f}" for r in load_dataset(full, "toy", MODELS).heads.results
                    if r.head == "linear" and r.row == f"{model}: last layer")
        caps_rows = [l for l in text.splitlines() if l.startswith(f"| toy | {model} | 40 / 120 |")]
        assert caps_rows == [f"| toy | {model} | 40 / 120 | {best.layer} ({best.score:.4f}) | {best.layer} "
                             f"({best.score:.4f}) | 0.111 | {last} | {chosen} | {chosen} |"]
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert study["best_layers"] == {"toy": {m: data.chosen.models[m].best_layer.layers for m in MODELS}}
    assert "- **toy**: " + data.chosen.best_multi.candidate in text


def test_holm_adjustment_and_p_value_text():
    """Holm's step-down worked by hand for four p-values, and a bootstrap p of 0 printed as a bound."""
    from pipeline.select.significance import holm, p_clause, p_text
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert p_text({"p_value": 0.0, "resamples": 2000}) == "< 0.0005"
    assert p_text({"p_value": 0.0123, "resamples": 2000}) == "0.012"
    assert p_text({"p_value": 0.0}) == "0.000"                    # a record from before resamples were kept
    assert p_clause({"p_value": 0.0, "resamples": 2000}) == "p < 0.0005"
    assert p_clause({"p_value": 0.0123, "p_holm": 0.5, "resamples": 2000}, "p_holm", "Holm") == "Holm = 0.50"


def test_every_paired_test_has_its_holm_p_in_the_report(stage2):
    results = read_record(stage2 / "compare" / "toy" / "results.json", HeadResults).results
    tests = [t for r in results for t in r.paired_tests.values()]
    assert tests and all(t["p_holm"] >= t["p_value"] and t["resamples"] == 2000 for t in tests)
    lines = heads_section(results, "accuracy")
    assert sum(line.count("(Holm ") for line in lines if line.startswith("| ")) == sum(
        len([a for a in r.paired_tests if a in ("last layer", "best single layer")]) for r in results)
