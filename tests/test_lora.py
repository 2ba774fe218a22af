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
from ace_kernels import _tuning, lora as lora_module
from _saved import saved_storage_bytes, saved_storages
from oracle_lora import fp64_leaves, lora_linear_oracle, lora_qkv_oracle

# Memory that nothing wrote reads as NaN (conftest.poisoned_empty).
pytestmark = pytest.mark.usefixtures("poisoned_empty")


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
    lora_grads: str = "ab"  # which of lora_a ("a") and lora_b ("b") require grad


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
    # One LoRA factor frozen, or both (x's gradient alone, through the frozen branch).
    Case("qkv_a_frozen", "qkv", (2, 3), 17, 5, 3, dropout_p=0.3, lora_grads="b"),
    Case("linear_b_frozen", "linear", (5,), 11, 4, 2, dropout_p=0.2, lora_grads="a"),
    Case("qkv_lora_frozen", "qkv", (4,), 9, 3, 2, dropout_p=0.4, lora_grads=""),
    Case("qkv_in1_out1", "qkv", (3,), 1, 1, 1, dropout_p=0.5),  # every size 1 but the rows
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
    lora_a.requires_grad_("a" in case.lora_grads)
    lora_b.requires_grad_("b" in case.lora_grads)
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
    """Run op and oracle with the op's masks; compare outputs and every gradient.

    Returns the masks the op drew and its gradients {name: tensor} for output gradients
    drawn from ``torch.Generator().manual_seed(1)``."""
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
    for got, want in zip(outputs, expected, strict=True):
        assert got.shape == want.shape and got.dtype == inputs[0].dtype
        torch.testing.assert_close(got.to(torch.float64), want, rtol=rtol, atol=atol)
    gen = torch.Generator().manual_seed(1)
    # Drawn on the CPU (the same numbers on any machine), then moved to the oracle's device.
    grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in expected]
    wrt = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    got_grads = torch.autograd.grad(outputs, [inputs[i] for i in wrt],
                                    [g.to(device=outputs[0].device, dtype=outputs[0].dtype) for g in grads_out])
    want_grads = torch.autograd.grad(expected, [oracle_inputs[i] for i in wrt], grads_out)
    names = ["x", "weight", "bias", "lora_a", "lora_b"]
    for i, got, want in zip(wrt, got_grads, want_grads, strict=True):
        assert got.shape == inputs[i].shape, names[i]
        torch.testing.assert_close(got.to(torch.float64), want, rtol=rtol, atol=atol,
                                   msg=lambda m: f"grad {names[i]}: {m}")
    return mask, {names[i]: g for i, g in zip(wrt, got_grads, strict=True)}


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


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_packed_equals_split(backend, device):
    case = Case("packed", "qkv", (2, 5), 16, 6, 2, dropout_p=0.3)
    inputs = make_inputs(case, torch.float32, device if backend == "triton" else "cpu")
    devices = [inputs[0].device] if inputs[0].device.type == "cuda" else []
    kwargs = dict(scaling=0.5, dropout_p=0.3, training=True, backend=backend)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(5)
        packed = lora_module.lora_qkv_packed(*inputs, **kwargs)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(5)
        split = ace_kernels.lora_qkv(*inputs, **kwargs)
    assert packed.shape == (2, 5, 18)
    assert torch.equal(packed, torch.cat(split, dim=-1))


