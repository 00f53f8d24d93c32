"""Load params.yaml into typed settings and validate them before any work starts.

Every problem is collected and reported at once, each naming its key and the fix.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from pipeline import location
from pipeline.attention import ATTENTIONS
from pipeline.errors import ConfigError
from pipeline.pooling import POOLINGS

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MODEL_SOURCES = ("package", "local", "hub")
STORE_DTYPES = ("float16", "float32")
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")
HUB_OPTIONS = ("path", "config", "revision", "splits", "text_column", "label_column")
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SECTIONS = ("paths", "select", "data", "extract", "models", "datasets", "score", "fuse", "train", "cost", "report")
# Stage 2's choices, here so that load_params needs neither torch heads nor Lightning; tests keep them
# equal to pipeline.probe.METRICS, pipeline.fusion.OPERATORS and pipeline.heads.HEADS
SCORE_PROTOCOLS = ("validation", "cv")
SCORE_METRICS = ("accuracy", "macro_f1")
SELECT_RULES = ("best", "one_se")
FUSE_OPERATORS = ("mean", "max", "concat")
FORWARDS = ("auto", "eager", "compiled")   # extract.forward (pipeline/compiled_forward.py)
HEAD_NAMES = ("linear", "mlp", "cooccurrence", "scalar_mix", "gated")
TOP_K_MAX = 16                   # every subset of the top-k layers: 2^k sets
COMPRESSOR_OPTIONS = {"none": (), "zstd": ("level",), "blosc": ("cname", "clevel", "shuffle")}
BLOSC_SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    files: tuple[str, ...] = ()      # package sources: "distribution-or-module:relative/path", in order
    path: str | None = None          # local sources: a folder, a .gguf or a .zip
    hub_id: str | None = None
    revision: str | None = None
    sha256: str | None = None        # of the assembled file (required when it is split in parts)
    filename: str | None = None      # name of the assembled file, when parts do not imply it
    trust_remote_code: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


CARVES = ("rows", "whole_texts")   # rows: stratified rows; whole_texts: texts no other row contains, and their phrases out of train


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    text_column: str
    label_column: str
    local: dict[str, str]            # split -> file, relative to paths.data_mirror
    hub: dict[str, Any] | None       # {path, config, revision, splits: {split: hub split}, text_column?, label_column?}
    id_column: str | None = None
    max_len: int | None = None       # this corpus's extract.max_len (long texts: R8, R52); None: extract.max_len
    resplit: dict[str, float] | None = None   # {from: test, train: f, validation: f}: one split shared out, seeded
    carve: str = "rows"              # rows | whole_texts: how validation is carved from train (pipeline/corpora.py)


@dataclass(frozen=True)
class ExtractSettings:
    max_len: int
    token_budget: int
    block_rows: int
    dtype: str
    compute_dtype: str
    device: str
    padding_side: str
    poolings: tuple[str, ...]
    compressor: dict[str, Any]
    attention: str = "auto"          # auto | sdpa | eager (pipeline/attention.py); in the store fingerprint
    attention_entropy_rows: int = 16  # rows per block whose attention entropy is stored (0: none); in the fingerprint
    forward: str = "auto"            # auto | eager | compiled (pipeline/compiled_forward.py); in the store fingerprint
    # scale-out (pipeline/distributed.py); not in the store fingerprint, so any process count resumes a store
    devices: int = 1                 # processes (one device each) per node
    num_nodes: int = 1
    strategy: str = "auto"           # auto | ddp (one process per device, gloo on CPU, nccl on CUDA)


@dataclass(frozen=True)
class DataSettings:
    validation_fraction: float
    seed: int
    on_bad_row: str
    max_rows: dict[str, int] = field(default_factory=dict)   # split -> cap (stratified, seeded sample); absent: all


# -- Stage 2 sections: the defaults below are params.yaml's, and live nowhere else ---------------------
def _plain(settings: Any) -> dict[str, Any]:
    """A settings dataclass as JSON-ready dicts and lists (consumers index it; results.json records it)."""
    return json.loads(json.dumps(asdict(settings)))


@dataclass(frozen=True)
class ScoreSettings:
    """`score:` the probe shared by score and fuse (pipeline.probe.Protocol is built from it)."""
    protocol: str = "cv"             # cv | validation (the study's audit, docs/study.md)
    folds: int = 5
    alphas: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    rank: int = 128                  # 0: full width
    pca_rows: int = 2048
    metric: str = "accuracy"
    bootstrap: int = 200
    seed: int = 0
    select_rule: str = "best"        # best | one_se (the simplest candidate within one paired SE of the top)
    geometry_rows: int = 1000        # train rows of the label-free layer scores (0: off)
    importance_rows: int = 8192      # train rows fitting the gradient-importance head (0: off)


@dataclass(frozen=True)
class FuseSettings:
    """`fuse:` the candidate space of the fusion search."""
    pooling: str = "best"            # best | a pooling of extract.poolings
    top_k: int = 6
    last_n: int = 5
    operators: tuple[str, ...] = FUSE_OPERATORS
    wide_max_layers: int = 4
    multi_model: bool = True

    def as_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass(frozen=True)
class MlpOptions:
    widths: tuple[int, ...] = (256,)
    dropout: float = 0.5


@dataclass(frozen=True)
class CooccurrenceOptions:
    width: int = 256
    sigma: float = 1.0
    widths: tuple[int, ...] = (256,)
    dropout: float = 0.5


@dataclass(frozen=True)
class ScalarMixOptions:
    widths: tuple[int, ...] = ()
    dropout: float = 0.1


@dataclass(frozen=True)
class GatedOptions:
    width: int = 256                 # each source's projection
    widths: tuple[int, ...] = ()     # classifier hidden layers after the gated mix ([]: linear)
    dropout: float = 0.1


@dataclass(frozen=True)
class LinearOptions:
    """A linear head has no options; `train.linear: {}` is its key, so its DVC stage lists one like every head."""


@dataclass(frozen=True)
class TrainSettings:
    """`train:` the heads, their seeds and their optimiser."""
    heads: tuple[str, ...] = HEAD_NAMES
    seeds: tuple[int, ...] = (0, 1, 2)
    max_epochs: int = 30
    patience: int = 3
    batch_size: int = 1024
    min_steps_per_epoch: int = 16    # a small train split gets smaller batches (see LayerDataModule)
    lr: float = 0.002
    weight_decay: float = 0.0001
    device: str = "auto"             # auto | cpu | cuda | cuda:N | mps
    threads: int = 2                 # torch CPU threads (0: torch's default)
    linear: LinearOptions = field(default_factory=LinearOptions)
    mlp: MlpOptions = field(default_factory=MlpOptions)
    cooccurrence: CooccurrenceOptions = field(default_factory=CooccurrenceOptions)
    scalar_mix: ScalarMixOptions = field(default_factory=ScalarMixOptions)
    gated: GatedOptions = field(default_factory=GatedOptions)

    def as_dict(self) -> dict[str, Any]:
        return _plain(self)


def head_options(head: str) -> dict[str, Any]:
    """A head's default options (train.mlp, ...): fill what an older head config.json lacks."""
    return TrainSettings().as_dict().get(head, {})


