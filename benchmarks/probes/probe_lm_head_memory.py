# Unmaintained probe: peak memory and step time of one GPT-2-like training step (HF transformers,
# random weights) in eager PyTorch and under Kitsune with and without the fused LM-head loss
# (kitsune.capture.lm_head). Run on the CPU dev machine, 2026-12-07 (issue 15 item 6).
"""Peak memory of a training step, eager vs Kitsune:

    python3 benchmarks/probes/probe_lm_head_memory.py [vocab] [width] [threads]   # default 50257 128 1

Variants: eager; Kitsune compiling `lambda x, y: model(x, labels=y).loss` (the logits are
not returned: the rewrite drops them); Kitsune compiling the HF module (it returns the
logits: no rewrite by default; with lm_head.REWRITE_SHARED_LOGITS the linear stays for
them and the loss runs chunked); Kitsune with the softmax_cross_entropy pattern disabled. Peak = the most CPU memory held at
once during the step beyond what was held before it, from the profiler's allocation
events in time order; the step time is the median of three (on a shared machine: noisy).
"""
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile


def peak_bytes(step) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    held = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def main(vocab: int, width: int, threads: int) -> None:
    import transformers
    from kitsune.capture import lm_head
    from kitsune.planner.patterns import pattern_registry
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch, seq = 4, 128
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=2, n_head=4, n_positions=seq,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # transformers 5.x: else a warning_once breaks the graph before the loss
    tokens = torch.randint(0, vocab, (batch, seq))
    others = [name for name in pattern_registry() if name != "softmax_cross_entropy"]
    variants = {
        "eager": model,
        "kitsune, loss only compiled": torch.compile(lambda x, labels: model(x, labels=labels).loss,
                                                     backend="kitsune"),
        "kitsune, HF module compiled": torch.compile(model, backend="kitsune"),
        "kitsune, HF module, shared": torch.compile(model, backend="kitsune"),
        "kitsune, no lm-head rewrite": torch.compile(model, backend="kitsune",
                                                     options={"enabled_patterns": others}),
    }
    logits_mib = batch * seq * vocab * 4 / 2 ** 20
    for name, fn in variants.items():
        lm_head.REWRITE_SHARED_LOGITS = name.endswith("shared")  # read when the graph is compiled
        torch._dynamo.reset()  # each variant compiles its own graphs (two wrap the same module)

        def step():
            out = fn(tokens, labels=tokens)
            (out if isinstance(out, torch.Tensor) else out.loss).backward()
        step()
        step()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peak = peak_bytes(step) / 2 ** 20
        print(f"V={vocab} H={width} N={batch * seq}: {name:28s} peak {peak:7.1f} MiB  "
              f"step {statistics.median(times) * 1e3:7.1f} ms  (float32 logits {logits_mib:.1f} MiB)")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:4]]
    main(*(args + [50257, 128, 1][len(args):]))
