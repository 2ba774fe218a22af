"""ace_hypergraph / ACEHypergraph against the fp64 dense oracle (spec section 4).

Forward and every gradient (x, cls_attn, the 8 adapter parameters), full output
and cls_only, on curated odd shapes and edge cases. The torch backend is tested
in float64 (tight) and float32; the Triton kernels under the interpreter on
tiny shapes (marked ``triton``); real-size GPU checks are marked ``gpu``.
"""

import dataclasses
import os
import re
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ace_kernels
from ace_kernels import hypergraph as hg
from _meta_init import materialise_like_fsdp
from _released import released_path
from _saved import saved_storages
from oracle_hypergraph import oracle_hypergraph, oracle_incidence

# Memory that nothing wrote reads as NaN (conftest.poisoned_empty), but in the atomic scatter's tests and
# cases (deterministic=False): poisoning needs torch.use_deterministic_algorithms, under which the Triton
# backend takes the deterministic scatter. ours_run refuses deterministic=False in a poisoned test.
pytestmark = pytest.mark.usefixtures("poisoned_empty")
NOT_POISONED = pytest.mark.not_poisoned(reason="the atomic scatter: see pytestmark")

PARAM_NAMES = ("x", "cls_attn", "edge.down_weight", "edge.down_bias", "edge.up_weight", "edge.up_bias",
               "node.down_weight", "node.down_bias", "node.up_weight", "node.up_bias")

# (B, N, D, hidden, topk): odd sizes, the N = topk + 2 edge, topk = 1, B = 1, the kernels' k = 16.
SHAPES = {
    "n7_d40": (2, 7, 40, 6, 3),
    "n_is_topk_plus_2": (2, 7, 16, 4, 5),
    "topk1": (3, 9, 24, 5, 1),
    "batch1": (1, 12, 33, 7, 4),
    "topk16": (2, 19, 12, 3, 16),
    "n33_d64": (2, 33, 64, 16, 5),
    "hidden1": (2, 6, 5, 1, 2),  # a one-unit adapter bottleneck
}


def make_inputs(shape, dtype=torch.float64, seed=0, device="cpu"):
    B, N, D, H, k = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    x = rand(B, N, D)
    cls_attn = rand(B, N - 1, scale=2.0)
    edge = [rand(H, D, scale=D ** -0.5), rand(H, scale=0.1), rand(D, H, scale=H ** -0.5), rand(D, scale=0.1)]
    node = [rand(H, D, scale=D ** -0.5), rand(H, scale=0.1), rand(D, H, scale=H ** -0.5), rand(D, scale=0.1)]
    return x, cls_attn, edge, node, k


def leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def run_with_grads(fn, x, cls_attn, edge, node, seed=1, round_to=None):
    """Output and the gradients of <out, g> for a fixed random g with respect to all 10 inputs.

    ``g`` is drawn in float64 and rounded to ``round_to`` (default: the output's dtype), so that
    the oracle's fp64 run gets the very values a 16-bit output's gradient holds."""
    inputs = leaves([x, cls_attn, *edge, *node])
    out = fn(inputs[0], inputs[1], inputs[2:6], inputs[6:10])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g.to(device=out.device, dtype=round_to or out.dtype).to(out.dtype)
    grads = torch.autograd.grad((out * g).sum(), inputs)
    return out, grads


def oracle_run(x, cls_attn, edge, node, k, cls_only):
    def fn(x_, c_, e_, n_):
        out = oracle_hypergraph(x_, c_, e_, n_, k)
        return out[:, 0] if cls_only else out

    return run_with_grads(fn, *(t.double() if isinstance(t, torch.Tensor) else [p.double() for p in t]
                               for t in (x, cls_attn, edge, node)), round_to=x.dtype)


def ours_run(x, cls_attn, edge, node, k, cls_only, backend, deterministic=True):
    if not deterministic and torch.are_deterministic_algorithms_enabled():  # poisoned_empty's setting
        raise AssertionError("deterministic=False would take the deterministic scatter under "
                             "torch.use_deterministic_algorithms: mark the test or case NOT_POISONED")

    def fn(x_, c_, e_, n_):
        return ace_kernels.ace_hypergraph(x_, c_, tuple(e_), tuple(n_), topk=k, cls_only=cls_only, backend=backend,
                                          deterministic=deterministic)

    return run_with_grads(fn, x, cls_attn, edge, node)


def assert_close_scaled(ours, ref, rel, name):
    """|ours - ref| <= rel * max|ref| (+ tiny floor): errors relative to the tensor's scale."""
    ours = ours.double()
    assert ours.shape == ref.shape, f"{name}: shape {list(ours.shape)} vs {list(ref.shape)}"
    if ref.numel() == 0:  # e.g. the gradient of cls_attn [B, 0] at N = 1
        return
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale + 1e-12, f"{name}: max error {err:.3e} vs scale {scale:.3e} (rel {rel})"


def assert_grad_x_close(got, want, zero_tokens, rel, name):
    """Gradients of x with zero-norm tokens: their rows are 1/eps-sized (F.normalize at a zero
    vector), so they are compared at their own scale, and every other row at the scale of those
    rows, which one scale for the whole tensor would leave unchecked."""
    assert zero_tokens.any() and (~zero_tokens).any()
    assert_close_scaled(got[zero_tokens], want[zero_tokens], rel, f"{name}, zero-norm tokens")
    assert_close_scaled(got[~zero_tokens], want[~zero_tokens], rel, f"{name}, other tokens")


def check_against_oracle(shape, dtype, cls_only, backend, rel, seed=0, deterministic=True, device="cpu"):
    x, c, edge, node, k = make_inputs(shape, dtype=dtype, seed=seed, device=device)
    out, grads = ours_run(x, c, edge, node, k, cls_only, backend, deterministic)
    ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only)
    assert out.dtype == dtype
    B, N, D = shape[:3]
    assert out.shape == ((B, D) if cls_only else (B, N, D))
    assert_close_scaled(out, ref_out, rel, "output")
    for name, got, want in zip(PARAM_NAMES, grads, ref_grads, strict=True):
        assert got.shape == want.shape, name
        assert_close_scaled(got, want, rel, f"grad {name}")


# ---------------------------------------------------------------------------- torch backend

@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_torch_float64_matches_oracle(shape, cls_only):
    # Same arithmetic in a different order: float64 rounding only.
    check_against_oracle(shape, torch.float64, cls_only, "torch", rel=1e-10)


@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("shape", [SHAPES["n7_d40"], SHAPES["n33_d64"], SHAPES["topk16"]],
                         ids=["n7_d40", "n33_d64", "topk16"])
def test_torch_float32_matches_oracle(shape, cls_only):
    # float32 with sums over D <= 64 and k + 2 rows: errors ~1e-6 of scale; 1e-4 leaves margin.
    check_against_oracle(shape, torch.float32, cls_only, "torch", rel=1e-4)


@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
def test_torch_topk_in_batch_chunks_matches_oracle(cls_only, monkeypatch):
    """The torch top-k bounds its similarity block by splitting the batch (real shapes split at
    B > 129 text samples, full output); one sample per chunk here, so every chunk after the first
    runs: each must read its own samples' norms and rows."""
    monkeypatch.setattr(hg, "_TOPK_CHUNK_SCORES", 1)
    check_against_oracle((3, 9, 24, 5, 3), torch.float64, cls_only, "torch", rel=1e-10, seed=3)


@pytest.mark.parametrize("prims", [
    "TORCH_PRIMITIVES",
    pytest.param("TRITON_PRIMITIVES", marks=pytest.mark.triton),
    pytest.param("TRITON_ATOMIC_PRIMITIVES", marks=pytest.mark.triton),
])
def test_cls_only_through_the_primitives_matches_oracle(prims, device):
    """cls_only by the shared implementation over a backend's primitives: the path the CUDA
    backend takes (its primitives cannot run here), which the torch and Triton backends' own
    cls_only paths never reach."""
    primitives = getattr(hg, prims)
    dtype = torch.float64 if primitives is hg.TORCH_PRIMITIVES else torch.float32
    for shape in (SHAPES["n7_d40"], SHAPES["topk1"], SHAPES["n33_d64"]):
        x, c, edge, node, k = make_inputs(shape, dtype=dtype, device=device)
        out, grads = run_with_grads(lambda x_, c_, e_, n_: hg._hypergraph_impl(x_, c_, tuple(e_), tuple(n_), k, True,
                                                                              primitives), x, c, edge, node)
        ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only=True)
        rel = 1e-10 if dtype == torch.float64 else 1e-4
        assert_close_scaled(out, ref_out, rel, "output")
        for name, got, want in zip(PARAM_NAMES, grads, ref_grads, strict=True):
            assert_close_scaled(got, want, rel, f"grad {name}")


@pytest.mark.triton
def test_float16_cls_only_through_the_kernel_primitives_matches_oracle(device):
    """The CUDA backend's cls_only path for a float16 x (the shared implementation over kernel primitives, which
    read x in its own dtype), here over the Triton primitives: the output comes back in float16, the forward and
    every gradient within the float16 rounding of the oracle's (inputs exact in float16, float32 compute)."""
    x, c, edge, node, k = make_inputs(SHAPES["n7_d40"], dtype=torch.float16, device=device)
    out, grads = run_with_grads(lambda x_, c_, e_, n_: hg._hypergraph_impl(x_, c_, tuple(e_), tuple(n_), k, True,
                                                                          hg.TRITON_PRIMITIVES), x, c, edge, node)
    ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only=True)
    assert out.dtype == torch.float16 and out.shape == ref_out.shape
    assert_close_scaled(out, ref_out, 2 ** -9, "output")  # one float16 rounding (2^-11): 4x margin
    for name, got, want in zip(PARAM_NAMES, grads, ref_grads, strict=True):
        assert got.dtype == torch.float16, name
        assert_close_scaled(got, want, 2 ** -9, f"grad {name}")


# Inputs that require grad (indices into PARAM_NAMES), the others frozen: features frozen (the
# adapters and the CLS row trained on precomputed tokens), the CLS row alone, x alone. The
# backward's branches on which inputs need a gradient, which the all-trainable tests never leave.
GRAD_SUBSETS = {"x_frozen": tuple(range(1, 10)), "cls_attn_only": (1,), "x_only": (0,)}


@pytest.mark.parametrize("subset", list(GRAD_SUBSETS))
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_gradients_of_some_inputs_match_oracle(backend, cls_only, subset, device):
    trainable = GRAD_SUBSETS[subset]
    dtype, rel = (torch.float64, 1e-10) if backend == "torch" else (torch.float32, 1e-4)
    x, c, edge, node, k = make_inputs((2, 9, 12, 5, 3), dtype=dtype, device=device if backend == "triton" else "cpu")
    flat = [x, c, *edge, *node]
    ours = [t.detach().clone().requires_grad_(i in trainable) for i, t in enumerate(flat)]
    refs = [t.detach().double().requires_grad_(i in trainable) for i, t in enumerate(flat)]
    out = ace_kernels.ace_hypergraph(ours[0], ours[1], tuple(ours[2:6]), tuple(ours[6:]), topk=k, cls_only=cls_only,
                                     backend=backend)
    ref = oracle_hypergraph(refs[0], refs[1], refs[2:6], refs[6:], k)
    ref = ref[:, 0] if cls_only else ref
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(ref.device)
    got = torch.autograd.grad((out * g.to(out.dtype)).sum(), [ours[i] for i in trainable])
    want = torch.autograd.grad((ref * g).sum(), [refs[i] for i in trainable])
    assert_close_scaled(out, ref, rel, "output")
    for i, got_i, want_i in zip(trainable, got, want, strict=True):
        assert_close_scaled(got_i, want_i, rel, f"grad {PARAM_NAMES[i]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("subset", ["adapters", "cls_attn_too"])
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_tokens_made_under_inference_mode_train_the_rest(backend, cls_only, subset, dtype, device):
    # Tokens from a frozen encoder run under torch.inference_mode, the adapters (and the CLS row) trained
    # on them: autograd cannot save such a tensor, and the full output's folded down projection saved x
    # (the reference saves E = A X), as the CLS weights' gradient did on every path.
    x, c, edge, node, k = make_inputs((2, 9, 12, 5, 3), dtype=dtype, device=device if backend == "triton" else "cpu")
    with torch.inference_mode():
        x_inf = x.clone()
    trainable = leaves([c, *edge, *node]) if subset == "cls_attn_too" else [c, *leaves([*edge, *node])]
    refs = [t.detach().double().requires_grad_(t.requires_grad) for t in trainable]
    out = ace_kernels.ace_hypergraph(x_inf, trainable[0], tuple(trainable[1:5]), tuple(trainable[5:]), topk=k,
                                     cls_only=cls_only, backend=backend)
    ref = oracle_hypergraph(x.double(), refs[0], refs[1:5], refs[5:], k)
    ref = ref[:, 0] if cls_only else ref
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(ref.device)
    wrt = [i for i, t in enumerate(trainable) if t.requires_grad]
    got = torch.autograd.grad((out.float() * g.float()).sum(), [trainable[i] for i in wrt])
    want = torch.autograd.grad((ref * g).sum(), [refs[i] for i in wrt])
    rel = 1e-4 if dtype == torch.float32 else 2 ** -8
    assert_close_scaled(out, ref, rel, "output")
    for i, got_i, want_i in zip(wrt, got, want, strict=True):
        assert_close_scaled(got_i, want_i, rel, f"grad {PARAM_NAMES[1 + i]}")


@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_a_frozen_edge_adapter_made_under_inference_mode_trains_the_node_adapter(backend, cls_only, device):
    # An edge adapter loaded (or copied) under torch.inference_mode and kept frozen, the node adapter trained:
    # the full output folds the edge adapter's up projection into the node adapter's down weight
    # (W_dn W_ue, W_dn b_ue), whose gradient saved W_ue and b_ue, which autograd refuses for inference
    # tensors; the reference applies each adapter on its own and saves neither.
    dtype, rel = (torch.float64, 1e-10) if backend == "torch" else (torch.float32, 1e-4)
    x, c, edge, node, k = make_inputs((2, 9, 12, 5, 3), dtype=dtype, device=device if backend == "triton" else "cpu")
    with torch.inference_mode():
        edge_inf = [t.clone() for t in edge]
    node_ours, node_refs = leaves(node), [t.detach().double().requires_grad_(True) for t in node]
    out = ace_kernels.ace_hypergraph(x, c, tuple(edge_inf), tuple(node_ours), topk=k, cls_only=cls_only,
                                     backend=backend)
    ref = oracle_hypergraph(x.double(), c.double(), [t.double() for t in edge], node_refs, k)
    ref = ref[:, 0] if cls_only else ref
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(ref.device)
    got = torch.autograd.grad((out * g.to(out.dtype)).sum(), node_ours)
    want = torch.autograd.grad((ref * g).sum(), node_refs)
    assert_close_scaled(out, ref, rel, "output")
    for name, got_i, want_i in zip(PARAM_NAMES[6:], got, want, strict=True):
        assert_close_scaled(got_i, want_i, rel, f"grad {name}")


@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_stride_zero_tokens_and_a_retained_graph_run_twice(backend, cls_only, device):
    # One sample broadcast over the batch (x and cls_attn expanded: batch stride 0) against the oracle, every
    # input trained; then a second backward through the same graph (retain_graph=True) gives the first's
    # gradients bit for bit: no backward may update what it saved in place.
    dtype, rel = (torch.float64, 1e-10) if backend == "torch" else (torch.float32, 1e-4)
    on = device if backend == "triton" else "cpu"
    x, c, edge, node, k = make_inputs((1, 9, 12, 5, 3), dtype=dtype, device=on)
    ours = leaves([x, c, *edge, *node])
    refs = [t.detach().double().requires_grad_(True) for t in ours]
    x_b, c_b = ours[0].expand(3, 9, 12), ours[1].expand(3, 8)
    assert x_b.stride(0) == 0 and c_b.stride(0) == 0
    out = ace_kernels.ace_hypergraph(x_b, c_b, tuple(ours[2:6]), tuple(ours[6:]), topk=k, cls_only=cls_only,
                                     backend=backend)
    ref = oracle_hypergraph(refs[0].expand(3, 9, 12), refs[1].expand(3, 8), refs[2:6], refs[6:], k)
    ref = ref[:, 0] if cls_only else ref
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(ref.device)
    first = torch.autograd.grad((out * g.to(out.dtype)).sum(), ours, retain_graph=True)
    second = torch.autograd.grad((out * g.to(out.dtype)).sum(), ours)
    want = torch.autograd.grad((ref * g).sum(), refs)
    assert_close_scaled(out, ref, rel, "output")
    for name, got_i, again, want_i in zip(PARAM_NAMES, first, second, want, strict=True):
        assert_close_scaled(got_i, want_i, rel, f"grad {name}")
        assert torch.equal(got_i, again), f"second backward: grad {name}"


def test_cls_only_equals_row_zero_of_full_output():
    x, c, edge, node, k = make_inputs(SHAPES["n33_d64"])
    full = ace_kernels.ace_hypergraph(x, c, tuple(edge), tuple(node), topk=k, backend="torch")
    cls = ace_kernels.ace_hypergraph(x, c, tuple(edge), tuple(node), topk=k, cls_only=True, backend="torch")
    torch.testing.assert_close(cls, full[:, 0], rtol=1e-12, atol=1e-12)  # float64, same sums


def test_numpy_bools_are_bools():
    # cls_only and deterministic take NumPy's bools as lora_qkv's training does; other types
    # are refused with the type named.
    import numpy as np

    x, c, edge, node, k = make_inputs(SHAPES["n33_d64"])
    cls = ace_kernels.ace_hypergraph(x, c, tuple(edge), tuple(node), topk=k, cls_only=np.bool_(True),
                                     deterministic=np.bool_(True), backend="torch")
    want = ace_kernels.ace_hypergraph(x, c, tuple(edge), tuple(node), topk=k, cls_only=True, backend="torch")
    assert torch.equal(cls, want)
    assert ace_kernels.ACEHypergraph(64, 16, 5, deterministic=np.bool_(False)).deterministic is False
    with pytest.raises(ValueError, match="argument 'cls_only': expected a bool, got int"):
        ace_kernels.ace_hypergraph(x, c, tuple(edge), tuple(node), topk=k, cls_only=1, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    x, c, edge, node, k = make_inputs(SHAPES["n7_d40"], dtype=dtype)
    out = ace_kernels.ace_hypergraph(x, c, tuple(edge), tuple(node), topk=k, backend="torch")
    ref = oracle_hypergraph(x.double(), c.double(), [p.double() for p in edge], [p.double() for p in node], k)
    assert out.dtype == dtype
    # Inputs are exact in float64; float32 compute then one rounding to the output dtype
    # (2^-9 for bf16, 2^-12 for fp16, relative): bounds of twice that.
    assert_close_scaled(out, ref, 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11, "output")


@pytest.mark.parametrize("shape", [(2, 8, 6, 3, 3), (2, 2, 6, 3, 2)], ids=["n8_topk3", "n2_topk2"])
def test_torch_cls_only_second_derivatives(shape):
    """cls_only on the torch backend is plain autograd: gradgradcheck in fp64 (distinct scores,
    so the top-k selection is constant around the point). N = 2: the patch row with no
    candidate stays finite to second order."""
    x, c, edge, node, k = make_inputs(shape)
    inputs = leaves([x, c, *edge, *node])

    def fn(*t):
        return ace_kernels.ace_hypergraph(t[0], t[1], t[2:6], t[6:10], topk=k, cls_only=True, backend="torch")

    assert torch.autograd.gradgradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("backend,cls_only", [
    ("torch", False),
    pytest.param("triton", False, marks=pytest.mark.triton),
    pytest.param("triton", True, marks=pytest.mark.triton),
], ids=["torch-full", "triton-full", "triton-cls_only"])
def test_sparse_backward_refuses_second_derivatives(backend, cls_only, device):
    dtype = torch.float64 if backend == "torch" else torch.float32
    x, c, edge, node, k = make_inputs(SHAPES["n7_d40"], dtype=dtype, device=device)
    x.requires_grad_(True)
    out = ace_kernels.ace_hypergraph(x, c, tuple(edge), tuple(node), topk=k, cls_only=cls_only, backend=backend)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
def test_autocast_leaves_the_op_unchanged(backend, cls_only, device):
    x, c, edge, node, k = make_inputs(SHAPES["n7_d40"], dtype=torch.float32, device=device)
    inputs = leaves([x, c, *edge, *node])

    def run():
        out = ace_kernels.ace_hypergraph(inputs[0], inputs[1], tuple(inputs[2:6]), tuple(inputs[6:10]), topk=k,
                                         cls_only=cls_only, backend=backend)
        return out, torch.autograd.grad(out.square().sum(), inputs)

    want, want_grads = run()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got, got_grads = run()
    assert got.dtype == torch.float32
    if device.type == "cpu" or backend != "torch" or cls_only:
        assert torch.equal(got, want)
    else:  # the torch backend's full output adds with index_add_, atomic on a GPU
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # A backward inside the region runs (the sparse products once failed on bf16 there), but
    # the op's plain-autograd parts (the adapters) follow the autocast state at backward time,
    # as any module's do: bf16-level differences. Run backward outside autocast, as usual.
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


def test_kernels_decline_a_batch_over_the_grid_limit():
    x = torch.empty(hg._MAX_GRID_BATCH + 1, 4, 3)
    assert any("split the batch" in r for r in hg._kernel_check(x, None, None, None, 2, True))
    assert hg._kernel_check(x[:hg._MAX_GRID_BATCH], None, None, None, 2, True) == []


def check_all_equal_features_ties(backend, dtype, rel, device="cpu"):
    """Every token identical: every similarity is 1, so which neighbours a kernel keeps among the
    ties is unspecified (and may differ between backends). Well defined regardless: token 0 of
    the output, the cls_only gradients of cls_attn and the adapters, and the sum of the gradient
    over tokens. cls_attn has distinct values so the CLS row itself has no ties."""
    B, N, D, H, k = 2, 10, 24, 5, 3
    x, c, edge, node, _ = make_inputs((B, N, D, H, k), dtype=dtype, device=device)
    x = x[:, :1].expand(B, N, D).contiguous()
    out, grads = ours_run(x, c, edge, node, k, True, backend)
    ref_out, ref_grads = oracle_run(x, c, edge, node, k, True)
    assert_close_scaled(out, ref_out, rel, "output")
    for name, got, want in list(zip(PARAM_NAMES, grads, ref_grads, strict=True))[1:]:
        assert_close_scaled(got, want, rel, f"grad {name}")
    assert_close_scaled(grads[0].sum(1), ref_grads[0].sum(1), rel, "grad x summed over tokens")
    full = ace_kernels.ace_hypergraph(x, c, tuple(edge), tuple(node), topk=k, backend=backend)
    ref_full = oracle_hypergraph(*(t.double() if isinstance(t, torch.Tensor) else [p.double() for p in t]
                                   for t in (x, c, edge, node)), k)
    assert_close_scaled(full[:, 0], ref_full[:, 0], rel, "full output, token 0")
    assert torch.isfinite(full).all()


def test_all_equal_features_ties():
    check_all_equal_features_ties("torch", torch.float64, 1e-10)


@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
def test_zero_norm_tokens(cls_only):
    # N = topk + 2: every patch row keeps all its candidates, so the zero tokens' rows (all their
    # cosines are 0, a tie) have a well-defined neighbour set. Gradients through F.normalize at a
    # zero vector are 1/eps-sized; the comparison is relative to each tensor's scale.
    B, N, D, H, k = 2, 7, 20, 4, 5
    x, c, edge, node, _ = make_inputs((B, N, D, H, k), seed=3)
    x[:, 2] = 0.0
    x[1, 0] = 0.0  # a zero CLS token too
    out, grads = ours_run(x, c, edge, node, k, cls_only, "torch")
    ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only)
    assert_close_scaled(out, ref_out, 1e-10, "output")
    assert_grad_x_close(grads[0], ref_grads[0], x.norm(dim=-1) == 0, 1e-10, "grad x")
    for name, got, want in list(zip(PARAM_NAMES, grads, ref_grads, strict=True))[1:]:
        assert_close_scaled(got, want, 1e-10, f"grad {name}")


def check_tokens_under_the_norm_clamp(backend, dtype, cls_only, tiny_is_query, rel, device="cpu"):
    """Tokens with 0 < |x| < 1e-12: F.normalize divides them by the clamp (x / 1e-12), so the
    gradient through the norm is 0 there (max(|x|, eps) is constant in x) and only the 1/eps
    term remains. Zero tokens cannot tell the two apart (x = 0 multiplies the norm's term);
    these can. N = k + 2, so every patch row keeps all its candidates (no selection ties) and
    the tiny token is every other patch's neighbour; ``tiny_is_query`` puts it in the CLS row's
    top-k (a query of the cls_only path, whose own norm's term then dominates its gradient
    row), else out of it (a neighbour only: the neighbours' norm terms)."""
    B, N, D, H, k = 2, 7, 20, 4, 5
    x, c, edge, node, _ = make_inputs((B, N, D, H, k), dtype=torch.float64, seed=13)
    x[:, 2] *= 0.5e-12 / x[:, 2].norm(dim=-1, keepdim=True)  # half the clamp
    c[:, 1] = 10.0 if tiny_is_query else -10.0  # token 2 (patch 1) in or out of the CLS row's top-k
    x, c = x.to(dtype=dtype, device=device), c.to(dtype=dtype, device=device)
    edge, node = [p.to(dtype=dtype, device=device) for p in edge], [p.to(dtype=dtype, device=device) for p in node]
    tiny = x.double().norm(dim=-1) < 1e-12
    assert tiny[:, 2].all() and (x.double().norm(dim=-1) > 0).all()
    out, grads = ours_run(x, c, edge, node, k, cls_only, backend)
    ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only)
    assert_close_scaled(out, ref_out, rel, "output")
    assert_grad_x_close(grads[0], ref_grads[0], tiny, rel, "grad x")
    for name, got, want in list(zip(PARAM_NAMES, grads, ref_grads, strict=True))[1:]:
        assert_close_scaled(got, want, rel, f"grad {name}")


