"""The hub path as a user with a Hugging Face cache takes it, offline (issue 12): `source: hub` for the
model and a `hub:` entry for the dataset, no local files, HF_HUB_OFFLINE=1.

The cache is built here from shipped files in the layout huggingface_hub and datasets leave behind:
hub/models--<org>--<name>/{blobs, refs/main, snapshots/<revision>} with the files as links into
blobs/, the dataset's repo the same way, and the Arrow cache `load_dataset` writes on its first
(online) load, under datasets/<org>___<name>/default/0.0.0/<hash>."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, corpus_rows, minilm_folder, write_jsonl

pytestmark = pytest.mark.slow     # a real model and dataset via a local HF cache, in subprocesses

REVISION = "3f1f9a0b2c4d5e6f708192a3b4c5d6e7f8091a2b"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DATASET_ID = "cornell-movie-review-data/rotten_tomatoes"
COUNTS = {"train": 40, "test": 20}


def add_repo(hub: Path, kind: str, repo_id: str, files: dict[str, Path]) -> Path:
    """One repo in the hub cache: blobs named by content hash, snapshot files linking to them."""
    repo = hub / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    for relative, source in files.items():
        blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, blob)
        link = repo / "snapshots" / REVISION / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / REVISION


def cache_dataset(hf_home: Path, snapshot: Path) -> None:
    """The Arrow cache of a first online `load_dataset(DATASET_ID)`: the json builder over the
    snapshot's files, written where the offline fallback looks (namespace___name/default/0.0.0/hash)."""
    from datasets.packaged_modules.json.json import Json
    namespace, name = DATASET_ID.split("/")
    builder = Json(cache_dir=str(hf_home / "datasets"), dataset_name=f"{namespace}___{name}", config_name="default",
                   config_id="default", hash=REVISION[:16],
                   data_files={split: [str(snapshot / "data" / f"{split}.jsonl")] for split in COUNTS})
    builder.download_and_prepare()
    for arrow in Path(builder.cache_dir).glob(f"{namespace}___{name}-*.arrow"):   # files are named by the bare name
        arrow.rename(arrow.with_name(arrow.name.replace(f"{namespace}___", "")))


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    source = minilm_folder()
    add_repo(home / "hub", "model", MODEL_ID,
             {str(f.relative_to(source)): f for f in sorted(source.rglob("*")) if f.is_file()})
    raw = tmp_path_factory.mktemp("rt_raw")
    files = {f"data/{split}.jsonl": write_jsonl(raw / f"{split}.jsonl", corpus_rows("mr", split, count))
             for split, count in COUNTS.items()}
    cache_dataset(home, add_repo(home / "hub", "dataset", DATASET_ID, files))
    return home


@pytest.fixture
def hub_project(hf_home, make_params, tmp_path) -> Path:
    """params.yaml selecting a hub model and a hub dataset; the data mirror is an empty folder."""
    mirror = tmp_path / "empty_mirror"
    mirror.mkdir()
    return make_params(mirror, ["minilm-hub"], ["rt-hub"],
                       extra_models={"minilm-hub": {"source": "hub", "hub_id": MODEL_ID, "revision": "main"}},
                       extra_datasets={"rt-hub": {"text_column": "text", "label_column": "label",
                                                  "hub": {"path": DATASET_ID,
                                                          "splits": {"train": "train", "test": "test"}}}})


def run(args: list[str], hf_home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_hub_dataset_is_prepared_offline_from_the_cache(hf_home, hub_project):
    done = run(["stages.prepare_data", "--dataset", "rt-hub", "--params", str(hub_project)], hf_home)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = hub_project.parent / "store" / "data" / "rt-hub"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["source"]["kind"] == "hub" and meta["source"]["path"] == DATASET_ID
    rows = {split: len((folder / f"{split}.jsonl").read_text().splitlines()) for split in ("train", "validation", "test")}
    assert rows["test"] == COUNTS["test"] and rows["train"] + rows["validation"] == COUNTS["train"]
    assert rows["validation"] > 0


def test_without_the_cache_the_hub_dataset_is_named_offline(tmp_path, hub_project):
    failed = run(["stages.prepare_data", "--dataset", "rt-hub", "--params", str(hub_project)], tmp_path / "no_home")
    assert failed.returncode != 0
    assert f"cannot load dataset 'rt-hub' from the hub ({DATASET_ID})" in failed.stderr


def test_a_hub_model_and_dataset_extract_offline_and_inspect_names_the_hub(hf_home, hub_project):
    params = ["--params", str(hub_project)]
    for args in (["stages.prepare_model", "--model", "minilm-hub"], ["stages.prepare_data", "--dataset", "rt-hub"],
                 ["stages.extract", "--model", "minilm-hub", "--dataset", "rt-hub", "--no-progress"]):
        done = run(args + params, hf_home)
        assert done.returncode == 0, f"{args[0]}: {done.stderr[-3000:]}"
    source = json.loads((hub_project.parent / "store" / "models" / "minilm-hub" / "source.json").read_text())
    assert (source["origin"]["hub_id"], source["origin"]["revision"]) == (MODEL_ID, "main")
    shown = run(["pipeline", "inspect"] + params, hf_home)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert f"model from hub {MODEL_ID}@main; dataset from hub {DATASET_ID}@main" in " ".join(shown.stdout.split())
    from pipeline.store.inspect import summarise
    summary = summarise(hub_project.parent / "store" / "embeddings" / "rt-hub" / "minilm-hub")
    assert summary["complete"] and summary["num_layers"] == 7 and summary["dim"] == 384
    assert summary["splits"]["test"]["rows"] == COUNTS["test"]
    assert summary["splits"]["train"]["rows"] + summary["splits"]["validation"]["rows"] == COUNTS["train"]
