"""The planner's one door to pattern detection and user-operation names.

Detection finds the named patterns (built-in and user `FusionPattern`s) in a
captured graph. The plan needs it only when patterns steer grouping (custom
patterns, or `enabled_patterns` without the generic `elementwise_chain`);
otherwise it feeds the report alone and runs when a report, `explain()` or
stats that need it ask (`needs_detection`, `detect_patterns`).
"""
from __future__ import annotations

import logging

from torch import fx

from kitsune.config import FusionConfig
from kitsune.ir.graph import user_op_key

log = logging.getLogger("kitsune")


def needs_detection(config: FusionConfig) -> bool:
    """Does planning with `config` depend on the patterns found in the graph?"""
    restricting = config.enabled_patterns is not None and "elementwise_chain" not in config.enabled_patterns
    return bool(config.custom_patterns) or restricting


def detect_patterns(graph: fx.Graph, config: FusionConfig, graph_name: str):
    """(UnitGraph, opportunities) of `graph` for `config`'s patterns."""
    # integration: kitsune.planner.patterns (and kitsune.planner.units)
    from kitsune.fusion.detector import FusionDetector
    from kitsune.fusion.units import UnitGraph

    units = UnitGraph(graph)
    return units, FusionDetector(config=config).detect_units(units, graph_name=graph_name)


def user_op_name(node: fx.Node) -> str:
    """The name of the user operation `node` came from ("softmax", "layer_norm", "add", ...),
    in the unit graph's vocabulary."""
    # integration: kitsune.planner.units
    from kitsune.fusion.units import UnitGraph

    return UnitGraph._name(node, user_op_key(node))[1]


def is_kernel(node: fx.Node) -> bool:
    """Is `node` work eager PyTorch launches (not a view, not getitem)? What patterns group."""
    # integration: kitsune.planner.units
    from kitsune.fusion.units import is_kernel as launches_work

    return launches_work(node)
