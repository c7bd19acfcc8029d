"""Matrix products whose output rows are misaligned for cuBLAS.

cuBLAS picks its fast (Hopper) kernels only when every leading dimension is a
multiple of 16 bytes. A language model's output layer has an odd vocabulary
(GPT-2: 50257, BERT: 30522), so eager's logits matmul falls back to a kernel
several times slower. `aligned_mm`/`aligned_addmm` write the product into a
buffer whose rows are padded to 16 bytes and return it with eager's
(contiguous) layout: one extra copy of the output buys the fast kernel.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

# Below this many output elements the copy costs more than the slow kernel.
MIN_OUTPUT = 1 << 22


def _padded_out(a: torch.Tensor, n: int) -> torch.Tensor:
    step = 16 // a.element_size()
    buf = a.new_empty((a.shape[0], -(-n // step) * step))
    return buf[:, :n]


def aligned_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = _padded_out(a, b.shape[1])
    torch.mm(a, b, out=out)
    return out.contiguous()


def aligned_addmm(bias, a, b, *, beta=1, alpha=1):
    out = _padded_out(a, b.shape[1])
    torch.addmm(bias, a, b, beta=beta, alpha=alpha, out=out)
    return out.contiguous()


_REPLACEMENT = {aten.mm.default: aligned_mm, aten.addmm.default: aligned_addmm}


def align_matmuls(gm: fx.GraphModule) -> int:
    """Point large CUDA mm/addmm nodes with misaligned output rows at the
    aligned versions; returns how many were changed."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _REPLACEMENT:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.device.type != "cuda" or val.dim() != 2:
            continue
        if not all(isinstance(s, int) for s in val.shape) or val.numel() < MIN_OUTPUT:
            continue
        if (val.shape[1] * val.element_size()) % 16 == 0:
            continue
        node.target = _REPLACEMENT[node.target]
        changed += 1
    if changed:
        gm.recompile()
    return changed
