"""What Kitsune did so far: counts that `kitsune.get_fusion_stats()` returns.

Keys (all graphs compiled into this stats object):

    graphs            number of aten graphs compiled (forward and backward count separately)
    num_fused         fusion groups running as one generated kernel
    kernels_before    kernels eager PyTorch launches for the compiled graphs (estimated: one per
                      aten op the user's code or autograd dispatches, so a layer_norm is one
                      kernel, not its nine captured primitives; views are free; see
                      kitsune.ir.eager_count)
    kernels_after     kernels Kitsune launches: captured ops left unfused, one per generated
                      kernel (two for a split reduction); it can exceed kernels_before where
                      little fuses (a decomposed op left unfused runs as its primitives)
    efficiency        kernels removed / kernels removable, in [0, 1]: "removable" is what
                      applying every detected pattern opportunity would remove (each connected
                      region of overlapping opportunities becoming one kernel); 1.0 when graphs
                      were compiled and nothing in them is removable; 0.0 while no graph has
                      been compiled (`graphs` is 0, and explain() says nothing was compiled).
                      The opportunities it is missing, with reasons, are in `patterns` and
                      `explain()`: that is what a user can act on.
    bytes_before      estimated memory traffic of eager PyTorch (one kernel per user operation)
    bytes_after       estimated memory traffic with Kitsune's kernels
    estimated_speedup eager time / Kitsune time under the roofline model (kitsune.planner.cost)
    patterns          {pattern: {"detected", "applied", "partial", "not_applied", "disabled"}}
    fallbacks         (what, reason) for everything that runs through PyTorch although it
                      was planned or compiled to fuse: groups the configuration, a backend
                      or a measurement refused, failed lowerings and builds, a graph that
                      failed whole, and ("whole graph", "nothing fused: ...") a
                      graph that fused nothing for reasons no refused group gives
    runtime_fallbacks (kernel, reason, calls) for fused groups whose original ops ran through
                      PyTorch at run time: "kernel launch failed: ..." (the kernel is off from
                      then on; every later call counts too), "input k has strides/shape ..."
                      (inputs laid out otherwise than compiled for; the kernel stays on),
                      "KITSUNE_DEBUG: output k differs from eager"
    compile_seconds   time spent in Kitsune's compiler (not Dynamo's capture)
    compile_phases    seconds by phase, summed over the graphs: Kitsune's own ("rewrite",
                      "cache_load" (hashing the graph, loading a cached compile), "plan", "lower",
                      "build" (Triton/C kernels), "cache_store", "assemble", "other": they add up
                      to compile_seconds), PyTorch's before it ("capture": Dynamo's tracing and
                      AOTAutograd) and Kitsune's on the first call ("measure": timing groups on
                      first inputs; "cuda_graph": recording)
    graphs_from_cache graphs loaded from the compiled-graph cache instead of compiled
                      (kitsune.runtime.graph_cache: a warm start)
    kernel_builds     build work done while compiling: kernel sources generated plus compiler
                      runs (0 for a warm start; identical groups count once)
    measure_budget_s  the largest per-graph timing budget the graphs measured under
                      (FusionConfig.measure_budget_s; None when no graph measured)
    measure_skipped   fused groups left unmeasured (kept fused) because that budget was spent
    groups            (kernel name, nodes fused, backend) per fused group
    group_details     one dict per fused group: kernel, graph, backend, nodes, ops, patterns,
                      unfused_seconds/fused_seconds (estimated), unfused_kernels, bytes_saved,
                      measured (the timing dict) and measured_speedup (None unless profiled)
    measured          one dict per group a profiling engine timed, kept or run unfused:
                      kernel, graph, fused_s, unfused_s, speedup (unfused_s / fused_s), kept
                      (False when below min_fusion_benefit), cached (decision read from disk),
                      decision ("fused", "unfused", or "undecided": kept), spread (of the
                      speed-ups of its last rounds), baseline ("user ops" or "decomposed ops"),
                      device and when it was measured (kitsune.tuning.measure)
"""
from __future__ import annotations

import logging

from kitsune.record import GraphRecord, RecordSink, install_default_sink  # noqa: F401 - GraphRecord re-exported

log = logging.getLogger("kitsune")


