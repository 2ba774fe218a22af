"""``python -m benchmarks``: the benchmark suite's command line and run loop.

Runs every op family on the hardware present (CPU: the torch backend; GPU:
every backend that can run), each beside its baselines in the same run,
prints a table, writes typed JSON rows to ``benchmarks/results/`` and draws a
PNG next to them. ``--compare OLD.json NEW.json`` compares two result files.

Each family runs in a process of its own (``--in-process``: all in this one), one
after the other, each appending its rows to the same JSON file: a GPU fault (an
illegal memory access poisons the CUDA context for the rest of the process) or a
hang then costs only that family. On a GPU the card's ceilings (copy bandwidth,
bf16 matmul rate) are measured once, by the first process (family ``device``; not with
``--tier costly``, whose items use no rates), and reach the later ones through the JSON file
(``run.calibration``). Each process gets what is left of ``--time-budget`` and is killed
``--family-grace`` seconds after it (or after ``--family-idle-timeout`` seconds without output);
the rows it saved stay. A family's process is in a process group of its own: on SIGTERM/SIGINT
this process kills that group, then writes the JSON and the table and exits; if this process is
killed outright, the family's process dies with it (``PR_SET_PDEATHSIG``, benchmarks/__main__.py).
With ``--in-process`` SIGTERM/SIGINT stop the family in progress (its temporary directories
removed as it unwinds), then the JSON and the table are written the same way. Python runs the
handler between two lines of Python: a family inside one long call (a kernel, a wait on a child)
stops when that call returns, and may not stop before if the signal reached another thread.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Sequence

import torch

from benchmarks import PARENT_PID_VARIABLE, harness
from benchmarks.harness import Environment, Measurement, Row, Target

FAMILIES = ("lora", "hypergraph", "contrastive", "distributed", "model", "training", "contrastive_probe", "tuning")
RATE_FAMILIES = ("lora", "hypergraph", "contrastive")  # the families whose rows use the card's rates (family device)
WORKER_FAMILIES = ("device",) + FAMILIES  # "device": the card's ceilings, first on a GPU
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --tier: "costly" items are the long GPU measurements (largest-batch search, B=16,384 chunked
# training, the B=1,000,000 InfoNCE probe, the launch-configuration sweep) that a session may run
# in a second call; a family lists them in ``COSTLY_ITEMS``.
TIERS = ("all", "cheap", "costly")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Suite:
    """State of one run: where, which providers, the rows so far, the clock."""

    def __init__(self, *, device: torch.device, quick: bool, json_path: str | None, png_path: str | None,
                 time_budget_s: float | None, max_seconds_per_call: float, providers: Sequence[str] | None,
                 log: Callable[[str], None] = print, tier: str = "all", compile_baselines: bool = False,
                 environment: Environment | None = None, isolation: str = "in-process"):
        if tier not in TIERS:
            raise ValueError(f"argument 'tier': expected one of {TIERS}, got {tier!r}")
        self.device = device
        self.tier = tier
        self.compile_baselines = compile_baselines
        self.quick = quick
        self.json_path = json_path
        self.png_path = png_path
        self.started = time.monotonic()
        self.deadline = None if time_budget_s is None else self.started + time_budget_s
        self.max_seconds_per_call = max_seconds_per_call
        self.environment = environment or Environment.probe(device)
        self.rows: list[Row] = []
        self.skipped: list[str] = []
        self.calibration: dict[str, Any] = {}
        self.family_status: dict[str, dict] = {}
        self.isolation = isolation
        self.cuda_lost: str | None = None  # the error that lost this process's CUDA context, if one did
        self.log = log
        self.providers = list(providers) if providers else self._default_providers()

    # ------------------------------------------------------------------ providers

    def _default_providers(self) -> list[str]:
        if self.device.type != "cuda":
            return ["torch"]  # the interpreter is for tests, never for timings
        import ace_kernels

        available = ace_kernels.available_backends()
        return [name for name in ("torch", "triton", "cuda") if name in available]

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"

    def rate_metrics(self, meas, *, flops: float | None = None, nbytes: float | None = None) -> dict:
        """On a GPU: achieved TFLOP/s (for ``flops``) or GB/s (for ``nbytes``) of a measurement,
        and their fraction of the card's bf16 matmul rate / copy bandwidth measured in this run.
        Not rounded: targets judge these values (rounded to 3 places, 0.4998 would meet ">= 0.5")."""
        metrics: dict[str, float] = {}
        if not (self.is_gpu and meas is not None and meas.median_ms):
            return metrics
        seconds = meas.median_ms * 1e-3
        if flops is not None:
            tflops = flops / seconds / 1e12
            metrics["tflops"] = tflops
            peak = self.calibration.get("bf16_matmul_tflops")
            if peak:
                metrics["frac_of_matmul_peak"] = tflops / peak
        if nbytes is not None:
            gbps = nbytes / seconds / 1e9
            metrics["gbps_min_bytes"] = gbps
            copy = self.calibration.get("copy_gbps")
            if copy:
                metrics["frac_of_copy_bandwidth"] = gbps / copy
        return metrics

    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.is_gpu else torch.float32

    def seconds_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def out_of_time(self, what: str) -> bool:
        """Whether ``what`` must be skipped because the budget is spent (or this process's CUDA
        context is lost: after a fault every CUDA call fails); the reason is logged."""
        if self.cuda_lost is not None:
            self.skip(what, f"the CUDA context of this process was lost earlier ({self.cuda_lost[:120]})")
            return True
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.skip(what, "the run's time budget is spent")
            return True
        return False

    def include(self, what: str, *, costly: bool, estimate_s: float | None = None) -> bool:
        """Whether to run the item ``what`` now; when not, the reason is logged (``skip``).

        ``costly`` items run in tiers "all" and "costly", the others in "all" and "cheap".
        An ``estimate_s`` (seconds the item should take) larger than the time left skips it
        before it starts rather than letting the run be killed in the middle of it.
        """
        if costly and self.tier == "cheap":
            self.skip(what, "a costly item (--tier cheap); run it with --tier costly")
            return False
        if not costly and self.tier == "costly":
            self.skip(what, "a cheap item (--tier costly)")
            return False
        if self.out_of_time(what):
            return False
        if estimate_s is not None and estimate_s > self.seconds_left():
            self.skip(what, f"estimated {estimate_s:.0f} s, only {max(0.0, self.seconds_left()):.0f} s left in the "
                            "run's time budget")
            return False
        return True

    def skip(self, what: str, why: str) -> None:
        message = f"{what}: skipped ({why})"
        self.skipped.append(message)
        self.log("  " + message)
        if self.is_gpu and self.cuda_lost is None and harness.is_fatal_cuda_error(why):
            self.cuda_lost = why
            self.log("  the CUDA context is lost: every later item of this process is skipped")

    # ------------------------------------------------------------------ measuring

    def measure(self, label: str, fn: Callable[[], Any], grads: Sequence[torch.Tensor],
                max_seconds: float | None = None, with_memory: bool = True,
                single_call: bool = False, one_call: bool = False) -> Measurement | None:
        """Measure ``fn``; print a progress line; ``None`` (with the reason logged) when it failed.
        ``single_call``/``one_call``: see ``harness.measure``."""
        start = time.monotonic()
        result = harness.measure(fn, device=self.device, grads=grads,
                                 max_seconds=max_seconds or self.max_seconds_per_call,
                                 min_reps=3 if self.quick else 5, with_memory=with_memory,
                                 min_seconds=0.2 if self.quick else 1.0,
                                 single_call=single_call, one_call=one_call)
        took = time.monotonic() - start
        if result.error is not None:
            self.skip(label, result.error.splitlines()[0][:300])
            return None
        peak = "-" if result.peak_mib is None else f"{result.peak_mib:.1f} MiB"
        wall = "" if result.wall_ms is None else f", back to back {result.wall_ms:.3f} ms"
        self.log(f"  {label}: {result.median_ms:.3f} ms median of {result.runs}{wall}, peak {peak} ({took:.1f} s)")
        return result

    def measure_group(self, entries: Sequence[tuple[str, Callable[[], Any], Sequence[torch.Tensor]]],
                      single_call: bool = False, one_call: bool = False) -> dict[str, Measurement]:
        """Measure the entries of one configuration (baselines and providers) side by side.

        Peak memory first, one call per entry (also its warm-up); then the times.
        On the CPU the timed calls are interleaved round-robin (see
        ``harness.time_interleaved``); on a GPU each entry is timed in turn.
        Entries that fail are logged and left out of the result.
        """
        results: dict[str, Measurement] = {}
        if single_call or one_call or self.device.type == "cuda":
            for label, fn, grads in entries:
                meas = self.measure(label, fn, grads, single_call=single_call, one_call=one_call)
                if meas is not None:
                    results[label] = meas
            return results
        start = time.monotonic()
        peaks, alive = {}, []
        for label, fn, grads in entries:
            try:
                peaks[label] = harness.peak_memory_mib(fn, device=self.device, grads=grads)
                alive.append((label, fn, grads))
            except Exception as exc:  # a failing entry must not cost the others their numbers
                self.skip(label, harness.describe_error(exc))
        if not alive:
            return results
        timed = harness.time_interleaved([(fn, grads) for _, fn, grads in alive],
                                         min_reps=3 if self.quick else 5, min_seconds=0.2 if self.quick else 1.0,
                                         max_seconds=self.max_seconds_per_call)
        for (label, _, grads), timing in zip(alive, timed, strict=True):
            for t in grads:
                t.grad = None
            results[label] = Measurement(timing.median_ms, peaks[label], timing.runs, timing.spread_ms,
                                         iqr_ms=timing.iqr_ms)
            self.log(f"  {label}: {timing.median_ms:.3f} ms median of {timing.runs} (interleaved), "
                     f"peak {peaks[label]:.4g} MiB")
        self.log(f"  ({time.monotonic() - start:.1f} s for {len(alive)} entries)")
        return results

    def measure_checked(self, baselines: Sequence[tuple[str, Callable[[], Any], Sequence[torch.Tensor]]],
                        providers: Sequence[tuple[str, Callable[[], Any] | None, Callable[[], Any],
                                                  Sequence[torch.Tensor]]],
                        single_call: bool = False, one_call: bool = False) -> dict[str, Measurement]:
        """Measure one configuration: its ``baselines`` (``measure_group`` entries) and each of
        ``providers`` (``(label, check, step, grads)``) whose ``check`` (None: none) passes.
        ``single_call``/``one_call``: see ``harness.measure``.

        On a GPU the baselines are measured first, then each provider is checked and measured
        before the next one is checked, in the order given (the least proven last): a fault (it
        loses the process's CUDA context) then costs only the providers after it, and what was
        measured before it still becomes rows. On the CPU, where nothing loses a context, every
        check runs first and then all entries are timed together (interleaved, ``measure_group``).
        """
        if not (single_call or one_call or self.is_gpu):
            alive = [(label, step, grads) for label, check, step, grads in providers
                     if check is None or self.provider_can_run(label, check)]
            return self.measure_group(list(baselines) + alive)
        one = dict(single_call=single_call, one_call=one_call)
        results = self.measure_group(baselines, **one) if baselines else {}
        for label, check, step, grads in providers:
            if self.cuda_lost is not None:
                self.out_of_time(label)  # logs why it is skipped
                continue
            if check is not None and not self.provider_can_run(label, check):
                continue
            results.update(self.measure_group([(label, step, grads)], **one))
        return results

    def release_cuda_memory(self) -> None:
        """``gc`` and ``torch.cuda.empty_cache()`` between configurations on a GPU; nothing once
        the context is lost (every CUDA call then raises). A fault it reveals is recorded."""
        if not self.is_gpu or self.cuda_lost is not None:
            return
        gc.collect()
        try:
            torch.cuda.empty_cache()
        except Exception as exc:
            self.skip("releasing CUDA memory", harness.describe_error(exc))

    def compiled_entry(self, label: str, forward: Callable[[], Any], finish: Callable[[Any], Any],
                       grads: Sequence[torch.Tensor]):
        """The baseline ``<label>+compile``: ``finish(compiled_forward())`` with ``forward`` under
        ``torch.compile`` (inductor, static shapes; its backward graph compiled by AOTAutograd).

        Returns a ``measure_group`` entry, or None when compiled baselines are off
        (``--compile-baselines``) or compiling fails (the reason is logged). The step runs once
        here, so compile time and compile-time allocations stay out of its measurement.
        """
        name = f"{label}+compile"
        if not self.compile_baselines:
            return None
        compiled = torch.compile(forward, dynamic=False)

        def step():
            return finish(compiled())

        start = time.monotonic()
        try:
            step()
        except Exception as exc:  # a baseline that does not compile is reported, not fatal
            self.skip(name, f"torch.compile failed: {harness.describe_error(exc)}")
            return None
        finally:
            for t in grads:
                t.grad = None
        self.log(f"  {name}: compiled in {time.monotonic() - start:.1f} s")
        return (name, step, grads)

    def provider_can_run(self, label: str, call: Callable[[], Any]) -> bool:
        """Run ``call`` once (a correctness probe); log and return False if the backend cannot take it."""
        try:
            call()
            return True
        except NotImplementedError as exc:  # before RuntimeError, of which it is a subclass
            self.skip(label, f"not implemented yet ({exc})")
        except RuntimeError as exc:
            text = str(exc)
            if "cannot run" in text or "no backend" in text or "has no" in text:
                self.skip(label, text.splitlines()[0][:300])
            else:
                self.skip(label, f"RuntimeError: {text.splitlines()[0][:300]}")
        except Exception as exc:
            if isinstance(exc, ValueError) and str(exc).startswith("argument 'backend'"):
                self.skip(label, str(exc).splitlines()[0][:300])  # a backend this op does not have
                return False
            self.skip(label, harness.describe_error(exc))
            if os.environ.get("ACE_BENCH_TRACEBACK"):
                traceback.print_exc()
        return False

    # ------------------------------------------------------------------ rows

    def _row(self, *, family, op, shape, dtype, provider, baseline, measurement, base_measurement,
             targets, metrics, mode) -> Row:
        env = self.environment
        speedup = memory_ratio = None
        if base_measurement is not None:
            if base_measurement.median_ms and measurement.median_ms:
                speedup = base_measurement.median_ms / measurement.median_ms
            if base_measurement.peak_mib is not None and measurement.peak_mib:
                memory_ratio = base_measurement.peak_mib / measurement.peak_mib
        row = Row(
            op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), provider=provider, baseline=baseline,
            median_ms=measurement.median_ms, peak_mib=measurement.peak_mib,
            speedup_vs_baseline=speedup, memory_ratio_vs_baseline=memory_ratio,
            target=None, target_pass=None, device=env.device, torch=env.torch, triton=env.triton,
            cuda=env.cuda, git_sha=env.git_sha, date=env.date, family=family, mode=mode,
            metrics={"runs": measurement.runs, **timing_metrics(measurement), **(metrics or {})},
            wall_ms=measurement.wall_ms,  # not rounded: ratios are made from it
        )
        if targets and not self.quick:
            # Speed and memory count only for checked, correct outputs: a row without any
            # correctness check is not judged at all.
            checks = harness.check_targets(row.metrics, row.dtype)
            targets = list(targets) + checks
            row.target = " & ".join(t.text for t in targets) + ("" if checks else " (no correctness check)")
            row.target_parts = [t.part(row) for t in targets]
            if not checks:
                row.target_parts.append({"text": "(no correctness check)", "value": None, "met": None})
            outcomes = [part["met"] for part in row.target_parts]
            # One target missed fails the row even when another could not be judged (no calibration).
            row.target_pass = False if False in outcomes else (None if None in outcomes else True)
        return row

    def add_rows(self, *, family: str, op: str, shape: str, dtype, mode: str = "fwd+bwd",
                 ours: dict[str, tuple[Measurement, dict]], baselines: dict[str, tuple[Measurement, dict]],
                 targets: Callable[[str, str | None], list[Target]] | None = None) -> list[Row]:
        """Rows for one configuration: each baseline alone, then each provider against each baseline.

        ``targets(provider, baseline)`` returns the goals that comparison is held to.
        """
        new: list[Row] = []
        for name, (meas, metrics) in baselines.items():
            new.append(self._row(family=family, op=op, shape=shape, dtype=dtype, provider=name, baseline=None,
                                 measurement=meas, base_measurement=None, targets=None, metrics=metrics, mode=mode))
        for provider, (meas, metrics) in ours.items():
            if baselines:
                for name, (base, _) in baselines.items():
                    goal = targets(provider, name) if targets else []
                    new.append(self._row(family=family, op=op, shape=shape, dtype=dtype, provider=provider,
                                         baseline=name, measurement=meas, base_measurement=base, targets=goal,
                                         metrics=metrics, mode=mode))
            else:
                goal = targets(provider, None) if targets else []
                new.append(self._row(family=family, op=op, shape=shape, dtype=dtype, provider=provider,
                                     baseline=None, measurement=meas, base_measurement=None, targets=goal,
                                     metrics=metrics, mode=mode))
        self.rows.extend(new)
        self.save()
        return new

    def add_plain_row(self, *, family: str, op: str, shape: str, dtype, provider: str, measurement: Measurement,
                      metrics: dict, mode: str, baseline: str | None = None,
                      targets: Sequence[Target] | None = None) -> Row:
        """One row without time or memory ratios (its comparison, if any, is in ``metrics``).

        ``baseline`` names the row it is compared with when the comparison is not of time or
        peak memory at the same shape (e.g. the largest batch each fits), so the two ratio
        fields stay ``None``; ``targets`` then judge ``metrics`` entries.
        """
        row = self._row(family=family, op=op, shape=shape, dtype=dtype, provider=provider, baseline=baseline,
                        measurement=measurement, base_measurement=None, targets=list(targets or []) or None,
                        metrics=metrics, mode=mode)
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        """Rewrite the JSON after every configuration, so a run cut short keeps what it measured."""
        if self.json_path:
            harness.write_json(self.json_path, self.environment, self.rows, extra=self.run_info())

    def load_state(self, payload: dict) -> None:
        """Take the rows, skip lines, calibration and family outcomes of an earlier process of this
        run from its JSON file's content (each family's process appends to what the ones before
        wrote)."""
        run = payload.get("run") or {}
        self.rows = [harness.row_from_json(r) for r in payload.get("rows", [])]
        self.skipped = list(run.get("skipped") or [])
        self.calibration = dict(run.get("calibration") or {})
        self.family_status = dict(run.get("families") or {})

    def run_info(self) -> dict:
        return {
            "quick": self.quick,
            "tier": self.tier,
            "compile_baselines": self.compile_baselines,
            "providers": self.providers,
            "calibration": self.calibration,
            "skipped": self.skipped,
            "isolation": self.isolation,
            "families": self.family_status,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "load_average_end": _load_average(),
            "argv": sys.argv[1:],
        }


def timing_metrics(meas: Measurement) -> dict:
    """The spread of a measurement's timed calls and, on a GPU, its back-to-back wall time."""
    metrics: dict[str, Any] = {}
    if meas.spread_ms is not None and meas.runs and meas.runs > 1:
        metrics["min_ms"] = round(meas.spread_ms[0], 4)
        metrics["max_ms"] = round(meas.spread_ms[1], 4)
    if meas.iqr_ms is not None:
        metrics["iqr_ms"] = round(meas.iqr_ms, 4)
    if meas.wall_ms is not None and meas.median_ms:
        metrics["wall_calls"] = meas.wall_calls
        metrics["launch_bound"] = bool(meas.wall_ms > harness.LAUNCH_BOUND_RATIO * meas.median_ms)
    return metrics


