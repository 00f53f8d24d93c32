"""params.yaml as one typed configuration: every section validated, unknown keys named with the closest
known one, every problem reported at once, and the defaults equal to params.yaml's own values."""

from __future__ import annotations

import sys

import pytest
import yaml

from conftest import REPO, registry
from pipeline.config.sections import (FUSE_OPERATORS, HEAD_NAMES, SCORE_METRICS, ExtractSettings, FuseSettings,
                                      ParamsFile, ReportSettings, ScoreSettings, TrainSettings, head_options)
from pipeline.config.params import load_params
from pipeline.core.errors import ConfigError

SECTIONS = ("paths", "data", "extract", "score", "fuse", "train", "cost", "report")


def write(tmp_path, raw: dict, name: str = "params.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def problems_of(tmp_path, edit) -> list[str]:
    """The problem lines load_params reports for the real params.yaml after `edit`."""
    raw = registry()
    edit(raw)
    with pytest.raises(ConfigError) as caught:
        load_params(write(tmp_path, raw))
    return [line.removeprefix("  - ") for line in str(caught.value).splitlines()[1:]]


def has(lines: list[str], start: str) -> bool:
    return any(line.startswith(start) for line in lines)


def test_unknown_keys_are_named_with_the_closest_known_one_all_at_once(tmp_path):
    def edit(raw):
        raw["extract"]["max_lenn"] = 128
        raw["train"]["max_epoch"] = 3
        raw["train"]["mlp"]["widht"] = [8]
        raw["datasets"]["mr"]["id_colum"] = "id"
        raw["datasets"]["mr"]["hub"]["revison"] = "main"
        raw["models"]["minilm-l6"]["revison"] = "main"
        raw["selct"] = raw.pop("select")
        raw["trian"] = raw.pop("train")
        raw["paths"]["stor"] = "elsewhere"
        raw["report"]["outt"] = "x"
        raw["score"]["select_rul"] = "best"
    lines = problems_of(tmp_path, edit)
    for start in ["extract.max_lenn: unknown option (did you mean 'max_len'?)",
                  "trian: unknown section (did you mean 'train'?)",
                  "selct: unknown section (did you mean 'select'?)",
                  "datasets.mr.id_colum: unknown option (did you mean 'id_column'?)",
                  "datasets.mr.hub.revison: unknown option (did you mean 'revision'?)",
                  "models.minilm-l6.revison: unknown option (did you mean 'revision'?)",
                  "paths.stor: unknown option (did you mean 'store'?)",
                  "report.outt: unknown option (did you mean 'out'?)",
                  "score.select_rul: unknown option (did you mean 'select_rule'?)"]:
        assert has(lines, start), (start, lines)
    # train is misspelt as a whole here; with `train:` spelt right its own typos are named too
    lines = problems_of(tmp_path, lambda raw: (raw["train"].update(max_epoch=3), raw["train"]["mlp"].update(widht=[8])))
    assert has(lines, "train.max_epoch: unknown option (did you mean 'max_epochs'?)")
    assert has(lines, "train.mlp.widht: unknown option (did you mean 'widths'?)")


def test_a_misspelt_train_section_stops_a_stage_run_by_hand(tmp_path, monkeypatch, capsys):
    """It used to exit 0 and train with code defaults (40 epochs, MLP [1024, 256]) unlike params.yaml's."""
    from stages import run_stage
    from stages import train
    raw = registry()
    raw["trian"] = raw.pop("train")
    path = write(tmp_path, raw)
    monkeypatch.setattr(sys, "argv", ["train", "--params", str(path), "--dataset", "mr", "--head", "mlp"])
    with pytest.raises(SystemExit) as exited:
        run_stage(train.main)
    assert exited.value.code == 2
    assert "trian: unknown section (did you mean 'train'?)" in capsys.readouterr().err


def test_bad_train_values_are_named(tmp_path):
    lines = problems_of(tmp_path, lambda raw: raw["train"].update(
        batch_size=0, seeds=[], max_epochs="abc", lr=-1, heads=[], weight_decay="none", device="tpu",
        mlp={"widths": [0], "dropout": 1.5}))
    assert "train.batch_size: must be an integer >= 1, got 0" in lines
    assert "train.seeds: must be a non-empty list of integers >= 0, got []" in lines
    assert "train.max_epochs: must be an integer >= 1, got 'abc'" in lines
    assert "train.lr: must be a number > 0, got -1" in lines
    assert has(lines, "train.heads: must be a non-empty list drawn from ['linear', 'mlp', 'cooccurrence', "
                      "'scalar_mix', 'gated'], each once, got []")
    assert has(lines, "train.weight_decay: must be a number >= 0") and has(lines, "train.device: must be auto")
    assert has(lines, "train.mlp.widths: must be a list of integers >= 1")
    assert has(lines, "train.mlp.dropout: must be a number >= 0 and < 1, got 1.5")
    assert len(lines) == 9, lines
    lines = problems_of(tmp_path, lambda raw: raw["train"].update(seeds=[0, 0], heads=["linear", "svm"]))
    assert has(lines, "train.seeds: must be a list of distinct integers") and has(lines, "train.heads:")
    lines = problems_of(tmp_path, lambda raw: (raw["train"].update(heads=["mlp", "mlp"]),
                                               raw["extract"].update(poolings=["mean", "mean"])))
    assert lines == ["extract.poolings: must be a non-empty list drawn from ['mean', 'last', 'first', 'max', "
                     "'mean_nospecial'], each once, got ['mean', 'mean']",
                     "train.heads: must be a non-empty list drawn from ['linear', 'mlp', 'cooccurrence', 'scalar_mix', "
                     "'gated'], each once, got ['mlp', 'mlp']"], lines


def test_bad_fuse_and_score_values_are_named(tmp_path):
    lines = problems_of(tmp_path, lambda raw: (
        raw["fuse"].update(top_k=-1, operators=["sum"], pooling="avg", multi_model="yes"),
        raw["score"].update(pca_rows=0, rank=-1, alphas=[], protocol="holdout", select_rule="first")))
    assert "fuse.top_k: must be an integer >= 0 and <= 16, got -1" in lines
    assert "fuse.operators: must be a non-empty list drawn from ['mean', 'max', 'concat'], each once, got ['sum']" in lines
    assert has(lines, "fuse.pooling: must be 'best' or one of extract.poolings ['mean', 'last', 'first', 'max', "
                      "'mean_nospecial'], got 'avg'")
    assert "fuse.multi_model: must be true or false, got 'yes'" in lines
    assert "score.pca_rows: must be an integer >= 1, got 0" in lines
    assert "score.rank: must be an integer >= 0, got -1" in lines
    assert "score.alphas: must be a non-empty list of positive numbers, got []" in lines
    assert "score.protocol: must be one of ['validation', 'cv'], got 'holdout'" in lines
    assert "score.select_rule: must be one of ['best', 'one_se'], got 'first'" in lines
    lines = problems_of(tmp_path, lambda raw: raw["score"].update(rank=64, pca_rows=32))
    assert lines == ["score.pca_rows: (32) must be at least score.rank (64): 64 principal directions need that many rows"]
    lines = problems_of(tmp_path, lambda raw: (raw["extract"].update(poolings=["mean"]), raw["fuse"].update(pooling="max")))
    assert has(lines, "fuse.pooling: must be 'best' or one of extract.poolings ['mean'], got 'max'")


def test_bad_compressor_options_are_named(tmp_path):
    lines = problems_of(tmp_path, lambda raw: raw["extract"].update(compressor={"codec": "zstd", "level": "fast"}))
    assert lines == ["extract.compressor.level: must be an integer from 1 (fastest) to 22 (smallest), got 'fast'"]
    lines = problems_of(tmp_path, lambda raw: raw["extract"].update(
        compressor={"codec": "blosc", "cname": "lz5", "clevel": 10, "shuffle": "bogus", "levle": 1}))
    assert has(lines, "extract.compressor.cname: must be one of ['blosclz', 'lz4'")
    assert "extract.compressor.clevel: must be an integer from 0 to 9, got 10" in lines
    assert "extract.compressor.shuffle: must be one of ['noshuffle', 'shuffle', 'bitshuffle'], got 'bogus'" in lines
    assert has(lines, "extract.compressor.levle: unknown option for codec blosc (did you mean 'clevel'?)")
    lines = problems_of(tmp_path, lambda raw: raw["extract"].update(compressor={"codec": "none", "level": 3}))
    assert has(lines, "extract.compressor.level: unknown option for codec none")
    lines = problems_of(tmp_path, lambda raw: raw["extract"].update(compressor={"codec": "gzip"}))
    assert has(lines, "extract.compressor: must be {codec: none|blosc|zstd, ...}")


def test_good_compressors_pass_unchanged_so_the_store_fingerprint_does_not_move(tmp_path):
    for compressor in ({"codec": "zstd", "level": 1}, {"codec": "blosc", "cname": "lz4", "clevel": 1,
                                                        "shuffle": "bitshuffle"}, {"codec": "none"}):
        raw = registry()
        raw["extract"]["compressor"] = compressor
        assert load_params(write(tmp_path, raw)).extract.compressor == compressor


def test_defaults_are_params_yaml_values_defined_once(tmp_path):
    """Every section of params.yaml (its keys, extract's included) holds exactly the models' defaults."""
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    for section in SECTIONS:
        model = ParamsFile.model_fields[section].default
        assert set(written[section]) <= set(type(model).model_fields), section
        assert type(model).model_validate(written[section]) == model, section
    real = load_params(REPO / "params.yaml")
    assert (real.score, real.fuse, real.train, real.report) == (ScoreSettings(), FuseSettings(), TrainSettings(),
                                                                ReportSettings())
    assert real.extract.compressor == {"codec": "zstd", "level": 1} == ExtractSettings().compressor
    # the values the issue found disagreeing in code: 40 epochs, lr 1e-3, MLP [1024, 256]
    assert (real.train.max_epochs, real.train.lr, real.train.mlp.widths) == (30, 0.002, (256,))
    assert head_options("mlp") == {"widths": [256], "dropout": 0.5}
    # a partial nested mapping keeps the other defaults
    raw = registry()
    raw["train"] = {"mlp": {"widths": [32]}}
    assert load_params(write(tmp_path, raw)).train.mlp.dropout == 0.5


def test_stage2_consumers_are_built_from_the_typed_sections(tmp_path):
    from pipeline.select.fusion import OPERATORS, fuse_settings
    from pipeline.heads.networks import HEADS
    from pipeline.select.probe import METRICS, Protocol, protocol_from_params
    from pipeline.heads.training import train_settings
    assert (FUSE_OPERATORS, HEAD_NAMES, SCORE_METRICS) == (OPERATORS, HEADS, METRICS)
    assert protocol_from_params(ScoreSettings()) == Protocol(), "the probe's own defaults agree with params.yaml's"
    raw = registry()
    raw["score"].update(select_rule="best", protocol="cv", folds=3, alphas=["1e-3", 1])   # YAML reads 1e-3 as text
    raw["train"].update(lr="1e-3")
    params = load_params(write(tmp_path, raw))
    assert not hasattr(params, "raw"), "stages get typed sections, never the raw file"
    protocol = protocol_from_params(params.score)
    assert (protocol.select_rule, protocol.name, protocol.folds, protocol.alphas) == ("best", "cv", 3, (0.001, 1.0))
    settings = train_settings(params.train)
    assert settings["lr"] == 0.001 and settings["mlp"] == {"widths": [256], "dropout": 0.5}
    assert fuse_settings(params.fuse)["operators"] == ["mean", "max", "concat"]


def test_the_study_profiles_still_load():
    """The study runs at full size (issue 19); its capped version is a profile on top of it."""
    study, capped = load_params(REPO / "study.yaml"), load_params(REPO / "study_capped.yaml")
    assert study.report.out == "reports/study" and study.train == load_params(REPO / "params.yaml").train
    assert study.data.max_rows == {} and capped.data.max_rows == {"train": 1000, "validation": 500, "test": 1000}
    assert capped.report.out == "reports/study_capped" and capped.store.name == "study_capped"
    assert study.store.name == "study" and len(study.selected_datasets) == 5
    assert (capped.selected_models, capped.selected_datasets, capped.datasets) == (
        study.selected_models, study.selected_datasets, study.datasets)
