"""label_guided_infonce (torch backend) against the dense fp64 oracle of spec section 5."""

import contextlib
import itertools
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ace_kernels
from ace_kernels import _tuning, contrastive
from _meta_init import materialise_like_fsdp
from oracle_contrastive import label_guided_infonce_oracle

# Memory that nothing wrote reads as NaN (conftest.poisoned_empty).
pytestmark = pytest.mark.usefixtures("poisoned_empty")

# fp64 end to end: blocked log-sum-exp versus dense cross-entropy differ only
# by summation order, so a few ulps of the loss magnitude (~1..10).
ATOL64 = 1e-10


def _inputs(batch, dim, *, scale=30.0, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    t = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    s = torch.tensor(scale, dtype=torch.float64)
    return u.requires_grad_(), t.requires_grad_(), s.requires_grad_()


def _loss_and_grads(fn, u, t, s, labels):
    loss = fn(u, t, s, labels)
    grads = torch.autograd.grad(loss, [u, t, s])
    return loss.detach(), [g.detach() for g in grads]


def _check_triton_fp32(u, t, s, labels, device):
    """The Triton backend on fp32 views ``u``, ``t`` (already on ``device``, leaves) against the
    fp64 oracle on the same values: loss and the three gradients within 1e-5. fp32 kernels
    (IEEE dots) against fp64: |logits| <= 30 carry ~30 * 6e-8 each, sums over up to 1024 terms."""
    s32 = s.detach().float().to(device).requires_grad_()
    ours = _loss_and_grads(lambda *a: ace_kernels.label_guided_infonce(*a, backend="triton"), u, t, s32, labels)
    ref = _loss_and_grads(label_guided_infonce_oracle, u.double(), t.double(),
                          s.detach().to(device).requires_grad_(), labels)
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=0, atol=1e-5)
    for name, got, want in zip(("image_emb", "text_emb", "logit_scale"), ours[1], ref[1], strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def _compare(u, t, s, labels, *, block=None, atol=ATOL64, monkeypatch=None):
    if block is not None:
        monkeypatch.setattr(contrastive, "_TORCH_BLOCK_ROWS", block)
    ours = _loss_and_grads(lambda *a: ace_kernels.label_guided_infonce(*a, backend="torch"), u, t, s, labels)
    ref = _loss_and_grads(label_guided_infonce_oracle, u, t, s, labels)
    assert torch.isfinite(ours[0])
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=atol)
    for name, got, want in zip(("image_emb", "text_emb", "logit_scale"), ours[1], ref[1], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"grad {name}: {m}")
    return ours, ref


def _duplicated_labels(batch, width, distinct, seed=1):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 2, (distinct, width), generator=gen)
    return table[torch.randint(0, distinct, (batch,), generator=gen)]


# Curated cases: (name, batch, dim, labels factory, block)
CASES = [
    ("no_labels", 37, 40, lambda b: None, 8),
    ("all_equal", 37, 40, lambda b: torch.ones(b, 14, dtype=torch.int64), 8),
    ("many_duplicates", 70, 24, lambda b: _duplicated_labels(b, 14, 5), 16),
    ("unique_rows", 33, 16, lambda b: torch.arange(b)[:, None].repeat(1, 3), 16),
    ("batch_1", 1, 7, lambda b: torch.zeros(b, 14, dtype=torch.int64), 8),
    ("batch_not_multiple_of_block", 130, 40, lambda b: _duplicated_labels(b, 4, 6), 128),
    ("default_block", 300, 32, lambda b: _duplicated_labels(b, 14, 20), None),
]


@pytest.mark.parametrize("name,batch,dim,make_labels,block", CASES, ids=[c[0] for c in CASES])
def test_matches_oracle(name, batch, dim, make_labels, block, monkeypatch):
    u, t, s = _inputs(batch, dim)
    _compare(u, t, s, make_labels(batch), block=block, monkeypatch=monkeypatch)


def test_all_labels_equal_is_diagonal_only():
    u, t, s = _inputs(20, 8)
    loss = ace_kernels.label_guided_infonce(u, t, s, torch.ones(20, 3), backend="torch")
    # Every row and column keeps only its positive: log-softmax of a single entry is 0.
    assert abs(loss.item()) < 1e-12


def _winning_positives(noise, scale):
    """fp32 pairs whose positives clearly win (late training): the loss and gradients are tiny."""
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(48, 32, generator=g, dtype=torch.float64), dim=1)
    t = F.normalize(u + noise * torch.randn(48, 32, generator=g, dtype=torch.float64), dim=1)
    return u, t, torch.tensor(scale, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.triton,
                                                                              pytest.mark.interpreter])])
def test_fp32_gradients_where_the_positives_win(backend):
    # s = 100, true gradients ~7e-14: the positive logits' -2/(2B) on G_ii cancels the softmax
    # weights there before the products. Added after them (the torch backend's old way), fp32
    # kept 1.5e-7 of rounding noise: a million times the gradient.
    u, t, s = _winning_positives(0.1, 100.0)
    u64, t64 = u.clone().requires_grad_(), t.clone().requires_grad_()
    label_guided_infonce_oracle(u64, t64, s, None).backward()
    u32, t32 = u.float().requires_grad_(), t.float().requires_grad_()
    ace_kernels.label_guided_infonce(u32, t32, 100.0, backend=backend).backward()
    assert (u32.grad.double() - u64.grad).abs().max() < 1e-12
    assert (t32.grad.double() - t64.grad).abs().max() < 1e-12


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.triton,
                                                                              pytest.mark.interpreter])])
def test_fp32_loss_is_never_negative(backend):
    # Each row's log-sum-exp includes its positive logit: every term r_i - s u_i.t_i is >= 0, and
    # the loss too. The difference of the sums came out at -2.5e-6 here (true 2.5e-7); an fp32
    # log-sum-exp near s = 30 carries ~1e-6, the accuracy left.
    u, t, s = _winning_positives(0.03, 30.0)
    want = label_guided_infonce_oracle(u, t, s, None).item()
    loss = ace_kernels.label_guided_infonce(u.float(), t.float(), 30.0, backend=backend).item()
    assert 0.0 <= loss and abs(loss - want) < 3e-6
    # All labels equal: only the positives remain, the loss is exactly 0 in exact arithmetic.
    labels = torch.ones(48, 3)
    u32, t32 = u.float().requires_grad_(), t.float().requires_grad_()
    loss = ace_kernels.label_guided_infonce(u32, t32, 30.0, labels, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert u32.grad.abs().max() < 1e-6 and t32.grad.abs().max() < 1e-6
    # Random pairs at s = 100, all labels equal: each term r_i - s u_i.t_i was +-1 ulp of rounding
    # where the positive's product was not the log-sum-exp's (summed unclamped, -2.3e-7 here; the
    # torch backend's loss was +8e-7 at B = 37). Both now take the positive from the same product.
    g = torch.Generator().manual_seed(0)
    u, t = (F.normalize(torch.randn(64, 32, generator=g), dim=1) for _ in range(2))
    assert ace_kernels.label_guided_infonce(u, t, 100.0, torch.ones(64, 3), backend=backend).item() == 0.0


def _rank_shares(backend, u, t, scale, keys, ranges, block=8):
    """The shares of the ranks of ``group=`` that own the ``ranges`` of the batch (``[(lo, hi), ...]``,
    a partition), in one process: each rank's column log-sum-exps over its rows, combined as
    ``_column_lse_across_ranks`` combines the all-gathered ones (one log-sum-exp over the ranks
    in rank order). Each rank's share takes its own rows of ``u`` (a rank's image rows are not
    gathered) and every row of ``t``. The shares keep their graphs (``u``, ``t``, ``scale`` may
    require grad)."""
    def column_parts(lo, hi):
        if backend == "torch":
            return contrastive._torch_lse_both(u[lo:hi].detach(), t.detach(), scale.detach(), keys, block, lo)[1]
        keys32 = keys.to(torch.int32) if keys is not None else None
        return contrastive._triton_lse_both(u[lo:hi].detach(), t.detach(), scale.detach().float().reshape(1), keys32,
                                            lo, hi)[1]

    parts = [column_parts(lo, hi) for lo, hi in ranges]
    shares = []
    for part, (lo, hi) in zip(parts, ranges, strict=True):
        def combine(mine, part=part):
            assert torch.equal(mine, part)  # what this rank's pass over its rows gave
            return torch.logsumexp(torch.stack(parts), dim=0)
        if backend == "torch":
            shares.append(contrastive._TorchLossShare.apply(u[lo:hi], t, scale, keys, lo, hi, block, combine))
        else:
            shares.append(contrastive._TritonLossShare.apply(u[lo:hi], t, scale, keys, lo, hi, combine))
    return shares


@pytest.mark.parametrize("n, block", [(37, 8), (64, 16), (1, 8)])
def test_torch_shares_with_only_positives_are_exactly_zero(n, block):
    """The torch backend's shares (the whole batch, and the owned rows of two ranks) take each
    positive logit from the product its log-sum-exp came from, so a batch whose labels are all
    equal has a loss of exactly 0, not a few ulps of the scale (+8e-7 at s = 100 before)."""
    g = torch.Generator().manual_seed(1)
    u, t = (F.normalize(torch.randn(n, 24, generator=g), dim=1) for _ in range(2))
    scale, keys = torch.tensor(100.0), torch.zeros(n, dtype=torch.int64)
    assert contrastive._TorchLossShare.apply(u, t, scale, keys, 0, n, block).item() == 0.0
    half = n // 2
    shares = _rank_shares("torch", u, t, scale, keys, ((0, half), (half, n)), block)
    assert [share.item() for share in shares] == [0.0, 0.0]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_upstream_gradient_scales_every_gradient(backend, device):
    """(k * loss).backward() gives k times the gradients of loss.backward(), for both embeddings
    and the multiplier: the backward multiplies by the incoming gradient instead of taking it as 1
    (the loss scaled by the world size under DDP, GradScaler, a weighted sum of losses)."""
    u, t, s = (x.detach().float().to(device) for x in _inputs(19, 24, scale=20.0))
    labels = _duplicated_labels(19, 3, 4).to(device)
    grads = []
    for k in (1.0, -2.5):
        leaves = [x.clone().requires_grad_() for x in (u, t, s)]
        (k * ace_kernels.label_guided_infonce(*leaves, labels, backend=backend)).backward()
        grads.append([x.grad for x in leaves])
    for name, one, scaled in zip(("image_emb", "text_emb", "logit_scale"), *grads, strict=True):
        torch.testing.assert_close(scaled, -2.5 * one, rtol=1e-5, atol=1e-7, msg=lambda m: f"grad {name}: {m}")


def test_large_logit_scale(monkeypatch):
    u, t, s = _inputs(45, 16, scale=100.0)
    labels = _duplicated_labels(45, 14, 4)
    _compare(u, t, s, labels, block=16, monkeypatch=monkeypatch)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32, torch.uint8])
def test_label_dtypes(dtype, monkeypatch):
    u, t, s = _inputs(40, 12)
    labels = _duplicated_labels(40, 14, 6).to(dtype)
    _compare(u, t, s, labels, block=16, monkeypatch=monkeypatch)


def test_one_dim_labels_are_class_ids(monkeypatch):
    u, t, s = _inputs(30, 12)
    labels = torch.randint(0, 4, (30,), generator=torch.Generator().manual_seed(3))
    _compare(u, t, s, labels, block=8, monkeypatch=monkeypatch)


def test_fp32_matches_oracle():
    u, t, s = _inputs(50, 32, dtype=torch.float32)
    labels = _duplicated_labels(50, 14, 7)
    s32 = s.detach().float().requires_grad_()
    ours = _loss_and_grads(lambda *a: ace_kernels.label_guided_infonce(*a, backend="torch"), u, t, s32, labels)
    ref = _loss_and_grads(label_guided_infonce_oracle, u.double(), t.double(), s.detach().clone().requires_grad_(),
                          labels)
    # fp32: logits up to 30 carry ~30 * 6e-8 absolute error each; gradients are O(s / B).
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=0, atol=1e-5)
    for got, want in zip(ours[1], ref[1], strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_second_derivatives_are_refused(backend, device):
    dtype = torch.float64 if backend == "torch" else torch.float32
    u, t, s = (v.detach().to(device=device, dtype=dtype).requires_grad_() for v in _inputs(9, 6))
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 3, 4, 0], device=device)
    loss = ace_kernels.label_guided_infonce(u, t, s, labels, backend=backend)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(loss, [u, t], create_graph=True)
    (gu,) = torch.autograd.grad(ace_kernels.label_guided_infonce(u, t, s, labels, backend=backend), [u])
    assert torch.isfinite(gu).all() and gu.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_autocast_is_ignored(backend, device):
    u, t, s = (v.detach().to(device=device, dtype=torch.float32).requires_grad_() for v in _inputs(37, 16))
    labels = torch.randint(0, 4, (37,), generator=torch.Generator().manual_seed(3)).to(device)
    want = ace_kernels.label_guided_infonce(u, t, s, labels, backend=backend)
    want_grads = torch.autograd.grad(want, [u, t, s])
    with torch.autocast(device.type, dtype=torch.bfloat16):  # backward inside the region too
        got = ace_kernels.label_guided_infonce(u, t, s, labels, backend=backend)
        got_grads = torch.autograd.grad(got, [u, t, s])
    assert got.dtype == torch.float32 and torch.equal(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_float_logit_scale_and_shape_one_tensor():
    u, t, s = _inputs(25, 8)
    want = label_guided_infonce_oracle(u, t, s).detach()
    got_float = ace_kernels.label_guided_infonce(u, t, 30.0, backend="torch")
    torch.testing.assert_close(got_float.detach(), want, rtol=0, atol=ATOL64)
    # 78.35 is not an fp32 number: with fp64 embeddings the multiplier is taken in fp64 (in fp32,
    # 78.34999847, each logit is off by 2e-8 relative and the loss by ~1e-7).
    got_float = ace_kernels.label_guided_infonce(u, t, 78.35, backend="torch")
    want = label_guided_infonce_oracle(u, t, 78.35).detach()
    torch.testing.assert_close(got_float.detach(), want, rtol=0, atol=ATOL64)
    s1 = torch.tensor([30.0], dtype=torch.float32, requires_grad=True)
    loss = ace_kernels.label_guided_infonce(u, t, s1, backend="torch")
    loss.backward()
    assert s1.grad.shape == (1,) and s1.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_fp16_embeddings_take_the_multiplier_in_fp32(backend, device):
    """16-bit embeddings accumulate in fp32, the multiplier included: an fp32 logit_scale of 78.35
    (78.375 once rounded to fp16, which moves this loss by 1.2e-2 and its gradient by 6e-5) gives
    the fp64 oracle's loss and multiplier gradient on the same values at fp32 accuracy."""
    u, t, _ = _inputs(32, 16, dtype=torch.float16)
    u, t = u.detach().to(device), t.detach().to(device)
    labels = _duplicated_labels(32, 3, 4).to(device)
    s = torch.tensor(78.35, dtype=torch.float32, device=device, requires_grad=True)
    s64 = s.detach().double().requires_grad_()
    ref = label_guided_infonce_oracle(u.double(), t.double(), s64, labels)
    ref.backward()
    loss = ace_kernels.label_guided_infonce(u, t, s, labels, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.float32
    # Logits up to ~78 in fp32 (~78 * 6e-8 each): the loss came within 8e-7, the gradient 9e-8.
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=0, atol=1e-6)


def test_equals_open_clip_clip_loss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    u, t, s = _inputs(48, 32)
    ours = _loss_and_grads(lambda *a: ace_kernels.label_guided_infonce(*a, backend="torch"), u, t, s, None)
    theirs = _loss_and_grads(lambda u_, t_, s_, _: open_clip_loss.ClipLoss()(u_, t_, s_), u, t, s, None)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=ATOL64)
    for got, want in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL64)


