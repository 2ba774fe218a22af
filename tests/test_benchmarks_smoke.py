"""Smoke test of the benchmark suite: ``python -m benchmarks --quick`` end to end on the CPU,
plus checks that the suite's baselines compute the same functions as our ops.

The suite runs in a subprocess with one torch thread: it sets its own thread
count, and on a shared 2-core machine oversubscribed OpenMP threads make times
explode (the numbers are not judged here, only that every row is complete).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ace_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `pytest tests` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, ROOT)

from benchmarks import baselines, harness  # noqa: E402
from _bench_stubs import StubModel  # noqa: E402
FP64 = torch.float64


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the suite never times the interpreter; keep it as a user runs it
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # The CPU run the tests below read (rows, providers, skips): without --device it takes the GPU where there is one.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--device", "cpu", "--out-dir", str(out),
         "--name", "smoke", "--max-seconds-per-call", "0.5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "smoke.json", encoding="utf-8") as fh:
        payload = json.load(fh)
    return payload, out, proc.stdout


def test_quick_run_rows_are_complete(quick_run):
    payload, _, stdout = quick_run
    rows = payload["rows"]
    ops = {row["op"] for row in rows}
    # The three op families always run; the model family when ace_model imports.
    assert {"lora_qkv", "ace_hypergraph", "label_guided_infonce"} <= ops, (ops, stdout[-2000:])
    for row in rows:
        missing = [k for k in harness.REQUIRED_ROW_FIELDS if k not in row]
        assert not missing, (missing, row)
        assert isinstance(row["median_ms"], float) and row["median_ms"] > 0, row
        assert isinstance(row["peak_mib"], float) and row["peak_mib"] >= 0, row
        assert row["device"] and row["torch"] == torch.__version__ and row["date"] and row["git_sha"], row
        if row["baseline"] is None:
            assert row["speedup_vs_baseline"] is None and row["memory_ratio_vs_baseline"] is None
        else:
            # A comparison row points at a baseline row of the same configuration.
            base = [r for r in rows if r["op"] == row["op"] and r["shape"] == row["shape"]
                    and r["provider"] == row["baseline"] and r["baseline"] is None]
            assert len(base) == 1, row
            expected = base[0]["median_ms"] / row["median_ms"]
            assert row["speedup_vs_baseline"] == pytest.approx(expected, rel=1e-9)
            if row["peak_mib"]:  # baseline over ours, as the speedup: larger is better
                expected = base[0]["peak_mib"] / row["peak_mib"]
                assert row["memory_ratio_vs_baseline"] == pytest.approx(expected, rel=1e-9)
    providers = {row["provider"] for row in rows}
    assert {"reference", "peft-style", "torch"} <= providers
    assert payload["environment"]["device_type"] == "cpu"
    assert payload["run"]["quick"] is True
    assert payload["run"]["compile_baselines"] is False  # auto: off with --quick
    assert not [r for r in rows if r["provider"].endswith("+compile")]


def _rows(payload, op):
    return [r for r in payload["rows"] if r["op"] == op]


def test_quick_run_zero_shot_rows(quick_run):
    payload = quick_run[0]
    rows = {r["provider"]: r for r in _rows(payload, "zero_shot_eval")}
    assert set(rows) == {"reference-loop", "torch"}, (rows, quick_run[2][-2000:])
    loop, ours = rows["reference-loop"], rows["torch"]
    assert ours["baseline"] == "reference-loop" and ours["mode"] == "inference"
    assert loop["metrics"]["batch"] == 1 and ours["metrics"]["batch"] > 1
    assert loop["metrics"]["images"] == ours["metrics"]["images"]  # same work, so the time ratio is the images/s ratio
    assert ours["speedup_vs_baseline"] == pytest.approx(
        ours["metrics"]["images_per_s"] / loop["metrics"]["images_per_s"], rel=0.01)  # images/s rounded to 0.1
    # Both are fp32 evaluations of the same model and prompts (reference ops vs the torch backend,
    # batch 1 vs batched): the class probabilities differ by rounding only.
    assert ours["metrics"]["max_abs_score_diff_vs_reference-loop"] < 1e-4
    # The model family's demo row (issue 6's CPU bound) is a whole demo run: not in quick runs.
    assert not _rows(payload, "ace_lora_demo")
    assert any(line.startswith("ace_lora_demo: skipped (not with --quick") for line in payload["run"]["skipped"])


def test_quick_run_chunked_training_rows(quick_run):
    payload = quick_run[0]
    rows = {r["shape"]: r for r in _rows(payload, "chunked_train_step")}
    assert set(rows) == {"tiny B=16 unchunked", "tiny B=64 chunk=16", "tiny B=256 chunk=16"}, \
        (rows, quick_run[2][-2000:])
    unchunked, small, large = rows["tiny B=16 unchunked"], rows["tiny B=64 chunk=16"], rows["tiny B=256 chunk=16"]
    assert {r["family"] for r in rows.values()} == {"training"}
    assert all(r["baseline"] is None and r["provider"] == "torch" for r in rows.values())
    assert unchunked["metrics"]["chunk_size"] is None and large["metrics"]["chunk_size"] == 16
    for row in rows.values():
        m = row["metrics"]
        assert m["samples_per_s"] == pytest.approx(m["batch"] / (row["median_ms"] * 1e-3), rel=1e-3)
    # Checked: the chunked step against the one-pass step at B=64 (rows 2 and 3 run that code),
    # and a finite loss at B=256.
    assert small["metrics"]["rel_err_vs_unchunked"] < 1e-5
    assert large["metrics"]["rel_err_vs_unchunked"] == small["metrics"]["rel_err_vs_unchunked"]
    assert large["metrics"]["finite"] is True
    m = large["metrics"]
    assert m["small_batch"] == 64 and m["unchunked_batch"] == 16 and m["batch_ratio_vs_small_batch"] == 4
    # The two ratios the GPU targets judge are not rounded.
    assert m["peak_ratio_vs_small_batch"] == pytest.approx(large["peak_mib"] / small["peak_mib"], rel=1e-12)
    # Both sides on the host clock: on a GPU the unchunked step's back-to-back time (its wall_ms),
    # on a CPU (no wall_ms) its median, which is a host time there.
    unchunked_ms = unchunked["wall_ms"] or unchunked["median_ms"]
    assert m["unchunked_ms"] == pytest.approx(unchunked_ms, rel=1e-3)
    assert m["unchunked_ms_basis"] == ("host clock, back to back" if unchunked["wall_ms"] else "median")
    assert m["throughput_ratio_vs_unchunked"] == pytest.approx(
        m["batch"] / (large["median_ms"] * 1e-3) / (m["unchunked_batch"] / (unchunked_ms * 1e-3)), rel=1e-12)
    # The point of the chunked step: 4x the batch at the same chunk needs about the same memory
    # (only the [B, 64] embeddings and their gradients grow), far from the 4x of one pass.
    assert m["peak_ratio_vs_small_batch"] < 1.5, m
    assert any(line.startswith("ace_lora_max_batch: skipped (GPU only") for line in payload["run"]["skipped"])


def test_quick_run_contrastive_memory_metrics_are_not_rounded(quick_run):
    # The GPU targets judge both (rounded to 2 places, an extra 64.004 MiB would meet "extra<=64MiB").
    rows = _rows(quick_run[0], "label_guided_infonce")
    assert rows, quick_run[2][-2000:]
    for row in rows:
        # Both embeddings' gradients, B=300 D=64 in the row's dtype (float32 here, bf16 on a GPU).
        grads_mib = 2 * 300 * 64 * getattr(torch, row["dtype"]).itemsize / 2**20
        labels_mib = 0.0 if "no labels" in row["shape"] else 300 * 14 * 4 / 2**20
        m = row["metrics"]
        assert m["extra_mib_excl_grads"] == pytest.approx(row["peak_mib"] - grads_mib, rel=1e-12), row
        assert m["total_gib"] == pytest.approx((row["peak_mib"] + grads_mib + labels_mib) / 1024, rel=1e-12), row


def test_quick_run_ops_agree_with_baselines(quick_run):
    """The suite checks every provider against the baseline on the timed inputs (fp32)."""
    rows = [r for r in quick_run[0]["rows"] if r["provider"] == "torch"]
    errors = {}
    for row in rows:
        for key, value in row["metrics"].items():
            if key.startswith("rel_err"):
                errors[(row["op"], row["shape"], key)] = value
    assert len(errors) >= 4, errors
    for key, value in errors.items():
        # fp32 against an independent fp32 computation: rounding only (~1e-7 per op, a few hundred ops deep).
        assert isinstance(value, float) and value < 1e-4, (key, value)


def test_quick_run_png_and_compare(quick_run):
    _, out, _ = quick_run
    png = out / "smoke.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from benchmarks.compare import compare_files

    text = compare_files(str(out / "smoke.json"), str(out / "smoke.json"))
    assert "0 only in old, 0 only in new" in text and "lora_qkv" in text
    assert " 1.00 " in text  # same file: every ratio is 1


def test_compiled_baselines_are_rows_beside_the_eager_ones(tmp_path):
    # --compile-baselines on: the main baselines also run under torch.compile (inductor), as
    # "<baseline>+compile" rows, with our rows compared against them too. One quick family.
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--device", "cpu", "--only", "hypergraph",
         "--compile-baselines", "on", "--out-dir", str(tmp_path), "--name", "compiled", "--no-plot",
         "--max-seconds-per-call", "0.3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "compiled.json", encoding="utf-8") as fh:
        payload = json.load(fh)
    assert payload["run"]["compile_baselines"] is True
    rows = payload["rows"]
    for mode in ("cls_only", "full"):
        same = [r for r in rows if r["shape"].endswith(mode)]
        compiled = [r for r in same if r["provider"] == "reference+compile"]
        assert len(compiled) == 1 and compiled[0]["median_ms"] > 0, proc.stdout[-2000:]
        ours = [r for r in same if r["provider"] == "torch" and r["baseline"] == "reference+compile"]
        assert len(ours) == 1
        assert ours[0]["speedup_vs_baseline"] == pytest.approx(compiled[0]["median_ms"] / ours[0]["median_ms"])

# --------------------------------------------------------------------------- baselines vs our ops, fp64


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _assert_close(ours, ref, what):
    # Both sides are fp64 computations of the same formula in different orders: ~1e-15 relative.
    err = harness.relative_error(ours, ref)
    assert err < 1e-10, f"{what}: relative error {err:.3g}"


@pytest.mark.parametrize("rank", [1, 4])
def test_reference_lora_qkv_matches_op(rank):
    g = torch.Generator().manual_seed(10)
    m, k, out = 23, 40, 24
    x, w, b = torch.randn(m, k, generator=g, dtype=FP64), torch.randn(3 * out, k, generator=g, dtype=FP64), \
        torch.randn(3 * out, generator=g, dtype=FP64)
    a, bb = torch.randn(3, rank, k, generator=g, dtype=FP64), torch.randn(3, out, rank, generator=g, dtype=FP64)
    grads = [torch.randn(m, out, generator=g, dtype=FP64) for _ in range(3)]
    for cls in (baselines.ReferenceLoRAQKV, baselines.PeftStyleLoRAQKV):
        module = cls(w, b, a, bb, scaling=0.5, dropout_p=0.0).train()
        xr = x.clone().requires_grad_()
        outs_ref = module(xr)
        torch.autograd.backward(outs_ref, grads)
        a_ref, b_ref = module.stacked_grads()
        xo, ao, bo = _leaves(x, a, bb)
        outs = ace_kernels.lora_qkv(xo, w, b, ao, bo, scaling=0.5, dropout_p=0.0, training=True, backend="torch")
        torch.autograd.backward(outs, grads)
        for o, r in zip(outs, outs_ref, strict=True):
            _assert_close(o, r, f"{cls.__name__} output")
        _assert_close(xo.grad, xr.grad, f"{cls.__name__} dx")
        _assert_close(ao.grad, a_ref, f"{cls.__name__} dA")
        _assert_close(bo.grad, b_ref, f"{cls.__name__} dB")
    # The functional reference (used inside the model benchmark) is the same function.
    fn_outs = baselines.reference_lora_qkv(x, w, b, a, bb, scaling=0.5, dropout_p=0.0, training=True)
    for o, r in zip(fn_outs, outs, strict=True):
        _assert_close(o, r, "reference_lora_qkv")


def test_reference_lora_dropout_keeps_expected_fraction():
    """With dropout, the reference's extra GEMM sees drop(x): about p of the LoRA terms vanish."""
    torch.manual_seed(11)
    m, k, out = 4000, 8, 8
    x = torch.ones(m, k, dtype=FP64)
    w = torch.zeros(3 * out, k, dtype=FP64)
    a = torch.zeros(3, 1, k, dtype=FP64)
    a[:, 0, 0] = 1.0  # the LoRA branch reads x[:, 0] only
    bb = torch.ones(3, out, 1, dtype=FP64)
    q, _, _ = baselines.ReferenceLoRAQKV(w, None, a, bb, scaling=1.0, dropout_p=0.25).train()(x)
    dropped = (q[:, 0] == 0).double().mean().item()
    assert abs(dropped - 0.25) < 0.04  # binomial(4000, 0.25): sd 0.007, so 0.04 is over 5 sd
    kept = q[:, 0][q[:, 0] != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.75))  # inverted dropout scaling


@pytest.mark.parametrize("cls_only", [True, False])
def test_reference_hypergraph_matches_op(cls_only):
    g = torch.Generator().manual_seed(12)
    b, n, d, h, k = 3, 9, 40, 6, 3
    tensors = [torch.randn(b, n, d, generator=g, dtype=FP64), torch.randn(b, n - 1, generator=g, dtype=FP64),
               torch.randn(h, d, generator=g, dtype=FP64) * 0.3, torch.randn(h, generator=g, dtype=FP64) * 0.1,
               torch.randn(d, h, generator=g, dtype=FP64) * 0.3, torch.randn(d, generator=g, dtype=FP64) * 0.1,
               torch.randn(h, d, generator=g, dtype=FP64) * 0.3, torch.randn(h, generator=g, dtype=FP64) * 0.1,
               torch.randn(d, h, generator=g, dtype=FP64) * 0.3, torch.randn(d, generator=g, dtype=FP64) * 0.1]
    grad_out = torch.randn(*((b, d) if cls_only else (b, n, d)), generator=g, dtype=FP64)
    results = []
    for fn in (baselines.reference_ace_hypergraph,
               lambda *a, **kw: ace_kernels.ace_hypergraph(*a, **kw, backend="torch")):
        leaves = _leaves(*tensors)
        out = fn(leaves[0], leaves[1], tuple(leaves[2:6]), tuple(leaves[6:10]), topk=k, cls_only=cls_only)
        out.backward(grad_out)
        results.append([out] + [t.grad for t in leaves])
    names = ["out", "x", "cls_attn"] + [f"{a}.{p}" for a in ("edge", "node") for p in ("dw", "db", "uw", "ub")]
    for name, ours, ref in zip(names, results[1], results[0], strict=True):
        _assert_close(ours, ref, name)


def test_reference_hypergraph_structure():
    """Spec 4.3-4.5 read off the dense reference: with identity adapters, row 0 of E is A[0] X."""
    g = torch.Generator().manual_seed(13)
    n, d, k = 8, 5, 2
    x = torch.randn(1, n, d, generator=g, dtype=FP64)
    cls_attn = torch.tensor([[0.0, 5.0, 0.0, 4.0, 0.0, 0.0, 0.0]], dtype=FP64)  # CLS top-2: tokens 2 and 4
    eye = torch.eye(d, dtype=FP64)
    # Identity-like adapters: LeakyReLU only keeps positives exactly, so feed x >= 0 through them.
    x = x.abs()
    identity = (eye, torch.zeros(d, dtype=FP64), eye, torch.zeros(d, dtype=FP64))
    out = baselines.reference_ace_hypergraph(x, cls_attn, identity, identity, topk=k)
    weights = torch.softmax(torch.tensor([5.0, 4.0], dtype=FP64), 0)
    edge0 = x[0, 0] + weights[0] * x[0, 2] + weights[1] * x[0, 4]  # self-loop 1 plus the two CLS picks
    # C[0] = sum_i A[i, 0] E[i]: A[0,0] = 1 and column 0 copies the CLS row (A[2,0], A[4,0]).
    patches = F.normalize(x[0, 1:], dim=-1)
    sim = patches @ patches.T
    sim.fill_diagonal_(float("-inf"))
    edges = []
    for i, cls_weight in ((2, weights[0]), (4, weights[1])):
        vals, idx = sim[i - 1].topk(k)
        w = torch.softmax(vals, 0)
        # E[i] = x_i (self-loop) + A[i, 0] x_0 (column-0 copy of the CLS row) + its own top-k patches.
        edges.append(x[0, i] + cls_weight * x[0, 0] + (w[:, None] * x[0, idx + 1]).sum(0))
    expected = edge0 + weights[0] * edges[0] + weights[1] * edges[1]
    assert torch.allclose(out[0, 0], expected, atol=1e-12)


@pytest.mark.parametrize("labeled", [True, False])
def test_reference_infonce_matches_op(labeled):
    g = torch.Generator().manual_seed(14)
    batch, dim = 37, 16
    u = F.normalize(torch.randn(batch, dim, generator=g, dtype=FP64), dim=-1)
    t = F.normalize(torch.randn(batch, dim, generator=g, dtype=FP64), dim=-1)
    s = torch.tensor(30.0, dtype=FP64)
    labels = torch.randint(0, 2, (batch, 3), generator=g).float() if labeled else None
    results = []
    for fn in (baselines.reference_label_guided_infonce,
               lambda *a: ace_kernels.label_guided_infonce(*a, backend="torch")):
        leaves = _leaves(u, t, s)
        loss = fn(*leaves, labels)
        loss.backward()
        results.append([loss] + [x.grad for x in leaves])
    for name, ours, ref in zip(["loss", "d_image", "d_text", "d_scale"], results[1], results[0], strict=True):
        _assert_close(ours, ref, name)


def test_reference_infonce_equals_clip_loss_without_labels():
    try:
        clip_loss = baselines.open_clip_loss()
    except ImportError as exc:
        pytest.skip(str(exc))
    g = torch.Generator().manual_seed(15)
    u = F.normalize(torch.randn(29, 8, generator=g, dtype=FP64), dim=-1)
    t = F.normalize(torch.randn(29, 8, generator=g, dtype=FP64), dim=-1)
    s = torch.tensor(20.0, dtype=FP64)
    _assert_close(baselines.reference_label_guided_infonce(u, t, s), clip_loss(u, t, s), "loss")


def test_reference_infonce_mask_all_labels_equal():
    """All labels equal: every off-diagonal pair is masked, so each CE sees only its positive: loss 0."""
    u = F.normalize(torch.randn(6, 4, dtype=FP64), dim=-1)
    loss = baselines.reference_label_guided_infonce(u, u.flip(0), torch.tensor(5.0, dtype=FP64),
                                                    torch.ones(6, 14))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_cpu_peak_memory_counts_the_largest_moment():
    """The CPU peak method sees a transient buffer that is freed before the call returns."""
    def fn():
        big = torch.ones(2 * 2**20)  # 8 MiB of float32, freed at return
        small = torch.ones(2**20 // 4)  # 1 MiB while big is alive
        return float(big[0] + small[0])

    peak = harness.peak_memory_mib(fn, device=torch.device("cpu"))
    assert 9.0 <= peak < 9.5, peak


def test_targets_are_judged():
    row = harness.Row(op="x", shape="s", dtype="float32", provider="torch", baseline="reference", median_ms=1.0,
                      peak_mib=100.0, speedup_vs_baseline=4.0, memory_ratio_vs_baseline=9.0, target=None,
                      target_pass=None, device="d", torch="t", triton=None, cuda=None, git_sha="g", date="now",
                      metrics={"frac_of_matmul_peak": 0.4})
    assert harness.Target("speedup", 5.0, "").check(row) is False
    assert harness.Target("speedup", 4.0, "").check(row) is True
    assert harness.Target("memory_ratio", 8.0, "").check(row) is True
    assert harness.Target("peak_mib_max", 99.0, "").check(row) is False
    assert harness.Target("metric_min:frac_of_matmul_peak", 0.5, "").check(row) is False
    assert harness.Target("metric_min:tflops", 0.5, "").check(row) is None  # not measured: not judged
    # A value exactly at its threshold meets it: "at least" and "at most" include the threshold.
    row.memory_ratio_vs_baseline = 4.0
    row.metrics = {"frac_of_matmul_peak": 0.5, "rel_err_vs_reference": 1e-4}
    assert harness.Target("memory_ratio", 4.0, "").check(row) is True
    assert harness.Target("peak_mib_max", 100.0, "").check(row) is True
    assert harness.Target("metric_min:frac_of_matmul_peak", 0.5, "").check(row) is True
    assert harness.Target("metric_max:rel_err_vs_reference", 1e-4, "").check(row) is True
    # float32's limit is 1e-4: an error of exactly that passes.
    assert [t.check(row) for t in harness.check_targets(row.metrics, "float32")] == [True]
    assert harness.checks_pass(row.metrics, "float32")


def test_check_limits_follow_the_dtype():
    assert harness.check_limit("bfloat16") == harness.check_limit("bf16-autocast") == 3e-2
    assert harness.check_limit("float16") == harness.check_limit("fp16") == harness.check_limit("half") == 1e-2
    assert harness.check_limit("float32") == 1e-4
    assert harness.check_limit("float64") == 1e-9
    assert harness.check_limit("int8") == 3e-2  # a dtype it does not know: the loosest limit


def test_relative_error_of_other_shapes_or_non_finite_outputs_is_inf():
    # Broadcast against each other, these would differ by nothing.
    assert harness.relative_error(torch.ones(3), torch.ones(1)) == float("inf")
    assert harness.relative_error(torch.ones(4, 1), torch.ones(4)) == float("inf")
    assert harness.relative_error(torch.tensor([1.0, float("nan")]), torch.ones(2)) == float("inf")
    assert harness.relative_error(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])) == pytest.approx(5**-0.5)


def test_row_ratios_are_the_baselines_over_ours():
    from benchmarks.harness import Measurement

    row = _suite("all")._row(family="lora", op="op", shape="s", dtype="float32", provider="torch",
                             baseline="reference", measurement=Measurement(1.0, 100.0, 3),
                             base_measurement=Measurement(3.0, 400.0, 3), targets=None, metrics={}, mode="fwd+bwd")
    assert row.speedup_vs_baseline == 3.0 and row.memory_ratio_vs_baseline == 4.0


def test_each_provider_row_takes_the_time_and_peak_of_its_own_baseline():
    """Against two baselines of different times and peaks, a provider's two rows give two different
    ratios, each of the baseline that row names; each baseline's own row is its measurement, unrated."""
    from benchmarks.harness import Measurement

    rows = _suite("all").add_rows(family="f", op="x", shape="s", dtype=torch.float32,
                                  ours={"torch": (Measurement(1.0, 10.0, 5), {})},
                                  baselines={"ref": (Measurement(3.0, 40.0, 5), {}),
                                             "peft": (Measurement(5.0, 20.0, 5), {})})
    got = {(r.provider, r.baseline): (r.median_ms, r.peak_mib, r.speedup_vs_baseline, r.memory_ratio_vs_baseline)
           for r in rows}
    assert got == {("ref", None): (3.0, 40.0, None, None), ("peft", None): (5.0, 20.0, None, None),
                   ("torch", "ref"): (1.0, 10.0, 3.0, 4.0), ("torch", "peft"): (1.0, 10.0, 5.0, 2.0)}
    # torch.float32 is written as result files name it ("float32"): what compare and the package tools match on.
    assert {r.dtype for r in rows} == {"float32"}


def test_interleaved_cpu_timing_gives_each_entry_its_own_median():
    measured = _suite("all").measure_group([("slow", lambda: time.sleep(0.02), []),
                                            ("fast", lambda: time.sleep(0.001), [])])
    assert measured["slow"].median_ms >= 19.0 and measured["fast"].median_ms < 10.0, measured


def test_a_missed_target_fails_the_row_even_when_another_is_not_judged(tmp_path):
    from benchmarks.harness import Measurement, Target

    suite = _fake_gpu_suite(tmp_path, ["triton"])
    suite.quick = False  # targets are judged in full runs only
    meas, base = Measurement(1.0, 500.0, 5, None), Measurement(2.0, 400.0, 5, None)
    goals = [Target("metric_min:frac_of_matmul_peak", 0.5, "rate>=50%"), Target("peak_mib_max", 64.0, "peak<=64")]
    rows = suite.add_rows(family="contrastive", op="x", shape="s", dtype=torch.bfloat16,
                          ours={"triton": (meas, {})}, baselines={"ref": (base, {})},
                          targets=lambda provider, baseline: goals)
    ours = [r for r in rows if r.provider == "triton"][0]
    # No rate measured, no check recorded, peak missed: a miss fails the row whatever was not judged.
    assert ours.target == "rate>=50% & peak<=64 (no correctness check)" and ours.target_pass is False
    # Each part with the value it was judged on; the missing check is a part that is not judged.
    assert ours.target_parts == [{"text": "rate>=50%", "value": None, "met": None},
                                 {"text": "peak<=64", "value": 500.0, "met": False},
                                 {"text": "(no correctness check)", "value": None, "met": None}]
    rows = suite.add_rows(family="contrastive", op="y", shape="s", dtype=torch.bfloat16,
                          ours={"triton": (Measurement(1.0, 10.0, 5, None), {})}, baselines={"ref": (base, {})},
                          targets=lambda provider, baseline: goals)
    assert [r for r in rows if r.provider == "triton"][0].target_pass is None  # nothing missed, one not judged


