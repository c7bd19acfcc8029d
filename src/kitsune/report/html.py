"""`FusionEngine.report(path)`: one self-contained HTML file.

No network is needed to view it: CSS, JavaScript and SVG are inline. It holds

- a summary (kernels eager / captured / Kitsune, estimated or measured gain, efficiency);
- a before/after time chart per graph (roofline estimates; measured times when profiled);
- the patterns table and every opportunity with its status and reason;
- each captured graph drawn top to bottom in an order where every fusion group is
  contiguous, the group boxed and coloured, edges as arcs on the left (views and
  getitems are folded into the edges); a click on a group opens its row;
- a table of fused groups with the generated kernel source one click away.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from kitsune.ir.ops import OpKind
from kitsune.planner.units import is_kernel, node_kind, tensor_vals
from kitsune.report.analysis import graph_estimates, summarize
from kitsune.report.explain import _time, eager_kernel_count
from kitsune.report.stats import _bytes

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
           "#469990", "#808000", "#000075", "#bfef45", "#fabed4", "#dcbeff", "#aaffc3", "#ffd8b1"]

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#23203a;color:#fff;padding:16px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;opacity:.8}main{padding:16px 24px;max-width:1400px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0 16px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:22px}.card span{color:#666;font-size:12px}
h2{font-size:17px;margin:24px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;background:#fff;width:100%;font-size:13px}
th,td{border:1px solid #e3e3e3;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f4}tr.hl td{background:#fff6d5}
.applied{color:#1a7f37;font-weight:600}.partial{color:#9a6700;font-weight:600}
.not-applied,.disabled{color:#b42318;font-weight:600}
pre{background:#1e1e2e;color:#e4e4ef;padding:10px;overflow:auto;max-height:480px;font-size:12px;border-radius:6px}
details summary{cursor:pointer;color:#3451b2}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px;vertical-align:middle;margin-right:4px}
.graphbox{background:#fff;border:1px solid #ddd;border-radius:8px;overflow:auto;max-height:900px}
svg text{font:11px ui-monospace,SFMono-Regular,Menlo,monospace}
svg .grp{cursor:pointer}svg .grp:hover rect.box{stroke-width:3}
.muted{color:#777}.legend{font-size:12px;color:#555;margin:6px 0}
"""

JS = """
function showGroup(id){
  document.querySelectorAll('tr.hl').forEach(r=>r.classList.remove('hl'));
  var row=document.getElementById('row-'+id); if(!row) return;
  var outer=row.closest('details'); if(outer) outer.open=true;
  row.classList.add('hl'); var d=row.querySelector('details'); if(d) d.open=true;
  row.scrollIntoView({behavior:'smooth',block:'center'});
}
function showNode(id){
  var el=document.getElementById(id); if(el) el.scrollIntoView({behavior:'smooth',block:'center'});
}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def kernel_source(call) -> str:
    """Generated source of a FusedGroupCall's kernel (or a rendering of its spec)."""
    kernel = getattr(call, "kernel", None)
    source = None
    if kernel is not None:
        try:
            source = kernel.source
        except Exception:  # noqa: BLE001 - a missing cache file must not break the report
            source = None
    if source:
        return _extract_function(source, call.spec)
    head = f"# {call.spec.name}: no generated source"
    if getattr(call, "failure", None):
        head += f" (runs through PyTorch: {call.failure})"
    elif kernel is not None:
        head += f" ({type(kernel).__name__} backend has no source text)"
    return head + "\n" + spec_text(call.spec)


def _extract_function(source: str, spec) -> str:
    """The CPU backend compiles a graph's kernels as one library: keep this kernel's function."""
    try:
        from kitsune.codegen.cpu import kernel_name
        name = kernel_name(spec)
    except Exception:  # noqa: BLE001
        return source
    lines = source.splitlines()
    starts = [i for i, line in enumerate(lines) if name + "(" in line and not line.startswith((" ", "\t"))]
    if len(lines) < 80 or not starts:
        return source
    start = starts[0]
    while start > 0 and lines[start - 1].lstrip().startswith(("//", "/*", "*")):
        start -= 1  # its header comment
    end = next((i for i in range(starts[0], len(lines)) if lines[i].startswith("}")), len(lines) - 1)
    return "\n".join(lines[start:end + 1]) + "\n\n/* (one function of the graph's library; the file holds all) */"


