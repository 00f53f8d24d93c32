"""Typed result records: what the score, fuse and train stages write and the report reads.

Each record is a pydantic model whose fields are exactly the keys of its JSON object on disk, so `to_json`
writes the keys the stages always wrote and `from_json` reads them back, refusing a missing or unknown key,
or a value of the wrong scalar type (strictly: no number from a string, no boolean for a number), with a
ResultFileError that names the file, the place in it and the key. Records made in code are validated
leniently (numpy scalars become Python numbers).
Nested records (a leaderboard row inside the chosen fusion) are converted by their field types.

Fields that only some rows carry (the scalar-mix head's layer weights) are `optional`: left out of the
JSON when None, and None when absent. Fields filled in after a row is made (the paired comparisons of
pipeline/selection.annotate, the test intervals of pipeline/significance) default to None until then.

Readers not typed yet (plots, layer reports) index a record like the dict it replaces: `row["score"]`.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.errors import PipelineError

R = TypeVar("R", bound="Record")


class ResultFileError(PipelineError):
    """A stage's result file is missing, not JSON, or has other keys than its record: rerun that stage."""


def optional(default: Any = None) -> Any:
    """A field that some rows lack: absent from the JSON when None."""
    return Field(default=default, json_schema_extra={"optional": True})


def _optional(field) -> bool:
    return bool((field.json_schema_extra or {}).get("optional"))


class Record(BaseModel):
    """to_json / from_json for a model of JSON values and nested records."""
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> dict[str, Any]:
        out = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None and _optional(field):
                continue
            out[name] = _dump(value)
        return out

    @classmethod
    def from_json(cls: type[R], data: Any, source: str = "<json>") -> R:
        """The record from its JSON object; `source` (file and place in it) names where a bad key sits."""
        if not isinstance(data, dict):
            raise ResultFileError(f"{source}: expected a {cls.__name__} object, found {type(data).__name__}")
        fields = cls.model_fields
        unknown = [key for key in data if key not in fields]
        if unknown:
            raise ResultFileError(f"{source}: unknown key {unknown[0]!r} in a {cls.__name__} "
                                  f"(known: {', '.join(fields)}); the file was written by other code: rerun its stage")
        missing = [name for name, f in fields.items() if name not in data and not _optional(f)]
        if missing:
            raise ResultFileError(f"{source}: missing key {missing[0]!r} in a {cls.__name__}; the file is damaged "
                                  f"or was written by other code: rerun its stage")
        loaded = {key: _load(fields[key].annotation, value, f"{source}.{key}") for key, value in data.items()}
        try:
            return cls.model_validate(loaded, strict=True)
        except ValidationError as error:
            wrong = error.errors()[0]
            where = ".".join(str(part) for part in (source, *wrong["loc"]))
            raise ResultFileError(f"{where}: {wrong['msg'].lower()}, found {wrong['input']!r} in a {cls.__name__}; "
                                  f"the file is damaged or was written by other code: rerun its stage") from None

    def __getitem__(self, key: str) -> Any:
        """Read access by JSON key, for readers that still index dicts."""
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


def as_json(value: Any) -> Any:
    """A value holding records (scores.json's dict of ScoreRow, a list of rows) as plain JSON values."""
    return _dump(value)


def _record_type(hint: Any) -> type[Record] | None:
    return hint if isinstance(hint, type) and issubclass(hint, Record) else None


def _load(hint: Any, value: Any, where: str) -> Any:
    """`value` converted to the field's type where that type holds records; other values as they are."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):                  # X | None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _load(inner[0], value, where) if len(inner) == 1 else value
    record = _record_type(hint)
    if record is not None:
        return record.from_json(value, where)
    if origin is list and args and _record_type(args[0]):
        if not isinstance(value, list):
            raise ResultFileError(f"{where}: expected a list, found {type(value).__name__}")
        return [args[0].from_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and len(args) == 2 and _record_type(args[1]):
        if not isinstance(value, dict):
            raise ResultFileError(f"{where}: expected an object, found {type(value).__name__}")
        return {k: args[1].from_json(v, f"{where}.{k}") for k, v in value.items()}
    return value


def read_json(path: Path) -> Any:
    """A stage's JSON file, or a ResultFileError saying which file is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ResultFileError(f"{path}: no such result file; run the stage that writes it (dvc repro)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultFileError(f"{path}: not valid JSON ({error}); rerun the stage that writes it") from None


