"""Kernel launchers as ``torch.library`` custom ops, for ``torch.compile``.

A launcher (the host function that picks a configuration and launches Triton kernels) does
things Dynamo cannot trace: it reads ``data_ptr()`` to test alignment, queries the device,
and calls Triton's own launch code. Wrapped by :func:`launcher`, it is called

* directly in eager mode (no dispatcher overhead on the hot path), and
* through a custom op ``ace_triton::<name>`` while ``torch.compile`` traces: one opaque
  node whose output shapes come from a fake implementation, so Dynamo never looks inside
  and inductor calls it as an extern kernel.

Both paths run the same launcher, so compiled and eager results are bit-identical. The ops
are registered for every device: under ``TRITON_INTERPRET=1`` they take CPU tensors, which
is how the CPU tests compile the Triton backends. Registering costs about a millisecond in
all and imports nothing from Dynamo.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

NAMESPACE = "ace_triton"
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
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        REGISTERED[name] = op

        @functools.wraps(fn)
        def call(*args):
            if torch.compiler.is_compiling():
                return op(*args)
            return fn(*args)

        call.op = op
        return call

    return wrap
