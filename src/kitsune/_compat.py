"""Every private PyTorch and Triton API Kitsune uses, in one place.

PyTorch's and Triton's private APIs (names under `torch._…`, `torch._C`,
Inductor's runtime, Triton's interpreter) change between releases without
notice. Kitsune reaches each of them only through this module, and each entry
has a fallback that keeps Kitsune working — slower, or with one feature off —
when the private API is missing or has changed: a new PyTorch then costs
speed, never a crash. `tests/test_compat.py` exercises every entry on the
installed PyTorch, checks each fallback with the private API taken away, and
fails when a module outside this one touches a private API.

Entries used on hot paths (`current_cuda_device`, `raw_cuda_stream`) are
resolved once, at import; the others on each call (cheap, and where a lookup
fails only the first failure is logged).

Public APIs are used directly elsewhere: `torch.compile`, `torch.fx`,
`torch.library`, `torch.compiler.reset`, `torch.cuda.*`, `torch.ops.<ns>.<op>`
(operator names, even those with a leading underscore, are the operator
registry's public namespace), `triton.jit`, `triton.language`.
"""
from __future__ import annotations

import contextlib

import importlib
import logging
import sys
from typing import Callable

import torch

log = logging.getLogger("kitsune")
_REPORTED: set[str] = set()


def _unavailable(what: str, error: BaseException | str, consequence: str) -> None:
    """Logs once per process that a private API is missing and what that costs."""
    if what not in _REPORTED:
        _REPORTED.add(what)
        log.info("%s is not available in this PyTorch/Triton (%s): %s", what, error, consequence)


# --- Allocation, devices and streams (hot paths) ------------------------------

def fast_empty_strided(device: torch.device) -> Callable | None:
    """`torch._C._dynamo.guards._empty_strided_cuda/_cpu(shape, stride, dtype)`:
    PyTorch's allocation helper for compiled code (what Inductor's wrappers
    call), `torch.empty_strided` less its argument parsing (9 -> 5 us a tensor
    on the H200 host). It allocates on the *current* CUDA device, which the
    caller checks. None where missing (or for another device type): the caller
    then allocates with `torch.empty_strided`."""
    name = {"cuda": "_empty_strided_cuda", "cpu": "_empty_strided_cpu"}.get(device.type)
    if name is None:
        return None
    try:
        from torch._C._dynamo import guards
        return getattr(guards, name)
    except (ImportError, AttributeError) as error:
        _unavailable(f"torch._C._dynamo.guards.{name}", error, "outputs are allocated with torch.empty_strided")
        return None


def tensor_data_ptr_address() -> int | None:
    """`torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr`: the
    address of PyTorch's C helper `void *(PyObject *tensor)` that returns a
    tensor's data pointer (what Inductor's CPU kernel bindings call instead of
    `tensor.data_ptr()`). Kitsune's CPU launcher extension calls it the same
    way. None where missing: the launcher is then given `data_ptr()` ints."""
    try:
        from torch._C._dynamo import guards
        address = int(guards._torchinductor_pyobject_tensor_data_ptr)
    except (ImportError, AttributeError, TypeError, ValueError) as error:
        _unavailable("torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr", error,
                     "CPU kernels are given data_ptr() ints")
        return None
    return address or None


def _resolve_current_cuda_device() -> Callable[[], int]:
    """`torch._C._cuda_getDevice`: the current CUDA device's index without
    `torch.cuda.current_device()`'s lazy-initialisation check (read at every
    fused call that allocates with `fast_empty_strided`). Without it, the
    public `torch.cuda.current_device`, a little slower."""
    getter = getattr(torch._C, "_cuda_getDevice", None)
    if getter is None:
        if torch.version.cuda:  # a CPU-only build has no CUDA devices to ask about
            _unavailable("torch._C._cuda_getDevice", "missing", "torch.cuda.current_device is used")
        return torch.cuda.current_device
    return getter


def _resolve_raw_cuda_stream() -> Callable[[int], int]:
    """`torch._C._cuda_getCurrentRawStream(device_index)`: the current CUDA
    stream's handle as an int, which the static Triton launcher takes (what
    Inductor's generated code calls at every launch). Without it, the public
    `torch.cuda.current_stream(index).cuda_stream`, which makes a Stream
    object at every launch (a microsecond or two)."""
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is None:
        if torch.version.cuda:
            _unavailable("torch._C._cuda_getCurrentRawStream", "missing", "streams are read through torch.cuda")
        return _public_raw_stream
    return getter


