"""Exceptions shared by every part of hf_prune."""


class PruningError(RuntimeError):
    """A pruning request that could not be carried out; the model is unchanged."""


class ConfigError(PruningError, ValueError):
    """A setting that is invalid or out of reach; raised before anything is changed.

    It is both a :class:`PruningError` and a :class:`ValueError`, so code that catches either sees it.
    """


class CompactionError(PruningError):
    """A module could not be resized; ``module`` names it (the model has been restored)."""

    def __init__(self, module: str, message: str):
        super().__init__(message)
        self.module = module


class SpecError(ValueError):
    """A structure spec that is malformed, of an unknown version, or does not fit the model."""
