"""``python -m benchmarks.tuned_configs RESULTS.json``: the launch configurations that the sweep of
a GPU benchmark run (family ``tuning``) found fastest, written into ``ace_kernels/tuned_configs.json``
for the card of that run.

For each swept kernel, a candidate qualifies when its configuration is still one that its
module declares (``_GPU_CANDIDATES`` of ``ace_kernels.lora`` or ``ace_kernels.contrastive``, so the
spill check has seen it; type for type, as the runtime compares) and its error (``rel_err``,
against the same reference as the default's; a row without one does not qualify) is at most
twice the default's plus 1e-4 and within the row dtype's check limit (``harness.check_limit``; a
default over that limit lets no candidate qualify). A ``--quick`` run is refused (its shapes are
not the ones tuned).
The fastest qualifying candidate (its declared configuration) is written when its median time is
at least ``MARGIN`` below the default's, measured in the same run; otherwise the kernel's entry for
this card is removed (the default is as fast). Kernels the run did not sweep or whose default it
did not measure, other cards and other families keep what the file held. A result file with no
sweep rows writes nothing (exit status 3).
"""

from __future__ import annotations

from typing import Sequence

import ace_kernels  # noqa: F401  (imports the kernel modules, which declare their candidates)
from ace_kernels import _tuning
from benchmarks import harness

MARGIN = 0.03  # 3%: below this a difference is within the run-to-run spread of a GPU timing


class NoSweep(harness.NothingToWrite):
    """The result file holds no sweep rows (nothing to write)."""


def _sweeps(rows: Sequence[dict]) -> dict:
    """``{(kernel family, kernel, dtype class): {"default": row or None, "candidates": [row, ...]}}``
    of the sweep rows (candidate 0 is the default)."""
    sweeps: dict = {}
    for index, row in enumerate(rows):
        metrics = row.get("metrics") or {}
        if row.get("family") != "tuning" or "kernel_family" not in metrics:
            continue
        missing = [key for key in ("kernel", "dtype_class", "candidate", "config") if key not in metrics]
        if missing:
            raise ValueError(f"argument 'RESULTS': row {index} ({row.get('op')}) is a sweep row without "
                             f"metrics {missing[0]!r}")
        where = (metrics["kernel_family"], metrics["kernel"], metrics["dtype_class"])
        entry = sweeps.setdefault(where, {"default": None, "candidates": []})
        if metrics.get("candidate") == 0:
            entry["default"] = row
        else:
            entry["candidates"].append(row)
    return sweeps


# choose()'s answer when the run cannot decide: the file keeps what it held for that kernel.
KEEP = "keep"


