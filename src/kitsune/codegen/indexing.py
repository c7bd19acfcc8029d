"""Lowerings of the ops that move elements: each output element is an input
element read at another place, chosen by index arithmetic or by a value.

`cat`, `constant_pad_nd`, `slice_scatter`, `select_scatter` and `arange` need
only index arithmetic: a consumer in the same kernel reads the pieces at its
own coordinates, so `cat([-x2, x1])` of a rotary embedding is a select between
two reads, never a tensor. The reads of a piece that is not selected at an
element are masked (`load_where`): no address outside a tensor is touched.

`embedding`, `index.Tensor` and `index_select` read at a position that is a
value (an indirect load). The position is checked as eager checks it
(`check_index`): out of range is eager's error, never a silent value. The
tensor read this way must come from memory (`OpDef.indexed`): a position that
is only known per element cannot address a value computed in registers.

Each lowering is `(lowering, node, idx) -> Value`, `idx` the node's logical
index (one `Index` per dimension); `lowering.value_at(arg, idx)` is any
argument's value at any index, `lowering.read_at(tensor, coords)` an
indirect read.
"""
from __future__ import annotations

import torch
from torch import fx

from kitsune.ir.graph import meta
from kitsune.ir.index import Index
from kitsune.ir.ops import NotFusible, aten, arange_arguments, norm_dim
from kitsune.ir.scalar import Value, call, cast, check_index, const, coordinate, where
from kitsune.sizes import is_symbolic, shape_of


def _arg(node: fx.Node, position: int, name: str, default=None):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _static(value, what: str) -> int:
    if is_symbolic(value):
        raise NotFusible(f"{what} is symbolic ({value}): not generated yet")
    return int(value)


def _between(c: Value, lo, hi) -> Value | None:
    """lo <= c < hi as a bool Value; None where it always holds (a bound of None is open)."""
    terms = []
    if lo is not None:
        terms.append(call("ge", c, const(lo, torch.int64)))
    if hi is not None:
        terms.append(call("lt", c, const(hi, torch.int64)))
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else terms[0] & terms[1]


def _and(a: Value | None, b: Value | None) -> Value | None:
    return b if a is None else a if b is None else a & b


def lower_cat(lowering, node: fx.Node, idx: tuple) -> Value:
    """cat(tensors, dim): piece k where its range along `dim` holds, read at
    the coordinate less the sizes before it (type promotion as eager's)."""
    out = meta(node)
    dim = norm_dim(_arg(node, 1, "dim", 0), out.dim())
    # eager skips legacy empty 1-d pieces (shape [0]) whatever the other ranks
    pieces = [t for t in node.args[0] if not (meta(t).dim() == 1 and shape_of(meta(t))[0] == 0 and out.dim() > 1)]
    c = coordinate(idx[dim])
    chosen, offset = [], 0
    for k, piece in enumerate(pieces):
        size = shape_of(meta(piece))[dim]
        last = k == len(pieces) - 1
        live = _between(c, offset if k else None, None if last else offset + size)
        piece_idx = idx[:dim] + (idx[dim] + (-offset),) + idx[dim + 1:]
        value = cast(lowering.value_at(piece, piece_idx), out.dtype)
        chosen.append((None if last else call("lt", c, const(offset + size, torch.int64)),
                       lowering.masked(value, live)))
        offset = offset + size
    result = chosen[-1][1]
    for upper, value in reversed(chosen[:-1]):
        result = where(upper, value, result)
    return result


def lower_constant_pad_nd(lowering, node: fx.Node, idx: tuple) -> Value:
    """constant_pad_nd(x, pad, value): pad[2j], pad[2j + 1] pad the j-th dim from
    the end before and after (negative: crop); `value` outside the input."""
    source, pad = node.args[0], list(node.args[1])
    fill = _arg(node, 2, "value", 0)
    out = meta(node)
    in_shape = shape_of(meta(source))
    src_idx, live = list(idx), None
    for j in range(len(pad) // 2):
        d = out.dim() - 1 - j
        before, after = _static(pad[2 * j], "a pad"), _static(pad[2 * j + 1], "a pad")
        src_idx[d] = idx[d] + (-before)
        c = coordinate(idx[d])
        live = _and(live, _between(c, before if before > 0 else None,
                                   before + in_shape[d] if after > 0 else None))
    value = cast(lowering.value_at(source, tuple(src_idx)), out.dtype)
    if live is None:
        return value
    return where(live, lowering.masked(value, live), const(fill, out.dtype))


def _slice_bounds(size: int, start, end, step: int) -> tuple[int, int]:
    start = 0 if start is None else _static(start, "a slice start")
    end = size if end is None else _static(end, "a slice end")
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, start), size)
    return start, end


def lower_slice_scatter(lowering, node: fx.Node, idx: tuple) -> Value:
    """slice_scatter(self, src, dim, start, end, step): src where the
    coordinate is in the slice, self elsewhere."""
    base, src = node.args[0], node.args[1]
    out = meta(node)
    dim = norm_dim(_arg(node, 2, "dim", 0), out.dim())
    step = _static(_arg(node, 5, "step", 1), "a slice step")
    start, end = _slice_bounds(_static(shape_of(out)[dim], "a scattered dimension"),
                               _arg(node, 3, "start"), _arg(node, 4, "end"), step)
    c = coordinate(idx[dim])
    live = _between(c, start, end)
    live = const(True, torch.bool) if live is None else live
    if step != 1:
        live = live & call("eq", call("fmod", c - start, const(step, torch.int64)), const(0, torch.int64))
    src_idx = idx[:dim] + ((idx[dim] + (-start)).floordiv(step),) + idx[dim + 1:]
    inserted = lowering.masked(cast(lowering.value_at(src, src_idx), out.dtype), live)
    return where(live, inserted, cast(lowering.value_at(base, idx), out.dtype))


