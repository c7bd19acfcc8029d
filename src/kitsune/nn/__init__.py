"""Fused layers by hand (`kitsune.nn`): drop-in `nn.Module`s with the parameters,
state-dict keys and results of their unfused PyTorch equivalents, whose forward
(and backward) runs Kitsune's `torch.library` custom ops (`kitsune.ops`), so they
work in eager mode, under `torch.compile` with any backend, and in `torch.export`.

- `FusedLinear(in_features, out_features, bias=True, activation=None)`: act(linear(x))
- `FusedConvBN(conv, bn, activation=None)`: conv → batch norm → act; folded in eval()
- `FusedLayerNorm(...)`, `FusedRMSNorm(...)`: nn.LayerNorm / nn.RMSNorm + `activation=None`
- `FusedAttention(embed_dim, num_heads, num_kv_heads=None, causal=False, bias=True, dropout=0.0)`
- `FusedSoftmaxCrossEntropy(...)`: nn.CrossEntropyLoss
- `FusedLinearCrossEntropy(in_features, out_features, bias=False, ...)`: the LM-head loss
- `FusedElementwise()`: a builder of pointwise chains, `.add(1.0).mul(2.0).relu()`

See docs/layers.md.
"""
from kitsune.nn.attention import FusedAttention
from kitsune.nn.conv import FusedConvBN
from kitsune.nn.elementwise import FusedElementwise
from kitsune.nn.linear import FusedLinear
from kitsune.nn.loss import FusedLinearCrossEntropy, FusedSoftmaxCrossEntropy
from kitsune.nn.norm import FusedLayerNorm, FusedRMSNorm

__all__ = ["FusedAttention", "FusedConvBN", "FusedElementwise", "FusedLayerNorm", "FusedLinear",
           "FusedLinearCrossEntropy", "FusedRMSNorm", "FusedSoftmaxCrossEntropy"]


def __getattr__(name):
    # QuantizedLinear lives in kitsune.nn.quantized (kitsune.quantize's layer), where present
    if name == "QuantizedLinear":
        try:
            from kitsune.nn.quantized import QuantizedLinear
        except ImportError as error:
            raise AttributeError("kitsune.nn.QuantizedLinear is not available: kitsune.nn.quantized "
                                 f"cannot be imported ({error})") from None
        return QuantizedLinear
    raise AttributeError(f"module 'kitsune.nn' has no attribute {name!r}")
