"""Measured fuse-or-not decisions (`FusionConfig.min_fusion_benefit`).

When measurement is on — the one rule is `measuring()`: `FusionEngine(profile=True)`,
a config with `measure=True` (what `torch.compile(..., mode="max-autotune")` sets),
or a config whose `min_fusion_benefit` is not its default, on every entry point
(`torch.compile(m, backend=make_backend(config))`, `kitsune.optimize(m, config)`,
`FusionEngine`) — `measured()` wraps a compiled graph so that its first call
with real inputs times each fused kernel against its unfused baseline on the
very inputs it receives, before a CUDA-graph runner records anything (the
runner wraps what `measured()` returns and records on a later call, so a
kernel switched off here is what gets recorded).

The baseline is the user's own ops where they can be rebuilt
(`kitsune.tuning.baseline`), else the group's decomposed ops; the
measurement records which ("baseline") and why. Fused and unfused calls are
timed interleaved, in rounds; a measurement stops when the speed-ups of its
last `MIN_ROUNDS` rounds agree within `TOLERANCE` (or all fall on one side of
the threshold), and after `MAX_ROUNDS` rounds or `MAX_SECONDS` reports that it
could not decide. A kernel measured less than `min_fusion_benefit` times
faster than its baseline runs unfused from then on, with the measurement as
the recorded reason; an undecided one keeps its fusion.

Decided measurements are cached on disk (``KITSUNE_CACHE_DIR/decisions``),
keyed by the kernel's computation (a stable rendering of its KernelSpec), the
input shapes, strides and dtypes, the device, the backend, the baseline kind
and the Kitsune and torch versions, with what they came from: medians per
round, spread, device, when. Undecided ones are not cached. A cached "run
unfused" older than `REMEASURE_AFTER_S` is measured again;
``KITSUNE_REMEASURE=1`` measures every group again (and rewrites the cache).
Deleting ``KITSUNE_CACHE_DIR/decisions`` forgets every decision.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
from torch import fx

from kitsune import _compat
from kitsune.cache import cache_dir, write_atomic
from kitsune.capture.dynamo import user_graph
from kitsune.config import FusionConfig
from kitsune.tuning.baseline import DECOMPOSED_OPS, USER_OPS, UserOps, is_group_call, user_op_baselines

log = logging.getLogger("kitsune")

DEFAULT_BENEFIT = FusionConfig.__dataclass_fields__["min_fusion_benefit"].default
ROUND_SAMPLES = 5          # timed calls of each side per round, interleaved
MIN_ROUNDS = 3             # rounds whose speed-ups must agree
MAX_ROUNDS = 12
MAX_SECONDS = 2.0          # per group: past this (and MIN_ROUNDS) an unsettled measurement is undecided
TOLERANCE = 0.05           # (max - min) / median of the last MIN_ROUNDS rounds' speed-ups
REMEASURE_AFTER_S = 7 * 24 * 3600  # a cached "run unfused" is measured again after a week
# Measuring this many fused groups or more shows a progress line on stderr when it is a terminal.
PROGRESS_MIN_GROUPS = 8


def measuring(config: FusionConfig, profile: bool = False) -> bool:
    """Whether compiled graphs measure their fused kernels: asked for by
    `FusionEngine(profile=True)`, by `FusionConfig(measure=True)` (mode
    "max-autotune"), or by a config whose min_fusion_benefit is not the
    default (a threshold is a request to measure against it)."""
    return profile or config.measure or config.min_fusion_benefit != DEFAULT_BENEFIT


def measured(compiled, aten_gm: fx.GraphModule, record, config: FusionConfig, profile: bool = False,
             on_done=None):
    """`compiled`, or, when `measuring(config, profile)` and it has fused kernels, a
    function with its calling convention whose first real call measures and decides
    each of them. Call it before wrapping the result in a CUDA-graph runner.
    `on_done(decided)`: called after the measurement with {kernel name: decision key}
    of the groups decided (the compiled-graph cache keeps them; `cached_decisions`
    reads them back)."""
    if not measuring(config, profile) or not isinstance(compiled, fx.GraphModule):
        return compiled
    calls = [n.target for n in compiled.graph.nodes if is_group_call(n.target)]
    if not any(call.kernel is not None for call in calls):
        return compiled
    try:
        baselines = user_op_baselines(aten_gm, compiled, record, user_graph())
    except Exception as error:  # noqa: BLE001 - the decomposed ops remain a baseline
        log.debug("no user-op baselines for the %s graph: %s", record.name, error)
        baselines = {}
    forward, pending = compiled.forward, [True]

    def run(*args):
        if not pending or _fake(args):
            return forward(*args)
        pending.clear()
        measurer = _Measurer(compiled, record, config, baselines)
        start = time.perf_counter()
        try:
            with torch.no_grad(), _outside_dispatch_modes():
                measurer.run(*args)
        except Exception as error:  # noqa: BLE001 - measuring must never break the model
            log.warning("could not measure the %s graph: %s: %s", record.name, type(error).__name__, error)
        finally:
            measurer.progress(end=True)
            baselines.clear()
            record.phases["measure"] = record.phases.get("measure", 0.0) + time.perf_counter() - start
        if on_done is not None and not getattr(record, "measure_skipped", 0):
            on_done({name: m["key"] for name, m in record.measured.items()
                     if m.get("decision") != "undecided" and "key" in m})
        return forward(*args)

    run.__wrapped__ = compiled
    return run


def _outside_dispatch_modes():
    """Times ops as the user's program runs them: AOTAutograd runs a graph's first
    call under a TorchDispatchMode of its own (`_AnalyzeCustomOpInputOutputMode`,
    torch 2.13), which sends every op through Python: 24 ms for a 40 us layer norm."""
    return _compat.disable_dispatch_modes()


def _fake(args) -> bool:
    """Inputs that cannot be timed: fake or meta tensors, or a CUDA graph being recorded."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True
    return any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args) or \
        _compat.detect_fake_mode(args) is not None


