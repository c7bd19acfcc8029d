"""Replay a compiled inference graph as one CUDA graph.

A transformer's forward pass on the GPU is often bound by the host: hundreds
of kernel launches, each paying Python and driver time. Once a graph's
kernels are built, `CudaGraphRunner` records the whole graph on its third
call (two ordinary calls first build and warm every kernel) and replays the
recording afterwards: one launch for the whole graph.

What stays exactly as eager:
- inputs: an input that arrives at the same address on every call (a weight)
  is read in place, so an in-place update of a weight is seen by the next
  call; an input whose address changes (token ids, activations) is copied
  into the recording's own buffer before each replay. A call where a weight
  moved, or where an input has other strides, runs the graph normally.
- outputs are fresh tensors on every call (copied out of the recording's
  buffers), so a result kept from one call is never overwritten by the next.
- anything that cannot be recorded (a CPU tensor, a host synchronisation,
  random numbers) keeps the graph running normally, with the reason logged.

Only inference graphs are recorded: training graphs save activations for the
backward pass, which a replayed recording would overwrite.
"""
from __future__ import annotations

import logging

import torch
from torch import fx

log = logging.getLogger("kitsune")

WARMUP_CALLS = 2
# Worth it when the host time of the launches saved clearly exceeds the time of
# copying the outputs out of the recording: about 6 us of host time per op
# (a FusedGroupCall or an aten call from Python), outputs copied at ~2 TB/s.
HOST_US_PER_OP = 6.0
COPY_BYTES_PER_US = 2.0e6

_RANDOM = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "randperm", "philox", "seed")


def cuda_graph_blocker(gm: fx.GraphModule, example_inputs, compiled=None) -> str | None:
    """Why this graph cannot (or should not) be recorded, or None. `compiled`
    (the graph that will run) decides whether replaying pays for itself."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if not tensors or any(t.device.type != "cuda" for t in tensors):
        return "inputs not all on a CUDA device"
    if len({t.device for t in tensors}) > 1:
        return "inputs on several devices"
    if any(not isinstance(t, torch.Tensor) for t in example_inputs):
        return "non-tensor inputs (symbolic sizes)"
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "__name__", node.target))
        if any(word in name for word in _RANDOM):
            return f"random numbers ({name})"
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return f"in-place op {name}"
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.device.type != "cuda":
            return f"{node.name} makes a tensor on {val.device}"
    return replay_cost_blocker(gm, compiled) if isinstance(compiled, fx.GraphModule) else None


def replay_cost_blocker(gm: fx.GraphModule, compiled: fx.GraphModule) -> str | None:
    """Why replaying would not pay for itself, or None."""
    ops = sum(n.op == "call_function" and not _is_view(n) for n in compiled.graph.nodes)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out_bytes = sum(v.numel() * v.element_size() for v in _tensors(out.args[0]))
    saved_us, copy_us = ops * HOST_US_PER_OP, out_bytes / COPY_BYTES_PER_US
    if saved_us < 2 * copy_us:
        return (f"copying its outputs out of a recording ({out_bytes / 1e6:.0f} MB, ~{copy_us:.0f} us) "
                f"would cost more than the launch time it saves ({ops} ops, ~{saved_us:.0f} us)")
    return None


def _is_view(node) -> bool:
    from kitsune.ir.graph import is_view
    import operator
    return node.target is operator.getitem or is_view(node)


def _tensors(args):
    if isinstance(args, fx.Node):
        val = args.meta.get("val")
        return [val] if isinstance(val, torch.Tensor) else []
    if isinstance(args, (list, tuple)):
        return [t for a in args for t in _tensors(a)]
    return []


class CudaGraphRunner:
    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name
        self.calls = 0
        self.graph = None
        self.disabled: str | None = None
        self._last_ptrs = None
        self._static_inputs = None  # the recording's inputs
        self._copied = ()           # positions of inputs copied in before each replay
        self._outputs = None

    def __call__(self, *args):
        if self.disabled is not None:
            return self.fn(*args)
        if self.graph is not None:
            return self._replay(args)
        self.calls += 1
        ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args]
        if self.calls <= WARMUP_CALLS:
            self._last_ptrs = ptrs
            return self.fn(*args)
        try:
            return self._record(args, ptrs)
        except Exception as error:  # noqa: BLE001 - the graph still runs normally
            self.graph = None
            self.disable(f"recording failed: {type(error).__name__}: {error}")
            return self.fn(*args)

    def disable(self, reason: str) -> None:
        self.disabled = reason
        log.info("kitsune: %s runs without CUDA graphs: %s", self.name, reason)

    def _record(self, args, ptrs):
        copied = tuple(i for i, (a, b) in enumerate(zip(ptrs, self._last_ptrs))
                       if isinstance(args[i], torch.Tensor) and a != b)
        static = list(args)
        for i in copied:
            static[i] = torch.empty_strided(args[i].shape, args[i].stride(), dtype=args[i].dtype,
                                            device=args[i].device)
            static[i].copy_(args[i])
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(*static)
        self.graph, self._static_inputs, self._copied = graph, static, copied
        self._outputs = outputs
        self._layouts = [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else None for a in args]
        log.info("kitsune: %s recorded as one CUDA graph (%d of %d inputs copied in per call)",
                 self.name, len(copied), len(args))
        return self._replay(args)

    def _replay(self, args):
        static = self._static_inputs
        for i, a in enumerate(args):
            s = static[i]
            if not isinstance(a, torch.Tensor):
                if a != s:
                    return self.fn(*args)
                continue
            if i in self._copied:
                if a.shape != s.shape or a.stride() != s.stride() or a.dtype != s.dtype:
                    return self.fn(*args)
            elif a.data_ptr() != s.data_ptr() or a.stride() != s.stride():
                return self.fn(*args)  # a weight moved: run normally
        for i in self._copied:
            static[i].copy_(args[i])
        self.graph.replay()
        return _fresh(self._outputs)


def _fresh(outputs):
    if isinstance(outputs, torch.Tensor):
        # empty_strided keeps every stride (clone makes a non-dense layout dense);
        # an expanded (overlapping) output cannot be written that way
        if any(st == 0 and n > 1 for st, n in zip(outputs.stride(), outputs.shape)):
            return outputs.clone()
        fresh = torch.empty_strided(outputs.shape, outputs.stride(), dtype=outputs.dtype, device=outputs.device)
        return fresh.copy_(outputs)
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_fresh(o) for o in outputs)
    return outputs
