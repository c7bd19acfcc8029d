"""Policy: which of the legal fusions to take (as Inductor's `score_fusion`
ranks what `can_fuse` allows).

- nodes: the enable switches (`enable_elementwise`, `enable_reduction`);
- vertical: greedy, in topological order, each fusible node joins the groups
  of its producers (largest first) when `legality.can_merge` allows; then
  the refused merges are repaired where they can be: a producer read at
  another size is recomputed in its consumers (`recompute`), two groups
  refused only by `max_fusion_size` are cut again where the fewest bytes
  cross, a producer group is split around the cycle that kept a node out
  (`split`);
- horizontal: reduction groups over one iteration space that write only
  per-row results join one kernel (`merge_siblings`);
- a lone node is not worth a kernel, except a layout-changing copy
  (`is_relayout`);
- groups: the device switches (`gpu_fusion`, `cpu_fusion`) and
  `min_tensor_size` (`group_refusal`);
- backends: a group a backend says it cannot run well is refused (`admit`).

Every decision, taken or refused, lands in the plan with its reason.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import fx

from kitsune.config import FusionConfig
from kitsune.ir.graph import is_compute, meta, tensor_inputs, view_root
from kitsune.ir.ops import REDUCTION_OPS
from kitsune.sizes import hint, is_dense, numel_of, product, shape_of
from kitsune.planner.legality import can_merge, group_outputs, merge_refusal, node_blocker
from kitsune.planner.plan import Decision, FusionGroup, FusionPlan, Refusal, frame_shapes
from kitsune.planner.recompute import recompute_producers
from kitsune.planner.split import split_for_cycles, split_oversized


class Backend(Protocol):
    """What the planner asks of a code generator before a group is generated."""

    def refusal(self, spec) -> str | None:
        """Why this backend should not run `spec` (a lowered group), or None."""


def node_refusal(node: fx.Node, config: FusionConfig) -> str | None:
    """Why `node` joins no group: an enable switch, then legality."""
    if node.target in REDUCTION_OPS and not config.enable_reduction:
        return "reduction fusion disabled"
    if node.target not in REDUCTION_OPS and not config.enable_elementwise:
        return "elementwise fusion disabled"
    return node_blocker(node)


# Rounds of recomputation (each may let a chain of producers move one step further).
RECOMPUTE_ROUNDS = 3


def plan_pointwise(graph: fx.Graph, config: FusionConfig) -> FusionPlan:
    """The generic rules: vertical chains (producers recomputed in consumers that
    read them at another size, groups over the size limit cut where the least
    crosses), then sibling reductions, each group's decision."""
    rounds = 0
    while True:
        plan = FusionPlan()
        position = {n: i for i, n in enumerate(graph.nodes)}
        group_of, refused = _fuse_vertically(graph, config, position, plan)
        if rounds == RECOMPUTE_ROUNDS or not recompute_producers(graph, group_of, refused, config, position):
            break
        rounds += 1  # the graph changed: plan it again
    plan.replaced = rounds > 0
    split_oversized(group_of, refused, config, position)
    split_for_cycles(graph, group_of, refused, config, position)
    merge_siblings(graph, group_of, config, position, plan)
    for group in _distinct_groups(graph, group_of):
        if len(group.nodes) < 2 and not is_relayout(group.nodes[0]):
            plan.decisions.append(Decision(group.names, False, "single operation: nothing to fuse"))
            continue
        plan.groups.append(group)
        plan.decisions.append(Decision(group.names, True, _fused_reason(group)))
    return plan


def _fuse_vertically(graph: fx.Graph, config: FusionConfig, position: dict,
                     plan: FusionPlan) -> tuple[dict, list[Refusal]]:
    """Greedy, in topological order: node -> its group, and the merges refused."""
    group_of: dict[fx.Node, FusionGroup] = {}
    refused: list[Refusal] = []
    for node in graph.nodes:
        if not is_compute(node):
            continue
        blocker = node_refusal(node, config)
        if blocker:
            plan.decisions.append(Decision((node.name,), False, blocker))
            continue
        group = FusionGroup([node])
        group_of[node] = group
        producers = {id(g): g for g in (group_of.get(view_root(a)) for a in tensor_inputs(node)) if g}
        for producer in sorted(producers.values(), key=lambda g: -len(g.nodes)):
            if producer is group:
                continue
            refusal = merge_refusal(producer, group, config, position, group_of=group_of)
            if refusal:
                decision = Decision((producer.label(), node.name), False, refusal[1])
                plan.decisions.append(decision)
                read = next(r for r in map(view_root, tensor_inputs(node)) if r in producer.nodes)
                refused.append(Refusal(read, node, refusal[0], decision))
                continue
            group = FusionGroup(sorted(producer.nodes + group.nodes, key=position.__getitem__))
            for n in group.nodes:
                group_of[n] = group
    return group_of, refused


