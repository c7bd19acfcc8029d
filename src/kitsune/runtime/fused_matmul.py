"""Running a generated matmul with its epilogue fused, and choosing it by measurement.

`fused_matmul(a, b, epilogue_spec, inputs)` is the standalone entry: the
product(s) `a @ b` (or `torch.bmm`, or addmm with `bias`) fed straight into
the epilogue kernel `epilogue_spec` (the planner's pointwise KernelSpec that
reads the product), in one generated Triton kernel
(`kitsune.codegen.triton.matmul`).

`MatmulEpilogueRunner` is what a compiled graph would call in place of
"cuBLAS, then the epilogue kernel": on its first real inputs (CUDA only) it
times that unfused path against the fused kernel in each block configuration
of `CONFIGS`, keeps the faster (the fused one must be `MIN_GAIN` faster),
caches the choice per configuration (in the process and on disk, under
``KITSUNE_CACHE_DIR/decisions``, as the measured fuse-or-not decisions are)
and runs the winner from then on; `choice.rewrite(...)` is the record
`explain()` reads ("Triton matmul + epilogue" or "cuBLAS + kernel", with both
times). A fused kernel that fails to build or run falls back to the unfused
path, logged; on the CPU nothing changes (MKL + the generated C epilogue).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from kitsune.cache import cache_dir, write_atomic
from kitsune.codegen.kernel import INDEX_LIMIT, KernelError, KernelSpec
from kitsune.codegen.triton.libm import INTERPRETED
from kitsune.codegen.triton.matmul import CONFIGS, MatmulConfig, MatmulEpilogue, emit_matmul
from kitsune.ir.index import Index, within

log = logging.getLogger("kitsune")

_KERNELS: dict = {}   # (epilogue, config) -> FusedMatmulKernel, per process
_CHOICES: dict = {}   # decision key -> MatmulChoice, per process


def _extent(t: torch.Tensor) -> int:
    """One past the largest element offset `t` reaches (its view of storage)."""
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0) if t.numel() else 0


class FusedMatmulKernel:
    """One generated fused matmul (an epilogue, a tiling) and its launch."""

    def __init__(self, epi: MatmulEpilogue, config: MatmulConfig):
        from kitsune.codegen.triton import load_generated
        self.epi, self.config = epi, config.fitted(epi.dtype, len(epi.products))
        fn_name = f"kitsune_matmul_{epi.spec.structure_key()[:12]}"
        self.source = emit_matmul(epi, fn_name, config)
        module, self.path = load_generated(fn_name, self.source)
        self.fn = getattr(module, fn_name)
        c = self.config
        tiles = -(-epi.m // c.block_m) * -(-epi.n // c.block_n)
        self.programs = min(tiles, _persistent_programs(epi.batch)) if c.persistent else tiles
        self.grid = (self.programs, epi.batch)

    def __call__(self, a, bs: Sequence[torch.Tensor], biases: Sequence, inputs: Sequence, outputs: Sequence) -> None:
        epi = self.epi
        if epi.batch * epi.m * epi.n == 0:
            return
        args = [a, *bs, *[b for b in biases if b is not None],
                *[t for s, t in enumerate(inputs) if s not in epi.products], *outputs, *_strides3(a)]
        for b in bs:
            args += _strides3(b)
        for bias in biases:
            if bias is not None:
                args += _strides3(bias.expand(epi.batch, epi.m, epi.n) if a.dim() == 3 else bias.expand(epi.m, epi.n))
        if self.config.persistent:
            args.append(self.programs)
        if INTERPRETED:
            self.fn[self.grid](*args)
        else:
            self.fn[self.grid](*args, num_warps=self.config.num_warps, num_stages=self.config.num_stages)


def _persistent_programs(batch: int) -> int:
    """Programs per batch of a persistent kernel: the SMs shared by the batches
    (the interpreter: 2, so that a program walks several tiles)."""
    if INTERPRETED or not torch.cuda.is_available():
        return 2
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return max(1, sms // batch)


def _strides3(t: torch.Tensor) -> list[int]:
    """(batch, row, column) strides of a 2-d or 3-d operand (batch stride 0 for 2-d)."""
    return [0, *t.stride()] if t.dim() == 2 else list(t.stride())


def kernel_for(epi: MatmulEpilogue, config: MatmulConfig) -> FusedMatmulKernel:
    key = (epi, config)
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = FusedMatmulKernel(epi, config)
    return kernel


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def describe(a: torch.Tensor, bs: Sequence[torch.Tensor], spec: KernelSpec, product_slots: Sequence[int],
             biases: Sequence = (), alpha: float = 1.0, beta: float = 1.0) -> MatmulEpilogue:
    """The `MatmulEpilogue` of these operands (checked: clear errors naming the argument)."""
    if not isinstance(spec, KernelSpec):
        raise TypeError(f"epilogue_spec must be a KernelSpec, got {type(spec).__name__}")
    if a.dim() not in (2, 3) or any(b.dim() != a.dim() for b in bs):
        raise ValueError(f"a and b must both be 2-d (mm) or 3-d (bmm), got {a.dim()}-d and "
                         f"{[b.dim() for b in bs]}-d")
    batch = a.shape[0] if a.dim() == 3 else 1
    m, k = a.shape[-2:]
    n = bs[0].shape[-1]
    for b in bs:
        if b.shape[-2] != k or b.shape[-1] != n or (a.dim() == 3 and b.shape[0] != batch):
            raise ValueError(f"b of shape {tuple(b.shape)} does not multiply a of shape {tuple(a.shape)} "
                             f"(every b must be [{'batch, ' if a.dim() == 3 else ''}{k}, {n}])")
        if b.dtype != a.dtype or b.device != a.device:
            raise ValueError(f"b must have a's dtype and device ({a.dtype}, {a.device}), got {b.dtype}, {b.device}")
    biases = list(biases) or [None] * len(bs)
    if len(biases) != len(bs):
        raise ValueError(f"bias: one per b (or None), got {len(biases)} for {len(bs)}")
    for bias in biases:
        if bias is not None:
            try:
                torch.broadcast_shapes(tuple(bias.shape), (batch, m, n) if a.dim() == 3 else (m, n))
            except RuntimeError as error:
                raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to the product") from error
    wide = max(_extent(t) for t in [a, *bs]) >= INDEX_LIMIT
    precision = "tf32" if a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return MatmulEpilogue(spec, tuple(product_slots), batch, m, n, k, a.dtype, tuple(b is not None for b in biases),
                          float(alpha), float(beta), precision, wide)


def new_outputs(epi: MatmulEpilogue, device) -> list[torch.Tensor]:
    """The epilogue's outputs, contiguous in the product's shape (each must be written at x itself)."""
    shape = (epi.batch, epi.m, epi.n) if epi.batch > 1 else (epi.m, epi.n)
    for out in epi.spec.outputs:
        if epi.spec.numel and out.index not in (Index.var(), within(Index.var(), epi.spec.numel)):
            raise ValueError(f"output {out.name} is not written in the product's order: pass `outputs`")
    return [torch.empty(shape, dtype=o.dtype, device=device) for o in epi.spec.outputs]


def fused_matmul(a: torch.Tensor, b, epilogue_spec: KernelSpec, inputs: Sequence, product_slot=0, *,
                 bias=None, alpha: float = 1.0, beta: float = 1.0, outputs: Sequence | None = None,
                 config: MatmulConfig | None = None) -> list[torch.Tensor]:
    """The outputs of `epilogue_spec` where its input(s) `product_slot` are
    `a @ b` (`b` a tensor or a list of them, one per slot: SwiGLU's two
    products of one `a`), computed by one generated Triton kernel.
    `inputs`: the spec's inputs in slot order (the product slots' entries are
    not read: None is fine). `bias`/`alpha`/`beta`: addmm's
    (product = alpha * a @ b + beta * bias, rounded once). 3-d a and b: bmm."""
    if not isinstance(epilogue_spec, KernelSpec):
        raise TypeError(f"epilogue_spec must be a KernelSpec, got {type(epilogue_spec).__name__}")
    bs, slots = _as_list(b), _as_list(product_slot)
    if len(bs) != len(slots):
        raise ValueError(f"product_slot: one slot per b, got {len(slots)} slot(s) for {len(bs)} b")
    if len(inputs) != len(epilogue_spec.inputs):
        raise ValueError(f"inputs: the spec has {len(epilogue_spec.inputs)} inputs, got {len(inputs)}")
    biases = _as_list(bias) if bias is not None else [None] * len(bs)
    epi = describe(a, bs, epilogue_spec, slots, biases, alpha, beta)
    outputs = list(outputs) if outputs is not None else new_outputs(epi, a.device)
    kernel_for(epi, config or CONFIGS[0])(a, bs, biases, list(inputs), outputs)
    return outputs


def products(epi: MatmulEpilogue, a, bs, biases, inputs) -> list:
    """`inputs` with each product slot holding its product, computed by PyTorch (cuBLAS/MKL)."""
    inputs = list(inputs)
    for slot, b, bias in zip(epi.products, bs, biases):
        if bias is None:
            product = torch.bmm(a, b) if a.dim() == 3 else torch.mm(a, b)
            if epi.alpha != 1.0:
                product = product * epi.alpha
        else:
            product = (torch.baddbmm if a.dim() == 3 else torch.addmm)(bias, a, b, beta=epi.beta, alpha=epi.alpha)
        inputs[slot] = product.contiguous()
    return inputs


def unfused_path(epi: MatmulEpilogue) -> Callable:
    """(a, bs, biases, inputs) -> outputs: the products by PyTorch
    (cuBLAS/MKL), then the epilogue's own generated kernel (choice (a))."""
    from kitsune.codegen.triton import compile_kernel
    kernel = compile_kernel(epi.spec)

    def run(a, bs, biases, inputs):
        outputs = new_outputs(epi, a.device)
        kernel(products(epi, a, bs, biases, inputs), outputs)
        return outputs
    return run


