"""`FusionEngine.report(path)`: one self-contained HTML file.

No network is needed to view it: CSS, JavaScript and SVG are inline. It holds

- a search box and status filters (fused / not fused / fallback) over every table row;
- a summary (kernels eager / captured / Kitsune, estimated or measured gain, efficiency);
- a before/after time chart per graph (roofline estimates; measured times when profiled);
- the patterns table, and why what did not fuse did not (each reason once, with its count);
- each captured graph drawn top to bottom in an order where every fusion group is
  contiguous, the group boxed and coloured, edges as arcs on the left (views and
  getitems are folded into the edges); a block repeated back to back (a model's
  identical layers) is drawn once, marked ×N; a click on a group opens its row;
- the fused kernels, those of the same structure shown once (×N, their instances
  one click away), each with its generated source one click away;
- every opportunity and fallback, repeated ones counted instead of listed.

Records of symbolic-shape graphs hold SymInts, SymFloats or sympy expressions where
sizes and estimates usually are numbers: every number goes through `_number`.
"""
from __future__ import annotations

import html
import json
import logging
from pathlib import Path

from kitsune.report.analysis import graph_estimates, summarize
from kitsune.report.explain import _time, eager_kernel_count
from kitsune.report.drawing import _order, _visible, graph_svg  # noqa: F401 - _order, _visible: tests
from kitsune.report.kernel_text import kernel_source, spec_text  # noqa: F401 - spec_text: public
from kitsune.report.repeats import (aggregate, kernel_classes, kernel_status, plain_number, reason_template,
                                    unnumbered_names)
from kitsune.report.stats import _bytes

