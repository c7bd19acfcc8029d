"""torch.compile(m, backend="kitsune", mode=..., options={...}): every FusionConfig
field by name, the modes, and clear errors for anything else (kitsune.backend)."""
import dataclasses

import pytest
import torch

import kitsune
import kitsune.backend
from kitsune.backend import MODES, apply_compile_options, make_backend
from kitsune.config import FusionConfig


def model(x):
    return (torch.relu(x) * 2 + 1).sum(-1)


@pytest.fixture
def seen_configs(monkeypatch):
    """The FusionConfig each graph was compiled with: the seam between the Dynamo
    backend and the compiler (kitsune.backend.compile_graph), called through."""
    seen = []
    real = kitsune.backend.compile_graph

    def spy(gm, example_inputs, kind, config=None, **kwargs):
        seen.append(config)
        return real(gm, example_inputs, kind, config=config, **kwargs)
    monkeypatch.setattr(kitsune.backend, "compile_graph", spy)
    return seen


def _run(compiled):
    x = torch.randn(4, 16)
    torch.testing.assert_close(compiled(x), model(x))


def test_options_reach_the_config_the_compiler_uses(seen_configs):
    _run(torch.compile(model, backend="kitsune", options={"max_fusion_size": 3, "cuda_graphs": False,
                                                          "enabled_patterns": ["elementwise_chain"]}))
    (config,) = seen_configs
    assert config.max_fusion_size == 3 and config.cuda_graphs is False
    assert config.enabled_patterns == frozenset({"elementwise_chain"})
    assert config.min_fusion_benefit == FusionConfig().min_fusion_benefit  # the rest stays default


def test_options_change_what_is_fused():
    kitsune.reset_fusion_stats()
    _run(torch.compile(model, backend="kitsune"))
    assert kitsune.get_fusion_stats()["num_fused"] >= 1
    torch._dynamo.reset()
    kitsune.reset_fusion_stats()
    _run(torch.compile(model, backend="kitsune", options={"enable_elementwise": False, "enable_reduction": False}))
    stats = kitsune.get_fusion_stats()
    assert stats["graphs"] == 1 and stats["num_fused"] == 0


def test_every_config_field_is_an_option():
    for field in dataclasses.fields(FusionConfig):
        value = getattr(FusionConfig(), field.name)
        assert apply_compile_options(options={field.name: value}) == FusionConfig()


def test_unknown_option_names_it_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'anything'.*max_fusion_size.*custom_patterns"):
        apply_compile_options(options={"max_fusion_size": 4, "anything": 1})
    with pytest.raises(Exception, match=r"ValueError: unknown kitsune compile option\(s\) 'anything'"):
        torch.compile(model, backend="kitsune", options={"anything": 1})(torch.randn(4, 16))


@pytest.mark.parametrize("options,error", [({"max_fusion_size": "8"}, TypeError), ({"cuda_graphs": 1}, TypeError),
                                           ({"max_fusion_size": 0}, ValueError), ({"measure": "yes"}, TypeError)])
def test_bad_option_values_name_the_field(options, error):
    (field,) = options
    with pytest.raises(error, match=f"FusionConfig.{field}"):
        apply_compile_options(options=options)
    with pytest.raises(TypeError, match="options.*dict"):
        apply_compile_options(options=[("max_fusion_size", 4)])


@pytest.mark.parametrize("mode", list(MODES))
def test_modes_map_to_config_fields(mode, seen_configs):
    _run(torch.compile(model, backend="kitsune", mode=mode))
    (config,) = seen_configs
    autotune = mode.startswith("max-autotune")
    assert config.measure is autotune
    assert config.cuda_graphs is (mode != "max-autotune-no-cudagraphs")
    if mode in ("default", "reduce-overhead"):
        assert config == FusionConfig()


def test_max_autotune_turns_on_measured_decisions():
    from kitsune.tuning.measure import measuring
    assert not measuring(apply_compile_options(mode="default"))
    assert measuring(apply_compile_options(mode="max-autotune"))
    assert measuring(apply_compile_options(mode="max-autotune-no-cudagraphs"))


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'fastest'.*default, reduce-overhead, max-autotune, "
                                         r"max-autotune-no-cudagraphs"):
        apply_compile_options(mode="fastest")
    with pytest.raises(ValueError, match="'fastest'"):
        kitsune.optimize(model, mode="fastest")


def test_make_backend_applies_options_over_its_config(seen_configs):
    base = FusionConfig(max_fusion_size=5, min_tensor_size=7)
    _run(torch.compile(model, backend=make_backend(base), options={"min_tensor_size": 0}))
    (config,) = seen_configs
    assert (config.max_fusion_size, config.min_tensor_size) == (5, 0)


def test_optimize_checks_at_once_and_takes_mode_and_options_together(seen_configs):
    with pytest.raises(ValueError, match="'max_fuse'"):
        kitsune.optimize(model, options={"max_fuse": 2})  # raised here, before any call
    assert seen_configs == []
    _run(kitsune.optimize(model, FusionConfig(min_tensor_size=3), mode="max-autotune-no-cudagraphs",
                          options={"max_fusion_size": 2}))
    (config,) = seen_configs
    assert (config.measure, config.cuda_graphs, config.max_fusion_size, config.min_tensor_size) == (True, False, 2, 3)


def test_fusion_engine_takes_mode_and_options(monkeypatch):
    from kitsune.fusion import FusionEngine

    engine = FusionEngine(config=FusionConfig(min_tensor_size=5))
    seen = []
    real = engine._compile_graph
    monkeypatch.setattr(engine, "_compile_graph", lambda gm, inputs, kind, config: seen.append(config) or
                        real(gm, inputs, kind, config))
    with pytest.raises(ValueError, match="'bogus'"):
        engine.fuse(model, options={"bogus": 1})  # raised here, before any call
    _run(engine.fuse(model, options={"max_fusion_size": 2}))
    _run(engine.fuse(model, mode="max-autotune-no-cudagraphs"))
    assert [(c.max_fusion_size, c.min_tensor_size, c.measure, c.cuda_graphs) for c in seen] == \
        [(2, 5, False, True), (8, 5, True, False)]