def read_record(path: Path, cls: type[R]) -> R:
    return cls.from_json(read_json(path), str(path))


def read_records(path: Path, cls: type[R]) -> list[R]:
    data = read_json(path)
    if not isinstance(data, list):
        raise ResultFileError(f"{path}: expected a list of {cls.__name__}, found {type(data).__name__}")
    return [cls.from_json(row, f"{path}[{i}]") for i, row in enumerate(data)]


# -- probe rows: the score stage's layers and the fuse stage's candidates -----------------------------------
class ProbeRow(Record):
    """The probe's figures of one candidate (a layer, or a fusion of layers) and its paired comparisons."""
    accuracy: float
    accuracy_std: float
    macro_f1: float
    macro_f1_std: float
    alpha: float
    score: float                                # the metric the rules choose by (accuracy or macro_f1)
    std: float
    seconds: float
    vs_reference: float | None = None           # pipeline.select.selection.annotate: against the reference
    vs_reference_se: float | None = None
    vs_reference_low: float | None = None
    vs_reference_high: float | None = None
    vs_leader: float | None = None              # against the top of the ranking
    vs_leader_se: float | None = None
    vs_leader_low: float | None = None
    vs_leader_high: float | None = None
    within_one_se: bool | None = None


# -- score stage: store/scores/<dataset>/<model>/scores.json -----------------------------------------------
class ScoreRow(ProbeRow):
    """The probe on one pooling x layer of one model (an entry of scores.json's `rows`); its reference is the
    last layer."""
    model: str
    pooling: str
    layer: int
    layers: list[int]
    models: list[str]
    width: int
    relative_depth: float


ROW_ENTRIES = ("best", "last", "reference", "chosen")      # scores.json entries that are one ScoreRow




def scores_from_json(data: Any, source: str) -> dict[str, Any]:
    """scores.json with its rows (and its best, last, reference and chosen rows) as ScoreRow records."""
    if not isinstance(data, dict) or "rows" not in data:
        raise ResultFileError(f"{source}: missing key 'rows' (not a score stage's scores.json); rerun stage score")
    out = dict(data)
    out["rows"] = [ScoreRow.from_json(row, f"{source}.rows[{i}]") for i, row in enumerate(data["rows"])]
    for key in ROW_ENTRIES:
        if key not in data:
            raise ResultFileError(f"{source}: missing key {key!r}; rerun stage score")
        out[key] = ScoreRow.from_json(data[key], f"{source}.{key}")
    return out


def read_scores(path: Path) -> dict[str, Any]:
    return scores_from_json(read_json(path), str(path))


# -- fuse stage: store/fusion/<dataset>/{leaderboard,chosen}.json --------------------------------------------
class LeaderboardRow(ProbeRow):
    """One fusion candidate's probe score. Within one model: `layers` a list of layers, `pooling` one pooling;
    across models (family multi-model): one list of layers and one pooling per model. Its reference is the
    model's last layer (multi-model: the strongest model's)."""
    candidate: str
    family: str
    operator: str
    layers: list[Any]
    models: list[str]
    pooling: Any
    width: int
    groups: list[dict[str, Any]]                # head input groups: model, pooling, layers, operator


class ModelChoice(Record):
    """One model's entries in chosen.json: its pooling, baselines and choices (rows of the leaderboard)."""
    pooling: str
    num_layers: int
    dim: int
    decoder: bool
    last: LeaderboardRow
    best_layer: LeaderboardRow
    best_fusion: LeaderboardRow
    llmembed: LeaderboardRow
    optimism: dict[str, Any] = Field(default_factory=dict)     # pipeline.select.selection.optimism per choice


