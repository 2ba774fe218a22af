"""pytest-benchmark view of the suite: ``pytest benchmarks --benchmark-only``.

One modest shape per op (small on a CPU), every provider that runs here beside
the baselines, forward+backward, grouped per op so that pytest-benchmark's
table puts each baseline next to ours. ``python -m benchmarks`` is the full
suite (targets, peak memory, JSON rows, plot); this is the quick interactive view.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ace_kernels
from ace_kernels import _dispatch
from benchmarks import baselines, bench_contrastive, bench_hypergraph, bench_lora, harness

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
OURS = [p for p in ("torch", "triton", "cuda") if p in ace_kernels.available_backends() and (GPU or p == "torch")]


def ours(op: str) -> list[str]:
    """The backends of ``OURS`` that implement ``op`` (cuda has ace_hypergraph only)."""
    return [p for p in OURS if p in _dispatch._OPS[op].impls]


def _run(benchmark, step, leaves, rounds):
    def setup():
        for t in leaves:
            t.grad = None

    def call():
        step()
        if GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)


def _assert_checked(error):
    """Ours against the baseline once, before timing, by the suite's own check (outputs or loss
    and every gradient): within ``harness.check_limit``, since a benchmark of wrong results
    measures nothing."""
    limit = harness.check_limit(str(DTYPE))
    assert error <= limit, f"{error:g} off the baseline (limit {limit:g})"


def _rand(generator, *size, scale=1.0, grad=True):
    t = (torch.randn(*size, generator=generator) * scale).to(DEVICE, DTYPE)
    return t.requires_grad_() if grad else t


# ------------------------------------------------------------------ lora_qkv

LORA_M = 8 * 197 if GPU else 197


@pytest.fixture(scope="module")
def lora_inputs():
    g = torch.Generator().manual_seed(0)
    k = out = 768
    return dict(x=_rand(g, LORA_M, k), weight=_rand(g, 3 * out, k, scale=k**-0.5, grad=False),
                bias=_rand(g, 3 * out, scale=0.02, grad=False), lora_a=_rand(g, 3, 4, k, scale=k**-0.5),
                lora_b=_rand(g, 3, out, 4, scale=0.5), grad_out=[_rand(g, LORA_M, out, grad=False) for _ in range(3)])


@pytest.mark.benchmark(group=f"lora_qkv M={LORA_M} K=out=768 r=4 p=0.1 fwd+bwd")
@pytest.mark.parametrize("provider", ["reference", "peft-style"] + ours("lora_qkv"))
def test_lora_qkv(benchmark, lora_inputs, provider):
    t = lora_inputs
    if provider in ("reference", "peft-style"):
        cls = baselines.ReferenceLoRAQKV if provider == "reference" else baselines.PeftStyleLoRAQKV
        module = cls(t["weight"], t["bias"], t["lora_a"], t["lora_b"], scaling=0.5, dropout_p=0.1).train()
        leaves = [t["x"]] + module.lora_parameters()

        def step():
            torch.autograd.backward(module(t["x"]), t["grad_out"])
    else:
        leaves = [t["x"], t["lora_a"], t["lora_b"]]

        def step():
            outs = ace_kernels.lora_qkv(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], scaling=0.5,
                                        dropout_p=0.1, training=True, backend=provider)
            torch.autograd.backward(outs, t["grad_out"])

        inputs = (t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["grad_out"])
        _assert_checked(bench_lora._check_against_reference(provider, *inputs, bench_lora.reference_parts(*inputs)))
        _assert_checked(bench_lora._check_with_dropout(provider, *inputs))
    _run(benchmark, step, leaves, rounds=10 if GPU else 5)


# ------------------------------------------------------------------ ace_hypergraph

HG_B = 64 if GPU else 4


@pytest.fixture(scope="module")
def hypergraph_inputs():
    g = torch.Generator().manual_seed(1)
    n, d, h = 197, 512, 128
    adapter = lambda: (_rand(g, h, d, scale=(2 / d) ** 0.5), _rand(g, h, scale=0.02),  # noqa: E731
                       _rand(g, d, h, scale=(2 / h) ** 0.5), _rand(g, d, scale=0.02))
    return dict(x=_rand(g, HG_B, n, d), cls_attn=_rand(g, HG_B, n - 1), edge=adapter(), node=adapter(),
                grad_cls=_rand(g, HG_B, d, grad=False))


@pytest.mark.benchmark(group=f"ace_hypergraph cls_only B={HG_B} N=197 D=512 k=5 fwd+bwd")
@pytest.mark.parametrize("provider", ["reference"] + ours("ace_hypergraph"))
def test_ace_hypergraph_cls_only(benchmark, hypergraph_inputs, provider):
    t = hypergraph_inputs
    leaves = [t["x"], t["cls_attn"], *t["edge"], *t["node"]]
    if provider == "reference":
        fn = baselines.reference_ace_hypergraph_any_backend
    else:
        fn = ace_kernels.ace_hypergraph

    def step():
        kwargs = {} if provider == "reference" else {"backend": provider}
        fn(t["x"], t["cls_attn"], t["edge"], t["node"], topk=5, cls_only=True, **kwargs).backward(t["grad_cls"])

    if provider != "reference":
        # Against the dense reference in float32 on the same values (in bf16 it breaks top-k
        # near-ties differently from any fp32-accumulating implementation: bench_hypergraph).
        inputs = (t["x"], t["cls_attn"], t["edge"], t["node"], 5, True, t["grad_cls"])
        _assert_checked(bench_hypergraph._check(provider, *inputs, bench_hypergraph.reference_parts(*inputs)))
    _run(benchmark, step, leaves, rounds=5 if GPU else 3)


# ------------------------------------------------------------------ label_guided_infonce

LOSS_B = 8192 if GPU else 1024


@pytest.fixture(scope="module")
def loss_inputs():
    g = torch.Generator().manual_seed(2)
    u = F.normalize(torch.randn(LOSS_B, 512, generator=g), dim=-1).to(DEVICE, DTYPE).requires_grad_()
    t = F.normalize(torch.randn(LOSS_B, 512, generator=g), dim=-1).to(DEVICE, DTYPE).requires_grad_()
    scale = torch.tensor(78.35, device=DEVICE, requires_grad=True)
    labels = (torch.rand(LOSS_B, 14, generator=g) < 0.15).float().to(DEVICE)
    return dict(u=u, t=t, scale=scale, labels=labels)


@pytest.mark.benchmark(group=f"label_guided_infonce B={LOSS_B} D=512 labels fwd+bwd")
@pytest.mark.parametrize("provider", ["reference"] + ours("label_guided_infonce"))
def test_label_guided_infonce(benchmark, loss_inputs, provider):
    t = loss_inputs
    leaves = [t["u"], t["t"], t["scale"]]
    if provider == "reference":
        def step():
            baselines.reference_label_guided_infonce(t["u"], t["t"], t["scale"], t["labels"]).backward()
    else:
        def step():
            ace_kernels.label_guided_infonce(t["u"], t["t"], t["scale"], t["labels"], backend=provider).backward()

        reference = bench_contrastive.reference_parts(
            lambda u, v, s: baselines.reference_label_guided_infonce(u, v, s, t["labels"]), t["u"], t["t"], t["scale"])
        _assert_checked(max(bench_contrastive._check(provider, t["u"], t["t"], t["scale"], t["labels"],
                                                     reference).values()))
    _run(benchmark, step, leaves, rounds=5 if GPU else 3)


@pytest.mark.benchmark(group=f"clip loss B={LOSS_B} D=512 no labels fwd+bwd")
@pytest.mark.parametrize("provider", ["open_clip.ClipLoss"] + ours("label_guided_infonce"))
def test_clip_loss(benchmark, loss_inputs, provider):
    t = loss_inputs
    leaves = [t["u"], t["t"], t["scale"]]
    if provider == "open_clip.ClipLoss":
        try:
            clip_loss = baselines.open_clip_loss()
        except ImportError as exc:
            pytest.skip(str(exc))

        def step():
            clip_loss(t["u"], t["t"], t["scale"]).backward()
    else:
        def step():
            ace_kernels.label_guided_infonce(t["u"], t["t"], t["scale"], None, backend=provider).backward()

        reference = bench_contrastive.reference_parts(baselines.reference_label_guided_infonce, t["u"], t["t"],
                                                      t["scale"])
        _assert_checked(max(bench_contrastive._check(provider, t["u"], t["t"], t["scale"], None, reference).values()))
    _run(benchmark, step, leaves, rounds=5 if GPU else 3)
