"""``python -m ace_kernels.info``: what can run on this machine, and why not."""

from __future__ import annotations

import os
import platform
import sys

import torch

from ace_kernels._dispatch import (_ENV_VAR, BACKENDS, _OPS, _cuda_arch_reason, _extension, available_backends,
                                   built_cuda_archs, device_name, interpreter_enabled, order_key, preference,
                                   requested_backend)


def report() -> str:
    lines = [f"ace_kernels {__import__('ace_kernels').__version__}"]
    lines.append(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}")
    try:
        import triton

        lines.append(f"triton {triton.__version__}  interpreter {'on' if interpreter_enabled() else 'off'}")
    except Exception:
        lines.append("triton not importable")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device {props.name}  sm_{props.major}{props.minor}  {props.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("device none (CPU only)")
    module, error = _extension()
    archs = built_cuda_archs()
    lines.append("extension ace_kernels._C: " + ("loaded from " + module.__file__ if module else "not loaded")
                 + (f" (code for {', '.join(archs)})" if archs else ""))
    lines.append("")
    table = available_backends(reasons=True)
    if not table["cuda"]:
        # Code for other GPUs than every visible one: each call declines the backend (auto moves on).
        arch_reasons = [_cuda_arch_reason(index) for index in range(torch.cuda.device_count())]
        if arch_reasons and all(arch_reasons):
            table["cuda"] = arch_reasons
    for name in BACKENDS:
        why = table[name]
        lines.append(f"  {name:<7} {'available' if not why else 'unavailable: ' + '; '.join(why)}")
    # What a call with backend="auto" (the default) asks for: the environment variable replaces "auto".
    lines.append("")
    try:
        requested = requested_backend("auto")
    except ValueError as exc:
        requested = None
        lines.append(f"{exc}: every call with backend='auto' (the default) raises")
    if requested not in (None, "auto"):
        lines.append(f"{_ENV_VAR}={requested}: calls with backend='auto' (the default) use {requested} only (or raise)")
    elif requested == "auto" and os.environ.get(_ENV_VAR, "").strip():
        lines.append(f"{_ENV_VAR}=auto")
    # The order backend="auto" tries on this machine's first GPU (measured there, or declared).
    device = torch.device("cuda", 0) if torch.cuda.is_available() else None
    where = " (on cuda:0)" if device is not None else ""
    if interpreter_enabled():  # with a GPU or without
        where = (f" ({'on cuda:0; ' if device is not None else ''}it skips triton here: the interpreter runs only "
                 "when asked for, backend='triton')")
    lines.append(f"auto tries, in order{where}:")
    for op in sorted(_OPS):
        if not op.startswith("_"):
            for variant in (None, *_OPS[op].variants):
                label = order_key(op, variant)
                lines.append(f"  {label:<31} {', '.join(preference(op, device, variant))}")
    # Launch configurations measured on this card by a benchmark sweep (ace_kernels/tuned_configs.json).
    from ace_kernels import _tuning

    lines.append("")
    cards = _tuning.tuned_configs()
    if device is None:
        lines.append("tuned launch configurations: recorded for " + (", ".join(sorted(cards)) or "no card"))
    else:
        name = device_name(device)
        tuned = cards.get(name) or {}
        entries = [f"{family} {kernel}" for family, table in sorted(tuned.items()) for kernel in sorted(table)]
        lines.append(f"tuned launch configurations on {name}: " + (", ".join(entries) or "none (the defaults)"))
    return "\n".join(lines)


def main(argv=None) -> int:
    """Print :func:`report`. ``argv``: the command line's arguments (none besides ``-h``/``--help``; None, as a
    caller in Python passes, reads none)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ace_kernels.info",
                                     description="Say which backends can run on this machine, and why not.")
    parser.parse_args([] if argv is None else argv)  # --help prints the usage; any other flag is an error
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
