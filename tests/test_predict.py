"""predict and export: exact agreement with the train stage, minimal work, self-contained export."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from pipeline.sources.corpora import read_corpus
from pipeline.core.errors import HeadError, ModelSourceError
from pipeline.heads.export import export
from pipeline.extract.driver import extract
from pipeline.heads.predict import Predictor, uses_from_store
from test_extract import prepare

pytestmark = pytest.mark.slow     # real MiniLM store, a trained head, predict in subprocesses

INPUTS = [{"model": "minilm-l6", "pooling": "mean", "layers": [2, 4], "operator": "mean"},
          {"model": "minilm-l6", "pooling": "first", "layers": [3], "operator": "concat"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mr_slice, prepared_models):
    """A MiniLM store (float32 compute, so batch composition cannot move a bit) and an MLP head on it."""
    from conftest import registry
    import yaml
    from pipeline.heads.datamodule import LayerCache
    from pipeline.heads.training import fit_head, train_settings
    folder = tmp_path_factory.mktemp("predict")
    raw = registry()
    raw["paths"] = {"store": str(folder / "store"), "data_mirror": str(mr_slice)}
    raw["select"] = {"models": ["minilm-l6"], "datasets": ["mrslice"]}
    raw["extract"].update(block_rows=64, max_len=48, compute_dtype="float32")
    raw["datasets"]["mrslice"] = {"text_column": "text", "label_column": "label",
                                  "local": {"train": "mrslice/train.jsonl", "test": "mrslice/test.jsonl"}}
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    params = prepare(folder / "params.yaml", "mrslice", prepared_models, ["minilm-l6"])
    extract(params, "minilm-l6", "mrslice", show_progress=False)
    from pipeline.config.sections import MlpOptions, TrainSettings
    settings = train_settings(TrainSettings(max_epochs=5, patience=2, mlp=MlpOptions(widths=(64,), dropout=0.1)))
    cache = LayerCache(params.embeddings_root, "mrslice")
    labels = cache.store("minilm-l6").label_names
    head_dir = folder / "store" / "heads" / "mrslice" / "mlp" / "seed0"
    fit_head(cache, {"row": "test fusion", "groups": INPUTS}, "mlp", 0, settings, head_dir, labels,
             {"minilm-l6": False}, folder / "lightning")
    return params, head_dir, cache


def _reference(head_dir, cache):
    """What the train stage computed on test: the head on the stored, standardised test vectors."""
    from pipeline.heads.networks import load_head, load_standardisation
    net, config = load_head(head_dir)
    mean, std = load_standardisation(head_dir)
    x = torch.cat([torch.from_numpy(cache.store(m).layer("test", p, l)) for m, p, l in config["inputs"]], dim=1)
    with torch.no_grad():
        return torch.softmax(net((x - mean) / std), -1).numpy(), config


def test_predict_reproduces_the_train_stage_on_test(trained):
    params, head_dir, cache = trained
    reference, config = _reference(head_dir, cache)
    predictor = Predictor(head_dir, uses_from_store(config, params.embeddings_root, "mrslice", params.store / "models"))
    texts = read_corpus(params.data_dir("mrslice")).splits["test"].texts
    probabilities, truncated = predictor.predict_proba(texts)
    np.testing.assert_array_equal(probabilities.argmax(1), reference.argmax(1))
    np.testing.assert_allclose(probabilities, reference, atol=1e-4)
    accuracy = float((probabilities.argmax(1) == cache.store("minilm-l6").labels("test")).mean())
    assert accuracy == pytest.approx(config["test"]["accuracy"], abs=1e-6)
    # only what the fusion needs: MiniLM's blocks 1..4 of 6, poolings mean and first
    use = predictor.uses["minilm-l6"]
    assert use.deepest == 4 and sorted(use.layers) == ["first", "mean"]
    assert use.blocks_skipped == pytest.approx(1 / 3)


def test_export_runs_elsewhere_and_refuses_other_weights(trained, tmp_path, monkeypatch):
    params, head_dir, cache = trained
    _, config = _reference(head_dir, cache)
    predictor = Predictor(head_dir, uses_from_store(config, params.embeddings_root, "mrslice", params.store / "models"))
    folder = export(predictor, tmp_path / "classifier", "mrslice")
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["inputs"] == config["inputs"] and manifest["label_names"] == ["negative", "positive"]
    assert manifest["models"]["minilm-l6"]["weights_sha256"] == predictor.uses["minilm-l6"].weights_sha256
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    texts = ["a quietly devastating film", "tedious and badly acted"]
    expected, _ = predictor.predict_proba(texts)
    result = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--from-export", str(folder), *texts],
                            capture_output=True, text=True, cwd=elsewhere, env={"PYTHONPATH": str(REPO),
                                                                                 "PATH": "/usr/bin:/bin",
                                                                                 "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    got = np.array([[line["probabilities"][n] for n in ("negative", "positive")] for line in lines])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    weights = folder / "models" / "minilm-l6" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(HeadError, match="models/minilm-l6/model.safetensors is missing or damaged: sha256"):
        Predictor.from_export(folder)
    manifest["files_sha256"]["models/minilm-l6/model.safetensors"] = hashlib.sha256(bytes(data)).hexdigest()
    (folder / "export.json").write_text(json.dumps(manifest))    # listed anew: still not the weights it was trained on
    with pytest.raises(ModelSourceError, match="has weights sha256 .* refusing to predict"):
        Predictor.from_export(folder)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "standardisation.safetensors"])
def test_a_head_file_changed_by_one_bit_is_refused_by_name(trained, tmp_path, name):
    """One flipped bit in standardisation.safetensors once turned positive 0.88 into negative 1.0, rc 0
    (issue 22, item 5): every head file's sha256 is in its config.json."""
    params, head_dir, cache = trained
    _, config = _reference(head_dir, cache)
    assert set(config["files_sha256"]) == {"model.safetensors", "standardisation.safetensors"}
    copy = tmp_path / "head"
    shutil.copytree(head_dir, copy)
    _flip_last_byte(copy / name)
    with pytest.raises(HeadError, match=rf"{name} is missing or damaged: sha256 .* differs from the .* recorded in "
                                        rf".*config.json"):
        Predictor(copy, uses_from_store(config, params.embeddings_root, "mrslice", params.store / "models"))