def _load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------ CLI


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (CI smoke run); no targets judged")
    parser.add_argument("--only", action="append", choices=FAMILIES, metavar="FAMILY",
                        help=f"run only this family (repeatable): {', '.join(FAMILIES)}")
    parser.add_argument("--compare", nargs=2, metavar=("OLD.json", "NEW.json"),
                        help="compare two result files instead of measuring")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated backends to measure (default: every one that runs here)")
    parser.add_argument("--out-dir", default=RESULTS_DIR, help="where the JSON and PNG go (default: %(default)s)")
    parser.add_argument("--name", default=None,
                        help="file stem (default: <device-slug>-<date>[-quick], then -2, -3, ... when a run of the "
                             "same day wrote that file already; a name given here is written over)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a shared machine use fewer threads "
                             "than idle cores: oversubscribed OpenMP threads spin and times explode")
    parser.add_argument("--tier", choices=TIERS, default="all",
                        help="all (default); cheap: leave out the costly items (the largest-batch search, the training "
                             "family's chunked steps, the B=1,000,000 probe, the tuning sweep); costly: only those, "
                             "with what they are compared with in the same run")
    parser.add_argument("--compile-baselines", choices=("auto", "on", "off"), default="auto",
                        help="also time the main baselines under torch.compile (inductor), named <baseline>+compile "
                             "(auto: on for full CPU runs; off with --quick and on a GPU, where compiling costs "
                             "scarce device time; default: %(default)s)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which remaining configurations are skipped")
    parser.add_argument("--hard-limit", type=float, default=None,
                        help="seconds (from this process's start, torch's import aside) after which this run is "
                             "killed from outside: --time-budget and --family-grace are derived from it (see "
                             "budget_for_hard_limit)")
    parser.add_argument("--hard-deadline", type=float, default=None,
                        help="the same as an absolute time (seconds since the epoch, `date +%%s`) at which this run is "
                             "killed from outside: gpu_check.sh passes its stage's kill time, so the time the "
                             "interpreter and torch take to start counts against it")
    parser.add_argument("--max-seconds-per-call", type=float, default=None,
                        help="timing budget of one measurement (default 20 s on CPU, 2 s on GPU, 2 s with --quick)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every family in this process (default: one process per family, so that a GPU "
                             "fault or a hang costs only that family)")
    parser.add_argument("--family-grace", type=float, default=None,
                        help="seconds a family's process may run past --time-budget (finishing the configuration "
                             "it is in) before it is killed (default 30)")
    parser.add_argument("--family-idle-timeout", type=float, default=None,
                        help="kill a family's process after this many seconds without output (hung); "
                             f"default on a GPU {GPU_QUICK_FAMILIES_IDLE_TIMEOUT_S:.0f} for "
                             f"{', '.join(GPU_QUICK_FAMILIES)} and {GPU_IDLE_TIMEOUT_S:.0f} for the others, "
                             "off (0) on a CPU")
    # A family's process (internal): which family, and the run's deadline on the wall clock.
    parser.add_argument("--worker", choices=WORKER_FAMILIES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline-epoch", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, with argparse's one-line error (exit status 2), values the run cannot use."""
    for flag, minimum in (("time_budget", None), ("hard_limit", None), ("max_seconds_per_call", None),
                          ("family_grace", 0.0), ("family_idle_timeout", 0.0)):
        value = getattr(args, flag)
        if value is None:
            continue
        if not math.isfinite(value) or (value <= 0 if minimum is None else value < minimum):
            expected = "a positive number of seconds" if minimum is None else "a number of seconds >= 0"
            parser.error(f"argument --{flag.replace('_', '-')}: expected {expected}, got {value:g}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"argument --threads: expected >= 1, got {args.threads}")
    if args.device is not None:
        try:
            harness.parse_device(args.device)
        except ValueError as exc:
            parser.error(f"argument --device: {exc}")
    if args.providers is not None:
        from ace_kernels._dispatch import BACKENDS

        names = [p.strip() for p in args.providers.split(",")]
        unknown = [p for p in names if p not in BACKENDS]
        if unknown or not names:
            parser.error(f"argument --providers: expected a comma-separated list of {', '.join(BACKENDS)}, "
                         f"got {args.providers!r}")
        args.providers = ",".join(dict.fromkeys(names))  # a backend named twice is measured once
    if args.name is not None and (not args.name or any(s in args.name for s in (os.sep, os.altsep) if s)):
        parser.error(f"argument --name: expected a file stem (the file goes into --out-dir), got {args.name!r}")
    if not args.out_dir:
        parser.error("argument --out-dir: expected a directory, got ''")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        parser.error(f"argument --out-dir: {args.out_dir!r} is a file, expected a directory")
    # Absolute: each family's process runs from the repository root, and a relative path would
    # send its rows to another directory than the one this process names the file in.
    args.out_dir = os.path.abspath(args.out_dir)
    if not args.compare:
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=args.out_dir, prefix=".write-check-", delete=True)
            probe.close()
        except OSError as exc:
            parser.error(f"argument --out-dir: cannot write results into {args.out_dir!r} "
                         f"({type(exc).__name__}: {exc.strerror or exc})")
        named = None if args.name is None else os.path.join(args.out_dir, args.name + ".json")
        if named is not None and os.path.isdir(named):
            parser.error(f"argument --name: {named!r} is a directory, expected a results file to write")
    if args.hard_deadline is not None and not (math.isfinite(args.hard_deadline) and args.hard_deadline > time.time()):
        parser.error(f"argument --hard-deadline: expected a kill time ahead (seconds since the epoch), got "
                     f"{args.hard_deadline:g}")
    if args.only:
        args.only = list(dict.fromkeys(args.only))  # a family named twice runs once
    for path in args.compare or ():
        if not os.path.isfile(path):
            parser.error(f"argument --compare: {path!r} is not a file")


def _free_stem(out_dir: str, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... when a run of the same day already wrote that file: a
    run never replaces another's results unless ``--name`` asks for that file explicitly."""
    candidate, number = stem, 1
    while os.path.exists(os.path.join(out_dir, candidate + ".json")):
        number += 1
        candidate = f"{stem}-{number}"
    return candidate


GPU_IDLE_TIMEOUT_S = 180.0  # longer than any single call the GPU suite makes (the B=16,384 step: 30-70 s)
DEFAULT_FAMILY_GRACE_S = 30.0
# Families whose every call (and compile) takes seconds at most: a hang there is cut sooner, so
# that it does not eat most of a short GPU session's suite stage.
GPU_QUICK_FAMILIES_IDLE_TIMEOUT_S = 90.0
GPU_QUICK_FAMILIES = ("device", "lora", "hypergraph", "contrastive", "tuning")


def family_idle_timeout(family: str, given: float | None, is_gpu: bool) -> float:
    """Seconds without output after which ``family``'s process counts as hung (0: never):
    ``--family-idle-timeout`` when given; on a GPU 90 s for the families of short calls, 180 s
    for the others (model, training and the B=1,000,000 probe time calls of up to a minute);
    never on a CPU."""
    if given is not None:
        return given
    if not is_gpu:
        return 0.0
    return GPU_QUICK_FAMILIES_IDLE_TIMEOUT_S if family in GPU_QUICK_FAMILIES else GPU_IDLE_TIMEOUT_S


def budget_for_hard_limit(limit_s: float) -> tuple[float, float]:
    """(time budget, family grace) for a run killed from outside after ``limit_s`` seconds.

    Above 135 s the suite stops starting configurations 45 s before the kill (one configuration,
    the full-size model build included, fits in that margin); at or under it, after two thirds
    of the limit. A family's process is killed ``grace`` seconds after the budget, leaving the
    rest of the margin (10 s, or half of a small one) to write the table.
    """
    limit_s = max(0.0, float(limit_s))
    budget = limit_s - 45.0 if limit_s > 135.0 else limit_s * 2.0 / 3.0
    margin = limit_s - budget
    grace = margin - 10.0 if margin > 20.0 else margin / 2.0
    return budget, grace


def run_budget(args, now: float | None = None) -> tuple[float | None, float | None]:
    """(time budget, family grace) of a run from its arguments, ``now`` (``time.time()``) when the
    budget starts: ``--time-budget``/``--family-grace``, capped by what ``--hard-limit`` (seconds
    from now) and ``--hard-deadline`` (an absolute kill time: the start-up so far already counts
    against it) allow, the nearer of the two kills deciding (``budget_for_hard_limit``)."""
    now = time.time() if now is None else now
    time_budget, grace = args.time_budget, args.family_grace
    limits = [limit for limit in (args.hard_limit, None if args.hard_deadline is None else args.hard_deadline - now)
              if limit is not None]
    if limits:
        derived_budget, derived_grace = budget_for_hard_limit(min(limits))
        time_budget = derived_budget if time_budget is None else min(time_budget, derived_budget)
        grace = derived_grace if grace is None else min(grace, derived_grace)
    return time_budget, grace


def run_stages(families: Sequence[str], *, is_gpu: bool, tier: str) -> list[str]:
    """The processes of a run, in order: on a GPU first ``device`` (the card's ceilings), but only
    when a family whose rows use them (``RATE_FAMILIES``) runs cheap items, i.e. not with
    ``--tier costly`` (its items, the largest-batch search and chunked training, use no rates)."""
    rated = any(f in RATE_FAMILIES for f in families)
    return (["device"] if is_gpu and rated and tier != "costly" else []) + list(families)


def _tier_skips(suite: Suite, family: str, module, tier: str) -> bool:
    """Whether ``--tier`` leaves the whole family out (the reason is logged)."""
    costly_items = getattr(module, "COSTLY_ITEMS", ())
    if tier == "costly" and not costly_items:
        suite.skip(f"family {family}", "no costly items (--tier costly)")
        return True
    if tier == "cheap" and getattr(module, "ALL_COSTLY", False):
        suite.skip(f"family {family}", f"its items are costly ({', '.join(costly_items)}; --tier cheap)")
        return True
    return False


def _modules() -> dict:
    from benchmarks import (bench_contrastive, bench_device, bench_distributed, bench_hypergraph, bench_lora,
                            bench_model, bench_probe, bench_training, bench_tuning)

    return {"device": bench_device, "lora": bench_lora, "hypergraph": bench_hypergraph,
            "contrastive": bench_contrastive, "distributed": bench_distributed, "model": bench_model,
            "training": bench_training, "contrastive_probe": bench_probe, "tuning": bench_tuning}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.compare:
        from benchmarks.compare import report

        return report(*args.compare, "python -m benchmarks: error: argument --compare:")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = harness.parse_device(args.device)  # checked by _check_args
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in every row
        if device.index is not None:
            torch.cuda.set_device(device)  # CUDA events, streams and synchronize follow the current device
    stem = args.name or _free_stem(args.out_dir, f"{harness.device_slug(device)}-"
                                                 f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}" + (
                                                     "-quick" if args.quick else ""))
    json_path = os.path.join(args.out_dir, stem + ".json")
    png_path = None if args.no_plot else os.path.join(args.out_dir, stem + ".png")
    # GPU: 2 s of timed calls (a 250 ms training step still gets 8; harness.cuda_rep_ms).
    per_call = args.max_seconds_per_call or (2.0 if (args.quick or device.type == "cuda") else 20.0)
    providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    compile_baselines = (args.compile_baselines == "on"
                         or (args.compile_baselines == "auto" and device.type == "cpu" and not args.quick))
    time_budget, grace = run_budget(args)
    if args.deadline_epoch is not None:  # a family's process: what is left of the run's budget
        time_budget = args.deadline_epoch - time.time()
    grace = DEFAULT_FAMILY_GRACE_S if grace is None else grace

    if args.worker:
        return _worker(args, device=device, json_path=json_path, time_budget=time_budget, per_call=per_call,
                       providers=providers, compile_baselines=compile_baselines)

    # This run writes the stem's JSON anew: a PNG an earlier run of the same name left beside it
    # would show that run's numbers next to this run's rows (with --no-plot, or when nothing is
    # measured, none is drawn below to replace it).
    stale_png = os.path.join(args.out_dir, stem + ".png")
    if os.path.isfile(stale_png):
        try:
            os.remove(stale_png)
        except OSError as exc:
            print(f"note: {stale_png} is from an earlier run and could not be removed ({exc.strerror or exc})")
    isolation = "in-process" if args.in_process else "process per family"
    suite = Suite(device=device, quick=args.quick, json_path=json_path, png_path=png_path,
                  time_budget_s=time_budget, max_seconds_per_call=per_call, providers=providers,
                  tier=args.tier, compile_baselines=compile_baselines, isolation=isolation)
    env = suite.environment
    print(f"ace-kernels benchmarks on {env.device}  torch {env.torch}  triton {env.triton}  cuda {env.cuda}  "
          f"git {env.git_sha}  threads {env.threads}  load {env.load_average}")
    print(f"providers: {', '.join(suite.providers)}{'  (quick shapes)' if args.quick else ''}"
          f"{'' if args.tier == 'all' else f'  (tier {args.tier})'}"
          f"{'  (baselines also under torch.compile)' if compile_baselines else ''}  ({isolation}"
          f"{'' if time_budget is None else f', budget {time_budget:.0f} s'})")
    if device.type == "cpu" and env.load_average and env.load_average[0] > 0.5:
        print(f"note: load average {env.load_average[0]} on {os.cpu_count()} cores before the run: other work "
              "shares these cores, CPU times are inflated and noisier")

    modules = _modules()
    families = args.only or list(FAMILIES)
    stages = run_stages(families, is_gpu=suite.is_gpu, tier=args.tier)
    if suite.is_gpu and "device" not in stages:
        suite.log(f"  (family device not run: only the {', '.join(RATE_FAMILIES)} rows use the card's rates, "
                  f"and {'--tier costly runs none of their items' if args.tier == 'costly' else 'none of them runs'})")
    worker_options = dict(device=device, stem=stem, per_call=per_call, providers=providers,
                          compile_baselines=compile_baselines, grace=grace)
    terminated = None
    loading = False
    previous_handlers = _install_termination_handlers()
    try:
        for family in stages:
            if suite.out_of_time(f"family {family}"):
                continue
            if family != "device" and _tier_skips(suite, family, modules[family], args.tier):
                continue
            # A family that says it cannot run here (the reason logged) gets no process to say so.
            if getattr(modules[family], "unavailable", lambda _: False)(suite):
                continue
            if args.in_process:
                started = time.monotonic()
                if not _run_family(suite, family, modules[family]):
                    suite.family_status[family] = {"outcome": _RAISED, "rc": None,
                                                   "seconds": round(time.monotonic() - started, 1)}
                continue
            suite.save()  # the family's process starts from this file
            started = time.monotonic()
            try:
                idle = family_idle_timeout(family, args.family_idle_timeout, device.type == "cuda")
                status = _run_family_process(suite, family, args, idle=idle, **worker_options)
            except _Terminated as exc:
                terminated = exc
                status = {"outcome": f"was killed: the suite itself got {exc.name}", "rc": None,
                          "seconds": round(time.monotonic() - started, 1)}
            loading = True  # a signal while the file is read: the handler below reads it again
            if os.path.exists(json_path):
                suite.load_state(harness.read_payload(json_path))
            loading = False
            suite.family_status[family] = status
            if status["outcome"] not in ("ok", _RAISED):  # a raised error is a skip line of its process already
                suite.skip(f"family {family}", f"lost: its process {status['outcome']} ({status['seconds']:.0f} s "
                                                "in all); the rows it saved before are kept")
            if terminated is not None:
                break
    except _Terminated as exc:  # between two families: no process of this run is left
        terminated = exc
        if loading and os.path.exists(json_path):
            # The signal came while the last family's rows were read: without them the save below
            # would write the rows from before that family over its file.
            suite.load_state(harness.read_payload(json_path))
            suite.family_status[family] = status
    finally:
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)
    if terminated is not None:
        stopped = "the family in progress stops" if args.in_process else "its family process was killed with it"
        print(f"\n{terminated.name}: the suite stops ({stopped}); the table below holds the rows saved so far",
              flush=True)

    suite.save()
    print()
    print(harness.format_table(suite.rows))
    if suite.skipped:
        print("\nskipped:")
        for line in suite.skipped:
            print("  " + line)
    failed = [r for r in suite.rows if r.target_pass is False]
    judged = [r for r in suite.rows if r.target_pass is not None]
    unjudged = [r for r in suite.rows if r.target and r.target_pass is None]
    if judged or unjudged:
        print(f"\ntargets: {len(judged) - len(failed)} of {len(judged)} met"
              + (f"; {len(unjudged)} not judged (a check or a calibration missing: ok column '-')" if unjudged
                 else ""))
    if not suite.rows:
        print("\nnothing was measured (see 'skipped' above for why)")
    # Each measurement once: a provider's has a row per baseline it is compared with, all alike.
    launch_bound = dict.fromkeys(f"{r.op} {r.shape} {r.provider}" for r in suite.rows if r.metrics.get("launch_bound"))
    if launch_bound:
        print(f"\nlaunch-bound (back-to-back wall time over {harness.LAUNCH_BOUND_RATIO}x the event median; "
              "their event-time ratios may flatter): " + "; ".join(launch_bound))
    if png_path and suite.rows:
        try:
            from benchmarks.plot import plot_rows

            plot_rows([r.to_json() for r in suite.rows], png_path,
                      title=f"{env.device} ({env.date}{', --quick shapes' if args.quick else ''})")
            print(f"plot: {png_path}")
        except Exception as exc:
            print(f"plot: not drawn ({type(exc).__name__}: {exc})")
    print(f"rows: {json_path}")
    if terminated is not None:
        return 128 + terminated.signum
    # A family that raised, or whose process crashed or hung, is a failure of the run (its rows are
    # kept above); one stopped at the run's own time budget is not.
    raised = [family for family, status in suite.family_status.items() if status["outcome"] == _RAISED]
    failed_families = [family for family, status in suite.family_status.items()
                       if status["outcome"] not in ("ok", _RAISED) and not status["outcome"].endswith(_AFTER_BUDGET)]
    if raised:
        print(f"failed: family {', '.join(raised)} raised an error (see 'skipped'); exit status 1")
    if failed_families:
        print(f"failed: the process of family {', '.join(failed_families)} was lost (see 'skipped'); exit status 1")
    return 1 if raised or failed_families else 0


