"""FusionConfig: every field, its default and its validation."""
import pytest

from kitsune.fusion import FusionConfig, FusionPattern

DEFAULTS = dict(enable_elementwise=True, enable_reduction=True, enable_matmul=False, max_fusion_size=8,
                min_fusion_benefit=1.1, measure=False, min_tensor_size=0, cpu_fusion=True, gpu_fusion=True,
                cuda_graphs=True, enabled_patterns=None, custom_patterns=(), measure_budget_s=30.0,
                graph_cache=True)


def test_defaults_match_spec_01():
    from dataclasses import fields
    config = FusionConfig()
    assert {f.name for f in fields(FusionConfig)} == set(DEFAULTS)  # a new field needs a test here
    for name, value in DEFAULTS.items():
        assert getattr(config, name) == value, name


def test_spec_01_example_constructs():
    config = FusionConfig(enable_elementwise=True, enable_reduction=True, enable_matmul=False,
                          max_fusion_size=8, min_fusion_benefit=1.2)
    assert config.min_fusion_benefit == 1.2


@pytest.mark.parametrize("field", ["enable_elementwise", "enable_reduction", "enable_matmul", "cpu_fusion",
                                   "gpu_fusion", "cuda_graphs", "measure", "graph_cache"])
def test_bool_fields_reject_non_bools(field):
    with pytest.raises(TypeError, match=field):
        FusionConfig(**{field: 1})
    assert getattr(FusionConfig(**{field: not DEFAULTS[field]}), field) is (not DEFAULTS[field])


@pytest.mark.parametrize("field,bad_value,error", [
    ("max_fusion_size", 0, ValueError), ("max_fusion_size", -3, ValueError), ("max_fusion_size", 2.5, TypeError),
    ("max_fusion_size", True, TypeError), ("min_fusion_benefit", 0.9, ValueError),
    ("min_fusion_benefit", float("nan"), ValueError),
    ("min_fusion_benefit", "1.2", TypeError), ("min_tensor_size", -1, ValueError),
    ("min_tensor_size", 1.0, TypeError), ("measure_budget_s", -1.0, ValueError),
    ("measure_budget_s", float("nan"), ValueError), ("measure_budget_s", "5", TypeError),
])
def test_numeric_fields_validate_and_name_the_field(field, bad_value, error):
    with pytest.raises(error, match=field):
        FusionConfig(**{field: bad_value})


def test_numeric_fields_accept_valid_values():
    config = FusionConfig(max_fusion_size=1, min_fusion_benefit=1, min_tensor_size=1024)
    assert (config.max_fusion_size, config.min_fusion_benefit, config.min_tensor_size) == (1, 1, 1024)


def test_enabled_patterns_validated():
    config = FusionConfig(enabled_patterns=["softmax", "elementwise_chain"])
    assert config.enabled_patterns == frozenset({"softmax", "elementwise_chain"})
    assert config.pattern_enabled("softmax") and not config.pattern_enabled("attention")
    assert FusionConfig().pattern_enabled("attention")
    with pytest.raises(ValueError, match="enabled_patterns.*'no_such_pattern'"):
        FusionConfig(enabled_patterns=["softmax", "no_such_pattern"])
    with pytest.raises(TypeError, match="enabled_patterns"):
        FusionConfig(enabled_patterns="softmax")
    with pytest.raises(TypeError, match="enabled_patterns"):
        FusionConfig(enabled_patterns=[3])


def test_custom_patterns_validated_and_enableable():
    mine = FusionPattern(name="mine", ops=["add", "relu"])
    config = FusionConfig(custom_patterns=[mine], enabled_patterns=["mine"])
    assert config.custom_patterns == (mine,) and config.pattern_enabled("mine")
    with pytest.raises(TypeError, match="custom_patterns"):
        FusionConfig(custom_patterns=["add"])
    with pytest.raises(TypeError, match="custom_patterns"):
        FusionConfig(custom_patterns=mine)
    with pytest.raises(ValueError, match="custom_patterns.*already"):
        FusionConfig(custom_patterns=[mine, FusionPattern(name="mine", ops=["mul"])])
    with pytest.raises(ValueError, match="built-in"):
        FusionConfig(custom_patterns=[FusionPattern(name="softmax", ops=["softmax"])])


def test_pattern_validation_names_the_field():
    with pytest.raises(ValueError, match="ops"):
        FusionPattern(name="empty", ops=[])
    with pytest.raises(ValueError, match=r"ops\[1\].*'frobnicate'"):
        FusionPattern(name="bad", ops=["add", "frobnicate"])
    with pytest.raises(TypeError, match="ops"):
        FusionPattern(name="str_ops", ops="add")
    with pytest.raises(ValueError, match="optional"):
        FusionPattern(name="all_optional", ops=["dropout?"])
    with pytest.raises(ValueError, match="fusion_type"):
        FusionPattern(name="kind", ops=["add"], fusion_type="magic")
    with pytest.raises(TypeError, match="name"):
        FusionPattern(name="", ops=["add"])
    with pytest.raises(TypeError, match="replacement"):
        FusionPattern(name="r", ops=["add"], replacement=3)
    pattern = FusionPattern(name="custom_activation", ops=["linear", "relu", "dropout"], fusion_type="elementwise")
    assert pattern.ops == ("linear", "relu", "dropout")
    assert FusionPattern(name="a", ops=["mm", "truediv", "relu?"]).steps() == [
        ("matmul", False), ("div", False), ("relu", True)]
