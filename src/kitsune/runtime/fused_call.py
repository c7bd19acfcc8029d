"""The callable that stands in for one fusion group in the compiled graph.

It allocates outputs with exactly the shapes, strides and dtypes that eager
would produce, checks that the inputs have the layout the kernel was
specialised for, and launches the kernel. Anything unexpected — a kernel that
failed to build, an input with other strides, a launch error — runs the
group's original ops through PyTorch instead, with a logged warning: Kitsune
never turns a working model into a crashing one.

With KITSUNE_DEBUG=1 every call also runs the original ops and compares:
a mismatch is logged with the group's ops and the size of the difference,
and the eager result is returned (the kernel stays on for the next call, so
that every mismatching group shows up).
"""
from __future__ import annotations

import logging
import os

import torch
from torch import fx

from kitsune.codegen.kernel import KernelSpec

log = logging.getLogger("kitsune")
_DEBUG = os.environ.get("KITSUNE_DEBUG", "") not in ("", "0")


class FusedGroupCall:
    def __init__(self, spec: KernelSpec, fallback: fx.GraphModule, inputs: list, outputs: list):
        self.spec = spec
        self.fallback = fallback
        self.kernel = None  # set by attach(); None means "run the fallback"
        self.failure: str | None = None
        self.input_strides = [tuple(v.stride()) for v in inputs]
        self.input_shapes = [tuple(v.shape) for v in inputs]
        self.output_meta = tuple((tuple(v.shape), tuple(v.stride()), v.dtype) for v in outputs)
        self.device = outputs[0].device
        # fx codegen names call_function targets by these
        self.__name__ = spec.name
        self.__module__ = __name__

    def attach(self, kernel) -> None:
        self.kernel = kernel

    def disable(self, reason: str) -> None:
        if self.failure is None:
            log.warning("kitsune: %s runs unfused through PyTorch: %s", self.spec.name, reason)
        self.kernel, self.failure = None, reason

    def __call__(self, *inputs):
        kernel = self.kernel
        if kernel is None or ([t.stride() for t in inputs] != self.input_strides
                              and not self._layout_matches(inputs)):
            return self.fallback(*inputs)
        device = inputs[0].device if inputs else self.device
        outputs = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                   for shape, stride, dtype in self.output_meta]
        try:
            kernel(inputs, outputs)
        except Exception as error:  # noqa: BLE001 - whatever broke, eager semantics decide
            result = self.fallback(*inputs)  # raises eager's own error if the inputs are invalid
            self.disable(f"kernel launch failed: {error}")
            return result
        if _DEBUG:
            return self._check(inputs, outputs)
        return tuple(outputs)

    def _check(self, inputs, outputs):
        expected = self.fallback(*inputs)
        for i, (got, want) in enumerate(zip(outputs, expected)):
            try:
                torch.testing.assert_close(got, want, equal_nan=True, check_stride=False)
            except AssertionError as error:
                summary = " ".join(str(error).split("\n")[1:4])
                log.error("kitsune: KITSUNE_DEBUG: %s output %d differs from eager (%s); ops: %s",
                          self.spec.name, i, summary, self.spec.description)
        return tuple(expected)

    def _layout_matches(self, inputs) -> bool:
        for t, shape, stride in zip(inputs, self.input_shapes, self.input_strides):
            if t.stride() != stride or t.shape != shape:
                if any(s > 1 for s in shape) and t.numel() > 0:
                    log.debug("kitsune: %s got an input with strides %s (expected %s); running unfused",
                              self.spec.name, t.stride(), stride)
                    return False
        return True


def group_fallback(inputs: list[fx.Node], outputs: list[fx.Node], members: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule running the group's original ops: the unfused path."""
    graph = fx.Graph()
    env = {n: graph.placeholder(f"in{i}") for i, n in enumerate(inputs)}
    needed = set(members)
    for node in members:  # views of members that members read
        for a in node.all_input_nodes:
            chain = a
            while chain not in env and chain not in needed and chain.op == "call_function" and chain.all_input_nodes:
                needed.add(chain)
                chain = chain.args[0]
    for node in members[0].graph.nodes:
        if node in needed and node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(torch.nn.Module(), graph)
