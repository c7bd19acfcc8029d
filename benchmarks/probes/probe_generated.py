# Unmaintained probe: the GPU time of Kitsune's generated row kernels (softmax, layer_norm+GELU,
# RMSNorm, cross-entropy, bias gradient, MSE) under other launch-rule constants and libm variants,
# with their SASS instruction mix. Run on an H200, 2026-12-02 (second to fourth sessions); results in
# benchmarks/results/probe_generated*_h200_2026-12-02c.log, probe_split_h200_2026-12-02c.log,
# probe_mse*_h200_2026-12-02e.log and RESULTS.md (2026-12-02 H200 sessions). It patches launch
# constants by hand; the maintained numbers come from bench_reductions.py.
"""Kitsune's generated row kernels on the GPU, one launch rule at a time: each
case (the four of bench_reductions: scaled softmax, layer_norm+GELU, RMSNorm on
16384x4096 bf16, cross-entropy on 8192x32000) is compiled with the rule's
constants patched into `kitsune.codegen.triton.emit`, checked against eager,
and its kernels' GPU time read from the profiler (the host left out), as a
share of a device copy. `--sass` also prints each kernel's machine-code
instruction mix (what the arithmetic costs per element), and `--variants`
runs cases with other versions of libm's helpers (GELU's fit, bf16 rounding),
with their error against float64 next to eager's.

    python3 benchmarks/probes/probe_generated.py [--sass] [--cases ln_gelu,cross_entropy] [--rules default]
    python3 benchmarks/probes/probe_generated.py --variants ln_gelu,softmax --rules default --cases ln_gelu
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/

import common  # noqa: E402

common.use_private_caches()

import torch  # noqa: E402

import bench_reductions as br  # noqa: E402

# name -> constants of kitsune.codegen.triton.emit
RULES = {
    "default": {},
    "looped 2048x4": dict(LOOPED_RBLOCK=2048),
    "looped 8192x8": dict(LOOPED_RBLOCK=8192, LOOPED_WARPS=8),
    "looped 4096x8": dict(LOOPED_WARPS=8),
    "persistent 8 warps": dict(HEAVY_ELEMENT_OPS=1000),
    "persistent 2 rows": dict(ROW_BLOCK_ELEMENTS=8192),
    "persistent 2 rows 8 warps": dict(ROW_BLOCK_ELEMENTS=8192, HEAVY_ELEMENT_OPS=1000),
    "split off": dict(SPLIT_MIN_ELEMENTS=1 << 62),
    "split 32 wide": dict(SPLIT_XBLOCK=32),
    "split 128 wide": dict(SPLIT_XBLOCK=128),
    "split 1056 programs": dict(SPLIT_MIN_PROGRAMS=1056),
    "split 264 programs": dict(SPLIT_MIN_PROGRAMS=264),
    "split 132 programs": dict(SPLIT_MIN_PROGRAMS=132),
    "split 2112 programs": dict(SPLIT_MIN_PROGRAMS=2112, ROW_SPLIT_MAX=4096),
    "split 4 warps": dict(SPLIT_WARPS=4),
}


def sass_mix(kernel) -> str:
    """The instruction mix of a TritonKernel's binary (most common opcodes)."""
    try:
        import triton
        compiled = kernel.fn.warmup(*kernel._example, grid=kernel.grid, XBLOCK=kernel.xblock,
                                    num_warps=kernel.num_warps, **kernel.constexprs)
        sass = compiled.asm["sass"]
    except Exception as error:  # noqa: BLE001
        return f"(no SASS: {error})"
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"^[-0-9:YP]+\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    out = os.environ.get("OUT")
    if out:
        Path(out, f"sass_{kernel.spec.name}.txt").write_text(sass)
    total = sum(ops.values())
    return f"{getattr(compiled, 'n_regs', '?')} registers, {total} instructions: " + ", ".join(f"{op} {n}" for op, n in ops.most_common(14))


