"""`FusionEngine.explain()` / `python -m kitsune explain`: one screen of text.

What it says, in order: how many kernels eager PyTorch launches and how many
Kitsune launches; the estimated (or measured) gain; which patterns fired and
which did not, with the reason; each fused kernel and the operations in it;
where the time goes now; fallbacks.
"""
from __future__ import annotations

from kitsune.planner.cost import kernel_estimate
from kitsune.ir.ops import OpKind
from kitsune.planner.units import is_kernel, node_kind
from kitsune.report.analysis import graph_estimates, summarize
from kitsune.report.stats import _bytes


# where the time goes: nodes Kitsune leaves to PyTorch, by their kind
_PYTORCH_KINDS = {OpKind.MATMUL: "matmul (PyTorch)", OpKind.CONV: "conv (PyTorch)"}


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _ops(names, limit=6) -> str:
    names = list(names)
    text = " → ".join(names[:limit])
    return text + (f" → … (+{len(names) - limit})" if len(names) > limit else "")


class Explanation(str):
    """The text of `FusionEngine.explain()`: a str whose repr is the text itself,
    so that an interactive session shows the report, not one quoted line of \\n."""

    def __repr__(self) -> str:
        return str(self)


def eager_kernel_count(record) -> int:
    """Kernels eager PyTorch launches for the record's graph (kitsune.ir.eager_count)."""
    return record.kernels_before


def explain_records(records, verbose: bool = False, config=None) -> str:
    records = list(records)
    if not records:
        return ("Kitsune: nothing compiled yet. torch.compile compiles on the first call: "
                "run the fused model or function once, then explain() again.")
    summary = summarize(records)
    lines = _summary_lines(records, summary, config)
    lines += _pattern_lines(summary)
    lines += _fused_kernel_lines(summary["groups"], verbose)
    lines += _rewrite_lines(records)
    if any(rw.pattern == "attention" and rw.applied for r in records for rw in r.rewrites):
        lines += _attention_choice_lines()
    lines += _missed_lines(records, verbose)
    lines += _time_lines(records)
    lines += _fallback_lines(records, verbose)
    return "\n".join(lines)


def _summary_lines(records, summary, config) -> list[str]:
    """Graphs, kernel counts, estimated and measured gain, efficiency."""
    names = ", ".join(r.name for r in records)
    compile_s = sum(r.compile_seconds for r in records)
    lines = [f"Kitsune fusion report: {len(records)} graph(s) ({names}), compiled in {compile_s:.2f} s"]
    if phases := _phase_line(records):
        lines.append(phases)
    eager = sum(eager_kernel_count(r) for r in records)
    captured = sum(r.aten_ops for r in records)
    after = sum(r.kernels_after for r in records)
    fused = sum(len(r.groups) for r in records)
    lines.append(f"Kernels: eager PyTorch ≈ {eager} | captured aten ops {captured} | Kitsune {after} "
                 f"({fused} fused kernel{'s' if fused != 1 else ''})")
    lines.append(f"Estimated gain (roofline model): {summary['estimated_speedup']:.2f}x, "
                 f"{_time(summary['seconds_before'])} → {_time(summary['seconds_after'])}; memory traffic "
                 f"{_bytes(summary['bytes_before'])} → {_bytes(summary['bytes_after'])}")
    if any(m for r in records for m in r.measured.values()):
        lines.append(_measured_line(records))
    lines.append(f"Efficiency: {summary['efficiency']:.0%} of the kernel reduction that the detected "
                 f"patterns allow")
    if config is not None and not (config.enable_elementwise or config.enable_reduction):
        lines.append("Fusion is disabled (enable_fusion=False or all enable_* off): patterns are only detected.")
    return lines


def _phase_line(records) -> str:
    """Compile time by phase: PyTorch's capture, Kitsune's own phases, the first call's."""
    from kitsune.report.stats import compile_phases
    phases = compile_phases(records)
    if not phases:
        return ""
    first_call = ("measure", "cuda_graph")
    own = ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items()
                    if name not in first_call and name != "capture")
    parts = [f"Compile time by phase (s): Kitsune {own}"]
    if "capture" in phases:
        parts.append(f"before it, Dynamo + AOTAutograd {phases['capture']:.2f}")
    if later := ", ".join(f"{name} {phases[name]:.2f}" for name in first_call if name in phases):
        parts.append(f"first call: {later}")
    if warm := sum(1 for r in records if getattr(r, "from_cache", False)):
        parts.append(f"{warm} of {len(records)} graph(s) loaded from the compiled-graph cache")
    return "; ".join(parts)