def _worker(args, *, device, json_path, time_budget, per_call, providers, compile_baselines) -> int:
    """One family's process: append its rows to ``json_path`` (written by the parent first)."""
    payload = harness.read_payload(json_path) if os.path.exists(json_path) else None
    environment = Environment(**payload["environment"]) if payload else None  # one date and sha for every row
    suite = Suite(device=device, quick=args.quick, json_path=json_path, png_path=None, time_budget_s=time_budget,
                  max_seconds_per_call=per_call, providers=providers, tier=args.tier,
                  compile_baselines=compile_baselines, environment=environment, isolation="process per family")
    if payload:
        suite.load_state(payload)
    _inject_fault(args.worker)
    ok = _run_family(suite, args.worker, _modules()[args.worker])
    suite.save()
    return 0 if ok else _RAISED_RC


def _inject_fault(family: str) -> None:
    """Tests of the process isolation: ``ACE_BENCH_FAULT=<family>:crash`` (the process dies as on
    a GPU fault), ``<family>:hang`` (it stops printing) or ``<family>:badbytes`` (it prints a line
    that is not UTF-8, then runs as usual) in that family's process."""
    fault = os.environ.get("ACE_BENCH_FAULT", "")
    name, _, kind = fault.partition(":")
    if name != family:
        return
    print(f"  (ACE_BENCH_FAULT: {kind} in family {family}, pid {os.getpid()})", flush=True)
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGABRT)
    elif kind == "hang":
        time.sleep(3600)
    elif kind == "badbytes":
        sys.stdout.flush()
        sys.stdout.buffer.write(b"  (not UTF-8: \xff\xfe\xc3)\n")
        sys.stdout.buffer.flush()