def test_torch_non_contiguous_x():
    case = Case("qkv_strided", "qkv", (3, 4), 20, 6, 4, dropout_p=0.3)
    x, weight, bias, lora_a, lora_b = make_inputs(case)
    wide = torch.randn(4, 3, 2 * case.in_features, dtype=torch.float64)
    x_strided = wide.transpose(0, 1)[..., ::2].detach().requires_grad_(True)
    assert not x_strided.is_contiguous() and x_strided.shape == x.shape
    compare_with_oracle(case, (x_strided, weight, bias, lora_a, lora_b), "torch", rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_stride_zero_x_and_a_retained_graph_run_twice(backend, device):
    """x broadcast over its rows (expand: stride 0, one token repeated; the kernels must not write
    through it) gives the oracle's forward and gradients under dropout; a second backward through
    the same graph (retain_graph=True) gives the first's gradients bit for bit (the saved masks,
    or the seed, are read again and not consumed)."""
    case = Case("qkv_expanded", "qkv", (6,), 20, 6, 4, dropout_p=0.3)
    dtype, tol = (torch.float64, 1e-10) if backend == "torch" else (torch.float32, TRITON_RTOL)
    on = device if backend == "triton" else "cpu"
    _, weight, bias, lora_a, lora_b = make_inputs(case, dtype, on)
    token = torch.randn(1, case.in_features, dtype=dtype, device=on, requires_grad=True)
    x = token.expand(6, case.in_features)
    assert x.stride() == (0, 1)
    compare_with_oracle(case, (x, weight, bias, lora_a, lora_b), backend, rtol=tol, atol=tol)
    out = ace_kernels.lora_qkv_packed(x, weight, bias, lora_a, lora_b, scaling=0.5, dropout_p=0.3, training=True,
                                      backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype).to(on)
    first = torch.autograd.grad(out, (token, lora_a, lora_b), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, (token, lora_a, lora_b), grad_out)
    for name, a, b in zip(("x", "lora_a", "lora_b"), first, second, strict=True):
        assert torch.equal(a, b), name


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
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(mask_first, mask_third)


def test_torch_mask_is_documented_rand_of_p_m_in():
    """The torch backend's mask is ``torch.rand([P, M, in]) >= dropout_p`` on the default
    generator (documented, so that a mask can be rebuilt from the generator's state)."""
    case = Case("rand_layout", "qkv", (5,), 7, 4, 2, dropout_p=0.4)
    inputs = make_inputs(case)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        _, mask = call_op(case, inputs, "torch")
        torch.manual_seed(3)
        want = torch.rand(3, 5, 7) >= 0.4
    assert torch.equal(mask, want)


@pytest.mark.parametrize("default_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_torch_mask_does_not_depend_on_the_default_dtype(default_dtype):
    """The uniforms are float32 whatever torch.set_default_dtype says: bfloat16 ones (steps of
    2**-8) kept nothing at dropout_p=0.999 and biased the keep rate of dropout_p=0.1 by 0.2%."""
    case = Case("default_dtype", "linear", (200,), 50, 3, 2, dropout_p=0.999)
    inputs = make_inputs(case, torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        _, want = call_op(case, inputs, "torch")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default_dtype)
        try:
            torch.manual_seed(11)
            _, mask = call_op(case, inputs, "torch")
        finally:
            torch.set_default_dtype(previous)
    assert want.any()
    assert torch.equal(mask, want)


def binomial_bound(n: int, p: float, sigmas: float = 6.0) -> float:
    """|observed keep-rate - (1-p)| bound: 6 standard deviations (false alarm < 1e-8)."""
    return sigmas * math.sqrt(p * (1 - p) / n)


def check_mask_statistics(mask: torch.Tensor, dropout_p: float):
    """Keep rate per projection within the binomial bound; projections, neighbouring columns
    (one Philox draw covers two) and neighbouring rows not copies of each other."""
    flat = mask.reshape(mask.shape[0], -1).to(torch.float64)
    n = flat.shape[1]
    for p in range(flat.shape[0]):
        assert abs(flat[p].mean().item() - (1 - dropout_p)) < binomial_bound(n, dropout_p)
    # Independent keep bits agree on (1-p)^2 + p^2 of the elements; copies on all of them.
    expected = (1 - dropout_p) ** 2 + dropout_p ** 2

    def assert_independent(a, b, what):
        agree = (a == b).to(torch.float64).mean().item()
        assert abs(agree - expected) < binomial_bound(a.numel(), expected), (what, agree, expected)

    for p in range(flat.shape[0]):
        for q in range(p + 1, flat.shape[0]):
            assert_independent(flat[p], flat[q], f"projections {p} and {q}")
    columns = mask.shape[-1] - mask.shape[-1] % 2
    assert_independent(mask[..., 0:columns:2], mask[..., 1:columns:2], "columns 2c and 2c+1")
    assert_independent(mask[..., 1:, :], mask[..., :-1, :], "rows i and i+1")


def test_torch_keep_test_is_inclusive_at_dropout_p():
    """Known answer at the threshold itself (which random p almost never hits): dropout_p is set to
    the uniform that element (0, 0) draws, and that element is kept (documented: kept where the
    number is >= dropout_p), as is every other element whose uniform is at least dropout_p."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        uniforms = torch.rand(1, 3, 5)
    dropout_p = uniforms[0, 0, 0].item()  # a float32 value: exact as a Python float
    assert 0 < dropout_p < 1
    case = Case("inclusive", "linear", (3,), 5, 2, 1, dropout_p=dropout_p)
    inputs = make_inputs(case)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        _, mask = call_op(case, inputs, "torch")
    assert mask[0, 0, 0]
    assert torch.equal(mask, uniforms >= dropout_p)


def test_torch_mask_statistics():
    case = Case("stats", "qkv", (64,), 97, 4, 4, dropout_p=0.1)
    inputs = make_inputs(case, torch.float32)
    _, mask = call_op(case, inputs, "torch")
    check_mask_statistics(mask, case.dropout_p)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_keep_rate_is_one_minus_p_within_half_a_percent(backend, dropout_p, device):
    """On 2 * 10^6 draws per projection (6 sigma is under half a percent of the keep rate): a
    keep rate off by 1% (a biased E[drop(x)]) fails, which the small-mask statistics above let
    pass."""
    rows, in_features = 6000, 333
    if backend == "torch":
        case = Case("rate", "qkv", (rows,), in_features, 4, 4, dropout_p=dropout_p)
        _, mask = call_op(case, make_inputs(case, torch.float32), "torch")
    else:
        # The kernels' own draws, exported (the same Philox numbers whatever the tile: on the
        # CPU, large tiles keep the interpreter fast).
        seed = torch.tensor([20261201], dtype=torch.int64, device=device)
        tiles = dict(BLOCK_M=256, BLOCK_K=512) if device.type == "cpu" else lora_module._GPU_CONFIGS["mask"]["fp32"]
        with _tuning.forced("lora", "mask", "fp32", tiles):
            mask = lora_module._export_masks(seed, rows, in_features, 3, dropout_p).cpu()
    rates = mask.reshape(3, -1).to(torch.float64).mean(dim=1)
    bound = binomial_bound(rows * in_features, dropout_p)
    assert bound < 0.005 * (1 - dropout_p)
    assert ((rates - (1 - dropout_p)).abs() < bound).all(), (rates.tolist(), 1 - dropout_p, bound)


def test_torch_zero_rows():
    case = Case("empty", "qkv", (0,), 8, 3, 2, dropout_p=0.2)
    inputs = make_inputs(case)
    outputs, _ = call_op(case, inputs, "torch")
    assert all(o.shape == (0, 3) for o in outputs)
    sum(o.sum() for o in outputs).backward()
    assert torch.all(inputs[3].grad == 0) and torch.all(inputs[4].grad == 0)


@pytest.mark.parametrize("lora_grads", ["b", "ab"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_x_made_under_inference_mode_trains_the_factors(backend, lora_grads, device):
    # Features of a frozen trunk run under torch.inference_mode: the torch backend saved x itself,
    # which autograd refuses for such a tensor, even with A frozen, where the reference saves only S.
    case = Case("inference_x", "qkv", (2, 3), 17, 5, 3, dropout_p=0.3, x_grad=False, lora_grads=lora_grads)
    inputs = make_inputs(case, torch.float32, device=device if backend == "triton" else "cpu")
    with torch.inference_mode():
        x = inputs[0].clone()
    compare_with_oracle(case, (x, *inputs[1:]), backend, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lora_grads", ["b", ""])
def test_torch_x_made_under_inference_mode_trains_the_base(lora_grads):
    # A trainable base (the torch backend's only) under frozen A: dW = dY^T x reads x, which the Function saves,
    # so an x made under torch.inference_mode must be copied there too, not only when A trains.
    case = Case("inference_x_base", "qkv", (2, 3), 17, 5, 3, dropout_p=0.3, base_grads=True, x_grad=False,
                lora_grads=lora_grads)
    inputs = make_inputs(case, torch.float32)  # float32: the oracle's float64 copy of x is not an inference tensor
    with torch.inference_mode():
        x = inputs[0].clone()
    compare_with_oracle(case, (x, *inputs[1:]), "torch", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lora_grads", ["ab", "a", "b"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_frozen_base_made_under_inference_mode_trains_the_factors(backend, lora_grads, device):
    # The first LoRA layer of a frozen tower loaded under torch.inference_mode: x (the patch embedding's
    # output) needs no gradient, so the backward reads neither W nor b; both backends saved W anyway,
    # which autograd refuses for an inference tensor ("Inference tensors cannot be saved for backward").
    case = Case("inference_base", "qkv", (2, 3), 17, 5, 3, dropout_p=0.3, x_grad=False, lora_grads=lora_grads)
    x, weight, bias, lora_a, lora_b = make_inputs(case, torch.float32, device=device if backend == "triton" else "cpu")
    with torch.inference_mode():
        weight, bias = weight.clone(), bias.clone()
    compare_with_oracle(case, (x, weight, bias, lora_a, lora_b), backend, rtol=1e-4, atol=1e-5)


# (x, W, A, B needing a gradient) -> (x saved, W saved) by the torch backend: W for dX alone; x for dA, dW
# and dB beside dX (create_graph=True recomputes S from it); B alone keeps S only, no mask.
SAVED_BY_NEEDS = [((False, False, True, True), (True, False)), ((False, False, False, True), (False, False)),
                  ((True, False, False, False), (False, True)), ((True, False, False, True), (True, True)),
                  ((False, True, False, False), (True, False))]


@pytest.mark.parametrize("needs,saved", SAVED_BY_NEEDS, ids=lambda v: "".join("ny"[b] for b in v))
def test_torch_saves_only_what_the_wanted_gradients_read(needs, saved):
    case = Case("saved", "qkv", (10,), 16, 4, 2, dropout_p=0.2)
    x, weight, bias, lora_a, lora_b = make_inputs(case, torch.float32)
    need_x, need_w, need_a, need_b = needs
    inputs = (x.requires_grad_(need_x), weight.requires_grad_(need_w), bias, lora_a.requires_grad_(need_a),
              lora_b.requires_grad_(need_b))
    with lora_module.saved_activation_bytes() as record:
        kept, _ = saved_storages(lambda: call_op(case, inputs, "torch"))
    assert (inputs[0].untyped_storage().data_ptr() in kept, inputs[1].untyped_storage().data_ptr() in kept) == saved
    if needs == (False, False, False, True):  # S [M, 3r] alone, as reported
        assert record[0] == {"backend": "torch", "total": 10 * 3 * 2 * 4, "x": 0, "extra": 10 * 3 * 2 * 4}


@pytest.mark.triton
@pytest.mark.parametrize("x_grad", [False, True])
def test_triton_saves_the_weight_for_dx_only(x_grad, device):
    case = Case("saved", "qkv", (10,), 16, 4, 2, dropout_p=0.2, x_grad=x_grad)
    inputs = make_inputs(case, torch.float32, device)
    kept, _ = saved_storages(lambda: call_op(case, inputs, "triton"))
    assert (inputs[1].untyped_storage().data_ptr() in kept) == x_grad


def _triton_saved_and_same_as_a_trained(case, inputs, device):
    """Run the triton op on ``inputs`` (A frozen) under the saved-tensors hooks: (bytes it saves beyond W, b, A
    and B; its saved-bytes record; the storages it keeps). Asserts that the outputs and the gradients of the
    inputs that need one equal bit for bit those of the same call, same seed, with A trained too (x_cat kept)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(5)
        with lora_module.saved_activation_bytes() as record:
            measured, (outputs, _) = saved_storage_bytes(lambda: call_op(case, inputs, "triton"), inputs[1:])
        kept, _ = saved_storages(lambda: call_op(case, inputs, "triton"))
    wanted = [t for t in (inputs[0], inputs[4]) if t.requires_grad]
    grads_out = [torch.randn_like(o) for o in outputs]
    grads = torch.autograd.grad(outputs, wanted, grads_out)
    both = (*inputs[:3], inputs[3].detach().requires_grad_(True), inputs[4])
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(5)
        outputs_both, _ = call_op(case, both, "triton")
    assert all(torch.equal(a, b) for a, b in zip(outputs, outputs_both, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(outputs_both, wanted, grads_out),
                                                 strict=True))
    return measured, record, kept


@pytest.mark.triton
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("op", ["qkv", "linear"])
def test_triton_saves_s_alone_when_only_b_trains(op, training, device):
    # dB = scaling * dY^T S reads S only: x_cat ([x | S | 0]), W, A, B and the seed were all kept anyway.
    # In evaluation too: B trained builds a graph, so the weights are not merged (whose product would keep x).
    case = Case("saved_b", op, (10,), 16, 4, 2, dropout_p=0.2, training=training, x_grad=False, lora_grads="b")
    inputs = make_inputs(case, torch.float32, device)
    measured, record, kept = _triton_saved_and_same_as_a_trained(case, inputs, device)
    # S's columns alone (3 * 2 or 2), not the pad after them in x_cat = [x | S | 0] (24 columns: 16 + 6 or 16 + 2,
    # rounded up to 8), which was kept too (8 columns a row, 4x S for the linear).
    s_cols = 6 if op == "qkv" else 2
    assert measured == 10 * s_cols * 4
    assert record == [{"backend": "triton", "total": 10 * s_cols * 4, "x": 0, "extra": 10 * s_cols * 4}]
    assert not kept & {t.untyped_storage().data_ptr() for t in inputs if t is not None}


@pytest.mark.triton
@pytest.mark.parametrize("lora_grads", ["b", ""], ids=["b_trained", "lora_frozen"])
@pytest.mark.parametrize("op", ["qkv", "linear"])
def test_triton_with_a_frozen_saves_no_x(op, lora_grads, device):
    # With A frozen no gradient reads x (dX's kernel reads G, A and the regenerated masks; dB reads S): x_cat
    # ([x | S | 0]) is not kept, only a copy of S's columns (B trained) and the 8-byte seed, beside W, A and B.
    case = Case("saved_a_frozen", op, (10,), 16, 4, 2, dropout_p=0.2, lora_grads=lora_grads)
    inputs = make_inputs(case, torch.float32, device)
    measured, record, _ = _triton_saved_and_same_as_a_trained(case, inputs, device)
    s_bytes = 10 * (6 if op == "qkv" else 2) * 4 if lora_grads == "b" else 0
    assert measured == s_bytes + 8
    assert record == [{"backend": "triton", "total": s_bytes + 8, "x": 0, "extra": s_bytes + 8}]


def test_torch_selective_checkpointing_that_keeps_every_result():
    """Selective activation checkpointing whose policy keeps the result of every op (not only the matmuls): the
    torch backend updates none of its intermediates in place under it (the block-diagonal B written into zeros,
    S scaled by 1 / keep_prob), or the recomputation raises "Tensor cached during selective activation checkpoint
    has been mutated". Output and gradients equal the plain call's, bit for bit, dropout included."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    def keep_every_result(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE

    context_fn = functools.partial(create_selective_checkpoint_contexts, keep_every_result)
    case = Case("sac_keep_all", "qkv", (2, 3), 8, 4, 2, dropout_p=0.3)
    x, weight, bias, lora_a, lora_b = make_inputs(case)

    def op(x_, a_, b_):
        return lora_module.lora_qkv_packed(x_, weight, bias, a_, b_, scaling=0.5, dropout_p=0.3, training=True,
                                           backend="torch")

    results = []
    for checkpointed in (False, True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            if checkpointed:
                y = checkpoint(op, x, lora_a, lora_b, use_reentrant=False, context_fn=context_fn)
            else:
                y = op(x, lora_a, lora_b)
            results.append((y, *torch.autograd.grad(y.square().sum(), (x, lora_a, lora_b))))
    for name, got, want in zip(("out", "grad x", "grad lora_a", "grad lora_b"), results[1], results[0], strict=True):
        assert torch.equal(got, want), name


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
        measured, _ = saved_storage_bytes(lambda: call_op(case, inputs, "torch"), inputs[1:])
    assert len(record) == 1
    # What the op reports is what autograd holds.
    assert record[0]["total"] == measured
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
    ("x_0d", "linear", 0, lambda t: t[0, 0], r"^argument 'x': expected at least 1 dimension, got 0-D with shape \[\]$"),
    ("x_int", "linear", 0, lambda t: t.to(torch.int64), "argument 'x'"),
    ("weight_1d", "linear", 1, lambda t: t[0], "argument 'weight'"),
    ("weight_in_mismatch", "linear", 1, lambda t: t[:, :9],
     r"^argument 'weight': expected shape \[out, 10\] \(in_features = x.shape\[-1\]\), got \[6, 9\]$"),
    ("weight_in_mismatch_qkv", "qkv", 1, lambda t: t[:, :9],
     r"^argument 'weight': expected shape \[3\*out, 10\] \(in_features = x.shape\[-1\]\), got \[18, 9\]$"),
    ("weight_rows_not_3x", "qkv", 1, lambda t: t[:17], "argument 'weight'"),
    ("weight_dtype", "linear", 1, lambda t: t.double(), "argument 'weight'"),
    ("weight_device", "linear", 1, lambda t: t.to("meta"), "argument 'weight'"),
    ("bias_shape", "linear", 2, lambda t: t[:5], "argument 'bias'"),
    ("bias_2d", "qkv", 2, lambda t: t[None], "argument 'bias'"),
    ("bias_2d_trailing", "linear", 2, lambda t: t[:, None], r"argument 'bias': expected shape \[6\], got \[6, 1\]"),
    ("bias_dtype", "qkv", 2, lambda t: t.half(), "argument 'bias'"),
    ("bias_device", "linear", 2, lambda t: t.to("meta"), "argument 'bias'"),
    ("lora_a_ndim_linear", "linear", 3, lambda t: t[None], "argument 'lora_a'"),
    ("lora_a_ndim_qkv", "qkv", 3, lambda t: t[0], "argument 'lora_a'"),
    ("lora_a_in_mismatch", "qkv", 3, lambda t: t[..., :9], "argument 'lora_a'"),
    ("lora_a_in_mismatch_linear", "linear", 3, lambda t: t[..., :9], "argument 'lora_a'"),
    ("lora_a_device_linear", "linear", 3, lambda t: t.to("meta"), "argument 'lora_a'"),
    ("lora_a_two_projections", "qkv", 3, lambda t: t[:2], "argument 'lora_a'"),
    ("lora_a_rank_zero", "linear", 3, lambda t: t[:0], "argument 'lora_a'"),
    ("lora_a_rank_zero_qkv", "qkv", 3, lambda t: t[:, :0],
     r"argument 'lora_a': expected shape \[3, r, 10\] with r >= 1, got \[3, 0, 10\]"),
    ("lora_a_dtype", "linear", 3, lambda t: t.bfloat16(), "argument 'lora_a'"),
    ("lora_b_rank_mismatch", "linear", 4, lambda t: t[:, :1], "argument 'lora_b'"),
    ("lora_b_out_mismatch", "qkv", 4, lambda t: t[:, :5], "argument 'lora_b'"),
    ("lora_b_dtype", "qkv", 4, lambda t: t.double(), "argument 'lora_b'"),
    ("lora_b_device", "qkv", 4, lambda t: t.to("meta"), "argument 'lora_b'"),
    ("lora_b_device_linear", "linear", 4, lambda t: t.to("meta"), "argument 'lora_b'"),
    ("scaling_tensor", "linear", "scaling", lambda v: torch.tensor(0.5), "argument 'scaling'"),
    ("scaling_none", "qkv", "scaling", lambda v: None, "argument 'scaling'"),
    ("scaling_bool", "qkv", "scaling", lambda v: True, "argument 'scaling'"),
    ("scaling_nan", "linear", "scaling", lambda v: float("nan"), "argument 'scaling': expected a finite number"),
    ("scaling_inf", "qkv", "scaling", lambda v: float("-inf"), "argument 'scaling': expected a finite number"),
    ("scaling_huge_int", "qkv", "scaling", lambda v: 10**400, "argument 'scaling': expected a finite number"),
    ("scaling_complex", "linear", "scaling", lambda v: 1j, "argument 'scaling': expected a Python number, got complex"),
    ("dropout_huge_int", "linear", "dropout_p", lambda v: -10**400,
     r"argument 'dropout_p': expected a float in \[0, 1\)"),
    ("dropout_one", "linear", "dropout_p", lambda v: 1.0, "argument 'dropout_p'"),
    ("dropout_negative", "qkv", "dropout_p", lambda v: -0.1, "argument 'dropout_p'"),
    ("dropout_string", "qkv", "dropout_p", lambda v: "0.1", "argument 'dropout_p'"),
    ("dropout_bool", "linear", "dropout_p", lambda v: False, r"argument 'dropout_p': expected a float .* got False"),
    ("training_not_bool", "linear", "training", lambda v: 1, "argument 'training'"),
    ("backend_unknown", "qkv", "backend", lambda v: "cudnn", "argument 'backend'"),
    ("x_no_features", "linear", 0, lambda t: t[:, :0], "argument 'x'"),
    ("weight_no_rows", "linear", 1, lambda t: t[:0], "argument 'weight'"),
    ("weight_no_rows_qkv", "qkv", 1, lambda t: t[:0], "argument 'weight'"),
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


@pytest.mark.parametrize("op,index,name", [("linear", 1, "weight"), ("qkv", 2, "bias"), ("linear", 3, "lora_a"),
                                           ("qkv", 4, "lora_b")])
def test_a_tensor_on_another_gpu_than_x_is_refused_by_name(op, index, name):
    """A tensor on cuda:1 beside x on cuda:0 (whose kernels would read it as cuda:0 memory) is refused naming
    it and both devices: a check of the device type alone let it through. Fake tensors: the check reads devices
    only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn = ace_kernels.lora_qkv if op == "qkv" else ace_kernels.lora_linear
    with FakeTensorMode():
        args = [t.to("cuda:0") for t in _good(op)]
        args[index] = args[index].to("cuda:1")
        with pytest.raises(ValueError, match=rf"^argument '{name}': expected a tensor on cuda:0 \(like the first "
                                             r"input\), got cuda:1$"):
            fn(*args, scaling=0.5, backend="torch")


@pytest.mark.parametrize("op,index,name", [("linear", 1, "weight"), ("qkv", 2, "bias"), ("qkv", 3, "lora_a"),
                                           ("linear", 4, "lora_b")])
def test_a_dtype_mismatch_names_the_argument_and_the_dtype_of_x(op, index, name):
    args = _good(op)
    args[index] = args[index].double()
    fn = ace_kernels.lora_qkv if op == "qkv" else ace_kernels.lora_linear
    with pytest.raises(ValueError, match=rf"^argument '{name}': expected dtype float32 \(the dtype of 'x'\), "
                                         r"got float64$"):
        fn(*args, scaling=0.5, backend="torch")


@pytest.mark.parametrize("kind", ["numpy_float32", "fraction"])
def test_dropout_p_of_another_number_type_is_float_of_it(kind):
    """dropout_p may be any real number (Python's or NumPy's): the call uses float(dropout_p),
    not the object itself (np.float32(0.1) is not 0.1: 1 / (1 - p) and the mask would differ)."""
    import numpy as np
    from fractions import Fraction

    dropout_p = np.float32(0.1) if kind == "numpy_float32" else Fraction(1, 10)
    args = make_inputs(Case("p_type", "qkv", (6,), 8, 3, 2))
    outs = []
    for p in (dropout_p, float(dropout_p)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outs.append(lora_module.lora_qkv_packed(*args, scaling=0.5, dropout_p=p, training=True, backend="torch"))
    assert torch.equal(outs[0], outs[1])


def test_torch_second_derivatives():
    """The torch backend's backward is built from differentiable ops: gradgradcheck in fp64."""
    case = Case("gg", "qkv", (3,), 5, 4, 2)
    x, weight, bias, lora_a, lora_b = make_inputs(case)

    def op(x_, a_, b_):
        return lora_module.lora_qkv_packed(x_, weight, bias, a_, b_, scaling=0.5, backend="torch")

    assert torch.autograd.gradgradcheck(op, (x, lora_a, lora_b))


def test_torch_create_graph_with_dropout_matches_oracle():
    """With create_graph=True the torch backward recomputes S = drop(x) A^T with a graph (for a
    differentiable dB), which must apply the forward's mask: the first-order gradients taken so
    and the second derivatives of <grads, v> match the fp64 oracle's with the exported mask.
    (gradgradcheck cannot tell: a backward that recomputed S without the mask is wrong but
    differentiated consistently.)"""
    case = Case("gg_dropout", "qkv", (2, 3), 7, 4, 2, dropout_p=0.4)
    inputs = make_inputs(case)
    outputs, mask = call_op(case, inputs, "torch")
    oracle_inputs = fp64_leaves(*inputs)
    expected = call_oracle(case, oracle_inputs, mask.to(torch.float64))
    gen = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in expected]
    names, wrt = ("x", "lora_a", "lora_b"), (0, 3, 4)
    got = torch.autograd.grad(outputs, [inputs[i] for i in wrt], grads_out, create_graph=True)
    want = torch.autograd.grad(expected, [oracle_inputs[i] for i in wrt], grads_out, create_graph=True)
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")
    probes = [torch.randn(g.shape, generator=gen, dtype=torch.float64) for g in want]
    got2 = torch.autograd.grad(sum((g * v).sum() for g, v in zip(got, probes, strict=True)), [inputs[i] for i in wrt])
    want2 = torch.autograd.grad(sum((w * v).sum() for w, v in zip(want, probes, strict=True)),
                                [oracle_inputs[i] for i in wrt])
    for name, g, w in zip(names, got2, want2, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"second derivative {name}: {m}")


def test_torch_create_graph_with_b_alone_trained_matches_oracle():
    """create_graph=True with x and A frozen (B alone trained): the Function saved S alone, neither x
    nor A, so the backward must use that S and not recompute it (which reads x and A): dB matches the
    fp64 oracle's with the exported mask, and is differentiable in the output gradient."""
    case = Case("gg_b_alone", "qkv", (2, 3), 7, 4, 2, dropout_p=0.4, x_grad=False, lora_grads="b")
    inputs = make_inputs(case)
    outputs, mask = call_op(case, inputs, "torch")
    oracle_inputs = fp64_leaves(*inputs)
    expected = call_oracle(case, oracle_inputs, mask.to(torch.float64))
    gen = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64).requires_grad_(True) for o in expected]
    (got,) = torch.autograd.grad(outputs, inputs[4], grads_out, create_graph=True)
    (want,) = torch.autograd.grad(expected, oracle_inputs[4], grads_out, create_graph=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    probe = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    got2 = torch.autograd.grad((got * probe).sum(), grads_out)
    want2 = torch.autograd.grad((want * probe).sum(), grads_out)
    for g, w in zip(got2, want2, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_backward_inside_autocast_matches_backward_outside(backend, device):
    """A forward outside autocast and its backward() called inside an autocast region: the
    backward runs as the forward did (autograd would otherwise run its products in the
    autocast dtype, or fail on mixed dtypes)."""
    case = Case("ac_bwd", "qkv", (3, 5), 24, 8, 4, dropout_p=0.2)
    inputs = make_inputs(case, torch.float32, device)
    grads = []
    for inside in (False, True):
        torch.manual_seed(0)
        y = lora_module.lora_qkv_packed(*inputs, scaling=0.5, dropout_p=0.2, training=True, backend=backend)
        leaves = [t for t in inputs if t is not None and t.requires_grad]
        with torch.autocast(device.type, dtype=torch.float16, enabled=inside):
            grads.append(torch.autograd.grad(y.square().sum(), leaves))
    for want, got in zip(*grads, strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.triton
def test_triton_large_scaling_keeps_fp16_finite(device):
    """S is stored unscaled (scaling goes into the packed weight): a large scaling whose
    product with S exceeds fp16's range, but whose output does not, stays finite, as with torch."""
    case = Case("big_scale", "qkv", (6,), 32, 8, 4, dropout_p=0.0)
    x, weight, bias, lora_a, lora_b = make_inputs(case, torch.float16, device)
    with torch.no_grad():
        lora_a.copy_(torch.full_like(lora_a, 0.25))  # S = 0.25 * sum(x) per row: O(1..10)
        lora_b.copy_(torch.full_like(lora_b, 1e-4))
        x.copy_(x.abs() + 0.5)  # rows sum to ~32: |S| ~ 8, scaling * S ~ 2.4e5 > 65504
    outs = {b: lora_module.lora_qkv_packed(x, weight, bias, lora_a, lora_b, scaling=3e4, backend=b)
            for b in ("torch", "triton")}
    assert torch.isfinite(outs["torch"]).all() and torch.isfinite(outs["triton"]).all()
    torch.testing.assert_close(outs["triton"].float(), outs["torch"].float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autocast_casts_operands_like_linear(backend, params_dtype, device):
    """Under autocast the op runs on the operands cast to the autocast dtype (as F.linear
    does, bfloat16 operands under float16 autocast included): the same result, bit for bit, as
    the call on explicitly cast operands, and the parameters still get gradients in their
    own dtype (x stays float32)."""
    case = Case("ac", "qkv", (4, 3), 24, 8, 4)
    x, weight, bias, lora_a, lora_b = make_inputs(case, torch.float32, device)
    weight, bias = weight.to(params_dtype), bias.to(params_dtype)
    lora_a, lora_b = (t.detach().to(params_dtype).requires_grad_(True) for t in (lora_a, lora_b))
    dtype = torch.float16  # the interpreter's bfloat16 arithmetic is wrong; fp16 autocast runs on CPU too
    with torch.autocast(device.type, dtype=dtype):
        got = lora_module.lora_qkv_packed(x, weight, bias, lora_a, lora_b, scaling=0.5, backend=backend)
        assert torch.nn.functional.linear(x, weight, bias).dtype == dtype
    want = lora_module.lora_qkv_packed(*(t.to(dtype) for t in (x, weight, bias, lora_a, lora_b)), scaling=0.5,
                                       backend=backend)
    assert got.dtype == dtype and torch.equal(got, want)
    got.float().sum().backward()
    assert lora_a.grad.dtype == params_dtype and lora_b.grad.dtype == params_dtype
    assert x.grad.dtype == torch.float32 and lora_a.grad.abs().sum() > 0


def test_cuda_backend_is_refused_naming_the_ops_backends():
    # LoRA has no CUDA kernels (cuBLAS and Triton do its work): a bad argument on any machine.
    with pytest.raises(ValueError, match=r"argument 'backend': expected one of \('auto', 'triton', 'torch'\), got "
                                         r"'cuda' \(lora_linear: no cuda backend\)"):
        ace_kernels.lora_linear(*_good("linear"), scaling=0.5, backend="cuda")


def test_lora_qkv_packed_errors_name_lora_qkv_packed(monkeypatch):
    """lora_qkv_packed runs lora_qkv's op, whose name its backend errors gave: a caller of lora_qkv_packed read of
    a function it did not call. Each now names lora_qkv_packed (lora_qkv's still name lora_qkv)."""
    inputs = _good("qkv")
    with pytest.raises(ValueError, match=r"got 'cuda' \(lora_qkv_packed: no cuda backend\)"):
        ace_kernels.lora_qkv_packed(*inputs, scaling=0.5, backend="cuda")
    with pytest.raises(ValueError, match=r"got 'cuda' \(lora_qkv: no cuda backend\)"):
        ace_kernels.lora_qkv(*inputs, scaling=0.5, backend="cuda")
    # Under the interpreter (the conftest's) Triton refuses bfloat16; without it, it needs a GPU: refused either way.
    with pytest.raises(RuntimeError, match=r"^lora_qkv_packed: backend 'triton' cannot run this call: "):
        ace_kernels.lora_qkv_packed(*(t.bfloat16() for t in inputs), scaling=0.5, backend="triton")
    monkeypatch.setenv("ACE_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"^lora_qkv_packed: backend 'cuda' \(from the environment variable "
                                           r"ACE_KERNELS_BACKEND\) cannot run this call: op 'lora_qkv_packed' has no "):
        ace_kernels.lora_qkv_packed(*inputs, scaling=0.5)


# ----------------------------------------------------------------------------------------
# triton backend (CPU: interpreter, fp32, tiny shapes; GPU: bf16 at real shapes)
# ----------------------------------------------------------------------------------------

TRITON_CASES = [
    Case("t_linear_r1_odd", "linear", (5,), 40, 7, 1, dropout_p=0.2),
    Case("t_linear_r7_nobias", "linear", (2, 3), 40, 7, 7, bias=False, dropout_p=0.3),
    Case("t_linear_eval", "linear", (4,), 11, 5, 2, dropout_p=0.5, training=False),
    Case("t_qkv_r4", "qkv", (2, 3), 40, 7, 4, dropout_p=0.25),
    Case("t_qkv_r1_nobias", "qkv", (9,), 40, 7, 1, bias=False, dropout_p=0.1),
    Case("t_qkv_r7_no_dropout", "qkv", (3, 2), 17, 7, 7),
    Case("t_qkv_single_row", "qkv", (1,), 9, 5, 4, dropout_p=0.5),
    Case("t_qkv_1d_x_x_frozen", "qkv", (), 12, 6, 3, dropout_p=0.3, x_grad=False),
    Case("t_linear_x_frozen_no_dropout", "linear", (33,), 20, 35, 5, x_grad=False),
    # Two row blocks, two K blocks and column tiles straddling projections (interpreter tiles are 32).
    Case("t_qkv_multi_tile", "qkv", (37,), 45, 13, 4, dropout_p=0.1),
    # Evaluation applies no dropout: a dropout_p past the training limit (0.999237) still runs.
    Case("t_qkv_eval_p_near_one", "qkv", (4,), 8, 3, 2, dropout_p=0.9999, training=False),
    # One LoRA factor frozen, or both: the kernels' dX and dA/dB switches taken apart.
    Case("t_qkv_a_frozen", "qkv", (2, 3), 17, 5, 3, dropout_p=0.3, lora_grads="b"),
    Case("t_linear_b_frozen", "linear", (5,), 11, 4, 2, dropout_p=0.2, lora_grads="a"),
    Case("t_qkv_lora_frozen", "qkv", (4,), 9, 3, 2, dropout_p=0.4, lora_grads=""),
    # dX without dA (the gradient kernel's COMPUTE_DA off) for one projection, and over several tiles.
    Case("t_linear_a_frozen", "linear", (6,), 13, 5, 3, dropout_p=0.3, lora_grads="b"),
    Case("t_qkv_multi_tile_a_frozen", "qkv", (37,), 45, 13, 4, dropout_p=0.1, lora_grads="b"),
    Case("t_qkv_in1_out1", "qkv", (3,), 1, 1, 1, dropout_p=0.5),
]

# fp32 kernels (IEEE dots) against the fp64 oracle: reductions over <= 45 terms of O(1)
# values in fp32 lose ~1e-6; the bound leaves a margin of 10x.
TRITON_RTOL, TRITON_ATOL = 1e-4, 1e-5


@pytest.mark.triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.name)
def test_triton_matches_oracle(case, device):
    compare_with_oracle(case, make_inputs(case, torch.float32, device), "triton", rtol=TRITON_RTOL, atol=TRITON_ATOL)


class _EmptyRecorder:
    """Stands in for ``torch`` in ``ace_kernels.lora``: records the shape and dtype of every ``torch.empty``."""

    def __init__(self):
        self.made = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *args, **kwargs):
        tensor = torch.empty(*args, **kwargs)
        self.made.append((tuple(tensor.shape), tensor.dtype))
        return tensor


@pytest.mark.triton
@pytest.mark.parametrize("lora_grads", ["ab", "b", ""])
def test_triton_dx_alone_allocates_no_da_partials(lora_grads, monkeypatch, device):
    """The gradient kernel's dA partials (fp32 [row blocks, P*r, K]) are allocated when dA is wanted only: with
    A frozen (B trained, or neither) the backward makes none with a row."""
    case = Case("partials", "qkv", (70,), 24, 6, 2, dropout_p=0.3, lora_grads=lora_grads)
    inputs = make_inputs(case, torch.float32, device)
    outputs, _ = call_op(case, inputs, "triton")
    recorder = _EmptyRecorder()
    monkeypatch.setattr(lora_module, "torch", recorder)
    torch.autograd.grad(outputs, [t for t in inputs if t is not None and t.requires_grad],
                        [torch.ones_like(o) for o in outputs])
    partials = [shape for shape, dtype in recorder.made
                if dtype == torch.float32 and len(shape) == 3 and shape[1:] == (3 * case.rank, case.in_features)]
    assert len(partials) == 1, recorder.made
    assert (partials[0][0] > 0) == ("a" in lora_grads), partials


@pytest.mark.triton
def test_triton_backward_regenerates_forward_mask(device):
    """dX and dA depend elementwise on the mask: matching the oracle run with the exported
    mask (and not with another mask) shows backward regenerated the forward's mask."""
    case = Case("regen", "qkv", (20,), 24, 6, 2, dropout_p=0.5)
    inputs = make_inputs(case, torch.float32, device)
    mask, grads = compare_with_oracle(case, inputs, "triton", rtol=TRITON_RTOL, atol=TRITON_ATOL)
    # Sensitivity: the oracle's gradients with the q and k masks swapped differ from the op's
    # (so matching the oracle above was a statement about the mask backward used).
    oracle_inputs = fp64_leaves(*[t if t is None else t.cpu() for t in inputs])
    outputs = call_oracle(case, oracle_inputs, mask[[1, 0, 2]].to(torch.float64).cpu())
    gen = torch.Generator().manual_seed(1)  # compare_with_oracle's output gradients
    grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outputs]
    want_x, want_a = torch.autograd.grad(outputs, [oracle_inputs[0], oracle_inputs[3]], grads_out)
    assert not torch.allclose(grads["x"].cpu().double(), want_x, rtol=TRITON_RTOL, atol=TRITON_ATOL)
    assert not torch.allclose(grads["lora_a"].cpu().double(), want_a, rtol=TRITON_RTOL, atol=TRITON_ATOL)


@pytest.mark.triton
def test_triton_fp16_dx_adds_the_lora_term_in_fp32(device):
    """dX = dY W + scaling * sum_p G_p A_p is rounded twice in float16 (module notes): dY W by the GEMM, then
    once after the LoRA term is added to it in fp32, not rounded to float16 on its own first. dY, W and B
    are small dyadic numbers, so dY W and G_p = dY_p B_p are exact in float16 and the only roundings left are
    the sum's and the fp32 sums in the dots G_p A_p: each element of dX is the float16 nearest the exact value
    (up to those fp32 sums). A LoRA term rounded to float16 before the add is off by half an ulp of the term,
    many ulp of dX where dY W nearly cancels it."""
    gen = torch.Generator().manual_seed(7)
    rows, in_features, out_features, rank = 37, 40, 13, 4

    def dyadic(*shape, scale):
        return torch.randint(-4, 5, shape, generator=gen).to(torch.float64) * scale

    x = torch.randn(rows, in_features, generator=gen, dtype=torch.float64)
    weight = dyadic(3 * out_features, in_features, scale=1 / 8)
    lora_a = torch.randn(3, rank, in_features, generator=gen, dtype=torch.float64)
    lora_b = dyadic(3, out_features, rank, scale=1 / 4)
    grad_y = dyadic(rows, 3 * out_features, scale=1 / 2)
    x16 = x.to(device, torch.float16).requires_grad_(True)
    outputs = ace_kernels.lora_qkv(x16, weight.to(device, torch.float16), None, lora_a.to(device, torch.float16),
                                   lora_b.to(device, torch.float16), scaling=0.5, training=True, backend="triton")
    (got,) = torch.autograd.grad(outputs, x16, grad_y.to(device, torch.float16).chunk(3, dim=-1))
    lora_a64 = lora_a.to(torch.float16).double()  # the values the kernels read
    g = [grad_y[:, p * out_features:(p + 1) * out_features] @ lora_b[p] for p in range(3)]
    want = grad_y @ weight + 0.5 * sum(g[p] @ lora_a64[p] for p in range(3))
    fp32_dots = 2.0 ** -19 * 0.5 * sum(g[p].abs() @ lora_a64[p].abs() for p in range(3))  # the terms' fp32 sums
    ulp = torch.ldexp(torch.ones_like(want), torch.frexp(want).exponent - 11).clamp_min(2.0 ** -24)
    err = (got.cpu().double() - want).abs()
    assert (err <= 0.5 * ulp + fp32_dots).all(), f"up to {(err / ulp).max().item():.3f} ulp of dX"


@pytest.mark.triton
def test_triton_fp16_da_sums_its_row_blocks_in_fp32(device):
    """dA_p = scaling * G_p^T x in float16 is rounded once (module notes): the gradient kernel's per-row-block
    partials are float32 and summed in float32 before the one rounding to float16. dY and B are small dyadic
    numbers, so G_p = dY_p B_p is exact in float16 and each product with x in float32: each element of dA is
    the float16 nearest the exact value, up to the fp32 sums. Partials rounded to float16 (70 rows: three row
    blocks under the interpreter) add half an ulp of each partial, many ulp of dA where they cancel."""
    gen = torch.Generator().manual_seed(8)
    rows, in_features, out_features, rank = 70, 40, 13, 4

    def dyadic(*shape, scale):
        return torch.randint(-4, 5, shape, generator=gen).to(torch.float64) * scale

    x = torch.randn(rows, in_features, generator=gen, dtype=torch.float64).to(torch.float16)
    weight = torch.randn(3 * out_features, in_features, generator=gen, dtype=torch.float64)
    lora_a = torch.randn(3, rank, in_features, generator=gen, dtype=torch.float64).to(device, torch.float16)
    lora_b = dyadic(3, out_features, rank, scale=1 / 4)
    grad_y = dyadic(rows, 3 * out_features, scale=1 / 2)
    lora_a.requires_grad_(True)
    outputs = ace_kernels.lora_qkv(x.to(device), weight.to(device, torch.float16), None, lora_a,
                                   lora_b.to(device, torch.float16), scaling=0.5, training=True, backend="triton")
    (got,) = torch.autograd.grad(outputs, lora_a, grad_y.to(device, torch.float16).chunk(3, dim=-1))
    x64 = x.double()
    g = [grad_y[:, p * out_features:(p + 1) * out_features] @ lora_b[p] for p in range(3)]
    want = torch.stack([0.5 * g[p].t() @ x64 for p in range(3)])
    fp32_sums = torch.stack([2.0 ** -19 * 0.5 * g[p].abs().t() @ x64.abs() for p in range(3)])
    ulp = torch.ldexp(torch.ones_like(want), torch.frexp(want).exponent - 11).clamp_min(2.0 ** -24)
    err = (got.cpu().double() - want).abs()
    assert (err <= 0.5 * ulp + fp32_sums).all(), f"up to {(err / ulp).max().item():.3f} ulp of dA"


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["column_strided", "row_strided"])
def test_triton_strided_x(layout, device):
    """The pack kernel reads x through both its strides: every other column of a wider tensor,
    and a column slice of one (unit column stride, row stride not in_features, as the first
    half of a packed activation): forward and every gradient against the oracle."""
    case = Case("strided", "qkv", (10,), 20, 6, 4, dropout_p=0.3)
    x, weight, bias, lora_a, lora_b = make_inputs(case, torch.float32, device)
    wide = torch.randn(10, 2 * case.in_features, device=device)
    if layout == "column_strided":
        x_strided = wide[:, ::2].detach().requires_grad_(True)
        assert x_strided.stride() == (2 * case.in_features, 2)
    else:
        x_strided = wide[:, :case.in_features].detach().requires_grad_(True)
        assert x_strided.stride() == (2 * case.in_features, 1)
    compare_with_oracle(case, (x_strided, weight, bias, lora_a, lora_b), "triton", rtol=TRITON_RTOL, atol=TRITON_ATOL)


@pytest.mark.triton
@pytest.mark.parametrize("op", ["qkv", "linear"])
def test_triton_non_contiguous_lora_a(op, device):
    """The pack and gradient kernels read A through its strides: an A stored [.., in, r] and
    transposed (column stride r) gives the oracle's forward and gradients, dA included."""
    case = Case("a_strided", op, (10,), 20, 6, 4, dropout_p=0.3)
    x, weight, bias, lora_a, lora_b = make_inputs(case, torch.float32, device)
    a_strided = lora_a.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(True)
    assert torch.equal(a_strided, lora_a) and a_strided.stride()[-2:] == (1, case.rank)
    compare_with_oracle(case, (x, weight, bias, a_strided, lora_b), "triton", rtol=TRITON_RTOL, atol=TRITON_ATOL)


def in_wide_storage(values: torch.Tensor, strides: tuple, offset: int) -> torch.Tensor:
    """``values`` copied into a view with ``strides`` and storage ``offset`` of a storage just large
    enough for it (never written elsewhere: on a CPU its untouched pages take no memory)."""
    size = offset + sum((n - 1) * s for n, s in zip(values.shape, strides, strict=True)) + 1
    storage = torch.empty(size, dtype=values.dtype, device=values.device)
    return storage.as_strided(values.shape, strides, offset).copy_(values)


# A stride just under 2**31 elements (a 32-bit kernel argument) whose double wraps in int32 to
# -128: the storage starts 128 elements before the view, so a wrapped offset reads the storage's
# own (unwritten) first elements, silently, rather than memory outside it.
_WIDE_STRIDE, _WIDE_OFFSET = 2**31 - 64, 128


@pytest.mark.triton
@pytest.mark.parametrize("op", ["qkv", "linear"])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_triton_lora_a_offsets_past_int32(op, layout, device):
    """An A whose rank rows, or columns, lie 2**31 - 64 elements apart, as in a narrow view of a
    very wide tensor (fp16: an 8 GiB storage, of which a few pages are touched): the kernels
    give what they give for a contiguous copy of it, bit for bit, forward and every gradient,
    dropout on (the same seed). Rank row 2's offset, 2 * stride, wrapped in int32 in both
    kernels, and column 2's in the pack kernel's K loop, which read other memory for them."""
    rank, in_features = 3, 20 if layout == "rows" else 3
    case = Case("a_wide", op, (10,), in_features, 6, rank, dropout_p=0.3)
    x, weight, bias, lora_a, lora_b = make_inputs(case, torch.float16, device)
    projections = 3 if op == "qkv" else 1
    if layout == "rows":  # projections side by side in each rank row: [P, r, K] strides (K, stride, 1)
        strides = (in_features, _WIDE_STRIDE, 1)
    else:  # A^T stored, as a few columns of a wide [K, *] tensor: strides (r, 1, stride)
        strides = (rank, 1, _WIDE_STRIDE)
    lora_a3 = lora_a.detach().reshape(projections, rank, in_features)
    wide = in_wide_storage(lora_a3, strides, _WIDE_OFFSET)
    wide = (wide if op == "qkv" else wide[0]).requires_grad_(True)
    assert torch.equal(wide, lora_a)
    assert sum((n - 1) * s for n, s in zip(wide.shape, wide.stride(), strict=True)) >= 2**31
    devices = [device] if device.type == "cuda" else []
    results = []
    for a in (wide, lora_a):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(3)
            outputs, _ = call_op(case, (x, weight, bias, a, lora_b), "triton")
        grads_out = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o) for o in outputs]
        results.append(outputs + torch.autograd.grad(outputs, (x, a, lora_b), grads_out))
    names = ["out"] * len(outputs) + ["grad x", "grad lora_a", "grad lora_b"]
    for name, got, want in zip(names, *results, strict=True):
        assert torch.equal(got, want), name


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_triton_bias_of_any_layout(layout, device):
    # The kernel reads the bias with unit stride: a strided slice or an expanded (stride 0)
    # bias must give the values it holds, not its neighbours or memory past its one element.
    case = Case("bias_layout", "qkv", (10,), 20, 6, 4, dropout_p=0.3)
    x, weight, bias, lora_a, lora_b = make_inputs(case, torch.float32, device)
    if layout == "strided":
        odd_bias = torch.randn(2 * bias.numel(), device=device)[::2]
    else:
        odd_bias = torch.randn(1, device=device).expand(bias.numel())
    assert odd_bias.stride() == ((2,) if layout == "strided" else (0,))
    compare_with_oracle(case, (x, weight, odd_bias, lora_a, lora_b), "triton", rtol=TRITON_RTOL, atol=TRITON_ATOL)


