"""LazyTensor: the placeholder a lazy region returns for a recorded operation.

A LazyTensor has the metadata eager PyTorch would give the result (shape,
strides, storage offset, dtype, device: computed with fake tensors, so they are
eager's) and no storage. It names a node of its region's pending graph. When
the region flushes, the value is computed and the placeholder *becomes* the
real tensor (`torch.utils.swap_tensors`: the same Python object, now a plain
`torch.Tensor`), so escaped tensors are ordinary tensors. Where the swap is
refused (the dispatcher still holds the placeholder, e.g. it is the argument of
the `.item()` that caused the flush), the placeholder keeps the value in
`_real` and forwards every operation to it.
"""
from __future__ import annotations

import torch

from kitsune import _compat

# (shape, stride, storage_offset, dtype, device): everything eager's result tells
# about itself without data, and the key the meta cache and the graph cache use.
Meta = tuple


def meta_of(t: torch.Tensor) -> Meta:
    return (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device)


def fake_from_meta(meta: Meta, fake_mode) -> torch.Tensor:
    """A fake tensor with exactly `meta`'s layout (a storage large enough for it)."""
    shape, stride, offset, dtype, device = meta
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    with fake_mode:
        storage = torch.empty(offset + extent, dtype=dtype, device=device)
        return storage.as_strided(shape, stride, offset)


class LazyTensor(torch.Tensor):
    """A recorded result not computed yet (see the module docstring)."""

    @staticmethod
    def __new__(cls, region, node: int, meta: Meta, view_of=None):
        shape, stride, offset, dtype, device = meta
        tensor = _compat.make_wrapper_subclass(cls, shape, strides=stride, storage_offset=offset,
                                                     dtype=dtype, device=device)
        tensor._region = region
        tensor._node = node
        tensor._meta = meta
        if view_of is not None:
            tensor._view_of = view_of
        return tensor

    # defaults in the class: fewer writes per placeholder on the recording path
    _real = None         # the value, once computed (while this object forwards to it)
    # (base LazyTensor, view op, args after the base, kwargs): materialised as that
    # view of the base's value, so writes through it reach the base as in eager
    _view_of = None
    _has_views = False

    @property
    def pending(self) -> bool:
        return self._real is None

    def value(self) -> torch.Tensor:
        """The real tensor (flushing the region that owns this one if it is pending)."""
        if self._real is None:
            self._region.flush("escaped tensor")
        if type(self) is not LazyTensor:  # swapped: this object is the real tensor now
            return self
        if self._real is None:  # only PyTorch's C++ side held it at the flush: not computed
            raise RuntimeError("kitsune.lazy: a recorded value was dropped before it was computed; "
                               "keep a Python reference to it inside the region")
        return self._real

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached with no lazy region active (an escaped placeholder the swap
        # could not replace, or a region left without flushing): run on values.
        args, kwargs = _compat.tree_map_only(LazyTensor, LazyTensor.value, (args, kwargs or {}))
        return func(*args, **kwargs)

    # What reads data without going through the dispatcher: on the value, with the lazy
    # region out of the way (printing's own ops would otherwise be recorded).
    def __repr__(self, *, tensor_contents=None):
        return _outside(repr, self.value())

    def __format__(self, spec):
        return _outside(format, self.value(), spec)

    def tolist(self):
        return _outside(torch.Tensor.tolist, self.value())

    def numpy(self, *, force=False):
        return _outside(torch.Tensor.numpy, self.value(), force=force)

    def __array__(self, dtype=None):
        return _outside(torch.Tensor.__array__, self.value(), dtype)

    def data_ptr(self):
        return self.value().data_ptr()

    def untyped_storage(self):
        return self.value().untyped_storage()

    def __reduce_ex__(self, protocol):
        return _outside(torch.Tensor.__reduce_ex__, self.value(), protocol)

    def __deepcopy__(self, memo):
        return _outside(torch.Tensor.__deepcopy__, self.value(), memo)


def _outside(fn, *args, **kwargs):
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return fn(*args, **kwargs)
