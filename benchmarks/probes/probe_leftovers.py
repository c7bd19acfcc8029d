# Unmaintained probe (issue 13, "never slower than eager"): what a graph that does not
# fuse costs per call on the CPU, with and without kitsune.capture.restore (prims.*
# decomposition leftovers run as aten ops). Results in benchmarks/RESULTS.md.
"""A `LayerNorm(64)` compiled with backend="kitsune", called with batch 8 and then
batch 5 (the second call recompiles), timed per call against eager, in several
settings that decide what the second graph is and whether it fuses:

    PYTHONPATH=src python3 benchmarks/probes/probe_leftovers.py [--no-restore]

- default:            Dynamo's automatic dynamic shapes (the batch-5 graph is symbolic)
- static:             torch._dynamo.config.automatic_dynamic_shapes=False
- dynamic=True:       torch.compile(..., dynamic=True)
- cpu_fusion=False:   FusionConfig(cpu_fusion=False): nothing fuses
- min_tensor_size:    FusionConfig(min_tensor_size=10**9): nothing fuses
- forced fallback:    the compiler raises, so the whole graph runs as captured
- aot_eager:          PyTorch's own backend, undecomposed ops: the cost of a compiled call

`--no-restore` replaces the pass with a no-op, giving the figures before it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/

import common  # noqa: E402

common.use_private_caches()

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

import kitsune  # noqa: E402, F401  (registers the backend)
from kitsune.backend import make_backend  # noqa: E402
from kitsune.config import FusionConfig  # noqa: E402
from kitsune.report.stats import GLOBAL_STATS  # noqa: E402

CPU = torch.device("cpu")


def per_call_us(fn, x) -> float:
    return common.time_ms(lambda: fn(x), CPU, repeats=2000).median_ms * 1e3


def case(name: str, backend, dynamic=None, automatic_dynamic=True, patches=()) -> list:
    torch._dynamo.reset()
    GLOBAL_STATS.reset()
    model = torch.nn.LayerNorm(64)
    big, small = torch.randn(8, 64), torch.randn(5, 64)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=automatic_dynamic), \
            torch.no_grad(), contextlib_all(patches):
        compiled = torch.compile(model, backend=backend, dynamic=dynamic)
        rows = []
        for x in (big, small):
            compiled(x)  # compiles
            torch.testing.assert_close(compiled(x), model(x))
            records = GLOBAL_STATS.records()
            fused = records[-1].groups if records else []
            rows.append([name, str(x.shape[0]), f"{per_call_us(compiled, x):.1f}",
                         f"{per_call_us(model, x):.1f}", str(len(fused))])
    return rows


def contextlib_all(patches):
    import contextlib
    stack = contextlib.ExitStack()
    for patch in patches:
        stack.enter_context(patch)
    return stack


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-restore", action="store_true", help="disable the restore pass (the figures before it)")
    args = parser.parse_args()
    base = [mock.patch("kitsune.compiler.restore_aten", lambda gm: 0),
            mock.patch("kitsune.compiler.restored_copy", lambda gm: gm)] if args.no_restore else []
    failing = mock.patch("kitsune.compiler._compile", side_effect=RuntimeError("forced for the probe"))
    rows = []
    rows += case("default", "kitsune", patches=base)
    rows += case("static", "kitsune", automatic_dynamic=False, patches=base)
    rows += case("dynamic=True", "kitsune", dynamic=True, patches=base)
    rows += case("cpu_fusion=False", make_backend(FusionConfig(cpu_fusion=False)), patches=base)
    rows += case("min_tensor_size=1e9", make_backend(FusionConfig(min_tensor_size=10**9)), patches=base)
    rows += case("forced fallback", "kitsune", patches=base + [failing])
    rows += case("aot_eager (reference)", "aot_eager")  # torch.compile's own cost, no fusion
    print(f"restore pass: {'off' if args.no_restore else 'on'}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads")
    print(common.markdown_table(["setting", "batch", "kitsune us/call", "eager us/call", "fused groups"], rows))


if __name__ == "__main__":
    main()
