"""Exceptions shared by every part of hf_prune."""


class PruningError(RuntimeError):
    """A pruning request that could not be carried out; the model is unchanged."""


class CompactionError(PruningError):
    """A module could not be resized; ``module`` names it (the model has been restored)."""

    def __init__(self, module: str, message: str):
        super().__init__(message)
        self.module = module