class _Measurer(fx.Interpreter):
    """Runs the compiled graph once, measuring each fused kernel on the inputs it gets."""

    def __init__(self, gm, record, config, baselines):
        super().__init__(gm)
        self.record, self.config, self.baselines = record, config, baselines
        self.backend_of = {name: backend for name, _, backend in record.groups}
        self.total = sum(1 for n in gm.graph.nodes if is_group_call(n.target))
        self.done = 0
        self.graph_inputs = ()
        # the graph's timing budget (FusionConfig.measure_budget_s): measurements past it are skipped
        self.deadline = time.perf_counter() + config.measure_budget_s
        record.measure_budget_s = config.measure_budget_s

    def run(self, *args):
        self.graph_inputs = args
        return super().run(*args)

    def call_function(self, target, args, kwargs):
        if is_group_call(target):
            self.done += 1  # every group counts, so that the progress line ends at total/total
            if target.kernel is not None:
                try:
                    self._decide(target, args)
                except Exception as error:  # noqa: BLE001 - measuring must never break the model
                    log.warning("could not time %s: %s", target.spec.name, error)
            self.progress()
        return super().call_function(target, args, kwargs)

    def progress(self, end: bool = False) -> None:
        if self.total >= PROGRESS_MIN_GROUPS and sys.stderr.isatty():
            if end:
                print(file=sys.stderr)
            else:
                print(f"\rkitsune: timing fused kernels {self.done}/{self.total}", end="", file=sys.stderr,
                      flush=True)

    def _decide(self, call, args) -> None:
        name, threshold = call.spec.name, self.config.min_fusion_benefit
        unfused, unfused_args, baseline, why = self._baseline(call, args)
        device = args[0].device if args else call.device
        key = decision_key(call, args, self.backend_of.get(name, ""), baseline)
        m = _load(key)
        cached = m is not None and reusable(m, threshold)
        left = self.deadline - time.perf_counter()
        if not cached and left <= 0:  # a cached decision costs nothing and still applies
            if not getattr(self.record, "measure_skipped", 0):
                log.info("%s graph: measure budget of %.1f s spent; groups not yet decided keep their fusion",
                         self.record.name, self.config.measure_budget_s)
            self.record.measure_skipped = getattr(self.record, "measure_skipped", 0) + 1
            return
        if not cached:
            m = measure_pair(call, args, unfused, unfused_args, device, threshold,
                             max_seconds=min(MAX_SECONDS, left))
            m.update(baseline=baseline, device=device_name(device), when=_now())
            if verdict(m, threshold) is not None:
                _store(key, m)
        decision = verdict(m, threshold)
        m = dict(m, cached=cached, key=key, decision=decision or "undecided")
        if why:
            m["baseline_why"] = why
        self.record.measured[name] = m
        apply_decision(self.record, call, m, threshold)

    def _baseline(self, call, args):
        """(unfused callable, its arguments, baseline kind, why not the user's ops)."""
        user = self.baselines.get(call.spec.name)
        if isinstance(user, UserOps):
            inputs = user.inputs(self.graph_inputs, args)
            try:
                user.fn(*inputs)  # a baseline that does not run is no baseline
                return user.fn, inputs, USER_OPS, None
            except Exception as error:  # noqa: BLE001
                user = f"the user ops failed: {type(error).__name__}: {error}"
        return call.fallback, args, DECOMPOSED_OPS, user or "no user ops recorded for the group"