class ChosenFusion(Record):
    """chosen.json: what the fusion search chose on one dataset, per model and overall."""
    dataset: str
    metric: str
    protocol: str
    select_rule: str
    reference: dict[str, Any]
    models: dict[str, ModelChoice]
    best_multi: LeaderboardRow | None
    chosen: LeaderboardRow
    leader: LeaderboardRow
    optimism: dict[str, Any]
    timing: dict[str, dict[str, Any]]
    bytes_read: int
    stage_seconds: float = 0.0                  # set by stages/fuse.py
    note: str = ""


# -- stages train and compare: store/heads/<dataset>/<head>/results.json, store/compare/<dataset>/results.json -----------------------------------------------------
class HeadResult(Record):
    """One head trained on one row's inputs: means and stds over seeds, test intervals and paired tests."""
    row: str
    kind: str                                   # last | best_layer | best_fusion | llmembed | all_layers | best_multi | cooccurrence
    head: str
    groups: list[dict[str, Any]]
    probe_score: float | None
    probe_std: float | None
    seeds: list[int]
    seconds: float
    validation_accuracy: float
    validation_accuracy_std: float
    validation_macro_f1: float
    validation_macro_f1_std: float
    test_accuracy: float
    test_accuracy_std: float
    test_macro_f1: float
    test_macro_f1_std: float
    layer_weights: list[float] | None = optional()        # scalar_mix only: mean over seeds
    layer_weights_std: list[float] | None = optional()
    folder: str = ""
    test_accuracy_low: float | None = None      # pipeline.select.significance.add_test_uncertainty
    test_accuracy_high: float | None = None
    test_macro_f1_low: float | None = None
    test_macro_f1_high: float | None = None
    paired_tests: dict[str, dict[str, Any]] = Field(default_factory=dict)


class HeadResults(Record):
    """results.json: every head of one dataset and the settings they were trained with."""
    dataset: str
    results: list[HeadResult]
    bytes_read: int
    seconds: float
    settings: dict[str, Any]
    stage_seconds: float = 0.0                  # set by stages/train.py (one head type) or stages/compare.py
    head_stage_seconds: dict[str, float] = Field(default_factory=dict)   # compare: each head type's train stage



def chosen_on_validation(results: list[HeadResult]) -> HeadResult:
    """The head with the best validation accuracy: predict's default and the report's recommendation, one rule
    so that the head the cost stage times is the head the report recommends."""
    return max(results, key=lambda r: r.validation_accuracy)


# -- cost stage: store/cost/<dataset>/cost.json ----------------------------------------------------------------
class CostCandidate(Record):
    """One configuration of the fusion leaderboard with its probe score and its predict cost."""
    candidate: str
    family: str
    score: float
    vs_leader: float | None
    vs_leader_se: float | None
    within_one_se: bool | None
    deepest: dict[str, int]                     # model -> the deepest layer read: where its forward pass stops
    seconds_per_1000: float                     # estimated from the measured per-depth costs


class CostResult(Record):
    """cost.json: per-model cost curves, the fuse stage's choice timed whole (a check of the curves' estimate),
    every candidate's estimated cost, and the cheapest candidate within one paired SE of the top, with probe
    figures on test. It does not depend on the heads: the report prices a head from the curves."""
    dataset: str
    machine: str                                # CPU model and ISA (or GPU) the timings come from
    device: str
    texts: int                                  # validation texts timed
    repeats: int
    curves: dict[str, dict[str, Any]]           # model -> num_layers, compute_dtype, depths, seconds_per_1000
    check: dict[str, Any]                       # candidate, deepest, measured and estimated seconds per 1,000
    candidates: list[CostCandidate]
    choice: CostCandidate                       # the fuse stage's overall choice
    cheapest: CostCandidate
    choice_test: dict[str, float]               # the probe refitted on train, scored on test (reported only)
    cheapest_test: dict[str, float]
    stage_seconds: float = 0.0                  # set by stages/cost.py
