"""Partition a captured graph into fusion groups: pointwise chains, and
reductions with their pointwise producers and consumers.

Greedy and vertical, in topological order: each fusible node joins the groups
of its producers when that is legal. Legality follows from node kinds and
iteration sizes, never from op names:

- every member of a group has the group's iteration size (numel), except
  members whose values never leave the group: those are recomputed per element
  through broadcasting;
- merging never creates a cycle (a path that leaves the group and comes back);
- a group holds at most `max_fusion_size` user operations;
- a group with reductions has one *frame*: the shape S they reduce and the
  dims D they reduce over. Its kernel runs over rows (the kept dims of S)
  and, in each row, over the R reduced elements; every value it writes is
  either of shape S (one per element) or one per row (the kept dims, with
  or without the reduced dims kept as size 1).

Every decision, taken or refused, is recorded with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch
from torch import fx

from kitsune.config import FusionConfig
from kitsune.ir.graph import (is_compute, is_view, meta, numel, pointwise_blocker, tensor_inputs, user_op_key,
                              view_root)
from kitsune.ir.ops import REDUCTION_OPS, reduction_signature

_FREE_OPS = (torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default)


def node_frame(node: fx.Node):
    """(input shape, reduced dims) of a reduction node, else None."""
    if node.target not in REDUCTION_OPS:
        return None
    dims, _ = reduction_signature(node)
    return tuple(meta(node.args[0]).shape), tuple(dims)


def frames_of(nodes) -> set:
    return {f for f in map(node_frame, nodes) if f is not None}


def frame_shapes(frame) -> tuple[tuple, tuple, tuple]:
    """(full shape, row shape, row shape with the reduced dims kept as 1)."""
    shape, dims = frame
    kept = tuple(s for d, s in enumerate(shape) if d not in dims)
    keep = tuple(1 if d in dims else s for d, s in enumerate(shape))
    return shape, kept, keep


@dataclass
class FusionGroup:
    nodes: list[fx.Node]

    @property
    def frame(self):
        frames = frames_of(self.nodes)
        return next(iter(frames)) if frames else None

    @property
    def reduction(self) -> int:
        """Elements reduced per row (0: a pointwise group)."""
        frame = self.frame
        return math.prod(frame[0][d] for d in frame[1]) if frame else 0

    @property
    def numel(self) -> int:
        frame = self.frame
        if frame is not None:
            return math.prod(frame[0])
        return max(numel(n) for n in self.nodes)

    def user_ops(self) -> set:
        """The user operations the group holds (what max_fusion_size counts).
        Dtype conversions are free in registers and do not count."""
        return {user_op_key(n) for n in self.nodes if n.target not in _FREE_OPS}

    def label(self) -> str:
        return " → ".join(n.name for n in self.nodes)


@dataclass
class Decision:
    nodes: tuple[str, ...]
    fused: bool
    reason: str


@dataclass
class FusionPlan:
    groups: list[FusionGroup] = field(default_factory=list)  # groups to generate (2+ ops)
    decisions: list[Decision] = field(default_factory=list)


def inside_group(node: fx.Node, members: set) -> bool:
    """Members, and views whose chain starts at a member (folded into indexing)."""
    return node in members or (is_view(node) and view_root(node) in members)


def has_external_use(node: fx.Node, members: set) -> bool:
    """Does the value of `node` have to be written to memory?"""
    for user in node.users:
        if user in members:
            continue
        if is_view(user) and user.args[0] is node:
            if has_external_use(user, members):
                return True
            continue
        return True
    return False


def group_outputs(group: FusionGroup) -> list[fx.Node]:
    members = set(group.nodes)
    return [n for n in group.nodes if has_external_use(n, members)]


def _creates_cycle(a: set, b: set, union: set, position: dict) -> bool:
    """Is there a path between a and b that leaves the union and comes back?"""
    last = max(position[n] for n in union)
    inside, stack = set(union), list(union)
    while stack:  # views of members are folded into the kernel's indexing
        n = stack.pop()
        for u in n.users:
            if is_view(u) and u.args[0] is n and u not in inside:
                inside.add(u)
                stack.append(u)
    frontier = [u for n in inside for u in n.users if u not in inside]
    seen = set()
    while frontier:
        n = frontier.pop()
        if n in seen or position.get(n, last + 1) > last:
            continue
        seen.add(n)
        for u in n.users:
            if u in union:
                return True
            frontier.append(u)
    return False


def can_merge(a: FusionGroup, b: FusionGroup, config: FusionConfig, position: dict) -> str | None:
    """None if a and b may form one kernel, else the reason they may not."""
    union = set(a.nodes) | set(b.nodes)
    ops = len(a.user_ops() | b.user_ops())
    if ops > config.max_fusion_size:
        return f"would hold {ops} operations > max_fusion_size={config.max_fusion_size}"
    frames = frames_of(union)
    if len(frames) > 1:
        return "reductions over different iteration spaces (shape or dims)"
    if frames:
        full, kept, keep = frame_shapes(next(iter(frames)))
        for n in union:
            if has_external_use(n, union) and tuple(meta(n).shape) not in (full, kept, keep):
                return (f"{n.name} has shape {tuple(meta(n).shape)}, neither the reduced shape {full} "
                        f"nor one value per row")
    else:
        size = max(a.numel, b.numel)
        for n in union:
            if numel(n) != size and has_external_use(n, union):
                return f"iteration sizes differ ({numel(n)} vs {size}) and {n.name} is needed outside"
    if _creates_cycle(set(a.nodes), set(b.nodes), union, position):
        return "a path through an unfused op would form a cycle"
    return None


def plan_pointwise(graph: fx.Graph, config: FusionConfig) -> FusionPlan:
    plan = FusionPlan()
    position = {n: i for i, n in enumerate(graph.nodes)}
    group_of: dict[fx.Node, FusionGroup] = {}
    for node in graph.nodes:
        if not is_compute(node):
            continue
        blocker = _blocker(node, config)
        if blocker:
            plan.decisions.append(Decision((node.name,), False, blocker))
            continue
        group = FusionGroup([node])
        group_of[node] = group
        producers = {id(g): g for g in (group_of.get(view_root(a)) for a in tensor_inputs(node)) if g}
        for producer in sorted(producers.values(), key=lambda g: -len(g.nodes)):
            if producer is group:
                continue
            reason = can_merge(producer, group, config, position)
            if reason:
                plan.decisions.append(Decision((producer.label(), node.name), False, reason))
                continue
            group = FusionGroup(sorted(producer.nodes + group.nodes, key=position.__getitem__))
            for n in group.nodes:
                group_of[n] = group
    _merge_siblings(graph, group_of, config, position, plan)
    seen = set()
    for node in graph.nodes:
        group = group_of.get(node)
        if group is None or id(group) in seen:
            continue
        seen.add(id(group))
        names = tuple(n.name for n in group.nodes)
        if len(group.nodes) < 2 and not _is_relayout(group.nodes[0]):
            plan.decisions.append(Decision(names, False, "single operation: nothing to fuse"))
            continue
        plan.groups.append(group)
        if group.frame is not None:
            reductions = sum(n.target in REDUCTION_OPS for n in group.nodes)
            plan.decisions.append(Decision(names, True, f"{reductions} reduction(s) over {group.reduction} "
                                           f"elements per row with {len(group.nodes) - reductions} pointwise ops"))
        else:
            plan.decisions.append(Decision(names, True, f"pointwise chain of {len(group.nodes)} ops"))
    return plan


def _row_results_only(group: FusionGroup) -> bool:
    """Does the group write one value per row only (no full-size tensor)?"""
    if group.frame is None:
        return False
    full = frame_shapes(group.frame)[0]
    return all(tuple(meta(n).shape) != full or math.prod(full) == 0 for n in group_outputs(group))


def _merge_siblings(graph: fx.Graph, group_of: dict, config: FusionConfig, position: dict, plan) -> None:
    """Horizontal fusion: reduction groups over the same iteration space that
    write only per-row results (a backward pass's weight and bias gradients:
    column sums of the upstream gradient, of a matmul's output, of a fused
    kernel's product) join one kernel when no path links them. Each would
    otherwise be its own launch, and a lone one an ATen reduction, whose host
    time (about 45 us on the H200's host) is what a small training step is
    made of. Only row results: the merged kernel runs when its last input is
    ready, which must not hold back a full-size tensor that others wait for."""
    groups, seen = [], set()
    for node in graph.nodes:
        group = group_of.get(node)
        if group is not None and id(group) not in seen:
            seen.add(id(group))
            groups.append(group)
    candidates = [g for g in groups if _row_results_only(g)]
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


def _is_relayout(node: fx.Node) -> bool:
    """A lone copy that changes the layout (a permuted tensor made contiguous):
    the generated kernel writes in order and reads through the view, where
    PyTorch's generic strided copy is several times slower."""
    if node.target not in (torch.ops.aten.clone.default, torch.ops.aten._to_copy.default):
        return False
    source = view_root(node.args[0])
    src, out = meta(source), meta(node)
    if src is None or out is None or src.dtype != out.dtype or src.device.type != "cuda":
        return False
    return out.numel() >= 1 << 16 and (not src.is_contiguous() or source is not node.args[0])


def _blocker(node: fx.Node, config: FusionConfig) -> str | None:
    if node.target in REDUCTION_OPS:
        if not config.enable_reduction:
            return "reduction fusion disabled"
        blocker = pointwise_blocker(node)
        if blocker:
            return blocker
        shape, dims = node_frame(node)
        if math.prod(shape) == 0:
            return "empty reduction (runs through PyTorch)"
        # a few long rows (a whole-tensor sum) are split between programs (Triton,
        # `emit.split_plan`; unsplittable ones are refused after lowering) or
        # between threads (C, `few_rows`)
        return None
    if not config.enable_elementwise:
        return "elementwise fusion disabled"
    return pointwise_blocker(node)
