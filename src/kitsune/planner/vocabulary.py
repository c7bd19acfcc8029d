"""The names of user operations: what a `FusionPattern` may say and what a `Unit` is called.

A user operation is named as the user wrote it (``linear``, ``gelu``,
``layer_norm``), not by the aten primitives it decomposes into. The sets below
group those names by what the operation does; `kitsune.planner.units` uses
them to give each unit its `OpCategory`, `kitsune.planner.patterns` to
validate a pattern's op names. `ALIASES` maps other spellings to the canonical
name (``mm``/``bmm`` are ``matmul``, ``addmm`` is ``linear``, ...); the
wildcards ``activation`` (any activation function) and ``elementwise`` /
``pointwise`` (any pointwise operation) match a category, not a name.
"""
from __future__ import annotations

ACTIVATIONS = frozenset({
    "relu", "relu6", "gelu", "silu", "swish", "sigmoid", "tanh", "leaky_relu", "elu", "selu", "celu",
    "hardtanh", "hardswish", "hardsigmoid", "softplus", "mish", "prelu", "rrelu", "glu", "logsigmoid",
    "softsign", "tanhshrink", "threshold",
})
BINARY_OPS = frozenset({"add", "sub", "rsub", "mul", "div", "maximum", "minimum", "pow", "floor_divide",
                        "remainder", "fmod", "atan2", "hypot"})
MATMUL_OPS = frozenset({"matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "linear", "dot", "mv", "addmv",
                        "einsum", "bilinear", "_int_mm", "_weight_int8pack_mm", "_weight_int4pack_mm"})
CONV_OPS = frozenset({"conv", "conv1d", "conv2d", "conv3d", "convolution", "_convolution",
                      "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})
NORM_OPS = frozenset({"layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm", "local_response_norm",
                      "native_layer_norm", "native_batch_norm", "native_group_norm",
                      "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                      "_native_batch_norm_legit_functional", "_fused_rms_norm"})
SOFTMAX_OPS = frozenset({"softmax", "log_softmax", "_softmax", "_log_softmax", "_safe_softmax", "softmin"})
LOSS_OPS = frozenset({"cross_entropy", "nll_loss", "nll_loss_forward", "nll_loss2d_forward", "mse_loss",
                      "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
                      "binary_cross_entropy_with_logits", "kl_div"})
REDUCTION_OPS = frozenset({"sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean",
                           "prod", "any", "all", "argmax", "argmin", "logsumexp", "norm", "cumsum", "cumprod"})
ATTENTION_OPS = frozenset({"scaled_dot_product_attention", "multi_head_attention_forward",
                           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                           "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                           "multihead_attention", "attention"})
QUANT_OPS = frozenset({"dequantize", "quantize", "quantize_per_tensor", "quantize_per_channel",
                       "dequantize_per_tensor", "dequantize_per_channel", "fake_quantize_per_tensor_affine",
                       "fake_quantize_per_channel_affine"})
VIEW_OPS = frozenset({"view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze", "slice",
                      "select", "flatten", "unflatten", "contiguous", "alias", "getitem", "narrow", "split",
                      "chunk", "_unsafe_view", "view_as", "expand_as", "broadcast_in_dim", "detach"})
MISC_OPS = frozenset({"dropout", "native_dropout", "embedding", "cat", "stack", "gather", "scatter", "index",
                      "index_select", "to", "type_as", "float", "half", "bfloat16", "int", "cast",
                      "convert_element_type", "clone", "copy", "neg", "scale", "bias", "mask", "masked_fill",
                      "where", "clamp", "bernoulli", "rand", "rand_like", "full", "ones", "zeros"})
WILDCARDS = frozenset({"activation", "elementwise", "pointwise"})

# Names that mean the same operation (pattern op -> canonical unit name).
ALIASES = {
    "mm": "matmul", "bmm": "matmul", "dot": "matmul", "mv": "matmul", "einsum": "matmul",
    "addmm": "linear", "truediv": "div", "floordiv": "floor_divide", "swish": "silu",
    "batchnorm": "batch_norm", "layernorm": "layer_norm", "groupnorm": "group_norm", "rmsnorm": "rms_norm",
    "sdpa": "scaled_dot_product_attention", "convolution": "conv", "native_dropout": "dropout",
    "crossentropy": "cross_entropy", "nll_loss_forward": "nll_loss", "_softmax": "softmax",
    "_log_softmax": "log_softmax", "_safe_softmax": "softmax", "native_layer_norm": "layer_norm",
}


def _pointwise_table_names() -> frozenset:
    try:
        from kitsune.ir.ops import POINTWISE_OPS, op_name
    except Exception:  # noqa: BLE001 - the op table is optional for validation
        return frozenset()
    return frozenset(op_name(op).split(".")[0] for op in POINTWISE_OPS)


def known_ops() -> frozenset:
    """Every op name a FusionPattern may use."""
    return (ACTIVATIONS | BINARY_OPS | MATMUL_OPS | CONV_OPS | NORM_OPS | SOFTMAX_OPS | LOSS_OPS | REDUCTION_OPS
            | ATTENTION_OPS | QUANT_OPS | VIEW_OPS | MISC_OPS | WILDCARDS | frozenset(ALIASES)
            | _pointwise_table_names())


def canonical_op(name: str) -> str:
    """The canonical spelling of a pattern op name (aliases resolved)."""
    name = name.strip().lower()
    return ALIASES.get(name, name)