@dataclass(frozen=True)
class CostSettings:
    """`cost:` how the predict path is timed (stage cost): on this many validation texts, the median of this many
    repeats, each model at this many depths (the embeddings, the last block and evenly between), a line fitted through them."""
    texts: int = 256
    repeats: int = 3
    depths: int = 4


@dataclass(frozen=True)
class ReportSettings:
    """`report:` where the report goes."""
    out: str = "reports"


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
    score: ScoreSettings = field(default_factory=ScoreSettings)
    fuse: FuseSettings = field(default_factory=FuseSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    cost: CostSettings = field(default_factory=CostSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    embeddings: str | Path | None = None   # paths.embeddings: a folder or an fsspec URL (s3://...); default store/embeddings

    def model(self, name: str) -> ModelSpec:
        if name not in self.models:
            raise ConfigError(f"unknown model {name!r}: known models are {sorted(self.models)}; "
                              f"add an entry under `models:` in params.yaml")
        return self.models[name]

    def extract_for(self, dataset: str) -> ExtractSettings:
        """The extract settings of one corpus: its own max_len where its entry sets one."""
        max_len = self.dataset(dataset).max_len
        return self.extract if max_len is None else replace(self.extract, max_len=max_len)

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            raise ConfigError(f"unknown dataset {name!r}: known datasets are {sorted(self.datasets)}; "
                              f"add an entry under `datasets:` in params.yaml")
        return self.datasets[name]

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


class _Problems:
    """Collects every problem in the file so the user fixes them in one go."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{key}: {message}")

    def raise_if_any(self, path: Path) -> None:
        if self.items:
            listed = "\n  - ".join(self.items)
            raise ConfigError(f"{path} has {len(self.items)} problem(s):\n  - {listed}")


def _int(problems: _Problems, section: dict, key: str, prefix: str, minimum: int, default: int | None = None) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.add(f"{prefix}.{key}", f"must be an integer >= {minimum}, got {value!r}")
        return minimum
    return value


def _choice(problems: _Problems, section: dict, key: str, prefix: str, choices, default=None) -> str:
    value = section.get(key, default)
    if value not in choices:
        problems.add(f"{prefix}.{key}", f"must be one of {list(choices)}, got {value!r}")
        return choices[0]
    return value


def _unknown_keys(problems: _Problems, prefix: str, mapping: dict, known) -> None:
    """Name every key no reader looks at, with the closest known one: a typo must not fall back to a default."""
    for extra in sorted(set(mapping) - set(known), key=str):
        problems.add(f"{prefix}.{extra}", f"unknown option{_closest(extra, known)}; known options are {sorted(known)}")


def _mapping(problems: _Problems, prefix: str, value: Any, known) -> dict:
    """A section as a dict (absent: empty), its unknown keys named."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.add(prefix, f"must be a mapping, got {value!r}")
        return {}
    _unknown_keys(problems, prefix, value, known)
    return value


class _Section:
    """Typed reads of one mapping: each bad value is added under `prefix.key`, absent keys take the
    dataclass defaults, unknown keys are named."""

    def __init__(self, problems: _Problems, prefix: str, value: Any, defaults: Any):
        self.problems, self.prefix, self.defaults = problems, prefix, defaults
        self.values = _mapping(problems, prefix, value, [f.name for f in fields(defaults)])

    def get(self, key: str) -> Any:
        return self.values.get(key, getattr(self.defaults, key))

    def bad(self, key: str, wanted: str) -> Any:
        self.problems.add(f"{self.prefix}.{key}", f"must be {wanted}, got {self.get(key)!r}")
        return getattr(self.defaults, key)

    def integer(self, key: str, minimum: int, maximum: int | None = None) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
                maximum is not None and value > maximum):
            return self.bad(key, f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else ""))
        return value

    def number(self, key: str, minimum: float, above: bool = False, below: float | None = None) -> float:
        """A finite number (YAML reads 1e-3 as a string: accepted); `above`: strictly greater than minimum."""
        value = _as_number(self.get(key))
        if value is None or value < minimum or (above and value == minimum) or (below is not None and value >= below):
            wanted = f"a number {'>' if above else '>='} {minimum}" + (f" and < {below}" if below is not None else "")
            return self.bad(key, wanted)
        return value

    def flag(self, key: str) -> bool:
        value = self.get(key)
        return value if isinstance(value, bool) else self.bad(key, "true or false")

    def choice(self, key: str, choices) -> str:
        value = self.get(key)
        return value if isinstance(value, str) and value in choices else self.bad(key, f"one of {list(choices)}")

    def names(self, key: str, choices) -> tuple[str, ...]:
        """A non-empty list drawn from `choices`, each once: an empty list would run nothing and exit 0."""
        value = self.get(key)
        if (not isinstance(value, (list, tuple)) or not value or any(v not in choices for v in value)
                or len(set(value)) != len(value)):
            return self.bad(key, f"a non-empty list drawn from {list(choices)}, each once")
        return tuple(value)

    def integers(self, key: str, minimum: int, empty: bool = True) -> tuple[int, ...]:
        value = self.get(key)
        if (not isinstance(value, (list, tuple)) or (not value and not empty)
                or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in value)):
            return self.bad(key, f"a {'' if empty else 'non-empty '}list of integers >= {minimum}")
        return tuple(value)

    def text(self, key: str) -> str:
        value = self.get(key)
        return value if isinstance(value, str) and value.strip() else self.bad(key, "a non-empty string")


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _parse_score(problems: _Problems, value: Any) -> ScoreSettings:
    section = _Section(problems, "score", value, ScoreSettings())
    alphas = section.get("alphas")
    numbers = [_as_number(a) for a in alphas] if isinstance(alphas, (list, tuple)) else []
    if not numbers or any(a is None or a <= 0 for a in numbers):
        numbers = list(section.bad("alphas", "a non-empty list of positive numbers"))
    rank, pca_rows = section.integer("rank", 0), section.integer("pca_rows", 1)
    if 0 < pca_rows < rank and (section.get("rank"), section.get("pca_rows")) == (rank, pca_rows):
        problems.add("score.pca_rows", f"({pca_rows}) must be at least score.rank ({rank}): "
                                       f"{rank} principal directions need that many rows")
    return ScoreSettings(protocol=section.choice("protocol", SCORE_PROTOCOLS), folds=section.integer("folds", 2),
                         alphas=tuple(numbers), rank=rank, pca_rows=pca_rows,
                         metric=section.choice("metric", SCORE_METRICS), bootstrap=section.integer("bootstrap", 0),
                         seed=section.integer("seed", 0), select_rule=section.choice("select_rule", SELECT_RULES),
                         geometry_rows=section.integer("geometry_rows", 0),
                         importance_rows=section.integer("importance_rows", 0))


