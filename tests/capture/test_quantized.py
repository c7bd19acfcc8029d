"""kitsune.capture.quantized under torch.compile: a QuantizedLinear stays one
`kitsune::quantized_linear` call and reports the quantized_matmul pattern applied, an
activation after it joins its epilogue, and a hand-written per-row int8 dequantise ->
linear becomes the op; anything else stays as written, with the reason."""
import torch
import torch.nn.functional as F
from torch import nn

import kitsune
from kitsune.quantize import ops  # noqa: F401 - registers kitsune::quantized_linear
from kitsune.record import default_sink
from kitsune.report.analysis import finalize

OP = torch.ops.kitsune.quantized_linear.default


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 32)
        self.lm_head = nn.Linear(32, 11)

    def forward(self, x):
        return self.lm_head(self.down(F.gelu(self.up(x))) + x)


class HandWritten(nn.Module):
    """An int8 weight dequantised by hand: `form` picks the per-row form or one the rewrite declines."""

    def __init__(self, form="asymmetric"):
        super().__init__()
        self.form = form
        codes = torch.randint(0, 256, (12, 20), dtype=torch.uint8) if form == "uint8" else \
            torch.randint(-128, 128, (12, 20), dtype=torch.int8)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", torch.rand(12, 1) * 0.05 + 0.01)
        self.register_buffer("zero", torch.randn(12, 1).round())
        self.bias = nn.Parameter(torch.randn(12))

    def forward(self, x):
        if self.form == "asymmetric":
            weight = (self.codes.float() - self.zero) * self.scale
        elif self.form == "uint8":
            weight = self.codes.float() * self.scale
        elif self.form == "bf16":
            weight = ((self.codes.float() - self.zero) * self.scale).to(torch.bfloat16)
        else:  # one scale per column: not the op's layout
            weight = self.codes.float() * self.scale.reshape(1, -1)[:, :1].expand(1, 20)
        return F.relu(F.linear(x, weight, self.bias.to(weight.dtype)))


def _compiled(model, **options):
    default_sink().reset()
    return torch.compile(model, backend="kitsune", options=options or None)


def _opportunities():
    found = []
    for record in default_sink().records():
        finalize(record)
        found += [o for o in record.opportunities if o.pattern.startswith("quantized")]
    return found


def _op_calls():
    return sum(1 for r in default_sink().records() for n in r.graph.nodes if n.target is OP)


def test_quantized_linear_is_one_call_and_applied():
    model = kitsune.quantize(Tiny(), bits=4, group_size=16)
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = model(x)
        got = _compiled(model)(x)
    torch.testing.assert_close(got, want)
    assert _op_calls() == 2
    found = {(o.pattern, o.status, o.ops) for o in _opportunities()}
    assert ("quantized_matmul_activation", "applied", ("dequantize", "matmul", "add", "gelu")) in found
    assert ("quantized_matmul", "applied", ("dequantize", "matmul", "add")) in found
    choices = [o.choice for o in _opportunities()]
    assert all("PyTorch path on cpu" in c for c in choices), choices


def test_training_graph_gradients():
    model = kitsune.quantize(Tiny(), bits=4, group_size=16)
    x = torch.randn(3, 32, requires_grad=True)
    _compiled(model)(x).sum().backward()
    x2 = x.detach().requires_grad_()
    model(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_hand_written_dequantize_becomes_the_op():
    for form in ("asymmetric", "uint8"):
        model = HandWritten(form)
        x = torch.randn(5, 20)
        with torch.no_grad():
            torch.testing.assert_close(_compiled(model)(x), model(x))
        assert _op_calls() == 1, form
        applied = [o for o in _opportunities() if o.status == "applied"]
        assert [o.pattern for o in applied] == ["quantized_matmul_activation"], applied  # the ReLU folded in
        assert applied[0].ops == ("dequantize", "matmul", "add", "relu") and "linear" in applied[0].nodes
        assert len(_opportunities()) == 1  # the op is not also taken for a float linear reading int8


def test_hand_written_bf16_cast_at_the_end():
    model = HandWritten("bf16")
    x = torch.randn(5, 20, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(_compiled(model)(x), model(x))
    assert _op_calls() == 1


def test_other_forms_stay_with_a_reason():
    model = HandWritten("per_column")
    x = torch.randn(5, 20)
    with torch.no_grad():
        torch.testing.assert_close(_compiled(model)(x), model(x))
    assert _op_calls() == 0
    declined = [o for o in _opportunities() if o.status == "not applied"]
    assert declined and "one value per output row" in declined[0].reason


def test_disabled_pattern_leaves_the_hand_written_form():
    model = HandWritten()
    x = torch.randn(5, 20)
    with torch.no_grad():
        torch.testing.assert_close(_compiled(model, enabled_patterns=["elementwise_chain"])(x), model(x))
    assert _op_calls() == 0


def test_inductor_compiles_the_op():
    """Inductor runs the op as an extern call (a graph of the op alone: no C++ to build)."""
    model = kitsune.quantize(nn.Sequential(nn.Linear(32, 16)), bits=2, group_size=8)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="inductor")(x), model(x))
