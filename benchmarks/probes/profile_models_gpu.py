# Unmaintained probe: PyTorch-profiler tables of GPT-2 small and BERT-base inference (top CUDA
# kernels) for eager, Inductor and Kitsune. Run on an H200, 2026-12-02; result in
# benchmarks/results/models_profile_h200_2026-12-02.log and RESULTS.md (second session). The
# maintained figures come from bench_reductions.py --models.
"""Where GPT-2 small and BERT-base inference spend GPU time (CUDA only): the top
kernels of eager / Inductor / Kitsune, as in bench_reductions.py --models.

    python3 benchmarks/probes/profile_models_gpu.py [gpt2,bert] [eager,inductor,kitsune]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/

import common  # noqa: E402

common.use_private_caches()

import torch  # noqa: E402
import transformers  # noqa: E402

import kitsune  # noqa: E402,F401

transformers.logging.set_verbosity_error()
names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["gpt2", "bert"]
backends = sys.argv[2].split(",") if len(sys.argv) > 2 else ["eager", "inductor", "kitsune"]
specs = {
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)), (8, 512), 50257),
    "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)), (32, 128), 30522),
}
for name in names:
    build, shape, vocab = specs[name]
    torch.manual_seed(0)
    model = build().to(device="cuda", dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, vocab, shape, device="cuda")
    for backend in backends:
        torch._dynamo.reset()
        fn = model if backend == "eager" else torch.compile(model, backend=backend, dynamic=False)
        with torch.no_grad():
            for _ in range(4):
                fn(tokens)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn(tokens)
                torch.cuda.synchronize()
        print(f"==== {name} / {backend}")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=90))
