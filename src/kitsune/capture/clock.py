"""Compile time spent before Kitsune's compiler is called: Dynamo's bytecode
tracing and AOTAutograd's tracing and partitioning ("capture" in a record's
`phases`), so that a user can tell Kitsune's own time from PyTorch's.

`capturing()` wraps the AOTAutograd call of one Dynamo graph; every aten graph
Kitsune compiles inside it reports itself (`compiled(record)`); when AOTAutograd
returns, its time less those compiles, plus Dynamo's tracing of the frame (from
torch's own compile-time metrics, where this torch keeps them), goes to the
first record. A backward graph compiled later, at the first backward, is not
inside it and is not counted twice."""
from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar

from kitsune._compat import dynamo_trace_seconds

_OPEN: ContextVar = ContextVar("kitsune_capture_clock", default=None)


@contextmanager
def capturing():
    state = {"records": [], "start": time.perf_counter()}
    token = _OPEN.set(state)
    try:
        yield
    finally:
        _OPEN.reset(token)
        if state["records"]:
            elapsed = time.perf_counter() - state["start"]
            own = sum(record.compile_seconds for record in state["records"])
            first = state["records"][0]
            first.phases["capture"] = max(0.0, elapsed - own) + dynamo_trace_seconds()


def compiled(record) -> None:
    """Called by the compiler for each graph it compiled (outside a capture: nothing)."""
    state = _OPEN.get()
    if state is not None:
        state["records"].append(record)