def _worker_command(family: str, args, *, device, stem, per_call, providers, compile_baselines,
                    deadline_epoch) -> list[str]:
    command = [sys.executable, "-m", "benchmarks", "--worker", family, "--device", str(device),
               "--out-dir", args.out_dir, "--name", stem, "--tier", args.tier,
               "--compile-baselines", "on" if compile_baselines else "off", "--max-seconds-per-call", str(per_call)]
    if args.quick:
        command.append("--quick")
    if args.threads:
        command += ["--threads", str(args.threads)]
    if providers:
        command += ["--providers", ",".join(providers)]
    if deadline_epoch is not None:
        command += ["--deadline-epoch", f"{deadline_epoch:.3f}"]
    return command


def _run_family_process(suite: Suite, family: str, args, *, device, stem, per_call, providers, compile_baselines,
                        grace, idle) -> dict:
    """Run one family in a process of its own, its output passed through; its outcome.

    Killed (with its process group) ``grace`` seconds after the run's deadline, or after
    ``idle`` seconds without a line of output (0: never).
    """
    deadline_epoch = None
    kill_at = None
    if suite.deadline is not None:
        left = suite.deadline - time.monotonic()
        deadline_epoch = time.time() + left
        kill_at = suite.deadline + grace
    command = _worker_command(family, args, device=device, stem=stem, per_call=per_call, providers=providers,
                              compile_baselines=compile_baselines, deadline_epoch=deadline_epoch)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env[PARENT_PID_VARIABLE] = str(os.getpid())  # the worker dies with this process (benchmarks/__main__.py)
    print(f"\n[family {family}: a process of its own]", flush=True)
    start = time.monotonic()
    # Its own process group (so that killing the group spares this process), not its own session:
    # this process's SIGTERM/SIGINT handler kills that group, and PR_SET_PDEATHSIG (set by the
    # worker) kills the worker when this process dies of SIGKILL. Output decoded leniently: a
    # stray byte in a library's message must not kill the reader thread.
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", bufsize=1,
                            **_own_process_group())
    _WORKERS.append(proc)
    last_output = [time.monotonic()]

    def pump():
        for line in proc.stdout:
            last_output[0] = time.monotonic()
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = None
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if kill_at is not None and now > kill_at:
                killed = f"was killed {grace:.0f} s {_AFTER_BUDGET}"
            elif idle and now - last_output[0] > idle:
                killed = f"was killed after {idle:.0f} s without output (hung?)"
            if killed:
                _kill_group(proc)
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        proc.wait()
        # A process killed while it saved the rows leaves its temp file beside the JSON (its pid in the name).
        harness.remove_temp_files_of(os.path.join(args.out_dir, stem + ".json"), proc.pid)
        harness.remove_temp_dirs_of(proc.pid)  # and the temporary directories of its items (harness.temp_dir)
        if proc in _WORKERS:
            _WORKERS.remove(proc)
        reader.join(timeout=5)
    seconds = round(time.monotonic() - start, 1)
    rc = proc.returncode
    if killed:
        outcome = killed
    elif rc == 0:
        outcome = "ok"
    elif rc == _RAISED_RC:
        outcome = _RAISED
    elif rc < 0:
        outcome = f"died of {_signal_name(-rc)}"
    else:
        outcome = f"exited with rc {rc}"
    print(f"== {family}: process {outcome if outcome != 'ok' else 'done'} in {seconds:.1f} s", flush=True)
    return {"outcome": outcome, "rc": rc, "seconds": seconds}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own process group: the family's process and its children
    except (ProcessLookupError, PermissionError):
        pass