@dataclass
class MatmulChoice:
    """The measured choice for one configuration: the fused kernel's best tiling
    (None: cuBLAS + kernel won), each tiling's time and the unfused path's, in ms."""

    config: MatmulConfig | None
    fused_ms: float
    plain_ms: float
    times: dict = field(default_factory=dict)  # tiling label -> ms (inf: failed to build or run)

    @property
    def fused(self) -> bool:
        return self.config is not None

    @property
    def text(self) -> str:
        best = min(self.times, key=self.times.get) if self.times else "none"
        if self.fused:
            return (f"Triton matmul + epilogue ({self.config.label}: {self.fused_ms:.3f} ms against "
                    f"{self.plain_ms:.3f} ms for cuBLAS + kernel)")
        return (f"cuBLAS + kernel ({self.plain_ms:.3f} ms against {self.fused_ms:.3f} ms for the Triton "
                f"matmul + epilogue, best tiling {best})")

    def rewrite(self, ops: tuple, nodes: tuple, pattern: str = "linear_activation"):
        """The record `explain()` shows for the pattern (kitsune.capture.rewrites.Rewrite)."""
        from kitsune.capture.rewrites import Rewrite
        return Rewrite(pattern, tuple(ops), tuple(nodes), choice=self.text,
                       seconds=(self.fused_ms if self.fused else self.plain_ms) / 1e3)

    def to_json(self) -> dict:
        c = self.config
        return {"config": None if c is None else list(c.__dict__.values()), "fused_ms": self.fused_ms,
                "plain_ms": self.plain_ms, "times": self.times}

    @staticmethod
    def from_json(m: dict) -> "MatmulChoice":
        config = None if m["config"] is None else MatmulConfig(*m["config"])
        return MatmulChoice(config, float(m["fused_ms"]), float(m["plain_ms"]), dict(m["times"]))


