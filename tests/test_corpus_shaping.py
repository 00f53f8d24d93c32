"""Corpus shaping for the study, and the corpus defects of the hostile run: per-split caps, a corpus
shipped as one split, per-corpus max_len, texts with Unicode line separators, splits emptied by
label mismatch, a corpus without train, misspelt dataset keys, profiles."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from conftest import write_jsonl
from pipeline.config.params import load_params
from pipeline.sources.corpora import build_corpus, read_corpus, stratified_sample, write_corpus
from pipeline.core.errors import ConfigError, DataError
from pipeline.extract.driver import extract
from test_bad_input import base_rows, build, corpus_with
from test_extract import prepare


def test_stratified_sample_keeps_each_class_share_and_is_seeded():
    labels = ["a"] * 600 + ["b"] * 300 + ["c"] * 99 + ["d"]
    chosen = stratified_sample(labels, 100, seed=0)
    assert len(chosen) == 100 and chosen == sorted(set(chosen))
    assert Counter(labels[i] for i in chosen) == {"a": 60, "b": 30, "c": 9, "d": 1}
    assert stratified_sample(labels, 100, seed=0) == chosen and stratified_sample(labels, 100, seed=1) != chosen
    assert stratified_sample(labels, 5000, seed=0) == list(range(1000))


def test_caps_sample_each_split_and_are_recorded(tmp_path, make_params):
    train = [{"text": f"text {i}", "label": "abc"[i % 3]} for i in range(300)]
    test = [{"text": f"test {i}", "label": "abc"[i % 3]} for i in range(90)]
    params, _ = corpus_with(tmp_path, make_params, train, test, data={"max_rows": {"train": 60, "test": 30}})
    corpus = build(params)
    assert {s: len(v) for s, v in corpus.splits.items()} == {"train": 60, "validation": 30, "test": 30}
    assert Counter(corpus.splits["train"].labels) == {"a": 20, "b": 20, "c": 20}
    assert corpus.meta["caps"] == {"train": {"cap": 60, "rows_before": 270}, "test": {"cap": 30, "rows_before": 90}}


def test_a_corpus_shipped_as_test_only_is_resplit_or_refused(tmp_path, make_params):
    rows = [{"text": f"news {i}", "label": "wxyz"[i % 4]} for i in range(200)]
    mirror = tmp_path / "mirror"
    write_jsonl(mirror / "odd" / "test.jsonl", rows)
    entry = {"text_column": "text", "label_column": "label", "local": {"test": "odd/test.jsonl"}}
    plain = load_params(make_params(mirror, ["minilm-l6"], ["odd"], extra_datasets={"odd": entry}))
    with pytest.raises(DataError, match="no train split.*resplit"):
        build(plain)
    entry["resplit"] = {"from": "test", "train": 0.6, "validation": 0.1}
    params = load_params(make_params(mirror, ["minilm-l6"], ["odd"], extra_datasets={"odd": entry}))
    corpus = build(params)
    sizes = {s: len(v) for s, v in corpus.splits.items()}
    assert sizes == {"train": 120, "validation": 20, "test": 60}
    ids = [set(v.ids) for v in corpus.splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert all(Counter(v.labels) == {k: n // 4 for k, n in zip("wxyz", [n] * 4)}
               for v, n in zip(corpus.splits.values(), sizes.values()))
    assert corpus.meta["resplit"]["rows"] == sizes


def _phrase_corpus(sentences: int) -> list[dict]:
    """SST-2's shape: each sentence a row, and each of its prefixes and suffixes a row too (same label)."""
    rows = []
    for s in range(sentences):
        words = [f"w{s}x{k}" for k in range(6)] + ["."]
        label = "neg" if s % 3 else "pos"
        rows.append({"text": " ".join(words), "label": label})
        rows += [{"text": " ".join(words[:k]), "label": label} for k in range(1, 6)]
        rows += [{"text": " ".join(words[k:]), "label": label} for k in range(2, 6)]
    return rows


def test_a_whole_text_carve_takes_sentences_and_leaves_none_of_their_phrases_in_train(tmp_path, make_params):
    rows = _phrase_corpus(60)
    mirror = tmp_path / "mirror"
    write_jsonl(mirror / "odd" / "train.jsonl", rows)
    write_jsonl(mirror / "odd" / "test.jsonl", rows[:20])
    entry = {"text_column": "text", "label_column": "label",
             "local": {"train": "odd/train.jsonl", "test": "odd/test.jsonl"}, "carve": "whole_texts"}
    params = load_params(make_params(mirror, ["minilm-l6"], ["odd"], extra_datasets={"odd": entry}))
    corpus = build(params)
    validation, train = corpus.splits["validation"], corpus.splits["train"]
    sentences = {r["text"] for r in rows if r["text"].endswith(".") and r["text"].startswith(r["text"].split()[0])
                 and len(r["text"].split()) == 7}
    assert set(validation.texts) <= sentences and len(validation) == 6      # 10% of the 60 sentences
    assert Counter(validation.labels) == {"neg": 4, "pos": 2}               # stratified like the sentences
    for text in train.texts:                                                # no phrase of a validation sentence
        assert not any(f" {text} " in f" {sentence} " for sentence in validation.texts)
    assert len(train) == len(rows) - 6 * 10                                 # each sentence and its 9 phrases
    assert corpus.meta["carve"]["by"] == "whole_texts" and corpus.meta["carve"]["phrases_dropped_from_train"] == 54
    entry["carve"] = "sentences"
    with pytest.raises(ConfigError, match="carve"):
        load_params(make_params(mirror, ["minilm-l6"], ["odd"], extra_datasets={"odd": entry}))


