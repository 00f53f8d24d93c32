"""Heads with real Lightning on a real store: they learn, save as safetensors + JSON, and load back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from _stage2_store import make_store
from pipeline.config.sections import MlpOptions, TrainSettings
from pipeline.heads.datamodule import LayerCache
from pipeline.heads.networks import CooccurrenceHead, Fuse, GatedHead, ScalarMixHead, load_head, load_standardisation
from pipeline.heads.training import fit_head, plan_runs, spec_from_groups, train_settings


def test_fuse_operators_and_cooccurrence_logits():
    x = torch.arange(12, dtype=torch.float32).view(1, 12)      # three inputs of width 4
    fuse = Fuse([4, 4, 4], [{"inputs": [0, 2], "operator": "max"}, {"inputs": [1], "operator": "concat"}])
    assert fuse.width == 8
    assert torch.equal(fuse(x), torch.tensor([[8.0, 9, 10, 11, 4, 5, 6, 7]]))
    mean = Fuse([4, 4, 4], [{"inputs": [0, 1, 2], "operator": "mean"}])
    assert torch.equal(mean(x), torch.tensor([[4.0, 5, 6, 7]]))
    head = CooccurrenceHead([4, 6], [True, False], num_classes=3, width=8, widths=[16])
    logits = head(torch.randn(5, 10))
    assert logits.shape == (5, 3)
    assert not torch.allclose(logits.sum(-1), torch.ones(5))   # logits, not probabilities
    assert len(head.rows) == 3                                 # upper triangle of a 2x2 Gram matrix


def test_scalar_mix_weights_are_a_distribution():
    head = ScalarMixHead([4] * 5, num_classes=2)
    assert head(torch.randn(3, 20)).shape == (3, 2)
    assert float(head.weights().sum()) == pytest.approx(1.0)


def test_gate_is_a_distribution_per_text_and_depends_on_the_text():
    torch.manual_seed(0)
    head = GatedHead([4, 6, 4], num_classes=3, width=8)
    x = torch.randn(5, 14)
    assert torch.allclose(head.gates(x), torch.full((5, 3), 1 / 3))          # starts uniform
    torch.nn.init.normal_(head.gate.weight)
    gates = head.gates(x)
    assert gates.shape == (5, 3) and bool((gates > 0).all())
    assert torch.allclose(gates.sum(-1), torch.ones(5), atol=1e-6)
    assert not torch.allclose(gates[0], gates[1])                           # per text, not one global mix
    assert head(x).shape == (5, 3)


@pytest.mark.parametrize("head", ["linear", "mlp", "cooccurrence", "scalar_mix", "gated"])
def test_head_trains_saves_and_loads(tmp_path, head, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_store(tmp_path / "store", "toy-dec", decoder=True, best_layer=4)
    groups = {"linear": [{"model": "toy-dec", "pooling": "mean", "layers": [3, 4], "operator": "mean"}],
              "mlp": [{"model": "toy-dec", "pooling": "mean", "layers": [4, 5], "operator": "concat"}],
              "cooccurrence": [{"model": "toy-dec", "pooling": "mean", "layers": [2, 3, 4], "operator": "concat"}],
              "scalar_mix": [{"model": "toy-dec", "pooling": "mean", "layers": list(range(6)), "operator": "concat"}],
              "gated": [{"model": "toy-dec", "pooling": "mean", "layers": [0, 2, 4], "operator": "concat"},
                        {"model": "toy-dec", "pooling": "last", "layers": [1], "operator": "concat"}]}
    settings = train_settings(TrainSettings(seeds=(0,), max_epochs=15, patience=3, batch_size=64, lr=0.01,
                                            mlp=MlpOptions(widths=(32,), dropout=0.1)))
    cache = LayerCache(tmp_path / "store" / "embeddings", "toy")
    out = tmp_path / "store" / "heads" / head
    config = fit_head(cache, {"row": "t", "groups": groups[head]}, head, 0, settings, out, ["c0", "c1"],
                      {"toy-dec": True}, tmp_path / "store" / ".trainer")
    assert config["validation"]["accuracy"] > 0.7 and config["test"]["accuracy"] > 0.7
    assert sorted(os.listdir(out)) == ["config.json", *(["gate_weights.json"] if head == "gated" else []),
                                       "model.safetensors", "standardisation.safetensors", "test_predictions.safetensors"]
    assert not (tmp_path / "lightning_logs").exists() and not list(tmp_path.glob("*.ckpt"))
    net, loaded = load_head(out)
    assert loaded["inputs"] == [["toy-dec", g["pooling"], l] for g in groups[head] for l in g["layers"]]
    mean, std = load_standardisation(out)
    inputs, _ = spec_from_groups(groups[head])
    raw = torch.cat([torch.from_numpy(cache.store("toy-dec").layer("test", "mean", l)) for _, _, l in inputs], 1)
    with torch.no_grad():
        pred = net((raw - mean) / std).argmax(-1)
    y = cache.labels("toy-dec", "test")
    assert float((pred == y).float().mean()) == pytest.approx(config["test"]["accuracy"], abs=1e-6)
    if head == "scalar_mix":
        weights = json.loads((out / "config.json").read_text())["layer_weights"]
        assert len(weights) == 6 and sum(weights) == pytest.approx(1.0, abs=1e-4)
    if head == "gated":     # per class on validation: each class's mean gate is a distribution over the 4 sources
        gates = json.loads((out / "gate_weights.json").read_text())
        assert gates["split"] == "validation" and gates["sources"] == loaded["inputs"] and gates["classes"] == ["c0", "c1"]
        assert [len(g) for g in gates["per_class"]] == [4, 4]
        assert all(sum(g) == pytest.approx(1.0, abs=1e-4) for g in gates["per_class"])
    assert not (Path.cwd() / "lightning_logs").exists()


def test_plan_dedupes_and_covers_the_table():
    row = lambda layers, op="mean": {"groups": [{"model": "m", "pooling": "mean", "layers": layers, "operator": op}],
                                     "score": 0.5, "std": 0.0}
    chosen = {"models": {"m": {"pooling": "mean", "num_layers": 6, "decoder": True, "last": row([5]),
                               "best_layer": row([3]), "best_fusion": row([2, 3], "concat"), "llmembed": row([1, 2, 3, 4, 5])}},
              "best_multi": None}
    runs = plan_runs(chosen, ["linear", "mlp", "cooccurrence", "scalar_mix"])
    kinds = [r["kind"] for r in runs]
    assert kinds == ["last", "best_layer", "best_fusion", "llmembed", "all_layers", "cooccurrence"]
    assert runs[-1]["groups"][0]["layers"] == [1, 2, 3, 4, 5]
    assert [r["heads"] for r in runs][-2:] == [["scalar_mix"], ["cooccurrence"]]     # no gated head unless asked


def _chosen_two_models(decoder_pooling="last", encoder_pooling="first", dec="dec", enc="enc", dec_layers=8,
                       enc_layers=4):
    """A chosen.json of a decoder and an encoder (layer counts as stored: embeddings + blocks)."""
    row = lambda model, pooling, layers, op="mean": {                                   # noqa: E731
        "groups": [{"model": model, "pooling": pooling, "layers": layers, "operator": op}], "score": 0.5, "std": 0.0}

    def info(name, pooling, n, decoder):
        return {"pooling": pooling, "num_layers": n, "decoder": decoder, "last": row(name, pooling, [n - 1]),
                "best_layer": row(name, pooling, [n - 2]), "best_fusion": row(name, pooling, [n - 3, n - 2], "concat"),
                "llmembed": row(name, pooling, list(range(max(n - 5, 0), n)))}
    models = {dec: info(dec, decoder_pooling, dec_layers, True), enc: info(enc, encoder_pooling, enc_layers, False)}
    multi = {"groups": models[dec]["best_fusion"]["groups"] + models[enc]["best_layer"]["groups"], "score": 0.6, "std": 0.0}
    return {"models": models, "best_multi": multi}


def test_llmembed_row_feeds_the_decoders_last_five_layers_and_the_encoders_sentence_vector():
    """LLMEmbed's inputs (its released code): the decoder's last five layers and the encoders' sentence vectors,
    all mean-pooled, whatever pooling the probe chose; a store without `mean` keeps the probe's pooling."""
    chosen = _chosen_two_models()
    row = next(r for r in plan_runs(chosen, ["cooccurrence"]) if r["kind"] == "cooccurrence")
    assert row["groups"] == [{"model": "dec", "pooling": "mean", "layers": [3, 4, 5, 6, 7], "operator": "concat"},
                             {"model": "enc", "pooling": "mean", "layers": [3], "operator": "concat"}]
    assert spec_from_groups(row["groups"])[0] == [("dec", "mean", l) for l in range(3, 8)] + [("enc", "mean", 3)]
    row = plan_runs(chosen, ["cooccurrence"], {"dec": ["last", "first"], "enc": ["mean", "first"]})[-1]
    assert [(g["model"], g["pooling"]) for g in row["groups"]] == [("dec", "last"), ("enc", "mean")]


