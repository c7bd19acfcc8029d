"""The pending graph of a lazy region, and how it runs at a sync point.

Recording appends nodes (op, argument template); a template refers to an
earlier node as `("\\0n", i)`, to a real input tensor as `("\\0i", slot)` and to a
Python float lifted out of the graph as `("\\0s", k)` (so a learning rate that
changes every step does not make a new graph). Everything else in a template is
a constant and part of the graph's structure.

While recording, the graph's structure so far is one integer, `state`: a step
of `STEPS` (a trie over node keys) maps (state, node key) to the next state and
the node's result metadata, so a loop that records the same ops again pays one
dictionary lookup per op for both, and no key is built or compared at the
flush. At a flush (state, which nodes are wanted) finds a compiled graph in
`GRAPH_CACHE`, or the graph is
built as an aten FX graph with fake-tensor metadata and compiled by
`kitsune.compiler.compile_graph` (the same entry torch.compile's graphs take).
A graph too small to gain runs its nodes one by one, as eager would.
"""
from __future__ import annotations

import itertools
import logging
import math

import torch
from torch import fx

from kitsune import _compat
from kitsune.cache import LRU
from kitsune._compat import FakeTensorMode

from kitsune.lazy.tensor import fake_from_meta

log = logging.getLogger("kitsune")

NODE, INPUT, SCALAR = "\0n", "\0i", "\0s"
GRAPH_CACHE_SIZE = 512
STEPS_LIMIT = 200000   # trie entries kept before it starts again (graphs that never repeat)

# (state, op, args template, kwargs template, signature, float constants)
#   -> (next state, result meta, the result's number of elements).
# States are never reused (a global counter), so clearing the trie cannot make an old
# GRAPH_CACHE key name a new graph: entries under old states are just never hit again.
STEPS: dict = {}
_NEW_STATE = itertools.count(1)
EMPTY_STATE = 0


def step(key: tuple, meta) -> tuple:
    """The trie's step for `key` (a node appended to the graph at key[0]), made now."""
    if len(STEPS) >= STEPS_LIMIT:
        STEPS.clear()
    found = STEPS[key] = (next(_NEW_STATE), meta, math.prod(meta[0]))
    return found


class PendingGraph:
    """Nodes recorded since the last flush, their real inputs and lifted scalars."""

    def __init__(self):
        self.nodes: list = []          # (op, args template, kwargs template)
        self.state = EMPTY_STATE       # the structure recorded so far (see STEPS)
        self.metas: list = []          # eager metadata of each node's result
        self.inputs: list = []         # real tensors read by the graph
        self.input_slots: dict = {}    # id(tensor) -> slot
        self.input_keys: list = []     # their layouts (as seen when the slot was made)
        self.input_refs: list = []     # their templates, (INPUT, slot)
        self.input_owners: list = []   # their storages' data_ptr (None where there is none)
        self.input_sizes: list = []    # their numbers of elements
        self.input_storages: set = set()  # their storages (an eager write to one flushes first)
        self.scalars: list = []        # lifted Python floats
        self.device = None
        self.largest = 0               # the most elements of any tensor recorded

    def __len__(self) -> int:
        return len(self.nodes)

    def new_input(self, tensor: torch.Tensor, meta, storage, size: int) -> tuple:
        """A slot for a real tensor not read yet (`storage`: its storage's data_ptr or None);
        its template. A tensor already read has its slot in `input_slots`: its layout then is
        the one seen here (changing a tensor's layout is an in-place op, which flushes first)."""
        slot = self.input_slots[id(tensor)] = len(self.inputs)
        ref = (INPUT, slot)
        self.inputs.append(tensor)
        self.input_keys.append(meta)
        self.input_refs.append(ref)
        self.input_owners.append(storage)
        self.input_sizes.append(size)
        if storage is not None:
            self.input_storages.add(storage)
        return ref

    def scalar_ref(self, value: float) -> tuple:
        self.scalars.append(value)
        return (SCALAR, len(self.scalars) - 1)

    def rollback(self, inputs: int, scalars: int) -> None:
        """Forget the inputs and scalars added after these counts (an op that was not recorded)."""
        for t, storage in zip(self.inputs[inputs:], self.input_owners[inputs:]):
            del self.input_slots[id(t)]
            if storage is not None and storage not in self.input_owners[:inputs]:
                self.input_storages.discard(storage)
        del self.inputs[inputs:], self.input_keys[inputs:], self.input_refs[inputs:]
        del self.input_owners[inputs:], self.input_sizes[inputs:], self.scalars[scalars:]

    def add(self, op, args: tuple, kwargs: tuple, meta, state: int) -> int:
        """A node (its result's metadata `meta`); `state`: the trie's state after it (STEPS)."""
        self.nodes.append((op, args, kwargs))
        self.metas.append(meta)
        self.state = state
        return len(self.nodes) - 1

    def key(self, outputs: tuple) -> tuple:
        # the state fixes every node's template, signature and so the inputs' layouts
        return (self.state, len(self.inputs), len(self.scalars), outputs)


class GraphCache(LRU):
    """Compiled lazy graphs by structure, least recently used dropped first."""

    def __init__(self, size: int = GRAPH_CACHE_SIZE):
        super().__init__(size)


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