def choose(where: tuple[str, str, str], sweep: dict) -> tuple[dict | str | None, str]:
    """(the configuration to write, None to use the default, or :data:`KEEP` to leave the file's
    entry as it is; a line saying why), for the sweep of ``where`` = (kernel family, kernel,
    dtype class)."""
    kernel_family, kernel, dtype_class = where
    name = f"{kernel_family} {_tuning.key(kernel, dtype_class)}"
    default = sweep["default"]
    if default is None or not default.get("median_ms"):
        return KEEP, f"{name}: the default was not measured; nothing to compare with, the file's entry stays"
    # The sweep holds for the kernels it timed, at the default it timed them against.
    timed = default["metrics"].get("kernel_digest")
    if timed != _tuning.kernel_digest(kernel_family):
        why = "the run predates the record of them" if timed is None else "their sources differ"
        return KEEP, (f"{name}: the sweep timed other {kernel_family} kernels than this tree's ({why}); the file's "
                      "entry stays")
    if default["metrics"].get("config") != _tuning.default(kernel_family, kernel, dtype_class):
        return KEEP, (f"{name}: the sweep's default {default['metrics'].get('config')} is not this tree's "
                      f"{_tuning.default(kernel_family, kernel, dtype_class)}; the file's entry stays")
    declared = _tuning.candidates(kernel_family, kernel, dtype_class)
    default_ms = float(default["median_ms"])
    limit = harness.check_limit(default.get("dtype", ""))
    if "rel_err" not in default["metrics"]:
        return KEEP, (f"{name}: the default's output was not checked; no bound for the candidates, the file's "
                      "entry stays")
    default_err = float(default["metrics"]["rel_err"])
    if not default_err <= limit:
        # Without a correct default there is no bound to hold the candidates to, and a run whose
        # default fails is no ground to change what an earlier run chose either.
        return KEEP, (f"{name}: the default's error {default_err!r} is over the check limit {limit:g}; nothing "
                      "qualifies, the file's entry stays")
    best, best_config, notes = None, None, []
    for row in sweep["candidates"]:
        metrics = row["metrics"]
        number = f"#{metrics.get('candidate')}"
        # Matched type for type, as the runtime matches the file's entry (_tuning.launch_config):
        # JSON's 8.0 and true equal 8 and 1, but an entry holding them would be refused there.
        config = next((c for c in declared if isinstance(metrics.get("config"), dict)
                       and _tuning._same_config(metrics["config"], c)), None)
        if config is None:
            notes.append(f"{number}'s {metrics.get('config')} holds other number types than the declared candidate"
                         if metrics.get("config") in declared else f"{number} is no longer a declared candidate")
            continue
        if "rel_err" not in metrics:
            notes.append(f"{number}'s output was not checked")
            continue
        err = float(metrics["rel_err"])
        if not err <= min(2 * default_err + 1e-4, limit):
            notes.append(f"{number} error {err:.3g} > min(2 x default's {default_err:.3g} + 1e-4, {limit:g})")
            continue
        if row.get("median_ms") and (best is None or float(row["median_ms"]) < float(best["median_ms"])):
            best, best_config = row, config
    extra = f" ({'; '.join(notes)})" if notes else ""
    if best is None:
        return None, f"{name}: no qualifying candidate; the default stays{extra}"
    ratio = float(best["median_ms"]) / default_ms
    number = f"#{best['metrics']['candidate']}"
    if ratio > 1 - MARGIN:
        return None, (f"{name}: fastest candidate {number} takes {ratio:.3f}x the default's "
                      f"{default_ms:.4g} ms, not {MARGIN:.0%} less; the default stays{extra}")
    # The declared configuration itself (the row's equals it, type for type).
    return dict(best_config), (f"{name}: candidate {number} {best_config} takes {ratio:.3f}x the default's "
                               f"{default_ms:.4g} ms{extra}")


def update(payload: dict, existing: dict | None) -> tuple[dict, list[str]]:
    """The new content of the tuned-configuration file and a report, from a result file's ``payload``."""
    device, heading = harness.gpu_run(payload)
    sweeps = _sweeps(payload["rows"])
    if not sweeps:
        raise NoSweep(f"no sweep rows (family tuning) in this run ({device}): nothing to write")
    content = dict(existing or {})
    by_device = dict(content.get("by_device") or {})
    card = {family: dict(entries) for family, entries in (by_device.get(device) or {}).items()}
    report = [heading]
    for where, sweep in sorted(sweeps.items()):
        config, line = choose(where, sweep)
        report.append("  " + line)
        kernel_family, kernel, dtype_class = where
        entries = card.setdefault(kernel_family, {})
        if config is KEEP:
            pass
        elif config is None:
            entries.pop(_tuning.key(kernel, dtype_class), None)
        else:
            entries[_tuning.key(kernel, dtype_class)] = config
        if not entries:
            del card[kernel_family]
    if card:
        by_device[device] = card
    else:
        by_device.pop(device, None)
    content["by_device"] = by_device
    return content, report


def main(argv: Sequence[str] | None = None) -> int:
    return harness.package_file_tool(argv, module="tuned_configs", description=__doc__.split("\n\n")[0],
                                     default_out=_tuning.TUNED_FILE, what="tuned-configuration", update=update)


if __name__ == "__main__":
    raise SystemExit(main())
