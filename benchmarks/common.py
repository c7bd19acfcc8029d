"""Shared helpers for Kitsune's benchmarks: caches, timing, bandwidth, reporting.

The method (see each benchmark's docstring for its command line):

* Timing on CUDA uses a CUDA event pair around every call and takes the median
  over many calls after a warm-up; on the CPU it uses `time.perf_counter`
  around every call, also median after a warm-up. Device work is asynchronous,
  so the CPU timer synchronises nothing (the CPU path is synchronous) and the
  CUDA timer synchronises only once, after all calls.
* Inputs are not rotated between calls: a benchmark must use tensors larger
  than the last-level cache (`cache_bytes`) for the numbers to mean DRAM
  bandwidth; `fits_in_cache` lets it say so when they do not.
* Bandwidth is counted with the fewest bytes any implementation must move:
  every input read once plus every output written once (`min_bytes`). The
  ceiling to compare with is a measured device-to-device copy
  (`dst.copy_(src)`, bytes read + bytes written) timed the same way.
* A cold compile is the first call of a freshly `torch.compile`d function
  after `cold_start()`: Dynamo reset, in-memory caches cleared, and fresh,
  empty on-disk cache directories for Inductor, Triton and Kitsune.

* Backends run side by side in one process (eager, Inductor, Kitsune), each
  checked against eager before it is timed. Where a benchmark's calls are
  short enough for the host to matter, its backends are timed in
  `interleaved_rounds` (every backend once a round), so drift of the machine
  hits them alike; the median round is the figure.
* Every maintained benchmark takes `--device`, `--backends`, `--json PATH`
  and `--quick` (`add_standard_arguments`), writes everything it measured to
  the JSON file with `environment()` (device, versions, date, and the kitsune
  package it imported) and prints a short markdown table last.

Only the standard library and torch are imported at module level, so a
benchmark can call `use_private_caches()` before it imports kitsune.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import itertools
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CACHE_ENV_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "KITSUNE_CACHE_DIR")
_cache_root: Path | None = None
_cold_ids = itertools.count()


# --------------------------------------------------------------------------- caches

def use_private_caches() -> Path:
    """Point Inductor's, Triton's and Kitsune's on-disk caches at a new temporary
    directory (removed at exit). Call at process start, before importing kitsune."""
    global _cache_root
    _cache_root = Path(tempfile.mkdtemp(prefix="kitsune-bench-"))
    atexit.register(shutil.rmtree, _cache_root, ignore_errors=True)
    _point_caches_at(_cache_root / "initial")
    return _cache_root


def _point_caches_at(directory: Path) -> None:
    for var in CACHE_ENV_VARS:
        path = directory / var.split("_")[0].lower()
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)


def disable_compile_caches() -> None:
    """Turn off PyTorch's compile caches (FX graph, AOTAutograd, autotuning), local and
    remote, so that every compile measured does all of its work. Names missing from
    this torch version are skipped."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    settings = {
        inductor_config: dict(force_disable_caches=True, fx_graph_cache=False, fx_graph_remote_cache=False,
                              autotune_local_cache=False, autotune_remote_cache=False,
                              bundled_autotune_remote_cache=False, bundle_triton_into_fx_graph_cache=False),
        functorch_config: dict(enable_autograd_cache=False, enable_remote_autograd_cache=False),
    }
    for module, values in settings.items():
        for name, value in values.items():
            if hasattr(module, name):
                setattr(module, name, value)


def cold_start() -> None:
    """Make the next compile cold: reset Dynamo, clear Inductor's in-memory caches,
    forget Kitsune's imported kernel modules, and give every on-disk cache a new,
    empty directory. Inductor's compile workers stay up (their start-up is paid once,
    not by every case); Inductor hands them the current TORCHINDUCTOR_CACHE_DIR and
    TRITON_CACHE_DIR with every task, and its in-memory kernel caches are among those
    `clear_caches()` empties."""
    if _cache_root is None:
        raise RuntimeError("call use_private_caches() at process start first")
    torch._dynamo.reset()
    try:
        from torch._inductor.utils import clear_caches
        clear_caches()
    except ImportError:
        pass
    for name in [m for m in sys.modules if m.startswith("kitsune_generated.")]:
        del sys.modules[name]
    _point_caches_at(_cache_root / f"cold{next(_cold_ids)}")


# --------------------------------------------------------------------------- host memory

# glibc serves every allocation over 32 MiB with a fresh mmap and unmaps it on free, so
# on the CPU each call's output tensor page-faults in anew: at 16M elements that costs
# more than the kernel itself (and far more in a VM). With these settings freed memory
# stays in the heap and is reused, as the CUDA caching allocator reuses device memory.
MALLOC_REUSE_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def reexec_with_malloc_reuse() -> None:
    """Restart this Python script with MALLOC_REUSE_ENV set (once; Linux/glibc only),
    since glibc reads these variables only at process start."""
    if platform.system() != "Linux" or malloc_reuse_active():
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_REUSE_ENV})


