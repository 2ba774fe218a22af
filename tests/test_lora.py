"""lora_linear / lora_qkv against the fp64 oracle: forward, every gradient, dropout, errors.

The masks a call used are exported with ``ace_kernels.lora.capture_dropout_masks`` and fed
to the oracle, so outputs and gradients are compared exactly, dropout included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import ace_kernels
from ace_kernels import lora as lora_module
from oracle_lora import fp64_leaves, lora_linear_oracle, lora_qkv_oracle


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "linear" or "qkv"
    lead: tuple
    in_features: int
    out_features: int
    rank: int
    bias: bool = True
    dropout_p: float = 0.0
    training: bool = True
    base_grads: bool = False  # weight and bias require grad too
    x_grad: bool = True


CASES = [
    Case("linear_r1_odd", "linear", (5,), 40, 7, 1, dropout_p=0.2),
    Case("linear_r7_nobias", "linear", (2, 3), 40, 7, 7, bias=False, dropout_p=0.3),
    Case("linear_no_dropout", "linear", (6,), 13, 9, 4),
    Case("linear_eval_ignores_dropout", "linear", (4,), 11, 5, 2, dropout_p=0.5, training=False),
    Case("qkv_r4", "qkv", (2, 3), 40, 7, 4, dropout_p=0.25),
    Case("qkv_r1_nobias", "qkv", (9,), 40, 7, 1, bias=False, dropout_p=0.1),
    Case("qkv_r7_eval", "qkv", (3, 2), 17, 7, 7, dropout_p=0.4, training=False),
    Case("qkv_single_row", "qkv", (1,), 9, 5, 4, dropout_p=0.5),
    Case("qkv_1d_x", "qkv", (), 12, 6, 3, dropout_p=0.3),
    Case("qkv_base_grads", "qkv", (2, 5), 16, 8, 4, dropout_p=0.2, base_grads=True),
    Case("linear_base_grads_x_frozen", "linear", (7,), 10, 3, 2, dropout_p=0.3, base_grads=True, x_grad=False),
]


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    projections = 3 if case.op == "qkv" else 1

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = rnd(*case.lead, case.in_features).requires_grad_(case.x_grad)
    weight = rnd(projections * case.out_features, case.in_features, scale=case.in_features ** -0.5)
    bias = rnd(projections * case.out_features) if case.bias else None
    if case.op == "qkv":
        lora_a = rnd(3, case.rank, case.in_features, scale=case.in_features ** -0.5)
        lora_b = rnd(3, case.out_features, case.rank)
    else:
        lora_a = rnd(case.rank, case.in_features, scale=case.in_features ** -0.5)
        lora_b = rnd(case.out_features, case.rank)
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    weight.requires_grad_(case.base_grads)
    if bias is not None:
        bias.requires_grad_(case.base_grads)
    return x, weight, bias, lora_a, lora_b


def call_op(case: Case, inputs, backend, scaling=0.5):
    fn = ace_kernels.lora_qkv if case.op == "qkv" else ace_kernels.lora_linear
    with lora_module.capture_dropout_masks() as masks:
        out = fn(*inputs, scaling=scaling, dropout_p=case.dropout_p, training=case.training, backend=backend)
    assert len(masks) == 1
    outputs = tuple(out) if case.op == "qkv" else (out,)
    return outputs, masks[0]


def call_oracle(case: Case, inputs, mask, scaling=0.5):
    x, weight, bias, lora_a, lora_b = inputs
    if case.op == "qkv":
        return lora_qkv_oracle(x, weight, bias, lora_a, lora_b, scaling=scaling, keep_masks=mask,
                               dropout_p=case.dropout_p)
    return (lora_linear_oracle(x, weight, bias, lora_a, lora_b, scaling=scaling,
                               keep_mask=None if mask is None else mask[0], dropout_p=case.dropout_p),)


def compare_with_oracle(case: Case, inputs, backend, *, rtol, atol, scaling=0.5):
    """Run op and oracle with the op's masks; compare outputs and every gradient."""
    outputs, mask = call_op(case, inputs, backend, scaling)
    applies_dropout = case.training and case.dropout_p > 0
    if applies_dropout:
        projections = 3 if case.op == "qkv" else 1
        assert mask is not None and mask.dtype == torch.bool
        assert mask.shape == (projections, *case.lead, case.in_features)
    else:
        assert mask is None
    oracle_inputs = fp64_leaves(*inputs)
    expected = call_oracle(case, oracle_inputs, None if mask is None else mask.to(torch.float64), scaling)
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape and got.dtype == inputs[0].dtype
        torch.testing.assert_close(got.to(torch.float64), want, rtol=rtol, atol=atol)
    gen = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in expected]
    wrt = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    got_grads = torch.autograd.grad(outputs, [inputs[i] for i in wrt],
                                    [g.to(device=outputs[0].device, dtype=outputs[0].dtype) for g in grads_out])
    want_grads = torch.autograd.grad(expected, [oracle_inputs[i] for i in wrt], grads_out)
    names = ["x", "weight", "bias", "lora_a", "lora_b"]
    for i, got, want in zip(wrt, got_grads, want_grads):
        assert got.shape == inputs[i].shape, names[i]
        torch.testing.assert_close(got.to(torch.float64), want, rtol=rtol, atol=atol, msg=lambda m: f"grad {names[i]}: {m}")
    return mask