@pytest.mark.parametrize("argv,fragment", [
    (["--time-budget", "0"], "argument --time-budget: expected a positive number of seconds, got 0"),
    (["--time-budget", "nan"], "argument --time-budget: expected a positive number of seconds, got nan"),
    (["--family-grace", "inf"], "argument --family-grace: expected a number of seconds >= 0, got inf"),
    (["--max-seconds-per-call", "-1"], "argument --max-seconds-per-call: expected a positive number"),
    (["--family-idle-timeout", "-1"], "argument --family-idle-timeout: expected a number of seconds >= 0"),
    (["--threads", "0"], "argument --threads: expected >= 1, got 0"),
    (["--device", "gpu"], "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["--providers", "torch,bogus"], "argument --providers: expected a comma-separated list of cuda, triton, torch"),
    (["--compare", "/nonexistent/a.json", "/nonexistent/b.json"], "argument --compare: '/nonexistent/a.json' is not"),
])
def test_bad_suite_flags_are_one_line_errors(argv, fragment, capsys):
    from benchmarks import suite

    with pytest.raises(SystemExit) as exit_info:
        suite._parse(argv)
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_out_dir_that_is_a_file_and_cuda_without_a_gpu_are_refused(tmp_path, capsys):
    from benchmarks import suite

    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(["--out-dir", str(a_file)], "is a file, expected a directory")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA GPU is visible"))
    for argv, fragment in cases:
        with pytest.raises(SystemExit):
            suite._parse(argv)
        assert fragment in capsys.readouterr().err
    assert suite._parse(["--only", "lora", "--only", "lora", "--only", "model"]).only == ["lora", "model"]
    # No grace and no idle timeout are values of their own (killed at the budget; never taken for hung).
    zero = suite._parse(["--out-dir", str(tmp_path), "--family-grace", "0", "--family-idle-timeout", "0"])
    assert zero.family_grace == zero.family_idle_timeout == 0.0
    # Not writable, or a kill time already past: refused before anything runs.
    for argv, fragment in ((["--out-dir", str(a_file / "sub")], "argument --out-dir: cannot write results into"),
                           (["--hard-deadline", "5"], "argument --hard-deadline: expected a kill time ahead"),
                           (["--hard-deadline", "nan"], "argument --hard-deadline: expected a kill time ahead")):
        with pytest.raises(SystemExit):
            suite._parse(argv)
        assert fragment in capsys.readouterr().err


def test_a_relative_out_dir_is_made_absolute(tmp_path, monkeypatch):
    """Each family's process runs from the repository root: a relative --out-dir reaches it as the
    absolute path this process meant (the rows once went to <repo>/<dir> while the table read
    ./<dir>, empty)."""
    from benchmarks import suite

    monkeypatch.chdir(tmp_path)
    args = suite._parse(["--out-dir", "relout", "--quick"])
    assert args.out_dir == str(tmp_path / "relout") and (tmp_path / "relout").is_dir()


def test_a_row_without_any_check_is_not_judged():
    from benchmarks.harness import Measurement, Target

    suite = _suite("all")
    suite.quick = False
    unchecked = suite._row(family="contrastive", op="op", shape="s", dtype="float32", provider="torch", baseline=None,
                           measurement=Measurement(1.0, 10.0, 3), base_measurement=None,
                           targets=[Target("peak_mib_max", 512, "peak<512MiB")], metrics={}, mode="fwd+bwd")
    assert unchecked.target_pass is None and unchecked.target.endswith("(no correctness check)")
    checked = suite._row(family="contrastive", op="op", shape="s", dtype="float32", provider="torch", baseline=None,
                         measurement=Measurement(1.0, 10.0, 3), base_measurement=None,
                         targets=[Target("peak_mib_max", 512, "peak<512MiB")], metrics={"finite": True},
                         mode="fwd+bwd")
    assert checked.target_pass is True and checked.target == "peak<512MiB & finite"


def test_family_processes_get_the_whole_device_name():
    """``--device cuda:1`` reaches each family's process with its index (it once got ``cuda``)."""
    from benchmarks import suite

    args = suite._parse(["--out-dir", "runs", "--quick"])
    command = suite._worker_command("lora", args, device=torch.device("cuda", 1), stem="s", per_call=1.0,
                                    providers=None, compile_baselines=False, deadline_epoch=None)
    assert command[command.index("--device") + 1] == "cuda:1"


def test_unreadable_result_files_are_one_line_errors(tmp_path, capsys):
    from benchmarks import dispatch_order, suite, tuned_configs

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert suite.main(["--compare", str(bad), str(bad)]) == 2
    assert "argument --compare: cannot read a result file (JSONDecodeError" in capsys.readouterr().err
    # Another JSON file of the results folder (a static kernel profile), or rows without their keys.
    for payload, says in (({"environment": {}, "kernels": []}, f"{tmp_path / 'other.json'} holds no list of 'rows'"),
                          ({"rows": [{"op": "x", "shape": "s"}]}, f"{tmp_path / 'other.json'}: row 0 has no 'dtype'")):
        (tmp_path / "other.json").write_text(json.dumps(payload))
        assert suite.main(["--compare", str(tmp_path / "other.json"), str(tmp_path / "other.json")]) == 2
        assert f"argument --compare: cannot read a result file (ValueError: {says}" in capsys.readouterr().err
    for tool in (dispatch_order, tuned_configs):
        for path in (bad, tmp_path / "missing.json"):
            assert tool.main([str(path), "--out", str(tmp_path / "out.json")]) == 2
            assert "argument RESULTS.json: cannot read" in capsys.readouterr().err
    # Valid JSON with fields missing (a hand-edited file): a one-line error naming what is missing.
    gpu = {"device": "NVIDIA H200", "device_type": "cuda"}
    row = dict(op="lora_qkv", shape="M=100", dtype="bfloat16", provider="triton", median_ms=1.0,
               metrics={"rel_err_vs_reference": 1e-3})
    sweep = dict(row, family="tuning", metrics={"kernel_family": "lora", "candidate": 0})
    cases = {"its 'environment' names no device": ({"device_type": "cuda"}, [row]),
             "row 0 has no 'shape' text": (gpu, [dict(row, shape=None)]),
             "row 1 has no 'op' text": (gpu, [row, {k: v for k, v in row.items() if k != "op"}]),
             "row 0 (lora_qkv): its 'metrics' is not an object": (gpu, [dict(row, metrics=[1])])}
    for why, (environment, rows) in cases.items():
        bad.write_text(json.dumps({"environment": environment, "rows": rows}))
        for tool in (dispatch_order, tuned_configs):
            assert tool.main([str(bad), "--out", str(tmp_path / "out.json")]) == 2, (why, tool.__name__)
            assert f"argument RESULTS.json: cannot read {str(bad)!r} as a result file (ValueError: {why})" in \
                capsys.readouterr().err
    bad.write_text(json.dumps({"environment": gpu, "rows": [sweep]}))
    assert tuned_configs.main([str(bad), "--out", str(tmp_path / "out.json")]) == 2
    assert "row 0 (lora_qkv) is a sweep row without metrics 'kernel'" in capsys.readouterr().err
    # A malformed --out file is named as such (not blamed on the results).
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"environment": gpu, "rows": [row, dict(row, provider="torch", median_ms=2.0)]}))
    out = tmp_path / "hand-edited.json"
    out.write_text(json.dumps({"by_device": {"NVIDIA H200": ["x"]}}))
    for tool in (dispatch_order, tuned_configs):
        assert tool.main([str(good), "--out", str(out)]) == 2
        assert f"argument --out: cannot read {str(out)!r} to update it (ValueError: expected a JSON object whose " \
               "'by_device' holds an object per card)" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_a_second_run_of_the_day_gets_its_own_file(tmp_path):
    from benchmarks import suite

    assert suite._free_stem(str(tmp_path), "cpu-2026-11-29") == "cpu-2026-11-29"
    (tmp_path / "cpu-2026-11-29.json").write_text("{}")
    assert suite._free_stem(str(tmp_path), "cpu-2026-11-29") == "cpu-2026-11-29-2"
    (tmp_path / "cpu-2026-11-29-2.json").write_text("{}")
    assert suite._free_stem(str(tmp_path), "cpu-2026-11-29") == "cpu-2026-11-29-3"


def test_plot_lists_targets_without_bars(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.plot import plot_rows

    common = dict(shape="s", dtype="bfloat16", median_ms=1.0, peak_mib=1.0, device="d", date="t", metrics={})
    rows = [dict(common, op="lora_qkv", provider="triton", baseline="reference", speedup_vs_baseline=0.8,
                 memory_ratio_vs_baseline=1.2, target="speedup>=2", target_pass=False),
            dict(common, op="ace_lora_max_batch", provider="triton", baseline="reference-ops",
                 speedup_vs_baseline=None, memory_ratio_vs_baseline=None, target="max batch>=3x", target_pass=None),
            dict(common, op="label_guided_infonce", provider="triton", baseline=None, speedup_vs_baseline=None,
                 memory_ratio_vs_baseline=None, target="peak<512MiB", target_pass=True)]
    plot_rows(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_gpu_check_script_parses():
    """gpu_check.sh only runs on a lent GPU machine; here at least bash must accept it."""
    proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_tests_summary_keeps_failures_and_totals_only():
    """gpu_check.log's tests summary is the script's own grep over the verbose pytest log: the stage headers,
    the failures and each stage's totals, and not the PASSED lines of tests whose names say "error" or
    "failed" (they crowded the failures out of the summary's last 25 lines)."""
    text = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh"), encoding="utf-8").read()
    grep = re.search(r'grep -E "(\^== pytest[^"]*)" "\$TESTS_LOG"', text).group(1)
    summary = re.search(r"^PYTEST_SUMMARY='([^']*)'$", text, re.MULTILINE).group(1)
    assert grep == "^== pytest|$PYTEST_SUMMARY", grep
    pattern = grep.replace("$PYTEST_SUMMARY", summary)
    log = "\n".join([
        "== pytest -m gpu",
        "tests/test_lora.py::test_bad_rank_error_names_the_argument PASSED [  1%]",
        "tests/test_lora.py::test_failed_launch_is_reported PASSED [  2%]",
        "tests/test_lora.py::test_forward FAILED [  3%]",
        "FAILED tests/test_lora.py::test_forward - AssertionError",
        "ERROR tests/test_hypergraph.py - ImportError",
        "=========== 1 failed, 2 passed, 1 error in 12.34s ===========",
        "== pytest -m \"triton and not gpu\"",
        "============ no tests ran in 0.50s ============",
    ]) + "\n"
    found = subprocess.run(["grep", "-E", pattern], input=log, capture_output=True, text=True, timeout=30)
    assert found.stdout.splitlines() == [
        "== pytest -m gpu",
        "FAILED tests/test_lora.py::test_forward - AssertionError",
        "ERROR tests/test_hypergraph.py - ImportError",
        "=========== 1 failed, 2 passed, 1 error in 12.34s ===========",
        "== pytest -m \"triton and not gpu\"",
        "============ no tests ran in 0.50s ============",
    ]


# --------------------------------------------------------------------------- tiers and the largest-batch search


def _suite(tier, budget=None):
    from benchmarks.suite import Suite

    return Suite(device=torch.device("cpu"), quick=True, json_path=None, png_path=None, time_budget_s=budget,
                 max_seconds_per_call=0.1, providers=["torch"], log=lambda _: None, tier=tier)


def test_a_backend_an_op_does_not_have_is_a_skip_with_its_reason():
    """LoRA has no cuda backend: asking for it is a ValueError naming the op's backends, recorded as
    the provider's skip (as the run-time refusals are), not as an unexpected error."""
    suite = _suite("all")
    x, w, a, b = torch.randn(3, 4), torch.randn(6, 4), torch.randn(3, 1, 4), torch.randn(3, 2, 1)
    assert not suite.provider_can_run("cuda", lambda: ace_kernels.lora_qkv(x, w, None, a, b, scaling=1.0,
                                                                         backend="cuda"))
    assert suite.skipped == ["cuda: skipped (argument 'backend': expected one of ('auto', 'triton', 'torch'), got "
                             "'cuda' (lora_qkv: no cuda backend))"]
    # Another ValueError is an error of the call, described as before.
    assert not suite.provider_can_run("torch", lambda: ace_kernels.lora_qkv(x, w, None, a, b, scaling=1.0,
                                                                          dropout_p=2.0, backend="torch"))
    assert suite.skipped[1].startswith("torch: skipped (ValueError: argument 'dropout_p'")


def test_suite_tiers_choose_items():
    cheap, costly, every = _suite("cheap"), _suite("costly"), _suite("all")
    assert every.include("a", costly=False) and every.include("b", costly=True)
    assert cheap.include("a", costly=False) and not cheap.include("b", costly=True)
    assert costly.include("b", costly=True) and not costly.include("a", costly=False)
    assert any("--tier cheap" in line for line in cheap.skipped)
    assert every.include("c", costly=True, estimate_s=1e6)  # no --time-budget: no estimate is too long
    budgeted = _suite("all", budget=100)
    assert budgeted.include("c", costly=True, estimate_s=50)
    assert not budgeted.include("d", costly=True, estimate_s=150)
    assert "estimated 150 s" in budgeted.skipped[-1]
    with pytest.raises(ValueError, match="tier"):
        _suite("some")


def test_tier_costly_skips_cheap_families(tmp_path):
    """CPU, --tier costly: the op families and the model family's cheap items are skipped, with reasons."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--tier", "costly", "--only", "lora", "--only", "model",
         "--threads", "1", "--device", "cpu", "--out-dir", str(tmp_path), "--name", "tier", "--no-plot"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "tier.json", encoding="utf-8") as fh:
        payload = json.load(fh)
    assert payload["rows"] == [] and payload["run"]["tier"] == "costly"
    skipped = "\n".join(payload["run"]["skipped"])
    for expected in ("family lora: skipped (no costly items", "ace_lora_train_step: skipped (a cheap item",
                     "zero_shot_eval: skipped (a cheap item", "ace_lora_max_batch: skipped (GPU only"):
        assert expected in skipped, skipped
    assert "\nnothing was measured (see 'skipped' above for why)\n" in proc.stdout, proc.stdout[-3000:]


def _fake_step(limit, calls, per_sample_mib=10.0):
    """A training step that fits up to ``limit`` samples, with a peak linear in the batch."""
    def step(batch):
        calls.append(batch)
        return batch <= limit, 1.0, per_sample_mib * batch
    return step


@pytest.mark.parametrize("limit", [64, 100, 1000, 5003])
def test_largest_batch_search_finds_the_limit(limit):
    from benchmarks.bench_model import _largest_batch

    calls = []
    # The free memory predicts 2x the real limit: the search must still end at the real one.
    free = lambda: 2 * limit * 10.0 * 2**20  # noqa: E731
    result = _largest_batch(_fake_step(limit, calls), free, seconds=60, log=lambda _: None)
    found = result["max_batch"]
    assert result["complete"] and found % 8 == 0 and found <= limit, result
    assert limit - found <= max(8, found // 16) + 8, result  # within the bisection's tolerance
    assert all(b % 8 == 0 for b in calls) and calls[0] == 64
    assert [t[0] for t in result["tries"]] == calls
    assert len(calls) <= 12, calls


def test_largest_batch_search_edges():
    from benchmarks.bench_model import MAX_BATCH_CAP, _largest_batch

    calls = []
    result = _largest_batch(_fake_step(40, calls), lambda: 1e12, seconds=60, log=lambda _: None)
    assert result["max_batch"] is None and not result["complete"] and calls == [64]
    result = _largest_batch(_fake_step(10**9, [], per_sample_mib=1e-6), lambda: 1e12, seconds=60,
                            log=lambda _: None)
    assert result["max_batch"] == MAX_BATCH_CAP and "cap" in result["note"]
    # No time left after the first try: the search stops and says so; B=64 is what it found.
    result = _largest_batch(_fake_step(1000, []), lambda: 1e12, seconds=0, log=lambda _: None)
    assert result["max_batch"] == 64 and not result["complete"] and "limit" in result["note"]

    def broken(batch):
        if batch > 64:
            raise RuntimeError("no backend can run this")
        return True, 1.0, 1.0

    result = _largest_batch(broken, lambda: 1e12, seconds=60, log=lambda _: None)
    assert result["max_batch"] == 64 and not result["complete"] and "no backend" in result["note"]


def test_out_of_memory_is_recognised():
    from benchmarks.bench_model import _is_out_of_memory

    assert _is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not _is_out_of_memory(RuntimeError("shape mismatch"))
    assert not _is_out_of_memory(ValueError("out of memory"))  # only the errors torch raises for it


# --------------------------------------------------------------------------- one process per family


def _bench(args, tmp_path, name, env_extra=None, timeout=240, returncode=0):
    """The suite run in a process of its own, on the CPU (without --device it takes the GPU where there is one,
    and these tests read a CPU run's rows, skips and family processes)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("ACE_BENCH_FAULT", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--device", "cpu", "--out-dir", str(tmp_path),
         "--name", name, "--no-plot", "--max-seconds-per-call", "0.2", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / f"{name}.json", encoding="utf-8") as fh:
        return json.load(fh), proc.stdout


def test_quick_run_times_the_global_batch_loss_across_two_gloo_ranks(quick_run):
    """Family distributed on the CPU: 2 gloo ranks (torch backend, fp32) against one process on
    the concatenated batch, both timed in the same processes, checked against each other."""
    rows = [r for r in quick_run[0]["rows"] if r["family"] == "distributed"]
    assert [(r["provider"], r["baseline"]) for r in rows] == [("torch, one process", None),
                                                              ("torch x2 gloo", "torch, one process")], rows
    base, ours = rows
    assert ours["op"] == "label_guided_infonce group=" and ours["shape"] == "B=256 D=64 labels W=2"
    assert ours["dtype"] == "float32" and ours["mode"] == "fwd+bwd"
    assert ours["metrics"]["world"] == 2 and ours["metrics"]["dist_backend"] == "gloo"
    assert ours["metrics"]["flops_per_rank"] == 10 * 128 * 256 * 64
    assert ours["metrics"]["rel_err_vs_one_process"] <= harness.check_limit("float32")
    assert ours["speedup_vs_baseline"] == pytest.approx(base["median_ms"] / ours["median_ms"])
    assert ours["memory_ratio_vs_baseline"] == pytest.approx(base["peak_mib"] / ours["peak_mib"])
    assert ours["metrics"]["runs"] == base["metrics"]["runs"] == 3


def test_quick_run_ran_each_family_in_its_own_process(quick_run):
    run = quick_run[0]["run"]
    assert run["isolation"] == "process per family"
    # (The GPU's families, the probe and the sweep, get no process on the CPU: the suite says why they skip.)
    assert set(run["families"]) == {"lora", "hypergraph", "contrastive", "distributed", "model", "training"}
    assert all(status["outcome"] == "ok" and status["rc"] == 0 for status in run["families"].values()), run
    # Rows of every family landed in the one file, and the training family (its own process)
    # found the model family's rows of the earlier process (its backend choice reads them).
    assert {r["family"] for r in quick_run[0]["rows"]} >= {"lora", "hypergraph", "contrastive", "model", "training"}
    # The GPU sweep (family tuning) says why it has no rows on the CPU.
    assert any(line.startswith("triton_config_sweep: skipped (a sweep of GPU launch configurations")
               for line in run["skipped"]), run["skipped"]


@pytest.mark.parametrize("fault,options,outcome", [
    ("crash", [], "died of SIGABRT"),
    # 30 s: the healthy family's process (torch's import, the first calls) must stay under it on a
    # loaded 2-core machine too (3 s killed it there once; its longest silence is 3.3 s on an idle
    # 2-core machine, 5.6 s beside two busy processes, and CI's other worker may run three ranks).
    ("hang", ["--family-idle-timeout", "30"], "without output (hung?)"),
])
def test_a_lost_family_costs_only_that_family(tmp_path, fault, options, outcome):
    """The other families run and their rows are written; the run then exits with status 1 (a
    crashed or hung family is a failure, as a failed test is), naming the family."""
    payload, stdout = _bench(["--only", "lora", "--only", "hypergraph", *options], tmp_path, fault,
                             env_extra={"ACE_BENCH_FAULT": f"lora:{fault}"}, returncode=1)
    assert stdout.rstrip().endswith("failed: the process of family lora was lost (see 'skipped'); exit status 1")
    families = payload["run"]["families"]
    assert outcome in families["lora"]["outcome"] and families["lora"]["rc"] != 0, families
    assert families["hypergraph"]["outcome"] == "ok"
    assert {r["family"] for r in payload["rows"]} == {"hypergraph"}, stdout[-2000:]
    assert any(line.startswith("family lora: skipped (lost: its process") for line in payload["run"]["skipped"])


def test_a_family_that_raises_fails_the_run(tmp_path, monkeypatch, capsys):
    """A family whose run() raised (a bug, a package missing) was a skip line and nothing more: its
    process returned 0 (outcome "ok") and the run exited with status 0, in a process per family and
    with --in-process alike, where a crashed one fails the run. Now its process exits with status 3,
    its outcome is "raised an error", and the run exits with status 1 naming it; the others' rows stay."""
    from benchmarks import suite as suite_module

    real_command = suite_module._worker_command
    broken = ("from benchmarks import suite\n"
              "class Broken:\n    run = staticmethod(lambda s: {}['shape'])\n"
              "class Fine:\n    run = staticmethod(lambda s: print('fine ran'))\n"
              "suite._modules = lambda: {'lora': Broken, 'hypergraph': Fine}\n"
              "raise SystemExit(suite.main(__import__('sys').argv[1:]))\n")

    def worker_command(*args, **kwargs):  # the real worker's command line, its families replaced
        return [sys.executable, "-c", broken, *real_command(*args, **kwargs)[3:]]

    monkeypatch.setattr(suite_module, "_worker_command", worker_command)
    argv = ["--only", "lora", "--only", "hypergraph", "--quick", "--device", "cpu", "--out-dir", str(tmp_path),
            "--no-plot"]
    assert suite_module.main([*argv, "--name", "p"]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().endswith("failed: family lora raised an error (see 'skipped'); exit status 1"), out
    assert "fine ran" in out and "KeyError: 'shape'" in out
    run = json.loads((tmp_path / "p.json").read_text())["run"]
    assert run["families"]["lora"]["outcome"] == "raised an error" and run["families"]["lora"]["rc"] == 3, run
    assert run["families"]["hypergraph"]["outcome"] == "ok"
    assert run["skipped"] == ["family lora: skipped (KeyError: 'shape')"]

    families = {}
    exec(broken.rsplit("raise", 1)[0].split("suite._modules")[0], families)  # the same families in this process
    monkeypatch.setattr(suite_module, "_modules", lambda: {"lora": families["Broken"], "hypergraph": families["Fine"]})
    assert suite_module.main([*argv, "--name", "i", "--in-process"]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().endswith("failed: family lora raised an error (see 'skipped'); exit status 1"), out
    run = json.loads((tmp_path / "i.json").read_text())["run"]
    assert list(run["families"]) == ["lora"] and run["families"]["lora"]["outcome"] == "raised an error", run


def test_a_named_run_removes_the_png_an_earlier_run_of_that_name_left(tmp_path):
    """--name writes the stem's JSON over: a PNG from the earlier run must not stay beside it
    (with --no-plot, or with nothing measured, none is drawn to replace it)."""
    stale = tmp_path / "again.png"
    stale.write_bytes(b"an earlier run's plot")
    payload, _ = _bench(["--only", "lora", "--tier", "costly"], tmp_path, "again")
    assert payload["rows"] == []
    assert not stale.exists()


def _run_family_script(monkeypatch, tmp_path, family, script):
    """The suite's family process for ``family`` running ``script`` (python -c) in its place, with its
    results file run.json in ``tmp_path``; its status."""
    from types import SimpleNamespace

    from benchmarks import suite as suite_module

    monkeypatch.setattr(suite_module, "_worker_command", lambda *a, **k: [sys.executable, "-c", script])
    return suite_module._run_family_process(SimpleNamespace(deadline=None), family,
                                            SimpleNamespace(out_dir=str(tmp_path)), device="cpu", stem="run",
                                            per_call=1.0, providers=None, compile_baselines=False, grace=1.0,
                                            idle=0)


def test_a_family_process_killed_while_saving_leaves_no_temp_file(tmp_path, monkeypatch):
    """A family's process killed in the middle of its save (the suite kills it at the time budget) left
    its temp file (.<stem>.json.<pid>.<hex>.tmp) in the results folder for good, one more each time, not
    ignored by git. Once the process has ended the suite removes the temp files of that process's pid,
    and only those (another process's, a file of the user's stay)."""
    json_path = tmp_path / "run.json"
    json_path.write_text("{}\n")
    others = [tmp_path / ".run.json.1.0123abcd.tmp", tmp_path / ".run.json.tmp", tmp_path / "notes.tmp"]
    for other in others:
        other.write_text("not this process's")
    script = ("import os, signal\nfrom benchmarks import harness\n"
              f"harness._replace_file({str(json_path)!r}, lambda handle: (handle.write('{{\"rows'), handle.flush(), "
              "os.kill(os.getpid(), signal.SIGKILL)))\n")
    status = _run_family_script(monkeypatch, tmp_path, "lora", script)
    assert status["outcome"] == "died of SIGKILL", status
    assert json_path.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run.json", *(p.name for p in others)])


def test_a_family_process_killed_in_an_item_leaves_no_temp_dir(tmp_path, monkeypatch):
    """The demo (family model) and the distributed ranks (family distributed) work in a temporary
    directory: a family's process killed in such an item (the suite's SIGKILL at the time budget, or
    on its own SIGTERM/SIGINT) left it under /tmp for good (the demo's checkpoints, the ranks' tensors).
    Once the process has ended the suite removes the directories of that process's pid (harness.temp_dir),
    and only those."""
    import tempfile
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    others = [tmp_path / "ace-bench-demo-1-0123abcd", tmp_path / "ace-lora-demo-x", tmp_path / "mine"]
    for other in others:
        other.mkdir()
    script = ("import os, signal\nfrom benchmarks import harness\n"
              "held = [harness.temp_dir(what) for what in ('demo', 'dist')]\n"
              "for held_dir in held:\n    os.mkdir(os.path.join(held_dir.name, 'summary'))\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    status = _run_family_script(monkeypatch, tmp_path, "model", script)
    assert status["outcome"] == "died of SIGKILL", status
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in others)


def test_a_family_process_gets_the_runs_deadline_and_is_killed_grace_seconds_after_it(tmp_path, monkeypatch):
    """A family's process is told the run's own deadline (not one grace later) and is killed ``grace``
    seconds after it; the idle timeout counts from its last line of output, not from its start."""
    from types import SimpleNamespace

    from benchmarks import suite as suite_module

    told = []  # (seconds to the deadline the process is told, seconds to the run's own deadline) at that moment

    def worker_command(*args, deadline_epoch, **kwargs):
        told.append(None if deadline_epoch is None else (deadline_epoch - time.time(), deadline - time.monotonic()))
        return [sys.executable, "-c", script]

    monkeypatch.setattr(suite_module, "_worker_command", worker_command)

    def run(deadline, grace, idle):
        return suite_module._run_family_process(SimpleNamespace(deadline=deadline), "lora",
                                                SimpleNamespace(out_dir=str(tmp_path)), device="cpu", stem="run",
                                                per_call=1.0, providers=None, compile_baselines=False, grace=grace,
                                                idle=idle)

    # Checked against this process's clock, not against fixed numbers of seconds: a loaded runner may pause
    # between the deadline's setting and the process's start (0.5 s failed "told 1.0 s" and "ran 2.5 s").
    script = "import time\ntime.sleep(60)\n"
    deadline = time.monotonic() + 1.0
    status = run(deadline, 2.0, 0)
    assert status["outcome"] == "was killed 2 s after the run's time budget", status
    assert time.monotonic() >= deadline + 2.0 and status["seconds"] < 30, status
    assert told[0][0] == pytest.approx(told[0][1], abs=0.5), told
    # A line every 0.2 s for 4 s: never 3 s without output (the Python start-up before the first line
    # included, slow on a loaded machine), so not taken for hung, though it ran longer than that.
    script = "import time\nfor _ in range(20):\n    print('.', flush=True)\n    time.sleep(0.2)\n"
    status = run(None, 2.0, 3.0)
    assert status["outcome"] == "ok" and status["seconds"] >= 4, status


def test_the_termination_handler_kills_the_running_familys_group_and_is_undone_after_the_run(tmp_path,
                                                                                              monkeypatch):
    """While a family's process runs it is the one SIGTERM/SIGINT kill (``_WORKERS``); the handler kills
    its group, puts the default handlers back (a second signal ends the suite at once) and raises
    ``_Terminated``; once the run is over the handlers from before it are back."""
    from types import SimpleNamespace

    from benchmarks import suite as suite_module

    running, real_sleep = [], time.sleep
    monkeypatch.setattr(time, "sleep", lambda seconds: (running.append(list(suite_module._WORKERS)),
                                                        real_sleep(seconds)))
    status = _run_family_script(monkeypatch, tmp_path, "lora", "import time\ntime.sleep(1)\n")
    monkeypatch.undo()
    assert status["outcome"] == "ok" and running and all(len(workers) == 1 for workers in running), running
    assert suite_module._WORKERS == []

    killed = []
    monkeypatch.setattr(suite_module, "_kill_group", killed.append)
    monkeypatch.setattr(suite_module, "_WORKERS", ["the family's process"])
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    previous = suite_module._install_termination_handlers()
    try:
        with pytest.raises(suite_module._Terminated) as stopped:
            suite_module._on_termination(signal.SIGINT, None)
        assert stopped.value.signum == signal.SIGINT and stopped.value.name == "SIGINT"
        assert killed == ["the family's process"]
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    monkeypatch.setattr(suite_module, "_modules", lambda: {"lora": SimpleNamespace(run=lambda suite: None)})
    assert suite_module.main(["--in-process", "--only", "lora", "--device", "cpu", "--out-dir", str(tmp_path),
                              "--name", "h", "--no-plot"]) == 0
    assert {number: signal.getsignal(number) for number in before} == before


def test_a_killed_family_process_takes_its_children_with_it(tmp_path, monkeypatch):
    """A family's process is killed with its whole process group: a child it started (a demo, a
    distributed rank) does not outlive it."""
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "print('started', flush=True)\ntime.sleep(60)\n")
    from types import SimpleNamespace

    from benchmarks import suite as suite_module

    monkeypatch.setattr(suite_module, "_worker_command", lambda *a, **k: [sys.executable, "-c", script])
    status = suite_module._run_family_process(SimpleNamespace(deadline=None), "model",
                                              SimpleNamespace(out_dir=str(tmp_path)), device="cpu", stem="run",
                                              per_call=1.0, providers=None, compile_baselines=False, grace=1.0,
                                              idle=5)
    child = int(pid_file.read_text())
    try:
        assert "without output" in status["outcome"], status
        waited = time.monotonic() + 10
        while _alive(child) and time.monotonic() < waited:
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_suite_stopped_by_a_signal_starts_no_further_family(tmp_path, monkeypatch, capsys):
    """SIGTERM/SIGINT during a family's process: that family's outcome says so, no later family is
    started, and the run exits with 128 + the signal's number."""
    from types import SimpleNamespace

    from benchmarks import suite as suite_module

    started = []

    def run_family_process(suite, family, args, **kwargs):
        started.append(family)
        raise suite_module._Terminated(signal.SIGTERM)

    monkeypatch.setattr(suite_module, "_run_family_process", run_family_process)
    monkeypatch.setattr(suite_module, "_modules",
                        lambda: {name: SimpleNamespace(run=None) for name in ("lora", "model")})
    assert suite_module.main(["--only", "lora", "--only", "model", "--device", "cpu", "--out-dir", str(tmp_path),
                              "--name", "t", "--no-plot"]) == 128 + signal.SIGTERM
    assert started == ["lora"]
    run = json.loads((tmp_path / "t.json").read_text())["run"]
    assert run["families"]["lora"]["outcome"] == "was killed: the suite itself got SIGTERM" and "model" not in \
        run["families"]
    assert "SIGTERM: the suite stops" in capsys.readouterr().out


def test_a_hung_family_is_killed_at_the_budget_plus_grace(tmp_path):
    # On the CPU (_bench): on a GPU family device would run first, and its start-up alone takes the 3 s budget.
    payload, stdout = _bench(["--only", "lora", "--only", "hypergraph", "--time-budget", "3", "--family-grace", "2",
                              "--family-idle-timeout", "0"], tmp_path, "budget",
                             env_extra={"ACE_BENCH_FAULT": "lora:hang"})
    families = payload["run"]["families"]
    assert "2 s after the run's time budget" in families["lora"]["outcome"], families
    assert families["lora"]["seconds"] < 30
    assert "hypergraph" not in families  # no time left: skipped, never started
    assert "family hypergraph: skipped (the run's time budget is spent)" in payload["run"]["skipped"]


def test_family_state_passes_through_the_json_file(tmp_path):
    from benchmarks.harness import Measurement
    from benchmarks.suite import Suite

    first = Suite(device=torch.device("cpu"), quick=True, json_path=str(tmp_path / "s.json"), png_path=None,
                  time_budget_s=None, max_seconds_per_call=0.1, providers=["torch"], log=lambda _: None)
    first.calibration.update(bf16_matmul_tflops=789.5, copy_gbps=4100.0)
    first.skip("x", "why")
    first.family_status["lora"] = {"outcome": "ok", "rc": 0, "seconds": 1.0}
    first.add_plain_row(family="device", op="device_matmul", shape="s", dtype=torch.bfloat16, provider="torch",
                        measurement=Measurement(1.0, None, 20, (0.9, 1.4), iqr_ms=0.1, wall_ms=2.0, wall_calls=50),
                        metrics={"tflops": 789.5}, mode="matmul")
    second = Suite(device=torch.device("cpu"), quick=True, json_path=None, png_path=None, time_budget_s=None,
                   max_seconds_per_call=0.1, providers=["torch"], log=lambda _: None)
    second.load_state(harness.read_payload(str(tmp_path / "s.json")))
    assert second.calibration == first.calibration and second.skipped == ["x: skipped (why)"]
    assert second.family_status == first.family_status
    assert [r.to_json() for r in second.rows] == [r.to_json() for r in first.rows]
    row = second.rows[0]
    assert row.wall_ms == 2.0 and row.metrics["launch_bound"] is True and row.metrics["wall_calls"] == 50
    assert row.metrics["min_ms"] == 0.9 and row.metrics["max_ms"] == 1.4 and row.metrics["iqr_ms"] == 0.1
    # Each configuration's rows are in the file as soon as they are added (a run cut short keeps them).
    first.add_rows(family="lora", op="lora_qkv", shape="s", dtype=torch.float32,
                   ours={"torch": (Measurement(1.0, 1.0, 3), {})},
                   baselines={"reference": (Measurement(2.0, 1.0, 3), {})})
    assert [(r["provider"], r["baseline"]) for r in harness.load_rows(str(tmp_path / "s.json"))[1:]] == [
        ("reference", None), ("torch", "reference")]


def test_the_launch_bound_note_names_each_measurement_once(tmp_path, monkeypatch, capsys):
    """A provider's measurement has a row per baseline (three on a GPU for lora_qkv): the note under
    the table named a launch-bound provider once per row, as if each were another measurement."""
    from types import SimpleNamespace

    from benchmarks import suite as suite_module
    from benchmarks.harness import Measurement

    def run(suite):
        bound, fine = (Measurement(1.0, None, 20, (0.9, 1.4), wall_ms=wall, wall_calls=50) for wall in (2.0, 1.1))
        suite.add_rows(family="lora", op="lora_qkv", shape="M=1", dtype=torch.float32, ours={"triton": (bound, {})},
                       baselines={name: (fine, {}) for name in ("reference", "peft-style", "frozen-base")})

    monkeypatch.setattr(suite_module, "_modules", lambda: {"lora": SimpleNamespace(run=run)})
    assert suite_module.main(["--only", "lora", "--in-process", "--device", "cpu", "--out-dir", str(tmp_path),
                              "--name", "r", "--no-plot"]) == 0
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("launch-bound"))
    assert note.endswith("may flatter): lora_qkv M=1 triton"), note


def test_a_family_process_keeps_the_runs_date_and_commit(tmp_path, monkeypatch):
    """A family's process takes the run's environment (one date and sha for every row) from the file
    the suite wrote before it, not a probe of its own: its rows and the file keep the run's."""
    from types import SimpleNamespace

    from benchmarks import suite as suite_module
    from benchmarks.harness import Measurement

    monkeypatch.delenv("ACE_BENCH_FAULT", raising=False)
    path = str(tmp_path / "run.json")
    env = harness.Environment.probe(torch.device("cpu"))
    env.date, env.git_sha = "2026-01-02T03:04:05+00:00", "the-run's-sha"
    harness.write_json(path, env, [], extra={})

    def run(suite):
        suite.add_plain_row(family="lora", op="x", shape="s", dtype="float32", provider="torch",
                            measurement=Measurement(1.0, 1.0, 3), metrics={}, mode="fwd")

    monkeypatch.setattr(suite_module, "_modules", lambda: {"lora": SimpleNamespace(run=run)})
    assert suite_module._worker(SimpleNamespace(worker="lora", quick=True, tier="all"), device=torch.device("cpu"),
                                json_path=path, time_budget=None, per_call=0.1, providers=["torch"],
                                compile_baselines=False) == 0
    payload = harness.read_payload(path)
    assert (payload["environment"]["date"], payload["environment"]["git_sha"]) == (env.date, env.git_sha)
    assert [(r["date"], r["git_sha"]) for r in payload["rows"]] == [(env.date, env.git_sha)]


def test_non_finite_numbers_of_an_earlier_family_read_back_as_floats(tmp_path):
    """JSON holds inf and NaN as strings; the next family's process reads them back as the floats
    they were: the B=1,000,000 probe compares the B=65,536 blocked row's error with a bound, and
    an infinite error (non-finite outputs) made it raise TypeError, losing the probe."""
    from benchmarks import bench_contrastive
    from benchmarks.harness import Measurement
    from benchmarks.suite import Suite

    def suite(json_path=None):
        return Suite(device=torch.device("cpu"), quick=True, json_path=json_path, png_path=None, time_budget_s=None,
                     max_seconds_per_call=0.1, providers=["torch"], log=lambda _: None)

    first = suite(str(tmp_path / "s.json"))
    for provider, ms, error in (("triton", 180.0, 1e-3), (bench_contrastive.BLOCKED, 70.0, float("inf"))):
        first.add_plain_row(family="contrastive", op="label_guided_infonce", shape="B=65536 D=512 labels",
                            dtype=torch.bfloat16, provider=provider, measurement=Measurement(ms, 10.0, 3),
                            metrics={"rel_err_vs_fp32_chunked": error,
                                     "parts": {"loss": float("nan"), "floor": float("-inf")},
                                     "note": "inf and nan as text stay text"}, mode="fwd+bwd")
    assert '"inf"' in (tmp_path / "s.json").read_text()
    second = suite()
    second.load_state(harness.read_payload(str(tmp_path / "s.json")))
    metrics = second.rows[1].metrics
    assert metrics["rel_err_vs_fp32_chunked"] == float("inf") and math.isnan(metrics["parts"]["loss"])
    assert metrics["parts"]["floor"] == float("-inf")  # the sign kept
    assert metrics["note"] == "inf and nan as text stay text" and second.rows[1].shape == "B=65536 D=512 labels"
    assert not bench_contrastive._blocked_was_faster(second)  # wrong outputs: never taken, and no TypeError
    assert bench_contrastive._probe_estimate_s(second, 131072, 512) == pytest.approx(0.180 * 4)


def test_budget_arithmetic():
    from benchmarks.harness import cuda_rep_ms, wall_calls_for
    from benchmarks.suite import budget_for_hard_limit

    # The default call's suite stage with the build and the tests at their caps (gpu_check.sh's header):
    # 540 - (~5 + 120 + ~8 + 100 + ~5) - 21 = ~280 s.
    assert budget_for_hard_limit(280) == (235, 35)
    budget, grace = budget_for_hard_limit(90)  # a short stage: two thirds, not a fixed 45 s that may not fit
    assert budget == pytest.approx(60) and grace == pytest.approx(20)
    for limit in (12, 30, 60, 90, 120, 135, 136, 200, 500):
        budget, grace = budget_for_hard_limit(limit)
        assert 0 < budget < limit and grace > 0 and budget + grace < limit, (limit, budget, grace)
        assert limit - budget - grace >= min(10, (limit - budget) / 2) - 1e-9  # time left for the table
    # A 250 ms step under the 2 s GPU cap keeps 8 timed calls (do_bench truncates rep / estimate).
    for estimate in (240.0, 250.0, 255.0):
        assert int(cuda_rep_ms(estimate, 2.0) / estimate) >= 8
    assert cuda_rep_ms(0.01, 2.0) == pytest.approx(100.005)  # fast calls: about 100 ms of them
    assert wall_calls_for(0.01) == 100 and wall_calls_for(250.0) == 2 and wall_calls_for(10.0) == 20


def test_gpu_check_budget_plan_is_in_the_script():
    text = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh"), encoding="utf-8").read()
    assert "BUDGET=${GPU_CHECK_BUDGET:-540}" in text and "timeout_s=570" in text
    assert "run_stage build 120 " in text and 'run_stage tests "${GPU_CHECK_TESTS_CAP:-100}" ' in text
    assert text.index("-m gpu $common") < text.index('-m "triton and not gpu" $common')
    # The tests in several pytest-xdist processes where the image has it (one took 85 of the 100 s).
    assert 'import xdist' in text and 'TIMEOUT_OPT="$TIMEOUT_OPT -n $WORKERS"' in text
    assert '--hard-deadline "$BENCH_DEADLINE"' in text and "budget_left_s - 60" in text
    assert "~280 s, its budget ~235 s" in text  # the header's arithmetic (test_budget_arithmetic)
    assert "STEM=$(timeout 60 $PY - <<'EOF'" in text  # every python call outside a stage is bounded
    # The build is skipped by the sources' sha256, stored under build/ (git-ignored), not by mtimes.
    assert "STAMP=build/" in text and "-newer" not in text
    assert "git diff --quiet HEAD || echo +dirty" in text and '"$REPO/.git_sha"' in text
    # The sweep's size and time in the header and bench_tuning's doc are the plan's (they said 23
    # configurations, ~70 s, after the candidates had grown to 25): what a session budgets by.
    import re

    from benchmarks import bench_tuning

    configs = sum(len(entry["configs"]) for entry in bench_tuning.sweep_plan())
    found = re.search(r"configuration \((\d+) of them, ~(\d+) s\)", text)
    assert found and int(found.group(1)) == configs, (found and found.group(0), configs)
    assert int(found.group(2)) == round(configs * bench_tuning.SECONDS_PER_CONFIG)
    assert f"), {configs} of them." in bench_tuning.__doc__


def test_git_sha_file_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv("ACE_GIT_SHA", raising=False)
    # A copy of the tree without .git (tmp_path is outside any repository): the .git_sha file.
    assert harness.git_sha(str(tmp_path)) == "unknown" or (tmp_path / ".git").exists()
    (tmp_path / harness.SHA_FILE).write_text("0123abcd+dirty")
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True).returncode != 0:
        assert harness.git_sha(str(tmp_path)) == "0123abcd+dirty"
    monkeypatch.setenv("ACE_GIT_SHA", "from-env")
    assert harness.git_sha(str(tmp_path)) == "from-env"
    monkeypatch.delenv("ACE_GIT_SHA")
    # In the repository the documented command writes what the harness records. Outside one (a
    # copy without .git) git rev-parse fails: skip on its own exit status (the pipeline's is tr's).
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, timeout=60).returncode != 0:
        pytest.skip("no git repository here")
    command = "{ git rev-parse HEAD; git diff --quiet HEAD || echo +dirty; } | tr -d '\\n'"
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout, proc.stderr
    assert harness.git_sha(ROOT) == proc.stdout


