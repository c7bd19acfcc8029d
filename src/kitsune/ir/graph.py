"""Facts about the nodes of a captured aten FX graph, as the planner sees them.

Kitsune keeps the FX graph as its graph IR: each `call_function` node's kind
comes from the op table, its shape/strides/dtype from the fake tensor in
`node.meta["val"]` that capture records. This module answers the questions
the planner and the lowering ask of a node.
"""
from __future__ import annotations


import torch
from torch import fx

from kitsune.ir.ops import POINTWISE_OPS, REDUCTION_OPS, VIEW_OPS, NotFusible, OpKind, op_kind, op_name
from kitsune.ir.scalar import SUPPORTED_DTYPES
from kitsune.sizes import as_size, numel_of, renderable, shape_of, strides_of


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


def numel(node):
    """Elements of the node's tensor: an int, or a sympy expression of symbolic sizes."""
    return numel_of(meta(node))


def has_generated_shape(val: torch.Tensor) -> bool:
    """Sizes and strides the code generators can write: ints, or sums and
    products of symbolic sizes (not unbacked sizes or divided ones)."""
    try:
        sizes = (*shape_of(val), *strides_of(val))
    except (TypeError, ValueError, AttributeError):
        return False
    return all(renderable(s) for s in sizes) and not any(
        getattr(s, "name", "").startswith("u") for v in sizes for s in getattr(v, "free_symbols", ()))


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
    if not has_generated_shape(val):
        return "symbolic size the kernels cannot take (unbacked, or a divided size)"
    tensors = [val] + [meta(a) for a in tensor_inputs(node)]
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} not generated"
        if t.device != val.device:
            return f"inputs on {t.device} and {val.device}"
        if t.layout != torch.strided or not has_generated_shape(t):
            return "non-strided input, or one with a symbolic size the kernels cannot take"
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
            for a in node.all_input_nodes:
                if a not in env and isinstance(a.meta.get("val"), torch.SymInt):
                    env[a] = _size_of_input(graph, a, inputs, env)
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(torch.nn.Module(), graph)


def size_inputs(members: list[fx.Node], inputs: list[fx.Node], symbols) -> list[fx.Node]:
    """The graph's symbolic-size nodes (SymInt placeholders, `sym_size` results) a
    group's call must also take: those its ops read (a view's target shape) and
    those of `symbols` (names, a spec's `sizes`) that are no dimension of a tensor input. Empty for static
    shapes."""
    found: dict[fx.Node, None] = {}
    seen = set(inputs)
    stack = list(members)
    while stack:  # the members and the view chains they read through
        node = stack.pop()
        for a in node.all_input_nodes:
            if isinstance(a.meta.get("val"), torch.SymInt):
                found[a] = None
            elif a not in seen and is_view(a):
                seen.add(a)
                stack.append(a)
    dims = {getattr(s, "name", None) for n in inputs if meta(n) is not None for s in shape_of(meta(n))}
    missing = {s for s in symbols if s not in dims}
    if missing:
        for node in members[0].graph.nodes:
            val = node.meta.get("val")
            name = getattr(as_size(val), "name", None) if isinstance(val, torch.SymInt) else None
            if name in missing:
                found[node] = None
                missing.discard(name)
    return list(found)


def _size_of_input(graph: fx.Graph, size: fx.Node, inputs: list[fx.Node], env: dict) -> fx.Node:
    """A symbolic size a member reads (a view's target shape), read from the first
    input tensor that has it as a dimension: the group's ops take only tensors."""
    wanted = as_size(size.meta["val"])
    for i, n in enumerate(inputs):
        val = meta(n)
        if val is None:
            continue
        for d, s in enumerate(shape_of(val)):
            if s == wanted:
                return graph.call_function(torch.ops.aten.sym_size.int, (env[n], d))
    raise NotFusible(f"size {size.name} = {wanted} is not the size of any input of the group")
