"""Stores on S3 through zarr's FsspecStore and s3fs, against a real S3-compatible server on loopback
(moto's server in its own process): write, SIGKILL and resume, read a layer, verify, score (Stage 2)."""

from __future__ import annotations

import json
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
from pipeline.core import location
from pipeline.config.params import load_params
from pipeline.core.errors import ConfigError
from pipeline.extract.driver import extract
from pipeline.bench.s3_server import start_moto_server
from pipeline.store.reader import EmbeddingStore
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
    from pipeline.select.probe import Protocol
    from pipeline.select.scoring import score_layers
    from pipeline.store.verify import verify_store

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


def _stage(params: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", *arguments, "--params", str(params)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert not check or done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_stage2_reads_the_s3_store_not_a_conflicting_local_one(s3_bucket, mr_slice, make_params, prepared_models,
                                                              tmp_path):
    """Issue 22, item 1: with paths.embeddings on S3 and an older local store (other settings) where the
    default would be, score, fuse, train and predict all read S3. Extract refuses to bury the local store."""
    import shutil
    from pipeline.heads.predict import read_head_config
    from pipeline.store.record import RECORD
    old = prepare(make_params(mr_slice, ["tiny-llama"], ["mrslice"], extract={**SETTINGS, "max_len": 12},
                              extra_models=tiny_llama_entry(prepared_models), folder=tmp_path / "old"),
                  "mrslice", prepared_models, ["tiny-llama"])
    extract(old, "tiny-llama", "mrslice", show_progress=False)
    params_path = s3_params(make_params, mr_slice, prepared_models, tmp_path / "s3", f"s3://{s3_bucket}/emb",
                            extract={"max_len": 24})
    raw = yaml.safe_load(params_path.read_text())
    raw["score"].update(rank=8, pca_rows=100, bootstrap=5)
    raw["train"].update(heads=["linear"], seeds=[0], max_epochs=2, device="cpu")
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = prepare(params_path, "mrslice", prepared_models, ["tiny-llama"])
    _stage(params_path, "stages.extract", "--model", "tiny-llama", "--dataset", "mrslice", "--no-progress")
    local = params.store / "embeddings" / "mrslice" / "tiny-llama"
    assert sorted(p.name for p in local.iterdir()) == [RECORD]          # DVC's output: the record, not a store
    url = params.embeddings_path("tiny-llama", "mrslice")
    record = json.loads((local / RECORD).read_text())
    assert record["embeddings"] == url and record["generation"] == EmbeddingStore(url).attrs["generation"]

    shutil.rmtree(local)                                                # the conflicting local store
    shutil.copytree(old.embeddings_path("tiny-llama", "mrslice"), local)
    refused = _stage(params_path, "stages.extract", "--model", "tiny-llama", "--dataset", "mrslice",
                     "--no-progress", check=False)
    assert refused.returncode != 0 and "holds a local store, but paths.embeddings puts" in refused.stderr
    assert EmbeddingStore(local).attrs["fingerprint"]["extract"]["max_len"] == 12     # left as it was

    _stage(params_path, "stages.score", "--model", "tiny-llama", "--dataset", "mrslice")
    _stage(params_path, "stages.fuse", "--dataset", "mrslice")
    _stage(params_path, "stages.train", "--dataset", "mrslice", "--head", "linear")
    _stage(params_path, "stages.compare", "--dataset", "mrslice")
    predicted = _stage(params_path, "pipeline", "predict", "--dataset", "mrslice", "a fine film", "a dull film")
    answers = [json.loads(line) for line in predicted.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == 2 and all("label" in a for a in answers), predicted.stdout
    heads = params.store / "heads" / "mrslice"
    configs = [read_head_config(p.parent) for p in heads.rglob("config.json") if p.parent.name.startswith("seed")]
    assert configs and all(c["store_fingerprints"]["tiny-llama"]["extract"]["max_len"] == 24 for c in configs)
    from pipeline.select.probe import protocol_from_params
    from pipeline.select.scoring import score_layers
    scores = json.loads((params.store / "scores" / "mrslice" / "tiny-llama" / "scores.json").read_text())
    on_s3, on_disk = (score_layers(EmbeddingStore(where), protocol_from_params(params.score), "tiny-llama")
                      for where in (url, local))
    assert [r["score"] for r in scores["rows"]] == [r.score for r in on_s3["rows"]]
    assert [r.score for r in on_disk["rows"]] != [r.score for r in on_s3["rows"]]     # the test can tell them apart


@pytest.mark.slow
def test_dvc_repro_sees_an_s3_store_change_through_its_record(s3_bucket, mr_slice, prepared_models, tmp_path):
    """Issue 22, item 1: with paths.embeddings on S3, `dvc repro` extracts to S3 and scores from it; DVC
    tracks the store through its local record, so new extract settings rerun extract (which refuses the old
    store, naming the key, until --rebuild) and then score; nothing runs once all is up to date."""
    from test_dvc_stage1 import clone_project, run
    repo = clone_project(tmp_path, mr_slice, {"models": ["tiny-llama"], "datasets": ["mrslice"]},
                         stages=["prepare_model", "prepare_data", "extract", "score"])
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["models"].update(tiny_llama_entry(prepared_models))
    raw["paths"]["embeddings"] = f"s3://{s3_bucket}/emb"
    raw["extract"].update(SETTINGS)
    raw["score"].update(rank=8, pca_rows=100, bootstrap=5)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    first = run(["dvc", "repro"], repo)
    assert "Running stage 'extract@tiny-llama-mrslice'" in first and "Running stage 'score@" in first
    url = f"s3://{s3_bucket}/emb/mrslice/tiny-llama"
    built = EmbeddingStore(url).attrs["generation"]
    assert "up to date" in run(["dvc", "status"], repo) and "Running stage" not in run(["dvc", "repro"], repo)

    raw["extract"]["max_len"] = 16                      # new settings for the S3 store
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert "extract@tiny-llama-mrslice" in run(["dvc", "status"], repo)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    refused = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "extract.max_len" in refused.stdout + refused.stderr
    run([sys.executable, "-m", "stages.extract", "--model", "tiny-llama", "--dataset", "mrslice", "--rebuild",
         "--no-progress"], repo)
    rebuilt = EmbeddingStore(url)
    assert rebuilt.attrs["generation"] != built and rebuilt.attrs["fingerprint"]["extract"]["max_len"] == 16
    again = run(["dvc", "repro"], repo)
    assert "Running stage 'score@tiny-llama-mrslice'" in again, again     # the record changed: score reran
    assert "up to date" in run(["dvc", "status"], repo)
    assert json.loads((repo / "store" / "embeddings" / "mrslice" / "tiny-llama" / "location.json").read_text()
                      )["generation"] == rebuilt.attrs["generation"]


@pytest.mark.slow
def test_verify_repair_works_on_an_s3_url_and_an_outage_is_not_damage(s3_bucket, mr_slice, make_params,
                                                                       prepared_models, tmp_path):
    """Issue 22, item 3: `verify --repair s3://...`, which every reader's damage message advises, marks the
    damaged block on S3 (no local `s3:` folder), and the next extraction rebuilds it bit-identically. With the
    endpoint down, verify reports a failure, not damage, and --repair changes nothing."""
    import boto3
    params_path = s3_params(make_params, mr_slice, prepared_models, tmp_path, f"s3://{s3_bucket}/emb")
    params = prepare(params_path, "mrslice", prepared_models, ["tiny-llama"])
    extract(params, "tiny-llama", "mrslice", show_progress=False)
    url = params.embeddings_path("tiny-llama", "mrslice")
    before = arrays(url)
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    key = next(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="emb/mrslice/tiny-llama/train/mean/c/1/")["Contents"])
    body = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    body[len(body) // 3] ^= 0x40
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(body))

    def verify(*extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", "verify", *extra, url], cwd=tmp_path, text=True,
                              capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})

    down = verify("--repair", env={"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"})
    assert down.returncode == 1 and "failure:" in down.stdout and "not damage" in down.stdout, down.stdout + down.stderr
    assert EmbeddingStore(url, allow_incomplete=True).completion("train")[0] == EmbeddingStore(
        url, allow_incomplete=True).completion("train")[1], "an outage marked blocks not done"
    repaired = verify("--repair")
    assert repaired.returncode == 1 and "repaired: 1 block(s) marked not done [('train', 1)]" in repaired.stdout, \
        repaired.stdout + repaired.stderr
    assert not (tmp_path / "s3:").exists() and not list(tmp_path.glob("s3*"))
    summary = extract(load_params(params_path), "tiny-llama", "mrslice", show_progress=False)
    assert summary["blocks"] == 1
    location.filesystem(url)[0].invalidate_cache()         # s3fs lists from a cache shared in this process
    after = arrays(url)
    assert sorted(after) == sorted(before)
    assert [k for k in before if not np.array_equal(after[k], before[k], equal_nan=before[k].dtype.kind == "f")] == []
    assert verify().returncode == 0


@pytest.mark.slow
def test_an_s3_outage_during_extract_is_one_line_and_exit_75(mr_slice, make_params, prepared_models, tmp_path):
    """Issue 22, item 9: an unreachable endpoint was a botocore traceback; now one line saying it is a failure
    of the network, not of the store, and the retry exit status (75, EX_TEMPFAIL)."""
    params_path = s3_params(make_params, mr_slice, prepared_models, tmp_path, "s3://no-such-server/emb")
    prepare(params_path, "mrslice", prepared_models, ["tiny-llama"])
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}
    done = subprocess.run([sys.executable, "-m", "stages.extract", "--params", str(params_path), "--model",
                           "tiny-llama", "--dataset", "mrslice", "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 75, done.stderr
    assert "Traceback" not in done.stderr and "a failure of the machine or the network" in done.stderr, done.stderr
