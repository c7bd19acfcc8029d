"""The pipeline for one captured aten graph: plan → lower → generate → run.

`compile_graph` is what capture hands every forward/backward graph to. It
never raises for a graph it cannot improve: the worst case is the graph
running as captured, through PyTorch, with the reason logged and counted.
"""
from __future__ import annotations

import itertools
import logging
import os
import time

import torch
from torch import fx

from kitsune.capture.simplify import simplify
from kitsune.codegen.kernel import KernelError
from kitsune.codegen.lower import lower_group
from kitsune.codegen.triton.emit import unsplit_few_rows
from kitsune.config import FusionConfig
from kitsune.fusion.steer import apply_patterns
from kitsune.ir.graph import is_compute, meta
from kitsune.planner.pointwise import Decision, plan_pointwise
from kitsune.report.stats import GLOBAL_STATS, GraphRecord
from kitsune.runtime.compiled_graph import bind_fast_targets, build_graph_module
from kitsune.runtime.fused_call import FusedGroupCall, group_fallback
from kitsune.runtime.matmul import align_matmuls
from kitsune.tuning.measure import measured

log = logging.getLogger("kitsune")
_kernel_ids = itertools.count()


def backend_for(device: torch.device) -> str:
    """Which code generator serves tensors on `device` ("triton" or "cpu").

    KITSUNE_BACKEND=triton sends CPU tensors to Triton too: with
    TRITON_INTERPRET=1 that runs the generated Triton kernels on the CPU (tests)."""
    forced = os.environ.get("KITSUNE_BACKEND", "").lower()
    if forced == "reference":
        return "reference"
    if device.type == "cuda":
        return "triton"
    return "triton" if forced == "triton" else "cpu"


def build_kernels(backend: str, specs: list) -> list:
    """Compile `specs` with `backend`; each result is a kernel or the exception it raised."""
    if backend in ("triton", "reference"):
        if backend == "triton":
            from kitsune.codegen.triton import compile_kernel
        else:
            from kitsune.codegen.reference import compile_kernel
        results = []
        for spec in specs:
            try:
                results.append(compile_kernel(spec))
            except Exception as error:  # noqa: BLE001 - reported per group
                results.append(error)
        return results
    from kitsune.codegen.cpu import compile_kernels
    return compile_kernels(specs)


def compile_graph(gm: fx.GraphModule, example_inputs, kind: str = "graph",
                  config: FusionConfig | None = None, stats=GLOBAL_STATS, profile: bool = False):
    """Compile one aten graph; returns a callable with gm's calling convention.
    `profile`: measure fused kernels (kitsune.tuning.measure.measuring)."""
    config = config or FusionConfig()
    start = time.perf_counter()
    record = GraphRecord(name=kind, kernels_before=sum(map(is_compute, gm.graph.nodes)), kernels_after=0)
    compiled_ok = False
    try:
        compiled = _compile(gm, config, record)
        compiled_ok = True
    except Exception as error:  # noqa: BLE001 - never crash the user's model
        log.warning("kitsune: %s graph runs unfused through PyTorch: %s: %s", kind, type(error).__name__, error)
        record.fallbacks.append((kind, f"{type(error).__name__}: {error}"))
        record.groups.clear()
        record.kernel_calls.clear()
        compiled = gm
    # a split reduction launches two kernels (its parts, then their finish)
    extra = sum(len(getattr(call.kernel, "launches", [call.kernel])) - 1 for call in record.kernel_calls.values())
    record.kernels_after = record.kernels_before - sum(len(nodes) - 1 for _, nodes, _ in record.groups) + extra
    training = kind in ("forward", "backward")
    replay = (kind == "inference" or training) and config.cuda_graphs and \
        _cuda_graph_blocker(gm, example_inputs, compiled, record, training) is None
    if compiled_ok and isinstance(compiled, fx.GraphModule):
        bind_fast_targets(compiled)  # after every analysis that reads its aten targets
    # measured on the first real call, before a CUDA-graph runner records the graph
    compiled = measured(compiled, gm, record, config, profile)
    if replay:
        from kitsune.runtime.cuda_graphs import CudaGraphRunner
        record.cuda_graph = True
        compiled = CudaGraphRunner(compiled, f"{record.name} graph", training=training,
                                   copy_out=_user_outputs(gm) if kind == "forward" else ())
    record.compile_seconds = time.perf_counter() - start
    stats.record(record)
    return compiled