@pytest.mark.parametrize("init,fragment", [("abc", "expected a Python number, got str"),
                                            (float("nan"), "expected a finite number"),
                                            (torch.tensor([1.0, 2.0]), "expected a Python number, got torch.Tensor"),
                                            # finite as a float, inf as the float32 parameter (whose losses were NaN)
                                            (1e39, r"expected a finite number within float32's range \(\|x\| <= "
                                                   r"3\.40282e\+38\), got 1e\+39$"),
                                            (-1e39, "expected a finite number within float32's range"),
                                            # .item() of it raised torch's RuntimeError, naming no argument
                                            (torch.tensor(2.5, device="meta"), "expected a number or a one-element "
                                             r"tensor with a value, got a tensor on the meta device")])
def test_module_rejects_a_bad_initial_multiplier(init, fragment):
    with pytest.raises(ValueError, match=f"argument 'logit_scale_init': {fragment}"):
        ace_kernels.LabelGuidedInfoNCE(init)
    # A one-element tensor is read as its number, and so is a NumPy scalar (np.bool_ is no number).
    assert float(ace_kernels.LabelGuidedInfoNCE(torch.tensor([2.5])).logit_scale.detach()) == 2.5
    assert float(ace_kernels.LabelGuidedInfoNCE(np.float32(2.5)).logit_scale.detach()) == 2.5
    assert float(ace_kernels.LabelGuidedInfoNCE(np.int64(3)).logit_scale.detach()) == 3.0
    with pytest.raises(ValueError, match=r"argument 'logit_scale_init': expected a Python number, got numpy\.bool_?$"):
        ace_kernels.LabelGuidedInfoNCE(np.bool_(True))
    # The functional takes the same numbers as its multiplier.
    u = F.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    assert torch.equal(ace_kernels.label_guided_infonce(u, u, np.float32(2.5), backend="torch"),
                       ace_kernels.label_guided_infonce(u, u, 2.5, backend="torch"))
    with pytest.raises(ValueError, match="argument 'logit_scale': expected a float or a scalar tensor, got bool"):
        ace_kernels.label_guided_infonce(u, u, np.bool_(True), backend="torch")


def test_module_refuses_cuda_and_prints_on_meta():
    # Checked at construction: this op has no cuda backend (the first forward raised).
    with pytest.raises(ValueError, match=r"argument 'backend': expected one of \('auto', 'triton', 'torch'\), got "
                                         r"'cuda' \(label_guided_infonce: no cuda backend\)$"):
        ace_kernels.LabelGuidedInfoNCE(10.0, backend="cuda")
    assert repr(ace_kernels.LabelGuidedInfoNCE(10.0).to("meta")) == "LabelGuidedInfoNCE(logit_scale=<meta>)"
    assert repr(ace_kernels.LabelGuidedInfoNCE(10.0)) == "LabelGuidedInfoNCE(logit_scale=10)"


def test_module_builds_under_a_meta_default_device():
    # Deferred initialisation (build under torch.device("meta"), then to_empty and a state dict): the
    # float32 range check read the meta parameter's value and raised 'Tensor.item() cannot be called'.
    with torch.device("meta"):
        module = ace_kernels.LabelGuidedInfoNCE(10.0)
        with pytest.raises(ValueError, match="expected a finite number within float32's range"):
            ace_kernels.LabelGuidedInfoNCE(1e39)
    assert module.logit_scale.is_meta and isinstance(module.logit_scale, torch.nn.Parameter)
    module = module.to_empty(device="cpu")
    module.load_state_dict(ace_kernels.LabelGuidedInfoNCE(10.0).state_dict(), strict=True)
    assert repr(module) == "LabelGuidedInfoNCE(logit_scale=10)"


def test_module_materialised_from_meta_has_its_initial_multiplier():
    """Deferred init without a state dict: FSDP1 (to_empty, then reset_parameters on each module
    with parameters of its own) raised AttributeError, as the module had no reset_parameters; after
    to_empty alone the multiplier is garbage. reset_parameters gives the value of construction, bit
    for bit, also to a module whose multiplier has been trained since."""
    init = 1 / 0.07
    want = ace_kernels.LabelGuidedInfoNCE(init).logit_scale
    with torch.device("meta"):
        module = ace_kernels.LabelGuidedInfoNCE(init, backend="torch")
    assert materialise_like_fsdp(module) == [module]
    assert module.logit_scale.device.type == "cpu" and isinstance(module.logit_scale, torch.nn.Parameter)
    assert torch.equal(module.logit_scale, want)
    with torch.no_grad():
        module.logit_scale.add_(3.0)
    module.reset_parameters()
    assert torch.equal(module.logit_scale, want) and module.logit_scale.requires_grad


def test_module_learns_the_multiplier_itself():
    module = ace_kernels.LabelGuidedInfoNCE(78.35)
    assert isinstance(module.logit_scale, torch.nn.Parameter) and module.logit_scale.dtype == torch.float32
    assert abs(module.logit_scale.item() - 78.35) < 1e-5
    u, t, _ = _inputs(16, 8)
    labels = _duplicated_labels(16, 14, 3)
    loss = module(u, t, labels)
    loss.backward()
    s_ref = torch.tensor(float(module.logit_scale.detach()), dtype=torch.float64, requires_grad=True)
    ref = label_guided_infonce_oracle(u.detach(), t.detach(), s_ref, labels)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(module.logit_scale.grad.double(), s_ref.grad, rtol=1e-6, atol=1e-9)


def _key_cases():
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                  torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for width in (None, 1, 3, 14, 20):  # None: [B] labels; 20 float64 columns: 20 sort words
            values = torch.randint(-2, 2, (45,) if width is None else (45, width), generator=g)
            yield f"{dtype}-{width}", values > 0 if dtype == torch.bool else values.to(dtype)
    nan = float("nan")
    yield "signed_zero_and_nan", torch.tensor([[0.0, 1.0], [-0.0, 1.0], [nan, 1.0], [nan, 1.0], [0.0, 1.0],
                                                [1.0, nan], [1.0, nan]])
    # A NaN row at index 0 (its key must not be that of the first group of ordinary rows).
    yield "nan_row_first", torch.tensor([[nan, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [-1.0, 0.0]])
    yield "int64_extremes", torch.tensor([2**62, -2**62, 2**62, 0, -1, 2**63 - 1, -2**63, -1])
    yield "strided_view", torch.randint(0, 2, (14, 30), generator=g).t()[:, 3:9]
    yield "empty_rows", torch.zeros(6, 0)
    yield "one_row", torch.ones(1, 3)
    # Layouts torch calls contiguous whose bytes cannot be reinterpreted in place: a storage
    # offset that is not a multiple of 8 bytes, a size-1 last dimension with another stride.
    yield "byte_offset_uint8", torch.randint(0, 2, (45, 9), generator=g, dtype=torch.uint8)[:, 1:]
    yield "byte_offset_int32", torch.randint(0, 2, (91,), generator=g, dtype=torch.int32)[1:].view(45, 2)
    yield "size1_strided_int64", torch.randint(0, 2, (45, 2), generator=g)[:, ::2]
    yield "one_row_offset", torch.zeros(1, 9, dtype=torch.uint8)[:, 1:]


KEY_CASES = list(_key_cases())


@pytest.mark.parametrize("name,labels", KEY_CASES, ids=[c[0] for c in KEY_CASES])
def test_label_keys_equal_exactly_when_rows_equal(name, labels):
    # Keys are equal exactly where the label rows compare equal element by element (as the
    # oracle's mask does): -0.0 equals 0.0, a row with a NaN equals no other row.
    keys = contrastive._label_keys(labels)
    rows = labels.reshape(-1, 1) if labels.dim() == 1 else labels
    want = (rows[:, None, :] == rows[None, :, :]).all(dim=-1)
    got = keys[:, None] == keys[None, :]
    off_diagonal = ~torch.eye(rows.shape[0], dtype=torch.bool)
    assert keys.dtype == torch.int64 and keys.shape == (rows.shape[0],)
    assert torch.equal(got & off_diagonal, want & off_diagonal)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_label_layouts_give_the_loss_of_fresh_labels(backend, device):
    odd = {"byte_offset_uint8": torch.randint(0, 2, (9, 9), dtype=torch.uint8, device=device)[:, 1:],
           "size1_strided_int64": torch.randint(0, 2, (9, 2), device=device)[:, ::2],
           "byte_offset_int32": torch.randint(0, 2, (19,), dtype=torch.int32, device=device)[1:].view(9, 2)}
    u, t, s = _inputs(9, 16, dtype=torch.float32)
    u, t, s = (x.detach().to(device) for x in (u, t, s))
    for name, labels in odd.items():
        got = ace_kernels.label_guided_infonce(u, t, s, labels, backend=backend)
        want = ace_kernels.label_guided_infonce(u, t, s, labels.clone(memory_format=torch.contiguous_format),
                                                backend=backend)
        assert torch.equal(got, want), name


def test_owned_shares_add_up_to_the_loss():
    # The per-rank path used with group=, exercised in one process: shares over a
    # partition of the batch must sum to the loss, and their gradients too.
    u, t, s = _inputs(41, 12)
    labels = _duplicated_labels(41, 14, 5)
    keys = contrastive._label_keys(labels)
    ref = _loss_and_grads(label_guided_infonce_oracle, u, t, s, labels)
    total, grads = 0.0, [0, 0, 0]
    # (13, 13): a rank with no rows (group= with an empty local batch) owns a zero share.
    ranges = [(0, 13), (13, 13), (13, 14), (14, 41)]
    for (lo, hi), share in zip(ranges, _rank_shares("torch", u, t, s, keys, ranges), strict=True):
        g = torch.autograd.grad(share, [u, t, s])
        if lo == hi:
            assert share.item() == 0.0
            assert all(not x.any() and x.shape == y.shape for x, y in zip(g, [u, t, s], strict=True))
        total = total + share.detach()
        grads = [a + b for a, b in zip(grads, g, strict=True)]
    torch.testing.assert_close(total, ref[0], rtol=0, atol=ATOL64)
    for got, want in zip(grads, ref[1], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL64)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_ranks_compute_each_logit_once_per_pass(backend, device, monkeypatch):
    """With group=, the ranks together do one device's work: a rank forms its rows' logits once
    in the forward (row and column log-sum-exps from the same pass) and once per backward
    direction (its rows against every column for dU, every row against its columns for dT), so
    each pass's rectangles of logits, over the ranks, tile the batch's ``n x n`` once. Before,
    a rank's forward ran twice over its rows and its backward took both softmaxes of its
    columns too (``(2 - 1/W)`` times one device's backward)."""
    n = 41
    u, t, s = _inputs(n, 12, dtype=torch.float64 if backend == "torch" else torch.float32)
    u, t = u.detach().to(device).requires_grad_(), t.detach().to(device).requires_grad_()
    s = s.detach().to(u.dtype).to(device).requires_grad_()
    keys = contrastive._label_keys(_duplicated_labels(n, 14, 5).to(device))
    ranges = [(0, 13), (13, 13), (13, 14), (14, n)]
    passes = {"forward": [], "grad_u": [], "grad_t": []}
    if backend == "torch":
        real = contrastive._block_logits

        def record(a_block, b_part, scale, keys_, a_start, b_start, dots=None):
            which = "forward" if dots is not None else ("grad_u" if a_block.data_ptr() >= u.data_ptr()
                                                        and a_block.data_ptr() < u.data_ptr() + u.nbytes
                                                        else "grad_t")
            passes[which].append((a_start, a_start + a_block.shape[0], b_start, b_start + b_part.shape[0]))
            return real(a_block, b_part, scale, keys_, a_start, b_start, dots)

        monkeypatch.setattr(contrastive, "_block_logits", record)
    else:
        real_lse, real_grad = contrastive._triton_lse_both, contrastive._triton_grad_rows

        def record_lse(a, b, scale, keys_, lo, hi):
            passes["forward"].append((lo, hi, 0, n))
            return real_lse(a, b, scale, keys_, lo, hi)

        def record_grad(a, b, scale, keys_, lse_a, lse_b, r0, r1, c0, c1, coef, wide=False):
            in_u = u.data_ptr() <= a.data_ptr() < u.data_ptr() + u.nbytes  # a rank's own rows of u
            passes["grad_u" if in_u else "grad_t"].append((r0, r1, c0, c1))
            return real_grad(a, b, scale, keys_, lse_a, lse_b, r0, r1, c0, c1, coef, wide)

        monkeypatch.setattr(contrastive, "_triton_lse_both", record_lse)
        monkeypatch.setattr(contrastive, "_triton_grad_rows", record_grad)
    shares = _rank_shares(backend, u, t, s, keys, ranges)
    for share in shares:
        share.backward()
    for name, rects in passes.items():
        covered = torch.zeros(n, n, dtype=torch.int64)
        for r0, r1, c0, c1 in rects:
            covered[r0:r1, c0:c1] += 1
        if name == "forward":
            # The test's own pass per rank (its column partials, _rank_shares) and the ranks' own.
            assert covered.eq(2).all(), name
        else:
            assert covered.eq(1).all(), (name, rects)


def test_never_builds_batch_squared(monkeypatch):
    # Every materialised block is at most block x B: wrap torch.mm to record output sizes.
    seen = []
    real_mm = torch.mm

    def recording_mm(a, b, *args, **kwargs):
        out = real_mm(a, b, *args, **kwargs)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(contrastive, "_TORCH_BLOCK_ROWS", 8)
    monkeypatch.setattr(contrastive.torch, "mm", recording_mm)
    u, t, s = _inputs(64, 16)
    ace_kernels.label_guided_infonce(u, t, s, _duplicated_labels(64, 14, 4), backend="torch").backward()
    assert seen and max(seen) <= 8 * 64


def test_non_finite_inputs_give_nan_not_hang():
    u, t, s = _inputs(10, 4)
    bad = u.detach().clone()
    bad[3, 1] = float("nan")
    loss = ace_kernels.label_guided_infonce(bad, t.detach(), s.detach(), backend="torch")
    assert torch.isnan(loss)
    inf_loss = ace_kernels.label_guided_infonce(u.detach(), t.detach(), float("inf"), backend="torch")
    assert not torch.isfinite(inf_loss)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_a_nan_image_row_makes_every_gradient_nan(backend, device):
    """A NaN in one image row enters every column log-sum-exp that its logits are not masked from,
    and through them every gradient: NaN throughout, as documented. The one-pass Triton forward
    merged a column's NaN log-sum-exp into its still empty (-inf) partial with tl.maximum, which
    takes the operand that is not NaN: those columns read -inf, and rows of other labels got
    gradients of +inf (row 7 here: text rows of positive entries, so that the infinite weights
    add up to inf, not to a NaN)."""
    u, t, s = (x.detach().float().to(device) for x in _inputs(9, 6))
    u[2, 0] = float("nan")
    t = F.normalize(t.abs(), dim=1)
    labels = torch.tensor([0, 1, 0, 0, 0, 1, 0, 2, 1], device=device)
    u, t, s = (x.requires_grad_() for x in (u, t, s))
    loss = ace_kernels.label_guided_infonce(u, t, s, labels, backend=backend)
    loss.backward()
    assert torch.isnan(loss)
    for name, grad in (("image_emb", u.grad), ("text_emb", t.grad), ("logit_scale", s.grad)):
        assert grad.isnan().all(), f"grad {name}: {grad}"


ERRORS = [
    ("image_emb", lambda u, t, s, y: (u[0], t, s, y)),
    ("text_emb", lambda u, t, s, y: (u, t[:, :5], s, y)),
    ("text_emb", lambda u, t, s, y: (u, t[:9], s, y)),
    ("text_emb", lambda u, t, s, y: (u, t.float(), s, y)),
    ("image_emb", lambda u, t, s, y: (u.long(), t.long(), s, y)),
    ("image_emb", lambda u, t, s, y: (u[:0], t[:0], s, y[:0])),
    ("image_emb", lambda u, t, s, y: (u[:, :0], t[:, :0], s, y)),  # D = 0
    ("text_emb", lambda u, t, s, y: (u, t.to("meta"), s, y)),  # another device than image_emb
    ("labels", lambda u, t, s, y: (u, t, s, y[:9])),
    ("labels", lambda u, t, s, y: (u, t, s, y[:, :, None])),
    ("labels", lambda u, t, s, y: (u, t, s, y.to(torch.complex64))),
    ("labels", lambda u, t, s, y: (u, t, s, y.to("meta"))),
    ("logit_scale", lambda u, t, s, y: (u, t, torch.ones(2), y)),
    ("logit_scale", lambda u, t, s, y: (u, t, "30", y)),
    ("logit_scale", lambda u, t, s, y: (u, t, True, y)),
    ("logit_scale", lambda u, t, s, y: (u, t, torch.tensor(3), y)),
    ("logit_scale", lambda u, t, s, y: (u, t, s.to("meta"), y)),
    ("logit_scale", lambda u, t, s, y: (u, t, 10**400, y)),  # was an OverflowError naming nothing
]


@pytest.mark.parametrize("argument,make", ERRORS)
def test_errors_name_the_argument(argument, make):
    u, t, s = _inputs(10, 8)
    labels = torch.zeros(10, 14)
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
        ace_kernels.label_guided_infonce(*make(u.detach(), t.detach(), s.detach(), labels), backend="torch")


def test_a_dtype_mismatch_names_the_dtype_it_follows():
    u, t, s = _inputs(4, 4)
    with pytest.raises(ValueError, match=r"^argument 'text_emb': expected dtype float32 \(the dtype of 'image_emb'\), "
                                         r"got float64$"):
        ace_kernels.label_guided_infonce(u.detach().float(), t.detach(), s.detach(), backend="torch")
    with pytest.raises(ValueError, match=r"^argument 'logit_scale': expected a number a float can hold, got an "
                                         r"integer of 16610 bits$"):
        ace_kernels.label_guided_infonce(u.detach(), t.detach(), -10**5000, backend="torch")


def test_unknown_backend_is_a_value_error():
    u, t, s = _inputs(4, 4)
    with pytest.raises(ValueError, match="backend"):
        ace_kernels.label_guided_infonce(u, t, s, backend="numpy")


# ---------------------------------------------------------------------------
# Triton backend: the interpreter on CPU (tiny shapes, fp32), the GPU when present.
# ---------------------------------------------------------------------------

# Under the interpreter D <= 64 takes one dot per similarity tile; wider D takes K steps and
# 64-wide gradient chunks (the GPU's paths for D <= 512 and 512 < D <= 1024, scaled down).
TRITON_CASES = [
    ("batch_1", 1, 5, lambda b: None),
    ("odd_with_duplicates", 37, 40, lambda b: _duplicated_labels(b, 3, 4)),
    ("all_equal", 23, 16, lambda b: torch.ones(b, 14)),
    ("no_labels_two_row_blocks", 70, 24, lambda b: None),
    # One-pass forward: 6 row blocks over 3 programs, so each merges several blocks' column LSEs.
    ("row_blocks_per_program", 90, 24, lambda b: _duplicated_labels(b, 3, 5)),
    ("d_64_widest_one_dot", 19, 64, lambda b: _duplicated_labels(b, 3, 4)),
    ("odd_d_two_chunks_k_steps", 37, 77, lambda b: _duplicated_labels(b, 3, 4)),
    # D = 5 * 16 + 1: the last K step holds a single column.
    ("d_one_past_k_tiles", 20, 81, lambda b: _duplicated_labels(b, 3, 3)),
]


@pytest.mark.triton
@pytest.mark.parametrize("name,batch,dim,make_labels", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_oracle(name, batch, dim, make_labels, device):
    u, t, s = _inputs(batch, dim, dtype=torch.float32)
    u, t = u.detach().to(device).requires_grad_(), t.detach().to(device).requires_grad_()
    labels = make_labels(batch)
    _check_triton_fp32(u, t, s, labels.to(device) if labels is not None else None, device)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True), (True, True, False)])
