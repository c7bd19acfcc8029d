"""Fused operations as `torch.library` custom ops (namespace `kitsune`):

- `kitsune::fused_linear(x, weight, bias, activation)`: `act(F.linear(x, weight, bias))`, and
  `kitsune::fused_linear_preactivation` (the same and the pre-activation, kept for the backward)
- `kitsune::layer_norm(x, normalized_shape, weight, bias, eps, activation)`: `act(F.layer_norm(...))`
- `kitsune::rms_norm(x, normalized_shape, weight, eps, activation)`: `act(F.rms_norm(...))`
- `kitsune::softmax_cross_entropy(logits, target, weight, ignore_index, label_smoothing, reduction)`:
  `F.cross_entropy(...)` with class-index targets
- `kitsune::fused_chain(inputs, program)`: a chain of operations from the op
  list (`kitsune.ops.chain`), what `kitsune.nn.FusedElementwise` and `kitsune.ops.fused` run

Each op's semantics is its *reference function* below, written with PyTorch ops and
nothing else: the real implementation runs it through Kitsune's generated kernels
(`kitsune.ops.generated`: traced, compiled by the compiler, cached by structure), the
fake implementation runs it on fake tensors, and the backward is the reference's
vector-Jacobian product, generated the same way. Under tracing (torch.compile's
AOTAutograd, torch.export, opcheck) the backward traces as PyTorch ops.

Inside an op autocast is off: the op computes in its inputs' dtypes (cast before
calling it, as the `kitsune.nn` layers do under autocast).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kitsune.ops.chain import parse_program, run_program
from kitsune.ops.generated import run_generated, run_generated_vjp

# name -> function of the pre-activation (the layers' `activation=` argument)
ACTIVATIONS = {
    "none": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}
REDUCTIONS = ("mean", "sum", "none")


def activation_name(activation, where: str = "activation") -> str:
    """The op's name for a layer's `activation` argument (None is "none"); ValueError otherwise."""
    if activation is None:
        return "none"
    if not isinstance(activation, str) or activation.lower() not in ACTIVATIONS:
        raise ValueError(f"{where} must be None or one of {sorted(a for a in ACTIVATIONS if a != 'none')}, "
                         f"got {activation!r}")
    return activation.lower()


# -- reference functions: each op's semantics, once -------------------------------------------

def linear_reference(x, weight, bias, activation):
    return ACTIVATIONS[activation](F.linear(x, weight, bias))


def linear_preactivation_reference(x, weight, bias, activation):
    """(act(z), z) with z = F.linear(x, weight, bias): the backward reads z, not a recomputed one."""
    z = F.linear(x, weight, bias)
    return ACTIVATIONS[activation](z), z


def linear_backward_reference(grad, z, x, weight, activation, wanted):
    """The gradients of linear_preactivation_reference's first output for x, weight and
    bias (those in `wanted`, 0/1/2), from the saved pre-activation z."""
    _, pullback = torch.func.vjp(ACTIVATIONS[activation], z)
    grad_z = pullback(grad)[0]
    rows = grad_z.reshape(-1, grad_z.shape[-1])
    found = []
    if 0 in wanted:
        found.append(grad_z @ weight)
    if 1 in wanted:
        found.append(rows.t() @ x.reshape(-1, x.shape[-1]))
    if 2 in wanted:
        found.append(rows.sum(0))
    return tuple(found)


def layer_norm_reference(x, weight, bias, normalized_shape, eps, activation):
    return ACTIVATIONS[activation](F.layer_norm(x, normalized_shape, weight, bias, eps))


def rms_norm_reference(x, weight, normalized_shape, eps, activation):
    return ACTIVATIONS[activation](F.rms_norm(x, normalized_shape, weight, eps))


def cross_entropy_reference(logits, target, weight, ignore_index, label_smoothing, reduction):
    return F.cross_entropy(logits, target, weight, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)


def chain_reference(*args):
    """args: the chain's input tensors, then its parsed program (steps)."""
    *inputs, steps = args
    return run_program(steps, list(inputs))


# -- plumbing shared by the ops -------------------------------------------------------------------

def _unaliased(out: torch.Tensor, tensors) -> torch.Tensor:
    """A custom op's output never aliases an input (an identity chain would)."""
    for t in tensors:
        if t is not None and t.numel() and out.numel() and \
                t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            return out.clone()
    return out


def _forward(name, reference, tensors, constants, device_type, outputs: int = 1):
    with torch.autocast(device_type, enabled=False):
        results = run_generated(name, reference, tensors, constants)
    if outputs == 1:
        return _unaliased(results[0], tensors)
    return tuple(_unaliased(out, tensors) for out in results)


def _gradients(ctx, name, reference, grad, wanted):
    """Gradients for the saved tensors at positions `wanted` (the rest None)."""
    tensors = list(ctx.saved_tensors)
    wanted = tuple(i for i in wanted if tensors[i] is not None and tensors[i].is_floating_point())
    if not wanted:
        return [None] * len(tensors)
    with torch.autocast(grad.device.type, enabled=False):
        return run_generated_vjp(name, reference, [grad], tensors, ctx.constants, wanted, [grad])