def _parse_fuse(problems: _Problems, value: Any, poolings: tuple[str, ...]) -> FuseSettings:
    section = _Section(problems, "fuse", value, FuseSettings())
    pooling = section.get("pooling")
    if pooling != "best" and pooling not in poolings:
        pooling = section.bad("pooling", f"'best' or one of extract.poolings {list(poolings)}")
    return FuseSettings(pooling=pooling, top_k=section.integer("top_k", 0, TOP_K_MAX),
                        last_n=section.integer("last_n", 1), operators=section.names("operators", FUSE_OPERATORS),
                        wide_max_layers=section.integer("wide_max_layers", 1),
                        multi_model=section.flag("multi_model"))


def _parse_train(problems: _Problems, value: Any) -> TrainSettings:
    defaults = TrainSettings()
    section = _Section(problems, "train", value, defaults)
    device = section.get("device")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        device = section.bad("device", "auto, cpu, cuda, cuda:N or mps")
    _Section(problems, "train.linear", section.values.get("linear"), defaults.linear)    # names unknown keys
    mlp = _Section(problems, "train.mlp", section.values.get("mlp"), defaults.mlp)
    co = _Section(problems, "train.cooccurrence", section.values.get("cooccurrence"), defaults.cooccurrence)
    mix = _Section(problems, "train.scalar_mix", section.values.get("scalar_mix"), defaults.scalar_mix)
    gated = _Section(problems, "train.gated", section.values.get("gated"), defaults.gated)
    return TrainSettings(
        heads=section.names("heads", HEAD_NAMES), seeds=_unique(section, "seeds"),
        max_epochs=section.integer("max_epochs", 1), patience=section.integer("patience", 0),
        batch_size=section.integer("batch_size", 1), min_steps_per_epoch=section.integer("min_steps_per_epoch", 1),
        lr=section.number("lr", 0, above=True),
        weight_decay=section.number("weight_decay", 0), device=device, threads=section.integer("threads", 0),
        mlp=MlpOptions(widths=mlp.integers("widths", 1), dropout=mlp.number("dropout", 0, below=1)),
        cooccurrence=CooccurrenceOptions(width=co.integer("width", 1), sigma=co.number("sigma", 0, above=True),
                                         widths=co.integers("widths", 1), dropout=co.number("dropout", 0, below=1)),
        scalar_mix=ScalarMixOptions(widths=mix.integers("widths", 1), dropout=mix.number("dropout", 0, below=1)),
        gated=GatedOptions(width=gated.integer("width", 1), widths=gated.integers("widths", 1),
                           dropout=gated.number("dropout", 0, below=1)))