TINY_TOKEN_CASES = pytest.mark.parametrize("cls_only, tiny_is_query", [(False, True), (True, True), (True, False)],
                                           ids=["full", "cls_only-query", "cls_only-neighbour"])


@TINY_TOKEN_CASES
def test_tokens_under_the_norm_clamp(cls_only, tiny_is_query):
    check_tokens_under_the_norm_clamp("torch", torch.float64, cls_only, tiny_is_query, 1e-10)


def test_non_contiguous_inputs():
    B, N, D, H, k = 3, 11, 18, 5, 4
    x, c, edge, node, _ = make_inputs((B, N, D, H, k), seed=5)
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)  # batch-strided view
    c_nc = torch.stack([c, torch.zeros_like(c)], dim=-1)[..., 0]  # stride 2 along tokens
    edge_nc = [edge[0].T.contiguous().T, edge[1], edge[2].T.contiguous().T, edge[3]]
    node_nc = [node[0], torch.stack([node[1], node[1]], -1)[..., 0], node[2].T.contiguous().T, node[3]]
    assert not x_nc.is_contiguous() and not c_nc.is_contiguous() and not edge_nc[0].is_contiguous()
    assert not node_nc[1].is_contiguous()  # a bias with stride 2
    for cls_only in (False, True):
        out, grads = ours_run(x_nc, c_nc, edge_nc, node_nc, k, cls_only, "torch")
        ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only)
        assert_close_scaled(out, ref_out, 1e-10, "output")
        for name, got, want in zip(PARAM_NAMES, grads, ref_grads, strict=True):
            assert_close_scaled(got, want, 1e-10, f"grad {name}")


@pytest.mark.parametrize("where", ["x", "cls_attn"])
def test_non_finite_inputs_do_not_crash(where):
    x, c, edge, node, k = make_inputs(SHAPES["n7_d40"], dtype=torch.float32)
    if where == "x":
        x[0, 3, 1] = float("nan")
        x[1, 2, 0] = float("inf")
    else:
        c[0, 1] = float("nan")
    for cls_only in (False, True):
        out, grads = ours_run(x, c, edge, node, k, cls_only, "torch")
        # A NaN score ranks first in torch.topk and a NaN/inf feature poisons every row it reaches.
        assert torch.isnan(out).any()
        assert all(g.shape == t.shape for g, t in zip(grads, [x, c, *edge, *node], strict=True))


@pytest.mark.parametrize("score", [float("nan"), float("inf"), None], ids=["nan", "inf", "none_finite"])
def test_a_non_finite_cls_row_is_nan_where_documented(score):
    # The reference's row 0 is NaN in every column and step 5 copies it into column 0 of every row;
    # the backends keep its k selected columns only (the docstring's Notes say which rows are NaN).
    x, c, edge, node, _ = make_inputs((1, 20, 6, 3, 2))
    if score is None:
        c[0] = float("-inf")
    else:
        c[0, 4] = score
    ref = oracle_hypergraph(x, c, edge, node, 2)
    out = ace_kernels.ace_hypergraph(x, c, tuple(edge), tuple(node), topk=2, backend="torch")
    cls = ace_kernels.ace_hypergraph(x, c, tuple(edge), tuple(node), topk=2, cls_only=True, backend="torch")
    assert torch.isnan(ref).all() and torch.isnan(cls).all()
    nan_rows = torch.isnan(out[0]).any(dim=-1)
    assert nan_rows[0] and nan_rows[1 + c[0].topk(2).indices].all()
    assert not nan_rows.all()


def test_module_and_adapter_forms_agree():
    torch.manual_seed(0)
    module = ace_kernels.ACEHypergraph(dim=40, hidden=6, topk=3).double()
    x, c, *_ = make_inputs(SHAPES["n7_d40"])
    out = module(x, c)
    params = lambda a: (a.down.weight, a.down.bias, a.up.weight, a.up.bias)  # noqa: E731
    ref = oracle_hypergraph(x, c, params(module.edge_adapter), params(module.node_adapter), 3)
    assert_close_scaled(out, ref, 1e-10, "module output")
    assert_close_scaled(module(x, c, cls_only=True), ref[:, 0], 1e-10, "module cls_only")
    # The tuple form of the same parameters (passing the modules again would compare the module's call with itself).
    tuple_out = ace_kernels.ace_hypergraph(x, c, params(module.edge_adapter), params(module.node_adapter), topk=3)
    torch.testing.assert_close(tuple_out, out, rtol=0, atol=0)


def test_the_modules_adapters_compute_what_the_op_applies():
    """ACEHypergraph.edge_adapter(z) (its own forward, which the op never calls: it reads the
    parameters) is the adapter the op applies: up(leaky_relu(down(z), 0.2))."""
    torch.manual_seed(0)
    module = ace_kernels.ACEHypergraph(dim=40, hidden=6, topk=3).double()
    z = torch.randn(2, 5, 40, dtype=torch.float64)
    for adapter in (module.edge_adapter, module.node_adapter):
        params = (adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias)
        assert torch.equal(adapter(z), hg._adapter(z, params))
        hidden = z @ adapter.down.weight.t() + adapter.down.bias
        want = torch.where(hidden > 0, hidden, 0.2 * hidden) @ adapter.up.weight.t() + adapter.up.bias
        torch.testing.assert_close(adapter(z), want, rtol=1e-12, atol=1e-12)


def _hook_cases():
    """(what is hooked, how): hooks the op never ran, each of which changes what calling the adapters gives."""
    def forward_hook(m):
        return m.edge_adapter.up.register_forward_hook(lambda module, args, out: out * 3.0)

    def pre_hook(m):
        return m.node_adapter.register_forward_pre_hook(lambda module, args: (args[0] * 2.0,))

    def backward_hook(m):
        return m.node_adapter.down.register_full_backward_hook(lambda module, grad_in, grad_out: None)

    def backward_pre_hook(m):
        return m.edge_adapter.up.register_full_backward_pre_hook(lambda module, grad_out: (grad_out[0] * 2.0,))

    def old_weight_norm(m):
        with pytest.warns(FutureWarning):  # deprecated, still shipped: recomputes weight in a forward pre-hook
            torch.nn.utils.weight_norm(m.edge_adapter.down)
        with torch.no_grad():
            m.edge_adapter.down.weight_g.mul_(2.0)  # an optimizer step: the weight is recomputed at the next call
        return None

    def pruned(m):
        from torch.nn.utils import prune

        prune.l1_unstructured(m.node_adapter.up, "weight", amount=0.5)  # weight recomputed in a pre-hook
        return None

    def old_spectral_norm(m):
        torch.nn.utils.spectral_norm(m.node_adapter.down)  # the weight is recomputed in a forward pre-hook
        return None

    weight_norm = r"edge_adapter.down has a forward pre-hook \(WeightNorm\).*parametrizations.weight_norm"
    return [("edge_adapter.up has a forward hook", forward_hook), ("node_adapter has a forward pre-hook", pre_hook),
            ("node_adapter.down has a backward hook", backward_hook), (weight_norm, old_weight_norm),
            (r"node_adapter.up has a forward pre-hook \(L1Unstructured\).*prune.remove", pruned),
            ("edge_adapter.up has a backward pre-hook", backward_pre_hook),
            (r"node_adapter.down has a forward pre-hook \(SpectralNorm\).*parametrizations.weight_norm / "
             "spectral_norm", old_spectral_norm)]


def _assert_module_and_functional_raise(module, x, c, match):
    """``module`` (an ACEHypergraph of topk 3) and the functional on its adapters raise a ValueError matching
    ``match``, for the full output and for cls_only."""
    for cls_only in (False, True):
        with pytest.raises(ValueError, match=match):
            module(x, c, cls_only=cls_only, backend="torch")
        with pytest.raises(ValueError, match=match):
            ace_kernels.ace_hypergraph(x, c, module.edge_adapter, module.node_adapter, topk=3, cls_only=cls_only)


@pytest.mark.parametrize("case", range(7), ids=["forward_hook", "pre_hook", "backward_hook", "old_weight_norm",
                                             "pruned", "backward_pre_hook", "old_spectral_norm"])
def test_hooks_on_the_adapters_raise_instead_of_being_skipped(case):
    """The op reads the adapters' down/up weights and never calls them: hooks on an adapter or its layers
    never ran (the output was that of the unhooked adapters, silently; the old weight_norm's weight was the
    one of its last recomputation). It now raises, naming the hooked submodule, from the module and the
    functional, for both outputs; without the hook it runs as before."""
    match, register = _hook_cases()[case]
    torch.manual_seed(0)
    module = ace_kernels.ACEHypergraph(dim=40, hidden=6, topk=3).double()
    x, c, *_ = make_inputs(SHAPES["n7_d40"])
    before = module(x, c)
    handle = register(module)
    _assert_module_and_functional_raise(module, x, c, match)
    if handle is not None:
        handle.remove()
        torch.testing.assert_close(module(x, c), before, rtol=0, atol=0)


def test_hooks_on_a_reference_adapters_activation_raise():
    """An adapter with an activation module (the reference's ``act``): a hook there would be skipped too."""
    from reference_modules import Adapter

    torch.manual_seed(0)
    edge, node = Adapter(40, 6).double(), Adapter(40, 6).double()
    x, c, *_ = make_inputs(SHAPES["n7_d40"])
    handle = node.act.register_forward_hook(lambda module, args, out: out + 1.0)
    with pytest.raises(ValueError, match="node_adapter.act has a forward hook"):
        ace_kernels.ace_hypergraph(x, c, edge, node, topk=3)
    handle.remove()
    ace_kernels.ace_hypergraph(x, c, edge, node, topk=3)


@pytest.mark.parametrize("part", ["edge_adapter", "node_adapter.up", "act"])
def test_a_forward_set_on_an_adapters_instance_raises_instead_of_being_skipped(part):
    """A forward set on an adapter's or its layer's instance (accelerate's hooks, a user's wrapper) never ran: the
    op reads the weights, so the output was that of the unwrapped adapters, silently. It now raises as a hook does,
    naming the submodule, from the module and the functional, for both outputs; deleted, the op runs as before."""
    from reference_modules import Adapter

    torch.manual_seed(0)
    module = ace_kernels.ACEHypergraph(dim=40, hidden=6, topk=3).double()
    if part == "act":
        module.node_adapter = Adapter(40, 6).double()
    x, c, *_ = make_inputs(SHAPES["n7_d40"])
    before = module(x, c)
    part = "node_adapter.act" if part == "act" else part
    target = module.get_submodule(part)
    target.forward = lambda z: 2.0 * type(target).forward(target, z)
    match = rf"argument '{part.split('.')[0]}': {part} has a forward set on the instance .*del {part}.forward"
    _assert_module_and_functional_raise(module, x, c, match)
    del target.forward
    torch.testing.assert_close(module(x, c), before, rtol=0, atol=0)


