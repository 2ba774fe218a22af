"""Measurement machinery shared by every benchmark family.

Timing
    GPU: ``triton.testing.do_bench`` (CUDA events around each call, the L2
    flushed before each call by zeroing a 256 MB buffer, gradients reset to
    ``None`` before each call), the median of every timed call
    (``return_mode="all"``: min, max and interquartile range too); a plain
    CUDA-event loop when Triton is missing. Because the flush runs on the GPU
    between calls, the CPU's launch work for the next call hides behind it: an
    event time can be shorter than the call costs in a loop. So GPU rows also
    get ``wall_ms``: N calls back to back (no flush), timed on the host between
    two synchronisations, divided by N; a row whose ``wall_ms`` exceeds 1.5x its
    event median is marked ``launch_bound``. CPU: a ``time.perf_counter`` loop
    with the garbage collector off, gradients reset outside the timed region,
    warm-up first, median of the repeats (already a wall time: no ``wall_ms``).

Peak memory (``peak_mib``)
    The most bytes allocated at any moment *during* the measured call, above
    what was allocated just before it. The call's inputs are therefore not
    counted; gradients of the inputs, created during backward, are. GPU:
    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    CPU: torch's profiler with ``profile_memory=True`` records every
    allocation and free made through torch's CPU allocator (autograd's saved
    tensors, kernel temporaries allocated as tensors, gradients); the running
    sum of those events, in time order, gives the peak. Memory that is not a
    torch tensor (a numpy array, Python objects) is not counted: for the
    reference loss, whose label mask is built in numpy, this favours the
    reference. RSS sampling was rejected because glibc keeps freed memory
    mapped, so a second run reuses it without raising RSS.

Saved activations (``saved_mib`` in ``metrics``)
    The bytes of the distinct tensors autograd saves for backward during one
    forward (``torch.autograd.graph.saved_tensors_hooks``), parameters and
    weights excluded, the input activation included.

A row exists only for something measured in this run: nothing is ever filled
in from elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TextIO

import torch

MIB = 2**20


# --------------------------------------------------------------------------- environment


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def parse_device(value: str | None) -> torch.device:
    """The device a ``--device`` option names: ``cpu``, ``cuda`` or ``cuda:N`` (the GPU when one is
    visible for None). ValueError, saying what was expected, for another name or a GPU that is not here."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"expected cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{value!r} asked for, but no CUDA GPU is visible")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{value!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """A file-name-safe name for the hardware, e.g. ``nvidia-h200`` or ``cpu-amd-epyc-2c``."""
    if device.type == "cuda":
        base = torch.cuda.get_device_name(device)
    else:
        base = f"cpu-{cpu_model_name()}-{os.cpu_count()}c"
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    return slug[:60] or "device"


SHA_FILE = ".git_sha"  # at the repository root; the GPU machine's copy of the tree has no .git


def git_sha(root: str | None = None) -> str:
    """HEAD's sha, ``+dirty`` when the tree differs from HEAD; ``ACE_GIT_SHA`` overrides.

    Without git (the lent GPU machine gets a copy of the tree without ``.git``) the file
    ``.git_sha`` at the repository root is read, which the caller writes before the call with
    ``{ git rev-parse HEAD; git diff --quiet HEAD || echo +dirty; } | tr -d '\\n' > .git_sha``
    (the same text this function gives where git works); gpu_check.sh reads the same file.
    """
    env = os.environ.get("ACE_GIT_SHA")
    if env:
        return env.strip()
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                               timeout=10)
        sha = found.stdout.strip() if found.returncode == 0 else ""
        if sha:
            clean = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root, capture_output=True,
                                   timeout=30).returncode == 0
            return sha + ("" if clean else "+dirty")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open(os.path.join(root, SHA_FILE), encoding="utf-8") as fh:
            text = fh.read(200).strip()
        if text:
            return text
    except OSError:
        pass
    return "unknown"


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver's version, as ``nvidia-smi`` reports it (None where it cannot say).

    One driver serves every card of a machine, so the first card's line is read. No ``-i``: torch's card
    indices follow ``CUDA_VISIBLE_DEVICES`` and nvidia-smi's do not, so an index could name a card that is not
    there (or another one)."""
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = found.stdout.split()
    return lines[0] if found.returncode == 0 and lines else None


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


