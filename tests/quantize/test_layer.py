"""QuantizedLinear and kitsune::quantized_linear on the CPU (the PyTorch path): against
`F.linear` with the dequantised weight, the RTN error against the float layer, autograd,
opcheck, state dicts, torch.export, torch.compile, and kitsune.quantize."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kitsune
from kitsune.nn.quantized import QuantizedLinear
from kitsune.quantize import skipped
from kitsune.quantize.ops import quantized_linear

ACTS = {None: lambda y: y, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def reference(layer, x):
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return ACTS[layer.activation](F.linear(x, layer.dequantize(x.dtype), bias))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu"])
def test_matches_linear_with_dequantized_weight_float32(bits, activation):
    layer = QuantizedLinear.from_linear(nn.Linear(70, 33), bits=bits, group_size=32, activation=activation)
    x = torch.randn(2, 3, 70)
    torch.testing.assert_close(layer(x), reference(layer, x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    layer = QuantizedLinear.from_linear(nn.Linear(40, 24).to(dtype), bits=4, group_size=16, activation="gelu")
    assert layer.scales.dtype == dtype and layer.bias.dtype == dtype
    x = torch.randn(5, 40, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference(layer, x))
    # float32 scales with bf16 activations: the weight is dequantised into x's dtype
    layer32 = QuantizedLinear.from_linear(nn.Linear(40, 24), bits=4, group_size=16)
    torch.testing.assert_close(layer32(x), reference(layer32, x))


@pytest.mark.parametrize("bits, bound", [(8, 0.01), (4, 0.12), (2, 0.6)])
def test_rtn_error_against_the_float_layer(bits, bound):
    """Output error of the quantized layer against the float layer, relative to the output's RMS."""
    torch.manual_seed(1)
    linear = nn.Linear(256, 64)
    x = torch.randn(32, 256)
    want = linear(x)
    got = QuantizedLinear.from_linear(linear, bits=bits, group_size=128)(x)
    error = ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()
    print(f"int{bits} g128 relative output RMS error: {error:.4f}")
    assert error < bound


def test_gradients_of_input_and_bias():
    layer = QuantizedLinear.from_linear(nn.Linear(20, 12), bits=4, group_size=8, activation="silu")
    x = torch.randn(3, 20, requires_grad=True)
    grad = torch.randn(3, 12)
    layer(x).backward(grad)
    x2 = x.detach().requires_grad_()
    bias2 = layer.bias.detach().clone().requires_grad_()
    F.silu(F.linear(x2, layer.dequantize(), bias2)).backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.bias.grad, bias2.grad)


@pytest.mark.parametrize("bits,symmetric,activation", [(4, False, "gelu"), (8, True, None), (2, False, "relu")])
def test_opcheck(bits, symmetric, activation):
    layer = QuantizedLinear.from_linear(nn.Linear(19, 6), bits=bits, group_size=8, symmetric=symmetric)
    x = torch.randn(2, 19, requires_grad=True)
    args = (x, layer.qweight, layer.scales, layer.zeros, layer.bias, bits, 8, 19, activation or "none")
    torch.library.opcheck(torch.ops.kitsune.quantized_linear.default, args)


def test_edge_cases():
    layer = QuantizedLinear.from_linear(nn.Linear(9, 5, bias=False), bits=2, group_size=4)
    assert layer.bias is None
    assert layer(torch.randn(0, 9)).shape == (0, 5)
    x = torch.randn(9, 4).t()  # non-contiguous rows
    torch.testing.assert_close(layer(x), reference(layer, x))
    x = torch.randn(2, 9)
    x[0, 3] = float("nan")
    out = layer(x)
    assert out[0].isnan().all() and not out[1].isnan().any()
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(2, 8))
    with pytest.raises(ValueError, match="bits"):
        QuantizedLinear(4, 4, bits=5)
    with pytest.raises(ValueError, match="activation"):
        QuantizedLinear(4, 4, activation="tanh")
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantizedLinear.from_linear(nn.Conv1d(1, 1, 1))


def test_state_dict_round_trip_and_repr():
    layer = QuantizedLinear.from_linear(nn.Linear(30, 10), bits=4, group_size=16, activation="relu")
    state = layer.state_dict()
    assert set(state) == {"qweight", "scales", "zeros", "bias"} and state["qweight"].dtype == torch.uint8
    fresh = QuantizedLinear(30, 10, bits=4, group_size=16, activation="relu")
    fresh.load_state_dict(state)
    x = torch.randn(4, 30)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    symmetric = QuantizedLinear(30, 10, bits=8)
    assert "zeros" not in symmetric.state_dict() and torch.equal(symmetric.dequantize(), torch.zeros(10, 30))
    text = repr(layer)
    assert "bits=4" in text and "group_size=16" in text and "activation=relu" in text
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.qweight.dtype == torch.uint8 and half.scales.dtype == torch.bfloat16


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 32)
        self.lm_head = nn.Linear(32, 11)

    def forward(self, x):
        return self.lm_head(self.down(F.gelu(self.up(x))) + x)


def test_quantize_swaps_linears_except_skipped():
    model = Tiny()
    x = torch.randn(3, 32)
    want = model(x)
    assert kitsune.quantize(model, bits=4, group_size=16) is model
    assert isinstance(model.up, QuantizedLinear) and isinstance(model.down, QuantizedLinear)
    assert type(model.lm_head) is nn.Linear
    assert ((model(x) - want).abs().max() / want.abs().max()) < 0.2
    nested = nn.Sequential(Tiny(), nn.Linear(11, 3))
    kitsune.quantize(nested, bits=8, skip=("0.up", "1"))
    assert type(nested[0].up) is nn.Linear and type(nested[1]) is nn.Linear
    assert isinstance(nested[0].lm_head, QuantizedLinear) and nested[0].lm_head.bits == 8


def test_skip_matches_whole_components():
    assert skipped("lm_head", ["lm_head"]) and skipped("model.lm_head", ["lm_head"])
    assert not skipped("my_lm_head", ["lm_head"]) and not skipped("lm_head.proj", ["lm_head"])
    assert skipped("layers.3.mlp.down_proj", ["mlp.down_proj"]) and not skipped("layers.3.mlp.down_proj", ["3.mlp"])
    with pytest.raises(TypeError, match="skip"):
        kitsune.quantize(Tiny(), skip="lm_head")
    with pytest.raises(ValueError, match="bits"):
        kitsune.quantize(Tiny(), bits=3)


def test_shared_linear_is_quantized_once():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    kitsune.quantize(model, bits=4, group_size=8)
    assert model[0] is model[2] and isinstance(model[0], QuantizedLinear)


def test_torch_export_of_a_quantized_model():
    model = kitsune.quantize(Tiny(), bits=4, group_size=16)
    x = torch.randn(3, 32)
    program = torch.export.export(model, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.kitsune.quantized_linear.default) == 2
    torch.testing.assert_close(program.module()(x), model(x))


def test_functional_form():
    layer = QuantizedLinear.from_linear(nn.Linear(16, 4), bits=4, group_size=8)
    x = torch.randn(2, 16)
    out = quantized_linear(x, layer.qweight, layer.scales, layer.zeros, layer.bias, bits=4, group_size=8)
    torch.testing.assert_close(out, layer(x))


def test_autocast_casts_the_input_like_linear():
    linear = nn.Linear(24, 8)
    layer = QuantizedLinear.from_linear(linear, bits=8, group_size=8)
    x = torch.randn(3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        assert out.dtype == linear(x).dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16()))