def _cuda_graph_blocker(gm, example_inputs, compiled, record, training) -> str | None:
    """Why the compiled graph is not replayed as a CUDA graph (logged), or None."""
    from kitsune.runtime.cuda_graphs import cuda_graph_blocker

    blocker = cuda_graph_blocker(gm, example_inputs, compiled, training)
    if blocker is not None and any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        log.info("kitsune: %s graph runs without CUDA graphs: %s", record.name, blocker)
    return blocker


def _user_outputs(gm: fx.GraphModule) -> range:
    """Positions of a forward graph's outputs that reach the user (mutated inputs,
    the model's outputs), as opposed to the activations saved for the backward:
    AOTAutograd puts them first and records how many (`num_forward_returns`).
    Empty where that is not known."""
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    fw_metadata = getattr(context, "fw_metadata", None) if context is not None else None
    count = getattr(fw_metadata, "num_forward_returns", None)
    return range(count) if isinstance(count, int) else range(0)


def _device_allowed(device: torch.device, config: FusionConfig) -> bool:
    return config.gpu_fusion if device.type == "cuda" else config.cpu_fusion


def _compile(gm: fx.GraphModule, config: FusionConfig, record: GraphRecord) -> fx.GraphModule:
    simplify(gm)
    plan = plan_pointwise(gm.graph, config)
    plan = apply_patterns(gm, plan, config, record)  # named/user patterns; records opportunities
    record.decisions = plan.decisions
    lowered = []
    for group in plan.groups:
        name = f"kitsune_pointwise_{next(_kernel_ids)}"
        device = meta(group.nodes[0]).device
        if not _device_allowed(device, config):
            record.fallbacks.append((group.label(), f"fusion disabled for {device.type} in FusionConfig"))
            continue
        if group.numel < config.min_tensor_size:
            record.fallbacks.append((group.label(), f"{group.numel} elements < min_tensor_size"))
            continue
        try:
            spec, inputs, outputs = lower_group(group, name)
        except Exception as error:  # noqa: BLE001
            record.fallbacks.append((group.label(), f"lowering failed: {error}"))
            log.warning("kitsune: cannot lower %s: %s", group.label(), error)
            continue
        few_rows = unsplit_few_rows(spec) if backend_for(device) == "triton" else None
        if few_rows is not None:  # a planned refusal, not a failure
            plan.decisions.append(Decision(tuple(n.name for n in group.nodes), False, few_rows))
            log.debug("kitsune: %s graph: not fused: %s: %s", record.name, group.label(), few_rows)
            continue
        call = FusedGroupCall(spec, group_fallback(inputs, outputs, group.nodes),
                              [meta(n) for n in inputs], [meta(n) for n in outputs])
        lowered.append((group, call, inputs, outputs, backend_for(device)))

    for backend in {entry[4] for entry in lowered}:
        entries = [e for e in lowered if e[4] == backend]
        for (group, call, *_), kernel in zip(entries, build_kernels(backend, [e[1].spec for e in entries])):
            if isinstance(kernel, BaseException):
                reason = str(kernel) if isinstance(kernel, KernelError) else f"{type(kernel).__name__}: {kernel}"
                call.disable(f"{backend} kernel build failed: {reason}")
                record.fallbacks.append((group.label(), call.failure))
            else:
                call.attach(kernel)
                record.kernel_calls[call.spec.name] = call  # run-time fallbacks are read from it
                record.groups.append((call.spec.name, [n.name for n in group.nodes], backend))
                log.info("kitsune: fused %s into %s (%s)", group.label(), call.spec.name, backend)
    calls = {id(g): (g, call, ins, outs) for g, call, ins, outs, _ in lowered if call.kernel is not None}
    result = build_graph_module(gm, calls) if calls else gm
    aligned = align_matmuls(result)
    if aligned:
        log.info("kitsune: %d matmul(s) write padded rows (fast cuBLAS kernels for odd widths)", aligned)
    return result
