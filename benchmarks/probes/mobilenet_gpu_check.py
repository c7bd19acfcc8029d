# Unmaintained probe (issue 15, 2026-12-08): where does MobileNetV3-large lose on the GPU under Kitsune
# (0.75x eager on 2026-12-07)? Times eager, Inductor and Kitsune variants (a rewrite or a switch off
# each) side by side, and prints the top GPU kernels of eager and default Kitsune.
#   python3 benchmarks/probes/mobilenet_gpu_check.py [batch]
import sys
import time

import torch

import kitsune
from kitsune import FusionConfig
from kitsune.fusion.patterns import BUILTIN_PATTERNS
from kitsune.record import default_sink
from fold_gpu_check import median_ms, randomise


def without(*names):
    return FusionConfig(enabled_patterns=frozenset(p for p in BUILTIN_PATTERNS if p not in names))


VARIANTS = {
    "kitsune": FusionConfig(),
    "no-fold": without("conv_bn_activation"),
    "no-fold-no-linear": without("conv_bn_activation", "linear_activation"),
    "no-cudagraph": FusionConfig(cuda_graphs=False),
    "no-gpu-fusion": FusionConfig(gpu_fusion=False),
}


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    from kitsune._compat import import_torchvision
    tv = import_torchvision()
    torch.manual_seed(0)
    model = randomise(tv.models.mobilenet_v3_large()).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
    fns = {"eager": model, "inductor": None, **VARIANTS}
    rows = []
    for name, cfg in fns.items():
        torch._dynamo.reset()
        default_sink().reset()
        start = time.perf_counter()
        fn = model if name == "eager" else torch.compile(model, backend="inductor") if name == "inductor" \
            else kitsune.optimize(model, cfg)
        with torch.no_grad():
            for _ in range(4):
                got = fn(x)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            ms = median_ms(fn, x, reps=50)
            diff = ((got - want).abs().max() / want.abs().max()).item()
            rows.append((name, ms, first, diff))
            print(f"{name:20s} {ms:7.3f} ms  first calls {first:5.1f} s  diff {diff:.1e}", flush=True)
            if name in ("eager", "kitsune", "no-fold"):
                if name != "eager":
                    from kitsune.report.explain import explain_records
                    print("\n".join(explain_records(default_sink().records()).splitlines()[:30]))
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        fn(x)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15,
                                                max_name_column_width=90))
    base = rows[0][1]
    print("\nsummary (eager / variant):")
    for name, ms, first, diff in rows:
        print(f"  {name:20s} {ms:7.3f} ms  {base / ms:5.2f}x eager")


if __name__ == "__main__":
    main()