def _needed(ctx, positions: dict) -> tuple:
    """positions: saved-tensor index -> op argument index; those whose gradient is needed."""
    return tuple(i for i, arg in positions.items() if ctx.needs_input_grad[arg])


# -- kitsune::fused_linear ------------------------------------------------------------------------

@torch.library.custom_op("kitsune::fused_linear", mutates_args=())
def fused_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    activation: str) -> torch.Tensor:
    """`act(F.linear(x, weight, bias))` with act one of ACTIVATIONS."""
    _check_activation(activation)
    return _forward("fused_linear", linear_reference, [x, weight, bias], (activation,), x.device.type)


@fused_linear_op.register_fake
def _(x, weight, bias, activation):
    _check_activation(activation)
    return linear_reference(x, weight, bias, activation)


def _linear_setup(ctx, inputs, output):
    x, weight, bias, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.constants = (activation,)


def _linear_backward(ctx, grad):
    grads = _gradients(ctx, "fused_linear", linear_reference, grad, _needed(ctx, {0: 0, 1: 1, 2: 2}))
    return (*grads, None)


fused_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("kitsune::fused_linear_preactivation", mutates_args=())
def fused_linear_preactivation_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                  activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(z), z) with z = F.linear(x, weight, bias), for training: the backward reads the
    saved z (as eager's activation saves its input) instead of recomputing the matmul.
    `activation` must not be "none" (z would be the output)."""
    _check_activation(activation, preactivation=True)
    return _forward("fused_linear_preactivation", linear_preactivation_reference, [x, weight, bias],
                    (activation,), x.device.type, outputs=2)


@fused_linear_preactivation_op.register_fake
def _(x, weight, bias, activation):
    _check_activation(activation, preactivation=True)
    return linear_preactivation_reference(x, weight, bias, activation)


def _preactivation_setup(ctx, inputs, output):
    x, weight, bias, activation = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.activation, ctx.has_bias = activation, bias is not None
    ctx.mark_non_differentiable(output[1])


def _preactivation_backward(ctx, grad, _):
    x, weight, z = ctx.saved_tensors
    wanted = tuple(i for i in range(3) if ctx.needs_input_grad[i] and (i < 2 or ctx.has_bias))
    if not wanted:
        return None, None, None, None
    with torch.autocast(grad.device.type, enabled=False):
        found = iter(run_generated("fused_linear_preactivation.backward", linear_backward_reference,
                                   [grad, z, x, weight], (ctx.activation, wanted)))
    return (*(next(found) if i in wanted else None for i in range(3)), None)


fused_linear_preactivation_op.register_autograd(_preactivation_backward, setup_context=_preactivation_setup)


def _check_activation(activation: str, preactivation: bool = False) -> None:
    if activation not in ACTIVATIONS or (preactivation and activation == "none"):
        known = sorted(a for a in ACTIVATIONS if not preactivation or a != "none")
        raise ValueError(f"kitsune ops: activation must be one of {known}, got {activation!r}")


def linear(x, weight, bias, activation: str) -> torch.Tensor:
    """The op for act(F.linear(x, weight, bias)) (activation already an ACTIVATIONS name):
    where gradients are wanted and there is an activation, the one that keeps the
    pre-activation for the backward."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if activation != "none" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return fused_linear_preactivation_op(x, weight, bias, activation)[0]
    return fused_linear_op(x, weight, bias, activation)


# -- kitsune::layer_norm ------------------------------------------------------------------------

@torch.library.custom_op("kitsune::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None,
                  bias: torch.Tensor | None, eps: float, activation: str) -> torch.Tensor:
    """`act(F.layer_norm(x, normalized_shape, weight, bias, eps))`."""
    _check_activation(activation)
    return _forward("layer_norm", layer_norm_reference, [x, weight, bias],
                    (tuple(normalized_shape), eps, activation), x.device.type)


@layer_norm_op.register_fake
def _(x, normalized_shape, weight, bias, eps, activation):
    _check_activation(activation)
    return layer_norm_reference(x, weight, bias, normalized_shape, eps, activation)


def _layer_norm_setup(ctx, inputs, output):
    x, normalized_shape, weight, bias, eps, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.constants = (tuple(normalized_shape), eps, activation)


def _layer_norm_backward(ctx, grad):
    dx, dw, db = _gradients(ctx, "layer_norm", layer_norm_reference, grad, _needed(ctx, {0: 0, 1: 2, 2: 3}))
    return dx, None, dw, db, None, None


layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# -- kitsune::rms_norm ------------------------------------------------------------------------

@torch.library.custom_op("kitsune::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None,
                eps: float | None, activation: str) -> torch.Tensor:
    """`act(F.rms_norm(x, normalized_shape, weight, eps))`."""
    _check_activation(activation)
    return _forward("rms_norm", rms_norm_reference, [x, weight], (tuple(normalized_shape), eps, activation),
                    x.device.type)


@rms_norm_op.register_fake
def _(x, normalized_shape, weight, eps, activation):
    _check_activation(activation)
    return rms_norm_reference(x, weight, normalized_shape, eps, activation)


def _rms_norm_setup(ctx, inputs, output):
    x, normalized_shape, weight, eps, activation = inputs
    ctx.save_for_backward(x, weight)
    ctx.constants = (tuple(normalized_shape), eps, activation)


def _rms_norm_backward(ctx, grad):
    dx, dw = _gradients(ctx, "rms_norm", rms_norm_reference, grad, _needed(ctx, {0: 0, 1: 2}))
    return dx, None, dw, None, None


rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


# -- kitsune::softmax_cross_entropy ------------------------------------------------------------

@torch.library.custom_op("kitsune::softmax_cross_entropy", mutates_args=())
def softmax_cross_entropy_op(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                             ignore_index: int, label_smoothing: float, reduction: str) -> torch.Tensor:
    """`F.cross_entropy(logits, target, weight, ignore_index=..., label_smoothing=..., reduction=...)`."""
    _check_cross_entropy(reduction, label_smoothing)
    return _forward("softmax_cross_entropy", cross_entropy_reference, [logits, target, weight],
                    (ignore_index, label_smoothing, reduction), logits.device.type)


@softmax_cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, reduction):
    _check_cross_entropy(reduction, label_smoothing)
    return cross_entropy_reference(logits, target, weight, ignore_index, label_smoothing, reduction)


