"""Exceptions shared by every part of hf_prune."""


class PruningError(RuntimeError):
    """A pruning request that could not be carried out; the model is unchanged."""
