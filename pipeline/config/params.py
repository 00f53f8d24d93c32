"""Load params.yaml (and profiles built on it) into typed settings, and validate them before any work
starts: every problem in the file is reported at once, each naming its key, what it must be and what it
got; a misspelt key is named with the closest known one."""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.fields import closest
from pipeline.config.sections import (NAME_PATTERN, SPLIT_NAMES, CostSettings, DatasetSpec, DataSettings,
                                      ExtractSettings, FuseSettings, ModelSpec, ParamsFile, ReportSettings,
                                      ScoreSettings, TrainSettings)
from pipeline.core import location
from pipeline.core.errors import ConfigError
from pipeline.hidden_states.pooling import POOLINGS

# -- what the stages get ----------------------------------------------------------------------------
@dataclass
class Params:
    root: Path                       # folder of params.yaml; relative paths resolve against it
    store: Path
    data_mirror: Path | None
    models: dict[str, ModelSpec]
    datasets: dict[str, DatasetSpec]
    selected_models: list[str]
    selected_datasets: list[str]
    data: DataSettings
    extract: ExtractSettings
    score: ScoreSettings = ScoreSettings()
    fuse: FuseSettings = FuseSettings()
    train: TrainSettings = TrainSettings()
    cost: CostSettings = CostSettings()
    report: ReportSettings = ReportSettings()
    embeddings: str | Path | None = None   # paths.embeddings: a folder or a URL (s3://...); default store/embeddings

    def model(self, name: str) -> ModelSpec:
        if name not in self.models:
            raise ConfigError(f"unknown model {name!r}: known models are {sorted(self.models)}; "
                              f"add an entry under `models:` in params.yaml")
        return self.models[name]

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            raise ConfigError(f"unknown dataset {name!r}: known datasets are {sorted(self.datasets)}; "
                              f"add an entry under `datasets:` in params.yaml")
        return self.datasets[name]

    def extract_for(self, dataset: str) -> ExtractSettings:
        """The extract settings of one corpus: its own max_len where its entry sets one."""
        max_len = self.dataset(dataset).max_len
        return self.extract if max_len is None else self.extract.model_copy(update={"max_len": max_len})

    @property
    def embeddings_root(self) -> Path | str:
        """Where the stores live, for the writer and every reader: paths.embeddings (a folder, or a URL string),
        else store/embeddings. Models, corpora, scores and heads stay under paths.store."""
        return self.embeddings if self.embeddings is not None else self.store / "embeddings"

    def embeddings_path(self, model: str, dataset: str) -> Path | str:
        return location.join(self.embeddings_root, check_name(dataset, "dataset"), check_name(model, "model"))

    def data_dir(self, dataset: str) -> Path:
        return self.store / "data" / check_name(dataset, "dataset")

    def model_dir(self, model: str) -> Path:
        return self.store / "models" / check_name(model, "model")


