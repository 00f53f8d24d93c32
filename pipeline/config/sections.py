"""params.yaml's sections as pydantic models: each field's default is params.yaml's value (defined here
once; tests/test_config.py keeps them equal) and its type holds its bounds."""

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BeforeValidator, Field, Strict, model_validator

from pipeline.config.fields import (Choice, Device, Flag, Integer, Names, Number, Section, Text, Widths, closest,
                                    distinct_integers, fail, invalid, no_bool, once_each, wanted)
from pipeline.hidden_states.attention import ATTENTIONS
from pipeline.hidden_states.pooling import POOLINGS

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_NAMES = ("train", "validation", "test")
# Stage 2's choices, here so that load_params needs neither torch heads nor Lightning; tests keep them
# equal to pipeline.select.probe.METRICS, pipeline.select.fusion.OPERATORS and pipeline.heads.networks.HEADS
SCORE_METRICS = ("accuracy", "macro_f1")
FUSE_OPERATORS = ("mean", "max", "concat")
FORWARDS = ("auto", "eager", "compiled")   # extract.forward (pipeline/extract/compiled_forward.py)
HEAD_NAMES = ("linear", "mlp", "cooccurrence", "scalar_mix", "gated")
TOP_K_MAX = 16                   # every subset of the top-k layers: 2^k sets
COMPRESSOR_OPTIONS = {"none": (), "zstd": ("level",), "blosc": ("cname", "clevel", "shuffle")}