# ----------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_matches_oracle_fp64(case):
    # fp64 against fp64: only summation-order rounding differs.
    compare_with_oracle(case, make_inputs(case), "torch", rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=lambda c: c.name)
def test_torch_matches_oracle_fp32(case):
    # fp32 inputs, fp64 oracle: reductions over <= 40 terms of O(1) values lose ~1e-6.
    compare_with_oracle(case, make_inputs(case, torch.float32), "torch", rtol=1e-4, atol=1e-5)


def test_torch_non_contiguous_x():
    case = Case("qkv_strided", "qkv", (3, 4), 20, 6, 4, dropout_p=0.3)
    x, weight, bias, lora_a, lora_b = make_inputs(case)
    wide = torch.randn(4, 3, 2 * case.in_features, dtype=torch.float64)
    x_strided = wide.transpose(0, 1)[..., ::2].detach().requires_grad_(True)
    assert not x_strided.is_contiguous() and x_strided.shape == x.shape
    compare_with_oracle(case, (x_strided, weight, bias, lora_a, lora_b), "torch", rtol=1e-10, atol=1e-10)


def test_torch_gradcheck_with_dropout():
    case = Case("gc", "qkv", (3,), 6, 4, 2, dropout_p=0.3)
    x, weight, bias, lora_a, lora_b = make_inputs(case)

    def fixed_mask_op(x_, a_, b_):
        # Re-seeding each evaluation keeps the mask fixed, so the function is differentiable.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            return ace_kernels.lora_qkv(x_, weight, bias, a_, b_, scaling=0.5, dropout_p=0.3, training=True,
                                        backend="torch")

    assert torch.autograd.gradcheck(fixed_mask_op, (x, lora_a, lora_b))


