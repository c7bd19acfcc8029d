"""Tile sizes, warps and pipeline stages for the flash-attention kernels, per padded
head dim. First guesses from FlashAttention-2 and Triton's fused-attention tutorial
(H100, bf16); not yet measured on Kitsune's kernels (benchmarks/bench_attention.py
is the measurement to run before changing them).

- Forward: a query tile of 128 rows amortises the k/v loads; the key tile shrinks
  as the head dim grows, so q (BLOCK_M x D), a k and a v tile (BLOCK_N x D each,
  num_stages deep) and the float32 accumulator fit in registers and shared memory:
  D <= 64: 128 x 64, 4 warps, 3 stages; D = 128: 128 x 32, 8 warps, 2 stages
  (128 x 64 with 8 warps is worth trying); D = 256: 64 x 32, 8 warps, 2 stages.
- Backward: the dk/dv program holds k, v, dk and dv for its key tile (4 x BLOCK_N x D),
  so its tiles are smaller: 64 keys x 32 queries (D <= 128), 32 x 32 at D = 256;
  the dq program mirrors it (64 queries x 32 keys).
- float32 inputs (exact `ieee` dots, twice the bytes) halve the query tile.
- Under Triton's interpreter (the CPU tests) 16 x 16 tiles: the fewest wasted
  lanes on tiny shapes, and tl.dot's minimum on a GPU.

To try others without editing this file (benchmarks/bench_attention.py --sweep does):
KITSUNE_FLASH_FWD="BLOCK_M,BLOCK_N,num_warps,num_stages" and
KITSUNE_FLASH_BWD="kv_m,kv_n,q_m,q_n,num_warps,num_stages" override every head dim
(powers of two, at least 16).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def forward_blocks(block_d: int, dtype: torch.dtype, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel."""
    if interpreted:
        return 16, 16, 1, 1
    override = _override("KITSUNE_FLASH_FWD", 4)
    if override:
        return tuple(override)
    if block_d <= 64:
        block_m, block_n, warps, stages = 128, 64, 4, 3
    elif block_d <= 128:
        block_m, block_n, warps, stages = 128, 32, 8, 2
    else:
        block_m, block_n, warps, stages = 64, 32, 8, 2
    if dtype == torch.float32:
        block_m = max(32, block_m // 2)
    return block_m, block_n, warps, stages


@dataclass(frozen=True)
class BackwardBlocks:
    delta_m: int  # rows per program of the delta preprocess
    kv_m: int  # query rows per step of the dk/dv program
    kv_n: int  # keys per dk/dv program
    q_m: int  # query rows per dq program
    q_n: int  # keys per step of the dq program
    warps: int
    stages: int


def backward_blocks(block_d: int, dtype: torch.dtype, interpreted: bool) -> BackwardBlocks:
    if interpreted:
        return BackwardBlocks(16, 16, 16, 16, 16, 1, 1)
    override = _override("KITSUNE_FLASH_BWD", 6)
    if override:
        return BackwardBlocks(64, *override)
    if block_d <= 128:
        blocks = BackwardBlocks(64, 32, 64, 64, 32, 4 if block_d <= 64 else 8, 2)
    else:
        blocks = BackwardBlocks(64, 32, 32, 32, 32, 8, 1)
    if dtype == torch.float32:
        blocks = BackwardBlocks(64, 32, 32, 32, 32, blocks.warps, 1)
    return blocks


def _override(name: str, count: int) -> list[int] | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or any(v < 1 for v in values):
        raise ValueError(f"{name} must be {count} positive integers separated by commas, got {text!r}")
    return values
