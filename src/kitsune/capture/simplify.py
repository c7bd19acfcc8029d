"""Small rewrites of a captured aten graph before planning.

- `cat` drops inputs with no elements; a `cat` of one tensor becomes a copy
  (`clone`), which fuses with its neighbours. A key/value cache that starts
  empty (transformers' DynamicCache) otherwise costs a separate
  concatenation kernel per layer and per call.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten


def _numel(node) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return int(val.numel())
    except (TypeError, RuntimeError):  # symbolic
        return None


def simplify(gm: fx.GraphModule) -> int:
    """Rewrite gm in place; returns the number of nodes changed."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.cat.default:
            continue
        tensors = list(node.args[0])
        kept = [t for t in tensors if _numel(t) != 0]
        if len(kept) == len(tensors) or not kept:
            continue
        val = node.meta.get("val")
        if len(kept) == 1:
            if not isinstance(val, torch.Tensor) or not val.is_contiguous():
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
