"""A roofline estimate of time, bytes and launches, before and after fusion.

Used where nothing was measured: the detector's estimated speed-ups, the
report's before/after chart when the engine did not profile. A kernel costs

    launch overhead + max(bytes moved / bandwidth, flops / peak flop rate)

where bytes moved are the tensors it reads from memory plus those it writes.
Eager PyTorch runs one kernel per *user operation* (``F.gelu`` is one kernel
even though the captured graph holds five primitives); a fused group is one
kernel that reads its inputs once and writes only the values needed outside.

The device figures are deliberately round; `DEVICE_MODELS` says which. They
rank opportunities and draw charts, they do not predict wall time.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from kitsune.ir.ops import OpKind
from kitsune.sizes import hint, numel_of, shape_of
from kitsune.planner.units import is_kernel, nbytes, node_kind, storage_bytes, target_name, tensor_vals


@dataclass(frozen=True)
class DeviceModel:
    name: str
    bandwidth: float      # bytes / second
    flops: float          # float32 multiply-adds * 2 / second
    launch: float         # seconds per kernel launch / op dispatch


DEVICE_MODELS = {
    # H100 SXM device copy rate measured at 3.0 TB/s (DESIGN.md); TF32 tensor-core matmul.
    "cuda": DeviceModel("H100-class GPU", 3.0e12, 4.0e14, 4e-6),
    # A two-core CI machine: ~20 GB/s streaming, ~100 GFLOP/s, PyTorch op dispatch ~3 us.
    "cpu": DeviceModel("2-core CPU", 2.0e10, 1.0e11, 3e-6),
}


def device_model(nodes) -> DeviceModel:
    for n in nodes:
        for v in tensor_vals(n):
            return DEVICE_MODELS["cuda" if v.device.type == "cuda" else "cpu"]
    return DEVICE_MODELS["cpu"]


def node_flops(node: fx.Node) -> float:
    """2 * multiply-adds of a matmul or convolution node (0 for others)."""
    vals = tensor_vals(node)
    if not vals:
        return 0.0
    out = vals[0]
    kind = node_kind(node)
    try:
        if kind is OpKind.MATMUL:
            name = target_name(node)
            mats = [a for a in node.args if isinstance(a, fx.Node) and tensor_vals(a)]
            first = mats[1] if name in ("addmm", "baddbmm", "addbmm", "addmv") and len(mats) > 1 else mats[0]
            k = hint(shape_of(tensor_vals(first)[0])[-1])
            return 2.0 * hint(numel_of(out)) * k
        if kind is OpKind.CONV:
            weight = tensor_vals(node.args[1])[0]
            per_output = hint(numel_of(weight)) // max(hint(shape_of(weight)[0]), 1)
            return 2.0 * hint(numel_of(out)) * per_output
    except (IndexError, TypeError, ValueError, AttributeError):
        return 0.0
    return 0.0


@dataclass
class Estimate:
    seconds: float = 0.0
    bytes: int = 0
    launches: int = 0
    flops: float = 0.0

    def __add__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.seconds + other.seconds, self.bytes + other.bytes, self.launches + other.launches,
                        self.flops + other.flops)


def kernel_estimate(nodes, model: DeviceModel | None = None) -> Estimate:
    """One kernel running `nodes` (reading external inputs once, writing values used outside)."""
    nodes = list(nodes)
    if not any(is_kernel(n) for n in nodes):
        return Estimate()
    model = model or device_model(nodes)
    members = set(nodes)
    read = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in members and tensor_vals(a):
                read[a] = storage_bytes(a)
    written = sum(nbytes(n) for n in nodes if is_kernel(n) and _used_outside(n, members))
    moved = sum(read.values()) + written
    flops = sum(node_flops(n) for n in nodes)
    seconds = model.launch + max(moved / model.bandwidth, flops / model.flops)
    return Estimate(seconds, moved, 1, flops)


def _used_outside(node: fx.Node, members: set) -> bool:
    for user in node.users:
        if user not in members:
            return True
    return not node.users  # a value nobody reads is still written (graph outputs are users)


def eager_kernels(nodes) -> list[list]:
    """`nodes` split into the kernels eager PyTorch launches for them: one per
    aten op the user's code dispatched (``original_aten`` + ``seq_nr`` recorded
    by AOTAutograd: ``F.gelu`` is one kernel, ``F.cross_entropy`` two), one per
    node where the graph does not say."""
    parts: dict = {}
    for n in nodes:
        original, seq = n.meta.get("original_aten"), n.meta.get("seq_nr")
        key = (str(original), seq) if original is not None else n
        parts.setdefault(key, []).append(n)
    return list(parts.values())


def eager_estimate(units) -> Estimate:
    """Eager PyTorch running the user operations of `units` (see `eager_kernels`)."""
    total = Estimate()
    for unit in units:
        for part in eager_kernels(unit.nodes):
            total = total + kernel_estimate(part) + _cpu_addmm_copy(part)
    return total


def _cpu_addmm_copy(part) -> Estimate:
    """What eager's CPU addmm moves besides its GEMM: it copies the bias into the
    output, then accumulates into it (beta = 1), so the output is written and
    read once more. Kitsune captures it as mm + add (`capture.dynamo`)."""
    if str(part[0].meta.get("original_aten")) != "aten.addmm.default":
        return Estimate()
    out = next((n for n in reversed(part) if tensor_vals(n)), None)
    if out is None or tensor_vals(out)[0].device.type != "cpu":
        return Estimate()
    extra = 2 * nbytes(out)
    return Estimate(extra / device_model(part).bandwidth, extra, 0, 0)


def nodes_estimate(nodes) -> Estimate:
    """Every kernel node on its own (how unfused aten nodes run under Kitsune)."""
    total = Estimate()
    for n in nodes:
        if is_kernel(n):
            total = total + kernel_estimate([n])
    return total
