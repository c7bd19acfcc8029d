"""The planner: which nodes of a captured graph run as one generated kernel, and why.

    plan = plan_graph(gm, config, "forward")   # groups + one Decision per question asked

- `plan`: the data (`FusionGroup`, `Decision`, `FusionPlan`);
- `legality`: can a set of nodes form one kernel (iteration space, cycles,
  size, what can be generated at all);
- `policy`: which legal fusions to take (greedy vertical chains, sibling
  reductions, relayout copies, enable and device switches,
  `min_tensor_size`, and `admit`: the backend's own refusals);
- `recompute`, `split`: repairs of the merges the greedy pass refused (a
  producer read at another size recomputed in its consumers, a cut where
  the fewest bytes cross for the size limit, a split around a cycle);
- `steer`: named and user patterns steering the groups, replacements;
- `detect`: pattern detection as the plan uses it (run only when the plan
  needs it; otherwise the report runs it later on the planned graph);
- `units`, `vocabulary`, `patterns`, `match`, `cost`: user operations, their
  names, patterns as data and the one matcher, the roofline estimates;
- `naming`: kernel names by kind (`kitsune_softmax_…`).

After planning, the compiler lowers each group and asks the backend
(`policy.admit`); a failed lowering or build is recorded with `plan.refuse`.
"""
from __future__ import annotations

from torch import fx

from kitsune.config import FusionConfig
from kitsune.planner.detect import needs_detection
from kitsune.planner.plan import Decision, FusionGroup, FusionPlan
from kitsune.planner.policy import admit, apply_group_policy, plan_pointwise
from kitsune.planner.steer import apply_patterns

__all__ = ["plan_graph", "admit", "Decision", "FusionGroup", "FusionPlan"]


def plan_graph(gm: fx.GraphModule, config: FusionConfig, graph_name: str = "graph") -> FusionPlan:
    """Plan `gm`: the generic rules, patterns where they steer, then the group policy.

    User patterns with a replacement may rewrite `gm.graph` (`plan.replaced`)."""
    plan = plan_pointwise(gm.graph, config)
    if needs_detection(config):
        plan = apply_patterns(gm, plan, config, graph_name)
    apply_group_policy(plan, config)
    return plan