def test_only_the_needed_gradients_are_computed(backend, needs, device, monkeypatch):
    """Each subset of (image_emb, text_emb, logit_scale) that needs a gradient gets the same
    gradients as when all three do; the Triton backward runs the gradient kernel of the text
    rows only for text_emb, and that of the image rows only for image_emb or the scale."""
    u, t, s = _inputs(19, 24, dtype=torch.float32)
    labels = _duplicated_labels(19, 3, 4).to(device)
    leaves = [x.detach().to(device) for x in (u, t, s)]
    launches = []
    real = contrastive._triton_grad_rows
    monkeypatch.setattr(contrastive, "_triton_grad_rows", lambda a, *rest: launches.append(a) or real(a, *rest))
    inputs = [x.clone().requires_grad_() for x in leaves]
    want = torch.autograd.grad(ace_kernels.label_guided_infonce(*inputs, labels, backend=backend), inputs)
    launches.clear()
    inputs = [x.clone().requires_grad_(need) for x, need in zip(leaves, needs, strict=True)]
    wanted = [x for x in inputs if x.requires_grad]
    got = torch.autograd.grad(ace_kernels.label_guided_infonce(*inputs, labels, backend=backend), wanted)
    for g, w in zip(got, [w for w, need in zip(want, needs, strict=True) if need], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    if backend == "triton":
        wanted = zip(inputs[:2], (needs[0] or needs[2], needs[1]), strict=True)
        assert [a.data_ptr() for a in launches] == [x.data_ptr() for x, need in wanted if need]


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, False, True), (False, True, True), (True, True, True)],
                         ids=lambda v: "".join("ny"[b] for b in v))
def test_torch_backward_forms_only_the_needed_products(needs, monkeypatch):
    """The torch backend on one device, per block of rows: the logits' product, the product with the text
    rows only for image_emb or the scale (the image rows' gradient, whose dot with them is the scale's), and
    the text rows' product with its [B, D] accumulator only for text_emb. Its one-pass backward formed all
    three whatever was wanted: a frozen text tower paid three products per block where two were wanted, and
    a [B, D] gradient that autograd dropped. The gradients are the all-trained call's, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(contrastive, "_TORCH_BLOCK_ROWS", 8)
    batch, dim = 19, 24
    u, t, s = (x.detach() for x in _inputs(batch, dim))
    labels = _duplicated_labels(batch, 3, 4)
    products = []
    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default}

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in matmuls:
                products.append(tuple(out.shape))
            return out

    everything = [x.clone().requires_grad_() for x in (u, t, s)]
    want = torch.autograd.grad(ace_kernels.label_guided_infonce(*everything, labels, backend="torch"), everything)
    inputs = [x.clone().requires_grad_(need) for x, need in zip((u, t, s), needs, strict=True)]
    loss = ace_kernels.label_guided_infonce(*inputs, labels, backend="torch")
    with Products():
        got = torch.autograd.grad(loss, [x for x in inputs if x.requires_grad])
    expected = []
    for start, stop in ((0, 8), (8, 16), (16, 19)):
        expected += ([(stop - start, batch)] + [(stop - start, dim)] * (needs[0] or needs[2])
                     + [(batch, dim)] * needs[1])
    assert products == expected
    for g, w in zip(got, [w for w, need in zip(want, needs, strict=True) if need], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_embeddings_made_under_inference_mode_train_the_rest(backend, dtype, device):
    # A locked image tower's embeddings cached under torch.inference_mode, the text tower and the
    # multiplier trained: the reference ((s * u) @ t^T) trains the text side; the backends saved u itself.
    u, t, s = _inputs(19, 24, dtype=dtype)
    labels = _duplicated_labels(19, 3, 4).to(device)
    with torch.inference_mode():
        u_inf = u.detach().to(device).clone()
    for needs_scale in (False, True):
        t_in, s_in = t.detach().to(device).requires_grad_(), s.detach().float().to(device).requires_grad_(needs_scale)
        wrt = [t_in, s_in] if needs_scale else [t_in]
        got = torch.autograd.grad(ace_kernels.label_guided_infonce(u_inf, t_in, s_in, labels, backend=backend), wrt)
        refs = [x.detach().double().requires_grad_(x.requires_grad) for x in (u_inf, t_in, s_in)]
        want = torch.autograd.grad(label_guided_infonce_oracle(*refs, labels), [x for x in refs if x.requires_grad])
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.triton
def test_triton_strided_rows(device):
    # Row strides that are not D (views of wider buffers): the kernels take strides, not copies.
    u, t, s = _inputs(21, 72, dtype=torch.float32)
    u_view = u.detach().to(device)[:, 3:53].requires_grad_()
    t_view = t.detach().to(device)[:, 5:55].requires_grad_()
    assert u_view.stride(0) == 72
    _check_triton_fp32(u_view, t_view, s, _duplicated_labels(21, 3, 4).to(device), device)
    # Different row strides for u and t (u compact, t a view): each is read with its own stride.
    u_compact = u.detach().to(device)[:, 3:53].contiguous().requires_grad_()
    assert (u_compact.stride(0), t_view.stride(0)) == (50, 72)
    _check_triton_fp32(u_compact, t_view, s, _duplicated_labels(21, 3, 4).to(device), device)
    # Column strides other than 1 (a transposed buffer, every other column): the kernels read rows
    # with unit stride, so such a view is copied first, never read as if contiguous.
    u_cols = u.detach().to(device)[:, :24].t().contiguous().t().requires_grad_()
    t_cols = t.detach().to(device)[:, ::3].requires_grad_()
    assert u_cols.stride() == (1, 21) and t_cols.stride() == (72, 3)
    _check_triton_fp32(u_cols, t_cols, s, _duplicated_labels(21, 3, 4).to(device), device)


@pytest.mark.triton
@pytest.mark.parametrize("strategy", ["one_pass", "blocked"])
def test_triton_k_steps_read_each_side_with_its_own_row_stride(strategy, device, monkeypatch):
    """As test_triton_strided_rows (u compact, t a view of wider rows) where the similarity tiles
    are formed in K steps (_similarity_tile): D = 81 > 64 under the interpreter, as every fp32
    call on a GPU, and every tile of the blocked strategy. The one-dot test above never reaches them."""
    u, t, s = _inputs(21, 96, dtype=torch.float32)
    u_compact = u.detach().to(device)[:, :81].contiguous().requires_grad_()
    t_view = t.detach().to(device)[:, 7:88].requires_grad_()
    assert (u_compact.stride(0), t_view.stride(0)) == (81, 96)
    forcing = (_blocked_strategy(monkeypatch, torch.float32, 81) if strategy == "blocked"
               else contextlib.nullcontext())
    with forcing as calls:
        _check_triton_fp32(u_compact, t_view, s, _duplicated_labels(21, 3, 4).to(device), device)
    assert calls is None or calls == {"lse": 1, "grad": 2}


@pytest.mark.triton
def test_blocked_tiles_write_only_the_diagonal_they_hold(device):
    """The blocked forward's tiles run in any order on a GPU; each writes a_i . b_i only for the
    rows whose diagonal lies in its columns. A block of rows 9..24 (a share that starts inside a
    tile), one program: row tile 0 x column tile 0, which holds the diagonal of rows 9..15 only;
    the interpreter runs tiles in order, so only a single launch shows a tile writing past it."""
    if device.type == "cpu" and not contrastive._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    n, dim, r0, r1 = 40, 20, 9, 25
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, dim, generator=gen).to(device) for _ in range(2))
    row_part = torch.empty(r1 - r0, 3, device=device)
    diag = torch.full((r1 - r0,), float("nan"), device=device)
    scale = torch.tensor([30.0], device=device)
    contrastive._lse_tiles_kernel[(1,)](a[r0:], b, row_part, scale, row_part, row_part, diag,  # a from row r0 on
                                       r0, r1, n, dim, dim, dim, HAS_KEYS=False, IEEE=True, FAST_LOG=False,
                                       BLOCK_M=16, BLOCK_N=16, BLOCK_K=16,
                                       TILES=contrastive.TILES_ALL)
    torch.testing.assert_close(diag[:16 - r0], (a[r0:16] * b[r0:16]).sum(1), rtol=1e-6, atol=1e-6)
    assert torch.isnan(diag[16 - r0:]).all(), diag


@pytest.mark.triton
def test_triton_d_1024_boundary(device):
    # The widest D the Triton backend takes (16 gradient chunks and 64 K steps under the interpreter).
    u, t, s = _inputs(9, 1024, dtype=torch.float32)
    u, t = u.detach().to(device).requires_grad_(), t.detach().to(device).requires_grad_()
    _check_triton_fp32(u, t, s, _duplicated_labels(9, 3, 3).to(device), device)


def test_triton_rejects_d_over_1024():
    pytest.importorskip("triton")
    u, t, s = _inputs(4, 1025, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="D <= 1024"):
        ace_kernels.label_guided_infonce(u, t, s, backend="triton")


def test_triton_refuses_bf16_under_the_interpreter(monkeypatch):
    # The interpreter's bf16 tl.dot gives garbage: an explicit backend="triton" says so instead of
    # returning it; fp16 and fp32 still run, and the same tensors take the kernels on a GPU.
    pytest.importorskip("triton")
    u, t, _ = _inputs(6, 8, dtype=torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert any("refuse bfloat16" in r for r in contrastive._triton_check(u, t))
    assert contrastive._triton_check(u.half(), t.half()) == []
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert contrastive._triton_check(u, t) == []


@pytest.mark.interpreter
def test_triton_bf16_under_the_interpreter_is_an_error():
    pytest.importorskip("triton")
    u, t, s = _inputs(6, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="refuse bfloat16.*backend='torch'"):
        ace_kernels.label_guided_infonce(u, t, s, backend="triton")


def test_triton_check_rejects_int32_column_offsets():
    # B * row stride >= 2^31 would overflow the int32 column-tile offsets: the check says so
    # (a stride-only view, nothing allocated).
    u = torch.as_strided(torch.empty(1), (2**22, 512), (0, 0))
    assert any("2^31" in r for r in contrastive._triton_check(u, u))
    v = torch.as_strided(torch.empty(1), (2**21, 512), (0, 0))
    assert contrastive._triton_check(v, v) == []
    # The row strides of both: a compact u (2^30 elements) with t a view of a 1024-wide buffer.
    u = torch.empty_strided((2**21, 512), (512, 1), device="meta")
    t = torch.empty_strided((2**21, 512), (1024, 1), device="meta")
    assert any("2^31" in r for r in contrastive._triton_check(u, t))
    assert any("2^31" in r for r in contrastive._triton_check(t, u))


@pytest.mark.triton
def test_triton_takes_one_row_of_any_stride(device):
    # A batch of one row is read at offset 0 only: its row stride (here 2^31, a stride-only view of D
    # elements) reaches nothing, and the check took it as B * row stride >= 2^31 (torch instead).
    u, t, s = _inputs(1, 24, dtype=torch.float32)
    u_one, t_one = (torch.as_strided(x.detach().to(device).reshape(-1).clone(), (1, 24), (2**31, 1))
                    .requires_grad_() for x in (u, t))
    assert contrastive._triton_check(u_one, t_one) == []
    _check_triton_fp32(u_one, t_one, s, None, device)
    assert contrastive._triton_check(u_one.expand(2, 24), t_one.expand(2, 24)) == []  # (stride 0)
    two = torch.empty_strided((2, 24), (2**31, 1), device="meta")  # two rows: the stride counts
    assert any("2^31" in r for r in contrastive._triton_check(two, two))


def test_triton_check_rejects_2_30_rows_and_float64():
    # The kernels count rows and columns in int32: tl.cdiv(row_hi, BLOCK_M) is row_hi + 127 in int32
    # and the column loop steps c0 += BLOCK_N up to n, so a batch within a tile of 2^31 wraps (at
    # row_hi = 2^31 - 1 the one-pass forward wrote no row log-sum-exp at all). Refused from 2^30 rows,
    # which only a width of 1 reaches (B * row stride < 2^31 holds B under 2^30 from D = 2); stride-only
    # views of width 1, nothing allocated. float64 embeddings are the torch backend's.
    message = "the Triton kernels count rows in int32 (tile loops, block counts): B must be < 2^30"
    for batch in (2**31 - 1, 2**31 - 128, 2**30):
        rows = torch.as_strided(torch.empty(1), (batch, 1), (0, 0))
        assert contrastive._triton_check(rows, rows) == [message], batch
    fewer = torch.as_strided(torch.empty(1), (2**30 - 1, 1), (0, 0))
    assert contrastive._triton_check(fewer, fewer) == []
    u = torch.zeros(3, 4, dtype=torch.float64)
    assert contrastive._triton_check(u, u) == ["the Triton kernels take fp16/bf16/fp32 embeddings, got float64"]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.triton,
                                                                            pytest.mark.interpreter])])
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, True)])
def test_backward_with_group_runs_only_the_needed_passes(backend, needs, one_rank_group, monkeypatch):
    """With group= (one rank of one): the image rows' gradient pass runs only for image_emb or the
    scale, the text rows' pass and their reduction only for text_emb (the torch backend ran
    both whatever was wanted before 2026-12-05), and the gradients are those of the call without
    group= (bit for bit on Triton, which passes alike there; the torch backend takes both
    directions in one pass without group=: fp64 rounding apart)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    u, t, s = (x.detach().to(dtype) for x in _inputs(19, 24))
    labels = _duplicated_labels(19, 3, 4)
    passes, reduced = [], []
    name = "_torch_grad_rows" if backend == "torch" else "_triton_grad_rows"
    real_pass, real_collective = getattr(contrastive, name), contrastive._collective
    monkeypatch.setattr(contrastive, name, lambda a, *rest: passes.append(a) or real_pass(a, *rest))
    monkeypatch.setattr(contrastive, "_collective", lambda name: (
        lambda *a, **k: reduced.append(name) or real_collective(name)(*a, **k)))
    grads = []
    for group in (None, one_rank_group):
        inputs = [x.clone().requires_grad_(need) for x, need in zip((u, t, s), needs, strict=True)]
        passes.clear()
        loss = ace_kernels.label_guided_infonce(*inputs, labels, group=group, backend=backend)
        grads.append(torch.autograd.grad(loss, [x for x in inputs if x.requires_grad]))
        if group is not None:
            # By value: the text rows are a gathered copy. Their pass runs first with group=, so
            # that the image rows' overlaps their reductions.
            assert [torch.equal(a, u) for a in passes] == [False] * needs[1] + [True] * (needs[0] or needs[2])
        elif backend == "triton":
            assert [torch.equal(a, u) for a in passes] == [True] * (needs[0] or needs[2]) + [False] * needs[1]
    assert reduced.count("reduce") == int(needs[1])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL64 if backend == "torch" else 0)


