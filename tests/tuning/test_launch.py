"""LaunchChoices: validated, overridable for a block, read by the code generators."""
import threading

import pytest
import torch

from kitsune.codegen.kernel import KernelInput, KernelOutput, KernelSpec
from kitsune.codegen.triton.emit import emit_triton
from kitsune.ir.index import Index
from kitsune.ir.scalar import load, reduce
from kitsune.tuning.launch import LaunchChoices, launch_choices, override_launch_choices


def _row_sum(rows=4, R=64) -> KernelSpec:
    x = load(0, Index.var(), torch.float32)
    return KernelSpec("k", rows * R, (KernelInput("in0", torch.float32),),
                      (KernelOutput("out0", torch.float32, Index.var().floordiv(R), reduce("sum", x)),),
                      reduction=R)


def test_override_applies_inside_the_block_and_restores():
    default = launch_choices()
    assert default == LaunchChoices()
    with override_launch_choices(persistent_max=8, looped_warps=2) as inside:
        assert launch_choices() is inside
        assert (inside.persistent_max, inside.looped_warps) == (8, 2)
        assert inside.looped_rblock == default.looped_rblock
        with override_launch_choices(looped_warps=8):  # nested: on top of the outer override
            assert (launch_choices().persistent_max, launch_choices().looped_warps) == (8, 8)
        assert launch_choices() is inside
    assert launch_choices() == default


def test_override_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with override_launch_choices(outer_tile=64):
            raise RuntimeError("boom")
    assert launch_choices() == LaunchChoices()


def test_override_is_seen_by_other_threads():
    # kernels are compiled on threads the caller does not own (autograd's, a build pool)
    seen = []
    with override_launch_choices(cpu_split_block=64):
        thread = threading.Thread(target=lambda: seen.append(launch_choices().cpu_split_block))
        thread.start()
        thread.join()
    assert seen == [64]


def test_the_emitters_read_the_current_choices():
    spec = _row_sum()
    persistent = emit_triton(spec, "k")
    assert "persistent" in persistent
    with override_launch_choices(persistent_max=16, looped_rblock=16):
        looped = emit_triton(spec, "k")
    assert "looped" in looped and "RBLOCK=16" in looped
    assert emit_triton(spec, "k") == persistent


@pytest.mark.parametrize("field, value", [
    ("persistent_max", 1000),      # not a power of two
    ("looped_warps", 64),          # too many warps
    ("outer_warps", 3),
    ("split_min_programs", 0),     # a count
    ("few_rows", -1),              # a threshold
    ("max_xblock", 2.0),           # not an int
    ("cpu_parallel_threshold", True),
])
def test_a_bad_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LaunchChoices(**{field: value})
    with pytest.raises(ValueError, match=field):
        with override_launch_choices(**{field: value}):
            pass
    assert launch_choices() == LaunchChoices()


def test_an_unknown_field_raises_naming_it():
    with pytest.raises(TypeError, match="persistant_max"):
        with override_launch_choices(persistant_max=8):
            pass


def test_inconsistent_tile_bounds_raise():
    with pytest.raises(ValueError, match="cpu_outer_tile_min"):
        LaunchChoices(cpu_outer_tile_min=512, cpu_outer_tile_max=256)


def test_optional_warps_accept_none():
    assert LaunchChoices(outer_warps=None).outer_warps is None
    assert LaunchChoices(outer_warps=16).outer_warps == 16
