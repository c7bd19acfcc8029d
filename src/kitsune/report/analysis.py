"""Turn compile records into what reports show: which opportunities were
applied and why not, per-group estimates, efficiency, before/after totals.

Everything here reads `GraphRecord`s (kitsune.record) and never
changes a compiled model.
"""
from __future__ import annotations

import logging

from kitsune.planner.cost import Estimate, eager_estimate, eager_kernels, kernel_estimate, nodes_estimate
from kitsune.planner.units import is_kernel

log = logging.getLogger("kitsune")


def _reasons(record) -> dict:
    """node name -> why it is not (fully) fused, from planner decisions and fallbacks."""
    single, merge = {}, {}
    for d in record.decisions:
        if d.fused:
            continue
        names = [part for item in d.nodes for part in str(item).split(" → ")]
        target = single if len(names) == 1 else merge
        for name in names:
            target.setdefault(name, d.reason)
    for what, reason in record.fallbacks:
        for name in str(what).split(" → "):
            single.setdefault(name, reason)
    return {**merge, **single}  # a node's own blocker wins over a refused merge


def finalize(record) -> None:
    """Fill in status, reason and kernels of every opportunity of `record` (idempotent)."""
    kernel_of = {name: kernel for kernel, names, _ in record.groups for name in names
                 if not _failed(record, kernel)}
    reasons = _reasons(record)
    for kernel, names, _ in record.groups:
        failure = _failed(record, kernel)
        if failure:
            for name in names:
                reasons[name] = f"kernel {kernel} fell back to PyTorch at run time: {failure}"
    config = record.config
    nodes_by_name = {n.name: n for n in record.graph.nodes} if record.graph is not None else {}
    for opp in record.opportunities:
        if opp.rewrite:
            continue
        compute = [n.name for n in opp.compute_nodes()]
        kernels = list(dict.fromkeys(kernel_of[n] for n in compute if n in kernel_of))
        missing = [n for n in compute if n not in kernel_of]
        opp.kernels = tuple(kernels)
        steering = opp.reason if opp.custom and opp.reason else ""
        if opp.replaced_by is not None:
            failure = getattr(opp.replaced_by, "failure", None)
            opp.kernels = (opp.replaced_by.__name__,)
            opp.status, opp.reason = ("not applied", f"replacement failed, the original ops run: {failure}") \
                if failure else ("applied", "")
        elif config is not None and not config.pattern_enabled(opp.pattern):
            opp.status, opp.reason = "disabled", "not in FusionConfig.enabled_patterns"
        elif opp.pattern == "attention" and _fused_attention(nodes_by_name, compute):
            # PyTorch's fused attention kernel (flash/efficient/CPU flash): a library call, like mm
            opp.status, opp.reason = "applied", ""
            opp.choice = f"PyTorch's fused attention kernel ({_fused_attention(nodes_by_name, compute)})"
            opp.kernels = (opp.choice,)
        elif compute and not missing and len(kernels) == 1:
            opp.status, opp.reason = "applied", ""
        elif len(kernels) == 1 and missing and all(_library_product(nodes_by_name.get(n)) for n in missing):
            # a matmul/convolution by the vendor library, everything after it in one kernel
            opp.status, opp.reason = "applied", ""
            opp.choice = f"{_library_name(nodes_by_name[missing[0]])} + its epilogue in one generated kernel"
        elif kernels:
            opp.status = "partial"
            if missing:
                opp.reason = steering or _why(missing, reasons)
            else:
                opp.reason = steering or f"split over {len(kernels)} kernels: " + _why(compute, reasons)
        else:
            opp.status = "not applied"
            opp.reason = steering or (_why(missing, reasons) if compute else "no kernel work in it")
    _add_rewrites(record)
    record.finalized = True


def _add_rewrites(record) -> None:
    """The patterns a rewrite ran another way (kitsune.capture.rewrites) become
    opportunities with their choice; a detected opportunity of the same pattern
    over the rewritten nodes is the same place, counted once."""
    from kitsune.planner.patterns import BUILTIN_PATTERNS, FusionOpportunity

    rewrites = getattr(record, "rewrites", ())
    if not rewrites:
        return
    covered = {(rw.pattern, name) for rw in rewrites for name in rw.nodes}
    nodes_by_name = {n.name: n for n in record.graph.nodes} if record.graph is not None else {}
    kept = [o for o in record.opportunities
            if not o.rewrite and not any((o.pattern, name) in covered
                                         for name in (*o.nodes, *_user_ops(nodes_by_name, o.nodes)))]
    for rw in rewrites:
        pattern = BUILTIN_PATTERNS.get(rw.pattern)
        kept.append(FusionOpportunity(
            pattern=rw.pattern, nodes=tuple(rw.nodes), ops=tuple(rw.ops), estimated_speedup=1.0, bytes_saved=0,
            fusion_type=pattern.fusion_type if pattern is not None else "custom", graph=record.name,
            status="applied" if rw.applied else "not applied",
            reason="" if rw.applied else f"rewrite declined: {rw.reason}",
            kernels=(rw.choice,) if rw.applied else (), choice=rw.choice if rw.applied else "",
            fused_seconds=rw.seconds or 0.0, rewrite=True))
    record.opportunities = kept


# PyTorch's fused attention ops: SDPA's kernels, kept whole by the decomposition table
FUSED_ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                       "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")


def _fused_attention(nodes_by_name, names) -> str:
    """The name of the fused SDPA kernel among `names` ("" if none)."""
    for name in names:
        node = nodes_by_name.get(name)
        op = getattr(getattr(node, "target", None), "__name__", "").split(".")[0]
        if op in FUSED_ATTENTION_OPS or op.removesuffix("_backward") in FUSED_ATTENTION_OPS:
            return op
    return ""


