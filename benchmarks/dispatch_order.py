"""``python -m benchmarks.dispatch_order RESULTS.json``: the backend order of ``backend="auto"``
on the card of a benchmark run, fastest first, written into ``ace_kernels/dispatch_order.json``.

For each op with rows of two or more of our backends (``cuda``, ``triton``, ``torch``) at the
same shape, a backend's time there is what a call costs in a loop: the row's ``wall_ms`` (calls
back to back on the host clock, which counts the host's launch work) when it has one, else its
``median_ms`` (CUDA events around each call, which can hide that work behind the L2 flush; see
``benchmarks/harness.py``). Its score is the geometric mean over those shapes of its time over the
fastest backend's time there (1.0: fastest everywhere); the order is by score. Shapes where a
backend did not run count against it (it cannot be first if it cannot take the call). The
file keeps what it held for other cards and ops. ``lora_linear`` runs the kernels of
``lora_qkv`` and takes its order.

An op with declared variants also gets an order per variant, from that variant's shapes alone,
written as ``op[variant]``; ``auto`` prefers it to the op's overall order. ``ace_hypergraph``:
``cls_only`` and ``full`` (a word of the rows' shape); ``lora_qkv`` (and ``lora_linear``):
``small`` and ``large``, by the ``M=`` rows of the shape (``ace_kernels.lora.rows_variant``).

Provider ``triton-atomic`` (the hypergraph's ``deterministic=False``) is not a backend: its
time against ``triton`` is printed, for the choice of the default, but not written.

A result file with no op timed on two backends at one shape (a ``--tier costly`` run: the
largest-batch search and the chunked training step use one backend each) holds no order:
then nothing is written (exit status 3), so no copy of the old file can pass for a new one.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Sequence

from ace_kernels import _dispatch
from benchmarks import harness

BACKENDS = _dispatch.BACKENDS
SHARED_ORDER = {"lora_qkv": ("lora_linear",)}  # ops that run another op's kernels


def _lora_variant(shape: str) -> str | None:
    from ace_kernels import lora

    found = re.search(r"\bM=(\d+)", shape)
    return lora.rows_variant(int(found.group(1))) if found else None


# op -> shape text -> variant, for ops whose variant is not a word of the shape.
VARIANT_OF_SHAPE = {"lora_qkv": _lora_variant}


def variant_of(op: str, shape: str) -> str | None:
    """The declared variant of ``op`` that a benchmark row of ``shape`` measured, or None."""
    if op in VARIANT_OF_SHAPE:
        return VARIANT_OF_SHAPE[op](shape)
    words = shape.split()
    return next((v for v in _dispatch._OPS[op].variants if v in words), None)


def backend_times(rows: Sequence[dict]) -> dict:
    """``{op: {shape: {provider: ms}}}`` of our providers' rows (one time per provider and shape:
    ``wall_ms`` when the row has it, else ``median_ms``); a row whose correctness check failed
    (``harness.checks_pass``), or a row of an op that dispatches with no check at all, is left
    out: a backend is never ordered first for speed it bought with wrong (or unchecked) outputs."""
    times: dict = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        provider, ms = row.get("provider"), row.get("wall_ms") or row.get("median_ms")
        metrics = row.get("metrics") or {}
        if not harness.checks_pass(metrics, row.get("dtype", "")):
            continue
        if row.get("op") in _dispatch._OPS and not any(harness.is_check_key(key) for key in metrics):
            continue
        if provider in BACKENDS + ("triton-atomic",) and ms:
            times[row["op"]][f"{row['shape']} [{row['dtype']}]"][provider] = float(ms)
    return times


def order_for(shapes: dict) -> tuple[list[str], dict[str, float], int] | None:
    """Backends fastest first, their scores and the number of shapes compared, from
    ``{shape: {backend: ms}}``; None when no shape has two backends to compare."""
    compared = {shape: {b: ms for b, ms in by.items() if b in BACKENDS} for shape, by in shapes.items()}
    compared = {shape: by for shape, by in compared.items() if len(by) >= 2}
    if not compared:
        return None
    backends = sorted({b for by in compared.values() for b in by})
    scores = {}
    for backend in backends:
        logs = []
        for by in compared.values():
            best = min(by.values())
            # Not run at this shape: twice the slowest measured there (it could not take the call).
            ms = by.get(backend, 2 * max(by.values()))
            logs.append(math.log(ms / best))
        scores[backend] = round(math.exp(sum(logs) / len(logs)), 4)
    return sorted(backends, key=lambda b: (scores[b], BACKENDS.index(b))), scores, len(compared)


def update(payload: dict, existing: dict | None) -> tuple[dict, list[str]]:
    """The new content of the order file and a report, from a result file's ``payload``."""
    device, heading = harness.gpu_run(payload)
    content = dict(existing or {})
    by_device = dict(content.get("by_device") or {})
    # Only ops that dispatch read an order: the model rows (a whole training step, zero-shot
    # evaluation) compare backends too, but no op of theirs consults the file.
    known = set(_dispatch._OPS)
    orders = {key: order for key, order in (by_device.get(device) or {}).items() if key in _dispatch.order_keys()}
    report = [heading]
    ranked = set()  # the ops given an order by this run
    for op, shapes in sorted(backend_times(payload["rows"]).items()):
        found = order_for(shapes)
        if found is not None:
            order, scores, compared = found
            written = op in known
            if written:
                ranked.add(op)
                for name in (op,) + SHARED_ORDER.get(op, ()):
                    orders[name] = order
            report.append(_order_line(op, order, scores, compared)
                          + ("" if written else "; not an op: reported, not written"))
            for variant in (_dispatch._OPS[op].variants if written else ()):
                subset = {shape: by for shape, by in shapes.items() if variant_of(op, shape) == variant}
                found = order_for(subset)
                if found is not None:
                    for name in (op,) + SHARED_ORDER.get(op, ()):
                        orders[_dispatch.order_key(name, variant)] = found[0]
                    report.append(_order_line(_dispatch.order_key(op, variant), *found))
        atomic = [by["triton-atomic"] / by["triton"] for by in shapes.values()
                  if "triton-atomic" in by and "triton" in by]
        if atomic:
            ratio = math.exp(sum(math.log(r) for r in atomic) / len(atomic))
            report.append(f"  {op}: triton-atomic takes {ratio:.3g}x the time of triton (geometric mean over "
                          f"{len(atomic)} shapes; below 1 favours deterministic=False)")
    # An op this run timed that got no order (its rows' checks failed, or one backend ran): say
    # what the card's file keeps for it, rather than keep its earlier order without a word.
    timed = {row.get("op") for row in payload["rows"] if row.get("provider") in BACKENDS}
    for op in sorted((timed & known) - ranked):
        report.append(f"  {op}: timed but not ranked (no shape with two of our backends whose checks passed): "
                      + ("the card's earlier order kept" if op in orders else "no order for this card"))
    if not ranked:
        raise NoOrders(f"no op of this run was timed on two of our backends at one shape ({device}): "
                       "no order to write")
    by_device[device] = orders
    content["by_device"] = by_device
    return content, report


def _order_line(key: str, order, scores, compared: int) -> str:
    return (f"  {key}: {' > '.join(order)}  (time / fastest, geometric mean over {compared} shapes: "
            + ", ".join(f"{b} {s:.3g}" for b, s in scores.items()) + ")")


class NoOrders(harness.NothingToWrite):
    """The result file measured no order (nothing to write)."""


def main(argv: Sequence[str] | None = None) -> int:
    return harness.package_file_tool(argv, module="dispatch_order", description=__doc__.split("\n\n")[0],
                                     default_out=_dispatch.ORDER_FILE, what="order", update=update)


if __name__ == "__main__":
    raise SystemExit(main())
