"""Graph rewrites that replace a named pattern by a different computation
(a convolution with folded batch-norm weights, a re-associated matrix chain,
a chunked linear + cross-entropy), and the record each one leaves.

A rewrite is not a fusion group: what runs instead is another aten/custom op
sequence, so the planner never sees the pattern. Each rewrite pass returns a
`Rewrite` per place it looked at (applied or not, with the reason), and the
compiler turns them into the pattern's `FusionOpportunity` with status
"applied" and the choice made, so `explain()` says what happened.

Rewrites of the graph Dynamo hands over (before AOTAutograd) are collected in
`collecting()` and attached to the records of the aten graphs compiled from it.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass


@dataclass
class Rewrite:
    """One place a rewrite pass looked at.

    pattern:  the built-in pattern name it serves ("conv_bn_activation", "matrix_chain",
              "softmax_cross_entropy", "linear_activation")
    ops:      the user operations it covers, e.g. ("conv", "batch_norm")
    nodes:    names of the graph nodes it covers
    choice:   what runs instead (for reports), e.g. "folded into the convolution's weights"
    applied:  False where the pass declined; `reason` says why
    """

    pattern: str
    ops: tuple
    nodes: tuple
    choice: str = ""
    applied: bool = True
    reason: str = ""
    seconds: float | None = None  # measured time of the choice, where one was measured


_PENDING: contextvars.ContextVar = contextvars.ContextVar("kitsune_pending_rewrites", default=None)


@contextlib.contextmanager
def collecting():
    """Collect the rewrites made on a Dynamo graph while its aten graphs compile."""
    token = _PENDING.set([])
    try:
        yield _PENDING.get()
    finally:
        _PENDING.reset(token)


def note(rewrites) -> None:
    """Add `rewrites` (made before AOTAutograd) to the collection, if one is open."""
    pending = _PENDING.get()
    if pending is not None:
        pending.extend(rewrites)


def take() -> list:
    """The rewrites collected so far, handed to one record (the first aten graph compiled)."""
    pending = _PENDING.get()
    if not pending:
        return []
    out = list(pending)
    pending.clear()
    return out