def test_adapter_layers_the_op_would_not_call_raise():
    """The op reads the adapters' down/up weights and applies leaky_relu(0.2) itself: PEFT's LoRA on an
    adapter layer (its ``weight`` is the base layer's) was skipped, the output that of the base layers and
    the LoRA weights without a gradient, silently, and so was an adapter ``act`` other than LeakyReLU(0.2).
    Each now raises, naming the layer, from the module and the functional, for both outputs; the
    reference's LeakyReLU(0.2) runs as before."""
    from reference_modules import Adapter

    torch.manual_seed(0)
    x, c, *_ = make_inputs(SHAPES["n7_d40"])
    edge, node = Adapter(40, 6).double(), Adapter(40, 6).double()
    want = ace_kernels.ace_hypergraph(x, c, edge, node, topk=3)  # the reference's LeakyReLU(0.2)
    params = lambda a: (a.down.weight, a.down.bias, a.up.weight, a.up.bias)  # noqa: E731
    assert_close_scaled(want, oracle_hypergraph(x, c, params(edge), params(node), 3), 1e-10, "reference adapters")
    for act in (torch.nn.ReLU(), torch.nn.LeakyReLU(0.1)):
        node.act = act
        match = rf"argument 'node_adapter': node_adapter.act is {re.escape(repr(act))}.*slope 0.2"
        with pytest.raises(ValueError, match=match):
            ace_kernels.ace_hypergraph(x, c, edge, node, topk=3, cls_only=True)
    # An adapter that is no nn.Module but holds the layers (a namespace): its act is checked all the same.
    plain = types.SimpleNamespace(down=node.down, up=node.up, act=torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"argument 'node_adapter': node_adapter.act is ReLU\(\).*slope 0.2"):
        ace_kernels.ace_hypergraph(x, c, edge, plain, topk=3)
    peft = pytest.importorskip("peft")
    module = ace_kernels.ACEHypergraph(dim=40, hidden=6, topk=3).double()
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["down"], init_lora_weights=False), module)
    assert not isinstance(module.edge_adapter.down, torch.nn.Linear)  # a module around the base nn.Linear
    match = r"edge_adapter.down is a peft\.tuners\.lora\.layer\.Linear, not an nn.Linear.*merge_and_unload"
    _assert_module_and_functional_raise(module, x, c, match)


class _NoisyLinear(torch.nn.Linear):
    """A user's nn.Linear subclass whose own forward adds a term the weights do not show."""

    def forward(self, z):
        return super().forward(z) + 0.5


@pytest.mark.parametrize("layer", ["subclass", "qat"])
def test_adapter_linear_subclasses_with_their_own_forward_raise(layer):
    """An nn.Linear subclass that overrides forward (torch.ao's QAT Linear fake-quantises its weight, a user's adds
    noise) passed the isinstance check and was read as a plain nn.Linear: its forward skipped, the output that of
    the bare weights, silently. It now raises, naming the layer, from the module and the functional, for both
    outputs; the module's own adapter layers (an nn.Linear subclass keeping nn.Linear's forward) run as before."""
    torch.manual_seed(0)
    module = ace_kernels.ACEHypergraph(dim=40, hidden=6, topk=3).double()
    x, c, *_ = make_inputs(SHAPES["n7_d40"])
    params = lambda a: (a.down.weight, a.down.bias, a.up.weight, a.up.bias)  # noqa: E731
    want = oracle_hypergraph(x, c, params(module.edge_adapter), params(module.node_adapter), 3)
    assert_close_scaled(module(x, c), want, 1e-10, "the module's own adapter layers")
    if layer == "qat":
        from torch.ao.nn.qat import Linear as QATLinear
        from torch.ao.quantization import get_default_qat_qconfig

        replacement, qualified = QATLinear(6, 40, qconfig=get_default_qat_qconfig()), "torch.ao.nn.qat"
    else:
        replacement, qualified = _NoisyLinear(6, 40), "test_hypergraph._NoisyLinear"
    replacement.load_state_dict(module.node_adapter.up.state_dict(), strict=False)
    module.node_adapter.up = replacement.double()
    match = rf"argument 'node_adapter': node_adapter.up is a {re.escape(qualified)}.*its own forward"
    _assert_module_and_functional_raise(module, x, c, match)


def test_an_uninitialised_lazy_adapter_layer_says_to_call_it_first():
    """An uninitialised LazyLinear as an adapter layer was refused for its pre-hook, with the advice to remove it
    (which leaves the layer without a weight). It is now named as uninitialised, with the advice to call the
    adapter once; after that call (the layer is then an nn.Linear) the op runs."""
    torch.manual_seed(0)
    module = ace_kernels.ACEHypergraph(dim=40, hidden=6, topk=3).double()
    x, c, *_ = make_inputs(SHAPES["n7_d40"])
    module.edge_adapter.down = torch.nn.LazyLinear(6).double()
    match = r"argument 'edge_adapter': edge_adapter.down is an uninitialised LazyLinear.*edge_adapter\(x\)"
    _assert_module_and_functional_raise(module, x, c, match)
    module.edge_adapter(x)
    assert type(module.edge_adapter.down) is torch.nn.Linear
    params = lambda a: (a.down.weight, a.down.bias, a.up.weight, a.up.bias)  # noqa: E731
    want = oracle_hypergraph(x, c, params(module.edge_adapter), params(module.node_adapter), 3)
    assert_close_scaled(module(x, c), want, 1e-10, "the initialised lazy layer")


def test_parametrized_adapter_weights_and_global_hooks():
    """torch.nn.utils.parametrize (the new weight_norm, spectral_norm) recomputes a weight when it is read,
    so the op reads the current one and its gradient reaches the parametrization's tensors: the oracle's
    output and gradients on the weights read. Global module hooks (FlopCounterMode's module tracking) do not
    fire for the adapters, which the op never calls, and are not refused."""
    from torch.nn.utils import parametrizations
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    module = ace_kernels.ACEHypergraph(dim=40, hidden=6, topk=3).double()
    parametrizations.weight_norm(module.node_adapter.down)
    parametrizations.spectral_norm(module.edge_adapter.up)
    module.eval()  # spectral_norm's power iteration runs at each read in training mode only
    with torch.no_grad():
        module.node_adapter.down.parametrizations.weight.original0.mul_(2.0)
    x, c, *_ = make_inputs(SHAPES["n7_d40"])
    params = lambda a: (a.down.weight, a.down.bias, a.up.weight, a.up.bias)  # noqa: E731
    leaves = (module.node_adapter.down.parametrizations.weight.original0,
              module.edge_adapter.up.parametrizations.weight.original)
    for cls_only in (False, True):
        ref = oracle_hypergraph(x, c, params(module.edge_adapter), params(module.node_adapter), 3)
        ref = ref[:, 0] if cls_only else ref
        want = torch.autograd.grad(ref.square().sum(), leaves)
        out = module(x, c, cls_only=cls_only)
        assert_close_scaled(out, ref, 1e-10, "parametrized output")
        for got, wanted in zip(torch.autograd.grad(out.square().sum(), leaves), want, strict=True):
            assert_close_scaled(got, wanted, 1e-10, "parametrized gradient")
        with FlopCounterMode(display=False):
            torch.testing.assert_close(module(x, c, cls_only=cls_only).detach(), out.detach(), rtol=0, atol=0)


def test_module_default_shapes_and_init():
    module = ace_kernels.ACEHypergraph()
    # The released model's settings (spec section 4): D = 512, a 128-wide bottleneck, k = 5, no atomics.
    assert (module.dim, module.hidden, module.topk, module.deterministic) == (512, 128, 5, True)
    assert module.extra_repr() == "dim=512, hidden=128, topk=5"
    assert sum(p.numel() for p in module.parameters()) == 2 * (512 * 128 + 128 + 128 * 512 + 512)
    keys = set(module.state_dict())
    assert keys == {f"{a}.{l}.{p}" for a in ("edge_adapter", "node_adapter") for l in ("down", "up")
                    for p in ("weight", "bias")}
    # kaiming_normal_ (fan_in, gain sqrt(2)): std sqrt(2 / 512) for down, sqrt(2 / 128) for up.
    std_down = module.edge_adapter.down.weight.std().item()
    std_up = module.node_adapter.up.weight.std().item()
    assert abs(std_down - (2 / 512) ** 0.5) < 0.05 * (2 / 512) ** 0.5
    assert abs(std_up - (2 / 128) ** 0.5) < 0.05 * (2 / 128) ** 0.5


@pytest.mark.parametrize("how", ["torch's FSDP1", "each module"])
def test_module_materialised_from_meta_has_the_construction_init(how):
    """Deferred init: built on the meta device, then ``to_empty`` and ``reset_parameters`` on each
    module with parameters of its own (what FSDP1 does by default: the adapters' down and up
    layers), the adapters' weights were nn.Linear's kaiming-uniform (std 1 / sqrt(3 fan_in)), not the
    reference's kaiming-normal (std sqrt(2 / fan_in)), silently. Each layer now draws what it draws
    at construction (its own draws: the generator ends where construction leaves it)."""
    torch.manual_seed(0)
    eager = ace_kernels.ACEHypergraph()
    after_construction = torch.get_rng_state()
    with torch.device("meta"):
        module = ace_kernels.ACEHypergraph()
    torch.manual_seed(0)
    if how == "each module":
        assert materialise_like_fsdp(module) == [module.edge_adapter.down, module.edge_adapter.up,
                                                 module.node_adapter.down, module.node_adapter.up]
    else:
        init_utils = pytest.importorskip("torch.distributed.fsdp._init_utils")
        init_utils._materialize_meta_module(module, torch.device("cpu"), set(), None)
        # tests/_meta_init.py's stand-in (the other tests' FSDP1) gives torch's tensors, bit for bit.
        with torch.device("meta"):
            twin = ace_kernels.ACEHypergraph()
        torch.manual_seed(0)
        materialise_like_fsdp(twin)
        for name, param in module.named_parameters():
            assert torch.equal(twin.get_parameter(name), param), name
    for name, want in eager.named_parameters():
        got = module.get_parameter(name)
        assert got.device.type == "cpu" and got.shape == want.shape, name
        fan_in = module.get_submodule(name.rsplit(".", 1)[0]).in_features
        for tensor in (got, want):
            if name.endswith("weight"):  # kaiming_normal_: std sqrt(2 / fan_in), beyond nn.Linear's bound
                assert abs(tensor.std().item() - (2 / fan_in) ** 0.5) < 0.05 * (2 / fan_in) ** 0.5, name
                # and beyond kaiming_uniform_'s bound sqrt(6 / fan_in), whose std is the same: a normal
                # draw passes 1.73 std once in 12 (these weights hold 65536 each).
                assert tensor.abs().max().item() > (6 / fan_in) ** 0.5, name
            else:  # nn.Linear's bias: uniform within 1 / sqrt(fan_in)
                assert tensor.abs().max().item() <= 1 / fan_in ** 0.5, name
                assert abs(tensor.std().item() - (1 / (3 * fan_in)) ** 0.5) < 0.15 * (1 / (3 * fan_in)) ** 0.5, name
    assert torch.equal(torch.get_rng_state(), after_construction)
    # The layers stay nn.Linear (patching checks it) and the state dict keys are the same.
    assert isinstance(module.edge_adapter.down, torch.nn.Linear)
    assert list(module.state_dict()) == list(eager.state_dict())


RELEASED = str(released_path())  # tests/_released.py: the workplace's copy, else the one in tests/data


@pytest.mark.skipif(not os.path.exists(RELEASED), reason="the released checkpoint is not on this machine")
def test_module_loads_released_adapters():
    weights = torch.load(RELEASED, map_location="cpu", weights_only=True)["weights"]
    module = ace_kernels.ACEHypergraph(dim=512, hidden=128, topk=5)
    module.edge_adapter.load_state_dict(weights["img_edge_adapter"])
    module.node_adapter.load_state_dict(weights["img_node_adapter"])
    x, c, *_ = make_inputs((2, 13, 512, 128, 5), dtype=torch.float32)
    x = torch.nn.functional.normalize(x, dim=-1)
    out = module(x, c, cls_only=True)
    sd = {k: v.double() for k, v in weights["img_edge_adapter"].items()}
    nd = {k: v.double() for k, v in weights["img_node_adapter"].items()}
    order = ("down.weight", "down.bias", "up.weight", "up.bias")
    ref = oracle_hypergraph(x.double(), c.double(), [sd[k] for k in order], [nd[k] for k in order], 5)[:, 0]
    assert_close_scaled(out, ref, 1e-4, "released adapters, cls_only")  # float32 compute


# ---------------------------------------------------------------------------- errors

def _good():
    return make_inputs(SHAPES["n7_d40"], dtype=torch.float32)


def _call(x, c, edge, node, k, **kw):
    return ace_kernels.ace_hypergraph(x, c, edge, node, topk=k, **kw)


@pytest.mark.parametrize("case, match", [
    ("x_rank", "argument 'x'"),
    ("x_dtype", "argument 'x'"),
    ("x_no_features", "argument 'x': expected a non-empty"),
    ("cls_batch", "argument 'cls_attn': expected shape \\[2, 6\\]"),
    ("cls_shape", "argument 'cls_attn'"),
    ("cls_rank", "argument 'cls_attn'"),
    ("cls_dtype", "argument 'cls_attn'"),
    ("cls_device", "argument 'cls_attn'"),
    ("topk_zero", "argument 'topk'"),
    ("x_no_tokens", "argument 'x': expected a non-empty \\[B, N, D\\] tensor, got shape \\[2, 0, 40\\]"),
    ("topk_over_two_tokens", "argument 'topk': expected topk <= N .*got topk=3 with N=2"),
    ("topk_too_large", "argument 'topk': expected topk <= N .*got topk=8 with N=7"),
    ("topk_float", "argument 'topk'"),
    ("topk_bool", "argument 'topk': expected an integer >= 1, got True"),
    ("adapter_len", "argument 'edge_adapter'"),
    ("adapter_type", "argument 'node_adapter'"),
    ("adapter_len5", "argument 'edge_adapter'.*length 5"),
    ("adapter_down_only", "argument 'node_adapter'.*got SimpleNamespace"),
    ("down_weight_shape", "argument 'edge_adapter.down_weight'"),
    ("down_bias_shape", "argument 'edge_adapter.down_bias'"),
    ("up_weight_shape", "argument 'node_adapter.up_weight'"),
    ("up_weight_rows", "argument 'edge_adapter.up_weight': expected shape \\[40, 6\\]"),
    ("up_bias_shape", "argument 'node_adapter.up_bias'"),
    ("adapter_dtype", "argument 'edge_adapter.up_bias'"),
    ("adapter_device", "argument 'node_adapter.down_weight'"),
    ("cls_only_type", "argument 'cls_only'"),
    ("deterministic_type", "argument 'deterministic'"),
    ("backend_name", "argument 'backend'"),
])
def test_value_errors(case, match):
    x, c, edge, node, k = _good()
    kw = {}
    if case == "x_rank":
        x = x[0]
    elif case == "x_dtype":
        x = x.to(torch.int32)
    elif case == "x_no_features":  # D = 0, with adapters of width 0 to match
        x = x[..., :0]
        edge = [edge[0][:, :0], edge[1], edge[2][:0], edge[3][:0]]
        node = [node[0][:, :0], node[1], node[2][:0], node[3][:0]]
    elif case == "cls_batch":
        c = c[:1]
    elif case == "cls_shape":
        c = c[:, 1:]
    elif case == "cls_rank":
        c = c[..., None]
    elif case == "cls_dtype":
        c = c.to(torch.int64)
    elif case == "cls_device":
        c = c.to("meta")
    elif case == "topk_zero":
        k = 0
    elif case == "x_no_tokens":
        x, c = x[:, :0], c[:, :0]
    elif case == "topk_over_two_tokens":
        x, c, k = x[:, :2], c[:, :1], 3
    elif case == "topk_too_large":
        k = 8  # torch.topk over a row of N = 7 scores takes k <= 7
    elif case == "topk_float":
        k = 2.0
    elif case == "topk_bool":
        k = True  # an int to Python: it would run as topk=1
    elif case == "adapter_len":
        edge = edge[:3]
    elif case == "adapter_type":
        node = "adapter"
    elif case == "adapter_len5":
        edge = edge + [edge[3]]
    elif case == "adapter_down_only":  # a .down linear but no .up
        node = types.SimpleNamespace(down=torch.nn.Linear(40, 6))
    elif case == "down_weight_shape":
        edge[0] = edge[0][:, 1:]
    elif case == "down_bias_shape":
        edge[1] = edge[1][1:]
    elif case == "up_weight_shape":
        node[2] = node[2][:, 1:]
    elif case == "up_weight_rows":  # right hidden width, wrong feature width
        edge[2] = edge[2][1:]
    elif case == "up_bias_shape":
        node[3] = node[3][1:]
    elif case == "adapter_dtype":
        edge[3] = edge[3].to(torch.int32)
    elif case == "adapter_device":
        node[0] = node[0].to("meta")
    elif case == "cls_only_type":
        kw["cls_only"] = 1
    elif case == "deterministic_type":
        kw["deterministic"] = "no"
    elif case == "backend_name":
        kw["backend"] = "cudnn"
    with pytest.raises(ValueError, match=match):
        _call(x, c, tuple(edge) if isinstance(edge, list) else edge, tuple(node) if isinstance(node, list) else node,
              k, **kw)


ADAPTER_TENSORS = tuple(f"{adapter}.{part}" for adapter in ("edge_adapter", "node_adapter")
                        for part in ("down_weight", "down_bias", "up_weight", "up_bias"))