def _unique(section: _Section, key: str) -> tuple[int, ...]:
    """Seeds: at least one (none would train nothing and exit 0), each once."""
    seeds = section.integers(key, 0, empty=False)
    return seeds if len(set(seeds)) == len(seeds) else section.bad(key, "a list of distinct integers")


def _parse_cost(problems: _Problems, value: Any) -> CostSettings:
    section = _Section(problems, "cost", value, CostSettings())
    return CostSettings(texts=section.integer("texts", 1), repeats=section.integer("repeats", 1),
                        depths=section.integer("depths", 2))


def _parse_report(problems: _Problems, value: Any) -> ReportSettings:
    return ReportSettings(out=_Section(problems, "report", value, ReportSettings()).text("out"))


def _parse_compressor(problems: _Problems, value: Any) -> dict[str, Any]:
    """The store's codec and its options, checked here rather than by zarr halfway into an extraction.
    Returned as written: the store fingerprint records it."""
    if not isinstance(value, dict) or value.get("codec") not in COMPRESSOR_OPTIONS:
        problems.add("extract.compressor", f"must be {{codec: none|blosc|zstd, ...}}, got {value!r}")
        return {"codec": "none"}
    codec, key = value["codec"], "extract.compressor"
    known = ("codec", *COMPRESSOR_OPTIONS[codec])
    for extra in sorted(set(value) - set(known), key=str):
        problems.add(f"{key}.{extra}", f"unknown option for codec {codec}{_closest(extra, known)}; "
                                       f"known options are {sorted(known)}")
    level = value.get("level", 1)
    if codec == "zstd" and (isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22):
        problems.add(f"{key}.level", f"must be an integer from 1 (fastest) to 22 (smallest), got {level!r}")
    if codec == "blosc":
        from numcodecs import blosc
        cnames, clevel = blosc.list_compressors(), value.get("clevel", 1)
        if value.get("cname", "lz4") not in cnames:
            problems.add(f"{key}.cname", f"must be one of {cnames}, got {value.get('cname')!r}")
        if isinstance(clevel, bool) or not isinstance(clevel, int) or not 0 <= clevel <= 9:
            problems.add(f"{key}.clevel", f"must be an integer from 0 to 9, got {clevel!r}")
        if value.get("shuffle", "shuffle") not in BLOSC_SHUFFLES:
            problems.add(f"{key}.shuffle", f"must be one of {list(BLOSC_SHUFFLES)}, got {value.get('shuffle')!r}")
    return dict(value)