@dataclass
class Environment:
    """What every row carries about where and when it was measured."""

    device: str
    device_type: str
    torch: str
    triton: str | None
    cuda: str | None
    git_sha: str
    date: str
    python: str
    threads: int
    load_average: list[float] | None
    device_memory_mib: float | None = None  # a GPU's, as torch reports it
    driver: str | None = None  # the NVIDIA driver's version (nvidia-smi)

    @classmethod
    def probe(cls, device: torch.device) -> "Environment":
        try:
            load = [round(v, 2) for v in os.getloadavg()]
        except OSError:
            load = None
        memory = driver = None
        if device.type == "cuda":
            memory = round(torch.cuda.get_device_properties(device).total_memory / 2**20, 1)
            driver = nvidia_driver_version()
        return cls(
            device=device_name(device),
            device_type=device.type,
            torch=torch.__version__,
            triton=triton_version(),
            cuda=torch.version.cuda,
            git_sha=git_sha(),
            date=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            python=platform.python_version(),
            threads=torch.get_num_threads(),
            load_average=load,
            device_memory_mib=memory,
            driver=driver,
        )


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One measured configuration, as written to the JSON file.

    ``baseline`` names the provider this row is compared with (``None`` for a
    baseline's own row); the two ratios are baseline / this row, so larger is
    better for both. ``target`` is the goal this comparison is held to, with
    ``target_pass`` its outcome in this run (``None`` when there is no target), and
    ``target_parts`` each part of the target with the value it was judged on (see
    :meth:`Target.part`).
    ``median_ms`` is the CUDA-event median with the L2 flushed before each call on a GPU, and
    the wall-clock median on a CPU; ``wall_ms`` (GPU) the back-to-back time per call.
    """

    op: str
    shape: str
    dtype: str
    provider: str
    baseline: str | None
    median_ms: float | None
    peak_mib: float | None
    speedup_vs_baseline: float | None
    memory_ratio_vs_baseline: float | None
    target: str | None
    target_pass: bool | None
    device: str
    torch: str
    triton: str | None
    cuda: str | None
    git_sha: str
    date: str
    family: str = ""
    mode: str = "fwd+bwd"
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_ms: float | None = None  # GPU: back-to-back calls on the host clock, per call (see the module doc)
    target_parts: list[dict[str, Any]] = field(default_factory=list)  # [{"text", "value", "met"}]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REQUIRED_ROW_FIELDS = (
    "op", "shape", "dtype", "provider", "baseline", "median_ms", "peak_mib", "speedup_vs_baseline",
    "memory_ratio_vs_baseline", "device", "torch", "triton", "cuda", "git_sha", "date",
)


@dataclass
class Target:
    """A goal on one comparison: ``metric`` is ``speedup`` or ``memory_ratio`` (at least the
    threshold), ``peak_mib_max`` (at most), or ``metric_min:<key>`` / ``metric_max:<key>`` (the
    row's ``metrics[key]`` at least / at most). ``check`` gives None when the value is missing.

    ``invert``: the text states the goal on the reciprocal of the metric ("time<=1.15x base" is
    a speedup of at least 1/1.15, "mem<=0.6x" a memory ratio of at least 1/0.6), so the value
    :meth:`part` records is 1/metric, the quantity the text names."""

    metric: str
    threshold: float
    text: str
    invert: bool = False

    def measured(self, row: Row):
        """The row's value of ``metric``; None when it is missing or not a number (a note)."""
        if self.metric == "speedup":
            return row.speedup_vs_baseline
        if self.metric == "memory_ratio":
            return row.memory_ratio_vs_baseline
        if self.metric == "peak_mib_max":
            return row.peak_mib
        if self.metric.startswith(("metric_min:", "metric_max:")):
            value = row.metrics.get(self.metric.split(":", 1)[1])
            return value if isinstance(value, (bool, int, float)) else None
        raise ValueError(f"unknown target metric {self.metric!r}")

    def check(self, row: Row) -> bool | None:
        value = self.measured(row)
        if value is None:
            return None  # missing (or a note saying why it was not measured): not judged
        if self.metric.startswith("metric_max:") or self.metric == "peak_mib_max":
            return value <= self.threshold  # NaN fails
        return value >= self.threshold

    def part(self, row: Row) -> dict[str, Any]:
        """``{"text", "value", "met"}``: the goal as written, the value it was judged on in the
        text's terms (1/metric where ``invert``; a bool stays a bool), and :meth:`check`."""
        value = self.measured(row)
        if self.invert and value is not None and not isinstance(value, bool):
            value = 1.0 / value if value else float("inf")
        return {"text": self.text, "value": value, "met": self.check(row)}


def check_limit(dtype: str) -> float:
    """The largest relative error (``relative_error``: norm of the difference over the norm of
    the reference) a row's correctness check may show, by the row's compute dtype: about a
    hundred times what two correct implementations differ by there (fp32 ~1e-6, fp16 ~1e-4,
    bf16 ~1e-3 on these reductions), far below what a wrong kernel gives (order 1)."""
    text = str(dtype)
    if "bfloat16" in text or "bf16" in text:
        return 3e-2
    if "float16" in text or "fp16" in text or "half" in text:
        return 1e-2
    if "float64" in text:
        return 1e-9
    if "float32" in text:
        return 1e-4
    return 3e-2


def is_check_key(key: str) -> bool:
    """Whether a row metric is a correctness check's error (judged by :func:`check_targets`)."""
    return key.startswith(("rel_err_vs_", "loss_rel_err_vs_", "max_abs_score_diff_vs_"))


# Row metric naming the dtype a check ran in where that is not the row's: {check key: dtype}
# (a bf16-autocast row whose check compares float32 runs is judged at float32's limit).
CHECK_DTYPES = "check_dtypes"


def _check_limits(metrics: dict, dtype: str) -> dict[str, float]:
    """``{check key: its limit}`` for the row's checks: ``check_limit`` of the dtype the check
    ran in (``metrics[CHECK_DTYPES]``), else of the row's."""
    own = metrics.get(CHECK_DTYPES)
    own = own if isinstance(own, dict) else {}
    return {key: check_limit(own.get(key, dtype)) for key in metrics if is_check_key(key)}


def check_targets(metrics: dict, dtype: str) -> list[Target]:
    """The correctness targets of a provider row: each check error at most its ``check_limit``
    (NaN or inf fail), and ``finite`` true where the row records it. A row with targets is then
    met only if its outputs were checked and right, never on speed or memory alone."""
    targets = [Target(f"metric_max:{key}", limit, f"{key}<={limit:g}")
               for key, limit in _check_limits(metrics, dtype).items()]
    if "finite" in metrics:
        targets.append(Target("metric_min:finite", 1, "finite"))
    return targets


def checks_pass(metrics: dict, dtype: str) -> bool:
    """Whether a row's recorded checks all pass (True when it records none)."""
    for key, limit in _check_limits(metrics, dtype).items():
        value = metrics[key]
        if not (isinstance(value, (int, float)) and value <= limit):
            return False
    return metrics.get("finite", True) is not False


# --------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    """One measured call: median time, peak memory, the number of timed calls, (min, max) of
    those times, their interquartile range, and (GPU) the back-to-back wall time per call."""

    median_ms: float | None
    peak_mib: float | None
    runs: int
    spread_ms: tuple[float, float] | None = None
    error: str | None = None
    iqr_ms: float | None = None
    wall_ms: float | None = None
    wall_calls: int | None = None


@dataclass
class Timing:
    """What :func:`time_call` returns."""

    median_ms: float
    runs: int
    spread_ms: tuple[float, float] | None = None
    iqr_ms: float | None = None
    wall_ms: float | None = None
    wall_calls: int | None = None


LAUNCH_BOUND_RATIO = 1.5  # wall_ms over the event median above which a GPU row is marked launch_bound


def summarize(times_ms: Sequence[float]) -> tuple[float, tuple[float, float], float | None]:
    """Median, (min, max) and interquartile range (None under 4 times) of some times."""
    ordered = sorted(float(t) for t in times_ms)
    iqr = None
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
        iqr = q3 - q1
    return statistics.median(ordered), (ordered[0], ordered[-1]), iqr


def _reset_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, device: torch.device, grads: Sequence[torch.Tensor] = (),
              min_reps: int = 5, max_reps: int = 50, min_seconds: float = 1.0,
              max_seconds: float = 20.0, warmup_calls: int = 1) -> Timing:
    """Median time of ``fn()`` in milliseconds, with the number of timed calls and their spread.

    ``grads`` are set to ``None`` before every call, outside the timed region,
    so that each call allocates and writes its gradients as a training step does.
    """
    if device.type == "cuda":
        return _time_cuda(fn, device=device, grads=grads, min_reps=min_reps, max_seconds=max_seconds,
                          warmup_calls=warmup_calls)
    gc.collect()
    for _ in range(warmup_calls):
        _reset_grads(grads)
        fn()
    times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        begin = time.perf_counter()
        while True:
            _reset_grads(grads)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            elapsed = time.perf_counter() - begin
            # A call that takes a large part of the budget gets fewer repeats, never fewer than one.
            reps_allowed = max(1, int(max_seconds / max(times[0], 1e-6)))
            if len(times) >= max_reps or len(times) >= reps_allowed:
                break
            if len(times) >= min_reps and elapsed >= min_seconds:
                break
            if elapsed >= max_seconds:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    median, spread, iqr = summarize([t * 1e3 for t in times])
    return Timing(median, len(times), spread, iqr)


def time_interleaved(entries: Sequence[tuple[Callable[[], Any], Sequence[torch.Tensor]]], *, min_reps: int = 5,
                     max_reps: int = 50, min_seconds: float = 1.0,
                     max_seconds: float = 20.0) -> list[Timing]:
    """CPU: time several calls round-robin (one call of each per round), median per entry.

    On a machine shared with other work the load changes from second to second;
    interleaving puts every entry under the same conditions, so the ratios
    between them stay meaningful even when absolute times are inflated.
    ``min_seconds``/``max_seconds`` are per entry, as for :func:`time_call`.
    Warm-up is the caller's (the memory measurement is each entry's first call).
    """
    count = len(entries)
    times: list[list[float]] = [[] for _ in entries]
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        begin = time.perf_counter()
        while True:
            for index, (fn, grads) in enumerate(entries):
                _reset_grads(grads)
                start = time.perf_counter()
                fn()
                times[index].append(time.perf_counter() - start)
            rounds = len(times[0])
            elapsed = time.perf_counter() - begin
            first_round = sum(t[0] for t in times)
            rounds_allowed = max(1, int(max_seconds * count / max(first_round, 1e-6)))
            if rounds >= max_reps or rounds >= rounds_allowed:
                break
            if rounds >= min_reps and elapsed >= min_seconds * count:
                break
            if elapsed >= max_seconds * count:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    results = []
    for entry_times in times:
        median, spread, iqr = summarize([t * 1e3 for t in entry_times])
        results.append(Timing(median, len(entry_times), spread, iqr))
    return results


def cuda_rep_ms(estimate_ms: float, max_seconds: float) -> float:
    """do_bench's repetition time (ms): 100 ms, or 20 calls of 5 ms and longer, at most
    ``max_seconds``; half a call more, since do_bench truncates ``rep / its own estimate`` (a
    250 ms step under a 2 s cap gets 8 timed calls, not 7, when its estimate comes out a little
    higher). For short calls do_bench's own estimate counts its 256 MB cache flush, so they get
    fewer calls than ``rep / call``: on the H200, 276 of the 0.196 ms frozen-base step, about
    550 of a 10 us call."""
    return min(max(100.0, 20 * estimate_ms), max_seconds * 1e3) + 0.5 * estimate_ms


def wall_calls_for(estimate_ms: float) -> int:
    """How many back-to-back calls ``wall_ms`` averages: about 200 ms of them, 2 to 100."""
    return max(2, min(100, int(200.0 / max(estimate_ms, 1e-3))))


def _time_cuda(fn, *, device, grads, min_reps, max_seconds, warmup_calls=1) -> Timing:
    for _ in range(warmup_calls):  # compile / autotune / handle creation stay out (else the memory call did it)
        _reset_grads(grads)
        fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _reset_grads(grads)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate_ms = max(start.elapsed_time(end), 1e-3)
    rep_ms = cuda_rep_ms(estimate_ms, max_seconds)
    timing = None
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        # Warm-up: the calls above and do_bench's own five estimate calls are plenty; 25 ms more.
        try:
            times = do_bench(fn, warmup=25.0, rep=rep_ms, grad_to_none=list(grads) or None, return_mode="all")
        except (TypeError, AssertionError):  # an older Triton without return_mode="all"
            median = do_bench(fn, warmup=25.0, rep=rep_ms, grad_to_none=list(grads) or None,
                              return_mode="median")
            timing = Timing(float(median), max(1, int(rep_ms / estimate_ms)))
        else:
            median, spread, iqr = summarize(times)
            timing = Timing(median, len(times), spread, iqr)
    if timing is None:
        flush = torch.empty(256 * MIB, dtype=torch.uint8, device=device)
        times = []
        budget_end = time.perf_counter() + max_seconds
        while len(times) < max(min_reps, 10) and (time.perf_counter() < budget_end or len(times) < 3):
            _reset_grads(grads)
            flush.zero_()  # evict L2 so calls do not run out of a warm cache
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        del flush
        median, spread, iqr = summarize(times)
        timing = Timing(median, len(times), spread, iqr)
    # Back to back, no flush, host clock: what the call costs in a loop, CPU launch work included.
    calls = wall_calls_for(estimate_ms)
    torch.cuda.synchronize(device)
    begin = time.perf_counter()
    for _ in range(calls):
        _reset_grads(grads)
        fn()
    torch.cuda.synchronize(device)
    timing.wall_ms = (time.perf_counter() - begin) * 1e3 / calls
    timing.wall_calls = calls
    return timing


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's start/stop chatter on fd 2 (Python errors still raise)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_mib(fn: Callable[[], Any], *, device: torch.device, grads: Sequence[torch.Tensor] = ()) -> float:
    """Peak bytes allocated during one ``fn()`` above what was live before it, in MiB."""
    _reset_grads(grads)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            fn()
    events = _cpu_memory_events(prof)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / MIB


def _cpu_memory_events(prof) -> list[tuple[int, int]]:
    from torch.autograd import DeviceType

    cpu_types = {DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP}
    return sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() in cpu_types
    )


def saved_activation_mib(forward: Callable[[], Any], exclude: Sequence[torch.Tensor]) -> float:
    """Bytes (MiB) of the distinct storages autograd saves during ``forward()``, ``exclude`` left out."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values()) / MIB


def time_single_call(fn: Callable[[], Any], *, device: torch.device, grads: Sequence[torch.Tensor] = ()) -> float:
    """Milliseconds of one call (for sizes where repeats cost too much); warm-up is the caller's."""
    _reset_grads(grads)
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


def peak_and_time(fn: Callable[[], Any], *, device: torch.device,
                  grads: Sequence[torch.Tensor] = ()) -> tuple[float, float]:
    """CUDA: one ``fn()`` measured for both its peak memory (MiB above what was live before it)
    and its time (ms, host clock between two synchronisations), for calls too long to repeat."""
    _reset_grads(grads)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    peak = (torch.cuda.max_memory_allocated(device) - before) / MIB
    _reset_grads(grads)
    return peak, elapsed_ms


def measure(fn: Callable[[], Any], *, device: torch.device, grads: Sequence[torch.Tensor] = (),
            max_seconds: float = 20.0, min_reps: int = 5, with_memory: bool = True,
            single_call: bool = False, min_seconds: float = 1.0, one_call: bool = False) -> Measurement:
    """Time ``fn`` and, in a separate call, measure its peak memory. Errors become ``Measurement.error``.

    ``single_call``: the memory call is the warm-up and one more call is timed
    (for very large sizes; the row's ``runs`` says 1). ``one_call`` (CUDA): no warm-up, one call
    measured for both (``peak_and_time``; for calls of tens of seconds whose first-call work
    is negligible beside them). Otherwise, on a GPU, one call runs before
    the memory call: what the first call of a process allocates once for good (cuBLAS's
    workspace, say) is then in no entry's peak, whichever is measured first.
    """
    try:
        if one_call and device.type == "cuda":
            peak, elapsed = peak_and_time(fn, device=device, grads=grads)
            return Measurement(elapsed, peak if with_memory else None, 1, (elapsed, elapsed))
        if with_memory and not single_call and device.type == "cuda":
            fn()
            _reset_grads(grads)
            torch.cuda.synchronize(device)
        peak = peak_memory_mib(fn, device=device, grads=grads) if with_memory else None
        if single_call:
            elapsed = time_single_call(fn, device=device, grads=grads)
            _reset_grads(grads)
            return Measurement(elapsed, peak, 1, (elapsed, elapsed))
        # The memory call doubles as the first warm-up.
        timing = time_call(fn, device=device, grads=grads, max_seconds=max_seconds, min_seconds=min_seconds,
                           min_reps=min_reps, warmup_calls=0 if with_memory else 1)
        _reset_grads(grads)
        return Measurement(timing.median_ms, peak, timing.runs, timing.spread_ms, iqr_ms=timing.iqr_ms,
                           wall_ms=timing.wall_ms, wall_calls=timing.wall_calls)
    except torch.cuda.OutOfMemoryError as exc:  # type: ignore[attr-defined]
        error = f"out of memory: {str(exc).splitlines()[0]}"
    except Exception as exc:  # a failing provider must not stop the suite
        error = f"{type(exc).__name__}: {exc}"
    # Freed here, after the except blocks: inside one, the traceback's frames still hold the
    # call's tensors (activations, partial gradients), so emptying the cache there frees little.
    _reset_grads(grads)
    if device.type == "cuda":
        gc.collect()
        try:
            torch.cuda.empty_cache()
        except Exception:  # a lost CUDA context raises here too; the error above says what happened
            pass
    return Measurement(None, None, 0, error=error)


CUDA_FATAL_PATTERNS = ("illegal memory access", "unspecified launch failure", "device-side assert",
                       "misaligned address", "illegal instruction", "CUDA error: an illegal",
                       "cudaErrorLaunchFailure", "uncorrectable ECC")


def is_fatal_cuda_error(text: str) -> bool:
    """Whether an error message says the CUDA context is lost (every later CUDA call in this
    process fails): a fault in a kernel, not an out-of-memory error or a bad argument."""
    return any(pattern.lower() in text.lower() for pattern in CUDA_FATAL_PATTERNS)


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """``"<type>: <first line of the message>"``, cut to ``limit`` characters, for skip reasons."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def loss_and_grads_vector(loss: torch.Tensor, grads) -> torch.Tensor:
    """A step's loss and gradients as one float32 vector: what a training step's check compares
    (with :func:`relative_error`)."""
    return torch.cat([loss.detach().float().reshape(1)] + [g.float().reshape(-1) for g in grads])


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``||ours - ref|| / ||ref||`` in float64 (inf when shapes differ or ours is not finite)."""
    if ours.shape != ref.shape:
        return float("inf")
    a, b = ours.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    denominator = b.norm().item()
    return (a - b).norm().item() / (denominator if denominator > 0 else 1.0)


# --------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "pass" if value else "FAIL"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{max(1, digits - len(str(int(abs(value)))))}f}"
    return str(value)


TABLE_COLUMNS = [
    ("op", "op"), ("shape", "shape"), ("dtype", "dtype"), ("provider", "provider"), ("baseline", "vs"),
    ("median_ms", "median ms"), ("peak_mib", "peak MiB"), ("speedup_vs_baseline", "speedup"),
    ("memory_ratio_vs_baseline", "mem ratio"), ("target", "target"), ("target_pass", "ok"),
]


def format_table(rows: Sequence[Row | dict]) -> str:
    records = [r.to_json() if isinstance(r, Row) else r for r in rows]
    cells = [[label for _, label in TABLE_COLUMNS]]
    for rec in records:
        line = []
        for key, _ in TABLE_COLUMNS:
            value = rec.get(key)
            if key in ("speedup_vs_baseline", "memory_ratio_vs_baseline") and value is not None:
                line.append(f"{value:.2f}x")
            elif key == "dtype" and isinstance(value, str):
                line.append(value.replace("float", "f").replace("bfloat16", "bf16"))
            else:
                line.append(fmt(value))
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE_COLUMNS))]
    out = []
    for index, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i < 5 or i >= 9 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


