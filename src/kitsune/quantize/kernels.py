"""Triton kernels of the weight-only quantized matmul `y = act(x @ W.T + bias)`.

W is packed (kitsune.quantize.packing): uint8 bytes holding `8 // BITS` codes
along K, one scale (and zero point) per group of GROUP columns. Every kernel
dequantises W in its prologue, tile by tile in registers, with the formula of
`packing.dequantize`: `((q - zero) * scale)` in float32, rounded to x's dtype,
so the weight it multiplies with is exactly `QuantizedLinear.dequantize()`.

Unpacking: a byte tile [BLOCK_N, BLOCK_J] gives, for each shift s, the codes
of columns `k = j * PER_BYTE + s`. Either each such sub-tile is multiplied with
the matching strided columns of x and the products of all shifts are summed
(no shuffle of registers), or (`QuantConfig.interleave`) the dequantised
sub-tiles are interleaved back into one [BLOCK_N, BLOCK_K] tile multiplied with
contiguous columns of x (one larger `tl.dot`). Which is faster depends on the
shape; both are candidates of the measured choice (kitsune.quantize.dispatch).

One kernel, three forms (a constexpr configuration, `QuantConfig`):
- "gemv" (one row, decode): BLOCK_M = 1, products summed with `tl.sum` (no tensor
  cores: one row would waste them), K split over SPLIT_K programs.
- "splitk" (2-16 rows): BLOCK_M = 16 with `tl.dot`, K split over SPLIT_K programs.
- "tiled" (many rows): BLOCK_M x BLOCK_N tiles over the grid, all of K in one program.
With SPLIT_K = 1 the bias and activation are applied in the epilogue before the one
store; with SPLIT_K > 1 each program stores a float32 partial sum and a second small
kernel adds them up and applies the epilogue.

`dequantize_kernel` writes W in x's dtype (the "dequantise + cuBLAS" choice for
many rows, kitsune.quantize.dispatch).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kitsune.codegen.triton.libm import libm, round_bf16

# The interpreter multiplies bfloat16 blocks as raw bits and truncates float32 -> bfloat16
# casts; there dot operands are widened to float32 (exact) and roundings go through round_bf16.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))

ACTIVATIONS = ("none", "relu", "gelu", "silu")
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
FORMS = ("gemv", "splitk", "tiled")


@dataclass(frozen=True)
class QuantConfig:
    """One launch configuration: the form, tile sizes (BLOCK_K in weight columns),
    K split, warps and pipeline stages."""

    form: str = "gemv"
    block_m: int = 1
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    # the shifts' sub-tiles interleaved back into one [BLOCK_N, BLOCK_K] tile (`tl.interleave`):
    # one dot over BLOCK_K and contiguous loads of x, for a shuffle of the dequantised tile
    interleave: bool = False

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"QuantConfig.form must be one of {FORMS}, got {self.form!r}")
        for name in ("block_m", "block_n", "block_k"):
            size = getattr(self, name)
            if size < 1 or size & (size - 1):
                raise ValueError(f"QuantConfig.{name} must be a power of two, got {size}")
        if self.split_k < 1:
            raise ValueError(f"QuantConfig.split_k must be >= 1, got {self.split_k}")


@triton.jit
def _round_to(y, DTYPE: tl.constexpr):
    """float32 `y` rounded to DTYPE to nearest even (the interpreter's cast truncates bf16)."""
    if DTYPE == tl.bfloat16:
        if INTERPRETED:
            y = round_bf16(y)
    return y.to(DTYPE)


@triton.jit
def _activation(y, ACTIVATION: tl.constexpr):
    """float32 activation of the rounded pre-activation (eager: linear, then act)."""
    if ACTIVATION == "relu":
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == "gelu":
        y = 0.5 * y * (1.0 + libm.erf(y * 0.7071067811865476))
    elif ACTIVATION == "silu":
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _rounded_f32(w, DTYPE: tl.constexpr):
    """float32 `w` rounded to DTYPE (nearest even), kept as float32. bfloat16 by integer ops on the
    bits (add half an ulp and the parity, clear the low half): a float conversion instruction runs
    at a quarter of the rate of integer ops, and w is finite."""
    if DTYPE == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        w = bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        w = w.to(tl.float16).to(tl.float32)
    return w


@triton.jit
def _centered_codes(packed, zero, S: tl.constexpr, BITS: tl.constexpr):
    """q - zero in float32, exactly, for the codes of shift S (`zero` a float32 block or number).
    Unsigned codes become float with integer ops: bits 0x4B000000 | q are the float 2^23 + q, and
    2^23 + zero is exact too, so the difference is q - zero exactly, without a conversion instruction."""
    if packed.dtype == tl.int8:  # signed int8 codes (a hand-written dequantisation): read as signed
        centered = packed.to(tl.float32) - zero
    else:
        q = packed.to(tl.uint32)
        if BITS != 8:
            q = (q >> (S * BITS)) & ((1 << BITS) - 1)
        centered = (q | 0x4B000000).to(tl.float32, bitcast=True) - (zero + 8388608.0)
    return centered


@triton.jit
def _dequant_tile(packed, scales_ptr, zeros_ptr, offs_n, cols, k0, n_mask, k_mask, stride_sn, stride_zn,
                  S: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ONE_GROUP: tl.constexpr,
                  HAS_ZEROS: tl.constexpr, ZERO_CONST: tl.constexpr, DTYPE: tl.constexpr,
                  AS_F32: tl.constexpr = False):
    """The weights of shift S of a byte tile: [BLOCK_N, BLOCK_J] in DTYPE (AS_F32: their DTYPE
    values as float32). `cols` are their weight columns (j * PER_BYTE + S); `k0` the tile's first
    column (ONE_GROUP: the group of every column)."""
    if ONE_GROUP:  # the whole tile is in one group: one scale per row
        group = k0 // GROUP
        scale = tl.load(scales_ptr + offs_n * stride_sn + group, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + offs_n * stride_zn + group, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        else:
            zero = ZERO_CONST
    else:
        groups = (cols // GROUP)[None, :]
        mask = n_mask[:, None] & k_mask[None, :]
        scale = tl.load(scales_ptr + offs_n[:, None] * stride_sn + groups, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + offs_n[:, None] * stride_zn + groups, mask=mask, other=0.0).to(tl.float32)
        else:
            zero = ZERO_CONST
    # past K (or N) the weight is finite but not zero: the x it meets there is loaded as 0
    w = _centered_codes(packed, zero, S, BITS) * scale
    if AS_F32:
        w = _rounded_f32(w, DTYPE)
    else:
        w = _round_to(w, DTYPE)
    return w


@triton.jit
def _interleaved_tile(packed, scales_ptr, zeros_ptr, offs_n, offs_j, k0, n_mask, j_mask, K, stride_sn, stride_zn,
                      BITS: tl.constexpr, GROUP: tl.constexpr, ONE_GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      ZERO_CONST: tl.constexpr, DTYPE: tl.constexpr, PER_BYTE: tl.constexpr):
    """The dequantised byte tile as [BLOCK_N, BLOCK_J * PER_BYTE] in column order:
    interleave(a, b) = a0 b0 a1 b1 ..., so four codes a byte are interleave(interleave(w0, w2),
    interleave(w1, w3)) = w0 w1 w2 w3 ..."""
    w0 = _dequant_tile(packed, scales_ptr, zeros_ptr, offs_n, offs_j * PER_BYTE, k0, n_mask,
                       j_mask & (offs_j * PER_BYTE < K), stride_sn, stride_zn, 0, BITS, GROUP, ONE_GROUP, HAS_ZEROS,
                       ZERO_CONST, DTYPE)
    if PER_BYTE == 1:
        w = w0
    else:
        w1 = _dequant_tile(packed, scales_ptr, zeros_ptr, offs_n, offs_j * PER_BYTE + 1, k0, n_mask,
                           j_mask & (offs_j * PER_BYTE + 1 < K), stride_sn, stride_zn, 1, BITS, GROUP, ONE_GROUP,
                           HAS_ZEROS, ZERO_CONST, DTYPE)
        if PER_BYTE == 2:
            w = tl.interleave(w0, w1)
        else:
            w2 = _dequant_tile(packed, scales_ptr, zeros_ptr, offs_n, offs_j * PER_BYTE + 2, k0, n_mask,
                               j_mask & (offs_j * PER_BYTE + 2 < K), stride_sn, stride_zn, 2, BITS, GROUP,
                               ONE_GROUP, HAS_ZEROS, ZERO_CONST, DTYPE)
            w3 = _dequant_tile(packed, scales_ptr, zeros_ptr, offs_n, offs_j * PER_BYTE + 3, k0, n_mask,
                               j_mask & (offs_j * PER_BYTE + 3 < K), stride_sn, stride_zn, 3, BITS, GROUP,
                               ONE_GROUP, HAS_ZEROS, ZERO_CONST, DTYPE)
            w = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    return w


@triton.jit
def _product(x, w, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """x [BLOCK_M, BLOCK_J] times w [BLOCK_N, BLOCK_J] transposed, in float32."""
    # one return: Triton builds the code after a static-if return too (as dead code), and a
    # tl.dot of a one-row block would not build
    if BLOCK_M == 1:
        product = tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
    elif INTERPRETED:
        product = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        product = tl.dot(x, tl.trans(w), input_precision=PRECISION)
    return product


@triton.jit
def _epilogue(acc, bias_ptr, offs_n, n_mask, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
              DTYPE: tl.constexpr):
    """Bias (float32, added before the one rounding, as cuBLAS's addmm), then the activation
    of the rounded pre-activation; returns DTYPE."""
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION != "none":
        acc = _activation(_round_to(acc, DTYPE).to(tl.float32), ACTIVATION)
    return _round_to(acc, DTYPE)


@triton.jit
def quantized_matmul_kernel(
        x_ptr, codes_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, partial_ptr,
        M, N, K, KP, j_per_split, stride_xm, stride_cn, stride_sn, stride_zn, stride_om,
        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, ZERO_CONST: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, SPLIT_K: tl.constexpr,
        ONE_GROUP: tl.constexpr, PER_BYTE: tl.constexpr, INTERLEAVE: tl.constexpr, EVEN_K: tl.constexpr):
    """Grid (N tiles, SPLIT_K, M tiles). Program (n, s, m): rows m*BLOCK_M.., output
    columns n*BLOCK_N.., packed bytes [s*j_per_split, (s+1)*j_per_split) of each row of W.
    EVEN_K: every tile is whole along K (K = KP * PER_BYTE, KP a multiple of BLOCK_J)."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    j_start = pid_k * j_per_split
    j_end = tl.minimum(j_start + j_per_split, KP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one row: products accumulate elementwise and are summed across K once, after the loop
    # (a tl.sum per tile puts warp shuffles in the loop: 384 of the gemv's 2203 PTX instructions)
    acc_row = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        if EVEN_K:  # no mask along K: the loads of codes (and of x) vectorise
            j_mask = offs_j >= 0
            packed = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_j[None, :], mask=n_mask[:, None],
                             other=0)
        else:
            j_mask = offs_j < j_end
            packed = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_j[None, :],
                             mask=n_mask[:, None] & j_mask[None, :], other=0)
        if INTERLEAVE:
            w = _interleaved_tile(packed, scales_ptr, zeros_ptr, offs_n, offs_j, j0 * PER_BYTE, n_mask, j_mask, K,
                                  stride_sn, stride_zn, BITS, GROUP, ONE_GROUP, HAS_ZEROS, ZERO_CONST, DTYPE, PER_BYTE)
            cols = j0 * PER_BYTE + tl.arange(0, BLOCK_J * PER_BYTE)
            if EVEN_K:
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=m_mask[:, None], other=0.0)
            else:
                k_mask = (cols < K) & (cols < j_end * PER_BYTE)
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc += _product(x, w, BLOCK_M, PRECISION)
        else:
            for s in tl.static_range(PER_BYTE):
                cols = offs_j * PER_BYTE + s
                k_mask = j_mask & (cols < K)
                w = _dequant_tile(packed, scales_ptr, zeros_ptr, offs_n, cols, j0 * PER_BYTE, n_mask, k_mask,
                                  stride_sn, stride_zn, s, BITS, GROUP, ONE_GROUP, HAS_ZEROS, ZERO_CONST, DTYPE,
                                  BLOCK_M == 1)
                if EVEN_K:
                    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=m_mask[:, None],
                                other=0.0)
                else:
                    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                                mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                if BLOCK_M == 1:  # w: the DTYPE values as float32
                    acc_row += x.to(tl.float32) * w
                else:
                    acc += _product(x, w, BLOCK_M, PRECISION)
    if BLOCK_M == 1:
        if not INTERLEAVE:
            acc = tl.sum(acc_row, axis=1)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        y = _epilogue(acc, bias_ptr, offs_n, n_mask, HAS_BIAS, ACTIVATION, DTYPE)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y, mask=mask)
    else:
        tl.store(partial_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def split_k_epilogue_kernel(partial_ptr, bias_ptr, out_ptr, M, N, stride_om, HAS_BIAS: tl.constexpr,
                            ACTIVATION: tl.constexpr, DTYPE: tl.constexpr, SPLIT_K: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """Sum of the SPLIT_K float32 partials of one row, bias, activation, one store."""
    row = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + (s * M + row) * N + offs_n, mask=n_mask, other=0.0)[None, :]
    y = _epilogue(acc, bias_ptr, offs_n, n_mask, HAS_BIAS, ACTIVATION, DTYPE)
    tl.store(out_ptr + row * stride_om + offs_n[None, :], y, mask=n_mask[None, :])


@triton.jit
def dequantize_kernel(codes_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, KP, stride_cn, stride_sn, stride_zn,
                      stride_on, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      ZERO_CONST: tl.constexpr, DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
                      PER_BYTE: tl.constexpr):
    """W [N, K] in DTYPE from its packed form, tile [BLOCK_N, BLOCK_J bytes] per program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    n_mask, j_mask = offs_n < N, offs_j < KP
    packed = tl.load(codes_ptr + offs_n[:, None] * stride_cn + offs_j[None, :],
                     mask=n_mask[:, None] & j_mask[None, :], other=0)
    for s in tl.static_range(PER_BYTE):
        cols = offs_j * PER_BYTE + s
        k_mask = j_mask & (cols < K)
        w = _dequant_tile(packed, scales_ptr, zeros_ptr, offs_n, cols, 0, n_mask, k_mask, stride_sn, stride_zn,
                          s, BITS, GROUP, False, HAS_ZEROS, ZERO_CONST, DTYPE)
        tl.store(out_ptr + offs_n[:, None] * stride_on + cols[None, :], w,
                 mask=n_mask[:, None] & k_mask[None, :])
