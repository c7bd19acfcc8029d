"""Two groups refused only by `max_fusion_size`: cut where the fewest bytes cross.

The vertical pass fills a group in graph order until the next operation
would exceed `max_fusion_size`, so the cut falls wherever the limit is
reached: in GPT-2's MLP, after seven of tanh-GELU's eight operations, which
leaves the last `mul` to PyTorch reading two full tensors the kernel had to
write. When the union of the two groups would be legal but for the limit,
every cut of it in graph order into two legal groups is weighed by the bytes
that cross it (values of the first part read by the second: written once
and read once, or only read when something else needs them anyway), and the
cheapest is taken: there, after the bias add, one tensor crosses. The
refused merge's decision says where the group was cut and what crosses.
"""
from __future__ import annotations

import math

from torch import fx

from kitsune.config import FusionConfig
from kitsune.ir.graph import is_view
from kitsune.planner.legality import LIMIT, has_external_use, merge_refusal
from kitsune.planner.plan import FusionGroup
from kitsune.planner.units import nbytes


def split_oversized(group_of: dict, refused: list, config: FusionConfig, position: dict) -> None:
    """Re-cut the pairs of groups refused only by the size limit (in `group_of`)."""
    for refusal in refused:
        if refusal.kind != LIMIT:
            continue
        first, second = group_of.get(refusal.producer), group_of.get(refusal.node)
        if first is None or second is None or first is second:
            continue
        if merge_refusal(first, second, config, position, limit=math.inf):
            continue  # not only the size: the refusal stands
        nodes = sorted(set(first.nodes) | set(second.nodes), key=position.__getitem__)
        cut = _cheapest_cut(nodes, config, position)
        if cut is None:
            continue
        head, tail, cost = cut
        for group in (head, tail):
            for n in group.nodes:
                group_of[n] = group
        ops = len(first.user_ops() | second.user_ops())
        refusal.decision.nodes = (head.label(), tail.label())
        refusal.decision.reason = (f"{ops} operations > max_fusion_size={config.max_fusion_size}: split "
                                   f"where the least crosses ({cost} bytes, before {tail.nodes[0].name})")


def crossing_bytes(head: list, tail: list) -> int:
    """Bytes the cut between `head` and `tail` costs: each value of head that tail
    reads is read once more, and written once more unless it is needed outside."""
    union, inside_tail = set(head) | set(tail), set(tail)
    return sum(nbytes(n) * (1 if has_external_use(n, union) else 2) for n in head if _read_by(n, inside_tail))


def _read_by(node: fx.Node, members: set) -> bool:
    for user in node.users:
        if user in members or (is_view(user) and _read_by(user, members)):
            return True
    return False


def _cheapest_cut(nodes: list, config: FusionConfig, position: dict):
    """(head group, tail group, bytes) of the cheapest legal cut of `nodes` in
    graph order; ties go to the later cut (the smaller tail)."""
    best = None
    for k in range(1, len(nodes)):
        head, tail = nodes[:k], nodes[k:]  # graph order: no value of tail flows back to head
        cost = crossing_bytes(head, tail)
        if best is not None and cost > best[2]:
            continue
        groups = FusionGroup(head), FusionGroup(tail)
        if any(merge_refusal(g, g, config, position) for g in groups):
            continue
        best = (*groups, cost)
    return best