def test_torch_dropout_replays_under_fork_rng():
    case = CASES[4]
    inputs = make_inputs(case)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        first, mask_first = call_op(case, inputs, "torch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        second, mask_second = call_op(case, inputs, "torch")
    third, mask_third = call_op(case, inputs, "torch")
    assert torch.equal(mask_first, mask_second)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(mask_first, mask_third)


def binomial_bound(n: int, p: float, sigmas: float = 6.0) -> float:
    """|observed keep-rate - (1-p)| bound: 6 standard deviations (false alarm < 1e-8)."""
    return sigmas * math.sqrt(p * (1 - p) / n)


def check_mask_statistics(mask: torch.Tensor, dropout_p: float):
    """Keep rate per projection within the binomial bound; projections not copies of each other."""
    flat = mask.reshape(mask.shape[0], -1).to(torch.float64)
    n = flat.shape[1]
    for p in range(flat.shape[0]):
        assert abs(flat[p].mean().item() - (1 - dropout_p)) < binomial_bound(n, dropout_p)
    for p in range(flat.shape[0]):
        for q in range(p + 1, flat.shape[0]):
            # Independent masks agree on (1-p)^2 + p^2 of the elements; a copy on all of them.
            agree = (flat[p] == flat[q]).to(torch.float64).mean().item()
            expected = (1 - dropout_p) ** 2 + dropout_p ** 2
            assert abs(agree - expected) < binomial_bound(n, expected)


def test_torch_mask_statistics():
    case = Case("stats", "qkv", (64,), 96, 4, 4, dropout_p=0.1)
    inputs = make_inputs(case, torch.float32)
    _, mask = call_op(case, inputs, "torch")
    check_mask_statistics(mask, case.dropout_p)


def test_torch_zero_rows():
    case = Case("empty", "qkv", (0,), 8, 3, 2, dropout_p=0.2)
    inputs = make_inputs(case)
    outputs, _ = call_op(case, inputs, "torch")
    assert all(o.shape == (0, 3) for o in outputs)
    sum(o.sum() for o in outputs).backward()
    assert torch.all(inputs[3].grad == 0) and torch.all(inputs[4].grad == 0)


def test_torch_non_finite_rows_propagate():
    case = Case("nan", "linear", (4,), 8, 3, 2, dropout_p=0.2)
    x, weight, bias, lora_a, lora_b = make_inputs(case)
    x = x.detach().clone()
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    y = ace_kernels.lora_linear(x, weight, bias, lora_a, lora_b, scaling=0.5, dropout_p=0.2, training=True,
                                backend="torch")
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()
    assert not torch.isfinite(y[1]).any() and not torch.isfinite(y[2]).any()


def test_torch_fp16_bf16_close_to_oracle():
    case = Case("half", "qkv", (5,), 32, 8, 4, dropout_p=0.2)
    for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        # Half-precision inputs; products of O(1) values summed over 32 terms: a few ulps at 16 bits.
        compare_with_oracle(case, make_inputs(case, dtype), "torch", rtol=tol, atol=tol)


def test_saved_activation_bytes_hook():
    case = Case("bytes", "qkv", (10,), 16, 4, 2, dropout_p=0.2)
    inputs = make_inputs(case, torch.float32)
    with lora_module.saved_activation_bytes() as record:
        call_op(case, inputs, "torch")
    assert len(record) == 1
    entry = record[0]
    # torch backend: x (fp32) + S [M, 3r] fp32 + bool masks [3, M, in].
    assert entry["x"] == 10 * 16 * 4
    assert entry["extra"] == 10 * 3 * 2 * 4 + 3 * 10 * 16
    with torch.no_grad(), lora_module.saved_activation_bytes() as record:
        call_op(case, inputs, "torch")
    assert record == []


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------


def _good(op):
    case = Case("err", op, (4,), 10, 6, 2)
    return list(make_inputs(case, torch.float32))


ERROR_CASES = [
    # (name, op, argument index or kwarg, replacement factory, message fragment)
    ("x_not_tensor", "linear", 0, lambda t: t.tolist(), "argument 'x'"),
    ("x_0d", "linear", 0, lambda t: t[0, 0], "argument 'x'"),
    ("x_int", "linear", 0, lambda t: t.to(torch.int64), "argument 'x'"),
    ("weight_1d", "linear", 1, lambda t: t[0], "argument 'weight'"),
    ("weight_in_mismatch", "linear", 1, lambda t: t[:, :9], "argument 'weight'"),
    ("weight_rows_not_3x", "qkv", 1, lambda t: t[:17], "argument 'weight'"),
    ("weight_dtype", "linear", 1, lambda t: t.double(), "argument 'weight'"),
    ("weight_device", "linear", 1, lambda t: t.to("meta"), "argument 'weight'"),
    ("bias_shape", "linear", 2, lambda t: t[:5], "argument 'bias'"),
    ("bias_2d", "qkv", 2, lambda t: t[None], "argument 'bias'"),
    ("bias_dtype", "qkv", 2, lambda t: t.half(), "argument 'bias'"),
    ("lora_a_ndim_linear", "linear", 3, lambda t: t[None], "argument 'lora_a'"),
    ("lora_a_ndim_qkv", "qkv", 3, lambda t: t[0], "argument 'lora_a'"),
    ("lora_a_in_mismatch", "qkv", 3, lambda t: t[..., :9], "argument 'lora_a'"),
    ("lora_a_two_projections", "qkv", 3, lambda t: t[:2], "argument 'lora_a'"),
    ("lora_a_rank_zero", "linear", 3, lambda t: t[:0], "argument 'lora_a'"),
    ("lora_a_dtype", "linear", 3, lambda t: t.bfloat16(), "argument 'lora_a'"),
    ("lora_b_rank_mismatch", "linear", 4, lambda t: t[:, :1], "argument 'lora_b'"),
    ("lora_b_out_mismatch", "qkv", 4, lambda t: t[:, :5], "argument 'lora_b'"),
    ("lora_b_dtype", "qkv", 4, lambda t: t.double(), "argument 'lora_b'"),
    ("lora_b_device", "qkv", 4, lambda t: t.to("meta"), "argument 'lora_b'"),
    ("scaling_tensor", "linear", "scaling", lambda v: torch.tensor(0.5), "argument 'scaling'"),
    ("scaling_none", "qkv", "scaling", lambda v: None, "argument 'scaling'"),
    ("scaling_bool", "qkv", "scaling", lambda v: True, "argument 'scaling'"),
    ("dropout_one", "linear", "dropout_p", lambda v: 1.0, "argument 'dropout_p'"),
    ("dropout_negative", "qkv", "dropout_p", lambda v: -0.1, "argument 'dropout_p'"),
    ("dropout_string", "qkv", "dropout_p", lambda v: "0.1", "argument 'dropout_p'"),
    ("training_not_bool", "linear", "training", lambda v: 1, "argument 'training'"),
    ("backend_unknown", "qkv", "backend", lambda v: "cudnn", "argument 'backend'"),
]


@pytest.mark.parametrize("name,op,where,replace,fragment", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_value_errors(name, op, where, replace, fragment):
    args = _good(op)
    kwargs = dict(scaling=0.5, dropout_p=0.1, training=True, backend="torch")
    if isinstance(where, int):
        args[where] = replace(args[where].detach())
    else:
        kwargs[where] = replace(kwargs[where])
    fn = ace_kernels.lora_qkv if op == "qkv" else ace_kernels.lora_linear
    with pytest.raises(ValueError, match=fragment):
        fn(*args, **kwargs)


def test_explicit_cuda_backend_without_gpu_raises():
    if torch.cuda.is_available():
        pytest.skip("checks the error on a machine with no GPU")
    with pytest.raises(RuntimeError, match="cuda"):
        ace_kernels.lora_linear(*_good("linear"), scaling=0.5, backend="cuda")
