"""FusionDetector on small hand-built aten graphs: one test per built-in pattern,
with the decompositions Kitsune's capture uses and without, plus negatives."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from kitsune.capture.dynamo import decomposition_table
from kitsune.fusion import BUILTIN_PATTERNS, FusionDetector, FusionPattern
from kitsune.planner.units import UnitGraph


def graph(fn, *inputs, decompose=False, mode="fake"):
    table = decomposition_table() if decompose else None
    return make_fx(fn, decomposition_table=table, tracing_mode=mode)(*inputs)


def found(gm, pattern=None, detector=None):
    opps = (detector or FusionDetector()).detect(gm)
    return [o for o in opps if pattern is None or o.pattern == pattern]


def only(gm, pattern, detector=None):
    matches = found(gm, pattern, detector)
    assert len(matches) == 1, (pattern, [(o.pattern, o.ops) for o in found(gm, detector=detector)])
    return matches[0]


x = torch.randn(4, 8)


def test_builtin_registry_is_complete():
    assert set(BUILTIN_PATTERNS) == {
        "elementwise_chain", "binary_activation", "scalar_activation", "norm_activation", "softmax",
        "softmax_cross_entropy", "linear_activation", "conv_bn_activation", "attention", "matrix_chain",
        "quantized_matmul", "quantized_matmul_activation"}
    assert all(p.builtin and p.ops for p in BUILTIN_PATTERNS.values())


def test_elementwise_chain_is_a_connected_pointwise_region():
    gm = graph(lambda a, b: (a.sin() + b).exp() * 2, x, x)
    opp = only(gm, "elementwise_chain")
    assert opp.ops == ("sin", "add", "exp", "mul")
    # a matmul in the middle splits it in two
    gm = graph(lambda a, b: (a.sin() @ b).exp().cos(), x, x.t())
    assert sorted(o.ops for o in found(gm, "elementwise_chain")) == [("exp", "cos")]


def test_elementwise_chain_stops_where_a_matmul_lies_between():
    # exp feeds add directly and through the matmul: one kernel cannot hold both
    gm = graph(lambda a, w: (e := a.exp()) + e @ w, x, torch.randn(8, 8))
    assert found(gm, "elementwise_chain") == []
    gm = graph(lambda a, w: (e := a.exp()) + e.cos() + a @ w, x, torch.randn(8, 8))
    assert only(gm, "elementwise_chain").ops == ("exp", "cos", "add", "add")


def test_binary_activation_and_its_bytes_saved():
    gm = graph(lambda a, b: torch.relu(a + b), x, x)
    opp = only(gm, "binary_activation")
    assert opp.ops == ("add", "relu") and opp.nodes == ("add", "relu")
    # eager: add reads 2 and writes 1 tensor, relu reads 1 and writes 1; fused: reads 2, writes 1.
    assert opp.bytes_saved == 2 * x.numel() * 4
    assert opp.memory_savings == opp.bytes_saved and opp.estimated_speedup > 1.0
    assert found(gm, "scalar_activation") == []
    # the elementwise chain with exactly the same ops is reported once, as the specific pattern
    assert found(gm, "elementwise_chain") == []


def test_scalar_activation():
    gm = graph(lambda a: torch.sigmoid(a * 0.5), x)
    assert only(gm, "scalar_activation").ops == ("mul", "sigmoid")
    assert found(gm, "binary_activation") == []
    gm = graph(lambda a: torch.tanh(a - 1.0), x)
    assert only(gm, "scalar_activation").ops == ("sub", "tanh")


def test_no_activation_no_binary_activation():
    gm = graph(lambda a, b: (a + b).exp(), x, x)
    assert found(gm, "binary_activation") == [] and found(gm, "scalar_activation") == []


def test_norm_activation():
    gm = graph(lambda a: F.relu(F.layer_norm(a, (8,))), x)
    opp = only(gm, "norm_activation")
    assert opp.ops == ("layer_norm", "relu")
    assert opp.fusion_type == "reduction"


@pytest.mark.parametrize("decompose", [False, True])
def test_softmax_whole_or_decomposed(decompose):
    gm = graph(lambda a: torch.softmax(a * 0.125, -1), x, decompose=decompose)
    opp = only(gm, "softmax")
    assert opp.ops == ("mul", "softmax")
    if decompose:
        assert {"amax", "exp", "sum"} <= {n.split("_")[0] for n in opp.nodes}


@pytest.mark.parametrize("decompose", [False, True])
def test_softmax_cross_entropy(decompose):
    target = torch.randint(0, 8, (4,))
    gm = graph(lambda a, t: F.cross_entropy(a, t), x, target, decompose=decompose)
    opp = only(gm, "softmax_cross_entropy")
    assert opp.ops[0] == "log_softmax"
    assert opp.ops[1] in ("nll_loss", "gather")
    assert found(gm, "softmax") == []  # the bigger pattern covers the softmax
    # softmax followed by log and nll_loss, written by hand
    gm = graph(lambda a, t: F.nll_loss(torch.softmax(a, -1).log(), t), x, target)
    assert only(gm, "softmax_cross_entropy").ops == ("softmax", "log", "nll_loss")


def test_linear_activation_addmm_and_mm_add():
    w, b = torch.randn(8, 16), torch.randn(16)
    gm = graph(lambda a: F.gelu(F.linear(a, w.t(), b)), x, mode="real")
    opp = only(gm, "linear_activation")
    assert opp.ops == ("addmm", "gelu") and opp.fusion_type == "matmul"
    gm = graph(lambda a, w, b: torch.relu(a @ w + b), x, w, b)
    assert only(gm, "linear_activation").ops == ("mm", "add", "relu")
    assert found(gm, "binary_activation") == []  # covered by linear_activation


def test_conv_bn_activation():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval()
    gm = graph(lambda a: F.relu(bn(conv(a))), torch.randn(1, 3, 8, 8), mode="real")
    opp = only(gm, "conv_bn_activation")
    assert opp.ops == ("conv", "batch_norm", "relu") and opp.fusion_type == "conv"
    gm = graph(lambda a: conv(a).exp(), torch.randn(1, 3, 8, 8), mode="real")
    assert found(gm, "conv_bn_activation") == []


def test_attention_by_hand_with_mask_and_sdpa():
    q = torch.randn(2, 4, 8)
    mask = torch.zeros(4, 4)
    gm = graph(lambda q, k, v, m: torch.softmax(q @ k.transpose(-1, -2) * 0.35 + m, -1) @ v, q, q, q, mask)
    opp = only(gm, "attention")
    assert opp.ops == ("bmm", "mul", "add", "softmax", "bmm")
    assert opp.fusion_type == "attention" and opp.estimated_speedup > 1.0
    assert found(gm, "softmax") == []
    gm = graph(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, q, q)
    # torch 2.13 traces CPU SDPA into bmm/softmax/bmm; torch 2.14 keeps it one op
    ops = only(gm, "attention").ops
    assert ops[0] == "bmm" or ops == ("_scaled_dot_product_flash_attention_for_cpu",), ops


def test_matrix_chain():
    a = torch.randn(4, 4)
    gm = graph(lambda a, b, c: (a @ b) @ c, a, a, a)
    assert only(gm, "matrix_chain").ops == ("mm", "mm")
    gm = graph(lambda a, b, c: (a @ b).relu() @ c, a, a, a)
    assert found(gm, "matrix_chain") == []


def test_quantized_matmul_with_and_without_activation():
    wq = torch.randint(-8, 8, (8, 16), dtype=torch.int8)
    scale = torch.rand(16)
    gm = graph(lambda a, w, s: a @ (w.float() * s), x, wq, scale)
    opp = only(gm, "quantized_matmul")
    assert opp.ops[-1] == "mm" and "mul" in opp.ops and opp.fusion_type == "quantized"
    assert found(gm, "quantized_matmul_activation") == []
    gm = graph(lambda a, w, s: F.silu(a @ (w.float() * s)), x, wq, scale)
    opp = only(gm, "quantized_matmul_activation")
    assert opp.ops[-2:] == ("mm", "silu")
    assert found(gm, "quantized_matmul") == [] and found(gm, "linear_activation") == []
    # a float weight is not quantized
    gm = graph(lambda a, w: F.silu(a @ w), x, torch.randn(8, 16))
    assert found(gm, "quantized_matmul_activation") == [] and found(gm, "linear_activation")


def test_user_pattern_is_matched_in_order_with_optional_ops():
    pattern = FusionPattern(name="gate", ops=["mul", "sigmoid", "dropout?", "add"])
    detector = FusionDetector([pattern])
    gm = graph(lambda a, b: torch.sigmoid(a * b) + a, x, x)
    opp = only(gm, "gate", detector)
    assert opp.custom and opp.ops == ("mul", "sigmoid", "add")
    gm = graph(lambda a, b: torch.sigmoid(a + b) + a, x, x)
    assert found(gm, "gate", detector) == []


def test_units_group_dynamo_source_and_name_them():
    captured = []
    from kitsune.capture.dynamo import aot_backend

    def keep(gm, inputs, kind):
        captured.append(gm)
        return gm

    lin = nn.Linear(8, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(lambda a: F.gelu(lin(a)), backend=aot_backend(keep))(x)
    units = UnitGraph(captured[0].graph)
    names = [u.name for u in units.units if u.kernels]
    assert names == ["linear", "gelu"]
    assert len(units.units[-1].kernels) >= 2  # gelu decomposes into several primitives: one unit


def test_detect_captures_modules_and_rejects_junk():
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        opps = FusionDetector().detect(lambda a: torch.relu(lin(a)), x)
    assert [o.pattern for o in opps] == ["linear_activation"]
    assert opps[0].graph == "inference"
    # with gradients: forward and backward graphs, and the parameters' .grad untouched
    opps = FusionDetector().detect(lambda a: torch.relu(lin(a)), x)
    assert {o.graph for o in opps} == {"forward", "backward"}
    assert lin.weight.grad is None
    with pytest.raises(TypeError):
        FusionDetector().detect(42)
    with pytest.raises(TypeError):
        FusionDetector(patterns=["add"])