def test_a_test_split_emptied_by_label_mismatch_stops_prepare_data(tmp_path, make_params):
    train = [{"text": f"text {i}", "label": ["positive", "negative"][i % 2]} for i in range(40)]
    test = [{"text": f"test {i}", "label": ["pos", "neg"][i % 2]} for i in range(20)]
    params, _ = corpus_with(tmp_path, make_params, train, test)
    with pytest.raises(DataError, match="split 'test': all 20 rows carry labels that train never has"):
        build(params)


@pytest.mark.slow
def test_texts_with_unicode_line_separators_survive_prepare_and_extract(tmp_path, make_params, prepared_models):
    odd = ["next\u0085line", "line\u2028separator", "paragraph\u2029separator", "file\x1cgroup\x1drecord\x1eunit",
           "vertical\x0btab\x0cform feed"]
    rows = base_rows(20) + [{"text": t, "label": "ab"[i % 2]} for i, t in enumerate(odd)]
    test = [{"text": t, "label": "ab"[i % 2]} for i, t in enumerate(odd * 2)]
    params_path = corpus_with(tmp_path, make_params, rows, test)[0].root / "params.yaml"
    params = prepare(params_path, "odd", prepared_models, ["minilm-l6"])
    corpus = read_corpus(params.data_dir("odd"))
    assert corpus.splits["test"].texts == odd * 2
    assert sum(len(v) for v in corpus.splits.values()) == 35
    extract(params, "minilm-l6", "odd", show_progress=False)
    from pipeline.store.reader import open_store
    assert open_store(params.embeddings_root, "minilm-l6", "odd").num_rows("test") == 10


@pytest.mark.slow
def test_per_corpus_max_len_reaches_the_store(tmp_path, make_params, prepared_models):
    params, _ = corpus_with(tmp_path, make_params, base_rows(20), extra={"max_len": 8})
    params = prepare(params.root / "params.yaml", "odd", prepared_models, ["minilm-l6"])
    assert params.extract_for("odd").max_len == 8 and params.extract.max_len == 64
    extract(params, "minilm-l6", "odd", show_progress=False)
    from pipeline.store.reader import open_store
    assert open_store(params.embeddings_root, "minilm-l6", "odd").attrs["fingerprint"]["extract"]["max_len"] == 8


def test_misspelt_dataset_keys_and_bad_caps_are_named_at_once(tmp_path, make_params):
    with pytest.raises(ConfigError) as caught:
        corpus_with(tmp_path, make_params, base_rows(), extra={"id_colum": "id", "max_len": 0},
                    data={"max_rows": {"train": 1, "tset": 5}})
    message = str(caught.value)
    assert "datasets.odd.id_colum: unknown option (did you mean 'id_column'?)" in message
    assert "datasets.odd.max_len: must be an integer >= 1" in message
    assert "data.max_rows.train: must be an integer >= 2" in message
    assert "data.max_rows.tset: unknown name; known names are ['train', 'validation', 'test']" in message


def test_a_profile_overrides_its_base(tmp_path, make_params):
    base = make_params(tmp_path / "mirror", ["minilm-l6"], ["mrslice"])
    profile = tmp_path / "study.yaml"
    profile.write_text(yaml.safe_dump({"base": "params.yaml", "select": {"datasets": ["sst2"]},
                                       "datasets": {"r8": {"max_len": 512}}, "data": {"max_rows": {"test": 9}}}))
    params = load_params(profile)
    assert params.selected_datasets == ["sst2"] and params.selected_models == ["minilm-l6"]
    assert params.extract_for("r8").max_len == 512 and params.dataset("r8").text_column == "text"
    assert params.data.max_rows == {"test": 9} and params.store == load_params(base).store
    nested = tmp_path / "profiles" / "one.yaml"          # a profile of a profile, in another folder
    nested.parent.mkdir()
    nested.write_text(yaml.safe_dump({"base": "../study.yaml", "paths": {"store": "store/one"}}))
    one = load_params(nested)
    assert one.store == tmp_path / "store" / "one" and one.data_mirror == load_params(base).data_mirror
    assert one.root == tmp_path and one.selected_datasets == ["sst2"]
    profile.write_text(yaml.safe_dump({"base": "study.yaml"}))
    with pytest.raises(ConfigError, match="base 'study.yaml' must name another params file"):
        load_params(profile)


def test_an_empty_file_and_a_malformed_jsonl_line_are_named_with_their_place(tmp_path, make_params):
    params, mirror = corpus_with(tmp_path, make_params, base_rows(10))
    train = mirror / "odd" / "train.jsonl"
    lines = train.read_text().split("\n")
    train.write_text("\n".join(lines[:4] + ['{"text": "cut off", "label": '] + lines[4:]))
    with pytest.raises(DataError, match=r"train.jsonl line 5 is not valid JSON \(Expecting value at column 30\)"):
        build(params)
    train.write_text("\n".join(lines[:2] + ['["a", "list"]'] + lines[2:]))
    with pytest.raises(DataError, match=r"train.jsonl line 3 holds a JSON list, not an object"):
        build(params)
    train.write_text("\n\n")
    with pytest.raises(DataError, match=r"train.jsonl \(datasets.odd.local.train\) is empty"):
        build(params)