def _attention_choice_lines() -> list[str]:
    """How this process's attention calls run (kitsune.ops.attention_dispatch): Kitsune's flash kernel
    or SDPA, chosen by one measurement per configuration (empty on the CPU, where SDPA always runs)."""
    from kitsune.ops.attention_dispatch import attention_choices, describe
    choices = attention_choices()
    if not choices:
        return []
    lines = ["", "Attention kernels (chosen by measurement, per configuration):"]
    for key, (choice, kitsune_ms, sdpa_ms) in choices.items():
        which = "Kitsune's flash kernel" if choice == "triton" else "SDPA / reference"
        lines.append(f"  {describe(key)}: {which} (kernel {kitsune_ms:.3f} ms, SDPA {sdpa_ms:.3f} ms)")
    return lines


def _measured_line(records) -> str:
    # a group below min_fusion_benefit runs unfused: its time now is its unfused time
    timed = [(m, name in {g[0] for g in r.groups}) for r in records for name, m in r.measured.items() if m]
    before = sum(m["unfused_s"] for m, _ in timed)
    now = sum(m["fused_s"] if kept else m["unfused_s"] for m, kept in timed)
    kept = sum(1 for _, k in timed if k)
    if now <= 0:
        return ""
    return (f"Measured on first inputs ({len(timed)} kernels: {kept} kept, {len(timed) - kept} run "
            f"unfused below min_fusion_benefit): unfused {_time(before)} → now {_time(now)} "
            f"({before / now:.2f}x){_measure_notes([m for m, _ in timed])}")


def _measure_notes(measured: list) -> str:
    """How many measurements were undecided or read from the cache, and against which baseline."""
    counts: dict = {}
    for m in measured:
        for note in ("undecided" if m.get("decision") == "undecided" else None,
                     "cached" if m.get("cached") else None, f"baseline {m.get('baseline', 'decomposed ops')}"):
            if note:
                counts[note] = counts.get(note, 0) + 1
    return "".join(f"; {n} {note}" for note, n in counts.items())


def _pattern_lines(summary) -> list[str]:
    lines = ["", "Patterns            detected  applied  partial  not applied  disabled"]
    for name, c in sorted(summary["patterns"].items(), key=lambda kv: -kv[1]["detected"]):
        lines.append(f"  {name:<18}{c['detected']:>8}{c['applied']:>9}{c['partial']:>9}{c['not_applied']:>13}"
                     f"{c['disabled']:>10}")
    if not summary["patterns"]:
        lines.append("  (no pattern found)")
    return lines


def _fused_kernel_lines(groups, verbose: bool) -> list[str]:
    """Fused kernels, identical ones counted once (a transformer repeats its layers), biggest gain first."""
    lines = ["", "Fused kernels (operations → one kernel; estimated time eager → fused):"]
    kinds: dict = {}
    for g in groups:
        key = (g["graph"], tuple(g["ops"]), len(g["nodes"]), tuple(g["patterns"]))
        kinds.setdefault(key, []).append(g)
    ordered = sorted(kinds.values(), key=lambda gs: sum(g["fused_seconds"] - g["unfused_seconds"] for g in gs))
    for gs in ordered if verbose else ordered[:10]:
        g = gs[0]
        unfused = sum(x["unfused_seconds"] for x in gs)
        fused = sum(x["fused_seconds"] for x in gs)
        gain = unfused / fused if fused else 1.0
        pats = f" [{', '.join(g['patterns'])}]" if g["patterns"] else ""
        measured = [x["measured"] for x in gs if x.get("measured")]
        meas = (f", measured {sum(m['unfused_s'] for m in measured) / sum(m['fused_s'] for m in measured):.2f}x"
                if measured and sum(m["fused_s"] for m in measured) > 0 else "")
        count = f"{len(gs)}× " if len(gs) > 1 else ""
        lines.append(f"  {g['graph']:<9} {count}{g['kernel']:<20} {_ops(g['ops'])}: {len(g['nodes'])} ops, "
                     f"{_time(unfused)} → {_time(fused)} ({gain:.1f}x{meas}){pats}")
    if not verbose and len(ordered) > 10:
        lines.append(f"  … {len(ordered) - 10} more kinds (explain(verbose=True) lists all)")
    if not groups:
        lines.append("  (none)")
    return lines


