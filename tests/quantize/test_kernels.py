"""The Triton kernels of the quantized matmul (kitsune.quantize.kernels) through Triton's
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), tiny shapes: each
form (gemv, split-K, tiled) and the dequantise kernel against the PyTorch path."""
import pytest
import torch
import triton
import triton.language as tl

from kitsune.quantize import dispatch, kernels
from kitsune.quantize.kernels import QuantConfig
from kitsune.quantize.packing import quantize_rtn

# K not a multiple of the group, the byte or the tile; N not a multiple of the tile
N, K = 19, 75


def _case(bits, symmetric, group, dtype=torch.float32, rows=1, bias=True, k=K):
    torch.manual_seed(bits * 7 + rows)
    q = quantize_rtn(torch.randn(N, k), bits, group, symmetric)
    x = torch.randn(rows, k).to(dtype)
    b = torch.randn(N) if bias else None
    return x, (q.codes, q.scales, q.zeros, None if b is None else b.to(dtype), bits, group, k)


def _check(x, args, activation, config):
    got = dispatch.triton_quantized_linear(x, *args, activation, config=config)
    want = dispatch.torch_quantized_linear(x, *args, activation)
    assert got.dtype == x.dtype and got.shape == want.shape
    if x.dtype == torch.float32:
        # float32 summation order: a few ulps of the largest term
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(1.0, want.abs().max().item()) * 4)
    else:  # the same weights in another summation order: one rounding of the result apart
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * torch.finfo(x.dtype).eps, atol=1e-2)


GEMV = QuantConfig("gemv", block_m=1, block_n=16, block_k=32, split_k=1)
GEMV_SPLIT = QuantConfig("gemv", block_m=1, block_n=8, block_k=16, split_k=3)
SPLITK = QuantConfig("splitk", block_m=16, block_n=16, block_k=64, split_k=2)
TILED = QuantConfig("tiled", block_m=16, block_n=16, block_k=64, split_k=1)
SPLITK_INTERLEAVED = QuantConfig("splitk", block_m=16, block_n=16, block_k=64, split_k=2, interleave=True)
TILED_INTERLEAVED = QuantConfig("tiled", block_m=16, block_n=16, block_k=64, split_k=1, interleave=True)


@pytest.mark.parametrize("bits,symmetric,group,config,rows,activation", [
    (4, False, 16, GEMV, 1, "gelu"),          # one group a tile (16 % 32 != 0: gathered scales)
    (4, True, 32, GEMV, 1, "none"),           # a tile in one group, symmetric
    (2, False, 25, GEMV_SPLIT, 1, "silu"),    # split-K partials + the epilogue kernel
    (8, True, 16, GEMV_SPLIT, 1, "relu"),
    (4, False, 32, SPLITK, 5, "relu"),        # tl.dot form for few rows, split over K
    (2, True, 64, TILED, 21, "none"),         # the tiled form, rows past one tile
    (8, False, 128, TILED, 17, "gelu"),       # a group wider than K
    (4, False, 16, SPLITK_INTERLEAVED, 3, "silu"),   # sub-tiles interleaved back into one tile
    (2, False, 25, SPLITK_INTERLEAVED, 2, "none"),
    (4, True, 64, TILED_INTERLEAVED, 18, "relu"),
])
def test_kernel_forms_float32(bits, symmetric, group, config, rows, activation):
    x, args = _case(bits, symmetric, group, rows=rows)
    _check(x, args, activation, config)


@pytest.mark.parametrize("bits,config,rows", [(4, GEMV, 1), (2, GEMV_SPLIT, 1), (4, SPLITK_INTERLEAVED, 3),
                                              (8, TILED, 17), (4, TILED_INTERLEAVED, 20)])
