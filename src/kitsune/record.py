"""What the compiler writes down about each graph it compiles: `GraphRecord`,
and the thread-safe sink it records into.

This module sits below the report: the compiler (and the fusion API) write
records; `kitsune.report` reads them (`report.stats.FusionStats` is a
`RecordSink`) and imports this, never the other way round.

Pattern detection for the report is lazy: unless the plan needed it, a record
keeps the planned graph and its config, and the detection runs the first time
its `units` or `opportunities` are read (the stats, `explain()`, the HTML report).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("kitsune")


@dataclass(eq=False)
class GraphRecord:
    name: str
    kernels_before: int           # kernels eager PyTorch launches (kitsune.ir.eager_count)
    kernels_after: int            # kernels with Kitsune: unfused compute aten ops + fused kernels
    aten_ops: int = 0             # compute (non-view) aten ops captured, what runs when nothing fuses
    groups: list = field(default_factory=list)      # (kernel name, nodes fused, source backend)
    fallbacks: list = field(default_factory=list)   # (what, reason) that run through PyTorch
    decisions: list = field(default_factory=list)   # planner Decisions
    compile_seconds: float = 0.0
    # seconds by phase: Kitsune's compile ("rewrite", "cache_load", "plan", "lower", "build", "cache_store",
    # "assemble", "other": they add up to compile_seconds), before it ("capture": Dynamo's tracing and AOTAutograd, on the first
    # graph of a capture) and on the first call ("measure", "cuda_graph": recording) (kitsune.compiler)
    phases: dict = field(default_factory=dict)
    cuda_graph: bool = False      # replayed as one CUDA graph (kitsune.runtime.cuda_graphs)
    # the compiled-graph cache (kitsune.runtime.graph_cache): loaded from it instead of compiled,
    # the entry's key (None: not cached), the measured decisions applied from it
    from_cache: bool = False
    cache_key: str | None = None
    measured_from_cache: bool = False
    kernel_builds: int = 0        # kernel sources generated + compiler runs for this graph (codegen.backends)
    measure_skipped: int = 0      # fused groups left unmeasured: the measure budget was spent
    measure_budget_s: float | None = None  # the budget the first call measured under (None: not measured)
    graph: object = None          # the captured fx.Graph, as planned
    config: object = None
    kernel_calls: dict = field(default_factory=dict)   # kernel name -> FusedGroupCall (every fused group)
    measured: dict = field(default_factory=dict)       # kernel name -> {"fused_s", "unfused_s", "speedup"}
    rewrites: list = field(default_factory=list)       # kitsune.capture.rewrites.Rewrite: patterns run another way
    finalized: bool = False
    # Pattern detection (kitsune.planner.detect), run at compile time when the plan
    # needed it, else on first read of `units` or `opportunities`: () -> (units, opportunities)
    pending_detection: Callable | None = field(default=None, repr=False)
    _units: object = field(default=None, repr=False)          # UnitGraph
    _opportunities: list = field(default_factory=list, repr=False)  # FusionOpportunity
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def units(self):
        self.ensure_detected()
        return self._units

    @units.setter
    def units(self, value) -> None:
        self._units = value

    @property
    def opportunities(self) -> list:
        self.ensure_detected()
        return self._opportunities

    @opportunities.setter
    def opportunities(self, value) -> None:
        self._opportunities = value

    def ensure_detected(self) -> None:
        """Run the pending pattern detection, once (the report calls this before reading
        units or opportunities). A failure leaves the record without patterns, as a
        failed detection at compile time would."""
        if self.pending_detection is None:
            return
        with self._lock:
            detect, self.pending_detection = self.pending_detection, None
            if detect is None:
                return
            try:
                self._units, self._opportunities = detect()
            except Exception as error:  # noqa: BLE001 - reporting must never break anything
                log.warning("pattern detection failed on the %s graph: %s: %s", self.name,
                            type(error).__name__, error)
                self.graph, self._units, self._opportunities = None, None, []


class RecordSink:
    """A thread-safe list of GraphRecords: what `compile_graph(stats=...)` records into.

    Any object with `.record(record)` can stand in for one."""

    def __init__(self):
        self._lock = threading.Lock()
        self.graphs: list[GraphRecord] = []

    def record(self, graph: GraphRecord) -> None:
        with self._lock:
            self.graphs.append(graph)

    def reset(self) -> None:
        with self._lock:
            self.graphs.clear()

    def records(self) -> list[GraphRecord]:
        with self._lock:
            return list(self.graphs)


_default_sink: RecordSink = RecordSink()


def default_sink() -> RecordSink:
    """Where `compile_graph` records when given no sink: the report's process-wide
    `GLOBAL_STATS` once `kitsune.report.stats` is loaded."""
    return _default_sink


def install_default_sink(sink: RecordSink) -> None:
    """Make `sink` the default; it takes over what the previous default recorded."""
    global _default_sink
    previous, _default_sink = _default_sink, sink
    for graph in previous.records():
        sink.record(graph)
    previous.reset()