def _distinct_groups(graph: fx.Graph, group_of: dict) -> list[FusionGroup]:
    groups, seen = [], set()
    for node in graph.nodes:
        group = group_of.get(node)
        if group is not None and id(group) not in seen:
            seen.add(id(group))
            groups.append(group)
    return groups


def _fused_reason(group: FusionGroup) -> str:
    if group.frame is None:
        return f"pointwise chain of {len(group.nodes)} ops"
    reductions = sum(n.target in REDUCTION_OPS for n in group.nodes)
    return (f"{reductions} reduction(s) over {group.reduction} elements per row with "
            f"{len(group.nodes) - reductions} pointwise ops")


def _row_results_only(group: FusionGroup) -> bool:
    """Does the group write one value per row only (no full-size tensor)?"""
    if group.frame is None:
        return False
    full = frame_shapes(group.frame)[0]
    return all(shape_of(meta(n)) != full or product(full) == 0 for n in group_outputs(group))


def merge_siblings(graph: fx.Graph, group_of: dict, config: FusionConfig, position: dict, plan) -> None:
    """Horizontal fusion: reduction groups over the same iteration space that
    write only per-row results (a backward pass's weight and bias gradients:
    column sums of the upstream gradient, of a matmul's output, of a fused
    kernel's product) join one kernel when no path links them. Each would
    otherwise be its own launch, and a lone one an ATen reduction, whose host
    time (about 45 us on the H200's host) is what a small training step is
    made of. Only row results: the merged kernel runs when its last input is
    ready, which must not hold back a full-size tensor that others wait for."""
    candidates = [g for g in _distinct_groups(graph, group_of) if _row_results_only(g)]
    merged: list[FusionGroup] = []
    for group in candidates:
        for i, earlier in enumerate(merged):
            if earlier.frame != group.frame:
                continue
            reason = can_merge(earlier, group, config, position)
            if reason:
                plan.decisions.append(Decision((earlier.label(), group.label()), False, f"side by side: {reason}"))
                continue
            union = FusionGroup(sorted(earlier.nodes + group.nodes, key=position.__getitem__))
            for n in union.nodes:
                group_of[n] = union
            merged[i] = union
            break
        else:
            merged.append(group)


def is_relayout(node: fx.Node) -> bool:
    """A lone copy that changes the layout (a permuted tensor made contiguous):
    the generated kernel writes in order and reads through the view, where
    PyTorch's generic strided copy is several times slower."""
    if node.target not in (torch.ops.aten.clone.default, torch.ops.aten._to_copy.default):
        return False
    source = view_root(node.args[0])
    src, out = meta(source), meta(node)
    if src is None or out is None or src.dtype != out.dtype or src.device.type != "cuda":
        return False
    return hint(numel_of(out)) >= 1 << 16 and (not is_dense(src) or source is not node.args[0])


def group_refusal(group: FusionGroup, config: FusionConfig) -> str | None:
    """Why a legal group is not generated on its device, or None."""
    device = meta(group.nodes[0]).device
    if not (config.gpu_fusion if device.type == "cuda" else config.cpu_fusion):
        return f"fusion disabled for {device.type} in FusionConfig"
    if hint(group.numel) < config.min_tensor_size:
        return f"{group.numel} elements < min_tensor_size"
    return None


def apply_group_policy(plan: FusionPlan, config: FusionConfig) -> None:
    """Refuse the groups `group_refusal` rules out (reported as fallbacks, as before)."""
    for group in list(plan.groups):
        reason = group_refusal(group, config)
        if reason:
            plan.refuse(group, reason, fallback=True)


def admit(plan: FusionPlan, group: FusionGroup, spec, refusal: Callable[[object], str | None]) -> str | None:
    """Ask the backend (`refusal`, e.g. `Backend.refusal`) whether it runs the
    lowered group `spec`; a refusal takes the group out of the plan with the
    backend's reason, which is returned; like every group formed but not
    generated, it is reported among the fallbacks."""
    reason = refusal(spec)
    if reason is not None:
        plan.refuse(group, reason, fallback=True)
    return reason
