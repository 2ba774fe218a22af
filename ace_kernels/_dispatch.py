"""Backend registry and per-call dispatch.

Every public op is implemented by up to three backends:

``cuda``
    Hand-written CUDA C++ kernels in the optional extension ``ace_kernels._C``.
``triton``
    Triton kernels. On a machine without a GPU they run under the Triton
    interpreter when ``TRITON_INTERPRET=1`` is set before ``ace_kernels`` is
    imported (used by the CPU test-suite; far too slow for real work).
``torch``
    Exact PyTorch code that runs on any device.

Each backend answers ``reasons(*tensors) -> list[str]``: an empty list means it
can run the call. ``backend="auto"`` takes the first backend of the op's
preference order that has no reasons; an explicitly requested backend that
cannot run raises ``RuntimeError`` listing why (for Triton, among others: a launch configuration
needing more shared memory per block than the call's GPU gives, :func:`shared_memory_reasons`). On a GPU model that the
benchmark suite has measured, the preference order is the measured one
(fastest first, ``dispatch_order.json`` beside this file); an op that declares
variants (``ace_hypergraph``: ``cls_only`` and ``full``, whose fastest backends
differ; ``lora_linear`` and ``lora_qkv``: ``small`` and ``large``, under or from 65,536 rows)
is ordered per variant where the file has an entry ``op[variant]``. The environment variable
``ACE_KERNELS_BACKEND`` (``auto|cuda|triton|torch``) replaces ``"auto"``, the default
backend of every op or passed explicitly.

Nothing here touches the GPU or the extension at import time.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import struct
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ace_kernels._checks import check_bool
from ace_kernels._sources import sources_sha256

BACKENDS: tuple[str, ...] = ("cuda", "triton", "torch")
_ENV_VAR = "ACE_KERNELS_BACKEND"


_ONCE: dict = {}


def _once(fn):
    """Cache a no-argument function's result for the process (what ``functools.lru_cache``
    would do, in a plain dict that ``torch.compile`` reads without warning).

    Under torch.compile the cached function runs eagerly at trace time and its result is taken as a
    constant (as :func:`_run_eagerly`'s): traced, a first call inside a compiled function guarded on
    the dict lacking the key, which the replayed store then filled, so the next call recompiled."""

    @functools.wraps(fn)
    def cached():
        if fn.__name__ not in _ONCE:
            _ONCE[fn.__name__] = fn()
        return _ONCE[fn.__name__]

    cached._dynamo_marked_constant = True
    return cached


# The values of TRITON_INTERPRET that Triton reads as on (its getenv_bool, case-insensitive): "true"
# there ran the kernels under the interpreter while the checks here took them for compiled ones.
_TRUE_WORDS = ("1", "true", "on", "yes", "y")


def interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter: TRITON_INTERPRET set to a value
    Triton reads as on (``1``, ``true``, ``on``, ``yes``, ``y``, in any case)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE_WORDS


# Triton decides between compiled kernels and its interpreter when a kernel is decorated, that
# is when ace_kernels is imported; a later change of the variable does not reach the kernels.
_INTERPRETER_AT_IMPORT = interpreter_enabled()


@_once
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as exc:
        if getattr(exc, "name", None) in ("triton", "triton.language") or "triton" in str(exc):
            return f"the 'triton' package is not importable ({exc})"
        return f"importing triton failed: {exc}"
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"importing triton failed: {type(exc).__name__}: {exc}"
    return None


def _cut_short(path: str) -> str | None:
    """Why the shared library at ``path`` is cut short (None: it is whole, or not a 64-bit ELF file).

    The loader maps such a file (an interrupted build or copy) and the process dies of SIGBUS when it
    reads the missing pages: no exception to catch. Its ELF header says where the file ends: the
    section header table, and each segment of the program header table.
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header = handle.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:  # the loader refuses these itself
                return None
            order = "<" if header[5] == 1 else ">"
            phoff, shoff = struct.unpack_from(order + "QQ", header, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", header, 54)
            end = max(shoff + shnum * shentsize, phoff + phnum * phentsize)
            handle.seek(phoff)
            table = handle.read(phnum * phentsize)
    except OSError:
        return None
    if phentsize >= 56:  # Elf64_Phdr: p_offset at byte 8, p_filesz at byte 32
        for start in range(0, len(table) - phentsize + 1, phentsize):
            offset, filesz = (struct.unpack_from(order + "Q", table, start + at)[0] for at in (8, 32))
            end = max(end, offset + filesz)
    if size >= end:
        return None
    return (f"{path} is cut short ({size} bytes, its ELF headers place data up to byte {end}: an interrupted build "
            "or copy); loading it would kill the process. Rebuild or reinstall it (`pip install --no-build-isolation "
            "-e .`, `python setup.py build_ext --inplace --force`), or delete it")


def _run_eagerly(fn):
    """Mark a function without arguments whose result (a string or None) torch.compile is to take
    as a constant, calling it eagerly at trace time (what ``torch._dynamo.assume_constant_result``
    does, without importing torch._dynamo here): the checks below read files, which Dynamo cannot
    trace, and an op's first call may come inside a compiled function (fullgraph refused it)."""
    fn._dynamo_marked_constant = True
    return fn


@_run_eagerly
def _extension_cut_short() -> str | None:
    """Why the ace_kernels._C file that an import would load is cut short (None: it is whole, absent,
    or already loaded)."""
    if "ace_kernels._C" in sys.modules:
        return None
    try:
        spec = importlib.util.find_spec("ace_kernels._C")
    except Exception:  # (the import below says why)
        return None
    return _cut_short(spec.origin) if spec is not None and spec.origin else None


@_run_eagerly
def _extension_elsewhere() -> str | None:
    """Why the ace_kernels._C that an import finds (or found) is not this package's (None: it lies in
    this package's folder, or there is none). An editable install (``pip install -e``) of another
    checkout adds an import hook that hands that checkout's extension to any copy of ace_kernels
    without one of its own (a clone or worktree run with the same environment, an unpacked sdist),
    where it would run as built from this copy's sources."""
    module = sys.modules.get("ace_kernels._C")
    if module is not None:
        path = getattr(module, "__file__", None)
    else:
        try:
            spec = importlib.util.find_spec("ace_kernels._C")
        except Exception:  # (the import says why)
            return None
        path = spec.origin if spec is not None else None
    if not path:
        return None
    found, here = os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.abspath(__file__))
    try:
        if found == here or os.path.samefile(found, here):
            return None
    except OSError:
        pass
    return (f"the CUDA extension ace_kernels._C found at {path} is another copy's, not that of this ace_kernels "
            f"({here}; an editable install of that copy finds it for others): build this copy's (`pip install "
            "--no-build-isolation -e .` or `python setup.py build_ext --inplace`) or run that copy")


@_run_eagerly
def _extension_stale() -> str | None:
    """:func:`_other_sources` of the loaded ace_kernels._C."""
    module = sys.modules.get("ace_kernels._C")
    return _other_sources(getattr(module, "__file__", None), getattr(module, "SOURCES_SHA256", ""))


@_once
def _extension():
    """Import the compiled extension lazily; returns (module, error)."""
    short = _extension_cut_short()
    if short:
        return None, f"the CUDA extension ace_kernels._C is not loaded: {short}"
    elsewhere = _extension_elsewhere()
    if elsewhere:
        return None, elsewhere
    try:
        from ace_kernels import _C  # type: ignore[attr-defined]
    except Exception as exc:
        return None, f"the CUDA extension ace_kernels._C is not built or failed to load ({type(exc).__name__}: {exc})"
    stale = _extension_stale()
    if stale:
        return None, stale
    return _C, None


def _other_sources(path: str | None, built_from: str) -> str | None:
    """Why the extension at ``path``, built from sources of sha256 ``built_from``, is not this
    checkout's (None: it is, or it lies outside a checkout, as in an installed wheel, where pip
    put it together with this code). A checkout is the folder holding setup.py, csrc/ and the
    package folder the extension lies in: an in-place build (``pip install -e .``) that the
    sources have moved on from (a pull, an edit, a build that skipped the extension) is declined
    there, not run as this one."""
    if not path:
        return None
    package = os.path.dirname(os.path.abspath(path))
    checkout = os.path.dirname(package)
    csrc = os.path.join(checkout, "csrc")
    if os.path.basename(package) != "ace_kernels" or not os.path.isfile(os.path.join(checkout, "setup.py")):
        return None
    here = sources_sha256(csrc) if os.path.isdir(csrc) else None
    if here is None or here == built_from:
        return None
    recorded = f"sources of sha256 {built_from[:12]}..." if built_from else "sources it does not record"
    return (f"the CUDA extension ace_kernels._C at {path} was built from {recorded}, not from {csrc} (sha256 "
            f"{here[:12]}...): rebuild it (`pip install --no-build-isolation -e .` or `python setup.py build_ext "
            "--inplace --force`) or delete it")


def extension():
    """The loaded ``ace_kernels._C`` module; raises ``RuntimeError`` when missing."""
    module, error = _extension()
    if module is None:
        raise RuntimeError(error)
    return module


def _global_reasons(backend: str) -> list[str]:
    """Why ``backend`` cannot run on this machine at all (empty: it can)."""
    if backend == "torch":
        return []
    if backend == "triton":
        error = _triton_import_error()
        if error:
            return [error]
        if interpreter_enabled() != _INTERPRETER_AT_IMPORT:
            now, then = ("on", "off") if interpreter_enabled() else ("off", "on")
            return [f"TRITON_INTERPRET is {now} now but was {then} when ace_kernels was imported, and the Triton "
                    "kernels took their mode then: set it before importing ace_kernels"]
        if not (torch.cuda.is_available() or interpreter_enabled()):
            return ["no CUDA GPU is visible and TRITON_INTERPRET=1 is not set"]
        return []
    if backend == "cuda":
        reasons = []
        if torch.version.cuda is None:
            reasons.append("this torch build has no CUDA support")
        elif not torch.cuda.is_available():
            reasons.append("no CUDA GPU is visible")
        module, error = _extension()
        if module is None:
            reasons.append(error)
        return reasons
    raise ValueError(f"argument 'backend': expected one of {('auto',) + BACKENDS}, got {backend!r}")


def built_cuda_archs() -> tuple[str, ...] | None:
    """What ``ace_kernels._C`` holds code for (``sm_90a``: machine code; ``compute_90``: PTX),
    from its build's ``TORCH_CUDA_ARCH_LIST``; None when it is not loaded or does not say."""
    module, _ = _extension()
    text = getattr(module, "CUDA_ARCHS", "") if module is not None else ""
    return tuple(text.split("__")) if text else None


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``arch`` (``sm_XY``, ``sm_XYa``, ``compute_XY``) loads on a GPU of
    compute ``capability``: machine code on the same major version and an equal or newer minor
    one, PTX on any newer GPU (the driver compiles it), an ``a`` target only on its own."""
    kind, _, number = arch.partition("_")
    specific = number.endswith("a")
    digits = number.rstrip("a")
    built = (int(digits[:-1]), int(digits[-1]))
    if specific:
        return tuple(capability) == built
    if kind == "sm":
        return capability[0] == built[0] and capability[1] >= built[1]
    return tuple(capability) >= built


_ARCH_REASONS: dict = {}  # a plain dict, as _DEVICE_NAMES: compiled calls read what eager ones filled


def _cuda_arch_reason(index: int) -> str | None:
    """Why the extension cannot run on ``cuda:index`` (None: it can, or it does not say)."""
    if index not in _ARCH_REASONS:
        archs = built_cuda_archs()
        reason = None
        if archs:
            capability = torch.cuda.get_device_capability(index)
            if not any(arch_runs_on(arch, capability) for arch in archs):
                # PTX for 9.0 runs on newer GPUs only: no alternative for an older one.
                ptx = " or '9.0+PTX'" if tuple(capability) > (9, 0) else ""
                reason = (f"ace_kernels._C holds code for {', '.join(archs)} only, not for cuda:{index} "
                          f"(sm_{capability[0]}{capability[1]}); rebuild it with TORCH_CUDA_ARCH_LIST set for this "
                          f"GPU (e.g. '{capability[0]}.{capability[1]}'{ptx}): `python setup.py build_ext "
                          f"--inplace --force` (unchanged sources are otherwise not rebuilt)")
        _ARCH_REASONS[index] = reason
    return _ARCH_REASONS[index]


_SHARED_LIMITS: dict = {}  # a plain dict, as _ARCH_REASONS


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA ``device``: its own, else the current device's."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _shared_memory_limit(index: int) -> int | None:
    """The most shared memory one block may have on ``cuda:index`` (opted in), in bytes, cached;
    None where the device properties do not say."""
    if index not in _SHARED_LIMITS:
        properties = torch.cuda.get_device_properties(index)
        _SHARED_LIMITS[index] = getattr(properties, "shared_memory_per_block_optin", None)
    return _SHARED_LIMITS[index]


def shared_memory_reasons(device: torch.device, need: int | None, what: str) -> list[str]:
    """Why a Triton launch (``what``) whose blocks need ``need`` bytes of shared memory cannot run
    on ``device``: a CUDA device that gives a block less (Triton would fail at the launch with
    OutOfResources). Empty where it fits, off CUDA, under the interpreter, or ``need`` None (a
    configuration forced by a sweep, whose need is not recorded)."""
    if need is None:
        return []
    limit = shared_memory_limit(device)
    if limit is None or need <= limit:
        return []
    index = cuda_index(device)
    return [f"{what} needs {need} bytes of shared memory per block, cuda:{index} allows {limit} "
            f"(shared_memory_per_block_optin)"]


def shared_memory_limit(device: torch.device) -> int | None:
    """The most shared memory a Triton block may have on ``device`` (bytes, cached per device); None
    off CUDA, under the interpreter, or where the device properties do not say."""
    if device.type != "cuda" or interpreter_enabled():
        return None
    return _shared_memory_limit(cuda_index(device))


def _device_reasons(backend: str, tensors: Sequence[torch.Tensor | None]) -> list[str]:
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    if backend == "cuda" and devices - {"cuda"}:
        return [f"needs CUDA tensors, got tensors on {sorted(devices)}"]
    if backend == "cuda":
        indices = {t.device.index for t in tensors if isinstance(t, torch.Tensor) and t.device.index is not None}
        reasons = [r for r in (_cuda_arch_reason(i) for i in sorted(indices)) if r]
        if reasons:
            return reasons
    if backend == "triton":
        wanted = "cpu" if interpreter_enabled() else "cuda"
        if devices - {wanted}:
            mode = "under TRITON_INTERPRET=1 it needs CPU tensors" if wanted == "cpu" else "needs CUDA tensors"
            return [f"{mode}, got tensors on {sorted(devices)}"]
    return []


@dataclass
class _Op:
    name: str
    prefer: tuple[str, ...]
    variants: tuple[str, ...] = ()
    impls: dict[str, Callable] = field(default_factory=dict)
    checks: dict[str, Callable[..., list[str]]] = field(default_factory=dict)


_OPS: dict[str, _Op] = {}


def define_op(name: str, prefer: Sequence[str] = BACKENDS, variants: Sequence[str] = ()) -> None:
    """Declare an op, the order in which ``auto`` tries its backends, and its variants: modes
    of one op that run different kernels (the benchmark rows name the variant as a word of
    their shape), each of which may get a measured order of its own."""
    bad = [b for b in prefer if b not in BACKENDS]
    if bad:
        raise ValueError(f"unknown backends {bad} for op {name!r}")
    _OPS[name] = _Op(name, tuple(prefer), tuple(variants))


def order_key(op: str, variant: str | None = None) -> str:
    """The key of ``op`` (or of one of its variants) in the measured order file."""
    return op if variant is None else f"{op}[{variant}]"


def order_keys() -> set[str]:
    """Every key the order file may hold: each op, and each declared variant of one."""
    return {order_key(name, v) for name, entry in _OPS.items() for v in (None, *entry.variants)}


def register(op: str, backend: str, *, check: Callable[..., list[str]] | None = None):
    """Decorator registering ``fn`` as ``backend``'s implementation of ``op``.

    ``check(*args, **kwargs) -> list[str]`` receives the same arguments as
    ``fn`` and returns the op-specific reasons this backend cannot take the call
    (for example a ``topk`` beyond what a kernel supports).
    """

    def wrap(fn):
        entry = _OPS[op]
        entry.impls[backend] = fn
        if check is not None:
            entry.checks[backend] = check
        return fn

    return wrap


def check_backend(backend, ops: Sequence[str] = (), caller: str | None = None) -> str:
    """The ``backend`` argument, checked: ``"auto"`` or one of :data:`BACKENDS` that every op
    of ``ops`` declares (a module checks it when built, for the ops its forward calls).
    ``caller``: the function the user called, which the message names for the op (one op)."""
    allowed = ("auto",) + tuple(b for b in BACKENDS if all(b in _OPS[op].prefer for op in ops))
    if not isinstance(backend, str) or backend not in allowed:
        lacking = [caller or op for op in ops if backend in BACKENDS and backend not in _OPS[op].prefer]
        why = f" ({', '.join(lacking)}: no {backend} backend)" if lacking else ""
        raise ValueError(f"argument 'backend': expected one of {allowed}, got {backend!r}{why}")
    return backend


def interpreter_bf16_reasons(dtype: torch.dtype) -> list[str]:
    """Why Triton kernels refuse ``dtype`` here: under the CPU interpreter, bf16 (its bf16
    ``tl.dot`` returns garbage: a loss of 6e10 for 5.2, a LoRA S off by 1e10 relative)."""
    if dtype == torch.bfloat16 and interpreter_enabled():
        return ["under TRITON_INTERPRET=1 the kernels refuse bfloat16: the interpreter's bf16 arithmetic is wrong "
                "(use float16/float32, or backend='torch')"]
    return []


def requested_backend(backend: str) -> str:
    check_backend(backend)
    if backend == "auto":
        env = os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto"
        if env not in ("auto",) + BACKENDS:
            raise ValueError(f"environment variable {_ENV_VAR}: expected one of {('auto',) + BACKENDS}, got {env!r}")
        return env
    return backend


def reasons_for(op: str, backend: str, tensors: Sequence, args=(), kwargs=None, caller: str | None = None) -> list[str]:
    entry = _OPS[op]
    if backend not in entry.impls:
        return [f"op {caller or op!r} has no {backend} implementation"]
    reasons = _global_reasons(backend)
    if reasons:
        return reasons
    reasons = _device_reasons(backend, tensors)
    check = entry.checks.get(backend)
    if check is not None:
        reasons = reasons + list(check(*args, **(kwargs or {})))
    return reasons


# The order ``auto`` tries backends in, per GPU model, as measured by the benchmark suite on
# that card (``python -m benchmarks.dispatch_order RESULTS.json`` writes it); ops and cards
# not in it keep the order given to ``define_op``.
ORDER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_order.json")


def read_by_device(path: str, levels: int = 1) -> dict:
    """The ``by_device`` table of a per-card JSON file beside this module ({} when the file is
    absent, unreadable or has no such table).

    Its first ``levels`` levels (the card's table, then ...) must be JSON objects: an entry of
    another type (a hand edit) is left out with a warning naming it, so that a lookup never
    meets it. Deeper entries are checked where they are used.
    """
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: an editor's byte-order mark is no error
            data = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"{path}: cannot be read ({type(exc).__name__}: {exc}); left out", RuntimeWarning, stacklevel=2)
        return {}
    by_device = data.get("by_device") if isinstance(data, dict) else None
    if not isinstance(by_device, dict):
        warnings.warn(f"{path}: expected a JSON object with a 'by_device' object, got "
                      f"{type(data).__name__ if not isinstance(data, dict) else 'none'}; left out", RuntimeWarning,
                      stacklevel=2)
        return {}

    def objects_only(table: dict, where: tuple, depth: int) -> dict:
        kept = {}
        for name, value in table.items():
            if not isinstance(value, dict):
                warnings.warn(f"{path}: by_device / {' / '.join(map(str, where + (name,)))}: expected a JSON object, "
                              f"got {type(value).__name__}; left out", RuntimeWarning, stacklevel=2)
                continue
            kept[name] = objects_only(value, where + (name,), depth - 1) if depth > 1 else value
        return kept

    return objects_only(by_device, (), levels)


def _orders_only(path: str, by_device: dict) -> dict:
    """The order file's cards with each entry a list of backend names under a key of
    :func:`order_keys`; any other entry (a hand edit: a string, a misspelt backend, a misspelt op
    or variant, which no lookup would ever find) is left out with a warning naming it."""
    keys = order_keys()
    kept = {}
    for card, orders in by_device.items():
        kept[card] = {}
        for key, order in orders.items():
            if key not in keys:
                warnings.warn(f"{path}: by_device / {card} / {key}: not an op or variant of ace_kernels (expected one "
                              f"of {sorted(keys)}); left out", RuntimeWarning, stacklevel=2)
            elif isinstance(order, list) and order and all(name in BACKENDS for name in order):
                kept[card][key] = order
            else:
                warnings.warn(f"{path}: by_device / {card} / {key}: expected a list of backends from {BACKENDS}, got "
                              f"{order!r}; left out", RuntimeWarning, stacklevel=2)
    return kept


# Read once, when ace_kernels is imported (a small file; no GPU is touched), so that a first call
# under torch.compile has no file to open: by load_measured_orders, which ace_kernels/__init__.py
# calls once its op modules have declared their ops (the file's keys are checked against them).
_MEASURED_ORDERS: dict = {}


def load_measured_orders() -> None:
    """Read :data:`ORDER_FILE` into what :func:`measured_orders` returns."""
    global _MEASURED_ORDERS
    _MEASURED_ORDERS = _orders_only(ORDER_FILE, read_by_device(ORDER_FILE))


def measured_orders() -> dict:
    """``{device name: {op: [backend, ...]}}`` from :data:`ORDER_FILE` ({} when absent or unreadable)."""
    return _MEASURED_ORDERS


_DEVICE_NAMES: dict = {}


# Not marked torch.compiler.assume_constant_result: applying that decorator imports
# torch._dynamo, which import ace_kernels must not do (a second of start-up, and dynamo's
# threads made gloo ranks abort at exit). Eager calls fill the cache that compiled ones read.
def _cuda_device_name(index: int) -> str:
    if index not in _DEVICE_NAMES:
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES[index]


def device_name(device: torch.device) -> str:
    """The model name of a CUDA ``device`` (the current one when it has no index), cached."""
    return _cuda_device_name(cuda_index(device))


def preference(op: str, device: torch.device | None = None, variant: str | None = None) -> tuple[str, ...]:
    """The order in which ``auto`` tries the backends of ``op`` for a call on ``device``: the
    order measured on that card for ``variant`` if any, else for the op, else the declared one."""
    entry = _OPS[op]
    orders = measured_orders()
    if not orders or device is None or device.type != "cuda":
        return entry.prefer
    card = orders.get(device_name(device), {})
    measured = card.get(order_key(op, variant)) if variant is not None else None
    if not isinstance(measured, list):
        measured = card.get(op)
    if not isinstance(measured, list):
        return entry.prefer
    first = [name for name in measured if name in entry.prefer]
    return tuple(first + [name for name in entry.prefer if name not in first])


def select(op: str, backend: str, tensors: Sequence, args=(), kwargs=None, variant: str | None = None,
           caller: str | None = None) -> Callable:
    """Return the implementation of ``op`` that takes this call.

    ``tensors`` are the call's tensors (their devices decide what can run);
    ``args``/``kwargs`` go to the backends' op-specific checks; ``variant`` (one of the op's
    declared variants) picks its measured order under ``auto``; ``caller``, the function the
    user called, is what the errors name (the op by default: ``lora_qkv_packed`` runs ``lora_qkv``).
    """
    caller = caller or op
    if backend != "auto":
        check_backend(backend, ops=(op,), caller=caller)  # names the op's own backends (a ValueError, as a module's)
    wanted = requested_backend(backend)
    entry = _OPS[op]
    if wanted != "auto":
        reasons = reasons_for(op, wanted, tensors, args, kwargs, caller)
        if reasons:
            source = f" (from the environment variable {_ENV_VAR})" if backend == "auto" else ""
            raise RuntimeError(f"{caller}: backend {wanted!r}{source} cannot run this call: " + "; ".join(reasons))
        return entry.impls[wanted]
    tried = {}
    device = None
    if measured_orders():  # only a measured order depends on the device
        device = next((t.device for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cuda"), None)
    if variant is not None and variant not in entry.variants:
        raise ValueError(f"op {op!r} has no variant {variant!r} (declared: {list(entry.variants)})")
    for name in preference(op, device, variant):
        # The interpreter exists for testing; auto never routes real work to it, also where a GPU
        # is visible (under TRITON_INTERPRET=1 the Triton backend takes CPU tensors, there too).
        if name == "triton" and interpreter_enabled():
            tried[name] = ["the Triton interpreter is only used when asked for explicitly"]
            continue
        reasons = reasons_for(op, name, tensors, args, kwargs, caller)
        if not reasons:
            return entry.impls[name]
        tried[name] = reasons
    detail = "; ".join(f"{name}: {', '.join(r)}" for name, r in tried.items())
    raise RuntimeError(f"{caller}: no backend can run this call ({detail})")


def backend_of(op: str, impl: Callable) -> str:
    """The name of the backend whose implementation of ``op`` is ``impl`` (what :func:`select` returned)."""
    return next(name for name, fn in _OPS[op].impls.items() if fn is impl)


def available_backends(*, reasons: bool = False):
    """Backends that can run on this machine.

    Returns the names of the usable backends (``["torch"]`` on a machine with no
    GPU, ``["triton", "torch"]`` there when ``TRITON_INTERPRET=1`` was set before
    ``ace_kernels`` was imported). With ``reasons=True`` returns a dict mapping every backend to the list
    of reasons it cannot run here; an empty list means it can.
    """
    # reasons="no" returned the table, being truthy, where a list of names was asked for.
    reasons = check_bool("reasons", reasons)
    table = {name: _global_reasons(name) for name in BACKENDS}
    if reasons:
        return table
    return [name for name, why in table.items() if not why]


def _fix_interpreter_index() -> None:
    """Let ``range(0, K, BLOCK)`` over a runtime int run under older Triton interpreters with numpy >= 2.4.

    The interpreter holds scalar kernel arguments as 1-element arrays. Triton 3.6 turns them
    into Python ints with ``int(array)``, which numpy 2.4 rejects for ndim > 0 ("only
    0-dimensional arrays can be converted to Python scalars"); Triton 3.8 squeezes first.
    This gives the older interpreter the same ``__index__``. It touches only the CPU
    interpreter (``TRITON_INTERPRET=1``), never compiled GPU kernels.
    """
    try:
        import inspect

        from triton.runtime import interpreter
    except Exception:  # no triton, or no interpreter module: nothing to fix
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_ace_fixed", False):
        return
    try:
        source = inspect.getsource(patch_tensor)
    except (OSError, TypeError):
        return
    if "int(self.handle.data))" not in source:  # this Triton already converts safely
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._ace_fixed = True
    interpreter._patch_lang_tensor = patched


if interpreter_enabled():
    _fix_interpreter_index()