def spec_text(spec) -> str:
    """A KernelSpec as SSA text: what the kernel computes per element."""
    try:
        from kitsune.ir.scalar import walk
    except Exception:  # noqa: BLE001
        return repr(spec)
    names, lines = {}, []
    lines.append(f"# numel={spec.numel} inputs={[ (i.name, str(i.dtype)) for i in spec.inputs]}")
    for v in walk([o.value for o in spec.outputs]):
        name = f"t{len(names)}"
        names[v] = name
        args = ", ".join(names.get(a, "?") for a in v.args)
        if v.op == "load":
            text = f"load(in{v.attr[0]})"
        elif v.op == "load_at":
            text = f"load_at(in{v.attr[0]}, {args})"
        elif v.op == "const":
            text = f"const({v.attr!r})"
        elif v.attr is not None:
            text = f"{v.op}[{v.attr}]({args})"
        else:
            text = f"{v.op}({args})"
        lines.append(f"{name} = {text}  # {str(v.dtype).replace('torch.', '')}")
    for o in spec.outputs:
        lines.append(f"{o.name} <- {names.get(o.value, '?')}")
    return "\n".join(lines)


# -- graph drawing -------------------------------------------------------------------

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


def graph_svg(record, gid: int, colors: dict, group_ids: dict) -> str:
    group_of = {}
    for kernel, names, _ in record.groups:
        for name in names:
            group_of[name] = kernel
    order = [n for n in _order(record, group_of) if _visible(n)]
    visible = set(order)
    row = {n: i for i, n in enumerate(order)}
    h, top, gutter, box_x, box_w = 18, 10, 170, 180, 430
    height = top * 2 + h * len(order)
    width = box_x + box_w + 260
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}">']
    # group boxes (contiguous runs of rows)
    runs = []
    for i, n in enumerate(order):
        k = group_of.get(n.name)
        if k and runs and runs[-1][0] == k and runs[-1][2] == i - 1:
            runs[-1][2] = i
        elif k:
            runs.append([k, i, i])
    for kernel, a, b in runs:
        color = colors[kernel]
        y0, y1 = top + a * h - 2, top + (b + 1) * h + 2
        parts.append(f'<g class="grp" onclick="showGroup(\'{group_ids[kernel]}\')">'
                     f'<title>{_e(kernel)}: click for its kernel source</title>'
                     f'<rect class="box" x="{box_x - 6}" y="{y0}" width="{box_w + 12}" height="{y1 - y0}" rx="6" '
                     f'fill="{color}" fill-opacity="0.13" stroke="{color}" stroke-width="2"/>'
                     f'<text x="{box_x + box_w + 14}" y="{y0 + 13}" fill="{color}" font-weight="bold">'
                     f'{_e(kernel)}</text></g>')
    # edges
    for n in order:
        for a in n.all_input_nodes:
            src = _source_of(a, visible)
            if src is None or src not in row or row[src] >= row[n]:
                continue
            y0, y1 = top + row[src] * h + h / 2, top + row[n] * h + h / 2
            same = group_of.get(src.name) and group_of.get(src.name) == group_of.get(n.name)
            bend = min(gutter - 8, 10 + 6 * (row[n] - row[src]) ** 0.5 * 3)
            x = box_x - 2
            stroke = colors[group_of[n.name]] if same else "#9aa0a6"
            parts.append(f'<path d="M{x},{y0:.0f} C{x - bend:.0f},{y0:.0f} {x - bend:.0f},{y1:.0f} {x},{y1:.0f}" '
                         f'fill="none" stroke="{stroke}" stroke-opacity="{0.9 if same else 0.45}" '
                         f'stroke-width="1"/>')
    # nodes
    for i, n in enumerate(order):
        y = top + i * h
        kernel = group_of.get(n.name)
        label, meta = _node_label(n, record.units)
        if kernel:
            fill, textc = colors[kernel], "#fff"
        elif n.op != "call_function":
            fill, textc = "#e8eaed", "#3c4043"
        elif is_kernel(n):
            fill, textc = "#5f6368", "#fff"
        else:
            fill, textc = "#e8eaed", "#3c4043"
        title = f"{label} {meta}" + (f" — fused in {kernel}" if kernel else
                                       (" — runs through PyTorch" if is_kernel(n) else ""))
        parts.append(f'<g id="n{gid}-{_e(n.name)}"><title>{_e(title)}</title>'
                     f'<rect x="{box_x}" y="{y + 1}" width="{box_w}" height="{h - 3}" rx="3" fill="{fill}"/>'
                     f'<text x="{box_x + 5}" y="{y + h - 5}" fill="{textc}">{_e(label[:46])}</text>'
                     f'<text x="{box_x + box_w - 5}" y="{y + h - 5}" fill="{textc}" text-anchor="end">'
                     f'{_e(meta[:30])}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def time_chart(rows) -> str:
    """rows: [(label, seconds before, seconds after, kind)] -> horizontal bar chart SVG."""
    if not rows:
        return ""
    most = max(max(b, a) for _, b, a, _ in rows) or 1.0
    bar, gap, left, width = 16, 14, 170, 460
    height = len(rows) * (2 * bar + gap) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 140}" height="{height}">']
    y = 10
    for label, before, after, kind in rows:
        parts.append(f'<text x="{left - 8}" y="{y + bar + 4}" text-anchor="end">{_e(label)}</text>')
        for value, color, name in ((before, "#9aa0a6", "eager"), (after, "#4363d8", "Kitsune")):
            w = max(1.0, width * value / most)
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 2}" fill="{color}">'
                         f'<title>{name}: {_time(value)} ({kind})</title></rect>'
                         f'<text x="{left + w + 6:.1f}" y="{y + bar - 5}">{name} {_time(value)}</text>')
            y += bar
        y += gap
    parts.append(f'<text x="{left}" y="{height - 6}" fill="#777">grey: eager PyTorch, blue: Kitsune '
                 f'({_e(rows[0][3])})</text></svg>')
    return "".join(parts)