def test_an_export_lists_every_file_digest_and_refuses_a_changed_file(trained, tmp_path):
    params, head_dir, cache = trained
    _, config = _reference(head_dir, cache)
    predictor = Predictor(head_dir, uses_from_store(config, params.embeddings_root, "mrslice", params.store / "models"))
    folder = export(predictor, tmp_path / "classifier", "mrslice")
    listed = json.loads((folder / "export.json").read_text())["files_sha256"]
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "export.json")
    assert sorted(listed) == on_disk
    for name, digest in listed.items():                  # independent: hashlib over each file
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    for name in ("head/config.json", "head/standardisation.safetensors", "models/minilm-l6/tokenizer.json"):
        changed = tmp_path / name.replace("/", "_")
        shutil.copytree(folder, changed)
        _flip_last_byte(changed / name)
        with pytest.raises(HeadError, match=re.escape(name) + " is missing or damaged: sha256 .* recorded in .*export.json"):
            Predictor.from_export(changed)


def test_bad_lines_get_their_own_result_and_the_file_goes_on(trained, tmp_path):
    params, head_dir, cache = trained
    _, config = _reference(head_dir, cache)
    predictor = Predictor(head_dir, uses_from_store(config, params.embeddings_root, "mrslice", params.store / "models"))
    folder = export(predictor, tmp_path / "classifier", "mrslice")
    lines = [b'{"id": "a", "text": "lovely"}', b"", b'{"id": "b", "text": "caf\xe9"}',
             b'{"id": "c", "text": "' + b"long " * 200_000 + b'"}', b"not json", b'{"id": "d", "text": "awful"}',
             b'{"id": "e", "text": "half an emoji \\ud83d here"}']
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--from-export", str(folder), "--file",
                             str(source), "--text-field", "text", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "2", "3", "c", "5", "d", "e"]
    assert "label" in rows[0] and rows[3]["truncated"] is True and rows[5]["truncated"] is False
    assert rows[1]["error"].startswith("not a JSON object")
    assert rows[2]["error"] == "invalid UTF-8 at byte 24"
    assert rows[4]["error"].startswith("not a JSON object")
    assert rows[6]["error"] == "text holds a lone surrogate (U+D83D) at character 14, not valid Unicode"


@pytest.fixture(scope="module")
def trained_gated(trained):
    """A gated head on the same store: three sources (MiniLM mean layers 2 and 4, first layer 3)."""
    from pipeline.config.sections import GatedOptions, TrainSettings
    from pipeline.heads.training import fit_head, train_settings
    params, head_dir, cache = trained
    settings = train_settings(TrainSettings(max_epochs=5, patience=2, gated=GatedOptions(width=32)))
    gated_dir = head_dir.parent.parent / "gated" / "seed0"
    config = fit_head(cache, {"row": "test fusion", "groups": INPUTS}, "gated", 0, settings, gated_dir,
                      cache.store("minilm-l6").label_names, {"minilm-l6": False}, gated_dir.parent / "lightning")
    return params, gated_dir, cache, config


def test_gated_head_predicts_through_an_export_what_the_train_stage_computed(trained_gated, tmp_path):
    params, head_dir, cache, trained_config = trained_gated
    reference, config = _reference(head_dir, cache)
    assert config["head"] == "gated" and len(config["inputs"]) == 3
    predictor = Predictor(head_dir, uses_from_store(config, params.embeddings_root, "mrslice", params.store / "models"))
    folder = export(predictor, tmp_path / "gated-classifier", "mrslice")
    assert sorted(p.name for p in (folder / "head").iterdir()) == ["config.json", "model.safetensors",
                                                                   "standardisation.safetensors"]
    exported = Predictor.from_export(folder)
    texts = read_corpus(params.data_dir("mrslice")).splits["test"].texts
    probabilities, _ = exported.predict_proba(texts)
    np.testing.assert_allclose(probabilities, reference, atol=1e-4)
    from safetensors.torch import load_file
    stage = load_file(str(head_dir / "test_predictions.safetensors"))["predictions"].numpy()
    np.testing.assert_array_equal(probabilities.argmax(1), stage)              # the train stage's own test predictions
    accuracy = float((probabilities.argmax(1) == cache.store("minilm-l6").labels("test")).mean())
    assert accuracy == pytest.approx(trained_config["test"]["accuracy"], abs=1e-6)
    with torch.no_grad():                    # the exported gate is still a distribution over the three sources
        gates = exported.net.gates(exported.features(texts[:8])[0])
    assert torch.allclose(gates.sum(-1), torch.ones(8), atol=1e-6)
