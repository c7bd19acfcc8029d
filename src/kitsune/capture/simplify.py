"""Small rewrites of a captured aten graph before planning.

- `cat` drops inputs with no elements; a `cat` of one tensor becomes a copy
  (`clone`), which fuses with its neighbours. A key/value cache that starts
  empty (transformers' DynamicCache) otherwise costs a separate
  concatenation kernel per layer and per call.
- a permute of a permute becomes one permute of the source, or the source
  itself when the two cancel (AOTAutograd's backward transposes transposed
  weights: `permute(permute(w, [1, 0]), [1, 0])`, and returns weight
  gradients as `permute(permute(mm))`); every op left in the graph costs host
  time at each call.
- a reduction over a permuted view reduces the source over the matching
  dims, when the dims it keeps stay in the source's order (so the result
  needs no permute): `exp(x).permute(2, 0, 1).sum(0)` is `exp(x).sum(2)`,
  whose producer then has the reduced shape and fuses with it (the planner
  groups a reduction with producers of its own iteration space only). Only
  when every user of the permute is such a reduction: a norm whose pointwise
  part reads the permuted view (timm's LayerNorm2d on a channels-last tensor:
  permute, layer_norm over the last dim, permute back) keeps its sums in the
  permuted space, so that the norm is one frame and one kernel; moved to the
  source, they left two kernels with the row statistics between them.
- results nobody reads are dropped (a graph traced by hand, `make_fx`, keeps
  them; a group of them would have no output to lower), except random ops:
  removing one would shift the random numbers of those after it.
"""
from __future__ import annotations

import torch
from torch import fx

from kitsune.sizes import is_dense, numel_of

aten = torch.ops.aten


def _numel(node):
    """Elements of the node's tensor: an int, a sympy expression of symbolic sizes
    (`int()` of a SymInt would add a guard), or None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return numel_of(val)


def _fold_permutes(gm: fx.GraphModule) -> int:
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.permute.default:
            continue
        inner = node.args[0]
        if not (isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target is aten.permute.default):
            continue
        ndim = len(node.args[1])
        outer = [d % ndim for d in node.args[1]]
        first = [d % ndim for d in inner.args[1]]
        composed = [first[d] for d in outer]
        source = inner.args[0]
        if any(user.op == "output" for user in node.users) and (
                not isinstance(source, fx.Node) or source.op == "placeholder" or composed != list(range(ndim))):
            # an output that is the computed tensor itself can be returned as
            # it is (same strides); one that aliases an input keeps the view
            # AOTAutograd traced
            continue
        if composed == list(range(ndim)):
            node.replace_all_uses_with(source)
        else:
            with gm.graph.inserting_before(node):
                single = gm.graph.call_function(aten.permute.default, (source, composed))
            single.meta = dict(node.meta)
            node.replace_all_uses_with(single)
        gm.graph.erase_node(node)
        changed += 1
    return changed


# reductions whose second argument is the list of reduced dims -> the position
# of their keepdim argument (None: a keyword, or no keepdim at all)
_DIM_REDUCTIONS = {getattr(getattr(ns, op), overload): keepdim for ns, op, overload, keepdim in (
    (aten, "sum", "dim_IntList", 2), (aten, "mean", "dim", 2), (aten, "amax", "default", 2),
    (aten, "amin", "default", 2), (aten, "var", "correction", None), (aten, "std", "correction", None),
    (aten, "logsumexp", "default", 2), (aten, "any", "dims", 2), (aten, "all", "dims", 2),
    (torch.ops.prims, "var", "default", None), (torch.ops.prims, "sum", "default", None),
    (torch.ops.prims, "amax", "default", None), (torch.ops.prims, "amin", "default", None))
    if hasattr(getattr(ns, op), overload)}


def _reduce_through_permutes(gm: fx.GraphModule) -> int:
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _DIM_REDUCTIONS or len(node.args) < 2:
            continue
        view, dims = node.args[0], node.args[1]
        if not (isinstance(view, fx.Node) and view.op == "call_function" and view.target is aten.permute.default
                and isinstance(dims, (list, tuple)) and dims):
            continue
        if any(user.target not in _DIM_REDUCTIONS for user in view.users):
            continue  # the permuted space stays (a norm's pointwise part reads it): reduce in it too
        source = view.args[0]
        val = node.meta.get("val")
        source_val = source.meta.get("val") if isinstance(source, fx.Node) else None
        if not isinstance(val, torch.Tensor) or not isinstance(source_val, torch.Tensor):
            continue
        ndim = len(view.args[1])
        order = [d % ndim for d in view.args[1]]
        reduced = {d % ndim for d in dims}
        kept = [order[i] for i in range(ndim) if i not in reduced]
        if kept != sorted(kept):
            continue  # the result would need a permute of its own
        args = (source, sorted(order[d] for d in reduced), *node.args[2:])
        position = _DIM_REDUCTIONS[node.target]
        keepdim = node.args[position] if position is not None and len(node.args) > position \
            else node.kwargs.get("keepdim", False)
        try:
            new_val = node.target(source_val, *args[1:], **node.kwargs)
        except Exception:  # noqa: BLE001 - no metadata, no rewrite
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(node.target, args, dict(node.kwargs))
            new.meta = {**node.meta, "val": new_val}
            if keepdim:  # the size-1 dims move: a view of the contiguous result
                new_val = new_val.view(val.shape)
                new = gm.graph.call_function(aten.view.default, (new, list(val.shape)))
                new.meta = {**node.meta, "val": new_val}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed += 1
    return changed


def _keeps(node: fx.Node) -> bool:
    """A node kept although nothing reads it: side effects, or random numbers drawn."""
    if node.is_impure():
        return True
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _drop_dead(gm: fx.GraphModule) -> int:
    before = len(gm.graph.nodes)
    if gm.graph.eliminate_dead_code(is_impure_node=_keeps):
        gm.recompile()
    return before - len(gm.graph.nodes)


def simplify(gm: fx.GraphModule) -> int:
    """Rewrite gm in place; returns the number of nodes changed."""
    changed = _drop_dead(gm)
    changed += _fold_permutes(gm)
    changed += _reduce_through_permutes(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.cat.default:
            continue
        tensors = list(node.args[0])
        kept = [t for t in tensors if _numel(t) != 0]
        if len(kept) == len(tensors) or not kept:
            continue
        val = node.meta.get("val")
        if len(kept) == 1:
            if not isinstance(val, torch.Tensor) or not is_dense(val):
                continue
            with gm.graph.inserting_before(node):
                copy = gm.graph.call_function(aten.clone.default, (kept[0],),
                                              {"memory_format": torch.contiguous_format})
        else:
            with gm.graph.inserting_before(node):
                copy = gm.graph.call_function(aten.cat.default, (kept, *node.args[1:]), dict(node.kwargs))
        copy.meta = dict(node.meta)
        node.replace_all_uses_with(copy)
        gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed
