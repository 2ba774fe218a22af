"""``python -m benchmarks.kernel_stats [--json PATH]``: a static profile of the LoRA, InfoNCE and
hypergraph top-k Triton kernels' sm_90a code, made with no GPU.

Each launch variant of ``_lora_pack_kernel`` and ``_lora_grad_kernel`` (bf16, q/k/v stacked,
dropout on and off; the gradient kernel's with dX and dA, and with dX alone) is compiled for
sm_90a at its default configuration and at each sweep candidate
(``ace_kernels.lora._GPU_CANDIDATES``), and the cubin is read back
(``ace_kernels._aot.profile_sm90``): registers, shared memory, resident blocks and warps per SM,
and the main loop's instructions, per thread and per element of x the loop step covers, with
the share of the integer multiply-adds and logic ops (``IMAD``, ``LOP3``) that Philox is made
of and the count of type conversions (``I2F``, ``F2F``, ``I2FP``, ``F2I``).

The InfoNCE kernels (bf16, labels, D = 512, aligned, every integer argument a multiple of 16 as
at B = 65,536, which Triton specialises on) are profiled per logit: the one-pass
kernels at their defaults (``_lse_both_kernel``, ``_grad_rows_kernel``: the main loop is one
column tile, so a logit costs the loop over the tile's logits per thread) and the blocked ones at
their first blocked candidate (``_lse_tiles_kernel``, ``_grad_weights_kernel``: one tile per
program, the main loop a K step, so a tile costs the listing with the loop counted D / BLOCK_K
times), each in its two launches: the interior tiles' and the others' (``TILES``). Each row gives
the instructions per logit per thread, the tensor-core instructions (``HGMMA``/``HMMA``) and
``MUFU`` ones (exponentials, logarithms) among them.

The hypergraph's top-k incidence kernel (``_topk_incidence_kernel``: bf16, D = 512, a 256-token
tower, every size and stride a multiple of 16; k = 5 and 16, the full output's selection and
``cls_only``'s fused one, at the launch's register cap) gives its registers, spills, resident
blocks, and the instructions per thread of its main loop (one tile of tokens, its feature loop
counted once) and of the whole listing. With ``--json`` the rows of the three families are also
written to PATH.

These are facts about the code a GPU would run, for judging a kernel change where no GPU is at
hand; they are not timings (latency, memory and the scheduler decide those) and make no speed
claim. Run it where the Triton wheel is installed; it must not run under ``TRITON_INTERPRET=1``
(the interpreter's kernels cannot be compiled). About a minute on 2 cores.

The launch table (:func:`lora_launches`) and the InfoNCE signatures (:func:`contrastive_signature`)
are shared with ``tests/test_lora.py`` and ``tests/test_contrastive.py``, whose spill checks
compile every variant in every dtype.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import torch

from ace_kernels import _tuning, contrastive, lora as lora_module
from ace_kernels._aot import integer_arguments
from ace_kernels._dispatch import interpreter_enabled
from benchmarks import harness

# Besides the aligned pointers, the 16-divisible sizes and strides of the real shapes (768).
DIVISIBLE_AT_REAL_SHAPES = {"M", "K", "KP", "plane", "stride_xm", "stride_cm", "stride_dxm", "stride_ap", "stride_ar",
                            "stride_gp"}
# Innermost strides are 1 at a real launch, which Triton turns into a constant.
UNIT_STRIDES = {"stride_xk", "stride_ak", "stride_gr"}
CONVERSIONS = ("I2F", "F2F", "I2FP", "F2I", "F2IP")
PHILOX_OPS = ("IMAD", "LOP3")


def lora_launches(dtype: torch.dtype) -> list:
    """(label, kernel, signature, constexprs, num_warps, num_stages) for every launch variant, at
    the default configurations and at each sweep candidate (``lora._GPU_CANDIDATES``)."""
    elem = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    dot_precision = lora_module._dot_precision(dtype)
    pointer_types = {
        "x_ptr": elem, "a_ptr": elem, "xcat_ptr": elem, "g_ptr": elem, "dx_ptr": elem,
        "da_part_ptr": "fp32", "seed_ptr": "i64", "mask_ptr": "i8",
    }
    float_args = {"inv_keep", "lora_factor"}

    def build(label, kernel, name, constexprs, cfg=None):
        cfg = dict(cfg if cfg is not None else lora_module._GPU_CONFIGS[name][_tuning.dtype_class(dtype)])
        num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        constexprs = dict(constexprs, **cfg)
        signature = {}
        for arg in kernel.arg_names:
            if arg in constexprs or arg in UNIT_STRIDES:
                signature[arg] = "constexpr"
                constexprs.setdefault(arg, 1)
            elif arg in pointer_types:
                signature[arg] = "*" + pointer_types[arg]
            else:
                signature[arg] = "fp32" if arg in float_args else "i32"
        return (label, kernel, signature, constexprs, num_warps, num_stages)

    launches = []
    for projections in (3, 1):
        block_r = lora_module._block_r(projections, 4)
        for dropout in (True, False):
            launches.append(build(f"down P={projections} dropout={dropout}", lora_module._lora_pack_kernel, "down",
                                  dict(PROJECTIONS=projections, APPLY_DROPOUT=dropout, BLOCK_R=block_r,
                                       DOT_PRECISION=dot_precision)))
            # The gradients the backward launches for: dX and dA, dA alone (x frozen), dX alone (A frozen).
            for compute_dx, compute_da in ((True, True), (False, True), (True, False)):
                launches.append(build(f"backward P={projections} dropout={dropout} dx={compute_dx}"
                                      + ("" if compute_da else " da=False"),
                                      lora_module._lora_grad_kernel, "backward",
                                      dict(PROJECTIONS=projections, APPLY_DROPOUT=dropout, COMPUTE_DX=compute_dx,
                                           COMPUTE_DA=compute_da, BLOCK_R=block_r, DOT_PRECISION=dot_precision)))
    launches.append(build("mask", lora_module._lora_mask_kernel, "mask", dict(PROJECTIONS=3)))
    kernels = {"down": lora_module._lora_pack_kernel, "backward": lora_module._lora_grad_kernel}
    defaults = {label.split(" ")[0]: [] for label, *_ in launches}
    for launch in launches:
        defaults[launch[0].split(" ")[0]].append(launch)
    for (name, dtype_class), candidates in lora_module._GPU_CANDIDATES.items():
        if dtype_class != _tuning.dtype_class(dtype):
            continue
        for number, cfg in enumerate(candidates, start=1):
            for label, kernel, _, constexprs, _, _ in defaults[name]:
                fixed = {k: v for k, v in constexprs.items() if k not in cfg and k not in UNIT_STRIDES}
                launches.append(build(f"{label} candidate {number}", kernels[name], name, fixed, cfg))
    return launches


def divisible_arguments(kernel) -> list:
    return [name for name in kernel.arg_names if name in DIVISIBLE_AT_REAL_SHAPES]


def elements_per_step(label: str, constexprs: dict, num_warps: int) -> float:
    """Elements of x one thread covers in one step of the main loop: the pack kernel's loop steps
    over BLOCK_K columns of BLOCK_M rows, the gradient kernel's over EPILOGUE_M rows of BLOCK_K."""
    rows = constexprs["BLOCK_M"] if label.startswith("down") else constexprs["EPILOGUE_M"]
    return rows * constexprs["BLOCK_K"] / (32 * num_warps)


def most_frequent_first(opcodes: dict) -> dict:
    """Opcode counts ordered as the JSON rows give them: the most frequent first, ties by name."""
    return dict(sorted(opcodes.items(), key=lambda kv: (-kv[1], kv[0])))


def profile_row(label: str, kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    from ace_kernels._aot import profile_sm90

    prof = profile_sm90(kernel, signature, constexprs, num_warps=num_warps, num_stages=num_stages,
                        divisible_by_16=divisible_arguments(kernel))
    ops = prof.loop_opcodes
    total = prof.loop_instructions
    per_element = elements_per_step(label, constexprs, num_warps)
    return dict(
        label=label, num_warps=num_warps, num_stages=num_stages,
        config={k: constexprs[k] for k in ("BLOCK_M", "BLOCK_K", "EPILOGUE_M") if k in constexprs},
        registers=prof.resources.registers, shared_bytes=prof.resources.shared_bytes,
        spills=prof.resources.spills, blocks_per_sm=prof.blocks_per_sm, warps_per_sm=prof.blocks_per_sm * num_warps,
        loop_instructions=total, loop_instructions_per_element=round(total / per_element, 2),
        philox_op_share=round(sum(ops.get(op, 0) for op in PHILOX_OPS) / total, 3) if total else None,
        loop_conversions=sum(ops.get(op, 0) for op in CONVERSIONS),
        loop_opcodes=most_frequent_first(ops),
    )


def selected(label: str) -> bool:
    """The variants of the profile: q/k/v stacked (P=3), dX computed (with dA, or alone), dropout on and off."""
    return "P=3" in label and "dx=False" not in label


def profile_lora(dtype: torch.dtype = torch.bfloat16) -> list:
    return [profile_row(*launch) for launch in lora_launches(dtype) if selected(launch[0])]


def format_rows(rows: Sequence[dict]) -> str:
    width = max([len("kernel variant")] + [len(r["label"]) for r in rows])
    head = (f"{'kernel variant':{width}s} {'regs':>4s} {'smem':>6s} {'blk/SM':>6s} {'warps/SM':>8s} "
            f"{'loop instr':>10s} {'per elem':>8s} {'IMAD+LOP3':>9s} {'conv':>4s}")
    lines = [head]
    for r in rows:
        share = "-" if r["philox_op_share"] is None else f"{100 * r['philox_op_share']:.0f}%"
        lines.append(f"{r['label']:{width}s} {r['registers']:4d} {r['shared_bytes']:6d} {r['blocks_per_sm']:6d} "
                     f"{r['warps_per_sm']:8d} {r['loop_instructions']:10d} {r['loop_instructions_per_element']:8.1f} "
                     f"{share:>9s} {r['loop_conversions']:4d}")
    return "\n".join(lines)


def contrastive_signature(kernel: str, dtype: str) -> dict:
    """The runtime arguments of an InfoNCE kernel (``lse_both``, ``lse_tiles``,
    ``grad_weights`` or ``grad``) with ``dtype`` embeddings, as Triton type strings."""
    if kernel == "lse_both":
        sig = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "keys_ptr": "*i32", "scale_ptr": "*fp32",
               "lse_ptr": "*fp32", "diag_ptr": "*fp32", "col_part_ptr": "*fp32", "row_lo": "i32", "row_hi": "i32",
               "n": "i32", "dim": "i32", "stride_a": "i32", "stride_b": "i32"}
    elif kernel == "lse_tiles":
        sig = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "keys_ptr": "*i32", "scale_ptr": "*fp32",
               "row_part_ptr": "*fp32", "col_part_ptr": "*fp32", "diag_ptr": "*fp32", "row0": "i32",
               "rows_end": "i32", "n": "i32", "dim": "i32", "stride_a": "i32", "stride_b": "i32"}
    elif kernel == "grad_weights":
        sig = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "keys_ptr": "*i32", "scale_ptr": "*fp32",
               "lse_a_ptr": "*fp32", "lse_b_ptr": "*fp32", "w_ptr": f"*{dtype}", "part_ptr": "*fp32",
               "row0": "i32", "rows_end": "i32", "col0": "i32", "cols_end": "i32", "diag_lo": "i32",
               "diag_hi": "i32", "n": "i32", "dim": "i32", "stride_a": "i32", "stride_b": "i32", "stride_w": "i32"}
    elif kernel == "grad":
        sig = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "keys_ptr": "*i32", "scale_ptr": "*fp32",
               "coef_ptr": "*fp32", "lse_a_ptr": "*fp32", "lse_b_ptr": "*fp32", "grad_a_ptr": f"*{dtype}",
               "grad_scale_ptr": "*fp32", "row_lo": "i32", "row_hi": "i32", "col_lo": "i32", "col_hi": "i32",
               "n": "i32", "dim": "i32", "stride_a": "i32", "stride_b": "i32", "stride_g": "i32"}
    else:
        raise ValueError(f"argument 'kernel': expected one of lse_both, lse_tiles, grad_weights, grad, "
                         f"got {kernel!r}")
    return sig


