"""The PNG beside each result file: speedup and memory ratio of every comparison row.

One horizontal bar per (op, shape, provider, baseline); ratios on a log axis,
each bar drawn from 1.0 (as fast / as small as the baseline) to its ratio; a
target's threshold, where the row has one, is drawn as a black tick on its bar,
and bars of missed targets are red. Rows with a target and no bar are listed
under the plot with "met", "NOT met" or "not judged".
"""

from __future__ import annotations

import re
from typing import Sequence


def _missed(row: dict, kind: str, key: str) -> bool:
    threshold, value = _threshold(row.get("target"), kind), row.get(key)
    return threshold is not None and value is not None and value < threshold


def _threshold(target: str | None, kind: str) -> float | None:
    """The number in a target text like 'speedup>=5' or 'mem<=1/8' for this panel."""
    if not target:
        return None
    for part in target.split("&"):
        part = part.strip()
        if kind == "speedup":
            match = re.match(r"(?:speedup|throughput)>=([\d.]+)", part)
            if match:
                return float(match.group(1))
            match = re.match(r"time<=([\d.]+)x", part)
            if match:
                return 1 / float(match.group(1))
        else:
            match = re.match(r"mem ratio>=([\d.]+)", part)
            if match:
                return float(match.group(1))
            match = re.match(r"mem<=1/([\d.]+)", part)
            if match:
                return float(match.group(1))
            match = re.match(r"mem<=([\d.]+)x", part)
            if match:
                return 1 / float(match.group(1))
    return None


def plot_rows(rows: Sequence[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    compared = [r for r in rows
                if r.get("baseline") and (r.get("speedup_vs_baseline") or r.get("memory_ratio_vs_baseline"))]
    compared_ids = {id(r) for r in compared}
    labels = [f"{r['op']} {r['shape']} [{r['dtype']}]\n{r['provider']} vs {r['baseline']}" for r in compared]
    height = max(3.0, 0.42 * len(compared) + 1.5)
    # Rows with a target but no bar (no baseline, e.g. a peak-memory cap; or a comparison that is
    # no time or memory ratio, e.g. the largest batch) are listed under the bars.
    alone = [r for r in rows if r.get("target") and id(r) not in compared_ids]
    height += 0.25 * len(alone)
    fig, axes = plt.subplots(1, 2, figsize=(17, height), sharey=True)
    for ax, key, kind, name in ((axes[0], "speedup_vs_baseline", "speedup", "speedup vs baseline (time ratio)"),
                                (axes[1], "memory_ratio_vs_baseline", "memory", "peak-memory ratio (baseline / ours)")):
        values = [r.get(key) for r in compared]
        positions = list(range(len(compared)))
        colors = []
        for r, v in zip(compared, values):
            threshold = _threshold(r.get("target"), kind)
            # A row that failed on neither axis's threshold (a failed correctness check, saved
            # bytes): red on both.
            missed_elsewhere = r.get("target_pass") is False and not any(
                _missed(r, axis, field) for axis, field in (("speedup", "speedup_vs_baseline"),
                                                            ("memory", "memory_ratio_vs_baseline")))
            if v is None:
                colors.append("lightgray")
            elif (threshold is not None and v < threshold) or missed_elsewhere:
                colors.append("tab:red")
            else:
                colors.append("tab:blue" if kind == "speedup" else "tab:green")
        # Bars grow from 1x (as fast / as small as the baseline), right when better, left when worse.
        ax.barh(positions, [v - 1.0 if v else 0.0 for v in values], color=colors, left=1.0)
        for pos, (r, v) in enumerate(zip(compared, values)):
            threshold = _threshold(r.get("target"), kind)
            if threshold is not None:
                ax.plot([threshold, threshold], [pos - 0.4, pos + 0.4], color="black", linewidth=2)
            if v:
                ax.text(v, pos, f" {v:.2f}x", va="center", fontsize=7)
        finite = [v for v in values if v]
        if finite:
            # The axis takes in every target's tick too (one far beyond the bars, a 25x goal met 3x, was drawn
            # out of view).
            ticks = [t for t in (_threshold(r.get("target"), kind) for r in compared) if t]
            low = min(min(finite + ticks), 1.0) / 1.5
            high = max(max(finite + ticks), 1.0) * 3
            ax.set_xscale("log")
            ax.set_xlim(low, high)
        ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_yticks(positions)
        ax.set_yticklabels(labels, fontsize=7)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].invert_yaxis()  # shared y axis: once, so the first row is on top
    fig.suptitle(title or "ace-kernels benchmarks", fontsize=11)
    verdict = {True: "met", False: "NOT met", None: "not judged"}
    notes = [f"{r['op']} {r['shape']} [{r['dtype']}] {r['provider']}"
             + (f" vs {r['baseline']}" if r.get("baseline") else "")
             + (f": {r['median_ms']:.1f} ms" if r.get("median_ms") is not None else "")
             + (f", peak {r['peak_mib']:.1f} MiB" if r.get("peak_mib") is not None else "")
             + f"; target {r['target']}: {verdict[r.get('target_pass')]}"
             for r in alone]
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=8, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.03 + 0.025 * len(notes), 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long tick labels must not be clipped
    plt.close(fig)
