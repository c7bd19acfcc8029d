"""What Kitsune did so far: counts that `kitsune.get_fusion_stats()` returns."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class GraphRecord:
    name: str
    kernels_before: int           # ops eager runs as kernels (views are free)
    kernels_after: int            # the same after fusion
    groups: list = field(default_factory=list)      # (kernel name, nodes fused, source backend)
    fallbacks: list = field(default_factory=list)   # (what, reason) that run through PyTorch
    decisions: list = field(default_factory=list)   # planner Decisions
    compile_seconds: float = 0.0


class FusionStats:
    def __init__(self):
        self._lock = threading.Lock()
        self.graphs: list[GraphRecord] = []

    def record(self, graph: GraphRecord) -> None:
        with self._lock:
            self.graphs.append(graph)

    def reset(self) -> None:
        with self._lock:
            self.graphs.clear()

    def as_dict(self) -> dict:
        with self._lock:
            graphs = list(self.graphs)
        before = sum(g.kernels_before for g in graphs)
        after = sum(g.kernels_after for g in graphs)
        return {
            "graphs": len(graphs),
            "num_fused": sum(len(g.groups) for g in graphs),
            "kernels_before": before,
            "kernels_after": after,
            "fallbacks": [f for g in graphs for f in g.fallbacks],
            "compile_seconds": round(sum(g.compile_seconds for g in graphs), 3),
            "groups": [grp for g in graphs for grp in g.groups],
        }


GLOBAL_STATS = FusionStats()
