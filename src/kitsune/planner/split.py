"""Re-cutting groups the vertical pass could not merge: by size, by a cycle.

Two groups refused only by `max_fusion_size`: cut where the fewest bytes cross.

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

A node refused by its producer group because of a cycle through an unfused op
(and fused with nothing else) gets the part of that group the cycle does not
run through (`split_for_cycles`), as Inductor's scheduler fuses around the
dependencies it cannot cross.
"""
from __future__ import annotations

import math

from torch import fx

from kitsune.config import FusionConfig
from kitsune.ir.graph import is_view, view_root
from kitsune.planner.legality import CYCLE, JOINED, LIMIT, groups_acyclic, has_external_use, merge_refusal
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
        other = merge_refusal(first, second, config, position, limit=math.inf)
        if other:  # not only the size: say what else stops it (split_for_cycles reads CYCLE)
            refusal.kind = other[0]
            refusal.decision.reason = f"{other[1]} (and {refusal.decision.reason})"
            continue
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


def split_for_cycles(graph: fx.Graph, group_of: dict, refused: list, config: FusionConfig,
                     position: dict) -> None:
    """A node kept from a producer group by a cycle through an unfused op: split
    the producer instead of giving up. The members the cycle runs through (those
    feeding the unfused op, and what they read) stay a group; the rest joins the
    node's group, when fewer bytes cross. A node that cannot be helped so but is
    fused with other nodes (a residual add reading the norm's input and the
    matmul the norm feeds joins that matmul's epilogue) lost nothing: its
    decision says so rather than reporting a refusal."""
    for refusal in refused:
        if refusal.kind != CYCLE:
            continue
        producer, consumer = group_of.get(refusal.producer), group_of.get(refusal.node)
        if producer is None or consumer is None:
            continue
        if producer is consumer:  # an earlier split put them together
            refusal.kind = JOINED
            refusal.decision.reason = f"fused in {consumer.label()} once a split removed the cycle"
            continue
        split = _split_around(graph, group_of, producer, consumer, config, position)
        if split is not None:
            kept, joined = split
            for group in split:
                for n in group.nodes:
                    group_of[n] = group
            refusal.kind = JOINED
            refusal.decision.nodes = (kept.label(), joined.label())
            refusal.decision.reason = (f"split so that no cycle forms: {kept.label()} feeds an unfused op that "
                                       f"{refusal.node.name} reads, the rest of its group joined {refusal.node.name}")
        elif len(consumer.nodes) > 1 and _cycle_free_parts(producer, consumer) is None:
            # fused all the same, and every member it reads is on the cycle's path
            refusal.kind = JOINED
            refusal.decision.reason = (f"fused in {consumer.label()} instead: {producer.label()} feeds an "
                                       f"unfused op that {refusal.node.name} reads, so no kernel holds both "
                                       f"(it would wait on itself: a cycle)")


def _split_around(graph: fx.Graph, group_of: dict, producer: FusionGroup, consumer: FusionGroup,
                  config: FusionConfig, position: dict) -> tuple[FusionGroup, FusionGroup] | None:
    """(the part of producer the cycle runs through, the rest joined with consumer),
    when both are legal and fewer bytes cross than between producer and consumer."""
    parts = _cycle_free_parts(producer, consumer)
    if parts is None:
        return None
    kept, joined = FusionGroup(parts[0]), FusionGroup(sorted(parts[1] + consumer.nodes, key=position.__getitem__))
    if any(merge_refusal(g, g, config, position) for g in (kept, joined)):
        return None
    if crossing_bytes(kept.nodes, joined.nodes) >= crossing_bytes(producer.nodes, consumer.nodes):
        return None
    others = {id(g): g for g in group_of.values() if g is not producer and g is not consumer}
    if not groups_acyclic(list(graph.nodes), [*others.values(), kept, joined]):
        return None
    return kept, joined


def _non_view_users(node: fx.Node) -> list[fx.Node]:
    found = []
    for user in node.users:
        found += _non_view_users(user) if is_view(user) else [user]
    return found


def _cycle_free_parts(producer: FusionGroup, consumer: FusionGroup):
    """(members a path to the consumer leaves through, the other members), both in
    graph order, or None when the consumer reads none of the others."""
    members, targets = set(producer.nodes), set(consumer.nodes)
    ancestors, stack = set(), [a for n in consumer.nodes for a in n.all_input_nodes]
    while stack:  # the consumer's ancestors outside the producer (its direct reads excluded)
        n = stack.pop()
        if n in ancestors or n in members or n in targets or (is_view(n) and view_root(n) in members):
            continue
        ancestors.add(n)
        stack += n.all_input_nodes
    lower = {m for m in members if any(u in ancestors for u in _non_view_users(m))}
    stack = list(lower)
    while stack:  # and every member those read
        for a in stack.pop().all_input_nodes:
            root = view_root(a)
            if root in members and root not in lower:
                lower.add(root)
                stack.append(root)
    upper = [n for n in producer.nodes if n not in lower]
    read = {view_root(a) for n in consumer.nodes for a in n.all_input_nodes}
    if not lower or not upper or not read & set(upper):
        return None
    return [n for n in producer.nodes if n in lower], upper