def test_dispatch_order_without_orders_writes_nothing(tmp_path):
    from benchmarks import dispatch_order

    row = dict(op="ace_lora_max_batch", shape="s", dtype="bf16", provider="triton", baseline="reference-ops",
               median_ms=10.0)
    payload = {"environment": {"device": "NVIDIA H200", "device_type": "cuda", "git_sha": "x", "date": "d"},
               "rows": [row]}
    results, out = tmp_path / "costly.json", tmp_path / "order.json"
    results.write_text(json.dumps(payload))
    assert dispatch_order.main([str(results), "--out", str(out)]) == 3
    assert not out.exists()


def test_package_files_are_replaced_atomically(tmp_path, monkeypatch):
    """The tools write their package file through a temp file of their own beside it (another
    run's temp file is no concern of theirs), fsynced before it is renamed over the file, the
    directory fsynced after: a write
    that fails midway (a full disk) leaves the old file as it was, and no temp file behind."""
    import errno

    from benchmarks import dispatch_order

    out, results = tmp_path / "order.json", tmp_path / "run.json"
    old = {"about": "x", "by_device": {"Other card": {"lora_qkv": ["torch", "triton"]}}}
    out.write_text(json.dumps(old))
    (tmp_path / "order.json.tmp").write_text("another run's")
    row = dict(op="lora_qkv", shape="M=100", dtype="bfloat16", provider="triton", median_ms=1.0,
               metrics={"rel_err_vs_reference": 1e-3})
    results.write_text(json.dumps({"environment": {"device": "NVIDIA H200", "device_type": "cuda"},
                                   "rows": [row, dict(row, provider="torch", median_ms=2.0)]}))
    before = sorted(p.name for p in tmp_path.iterdir())
    real_fsync, real_replace = os.fsync, os.replace

    def full_disk(fd):  # the temp file written, its blocks refused at fsync (delayed allocation)
        assert os.fstat(fd).st_size > 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    assert dispatch_order.main([str(results), "--out", str(out)]) == 2
    assert json.loads(out.read_text()) == old and sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "order.json.tmp").read_text() == "another run's"
    events = []

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, src, dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert dispatch_order.main([str(results), "--out", str(out)]) == 0
    (_, synced), (_, renamed, src, dst), (_, directory) = events
    assert synced == renamed and os.path.dirname(src) == str(tmp_path) and dst == str(out), events
    assert directory == os.stat(tmp_path).st_ino, events  # then the rename made durable
    assert json.loads(out.read_text())["by_device"]["NVIDIA H200"]["lora_qkv"] == ["triton", "torch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "order.json.tmp").read_text() == "another run's"


def test_chunked_infonce_loss_matches_the_dense_reference():
    g = torch.Generator().manual_seed(16)
    batch = 300
    u = F.normalize(torch.randn(batch, 16, generator=g, dtype=FP64), dim=-1)
    t = F.normalize(torch.randn(batch, 16, generator=g, dtype=FP64), dim=-1)
    s = torch.tensor(20.0, dtype=FP64)
    labels = (torch.rand(batch, 3, generator=g) < 0.3).float()  # many equal rows: the mask matters
    for lab in (labels, None):
        dense = baselines.reference_label_guided_infonce(u, t, s, lab).item()
        chunked = baselines.chunked_infonce_loss(u, t, s, lab, block_rows=64)
        assert chunked == pytest.approx(dense, rel=1e-6)  # fp32 logits, fp64 sums
    with pytest.raises(TimeoutError, match="projected"):
        baselines.chunked_infonce_loss(u, t, s, labels, block_rows=64, max_seconds=0.0)


def test_max_batch_ratio_is_judged_conservatively():
    from benchmarks.bench_model import max_batch_ratio_metrics

    ours = {"max_batch": 3072, "complete": True}
    reference = {"max_batch": 960, "first_oom": 1024, "complete": True}
    metrics = max_batch_ratio_metrics(ours, reference)
    assert metrics["max_batch_ratio"] == pytest.approx(3.0)  # 3072 / 1024, not 3072 / 960 = 3.2
    assert metrics["max_batch_ratio_point"] == pytest.approx(3.2, abs=1e-3)
    capped = max_batch_ratio_metrics(ours, {"max_batch": 1024, "first_oom": None, "complete": True})
    assert capped["max_batch_ratio"] == pytest.approx(3.0)
    partial = max_batch_ratio_metrics(ours, {"max_batch": 960, "first_oom": None, "complete": False})
    assert "max_batch_ratio" not in partial and "max_batch_ratio_unjudged" in partial
    # Not rounded: 12,287 / 4,096 = 2.99976 misses "max batch>=3x" (rounded to 3 places it would meet it).
    short = max_batch_ratio_metrics({"max_batch": 12287, "complete": True},
                                    {"max_batch": 4000, "first_oom": 4096, "complete": True})
    assert short["max_batch_ratio"] == 12287 / 4096


def test_largest_batch_search_reports_the_first_failure():
    from benchmarks.bench_model import _largest_batch

    result = _largest_batch(_fake_step(1000, []), lambda: 2 * 1000 * 10.0 * 2**20, seconds=60, log=lambda _: None)
    assert result["first_oom"] is not None and result["first_oom"] > result["max_batch"]
    assert all(b >= result["first_oom"] for b, outcome, _ in result["tries"] if outcome == "oom")


def test_model_items_are_checked_before_the_model_is_built(monkeypatch):
    from benchmarks import bench_model

    def no_build(suite):
        raise AssertionError("the model was built although no item fits the time left")

    monkeypatch.setattr(bench_model, "_build_model", no_build)
    # 1 s left (quick estimates: build 2 s + each item 3-4 s), read as a constant: a run whose whole budget
    # was 1 s is spent after a pause of that length (a loaded runner), and skips for that reason instead.
    suite = _suite("all", budget=600.0)
    monkeypatch.setattr(suite, "seconds_left", lambda: 1.0)
    bench_model.run(suite)
    skipped = "\n".join(suite.skipped)
    for item in ("ace_lora_train_step", "zero_shot_eval", "peft_lora_train_step"):
        assert f"{item}: skipped (estimated" in skipped, skipped


def test_low_matmul_rate_warning():
    from benchmarks.bench_device import low_rate_warning

    assert "under the 600" in low_rate_warning("NVIDIA H200", 560.0)
    assert low_rate_warning("NVIDIA H200", 691.0) is None  # run 2: a power-limited card, not a throttled one
    assert low_rate_warning("NVIDIA H100 80GB HBM3", 760.0) is None
    assert low_rate_warning("NVIDIA A100-SXM4-80GB", 280.0) is None


def test_measure_frees_after_an_out_of_memory_error():
    x = torch.ones(4, requires_grad=True)

    def fn():
        (x * 2).sum().backward()
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    result = harness.measure(fn, device=torch.device("cpu"), grads=[x], max_seconds=0.1)
    assert result.error.startswith("out of memory") and result.median_ms is None and x.grad is None
    assert harness.is_fatal_cuda_error("CUDA error: an illegal memory access was encountered")
    assert not harness.is_fatal_cuda_error("CUDA out of memory. Tried to allocate 2.00 GiB")


class _StubEvent:
    """torch.cuda.Event with no GPU: every interval is 0.05 ms (the estimate of a 50 us call)."""

    def __init__(self, enable_timing=False):
        pass

    def record(self):
        pass

    def elapsed_time(self, other):
        return 0.05


def test_gpu_timing_path_records_spread_and_wall_time(monkeypatch):
    """harness._time_cuda's bookkeeping, with the CUDA calls and do_bench stubbed (no GPU here)."""
    triton_testing = pytest.importorskip("triton.testing")

    asked = {}

    def do_bench(fn, warmup, rep, grad_to_none=None, return_mode="mean"):
        asked.update(rep=rep, return_mode=return_mode, grads=grad_to_none)
        fn()
        return [0.05, 0.04, 0.06, 0.05, 0.07, 0.05]

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Event", _StubEvent)
    monkeypatch.setattr(triton_testing, "do_bench", do_bench)
    x = torch.ones(2, requires_grad=True)
    timing = harness.time_call(lambda: calls.append(1), device=torch.device("cuda"), grads=[x], max_seconds=2.0,
                               warmup_calls=0)
    assert asked["return_mode"] == "all" and asked["grads"] == [x]
    assert timing.median_ms == pytest.approx(0.05) and timing.runs == 6
    assert timing.spread_ms == (0.04, 0.07) and timing.iqr_ms is not None and timing.iqr_ms > 0
    assert timing.wall_calls == harness.wall_calls_for(0.05) == 100 and timing.wall_ms > 0
    assert len(calls) == 1 + 1 + timing.wall_calls  # the estimate, do_bench's, the back-to-back loop


def test_a_lost_cuda_context_skips_the_rest_of_the_process():
    from benchmarks.harness import Environment
    from benchmarks.suite import Suite

    env = Environment(device="NVIDIA H200", device_type="cuda", torch="t", triton=None, cuda=None, git_sha="g",
                      date="d", python="3", threads=1, load_average=None)
    suite = Suite(device=torch.device("cuda"), quick=True, json_path=None, png_path=None, time_budget_s=None,
                  max_seconds_per_call=0.1, providers=["triton"], log=lambda _: None, environment=env)
    suite.skip("triton", "RuntimeError: out of memory")  # not fatal
    assert suite.cuda_lost is None and suite.include("next", costly=False)
    suite.skip("triton", "RuntimeError: CUDA error: an illegal memory access was encountered")
    assert suite.cuda_lost is not None
    assert not suite.include("later", costly=False)
    assert "CUDA context of this process was lost" in suite.skipped[-1]


# --------------------------------------------------------------------------- faults, signals, budgets

FAULT = "CUDA error: an illegal memory access was encountered"


def _gpu_environment():
    from benchmarks.harness import Environment

    return Environment(device="NVIDIA H200", device_type="cuda", torch="t", triton=None, cuda=None, git_sha="g",
                       date="d", python="3", threads=1, load_average=None)


def _fake_gpu_suite(tmp_path, providers, budget=300.0):
    """A Suite that takes itself for a GPU one (fault handling, per-provider measuring) but runs on
    the CPU; its JSON file is ``tmp_path / "fake.json"``."""
    from benchmarks.suite import Suite

    class FakeGpuSuite(Suite):
        @property
        def is_gpu(self):
            return True

    return FakeGpuSuite(device=torch.device("cpu"), quick=True, json_path=str(tmp_path / "fake.json"),
                        png_path=None, time_budget_s=budget, max_seconds_per_call=0.05, providers=providers,
                        log=lambda _: None, environment=_gpu_environment())


@pytest.mark.parametrize("where", ["ours", "reference"])
def test_a_fault_in_the_largest_batch_search_keeps_the_rows(tmp_path, monkeypatch, where):
    """A fault (illegal memory access) in a search: the rows found so far are written, the CUDA
    context is marked lost, and no cleanup call on the dead context throws them away."""
    from benchmarks import bench_model
    from benchmarks.suite import Suite

    state = {"lost": False}
    searched = []

    def empty_cache():
        if state["lost"]:
            raise RuntimeError(FAULT)

    def try_step(suite, model, batch, provider):
        searched.append(provider)
        # The reference searches on the model as built, ours on its bf16-weights copy; the other
        # one waits on the host.
        assert model is (reference_model if provider is None else ours_model)
        other = ours_model if model is reference_model else reference_model
        assert model.where == torch.device("cuda") and other.where == "cpu"
        if state["lost"]:
            raise RuntimeError(FAULT)
        faulty = (provider is not None) == (where == "ours")
        if faulty and batch > 1000:
            state["lost"] = True
            raise RuntimeError(FAULT)
        return batch <= (4000 if provider is None else 20000), 10.0 * batch / 64, float(batch)

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**30, 141 * 2**30))
    monkeypatch.setattr(bench_model, "_try_step", try_step)

    class Model:
        backend = "auto"
        where = "cuda:0"

        def train(self):
            pass

        def to(self, device):
            self.where = device
            return self

    suite = Suite(device=torch.device("cuda"), quick=False, json_path=str(tmp_path / "mb.json"), png_path=None,
                  time_budget_s=300, max_seconds_per_call=2, providers=["torch", "triton"], log=lambda _: None,
                  environment=_gpu_environment())
    reference_model, ours_model = Model(), Model()
    bench_model._run_max_batch(suite, reference_model, ours_model)  # must not raise
    assert suite.cuda_lost is not None and FAULT in suite.cuda_lost
    rows = {r["provider"]: r for r in json.loads((tmp_path / "mb.json").read_text())["rows"]}
    reference = rows["reference-ops"]["metrics"]
    if where == "reference":
        # Its row is written from what fitted before the fault; ours never starts on a dead context.
        assert set(rows) == {"reference-ops"} and set(searched) == {None}
        assert reference["max_batch"] == 64 and not reference["search_complete"]
        assert reference["search_note"].startswith("fault at B=") and FAULT in reference["search_note"]
        assert reference["tries"][-1][1] == "fault"
    else:
        ours = rows["triton+recompute-layer"]  # the first tried (no B=64 peaks in this run)
        assert reference["max_batch"] > 3000 and reference["search_complete"]
        m = ours["metrics"]
        assert ours["baseline"] == "reference-ops" and m["max_batch"] == 64 and not m["search_complete"]
        assert m["search_note"].startswith("fault at B=") and FAULT in m["search_note"]
        assert "max_batch_ratio" not in m and "max_batch_ratio_lower_bound" in m  # ours is a lower bound
        # No training-step row in this run and no check that could run on these stand-ins: the
        # row says so (None), and its target is left unjudged rather than passed.
        assert m["rel_err_vs_reference-ops"] is None and ours["target_pass"] is not True
        assert "torch" not in searched  # no second backend searched on the dead context
    assert any(FAULT in line for line in suite.skipped)
    assert reference_model.backend == ours_model.backend == "auto"


def test_a_fault_in_one_hypergraph_provider_keeps_the_others(tmp_path, monkeypatch):
    """On a GPU each provider is checked and measured before the next: a fault in triton's check
    keeps the reference's and torch's rows, and skips the providers after it without running them."""
    from benchmarks import bench_hypergraph

    real = ace_kernels.ace_hypergraph
    calls = []

    def op(*args, backend=None, deterministic=True, **kwargs):
        calls.append((backend, deterministic))
        if backend != "torch":
            raise RuntimeError(FAULT)
        return real(*args, backend="torch", **kwargs)

    monkeypatch.setattr(ace_kernels, "ace_hypergraph", op)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: (_ for _ in ()).throw(RuntimeError(FAULT)))
    suite = _fake_gpu_suite(tmp_path, ["torch", "triton", "cuda"])
    bench_hypergraph.run(suite)
    assert suite.cuda_lost is not None
    assert ("triton", True) in calls and ("triton", False) not in calls and ("cuda", True) not in calls
    rows = json.loads((tmp_path / "fake.json").read_text())["rows"]
    assert {(r["provider"], r["baseline"]) for r in rows} == {("reference", None), ("torch", "reference")}
    assert all(r["shape"].endswith("cls_only") for r in rows)  # the full-output configuration never ran
    skipped = "\n".join(suite.skipped)
    assert "triton: skipped (RuntimeError: " + FAULT in skipped
    assert "triton-atomic: skipped (the CUDA context of this process was lost" in skipped
    assert "cuda: skipped (the CUDA context of this process was lost" in skipped


def test_measure_checked_on_the_cpu_checks_first_then_interleaves(tmp_path):
    suite = _suite("all")
    order = []
    x = torch.ones(4, requires_grad=True)

    def step(name):
        return lambda: (order.append(name), (x * 2).sum().backward())

    def failing():
        raise RuntimeError("backend 'cuda' cannot run this")

    measured = suite.measure_checked([("reference", step("reference"), [x])],
                                     [("torch", lambda: order.append("check torch"), step("torch"), [x]),
                                      ("cuda", failing, step("cuda"), [x])])
    assert set(measured) == {"reference", "torch"}
    assert order[0] == "check torch" and "cuda" not in order
    assert any(line.startswith("cuda: skipped (backend 'cuda' cannot run") for line in suite.skipped)


def test_probe_correctness_survives_a_fault(tmp_path):
    from benchmarks.bench_contrastive import _probe_correctness

    class Dead:
        def item(self):
            raise RuntimeError(FAULT)

    suite = _fake_gpu_suite(tmp_path, ["triton"])
    metrics = _probe_correctness(suite, "triton", {"finite": Dead(), "loss": Dead()}, None, None, None, None,
                                 "B=1000000", {})
    assert metrics["finite"] is None and FAULT in metrics["check_note"]
    assert suite.cuda_lost is not None
    again = _probe_correctness(suite, "cuda", {"finite": Dead(), "loss": Dead()}, None, None, None, None,
                               "B=1000000", {})
    assert again["finite"] is None and "context was lost" in again["check_note"]


def test_training_median_of_two_calls_is_their_mean(monkeypatch):
    from benchmarks import bench_training

    times = iter([10.0, 30.0])
    monkeypatch.setattr(bench_training.harness, "peak_memory_mib", lambda fn, device, grads: 5.0)
    monkeypatch.setattr(bench_training.harness, "time_single_call", lambda fn, device, grads: next(times))
    meas = bench_training._measure_chunked(_suite("all"), "x", lambda: None, [], timed_calls=2, one_call=False)
    assert meas.median_ms == pytest.approx(20.0) and meas.runs == 2 and meas.spread_ms == (10.0, 30.0)


def test_hard_deadline_counts_the_start_up():
    from benchmarks.suite import _parse, budget_for_hard_limit, run_budget

    now = round(time.time()) + 3600.0  # a kill time must lie ahead (one already past is refused)
    args = _parse(["--hard-deadline", str(now + 280)])
    assert run_budget(args, now=now) == budget_for_hard_limit(280) == (235, 35)
    # 10 s later (the interpreter and torch starting): 10 s less budget, the same margin.
    assert run_budget(args, now=now + 10) == (225, 35)
    # --hard-limit still works alone, and the nearer of the two kills decides.
    assert run_budget(_parse(["--hard-limit", "280"]), now=now) == (235, 35)
    assert run_budget(_parse(["--hard-limit", "200", "--hard-deadline", str(now + 280)]), now=now) == (155, 35)
    assert run_budget(_parse(["--time-budget", "100", "--hard-deadline", str(now + 280)]), now=now) == (100, 35)
    assert run_budget(_parse([]), now=now) == (None, None)
    # A given --family-grace is kept when it fits in the margin, capped to the margin's when it does not.
    assert run_budget(_parse(["--family-grace", "5", "--hard-limit", "280"]), now=now) == (235, 5)
    assert run_budget(_parse(["--family-grace", "60", "--hard-limit", "280"]), now=now) == (235, 35)


def test_costly_tier_runs_no_device_family():
    from benchmarks.suite import FAMILIES, run_stages

    assert run_stages(list(FAMILIES), is_gpu=True, tier="all")[0] == "device"
    assert run_stages(list(FAMILIES), is_gpu=True, tier="cheap")[0] == "device"
    assert run_stages(list(FAMILIES), is_gpu=True, tier="costly") == list(FAMILIES)
    assert run_stages(["model", "training"], is_gpu=True, tier="all") == ["model", "training"]  # no rates used
    assert run_stages(["hypergraph"], is_gpu=True, tier="all") == ["device", "hypergraph"]
    assert run_stages(list(FAMILIES), is_gpu=False, tier="all") == list(FAMILIES)


