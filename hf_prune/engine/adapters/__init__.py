"""Model-family adapters: only what a trace cannot see (config fields that mirror layer widths,
modules whose forward cannot run with fewer heads)."""
from .hf_config import sync_config

__all__ = ["sync_config"]