def measure(case, label: str, copy: float):
    """Compile a case with Kitsune, check it against eager, time its kernels:
    (report line, (fn, args, eager result, Kitsune result))."""
    import kitsune
    fn, fargs, ins, outs = case
    expected = fn(*fargs)
    if ins is None:  # every argument read once, every output written once
        nbytes = common.min_bytes(list(fargs), list(expected))
    else:
        nbytes = common.min_bytes(ins, [expected] if outs else [])
    torch._dynamo.reset()
    kitsune.reset_fusion_stats()
    compiled = torch.compile(fn, backend="kitsune", dynamic=False)
    got = compiled(*fargs)
    ok = br.check(label, got, expected, torch.bfloat16)
    busy = common.gpu_busy_ms(lambda: compiled(*fargs), calls=50)
    share = 100 * common.gb_per_s(nbytes, busy) / copy
    return f"GPU {busy * 1e3:7.1f} us  {share:5.1f}% of copy  {'ok' if ok else 'WRONG'}", (fn, fargs, expected, got)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="softmax,ln_gelu,rmsnorm,cross_entropy")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--sass", action="store_true")
    parser.add_argument("--variants", default=None, help="cases to run with each libm variant")
    args = parser.parse_args()
    from kitsune.codegen import triton as ktriton
    from kitsune.codegen.triton import emit
    device = torch.device("cuda")
    copy = common.copy_rate(device, 1 << 28, 20)["gb_per_s"]
    print(f"copy {copy:.0f} GB/s")
    cases = br.row_cases(device, torch.bfloat16, True)
    defaults = {k: getattr(emit, k) for rule in RULES.values() for k in rule}
    # remember each kernel's first arguments (for the SASS dump)
    original_call = ktriton.TritonKernel.__call__

    def call(self, inputs, outputs):
        if not hasattr(self, "_example"):
            self._example = (*inputs, *outputs, self.spec.numel)
        return original_call(self, inputs, outputs)
    ktriton.TritonKernel.__call__ = call
    if args.variants:
        run_variants(cases, copy, args.variants.split(","))
    for rule_name in args.rules.split(","):
        for k, v in {**defaults, **RULES[rule_name]}.items():
            setattr(emit, k, v)
        for name in args.cases.split(","):
            line, _ = measure(cases[name], f"{name}/{rule_name}", copy)
            print(f"{name:14s} {rule_name:20s} {line}", flush=True)
            if args.sass and rule_name == "default":
                kernels = [o for o in gc.get_objects() if type(o) is ktriton.TritonKernel
                           and hasattr(o, "_example")]
                for kernel in kernels:
                    blocks = emit.reduction_blocks(kernel.spec, ktriton.PERSISTENT_MAX) if kernel.spec.reduction \
                        else None
                    print(f"    {kernel.spec.name} {blocks}: {sass_mix(kernel)}")
                for kernel in kernels:
                    del kernel._example



# -- hand variants of libm helpers (--variants): patched into libm before the
# generated modules are imported, so the same generated source calls them
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def gelu_erf_degree6(y):
    """libm.gelu_erf as a degree-6 fit on [0, 3.92 * sqrt(2)] (2^-14.9) with a
    range test (h = 0 beyond): a degree-6 fit rises again past its range."""
    t = tl.abs(y)
    q = 2.5243246222992433e-05
    q = q * t + -0.0006474482182922601
    q = q * t + 0.007414538844898201
    q = q * t + -0.05179142680990156
    q = q * t + -0.46051363038444393
    q = q * t + -1.15052452931274
    q = q * t + -1.0000373652602936
    h = tl.where(t > 5.5437171645025325, 0.0, tl.exp2(q))
    return y * tl.where(y < 0, h, 1.0 - h)


@triton.jit
def round_bf16_packed(x):
    """round_bf16 on pairs (one cvt.rn.bf16x2 for two values, then unpacked)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; cvt.rn.bf16x2.f32 t, $3, $2; and.b32 $1, t, 0xffff0000; shl.b32 $0, t, 16; }",
        "=r,=r,r,r", [x], dtype=tl.float32, is_pure=True, pack=2)


# H200, 2026-12-02, layer_norm+GELU: degree 6 with range test 75.8 us, degree 7
# with range test 78.0, packed rounding 88.3 (softmax 68.7 -> 76.2: the pairs
# cost more than they save)
VARIANTS = {
    "libm": {},
    "gelu degree 6, range test": dict(gelu_erf=gelu_erf_degree6),
    "packed bf16 rounding": dict(round_bf16=round_bf16_packed),
}


def run_variants(cases, copy, names):
    from kitsune.codegen.triton import libm
    shipped = {k: getattr(libm, k) for v in VARIANTS.values() for k in v}
    for variant, patch in VARIANTS.items():
        for k, v in {**shipped, **patch}.items():
            setattr(libm, k, v)
        for mod in [m for m in sys.modules if m.startswith("kitsune_generated")]:
            del sys.modules[mod]
        for name in names:
            line, (fn, fargs, expected, got) = measure(cases[name], f"{name}/{variant}", copy)
            exact = fn(*[a.double() if a.is_floating_point() else a for a in fargs])
            err = (got.double() - exact).abs().mean().item()
            err_eager = (expected.double() - exact).abs().mean().item()
            differ = (got != expected).float().mean().item() * 100
            print(f"{name:14s} {variant:22s} {line}; mean error vs float64 {err:.3e} (eager {err_eager:.3e}), "
                  f"{differ:.2f}% differ from eager", flush=True)
    for k, v in shipped.items():
        setattr(libm, k, v)


if __name__ == "__main__":
    main()