def apply_decision(record, call, m: dict, threshold: float) -> None:
    """Acts on measurement `m` of `call`'s kernel: switches it off (recorded as a
    decision, not a failure) when it says "unfused"; logs each decision at INFO."""
    name = call.spec.name
    note = (f"{m.get('baseline', DECOMPOSED_OPS)} baseline, spread {m['spread']:.0%}, "
            f"{len(m['rounds'])} rounds" + (f"; cached decision measured {m.get('when', '?')} on "
                                             f"{m.get('device', '?')}" if m.get("cached") else ""))
    if m["decision"] == "unfused":
        reason = f"measured {m['speedup']:.2f}x faster than unfused < min_fusion_benefit={threshold} ({note})"
        call.kernel, call.failure = None, reason  # a decision, not a failure: no warning
        nodes = next((list(n) for k, n, _ in record.groups if k == name), [name])
        record.groups = [g for g in record.groups if g[0] != name]
        record.kernels_after += len(nodes) - 1
        record.fallbacks.append((" → ".join(nodes), reason))
        log.info("%s runs unfused: %s", name, reason)
    elif m["decision"] == "fused":
        log.info("%s kept: %.2fx faster than its unfused ops (%s)", name, m["speedup"], note)
    else:
        log.info("%s kept, undecided: %.2fx faster than its unfused ops, speed-ups spread %.2fx to "
                 "%.2fx across rounds (%s)", name, m["speedup"], m["low"], m["high"], note)


# -- timing -----------------------------------------------------------------------------------


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, args, device) -> float:
    """Seconds one call of `fn(*args)` takes (tests replace this)."""
    _sync(device)
    start = time.perf_counter()
    fn(*args)
    _sync(device)
    return time.perf_counter() - start


def measure_pair(fused, fused_args, unfused, unfused_args, device, threshold: float,
                 max_seconds: float = MAX_SECONDS) -> dict:
    """Times `fused` against `unfused` in interleaved rounds until `verdict` can
    decide (or MAX_ROUNDS rounds / `max_seconds` pass). Returns the summary of the last
    MIN_ROUNDS rounds (see `summary`), with every round's medians."""
    fused(*fused_args)      # warm-up and first-call work
    unfused(*unfused_args)
    rounds, start = [], time.perf_counter()
    while True:
        f, u = [], []
        for i in range(ROUND_SAMPLES):  # alternate which side goes first: drift hits both
            if i % 2:
                u.append(_time(unfused, unfused_args, device))
            f.append(_time(fused, fused_args, device))
            if not i % 2:
                u.append(_time(unfused, unfused_args, device))
        rounds.append([statistics.median(f), statistics.median(u)])
        if len(rounds) < MIN_ROUNDS:
            continue
        m = summary(rounds)
        if verdict(m, threshold) is not None or len(rounds) >= MAX_ROUNDS or \
                time.perf_counter() - start > max_seconds:
            return m