@pytest.mark.triton
def test_triton_mask_statistics_and_independence(device):
    case = Case("stats", "qkv", (64,), 97, 4, 4, dropout_p=0.1)  # odd K: draws straddle row ends
    inputs = make_inputs(case, torch.float32, device)
    _, first = call_op(case, inputs, "triton")
    check_mask_statistics(first.cpu(), case.dropout_p)
    _, second = call_op(case, inputs, "triton")
    # Successive calls draw new seeds: masks agree only as independent draws would.
    agree = (first == second).to(torch.float64).mean().item()
    expected = 0.9 ** 2 + 0.1 ** 2
    assert abs(agree - expected) < binomial_bound(first.numel(), expected)


@pytest.mark.triton
def test_triton_same_seed_same_output(device):
    case = Case("seed", "qkv", (6,), 16, 5, 2, dropout_p=0.4)
    inputs = make_inputs(case, torch.float32, device)
    devices = [device] if device.type == "cuda" else []
    results = []
    for _ in range(2):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(11)
            results.append(call_op(case, inputs, "triton"))
    (out_a, mask_a), (out_b, mask_b) = results
    assert torch.equal(mask_a, mask_b)
    for a, b in zip(out_a, out_b, strict=True):
        assert torch.equal(a, b)


@pytest.mark.triton
def test_triton_masks_come_from_the_documented_seed_draw(device):
    """The triton backend's masks are Philox's for one seed drawn as documented (torch.randint(0, 2**63 - 1)
    on x's device), so they can be rebuilt from the generator's state: the masks of a call equal the
    export for the seed that draw gives from the same state (a seed drawn from another range, 31 bits say,
    leaves the generator where this one does but gives other masks)."""
    case = Case("seed_draw", "qkv", (6,), 16, 5, 2, dropout_p=0.4)
    inputs = make_inputs(case, torch.float32, device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(13)
        _, mask = call_op(case, inputs, "triton")
        torch.manual_seed(13)
        seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=device)
    assert torch.equal(mask, lora_module._export_masks(seed, 6, 16, 3, 0.4))


