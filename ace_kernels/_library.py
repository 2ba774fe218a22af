"""Kernel launchers as ``torch.library`` custom ops, for ``torch.compile``.

A launcher (the host function that picks a configuration and launches Triton kernels) does
things Dynamo cannot trace: it reads ``data_ptr()`` to test alignment, queries the device,
and calls Triton's own launch code. Wrapped by :func:`launcher`, it is called

* directly in eager mode (no dispatcher overhead on the hot path), and
* through a custom op ``ace_triton::<name>`` while ``torch.compile`` traces: one opaque
  node whose output shapes come from a fake implementation, so Dynamo never looks inside
  and inductor calls it as an extern kernel; so too under ``FakeTensorMode`` (the fake
  implementation gives the outputs) and ``make_fx``'s tracing (one node per launch).

Both paths run the same launcher, so compiled and eager results are bit-identical. The ops
are registered for every device: under ``TRITON_INTERPRET=1`` they take CPU tensors, which
is how the CPU tests compile the Triton backends. Registering costs about a millisecond in
all and imports nothing from Dynamo.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

NAMESPACE = "ace_triton"
# Dispatch modes that record or fake ops rather than run them: a launch under them reaches no node.
_TRACING_MODES = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY)
# name -> custom op, for the tests (every registered op is checked with torch.library.opcheck).
REGISTERED: dict[str, object] = {}


def launcher(name: str, fake: Callable) -> Callable:
    """Decorator: make ``fn`` callable under ``torch.compile`` as the op ``ace_triton::<name>``.

    ``fn`` needs type annotations (tensors, optional tensors, int, float, bool; returning a
    tensor or a tuple of tensors that alias neither its inputs nor each other) and must not
    mutate its inputs. ``fake`` takes the same arguments and returns empty outputs of the right
    shapes, dtypes and devices. The op is reachable as ``wrapped.op``.
    """

    def wrap(fn: Callable) -> Callable:
        fn = _on_inputs_device(fn)
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        REGISTERED[name] = op

        @functools.wraps(fn)
        def call(*args):
            # Through the op while compiling; under FakeTensorMode, which has no memory to launch on
            # (the op takes the fake implementation); and under make_fx's proxy mode, whose graph holds
            # torch ops only (a kernel launched directly would be in no node). Other dispatch modes keep
            # the direct call, which lets them see the torch ops inside the launcher (FlopCounterMode
            # counts its GEMMs; through the op they would be hidden).
            if torch.compiler.is_compiling() or _tracing_mode_active():
                return op(*args)
            return fn(*_resolve_neg(args))

        call.op = op
        return call

    return wrap


def _tracing_mode_active() -> bool:
    """Whether a dispatch mode of :data:`_TRACING_MODES` is active. The stack's length first: it is
    0 in plain eager calls, which then skip the per-mode queries (a third of the time per launch)."""
    return torch._C._len_torch_dispatch_stack() > 0 and any(
        torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES)


def _resolve_neg(args: tuple) -> tuple:
    """``args`` with every tensor that has the negative bit set resolved (copied with its values).

    The kernels read a tensor's memory; a negative-bit view (``z.conj().imag`` of a complex ``z``,
    say) stores the negation of its values. Through the dispatcher (the custom op) torch resolves
    such inputs before the launcher runs; the eager call bypasses it, so it resolves them here.
    """
    if any(isinstance(arg, torch.Tensor) and arg.is_neg() for arg in args):
        return tuple(arg.resolve_neg() if isinstance(arg, torch.Tensor) else arg for arg in args)
    return args


def _on_inputs_device(fn: Callable) -> Callable:
    """Run ``fn`` with its first tensor argument's GPU as the current device.

    Triton launches on the current device and its current stream, not on the tensors'
    device: without this guard, tensors on ``cuda:1`` while device 0 is current would be
    read by a kernel running on GPU 0, unordered with the stream that produced them.
    """

    @functools.wraps(fn)
    def run(*args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if arg.is_cuda and arg.get_device() != torch.cuda.current_device():
                    with torch.cuda.device(arg.device):
                        return fn(*args)
                break
        return fn(*args)

    return run


def builds_graph(tensors) -> bool:
    """Whether an eager call on ``tensors`` (non-tensors among them are ignored) records an autograd
    graph: grad mode on and one of them requiring grad. False while compiling."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors))


