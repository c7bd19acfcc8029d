"""Matmul + epilogue: cuBLAS + a generated kernel against one generated Triton
matmul with the epilogue fused into its store (issue 15, item 3).

    python3 benchmarks/bench_matmul_epilogue.py                  # CUDA
    python3 benchmarks/bench_matmul_epilogue.py --quick          # tiny shapes: does it run?
    TRITON_INTERPRET=1 python3 benchmarks/bench_matmul_epilogue.py --device cpu --quick
                                                                 # the Triton variants in the interpreter

Cases (bf16 on CUDA; float32 at tiny sizes on the CPU):

* linear + bias + GELU, 16384x4096x4096 (the issue's target: >= 1.1x Inductor)
* linear + bias + GELU, 4096x4096x4096
* SwiGLU `silu(x @ W1) * (x @ W2)`, 8192x11008x4096 (Llama's MLP gate and up)

Variants, each checked against eager before it is timed:

* eager:            PyTorch (cuBLAS, then ATen's elementwise kernels)
* inductor:         `torch.compile(fn)` (Inductor's default: cuBLAS + one Triton epilogue)
* inductor-autotune (with --autotune): `mode="max-autotune-no-cudagraphs"`, Inductor's Triton matmul templates
* kitsune:          `torch.compile(fn, backend="kitsune")` as configured (KITSUNE_TRITON_MATMUL unset: cuBLAS + kernel)
* kitsune-choice:   the same with KITSUNE_TRITON_MATMUL=1 (the measured choice between the two below)
* cublaslt:         `aten._addmm_activation(use_gelu=True)`, cuBLASLt's own (tanh) GELU epilogue (GELU cases)
* cublas+kernel:    `runtime.fused_matmul.unfused_path`: torch.mm, then the planner's epilogue kernel
* triton <tiling>:  the generated fused kernel in each tiling of `codegen.triton.matmul.CONFIGS`

Figures: median ms (`common.time_ms`, CUDA events) and TFLOP/s (2*M*N*K per
product). A markdown table last; `--json PATH` writes everything with the environment.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# (name, kind, M, N, K)
CASES = [
    ("linear+bias+gelu 16384x4096x4096", "gelu", 16384, 4096, 4096),
    ("linear+bias+gelu 4096x4096x4096", "gelu", 4096, 4096, 4096),
    ("swiglu 8192x11008x4096", "swiglu", 8192, 11008, 4096),
]
QUICK = [("linear+bias+gelu 129x96x80", "gelu", 129, 96, 80), ("swiglu 65x48x80", "swiglu", 65, 48, 80)]
VARIANTS = ["eager", "inductor", "kitsune", "kitsune-choice", "cublaslt", "cublas+kernel", "triton"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, any of " + ",".join(VARIANTS))
    parser.add_argument("--autotune", action="store_true", help="also Inductor's max-autotune (slow to compile)")
    parser.add_argument("--json", metavar="PATH", help="write every number measured to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: checks that it runs")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    return args


def operands(kind: str, m: int, n: int, k: int, dtype, device) -> tuple:
    torch.manual_seed(0)
    x = torch.randn(m, k, dtype=dtype, device=device)
    if kind == "gelu":  # nn.Linear's layout: weight [N, K]
        return x, torch.randn(n, k, dtype=dtype, device=device) / k ** 0.5, torch.randn(n, dtype=dtype, device=device)
    w1, w2 = (torch.randn(k, n, dtype=dtype, device=device) / k ** 0.5 for _ in range(2))
    return x, w1, w2


def model(kind: str):
    if kind == "gelu":
        return lambda x, w, b: F.gelu(F.linear(x, w, b))
    return lambda x, w1, w2: F.silu(x @ w1) * (x @ w2)


def epilogue(kind: str, m: int, n: int, dtype):
    """The planner's epilogue kernel spec for the case, and the product slot(s), as
    `runtime.fused_matmul.describe` takes them (planned on meta tensors)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from kitsune.capture.dynamo import decomposition_table
    from kitsune.codegen.lower import lower_group
    from kitsune.config import FusionConfig
    from kitsune.planner import plan_graph

    fn = (lambda p, b: F.gelu(p + b)) if kind == "gelu" else (lambda g, u: F.silu(g) * u)
    examples = [torch.empty(m, n, dtype=dtype), torch.empty(n if kind == "gelu" else (m, n), dtype=dtype)]
    gm = make_fx(fn, decomposition_table=decomposition_table(True))(*examples)
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    (group,) = plan_graph(gm, FusionConfig(max_fusion_size=64), "bench").groups
    spec, inputs, _ = lower_group(group, "kitsune_bench_epilogue")
    arg_of_slot = [placeholders.index(n) for n in inputs]
    products = [arg_of_slot.index(0)] if kind == "gelu" else [arg_of_slot.index(0), arg_of_slot.index(1)]
    return spec, arg_of_slot, products


