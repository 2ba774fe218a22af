"""Launch-configuration sweep of the Triton kernels on a GPU (family ``tuning``).

Each swept kernel is timed inside its op's forward+backward step, once at its default
configuration and once at each declared candidate (``_GPU_CANDIDATES`` of ``ace_kernels.lora``
and ``ace_kernels.contrastive``), every one forced with ``ace_kernels._tuning.forced`` while the
other kernels keep their defaults, one after the other in one process:

- LoRA (``down``, the pack kernel, and ``backward``, the gradient kernel; dtype class ``16bit``): the
  ``lora_qkv`` step of family lora, M = 64*197, K = out = 768, r = 4, p = 0.1, bf16. Error: q, k, v and every
  gradient against the reference LoRA with dropout off, and with dropout on against the
  reference formula on the masks the configuration drew (the path the step times).
- InfoNCE (``lse`` and ``grad``, ``16bit/one_dot``): the labelled ``label_guided_infonce`` step,
  B = 16,384, D = 512, bf16. Error: the loss and the three gradients against the torch
  backend's chunked path on fp32 copies.

The rows of one kernel: op ``<op> sweep <kernel>``; provider ``triton`` is the default (the
baseline of the others) and ``triton+<kernel>#<n>`` its candidate n as declared, from 1;
metrics ``kernel_family`` (``lora`` or ``contrastive``), ``kernel``, ``dtype_class``,
``candidate`` (0: the default), ``config``, ``rel_err`` (the largest relative error of the
parts above) and ``rel_err_against``. ``python -m benchmarks.tuned_configs RESULTS.json`` turns
them into ``ace_kernels/tuned_configs.json``.

GPU only: on the CPU the family is skipped with the reason (the interpreter's times say nothing
about a GPU's). Its one item, ``triton_config_sweep``, is costly (``--tier``): it runs last in a
default run, in whatever time is left, or in a ``--tier costly`` call. Estimate: about 3 s per
configuration (compiling the kernel at it, the probe, about 1 s of timed calls), 25 of them.
"""

from __future__ import annotations

import torch

import ace_kernels
from ace_kernels import _tuning
from benchmarks import bench_contrastive, bench_lora

FAMILY = "tuning"
ITEM = "triton_config_sweep"
COSTLY_ITEMS = (ITEM,)
ALL_COSTLY = True
SECONDS_PER_CONFIG = 3.0
OPS = {"lora": "lora_qkv", "contrastive": "label_guided_infonce"}
# A --quick run's shapes (a check of the rows, not a measurement). The InfoNCE batch gives every
# candidate's tile height more than one row block, the last one partial.
QUICK_LORA = dict(m=2 * 37, k=96, out=80, r=4)
QUICK_CONTRASTIVE = (150, 64)


def sweep_plan() -> list[dict]:
    """``[{"kernel_family", "kernel", "dtype_class", "configs": [default, candidate 1, ...]}, ...]``
    for the kernel families of ``OPS`` (their modules register their candidates with ``_tuning``)."""
    plan = []
    registered = _tuning.registered()
    for kernel_family in OPS:
        for (kernel, dtype_class), candidates in registered[kernel_family].items():
            plan.append(dict(kernel_family=kernel_family, kernel=kernel, dtype_class=dtype_class,
                             configs=[_tuning.default(kernel_family, kernel, dtype_class)]
                             + [dict(c) for c in candidates]))
    return plan


def provider_label(kernel: str, number: int) -> str:
    return "triton" if number == 0 else f"triton+{kernel}#{number}"


def _lora_case(suite, dtype):
    shape = dict(QUICK_LORA) if suite.quick else dict(m=64 * 197, k=768, out=768, r=4)
    generator = torch.Generator(device=suite.device).manual_seed(0)
    x, weight, bias, lora_a, lora_b, grad_out = bench_lora._inputs(shape, dtype, suite.device, generator)

    reference = bench_lora.reference_parts(x, weight, bias, lora_a, lora_b, grad_out)  # once for every configuration

    def check():
        return max(bench_lora._check_against_reference("triton", x, weight, bias, lora_a, lora_b, grad_out, reference),
                   bench_lora._check_with_dropout("triton", x, weight, bias, lora_a, lora_b, grad_out))

    def step():
        outs = ace_kernels.lora_qkv(x, weight, bias, lora_a, lora_b, scaling=bench_lora.SCALING,
                                    dropout_p=bench_lora.DROPOUT, training=True, backend="triton")
        torch.autograd.backward(outs, grad_out)

    text = f"M={shape['m']} K={shape['k']} out={shape['out']} r={shape['r']} p={bench_lora.DROPOUT}"
    return text, check, step, [x, lora_a, lora_b], "reference LoRA, dropout off and on (its masks)"


