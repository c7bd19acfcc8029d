"""What does not fuse runs as aten ops, not as decomposition leftovers.

Capture decomposes `var`, `var_mean` (and so `layer_norm`, `group_norm`)
through PyTorch's Python references (`torch._refs`), which leave `prims.*`
calls in the aten graph: `prims.var`, `prims.sum`, `prims.div`,
`prims.broadcast_in_dim`. A fused kernel computes such nodes; one that does
not fuse runs as captured, and eager PyTorch runs a prim through the custom-op
machinery, its meta function and then, in Python, the aten op(s) that
implement it: `prims.broadcast_in_dim` 140 µs against `unsqueeze`'s 1.7 µs,
`prims.var` 71 µs against `aten.var`'s 6 µs (CPU, tiny tensors). A graph that
does not fuse was then many times slower than eager.

`restore_aten(gm)` rewrites every prim call of a graph into the aten op(s)
that the prim's own implementation (`prim.impl_aten`) calls with the same
arguments, so each result is the same tensor (values, dtype, shape, strides).
Run it on the graph that runs, once the fused groups are kernel calls: every
node left is one PyTorch runs. A prim without a rule below calls its
`impl_aten` directly: the same computation, without the custom-op dispatch and
the meta check (which passed when the graph was traced).
"""
from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
from torch import fx

from kitsune import _compat

log = logging.getLogger("kitsune")

aten, prims = torch.ops.aten, torch.ops.prims


class _Emitter:
    """Inserts aten calls before a prim node, each with its `val` (the op run on
    the fake values of its inputs), and can take them out again."""

    def __init__(self, graph: fx.Graph, node: fx.Node):
        self.graph, self.node, self.made = graph, node, []

    def call(self, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
        kwargs = kwargs or {}
        with self.graph.inserting_before(self.node):
            made = self.graph.call_function(target, args, kwargs)
        self.made.append(made)
        val = _fake_result(target, args, kwargs)
        if val is not None:
            made.meta["val"] = val
        return made

    def undo(self) -> None:
        for made in reversed(self.made):
            self.graph.erase_node(made)


def _fake_result(target, args, kwargs):
    """`target` run on the fake values of its fx arguments (None if any is missing)."""
    missing = []

    def value(a):
        if not isinstance(a, fx.Node):
            return a
        if "val" not in a.meta:
            missing.append(a)
        return a.meta.get("val")
    args, kwargs = fx.node.map_aggregate(args, value), fx.node.map_aggregate(kwargs, value)
    if missing:
        return None
    return target(*args, **kwargs)


# -- rules: prim node -> the aten node computing its result, or None (no rule applies) --------


def _broadcast_in_dim(emit: _Emitter, a, shape, broadcast_dimensions):
    """`_broadcast_in_dim_aten`: an unsqueeze per dimension not broadcast from `a`, then expand."""
    result = a
    for dim in range(len(shape)):
        if dim not in broadcast_dimensions:
            result = emit.call(aten.unsqueeze.default, (result, dim))
    val = result.meta.get("val") if result is not a else None
    static = val is not None and all(isinstance(s, int) for s in (*shape, *val.shape))  # no guard on a SymInt
    if static and list(val.shape) == list(shape):
        return result  # a keepdim row result (layer_norm's mean): the expand would change nothing
    return emit.call(aten.expand.default, (result, shape))


def _var(emit: _Emitter, inp, dims, correction=1, *, output_dtype=None):
    """`torch_var`: torch.var(inp, dim=dims, correction=correction)."""
    if output_dtype is not None:
        return None  # torch.var takes no dtype: the prim's own implementation raises
    return emit.call(aten.var.correction, (inp, dims), {"correction": correction})


def _sum(emit: _Emitter, inp, dims, *, output_dtype=None):
    """torch.sum(inp, dims)."""
    if output_dtype is not None:
        return None
    return emit.call(aten.sum.dim_IntList, (inp, dims))


def _div(emit: _Emitter, a, b):
    """`_div_aten`: truncating division of integers, true division otherwise."""
    val = a.meta.get("val") if isinstance(a, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None  # a scalar numerator: the prim's own implementation runs
    integer = not (val.dtype.is_floating_point or val.dtype.is_complex or val.dtype == torch.bool)
    if integer:  # integer division truncates
        return emit.call(aten.div.Tensor_mode, (a, b), {"rounding_mode": "trunc"})
    return emit.call(aten.div.Tensor, (a, b))


def _convert_element_type(emit: _Emitter, a, dtype):
    """`_convert_element_type_aten`: empty_like(a, dtype) filled by a copy, as `_to_copy` does."""
    return emit.call(aten._to_copy.default, (a,), {"dtype": dtype})


# The prims that capture leaves in real graphs (LayerNorm, GroupNorm, var, GPT-2, BERT:
# torch 2.13), and the one the planner treats as free (a dtype conversion).
RULES: dict[object, Callable] = {
    prims.broadcast_in_dim.default: _broadcast_in_dim,
    prims.var.default: _var,
    prims.sum.default: _sum,
    prims.div.default: _div,
    prims.convert_element_type.default: _convert_element_type,
}


def is_prim(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, _compat.OpOverload) and \
        node.target.namespace == "prims"


def _on_meta_device(node: fx.Node) -> bool:
    """A factory prim asked for meta tensors answers with its meta function, not impl_aten."""
    found = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda a: found.append(a) if isinstance(
        a, torch.device) and a.type == "meta" else None)
    return bool(found)


def _restore(graph: fx.Graph, node: fx.Node) -> bool:
    """Rewrite one prim node; False when it stays as it is."""
    rule = RULES.get(node.target)
    emit = _Emitter(graph, node)
    try:
        result = rule(emit, *node.args, **node.kwargs) if rule is not None else None
    except Exception as error:  # noqa: BLE001 - a rule that fails leaves the prim to impl_aten below
        emit.undo()
        log.debug("%s: no aten rewrite (%s: %s); its aten implementation runs", node.name,
                  type(error).__name__, error)
        result = None
    if result is not None:
        result.meta = {**node.meta, **({"val": result.meta["val"]} if "val" in result.meta else {})}
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        return True
    impl = getattr(node.target, "impl_aten", None)
    if impl is None or _on_meta_device(node):
        return False
    node.target = impl
    return True


def restore_aten(gm: fx.GraphModule) -> int:
    """Rewrite every `prims.*` call of `gm` into the aten op(s) its implementation
    calls (or into that implementation); returns how many changed. A node whose
    rewrite fails stays as it is."""
    changed = sum(_restore(gm.graph, node) for node in list(gm.graph.nodes) if is_prim(node))
    if changed:
        gm.recompile()
    return changed


def restored_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with its prims restored (`restore_aten`), or `gm` itself when
    it has none or the copy fails (it then runs as captured)."""
    if not any(map(is_prim, gm.graph.nodes)):
        return gm
    try:
        restored = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        restore_aten(restored)
        return restored
    except Exception as error:  # noqa: BLE001 - never break a graph that runs
        log.warning("prims.* ops run as captured (slower than eager): %s: %s",
                    type(error).__name__, error)
        return gm