@pytest.mark.parametrize("name", ["cls_attn", *ADAPTER_TENSORS])
def test_a_tensor_on_another_gpu_than_x_is_refused_by_name(name):
    """cls_attn and each adapter tensor on cuda:1 beside x on cuda:0 (whose kernels would read it as cuda:0
    memory) is refused naming that tensor, not another one. Fake tensors: the check reads devices only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, c, edge, node, k = _good()
        tensors = dict(zip(("x", "cls_attn", *ADAPTER_TENSORS), (t.to("cuda:0") for t in (x, c, *edge, *node)),
                           strict=True))
        tensors[name] = tensors[name].to("cuda:1")
        t = list(tensors.values())
        with pytest.raises(ValueError, match=rf"argument '{name}': expected a tensor on cuda:0 \(like 'x'\), "
                                             "got cuda:1"):
            _call(t[0], t[1], tuple(t[2:6]), tuple(t[6:]), k, backend="torch")


def test_the_module_refuses_bools_for_its_sizes():
    """dim, hidden and topk are integers, and a bool is none (True is an int to Python: the
    module would be built with a 1-wide adapter or topk 1), as in ace_hypergraph itself."""
    import numpy as np

    for name in ("dim", "hidden", "topk"):
        for flag in (True, np.bool_(True)):
            with pytest.raises(ValueError, match=rf"argument '{name}': expected an integer >= 1, got "):
                ace_kernels.ACEHypergraph(**{name: flag})


def test_the_module_checks_the_width_of_x_and_shows_its_settings():
    """ACEHypergraph names x (and its own dim) when x's feature width is not the module's,
    rather than an adapter weight the caller never passed; its repr shows dim, hidden, topk
    and a non-default deterministic."""
    module = ace_kernels.ACEHypergraph(dim=40, hidden=6, topk=3)
    x, c, *_ = _good()
    with pytest.raises(ValueError, match=r"argument 'x': expected features of width 40 \(this module's dim\), "
                                         r"got shape \[2, 7, 39\]"):
        module(x[..., 1:], c)
    assert module.extra_repr() == "dim=40, hidden=6, topk=3"
    assert ace_kernels.ACEHypergraph(dim=40, hidden=6, topk=3, deterministic=False).extra_repr() == (
        "dim=40, hidden=6, topk=3, deterministic=False")


def test_kernels_refuse_float64():
    """float64 x goes to the torch backend only: the kernels compute in float32, so an explicit
    triton (or cuda) backend refuses it with the reason, and auto never picks them for it (on a
    GPU machine, where auto would otherwise route it to the kernels)."""
    x, c, edge, node, k = make_inputs(SHAPES["n7_d40"])
    reasons = hg._kernel_check(x, c, tuple(edge), tuple(node), k, False)
    assert any("float64" in r for r in reasons), reasons
    assert hg._kernel_check(x.float(), c, tuple(edge), tuple(node), k, False) == []
    if "triton" in ace_kernels.available_backends():
        with pytest.raises(RuntimeError, match="float64 inputs are handled by the torch backend only"):
            _call(x, c, tuple(edge), tuple(node), k, backend="triton")


@pytest.mark.triton
def test_kernels_refuse_a_topk_over_their_limit():
    """topk = 17 is one over what the kernels keep in registers: an explicit triton backend
    refuses it with the reason, and auto takes the torch backend."""
    x, c, edge, node, _ = make_inputs((1, hg.MAX_KERNEL_TOPK + 3, 8, 3, 1), dtype=torch.float32)
    k = hg.MAX_KERNEL_TOPK + 1
    assert hg._kernel_check(x, c, tuple(edge), tuple(node), k, True) == [
        f"topk={k} is over the kernels' limit of {hg.MAX_KERNEL_TOPK}"]
    assert hg._kernel_check(x, c, tuple(edge), tuple(node), k - 1, True) == []
    with pytest.raises(RuntimeError, match=rf"backend 'triton' cannot run this call: topk={k} is over the kernels' "
                                           rf"limit of {hg.MAX_KERNEL_TOPK}"):
        _call(x, c, tuple(edge), tuple(node), k, cls_only=True, backend="triton")


@pytest.mark.triton
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
def test_kernels_take_a_topk_over_their_limit_when_a_row_has_fewer_slots(cls_only, device):
    """The limit is on a row's slots, min(topk, N - 1): topk = N = 17 keeps 16 a row, which the
    kernels take (and match the fp64 oracle, the patch rows with one empty slot); topk = N = 18
    keeps 17, which they refuse, naming both."""
    if device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    limit = hg.MAX_KERNEL_TOPK
    shape = (1, limit + 1, 6, 3, limit + 1)
    x, c, edge, node, k = make_inputs(shape, dtype=torch.float32)
    assert hg._kernel_check(x, c, tuple(edge), tuple(node), k, cls_only) == []
    check_against_oracle(shape, torch.float32, cls_only, "triton", rel=1e-4, device=device)
    x, c, edge, node, k = make_inputs((1, limit + 2, 6, 3, limit + 2), dtype=torch.float32)
    assert hg._kernel_check(x, c, tuple(edge), tuple(node), k, cls_only) == [
        f"topk={k} ({limit + 1} slots a row at N={limit + 2}) is over the kernels' limit of {limit}"]


def test_the_cuda_check_names_the_shared_memory_limit_and_a_build_without_ops(monkeypatch):
    """The cuda backend's own reasons, on a fake CUDA tensor (only its device and shape are read)
    and a faked device: the top-k kernel's shared memory over the device's per-block limit, the
    kernels' common limits, and an extension that loaded without registering its torch ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 19, 64, device="cuda:0")  # N = 17 + 2: topk = 17 fails on its limit only
    need = hg._cuda_topk_shared_bytes(64)
    device = types.SimpleNamespace(shared_memory_per_block_optin=need)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: asked.append(index) or device)
    monkeypatch.setattr(hg._dispatch, "_SHARED_LIMITS", {})
    with_ops = types.SimpleNamespace(hg_gather_sum=object())
    monkeypatch.setattr(torch.ops, "ace_kernels", with_ops)
    monkeypatch.setattr(hg._dispatch, "_extension", lambda: (types.SimpleNamespace(), None))
    assert hg._cuda_check(x, None, None, None, 3, False) == []  # exactly at the limit
    assert hg._cuda_check(x, None, None, None, 3, False) == [] and asked == [0]  # read once per device
    device.shared_memory_per_block_optin = need - 1
    monkeypatch.setattr(hg._dispatch, "_SHARED_LIMITS", {})
    assert hg._cuda_check(x, None, None, None, 3, False) == [
        f"D=64 needs {need} bytes of shared memory in the CUDA top-k kernel, over this device's {need - 1} per "
        "block (the Triton kernels tile D)"]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace())  # does not say
    monkeypatch.setattr(hg._dispatch, "_SHARED_LIMITS", {})
    assert hg._cuda_check(x, None, None, None, 3, False) == []
    assert hg._cuda_check(x, None, None, None, 17, False) == ["topk=17 is over the kernels' limit of 16"]
    monkeypatch.setattr(torch.ops, "ace_kernels", types.SimpleNamespace())
    reasons = hg._cuda_check(x, None, None, None, 3, False)
    assert len(reasons) == 1 and reasons[0].startswith("ace_kernels._C was built without its torch ops")
    monkeypatch.setattr(hg._dispatch, "_extension", lambda: (None, "not built"))  # the machine's reason says it
    assert hg._cuda_check(x, None, None, None, 3, False) == []


