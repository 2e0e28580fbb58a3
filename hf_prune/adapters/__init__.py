"""Model-family adapters: only what a trace cannot see (config fields that mirror layer widths)."""
from .hf_config import sync_config

__all__ = ["sync_config"]
