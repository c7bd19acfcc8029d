"""The quantized matmul (`quantized_matmul`, `quantized_matmul_activation` patterns) in the
graph Dynamo hands the backend.

Three things, each a `Rewrite` record so that `explain()` shows what ran:

1. A `kitsune::quantized_linear` call (a `QuantizedLinear`, or the op by hand) stays one
   node: AOTAutograd keeps a custom op whole, so the forward graph runs it as it is (the
   Triton kernel on CUDA, the PyTorch path on the CPU: kitsune.quantize.dispatch). It is
   recorded "applied", its choice naming the kernel of its device.
2. An activation that only reads such a call's result (`F.relu`, `F.gelu` (erf), `F.silu`,
   `torch.relu`, `.relu()`) moves into the op's epilogue (`activation=`).
3. A hand-written dequantise -> linear, `F.linear(x, (w_int.float() - zero) * scale, b)`
   with int8/uint8 `w_int` [N, K], per-row `scale` [N, 1] (and `zero` [N, 1], a scalar
   tensor or a number, or none), computed in float32 and optionally cast to x's dtype at
   the end, becomes `kitsune::quantized_linear` (bits=8, one group a row), which computes
   the same weight: `(q - zero) * scale` in float32 rounded once to x's dtype. Other
   forms (per-group scales by reshapes, other casts) stay as they are, recorded with why.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from kitsune.capture.rewrites import Rewrite, example_value, inherit_source, rewrite_sites
from kitsune.quantize import ops as _ops  # noqa: F401 - registers kitsune::quantized_linear

OP = torch.ops.kitsune.quantized_linear
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu"}
_CASTS = ("float", "to", "half", "bfloat16", "type")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _is_op(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (OP, OP.default)


def fuse_quantized_matmul(gm: fx.GraphModule) -> list[Rewrite]:
    """Rewrite hand-written dequantise -> linear chains into the op, fold activations into
    the op's epilogue, and record every op call of `gm` (a Dynamo graph); in place."""
    records = rewrite_sites(gm, lambda node: node.op == "call_function" and node.target is F.linear,
                            _hand_written, _replace_hand_written, "quantized matmul")
    folded = rewrite_sites(gm, _is_op, _activation_after, _fold_activation, "quantized matmul activation")
    folded = [rw for rw in folded if rw.applied]
    for rw in list(folded):  # a rewritten site whose activation then folded: one place, one record
        made = next((r for r in records if r.applied and r.nodes[-1] == rw.nodes[0]), None)
        if made is not None:
            made.pattern, made.ops, made.choice = rw.pattern, rw.ops, rw.choice
            made.nodes = (*made.nodes, *rw.nodes[1:])
            folded.remove(rw)
    seen = {name for rw in records + folded if rw.applied for name in rw.nodes}
    records += [_record(node) for node in gm.graph.nodes if _is_op(node) and node.name not in seen]
    return records + folded


def _arguments(node: fx.Node) -> dict:
    names = ("x", "codes", "scales", "zeros", "bias", "bits", "group_size", "in_features", "activation")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    return args


def kernel_choice(x, bits, group_size) -> str:
    """What `kitsune::quantized_linear` runs for x (a fake or real tensor), for reports."""
    what = f"kitsune::quantized_linear (int{bits}, group {group_size})"
    device = getattr(getattr(x, "device", None), "type", "cpu")
    if device == "cuda":
        return f"{what}: Triton kernel, dequantised in the prologue, bias and activation in the epilogue"
    return f"{what}: the PyTorch path on {device} (dequantise + F.linear; the Triton kernels need CUDA)"


def _ops(activation: str) -> tuple:
    return ("dequantize", "matmul", "add") + (() if activation in (None, "none") else (activation,))


def _record(node: fx.Node, nodes=None) -> Rewrite:
    args = _arguments(node)
    activation = args.get("activation", "none")
    pattern = "quantized_matmul" if activation == "none" else "quantized_matmul_activation"
    return Rewrite(pattern, _ops(activation), tuple(nodes or (node.name,)),
                   choice=kernel_choice(example_value(args.get("x")), args.get("bits"), args.get("group_size")))


# -- an activation after the op --------------------------------------------------------

def _activation_of(user: fx.Node) -> str | None:
    if user.op == "call_method" and user.target == "relu" and len(user.args) == 1 and not user.kwargs:
        return "relu"
    if user.op != "call_function" or user.target not in _ACTIVATION_FUNCTIONS or len(user.args) != 1:
        return None
    if any(key not in ("approximate", "inplace") for key in user.kwargs) or user.kwargs.get("inplace", False):
        return None
    if user.kwargs.get("approximate", "none") != "none":
        return None  # tanh GELU: not the op's (erf) GELU
    return _ACTIVATION_FUNCTIONS[user.target]


def _activation_after(node: fx.Node):
    """(Rewrite, activation user) when the op's only reader is an activation it can apply."""
    users = list(node.users)
    if len(users) != 1 or _arguments(node).get("activation", "none") != "none":
        return None
    activation = _activation_of(users[0])
    if activation is None:
        return None
    rewrite = _record(node, (node.name, users[0].name))
    rewrite.pattern, rewrite.ops = "quantized_matmul_activation", _ops(activation)
    rewrite.choice += f"; {activation} in the epilogue"
    return rewrite, (users[0], activation)


def _fold_activation(graph: fx.Graph, node: fx.Node, plan) -> None:
    user, activation = plan
    args = list(node.args) + [None] * (9 - len(node.args))
    if "activation" in node.kwargs:
        node.update_kwarg("activation", activation)
    else:
        args[8] = activation
        node.args = tuple(args[:9])
    node.meta["example_value"] = user.meta.get("example_value", node.meta.get("example_value"))
    user.replace_all_uses_with(node)
    graph.erase_node(user)


