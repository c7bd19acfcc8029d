"""The Triton backend: generated kernels for CUDA tensors.

`compile_kernel(spec)` writes the kernel's source to the cache directory
(named by the spec's structure hash, so an identical group in any model or any
later process reuses the file; Triton's own cache then reuses the binary),
imports it, and returns a launcher `kernel(inputs, outputs)`. A kernel is
generated once per process (`_GENERATED`). `precompile(kernels)` compiles the
CUDA binaries of a graph's kernels in parallel threads at build time, so that
the first call does not compile them one after another.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import torch

from kitsune.cache import cache_dir, write_atomic
from kitsune.codegen.kernel import KernelError, KernelSpec
from kitsune.planner.naming import function_name
import hashlib

from kitsune.codegen.triton.emit import ReductionLayout, emit_triton, pow2, split_workspace
from kitsune.codegen.triton.libm import INTERPRETED
from kitsune.sizes import compile_sizes, hint
from kitsune.tuning.launch import LaunchChoices, launch_choices

log = logging.getLogger("kitsune")


# (function name, structure, launch choices) -> (module, path): identical groups (a
# transformer's layers, a recompiled graph) are generated once per process
_GENERATED: dict = {}


def compile_kernel(spec: KernelSpec) -> "TritonKernel":
    """The kernel of `spec`, generated and launched by the current launch
    choices (`kitsune.tuning.launch`): the source and the grid from one read."""
    from kitsune.codegen.backends import count_build

    choices = launch_choices()
    fn_name = function_name(spec)
    memo_key = (fn_name, spec.structure_key(), choices)
    generated = _GENERATED.get(memo_key)
    if generated is None:
        source = emit_triton(spec, fn_name, choices)
        count_build("generated")
        generated = _GENERATED[memo_key] = load_generated(fn_name, source)
    module, path = generated
    return TritonKernel(spec, getattr(module, fn_name), path, getattr(module, f"{fn_name}_finish", None), choices)


def precompile(kernels: list) -> None:
    """Compile the binaries the first launches of `kernels` (TritonKernels, or the
    exceptions of failed builds) will need, in parallel: each distinct launch once,
    warmed up under Triton's `AsyncCompileMode` with a pool of `compile_workers()`
    threads (Triton's own API for parallel compiles), with placeholder tensors of the
    spec's dtypes on the current CUDA device (16-byte aligned, as the allocator's
    outputs are; a launch whose real inputs are not gets its own specialisation then).
    Triton's caches then serve the first call. Nothing on the CPU, in the interpreter,
    for symbolic sizes (specialised per size values) or where this Triton has no
    AsyncCompileMode; KITSUNE_TRITON_PRECOMPILE=0 turns it off. A failure is only
    logged: the first call compiles as it would have."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from kitsune._compat import triton_async_compile_mode
    from kitsune.codegen.backends import compile_workers, count_build

    if INTERPRETED or os.environ.get("KITSUNE_TRITON_PRECOMPILE", "") == "0" or not torch.cuda.is_available():
        return
    mode = triton_async_compile_mode()
    jobs = {}
    for kernel in kernels:
        if not isinstance(kernel, TritonKernel) or kernel.spec.sizes or kernel.spec.numel <= 1:
            continue
        for launch in kernel.launches:
            key = (id(launch.fn), launch.grid, launch.num_warps, tuple(sorted(launch.constexprs.items())),
                   kernel.spec.numel, tuple(i.dtype for i in kernel.spec.inputs),
                   tuple(o.dtype for o in kernel.spec.outputs), kernel.workspace)
            jobs.setdefault(key, (kernel, launch))
    if mode is None or not jobs:
        return
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        with ThreadPoolExecutor(max_workers=min(len(jobs), compile_workers()),
                                thread_name_prefix="kitsune-triton") as pool, mode(pool):
            for kernel, launch in jobs.values():
                launch.fn.warmup(*_placeholders(kernel, device), kernel.spec.numel, grid=launch.grid,
                                 num_warps=launch.num_warps, **launch.constexprs)
        count_build("compiled", len(jobs))
    except Exception as error:  # noqa: BLE001 - the first call compiles instead
        log.debug("Triton kernels not precompiled (%s: %s); compiled at their first call",
                  type(error).__name__, error)


def _placeholders(kernel: "TritonKernel", device: torch.device) -> list:
    """One-element tensors standing for a kernel's arguments (their dtypes and alignment)."""
    spec = kernel.spec
    tensors = [torch.empty(1, dtype=t.dtype, device=device) for t in (*spec.inputs, *spec.outputs)]
    if kernel.workspace:
        tensors.append(torch.empty(1, dtype=torch.float32, device=device))
    return tensors


