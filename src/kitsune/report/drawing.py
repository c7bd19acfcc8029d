"""The captured graph as SVG, for the HTML report (`kitsune.report.html`).

Nodes are drawn top to bottom in an order where every fusion group is contiguous
(`_order`), each group boxed in its colour; edges are arcs on the left, views and
getitems folded into them. A block repeated back to back (same ops, shapes and
kernel structures: a model's identical layers) is drawn once, marked ×N, and its
other instances take one row, so GPT-2's twelve layers draw as one.
"""
from __future__ import annotations

import html

from kitsune.ir.ops import OpKind
from kitsune.planner.units import is_kernel, node_kind, tensor_vals
from kitsune.report.repeats import node_signature, structure_of, tandem_repeats


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _visible(node) -> bool:
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    return node.op == "call_function" and node_kind(node) is not OpKind.VIEW


def _source_of(node, visible):
    """The visible node a (possibly view/getitem) input stands for."""
    seen = 0
    while node not in visible and node.op == "call_function" and node.all_input_nodes and seen < 64:
        node = node.all_input_nodes[0]
        seen += 1
    return node if node in visible else None


def _order(record, group_of):
    """Graph order with each group contiguous (groups placed at their last member's slot when legal)."""
    from kitsune.ir.graph import is_view, view_root

    nodes = [n for n in record.graph.nodes]
    position = {n: i for i, n in enumerate(nodes)}
    group_of = dict(group_of)
    for n in nodes:  # views of a member are folded into the kernel: they belong to its group
        if is_view(n) and n.name not in group_of and view_root(n).name in group_of:
            group_of[n.name] = group_of[view_root(n).name]
    units, unit_of = [], {}
    for n in nodes:
        key = group_of.get(n.name, n)
        if key not in unit_of:
            unit_of[key] = len(units)
            units.append([])
        units[unit_of[key]].append(n)
    deps = [set() for _ in units]
    for i, members in enumerate(units):
        for n in members:
            for a in n.all_input_nodes:
                j = unit_of[group_of.get(a.name, a)]
                if j != i:
                    deps[i].add(j)
    import heapq
    users = [[] for _ in units]
    pending = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    def priority(i):  # inputs are drawn next to their first user, not all at the top
        first = units[i][0]
        if first.op in ("placeholder", "get_attr") and first.users:
            return min(position[u] for u in first.users) - 0.5
        return position[first]

    ready = [(priority(i), i) for i, k in enumerate(pending) if k == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.extend(units[i])
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, (priority(u), u))
    return order if len(order) == len(nodes) else nodes


def _node_label(node, units) -> tuple[str, str]:
    vals = tensor_vals(node)
    shape = "×".join(str(s) for s in vals[0].shape) if vals else ""
    dtype = str(vals[0].dtype).replace("torch.", "") if vals else ""
    if node.op == "call_function":
        target = getattr(node.target, "__name__", str(node.target)).replace(".default", "")
        unit = units.unit_of.get(node) if units is not None else None
        op = f"{target}" + (f"  ({unit.name})" if unit is not None and unit.name not in target else "")
    else:
        op = node.op
    return f"{node.name}: {op}", f"[{shape}] {dtype}" if shape or dtype else ""


class _Hidden:
    """The instances 2..N of a block repeated back to back: one row of the drawing."""

    def __init__(self, nodes, period: int, count: int):
        self.nodes, self.period, self.count = nodes, period, count


_INPUTS = ("placeholder", "get_attr")


def _repeated_ranges(record, order, group_of) -> dict:
    """start -> (end of the first instance, end of the last, period, count): index ranges
    of `order` (ends inclusive) where a block of operations repeats back to back.

    Blocks are compared on their operations only (op, shapes, dtypes, the structure of
    their kernel): inputs are drawn next to their first user, so the model's input
    sits inside the first layer but not in the others, which are otherwise the same."""
    structure = {kernel: structure_of(record, kernel, names) for kernel, names, _ in record.groups}
    compute = [i for i, n in enumerate(order) if n.op not in _INPUTS]
    signature = [(node_signature(order[i]), structure.get(group_of.get(order[i].name))) for i in compute]
    ranges, claimed = {}, 0
    for start, period, count in tandem_repeats(signature):
        begin = compute[start]
        while begin > claimed and order[begin - 1].op in _INPUTS:
            begin -= 1  # the first instance's own inputs
        last = compute[start + period * count - 1]
        ranges[begin] = (compute[start + period - 1], last, period, count)
        claimed = last + 1
    return ranges