INFONCE_DIM = 512


def contrastive_launches(dim: int = INFONCE_DIM) -> list:
    """(label, kernel, signature, constexprs, num_warps, num_stages, 16-divisible arguments) of the
    InfoNCE kernels the profile covers: bf16, labels, ``dim`` and the batch multiples of 16."""
    launches = []
    for name, kind in (("lse_both", "lse"), ("grad", "grad")):
        cfg = contrastive._launch_config(kind, torch.bfloat16, dim, interpreter=False)
        launches.append((f"{name} one-pass", name, cfg, contrastive._kernel_options(cfg)))
    for name, kind in (("lse_tiles", "lse"), ("grad_weights", "grad")):
        candidate = contrastive._first_blocked_candidate(kind)
        with _tuning.forced("contrastive", kind, "16bit/one_dot", candidate):
            cfg = contrastive._launch_config(kind, torch.bfloat16, dim, interpreter=False)
        # The interior tiles' launch (nearly every tile at a large B) and the others'.
        for tiles, what in ((contrastive.TILES_INTERIOR, "interior"), (contrastive.TILES_EDGE, "edge")):
            launches.append((f"{name} blocked {what}", name, dict(cfg, TILES=tiles), contrastive._blocked_options(cfg)))
    return [contrastive_launch(*launch) for launch in launches]


