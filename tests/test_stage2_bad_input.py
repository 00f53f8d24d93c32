"""predict, export, extract and train on bad input: a stale or damaged head, bad arguments, a GPU this
machine lacks, an export path that cannot be written. Each is a real run that exits 2 with a message
naming the cause (or raises the PipelineError that the stages turn into that), never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, registry
from pipeline.config.params import load_params
from pipeline.extract.driver import extract
from pipeline.core.records import HeadResult, HeadResults
from test_extract import prepare

pytestmark = pytest.mark.slow     # real MiniLM project, trained heads, the CLI in subprocesses

MODEL, DATASET = "minilm-l6", "mrslice"
INPUTS = [{"model": MODEL, "pooling": "mean", "layers": [2, 4], "operator": "mean"}]
HEAD_SETTINGS = {"max_epochs": 3, "patience": 2, "batch_size": 512, "min_steps_per_epoch": 1, "lr": 1e-3, "weight_decay": 1e-4,
                 "device": "cpu", "mlp": {"widths": [32], "dropout": 0.1}}
MISSING_GPU = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


def write_params(folder: Path, mirror: Path, extract_settings: dict | None = None, train: dict | None = None) -> Path:
    raw = registry()
    raw["paths"] = {"store": str(folder / "store"), "data_mirror": str(mirror)}
    raw["select"] = {"models": [MODEL], "datasets": [DATASET]}
    raw["extract"].update({"block_rows": 64, "max_len": 48, "token_budget": 2048, "compute_dtype": "float32",
                           **(extract_settings or {})})
    raw.setdefault("train", {}).update(train or {})
    raw["datasets"][DATASET] = {"text_column": "text", "label_column": "label",
                                "local": {"train": "mrslice/train.jsonl", "test": "mrslice/test.jsonl"}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder / "params.yaml"


@pytest.fixture(scope="module")
def project(tmp_path_factory, mr_slice, prepared_models) -> Path:
    """A MiniLM store (max_len 48) and one MLP head trained on it, with the results.json predict reads."""
    from pipeline.heads.datamodule import LayerCache
    from pipeline.heads.training import fit_head
    folder = tmp_path_factory.mktemp("stage2-bad")
    params = prepare(write_params(folder, mr_slice), DATASET, prepared_models, [MODEL])
    extract(params, MODEL, DATASET, show_progress=False)
    cache = LayerCache(params.embeddings_root, DATASET)
    heads = Path(params.store) / "heads" / DATASET
    config = fit_head(cache, {"row": "fusion", "groups": INPUTS}, "mlp", 0, HEAD_SETTINGS, heads / "mlp" / "fusion" / "seed0",
                      cache.store(MODEL).label_names, {MODEL: False}, folder / "lightning")
    validation, test = config["validation"], config["test"]
    result = HeadResult(row="fusion", kind="best_fusion", head="mlp", groups=INPUTS, probe_score=None, probe_std=None,
                        seeds=[0], seconds=config["seconds"], validation_accuracy=validation["accuracy"],
                        validation_accuracy_std=0.0, validation_macro_f1=validation["macro_f1"],
                        validation_macro_f1_std=0.0, test_accuracy=test["accuracy"], test_accuracy_std=0.0,
                        test_macro_f1=test["macro_f1"], test_macro_f1_std=0.0, folder="mlp/fusion")
    results = HeadResults(dataset=DATASET, results=[result], bytes_read=cache.bytes_read, seconds=config["seconds"],
                          settings=HEAD_SETTINGS)
    compared = Path(params.store) / "compare" / DATASET           # where stage compare puts the table predict reads
    compared.mkdir(parents=True)
    (compared / "results.json").write_text(json.dumps(results.to_json()))
    return folder


@pytest.fixture
def copy(project, tmp_path) -> Path:
    """A copy of the project (params pointing at the copy's store) that a test may damage."""
    folder = tmp_path / "copy"
    shutil.copytree(project, folder, symlinks=True)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["paths"]["store"] = str(folder / "store")
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def cli(*args: str, module: str = "pipeline") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


def refused(result: subprocess.CompletedProcess, *phrases: str) -> None:
    """Exit 2, each phrase in the message, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr[-3000:])


def head_dir(folder: Path) -> Path:
    return folder / "store" / "heads" / DATASET / "mlp" / "fusion" / "seed0"


def test_a_head_on_its_own_store_predicts(project):
    """The baseline the refusals below are measured against: the same command succeeds."""
    result = cli("predict", "--params", str(project / "params.yaml"), "a gorgeous film")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["label"] in ("negative", "positive")
    assert json.loads((head_dir(project) / "config.json").read_text())["store_fingerprints"][MODEL]["extract"][
        "max_len"] == 48


def test_a_rebuilt_store_makes_its_heads_stale_for_predict_and_export(copy, mr_slice):
    """Issue 11 item 5: rebuilt with max_len 32, the store no longer is what the head learnt from."""
    params = load_params(write_params(copy, mr_slice, {"max_len": 32}))
    extract(params, MODEL, DATASET, rebuild=True, show_progress=False)
    stale = ("is stale", "extract.max_len: head trained on 48, store now has 32", "Retrain the head")
    refused(cli("predict", "--params", str(copy / "params.yaml"), "a gorgeous film"), *stale)
    refused(cli("export", str(copy / "exported"), "--params", str(copy / "params.yaml")), *stale)
    assert not (copy / "exported").exists()


def test_a_head_without_a_store_fingerprint_is_refused(copy):
    path = head_dir(copy) / "config.json"
    config = json.loads(path.read_text())
    del config["store_fingerprints"]
    path.write_text(json.dumps(config))
    refused(cli("predict", "--params", str(copy / "params.yaml"), "a gorgeous film"),
            "records no fingerprint of the minilm-l6 store", "retrain it")


def test_a_damaged_results_file_is_named(copy):
    """results.json is read as records: a row without its folder is refused by file, row and key."""
    path = copy / "store" / "compare" / DATASET / "results.json"
    raw = json.loads(path.read_text())
    del raw["results"][0]["folder"]
    path.write_text(json.dumps(raw))
    refused(cli("predict", "--params", str(copy / "params.yaml"), "a gorgeous film"),
            f"{path}.results[0]: missing key 'folder' in a HeadResult", "rerun its stage")


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", lambda b: b[: len(b) // 2]),        # truncated
    ("standardisation.safetensors", lambda b: b"\x00" * 64),
    ("config.json", lambda b: b[:-20]),
])
def test_a_damaged_head_file_is_named(copy, name, damage):
    path = head_dir(copy) / name
    path.write_bytes(damage(path.read_bytes()))
    refused(cli("predict", "--params", str(copy / "params.yaml"), "a gorgeous film"),
            f"head file {path} is missing or damaged", "retrain the head")


def test_bad_seed_and_device_arguments_are_usage_errors(project):
    params = str(project / "params.yaml")
    refused(cli("predict", "--params", params, "--seed", "abc", "a film"),
            "argument --seed: must be a whole number or best, got 'abc'")
    refused(cli("export", "somewhere", "--params", params, "--device", "bogus"),
            "argument --device: must be auto, cpu, cuda, cuda:N or mps, got 'bogus'")
    refused(cli("predict", "--params", params, "--device", MISSING_GPU, "a film"),
            f"--device is '{MISSING_GPU}' but", "visible on this machine")


def test_export_to_a_place_that_cannot_be_written(project, tmp_path):
    params = str(project / "params.yaml")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    refused(cli("export", str(blocker / "classifier"), "--params", params),
            f"cannot export to {blocker / 'classifier'}: Not a directory")
    assert blocker.read_text() == "not a folder"
    refused(cli("export", "/sys/layerfuse-classifier", "--params", params),   # not writable, even by root
            "cannot export to /sys/layerfuse-classifier")


def test_extract_and_train_refuse_a_gpu_this_machine_lacks(project, mr_slice, tmp_path):
    folder = tmp_path / "gpu"
    write_params(folder, mr_slice, {"device": MISSING_GPU}, {"device": MISSING_GPU})
    shutil.copytree(project / "store" / "data", folder / "store" / "data")
    refused(cli("--params", str(folder / "params.yaml"), "--model", MODEL, "--dataset", DATASET, "--no-progress",
                module="stages.extract"), f"extract.device is '{MISSING_GPU}' but", "visible on this machine")
    chosen = folder / "store" / "fusion" / DATASET / "chosen.json"
    chosen.parent.mkdir(parents=True)
    chosen.write_text(json.dumps({"models": {}}))
    refused(cli("--params", str(folder / "params.yaml"), "--dataset", DATASET, "--head", "mlp", module="stages.train"),
            f"train.device is '{MISSING_GPU}' but", "visible on this machine")
