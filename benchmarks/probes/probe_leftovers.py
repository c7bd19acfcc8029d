# Unmaintained probe (issue 13, "never slower than eager"): what a graph that does not
# fuse costs per call on the CPU, with and without kitsune.capture.restore (prims.*
# decomposition leftovers run as aten ops). Results in benchmarks/results/probe_leftovers_cpu_2026-12-07.log.
"""A `LayerNorm(64)` compiled with backend="kitsune", called with batch 8 and then
batch 5 (the second call recompiles), timed per call against eager, in several
settings that decide what the second graph is and whether it fuses:

    PYTHONPATH=src python3 benchmarks/probes/probe_leftovers.py [--no-restore] [--device cuda]

- default:            Dynamo's automatic dynamic shapes (the batch-5 graph is symbolic)
- static:             torch._dynamo.config.automatic_dynamic_shapes=False
- dynamic=True:       torch.compile(..., dynamic=True)
- cpu_fusion=False:   FusionConfig(cpu_fusion=False): nothing fuses
- min_tensor_size:    FusionConfig(min_tensor_size=10**9): nothing fuses
- forced fallback:    the compiler raises, so the whole graph runs as captured
- aot_eager:          PyTorch's own backend, undecomposed ops: the cost of a compiled call

`--no-restore` replaces the pass with a no-op, giving the figures before it.
`--list-prims` instead captures real graphs (LayerNorm, GELU, softmax, cross-entropy,
GroupNorm, var, tiny GPT-2 and BERT from transformers, static and dynamic, forward and
backward) with Kitsune's decomposition table and counts the prims.* ops they hold.
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

DEVICE = torch.device("cpu")


def per_call_us(compiled, model, x) -> tuple[float, float]:
    """(compiled, eager) µs per call: medians of interleaved rounds (the machine is shared)."""
    timings = common.interleaved_rounds({"compiled": lambda: compiled(x), "eager": lambda: model(x)},
                                        DEVICE, rounds=40, calls=25)
    return timings["compiled"].median_ms * 1e3, timings["eager"].median_ms * 1e3


def layer_norm():
    """LayerNorm(64), and its inputs: batch 8, then 5."""
    return torch.nn.LayerNorm(64).to(DEVICE), [torch.randn(8, 64, device=DEVICE), torch.randn(5, 64, device=DEVICE)]


def gpt2():
    """A tiny GPT-2 (2 layers, width 64) from transformers, and its inputs: 2 sequences of 16, then 24 tokens."""
    from transformers import GPT2Config, GPT2Model
    model = GPT2Model(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64)).eval()
    return (lambda ids: model(ids).last_hidden_state), [torch.randint(0, 100, (2, n)) for n in (16, 24)]


MODELS = {"layernorm": layer_norm, "gpt2": gpt2}
MAKE = layer_norm


def case(name: str, backend, dynamic=None, automatic_dynamic=True, patches=()) -> list:
    torch._dynamo.reset()
    GLOBAL_STATS.reset()
    model, (big, small) = MAKE()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=automatic_dynamic), \
            torch.no_grad(), contextlib_all(patches):
        compiled = torch.compile(model, backend=backend, dynamic=dynamic)
        rows = []
        for x in (big, small):
            compiled(x)  # compiles
            torch.testing.assert_close(compiled(x), model(x))
            records = GLOBAL_STATS.records()
            fused = records[-1].groups if records else []
            compiled_us, eager_us = per_call_us(compiled, model, x)
            shape = "x".join(map(str, x.shape))
            rows.append([name, shape, f"{compiled_us:.1f}", f"{eager_us:.1f}", str(len(fused))])
    return rows


def contextlib_all(patches):
    import contextlib
    stack = contextlib.ExitStack()
    for patch in patches:
        stack.enter_context(patch)
    return stack


def list_prims() -> None:
    import collections

    import torch.nn.functional as F

    from kitsune._compat import aot_autograd, make_boxed_func
    from kitsune.capture.dynamo import decomposition_table
    found = collections.Counter()

    def counting(gm, example_inputs):
        found.update(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("prims."))
        return make_boxed_func(gm.forward)

    def capture(fn, *inputs, train=True, dynamic=None):
        torch._dynamo.reset()
        backend = aot_autograd(fw_compiler=counting, bw_compiler=counting, inference_compiler=counting,
                               decompositions=decomposition_table(True))
        out = torch.compile(fn, backend=backend, dynamic=dynamic)(*inputs)
        if train:
            out = out if isinstance(out, torch.Tensor) else out[0]
            out.float().sum().backward()

    x = torch.randn(8, 16, 64, requires_grad=True)
    for dynamic in (None, True):
        capture(torch.nn.LayerNorm(64), x, dynamic=dynamic)
        capture(torch.nn.GELU(), x, dynamic=dynamic)
        capture(lambda t: torch.softmax(t, -1), x, dynamic=dynamic)
        capture(lambda t, y: F.cross_entropy(t, y), torch.randn(8, 10, requires_grad=True),
                torch.randint(0, 10, (8,)), dynamic=dynamic)
        capture(torch.nn.GroupNorm(4, 16), torch.randn(2, 16, 8, 8, requires_grad=True), dynamic=dynamic)
        capture(lambda t: t.var(-1), x, dynamic=dynamic)
        capture(torch.nn.LayerNorm(64).bfloat16(), x.detach().bfloat16().requires_grad_(), dynamic=dynamic)
    try:
        from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("transformers not installed: GPT-2 and BERT skipped")
    else:
        ids = torch.randint(0, 100, (2, 16))
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64))
        bert = BertModel(BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                    intermediate_size=128, vocab_size=100))
        for model in (gpt2, bert):
            capture(model, ids)
            with torch.no_grad():
                capture(model.eval(), ids, train=False, dynamic=True)
    print(f"torch {torch.__version__}: prims.* ops in the captured graphs")
    print(common.markdown_table(["op", "nodes"], [[op, str(n)] for op, n in found.most_common()]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-restore", action="store_true", help="disable the restore pass (the figures before it)")
    parser.add_argument("--list-prims", action="store_true", help="count the prims.* ops of real captured graphs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="layernorm")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: a tiny LayerNorm gains nothing from more, and they make "
                             "timings on a shared machine erratic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE, MAKE
    DEVICE, MAKE = torch.device(args.device), MODELS[args.model]
    switch = "gpu_fusion" if DEVICE.type == "cuda" else "cpu_fusion"
    if args.list_prims:
        return list_prims()
    base = [mock.patch("kitsune.compiler.restore_aten", lambda gm: 0),
            mock.patch("kitsune.compiler.restored_copy", lambda gm: gm)] if args.no_restore else []
    failing = mock.patch("kitsune.compiler._compile", side_effect=RuntimeError("forced for the probe"))
    rows = []
    rows += case("default", "kitsune", patches=base)
    rows += case("static", "kitsune", automatic_dynamic=False, patches=base)
    rows += case("dynamic=True", "kitsune", dynamic=True, patches=base)
    rows += case(f"{switch}=False", make_backend(FusionConfig(**{switch: False})), patches=base)
    rows += case("min_tensor_size=1e9", make_backend(FusionConfig(min_tensor_size=10**9)), patches=base)
    rows += case("forced fallback", "kitsune", patches=base + [failing])
    rows += case("aot_eager (reference)", "aot_eager")  # torch.compile's own cost, no fusion
    print(f"{args.model}; restore pass: {'off' if args.no_restore else 'on'}; {DEVICE}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads")
    print(common.markdown_table(["setting", "input", "kitsune us/call", "eager us/call", "fused groups"], rows))


if __name__ == "__main__":
    main()
