"""Fusion patterns: the named shapes of work that fuse well, built-in and user-defined.

A `FusionPattern` names a sequence of *user operations* as they appear in a
model (``linear``, ``relu``, ``layer_norm``, ``softmax``, ``add``, ...), not the
aten primitives they decompose into. The detector (`kitsune.fusion.detector`)
recognises each operation of a captured graph by where it came from
(``source_fn_stack`` in Dynamo graphs, the autograd op in backward graphs, the
aten op otherwise), so one pattern matches whatever decomposition reached the
compiler.

Built-in patterns (`BUILTIN_PATTERNS`) have hand-written matchers; a user's
pattern matches a chain of operations in order, each consuming the previous
one's result. An op name ending in ``?`` is optional (``"dropout?"``: dropout is
absent from inference graphs because it is the identity there).

Pattern op names (`KNOWN_OPS`) are the canonical names below, their aliases
(``mm``/``bmm`` are ``matmul``, ``addmm`` is ``linear``, ``truediv`` is
``div``, ...), the wildcards ``activation`` (any activation function) and
``elementwise`` (any pointwise operation), and the base name of every aten op
Kitsune's op table knows (``erf``, ``where``, ...).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

FUSION_TYPES = ("elementwise", "reduction", "matmul", "conv", "attention", "quantized", "custom")

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


_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-.]*$")


@dataclass(frozen=True)
class FusionPattern:
    """A named sequence of operations that should run as one kernel.

    name:         unique identifier (letters, digits, ``_``, ``-``, ``.``).
    ops:          the user operations in dataflow order, each consuming the
                  previous one's result; at least one required op. A trailing
                  ``?`` makes an op optional.
    fusion_type:  one of `FUSION_TYPES`; describes the kernel kind, used in
                  reports and to tell the user which generator would serve it.
    replacement:  optional callable run instead of the matched ops, with their tensor
                  inputs in the order the ops first read them; it must return one
                  tensor of the ops' result shape and dtype (else, or if it raises,
                  the original ops run, logged). KITSUNE_DEBUG=1 checks every call
                  against the original ops. The match must have one result used
                  outside it. Without a replacement, the pattern steers grouping.
    description:  free text for reports.

    Invalid patterns raise at construction: an empty ``ops`` or an unknown op
    name is a ``ValueError`` naming ``ops``; wrong types are ``TypeError``.
    """

    name: str
    ops: tuple = ()
    fusion_type: str = "elementwise"
    replacement: Callable | None = None
    description: str = ""
    builtin: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"FusionPattern.name must be a non-empty str, got {self.name!r}")
        if not _NAME_RE.match(self.name):
            raise ValueError(f"FusionPattern.name {self.name!r} may only hold letters, digits, '_', '-' and '.'")
        ops = self.ops
        if isinstance(ops, str) or not hasattr(ops, "__iter__"):
            raise TypeError(f"FusionPattern.ops must be a list of op names, got {type(ops).__name__} {ops!r}")
        ops = tuple(ops)
        if not ops:
            raise ValueError(f"FusionPattern.ops of {self.name!r} is empty: a pattern needs at least one op")
        known = known_ops()
        for i, op in enumerate(ops):
            if not isinstance(op, str):
                raise TypeError(f"FusionPattern.ops[{i}] must be a str, got {type(op).__name__} {op!r}")
            base = op[:-1] if op.endswith("?") else op
            if base.strip().lower() not in known:
                close = sorted(k for k in known if k.startswith(base[:3].lower()))[:6]
                hint = f" (did you mean one of {close}?)" if close else ""
                raise ValueError(f"FusionPattern.ops[{i}] of {self.name!r}: unknown op {op!r}{hint}")
        if all(op.endswith("?") for op in ops):
            raise ValueError(f"FusionPattern.ops of {self.name!r} are all optional: at least one op must be required")
        object.__setattr__(self, "ops", ops)
        if self.fusion_type not in FUSION_TYPES:
            raise ValueError(f"FusionPattern.fusion_type must be one of {FUSION_TYPES}, got {self.fusion_type!r}")
        if self.replacement is not None and not callable(self.replacement):
            raise TypeError(f"FusionPattern.replacement must be callable, got {type(self.replacement).__name__}")
        if not isinstance(self.description, str):
            raise TypeError("FusionPattern.description must be a str")

    def steps(self) -> list[tuple[str, bool]]:
        """[(canonical op name, optional)] in order."""
        return [(canonical_op(op[:-1]), True) if op.endswith("?") else (canonical_op(op), False) for op in self.ops]


def _builtin(name, ops, fusion_type, description):
    return FusionPattern(name=name, ops=ops, fusion_type=fusion_type, description=description, builtin=True)


BUILTIN_PATTERNS: dict[str, FusionPattern] = {p.name: p for p in [
    _builtin("elementwise_chain", ["elementwise", "elementwise"], "elementwise",
             "connected pointwise operations (arithmetic, activations, casts, broadcasts) as one kernel"),
    _builtin("binary_activation", ["add", "activation"], "elementwise",
             "tensor-tensor add/sub/mul/div followed by an activation"),
    _builtin("scalar_activation", ["mul", "activation"], "elementwise",
             "tensor-scalar arithmetic followed by an activation"),
    _builtin("norm_activation", ["layer_norm", "activation"], "reduction",
             "layer/group/RMS/batch norm followed by an activation"),
    _builtin("softmax", ["elementwise?", "softmax", "elementwise?"], "reduction",
             "softmax or log_softmax with its pointwise prologue (scale, mask) and epilogue"),
    _builtin("softmax_cross_entropy", ["log_softmax", "nll_loss"], "reduction",
             "log_softmax (or softmax + log) feeding nll_loss: cross entropy without the probabilities in memory"),
    _builtin("linear_activation", ["linear", "add?", "activation"], "matmul",
             "matmul + bias + activation: the activation as the matmul's epilogue"),
    _builtin("conv_bn_activation", ["conv", "batch_norm?", "activation?"], "conv",
             "convolution + batch norm (folded) + activation"),
    _builtin("attention", ["matmul", "elementwise?", "softmax", "matmul"], "attention",
             "matmul -> scale -> optional mask -> softmax -> matmul (or scaled_dot_product_attention)"),
    _builtin("matrix_chain", ["matmul", "matmul"], "matmul",
             "a matmul whose result feeds another matmul"),
    _builtin("quantized_matmul", ["dequantize", "matmul"], "quantized",
             "matmul with a weight dequantized from an integer tensor (cast, scale, zero point)"),
    _builtin("quantized_matmul_activation", ["dequantize", "matmul", "activation"], "quantized",
             "quantized matmul + optional bias + activation"),
]}

BUILTIN_NAMES = frozenset(BUILTIN_PATTERNS)
