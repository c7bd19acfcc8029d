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

Every call that runs the original ops at run time is counted, by reason, in
`runtime_fallbacks` (reported by `kitsune.get_fusion_stats()`); only the slow
path does that work, the fast path is unchanged.

A compiled graph's generated wrapper (`runtime/wrapper.py`) launches CPU
kernels of static sizes itself and comes here only on its rare path
(`call_in_layout`: other strides, a kernel's failure status); other groups
(symbolic sizes, Triton) are called here on every call.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref

import torch
from torch import fx

from kitsune import _compat
from kitsune.codegen.kernel import INDEX_LIMIT, KernelSpec
from kitsune.codegen.lower import spec_size_exprs
from kitsune.ir.ops import NotFusible
from kitsune.sizes import as_size, compile_sizes, free_symbols, max_offset, shape_of, strides_of

log = logging.getLogger("kitsune")
_DEBUG = os.environ.get("KITSUNE_DEBUG", "") not in ("", "0")
_COUNT_LOCK = threading.Lock()


def _fast_allocator(device: torch.device):
    """PyTorch's allocation helper for compiled code (what Inductor's wrappers
    call): `torch.empty_strided` less its argument parsing, 9 -> 5 us a tensor
    on the H200 host. It allocates on the current CUDA device, which the caller
    checks. None where this PyTorch has no such helper."""
    return _compat.fast_empty_strided(device)


class FusedGroupCall:
    def __init__(self, spec: KernelSpec, fallback: fx.GraphModule | None, inputs: list, outputs: list,
                 make_fallback=None):
        """`fallback`: the group's original ops; or None and `make_fallback()` makes
        them when first needed (most groups never run unfused: building a GraphModule
        per group was a third of a warm start's time)."""
        self.spec = spec
        self._fallback, self._make_fallback = fallback, make_fallback
        # compiled graphs whose generated code calls this group's kernel directly:
        # told when the kernel changes (runtime/wrapper.py)
        self._watchers = weakref.WeakSet()
        self._kernel = None
        self.failure: str | None = None
        self.runtime_failure: str | None = None  # why the kernel was switched off at run time
        self.runtime_fallbacks: dict[str, int] = {}  # reason -> calls that ran the original ops
        # the call's arguments: the kernel's tensors, then symbolic sizes (ints) it reads
        self.n_tensors = sum(isinstance(v, torch.Tensor) for v in inputs)
        self.n_outputs = len(outputs)
        self.sizes = SymbolicSizes.of(spec, inputs, outputs)  # None for static shapes
        if self.sizes is None:
            self.input_strides = [strides_of(v) for v in inputs]
            self.input_shapes = [shape_of(v) for v in inputs]
            self.output_meta = tuple((shape_of(v), strides_of(v), v.dtype) for v in outputs)
        self.device = outputs[0].device
        self._alloc = _fast_allocator(self.device)
        self._cuda_index = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if self.device.type == "cuda" else None
        # fx codegen names call_function targets by these
        self.__name__ = spec.name
        self.__module__ = __name__

    @property
    def fallback(self) -> fx.GraphModule:
        if self._fallback is None:
            self._fallback, self._make_fallback = self._make_fallback(), None
        return self._fallback

    @fallback.setter
    def fallback(self, value) -> None:
        self._fallback = value

    @property
    def kernel(self):
        """The kernel this group runs; None means "run the fallback"."""
        return self._kernel

    @kernel.setter
    def kernel(self, kernel) -> None:
        self._kernel = kernel
        for graph in list(self._watchers):
            graph.kernels_changed()

    def watch(self, graph) -> None:
        """`graph.kernels_changed()` is called whenever this group's kernel changes."""
        self._watchers.add(graph)

    def attach(self, kernel) -> None:
        self.kernel = kernel

    def disable(self, reason: str, at_run_time: bool = False) -> None:
        if self.failure is None:
            log.warning("%s runs unfused through PyTorch: %s", self.spec.name, reason)
        self.kernel, self.failure = None, reason
        if at_run_time:
            self.runtime_failure = reason

    def __call__(self, *inputs):
        kernel = self.kernel
        if kernel is None:
            return self._unfused(inputs, self.runtime_failure)
        if self.sizes is not None:
            return self._call_symbolic(kernel, inputs)
        if [t.stride() for t in inputs] != self.input_strides:
            mismatch = self._layout_mismatch(inputs)
            if mismatch is not None:
                return self._unfused(inputs, mismatch)
        return self._launch(kernel, inputs, inputs, self.output_meta)

    def call_in_layout(self, *inputs):
        """`self(*inputs)` with outputs in the compiled layout (a copy where the
        original ops, run for other inputs' strides, gave another): the slow path
        of generated code whose next kernels read these outputs unchecked."""
        outputs = self(*inputs)
        if self.sizes is not None or all(t.stride() == meta[1] for t, meta in zip(outputs, self.output_meta)):
            return outputs
        return tuple(t if t.stride() == stride or tuple(t.shape) != shape else
                     torch.empty_strided(shape, stride, dtype=dtype, device=t.device).copy_(t)
                     for t, (shape, stride, dtype) in zip(outputs, self.output_meta))

    def _call_symbolic(self, kernel, inputs):
        """A kernel over symbolic sizes: the sizes read from the inputs, the
        layout checked against the strides the sizes imply, outputs allocated at
        those sizes, and the sizes passed to the kernel."""
        sizes = self.sizes
        values = sizes.read(inputs)
        mismatch = sizes.mismatch(inputs, values)
        if mismatch is not None:
            return self._unfused(inputs, mismatch)
        return self._launch(kernel, inputs, inputs[:self.n_tensors], sizes.outputs(values),
                            sizes.kernel_args(values))

    def _launch(self, kernel, inputs, tensors, output_meta, *size_args):
        """Allocate eager's output layout and run the kernel on `tensors` (the
        call's tensor inputs); a failure runs the group's ops on `inputs`."""
        alloc = self._alloc
        if alloc is not None and (self._cuda_index is None or _compat.current_cuda_device() == self._cuda_index):
            outputs = [alloc(shape, stride, dtype) for shape, stride, dtype in output_meta]
        else:
            device = inputs[0].device if inputs else self.device
            outputs = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                       for shape, stride, dtype in output_meta]
        try:
            kernel(tensors, outputs, *size_args)
        except Exception as error:  # noqa: BLE001 - whatever broke, eager semantics decide
            result = self.fallback(*inputs)  # raises eager's own error if the inputs are invalid
            log.debug("%s: kernel launch failed: %s", self.spec.name, error)
            self.disable(f"kernel launch failed: {type(error).__name__}: {error_summary(error)}", at_run_time=True)
            self._count(self.runtime_failure)
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
                log.error("KITSUNE_DEBUG: %s output %d differs from eager (%s); ops: %s",
                          self.spec.name, i, summary, self.spec.description)
                self._count(f"KITSUNE_DEBUG: output {i} differs from eager")
        return tuple(expected)

    def _unfused(self, inputs, reason: str | None):
        """The slow path: the group's original ops, counted when it is a run-time fallback
        (None: the kernel was never on, or a profiling decision switched it off)."""
        if reason is not None:
            self._count(reason)
        return self.fallback(*inputs)

    def _count(self, reason: str) -> None:
        with _COUNT_LOCK:
            self.runtime_fallbacks[reason] = self.runtime_fallbacks.get(reason, 0) + 1

    def _layout_mismatch(self, inputs) -> str | None:
        """Why the kernel cannot take these inputs, or None. Strides of dims of size 1 (and of
        empty tensors) address nothing, so they may differ from the compiled ones."""
        for i, (t, shape, stride) in enumerate(zip(inputs, self.input_shapes, self.input_strides)):
            if tuple(t.shape) != shape:
                reason = f"input {i} has shape {tuple(t.shape)} (compiled for {shape})"
            elif t.numel() > 0 and any(got != want for size, got, want in zip(shape, t.stride(), stride) if size > 1):
                reason = f"input {i} has strides {tuple(t.stride())} (compiled for {stride})"
            else:
                continue
            log.debug("%s: %s; running unfused", self.spec.name, reason)
            return reason
        return None


