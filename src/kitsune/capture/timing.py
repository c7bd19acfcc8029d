"""Measured choices between a library's fused call and the plain call plus one
elementwise pass (kitsune.capture.conv_epilogue, kitsune.capture.matmul_epilogue):
timed once per configuration, on random tensors of its shapes, strides and
dtype (values do not change a convolution's or a matmul's time)."""
from __future__ import annotations

import torch

MIN_GAIN = 0.97  # the fused call must be at least 3 % faster


def random_like(val: torch.Tensor) -> torch.Tensor:
    """A real tensor with `val`'s shape, strides, dtype and device, normally distributed."""
    return torch.empty_strided(tuple(val.shape), val.stride(), dtype=val.dtype, device=val.device).normal_()


# Before each timed window the stream sleeps this many GPU cycles (~2.5 ms on an
# H100), long enough for the host to enqueue the window's calls: the window then
# times the kernels back to back, as a CUDA-graph replay runs them, not the host's
# launch latency (a single timed call of a short kernel measured its launch: on an
# H100 cuDNN's fused conv+ReLU looked faster than the plain convolution in
# isolation and ran 6x slower in MobileNetV3).
SLEEP_CYCLES = 5_000_000
CALLS_PER_WINDOW = 3


def time_ms(fn, repeats: int = 5) -> float:
    """Median GPU time of one fn() in ms (CUDA events around `CALLS_PER_WINDOW`
    calls enqueued behind a sleep), after two warm-up calls."""
    from kitsune import _compat

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _compat.gpu_sleep(SLEEP_CYCLES)
        start.record()
        for _ in range(CALLS_PER_WINDOW):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS_PER_WINDOW)
    return sorted(times)[len(times) // 2]


def refusal_by_time(measure, args, fused: str, plain: str) -> tuple[str | None, float, float]:
    """(why not, fused ms, plain ms) from `measure(*args)`: None when the fused call
    (named `fused` in the reason) is at least MIN_GAIN faster than `plain`; a
    configuration the library refuses is a reason too."""
    try:
        fused_ms, plain_ms = measure(*args)
    except Exception as error:  # noqa: BLE001 - an unsupported configuration stays as it is
        return f"{fused} failed: {type(error).__name__}: {error}", 0.0, 0.0
    if fused_ms >= MIN_GAIN * plain_ms:
        return f"{fused} measured {fused_ms:.3f} ms, {plain} {plain_ms:.3f} ms", fused_ms, plain_ms
    return None, fused_ms, plain_ms
