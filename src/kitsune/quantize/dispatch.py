"""Which kernel computes a quantized linear, and launching it.

- CPU (and any device without Triton): the PyTorch path. The weight is
  dequantised per call into x's dtype (`packing.dequantize`, a few elementwise
  passes) and multiplied by `F.linear`, then the activation. Nothing is cached:
  a quantized model keeps its small memory footprint. This path is for
  correctness and memory, not speed.
- CUDA, M rows (the product of x's leading dimensions):
  * M == 1: the "gemv" form or the "splitk" form; 2 <= M <= GEMV_MAX_ROWS: the "splitk"
    form (decode), among a few tile sizes / K splits (`_small_configs`);
  * M > GEMV_MAX_ROWS: the "tiled" form (`_tiled_configs`) or `dequantize_kernel` +
    cuBLAS (`F.linear`).
  Each candidate is timed (triton.testing.do_bench) on the first call of each key (the
  rows, as a power of two above GEMV_MAX_ROWS, N, K, bits, group, dtype, activation) and
  the fastest kept for the process (`CHOICES`, times in `TIMES`, logged at debug level).
  Where nothing can be measured (during CUDA-graph capture, or KITSUNE_QUANT_MEASURE=0)
  the documented rule applies: the first candidate below DEQUANT_MIN_ROWS rows,
  dequantise + cuBLAS from there.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from kitsune.quantize.packing import dequantize, per_byte

log = logging.getLogger("kitsune")

GEMV_MAX_ROWS = 16
DEQUANT_MIN_ROWS = 256
CHOICES: dict = {}  # key (rows or their power-of-two bucket, N, K, bits, ...) -> (kind, QuantConfig or None)
TIMES: dict = {}    # key -> {candidate: measured ms}, for reports and benchmarks
ACTIVATIONS = ("none", "relu", "gelu", "silu")
_ACT_FN = {"none": lambda y: y, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    return _ACT_FN[activation](y)


def torch_quantized_linear(x, codes, scales, zeros, bias, bits, group_size, in_features, activation):
    """The PyTorch path: dequantise into x's dtype, `F.linear`, activation."""
    weight = dequantize(codes, scales, zeros, bits, group_size, in_features, x.dtype)
    return apply_activation(F.linear(x, weight, None if bias is None else bias.to(x.dtype)), activation)


def _zero_const(codes: torch.Tensor, zeros, bits: int) -> float:
    if zeros is not None or codes.dtype == torch.int8:
        return 0.0
    return float(2 ** (bits - 1))


def _fit_group(block_k: int, group_size: int, minimum: int) -> int:
    """`block_k` halved (not below `minimum`) until it divides the group, so that a tile's
    columns share one scale (one load a row instead of a gather); unchanged if none does."""
    fitted = block_k
    while fitted > minimum and group_size % fitted:
        fitted //= 2
    return fitted if group_size % fitted == 0 else block_k


