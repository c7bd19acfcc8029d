"""The planner's data: fusion groups, the decisions taken about them, and the plan.

A `FusionPlan` is what the planner hands the compiler: the groups to generate
and, for every fuse-or-not question asked on the way (by legality, by policy,
by a pattern, by a backend, by a failed lowering), a `Decision` with its
reason. The compiler executes the plan and never decides anything itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from kitsune.ir.graph import is_view, meta, numel, user_op_key
from kitsune.sizes import hint, product, shape_of
from kitsune.ir.ops import REDUCTION_OPS, reduction_signature

# Refusals that say an op is PyTorch's by design (a matmul, a lone op, an empty
# reduction), not that fusible work went unfused: a graph made only of these is
# not reported as a graph that fused nothing (`FusionPlan.why_nothing_fused`).
BY_DESIGN = ("nothing to fuse", "(runs through PyTorch)")

# Dtype conversions are free in registers: they do not count as user operations.
FREE_OPS = (torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default)


def node_frame(node: fx.Node):
    """(input shape, reduced dims) of a reduction node, else None."""
    if node.target not in REDUCTION_OPS:
        return None
    dims, _ = reduction_signature(node)
    return shape_of(meta(node.args[0])), tuple(dims)


def frames_of(nodes) -> set:
    return {f for f in map(node_frame, nodes) if f is not None}


def frame_shapes(frame) -> tuple[tuple, tuple, tuple]:
    """(full shape, row shape, row shape with the reduced dims kept as 1)."""
    shape, dims = frame
    kept = tuple(s for d, s in enumerate(shape) if d not in dims)
    keep = tuple(1 if d in dims else s for d, s in enumerate(shape))
    return shape, kept, keep


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


def outputs_of(nodes) -> list[fx.Node]:
    """The members of `nodes` whose values leave them (in the order given)."""
    members = set(nodes)
    return [n for n in nodes if has_external_use(n, members)]


@dataclass
class FusionGroup:
    """Nodes (in graph order) that become one generated kernel."""
    nodes: list[fx.Node]

    @property
    def frame(self):
        frames = frames_of(self.nodes)
        return next(iter(frames)) if frames else None

    @property
    def reduction(self) -> int:
        """Elements reduced per row (0: a pointwise group)."""
        frame = self.frame
        return product(frame[0][d] for d in frame[1]) if frame else 0

    @property
    def numel(self) -> int:
        frame = self.frame
        if frame is not None:
            return product(frame[0])
        # the kernel iterates over its outputs (legality: all of one size); members
        # of another size are computed at the index that reads them: smaller ones
        # through broadcasting, larger ones through a slice or select of them.
        # Symbolic sizes compare by the sizes seen.
        return max((numel(n) for n in outputs_of(self.nodes) or self.nodes), key=hint)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def user_ops(self) -> set:
        """The user operations the group holds (what max_fusion_size counts)."""
        return {user_op_key(n) for n in self.nodes if n.target not in FREE_OPS}

    def label(self) -> str:
        return " → ".join(n.name for n in self.nodes)


@dataclass
class Refusal:
    """A merge the vertical pass refused: the producer group's member that the
    node reads (its group now is the producer, whatever the repairs did), the
    node that could not join it, what stopped it (`legality.LIMIT`/`SIZES`/`CYCLE`)
    and its decision (the repairs reword it)."""
    producer: fx.Node
    node: fx.Node
    kind: str
    decision: "Decision"


@dataclass
class Decision:
    """One fuse-or-not answer: the nodes (or group labels) it is about, and why."""
    nodes: tuple[str, ...]
    fused: bool
    reason: str


@dataclass
class FusionPlan:
    groups: list[FusionGroup] = field(default_factory=list)  # groups to generate
    decisions: list[Decision] = field(default_factory=list)
    # Pattern detection, when the plan needed it (custom or restricting enabled
    # patterns): the UnitGraph and the opportunities found. None: not run; the
    # report runs it on the planned graph when asked (`kitsune.planner.detect`).
    units: object = None
    opportunities: list | None = None
    replaced: bool = False  # the graph was rewritten (user pattern replacements, recomputed producers)
    # Groups formed but not generated because of the configuration or a failure
    # (device switch, min_tensor_size, lowering or kernel build failed), as
    # (group label, reason): the stats report them as fallbacks.
    fallbacks: list = field(default_factory=list)

    def refuse(self, group: FusionGroup, reason: str, fallback: bool = False) -> Decision:
        """Take `group` out of the plan: it runs through PyTorch, for `reason`.

        Its earlier "fused" decision is replaced by the refusal, so the plan
        holds one final answer per group."""
        names = group.names  # in place: the compiler's record holds these lists
        self.groups[:] = [g for g in self.groups if g is not group]
        self.decisions[:] = [d for d in self.decisions if not (d.fused and tuple(d.nodes) == names)]
        decision = Decision(names, False, reason)
        self.decisions.append(decision)
        if fallback:
            self.fallbacks.append((group.label(), reason))
        return decision

    def why_nothing_fused(self, most: int = 3) -> str | None:
        """For a plan that fuses nothing: why (the `most` commonest reasons, with their
        counts): those of the groups it refused, else those of the nodes it refused
        (a switch, a dtype, a dynamic shape); None when every refusal is one `BY_DESIGN`.
        Refused merges are left out: each side is then a lone op, by design."""
        reasons = [why for _, why in self.fallbacks] or [
            d.reason for d in self.decisions
            if not d.fused and len(d.nodes) == 1 and not any(mark in d.reason for mark in BY_DESIGN)]
        counts: dict[str, int] = {}
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
        if not counts:
            return None
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        text = "; ".join(f"{reason} (×{n})" if n > 1 else reason for reason, n in ranked[:most])
        return text + (f"; {len(ranked) - most} other reason(s)" if len(ranked) > most else "")
