"""LoRA q/k/v: ``ace_kernels.lora_qkv`` forward+backward against three reference LoRA
linears, three PEFT-style linears and (GPU) the frozen base GEMM alone.

Setting of the issues: K = out = 768, r = 4, scaling 0.5, dropout 0.1, x
needs a gradient (it is an activation), W and b are frozen. CPU: M = 8 * 197
in fp32 (target: at least 1.5x the reference). GPU: M in {64*197, 64*256,
1024*197} in bf16 (issue 3's targets).

Each provider is checked before it is timed, against the reference with dropout off
(``rel_err_vs_reference_p0``) and, on the timed path with dropout on, against the reference
formula with the masks it drew (``rel_err_vs_reference_p0.1_masks``); a row meets its targets
only when both are within ``harness.check_limit`` of its dtype.

At the last shape a second configuration freezes A (LoRA-FA's setting; the shape text ends in
"A frozen"): ours, the reference and PEFT-style each with A frozen, and beside them each of our
providers that passed with A trained, timed again in the same group: the rows ``<provider> vs
<provider> (A trained)`` measure what the backward saves when dA is not wanted. These rows have
no target (the issue's targets are for A trained) and no compiled baselines.
"""

from __future__ import annotations

import functools

import torch

import ace_kernels
from benchmarks import baselines, harness
from benchmarks.harness import Target

FAMILY = "lora"
SCALING = 0.5  # spec section 2: alpha / sqrt(r) with alpha 1, r 4
DROPOUT = 0.1


def _shapes(suite) -> list[dict]:
    if suite.quick:
        return [dict(m=2 * 37, k=96, out=80, r=4)]
    if suite.is_gpu:
        return [dict(m=m, k=768, out=768, r=4) for m in (64 * 197, 64 * 256, 1024 * 197)]
    return [dict(m=8 * 197, k=768, out=768, r=4)]


def _targets(suite):
    def targets(provider: str, baseline: str | None) -> list[Target]:
        if not suite.is_gpu:
            if provider == "torch" and baseline == "reference":
                return [Target("speedup", 1.5, "speedup>=1.5")]
            return []
        if provider not in ("triton", "cuda"):
            return []  # the GPU targets are the fused kernels'
        if baseline == "frozen-base":
            return [Target("speedup", 1 / 1.15, "time<=1.15x base", invert=True)]
        if baseline == "reference":
            return [Target("speedup", 2.0, "speedup>=2")]
        if baseline == "peft-style":
            return [Target("speedup", 1.4, "speedup>=1.4"),
                    Target("metric_max:saved_over_x", 1.1, "saved<=1.1x bytes(x)")]
        return []

    return targets


def _inputs(shape: dict, dtype, device, generator):
    m, k, out, r = shape["m"], shape["k"], shape["out"], shape["r"]

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=generator, device=device) * scale).to(dtype)

    x = rand(m, k).requires_grad_()
    weight = rand(3 * out, k, scale=k**-0.5)
    bias = rand(3 * out, scale=0.02)
    # B is non-zero (trained state) so the LoRA path contributes to every output.
    lora_a = rand(3, r, k, scale=k**-0.5).requires_grad_()
    lora_b = rand(3, out, r, scale=r**-0.5).requires_grad_()
    grad_out = [rand(m, out) for _ in range(3)]
    return x, weight, bias, lora_a, lora_b, grad_out


def reference_parts(x, weight, bias, lora_a, lora_b, grad_out):
    """A function giving the reference's q, k, v and its gradients of x, A and B with dropout
    off, computed at its first call only: every provider is checked against the one computation."""

    @functools.cache
    def parts():
        reference = baselines.ReferenceLoRAQKV(weight, bias, lora_a, lora_b, scaling=SCALING, dropout_p=0.0)
        x_ref = x.detach().clone().requires_grad_()
        outs_ref = reference(x_ref)
        torch.autograd.backward(outs_ref, grad_out)
        return outs_ref, x_ref.grad, *reference.stacked_grads()

    return parts


