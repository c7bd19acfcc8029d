"""ReductionSchedule: the analysis both emitters lay out."""
import torch

from kitsune.codegen.kernel import KernelInput, KernelOutput, KernelSpec
from kitsune.codegen.schedule import ReductionSchedule
from kitsune.ir.index import Index
from kitsune.ir.scalar import load, reduce


def _centred(rows=4, R=32):
    """x - mean(x) per row (full output, stage 1), the mean (row output),
    2 * x (full output needing no reduction: early) and a per-row bias load."""
    x = load(0, Index.var(), torch.float32)
    bias = load(1, Index.var().floordiv(R), torch.float32)
    mean = reduce("sum", x) * (1.0 / R) + bias
    outputs = (KernelOutput("out0", torch.float32, Index.var(), x - mean),
               KernelOutput("out1", torch.float32, Index.var().floordiv(R), mean),
               KernelOutput("out2", torch.float32, Index.var(), x * 2.0))
    spec = KernelSpec("k", rows * R, (KernelInput("in0", torch.float32), KernelInput("in1", torch.float32)),
                      outputs, reduction=R)
    return spec, x, bias, mean


def test_row_values_stages_and_outputs():
    spec, x, bias, mean = _centred()
    s = ReductionSchedule.of(spec)
    assert bias in s.row and mean in s.row and x not in s.row
    assert s.max_stage == 1 and len(s.reductions) == 1
    assert s.stage[x] == 0 and s.stage[mean] == 1
    assert [o.name for o in s.row_outputs] == ["out1"]
    assert [o.name for o in s.full_outputs] == ["out0", "out2"]
    assert [o.name for o in s.early_outputs] == ["out2"]
    assert [o.name for o in s.late_outputs] == ["out0"]
    assert s.row_stage_values(1) == [v for v in s.values if v in s.row and v.op != "reduce" and s.stage[v] == 1]
    assert not s.outer
    assert ReductionSchedule.of(spec) is s  # computed once per spec


def test_a_column_sum_is_an_outer_layout():
    rows, R = 16, 8  # x = c * R + n read at n * rows + c: adjacent rows are adjacent in memory
    index = Index.var().mod(R) * rows + Index.var().floordiv(R)
    x = load(0, index, torch.float32)
    spec = KernelSpec("k", rows * R, (KernelInput("in0", torch.float32),),
                      (KernelOutput("out0", torch.float32, Index.var().floordiv(R), reduce("sum", x)),), reduction=R)
    assert ReductionSchedule.of(spec).outer