def decision_key(epi: MatmulEpilogue, tensors: Sequence) -> str:
    """What the choice depends on: the epilogue's computation, the operands'
    shapes, strides and dtypes, the device, TF32, the versions."""
    import kitsune
    from kitsune.tuning.measure import device_name, stable_spec_text
    device = tensors[0].device
    text = "\n".join([stable_spec_text(epi.spec), repr((epi.products, epi.biases, epi.alpha, epi.beta,
                                                         epi.precision)),
                      repr([(tuple(t.shape), tuple(t.stride()), str(t.dtype)) for t in tensors if t is not None]),
                      device_name(device), kitsune.__version__, torch.__version__, "fused-matmul-1"])
    return "matmul_" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _load_choice(key: str) -> MatmulChoice | None:
    try:
        return MatmulChoice.from_json(json.loads((cache_dir("decisions") / f"{key}.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_choice(key: str, choice: MatmulChoice) -> None:
    try:
        write_atomic(cache_dir("decisions") / f"{key}.json", json.dumps(choice.to_json()))
    except OSError as error:  # a read-only cache must not break the model
        log.debug("cannot cache matmul choice %s: %s", key, error)


def measure_choice(epi: MatmulEpilogue, unfused: Callable, fused: Callable, args: tuple,
                   configs: Sequence[MatmulConfig] = CONFIGS, timer=None) -> MatmulChoice:
    """Time `unfused(*args)` against `fused(config)(*args)` for each tiling
    of `configs` on these very tensors (`args` = (a, bs, biases, inputs));
    `timer` (tests): fn -> ms, default CUDA events (`capture.timing.time_ms`)."""
    from kitsune.capture.timing import MIN_GAIN, time_ms
    timer = timer or time_ms
    plain_ms = timer(lambda: unfused(*args))
    times = {}
    for config in configs:
        try:
            run = fused(config)
            times[config.label] = timer(lambda: run(*args))
        except Exception as error:  # noqa: BLE001 - a tiling that does not build (shared memory) is skipped
            log.debug("fused matmul tiling %s failed: %s", config.label, error)
            times[config.label] = float("inf")
    best = min(configs, key=lambda c: times[c.label])
    fused_ms = times[best.label]
    return MatmulChoice(best if fused_ms < MIN_GAIN * plain_ms else None, fused_ms, plain_ms, times)


class MatmulEpilogueRunner:
    """cuBLAS + the epilogue kernel, or the fused Triton matmul: whichever
    measured faster on the first real inputs (CUDA), cached per configuration.
    `runner(a, bs, biases, inputs)` returns the epilogue's outputs; `choice` is
    None until the first call (and on the CPU, where the unfused path always runs).

    unfused:  (a, bs, biases, inputs) -> outputs (default: `unfused_path(epi)`)
    allocate: (device) -> the outputs the fused kernel writes (default: `new_outputs`)
    on_choice: called with the `MatmulChoice` once it is made (a record's rewrites)
    """

    def __init__(self, epi: MatmulEpilogue, unfused: Callable | None = None, allocate: Callable | None = None,
                 configs: Sequence[MatmulConfig] = CONFIGS, timer=None, on_choice: Callable | None = None):
        # tilings as they run for this dtype and product count (two may fit to one)
        fitted = dict.fromkeys(c.fitted(epi.dtype, len(epi.products)) for c in configs)
        self.epi, self.configs, self.timer, self.on_choice = epi, tuple(fitted), timer, on_choice
        self.unfused = unfused or unfused_path(epi)
        self.allocate = allocate or (lambda device: new_outputs(epi, device))
        self.choice: MatmulChoice | None = None
        self._run: Callable | None = None

    def fused(self, config: MatmulConfig) -> Callable:
        """(a, bs, biases, inputs) -> outputs through the generated kernel in tiling `config`."""
        kernel = kernel_for(self.epi, config)

        def run(a, bs, biases, inputs):
            outputs = self.allocate(a.device)
            kernel(a, bs, biases, inputs, outputs)
            return outputs
        return run

    def __call__(self, a, bs, biases, inputs) -> list:
        if self._run is None:
            self._run = self._decide(a, bs, biases, inputs)
        try:
            return self._run(a, bs, biases, inputs)
        except (KernelError, RuntimeError) as error:
            if self._run is self.unfused:
                raise
            log.warning("fused matmul %s failed (%s); cuBLAS + kernel from now on", self.epi.spec.name, error)
            self._run = self.unfused
            return self.unfused(a, bs, biases, inputs)

    def _decide(self, a, bs, biases, inputs) -> Callable:
        if a.device.type != "cuda" and not (INTERPRETED and self.timer is not None):
            return self.unfused  # the CPU keeps MKL + the generated C epilogue
        key = decision_key(self.epi, [a, *bs, *biases, *inputs])
        choice = _CHOICES.get(key) or _load_choice(key)
        if choice is None:
            try:
                with torch.no_grad():
                    choice = measure_choice(self.epi, self.unfused, self.fused, (a, bs, biases, inputs),
                                            self.configs, self.timer)
            except Exception as error:  # noqa: BLE001 - never crash the model over a measurement
                log.warning("fused matmul %s not measured (%s): cuBLAS + kernel", self.epi.spec.name, error)
                return self.unfused
            _store_choice(key, choice)
        _CHOICES[key] = self.choice = choice
        log.info("%s: %s", self.epi.spec.name, choice.text)
        if self.on_choice is not None:
            self.on_choice(choice)
        return self.fused(choice.config) if choice.fused else self.unfused