@pytest.mark.parametrize("needs", [(False, True, True), (False, False, True), (True, True, False)],
                         ids=lambda v: "".join("ny"[b] for b in v))
def test_torch_passes_with_group_form_only_the_wanted_gradients(needs, one_rank_group, monkeypatch):
    """With group= on the torch backend, each pass forms only what is wanted of it: the image rows' pass
    no [B, D] gradient of a frozen image tower when it runs for the logit scale alone (a locked image
    tower with the text tower and the scale trained, as LiT trains), and the text rows' pass no
    logit-scale term, which its caller drops. Both were formed whatever was wanted; the gradients
    match the fp64 oracle's, and the frozen inputs get none."""
    u, t, s = (x.detach() for x in _inputs(19, 24))
    labels = _duplicated_labels(19, 3, 4)
    formed = []
    real = contrastive._torch_grad_rows

    def record(a, *rest):
        grad_a, grad_scale = real(a, *rest)
        formed.append(("u" if torch.equal(a, u) else "t", grad_a is not None, grad_scale is not None))
        return grad_a, grad_scale

    monkeypatch.setattr(contrastive, "_torch_grad_rows", record)
    inputs = [x.clone().requires_grad_(need) for x, need in zip((u, t, s), needs, strict=True)]
    loss = ace_kernels.label_guided_infonce(*inputs, labels, group=one_rank_group, backend="torch")
    loss.backward()
    assert formed == [("t", True, False)] * needs[1] + [("u", needs[0], needs[2])] * (needs[0] or needs[2])
    refs = [x.clone().requires_grad_(need) for x, need in zip((u, t, s), needs, strict=True)]
    label_guided_infonce_oracle(*refs, labels).backward()
    for x, ref in zip(inputs, refs, strict=True):
        if ref.grad is None:
            assert x.grad is None
        else:
            torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=ATOL64)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.triton,
                                                                            pytest.mark.interpreter])])
def test_group_of_one_on_the_suites_device_in_chunks(backend, device, monkeypatch):
    """group= over a process group of this process alone on the suite's device: gloo on the CPU, NCCL
    on a GPU (bf16 there; the interpreter's bf16 is not the GPU's), whose all-gathers, column-partial
    fold, asynchronous reductions of the text rows' gradients (in chunks of 16 rows here, so that
    they overlap the next chunk's kernels and are waited for on NCCL's stream) and all-reduce of
    the shares run nowhere else in the suite (several ranks need several GPUs). With one rank every
    sum is the rank's own: the loss and gradients are the call's without group=, up to rounding."""
    import datetime

    import torch.distributed as dist

    pg_backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or (pg_backend == "nccl" and not dist.is_nccl_available()):
        pytest.skip(f"needs torch.distributed with {pg_backend}")
    if dist.is_initialized():
        pytest.skip("needs no process group set up already")
    dtype = torch.bfloat16 if device.type == "cuda" else (torch.float64 if backend == "torch" else torch.float32)
    u, t, s = (x.detach().to(device) for x in _inputs(83, 24))
    u, t = u.to(dtype), t.to(dtype)
    labels = _duplicated_labels(83, 3, 4).to(device)
    monkeypatch.setattr(contrastive, "_REDUCE_CHUNK_ROWS", 16)
    chunks = []
    real_reduce = contrastive._reduce_to_owners
    monkeypatch.setattr(contrastive, "_reduce_to_owners", lambda part, *a, **k: real_reduce(
        lambda r0, r1: chunks.append((r0, r1)) or part(r0, r1), *a, **k))
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group(pg_backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = []
        for group in (None, dist.group.WORLD):
            inputs = [x.clone().requires_grad_() for x in (u, t, s)]
            loss = ace_kernels.label_guided_infonce(*inputs, labels, group=group, backend=backend)
            results.append([loss.detach(), *torch.autograd.grad(loss, inputs)])
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
    assert chunks == [(r0, min(r0 + 16, 83)) for r0 in range(0, 83, 16)]
    # bf16: a gradient one rounding apart (the group path sums in fp32 in other blocks) differs by an
    # ulp, under 0.8% of it; the gradients' entries average 0.07.
    rtol, atol = {torch.bfloat16: (1e-2, 1e-3), torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-12)}[dtype]
    for name, got, want in zip(("loss", "grad u", "grad t", "grad scale"), *reversed(results), strict=True):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, msg=name)


def test_a_rank_passing_no_tensor_with_group_raises_its_own_error(one_rank_group, monkeypatch):
    """image_emb that is not a tensor has no device for the shape exchange: the exchange takes
    the group backend's (the CPU for gloo, the current GPU for NCCL), so the rank raises its
    argument error (after telling the others) instead of failing inside the exchange."""
    import torch.distributed as dist

    with pytest.raises(ValueError, match=r"^argument 'image_emb': expected a torch.Tensor, got list"):
        ace_kernels.label_guided_infonce([[1.0, 0.0]], torch.zeros(1, 2), 10.0, group=one_rank_group)
    assert contrastive._exchange_device([[1.0, 0.0]], one_rank_group) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert contrastive._exchange_device([[1.0, 0.0]], one_rank_group) == torch.device("cuda", 1)
    assert contrastive._exchange_device(torch.zeros(1, 2), one_rank_group) == torch.device("cpu")


def test_module_repr_names_a_backend_or_group_it_was_given(one_rank_group):
    # The repr showed the multiplier only: a module forced onto one backend, or computing the loss over a
    # process group's global batch, printed as a plain local one.
    assert repr(ace_kernels.LabelGuidedInfoNCE(10.0, backend="torch")) == (
        "LabelGuidedInfoNCE(logit_scale=10, backend='torch')")
    assert repr(ace_kernels.LabelGuidedInfoNCE(2.5, group=one_rank_group).to("meta")) == (
        "LabelGuidedInfoNCE(logit_scale=<meta>, group=<1 rank>)")
    assert repr(ace_kernels.LabelGuidedInfoNCE(10.0, backend="auto")) == "LabelGuidedInfoNCE(logit_scale=10)"


def test_module_with_a_group_deep_copies_and_pickles(one_rank_group):
    # copy.deepcopy and torch.save of a module holding a process group raised "cannot pickle
    # 'ProcessGroup' object" (an EMA/averaged copy of a model, a whole-model checkpoint). A copy in
    # this process shares the group; a pickled one is saved without it and refuses to run until it
    # is given a group again (or None), rather than computing the local batch's loss.
    import copy
    import io

    module = ace_kernels.LabelGuidedInfoNCE(2.5, group=one_rank_group, backend="torch")
    u, t, _ = _inputs(6, 8)
    want = module(u.detach(), t.detach())
    for copied in (copy.deepcopy(module), copy.copy(module)):
        assert copied.group is one_rank_group
        assert torch.equal(copied(u.detach(), t.detach()), want)
    deep = copy.deepcopy(module)
    assert deep.logit_scale is not module.logit_scale and torch.equal(deep.logit_scale, module.logit_scale)

    buffer = io.BytesIO()
    torch.save(module, buffer)
    assert module.group is one_rank_group  # the saved module keeps its own
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert repr(loaded) == "LabelGuidedInfoNCE(logit_scale=2.5, backend='torch', group=<1 rank, not saved>)"
    with pytest.raises(ValueError, match=r"^LabelGuidedInfoNCE.group: this module was pickled .* group of 1 rank"):
        loaded(u.detach(), t.detach())
    copied = copy.deepcopy(loaded)  # still without a group, and still saying so
    with pytest.raises(ValueError, match=r"^LabelGuidedInfoNCE.group: this module was pickled"):
        copied(u.detach(), t.detach())
    loaded.group = one_rank_group
    assert torch.equal(loaded(u.detach(), t.detach()), want)
    loaded.group = None
    assert torch.equal(loaded(u.detach(), t.detach()), want)  # one rank: the local batch is the global one


def test_a_module_pickled_again_without_its_group_still_says_so(one_rank_group):
    # A loaded module whose group was not saved (a checkpoint of a checkpoint) pickles again as it is.
    import io

    module = ace_kernels.LabelGuidedInfoNCE(2.5, group=one_rank_group, backend="torch")
    for _ in range(2):
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        module = torch.load(buffer, weights_only=False)
        assert repr(module) == "LabelGuidedInfoNCE(logit_scale=2.5, backend='torch', group=<1 rank, not saved>)"


def test_module_counts_the_ranks_of_its_group_in_its_repr_and_when_pickled():
    # The other tests hold a group of one rank, whose count a constant 1 would print too.
    import io

    class ThreeRanks:  # all that the repr and pickling read of a process group
        def size(self):
            return 3

    module = ace_kernels.LabelGuidedInfoNCE(2.5)
    module.group = ThreeRanks()
    assert repr(module) == "LabelGuidedInfoNCE(logit_scale=2.5, group=<3 ranks>)"
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert repr(loaded) == "LabelGuidedInfoNCE(logit_scale=2.5, group=<3 ranks, not saved>)"
    u, t, _ = _inputs(4, 8)
    with pytest.raises(ValueError, match=r"^LabelGuidedInfoNCE.group: this module was pickled .* group of 3 rank\(s\)"):
        loaded(u, t)


def test_module_computes_the_loss_with_its_group_and_backend(one_rank_group):
    # The module's group= and backend= reach the loss. With a group, an empty local batch is judged on
    # the global batch (one rank of one: that one is empty too); backend="triton" refuses fp64
    # embeddings, which backend="auto" gives to torch.
    empty = torch.zeros(0, 8, requires_grad=True)
    with pytest.raises(ValueError, match="^label_guided_infonce with group=: the global batch is empty"):
        ace_kernels.LabelGuidedInfoNCE(10.0, group=one_rank_group, backend="torch")(empty, empty)
    u, t, _ = _inputs(6, 8)
    with pytest.raises(RuntimeError, match="^label_guided_infonce: backend 'triton' cannot run this call"):
        ace_kernels.LabelGuidedInfoNCE(10.0, backend="triton")(u, t)


def test_ranks_that_differ_in_a_dtype_are_told_which_by_name(monkeypatch):
    """The shape exchange's table compared across ranks, with a second rank faked in the
    all-gather: dtypes travel as codes and are named in the error (the distributed tests spawn
    ranks that differ in width, gradients and backend, none in a dtype)."""
    import torch.distributed as dist

    u, labels = torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64)

    def second_rank(column=None, dtype=None):
        def all_gather(table, row, group=None):
            for entry in table:
                entry.copy_(row)
            if column is not None:
                table[1][column] = contrastive._DTYPE_CODES[dtype]
        return all_gather

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", second_rank())
    assert contrastive._exchange_shapes(u, u, 10.0, labels, None, backend="torch") == (3, 3)
    for column, dtype, what, shown in ((4, torch.float16, "embedding dtype", r"\['float32', 'float16'\]"),
                                       (5, torch.int32, "label dtype", r"\['int64', 'int32'\]")):
        monkeypatch.setattr(dist, "all_gather", second_rank(column, dtype))
        with pytest.raises(ValueError, match=rf"^label_guided_infonce with group=: every rank must pass the same "
                                             rf"{what}; got {shown} on ranks 0\.\.1$"):
            contrastive._exchange_shapes(u, u, 10.0, labels, None, backend="torch")


@pytest.mark.parametrize("embedding", ["image_emb", "text_emb"])
def test_ranks_that_differ_in_either_embeddings_need_of_a_gradient_are_told_so(embedding, monkeypatch):
    """A second rank faked in the shape exchange whose image or text rows need no gradient where
    this rank's do: every rank raises, naming the embedding (whether the text rows need one decides
    whether the backward runs their reductions; the spawned ranks of the distributed tests
    differ in image_emb's only)."""
    import torch.distributed as dist

    u = torch.zeros(3, 4, requires_grad=True)
    column = 6 if embedding == "image_emb" else 7

    def all_gather(table, row, group=None):
        for entry in table:
            entry.copy_(row)
        table[1][column] = 0

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    with pytest.raises(ValueError, match=rf"^label_guided_infonce with group=: every rank must pass the same "
                                         rf"requires_grad of {embedding} \(with grad mode on\); got \[1, 0\] on "
                                         rf"ranks 0\.\.1 \(a rank with an empty batch"):
        contrastive._exchange_shapes(u, u, 10.0, None, None, backend="torch")