@pytest.mark.triton
def test_triton_exported_mask_is_deterministic_per_seed(device):
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    first = lora_module._export_masks(seed, 7, 33, 3, 0.3)
    again = lora_module._export_masks(seed, 7, 33, 3, 0.3)
    other = lora_module._export_masks(seed + 1, 7, 33, 3, 0.3)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # The single-projection op uses lane 0 of the same stream.
    assert torch.equal(lora_module._export_masks(seed, 7, 33, 1, 0.3)[0], first[0])


def _philox4x32_10(counter, seed: int) -> list:
    """Philox4x32-10 (Salmon et al., SC 2011) of the 64-bit ``counter`` (words c0, c1 = its low and
    high halves, c2 = c3 = 0) under the 64-bit key ``seed``, as Triton's ``randint4x`` takes
    them; the four 32-bit output words, in NumPy (uint64 holding 32-bit values)."""
    import numpy as np

    mask = np.uint64(0xFFFFFFFF)
    c = [counter & mask, counter >> np.uint64(32), np.zeros_like(counter), np.zeros_like(counter)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p1 = m0 * c[0], m1 * c[2]  # 32 x 32 bits: exact in 64
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c


@pytest.mark.triton
@pytest.mark.parametrize("in_features,rng_offset", [(33, 0), (8, 0), (33, 2**32 + 5)])
def test_triton_masks_are_the_documented_philox_stream(device, in_features, rng_offset):
    """A known-answer test of the masks' keying (``_keep_bits``): element (row, column) of projection
    p is kept where the 16-bit half (low for an even column, high for an odd one) of word p of
    Philox4x32-10(key = seed, counter = rng_offset + row * ceil(in / 2) + column // 2) is at least
    round(p * 2**16). An odd in_features keeps its padding pair: rows do not share draws."""
    import numpy as np

    rows, dropout_p, seed = 6, 0.3, 0x1234_5678_9ABC
    got = lora_module._export_masks(torch.tensor([seed], dtype=torch.int64, device=device), rows, in_features, 3,
                                    dropout_p, rng_offset=rng_offset).cpu()
    bits = _documented_keep_bits(seed, rows, in_features, rng_offset)
    want = bits >= round(dropout_p * 2**16)
    assert torch.equal(got, torch.from_numpy(want))


def _documented_keep_bits(seed: int, rows: int, in_features: int, rng_offset: int = 0):
    """The 16 bits [P=3, rows, in] each element's keep test compares (see the test above)."""
    import numpy as np

    pairs = (in_features + 1) // 2
    row, col = np.meshgrid(np.arange(rows), np.arange(in_features), indexing="ij")
    counter = np.uint64(rng_offset) + (row * pairs + col // 2).astype(np.uint64)
    words = _philox4x32_10(counter, seed)
    half = np.where(col % 2 == 0, 0, 16).astype(np.uint64)
    return np.stack([(words[p] >> half) & np.uint64(0xFFFF) for p in range(3)]).astype(np.int64)


@pytest.mark.triton
@pytest.mark.parametrize("projection", [0, 1, 2])
@pytest.mark.parametrize("column", [0, 1])
def test_triton_keep_test_is_inclusive_at_the_threshold(projection, column, device):
    """Known answer at the threshold itself (which random p almost never hits): dropout_p is
    chosen so that round(p * 2**16) equals the 16 bits of element (0, column) of a projection
    (each lane and half of the Philox word): that element is kept (bits >= threshold)."""
    rows, in_features, seed = 4, 8, 0x1234_5678_9ABC
    bits = _documented_keep_bits(seed, rows, in_features)
    threshold = int(bits[projection, 0, column])
    dropout_p = threshold / 2**16
    assert 0 < threshold and round(dropout_p * 2**16) == threshold
    got = lora_module._export_masks(torch.tensor([seed], dtype=torch.int64, device=device), rows, in_features, 3,
                                    dropout_p).cpu()
    assert got[projection, 0, column]
    assert torch.equal(got, torch.from_numpy(bits >= threshold))


@pytest.mark.triton
@pytest.mark.parametrize("dropout_p", [0.3, 0.1])
def test_triton_inverted_dropout_scale_is_exactly_one_over_keep_prob(dropout_p, device):
    """The forward's scale is 1 / (1 - dropout_p) itself, not 1 over the 16-bit threshold's keep
    rate (off by ~5e-6 relative, under the oracle tolerances elsewhere): in = r = 1 and
    x = A = B = 1, so each kept output is one product, compared at rtol 1e-6."""
    case = Case("inv_keep", "linear", (64,), 1, 1, 1, bias=False, dropout_p=dropout_p)
    x = torch.ones(64, 1, device=device, requires_grad=True)
    weight = torch.zeros(1, 1, device=device)
    lora_a = torch.ones(1, 1, device=device, requires_grad=True)
    lora_b = torch.ones(1, 1, device=device, requires_grad=True)
    (y,), mask = call_op(case, (x, weight, None, lora_a, lora_b), "triton", scaling=1.0)
    assert mask.any() and not mask.all()
    (want,) = call_oracle(case, fp64_leaves(x, weight, None, lora_a, lora_b), mask.double(), scaling=1.0)
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dropout_p,training", [(0.0, True), (0.3, False)], ids=["p0", "eval"])
def test_no_dropout_draws_no_random_numbers(backend, dropout_p, training, device):
    """A call that applies no dropout (dropout_p = 0, or training=False) leaves torch's
    generator as it was: downstream random numbers are those of a run without the call."""
    case = Case("no_rng", "qkv", (4,), 8, 3, 2, dropout_p=dropout_p, training=training)
    _assert_generator_after_call(case, backend, device, lambda dev: None)


def _assert_generator_after_call(case, backend, device, draw):
    """After ``case``'s call from seed 0, torch's generator (on the inputs' device) is where ``draw(device)``
    from seed 0 leaves it: the next numbers drawn are the same."""
    inputs = make_inputs(case, torch.float32, device if backend == "triton" else "cpu")
    dev = inputs[0].device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(0)
        call_op(case, inputs, backend)
        after = torch.rand(5, device=dev)
        torch.manual_seed(0)
        draw(dev)
        assert torch.equal(after, torch.rand(5, device=dev))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_a_dropout_call_advances_the_generator_by_its_documented_draw(backend, device):
    """The generator after a call is where the documented draw leaves it (torch: rand [P, M, in]
    in float32; triton: one randint seed on x's device), so the two backends leave it in
    different states and what is drawn after the call depends on the backend."""
    case = Case("rng_after", "qkv", (2, 3), 10, 4, 2, dropout_p=0.3)
    if backend == "torch":
        _assert_generator_after_call(case, backend, device,
                                     lambda dev: torch.rand((3, 6, 10), dtype=torch.float32, device=dev))
    else:
        _assert_generator_after_call(case, backend, device,
                                     lambda dev: torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=dev))


@pytest.mark.triton
def test_triton_refuses_second_derivatives(device):
    case = Case("gg", "qkv", (3,), 5, 4, 2)
    x, weight, bias, lora_a, lora_b = make_inputs(case, torch.float32, device)
    y = lora_module.lora_qkv_packed(x, weight, bias, lora_a, lora_b, scaling=0.5, backend="triton")
    with pytest.raises(RuntimeError, match=r"lora_qkv_packed \(backend 'triton'\): second derivatives"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    # A plain backward still works after the refusal.
    y = lora_module.lora_qkv_packed(x, weight, bias, lora_a, lora_b, scaling=0.5, backend="triton")
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx.shape == x.shape


def test_triton_declines_what_its_grid_and_threshold_cannot_do():
    from ace_kernels.lora import _MAX_GRID_Y, _config, _triton_reasons

    block_k = _config("backward", torch.float32, torch.device("cpu"))["BLOCK_K"]
    wide = _MAX_GRID_Y * block_k

    def reasons(x, in_features=8, p=0.0):
        # Stride-0 views: only shapes and dtypes are read.
        w, a, b = torch.empty(1).expand(24, in_features), torch.empty(1).expand(3, 2, in_features), torch.empty(3, 8, 2)
        return [r for r in _triton_reasons(x, w, None, a, b, 0.5, p, True) if "triton failed to import" not in r]

    # Rows are grid dimension x (no practical limit); in_features' blocks are dimension y.
    fits = torch.empty(1).expand(_MAX_GRID_Y * 256 + 1, 8)
    assert reasons(fits) == []
    assert reasons(torch.empty(1).expand(1, wide), wide) == []
    assert any("column blocks" in r for r in reasons(torch.empty(1).expand(1, wide + 1), wide + 1))
    assert reasons(fits[:5], p=0.999) == []
    assert any("too close to 1" in r for r in reasons(fits[:5], p=0.9999))
    # Declined from one p on, whatever the rounding of each p's threshold (0.9995's is off by
    # 0.7%, 1 - 2**-16's by nothing): auto does not flip between backends as p nears 1.
    from ace_kernels.lora import _keep_rate_error, _MAX_KEEP_RATE_ERROR
    ps = [0.99920 + i * 1e-7 for i in range(800)] + [1 - 2**-16, 0.9995, 0.99984]
    declined = [bool(reasons(fits[:5], p=p)) for p in ps]
    first = declined.index(True)
    assert all(declined[first:]) and 0.99923 < ps[first] < 0.99924
    assert all(abs(_keep_rate_error(p)) <= _MAX_KEEP_RATE_ERROR for p in ps[:first])


def test_triton_refuses_bf16_under_the_interpreter(monkeypatch):
    # The interpreter's bf16 tl.dot gives garbage (S off by 1e10): an explicit backend="triton"
    # says so instead of returning it; fp16 and fp32 still run, and on a GPU bf16 takes the kernels.
    from ace_kernels.lora import _triton_reasons

    def reasons(dtype):
        x, w, a, b = (torch.empty(shape, dtype=dtype) for shape in ((5, 8), (24, 8), (3, 2, 8), (3, 8, 2)))
        return [r for r in _triton_reasons(x, w, None, a, b, 0.5, 0.1, True) if "triton failed to import" not in r]

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert any("refuse bfloat16" in r for r in reasons(torch.bfloat16))
    assert reasons(torch.float16) == [] and reasons(torch.float32) == []
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert reasons(torch.bfloat16) == []


@pytest.mark.triton
@pytest.mark.parametrize("trainable", ["weight_and_bias", "bias"])
def test_triton_declines_trainable_base(trainable, device):
    """The kernels give no gradient to W or b: a trainable weight, or only a trainable bias
    under a frozen weight, is declined (backend='triton' raises), and 'auto' falls back to the
    torch backend, which gives the bias its gradient (against the oracle)."""
    case = Case("frozen", "qkv", (4,), 8, 3, 2, base_grads=True)
    inputs = make_inputs(case, torch.float32, device)
    if trainable == "bias":
        inputs[1].requires_grad_(False)
    with pytest.raises(RuntimeError, match="frozen"):
        ace_kernels.lora_qkv(*inputs, scaling=0.5, backend="triton")
    _, grads = compare_with_oracle(case, inputs, "auto", rtol=TRITON_RTOL, atol=TRITON_ATOL)
    assert "bias" in grads and ("weight" in grads) == (trainable != "bias")


@pytest.mark.triton
def test_triton_runs_a_trainable_base_without_grad_mode(device):
    # Under torch.no_grad nothing is differentiated: a base layer left trainable (nn.Linear's default) was
    # refused all the same in evaluation, with "use backend='torch' to train it", and 'auto' took the torch
    # backend. (Declined in training mode: see test_triton_declines_a_trainable_base_in_training_mode_with_or_...)
    case = Case("no_grad_base", "qkv", (4,), 8, 3, 2, dropout_p=0.3, training=False, base_grads=True)
    inputs = make_inputs(case, torch.float32, device)
    with torch.no_grad():
        outputs, mask = call_op(case, inputs, "triton")
    want = call_oracle(case, fp64_leaves(*inputs), None if mask is None else mask.double())
    for got, expected in zip(outputs, want, strict=True):
        assert not got.requires_grad
        torch.testing.assert_close(got.double(), expected.detach(), rtol=TRITON_RTOL, atol=TRITON_ATOL)


@pytest.mark.triton
@pytest.mark.interpreter
def test_triton_declines_a_trainable_base_in_training_mode_with_or_without_grad(monkeypatch):
    # A first pass without a graph and its recomputation with one (a reentrant checkpoint, a chunked step) must
    # take the same backend: with the base's grad check skipped under torch.no_grad, 'auto' ran the first pass
    # on triton (its Philox dropout mask) and the recomputation on torch (another mask), so the output returned
    # was not the one differentiated (loss and gradients of two different dropout draws).
    from torch.utils.checkpoint import checkpoint

    from ace_kernels import _dispatch

    select = _dispatch.select

    def as_on_a_gpu(op, backend, tensors, args=(), kwargs=None, variant=None, caller=None):
        # 'auto' as on a GPU (triton first where it can run), which never takes the interpreter on its own.
        if backend == "auto" and not _dispatch.reasons_for(op, "triton", tensors, args, kwargs):
            backend = "triton"
        return select(op, backend, tensors, args, kwargs, variant=variant, caller=caller)

    monkeypatch.setattr(_dispatch, "select", as_on_a_gpu)
    case = Case("ckpt_base", "linear", (6,), 8, 4, 2, dropout_p=0.5, base_grads=True)
    inputs = make_inputs(case, torch.float32)
    with torch.no_grad(), pytest.raises(RuntimeError, match="frozen"):
        ace_kernels.lora_linear(*inputs, scaling=0.5, dropout_p=0.5, training=True, backend="triton")

    def op(x):
        return ace_kernels.lora_linear(x, *inputs[1:], scaling=0.5, dropout_p=0.5, training=True)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        plain = op(inputs[0])
        torch.manual_seed(3)
        kept = checkpoint(op, inputs[0], use_reentrant=True)
    assert torch.equal(kept, plain)
    grad_out = torch.randn_like(plain)
    grads = []
    for out in (kept, plain):  # (a reentrant checkpoint's backward fills .grad: no torch.autograd.grad)
        out.backward(grad_out)
        grads.append([t.grad for t in inputs if t is not None and t.requires_grad])
        for t in inputs:
            if t is not None:
                t.grad = None
    assert len(grads[0]) == 5 and all(torch.equal(a, b) for a, b in zip(*grads, strict=True))  # x, W, b, A, B


@pytest.mark.parametrize("op,rank,declined", [("qkv", 21, False), ("qkv", 22, True), ("qkv", 64, True),
                                              ("linear", 64, False), ("linear", 65, True)])
def test_triton_rank_limit(op, rank, declined):
    """P*r at most 64 (documented: lora_qkv rank at most 21, lora_linear 64): the limit is on
    the stacked rank, not on r."""
    from ace_kernels.lora import _triton_reasons

    projections = 3 if op == "qkv" else 1
    x, w = torch.empty(5, 8), torch.empty(projections * 4, 8)
    a = torch.empty(projections, rank, 8) if op == "qkv" else torch.empty(rank, 8)
    b = torch.empty(projections, 4, rank) if op == "qkv" else torch.empty(4, rank)
    reasons = [r for r in _triton_reasons(x, w, None, a, b, 0.5, 0.1, True) if "triton failed to import" not in r]
    assert reasons == ([f"rank {rank} is too large for the fused kernels (at most {64 // projections})"]
                       if declined else [])


@pytest.mark.triton
def test_triton_declines_float64(device):
    """float64 is the torch backend's only: backend='triton' raises saying so (auto falls back)."""
    case = Case("fp64", "qkv", (4,), 8, 3, 2)
    inputs = make_inputs(case, torch.float64, device)
    with pytest.raises(RuntimeError, match="float64"):
        ace_kernels.lora_qkv(*inputs, scaling=0.5, backend="triton")


@pytest.mark.parametrize("lead,variant", [((2, 5), "large"), ((7,), "small"), ((), "small"), ((2, 4), "large")])
def test_dispatch_variant_is_chosen_by_all_rows_of_x(lead, variant, monkeypatch):
    """The dispatch variant is ``rows_variant`` of M = numel / in (every leading dimension),
    not of x's first dimension (SMALL_ROWS_LIMIT set to 8: [2, 5, 8] has 10 rows, [8] one); a call of exactly
    SMALL_ROWS_LIMIT rows ([2, 4, 8]) is large ("below this many rows" is small)."""
    from ace_kernels import _dispatch

    seen = []
    select = _dispatch.select

    def spy(op, backend, tensors, args=(), kwargs=None, variant=None, caller=None):
        seen.append(variant)
        return select(op, backend, tensors, args, kwargs, variant=variant, caller=caller)

    monkeypatch.setattr(_dispatch, "select", spy)
    monkeypatch.setattr(lora_module, "SMALL_ROWS_LIMIT", 8)
    x = torch.randn(*lead, 8)
    with torch.no_grad():
        ace_kernels.lora_linear(x, torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), scaling=0.5,
                                backend="torch")
    assert seen == [variant]


@pytest.mark.triton
@pytest.mark.parametrize("case", [Case("merged_qkv", "qkv", (3, 7), 40, 13, 4, dropout_p=0.3, training=False),
                                  Case("merged_linear", "linear", (9,), 21, 10, 3, bias=False, dropout_p=0.0,
                                       training=False)],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_evaluation_merges_the_weights(case, dtype, device, monkeypatch):
    """No dropout and no graph (evaluation): the LoRA term is merged into the weight and the
    call is one GEMM (in float16, where a merged element could overflow, three unmerged
    GEMMs), with no kernel of ours. Against fp64: fp32 tight, fp16 within twice the
    error of torch's own formula in fp16 (plus a floor of a few fp16 ulps of the output)."""
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the evaluation path launched a LoRA kernel")

    for name in ("_lora_pack_kernel", "_lora_grad_kernel", "_lora_mask_kernel"):
        monkeypatch.setattr(lora_module, name, NoLaunch())
    inputs = make_inputs(case, dtype, device)
    with torch.no_grad():
        outputs, mask = call_op(case, inputs, "triton")
    got = torch.cat(outputs, dim=-1)
    assert mask is None and got.dtype == dtype and got.grad_fn is None
    fp64 = fp64_leaves(*inputs)
    want = torch.cat(call_oracle(case, fp64, None), dim=-1)
    torch_same = torch.cat(call_oracle(case, [None if t is None else t.detach() for t in inputs], None), dim=-1)
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * scale
    else:
        assert err <= 2 * (torch_same.double() - want).abs().max().item() + 4e-3 * scale


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_fp16_evaluation_with_a_large_merged_term_stays_finite(backend, device):
    """training=False has no float16 limit on scaling * B A: here |scaling * B| = 2e4 < 65504
    but each element of scaling * B A is 8e4 (inf in a float16 merged weight) while the output,
    x being small, is ~640. Finite, and close to the fp64 oracle (a few fp16 ulps)."""
    case = Case("fp16_eval_big_term", "linear", (3,), 8, 6, 4, bias=True, training=False)
    dev = device if backend == "triton" else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.full((3, 8), 1e-3).to(dev, torch.float16)
    weight = (torch.randn(6, 8, generator=gen) * 0.1).to(dev, torch.float16)
    bias = torch.randn(6, generator=gen).to(dev, torch.float16)
    lora_a = torch.ones(4, 8, device=dev, dtype=torch.float16)  # S = x A^T = 8e-3
    lora_b = torch.ones(6, 4, device=dev, dtype=torch.float16)  # (B A)_ij = 4
    inputs = (x, weight, bias, lora_a, lora_b)
    with torch.no_grad():
        (got,), mask = call_op(case, inputs, backend, scaling=2e4)
    (want,) = call_oracle(case, fp64_leaves(*inputs), mask, scaling=2e4)
    assert mask is None and got.dtype == torch.float16 and torch.isfinite(got).all()
    assert 600 < want.abs().min() and want.abs().max() < 700
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-3, atol=0)


@pytest.mark.triton
def test_triton_training_mode_never_merges(device):
    """Training mode without dropout and without a graph (a chunked step's first pass) runs the
    same kernels as with a graph (its second pass): the same outputs, bit for bit."""
    case = Case("train_no_dropout", "qkv", (2, 7), 40, 13, 4, dropout_p=0.0)
    inputs = make_inputs(case, torch.float32, device)
    with torch.no_grad():
        first, _ = call_op(case, inputs, "triton")
    second, _ = call_op(case, inputs, "triton")
    assert second[0].grad_fn is not None and first[0].grad_fn is None
    assert all(torch.equal(a, b.detach()) for a, b in zip(first, second, strict=True))


@pytest.mark.triton
def test_triton_zero_rows(device):
    case = Case("empty", "qkv", (0,), 8, 3, 2, dropout_p=0.2)
    inputs = make_inputs(case, torch.float32, device)
    outputs, mask = call_op(case, inputs, "triton")
    assert all(o.shape == (0, 3) for o in outputs) and mask.shape == (3, 0, 8)
    sum(o.sum() for o in outputs).backward()
    assert torch.all(inputs[3].grad == 0) and torch.all(inputs[4].grad == 0) and inputs[0].grad.shape == (0, 8)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on NaN arithmetic
def test_triton_non_finite_rows_propagate(device):
    case = Case("nan", "qkv", (4,), 8, 3, 2, dropout_p=0.2)
    x, weight, bias, lora_a, lora_b = make_inputs(case, torch.float32, device)
    x = x.detach().clone()
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    outputs = ace_kernels.lora_qkv(x, weight, bias, lora_a, lora_b, scaling=0.5, dropout_p=0.2, training=True,
                                   backend="triton")
    for y in outputs:
        assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()
        assert not torch.isfinite(y[1]).any() and not torch.isfinite(y[2]).any()



# (backend, training): the torch backend; the triton training path (x_cat against [W | scaling * Bbd]);
# the triton merged evaluation (float32, no graph: W + scaling * B A).
NON_FINITE_PATHS = [pytest.param("torch", False, id="torch"),
                    pytest.param("triton", True, marks=pytest.mark.triton, id="triton-training"),
                    pytest.param("triton", False, marks=pytest.mark.triton, id="triton-merged")]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on NaN arithmetic
@pytest.mark.parametrize("backend, training", NON_FINITE_PATHS)
def test_non_finite_values_follow_each_paths_arithmetic_as_documented(backend, training, device):
    """The module docstring's last non-finite paragraph, path by path: a NaN in A_q makes q NaN
    everywhere, and k and v too where the three LoRA terms are one block-diagonal product, but not
    in the merged evaluation; an inf in x gives NaN where the unmerged sum meets inf - inf, and inf
    in the merged evaluation (W + scaling * B A = 0.5 here)."""
    case = Case("nan", "qkv", (4,), 8, 3, 2)
    x, weight, bias, lora_a, lora_b = (t.detach().clone() for t in make_inputs(case, torch.float32, device))
    lora_a[0, 1, 5] = float("nan")
    q, k, v = ace_kernels.lora_qkv(x, weight, bias, lora_a, lora_b, scaling=0.5, training=training, backend=backend)
    merged = backend == "triton" and not training
    assert torch.isnan(q).all()
    assert torch.isfinite(torch.cat([k, v])).all() if merged else torch.isnan(torch.cat([k, v])).all()
    one = torch.ones(1, 1, device=device)
    y = ace_kernels.lora_linear(torch.tensor([[float("inf"), 1.0]], device=device), torch.tensor([[1.0, 0.0]],
                                device=device), None, torch.tensor([[-1.0, 0.0]], device=device), one, scaling=0.5,
                                training=training, backend=backend)
    assert torch.isposinf(y).all() if merged else torch.isnan(y).all()  # inf + 0.5 * (-inf * 1) in the unmerged sum

def test_triton_saved_bytes_are_x_plus_rank_r(device):
    if "triton" not in ace_kernels.available_backends():
        pytest.skip("triton cannot run here")
    case = Case("bytes", "qkv", (10,), 16, 4, 2, dropout_p=0.2)
    inputs = make_inputs(case, torch.float32, device)
    with lora_module.saved_activation_bytes() as record:
        measured, _ = saved_storage_bytes(lambda: call_op(case, inputs, "triton"), inputs[1:])
    # x_cat = [x | S | 0] (16 + 3r = 22 columns, padded to 24) and the 8-byte seed: no mask,
    # no dropped copy of x; measured by the saved-tensors hook, as reported.
    assert record == [{"backend": "triton", "total": 10 * 24 * 4 + 8, "x": 10 * 16 * 4, "extra": 10 * 8 * 4 + 8}]
    assert measured == 10 * 24 * 4 + 8


def _max_error(got, want):
    return max((g.double() - w).abs().max().item() for g, w in zip(got, want, strict=True))


def check_two_x_torch_rule(case, dtype, device, floor):
    """Error of the triton op against fp64 at most 2x the error of the same formula run by
    torch in ``dtype`` (same exported masks), plus ``floor`` (relative to the output scale)."""
    inputs = make_inputs(case, dtype, device)
    outputs, mask = call_op(case, inputs, "triton")
    fp64 = fp64_leaves(*inputs)
    want = call_oracle(case, fp64, None if mask is None else mask.double())
    same_dtype = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    torch_same = call_oracle(case, same_dtype, None if mask is None else mask.to(dtype))
    scale = max(w.abs().max().item() for w in want)
    assert _max_error(outputs, want) <= 2 * _max_error(torch_same, want) + floor * scale
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(o.shape, generator=gen).to(device=device, dtype=dtype) for o in outputs]
    wrt = [i for i in (0, 3, 4) if inputs[i].requires_grad]
    got = torch.autograd.grad(outputs, [inputs[i] for i in wrt], grads)
    ref = torch.autograd.grad(want, [fp64[i] for i in wrt], [g.double() for g in grads])
    same = torch.autograd.grad(torch_same, [same_dtype[i] for i in wrt], grads)
    for index, g, r, t in zip(wrt, got, ref, same, strict=True):
        err, err_torch = (g.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert err <= 2 * err_torch + floor * r.abs().max().item(), (index, err, err_torch)


@pytest.mark.triton
@pytest.mark.parametrize("dropout_p", [0.1, 0.0], ids=["p0.1", "p0"])
def test_triton_fp16_two_x_torch_rule(device, dropout_p):
    # fp16 dots run correctly in the interpreter (bf16 ones do not: bf16 is GPU-only).
    case = Case("half", "qkv", (37,), 45, 13, 4, dropout_p=dropout_p)
    check_two_x_torch_rule(case, torch.float16, device, floor=1e-3)


@pytest.mark.triton
@pytest.mark.parametrize("kernel,number", [(kernel, number)
                                           for (kernel, _), candidates in lora_module._GPU_CANDIDATES.items()
                                           for number in range(1, len(candidates) + 1)])
def test_triton_sweep_candidates_two_x_torch_rule(kernel, number, device):
    """Each launch configuration a GPU sweep may pick (and _tuning then launch), forced, in fp16:
    rows, K and the stacked outputs not multiples of its tiles, dropout on."""
    config = lora_module._GPU_CANDIDATES[(kernel, "16bit")][number - 1]
    case = Case("candidate", "qkv", (2, 77), 149, 70, 4, dropout_p=0.1)
    before = lora_module._config(kernel, torch.float16, device)
    with _tuning.forced("lora", kernel, "16bit", config):
        assert lora_module._config(kernel, torch.float16, device) == config != before
        check_two_x_torch_rule(case, torch.float16, device, floor=1e-3)
    assert lora_module._config(kernel, torch.float16, device) == before  # the block ended, the force with it


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.1, 0.0], ids=["p0.1", "p0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("rows", [8 * 197, 64 * 197 + 3])
def test_triton_gpu_real_shapes(dtype, rows, dropout_p):
    """ViT-B/BERT qkv shapes (K = out = 768, r = 4), rows not a tile multiple; training with
    dropout on and off (the kernels without dropout are other specialisations)."""
    # Floor: a few units of the dtype's rounding relative to the output scale, for outputs
    # where torch's own error happens to be near zero.
    floor = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-6}[dtype]
    check_two_x_torch_rule(Case("gpu", "qkv", (rows,), 768, 768, 4, dropout_p=dropout_p), dtype, torch.device("cuda"),
                           floor)