def contrastive_launch(label: str, name: str, cfg: dict, options: dict) -> tuple:
    """One entry of :func:`contrastive_launches`: InfoNCE kernel ``name`` (a
    :func:`contrastive_signature` name) launched with configuration ``cfg`` and kernel options
    ``options``, bf16 with labels."""
    kernels = {"lse_both": contrastive._lse_both_kernel, "grad": contrastive._grad_rows_kernel,
               "lse_tiles": contrastive._lse_tiles_kernel, "grad_weights": contrastive._grad_weights_kernel}
    const = {"HAS_KEYS": True, "IEEE": False}
    if name.startswith("lse"):
        const["FAST_LOG"] = contrastive._fast_log(torch.bfloat16)  # as a launch on a GPU takes the logs
    if "TILES" in cfg:
        const["TILES"] = cfg["TILES"]
    const.update({k: v for k, v in options.items() if k not in ("num_warps", "num_stages")})
    signature = dict(contrastive_signature(name, "bf16"), **{k: "constexpr" for k in const})
    # At B = 65,536 every integer argument is a multiple of 16 (n, D, the row strides, and the
    # bounds, which are block starts and ends or 0 and n), and Triton specialises a launch on
    # that: the code a large-batch launch runs.
    divisible = integer_arguments(signature)
    return label, kernels[name], signature, const, options["num_warps"], options["num_stages"], divisible