def malloc_reuse_active() -> bool:
    return all(os.environ.get(k) == v for k, v in MALLOC_REUSE_ENV.items())


# --------------------------------------------------------------------------- timing

@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float      # spread: 75th minus 25th percentile
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int, warmup_ms: float = 50.0, min_warmup_calls: int = 3) -> Timing:
    """Median wall time of `fn()` over `repeats` calls, after a warm-up of at least
    `min_warmup_calls` calls and `warmup_ms` milliseconds."""
    start = time.perf_counter()
    calls = 0
    while calls < min_warmup_calls or (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
        synchronize(device)
        calls += 1

    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [begin.elapsed_time(end) for begin, end in events]
    else:
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return _summarise(samples)


def interleaved_rounds(fns: dict, device: torch.device, rounds: int, calls: int,
                       warmup_calls: int = 5) -> dict:
    """{name: Timing} of the mean time of `calls` calls of each function, taken in
    `rounds` rounds that run every function once in turn (the median, min and max
    are over rounds). Interleaving makes slow drift of the machine hit every
    function alike, where timing one after the other would favour one of them."""
    for fn in fns.values():
        for _ in range(warmup_calls):
            fn()
    synchronize(device)
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - t0) * 1e3 / calls)
    return {name: _summarise(s) for name, s in samples.items()}


def gpu_busy_ms(fn, calls: int = 20) -> float:
    """GPU time per call of `fn()`: the summed durations of every kernel (and
    copy) it ran, from PyTorch's profiler, divided by `calls`. Unlike the wall
    time between events it leaves out the host: a call whose Python, guards
    and launches take longer than its kernels shows its kernels' own speed
    here (the H200's host is slow enough for that with 70 us kernels)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    for event in prof.key_averages():
        total_us += getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    return total_us / calls / 1e3


def _summarise(samples: list[float]) -> Timing:
    if len(samples) >= 2:
        q1, _, q3 = statistics.quantiles(samples, n=4)
    else:
        q1 = q3 = samples[0]
    return Timing(statistics.median(samples), min(samples), max(samples), q3 - q1, len(samples))


def cold_call(fn, *args, device: torch.device):
    """(seconds, result) of the first call of `fn(*args)`: compilation plus one run."""
    synchronize(device)
    t0 = time.perf_counter()
    result = fn(*args)
    synchronize(device)
    return time.perf_counter() - t0, result


def default_repeats(device: torch.device, bytes_per_call: int) -> int:
    """Enough calls for a stable median without taking long: 100 on CUDA (each call is
    well under a few ms at benchmark sizes); on the CPU about 2 GB moved in total,
    between 5 and 50 calls."""
    if device.type == "cuda":
        return 100
    return max(5, min(50, round(2e9 / max(bytes_per_call, 1))))


# --------------------------------------------------------------------------- bandwidth

def min_bytes(inputs, outputs) -> int:
    """The fewest bytes any implementation must move: inputs read once, outputs written once."""
    return sum(t.numel() * t.element_size() for t in (*inputs, *outputs))


def gb_per_s(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def copy_rate(device: torch.device, nbytes: int, repeats: int) -> dict:
    """Measured device-to-device copy of `nbytes` (random float32 data), with the same
    timer as the benchmarks; GB/s counts bytes read plus bytes written."""
    src = torch.randn(max(nbytes // 4, 1), device=device)
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), device, repeats)
    moved = 2 * src.numel() * src.element_size()
    torch.testing.assert_close(dst, src, rtol=0, atol=0)
    return dict(bytes_per_side=src.numel() * src.element_size(), gb_per_s=gb_per_s(moved, timing.median_ms),
                timing=timing.as_dict())


def cache_bytes(device: torch.device) -> int | None:
    """Size of the last-level cache in front of `device`'s memory: L2 on CUDA, the
    largest cache level sysfs reports for CPU 0 on the CPU (None if unknown)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes) if sizes else None


def fits_in_cache(device: torch.device, working_set: int) -> bool:
    """True when `working_set` bytes are small enough (< 2x the last-level cache) that
    repeated calls on the same tensors partly measure the cache, not memory."""
    size = cache_bytes(device)
    return size is not None and working_set < 2 * size


# --------------------------------------------------------------------------- correctness

def tolerances(dtype: torch.dtype) -> dict:
    """assert_close tolerances against eager: torch's defaults for float32, looser for
    half precision."""
    if dtype in (torch.bfloat16, torch.float16):
        return dict(rtol=1.6e-2, atol=1e-2)
    return dict(rtol=1.3e-6, atol=1e-5)


