"""Matrix products whose output rows are misaligned for cuBLAS.

cuBLAS picks its fast (Hopper) kernels only when every leading dimension is a
multiple of 16 bytes. A language model's output layer has an odd vocabulary
(GPT-2: 50257, BERT: 30522), so eager's logits matmul falls back to a kernel
several times slower. `aligned_mm`/`aligned_addmm` copy the weight into a
matrix whose width is padded to 16 bytes (so the product's rows are too),
multiply, and return the product with eager's (contiguous) layout: a copy
of the weight and one of the output buy the fast kernel (GPT-2's logits on
an H100: 3.3 ms in eager's kernel; cuBLAS's Hopper kernel takes 0.45 ms).

A product that is an output of an inference graph returns the padded view
instead (`aligned_mm_view`), and the graph's caller copies it into eager's
strides once (`restride`): a graph replayed as a CUDA graph copies its outputs
out of the recording anyway, so the two copies of the logits become one.
"""
from __future__ import annotations

import torch
from torch import fx

from kitsune.sizes import as_size, hint, is_symbolic, numel_of

aten = torch.ops.aten

# Below this many output elements the copy costs more than the slow kernel.
MIN_OUTPUT = 1 << 22


def _padded(t: torch.Tensor) -> torch.Tensor:
    """t (last dim n) copied into a buffer whose last dim is padded to 16 bytes;
    the padding is left unset (it only reaches output columns that are dropped).
    A transposed row-major matrix (a Linear's `weight.t()`) keeps its layout:
    its rows are padded, so the copy reads and writes contiguous rows (on an
    H100 the transposing copy of GPT-2's 50257x768 weight took 0.41 ms, eight
    times the contiguous one)."""
    n = t.shape[-1]
    step = 16 // t.element_size()
    width = -(-n // step) * step
    if t.dim() == 2 and t.shape[0] > 1 and t.stride() == (1, t.shape[0]):
        rows = t.new_empty((width, t.shape[0]))
        rows[:n].copy_(t.t())
        return rows.t()
    buf = t.new_empty((*t.shape[:-1], width))
    buf[..., :n].copy_(t)
    return buf


def aligned_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = b.shape[1]
    return torch.mm(a, _padded(b))[:, :n].contiguous()


def aligned_addmm(bias, a, b, *, beta=1, alpha=1):
    n = b.shape[1]
    if bias.dim() != 1 or bias.shape[0] != n:
        return torch.addmm(bias, a, b, beta=beta, alpha=alpha)
    return torch.addmm(_padded(bias), a, _padded(b), beta=beta, alpha=alpha)[:, :n].contiguous()


def aligned_mm_view(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = b.shape[1]
    return torch.mm(a, _padded(b))[:, :n]


def aligned_addmm_view(bias, a, b, *, beta=1, alpha=1):
    n = b.shape[1]
    if bias.dim() != 1 or bias.shape[0] != n:
        return torch.addmm(bias, a, b, beta=beta, alpha=alpha)
    return torch.addmm(_padded(bias), a, _padded(b), beta=beta, alpha=alpha)[:, :n]


_REPLACEMENT = {aten.mm.default: aligned_mm, aten.addmm.default: aligned_addmm}
_VIEW_REPLACEMENT = {aten.mm.default: aligned_mm_view, aten.addmm.default: aligned_addmm_view}


def restride(outputs, strides: dict):
    """`outputs` (a graph's tuple or list) with the tensor at each position of
    `strides` given those strides (copied where it has others)."""
    out = list(outputs)
    for position, stride in strides.items():
        t = out[position]
        if isinstance(t, torch.Tensor) and t.stride() != stride:
            out[position] = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)
    return type(outputs)(out) if isinstance(outputs, tuple) else out


def restrided(fn, strides: dict):
    """fn, whose outputs at the positions of `strides` are given those strides."""
    def run(*args):
        return restride(fn(*args), strides)
    return run


def align_matmuls(gm: fx.GraphModule, padded_outputs: bool = False) -> int:
    """Point large CUDA mm/addmm nodes with misaligned output rows at the
    aligned versions; returns how many were changed. `padded_outputs`: a
    product read only as a graph output returns the padded view, and
    `gm.meta["kitsune_restride"]` ({output position: eager's strides}) tells the
    caller which outputs to copy into eager's strides."""
    changed = 0
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    strides = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _REPLACEMENT:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.device.type != "cuda" or val.dim() != 2:
            continue
        # the width decides the alignment and must be static; the rows may be a
        # symbolic size (dynamic shapes: the number of tokens), judged at its hint
        width = as_size(val.shape[1])
        if is_symbolic(width) or hint(numel_of(val)) < MIN_OUTPUT:
            continue
        if (width * val.element_size()) % 16 == 0:
            continue
        if padded_outputs and set(node.users) == {output}:
            strides.update({i: val.stride() for i, item in enumerate(flat) if item is node})
            node.target = _VIEW_REPLACEMENT[node.target]
        else:
            node.target = _REPLACEMENT[node.target]
        changed += 1
    if strides:
        gm.meta["kitsune_restride"] = strides
    if changed:
        gm.recompile()
    return changed
