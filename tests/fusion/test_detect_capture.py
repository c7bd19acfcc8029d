"""FusionDetector().detect(model, x) captures through Dynamo without disturbing
other compiled models: no torch._dynamo.reset(), no reuse of their compiled code."""
import torch
import torch.nn.functional as F
from torch import nn

from kitsune.fusion import FusionDetector


class CountingBackend:
    """A Dynamo backend that counts its compiles and runs the graph as captured."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.gelu(self.fc(x)) * 2


def test_detect_leaves_other_compiled_models_alone():
    backend = CountingBackend()
    model = Mlp()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = compiled(x)
        assert backend.compiles == 1
        # another model, and the same class (whose forward the compiled model's cache is keyed on)
        other = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        assert [o.pattern for o in FusionDetector().detect(other, x)] == ["linear_activation"]
        opps = FusionDetector().detect(Mlp(), x)
        assert {o.pattern for o in opps} >= {"linear_activation"}
        again = compiled(x)
    assert backend.compiles == 1  # no recompile: the first compile is still in place
    torch.testing.assert_close(again, expected)


def test_detect_twice_on_the_compiled_model_itself():
    backend = CountingBackend()
    model = Mlp()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 8)
    with torch.no_grad():
        compiled(x)
        for _ in range(10):  # more than Dynamo's recompile limit: every capture still sees the graph
            assert {o.pattern for o in FusionDetector().detect(model, x)} >= {"linear_activation"}
        compiled(x)
    assert backend.compiles == 1
