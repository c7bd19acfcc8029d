"""Rewrite a captured graph so each fusion group becomes one call.

The result is a `CompiledGraph`, an `fx.GraphModule` whose graph calls the
generated kernels (through `FusedGroupCall`) and PyTorch for everything
else, in an order that respects every dependency: what analyses, the
measurement of kernels and the tests read. Calling it runs one generated
function instead (`runtime/wrapper.py`, written on the first call and again
after the graph or a kernel changes): the hot path without `nn.Module`'s call,
`FusedGroupCall` objects or `getitem`s.
"""
from __future__ import annotations

import heapq
import logging
import operator

import torch
from torch import fx

from kitsune.ir.graph import view_root
from kitsune.runtime.fused_call import FusedGroupCall
from kitsune.runtime.wrapper import flat_function

log = logging.getLogger("kitsune")


class CompiledGraph(fx.GraphModule):
    """A compiled graph: an `fx.GraphModule` whose `forward` and `__call__` run
    generated code.

    `fx.GraphModule` makes a class per instance; `recompile()` (at construction,
    and after a pass rewrote the graph) keeps fx's code as `fx_forward` (what
    KITSUNE_DEBUG runs) and makes both `forward` and `__call__` one dispatch to
    `flat`, the generated function: a call costs about what a Python function's
    does (capture hands `forward` to AOTAutograd once, so `flat` is looked up
    per call). `flat` is written on the first call, and again after every
    recompile and every kernel change (`FusedGroupCall.kernel`)."""

    def recompile(self):
        code = super().recompile()
        cls = type(self)
        cls.fx_forward = cls.forward
        cls.forward = cls.__call__ = _run
        self.kernels_changed()
        return code

    def kernels_changed(self) -> None:
        type(self).flat = _write_on_call


def _run(self: CompiledGraph, *args):
    return self.flat(*args)


def _write_on_call(self: CompiledGraph, *args):
    try:
        flat = flat_function(self)
    except Exception as error:  # noqa: BLE001 - the fx code computes the same
        log.debug("compiled graph runs its fx code (no generated wrapper: %s: %s)", type(error).__name__, error)
        flat = type(self).fx_forward
    type(self).flat = flat
    return flat(self, *args)


def _units(graph: fx.Graph, group_of: dict, inputs_of: dict | None = None) -> list:
    """Nodes and groups in a dependency-respecting order close to the original.
    `inputs_of` maps a group (by id) to its kernel's input nodes: these can be more
    than its members read, e.g. a symbolic size (`s0 + 1`) that only a view folded
    into the kernel's indexing uses, and they must be computed before the kernel."""
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
        for a in () if isinstance(unit, list) else (inputs_of or {}).get(id(unit), ()):
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
    inputs_of = {id(group): inputs for group, _, inputs, _ in calls.values()}
    for unit in _units(gm.graph, group_of, inputs_of):
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
    return CompiledGraph(gm, graph)


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


__all__ = ["CompiledGraph", "FusedGroupCall", "bind_fast_targets", "build_graph_module"]