def _leaves(x, lora_a, lora_b, *, train_a=True):
    """Fresh leaves of x, A and B; A without a gradient when not ``train_a``."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b)]
    leaves[1].requires_grad_(train_a)
    return leaves


def _provider_step(provider, x, weight, bias, lora_a, lora_b, grad_out, dropout_p, train_a=True):
    """One forward+backward of ``provider`` on fresh leaves: (q, k, v, [x, A, B] leaves with
    their gradients, the masks it drew)."""
    from ace_kernels.lora import capture_dropout_masks

    leaves = _leaves(x, lora_a, lora_b, train_a=train_a)
    with capture_dropout_masks() as masks:
        outs = ace_kernels.lora_qkv(leaves[0], weight, bias, leaves[1], leaves[2], scaling=SCALING,
                                    dropout_p=dropout_p, training=True, backend=provider)
    torch.autograd.backward(outs, grad_out)
    return outs, leaves, masks[0]


def _max_error(outs, outs_ref, grads, grads_ref) -> float:
    pairs = zip([*outs, *grads], [*outs_ref, *grads_ref], strict=True)
    return max(harness.relative_error(a, b) for a, b in pairs)


def _compared_grads(leaves, grads_ref, train_a):
    """The gradients a check compares: of x, A and B, or of x and B alone when A is frozen."""
    if train_a:
        return [t.grad for t in leaves], grads_ref
    return [leaves[0].grad, leaves[2].grad], [grads_ref[0], grads_ref[2]]


def _check_against_reference(provider, x, weight, bias, lora_a, lora_b, grad_out, reference,
                             train_a=True) -> float:
    """Max relative error of q, k, v and every gradient against ``reference()`` (from
    :func:`reference_parts`), dropout off; with A frozen (not ``train_a``), of the gradients of x
    and B."""
    outs_ref, x_ref_grad, a_ref, b_ref = reference()
    outs, leaves, _ = _provider_step(provider, x, weight, bias, lora_a, lora_b, grad_out, 0.0, train_a)
    return _max_error(outs, outs_ref, *_compared_grads(leaves, [x_ref_grad, a_ref, b_ref], train_a))


def _check_with_dropout(provider, x, weight, bias, lora_a, lora_b, grad_out, train_a=True) -> float:
    """Max relative error of q, k, v and every gradient (with A frozen, of x and B), with dropout
    on (the path the step times), against the reference formula
    ``x W_p^T + b_p + s (x * m_p / (1 - p)) A_p^T B_p^T`` computed by torch in x's dtype with the
    masks ``m_p`` the provider drew (its mask export)."""
    outs, leaves, keep = _provider_step(provider, x, weight, bias, lora_a, lora_b, grad_out, DROPOUT,
                                        train_a)  # keep [3, M, K]
    x_ref, a_ref, b_ref = _leaves(x, lora_a, lora_b)
    out = weight.shape[0] // 3
    outs_ref = []
    for p in range(3):
        dropped = x_ref * keep[p].to(x.dtype) * (1.0 / (1.0 - DROPOUT))
        base = torch.nn.functional.linear(x_ref, weight[p * out:(p + 1) * out], bias[p * out:(p + 1) * out])
        outs_ref.append(base + SCALING * ((dropped @ a_ref[p].t()) @ b_ref[p].t()))
    torch.autograd.backward(outs_ref, grad_out)
    return _max_error(outs, outs_ref, *_compared_grads(leaves, [x_ref.grad, a_ref.grad, b_ref.grad], train_a))


def run(suite) -> None:
    device, dtype = suite.device, suite.dtype()
    generator = torch.Generator(device=device).manual_seed(0)
    shapes = _shapes(suite)
    for shape in shapes:
        if suite.out_of_time(f"lora_qkv {shape}"):
            return
        inputs = _inputs(shape, dtype, device, generator)
        reference = reference_parts(*inputs)  # computed once, by the first check: both configurations use it
        passed = _configuration(suite, shape, inputs, reference, train_a=True, targets=_targets(suite))
        if shape is shapes[-1] and not suite.out_of_time(f"lora_qkv {shape} A frozen"):
            _configuration(suite, shape, inputs, reference, train_a=False, trained=passed)
        del inputs, reference
        suite.release_cuda_memory()


def _configuration(suite, shape: dict, inputs, reference, *, train_a: bool, targets=None,
                   trained=()) -> list[str]:
    """Measure one configuration and add its rows; returns the providers that passed their checks.
    ``reference``: :func:`reference_parts` of ``inputs``, which the checks compare with.

    With A trained: ours against the reference, PEFT-style and (GPU) frozen-base baselines.
    With A frozen (LoRA-FA's setting, op rows with "A frozen" in the shape; no target): ours
    with a frozen A against the reference and PEFT-style with their A frozen too, and against
    each provider of ``trained`` with A trained, measured side by side: what dX without dA saves.
    """
    dtype = suite.dtype()
    x, weight, bias, lora_a, lora_b, grad_out = inputs
    ours_a = lora_a if train_a else lora_a.detach()
    m, k, out, r = shape["m"], shape["k"], shape["out"], shape["r"]
    shape_text = f"M={m} K={k} out={out} r={r} p={DROPOUT}" + ("" if train_a else " A frozen")
    x_mib = x.numel() * x.element_size() / harness.MIB
    flops = baselines.lora_flops_fwd_bwd(m, k, out, r)
    print(f" lora_qkv {shape_text} {dtype}")

    def extra_metrics(meas, saved_mib=None):
        metrics = {}
        if saved_mib is not None:
            metrics["saved_mib"] = round(saved_mib, 3)
            metrics["saved_over_x"] = saved_mib / x_mib  # not rounded: a target judges it
        metrics.update(suite.rate_metrics(meas, flops=flops))
        return metrics

    modules = {
        "reference": baselines.ReferenceLoRAQKV(weight, bias, lora_a, lora_b, scaling=SCALING, dropout_p=DROPOUT),
        "peft-style": baselines.PeftStyleLoRAQKV(weight, bias, lora_a, lora_b, scaling=SCALING, dropout_p=DROPOUT),
    }
    if not train_a:
        for module in modules.values():
            module.freeze_lora_a()
    elif suite.is_gpu:
        modules["frozen-base"] = baselines.FrozenBaseQKV(weight, bias)
    entries, forwards, frozen_of = [], {}, {}
    for name, module in modules.items():
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]

        def step(module=module):
            torch.autograd.backward(module(x), grad_out)

        entries.append((name, step, [x] + params))
        forwards[name] = lambda module=module: module(x)
        # Every parameter, frozen ones too: PEFT's base weight is a parameter without a gradient, not a
        # buffer, and what autograd keeps of it for dX is a weight, not an activation.
        frozen_of[name] = list(module.buffers()) + list(module.parameters())

    if train_a:
        grads_of = {name: grads for name, _, grads in entries}
        for name in ("peft-style", "reference"):
            entry = suite.compiled_entry(name, forwards[name], lambda outs: torch.autograd.backward(outs, grad_out),
                                         grads_of[name])
            if entry is not None:
                entries.append(entry)  # (its saved activations are inductor's business: not reported)

    def forward_of(provider, a):
        return lambda: ace_kernels.lora_qkv(x, weight, bias, a, lora_b, scaling=SCALING, dropout_p=DROPOUT,
                                            training=True, backend=provider)

    for provider in trained:  # checked in the configuration with A trained, just before
        name, forward = f"{provider} (A trained)", forward_of(provider, lora_a)
        entries.append((name, lambda forward=forward: torch.autograd.backward(forward(), grad_out),
                        [x, lora_a, lora_b]))
        forwards[name], frozen_of[name] = forward, [weight, bias, lora_a, lora_b]

    checked, providers = {}, []
    for provider in suite.providers:
        def probe(provider=provider):
            checked[provider] = (
                _check_against_reference(provider, x, weight, bias, lora_a, lora_b, grad_out, reference, train_a),
                _check_with_dropout(provider, x, weight, bias, lora_a, lora_b, grad_out, train_a))

        forward = forward_of(provider, ours_a)

        def step(forward=forward):
            torch.autograd.backward(forward(), grad_out)

        providers.append((provider, probe, step, [x, ours_a, lora_b] if train_a else [x, lora_b]))
        forwards[provider] = forward
        frozen_of[provider] = [weight, bias, lora_a, lora_b]

    # On a GPU the baselines are timed first and each provider is checked just before it is
    # timed: a fault in one provider's check costs only the providers after it.
    measured = suite.measure_checked(entries, providers)
    base_results, ours = {}, {}
    for name, meas in measured.items():
        saved = harness.saved_activation_mib(forwards[name], exclude=frozen_of[name]) if name in forwards else None
        metrics = extra_metrics(meas, saved)
        if name in checked:
            metrics["rel_err_vs_reference_p0"], metrics[f"rel_err_vs_reference_p{DROPOUT}_masks"] = checked[name]
            ours[name] = (meas, metrics)
        else:
            base_results[name] = (meas, metrics)
    suite.add_rows(family=FAMILY, op="lora_qkv", shape=shape_text, dtype=dtype, ours=ours, baselines=base_results,
                   targets=targets)
    return [name for name, (_, metrics) in ours.items() if harness.checks_pass(metrics, str(dtype))]
