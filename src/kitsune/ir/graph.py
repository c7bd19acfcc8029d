"""Facts about the nodes of a captured aten FX graph, as the planner sees them.

Kitsune keeps the FX graph as its graph IR: each `call_function` node's kind
comes from the op table, its shape/strides/dtype from the fake tensor in
`node.meta["val"]` that capture records. This module answers the questions
the planner and the lowering ask of a node.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from kitsune.ir.ops import POINTWISE_OPS, REDUCTION_OPS, VIEW_OPS, OpKind, op_kind, op_name
from kitsune.ir.scalar import SUPPORTED_DTYPES


def meta(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if meta(a) is not None]


def is_view(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in VIEW_OPS


def is_compute(node: fx.Node) -> bool:
    """A node that eager PyTorch runs as (at least) one kernel."""
    return node.op == "call_function" and not is_view(node) and meta(node) is not None


def view_root(node: fx.Node) -> fx.Node:
    """The node a chain of views reads from."""
    while is_view(node):
        node = node.args[0]
    return node


def numel(node) -> int:
    return math.prod(meta(node).shape)


def has_static_shape(val: torch.Tensor) -> bool:
    return all(isinstance(s, int) for s in (*val.shape, *val.stride()))


def user_op_key(node: fx.Node):
    """Identifies the user's operation a primitive came from: `layer_norm` is
    one op even though it decomposes into many (max_fusion_size counts these)."""
    source = node.meta.get("source_fn_stack")
    if source:
        return ("source", source[-1][0])
    seq = node.meta.get("seq_nr")
    original = node.meta.get("original_aten")
    if seq is not None and seq >= 0 and original is not None:
        return ("autograd", str(original), seq)
    return ("node", node.name)


def pointwise_blocker(node: fx.Node) -> str | None:
    """Why `node` cannot be part of a generated pointwise kernel, or None."""
    if node.op != "call_function":
        return "not an operation"
    kind = op_kind(node.target)
    if kind not in (OpKind.POINTWISE, OpKind.REDUCTION):
        return f"{op_name(node.target)} is {kind.value} (runs through PyTorch)"
    val = meta(node)
    if val is None:
        return "no tensor metadata"
    if not has_static_shape(val):
        return "dynamic shape (compile with dynamic=False to fuse)"
    tensors = [val] + [meta(a) for a in tensor_inputs(node)]
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} not generated"
        if t.device != val.device:
            return f"inputs on {t.device} and {val.device}"
        if t.layout != torch.strided or not has_static_shape(t):
            return "non-strided or dynamic input"
    if val.device.type not in ("cpu", "cuda"):
        return f"device {val.device.type} has no backend"
    check = (POINTWISE_OPS if kind is OpKind.POINTWISE else REDUCTION_OPS)[node.target].check
    return check(node) if check else None


def group_fallback(inputs: list[fx.Node], outputs: list[fx.Node], members: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule running `members` (nodes of one graph, in graph order) on
    `inputs` and returning `outputs`: a fused group's original ops, its unfused
    path (and a pattern replacement's check)."""
    graph = fx.Graph()
    env = {n: graph.placeholder(f"in{i}") for i, n in enumerate(inputs)}
    needed = set(members)
    for node in members:  # views of members that members read
        for a in node.all_input_nodes:
            chain = a
            while chain not in env and chain not in needed and chain.op == "call_function" and chain.all_input_nodes:
                needed.add(chain)
                chain = chain.args[0]
    for node in members[0].graph.nodes:
        if node in needed and node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(torch.nn.Module(), graph)
