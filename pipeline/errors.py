"""The project's errors: each says what is wrong and how to fix it, so stages can print them bare."""


class PipelineError(Exception):
    """Base class: a user-facing problem (bad config, bad data, mismatched store), not a bug."""


class ConfigError(PipelineError):
    """params.yaml names something unknown or holds a bad value."""


class DataError(PipelineError):
    """A corpus cannot be read or holds rows we refuse to embed."""


class ModelSourceError(PipelineError):
    """A model cannot be located, assembled or verified."""


class StoreMismatchError(PipelineError):
    """An existing store was written with other settings than the current params."""


class StoreIncompleteError(PipelineError):
    """A reader asked for a split whose extraction has not finished."""
