"""Smoke test of the benchmark suite: ``python -m benchmarks --quick`` end to end on the CPU,
plus checks that the suite's baselines compute the same functions as our ops.

The suite runs in a subprocess with one torch thread: it sets its own thread
count, and on a shared 2-core machine oversubscribed OpenMP threads make times
explode (the numbers are not judged here, only that every row is complete).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ace_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `pytest tests` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, ROOT)

from benchmarks import baselines, harness  # noqa: E402
FP64 = torch.float64


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the suite never times the interpreter; keep it as a user runs it
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--out-dir", str(out), "--name", "smoke",
         "--max-seconds-per-call", "0.5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
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
    providers = {row["provider"] for row in rows}
    assert {"reference", "peft-style", "torch"} <= providers
    assert payload["environment"]["device_type"] == "cpu"
    assert payload["run"]["quick"] is True


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
        for o, r in zip(outs, outs_ref):
            _assert_close(o, r, f"{cls.__name__} output")
        _assert_close(xo.grad, xr.grad, f"{cls.__name__} dx")
        _assert_close(ao.grad, a_ref, f"{cls.__name__} dA")
        _assert_close(bo.grad, b_ref, f"{cls.__name__} dB")
    # The functional reference (used inside the model benchmark) is the same function.
    fn_outs = baselines.reference_lora_qkv(x, w, b, a, bb, scaling=0.5, dropout_p=0.0, training=True)
    for o, r in zip(fn_outs, outs):
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
    for name, ours, ref in zip(names, results[1], results[0]):
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
    for name, ours, ref in zip(["loss", "d_image", "d_text", "d_scale"], results[1], results[0]):
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


def test_gpu_check_script_parses():
    """gpu_check.sh only runs on a lent GPU machine; here at least bash must accept it."""
    proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