SCHEMA = "ace-kernels-benchmarks/1"  # the layout of a result file (benchmarks/results/README.md)


def write_json(path: str, environment: Environment, rows: Sequence[Row], extra: dict | None = None) -> None:
    """Write ``{"schema", "environment", "rows"}`` atomically (temp file, fsync, rename)."""
    payload = _finite({
        "schema": SCHEMA,
        "environment": dataclasses.asdict(environment),
        "run": extra or {},
        "rows": [r.to_json() for r in rows],
    })
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def dump(handle: TextIO) -> None:
        json.dump(payload, handle, indent=1, allow_nan=False, default=_json_default)
        handle.write("\n")

    _replace_file(path, dump)


def _finite(value):
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return _finite(value.item())  # a tensor's inf or nan as the strings too (json.dump refuses them)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


_NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
# Row fields that hold numbers (or hold them nested): what ``_finite`` wrote as strings is read back there.
_NUMBER_FIELDS = ("median_ms", "peak_mib", "speedup_vs_baseline", "memory_ratio_vs_baseline", "wall_ms", "metrics",
                  "target_parts")


def _non_finite(value):
    """``_finite`` undone: the strings "inf", "-inf", "nan" (nested too) as the floats they were."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: _non_finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_non_finite(v) for v in value]
    return value


def row_from_json(record: dict) -> Row:
    """A :class:`Row` from its JSON form (keys this version does not know are dropped), its
    numbers as the process that measured them had them: an infinite or NaN value, which the
    file holds as a string, is a float again (a later family's process compares such numbers)."""
    names = {f.name for f in dataclasses.fields(Row)}
    return Row(**{k: _non_finite(v) if k in _NUMBER_FIELDS else v for k, v in record.items() if k in names})


def read_payload(path: str):
    """A JSON file's whole content (a results file, or a file written from one)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_rows(path: str) -> list[dict]:
    """A result file's rows (a payload of ``python -m benchmarks`` or a bare list of rows); a
    ``ValueError`` naming the file where they are not rows (another JSON file of the results folder)."""
    payload = read_payload(path)
    rows = payload.get("rows") if isinstance(payload, dict) else payload
    if not isinstance(rows, list):
        raise ValueError(f"{path} holds no list of 'rows' (not a result file of python -m benchmarks?)")
    try:
        _check_schema(payload)
        _check_rows(rows)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc} (not a result file of python -m benchmarks?)") from None
    return rows


# ----------------------------------------------------------------------------------------
# Tools that update a package file from a GPU run's results
# ----------------------------------------------------------------------------------------


class NothingToWrite(ValueError):
    """The result file holds nothing for the package file a tool writes."""


def gpu_run(payload: dict) -> tuple[str, str]:
    """The card of a GPU run's result ``payload`` and the heading of a report on it; a
    ``ValueError`` for a run on anything else (the package files hold GPU measurements only)."""
    environment = payload["environment"]
    device = environment["device"]
    if environment.get("device_type") != "cuda":
        raise ValueError(f"argument 'RESULTS': expected a GPU run, got one on {device!r}")
    if (payload.get("run") or {}).get("quick"):
        raise ValueError("argument 'RESULTS': a --quick run (its tiny shapes say nothing of the real ones)")
    return device, f"{device} (git {environment.get('git_sha')}, {environment.get('date')}):"


def check_result_fields(payload) -> None:
    """A ``ValueError`` naming what a result file lacks of what the package-file tools read: an
    environment naming its device, and rows naming their op, shape, dtype and provider."""
    if not (isinstance(payload, dict) and "environment" in payload and "rows" in payload):
        raise ValueError("it has no 'environment' and 'rows'")
    _check_schema(payload)
    environment, rows = payload["environment"], payload["rows"]
    if not (isinstance(environment, dict) and isinstance(environment.get("device"), str)):
        raise ValueError("its 'environment' names no device")
    if not isinstance(rows, list):
        raise ValueError(f"its 'rows' is a {type(rows).__name__}, not a list")
    _check_rows(rows)


def _check_schema(payload) -> None:
    """A ``ValueError`` for a result file of another layout than this version's (a file that
    names none, a bare list of rows or a hand-made one, is read as this layout)."""
    schema = payload.get("schema", SCHEMA) if isinstance(payload, dict) else SCHEMA
    if schema != SCHEMA:
        raise ValueError(f"its schema is {schema!r}, expected {SCHEMA!r}")


def _check_rows(rows: list) -> None:
    """A ``ValueError`` naming the first row without its op, shape, dtype or provider text, or with
    'metrics' that are not an object."""
    for index, row in enumerate(rows):
        missing = [key for key in ("op", "shape", "dtype", "provider")
                   if not (isinstance(row, dict) and isinstance(row.get(key), str))]
        if missing:
            raise ValueError(f"row {index} has no {missing[0]!r} text")
        if not isinstance(row.get("metrics", {}), dict):
            raise ValueError(f"row {index} ({row['op']}): its 'metrics' is not an object")


def _replace_file(path: str, write: Callable[[TextIO], None]) -> None:
    """``write(handle)`` a new text file, then put it in the place of ``path`` atomically: into a
    temp file beside ``path``, flushed and fsynced, then renamed over it, and the directory fsynced
    (the rename durable too). A failed write (a full disk) or a crash leaves ``path`` as it was,
    never half written; the temp file is removed."""
    directory, name = os.path.split(os.path.abspath(path))
    # A name of this write alone (the pid and a random part: two runs of a tool never share a
    # temp file), made as open() makes a file, mode 0666 less the umask (mkstemp's 0600 would
    # leave a package file readable by its writer only), as ace_model/_atomic.py does.
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # see remove_temp_files_of
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())  # the content on the disk before the name points at it
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            exc.filename = path  # a write or fsync error (a full disk) names no file by itself
        raise
    # The rename durable too, where the file system allows it (ace_model's atomic writes' own function).
    from ace_model._atomic import fsync_directory

    fsync_directory(directory)


def remove_temp_files_of(path: str, pid: int) -> None:
    """Remove the temp files :func:`_replace_file` of ``path`` left in process ``pid``, once that process
    has ended: one killed while it wrote (a family's process at the suite's time budget) leaves its temp
    file beside ``path``, where nothing else would ever remove it. Only that process's names are matched."""
    directory, name = os.path.split(os.path.abspath(path))
    for entry in _names_matching(directory, rf"^\.{re.escape(name)}\.{int(pid)}\.[0-9a-f]{{8}}\.tmp$"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry)