def _user_ops(nodes_by_name, names) -> list:
    """The Dynamo-graph nodes (user ops) the aten nodes `names` were made from."""
    out = []
    for name in names:
        stack = getattr(nodes_by_name.get(name), "meta", {}).get("source_fn_stack") or ()
        if stack and isinstance(stack[-1], tuple):
            out.append(stack[-1][0])
    return out


def _library_product(node) -> bool:
    """A matmul or convolution (run by cuBLAS/cuDNN/MKL/oneDNN) that the pattern starts with."""
    from kitsune.ir.ops import OpKind
    from kitsune.planner.units import node_kind
    return node is not None and node_kind(node) in (OpKind.MATMUL, OpKind.CONV)


def _library_name(node) -> str:
    from kitsune.ir.ops import OpKind
    from kitsune.planner.units import node_kind
    cuda = getattr(node.meta.get("val"), "is_cuda", False)
    if node_kind(node) is OpKind.CONV:
        return "cuDNN convolution" if cuda else "oneDNN convolution"
    return "cuBLAS matmul" if cuda else "CPU BLAS matmul"


def _why(names, reasons) -> str:
    for name in names:
        if name in reasons:
            return f"{name}: {reasons[name]}"
    return f"{names[0]}: not grouped by the planner" if names else ""


def graph_estimates(record) -> dict:
    """Estimated eager vs Kitsune cost of one graph, and per-group details."""
    if record.graph is None or record.units is None:
        return {"before": Estimate(), "after": Estimate(), "groups": []}
    nodes = {n.name: n for n in record.graph.nodes}
    before = eager_estimate(record.units.units)
    fused_names = set()
    after = Estimate()
    groups = []
    for kernel, names, backend in record.groups:
        members = [nodes[n] for n in names if n in nodes]
        fused_names.update(names)
        est = kernel_estimate(members)
        unfused = Estimate()  # eager PyTorch running the same operations
        for part in eager_kernels(members):
            unfused = unfused + kernel_estimate(part)
        eager_units = {record.units.unit_of[n].index: record.units.unit_of[n]
                       for n in members if n in record.units.unit_of}
        after = after + est
        patterns = sorted({o.pattern for o in record.opportunities if kernel in o.kernels})
        groups.append({
            "kernel": kernel, "graph": record.name, "backend": backend, "nodes": list(names),
            "ops": [u.name for u in sorted(eager_units.values(), key=lambda u: u.index)],
            "patterns": patterns, "unfused_seconds": unfused.seconds, "fused_seconds": est.seconds,
            "unfused_kernels": unfused.launches, "bytes_saved": max(0, unfused.bytes - est.bytes),
            "measured": record.measured.get(kernel),
            "measured_speedup": (record.measured[kernel]["speedup"] if kernel in record.measured else None),
        })
    rest = [n for n in record.graph.nodes if is_kernel(n) and n.name not in fused_names]
    after = after + nodes_estimate(rest)
    return {"before": before, "after": after, "groups": groups}


def efficiency(records) -> float:
    """Kernels removed / kernels removable (see kitsune.report.stats).

    Removable: every detected opportunity and every fused group becomes one
    kernel, overlapping ones merging into one region; a region of k kernel
    nodes removes k - 1. Removed: what Kitsune's groups remove (k - 1 each)."""
    removable = removed = 0
    for record in records:
        parent: dict = {}

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        def join(names):
            for name in names:
                parent.setdefault(name, name)
            for a, b in zip(names, names[1:]):
                parent[find(a)] = find(b)

        for opp in record.opportunities:
            join([n.name for n in opp.compute_nodes()])
        for kernel, names, _ in record.groups:
            if not _failed(record, kernel):
                join(list(names))
                removed += len(names) - 1
        regions: dict = {}
        for name in parent:
            regions[find(name)] = regions.get(find(name), 0) + 1
        removable += sum(size - 1 for size in regions.values())
    if removable == 0:
        return 1.0
    return round(min(1.0, removed / removable), 4)


def _failed(record, kernel) -> str | None:
    """The failure of a kernel that fell back to PyTorch at run time, else None."""
    call = record.kernel_calls.get(kernel)
    return getattr(call, "failure", None) if call is not None and getattr(call, "kernel", 1) is None else None


def summarize(records) -> dict:
    patterns: dict = {}
    bytes_before = bytes_after = 0
    seconds_before = seconds_after = 0.0
    groups = []
    for record in records:
        finalize(record)
        for opp in record.opportunities:
            counts = patterns.setdefault(opp.pattern, {"detected": 0, "applied": 0, "partial": 0,
                                                       "not_applied": 0, "disabled": 0})
            counts["detected"] += 1
            counts[opp.status.replace(" ", "_") if opp.status != "detected" else "not_applied"] += 1
        try:
            est = graph_estimates(record)
        except Exception as error:  # noqa: BLE001 - stats must never fail
            log.debug("no estimates for the %s graph: %s", record.name, error)
            continue
        bytes_before += est["before"].bytes
        bytes_after += est["after"].bytes
        seconds_before += est["before"].seconds
        seconds_after += est["after"].seconds
        groups += est["groups"]
    return {
        "efficiency": efficiency(records),
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "seconds_before": seconds_before,
        "seconds_after": seconds_after,
        "estimated_speedup": round(seconds_before / seconds_after, 3) if seconds_after > 0 else 1.0,
        "patterns": patterns,
        "groups": groups,
    }
