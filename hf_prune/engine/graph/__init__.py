"""Dependency graph (DepGraph): tracing, channel coupling, prunable units and groups."""
from .groups import DependencyGraph, Group, Member
from .tracer import Trace, trace

__all__ = ["DependencyGraph", "Group", "Member", "Trace", "trace"]