def test_a_gpu_run_with_one_card_starts_no_process_for_the_distributed_family(tmp_path, monkeypatch, capsys):
    """Family distributed needs two cards: on the lent one-card machine the suite's own process
    skips it, saying so, instead of starting the family's process (4-5 s of torch and CUDA
    start-up on the H200, device time) only for that process to say it."""
    from benchmarks import suite as suite_module

    started = []

    def run_family_process(suite, family, args, **kwargs):
        started.append(family)
        return {"outcome": "ok", "rc": 0, "seconds": 0.0}

    monkeypatch.setattr(suite_module, "_run_family_process", run_family_process)
    monkeypatch.setattr(suite_module.Suite, "is_gpu", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert suite_module.main(["--only", "distributed", "--only", "tuning", "--out-dir", str(tmp_path), "--name", "r",
                              "--no-plot", "--providers", "torch,triton"]) == 0
    assert started == ["tuning"]
    skipped = json.loads((tmp_path / "r.json").read_text())["run"]["skipped"]
    assert skipped == ["label_guided_infonce group=: skipped (needs 2 or more CUDA devices, one per rank; this "
                       "machine has 1)"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # two cards: its process runs it
    assert suite_module.main(["--only", "distributed", "--out-dir", str(tmp_path), "--name", "r", "--no-plot"]) == 0
    assert started == ["tuning", "distributed"]


def test_families_that_cannot_run_here_get_no_process(tmp_path, monkeypatch):
    """The sweep (family tuning) needs a GPU and provider triton; the B=1,000,000 probe (family
    contrastive_probe) a GPU, triton and no --quick. Where they cannot run, the suite's own process
    skips them with the lines their processes wrote (a torch start-up each for that line: device
    time on a GPU with --quick or --providers torch); where they can, their processes run them."""
    from benchmarks import suite as suite_module

    started = []

    def run_family_process(suite, family, args, **kwargs):
        started.append(family)
        return {"outcome": "ok", "rc": 0, "seconds": 0.0}

    def skipped(*options):
        started.clear()
        assert suite_module.main(["--only", "tuning", "--only", "contrastive_probe", "--device", "cpu", "--out-dir",
                                  str(tmp_path), "--name", "r", "--no-plot", *options]) == 0
        return json.loads((tmp_path / "r.json").read_text())["run"]["skipped"]

    monkeypatch.setattr(suite_module, "_run_family_process", run_family_process)
    probe = "label_guided_infonce B=1000000 D=512 labels: skipped "
    assert skipped() == ["triton_config_sweep: skipped (a sweep of GPU launch configurations: needs a GPU (the "
                         "interpreter's times say nothing about a GPU's))", probe + "(GPU only, not with --quick)"]
    assert started == []
    monkeypatch.setattr(suite_module.Suite, "is_gpu", property(lambda self: True))
    assert skipped("--providers", "torch") == ["triton_config_sweep: skipped (provider triton not selected "
                                               "(--providers))",
                                               probe + "(the probe runs the Triton kernels: not a provider here)"]
    assert started == []
    assert skipped("--quick", "--providers", "torch,triton") == [probe + "(GPU only, not with --quick)"]
    assert started == ["tuning"]
    assert skipped("--providers", "torch,triton") == [] and started == ["tuning", "contrastive_probe"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _workers_writing_to(out_dir) -> list[int]:
    """The live family processes of a suite run with ``--out-dir out_dir`` (a test's own tmp_path)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    command = fh.read().split(b"\0")
            except OSError:
                continue
            if b"--worker" in command and os.fsencode(str(out_dir)) in command:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_the_family_process_dies_with_the_suite(tmp_path, how):
    """gpu_check.sh's `timeout` sends SIGTERM to the suite only (the family's process is in a group
    of its own), then SIGKILL: either way the family's process must not outlive the suite."""
    import re
    import signal
    import time

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["ACE_BENCH_FAULT"] = "lora:hang"
    suite = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--device", "cpu", "--only", "lora",
         "--out-dir", str(tmp_path), "--name", "term", "--no-plot", "--family-idle-timeout", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    worker = None
    lines = []
    watchdog = threading.Timer(180, suite.kill)  # no line for 3 minutes: end the suite, so stdout ends
    watchdog.start()
    try:
        for line in suite.stdout:
            lines.append(line)
            found = re.search(r"ACE_BENCH_FAULT: hang in family lora, pid (\d+)", line)
            if found:
                worker = int(found.group(1))
                break
        watchdog.cancel()
        assert worker is not None and _alive(worker), "".join(lines)
        assert os.getpgid(worker) == worker and os.getsid(worker) == os.getsid(suite.pid)  # own group, same session
        suite.send_signal(getattr(signal, how))
        rest, _ = suite.communicate(timeout=60)
        lines.append(rest)
        waited = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < waited:
            time.sleep(0.1)
        assert not _alive(worker), "".join(lines)
        if how == "SIGTERM":
            assert suite.returncode == 128 + signal.SIGTERM, "".join(lines)
            run = json.loads((tmp_path / "term.json").read_text())["run"]
            assert run["families"]["lora"]["outcome"] == "was killed: the suite itself got SIGTERM", run
            assert "SIGTERM: the suite stops" in "".join(lines)
        else:
            assert suite.returncode == -signal.SIGKILL
    finally:
        watchdog.cancel()
        if suite.poll() is None:
            suite.kill()
            suite.wait()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)
        for pid in _workers_writing_to(tmp_path):  # one the suite did not name (or left behind)
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_an_in_process_run_stopped_by_a_signal_writes_its_rows_and_table(tmp_path, how):
    """--in-process ran with the default handlers: SIGTERM (timeout's) killed it at once, with no table
    and the temporary directory of the item in progress (the demo's, the ranks') left under /tmp, and
    Ctrl-C ended in a KeyboardInterrupt traceback. Now it stops as a run of family processes does: the
    family in progress unwinds (its directory removed), the rows so far and the table are written, and
    the exit status is 128 + the signal's number.

    The family waits in steps of 0.1 s, as a real family returns to the interpreter between its calls:
    Python runs a handler in the main thread only, and the kernel may hand a process's signal to
    another thread (importing torch starts one), so one long sleep could hold the handler for its
    whole length (stop 46's CI: the run was still asleep 60 s after SIGTERM)."""
    script = ("import sys, time\nfrom benchmarks import harness, suite\n"
              "class Sleeper:\n    @staticmethod\n    def run(s):\n"
              "        with harness.temp_dir('demo') as held:\n"
              "            print('holding', held, flush=True)\n"
              "            for _ in range(1200):\n                time.sleep(0.1)\n"
              "suite._modules = lambda: {'lora': Sleeper}\n"
              "raise SystemExit(suite.main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TMPDIR=str(tmp_path))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", script, "--in-process", "--only", "lora", "--quick", "--device",
                             "cpu", "--out-dir", str(out), "--name", "r", "--no-plot"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("holding "):
                held = Path(line.split(" ", 1)[1].strip())
                break
        assert held.is_dir(), "".join(lines)
        proc.send_signal(getattr(signal, how))
        try:
            rest, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
            pytest.fail(f"still running 60 s after {how}; its output:\n{''.join(lines)}{rest}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines) + rest
    assert proc.returncode == 128 + getattr(signal, how), text
    assert f"{how}: the suite stops (the family in progress stops)" in text and "Traceback" not in text, text
    assert "rows: " in text and not held.exists(), text
    assert json.loads((out / "r.json").read_text())["run"]["isolation"] == "in-process"
    assert sorted(p.name for p in out.iterdir()) == ["r.json"]


def test_a_line_that_is_not_utf8_is_passed_on(tmp_path):
    payload, stdout = _bench(["--only", "hypergraph"], tmp_path, "bytes",
                             env_extra={"ACE_BENCH_FAULT": "hypergraph:badbytes"})
    assert payload["run"]["families"]["hypergraph"]["outcome"] == "ok"
    assert "(not UTF-8: \ufffd" in stdout
    assert stdout.index("(not UTF-8") < stdout.index("== hypergraph done")  # the reader kept reading
    assert {r["family"] for r in payload["rows"]} == {"hypergraph"}


def test_gpu_check_build_stamp_ignores_mtimes(tmp_path):
    """gpu_check.sh's sources fingerprint: the same for a fresh copy with new mtimes, different
    when a source changes."""
    import re
    import shutil

    text = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh"), encoding="utf-8").read()
    function = re.search(r"^sources_sha256\(\) \{\n.*?^\}\n", text, re.S | re.M).group(0)

    def fingerprint(tree):
        proc = subprocess.run(["bash", "-c", function + "sources_sha256"], cwd=tree, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and len(proc.stdout.strip()) == 64, proc.stderr
        return proc.stdout.strip()

    first, second = tmp_path / "a", tmp_path / "b"
    for tree in (first, second):
        shutil.copytree(os.path.join(ROOT, "csrc"), tree / "csrc")  # copytree: fresh mtimes
        shutil.copy(os.path.join(ROOT, "setup.py"), tree / "setup.py")
    os.utime(second / "setup.py", (1, 1))
    assert fingerprint(first) == fingerprint(second)
    with open(second / "setup.py", "a", encoding="utf-8") as fh:
        fh.write("\n# changed\n")
    assert fingerprint(first) != fingerprint(second)
    assert ".sources.sha256" in text and "build/" in open(os.path.join(ROOT, ".gitignore")).read().split()


def test_gpu_check_stage_skip_says_why():
    """A stage skipped for its own cap (GPU_CHECK_TESTS_CAP=0) says so; it said "only N s left"
    with most of the budget still there. A stage skipped for want of time still says that."""
    import re

    text = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh"), encoding="utf-8").read()
    function = re.search(r"^run_stage\(\) \{\n.*?^\}\n", text, re.S | re.M).group(0)
    helpers = "say() { echo \"$*\"; }; min() { echo $(($1 < $2 ? $1 : $2)); }; RESERVE=20; "

    def skip_line(left_s, cap_s):
        script = helpers + f"left() {{ echo {left_s}; }}; " + function + f"run_stage tests {cap_s} /dev/null true"
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 124, (proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout.strip()

    assert skip_line(500, 0) == "stage tests: SKIPPED (its cap is 0 s)"
    assert skip_line(25, 100) == "stage tests: SKIPPED (only 25 s left)"


def test_gpu_check_failed_build_removes_the_older_extension(tmp_path):
    """A failed build must not leave an older build's module to load: the tests and the suite
    would run kernels built from other sources. gpu_check.sh in a minimal tree (a setup.py that
    fails, a stand-in module from an earlier build) removes it and says so."""
    import shutil
    import sysconfig

    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "benchmarks", "gpu_check.sh"), tree / "benchmarks" / "gpu_check.sh")
    (tree / "csrc").mkdir()
    (tree / "csrc" / "k.cu").write_text("// a source\n")
    (tree / "setup.py").write_text("raise SystemExit(1)\n")
    (tree / "ace_kernels").mkdir()
    old = tree / "ace_kernels" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    old.write_bytes(b"an earlier build")
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), GPU_CHECK_FORCE_BUILD="1",
               GPU_CHECK_SKIP_TESTS="1", GPU_CHECK_BUDGET="60", CUDA_HOME=str(tmp_path / "no-cuda"))
    proc = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=170)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "stage build: FAILED" in log, proc.stdout + proc.stderr
    assert not old.exists() and f"removed ace_kernels/{old.name}" in log, log


# A stand-in for `python -m benchmarks` in a minimal tree: it records its arguments (outside $OUT)
# and leaves a stray file in its --out-dir, as a write cut short leaves its temp file.
_FAKE_SUITE = """import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SUITE_ARGV"], "w") as fh:
    json.dump(args, fh)
with open(os.environ["FAKE_SUITE_ARGV"] + ".pythonpath", "w") as fh:
    fh.write(os.environ.get("PYTHONPATH", ""))
open(os.path.join(args[args.index("--out-dir") + 1], ".stray.tmp"), "w").close()
"""


def _gpu_check_tree(tmp_path):
    """A tree holding gpu_check.sh and the fake suite only: every other stage fails at once."""
    import shutil

    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "benchmarks", "gpu_check.sh"), tree / "benchmarks" / "gpu_check.sh")
    (tree / "benchmarks" / "__init__.py").write_text("")
    (tree / "benchmarks" / "__main__.py").write_text(_FAKE_SUITE)
    return tree


