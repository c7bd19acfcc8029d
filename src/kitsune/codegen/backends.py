"""The contract between the planner and the code generators.

The planner decides what to fuse; a backend turns the planner's lowered groups
(`KernelSpec`s) into kernels. What the planner needs to know about a backend
it asks here, never from an emitter's internals:

- `backend_for(device)`: which backend serves tensors on `device`
  (KITSUNE_BACKEND=triton sends CPU tensors to Triton, which with
  TRITON_INTERPRET=1 runs the kernels in Triton's interpreter: the tests;
  KITSUNE_BACKEND=reference uses the PyTorch reference kernels everywhere).
- `backend.refusal(spec)`: why this backend does not generate a kernel for
  `spec` (a planned "not fused" with that reason, not a failure), or None.
  The thresholds behind a refusal are `kitsune.tuning.launch.LaunchChoices`.
- `backend.build(specs)`: a kernel `kernel(inputs, outputs)` per spec, or the
  exception that stopped it (that group then runs through PyTorch).
- `backend.kernel_state(kernel)` / `backend.load(spec, state)`: what a later
  process needs to load a built kernel without generating or building it (the
  compiled-graph cache, `kitsune.runtime.graph_cache`).

`build_counts()` counts the work done in this process: kernel sources generated
("generated": identical kernels count once) and compiler runs ("compiled": a C
library built; Triton compiles on first launch and is not counted).

Backends import their code generators lazily: a CPU-only machine never
imports Triton through this module.
"""
from __future__ import annotations

import collections
import os
import threading

import torch

from kitsune.codegen.kernel import KernelSpec

__all__ = ["Backend", "TritonBackend", "CpuBackend", "ReferenceBackend", "BACKENDS", "backend_for", "get_backend",
           "build_counts", "count_build"]

_COUNTS: collections.Counter = collections.Counter()
_COUNTS_LOCK = threading.Lock()


def count_build(what: str, n: int = 1) -> None:
    """Count `n` pieces of build work: "generated" (a kernel's source emitted) or
    "compiled" (a compiler run)."""
    with _COUNTS_LOCK:
        _COUNTS[what] += n


def compile_workers() -> int:
    """Parallel kernel builds (C compiler runs, Triton compiles): KITSUNE_COMPILE_THREADS,
    else the CPUs this process may use (at most 8), as Inductor's compile workers."""
    text = os.environ.get("KITSUNE_COMPILE_THREADS", "")
    if text.strip():
        try:
            return max(1, int(text))
        except ValueError:
            import logging
            logging.getLogger("kitsune").warning("KITSUNE_COMPILE_THREADS=%r is not an integer; using the CPU "
                                                 "count", text)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def build_counts() -> dict:
    """{"generated": kernel sources emitted, "compiled": compiler runs} in this process so far."""
    with _COUNTS_LOCK:
        return {"generated": _COUNTS["generated"], "compiled": _COUNTS["compiled"]}


class Backend:
    """A code generator as the planner sees it."""

    name: str = ""

    def refusal(self, spec: KernelSpec) -> str | None:
        """Why this backend does not generate a kernel for `spec`, or None."""
        return None

    def build(self, specs: list[KernelSpec]) -> list:
        """A kernel per spec, in order, or the exception that stopped it."""
        raise NotImplementedError

    def kernel_state(self, kernel) -> dict | None:
        """What `load` needs to give `kernel` back in another process (plain data), or
        None: `load` builds it again."""
        return None

    def load(self, spec: KernelSpec, state: dict | None):
        """The kernel of `spec` from `kernel_state`'s record; raises if it cannot
        (a file gone from the cache): the caller then compiles as usual."""
        kernel = self.build([spec])[0]
        if isinstance(kernel, BaseException):
            raise kernel
        return kernel

    def __repr__(self) -> str:
        return f"<kitsune backend {self.name!r}>"


def _one_by_one(compile_kernel, specs: list[KernelSpec]) -> list:
    results = []
    for spec in specs:
        try:
            results.append(compile_kernel(spec))
        except Exception as error:  # noqa: BLE001 - reported per group
            results.append(error)
    return results


class TritonBackend(Backend):
    """Generated Triton kernels (CUDA tensors, or the interpreter)."""

    name = "triton"

    def refusal(self, spec: KernelSpec) -> str | None:
        """A reduction over few long rows that cannot be split between programs
        (one program would walk each whole row: a whole-tensor variance of 16M
        elements on one SM): `LaunchChoices.few_rows` / `few_rows_elements`."""
        from kitsune.codegen.triton.emit import unsplit_few_rows
        return unsplit_few_rows(spec)

    def build(self, specs: list[KernelSpec]) -> list:
        from kitsune.codegen.triton import compile_kernel, precompile
        kernels = _one_by_one(compile_kernel, specs)
        precompile(kernels)
        return kernels

    def kernel_state(self, kernel) -> dict | None:
        return {"path": str(kernel.path)}

    def load(self, spec: KernelSpec, state: dict | None):
        from kitsune.codegen.triton import load_kernel
        return load_kernel(spec, state["path"])


class CpuBackend(Backend):
    """Generated C kernels, one shared library per call to `build`."""

    name = "cpu"

    def build(self, specs: list[KernelSpec]) -> list:
        from kitsune.codegen.cpu import compile_kernels
        return compile_kernels(specs)

    def kernel_state(self, kernel) -> dict | None:
        return {"source": str(kernel.source_path)}

    def load(self, spec: KernelSpec, state: dict | None):
        from kitsune.codegen.cpu import load_kernel
        return load_kernel(spec, state["source"])


class ReferenceBackend(Backend):
    """Each spec evaluated with PyTorch ops (a check of lowering, no speed)."""

    name = "reference"

    def build(self, specs: list[KernelSpec]) -> list:
        from kitsune.codegen.reference import compile_kernel
        return _one_by_one(compile_kernel, specs)


BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), CpuBackend(), ReferenceBackend())}


def get_backend(name: str) -> Backend:
    """The backend called `name` ("triton", "cpu" or "reference")."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None


def backend_for(device: torch.device) -> Backend:
    """Which backend serves tensors on `device`: Triton for CUDA, C for the CPU,
    unless KITSUNE_BACKEND says "triton" (CPU tensors too) or "reference"."""
    forced = os.environ.get("KITSUNE_BACKEND", "").lower()
    if forced == "reference":
        return BACKENDS["reference"]
    if device.type == "cuda" or forced == "triton":
        return BACKENDS["triton"]
    return BACKENDS["cpu"]