def test_whole_tiles_along_k(bits, config, rows):
    """K = 128: every tile whole along K (EVEN_K: the loads without a K mask)."""
    x, args = _case(bits, False, 32, torch.bfloat16, rows=rows, k=128)
    _check(x, args, "gelu", config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config,rows", [(GEMV_SPLIT, 1), (TILED_INTERLEAVED, 18)])
def test_kernel_low_precision(dtype, config, rows):
    x, args = _case(4, False, 16, dtype, rows=rows)
    _check(x, args, "gelu", config)


def test_default_configs_and_no_bias():
    for rows in (1, 3, 20):
        x, args = _case(4, False, 32, rows=rows, bias=False)
        _check(x, args, "none", None)


@pytest.mark.parametrize("bits,symmetric,dtype", [(4, False, torch.bfloat16), (2, True, torch.float16),
                                                  (8, False, torch.float32)])
def test_dequantize_kernel_is_exact(bits, symmetric, dtype):
    _, (codes, scales, zeros, _, bits, group, k) = _case(bits, symmetric, 16)
    got = dispatch.triton_dequantize(codes, scales, zeros, bits, group, k, dtype)
    assert torch.equal(got, dispatch.dequantize(codes, scales, zeros, bits, group, k, dtype))


def test_signed_int8_codes():
    codes = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    scales = torch.rand(N, 1) * 0.1
    x = torch.randn(2, K)
    args = (codes, scales, None, None, 8, K, K)
    _check(x, args, "none", SPLITK)


def test_candidate_tiles_fit_the_group():
    """A tile's columns stay within one group where a power of two divides it (one scale a row)."""
    for bits, group in ((4, 128), (2, 64), (8, 32)):
        for config in dispatch._small_configs(1, 4096, 4096 // (8 // bits), bits, group, 132) + \
                dispatch._small_configs(8, 4096, 4096 // (8 // bits), bits, group, 132) + \
                dispatch._tiled_configs(300, bits, group):
            assert group % config.block_k == 0, (bits, group, config)
            assert config.block_k // (8 // bits) >= (1 if config.block_m == 1 else 16)
    assert dispatch._fit_group(128, 100, 16) == 128  # no power of two >= 16 divides 100: gathered scales


def test_config_validation():
    with pytest.raises(ValueError, match="form"):
        QuantConfig("wide")
    with pytest.raises(ValueError, match="block_n"):
        QuantConfig("gemv", block_n=24)


def test_choice_is_measured_once_and_cached(monkeypatch):
    """`dispatch.choose` times every candidate once per key and keeps the fastest; without a
    measurement the rule is the first candidate, and dequantise + cuBLAS from DEQUANT_MIN_ROWS rows."""
    monkeypatch.setattr(dispatch, "CHOICES", {})
    monkeypatch.setattr(dispatch, "TIMES", {})
    x, args = _case(4, False, 16, rows=20)
    full = (x, *args, "relu")
    assert dispatch.choose(full) == ("triton", dispatch._tiled_configs(20, 4, 16)[0])
    big = (torch.randn(300, K), *args, "relu")
    assert dispatch.choose(big) == ("dequant", None)
    assert dispatch.CHOICES == {}  # nothing measured, nothing cached

    calls = []
    candidates = len(dispatch._tiled_configs(20, 4, 16)) + 1

    def fake_bench(fn):
        calls.append(fn)
        return 1.0 if len(calls) == candidates else 2.0  # the last candidate (dequantise + cuBLAS) wins
    monkeypatch.setattr(dispatch, "_can_measure", lambda device: True)
    monkeypatch.setattr(dispatch, "_bench_ms", fake_bench)
    assert dispatch.choose(full) == ("dequant", None)
    assert len(calls) == candidates and dispatch.choose((torch.randn(31, K), *args, "relu")) == ("dequant", None)
    assert len(calls) == candidates  # 31 rows share the key of 20 (32 as a power of two)
    assert list(dispatch.TIMES.values())[0]["dequantise + cuBLAS"] == 1.0
    torch.testing.assert_close(dispatch.gpu_quantized_linear(*full), dispatch.torch_quantized_linear(*full))


def test_the_op_runs_the_kernels_and_falls_back(monkeypatch, caplog):
    """kitsune::quantized_linear through the Triton path (CPU tensors in the interpreter), and
    the PyTorch path with one warning when a kernel fails."""
    from kitsune.quantize import ops
    monkeypatch.setattr(ops, "TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "CHOICES", {})
    x, args = _case(2, False, 16, rows=3)
    codes, scales, zeros, bias, bits, group, k = args
    x = x.reshape(1, 3, K).expand(2, 3, K)  # leading dims, a stride-0 batch
    got = ops.quantized_linear_op(x, codes, scales, zeros, bias, bits, group, k, "gelu")
    assert got.shape == (2, 3, N) and dispatch.CHOICES == {}  # the CPU is never measured
    torch.testing.assert_close(got, dispatch.torch_quantized_linear(x, *args, "gelu"), rtol=1e-5, atol=1e-5)

    def broken(*_):
        raise RuntimeError("no kernel today")
    monkeypatch.setattr(dispatch, "gpu_quantized_linear", broken)
    with caplog.at_level("WARNING", logger="kitsune"):
        for _ in range(2):
            again = ops.quantized_linear_op(x, codes, scales, zeros, bias, bits, group, k, "gelu")
    torch.testing.assert_close(again, dispatch.torch_quantized_linear(x, *args, "gelu"))
    assert sum("no kernel today" in r.getMessage() for r in caplog.records) == 1


@triton.jit
def _round_kernel(x_ptr, out_ptr, DTYPE: tl.constexpr):
    offs = tl.arange(0, 1024)
    tl.store(out_ptr + offs, kernels._rounded_f32(tl.load(x_ptr + offs), DTYPE))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_by_integer_ops_is_round_to_nearest_even(dtype):
    x = torch.randn(1024) * torch.logspace(-30, 30, 1024)
    x[:4] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 0.0])  # ties: to even
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    out = torch.empty_like(x)
    _round_kernel[(1,)](x, out, DTYPE=kernels._TL_DTYPES[dtype])
    assert torch.equal(out, x.to(dtype).float())