def _run_gpu_check(tmp_path, tree, out, shell="bash", **switches):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), GPU_CHECK_SKIP_BUILD="1", GPU_CHECK_SKIP_TESTS="1",
               FAKE_SUITE_ARGV=str(tmp_path / "argv.json"))
    env.update(switches)
    proc = subprocess.run([shell, str(tree / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=170)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    argv = json.loads((tmp_path / "argv.json").read_text()) if (tmp_path / "argv.json").exists() else None
    return proc, log, argv


def test_gpu_check_sweeps_only_an_out_dir_it_had_to_itself(tmp_path):
    """The sweep at the end (at most 8 files come back) removes what else landed in an $OUT that
    started empty (the lent machine's); in one that held files already (OUT=benchmarks/results,
    OUT=.) it removes nothing of them."""
    tree = _gpu_check_tree(tmp_path)
    fresh = tmp_path / "fresh"
    proc, log, argv = _run_gpu_check(tmp_path, tree, fresh, GPU_CHECK_BUDGET="80")
    assert argv is not None, proc.stdout + proc.stderr
    assert not (fresh / ".stray.tmp").exists() and (fresh / "gpu_check.log").exists(), log

    shared = tmp_path / "shared"
    (shared / "older").mkdir(parents=True)
    (shared / "older" / "run.json").write_text("{}")
    (shared / "notes.txt").write_text("mine")
    proc, log, argv = _run_gpu_check(tmp_path, tree, shared, GPU_CHECK_BUDGET="80")
    assert argv is not None, proc.stdout + proc.stderr
    assert (shared / "notes.txt").read_text() == "mine" and (shared / "older" / "run.json").exists(), log
    assert "held other files before this run" in log, log


def test_gpu_check_budget_fits_one_run_call_and_bad_numbers_stop_it_at_once(tmp_path):
    """One run call lasts 600 s at most and the script needs 30 s above its budget: a larger budget
    (the second call's B = budget_left_s - 60 with 700 s left) is cut to 570 s, so the call is not
    killed before the scorecard, plot and package files. A budget with a decimal part (B computed
    from a float) counts its whole seconds; a value that is no number stops the script before any
    stage (bash arithmetic on it failed, and every stage was skipped with "only  s left")."""
    import re

    tree = _gpu_check_tree(tmp_path)
    proc, log, argv = _run_gpu_check(tmp_path, tree, tmp_path / "a", GPU_CHECK_BUDGET="700", GPU_CHECK_TIER="costly")
    assert argv is not None and "budget 570s" in log, proc.stdout + proc.stderr + log
    limit = int(re.search(r"stage bench: start \(limit (\d+)s\)", log).group(1))
    assert limit <= 570 - 21, log

    (tmp_path / "argv.json").unlink()
    proc, log, argv = _run_gpu_check(tmp_path, tree, tmp_path / "b", GPU_CHECK_BUDGET="252.6")
    assert argv is not None and "budget 252s" in log and "stage bench: start" in log, proc.stderr + log
    assert "error" not in proc.stderr, proc.stderr

    for switch, value in (("GPU_CHECK_BUDGET", "300s"), ("GPU_CHECK_TESTS_CAP", "1m"), ("GPU_CHECK_MEMCHECK_CAP", "-5"),
                          ("GPU_CHECK_TEST_WORKERS", "four")):
        (tmp_path / "argv.json").unlink(missing_ok=True)
        out = tmp_path / f"bad-{switch}"
        proc, log, argv = _run_gpu_check(tmp_path, tree, out, **{switch: value})
        assert proc.returncode == 2 and argv is None, (switch, proc.stdout + proc.stderr)
        assert f"{switch}={value}: expected" in log and "stage " not in log, log


def test_gpu_check_profile_stage_output_and_its_pointer_are_in_the_main_log(tmp_path):
    """GPU_CHECK_PROFILE=1: the profiler stage's output is in gpu_check.log (no file of its own comes
    back), and a profile that fails or times out points there; it said 'see profile.log', a file
    the script had already deleted."""
    tree = _gpu_check_tree(tmp_path)  # no benchmarks/profile_ops.py: the stage fails at once
    out = tmp_path / "out"
    proc, log, argv = _run_gpu_check(tmp_path, tree, out, GPU_CHECK_BUDGET="80", GPU_CHECK_PROFILE="1")
    assert argv is not None, proc.stdout + proc.stderr + log
    assert "stage profile: FAILED rc 1" in log and "see gpu_check.log" in log, log
    assert "No module named benchmarks.profile_ops" in log and "profile.log" not in log, log
    assert "profile.log" not in os.listdir(out)


def test_gpu_check_memcheck_stage_runs_the_gpu_tests_under_compute_sanitizer_or_says_why_not(tmp_path):
    """GPU_CHECK_MEMCHECK=1: pytest -m gpu of the op files under compute-sanitizer's memcheck (from
    PATH, else $CUDA_HOME/bin) with torch's caching allocator off; the sanitizer's summary and a
    failure in gpu_check.log; without a sanitizer the stage is skipped, saying so, and the suite runs."""
    tree = _gpu_check_tree(tmp_path)
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    sanitizer = cuda / "bin" / "compute-sanitizer"
    sanitizer.write_text("#!/bin/sh\n"
                         f"printf '%s\\n' \"$PYTORCH_NO_CUDA_MEMORY_CACHING\" \"$@\" > {tmp_path / 'sanitized'}\n"
                         "echo '========= Invalid __global__ read of size 4 bytes'\n"
                         "echo '========= ERROR SUMMARY: 1 error'\nexit 1\n")
    sanitizer.chmod(0o755)
    out = tmp_path / "out"
    proc, log, argv = _run_gpu_check(tmp_path, tree, out, GPU_CHECK_BUDGET="80", GPU_CHECK_MEMCHECK="1",
                                     GPU_CHECK_MEMCHECK_CAP="30", CUDA_HOME=str(cuda))
    assert argv is not None, proc.stdout + proc.stderr + log  # the suite ran after it
    said = (tmp_path / "sanitized").read_text().splitlines()
    assert said[0] == "1" and said[1:5] == ["--tool", "memcheck", "--target-processes", "all"], said
    assert said[said.index(sys.executable) + 1:] == ["-m", "pytest", "tests/test_hypergraph.py", "tests/test_lora.py",
                                                     "tests/test_contrastive.py", "-m", "gpu", "-v", "-rfEs",
                                                     "-p", "no:cacheprovider"], said
    assert "stage memcheck: FAILED rc 1" in log and "see tests.log" in log, log
    assert "========= ERROR SUMMARY: 1 error" in log and "========= Invalid __global__ read" in log, log
    assert "========= ERROR SUMMARY: 1 error" in (out / "tests.log").read_text()

    sanitizer.unlink()
    proc, log, argv = _run_gpu_check(tmp_path, tree, tmp_path / "bare", GPU_CHECK_BUDGET="80", GPU_CHECK_MEMCHECK="1",
                                     CUDA_HOME=str(cuda))
    assert argv is not None, proc.stdout + proc.stderr + log
    assert f"stage memcheck: skipped (no compute-sanitizer on PATH or in {cuda}/bin)" in log, log


def test_gpu_check_refuses_an_unknown_family_or_tier_before_any_stage(tmp_path):
    """A family or tier the suite does not know stopped the suite with argparse's error, after the
    build and the tests had taken their ~220 s: the run's results were lost. The script checks
    them first (against the suite's own lists) and stops at once; commas between families count
    as the spaces the header asks for."""
    import re

    from benchmarks.suite import FAMILIES, TIERS

    text = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh"), encoding="utf-8").read()
    assert tuple(re.search(r'^FAMILIES="([^"]*)"', text, re.M).group(1).split()) == FAMILIES
    assert tuple(re.search(r'^TIERS="([^"]*)"', text, re.M).group(1).split()) == TIERS
    tree = _gpu_check_tree(tmp_path)
    for switch, value, named in (("GPU_CHECK_ONLY", "lora probe", "'probe'"), ("GPU_CHECK_TIER", "Costly", "'Costly'")):
        out = tmp_path / f"bad-{switch}"
        proc, log, argv = _run_gpu_check(tmp_path, tree, out, **{switch: value})
        assert proc.returncode == 2 and argv is None, (switch, proc.stdout + proc.stderr)
        assert f"{switch}={value}: expected" in log and named in log and "stage " not in log, log
    proc, log, argv = _run_gpu_check(tmp_path, tree, tmp_path / "commas", GPU_CHECK_BUDGET="80",
                                     GPU_CHECK_ONLY="lora,hypergraph")
    assert argv is not None, proc.stdout + proc.stderr + log
    assert argv[argv.index("--only"):argv.index("--only") + 4] == ["--only", "lora", "--only", "hypergraph"], argv


def test_gpu_check_installs_each_carried_wheel_on_its_own(tmp_path):
    """One wheel pip refuses (corrupt, or built for another platform) cost every carried wheel
    (one pip call for all: open_clip, Inf-CL and their imports lost together). Each is installed
    on its own: the others still land on the run's PYTHONPATH, and the log names the refused one."""
    import zipfile

    tree = _gpu_check_tree(tmp_path)
    (tree / ".whl").mkdir()
    files = {"goodpkg/__init__.py": "X = 1\n",
             "goodpkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: goodpkg\nVersion: 1.0\n",
             "goodpkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            "Tag: py3-none-any\n"}
    record = "goodpkg-1.0.dist-info/RECORD"
    files[record] = "".join(f"{name},,\n" for name in [*files, record])
    with zipfile.ZipFile(tree / ".whl" / "goodpkg-1.0-py3-none-any.whl", "w") as wheel:
        for name, content in files.items():
            wheel.writestr(name, content)
    (tree / ".whl" / "aaa_broken-1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    site = tmp_path / "site"
    proc, log, argv = _run_gpu_check(tmp_path, tree, tmp_path / "out", GPU_CHECK_BUDGET="120",
                                     GPU_CHECK_SITE=str(site))
    assert argv is not None, proc.stdout + proc.stderr + log
    assert (site / "goodpkg" / "__init__.py").exists(), log
    assert "aaa_broken-1.0-py3-none-any.whl: not installed" in log and "stage wheels: FAILED" in log, log
    pythonpath = (tmp_path / "argv.json.pythonpath").read_text().split(os.pathsep)
    assert pythonpath[0] == str(site), pythonpath


def test_gpu_check_names_a_quick_run_as_the_suite_does(tmp_path):
    """A --quick run's files end in -quick (benchmarks/results/README.md; .gitignore keeps them out
    of the results): GPU_CHECK_QUICK=1 named them as a full run of that day, whose files a commit of
    the quick run's would replace."""
    tree = _gpu_check_tree(tmp_path)
    proc, log, argv = _run_gpu_check(tmp_path, tree, tmp_path / "out", GPU_CHECK_BUDGET="80", GPU_CHECK_QUICK="1",
                                     GPU_CHECK_TIER="costly")
    assert argv is not None, proc.stdout + proc.stderr + log
    assert "--quick" in argv and argv[argv.index("--name") + 1].endswith("-quick-costly"), argv


def _fake_nvidia_smi(tmp_path, cards: str) -> str:
    """A directory for PATH whose nvidia-smi answers gpu_check.sh's card query with ``cards`` (its CSV
    lines: index, uuid, name, MIG mode) and any other query with one line."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "cards.csv").write_text(cards)
    script = bin_dir / "nvidia-smi"
    script.write_text('#!/bin/sh\ncase "$*" in *index,uuid,name*) cat "$(dirname "$0")/cards.csv" ;; '
                      '*) echo "a fake card" ;; esac\n')
    script.chmod(0o755)
    return str(bin_dir)


def test_gpu_check_names_its_files_as_device_slug_without_python(tmp_path, monkeypatch):
    """The result files' stem (<device>-<date>) was named by a Python process that imported torch: 3-4 s
    of the lent card's time. On a card nvidia-smi names for certain the script names it itself, as
    harness.device_slug does; where it cannot (no card, MIG, two models, every card hidden) Python names it."""
    import datetime
    import re

    # No Python start names the stem of a card nvidia-smi knows (the tree's own device_slug would say
    # "python-named"), and Python still names it where nvidia-smi cannot (here a MIG mode on).
    h200 = "0, GPU-1b2c, NVIDIA H200, [N/A]\n"
    tree = _gpu_check_tree(tmp_path)
    (tree / "benchmarks" / "harness.py").write_text("def device_slug(device):\n    return 'python-named'\n")
    for cards, stem in ((h200, "nvidia-h200"), ("0, GPU-1b2c, NVIDIA H200, Enabled\n", "python-named")):
        dates = [datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")]
        proc, log, argv = _run_gpu_check(tmp_path, tree, tmp_path / f"out-{stem}", GPU_CHECK_BUDGET="80",
                                         PATH=_fake_nvidia_smi(tmp_path, cards) + os.pathsep + os.environ["PATH"])
        dates.append(datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))  # a run across midnight
        assert argv is not None, proc.stdout + proc.stderr + log
        assert argv[argv.index("--name") + 1] in {f"{stem}-{date}" for date in dates}, argv

    # The script's own functions: slug as device_slug, card_name where it is certain.
    text = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh"), encoding="utf-8").read()
    functions = "".join(re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", text, re.S | re.M).group(0)
                        for name in ("slug", "card_name"))

    def bash(command, **env):
        proc = subprocess.run(["bash", "-c", functions + command], env=dict(os.environ, **env), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.rstrip("\n")

    for name in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "Tesla V100-SXM2-16GB", "  --Odd__Card!! (rev 2) ", "???",
                 "NVIDIA H200 (" + "x" * 80 + ")", "a" * 59 + " b", "X" * 100):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bash(f"slug {shlex.quote(name)}") == harness.device_slug(torch.device("cuda")), name
    for cards, visible, named in ((h200, None, "NVIDIA H200"), (h200, "GPU-1b", "NVIDIA H200"),
                                  (h200, "0,1", "NVIDIA H200"), (h200, "", ""), (h200, "1", ""), (h200, "-1", ""),
                                  ("0, GPU-1b2c, NVIDIA H200, Enabled\n", None, ""),
                                  (h200 + "1, GPU-9f, NVIDIA H100 80GB HBM3, Disabled\n", None, ""),
                                  (h200 + "1, GPU-9f, NVIDIA H200, Disabled\n", "1", "NVIDIA H200"), ("", None, "")):
        env = {"PATH": _fake_nvidia_smi(tmp_path, cards) + os.pathsep + os.environ["PATH"]}
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        assert bash("card_name", **env) == named, (cards, visible)


def test_gpu_check_run_by_sh_runs_under_bash(tmp_path):
    """`sh benchmarks/gpu_check.sh` (dash on Debian) stopped at the first bash-only line, after
    some stages had run and before the suite: the script runs itself again under bash."""
    tree = _gpu_check_tree(tmp_path)
    proc, log, argv = _run_gpu_check(tmp_path, tree, tmp_path / "out", shell="sh", GPU_CHECK_BUDGET="80",
                                     GPU_CHECK_ONLY="lora")
    assert argv is not None and "stage bench: start" in log, proc.stdout + proc.stderr + log
    assert "Syntax error" not in proc.stderr, proc.stderr


def test_profile_ops_reports_each_op(tmp_path):
    """benchmarks/profile_ops.py (a diagnosis aid for GPU runs) on tiny shapes: a report per op
    with the step time and the profiler's table, written to --out."""
    from benchmarks import profile_ops

    # The CPU's plan (without --device the tool takes the GPU where there is one).
    out = tmp_path / "profile.txt"
    assert profile_ops.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    for label in ("== ace_hypergraph B=4 N=17 D=40 k=3 h=8 cls_only", "== ace_hypergraph B=4 N=17 D=40 k=3 h=8 full",
                  "== lora_qkv M=74 K=96", "== label_guided_infonce B=150 D=64 labels, backend auto"):
        assert label in text, text[:2000]
    # On a CPU each step runs once, with backend "auto" (the torch loss: no blocked strategy, once labelled
    # "(blocked strategy)" on a second run of the same loss); on a GPU once per listed backend.
    assert "failed" not in text and "blocked" not in text and text.count("median of 10") == 4
    plan = profile_ops._plan(["lora", "hypergraph", "contrastive"], torch.device("cuda"))
    assert [(f.__name__, b) for f, b in plan] == [
        ("_lora_step", "triton"), ("_lora_step", "torch"), ("_hypergraph_step", "triton"), ("_hypergraph_step", "cuda"),
        ("_hypergraph_full_step", "triton"), ("_hypergraph_full_step", "cuda"), ("_infonce_step", "triton"),
        ("_infonce_blocked_step", "triton")]


@pytest.mark.parametrize("value, gpus, fragment", [
    ("gpu", 0, "argument --device: expected cpu, cuda or cuda:N, got 'gpu'"),
    ("cuda", 0, "argument --device: 'cuda' asked for, but no CUDA GPU is visible"),
    ("cuda:1", 1, "argument --device: 'cuda:1' asked for, but only 1 GPU(s) are visible"),
])
def test_profile_ops_refuses_a_device_it_cannot_use(monkeypatch, capsys, value, gpus, fragment):
    """--device as the suite's: another name, or a GPU that is not here, stops the tool before it profiles
    anything (argparse's exit status 2, the argument named)."""
    from benchmarks import profile_ops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(profile_ops, "profile", lambda *args, **kwargs: pytest.fail("profiled"))
    with pytest.raises(SystemExit) as exit_info:
        profile_ops.main(["--quick", "--device", value])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_profile_ops_profiles_on_the_device_named(monkeypatch):
    """--device picks the plan's device and dtype: cpu (fp32, each step once with "auto") even where a GPU is
    visible; no --device takes the GPU there (bf16, every listed backend)."""
    from benchmarks import profile_ops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    seen = []
    monkeypatch.setattr(profile_ops, "profile",
                        lambda factory, backend, device, dtype, quick: seen.append((backend, str(device), dtype)) or "")
    assert profile_ops.main(["--quick", "--only", "lora", "--device", "cpu"]) == 0
    assert seen == [("auto", "cpu", torch.float32)]
    seen.clear()
    assert profile_ops.main(["--quick", "--only", "lora"]) == 0
    assert seen == [("triton", "cuda", torch.bfloat16), ("torch", "cuda", torch.bfloat16)]


def test_profile_ops_times_ten_steps_after_three_warm_ups_and_profiles_one():
    """profile(): 3 warm-up steps, the 10 timed ones its line reports the median of, then one step
    under the profiler."""
    from benchmarks import profile_ops

    calls = []

    def factory(device, dtype, backend, quick):
        return "toy step", lambda: calls.append(torch.ones(2).sum())

    text = profile_ops.profile(factory, "auto", torch.device("cpu"), torch.float32)
    assert len(calls) == 3 + 10 + 1
    assert text.startswith("== toy step, backend auto (torch.float32, cpu): step ") and "median of 10 (min " in text


def test_profile_ops_reports_the_median_and_the_fastest_of_its_timed_steps(monkeypatch):
    """The line's two times, on profile_ops' own clock made to read set step times (ms): the three warm-ups
    (100 ms each, left out), the ten timed steps (median 5.5, mean 7.5, fastest 1) and the profiled one (left out)."""
    from types import SimpleNamespace

    from benchmarks import profile_ops

    durations = iter([100.0] * 3 + [5.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0, 30.0] + [100.0])
    now = [0.0]
    monkeypatch.setattr(profile_ops, "time", SimpleNamespace(perf_counter=lambda: now[0] / 1e3))

    def factory(device, dtype, backend, quick):
        def step():
            now[0] += next(durations)
        return "toy step", step

    text = profile_ops.profile(factory, "auto", torch.device("cpu"), torch.float32)
    assert text.startswith("== toy step, backend auto (torch.float32, cpu): step 5.500 ms median of 10 (min 1.000); "
                           "0 kernels launched in one step\n"), text.splitlines()[0]


@pytest.mark.triton
@pytest.mark.interpreter
def test_contrastive_times_the_blocked_strategy_beside_triton(tmp_path, monkeypatch):
    """On a GPU the labelled shapes also time the Triton kernels with the blocked strategy forced
    (``triton+blocked``): checked against the same reference. Here a GPU suite faked on the CPU,
    fp16 (the interpreter's bf16 is wrong), quick shapes, which judge no target: that it is held
    to triton's targets is test_the_families_targets_in_a_full_gpu_run's."""
    from ace_kernels import contrastive
    from benchmarks import bench_contrastive

    calls = []
    real = contrastive._grad_blocked

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(contrastive, "_grad_blocked", spy)
    # The labelled quick shape only: the plain CLIP one times no blocked row.
    labelled = [c for c in bench_contrastive._configs(types.SimpleNamespace(quick=True)) if c["labeled"]]
    monkeypatch.setattr(bench_contrastive, "_configs", lambda suite: labelled)
    suite = _fake_gpu_suite(tmp_path, ["triton"])
    monkeypatch.setattr(type(suite), "dtype", lambda self: torch.float16)
    bench_contrastive.run(suite)
    rows = json.loads((tmp_path / "fake.json").read_text())["rows"]
    blocked = [r for r in rows if r["provider"] == bench_contrastive.BLOCKED]
    # The check calls it twice (one backward, two directions); the timed steps call it again.
    assert [r["shape"] for r in blocked] == ["B=300 D=64 labels"] and len(calls) > 2
    triton = [r for r in rows if r["provider"] == "triton" and r["shape"] == "B=300 D=64 labels"]
    assert [r["baseline"] for r in blocked] == [r["baseline"] for r in triton] == ["reference"]
    # fp16 operands against the dense reference, as triton's row.
    assert blocked[0]["metrics"]["rel_err_vs_reference"] < 1e-2
    assert abs(blocked[0]["metrics"]["rel_err_vs_reference"] - triton[0]["metrics"]["rel_err_vs_reference"]) < 1e-3


def test_contrastive_probe_takes_the_faster_strategy_at_65536(monkeypatch):
    """The B=1,000,000 probe runs the Triton kernels with the blocked strategy when this run timed
    it faster than the default at B=65,536 (its row is then labelled triton+blocked), and sizes
    itself from the faster of the two."""
    from types import SimpleNamespace

    from benchmarks import bench_contrastive

    def suite_with(times, blocked_error=1e-3):
        rows = [SimpleNamespace(op="label_guided_infonce", shape="B=65536 D=512 labels", provider=p, median_ms=ms,
                                metrics={"rel_err_vs_fp32_chunked": blocked_error if p == "triton+blocked" else 1e-3})
                for p, ms in times.items()]
        return SimpleNamespace(rows=rows)

    assert bench_contrastive._blocked_was_faster(suite_with({"triton": 180.0, "triton+blocked": 70.0}))
    assert not bench_contrastive._blocked_was_faster(suite_with({"triton": 60.0, "triton+blocked": 70.0}))
    assert not bench_contrastive._blocked_was_faster(suite_with({"triton": 60.0}))
    # Faster but outside the fp32 check's bound: not taken.
    assert not bench_contrastive._blocked_was_faster(suite_with({"triton": 180.0, "triton+blocked": 70.0}, 0.05))
    # Sized from the faster strategy (one call: B^2 scaling); twice that for blocked (its blocks
    # shrink at B=1M); from the sizing step's time when the run has no row at B=65,536.
    estimate = bench_contrastive._probe_estimate_s(suite_with({"triton": 180.0, "triton+blocked": 70.0}), 131072, 512)
    assert estimate == pytest.approx(0.070 * 4 * 2)
    estimate = bench_contrastive._probe_estimate_s(suite_with({"triton": 60.0, "triton+blocked": 70.0}), 131072, 512)
    assert estimate == pytest.approx(0.060 * 4)
    assert bench_contrastive._probe_estimate_s(suite_with({}), 131072, 512) is None
    assert bench_contrastive._probe_estimate_s(suite_with({}), 131072, 512, 50.0) == pytest.approx(0.050 * 4)
    # The probe step with the blocked label forces the strategy and files its results under it.
    forced = []
    monkeypatch.setattr(bench_contrastive, "blocked_strategy",
                        lambda dtype: (forced.append(dtype), contextlib.nullcontext())[1])
    u = torch.randn(8, 4, requires_grad=True)
    t = torch.randn(8, 4, requires_grad=True)
    s = torch.tensor(10.0, requires_grad=True)
    bench_contrastive._probe_step(u, t, s, None, "torch", [u, t, s], "triton+blocked")()
    assert forced == [torch.float32] and set(bench_contrastive.step_results) == {"triton+blocked"}
    bench_contrastive.step_results.clear()


def test_contrastive_probe_family_is_gpu_only_and_sized_from_this_runs_rows():
    """Family contrastive_probe (the B=1,000,000 probe, after the model and training families):
    skipped with the reason on a CPU; on a GPU sized from this run's B=65,536 row when there is
    one (no sizing step then), and not run without the Triton provider."""
    from types import SimpleNamespace

    from benchmarks import bench_contrastive, bench_probe
    from benchmarks.suite import FAMILIES, _modules

    assert FAMILIES.index("contrastive_probe") > FAMILIES.index("training")
    assert _modules()["contrastive_probe"] is bench_probe and bench_probe.ALL_COSTLY
    cpu = _suite("all")
    bench_probe.run(cpu)
    assert cpu.rows == [] and any("B=1000000" in line and "GPU only" in line for line in cpu.skipped)

    skipped = []
    row = SimpleNamespace(op="label_guided_infonce", shape="B=65536 D=512 labels", provider="triton", median_ms=150.0,
                          metrics={})
    gpu = SimpleNamespace(is_gpu=True, quick=False, providers=["torch", "triton"], rows=[row],
                          skip=lambda what, why: skipped.append(f"{what}: {why}"))
    assert bench_contrastive._size_probe(gpu, None) is True and not skipped
    assert bench_contrastive._probe_estimate_s(gpu, 1_000_000, 512) == pytest.approx(0.150 * (1e6 / 65536) ** 2)
    gpu.providers = ["torch", "cuda"]
    assert bench_contrastive._size_probe(gpu, None) is False and "Triton kernels" in skipped[-1]


@pytest.mark.gpu
def test_one_call_measures_time_and_peak_in_the_same_call():
    from benchmarks import harness

    device = torch.device("cuda")
    calls = []

    def fn():
        calls.append(1)
        torch.empty(64 * 2**20, dtype=torch.uint8, device=device).fill_(1)

    meas = harness.measure(fn, device=device, one_call=True)
    assert meas.error is None and len(calls) == 1 and meas.runs == 1
    assert meas.median_ms > 0 and meas.peak_mib == pytest.approx(64.0, abs=1.0)


def test_single_call_measures_the_peak_then_times_one_more_call():
    """``single_call`` (sizes too large to repeat): the memory call is the warm-up, one more call is
    timed, and the gradients it leaves are cleared."""
    x = torch.ones(1024, requires_grad=True)
    calls = []

    def fn():
        calls.append(x.grad)
        (x * 2.0).sum().backward()

    meas = harness.measure(fn, device=torch.device("cpu"), grads=[x], single_call=True, max_seconds=10.0,
                           min_seconds=1.0, min_reps=5)
    assert meas.error is None and calls == [None, None] and x.grad is None
    assert meas.runs == 1 and meas.median_ms > 0 and meas.spread_ms == (meas.median_ms, meas.median_ms)
    assert meas.peak_mib > 0


def test_training_step_item_runs_ours_on_its_own_model(tmp_path):
    """The training-step item: the reference-ops rows train the model as built, every one of our
    providers the copy that ``_ours_model`` gives (bf16 frozen weights on a GPU). Here, on the
    CPU, a distinct copy stands in for it, and each model's ``loss`` records who called it. The
    checks run in eval mode, in float32, on the model as built: the reference ops and ours."""
    import ace_kernels
    from ace_model import ACELoRA
    from benchmarks import bench_model

    torch.manual_seed(0)
    model = ACELoRA.from_config("tiny")
    ours = copy.deepcopy(model)
    seen = []

    def recording(name, loss):
        def run(*args, **kwargs):
            seen.append((name, ace_kernels.lora_qkv is bench_model.baselines.reference_lora_qkv,
                         (model if name == "built" else ours).training))
            return loss(*args, **kwargs)
        return run

    model.loss = recording("built", model.loss)
    ours.loss = recording("ours", ours.loss)
    suite = _suite("all")
    bench_model._run_ace_lora(suite, model, ours)
    # Training steps: the reference ops on the built model, ours on the copy; the checks (eval
    # mode) run both on the built model, and never touch the copy.
    assert ("built", True, True) in seen and ("ours", False, True) in seen
    assert all(active == (name == "built") for name, active, training in seen if training)
    assert ("built", True, False) in seen and ("built", False, False) in seen
    assert not any(name == "ours" and not training for name, active, training in seen)
    rows = [r for r in suite.rows if r.op == "ace_lora_train_step"]
    assert {r.provider for r in rows} == {"reference-ops", "torch", "torch+recompute-mlp", "torch+recompute-layer"}
    # Each of ours was checked against the reference ops (loss and gradients, eval mode); every row
    # says which frozen weights it trained.
    for row in rows:
        assert row.metrics["frozen_weight_dtype"] == "float32"
        if row.provider != "reference-ops":
            assert row.metrics["rel_err_vs_reference-ops"] < 1e-5, row
            assert "float32" in row.metrics["check_note"]
    assert model.backend == ours.backend == "auto"
    assert model.recompute == ours.recompute == "none"  # switched on for its own rows only
    assert all(p.grad is None for p in model.trainable_parameters() + ours.trainable_parameters())


def test_max_batch_tries_the_smallest_b64_peak_first():
    from types import SimpleNamespace

    from benchmarks.bench_model import max_batch_candidates

    def row(provider, peak, op="ace_lora_train_step"):
        return SimpleNamespace(op=op, provider=provider, peak_mib=peak)

    rows = [row("reference-ops", 9000.0), row("triton", 7000.0), row("triton+recompute-mlp", 5000.0),
            row("triton+recompute-layer", 2000.0), row("cuda", 6900.0), row("cuda+cuda-graph", 100.0),
            row("triton+recompute-mlp", 1.0, op="other")]
    assert max_batch_candidates(["torch", "triton", "cuda"], rows) == [
        "triton+recompute-layer", "triton+recompute-mlp", "cuda", "triton", "cuda+recompute-layer",
        "cuda+recompute-mlp", "torch+recompute-layer", "torch+recompute-mlp", "torch"]
    # Without rows (the training-step item did not run): cuda, triton, torch, the most recompute first.
    assert max_batch_candidates(["triton", "torch"], []) == [
        "triton+recompute-layer", "triton+recompute-mlp", "triton", "torch+recompute-layer", "torch+recompute-mlp",
        "torch"]


def test_a_row_meets_its_targets_only_with_checked_correct_outputs(tmp_path):
    # Speed and memory count only for outputs a check found right: a check error over the dtype's
    # limit (or NaN) fails the row, whatever its speed; a probe that is not finite fails too.
    from benchmarks.harness import Measurement, Target

    suite = _fake_gpu_suite(tmp_path, ["triton"])
    suite.quick = False
    base = Measurement(4.0, 400.0, 5, None)
    goals = [Target("speedup", 2.0, "speedup>=2")]

    def judged(metrics, dtype=torch.bfloat16):
        rows = suite.add_rows(family="contrastive", op="x", shape="s", dtype=dtype,
                              ours={"triton": (Measurement(1.0, 100.0, 5, None), metrics)},
                              baselines={"ref": (base, {})}, targets=lambda provider, baseline: goals)
        return [r for r in rows if r.provider == "triton"][0]

    assert judged({"rel_err_vs_reference": 2e-3}).target_pass is True
    row = judged({"rel_err_vs_reference": 0.5})
    assert row.target_pass is False and "rel_err_vs_reference<=0.03" in row.target
    assert judged({"rel_err_vs_reference": float("nan")}).target_pass is False
    assert judged({"rel_err_vs_reference": 2e-3}, dtype=torch.float32).target_pass is False  # fp32: 1e-4
    assert judged({"finite": False}).target_pass is False
    assert judged({"loss_rel_err_vs_fp32_chunked": 1e-3, "finite": True}).target_pass is True
    assert judged({"loss_rel_err_vs_fp32_chunked": 0.5, "finite": True}).target_pass is False
    assert judged({"rel_err_vs_reference": "not compared"}).target_pass is None  # a note is not judged
    assert harness.checks_pass({"rel_err_vs_peft": 1e-3}, "bf16-autocast")
    assert not harness.checks_pass({"rel_err_vs_peft": 1e-3}, "float32")
    assert not harness.checks_pass({"max_abs_score_diff_vs_reference-loop": float("nan")}, "bfloat16")
    assert not harness.checks_pass({"finite": False}, "bfloat16")
    assert not harness.checks_pass({"rel_err_vs_reference": 1e-3, "finite": False}, "bfloat16")
    assert harness.checks_pass({"rel_err_vs_reference": 1e-3, "finite": True}, "bfloat16")
    # A check that ran in float32 on a bf16-autocast row is judged at float32's limit, the others at the row's.
    fp32_check = {"rel_err_vs_reference-ops": 2e-3, "rel_err_vs_eager-step": 2e-3,
                  harness.CHECK_DTYPES: {"rel_err_vs_reference-ops": "float32"}}
    assert not harness.checks_pass(fp32_check, "bf16-autocast")
    assert harness.checks_pass({**fp32_check, "rel_err_vs_reference-ops": 5e-5}, "bf16-autocast")
    row = judged(fp32_check)
    assert row.target_pass is False
    assert "rel_err_vs_reference-ops<=0.0001" in row.target and "rel_err_vs_eager-step<=0.03" in row.target


def test_rates_are_work_over_the_median_time_and_fractions_of_the_calibration(tmp_path):
    from benchmarks.harness import Measurement

    suite = _fake_gpu_suite(tmp_path, ["triton"])
    meas = Measurement(2.0, None, 5)  # 2 ms: 1e12 FLOPs is 500 TFLOP/s, 6e9 bytes 3,000 GB/s
    assert suite.rate_metrics(meas, flops=1e12, nbytes=6e9) == pytest.approx(
        {"tflops": 500.0, "gbps_min_bytes": 3000.0}, rel=1e-12)  # no calibration: no fractions
    suite.calibration.update(bf16_matmul_tflops=600.0, copy_gbps=3600.0)
    assert suite.rate_metrics(meas, flops=1e12, nbytes=6e9) == pytest.approx(
        {"tflops": 500.0, "frac_of_matmul_peak": 500 / 600, "gbps_min_bytes": 3000.0,
         "frac_of_copy_bandwidth": 3000 / 3600}, rel=1e-12)
    assert suite.rate_metrics(None, flops=1e12) == {}
    assert _suite("all").rate_metrics(meas, flops=1e12) == {}  # a CPU run has no rates
    # Of the event median, not of the back-to-back wall time (4x longer for a launch-bound call).
    launch_bound = Measurement(2.0, None, 5, wall_ms=8.0)
    assert suite.rate_metrics(launch_bound, flops=1e12)["tflops"] == pytest.approx(500.0, rel=1e-12)


def test_a_rate_just_under_its_target_fails_the_row(tmp_path):
    """Targets judge the unrounded rate: 49.978% of the matmul rate misses ">=50% matmul peak"
    (rounded to 3 places it would read 0.5 and meet it)."""
    from benchmarks import bench_contrastive
    from benchmarks.harness import Measurement

    suite = _fake_gpu_suite(tmp_path, ["triton"])
    suite.quick = False
    suite.calibration["bf16_matmul_tflops"] = 1000.0
    goals = bench_contrastive._targets(suite, dict(batch=65536, labeled=True))("triton", None)
    meas = Measurement(1.0, 10.0, 5)

    def judged(flops):
        metrics = {"extra_mib_excl_grads": 10.0, "rel_err_vs_fp32_chunked": 1e-3,
                   **suite.rate_metrics(meas, flops=flops)}
        return suite.add_plain_row(family="contrastive", op="label_guided_infonce", shape="B=65536 D=512 labels",
                                   dtype=torch.bfloat16, provider="triton", measurement=meas, metrics=metrics,
                                   mode="fwd+bwd", targets=goals)

    # FLOPs in the 1 ms median at a fraction of the 1,000 TFLOP/s calibrated.
    assert judged(0.49978 * 1000e12 * 1e-3).target_pass is False
    assert judged(0.50002 * 1000e12 * 1e-3).target_pass is True


def test_flop_and_byte_counts_of_the_rates():
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks import bench_device

    # LoRA: what torch's FLOP counter counts of the PEFT-style step (frozen W: no dW).
    m, k, out, r = 64, 32, 24, 4
    x = torch.randn(m, k, requires_grad=True)
    module = baselines.PeftStyleLoRAQKV(torch.randn(3 * out, k), torch.randn(3 * out), torch.randn(3, r, k),
                                        torch.randn(3, out, r), scaling=0.5, dropout_p=0.0)
    with FlopCounterMode(display=False) as counter:
        torch.autograd.backward(module(x), [torch.ones(m, out)] * 3)
    assert baselines.lora_flops_fwd_bwd(m, k, out, r) == counter.get_total_flops() == 847_872
    assert baselines.infonce_flops_fwd_bwd(300, 64) == 8 * 300**2 * 64
    # x read twice and dx written; the full output adds out and dout, cls_only a [B, D] row each.
    assert baselines.hypergraph_min_bytes(4, 17, 40, 2, cls_only=False) == 5 * 4 * 17 * 40 * 2
    assert baselines.hypergraph_min_bytes(4, 17, 40, 2, cls_only=True) == 3 * 4 * 17 * 40 * 2 + 2 * 4 * 40 * 2
    assert bench_device.copy_bytes(torch.empty(1000, dtype=torch.bfloat16)) == 2 * 2000  # read and written


def test_the_families_targets_in_a_full_gpu_run(tmp_path):
    """The goals of the issues each comparison is held to, as (metric, threshold, text), with
    ``invert`` where the text states the reciprocal of the metric."""
    from benchmarks import bench_contrastive, bench_hypergraph, bench_lora, bench_model

    suite = _fake_gpu_suite(tmp_path, ["triton"])
    suite.quick = False

    def goals(targets, provider, baseline):
        return [(t.metric, t.threshold, t.text) + ((True,) if t.invert else ())
                for t in targets(provider, baseline)]

    lora = bench_lora._targets(suite)
    for provider in ("triton", "cuda"):
        assert goals(lora, provider, "frozen-base") == [("speedup", 1 / 1.15, "time<=1.15x base", True)]
        assert goals(lora, provider, "reference") == [("speedup", 2.0, "speedup>=2")]
        assert goals(lora, provider, "peft-style") == [("speedup", 1.4, "speedup>=1.4"),
                                                       ("metric_max:saved_over_x", 1.1, "saved<=1.1x bytes(x)")]
    assert goals(lora, "torch", "reference") == []  # the GPU targets are the fused kernels'

    for provider in ("triton", bench_hypergraph.ATOMIC, "cuda"):
        for b, memory in ((64, []), (1024, [("memory_ratio", 8.0, "mem<=1/8", True)])):
            shape = dict(b=b, n=197)
            assert goals(bench_hypergraph._targets(suite, shape, False), provider, "reference") == [
                ("speedup", 8.0, "speedup>=8")] + memory
            assert goals(bench_hypergraph._targets(suite, shape, True), provider, "reference") == [
                ("speedup", 25.0, "speedup>=25")] + memory
    assert goals(bench_hypergraph._targets(suite, dict(b=1024, n=197), True), "torch", "reference") == []

    # triton+blocked is held to triton's targets.
    at_8192 = bench_contrastive._targets(suite, dict(batch=8192, labeled=True))
    at_65536 = bench_contrastive._targets(suite, dict(batch=65536, labeled=True))
    for provider in ("triton", bench_contrastive.BLOCKED, "cuda"):
        assert goals(at_8192, provider, "reference") == [("speedup", 4.0, "speedup>=4")]
        assert goals(at_8192, provider, "inf_cl") == [("speedup", 2.0, "speedup>=2")]
        assert goals(at_65536, provider, None) == [("metric_min:frac_of_matmul_peak", 0.5, ">=50% matmul peak"),
                                                   ("metric_max:extra_mib_excl_grads", 64, "extra<=64MiB")]
    # The probe's goal names the unit its value (total_gib) is in: "fits 80GB: 76.2 (no)" read as 76.2 GB.
    probe = bench_contrastive._targets(suite, bench_contrastive.PROBE)
    assert goals(probe, "triton", None) == [
        ("metric_max:total_gib", pytest.approx(74.506, abs=1e-3), "total<=74.5GiB (80 GB card)")]
    from benchmarks.scorecard import _parts

    row = harness.Row(op="label_guided_infonce", shape="B=1000000", dtype="bfloat16", provider="triton", baseline=None,
                      median_ms=1.0, peak_mib=None, speedup_vs_baseline=None, memory_ratio_vs_baseline=None,
                      target=None, target_pass=None, device="d", torch="t", triton="t", cuda=None, git_sha="g",
                      date="d", metrics={"total_gib": 76.2})
    assert _parts({"target_parts": [t.part(row) for t in probe(provider="triton", baseline=None)]}) == (
        "total<=74.5GiB (80 GB card): 76.2 (no)")

    train_step = bench_model._train_step_targets(suite)
    for provider in ("triton", "triton+recompute-mlp", "triton+cuda-graph"):
        assert goals(train_step, provider, "reference-ops") == [("speedup", 1.6, "throughput>=1.6x"),
                                                                ("memory_ratio", 1 / 0.6, "mem<=0.6x", True)]
    assert goals(train_step, "torch", "reference-ops") == []
    assert goals(bench_model._zero_shot_targets(suite), "triton", "reference-loop") == [
        ("speedup", 20.0, "throughput>=20x")]
    for provider in ("patched:triton", "patched:cuda"):
        assert goals(bench_model._peft_targets(suite), provider, "peft") == [("speedup", 1.3, "speedup>=1.3")]


def test_the_demo_is_a_cpu_target_of_the_model_family(tmp_path, monkeypatch, capsys):
    """Issue 6's bound on ``ace-lora demo`` (at most 180 s on a CPU) is a benchmark row, not a timed
    test: the whole command as a user runs it (defaults, its own temporary directory, no progress
    bars), timed once, judged with the demo's own outcome (loss halved, accuracy 0.2 above chance)
    as its check. Skipped with the reason with --quick and on a GPU. ``cli.main`` is a stand-in
    here that writes a demo's summary (the real demo is test_cli.py's slow test)."""
    from ace_model import cli
    from benchmarks import bench_model
    from benchmarks.harness import Measurement

    summary = {"loss_first": 2.0, "loss_last": 0.5, "steps": 300, "before": {"accuracy": 0.24},
               "after": {"accuracy": 0.9}, "chance_accuracy": 0.25, "seconds": 12.5, "checkpoint": None}
    calls = []

    def demo(argv):
        calls.append(list(argv))
        out = Path(argv[argv.index("--out-dir") + 1])
        assert out.is_dir() and not any(out.iterdir())  # a fresh temporary directory
        (out / "demo_summary.json").write_text(json.dumps(summary))
        print("[demo] zero-shot after training: ...")  # the demo's output stays out of the suite's log
        return 0

    monkeypatch.setattr(cli, "main", demo)
    quick, gpu = _suite("all"), _fake_gpu_suite(tmp_path, ["triton"])
    gpu.quick = False
    bench_model._run_demo(quick, 60.0)
    bench_model._run_demo(gpu, 60.0)
    assert calls == [] and quick.rows == gpu.rows == []
    assert quick.skipped == ["ace_lora_demo: skipped (not with --quick (a whole demo run: 300 training steps, "
                             "seconds to minutes))"]
    assert gpu.skipped[0].startswith("ace_lora_demo: skipped (CPU only: issue 6")
    suite = _suite("all")
    suite.quick = False
    bench_model._run_demo(suite, 60.0)
    assert calls == [["demo", "--out-dir", calls[0][2], "--no-progress"]] and not os.path.exists(calls[0][2])
    assert "[demo]" not in capsys.readouterr().out
    (row,) = suite.rows
    assert (row.family, row.op, row.provider, row.baseline) == ("model", "ace_lora_demo", "torch", None)
    assert row.metrics["seconds"] == pytest.approx(row.median_ms / 1e3) and row.metrics["demo_reported_s"] == 12.5
    assert row.metrics["learned"] is True and row.metrics["finite"] is True
    assert row.target == "demo<=180s & loss halved & accuracy>chance+0.2 & finite" and row.target_pass is True
    # Judged: a demo that did not learn (loss not halved, accuracy not 0.2 above chance), or over
    # 180 s, fails the row.
    learned = dict(summary)
    for change in ({"loss_last": 1.01}, {"after": {"accuracy": 0.45}}):
        summary.clear()
        summary.update(learned, **change)
        suite = _suite("all")
        suite.quick = False
        bench_model._run_demo(suite, 60.0)
        assert suite.rows[0].metrics["learned"] is False and suite.rows[0].target_pass is False, change
    for metrics in ({"seconds": 180.5, "learned": True, "finite": True},
                    {"seconds": 10.0, "learned": False, "finite": True}):
        missed = suite._row(family="model", op="ace_lora_demo", shape="s", dtype="float32", provider="torch",
                            baseline=None, measurement=Measurement(1.0, None, 1), base_measurement=None,
                            targets=bench_model._demo_targets(), metrics=metrics, mode="train+eval")
        assert missed.target_pass is False, metrics


@pytest.mark.parametrize("how", ["raises", "exit status", "no summary", "bad summary"])
def test_a_failed_demo_is_a_row_that_misses_its_targets(monkeypatch, how):
    """A demo that raises, exits non-zero or leaves no readable summary is not skipped: its row
    records why (``metrics.failed``) and misses issue 6's target."""
    from ace_model import cli
    from benchmarks import bench_model

    def demo(argv):
        out = Path(argv[argv.index("--out-dir") + 1])
        if how == "raises":
            raise RuntimeError("the tiny model diverged")
        if how == "exit status":
            print("error: no such thing")
            return 2
        if how == "bad summary":
            (out / "demo_summary.json").write_text("{not json")
        return 0

    monkeypatch.setattr(cli, "main", demo)
    suite = _suite("all")
    suite.quick = False
    bench_model._run_demo(suite, 60.0)
    (row,) = suite.rows
    assert not suite.skipped
    assert (row.op, row.shape, row.target_pass) == ("ace_lora_demo", "tiny, defaults (failed)", False)
    assert row.metrics["learned"] is False and row.metrics["seconds"] >= 0
    expected = {"raises": "the tiny model diverged", "exit status": "exit status 2: error: no such thing",
                "no summary": "no readable demo_summary.json", "bad summary": "no readable demo_summary.json"}[how]
    assert expected in row.metrics["failed"]


def test_the_demo_interrupted_or_with_null_losses(monkeypatch):
    """Ctrl-C during the demo (the command returns its interrupted status) interrupts the suite,
    as it would anywhere else; a summary whose losses are null (non-finite, as the command writes
    them) is a row that misses the target, logged without a formatting error."""
    from ace_model import cli
    from benchmarks import bench_model

    monkeypatch.setattr(cli, "main", lambda argv: cli.EXIT_INTERRUPTED)
    suite = _suite("all")
    suite.quick = False
    with pytest.raises(KeyboardInterrupt):
        bench_model._run_demo(suite, 60.0)
    assert not suite.rows and not suite.skipped

    def demo(argv):
        out = Path(argv[argv.index("--out-dir") + 1])
        (out / "demo_summary.json").write_text(json.dumps(
            {"loss_first": None, "loss_last": None, "steps": 300, "before": {"accuracy": 0.25},
             "after": {"accuracy": 0.25}, "chance_accuracy": 0.25, "seconds": 1.0}))
        return 0

    monkeypatch.setattr(cli, "main", demo)
    bench_model._run_demo(suite, 60.0)
    (row,) = suite.rows
    assert row.metrics["finite"] is False and row.metrics["learned"] is False and row.target_pass is False


def test_dispatch_order_ignores_rows_with_wrong_outputs():
    from benchmarks import dispatch_order

    def row(provider, ms, error):
        return dict(op="lora_qkv", shape="M=100", dtype="bfloat16", provider=provider, baseline="reference",
                    median_ms=ms, metrics={"rel_err_vs_reference_p0": error})

    times = dispatch_order.backend_times([row("triton", 1.0, 0.9), row("torch", 2.0, 1e-3), row("cuda", 3.0, 1e-3)])
    assert set(times["lora_qkv"]["M=100 [bfloat16]"]) == {"torch", "cuda"}  # triton's speed bought nothing
    # Nor does speed nobody checked, for an op that dispatches (the suite checks every such row).
    unchecked = dict(row("triton", 1.0, 0.0), metrics={})
    times = dispatch_order.backend_times([unchecked, row("torch", 2.0, 1e-3)])
    assert set(times["lora_qkv"]["M=100 [bfloat16]"]) == {"torch"}

    # A call's cost in a loop decides: the back-to-back time (which counts the host's launch work)
    # when a row has one, the event median otherwise (run 2 of stop 15, M=12,608: torch's event
    # median was 0.81x triton's, back to back 1.01x).
    fast_events = dict(row("torch", 1.49, 1e-3), wall_ms=1.63)
    times = dispatch_order.backend_times([fast_events, dict(row("triton", 1.83, 1e-3), wall_ms=1.62)])
    assert times["lora_qkv"]["M=100 [bfloat16]"] == {"torch": 1.63, "triton": 1.62}
    assert dispatch_order.order_for(times["lora_qkv"])[0] == ["triton", "torch"]
    assert dispatch_order.backend_times([row("cuda", 3.0, 1e-3)])["lora_qkv"]["M=100 [bfloat16]"] == {"cuda": 3.0}


def test_compare_warns_across_hardware(tmp_path):
    from benchmarks.compare import compare_files

    def payload(device):
        return {"environment": {"device": device}, "rows": [
            dict(op="x", shape="s", dtype="bf16", provider="triton", baseline=None, median_ms=1.0, device=device,
                 date="d", git_sha="g")]}

    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(payload("NVIDIA H200")))
    b.write_text(json.dumps(payload("NVIDIA H100 80GB HBM3")))
    c.write_text(json.dumps(payload("NVIDIA H200")))
    assert "WARNING: the files were measured on different hardware" in compare_files(str(a), str(b))
    assert "WARNING" not in compare_files(str(a), str(c)) and "device NVIDIA H200" in compare_files(str(a), str(c))
    # A reader that closes the pipe early (| head -1) has what it wanted: exit 0, nothing on stderr.
    many = {"environment": {"device": "NVIDIA H200"}, "rows": [
        dict(payload("NVIDIA H200")["rows"][0], shape=f"s{i}") for i in range(5000)]}
    a.write_text(json.dumps(many))
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(f"{shlex.quote(sys.executable)} -m benchmarks --compare {a} {a} | head -1; "
                            "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("old: ")


def test_compare_module_run_as_a_command_compares(tmp_path, capsys):
    """``python -m benchmarks.compare OLD.json NEW.json`` (as ``python -m benchmarks.scorecard`` is run) had no
    main: it printed nothing and exited 0, as if the files had no rows. It compares as --compare does."""
    from benchmarks import compare

    row = dict(op="x", shape="s", dtype="bf16", provider="triton", baseline=None, median_ms=1.0, device="NVIDIA H200",
               date="d", git_sha="g")
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"environment": {"device": "NVIDIA H200"}, "rows": [row]}))
    result = subprocess.run([sys.executable, "-m", "benchmarks.compare", str(a), str(a)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith(f"old: {a} (device NVIDIA H200"), result
    assert "1 rows in both, 0 only in old, 0 only in new" in result.stdout
    (tmp_path / "bad.json").write_text("[1]")
    unreadable = "python -m benchmarks.compare: error: cannot read a result file (ValueError"
    for argv, said in (([str(a)], "the following arguments are required: NEW.json"),
                       ([str(a), str(tmp_path / "none.json")], "is not a file"),
                       ([str(a), str(tmp_path / "bad.json")], unreadable)):
        try:
            assert compare.main(argv) == 2
        except SystemExit as exit_info:
            assert exit_info.code == 2
        assert said in capsys.readouterr().err, argv


def test_largest_batch_also_searches_the_plain_step_after_a_recompute_variant(tmp_path, monkeypatch):
    from benchmarks import bench_model
    from benchmarks.suite import Suite

    searched = []

    def try_step(suite, model, batch, provider):
        searched.append(provider)
        limit = {None: 1000, "triton+recompute-layer": 9000, "triton": 1500}.get(provider, 0)
        return batch <= limit, 10.0 * batch / 64, float(batch)

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**30, 141 * 2**30))
    monkeypatch.setattr(bench_model, "_try_step", try_step)

    suite = Suite(device=torch.device("cuda"), quick=False, json_path=str(tmp_path / "mb.json"), png_path=None,
                  time_budget_s=600, max_seconds_per_call=2, providers=["torch", "triton"], log=lambda _: None,
                  environment=_gpu_environment())
    bench_model._run_max_batch(suite, StubModel(), StubModel())
    rows = {r.provider: r for r in suite.rows if r.op == "ace_lora_max_batch"}
    assert set(rows) == {"reference-ops", "triton+recompute-layer", "triton"}
    assert rows["triton+recompute-layer"].metrics["max_batch"] > rows["triton"].metrics["max_batch"] > 1000
    assert all(rows[p].baseline == "reference-ops" for p in ("triton", "triton+recompute-layer"))
    assert "triton+recompute-mlp" not in searched  # the first variant that finds a batch is the row


def test_family_idle_timeouts():
    """A hung family of short calls is cut after 90 s on a GPU (the suite stage of a session is
    about 235 s), the families with minute-long calls after 180 s; a given value wins; none on
    a CPU."""
    from benchmarks import suite

    assert suite.family_idle_timeout("lora", None, True) == 90.0
    assert suite.family_idle_timeout("device", None, True) == 90.0
    for family in ("model", "training", "contrastive_probe"):
        assert suite.family_idle_timeout(family, None, True) == 180.0
    assert suite.family_idle_timeout("lora", 300.0, True) == 300.0
    assert suite.family_idle_timeout("lora", 0.0, True) == 0.0  # --family-idle-timeout 0: never, on a GPU too
    assert suite.family_idle_timeout("training", None, False) == 0.0
    assert set(suite.GPU_QUICK_FAMILIES) <= set(suite.WORKER_FAMILIES)


def test_a_signal_while_the_results_are_read_keeps_the_last_familys_rows(tmp_path, monkeypatch):
    """The suite reads the family's rows back from the results file after its process ends; a
    SIGTERM landing during that read used to end the run with a save of the rows from before the
    family, over the file. The first read is interrupted here (as the signal handler does it):
    the family's rows and outcome are in the file the run leaves."""
    import signal

    from benchmarks import suite

    real_load = suite.Suite.load_state
    interrupted = []

    def load_state(self, payload):
        if not interrupted:
            interrupted.append(True)
            raise suite._Terminated(signal.SIGTERM)
        return real_load(self, payload)

    monkeypatch.setattr(suite.Suite, "load_state", load_state)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    threads = torch.get_num_threads()
    try:  # main() sets --threads in this process too: the tests run after this one in it keep theirs
        suite.main(["--quick", "--threads", "1", "--device", "cpu", "--only", "hypergraph", "--out-dir", str(tmp_path),
                    "--name", "cut", "--no-plot", "--max-seconds-per-call", "0.2"])
    finally:
        torch.set_num_threads(threads)
    assert interrupted
    payload = json.loads((tmp_path / "cut.json").read_text())
    assert {r["family"] for r in payload["rows"]} == {"hypergraph"}
    assert payload["run"]["families"]["hypergraph"]["outcome"] == "ok"


def test_a_gpu_environment_records_the_cards_memory_and_driver(monkeypatch):
    """The card's memory and driver go in the results JSON (they were only in gpu_check.log);
    no nvidia-smi, or one that fails, records None."""
    class Properties:
        total_memory = 150_121_545_728  # an H200's, as torch reports it

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    answers = {"ok": subprocess.CompletedProcess([], 0, "580.95.05\n", ""),
               "two cards": subprocess.CompletedProcess([], 0, "580.95.05\n580.95.05\n", ""),
               "fails": subprocess.CompletedProcess([], 9, "", "")}
    for answer, driver in (("ok", "580.95.05"), ("two cards", "580.95.05"), ("fails", None), ("missing", None)):
        def run(cmd, **kwargs):
            if answer == "missing":
                raise FileNotFoundError("nvidia-smi")
            # No -i: torch's card index (after CUDA_VISIBLE_DEVICES) is not nvidia-smi's.
            assert cmd == ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            return answers[answer]

        monkeypatch.setattr(harness.subprocess, "run", run)
        monkeypatch.setattr(harness, "git_sha", lambda: "g")
        env = harness.Environment.probe(torch.device("cuda", 1))
        assert env.device == "NVIDIA H200" and env.device_memory_mib == 143167.1 and env.driver == driver
    cpu = harness.Environment.probe(torch.device("cpu"))
    assert cpu.device_memory_mib is None and cpu.driver is None

# ------------------------------------------------------------------------------------------------
# Measuring, judging and recording, pinned against a fake clock and stubbed CUDA calls (found by
# mutation testing: each test below fails for a small plausible slip in the harness or the suite)
# ------------------------------------------------------------------------------------------------


class _FakeClock:
    """``harness.time`` stand-in: ``perf_counter`` reads ``now``, which the measured calls advance."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now

    def calls(self, seconds):
        """A call that takes ``seconds[i]`` on its i-th call (the last value after that); its calls
        are counted in ``self.made``."""
        self.made = 0

        def fn():
            self.now += seconds[min(self.made, len(seconds) - 1)]
            self.made += 1
        return fn

    def grad_step(self, seconds):
        """``(x, fresh, step)``: a call of ``seconds`` that sets ``x.grad``, having recorded in ``fresh``
        whether it found it reset to None."""
        x = torch.zeros(1, requires_grad=True)
        fresh = []

        def step():
            fresh.append(x.grad is None)
            x.grad = torch.ones(1)
            self.now += seconds
        return x, fresh, step


def test_cpu_timing_times_each_call_and_keeps_to_its_budgets(monkeypatch):
    """The CPU loop times each call on its own (not the time since the loop began), stops at
    ``max_reps`` and at ``max_seconds`` even when the calls grow slower than the first one, and
    ``measure`` keeps a first call (a compile, say) out of the times: the memory call is that
    warm-up, or one more call without ``with_memory``."""
    clock = _FakeClock()
    monkeypatch.setattr(harness, "time", clock)
    cpu = torch.device("cpu")
    timing = harness.time_call(clock.calls([0.002]), device=cpu, min_reps=5, max_reps=50, min_seconds=1.0,
                               max_seconds=20.0, warmup_calls=0)
    assert timing.runs == 50 and timing.median_ms == pytest.approx(2.0) and timing.spread_ms == pytest.approx((2, 2))
    # 1 ms, then 10 s a call: at 20 s the budget is spent, after 3 of the 5 calls min_reps asks for.
    timing = harness.time_call(clock.calls([0.001, 10.0]), device=cpu, min_reps=5, min_seconds=1.0,
                               max_seconds=20.0, warmup_calls=0)
    assert timing.runs == 3
    # A first call of 50 s, then 1 s: the first call is never one of the timed ones.
    fn = clock.calls([50.0, 1.0])
    meas = harness.measure(fn, device=cpu, with_memory=False, min_reps=3, min_seconds=0.0, max_seconds=100.0)
    assert meas.error is None and meas.median_ms == pytest.approx(1000.0) and meas.runs == 3 and clock.made == 4
    fn = clock.calls([50.0, 1.0])
    meas = harness.measure(fn, device=cpu, with_memory=True, min_reps=3, min_seconds=0.0, max_seconds=100.0)
    assert meas.error is None and meas.median_ms == pytest.approx(1000.0) and meas.peak_mib is not None
    assert clock.made == 1 + meas.runs  # the memory call, then the timed ones: no second warm-up


def test_interleaved_cpu_timing_keeps_to_per_entry_budgets_and_resets_gradients(monkeypatch):
    """``time_interleaved``: ``min_seconds`` is per entry (two entries of 0.3 s a call reach 1 s each
    after 4 rounds, not 2), the rounds ``max_seconds`` allows are per entry of the whole first round
    (first calls of 10 s each: 2 rounds of a 20 s budget, though later calls take 0.1 s), and every
    call starts with its gradients reset to None, as ``time_call``'s do."""
    clock = _FakeClock()
    monkeypatch.setattr(harness, "time", clock)
    x, fresh, step = clock.grad_step(0.3)
    timed = harness.time_interleaved([(step, [x]), (clock.calls([0.3]), [])], min_reps=2, max_reps=50,
                                     min_seconds=1.0, max_seconds=20.0)
    assert [t.runs for t in timed] == [4, 4] and timed[0].median_ms == pytest.approx(300.0)
    assert fresh == [True] * 4

    def slow_then_fast():
        made = []

        def fn():
            clock.now += 0.1 if made else 10.0
            made.append(1)
        return fn

    timed = harness.time_interleaved([(slow_then_fast(), []), (slow_then_fast(), [])], min_reps=5,
                                     min_seconds=1.0, max_seconds=20.0)
    assert [t.runs for t in timed] == [2, 2]


def test_peak_memory_resets_gradients_before_its_call():
    """The memory call starts from no gradients (a check or a warm-up left some): backward then
    allocates them within the call, as a training step does, and they are counted."""
    x = torch.zeros(2**18, requires_grad=True)  # 1 MiB
    x.grad = torch.ones_like(x)
    fresh = []

    def step():
        fresh.append(x.grad is None)
        (x * 2).sum().backward()

    assert harness.peak_memory_mib(step, device=torch.device("cpu"), grads=[x]) >= 1.0 and fresh == [True]


def test_summarize_gives_the_median_spread_and_interquartile_range():
    """Median (not mean), (min, max) of unsorted times, and an IQR from 4 times on."""
    median, spread, iqr = harness.summarize([4.0, 1.0, 3.0, 2.0])
    assert median == 2.5 and spread == (1.0, 4.0) and iqr == pytest.approx(3.75 - 1.25)  # q3 - q1
    median, spread, iqr = harness.summarize([9.0, 1.0, 2.0])
    assert median == 2.0 and spread == (1.0, 9.0) and iqr is None


def _stub_cuda_memory(monkeypatch, *, live_mib, peak_mib):
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: live_mib * harness.MIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak_mib * harness.MIB)