def test_gated_head_is_planned_beside_what_it_is_compared_with_on_identical_inputs():
    runs = plan_runs(_chosen_two_models("mean", "mean"), ["linear", "mlp", "cooccurrence", "scalar_mix", "gated"])
    heads = {r["row"]: r["heads"] for r in runs}
    assert heads["dec: all layers"] == heads["enc: all layers"] == ["linear", "scalar_mix", "gated"]
    assert heads["multi-model: best fusion"] == ["linear", "mlp", "gated"]
    assert heads["LLMEmbed inputs (co-occurrence)"] == ["cooccurrence", "gated"]
    assert heads["dec: best single layer"] == ["linear", "mlp"]
    only = {r["row"]: r["heads"] for r in plan_runs(_chosen_two_models(), ["gated"])}
    assert only == {"dec: all layers": ["gated"], "enc: all layers": ["gated"], "multi-model: best fusion": ["gated"]}


def test_cache_reads_each_layer_once_and_batches_match_a_concatenation(tmp_path):
    from pipeline.heads.datamodule import LayerCache, LayerDataModule
    from pipeline.select.probe import standardise_stats
    make_store(tmp_path / "store", "toy-dec", decoder=True)
    cache = LayerCache(tmp_path / "store" / "embeddings", "toy")
    cache.load([("toy-dec", "mean", 1), ("toy-dec", "mean", 4)])
    first = cache.bytes_read
    data = LayerDataModule(cache, [("toy-dec", "mean", 4), ("toy-dec", "mean", 2), ("toy-dec", "last", 0)], 32)
    data.setup()
    assert "test" not in cache.tensors[("toy-dec", "mean")]             # test: only when asked for
    store = cache.store("toy-dec")
    rows = torch.tensor([5, 0, 17, 3])
    x, y = data.rows("train")[rows]
    parts = []
    for _, pooling, layer in data.inputs:
        raw = store.layer("train", pooling, layer)
        mean, std = standardise_stats(raw)
        parts.append(torch.from_numpy((raw - mean) / std)[rows])
    assert torch.allclose(x, torch.cat(parts, 1), atol=1e-5)
    assert torch.equal(y, cache.labels("toy-dec", "train")[rows])
    per_layer = (240 + 80) * 16 * 4
    assert cache.bytes_read == first + 2 * per_layer                     # layers 2 (mean) and 0 (last) only
    data.rows("test")
    assert cache.tensors[("toy-dec", "mean")]["test"].shape == (120, 3, 16)