def _rewrite_lines(records) -> list[str]:
    """How applied patterns with a choice run (folded, re-associated, chunked, a library
    product and its epilogue kernel), identical ones counted once."""
    done: dict = {}
    for record in records:
        for opp in record.opportunities:
            if opp.choice and opp.status == "applied":
                key = (record.name, opp.pattern, opp.ops, opp.choice)
                done.setdefault(key, []).append(opp)
    if not done:
        return []
    lines = ["", "Applied as (pattern: operations → how it runs):"]
    for (graph, pattern, ops, choice), opps in done.items():
        count = f"{len(opps)}× " if len(opps) > 1 else ""
        timed = [o.fused_seconds for o in opps if o.rewrite and o.fused_seconds]  # a rewrite's measured time
        meas = f" (measured {_time(sum(timed) / len(timed))})" if timed else ""
        lines.append(f"  {graph:<9} {count}{pattern}: {_ops(ops)} → {choice}{meas}")
    return lines


def _missed_lines(records, verbose: bool) -> list[str]:
    """Opportunities not applied, identical ones counted once, the costliest first."""
    missed: dict = {}
    for record in records:
        for opp in record.opportunities:
            if opp.status == "applied":
                continue
            why = opp.reason.split(": ", 1)[1] if ": " in opp.reason and opp.reason.split(": ", 1)[0] in \
                opp.nodes else opp.reason
            missed.setdefault((record.name, opp.pattern, opp.status, opp.ops, why), []).append(opp)
    lines = ["", "Not fused (pattern: operations: why):"]
    ranked = sorted(missed.items(), key=lambda kv: -sum(o.eager_seconds - o.fused_seconds for o in kv[1]))
    for (graph, pattern, status, ops, why), opps in ranked if verbose else ranked[:10]:
        count = f"{len(opps)}× " if len(opps) > 1 else ""
        lines.append(f"  {graph:<9} {count}{pattern} ({status}): {_ops(ops)}: {opps[0].reason} "
                     f"[est. {opps[0].estimated_speedup:.2f}x, {_bytes(sum(o.bytes_saved for o in opps))} "
                     f"less traffic]")
    if not verbose and len(ranked) > 10:
        lines.append(f"  … {len(ranked) - 10} more (explain(verbose=True) lists all)")
    if not missed:
        lines.append("  (every detected opportunity was applied)")
    return lines


def _time_costs(record) -> list[tuple]:
    """(estimated seconds, graph, label, kind) of each fused kernel and each node left to PyTorch."""
    costs = []
    for g in graph_estimates(record)["groups"]:
        costs.append((g["fused_seconds"], record.name, f"{g['kernel']} ({_ops(g['ops'], 3)})", "fused kernels"))
    if record.graph is None:
        return costs
    fused_names = {n for _, names, _ in record.groups for n in names}
    for node in record.graph.nodes:
        if is_kernel(node) and node.name not in fused_names:
            unit = record.units.unit_of.get(node) if record.units else None
            label = f"{node.name} ({unit.name})" if unit is not None and unit.name != node.name else node.name
            kind = _PYTORCH_KINDS.get(node_kind(node), "other PyTorch ops")
            costs.append((kernel_estimate([node]).seconds, record.name, label + " [PyTorch]", kind))
    return costs


def _time_lines(records) -> list[str]:
    """Where the time goes now: shares by kind, then the six costliest kernels."""
    costs = [c for record in records for c in _time_costs(record)]
    total = sum(c[0] for c in costs) or 1.0
    by_kind: dict = {}
    for seconds, _, _, kind in costs:
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    lines = ["", "Where the time goes now (estimated): " + ", ".join(
        f"{kind} {seconds / total:.0%}" for kind, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]))]
    for seconds, graph, label, _ in sorted(costs, reverse=True)[:6]:
        lines.append(f"  {seconds / total:6.1%}  {_time(seconds):>10}  {graph:<9} {label}")
    return lines


def _fallback_lines(records, verbose: bool) -> list[str]:
    fallbacks = [(r.name, what, why) for r in records for what, why in r.fallbacks]
    if not fallbacks:
        return []
    lines = ["", "Fallbacks (run through PyTorch):"]
    for graph, what, why in fallbacks[: None if verbose else 10]:
        lines.append(f"  {graph:<9} {_ops(str(what).split(' → '), 4)}: {why}")
    return lines
