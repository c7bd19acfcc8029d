"""Hand-usable fused ops, registered as `torch.library` custom ops (namespace
`kitsune`) with fake implementations and autograd, so they work in eager mode,
under `torch.compile` with any backend, and in `torch.export`.

- `linear_cross_entropy(hidden, weight, bias, target, ...)`: the LM-head loss,
  `F.cross_entropy(F.linear(hidden, weight, bias), target)` computed in chunks
  of rows so the [N, V] logits never exist whole (`kitsune::linear_cross_entropy`).
- `flash_attention(q, k, v, *, bias, mask, mask_fill, scale, causal, dropout_p)`:
  `kitsune.ops.attention.attention` in Triton kernels that never materialise the
  scores, forward and backward (`kitsune::flash_attention`,
  `kitsune::flash_attention_backward`); `attention()` picks it or SDPA by measurement.
- `fused_linear(x, weight, bias=None, activation=None)`, `layer_norm(...)`,
  `rms_norm(...)`, `softmax_cross_entropy(...)` (`kitsune::fused_linear`,
  `kitsune::layer_norm`, `kitsune::rms_norm`, `kitsune::softmax_cross_entropy`) and
  `fused(inputs, ["matmul", "add", "relu"])` (`kitsune::fused_chain`): each op's
  semantics is a reference function of PyTorch ops, run through Kitsune's generated
  kernels, compiled once per structure and cached (kitsune.ops.generated),
  forward and backward.
"""
from kitsune.ops.chain import fused
from kitsune.ops.flash_attention import flash_attention
from kitsune.ops.fused_ops import fused_linear, layer_norm, rms_norm, softmax_cross_entropy
from kitsune.ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["flash_attention", "fused", "fused_linear", "layer_norm", "linear_cross_entropy", "rms_norm",
           "softmax_cross_entropy"]
