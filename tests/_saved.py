"""What autograd keeps for the backward, measured (a saved-tensors hook), not reported."""

from __future__ import annotations

import torch


def saved_storage_bytes(fn, exclude=()):
    """``(bytes, fn())``: the bytes of the distinct storages autograd saves while ``fn()`` runs,
    leaving out those of the tensors in ``exclude`` (weights and parameters, which exist whether
    or not a backward follows). Views of one storage count once."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result


def saved_storages(fn):
    """``(pointers, fn())``: the data pointers of the storages autograd saves while ``fn()`` runs
    (which of the inputs an op keeps for its backward)."""
    seen = set()

    def pack(t):
        seen.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return seen, result
