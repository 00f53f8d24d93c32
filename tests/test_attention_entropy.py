"""Attention entropy stored beside the pooled vectors (issue 14): its values against a hand computation,
its seeded sample, resume, its digest, and stores without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from conftest import tiny_llama_entry
from pipeline.config.sections import ModelSpec
from pipeline.config.params import load_params
from pipeline.sources.corpora import read_corpus
from pipeline.core.errors import StoreDamagedError, StoreMismatchError
from pipeline.extract.driver import extract
from pipeline.store.inspect import summarise
from pipeline.sources.models import load_model
from pipeline.store.reader import open_store
from pipeline.store.verify import verify_store
from test_extract import prepare

SETTINGS = {"block_rows": 16, "token_budget": 256, "max_len": 32, "compute_dtype": "float32", "device": "cpu",
            "attention_entropy_rows": 5}


def _tiny_store(mr_slice, make_params, prepared_models, tmp_path, **extract_settings):
    params = prepare(make_params(mr_slice, ["tiny-llama"], ["mrslice"], extract={**SETTINGS, **extract_settings},
                                 extra_models=tiny_llama_entry(prepared_models), folder=tmp_path),
                     "mrslice", prepared_models, ["tiny-llama"])
    extract(params, "tiny-llama", "mrslice", show_progress=False)
    return params


def _entropy_by_hand(probabilities: np.ndarray) -> float:
    """[heads, queries, keys] attention probabilities -> mean over heads and queries of -sum p log p."""
    p = probabilities.astype(np.float64)
    per_query = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=-1)
    return float(per_query.mean())


def test_entropy_matches_a_hand_computation_on_a_tiny_llama(mr_slice, make_params, prepared_models, tmp_path):
    params = _tiny_store(mr_slice, make_params, prepared_models, tmp_path)
    store = open_store(params.embeddings_root, "tiny-llama", "mrslice")
    entropy, sampled = store.attention_entropy("train"), store.attention_sampled("train")
    assert entropy.shape == (216, 4) and entropy.dtype == np.float32       # 3 blocks + the embedding output
    assert [int(sampled[b:b + 16].sum()) for b in range(0, 216, 16)] == [5] * 14
    assert np.isnan(entropy[:, 0]).all(), "the embedding output has no attention"
    assert np.isnan(entropy[~sampled]).all() and np.isfinite(entropy[sampled, 1:]).all()

    # the hand computation: one text at a time (no padding), eager attention's probabilities, numpy entropy
    model, tokenizer = load_model(params.model_dir("tiny-llama"), ModelSpec(name="tiny-llama", source="local", path="."),
                                  "cpu", torch.float32, "eager")
    texts = read_corpus(params.data_dir("mrslice")).splits["train"].texts
    rows = np.flatnonzero(sampled)
    for row in rows[:: max(1, len(rows) // 12)]:
        inputs = tokenizer(texts[row], truncation=True, max_length=32, return_tensors="pt")
        with torch.inference_mode():
            attentions = model(**inputs, output_attentions=True).attentions
        assert len(attentions) == 3
        expected = [_entropy_by_hand(layer[0].numpy()) for layer in attentions]
        np.testing.assert_allclose(entropy[row, 1:], expected, rtol=1e-5, atol=1e-5, err_msg=f"row {row}")
    assert np.ptp(entropy[sampled, 1]) > 0.1, "texts of different lengths have different entropies"

    report = summarise(params.embeddings_path("tiny-llama", "mrslice"))
    assert report["attention_entropy"] == {"rows_per_block": 5,
                                           "sampled": {"train": 70, "validation": 10, "test": 25}}


def test_redone_blocks_give_the_same_entropy_and_damage_is_detected(mr_slice, make_params, prepared_models, tmp_path):
    params = _tiny_store(mr_slice, make_params, prepared_models, tmp_path)
    path = params.embeddings_path("tiny-llama", "mrslice")
    before = open_store(params.embeddings_root, "tiny-llama", "mrslice").attention_entropy("train").copy()

    # damage two blocks' entropy behind the writer's back: reads and verify name the block
    root = zarr.open_group(str(path), mode="r+")
    root["train"]["attention_entropy"][16:32] = 1.0
    with pytest.raises(StoreDamagedError, match=r"train/attention_entropy block 1 is damaged"):
        open_store(params.embeddings_root, "tiny-llama", "mrslice").attention_entropy("train")
    problems = [p for p in verify_store(path) if p.serious]
    assert [(p.kind, p.split, p.array, p.block) for p in problems] == [("checksum", "train", "attention_entropy", 1)]

    # resume: blocks 1 and 3 redone alone (other batches, other neighbours) give the same bits
    root["train"]["attention_entropy"][48:64] = 0.0
    root["train"]["_done"][1] = 0
    root["train"]["_done"][3] = 0
    summary = extract(params, "tiny-llama", "mrslice", show_progress=False)
    assert summary["blocks"] == 2
    after = open_store(params.embeddings_root, "tiny-llama", "mrslice").attention_entropy("train")
    np.testing.assert_array_equal(after, before)
    assert not [p for p in verify_store(path) if p.serious]


def test_a_store_without_entropy_says_so_and_is_not_resumed_with_it(mr_slice, make_params, prepared_models, tmp_path):
    params = _tiny_store(mr_slice, make_params, prepared_models, tmp_path / "a", attention_entropy_rows=0)
    store = open_store(params.embeddings_root, "tiny-llama", "mrslice")
    assert not store.has_attention_entropy and "attention_entropy" not in store.root["train"]
    with pytest.raises(StoreMismatchError, match="holds no attention entropy"):
        store.attention_entropy("train")
    assert summarise(params.embeddings_path("tiny-llama", "mrslice"))["attention_entropy"] is None

    # a store from before the setting (its fingerprint lacks the key) reads as rows 0: refused with rows 5
    root = zarr.open_group(str(params.embeddings_path("tiny-llama", "mrslice")), mode="r+")
    fingerprint = root.attrs["fingerprint"]
    del fingerprint["extract"]["attention_entropy_rows"]
    root.attrs["fingerprint"] = fingerprint
    assert extract(params, "tiny-llama", "mrslice", show_progress=False)["texts"] == 0
    with_entropy = load_params(make_params(mr_slice, ["tiny-llama"], ["mrslice"], extract=SETTINGS,
                                           extra_models=tiny_llama_entry(prepared_models), folder=tmp_path / "a"))
    with pytest.raises(StoreMismatchError, match=r"extract\.attention_entropy_rows: store has 0, params give 5"):
        extract(with_entropy, "tiny-llama", "mrslice", show_progress=False)


def test_score_stage_compares_mean_attention_entropy_with_the_probe(mr_slice, make_params, prepared_models, tmp_path):
    from pipeline.select.layer_geometry import mean_attention_entropy
    from pipeline.select.probe import Protocol
    from pipeline.select.scoring import score_layers
    params = _tiny_store(mr_slice, make_params, prepared_models, tmp_path)
    store = open_store(params.embeddings_root, "tiny-llama", "mrslice")
    means, rows = mean_attention_entropy(store)
    sampled = store.attention_entropy("train")[store.attention_sampled("train")]
    assert rows == 70 and np.isnan(means[0])
    np.testing.assert_allclose(means[1:], sampled[:, 1:].astype(np.float64).mean(axis=0), rtol=1e-6)

    result = score_layers(store, Protocol(name="validation", rank=8), "tiny-llama", poolings=["mean"],
                          geometry_rows=50, importance_rows=0)
    layers = result["layer_scores"]["layers"]
    np.testing.assert_array_equal(result["attention"]["attention_entropy"], [means[layer] for layer in layers])
    row = result["layer_agreement"]["attention_entropy"]
    assert row["score_top"] != 0 and row["spearman"] is not None
    assert result["layer_scores"]["attention_entropy_rows"] == 70


@pytest.mark.slow
def test_a_model_without_the_attention_interface_gets_a_store_without_entropy(mr_slice, make_params, tmp_path,
                                                                                capfd):
    """MPNet's attention does not go through transformers' attention interface: with the default
    attention_entropy_rows its extraction used to fail after its first block. Now its store records that it
    has none (the fingerprint holds the rows actually used, 0), says so, and a rerun accepts the store."""
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    from conftest import minilm_folder
    from pipeline.sources.models import materialise
    torch.manual_seed(0)
    source = tmp_path / "tiny-mpnet-src"
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    MPNetModel(MPNetConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    entry = {"tiny-mpnet": {"source": "local", "path": str(source)}}
    params = prepare(make_params(mr_slice, ["tiny-mpnet"], ["mrslice"], extract=SETTINGS, extra_models=entry,
                                 folder=tmp_path), "mrslice", tmp_path / "none", [])
    materialise(ModelSpec(name="tiny-mpnet", source="local", path=str(source)), params.model_dir("tiny-mpnet"))
    summary = extract(params, "tiny-mpnet", "mrslice", show_progress=False)
    assert "gets no attention entropy" in capfd.readouterr().err
    store = open_store(params.embeddings_root, "tiny-mpnet", "mrslice")
    assert not store.has_attention_entropy
    assert store.attrs["fingerprint"]["extract"]["attention_entropy_rows"] == 0 and summary["attention_entropy_rows"] == 0
    assert store.num_rows("train") == 216 and np.isfinite(store.layer("train", "mean", 2)).all()
    again = extract(params, "tiny-mpnet", "mrslice", show_progress=False)    # same resolution: accepted, nothing to do
    assert again["texts"] == 0
