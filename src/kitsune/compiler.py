"""The pipeline for one captured aten graph: plan → lower → generate → run.

`compile_graph` is what capture hands every forward/backward graph to. It
never raises for a graph it cannot improve: the worst case is the graph
running as captured, through PyTorch, with the reason logged and counted.

The compiler decides nothing: `kitsune.planner.plan_graph` chooses the groups
and records every decision; the compiler lowers each group, lets the planner
ask the group's backend (`planner.admit`), builds the kernels, records a
failed lowering or build in the plan (`FusionPlan.refuse`) and runs the rest.

A graph compiled before (this process or another, same key: `runtime.graph_cache`)
is loaded instead: its groups, kernels, decisions and measured decisions come from
the cache entry, and planning, lowering, generation and builds are skipped.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import fx

from kitsune.capture import clock as _capture
from kitsune.capture.chains import reassociate_matmul_chains
from kitsune.capture.restore import restore_aten, restored_copy
from kitsune.capture.simplify import simplify
from kitsune.codegen.backends import Backend, backend_for, build_counts, get_backend
from kitsune.codegen.kernel import KernelError
from kitsune.codegen.lower import lower_group
from kitsune.config import FusionConfig
from kitsune.ir.eager_count import captured_kernel_count, eager_kernel_count
from kitsune.ir.graph import group_fallback, meta, size_inputs
from kitsune.ir.ops import NotFusible
from kitsune.sizes import hints_from
from kitsune.planner import FusionPlan, admit, plan_graph
from kitsune.planner.detect import detect_patterns, needs_detection
from kitsune.planner.naming import kernel_kind, kernel_name
from kitsune.record import GraphRecord, default_sink
from kitsune.runtime import graph_cache
from kitsune.runtime.compiled_graph import bind_fast_targets, build_graph_module
from kitsune.runtime.fused_call import FusedGroupCall
from kitsune.runtime.matmul import align_matmuls
from kitsune.tuning.measure import apply_decision, cached_decisions, measured, measuring

log = logging.getLogger("kitsune")


def build_kernels(backend: Backend, specs: list) -> list:
    """`backend.build(specs)`: a kernel per spec, or the exception that stopped it
    (one seam for tests that stand in for a code generator)."""
    return backend.build(specs)


def compile_graph(gm: fx.GraphModule, example_inputs, kind: str = "graph",
                  config: FusionConfig | None = None, stats=None, profile: bool = False):
    """Compile one aten graph; returns a callable with gm's calling convention.
    `stats`: where the GraphRecord goes (anything with `.record(record)`; default:
    the process-wide `kitsune.report.stats.GLOBAL_STATS`).
    `profile`: measure fused kernels (kitsune.tuning.measure.measuring)."""
    config = config or FusionConfig()
    stats = stats if stats is not None else default_sink()
    start = time.perf_counter()
    record = GraphRecord(name=kind, kernels_before=eager_kernel_count(gm.graph, kind), kernels_after=0)
    with phase(record, "rewrite"):
        folds = _rewrite(gm, kind, config, record)
    record.aten_ops = captured_kernel_count(gm.graph)
    builds = build_counts()
    try:
        with hints_from(example_inputs):
            compiled = _compile(gm, config, record, example_inputs, profile)
    except Exception as error:  # noqa: BLE001 - never crash the user's model
        log.warning("%s graph runs unfused through PyTorch: %s: %s", kind, type(error).__name__, error,
                    exc_info=log.isEnabledFor(logging.DEBUG))
        record.fallbacks.append((kind, f"{type(error).__name__}: {error}"))
        record.groups.clear()
        record.kernel_calls.clear()
        compiled = restored_copy(gm)  # prims.* run as aten ops; gm stays the graph as planned
    record.kernel_builds = sum(build_counts().values()) - sum(builds.values())
    # a split reduction launches two kernels (its parts, then their finish)
    extra = sum(len(getattr(call.kernel, "launches", [call.kernel])) - 1 for call in record.kernel_calls.values())
    record.kernels_after = record.aten_ops - sum(len(nodes) - 1 for _, nodes, _ in record.groups) + extra
    training = kind in ("forward", "backward")
    replay = (kind == "inference" or training) and config.cuda_graphs and \
        _cuda_graph_blocker(gm, example_inputs, compiled, record, training) is None
    if compiled is not gm and isinstance(compiled, fx.GraphModule):  # Kitsune's own copy, fallback included
        bind_fast_targets(compiled)  # after every analysis that reads its aten targets
    # outputs a padded matmul returns as views, to be copied into eager's strides
    strides = getattr(compiled, "meta", {}).get("kitsune_restride") if isinstance(compiled, fx.GraphModule) else None
    # measured on the first real call, before a CUDA-graph runner records the graph
    if not record.measured_from_cache:
        on_done = functools.partial(graph_cache.update_measured, record.cache_key) if record.cache_key else None
        compiled = measured(compiled, gm, record, config, profile, on_done=on_done)
    if replay:
        from kitsune.runtime.cuda_graphs import CudaGraphRunner, SizeKeyedRunner
        record.cuda_graph = True
        runner = SizeKeyedRunner if any(not isinstance(t, torch.Tensor) for t in example_inputs) else CudaGraphRunner
        compiled = runner(compiled, f"{record.name} graph", training=training,
                          copy_out=_user_outputs(gm) if kind == "forward" else (), before_replay=_refreshers(folds),
                          restride=strides or {}, on_record=functools.partial(add_phase, record, "cuda_graph"))
    elif strides:
        from kitsune.runtime.matmul import restrided
        compiled = restrided(compiled, strides)
    record.compile_seconds = time.perf_counter() - start
    record.phases["other"] = max(0.0, record.compile_seconds - sum(record.phases.values()))
    _capture.compiled(record)
    stats.record(record)
    return compiled


@contextmanager
def phase(record: GraphRecord, name: str):
    """Adds the time spent in the block to `record.phases[name]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        add_phase(record, name, time.perf_counter() - start)


def add_phase(record: GraphRecord, name: str, seconds: float) -> None:
    record.phases[name] = record.phases.get(name, 0.0) + seconds


def _rewrite(gm: fx.GraphModule, kind: str, config: FusionConfig, record: GraphRecord) -> list:
    """Rewrites before planning (kitsune.capture): batch norms folded into the
    convolutions before them (inference graphs; on CUDA, a ReLU after them into
    cuDNN's fused call where that measures faster) or decomposed; on CUDA, a
    Linear's ReLU/GELU into cuBLASLt's epilogue where that measures faster. Returns the folds
    (ConvBnFold, placeholder positions of what it reads). A rewrite that fails
    leaves the graph as it was, logged."""
    from kitsune.capture.fold import decompose_batch_norm, fold_conv_batch_norm
    from kitsune.capture import rewrites as pending

    record.rewrites.extend(pending.take())  # made on the Dynamo graph this one comes from
    folds = []
    cuda = kind == "inference" and _on_cuda(gm)
    try:
        if kind == "inference" and config.pattern_enabled("conv_bn_activation"):
            done, folds = fold_conv_batch_norm(gm)
            record.rewrites.extend(done)
            if cuda:
                from kitsune.capture.conv_epilogue import fuse_conv_relu
                fuse_conv_relu(gm, record.rewrites)
        if cuda and config.pattern_enabled("linear_activation"):
            from kitsune.capture.matmul_epilogue import fuse_addmm_activation
            fuse_addmm_activation(gm, record.rewrites)
        decompose_batch_norm(gm)
    except Exception as error:  # noqa: BLE001 - never crash the user's model
        log.warning("%s graph: a rewrite failed, it runs as captured: %s: %s", kind,
                    type(error).__name__, error, exc_info=log.isEnabledFor(logging.DEBUG))
        record.fallbacks.append(("rewrite", f"{type(error).__name__}: {error}"))
    return folds


def _on_cuda(gm: fx.GraphModule) -> bool:
    return any(isinstance(v := n.meta.get("val"), torch.Tensor) and v.is_cuda
               for n in gm.graph.nodes if n.op == "placeholder")


def _refreshers(folds) -> tuple:
    """Before a CUDA-graph replay: recompute folded weights whose sources changed
    (a replay runs no Python, so the folds' own checks would not run)."""
    def refresher(fold, positions):
        return lambda args: fold.refresh(tuple(None if i is None else args[i] for i in positions))
    return tuple(refresher(fold, positions) for fold, positions in folds)


def _cuda_graph_blocker(gm, example_inputs, compiled, record, training) -> str | None:
    """Why the compiled graph is not replayed as a CUDA graph (logged), or None."""
    from kitsune.runtime.cuda_graphs import cuda_graph_blocker

    blocker = cuda_graph_blocker(gm, example_inputs, compiled, training)
    if blocker is not None and any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        log.info("%s graph runs without CUDA graphs: %s", record.name, blocker)
    return blocker


def _user_outputs(gm: fx.GraphModule) -> range:
    """Positions of a forward graph's outputs that reach the user (mutated inputs,
    the model's outputs), as opposed to the activations saved for the backward:
    AOTAutograd puts them first and records how many (`num_forward_returns`).
    Empty where that is not known."""
    from kitsune import _compat

    count = _compat.forward_output_count()
    return range(count) if isinstance(count, int) else range(0)


def _compile(gm: fx.GraphModule, config: FusionConfig, record: GraphRecord, example_inputs=(),
             profile: bool = False) -> fx.GraphModule:
    with phase(record, "rewrite"):
        simplify(gm)
        if config.pattern_enabled("matrix_chain"):
            record.rewrites.extend(reassociate_matmul_chains(gm))
    key = None
    if graph_cache.enabled(config):
        with phase(record, "cache_load"):
            key = graph_cache.graph_key(gm, example_inputs, record.name, config)
            entry = graph_cache.load(key)
            lowered = _restore(gm, entry, config, record, profile) if entry is not None else None
        if lowered is not None:
            record.from_cache, record.cache_key = True, key
            with phase(record, "assemble"):
                return _assemble(gm, lowered, entry.get("nothing_fused"), config, record)
    with phase(record, "plan"):
        plan = plan_graph(gm, config, record.name)
        _record_plan(gm, plan, config, record)
    planned_fallbacks = len(plan.fallbacks)
    with phase(record, "lower"):
        lowered = _lower(plan, record)
    with phase(record, "build"):
        _build(plan, lowered, record)
    why_nothing = plan.why_nothing_fused() if not any(e[1].kernel is not None for e in lowered) else None
    # not cached: a graph whose user pattern replacements rewrote gm (the key cannot
    # reproduce that), or where a lowering or a build failed (perhaps only this time)
    if key is not None and not plan.replaced and len(plan.fallbacks) == planned_fallbacks:
        with phase(record, "cache_store"):
            _store(key, lowered, record, why_nothing)
    with phase(record, "assemble"):
        return _assemble(gm, lowered, why_nothing, config, record)


def _store(key: str, lowered: list, record: GraphRecord, why_nothing: str | None) -> None:
    try:
        entry = _entry(lowered, record, why_nothing)
    except Exception as error:  # noqa: BLE001 - a kernel a backend cannot describe: not cached
        log.debug("%s graph not cached: %s: %s", record.name, type(error).__name__, error)
        return
    if graph_cache.store(key, entry):
        record.cache_key = key


def _entry(lowered: list, record: GraphRecord, why_nothing: str | None) -> dict:
    """What `_restore` needs to rebuild this compile in another process (graph_cache)."""
    groups = []
    for group, call, inputs, outputs, backend in lowered:
        if call.kernel is None:
            continue
        groups.append(dict(name=call.spec.name, nodes=[n.name for n in group.nodes], label=group.label(),
                           inputs=[n.name for n in inputs], outputs=[n.name for n in outputs], spec=call.spec,
                           backend=backend.name, state=backend.kernel_state(call.kernel)))
    return dict(groups=groups, decisions=list(record.decisions), fallbacks=list(record.fallbacks),
                nothing_fused=why_nothing, measured={})


class _CachedGroup:
    """A fused group as a cache entry gives it back: its nodes and its label."""

    def __init__(self, nodes: list, label: str):
        self.nodes, self._label = nodes, label

    def label(self) -> str:
        return self._label


def _restore(gm: fx.GraphModule, entry: dict, config: FusionConfig, record: GraphRecord,
             profile: bool) -> list | None:
    """The lowered groups of a cached compile of `gm`, their kernels loaded, with the
    record filled as the cold compile filled it; None (logged) if the entry does not fit."""
    try:
        nodes = {n.name: n for n in gm.graph.nodes}
        lowered = []
        for g in entry["groups"]:
            members, inputs, outputs = ([nodes[name] for name in g[k]] for k in ("nodes", "inputs", "outputs"))
            call = _group_call(g["spec"], inputs, outputs, members)
            backend = get_backend(g["backend"])
            call.attach(backend.load(g["spec"], g["state"]))
            lowered.append((_CachedGroup(members, g["label"]), call, inputs, outputs, backend))
        decisions, fallbacks, measured_before = list(entry["decisions"]), list(entry["fallbacks"]), \
            dict(entry.get("measured") or {})
    except Exception as error:  # noqa: BLE001 - a stale entry costs a compile, never the model
        log.warning("%s graph: cached compile not used, compiling: %s: %s", record.name, type(error).__name__, error)
        return None
    record.decisions, record.fallbacks = decisions, fallbacks
    record.graph, record.config = gm.graph, config
    record.pending_detection = functools.partial(detect_patterns, gm.graph, config, record.name)
    for group, call, _, _, backend in lowered:
        record.kernel_calls[call.spec.name] = call
        record.groups.append((call.spec.name, [n.name for n in group.nodes], backend.name))
    if measured_before and measuring(config, profile) and set(measured_before) >= set(record.kernel_calls):
        decided = cached_decisions(measured_before, config.min_fusion_benefit)
        for name, m in (decided or {}).items():
            if name not in record.kernel_calls:
                continue
            record.measured[name] = m
            apply_decision(record, record.kernel_calls[name], m, config.min_fusion_benefit)
        record.measured_from_cache = decided is not None
    return lowered


def _assemble(gm: fx.GraphModule, lowered: list, why: str | None, config: FusionConfig,
              record: GraphRecord) -> fx.GraphModule:
    """The graph module that runs: fused groups as kernel calls, the rest as aten ops.
    `why`: the plan's reason when nothing fused."""
    calls = {id(g): (g, call, ins, outs) for g, call, ins, outs, _ in lowered if call.kernel is not None}
    if not calls and why is not None:  # never silent: once per graph
        log.info("%s graph: nothing fused, it runs through PyTorch: %s", record.name, why)
        if not record.fallbacks:  # else its refused groups say why
            record.fallbacks.append(("whole graph", f"nothing fused: {why}"))
    # with nothing fused the runtime still gets its own graph: binding fast targets and
    # aligning matmuls rewrite it, and the record keeps the graph as planned
    result = build_graph_module(gm, calls) if calls else fx.GraphModule(gm, copy.deepcopy(gm.graph))
    if calls and os.environ.get("KITSUNE_TRITON_MATMUL", "") not in ("", "0") \
            and config.pattern_enabled("linear_activation") and _on_cuda(gm):
        from kitsune.runtime.matmul_fusion import fuse_matmul_epilogues  # imports Triton
        fuse_matmul_epilogues(result, record)  # cuBLAS + kernel or one Triton matmul: measured
    restore_aten(result)  # what PyTorch runs: the user's aten ops, not prims.* leftovers
    aligned = align_matmuls(result, padded_outputs=record.name == "inference")
    if aligned:
        log.info("%d matmul(s) write padded rows (fast cuBLAS kernels for odd widths)", aligned)
    return result


def _record_plan(gm: fx.GraphModule, plan: FusionPlan, config: FusionConfig, record: GraphRecord) -> None:
    """The plan's decisions and fallbacks (the lists the compiler goes on adding to), and
    the patterns: detected while planning, or left for the report to detect when asked."""
    record.decisions, record.fallbacks = plan.decisions, plan.fallbacks
    if plan.replaced:  # user pattern replacements rewrote the graph
        record.aten_ops = captured_kernel_count(gm.graph)
    if plan.opportunities is not None:
        record.graph, record.units, record.opportunities, record.config = gm.graph, plan.units, \
            plan.opportunities, config
    elif not needs_detection(config):
        record.graph, record.config = gm.graph, config
        record.pending_detection = functools.partial(detect_patterns, gm.graph, config, record.name)
    # else: the detection the plan needed failed (logged): no patterns to report


def _group_call(spec, inputs: list, outputs: list, members: list) -> FusedGroupCall:
    """The group's call; its original ops (the unfused path) are made when first needed,
    except over symbolic sizes, where making them checks that every size can be read
    from the inputs (NotFusible otherwise)."""
    inputs, outputs, members = list(inputs), list(outputs), list(members)

    def make():
        return restored_copy(group_fallback(inputs, outputs, members))
    values, metas = [n.meta.get("val") for n in inputs], [meta(n) for n in outputs]
    if spec.sizes:
        return FusedGroupCall(spec, make(), values, metas)
    return FusedGroupCall(spec, None, values, metas, make_fallback=make)


def _lower(plan: FusionPlan, record: GraphRecord) -> list:
    """(group, call, inputs, outputs, backend) per group the planner keeps after
    asking its backend; a failed lowering is recorded in the plan."""
    lowered, taken = [], set()
    for group in list(plan.groups):
        kind = kernel_kind(group)
        try:
            spec, inputs, outputs = lower_group(group, f"kitsune_{kind}")
        except Exception as error:  # noqa: BLE001
            plan.refuse(group, f"lowering failed: {error}", fallback=True)
            log.warning("cannot lower %s: %s", group.label(), error)
            continue
        backend = backend_for(meta(group.nodes[0]).device)
        refusal = admit(plan, group, spec, backend.refusal)
        if refusal is not None:  # a planned refusal, not a failure
            log.debug("%s graph: not fused: %s: %s", record.name, group.label(), refusal)
            continue
        spec = replace(spec, name=kernel_name(kind, spec, taken))
        try:
            # symbolic sizes the call reads from the graph (after its tensors)
            inputs = inputs + size_inputs(group.nodes, inputs, spec.sizes)
            call = _group_call(spec, inputs, outputs, group.nodes)
        except NotFusible as error:  # symbolic sizes the call cannot read from its inputs
            plan.refuse(group, str(error), fallback=True)
            log.info("%s graph: not fused: %s: %s", record.name, group.label(), error)
            continue
        lowered.append((group, call, inputs, outputs, backend))
    return lowered


def _build(plan: FusionPlan, lowered: list, record: GraphRecord) -> None:
    """Build every backend's kernels; a failed build is recorded in the plan."""
    for name in dict.fromkeys(entry[4].name for entry in lowered):
        entries = [e for e in lowered if e[4].name == name]
        for (group, call, *_), kernel in zip(entries, build_kernels(entries[0][4], [e[1].spec for e in entries])):
            if isinstance(kernel, BaseException):
                reason = str(kernel) if isinstance(kernel, KernelError) else f"{type(kernel).__name__}: {kernel}"
                call.disable(f"{name} kernel build failed: {reason}")
                plan.refuse(group, call.failure, fallback=True)
            else:
                call.attach(kernel)
                record.kernel_calls[call.spec.name] = call  # run-time fallbacks are read from it
                record.groups.append((call.spec.name, [n.name for n in group.nodes], name))
                log.info("fused %s into %s (%s)", group.label(), call.spec.name, name)
