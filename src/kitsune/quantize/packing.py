"""Round-to-nearest (RTN) weight quantisation and the packed layout the kernels read.

A weight `[out, in]` is cut, row by row, into groups of `group_size` columns
along `in` (the last group of a row may be shorter when `in` is not a
multiple of the group). Each group has one scale and, when asymmetric, one
zero point; every weight becomes an unsigned code `q` of `bits` bits and
stands for

    w = (q - zero) * scale          (symmetric: zero = 2 ** (bits - 1), not stored)

computed in float32 and rounded to the activation dtype. That is the only
formula: `dequantize` here, the PyTorch path and the Triton kernels all use
it, so `QuantizedLinear.dequantize()` is the weight the kernels compute with.

Packing: codes are stored as uint8, `8 // bits` per byte along `in`, the
code of column `k` in byte `k // per_byte` at bit `(k % per_byte) * bits`
(int4: the even column in the low nibble). A row of `in` columns takes
`ceil(in / per_byte)` bytes; the unused codes of its last byte are zero.
Scales and zero points are `[out, ceil(in / group_size)]` float tensors (zero
points hold integers, exactly representable in float16/bfloat16 too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (8, 4, 2)


@dataclass
class QuantizedWeight:
    """A packed weight: `codes` uint8 `[out, ceil(in * bits / 8)]`, `scales` and
    `zeros` (None when symmetric) float `[out, groups]`."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.bits, self.group_size, self.in_features, dtype)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    return group_size


def per_byte(bits: int) -> int:
    return 8 // bits


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[out, in]` float32 as `[out, groups, group_size]`, the last group padded with
    copies of the row's last column (so it changes no minimum, maximum or absmax)."""
    out, k = weight.shape
    groups = num_groups(k, group_size)
    pad = groups * group_size - k
    if pad:
        weight = torch.cat([weight, weight[:, -1:].expand(out, pad)], dim=1)
    return weight.reshape(out, groups, group_size)


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                 scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """RTN-quantise a float `[out, in]` weight; see the module docstring for the layout.

    Symmetric: scale = absmax / (2**(bits-1) - 1), codes in [0, 2**bits) around the
    implicit zero 2**(bits-1). Asymmetric: scale = (max - min) / (2**bits - 1) over
    the group's range widened to hold 0, zero = round(-min / scale). `scale_dtype`
    (default: the weight's dtype, float32 for float64) is the dtype of scales and zeros;
    codes are computed against the scales as stored in it, so rounding them loses nothing."""
    bits, group_size = check_bits(bits), check_group_size(group_size)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-d float tensor [out, in], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    if weight.shape[1] == 0:
        raise ValueError("weight must have at least one input column (in_features > 0)")
    if not torch.isfinite(weight).all():
        raise ValueError("weight holds NaN or infinite values: they cannot be quantised")
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype != torch.float64 else torch.float32
    out, k = weight.shape
    grouped = _grouped(weight.detach().float(), group_size)
    top = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = grouped.abs().amax(-1) / (half - 1)
        zero = None
    else:
        low = grouped.amin(-1).clamp(max=0)
        high = grouped.amax(-1).clamp(min=0)
        scale = (high - low) / top
    # a group of zeros: any positive scale works; 1 keeps the codes at the zero point
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    scale32 = scale.float()
    if not symmetric:
        zero = torch.round(-low / scale32).clamp(0, top).to(scale_dtype)
        offset = zero.float()
    else:
        offset = torch.full_like(scale32, float(2 ** (bits - 1)))
    codes = torch.round(grouped / scale32[..., None] + offset[..., None]).clamp(0, top)
    codes = codes.reshape(out, -1)[:, :k].to(torch.uint8)
    return QuantizedWeight(pack(codes, bits), scale, zero, bits, group_size, k)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes `[out, in]` (each < 2**bits) -> packed uint8 `[out, ceil(in / per_byte)]`."""
    bits = check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-d uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    n = per_byte(bits)
    if n == 1:
        return codes.contiguous()
    out, k = codes.shape
    padded = torch.zeros(out, -(-k // n) * n, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes
    padded = padded.reshape(out, -1, n)
    packed = torch.zeros(padded.shape[:2], dtype=torch.uint8, device=codes.device)
    for i in range(n):
        packed |= padded[..., i] << (i * bits)
    return packed


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 codes `[out, in_features]`."""
    bits = check_bits(bits)
    n = per_byte(bits)
    if n == 1:
        return packed[:, :in_features]
    mask = 2 ** bits - 1
    parts = [(packed >> (i * bits)) & mask for i in range(n)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


def codes_as_float(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The codes as float32 `[out, in_features]`; int8 storage (signed codes, as a
    hand-written `w_int8.float() * scale` holds them) is read as signed."""
    if packed.dtype == torch.int8:
        return packed[:, :in_features].float()
    return unpack(packed, bits, in_features).float()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               in_features: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float weight `[out, in_features]` in `dtype` (default: the scales' dtype):
    `((q - zero) * scale)` in float32, rounded once to `dtype`."""
    q = codes_as_float(codes, bits, in_features)
    cols = torch.arange(in_features, device=codes.device) // group_size
    scale = scales.float()[:, cols]
    if zeros is not None:
        q = q - zeros.float()[:, cols]
    elif codes.dtype != torch.int8:
        q = q - float(2 ** (bits - 1))
    return (q * scale).to(dtype or scales.dtype)
