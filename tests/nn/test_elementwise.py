"""kitsune.nn.FusedElementwise: the builder's chains against the same torch calls,
one kitsune::fused_chain op per call, dropout that respects train()/eval(), and
agreement with kitsune.ops.fused and FusionEngine.fuse."""
import pytest
import torch
import torch.nn.functional as F

import kitsune.ops as kops
from kitsune.fusion import FusionEngine
from kitsune.nn import FusedElementwise
from kitsune.nn.elementwise import METHODS

# method -> (arguments, the torch call it stands for)
CALLS = {
    "add": ((1.5,), lambda x: torch.add(x, 1.5)), "sub": ((0.5,), lambda x: torch.sub(x, 0.5)),
    "mul": ((2.0,), lambda x: torch.mul(x, 2.0)), "div": ((4.0,), lambda x: torch.div(x, 4.0)),
    "pow": ((2,), lambda x: torch.pow(x, 2)), "maximum": (None, None), "minimum": (None, None),
    "where": (None, None), "clamp": ((-0.5, 0.5), lambda x: torch.clamp(x, -0.5, 0.5)),
    "gelu": ((), F.gelu), "leaky_relu": ((0.2,), lambda x: F.leaky_relu(x, 0.2)),
    "elu": ((0.5,), lambda x: F.elu(x, 0.5)), "softplus": ((2.0, 10.0), lambda x: F.softplus(x, 2.0, 10.0)),
    "hardtanh": ((-0.3, 0.7), lambda x: F.hardtanh(x, -0.3, 0.7)), "relu": ((), F.relu), "silu": ((), F.silu),
    "sigmoid": ((), torch.sigmoid), "tanh": ((), torch.tanh), "hardswish": ((), F.hardswish),
    "hardsigmoid": ((), F.hardsigmoid), "mish": ((), F.mish), "relu6": ((), F.relu6), "exp": ((), torch.exp),
    "log": ((), lambda x: torch.log(x)), "neg": ((), torch.neg), "abs": ((), torch.abs),
    "sqrt": ((), torch.sqrt), "rsqrt": ((), torch.rsqrt), "sin": ((), torch.sin), "cos": ((), torch.cos),
    "erf": ((), torch.erf), "square": ((), torch.square), "reciprocal": ((), torch.reciprocal),
}


def test_every_method_is_covered_here():
    assert set(METHODS) == set(CALLS)


@pytest.mark.parametrize("name", [n for n, (args, _) in CALLS.items() if args is not None])
def test_each_method_is_its_torch_function(name):
    args, reference = CALLS[name]
    x = torch.rand(4, 6) + 0.1 if name in ("log", "sqrt", "rsqrt") else torch.randn(4, 6)
    chain = getattr(FusedElementwise().mul(1.0), name)(*args)  # a chain: mul then the method
    torch.testing.assert_close(chain(x), reference(x))


def test_binary_methods_take_tensors_kept_as_buffers():
    x, y, cond = torch.randn(3, 5), torch.randn(5), torch.rand(3, 5) > 0.5
    chain = FusedElementwise().maximum(y).minimum(torch.full((3, 1), 0.5)).where(cond, y).add(y, alpha=2)
    expected = torch.add(torch.where(cond, torch.minimum(torch.maximum(x, y), torch.full((3, 1), 0.5)), y), y,
                         alpha=2)
    torch.testing.assert_close(chain(x), expected)
    assert len(dict(chain.named_buffers(remove_duplicate=False))) == 5  # y three times, the 0.5s, cond


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_spec_chain_forward_and_backward(dtype):
    chain = FusedElementwise().add(1.0).mul(2.0).sub(0.5).relu().gelu(approximate="tanh")
    x = torch.randn(4, 7, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, expected = chain(x), F.gelu(F.relu((x2 + 1.0) * 2.0 - 0.5), approximate="tanh")
    tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, expected, **tol)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **tol)


def test_gelu_is_exact_unless_asked_for_tanh():
    x = torch.randn(100) * 3
    exact, tanh = FusedElementwise().gelu()(x), FusedElementwise().gelu(approximate="tanh")(x)
    torch.testing.assert_close(exact, F.gelu(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tanh, F.gelu(x, approximate="tanh"), atol=1e-6, rtol=1e-6)
    assert (exact - tanh).abs().max() > 1e-5  # the two differ by more than the tolerance


def test_the_chain_is_one_op(monkeypatch):
    import kitsune.ops.chain as chain_module
    calls = []
    original = chain_module.ProgramBuilder.run

    def counted(self):
        calls.append(";".join(self.steps))
        return original(self)
    monkeypatch.setattr(chain_module.ProgramBuilder, "run", counted)
    FusedElementwise().add(1.0).mul(2.0).relu()(torch.randn(3))
    assert calls == ["add:1.0;mul:2.0;relu"]


def test_dropout_respects_train_and_eval():
    chain = FusedElementwise().mul(3.0).dropout(0.5)
    x = torch.ones(32, 32)
    out = chain(x)  # a new module trains
    assert set(out.unique().tolist()) == {0.0, 6.0}
    chain.eval()
    torch.testing.assert_close(chain(x), x * 3.0)
    chain.train()
    assert (chain(x) == 0).any()
    torch.testing.assert_close(FusedElementwise().dropout(1.0)(x), torch.zeros_like(x))


def test_builder_ops_list_and_engine_agree():
    x = torch.randn(4, 6)
    steps = [("add", 1.0), ("mul", 2.0), ("sub", 0.5), ("relu",)]
    built = FusedElementwise().add(1.0).mul(2.0).sub(0.5).relu()(x)
    listed = kops.fused([x], steps)
    engine = FusionEngine().fuse(steps)(x)
    unfused = torch.relu((x + 1.0) * 2.0 - 0.5)
    for result in (built, listed, engine):
        torch.testing.assert_close(result, unfused)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="approximate"):
        FusedElementwise().gelu(approximate="fast")
    with pytest.raises(TypeError, match="other"):
        FusedElementwise().add("one")
    with pytest.raises(TypeError, match="other"):
        FusedElementwise().add()
    with pytest.raises(TypeError, match="beta"):
        FusedElementwise().relu(beta=1)
    with pytest.raises(ValueError, match="p must be"):
        FusedElementwise().dropout(1.5)
    with pytest.raises(RuntimeError, match="empty"):
        FusedElementwise()(torch.randn(2))


def test_dropout_chain_compiles_whole_and_exports_in_eval():
    chain = FusedElementwise().add(1.0).mul(2.0).dropout(0.5).relu()
    x = torch.ones(8, 8, requires_grad=True)
    out = torch.compile(chain, backend="eager", fullgraph=True)(x)
    assert set(out.detach().unique().tolist()) == {0.0, 8.0}
    out.sum().backward()
    assert set(x.grad.unique().tolist()) == {0.0, 4.0}  # 2 x 1/(1-p) where kept
    exported = torch.export.export(chain.eval(), (x.detach(),))
    assert [str(n.target) for n in exported.graph.nodes if n.op == "call_function"] == ["kitsune.fused_chain.default"]
