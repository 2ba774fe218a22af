"""``python -m benchmarks.scorecard RESULTS.json [MORE.json ...]``: the targets of a benchmark
run, as Markdown tables, with the value each part of a target was judged on.

Every row a run holds to a target is listed, by family (on a GPU each family's targets are one
issue's: ``lora`` issue 3, ``hypergraph`` 4, ``contrastive`` 5, ``model`` 6 (and issue 8's
patched PEFT step), ``training`` 7;
on a CPU they are the foundation issue's and the CPU lines of those issues): the op, its shape,
our provider and the baseline it was compared with, our time, the two ratios, every part of
the target (the issue's goal and the row's correctness checks) with its measured value, and
whether it was met (``yes``, ``no``, or ``-`` where a part could not be judged: no calibration,
no correctness check). Nothing is measured here and nothing is carried between files: each
file gets its own section, headed by the hardware, software and commit it ran on.

Rows written before result files recorded ``target_parts`` (every committed file of 2026-12-01
and before) have the target's
text and verdict only; their ratio columns still give the measured speedup and memory ratio.
Under the counts, the run's skip lines (``run.skipped``): what it did not measure, whose targets
have no row here and are in none of the counts.
``--missed`` lists only the rows whose target was not met (missed or not judged).
Exit status 0, or 2 when a file cannot be read as a result file (the others still get their
sections).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from benchmarks import harness

# family -> (issue on a GPU, what the issue is about)
ISSUES = {
    "lora": ("3", "fused LoRA kernels"),
    "hypergraph": ("4", "hyperedge-attention kernels"),
    "contrastive": ("5", "tiled label-guided InfoNCE"),
    "contrastive_probe": ("5", "tiled label-guided InfoNCE"),
    "distributed": ("5", "tiled label-guided InfoNCE across ranks (group=)"),
    "model": ("6", "ace_model and the command line; issue 8's patched PEFT step"),
    "training": ("7", "large-batch training"),
}
VERDICT = {True: "yes", False: "no", None: "-"}


def _value(part: dict) -> str:
    value = part.get("value")
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):  # inf or nan, as result files write them
        return value
    if "%" in str(part.get("text", "")):  # a rate stated in percent (">=50% matmul peak")
        return f"{100 * value:.1f}%"
    return harness.fmt(float(value))


def _parts(row: dict) -> str:
    parts = row.get("target_parts")
    if not parts:  # a file from before target_parts: the target's text and verdict only
        return f"{row['target']}: {VERDICT[row.get('target_pass')]}"
    return "; ".join(f"{p['text']}: {_value(p)} ({VERDICT[p.get('met')]})" for p in parts)


def _ratio(value) -> str:
    return "-" if value is None else f"{harness.fmt(float(value) if not isinstance(value, str) else value)}x"


def _escape(text) -> str:
    return str(text).replace("|", "\\|")


def _title(family: str, on_gpu: bool) -> str:
    if family in ISSUES and on_gpu:
        number, about = ISSUES[family]
        return f"{family}: issue {number}, {about}"
    return f"{family} (CPU targets)" if family and not on_gpu else (family or "rows without a family")


def scorecard(payload: dict, name: str, *, missed_only: bool = False) -> tuple[str, tuple[int, int, int]]:
    """The Markdown section of one result file and its counts ``(met, missed, not judged)``."""
    harness.check_result_fields(payload)
    env = payload.get("environment") or {}
    rows = [r for r in payload["rows"] if r.get("target")]
    on_gpu = env.get("device_type") == "cuda"
    met = sum(r.get("target_pass") is True for r in rows)
    missed = sum(r.get("target_pass") is False for r in rows)
    unjudged = len(rows) - met - missed
    where = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "git_sha", "date") if env.get(k))
    about = [where + "."] if where else []  # the run's facts, a paragraph (none: no blank lines)
    calibration = (payload.get("run") or {}).get("calibration") or {}
    if calibration.get("bf16_matmul_tflops") or calibration.get("copy_gbps"):
        about.append(f"Measured in the same run: bf16 matmul {harness.fmt(calibration.get('bf16_matmul_tflops'))} "
                     f"TFLOP/s, copy {harness.fmt(calibration.get('copy_gbps'))} GB/s"
                     + (f" ({calibration['warning']})" if calibration.get("warning") else "") + ".")
    if (payload.get("run") or {}).get("quick"):
        about.append("A --quick run: small shapes, no target judged.")
    lines = [f"## {env.get('device', 'unknown device')}: {name}", "", *about, *([""] if about else []),
             f"Targets: {met} of {len(rows)} met, {missed} missed, {unjudged} not judged "
             "(a part that could not be judged: '-')."]
    # A target whose row never came (its item skipped, its family's process lost) has no line below
    # and is in none of the counts: the run's skip lines say what it did not measure.
    skipped = [str(line) for line in (payload.get("run") or {}).get("skipped") or []]
    if skipped:
        lines += ["", f"Not measured in this run ({len(skipped)} skip lines of the run; a target of a row that "
                      "is not here was not judged):", "", *(f"- {_escape(line)}" for line in skipped)]
    shown = [r for r in rows if not (missed_only and r.get("target_pass") is True)]
    families = list(dict.fromkeys(r.get("family", "") for r in shown))
    for family in families:
        lines += ["", f"### {_title(family, on_gpu)}", "",
                  "| op | shape | ours | vs | ours ms | vs time / ours | vs peak / ours | each part: measured (met) "
                  "| met |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in shown:
            if r.get("family", "") != family:
                continue
            cells = [r["op"], r["shape"], r["provider"], r.get("baseline") or "-", harness.fmt(r.get("median_ms")),
                     _ratio(r.get("speedup_vs_baseline")), _ratio(r.get("memory_ratio_vs_baseline")), _parts(r),
                     VERDICT[r.get("target_pass")]]
            lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    if not shown:
        lines += ["", "No row to list." if rows else "No row of this run is held to a target."]
    return "\n".join(lines), (met, missed, unjudged)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scorecard", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", metavar="RESULTS.json", help="result files of python -m benchmarks")
    parser.add_argument("--missed", action="store_true", help="list only the rows whose target was not met")
    args = parser.parse_args(argv)
    sections, failed = [], False
    for path in args.results:
        try:
            payload = harness.read_payload(path)
            section, _ = scorecard(payload, path, missed_only=args.missed)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Said, and the exit status says it; the other files still get their sections.
            print(f"scorecard: argument RESULTS.json: cannot read {path!r} as a result file "
                  f"({type(exc).__name__}: {exc})", file=sys.stderr)
            failed = True
            continue
        sections.append(section)
    if sections:
        print("\n\n".join(sections))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
