"""No decomposition leftovers at run time: whatever a compiled graph runs through
PyTorch is aten ops, never `prims.*` (each costs a trip through Python: 140 µs for a
`prims.broadcast_in_dim` against 1.7 µs for the `unsqueeze` it stands for), whether
the graph fused, fused nothing, or fell back, with static or dynamic shapes.

What runs is recorded with a `TorchDispatchMode` (generated kernels are invisible to
it; every op PyTorch runs passes through it), so the check holds however the
runtime lays out the compiled graph."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kitsune
import kitsune.backend
import kitsune.compiler
from kitsune.capture.restore import is_prim
from kitsune.config import FusionConfig


class _OpsRun(TorchDispatchMode):
    """Records the top-level ops dispatched (those PyTorch runs for the graph)."""

    def __init__(self, ops: list):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


class _Capture:
    """The prims in the aten graphs capture hands Kitsune (`seen`: so a test knows
    there were leftovers to remove), and a recorder of what the compiled graphs run
    (entered inside them: Dynamo runs a frame eagerly under an outer dispatch mode)."""

    def __init__(self):
        self.seen, self.ran, self.recording = [], [], False

    def wrap(self, compiled):
        def run(*args):
            if not self.recording:
                return compiled(*args)
            with _OpsRun(self.ran):
                return compiled(*args)
        return run

    def prims_run(self, compiled, *inputs, backward=False):
        """The prims PyTorch runs in a call of `compiled` (after a first call that compiles)."""
        def step():
            out = compiled(*inputs)
            out = getattr(out, "logits", out)
            if backward:
                out.float().sum().backward()
        step()
        self.recording = True
        try:
            step()
        finally:
            self.recording = False
        assert self.ran, "nothing was recorded"
        return [str(op) for op in self.ran if getattr(op, "namespace", None) == "prims"]


@pytest.fixture
def capture(monkeypatch):
    found = _Capture()
    compile_graph = kitsune.backend.compile_graph

    def spy(gm, *args, **kwargs):
        found.seen.extend(str(n.target) for n in gm.graph.nodes if is_prim(n))
        return found.wrap(compile_graph(gm, *args, **kwargs))
    monkeypatch.setattr(kitsune.backend, "compile_graph", spy)
    kitsune.reset_fusion_stats()
    return found


class LayerNorm2d(torch.nn.LayerNorm):
    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(torch.nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.dwconv = torch.nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = torch.nn.Linear(dim, 4 * dim)
        self.pwconv2 = torch.nn.Linear(4 * dim, dim)
        self.gamma = torch.nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(F.gelu(self.pwconv1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


def _norms(x):
    """var, layer_norm and group_norm: all leave prims after capture."""
    return F.layer_norm(x, x.shape[-1:]) + x.var(-1, keepdim=True), F.group_norm(x, 2)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _channels_last(*shape):
    return torch.randn(*shape).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("dynamic, backward", [(False, True), (True, False)])
def test_convnext_block(capture, dynamic, backward):
    block = ConvNeXtBlock()
    x = _channels_last(2, 8, 5, 5)
    assert capture.prims_run(torch.compile(block, backend="kitsune", dynamic=dynamic), x, backward=backward) == []
    assert capture.seen  # layer_norm's var and sums: there were prims to remove


@pytest.mark.parametrize("dynamic", [False, True])
def test_channels_last_norm(capture, dynamic):
    with torch.no_grad():
        assert capture.prims_run(torch.compile(LayerNorm2d(6), backend="kitsune", dynamic=dynamic),
                          _channels_last(2, 6, 3, 5)) == []
    assert capture.seen


@pytest.mark.parametrize("dynamic", [False, True])
def test_gpt2(capture, dynamic):
    with torch.no_grad():
        assert capture.prims_run(torch.compile(_gpt2(), backend="kitsune", dynamic=dynamic),
                          torch.randint(0, 32, (2, 7))) == []
    assert capture.seen


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_graph_that_fuses_nothing(capture, dynamic):
    config = FusionConfig(cpu_fusion=False)  # decomposed as usual, then nothing generated
    assert capture.prims_run(kitsune.optimize(_norms, config, dynamic=dynamic), torch.randn(3, 4, 6)) == []
    assert capture.seen and kitsune.get_fusion_stats()["num_fused"] == 0


def test_groups_whose_build_fails(capture, monkeypatch):
    """Every kernel fails to build: the groups run their own ops, restored."""
    monkeypatch.setattr(kitsune.compiler, "build_kernels",
                        lambda backend, specs: [RuntimeError("no compiler") for _ in specs])
    assert capture.prims_run(torch.compile(_norms, backend="kitsune", dynamic=False), torch.randn(3, 4, 6)) == []
    assert capture.seen and kitsune.get_fusion_stats()["fallbacks"]


def test_the_recorder_sees_prims(capture, monkeypatch):
    """The checks above can fail: a compiled graph that runs a prim is seen running it."""
    monkeypatch.setattr(kitsune.compiler, "restore_aten", lambda gm: 0)
    with torch.no_grad():
        assert capture.prims_run(torch.compile(LayerNorm2d(6), backend="kitsune", dynamic=False),
                                 _channels_last(2, 6, 3, 5)) == []  # fused: nothing left
    assert "prims.broadcast_in_dim.default" in capture.prims_run(
        kitsune.optimize(_norms, FusionConfig(cpu_fusion=False), dynamic=False), torch.randn(3, 4, 6))