@pytest.mark.parametrize("mine, theirs, differ", [
    (10.0, 11.0, True), (torch.tensor(10.0), torch.tensor(10.0 + 2 ** -20), True), (10.0, float("nan"), True),
    (torch.tensor(10.0, dtype=torch.bfloat16), 10.0, False), (0.0, -0.0, False), (float("nan"), float("nan"), False),
])
def test_ranks_that_differ_in_the_logit_scale_are_told_so(mine, theirs, differ, monkeypatch):
    """The scale travels in the shape exchange as the bits of its float64 value (a tensor's or a
    number's alike): a rank whose scale differs by one ulp of fp32 makes every rank raise, naming
    the values; equal values (+0 and -0, NaN and NaN, a bf16 tensor and the number) do not."""
    import torch.distributed as dist

    u = torch.zeros(3, 4)
    _, theirs_row = _exchange_row(monkeypatch, u, theirs)

    def all_gather(table, row, group=None):
        table[0].copy_(row)
        table[1].copy_(theirs_row)

    monkeypatch.setattr(dist, "all_gather", all_gather)
    if not differ:
        assert contrastive._exchange_shapes(u, u, mine, None, None, backend="torch") == (3, 3)
        return
    shown = re.escape(str([float(mine), float(theirs)]))
    with pytest.raises(ValueError, match=rf"^label_guided_infonce with group=: every rank must pass the same "
                                         rf"logit_scale \(each rank's loss would use its own\); got {shown} "
                                         rf"on ranks 0\.\.1$"):
        contrastive._exchange_shapes(u, u, mine, None, None, backend="torch")


def _exchange_row(monkeypatch, u, logit_scale):
    """(the table, the row) one rank of two sends for ``logit_scale`` (captured from the exchange)."""
    import torch.distributed as dist

    sent = []

    def capture(table, row, group=None):
        sent.append(row.clone())
        for entry in table:
            entry.copy_(row)

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather", capture)
    contrastive._exchange_shapes(u, u, logit_scale, None, None, backend="torch")
    return sent, sent[0]


def test_gpu_launch_configuration_and_its_flop_count():
    # The GPU launch configurations at D = 512 in 16 bits take all of D in one chunk (one dot per
    # similarity tile, so the FLOP count below holds), and _triton_matmul_flops (the benchmark's
    # executed-rate denominator) counts forward + backward as 10 B^2 D there. That each tile is
    # really computed once is the kernels' structure, not something this test observes.
    pytest.importorskip("triton")
    for dtype in (torch.bfloat16, torch.float16):
        cfg = contrastive._launch_config("grad", dtype, 512, interpreter=False)
        assert cfg["ONE_DOT"] and cfg["d_chunks"] == 1 and cfg["BLOCK_D"] == 512
        assert contrastive._launch_config("lse", dtype, 512, interpreter=False)["ONE_DOT"]
        # 512 < D <= 1024: two D halves, each recomputing the similarities.
        assert contrastive._launch_config("grad", dtype, 1024, interpreter=False)["d_chunks"] == 2
    batch, dim = 65536, 512
    assert contrastive._triton_matmul_flops(batch, dim, torch.bfloat16) == 10 * batch**2 * dim
    assert contrastive._triton_matmul_flops(batch, 1024, torch.bfloat16) == 14 * batch**2 * 1024


def _check_owned_shares(batch, shares, device, dim=20):
    """The Triton backend's owned shares ``[(lo, hi), ...]`` (as with group=; they partition
    the batch) add up to the fp64 oracle's loss and gradients, with logit_scale 100 and
    duplicates; an empty share (lo == hi) is 0 with zero gradients."""
    u, t, s = _inputs(batch, dim, scale=100.0, dtype=torch.float32)
    u, t = u.detach().to(device).requires_grad_(), t.detach().to(device).requires_grad_()
    s32 = s.detach().float().to(device).requires_grad_()
    labels = _duplicated_labels(batch, 14, 3).to(device)
    keys = contrastive._label_keys(labels)
    ref = _loss_and_grads(label_guided_infonce_oracle, u.double(), t.double(),
                          s.detach().to(device).requires_grad_(), labels)
    total, grads = 0.0, [0, 0, 0]
    for (lo, hi), share in zip(shares, _rank_shares("triton", u, t, s32, keys, shares), strict=True):
        g = torch.autograd.grad(share, [u, t, s32])
        if lo == hi:
            assert share.item() == 0.0
            assert all(not x.any() and x.shape == y.shape for x, y in zip(g, [u, t, s32], strict=True))
        total = total + share.detach()
        grads = [a + b for a, b in zip(grads, g, strict=True)]
    # fp32 with logits up to 100: ~100 * 6e-8 per logit.
    torch.testing.assert_close(total.double(), ref[0], rtol=0, atol=3e-5)
    for got, want in zip(grads, ref[1], strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-5)


def test_config_keys_name_the_path_a_call_takes():
    # What _tuning.forced and the tuned file are keyed by, on a GPU and under the interpreter.
    pytest.importorskip("triton")
    key = contrastive._config_key
    assert key(torch.bfloat16, 512, interpreter=False) == "16bit/one_dot"
    assert key(torch.float16, 1024, interpreter=False) == "16bit/k_steps"
    assert key(torch.float16, 40, aligned=False, interpreter=False) == "16bit/unaligned"
    assert key(torch.float32, 64, interpreter=False) == "fp32/k_steps"
    assert key(torch.float32, 20, aligned=False, interpreter=False) == "fp32/unaligned"
    assert key(torch.float16, 40, aligned=False, interpreter=True) == "16bit/one_dot"
    assert key(torch.float32, 77, aligned=False, interpreter=True) == "fp32/unaligned"
    with _tuning.forced("contrastive", "grad", "fp32/unaligned", BLOCKED):
        assert contrastive._launch_config("grad", torch.float32, 20, aligned=False, interpreter=False)["STRATEGY"] \
            == "blocked"


@pytest.mark.triton
def test_triton_large_scale_and_owned_shares(device):
    _check_owned_shares(29, [(0, 17), (17, 17), (17, 29)], device)  # (17, 17): an empty rank's zero share
    # The owned-share forward's K steps (D > 64 under the interpreter), with D and the batch one
    # past a multiple of the 16-wide tiles: the last K step and the last column tile hold one each.
    _check_owned_shares(33, [(0, 17), (17, 33)], device, dim=81)


@pytest.mark.triton
# K steps: D > 64 under the interpreter. The blocked strategy: tiles of 16 rows, one block per row tile.
@pytest.mark.parametrize("dim, strategy", [(8, "one_pass"), (81, "one_pass"), (8, "blocked")],
                         ids=["one_dot", "k_steps", "blocked"])