def _registry_entry(problems: _Problems, key: str, name: Any, entry: Any, kind: str, needs: str) -> bool:
    """A models/datasets entry has a safe name (it becomes a folder) and is a mapping; else a problem."""
    if not NAME_PATTERN.match(str(name)) or ".." in str(name):
        problems.add(key, f"{kind} names may hold only letters, digits, '.', '_' and '-'")
        return False
    if not isinstance(entry, dict):
        problems.add(key, f"must be a mapping with {needs}")
        return False
    return True


def _parse_model(problems: _Problems, name: str, entry: Any) -> ModelSpec | None:
    key = f"models.{name}"
    if not _registry_entry(problems, key, name, entry, "model", "at least `source`"):
        return None
    _unknown_keys(problems, key, entry, [f.name for f in fields(ModelSpec) if f.name != "name"])
    source = entry.get("source")
    if source not in MODEL_SOURCES:
        problems.add(f"{key}.source", f"must be one of {list(MODEL_SOURCES)}, got {source!r}")
        return None
    files = entry.get("files") or []
    if source == "package":
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and ":" in f for f in files):
            problems.add(f"{key}.files", "a package source needs a list of 'package:relative/path' items")
        elif len(files) > 1 and not entry.get("sha256"):
            problems.add(f"{key}.sha256", "a model split in parts needs the sha256 of the assembled file")
    for text in ("path", "hub_id", "revision", "filename"):
        value = entry.get(text)
        if value is not None and not (isinstance(value, str) and value.strip()):
            problems.add(f"{key}.{text}", f"must be a non-empty string, got {value!r}")
    if source == "local" and not entry.get("path"):
        problems.add(f"{key}.path", "a local source needs `path` (a folder, a .gguf or a .zip)")
    if source == "hub" and not entry.get("hub_id"):
        problems.add(f"{key}.hub_id", "a hub source needs `hub_id` (and a `revision` to be reproducible)")
    sha = entry.get("sha256")
    if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", str(sha)):
        problems.add(f"{key}.sha256", f"must be 64 lower-case hex digits, got {sha!r}")
    trust = entry.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        problems.add(f"{key}.trust_remote_code", f"must be true or false, got {trust!r}")
        trust = False
    return ModelSpec(name=name, source=source, files=tuple(files) if isinstance(files, list) else (),
                     path=entry.get("path"), hub_id=entry.get("hub_id"), revision=entry.get("revision"),
                     sha256=sha, filename=entry.get("filename"), trust_remote_code=trust)


