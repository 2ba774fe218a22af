"""The card's own ceilings, measured in the same run: copy bandwidth and bf16 matmul rate.

Rows of the other families report GB/s or TFLOP/s against these (METHOD.md:
datasheet rates are leads; measure the ceilings on the card itself).
GPU only.
"""

from __future__ import annotations

import torch

FAMILY = "device"


def run(suite) -> None:
    if not suite.is_gpu:
        return
    device = suite.device
    # Copy: 1 GiB read + 1 GiB written, far beyond the 60 MB L2.
    elements = (1 if not suite.quick else 0.25) * 2**30
    source = torch.rand(int(elements) // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    nbytes = 2 * source.numel() * source.element_size()
    meas = suite.measure("copy bandwidth", lambda: target.copy_(source), grads=(), with_memory=False)
    if meas is not None:
        gbps = nbytes / (meas.median_ms * 1e-3) / 1e9
        suite.calibration["copy_gbps"] = gbps
        suite.add_plain_row(family=FAMILY, op="device_copy", shape=f"{nbytes / 2**30:.0f} GiB moved",
                            dtype=torch.bfloat16, provider="torch", measurement=meas,
                            metrics={"gbps": round(gbps, 1), "bytes": nbytes}, mode="copy")
    del source, target

    # bf16 matmul on random data (zeros run faster and would flatter every fraction of peak).
    n = 8192 if not suite.quick else 4096
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    meas = suite.measure("bf16 matmul", lambda: a @ b, grads=(), with_memory=False)
    if meas is not None:
        tflops = 2 * n**3 / (meas.median_ms * 1e-3) / 1e12
        suite.calibration["bf16_matmul_tflops"] = tflops
        suite.add_plain_row(family=FAMILY, op="device_matmul", shape=f"{n}x{n}x{n}", dtype=torch.bfloat16,
                            provider="torch", measurement=meas, metrics={"tflops": round(tflops, 1)},
                            mode="matmul")
    del a, b
    torch.cuda.empty_cache()
