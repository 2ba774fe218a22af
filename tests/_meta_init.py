"""Meta-device materialisation as FSDP1 does it by default (``torch.distributed.fsdp``'s
``_materialize_meta_module``): breadth first from the root, each module that holds parameters or
buffers of its own is moved off the meta device alone (``to_empty(recurse=False)``) and its
``reset_parameters()`` called, under ``no_grad``. Written out here so that the tests need no
process group nor torch's private function (one test checks that both give the same tensors)."""

from __future__ import annotations

import collections
import itertools

import torch
from torch import nn


def materialise_like_fsdp(root: nn.Module, device: str = "cpu", skip=()) -> list[nn.Module]:
    """Materialise ``root`` in place; the subtrees of the modules in ``skip`` are left as they are.
    Returns the modules whose ``reset_parameters`` was called, in order."""
    skipped = set(map(id, skip))
    called = []
    queue = collections.deque([root])
    with torch.no_grad():
        while queue:
            module = queue.popleft()
            if id(module) in skipped:
                continue
            if any(True for _ in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))):
                module.to_empty(device=device, recurse=False)
                module.reset_parameters()
                called.append(module)
            queue.extend(module.children())
    return called
