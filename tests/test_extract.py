"""Extraction end to end on real models and a real corpus slice: the store, resume, fingerprint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import REPO, link_prepared, tiny_llama_entry
from pipeline.config.params import load_params
from pipeline.sources.corpora import build_corpus, write_corpus
from pipeline.core.errors import StoreMismatchError
from pipeline.extract.driver import extract
from pipeline.store.inspect import summarise
from pipeline.store.reader import EmbeddingStore, open_store


def prepare(params_path: Path, dataset: str, prepared: Path, models: list[str]):
    params = load_params(params_path)
    write_corpus(build_corpus(params.dataset(dataset), params.data_mirror, params.data), params.data_dir(dataset))
    link_prepared(prepared, params.store, models)
    return params


@pytest.mark.slow
def test_minilm_on_mr_slice_end_to_end(mr_slice, make_params, prepared_models):
    params = prepare(make_params(mr_slice, ["minilm-l6"], ["mrslice"], extract={"max_len": 16}),
                     "mrslice", prepared_models, ["minilm-l6"])
    summary = extract(params, "minilm-l6", "mrslice", show_progress=False)
    store = open_store(params.embeddings_root, "minilm-l6", "mrslice")
    assert store.splits == ["train", "validation", "test"]
    assert [store.num_rows(s) for s in store.splits] == [216, 24, 80]      # 10% of 240 carved, stratified
    assert store.num_layers == 7 and store.dim == 384
    assert store.poolings == ["mean", "last", "first", "max", "mean_nospecial"]
    assert summary["texts"] == 320 and summary["tokens"] > 0
    assert np.bincount(store.labels("validation")).tolist() == [12, 12]
    layer = store.layer("train", "mean", -1)
    assert layer.dtype == np.float32 and layer.shape == (216, 384) and np.isfinite(layer).all()
    np.testing.assert_array_equal(store.layers("train", "mean", [2, 6])[:, 1], layer)
    counts, truncated = store.meta("train", "token_count"), store.meta("train", "truncated")
    assert (truncated == (counts > 16)).all() and truncated.any() and (~truncated).any()
    # CLS pooling ("first") differs from the mean; the stored vectors really are per pooling
    assert not np.allclose(store.layer("train", "first", -1), layer)
    report = summarise(params.embeddings_path("minilm-l6", "mrslice"))
    assert report["complete"] and report["bytes"] > 0


@pytest.mark.slow
def test_decoder_store_with_tiny_llama_and_float16_overflow(mr_slice, make_params, prepared_models, tmp_path):
    """Hidden states past float16's range are never stored as inf: that array falls back to float32."""
    from conftest import make_tiny_llama
    from pipeline.config.sections import ModelSpec
    from pipeline.sources.models import materialise
    hot = make_tiny_llama(tmp_path / "hot-src", scale=1e7)
    params_path = make_params(mr_slice, ["hot-llama"], ["mrslice"],
                              extra_models={"hot-llama": {"source": "local", "path": str(hot)}})
    params = prepare(params_path, "mrslice", prepared_models, [])
    materialise(ModelSpec(name="hot-llama", source="local", path=str(hot)), params.model_dir("hot-llama"))
    extract(params, "hot-llama", "mrslice", show_progress=False)
    store = open_store(params.embeddings_root, "hot-llama", "mrslice")
    fallback = store.attrs["dtype_fallback"]
    assert fallback, "scaled-up embeddings must overflow float16 somewhere"
    for key in fallback:
        split, pooling = key.split("/")
        assert store.root[split][pooling].dtype == np.float32
    for split in store.splits:
        for pooling in store.poolings:
            values = store.layers(split, pooling)
            assert np.isfinite(values).all(), f"{split}/{pooling} holds inf or NaN"
    assert store.attrs["info"]["decoder"] is True


def _arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    out = {}
    for split in ("train", "validation", "test"):
        for name, array in root[split].arrays():
            out[f"{split}/{name}"] = array[:]
    return out


