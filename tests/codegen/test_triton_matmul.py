"""The generated Triton matmul with its epilogue fused (issue 15, choice (c)),
through Triton's interpreter on tiny shapes: the epilogue is the planner's own
kernel spec (lowered from the aten graph of the pointwise work after the
matmul), its product's loads replaced by the accumulator, and the results
match eager's matmul followed by the same ops."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from kitsune.capture.dynamo import decomposition_table
from kitsune.capture.simplify import simplify
from kitsune.codegen.kernel import KernelError
from kitsune.codegen.lower import lower_group
from kitsune.codegen.triton.matmul import CONFIGS, MatmulConfig
from kitsune.config import FusionConfig
from kitsune.planner import plan_graph
from kitsune.runtime import fused_matmul as fused_matmul_module
from kitsune.runtime.fused_matmul import (MatmulChoice, MatmulEpilogueRunner, describe, fused_matmul,
                                          kernel_for, unfused_path)

SMALL = MatmulConfig(16, 16, 16, group_m=2, num_warps=4, num_stages=2)  # several tiles and K steps at 33
LOW = (torch.float16, torch.bfloat16)


def _epilogue(fn, *examples):
    """The planner's kernel spec for fn (the work after the matmul, whose first
    argument is the product) and, per spec input slot, the position of fn's
    argument it reads."""
    gm = make_fx(fn, decomposition_table=decomposition_table(True))(*examples)
    simplify(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    plan = plan_graph(gm, FusionConfig(max_fusion_size=64), "test")
    assert len(plan.groups) == 1, [g.nodes for g in plan.groups]
    spec, inputs, outputs = lower_group(plan.groups[0], "kitsune_epilogue")
    returned = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    returned = list(returned) if isinstance(returned, (list, tuple)) else [returned]
    assert [returned.index(n) for n in outputs] == list(range(len(outputs)))  # the spec's outputs in fn's order
    return spec, [placeholders.index(_root(n)) for n in inputs]


def _root(node):
    """The placeholder a (view) node reads."""
    while node.op != "placeholder":
        node = node.args[0]
    return node


def _run(fn, a, b, extra=(), products=(0,), bias=None, config=SMALL):
    """fused_matmul for `fn(product(s)..., *extra)`; returns (fused outputs, eager's result)."""
    bs = b if isinstance(b, (list, tuple)) else [b]
    mm = torch.bmm if a.dim() == 3 else torch.mm
    prods = [mm(a, w) if bias is None else torch.addmm(bias, a, w) for w in bs]
    args = [*prods, *extra]
    spec, arg_of_slot = _epilogue(fn, *args)
    inputs = [args[i] for i in arg_of_slot]
    slots = [arg_of_slot.index(p) for p in products]
    out = fused_matmul(a, bs if len(bs) > 1 else bs[0], spec, inputs, slots if len(slots) > 1 else slots[0],
                       bias=bias, config=config)
    expected = fn(*args)
    return out, expected if isinstance(expected, (tuple, list)) else [expected]


def _tol(dtype):
    # matmul tolerances: a summation order other than the library's moves the
    # product by a rounding of its dtype (then carried through the epilogue)
    return {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=4e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=3e-2)}[dtype]


def _operands(m, n, k, dtype, batch=None):
    lead = (batch,) if batch else ()
    return torch.randn(*lead, m, k, dtype=dtype), torch.randn(*lead, k, n, dtype=dtype) / math.sqrt(max(k, 1))