def test_triton_owned_shares_with_every_column_lse_below_exp_range(dim, strategy, device, monkeypatch):
    """Every image against every text near cosine -1 at s = 100: each logit, so each column's
    log-sum-exp, is about -100, under -88.7, where e**-lse overflows float32. The ranks' rows
    start and end inside the kernels' row tiles (16 rows under the interpreter, 32 to 128 on a
    GPU), whose rows outside the range must add nothing: they load as 0, and with logit 0
    (unmasked) their column weights were e**100 = inf in the one-dot gradient pass, so inf * 0
    made the summed logit-scale gradient NaN, where one device's is finite; a forward that let
    them into the column log-sum-exps would add e**0 to sums of about e**-100 (at a usual scale,
    e**0 beside sums of e**30 to e**100, no test tolerance sees it). Shares and gradients
    against the fp64 oracle, an empty rank included."""
    n = 37
    gen = torch.Generator().manual_seed(3)
    v = F.normalize(torch.randn(dim, generator=gen, dtype=torch.float64), dim=0)
    u = F.normalize(v + 0.02 * torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    t = F.normalize(-v + 0.02 * torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    s = torch.tensor(100.0, dtype=torch.float64)
    ref = _loss_and_grads(label_guided_infonce_oracle, u.to(device).requires_grad_(),
                          t.to(device).requires_grad_(), s.to(device).requires_grad_(), None)
    u32, t32, s32 = (x.float().to(device).requires_grad_() for x in (u, t, s))
    ranges = [(0, 5), (5, 5), (5, 21), (21, n)]
    forcing = (_blocked_strategy(monkeypatch, torch.float32, dim, part_bytes=1) if strategy == "blocked"
               else contextlib.nullcontext())
    with forcing as calls:
        shares = _rank_shares("triton", u32, t32, s32, None, ranges)
        col_lse = contrastive._triton_lse_both(u32.detach(), t32.detach(), s32.detach().reshape(1), None, 0, n)[1]
        assert col_lse.max() < -88.8  # the case: every column's log-sum-exp under float32's exp range
        total, grads = 0.0, [0, 0, 0]
        for share in shares:
            g = torch.autograd.grad(share, [u32, t32, s32])
            assert all(torch.isfinite(x).all() for x in g), [x.isfinite().all().item() for x in g]
            total = total + share.detach()
            grads = [a + b for a, b in zip(grads, g, strict=True)]
    assert calls is None or (calls["lse"] and calls["grad"])  # the blocked kernels ran
    torch.testing.assert_close(total.double(), ref[0], rtol=0, atol=3e-5)
    for got, want in zip(grads, ref[1], strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-5)


# The blocked strategy (STRATEGY="blocked", swept on a GPU), forced for both kernels with the
# interpreter's tiles and buffers so small that every case takes several row blocks: the
# forward's column log-sum-exps are merged across blocks (two row tiles a block up to B = 90),
# the backward's weights buffer holds one tile of rows and is reused block after block.
# (test_triton_sweep_candidates_fp16 runs the GPU candidates: blocks of several row tiles.)
BLOCKED = dict(STRATEGY="blocked", BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)


@contextlib.contextmanager
def _blocked_strategy(monkeypatch, dtype, dim, *, part_bytes=4 * 16 * 2 * 6, weight_bytes=1):
    """Force the blocked strategy for ``dtype`` embeddings of width ``dim`` (contiguous: the
    configuration key of that path on this device, the interpreter's or a GPU's) and count its
    calls."""
    dtype_class = contrastive._config_key(dtype, dim, aligned=dim % 16 == 0)
    calls = {"lse": 0, "grad": 0}
    lse, grad = contrastive._lse_blocked, contrastive._grad_blocked

    def count(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(contrastive, "_lse_blocked", count("lse", lse))
    monkeypatch.setattr(contrastive, "_grad_blocked", count("grad", grad))
    monkeypatch.setattr(contrastive, "_BLOCKED_PART_BYTES", part_bytes)
    monkeypatch.setattr(contrastive, "_BLOCKED_WEIGHT_BYTES", weight_bytes)
    with _tuning.forced("contrastive", "lse", dtype_class, BLOCKED), \
            _tuning.forced("contrastive", "grad", dtype_class, BLOCKED):
        yield calls


@pytest.mark.triton
@pytest.mark.parametrize("strategy", ["one_pass", "blocked"])
@pytest.mark.parametrize("dim", [32, 81], ids=["one_dot", "k_steps"])  # K steps: D > 64 under the interpreter
def test_triton_reads_nothing_around_a_ranks_own_rows(dim, strategy, device, monkeypatch):
    """With group= a rank's image rows come in a tensor of their own, and the one-pass kernels' row
    blocks, aligned in the global batch, start before its first row: nothing outside that tensor may
    be read (the second backward pass takes those rows as its columns). Here they are a view into
    NaN rows on both sides: the share, both log-sum-exps, the gradients and the logit-scale gradient
    are a clean copy's, bit for bit."""
    n, lo, hi = 45, 21, 38  # rows 16..20 of the interpreter's 16-row block that holds row 21 are another rank's
    u, t, s = (x.detach().float().to(device) for x in _inputs(n, dim))
    keys = contrastive._label_keys(_duplicated_labels(n, 14, 5).to(device))
    padded = torch.full((hi - lo + 40, dim), float("nan"), device=device)
    view = padded[20:20 + hi - lo]
    view.copy_(u[lo:hi])
    forcing = _blocked_strategy(monkeypatch, torch.float32, dim) if strategy == "blocked" else contextlib.nullcontext()
    results = []
    with forcing:
        for mine in (view, u[lo:hi].clone()):
            share, saved = contrastive._triton_share(mine, t, s, keys, lo, hi, combine=lambda part: part)
            grads = contrastive._triton_share_grads(saved, torch.tensor(1.0, device=device), lo, hi, grouped=True)
            results.append((share, *saved[4:], *grads))
    for got, want in zip(*results, strict=True):
        assert torch.isfinite(want).all() and torch.equal(got, want)


# The backends' column-chunk log-sum-exps (group=: a rank's rows against each rank's text rows as
# they arrive round the ring): torch, and Triton's two forward strategies.
CHUNK_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton),
                  pytest.param("triton_blocked", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", CHUNK_BACKENDS)
@pytest.mark.parametrize("labels", ["none", "duplicates", "all_equal"])
@pytest.mark.parametrize("sizes", [(7, 23, 15), (16, 32, 20)], ids=["inside_tiles", "whole_tiles"])
def test_a_ranks_rows_against_a_chunk_of_columns_match_the_dense_logits(backend, labels, sizes, device, monkeypatch):
    """Each of 3 uneven ranks' rows against each rank's columns, and against every column at once:
    the rows' log-sum-exps over those columns and the columns' over those rows are the dense fp64
    masked logits' (rows before their columns, after them and their own), and the positives'
    products come with columns that hold every row's own only (the same rule on both backends).
    The ranks' rows start and end inside the interpreter's 16-row tiles, or on them (the blocked
    strategy's interior tiles then hold rows numbered past the chunk's columns). With every label
    equal, the other ranks' columns are all masked: -inf both ways, never NaN."""
    n, dim = sum(sizes), 20
    u, t, s = (x.detach().to(device) for x in _inputs(n, dim))
    make = {"none": lambda: None, "duplicates": lambda: _duplicated_labels(n, 14, 5),
            "all_equal": lambda: torch.ones(n, 3, dtype=torch.int64)}[labels]
    label_rows = make()
    keys = contrastive._label_keys(label_rows.to(device)) if label_rows is not None else None
    logits = s.item() * u @ t.t()
    if keys is not None:
        logits = logits.masked_fill((keys[:, None] == keys[None, :]) & ~torch.eye(n, dtype=torch.bool, device=device),
                                    float("-inf"))
    if backend == "torch":
        passes, dtype = contrastive._TORCH_PASSES, torch.float64
    else:
        passes, dtype = contrastive._TRITON_PASSES, torch.float32
    forcing = _blocked_strategy(monkeypatch, dtype, dim) if backend == "triton_blocked" else contextlib.nullcontext()
    scale, kernel_keys = passes.prepare(s.to(dtype), keys)
    starts = contrastive._starts(sizes)
    with forcing as calls:
        for lo, hi in itertools.pairwise(starts):
            for c0, c1 in [*itertools.pairwise(starts), (0, n)]:
                rows, cols, own = passes.chunk(u[lo:hi].to(dtype), t[c0:c1].to(dtype), scale, kernel_keys, lo, c0)
                block = logits[lo:hi, c0:c1]
                atol = 0 if backend == "torch" else 2e-5
                torch.testing.assert_close(rows.double(), torch.logsumexp(block, dim=1), rtol=1e-7, atol=atol)
                torch.testing.assert_close(cols.double(), torch.logsumexp(block, dim=0), rtol=1e-7, atol=atol)
                holds_own = c0 <= lo and hi <= c1
                if labels == "all_equal" and not holds_own:
                    assert (rows == float("-inf")).all() and (cols == float("-inf")).all()
                if holds_own:
                    torch.testing.assert_close(own.double(), (u[lo:hi] * t[lo:hi]).sum(1), rtol=0, atol=atol or 1e-12)
                else:
                    assert own is None
    if backend == "triton_blocked":
        assert calls["lse"] == 12


@pytest.mark.triton
@pytest.mark.parametrize("name,batch,dim,make_labels", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_blocked_strategy_matches_oracle(name, batch, dim, make_labels, device, monkeypatch):
    u, t, s = _inputs(batch, dim, dtype=torch.float32)
    u, t = u.detach().to(device).requires_grad_(), t.detach().to(device).requires_grad_()
    labels = make_labels(batch)
    with _blocked_strategy(monkeypatch, torch.float32, dim) as calls:
        _check_triton_fp32(u, t, s, labels.to(device) if labels is not None else None, device)
    assert calls == {"lse": 1, "grad": 2}


def test_blocked_rows_are_bounded_by_the_buffer_budget():
    pytest.importorskip("triton")
    # B = 65,536 in bf16: 32 MiB of weights hold 256 rows; the forward's 8 MiB of fp32 partials
    # (1024 column tiles of 64) hold 2048 rows; small batches take one block of whole tiles.
    assert contrastive._block_rows(65536, 128, 65536 * 2, contrastive._BLOCKED_WEIGHT_BYTES) == 256
    assert contrastive._block_rows(65536, 128, 4 * 1024, contrastive._BLOCKED_PART_BYTES) == 2048
    assert contrastive._block_rows(150, 128, 150 * 2, contrastive._BLOCKED_WEIGHT_BYTES) == 256
    # Never less than one tile, however large the batch.
    assert contrastive._block_rows(10**7, 128, 2 * 10**7, contrastive._BLOCKED_WEIGHT_BYTES) == 128


def test_blocked_launchers_size_their_blocks_by_both_buffers_and_the_dtype():
    pytest.importorskip("triton")
    n = 65536
    # Backward: the weights are in the inputs' dtype, so 32 MiB hold 256 rows of B = 65,536 in bf16, 128 in fp32.
    wide = dict(BLOCK_M=128, BLOCK_N=64)
    assert contrastive._grad_block_rows(n, wide, 2) == 256
    assert contrastive._grad_block_rows(n, wide, 4) == 128
    # Forward: 8 MiB of row partials ([rows, B / BLOCK_N] fp32) hold 2048 rows at 128 x 64 tiles, and as
    # much of column partials ([rows / BLOCK_M, B] fp32) 4096. With tiles taller than wide (64 x 128)
    # the row partials would hold 4096 rows, the column partials 2048: the smaller bound wins.
    tall = dict(BLOCK_M=64, BLOCK_N=128)
    for cfg, rows in ((wide, 2048), (tall, 2048)):
        got = contrastive._lse_block_rows(n, n, cfg)
        assert got == rows, cfg
        assert 4 * got * (n // cfg["BLOCK_N"]) <= contrastive._BLOCKED_PART_BYTES
        assert 4 * (got // cfg["BLOCK_M"]) * n <= contrastive._BLOCKED_PART_BYTES


@pytest.mark.triton
@pytest.mark.parametrize("labeled", [False, True])
def test_triton_blocked_interior_tiles_launched_apart_change_nothing(labeled, device, monkeypatch):
    """The blocked kernels' interior tiles (full, off the diagonal) run in a launch of their own
    without bounds or diagonal masks, the others in a second: bit for bit what one launch of every
    tile the general way gives, the loss and every gradient (B = 50: blocks of one row tile, so
    most tiles are interior and some touch the diagonal or the last partial tile)."""
    u, t, s = _inputs(50, 40, dtype=torch.float32)
    u, t = u.detach().to(device), t.detach().to(device)
    labels = _duplicated_labels(50, 3, 4).to(device) if labeled else None
    launches = []
    tile_launches = contrastive._tile_launches

    def recorded(r0, r1, c0, c1, cfg):
        kinds = tile_launches(r0, r1, c0, c1, cfg)
        launches.append(kinds)
        return kinds

    monkeypatch.setattr(contrastive, "_tile_launches", recorded)

    def run():
        ui, ti = u.clone().requires_grad_(), t.clone().requires_grad_()
        return _loss_and_grads(lambda *a: ace_kernels.label_guided_infonce(*a, backend="triton"), ui, ti,
                               s.detach().to(device).requires_grad_(), labels)

    with _blocked_strategy(monkeypatch, torch.float32, 40) as calls:
        split = run()
        assert (contrastive.TILES_INTERIOR, contrastive.TILES_EDGE) in launches
        launches.clear()
        monkeypatch.setattr(contrastive, "_SPLIT_INTERIOR_TILES", False)
        whole = run()
        assert set(launches) == {(contrastive.TILES_ALL,)}
    assert calls == {"lse": 2, "grad": 4}
    assert torch.equal(split[0], whole[0])
    for got, want in zip(split[1], whole[1], strict=True):
        assert torch.equal(got, want)


def test_tile_launches_cover_the_kinds_of_tiles_a_block_has(monkeypatch):
    pytest.importorskip("triton")
    cfg = dict(BLOCK_M=128, BLOCK_N=64)
    both = (contrastive.TILES_INTERIOR, contrastive.TILES_EDGE)
    # Rows 0..256 against every column: whole tiles, but the diagonal runs through the block.
    assert contrastive._tile_launches(0, 256, 0, 65536, cfg) == both
    # A partial last row tile or column tile is an edge tile.
    assert contrastive._tile_launches(256, 511, 0, 65536, cfg) == both
    assert contrastive._tile_launches(0, 128, 1000, 1100, cfg) == both
    # Owned columns beside rows that are not theirs (group=): whole tiles, no diagonal.
    assert contrastive._tile_launches(0, 256, 512, 1024, cfg) == (contrastive.TILES_INTERIOR,)
    # Less than a tile either way: edge tiles only.
    assert contrastive._tile_launches(0, 127, 512, 1024, cfg) == (contrastive.TILES_EDGE,)
    assert contrastive._tile_launches(0, 256, 512, 575, cfg) == (contrastive.TILES_EDGE,)
    monkeypatch.setattr(contrastive, "_SPLIT_INTERIOR_TILES", False)
    assert contrastive._tile_launches(0, 256, 512, 1024, cfg) == (contrastive.TILES_ALL,)


@pytest.mark.triton
@pytest.mark.parametrize("n, shares", [
    # Blocks of one tile of rows: shares start inside a block and whole blocks lie outside lo..hi.
    (61, [(0, 9), (9, 40), (40, 61)]),
    # Shares that start and end on 16-row tile bounds: the blocks of rows before and after a share
    # meet its columns in whole tiles that touch the diagonal's tiles without holding it (rows
    # 0..16 against columns 16..48, rows 48..64 against them), so only their interior launch runs,
    # and each of its tiles must count as interior, or no launch computes it.
    (64, [(0, 16), (16, 48), (48, 64)]),
], ids=["inside_tiles", "at_tile_bounds"])
def test_triton_blocked_strategy_owned_shares(n, shares, device, monkeypatch):
    # group='s owned shares (a forward over rows lo..hi with their column partials; a backward of
    # rows lo..hi against every column, then every row against columns lo..hi) by the blocked strategy.
    with _blocked_strategy(monkeypatch, torch.float32, 20, part_bytes=1) as calls:
        _check_owned_shares(n, shares, device)
    assert calls == {"lse": 6, "grad": 6}


@pytest.mark.triton
def test_triton_blocked_backward_beside_a_ranks_columns_takes_taller_blocks(device, monkeypatch):
    """The blocked backward fits its row blocks to the columns they meet: a weights buffer of one
    16-row tile of the whole batch (64 x 64 fp32) holds every row against a rank's 16 columns
    (its part of dT: one block), and one tile of rows against every column (its rows' dU)."""
    blocks = set()
    kernel = contrastive._grad_weights_kernel

    class RecordingKernel:
        def __getitem__(self, grid):
            launch = kernel[grid]

            def run(*args, **kwargs):
                blocks.add(tuple(args[8:12]))  # rows r0..r1 against columns c0..c1
                return launch(*args, **kwargs)
            return run

    monkeypatch.setattr(contrastive, "_grad_weights_kernel", RecordingKernel())
    with _blocked_strategy(monkeypatch, torch.float32, 20, part_bytes=1, weight_bytes=4 * 16 * 64):
        _check_owned_shares(64, [(0, 16), (16, 32), (32, 64)], device)
    assert {b for b in blocks if b[2:] == (16, 32)} == {(0, 64, 16, 32)}
    assert {b for b in blocks if b[2:] == (0, 64)} == {(r, r + 16, 0, 64) for r in range(0, 64, 16)}


@pytest.mark.triton
def test_triton_blocked_strategy_fp16_rounds_like_the_one_pass_kernels(device, monkeypatch):
    # fp16 inputs: the blocked backward rounds the softmax weights to fp16 and the gradient once,
    # as the one-pass kernel does; only the order of the fp32 additions differs.
    u, t, s = _inputs(50, 40, dtype=torch.float16)
    u, t = u.detach().to(device).requires_grad_(), t.detach().to(device).requires_grad_()
    s32 = s.detach().float().to(device).requires_grad_()
    labels = _duplicated_labels(50, 3, 4).to(device)

    def run():
        return _loss_and_grads(lambda *a: ace_kernels.label_guided_infonce(*a, backend="triton"), u, t, s32, labels)

    one_pass = run()
    with _blocked_strategy(monkeypatch, torch.float16, 40) as calls:
        blocked = run()
    assert calls == {"lse": 1, "grad": 2}
    assert blocked[1][0].dtype == torch.float16
    # The losses differ in the order of fp32 additions (tile shapes, the fold): ulps of ~4.
    torch.testing.assert_close(blocked[0], one_pass[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(blocked[1], one_pass[1], strict=True):  # at most an fp16 ulp or so of ~0.5
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("backend,blocked", [("torch", False), pytest.param("triton", False, marks=pytest.mark.triton),
                                             pytest.param("triton", True, marks=pytest.mark.triton)],
                         ids=["torch", "triton_one_pass", "triton_blocked"])
def test_fp16_gradients_are_rounded_once_after_the_factor(backend, blocked, device, monkeypatch):
    """fp16 embeddings: each gradient is ``coef * s * (W @ b)`` with ``W @ b`` accumulated in fp32 and
    rounded to fp16 once, after the factor. Every similarity is 1 (``u_i = (1, 0, y_i)``, ``t_j = (1,
    x_j, 0)``), so the softmax weights are 2/n and 2/n - 2 exactly in fp16, every fp32 sum is exact,
    and the factor 3/8 is exact: the result must be the exact value rounded once. Rounding ``W @ b``
    to fp16 before the factor moves every element of the x and y columns by an fp16 ulp."""
    n, s = 4, 3.0
    x = torch.tensor([1.0, 1.0, 3 * 2**-12, 3 * 2**-12], dtype=torch.float64)
    y = torch.tensor([1.0, 2**-11, 2**-11, 2**-13], dtype=torch.float64)
    u64 = torch.stack([torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), y], dim=1)
    t64 = torch.stack([torch.ones(n, dtype=torch.float64), x, torch.zeros(n, dtype=torch.float64)], dim=1)
    weights = torch.full((n, n), 2 / n, dtype=torch.float64) - 2 * torch.eye(n, dtype=torch.float64)
    factor = s / (2 * n)  # the loss is the mean of 2n cross-entropies
    want = [(factor * (weights @ t64)).half(), (factor * (weights.T @ u64)).half()]
    # The double rounding would differ in every row (what makes this test able to fail).
    assert all((((weights @ b).float().half().double() * factor).half() != w)[:, col].all()
               for b, w, col in ((t64, want[0], 1), (u64, want[1], 2)))
    u, t = (a.half().to(device).requires_grad_() for a in (u64, t64))
    scale = torch.tensor(s, device=device)
    with _blocked_strategy(monkeypatch, torch.float16, 3) if blocked else contextlib.nullcontext() as calls:
        got = torch.autograd.grad(ace_kernels.label_guided_infonce(u, t, scale, backend=backend), [u, t])
    assert calls == ({"lse": 1, "grad": 2} if blocked else None)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)


def _check_within_twice_torch_error(batch, dim, dtype, op, context=contextlib.nullcontext):
    """``op(u, t, s, labels)`` (GPU, ``dtype`` embeddings, fp32 scale; forward and backward inside
    ``context()``) against the fp64 oracle: each of the loss and the three gradients at most 2x
    the error of the dense formula run by torch in the same dtype (issue 3's rule, used for every
    op here)."""
    u, t, s = _inputs(batch, dim, dtype=torch.float64)
    u, t = u.detach().cuda(), t.detach().cuda()
    labels = _duplicated_labels(batch, 14, 50).cuda()
    ref = _loss_and_grads(label_guided_infonce_oracle, u.clone().requires_grad_(), t.clone().requires_grad_(),
                          s.detach().cuda().requires_grad_(), labels)

    def run(fn):
        ui, ti = u.to(dtype).requires_grad_(), t.to(dtype).requires_grad_()
        si = s.detach().float().cuda().requires_grad_()
        return _loss_and_grads(fn, ui, ti, si, labels)

    with context():
        ours = run(op)
    # torch at the same dtype: the dense oracle evaluated in that dtype.
    theirs = run(_dense_same_dtype)
    for got, base, want in zip([ours[0]] + ours[1], [theirs[0]] + theirs[1], [ref[0]] + ref[1], strict=True):
        err = (got.double() - want).abs().max().item()
        err_torch = (base.double() - want).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, (err, err_torch)
    # The rule above is loose in 16 bits (the yardstick forms its logits in 16 bits): the op
    # must also be exact on the inputs it was given (the fp64 oracle on the rounded embeddings)
    # up to fp32 accumulation and one rounding of each gradient to the dtype, relative to each
    # tensor's scale (measured in the interpreter, fp16 B = 333: 4e-4 of the 2**-10 allowed).
    rounded = _loss_and_grads(label_guided_infonce_oracle, u.to(dtype).double().requires_grad_(),
                              t.to(dtype).double().requires_grad_(),
                              s.detach().float().double().cuda().requires_grad_(), labels)
    own_bound = {torch.float32: 1e-4, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    for name, got, want in zip(("loss", "grad u", "grad t", "grad logit_scale"), [ours[0]] + ours[1],
                               [rounded[0]] + rounded[1], strict=True):
        err, scale = (got.double() - want).abs().max().item(), want.abs().max().item()
        assert err <= own_bound * scale, f"{name}: err {err:.3e} on its rounded inputs, at scale {scale:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch,dim", [(1000, 512), (4097, 1024), (333, 40)])
def test_triton_gpu_within_twice_torch_error(batch, dim, dtype):
    _check_within_twice_torch_error(batch, dim, dtype,
                                    lambda *a: ace_kernels.label_guided_infonce(*a, backend="triton"))


_BLOCKED_CANDIDATES = [(kernel, number) for (kernel, _), candidates in contrastive._GPU_CANDIDATES.items()
                       for number, config in enumerate(candidates, 1) if contrastive._blocked(config)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel,number", _BLOCKED_CANDIDATES)
def test_triton_gpu_blocked_candidates_within_twice_torch_error(kernel, number, dtype, monkeypatch):
    # Each blocked-strategy candidate a sweep may pick, forced, at B = 4097 (not a multiple of any
    # tile) with labels, under the same rule as the default kernels; buffers small enough that
    # each pass takes several row blocks (the column LSEs merged across them).
    monkeypatch.setattr(contrastive, "_BLOCKED_PART_BYTES", 256 << 10)
    monkeypatch.setattr(contrastive, "_BLOCKED_WEIGHT_BYTES", 2 << 20)
    calls = []
    real = getattr(contrastive, f"_{kernel}_blocked")
    monkeypatch.setattr(contrastive, f"_{kernel}_blocked", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    batch, dim = 4097, 512
    config = contrastive._GPU_CANDIDATES[(kernel, "16bit/one_dot")][number - 1]
    _check_within_twice_torch_error(batch, dim, dtype,
                                    lambda *a: ace_kernels.label_guided_infonce(*a, backend="triton"),
                                    lambda: _tuning.forced("contrastive", kernel, "16bit/one_dot", config))
    assert len(calls) == (1 if kernel == "lse" else 2)
    assert contrastive._lse_block_rows(batch, batch, config) < batch
    assert contrastive._grad_block_rows(batch, config, 2) < batch


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["one_pass", "blocked"])
@pytest.mark.parametrize("batch", [4096, 4097])
def test_triton_gpu_fast_log_matches_the_exact_one(strategy, batch, monkeypatch):
    """The 16-bit forward's logs (lg2.approx.ftz times ln 2, contrastive._log) against tl.log on
    the same card and inputs, over the whole batch and over rows lo..hi (a rank's of group=):
    the LSEs within a few float32 ulps (the fast log is within about 1.1e-7 of ln x).
    B = 4096 and 4097, with rows lo..hi multiples of 16 or not: the two integer specialisations
    Triton compiles."""
    dim = 512
    config = (contrastive._first_blocked_candidate("lse") if strategy == "blocked"
              else _tuning.default("contrastive", "lse", "16bit/one_dot"))
    gen = torch.Generator(device="cuda").manual_seed(3)
    u = F.normalize(torch.randn(batch, dim, device="cuda", generator=gen), dim=1).bfloat16()
    t = F.normalize(torch.randn(batch, dim, device="cuda", generator=gen), dim=1).bfloat16()
    scale = torch.tensor([100.0], device="cuda")
    keys = torch.randint(0, batch // 3, (batch,), device="cuda", generator=gen, dtype=torch.int32)
    lo, hi = (1024, batch - 16) if batch % 16 == 0 else (1000, batch - 7)
    outs = {}
    for fast in (True, False):
        monkeypatch.setattr(contrastive, "_fast_log", lambda dtype, fast=fast: fast)
        with _tuning.forced("contrastive", "lse", "16bit/one_dot", config):
            row, col, _ = contrastive._triton_lse_both(u, t, scale, keys, 0, batch)
            share, share_col, _ = contrastive._triton_lse_both(u[lo:hi], t, scale, keys, lo, hi)
            outs[fast] = [row.clone(), col.clone(), share.clone(), share_col.clone()]
    for fast_lse, exact_lse in zip(outs[True], outs[False], strict=True):
        assert torch.isfinite(fast_lse).all() and not torch.equal(fast_lse, torch.zeros_like(fast_lse))
        torch.testing.assert_close(fast_lse, exact_lse, rtol=4e-7, atol=5e-7)
    torch.testing.assert_close(outs[True][2], outs[True][0][lo:hi], rtol=4e-7, atol=5e-7)  # the same rows


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.triton,
                                                                              pytest.mark.interpreter])])
@pytest.mark.parametrize("grouped", [False, True], ids=["one_device", "group"])
def test_no_batch_by_batch_tensor_is_saved_or_made(backend, grouped, request, monkeypatch):
    # The O(B) claim on the CPU, forward and backward, with labels and without, in 16 and 32 bits,
    # under autocast, with group= (one gloo rank: the gathered rows): no op makes a tensor of half a
    # float32 B x B (the torch backend's blocks of 16 rows are a fifth of one at B = 80; the label
    # keys' [B, 14 * 8] bytes are the largest O(B) buffer) and autograd keeps nothing bigger than an
    # embedding's [B, D] float32 copy.
    from torch.utils._python_dispatch import TorchDispatchMode

    group = request.getfixturevalue("one_rank_group") if grouped else None
    monkeypatch.setattr(contrastive, "_TORCH_BLOCK_ROWS", 16)
    batch, dim = 80, 8
    largest, saved = [], []

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            largest.extend((t.numel() * t.element_size(), str(func)) for t in torch.utils._pytree.tree_leaves(out)
                           if isinstance(t, torch.Tensor))
            return out

    def pack(t):
        saved.append((t.untyped_storage().nbytes(), tuple(t.shape), t.dtype))
        return t

    for dtype in (torch.float32, torch.float16):
        for labels in (None, _duplicated_labels(batch, 14, 20)):
            for autocast in (False, True):
                u, t, _ = _inputs(batch, dim, dtype=dtype, seed=3)
                s = torch.tensor(30.0, requires_grad=True)
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Largest():
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        loss = ace_kernels.label_guided_infonce(u, t, s, labels, group=group, backend=backend)
                    loss.backward()
                assert torch.isfinite(loss) and u.grad.shape == (batch, dim)
    assert max(largest)[0] < batch * batch * 4 // 2, max(largest)
    assert max(saved)[0] <= batch * dim * 4, max(saved)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["one_pass", "blocked"])
def test_triton_gpu_deterministic_and_bounded_memory(strategy):
    # Same inputs, same bits (no atomics anywhere); and the op's memory beyond inputs and their
    # gradients: one-pass, the forward's [SMs, B] fp32 column partials plus O(B) vectors;
    # blocked, its buffers' budgets (the docstring's accounting). Each strategy forced, so that
    # a card's tuned choice does not decide what is tested.
    batch, dim = 16384, 512
    if strategy == "blocked":
        configs = {kernel: contrastive._first_blocked_candidate(kernel) for kernel in ("lse", "grad")}
    else:
        configs = {kernel: _tuning.default("contrastive", kernel, "16bit/one_dot") for kernel in ("lse", "grad")}
    gen = torch.Generator(device="cuda").manual_seed(0)
    u = F.normalize(torch.randn(batch, dim, device="cuda", generator=gen), dim=1).bfloat16().requires_grad_()
    t = F.normalize(torch.randn(batch, dim, device="cuda", generator=gen), dim=1).bfloat16().requires_grad_()
    s = torch.tensor(30.0, device="cuda", requires_grad=True)
    labels = _duplicated_labels(batch, 14, 50).cuda()
    runs = []
    for run in range(3):  # run 0 warms up: Triton's compile, cuBLAS's workspace (kept by torch)
        u.grad = t.grad = s.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with _tuning.forced("contrastive", "lse", "16bit/one_dot", configs["lse"]), \
                _tuning.forced("contrastive", "grad", "16bit/one_dot", configs["grad"]):
            loss = ace_kernels.label_guided_infonce(u, t, s, labels, backend="triton")
            loss.backward()
        torch.cuda.synchronize()
        if run == 0:
            continue
        extra = torch.cuda.max_memory_allocated() - base - 2 * u.numel() * u.element_size()
        runs.append([loss.detach().clone(), u.grad.clone(), t.grad.clone(), s.grad.clone()])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)
    if strategy == "blocked":
        rows_f = contrastive._lse_block_rows(batch, batch, configs["lse"])
        rows_b = contrastive._grad_block_rows(batch, configs["grad"], 2)
        forward = 2 * (contrastive._BLOCKED_PART_BYTES + (1 + rows_f // configs["lse"]["BLOCK_M"]) * 4 * batch)
        backward = contrastive._BLOCKED_WEIGHT_BYTES + 8 * rows_b * dim
        bound = max(forward, backward)
    else:
        bound = torch.cuda.get_device_properties(0).multi_processor_count * batch * 4
    # 8 MiB covers the O(B) vectors (LSEs, keys, the sort of the [B, 14] labels' key words).
    assert extra <= bound + 8 * 2**20, (extra, bound)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["one_pass", "blocked"])
def test_triton_gpu_no_host_sync_on_one_device(strategy, monkeypatch):
    # Issue 5: no host synchronisation inside the op (labels given, forward and backward), with
    # either strategy (blocked: several row blocks). The first call is outside the check: Triton
    # compiles (and may autotune) there.
    gen = torch.Generator(device="cuda").manual_seed(1)
    u = F.normalize(torch.randn(1000, 512, device="cuda", generator=gen), dim=1).bfloat16().requires_grad_()
    t = F.normalize(torch.randn(1000, 512, device="cuda", generator=gen), dim=1).bfloat16().requires_grad_()
    s = torch.tensor(30.0, device="cuda", requires_grad=True)
    labels = _duplicated_labels(1000, 14, 20).cuda()
    if strategy == "blocked":
        configs = {kernel: contrastive._first_blocked_candidate(kernel) for kernel in ("lse", "grad")}
        # 16 KiB: four row blocks of 256 in the forward (its per-block merges run under the check),
        # 512 KiB: four in the backward.
        monkeypatch.setattr(contrastive, "_BLOCKED_PART_BYTES", 16 << 10)
        monkeypatch.setattr(contrastive, "_BLOCKED_WEIGHT_BYTES", 512 << 10)
        assert contrastive._lse_block_rows(1000, 1000, configs["lse"]) < 1000
    else:
        configs = {kernel: _tuning.default("contrastive", kernel, "16bit/one_dot") for kernel in ("lse", "grad")}
    with _tuning.forced("contrastive", "lse", "16bit/one_dot", configs["lse"]), \
            _tuning.forced("contrastive", "grad", "16bit/one_dot", configs["grad"]):
        ace_kernels.label_guided_infonce(u, t, s, labels, backend="triton").backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = ace_kernels.label_guided_infonce(u, t, s, labels, backend="triton")
            loss.backward()
            # A Python float multiplier too (made on the device, not copied from the host).
            ace_kernels.label_guided_infonce(u, t, 30.0, labels, backend="triton").backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss.detach()).item()


def _dense_same_dtype(u, t, s, labels):
    logits = s.to(u.dtype) * u @ t.T
    batch = u.shape[0]
    rows = labels.reshape(batch, -1)
    same = (rows[:, None] == rows[None, :]).all(-1) & ~torch.eye(batch, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(batch, device=u.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# The launch configurations the GPU launcher really uses, in every input dtype, at the widest D
# of each path (D = 512: one dot per tile for 16-bit, 256-wide chunks for fp32; D = 1024: K
# steps and 512-wide chunks), and for inputs Triton cannot prove 16-byte aligned (D = 500, 1000:
# compiled with no alignment facts at all). Registers only grow with BLOCK_D, so narrower D
# cannot spill more.
AOT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AOT_DIMS = ((512, True), (1024, True), (500, False), (1000, False))


def _compile_all_for_sm90() -> list:
    """Compile both kernels for sm_90a at the GPU launch configurations, per dtype and D. Runs in
    a subprocess without TRITON_INTERPRET: under the interpreter the kernels are not JITFunctions."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # the child process's path has tests/ only
        sys.path.insert(0, root)
    from ace_kernels._aot import compile_sm90, integer_arguments  # pointers 16-byte aligned, as launched
    from benchmarks.kernel_stats import contrastive_signature

    # The one-pass kernels (one device, and a rank's rows with group=) and the blocked strategy's.
    kernels = {"lse_both": contrastive._lse_both_kernel, "grad": contrastive._grad_rows_kernel,
               "lse_tiles": contrastive._lse_tiles_kernel, "grad_weights": contrastive._grad_weights_kernel}
    launches = []
    for dtype, torch_dtype in AOT_DTYPES.items():
        for dim, aligned in AOT_DIMS:
            for kernel in ("lse_both", "grad"):
                launches.append((kernel, dtype, dim, aligned, contrastive._launch_config(
                    "grad" if kernel == "grad" else "lse", torch_dtype, dim, aligned=aligned, interpreter=False)))
    # The sweep's candidates (contrastive._GPU_CANDIDATES: the 16-bit one-dot path) at D = 512.
    for (name, dtype_class), candidates in contrastive._GPU_CANDIDATES.items():
        assert dtype_class == "16bit/one_dot", dtype_class
        for candidate in candidates:
            for dtype in ("bf16", "fp16"):
                if contrastive._blocked(candidate):
                    names = ("grad_weights",) if name == "grad" else ("lse_tiles",)
                else:
                    names = ("grad",) if name == "grad" else ("lse_both",)
                for kernel in names:
                    with _tuning.forced("contrastive", name, dtype_class, candidate):
                        cfg = contrastive._launch_config(name, AOT_DTYPES[dtype], 512, interpreter=False)
                    assert cfg["ONE_DOT"] and cfg["BLOCK_M"] == candidate["BLOCK_M"]
                    launches.append((kernel, dtype, 512, True, cfg))
    results, seen = [], set()
    for kernel, dtype, dim, aligned, cfg in launches:
        # The shared memory recorded for this configuration (contrastive._GPU_SHARED_BYTES).
        need = contrastive._shared_need("grad" if kernel in ("grad", "grad_weights") else "lse", AOT_DTYPES[dtype],
                                        dim, cfg, aligned=aligned)
        fn = kernels[kernel]
        blocked = kernel in ("lse_tiles", "grad_weights")
        options = contrastive._blocked_options(cfg) if blocked else contrastive._kernel_options(cfg)
        key = (kernel, dtype, aligned, tuple(sorted(options.items())))  # aligned: other code
        if key in seen:
            continue
        seen.add(key)
        # The blocked kernels launch their interior tiles and the others apart (TILES 1 and 2;
        # 0, every tile in one launch, is for the tests' comparison only).
        variants = [(has_keys, tiles) for has_keys in (True, False)
                    for tiles in ((contrastive.TILES_INTERIOR, contrastive.TILES_EDGE) if blocked else (None,))]
        for has_keys, tiles_kind in variants:  # labels given, or the plain CLIP loss
            const = {"HAS_KEYS": has_keys, "IEEE": dtype == "fp32"}
            if kernel.startswith("lse"):  # the forward kernels' log, as a launch on a GPU takes it
                const["FAST_LOG"] = contrastive._fast_log(AOT_DTYPES[dtype])
            if tiles_kind is not None:
                const["TILES"] = tiles_kind
            const.update({k: v for k, v in options.items() if k not in ("num_warps", "num_stages")})
            sig = contrastive_signature("lse_tiles" if blocked and kernel != "grad_weights" else kernel, dtype)
            sig.update({k: "constexpr" for k in const})
            # Aligned: D and the row strides are multiples of 16, which Triton specialises on at launch.
            extra = {"grad": ["stride_g"], "grad_weights": ["stride_w"]}.get(kernel, [])
            strides = ["dim", "stride_a", "stride_b"] + extra
            # Triton specialises every integer argument that is a multiple of 16, so a batch that is
            # one (64, 8192, 65,536: n, and the row and column bounds at block starts) compiles
            # other code than one that is not, with other register counts. The two extremes are
            # checked: no size a multiple of 16, and all of them (a launch can mix the two, e.g.
            # the blocked kernels' row0 = 0 beside n = 4097; those mixes are not compiled here).
            sizes = integer_arguments(sig, exclude=strides)
            for batch, divisible in (("B%16!=0", strides if aligned else []),
                                     ("B%16==0", (strides if aligned else []) + sizes)):
                res = compile_sm90(fn, sig, const, num_warps=options["num_warps"],
                                   num_stages=options["num_stages"], divisible_by_16=divisible,
                                   aligned_pointers=aligned)
                tiles = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
                results.append(dict(name=f"{kernel}[{dtype}, D={dim}, aligned={aligned}, keys={has_keys}, {batch}, "
                                         + (f"{tiles}, blocked, TILES={tiles_kind}]" if blocked
                                            else f"{tiles}/{cfg['BLOCK_D']}, one_dot={cfg['ONE_DOT']}]"),
                                    registers=res.registers, spills=res.spills, shared=res.shared_bytes,
                                    need=need))
    return results


def _blocked_fma_counts_for_sm90() -> list:
    """(kernel, dtype, labels, TILES, FFMA count of the sm_90a listing) of the blocked kernels at
    their first blocked candidate, every tile (TILES=0) and the interior tiles only (TILES=1).
    Runs in a subprocess without TRITON_INTERPRET (see _compile_all_for_sm90)."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from ace_kernels import _tuning
    from ace_kernels._aot import profile_sm90
    from benchmarks.kernel_stats import contrastive_signature

    kernels = {"lse_tiles": (contrastive._lse_tiles_kernel, "lse"),
               "grad_weights": (contrastive._grad_weights_kernel, "grad")}
    out = []
    for name, (fn, kind) in kernels.items():
        for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            with _tuning.forced("contrastive", kind, "16bit/one_dot", contrastive._first_blocked_candidate(kind)):
                cfg = contrastive._launch_config(kind, torch.bfloat16, 512, interpreter=False)
            options = contrastive._blocked_options(cfg)
            for has_keys in (False, True):
                for tiles in (contrastive.TILES_ALL, contrastive.TILES_INTERIOR):
                    const = {"HAS_KEYS": has_keys, "IEEE": dtype == "fp32", "TILES": tiles}
                    if name == "lse_tiles":
                        const["FAST_LOG"] = contrastive._fast_log(torch_dtype)
                    const.update({k: v for k, v in options.items() if k not in ("num_warps", "num_stages")})
                    sig = dict(contrastive_signature(name, dtype), **{k: "constexpr" for k in const})
                    prof = profile_sm90(fn, sig, const, num_warps=options["num_warps"],
                                        num_stages=options["num_stages"])
                    out.append([name, dtype, has_keys, tiles, prof.kernel_opcodes.get("FFMA", 0)])
    return out


@pytest.mark.slow
def test_triton_blocked_interior_tiles_round_the_logits_as_the_general_ones():
    """The interior tiles' launch must round ``sim * scale`` on its own, as the general tiles do
    (their masks' select stands between the product and the exponentials' subtraction): a product
    contracted into an FMA there (the GPU backend's default without labels) differs in the last
    bits, and the two launches are no longer bit for bit one general launch on a GPU (the
    interpreter never contracts, so the comparison test cannot see it). Same FFMA count."""
    pytest.importorskip("triton")
    from _aot_helpers import compile_in_fresh_process

    rows = compile_in_fresh_process("test_contrastive", "_blocked_fma_counts_for_sm90")
    counts = {tuple(r[:4]): r[4] for r in rows}
    for name, dtype, has_keys, tiles in counts:
        if tiles == contrastive.TILES_INTERIOR:
            general = counts[(name, dtype, has_keys, contrastive.TILES_ALL)]
            assert counts[(name, dtype, has_keys, tiles)] == general, rows


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_without_spills():
    pytest.importorskip("triton")
    from _aot_helpers import compile_in_fresh_process

    results = compile_in_fresh_process("test_contrastive", "_compile_all_for_sm90")
    report = [f"{r['name']}: {r['registers']} registers, {r['spills']} B spilled, {r['shared']} B shared"
              for r in results]
    print("\n".join(report))
    # Each kernel at the defaults, in each dtype, plus the candidates (2 dtypes x 2 label modes).
    candidates = contrastive._GPU_CANDIDATES
    swept = 4 * len(candidates[("lse", "16bit/one_dot")]) + 4 * len(candidates[("grad", "16bit/one_dot")])
    assert len(results) >= 2 * (2 * 2 * len(AOT_DTYPES) + swept)  # each in both specialisations
    assert all(r["spills"] == 0 for r in results), report
    # H100/H200 give a block at most 227 KiB of shared memory.
    assert all(r["shared"] <= 227 * 1024 for r in results), report
    # What the Triton backend's check takes each configuration to need (contrastive._GPU_SHARED_BYTES).
    stale = [r for r in results if r["need"] is None or r["shared"] > r["need"]]
    assert not stale, stale


@pytest.mark.triton
@pytest.mark.parametrize("kernel,number", [(kernel, number)
                                           for (kernel, _), candidates in contrastive._GPU_CANDIDATES.items()
                                           for number in range(1, len(candidates) + 1)])
def test_triton_sweep_candidates_fp16(kernel, number, device):
    """Each launch configuration a GPU sweep may pick (and _tuning then launch), forced, in fp16
    at D = 64 (the one-dot path on a GPU and in the interpreter), B = 150: more than one row
    block for every tile height, the last one partial."""
    config = contrastive._GPU_CANDIDATES[(kernel, "16bit/one_dot")][number - 1]
    batch, dim = 150, 64
    u, t, s = _inputs(batch, dim, dtype=torch.float16)
    u, t = u.detach().to(device).requires_grad_(), t.detach().to(device).requires_grad_()
    s32 = s.detach().float().to(device).requires_grad_()
    labels = _duplicated_labels(batch, 3, 5).to(device)
    with _tuning.forced("contrastive", kernel, "16bit/one_dot", config):
        launched = contrastive._launch_config(kernel, torch.float16, dim, device=device)
        assert launched["ONE_DOT"] and {k: launched[k] for k in config} == config
        ours = _loss_and_grads(lambda *a: ace_kernels.label_guided_infonce(*a, backend="triton"), u, t, s32, labels)
    ref = _loss_and_grads(label_guided_infonce_oracle, u.double(), t.double(),
                          s.detach().to(device).requires_grad_(), labels)
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=0, atol=1e-5)
    for got, want in zip(ours[1], ref[1], strict=True):  # fp16 gradients, as in test_triton_fp16_inputs
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-3)


@pytest.mark.triton
def test_triton_fp16_inputs(device):
    # fp16 embeddings: tensor-core path (softmax weights cast to fp16 before the gradient dot).
    u, t, s = _inputs(37, 40, dtype=torch.float16)
    u, t = u.detach().to(device).requires_grad_(), t.detach().to(device).requires_grad_()
    s32 = s.detach().float().to(device).requires_grad_()
    labels = _duplicated_labels(37, 3, 4).to(device)
    ours = _loss_and_grads(lambda *a: ace_kernels.label_guided_infonce(*a, backend="triton"), u, t, s32, labels)
    ref = _loss_and_grads(label_guided_infonce_oracle, u.double(), t.double(),
                          s.detach().to(device).requires_grad_(), labels)
    assert ours[0].dtype == torch.float32 and ours[1][0].dtype == torch.float16
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=0, atol=1e-5)
    # Gradients up to ~0.7 are returned in fp16 (half ulp 2.4e-4..4.9e-4) after fp16 softmax weights.
    for got, want in zip(ours[1], ref[1], strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-3)


@pytest.mark.triton
@pytest.mark.parametrize("n", [128, 130])
def test_the_kernels_exponentials_are_e_to_the_x_to_float32_precision(device, n):
    """Exactly representable logits (one at 0, the rest at -5, so that about half of each row's
    softmax mass lies 5 below its max): the row log-sum-exps of the fp32 kernels (both-ways and
    a range of rows) equal log(1 + (n - 1) e**-5) to a few float32 ulps. An exponential off by a few
    parts in 1e6 in its exponent (a wrong log2 e) moves them by ~1e-5."""
    dim = 16
    u = torch.zeros(n, dim, device=device)
    u[:, 0] = 1.0
    t = torch.zeros(n, dim, device=device)
    t[1:, 0] = -5.0
    scale = torch.tensor([1.0], device=device)
    want = math.log1p((n - 1) * math.exp(-5.0))
    row_lse, col_lse, positives = contrastive._triton_lse_both(u, t, scale, None, 0, n)
    torch.testing.assert_close(row_lse.double(), torch.full((n,), want, dtype=torch.float64, device=device),
                               rtol=0, atol=3e-6)
    lse, _, _ = contrastive._triton_lse_both(u[3:], t, scale, None, 3, n)
    torch.testing.assert_close(lse.double(), torch.full((n - 3,), want, dtype=torch.float64, device=device),
                               rtol=0, atol=3e-6)


@pytest.mark.triton
@pytest.mark.interpreter
def test_every_forward_launcher_passes_the_fast_log_choice(monkeypatch):
    """_fast_log's answer (16-bit inputs on an NVIDIA GPU) reaches each forward kernel's FAST_LOG:
    the one-pass row and both-ways launches and the blocked launches. Recorded without running
    the kernels (the interpreter cannot run fast_logf)."""
    c = contrastive
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, kwargs["FAST_LOG"]))

    for name in ("_lse_both_kernel", "_lse_tiles_kernel"):
        monkeypatch.setattr(c, name, Recorder(name))
    monkeypatch.setattr(c, "_fast_log", lambda dtype: dtype == torch.bfloat16)
    one_pass = dict(c._launch_config("lse", torch.bfloat16, 32, interpreter=True))
    assert not c._blocked(one_pass)
    blocked = dict(c._first_blocked_candidate("lse"), BLOCK_D=32, ONE_DOT=True, d_chunks=1)
    for dtype in (torch.bfloat16, torch.float32):
        u, t = torch.zeros(40, 32, dtype=dtype), torch.zeros(40, 32, dtype=dtype)
        scale = torch.tensor([1.0])
        for cfg in (one_pass, blocked):
            monkeypatch.setattr(c, "_launch_config", lambda *a, cfg=cfg, **k: dict(cfg))
            calls.clear()
            c._triton_lse_both(u, t, scale, None, 0, 40)
            c._triton_lse_both(u[5:], t, scale, None, 5, 40)
            assert calls and all(fast == (dtype == torch.bfloat16) for _, fast in calls), (cfg, calls)
            assert {name for name, _ in calls} == ({"_lse_tiles_kernel"} if c._blocked(cfg)
                                                   else {"_lse_both_kernel"})