@pytest.mark.gpu
def test_triton_gpu_linear_bf16():
    check_two_x_torch_rule(Case("gpu_linear", "linear", (4, 197), 768, 768, 4, dropout_p=0.1), torch.bfloat16,
                           torch.device("cuda"), 1e-2)


# ----------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_90a: every kernel at the launch configurations, no spills
# ----------------------------------------------------------------------------------------

# Integer arguments that are multiples of 16 at the ViT/BERT shapes (M = batch*197 or
# batch*256 rows, K = out = 768): a real launch specialises them (and every pointer) as
# 16-divisible, which decides vectorised, pipelined loads and so the register count.
# The most shared memory one block of an sm_90 GPU can have (227 KiB, opted in).
HOPPER_SHARED_BYTES = 227 * 1024


def _compile_all_for_sm90(dtype_name: str) -> list[dict]:
    """Compile every launch variant for sm_90a; runs in a process without TRITON_INTERPRET
    (under the interpreter the kernels are not JITFunctions and cannot be compiled)."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # the child process's path has tests/ only
        sys.path.insert(0, root)
    from ace_kernels._aot import compile_sm90
    from benchmarks.kernel_stats import divisible_arguments, lora_launches

    dtype = getattr(torch, dtype_name)
    launches = lora_launches(dtype)  # the defaults and the sweep's candidates, every launch variant
    results = []
    for label, kernel, signature, constexprs, num_warps, num_stages in launches:
        divisible = divisible_arguments(kernel)
        # Triton specialises M on being a multiple of 16 (a batch of 64 images: 12,608 rows) or
        # not (a batch of 63: 12,411), and with it the stride between the projections' planes
        # of the S gradient (stride_gp = M * r, 49,644 there). K and the other strides (768 and
        # its multiples) stay multiples of 16 at every ViT/BERT shape. The two give the same PTX
        # today (M only bounds the rows): the odd M is compiled at the default configurations,
        # the sweep's candidates (which differ from them in tiles only) at the real shapes' M.
        by_rows = ("M", "stride_gp")
        variants = [("M%16==0", divisible)]
        if " candidate " not in label:
            variants.append(("M%16!=0", [n for n in divisible if n not in by_rows]))
        # And at the largest BLOCK_R (ranks up to _MAX_BLOCK_R / P), for the shared memory the
        # Triton backend's check takes them to need (lora._GPU_SHARED_BYTES).
        if "BLOCK_R" in constexprs:
            variants.append(("R=max M%16==0", divisible))
        for rows, names in variants:
            widest = dict(constexprs, BLOCK_R=lora_module._MAX_BLOCK_R) if rows.startswith("R=max") else constexprs
            res = compile_sm90(kernel, signature, widest, num_warps=num_warps, num_stages=num_stages,
                               divisible_by_16=names)
            results.append(dict(label=f"{label} {rows}", registers=res.registers, shared=res.shared_bytes,
                                spills=res.spills, warps=num_warps, stages=num_stages))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
def test_triton_kernels_compile_for_sm90_without_spills(dtype_name, capsys):
    pytest.importorskip("triton")
    from _aot_helpers import compile_in_fresh_process

    results = compile_in_fresh_process("test_lora", "_compile_all_for_sm90", dtype_name)
    with capsys.disabled():
        for r in results:
            print(f"\n  sm_90a {dtype_name:8s} {r['label']:46s} registers={r['registers']:3d} "
                  f"shared={r['shared']:6d} B spills={r['spills']} warps={r['warps']} stages={r['stages']}", end="")
    # 17 launch variants at the defaults (4 of the pack kernel, 12 of the gradient kernel, the mask's),
    # each with M a multiple of 16 and not; 16-bit also 4 * 4 + 5 * 12 at the sweep's candidates; and
    # each of those but the mask's at the largest BLOCK_R too (16 defaults, the 76 candidates).
    assert len(results) == 2 * 17 + 16 + (0 if dtype_name == "float32" else 2 * 76)
    assert {r["label"].split(" ")[-1] for r in results} == {"M%16==0", "M%16!=0"}
    # Spills at rank 4 (the largest BLOCK_R's launches are checked for shared memory only: some
    # spill, e.g. 40 bytes in the 16-bit gradient kernel with dropout and dx at triton 3.8).
    spilling = [r for r in results if r["spills"] and " R=max " not in r["label"]]
    assert not spilling, spilling
    too_much_shared = [r for r in results if r["shared"] > min(HOPPER_SHARED_BYTES, lora_module._GPU_SHARED_BYTES)]
    assert not too_much_shared, too_much_shared


@pytest.mark.triton
def test_triton_mask_export_in_row_slices_equals_one_launch(monkeypatch, device):
    """Exports past the grid's 65535 row blocks go in row slices: the same masks as one launch."""
    seed = torch.tensor([77], dtype=torch.int64, device=device)
    whole = lora_module._export_masks(seed, 23, 9, 3, 0.4)
    block_m = lora_module._config("mask", torch.float32, device)["BLOCK_M"]
    monkeypatch.setattr(lora_module, "_MAX_GRID_Y", 1)  # slices of one row block
    rows = 2 * block_m + 5
    sliced = lora_module._export_masks(seed, rows, 9, 3, 0.4)
    monkeypatch.undo()
    assert torch.equal(sliced, lora_module._export_masks(seed, rows, 9, 3, 0.4))
    assert torch.equal(sliced[:, :23], whole)