log = logging.getLogger("kitsune")

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
th,td{border:1px solid #e3e3e3;padding:4px 8px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#f0f0f4}tr.hl td,li.hl{background:#fff6d5}
td.wide{max-width:420px;overflow-wrap:anywhere}td.num{white-space:nowrap}
tbody.grp{border-top:2px solid #d0d0da}tr.srcrow td{border-top:none;background:#fcfcfe}
tr.srcrow pre{max-width:min(1290px,calc(100vw - 110px))}
.applied,.fused{color:#1a7f37;font-weight:600}.partial{color:#9a6700;font-weight:600}
.not-applied,.disabled,.fallback{color:#b42318;font-weight:600}
.times{display:inline-block;background:#23203a;color:#fff;border-radius:9px;padding:0 7px;font-size:12px;
margin-left:4px;font-weight:600}
pre{background:#1e1e2e;color:#e4e4ef;padding:10px;overflow:auto;max-height:480px;font-size:12px;border-radius:6px;
font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre;tab-size:4}
details summary{cursor:pointer;color:#3451b2}ol.inst{margin:4px 0;padding-left:22px;font-size:12px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px;vertical-align:middle;margin-right:4px}
.graphbox{background:#fff;border:1px solid #ddd;border-radius:8px;overflow:auto;max-height:900px}
svg text{font:11px ui-monospace,SFMono-Regular,Menlo,monospace}
svg .grp{cursor:pointer}svg .grp:hover rect.box{stroke-width:3}
.muted{color:#777}.legend{font-size:12px;color:#555;margin:6px 0}
.filter{position:sticky;top:0;z-index:2;background:#fafafa;padding:8px 0;border-bottom:1px solid #ddd;
display:flex;flex-wrap:wrap;gap:14px;align-items:center}
.filter input[type=search]{font:inherit;padding:4px 8px;width:340px;border:1px solid #bbb;border-radius:6px}
"""

JS = """
function openAncestors(el){
  for(var d=el.parentElement;d;d=d.parentElement){ if(d.tagName==='DETAILS') d.open=true; }
}
function showGroup(id){
  document.querySelectorAll('.hl').forEach(r=>r.classList.remove('hl'));
  var row=document.getElementById('row-'+id); if(!row) return;
  openAncestors(row); row.classList.add('hl');
  var tr=row.closest('tr'); if(tr&&tr!==row) tr.classList.add('hl');
  var body=row.closest('tbody'); var d=body&&body.querySelector('tr.srcrow details'); if(d) d.open=true;
  row.scrollIntoView({behavior:'smooth',block:'center'});
}
function showNode(id){
  var el=document.getElementById(id);
  if(!el){ var i=id.indexOf('-'), g=id.slice(0,i), name=id.slice(i+1);
    el=document.querySelector('[data-graph="'+g+'"][data-nodes~="'+name+'"]'); }
  if(el) el.scrollIntoView({behavior:'smooth',block:'center'});
}
function applyFilter(){
  var q=document.getElementById('kq').value.toLowerCase().trim(), on={}, shown=0, total=0;
  document.querySelectorAll('input[data-status]').forEach(c=>on[c.dataset.status]=c.checked);
  document.querySelectorAll('[data-row]').forEach(function(r){
    var s=r.dataset.status, ok=(!s||on[s]!==false)&&(!q||r.textContent.toLowerCase().indexOf(q)>=0);
    r.style.display=ok?'':'none'; total++; if(ok) shown++;
  });
  document.getElementById('kcount').textContent=shown+' of '+total+' rows shown';
}
"""

FILTER_BAR = ('<div class="filter"><input id="kq" type="search" placeholder="filter rows: kernel, op, node, '
              'reason…" oninput="applyFilter()" aria-label="filter rows">'
              + "".join(f'<label><input type="checkbox" data-status="{s}" checked onchange="applyFilter()"> '
                        f'<span class="{s}">{label}</span></label>'
                        for s, label in (("fused", "fused"), ("not-fused", "not fused"), ("fallback", "fallback")))
              + '<span id="kcount" class="muted"></span></div>')


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _number(value):
    """A number to format, or None (then show str(value)): see repeats.plain_number."""
    return plain_number(value)


def _fmt(value, spec: str, suffix: str = "") -> str:
    """format(value, spec) + suffix for a number, str(value) for anything else (a symbol)."""
    number = _number(value)
    return f"{format(number, spec)}{suffix}" if number is not None else str(value)


def _fmt_time(seconds) -> str:
    number = _number(seconds)
    return _time(number) if number is not None else str(seconds)


def _fmt_bytes(count) -> str:
    number = _number(count)
    if number is not None:
        return _bytes(number)
    return count if isinstance(count, str) else f"{count} B"  # "n/a" as it is; a symbol in bytes


def _estimates(record) -> dict:
    """graph_estimates(record), or none when the record cannot be estimated (the report
    must still show the graph, its groups and reasons)."""
    try:
        return graph_estimates(record)
    except Exception as error:  # noqa: BLE001 - reporting must never break anything
        log.warning("no estimates in the HTML report for the %s graph: %s: %s", record.name,
                    type(error).__name__, error)
        return {"before": None, "after": None, "groups": []}


def time_chart(rows) -> str:
    """rows: [(label, seconds before, seconds after, kind)] -> horizontal bar chart SVG."""
    rows = [(label, _number(b) or 0.0, _number(a) or 0.0, kind) for label, b, a, kind in rows]
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
    summary = _summary(records)
    classes = kernel_classes(records)
    colors, group_ids = _group_colors(classes)
    out.append(FILTER_BAR)
    out += _summary_cards(records, summary)
    out.append("<h2>Time before / after</h2>" + time_chart(_time_rows(records)))
    out += _patterns_table(summary)
    out += _reasons_table(records)
    out += _graph_sections(records, colors, group_ids)
    out += _groups_table(records, classes, colors, group_ids)
    out += _opportunities_table(records)
    out += _fallbacks_table(records)
    data = {"stats": {k: v for k, v in summary.items() if k != "groups"}}
    out.append(f'<script type="application/json" id="kitsune-data">{_e(json.dumps(data, default=str))}</script>')
    out.append("<script>applyFilter()</script></main></body></html>")
    return "".join(out)


def _summary(records) -> dict:
    """analysis.summarize, or a summary without estimates when it fails."""
    try:
        return summarize(records)
    except Exception as error:  # noqa: BLE001 - reporting must never break anything
        log.warning("the HTML report has no summary: %s: %s", type(error).__name__, error)
        return {"efficiency": "n/a", "bytes_before": "n/a", "bytes_after": "n/a", "seconds_before": "n/a",
                "seconds_after": "n/a", "estimated_speedup": "n/a", "patterns": {}, "groups": []}


def _group_colors(classes) -> tuple[dict, dict]:
    """kernel name -> its colour (one per kernel structure), and -> the id of its row."""
    colors, group_ids = {}, {}
    for i, cls in enumerate(classes):
        for instance in cls.instances:
            colors[instance.kernel] = PALETTE[i % len(PALETTE)]
            group_ids[instance.kernel] = f"g{len(group_ids)}"
    return colors, group_ids


def _summary_cards(records, summary) -> list[str]:
    eager = sum(eager_kernel_count(r) for r in records)
    captured = sum(r.aten_ops for r in records)
    after = sum(r.kernels_after for r in records)
    measured = [m for r in records for m in r.measured.values() if m]
    cards = [(eager, "eager PyTorch kernels (est.)"), (captured, "captured aten ops"), (after, "Kitsune kernels"),
             (sum(len(r.groups) for r in records), "fused kernels"),
             (_fmt(summary["estimated_speedup"], ".2f", "x"), "estimated speed-up"),
             (_fmt(summary["efficiency"], ".0%"), "efficiency"),
             (f"{_fmt_bytes(summary['bytes_before'])} → {_fmt_bytes(summary['bytes_after'])}",
              "memory traffic (est.)")]
    if measured:
        before = _number(sum(m["unfused_s"] for m in measured))
        now = _number(sum(m["fused_s"] for m in measured))
        cards.append((f"{before / now:.2f}x" if now and before is not None else "n/a",
                      f"measured, {len(measured)} kernels"))
    return ['<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                                            for v, k in cards) + "</div>",
            '<p class="muted">Efficiency: kernels removed / kernels that applying every detected pattern '
            'would remove. Estimates use a roofline model (kitsune.planner.cost): eager runs one kernel per '
            'user operation; a fused kernel reads its inputs once and writes what is used outside.</p>']


def _time_rows(records) -> list[tuple]:
    """The before/after chart's rows: each graph estimated, then each graph's measured kernels."""
    rows = []
    for r in records:
        est = _estimates(r)
        if est["before"] is not None:
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
        out.append(f"<tr data-row><td>{_e(name)}</td><td>{c['detected']}</td><td>{c['applied']}</td>"
                   f"<td>{c['partial']}</td><td>{c['not_applied']}</td><td>{c['disabled']}</td></tr>")
    out.append("</table>")
    return out


def _instances_list(entries) -> str:
    """A collapsed, numbered list of what a ×N row stands for (nothing is dropped)."""
    return (f"<details><summary>{len(entries)} instances</summary><ol class=\"inst\">"
            + "".join(entries) + "</ol></details>")


def _count_cell(count: int) -> str:
    return f'<td class="num">{f"<span class=times>×{count}</span>" if count > 1 else "1"}</td>'


def _reasons_table(records) -> list[str]:
    """Why what did not fuse did not: each reason once (node names unnumbered), with its count."""
    items = []
    for r in records:
        ops = unnumbered_names(r)
        for d in r.decisions:
            if not d.fused:
                items.append((r.name, "not-fused", reason_template(d.reason, ops), " → ".join(map(str, d.nodes)),
                              d.reason))
        for what, why in r.fallbacks:
            items.append((r.name, "fallback", reason_template(why, ops), str(what), why))
        for kernel, _, _ in r.groups:
            status, why = kernel_status(r, kernel)
            if status == "fallback":
                items.append((r.name, "fallback", f"kernel fell back to PyTorch: {reason_template(why, ops)}",
                              kernel, why))
    if not items:
        return []
    out = ["<h2>Why not fused</h2><p class=\"muted\">Each reason once: node names in it lose their numbering "
           "(add_7 reads add), so a reason repeated in every layer counts once; a row's list shows each place.</p>"
           "<table><tr><th>count</th><th>graph</th><th>status</th><th>reason</th><th>where</th></tr>"]
    groups = aggregate(items, key=lambda it: it[:3])
    for (graph, status, template), its in sorted(groups, key=lambda kv: -len(kv[1])):
        where = (_e(its[0][3]) if len(its) == 1 else
                 _instances_list([f"<li>{_e(w)}: {_e(why)}</li>" for *_, w, why in its]))
        out.append(f'<tr data-row data-status="{status}">{_count_cell(len(its))}<td>{_e(graph)}</td>'
                   f'<td class="{status}">{status.replace("-", " ")}</td><td class="wide">{_e(template)}</td>'
                   f'<td class="wide">{where}</td></tr>')
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
                   'nodes run through PyTorch; light grey are inputs/outputs. Views are folded into the edges. '
                   'A block repeated back to back (same ops, shapes and kernels) is drawn once and marked ×N.</p>')
        try:
            out.append(f'<div class="graphbox">{graph_svg(r, gid, colors, group_ids)}</div>')
        except Exception as error:  # noqa: BLE001 - the rest of the report is still worth having
            log.warning("the HTML report cannot draw the %s graph: %s: %s", r.name,
                        type(error).__name__, error)
            out.append(f'<p class="muted">graph not drawn: {_e(type(error).__name__)}: {_e(error)}</p>')
    return out


GROUP_COLUMNS = ("", "kernel", "graph", "backend", "operations", "nodes", "patterns", "est. eager → fused",
                 "measured", "instances")


def _groups_table(records, classes, colors, group_ids) -> list[str]:
    estimates = [{g["kernel"]: g for g in _estimates(r)["groups"]} for r in records]
    total = sum(len(c.instances) for c in classes)
    out = [f"<h2>Fused groups</h2><details open><summary>{total} fused kernels, {len(classes)} distinct"
           "</summary><p class=\"muted\">Kernels of the same structure (same operations, shapes and dtypes: the "
           "same code up to the name) are shown once with ×N; their instances are listed in the last column.</p>"
           "<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in GROUP_COLUMNS) + "</tr></thead>"]
    for cls in classes:
        out.append(_class_rows(cls, estimates, colors, group_ids))
    out.append("</table></details>")
    return out


def _class_rows(cls, estimates, colors, group_ids) -> str:
    """One kernel structure: a row for the first instance (×N), a full-width row for its source."""
    first, count = cls.first, len(cls.instances)
    r, kernel = first.record, first.kernel
    g = estimates[first.graph_index].get(kernel, {})
    call = r.kernel_calls.get(kernel)
    source = kernel_source(call) if call is not None else "(source not kept: compile through FusionEngine)"
    _, failure = kernel_status(r, kernel)
    status = f'<br><span class="fallback">fell back: {_e(failure)}</span>' if failure else ""
    badge = f'<span class="times">×{count}</span>' if count > 1 else ""
    row_id = f' id="row-{group_ids[kernel]}"' if count == 1 else ""
    per = f"{_fmt_time(g.get('unfused_seconds', 0))} → {_fmt_time(g.get('fused_seconds', 0))}"
    nodes = _e(", ".join(first.names)) + (f' <span class="muted">(first of {count})</span>' if count > 1 else "")
    instances = "—" if count == 1 else _instances_list(
        [f'<li id="row-{group_ids[i.kernel]}"><a href="#" onclick="showNode(\'n{i.graph_index}-{_e(i.names[0])}\');'
         f'return false">{_e(i.kernel)}</a> <span class="muted">{_e(", ".join(i.names))}</span></li>'
         for i in cls.instances])
    lines = source.count("\n") + 1
    same = f", the same for all {count} up to the name" if count > 1 else ""
    return (f'<tbody class="grp" data-row data-status="{cls.status}"><tr{row_id}><td><span class="swatch" '
            f'style="background:{colors[kernel]}"></span></td><td><a href="#" onclick="showNode('
            f'\'n{first.graph_index}-{_e(first.names[0])}\');return false">{_e(kernel)}</a>{badge}{status}</td>'
            f'<td>{_e(r.name)}</td><td>{_e(first.backend)}</td><td class="wide">{_e(" → ".join(g.get("ops", [])))}'
            f'</td><td class="wide">{nodes}'
            f'</td><td>{_e(", ".join(g.get("patterns", [])))}</td><td class="num">{per}</td>'
            f'<td class="num">{_measured(cls, estimates)}</td><td class="wide">{instances}</td></tr>'
            f'<tr class="srcrow"><td></td><td colspan="{len(GROUP_COLUMNS) - 1}"><details><summary>show source '
            f'({lines} lines{same})</summary><pre>{_e(source)}</pre></details></td></tr></tbody>')


def _measured(cls, estimates) -> str:
    """Measured speed-up of a class's kernels (all instances together), or —."""
    ms = [estimates[i.graph_index].get(i.kernel, {}).get("measured") for i in cls.instances]
    ms = [m for m in ms if m]
    if not ms:
        return "—"
    before, after = _number(sum(m["unfused_s"] for m in ms)), _number(sum(m["fused_s"] for m in ms))
    if not after or before is None:
        return "n/a"
    text = f"{before / after:.2f}x ({_time(before)} → {_time(after)})"
    return text + (f" over {len(ms)}" if len(ms) > 1 else "")


_OPPORTUNITY_STATUS = {"applied": "fused"}  # the filter's classes: everything else is "not-fused"


def _opportunities_table(records) -> list[str]:
    """Every opportunity; those with the same pattern, ops, status and reason (up to node names) counted once."""
    items = [(r, o, reason_template(o.reason or o.choice, ops)) for r in records for ops in [unnumbered_names(r)]
             for o in r.opportunities]  # an applied pattern's reason column says how it runs
    out = ["<h2>Opportunities</h2><table><tr><th>count</th><th>graph</th><th>pattern</th><th>operations</th>"
           "<th>status</th><th>reason</th><th>kernels</th><th>est. speed-up</th><th>bytes saved (est.)</th></tr>"]
    key = (lambda it: (it[0].name, it[1].pattern, bool(it[1].custom), it[1].describe(), it[1].status, it[2]))
    for (graph, pattern, custom, ops, status, reason), its in aggregate(items, key):
        opps = [o for _, o, _ in its]
        if len(opps) == 1:
            kernels = _e(", ".join(opps[0].kernels))
        else:
            kernels = _instances_list([f"<li>{_e(', '.join(o.kernels) or '—')} <span class=\"muted\">"
                                       f"({_e(', '.join(map(str, getattr(o, 'nodes', ()))))})</span></li>"
                                       for o in opps])
        speedup = _span([o.estimated_speedup for o in opps], ".2f", "x")
        saved = _fmt_bytes(_sum(o.bytes_saved for o in opps))
        cls = status.replace(" ", "-")
        out.append(f'<tr data-row data-status="{_OPPORTUNITY_STATUS.get(status, "not-fused")}">'
                   f'{_count_cell(len(opps))}<td>{_e(graph)}</td><td>{_e(pattern)}{" (custom)" if custom else ""}'
                   f'</td><td class="wide">{_e(ops)}</td><td class="{cls}">{_e(status)}</td>'
                   f'<td class="wide">{_e(reason)}</td><td class="wide">{kernels}</td>'
                   f'<td class="num">{_e(speedup)}</td><td class="num">{_e(saved)}{" in all" if len(opps) > 1 else ""}'
                   f'</td></tr>')
    out.append("</table>")
    return out


def _span(values, spec: str, suffix: str) -> str:
    """'lo – hi' of numbers formatted with spec (one value when they agree); symbols as they are."""
    numbers = [_number(v) for v in values]
    if any(n is None for n in numbers):
        return ", ".join(dict.fromkeys(_fmt(v, spec, suffix) for v in values))
    lo, hi = format(min(numbers), spec) + suffix, format(max(numbers), spec) + suffix
    return lo if lo == hi else f"{lo} – {hi}"


def _sum(values):
    """Sum of numbers; a symbolic term makes the total its str (shown as is)."""
    values = list(values)
    numbers = [_number(v) for v in values]
    return sum(numbers) if all(n is not None for n in numbers) else " + ".join(map(str, values))


def _fallbacks_table(records) -> list[str]:
    items = [(r.name, w, why, reason_template(w, ops), reason_template(why, ops))
             for r in records for ops in [unnumbered_names(r)] for w, why in r.fallbacks]
    if not items:
        return []
    out = ["<h2>Fallbacks</h2><table><tr><th>count</th><th>graph</th><th>what</th><th>reason</th></tr>"]
    for (graph, what, why), its in aggregate(items, key=lambda it: (it[0], it[3], it[4])):
        if len(its) == 1:
            what, why = its[0][1], its[0][2]
        where = "" if len(its) == 1 else _instances_list([f"<li>{_e(w)}: {_e(y)}</li>" for _, w, y, _, _ in its])
        out.append(f'<tr data-row data-status="fallback">{_count_cell(len(its))}<td>{_e(graph)}</td>'
                   f'<td class="wide">{_e(what)}{where}</td><td class="wide">{_e(why)}</td></tr>')
    out.append("</table>")
    return out


def write_report(records, path, title: str | None = None, config=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(records, title=title, config=config), encoding="utf-8")
    return path