def test_tile_launches_leave_out_the_kinds_a_block_has_not(monkeypatch):
    pytest.importorskip("triton")
    cfg = dict(BLOCK_M=128, BLOCK_N=64)
    both = (contrastive.TILES_INTERIOR, contrastive.TILES_EDGE)
    # Rows that end where the columns start, or start where they end (group='s owned columns
    # beside the rows before and after them, at tile bounds): no diagonal, no second launch.
    assert contrastive._tile_launches(0, 256, 256, 512, cfg) == (contrastive.TILES_INTERIOR,)
    assert contrastive._tile_launches(512, 768, 256, 512, cfg) == (contrastive.TILES_INTERIOR,)
    # A partial row tile is judged by BLOCK_M, a partial column tile by BLOCK_N (not the other's):
    # 192 rows are one and a half row tiles of 128, 192 columns three whole tiles of 64.
    assert contrastive._tile_launches(0, 192, 512, 1024, cfg) == both
    assert contrastive._tile_launches(0, 256, 512, 704, cfg) == (contrastive.TILES_INTERIOR,)
    tall = dict(BLOCK_M=64, BLOCK_N=128)
    assert contrastive._tile_launches(0, 192, 512, 1024, tall) == (contrastive.TILES_INTERIOR,)
    assert contrastive._tile_launches(0, 256, 512, 704, tall) == both