def lower_select_scatter(lowering, node: fx.Node, idx: tuple) -> Value:
    """select_scatter(self, src, dim, index): src at coordinate `index` along dim."""
    base, src = node.args[0], node.args[1]
    out = meta(node)
    dim = norm_dim(node.args[2], out.dim())
    size = _static(shape_of(out)[dim], "a scattered dimension")
    position = _static(node.args[3], "a select index")
    position = position + size if position < 0 else position
    live = call("eq", coordinate(idx[dim]), const(position, torch.int64))
    inserted = cast(lowering.value_at(src, idx[:dim] + idx[dim + 1:]), out.dtype)
    return where(live, inserted, cast(lowering.value_at(base, idx), out.dtype))


def lower_arange(lowering, node: fx.Node, idx: tuple) -> Value:
    """arange: start + i * step, computed in int64 and converted (the check
    `arange_blocker` admits only values every dtype holds exactly)."""
    start, _, step = arange_arguments(node)
    value = coordinate(idx[0])
    if step != 1:
        value = value * const(step, torch.int64)
    if start != 0:
        value = value + const(start, torch.int64)
    return cast(value, meta(node).dtype)


def lower_embedding(lowering, node: fx.Node, idx: tuple) -> Value:
    """embedding(weight, indices): weight[indices[i...], j] (eager raises on a
    position outside the table, negative ones included)."""
    weight, indices = node.args[0], node.args[1]
    rows = shape_of(meta(weight))[0]
    position = check_index(cast(lowering.value_at(indices, idx[:-1]), torch.int64), rows)
    return lowering.read_at(weight, [position, idx[-1]])


def lower_index_select(lowering, node: fx.Node, idx: tuple) -> Value:
    """index_select(x, dim, index): x read at index[i] along dim (no negative positions)."""
    source, index = node.args[0], node.args[2]
    out = meta(node)
    dim = norm_dim(node.args[1], max(out.dim(), 1))
    if out.dim() == 0:
        return lowering.read_at(source, [])
    index_idx = (idx[dim],) if meta(index).dim() == 1 else ()
    position = check_index(cast(lowering.value_at(index, index_idx), torch.int64),
                           shape_of(meta(source))[dim] if meta(source).dim() else 1)
    coords = list(idx)
    coords[dim] = position
    return lowering.read_at(source, coords)


def lower_index(lowering, node: fx.Node, idx: tuple) -> Value:
    """x[i0, :, i2] (aten.index.Tensor): the index tensors broadcast together;
    their dims stand where the indexed dims were if those are adjacent, else
    first (numpy's rule). Negative positions count from the end."""
    source, indices = node.args[0], list(node.args[1])
    in_shape = shape_of(meta(source))
    indexed = [d for d, t in enumerate(indices) if t is not None]
    shapes = [shape_of(meta(indices[d])) for d in indexed]
    b_shape = broadcast_shape(shapes)
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
    first = indexed[0] if adjacent else 0
    b_idx = idx[first:first + len(b_shape)]
    rest = iter(idx[:first] + idx[first + len(b_shape):])
    coords = []
    for d in range(len(in_shape)):
        if d in indexed:
            t_shape = shapes[indexed.index(d)]
            lead = len(b_shape) - len(t_shape)
            t_idx = tuple(Index.constant(0) if t_shape[j] == 1 else b_idx[lead + j] for j in range(len(t_shape)))
            position = cast(lowering.value_at(indices[d], t_idx), torch.int64)
            position = where(call("lt", position, const(0, torch.int64)), position + const(in_shape[d], torch.int64),
                             position)
            coords.append(check_index(position, in_shape[d]))
        else:
            coords.append(next(rest))
    return lowering.read_at(source, coords)


def broadcast_shape(shapes) -> tuple:
    """The broadcast of shapes whose sizes may be symbolic (the graph's fake
    tensors already passed eager's broadcasting: a size is 1 or the size)."""
    rank = max(len(shape) for shape in shapes)
    result = []
    for d in range(rank):
        sizes = [shape[d - rank + len(shape)] for shape in shapes if d - rank + len(shape) >= 0]
        result.append(next((size for size in sizes if not (not is_symbolic(size) and size == 1)), 1))
    return tuple(result)


INDEXING_LOWERINGS = {
    aten.cat.default: lower_cat,
    aten.constant_pad_nd.default: lower_constant_pad_nd,
    aten.slice_scatter.default: lower_slice_scatter,
    aten.select_scatter.default: lower_select_scatter,
    aten.arange.default: lower_arange,
    aten.arange.start: lower_arange,
    aten.arange.start_step: lower_arange,
    aten.embedding.default: lower_embedding,
    aten.index.Tensor: lower_index,
    aten.index_select.default: lower_index_select,
}

__all__ = ["INDEXING_LOWERINGS"]
