"""Launch choices: every block size, warp count and size threshold the code
generators choose kernels by, in one validated object.

The Triton and C emitters (and `TritonKernel`'s grid) read `launch_choices()`
rather than module globals, so a benchmark or a test tries other values with

    with override_launch_choices(looped_rblock=2048, looped_warps=8):
        ...compile and time...

and the defaults come back when the block ends. Every choice changes either the
generated source (block sizes, loop structure and thresholds are written into
it, and the source is what keys the kernel caches) or the launch that
`TritonKernel` computes next to it from the same choices.

The override is process-wide, not per thread: kernels are also compiled on
threads the caller does not own (autograd's device threads compile the
backward, the C backend builds kernels one by one on a thread pool), and they
must see the same choices. Overrides are for benchmarks and tests; nested ones
restore what was there before them, concurrent ones from several threads are
not supported.

Unless said otherwise, the figures in the comments were measured on an
H100/H200 with bf16 tensors (torch 2.11, triton 3.6); `benchmarks/` has the
scripts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass, field

__all__ = ["LaunchChoices", "launch_choices", "override_launch_choices"]

# kinds of value a choice may take (checked by LaunchChoices.__post_init__)
_POW2 = "a power of two >= 1"
_WARPS = "a power of two from 1 to 32"
_COUNT = "an integer >= 1"
_THRESHOLD = "an integer >= 0"
_OPTIONAL_WARPS = "None or a power of two from 1 to 32"


def _choice(default, kind: str):
    return field(default=default, metadata={"kind": kind})


@dataclass(frozen=True)
class LaunchChoices:
    """The launch and tiling choices of the Triton and C code generators."""

    # -- Triton: pointwise kernels --------------------------------------------
    # Elements a program handles at most (XBLOCK), for pointwise kernels.
    max_xblock: int = _choice(1024, _POW2)

    # -- Triton: row reductions -----------------------------------------------
    # Rows of up to this many elements (rounded up to a power of two) are
    # reduced in registers in one block ("persistent"); longer rows are walked
    # in chunks.
    persistent_max: int = _choice(4096, _POW2)
    # A row longer than persistent_max is walked in chunks of looped_rblock with
    # looped_warps warps (H200, 8192x32000 bf16 cross-entropy: 0.156 ms in
    # chunks of 4096, 0.184 in chunks of 2048; 8 warps were slower in every
    # chunk size).
    looped_rblock: int = _choice(4096, _POW2)
    looped_warps: int = _choice(4, _WARPS)
    # Rows of fewer elements share a program, up to this many elements a block.
    row_block_elements: int = _choice(1024, _POW2)
    # A persistent block of 4096 elements or more gets 8 warps, unless each
    # element takes more than heavy_element_ops operations: then 4, which
    # leaves each thread more independent work (16384x4096 bf16: softmax
    # 0.072 ms with 8 warps, 0.079 with 4; layer_norm+GELU 0.083 with 4, 0.090
    # with 8; benchmarks/probes/probe_rows.py and bench_reductions.py).
    heavy_element_ops: int = _choice(12, _THRESHOLD)

    # -- Triton: outer (column) reductions ------------------------------------
    # A program reduces RBLOCK positions of XBLOCK adjacent rows per step, so
    # each load reads XBLOCK contiguous elements of one position; XBLOCK
    # shrinks (down to 16) until there are outer_programs programs to fill the
    # GPU (a bias gradient has only as many rows as features), and RBLOCK grows
    # so that a step holds outer_tile elements: the loop is latency-bound (on
    # an H200, a 16384x4096 bias gradient took 1.31 / 0.77 / 0.42 ms with
    # 16 / 32 / 64 positions a step, whatever the number of programs).
    outer_tile: int = _choice(8192, _POW2)
    outer_programs: int = _choice(264, _COUNT)
    outer_warps: int | None = _choice(None, _OPTIONAL_WARPS)  # None: by the step's size
    # float32 sums whose lanes each add more than this many values are
    # Kahan-compensated (an outer kernel adds R / RBLOCK values to each lane in
    # order: 16384 floats erred 3.6 times as much as eager).
    compensate_steps: int = _choice(64, _THRESHOLD)

    # -- Triton: split reductions ---------------------------------------------
    # A column reduction over few output positions (a bias gradient: 4096
    # positions, 16384 tokens) reads split_xblock adjacent positions of each row
    # (128 contiguous bytes of bf16) and splits the reduced dimension over
    # several programs (at most split_max, until there are split_min_programs),
    # which write partial results to a float32 workspace; a second, small
    # kernel combines each position's partials and computes the epilogue.
    # Unsplit, filling the GPU took tiles 16 positions wide: 32 bytes a row,
    # half of each DRAM burst, and the kernel ran at 57 % of copy. Only
    # reductions of at least split_min_elements are split.
    split_xblock: int = _choice(64, _POW2)
    split_min_programs: int = _choice(528, _COUNT)  # four programs per SM of an H100/H200
    split_min_elements: int = _choice(1 << 20, _THRESHOLD)
    split_max: int = _choice(64, _COUNT)
    split_warps: int = _choice(8, _WARPS)
    # Row layouts with fewer rows than split_rows (and more than
    # row_split_min_elements elements) are split too (a whole-tensor sum is one
    # row), into about row_split_programs programs (at most row_split_max parts
    # a row) of looped_rblock-element chunks: many short programs balance over
    # the SMs (H200, mean of (x - y)^2 over 16384x4096 bf16: 512 / 1024 / 4096
    # parts 70 / 79 / 64 us, the last at the copy rate;
    # benchmarks/probes/probe_generated.py).
    split_rows: int = _choice(132, _THRESHOLD)
    row_split_programs: int = _choice(4096, _COUNT)
    row_split_max: int = _choice(4096, _COUNT)
    row_split_min_elements: int = _choice(1 << 16, _THRESHOLD)
    # Unsplittable reductions of fewer than few_rows rows and more than
    # few_rows_elements elements are refused by the Triton backend (one
    # program would walk each long row: a whole-tensor variance of 16M
    # elements on one SM); they run through PyTorch.
    few_rows: int = _choice(4, _THRESHOLD)
    few_rows_elements: int = _choice(1 << 16, _THRESHOLD)

    # -- C (CPU) --------------------------------------------------------------
    # Below this many elements a kernel runs on one thread: forking costs more.
    cpu_parallel_threshold: int = _choice(32768, _THRESHOLD)
    # Reductions of fewer rows (and more than cpu_parallel_threshold elements)
    # split each row between the threads, in blocks of cpu_split_block
    # positions (a 4M-element float sum summed lane by lane erred 2e-5 against
    # eager; in blocks it is as accurate as eager's cascade).
    cpu_few_rows: int = _choice(4, _THRESHOLD)
    cpu_split_block: int = _choice(4096, _COUNT)
    # Outer reductions take tiles of adjacent rows, as wide as an even split
    # over the threads allows within these bounds: hardware prefetchers stop
    # at page boundaries, and tiles of 64 floats (a quarter of a 4 KiB page per
    # position, pages apart) ran from DRAM at a third of the speed they ran
    # from cache. The tile's per-row arrays live on the thread's stack and are
    # kept within cpu_outer_stack_bytes (the tile halves until they fit).
    cpu_outer_tile_min: int = _choice(64, _COUNT)
    cpu_outer_tile_max: int = _choice(1024, _COUNT)
    cpu_outer_stack_bytes: int = _choice(256 << 10, _COUNT)
    # float sums of an outer reduction over more positions are
    # Kahan-compensated (summed in order, 4096 floats erred twice as much as
    # eager's cascade).
    cpu_compensate_after: int = _choice(64, _THRESHOLD)
    # Row buffers that keep costly per-element values (softmax's exp) for the
    # last loop of a row kernel: per thread, all buffers of one kernel together.
    cpu_row_buffer_bytes: int = _choice(128 << 10, _THRESHOLD)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check(f.name, getattr(self, f.name), f.metadata["kind"])
        if self.cpu_outer_tile_min > self.cpu_outer_tile_max:
            raise ValueError(f"LaunchChoices.cpu_outer_tile_min ({self.cpu_outer_tile_min}) is larger than "
                             f"cpu_outer_tile_max ({self.cpu_outer_tile_max})")

    def replace(self, **changes) -> "LaunchChoices":
        """A copy with `changes` (validated); an unknown name raises TypeError naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"LaunchChoices has no field {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


def _check(name: str, value, kind: str) -> None:
    if value is None and kind == _OPTIONAL_WARPS:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and kind in (_POW2, _WARPS, _OPTIONAL_WARPS):
        ok = value >= 1 and value & (value - 1) == 0 and (kind == _POW2 or value <= 32)
    elif ok:
        ok = value >= (1 if kind == _COUNT else 0)
    if not ok:
        raise ValueError(f"LaunchChoices.{name} must be {kind}, got {value!r}")


_DEFAULT = LaunchChoices()
_current = _DEFAULT
_lock = threading.Lock()


def launch_choices() -> LaunchChoices:
    """The launch choices in force (the defaults unless overridden)."""
    return _current


@contextlib.contextmanager
def override_launch_choices(**changes):
    """Use the current choices with `changes` until the block ends (process-wide,
    see the module docstring); yields the choices in force inside the block."""
    global _current
    with _lock:
        previous = _current
        _current = previous.replace(**changes)
        inside = _current
    try:
        yield inside
    finally:
        with _lock:
            _current = previous