def check_name(name: str, what: str) -> str:
    """Names become path parts under store/: refuse anything that could escape it."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise ConfigError(f"{what} name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
                          f"(no slashes, no '..'), at most 100 characters")
    return name


# -- the report of problems -------------------------------------------------------------------------
def _inner(annotation: Any) -> tuple[Any, str | None]:
    """A field type without Annotated and Optional, and the phrase its metadata carries."""
    wanted = None
    while True:
        if get_origin(annotation) is Annotated:
            for meta in annotation.__metadata__:
                wanted = (getattr(meta, "json_schema_extra", None) or {}).get("wanted", wanted)
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) is Union:
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation, wanted


def _lines(error: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """One pydantic error as report lines: the deepest key that says what it wants, and what it got."""
    if error["type"] == "problems":
        return error["ctx"]["problems"]
    loc, kind, path, wanted, known = error["loc"], ParamsFile, [], None, None
    for part in loc:
        if part == "[key]":
            break
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            known = [n for n in kind.model_fields if n != "name"]
            if part not in kind.model_fields:
                break
            field = kind.model_fields[part]
            kind, found = _inner(Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation)
            wanted = (field.json_schema_extra or {}).get("wanted") or found
        elif get_origin(kind) is dict:
            kind, wanted = _inner(get_args(kind)[1])
            known = None
        else:
            break
        path.append(str(part))
    key = ".".join(path)
    if error["type"] == "extra_forbidden":
        what = "section" if len(loc) == 1 else "option"
        return [f"{key + '.' if key else ''}{loc[-1]}: unknown {what}{closest(loc[-1], known or [])}; "
                f"known {what}s are {sorted(known or [])}"]
    if "[key]" in loc:
        return [f"{key}: unknown name; known names are {list(SPLIT_NAMES)}"]      # the path ends at the key
    got = raw
    for part in path:
        got = got.get(part) if isinstance(got, dict) else None
    if error["type"] == "wanted":
        wanted = error["msg"]
    if error["type"] == "missing":
        return [f"{key}: is required{f' ({wanted})' if wanted else ''}"]
    return [f"{key}: must be {wanted or 'a mapping'}, got {got!r}"]


def _cross_checks(raw: dict[str, Any], root: Path) -> list[str]:
    """What one section alone cannot judge; read from the raw file so it is reported beside every other problem."""
    section = lambda name: raw.get(name) if isinstance(raw.get(name), dict) else {}
    problems, extract = [], section("extract")
    poolings = extract.get("poolings", list(POOLINGS))
    pooling = section("fuse").get("pooling", "best")
    if isinstance(poolings, list) and pooling != "best" and pooling not in poolings:
        problems.append(f"fuse.pooling: must be 'best' or one of extract.poolings {poolings}, got {pooling!r}")
    budget = extract.get("token_budget", ExtractSettings().token_budget)
    for kind in ("models", "datasets"):
        for name, entry in section(kind).items():
            if not NAME_PATTERN.match(str(name)) or ".." in str(name):
                problems.append(f"{kind}.{name}: {kind[:-1]} names may hold only letters, digits, '.', '_' and '-'")
            max_len = entry.get("max_len") if isinstance(entry, dict) else None
            if isinstance(max_len, int) and isinstance(budget, int) and max_len > budget:
                problems.append(f"datasets.{name}.max_len: ({max_len}) must be at most extract.token_budget "
                                f"({budget}) so that the longest text fits a batch")
    for key in ("models", "datasets"):
        listed = section("select").get(key)
        for name in dict.fromkeys(listed if isinstance(listed, list) else []):
            if name not in section(key):
                problems.append(f"select.{key}: unknown {key[:-1]} {name!r}; known {key} are {sorted(section(key))}")
    embeddings = section("paths").get("embeddings")
    if isinstance(embeddings, str) and re.search(r"://[^/@]*:[^/@]*@", embeddings):
        problems.append("paths.embeddings: must not hold credentials: set AWS_ACCESS_KEY_ID etc. in the environment")
    for key, value in (("paths.store", section("paths").get("store", "store")), ("paths.embeddings", embeddings),
                       ("report.out", section("report").get("out", "reports"))):
        if isinstance(value, str) and value.strip() and not location.is_url(value):
            if why := _not_a_folder(location.as_location(value, root)):
                problems.append(f"{key}: {why}")
    return problems


def _not_a_folder(path: Path) -> str | None:
    """Why a configured folder cannot hold the project's files: it is a file, or on a virtual filesystem."""
    resolved = Path(path).resolve()
    if resolved.is_file():
        return f"{path} is a file; it must be a folder (existing, or one to create)"
    if len(resolved.parts) > 1 and resolved.parts[1] in ("proc", "sys", "dev"):
        return f"{path} is under /{resolved.parts[1]}, a virtual filesystem; choose a folder on a disk"
    return None


# -- loading ----------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return raw


def _with_base(raw: dict[str, Any], path: Path) -> tuple[dict[str, Any], Path]:
    """A profile (`base: params.yaml` plus overrides) is its base file with the overrides merged in,
    so a study changes a few keys and shares the model and dataset registries. Returns the merged
    params and the folder of the file at the bottom of the chain: relative paths resolve against it,
    wherever the profile lives."""
    base = raw.pop("base", None)
    if base is None:
        return raw, path.parent
    base_path = (path.parent / str(base)).resolve()
    if base_path == path or not base_path.is_file():
        raise ConfigError(f"{path}: base {base!r} must name another params file")
    merged, root = _with_base(_read_yaml(base_path), base_path)
    return _merge(merged, raw), root


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def merged_params(path: str | Path) -> tuple[dict[str, Any], Path]:
    """A params file with its `base:` chain merged in, and the folder its relative paths resolve against."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root or pass --params")
    return _with_base(_read_yaml(path), path)


def load_params(path: str | Path = "params.yaml", models: list[str] | None = None,
                datasets: list[str] | None = None) -> Params:
    """Parse and validate params.yaml; `models`/`datasets` override the selection (a stage's own item)."""
    path = Path(path).resolve()
    raw, root = merged_params(path)
    problems = _cross_checks(raw, root)
    try:
        parsed = ParamsFile.model_validate(raw)
    except ValidationError as error:
        parsed = None
        problems = [line for e in error.errors() for line in _lines(e, raw)] + problems
    for key, names, known in (("--model", models or [], raw.get("models") or {}),
                              ("--dataset", datasets or [], raw.get("datasets") or {})):
        kind = key.removeprefix("--")
        problems += [f"{key}: unknown {kind} {n!r}; known {kind}s are {sorted(known)}" for n in names if n not in known]
    if problems:
        problems = list(dict.fromkeys(problems))
        listed = "\n  - ".join(problems)
        raise ConfigError(f"{path} has {len(problems)} problem(s):\n  - {listed}")
    paths = parsed.paths
    return Params(root=root, store=root / paths.store,
                  data_mirror=root / paths.data_mirror if paths.data_mirror else None,
                  models=parsed.models, datasets=parsed.datasets,
                  selected_models=list(models if models is not None else parsed.select.models),
                  selected_datasets=list(datasets if datasets is not None else parsed.select.datasets),
                  data=parsed.data, extract=parsed.extract, score=parsed.score, fuse=parsed.fuse, train=parsed.train,
                  cost=parsed.cost, report=parsed.report,
                  embeddings=None if paths.embeddings is None else location.as_location(paths.embeddings, root))
