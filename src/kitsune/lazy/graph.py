"""The pending graph of a lazy region, and how it runs at a sync point.

Recording appends nodes (op, argument template); a template refers to an
earlier node as `("\\0n", i)`, to a real input tensor as `("\\0i", slot)` and to a
Python float lifted out of the graph as `("\\0s", k)` (so a learning rate that
changes every step does not make a new graph). Everything else in a template is
a constant and part of the graph's structure.

At a flush the graph's key (its nodes' templates, its inputs' layouts, which
nodes are wanted) finds a compiled graph in `GRAPH_CACHE`, or the graph is
built as an aten FX graph with fake-tensor metadata and compiled by
`kitsune.compiler.compile_graph` (the same entry torch.compile's graphs take).
A graph too small to gain runs its nodes one by one, as eager would.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import fx

from kitsune import _compat
from kitsune._compat import FakeTensorMode

from kitsune.lazy.tensor import fake_from_meta

log = logging.getLogger("kitsune")

NODE, INPUT, SCALAR = "\0n", "\0i", "\0s"
GRAPH_CACHE_SIZE = 512


class PendingGraph:
    """Nodes recorded since the last flush, their real inputs and lifted scalars."""

    def __init__(self):
        self.nodes: list = []          # (op, args template, kwargs template)
        self.node_keys: list = []      # hashable (op, args, kwargs) per node
        self.metas: list = []          # eager metadata of each node's result
        self.inputs: list = []         # real tensors read by the graph
        self.input_slots: dict = {}    # id(tensor) -> slot
        self.input_keys: list = []     # their layouts
        self.input_storages: set = set()  # their storages (an eager write to one flushes first)
        self.scalars: list = []        # lifted Python floats
        self.device = None
        self.largest = 0               # the most elements of any tensor recorded

    def __len__(self) -> int:
        return len(self.nodes)

    def input_ref(self, tensor: torch.Tensor, meta) -> tuple:
        slot = self.input_slots.get(id(tensor))
        if slot is None:
            slot = self.input_slots[id(tensor)] = len(self.inputs)
            self.inputs.append(tensor)
            self.input_keys.append(meta)
            try:
                self.input_storages.add(tensor.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):
                pass
        return (INPUT, slot)

    def scalar_ref(self, value: float) -> tuple:
        self.scalars.append(value)
        return (SCALAR, len(self.scalars) - 1)

    def rollback(self, inputs: int, scalars: int) -> None:
        """Forget the inputs and scalars added after these counts (an op that was not recorded)."""
        for t in self.inputs[inputs:]:
            del self.input_slots[id(t)]
            self.input_storages.discard(t.untyped_storage().data_ptr())
        del self.inputs[inputs:], self.input_keys[inputs:], self.scalars[scalars:]

    def add(self, op, args: tuple, kwargs: tuple, meta, signature) -> int:
        """A node; its key is its template (references) with its signature (argument
        layouts and type-tagged constants) and result metadata."""
        self.nodes.append((op, args, kwargs))
        self.node_keys.append((op, args, kwargs, signature))  # the meta follows from op and signature
        self.metas.append(meta)
        return len(self.nodes) - 1

    def key(self, outputs: tuple) -> tuple:
        return (tuple(self.node_keys), tuple(self.input_keys), len(self.scalars), outputs)


class GraphCache:
    """Compiled graphs by structure, least recently used dropped first; counts hits and misses."""

    def __init__(self, size: int = GRAPH_CACHE_SIZE):
        self.size = size
        self.graphs: OrderedDict = OrderedDict()

    def get(self, key):
        compiled = self.graphs.get(key)
        if compiled is not None:
            self.graphs.move_to_end(key)
        return compiled

    def put(self, key, compiled) -> None:
        self.graphs[key] = compiled
        while len(self.graphs) > self.size:
            self.graphs.popitem(last=False)

    def clear(self) -> None:
        self.graphs.clear()


GRAPH_CACHE = GraphCache()


def _resolve(template, env: list, inputs: list, scalars):
    """A template with its references replaced: by values in `env`, inputs, scalars."""
    if type(template) is tuple:
        if template and template[0] == NODE:
            return env[template[1]]
        if template and template[0] == INPUT:
            return inputs[template[1]]
        if template and template[0] == SCALAR:
            return scalars[template[1]]
        return tuple(_resolve(t, env, inputs, scalars) for t in template)
    return template


def _as_call(args, kwargs):
    # int lists were recorded as tuples (hashable); aten accepts both, FX prints lists
    return [list(a) if type(a) is tuple else a for a in args], dict(kwargs)


def run_eagerly(graph: PendingGraph, outputs: tuple) -> list:
    """The nodes run one by one through PyTorch, as the user's code would have:
    lifted scalars go back in as Python numbers. Only the nodes the outputs need run."""
    needed = _needed(graph, outputs)
    env: list = [None] * len(graph.nodes)
    for i, (op, args, kwargs) in enumerate(graph.nodes):
        if i in needed:
            args, kwargs = _resolve((args, kwargs), env, graph.inputs, graph.scalars)
            env[i] = op(*_as_call(args, kwargs)[0], **dict(kwargs))
    return [env[i] for i in outputs]


def _needed(graph: PendingGraph, outputs: tuple) -> set:
    needed, stack = set(), list(outputs)
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        stack.extend(_node_refs(graph.nodes[i][1:]))
    return needed


def _node_refs(template):
    if type(template) is tuple:
        if template and template[0] == NODE:
            yield template[1]
        elif not (template and template[0] in (INPUT, SCALAR)):
            for t in template:
                yield from _node_refs(t)


def build_graph_module(graph: PendingGraph, outputs: tuple) -> tuple[fx.GraphModule, list]:
    """The pending nodes the outputs need as an aten FX graph whose nodes carry
    fake tensors in meta["val"] (what the compiler plans with), and its inputs.
    Lifted scalars arrive as one float64 vector; each is a 0-dim select of it."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    g = fx.Graph()
    places = []
    for slot, meta in enumerate(graph.input_keys):
        p = g.placeholder(f"input_{slot}")
        p.meta["val"] = fake_from_meta(meta, fake_mode)
        places.append(p)
    inputs = list(graph.inputs)
    scalars = []
    if graph.scalars:
        vector = g.placeholder("scalars")
        vector.meta["val"] = fake_from_meta(((len(graph.scalars),), (1,), 0, torch.float64, graph.device), fake_mode)
        for k in range(len(graph.scalars)):
            s = g.call_function(torch.ops.aten.select.int, (vector, 0, k))
            with fake_mode:
                s.meta["val"] = torch.ops.aten.select.int(vector.meta["val"], 0, k)
            scalars.append(s)
        inputs.append(scalar_vector(graph))
    needed = _needed(graph, outputs)
    env: list = [None] * len(graph.nodes)
    for i, (op, args, kwargs) in enumerate(graph.nodes):
        if i not in needed:
            continue
        args, kwargs = _as_call(*_resolve((args, kwargs), env, places, scalars))
        node = g.call_function(op, tuple(args), kwargs)
        fake_args, fake_kwargs = _compat.tree_map_only(fx.Node, lambda n: n.meta["val"], (args, kwargs))
        with fake_mode:
            node.meta["val"] = op(*fake_args, **fake_kwargs)
        env[i] = node
    g.output(tuple(env[i] for i in outputs))
    return fx.GraphModule(torch.nn.Module(), g), inputs


def scalar_vector(graph: PendingGraph) -> torch.Tensor:
    """The lifted floats as one float64 vector on the graph's device. On CUDA it goes
    through pinned memory without blocking: a plain copy would wait for the stream,
    i.e. for the GPU to finish the previous flush's kernels."""
    if graph.device.type != "cuda":
        return torch.tensor(graph.scalars, dtype=torch.float64, device=graph.device)
    host = torch.tensor(graph.scalars, dtype=torch.float64, pin_memory=True)
    return host.to(graph.device, non_blocking=True)


def compile_pending(graph: PendingGraph, outputs: tuple, config):
    """Compile the pending graph with Kitsune's compiler; the graph as built on failure."""
    from kitsune.compiler import compile_graph

    gm, inputs = build_graph_module(graph, outputs)
    return compile_graph(gm, inputs, "lazy", config=config)


def call_compiled(compiled, graph: PendingGraph) -> list:
    inputs = list(graph.inputs)
    if graph.scalars:
        inputs.append(scalar_vector(graph))
    result = compiled(*inputs)
    return list(result) if isinstance(result, (tuple, list)) else [result]
