"""The unfused side of a measured decision: the user's own ops, as written.

A fused group is built from the primitives its user operations decompose
into (a layer norm becomes a variance, a subtraction, an rsqrt, ...); run op
by op those primitives are far slower than the one eager kernel the user's
`F.layer_norm` launches, so timing the group against them flatters the
fusion (a layer norm once measured "63.7x faster": 1.2 ms of decomposed ops
against eager's 16 us). The baseline is therefore the Dynamo graph's ops —
what the user wrote, before AOTAutograd decomposed it
(`kitsune.capture.dynamo.user_graph`) — for the user ops the group holds.

The aten nodes of a forward or inference graph name the Dynamo node they come
from (``meta["source_fn_stack"][-1][0]``), and their placeholders are the
Dynamo graph's placeholders in the same order. A group gets a user-op
baseline when every aten op of each of its user ops is in the group and each
input of those user ops is found: a graph input (by position) or one of the
group's inputs (by its source and shape). Otherwise — a backward graph (its
ops have no Dynamo counterpart), a user op split across groups, an input not
found, an in-place user op — the group's decomposed ops (`FusedGroupCall.fallback`)
are the baseline, and the measurement says so and why.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from kitsune import _compat
from kitsune.ir.graph import is_compute

USER_OPS, DECOMPOSED_OPS = "user ops", "decomposed ops"
# Views and size queries pulled into a baseline beside its user ops (free in eager), at most.
MAX_EXTRA_NODES = 16


def is_group_call(target) -> bool:
    """A fused group's call in a compiled graph (kitsune.runtime.fused_call.FusedGroupCall).
    Tuning comes before runtime in the pipeline, so it knows the call by what it has."""
    return hasattr(target, "spec") and hasattr(target, "fallback") and hasattr(target, "kernel")


@dataclass
class UserOps:
    """A group's user ops as a GraphModule, and where each of its inputs comes from:
    ("input", k) the compiled graph's k-th input, ("arg", i) the group's i-th input."""
    fn: fx.GraphModule
    sources: list

    def inputs(self, graph_inputs, group_args) -> list:
        return [graph_inputs[k] if where == "input" else group_args[k] for where, k in self.sources]


class _NoBaseline(Exception):
    """Why a group's user ops cannot be rebuilt (the reason goes into the measurement)."""


def source(node: fx.Node) -> str | None:
    """The user op a node comes from (a Dynamo node's own ``source_fn_stack`` entry,
    which AOTAutograd copies onto the aten nodes it decomposes into), or None."""
    stack = node.meta.get("source_fn_stack")
    return stack[-1][0] if stack else None


def user_op_baselines(aten_gm: fx.GraphModule, compiled: fx.GraphModule, record, dynamo_gm) -> dict:
    """kernel name -> `UserOps`, or the reason (a str) why its decomposed ops are the baseline."""
    calls = [n for n in compiled.graph.nodes if n.op == "call_function" and is_group_call(n.target)]
    if record.name not in ("forward", "inference"):
        why = f"a {record.name} graph has no user ops to compare with"
        return {n.target.spec.name: why for n in calls}
    if dynamo_gm is None:
        return {n.target.spec.name: "compiled from an aten graph, not from Dynamo" for n in calls}
    context = _Context(aten_gm, compiled, dynamo_gm)
    members = {name: set(nodes) for name, nodes, _ in record.groups}
    out = {}
    for node in calls:
        name = node.target.spec.name
        try:
            out[name] = context.baseline(members.get(name, set()), node.args)
        except _NoBaseline as why:
            out[name] = str(why)
        except Exception as error:  # noqa: BLE001 - a baseline it cannot build is not an error
            out[name] = f"{type(error).__name__}: {error}"
    return out