def test_the_triton_check_names_a_gpu_with_too_little_shared_memory(monkeypatch):
    """The Triton backend declines a GPU whose blocks get less shared memory than its launch configurations
    need (GPU_SHARED_BYTES), saying so, and takes one that gives exactly that (a fake CUDA tensor, a faked
    device limit, the interpreter off as on a GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 9, 64, device="cuda:0")
    monkeypatch.setattr(hg._dispatch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(hg._dispatch, "_SHARED_LIMITS", {0: hg.GPU_SHARED_BYTES})
    assert hg._triton_check(x, None, None, None, 3, False) == []
    monkeypatch.setattr(hg._dispatch, "_SHARED_LIMITS", {0: hg.GPU_SHARED_BYTES - 1})
    assert hg._triton_check(x, None, None, None, 3, False) == [
        f"the Triton kernels' launch configuration needs {hg.GPU_SHARED_BYTES} bytes of shared memory per block, "
        f"cuda:0 allows {hg.GPU_SHARED_BYTES - 1} (shared_memory_per_block_optin)"]


def test_explicit_cuda_backend_without_gpu_says_why():
    if "cuda" in ace_kernels.available_backends():
        pytest.skip("the CUDA backend can run here")
    x, c, edge, node, k = _good()
    with pytest.raises(RuntimeError, match="cuda"):
        _call(x, c, tuple(edge), tuple(node), k, backend="cuda")


def test_auto_tries_the_documented_order_for_the_variant_it_computes(monkeypatch):
    """auto prefers triton, then cuda, then torch (ace_hypergraph's docstring), and each call asks the
    dispatcher for the measured order of the output it computes: cls_only and the full output run different
    kernels, and the other variant's order would pick the other's fastest backend on a measured GPU."""
    assert hg._dispatch.preference(hg.OP_NAME) == ("triton", "cuda", "torch")
    asked = []
    select = hg._dispatch.select
    monkeypatch.setattr(hg._dispatch, "select", lambda *args, **kwargs: asked.append(kwargs["variant"]) or select(
        *args, **kwargs))
    x, c, edge, node, k = _good()
    for cls_only in (True, False):
        _call(x, c, tuple(edge), tuple(node), k, cls_only=cls_only)
    assert asked == ["cls_only", "full"]


# ---------------------------------------------------------------------------- Triton kernels

TRITON_SHAPES = {
    "n7_d40": SHAPES["n7_d40"],
    "topk1_b3": SHAPES["topk1"],
    "topk16": SHAPES["topk16"],
    # Two similarity tiles (M = 40 > BLOCK_M = 32) and two D chunks (70 > 64) under the interpreter.
    "two_tiles": (1, 41, 70, 5, 5),
    # D = 150 > BLOCK_D = 128 and k = 9: a second D block in the edge, gather and scatter
    # kernels and a second pass of the D loops of the coefficient and entry-dot kernels.
    "wide_d_k9": (2, 12, 150, 6, 9),
    # Odd N, D and H: masked tails in every D and hidden loop.
    "odd_d33": (2, 9, 33, 7, 4),
    "hidden1": SHAPES["hidden1"],
}


@pytest.mark.triton
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("shape", list(TRITON_SHAPES.values()), ids=list(TRITON_SHAPES))
def test_triton_float32_matches_oracle(shape, cls_only, device):
    if device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    # float32 kernels (ieee dot, float32 accumulation) vs float64: ~1e-6 of scale; 1e-4 margin.
    check_against_oracle(shape, torch.float32, cls_only, "triton", rel=1e-4, device=device)


# The edge cases below, on each backend with kernels: Triton (under the interpreter on CPU) and
# the CUDA extension (on a GPU).
KERNEL_BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), pytest.param("cuda", marks=pytest.mark.gpu)]


def _needs_kernels(backend, device):
    if backend == "triton" and device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    if backend == "cuda" and "cuda" not in ace_kernels.available_backends():
        pytest.skip(f"cuda backend unavailable: {ace_kernels.available_backends(reasons=True)['cuda']}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_all_equal_features_ties(backend, device):
    """The torch backend's ties case on the kernels (float32 kernels against float64)."""
    _needs_kernels(backend, device)
    check_all_equal_features_ties(backend, torch.float32, 1e-4, device)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_keep_the_lowest_indices_among_ties(backend, device):
    """The kernels' top-k keeps, of several equal scores at the k-th place, the lowest column
    indices (as the docstring of ace_hypergraph says), also when a better score arrives in a later
    tile after the ties filled the list: the Triton kernel once evicted the lowest tied index then."""
    _needs_kernels(backend, device)
    topk_rows = hg._triton_topk_rows if backend == "triton" else hg._cuda_topk_rows
    gen = torch.Generator().manual_seed(5)
    for M, k in ((40, 2), (70, 5), (37, 3), (600, 16)):
        # Scores as raw dots (norms given as 1) with query 0 = (1, 0): the columns' first features,
        # small integers (exact in float32). Mostly 1 (ties) with some 0, and fewer than k better
        # ones scattered, so that better scores arrive after ties filled the list and the k-th place
        # falls among the ties.
        pn = torch.zeros(2, M, 2)
        pn[:, :, 0] = torch.randint(0, 4, (2, M), generator=gen).clamp(max=1).float()
        for b in range(2):
            better = torch.randperm(M - 1, generator=gen)[:k - 1] + 1
            pn[b, better, 0] = torch.randint(2, 5, (k - 1,), generator=gen).float()
        pn[:, :, 1] = 1.0
        pn[:, 0] = torch.tensor([1.0, 0.0])
        scores = (pn[:, :1] * pn).sum(-1)
        scores[:, 0] = float("-inf")
        rows = torch.zeros(2, 1, dtype=torch.int64, device=device)
        idx, _ = topk_rows(pn.to(device), torch.ones(2, M, device=device), rows, k)
        for b in range(2):
            row = scores[b].tolist()
            want = sorted(sorted(range(M), key=lambda j: (-row[j], j))[:k])
            assert sorted(idx[b, 0].tolist()) == want, (M, k, b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_select_as_torch_at_extreme_magnitudes(backend, device):
    """Tokens whose squared norm overflows float32 (|x| ~ 1e20) have cosine 0 with everything, and
    tokens far inside the eps clamp (|x| ~ 1e-24) are ranked by their true dots: the torch path
    normalises the query before the dot. The Triton kernel once multiplied the raw features first:
    inf * 0 gave NaN rows (ranked first), and underflowed dots tied every score at 0."""
    _needs_kernels(backend, device)
    topk_rows = hg._triton_topk_rows if backend == "triton" else hg._cuda_topk_rows
    gen = torch.Generator().manual_seed(11)
    B, M, D, k = 2, 12, 16, 3
    for scale, huge in ((1.0, (4, 9)), (1e-24, ())):
        pn = torch.randn(B, M, D, generator=gen)
        pn[..., 0] += 3.0  # every cosine between ordinary tokens positive, so 0 is never among the best
        pn *= scale
        for j in huge:
            pn[:, j] *= 1e20
        inv = 1.0 / torch.linalg.vector_norm(pn, dim=-1).clamp_min(1e-12)
        if huge:
            assert (inv[:, list(huge)] == 0).all()  # the case under test: their norms overflow
        want_idx, want_w = hg._torch_topk_rows(pn, inv, None, k)
        variants = [("inv_norm given", lambda: topk_rows(pn.to(device), inv.to(device), None, k))]
        if backend == "triton":
            rows = torch.arange(M).expand(B, M)
            variants.append(("norms in the kernel", lambda: hg._triton_cls_select(pn.to(device), rows.to(device), k)))
        for name, run in variants:
            idx, w = run()
            for b in range(B):
                for r in range(M):
                    got = sorted(idx[b, r].tolist())
                    if r in huge:
                        # Every score 0, a tie: the lowest k other columns.
                        assert got == [j for j in range(M) if j != r][:k], (scale, name, b, r)
                        torch.testing.assert_close(w[b, r].cpu(), torch.full((k,), 1.0 / k))
                        continue
                    assert got == sorted(want_idx[b, r].tolist()), (scale, name, b, r)
                    order = idx[b, r].cpu().argsort()
                    want_order = want_idx[b, r].argsort()
                    torch.testing.assert_close(w[b, r].cpu()[order], want_w[b, r][want_order].float())


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_numpy_integer_topk_gives_the_int_result(backend, device):
    """topk (and the module's dim, hidden, topk) may be NumPy integers: each is taken as the int it
    holds (a numpy.int64 reached the Triton full-output kernel as a constexpr and failed there)."""
    import numpy as np

    if backend == "triton" and device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    x, c, edge, node, k = make_inputs(SHAPES["n7_d40"], dtype=torch.float32, device=device)
    for cls_only in (False, True):
        want = ace_kernels.ace_hypergraph(x, c, edge, node, topk=k, cls_only=cls_only, backend=backend)
        for np_k in (np.int64(k), np.int32(k)):
            got = ace_kernels.ace_hypergraph(x, c, edge, node, topk=np_k, cls_only=cls_only, backend=backend)
            assert torch.equal(got, want), (cls_only, type(np_k))
    module = ace_kernels.ACEHypergraph(dim=np.int64(40), hidden=np.int32(6), topk=np.int64(k))
    assert [type(v) for v in (module.dim, module.hidden, module.topk)] == [int, int, int]
    module.to(device)(x, c, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_non_contiguous_and_zero_norm(backend, device):
    _needs_kernels(backend, device)
    B, N, D, H, k = 2, 7, 20, 4, 5  # N = k + 2: the zero token's tied row has one possible selection
    x, c, edge, node, _ = make_inputs((B, N, D, H, k), dtype=torch.float32, seed=7, device=device)
    x[:, 3] = 0.0
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)
    c_nc = torch.stack([c, c], dim=-1)[..., 1]
    for cls_only in (False, True):
        out, grads = ours_run(x_nc, c_nc, edge, node, k, cls_only, backend)
        ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only)
        assert_close_scaled(out, ref_out, 1e-4, "output")  # float32 vs float64
        assert_grad_x_close(grads[0], ref_grads[0], x.norm(dim=-1) == 0, 1e-4, "grad x")
        for name, got, want in list(zip(PARAM_NAMES, grads, ref_grads, strict=True))[1:]:
            assert_close_scaled(got, want, 1e-4, f"grad {name}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf inside the interpreter
@pytest.mark.parametrize("where", ["x", "cls_attn"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_non_finite_inputs_do_not_crash(backend, where, device):
    _needs_kernels(backend, device)
    x, c, edge, node, k = make_inputs(SHAPES["n7_d40"], dtype=torch.float32, device=device)
    if where == "x":
        x[0, 3, 1] = float("nan")
    else:
        c[0, 1] = float("nan")
    for cls_only in (False, True):
        out, grads = ours_run(x, c, edge, node, k, cls_only, backend)
        # Sample 0 holds the NaN: ranked first, it reaches token 0; sample 1 is untouched.
        assert torch.isnan(out[0]).any()
        assert torch.isfinite(out[1]).all()


@TINY_TOKEN_CASES
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_tokens_under_the_norm_clamp(backend, cls_only, tiny_is_query, device):
    """The torch backend's tiny-token case on the kernels (the fused cls_only backward computes
    the norms' terms itself, and zeroes them under the clamp)."""
    _needs_kernels(backend, device)
    check_tokens_under_the_norm_clamp(backend, torch.float32, cls_only, tiny_is_query, 1e-4, device)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf inside the interpreter
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_rank_a_nan_score_first(backend, device):
    """A NaN similarity ranks above every number, as in torch.topk: every row selects the NaN
    token, and the softmax of a selection holding a NaN is NaN in every slot (torch.softmax's);
    the other sample's rows are those of the torch top-k. Both kernel paths: norms given, and
    computed in the kernel (the fused cls_only selection)."""
    _needs_kernels(backend, device)
    topk_rows = hg._triton_topk_rows if backend == "triton" else hg._cuda_topk_rows
    gen = torch.Generator().manual_seed(17)
    B, M, D, k = 2, 40, 12, 3  # two similarity tiles under the interpreter
    pn = torch.randn(B, M, D, generator=gen)
    nan_at = 23  # in the second tile
    pn[0, nan_at, 5] = float("nan")
    inv = 1.0 / torch.linalg.vector_norm(pn, dim=-1).clamp_min(1e-12)
    want_idx, want_w = hg._torch_topk_rows(pn, inv, None, k)
    rows = torch.arange(M).expand(B, M)
    variants = [("inv_norm given", lambda: topk_rows(pn.to(device), inv.to(device), None, k))]
    if backend == "triton":
        variants.append(("norms in the kernel", lambda: hg._triton_cls_select(pn.to(device), rows.to(device), k)))
    for name, run in variants:
        idx, w = (t.cpu() for t in run())
        for r in range(M):
            assert torch.isnan(w[0, r]).all(), (name, r)
            if r != nan_at:  # the NaN token's own row: every score NaN, a tie
                assert nan_at in idx[0, r].tolist(), (name, r)
                assert sorted(idx[0, r].tolist()) == sorted(want_idx[0, r].tolist()), (name, r)
        assert torch.equal(idx[1].sort(-1).values, want_idx[1].sort(-1).values), name
        torch.testing.assert_close(w[1].sort(-1).values, want_w[1].sort(-1).values)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_keep_a_non_finite_cls_token_out_of_rows_that_do_not_read_it(backend, device):
    """The kernels skip structurally empty slots (column -1): an inf in the CLS token reaches
    exactly the output rows j with A[i, j] != 0 for some row i with A[i, 0] != 0 (the dense
    reference's non-zero pattern); every other row stays finite. Token 0 takes no part in the
    patches' selection, so that pattern is the one of the finite input."""
    _needs_kernels(backend, device)
    B, N, D, H, k = 2, 16, 12, 4, 2
    x, c, edge, node, _ = make_inputs((B, N, D, H, k), dtype=torch.float32, seed=19)
    reads_x0 = []
    for b in range(B):
        a = oracle_incidence(x[b].double(), c[b].double(), k) != 0
        reads_x0.append((a & a[:, :1]).any(0))  # C[j] sums A[i, j] E'[i]; E[i] reads x_0 iff A[i, 0] != 0
    reads_x0 = torch.stack(reads_x0)
    assert reads_x0.any(1).all() and (~reads_x0).any(1).all()  # both kinds of rows in each sample
    x[:, 0] = float("inf")
    out = ace_kernels.ace_hypergraph(x.to(device), c.to(device), tuple(p.to(device) for p in edge),
                                     tuple(p.to(device) for p in node), topk=k, backend=backend).cpu()
    assert torch.equal(torch.isfinite(out).all(-1), ~reads_x0)


def _non_finite_kind(t):
    """0 finite, 1 NaN, 2 +inf, 3 -inf, per element."""
    kind = torch.zeros(t.shape, dtype=torch.int8)
    kind[torch.isnan(t)], kind[torch.isposinf(t)], kind[torch.isneginf(t)] = 1, 2, 3
    return kind


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf - inf inside the interpreter
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_triton_cls_only_empty_slots_do_not_read_the_cls_token(value, device):
    """At N = topk + 1 each selected patch's neighbour list has an empty slot (-1, weight 0). The
    fused cls_only kernels read the CLS token's row for it: with a non-finite x_0, the coefficient
    kernel's sum over the slots took 0 * (G_t . x_0) = NaN, so every patch row of dx was NaN where
    the torch backend's gradient is finite (the output is NaN, but its backward to the patches
    runs through linear maps and the selection weights, which never meet x_0's value), and the
    edges kernel's 0 * inf made edges NaN where torch's are inf. Every output and gradient must be
    NaN, inf and finite where the torch backend's are, and close where finite."""
    if device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    x, c, edge, node, k = make_inputs((2, 6, 20, 4, 5), dtype=torch.float32, seed=3)
    x[0, 0, 2] = float(value)
    ref_out, ref_grads = ours_run(x, c, edge, node, k, True, "torch")
    out, grads = ours_run(*(t.to(device) if isinstance(t, torch.Tensor) else [p.to(device) for p in t]
                            for t in (x, c, edge, node)), k, True, "triton")
    assert torch.isfinite(ref_grads[0][0, 1:]).all()  # the patches' gradient in the sample holding x_0
    for name, got, want in zip(("output", *PARAM_NAMES), (out, *grads), (ref_out, *ref_grads), strict=True):
        got = got.cpu()
        assert torch.equal(_non_finite_kind(got), _non_finite_kind(want)), name
        both = torch.isfinite(want)
        torch.testing.assert_close(got[both], want[both], rtol=1e-4, atol=1e-5, msg=name)

def test_the_transposed_incidence_lists_each_column_in_order_and_empty_slots_last():
    """_transpose_csr (the deterministic scatter's plan): column r's entries are those whose slot
    names r, in increasing entry order (a fixed summation order, the same on every backend), and
    the empty slots (-1) come after every column, under none."""
    gen = torch.Generator().manual_seed(2)
    B, Q, S, R = 3, 11, 4, 7
    cols = torch.randint(-1, R, (B, Q, S), generator=gen)
    row_ptr, perm = hg._transpose_csr(cols, R)
    flat = cols.reshape(B, Q * S)
    for b in range(B):
        assert row_ptr[b, 0] == 0 and row_ptr[b, -1] == int((flat[b] >= 0).sum())
        for r in range(R):
            entries = perm[b, row_ptr[b, r]:row_ptr[b, r + 1]]
            assert torch.equal(entries, torch.nonzero(flat[b] == r).flatten()), (b, r)
        assert torch.equal(perm[b, row_ptr[b, -1]:], torch.nonzero(flat[b] < 0).flatten())


def _incidence_with_empty_slots(B=2, Q=9, R=6, S=4, D=5, seed=4):
    """cols [B, Q, S] with empty slots (-1, weight 0, as _hypergraph_impl builds them), one row
    of sample 1 with only empty slots; integer-valued float64 features and weights, so that every
    sum is exact in any order and the two forms of a primitive can be compared bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    cols = torch.randint(-1, R, (B, Q, S), generator=gen)
    cols[1, 4] = -1
    weights = torch.randint(-4, 5, (B, Q, S), generator=gen).double() * (cols >= 0)
    src_q = torch.randint(-8, 9, (B, Q, D), generator=gen).double()
    src_r = torch.randint(-8, 9, (B, R, D), generator=gen).double()
    assert (cols < 0).any() and (cols == 0).any()
    return cols, weights, src_q, src_r


def test_torch_primitives_by_slot_equal_the_sparse_form():
    """The torch backend's gather and scatter on a GPU (slot by slot) against their CPU form
    (one sparse CSR product), run here on CPU tensors: the same sums, empty slots included."""
    cols, w, src_q, src_r = _incidence_with_empty_slots()
    R = src_r.shape[1]
    gathered = hg._gather_sum_by_slot(src_r, cols, w)
    assert torch.equal(gathered, hg._gather_sum_sparse(src_r, cols, w))
    assert torch.equal(gathered, hg._torch_gather_sum(src_r, cols, w))  # the CPU dispatch: the sparse form
    scattered = hg._scatter_sum_by_slot(src_q, cols, w, R)
    assert torch.equal(scattered, hg._scatter_sum_sparse(src_q, cols, w, R))
    assert torch.equal(scattered, hg._scatter_sum_sparse(src_q, cols, w, R, hg._transpose_csr(cols, R)))
    # And both against the sums written out.
    want_g, want_s = torch.zeros_like(gathered), torch.zeros_like(scattered)
    for b, q, slot in zip(*torch.nonzero(cols >= 0, as_tuple=True), strict=True):
        want_g[b, q] += w[b, q, slot] * src_r[b, cols[b, q, slot]]
        want_s[b, cols[b, q, slot]] += w[b, q, slot] * src_q[b, q]
    assert torch.equal(gathered, want_g) and torch.equal(scattered, want_s)


def test_the_by_slot_scatter_adds_nothing_from_an_empty_slot():
    """An empty slot's row holding inf adds nothing anywhere (as in the sparse form and the
    kernels): the slot-by-slot scatter once added 0 * inf = NaN to row 0 of its sample, where
    the clamped column -1 points, so the torch backend's full output on a GPU differed."""
    cols, w, src_q, _ = _incidence_with_empty_slots()
    R = 6
    src_q[1, 4] = float("inf")  # its slots are all empty
    got = hg._scatter_sum_by_slot(src_q, cols, w, R)
    assert torch.isfinite(got).all()
    assert torch.equal(got, hg._scatter_sum_sparse(src_q, cols, w, R))


def test_torch_backend_on_cpu_tensors_ignores_the_default_device():
    """CPU inputs under another default device (torch.set_default_device("cuda"); the meta device
    stands in for it here): the full output's sparse CSR products built their row pointers and
    entry indices with torch.arange on the default device, mixing it with the CPU operands."""
    x, cls_attn, edge, node, k = make_inputs(SHAPES["n7_d40"], torch.float32)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def run():
        inputs = leaves([x, cls_attn, *edge, *node])
        out = ace_kernels.ace_hypergraph(inputs[0], inputs[1], inputs[2:6], inputs[6:10], topk=k, backend="torch")
        return [out, *torch.autograd.grad((out * g).sum(), inputs)]

    want = run()
    with torch.device("meta"):
        got = run()
    for name, a, b in zip(("out",) + PARAM_NAMES, got, want, strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b), name


@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
def test_torch_backend_in_its_gpu_form_matches_oracle(cls_only):
    """The whole op over the primitives the torch backend takes on a GPU (slot-by-slot gather and
    scatter, no prepared transpose), run on CPU tensors against the fp64 oracle."""
    by_slot = hg._Primitives("torch-by-slot", hg._torch_topk_rows, hg._gather_sum_by_slot,
                             lambda src, cols, w, n, transpose=None: hg._scatter_sum_by_slot(src, cols, w, n),
                             hg._torch_entry_dot)
    for shape in (SHAPES["n7_d40"], SHAPES["topk1"]):
        x, c, edge, node, k = make_inputs(shape)
        out, grads = run_with_grads(lambda x_, c_, e_, n_: hg._hypergraph_impl(x_, c_, tuple(e_), tuple(n_), k,
                                                                              cls_only, by_slot), x, c, edge, node)
        ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only)
        assert_close_scaled(out, ref_out, 1e-10, "output")
        for name, got, want in zip(PARAM_NAMES, grads, ref_grads, strict=True):
            assert_close_scaled(got, want, 1e-10, f"grad {name}")


# ---------------------------------------------------------------------------- short sequences

# (B, N, D, hidden, topk) with N < topk + 2 (and N = 3, topk = 1): a patch row has N - 2 finite
# scores and the CLS row N - 1, fewer than topk, so the reference's torch.topk also keeps -inf
# entries, which weigh 0; ours keep min(topk, N - 1) slots per row, and a patch row's last one
# is empty (column -1, weight 0). N = topk + 1, N = topk, and N = 3.
SHORT_SHAPES = {
    "n3_topk1": (3, 3, 11, 3, 1),
    "n3_topk2": (2, 3, 11, 3, 2),
    "n3_topk3": (2, 3, 11, 3, 3),
    "n5_topk4": (2, 5, 11, 3, 4),
    "n4_topk4": (2, 4, 11, 3, 4),
    "n6_topk5": (2, 6, 11, 3, 5),
    "n5_topk5": (2, 5, 11, 3, 5),
}


def _torch_by_slot_primitives():
    """The torch primitives in the form the torch backend takes on a GPU (slot by slot)."""
    return hg._Primitives("torch-by-slot", hg._torch_topk_rows, hg._gather_sum_by_slot,
                          lambda src, cols, w, n, transpose=None: hg._scatter_sum_by_slot(src, cols, w, n),
                          hg._torch_entry_dot)


def test_the_oracle_keeps_every_finite_score_of_a_short_row():
    """The oracle follows the reference where a row has fewer finite scores than topk (N = topk):
    torch.topk keeps the -inf ones too, with weight 0, so row 0 of A is [1, softmax(c)] and patch
    row i the softmax of its cosines with the other patches, 1 on the diagonal and A[0, i] in
    column 0."""
    B, N, _, _, k = SHORT_SHAPES["n5_topk5"]
    x, c, _, _, _ = make_inputs(SHORT_SHAPES["n5_topk5"])
    for b in range(B):
        cosine = torch.nn.functional.normalize(x[b, 1:], dim=-1) @ torch.nn.functional.normalize(x[b, 1:], dim=-1).T
        want = torch.eye(N, dtype=torch.float64)
        want[0, 1:] = torch.softmax(c[b], 0)
        for i in range(1, N):
            others = [j for j in range(1, N) if j != i]
            want[i, others] = torch.softmax(cosine[i - 1, [j - 1 for j in others]], 0)
            want[i, 0] = want[0, i]
        torch.testing.assert_close(oracle_incidence(x[b], c[b], k), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("shape", list(SHORT_SHAPES.values()), ids=list(SHORT_SHAPES))
def test_torch_short_sequences_match_oracle(shape, cls_only):
    # float64 rounding only, as test_torch_float64_matches_oracle.
    check_against_oracle(shape, torch.float64, cls_only, "torch", rel=1e-10)


@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
def test_short_sequences_over_the_torch_primitives_match_oracle(cls_only):
    """The shared implementation over the torch primitives in their CPU (sparse) and GPU
    (by-slot) forms, on every short shape: the empty slots pass through every gather, scatter and
    entry dot and the incidence weights' backward (cls_only: the path the CUDA backend takes)."""
    for prims in (hg.TORCH_PRIMITIVES, _torch_by_slot_primitives()):
        for name, shape in SHORT_SHAPES.items():
            x, c, edge, node, k = make_inputs(shape)
            out, grads = run_with_grads(lambda x_, c_, e_, n_: hg._hypergraph_impl(  # noqa: B023 (called here)
                x_, c_, tuple(e_), tuple(n_), k, cls_only, prims), x, c, edge, node)
            ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only)
            assert_close_scaled(out, ref_out, 1e-10, f"{prims.name} {name}: output")
            for param, got, want in zip(PARAM_NAMES, grads, ref_grads, strict=True):
                assert_close_scaled(got, want, 1e-10, f"{prims.name} {name}: grad {param}")


@pytest.mark.triton
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("shape", list(SHORT_SHAPES.values()), ids=list(SHORT_SHAPES))
def test_triton_short_sequences_match_oracle(shape, cls_only, device):
    """The Triton backend: the primitives (full output) and the fused cls_only kernels, whose
    neighbour rows have an empty slot here."""
    if device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    # As test_triton_float32_matches_oracle: ~1e-6 of scale; 1e-4 margin.
    check_against_oracle(shape, torch.float32, cls_only, "triton", rel=1e-4, device=device)


@pytest.mark.triton
@pytest.mark.parametrize("shape", ["n3_topk3", "n5_topk4", "n5_topk5"])
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
def test_triton_atomic_and_unfused_short_sequences_match_oracle(cls_only, shape, device):
    """The Triton primitives' other users on short shapes (N = topk and topk + 1):
    deterministic=False (atomic scatter, full output) and cls_only through the shared
    implementation (not the fused kernels)."""
    if device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    prims = hg.TRITON_PRIMITIVES if cls_only else hg.TRITON_ATOMIC_PRIMITIVES
    x, c, edge, node, k = make_inputs(SHORT_SHAPES[shape], dtype=torch.float32, device=device)
    out, grads = run_with_grads(lambda x_, c_, e_, n_: hg._hypergraph_impl(x_, c_, tuple(e_), tuple(n_), k, cls_only,
                                                                          prims), x, c, edge, node)
    ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only)
    assert_close_scaled(out, ref_out, 1e-4, "output")
    for name, got, want in zip(PARAM_NAMES, grads, ref_grads, strict=True):
        assert_close_scaled(got, want, 1e-4, f"grad {name}")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_a_short_rows_extra_slot_is_empty(backend, device):
    """topk = M (N = topk + 1): each patch row has M - 1 candidates, so its last slot is empty,
    column -1 and weight 0, from every selection (all rows, given rows, norms computed inline);
    the other slots hold the row's other patches."""
    if backend == "triton" and device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    B, M, D = 2, 5, 7
    patches = torch.randn(B, M, D, generator=torch.Generator().manual_seed(6)).to(device)
    inv_norm = 1.0 / patches.norm(dim=-1)
    rows = torch.tensor([[4, 0, 2], [1, 1, 3]], device=device)
    if backend == "torch":
        runs = {"all rows": hg._torch_topk_rows(patches, inv_norm, None, M),
                "given rows": hg._torch_topk_rows(patches, inv_norm, rows, M)}
    else:
        runs = {"all rows": hg._triton_topk_rows(patches, inv_norm, None, M),
                "given rows": hg._triton_topk_rows(patches, inv_norm, rows, M),
                "norms inline": hg._triton_cls_select(patches, rows, M)}
    for name, (idx, w) in runs.items():
        own = torch.arange(M, device=device).expand(B, M) if name == "all rows" else rows
        empty = idx == -1
        assert torch.equal(empty.sum(-1), torch.ones_like(own)), name
        assert torch.equal(w[empty], torch.zeros_like(w[empty])), name
        kept = idx.sort(-1).values[..., 1:]
        want = torch.stack([torch.stack([torch.tensor([j for j in range(M) if j != i]) for i in r])
                            for r in own.cpu().tolist()]).to(device)
        assert torch.equal(kept, want), name
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]))


# (B, N, D, hidden, topk) with N < 3: at N = 2 the one patch row has no candidate (its scores
# are the diagonal and column 0, both -inf), so the reference's softmax gives it NaN, which steps
# 4-5 overwrite (A = [[1, 1], [1, 1]]); at N = 1 A = [[1]]. The torch backend only.
TINY_SHAPES = {
    "n2_topk1": (3, 2, 11, 3, 1),
    "n2_topk2": (2, 2, 11, 3, 2),
    "n1_topk1": (2, 1, 11, 3, 1),
}


@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("shape", list(TINY_SHAPES.values()), ids=list(TINY_SHAPES))
def test_torch_one_and_two_tokens_match_oracle(shape, cls_only):
    """N = 2 and N = 1, where the reference is finite although a row's softmax is NaN before
    steps 4-5: the output and every gradient match the oracle's, finite, over the torch
    primitives in both forms (CPU sparse, GPU by-slot) and the cls_only path."""
    x, c, edge, node, k = make_inputs(shape)
    ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only)
    assert all(torch.isfinite(t).all() for t in (ref_out, *ref_grads))
    check_against_oracle(shape, torch.float64, cls_only, "torch", rel=1e-10)
    check_against_oracle(shape, torch.float32, cls_only, "torch", rel=1e-5)
    for prims in (hg.TORCH_PRIMITIVES, _torch_by_slot_primitives()):
        out, grads = run_with_grads(lambda x_, c_, e_, n_: hg._hypergraph_impl(  # noqa: B023 (called here)
            x_, c_, tuple(e_), tuple(n_), k, cls_only, prims), x, c, edge, node)
        assert_close_scaled(out, ref_out, 1e-10, f"{prims.name}: output")
        for param, got, want in zip(PARAM_NAMES, grads, ref_grads, strict=True):
            assert_close_scaled(got, want, 1e-10, f"{prims.name}: grad {param}")


