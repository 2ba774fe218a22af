"""torch.compile: the three ops trace as one graph (fullgraph=True) and give eager's results.

CPU, torch backend (and ``backend="auto"``, which resolves to it here): ``aot_eager`` runs
the traced ATen graph with eager's random stream, so even dropout must match bit for bit;
``inductor`` generates code (its own random stream, so dropout off there).

Triton backend: its launchers are custom ops (``ace_triton::*``, see ``ace_kernels._library``)
while compiling. Under the interpreter they take CPU tensors, so the CPU suite compiles the
Triton paths with ``aot_eager`` (bit-exact: the same launchers run) and checks every op's
schema and fake implementation with ``torch.library.opcheck``. On a GPU, inductor compiles them.
"""

from __future__ import annotations

import pytest
import torch

import ace_kernels
from ace_kernels import _dispatch, _library, contrastive, hypergraph


def _lora_case(dropout_p: float, backend: str, device="cpu", train_a=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 40, generator=g).to(device).requires_grad_()
    w = torch.randn(3 * 24, 40, generator=g).to(device)
    b = torch.randn(3 * 24, generator=g).to(device)
    a = (0.1 * torch.randn(3, 4, 40, generator=g)).to(device).requires_grad_(train_a)
    bb = (0.1 * torch.randn(3, 24, 4, generator=g)).to(device).requires_grad_()

    def fn(x, a, bb):
        q, k, v = ace_kernels.lora_qkv(x, w, b, a, bb, scaling=0.5, dropout_p=dropout_p, training=True,
                                       backend=backend)
        return (q * k + v).sum()

    if not train_a:  # A frozen: the gradients of x and B alone (the Triton Function keeps no x)
        return (lambda x, bb: fn(x, a, bb)), (x, bb)
    return fn, (x, a, bb)


def _lora_linear_case(dropout_p: float, backend: str, device="cpu"):
    # One projection: the path of timm's fused qkv and of every LoRA layer patch() does not group.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 40, generator=g).to(device).requires_grad_()
    w = torch.randn(24, 40, generator=g).to(device)
    a = (0.1 * torch.randn(4, 40, generator=g)).to(device).requires_grad_()
    bb = (0.1 * torch.randn(24, 4, generator=g)).to(device).requires_grad_()

    def fn(x, a, bb):
        return ace_kernels.lora_linear(x, w, None, a, bb, scaling=0.5, dropout_p=dropout_p, training=True,
                                       backend=backend).square().sum()

    return fn, (x, a, bb)


def _infonce_case(backend: str, device="cpu"):
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(19, 8, generator=g), dim=-1).to(device).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(19, 8, generator=g), dim=-1).to(device).requires_grad_()
    s = torch.tensor(10.0, device=device, requires_grad=True)
    labels = torch.randint(0, 3, (19, 2), generator=g).to(device)

    def fn(u, t, s):
        return ace_kernels.label_guided_infonce(u, t, s, labels, backend=backend)

    return fn, (u, t, s)


def _hypergraph_case(backend: str, device="cpu", cls_only=True):
    torch.manual_seed(2)
    module = ace_kernels.ACEHypergraph(dim=16, hidden=8, topk=3).to(device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 16, generator=g).to(device).requires_grad_()
    cls_attn = torch.rand(2, 10, generator=g).to(device)

    def fn(x):
        return module(x, cls_attn, cls_only=cls_only, backend=backend).square().sum()

    return fn, (x,)


def _run(fn, inputs, seed=5):
    torch.manual_seed(seed)
    out = fn(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs)


def _assert_same(compiled, eager, rtol, atol):
    torch.testing.assert_close(compiled[0], eager[0], rtol=rtol, atol=atol)
    for i, (got, want) in enumerate(zip(compiled[1], eager[1], strict=True)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"gradient {i}: {m}")


def _assert_aot_eager_exact(fn, inputs):
    torch._dynamo.reset()
    eager = _run(fn, inputs)
    compiled = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs)
    # Bit for bit on the CPU; on a GPU the hypergraph's backward adds the norms' gradients
    # with torch's scatter_add_, whose atomics may round differently from run to run.
    exact = all(t.device.type == "cpu" for t in inputs if isinstance(t, torch.Tensor))
    _assert_same(compiled, eager, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)


CASES = {
    "lora_qkv dropout": lambda backend: _lora_case(0.3, backend),
    "lora_linear dropout": lambda backend: _lora_linear_case(0.25, backend),
    "label_guided_infonce": _infonce_case,
    "ace_hypergraph cls_only": _hypergraph_case,
}


