"""Hand-usable fused ops, registered as `torch.library` custom ops (namespace
`kitsune`) with fake implementations, autograd and autocast, so they work in
eager mode, under `torch.compile` with any backend, and in `torch.export`.

- `linear_cross_entropy(hidden, weight, bias, target, ...)`: the LM-head loss,
  `F.cross_entropy(F.linear(hidden, weight, bias), target)` computed in chunks
  of rows so the [N, V] logits never exist whole (`kitsune::linear_cross_entropy`).
- `flash_attention(q, k, v, *, bias, mask, mask_fill, scale, causal, dropout_p)`:
  `kitsune.ops.attention.attention` in Triton kernels that never materialise the
  scores, forward and backward (`kitsune::flash_attention`,
  `kitsune::flash_attention_backward`); `attention()` picks it or SDPA by measurement.
"""
from kitsune.ops.flash_attention import flash_attention
from kitsune.ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["flash_attention", "linear_cross_entropy"]