def summary(rounds: list) -> dict:
    """fused_s, unfused_s: medians of the last MIN_ROUNDS rounds' medians; speedup =
    unfused_s / fused_s; low/high: the least and greatest of those rounds' speed-ups;
    spread = (high - low) / speedup; rounds: [fused, unfused] median per round."""
    window = rounds[-MIN_ROUNDS:]
    fused = statistics.median(f for f, _ in window)
    unfused = statistics.median(u for _, u in window)
    ratios = [u / f if f > 0 else 1.0 for f, u in window]
    speedup = unfused / fused if fused > 0 else 1.0
    low, high = min(ratios), max(ratios)
    return {"fused_s": fused, "unfused_s": unfused, "speedup": speedup, "low": low, "high": high,
            "spread": (high - low) / speedup if speedup > 0 else float("inf"),
            "rounds": [list(r) for r in rounds], "samples": ROUND_SAMPLES * len(rounds)}


def verdict(m: dict, threshold: float) -> str | None:
    """"fused" or "unfused" when measurement `m` decides against `threshold`, else None:
    its rounds agree within TOLERANCE, or all fall on one side of the threshold."""
    if m["spread"] <= TOLERANCE:
        return "fused" if m["speedup"] >= threshold else "unfused"
    if m["low"] >= threshold:
        return "fused"
    if m["high"] < threshold:
        return "unfused"
    return None


# -- the decision cache -----------------------------------------------------------------------


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


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{torch.get_num_threads()}"


def decision_key(call, inputs, backend: str, baseline: str = DECOMPOSED_OPS) -> str:
    import kitsune
    device = inputs[0].device if inputs else call.device
    text = "\n".join([stable_spec_text(call.spec), repr([(tuple(t.shape), tuple(t.stride()), str(t.dtype))
                                                        for t in inputs if isinstance(t, torch.Tensor)]),
                      device_name(device), backend, baseline, kitsune.__version__, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def reusable(m: dict, threshold: float) -> bool:
    """Whether cached measurement `m` decides now: it decides against this threshold,
    KITSUNE_REMEASURE is not set, and a "run unfused" is not older than REMEASURE_AFTER_S."""
    if os.environ.get("KITSUNE_REMEASURE", "") not in ("", "0"):
        return False
    try:
        decision = verdict(m, threshold)
    except (KeyError, TypeError):  # written by an older Kitsune
        return False
    if decision == "unfused":
        try:
            age = time.time() - datetime.fromisoformat(m["when"]).timestamp()
        except (KeyError, TypeError, ValueError):
            return False
        return age < REMEASURE_AFTER_S
    return decision is not None


_reusable = reusable  # the name tests know


def cached_decisions(keys: dict, threshold: float) -> dict | None:
    """{kernel name: measurement} read from the decision cache for `keys` ({kernel
    name: decision key}), each marked cached; None unless every one is there and
    still decides (`reusable`): then the graph is measured again."""
    found = {}
    for name, key in keys.items():
        m = _load(key)
        if m is None or not reusable(m, threshold):
            return None
        found[name] = dict(m, cached=True, key=key, decision=verdict(m, threshold))
    return found


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _load(key: str) -> dict | None:
    path = cache_dir("decisions") / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _store(key: str, m: dict) -> None:
    try:
        write_atomic(cache_dir("decisions") / f"{key}.json", json.dumps(m))
    except OSError as error:  # a read-only cache must not break the model
        log.debug("cannot cache decision %s: %s", key, error)
