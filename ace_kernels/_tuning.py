"""Launch configurations measured on a GPU model, and forcing one for a sweep.

A kernel module declares, per kernel and dtype class, its default GPU configuration and a
short list of alternatives (``register(family, {(kernel, dtype class): candidates})``), every
one compiled ahead of time for sm_90a without register spills by the test-suite. A benchmark run
on a GPU times the alternatives side by side (``python -m benchmarks --only tuning``) and
``python -m benchmarks.tuned_configs RESULTS.json`` writes the fastest correct one per card into
``tuned_configs.json`` beside this file. :func:`launch_config` returns that choice for the card a
call runs on, the default otherwise.

Only a configuration among the declared candidates is taken from the file: an entry that is
not one of them (edited by hand, or left from an older candidate list) is ignored with a
warning, so no configuration that the spill check has not seen is ever launched.

Nothing here touches the GPU at import time; the file is read once, at import.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import os
import sys
import textwrap
import threading
import warnings
from typing import Callable, Iterator

import torch

from ace_kernels import _dispatch

TUNED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_configs.json")


_TUNED = _dispatch.read_by_device(TUNED_FILE, levels=2)  # card, then family: objects
# Process-wide, not per thread: autograd runs a CUDA backward on its own device thread, which
# must see what the sweep forced around its forward and backward calls.
_FORCED: list = []
_FORCED_LOCK = threading.Lock()
_WARNED: set = set()
_CANDIDATES: dict[str, dict] = {}
_DEFAULTS: dict[str, Callable[[str, str], dict]] = {}
_SOURCES: dict[str, tuple[str, tuple[int, int]]] = {}  # family -> (its module's file, its stat at import)


def register(family: str, candidates: dict, default: Callable[[str, str], dict], module: str) -> None:
    """Declare ``family``'s sweep candidates, ``{(kernel, dtype class): (config, ...)}``,
    ``default(kernel, dtype class)``, the GPU configuration they are measured against, and the
    name of the module that holds its Triton kernels (see :func:`kernel_digest`)."""
    _CANDIDATES[family] = candidates
    _DEFAULTS[family] = default
    path = sys.modules[module].__file__
    _SOURCES[family] = (path, _file_stamp(path))  # the file as imported (a stat: no read at import)


def _file_stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=None)
def kernel_digest(family: str) -> str | None:
    """A digest of the sources of ``family``'s Triton kernels (the functions its module decorates
    with ``triton.jit``, by name), or None for a family not registered. A sweep records it: what
    it measured holds for those kernels only, and the tool that writes :data:`TUNED_FILE` takes
    it from a run of the same kernels. Read from the module's file (Triton need not import);
    a ``RuntimeError`` when that file changed since it was imported (its digest would not
    describe the kernels this process runs)."""
    if family not in _SOURCES:
        return None
    path, stamp = _SOURCES[family]
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if _file_stamp(path) != stamp:
        raise RuntimeError(f"{path} changed since it was imported: its kernels' digest would not describe the "
                           "kernels this process runs")
    digest = hashlib.sha256()
    for node in sorted(_jit_functions(ast.parse(text)), key=lambda n: n.name):
        digest.update(f"{node.name}\n{textwrap.dedent(ast.get_source_segment(text, node, padded=True))}\n".encode())
    return digest.hexdigest()[:16]


def _jit_functions(tree: ast.AST) -> list[ast.FunctionDef]:
    """The functions of ``tree`` decorated with ``triton.jit`` (or ``triton.jit(...)``)."""
    def is_jit(decorator) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return (isinstance(target, ast.Attribute) and target.attr == "jit" and isinstance(target.value, ast.Name)
                and target.value.id == "triton")

    return [node for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and any(is_jit(d) for d in node.decorator_list)]


def default(family: str, kernel: str, dtype_class: str) -> dict:
    """The default GPU configuration of one swept kernel and dtype class (a copy)."""
    return dict(_DEFAULTS[family](kernel, dtype_class))


def candidates(family: str, kernel: str, dtype_class: str) -> tuple:
    """The declared candidates of one kernel and dtype class (empty when none are declared)."""
    return tuple(_CANDIDATES.get(family, {}).get((kernel, dtype_class), ()))


def declared_number(family: str, kernel: str, dtype_class: str, config: dict) -> int | None:
    """Which declared configuration ``config`` is, by the keys they declare (keys a launch derives,
    such as a D width, are not compared): 0 the default, n the n-th candidate, None neither."""
    declared = (_DEFAULTS[family](kernel, dtype_class), *candidates(family, kernel, dtype_class))
    return next((number for number, entry in enumerate(declared)
                 if all(k in config and config[k] == v for k, v in entry.items())), None)


def registered() -> dict:
    """``{family: {(kernel, dtype class): (config, ...)}}`` of every kernel module imported."""
    return {family: dict(table) for family, table in _CANDIDATES.items()}


def tuned_configs() -> dict:
    """``{device name: {family: {"kernel/dtype class": config}}}`` from :data:`TUNED_FILE`."""
    return _TUNED


def key(kernel: str, dtype_class: str) -> str:
    return f"{kernel}/{dtype_class}"


def dtype_class(dtype: torch.dtype) -> str:
    """The dtype part of a kernel's configuration key: ``"fp32"`` or ``"16bit"`` (fp16 and bf16)."""
    return "fp32" if dtype == torch.float32 else "16bit"