# Against float64, a result rounded once at the end is within half an ulp; allow two.
_FP64_RTOL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -22}


def check_output(out: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor) -> str | None:
    """None if `out` is right, else why not. Right means close to eager's result
    (`tolerances`), or, failing that, within two ulps of `out`'s dtype of the float64
    result: a compiler that keeps intermediates in float32 where eager rounds every
    op to bf16 is more accurate than eager, not wrong."""
    if out.shape != eager.shape or out.dtype != eager.dtype:
        return f"shape/dtype {tuple(out.shape)} {out.dtype}, eager gives {tuple(eager.shape)} {eager.dtype}"
    try:
        torch.testing.assert_close(out, eager, **tolerances(eager.dtype))
        return None
    except AssertionError as versus_eager:
        try:
            torch.testing.assert_close(out.double(), ref64, rtol=_FP64_RTOL.get(out.dtype, 1e-6), atol=1e-5)
            return None
        except AssertionError as versus_fp64:
            return f"differs from eager ({versus_eager}) and from float64 ({versus_fp64})"


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN if out has a NaN or Inf the reference lacks)."""
    out64, ref64 = out.double(), reference.double()
    if not torch.isfinite(out64).eq(torch.isfinite(ref64)).all():
        return float("nan")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


# --------------------------------------------------------------------------- reporting

def environment(device: torch.device) -> dict:
    """What ran the benchmark: device, versions, date, threads."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        extra = dict(cuda=torch.version.cuda, memory_gib=round(props.total_memory / 2**30, 1),
                     sm_count=props.multi_processor_count)
    else:
        name = _cpu_name()
        extra = dict(threads=torch.get_num_threads(), cpus=os.cpu_count())
    kitsune = sys.modules.get("kitsune")
    return dict(device=str(device), device_name=name, torch=torch.__version__, triton=triton_version,
                python=platform.python_version(), host=platform.node(),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                kitsune=getattr(kitsune, "__version__", None), kitsune_file=getattr(kitsune, "__file__", None),
                argv=sys.argv[1:], **extra)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_numel(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n:,}"


def format_rate(value: float) -> str:
    """Three significant digits at most, no exponent: 2891, 41.3, 0.52."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table with columns padded to equal width (text left, numbers right)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def numeric(text: str) -> bool:
        return text[:1].isdigit() or text[:1] in "-.(" or text in ("n/a", "FAIL")

    def line(cells):
        return "| " + " | ".join(str(c).rjust(w) if numeric(str(c)) and i > 0 else str(c).ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i > 0 else "-" * (w + 2)
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])



# --------------------------------------------------------------------------- command line and output

BACKENDS = ("eager", "inductor", "kitsune")


def add_standard_arguments(parser: argparse.ArgumentParser, backends=BACKENDS) -> None:
    """--device, --backends, --json and --quick, the same in every maintained benchmark."""
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default=",".join(backends),
                        help=f"comma-separated, any of {','.join(BACKENDS)} (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="write every number measured to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats: checks that the benchmark runs (on the CPU in seconds); "
                             "its numbers mean nothing")


def parse_backends(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise SystemExit(f"--backends: unknown backend(s) {unknown}; choose from {','.join(BACKENDS)}")
    return names


def check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")


def write_json(path, payload: dict) -> None:
    """Write a benchmark's results (non-JSON values as strings)."""
    if not path:
        return
    Path(path).write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {path}")


def ensure_kitsune_backend() -> None:
    """`backend="kitsune"` is found through the package's entry point once it is
    pip-installed; register it by hand when kitsune is only importable (PYTHONPATH=src)."""
    from torch._dynamo import list_backends, register_backend
    if "kitsune" not in list_backends(exclude_tags=()):
        from kitsune.backend import kitsune_backend
        register_backend(kitsune_backend, name="kitsune")


class WarningCollector(logging.Handler):
    """Collects the warnings Kitsune logs (fallbacks at compile and at run time), so a
    benchmark can say when a "Kitsune" time is really PyTorch's."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def kitsune_report() -> dict:
    """The parts of `kitsune.get_fusion_stats()` a benchmark keeps (missing keys are None,
    so an older or newer kitsune still reports what it has)."""
    import kitsune
    stats = kitsune.get_fusion_stats()
    return dict(num_fused=stats.get("num_fused"), kernels_before=stats.get("kernels_before"),
                kernels_after=stats.get("kernels_after"),
                fallbacks=[list(f) if isinstance(f, (list, tuple)) else f for f in stats.get("fallbacks") or []])


def speedup_cell(other_ms: float | None, kitsune_ms: float | None) -> str:
    """other time / Kitsune time as "1.23x" (> 1: Kitsune faster), or n/a."""
    if not other_ms or not kitsune_ms:
        return "n/a"
    return f"{other_ms / kitsune_ms:.2f}x"