class SymbolicSizes:
    """How a group over symbolic sizes meets each call's tensors: every symbol
    is read from a dimension of an input that has exactly that size; the
    inputs' strides and the outputs' shapes and strides are expressions of the
    symbols, evaluated per call by generated Python (no sympy at run time)."""

    def __init__(self, spec: KernelSpec, names: tuple, sources: list, inputs: list, outputs: list):
        self.names, self.sources = names, sources
        self._kernel_args = tuple(names.index(n) for n in spec.sizes)
        tensors = [v for v in inputs if isinstance(v, torch.Tensor)]
        self._input_layout = compile_sizes(tuple((shape_of(v), strides_of(v)) for v in tensors), names)
        self._output_layout = compile_sizes(tuple((shape_of(v), strides_of(v)) for v in outputs), names)
        self._dtypes = [v.dtype for v in outputs]
        # a narrow (32-bit) kernel: the largest offset into each tensor, checked per call
        self._extents = None if spec.wide_index() else compile_sizes(
            tuple(max_offset(v) for v in (*tensors, *outputs)), names)

    @staticmethod
    def of(spec: KernelSpec, inputs: list, outputs: list) -> "SymbolicSizes | None":
        """None for static shapes; raises NotFusible where a symbol is no input's size."""
        # a spec without `sizes` has no symbol in its arithmetic (lowering names them all):
        # only the tensors' layouts can still be symbolic (walking the spec costs a warm start)
        exprs = [*spec_size_exprs(spec)] if spec.sizes else []
        for v in (*inputs, *outputs):
            exprs += [*shape_of(v), *strides_of(v)] if isinstance(v, torch.Tensor) else [as_size(v)]
        symbols = free_symbols(*exprs)
        if not symbols:
            return None
        names = tuple(sorted(s.name for s in symbols))
        sources = []
        for name in names:
            found = next(((i, d) for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)
                          for d, size in enumerate(shape_of(v)) if getattr(size, "name", None) == name), None)
            found = found or next(((i, None) for i, v in enumerate(inputs) if isinstance(v, torch.SymInt)
                                   and getattr(as_size(v), "name", None) == name), None)
            if found is None:
                raise NotFusible(f"symbolic size {name} is not the size of any input of the group")
            sources.append(found)
        return SymbolicSizes(spec, names, sources, inputs, outputs)

    def read(self, inputs) -> tuple:
        return tuple(inputs[i] if d is None else inputs[i].shape[d] for i, d in self.sources)

    def kernel_args(self, values: tuple) -> tuple:
        return tuple(values[k] for k in self._kernel_args)

    def outputs(self, values: tuple) -> list:
        return [(shape, stride, dtype) for (shape, stride), dtype in zip(self._output_layout(*values), self._dtypes)]

    def mismatch(self, inputs, values: tuple) -> str | None:
        """Why the kernel cannot take these inputs (other shapes or strides than the
        sizes imply, or offsets beyond 32-bit indexing), or None."""
        for i, (t, (shape, stride)) in enumerate(zip(inputs, self._input_layout(*values))):
            if t.shape != shape or t.stride() != stride:
                if tuple(t.shape) != shape:
                    return f"input {i} has shape {tuple(t.shape)} (the sizes give {shape})"
                if t.numel() > 0 and any(got != want for n, got, want in zip(shape, t.stride(), stride) if n > 1):
                    return f"input {i} has strides {tuple(t.stride())} (compiled for {stride})"
        if self._extents is not None and max(self._extents(*values), default=0) >= INDEX_LIMIT:
            return "offsets beyond 32-bit indexing at these sizes"
        return None


def error_summary(error: BaseException) -> str:
    """An error's message with its cause first: Triton's CompilationError puts the kernel's
    source before the line that says what is wrong, which a shortened report would cut."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[-1].strip()} ({lines[0].strip()}; full message at DEBUG)"