@contextlib.contextmanager
def forced(family: str, kernel: str, dtype_class: str, config: dict) -> Iterator[None]:
    """Launch ``family``'s ``kernel`` for ``dtype_class`` with ``config``, on any device (the
    interpreter included), until the block ends. For sweeps and tests: it applies to every
    thread of the process (autograd's backward threads among them), so only one thread should
    force configurations at a time."""
    entry = ((family, key(kernel, dtype_class)), dict(config))
    with _FORCED_LOCK:
        _FORCED.append(entry)
    try:
        yield
    finally:
        with _FORCED_LOCK:
            _FORCED.remove(entry)


def forced_config(family: str, kernel: str, dtype_class: str) -> dict | None:
    """The configuration :func:`forced` sets for this kernel (the innermost block's), or None."""
    if not _FORCED:  # outside sweeps and tests: no lock, no copy on the launch path
        return None
    wanted = (family, key(kernel, dtype_class))
    with _FORCED_LOCK:
        entries = list(_FORCED)
    for name, config in reversed(entries):
        if name == wanted:
            return dict(config)
    return None


def _same_config(entry: dict, declared: dict) -> bool:
    return entry.keys() == declared.keys() and all(type(entry[k]) is type(v) and entry[k] == v
                                                   for k, v in declared.items())


def launch_config(family: str, kernel: str, dtype_class: str, device: torch.device | None, default: dict) -> dict:
    """The configuration to launch: a forced one (on any device), else on a CUDA ``device`` the one
    measured fastest on its card model when it is among the declared candidates, else a copy of
    ``default`` (the caller's: the interpreter's tiles on a CPU)."""
    config = forced_config(family, kernel, dtype_class)
    if config is not None:
        return config
    if not _TUNED or device is None or device.type != "cuda":
        return dict(default)
    name = _dispatch.device_name(device)
    entry = ((_TUNED.get(name) or {}).get(family) or {}).get(key(kernel, dtype_class))
    if entry is None:
        return dict(default)
    # The declared configuration the entry names, not the entry: JSON's 32.0 and true compare
    # equal to 32 and 1 but would reach the launch as a float and a bool.
    for declared in (default, *candidates(family, kernel, dtype_class)):
        if isinstance(entry, dict) and _same_config(entry, declared):
            return dict(declared)
    where = (name, family, key(kernel, dtype_class))
    if where not in _WARNED:
        _WARNED.add(where)
        warnings.warn(f"{TUNED_FILE}: the configuration for {family} {key(kernel, dtype_class)} on {name!r} "
                      f"({entry}) is not one of the declared candidates; the default is used", RuntimeWarning,
                      stacklevel=3)
    return dict(default)
