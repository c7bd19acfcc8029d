"""Measured fuse-or-not decisions (`FusionEngine(profile=True)`).

On the first call of a compiled graph with real inputs, each fused kernel is
timed against its unfused ops (the group's PyTorch fallback) on the very
inputs it receives. A kernel less than ``FusionConfig.min_fusion_benefit``
times faster than its unfused ops is disabled: the group runs through PyTorch
from then on, with the measurement as the recorded reason.

Decisions are cached on disk (``KITSUNE_CACHE_DIR/decisions``), keyed by the
kernel's computation (a stable rendering of its KernelSpec), the input shapes,
strides and dtypes, the device, the backend and the Kitsune version: a new
shape, dtype, device or version re-decides; a second process start with the
same model skips the timing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time

import torch
from torch import fx

from kitsune.cache import cache_dir, write_atomic
from kitsune.runtime.fused_call import FusedGroupCall

log = logging.getLogger("kitsune")
REPEATS = 5
# Profiling this many fused groups or more shows a progress line on stderr when it is a terminal.
PROGRESS_MIN_GROUPS = 8


def stable_spec_text(spec) -> str:
    """What a kernel computes, identical across processes (KernelSpec.structure_key is
    built from Python hashes, which change from one process to the next)."""
    from kitsune.ir.scalar import walk
    names, parts = {}, [f"numel={spec.numel} reduction={getattr(spec, 'reduction', None)!r}",
                        repr([(i.name, str(i.dtype)) for i in spec.inputs])]
    for v in walk([o.value for o in spec.outputs]):
        names[v] = f"t{len(names)}"
        parts.append(f"{names[v]}={v.op}[{v.attr!r}]({','.join(names[a] for a in v.args)}):{v.dtype}")
    parts += [f"{o.name}:{o.dtype}:{o.index!r}<-{names[o.value]}" for o in spec.outputs]
    return "\n".join(parts)


def decision_key(call: FusedGroupCall, inputs, backend: str) -> str:
    import kitsune
    device = inputs[0].device if inputs else call.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{torch.get_num_threads()}"
    text = "\n".join([stable_spec_text(call.spec), repr([(tuple(t.shape), tuple(t.stride()), str(t.dtype))
                                                        for t in inputs if isinstance(t, torch.Tensor)]),
                      name, backend, kitsune.__version__, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _load(key: str) -> dict | None:
    path = cache_dir("decisions") / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _store(key: str, decision: dict) -> None:
    try:
        write_atomic(cache_dir("decisions") / f"{key}.json", json.dumps(decision))
    except OSError as error:  # a read-only cache must not break the model
        log.debug("kitsune: cannot cache decision %s: %s", key, error)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, args, device) -> float:
    fn(*args)  # warm-up (and first-call work)
    best = float("inf")
    for _ in range(REPEATS):
        _sync(device)
        start = time.perf_counter()
        fn(*args)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


class _Profiler(fx.Interpreter):
    def __init__(self, gm, record, config, backend_of):
        super().__init__(gm)
        self.record, self.config, self.backend_of = record, config, backend_of
        self.total = sum(1 for n in gm.graph.nodes if isinstance(n.target, FusedGroupCall))
        self.done = 0

    def call_function(self, target, args, kwargs):
        if isinstance(target, FusedGroupCall):
            self.done += 1  # every group counts, so that the progress line ends at total/total
            if target.kernel is not None:
                try:
                    self._decide(target, args)
                except Exception as error:  # noqa: BLE001 - measuring must never break the model
                    log.warning("kitsune: could not time %s: %s", target.spec.name, error)
            if self.total >= PROGRESS_MIN_GROUPS and sys.stderr.isatty():
                print(f"\rkitsune: timing fused kernels {self.done}/{self.total}", end="", file=sys.stderr,
                      flush=True)
        return super().call_function(target, args, kwargs)

    def _decide(self, call: FusedGroupCall, args) -> None:
        name = call.spec.name
        backend = self.backend_of.get(name, "")
        key = decision_key(call, args, backend)
        decision = _load(key)
        cached = decision is not None
        if decision is None:
            device = args[0].device if args else call.device
            fused = _time(call, args, device)
            unfused = _time(call.fallback, args, device)
            decision = {"fused_s": fused, "unfused_s": unfused, "speedup": unfused / fused if fused > 0 else 1.0}
            _store(key, decision)
        decision = dict(decision, cached=cached, key=key)
        self.record.measured[name] = decision
        threshold = self.config.min_fusion_benefit
        if decision["speedup"] < threshold:
            reason = (f"measured {decision['speedup']:.2f}x faster than unfused < min_fusion_benefit={threshold}"
                      + (" (cached decision)" if cached else ""))
            call.kernel, call.failure = None, reason  # a decision, not a failure: no warning
            nodes = _group_nodes(self.record, name)
            self.record.groups = [g for g in self.record.groups if g[0] != name]
            self.record.kernels_after += len(nodes) - 1
            self.record.fallbacks.append((" → ".join(nodes), reason))
            log.info("kitsune: %s runs unfused: %s", name, reason)
        else:
            log.info("kitsune: %s kept: %.2fx faster than its unfused ops%s", name, decision["speedup"],
                     " (cached decision)" if cached else "")


def _group_nodes(record, kernel) -> list:
    for name, nodes, _ in record.groups:
        if name == kernel:
            return list(nodes)
    return [kernel]


def profiled(gm: fx.GraphModule, record, config):
    """`gm`'s calling convention; its first call times and decides every fused kernel."""
    backend_of = {name: backend for name, _, backend in record.groups}
    state = {"done": False}

    def run(*args):
        if state["done"]:
            return gm(*args)
        state["done"] = True
        if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args) or \
                torch._guards.detect_fake_mode(args) is not None:
            state["done"] = False
            return gm(*args)
        profiler = _Profiler(gm, record, config, backend_of)
        with torch.no_grad():
            profiler.run(*args)
        if profiler.total >= PROGRESS_MIN_GROUPS and sys.stderr.isatty():
            print(file=sys.stderr)
        from kitsune.report.analysis import finalize
        finalize(record)
        return gm(*args)

    run.__wrapped__ = gm
    return run