def _cross_entropy_setup(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, reduction = inputs
    ctx.save_for_backward(logits, target, weight)
    ctx.constants = (ignore_index, label_smoothing, reduction)


def _cross_entropy_backward(ctx, grad):
    # gradients for the logits only (class-index targets; the class weights are constants, as in eager)
    dlogits, _, _ = _gradients(ctx, "softmax_cross_entropy", cross_entropy_reference, grad,
                               _needed(ctx, {0: 0}))
    return dlogits, None, None, None, None, None


softmax_cross_entropy_op.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


def _check_cross_entropy(reduction: str, label_smoothing: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"kitsune ops: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"kitsune ops: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")


# -- kitsune::fused_chain ------------------------------------------------------------------------

@torch.library.custom_op("kitsune::fused_chain", mutates_args=())
def fused_chain_op(inputs: list[torch.Tensor], program: str) -> torch.Tensor:
    """The chain `program` (kitsune.ops.chain) applied to inputs[0], reading the other
    inputs where its steps say."""
    steps = parse_program(program, len(inputs))
    return _forward(f"fused_chain:{program}", chain_reference, list(inputs), (steps,), inputs[0].device.type)


@fused_chain_op.register_fake
def _(inputs, program):
    return run_program(parse_program(program, len(inputs)), list(inputs))


def _chain_setup(ctx, inputs, output):
    tensors, program = inputs
    ctx.save_for_backward(*tensors)
    ctx.program = program
    ctx.constants = (parse_program(program, len(tensors)),)


def _chain_backward(ctx, grad):
    count = len(ctx.saved_tensors)
    wanted = tuple(range(count)) if ctx.needs_input_grad[0] else ()
    grads = _gradients(ctx, f"fused_chain:{ctx.program}", chain_reference, grad, wanted)
    return list(grads), None


fused_chain_op.register_autograd(_chain_backward, setup_context=_chain_setup)


# -- functions to call by hand ------------------------------------------------------------------

def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 activation: str | None = None) -> torch.Tensor:
    """`act(F.linear(x, weight, bias))`; activation None, "relu", "gelu", "gelu_tanh", "silu",
    "sigmoid" or "tanh"."""
    return linear(x, weight, bias, activation_name(activation))


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, activation: str | None = None) -> torch.Tensor:
    """`act(F.layer_norm(x, normalized_shape, weight, bias, eps))`."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    return layer_norm_op(x, shape, weight, bias, float(eps), activation_name(activation))


def rms_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = None, activation: str | None = None) -> torch.Tensor:
    """`act(F.rms_norm(x, normalized_shape, weight, eps))`."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    return rms_norm_op(x, shape, weight, None if eps is None else float(eps), activation_name(activation))


def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                          ignore_index: int = -100, label_smoothing: float = 0.0,
                          reduction: str = "mean") -> torch.Tensor:
    """`F.cross_entropy(logits, target, weight, ignore_index=..., label_smoothing=..., reduction=...)`
    for class-index targets (int64)."""
    if not isinstance(target, torch.Tensor) or target.dtype != torch.long:
        raise TypeError(f"softmax_cross_entropy: target must be an int64 tensor of class indices, "
                        f"got {getattr(target, 'dtype', type(target).__name__)}")
    return softmax_cross_entropy_op(logits, target, weight, int(ignore_index), float(label_smoothing), reduction)
