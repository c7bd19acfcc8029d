"""Pattern detection as the planner uses it, and user-operation names.

Detection finds the named patterns (built-in and user `FusionPattern`s) in a
captured graph. The plan needs it only when patterns steer grouping (custom
patterns, or `enabled_patterns` without the generic `elementwise_chain`);
otherwise it feeds the report alone and runs when a report, `explain()` or
stats that need it ask (`needs_detection`, `detect_patterns`).
"""
from __future__ import annotations

from torch import fx

from kitsune.config import FusionConfig
from kitsune.ir.graph import user_op_key
from kitsune.planner.patterns import detect, pattern_registry
from kitsune.planner.units import UnitGraph, is_kernel

__all__ = ["needs_detection", "detect_patterns", "user_op_name", "is_kernel"]


def needs_detection(config: FusionConfig) -> bool:
    """Does planning with `config` depend on the patterns found in the graph?"""
    restricting = config.enabled_patterns is not None and "elementwise_chain" not in config.enabled_patterns
    return bool(config.custom_patterns) or restricting


def detect_patterns(graph: fx.Graph, config: FusionConfig, graph_name: str):
    """(UnitGraph, opportunities) of `graph` for the built-in patterns and `config`'s own."""
    units = UnitGraph(graph)
    return units, detect(units, pattern_registry(config.custom_patterns), graph_name)


def user_op_name(node: fx.Node) -> str:
    """The name of the user operation `node` came from ("softmax", "layer_norm", "add", ...),
    in the unit graph's vocabulary."""
    return UnitGraph._name(node, user_op_key(node))[1]
