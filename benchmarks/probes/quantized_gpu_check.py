# Unmaintained probe (issue 17 item 4): the quantized-matmul Triton kernels (kitsune.quantize.kernels).
#   python3 benchmarks/probes/quantized_gpu_check.py --offline   # no GPU needed: compile for sm_90 (Triton + ptxas)
#   python3 benchmarks/probes/quantized_gpu_check.py             # on a GPU: every candidate configuration of
#       every form against the PyTorch path (bf16/fp16/fp32, int8/int4/int2, odd sizes), then the measured choices
# Run it without TRITON_INTERPRET (the kernels read it at import).
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kitsune.quantize import dispatch, kernels  # noqa: E402
from kitsune.quantize.packing import quantize_rtn  # noqa: E402

TL = {tl.bfloat16: "*bf16", tl.float16: "*fp16", tl.float32: "*fp32"}


def offline() -> int:
    """Compile each form for sm_90 with Triton's compiler (no device needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    failures = 0
    for bits in (8, 4, 2):
        for form, block_m, interleave, split in (("gemv", 1, False, 4), ("splitk", 16, bits != 8, 2),
                                                  ("tiled", 128, False, 1), ("tiled", 64, bits != 8, 1)):
            for dtype, even_k in ((tl.bfloat16, True), (tl.float32, False), (tl.float16, True)):
                consts = dict(BITS=bits, GROUP=128, HAS_ZEROS=bits != 8, ZERO_CONST=128.0 if bits == 8 else 0.0,
                              HAS_BIAS=True, ACTIVATION="gelu", DTYPE=dtype, PRECISION="ieee", BLOCK_M=block_m,
                              BLOCK_N=64, BLOCK_J=128 // (8 // bits), SPLIT_K=split, ONE_GROUP=True,
                              PER_BYTE=8 // bits, INTERLEAVE=interleave, EVEN_K=even_k)
                sig = {"x_ptr": TL[dtype], "codes_ptr": "*u8", "scales_ptr": TL[dtype], "zeros_ptr": TL[dtype],
                       "bias_ptr": TL[dtype], "out_ptr": TL[dtype], "partial_ptr": "*fp32",
                       **{name: "i32" for name in ("M", "N", "K", "KP", "j_per_split", "stride_xm", "stride_cn",
                                                   "stride_sn", "stride_zn", "stride_om")},
                       **{name: "constexpr" for name in consts}}
                name = f"int{bits} {form} {block_m} rows {'interleaved ' if interleave else ''}{dtype} even_k={even_k}"
                names = list(sig)  # what the launcher specialises: pointers and these ints divisible by 16
                attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or
                         (even_k and n in ("K", "KP", "j_per_split", "stride_xm", "stride_cn"))}
                try:
                    triton.compile(ASTSource(kernels.quantized_matmul_kernel, sig, consts, attrs),
                                   target=GPUTarget("cuda", 90, 32))
                    print("ok  ", name)
                except Exception as error:  # noqa: BLE001 - report every failure
                    failures += 1
                    print("FAIL", name, type(error).__name__, str(error)[:2000])
    return failures


def on_gpu() -> int:
    failures = 0
    torch.manual_seed(0)
    for bits in (8, 4, 2):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            n, k, group = 1000, 1030, 128 if bits != 2 else 64   # odd sizes: partial groups, bytes and tiles
            q = quantize_rtn(torch.randn(n, k, device="cuda"), bits, group, symmetric=bits == 8)
            bias = torch.randn(n, device="cuda", dtype=dtype)
            args = (q.codes, q.scales, q.zeros, bias, bits, group, k)
            for m in (1, 5, 16, 40, 300):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                want = dispatch.torch_quantized_linear(x, *args, "silu").float()
                configs = dispatch._candidates(m, n, q.codes.shape[1], bits, group, x.device)
                for config in configs:
                    got = dispatch.triton_quantized_linear(x, *args, "silu", config=config).float()
                    error = ((got - want).abs().max() / want.abs().max().clamp(min=1)).item()
                    bad = error > (1e-5 if dtype == torch.float32 else 2e-2)
                    failures += bad
                    if bad or "-v" in sys.argv:
                        print("FAIL" if bad else "ok  ", f"int{bits} {dtype} M={m}",
                              dispatch.describe("triton", config), f"max rel error {error:.2e}")
            deq = dispatch.triton_dequantize(q.codes, q.scales, q.zeros, bits, group, k, torch.bfloat16)
            failures += not torch.equal(deq, q.dequantize(torch.bfloat16))
    print("choices (bf16, int4 g128, 4096 x 4096):")
    q = quantize_rtn(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16), 4, 128)
    for m in (1, 8, 64, 1024):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        dispatch.gpu_quantized_linear(x, q.codes, q.scales, q.zeros, None, 4, 128, 4096, "none")
    for key, times in dispatch.TIMES.items():
        print(f"  M={key[0]}:", ", ".join(f"{name} {ms * 1e3:.1f} us" for name, ms in sorted(times.items(),
                                                                                       key=lambda t: t[1])))
    return failures


if __name__ == "__main__":
    failed = offline() if "--offline" in sys.argv else on_gpu()
    print("failures:", failed)
    sys.exit(1 if failed else 0)