# How a family's outcome ends when the suite stopped it at the run's own time budget (not a failure).
_AFTER_BUDGET = "after the run's time budget"
# A family whose run() raised (its error is a skip line, its traceback in the output): the outcome,
# and the exit status of its process that says so.
_RAISED = "raised an error"
_RAISED_RC = 3

_WORKERS: list[subprocess.Popen] = []  # the family process running now (killed on SIGTERM/SIGINT)


def _own_process_group() -> dict:
    """Popen keywords that put the child in a process group of its own (its pid), same session."""
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}


class _Terminated(BaseException):
    """Raised in the suite's process by its SIGTERM/SIGINT handler (after the family's process
    group was killed), so the suite writes what it has and exits."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = _signal_name(signum)


def _on_termination(signum, frame) -> None:
    # A second signal while the suite winds up kills it the default way (the worker is gone).
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, signal.SIG_DFL)
    for proc in list(_WORKERS):
        _kill_group(proc)
    raise _Terminated(signum)


def _install_termination_handlers() -> dict:
    """SIGTERM (``timeout``'s, which only reaches this process: the family's process is in a group
    of its own) and SIGINT (Ctrl-C reaches the terminal's foreground group, this process's) kill the
    family's process group first; the previous handlers are returned, to be put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for number in (signal.SIGTERM, signal.SIGINT):
        previous[number] = signal.signal(number, _on_termination)
    return previous


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _run_family(suite: Suite, family: str, module) -> bool:
    """Run ``family``; False when it raised (logged as a skip of it, with the traceback)."""
    print(f"\n== {family}")
    start = time.monotonic()
    ok = True
    try:
        module.run(suite)
    except Exception as exc:  # one broken family must not cost the others their numbers
        suite.skip(f"family {family}", f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        ok = False
    print(f"== {family} done in {time.monotonic() - start:.1f} s")
    return ok