def _stub_cuda_allocator(monkeypatch, *, live_mib, peak_mib) -> dict:
    """A CUDA allocator stand-in whose ``reset_peak_memory_stats`` lowers the peak to what is live:
    its ``{"live": bytes, "peak": bytes}``, returned, are what the test's calls move."""
    memory = {"live": live_mib * harness.MIB, "peak": peak_mib * harness.MIB}

    def reset_peak(device=None):
        memory["peak"] = memory["live"]

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset_peak)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: memory["live"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: memory["peak"])
    return memory


def test_gpu_peak_memory_counts_only_what_the_call_adds(monkeypatch):
    """GPU peak memory is the allocator's peak during the call less what was live before it (the
    call's inputs): 100 MiB live, a peak of 164 MiB, 64 MiB for the call. ``one_call`` measures
    the same way, and reports no peak when the memory is not asked for."""
    _stub_cuda_memory(monkeypatch, live_mib=100.0, peak_mib=164.0)
    cuda = torch.device("cuda")
    assert harness.peak_memory_mib(lambda: None, device=cuda) == pytest.approx(64.0)
    peak, elapsed = harness.peak_and_time(lambda: None, device=cuda)
    assert peak == pytest.approx(64.0) and elapsed >= 0
    meas = harness.measure(lambda: None, device=cuda, one_call=True)
    assert meas.error is None and meas.peak_mib == pytest.approx(64.0) and meas.runs == 1
    meas = harness.measure(lambda: None, device=cuda, one_call=True, with_memory=False)
    assert meas.error is None and meas.peak_mib is None and meas.median_ms is not None


def test_saved_activations_count_each_storage_once_and_leave_out_the_excluded():
    """``saved_mib``: the distinct storages autograd saves, once each, the weights excluded."""
    a = torch.randn(2**18, requires_grad=True)  # 1 MiB of float32 each
    w = torch.randn(2**18, requires_grad=True)

    def forward():
        s = torch.sin(a)  # saves a
        s2 = s * s  # saves s twice: one storage
        return (s2 * w).sum()  # saves s2 and w (excluded)

    assert harness.saved_activation_mib(forward, exclude=[w]) == pytest.approx(3.0)
    assert harness.saved_activation_mib(forward, exclude=[]) == pytest.approx(4.0)


def test_gpu_back_to_back_time_is_per_call(monkeypatch):
    """``wall_ms`` is the back-to-back loop's host time divided by its number of calls (what
    ``launch_bound`` and the dispatch order read), here 1 ms a call on a fake clock."""
    triton_testing = pytest.importorskip("triton.testing")

    clock = _FakeClock()
    monkeypatch.setattr(harness, "time", clock)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Event", _StubEvent)
    monkeypatch.setattr(triton_testing, "do_bench", lambda fn, warmup, rep, grad_to_none=None, return_mode="mean":
                        [0.05, 0.05, 0.05, 0.05])
    timing = harness.time_call(clock.calls([0.001]), device=torch.device("cuda"), warmup_calls=0)
    assert timing.wall_calls == 100 and timing.wall_ms == pytest.approx(1.0)


def test_json_keeps_the_sign_of_an_infinity(tmp_path):
    """JSON has no inf or nan: they are written as "inf", "-inf" and "nan", the sign kept, also
    where a metric is a 0-d tensor (json.dump would refuse its non-finite value: the save after a
    configuration would fail)."""
    row = harness.Row(op="x", shape="s", dtype="float32", provider="torch", baseline=None, median_ms=1.0,
                      peak_mib=1.0, speedup_vs_baseline=None, memory_ratio_vs_baseline=None, target=None,
                      target_pass=None, device="d", torch="t", triton=None, cuda=None, git_sha="g", date="now",
                      metrics={"up": float("inf"), "down": float("-inf"), "nan": float("nan"),
                               "tensor": torch.tensor(float("-inf")), "plain": torch.tensor(2.5)})
    path = tmp_path / "r.json"
    harness.write_json(str(path), _gpu_environment(), [row])
    metrics = harness.load_rows(str(path))[0]["metrics"]
    assert (metrics["up"], metrics["down"], metrics["nan"]) == ("inf", "-inf", "nan")
    assert (metrics["tensor"], metrics["plain"]) == ("-inf", 2.5)


def test_the_table_says_pass_fail_or_nothing_for_a_target():
    """The table's ok column: "pass" for a met target, "FAIL" for a missed one, "-" unjudged."""
    common = dict(op="x", shape="s", dtype="float32", provider="torch", baseline="ref", median_ms=1.0,
                  peak_mib=1.0, speedup_vs_baseline=2.0, memory_ratio_vs_baseline=1.0, target="speedup>=2")
    lines = harness.format_table([dict(common, target_pass=True), dict(common, target_pass=False),
                                  dict(common, target_pass=None)]).splitlines()
    assert [line.split()[-1] for line in lines[2:]] == ["pass", "FAIL", "-"]
    # The ratio columns print the row's ratios as they are (baseline / ours), time and then memory.
    line = harness.format_table([dict(common, speedup_vs_baseline=4.0, memory_ratio_vs_baseline=0.5)]).splitlines()[2]
    assert line.split()[5:9] == ["1.00", "1.00", "4.00x", "0.50x"]


def test_row_ratios_when_a_peak_is_zero():
    """A baseline that allocates nothing against ours that does: a memory ratio of 0 (a memory
    target on it fails), not a missing one (which would leave the target unjudged)."""
    from benchmarks.harness import Measurement

    row = _suite("all")._row(family="lora", op="op", shape="s", dtype="float32", provider="torch",
                             baseline="reference", measurement=Measurement(2.0, 5.0, 3),
                             base_measurement=Measurement(1.0, 0.0, 3), targets=None, metrics={}, mode="fwd+bwd")
    assert row.speedup_vs_baseline == 0.5 and row.memory_ratio_vs_baseline == 0.0


def test_rows_ask_each_comparison_for_its_own_targets(tmp_path):
    """``targets(provider, baseline)`` is asked with the provider and the baseline of each
    comparison (and ``None`` for a provider measured without baselines), and a --quick run
    judges none of them."""
    from benchmarks.harness import Measurement, Target

    asked = []

    def targets(provider, baseline):
        asked.append((provider, baseline))
        return [Target("speedup", 1.5, "speedup>=1.5")] if baseline == "ref" else []

    suite = _fake_gpu_suite(tmp_path, ["triton"])
    suite.quick = False
    meas, base = Measurement(1.0, 1.0, 5), Measurement(2.0, 1.0, 5)
    checked = {"rel_err_vs_ref": 0.0}
    rows = suite.add_rows(family="f", op="x", shape="s", dtype=torch.bfloat16, ours={"triton": (meas, checked)},
                          baselines={"ref": (base, {}), "other": (base, {})}, targets=targets)
    assert asked == [("triton", "ref"), ("triton", "other")]
    judged = {r.baseline: r.target_pass for r in rows if r.provider == "triton"}
    assert judged == {"ref": True, "other": None}
    asked.clear()
    suite.add_rows(family="f", op="y", shape="s", dtype=torch.bfloat16, ours={"triton": (meas, checked)},
                   baselines={}, targets=lambda provider, baseline: asked.append((provider, baseline)) or [
                       Target("peak_mib_max", 0.5, "peak<=0.5")])
    assert asked == [("triton", None)] and suite.rows[-1].target_pass is False
    suite.quick = True  # --quick: tiny shapes, nothing judged
    rows = suite.add_rows(family="f", op="z", shape="s", dtype=torch.bfloat16, ours={"triton": (meas, checked)},
                          baselines={"ref": (base, {})}, targets=targets)
    assert [r.provider for r in rows] == ["ref", "triton"]
    assert all(r.target is None and r.target_pass is None for r in rows)


def test_timing_metrics_spread_and_launch_bound():
    """min/max only for more than one timed call; ``launch_bound`` when the back-to-back time is
    over (not at) 1.5x the event median."""
    from benchmarks.harness import Measurement
    from benchmarks.suite import timing_metrics

    assert "min_ms" not in timing_metrics(Measurement(2.0, None, 1, (2.0, 2.0)))
    assert timing_metrics(Measurement(2.0, None, 3, (1.0, 3.0)))["max_ms"] == 3.0
    for wall, bound in ((2.4, False), (3.0, False), (3.2, True)):
        meas = Measurement(2.0, None, 3, (1.0, 3.0), wall_ms=wall, wall_calls=10)
        assert timing_metrics(meas)["launch_bound"] is bound, wall


def test_out_of_time_once_the_deadline_has_passed():
    suite = _suite("all", budget=100.0)
    assert not suite.out_of_time("a")
    suite.deadline = time.monotonic() - 1.0
    assert suite.out_of_time("b") and suite.skipped == ["b: skipped (the run's time budget is spent)"]


def test_a_measurement_gets_the_suites_repetitions_and_its_own_time_cap(monkeypatch):
    """Suite.measure asks the harness for at least 3 timed calls over 0.2 s with --quick, 5 over 1 s in a
    full run, within the item's own max_seconds when it gives one, else the run's per-call cap."""
    from benchmarks.harness import Measurement

    asked = []
    monkeypatch.setattr(harness, "measure", lambda fn, **kw: asked.append(kw) or Measurement(1.0, 1.0, 5))
    quick = _suite("all")
    quick.measure("a", lambda: None, [])
    quick.measure("b", lambda: None, [], max_seconds=3.0)
    quick.quick = False
    quick.measure("c", lambda: None, [])
    assert [(kw["min_reps"], kw["min_seconds"], kw["max_seconds"]) for kw in asked] == [
        (3, 0.2, 0.1), (3, 0.2, 3.0), (5, 1.0, 0.1)]


def test_a_compiled_baseline_is_built_only_when_compiled_baselines_are_on(monkeypatch):
    """Off (--quick, a GPU, --compile-baselines off): no entry and nothing compiled. On: the entry
    ``<label>+compile`` whose step finishes the compiled forward, run once beforehand (compile time
    out of its measurement), the gradients it left cleared."""
    compiled = []

    def fake_compile(forward, dynamic):
        compiled.append(dynamic)
        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    x = torch.ones(3, requires_grad=True)
    calls = []

    def forward():
        calls.append("forward")
        return (x * 2).sum()

    suite = _suite("all")
    assert suite.compiled_entry("reference", forward, lambda out: out.backward(), [x]) is None
    assert compiled == [] and calls == []
    suite.compile_baselines = True
    name, step, grads = suite.compiled_entry("reference", forward, lambda out: out.backward(), [x])
    assert (name, grads, compiled, calls) == ("reference+compile", [x], [False], ["forward"]) and x.grad is None
    step()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]


def test_a_probe_that_raises_keeps_the_provider_out_with_its_reason():
    """Any error of the correctness probe keeps the provider out: a RuntimeError of the call, a
    NotImplementedError, each with its reason among the skips."""
    suite = _suite("all")

    def raising(exc):
        def call():
            raise exc
        return call

    assert not suite.provider_can_run("triton", raising(RuntimeError("Triton Error [CUDA]: invalid argument")))
    assert not suite.provider_can_run("cuda", raising(NotImplementedError("fp16")))
    assert suite.skipped == ["triton: skipped (RuntimeError: Triton Error [CUDA]: invalid argument)",
                             "cuda: skipped (not implemented yet (fp16))"]


def test_measure_checked_on_a_gpu_measures_only_providers_that_pass_their_check(tmp_path):
    suite = _fake_gpu_suite(tmp_path, ["triton", "cuda"])
    x = torch.ones(4, requires_grad=True)
    measured_calls = []

    def step(name):
        return lambda: (measured_calls.append(name), (x * 2).sum().backward())

    def failing():
        raise RuntimeError("backend 'cuda' cannot run this")

    measured = suite.measure_checked([("reference", step("reference"), [x])],
                                     [("triton", lambda: None, step("triton"), [x]),
                                      ("cuda", failing, step("cuda"), [x])])
    assert set(measured) == {"reference", "triton"} and "cuda" not in measured_calls
    assert any(line.startswith("cuda: skipped (backend 'cuda' cannot run") for line in suite.skipped)


def test_cpu_group_gives_each_entry_its_own_peak_and_logs_a_failing_one():
    """Interleaved CPU measuring: each entry's peak memory is its own, an entry whose memory call
    fails is a skip with its reason while the others are measured, and no gradient is left set."""
    suite = _suite("all")

    def allocating(mib):
        return lambda: float(torch.ones(mib * 2**18)[0])  # mib MiB of float32

    def broken():
        raise ValueError("bad shape")

    measured = suite.measure_group([("big", allocating(8), []), ("broken", broken, []), ("small", allocating(1), [])])
    assert set(measured) == {"big", "small"}
    assert measured["big"].peak_mib == pytest.approx(8.0, abs=0.5)
    assert measured["small"].peak_mib == pytest.approx(1.0, abs=0.5)
    assert suite.skipped == ["broken: skipped (ValueError: bad shape)"]
    # The last timed call's gradients are not left behind, holding memory into the next configuration.
    x = torch.ones(4, requires_grad=True)
    assert set(suite.measure_group([("grad", lambda: (x * 2).sum().backward(), [x])])) == {"grad"}
    assert x.grad is None


def test_tiers_leave_out_whole_families():
    """--tier cheap leaves out a family whose items are all costly; --tier costly one without any."""
    from types import SimpleNamespace

    from benchmarks.suite import _tier_skips

    suite = _suite("cheap")
    all_costly = SimpleNamespace(COSTLY_ITEMS=("item",), ALL_COSTLY=True)
    some_costly = SimpleNamespace(COSTLY_ITEMS=("item",))
    assert _tier_skips(suite, "training", all_costly, "cheap")
    assert not _tier_skips(suite, "model", some_costly, "cheap")
    assert not _tier_skips(suite, "training", all_costly, "costly")
    assert _tier_skips(suite, "lora", SimpleNamespace(), "costly")
    assert not _tier_skips(suite, "lora", SimpleNamespace(), "all")
    assert suite.skipped == ["family training: skipped (its items are costly (item; --tier cheap))",
                             "family lora: skipped (no costly items (--tier costly))"]