class _Context:
    """What every group's baseline of one graph reads: the Dynamo graph, and the
    aten compute nodes of each user op. A user op is named by its Dynamo node's own
    ``source_fn_stack`` entry, which its aten nodes carry (Dynamo's node names differ:
    `h = self.ln(x)` is node "h", source "layer_norm")."""

    def __init__(self, aten_gm, compiled, dynamo_gm):
        self.dynamo_gm = dynamo_gm
        self.user_op: dict = {}  # source name -> Dynamo node (None where two nodes share it)
        for node in dynamo_gm.graph.nodes:
            if source(node) is not None:
                self.user_op[source(node)] = None if source(node) in self.user_op else node
        self.by_source: dict[str, set] = {}  # source name -> its aten compute nodes
        for node in aten_gm.graph.nodes:
            if is_compute(node) and source(node) is not None:
                self.by_source.setdefault(source(node), set()).add(node.name)
        self._source_of = {name: unit for unit, names in self.by_source.items() for name in names}
        aten_inputs = [n for n in compiled.graph.nodes if n.op == "placeholder"]
        dynamo_inputs = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
        # Dynamo placeholder -> position of the same graph input. AOTAutograd puts the
        # parameters it lifts (a Dynamo graph that reads them with get_attr) first.
        lifted = len(aten_inputs) - len(dynamo_inputs)
        self.input_index = {d: k + lifted for k, d in enumerate(dynamo_inputs) if lifted >= 0 and
                            _same_value(aten_inputs[k + lifted].meta.get("val"), d.meta.get("example_value"))}

    def baseline(self, members: set, args) -> UserOps:
        units = self._units(members)
        needed, sources = set(units), {}
        frontier = list(units)
        while frontier:
            for e in frontier.pop().all_input_nodes:
                if e in needed or e in sources:
                    continue
                where = self._find(e, args)
                if where is not None:
                    sources[e] = where
                elif e.op == "get_attr" or self._free(e, len(needed) - len(units)):
                    needed.add(e)  # a parameter, or a view/size op of no kernel: free in eager
                    if e.op != "get_attr":
                        frontier.append(e)
                else:
                    raise _NoBaseline(f"input {e.name} of the user ops is not among the group's inputs")
        return UserOps(self._graph(needed, units, sources), list(sources.values()))

    def _free(self, e: fx.Node, extra: int) -> bool:
        """Whether `e` may join the baseline beside the user ops: a call with no
        aten kernel of its own (a view, a size), within MAX_EXTRA_NODES."""
        return e.op in ("call_function", "call_method") and not self.by_source.get(source(e)) and \
            extra < MAX_EXTRA_NODES

    def _units(self, members: set) -> set:
        """The user ops (Dynamo nodes) of a group, each wholly inside it."""
        if not members:
            raise _NoBaseline("the group's nodes are unknown")
        names = set()
        for name in members:
            if self._source_of.get(name) is None:
                raise _NoBaseline(f"{name} comes from no user op")
            names.add(self._source_of[name])
        units = set()
        for name in names:
            node = self.user_op.get(name)
            if node is None or node.op not in ("call_function", "call_method"):
                raise _NoBaseline(f"user op {name} is not one function call of the Dynamo graph")
            outside = self.by_source[name] - members
            if outside:
                raise _NoBaseline(f"user op {name} is split: {', '.join(sorted(outside))} outside the group")
            units.add(node)
        return units

    def _find(self, e: fx.Node, args):
        """Where the value of Dynamo node `e` comes from at run time, or None."""
        if e.op == "placeholder":
            if e not in self.input_index:
                raise _NoBaseline(f"graph input {e.name} does not match the aten graph's inputs")
            return ("input", self.input_index[e])
        want, name = e.meta.get("example_value"), source(e)
        found = [i for i, a in enumerate(args) if isinstance(a, fx.Node) and name is not None
                 and source(a) == name and _same_value(a.meta.get("val"), want)]
        if len(found) > 1:
            raise _NoBaseline(f"input {e.name} of the user ops matches several group inputs")
        return ("arg", found[0]) if found else None

    def _graph(self, needed: set, units: set, sources: dict) -> fx.GraphModule:
        graph = fx.Graph()
        env = {e: graph.placeholder(f"in{i}") for i, e in enumerate(sources)}
        for node in self.dynamo_gm.graph.nodes:
            if node in needed:
                if _in_place(node):
                    raise _NoBaseline(f"user op {node.name} is in place")
                env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(tuple(env[n] for n in self.dynamo_gm.graph.nodes if n in units))
        return fx.GraphModule(self.dynamo_gm, graph)


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
    return False


def _in_place(node: fx.Node) -> bool:
    """An op that writes its input: running it again and again would change the user's tensors."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    schema = _compat.op_schema(node.target)
    return (name.endswith("_") and not name.endswith("__")) or name in ("setitem", "__setitem__") or \
        (schema is not None and schema.is_mutable)
