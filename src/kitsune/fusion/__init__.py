"""The fusion API of spec 01: a thin layer over Kitsune's pipeline.

    from kitsune.fusion import FusionEngine, FusionDetector, FusionPattern, FusionConfig

`FusionEngine` compiles modules, functions, fx graphs and lists of operations;
`FusionDetector` finds the named fusion patterns in captured aten graphs;
`FusionPattern` names a chain of operations (built-in or user-defined);
`FusionConfig` is `kitsune.config.FusionConfig`.
"""
from __future__ import annotations

from kitsune.config import FusionConfig
from kitsune.fusion.patterns import BUILTIN_PATTERNS, FusionPattern

__all__ = ["FusionEngine", "FusionDetector", "FusionPattern", "FusionConfig", "FusionOpportunity",
           "BUILTIN_PATTERNS"]


def __getattr__(name):  # engine/detector import the compiler: load them on first use
    if name in ("FusionDetector", "FusionOpportunity"):
        from kitsune.fusion import detector
        return getattr(detector, name)
    if name == "FusionEngine":
        from kitsune.fusion.engine import FusionEngine
        return FusionEngine
    raise AttributeError(f"module 'kitsune.fusion' has no attribute {name!r}")