def _layout(record, order, group_of) -> tuple[list, dict, list]:
    """Rows of the drawing: the nodes in `order`, each block repeated back to back
    drawn once and followed by one row for its other instances.
    Returns (rows, node -> row, [(first row, hidden row, period, count)])."""
    repeats = _repeated_ranges(record, order, group_of)
    rows, row_of, blocks, i = [], {}, [], 0
    while i < len(order):
        if i not in repeats:
            row_of[order[i]] = len(rows)
            rows.append(order[i])
            i += 1
            continue
        first_end, last, period, count = repeats[i]
        first = len(rows)
        for n in order[i:first_end + 1]:
            row_of[n] = len(rows)
            rows.append(n)
        hidden = order[first_end + 1:last + 1]
        for n in hidden:
            row_of[n] = len(rows)
        blocks.append((first, len(rows), period, count))
        rows.append(_Hidden(hidden, period, count))
        i = last + 1
    return rows, row_of, blocks


def graph_svg(record, gid: int, colors: dict, group_ids: dict) -> str:
    group_of = {}
    for kernel, names, _ in record.groups:
        for name in names:
            group_of[name] = kernel
    order = [n for n in _order(record, group_of) if _visible(n)]
    rows, row_of, blocks = _layout(record, order, group_of)
    geo = {"h": 18, "top": 10, "gutter": 170, "box_x": 180, "box_w": 430}
    height = geo["top"] * 2 + geo["h"] * len(rows)
    width = geo["box_x"] + geo["box_w"] + 260
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">']
    parts += _block_marks(blocks, geo, width)
    parts += _group_boxes(rows, group_of, colors, group_ids, geo)
    parts += _edges(order, row_of, rows, group_of, colors, geo)
    for i, item in enumerate(rows):
        if isinstance(item, _Hidden):
            parts.append(_hidden_row(item, i, gid, geo))
        else:
            parts.append(_node_row(record, item, i, gid, group_of, colors, geo))
    parts.append("</svg>")
    return "".join(parts)


def _block_marks(blocks, geo, width) -> list[str]:
    """A shaded band and a ×N bracket on each block drawn once for its N instances."""
    parts = []
    h, top = geo["h"], geo["top"]
    for first, hidden, period, count in blocks:
        y0, y1 = top + first * h - 4, top + (hidden + 1) * h + 2
        x = width - 56
        parts.append(f'<g><title>a block of {period} operations repeated {count} times back to back: drawn once</title>'
                     f'<rect x="{geo["box_x"] - 10}" y="{y0}" width="{x - geo["box_x"] + 4}" height="{y1 - y0}" '
                     f'fill="#23203a" fill-opacity="0.04" stroke="#23203a" stroke-opacity="0.25" '
                     f'stroke-dasharray="4 3" rx="8"/>'
                     f'<path d="M{x},{y0} h8 V{y1} h-8" fill="none" stroke="#23203a" stroke-width="2"/>'
                     f'<text x="{x + 12}" y="{(y0 + y1) / 2:.0f}" font-weight="bold" font-size="14">'
                     f'×{count}</text></g>')
    return parts


def _group_boxes(rows, group_of, colors, group_ids, geo) -> list[str]:
    """One box per contiguous run of drawn rows of one fused group."""
    runs = []
    for i, n in enumerate(rows):
        k = None if isinstance(n, _Hidden) else group_of.get(n.name)
        if k and runs and runs[-1][0] == k and runs[-1][2] == i - 1:
            runs[-1][2] = i
        elif k:
            runs.append([k, i, i])
    parts = []
    h, top, box_x, box_w = geo["h"], geo["top"], geo["box_x"], geo["box_w"]
    for kernel, a, b in runs:
        color = colors[kernel]
        y0, y1 = top + a * h - 2, top + (b + 1) * h + 2
        parts.append(f'<g class="grp" onclick="showGroup(\'{group_ids[kernel]}\')">'
                     f'<title>{_e(kernel)}: click for its kernel source</title>'
                     f'<rect class="box" x="{box_x - 6}" y="{y0}" width="{box_w + 12}" height="{y1 - y0}" rx="6" '
                     f'fill="{color}" fill-opacity="0.13" stroke="{color}" stroke-width="2"/>'
                     f'<text x="{box_x + box_w + 14}" y="{y0 + 13}" fill="{color}" font-weight="bold">'
                     f'{_e(kernel)}</text></g>')
    return parts


