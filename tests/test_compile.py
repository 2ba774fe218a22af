"""torch.compile: the three ops trace as one graph (fullgraph=True) and give eager's results.

CPU, torch backend (and ``backend="auto"``, which resolves to it here): ``aot_eager`` runs
the traced ATen graph with eager's random stream, so even dropout must match bit for bit;
``inductor`` generates code (its own random stream, so dropout off there). On a GPU the
Triton backend is compiled too.
"""

from __future__ import annotations

import pytest
import torch

import ace_kernels


def _lora_case(dropout_p: float, backend: str, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 40, generator=g).to(device).requires_grad_()
    w = torch.randn(3 * 24, 40, generator=g).to(device)
    b = torch.randn(3 * 24, generator=g).to(device)
    a = (0.1 * torch.randn(3, 4, 40, generator=g)).to(device).requires_grad_()
    bb = (0.1 * torch.randn(3, 24, 4, generator=g)).to(device).requires_grad_()

    def fn(x, a, bb):
        q, k, v = ace_kernels.lora_qkv(x, w, b, a, bb, scaling=0.5, dropout_p=dropout_p, training=True,
                                       backend=backend)
        return (q * k + v).sum()

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


def _hypergraph_case(backend: str, device="cpu"):
    torch.manual_seed(2)
    module = ace_kernels.ACEHypergraph(dim=16, hidden=8, topk=3).to(device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 16, generator=g).to(device).requires_grad_()
    cls_attn = torch.rand(2, 10, generator=g).to(device)

    def fn(x):
        return module(x, cls_attn, cls_only=True, backend=backend).square().sum()

    return fn, (x,)


def _run(fn, inputs, seed=5):
    torch.manual_seed(seed)
    out = fn(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs)


def _assert_same(compiled, eager, rtol, atol):
    torch.testing.assert_close(compiled[0], eager[0], rtol=rtol, atol=atol)
    for i, (got, want) in enumerate(zip(compiled[1], eager[1])):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"gradient {i}: {m}")


CASES = {
    "lora_qkv dropout": lambda backend: _lora_case(0.3, backend),
    "label_guided_infonce": _infonce_case,
    "ace_hypergraph cls_only": _hypergraph_case,
}


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_aot_eager_matches_eager_exactly(name, backend):
    torch._dynamo.reset()
    fn, inputs = CASES[name](backend)
    eager = _run(fn, inputs)
    compiled = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs)
    _assert_same(compiled, eager, rtol=0, atol=0)


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


@pytest.mark.gpu
def test_triton_fullgraph_inductor_on_gpu():
    # The Triton kernels inside their autograd.Functions, compiled whole by inductor: the three
    # ops in one function, so one compile (GPU time is scarce).
    torch._dynamo.reset()
    cases = [_lora_case(0.0, "triton", "cuda"), _infonce_case("triton", "cuda"), _hypergraph_case("triton", "cuda")]
    inputs = tuple(t for _, case_inputs in cases for t in case_inputs)
    sizes = [len(case_inputs) for _, case_inputs in cases]

    def fn(*tensors):
        total, start = 0.0, 0
        for (case_fn, _), size in zip(cases, sizes):
            total = total + case_fn(*tensors[start:start + size])
            start += size
        return total

    eager = _run(fn, inputs)
    compiled = _run(torch.compile(fn, fullgraph=True), inputs)
    _assert_same(compiled, eager, rtol=1e-4, atol=1e-4)