def test_a_patch_row_with_no_candidate_weighs_nothing():
    """At N = 2 (one patch) the torch selection's slots are all empty: column -1, weight 0,
    never NaN, for all rows and for given rows."""
    patches = torch.randn(3, 1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    inv_norm = 1.0 / patches.norm(dim=-1)
    for rows in (None, torch.zeros(3, 1, dtype=torch.int64)):
        idx, w = hg._torch_topk_rows(patches, inv_norm, rows, 1)  # topk = 1 or 2 keeps min(topk, N - 1) = 1
        assert torch.equal(idx, torch.full((3, 1, 1), -1))
        assert torch.equal(w, torch.zeros(3, 1, 1, dtype=torch.float64))


def test_the_kernels_decline_fewer_than_three_tokens(device):
    """The Triton and CUDA kernels take N >= 3: their check names N < 3, an explicit kernel
    backend raises it, and auto runs the torch backend (same numbers)."""
    x, c, edge, node, k = make_inputs(TINY_SHAPES["n2_topk1"], dtype=torch.float32, device=device)
    reason = "N=2 tokens: a patch row with no other patch to select (N < 3) is handled by the torch backend only"
    assert hg._kernel_check(x, c, edge, node, k, False) == [reason]
    assert hg._kernel_check(x[:, :1], c[:, :0], edge, node, k, True) == [reason.replace("N=2", "N=1")]
    assert reason in hg._cuda_check(x, c, edge, node, k, False)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run this call: N=2 tokens"):
        _call(x, c, tuple(edge), tuple(node), k, backend="triton")
    for cls_only in (False, True):
        torch.testing.assert_close(_call(x, c, tuple(edge), tuple(node), k, cls_only=cls_only),
                                   _call(x, c, tuple(edge), tuple(node), k, cls_only=cls_only, backend="torch"),
                                   rtol=0, atol=0)


# ---------------------------------------------------------------------------- an empty batch (B = 0)

def _reference_run_of_an_empty_batch(x, c, edge, node, k, cls_only, frozen=()):
    """The output and the gradients (None where a tensor takes none) of tests/reference_modules.py's dense
    ACE-HGNN, in float64 on the CPU, for copies of ``x`` and ``c`` (each requiring grad as it does); the adapters
    named in ``frozen`` ("edge", "node") do not require grad. The oracle stacks its per-sample outputs, which needs
    a sample; at B = 0 no value reaches the output, so the reference's own adapter parameters (of ``edge``'s and
    ``node``'s shapes, on the CPU, where a CUDA input would meet them in one op) serve."""
    from reference_modules import ReferenceACELoss

    x, c = (t.detach().cpu().double().requires_grad_(t.requires_grad) for t in (x, c))
    ref = ReferenceACELoss(x.shape[-1], hidden=edge[0].shape[0], topk=k).double()
    params = []
    for name, adapter in (("edge", ref.img_edge_adapter), ("node", ref.img_node_adapter)):
        adapter.requires_grad_(name not in frozen)
        params += [adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias]
    out = ref.apply_ace_hgat(x, c)
    out = out[:, 0] if cls_only else out
    inputs = [x, c, *params]
    wanted = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(out.sum(), wanted))
    return out, [next(grads) if t.requires_grad else None for t in inputs]


def _fail_if_called(monkeypatch):
    """Make every backend's computation (the kernels' launchers sit below these) raise if it is entered."""
    for name in ("_hypergraph_impl", "_torch_full_output", "_cls_only_torch", "_cls_only_fused"):
        monkeypatch.setattr(hg, name, lambda *args, _name=name: pytest.fail(f"{_name} ran for an empty batch"))


EMPTY_BATCH_CASES = [pytest.param("torch", torch.float64, id="torch-float64"),
                     pytest.param("torch", torch.float32, id="torch-float32"),
                     pytest.param("triton", torch.float32, marks=pytest.mark.triton, id="triton-float32"),
                     pytest.param("triton", torch.float16, marks=pytest.mark.triton, id="triton-float16"),
                     pytest.param("cuda", torch.float32, marks=pytest.mark.gpu, id="cuda-float32")]


@pytest.mark.parametrize("deterministic", [True, pytest.param(False, marks=NOT_POISONED)])
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("backend, dtype", EMPTY_BATCH_CASES)
def test_an_empty_batch_gives_an_empty_output_and_the_references_gradients(backend, dtype, cls_only, deterministic,
                                                                           monkeypatch, device):
    """B = 0 (x [0, N, D], cls_attn [0, N - 1]), as torch ops take it: an empty output of x's dtype and
    device, empty gradients of x and cls_attn and a zero gradient of each adapter parameter, in its dtype,
    as the reference's (an all-zero tensor, not None); no backend computation runs (no kernel launched on
    a grid with no block, nor compiled for it)."""
    if backend != "torch":
        _needs_kernels(backend, device)
    x, c, edge, node, k = make_inputs((0, 7, 40, 6, 3), dtype=dtype, device=device)
    ref_out, ref_grads = _reference_run_of_an_empty_batch(*leaves([x, c]), edge, node, k, cls_only)
    _fail_if_called(monkeypatch)
    out, grads = ours_run(x, c, edge, node, k, cls_only, backend, deterministic)
    assert (out.shape, out.dtype, out.device) == (ref_out.shape, dtype, x.device)
    for name, got, want in zip(PARAM_NAMES, grads, ref_grads, strict=True):
        assert (got.shape, got.dtype, got.device) == (want.shape, dtype, x.device), name
        assert torch.equal(got.cpu().double(), want), name
        assert name in ("x", "cls_attn") or (got.numel() > 0 and not got.any()), name


@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_the_module_trains_on_an_empty_batch_as_the_reference(backend, cls_only, monkeypatch, device):
    """ACEHypergraph with its edge adapter frozen, on B = 0, float32: after backward() the node adapter's
    parameters hold zero gradients, the frozen ones None, x an empty gradient and cls_attn (which requires
    no grad) None, each as the reference module's."""
    if backend != "torch":
        _needs_kernels(backend, device)
    torch.manual_seed(0)
    module = ace_kernels.ACEHypergraph(dim=40, hidden=6, topk=3).to(device)
    module.edge_adapter.requires_grad_(False)
    x = torch.randn(0, 7, 40, device=device, requires_grad=True)
    c = torch.randn(0, 6, device=device)
    adapters = (module.edge_adapter, module.node_adapter)
    params = [t for a in adapters for t in (a.down.weight, a.down.bias, a.up.weight, a.up.bias)]
    _, ref_grads = _reference_run_of_an_empty_batch(x, c, params[:4], params[4:], 3, cls_only, frozen=("edge",))
    _fail_if_called(monkeypatch)
    out = module(x, c, cls_only=cls_only, backend=backend)
    assert out.shape == ((0, 40) if cls_only else (0, 7, 40)) and out.dtype == torch.float32
    out.sum().backward()
    for name, got, want in zip(PARAM_NAMES, (x.grad, c.grad, *(p.grad for p in params)), ref_grads, strict=True):
        assert (got is None) == (want is None), name
        if want is not None:
            assert got.shape == want.shape and got.dtype == torch.float32 and torch.equal(got.cpu().double(), want)


@pytest.mark.parametrize("case, match", [
    ("x_no_tokens", r"argument 'x': expected a non-empty \[B, N, D\] tensor, got shape \[0, 0, 40\]"),
    ("x_no_features", r"argument 'x': expected a non-empty \[B, N, D\] tensor, got shape \[0, 7, 0\]"),
    ("x_dtype", r"argument 'x': expected dtype in \(float16, bfloat16, float32, float64\), got int32"),
    ("topk_zero", r"argument 'topk': expected an integer >= 1, got 0"),
    ("topk_too_large", r"argument 'topk': expected topk <= N .*got topk=8 with N=7"),
    ("cls_batch", r"argument 'cls_attn': expected shape \[0, 6\]"),
    ("cls_shape", r"argument 'cls_attn': expected shape \[0, 6\]"),
    ("cls_device", r"argument 'cls_attn': expected a tensor on cpu \(like 'x'\), got meta"),
    ("up_weight_rows", r"argument 'edge_adapter.up_weight': expected shape \[40, 6\]"),
    ("backend_name", r"argument 'backend'"),
])
def test_an_empty_batch_is_checked_as_any_other(case, match):
    """Every argument check holds at B = 0 with its message: N, D, topk, dtypes, shapes, devices."""
    x, c, edge, node, k = _good()
    x, c, kw = x[:0], c[:0], {}
    if case == "x_no_tokens":
        x, c = x[:, :0], c[:, :0]
    elif case == "x_no_features":  # D = 0, with adapters of width 0 to match
        x = x[..., :0]
        edge = [edge[0][:, :0], edge[1], edge[2][:0], edge[3][:0]]
        node = [node[0][:, :0], node[1], node[2][:0], node[3][:0]]
    elif case == "x_dtype":
        x = x.to(torch.int32)
    elif case == "topk_zero":
        k = 0
    elif case == "topk_too_large":
        k = 8
    elif case == "cls_batch":
        c = _good()[1]  # [2, 6] beside x [0, 7, 40]
    elif case == "cls_shape":
        c = c[:, 1:]
    elif case == "cls_device":
        c = c.to("meta")
    elif case == "up_weight_rows":
        edge[2] = edge[2][1:]
    elif case == "backend_name":
        kw["backend"] = "cudnn"
    with pytest.raises(ValueError, match=match):
        _call(x, c, tuple(edge), tuple(node), k, **kw)


def test_a_backend_that_cannot_run_an_empty_batch_says_why():
    """At B = 0 an explicit backend is checked as at B >= 1: the kernels refuse float64 and N < 3, and the
    cuda backend says why it cannot run on a machine without it."""
    x, c, edge, node, k = make_inputs((0, 7, 40, 6, 3))
    if "triton" in ace_kernels.available_backends():
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run this call: float64 inputs"):
            _call(x, c, tuple(edge), tuple(node), k, backend="triton")
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run this call: N=2 tokens"):
            _call(x[:, :2].float(), c[:, :1].float(), tuple(edge), tuple(node), 1, backend="triton")
    if "cuda" not in ace_kernels.available_backends():
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this call"):
            _call(x, c, tuple(edge), tuple(node), k, backend="cuda")


def _short_edge_cases(dtype, device="cpu"):
    """Inputs at N = topk (every row keeps all its finite scores) for the edge cases the short
    shapes do not reach: all tokens equal (every cosine 1, a tie in every row), zero-norm tokens
    (one of them patch 0, where a torch empty slot's clamped index points) and a zero CLS token,
    and a non-contiguous x. Each row keeps every candidate, so the selection is well defined."""
    B, N, D, H, k = SHORT_SHAPES["n5_topk5"]
    x, c, edge, node, _ = make_inputs((B, N, D, H, k), seed=21)
    ties = x[:, :1].expand(B, N, D).contiguous()
    zeros = x.clone()
    zeros[0, 1] = 0.0
    zeros[1, 3] = 0.0
    zeros[1, 0] = 0.0
    cases = {"ties": ties, "zero-norm": zeros, "non-contiguous": x.transpose(0, 1).contiguous().transpose(0, 1)}
    for name, xs in cases.items():
        yield (name, xs.to(dtype=dtype, device=device), c.to(dtype=dtype, device=device),
               [p.to(dtype=dtype, device=device) for p in edge], [p.to(dtype=dtype, device=device) for p in node], k)


def check_short_edge_cases(backend, dtype, rel, device="cpu"):
    for name, x, c, edge, node, k in _short_edge_cases(dtype, device):
        for cls_only in (False, True):
            out, grads = ours_run(x, c, edge, node, k, cls_only, backend)
            ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only)
            tag = f"{name}, cls_only={cls_only}"
            assert_close_scaled(out, ref_out, rel, f"{tag}: output")
            zero = x.double().norm(dim=-1).cpu() == 0
            if zero.any():
                assert_grad_x_close(grads[0].cpu(), ref_grads[0].cpu(), zero, rel, f"{tag}: grad x")
            else:
                assert_close_scaled(grads[0], ref_grads[0], rel, f"{tag}: grad x")
            for param, got, want in list(zip(PARAM_NAMES, grads, ref_grads, strict=True))[1:]:
                assert_close_scaled(got, want, rel, f"{tag}: grad {param}")


def test_torch_short_sequences_edge_cases_match_oracle():
    check_short_edge_cases("torch", torch.float64, 1e-10)


@pytest.mark.triton
def test_triton_short_sequences_edge_cases_match_oracle(device):
    """As the torch test, on the kernels (deterministic full output and the fused cls_only)."""
    if device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    check_short_edge_cases("triton", torch.float32, 1e-4, device)


@pytest.mark.triton
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
def test_triton_float16_short_sequences_match_oracle(cls_only, monkeypatch, device):
    """The native half path at N = topk + 1 and N = topk: the kernels read float16 x, the fused
    cls_only kernels included (their empty neighbour slot read from a float16 x)."""
    if device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    monkeypatch.setattr(hg, "_UPCAST_CHUNK_ELEMENTS", 1)
    for name in ("n5_topk4", "n5_topk5"):
        # As test_triton_float16_matches_oracle: 2^-9 of scale.
        check_against_oracle(SHORT_SHAPES[name], torch.float16, cls_only, "triton", rel=2 ** -9, device=device)


def test_the_cuda_backend_declines_short_sequences(monkeypatch):
    """N < topk + 2 is the CUDA kernels' own limit (its top-k refuses N = topk and keeps the own
    column in the slot N = topk + 1 leaves empty; untested): the cuda check names it, an explicit
    backend='cuda' raises it, and auto takes another backend. The machine's and the tensors'
    reasons are passed here (no GPU), so that the check itself decides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2, 6, 64, device="cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace())
    monkeypatch.setattr(hg._dispatch, "_SHARED_LIMITS", {})
    monkeypatch.setattr(torch.ops, "ace_kernels", types.SimpleNamespace(hg_gather_sum=object()))
    monkeypatch.setattr(hg._dispatch, "_extension", lambda: (types.SimpleNamespace(), None))
    reason = ("N=6 tokens < topk + 2 = 7: the CUDA kernels need N - 2 candidates per patch row (the Triton "
              "backend takes N >= max(3, topk), the torch backend N >= topk)")
    assert hg._cuda_check(fake, None, None, None, 5, False) == [reason]
    assert hg._cuda_check(fake, None, None, None, 4, False) == []
    global_reasons, device_reasons = hg._dispatch._global_reasons, hg._dispatch._device_reasons
    monkeypatch.setattr(hg._dispatch, "_global_reasons", lambda name: [] if name == "cuda" else global_reasons(name))
    monkeypatch.setattr(hg._dispatch, "_device_reasons",
                        lambda name, tensors: [] if name == "cuda" else device_reasons(name, tensors))
    x, c, edge, node, k = make_inputs(SHORT_SHAPES["n6_topk5"], dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run this call: N=6 tokens < topk \+ 2 = 7"):
        _call(x, c, tuple(edge), tuple(node), k, backend="cuda")
    args = (x, c, tuple(edge), tuple(node), k, False, True)
    assert hg._dispatch.select(hg.OP_NAME, "auto", [x], args, variant="full") is not hg._hypergraph_cuda
    torch.testing.assert_close(_call(x, c, tuple(edge), tuple(node), k), _call(x, c, tuple(edge), tuple(node), k,
                                                                               backend="torch"))


@pytest.mark.triton
def test_triton_primitives_match_torch(device):
    # The deterministic CSR scatter and the empty-slot convention, against the torch primitives.
    gen = torch.Generator().manual_seed(11)
    B, Q, R, S, D = 2, 9, 6, 4, 37
    src_q = torch.randn(B, Q, D, generator=gen).to(device)
    src_r = torch.randn(B, R, D, generator=gen).to(device)
    cols = torch.randint(-1, R, (B, Q, S), generator=gen).to(device)
    w = torch.randn(B, Q, S, generator=gen).to(device) * (cols >= 0)
    t, p = hg.TORCH_PRIMITIVES, hg.TRITON_PRIMITIVES
    torch.testing.assert_close(p.gather_sum(src_r, cols, w), t.gather_sum(src_r, cols, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.scatter_sum(src_q, cols, w, R), t.scatter_sum(src_q, cols, w, R),
                               rtol=1e-5, atol=1e-5)
    want = t.entry_dot(src_q, src_r, cols) * (cols >= 0)
    torch.testing.assert_close(p.entry_dot(src_q, src_r, cols), want, rtol=1e-5, atol=1e-5)
    # Deterministic: the same call gives bit-identical results.
    a = p.scatter_sum(src_q, cols, w, R)
    assert torch.equal(a, p.scatter_sum(src_q, cols, w, R))
    # The opt-in atomic scatter: same sums in another order (float32 rounding only).
    torch.testing.assert_close(hg.TRITON_ATOMIC_PRIMITIVES.scatter_sum(src_q, cols, w, R), a, rtol=1e-5, atol=1e-5)
    # float16 features are read as such and the results come back in float32, exactly those of
    # the float32 kernels on the upcast features (the same float32 arithmetic).
    h_q, h_r = src_q.half(), src_r.half()
    for got, want in ((p.gather_sum(h_r, cols, w), p.gather_sum(h_r.float(), cols, w)),
                      (p.scatter_sum(h_q, cols, w, R), p.scatter_sum(h_q.float(), cols, w, R)),
                      (p.entry_dot(h_q, h_r, cols), p.entry_dot(h_q.float(), h_r.float(), cols)),
                      (p.entry_dot(src_q, h_r, cols), p.entry_dot(src_q, h_r.float(), cols))):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    atomic = hg.TRITON_ATOMIC_PRIMITIVES.scatter_sum(h_q, cols, w, R)
    assert atomic.dtype == torch.float32
    torch.testing.assert_close(atomic, p.scatter_sum(h_q, cols, w, R), rtol=1e-5, atol=1e-5)  # order only
    # An empty slot adds nothing anywhere: a row of sample 1 with only empty slots holds inf, and
    # no scatter may carry 0 * inf into another row (column 0, or sample 0's last row). Against
    # the sums written out here, not the torch primitive (which shares the CSR transpose).
    cols_e, w_e, src_e = cols.clone(), w.clone(), src_q.clone()
    cols_e[1, 4], w_e[1, 4], src_e[1, 4] = -1, 0.0, float("inf")
    want = torch.zeros(B, R, D, device=device)
    for b, q, slot in zip(*torch.nonzero(cols_e >= 0, as_tuple=True), strict=True):
        want[b, cols_e[b, q, slot]] += w_e[b, q, slot] * src_e[b, q]
    for scatter in (p.scatter_sum, t.scatter_sum, hg.TRITON_ATOMIC_PRIMITIVES.scatter_sum):
        torch.testing.assert_close(scatter(src_e, cols_e, w_e, R), want, rtol=1e-5, atol=1e-5)
    # Top-k selection agrees with torch.topk on distinct values (two similarity tiles, own column
    # excluded); slot order is unspecified, so compare sorted sets and weights.
    feats = torch.randn(B, 40, 24, generator=gen).to(device)
    inv_norm = 1.0 / feats.norm(dim=-1)
    rows = torch.tensor([[3, 39, 0], [17, 5, 22]], device=device)
    for k, r in ((5, None), (16, rows)):
        idx, wts = p.topk_rows(feats, inv_norm, r, k)
        ref_idx, ref_w = t.topk_rows(feats, inv_norm, r, k)
        assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
        torch.testing.assert_close(wts.sort(-1).values, ref_w.sort(-1).values, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("shape", [TRITON_SHAPES["n7_d40"], TRITON_SHAPES["two_tiles"]], ids=["n7_d40", "two_tiles"])
def test_triton_float16_matches_oracle(shape, cls_only, monkeypatch, device):
    # The native half path: kernels read float16 x, torch upcasts per batch chunk (one sample
    # per chunk here, so the chunk loops run more than once).
    monkeypatch.setattr(hg, "_UPCAST_CHUNK_ELEMENTS", 1)
    # Inputs exact in float16, float32 compute, one float16 rounding (2^-11 relative) of the
    # output and of each gradient: 2^-9 of scale leaves 4x margin.
    check_against_oracle(shape, torch.float16, cls_only, "triton", rel=2 ** -9, device=device)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [TRITON_SHAPES["n7_d40"], TRITON_SHAPES["two_tiles"]], ids=["n7_d40", "two_tiles"])
def test_triton_float16_x_gradient_is_rounded_once(shape, device):
    """The full output's float16 x: the float32 gradients of every consumer of x (the norms, the
    similarities, the edge adapter's input) add up on its float32 route and are rounded to float16
    once (_Float32GradRoute), as the gradient of x.float() would be. So each element is within half a
    float16 ulp of the float32 sum, itself within ~1e-6 of scale of the fp64 oracle's. A route in
    float16 would round each consumer's part before the sum: about one ulp of the parts more, which
    test_triton_float16_matches_oracle's 2^-9 of scale leaves unseen."""
    if device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    x, c, edge, node, k = make_inputs(shape, dtype=torch.float16, device=device)
    _, grads = ours_run(x, c, edge, node, k, False, "triton")
    _, ref_grads = oracle_run(x, c, edge, node, k, False)
    got, want = grads[0].cpu().double(), ref_grads[0].cpu()
    ulp = torch.ldexp(torch.ones_like(got), torch.frexp(got).exponent - 11).clamp_min(2.0 ** -24)
    bound = 0.5 * ulp + 2e-5 * want.abs().max()
    assert ((got - want).abs() <= bound).all(), f"up to {((got - want).abs() / ulp).max().item():.2f} ulp"