# -- a hand-written dequantise -> linear ------------------------------------------------

def _cast_source(node):
    """The tensor a float cast (`.float()`, `.to(dtype)`, ...) of an integer tensor reads, or None."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or node.target not in _CASTS:
        return None
    source = node.args[0]
    value = example_value(source)
    return source if value is not None and value.dtype in (torch.int8, torch.uint8) else None


def _operands(node, target):
    """(a, b) of a binary `operator.<target>`/`torch.<target>` call, else None."""
    names = {operator.sub: "sub", torch.sub: "sub", operator.mul: "mul", torch.mul: "mul"}
    if not isinstance(node, fx.Node) or node.op != "call_function" or names.get(node.target) != target:
        return None
    return tuple(node.args) if len(node.args) == 2 and not node.kwargs else None


def _per_row(value, rows) -> bool:
    """A float tensor of one value a row ([N, 1]) or one value (a scalar tensor or [1]/[1, 1])."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    value = example_value(value)
    return value is not None and value.is_floating_point() and (
        value.numel() == 1 or (value.dim() == 2 and tuple(value.shape) == (rows, 1)))


def _dequant_chain(weight):
    """(codes node, zero or None, scale node, chain nodes from the weight back) of
    `(cast(codes) - zero) * scale` with an optional final cast; or a reason string."""
    nodes = []
    if isinstance(weight, fx.Node) and weight.op == "call_method" and weight.target in _CASTS:
        nodes.append(weight)
        weight = weight.args[0]
    found = _operands(weight, "mul")
    if found is None:
        return "the weight is not (codes - zero) * scale"
    nodes.append(weight)
    left, scale = found
    if _cast_source(left) is None and _operands(left, "sub") is None:
        left, scale = scale, left
    zero, cast = None, left
    if _operands(left, "sub") is not None:
        nodes.append(left)
        cast, zero = _operands(left, "sub")
    codes = _cast_source(cast)
    if codes is None:
        return "the dequantised tensor is not a cast of an int8/uint8 tensor"
    nodes.append(cast)
    if example_value(cast).dtype != torch.float32 or example_value(weight).dtype != torch.float32:
        return "the dequantisation is not computed in float32"
    rows = example_value(codes).shape[0]
    if not isinstance(scale, fx.Node) or not _per_row(scale, rows) or (zero is not None and not _per_row(zero, rows)):
        return "scale or zero point is not one value per output row"
    return codes, zero, scale, nodes


def _reads_integer_cast(node, depth: int = 4) -> bool:
    """Does `node` read, within `depth` producers, a float cast of an int8/uint8 tensor?"""
    if not isinstance(node, fx.Node) or depth == 0:
        return False
    return _cast_source(node) is not None or any(_reads_integer_cast(a, depth - 1) for a in node.all_input_nodes)


def _hand_written(linear: fx.Node):
    """(Rewrite, plan) for a linear whose weight is dequantised from an integer tensor; None
    for any other linear."""
    args = dict(zip(("input", "weight", "bias"), linear.args))
    args.update(linear.kwargs)
    weight, x = args.get("weight"), example_value(args.get("input"))
    chain = _dequant_chain(weight)
    if isinstance(chain, str):
        if not _reads_integer_cast(weight):
            return None  # an ordinary linear
        return Rewrite("quantized_matmul", ("dequantize", "matmul"), (linear.name,), applied=False,
                       reason=chain), None
    codes, zero, scale, nodes = chain
    names = tuple(n.name for n in reversed(nodes)) + (linear.name,)
    if x is None or x.dtype not in _FLOATS or example_value(weight).dtype != x.dtype:
        return Rewrite("quantized_matmul", ("dequantize", "matmul"), names, applied=False,
                       reason="the dequantised weight's dtype is not the input's"), None
    plan = (args["input"], codes, zero, scale, args.get("bias"), x.shape[-1], nodes)
    return Rewrite("quantized_matmul", ("dequantize", "matmul"), names, choice=kernel_choice(x, 8, x.shape[-1])), plan


def _replace_hand_written(graph: fx.Graph, linear: fx.Node, plan) -> fx.Node:
    x, codes, zero, scale, bias, width, chain = plan
    rows = example_value(codes).shape[0]
    with graph.inserting_before(linear):
        scales = _as_rows(graph, scale, rows)
        if zero is None and example_value(codes).dtype == torch.uint8:
            zero = 0.0  # uint8 codes without a zero point: an explicit zero of 0 (the op's default is 128)
        if zero is None:
            zeros = None
        elif isinstance(zero, fx.Node):
            zeros = _as_rows(graph, zero, rows)
        else:
            zeros = graph.call_function(torch.full_like, (scales, float(zero)))
        node = graph.call_function(OP.default, (x, codes, scales, zeros, bias, 8, width, width, "none"))
    inherit_source(node, linear)  # the op's own user-op name: the planner must not see a float linear here
    if "example_value" in linear.meta:
        node.meta["example_value"] = linear.meta["example_value"]
    linear.replace_all_uses_with(node)
    graph.erase_node(linear)
    for dead in chain:  # the dequantised weight, where nothing else reads it
        if not dead.users:
            graph.erase_node(dead)
    return node


def _as_rows(graph: fx.Graph, value: fx.Node, rows: int) -> fx.Node:
    """`value` (one value a row, or one value) as a float32 [rows, 1] tensor."""
    node = graph.call_method("reshape", (value, -1, 1))
    node = graph.call_method("expand", (node, rows, 1))
    return graph.call_method("to", (node, torch.float32))