def load_kernel(spec: KernelSpec, path: str) -> "TritonKernel":
    """The kernel of `spec` from its generated module at `path` (written by
    `compile_kernel` in an earlier process, under the same launch choices)."""
    fn_name = function_name(spec)
    module, path = load_generated(fn_name, Path(path).read_text())
    return TritonKernel(spec, getattr(module, fn_name), path, getattr(module, f"{fn_name}_finish", None),
                        launch_choices())


def load_generated(fn_name: str, source: str):
    """(module, path): `source` written to the cache directory under a name of
    `fn_name` and its content hash, and imported (once per process)."""
    path = cache_dir("triton") / f"{fn_name}_{hashlib.sha256(source.encode()).hexdigest()[:8]}.py"
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
    return module, path


from kitsune._compat import raw_cuda_stream as _raw_stream  # noqa: E402


class TritonKernel:
    """Launches one generated kernel over a spec's iteration space (a split
    reduction: the partial kernel over a 2-d grid, then its finish kernel,
    with a float32 workspace between them).

    The first call compiles each kernel for the arguments' specialisation
    (16-byte alignment of each pointer) and, on CUDA, hands the binary to
    PyTorch's static launcher: that skips Triton's per-signature C launcher
    build (about 0.3 s of a cold compile) and is cheaper per launch. Calls
    whose pointers lose an alignment the binary assumed go through Triton's
    own dispatch, which re-specialises.
    """

    def __init__(self, spec: KernelSpec, fn, path: Path, finish=None, choices: LaunchChoices | None = None):
        """`choices`: the launch choices the source was generated with (default:
        the current ones); the grid, warps and block sizes follow from them."""
        self.spec, self.fn, self.path = spec, fn, path
        choices = choices or launch_choices()
        numel = hint(spec.numel)  # symbolic sizes: blocks for the sizes seen, the grid per call
        self.workspace = 0  # float32 elements between a split reduction's two kernels
        layout = ReductionLayout.of(spec, choices) if spec.reduction else None
        if layout is not None and layout.split:
            self.xblock, rblock, self.num_warps, parts = layout.xblock, layout.rblock, layout.num_warps, layout.split
            blocks = (spec.rows + self.xblock - 1) // self.xblock
            self.workspace = split_workspace(spec, parts)
            self.launches = [
                _Launch(spec, fn, (blocks, parts), self.num_warps, dict(XBLOCK=self.xblock, RBLOCK=rblock)),
                _Launch(spec, finish, (blocks,), 4, dict(XBLOCK=self.xblock, SPLIT_BLOCK=pow2(parts))),
            ]
        else:
            if layout is not None:
                self.xblock, rblock, self.num_warps = layout.xblock, layout.rblock, layout.num_warps
                constexprs = dict(XBLOCK=self.xblock, RBLOCK=rblock)
                grid = ((hint(spec.rows) + self.xblock - 1) // self.xblock,)
            else:
                self.xblock = min(choices.max_xblock, max(16, 1 << max(numel - 1, 0).bit_length()))
                grid = ((numel + self.xblock - 1) // self.xblock,)
                self.num_warps = 4 if self.xblock >= 512 else (2 if self.xblock >= 128 else 1)
                constexprs = dict(XBLOCK=self.xblock)
            self.launches = [_Launch(spec, fn, grid, self.num_warps, constexprs)]
        if not INTERPRETED and any(v.op == "check_index" for v in spec.values()):
            # index checks are device asserts, on only in debug builds (as Inductor's
            # kernels are built); Triton's int32 overflow asserts stay off
            for launch in self.launches:
                launch.constexprs.update(debug=True, sanitize_overflow=False)
        self.grid = self.launches[0].grid
        self.constexprs = {k: v for k, v in self.launches[0].constexprs.items() if k != "XBLOCK"}
        if spec.sizes:  # one unsplit kernel (split_plan); Triton's launcher specialises the sizes
            self.launches = [_SymbolicLaunch(spec, fn, self.xblock, self.num_warps, self.launches[0].constexprs)]

    @property
    def source(self) -> str:
        return self.path.read_text()

    def __call__(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor], sizes: tuple = ()) -> None:
        """Run the kernel; `sizes`: the values of the spec's symbolic sizes, in order."""
        if sizes:
            self.launches[0](inputs, outputs, sizes)
            return
        if self.spec.numel == 0:
            return
        tensors = (*inputs, *outputs)
        if not self.workspace:
            self.launches[0](tensors, len(inputs))
            return
        tensors += (torch.empty(self.workspace, dtype=torch.float32, device=outputs[0].device),)
        for launch in self.launches:
            launch(tensors, len(inputs))


class _SymbolicLaunch:
    """A kernel over symbolic sizes: numel, the grid and the size arguments per
    call. Triton's launcher specialises integer arguments as it does for
    Inductor (equal to 1, divisible by 16), compiling a variant per class."""

    def __init__(self, spec: KernelSpec, fn, xblock: int, num_warps: int, constexprs: dict):
        self.fn, self.num_warps, self.constexprs = fn, num_warps, constexprs
        self.grid = (0,)
        blocks_of = spec.rows if spec.reduction else spec.numel
        self._sizes = compile_sizes((spec.numel, blocks_of), spec.sizes)
        self.xblock = xblock

    def __call__(self, inputs, outputs, sizes: tuple) -> None:
        numel, blocks_of = self._sizes(*sizes)
        if numel == 0:
            return
        grid = ((blocks_of + self.xblock - 1) // self.xblock,)
        if INTERPRETED:
            self.fn[grid](*inputs, *outputs, numel, *sizes, **self.constexprs)
        else:
            self.fn[grid](*inputs, *outputs, numel, *sizes, num_warps=self.num_warps, **self.constexprs)


class _Launch:
    """One jit function over one grid: the static launcher where it applies,
    Triton's own launcher otherwise."""

    def __init__(self, spec: KernelSpec, fn, grid: tuple, num_warps: int, constexprs: dict):
        self.spec, self.fn, self.grid, self.num_warps, self.constexprs = spec, fn, grid, num_warps, constexprs
        self._grid3 = (*grid, 1, 1)[:3]
        self._static = None       # PyTorch's static launcher, once compiled
        self._launch = None       # its C launch call with the fixed arguments bound
        self._aligned = ()        # inputs that were 16-byte aligned at compile time
        self._device_index = None
        self._tried_static = INTERPRETED

    def __call__(self, tensors: tuple, n_inputs: int) -> None:
        numel = self.spec.numel
        if not self._tried_static:
            self._tried_static = True
            self._static = self._static_launcher(tensors, n_inputs)
            self._launch = self._direct_launch(self._static, len(tensors))  # (C call, bound arguments)
        static = self._static
        if static is not None:
            # outputs come from PyTorch's allocator (aligned); inputs may be views at any offset
            for i in self._aligned:
                if tensors[i].data_ptr() & 15:
                    break
            else:
                stream = _raw_stream(self._device_index)
                launch = self._launch
                if launch is not None:
                    call, fixed, scratch = launch
                    call(*fixed, (*tensors, numel, *scratch), stream)
                else:
                    static.run(*self._grid3, stream, *tensors, numel)
                return
        if INTERPRETED:
            self.fn[self.grid](*tensors, numel, **self.constexprs)
        else:
            self.fn[self.grid](*tensors, numel, num_warps=self.num_warps, **self.constexprs)

    def _static_launcher(self, tensors, n_inputs: int):
        if self.spec.numel <= 1 or not tensors or tensors[0].device.type != "cuda":
            return None  # Triton makes a constant of an int argument equal to 1
        try:
            from kitsune._compat import static_cuda_launcher
            compiled = self.fn.warmup(*tensors, self.spec.numel, grid=self.grid, num_warps=self.num_warps,
                                      **self.constexprs)
            path = Path(self.fn.fn.__code__.co_filename)
            cubin = cache_dir("triton") / f"{path.stem}-{self.fn.fn.__name__}-{compiled.hash[:16]}.cubin"
            if not cubin.exists():
                write_atomic(cubin, compiled.asm["cubin"])
            static = static_cuda_launcher(compiled, str(cubin))
            if len(static.arg_tys) != len(tensors) + 1:
                raise RuntimeError(f"unexpected kernel signature {static.arg_tys!r}")
            static.load_kernel(tensors[0].device.index or 0)
        except Exception as error:  # noqa: BLE001 - Triton's own launcher still works
            log.debug("%s uses Triton's launcher (static launch unavailable: %s)", self.spec.name, error)
            return None
        self._aligned = [i for i, t in enumerate(tensors[:n_inputs]) if t.data_ptr() % 16 == 0]
        self._device_index = tensors[0].device.index
        return static

    def _direct_launch(self, static, n_tensors: int):
        """`static.run` without its per-call work (scratch arguments, checks):
        the C launcher with the function, grid, warps, shared memory and the
        argument types bound once (saves a few microseconds a launch, which a
        host-bound training step pays for every kernel): (C call, fixed
        arguments, scratch arguments). None where the launcher's layout is not
        the one this was written against."""
        if static is None or torch.version.hip:
            return None
        try:
            scratch = tuple(None for name in ("has_global_scratch", "has_profile_scratch")
                            if getattr(static, name, False))
            arg_tys = static.arg_tys + "O" * len(scratch)
            if len(arg_tys) != n_tensors + 1 + len(scratch):
                return None
            from kitsune._compat import static_launch_entry
            launch = static_launch_entry(static)
            function, num_warps, shared = static.function, static.num_warps, static.shared
        except Exception as error:  # noqa: BLE001 - the launcher's own run() still works
            log.debug("%s launches through static.run (%s)", self.spec.name, error)
            return None
        return launch, (function, *self._grid3, num_warps, shared, arg_tys), scratch
