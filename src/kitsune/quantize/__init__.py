"""Weight-only quantization: `kitsune.quantize(model, bits=4, group_size=128, skip=("lm_head",))`
swaps a model's `nn.Linear`s for `kitsune.nn.QuantizedLinear` (RTN, per-group scales).

The pieces: `packing` (RTN, pack/unpack, dequantize), `kernels` (Triton), `dispatch`
(which kernel runs), `ops` (the `kitsune::quantized_linear` custom op). See docs/quantize.md.

This module is imported by `import kitsune` (its name is the function's): it imports
nothing heavy at import time.
"""
from __future__ import annotations

import logging

log = logging.getLogger("kitsune")

__all__ = ["quantize", "skipped"]


def skipped(name: str, skip) -> bool:
    """Is the module of qualified name `name` (e.g. "model.layers.0.mlp.up_proj") in `skip`?
    An entry matches the whole qualified name, or a suffix of whole components:
    "lm_head" matches "lm_head" and "model.lm_head", "mlp.down_proj" matches
    "layers.3.mlp.down_proj", neither matches "my_lm_head"."""
    parts = name.split(".")
    for entry in skip:
        wanted = entry.split(".")
        if parts[-len(wanted):] == wanted:
            return True
    return False


def quantize(model, bits: int = 4, group_size: int = 128, skip=("lm_head",), symmetric: bool | None = None):
    """Replace, in place, every `nn.Linear` of `model` (not a subclass of it) whose qualified
    name is not `skipped` by `QuantizedLinear.from_linear(linear, bits, group_size, symmetric)`;
    returns `model`. A Linear reached under several names (shared) becomes one QuantizedLinear,
    unless one of its names is skipped (then it stays). A bare `nn.Linear` cannot replace itself
    in place: TypeError (use `QuantizedLinear.from_linear`)."""
    import torch
    from torch import nn

    from kitsune.nn.quantized import QuantizedLinear
    from kitsune.quantize.packing import check_bits, check_group_size
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize: model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise TypeError("quantize: model is a bare nn.Linear; use QuantizedLinear.from_linear(model, ...)")
    check_bits(bits), check_group_size(group_size)
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"quantize: skip must be a tuple of qualified module names, got {skip!r}")
    places = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
              if type(module) is nn.Linear]
    kept = {id(module) for name, module in places if skipped(name, skip)}
    made: dict = {}
    with torch.no_grad():
        for name, linear in places:
            if id(linear) in kept:
                continue
            if id(linear) not in made:
                made[id(linear)] = QuantizedLinear.from_linear(linear, bits, group_size, symmetric)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, made[id(linear)])
    log.info("kitsune.quantize: %d linear layer(s) quantized to int%d (group %d)", len(made), bits, group_size)
    return model
