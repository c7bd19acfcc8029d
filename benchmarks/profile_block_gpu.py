"""Where the LayerNorm->Linear->GELU->Linear block's fwd+bwd spends GPU time (CUDA only):
top CUDA kernels, eager / inductor / kitsune.

    python3 benchmarks/profile_block_gpu.py
"""
import sys, torch
sys.path.insert(0, __import__("os").path.dirname(__file__))
from bench_reductions import block_case
import kitsune
block, make = block_case(torch.device("cuda"), torch.bfloat16, True)
for be in ["eager", "inductor", "kitsune"]:
    torch._dynamo.reset()
    fn = block if be == "eager" else torch.compile(block, backend=be, dynamic=False)
    step = make(fn)
    for _ in range(5): step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as p:
        for _ in range(5): step()
        torch.cuda.synchronize()
    print(f"==== {be}")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