def test_budget_switches_to_two_thirds_at_135_seconds():
    from benchmarks.suite import budget_for_hard_limit

    assert budget_for_hard_limit(135) == (90.0, 35.0)
    assert budget_for_hard_limit(136) == (91.0, 35.0)
    assert budget_for_hard_limit(120) == (80.0, 30.0)


def test_the_summary_counts_met_missed_and_unjudged_targets(tmp_path, monkeypatch, capsys):
    """The closing line: "targets: <met> of <judged> met", and the rows with a target that could
    not be judged counted apart (never as met or missed), also when no row was judged."""
    from types import SimpleNamespace

    from benchmarks import suite as suite_module
    from benchmarks.harness import Measurement, Target

    def run(suite):
        meas = Measurement(1.0, 10.0, 3)
        for op, metrics in (("met", {"rel_err_vs_ref": 0.0}), ("missed", {"rel_err_vs_ref": 1.0}),
                            ("unjudged", {})):
            suite.add_plain_row(family="lora", op=op, shape="s", dtype="float32", provider="torch",
                                measurement=meas, metrics=metrics, mode="fwd",
                                targets=[Target("peak_mib_max", 64, "p")])
        # A row held to no target (a baseline's) is in none of the counts, not one "not judged".
        suite.add_plain_row(family="lora", op="base", shape="s", dtype="float32", provider="torch",
                            measurement=meas, metrics={}, mode="fwd")

    def main(family_run, name):
        monkeypatch.setattr(suite_module, "_modules", lambda: {"lora": SimpleNamespace(run=family_run)})
        assert suite_module.main(["--in-process", "--only", "lora", "--device", "cpu", "--out-dir", str(tmp_path),
                                  "--name", name, "--no-plot", "--compile-baselines", "off"]) == 0
        return capsys.readouterr().out

    out = main(run, "a")
    assert "\ntargets: 1 of 2 met; 1 not judged" in out, out
    assert "nothing was measured" not in out
    assert [r["target_pass"] for r in harness.load_rows(str(tmp_path / "a.json"))] == [True, False, None, None]
    out = main(lambda suite: suite.add_plain_row(family="lora", op="u", shape="s", dtype="float32", provider="torch",
                                                 measurement=Measurement(1.0, 1.0, 3), metrics={}, mode="fwd",
                                                 targets=[Target("peak_mib_max", 64, "p")]), "b")
    assert "\ntargets: 0 of 0 met; 1 not judged" in out, out


def test_compare_gives_new_over_old_row_by_row(tmp_path):
    """--compare: rows matched on (op, shape, dtype, provider, baseline); time and peak as NEW /
    OLD (below 1 is faster / smaller), each file's speedup in its own column, the vs column named,
    a new value of 0 compared too, and the count of rows in both, only in old and only in new."""
    from benchmarks.compare import compare_files

    def row(provider, baseline, ms, mib, speedup, shape="s"):
        return dict(op="x", shape=shape, dtype="bf16", provider=provider, baseline=baseline, median_ms=ms,
                    peak_mib=mib, speedup_vs_baseline=speedup, device="NVIDIA H200", date="d", git_sha="g")

    old = [row("ref", None, 4.0, 40.0, None), row("triton", "ref", 2.0, 10.0, 2.0),
           row("triton", "ref", 2.0, 10.0, 2.0, shape="gone")]
    new = [row("ref", None, 4.0, 40.0, None), row("triton", "ref", 1.0, 0.0, 4.0),
           row("triton", "ref", 1.0, 10.0, 4.0, shape="added"), row("triton", "ref", 1.0, 10.0, 4.0, shape="added2")]
    a, b = tmp_path / "old.json", tmp_path / "new.json"
    a.write_text(json.dumps({"environment": {"device": "NVIDIA H200"}, "rows": old}))
    b.write_text(json.dumps({"environment": {"device": "NVIDIA H200"}, "rows": new}))
    lines = compare_files(str(a), str(b)).splitlines()
    table = {tuple(line.split()[:5]): line.split()[5:] for line in lines if line.startswith("x ")}
    assert table[("x", "s", "bf16", "triton", "ref")] == ["2.00", "1.00", "0.50", "10.0", "0", "0.00", "2.00x",
                                                          "4.00x"]
    assert table[("x", "s", "bf16", "ref", "-")][2] == "1.00"
    assert table[("x", "gone", "bf16", "triton", "ref")][1] == "-" and table[("x", "added", "bf16", "triton",
                                                                              "ref")][0] == "-"
    assert lines[-1] == "2 rows in both, 1 only in old, 2 only in new"


def test_compare_gives_no_ratio_against_an_old_value_of_nothing_or_zero(tmp_path):
    """An old row without a time (its measurement failed) or with a peak of 0 MiB has no new/old
    ratio ('-'), not a crash of the whole comparison."""
    from benchmarks.compare import compare_files

    def row(ms, mib):
        return dict(op="x", shape="s", dtype="bf16", provider="triton", baseline=None, median_ms=ms, peak_mib=mib,
                    speedup_vs_baseline=None, device="NVIDIA H200", date="d", git_sha="g")

    a, b = tmp_path / "old.json", tmp_path / "new.json"
    a.write_text(json.dumps({"environment": {"device": "NVIDIA H200"}, "rows": [row(None, 0.0)]}))
    b.write_text(json.dumps({"environment": {"device": "NVIDIA H200"}, "rows": [row(1.0, 10.0)]}))
    line = next(line for line in compare_files(str(a), str(b)).splitlines() if line.startswith("x "))
    assert line.split()[5:] == ["-", "1.00", "-", "0", "10.0", "-", "-", "-"]


def test_plot_marks_missed_targets_and_lists_rows_without_bars(tmp_path, monkeypatch):
    """The PNG: each panel reads its threshold from the target text (``time<=Nx`` and ``mem<=Nx``
    as 1/N, ``mem<=1/N`` as N, every part of an ``&``); a bar is red below its threshold (at it is
    met) and on both panels when the row failed elsewhere (a correctness check); rows with a
    target and no bar are listed with "met", "NOT met" or "not judged"."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes
    import matplotlib.figure

    from benchmarks import plot

    assert plot._threshold("speedup>=5", "speedup") == 5.0 and plot._threshold("speedup>=5", "memory") is None
    assert plot._threshold("throughput>=1.6x & mem<=0.6x", "speedup") == 1.6
    assert plot._threshold("throughput>=1.6x & mem<=0.6x", "memory") == pytest.approx(1 / 0.6)
    assert plot._threshold("time<=1.15x base", "speedup") == pytest.approx(1 / 1.15)
    assert plot._threshold("speedup>=8 & mem<=1/8", "memory") == 8.0
    assert plot._threshold("mem ratio>=8", "memory") == 8.0
    assert plot._threshold("peak<512MiB", "memory") is None
    common = dict(shape="s", dtype="bfloat16", median_ms=1.0, peak_mib=1.0, metrics={})

    def row(provider, speedup, memory, target, passed, baseline="reference"):
        return dict(common, op="x", provider=provider, baseline=baseline, speedup_vs_baseline=speedup,
                    memory_ratio_vs_baseline=memory, target=target, target_pass=passed)

    rows = [row("met", 3.0, 9.0, "speedup>=2 & mem<=1/8", True),
            row("at", 2.0, 8.0, "speedup>=2 & mem<=1/8", True),
            row("slow", 1.5, 9.0, "speedup>=2 & mem<=1/8", False),
            row("wrong", 3.0, 9.0, "speedup>=2 & mem<=1/8 & rel_err_vs_reference<=0.03", False),
            row("batch", None, None, "max batch>=3x", None, baseline="reference-ops"),
            row("capped", None, None, "peak<512MiB", True, baseline=None)]
    assert not plot._missed(rows[1], "speedup", "speedup_vs_baseline")
    assert plot._missed(rows[2], "speedup", "speedup_vs_baseline")
    colors, notes = [], []
    real_barh, real_text = matplotlib.axes.Axes.barh, matplotlib.figure.Figure.text
    monkeypatch.setattr(matplotlib.axes.Axes, "barh",
                        lambda self, *a, **k: (colors.append(list(k["color"])), real_barh(self, *a, **k))[1])
    monkeypatch.setattr(matplotlib.figure.Figure, "text",
                        lambda self, x, y, s, *a, **k: (notes.append(s), real_text(self, x, y, s, *a, **k))[1])
    plot.plot_rows(rows, str(tmp_path / "p.png"))
    assert colors == [["tab:blue", "tab:blue", "tab:red", "tab:red"],
                      ["tab:green", "tab:green", "tab:green", "tab:red"]]
    listed = [line for text in notes for line in text.splitlines() if line.startswith("x ")]  # not the title
    assert listed == ["x s [bfloat16] batch vs reference-ops: 1.0 ms, peak 1.0 MiB; target max batch>=3x: not judged",
                      "x s [bfloat16] capped: 1.0 ms, peak 1.0 MiB; target peak<512MiB: met"]


def test_plot_draws_the_first_row_on_top(tmp_path, monkeypatch):
    """The bars read in the rows' order, top down, on both panels (their y axis is shared)."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from benchmarks import plot

    inverted = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (
        inverted.extend(ax.yaxis_inverted() for ax in self.axes), real_savefig(self, *a, **k))[1])
    rows = [dict(op="x", shape=f"s{i}", dtype="bfloat16", provider="triton", baseline="reference", median_ms=1.0,
                 speedup_vs_baseline=2.0, memory_ratio_vs_baseline=1.0) for i in range(2)]
    plot.plot_rows(rows, str(tmp_path / "p.png"))
    assert inverted == [True, True]


def test_replacing_a_file_leaves_no_descriptor_open(tmp_path):
    """_replace_file opens the directory to fsync the rename: that descriptor is closed again (a
    tool writing many files must not run out of them)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    path = str(tmp_path / "f.json")
    harness._replace_file(path, lambda handle: handle.write("{}\n"))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        harness._replace_file(path, lambda handle: handle.write("{}\n"))
    assert len(os.listdir("/proc/self/fd")) <= before  # (another thread may close one meanwhile)
    assert open(path).read() == "{}\n"


@pytest.mark.parametrize("fails", ["write", "fsync"])
def test_a_failed_replace_names_its_file(tmp_path, monkeypatch, fails):
    """A full disk fails a write or an fsync with an error naming no file: a suite's save then skipped
    its family with "OSError: [Errno 28] No space left on device", never saying which file. The error
    names the file being replaced (as ace_model/_atomic.py's do); the old file stays, no temp file."""
    import errno

    path = str(tmp_path / "results.json")
    harness._replace_file(path, lambda handle: handle.write("{}\n"))

    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fails == "fsync":
        monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=rf"No space left on device: '{re.escape(path)}'"):
        harness._replace_file(path, full_disk if fails == "write" else lambda handle: handle.write("[]\n"))
    assert open(path).read() == "{}\n" and os.listdir(tmp_path) == ["results.json"]


@pytest.mark.parametrize("refused", ["EINVAL", "ENOTSUP"])
def test_replacing_a_file_in_a_directory_that_cannot_be_fsynced(tmp_path, monkeypatch, refused):
    """Some file systems refuse fsync of a directory: the file, renamed into place before it, was written,
    yet _replace_file raised "[Errno 22] Invalid argument" naming no file (a suite's save, and so its
    family, failed; a tool said it could not write the file it had written). It is done; another error of
    the directory's fsync (EIO) still raises, naming the directory."""
    import errno
    import stat

    real_fsync = os.fsync
    code = getattr(errno, refused)

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = str(tmp_path / "f.json")
    harness._replace_file(path, lambda handle: handle.write("{}\n"))
    assert open(path).read() == "{}\n" and os.listdir(tmp_path) == ["f.json"]

    def failing_disk(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_disk)
    with pytest.raises(OSError, match=rf"Input/output error: '{re.escape(str(tmp_path))}'"):
        harness._replace_file(path, lambda handle: handle.write("[]\n"))


def test_a_failed_demo_row_is_timed_and_described_as_a_demo_row(monkeypatch):
    """The row of a demo that raised, in full: the time it ran (in ms, as a demo that worked), its
    metrics (not learned and not finite, the reason, the torch threads), float32, train+eval and
    issue 6's targets; the log says after how long it failed and why."""
    from ace_model import cli
    from benchmarks import bench_model

    def demo(argv):
        time.sleep(0.05)
        raise RuntimeError("the tiny model diverged")

    monkeypatch.setattr(cli, "main", demo)
    logged = []
    suite = _suite("all")
    suite.quick, suite.log = False, logged.append
    bench_model._run_demo(suite, 60.0)
    (row,) = suite.rows
    seconds = row.metrics["seconds"]
    assert seconds >= 0.05 and row.median_ms == pytest.approx(seconds * 1e3)
    assert {k: v for k, v in row.metrics.items() if k != "runs"} == {
        "seconds": seconds, "failed": "RuntimeError: the tiny model diverged", "learned": False, "finite": False,
        "threads": torch.get_num_threads()}
    assert (row.dtype, row.mode, row.provider) == ("float32", "train+eval", "torch")
    assert row.target == "demo<=180s & loss halved & accuracy>chance+0.2 & finite" and row.target_pass is False
    assert f"  ace_lora_demo: failed after {seconds:.1f} s (RuntimeError: the tiny model diverged)" in logged


def test_a_demo_exit_status_quotes_the_last_line_of_its_output(monkeypatch):
    """A demo that returns a non-zero status, negative ones included (a signal), fails its row
    with the status and the last line of its output, cut at 200 characters; an unreadable
    summary's row says what the reader raised."""
    from ace_model import cli
    from benchmarks import bench_model

    last = "error: " + "x" * 300

    def demo(argv):
        print("[demo] step 1 ...")
        print(last)
        return -6

    monkeypatch.setattr(cli, "main", demo)
    suite = _suite("all")
    suite.quick = False
    bench_model._run_demo(suite, 60.0)
    (row,) = suite.rows
    assert row.target_pass is False and row.metrics["failed"] == f"exit status -6: {last[:200]}"

    def bad_summary(argv):
        (Path(argv[argv.index("--out-dir") + 1]) / "demo_summary.json").write_text("{not json")
        return 0

    monkeypatch.setattr(cli, "main", bad_summary)
    suite = _suite("all")
    suite.quick = False
    bench_model._run_demo(suite, 60.0)
    assert suite.rows[0].metrics["failed"].startswith("no readable demo_summary.json (JSONDecodeError: ")


def test_the_demo_log_line_gives_three_decimals_or_null(monkeypatch):
    """The demo's log line: losses and accuracies to three decimals, a null (non-finite) loss as None."""
    from ace_model import cli
    from benchmarks import bench_model

    summary = {"loss_first": 2.0, "loss_last": 0.5, "steps": 300, "before": {"accuracy": 0.24},
               "after": {"accuracy": 0.9}, "chance_accuracy": 0.25, "seconds": 1.0}

    def demo(argv):
        (Path(argv[argv.index("--out-dir") + 1]) / "demo_summary.json").write_text(json.dumps(summary))
        return 0

    monkeypatch.setattr(cli, "main", demo)
    for change, expected in (({}, "loss 2.000 -> 0.500, accuracy 0.900 (chance 0.250)"),
                             ({"loss_last": None}, "loss 2.000 -> None, accuracy 0.900 (chance 0.250)")):
        summary.update(change)
        logged = []
        suite = _suite("all")
        suite.quick, suite.log = False, logged.append
        bench_model._run_demo(suite, 60.0)
        (line,) = [text for text in logged if text.startswith("  ace_lora_demo: ")]
        assert line.endswith(expected), line


# --------------------------------------------------------------------------- pytest benchmarks --benchmark-only


def test_pytest_benchmark_view_runs_every_cpu_provider():
    """README's `pytest benchmarks --benchmark-only`: every op's baselines and ours run, checked, none skipped."""
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed in this environment")
    if torch.cuda.is_available():
        pytest.skip("the provider list pinned here is the CPU's (a GPU adds the backends built there)")
    try:
        baselines.open_clip_loss()
        clip_baseline = ["open_clip.ClipLoss"]
    except ImportError:
        clip_baseline = []
    expected = {f"test_lora_qkv[{p}]" for p in ("reference", "peft-style", "torch")}
    expected |= {f"test_ace_hypergraph_cls_only[{p}]" for p in ("reference", "torch")}
    expected |= {f"test_label_guided_infonce[{p}]" for p in ("reference", "torch")}
    expected |= {f"test_clip_loss[{p}]" for p in clip_baseline + ["torch"]}
    # As a user runs it: the interpreter is never timed, and no pytest-xdist worker's variables
    # (pytest-benchmark reads PYTEST_XDIST_WORKER as "xdist is on" and refuses --benchmark-only).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env.pop("TRITON_INTERPRET", None)
    env["ACE_BENCH_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-p", "no:cacheprovider", "-q", "-rA",
         "--benchmark-columns", "median"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    prefix = "PASSED benchmarks/test_bench_ops.py::"
    passed = {line[len(prefix):].strip() for line in output.splitlines() if line.startswith(prefix)}
    assert passed == expected, output[-3000:]
    assert f"{len(expected)} passed in " in output and "skipped" not in output, output[-3000:]


def test_pytest_benchmark_view_gives_each_op_only_the_backends_that_implement_it(monkeypatch):
    """On a GPU with the CUDA extension built, ``available_backends()`` lists cuda, which only
    ace_hypergraph implements: test_lora_qkv[cuda], test_label_guided_infonce[cuda] and
    test_clip_loss[cuda] were collected and failed in their checks ("op 'lora_qkv' has no cuda
    implementation"), so `pytest benchmarks --benchmark-only` failed there."""
    import importlib

    from benchmarks import test_bench_ops

    def providers(test):
        (mark,) = [m for m in test.pytestmark if m.name == "parametrize"]
        return mark.args[1]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ace_kernels, "available_backends", lambda **_: ["cuda", "triton", "torch"])
    try:
        module = importlib.reload(test_bench_ops)
        assert providers(module.test_lora_qkv) == ["reference", "peft-style", "torch", "triton"]
        assert providers(module.test_ace_hypergraph_cls_only) == ["reference", "torch", "triton", "cuda"]
        assert providers(module.test_label_guided_infonce) == ["reference", "torch", "triton"]
        assert providers(module.test_clip_loss) == ["open_clip.ClipLoss", "torch", "triton"]
    finally:
        monkeypatch.undo()
        importlib.reload(test_bench_ops)


# --------------------------------------------------------------------------- small helpers at their edges


def test_device_slug_is_a_file_name_of_the_hardware(monkeypatch):
    """The default result-file stem: lower case, runs of other characters one dash, at most 60
    characters, ``device`` when nothing is left."""
    monkeypatch.setattr(harness, "cpu_model_name", lambda: "AMD EPYC 9654 96-Core Processor")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert harness.device_slug(torch.device("cpu")) == "cpu-amd-epyc-9654-96-core-processor-2c"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200 (" + "x" * 80 + ")")
    assert harness.device_slug(torch.device("cuda")) == "nvidia-h200-" + "x" * 48
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "???")
    assert harness.device_slug(torch.device("cuda")) == "device"


def test_environment_fallbacks_when_the_system_cannot_say(monkeypatch, tmp_path):
    """No /proc/cpuinfo: platform's name; no git: the SHA file; no triton: None; no load average: None."""
    import builtins
    import platform

    from benchmarks import suite

    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(platform, "processor", lambda: "i386")  # macOS's answer on an Intel Mac
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert harness.cpu_model_name() == "i386"
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert harness.cpu_model_name() == "aarch64"
    monkeypatch.setattr(platform, "machine", lambda: "")
    assert harness.cpu_model_name() == "cpu"
    monkeypatch.setattr(builtins, "open", real_open)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.delenv("ACE_GIT_SHA", raising=False)
    monkeypatch.setattr(subprocess, "run", no_git)
    (tmp_path / harness.SHA_FILE).write_text("0123abc\n")
    assert harness.git_sha(str(tmp_path)) == "0123abc"
    monkeypatch.setitem(sys.modules, "triton", None)
    assert harness.triton_version() is None

    def no_load_average():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", no_load_average)
    assert suite._load_average() is None
    assert harness.Environment.probe(torch.device("cpu")).load_average is None

    def no_descriptor(fd):
        raise OSError(9, "Bad file descriptor")

    ran, redirected = [], []
    with monkeypatch.context() as patch:  # undone at once: pytest's own capturing uses dup and dup2
        patch.setattr(os, "dup", no_descriptor)
        patch.setattr(os, "dup2", lambda *args: redirected.append(args))
        with harness._quiet_stderr():  # no fd 2 to save: the body runs with stderr as it is
            ran.append(1)
    assert ran == [1] and redirected == []


def test_fmt_json_and_result_fields_at_their_edges(tmp_path):
    assert [harness.fmt(v) for v in (float("nan"), 1234.5, -98765.4, 0.5, None, True)] == \
        ["nan", "1,234", "-98,765", "0.5", "-", "pass"]
    with pytest.raises(TypeError, match="^not JSON serialisable: set$"):
        harness._json_default({1})
    with pytest.raises(ValueError, match="^its 'rows' is a dict, not a list$"):
        harness.check_result_fields({"environment": {"device": "cpu"}, "rows": {}})


def test_a_device_index_past_the_visible_gpus_is_refused(monkeypatch, capsys):
    from benchmarks import suite

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit) as exit_info:
        suite._parse(["--device", "cuda:2"])
    assert exit_info.value.code == 2
    assert "argument --device: 'cuda:2' asked for, but only 2 GPU(s) are visible" in capsys.readouterr().err
    assert suite._parse(["--device", "cuda:1"]).device == "cuda:1"


def test_group_measuring_one_entry_at_a_time_and_with_every_entry_failing():
    """``single_call`` (or a GPU) measures each entry on its own, a failing one a skip; on the CPU a
    group whose every memory call fails measures nothing and says why for each."""
    suite = _suite("all")
    x = torch.ones(8, requires_grad=True)

    def fails():
        raise RuntimeError("no kernel image")

    entries = [("ok", lambda: (x * 2).sum().backward(), [x]), ("broken", fails, [x])]
    measured = suite.measure_group(entries, single_call=True)
    assert list(measured) == ["ok"] and measured["ok"].runs == 1
    assert suite.skipped == ["broken: skipped (RuntimeError: no kernel image)"]
    suite = _suite("all")
    assert suite.measure_group([("broken", fails, [x]), ("also broken", fails, [x])]) == {}
    assert suite.skipped == ["broken: skipped (RuntimeError: no kernel image)",
                             "also broken: skipped (RuntimeError: no kernel image)"]


def test_gpu_suite_faults_outside_a_measurement_are_recorded(tmp_path, monkeypatch, capsys):
    """A fault surfacing in ``empty_cache`` between configurations marks the context lost; a
    baseline that does not compile is a skip; ``ACE_BENCH_TRACEBACK`` prints a failing probe's
    traceback."""
    def fault():
        raise RuntimeError(FAULT)

    monkeypatch.setattr(torch.cuda, "empty_cache", fault)
    suite = _fake_gpu_suite(tmp_path, ["torch"])
    suite.release_cuda_memory()
    assert suite.skipped == [f"releasing CUDA memory: skipped (RuntimeError: {FAULT})"] and suite.cuda_lost == \
        f"RuntimeError: {FAULT}"
    suite.release_cuda_memory()  # nothing once the context is lost
    assert len(suite.skipped) == 1

    suite = _fake_gpu_suite(tmp_path, ["torch"])
    suite.compile_baselines = True
    monkeypatch.setattr(torch, "compile", lambda forward, dynamic: fault)
    assert suite.compiled_entry("reference", lambda: None, lambda out: out, []) is None
    assert suite.skipped == [f"reference+compile: skipped (torch.compile failed: RuntimeError: {FAULT})"]

    monkeypatch.setenv("ACE_BENCH_TRACEBACK", "1")
    suite = _suite("all")
    assert suite.provider_can_run("lora_qkv torch", lambda: {}["missing"]) is False
    assert suite.skipped == ["lora_qkv torch: skipped (KeyError: 'missing')"]
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_family_process_plumbing_at_its_edges(capsys):
    """The worker command carries the run's options (--quick, --threads, --providers, the deadline);
    signal numbers without a name are named by number; handlers are installed from the main thread
    only; a family that raises is a skip of it."""
    from benchmarks import suite

    args = suite._parse(["--out-dir", "runs", "--quick"])
    command = suite._worker_command("lora", args, device=torch.device("cpu"), stem="s", per_call=1.0,
                                    providers=["torch", "triton"], compile_baselines=False, deadline_epoch=None)
    assert command[command.index("--providers") + 1] == "torch,triton"
    assert "--quick" in command and "--threads" not in command and "--deadline-epoch" not in command
    args = suite._parse(["--out-dir", "runs", "--threads", "2", "--tier", "cheap"])
    command = suite._worker_command("lora", args, device=torch.device("cpu"), stem="s", per_call=20.0,
                                    providers=None, compile_baselines=True, deadline_epoch=1234.5678)
    assert "--quick" not in command and "--providers" not in command
    assert {flag: command[command.index(flag) + 1] for flag in ("--threads", "--tier", "--compile-baselines",
                                                                "--max-seconds-per-call", "--deadline-epoch")} == {
        "--threads": "2", "--tier": "cheap", "--compile-baselines": "on", "--max-seconds-per-call": "20.0",
        "--deadline-epoch": "1234.568"}
    assert suite._signal_name(9) == "SIGKILL" and suite._signal_name(99) == "signal 99"
    installed = []
    thread = threading.Thread(target=lambda: installed.append(suite._install_termination_handlers()))
    thread.start()
    thread.join()
    assert installed == [{}]

    class Broken:
        @staticmethod
        def run(suite_):
            raise KeyError("shape")

    run = _suite("all")
    suite._run_family(run, "lora", Broken)
    assert run.skipped == ["family lora: skipped (KeyError: 'shape')"]
    assert "KeyError: 'shape'" in capsys.readouterr().err


def test_main_sets_the_suites_per_call_budget_compiled_baselines_and_a_family_processs_deadline(tmp_path,
                                                                                                  monkeypatch):
    """The suite that main() builds: 20 s per measurement on a full CPU run and 2 s with --quick (unless
    --max-seconds-per-call says), compiled baselines on by default only for a full CPU run, and in a
    family's process (--worker) a budget of what is left until --deadline-epoch; float32 on the CPU,
    bfloat16 on a GPU."""
    from types import SimpleNamespace

    from benchmarks import suite as suite_module

    seen = {}
    monkeypatch.setattr(suite_module, "_modules",
                        lambda: {"lora": SimpleNamespace(run=lambda suite: seen.update(suite=suite))})

    def suite_of(*options):
        argv = ["--only", "lora", "--device", "cpu", "--out-dir", str(tmp_path), "--name", "m", "--no-plot"]
        assert suite_module.main([*argv, *options]) == 0
        return seen.pop("suite")

    full = suite_of("--in-process")
    assert full.max_seconds_per_call == 20.0 and full.compile_baselines is True and full.deadline is None
    assert full.dtype() == torch.float32
    quick = suite_of("--in-process", "--quick")
    assert quick.max_seconds_per_call == 2.0 and quick.compile_baselines is False
    given = suite_of("--in-process", "--quick", "--max-seconds-per-call", "7", "--compile-baselines", "on")
    assert given.max_seconds_per_call == 7.0 and given.compile_baselines is True
    worker = suite_of("--worker", "lora", "--deadline-epoch", f"{time.time() + 100:.3f}")
    assert 90 < worker.seconds_left() <= 100 and worker.isolation == "process per family"

    class FakeGpuSuite(suite_module.Suite):
        @property
        def is_gpu(self):
            return True

    gpu = FakeGpuSuite(device=torch.device("cpu"), quick=True, json_path=None, png_path=None, time_budget_s=None,
                       max_seconds_per_call=0.1, providers=["torch"], log=lambda _: None)
    assert gpu.dtype() == torch.bfloat16


def test_profile_ops_reports_a_failing_step_and_goes_on(monkeypatch, capsys):
    from benchmarks import profile_ops

    def profile(factory, backend, device, dtype, quick):
        if factory.__name__ == "_lora_step":
            raise RuntimeError("no kernel image")
        return f"== {factory.__name__} backend {backend}: fine\n"

    monkeypatch.setattr(profile_ops, "profile", profile)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU's plan: backend auto, each step once
    assert profile_ops.main(["--quick", "--only", "lora", "hypergraph"]) == 0
    out = capsys.readouterr().out
    assert "== _lora_step backend auto: failed: RuntimeError: no kernel image\n" in out
    assert "== _hypergraph_step backend auto: fine\n" in out


def test_a_family_process_whose_suite_is_gone_exits_at_once(tmp_path):
    """``python -m benchmarks`` as a family's process, its suite's pid not its parent's (the suite
    died before the death signal was armed): exit status 1, before anything runs."""
    from benchmarks import PARENT_PID_VARIABLE

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env[PARENT_PID_VARIABLE] = "1"  # init: not the child's parent (this process)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "lora", "--out-dir",
                           str(tmp_path), "--name", "gone"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stdout == "", (proc.stdout[-2000:], proc.stderr[-2000:])
    assert time.monotonic() - started < 30 and list(tmp_path.iterdir()) == []