TRITON_CASES = {
    "lora_qkv dropout": lambda device: _lora_case(0.3, "triton", device),
    "lora_qkv dropout A frozen": lambda device: _lora_case(0.3, "triton", device, train_a=False),
    "lora_linear dropout": lambda device: _lora_linear_case(0.25, "triton", device),
    "label_guided_infonce": lambda device: _infonce_case("triton", device),
    "ace_hypergraph cls_only": lambda device: _hypergraph_case("triton", device),
    "ace_hypergraph full": lambda device: _hypergraph_case("triton", device, cls_only=False),
}


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_aot_eager_matches_eager_exactly(name, backend):
    _assert_aot_eager_exact(*CASES[name](backend))


@pytest.mark.parametrize("rows, rank", [(1, 4), (0, 4), (3, 1)])
def test_lora_qkv_dropout_compiles_where_s_is_a_view(rows, rank):
    """The torch backend's S with dropout is a reshape of the stacked per-projection products, a copy for
    q/k/v but a view of them at M <= 1 rows or rank 1: the Function saved a view of an intermediate, which
    Dynamo refused (InternalTorchDynamoError "'s_flat' ... aliases an input or output") for one token's q/k/v
    and for a rank-1 LoRA at any batch."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(rows, 1, 40, generator=g).requires_grad_()
    w, b = torch.randn(3 * 24, 40, generator=g), torch.randn(3 * 24, generator=g)
    a = (0.1 * torch.randn(3, rank, 40, generator=g)).requires_grad_()
    bb = (0.1 * torch.randn(3, 24, rank, generator=g)).requires_grad_()

    def fn(x, a, bb):
        q, k, v = ace_kernels.lora_qkv(x, w, b, a, bb, scaling=0.5, dropout_p=0.3, training=True, backend="torch")
        return (q * k + v).sum()

    _assert_aot_eager_exact(fn, (x, a, bb))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_hypergraph_full_output_of_the_torch_backend_runs_eagerly_under_compile(backend):
    # The torch backend's full output is kept out of the graph (torch 2.11's dynamo traced it into
    # a wrong gradient of x): a graph break, the eager numbers bit for bit; fullgraph is refused.
    fn, inputs = _hypergraph_case(backend, cls_only=False)
    torch._dynamo.reset()
    eager = _run(fn, inputs)
    _assert_same(_run(torch.compile(fn, backend="aot_eager"), inputs), eager, rtol=0, atol=0)
    if backend == "torch":
        torch._dynamo.reset()
        with pytest.raises(Exception, match="_torch_full_output"):
            torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs)


@pytest.mark.triton
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_fullgraph_aot_eager_matches_eager_exactly(name, device):
    _assert_aot_eager_exact(*TRITON_CASES[name](device))


@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_hypergraph_of_an_empty_batch_compiles_and_runs_under_fake_tensors(backend, cls_only, device):
    """B = 0 runs no backend's computation (no kernel, and not the torch backend's full output, which
    breaks the graph): torch.compile(fullgraph=True) gives eager's empty output and gradients (zeros for
    the adapters), and FakeTensorMode the output's shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if backend == "triton" and device.type == "cpu" and not _dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on a machine with no GPU")
    torch.manual_seed(2)
    module = ace_kernels.ACEHypergraph(dim=16, hidden=8, topk=3).to(device)
    x = torch.randn(0, 11, 16, device=device, requires_grad=True)
    cls_attn = torch.rand(0, 10, device=device, requires_grad=True)
    inputs = (x, cls_attn, *module.parameters())

    def fn(x, cls_attn):
        return module(x, cls_attn, cls_only=cls_only, backend=backend)

    def run(f):
        out = f(x, cls_attn)
        return (out, *torch.autograd.grad(out.sum(), inputs))

    torch._dynamo.reset()
    eager = run(fn)
    compiled = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    for got, want in zip(compiled, eager, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
    assert eager[0].shape == ((0, 16) if cls_only else (0, 11, 16))
    assert all(g.numel() > 0 and not g.any() for g in eager[3:])
    with FakeTensorMode(), torch.device(device):
        out = ace_kernels.ACEHypergraph(dim=16, hidden=8, topk=3)(torch.empty(0, 11, 16), torch.empty(0, 10),
                                                                  cls_only=cls_only, backend=backend)
        assert out.shape == eager[0].shape and out.device == x.device


def _opcheck_cases(device):
    """Small arguments for every launcher op, with the optional inputs both given and absent."""
    g = torch.Generator().manual_seed(7)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def randint(high, *shape):
        return torch.randint(0, high, shape, generator=g).to(device)

    x, w, b = randn(13, 40), randn(72, 40), randn(72)
    a3, b3, seed = 0.1 * randn(3, 4, 40), 0.1 * randn(3, 24, 4), randint(1000, 1)
    x_cat, grad_y = randn(13, 56), randn(13, 72)  # x_cat: [x | S | 0], 40 + 3 * 4 columns padded to 56
    s_copy = x_cat[:, 40:52].clone()
    u = torch.nn.functional.normalize(randn(19, 8), dim=-1)
    t = torch.nn.functional.normalize(randn(19, 8), dim=-1)
    scale, coef, keys = randn(1).abs() + 1, randn(1), randint(4, 19).int()
    lse = randn(19) + 3
    pn, inv_norm = randn(2, 10, 16), randn(2, 10).abs() + 0.5
    src, cols, weights = randn(2, 4, 16), randint(10, 2, 4, 5), randn(2, 4, 5).abs()
    row_ptr, perm = hypergraph._transpose_csr(cols, 10)
    x_hg, grad_e = randn(2, 11, 16), randn(2, 4, 16)
    cls_idx = torch.stack([torch.randperm(10, generator=g)[:3] for _ in range(2)]).to(device)
    cls_w = torch.softmax(randn(2, 3), dim=-1)
    nbr_idx, nbr_w = hypergraph._triton_cls_select(x_hg[:, 1:], cls_idx, 3)
    coef_hg = hypergraph._triton_cls_coef(x_hg, grad_e, cls_idx, nbr_idx, nbr_w)
    return {
        "lora_forward": [(x, w, b, a3, b3, seed, 0.5, 0.3, True), (x, w, None, a3, b3, seed, 0.5, 0.0, False)],
        # (x_cat, S's columns): given for dA and dB, each None without its gradient; S is x_cat's tail, or the
        # copy of it the Function saves without dA.
        "lora_backward": [(grad_y, x_cat, x_cat[:, 40:], w, a3, b3, seed, 0.5, 0.3, True, True, True, True),
                          (grad_y, x_cat, None, w, a3, b3, seed, 0.5, 0.0, False, False, True, False),
                          (grad_y, None, s_copy, None, a3, b3, seed, 0.5, 0.3, True, False, False, True),
                          # A frozen: dX and dB, or dX alone, without x.
                          (grad_y, None, s_copy, w, a3, b3, seed, 0.5, 0.3, True, True, False, True),
                          (grad_y, None, None, w, a3, b3, seed, 0.5, 0.0, False, True, False, False),
                          # x frozen: W is not saved (None; the launcher reads it for dX alone).
                          (grad_y, x_cat, x_cat[:, 40:], None, a3, b3, seed, 0.5, 0.3, True, False, True, True),
                          # float16: dA is float32 (its row blocks' partials summed in fp32), dX and dB float16.
                          (*(t.half() for t in (grad_y, x_cat, x_cat[:, 40:], w, a3, b3)), seed, 0.5, 0.3, True,
                           True, True, True)],
        # Every row (one device), a rank's rows (group=) and a rank with none.
        "infonce_lse_both": [(u, t, scale, keys, 0, 19), (u, t, scale, None, 3, 11), (u, t, scale, keys, 7, 7),
                             (u.half(), t.half(), scale, keys, 0, 19)],
        # One device's pass; a rank's rows against every column; every row against a rank's columns
        # (fp32 gradients, as group= takes them).
        "infonce_grad_rows": [(u, t, scale, keys, lse, lse, 0, 19, 0, 19, coef),
                              (t, u, scale, None, lse, lse, 5, 9, 0, 19, coef),
                              (u.half(), t.half(), scale, keys, lse, lse, 0, 19, 5, 9, coef, True)],
        # And float16 features: the outputs the fakes declare float32 are float32 there too (not the input's).
        "hg_topk_incidence": [(pn, inv_norm, None, 3), (pn, inv_norm, randint(10, 2, 3), 3),
                              (pn.half(), None, None, 3)],
        "hg_gather_sum": [(pn, cols, weights), (pn.half(), cols, weights)],
        "hg_scatter_sum_csr": [(src, weights.reshape(2, 20), row_ptr, perm, 10, 5),
                               (src.half(), weights.reshape(2, 20), row_ptr, perm, 10, 5)],
        "hg_scatter_sum_atomic": [(src, cols, weights, 10), (src.half(), cols, weights, 10)],
        "hg_entry_dot": [(src, pn, cols), (src.half(), pn.half(), cols)],
        # The fused cls_only kernels: x [2, 11, 16], k = 3 (the CLS row's top-k, their neighbours).
        "hg_cls_select": [(pn, cls_idx, 3), (pn.half(), cls_idx, 3)],
        "hg_cls_edges": [(x_hg, cls_idx, cls_w, nbr_idx, nbr_w), (x_hg.half(), cls_idx, cls_w, nbr_idx, nbr_w)],
        "hg_cls_coef": [(x_hg, grad_e, cls_idx, nbr_idx, nbr_w), (x_hg.half(), grad_e, cls_idx, nbr_idx, nbr_w)],
        "hg_cls_dx": [(x_hg, grad_e, cls_idx, cls_w, nbr_idx, nbr_w, *coef_hg[:3]),
                      (x_hg.half(), grad_e, cls_idx, cls_w, nbr_idx, nbr_w, *coef_hg[:3])],
    }


@pytest.mark.triton
def test_every_launcher_op_passes_opcheck(device):
    # Schema, fake implementation (shapes, dtypes, strides) against the real launch, and
    # AOT dispatch with dynamic shapes; a launcher added without a case here fails the test.
    cases = _opcheck_cases(device)
    assert set(cases) == set(_library.REGISTERED), "every registered launcher op needs opcheck arguments"
    for name, arg_sets in cases.items():
        for args in arg_sets:
            torch.library.opcheck(_library.REGISTERED[name], args)


def _negative_bit_view(t: torch.Tensor) -> torch.Tensor:
    """A leaf holding ``t``'s values as a view with the negative bit set (the imaginary part of a
    conjugated complex tensor, column stride 2): its memory holds the negated values."""
    values = t.detach()
    view = torch.complex(torch.zeros_like(values), -values).conj().imag
    assert view.is_neg() and view.is_leaf and torch.equal(view, values)
    return view.requires_grad_(t.requires_grad)


@pytest.mark.triton
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_eager_calls_read_negative_bit_views_as_their_values(name, device):
    # The launchers' custom ops get such inputs resolved by the dispatcher; eager calls skip it and
    # the kernels read memory: x and A of the LoRA ops, the hypergraph's x (cls_only; the full output's
    # backward) and the loss's logit scale were read negated (other values' results, no error).
    fn, inputs = TRITON_CASES[name](device)
    want = _run(fn, inputs)
    got = _run(fn, [_negative_bit_view(t) for t in inputs])
    exact = device.type == "cpu"  # a GPU's hypergraph backward adds with scatter_add_'s atomics
    _assert_same(got, want, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_calls_under_fake_tensor_mode_take_the_fake_implementations(name, device):
    """Under FakeTensorMode (shape inference, memory planning) the eager launchers ran on fake
    tensors and failed ('Attempted to set the storage of a tensor on device "meta"...'); they now
    go through their custom ops: fake tensors of eager's shapes and dtypes, forward and every
    gradient. Under another dispatch mode (a watching one, FlopCounterMode) the launchers are still
    called directly, so the torch ops inside them stay visible to it, and give eager's results."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    fn, inputs = TRITON_CASES[name](device)
    eager = _run(fn, inputs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [mode.from_tensor(t).requires_grad_(t.requires_grad) for t in inputs]
        out = fn(*fakes)
        grads = torch.autograd.grad(out, fakes)
    for got, want in zip((out, *grads), (eager[0], *eager[1]), strict=True):
        assert type(got).__name__ == "FakeTensor" and (got.shape, got.dtype) == (want.shape, want.dtype)
    seen = []

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.namespace)
            return func(*args, **(kwargs or {}))

    exact = device.type == "cpu"  # a GPU's hypergraph backward adds with scatter_add_'s atomics
    with Watch():
        _assert_same(_run(fn, inputs), eager, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)
    assert seen and _library.NAMESPACE not in seen
    torch.manual_seed(5)  # _run's seed (dropout)
    with FlopCounterMode(display=False):  # forward only: its module hooks refuse autograd.grad of a leaf
        torch.testing.assert_close(fn(*inputs).detach(), eager[0], rtol=0, atol=0)


@pytest.mark.slow
def test_fullgraph_inductor_matches_eager():
    # Generated code (C++ on the CPU): same values up to reassociation; dropout off.
    cases = [_lora_case(0.0, "torch"), _infonce_case("torch"), _hypergraph_case("torch")]
    for fn, inputs in cases:
        torch._dynamo.reset()
        eager = _run(fn, inputs)
        compiled = _run(torch.compile(fn, fullgraph=True), inputs)
        _assert_same(compiled, eager, rtol=1e-5, atol=1e-5)


def test_label_keys_need_no_graph_break():
    # Label keys have a data-independent shape (no torch.unique): the loss with labels of any
    # dtype traces whole, and module and functional agree.
    torch._dynamo.reset()
    loss_fn = ace_kernels.LabelGuidedInfoNCE(logit_scale_init=10.0)
    g = torch.Generator().manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=-1)
    for labels in (torch.randint(0, 2, (12, 14), generator=g).bool(), torch.randint(0, 3, (12,), generator=g),
                   torch.randint(0, 2, (12, 5), generator=g).float()):
        compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(u, t, labels), loss_fn(u, t, labels), rtol=0, atol=0)


def test_inductor_label_keys_equal_signed_zeros():
    # Label rows compare as ``==`` does, compiled too: [-0.0, 1] equals [0.0, 1] (a multiplied-out
    # uncertain label gives -0.0), so the pair is masked. The keys mapped -0.0 to +0.0 with
    # ``x + 0.0``, which inductor drops as a no-op: compiled, the two rows got keys of their own.
    torch._dynamo.reset()
    nan = float("nan")
    labels = torch.tensor([[0.0, 1.0], [-0.0, 1.0], [1.0, -0.0], [1.0, 0.0], [nan, 1.0], [nan, 1.0]])
    keys = torch.compile(contrastive._label_keys, fullgraph=True)(labels)
    want = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0],
                         [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(keys[:, None] == keys[None, :], want), keys


@pytest.mark.triton
@pytest.mark.slow
def test_triton_fullgraph_inductor(device):
    # The Triton launchers as extern custom ops inside code inductor generates: all four cases
    # in one function, so one compile (GPU time is scarce). On the CPU the launchers run the
    # interpreter; on a GPU, the compiled kernels.
    torch._dynamo.reset()
    cases = [_lora_case(0.0, "triton", device), _infonce_case("triton", device),
             _hypergraph_case("triton", device), _hypergraph_case("triton", device, cls_only=False)]
    inputs = tuple(t for _, case_inputs in cases for t in case_inputs)
    sizes = [len(case_inputs) for _, case_inputs in cases]

    def fn(*tensors):
        total, start = 0.0, 0
        for (case_fn, _), size in zip(cases, sizes, strict=True):
            total = total + case_fn(*tensors[start:start + size])
            start += size
        return total

    eager = _run(fn, inputs)
    compiled = _run(torch.compile(fn, fullgraph=True), inputs)
    _assert_same(compiled, eager, rtol=1e-4, atol=1e-4)


def test_the_first_call_of_each_op_may_come_inside_fullgraph():
    """In a fresh process whose first call of an op is inside torch.compile(fullgraph=True), backend
    selection asks whether the extension loads: its file checks (whole, built from these sources)
    read files, which Dynamo cannot trace ('builtin open' refused the graph); they run eagerly."""
    import os
    import subprocess
    import sys

    code = ("import torch, ace_kernels\n"
            "m = ace_kernels.ACEHypergraph(16, 8, 3)\n"
            "x, c = torch.randn(2, 9, 16), torch.rand(2, 8)\n"
            "f = torch.compile(lambda x: m(x, c, cls_only=True), fullgraph=True, backend='eager')\n"
            "torch.testing.assert_close(f(x), m(x, c, cls_only=True), rtol=0, atol=0)\n"
            "loss = torch.compile(ace_kernels.label_guided_infonce, fullgraph=True, backend='eager')\n"
            "print(float(loss(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(2.0))))\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(ace_kernels.__file__))))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("name", ["ace_hypergraph auto", "lora_linear triton"])
def test_a_first_call_inside_compile_compiles_once(name, monkeypatch):
    """Backend selection reads process-wide caches (whether triton imports, whether the extension
    loads). Traced while still empty, they were guarded as empty and filled by the replayed store,
    so the compiled function's second call, the same inputs, recompiled it (twice the compile time
    of a whole model); they are now read eagerly at trace time, as constants."""
    from torch._dynamo.testing import CompileCounter

    if name == "lora_linear triton" and "triton" not in ace_kernels.available_backends():
        pytest.skip("triton cannot run here")
    monkeypatch.setattr(_dispatch, "_ONCE", {})  # as in a fresh process
    torch._dynamo.reset()
    fn, inputs = _hypergraph_case("auto") if name == "ace_hypergraph auto" else _lora_linear_case(0.0, "triton")
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for _ in range(3):
        compiled(*inputs)
    assert counter.frame_count == 1


class _Function(torch.nn.Module):
    """``fn`` as a module, holding the modules it closes over (torch 2.11's strict export could not
    name their parameters otherwise: a KeyError)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        for i, cell in enumerate(fn.__closure__ or ()):
            if isinstance(cell.cell_contents, torch.nn.Module):
                self.add_module(f"closed_over_{i}", cell.cell_contents)

    def forward(self, *inputs):
        return self.fn(*inputs)


EXPORT_CASES = {**CASES, "ace_hypergraph full": lambda backend: _hypergraph_case(backend, cls_only=False)}


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export_matches_eager_exactly(name, strict):
    """torch.export.export of each op's torch backend gives eager's forward bit for bit. Non-strict
    export traces with fake tensors, without Dynamo: the full hypergraph output failed there on
    the CPU (its CSR products have no fake kernels: 'Values and compressed tensor instance need to
    be on the same device'); traced, it now takes the slot-by-slot form. Strict export (Dynamo)
    refuses that path as fullgraph does (it runs eagerly, a graph break)."""
    fn, inputs = EXPORT_CASES[name]("torch")
    inputs = tuple(t.detach() for t in inputs)
    torch.manual_seed(5)
    eager = fn(*inputs)
    if strict and name == "ace_hypergraph full":
        with pytest.raises(Exception, match="_torch_full_output"):
            torch.export.export(_Function(fn), inputs, strict=True)
    else:
        program = torch.export.export(_Function(fn), inputs, strict=strict)
        assert "sparse" not in str(program.graph)
        torch.manual_seed(5)
        torch.testing.assert_close(program.module()(*inputs), eager, rtol=0, atol=0)


def _dynamic_batch_cases():
    """name -> (module, inputs at a batch size, which inputs carry the batch in dim 0)."""
    torch.manual_seed(6)
    hypergraph_module = ace_kernels.ACEHypergraph(dim=16, hidden=8, topk=3)
    lora = [torch.randn(3 * 24, 40), torch.randn(3 * 24), 0.1 * torch.randn(3, 4, 40), 0.1 * torch.randn(3, 24, 4)]

    def hypergraph(cls_only):
        fn = (lambda x, c: hypergraph_module(x, c, cls_only=cls_only, backend="torch"))
        return fn, lambda b: (torch.randn(b, 11, 16), torch.rand(b, 10)), (True, True)

    def loss(u, t, labels):
        return ace_kernels.label_guided_infonce(u, t, torch.tensor(10.0), labels, backend="torch")

    def loss_inputs(b):
        return (torch.nn.functional.normalize(torch.randn(b, 8), dim=-1),
                torch.nn.functional.normalize(torch.randn(b, 8), dim=-1), torch.randint(0, 3, (b, 2)))

    return {
        "lora_qkv": (lambda x: torch.stack(ace_kernels.lora_qkv(x, *lora, scaling=0.5, backend="torch")),
                     lambda b: (torch.randn(b, 7, 40),), (True,)),
        "label_guided_infonce": (loss, loss_inputs, (True, True, True)),
        "ace_hypergraph cls_only": hypergraph(True),
        "ace_hypergraph full": hypergraph(False),
    }


@pytest.mark.parametrize("name", list(_dynamic_batch_cases()))
def test_export_with_a_dynamic_batch_runs_other_batch_sizes(name):
    """An exported program with a dynamic batch dimension gives eager's results at another batch
    size. The torch paths' loops over row blocks and batch chunks specialised the traced batch
    size (the loss's and the full hypergraph output's export failed: 'specialized it to be a
    constant'); a batch within one block or chunk is now one span, bounded, not specialised."""
    fn, make, batched = _dynamic_batch_cases()[name]
    batch = torch.export.Dim("batch", min=3, max=64)
    shapes = tuple({0: batch} if flag else None for flag in batched)
    program = torch.export.export(_Function(fn), make(5), dynamic_shapes={"inputs": shapes}, strict=False)
    for size in (3, 9, 64):
        inputs = make(size)
        # The full hypergraph output: eager's CSR products against the traced slot-by-slot sums.
        exact = name != "ace_hypergraph full"
        torch.testing.assert_close(program.module()(*inputs), fn(*inputs), rtol=0 if exact else 1e-5,
                                   atol=0 if exact else 1e-5)


def test_lora_float_arguments_traced_as_symbolic_floats():
    """A float argument that changes between calls (a second scaling) or any under dynamic=True
    becomes a symbolic float; the finiteness check of scaling called math.isfinite on it, which
    Dynamo refuses (an error under fullgraph=True, a graph break otherwise). Inductor's results
    are eager's for each value."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, generator=g).requires_grad_()
    w, a, b = torch.randn(6, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)

    def fn(x, scaling, dropout_p):
        return ace_kernels.lora_linear(x, w, None, a, b, scaling=scaling, dropout_p=dropout_p, training=False,
                                       backend="torch").square().sum()

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for scaling, dropout_p in ((0.5, 0.0), (2.0, 0.25)):
        results = [_run(lambda x: f(x, scaling, dropout_p), (x,)) for f in (compiled, fn)]
        _assert_same(*results, rtol=1e-5, atol=1e-5)


def test_numpy_scalar_arguments_under_compile():
    """Dynamo traces a NumPy scalar argument as a 0-d array whose value it cannot read, so no number
    check can accept it: under fullgraph=True the error names the argument and the fix (it said
    "expected a Python number, got numpy.ndarray"); without fullgraph the call runs eagerly, as eager."""
    np = pytest.importorskip("numpy")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 8, generator=g)
    w, a, b = torch.randn(6, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)

    def fn(x, scaling, dropout_p):
        return ace_kernels.lora_linear(x, w, None, a, b, scaling=scaling, dropout_p=dropout_p, backend="torch")

    for name, args in (("scaling", (np.float32(0.5), 0.0)), ("dropout_p", (0.5, np.float64(0.0)))):
        torch._dynamo.reset()  # the cache is per code object: each compile below must trace afresh
        with pytest.raises(Exception, match=rf"argument '{name}'.*pass float"):
            torch.compile(fn, fullgraph=True)(x, *args)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fn)(x, *args), fn(x, *args), rtol=0, atol=0)


def test_numpy_integer_topk_under_compile_names_the_argument_and_the_fix():
    """As for the float arguments above: a NumPy integer topk is traced as a 0-d array, which the integer check
    would refuse as 'expected an integer >= 1, got array(...)'; it names the fix instead."""
    np = pytest.importorskip("numpy")
    module = ace_kernels.ACEHypergraph(dim=16, hidden=8, topk=3)
    g = torch.Generator().manual_seed(2)
    x, cls_attn = torch.randn(2, 11, 16, generator=g), torch.rand(2, 10, generator=g)

    def fn(x, topk):
        return ace_kernels.ace_hypergraph(x, cls_attn, module.edge_adapter, module.node_adapter, topk=topk,
                                          cls_only=True, backend="torch")

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"argument 'topk': expected a Python number; under torch.compile a NumPy "
                                        r"scalar is traced as an array, pass float\(\.\.\.\) or int\(\.\.\.\) of it"):
        torch.compile(fn, fullgraph=True)(x, np.int64(3))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, backend="aot_eager")(x, np.int64(3)), fn(x, 3), rtol=0, atol=0)


def test_loss_compiled_under_autocast_keeps_float32_backward():
    """The loss ignores autocast, backward included, compiled too. Dynamo traces an autograd
    Function's backward where autocast reads as off, and AOTAutograd runs that trace under the
    forward's autocast: the backward's check left autocast on there, its block products came out
    bfloat16 and the in-place update of the float32 gradient failed (mat1 and mat2 must have the
    same dtype). Called under autocast, backward outside it (as a training step does)."""
    fn, inputs = _infonce_case("torch")
    torch._dynamo.reset()

    def under_autocast(fn):
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args)
        return run

    eager = _run(under_autocast(fn), inputs)
    compiled = _run(under_autocast(torch.compile(fn, fullgraph=True, backend="aot_eager")), inputs)
    _assert_same(compiled, eager, rtol=0, atol=0)


def test_loss_of_transposed_embeddings_traces_whole():
    """Embeddings stored transposed ([D, B] memory, a dense non-contiguous layout): the torch
    backend's backward wrote row blocks of the image gradient with out= into empty_like(u), which
    kept u's strides, and Dynamo refuses a non-contiguous out= (fullgraph=True failed, a graph
    break otherwise)."""
    fn, (u, t, s) = _infonce_case("torch")
    u_columns = u.detach().t().contiguous().requires_grad_()  # [D, B]: u_columns.t() is u

    def transposed(u_columns, t, s):
        return fn(u_columns.t(), t, s)

    torch._dynamo.reset()
    eager = _run(transposed, (u_columns, t, s))
    _assert_same(_run(torch.compile(transposed, fullgraph=True, backend="aot_eager"), (u_columns, t, s)), eager,
                 rtol=0, atol=0)


def _trace_step(fn, inputs):
    """make_fx's real tracing (a proxy dispatch mode, no fake tensors) of ``fn`` and its gradients
    with respect to ``inputs``, seeded as :func:`_run` seeds the eager call."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(*leaves):
        torch.manual_seed(5)  # _run's seed (dropout)
        out = fn(*leaves)
        return (out, *torch.autograd.grad(out, leaves))

    return make_fx(step, tracing_mode="real")(*inputs)