def _public_raw_stream(device_index: int) -> int:
    return torch.cuda.current_stream(device_index).cuda_stream


current_cuda_device = _resolve_current_cuda_device()
raw_cuda_stream = _resolve_raw_cuda_stream()


# --- Storages (CUDA-graph recordings of training graphs) -----------------------

def storage_use_count_fn() -> Callable[[int], int] | None:
    """`torch._C._storage_Use_Count(cdata)`: how many references hold a storage
    (what Inductor's CUDA-graph trees read). Kitsune's training recordings hand
    their outputs out in place and must know when the caller has let them go
    before a replay overwrites them. None where missing: training graphs then
    run without CUDA graphs (`training_replay_supported`)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        _unavailable("torch._C._storage_Use_Count", "missing", "training graphs run without CUDA graphs")
    return count


def storage_weak_ref_class() -> type | None:
    """`torch.multiprocessing.reductions.StorageWeakRef`: a weak reference to
    a storage with its `cdata` key (undocumented; Inductor's CUDA-graph trees
    use it). Kitsune keys the memory of training recordings by it. None where
    missing: training graphs then run without CUDA graphs."""
    try:
        from torch.multiprocessing.reductions import StorageWeakRef
        return StorageWeakRef
    except (ImportError, AttributeError) as error:
        _unavailable("torch.multiprocessing.reductions.StorageWeakRef", error,
                     "training graphs run without CUDA graphs")
        return None


def training_replay_supported() -> bool:
    """Whether training graphs can be replayed as CUDA graphs here: both
    storage entries above resolve. The CUDA-graph blocker asks this."""
    return storage_use_count_fn() is not None and storage_weak_ref_class() is not None


class _StorageWeakRefMissing:
    """Stands in for StorageWeakRef where it is missing; never constructed,
    because `training_replay_supported()` keeps training graphs unrecorded."""

    def __init__(self, storage):
        raise RuntimeError("StorageWeakRef is not available in this PyTorch")


StorageWeakRef = storage_weak_ref_class() or _StorageWeakRefMissing


def storage_use_count(cdata: int) -> int:
    """`storage_use_count_fn()` applied; raises where it is missing (callers
    are reached only when `training_replay_supported()`)."""
    count = storage_use_count_fn()
    if count is None:
        raise RuntimeError("torch._C._storage_Use_Count is not available in this PyTorch")
    return count(cdata)


# --- Operators -----------------------------------------------------------------

def _op_type(name: str, public_route: Callable[[], type]) -> type:
    """`torch._ops.<name>`, else the same class reached through public
    operator objects (`public_route`); else a class nothing is an instance of."""
    cls = getattr(getattr(torch, "_ops", None), name, None)
    if isinstance(cls, type):
        return cls
    try:
        return public_route()
    except Exception as error:  # noqa: BLE001 - then nothing is of that type
        _unavailable(f"torch._ops.{name}", error, f"no graph node is recognised as a {name}")
        return type(f"_Missing{name}", (), {})


def _higher_order_operator_class() -> type:
    return next(c for c in type(torch.ops.higher_order.cond).__mro__ if c.__name__ == "HigherOrderOperator")


# The classes of aten operators (`aten.add.Tensor`, `aten.add`) and of
# higher-order operators (`cond`, `wrap_with_autocast`) in FX graphs.
OpOverload = _op_type("OpOverload", lambda: type(torch.ops.aten.add.Tensor))
OpOverloadPacket = _op_type("OpOverloadPacket", lambda: type(torch.ops.aten.add))
HigherOrderOperator = _op_type("HigherOrderOperator", _higher_order_operator_class)


def op_name(target) -> str:
    """An aten operator's base name (`aten.add.Tensor` -> `add`): its
    `_opname` where it has one, else parsed from its printed name."""
    name = getattr(target, "_opname", None)
    if isinstance(name, str):
        return name
    parts = str(target).split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def op_schema(target):
    """An operator's `torch._C.FunctionSchema` (`target._schema`), or None
    for a target without one (a Python function, or a PyTorch where the
    attribute moved: then in-place ops are recognised by name alone)."""
    return getattr(target, "_schema", None)


def op_is_mutable(target) -> bool:
    """Whether an operator writes to one of its arguments: from its schema,
    else from its name (`add_`, `copy_`: a trailing underscore)."""
    schema = op_schema(target)
    if schema is not None and hasattr(schema, "is_mutable"):
        return bool(schema.is_mutable)
    if not isinstance(target, (OpOverload, OpOverloadPacket)):
        return False
    return op_name(target).endswith("_")


# --- Tracing context (AOTAutograd's metadata) -----------------------------------

def detect_fake_mode(args):
    """`torch._guards.detect_fake_mode(args)`: the fake-tensor mode that
    `args` belong to, or None for real tensors. Kitsune measures kernels only
    on real tensors. Without it, any argument whose type is named FakeTensor
    counts as fake (returned in place of the mode)."""
    try:
        from torch._guards import detect_fake_mode as detect
    except ImportError as error:
        _unavailable("torch._guards.detect_fake_mode", error, "fake tensors are recognised by type name")
        return next((a for a in args if type(a).__name__ == "FakeTensor"), None)
    return detect(args)


def disable_dispatch_modes():
    """`torch.utils._python_dispatch._disable_current_modes()`: a context in
    which no TorchDispatchMode is active. AOTAutograd runs a graph's first call
    under a mode of its own (torch 2.13), which sends every op through Python;
    Kitsune's measurements time the ops as the user's program runs them. Without
    it, a null context: measurements on a first call then include that mode."""
    try:
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError as error:
        _unavailable("torch.utils._python_dispatch._disable_current_modes", error,
                     "a first-call measurement may include a dispatch mode's overhead")
        return contextlib.nullcontext()
    return _disable_current_modes()


def forward_output_count() -> int | None:
    """How many of the forward graph being compiled's outputs reach the user
    (mutated inputs, the model's outputs), the rest being activations saved
    for the backward: AOTAutograd's `TracingContext.fw_metadata
    .num_forward_returns` (read in its forward compiler). None where not known
    (outside AOTAutograd, or where the metadata moved): Kitsune then treats
    every output as one the user may keep."""
    try:
        from torch._guards import TracingContext
        context = TracingContext.try_get()
    except (ImportError, AttributeError) as error:
        _unavailable("torch._guards.TracingContext", error, "forward outputs are all treated as the user's")
        return None
    fw_metadata = getattr(context, "fw_metadata", None) if context is not None else None
    count = getattr(fw_metadata, "num_forward_returns", None)
    return count if isinstance(count, int) else None


# --- Capture (Dynamo -> AOTAutograd -> aten graphs) ------------------------------

def core_aten_decompositions() -> dict:
    """`torch._decomp.core_aten_decompositions()`: PyTorch's table that breaks
    composite ops into core aten ops (what Inductor and torch.export start
    from). Without it, the public `torch.export.default_decompositions()`;
    without both, no decompositions: composite ops stay whole (run by
    PyTorch) and Kitsune fuses less."""
    try:
        from torch._decomp import core_aten_decompositions as table
        return dict(table())
    except (ImportError, AttributeError) as error:
        _unavailable("torch._decomp.core_aten_decompositions", error, "torch.export's default table is used")
    try:
        table = torch.export.default_decompositions()
        return {op: fn for op, fn in table.items()}
    except Exception as error:  # noqa: BLE001 - fewer decompositions, fewer fusions
        _unavailable("torch.export.default_decompositions", error, "composite ops stay whole")
        return {}


def get_decompositions(ops) -> dict:
    """`torch._decomp.get_decompositions(ops)`: PyTorch's decompositions of
    the given ops (overloads or packets), keyed by overload. Without it, none:
    those ops stay whole and Kitsune fuses less."""
    try:
        from torch._decomp import get_decompositions as lookup
    except ImportError as error:
        _unavailable("torch._decomp.get_decompositions", error, "composite ops stay whole")
        return {}
    return lookup(ops)


def _boxed(fn: Callable) -> Callable:
    """AOTAutograd's boxed calling convention (one list argument, which the
    callee may clear to free inputs early), as `make_boxed_func` makes it."""
    def boxed(args):
        return fn(*args)
    boxed._boxed_call = True
    return boxed


def make_boxed_func(fn: Callable) -> Callable:
    """`functorch.compile.make_boxed_func`: wraps a compiled graph in the
    calling convention AOTAutograd expects of its compilers. Without it, an
    equivalent wrapper of Kitsune's own (the convention is a list argument and
    a `_boxed_call` flag)."""
    try:
        from functorch.compile import make_boxed_func as make
    except ImportError as error:
        _unavailable("functorch.compile.make_boxed_func", error, "Kitsune's own boxed wrapper is used")
        return _boxed(fn)
    return make(fn)


def min_cut_partitioner() -> Callable | None:
    """`torch._functorch.partitioners.min_cut_rematerialization_partition`:
    the joint-graph partitioner that recomputes cheap pointwise work in the
    backward instead of saving it (Inductor's choice). Without it, the
    default partitioner (`default_partition`: more activations saved, more
    memory), else None (AOTAutograd's own default)."""
    try:
        partitioners = importlib.import_module("torch._functorch.partitioners")
    except ImportError as error:
        _unavailable("torch._functorch.partitioners", error, "AOTAutograd's default partitioner is used")
        return None
    partition = getattr(partitioners, "min_cut_rematerialization_partition", None)
    if partition is None:
        _unavailable("min_cut_rematerialization_partition", "missing", "activations are saved, not recomputed")
        return getattr(partitioners, "default_partition", None)
    return partition


def aot_autograd(**kwargs) -> Callable:
    """`torch._dynamo.backends.common.aot_autograd(**kwargs)`: a Dynamo
    backend that runs AOTAutograd (functionalisation, decompositions, the
    forward/backward split) and hands the aten graphs to the given compilers.
    A `partition_fn` of None is left out (AOTAutograd's default). Without it
    Kitsune cannot capture aten graphs: the backend returned runs Dynamo's
    graphs as they are, through PyTorch, with a warning (nothing is fused)."""
    if kwargs.get("partition_fn", True) is None:
        kwargs.pop("partition_fn")
    try:
        from torch._dynamo.backends.common import aot_autograd as make_backend
    except ImportError as error:
        log.warning("AOTAutograd is not available in this PyTorch (%s): models run unfused", error)
        return _eager_backend
    return make_backend(**kwargs)


def _eager_backend(gm: torch.fx.GraphModule, example_inputs) -> Callable:
    return gm.forward


# --- Triton ----------------------------------------------------------------------

def static_launcher_class() -> type | None:
    """`torch._inductor.runtime.static_triton_launcher.StaticallyLaunchedCudaKernel`,
    or None where this PyTorch has none (then kernels launch through Triton's
    own launcher)."""
    try:
        from torch._inductor.runtime.static_triton_launcher import StaticallyLaunchedCudaKernel
    except ImportError as error:
        _unavailable("Inductor's static Triton launcher", error, "kernels launch through Triton's launcher")
        return None
    return StaticallyLaunchedCudaKernel


def triton_async_compile_mode():
    """Triton's parallel-compile context (`AsyncCompileMode`, Triton 3.4+) as a function
    `mode(executor)` -> context manager under which `JITFunction.warmup` compiles in
    `executor` and the block's end waits for every compile (errors left to the first
    launch); None where this Triton has none."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return None
    import inspect

    try:
        takes_ignore = "ignore_errors" in inspect.signature(AsyncCompileMode).parameters
    except (TypeError, ValueError):
        takes_ignore = False
    return (lambda pool: AsyncCompileMode(pool, ignore_errors=True)) if takes_ignore else AsyncCompileMode


def static_cuda_launcher(compiled, cubin_path: str):
    """`torch._inductor.runtime.static_triton_launcher.StaticallyLaunchedCudaKernel`
    built for one compiled Triton kernel whose cubin is at `cubin_path` (the
    launcher reads it from the kernel's `_cubin_path`). Inductor's launcher
    skips Triton's per-signature C launcher build (about 0.3 s of a cold
    compile) and costs less per launch. Raises where it is missing or its
    interface changed: the caller then launches through Triton's own launcher."""
    launcher = static_launcher_class()
    if launcher is None:
        raise RuntimeError("this PyTorch has no static Triton launcher")
    compiled._cubin_path = cubin_path
    return launcher(compiled)


def static_launch_entry(static) -> Callable:
    """The C function under a static launcher's `run` (`C_impl._launch_kernel`),
    which Kitsune calls with the function, grid, warps, shared memory and
    argument types bound once (a few microseconds a launch). Raises
    AttributeError where the launcher's layout changed: the caller then calls
    `static.run`."""
    return static.C_impl._launch_kernel


def triton_interpreter_types() -> tuple[type, type] | None:
    """`triton.runtime.interpreter.InterpreterBuilder` and `TensorHandle`: the
    interpreter's op builder (Kitsune gives its comparisons the int1 type they
    have on a GPU) and its tensor wrapper (Kitsune's interpreted libdevice
    functions return them). None where missing: under TRITON_INTERPRET=1,
    kernels that call libdevice functions then fail to run and their groups
    run through PyTorch."""
    try:
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except ImportError as error:
        _unavailable("triton.runtime.interpreter", error, "interpreted kernels cannot call libdevice functions")
        return None
    return InterpreterBuilder, TensorHandle


def import_torchvision():
    """torchvision, or raise ImportError. The PyPI wheel is built against CUDA: on a
    CPU-only torch its C++ ops do not load, which torchvision tolerates except for
    two fake registrations (nms, qnms) that then fail with "operator torchvision::nms
    does not exist". Only the model zoo is used here (no detection ops), so those two
    schemas are defined and the import retried."""
    try:
        import torchvision
        return torchvision
    except RuntimeError as error:
        if "torchvision::nms does not exist" not in str(error):
            raise ImportError(f"torchvision failed to import: {error}") from error
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[name]
    global _TORCHVISION_SHIM
    _TORCHVISION_SHIM = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TORCHVISION_SHIM.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    logging.getLogger("kitsune").info("torchvision's C++ ops do not load with this torch (CUDA wheel, CPU torch); "
                                      "its models need none of them")
    import torchvision
    return torchvision


_TORCHVISION_SHIM = None


# --- Fake tensors, pytrees and tensor subclasses (lazy mode, attention dispatch) --------

def _fake_tensor_mode_class() -> type:
    from torch._subclasses import FakeTensorMode as mode  # noqa: N813
    return mode


FakeTensorMode = _fake_tensor_mode_class()


def unset_fake_temporarily():
    """`torch._subclasses.fake_tensor.unset_fake_temporarily()`: a context outside the active
    fake-tensor mode (what runs there is real); a null context where this torch has none."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily as unset
    except ImportError as error:
        _unavailable("torch._subclasses.fake_tensor.unset_fake_temporarily", error,
                     "measurements under fake tracing are skipped")
        return contextlib.nullcontext()
    return unset()


def tree_map_only(types, fn, tree):
    """`torch.utils._pytree.tree_map_only`: fn applied to the leaves of `tree` of `types`."""
    from torch.utils._pytree import tree_map_only as mapped
    return mapped(types, fn, tree)


# The raw callable, for a hot path that calls it by position (kitsune.lazy.region).
raw_make_wrapper_subclass = torch.Tensor._make_wrapper_subclass


def make_wrapper_subclass(cls, shape, **kwargs) -> torch.Tensor:
    """`torch.Tensor._make_wrapper_subclass`: a tensor of subclass `cls` with this metadata and no
    storage of its own (kitsune.lazy's placeholders)."""
    return torch.Tensor._make_wrapper_subclass(cls, shape, **kwargs)


def dynamo_compiling() -> bool:
    """Whether Dynamo is tracing the code that calls this (`torch.compiler.is_dynamo_compiling`,
    or `torch._dynamo.is_compiling` in an older torch)."""
    public = getattr(torch.compiler, "is_dynamo_compiling", None)
    if public is not None:
        return bool(public())
    return bool(torch._dynamo.is_compiling())


def dynamo_trace_seconds() -> float:
    """Dynamo's bytecode tracing of the frame it compiled last: the last "bytecode_tracing" entry of
    `torch._dynamo.utils.compilation_time_metrics` (0 where this torch keeps no such metric)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
        times = compilation_time_metrics.get("bytecode_tracing") or ()
        return float(times[-1]) if times else 0.0
    except Exception:  # noqa: BLE001 - a private metric: missing or reshaped in another torch
        return 0.0


def gpu_sleep(cycles: int) -> bool:
    """Keep the current CUDA stream busy for about `cycles` GPU clock cycles
    (`torch.cuda._sleep`), so that work enqueued after it is timed back to back,
    without the host's launch latency; False where this PyTorch lacks it."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return False
    sleep(int(cycles))
    return True
