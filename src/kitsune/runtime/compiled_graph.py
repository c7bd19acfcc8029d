"""Rewrite a captured graph so each fusion group becomes one call.

The result is an ordinary `fx.GraphModule`: straight-line Python that calls
the generated kernels (through `FusedGroupCall`) and PyTorch for everything
else, in an order that respects every dependency.
"""
from __future__ import annotations

import heapq
import operator

import torch
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


aten = torch.ops.aten

# aten overloads whose Python bindings in `torch` take the same arguments
# (these keyword arguments included): called through them an op costs the
# host about 40 % less (torch.mm 1.3 us against aten.mm.default 2.2 us on the
# 2-core VM; the H200 host is about three times slower), and a host-bound
# training step runs dozens of them. Inductor's wrappers call torch.mm too.
_FAST_TARGETS = {
    aten.mm.default: (torch.mm, ()), aten.bmm.default: (torch.bmm, ()),
    aten.addmm.default: (torch.addmm, ("beta", "alpha")),
    aten.t.default: (torch.t, ()), aten.permute.default: (torch.permute, ()),
    aten.transpose.int: (torch.transpose, ()), aten.view.default: (torch.Tensor.view, ()),
    aten.expand.default: (torch.Tensor.expand, ()), aten.unsqueeze.default: (torch.unsqueeze, ()),
    aten.squeeze.dim: (torch.squeeze, ()), aten.select.int: (torch.select, ()),
    aten.cat.default: (torch.cat, ()), aten.clone.default: (torch.clone, ("memory_format",)),
    aten.add.Tensor: (torch.add, ("alpha",)), aten.sub.Tensor: (torch.sub, ("alpha",)),
    aten.mul.Tensor: (torch.mul, ()), aten.div.Tensor: (torch.div, ()),
    aten.sum.dim_IntList: (torch.sum, ("dtype",)),
}


def bind_fast_targets(gm: fx.GraphModule) -> int:
    """Call the ops of a compiled graph through `torch`'s own bindings where
    they take the same arguments (the graph computes the same; analyses that
    read aten targets must run before this). Returns the number of nodes changed."""
    changed = 0
    for node in gm.graph.nodes:
        fast = _FAST_TARGETS.get(node.target) if node.op == "call_function" else None
        if fast is not None and set(node.kwargs) <= set(fast[1]):
            node.target = fast[0]
            changed += 1
    if changed:
        gm.recompile()
    return changed


__all__ = ["FusedGroupCall", "bind_fast_targets", "build_graph_module"]
