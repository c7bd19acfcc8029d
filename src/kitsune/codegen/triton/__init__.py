"""The Triton backend: generated kernels for CUDA tensors.

`compile_kernel(spec)` writes the kernel's source to the cache directory
(named by the spec's structure hash, so an identical group in any model or any
later process reuses the file; Triton's own cache then reuses the binary),
imports it, and returns a launcher `kernel(inputs, outputs)`.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import torch

from kitsune.cache import cache_dir, write_atomic
from kitsune.codegen.kernel import KernelError, KernelSpec
from kitsune.codegen.triton.emit import emit_triton
from kitsune.codegen.triton.libm import INTERPRETED

log = logging.getLogger("kitsune")

MAX_XBLOCK = 1024


def source_path(spec: KernelSpec) -> Path:
    return cache_dir("triton") / f"kitsune_{spec.structure_key()}.py"


def compile_kernel(spec: KernelSpec) -> "TritonKernel":
    fn_name = f"kitsune_{spec.structure_key()}"
    path = source_path(spec)
    source = emit_triton(spec, fn_name)
    if not path.exists() or path.read_text() != source:
        write_atomic(path, source.encode())
    module_name = f"kitsune_generated.{path.stem}"
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as error:
            raise KernelError(f"generated Triton module {path} does not import: {error}") from error
        sys.modules[module_name] = module
    return TritonKernel(spec, getattr(module, fn_name), path)


class TritonKernel:
    """Launches one generated kernel over a spec's iteration space."""

    def __init__(self, spec: KernelSpec, fn, path: Path):
        self.spec, self.fn, self.path = spec, fn, path
        numel = spec.numel
        self.xblock = min(MAX_XBLOCK, max(16, 1 << max(numel - 1, 0).bit_length()))
        self.grid = ((numel + self.xblock - 1) // self.xblock,)
        self.num_warps = 4 if self.xblock >= 512 else (2 if self.xblock >= 128 else 1)

    @property
    def source(self) -> str:
        return self.path.read_text()

    def __call__(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        if self.spec.numel == 0:
            return
        if INTERPRETED:
            self.fn[self.grid](*inputs, *outputs, self.spec.numel, XBLOCK=self.xblock)
        else:
            self.fn[self.grid](*inputs, *outputs, self.spec.numel, XBLOCK=self.xblock,
                               num_warps=self.num_warps)
