"""Input validation shared by the public ops.

Every failure is a ``ValueError`` that names the argument, what was expected
and what came, e.g. ``argument 'lora_a': expected shape [r, 768], got [4, 512]``.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fmt_shape(shape: Iterable) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    shape: Sequence[int | str | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Validate one tensor argument and return it.

    ``shape`` entries may be ints (must match), ``None`` (anything) or strings,
    which are only used in the message (e.g. ``"r"``) and match anything.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"argument '{name}': expected a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise ValueError(f"argument '{name}': expected a dense (strided) tensor, got layout {value.layout}; "
                         "call .to_dense() first")
    if value.is_nested:
        # torch.nested.nested_tensor's default layout is torch.strided: the layout test above lets it
        # through, and its .shape then fails with torch's "Internal error: NestedTensorImpl doesn't support sizes".
        raise ValueError(f"argument '{name}': expected a dense (strided) tensor, got a nested tensor; pad it "
                         "(torch.nested.to_padded_tensor) or stack its components first")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(
                f"argument '{name}': expected a {want}-D tensor, got {value.dim()}-D with shape "
                f"{_fmt_shape(value.shape)}"
            )
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(
            f"argument '{name}': expected at least {min_ndim} dimension{'' if min_ndim == 1 else 's'}, got "
            f"{value.dim()}-D with shape {_fmt_shape(value.shape)}"
        )
    if shape is not None:
        ok = value.dim() == len(shape) and all(
            not isinstance(want, int) or want == got for want, got in zip(shape, value.shape)
        )
        if not ok:
            want = _fmt_shape("*" if w is None else w for w in shape)
            raise ValueError(f"argument '{name}': expected shape {want}, got {_fmt_shape(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        got = str(value.dtype).replace("torch.", "")
        raise ValueError(f"argument '{name}': expected dtype in ({names}), got {got}")
    if device is not None and value.device != device:
        raise ValueError(f"argument '{name}': expected a tensor on {device} (like the first input), got {value.device}")
    return value


def check_same_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != reference.dtype:
            raise ValueError(
                f"argument '{name}': expected dtype {str(reference.dtype).replace('torch.', '')} "
                f"(the dtype of '{reference_name}'), got {str(t.dtype).replace('torch.', '')}"
            )


def _is_bool(value) -> bool:
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def _type_name(value) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _check_not_traced_numpy(name: str, value) -> None:
    """Under ``torch.compile``, Dynamo traces a NumPy scalar argument as a 0-d array (a graph
    input whose value it cannot read at trace time), which no number check could accept: say so."""
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ == "ndarray" and torch.compiler.is_compiling():
        raise ValueError(f"argument '{name}': expected a Python number; under torch.compile a NumPy scalar is "
                         f"traced as an array, pass float(...) or int(...) of it")


def check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    """An integer (Python's or NumPy's, not a bool) >= ``minimum``, as an int."""
    _check_not_traced_numpy(name, value)
    if _is_bool(value) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"argument '{name}': expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_probability(name: str, value) -> float:
    """A real number (Python's or NumPy's, not a bool) in [0, 1), as a float."""
    _check_not_traced_numpy(name, value)
    if _is_bool(value) or not isinstance(value, numbers.Real) or not (0.0 <= _as_float(value) < 1.0):
        raise ValueError(f"argument '{name}': expected a float in [0, 1), got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    """A bool (Python's or NumPy's), as a bool."""
    if not _is_bool(value):
        raise ValueError(f"argument '{name}': expected a bool, got {_type_name(value)}")
    return bool(value)


def check_finite_number(name: str, value) -> float:
    """A real number (Python's or NumPy's, not a bool) that is finite (not nan or inf), as a float."""
    _check_not_traced_numpy(name, value)
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ValueError(f"argument '{name}': expected a Python number, got {_type_name(value)}")
    if not is_finite(_as_float(value)):
        raise ValueError(f"argument '{name}': expected a finite number, got {value!r}")
    return float(value)


def is_finite(number: float) -> bool:
    """``math.isfinite`` in a form Dynamo traces: under torch.compile a float argument may be a
    symbolic float (a second value of it, or ``dynamic=True``), which math.isfinite refuses (a
    graph break, an error with ``fullgraph=True``); a comparison guards on it instead."""
    return abs(number) < math.inf


def _as_float(value) -> float:
    """``float(value)``, with an integer too large for a float as an infinity of its sign."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf
