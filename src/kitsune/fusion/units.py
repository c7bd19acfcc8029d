"""User operations in a captured aten graph: moved to `kitsune.planner.units` (re-exported here for
spec 01 users and tests that import them from the fusion API)."""
from kitsune.planner.units import OpCategory, Unit, UnitGraph, is_kernel, node_kind, target_name, tensor_vals

__all__ = ["OpCategory", "Unit", "UnitGraph", "is_kernel", "node_kind", "target_name", "tensor_vals"]