def generated_variants(kind: str, tensors: tuple, dtype) -> dict:
    """{name: fn()} for cublas+kernel and each fused tiling."""
    from kitsune.runtime.fused_matmul import MatmulEpilogueRunner, describe
    from kitsune.codegen.triton.matmul import CONFIGS
    x = tensors[0]
    m, n = x.shape[0], tensors[1].shape[0] if kind == "gelu" else tensors[1].shape[1]
    spec, arg_of_slot, products = epilogue(kind, m, n, dtype)
    if kind == "gelu":
        bs, extra = [tensors[1].t()], {1: tensors[2]}
    else:
        bs, extra = [tensors[1], tensors[2]], {}
    inputs = [extra.get(arg) for arg in arg_of_slot]
    epi = describe(x, bs, spec, products)
    runner = MatmulEpilogueRunner(epi)
    found = {"cublas+kernel": lambda: runner.unfused(x, bs, [None] * len(bs), inputs)[0]}
    for config in CONFIGS:
        fused = runner.fused(config)
        found[f"triton {config.fitted(dtype, len(bs)).label}"] = \
            (lambda fused=fused: fused(x, bs, [None] * len(bs), inputs)[0])
    return found


def compiled_variants(kind: str, names: list, autotune: bool) -> dict:
    import kitsune  # noqa: F401 - registers the backend
    fn = model(kind)
    found = {"eager": fn}
    if "inductor" in names:
        found["inductor"] = torch.compile(fn)
    if autotune:
        found["inductor-autotune"] = torch.compile(fn, mode="max-autotune-no-cudagraphs")
    if "kitsune" in names:
        found["kitsune"] = torch.compile(fn, backend="kitsune")
    if "cublaslt" in names and kind == "gelu":
        found["cublaslt"] = lambda x, w, b: torch.ops.aten._addmm_activation(b, x, w.t(), use_gelu=True)
    if "kitsune-choice" in names:
        compiled = torch.compile(fn, backend="kitsune")

        def with_choice(*args, compiled=compiled):
            os.environ["KITSUNE_TRITON_MATMUL"] = "1"  # read when the graph compiles (first call)
            try:
                return compiled(*args)
            finally:
                os.environ.pop("KITSUNE_TRITON_MATMUL", None)
        found["kitsune-choice"] = with_choice
    return found


def run_case(case, args, device) -> list[dict]:
    name, kind, m, n, k = case
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tensors = operands(kind, m, n, k, dtype, device)
    names = args.variants.split(",")
    fns = compiled_variants(kind, names, args.autotune)
    triton_ok = device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if triton_ok and ({"cublas+kernel", "triton"} & set(names)):
        fns.update({k: v for k, v in generated_variants(kind, tensors, dtype).items()
                    if k.split(" ")[0] in names})
    if device.type == "cpu":  # compiled CPU graphs do not take the Triton paths; keep --quick short
        fns = {k: v for k, v in fns.items() if k not in ("inductor", "kitsune-choice")}
    flops = 2 * m * n * k * (2 if kind == "swiglu" else 1)
    with torch.no_grad():
        expected = fns["eager"](*tensors)
        rows = []
        for variant, fn in fns.items():
            generated = variant == "cublas+kernel" or variant.startswith("triton")
            call = fn if generated else (lambda fn=fn: fn(*tensors))
            out = call()
            error = common.check_output(out, expected, expected.double()) if variant != "eager" else None
            ms = common.time_ms(call, device, repeats=3 if args.quick else 50).median_ms
            rows.append({"case": name, "variant": variant, "ms": ms, "tflops": flops / ms / 1e9, "error": error,
                         "relative_error": common.relative_error(out, expected.double())})
            print(f"{name:<36} {variant:<26} {ms:9.3f} ms {flops / ms / 1e9:8.1f} TFLOP/s"
                  + (f"  WRONG: {error}" if error else ""), flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    common.check_device(device)
    rows = []
    for case in (QUICK if args.quick or device.type == "cpu" else CASES):
        rows += run_case(case, args, device)
    print("\n| case | variant | ms | TFLOP/s | vs eager |\n|---|---|---:|---:|---:|")
    eager = {r["case"]: r["ms"] for r in rows if r["variant"] == "eager"}
    for r in rows:
        print(f"| {r['case']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
              f"{eager[r['case']] / r['ms']:.2f}x |" + (" WRONG" if r["error"] else ""))
    if args.json:
        common.write_json(args.json, {"environment": common.environment(device), "rows": rows})


if __name__ == "__main__":
    main()