SIZES = [(1, 1, 1), (7, 33, 1), (33, 7, 33), (1, 33, 7), (33, 33, 7), (7, 1, 33)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", SIZES)
def test_bias_relu(m, n, k, dtype):
    a, b = _operands(m, n, k, dtype)
    bias = torch.randn(n, dtype=dtype)
    out, expected = _run(lambda p, c: torch.relu(p + c), a, b, [bias])
    torch.testing.assert_close(out[0], expected[0], **_tol(dtype))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gelu(approximate, dtype):
    a, b = _operands(33, 7, 33, dtype)
    bias = torch.randn(7, dtype=dtype)
    out, expected = _run(lambda p, c: F.gelu(p + c, approximate=approximate), a, b, [bias])
    torch.testing.assert_close(out[0], expected[0], **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_addmm_bias_inside_the_product_then_gelu(dtype):
    """addmm's bias is added to the accumulator before the product is rounded, as cuBLAS does."""
    a, b = _operands(7, 33, 33, dtype)
    bias = torch.randn(33, dtype=dtype)
    out, expected = _run(F.gelu, a, b, bias=bias)
    torch.testing.assert_close(out[0], expected[0], **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_add_and_scaling(dtype):
    a, b = _operands(33, 7, 33, dtype)
    residual = torch.randn(33, 7, dtype=dtype)
    out, expected = _run(lambda p, r: p * 0.125 + r, a, b, [residual])
    torch.testing.assert_close(out[0], expected[0], **_tol(dtype))


def test_residual_read_transposed_and_a_scalar_tensor():
    """Epilogue inputs keep their own indices (a transposed residual, a 0-d scale)."""
    a, b = _operands(7, 33, 33, torch.float32)
    residual_t = torch.randn(33, 7).t()
    scale = torch.tensor(0.5)
    out, expected = _run(lambda p, r, s: torch.sigmoid(p * s) + r, a, b, [residual_t, scale])
    torch.testing.assert_close(out[0], expected[0], **_tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_two_products_of_one_left_operand(dtype):
    a, w1 = _operands(33, 7, 33, dtype)
    w2 = torch.randn(33, 7, dtype=dtype) / math.sqrt(33)
    out, expected = _run(lambda g, u: F.silu(g) * u, a, [w1, w2], products=(0, 1))
    torch.testing.assert_close(out[0], expected[0], **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bmm_with_epilogue(dtype):
    a, b = _operands(7, 33, 33, dtype, batch=3)
    bias = torch.randn(33, dtype=dtype)
    out, expected = _run(lambda p, c: torch.tanh(p + c), a, b, [bias])
    torch.testing.assert_close(out[0], expected[0], **_tol(dtype))


def test_several_outputs_of_the_product_shape():
    a, b = _operands(33, 7, 7, torch.float32)
    bias = torch.randn(7)

    def two_outputs(p, c):
        s = p + c
        return s, torch.relu(s) * 2
    out, expected = _run(two_outputs, a, b, [bias])
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, **_tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_where_the_matmul_is_exact(dtype):
    """Small integers: every summation order gives the same product, so the
    fused kernel equals eager's product + epilogue bit for bit (the product is
    rounded to its dtype before the epilogue, as eager stores it)."""
    a = torch.randint(-3, 4, (33, 33)).to(dtype)
    b = torch.randint(-3, 4, (33, 7)).to(dtype)
    bias = torch.randint(-3, 4, (7,)).to(dtype)
    residual = torch.randn(33, 7, dtype=dtype)
    out, expected = _run(lambda p, c, r: torch.relu(p * 0.1 + c) + r, a, b, [bias, residual])
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_propagate_like_eager(dtype):
    a = torch.randint(-3, 4, (7, 33)).to(dtype)
    b = torch.randint(-3, 4, (33, 7)).to(dtype)
    a[1, 3], a[4, 0], b[5, 2] = float("nan"), float("inf"), float("-inf")
    bias = torch.randn(7, dtype=dtype)
    bias[6] = float("nan")
    out, expected = _run(lambda p, c: torch.relu(p + c), a, b, [bias])
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transposed_weight_and_strided_left_operand(dtype):
    """A Linear's weight.t() and a column slice of a wider matrix as operands."""
    weight = torch.randn(7, 33, dtype=dtype) / math.sqrt(33)
    wide = torch.randn(33, 70, dtype=dtype)
    a = wide[:, 5:38]
    bias = torch.randn(7, dtype=dtype)
    out, expected = _run(lambda p, c: F.silu(p + c), a, weight.t(), [bias])
    torch.testing.assert_close(out[0], expected[0], **_tol(dtype))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_every_measured_tiling_is_correct(config):
    """The tilings the GPU measures, in the interpreter: one partial tile each way."""
    a, b = _operands(33, 7, 70, torch.bfloat16)
    bias = torch.randn(7, dtype=torch.bfloat16)
    out, expected = _run(lambda p, c: torch.relu(p + c), a, b, [bias], config=config)
    torch.testing.assert_close(out[0], expected[0], **_tol(torch.bfloat16))


def test_zero_rows_and_zero_k():
    a, b = _operands(0, 7, 33, torch.float32)
    bias = torch.randn(7)
    out, expected = _run(lambda p, c: torch.relu(p + c), a, b, [bias])
    assert out[0].shape == (0, 7)
    a, b = torch.randn(5, 0), torch.randn(0, 7)  # an empty sum: the product is 0, the epilogue still runs
    out, expected = _run(lambda p, c: torch.relu(p + c), a, b, [bias])
    torch.testing.assert_close(out[0], expected[0])


# -- what is declined, and why ---------------------------------------------------------


def _describe_fn(fn, *extra, m=7, n=33, k=7):
    a, b = _operands(m, n, k, torch.float32)
    args = [a @ b, *extra]
    spec, _ = _epilogue(fn, *args)
    return a, b, spec


def test_a_reduction_in_the_epilogue_is_declined():
    a, b, spec = _describe_fn(lambda p: torch.softmax(p, -1))
    with pytest.raises(KernelError, match="reduction"):
        describe(a, [b], spec, [0])


def test_a_product_read_at_another_element_is_declined():
    a, b, spec = _describe_fn(lambda p, r: p.t().contiguous().view(7, 33) + r, torch.randn(7, 33), m=33, n=7, k=7)
    with pytest.raises(KernelError, match="another element"):
        describe(a, [b], spec, [0])


def test_an_epilogue_over_another_iteration_space_is_declined():
    a, b = _operands(7, 33, 7, torch.float32)
    spec, _ = _epilogue(lambda p: torch.relu(p) * 2, torch.randn(7, 32))
    with pytest.raises(KernelError, match="iterates over"):
        describe(a, [b], spec, [0])


def test_bad_arguments_name_the_argument():
    a, b, spec = _describe_fn(lambda p: torch.relu(p) * 2)
    with pytest.raises(ValueError, match="b of shape"):
        fused_matmul(a, b.t(), spec, [None])
    with pytest.raises(ValueError, match="inputs"):
        fused_matmul(a, b, spec, [None, None])
    with pytest.raises(TypeError, match="epilogue_spec"):
        fused_matmul(a, b, "relu", [None])
    with pytest.raises(ValueError, match="block_m"):
        MatmulConfig(block_m=48)


# -- the measured choice -------------------------------------------------------------------


def _runner_case():
    a, b = _operands(33, 7, 33, torch.bfloat16)
    bias = torch.randn(7, dtype=torch.bfloat16)
    spec, slots = _epilogue(lambda p, c: torch.relu(p + c), a @ b, bias)
    inputs = [None if s == 0 else bias for s in slots]
    epi = describe(a, [b], spec, [slots.index(0)])
    return a, b, bias, inputs, epi, torch.relu(a @ b + bias)


@pytest.mark.parametrize("fused_wins", [True, False])
def test_runner_keeps_the_faster_and_reports_both_times(fused_wins, tmp_path, monkeypatch):
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused_matmul_module, "_CHOICES", {})  # this process's choices: measured afresh
    a, b, bias, inputs, epi, expected = _runner_case()
    times = iter([1.0] + [0.5 if fused_wins else 2.0] * len(CONFIGS[:2]))
    runner = MatmulEpilogueRunner(epi, configs=CONFIGS[:2], timer=lambda fn: (fn(), next(times))[1])
    out = runner(a, [b], [None], inputs)
    torch.testing.assert_close(out[0], expected, **_tol(torch.bfloat16))
    choice = runner.choice
    assert choice.fused == fused_wins and choice.plain_ms == 1.0
    assert choice.text.startswith("Triton matmul + epilogue" if fused_wins else "cuBLAS + kernel")
    rewrite = choice.rewrite(("linear", "relu"), ("addmm", "relu"))
    assert rewrite.pattern == "linear_activation" and rewrite.choice == choice.text
    assert list(tmp_path.glob("decisions/matmul_*.json"))  # cached on disk
    again = MatmulEpilogueRunner(epi, configs=CONFIGS[:2], timer=lambda fn: pytest.fail("measured again"))
    again(a, [b], [None], inputs)
    assert again.choice.to_json() == choice.to_json()


def test_runner_on_the_cpu_runs_the_unfused_path():
    a, b, bias, inputs, epi, expected = _runner_case()
    runner = MatmulEpilogueRunner(epi)
    out = runner(a, [b], [None], inputs)
    assert runner.choice is None
    torch.testing.assert_close(out[0], expected, **_tol(torch.bfloat16))


def test_choice_round_trips_through_json():
    choice = MatmulChoice(CONFIGS[1], 0.5, 0.75, {c.label: 0.5 for c in CONFIGS})
    assert MatmulChoice.from_json(choice.to_json()) == choice
    assert "0.500 ms against 0.750 ms" in choice.text


def test_source_reads_the_bias_by_column_and_never_stores_the_product():
    a, b, bias, inputs, epi, _ = _runner_case()
    source = kernel_for(epi, SMALL).source
    assert "tl.load(in" in source and "+ (r)" in source  # the bias at its column: no division
    assert source.count("tl.store(") == len(epi.spec.outputs)
    assert unfused_path(epi) is not None


def test_runner_falls_back_to_the_unfused_path_when_the_fused_kernel_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused_matmul_module, "_CHOICES", {})
    a, b, bias, inputs, epi, expected = _runner_case()
    times = iter([1.0, 0.5])
    runner = MatmulEpilogueRunner(epi, configs=CONFIGS[:1], timer=lambda fn: (fn(), next(times))[1])
    runner(a, [b], [None], inputs)
    assert runner.choice.fused

    def broken(*args):
        raise KernelError("launch failed")
    runner._run = broken
    out = runner(a, [b], [None], inputs)  # logged, then cuBLAS + kernel from now on
    torch.testing.assert_close(out[0], expected, **_tol(torch.bfloat16))
    assert runner._run is runner.unfused


def test_wide_offsets_compute_the_same():
    """The 64-bit variant (an operand past 2^31 elements) on a tiny product."""
    from dataclasses import replace
    a, b, bias, inputs, epi, expected = _runner_case()
    wide = replace(epi, wide=True)
    kernel = kernel_for(wide, SMALL)
    assert "tl.program_id(0).to(tl.int64)" in kernel.source
    out = [torch.empty(33, 7, dtype=torch.bfloat16)]
    kernel(a, [b], [None], inputs, out)
    torch.testing.assert_close(out[0], expected, **_tol(torch.bfloat16))


@pytest.mark.parametrize("batch", [None, 2])
def test_persistent_programs_walk_several_tiles(batch):
    """Two programs (the interpreter's count) over 3 x 3 tiles of 16: each walks several."""
    persistent = MatmulConfig(16, 16, 16, group_m=2, persistent=True)
    a, b = _operands(33, 40, 33, torch.float32, batch=batch)
    bias = torch.randn(40)
    out, expected = _run(lambda p, c: torch.relu(p + c), a, b, [bias], config=persistent)
    torch.testing.assert_close(out[0], expected[0], **_tol(torch.float32))
    assert "for tile in range(tl.program_id(0), 9, num_programs):" in kernel_for(
        describe(a, [b], _epilogue(lambda p, c: torch.relu(p + c), torch.bmm(a, b) if batch else a @ b, bias)[0],
                 [0]), persistent).source


def test_whole_tiles_store_without_a_mask():
    a, b = _operands(32, 48, 16, torch.float32)
    bias = torch.randn(48)
    tiles = MatmulConfig(16, 16, 16, group_m=2)
    out, expected = _run(lambda p, c: torch.relu(p + c), a, b, [bias], config=tiles)
    torch.testing.assert_close(out[0], expected[0], **_tol(torch.float32))