def test_a_small_train_split_gets_enough_steps_per_epoch(tmp_path):
    """240 train rows at batch_size 1024 would be one Adam step per epoch, and early stopping would judge the
    first noisy steps alone (the study's SmolLM2 SST-2 heads stopped near chance that way)."""
    from pipeline.heads.datamodule import LayerCache, LayerDataModule
    make_store(tmp_path / "store", "toy-dec", decoder=True)
    cache = LayerCache(tmp_path / "store" / "embeddings", "toy")
    small = LayerDataModule(cache, [("toy-dec", "mean", 1)], 1024, 0, min_steps_per_epoch=16)
    small.setup()
    batches = [len(y) for _, y in small.train_dataloader()]
    assert len(batches) >= 16 and sum(batches) == 240 and max(batches) == 15        # ceil(240 / 16)
    assert [len(y) for _, y in small.val_dataloader()] == [80]                       # evaluation keeps batch_size
    large = LayerDataModule(cache, [("toy-dec", "mean", 1)], 32, 0, min_steps_per_epoch=4)
    large.setup()
    assert large.train_batch_size == 32                                              # 240 / 32 is already 8 steps


def test_lightning_stops_early_keeps_the_best_epoch_and_leaves_no_checkpoint(tmp_path, monkeypatch):
    """Early stopping on validation loss, the best epoch's weights through ModelCheckpoint in a temporary
    folder that is gone after the fit, and evaluation with those weights."""
    import tempfile
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(tmp_path)
    make_store(tmp_path / "store", "toy-dec", decoder=True, best_layer=4)
    groups = [{"model": "toy-dec", "pooling": "mean", "layers": [3, 4], "operator": "concat"}]
    settings = train_settings(TrainSettings(seeds=(0,), max_epochs=40, patience=2, batch_size=32, lr=0.05,
                                            mlp=MlpOptions(widths=(64,), dropout=0.0)))
    cache = LayerCache(tmp_path / "store" / "embeddings", "toy")
    out = tmp_path / "heads" / "mlp"
    config = fit_head(cache, {"row": "t", "groups": groups}, "mlp", 0, settings, out, ["c0", "c1"], {"toy-dec": True},
                      tmp_path / ".trainer")
    assert config["epochs"] < 40, "a 64-wide MLP at lr 0.05 on 240 rows overfits: early stopping should end it"
    assert config["epochs"] == config["best_epoch"] + settings["patience"] + 1
    assert os.listdir(scratch) == [] and not list(tmp_path.rglob("*.ckpt"))
    assert not (tmp_path / "lightning_logs").exists()
    net, _ = load_head(out)                 # the saved weights are the ones validation was scored with
    mean, std = load_standardisation(out)
    x = torch.cat([torch.from_numpy(cache.store("toy-dec").layer("validation", "mean", l)) for l in (3, 4)], 1)
    with torch.no_grad():
        pred = net((x - mean) / std).argmax(-1)
    accuracy = float((pred == cache.labels("toy-dec", "validation")).float().mean())
    assert accuracy == pytest.approx(config["validation"]["accuracy"], abs=1e-6)