def _run_extract(params_path: Path, model: str, dataset: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.extract", "--params", str(params_path), "--model", model,
                             "--dataset", dataset, "--no-progress"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(mr_slice, make_params, prepared_models, tmp_path):
    settings = {"block_rows": 16, "token_budget": 256}
    reference = prepare(make_params(mr_slice, ["tiny-llama"], ["mrslice"], extract=settings,
                                    extra_models=tiny_llama_entry(prepared_models), folder=tmp_path / "a"),
                        "mrslice", prepared_models, ["tiny-llama"])
    extract(reference, "tiny-llama", "mrslice", show_progress=False)

    params_path = make_params(mr_slice, ["tiny-llama"], ["mrslice"], extract=settings,
                              extra_models=tiny_llama_entry(prepared_models), folder=tmp_path / "b")
    params = prepare(params_path, "mrslice", prepared_models, ["tiny-llama"])
    done_dir = params.embeddings_path("tiny-llama", "mrslice") / "train" / "_done" / "c"
    process = _run_extract(params_path, "tiny-llama", "mrslice")
    deadline = time.time() + 120
    while time.time() < deadline and (not done_dir.exists() or len(list(done_dir.iterdir())) < 3):
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = EmbeddingStore(params.embeddings_path("tiny-llama", "mrslice"), allow_incomplete=True)
    done_at_kill = sum(partial.completion(s)[0] for s in partial.splits)
    total = sum(partial.completion(s)[1] for s in partial.splits)
    assert 0 < done_at_kill < total, "the kill must land mid-run"

    summary = extract(load_params(params_path), "tiny-llama", "mrslice", show_progress=False)
    assert summary["blocks"] == total - done_at_kill, "a finished block was computed again"
    ours, theirs = _arrays(params.embeddings_path("tiny-llama", "mrslice")), _arrays(
        reference.embeddings_path("tiny-llama", "mrslice"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


@pytest.mark.slow
def test_fingerprint_mismatch_is_refused_and_rebuild_works(mr_slice, make_params, prepared_models, tmp_path):
    params = prepare(make_params(mr_slice, ["minilm-l6"], ["mrslice"], extract={"max_len": 16}),
                     "mrslice", prepared_models, ["minilm-l6"])
    extract(params, "minilm-l6", "mrslice", show_progress=False)
    changed = load_params(make_params(mr_slice, ["minilm-l6"], ["mrslice"], extract={"max_len": 24}))
    with pytest.raises(StoreMismatchError, match=r"extract\.max_len: store has 16, params give 24"):
        extract(changed, "minilm-l6", "mrslice", show_progress=False)
    again = extract(params, "minilm-l6", "mrslice", show_progress=False)
    assert again["texts"] == 0, "an unchanged, complete store is left alone"
    rebuilt = extract(changed, "minilm-l6", "mrslice", rebuild=True, show_progress=False)
    assert rebuilt["texts"] == 320
    assert open_store(changed.embeddings_root, "minilm-l6", "mrslice").attrs["fingerprint"]["extract"]["max_len"] == 24


@pytest.mark.slow
def test_extract_stage_prints_a_clear_error_for_a_mismatch(mr_slice, make_params, prepared_models):
    params = prepare(make_params(mr_slice, ["minilm-l6"], ["mrslice"], extract={"max_len": 16}),
                     "mrslice", prepared_models, ["minilm-l6"])
    extract(params, "minilm-l6", "mrslice", show_progress=False)
    params_path = make_params(mr_slice, ["minilm-l6"], ["mrslice"], extract={"poolings": ["mean"], "max_len": 16})
    result = subprocess.run([sys.executable, "-m", "stages.extract", "--params", str(params_path), "--model",
                             "minilm-l6", "--dataset", "mrslice"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "extract.poolings" in result.stderr and "--rebuild" in result.stderr
    assert "Traceback" not in result.stderr


def test_helper_threads_only_where_the_cpu_is_not_the_one_computing():
    from pipeline.extract.block_loop import overlaps
    assert not overlaps(torch.device("cpu"), Path("/data/store"))          # they would take the forward's cycles
    assert overlaps(torch.device("cpu"), "s3://bucket/prefix/store")       # writes wait on the network
    assert overlaps(torch.device("cuda"), Path("/data/store"))             # the CPU is free while the GPU computes


def test_a_store_written_in_line_equals_one_written_by_helper_threads(mr_slice, make_params, prepared_models, tmp_path,
                                                                      monkeypatch):
    """The same blocks, digests, done marks and attention entropy, bit for bit, whichever way the loop runs."""
    from pipeline.extract import block_loop
    settings = {"block_rows": 16, "token_budget": 256, "max_len": 32, "compute_dtype": "float32", "device": "cpu",
                "attention_entropy_rows": 5}
    stores = {}
    for overlap in (False, True):
        monkeypatch.setattr(block_loop, "overlaps", lambda device, path, overlap=overlap: overlap)
        params = prepare(make_params(mr_slice, ["tiny-llama"], ["mrslice"], extract=settings,
                                     extra_models=tiny_llama_entry(prepared_models), folder=tmp_path / str(overlap)),
                         "mrslice", prepared_models, ["tiny-llama"])
        extract(params, "tiny-llama", "mrslice", show_progress=False)
        stores[overlap] = _arrays(params.embeddings_path("tiny-llama", "mrslice"))
    assert stores[False].keys() == stores[True].keys() and len(stores[False]) > 10
    for name, values in stores[False].items():
        np.testing.assert_array_equal(values, stores[True][name], err_msg=name)
