"""Where one forward+backward step of each op spends its time: a torch.profiler breakdown.

    python -m benchmarks.profile_ops [--out FILE] [--only lora hypergraph] [--quick] [--device cpu]

For each op at the GPU shapes that decide its dispatch (``bench_lora``, ``bench_hypergraph``,
bf16), once per backend on a GPU: the step's wall time (CUDA-synchronised, median of 10, after
3 warm-up steps), how many kernels it launches, and the profiler's table of CUDA time by kernel
and operator. LoRA: M = 64 * 197 (host-bound on an H200), triton and torch. Hypergraph: B = 64
``cls_only`` and B = 1024 full output, triton and cuda. InfoNCE: B = 16384 with labels, the
Triton kernels' default one-pass strategy and the blocked one (each pass's first blocked sweep
candidate, forced). A diagnosis aid for the benchmark's
ratios, not a benchmark: no baseline, no target. Runs on the CPU too (CPU time only; the ops'
``auto`` backend, each shape once, no blocked strategy), where it says little; ``--quick`` takes tiny shapes (a
smoke test of the tool). ``gpu_check.sh`` runs it with ``GPU_CHECK_PROFILE=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

import ace_kernels
from benchmarks import bench_contrastive, bench_hypergraph, bench_lora, harness


def _lora_step(device, dtype, backend, quick=False):
    shape = dict(m=2 * 37, k=96, out=80, r=4) if quick else dict(m=64 * 197, k=768, out=768, r=4)
    x, weight, bias, lora_a, lora_b, grad_out = bench_lora._inputs(shape, dtype, device,
                                                                   torch.Generator(device=device).manual_seed(0))

    def step():
        outs = ace_kernels.lora_qkv(x, weight, bias, lora_a, lora_b, scaling=0.5, dropout_p=0.1, training=True,
                                    backend=backend)
        torch.autograd.backward(outs, grad_out)

    return f"lora_qkv M={shape['m']} K={shape['k']} out={shape['out']} r=4 p=0.1", step


def _hypergraph_step(device, dtype, backend, quick=False, batch=64, cls_only=True):
    shape = dict(b=4, n=17, d=40, k=3, hidden=8) if quick else dict(b=batch, n=197, d=512, k=5, hidden=128)
    x, cls_attn, edge, node = bench_hypergraph._inputs(shape, dtype, device,
                                                       torch.Generator(device=device).manual_seed(0))
    out_shape = (shape["b"], shape["d"]) if cls_only else (shape["b"], shape["n"], shape["d"])
    grad = torch.randn(out_shape, device=device).to(dtype)

    def step():
        ace_kernels.ace_hypergraph(x, cls_attn, edge, node, topk=shape["k"], cls_only=cls_only,
                                   backend=backend).backward(grad)

    return (f"ace_hypergraph B={shape['b']} N={shape['n']} D={shape['d']} k={shape['k']} h={shape['hidden']} "
            + ("cls_only" if cls_only else "full")), step


def _hypergraph_full_step(device, dtype, backend, quick=False):
    return _hypergraph_step(device, dtype, backend, quick, batch=1024, cls_only=False)


def _infonce_step(device, dtype, backend, quick=False, strategy=None):
    batch, dim = (150, 64) if quick else (16384, 512)
    image, text, scale, labels = bench_contrastive._inputs(batch, dim, dtype, device,
                                                           torch.Generator(device=device).manual_seed(0))

    def step():
        with (bench_contrastive.blocked_strategy(dtype) if strategy == "blocked" else contextlib.nullcontext()):
            ace_kernels.label_guided_infonce(image, text, scale, labels, backend=backend).backward()

    return f"label_guided_infonce B={batch} D={dim} labels" + (f" ({strategy} strategy)" if strategy else ""), step


def _infonce_blocked_step(device, dtype, backend, quick=False):
    return _infonce_step(device, dtype, backend, quick, strategy="blocked")


# name -> [(step factory, GPU backend)]; on a CPU each factory runs once with backend "auto".
STEPS = {"lora": [(_lora_step, "triton"), (_lora_step, "torch")],
         "hypergraph": [(_hypergraph_step, "triton"), (_hypergraph_step, "cuda"),
                        (_hypergraph_full_step, "triton"), (_hypergraph_full_step, "cuda")],
         "contrastive": [(_infonce_step, "triton"), (_infonce_blocked_step, "triton")]}
# Steps that only differ from another on a GPU: a CPU's "auto" is the torch backend, which has no blocked
# strategy to force (the step would time the other's torch loss again under another label).
GPU_ONLY = (_infonce_blocked_step,)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile(factory, backend: str, device: torch.device, dtype: torch.dtype, quick: bool = False) -> str:
    label, step = factory(device, dtype, backend, quick)
    for _ in range(3):
        step()
    _sync(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        _sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
    return (f"== {label}, backend {backend} ({dtype}, {device}): step {statistics.median(times):.3f} ms median "
            f"of 10 (min {min(times):.3f}); {len(kernels)} kernels launched in one step\n{table}\n")


def _plan(names, device):
    """(factory, backend) pairs to profile: every listed backend on a GPU, each factory but the
    ``GPU_ONLY`` ones once with ``auto`` elsewhere."""
    plan = []
    for name in names:
        for factory, backend in STEPS[name]:
            if device.type != "cuda":
                if factory in GPU_ONLY:
                    continue
                backend = "auto"
            if (factory, backend) not in plan:
                plan.append((factory, backend))
    return plan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--only", nargs="+", choices=sorted(STEPS), default=list(STEPS),
                        help=f"the ops to profile (default: all, in the order {' '.join(STEPS)})")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    args = parser.parse_args(argv)
    try:
        device = harness.parse_device(args.device)
    except ValueError as exc:
        parser.error(f"argument --device: {exc}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = []
    for factory, backend in _plan(args.only, device):
        try:
            report.append(profile(factory, backend, device, dtype, args.quick))
        except Exception as exc:  # one step's failure must not hide the others' breakdowns
            report.append(f"== {factory.__name__} backend {backend}: failed: {type(exc).__name__}: {exc}\n")
        print(report[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