def _contrastive_case(suite, dtype):
    batch, dim = QUICK_CONTRASTIVE if suite.quick else (16384, 512)
    generator = torch.Generator(device=suite.device).manual_seed(0)
    image, text, scale, labels = bench_contrastive._inputs(batch, dim, dtype, suite.device, generator)
    # The reference's loss and gradients: computed once for every configuration.
    reference = bench_contrastive.reference_parts(bench_contrastive._torch_fp32_chunked(labels), image, text, scale,
                                                  torch.float32)

    def check():
        return max(bench_contrastive._check("triton", image, text, scale, labels, reference).values())

    def step():
        ace_kernels.label_guided_infonce(image, text, scale, labels, backend="triton").backward()

    return (f"B={batch} D={dim} labels", check, step, [image, text, scale],
            "torch backend's chunked path on fp32 copies")


CASES = {"lora": _lora_case, "contrastive": _contrastive_case}


def unavailable(suite) -> bool:
    """Whether this run cannot sweep (the reason logged): no GPU, or provider triton not selected.
    The suite's process asks before it starts the family's own, whose start-up (torch's import)
    would otherwise buy only this line."""
    if not suite.is_gpu:
        suite.skip(ITEM, "a sweep of GPU launch configurations: needs a GPU (the interpreter's times say nothing "
                         "about a GPU's)")
        return True
    if "triton" not in suite.providers:
        suite.skip(ITEM, "provider triton not selected (--providers)")
        return True
    return False


def run(suite) -> None:
    if unavailable(suite):
        return
    plan = sweep_plan()
    if not suite.include(ITEM, costly=True, estimate_s=SECONDS_PER_CONFIG * sum(len(p["configs"]) for p in plan)):
        return
    # bf16 on a GPU; a GPU suite faked on the CPU (a test) runs the interpreter, whose bf16 is wrong.
    dtype = suite.dtype() if suite.device.type == "cuda" else torch.float16
    for kernel_family in OPS:
        entries = [p for p in plan if p["kernel_family"] == kernel_family]
        if not entries or suite.out_of_time(f"{ITEM} {kernel_family}"):
            continue
        shape_text, check_fn, step_fn, grads, against = CASES[kernel_family](suite, dtype)
        print(f" {ITEM} {OPS[kernel_family]} {shape_text} {dtype}")
        for entry in entries:
            kernel, dtype_class = entry["kernel"], entry["dtype_class"]
            if suite.out_of_time(f"{ITEM} {kernel_family} {kernel}"):
                return
            checked, providers, metrics = {}, [], {}
            for number, config in enumerate(entry["configs"]):
                label = provider_label(kernel, number)
                metrics[label] = dict(kernel_family=kernel_family, kernel=kernel, dtype_class=dtype_class,
                                      candidate=number, config=config, rel_err_against=against,
                                      kernel_digest=_tuning.kernel_digest(kernel_family))

                def check(label=label, config=config):
                    with _tuning.forced(kernel_family, kernel, dtype_class, config):
                        checked[label] = check_fn()

                def step(config=config):
                    with _tuning.forced(kernel_family, kernel, dtype_class, config):
                        step_fn()

                providers.append((label, check, step, grads))
            measured = suite.measure_checked([], providers)
            rows = {label: (meas, dict(metrics[label], rel_err=checked[label])) for label, meas in measured.items()}
            default = provider_label(kernel, 0)
            baselines = {default: rows.pop(default)} if default in rows else {}
            suite.add_rows(family=FAMILY, op=f"{OPS[kernel_family]} sweep {kernel}", shape=shape_text, dtype=dtype,
                           ours=rows, baselines=baselines)
        suite.release_cuda_memory()
