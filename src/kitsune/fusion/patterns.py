"""Fusion patterns (spec 01's `FusionPattern`): the public names, defined in the planner.

    from kitsune.fusion import FusionPattern, BUILTIN_PATTERNS
    FusionPattern(name="gate", ops=["mul", "sigmoid", "dropout?", "add"])

Patterns are data and one matcher finds them: see `kitsune.planner.patterns`
(the patterns), `kitsune.planner.match` (the language and the matcher) and
`kitsune.planner.vocabulary` (the op names a pattern may use).
"""
from __future__ import annotations

from kitsune.planner.patterns import (BUILTIN_NAMES, BUILTIN_PATTERNS, FUSION_TYPES, SUPERSEDED_BY,
                                      FusionOpportunity, FusionPattern)
from kitsune.planner.vocabulary import (ACTIVATIONS, ALIASES, ATTENTION_OPS, BINARY_OPS, CONV_OPS,
                                        LOSS_OPS, MATMUL_OPS, MISC_OPS, NORM_OPS, QUANT_OPS, REDUCTION_OPS,
                                        SOFTMAX_OPS, VIEW_OPS, WILDCARDS, canonical_op, known_ops)

__all__ = ["FusionPattern", "FusionOpportunity", "BUILTIN_PATTERNS", "BUILTIN_NAMES", "FUSION_TYPES", "SUPERSEDED_BY",
           "ACTIVATIONS", "ALIASES", "ATTENTION_OPS", "BINARY_OPS", "CONV_OPS", "LOSS_OPS", "MATMUL_OPS", "MISC_OPS",
           "NORM_OPS", "QUANT_OPS", "REDUCTION_OPS", "SOFTMAX_OPS", "VIEW_OPS", "WILDCARDS", "canonical_op",
           "known_ops"]