# -- the registries ---------------------------------------------------------------------------------
class ModelSpec(Section):
    name: str = ""                   # the registry key
    source: Choice(("package", "local", "hub"))
    files: tuple[str, ...] = ()      # package sources: "distribution-or-module:relative/path", in order
    path: Optional[Text] = None      # local sources: a folder, a .gguf or a .zip
    hub_id: Optional[Text] = None
    revision: Optional[Text] = None
    sha256: Optional[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$"), wanted("64 lower-case hex digits")]] = None
    filename: Optional[Text] = None  # name of the assembled file, when parts do not imply it
    trust_remote_code: Flag = False

    @model_validator(mode="after")
    def _source_needs(self):
        key, problems = f"models.{self.name}", []
        if self.source == "package" and (not self.files or not all(":" in f for f in self.files)):
            problems.append(f"{key}.files: a package source needs a list of 'package:relative/path' items")
        elif self.source == "package" and len(self.files) > 1 and not self.sha256:
            problems.append(f"{key}.sha256: a model split in parts needs the sha256 of the assembled file")
        if self.source == "local" and not self.path:
            problems.append(f"{key}.path: a local source needs `path` (a folder, a .gguf or a .zip)")
        if self.source == "hub" and not self.hub_id:
            problems.append(f"{key}.hub_id: a hub source needs `hub_id` (and a `revision` to be reproducible)")
        return fail(*problems) if problems else self


class HubSpec(Section):
    path: Text
    config: Optional[str] = None
    revision: Optional[str] = None
    splits: dict[str, str] = {"train": "train", "test": "test"}   # our split -> the hub's
    text_column: Optional[str] = None
    label_column: Optional[str] = None


class Resplit(Section):
    """A corpus shipped as one split (AGNews offline: test only) shared out into train/validation/test."""
    source: Literal["train", "test"] = Field(alias="from")
    train: Annotated[float, Field(gt=0, lt=1)]
    validation: Optional[Annotated[float, Field(gt=0, lt=1)]] = None

    @model_validator(mode="after")
    def _sum(self):
        return self if self.train + (self.validation or 0) < 1 else fail("fractions must sum to less than 1")

    def as_dict(self) -> dict[str, Any]:
        validation = {"validation": self.validation} if self.validation else {}
        return {"from": self.source, "train": self.train, **validation}


def _data_file(file: str) -> str:
    return file if Path(file).suffix in DATA_FORMATS else invalid()


class DatasetSpec(Section):
    name: str = ""                   # the registry key
    text_column: Annotated[str, Strict(), wanted("a column name")]
    label_column: Annotated[str, Strict(), wanted("a column name")]
    local: dict[Literal[SPLIT_NAMES], Annotated[str, AfterValidator(_data_file),
                                                wanted(f"a file of type {sorted(DATA_FORMATS)}")]] = {}
    hub: Optional[HubSpec] = None
    id_column: Optional[str] = None
    max_len: Optional[Integer(1)] = None   # this corpus's extract.max_len (long texts: R8, R52); None: extract.max_len
    resplit: Annotated[Optional[Resplit], wanted("{from: test|train, train: f, validation: f} with fractions in "
                                                  "(0, 1) summing to less than 1 (the rest stays in `from`)")] = None
    carve: Choice(("rows", "whole_texts")) = "rows"   # how validation is carved from train (sources/corpora.py)

    @model_validator(mode="after")
    def _has_a_source(self):
        return self if self.local or self.hub else fail(f"datasets.{self.name}: needs `local` files, a `hub` "
                                                         f"entry, or both")


# -- the sections -----------------------------------------------------------------------------------
class PathsSettings(Section):
    store: Text = "store"
    data_mirror: Optional[Text] = "../shared/data"   # a local mirror of the corpora; absent: each entry's hub
    embeddings: Annotated[Optional[str], Field(pattern=r"\S"),
                          wanted("a folder or a URL such as s3://bucket/prefix")] = None


class SelectSettings(Section):
    models: Annotated[list[str], Field(min_length=1), wanted("a non-empty list of names")]
    datasets: Annotated[list[str], Field(min_length=1), wanted("a non-empty list of names")]


class DataSettings(Section):
    validation_fraction: Number(0, above=True, below=1) = 0.1   # carved from train when a corpus has no validation
    seed: Integer(0) = 0
    on_bad_row: Choice(("drop", "error")) = "drop"
    max_rows: Annotated[Optional[dict[Literal[SPLIT_NAMES], Optional[Integer(2)]]],
                        AfterValidator(lambda caps: {s: c for s, c in (caps or {}).items() if c is not None})] = {}


def _compressor(value: Any) -> dict[str, Any]:
    """The store's codec and its options, checked here rather than by zarr halfway into an extraction.
    Returned as written: the store fingerprint records it."""
    key = "extract.compressor"
    if not isinstance(value, dict) or value.get("codec") not in COMPRESSOR_OPTIONS:
        fail(f"{key}: must be {{codec: none|blosc|zstd, ...}}, got {value!r}")
    known, codec = ("codec", *COMPRESSOR_OPTIONS[value["codec"]]), value["codec"]
    problems = [f"{key}.{extra}: unknown option for codec {codec}{closest(extra, known)}; known options are "
                f"{sorted(known)}" for extra in sorted(set(value) - set(known), key=str)]
    level, clevel = value.get("level", 1), value.get("clevel", 1)
    if codec == "zstd" and (isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22):
        problems.append(f"{key}.level: must be an integer from 1 (fastest) to 22 (smallest), got {level!r}")
    if codec == "blosc":
        from numcodecs import blosc
        if value.get("cname", "lz4") not in blosc.list_compressors():
            problems.append(f"{key}.cname: must be one of {blosc.list_compressors()}, got {value.get('cname')!r}")
        if isinstance(clevel, bool) or not isinstance(clevel, int) or not 0 <= clevel <= 9:
            problems.append(f"{key}.clevel: must be an integer from 0 to 9, got {clevel!r}")
        if value.get("shuffle", "shuffle") not in ("noshuffle", "shuffle", "bitshuffle"):
            problems.append(f"{key}.shuffle: must be one of ['noshuffle', 'shuffle', 'bitshuffle'], "
                            f"got {value.get('shuffle')!r}")
    return fail(*problems) if problems else dict(value)


class ExtractSettings(Section):
    max_len: Integer(1) = 256        # tokens per text, special tokens included
    token_budget: Integer(1) = 1024  # padded tokens per forward batch
    block_rows: Integer(1) = 1024    # rows per resumable block = rows per Zarr chunk
    dtype: Choice(("float16", "float32")) = "float16"
    compute_dtype: Choice(("auto", "bfloat16", "float32")) = "auto"
    device: Device = "auto"
    padding_side: Choice(("right", "left")) = "right"
    poolings: Annotated[tuple[Literal[tuple(POOLINGS)], ...], Field(min_length=1), AfterValidator(once_each),
                        wanted(f"a non-empty list drawn from {list(POOLINGS)}, each once")] = tuple(POOLINGS)
    compressor: Annotated[Any, AfterValidator(_compressor)] = {"codec": "zstd", "level": 1}
    attention: Choice(ATTENTIONS) = "auto"             # in the store fingerprint (hidden_states/attention.py)
    attention_entropy_rows: Integer(0) = 16            # rows per block whose attention entropy is stored
    forward: Choice(FORWARDS) = "auto"                 # in the store fingerprint
    # scale-out (pipeline/extract/distributed.py); not in the store fingerprint, so any process count resumes a store
    devices: Integer(1) = 1          # processes (one device each) per node
    num_nodes: Integer(1) = 1
    strategy: Choice(("auto", "ddp")) = "auto"

    @model_validator(mode="after")
    def _fits(self):
        problems = []
        if self.token_budget < self.max_len:
            problems.append(f"extract.token_budget: ({self.token_budget}) must be at least max_len ({self.max_len}) "
                            f"so that the longest text fits in one batch")
        if self.devices * self.num_nodes > 1 and re.fullmatch(r"cuda:\d+", self.device):
            problems.append(f"extract.device: {self.device!r} names one GPU but extract.devices x num_nodes is "
                            f"{self.devices * self.num_nodes}: use cuda or auto (each rank takes its own GPU)")
        return fail(*problems) if problems else self


class ScoreSettings(Section):
    """`score:` the probe shared by score and fuse (pipeline.select.probe.Protocol is built from it)."""
    protocol: Choice(("validation", "cv")) = "cv"      # the study's audit, docs/study.md
    folds: Integer(2) = 5
    alphas: Annotated[tuple[Annotated[float, BeforeValidator(no_bool), Field(gt=0, allow_inf_nan=False)], ...],
                      Field(min_length=1), wanted("a non-empty list of positive numbers")] = (0.001, 0.01, 0.1, 1.0)
    rank: Integer(0) = 128           # 0: full width
    pca_rows: Integer(1) = 2048
    metric: Choice(SCORE_METRICS) = "accuracy"
    bootstrap: Integer(0) = 200
    seed: Integer(0) = 0
    select_rule: Choice(("best", "one_se")) = "best"   # one_se: the simplest candidate within one paired SE of the top
    geometry_rows: Integer(0) = 1000     # train rows of the label-free layer scores (0: off)
    importance_rows: Integer(0) = 8192   # train rows fitting the gradient-importance head (0: off)

    @model_validator(mode="after")
    def _enough_rows(self):
        if 0 < self.pca_rows < self.rank:
            fail(f"score.pca_rows: ({self.pca_rows}) must be at least score.rank ({self.rank}): "
                  f"{self.rank} principal directions need that many rows")
        return self


class FuseSettings(Section):
    """`fuse:` the candidate space of the fusion search."""
    pooling: Text = "best"           # best | a pooling of extract.poolings (checked against them in load_params)
    top_k: Integer(0, TOP_K_MAX) = 6
    last_n: Integer(1) = 5
    operators: Names(FUSE_OPERATORS) = FUSE_OPERATORS
    wide_max_layers: Integer(1) = 4
    multi_model: Flag = True


class LinearOptions(Section):
    """A linear head has no options; `train.linear: {}` is its key, so its DVC stage lists one like every head."""


class MlpOptions(Section):
    widths: Widths() = (256,)
    dropout: Number(0, below=1) = 0.5


class CooccurrenceOptions(Section):
    width: Integer(1) = 256
    sigma: Number(0, above=True) = 1.0
    widths: Widths() = (256,)
    dropout: Number(0, below=1) = 0.5


class ScalarMixOptions(Section):
    widths: Widths() = ()
    dropout: Number(0, below=1) = 0.1


class GatedOptions(Section):
    width: Integer(1) = 256          # each source's projection
    widths: Widths() = ()            # classifier hidden layers after the gated mix ([]: linear)
    dropout: Number(0, below=1) = 0.1


class TrainSettings(Section):
    """`train:` the heads, their seeds and their optimiser."""
    heads: Names(HEAD_NAMES) = HEAD_NAMES
    seeds: Annotated[tuple[Annotated[int, Strict(), Field(ge=0)], ...], Field(min_length=1),
                     AfterValidator(distinct_integers),
                     wanted("a non-empty list of integers >= 0")] = (0, 1, 2)
    max_epochs: Integer(1) = 30
    patience: Integer(0) = 3
    batch_size: Integer(1) = 1024
    min_steps_per_epoch: Integer(1) = 16   # a small train split gets smaller batches (see LayerDataModule)
    lr: Number(0, above=True) = 0.002
    weight_decay: Number(0) = 0.0001
    device: Device = "auto"
    threads: Integer(0) = 2          # torch CPU threads (0: torch's default)
    linear: LinearOptions = LinearOptions()
    mlp: MlpOptions = MlpOptions()
    cooccurrence: CooccurrenceOptions = CooccurrenceOptions()
    scalar_mix: ScalarMixOptions = ScalarMixOptions()
    gated: GatedOptions = GatedOptions()


def head_options(head: str) -> dict[str, Any]:
    """A head's default options (train.mlp, ...): fill what an older head config.json lacks."""
    return TrainSettings().as_dict().get(head, {})


class CostSettings(Section):
    """`cost:` how the predict path is timed (stage cost): on this many validation texts, the median of this many
    repeats, each model at this many depths (the embeddings, the last block and evenly between), a line fitted."""
    texts: Integer(1) = 256
    repeats: Integer(1) = 3
    depths: Integer(2) = 4


class ReportSettings(Section):
    """`report:` where the report goes."""
    out: Text = "reports"


class ParamsFile(Section):
    """params.yaml as written (after its `base:` chain is merged)."""
    paths: PathsSettings = PathsSettings()
    select: SelectSettings
    data: DataSettings = DataSettings()
    extract: ExtractSettings = ExtractSettings()
    models: dict[str, ModelSpec] = {}
    datasets: dict[str, DatasetSpec] = {}
    score: ScoreSettings = ScoreSettings()
    fuse: FuseSettings = FuseSettings()
    train: TrainSettings = TrainSettings()
    cost: CostSettings = CostSettings()
    report: ReportSettings = ReportSettings()

    @model_validator(mode="before")
    @classmethod
    def _name_entries(cls, raw: Any) -> Any:
        """Registry keys become the entries' names (and folders: only safe names)."""
        if isinstance(raw, dict):
            raw = dict(raw)
            for kind in ("models", "datasets"):
                if isinstance(raw.get(kind), dict):
                    raw[kind] = {n: {**e, "name": n} if isinstance(e, dict) else e for n, e in raw[kind].items()}
        return raw