def _parse_dataset(problems: _Problems, name: str, entry: Any) -> DatasetSpec | None:
    key = f"datasets.{name}"
    if not _registry_entry(problems, key, name, entry, "dataset", "text_column, label_column and local and/or hub"):
        return None
    local = entry.get("local") or {}
    hub = entry.get("hub")
    if not local and not hub:
        problems.add(key, "needs `local` files, a `hub` entry, or both")
    if not isinstance(local, dict):
        problems.add(f"{key}.local", "must map split names to files")
        local = {}
    for split, file in local.items():
        if split not in ("train", "validation", "test"):
            problems.add(f"{key}.local.{split}", "split names are train, validation and test")
        elif Path(str(file)).suffix not in DATA_FORMATS:
            problems.add(f"{key}.local.{split}", f"file type must be one of {sorted(DATA_FORMATS)}, got {file!r}")
    if hub is not None:
        if not isinstance(hub, dict) or not hub.get("path") or not isinstance(hub.get("splits", {}), dict):
            problems.add(f"{key}.hub", "must be {path: <hub dataset>, splits: {train: ..., test: ...}}")
            hub = None
        else:
            _unknown_keys(problems, f"{key}.hub", hub, HUB_OPTIONS)
    for column in ("text_column", "label_column"):
        if not isinstance(entry.get(column), str):
            problems.add(f"{key}.{column}", "must name a column")
    _unknown_keys(problems, key, entry, [f.name for f in fields(DatasetSpec) if f.name != "name"])
    max_len = entry.get("max_len")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        problems.add(f"{key}.max_len", f"must be an integer >= 1 (or absent for extract.max_len), got {max_len!r}")
        max_len = None
    carve = entry.get("carve", "rows")
    if carve not in CARVES:
        problems.add(f"{key}.carve", f"must be one of {list(CARVES)}, got {carve!r}")
        carve = "rows"
    return DatasetSpec(name=name, text_column=str(entry.get("text_column")),
                       label_column=str(entry.get("label_column")), local=dict(local), hub=hub,
                       id_column=entry.get("id_column"), max_len=max_len,
                       resplit=_parse_resplit(problems, key, entry.get("resplit")), carve=carve)


def _parse_resplit(problems: _Problems, key: str, resplit: Any) -> dict[str, Any] | None:
    """A corpus shipped as one split (AGNews offline: test only) shared out into train/validation/test."""
    if resplit is None:
        return None
    fractions = {k: v for k, v in resplit.items() if k != "from"} if isinstance(resplit, dict) else None
    if (not isinstance(resplit, dict) or resplit.get("from") not in ("train", "test") or set(fractions) - {"train", "validation"}
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in fractions.values())
            or "train" not in fractions or sum(fractions.values()) >= 1):
        problems.add(f"{key}.resplit", "must be {from: test|train, train: f, validation: f} with fractions in (0, 1) "
                                       f"summing to less than 1 (the rest stays in `from`), got {resplit!r}")
        return None
    return {"from": resplit["from"], **{k: float(v) for k, v in fractions.items()}}


