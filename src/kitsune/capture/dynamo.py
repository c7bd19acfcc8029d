"""Capture: Dynamo gives a graph, AOTAutograd splits it into forward and
backward aten graphs, functionalised (in-place ops and views become pure ops),
with composite ops broken into primitives by PyTorch's own decomposition
tables. The backward uses PyTorch's min-cut partitioner, so cheap pointwise
work is recomputed in the backward rather than saved.
"""
from __future__ import annotations

import contextvars
import functools

import torch

from kitsune._compat import core_aten_decompositions, get_decompositions

aten = torch.ops.aten

# The graph Dynamo handed the backend (the user's torch-level ops: F.layer_norm,
# torch.softmax), set while AOTAutograd compiles it: a measured decision times a
# fused group against these ops as the user wrote them (kitsune.tuning.measure).
_USER_GRAPH: contextvars.ContextVar = contextvars.ContextVar("kitsune_user_graph", default=None)


def user_graph():
    """The Dynamo graph whose aten graphs are being compiled now, or None."""
    return _USER_GRAPH.get()


@functools.lru_cache(maxsize=2)
def decomposition_table(reductions: bool = True) -> dict:
    """PyTorch's decompositions, plus those that expose fusible work. With
    `reductions`, normalisations and softmax also decompose into the sums,
    means and maxima the planner fuses with their neighbours."""
    table = dict(core_aten_decompositions())
    # Attention stays whole (a library kernel). The CPU flash-attention
    # decomposition also gives wrong gradients through AOTAutograd (GPT-2's
    # attention weights, torch 2.13); Inductor's table leaves it out too.
    table.pop(aten._scaled_dot_product_flash_attention_for_cpu.default, None)
    # Composites that core ATen keeps whole but that are pointwise chains.
    table.update(get_decompositions([
        aten.gelu, aten.gelu_backward, aten.elu, aten.elu_backward, aten.hardtanh, aten.hardtanh_backward,
        aten.leaky_relu, aten.leaky_relu_backward, aten.hardsigmoid, aten.hardsigmoid_backward,
        aten.clamp_min, aten.clamp_max, aten.sigmoid_backward, aten.tanh_backward, aten.silu_backward,
        aten.softplus_backward, aten.logit, aten.square,
    ]))
    table[aten.addmm.default] = _addmm_on_cpu
    if reductions:
        table.update(get_decompositions([
            aten._softmax, aten._log_softmax, aten.native_layer_norm, aten.var, aten.var_mean,
            aten.native_group_norm,
            # batch_norm in training stays whole: its decomposition is not functional
            # (AOTAutograd asserts on _native_batch_norm_legit)
        ]))
    # Inference batch norm stays whole here: Kitsune folds it into the convolution
    # before it, or decomposes it, on the aten graph (kitsune.capture.fold).
    table.pop(aten._native_batch_norm_legit_no_training.default, None)
    return table


def _addmm_on_cpu(bias, mat1, mat2, *, beta=1, alpha=1):
    """A float CPU `addmm` (a Linear) as PyTorch's own decomposition, `mm` +
    `add`, so that the bias joins the kernel after it (GELU, a residual add)
    and its gradient joins the kernel before it. PyTorch's CPU addmm copies the
    bias into its output before the GEMM accumulates into it: 512x256 @
    256x1024 fp32 on two cores, addmm 738 us, mm + add_ 711 us, mm alone 695
    us. Elsewhere (cuBLAS adds a bias in its epilogue) and in low precision
    (where eager rounds the sum once) addmm stays whole."""
    if mat1.device.type != "cpu" or mat1.dtype not in (torch.float32, torch.float64) or _TORCH_ADDMM is None:
        return NotImplemented
    return _TORCH_ADDMM(bias, mat1, mat2, beta=beta, alpha=alpha)


_TORCH_ADDMM = get_decompositions([aten.addmm.default]).get(aten.addmm.default)


def aot_backend(compile_graph, reductions: bool = True, lm_head_loss: bool = True, attention: bool = True,
                quantized: bool = True):
    """A Dynamo backend that hands each forward/backward aten graph to
    `compile_graph(gm, example_inputs, name)` and runs what it returns. With
    `lm_head_loss`, a `linear -> cross_entropy` of the Dynamo graph becomes the chunked
    `kitsune::linear_cross_entropy` first (kitsune.capture.lm_head); with `attention`,
    a hand-written `softmax(q @ kᵀ ...) @ v` becomes `kitsune.ops.attention`
    (kitsune.capture.attention); with `quantized`, a hand-written dequantise -> linear becomes
    `kitsune::quantized_linear` and activations join its epilogue (kitsune.capture.quantized)."""
    from kitsune._compat import aot_autograd, make_boxed_func, min_cut_partitioner
    min_cut_rematerialization_partition = min_cut_partitioner()

    def compiler(kind):
        def compile_fn(gm, example_inputs):
            compiled = compile_graph(gm, example_inputs, kind)
            if isinstance(compiled, torch.fx.GraphModule):
                compiled = compiled.forward  # skips nn.Module's call machinery at every call
            return make_boxed_func(compiled)
        return compile_fn

    aot = aot_autograd(
        fw_compiler=compiler("forward"),
        bw_compiler=compiler("backward"),
        inference_compiler=compiler("inference"),
        decompositions=decomposition_table(reductions),
        partition_fn=min_cut_rematerialization_partition,
    )

    def backend(gm, example_inputs, **kwargs):
        from kitsune.capture import clock, rewrites
        token = _USER_GRAPH.set(gm)
        try:
            with clock.capturing(), rewrites.collecting():  # the first aten graph's record takes them
                if lm_head_loss:
                    from kitsune.capture.lm_head import fuse_lm_head_loss
                    rewrites.note(fuse_lm_head_loss(gm))
                if attention:
                    from kitsune.capture.attention import fuse_attention
                    rewrites.note(fuse_attention(gm))
                if quantized:
                    from kitsune.capture.quantized import fuse_quantized_matmul
                    rewrites.note(fuse_quantized_matmul(gm))
                return aot(gm, example_inputs, **kwargs)
        finally:
            _USER_GRAPH.reset(token)
    return backend