@NOT_POISONED
@pytest.mark.triton
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("shape", [TRITON_SHAPES["n7_d40"], TRITON_SHAPES["two_tiles"]], ids=["n7_d40", "two_tiles"])
def test_triton_atomic_scatter_matches_oracle(shape, cls_only, monkeypatch, device):
    # deterministic=False must route every A^T scatter through the atomic kernel.
    calls = []

    def counted(*args):
        calls.append(1)
        return hg._triton_scatter_sum_atomic(*args)

    def refuse(*args):
        raise AssertionError("the deterministic CSR scatter ran with deterministic=False")

    monkeypatch.setattr(hg, "TRITON_ATOMIC_PRIMITIVES",
                        dataclasses.replace(hg.TRITON_ATOMIC_PRIMITIVES, scatter_sum=counted))
    monkeypatch.setattr(hg, "TRITON_PRIMITIVES", dataclasses.replace(hg.TRITON_PRIMITIVES, scatter_sum=refuse))
    # Atomics change only the order of float32 additions: same 1e-4 margin as the CSR kernels.
    check_against_oracle(shape, torch.float32, cls_only, "triton", rel=1e-4, deterministic=False, device=device)
    if cls_only:
        assert not calls  # the fused cls_only kernels have no scatter, deterministic or not
    else:
        assert len(calls) >= 2  # the forward C = A^T E' and the incidence weights' backward


@pytest.mark.triton
def test_triton_float16_norms_over_the_float16_range(device):
    """float16 tokens whose norm exceeds float16's largest value (65504) while every feature is
    finite: the norms are computed in float32 (as for x.float()), so their cosines, hence the
    neighbours chosen, are those of the float64 reference; a float16 norm would be inf and the
    token's cosines 0."""
    if device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    shape = (2, 9, 40, 6, 3)
    x, c, edge, node, k = make_inputs(shape, dtype=torch.float16, seed=23, device=device)
    x[:, 1:] = x[:, 1:].clamp(-3.5, 3.5) * 2.0 ** 14  # exact in float16; norms ~ 16384 sqrt(40) > 65504
    edge[0] = edge[0] * 2.0 ** -12  # keeps the output within float16's range
    assert (x.float().norm(dim=-1)[:, 1:] > 65504).all() and torch.isfinite(x).all()
    out, grads = ours_run(x, c, edge, node, k, False, "triton")
    ref_out, ref_grads = oracle_run(x, c, edge, node, k, False)
    assert_close_scaled(out, ref_out, 2 ** -9, "output")
    for name, got, want in zip(PARAM_NAMES, grads, ref_grads, strict=True):
        if name != "edge.down_weight":  # ~1e6 (it multiplies x): over float16's range, inf in both
            assert_close_scaled(got, want, 2 ** -9, f"grad {name}")


def _watch_scatters(monkeypatch, device) -> list:
    """The names of the primitive sets (TRITON_PRIMITIVES, TRITON_ATOMIC_PRIMITIVES) whose scatter
    runs, appended to the returned list at each call."""
    if device.type == "cpu" and not hg._dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    used = []
    for name in ("TRITON_PRIMITIVES", "TRITON_ATOMIC_PRIMITIVES"):
        prims = getattr(hg, name)
        monkeypatch.setattr(hg, name, dataclasses.replace(
            prims, scatter_sum=lambda *a, _name=name, _f=prims.scatter_sum: used.append(_name) or _f(*a)))
    return used


@NOT_POISONED
@pytest.mark.triton
def test_module_deterministic_default_and_override(monkeypatch, device):
    """ACEHypergraph(deterministic=False) makes the atomic scatter its forward's default, and
    forward(deterministic=...) overrides the module's setting either way."""
    used = _watch_scatters(monkeypatch, device)
    x, c, *_ = make_inputs(SHAPES["n7_d40"], dtype=torch.float32, device=device)
    for module_det, call_det, want in ((False, None, "TRITON_ATOMIC_PRIMITIVES"), (True, None, "TRITON_PRIMITIVES"),
                                       (False, True, "TRITON_PRIMITIVES"), (True, False, "TRITON_ATOMIC_PRIMITIVES")):
        torch.manual_seed(0)
        module = ace_kernels.ACEHypergraph(dim=40, hidden=6, topk=3, deterministic=module_det).to(device)
        used.clear()
        module(x, c, backend="triton", deterministic=call_det)
        assert used and set(used) == {want}, (module_det, call_det, used)


@NOT_POISONED
@pytest.mark.triton
@pytest.mark.parametrize("warn_only", [False, True], ids=["strict", "warn_only"])
def test_use_deterministic_algorithms_overrides_deterministic_false(warn_only, monkeypatch, device):
    """Under torch.use_deterministic_algorithms(True) (strict or warn_only) the triton backend's
    deterministic=False takes the deterministic CSR scatter, as torch's own ops with a deterministic
    path do: it ran the float atomics, whose summation order varies between runs on a GPU."""
    used = _watch_scatters(monkeypatch, device)
    # On a GPU the adapters' matmuls run in cuBLAS, which strict mode refused (RuntimeError) without this
    # setting in torch releases before that check was dropped (2.14 has none); read at each call.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    x, c, edge, node, k = make_inputs(SHAPES["n7_d40"], dtype=torch.float32, device=device)
    x = x.requires_grad_(True)
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        out = ace_kernels.ace_hypergraph(x, c, edge, node, topk=k, backend="triton", deterministic=False)
        out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)
    assert used and set(used) == {"TRITON_PRIMITIVES"}, used
    used.clear()
    ace_kernels.ace_hypergraph(x.detach(), c, edge, node, topk=k, backend="triton", deterministic=False)
    assert set(used) == {"TRITON_ATOMIC_PRIMITIVES"}  # the global setting off again: the caller's choice


@pytest.mark.triton
@pytest.mark.parametrize("deterministic", [True, pytest.param(False, marks=NOT_POISONED)])
def test_triton_cls_only_is_fused_and_reproducible(deterministic, monkeypatch, device):
    # cls_only on the triton backend runs _ClsEdges's four kernels, never the primitives, and is
    # bit-reproducible (no atomics) whatever `deterministic` says. N = k + 2 with k = 5: every
    # patch is some query's neighbour several times and a query itself, so the dx kernel's
    # merging of repeated destinations is exercised on every row.
    def refuse(*args):
        raise AssertionError("a hypergraph primitive ran on the fused cls_only path")

    for name in ("TRITON_PRIMITIVES", "TRITON_ATOMIC_PRIMITIVES"):
        prims = getattr(hg, name)
        monkeypatch.setattr(hg, name, dataclasses.replace(prims, topk_rows=refuse, gather_sum=refuse,
                                                          scatter_sum=refuse, entry_dot=refuse))
    shape = (3, 7, 20, 4, 5)
    x, c, edge, node, k = make_inputs(shape, dtype=torch.float32, seed=9, device=device)
    first = ours_run(x, c, edge, node, k, True, "triton", deterministic)
    again = ours_run(x, c, edge, node, k, True, "triton", deterministic)
    for a, b in zip([first[0], *first[1]], [again[0], *again[1]], strict=True):
        assert torch.equal(a, b)
    ref_out, ref_grads = oracle_run(x, c, edge, node, k, True)
    assert_close_scaled(first[0], ref_out, 1e-4, "output")
    for name, got, want in zip(PARAM_NAMES, first[1], ref_grads, strict=True):
        assert_close_scaled(got, want, 1e-4, f"grad {name}")


def _saved_and_created(fn, backward_created=None):
    """Run fn() (a forward) and its backward; return the tensors autograd saved (shape, dtype,
    storage bytes, storage pointer) and the float32 tensors created during the forward (and,
    into the list ``backward_created`` when given, those created during the backward)."""
    saved, created = [], []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.untyped_storage().nbytes(), t.untyped_storage().data_ptr()))
        return t

    class Created(TorchDispatchMode):
        def __init__(self, into):
            super().__init__()
            self.into = into

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.layout == torch.strided:
                    self.into.append((str(func), tuple(t.shape), t.untyped_storage().nbytes()))
            return out

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with Created(created):
            out = fn()
        with Created(backward_created if backward_created is not None else []):
            out.sum().backward()
    return saved, created


@pytest.mark.parametrize("trained", ["src", "weights"])
@pytest.mark.parametrize("function", ["gather", "scatter"])
def test_sparse_sums_keep_only_what_the_wanted_gradient_reads(function, trained):
    # src for the weights' gradient, the weights for src's: with frozen tokens (no gradient) and the adapters
    # trained, the full output's down projections ([B, N, H] twice) were kept for nothing.
    B, Q, R, D, k = 2, 4, 5, 3, 3
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(B, R if function == "gather" else Q, D, generator=gen, dtype=torch.float64)
    cols = torch.randint(0, R, (B, Q, k), generator=gen)
    weights = torch.randn(B, Q, k, generator=gen, dtype=torch.float64)
    src.requires_grad_(trained == "src")
    weights.requires_grad_(trained == "weights")
    prims = hg.TORCH_PRIMITIVES
    if function == "gather":
        saved, out = saved_storages(lambda: hg._GatherSum.apply(src, cols, weights, prims, None))
    else:
        transpose = prims.prepare_transpose(cols, R)
        saved, out = saved_storages(lambda: hg._ScatterSum.apply(src, cols, weights, R, prims, transpose))
    assert (src.untyped_storage().data_ptr() in saved) == (trained == "weights")
    assert (weights.untyped_storage().data_ptr() in saved) == (trained == "src")
    dense = torch.zeros(B, Q, R, dtype=torch.float64).scatter_add(2, cols, weights)  # A
    want = dense @ src if function == "gather" else dense.transpose(1, 2) @ src
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    leaf = src if trained == "src" else weights
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(torch.autograd.grad(out, leaf, g)[0], torch.autograd.grad(want, leaf, g)[0])


@pytest.mark.parametrize("function", ["native_linear", "linear_to_half"])
def test_half_linears_keep_their_input_for_the_weights_gradient_only(function):
    # The kernel backends' half-input linears (the full output's down projection of x, the node adapter's up
    # projection): with their weight frozen, the input was kept for nothing (x itself; a float32 [B, N, H]).
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=gen)
    if function == "native_linear":
        data = torch.randn(2, 4, 5, generator=gen).half()
        route = torch.zeros(()).expand(data.shape).requires_grad_(True)  # as _Float32GradRoute's
        saved, out = saved_storages(lambda: hg._NativeLinear.apply(route, data, weight))
        want = torch.nn.functional.linear(data.float(), weight)
        leaf = route
    else:
        data = torch.randn(2, 4, 5, generator=gen, requires_grad=True)
        bias = torch.randn(6, generator=gen)
        saved, out = saved_storages(lambda: hg._LinearToHalf.apply(data, weight, bias, torch.float16))
        want = torch.nn.functional.linear(data, weight, bias).half()
        leaf = data
    assert data.untyped_storage().data_ptr() not in saved
    g = torch.randn(want.shape, generator=gen).to(want.dtype)
    assert torch.equal(out, want)
    torch.testing.assert_close(torch.autograd.grad(out, leaf, g)[0], (g.float() @ weight).expand(leaf.shape))


@pytest.mark.parametrize("needs", [(False, True, False), (False, False, True), (False, True, True), (True, True, True)],
                         ids=lambda v: "".join("ny"[b] for b in v))