def test_device_family_and_clock_reading(monkeypatch):
    """Family device runs on a GPU only; the clocks are nvidia-smi's five fields, an unreadable one
    ("[N/A]") left out, and torch's SM clock when nvidia-smi says nothing."""
    from types import SimpleNamespace

    from benchmarks import bench_device

    cpu = _suite("all")
    bench_device.run(cpu)
    assert cpu.rows == [] and cpu.skipped == []
    # The copy row names the bytes it moved: 2 GiB (1 GiB read, 1 written), --quick's 0.5 GiB (once "0 GiB").
    assert bench_device.copy_bytes(torch.empty(2**29, dtype=torch.bfloat16, device="meta")) == 2 * 2**30
    assert bench_device.copy_shape(2 * 2**30) == "2 GiB moved" and bench_device.copy_shape(2**29) == "0.5 GiB moved"
    queried = []

    def smi(command, **kwargs):
        queried.append(command[1])
        return SimpleNamespace(returncode=0, stdout="1980, 1980, 2619, [N/A], 41\n")

    monkeypatch.setattr(subprocess, "run", smi)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(uuid=f"{torch.device(device).index}-uuid"))
    assert bench_device.read_clocks(torch.device("cuda", 1)) == {
        "sm_clock_mhz": 1980.0, "sm_clock_max_mhz": 1980.0, "mem_clock_mhz": 2619.0, "temperature_c": 41.0}
    assert queried == ["--id=GPU-1-uuid"]
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: SimpleNamespace(returncode=9, stdout=""))
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device=None: 1755, raising=False)
    assert bench_device.read_clocks(torch.device("cuda", 0)) == {"sm_clock_mhz": 1755.0}
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device=None: 1 / 0, raising=False)
    assert bench_device.read_clocks(torch.device("cuda", 0)) == {}


def test_device_clocks_are_the_cards_torch_measured_with_cards_hidden(tmp_path, monkeypatch):
    """The clocks were asked of nvidia-smi by torch's index, which counts only the cards CUDA_VISIBLE_DEVICES
    leaves: with CUDA_VISIBLE_DEVICES=1, torch's card 0 is nvidia-smi's card 1, and the row carried card 0's
    clocks and temperature. nvidia-smi is asked by the card's UUID; with none from torch, torch's SM clock."""
    from types import SimpleNamespace

    from benchmarks import bench_device

    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"  # two cards: 0 (GPU-aaaa...) idle, 1 (GPU-bbbb...) busy
    script.write_text('#!/bin/sh\ncase "$1" in\n'
                      '  --id=0|--id=GPU-aaaaaaaa-0000-0000-0000-000000000000) echo "345, 1980, 2619, 75.5, 30" ;;\n'
                      '  --id=1|--id=GPU-bbbbbbbb-0000-0000-0000-000000000000) echo "1410, 1980, 2619, 699.8, 61" ;;\n'
                      '  *) echo "No devices were found"; exit 6 ;;\nesac\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(uuid="bbbbbbbb-0000-0000-0000-000000000000"))
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device=None: 1755, raising=False)
    busy = {"sm_clock_mhz": 1410.0, "sm_clock_max_mhz": 1980.0, "mem_clock_mhz": 2619.0, "power_w": 699.8,
            "temperature_c": 61.0}
    assert bench_device.read_clocks(torch.device("cuda", 0)) == busy
    assert bench_device.read_clocks(torch.device("cuda")) == busy

    def no_uuid(device):
        raise AttributeError("uuid")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_uuid)
    assert bench_device.read_clocks(torch.device("cuda", 0)) == {"sm_clock_mhz": 1755.0}


def test_compare_notes_two_gpu_runs_of_one_card(tmp_path):
    """Same card, other dates: a GPU's times are comparable within a run only (clocks, neighbours),
    which a note says; two CPU runs of one machine get no such note."""
    from benchmarks.compare import compare_files

    def write(name, device, date, device_type=None):
        path = tmp_path / name
        environment = {"device": device, **({"device_type": device_type} if device_type else {})}
        path.write_text(json.dumps({"environment": environment, "rows": [
            dict(op="x", shape="s", dtype="bf16", provider="triton", baseline=None, median_ms=1.0, device=device,
                 date=date, git_sha="g")]}))
        return str(path)

    note = "note: two GPU runs: a time is comparable only within one run (compare each file's ratios)"
    gpu = compare_files(write("a.json", "NVIDIA H200", "2026-11-30"), write("b.json", "NVIDIA H200", "2026-12-01"))
    assert note in gpu.splitlines() and "WARNING" not in gpu
    # A GPU whose name says neither NVIDIA nor CUDA (torch names a T4 "Tesla T4", a ROCm card "AMD Instinct
    # MI300X") got no note: the environment's device_type says it is one.
    for card in ("Tesla T4", "AMD Instinct MI300X"):
        named = compare_files(write("g.json", card, "2026-11-30", "cuda"), write("h.json", card, "2026-12-01", "cuda"))
        assert note in named.splitlines() and "WARNING" not in named, card
    same_day = compare_files(write("c.json", "NVIDIA H200", "2026-11-30"), write("d.json", "NVIDIA H200", "2026-11-30"))
    assert note not in same_day.splitlines()
    cpu = compare_files(write("e.json", "AMD EPYC (2 cores)", "2026-11-30"),
                        write("f.json", "AMD EPYC (2 cores)", "2026-12-01"))
    assert note not in cpu.splitlines()
    cpu = compare_files(write("e.json", "AMD EPYC (2 cores)", "2026-11-30", "cpu"),
                        write("f.json", "AMD EPYC (2 cores)", "2026-12-01", "cpu"))
    assert note not in cpu.splitlines()


def test_plot_draws_a_gray_bar_for_a_row_without_that_ratio(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from benchmarks import plot

    common = dict(op="x", shape="s", dtype="bfloat16", median_ms=1.0, peak_mib=1.0, metrics={}, baseline="reference")
    rows = [dict(common, provider="timed only", speedup_vs_baseline=3.0, memory_ratio_vs_baseline=None,
                 target="speedup>=2", target_pass=True),
            dict(common, provider="both", speedup_vs_baseline=3.0, memory_ratio_vs_baseline=9.0, target=None,
                 target_pass=None)]
    colors, real_barh = [], matplotlib.axes.Axes.barh
    monkeypatch.setattr(matplotlib.axes.Axes, "barh",
                        lambda self, *a, **k: (colors.append(list(k["color"])), real_barh(self, *a, **k))[1])
    plot.plot_rows(rows, str(tmp_path / "p.png"))
    assert colors == [["tab:blue", "tab:blue"], ["lightgray", "tab:green"]]


def test_plot_axes_show_every_targets_tick(tmp_path, monkeypatch):
    """A target's threshold far from every bar (the hypergraph's speedup>=25 with bars of at most 3.3x, as in a
    --only hypergraph run on the H200) was drawn outside the axis' limits (1 to 3x the largest bar): the missed
    goal's tick was not in the PNG. Each panel's limits take in its ticks."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from benchmarks import plot

    common = dict(op="x", shape="s", dtype="bfloat16", median_ms=1.0, peak_mib=1.0, metrics={}, baseline="reference")
    rows = [dict(common, provider="cuda", speedup_vs_baseline=3.3, memory_ratio_vs_baseline=1.5,
                 target="speedup>=25 & mem<=1/8", target_pass=False),
            dict(common, provider="torch", speedup_vs_baseline=2.0, memory_ratio_vs_baseline=1.2,
                 target="time<=10x base", target_pass=True)]
    axes, real_savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (axes.extend(self.axes), real_savefig(self, *a, **k))[1])
    plot.plot_rows(rows, str(tmp_path / "p.png"))
    (speed_low, speed_high), (memory_low, memory_high) = (ax.get_xlim() for ax in axes)
    assert speed_low < 0.1 < 25 < speed_high and memory_low < 1 < 8 < memory_high, (speed_high, memory_high)


def test_an_empty_or_path_like_name_or_out_dir_is_refused(tmp_path, capsys):
    """--name is a file stem: an empty one once fell back to the default name without a word, and
    one holding a '/' wrote the rows elsewhere (an absolute one outside --out-dir altogether); an
    empty --out-dir once wrote into the working directory. A stem whose JSON path is a directory
    once ran and died with a traceback at the first save."""
    from benchmarks import suite

    (tmp_path / "taken.json").mkdir()
    cases = [(["--name", ""], "argument --name: expected a file stem"),
             (["--name", "sub/run"], "argument --name: expected a file stem"),
             (["--name", str(tmp_path / "abs")], "argument --name: expected a file stem"),
             (["--out-dir", ""], "argument --out-dir: expected a directory, got ''"),
             (["--out-dir", str(tmp_path), "--name", "taken"], "argument --name: "
              f"{str(tmp_path / 'taken.json')!r} is a directory")]
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as exit_info:
            suite._parse(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert fragment in err, (argv, err)
    assert suite._parse(["--out-dir", str(tmp_path), "--name", "run-1.b"]).name == "run-1.b"


def test_a_backend_named_twice_in_providers_is_measured_once():
    """As with --only, a provider given twice runs once (it was measured twice, the second
    measurement silently replacing the first in the row, and run.providers listed it twice)."""
    from benchmarks import suite

    assert suite._parse(["--providers", "torch, torch,triton"]).providers == "torch,triton"


@pytest.mark.parametrize("threads", ["abc", "0", "-2"])
def test_pytest_benchmark_view_refuses_a_bad_thread_count_in_one_line(threads):
    """ACE_BENCH_THREADS (benchmarks/conftest.py) that is no positive integer: pytest's one-line usage
    error naming the variable (it was an ImportError traceback while loading the conftest)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env["ACE_BENCH_THREADS"] = threads
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p",
                           "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 4, output[-3000:]
    assert f"ACE_BENCH_THREADS: expected a positive integer (torch's CPU threads), got {threads!r}" in output
    assert "Traceback" not in output and "ImportError" not in output, output[-3000:]


def test_compare_names_the_hardware_of_a_file_without_rows(tmp_path):
    """A run that measured nothing (a --tier costly run on a CPU) has its hardware in its environment:
    compared with a run of the same machine it got an empty header and a false warning that the
    files were measured on different hardware ([...] against [])."""
    from benchmarks.compare import compare_files

    cpu = "AMD EPYC (2 cores, 1 torch threads)"
    row = dict(op="x", shape="s", dtype="float32", provider="torch", baseline=None, median_ms=1.0, device=cpu,
               date="d", git_sha="g")
    full, empty = tmp_path / "full.json", tmp_path / "empty.json"
    full.write_text(json.dumps({"environment": {"device": cpu, "date": "d"}, "rows": [row]}))
    empty.write_text(json.dumps({"environment": {"device": cpu, "date": "e"}, "rows": []}))
    text = compare_files(str(full), str(empty))
    assert "WARNING" not in text, text
    assert f"new: {empty} (device {cpu}, date e)" in text
    empty.write_text(json.dumps({"environment": {"device": "NVIDIA H200", "device_type": "cuda"}, "rows": []}))
    assert "WARNING: the files were measured on different hardware" in compare_files(str(full), str(empty))
    empty.write_text(json.dumps([]))  # a bare list of rows: no hardware named, none claimed
    assert "WARNING" not in compare_files(str(full), str(empty))


def test_package_file_tools_refuse_an_out_file_that_is_no_package_file(tmp_path, capsys):
    """--out naming an existing JSON object without 'by_device' (a result file, e.g. RESULTS.json
    itself): it was taken as an empty package file and rewritten, rows and all, with a by_device
    table added. A one-line error now, and the file is left as it was; an empty object still
    starts a package file."""
    from benchmarks import dispatch_order, tuned_configs

    gpu = {"device": "NVIDIA H200", "device_type": "cuda"}
    row = dict(op="lora_qkv", shape="M=100", dtype="bfloat16", provider="triton", median_ms=1.0,
               metrics={"rel_err_vs_reference": 1e-3})
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"schema": "ace-kernels-benchmarks/1", "environment": gpu,
                                   "rows": [row, dict(row, provider="torch", median_ms=2.0)]}))
    before = results.read_bytes()
    for tool in (dispatch_order, tuned_configs):
        assert tool.main([str(results), "--out", str(results)]) == 2
        err = capsys.readouterr().err
        assert f"argument --out: cannot read {str(results)!r} to update it (ValueError: expected a JSON object " \
               "whose 'by_device' holds an object per card)" in err, err
        assert results.read_bytes() == before
    fresh = tmp_path / "fresh.json"
    fresh.write_text("{}")
    assert dispatch_order.main([str(results), "--out", str(fresh)]) == 0
    assert json.loads(fresh.read_text())["by_device"]["NVIDIA H200"]["lora_qkv"] == ["triton", "torch"]


def test_result_readers_refuse_a_file_of_another_schema(tmp_path, capsys):
    """A result file names its layout ("schema"); one of another layout was read as if it were this
    one (its numbers taken in this version's terms) by --compare, the scorecard and the package-file
    tools. Now a one-line error naming the schema; a file without one (a bare list of rows, a
    hand-made file) is still read."""
    from benchmarks import dispatch_order, scorecard, suite, tuned_configs

    gpu = {"device": "NVIDIA H200", "device_type": "cuda"}
    row = dict(op="lora_qkv", shape="M=100", dtype="bfloat16", provider="triton", median_ms=1.0, target="t",
               target_pass=True, metrics={"rel_err_vs_reference": 1e-3})
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "ace-kernels-benchmarks/2", "environment": gpu,
                                 "rows": [row, dict(row, provider="torch", median_ms=2.0)]}))
    says = f"its schema is 'ace-kernels-benchmarks/2', expected {harness.SCHEMA!r}"
    assert suite.main(["--compare", str(other), str(other)]) == 2
    assert says in capsys.readouterr().err
    assert scorecard.main([str(other)]) == 2
    assert says in capsys.readouterr().err
    for tool in (dispatch_order, tuned_configs):
        assert tool.main([str(other), "--out", str(tmp_path / "out.json")]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
    this = tmp_path / "this.json"
    this.write_text(json.dumps({"schema": harness.SCHEMA, "environment": gpu, "rows": [row]}))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([row]))
    assert suite.main(["--compare", str(this), str(bare)]) == 0 and scorecard.main([str(this)]) == 0


def test_a_cpu_environment_names_the_cpu_model_its_cores_threads_and_versions(monkeypatch):
    """A CPU run's environment: the model name as /proc/cpuinfo gives it (after the colon, no
    whitespace), with the cores and torch's threads (what its times depend on), torch's own
    threads and versions; the git sha override is read without its surrounding whitespace."""
    import builtins
    import io

    real_open = builtins.open
    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n"

    def fake_open(path, *args, **kwargs):
        return io.StringIO(cpuinfo) if path == "/proc/cpuinfo" else real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setenv("ACE_GIT_SHA", " 0123abcd+dirty\n")
    assert harness.cpu_model_name() == "AMD EPYC 7B13 64-Core Processor"
    env = harness.Environment.probe(torch.device("cpu"))
    assert env.device == "AMD EPYC 7B13 64-Core Processor (3 cores, 2 torch threads)" and env.device_type == "cpu"
    assert (env.threads, env.torch, env.cuda, env.git_sha) == (2, torch.__version__, torch.version.cuda,
                                                              "0123abcd+dirty")


def test_a_failing_nvidia_smi_records_no_driver_even_with_text_on_stdout(monkeypatch):
    """nvidia-smi that cannot reach the driver exits non-zero with its complaint on stdout: the
    driver is then unknown (None), not the complaint's first word."""
    failed = subprocess.CompletedProcess([], 9, "NVIDIA-SMI has failed because it couldn't communicate with the "
                                                "NVIDIA driver.\n", "")
    monkeypatch.setattr(harness.subprocess, "run", lambda cmd, **kwargs: failed)
    assert harness.nvidia_driver_version() is None


def test_gpu_peak_memory_starts_from_a_fresh_peak_each_measurement(monkeypatch):
    """The allocator's peak is reset before each measured call: a peak an earlier provider (or its
    warm-up) reached is not this call's. Here the allocator's all-time peak is 900 MiB, 100 MiB are
    live, and the call adds 64 MiB: 64 MiB for ``peak_memory_mib``, ``peak_and_time`` and ``one_call``."""
    memory = _stub_cuda_allocator(monkeypatch, live_mib=100, peak_mib=900)

    def call():
        memory["peak"] = max(memory["peak"], memory["live"] + 64 * harness.MIB)

    cuda = torch.device("cuda")
    assert harness.peak_memory_mib(call, device=cuda) == pytest.approx(64.0)
    memory["peak"] = 900 * harness.MIB
    assert harness.peak_and_time(call, device=cuda)[0] == pytest.approx(64.0)
    memory["peak"] = 900 * harness.MIB
    assert harness.measure(call, device=cuda, one_call=True).peak_mib == pytest.approx(64.0)


def test_every_timed_call_starts_without_gradients_on_cpu_and_gpu(monkeypatch):
    """Each timed call (the CPU loop, and on a GPU the estimate and the back-to-back ``wall_ms``
    loop) starts with its gradients reset to None, so that each allocates and writes them as a
    training step does (accumulating into old ones is another, cheaper operation); ``peak_and_time``
    leaves none behind, which the next measurement would count as live before its call."""
    triton_testing = pytest.importorskip("triton.testing")
    clock = _FakeClock()
    monkeypatch.setattr(harness, "time", clock)
    x, fresh, step = clock.grad_step(0.002)
    timing = harness.time_call(step, device=torch.device("cpu"), grads=[x], min_reps=5, max_reps=7,
                               min_seconds=1.0, max_seconds=20.0, warmup_calls=1)
    assert timing.runs == 7 and fresh == [True] * 8
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Event", _StubEvent)
    monkeypatch.setattr(triton_testing, "do_bench", lambda fn, warmup, rep, grad_to_none=None, return_mode="mean":
                        [0.05, 0.05, 0.05, 0.05])
    fresh.clear()
    timing = harness.time_call(step, device=torch.device("cuda"), grads=[x], warmup_calls=0)
    assert timing.wall_calls == 100 and fresh == [True] * (1 + 100)  # the estimate, then the loop
    _stub_cuda_memory(monkeypatch, live_mib=1.0, peak_mib=2.0)
    fresh.clear()
    harness.peak_and_time(step, device=torch.device("cuda"), grads=[x])
    assert fresh == [True] and x.grad is None


def test_gpu_measure_warms_up_before_its_memory_call_and_keeps_the_wall_time(monkeypatch):
    """On a GPU, ``measure`` makes one call before the memory call: what a process's first call
    allocates for good (cuBLAS's workspace, here 32 MiB) is then in no provider's peak, only the
    call's own 64 MiB. The measurement carries the timing's back-to-back ``wall_ms``, which
    ``launch_bound`` and the dispatch order read."""
    triton_testing = pytest.importorskip("triton.testing")
    clock = _FakeClock()
    monkeypatch.setattr(harness, "time", clock)
    memory = _stub_cuda_allocator(monkeypatch, live_mib=100, peak_mib=100)

    def call():
        if not calls:
            memory["live"] += 32 * harness.MIB  # the first call's workspace, kept
        memory["peak"] = max(memory["peak"], memory["live"] + 64 * harness.MIB)
        calls.append(1)
        clock.now += 0.001

    calls = []
    monkeypatch.setattr(torch.cuda, "Event", _StubEvent)
    monkeypatch.setattr(triton_testing, "do_bench", lambda fn, warmup, rep, grad_to_none=None, return_mode="mean":
                        [0.05, 0.05, 0.05, 0.05])
    meas = harness.measure(call, device=torch.device("cuda"))
    assert meas.error is None and meas.peak_mib == pytest.approx(64.0)
    assert meas.median_ms == pytest.approx(0.05) and meas.wall_calls == 100 and meas.wall_ms == pytest.approx(1.0)


def test_measure_passes_its_repetition_budgets_to_the_cpu_timing(monkeypatch):
    """``measure``'s ``min_reps``/``min_seconds``/``max_seconds`` are the timing loop's: 0.1 s calls
    with ``min_seconds=0`` stop at ``min_reps`` (3), not after a second's worth of calls; with
    ``max_seconds=0.55`` they stop at 5 whatever ``min_reps`` asks."""
    clock = _FakeClock()
    monkeypatch.setattr(harness, "time", clock)
    cpu = torch.device("cpu")
    meas = harness.measure(clock.calls([0.1]), device=cpu, with_memory=False, min_reps=3, min_seconds=0.0,
                           max_seconds=100.0)
    assert meas.runs == 3 and meas.median_ms == pytest.approx(100.0)
    meas = harness.measure(clock.calls([0.1]), device=cpu, with_memory=False, min_reps=30, min_seconds=0.0,
                           max_seconds=0.55)
    assert meas.runs == 5


def test_skip_reasons_are_the_errors_first_line_and_cuda_faults_are_found_in_any_case():
    """``describe_error``: the exception's type and the first line of its message, cut to ``limit``
    (a skip reason is one line); ``is_fatal_cuda_error`` matches its patterns in any case."""
    assert harness.describe_error(RuntimeError("out of memory\nTraceback (most recent call last): ...")) == \
        "RuntimeError: out of memory"
    assert harness.describe_error(ValueError("x" * 50), limit=10) == "ValueError: " + "x" * 10
    assert harness.describe_error(KeyError()) == "KeyError: "
    assert harness.is_fatal_cuda_error("Triton Error [CUDA]: Unspecified Launch Failure")
    assert harness.is_fatal_cuda_error("CUDA ERROR: AN ILLEGAL MEMORY ACCESS WAS ENCOUNTERED")
    assert not harness.is_fatal_cuda_error("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_relative_error_of_a_small_reference_is_relative():
    """A reference whose norm is under 1 (small gradients) is still divided by: 10% off 0.01 is an
    error of 0.1, not the 0.001 an absolute difference gives (which every check limit would pass);
    only a zero reference falls back to the absolute difference."""
    assert harness.relative_error(torch.tensor([0.011, 0.0]), torch.tensor([0.01, 0.0])) == pytest.approx(0.1)
    assert harness.relative_error(torch.tensor([0.5, 0.0]), torch.zeros(2)) == pytest.approx(0.5)


def test_a_steps_check_vector_holds_its_loss_then_its_gradients():
    """``loss_and_grads_vector``: the loss first, then every gradient flattened, in float32, so that
    a check on it sees a wrong loss as well as a wrong gradient."""
    loss = torch.tensor(2.0, dtype=FP64, requires_grad=True) * 1.0
    vector = harness.loss_and_grads_vector(loss, [torch.tensor([[1.0, 3.0]], dtype=FP64), torch.tensor([4.0])])
    assert vector.dtype == torch.float32 and not vector.requires_grad
    assert vector.tolist() == [2.0, 1.0, 3.0, 4.0]


def test_fmt_groups_thousands_from_1000_on():
    assert [harness.fmt(v) for v in (999.5, 1000.0, 12.345, 0.012345)] == ["999.5", "1,000", "12.3", "0.0123"]


def test_a_replaced_file_gets_the_mode_open_gives_under_the_umask(tmp_path):
    """A result or package file written through ``_replace_file`` is 0666 less the umask (0644
    under 022), as ``open`` makes it, not the 0600 of a private temp file: others on the machine
    (and a later run as another user) can read it."""
    path = tmp_path / "f.json"
    old = os.umask(0o022)
    try:
        harness._replace_file(str(path), lambda handle: handle.write("{}\n"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and path.read_text() == "{}\n"


def test_plot_bars_run_from_1x_to_each_ratio_and_name_the_baseline(tmp_path, monkeypatch):
    """Each bar spans 1x (as fast or as small as the baseline) to its ratio, to the left when worse
    (0.5x runs from 1 down to 0.5); a row with a memory ratio and no time ratio still gets its bar
    (gray on the speedup panel); each bar's label names provider and baseline, so a provider's two
    comparisons (reference and PEFT-style) can be told apart."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from benchmarks import plot

    common = dict(op="x", shape="s", dtype="bfloat16", median_ms=1.0, peak_mib=1.0, metrics={}, target=None,
                  target_pass=None)
    rows = [dict(common, provider="torch", baseline="reference", speedup_vs_baseline=0.5, memory_ratio_vs_baseline=4.0),
            dict(common, provider="torch", baseline="peft", speedup_vs_baseline=None, memory_ratio_vs_baseline=3.0)]
    axes, real_savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (axes.extend(self.axes), real_savefig(self, *a, **k))[1])
    plot.plot_rows(rows, str(tmp_path / "p.png"))
    spans = [[(bar.get_x(), bar.get_x() + bar.get_width()) for bar in ax.patches] for ax in axes]
    assert spans[0] == [(1.0, 0.5), (1.0, 1.0)] and spans[1] == [(1.0, 4.0), (1.0, 3.0)]
    labels = [tick.get_text() for tick in axes[0].get_yticklabels()]
    assert labels == ["x s [bfloat16]\ntorch vs reference", "x s [bfloat16]\ntorch vs peft"]


def test_the_probe_family_is_a_costly_tier_family_and_says_so_when_left_out():
    """The B=1,000,000 probe is the probe family's one item, a costly one: ``--tier costly`` runs the
    family (an empty COSTLY_ITEMS would skip it as "no costly items", so the probe never ran), and
    ``--tier cheap`` leaves it out naming that item; on a CPU it cannot run, which the suite's
    process asks before it starts the family's own."""
    from benchmarks import bench_probe
    from benchmarks.suite import _tier_skips

    costly, cheap = _suite("all"), _suite("all")
    assert _tier_skips(costly, "contrastive_probe", bench_probe, "costly") is False and costly.skipped == []
    assert _tier_skips(cheap, "contrastive_probe", bench_probe, "cheap") is True
    assert any("label_guided_infonce B=1000000" in line for line in cheap.skipped), cheap.skipped
    assert bench_probe.unavailable(_suite("all")) is True


def test_gpu_timing_with_an_older_triton_counts_the_calls_its_rep_time_holds(monkeypatch):
    """A Triton whose do_bench has no ``return_mode="all"`` gives its median alone: the row's
    ``runs`` is then the number of calls do_bench's rep time holds (100 ms of 0.05 ms calls), not 1."""
    triton_testing = pytest.importorskip("triton.testing")

    def old_do_bench(fn, warmup, rep, grad_to_none=None, return_mode="mean"):
        if return_mode == "all":
            raise TypeError("unknown return_mode")
        return 0.05

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Event", _StubEvent)
    monkeypatch.setattr(triton_testing, "do_bench", old_do_bench)
    timing = harness.time_call(lambda: None, device=torch.device("cuda"), warmup_calls=0)
    assert timing.median_ms == pytest.approx(0.05) and timing.runs == int(harness.cuda_rep_ms(0.05, 20.0) / 0.05)


def test_rows_read_back_with_fields_of_a_later_version_and_tuples_of_non_finite_numbers(tmp_path):
    """``row_from_json`` drops keys this version does not know (a newer file's field), and a tuple
    in a row's metrics holding inf is written as JSON can hold it ("inf"), not refused at the save."""
    row = harness.Row(op="x", shape="s", dtype="float32", provider="torch", baseline=None, median_ms=1.0,
                      peak_mib=1.0, speedup_vs_baseline=None, memory_ratio_vs_baseline=None, target=None,
                      target_pass=None, device="d", torch="t", triton=None, cuda=None, git_sha="g", date="now",
                      metrics={"spread_ms": (1.0, float("inf"))})
    path = tmp_path / "r.json"
    harness.write_json(str(path), _gpu_environment(), [row])
    record = harness.load_rows(str(path))[0]
    assert record["metrics"]["spread_ms"] == [1.0, "inf"]
    back = harness.row_from_json(dict(record, added_in_a_later_version=1))
    assert back.metrics["spread_ms"] == [1.0, float("inf")] and back.median_ms == 1.0


def test_the_table_right_aligns_its_number_columns():
    """Times, peaks and ratios are right-aligned under their headers (digits line up); text columns are
    left-aligned."""
    rows = [dict(op="lora_qkv", shape="s", dtype="float32", provider="torch", baseline="reference", median_ms=1.5,
                 peak_mib=12.25, speedup_vs_baseline=3.0, memory_ratio_vs_baseline=1.0, target=None, target_pass=None),
            dict(op="x", shape="s", dtype="float32", provider="torch", baseline=None, median_ms=1234.0,
                 peak_mib=1.0, speedup_vs_baseline=None, memory_ratio_vs_baseline=None, target=None, target_pass=None)]
    header, _, first, second = harness.format_table(rows).splitlines()
    end = header.index("median ms") + len("median ms")
    assert first[:end].endswith(" 1.50") and second[:end].endswith(" 1,234")
    assert first.startswith("lora_qkv") and second.startswith("x ")


def test_saved_activations_leave_out_an_excluded_view_of_a_larger_storage():
    """Weights excluded from ``saved_mib`` are matched by their storage, so a weight that is a view
    at an offset into a larger tensor (q's rows of a stacked q/k/v weight) is still left out."""
    stacked = torch.randn(3, 2**18)  # 1 MiB of float32 a row
    weight = stacked[1].requires_grad_()
    x = torch.randn(2**18, requires_grad=True)

    def forward():
        return (x * weight).sum()  # saves x and weight

    assert harness.saved_activation_mib(forward, exclude=[weight]) == pytest.approx(1.0)


def test_the_environment_date_is_utc_with_its_offset():
    """The date every row carries is UTC, written with its offset: runs on machines in other time
    zones compare by it."""
    date = harness.Environment.probe(torch.device("cpu")).date
    assert date.endswith("+00:00") and "." not in date
