"""The flash-attention kernels compile for an H100 (sm_90) through Triton's real
compiler, offline (no GPU needed): the interpreter runs the tests' kernels but
accepts code the compiler refuses (a plain Python global, say). One configuration
with every feature on, in a subprocess without TRITON_INTERPRET. About 30 s on
two cores, so it runs when KITSUNE_COMPILE_CHECK=1 (run it after editing the kernels)."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kitsune.ops import flash_attention_kernels as kernels

    POINTERS = dict(Q="*bf16", K="*bf16", V="*bf16", Out="*bf16", Grad="*bf16", DQ="*bf16", DK="*bf16", DV_="*bf16",
                    Bias="*bf16", Mask="*u8", Stats="*fp32", Seed="*i64", Delta="*fp32", DBias="*fp32")
    FLAGS = dict(HAS_BIAS=True, HAS_MASK=True, CAUSAL=True, SKIP_FUTURE=True, DROPOUT=True, PRECISION="tf32")

    def build(fn, constants):
        names = fn.arg_names
        signature = {n: "constexpr" if n in constants else POINTERS.get(n, "fp32" if n in ("scale", "mask_fill",
                     "dropout_p") else "i32") for n in names}
        source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constants.items()})
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))

    blocks = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=64, BLOCK_DV=64, D=64, DV=48)
    build(kernels.attention_forward_kernel, dict(FLAGS, **blocks))
    build(kernels.attention_delta_kernel, dict(BLOCK_M=64, BLOCK_DV=64, DV=48))
    build(kernels.attention_dkdv_kernel, dict(FLAGS, STORE_DBIAS=True, **blocks))
    build(kernels.attention_dq_kernel, dict(FLAGS, **blocks))
    print("compiled")
''')


@pytest.mark.skipif(os.environ.get("KITSUNE_COMPILE_CHECK") != "1", reason="set KITSUNE_COMPILE_CHECK=1 (about 30 s)")
def test_kernels_compile_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        pytest.skip(f"this Triton has no offline compiler API: {error}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if "ptxas" in result.stderr and "compiled" not in result.stdout:
        pytest.skip("no ptxas for an offline compile")
    assert "compiled" in result.stdout, result.stderr[-3000:]