def test_linear_to_half_forms_each_wanted_gradient(needs):
    # _LinearToHalf forms only the gradients asked for and keeps z for the weight's alone: the adapters'
    # weight or bias trained on frozen tokens (z needs none), and all three, against F.linear's.
    gen = torch.Generator().manual_seed(1)
    z, weight, bias = (torch.randn(*shape, generator=gen) for shape in ((2, 4, 5), (6, 5), (6,)))
    inputs = [t.requires_grad_(need) for t, need in zip((z, weight, bias), needs, strict=True)]
    saved, out = saved_storages(lambda: hg._LinearToHalf.apply(*inputs, torch.float16))
    assert (z.untyped_storage().data_ptr() in saved) == needs[1]
    g = torch.randn(out.shape, generator=gen).half()
    leaves = [t for t in inputs if t.requires_grad]
    want = torch.autograd.grad(torch.nn.functional.linear(*inputs), leaves, g.float())
    for got, expected in zip(torch.autograd.grad(out, leaves, g), want, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.triton
def test_cls_edges_keep_the_cls_weights_for_dx_only(device):
    # The CLS row trained on frozen tokens: its weights (read for dx alone) were kept too.
    x, c, _, _, k = make_inputs((2, 9, 12, 5, 3), dtype=torch.float32, device=device)
    cls_idx = c.topk(k, dim=-1).indices
    cls_w = torch.softmax(torch.randn(2, k, device=device), dim=-1).requires_grad_(True)
    saved, out = saved_storages(lambda: hg._ClsEdges.apply(x, cls_idx, cls_w))
    assert cls_w.untyped_storage().data_ptr() not in saved
    assert x.untyped_storage().data_ptr() in saved
    torch.autograd.grad(out.sum(), cls_w)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
def test_half_inputs_keep_no_float32_copy_of_x(dtype, cls_only, device, monkeypatch):
    # Checks dtypes and sizes only (no bf16 numerics), so it runs under the interpreter too.
    B, N, D, H, k = (3, 9, 48, 4, 3) if device.type == "cpu" else (64, 197, 512, 128, 5)
    monkeypatch.setattr(hg, "_UPCAST_CHUNK_ELEMENTS", N * D)  # one sample per upcast chunk
    x, c, edge, node, _ = make_inputs((B, N, D, H, k), dtype=dtype, seed=4, device=device)
    inputs = leaves([x, c, *edge, *node])
    copy_bytes = B * (N - 1) * D * 4  # a float32 copy of the patches, the smallest [B, ., D] copy

    def run(backend, backward_created=None):
        return _saved_and_created(lambda: ace_kernels.ace_hypergraph(
            inputs[0], inputs[1], tuple(inputs[2:6]), tuple(inputs[6:10]), topk=k, cls_only=cls_only,
            backend=backend), backward_created)

    backward_created = []
    saved, created = run("triton", backward_created)
    if cls_only:
        # The fused backward writes dx in x's dtype: no float32 [B, N, D] gradient on the way.
        big_fp32_backward = [t for t in backward_created if t[2] >= copy_bytes]
        assert not big_fp32_backward, big_fp32_backward
    big_fp32_saved = [s for s in saved if s[1] == torch.float32 and s[2] >= copy_bytes]
    assert not big_fp32_saved, big_fp32_saved
    big_fp32_created = [t for t in created if t[2] >= copy_bytes]
    assert not big_fp32_created, big_fp32_created
    # x itself is what the backward keeps (its own storage, its own dtype).
    x_ptr = inputs[0].untyped_storage().data_ptr()
    assert any(s[3] == x_ptr and s[1] == dtype for s in saved)
    # The check can fail: the torch backend computes on x.float() and saves that copy.
    saved_torch, _ = run("torch")
    assert any(s[1] == torch.float32 and s[2] >= copy_bytes for s in saved_torch)


def _aot_signatures():
    """Every Triton kernel at the GPU configurations its launcher uses."""
    from benchmarks.kernel_stats import topk_signature  # shared with the static profile

    i32 = "i32"
    cfg = hg.TOPK_CONFIG["gpu"]
    # Half inputs are read in their own dtype and multiplied on tensor cores (NATIVE_DOT, as the
    # launcher does on a GPU), float32 otherwise; norms=True is the fused cls_only selection.
    for k, has_rows, feat, norms in ((5, False, "fp32", False), (5, True, "fp32", False), (16, False, "fp32", False),
                                     (5, False, "bf16", False), (16, True, "bf16", False), (5, False, "fp16", False),
                                     (16, True, "fp16", False), (5, True, "fp32", True), (16, True, "fp32", True),
                                     (5, True, "bf16", True), (16, True, "bf16", True), (5, True, "fp16", True)):
        yield (f"topk_incidence k={k} rows={has_rows} norms={norms} {feat}", hg._topk_incidence_kernel,
               topk_signature(feat),
               dict(TOPK=k, BLOCK_K=hg._pow2(k), BLOCK_Q=cfg["BLOCK_Q"], BLOCK_M=cfg["BLOCK_M"],
                    BLOCK_D=cfg["BLOCK_D"], HAS_ROWS=has_rows, COMPUTE_NORMS=norms, NATIVE_DOT=feat != "fp32"),
               cfg["num_warps"], cfg["num_stages"])
    # The fused cls_only kernels, at the tile sizes their launchers pick for k = 5 and k = 16.
    xs = {n: i32 for n in ("D", "stride_xb", "stride_xn", "stride_xd")}
    ec, cc, dxc = hg.CLS_EDGES_CONFIG["gpu"], hg.CLS_COEF_CONFIG["gpu"], hg.CLS_DX_CONFIG["gpu"]
    for k, feat in ((5, "fp32"), (5, "bf16"), (5, "fp16"), (16, "fp32"), (16, "bf16")):
        bt = hg._cls_block_t(k)
        yield (f"cls_edges k={k} {feat}", hg._cls_edges_kernel,
               {"x_ptr": f"*{feat}", "cls_idx_ptr": "*i64", "cls_w_ptr": "*fp32", "nbr_idx_ptr": "*i64",
                "nbr_w_ptr": "*fp32", "out_ptr": "*fp32", **xs,
                "TOPK": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
               dict(TOPK=k, BLOCK_T=bt, BLOCK_D=ec["BLOCK_D"]), ec["num_warps"], 3)
        yield (f"cls_coef k={k} {feat}", hg._cls_coef_kernel,
               {"x_ptr": f"*{feat}", "grad_ptr": "*fp32", "cls_idx_ptr": "*i64", "nbr_idx_ptr": "*i64",
                "nbr_w_ptr": "*fp32", "a_ptr": "*fp32", "cn_ptr": "*fp32", "cq_ptr": "*fp32", "dcw_ptr": "*fp32", **xs,
                "TOPK": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
               dict(TOPK=k, BLOCK_T=bt, BLOCK_D=max(8, cc["BLOCK_D"] * 64 // max(64, bt * bt))), cc["num_warps"], 3)
        yield (f"cls_dx k={k} {feat}", hg._cls_dx_kernel,
               {"x_ptr": f"*{feat}", "grad_ptr": "*fp32", "cls_idx_ptr": "*i64", "cls_w_ptr": "*fp32",
                "nbr_idx_ptr": "*i64", "nbr_w_ptr": "*fp32", "a_ptr": "*fp32", "cn_ptr": "*fp32", "cq_ptr": "*fp32",
                "dx_ptr": f"*{feat}", **xs, "stride_db": i32, "stride_dn": i32, "stride_dd": i32,
                "TOPK": "constexpr", "BLOCK_T": "constexpr", "BLOCK_O": "constexpr", "BLOCK_D": "constexpr"},
               dict(TOPK=k, BLOCK_T=bt, BLOCK_O=dxc["BLOCK_O"], BLOCK_D=dxc["BLOCK_D"]), dxc["num_warps"], 3)
    g = hg.GATHER_CONFIG["gpu"]
    for feat in ("fp32", "bf16", "fp16"):
        yield (f"gather_sum {feat}", hg._gather_sum_kernel,
               {"src_ptr": f"*{feat}", "cols_ptr": "*i64", "w_ptr": "*fp32", "out_ptr": "*fp32",
                "Q": i32, "D": i32, "S": i32,
                **{n: i32 for n in ("stride_sb", "stride_sr", "stride_sd", "stride_cb", "stride_cq", "stride_cs",
                                    "stride_wb", "stride_wq", "stride_ws", "stride_ob", "stride_oq", "stride_od")},
                "BLOCK_Q": "constexpr", "BLOCK_D": "constexpr"},
               dict(BLOCK_Q=g["BLOCK_Q"], BLOCK_D=g["BLOCK_D"]), g["num_warps"], 3)
    sc = hg.SCATTER_CONFIG["gpu"]
    for feat in ("fp32", "bf16", "fp16"):
        yield (f"scatter_sum_csr {feat}", hg._scatter_sum_csr_kernel,
               {"src_ptr": f"*{feat}", "w_ptr": "*fp32", "row_ptr_ptr": "*i64", "perm_ptr": "*i64",
                "out_ptr": "*fp32", "R": i32, "D": i32, "S": i32,
                **{n: i32 for n in ("stride_sb", "stride_sq", "stride_sd", "stride_wb", "stride_rpb", "stride_pb",
                                    "stride_ob", "stride_or", "stride_od")},
                "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
               dict(BLOCK_R=sc["BLOCK_R"], BLOCK_D=sc["BLOCK_D"]), sc["num_warps"], 3)
    ac = hg.ATOMIC_SCATTER_CONFIG["gpu"]
    for feat in ("fp32", "bf16", "fp16"):
        yield (f"scatter_sum_atomic {feat}", hg._scatter_sum_atomic_kernel,
               {"src_ptr": f"*{feat}", "cols_ptr": "*i64", "w_ptr": "*fp32", "out_ptr": "*fp32",
                "Q": i32, "D": i32, "S": i32,
                **{n: i32 for n in ("stride_sb", "stride_sq", "stride_sd", "stride_cb", "stride_cq", "stride_cs",
                                    "stride_wb", "stride_wq", "stride_ws", "stride_ob", "stride_or", "stride_od")},
                "BLOCK_Q": "constexpr", "BLOCK_D": "constexpr"},
               dict(BLOCK_Q=ac["BLOCK_Q"], BLOCK_D=ac["BLOCK_D"]), ac["num_warps"], 3)
    dc = hg.DOT_CONFIG["gpu"]
    # (a, b): fp32 activations, the half-x gather's weight gradient, the incidence weights' dots.
    for fa, fb in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16"), ("fp32", "fp16"), ("fp16", "fp16")):
        yield (f"entry_dot {fa} {fb}", hg._entry_dot_kernel,
               {"a_ptr": f"*{fa}", "b_ptr": f"*{fb}", "cols_ptr": "*i64", "out_ptr": "*fp32",
                "Q": i32, "D": i32, "S": i32,
                **{n: i32 for n in ("stride_ab", "stride_aq", "stride_ad", "stride_bb", "stride_br", "stride_bd",
                                    "stride_cb", "stride_cq", "stride_cs", "stride_ob", "stride_oq", "stride_os")},
                "BLOCK_Q": "constexpr", "BLOCK_D": "constexpr"},
               dict(BLOCK_Q=dc["BLOCK_Q"], BLOCK_D=dc["BLOCK_D"]), dc["num_warps"], 3)


# Unit strides (D innermost) are specialised to the constant 1 in a real launch, as Triton does.
_UNIT_STRIDES = {"stride_pd", "stride_nm", "stride_ok", "stride_rr", "stride_sd", "stride_cs", "stride_ws", "stride_od",
                 "stride_ad", "stride_bd", "stride_os", "stride_xd", "stride_dd"}


def _compile_all_for_sm90() -> list:
    """Compile every launch variant for sm_90a. Runs in a subprocess without TRITON_INTERPRET:
    under the interpreter the kernels are not JITFunctions and cannot be compiled."""
    from ace_kernels._aot import compile_sm90, integer_arguments  # pointers 16-byte aligned, as launched

    results = []
    for name, kernel, signature, constexprs, warps, stages in _aot_signatures():
        signature = dict(signature)
        constexprs = dict(constexprs)
        for arg in _UNIT_STRIDES & set(signature):
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        # Triton specialises every integer argument that is a multiple of 16. Two extremes are
        # compiled, every size and stride but S = k + 2 a multiple of 16 and none: a real launch
        # lies between them (D = 512 and a 256-token tower, but top-k strides k and R*k at k = 5;
        # or N = 197), and those mixes are not compiled.
        sizes = integer_arguments(signature, exclude=("S",))
        dtypes = {"*fp32": torch.float32, "*bf16": torch.bfloat16, "*fp16": torch.float16}
        pn_dtype = dtypes.get(signature.get("pn_ptr"))
        maxnreg = hg._topk_maxnreg(pn_dtype) if kernel is hg._topk_incidence_kernel else None  # as launched
        for shapes, divisible in (("sizes not /16", []), ("sizes /16", sizes)):
            res = compile_sm90(kernel, signature, constexprs, num_warps=warps, num_stages=stages,
                               divisible_by_16=divisible, maxnreg=maxnreg)
            results.append(dict(name=f"{name} ({shapes})", registers=res.registers, shared=res.shared_bytes,
                                spills=res.spills))
    return results


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90a_without_spills():
    pytest.importorskip("triton")
    from _aot_helpers import compile_in_fresh_process

    results = compile_in_fresh_process("test_hypergraph", "_compile_all_for_sm90")
    report = [f"{r['name']}: {r['registers']} registers, {r['shared']} B shared, {r['spills']} B spilled"
              for r in results]
    print("\n".join(report))
    assert len(results) == 2 * 41
    assert all(r["spills"] == 0 for r in results), report
    # What the Triton backend's check takes the kernels to need at most (hg.GPU_SHARED_BYTES).
    assert all(r["shared"] <= hg.GPU_SHARED_BYTES for r in results), report


# ---------------------------------------------------------------------------- GPU (real shapes)

GPU_SHAPES = {"image_b4": (4, 197, 512, 128, 5), "text_b3": (3, 256, 512, 128, 5), "odd_k16": (2, 45, 136, 16, 16)}
# Each shape's inputs have no tie at the k-th place of a CLS row in any dtype (text_b3's seed 21
# had one in bf16, where torch.topk on the device and the oracle may keep different tokens).
GPU_SEEDS = {(4, 197, 512, 128, 5): 21, (3, 256, 512, 128, 5): 23, (2, 45, 136, 16, 16): 21}


def _errors_vs_oracle(backend, shape, dtype, cls_only, device):
    x, c, edge, node, k = make_inputs(shape, dtype=dtype, seed=GPU_SEEDS[shape], device=device)
    # "triton-atomic": the triton backend with deterministic=False (atomic A^T scatter).
    deterministic = backend != "triton-atomic"
    backend = "triton" if backend == "triton-atomic" else backend
    out, grads = ours_run(x, c, edge, node, k, cls_only, backend, deterministic)
    ref_out, ref_grads = oracle_run(x, c, edge, node, k, cls_only)
    return [(o.double() - r).abs().max().item() for o, r in zip([out, *grads], [ref_out, *ref_grads], strict=True)], \
        [r.abs().max().item() for r in [ref_out, *ref_grads]]


def test_gpu_inputs_have_no_tie_in_a_cls_row():
    """What test_gpu_backend_matches_oracle's bounds take for granted, checked here on any machine."""
    for shape, seed in GPU_SEEDS.items():
        k = shape[4]
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            _, cls_attn, *_ = make_inputs(shape, dtype=dtype, seed=seed)
            ranked = cls_attn.double().sort(dim=-1, descending=True).values
            assert (ranked[:, k - 1] > ranked[:, k]).all(), (shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", pytest.param("triton-atomic", marks=NOT_POISONED), "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES.values()), ids=list(GPU_SHAPES))
def test_gpu_backend_matches_oracle(backend, dtype, cls_only, shape):
    # Half dtypes take the kernels' native half path (x read as bf16/fp16, no float32 copy).
    if backend.split("-")[0] not in ace_kernels.available_backends():
        base = backend.split("-")[0]
        pytest.skip(f"{backend} backend unavailable: {ace_kernels.available_backends(reasons=True)[base]}")
    device = torch.device("cuda")
    ours, scale = _errors_vs_oracle(backend, shape, dtype, cls_only, device)
    torch_err, _ = _errors_vs_oracle("torch", shape, dtype, cls_only, device)
    # The yardstick itself (float32 compute, one rounding to the dtype at the end): within twice
    # that rounding of each tensor's scale (float32: sums over D = 512). This bounds the 2x rule
    # below: a yardstick off by a different tie-break would let almost any result pass.
    own_bound = {torch.float32: 1e-4, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    for name, e_torch, s in zip(("output",) + PARAM_NAMES, torch_err, scale, strict=True):
        assert e_torch <= own_bound * s, f"{name}: torch backend err {e_torch:.3e} at scale {s:.3e}"
    for name, e_ours, e_torch, s in zip(("output",) + PARAM_NAMES, ours, torch_err, scale, strict=True):
        # Project rule: within 2x of the torch backend's own error in the same dtype, plus a floor
        # of 1e-5 of the tensor's scale (float32 rounding of a sum over D = 512).
        assert e_ours <= 2 * e_torch + 1e-5 * s, f"{name}: {backend} err {e_ours:.3e}, torch err {e_torch:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton-atomic", "cuda"])
def test_gpu_primitives_match_torch(backend):
    if backend.split("-")[0] not in ace_kernels.available_backends():
        pytest.skip(f"{backend} backend unavailable")
    prims = {"triton": hg.TRITON_PRIMITIVES, "triton-atomic": hg.TRITON_ATOMIC_PRIMITIVES,
             "cuda": hg.CUDA_PRIMITIVES}[backend]
    gen = torch.Generator(device="cuda").manual_seed(3)
    B, Q, R, S, D, M, k = 3, 50, 40, 7, 515, 1500, 16  # M > two CUDA chunks (512 each), odd D
    src_q = torch.randn(B, Q, D, device="cuda", generator=gen)
    src_r = torch.randn(B, R, D, device="cuda", generator=gen)
    cols = torch.randint(-1, R, (B, Q, S), device="cuda", generator=gen)
    w = torch.randn(B, Q, S, device="cuda", generator=gen) * (cols >= 0)
    t = hg.TORCH_PRIMITIVES
    torch.testing.assert_close(prims.gather_sum(src_r, cols, w), t.gather_sum(src_r, cols, w), rtol=1e-5, atol=1e-4)
    a = prims.scatter_sum(src_q, cols, w, R)
    torch.testing.assert_close(a, t.scatter_sum(src_q, cols, w, R), rtol=1e-5, atol=1e-4)
    if backend != "triton-atomic":
        assert torch.equal(a, prims.scatter_sum(src_q, cols, w, R))  # deterministic
    torch.testing.assert_close(prims.entry_dot(src_q, src_r, cols), t.entry_dot(src_q, src_r, cols) * (cols >= 0),
                               rtol=1e-5, atol=1e-4)
    feats = torch.randn(B, M, 64, device="cuda", generator=gen)
    inv_norm = 1.0 / feats.norm(dim=-1)
    rows = torch.randint(0, M, (B, 5), device="cuda", generator=gen)
    for r in (None, rows):
        idx, wts = prims.topk_rows(feats, inv_norm, r, k)
        ref_idx, ref_w = t.topk_rows(feats, inv_norm, r, k)
        # Same neighbour sets (slot order is unspecified), same weights once sorted.
        assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
        torch.testing.assert_close(wts.sort(-1).values, ref_w.sort(-1).values, rtol=1e-5, atol=1e-6)
    # Wide features: the CUDA kernel's shared memory (8 x (D + 512) floats and 1,600 static bytes)
    # passes the default 48 KiB from D = 975 on, where it must ask the device for more.
    for dim in (975, 1024, 1100):
        wide = torch.randn(1, 40, dim, device="cuda", generator=gen)
        idx, wts = prims.topk_rows(wide, 1.0 / wide.norm(dim=-1), None, 5)
        ref_idx, ref_w = t.topk_rows(wide, 1.0 / wide.norm(dim=-1), None, 5)
        assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values), dim
        torch.testing.assert_close(wts.sort(-1).values, ref_w.sort(-1).values, rtol=1e-5, atol=1e-6)
    # Half features are read in their own dtype and converted exactly, so the results (float32)
    # equal those on the upcast features; the atomic scatter only up to its summation order.
    for half in (torch.float16, torch.bfloat16):
        h_q, h_r, h_f = src_q.to(half), src_r.to(half), feats.to(half)
        pairs = [(prims.gather_sum(h_r, cols, w), prims.gather_sum(h_r.float(), cols, w)),
                 (prims.entry_dot(h_q, h_r, cols), prims.entry_dot(h_q.float(), h_r.float(), cols)),
                 (prims.entry_dot(src_q, h_r, cols), prims.entry_dot(src_q, h_r.float(), cols))]
        if backend != "triton-atomic":
            pairs.append((prims.scatter_sum(h_q, cols, w, R), prims.scatter_sum(h_q.float(), cols, w, R)))
        for got, want in pairs:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        if backend == "triton-atomic":
            got = prims.scatter_sum(h_q, cols, w, R)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, prims.scatter_sum(h_q.float(), cols, w, R), rtol=1e-5, atol=1e-4)
        h_inv = 1.0 / h_f.float().norm(dim=-1)
        for r in (None, rows):
            idx, wts = prims.topk_rows(h_f, h_inv, r, k)
            ref_idx, ref_w = t.topk_rows(h_f.float(), h_inv, r, k)
            assert wts.dtype == torch.float32
            assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
            torch.testing.assert_close(wts.sort(-1).values, ref_w.sort(-1).values, rtol=1e-5, atol=1e-6)


def test_cuda_top_k_shared_memory_constants_match_the_kernel_source():
    # The cuda backend declines a D whose top-k shared memory exceeds the device's per-block limit;
    # its arithmetic mirrors the kernel's constants, read here from the source.
    import re

    folder = os.path.join(os.path.dirname(__file__), "..", "csrc", "hypergraph")
    source = "".join(open(os.path.join(folder, name)).read() for name in ("hypergraph.h", "hypergraph.cu"))
    threads = int(re.search(r"constexpr int kTopkThreads = (\d+);", source).group(1))
    chunk = int(re.search(r"constexpr int kTopkChunk = (\d+);", source).group(1))
    max_topk = int(re.search(r"constexpr int kMaxTopk = (\d+);", source).group(1))
    queries = threads // 32
    assert (hg._CUDA_TOPK_QUERIES, hg._CUDA_TOPK_CHUNK) == (queries, chunk)
    assert hg._CUDA_TOPK_STATIC_BYTES == queries * max_topk * (4 + 8) + queries * 8  # top_v, top_i, own_row
    assert hg._cuda_topk_shared_bytes(974) == 48 * 1024 < hg._cuda_topk_shared_bytes(975)


def test_topk_launches_cap_registers(monkeypatch):
    """The top-k launcher passes Triton's ``maxnreg``: TOPK_FP32_MAXNREG (128) for float32 features,
    TOPK_HALF_MAXNREG (255) for 16-bit ones (which need more than 128): without a cap ptxas picked
    64 or 128 registers for some variants and spilled (fp32 k = 5 fused selection under triton 3.6;
    16-bit k = 5 and 16 with the 32-bit running indices), which the sm_90a spill check on the other
    triton cannot see. A stand-in kernel records what each launch passes."""
    pytest.importorskip("triton")
    assert (hg.TOPK_FP32_MAXNREG, hg.TOPK_HALF_MAXNREG) == (128, 255)
    assert hg._topk_maxnreg(torch.float32) == 128
    assert hg._topk_maxnreg(torch.float16) == 255 and hg._topk_maxnreg(torch.bfloat16) == 255
    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(kwargs.get("maxnreg", "not passed"))

    monkeypatch.setattr(hg, "_topk_incidence_kernel", Kernel())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        pn = torch.randn(2, 20, 16).to(dtype)
        hg._launch_topk(pn, None, None, 5)  # norms computed in the kernel
        hg._launch_topk(pn, torch.ones(2, 20), None, 5)
    assert seen == [128, 128, 255, 255, 255, 255]


@pytest.mark.parametrize("cls_only", [False, True])
def test_torch_backend_under_selective_activation_checkpointing(cls_only):
    """A selective checkpoint whose policy keeps the matmuls (torch's own example) caches their
    results: the full output's F.linear of a 1-D bias squeezed its mm's result in place, and the
    recomputation raised 'Tensor cached during selective activation checkpoint has been mutated'.
    Every gradient is now the plain step's, bit for bit."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    kept = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in kept else CheckpointPolicy.PREFER_RECOMPUTE

    torch.manual_seed(7)
    module = ace_kernels.ACEHypergraph(dim=16, hidden=8, topk=3).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    cls_attn = torch.rand(2, 10, dtype=torch.float64)
    leaves = (x, *module.parameters())

    def step(x):
        return module(x * 1.0, cls_attn, cls_only=cls_only, backend="torch").square().sum()

    want = torch.autograd.grad(step(x), leaves)
    checkpointed = checkpoint(step, x, use_reentrant=False,
                              context_fn=functools.partial(create_selective_checkpoint_contexts, policy))
    for got, expected in zip(torch.autograd.grad(checkpointed, leaves), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