def out_of_inference(t):
    """``t``, or a copy of it made outside inference mode when ``t`` is an inference tensor (made under
    ``torch.inference_mode``, such as a frozen tower's cached outputs), which autograd cannot save."""
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


def int32_safe(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``t``, or a contiguous copy of it when an element offset along one of ``dims`` reaches 2**31.

    The kernels index ``dims`` with 32-bit loop counters (program ids are widened to 64 bits,
    loop counters are not, to keep the inner loops' address arithmetic 32-bit), so such a
    dimension's ``(size - 1) * stride`` must stay below 2**31. Only unusual layouts break it
    (a [M, K] operand stored column-major with M * K >= 2**31, say); contiguous, they do not.
    """
    if any(t.shape[d] > 1 and (t.shape[d] - 1) * t.stride(d) >= 2**31 for d in dims):
        return t.contiguous()
    return t


# CUDA caps grid dimensions y and z at this many blocks (x at 2**31 - 1).
MAX_GRID_YZ = 65535


def _autocast_on(device_type: str) -> bool:
    # Autocast knows no meta device (torch.is_autocast_enabled("meta") raises). Not through
    # torch.amp.is_autocast_available: torch.compile cannot trace it in torch 2.11.
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def autocast_dtype(x) -> torch.dtype | None:
    """The autocast dtype in force for floating-point ``x``'s device type, or None."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or not _autocast_on(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


def autocast_off(device_type: str):
    """A context with autocast off for ``device_type`` (a no-op context when it is off already)."""
    if _autocast_on(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_off_backward(backward: Callable) -> Callable:
    """Decorator for an autograd Function's ``backward``: run it with autocast off.

    Autograd runs a backward under whatever autocast state is current, so a ``loss.backward()``
    inside an autocast region would drop the backward's torch matmuls to the autocast dtype
    (or fail on mixed dtypes), while the forward ran with autocast off.
    """

    @functools.wraps(backward)
    def run(ctx, *grads):
        device_type = next((g.device.type for g in grads if isinstance(g, torch.Tensor)), "cpu")
        if torch.compiler.is_compiling() and device_type != "meta":
            # Dynamo traces the backward where autocast reads as off, and AOTAutograd then runs
            # that trace under the forward's autocast: the check would leave it on there.
            context = torch.autocast(device_type, enabled=False)
        else:
            context = autocast_off(device_type)
        with context:
            return backward(ctx, *grads)

    return run


def kernel_backward(message: str) -> Callable[[Callable], Callable]:
    """Decorator for the ``backward`` of a Function whose backward has no graph of its own: run
    it with autocast off (:func:`autocast_off_backward`), refusing second derivatives with
    ``message`` first (:func:`refuse_second_derivative`)."""

    def wrap(backward: Callable) -> Callable:
        @autocast_off_backward
        @functools.wraps(backward)
        def run(ctx, *grads):
            refuse_second_derivative(message)
            return backward(ctx, *grads)

        return run

    return wrap


def refuse_second_derivative(message: str) -> None:
    """Called first in a backward built from kernels (or in-place tiles): raise ``message`` when
    autograd runs it with ``create_graph=True`` (the only time it runs a backward with grad mode
    on), since a second derivative through it would come back silently incomplete."""
    if torch.is_grad_enabled():
        raise RuntimeError(message)


def spans(lo, hi, step: int) -> list:
    """``(start, stop)`` pairs covering ``range(lo, hi)`` ``step`` at a time. A range within one
    step is one pair, with no loop over its length, so that a symbolic size (torch.export with a
    dynamic batch, torch.compile(dynamic=True)) stays symbolic, guarded by ``hi - lo <= step``,
    where a loop would specialise it to the traced value."""
    if hi - lo <= step:
        return [(lo, hi)]
    return [(start, min(start + step, hi)) for start in range(lo, hi, step)]


def in_place_ok() -> bool:
    """Whether a forward may update its own intermediates in place (one buffer less): not while
    tracing (torch 2.11's AOTAutograd returned zero gradients for a Function's output updated in
    place), nor under a torch dispatch mode. Selective activation checkpointing
    (``create_selective_checkpoint_contexts``) runs the forward under one that keeps the results of
    the ops its policy saves (matmuls, as in torch's own example) and refuses, when it recomputes,
    a kept result that was changed in place since."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
