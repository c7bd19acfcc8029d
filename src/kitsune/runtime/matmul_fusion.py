"""A compiled graph's matmuls whose product only their epilogue kernel reads
become one `FusedMatmulCall` (issue 15, choice (c) against (a)).

After `build_graph_module`, an `mm`/`addmm`/`bmm` node whose only reader is a
generated (Triton, static-size, pointwise) kernel's `FusedGroupCall`, and that
kernel, are replaced by one call that, on its first real inputs, measures
cuBLAS + the epilogue kernel against the generated Triton matmul with the same
epilogue fused into its store (`runtime.fused_matmul.MatmulEpilogueRunner`)
and runs the faster from then on. Several products of one left operand read
by one kernel (SwiGLU's gate and up projections) share one fused kernel.

The choice reaches `explain()` as a `Rewrite` of the `linear_activation`
pattern, with both times ("Triton matmul + epilogue (…)" or "cuBLAS + kernel
(…)"). CUDA only: on the CPU MKL and the generated C epilogue stay.

Off unless asked for (``KITSUNE_TRITON_MATMUL=1``, read by `compiler._compile`,
which calls `fuse_matmul_epilogues` after `build_graph_module`): the first
call compiles and times several tilings per configuration.
"""
from __future__ import annotations

import logging

import torch
from torch import fx

from kitsune.codegen.kernel import KernelError
from kitsune.runtime.fused_call import FusedGroupCall
from kitsune.runtime.fused_matmul import CONFIGS, MatmulEpilogueRunner, describe, products

log = logging.getLogger("kitsune")
aten = torch.ops.aten

_MATMULS = {aten.mm.default: "mm", aten.addmm.default: "addmm", aten.bmm.default: "bmm"}


class FusedMatmulCall:
    """Stands in for `product(s) → group call` in the compiled graph:
    `call(a, bs, biases, inputs)` (the group's inputs, None at the product
    slots) returns the group's outputs, in its layouts."""

    def __init__(self, call: FusedGroupCall, epi, timer=None, on_choice=None):
        self.call, self.epi = call, epi
        self.others = [s for s in range(len(epi.spec.inputs)) if s not in epi.products]
        self.runner = MatmulEpilogueRunner(epi, unfused=self._unfused, allocate=self._allocate, configs=CONFIGS,
                                           timer=timer, on_choice=on_choice)
        self.__name__ = f"{call.spec.name}_matmul"  # fx names call_function targets by these
        self.__module__ = __name__

    def _allocate(self, device) -> list:
        return [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                for shape, stride, dtype in self.call.output_meta]

    def _unfused(self, a, bs, biases, inputs) -> list:
        """cuBLAS (PyTorch's product), then the group's own call (its kernel, or its ops)."""
        return list(self.call(*products(self.epi, a, bs, biases, inputs)))

    def __call__(self, a, bs, biases, inputs):
        inputs = list(inputs)
        strides = self.call.input_strides
        if self.call.kernel is None or any(inputs[s].stride() != strides[s] for s in self.others):
            return tuple(self._unfused(a, bs, biases, inputs))  # the kernel was generated for other strides
        return tuple(self.runner(a, bs, biases, inputs))


def fuse_matmul_epilogues(gm: fx.GraphModule, record=None, devices=("cuda",), timer=None) -> int:
    """Replace each product → epilogue-kernel pair of `gm` (a compiled graph)
    by a `FusedMatmulCall`; returns how many. `record`: its `rewrites` get the
    choice once made. `devices`, `timer`: tests (the interpreter on the CPU)."""
    changed = 0
    for node in list(gm.graph.nodes):
        call = node.target if node.op == "call_function" else None
        if not isinstance(call, FusedGroupCall) or call.kernel is None or call.sizes is not None \
                or call.device.type not in devices or call.spec.reduction:
            continue
        found = _products(node)
        if not found:
            continue
        slots, mms = zip(*found)
        first = mms[0]
        a = first.args[1] if first.target is aten.addmm.default else first.args[0]
        bs = [m.args[2] if m.target is aten.addmm.default else m.args[1] for m in mms]
        biases = [m.args[0] if m.target is aten.addmm.default else None for m in mms]
        val = _vals(a, *bs, *[b for b in biases if b is not None])
        try:
            if val is None:
                raise KernelError("operands without example values")
            epi = describe(val[a], [val[b] for b in bs], call.spec, slots,
                           [None if b is None else val[b] for b in biases],
                           first.kwargs.get("alpha", 1), first.kwargs.get("beta", 1))
        except (KernelError, ValueError) as error:
            log.debug("%s stays cuBLAS + kernel: %s", call.spec.name, error)
            continue
        names = (*[m.name for m in mms], *_group_nodes(record, call))
        ops = ("linear" if first.target is not aten.bmm.default else "bmm", call.spec.name)
        on_choice = None if record is None else _recorder(record, ops, names)
        fused = FusedMatmulCall(call, epi, timer, on_choice)
        inputs = tuple(None if s in slots else arg for s, arg in enumerate(node.args))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(fused, (a, tuple(bs), tuple(biases), inputs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for m in mms:
            gm.graph.erase_node(m)
        changed += 1
    if changed:
        gm.recompile()
        log.info("%d matmul(s) choose between cuBLAS + kernel and a Triton matmul with the epilogue", changed)
    return changed


def _products(node: fx.Node) -> list:
    """[(slot, product node)]: the group call's inputs that are products only it
    reads, of one left operand and one kind (the kind of the first found)."""
    found = []
    for slot, arg in enumerate(node.args):
        if not isinstance(arg, fx.Node) or arg.op != "call_function" or arg.target not in _MATMULS:
            continue
        if set(arg.users) != {node} or node.args.count(arg) != 1:
            continue
        val = arg.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_contiguous():
            continue
        found.append((slot, arg))
    if not found:
        return []
    first = found[0][1]
    left = (lambda m: m.args[1] if m.target is aten.addmm.default else m.args[0])
    return [(s, m) for s, m in found if m.target is first.target and left(m) is left(first)
            and m.kwargs == first.kwargs]


def _vals(*nodes) -> dict | None:
    """{node: its example value}, None where one has none."""
    vals = {n: n.meta.get("val") for n in nodes}
    return vals if all(isinstance(v, torch.Tensor) for v in vals.values()) else None


def _group_nodes(record, call) -> tuple:
    if record is None:
        return ()
    return next((tuple(names) for kernel, names, _ in record.groups if kernel == call.spec.name), ())


def _recorder(record, ops: tuple, names: tuple):
    def on_choice(choice) -> None:
        record.rewrites.append(choice.rewrite(ops, names))
        record.finalized = False  # the report's analysis runs again and shows it
    return on_choice


__all__ = ["FusedMatmulCall", "fuse_matmul_epilogues"]