def _small_configs(m: int, n: int, kp: int, bits: int, group_size: int, sms: int) -> list:
    """Candidate configurations for M <= GEMV_MAX_ROWS rows, the default first: K split so
    that the grid fills the SMs about twice, each program keeping at least two K blocks;
    from two rows on (tl.dot) also with the sub-tiles interleaved."""
    from kitsune.quantize.kernels import QuantConfig
    # (form, block_n, block_k, warps, interleave); one row also tries the 16-row tl.dot form: the
    # tensor cores then do the multiply-adds that the "gemv" form spends ALU instructions on
    dot_shapes = (("splitk", 64, 128, 4, False), ("splitk", 32, 128, 4, False), ("splitk", 64, 128, 4, True),
                  ("splitk", 128, 128, 8, True))
    if m == 1:
        shapes = (("gemv", 64, 128, 4, False), ("gemv", 128, 128, 8, False), ("gemv", 32, 256, 4, False),
                  ("gemv", 128, 64, 4, False)) + dot_shapes[::2]
    else:
        shapes = dot_shapes
    out = []
    for form, block_n, block_k, warps, interleave in shapes:
        minimum = 16 * per_byte(bits) if form == "splitk" else per_byte(bits)  # tl.dot: >= 16 byte columns
        if interleave and bits == 8:
            continue  # one code a byte: nothing to interleave
        block_k = _fit_group(max(block_k, minimum), group_size, minimum)
        block_j = block_k // per_byte(bits)
        tiles = -(-n // block_n)
        split = max(1, min(2 * sms // max(tiles, 1), kp // (2 * block_j), 16))
        config = QuantConfig(form=form, block_m=1 if form == "gemv" else 16, block_n=block_n,
                             block_k=block_k, split_k=split, num_warps=warps, num_stages=3, interleave=interleave)
        if config not in out:
            out.append(config)
    return out


def _tiled_configs(m: int, bits: int, group_size: int) -> list:
    """Candidates for more than GEMV_MAX_ROWS rows (dequantise + cuBLAS is another, see `choose`)."""
    from kitsune.quantize.kernels import QuantConfig
    block_m = 32 if m <= 32 else 64 if m <= 64 else 128
    minimum = 16 * per_byte(bits)
    out = []
    for block_n, block_k, stages, interleave in ((128, 64, 3, False), (64, 64, 4, False), (128, 64, 3, True),
                                                 (128, 128, 3, True)):
        if interleave and bits == 8:
            continue
        block_k = _fit_group(max(block_k, minimum), group_size, minimum)
        config = QuantConfig(form="tiled", block_m=block_m, block_n=block_n, block_k=block_k, split_k=1,
                             num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=stages,
                             interleave=interleave)
        if config not in out:
            out.append(config)
    return out


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def triton_quantized_linear(x2d, codes, scales, zeros, bias, bits, group_size, in_features, activation,
                            config=None):
    """`act(x2d @ W.T + bias)` by `kernels.quantized_matmul_kernel`; x2d is [M, K] with unit
    column stride. `config` (a QuantConfig) defaults to the form for M rows."""
    import triton

    from kitsune.quantize.kernels import _TL_DTYPES, quantized_matmul_kernel, split_k_epilogue_kernel
    m, k = x2d.shape
    n, kp = codes.shape
    if config is None:
        config = _candidates(m, n, kp, bits, group_size, x2d.device)[0]
    block_j = max(1, config.block_k // per_byte(bits))
    j_per_split = -(-kp // config.split_k)
    j_per_split = -(-j_per_split // block_j) * block_j  # whole tiles: a tile never straddles two programs
    split = -(-kp // j_per_split) if kp else 1
    out = torch.empty(m, n, dtype=x2d.dtype, device=x2d.device)
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x2d.device) if split > 1 else out
    precision = "tf32" if x2d.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    dtype = _TL_DTYPES[x2d.dtype]
    flags = dict(BITS=bits, GROUP=group_size, HAS_ZEROS=zeros is not None, ZERO_CONST=_zero_const(codes, zeros, bits),
                 HAS_BIAS=bias is not None, ACTIVATION=activation, DTYPE=dtype)
    grid = (triton.cdiv(n, config.block_n), split, triton.cdiv(m, config.block_m))
    quantized_matmul_kernel[grid](
        x2d, codes, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out, partial,
        m, n, k, kp, j_per_split, x2d.stride(0), codes.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, out.stride(0), PRECISION=precision,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_J=block_j, SPLIT_K=split,
        ONE_GROUP=group_size % config.block_k == 0, PER_BYTE=per_byte(bits), INTERLEAVE=config.interleave,
        EVEN_K=kp % block_j == 0 and k == kp * per_byte(bits) and codes.dtype == torch.uint8,
        num_warps=config.num_warps, num_stages=config.num_stages, **flags)
    if split > 1:
        flags.pop("BITS"), flags.pop("GROUP"), flags.pop("HAS_ZEROS"), flags.pop("ZERO_CONST")
        split_k_epilogue_kernel[(triton.cdiv(n, 128), m)](
            partial, bias if bias is not None else partial, out, m, n, out.stride(0), SPLIT_K=split, BLOCK_N=128,
            **flags)
    return out


def triton_dequantize(codes, scales, zeros, bits, group_size, in_features, dtype):
    """W [N, in_features] in `dtype` by `kernels.dequantize_kernel` (equal to `packing.dequantize`)."""
    import triton

    from kitsune.quantize.kernels import _TL_DTYPES, dequantize_kernel
    n, kp = codes.shape
    out = torch.empty(n, in_features, dtype=dtype, device=codes.device)
    block_n, block_j = 32, 64
    dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(kp, block_j))](
        codes, scales, zeros if zeros is not None else scales, out, n, in_features, kp, codes.stride(0),
        scales.stride(0), zeros.stride(0) if zeros is not None else 0, out.stride(0), BITS=bits, GROUP=group_size,
        HAS_ZEROS=zeros is not None, ZERO_CONST=_zero_const(codes, zeros, bits), DTYPE=_TL_DTYPES[dtype],
        BLOCK_N=block_n, BLOCK_J=block_j, PER_BYTE=per_byte(bits))
    return out


def dequant_cublas_linear(x2d, codes, scales, zeros, bias, bits, group_size, in_features, activation):
    """The many-rows alternative: dequantise W with one kernel, then cuBLAS."""
    weight = triton_dequantize(codes, scales, zeros, bits, group_size, in_features, x2d.dtype)
    return apply_activation(F.linear(x2d, weight, None if bias is None else bias.to(x2d.dtype)), activation)


def _candidates(m: int, n: int, kp: int, bits: int, group_size: int, device) -> list:
    if m <= GEMV_MAX_ROWS:
        return _small_configs(m, n, kp, bits, group_size, _sm_count(device))
    return _tiled_configs(m, bits, group_size)


def _can_measure(device) -> bool:
    if os.environ.get("KITSUNE_QUANT_MEASURE", "1") == "0" or device.type != "cuda":
        return False
    return not torch.cuda.is_current_stream_capturing()


def _bench_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=20)


def choose(args) -> tuple:
    """(kind, config) for these arguments: kind "triton" (with a QuantConfig) or "dequant"
    (dequantise + cuBLAS); measured once per key on CUDA (module docstring), else the defaults."""
    x2d, codes, scales, zeros, bias, bits, group_size, in_features, activation = args
    m, n, kp = x2d.shape[0], codes.shape[0], codes.shape[1]
    rows = m if m <= GEMV_MAX_ROWS else 1 << (m - 1).bit_length()
    key = (rows, n, in_features, bits, group_size, zeros is None, x2d.dtype, activation, str(x2d.device))
    if key in CHOICES:
        return CHOICES[key]
    candidates = [("triton", c) for c in _candidates(m, n, kp, bits, group_size, x2d.device)]
    if m > GEMV_MAX_ROWS:
        candidates.append(("dequant", None))
    if not _can_measure(x2d.device):
        if m >= DEQUANT_MIN_ROWS:
            return "dequant", None
        return candidates[0]
    times = {}
    with torch.no_grad():
        for kind, config in candidates:
            fn = (lambda c=config: triton_quantized_linear(*args, config=c)) if kind == "triton" else \
                (lambda: dequant_cublas_linear(*args))
            try:
                times[(kind, config)] = _bench_ms(fn)
            except Exception as error:  # noqa: BLE001 - a configuration that does not build is not a choice
                log.debug("quantized matmul %s: %s %s failed: %s: %s", key, kind, config, type(error).__name__, error)
    if not times:
        raise RuntimeError("no quantized-matmul kernel could run")
    best = min(times, key=times.get)
    CHOICES[key] = best
    TIMES[key] = {describe(k, c): t for (k, c), t in times.items()}
    log.debug("quantized matmul %s: %s", key, TIMES[key])
    return best


def describe(kind: str, config) -> str:
    """A choice in words: "dequantise + cuBLAS" or e.g. "splitk 16x64x256 split 4 interleaved"."""
    if kind == "dequant":
        return "dequantise + cuBLAS"
    return (f"{config.form} {config.block_m}x{config.block_n}x{config.block_k} split {config.split_k}"
            + (" interleaved" if config.interleave else ""))


def gpu_quantized_linear(x2d, codes, scales, zeros, bias, bits, group_size, in_features, activation):
    """The CUDA path for [M, K] rows: the kernel chosen by `choose`."""
    args = (x2d, codes, scales, zeros, bias, bits, group_size, in_features, activation)
    kind, config = choose(args)
    if kind == "triton":
        return triton_quantized_linear(*args, config=config)
    return dequant_cublas_linear(*args)
