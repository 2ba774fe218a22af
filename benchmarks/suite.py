"""``python -m benchmarks``: the benchmark suite's command line and run loop.

Runs every op family on the hardware present (CPU: the torch backend; GPU:
every backend that can run), each beside its baselines in the same run,
prints a table, writes typed JSON rows to ``benchmarks/results/`` and draws a
PNG next to them. ``--compare OLD.json NEW.json`` compares two result files.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
import traceback
from typing import Any, Callable, Sequence

import torch

from benchmarks import harness
from benchmarks.harness import Environment, Measurement, Row, Target

FAMILIES = ("lora", "hypergraph", "contrastive", "model", "training")
# --tier: "costly" items are the long GPU measurements (largest-batch search, B=16,384 chunked
# training) that a session may run in a second call; a family lists them in ``COSTLY_ITEMS``.
TIERS = ("all", "cheap", "costly")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Suite:
    """State of one run: where, which providers, the rows so far, the clock."""

    def __init__(self, *, device: torch.device, quick: bool, json_path: str | None, png_path: str | None,
                 time_budget_s: float | None, max_seconds_per_call: float, providers: Sequence[str] | None,
                 log: Callable[[str], None] = print, tier: str = "all", compile_baselines: bool = False):
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
        self.environment = Environment.probe(device)
        self.rows: list[Row] = []
        self.skipped: list[str] = []
        self.calibration: dict[str, float] = {}
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
        and their fraction of the card's bf16 matmul rate / copy bandwidth measured in this run."""
        metrics: dict[str, float] = {}
        if not (self.is_gpu and meas is not None and meas.median_ms):
            return metrics
        seconds = meas.median_ms * 1e-3
        if flops is not None:
            tflops = flops / seconds / 1e12
            metrics["tflops"] = round(tflops, 2)
            peak = self.calibration.get("bf16_matmul_tflops")
            if peak:
                metrics["frac_of_matmul_peak"] = round(tflops / peak, 3)
        if nbytes is not None:
            gbps = nbytes / seconds / 1e9
            metrics["gbps_min_bytes"] = round(gbps, 1)
            copy = self.calibration.get("copy_gbps")
            if copy:
                metrics["frac_of_copy_bandwidth"] = round(gbps / copy, 3)
        return metrics

    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.is_gpu else torch.float32

    def seconds_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def out_of_time(self, what: str) -> bool:
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

    # ------------------------------------------------------------------ measuring

    def measure(self, label: str, fn: Callable[[], Any], grads: Sequence[torch.Tensor],
                max_seconds: float | None = None, with_memory: bool = True,
                single_call: bool = False) -> Measurement | None:
        """Measure ``fn``; print a progress line; ``None`` (with the reason logged) when it failed."""
        start = time.monotonic()
        result = harness.measure(fn, device=self.device, grads=grads,
                                 max_seconds=max_seconds or self.max_seconds_per_call,
                                 min_reps=3 if self.quick else 5, with_memory=with_memory,
                                 min_seconds=0.2 if self.quick else 1.0,
                                 single_call=single_call)
        took = time.monotonic() - start
        if result.error is not None:
            self.skip(label, result.error.splitlines()[0][:300])
            return None
        peak = "-" if result.peak_mib is None else f"{result.peak_mib:.1f} MiB"
        self.log(f"  {label}: {result.median_ms:.3f} ms median of {result.runs}, peak {peak} ({took:.1f} s)")
        return result

    def measure_group(self, entries: Sequence[tuple[str, Callable[[], Any], Sequence[torch.Tensor]]],
                      single_call: bool = False) -> dict[str, Measurement]:
        """Measure the entries of one configuration (baselines and providers) side by side.

        Peak memory first, one call per entry (also its warm-up); then the times.
        On the CPU the timed calls are interleaved round-robin (see
        ``harness.time_interleaved``); on a GPU each entry is timed in turn.
        Entries that fail are logged and left out of the result.
        """
        results: dict[str, Measurement] = {}
        if single_call or self.device.type == "cuda":
            for label, fn, grads in entries:
                meas = self.measure(label, fn, grads, single_call=single_call)
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
        for (label, _, grads), (median, runs, spread) in zip(alive, timed):
            for t in grads:
                t.grad = None
            results[label] = Measurement(median, peaks[label], runs, spread)
            self.log(f"  {label}: {median:.3f} ms median of {runs} (interleaved), peak {peaks[label]:.4g} MiB")
        self.log(f"  ({time.monotonic() - start:.1f} s for {len(alive)} entries)")
        return results

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
        except RuntimeError as exc:
            text = str(exc)
            if "cannot run" in text or "no backend" in text or "has no" in text:
                self.skip(label, text.splitlines()[0][:300])
            else:
                self.skip(label, f"RuntimeError: {text.splitlines()[0][:300]}")
        except NotImplementedError as exc:
            self.skip(label, f"not implemented yet ({exc})")
        except Exception as exc:
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
            metrics={"runs": measurement.runs, **(metrics or {})},
        )
        if targets and not self.quick:
            row.target = " & ".join(t.text for t in targets)
            outcomes = [t.check(row) for t in targets]
            row.target_pass = None if any(o is None for o in outcomes) else all(outcomes)
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

    def run_info(self) -> dict:
        return {
            "quick": self.quick,
            "tier": self.tier,
            "compile_baselines": self.compile_baselines,
            "providers": self.providers,
            "calibration": self.calibration,
            "skipped": self.skipped,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "load_average_end": _load_average(),
            "argv": sys.argv[1:],
        }


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
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated backends to measure (default: every one that runs here)")
    parser.add_argument("--out-dir", default=RESULTS_DIR, help="where the JSON and PNG go (default: %(default)s)")
    parser.add_argument("--name", default=None, help="file stem (default: <device-slug>-<date>[-quick])")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a shared machine use fewer threads "
                             "than idle cores: oversubscribed OpenMP threads spin and times explode")
    parser.add_argument("--tier", choices=TIERS, default="all",
                        help="all (default); cheap: leave out the costly GPU items (largest-batch search, B=16,384 "
                             "chunked training); costly: only those, with what they are compared with in the same run")
    parser.add_argument("--compile-baselines", choices=("auto", "on", "off"), default="auto",
                        help="also time the main baselines under torch.compile (inductor), named <baseline>+compile "
                             "(auto: on for full CPU runs; off with --quick and on a GPU, where compiling costs "
                             "scarce device time)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which remaining configurations are skipped (gpu_check.sh uses it)")
    parser.add_argument("--max-seconds-per-call", type=float, default=None,
                        help="timing budget of one measurement (default 20 s on CPU, 5 s on GPU, 2 s with --quick)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.compare:
        from benchmarks.compare import compare_files

        print(compare_files(*args.compare))
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in every row
    stem = args.name or f"{harness.device_slug(device)}-{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}" + (
        "-quick" if args.quick else "")
    json_path = os.path.join(args.out_dir, stem + ".json")
    png_path = None if args.no_plot else os.path.join(args.out_dir, stem + ".png")
    per_call = args.max_seconds_per_call or (2.0 if args.quick else (5.0 if device.type == "cuda" else 20.0))
    providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    compile_baselines = (args.compile_baselines == "on"
                         or (args.compile_baselines == "auto" and device.type == "cpu" and not args.quick))
    suite = Suite(device=device, quick=args.quick, json_path=json_path, png_path=png_path,
                  time_budget_s=args.time_budget, max_seconds_per_call=per_call, providers=providers,
                  tier=args.tier, compile_baselines=compile_baselines)
    env = suite.environment
    print(f"ace-kernels benchmarks on {env.device}  torch {env.torch}  triton {env.triton}  cuda {env.cuda}  "
          f"git {env.git_sha}  threads {env.threads}  load {env.load_average}")
    print(f"providers: {', '.join(suite.providers)}{'  (quick shapes)' if args.quick else ''}"
          f"{'' if args.tier == 'all' else f'  (tier {args.tier})'}"
          f"{'  (baselines also under torch.compile)' if compile_baselines else ''}")
    if device.type == "cpu" and env.load_average and env.load_average[0] > 0.5:
        print(f"note: load average {env.load_average[0]} on {os.cpu_count()} cores before the run: other work "
              "shares these cores, CPU times are inflated and noisier")

    from benchmarks import bench_contrastive, bench_device, bench_hypergraph, bench_lora, bench_model, bench_training

    modules = {"lora": bench_lora, "hypergraph": bench_hypergraph, "contrastive": bench_contrastive,
               "model": bench_model, "training": bench_training}
    families = args.only or list(FAMILIES)
    if suite.is_gpu:
        _run_family(suite, "device", bench_device)
    for family in families:
        if suite.out_of_time(f"family {family}"):
            continue
        costly_items = getattr(modules[family], "COSTLY_ITEMS", ())
        if args.tier == "costly" and not costly_items:
            suite.skip(f"family {family}", "no costly items (--tier costly)")
            continue
        if args.tier == "cheap" and getattr(modules[family], "ALL_COSTLY", False):
            suite.skip(f"family {family}", f"its items are costly ({', '.join(costly_items)}; --tier cheap)")
            continue
        _run_family(suite, family, modules[family])

    suite.save()
    print()
    print(harness.format_table(suite.rows))
    if suite.skipped:
        print("\nskipped:")
        for line in suite.skipped:
            print("  " + line)
    failed = [r for r in suite.rows if r.target_pass is False]
    judged = [r for r in suite.rows if r.target_pass is not None]
    if judged:
        print(f"\ntargets: {len(judged) - len(failed)} of {len(judged)} met")
    if png_path and suite.rows:
        try:
            from benchmarks.plot import plot_rows

            plot_rows([r.to_json() for r in suite.rows], png_path, title=f"{env.device} ({env.date})")
            print(f"plot: {png_path}")
        except Exception as exc:
            print(f"plot: not drawn ({type(exc).__name__}: {exc})")
    print(f"rows: {json_path}")
    return 0


def _run_family(suite: Suite, family: str, module) -> None:
    print(f"\n== {family}")
    start = time.monotonic()
    try:
        module.run(suite)
    except Exception as exc:  # one broken family must not cost the others their numbers
        suite.skip(f"family {family}", f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    print(f"== {family} done in {time.monotonic() - start:.1f} s")