@pytest.mark.triton
@pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 16)])
def test_triton_blocked_strategy_with_tiles_not_square(block_m, block_n, device, monkeypatch):
    # BLOCK_M != BLOCK_N, as the GPU's blocked candidates (128 x 64): each launcher passes its
    # block's rows and columns to _tile_launches in that order. Blocks of one row tile: with
    # 16 x 32 tiles a block's 16 rows hold interior tiles though they are fewer than BLOCK_N;
    # with 32 x 16 the share 32..48 leaves rows 0..32 a block of one interior tile (16 columns,
    # fewer than BLOCK_M).
    monkeypatch.setitem(globals(), "BLOCKED", dict(BLOCKED, BLOCK_M=block_m, BLOCK_N=block_n))
    u, t, s = _inputs(50, 20, dtype=torch.float32)
    u, t = u.detach().to(device).requires_grad_(), t.detach().to(device).requires_grad_()
    with _blocked_strategy(monkeypatch, torch.float32, 20, part_bytes=1) as calls:
        _check_triton_fp32(u, t, s, _duplicated_labels(50, 3, 4).to(device), device)
        _check_owned_shares(64, [(0, 32), (32, 48), (48, 64)], device)
    assert calls["lse"] >= 4 and calls["grad"] >= 4


@pytest.mark.triton
@pytest.mark.parametrize("strategy", ["one_pass", "blocked"])
def test_a_tile_whose_only_open_entries_are_nan_stays_nan(strategy, device, monkeypatch):
    """A tile's log-sum-exp of a row or column whose unmasked entries there are all NaN is NaN, not
    -inf as for an empty one: tl.max skips NaN, so such a tile looked empty and the NaN was lost
    when the tiles were merged. Row 16 (NaN, alone in its row tile) is the only unmasked entry
    of columns 0..15 but 3 in that tile; they read a finite log-sum-exp, and image rows 0..15 got
    finite gradients where the torch backend (and the docs) give NaN."""
    u, t, s = (x.detach().float().to(device) for x in _inputs(17, 6))
    u[16, 0] = float("nan")
    labels = torch.zeros(17, dtype=torch.long, device=device)
    labels[[3, 16]] = 1
    u, t, s = (x.requires_grad_() for x in (u, t, s))
    strategy_context = _blocked_strategy(monkeypatch, u.dtype, 6) if strategy == "blocked" else contextlib.nullcontext()
    with strategy_context as calls:
        loss = ace_kernels.label_guided_infonce(u, t, s, labels, backend="triton")
        loss.backward()
    assert calls is None or (calls["lse"] >= 1 and calls["grad"] >= 1), calls  # the blocked kernels ran
    assert torch.isnan(loss)
    for name, grad in (("image_emb", u.grad), ("text_emb", t.grad), ("logit_scale", s.grad)):
        assert grad.isnan().all(), f"grad {name}: {grad}"


@pytest.mark.parametrize("labelled", [True, False])
def test_torch_backend_under_selective_activation_checkpointing(labelled):
    """A selective checkpoint whose policy keeps the matmuls (torch's own example) runs the forward
    under a dispatch mode that caches their results: the torch backend scaled each block's product
    in place, and the recomputation raised 'Tensor cached during selective activation checkpoint
    has been mutated'. Out of place under a dispatch mode, the gradients are the plain step's, bit
    for bit (three row blocks of 128)."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        kept = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.PREFER_RECOMPUTE

    g = torch.Generator().manual_seed(4)
    u, t = (torch.randn(300, 8, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (300,), generator=g) if labelled else None

    def loss(u, t, scale):
        return ace_kernels.label_guided_infonce(u * 1.0, t * 1.0, scale, labels, backend="torch")

    want = torch.autograd.grad(loss(u, t, scale), (u, t, scale))
    checkpointed = checkpoint(loss, u, t, scale, use_reentrant=False,
                              context_fn=functools.partial(create_selective_checkpoint_contexts, policy))
    for got, expected in zip(torch.autograd.grad(checkpointed, (u, t, scale)), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
