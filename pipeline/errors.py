"""The project's errors: each says what is wrong and how to fix it, so stages can print them bare."""


class PipelineError(Exception):
    """Base class: a user-facing problem (bad config, bad data, mismatched store), not a bug."""


class ConfigError(PipelineError):
    """params.yaml names something unknown or holds a bad value."""


class UnsupportedModelError(PipelineError):
    """A model family whose layers the extraction cannot tap: said before any store is created."""


class DataError(PipelineError):
    """A corpus cannot be read or holds rows we refuse to embed."""


class ModelSourceError(PipelineError):
    """A model cannot be located, assembled or verified."""


class StoreMismatchError(PipelineError):
    """An existing store was written with other settings than the current params."""


class StoreIncompleteError(PipelineError):
    """A reader asked for a split whose extraction has not finished."""


class StoreMissingError(PipelineError, FileNotFoundError):
    """No embeddings store where a reader looked (still a FileNotFoundError for existing callers)."""


class StoreDamagedError(PipelineError):
    """A store's bytes differ from what was written: a missing or altered shard, a bad digest, a damaged
    zarr.json. Readers stop instead of computing on zeros or garbage."""


class ProbeError(PipelineError):
    """The probe cannot score a candidate honestly (e.g. NaN from empty folds): nothing is chosen on it."""


class HeadError(PipelineError):
    """A trained head cannot be used: its files are damaged, or the store it was trained on has been
    rebuilt with other settings since (the head is stale: retrain it)."""


class OutputError(PipelineError):
    """A result cannot be written where asked: a folder without write permission, a file in the way."""