class FusionStats(RecordSink):
    def record(self, graph: GraphRecord) -> None:
        # Opportunities need pattern detection: a record whose detection is still
        # pending is finalized when the stats are read, unless the log wants it now.
        if graph.pending_detection is None or log.isEnabledFor(logging.INFO):
            from kitsune.report.analysis import finalize
            first = not graph.finalized
            finalize(graph)
            if first:
                _log_record(graph)
        super().record(graph)

    def as_dict(self) -> dict:
        from kitsune.report.analysis import summarize
        graphs = self.records()
        before = sum(g.kernels_before for g in graphs)
        after = sum(g.kernels_after for g in graphs)
        summary = summarize(graphs)
        return {
            "graphs": len(graphs),
            "num_fused": sum(len(g.groups) for g in graphs),
            "kernels_before": before,
            "kernels_after": after,
            # nothing compiled has removed nothing: 0.0, not the 100 % of "nothing removable"
            "efficiency": summary["efficiency"] if graphs else 0.0,
            "bytes_before": summary["bytes_before"],
            "bytes_after": summary["bytes_after"],
            "estimated_speedup": summary["estimated_speedup"],
            "patterns": summary["patterns"],
            "fallbacks": [f for g in graphs for f in g.fallbacks],
            "runtime_fallbacks": runtime_fallbacks(graphs),
            "compile_seconds": round(sum(g.compile_seconds for g in graphs), 3),
            "compile_phases": compile_phases(graphs),
            "graphs_from_cache": sum(1 for g in graphs if g.from_cache),
            "kernel_builds": sum(g.kernel_builds for g in graphs),
            "measure_budget_s": max((g.measure_budget_s for g in graphs if g.measure_budget_s is not None),
                                    default=None),
            "measure_skipped": sum(g.measure_skipped for g in graphs),
            "groups": [grp for g in graphs for grp in g.groups],
            "group_details": summary["groups"],
            "measured": measured_groups(graphs),
        }


PHASES = ("capture", "rewrite", "cache_load", "plan", "lower", "build", "cache_store", "assemble", "other",
          "measure", "cuda_graph")


def compile_phases(records) -> dict:
    """{phase: seconds} summed over `records`, in pipeline order (phases no record has left out)."""
    totals = {}
    for record in records:
        for name, seconds in list(record.phases.items()):
            totals[name] = totals.get(name, 0.0) + seconds
    ordered = [p for p in PHASES if p in totals] + sorted(set(totals) - set(PHASES))
    return {name: round(totals[name], 4) for name in ordered}


def measured_groups(records) -> list:
    """One dict per fused group timed by a profiling engine (kept or not): kernel, graph,
    fused_s, unfused_s, speedup (unfused_s / fused_s), kept, cached, decision, spread,
    baseline, device, when."""
    out = []
    for record in records:
        kept = {name for name, _, _ in record.groups}
        for name, m in list(record.measured.items()):
            out.append({"kernel": name, "graph": record.name, "fused_s": m.get("fused_s"),
                        "unfused_s": m.get("unfused_s"), "speedup": m.get("speedup"), "kept": name in kept,
                        "cached": bool(m.get("cached")),
                        **{k: m.get(k) for k in ("decision", "spread", "baseline", "device", "when")}})
    return out


def runtime_fallbacks(records) -> list:
    """(kernel, reason, calls) for the run-time fallbacks of the fused groups of `records`.

    Read from the FusedGroupCalls when asked, so that the calls' fast path does no work."""
    out = []
    for record in records:
        for name, call in list(record.kernel_calls.items()):
            counts = getattr(call, "runtime_fallbacks", None) or {}
            out += [(name, reason, calls) for reason, calls in list(counts.items())]
    return out


class TeeStats:
    """Records into several FusionStats (an engine's own and the process-wide one)."""

    def __init__(self, *targets: FusionStats):
        self.targets = targets
        self.last: GraphRecord | None = None

    def record(self, graph: GraphRecord) -> None:
        self.last = graph
        for target in self.targets:
            target.record(graph)


def _log_record(record: GraphRecord) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    for opp in record.opportunities:
        if opp.status == "applied":
            log.info("%s graph: pattern %s applied: %s in %s (est. %.2fx, %s saved)", record.name,
                     opp.pattern, opp.describe(), ", ".join(opp.kernels), opp.estimated_speedup,
                     _bytes(opp.bytes_saved))
        elif opp.status == "partial":
            log.info("%s graph: pattern %s partly applied: %s in %s; %s", record.name, opp.pattern,
                     opp.describe(), ", ".join(opp.kernels), opp.reason)
        else:
            log.debug("%s graph: pattern %s %s: %s: %s", record.name, opp.pattern, opp.status,
                      opp.describe(), opp.reason)
    if log.isEnabledFor(logging.DEBUG):
        for decision in record.decisions:
            if not decision.fused and len(decision.nodes) > 1 or (not decision.fused and
                                                                  "nothing to fuse" not in decision.reason):
                log.debug("%s graph: not fused: %s: %s", record.name, " + ".join(decision.nodes),
                          decision.reason)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


GLOBAL_STATS = FusionStats()
install_default_sink(GLOBAL_STATS)  # compile_graph records here when given no sink
