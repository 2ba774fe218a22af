"""``python -m benchmarks --compare OLD.json NEW.json`` (or ``python -m benchmarks.compare OLD.json NEW.json``):
the same rows side by side.

Rows are matched on (op, shape, dtype, provider, baseline); the change is
NEW / OLD for time and peak memory (below 1.00 is faster / smaller). Each file's hardware,
software and commit head the table, with a warning when the hardware differs (GPU times are
comparable only within one run on one card).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from benchmarks.harness import fmt, load_rows, read_payload


def _key(row: dict) -> tuple:
    return (row["op"], row["shape"], row["dtype"], row["provider"], row.get("baseline"))


def _facts(path: str, rows: dict) -> dict:
    """Where a file's rows ran: its first row, or, in a file without rows (nothing measured, e.g. a
    --tier costly run on a CPU), its environment."""
    if rows:
        return next(iter(rows.values()))
    payload = read_payload(path)
    environment = payload.get("environment") if isinstance(payload, dict) else None
    return environment if isinstance(environment, dict) else {}


def _on_gpu(path: str, devices: set) -> bool:
    """Whether a file's rows ran on a GPU: its environment's device_type (a Tesla T4 or an AMD Instinct card
    names neither NVIDIA nor CUDA), else, in a file without one, its device's name."""
    payload = read_payload(path)
    environment = payload.get("environment") if isinstance(payload, dict) else None
    if isinstance(environment, dict) and environment.get("device_type"):
        return environment["device_type"] == "cuda"
    return any("cuda" in str(d).lower() or "nvidia" in str(d).lower() for d in devices)


def _where(facts: dict) -> str:
    """The hardware, software and code of a file, for its header line."""
    return ", ".join(f"{k} {facts.get(k)}" for k in ("device", "torch", "triton", "git_sha", "date") if facts.get(k))


def compare_files(old_path: str, new_path: str) -> str:
    old = {_key(r): r for r in load_rows(old_path)}
    new = {_key(r): r for r in load_rows(new_path)}
    facts = (_facts(old_path, old), _facts(new_path, new))
    header = ["op", "shape", "dtype", "provider", "vs", "old ms", "new ms", "new/old", "old MiB", "new MiB",
              "new/old", "old speedup", "new speedup"]
    lines = [header]
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key), new.get(key)
        def ratio(field):
            if a and b and a.get(field) and b.get(field) is not None:
                return f"{b[field] / a[field]:.2f}"
            return "-"
        def speed(r):
            return "-" if not r or r.get("speedup_vs_baseline") is None else f"{r['speedup_vs_baseline']:.2f}x"
        lines.append([key[0], key[1], key[2], key[3], key[4] or "-",
                      fmt(a and a.get("median_ms")), fmt(b and b.get("median_ms")), ratio("median_ms"),
                      fmt(a and a.get("peak_mib")), fmt(b and b.get("peak_mib")), ratio("peak_mib"),
                      speed(a), speed(b)])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = [f"old: {old_path} ({_where(facts[0])})", f"new: {new_path} ({_where(facts[1])})"]
    devices = tuple({r.get("device") for r in rows.values()} or {f.get("device")} for rows, f in zip((old, new), facts))
    if devices[0] != devices[1] and None not in devices[0] | devices[1]:  # a file that names no device: unknown
        out.append(f"WARNING: the files were measured on different hardware ({sorted(map(str, devices[0]))} against "
                   f"{sorted(map(str, devices[1]))}): their times are not comparable, only each file's own ratios")
    elif {r.get("date") for r in old.values()} != {r.get("date") for r in new.values()} and _on_gpu(
            old_path, devices[0]):
        out.append("note: two GPU runs: a time is comparable only within one run (compare each file's ratios)")
    out.append("")
    for index, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)))
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    only_old = [k for k in old if k not in new]
    only_new = [k for k in new if k not in old]
    out.append("")
    out.append(f"{len(old) - len(only_old)} rows in both, {len(only_old)} only in old, {len(only_new)} only in new")
    return "\n".join(out)


def report(old_path: str, new_path: str, error: str) -> int:
    """Print the comparison of two result files: exit status 0, or 2 where one cannot be read (said on stderr
    after ``error``, the command's "<prog>: error:")."""
    try:
        text = compare_files(old_path, new_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{error} cannot read a result file "
              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", file=sys.stderr)
        return 2
    try:  # outside the read's try: a closed pipe (``| head``) is not the files' fault
        print(text, flush=True)
    except BrokenPipeError:
        # The reader has what it wanted; stdout points at nothing so that exit's flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.compare OLD.json NEW.json``, as ``python -m benchmarks --compare`` (it ran nothing)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("old", metavar="OLD.json", help="a result file of python -m benchmarks")
    parser.add_argument("new", metavar="NEW.json", help="another, compared with OLD.json")
    args = parser.parse_args(argv)
    for path in (args.old, args.new):
        if not os.path.isfile(path):
            parser.error(f"{path!r} is not a file")
    return report(args.old, args.new, f"{parser.prog}: error:")


if __name__ == "__main__":
    sys.exit(main())