def _names_matching(directory: str, pattern: str) -> list[str]:
    """The paths of the entries of ``directory`` whose names match ``pattern`` (none where it cannot be read)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, entry) for entry in names if re.match(pattern, entry)]


def temp_dir(what: str) -> tempfile.TemporaryDirectory:
    """A temporary directory of this process, ``ace-bench-<what>-<pid>-*`` under the system's temp
    directory, removed when its ``with`` ends. A family's process killed while one exists (SIGKILL,
    at the run's time budget or on the suite's own SIGTERM/SIGINT) cannot remove it: the suite then
    does, by this process's pid (:func:`remove_temp_dirs_of`)."""
    return tempfile.TemporaryDirectory(prefix=f"ace-bench-{what}-{os.getpid()}-")


def remove_temp_dirs_of(pid: int) -> None:
    """Remove the directories :func:`temp_dir` made in process ``pid``, once that process has ended
    (only that process's names are matched)."""
    for path in _names_matching(tempfile.gettempdir(), rf"^ace-bench-[a-z]+-{int(pid)}-[^/]+$"):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def package_file_tool(argv: Sequence[str] | None, *, module: str, description: str, default_out: str,
                      what: str, update: Callable[[dict, dict | None], tuple[dict, list[str]]]) -> int:
    """``python -m benchmarks.<module> RESULTS.json [--out FILE]``: ``update(payload, existing)``
    gives the new content of ``FILE`` (default ``default_out``, also the base when ``FILE`` does
    not exist yet) and a report. Exit status 0 when written (atomically; said when a new ``FILE``
    holds what ``default_out`` does), or ``unchanged`` when ``FILE`` holds that content already
    (not rewritten), 3 when the run holds nothing to write (:class:`NothingToWrite`; the file is
    left as it was), 2 for a bad result file (another ``ValueError``, e.g. a CPU run)."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=description)
    parser.add_argument("results", metavar="RESULTS.json", help="a result file of a GPU run of python -m benchmarks")
    parser.add_argument("--out", default=default_out, help=f"the {what} file to update (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        payload = read_payload(args.results)
        check_result_fields(payload)
    except (OSError, ValueError) as exc:
        print(f"{module}: argument RESULTS.json: cannot read {args.results!r} as a result file "
              f"({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    source = args.out if os.path.exists(args.out) else default_out
    try:
        existing = read_payload(source) if os.path.exists(source) else None
        # An object without 'by_device' is no package file (a result file, say), unless it is
        # empty: it would be rewritten, its own content kept, with a by_device table added.
        by_device = existing.get("by_device", {} if existing == {} else None) if isinstance(existing, dict) else None
        if existing is not None and not (isinstance(by_device, dict)
                                         and all(isinstance(card, dict) for card in by_device.values())):
            raise ValueError("expected a JSON object whose 'by_device' holds an object per card")
    except (OSError, ValueError) as exc:
        print(f"{module}: argument --out: cannot read {source!r} to update it ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    try:
        content, report = update(payload, existing)
    except NothingToWrite as exc:
        print(f"{module}: {exc}; {args.out} not written", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"{module}: {exc}", file=sys.stderr)
        return 2

    text = json.dumps(content, indent=2, sort_keys=True) + "\n"
    try:  # what would be written, against what the file it updates holds
        with open(source, encoding="utf-8") as handle:
            same = handle.read() == text
    except (OSError, UnicodeDecodeError):  # (no such file: written)
        same = False
    unchanged = same and source == args.out
    if not unchanged:
        try:
            _replace_file(args.out, lambda handle: handle.write(text))
        except OSError as exc:
            print(f"{module}: argument --out: cannot write {args.out!r} ({type(exc).__name__}: "
                  f"{exc.strerror or exc})", file=sys.stderr)
            return 2
    print("\n".join(report))
    if unchanged:
        print(f"unchanged: {args.out}")
    else:  # a new FILE from the package's own: the same content says there is nothing to commit over it
        print(f"written: {args.out}" + (f" (the same as {source}, which it updates)" if same else ""))
    return 0
