"""Rewrite a captured graph so each fusion group becomes one call.

The result is an ordinary `fx.GraphModule`: straight-line Python that calls
the generated kernels (through `FusedGroupCall`) and PyTorch for everything
else, in an order that respects every dependency.
"""
from __future__ import annotations

import heapq
import operator

from torch import fx

from kitsune.ir.graph import view_root
from kitsune.runtime.fused_call import FusedGroupCall


def _units(graph: fx.Graph, group_of: dict) -> list:
    """Nodes and groups in a dependency-respecting order close to the original."""
    units, unit_of = [], {}
    for node in graph.nodes:
        g = group_of.get(node)
        key = id(g) if g is not None else node
        if key not in unit_of:
            unit_of[key] = len(units)
            units.append([node] if g is None else g)
    deps = [set() for _ in units]
    for i, unit in enumerate(units):
        members = [unit[0]] if isinstance(unit, list) else unit.nodes
        for node in members:
            for a in node.all_input_nodes:
                if not isinstance(unit, list) and view_root(a) in group_of and group_of[view_root(a)] is unit:
                    continue  # a view of a member, folded into the kernel's indexing
                j = unit_of[id(group_of[a])] if a in group_of else unit_of[a]
                if j != i:
                    deps[i].add(j)
    # Kahn's algorithm, always taking the earliest ready unit.
    order = []
    users = [[] for _ in units]
    pending = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        order.append(units[i])
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(units):
        raise RuntimeError("fusion groups form a cycle (planner bug)")
    return order


def build_graph_module(gm: fx.GraphModule, calls: dict) -> fx.GraphModule:
    """`calls` maps a group (by id) to (group, FusedGroupCall, input nodes, output nodes)."""
    group_of = {}
    for group, _, _, _ in calls.values():
        for n in group.nodes:
            group_of[n] = group
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for unit in _units(gm.graph, group_of):
        if isinstance(unit, list):
            node = unit[0]
            if all(a in env for a in node.all_input_nodes):
                env[node] = graph.node_copy(node, lambda n: env[n])
            # else: a view of a group-internal value, folded into the kernel
            continue
        _, call, inputs, outputs = calls[id(unit)]
        result = graph.call_function(call, tuple(env[n] for n in inputs))
        for k, out in enumerate(outputs):
            env[out] = graph.call_function(operator.getitem, (result, k))
            env[out].meta = dict(out.meta)
    graph.eliminate_dead_code()
    return fx.GraphModule(gm, graph)


__all__ = ["FusedGroupCall", "build_graph_module"]
