"""The interpreter's memcheck (tests/_bounds.py), which every interpreted launch in this suite runs under."""

import pytest
import torch

import _bounds
from conftest import BOUNDS_CHECK, TRITON_RUNS

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(not TRITON_RUNS, reason="needs triton (under the interpreter)"),
              pytest.mark.skipif(not _bounds.wanted(), reason="the check is off (ACE_TEST_BOUNDS=0)")]

if TRITON_RUNS:
    import triton
    import triton.language as tl
    from triton.runtime.errors import InterpreterError

    @triton.jit
    def _shifted_copy(src, dst, n, shift, extra, BLOCK: tl.constexpr):
        """dst[i + shift] = src[i] for i < n + extra (src read masked to n, 0 past it)."""
        offs = tl.arange(0, BLOCK)
        x = tl.load(src + offs, mask=offs < n, other=0.0)
        tl.store(dst + offs + shift, x, mask=offs < n + extra)

    @triton.jit
    def _unmasked_copy(src, dst, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs))

    @triton.jit
    def _atomic_add(dst, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.atomic_add(dst + offs, 1.0, mask=offs < n)

    @triton.jit
    def _compare_and_swap(dst, at):
        tl.atomic_cas(dst + at, 0, 7)


def _failure(kernel, grid, *args, **meta) -> str:
    with pytest.raises(InterpreterError) as caught:
        kernel[grid](*args, **meta)
    assert "OutOfBoundsAccess" in str(caught.value), caught.value
    return str(caught.value)


def test_the_suite_runs_every_interpreted_launch_under_the_check():
    from triton.runtime.interpreter import GridExecutor, InterpreterBuilder

    assert BOUNDS_CHECK and _bounds.installed()
    assert getattr(GridExecutor.__call__, "_ace_bounds_check", False)
    assert InterpreterBuilder.create_masked_load.__module__ == "_bounds"


def test_accesses_anywhere_in_an_arguments_storage_pass():
    src = torch.arange(1.0, 11.0)
    whole = torch.zeros(20)
    # Past the view's end but inside its storage: allowed (as on a GPU), and seen by the caller.
    _shifted_copy[(1,)](src, whole[5:15], 10, 0, 3, BLOCK=16)
    assert whole.tolist() == [0.0] * 5 + list(range(1, 11)) + [0.0] * 5
    # Unmasked, exactly to the last byte.
    dst = torch.zeros(8, dtype=torch.int64)
    _unmasked_copy[(1,)](torch.arange(8), dst, BLOCK=8)
    assert dst.tolist() == list(range(8))


@pytest.mark.parametrize("shift,extra,lanes,where", [
    (0, 1, 1, "4 byte(s) past the end of dst (40 bytes)"),
    (0, 3, 3, "4 byte(s) past the end of dst (40 bytes)"),
    (-2, 0, 2, "8 byte(s) before the start of dst (40 bytes)"),
    (10_000, 0, 10, None),  # far from every storage: which is nearest depends on the allocator
])
def test_a_store_outside_the_storages_fails_before_it_is_made(shift, extra, lanes, where):
    src = torch.arange(1.0, 11.0)
    dst = torch.zeros(10)
    said = _failure(_shifted_copy, (1,), src, dst, 10, shift, extra, BLOCK=16)
    assert (f"Triton kernel _shifted_copy: a store of 4-byte elements outside its tensor arguments' storages in "
            f"{lanes} of {10 + extra} lane(s); the first {where or ''}") in said, said
    assert not dst.any()


def test_a_load_outside_the_storages_fails_naming_the_nearest_argument():
    src = torch.arange(1.0, 5.0)
    said = _failure(_unmasked_copy, (1,), src, torch.zeros(8), BLOCK=8)
    assert "a load of 4-byte elements outside its tensor arguments' storages in 4 of 8 lane(s)" in said, said
    # The first stray lane, src[4], lies right after src's 16 bytes.
    assert "the first 4 byte(s) past the end of src (16 bytes)" in said, said
    # 16-bit elements count as 2 bytes.
    said = _failure(_unmasked_copy, (1,), torch.ones(3, dtype=torch.float16), torch.zeros(4, dtype=torch.float16),
                    BLOCK=4)
    assert "a load of 2-byte elements" in said and "1 of 4 lane(s)" in said, said


def test_views_of_one_storage_name_every_argument_and_an_empty_tensor_allows_nothing():
    storage = torch.zeros(12)
    said = _failure(_shifted_copy, (1,), storage[0:4], storage[4:8], 4, 8, 1, BLOCK=8)
    assert "the first 4 byte(s) past the end of src, dst (48 bytes)" in said, said
    said = _failure(_shifted_copy, (1,), torch.ones(4), torch.zeros(0), 0, 0, 1, BLOCK=4)
    assert "a store of 4-byte elements outside its tensor arguments' storages in 1 of 1 lane(s)" in said, said


def test_atomics_are_checked_too():
    dst = torch.zeros(4)
    _atomic_add[(1,)](dst, 4, BLOCK=8)
    assert dst.tolist() == [1.0] * 4
    said = _failure(_atomic_add, (1,), dst, 5, BLOCK=8)
    assert "an atomic read-modify-write of 4-byte elements" in said and "1 of 5 lane(s)" in said, said
    flags = torch.zeros(2, dtype=torch.int32)
    _compare_and_swap[(1,)](flags, 1)
    assert flags.tolist() == [0, 7]
    said = _failure(_compare_and_swap, (1,), flags, 2)
    assert "compare-and-swap of 4-byte elements" in said and "4 byte(s) past the end of dst (8 bytes)" in said, said


def test_outside_a_launch_nothing_is_checked():
    assert _bounds._LAUNCH.ranges is None