def test_nested_recorders_each_keep_their_own_calls():
    # Leaving an inner recorder must not close the outer one (two empty lists compare equal).
    capture = lora_module.capture_dropout_masks
    saved_activation_bytes = lora_module.saved_activation_bytes
    case = Case("nested", "qkv", (5,), 8, 3, 2, dropout_p=0.3)
    inputs = make_inputs(case, torch.float64, "cpu")
    with capture() as outer, saved_activation_bytes() as outer_saved:
        with capture() as inner, saved_activation_bytes() as inner_saved:
            pass
        call_op(case, inputs, "torch")
        call_op(case, inputs, "torch")
    assert (len(outer), len(inner), len(outer_saved), len(inner_saved)) == (2, 0, 2, 0)
    assert not lora_module._MASK_RECORDERS and not lora_module._SAVED_BYTES_RECORDERS


@pytest.mark.parametrize("recorders, open_recorder", [
    ("_MASK_RECORDERS", lora_module.capture_dropout_masks),
    ("_SAVED_BYTES_RECORDERS", lora_module.saved_activation_bytes),
], ids=["masks", "saved-bytes"])
def test_recorders_closed_by_two_threads_at_once_are_both_removed(monkeypatch, recorders, open_recorder):
    # Thread A closes its recorder (second in the list) while thread B closes the first one.
    # A's search is paused after it looked at the first entry, for B to close meanwhile: a
    # search that B's removal shifted under it would miss A's recorder and leave it recording
    # (every later LoRA call appending to it) for the rest of the process.
    import threading

    class PausingList(list):
        pause_in = None  # the thread whose search pauses after its first entry

        def __iter__(self):
            index = 0
            while index < len(self):
                yield self[index]
                if index == 0 and threading.current_thread() is self.pause_in:
                    b_closed.wait(timeout=1.0)  # a fixed version makes B wait for A instead
                index += 1

    live = PausingList()
    monkeypatch.setattr(lora_module, recorders, live)
    b_opened, a_opened, b_may_close, b_closed = (threading.Event() for _ in range(4))
    errors = []

    def thread_b():
        try:
            with open_recorder():
                b_opened.set()
                b_may_close.wait(timeout=10)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        b_closed.set()

    b = threading.Thread(target=thread_b)
    b.start()
    assert b_opened.wait(timeout=10)
    live.pause_in = threading.current_thread()
    with open_recorder():
        b_may_close.set()
    b.join(timeout=10)
    assert not errors and not b.is_alive()
    assert list(live) == [], f"{len(live)} recorder(s) left open after both blocks ended"


