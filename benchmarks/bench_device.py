"""The card's own ceilings, measured in the same run: copy bandwidth and bf16 matmul rate.

Rows of the other families report GB/s or TFLOP/s against these (datasheet
rates are leads only: the ceilings are measured on the card itself). With one
process per family (the default) this runs first, in its own process, and the
later families read the rates from the result file (``run.calibration``).

The matmul is warmed up for at least half a second first (clocks ramp up, cuBLAS
picks its kernel), then measured twice; the faster median is the rate. The SM
and memory clocks, power and temperature read right after it (``nvidia-smi``, else
``torch.cuda.clock_rate``) go into the row's metrics, and a rate under 600 TFLOP/s
on an H100/H200 is logged as a warning: every fraction of peak in the run is against
this rate. The two H200 runs here measured 702 and 691 TFLOP/s, at the card's 700 W
power limit with the SM clock at 1410-1455 MHz (of 1980). GPU only.
"""

from __future__ import annotations

import subprocess
import time

import torch

FAMILY = "device"
MATMUL_WARMUP_S = 0.5
HOPPER_EXPECTED_TFLOPS = 600.0  # bf16 dense: an H100/H200 measured under this is throttled or shared


def run(suite) -> None:
    if not suite.is_gpu:
        return
    device = suite.device
    # Copy: 1 GiB read + 1 GiB written, far beyond the 60 MB L2.
    elements = (1 if not suite.quick else 0.25) * 2**30
    source = torch.rand(int(elements) // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    nbytes = copy_bytes(source)
    meas = suite.measure("copy bandwidth", lambda: target.copy_(source), grads=(), with_memory=False)
    if meas is not None:
        gbps = nbytes / (meas.median_ms * 1e-3) / 1e9
        suite.calibration["copy_gbps"] = gbps
        suite.add_plain_row(family=FAMILY, op="device_copy", shape=copy_shape(nbytes),
                            dtype=torch.bfloat16, provider="torch", measurement=meas,
                            metrics={"gbps": round(gbps, 1), "bytes": nbytes}, mode="copy")
    del source, target

    # bf16 matmul on random data (zeros run faster and would flatter every fraction of peak).
    n = 8192 if not suite.quick else 4096
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    warmed = warm_up(lambda: a @ b, device, MATMUL_WARMUP_S)
    medians, best = [], None
    for attempt in range(2):
        meas = suite.measure(f"bf16 matmul ({attempt + 1} of 2)", lambda: a @ b, grads=(), with_memory=False)
        if meas is not None:
            medians.append(round(meas.median_ms, 4))
            if best is None or meas.median_ms < best.median_ms:
                best = meas
    clocks = read_clocks(device)
    if best is not None:
        tflops = 2 * n**3 / (best.median_ms * 1e-3) / 1e12
        suite.calibration["bf16_matmul_tflops"] = tflops
        metrics = {"tflops": round(tflops, 1), "medians_ms": medians, "warmup_calls": warmed, **clocks}
        warning = low_rate_warning(suite.environment.device, tflops)
        if warning:
            suite.log(f"  WARNING: {warning}")
            metrics["warning"] = warning
            suite.calibration["warning"] = warning
        suite.add_plain_row(family=FAMILY, op="device_matmul", shape=f"{n}x{n}x{n}", dtype=torch.bfloat16,
                            provider="torch", measurement=best, metrics=metrics, mode="matmul")
    del a, b
    torch.cuda.empty_cache()


def copy_bytes(source: torch.Tensor) -> int:
    """Bytes one ``copy_`` of ``source`` moves: every byte read once and written once."""
    return 2 * source.numel() * source.element_size()


def copy_shape(nbytes: int) -> str:
    """The copy row's shape: the GiB one copy moves ("2 GiB moved"; --quick's half GiB is "0.5", not "0")."""
    return f"{nbytes / 2**30:g} GiB moved"


def warm_up(fn, device, seconds: float) -> int:
    """Call ``fn`` back to back for at least ``seconds`` (synchronised); the number of calls."""
    calls = 0
    torch.cuda.synchronize(device)
    end = time.perf_counter() + seconds
    while True:
        for _ in range(10):
            fn()
        calls += 10
        torch.cuda.synchronize(device)
        if time.perf_counter() >= end:
            return calls


def low_rate_warning(device_name: str, tflops: float) -> str | None:
    """The warning for a bf16 matmul rate under 600 TFLOP/s on an H100/H200, else None."""
    name = device_name.upper()
    if ("H100" in name or "H200" in name) and tflops < HOPPER_EXPECTED_TFLOPS:
        return (f"bf16 matmul at {tflops:.0f} TFLOP/s, under the {HOPPER_EXPECTED_TFLOPS:.0f} expected of an "
                "H100/H200 (throttled clocks, another process on the card?); every frac_of_matmul_peak of this "
                "run is against this lower rate")
    return None


def smi_id(device) -> str | None:
    """The card's ``nvidia-smi --id``: its UUID ("GPU-" before torch's form of it), not torch's index, which counts
    only the cards CUDA_VISIBLE_DEVICES leaves, in its order (and CUDA's, fastest first unless CUDA_DEVICE_ORDER
    says otherwise), where nvidia-smi counts every card in PCI order. None where torch does not give the UUID."""
    try:
        return f"GPU-{torch.cuda.get_device_properties(device).uuid}"
    except Exception:
        return None


def read_clocks(device) -> dict:
    """SM/memory clocks (MHz), power (W) and temperature (C) just after the matmul, where readable: nvidia-smi's
    for the card ``smi_id`` names, else torch's SM clock."""
    try:
        card = smi_id(device)
        if card is None:
            raise OSError("no UUID to name the card to nvidia-smi")
        out = subprocess.run(
            ["nvidia-smi", f"--id={card}", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        fields = [f.strip() for f in out.stdout.strip().splitlines()[0].split(",")] if out.returncode == 0 else []
        if len(fields) == 5:
            names = ("sm_clock_mhz", "sm_clock_max_mhz", "mem_clock_mhz", "power_w", "temperature_c")
            values = {}
            for key, text in zip(names, fields):
                try:
                    values[key] = float(text)
                except ValueError:
                    pass
            if values:
                return values
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    try:
        return {"sm_clock_mhz": float(torch.cuda.clock_rate(device))}
    except Exception:
        return {}
