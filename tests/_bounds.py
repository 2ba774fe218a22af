"""The interpreter's memcheck: every load and store of an interpreted Triton kernel checked against its arguments.

Under TRITON_INTERPRET=1 a kernel's pointers are host addresses. An access that the kernel's mask lets
through past its tensor's storage reads or writes whatever the allocator put there: silently, or as a
crash far from its cause (on a GPU the same access reads another buffer or faults). While :func:`install`
is in force, each interpreted launch notes the storages of its tensor arguments, and each load, store and
atomic of the kernel checks, before it runs, that every byte of every lane its mask lets through lies in
one of them. One that does not fails the launch, naming the kernel, the access, how many lanes stray and
where the first one lands: how far past the end (or before the start) of which argument's storage.

An access between two arguments' storages counts as the nearer one's. Views that share a storage share its
range: a kernel may reach past its view into the rest of the storage unnoticed, as it may on a GPU.
"""

from __future__ import annotations

import functools
import os
import threading

import numpy as np
import torch


class OutOfBoundsAccess(AssertionError):
    """An interpreted kernel loaded or stored outside the storages of its tensor arguments."""


class _Launch(threading.local):
    ranges: tuple[np.ndarray, np.ndarray, list[str]] | None = None
    kernel: str = ""


_LAUNCH = _Launch()


def _storages(arg_names, args, kwargs) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The tensor arguments' storages as sorted [start, end) byte ranges, each with its arguments' names."""
    named: dict[tuple[int, int], list[str]] = {}
    # A launch may pass its last arguments by keyword: fewer positional ones than names.
    for name, arg in [*zip(arg_names, args, strict=False), *kwargs.items()]:
        if isinstance(arg, torch.Tensor) and arg.device.type == "cpu":
            storage = arg.untyped_storage()
            named.setdefault((storage.data_ptr(), storage.nbytes()), []).append(name)
    spans = sorted(named)
    starts = np.array([start for start, _ in spans], dtype=np.uint64)
    ends = np.array([start + size for start, size in spans], dtype=np.uint64)
    return starts, ends, [", ".join(named[span]) for span in spans]


def _where(address: int, size: int, starts: np.ndarray, ends: np.ndarray, names: list[str]) -> str:
    """Where an access of ``size`` bytes at ``address`` lands, from the nearest argument storage."""
    places = []
    below = int(np.searchsorted(starts, address, side="right")) - 1
    if below >= 0:  # the storage starting at or before it: past that one's end
        places.append((address + size - int(ends[below]), f"past the end of {names[below]}", below))
    if below + 1 < len(starts):  # the next storage: before its start
        places.append((int(starts[below + 1]) - address, f"before the start of {names[below + 1]}", below + 1))
    if not places:
        return "with no tensor argument at all"
    distance, side, which = min(places)
    return f"{distance} byte(s) {side} ({int(ends[which] - starts[which])} bytes)"


def _check(access: str, ptrs, mask, itemsize: int) -> None:
    if _LAUNCH.ranges is None:
        return
    addresses = np.asarray(ptrs.data).astype(np.uint64, copy=False).ravel()
    if mask is not None:
        addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).ravel()]
    if addresses.size == 0:
        return
    starts, ends, names = _LAUNCH.ranges
    below = np.searchsorted(starts, addresses, side="right").astype(np.int64) - 1
    inside = below >= 0
    inside[inside] = addresses[inside] + np.uint64(itemsize) <= ends[below[inside]]
    if inside.all():
        return
    stray = addresses[~inside]
    raise OutOfBoundsAccess(f"Triton kernel {_LAUNCH.kernel}: {access} of {itemsize}-byte elements outside its "
                            f"tensor arguments' storages in {stray.size} of {addresses.size} lane(s); the first "
                            + _where(int(stray[0]), itemsize, starts, ends, names))


def wanted() -> bool:
    """Whether this process's launches are to be checked: under the interpreter, unless ACE_TEST_BOUNDS=0."""
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ACE_TEST_BOUNDS", "1") != "0"


def installed() -> bool:
    try:
        from triton.runtime.interpreter import GridExecutor
    except ImportError:
        return False
    return getattr(GridExecutor.__call__, "_ace_bounds_check", False)


def install() -> None:
    """Check every interpreted launch in this process from now on (idempotent)."""
    from triton.runtime.interpreter import GridExecutor, InterpreterBuilder, _get_np_dtype

    if installed():
        return
    launch = GridExecutor.__call__

    @functools.wraps(launch)
    def checked_launch(self, *args, **kwargs):
        outer = _LAUNCH.ranges, _LAUNCH.kernel
        _LAUNCH.ranges = _storages(self.arg_names, args, kwargs)
        _LAUNCH.kernel = getattr(self.fn, "__name__", repr(self.fn))
        try:
            return launch(self, *args, **kwargs)
        finally:
            _LAUNCH.ranges, _LAUNCH.kernel = outer

    masked_load = InterpreterBuilder.create_masked_load
    masked_store = InterpreterBuilder.create_masked_store
    atomic_rmw = InterpreterBuilder.create_atomic_rmw
    atomic_cas = InterpreterBuilder.create_atomic_cas

    def itemsize(ptrs) -> int:  # the pointers' element type (a stored value is cast to it first)
        return _get_np_dtype(ptrs.get_element_ty()).itemsize

    def create_masked_load(self, ptrs, mask, other, *rest, **kw):
        _check("a load", ptrs, mask, itemsize(ptrs))
        return masked_load(self, ptrs, mask, other, *rest, **kw)

    def create_masked_store(self, ptrs, value, mask, *rest, **kw):
        _check("a store", ptrs, mask, itemsize(ptrs))
        return masked_store(self, ptrs, value, mask, *rest, **kw)

    def create_atomic_rmw(self, op, ptr, val, mask, *rest, **kw):
        _check("an atomic read-modify-write", ptr, mask, itemsize(ptr))
        return atomic_rmw(self, op, ptr, val, mask, *rest, **kw)

    def create_atomic_cas(self, ptr, cmp, val, *rest, **kw):
        _check("an atomic compare-and-swap", ptr, None, itemsize(ptr))
        return atomic_cas(self, ptr, cmp, val, *rest, **kw)

    checked_launch._ace_bounds_check = True
    GridExecutor.__call__ = checked_launch
    InterpreterBuilder.create_masked_load = create_masked_load
    InterpreterBuilder.create_masked_store = create_masked_store
    InterpreterBuilder.create_atomic_rmw = create_atomic_rmw
    InterpreterBuilder.create_atomic_cas = create_atomic_cas
