"""kitsune.nn's layers against their unfused PyTorch equivalents: outputs and
gradients (float32, bfloat16, float16), parameters and state-dict keys,
from_module, bad arguments."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kitsune.nn as knn

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tolerance(dtype):
    return {torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=5e-3, rtol=5e-3)}.get(dtype, {})


def check_layer(fused, unfused, *inputs, dtype=torch.float32, grad_inputs=True, params=None):
    """Same outputs and same gradients (inputs and parameters) for fresh random inputs.
    params: (fused parameter, unfused parameter) pairs; by default the modules' by name.
    They must not be shared (the gradients would add up in one tensor)."""
    fused_inputs = [t.clone().requires_grad_(grad_inputs and t.is_floating_point()) for t in inputs]
    plain_inputs = [t.clone().requires_grad_(grad_inputs and t.is_floating_point()) for t in inputs]
    out, expected = fused(*fused_inputs), unfused(*plain_inputs)
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for a, b in zip(fused_inputs, plain_inputs):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, **tolerance(dtype))
    if params is None:
        fused_params = dict(fused.named_parameters())
        params = [(fused_params[_fused_name(name)], p) for name, p in unfused.named_parameters()]
    for a, b in params:
        assert a is not b
        torch.testing.assert_close(a.grad, b.grad, **tolerance(dtype))


def _fused_name(name):
    # nn.Sequential(linear, activation) keeps its linear as "0"
    return name[2:] if name.startswith("0.") else name


# activations are swept in tests/ops; here each dtype once, and no activation
@pytest.mark.parametrize("dtype, activation, module", [(torch.float32, None, nn.Identity())] +
                         [(dtype, "gelu", nn.GELU()) for dtype in DTYPES])
def test_fused_linear(dtype, activation, module):
    linear = nn.Linear(16, 12, dtype=dtype)
    fused = knn.FusedLinear.from_module(linear, activation=activation)
    assert fused.weight is linear.weight and fused.bias is linear.bias
    fused = copy.deepcopy(fused)
    check_layer(fused, nn.Sequential(linear, module), torch.randn(2, 5, 16, dtype=dtype), dtype=dtype)


def test_fused_linear_has_linears_parameters_and_keys():
    torch.manual_seed(0)
    fused = knn.FusedLinear(8, 4, bias=False, activation="relu")
    torch.manual_seed(0)
    plain = nn.Linear(8, 4, bias=False)
    assert list(fused.state_dict()) == list(plain.state_dict()) == ["weight"]
    torch.testing.assert_close(fused.weight, plain.weight)  # nn.Linear's initialisation
    fused.load_state_dict(nn.Linear(8, 4, bias=False).state_dict())


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_layer_norm(dtype):
    norm = nn.LayerNorm(16, dtype=dtype)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    fused = copy.deepcopy(knn.FusedLayerNorm.from_module(norm, activation="gelu"))
    check_layer(fused, nn.Sequential(norm, nn.GELU()), torch.randn(3, 4, 16, dtype=dtype), dtype=dtype)
    plain = knn.FusedLayerNorm((4, 16), elementwise_affine=False, dtype=dtype)
    check_layer(plain, nn.LayerNorm((4, 16), elementwise_affine=False, dtype=dtype),
                torch.randn(3, 4, 16, dtype=dtype), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rms_norm(dtype):
    norm = nn.RMSNorm(16, eps=1e-6, dtype=dtype)
    with torch.no_grad():
        norm.weight.normal_()
    fused = copy.deepcopy(knn.FusedRMSNorm.from_module(norm, activation="silu"))
    check_layer(fused, nn.Sequential(norm, nn.SiLU()), torch.randn(3, 4, 16, dtype=dtype), dtype=dtype)
    assert list(fused.state_dict()) == ["weight"]


def test_norms_take_the_torch_arguments_and_defaults():
    layer = knn.FusedLayerNorm(8)
    assert (layer.eps, layer.elementwise_affine, layer.bias is not None) == (1e-5, True, True)
    assert knn.FusedRMSNorm(8).eps is None
    assert list(knn.FusedLayerNorm(8, bias=False).state_dict()) == ["weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_softmax_cross_entropy(dtype):
    weight = torch.rand(10, dtype=dtype)
    loss = nn.CrossEntropyLoss(weight=weight, ignore_index=3, label_smoothing=0.1)
    fused = knn.FusedSoftmaxCrossEntropy.from_module(loss)
    target = torch.randint(0, 10, (12,))
    check_layer(lambda z: fused(z, target), lambda z: loss(z, target), torch.randn(12, 10, dtype=dtype),
                dtype=dtype, params=[])
    assert list(fused.state_dict()) == list(loss.state_dict()) == ["weight"]
    # (N, C, d) inputs, and class probabilities (PyTorch's loss)
    z, t = torch.randn(2, 5, 3), torch.randint(0, 5, (2, 3))
    torch.testing.assert_close(knn.FusedSoftmaxCrossEntropy(reduction="none")(z, t),
                               F.cross_entropy(z, t, reduction="none"))
    logits, probs = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), -1)
    torch.testing.assert_close(knn.FusedSoftmaxCrossEntropy()(logits, probs), F.cross_entropy(logits, probs))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_cross_entropy(bias):
    head = nn.Linear(16, 24, bias=bias)
    fused = copy.deepcopy(knn.FusedLinearCrossEntropy.from_module(head, ignore_index=-1, label_smoothing=0.1))
    target = torch.randint(0, 24, (2, 5))
    target[0, 1] = -1

    def unfused(hidden):
        return F.cross_entropy(head(hidden).flatten(0, 1), target.flatten(), ignore_index=-1, label_smoothing=0.1)
    check_layer(lambda h: fused(h, target), unfused, torch.randn(2, 5, 16),
                params=list(zip(fused.parameters(), head.parameters())))
    keys = ["weight", "bias"] if bias else ["weight"]
    assert list(knn.FusedLinearCrossEntropy(16, 24, bias=bias).state_dict()) == keys


def test_fused_attention_matches_sdpa_and_keeps_its_projections():
    layer = knn.FusedAttention(16, 4, num_kv_heads=2, causal=True)
    assert layer.k_proj.out_features == layer.v_proj.out_features == 8
    assert sorted(k.split(".")[0] for k in layer.state_dict()) == ["k_proj"] * 2 + ["out_proj"] * 2 + \
        ["q_proj"] * 2 + ["v_proj"] * 2

    def unfused(x):
        b, t, _ = x.shape
        q = layer.q_proj(x).view(b, t, 4, 4).transpose(1, 2)
        k = layer.k_proj(x).view(b, t, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)
        v = layer.v_proj(x).view(b, t, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return layer.out_proj(out.transpose(1, 2).reshape(b, t, 16))
    x = torch.randn(2, 5, 16, requires_grad=True)
    torch.testing.assert_close(layer(x), unfused(x))
    gx = torch.autograd.grad(layer(x).sum(), x)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(unfused(x).sum(), x)[0])


def test_fused_attention_from_multihead_attention():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    layer = knn.FusedAttention.from_module(mha).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.rand(6, 6) > 0.3
    mask.fill_diagonal_(True)
    torch.testing.assert_close(layer(x, attn_mask=mask), mha(x, x, x, attn_mask=~mask, need_weights=False)[0])


@pytest.mark.parametrize("activation, module", [(None, nn.Identity()), ("relu", nn.ReLU())])
def test_fused_conv_bn_trains_as_conv_then_bn_and_folds_in_eval(activation, module):
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    fused = knn.FusedConvBN.from_modules(conv, bn, activation=activation)
    unfused = nn.Sequential(conv, bn, module)
    x = torch.randn(2, 3, 5, 5)
    pairs = list(zip(fused.parameters(), unfused.parameters()))  # conv.weight, conv.bias, bn.weight, bn.bias
    check_layer(fused, unfused, x, params=pairs)
    torch.testing.assert_close(fused.bn.running_mean, bn.running_mean)
    torch.testing.assert_close(fused.bn.running_var, bn.running_var)
    fused.eval(), unfused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), unfused(x))
        first = fused.folded()[0]
        bn.running_var.mul_(2.0)  # new statistics: the fold is recomputed
        fused.bn.running_var.mul_(2.0)
        torch.testing.assert_close(fused(x), unfused(x))
        assert fused.folded()[0] is not first
    for p in [*fused.parameters(), *unfused.parameters()]:
        p.grad = None
    check_layer(fused, unfused, x, params=pairs)  # eval with gradients: the fold is differentiated
    assert list(fused.state_dict()) == ["conv." + k for k in conv.state_dict()] + ["bn." + k for k in bn.state_dict()]


def test_fused_conv_bn_1d():
    conv, bn = nn.Conv1d(3, 4, 3, bias=False), nn.BatchNorm1d(4)
    fused = knn.FusedConvBN(conv, bn, activation="silu")
    x = torch.randn(2, 3, 7)
    torch.testing.assert_close(fused(x), F.silu(bn(conv(x))))


def test_state_dict_round_trips():
    for make in (lambda: knn.FusedLinear(4, 3, activation="gelu"), lambda: knn.FusedLayerNorm(4),
                 lambda: knn.FusedRMSNorm(4), lambda: knn.FusedAttention(8, 2),
                 lambda: knn.FusedLinearCrossEntropy(4, 6, bias=True),
                 lambda: knn.FusedConvBN(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))):
        source, target = make(), make()
        target.load_state_dict(source.state_dict())
        for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)


def test_zero_size_and_non_contiguous_inputs():
    layer = knn.FusedLinear(8, 4, activation="relu")
    assert layer(torch.randn(0, 8)).shape == (0, 4)
    x = torch.randn(8, 6).t()
    torch.testing.assert_close(layer(x), F.relu(F.linear(x, layer.weight, layer.bias)))
    norm, rows = knn.FusedRMSNorm(6), torch.randn(6, 6).t()
    torch.testing.assert_close(norm(rows), nn.RMSNorm(6)(rows))
    torch.testing.assert_close(knn.FusedLayerNorm(6)(rows[:0]), rows[:0])


def test_under_autocast_the_layers_compute_as_the_unfused_ones():
    linear, x = nn.Linear(8, 4), torch.randn(3, 8)
    fused = knn.FusedLinear.from_module(linear, "gelu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = fused(x), F.gelu(linear(x))
        norm = knn.FusedLayerNorm(4)(out)
    assert out.dtype == expected.dtype == torch.bfloat16 and norm.dtype == torch.float32
    torch.testing.assert_close(out, expected, **tolerance(torch.bfloat16))


def test_bad_arguments_name_the_argument():
    cases = [
        (lambda: knn.FusedLinear(4, 3, activation="swish"), ValueError, "activation"),
        (lambda: knn.FusedLinear(-1, 3), ValueError, "in_features"),
        (lambda: knn.FusedLinear(4, "3"), TypeError, "out_features"),
        (lambda: knn.FusedAttention(10, 4), ValueError, "embed_dim"),
        (lambda: knn.FusedAttention(16, 4, num_kv_heads=3), ValueError, "num_kv_heads"),
        (lambda: knn.FusedAttention(16, 4, dropout=2.0), ValueError, "dropout"),
        (lambda: knn.FusedConvBN(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(4)), ValueError, "num_features"),
        (lambda: knn.FusedConvBN(nn.Linear(2, 3), nn.BatchNorm2d(3)), TypeError, "conv"),
        (lambda: knn.FusedLinearCrossEntropy(4, 5, reduction="none"), ValueError, "reduction"),
        (lambda: knn.FusedLinearCrossEntropy(4, 5, label_smoothing=-0.1), ValueError, "label_smoothing"),
        (lambda: knn.FusedSoftmaxCrossEntropy(reduction="avg"), ValueError, "reduction"),
        (lambda: knn.FusedLayerNorm(4, activation=3), ValueError, "activation"),
        (lambda: knn.FusedLinear.from_module(nn.Conv2d(1, 1, 1)), TypeError, "linear"),
    ]
    for make, error, name in cases:
        with pytest.raises(error, match=name):
            make()


def test_quantized_linear_is_reexported_only_where_it_exists():
    try:
        import kitsune.nn.quantized  # noqa: F401
    except ImportError:
        with pytest.raises(AttributeError, match="QuantizedLinear"):
            knn.QuantizedLinear
    else:
        assert knn.QuantizedLinear is kitsune.nn.quantized.QuantizedLinear


def test_triton_kernels_through_the_interpreter(monkeypatch):
    """The GPU code path: the same layers with Triton kernels (Triton's interpreter here)."""
    from kitsune.ops import generated
    monkeypatch.setenv("KITSUNE_BACKEND", "triton")
    fused = knn.FusedLinear(8, 4, activation="gelu")
    linear = nn.Linear(8, 4)
    linear.load_state_dict(fused.state_dict())
    check_layer(fused, nn.Sequential(linear, nn.GELU()), torch.randn(3, 8))
    x = torch.randn(5, 3)
    torch.testing.assert_close(knn.FusedElementwise().add(1.0).silu()(x), F.silu(x + 1.0))
    entries = [v for k, v in generated.KERNEL_CACHE.entries.items() if k[3] == "triton"]
    assert len(entries) >= 3 and all(e is not generated._REFERENCE for e in entries)