def test_train_dataset_compares_the_gate_on_identical_inputs_and_writes_typed_results(tmp_path, monkeypatch):
    from pipeline.core.records import HeadResults
    from pipeline.heads.training import train_dataset
    monkeypatch.chdir(tmp_path)
    make_store(tmp_path / "store", "toy-dec", decoder=True, best_layer=4, num_layers=6)
    make_store(tmp_path / "store", "toy-enc", best_layer=2, num_layers=4, dim=8, poolings=("mean", "first"), seed=1)
    chosen = _chosen_two_models("last", "first", "toy-dec", "toy-enc", dec_layers=6, enc_layers=4)
    settings = train_settings(TrainSettings(heads=("linear", "cooccurrence", "scalar_mix", "gated"), seeds=(0,),
                                            max_epochs=4, patience=2, batch_size=64, lr=0.01, threads=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        written = train_dataset(tmp_path / "store" / "embeddings", "toy", chosen, settings, tmp_path / "heads")
        # train.threads holds only inside the stage: a stage run in-process used to leave torch on one
        # thread, and later extraction in the same process rounded differently (a test-order failure)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    result = HeadResults.from_json(json.loads(json.dumps(written)))     # results.json is a HeadResults record
    assert result.to_json() == written
    rows = {(r.row, r.head): r for r in result.results}
    co = rows[("LLMEmbed inputs (co-occurrence)", "cooccurrence")]
    assert co.groups == [{"model": "toy-dec", "pooling": "mean", "layers": [1, 2, 3, 4, 5], "operator": "concat"},
                         {"model": "toy-enc", "pooling": "mean", "layers": [3], "operator": "concat"}]
    assert set(rows[("toy-dec: all layers", "gated")].paired_tests) >= {"linear on the same inputs",
                                                                       "scalar_mix on the same inputs"}
    assert "cooccurrence on the same inputs" in rows[("LLMEmbed inputs (co-occurrence)", "gated")].paired_tests
    assert "linear on the same inputs" in rows[("multi-model: best fusion", "gated")].paired_tests
    gates = json.loads((tmp_path / "heads" / "gated" / "gate_weights.json").read_text())
    assert [g["row"] for g in gates] == ["toy-dec: all layers", "toy-enc: all layers", "multi-model: best fusion",
                                         "LLMEmbed inputs (co-occurrence)"]
    for entry in gates:
        assert len(entry["sources"]) == len(entry["per_class"][0]) and entry["split"] == "validation"
        assert all(sum(w) == pytest.approx(1.0, abs=1e-4) for w in entry["per_class"])
        assert (tmp_path / "heads" / entry["folder"] / "seed0" / "gate_weights.json").is_file()
    from pipeline.report.dataset_report import DatasetResults, gated_section
    data = DatasetResults("toy", {}, None, [], result, {}, gates)
    lines = gated_section(data, tmp_path / "figures")
    assert ("LLMEmbed inputs (co-occurrence): toy-dec mean-pooled layers 1, 2, 3, 4, 5; "
            "toy-enc mean-pooled layer 3.") in lines
    same = [line for line in lines if line.startswith("| ") and "| against |" not in line]
    assert len(same) == 2 + 2 + 1 + 1            # all layers x2 (linear, scalar_mix), multi (linear), LLMEmbed (co-occurrence)
    assert "| toy-dec: all layers | scalar_mix | " in "\n".join(same)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "toy_gates_LLMEmbed-inputs-co-occurrence.png", "toy_gates_multi-model-best-fusion.png",
        "toy_gates_toy-dec-all-layers.png", "toy_gates_toy-enc-all-layers.png"]
    # compare takes each head type's results as trained with the shared keys and its own options only: another
    # head's options may change (its stage alone reruns), a shared key may not without retraining
    from pipeline.core.records import ResultFileError
    from pipeline.heads.comparison import compare_heads
    others = {**settings, "mlp": {**settings["mlp"], "widths": [7]}}                # mlp is not among these heads
    assert compare_heads(tmp_path / "heads", "toy", others)["results"] == written["results"]
    with pytest.raises(ResultFileError, match=r"heads/linear/results\.json was trained with other train settings"):
        compare_heads(tmp_path / "heads", "toy", {**settings, "max_epochs": 5})


def test_compare_lists_the_rows_in_the_plans_order_whatever_the_order_of_train_heads(tmp_path):
    """The report's table follows training.plan_runs (per model: last, best layer, fusion, LLMEmbed recipe,
    all layers; then the multi-model fusion), not the order in which the head types' stages are joined."""
    from pipeline.heads.training import train_dataset
    make_store(tmp_path / "store", "toy-dec", decoder=True, best_layer=4, num_layers=6)
    make_store(tmp_path / "store", "toy-enc", best_layer=2, num_layers=4, dim=8, poolings=("mean", "first"), seed=1)
    chosen = _chosen_two_models("last", "first", "toy-dec", "toy-enc", dec_layers=6, enc_layers=4)
    settings = train_settings(TrainSettings(heads=("scalar_mix", "linear"), seeds=(0,), max_epochs=2, patience=1,
                                            batch_size=64, threads=1))
    written = train_dataset(tmp_path / "store" / "embeddings", "toy", chosen, settings, tmp_path / "heads")
    plan = [run["row"] for run in plan_runs(chosen, list(settings["heads"]))]
    rows = [r["row"] for r in written["results"]]
    assert rows == sorted(rows, key=plan.index)
    assert rows.index("toy-dec: all layers") < rows.index("toy-enc: last layer") < rows.index("multi-model: best fusion")