def _edges(order, row_of, rows, group_of, colors, geo) -> list[str]:
    """Arcs on the left from each input's row to its user's (a hidden node's row is its block's)."""
    visible = set(order)
    parts, drawn = [], set()
    h, top, gutter, x = geo["h"], geo["top"], geo["gutter"], geo["box_x"] - 2
    for n in order:
        for a in n.all_input_nodes:
            src = _source_of(a, visible)
            if src is None or src not in row_of or row_of[src] >= row_of[n] or (row_of[src], row_of[n]) in drawn:
                continue
            drawn.add((row_of[src], row_of[n]))
            y0, y1 = top + row_of[src] * h + h / 2, top + row_of[n] * h + h / 2
            same = (not isinstance(rows[row_of[n]], _Hidden) and not isinstance(rows[row_of[src]], _Hidden)
                    and group_of.get(src.name) and group_of.get(src.name) == group_of.get(n.name))
            bend = min(gutter - 8, 10 + 6 * (row_of[n] - row_of[src]) ** 0.5 * 3)
            stroke = colors[group_of[n.name]] if same else "#9aa0a6"
            parts.append(f'<path d="M{x},{y0:.0f} C{x - bend:.0f},{y0:.0f} {x - bend:.0f},{y1:.0f} {x},{y1:.0f}" '
                         f'fill="none" stroke="{stroke}" stroke-opacity="{0.9 if same else 0.45}" '
                         f'stroke-width="1"/>')
    return parts


def _hidden_row(item: _Hidden, i: int, gid: int, geo) -> str:
    y, h, box_x, box_w = geo["top"] + i * geo["h"], geo["h"], geo["box_x"], geo["box_w"]
    names = [n.name for n in item.nodes]
    text = (f"⋯ {item.count - 1} more identical blocks of {item.period} ops "
            f"({names[0]} … {names[-1]})")
    return (f'<g data-graph="n{gid}" data-nodes="{_e(" ".join(names))}"><title>{_e(text)}: same ops, shapes and '
            f'kernels as the block above</title>'
            f'<rect x="{box_x}" y="{y + 1}" width="{box_w}" height="{h - 3}" rx="3" fill="#fff" '
            f'stroke="#23203a" stroke-dasharray="3 2"/>'
            f'<text x="{box_x + 5}" y="{y + h - 5}" fill="#23203a">{_e(text[:70])}</text></g>')


def _node_row(record, n, i: int, gid: int, group_of, colors, geo) -> str:
    y, h, box_x, box_w = geo["top"] + i * geo["h"], geo["h"], geo["box_x"], geo["box_w"]
    kernel = group_of.get(n.name)
    label, meta = _node_label(n, record.units)
    if kernel:
        fill, textc = colors[kernel], "#fff"
    elif n.op == "call_function" and is_kernel(n):
        fill, textc = "#5f6368", "#fff"
    else:
        fill, textc = "#e8eaed", "#3c4043"
    title = f"{label} {meta}" + (f" — fused in {kernel}" if kernel else
                                   (" — runs through PyTorch" if is_kernel(n) else ""))
    return (f'<g id="n{gid}-{_e(n.name)}"><title>{_e(title)}</title>'
            f'<rect x="{box_x}" y="{y + 1}" width="{box_w}" height="{h - 3}" rx="3" fill="{fill}"/>'
            f'<text x="{box_x + 5}" y="{y + h - 5}" fill="{textc}">{_e(label[:46])}</text>'
            f'<text x="{box_x + box_w - 5}" y="{y + h - 5}" fill="{textc}" text-anchor="end">'
            f'{_e(meta[:30])}</text></g>')
