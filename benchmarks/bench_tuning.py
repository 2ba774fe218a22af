"""Launch-configuration sweep of the LoRA kernels on a GPU (family ``tuning``).

For each swept kernel (``ace_kernels.lora._GPU_CANDIDATES``: down, fused and backward, 16-bit)
the fused ``lora_qkv`` forward+backward step of family lora (M = 64*197, K = out = 768, r = 4,
p = 0.1, bf16) is timed with the kernel's default configuration and with each of its
candidates, every one forced with ``ace_kernels._tuning.forced`` (the other kernels at their
defaults), one after the other in one process. The rows of one kernel: op
``lora_qkv sweep <kernel>``; provider ``triton`` is the default (the baseline) and
``triton+<kernel>#<n>`` candidate n as declared, from 1; metrics ``kernel``, ``dtype_class``,
``candidate`` (0: the default), ``config`` and ``rel_err_vs_reference_p0`` (q, k, v and every
gradient against the reference LoRA with dropout off, as in family lora).
``python -m benchmarks.tuned_configs RESULTS.json`` turns them into
``ace_kernels/tuned_configs.json``.

GPU only: on the CPU the family is skipped with the reason (the interpreter's times say nothing
about a GPU's). Its one item, ``lora_config_sweep``, is costly (``--tier``): it runs last in a
default run, in whatever time is left, or in a ``--tier costly`` call. Estimate: about 3 s per
configuration (compiling the kernel at it, the probe, about 1 s of timed calls), 14 of them.
"""

from __future__ import annotations

import torch

import ace_kernels
from ace_kernels import _tuning
from ace_kernels import lora as lora_ops
from benchmarks import bench_lora

FAMILY = "tuning"
ITEM = "lora_config_sweep"
COSTLY_ITEMS = (ITEM,)
ALL_COSTLY = True
SECONDS_PER_CONFIG = 3.0


def sweep_plan(dtype_class: str = "16bit") -> list[tuple[str, list[dict]]]:
    """``[(kernel, [default, candidate 1, ...]), ...]`` for the kernels swept in ``dtype_class``."""
    return [(kernel, [dict(lora_ops._GPU_CONFIGS[kernel][cls])] + [dict(c) for c in candidates])
            for (kernel, cls), candidates in lora_ops._GPU_CANDIDATES.items() if cls == dtype_class]


def provider_label(kernel: str, number: int) -> str:
    return "triton" if number == 0 else f"triton+{kernel}#{number}"


def _shape(suite) -> dict:
    if suite.quick:
        return dict(m=2 * 37, k=96, out=80, r=4)
    return dict(m=64 * 197, k=768, out=768, r=4)


def run(suite) -> None:
    if not suite.is_gpu:
        suite.skip(ITEM, "a sweep of GPU launch configurations: needs a GPU (the interpreter's times say nothing "
                         "about a GPU's)")
        return
    if "triton" not in suite.providers:
        suite.skip(ITEM, "provider triton not selected (--providers)")
        return
    # bf16 on a GPU; a GPU suite faked on the CPU (a test) runs the interpreter, whose bf16 is wrong.
    dtype = suite.dtype() if suite.device.type == "cuda" else torch.float16
    dtype_class = lora_ops._dtype_class(dtype)
    plan = sweep_plan(dtype_class)
    if not suite.include(ITEM, costly=True, estimate_s=SECONDS_PER_CONFIG * sum(len(c) for _, c in plan)):
        return
    shape = _shape(suite)
    shape_text = f"M={shape['m']} K={shape['k']} out={shape['out']} r={shape['r']} p={bench_lora.DROPOUT}"
    generator = torch.Generator(device=suite.device).manual_seed(0)
    x, weight, bias, lora_a, lora_b, grad_out = bench_lora._inputs(shape, dtype, suite.device, generator)
    print(f" {ITEM} {shape_text} {dtype}")
    for kernel, configs in plan:
        if suite.out_of_time(f"{ITEM} {kernel}"):
            return
        checked, providers, metrics = {}, [], {}
        for number, config in enumerate(configs):
            label = provider_label(kernel, number)
            metrics[label] = dict(kernel=kernel, dtype_class=dtype_class, candidate=number, config=config)

            def check(label=label, config=config):
                with _tuning.forced("lora", kernel, dtype_class, config):
                    checked[label] = bench_lora._check_against_reference("triton", x, weight, bias, lora_a,
                                                                         lora_b, grad_out)

            def step(config=config):
                with _tuning.forced("lora", kernel, dtype_class, config):
                    outs = ace_kernels.lora_qkv(x, weight, bias, lora_a, lora_b, scaling=bench_lora.SCALING,
                                                dropout_p=bench_lora.DROPOUT, training=True, backend="triton")
                    torch.autograd.backward(outs, grad_out)

            providers.append((label, check, step, [x, lora_a, lora_b]))
        measured = suite.measure_checked([], providers)
        rows = {label: (meas, dict(metrics[label], rel_err_vs_reference_p0=checked[label]))
                for label, meas in measured.items()}
        default = provider_label(kernel, 0)
        baselines = {default: rows.pop(default)} if default in rows else {}
        suite.add_rows(family=FAMILY, op=f"lora_qkv sweep {kernel}", shape=shape_text, dtype=dtype, ours=rows,
                       baselines=baselines)
        suite.release_cuda_memory()
