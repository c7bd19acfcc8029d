"""Hand-usable fused ops, registered as `torch.library` custom ops (namespace
`kitsune`) with fake implementations, autograd and autocast, so they work in
eager mode, under `torch.compile` with any backend, and in `torch.export`.

- `linear_cross_entropy(hidden, weight, bias, target, ...)`: the LM-head loss,
  `F.cross_entropy(F.linear(hidden, weight, bias), target)` computed in chunks
  of rows so the [N, V] logits never exist whole (`kitsune::linear_cross_entropy`).
"""
from kitsune.ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