# -- the page ------------------------------------------------------------------------

def render(records, title: str | None = None, config=None) -> str:
    records = list(records)
    title = title or "Kitsune fusion report"
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
           f"<style>{CSS}</style><script>{JS}</script></head><body>"
           f"<header><h1>{_e(title)}</h1><p>{len(records)} graph(s): "
           f"{_e(', '.join(r.name for r in records))}</p></header><main>"]
    if not records:
        out.append("<p>Nothing compiled yet: run the fused model once (torch.compile compiles on the first "
                   "call), then write the report.</p></main></body></html>")
        return "".join(out)
    summary = summarize(records)
    colors, group_ids = _group_colors(records)
    out += _summary_cards(records, summary)
    out.append("<h2>Time before / after</h2>" + time_chart(_time_rows(records)))
    out += _patterns_table(summary)
    out += _graph_sections(records, colors, group_ids)
    out += _groups_table(records, colors, group_ids)
    out += _opportunities_table(records)
    out += _fallbacks_table(records)
    data = {"stats": {k: v for k, v in summary.items() if k != "groups"}}
    out.append(f'<script type="application/json" id="kitsune-data">{_e(json.dumps(data, default=str))}</script>')
    out.append("</main></body></html>")
    return "".join(out)


def _group_colors(records) -> tuple[dict, dict]:
    """kernel name -> its colour, and -> the id of its row in the groups table."""
    colors, group_ids = {}, {}
    for r in records:
        for kernel, _, _ in r.groups:
            colors[kernel] = PALETTE[len(colors) % len(PALETTE)]
            group_ids[kernel] = f"g{len(group_ids)}"
    return colors, group_ids


def _summary_cards(records, summary) -> list[str]:
    eager = sum(eager_kernel_count(r) for r in records)
    captured = sum(r.aten_ops for r in records)
    after = sum(r.kernels_after for r in records)
    measured = [m for r in records for m in r.measured.values() if m]
    cards = [(eager, "eager PyTorch kernels (est.)"), (captured, "captured aten ops"), (after, "Kitsune kernels"),
             (sum(len(r.groups) for r in records), "fused kernels"),
             (f"{summary['estimated_speedup']:.2f}x", "estimated speed-up"),
             (f"{summary['efficiency']:.0%}", "efficiency"),
             (f"{_bytes(summary['bytes_before'])} → {_bytes(summary['bytes_after'])}", "memory traffic (est.)")]
    if measured:
        before = sum(m["unfused_s"] for m in measured)
        now = sum(m["fused_s"] for m in measured)
        cards.append((f"{before / now:.2f}x" if now else "n/a", f"measured, {len(measured)} kernels"))
    return ['<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                                            for v, k in cards) + "</div>",
            '<p class="muted">Efficiency: kernels removed / kernels that applying every detected pattern '
            'would remove. Estimates use a roofline model (kitsune.planner.cost): eager runs one kernel per '
            'user operation; a fused kernel reads its inputs once and writes what is used outside.</p>']


def _time_rows(records) -> list[tuple]:
    """The before/after chart's rows: each graph estimated, then each graph's measured kernels."""
    rows = []
    for r in records:
        est = graph_estimates(r)
        rows.append((r.name, est["before"].seconds, est["after"].seconds, "estimated"))
    for r in records:
        ms = [m for m in r.measured.values() if m]
        if ms:
            rows.append((f"{r.name} fused kernels", sum(m["unfused_s"] for m in ms), sum(m["fused_s"] for m in ms),
                         "measured: fused kernels vs their unfused ops"))
    return rows


