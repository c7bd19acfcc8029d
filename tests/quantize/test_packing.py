"""RTN packing (kitsune.quantize.packing): pack/unpack round trips for int8/int4/int2 at odd
sizes, the dequantisation formula, and the RTN error bounds."""
import pytest
import torch

from kitsune.quantize.packing import (dequantize, num_groups, pack, per_byte, quantize_rtn, unpack)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (5, 130), (2, 3)])
def test_pack_unpack_round_trip(bits, rows, cols):
    codes = torch.randint(0, 2 ** bits, (rows, cols), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, -(-cols // per_byte(bits)))
    assert torch.equal(unpack(packed, bits, cols), codes)


def test_int4_layout_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x03]]
    assert pack(torch.tensor([[1, 2, 3, 0, 1]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0b01]]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("cols,group", [(75, 16), (128, 128), (100, 128), (33, 1)])
def test_quantize_then_dequantize_is_within_half_a_step(bits, symmetric, cols, group):
    w = torch.randn(9, cols)
    q = quantize_rtn(w, bits, group, symmetric)
    assert q.scales.shape == (9, num_groups(cols, group)) and q.scales.dtype == torch.float32
    assert (q.zeros is None) == symmetric
    deq = q.dequantize()
    assert deq.shape == w.shape and deq.dtype == w.dtype
    cols_group = torch.arange(cols) // group
    step = q.scales[:, cols_group]
    # every value inside its group's range is within half a step (RTN); symmetric clips nothing
    assert ((deq - w).abs() <= 0.5 * step * (1 + 1e-5) + 1e-7).all()
    # quantising the dequantised weight again gives it back (up to the float rounding of the scales)
    again = quantize_rtn(deq, bits, group, symmetric)
    torch.testing.assert_close(again.dequantize(), deq, rtol=0, atol=1e-4 * step.max().item())


def test_dequantize_formula_by_hand():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0, 3.0]])
    q = quantize_rtn(w, 4, 4, symmetric=False)
    codes = unpack(q.codes, 4, 5).float()
    scale = q.scales[:, [0, 0, 0, 0, 1]]
    zero = q.zeros[:, [0, 0, 0, 0, 1]]
    torch.testing.assert_close(q.dequantize(), (codes - zero) * scale, rtol=0, atol=0)
    # the group of [3.0] alone: range [0, 3], zero point 0, code 15
    assert q.zeros[0, 1].item() == 0 and codes[0, 4].item() == 15


def test_zero_group_and_low_precision_scales():
    w = torch.zeros(2, 10)
    w[1, 5:] = torch.randn(5)
    for symmetric in (False, True):
        q = quantize_rtn(w.to(torch.bfloat16), 4, 5, symmetric)
        assert q.scales.dtype == torch.bfloat16
        deq = q.dequantize()
        assert torch.equal(deq[0], torch.zeros(10, dtype=torch.bfloat16)) and torch.equal(deq[1, :5], deq[0, :5])
        assert (deq.float()[1, 5:] - w[1, 5:]).abs().max() <= 0.5 * q.scales[1, 1].float() * 1.01


def test_rtn_error_shrinks_with_bits():
    """The RTN error of int8/int4/int2 (group 128) against the float weight, as a fraction of
    the weight's RMS: bounded by the uniform-rounding estimate step / sqrt(12)."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    errors = {}
    for bits in (8, 4, 2):
        q = quantize_rtn(w, bits, 128, symmetric=bits == 8)
        errors[bits] = ((q.dequantize() - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
        step = q.scales.mean().item()
        assert errors[bits] <= 1.2 * step / 12 ** 0.5 / w.pow(2).mean().sqrt().item()
    print("RTN relative RMS error (group 128):", {f"int{b}": round(e, 4) for b, e in errors.items()})
    assert errors[8] < 0.01 < errors[4] < 0.2 < errors[2] < 0.6


@pytest.mark.parametrize("bad, message", [
    (dict(bits=3), "bits"), (dict(group_size=0), "group_size"), (dict(group_size=2.5), "group_size")])
def test_bad_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        quantize_rtn(torch.randn(2, 4), **{"bits": 4, "group_size": 2, **bad})


def test_bad_weights():
    with pytest.raises(ValueError, match="weight"):
        quantize_rtn(torch.randn(4), 4, 2)
    with pytest.raises(ValueError, match="NaN"):
        quantize_rtn(torch.tensor([[1.0, float("nan")]]), 4, 2)
    with pytest.raises(ValueError, match="in_features"):
        quantize_rtn(torch.randn(3, 0), 4, 2)


def test_signed_int8_codes_dequantize_as_signed():
    codes = torch.tensor([[-3, 4]], dtype=torch.int8)
    out = dequantize(codes, torch.tensor([[0.5]]), None, 8, 2, 2)
    assert out.tolist() == [[-1.5, 2.0]]
