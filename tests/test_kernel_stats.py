"""The static sm_90a profile (``ace_kernels._aot.profile_sm90``, ``benchmarks.kernel_stats``):
the loop finder and the occupancy arithmetic on hand-made inputs, then one real compile and
disassembly of the LoRA pack kernel (in a fresh process, as the spill checks do)."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ace_kernels._aot import blocks_per_sm90, main_loop_opcodes  # noqa: E402


def _line(address: int, text: str) -> str:
    return f"        /*{address:04x}*/                   {text} ;"


# An nvdisasm-like listing: a short loop (.L_x_0, 2 instructions), a longer one (.L_x_1), a
# forward branch (not a loop) and a predicated backward branch closing the long loop.
LISTING = "\n".join([
    _line(0x00, "MOV R1, c[0x0][0x28]"),
    ".L_x_0:",
    _line(0x10, "IADD3 R2, R2, 0x1, RZ"),
    _line(0x20, "@P0 BRA `(.L_x_0)"),
    _line(0x30, "BRA `(.L_x_2)"),
    ".L_x_1:",
    _line(0x40, "IMAD.HI.U32 R3, R4, -0x2daee0ad, RZ"),
    _line(0x50, "@!P1 IMAD R5, R4, -0x2daee0ad, RZ"),
    _line(0x60, "LOP3.LUT R6, R3, R7, R8, 0x96, !PT"),
    _line(0x70, "@UP0 HGMMA.64x8x16.F32.BF16 R28, R32, gdesc[UR52], R28"),
    _line(0x80, "@P6 BRA `(.L_x_1)"),
    ".L_x_2:",
    _line(0x90, "EXIT"),
])


def test_main_loop_is_the_longest_backward_branch_and_opcodes_drop_their_modifiers():
    assert main_loop_opcodes(LISTING) == {"IMAD": 2, "LOP3": 1, "HGMMA": 1, "BRA": 1}


def test_a_listing_without_a_backward_branch_has_no_loop():
    assert main_loop_opcodes("\n".join([".L_x_0:", _line(0, "NOP"), _line(0x10, "BRA `(.L_x_1)"), ".L_x_1:",
                                        _line(0x20, "EXIT")])) == {}


def test_the_branch_to_itself_after_exit_is_not_a_loop():
    # Every kernel's listing ends so; with its loops unrolled, that is its only backward branch.
    trap = [_line(0x00, "MOV R1, c[0x0][0x28]"), _line(0x10, "EXIT"), ".L_x_9:", _line(0x20, "BRA `(.L_x_9)"),
            ".L_x_10:", _line(0x30, "NOP")]
    assert main_loop_opcodes("\n".join(trap)) == {}
    assert main_loop_opcodes(LISTING + "\n" + "\n".join(trap[2:])) == {"IMAD": 2, "LOP3": 1, "HGMMA": 1, "BRA": 1}


@pytest.mark.parametrize("registers, shared, warps, expected", [
    (136, 34816, 8, 1),   # 136 -> 4352 registers a warp: 3 warps per 16K sub-partition, 12 an SM, one block of 8
    (127, 34816, 8, 2),   # 127 -> 4096 a warp: 16 warps, two blocks
    (80, 15360, 4, 6),    # registers: 6 warps a sub-partition, 24 -> 6 blocks; shared memory: 14
    (100, 0, 2, 8),       # 100 -> 3328 a warp: 4 per sub-partition, 16 an SM (not 65536 // 3328 = 19)
    (32, 6657, 1, 29),    # shared memory in 128-byte units: 6657 + 1024 -> 7808 a block, 29 (not 30)
    (32, 0, 1, 32),       # the 32-block limit
    (32, 0, 32, 2),       # the 64-warp limit
    (40, 120_000, 4, 1),  # shared memory: 228 KiB over 120,000 + 1 KiB reserved
])
def test_blocks_per_sm_follow_the_sm90_limits(registers, shared, warps, expected):
    assert blocks_per_sm90(registers, shared, warps) == expected


def test_blocks_per_sm_refuses_an_empty_kernel():
    with pytest.raises(ValueError, match="registers >= 1"):
        blocks_per_sm90(0, 0, 4)


def test_elements_per_step_and_table():
    from benchmarks.kernel_stats import elements_per_step, format_rows

    assert elements_per_step("down P=3 dropout=True", dict(BLOCK_M=64, BLOCK_K=64), 8) == 16
    assert elements_per_step("backward P=3 dropout=True dx=True", dict(BLOCK_M=128, BLOCK_K=128, EPILOGUE_M=32),
                             8) == 16
    row = dict(label="down P=3 dropout=True", registers=136, shared_bytes=34816, blocks_per_sm=1, warps_per_sm=8,
               loop_instructions=848, loop_instructions_per_element=53.0, philox_op_share=0.592, loop_conversions=0)
    table = format_rows([row, dict(row, philox_op_share=None)]).splitlines()
    assert table[1].split() == ["down", "P=3", "dropout=True", "136", "34816", "1", "8", "848", "53.0", "59%", "0"]
    assert table[2].split()[-2] == "-"


@pytest.mark.parametrize("value", ["1", "true", "Yes", "on"])
def test_the_cli_refuses_the_interpreter(monkeypatch, capsys, value):
    from benchmarks import kernel_stats

    monkeypatch.setenv("TRITON_INTERPRET", value)
    with pytest.raises(SystemExit):
        kernel_stats.main([])
    assert "TRITON_INTERPRET is on" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "false", "off", ""])
def test_the_cli_takes_a_triton_interpret_that_triton_reads_as_off(monkeypatch, value):
    # Triton compiles its kernels for these: the profile can run (stopped here at its first kernel).
    from benchmarks import kernel_stats

    class Profiled(Exception):
        pass

    def stop():
        raise Profiled

    monkeypatch.setenv("TRITON_INTERPRET", value)
    monkeypatch.setattr(kernel_stats, "profile_lora", stop)
    with pytest.raises(Profiled):
        kernel_stats.main([])


def test_contrastive_signature_names_a_wrong_kernel():
    from benchmarks.kernel_stats import contrastive_signature

    assert contrastive_signature("grad", "bf16")["grad_a_ptr"] == "*bf16"
    with pytest.raises(ValueError, match="argument 'kernel'.*'gradient'"):
        contrastive_signature("gradient", "bf16")


def _profile_blocked_forward() -> list:
    from benchmarks.kernel_stats import contrastive_launches, contrastive_row

    launch = next(launch for launch in contrastive_launches() if launch[0] == "lse_tiles blocked interior")
    return [contrastive_row(*launch)]


@pytest.mark.slow
def test_the_blocked_forward_profile_counts_a_whole_tile():
    pytest.importorskip("triton")
    from _aot_helpers import compile_in_fresh_process

    (row,) = compile_in_fresh_process("test_kernel_stats", "_profile_blocked_forward")
    # One tile per program: the listing with its K loop (a step of BLOCK_K of D = 512) counted
    # 512 / BLOCK_K times, over the tile's logits per thread.
    steps = 512 // row["config"]["BLOCK_K"]
    logits = row["config"]["BLOCK_M"] * row["config"]["BLOCK_N"] / (32 * row["num_warps"])
    expected = (row["kernel_instructions"] + (steps - 1) * row["loop_instructions"]) / logits
    assert row["instructions_per_logit"] == pytest.approx(expected, abs=0.01)
    assert row["kernel_instructions"] > row["loop_instructions"] > 0
    assert row["mma_instructions_per_tile"] > 0
    assert row["loop_opcodes"].get("HGMMA", 0) + row["loop_opcodes"].get("HMMA", 0) > 0
    # Two exponentials a logit (the row and the column log-sum-exps), as the kernel computes them.
    assert row["mufu_per_logit"] >= 2


def _profile_pack_kernel() -> list:
    import torch

    from benchmarks.kernel_stats import lora_launches, profile_row

    launch = next(launch for launch in lora_launches(torch.bfloat16) if launch[0] == "down P=3 dropout=True")
    return [profile_row(*launch)]


@pytest.mark.slow
def test_the_pack_kernel_profile_reads_its_k_loop():
    pytest.importorskip("triton")
    from _aot_helpers import compile_in_fresh_process

    (row,) = compile_in_fresh_process("test_kernel_stats", "_profile_pack_kernel")
    ops = row["loop_opcodes"]
    # The K loop: the tensor-core products of the three projections, the Philox multiplies.
    assert ops.get("HGMMA", 0) + ops.get("HMMA", 0) > 0 and ops.get("IMAD", 0) > 0, ops
    assert row["loop_instructions"] == sum(ops.values()) > 0
    assert row["spills"] == 0 and row["blocks_per_sm"] >= 1
    assert row["warps_per_sm"] == row["blocks_per_sm"] * row["num_warps"]
    # With dropout every element needs Philox bits: far more work per element than the copy.
    assert row["loop_instructions_per_element"] > 10


def _pack_kernel_resources_cold_and_cached() -> list:
    """compile_sm90 of the LoRA pack kernel twice in a fresh Triton cache (the second compile
    would be a cache hit), beside a standalone ``ptxas -v`` of the same PTX."""
    import dataclasses
    import re
    import subprocess
    import tempfile

    import torch

    from ace_kernels import _aot
    from benchmarks.kernel_stats import divisible_arguments, lora_launches

    label, kernel, signature, constexprs, num_warps, num_stages = next(
        launch for launch in lora_launches(torch.bfloat16) if launch[0] == "down P=3 dropout=True")
    divisible = divisible_arguments(kernel)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        runs = [dataclasses.asdict(_aot.compile_sm90(kernel, signature, constexprs, num_warps=num_warps,
                                                      num_stages=num_stages, divisible_by_16=divisible))
                for _ in range(2)]
        ptx = _aot.ptx_sm90(kernel, signature, constexprs, num_warps=num_warps, num_stages=num_stages,
                            divisible_by_16=divisible)
        path = os.path.join(cache, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        alone = subprocess.run([_aot._tool("ptxas"), "-v", "--gpu-name", "sm_90a", path, "-o", path + ".cubin"],
                               capture_output=True, text=True, check=True)
    return runs + [int(re.search(r"Used (\d+) registers", alone.stderr + alone.stdout).group(1))]


@pytest.mark.slow
def test_resources_are_read_from_tritons_own_ptxas_run_even_for_a_cached_kernel():
    """compile_sm90 reads the report of the ptxas run that made Triton's cubin, so a kernel
    already in Triton's cache (which would skip ptxas) is compiled again, not reported empty;
    the registers agree with a standalone ptxas -v of the same PTX."""
    pytest.importorskip("triton")
    from _aot_helpers import compile_in_fresh_process

    cold, cached, alone = compile_in_fresh_process("test_kernel_stats", "_pack_kernel_resources_cold_and_cached")
    assert cold == cached, (cold, cached)
    assert cold["registers"] == alone > 0 and cold["spill_store_bytes"] == cold["spill_load_bytes"] == 0, cold


def _infonce_exponentials() -> list:
    from ace_kernels._aot import ptx_sm90
    from benchmarks.kernel_stats import contrastive_launches

    out = []
    for label, kernel, signature, constexprs, num_warps, num_stages, divisible in contrastive_launches():
        ptx = ptx_sm90(kernel, signature, constexprs, num_warps=num_warps, num_stages=num_stages,
                       divisible_by_16=divisible)
        out.append([label, ptx.count("ex2.approx.ftz.f32"), ptx.count("ex2.approx.f32"),
                    ptx.count("lg2.approx.ftz.f32")])
    return out


@pytest.mark.slow
def test_the_infonce_kernels_exponentials_and_logs_are_one_mufu_each():
    """Every exponential of the InfoNCE kernels is ex2.approx.ftz (one MUFU.EX2; tl.exp's
    ex2.approx.f32 costs three instructions more on sm_90, contrastive._exp), and the 16-bit
    forward kernels' logs are lg2.approx.ftz (contrastive._log), not tl.log's polynomial."""
    pytest.importorskip("triton")
    from _aot_helpers import compile_in_fresh_process

    rows = compile_in_fresh_process("test_kernel_stats", "_infonce_exponentials")
    assert len(rows) == 6, rows  # one-pass forward and gradient, each blocked kernel's two launches
    assert all(ftz > 0 and plain == 0 for _, ftz, plain, _ in rows), rows
    # The forward kernels (lse_*) take logs; the gradient kernels take none.
    assert all((logs > 0) == label.startswith("lse") for label, _, _, logs in rows), rows


def test_the_fast_log_is_for_16_bit_inputs_on_a_gpu(monkeypatch):
    from ace_kernels import _dispatch, contrastive

    if contrastive.libdevice is None:
        pytest.skip("this triton has no triton.language.extra.libdevice")
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: False)
    assert contrastive._fast_log(torch.bfloat16) and contrastive._fast_log(torch.float16)
    assert not contrastive._fast_log(torch.float32)  # fp32 keeps the exact log, as its IEEE dots
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: True)
    assert not contrastive._fast_log(torch.bfloat16)  # the interpreter cannot run fast_logf
    monkeypatch.setattr(_dispatch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert not contrastive._fast_log(torch.bfloat16)  # ROCm's libdevice has no fast_logf
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(contrastive, "libdevice", None)
    assert not contrastive._fast_log(torch.bfloat16)


def _infonce_log_polynomials() -> list:
    """[label, ftz FMAs with FAST_LOG, without] of each 16-bit InfoNCE forward launch (sm_90a PTX)."""
    from ace_kernels import _aot, contrastive
    from benchmarks.kernel_stats import contrastive_launches

    launches = contrastive_launches()  # every forward kernel (group= runs the one-pass forward too)
    out = []
    for label, kernel, signature, constexprs, num_warps, num_stages, divisible in launches:
        if not label.startswith("lse"):
            continue
        counts = []
        for fast in (True, False):
            ptx = _aot.ptx_sm90(kernel, signature, dict(constexprs, FAST_LOG=fast), num_warps=num_warps,
                                num_stages=num_stages, divisible_by_16=divisible)
            counts.append(ptx.count("fma.rn.ftz.f32"))
        out.append([label, *counts])
    return out


@pytest.mark.slow
def test_the_16_bit_forward_kernels_take_no_exact_log_anywhere():
    """Every log of a 16-bit forward kernel is the fast one: none of tl.log's polynomial
    (its ftz FMAs, which the same launch compiled with FAST_LOG=False has) is left."""
    pytest.importorskip("triton")
    from _aot_helpers import compile_in_fresh_process

    rows = compile_in_fresh_process("test_kernel_stats", "_infonce_log_polynomials")
    assert len(rows) == 3, rows  # lse_both, and lse_tiles interior and edge
    assert all(fast == 0 and exact > 0 for _, fast, exact in rows), rows


@pytest.mark.parametrize("registers, shared, warps, expected", [
    (16, 0, 32, 2),      # the 64-warp limit with few registers (128 warps' worth of registers)
    (8, 0, 16, 4),
])
def test_blocks_per_sm_keep_the_warp_limit_under_32_registers(registers, shared, warps, expected):
    assert blocks_per_sm90(registers, shared, warps) == expected


@pytest.mark.parametrize("registers, shared, warps", [(32, 0, 0), (32, -1, 4)])
def test_blocks_per_sm_refuses_no_warps_and_negative_shared_memory(registers, shared, warps):
    with pytest.raises(ValueError, match="num_warps >= 1 and shared_bytes >= 0"):
        blocks_per_sm90(registers, shared, warps)


def test_integer_arguments_are_the_i32_ones_less_the_excluded():
    from ace_kernels._aot import integer_arguments

    signature = {"a_ptr": "*bf16", "scale": "fp32", "n": "i32", "stride_a": "i32", "seed": "i64",
                 "BLOCK_M": "constexpr"}
    assert integer_arguments(signature) == ["n", "stride_a"]
    assert integer_arguments(signature, exclude=("stride_a",)) == ["n"]


def _fake_profile_sm90(monkeypatch, registers=136, shared=34816, listing=LISTING):
    """profile_sm90 with its compile and nvdisasm replaced: resources as given, LISTING as the SASS."""
    import types

    from ace_kernels import _aot

    resources = _aot.KernelResources(name="k", registers=registers, spill_store_bytes=0, spill_load_bytes=0,
                                     stack_frame_bytes=0, shared_bytes=shared, num_warps=0)
    monkeypatch.setattr(_aot, "_compile", lambda *args, **kwargs: (resources, b"cubin"))
    monkeypatch.setattr(_aot, "_tool", lambda name: name)
    monkeypatch.setattr(_aot.subprocess, "run",
                        lambda *args, **kwargs: types.SimpleNamespace(stdout=listing, returncode=0))
    return _aot


def test_profile_sm90_counts_blocks_at_the_launch_warps(monkeypatch):
    aot = _fake_profile_sm90(monkeypatch)
    prof = aot.profile_sm90(None, {}, num_warps=8)
    # 136 registers: 12 warps an SM, one block of 8 (three of 4).
    assert prof.blocks_per_sm == blocks_per_sm90(136, 34816, 8) == 1
    assert prof.loop_opcodes == {"IMAD": 2, "LOP3": 1, "HGMMA": 1, "BRA": 1}
    assert prof.kernel_instructions == 10 and prof.loop_instructions == 5
    assert aot.profile_sm90(None, {}, num_warps=4).blocks_per_sm == 3


def test_contrastive_row_per_logit_arithmetic(monkeypatch):
    """contrastive_row's arithmetic on a made-up profile: a blocked launch's tile is the listing
    with its K loop counted cdiv(D, BLOCK_K) times; MUFU and MMA counts are those opcodes only."""
    from ace_kernels import _aot
    from benchmarks.kernel_stats import contrastive_row

    resources = _aot.KernelResources(name="k", registers=128, spill_store_bytes=0, spill_load_bytes=0,
                                     stack_frame_bytes=0, shared_bytes=1024, num_warps=8)
    prof = _aot.LoopProfile(resources=resources, blocks_per_sm=2,
                            loop_opcodes={"HGMMA": 4, "FFMA": 6},
                            kernel_opcodes={"HGMMA": 4, "FFMA": 6, "MUFU": 64, "IMAD": 26})
    monkeypatch.setattr(_aot, "profile_sm90", lambda *args, **kwargs: prof)
    const = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64)
    # D = 96: two K steps (the second partial), 32 logits per thread and tile.
    row = contrastive_row("lse_tiles blocked interior", None, {}, const, 8, 3, [], dim=96)
    assert row["instructions_per_logit"] == round((100 + 10) / 32, 2)
    assert row["mma_instructions_per_tile"] == 8
    assert row["mufu_per_logit"] == 2.0
    assert row["warps_per_sm"] == 16 and row["kernel_instructions"] == 100 and row["loop_instructions"] == 10
    # Opcodes most frequent first.
    assert list(row["loop_opcodes"]) == ["FFMA", "HGMMA"] and list(row["kernel_opcodes"]) == ["MUFU", "IMAD", "FFMA",
                                                                                             "HGMMA"]
    # One-pass: the loop is the column tile, counted once.
    row = contrastive_row("lse_both one-pass", None, {}, const, 8, 3, [], dim=96)
    assert row["instructions_per_logit"] == round(10 / 32, 2) and row["mufu_per_logit"] == 0
    # Tensor-core products issued as HMMA (mma.sync, not wgmma) count as well.
    monkeypatch.setattr(_aot, "profile_sm90", lambda *args, **kwargs: _aot.LoopProfile(
        resources=resources, blocks_per_sm=2, loop_opcodes={"HMMA": 4}, kernel_opcodes={"HMMA": 4, "FFMA": 6}))
    assert contrastive_row("lse_tiles blocked interior", None, {}, const, 8, 3, [], dim=96)[
        "mma_instructions_per_tile"] == 8


def test_lora_row_per_element_arithmetic(monkeypatch):
    """profile_row's arithmetic on a made-up profile: loop instructions over the elements of x one
    thread covers in a step, the share of every Philox opcode, every conversion opcode, the warps of
    every resident block; opcodes listed most frequent first."""
    from ace_kernels import _aot
    from benchmarks.kernel_stats import profile_row

    resources = _aot.KernelResources(name="k", registers=128, spill_store_bytes=0, spill_load_bytes=0,
                                     stack_frame_bytes=0, shared_bytes=1024, num_warps=4)
    opcodes = {"FFMA": 10, "IMAD": 30, "LOP3": 20, "I2F": 1, "F2F": 2, "I2FP": 3, "F2I": 4, "F2IP": 5, "HMMA": 5}
    prof = _aot.LoopProfile(resources=resources, blocks_per_sm=3, loop_opcodes=opcodes, kernel_opcodes=opcodes)
    monkeypatch.setattr(_aot, "profile_sm90", lambda *args, **kwargs: prof)
    # 64 x 64 elements a step over 4 warps: 32 a thread; 80 loop instructions.
    kernel = types.SimpleNamespace(arg_names=["x_ptr", "M"])
    row = profile_row("down P=3 dropout=True", kernel, {}, dict(BLOCK_M=64, BLOCK_K=64), 4, 3)
    assert row["loop_instructions"] == 80 and row["loop_instructions_per_element"] == 2.5
    assert row["philox_op_share"] == round(50 / 80, 3) and row["loop_conversions"] == 15
    assert row["blocks_per_sm"] == 3 and row["warps_per_sm"] == 12 and row["registers"] == 128
    assert list(row["loop_opcodes"]) == ["IMAD", "LOP3", "FFMA", "F2IP", "HMMA", "F2I", "I2FP", "F2F", "I2F"]
    assert row["config"] == dict(BLOCK_M=64, BLOCK_K=64)


def test_contrastive_launches_label_their_tiles_and_mark_the_integers_divisible():
    pytest.importorskip("triton")
    from ace_kernels import contrastive
    from benchmarks.kernel_stats import contrastive_launches

    launches = {launch[0]: launch for launch in contrastive_launches()}
    for name in ("lse_tiles", "grad_weights"):
        assert launches[f"{name} blocked interior"][3]["TILES"] == contrastive.TILES_INTERIOR
        assert launches[f"{name} blocked edge"][3]["TILES"] == contrastive.TILES_EDGE
    for label, kernel, signature, constexprs, num_warps, num_stages, divisible in launches.values():
        # Every integer argument a multiple of 16, as at B = 65,536 (what Triton specialises on).
        assert set(divisible) == {k for k, v in signature.items() if v == "i32"} and "n" in divisible, label


def test_profile_selects_the_stacked_variants_that_compute_dx():
    from benchmarks.kernel_stats import selected

    assert selected("down P=3 dropout=True") and selected("backward P=3 dropout=False dx=True")
    assert not selected("backward P=3 dropout=True dx=False")
    assert not selected("down P=1 dropout=True") and not selected("backward P=1 dropout=True dx=True")


def test_contrastive_table_columns():
    from benchmarks.kernel_stats import format_contrastive

    row = dict(label="lse_tiles blocked interior", config=dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), registers=80,
               blocks_per_sm=3, warps_per_sm=24, instructions_per_logit=78.25, mufu_per_logit=2.5,
               mma_instructions_per_tile=96)
    line = format_contrastive([row]).splitlines()[1].split()
    assert line == ["lse_tiles", "blocked", "interior", "128x64x64", "80", "3", "24", "78.2", "2.50", "96"]


def test_hypergraph_launches_are_the_bf16_gpu_launches_at_tower_sizes():
    """The top-k rows compile what a bf16 launch on a GPU runs: its configuration, tensor-core dots, its
    register cap, the innermost strides as the constant 1, and every other integer a multiple of 16."""
    pytest.importorskip("triton")
    import torch

    from ace_kernels import hypergraph
    from benchmarks.kernel_stats import TOPK_UNIT_STRIDES, hypergraph_launches

    launches = hypergraph_launches()
    assert [launch[0] for launch in launches] == ["topk_incidence k=5 full", "topk_incidence k=5 cls_only",
                                                  "topk_incidence k=16 full", "topk_incidence k=16 cls_only"]
    cfg = hypergraph.TOPK_CONFIG["gpu"]
    for label, signature, constexprs, num_warps, num_stages, divisible, maxnreg in launches:
        assert (num_warps, num_stages) == (cfg["num_warps"], cfg["num_stages"]), label
        assert maxnreg == hypergraph._topk_maxnreg(torch.bfloat16) == hypergraph.TOPK_HALF_MAXNREG, label
        assert signature["pn_ptr"] == "*bf16" and constexprs["NATIVE_DOT"] is True, label
        assert constexprs["HAS_ROWS"] == constexprs["COMPUTE_NORMS"] == label.endswith("cls_only"), label
        assert constexprs["TOPK"] == int(label.split("k=")[1].split()[0]), label
        assert all(signature[name] == "constexpr" and constexprs[name] == 1 for name in TOPK_UNIT_STRIDES), label
        assert set(divisible) == {k for k, v in signature.items() if v == "i32"} and "M" in divisible, label


def test_hypergraph_table_columns():
    from benchmarks.kernel_stats import format_hypergraph

    row = dict(label="topk_incidence k=16 cls_only", registers=162, spills=0, blocks_per_sm=1,
               loop_instructions=2401, kernel_instructions=2952)
    line = format_hypergraph([row]).splitlines()[1].split()
    assert line == ["topk_incidence", "k=16", "cls_only", "162", "0", "1", "2401", "2952"]


def test_the_cli_writes_both_families_as_json_through_the_atomic_writer(monkeypatch, tmp_path, capsys):
    pytest.importorskip("triton")
    from benchmarks import harness, kernel_stats

    lora_row = dict(label="down P=3 dropout=True", registers=136, shared_bytes=34816, blocks_per_sm=1,
                    warps_per_sm=8, loop_instructions=848, loop_instructions_per_element=53.0,
                    philox_op_share=0.592, loop_conversions=0)
    infonce_row = dict(label="lse_tiles blocked interior", config=dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
                       registers=80, blocks_per_sm=3, warps_per_sm=24, instructions_per_logit=78.0,
                       mufu_per_logit=2.5, mma_instructions_per_tile=96)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hypergraph_row = dict(label="topk_incidence k=5 full", registers=80, spills=0, blocks_per_sm=3,
                          loop_instructions=668, kernel_instructions=936)
    monkeypatch.setattr(kernel_stats, "profile_lora", lambda: [lora_row])
    monkeypatch.setattr(kernel_stats, "profile_contrastive", lambda: [infonce_row])
    monkeypatch.setattr(kernel_stats, "profile_hypergraph", lambda: [hypergraph_row])
    written = []
    real = harness._replace_file
    monkeypatch.setattr(harness, "_replace_file", lambda path, write: (written.append(path), real(path, write))[1])
    out = tmp_path / "stats.json"
    assert kernel_stats.main(["--json", str(out)]) == 0
    assert written == [str(out)]
    text = out.read_text()
    assert text.endswith("}\n")
    content = json.loads(text)
    assert content["rows"] == [lora_row] and content["infonce_rows"] == [infonce_row]
    assert content["hypergraph_rows"] == [hypergraph_row]
    assert content["infonce_dim"] == kernel_stats.INFONCE_DIM and content["target"] == "sm_90a"
    assert "lse_tiles blocked interior" in capsys.readouterr().out


def test_a_json_path_that_cannot_be_written_is_refused_before_the_profile(monkeypatch, tmp_path, capsys):
    """--json naming a directory, a file in a missing directory or nothing: a one-line error before
    the minute of compiling (it once compiled every kernel, then died with a traceback)."""
    pytest.importorskip("triton")
    from benchmarks import kernel_stats

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    profiled = []
    monkeypatch.setattr(kernel_stats, "profile_lora", lambda: profiled.append("lora") or [])
    monkeypatch.setattr(kernel_stats, "profile_contrastive", lambda: profiled.append("infonce") or [])
    monkeypatch.setattr(kernel_stats, "profile_hypergraph", lambda: profiled.append("hypergraph") or [])
    for path, why in ((str(tmp_path), "is a directory"), (str(tmp_path / "missing" / "s.json"), "no directory"),
                      ("", "expected a file path")):
        with pytest.raises(SystemExit) as exit_info:
            kernel_stats.main(["--json", path])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --json: " in err and why in err, err
    assert profiled == []
    # A write that fails after the profile (a full disk): one line too, not a traceback.
    from benchmarks import harness

    def full_disk(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(harness, "_replace_file", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        kernel_stats.main(["--json", str(tmp_path / "s.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --json: cannot write" in err and "No space left on device" in err, err
