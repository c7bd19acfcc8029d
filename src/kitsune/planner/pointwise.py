"""Former home of the planner (split into `plan`, `legality` and `policy`):
the names other modules and tests import from here."""
from __future__ import annotations

from kitsune.planner.legality import can_merge, group_outputs, has_external_use, inside_group
from kitsune.planner.plan import Decision, FusionGroup, FusionPlan, frame_shapes, frames_of, node_frame
from kitsune.planner.policy import plan_pointwise

__all__ = ["Decision", "FusionGroup", "FusionPlan", "can_merge", "frame_shapes", "frames_of", "group_outputs",
           "has_external_use", "inside_group", "node_frame", "plan_pointwise"]
