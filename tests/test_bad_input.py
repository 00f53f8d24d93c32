"""Bad input: each case gets a clear message or a documented, recorded behaviour; nothing is lost."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import write_jsonl
from pipeline.config.params import load_params
from pipeline.sources.corpora import build_corpus, read_corpus, write_corpus
from pipeline.core.errors import ConfigError, DataError
from test_extract import prepare


def corpus_with(tmp_path, make_params, train_rows, test_rows=None, data=None, extra=None, files=None):
    mirror = tmp_path / "mirror"
    write_jsonl(mirror / "odd" / "train.jsonl", train_rows)
    write_jsonl(mirror / "odd" / "test.jsonl", test_rows or [{"text": "fine", "label": "a"},
                                                              {"text": "also fine", "label": "b"}])
    entry = {"text_column": "text", "label_column": "label",
             "local": files or {"train": "odd/train.jsonl", "test": "odd/test.jsonl"}, **(extra or {})}
    params = load_params(make_params(mirror, ["minilm-l6"], ["odd"], data=data, extra_datasets={"odd": entry}))
    return params, mirror


def build(params):
    return build_corpus(params.dataset("odd"), params.data_mirror, params.data)


def base_rows(n=20):
    return [{"text": f"text number {i}", "label": "ab"[i % 2]} for i in range(n)]


def test_empty_and_whitespace_texts_are_dropped_and_recorded(tmp_path, make_params):
    rows = base_rows() + [{"text": "", "label": "a"}, {"text": " \t\n ", "label": "b"}]
    params, _ = corpus_with(tmp_path, make_params, rows)
    corpus = build(params)
    reasons = {(d["split"], d["source_index"]): d["reason"] for d in corpus.meta["dropped"]}
    assert reasons == {("train", 20): "empty or whitespace-only text", ("train", 21): "empty or whitespace-only text"}
    assert len(corpus.splits["train"]) + len(corpus.splits["validation"]) == 20


def test_empty_text_is_an_error_when_asked(tmp_path, make_params):
    params, _ = corpus_with(tmp_path, make_params, base_rows() + [{"text": "", "label": "a"}],
                            data={"on_bad_row": "error"})
    with pytest.raises(DataError, match=r"split 'train' row 20: empty or whitespace-only text"):
        build(params)


def test_missing_label_is_dropped_or_refused(tmp_path, make_params):
    rows = base_rows() + [{"text": "no label here", "label": None}]
    params, _ = corpus_with(tmp_path, make_params, rows)
    corpus = build(params)
    assert [d["reason"] for d in corpus.meta["dropped"]] == ["missing label"]
    strict, _ = corpus_with(tmp_path, make_params, rows, data={"on_bad_row": "error"})
    with pytest.raises(DataError, match="row 20: missing label"):
        build(strict)


@pytest.mark.parametrize("label, why", [(["a"], "is a list"), (1.5, "is a float"), (True, "is a bool"),
                                        ("a ", "has surrounding whitespace"), ("\tb", "has surrounding whitespace")])
def test_a_label_that_is_not_a_clean_string_or_integer_is_refused(tmp_path, make_params, label, why):
    """str() of a list or a padded string would silently become a class of its own (issue 22, item 8)."""
    params, _ = corpus_with(tmp_path, make_params, base_rows() + [{"text": "an odd label", "label": label}])
    with pytest.raises(DataError, match=rf"split 'train' row 20: label {re.escape(repr(label))} {why}"):
        build(params)


def test_integer_labels_are_classes_by_their_text(tmp_path, make_params):
    rows = [{"text": f"text number {i}", "label": i % 2} for i in range(20)]
    params, _ = corpus_with(tmp_path, make_params, rows, test_rows=[{"text": "x", "label": 0}, {"text": "y", "label": 1}])
    assert build(params).label_names == ["0", "1"]


def test_unknown_label_column_names_the_columns(tmp_path, make_params):
    params, _ = corpus_with(tmp_path, make_params, base_rows(), extra={"label_column": "category"})
    with pytest.raises(DataError, match=r"has no column 'category'; it has \['text', 'label'\]"):
        build(params)


def test_invalid_utf8_names_file_and_line(tmp_path, make_params):
    params, mirror = corpus_with(tmp_path, make_params, base_rows())
    path = mirror / "odd" / "train.jsonl"
    path.write_bytes(path.read_bytes() + b'{"text": "caf\xe9 cr\xe8me", "label": "a"}\n')
    with pytest.raises(DataError, match=r"train.jsonl line 21 is not valid UTF-8"):
        build(params)


def test_label_in_test_that_train_never_has(tmp_path, make_params):
    test_rows = [{"text": "fine", "label": "a"}, {"text": "odd one", "label": "zebra"}]
    params, _ = corpus_with(tmp_path, make_params, base_rows(), test_rows, data={"on_bad_row": "error"})
    with pytest.raises(DataError, match=r"labels that train never has \(e.g. 'zebra'"):
        build(params)
    lenient, _ = corpus_with(tmp_path, make_params, base_rows(), test_rows)
    corpus = build(lenient)
    assert corpus.splits["test"].texts == ["fine"]
    assert corpus.meta["dropped"][0]["reason"] == "label 'zebra' not in train"


def test_single_class_and_empty_split_are_refused(tmp_path, make_params):
    params, _ = corpus_with(tmp_path, make_params, [{"text": f"t{i}", "label": "a"} for i in range(10)])
    with pytest.raises(DataError, match="single class"):
        build(params)
    params, mirror = corpus_with(tmp_path, make_params, base_rows())
    (mirror / "odd" / "test.jsonl").write_text("")
    with pytest.raises(DataError, match="(empty|cannot read)"):
        build(params)


def test_duplicate_ids_are_refused(tmp_path, make_params):
    rows = [{**r, "id": "same" if i < 2 else f"id{i}"} for i, r in enumerate(base_rows())]
    test_rows = [{"text": "x", "label": "a", "id": "t1"}, {"text": "y", "label": "b", "id": "t2"}]
    params, _ = corpus_with(tmp_path, make_params, rows, test_rows, extra={"id_column": "id"})
    with pytest.raises(DataError, match="duplicate ids"):
        build(params)


def test_missing_local_files_without_hub_say_how_to_fix(tmp_path, make_params):
    params, _ = corpus_with(tmp_path, make_params, base_rows(), files={"train": "nope/train.jsonl"})
    with pytest.raises(DataError, match=r"local files missing .*nope/train.jsonl.*no `hub` entry"):
        build(params)


@pytest.mark.slow
def test_huge_nul_rtl_and_emoji_texts_are_embedded(tmp_path, make_params, prepared_models):
    """A 1 MB text is truncated and flagged; NUL/control characters, RTL and emoji go through as they are."""
    from pipeline.extract.driver import extract
    from pipeline.store.reader import open_store
    odd = ["word " * 200_000, "nul\x00inside\x01and\x1fcontrols", "שלום עולם مرحبا", "great film 🎬🍿👍"]
    rows = base_rows() + [{"text": t, "label": "ab"[i % 2]} for i, t in enumerate(odd)]
    mirror = tmp_path / "mirror"
    write_jsonl(mirror / "odd" / "train.jsonl", rows)
    write_jsonl(mirror / "odd" / "test.jsonl", [{"text": t, "label": "a"} for t in odd])
    entry = {"text_column": "text", "label_column": "label",
             "local": {"train": "odd/train.jsonl", "test": "odd/test.jsonl"}}
    params = prepare(make_params(mirror, ["minilm-l6"], ["odd"], extra_datasets={"odd": entry}), "odd",
                     prepared_models, ["minilm-l6"])
    extract(params, "minilm-l6", "odd", show_progress=False)
    store = open_store(params.embeddings_root, "minilm-l6", "odd")
    counts, truncated = store.meta("test", "token_count"), store.meta("test", "truncated")
    assert counts[0] > 200_000 and truncated.tolist() == [True, False, False, False]
    assert np.isfinite(store.layers("test", "mean")).all()
    assert len(read_corpus(params.data_dir("odd")).splits["test"].texts[1]) == len(odd[1])


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw["extract"].update(poolings=["mean", "cls_magic"]), "extract.poolings: must be a non-empty list drawn from ['mean', 'last', 'first', 'max', 'mean_nospecial'], each once, got ['mean', 'cls_magic']"),
    (lambda raw: raw["extract"].update(max_len=0), "extract.max_len: must be an integer >= 1, got 0"),
    (lambda raw: raw["extract"].update(max_len=512, token_budget=100), "extract.token_budget: (100) must be at least"),
    (lambda raw: raw["select"].update(models=["gpt-17"]), "select.models: unknown model 'gpt-17'"),
    (lambda raw: raw["select"].update(datasets=["imdbx"]), "select.datasets: unknown dataset 'imdbx'"),
    (lambda raw: raw["models"].update({"../escape": {"source": "local", "path": "/tmp"}}), "model names may hold only"),
    (lambda raw: raw["models"]["minilm-l6"].update(source="ftp"), "models.minilm-l6.source: must be one of"),
    (lambda raw: raw["extract"].update(dtype="int8"), "extract.dtype: must be one of ['float16', 'float32']"),
    # issue 22, item 9: checked even when a stage names its --model and --dataset
    (lambda raw: raw["select"].update(models=[]), "select.models: must be a non-empty list of names, got []"),
    (lambda raw: raw["select"].update(models="minilm-l6"), "select.models: must be a non-empty list of names"),
    (lambda raw: raw["paths"].update(store="params.yaml"), "params.yaml is a file; it must be a folder"),
    (lambda raw: raw["paths"].update(store="/proc/self/store"), "is under /proc, a virtual filesystem"),
    (lambda raw: raw["paths"].update(embeddings="params.yaml"), "params.yaml is a file; it must be a folder"),
    (lambda raw: raw.setdefault("report", {}).update(out="params.yaml"), "params.yaml is a file; it must be a folder"),
    (lambda raw: raw["models"]["minilm-l6"].update(source="local", path=5), "models.minilm-l6.path: must be a non-empty string, got 5"),
])
def test_config_problems_are_named_with_their_key(tmp_path, edit, message):
    import yaml
    from conftest import registry
    raw = registry()
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    for stage in ({}, {"models": ["minilm-l6"], "datasets": ["mr"]}):   # the whole file, and a stage's view
        with pytest.raises(ConfigError) as error:
            load_params(path, **stage)
        assert message in str(error.value)


def test_a_stage_model_or_dataset_not_in_the_registry_is_named(tmp_path):
    import yaml
    from conftest import registry
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(registry()))
    with pytest.raises(ConfigError, match="--model: unknown model 'gpt-17'"):
        load_params(path, models=["gpt-17"])
    with pytest.raises(ConfigError, match="--dataset: unknown dataset 'imdbx'"):
        load_params(path, datasets=["imdbx"])


def test_a_lone_surrogate_in_a_corpus_is_named_by_file_line_and_column(tmp_path, make_params):
    """Issue 22, item 9: datasets said only "An error occurred while generating the dataset"."""
    params, mirror = corpus_with(tmp_path, make_params, base_rows(3))
    with open(mirror / "odd" / "train.jsonl", "a") as handle:
        handle.write('{"text": "half a pair \\ud800 here", "label": "a"}\n')     # JSON's escape, as a file holds it
    with pytest.raises(DataError, match=r"odd/train.jsonl line 4 column 'text' character 12 is a lone UTF-16 surrogate"):
        build(params)


def test_corpus_copy_detects_tampering(tmp_path, make_params):
    params, _ = corpus_with(tmp_path, make_params, base_rows())
    corpus = build(params)
    folder = tmp_path / "copy"
    write_corpus(corpus, folder)
    assert read_corpus(folder).splits["train"].texts == corpus.splits["train"].texts
    lines = (folder / "test.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "text": "edited"})
    (folder / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="does not match the sha256"):
        read_corpus(folder)
