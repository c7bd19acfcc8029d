"""Recompute a producer inside its consumers, when that is what lets one loop serve.

A kernel iterates over the values it writes, so a producer whose values are
read at another size than its consumers write cannot share their loop while
its own values must be written: rotary embeddings' `cos`/`sin` tables (one
row per position) read by every head of `q` and `k`, or `y = f(x)` read as
`y[..., :half]` and `y[..., half:]` by two consumers. Inductor inlines such
pointwise producers into their consumers; so does this pass: when every
reader of a pointwise producer group is a generated group with room for
the producer's operations it reads (`max_fusion_size` counts them), each
consumer gets its own copy of them, computed at its own index, and the
producer's kernel disappears. The graph is rewritten (each consumer reads
its copies, the producer's nodes are erased) and planned again.

A producer that something else must read (an opaque op, the graph's
output), or that holds a reduction (recomputing one per element would
repeat the whole row), is left as it is.
"""
from __future__ import annotations

import logging

from torch import fx

from kitsune.config import FusionConfig
from kitsune.ir.graph import is_view, numel, view_root
from kitsune.planner.legality import CYCLE, indexed_refusal
from kitsune.planner.plan import FusionGroup, outputs_of

log = logging.getLogger("kitsune")


def recompute_producers(graph: fx.Graph, group_of: dict, refused: list, config: FusionConfig,
                        position: dict) -> bool:
    """Rewrite `graph` so producers refused by their consumers for their size are
    recomputed in them (see the module docstring). True if the graph changed."""
    changed, seen = False, set()
    for refusal in refused:
        producer = group_of.get(refusal.producer)
        if refusal.kind == CYCLE or producer is None or id(producer) in seen:
            continue
        seen.add(id(producer))
        cones = _consumer_cones(producer, group_of, config, position)
        if cones:
            _rewrite(graph, producer, cones, position)
            changed = True
    return changed


def _readers(node: fx.Node, members: set) -> list[fx.Node]:
    """The non-view nodes outside `members` that read `node`, through views."""
    found = []
    for user in node.users:
        if user in members:
            continue
        if is_view(user):
            found += _readers(user, members)
        else:
            found.append(user)
    return found


def _cone(producer: FusionGroup, consumer: FusionGroup) -> set:
    """The producer's members that `consumer` reads, with the members they read."""
    members = set(producer.nodes)
    stack = [view_root(a) for n in consumer.nodes for a in n.all_input_nodes]
    cone = set()
    while stack:
        n = stack.pop()
        if n in members and n not in cone:
            cone.add(n)
            stack += [view_root(a) for a in n.all_input_nodes]
    return cone


def _consumer_cones(producer: FusionGroup, group_of: dict, config: FusionConfig,
                    position: dict) -> list[tuple[FusionGroup, set]]:
    """(consumer group, the producer members it would recompute) for each reader of
    the producer, or [] when the producer cannot disappear."""
    if producer.frame is not None:
        return []
    members = set(producer.nodes)
    consumers: dict[int, FusionGroup] = {}
    for out in outputs_of(producer.nodes):
        for reader in _readers(out, members):
            group = group_of.get(reader)
            if group is None or group is producer:
                return []  # an opaque op or the graph's output reads it: it stays
            consumers[id(group)] = group
    if not any(numel(n) != producer.numel for g in consumers.values() for n in outputs_of(g.nodes)):
        return []  # same size everywhere: a plain merge's business, not this one's
    cones = []
    for group in sorted(consumers.values(), key=lambda g: position[g.nodes[0]]):
        cone = _cone(producer, group)
        ops = group.user_ops() | FusionGroup(sorted(cone, key=position.__getitem__)).user_ops()
        if len(ops) > config.max_fusion_size or indexed_refusal(set(group.nodes) | cone):
            return []  # no room, or the consumer reads the producer at computed positions
        cones.append((group, cone))
    return cones


def _rewrite(graph: fx.Graph, producer: FusionGroup, cones: list, position: dict) -> None:
    """Give each reading node of each consumer its own copies of the producer's
    nodes it reads, then erase the producer. One copy per reading node, not per
    group: a copy read by one node is never needed outside the group that node
    joins, whatever order the consumer's nodes join in."""
    members = set(producer.nodes)

    def inside(n) -> bool:
        return isinstance(n, fx.Node) and (n in members or (is_view(n) and view_root(n) in members))

    for consumer, _ in cones:
        for reader in [n for n in consumer.nodes if any(inside(a) for a in n.all_input_nodes)]:
            _copy_for(graph, reader, inside)
    for node in reversed(list(graph.nodes)):  # the originals (and their views) no one reads now
        if inside(node) and not node.users:
            graph.erase_node(node)
    log.debug("recomputed %s in %d consumer group(s)", producer.label(), len(cones))


def _copy_for(graph: fx.Graph, reader: fx.Node, inside) -> None:
    """Copies (just before `reader`) of the nodes `inside` that `reader` reads."""
    copies: dict[fx.Node, fx.Node] = {}

    def copy(n: fx.Node) -> fx.Node:
        if n not in copies:
            for a in n.all_input_nodes:
                if inside(a):
                    copy(a)
            with graph.inserting_before(reader):
                copies[n] = graph.node_copy(n, lambda a: copies[a] if inside(a) else a)
        return copies[n]

    for a in list(reader.all_input_nodes):
        if inside(a):
            reader.replace_input_with(a, copy(a))