def _patterns_table(summary) -> list[str]:
    out = ["<h2>Patterns</h2><table><tr><th>pattern</th><th>detected</th><th>applied</th><th>partial</th>"
           "<th>not applied</th><th>disabled</th></tr>"]
    for name, c in sorted(summary["patterns"].items(), key=lambda kv: -kv[1]["detected"]):
        out.append(f"<tr><td>{_e(name)}</td><td>{c['detected']}</td><td>{c['applied']}</td><td>{c['partial']}</td>"
                   f"<td>{c['not_applied']}</td><td>{c['disabled']}</td></tr>")
    out.append("</table>")
    return out


def _graph_sections(records, colors, group_ids) -> list[str]:
    out = []
    for gid, r in enumerate(records):
        out.append(f"<h2>Graph: {_e(r.name)}</h2>")
        if r.graph is None:
            out.append("<p class=\"muted\">graph not recorded</p>")
            continue
        out.append('<p class="legend">Each coloured box is one fused kernel (click it for its source); dark grey '
                   'nodes run through PyTorch; light grey are inputs/outputs. Views are folded into the edges.</p>')
        out.append(f'<div class="graphbox">{graph_svg(r, gid, colors, group_ids)}</div>')
    return out


def _groups_table(records, colors, group_ids) -> list[str]:
    many = sum(len(r.groups) for r in records) > 40
    out = [f"<h2>Fused groups</h2><details{'' if many else ' open'}><summary>{sum(len(r.groups) for r in records)} "
           "fused kernels</summary><table><tr><th></th><th>kernel</th><th>graph</th><th>backend</th>"
           "<th>operations</th><th>nodes</th><th>patterns</th><th>est. eager → fused</th><th>measured</th>"
           "<th>source</th></tr>"]
    for gid, r in enumerate(records):
        details = {g["kernel"]: g for g in graph_estimates(r)["groups"]}
        for kernel, names, backend in r.groups:
            out.append(_group_row(r, gid, kernel, names, backend, details.get(kernel, {}), colors, group_ids))
    out.append("</table></details>")
    return out


def _group_row(r, gid: int, kernel, names, backend, g: dict, colors, group_ids) -> str:
    call = r.kernel_calls.get(kernel)
    source = kernel_source(call) if call is not None else "(source not kept: compile through FusionEngine)"
    m = g.get("measured")
    meas = f"{m['speedup']:.2f}x ({_time(m['unfused_s'])} → {_time(m['fused_s'])})" if m else "—"
    failure = getattr(call, "failure", None) if call is not None and call.kernel is None else None
    status = f'<br><span class="not-applied">fell back: {_e(failure)}</span>' if failure else ""
    return (f'<tr id="row-{group_ids[kernel]}"><td><span class="swatch" style="background:{colors[kernel]}">'
            f'</span></td><td><a href="#" onclick="showNode(\'n{gid}-{_e(names[0])}\');'
            f'return false">{_e(kernel)}</a>{status}</td><td>{_e(r.name)}</td><td>{_e(backend)}</td>'
            f'<td>{_e(" → ".join(g.get("ops", [])))}</td><td>{_e(", ".join(names))}</td>'
            f'<td>{_e(", ".join(g.get("patterns", [])))}</td>'
            f'<td>{_time(g.get("unfused_seconds", 0))} → {_time(g.get("fused_seconds", 0))}</td>'
            f'<td>{meas}</td><td><details><summary>show source</summary><pre>{_e(source)}</pre>'
            f'</details></td></tr>')


def _opportunities_table(records) -> list[str]:
    out = ["<h2>Opportunities</h2><table><tr><th>graph</th><th>pattern</th><th>operations</th><th>status</th>"
           "<th>reason</th><th>kernels</th><th>est. speed-up</th><th>bytes saved (est.)</th></tr>"]
    for r in records:
        for o in r.opportunities:
            cls = o.status.replace(" ", "-")
            out.append(f"<tr><td>{_e(r.name)}</td><td>{_e(o.pattern)}{' (custom)' if o.custom else ''}</td>"
                       f"<td>{_e(o.describe())}</td><td class=\"{cls}\">{_e(o.status)}</td><td>{_e(o.reason)}</td>"
                       f"<td>{_e(', '.join(o.kernels))}</td><td>{o.estimated_speedup:.2f}x</td>"
                       f"<td>{_e(_bytes(o.bytes_saved))}</td></tr>")
    out.append("</table>")
    return out


def _fallbacks_table(records) -> list[str]:
    fallbacks = [(r.name, w, why) for r in records for w, why in r.fallbacks]
    if not fallbacks:
        return []
    out = ["<h2>Fallbacks</h2><table><tr><th>graph</th><th>what</th><th>reason</th></tr>"]
    out += [f"<tr><td>{_e(g)}</td><td>{_e(w)}</td><td>{_e(why)}</td></tr>" for g, w, why in fallbacks]
    out.append("</table>")
    return out


def write_report(records, path, title: str | None = None, config=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(records, title=title, config=config), encoding="utf-8")
    return path
