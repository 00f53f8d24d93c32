"""Heads with real Lightning on a real store: they learn, save as safetensors + JSON, and load back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from _stage2_store import make_store
from pipeline.config import MlpOptions, TrainSettings
from pipeline.datamodule import LayerCache
from pipeline.heads import CooccurrenceHead, Fuse, ScalarMixHead, load_head, load_standardisation
from pipeline.training import fit_head, plan_runs, spec_from_groups, train_settings


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


@pytest.mark.parametrize("head", ["linear", "mlp", "cooccurrence", "scalar_mix"])
def test_head_trains_saves_and_loads(tmp_path, head, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_store(tmp_path / "store", "toy-dec", decoder=True, best_layer=4)
    groups = {"linear": [{"model": "toy-dec", "pooling": "mean", "layers": [3, 4], "operator": "mean"}],
              "mlp": [{"model": "toy-dec", "pooling": "mean", "layers": [4, 5], "operator": "concat"}],
              "cooccurrence": [{"model": "toy-dec", "pooling": "mean", "layers": [2, 3, 4], "operator": "concat"}],
              "scalar_mix": [{"model": "toy-dec", "pooling": "mean", "layers": list(range(6)), "operator": "concat"}]}
    settings = train_settings(TrainSettings(seeds=(0,), max_epochs=15, patience=3, batch_size=64, lr=0.01,
                                            mlp=MlpOptions(widths=(32,), dropout=0.1)))
    cache = LayerCache(tmp_path / "store", "toy")
    out = tmp_path / "store" / "heads" / head
    config = fit_head(cache, {"row": "t", "groups": groups[head]}, head, 0, settings, out, ["c0", "c1"],
                      {"toy-dec": True}, tmp_path / "store" / ".trainer")
    assert config["validation"]["accuracy"] > 0.7 and config["test"]["accuracy"] > 0.7
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "standardisation.safetensors",
                                       "test_predictions.safetensors"]
    assert not (tmp_path / "lightning_logs").exists() and not list(tmp_path.glob("*.ckpt"))
    net, loaded = load_head(out)
    assert loaded["inputs"] == [["toy-dec", "mean", l] for l in groups[head][0]["layers"]]
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


def test_cache_reads_each_layer_once_and_batches_match_a_concatenation(tmp_path):
    from pipeline.datamodule import LayerCache, LayerDataModule
    from pipeline.probe import standardise_stats
    make_store(tmp_path / "store", "toy-dec", decoder=True)
    cache = LayerCache(tmp_path / "store", "toy")
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
