"""Kitsune's generated kernels for the hand-usable custom ops (`kitsune.ops`).

A custom op's real implementation is a *reference function* written with
PyTorch ops (`F.linear` then GELU, a layer norm, a cross entropy, ...). The
first call with a given structure traces it into an aten FX graph with fake
tensors (`make_fx` with the decomposition table torch.compile's graphs get,
`kitsune.capture.dynamo.decomposition_table`) and compiles that graph with
`kitsune.compiler.compile_graph`, the compiler's own entry: the same planner
and code generators (generated C on the CPU, Triton on CUDA or where
KITSUNE_BACKEND=triton). The compiled graph is cached by structure: the
function, its constant arguments, and each tensor argument's shape, strides,
dtype and device, plus the backend in use (KITSUNE_BACKEND): a new shape compiles
anew (about a second on the CPU; the generated sources are cached on disk too).

Backward passes go through the same path: `generated_vjp` traces the
reference's vector-Jacobian product (`torch.func.vjp`), so the gradient
kernels are generated too.

Never crash the user's model: if tracing or compiling fails, the reference
runs through PyTorch (logged once per structure).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from kitsune.cache import LRU

log = logging.getLogger("kitsune")

CACHE_SIZE = 256
# Compiled structures per op and argument kinds (dtype, device, rank) at most: a layer
# called with ever new shapes (a growing sequence) would otherwise compile on every
# call; past this many, new shapes run the reference through PyTorch (logged once).
MAX_SHAPES = 16


class KernelCache(LRU):
    """Compiled graphs by structure key, least recently used dropped first; counts
    compiles and the structures compiled per family (MAX_SHAPES)."""

    def __init__(self, size: int = CACHE_SIZE):
        super().__init__(size)
        self.compiles = 0
        self.shapes: dict = {}  # family (op, constants, argument kinds) -> structures compiled

    def clear(self) -> None:
        super().clear()
        self.shapes.clear()
        self.compiles = 0

    def admit(self, family) -> bool:
        """Whether one more structure of `family` may be compiled (MAX_SHAPES)."""
        count = self.shapes.get(family, 0)
        self.shapes[family] = count + 1
        if count == MAX_SHAPES:
            log.info("kitsune op %s: more than %d shapes compiled; new shapes run through PyTorch",
                     family[0], MAX_SHAPES)
        return count < MAX_SHAPES


KERNEL_CACHE = KernelCache()


class _DiscardStats:
    """Where the compile records of op kernels go: not into the user's fusion stats
    (they describe the user's graphs; an op's kernel is part of one node of them)."""

    def record(self, record) -> None:
        pass


def tensor_key(t):
    """The part of a tensor's structure a compiled kernel depends on."""
    if t is None:
        return None
    # strides too: a generated kernel's indexing is specialised on its inputs' layouts
    return (tuple(t.shape), t.stride(), t.dtype, str(t.device))


def _backend_name() -> str:
    return os.environ.get("KITSUNE_BACKEND", "").lower()


def _config():
    from kitsune.config import FusionConfig
    # every group fuses (the op was asked for by hand: no size threshold); no CUDA
    # graphs (the kernel runs inside another graph's call, whose caller decides)
    return FusionConfig(cuda_graphs=False, min_tensor_size=0)


def _trace_and_compile(fn, tensors: list):
    """`fn(*tensors)` as an aten graph (static shapes) compiled by Kitsune's compiler.
    Shapes are static: a graph traced with symbolic shapes reads its sizes through
    `aten.sym_size` nodes, which the compiler does not take (KeyError at lowering)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from kitsune.capture.dynamo import decomposition_table
    from kitsune.compiler import compile_graph

    gm = make_fx(fn, decomposition_table=decomposition_table(reductions=True), tracing_mode="fake")(*tensors)
    # a vjp traces work for gradients nobody asked for; a group of dead nodes has no outputs
    gm.graph.eliminate_dead_code()
    gm.recompile()
    # an inference graph (no autograd inside an op's kernel): it gets the rewrites such
    # graphs get (on CUDA, Linear + ReLU/GELU in cuBLASLt's epilogue where that measures faster)
    return compile_graph(gm, tensors, "inference", config=_config(), stats=_DiscardStats())


def tracing(tensors) -> bool:
    """Whether these tensors are being traced (fake or functional tensors, a dispatch
    mode such as make_fx's or opcheck's): the reference then runs as PyTorch ops, which
    trace, where a compiled kernel would read the tensors' memory."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    if _get_current_dispatch_mode() is not None:
        return True
    return any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors if t is not None)