@pytest.mark.triton
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_calls_traced_by_make_fx_replay_eager_results(name, device):
    # make_fx's real tracing (a proxy dispatch mode, no fake tensors) records torch ops only: a launcher
    # called directly put its kernels in no node (the interpreter's launch failed on the proxies, a GPU's
    # graph would replay empty outputs). Traced as the custom ops, the graph gives eager's results.
    fn, inputs = TRITON_CASES[name](device)
    eager = _run(fn, inputs)
    graph = _trace_step(fn, inputs)
    assert f"{_library.NAMESPACE}." in graph.code
    torch.manual_seed(5)  # the graph draws the dropout seed as the eager call did
    replay = graph(*inputs)
    exact = device.type == "cpu"
    _assert_same((replay[0], replay[1:]), eager, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_torch_backend_traced_by_make_fx_replays_eager_results(name):
    # make_fx's real tracing of the torch backend, backward included: the full hypergraph output's CPU
    # form builds sparse CSR products, which the proxy mode cannot record ("Sparse CSR tensors do not
    # have strides"); traced, it takes the slot-by-slot form, as under fake tensors.
    fn, inputs = EXPORT_CASES[name]("torch")
    eager = _run(fn, inputs)
    graph = _trace_step(fn, inputs)
    torch.manual_seed(5)
    with torch.no_grad():  # the graph holds the backward's ops: replayed as they are, no autograd
        replay = graph(*(t.detach() for t in inputs))
    # The full output: eager's CSR products against the traced slot-by-slot sums.
    exact = name != "ace_hypergraph full"
    _assert_same((replay[0], replay[1:]), eager, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5)


def test_loss_across_ranks_breaks_the_graph_at_its_shape_exchange(one_rank_group):
    """label_guided_infonce(group=) reads its shape exchange on the host: under torch.compile it runs
    eagerly, a graph break (the loss and its gradients are eager's bit for bit), which fullgraph=True
    refuses (the README said that nothing in the loss breaks the graph). Traced instead, torch 2.11's
    dynamo gave gradients of zero for every input, the loss right. One gloo rank of this process."""
    g = torch.Generator().manual_seed(1)
    u, t = (torch.nn.functional.normalize(torch.randn(19, 8, generator=g), dim=-1).requires_grad_()
            for _ in range(2))
    inputs = (u, t, torch.tensor(10.0, requires_grad=True))
    labels = torch.randint(0, 3, (19, 2), generator=g)

    def grouped(u, t, s):
        return ace_kernels.label_guided_infonce(u, t, s, labels, group=one_rank_group, backend="torch")

    torch._dynamo.reset()
    eager = _run(grouped, inputs)
    _assert_same(_run(torch.compile(grouped, backend="aot_eager"), inputs), eager, rtol=0, atol=0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="_eager_across_ranks"):
        torch.compile(grouped, fullgraph=True, backend="aot_eager")(*inputs)
    torch._dynamo.reset()  # nothing compiled over the group outlives it


def test_loss_across_ranks_under_non_strict_export_raises_no_recursion_error(one_rank_group):
    """Non-strict torch.export sets torch.compiler.is_compiling() but runs no Dynamo: the grouped loss
    handed itself to its disabled eager twin, which called the loss again under the same flag, a
    RecursionError. It now traces as eager code does, up to the host read of its shape exchange."""
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.tensor(10.0))

    def grouped(u, t, s):
        return ace_kernels.label_guided_infonce(u, t, s, group=one_rank_group, backend="torch")

    try:
        torch.export.export(_Function(grouped), inputs, strict=False)
    except RecursionError as exc:
        pytest.fail(f"non-strict export recursed: {exc}")
    except Exception:
        pass  # the shape exchange read on the host: torch's own data-dependent error
