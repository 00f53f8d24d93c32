"""Stores on S3 through zarr's FsspecStore and s3fs, against a real S3-compatible server on loopback
(moto's server in its own process): write, SIGKILL and resume, read a layer, verify, score (Stage 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from conftest import REPO, tiny_llama_entry
from pipeline import location
from pipeline.config import load_params
from pipeline.errors import ConfigError
from pipeline.extract import extract
from pipeline.bench.s3_server import start_moto_server
from pipeline.store import EmbeddingStore
from test_extract import prepare

SETTINGS = {"block_rows": 16, "token_budget": 256, "device": "cpu"}


@pytest.fixture(scope="module")
def s3_server():
    server, endpoint = start_moto_server()
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket; credentials and endpoint in the environment only, as for users."""
    import boto3
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": s3_server}.items():
        monkeypatch.setenv(key, value)
    bucket = f"emb-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return bucket


def s3_params(make_params, mr_slice, prepared_models, folder: Path, embeddings: str, extract: dict | None = None):
    path = make_params(mr_slice, ["tiny-llama"], ["mrslice"], extract={**SETTINGS, **(extract or {})},
                       extra_models=tiny_llama_entry(prepared_models), folder=folder)
    raw = yaml.safe_load(path.read_text())
    raw["paths"]["embeddings"] = embeddings
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def arrays(store_location) -> dict[str, np.ndarray]:
    root = zarr.open_group(location.zarr_store(store_location, read_only=True), mode="r")
    return {f"{split}/{name}": array[:] for split in ("train", "validation", "test")
            for name, array in root[split].arrays()}


def test_credentials_never_come_from_params(mr_slice, make_params, prepared_models, tmp_path):
    path = s3_params(make_params, mr_slice, prepared_models, tmp_path, "s3://key:secret@bucket/emb")
    with pytest.raises(ConfigError, match="paths.embeddings: must not hold credentials"):
        load_params(path)
    url = "s3://bucket/emb"
    params = load_params(s3_params(make_params, mr_slice, prepared_models, tmp_path, url))
    assert params.embeddings_path("tiny-llama", "mrslice") == f"{url}/mrslice/tiny-llama"
    assert params.model_dir("tiny-llama") == params.store / "models" / "tiny-llama"   # models stay local


@pytest.mark.slow
def test_s3_store_killed_resumed_read_verified_and_scored(s3_bucket, mr_slice, make_params, prepared_models,
                                                          tmp_path):
    import boto3
    from pipeline.probe import Protocol
    from pipeline.scoring import score_layers
    from pipeline.verify import verify_store

    local = prepare(make_params(mr_slice, ["tiny-llama"], ["mrslice"], extract=SETTINGS,
                                extra_models=tiny_llama_entry(prepared_models), folder=tmp_path / "local"),
                    "mrslice", prepared_models, ["tiny-llama"])
    extract(local, "tiny-llama", "mrslice", show_progress=False)
    local_path = local.embeddings_path("tiny-llama", "mrslice")

    params_path = s3_params(make_params, mr_slice, prepared_models, tmp_path / "s3", f"s3://{s3_bucket}/emb")
    params = prepare(params_path, "mrslice", prepared_models, ["tiny-llama"])
    url = params.embeddings_path("tiny-llama", "mrslice")
    assert url == f"s3://{s3_bucket}/emb/mrslice/tiny-llama"
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    process = subprocess.Popen([sys.executable, "-m", "stages.extract", "--params", str(params_path), "--model",
                                "tiny-llama", "--dataset", "mrslice", "--no-progress"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and client.list_objects_v2(
            Bucket=s3_bucket, Prefix="emb/mrslice/tiny-llama/train/_done/c/").get("KeyCount", 0) < 3:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    partial = EmbeddingStore(url, allow_incomplete=True)
    done_at_kill = sum(partial.completion(s)[0] for s in partial.splits)
    total = sum(partial.completion(s)[1] for s in partial.splits)
    assert 0 < done_at_kill < total, f"the kill must land mid-run ({done_at_kill}/{total})"

    summary = extract(load_params(params_path), "tiny-llama", "mrslice", show_progress=False)
    assert summary["blocks"] == total - done_at_kill, "a finished block was computed again"
    ours, theirs = arrays(url), arrays(local_path)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)

    remote = EmbeddingStore(url)
    np.testing.assert_array_equal(remote.layer("train", "mean", 2),
                                  EmbeddingStore(local_path).layer("train", "mean", 2))
    assert verify_store(url) == []

    protocol = Protocol(name="validation", rank=16, pca_rows=256, bootstrap=10)                 # Stage 2 straight from S3
    on_s3 = score_layers(remote, protocol, "tiny-llama", poolings=["mean"])
    on_disk = score_layers(EmbeddingStore(local_path), protocol, "tiny-llama", poolings=["mean"])
    assert [r["score"] for r in on_s3["rows"]] == [r["score"] for r in on_disk["rows"]]
    assert on_s3["ranking"] == on_disk["ranking"]