def run_generated(name: str, reference, tensors: list, constants: tuple = ()):
    """`reference(*tensors, *constants)` through a generated kernel compiled for this
    structure (cached); the outputs as a tuple. `tensors` may hold None (an absent
    optional argument). `constants` must be hashable: they are part of the key.
    `name` must name `reference` (with its constants) uniquely.
    While tracing (`tracing`) the reference runs as it is."""
    if tracing(tensors):
        return _as_tuple(reference(*tensors, *constants))
    present = [t for t in tensors if t is not None]
    key = (name, constants, tuple(tensor_key(t) for t in tensors), _backend_name())
    entry = KERNEL_CACHE.get(key)
    if entry is None:
        family = (name, constants, tuple(None if t is None else (t.dtype, str(t.device), t.dim()) for t in tensors))
        entry = _compile_entry(name, reference, tensors, constants) if KERNEL_CACHE.admit(family) else _REFERENCE
        KERNEL_CACHE.put(key, entry)
    if entry is _REFERENCE:
        return _as_tuple(reference(*tensors, *constants))
    with torch.no_grad():
        return tuple(entry(*present))


_REFERENCE = object()  # a cache entry: run the reference (compiling failed)


def _compile_entry(name, reference, tensors, constants):
    KERNEL_CACHE.compiles += 1
    slots = [i for i, t in enumerate(tensors) if t is not None]

    def flat(*present):
        args = list(tensors)
        for slot, value in zip(slots, present):
            args[slot] = value
        return _as_tuple(reference(*args, *constants))

    present = [t.detach() for t in tensors if t is not None]
    try:
        with torch.no_grad():
            return _trace_and_compile(flat, present)
    except Exception as error:  # noqa: BLE001 - never crash the user's model
        log.warning("kitsune op %s runs through PyTorch: tracing or compiling failed: %s: %s",
                    name, type(error).__name__, error, exc_info=log.isEnabledFor(logging.DEBUG))
        return _REFERENCE


def _as_tuple(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _vjp_call(reference, count: int, tensor_count: int, *args):
    """The gradients of `reference` for args = (*grads, *tensors, differentiable, *constants):
    one per position in `differentiable` whose tensor is present (a traceable function,
    so the backward's kernels are generated like the forward's)."""
    grads, tensors = args[:count], list(args[count:count + tensor_count])
    differentiable, constants = args[count + tensor_count], args[count + tensor_count + 1:]
    wanted = [i for i in differentiable if tensors[i] is not None]

    def forward(*values):
        inputs = list(tensors)
        for i, value in zip(wanted, values):
            inputs[i] = value
        return _as_tuple(reference(*inputs, *constants))

    _, pullback = torch.func.vjp(forward, *(tensors[i] for i in wanted))
    return tuple(pullback(tuple(grads)))


def run_generated_vjp(name: str, reference, grads: list, tensors: list, constants: tuple,
                      differentiable: tuple, outputs_like: list) -> list:
    """The gradients of `reference` at `tensors` for `grads` of its outputs (None: zero,
    shaped as the matching `outputs_like` tensor), through generated kernels: one entry
    per tensor, None where not in `differentiable` or absent."""
    grads = [torch.zeros_like(o) if g is None else g for g, o in zip(grads, outputs_like)]
    backward = functools.partial(_vjp_call, reference, len(grads), len(tensors))
    found = run_generated(f"{name}.backward", backward, [*grads, *tensors], (tuple(differentiable), *constants))
    result, values = [None] * len(tensors), iter(found)
    for i in differentiable:
        if tensors[i] is not None:
            result[i] = next(values)
    return result