def test_a_dtype_error_under_autocast_says_what_autocast_did():
    case = Case("mixed", "qkv", (4,), 8, 3, 2)
    x, weight, bias, lora_a, lora_b = make_inputs(case, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            ValueError, match=r"argument 'weight': expected dtype bfloat16 .* \(under torch.autocast, which cast the "
                              r"float32/16 operands to bfloat16"):
        ace_kernels.lora_qkv(x, weight.double(), bias, lora_a, lora_b, scaling=0.5, backend="torch")


def test_a_non_tensor_argument_under_autocast_is_named():
    case = Case("bad", "qkv", (4,), 8, 3, 2)
    x, weight, bias, lora_a, lora_b = make_inputs(case, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="argument 'weight'"):
        ace_kernels.lora_qkv(x, weight.tolist(), bias, lora_a, lora_b, scaling=0.5, backend="torch")


def test_triton_dropout_limit_is_stated_to_six_digits():
    """The refusal of a dropout_p too close to 1 names the limit as 0.999237 (1 - 2**-17 / 0.01):
    printed to five digits it read 0.99924, above dropout_ps (0.999238, 0.999239) it declines."""
    from ace_kernels.lora import _MAX_TRITON_DROPOUT, _triton_reasons

    w, a, b = torch.empty(1).expand(24, 8), torch.empty(1).expand(3, 2, 8), torch.empty(3, 8, 2)
    x = torch.empty(1).expand(5, 8)
    assert _MAX_TRITON_DROPOUT == pytest.approx(1 - 2**-17 / 0.01, abs=0)
    (reason,) = [r for r in _triton_reasons(x, w, None, a, b, 0.5, 0.999238, True) if "too close to 1" in r]
    assert "(above 0.999237 its rounding" in reason, reason