def contrastive_row(label: str, kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int,
                    divisible: Sequence[str], dim: int = INFONCE_DIM) -> dict:
    from ace_kernels._aot import profile_sm90

    prof = profile_sm90(kernel, signature, constexprs, num_warps=num_warps, num_stages=num_stages,
                        divisible_by_16=divisible)
    ops, loop = prof.loop_opcodes, prof.loop_instructions
    logits = constexprs["BLOCK_M"] * constexprs["BLOCK_N"] / (32 * num_warps)  # per thread and tile
    # One-pass: the loop is one column tile. Blocked: one tile per program, the loop a K step.
    steps = -(-dim // constexprs["BLOCK_K"]) if " blocked" in label else None

    def per_tile(opcodes: Sequence[str] | None = None) -> int:
        def count(table):
            return sum(v for k, v in table.items() if opcodes is None or k in opcodes)
        if steps is None:
            return count(ops)
        return count(prof.kernel_opcodes) + (steps - 1) * count(ops)

    return dict(
        label=label, num_warps=num_warps, num_stages=num_stages,
        config={k: constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D") if k in constexprs},
        registers=prof.resources.registers, shared_bytes=prof.resources.shared_bytes,
        spills=prof.resources.spills, blocks_per_sm=prof.blocks_per_sm, warps_per_sm=prof.blocks_per_sm * num_warps,
        loop_instructions=loop, kernel_instructions=prof.kernel_instructions,
        instructions_per_logit=round(per_tile() / logits, 2),
        mma_instructions_per_tile=per_tile(("HGMMA", "HMMA")),
        mufu_per_logit=round(per_tile(("MUFU",)) / logits, 2),
        loop_opcodes=most_frequent_first(ops),
        kernel_opcodes=most_frequent_first(prof.kernel_opcodes),
    )


def profile_contrastive(dim: int = INFONCE_DIM) -> list:
    return [contrastive_row(*launch, dim=dim) for launch in contrastive_launches(dim)]


def topk_signature(features: str) -> dict:
    """The arguments of the hypergraph's ``_topk_incidence_kernel`` with ``features`` (``fp32``, ``bf16``
    or ``fp16``) patch features, as Triton type strings (its constexprs named ``"constexpr"``)."""
    return {"pn_ptr": f"*{features}", "inv_norm_ptr": "*fp32", "rows_ptr": "*i64", "idx_ptr": "*i64",
            "w_ptr": "*fp32", "M": "i32", "D": "i32", "R": "i32",
            **{n: "i32" for n in ("stride_pb", "stride_pm", "stride_pd", "stride_nb", "stride_nm", "stride_rb",
                                  "stride_rr", "stride_ob", "stride_or", "stride_ok")},
            **{n: "constexpr" for n in ("TOPK", "BLOCK_K", "BLOCK_Q", "BLOCK_M", "BLOCK_D", "HAS_ROWS",
                                        "COMPUTE_NORMS", "NATIVE_DOT")}}


# The top-k kernel's innermost strides, 1 at a real launch (a Triton constant).
TOPK_UNIT_STRIDES = ("stride_pd", "stride_nm", "stride_rr", "stride_ok")


def hypergraph_launches() -> list:
    """The top-k incidence kernel as the bf16 launches on a GPU compile it (``TOPK_CONFIG["gpu"]``,
    tensor-core dots, ``_topk_maxnreg``), with every size and stride a multiple of 16 (D = 512 and a
    256-token tower): k = 5 and k = 16, for the full output (query r is token r, norms given) and for
    ``cls_only``'s fused selection (query rows given, norms computed in the kernel). Entries:
    (label, signature, constexprs, num_warps, num_stages, divisible, maxnreg)."""
    from ace_kernels import hypergraph

    cfg = hypergraph.TOPK_CONFIG["gpu"]
    launches = []
    for topk in (5, 16):
        for rows, norms, what in ((False, False, "full"), (True, True, "cls_only")):
            signature = topk_signature("bf16")
            constexprs = dict(TOPK=topk, BLOCK_K=hypergraph._pow2(topk), BLOCK_Q=cfg["BLOCK_Q"],
                              BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], HAS_ROWS=rows, COMPUTE_NORMS=norms,
                              NATIVE_DOT=True)
            for name in TOPK_UNIT_STRIDES:
                signature[name] = "constexpr"
                constexprs[name] = 1
            launches.append((f"topk_incidence k={topk} {what}", signature, constexprs, cfg["num_warps"],
                             cfg["num_stages"], integer_arguments(signature),
                             hypergraph._topk_maxnreg(torch.bfloat16)))
    return launches


def profile_hypergraph() -> list:
    """One row per :func:`hypergraph_launches` entry: resources, resident blocks, and the main loop's
    instructions per thread (one column tile of BLOCK_M tokens against the program's BLOCK_Q queries, its
    feature loop counted once) and the whole listing's."""
    from ace_kernels import hypergraph
    from ace_kernels._aot import profile_sm90

    rows = []
    for label, signature, constexprs, num_warps, num_stages, divisible, maxnreg in hypergraph_launches():
        prof = profile_sm90(hypergraph._topk_incidence_kernel, signature, constexprs, num_warps=num_warps,
                            num_stages=num_stages, divisible_by_16=divisible, maxnreg=maxnreg)
        rows.append(dict(label=label, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg,
                         registers=prof.resources.registers, shared_bytes=prof.resources.shared_bytes,
                         spills=prof.resources.spills, blocks_per_sm=prof.blocks_per_sm,
                         warps_per_sm=prof.blocks_per_sm * num_warps, loop_instructions=prof.loop_instructions,
                         kernel_instructions=prof.kernel_instructions,
                         loop_opcodes=most_frequent_first(prof.loop_opcodes)))
    return rows


def format_hypergraph(rows: Sequence[dict]) -> str:
    lines = [f"{'kernel (bf16, D=512, N=256)':32s} {'regs':>4s} {'spill':>5s} {'blk/SM':>6s} {'loop':>6s} "
             f"{'kernel':>6s}"]
    for r in rows:
        lines.append(f"{r['label']:32s} {r['registers']:4d} {r['spills']:5d} {r['blocks_per_sm']:6d} "
                     f"{r['loop_instructions']:6d} {r['kernel_instructions']:6d}")
    return "\n".join(lines)


def format_contrastive(rows: Sequence[dict]) -> str:
    lines = [f"{'kernel (bf16, labels, D=512)':32s} {'tiles':>12s} {'regs':>4s} {'blk/SM':>6s} {'warps/SM':>8s} "
             f"{'instr/logit':>11s} {'MUFU/logit':>10s} {'MMA/tile':>8s}"]
    for r in rows:
        c = r["config"]
        tiles = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
        lines.append(f"{r['label']:32s} {tiles:>12s} {r['registers']:4d} {r['blocks_per_sm']:6d} "
                     f"{r['warps_per_sm']:8d} {r['instructions_per_logit']:11.1f} {r['mufu_per_logit']:10.2f} "
                     f"{r['mma_instructions_per_tile']:8d}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = parser.parse_args(argv)
    if interpreter_enabled():  # read as Triton reads it: "false" or "off" leaves the kernels compiled
        parser.error("TRITON_INTERPRET is on: the interpreter's kernels cannot be compiled (unset it)")
    if args.json is not None:  # checked before the minute of compiling, not after it
        if not args.json:
            parser.error("argument --json: expected a file path, got ''")
        if os.path.isdir(args.json):
            parser.error(f"argument --json: {args.json!r} is a directory, expected a file path")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            parser.error(f"argument --json: no directory {os.path.dirname(os.path.abspath(args.json))!r} to write "
                         f"{os.path.basename(args.json)!r} into")
    import triton

    rows = profile_lora()
    print(f"sm_90a static profile (triton {triton.__version__}); not a timing")
    print("LoRA kernels (bf16, q/k/v stacked)")
    print(format_rows(rows))
    infonce = profile_contrastive()
    print("\nInfoNCE kernels")
    print(format_contrastive(infonce))
    hypergraph_rows = profile_hypergraph()
    print("\nHypergraph top-k incidence kernel (instructions per thread: the token-tile loop, the listing)")
    print(format_hypergraph(hypergraph_rows))
    if args.json:
        content = dict(triton=triton.__version__, torch=torch.__version__, target="sm_90a", dtype="bfloat16",
                       rows=rows, infonce_dim=INFONCE_DIM, infonce_rows=infonce, hypergraph_rows=hypergraph_rows)

        def dump(handle) -> None:
            json.dump(content, handle, indent=1)
            handle.write("\n")

        try:
            harness._replace_file(args.json, dump)  # atomically, as the suite writes its result files
        except OSError as exc:
            parser.error(f"argument --json: cannot write {args.json!r} ({type(exc).__name__}: {exc.strerror or exc})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