def _closest(name: str, known) -> str:
    """`; did you mean 'x'?` for a misspelt key, or nothing."""
    import difflib
    match = difflib.get_close_matches(str(name), sorted(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _parse_extract(problems: _Problems, section: Any) -> ExtractSettings:
    section = _mapping(problems, "extract", section, [f.name for f in fields(ExtractSettings)])
    poolings = section.get("poolings", list(POOLINGS))
    if not isinstance(poolings, list) or not poolings:
        problems.add("extract.poolings", f"must be a non-empty list drawn from {list(POOLINGS)}")
        poolings = list(POOLINGS)
    for pooling in poolings:
        if pooling not in POOLINGS:
            problems.add("extract.poolings", f"unknown pooling {pooling!r}; known poolings are {list(POOLINGS)}")
    if len(set(poolings)) != len(poolings):
        problems.add("extract.poolings", "lists a pooling twice")
    compressor = _parse_compressor(problems, section.get("compressor", {"codec": "none"}))
    device = section.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        problems.add("extract.device", f"must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
        device = "auto"
    max_len = _int(problems, section, "max_len", "extract", 1, 256)
    token_budget = _int(problems, section, "token_budget", "extract", 1, 1024)
    if token_budget < max_len:
        problems.add("extract.token_budget", f"({token_budget}) must be at least max_len ({max_len}) "
                                             f"so that the longest text fits in one batch")
    devices = _int(problems, section, "devices", "extract", 1, 1)
    num_nodes = _int(problems, section, "num_nodes", "extract", 1, 1)
    strategy = _choice(problems, section, "strategy", "extract", ("auto", "ddp"), "auto")
    if devices * num_nodes > 1 and re.fullmatch(r"cuda:\d+", device):
        problems.add("extract.device", f"{device!r} names one GPU but extract.devices x num_nodes is "
                                       f"{devices * num_nodes}: use cuda or auto (each rank takes its own GPU)")
    return ExtractSettings(
        devices=devices, num_nodes=num_nodes, strategy=strategy,
        max_len=max_len, token_budget=token_budget,
        block_rows=_int(problems, section, "block_rows", "extract", 1, 1024),
        dtype=_choice(problems, section, "dtype", "extract", STORE_DTYPES, "float16"),
        compute_dtype=_choice(problems, section, "compute_dtype", "extract", COMPUTE_DTYPES, "auto"),
        device=device,
        padding_side=_choice(problems, section, "padding_side", "extract", ("right", "left"), "right"),
        poolings=tuple(poolings), compressor=compressor,
        attention=_choice(problems, section, "attention", "extract", ATTENTIONS, "auto"),
        attention_entropy_rows=_int(problems, section, "attention_entropy_rows", "extract", 0, 16),
        forward=_choice(problems, section, "forward", "extract", FORWARDS, "auto"))


def _parse_data(problems: _Problems, section: Any) -> DataSettings:
    section = _mapping(problems, "data", section, [f.name for f in fields(DataSettings)])
    fraction = section.get("validation_fraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        problems.add("data.validation_fraction", f"must be a number between 0 and 1, got {fraction!r}")
        fraction = 0.1
    max_rows = section.get("max_rows") or {}
    if not isinstance(max_rows, dict):
        problems.add("data.max_rows", f"must map split names to row caps, got {max_rows!r}")
        max_rows = {}
    for split, cap in list(max_rows.items()):
        if split not in ("train", "validation", "test"):
            problems.add(f"data.max_rows.{split}", "split names are train, validation and test")
        elif cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 2):
            problems.add(f"data.max_rows.{split}", f"must be an integer >= 2, or null for no cap, got {cap!r}")
    return DataSettings(validation_fraction=float(fraction),
                        seed=_int(problems, section, "seed", "data", 0, 0),
                        on_bad_row=_choice(problems, section, "on_bad_row", "data", ("drop", "error"), "drop"),
                        max_rows={s: c for s, c in max_rows.items() if isinstance(c, int) and not isinstance(c, bool)})


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
    try:
        base_raw = yaml.safe_load(base_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{base_path} is not valid YAML: {error}") from error
    merged, root = _with_base(base_raw, base_path)
    return _merge(merged, raw), root


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def load_params(path: str | Path = "params.yaml", models: list[str] | None = None,
                datasets: list[str] | None = None) -> Params:
    """Parse and validate params.yaml; `models`/`datasets` override the selection (a stage's own item)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    raw, root = _with_base(raw, path)
    problems = _Problems()
    _unknown_sections(problems, raw)
    paths = _mapping(problems, "paths", raw.get("paths"), ("store", "data_mirror", "embeddings"))
    store = root / str(paths.get("store", "store"))
    embeddings = paths.get("embeddings")
    if embeddings is not None and not (isinstance(embeddings, str) and embeddings.strip()):
        problems.add("paths.embeddings", f"must be a folder or a URL such as s3://bucket/prefix, got {embeddings!r}")
        embeddings = None
    if isinstance(embeddings, str) and "://" in embeddings and re.search(r"://[^/@]*:[^/@]*@", embeddings):
        problems.add("paths.embeddings", "must not hold credentials: set AWS_ACCESS_KEY_ID etc. in the environment")
        embeddings = None
    for key, value in (("paths.store", store), ("paths.embeddings", embeddings)):
        if isinstance(value, (str, Path)) and not location.is_url(value):
            if why := _not_a_folder(location.as_location(value, root)):
                problems.add(key, why)
    mirror = paths.get("data_mirror")
    model_specs = {n: s for n, e in _registry(problems, raw, "models").items() if (s := _parse_model(problems, n, e))}
    dataset_specs = {n: s for n, e in _registry(problems, raw, "datasets").items()
                     if (s := _parse_dataset(problems, n, e))}
    select = _mapping(problems, "select", raw.get("select"), ("models", "datasets"))
    listed_models, listed_datasets = _selection(problems, select, "models"), _selection(problems, select, "datasets")
    selected_models = models if models is not None else listed_models     # a stage's --model narrows the selection,
    selected_datasets = datasets if datasets is not None else listed_datasets   # but params.yaml is checked whole
    for key, names, known in (("select.models", listed_models, model_specs), ("--model", models or [], model_specs),
                              ("select.datasets", listed_datasets, dataset_specs), ("--dataset", datasets or [], dataset_specs)):
        kind = "model" if "model" in key else "dataset"
        for name in dict.fromkeys(names):
            if name not in known:
                problems.add(key, f"unknown {kind} {name!r}; known {kind}s are {sorted(known)}")
    extract = _parse_extract(problems, raw.get("extract"))
    for name, spec in dataset_specs.items():
        if spec.max_len is not None and spec.max_len > extract.token_budget:
            problems.add(f"datasets.{name}.max_len", f"({spec.max_len}) must be at most extract.token_budget "
                                                     f"({extract.token_budget}) so that the longest text fits a batch")
    data = _parse_data(problems, raw.get("data"))
    score, fuse = _parse_score(problems, raw.get("score")), _parse_fuse(problems, raw.get("fuse"), extract.poolings)
    train, report = _parse_train(problems, raw.get("train")), _parse_report(problems, raw.get("report"))
    if isinstance(report.out, str) and (why := _not_a_folder(root / report.out)):
        problems.add("report.out", why)
    cost = _parse_cost(problems, raw.get("cost"))
    problems.raise_if_any(path)
    return Params(root=root, store=store, data_mirror=(root / str(mirror)) if mirror else None,
                  models=model_specs, datasets=dataset_specs, selected_models=list(selected_models),
                  selected_datasets=list(selected_datasets), data=data, extract=extract,
                  score=score, fuse=fuse, train=train, cost=cost, report=report,
                  embeddings=None if embeddings is None else location.as_location(embeddings, root))


def _not_a_folder(path: Path) -> str | None:
    """Why a configured folder cannot hold the project's files: it is a file, or on a virtual filesystem."""
    resolved = Path(path).resolve()
    if resolved.is_file():
        return f"{path} is a file; it must be a folder (existing, or one to create)"
    if len(resolved.parts) > 1 and resolved.parts[1] in ("proc", "sys", "dev"):
        return f"{path} is under /{resolved.parts[1]}, a virtual filesystem; choose a folder on a disk"
    return None


def _unknown_sections(problems: _Problems, raw: dict[str, Any]) -> None:
    """A misspelt section (`trian:`) would otherwise leave every default in force without a word."""
    for extra in sorted(set(raw) - set(SECTIONS), key=str):
        problems.add(str(extra), f"unknown section{_closest(extra, SECTIONS)}; known sections are {sorted(SECTIONS)}")


def _registry(problems: _Problems, raw: dict[str, Any], key: str) -> dict[str, Any]:
    """`models:` or `datasets:`: any name maps to an entry (each entry's keys are checked by its parser)."""
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        problems.add(key, f"must map names to entries, got {value!r}")
        return {}
    return value


def _selection(problems: _Problems, select: dict[str, Any], key: str) -> list[str]:
    value = select.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        problems.add(f"select.{key}", f"must be a non-empty list of names, got {value!r}")
        return []
    return value