def _occupancy_of_the_occupancy_candidates() -> list[dict]:
    """Resident blocks per sm_90a SM of the 16-bit sweep candidates added for occupancy (down
    candidate 4, backward candidate 5), every launch variant; runs in a process without
    TRITON_INTERPRET, as _compile_all_for_sm90."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from ace_kernels._aot import blocks_per_sm90, compile_sm90
    from benchmarks.kernel_stats import divisible_arguments, lora_launches

    results = []
    for label, kernel, signature, constexprs, num_warps, num_stages in lora_launches(torch.float16):
        if not (label.startswith("down") and label.endswith(" candidate 4")
                or label.startswith("backward") and label.endswith(" candidate 5")):
            continue
        res = compile_sm90(kernel, signature, constexprs, num_warps=num_warps, num_stages=num_stages,
                           divisible_by_16=divisible_arguments(kernel))
        results.append(dict(label=label, registers=res.registers, spills=res.spills,
                            blocks=blocks_per_sm90(res.registers, res.shared_bytes, num_warps)))
    return results


@pytest.mark.slow
def test_the_occupancy_candidates_fit_more_blocks_per_sm():
    """The sweep candidates declared for occupancy do what their comments say: down candidate 4
    six blocks of 4 warps per SM (80 registers), backward candidate 5 three (at most 168)."""
    pytest.importorskip("triton")
    from _aot_helpers import compile_in_fresh_process

    results = compile_in_fresh_process("test_lora", "_occupancy_of_the_occupancy_candidates")
    assert {r["label"].split(" ")[0] for r in results} == {"down", "backward"}, results
    for r in results:
        assert r["blocks"] >= (6 if r["label"].startswith("down") else 3) and not r["spills"], r


def _gradient_kernel_with_and_without_da() -> list[dict]:
    """The bf16 gradient kernel compiled for sm_90a at its default configuration, q/k/v stacked, dropout on
    and off, with dX and dA and with dX alone: registers, spills, and the pointer arguments its PTX reads;
    runs in a process without TRITON_INTERPRET."""
    import os
    import re
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from ace_kernels._aot import compile_sm90, ptx_sm90
    from benchmarks.kernel_stats import divisible_arguments, lora_launches

    wanted = {f"backward P=3 dropout={dropout} dx=True{tail}"
              for dropout in (True, False) for tail in ("", " da=False")}
    rows = []
    for label, kernel, signature, constexprs, num_warps, num_stages in lora_launches(torch.bfloat16):
        if label in wanted:
            args = dict(num_warps=num_warps, num_stages=num_stages, divisible_by_16=divisible_arguments(kernel))
            res = compile_sm90(kernel, signature, constexprs, **args)
            ptx = ptx_sm90(kernel, signature, constexprs, **args)
            # The runtime arguments in order (constexprs are not parameters): ld.param of _param_<i> reads one.
            runtime = [name for name, kind in signature.items() if kind != "constexpr"]
            read = {runtime[int(i)] for i in re.findall(r"ld\.param\S*\s+%\w+,\s*\[\w+_param_(\d+)", ptx)}
            rows.append(dict(label=label, registers=res.registers, spills=res.spills, read=sorted(read)))
    return rows


@pytest.mark.slow
def test_the_gradient_kernel_without_da_neither_reads_x_nor_writes_partials():
    """With dX alone (A frozen, or the whole adapter) the gradient kernel compiles without dA: its PTX never
    reads the x_cat or dA-partials pointers (so it neither loads x nor stores partials), which it does
    with dA; no spills, and no more registers."""
    pytest.importorskip("triton")
    from _aot_helpers import compile_in_fresh_process

    rows = {r["label"]: r for r in compile_in_fresh_process("test_lora", "_gradient_kernel_with_and_without_da")}
    assert len(rows) == 4, sorted(rows)
    for dropout in (True, False):
        both = rows[f"backward P=3 dropout={dropout} dx=True"]
        alone = rows[f"backward P=3 dropout={dropout} dx=True da=False"]
        assert {"dx_ptr", "g_ptr", "a_ptr", "xcat_ptr", "da_part_ptr"} <= set(both["read"]), both
        assert {"dx_ptr", "g_ptr", "a_ptr"} <= set(alone["read"]), alone
        assert not {"xcat_ptr", "da_part_ptr"} & set(alone["read"]), alone
        assert alone["spills"] == 0 and alone["registers"] <= both["registers"], (both, alone)
