"""Tests of ace_kernels.patch: the drop-in swap on real PEFT models, the reference
ACE-LoRA layout (tests/reference_modules.py) and open_clip's ClipLoss.

The "before" side of every comparison is the unpatched module itself (PEFT's,
open_clip's or the re-created reference forward), run on the same inputs; the
models run in fp64 so the only differences are summation order.
"""

import contextlib
import copy
import inspect
import math
import re
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ace_kernels
from ace_kernels.lora import capture_dropout_masks

from reference_modules import (Adapter, FakeFrame, ReferenceACELoss, ReferenceAttention, ReferenceCLIPLoss,
                               ReferenceLoRALinear, TinyCLIP)

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

# fp64 everywhere: the fused torch path and the original differ only in summation order
# (~1e-16 relative per op); 1e-10 leaves room for a few layers of accumulation.
FP64_TOL = dict(rtol=1e-10, atol=1e-10)

BERT_TARGETS = ["query", "key", "value"]


def _bert(lora_dropout=0.0, **lora_kwargs):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = get_peft_model(BertModel(config, add_pooling_layer=False),
                           LoraConfig(r=4, lora_alpha=1, lora_dropout=lora_dropout, target_modules=BERT_TARGETS,
                                      **lora_kwargs))
    return _randomise_lora(model.double())


def _vit(lora_dropout=0.0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0)
    model = get_peft_model(vit, LoraConfig(r=4, lora_alpha=1, lora_dropout=lora_dropout, target_modules=["qkv"]))
    return _randomise_lora(model.double())


def _randomise_lora(model):
    # PEFT initialises B = 0, which would make the LoRA term vanish from every comparison.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "w_lora" in name:
                param.normal_(0.0, 0.3)
    return model


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _fixed_weights(out):
    """Fixed random output weights: the loss gradient is these, never a degenerate one.

    (``out.square().sum()`` after a final LayerNorm is nearly constant, so its gradients
    would be rounding noise.) A private generator keeps the global random stream as is.
    """
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device, out.dtype)


def _forward_backward(model, run, inputs):
    """Output and the gradients of every trainable parameter and every input."""
    out = run(model, *inputs)
    loss = out if out.dim() == 0 else (out * _fixed_weights(out)).sum()
    targets = _trainable(model) + [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(loss, targets, allow_unused=True)
    return out.detach(), [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, targets, strict=True)]


def _inside(parent, fn, *args):
    """``fn(*args)`` run inside ``parent``'s forward (an instance forward for one call), where a
    patched q/k/v group keeps the outputs of one lora_qkv call for the members called after it."""
    parent.forward = lambda *a: fn(*a)
    try:
        return parent(*args)
    finally:
        del parent.forward


def _assert_same(before, after, tol=FP64_TOL):
    out_a, grads_a = before
    out_b, grads_b = after
    # Guard against a vacuous comparison: the gradients compared must be far above rounding noise.
    assert max(g.abs().max().item() for g in grads_a) > 1e-3
    torch.testing.assert_close(out_b, out_a, **tol)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, **tol)


def _state_snapshot(model):
    return {k: (v, v.data_ptr(), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}


def _assert_state_unchanged(model, snapshot):
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(snapshot)
    for key, (tensor, ptr, value) in snapshot.items():
        assert now[key] is tensor, key  # the same Parameter/buffer object
        assert now[key].data_ptr() == ptr, key
        assert torch.equal(now[key].detach(), value), key


def _assert_original_forwards(model, attrs=("forward", "apply_ace_hgat")):
    for name, module in model.named_modules():
        for attr in attrs:
            assert attr not in module.__dict__, f"{name}.{attr} still shadowed after undo"


def _run_bert(model, embeds):
    return model(inputs_embeds=embeds).last_hidden_state


def _run_vit(model, images):
    return model(images)


# ----------------------------------------------------------------------------------------
# PEFT
# ----------------------------------------------------------------------------------------


def test_peft_bert_qkv_grouped_exact_and_undo():
    model = _bert().train()
    embeds = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    snapshot = _state_snapshot(model)
    modules_before = dict(model.named_modules())
    before = _forward_backward(model, _run_bert, (embeds,))

    # Every LoRA factor and the input get a gradient well above rounding noise.
    assert all(g.abs().max().item() > 1e-3 for g in before[1])
    handle = ace_kernels.patch(model)
    assert [r.status for r in handle.records] == ["patched", "patched"]
    assert all(r.kind.startswith("qkv-group") and r.name.endswith("{query,key,value}") for r in handle.records)
    after = _forward_backward(model, _run_bert, (embeds,))
    # One lora_qkv per layer; key and value took the kept outputs.
    assert handle.stats() == {"lora_qkv": 2, "qkv cached": 4}
    _assert_same(before, after)
    _assert_state_unchanged(model, snapshot)

    handle.undo()
    assert not handle.active
    assert dict(model.named_modules()) == modules_before  # the same objects
    _assert_original_forwards(model)
    peft_linear = model.base_model.model.encoder.layer[0].attention.self.query
    assert peft_linear.forward.__func__ is type(peft_linear).forward
    # No hooks left on the attention modules.
    assert not model.base_model.model.encoder.layer[0].attention.self._forward_hooks
    again = _forward_backward(model, _run_bert, (embeds,))
    torch.testing.assert_close(again[0], before[0], rtol=0, atol=0)  # the original code path again
    _assert_state_unchanged(model, snapshot)
    handle.undo()  # idempotent


def test_peft_lorafa_optimizer_trains_the_patched_model_exactly():
    """PEFT's LoRA-FA optimizer (``create_lorafa_optimizer``) freezes every ``lora_A`` and trains B alone: the
    patched model groups q/k/v as before (the ops then form dX without dA), no A gets a gradient, and two steps
    leave every parameter equal to the unpatched model's two steps, to rounding."""
    optimizers = pytest.importorskip("peft.optimizers")
    embeds = torch.randn(3, 7, 32, dtype=torch.float64)
    trained = []
    for patched in (False, True):
        model = _bert().train()
        optimizer = optimizers.create_lorafa_optimizer(model, r=4, lora_alpha=1, lr=0.05)
        lora_a = [p for name, p in model.named_parameters() if "lora_A" in name]
        assert len(lora_a) == 6 and not any(p.requires_grad for p in lora_a)
        handle = ace_kernels.patch(model) if patched else None
        for _ in range(2):
            optimizer.zero_grad()
            out = _run_bert(model, embeds)
            (out * _fixed_weights(out)).sum().backward()
            assert all(p.grad is None for p in lora_a)
            optimizer.step()
        if patched:
            assert handle.stats() == {"lora_qkv": 4, "qkv cached": 8}
            handle.undo()
        trained.append({name: p.detach().clone() for name, p in model.named_parameters()})
    before, after = trained
    initial = dict(_bert().named_parameters())
    assert before.keys() == after.keys() == initial.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], **FP64_TOL, msg=name)
        # B moved (the steps were taken), A and the frozen base did not.
        assert torch.equal(before[name], initial[name]) == ("lora_B" not in name), name


def test_peft_members_changed_after_patching_run_ungrouped_exactly():
    """One member's scaling (or dropout p) changed after patching: q/k/v can no longer share one
    fused call (it takes one scaling and one p); each member runs on its own, with its own value."""
    def triple_key_scaling(model):
        for layer in model.base_model.model.encoder.layer:
            layer.attention.self.key.scaling["default"] *= 3

    def value_dropout(model):  # in eval mode: no mask drawn, but the p the fused call would take differs
        for layer in model.base_model.model.encoder.layer:
            layer.attention.self.value.lora_dropout["default"] = nn.Dropout(0.5).eval()

    for change in (triple_key_scaling, value_dropout):
        model = _bert().eval()
        embeds = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
        with ace_kernels.patch(model) as handle:
            change(model)
            after = _forward_backward(model, _run_bert, (embeds,))
            assert handle.stats() == {"qkv ungrouped: members differ in scaling, dropout or dtype": 6,
                                      "lora_linear": 6}, handle.stats()
        before = _forward_backward(model, _run_bert, (embeds,))  # PEFT's own forward, changed the same way
        _assert_same(before, after)


def test_peft_bert_gradient_checkpointing():
    """Recomputation in backward (non-reentrant checkpointing) regroups q/k/v exactly."""
    model = _bert().train()
    model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    embeds = torch.randn(2, 6, 32, dtype=torch.float64, requires_grad=True)
    before = _forward_backward(model, _run_bert, (embeds,))
    with ace_kernels.patch(model) as handle:
        after = _forward_backward(model, _run_bert, (embeds,))
        # Forward and the recomputation in backward: two lora_qkv calls per layer.
        assert handle.stats() == {"lora_qkv": 4, "qkv cached": 8}
    _assert_same(before, after)


def test_peft_bert_selective_checkpointing_saving_matmuls_with_dropout():
    """Selective activation checkpointing whose policy keeps the matmuls (torch's own example): the fused
    forward updated an addmm's (and a bmm's) result in place, which the policy kept, and the recomputation
    raised "Tensor cached during selective activation checkpoint has been mutated". The recomputed dropout
    masks are the forward's: gradients equal the same patched step without checkpointing, bit for bit."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    saved = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    model = _bert(lora_dropout=0.3).train()
    layers = model.base_model.model.encoder.layer
    embeds = torch.randn(2, 6, 32, dtype=torch.float64, requires_grad=True)
    with ace_kernels.patch(model) as handle:
        torch.manual_seed(5)
        plain = _forward_backward(model, _run_bert, (embeds,))
        for layer in layers:
            layer.forward = functools.partial(
                lambda run, *a, **k: checkpoint(run, *a, use_reentrant=False, context_fn=context_fn, **k),
                layer.forward)
        try:
            torch.manual_seed(5)
            recomputed = _forward_backward(model, _run_bert, (embeds,))
        finally:
            for layer in layers:
                del layer.forward
        # Two steps, each one lora_qkv call per layer; the recomputation adds one per layer.
        assert handle.stats() == {"lora_qkv": 6, "qkv cached": 12}, handle.stats()
    _assert_same(plain, recomputed, tol=dict(rtol=0, atol=0))


class _Checkpointed(nn.Module):
    """A layer run under torch.utils.checkpoint (as checkpoint_wrapper / apply_activation_checkpointing do)."""

    def __init__(self, inner, reentrant):
        super().__init__()
        self.inner, self.reentrant = inner, reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_peft_bert_checkpoint_around_each_qkv_member(reentrant):
    """A checkpoint around each q/k/v layer, not the attention: the first member's grouped call computed
    the other two inside its own checkpoint, whose recomputation (outside the attention's forward) runs that
    member alone, and non-reentrant checkpointing raised "Recomputed values for the following tensors have
    different metadata". Members called under another checkpoint than their attention run one by one:
    the step equals the same model's with grouping off, without checkpointing, bit for bit."""
    model = _bert(lora_dropout=0.3).train()
    embeds = torch.randn(2, 6, 32, dtype=torch.float64, requires_grad=True)

    def step():  # .backward(): reentrant checkpointing refuses autograd.grad
        for tensor in [*_trainable(model), embeds]:
            tensor.grad = None
        torch.manual_seed(5)
        out = _run_bert(model, embeds)
        (out * _fixed_weights(out)).sum().backward()
        return out.detach(), [t.grad for t in [*_trainable(model), embeds]]

    with ace_kernels.patch(model, group_qkv=False):
        want = step()
    with ace_kernels.patch(model) as handle:
        for layer in model.base_model.model.encoder.layer:
            attention = layer.attention.self
            for name in BERT_TARGETS:
                setattr(attention, name, _Checkpointed(getattr(attention, name), reentrant))
        got = step()
        assert "lora_qkv" not in handle.stats(), handle.stats()
    _assert_same(want, got, tol=dict(rtol=0, atol=0))


def test_non_finite_scaling_falls_back_to_the_original_forward():
    # lora_linear refuses a nan scaling; the patched layer runs PEFT's own forward, as unpatched.
    model = _vit().train()
    for module in model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            module.scaling["default"] = float("nan")
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = model(images)
    with ace_kernels.patch(model) as handle:
        got = model(images)
        assert handle.stats() == {"fallback peft-lora-linear: scaling is nan, not finite": 2}
    assert torch.isnan(want).all() and torch.isnan(got).all()


def test_peft_timm_fused_qkv_exact():
    model = _vit().train()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    snapshot = _state_snapshot(model)
    before = _forward_backward(model, _run_vit, (images,))
    with ace_kernels.patch(model) as handle:
        names = [r.name for r in handle.patched]
        assert names == ["base_model.model.blocks.0.attn.qkv", "base_model.model.blocks.1.attn.qkv"]
        after = _forward_backward(model, _run_vit, (images,))
        assert handle.stats() == {"lora_linear": 2}
        _assert_same(before, after)
        _assert_state_unchanged(model, snapshot)
    assert not handle.active
    _assert_original_forwards(model)


def test_peft_timm_fused_qkv_with_dropout_under_torch_compile():
    """The single-projection path (timm's fused qkv, or any LoRA layer left ungrouped) with dropout,
    compiled: aot_eager replays eager's random stream, so the compiled step equals the eager one."""
    model = _vit(lora_dropout=0.25).train()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    with ace_kernels.patch(model):
        torch.manual_seed(3)
        eager = _forward_backward(model, _run_vit, (images,))
        torch._dynamo.reset()
        torch.manual_seed(3)
        compiled = _forward_backward(torch.compile(model, backend="aot_eager"), _run_vit, (images,))
    torch._dynamo.reset()
    _assert_same(eager, compiled, dict(rtol=0, atol=0))


def test_peft_grouped_qkv_compiles_as_one_graph():
    """A patched PEFT BERT compiles with fullgraph=True, as the unpatched one does: the q/k/v group
    runs member by member under compile (its kept outputs' guards would break the graph)."""
    model = _bert().train()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    with ace_kernels.patch(model) as handle:
        eager = _forward_backward(model, _run_bert, (embeds,))
        assert handle.stats()["lora_qkv"] == 2  # eager: grouped
        torch._dynamo.reset()
        compiled_model = torch.compile(model, backend="aot_eager", fullgraph=True)
        compiled = _forward_backward(compiled_model, _run_bert, (embeds,))
        assert handle.stats()["lora_linear"] == 6  # traced once: three members in each of two layers
    torch._dynamo.reset()
    _assert_same(eager, compiled)


def test_changed_scaling_compiles_as_one_graph():
    """A PEFT layer's scaling changed after a compile (set_scale, a schedule) is traced as a symbolic
    float on the recompile; patch's finiteness check called math.isfinite on it, which Dynamo refuses
    (fullgraph=True failed, a graph break otherwise)."""
    model = _peft_single()
    x = torch.randn(3, 8, dtype=torch.float64)
    with ace_kernels.patch(model) as handle:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        for scaling in (0.5, 2.0):
            _peft_layer(model).scaling["default"] = scaling
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
        assert handle.stats()["lora_linear"] == 4  # two traces (a recompile for the new value), two eager calls
    torch._dynamo.reset()


def test_qkv_triples_that_cannot_group_are_recorded_as_single_layers():
    """Members that differ at patch time in bias, rank or dropout p never group: the records say lora_linear
    and why, as the calls then run (they said lora_qkv and fell back on every call)."""

    class Attn(nn.Module):  # Whisper/BART style: k_proj has no bias
        def __init__(self, k_bias):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 32)
            self.k_proj = nn.Linear(32, 32, bias=k_bias)

        def forward(self, x):
            return self.q_proj(x) * self.k_proj(x) + self.v_proj(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.attn2, self.attn3 = Attn(k_bias=False), Attn(k_bias=True), Attn(k_bias=True)

        def forward(self, x):
            return self.attn(x) + self.attn2(x) + self.attn3(x)

    torch.manual_seed(0)
    model = _randomise_lora(get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj"], rank_pattern={"attn2.v_proj": 2})).double())
    # attn3: v's dropout p differs (in eval: no mask drawn, but one fused call takes one p).
    model.base_model.model.attn3.v_proj.lora_dropout["default"] = nn.Dropout(0.3).eval()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    run = lambda m, a: m(a)  # noqa: E731
    before = _forward_backward(model, run, (x,))
    with ace_kernels.patch(model) as handle:
        routes = {r.name.rsplit(".", 2)[-2]: r.reason for r in handle.patched}
        assert routes["attn"].endswith("(q/k/v not grouped: some members have a bias and some do not)")
        assert routes["attn2"].endswith("(q/k/v not grouped: members differ in rank, scaling or dropout)")
        assert routes["attn3"].endswith("(q/k/v not grouped: members differ in rank, scaling or dropout)")
        assert all(r.reason.startswith("-> lora_linear") for r in handle.patched) and len(handle.patched) == 9
        after = _forward_backward(model, run, (x,))
        assert handle.stats() == {"lora_linear": 9}
    _assert_same(before, after)


def test_qkv_members_that_differ_in_scaling_alone_are_recorded_as_single_layers():
    """A key with its own lora_alpha (alpha_pattern; a reference k_proj with its own scaling) has query's and
    value's rank and dropout but another scaling, which one lora_qkv call cannot take (nor a reference v_proj's
    own dropout p): the members are recorded, and run, as single lora_linear layers saying why (a group record
    would list a lora_qkv call that none of their calls makes)."""
    model = _bert(alpha_pattern={"key": 3}).eval()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    before = _forward_backward(model, _run_bert, (embeds,))
    with ace_kernels.patch(model) as handle:
        assert [r.reason for r in handle.records] == [
            "-> lora_linear (q/k/v not grouped: members differ in rank, scaling or dropout)"] * 6
        after = _forward_backward(model, _run_bert, (embeds,))
        assert handle.stats() == {"lora_linear": 6}, handle.stats()
    _assert_same(before, after)

    # The reference layout: k_proj's scaling set on its own; or v_proj's dropout p (in eval: no mask drawn, but
    # one fused call takes one p).
    def set_k_scaling(attention):
        attention.k_proj.scaling = 0.9

    def set_v_dropout(attention):
        attention.v_proj.dropout = nn.Dropout(0.3).eval()

    for change in (set_k_scaling, set_v_dropout):
        attention = _randomise_lora(ReferenceAttention(16, 2, r=2).double()).train()
        change(attention)
        x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
        run = lambda m, a: m(a)  # noqa: E731
        before = _forward_backward(attention, run, (x,))
        with ace_kernels.patch(attention) as handle:
            assert [(r.name, r.reason) for r in handle.records] == [
                (name, "-> lora_linear (q/k/v not grouped: members differ in rank, scaling or dropout)")
                for name in ("q_proj", "k_proj", "v_proj")]
            after = _forward_backward(attention, run, (x,))
            assert handle.stats() == {"lora_linear": 3}, handle.stats()
        _assert_same(before, after)


class _AttentionBlock(nn.Module):
    """nn.MultiheadAttention, then a linear (open_clip's residual block, reduced)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.c_fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.c_fc(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("targets, skipped_name, kind, reason", [
    (["attn", "c_fc"], "base_model.model.attn", "peft-lora-multihead-attention",
     "PEFT LoRA on nn.MultiheadAttention (it merges the LoRA weights into the attention's own projections around "
     "each call): left as PEFT runs it"),
    (["out_proj", "c_fc"], "base_model.model.attn.out_proj", "peft-lora-linear",
     "the out_proj of an nn.MultiheadAttention, which reads out_proj.weight itself: this LoRA layer's forward never "
     "runs, patched or not"),
], ids=["attention", "out_proj"])
def test_peft_lora_on_multihead_attention_is_reported_skipped(targets, skipped_name, kind, reason):
    """PEFT's LoRA on nn.MultiheadAttention (open_clip's towers) is left as PEFT runs it and said so;
    the LoRA layer PEFT puts on its out_proj, which never runs, is not counted as patched. The same for
    a LoRA on the out_proj alone of a plain nn.MultiheadAttention (target_modules=["out_proj"]): the
    attention reads out_proj.weight itself (it was listed as patched, with no call ever counted)."""
    torch.manual_seed(0)
    model = _randomise_lora(get_peft_model(_AttentionBlock(), LoraConfig(r=4, target_modules=targets)).double())
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    run = lambda m, a: m(a)  # noqa: E731
    before = _forward_backward(model, run, (x,))
    with ace_kernels.patch(model) as handle:
        assert [r.name for r in handle.patched] == ["base_model.model.c_fc"]
        assert [(r.name, r.kind, r.reason) for r in handle.skipped] == [(skipped_name, kind, reason)]
        assert "nn.MultiheadAttention" in handle.summary()
        after = _forward_backward(model, run, (x,))
        assert handle.stats() == {"lora_linear": 1}
    _assert_same(before, after)


class _OwnAttention(nn.Module):
    """An attention of its own whose forward calls its out_proj (as HF CLIP's and BART's do)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out_proj = nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out_proj(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)


def test_a_lora_out_proj_of_another_attention_than_multihead_attention_is_patched():
    """Only nn.MultiheadAttention reads out_proj.weight itself: an attention of another class calls its
    out_proj, whose LoRA layer is patched (not skipped as one whose forward never runs) and computes exactly."""
    torch.manual_seed(0)
    model = _randomise_lora(get_peft_model(_OwnAttention(), LoraConfig(r=4, target_modules=["out_proj"])).double())
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    run = lambda m, a: m(a)  # noqa: E731
    before = _forward_backward(model, run, (x,))
    with ace_kernels.patch(model) as handle:
        assert [(r.name, r.status, r.reason) for r in handle.records] == [
            ("base_model.model.out_proj", "patched", "-> lora_linear")], str(handle)
        after = _forward_backward(model, run, (x,))
        assert handle.stats() == {"lora_linear": 1}
    _assert_same(before, after)


def test_peft_dropout_on_matches_masks_and_trains():
    """With dropout on, the fused path's output equals PEFT's formula with the masks it drew."""
    model = _bert(lora_dropout=0.5).train()
    layer = model.base_model.model.encoder.layer[0].attention.self
    x = torch.randn(4, 9, 32, dtype=torch.float64)
    with ace_kernels.patch(model) as handle, capture_dropout_masks() as masks:
        q, k, v = _inside(layer, lambda a: (layer.query(a), layer.key(a), layer.value(a)), x)
    assert handle.stats() == {"lora_qkv": 1, "qkv cached": 2}
    assert len(masks) == 1 and masks[0].shape == (3, 4, 9, 32)
    keep = masks[0].double()
    for index, (proj, out) in enumerate(zip((layer.query, layer.key, layer.value), (q, k, v), strict=True)):
        base = proj.base_layer
        lora_a, lora_b = proj.lora_A["default"].weight, proj.lora_B["default"].weight
        expected = F.linear(x, base.weight, base.bias) + proj.scaling["default"] * (
            (x * keep[index] / 0.5) @ lora_a.t()) @ lora_b.t()
        torch.testing.assert_close(out, expected, **FP64_TOL)
    # Keep rate ~ 1 - p: 3456 Bernoulli(0.5) draws, 6 sigma is about 0.05.
    assert abs(keep.mean().item() - 0.5) < 0.05
    # Independent masks per projection, as three nn.Dropout layers would draw.
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[1], keep[2])

    # Training runs with dropout on: a few steps reduce a regression loss.
    torch.manual_seed(3)
    target = torch.randn(4, 9, 32, dtype=torch.float64)
    optimizer = torch.optim.SGD(_trainable(model), lr=0.05)
    losses = []
    with ace_kernels.patch(model) as handle:
        for _ in range(8):
            optimizer.zero_grad()
            loss = (_run_bert(model, x) - target).square().mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert handle.stats()["lora_qkv"] == 16
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_peft_eval_mode_no_dropout_exact():
    """In eval mode PEFT's dropout is off; the fused path must be too."""
    model = _bert(lora_dropout=0.5).eval()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    before = _forward_backward(model, _run_bert, (embeds,))
    with ace_kernels.patch(model) as handle:
        after = _forward_backward(model, _run_bert, (embeds,))
        assert handle.stats()["lora_qkv"] == 2
    _assert_same(before, after)


def test_peft_merged_disabled_multi_adapter_fall_back_exactly():
    model = _bert().eval()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64)
    reference = _run_bert(model, embeds).detach()

    model.base_model.merge_adapter()
    merged_out = _run_bert(model, embeds).detach()
    with ace_kernels.patch(model) as handle:
        fallback = [r for r in handle.records if r.status == "fallback"]
        assert len(fallback) == 2 and all("merged" in r.reason for r in fallback)
        assert handle.patched == fallback and not handle.skipped  # swapped, falling back for now
        text = handle.summary()
        assert "falling back" in text and "merged" in text and "{query,key,value}" in text
        # Listed under their own heading, not among the fused ones.
        assert "\nfalling back to the original forward:\n" in text and "\npatched:" not in text, text
        # Same code path as PEFT's own forward: bitwise equal.
        torch.testing.assert_close(_run_bert(model, embeds), merged_out, rtol=0, atol=0)
        assert set(handle.stats()) == {"fallback peft-lora-linear: adapter merged into the base weight"}
        # Unmerging switches the same patch to the fused path by itself.
        model.base_model.unmerge_adapter()
        handle.reset_stats()
        torch.testing.assert_close(_run_bert(model, embeds), reference, **FP64_TOL)
        assert handle.stats() == {"lora_qkv": 2, "qkv cached": 4}

        handle.reset_stats()
        with model.disable_adapter():
            base_only = _run_bert(model, embeds)
        assert set(handle.stats()) == {"fallback peft-lora-linear: adapters disabled"}
    with model.disable_adapter():
        torch.testing.assert_close(base_only, _run_bert(model, embeds), rtol=0, atol=0)

    # Two adapters active at once: PEFT sums both branches; the patch falls back.
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=1, target_modules=BERT_TARGETS))
    _randomise_lora(model.double())
    model.base_model.set_adapter(["default", "second"])
    both = _run_bert(model, embeds).detach()
    with ace_kernels.patch(model) as handle:
        torch.testing.assert_close(_run_bert(model, embeds), both, rtol=0, atol=0)
        assert set(handle.stats()) == {
            "fallback peft-lora-linear: 2 active adapters (the fused path takes exactly one)"}
        assert "2 active adapters" in str(handle)
    # Only the second adapter active: the fused path serves it.
    model.base_model.set_adapter("second")
    second = _forward_backward(model, _run_bert, (embeds.clone().requires_grad_(),))
    with ace_kernels.patch(model) as handle:
        _assert_same(second, _forward_backward(model, _run_bert, (embeds.clone().requires_grad_(),)))
        assert handle.stats()["lora_qkv"] == 2


def test_a_peft_layer_without_the_active_adapter_runs_its_base_layer():
    """PEFT's set_adapter makes an adapter active in every LoRA layer, also those it does not target, whose
    forward then runs the base layer alone: such a layer falls back (no adapter of its own is active, and the
    active one's weights are not there to read), the targeted one is fused, and the model computes as PEFT's."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["1"]))
    model.set_adapter("other")
    model = _randomise_lora(model.double())
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    run = lambda m, a: m(a)  # noqa: E731
    before = _forward_backward(model, run, (x,))
    reason = "0 active adapters (the fused path takes exactly one)"
    with ace_kernels.patch(model) as handle:
        assert [(r.name, r.status, r.reason) for r in handle.records] == [
            ("base_model.model.0", "fallback", reason), ("base_model.model.1", "patched", "-> lora_linear")]
        after = _forward_backward(model, run, (x,))
        assert handle.stats() == {f"fallback peft-lora-linear: {reason}": 1, "lora_linear": 1}, handle.stats()
    _assert_same(before, after)


def test_peft_dora_and_adapter_names_fall_back():
    model = _bert(use_dora=True).train()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    before = _forward_backward(model, _run_bert, (embeds,))
    with ace_kernels.patch(model) as handle:
        assert len(handle.records) == 2  # the two layers' q/k/v groups
        assert all(r.status == "fallback" and "variant" in r.reason for r in handle.records)
        after = _forward_backward(model, _run_bert, (embeds,))
        assert handle.stats() and all(key.startswith("fallback") for key in handle.stats())
    _assert_same(before, after, dict(rtol=0, atol=0))

    # adapter_names= (mixed-batch inference) goes to PEFT's forward untouched.
    plain = _bert().eval()
    layer = plain.base_model.model.encoder.layer[0].attention.self.query
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    expected = layer(x, adapter_names=["default", "__base__"])
    with ace_kernels.patch(plain) as handle:
        torch.testing.assert_close(layer(x, adapter_names=["default", "__base__"]), expected, rtol=0, atol=0)
        assert any("extra forward arguments" in key for key in handle.stats())


@pytest.mark.parametrize("part", ["base_layer", "lora_A", "lora_B", "lora_dropout"])
def test_a_sub_layer_with_a_replaced_forward_falls_back(part):
    # accelerate-style wrappers set ``forward`` on the instance instead of registering a hook: the
    # fused call, which reads the weights and never calls the sub-layers, must not skip it.
    model = _bert().eval()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64)
    for layer in model.base_model.model.encoder.layer:
        query = layer.attention.self.query
        module = query.base_layer if part == "base_layer" else getattr(query, part)["default"]
        module.forward = (lambda original: (lambda t: original(t) * 2.0))(module.forward)
    expected = _run_bert(model, embeds)
    with ace_kernels.patch(model) as handle:
        torch.testing.assert_close(_run_bert(model, embeds), expected, **FP64_TOL)
        assert any("forward replaced on the base or LoRA sub-layers" in key for key in handle.stats())


def _peft_single(**config):
    torch.manual_seed(0)
    return _randomise_lora(get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(
        r=2, target_modules=["0"], **config)).double()).train()


def _reference_single(dropout_rate):
    torch.manual_seed(0)
    return _randomise_lora(ReferenceLoRALinear(8, 8, r=2, dropout_rate=dropout_rate).double()).train()


class _DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _peft_on_qat_base():
    # torch.ao's QAT Linear (float32 only) fake-quantises its weight in its forward; its class is named Linear too.
    from torch.ao.nn.qat import Linear as QATLinear
    from torch.ao.quantization import get_default_qat_qconfig

    torch.manual_seed(0)
    base = nn.Sequential(QATLinear(8, 8, qconfig=get_default_qat_qconfig()))
    return _randomise_lora(get_peft_model(base, LoraConfig(r=2, target_modules=["0"])))


def _global_linear_hook():
    from torch.nn.modules.module import register_module_forward_hook

    return register_module_forward_hook(lambda module, args, out: out * 1.5 if isinstance(module, nn.Linear) else None)


def _bf16_autocast():
    # A CPU autocast region, entered now and left by .remove() (as the hook contexts below are).
    region = torch.autocast("cpu", dtype=torch.bfloat16)
    region.__enter__()
    return SimpleNamespace(remove=lambda: region.__exit__(None, None, None))


def _reference_lora_to(dtype):
    def change(layer):
        with torch.no_grad():
            layer.w_lora_A.data, layer.w_lora_B.data = layer.w_lora_A.to(dtype), layer.w_lora_B.to(dtype)
    return change


def _reference_lora_b_to_float32(layer):
    # w_lora_A stays in x's dtype: the second matmul alone refuses the pair.
    layer.w_lora_B = nn.Parameter(layer.w_lora_B.detach().float())


def _peft_bias_to(dtype):
    def change(model):
        base = _peft_layer(model).base_layer
        base.bias = nn.Parameter(base.bias.detach().to(dtype))
    return change


def _peft_fp32_lora_without_input_casting(model):
    # peft.helpers.disable_input_dtype_casting's switch: the layer's x then meets its float32 lora_A as it is.
    layer = _peft_layer(model)
    layer.lora_A.float(), layer.lora_B.float()
    layer.cast_input_dtype_enabled = False


def _set_peft_dropout(dropout):
    def change(model):
        model.base_model.model[0].lora_dropout["default"] = dropout
    return change


def _hook_reference_dropout(layer):
    layer.dropout.register_forward_hook(lambda module, args, out: torch.zeros_like(out))


def _reference_eval_unmerged(layer):
    # nn.Module's own train(False) (the reference's merges B A into the weight), then the dropout alone back in
    # training: the reference applies its dropout only while the layer itself trains, so no mask is drawn.
    nn.Module.train(layer, False)
    layer.dropout.train()


def _peft_layer(model):
    return model.base_model.model[0]


def _doubled_lora_a(model):
    layer = _peft_layer(model)
    doubled = _DoubledLinear(8, 2, bias=False).double()
    doubled.weight = layer.lora_A["default"].weight
    layer.lora_A["default"] = doubled


def _tensor_scaling(model):
    _peft_layer(model).scaling["default"] = torch.tensor(0.5, dtype=torch.float64)


def _hook_peft_lora_a(model):
    _peft_layer(model).lora_A["default"].register_forward_hook(lambda module, args, out: out * 3.0)


def _parametrize_peft_base(model):
    from torch.nn.utils import parametrize

    class Halve(nn.Module):
        def forward(self, weight):
            return 0.5 * weight

    parametrize.register_parametrization(_peft_layer(model).base_layer, "weight", Halve())


# A subclass of nn.Dropout may compute otherwise; the probe, with dropout off, would not see it.
class _HalvingDropout(nn.Dropout):
    def forward(self, x):
        return 0.5 * super().forward(x)


# name: (build, change after building, input dtype, a context around both calls, what the handle shows)
_PER_CALL_CASES = {
    "peft-global-module-hook": (_peft_single, None, torch.float64, _global_linear_hook, "global module hooks"),
    "peft-AlphaDropout": (_peft_single, _set_peft_dropout(nn.AlphaDropout(0.5)), torch.float64, None,
                          "dropout is AlphaDropout"),
    "peft-nn.Dropout-subclass": (_peft_single, _set_peft_dropout(_HalvingDropout(0.5)), torch.float64, None,
                                 "dropout is _HalvingDropout"),
    "peft-lora_bias": (lambda: _peft_single(lora_bias=True), None, torch.float64, None, "lora_bias=True"),
    "peft-nn.Linear-subclass": (lambda: _randomise_lora(get_peft_model(nn.Sequential(_DoubledLinear(8, 8)), LoraConfig(
        r=2, target_modules=["0"])).double()), None, torch.float64, None, "base layer is _DoubledLinear"),
    "peft-qat-base": (_peft_on_qat_base, None, torch.float32, None,
                      "base layer is Linear (torch.ao.nn.qat.modules.linear), not a plain nn.Linear"),
    "peft-dropout-in-eval": (lambda: _peft_single(lora_dropout=0.5),
                             lambda m: m.base_model.model[0].lora_dropout["default"].eval(), torch.float64, None,
                             "lora_linear"),
    "peft-dropout-p=1": (_peft_single, _set_peft_dropout(nn.Dropout(1.0)), torch.float64, None, "dropout p = 1"),
    "peft-float32-input": (_peft_single, None, torch.float32, None, "input dtype torch.float32 differs"),
    # F.linear refuses a bias in another dtype than x and the weight.
    "peft-float32-bias": (_peft_single, _peft_bias_to(torch.float32), torch.float64, None,
                          "input dtype torch.float64 differs from the bias's torch.float32"),
    "reference-hooked-dropout": (lambda: _reference_single(0.1), _hook_reference_dropout, torch.float64, None,
                                 "hooks (or a replaced forward)"),
    # Global module hooks fire for the reference's dropout sub-layer too (its masks then come from its own call).
    "reference-global-module-hook": (lambda: _reference_single(0.1), None, torch.float64, _global_linear_hook,
                                     "hooks (or a replaced forward)"),
    "reference-dropout-in-eval": (lambda: _reference_single(0.5), lambda m: m.dropout.eval(), torch.float64, None,
                                  "lora_linear"),
    "reference-layer-in-eval-dropout-in-training": (lambda: _reference_single(0.5), _reference_eval_unmerged,
                                                    torch.float64, None, "lora_linear"),
    "peft-lora_A-subclass": (_peft_single, _doubled_lora_a, torch.float64, None,
                             "lora_A/lora_B are _DoubledLinear/Linear, not nn.Linear"),
    "peft-tensor-scaling": (_peft_single, _tensor_scaling, torch.float64, None, "scaling is not a number"),
    "peft-hooked-lora_A": (_peft_single, _hook_peft_lora_a, torch.float64, None,
                           "hooks on the base or LoRA sub-layers"),
    "peft-parametrized-base": (_peft_single, _parametrize_peft_base, torch.float64, None,
                               "parametrized base weight"),
    "reference-dropout-p=1": (lambda: _reference_single(1.0), None, torch.float64, None, "dropout p = 1"),
    # F.linear under autocast casts float32/16 operands only: a float64 weight beside them is refused.
    "peft-float64-weight-under-autocast": (_peft_single, None, torch.float32, _bf16_autocast,
                                           "torch.float64 weight under autocast"),
    "peft-float64-bias-under-autocast": (lambda: _peft_single().float(), _peft_bias_to(torch.float64), torch.float32,
                                         _bf16_autocast, "torch.float64 bias under autocast"),
    "reference-float64-weight-under-autocast": (lambda: _reference_single(0.0), None, torch.float32, _bf16_autocast,
                                                "torch.float64 weight under autocast"),
    # The reference multiplies by w_lora_A/B with matmul, which refuses mixed dtypes (PEFT casts x to theirs).
    "reference-float32-lora-float64-input": (lambda: _reference_single(0.0), _reference_lora_to(torch.float32),
                                             torch.float64, None, "differs from the LoRA weights'"),
    "reference-float32-lora_B-float64-input": (lambda: _reference_single(0.0), _reference_lora_b_to_float32,
                                               torch.float64, None,
                                               "differs from the LoRA weights' torch.float64/torch.float32"),
    "peft-float32-lora-without-input-casting": (_peft_single, _peft_fp32_lora_without_input_casting, torch.float64,
                                                None, "differs from the LoRA weights'"),
    "reference-float64-lora-under-autocast": (lambda: _reference_single(0.0).float(),
                                              _reference_lora_to(torch.float64), torch.float32, _bf16_autocast,
                                              "torch.float64 LoRA weight under autocast"),
}


@pytest.mark.parametrize("case", list(_PER_CALL_CASES))
def test_per_call_states_the_fused_path_does_not_take_run_as_unpatched(case):
    """A LoRA layer in a state the fused call would compute otherwise (a global module hook, a
    dropout type or a LoRA bias it does not apply, a base nn.Linear subclass (torch.ao's QAT Linear,
    also named Linear: the reason names its module), p = 1, an input dtype F.linear refuses (or, under
    autocast, a float64 weight), LoRA weights in a dtype the reference's matmuls refuse, a hook on the
    reference's dropout or on PEFT's lora_A, a lora_A that is an nn.Linear subclass, a scaling that is
    a tensor, a parametrized base weight) runs its original forward; a
    dropout put in eval on its own is applied as the layer's call applies it (no mask, though
    the layer trains). Patched and unpatched give the same result (or the same error), from the
    same random state."""
    build, change, dtype, context, shown = _PER_CALL_CASES[case]
    model = build()
    if change is not None:
        change(model)
    x = torch.randn(3, 8, dtype=dtype)

    def call():
        torch.manual_seed(3)
        hook = context() if context is not None else None
        try:
            return model(x)
        except RuntimeError as exc:
            return exc
        finally:
            if hook is not None:
                hook.remove()

    want = call()
    with ace_kernels.patch(model) as handle:
        got = call()
        shows = list(handle.stats()) + [r.reason for r in handle.records]
    if isinstance(want, Exception):
        assert type(got) is type(want) and str(got) == str(want), got
    else:
        torch.testing.assert_close(got, want, **FP64_TOL)
    assert any(shown in entry for entry in shows), shows


def test_a_patch_that_fails_midway_leaves_nothing_patched(monkeypatch):
    # A recogniser that raises after others have installed: patch() undoes what it did before
    # raising, so no module is left with a replaced forward and no handle to undo it.
    from ace_kernels import patching

    model = _bert().eval()
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    def install(*args):
        raise RuntimeError("boom")

    last = model.base_model.model.encoder.layer[-1].output.LayerNorm  # visited after every q/k/v group
    failing = patching.Recogniser(name="failing", family="lora", matches=lambda m: m is last, install=install)
    patching.register_recogniser(failing)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            ace_kernels.patch(model)
    finally:
        patching.unregister_recogniser(failing)
    after = {name: dict(m.__dict__) for name, m in model.named_modules()}
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].keys() == before[name].keys(), name
        assert all(after[name][k] is before[name][k] for k in before[name]), name


def test_peft_hooks_and_autocast():
    """Hooks on a q/k/v member, run by BERT's own attention forward (where the members group):
    a pre-hook on key that changes its input must not get the output kept for the original
    input, and one that leaves the input alone but changes key's own state (as weight_norm's
    recomputation does) must have key computed with that state, not handed the output query's
    fused call computed before the hook ran."""
    model = _bert().eval()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64)
    keys = [layer.attention.self.key for layer in model.base_model.model.encoder.layer]

    hooks = [key.register_forward_pre_hook(lambda module, args: (args[0] * 2.0,)) for key in keys]
    expected = _run_bert(model, embeds)
    with ace_kernels.patch(model) as handle:
        torch.testing.assert_close(_run_bert(model, embeds), expected, **FP64_TOL)
        assert "qkv cached" not in handle.stats(), handle.stats()
    for hook in hooks:
        hook.remove()

    def bump_lora_b(module, args):
        with torch.no_grad():
            module.lora_B["default"].weight.mul_(2.0)

    hooks = [key.register_forward_pre_hook(bump_lora_b) for key in keys]
    expected = _run_bert(model, embeds)  # with each key's B doubled by its hook
    with torch.no_grad():
        for key in keys:
            key.lora_B["default"].weight.div_(2.0)
    with ace_kernels.patch(model) as handle:
        got = _run_bert(model, embeds)  # the hooks double B again, before key computes
        assert handle.stats()["qkv ungrouped: hooks on a member"] == 2, handle.stats()
    torch.testing.assert_close(got, expected, **FP64_TOL)
    for hook in hooks:
        hook.remove()

    # Under CPU autocast (bf16) the fused call runs in bf16 like F.linear would.
    model32 = _bert().float().eval()
    embeds = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _run_bert(model32, embeds).float()
        with ace_kernels.patch(model32) as handle:
            got = _run_bert(model32, embeds).float()
            assert handle.stats()["lora_qkv"] == 2
    # bf16 has 8 mantissa bits: two layers of bf16 GEMMs differ by a few bf16 ulps of O(1) values.
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


def test_backward_hooks_on_the_first_member_leave_grouping_on():
    """A full backward (pre-)hook on the member the attention calls first hands its forward another tensor than
    the one the other members get (the hook's wrapper): computed per member while the hook is there, exactly, and
    grouped again once it is removed (it once turned grouping off for good, as cross-attention does)."""
    model = _bert().train()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    query = model.base_model.model.encoder.layer[0].attention.self.query
    for register in (lambda: query.register_full_backward_hook(lambda m, gi, go: seen.append(gi[0].clone())),
                     lambda: query.register_full_backward_pre_hook(lambda m, go: seen.append(go[0].clone()))):
        seen = []
        hook = register()
        expected = _forward_backward(model, _run_bert, (embeds,))
        want = list(seen)
        seen.clear()
        with ace_kernels.patch(model) as handle:
            _assert_same(expected, _forward_backward(model, _run_bert, (embeds,)))
            torch.testing.assert_close(seen, want, **FP64_TOL)
            # Layer 0's members one by one (a hook on a member ungroups the others too), layer 1 grouped.
            assert handle.stats() == {"qkv ungrouped: hooks on a member": 3, "lora_linear": 3, "lora_qkv": 1,
                                      "qkv cached": 2}, handle.stats()
            hook.remove()
            handle.reset_stats()
            _forward_backward(model, _run_bert, (embeds,))
            assert handle.stats() == {"lora_qkv": 2, "qkv cached": 4}, handle.stats()

    # A global full backward hook wraps every member's input (PEFT layers fall back under global hooks; the
    # reference layout's do not).
    from torch.nn.modules.module import register_module_full_backward_hook

    torch.manual_seed(17)
    attention = _randomise_lora(ReferenceAttention(16, 4).double()).train()
    tokens = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    seen = []
    hook = register_module_full_backward_hook(lambda m, gi, go: seen.append(type(m).__name__))
    try:
        expected = _forward_backward(attention, lambda m, t: m(t), (tokens,))
        want = list(seen)
        seen.clear()
        with ace_kernels.patch(attention) as handle:
            _assert_same(expected, _forward_backward(attention, lambda m, t: m(t), (tokens,)))
            assert seen == want
            assert handle.stats() == {"qkv ungrouped: hooks on a member": 3, "lora_linear": 3}, handle.stats()
            hook.remove()
            handle.reset_stats()
            _forward_backward(attention, lambda m, t: m(t), (tokens,))
            assert handle.stats() == {"lora_qkv": 1, "qkv cached": 2}, handle.stats()
    finally:
        hook.remove()


def test_peft_fp32_adapters_on_bf16_base():
    """PEFT keeps adapters in fp32 on a bf16 base (autocast_adapter_dtype); gradients reach them in fp32."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(4)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = get_peft_model(BertModel(config, add_pooling_layer=False).to(torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=1, target_modules=BERT_TARGETS))
    _randomise_lora(model)
    query = model.base_model.model.encoder.layer[0].attention.self.query
    assert query.lora_A["default"].weight.dtype == torch.float32
    assert query.base_layer.weight.dtype == torch.bfloat16
    embeds = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    before = _forward_backward(model, _run_bert, (embeds,))
    with ace_kernels.patch(model) as handle:
        after = _forward_backward(model, _run_bert, (embeds,))
        assert handle.stats()["lora_qkv"] == 2
    assert after[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in after[1])
    # PEFT adds the branch in fp32, the fused call in bf16 inputs: a few bf16 ulps (2^-8) of
    # O(1) values after two layers; the loss-gradient sums over 320 outputs, hence the wider atol.
    torch.testing.assert_close(after[0].float(), before[0].float(), rtol=0.03, atol=0.03)
    for got, want in zip(after[1], before[1], strict=True):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_summary_lists_skips_and_double_patch():
    from peft.tuners.lora.layer import Linear as PeftLinear

    class CustomLinear(PeftLinear):
        pass

    model = _bert().eval()
    attention = model.base_model.model.encoder.layer[1].attention.self
    attention.value.__class__ = CustomLinear
    handle = ace_kernels.patch(model)
    statuses = {r.name: (r.status, r.reason) for r in handle.records}
    name = "base_model.model.encoder.layer.1.attention.self.value"
    assert statuses[name][0] == "skipped" and "CustomLinear" in statuses[name][1]
    # The other two members of that layer are patched one by one.
    assert statuses[name.replace("value", "query")][0] == "patched"
    assert name in str(handle) and "skipped:" in str(handle)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything recognised, though skipped: no "nothing was recognised"
        second = ace_kernels.patch(model)
    assert not second.patched
    layer0 = [r for r in second.records if "layer.0" in r.name]
    assert layer0 and all(r.status == "skipped" and "already patched" in r.reason for r in layer0)
    second.undo()
    handle.undo()
    _assert_original_forwards(model)
    with pytest.raises(ValueError, match="model_or_module"):
        ace_kernels.patch("not a module")
    with pytest.raises(ValueError, match="lora"):
        ace_kernels.patch(model, lora="yes")



def test_flags_take_numpy_bools_as_the_ops_do():
    # A NumPy bool (a flag read from an array or a config loaded through NumPy) was refused with
    # "argument 'lora': expected a bool, got bool"; the ops take them (check_bool), and so does patch.
    with pytest.warns(UserWarning, match="nothing in this Linear was recognised"):
        handle = ace_kernels.patch(nn.Linear(2, 2), lora=np.bool_(False), hypergraph=np.bool_(True),
                                   loss=np.bool_(True), group_qkv=np.bool_(False))
    assert handle.records == []
    for key in ("lora", "hypergraph", "loss", "group_qkv"):
        with pytest.raises(ValueError, match=rf"^argument '{key}': expected a bool, got int$"):
            ace_kernels.patch(nn.Linear(2, 2), **{key: 1})
        with pytest.raises(ValueError, match=rf"^argument '{key}': expected a bool, got numpy.ndarray$"):
            ace_kernels.patch(nn.Linear(2, 2), **{key: np.array([True])})

def test_registry_takes_new_recognisers():
    """A new model family is one registry entry using the same swap and undo."""
    from ace_kernels.patching import PatchRecord, Recogniser, _Replacement, recognisers, register_recogniser, \
        unregister_recogniser

    class Scale(nn.Module):
        def forward(self, x):
            return x * 2.0

    def install(name, module, handle, options):
        handle._swap(module, "forward", _Replacement(lambda m, x: x * 2.0 + 0.0, module))
        handle.records.append(PatchRecord(name, "scale", "patched", "-> x * 2"))

    entry = Recogniser("scale", "lora", lambda m: isinstance(m, Scale), install)
    register_recogniser(entry)
    try:
        assert recognisers()[-1] is entry
        model = nn.Sequential(Scale(), nn.Linear(3, 3), Scale())
        with ace_kernels.patch(model) as handle:
            assert [r.name for r in handle.patched] == ["0", "2"]
            assert "forward" in model[0].__dict__
            with pytest.warns(UserWarning, match="nothing in this Sequential was recognised"):
                assert not ace_kernels.patch(model, lora=False).records  # family switched off
        _assert_original_forwards(model)
    finally:
        unregister_recogniser(entry)
    assert entry not in recognisers()


def test_undo_after_another_wrapper_warns():
    model = _vit()
    qkv = model.base_model.model.blocks[0].attn.qkv
    handle = ace_kernels.patch(model)
    wrapped = qkv.forward
    qkv.forward = lambda x: wrapped(x)  # someone wraps after us
    with pytest.warns(RuntimeWarning, match="replaced again"):
        handle.undo()
    assert "forward" in qkv.__dict__  # left alone
    del qkv.forward


@pytest.mark.triton
def test_peft_triton_backend(device):
    """The same swap routed to the Triton kernels (the interpreter on a CPU), fp32."""
    model = _bert(lora_dropout=0.25).float().eval().to(device)
    attention = model.base_model.model.encoder.layer[0].attention.self
    x = torch.randn(2, 5, 32, device=device, requires_grad=True)
    def run(m, a):
        return _inside(attention, lambda b: attention.value(b) + attention.query(b) * attention.key(b), a)

    before = _forward_backward(model, run, (x,))
    with ace_kernels.patch(model, backend="triton") as handle:
        after = _forward_backward(model, run, (x,))
        assert handle.stats() == {"lora_qkv": 1, "qkv cached": 2}
        model.train()
        with capture_dropout_masks() as masks:
            q = attention.query(x)
        keep = masks[0].float()
        proj = attention.query
        expected = F.linear(x, proj.base_layer.weight, proj.base_layer.bias) + proj.scaling["default"] * (
            (x * keep[0] / 0.75) @ proj.lora_A["default"].weight.t()) @ proj.lora_B["default"].weight.t()
    # fp32 with K = 32 reductions in a different order: a few ulps of O(1) values.
    tol = dict(rtol=1e-5, atol=1e-5)
    _assert_same(before, after, tol)
    torch.testing.assert_close(q, expected, **tol)


@pytest.mark.gpu
def test_peft_bert_bf16_gpu_tolerance():
    """bf16 on the GPU: err(patched vs fp64) <= 2 * err(PEFT bf16 vs fp64) + floor, output and grads."""
    model64 = _bert(lora_dropout=0.0).cuda().train()
    model16 = copy.deepcopy(model64).to(torch.bfloat16)
    # 32 tokens: the tiny config's max_position_embeddings.
    embeds = torch.randn(16, 32, 32, dtype=torch.float64, device="cuda")
    oracle = _forward_backward(model64, _run_bert, (embeds.clone().requires_grad_(),))
    plain = _forward_backward(model16, _run_bert, (embeds.to(torch.bfloat16).requires_grad_(),))
    with ace_kernels.patch(model16) as handle:
        fused = _forward_backward(model16, _run_bert, (embeds.to(torch.bfloat16).requires_grad_(),))
        assert handle.stats()["lora_qkv"] == 2
    for ref, base, ours in zip([oracle[0]] + oracle[1], [plain[0]] + plain[1], [fused[0]] + fused[1], strict=True):
        err_torch = (base.double() - ref).abs().max().item()
        err_ours = (ours.double() - ref).abs().max().item()
        # Floor: one bf16 ulp (2^-8 relative) of the largest value, for the rare exact torch result.
        assert err_ours <= 2 * err_torch + ref.abs().max().item() * 2 ** -8, (err_ours, err_torch)


# ----------------------------------------------------------------------------------------
# Reference layout
# ----------------------------------------------------------------------------------------


def _reference_setup(dropout_rate=0.0, mode="both", seed=0):
    torch.manual_seed(seed)
    clip = TinyCLIP(dropout_rate=dropout_rate).double()
    loss_fn = ReferenceACELoss(20, topk=3, apply_gnn_encoders=mode).double()
    _randomise_lora(clip)
    images = torch.randn(5, 3, 16, 16, dtype=torch.float64)
    texts = torch.randint(1, 50, (5, 12))
    texts[1, 8:] = 0  # padding
    texts[3, 5:] = 0
    # Columns 0-1 are ids; rows 0 and 2 share labels, as do 1 and 4 (false negatives).
    table = np.array([[0, 9, 1, 0, 1], [1, 9, 0, 0, 1], [2, 9, 1, 0, 1], [3, 9, 1, 1, 0], [4, 9, 0, 0, 1]],
                     dtype=np.float64)
    return clip, loss_fn, images, texts, FakeFrame(table)


def _run_loss(model, images, texts, frame, indices):
    clip, loss_fn = model
    return loss_fn(clip, images, texts, frame, indices)


class _Pair(nn.ModuleList):
    pass


@pytest.mark.parametrize("mode", ["both", "vision", "text"])
def test_reference_layout_full_step_exact(mode):
    clip, loss_fn, images, texts, frame = _reference_setup(mode=mode)
    model = _Pair([clip, loss_fn]).train()
    indices = [0, 1, 2, 3, 4]
    snapshot = _state_snapshot(model)
    before = _forward_backward(model, lambda m, *a: _run_loss(m, *a), (images, texts, frame, indices))
    before_plain = _forward_backward(model, lambda m, *a: _run_loss(m, *a), (images, texts, None, indices))
    handle = ace_kernels.patch(model)
    kinds = sorted({r.kind for r in handle.records})
    assert kinds == ["qkv-group (reference-lora-linear x3)", "reference-ace-loss"]
    assert all(r.status == "patched" for r in handle.records), str(handle)
    after = _forward_backward(model, lambda m, *a: _run_loss(m, *a), (images, texts, frame, indices))
    after_plain = _forward_backward(model, lambda m, *a: _run_loss(m, *a), (images, texts, None, indices))
    stats = handle.stats()
    assert stats["lora_qkv"] == 8 and stats["qkv cached"] == 16  # 4 attention modules, twice
    assert stats["label_guided_infonce"] == 2
    assert stats.get("ace_hypergraph cls_only", 0) == {"both": 4, "vision": 2, "text": 2}[mode]
    _assert_same(before, after)
    _assert_same(before_plain, after_plain)
    _assert_state_unchanged(model, snapshot)
    # The labels matter: masking false negatives changes the loss.
    assert not torch.allclose(before[0], before_plain[0])
    handle.undo()
    _assert_original_forwards(model)
    _assert_same(before, _forward_backward(model, lambda m, *a: _run_loss(m, *a), (images, texts, frame, indices)),
                 dict(rtol=0, atol=0))


@pytest.mark.triton
def test_reference_layout_triton_backends(device):
    """LoRA and hypergraph on the Triton kernels (the interpreter on a CPU), fp32, per-op backend dict."""
    clip, loss_fn, images, texts, frame = _reference_setup()
    model = _Pair([clip, loss_fn]).float().train().to(device)
    texts = texts.to(device)
    for module in model.modules():
        if isinstance(module, ReferenceLoRALinear):
            module.bias.requires_grad_(False)  # the Triton kernels take a frozen base layer
    images = images.float().to(device)
    run = lambda m, *a: _run_loss(m, *a)  # noqa: E731
    before = _forward_backward(model, run, (images, texts, frame, [0, 1, 2, 3, 4]))
    backends = {"lora_linear": "triton", "lora_qkv": "triton", "ace_hypergraph": "triton",
                "label_guided_infonce": "torch"}
    with ace_kernels.patch(model, backend=backends) as handle:
        assert handle.backend_for("lora_qkv") == "triton"
        after = _forward_backward(model, run, (images, texts, frame, [0, 1, 2, 3, 4]))
        assert handle.stats()["lora_qkv"] == 4 and handle.stats()["ace_hypergraph cls_only"] == 2
    # fp32 through two small encoders, the hypergraph and the loss: reductions in another
    # order move results by a few ulps per layer; 1e-4 is far below any real error.
    _assert_same(before, after, dict(rtol=1e-4, atol=1e-4))
    with pytest.raises(ValueError, match="backend"):
        ace_kernels.patch(model, backend={"lora": "triton"})
    with pytest.raises(ValueError, match="backend"):
        ace_kernels.patch(model, backend="gpu")


def test_reference_apply_ace_hgat_full_output_exact():
    _, loss_fn, _, _, _ = _reference_setup()
    features = F.normalize(torch.randn(3, 9, 20, dtype=torch.float64), dim=-1).requires_grad_()
    cls_attn = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    run = lambda m, f, c: m.apply_ace_hgat(f, c, encoder="text")  # noqa: E731
    before = _forward_backward(loss_fn, run, (features, cls_attn))
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        assert [r.name for r in handle.patched] == ["apply_ace_hgat"]
        after = _forward_backward(loss_fn, run, (features, cls_attn))
        assert handle.stats() == {"ace_hypergraph": 1}
        with pytest.raises(ValueError, match="encoder must be img or text"):
            loss_fn.apply_ace_hgat(features, cls_attn, encoder="audio")
    _assert_same(before, after)


def test_reference_adapter_with_residual_is_skipped():
    _, loss_fn, _, _, _ = _reference_setup()
    edge = loss_fn.img_edge_adapter
    edge.forward = lambda z: z + edge.up(edge.act(edge.down(z)))  # a real residual adapter
    rng_before = torch.random.get_rng_state()
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        assert torch.equal(torch.random.get_rng_state(), rng_before)  # the probe used its own generator
        assert [(r.status, r.reason) for r in handle.records] == [
            ("skipped", "adapter forward is not up(leaky_relu(down(z), 0.2))")]
        assert "apply_ace_hgat" not in loss_fn.__dict__


class _GainLinear(nn.Linear):
    """An nn.Linear subclass whose own forward reads a flag (as a QAT layer reads its fake-quantise switch)."""

    gain = 1.0

    def forward(self, z):
        return self.gain * super().forward(z)


def test_reference_adapter_layer_with_its_own_forward_is_not_fused():
    """An adapter layer whose class overrides nn.Linear.forward passed the patch-time probe while its flag was off
    (gain 1): apply_ace_hgat was patched and the fused op, reading the weights, skipped that forward once the flag
    changed. It is now skipped at patch time with the reason, and such a layer set after patching makes the calls
    fall back; an uninitialised LazyLinear is named as such. Results are the original forward's."""
    _, loss_fn, _, _, _ = _reference_setup()
    features = F.normalize(torch.randn(3, 9, 20, dtype=torch.float64), dim=-1)
    cls_attn = torch.randn(3, 8, dtype=torch.float64)
    adapter = loss_fn.text_node_adapter
    plain = adapter.down
    gained = _GainLinear(plain.in_features, plain.out_features).double()
    gained.load_state_dict(plain.state_dict())
    adapter.down = gained
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [
            ("skipped", f"adapter down is a {__name__}._GainLinear, whose forward is not nn.Linear's")]
        gained.gain = 2.0
        got = loss_fn.apply_ace_hgat(features, cls_attn, encoder="text")
    want = loss_fn.apply_ace_hgat(features, cls_attn, encoder="text")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    adapter.down = plain
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        assert [r.status for r in handle.records] == ["patched"]
        adapter.down = gained
        got = loss_fn.apply_ace_hgat(features, cls_attn, encoder="text")
        assert handle.stats() == {
            f"fallback apply_ace_hgat: adapter down is a {__name__}._GainLinear, whose forward is not nn.Linear's": 1}
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    adapter.down = nn.LazyLinear(plain.out_features).double()
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [
            ("skipped", "adapter down is an uninitialised LazyLinear (patch it once it has weights)")]


def test_reference_loss_without_hypergraph_patch():
    """loss=True, hypergraph=False: the loss goes fused, apply_ace_hgat stays the dense original."""
    clip, loss_fn, images, texts, frame = _reference_setup()
    model = _Pair([clip, loss_fn]).train()
    before = _forward_backward(model, lambda m, *a: _run_loss(m, *a), (images, texts, frame, [4, 3, 2, 1, 0]))
    with ace_kernels.patch(model, hypergraph=False, lora=False) as handle:
        assert [(r.name, r.status, r.reason) for r in handle.records] == [
            ("1.forward", "patched", "-> label_guided_infonce (apply_ace_hgat not patched: its own, full output)")]
        after = _forward_backward(model, lambda m, *a: _run_loss(m, *a), (images, texts, frame, [4, 3, 2, 1, 0]))
        assert handle.stats() == {"label_guided_infonce": 1}
    _assert_same(before, after)


def test_reference_lora_dropout_and_merge_states():
    torch.manual_seed(5)
    attention = _randomise_lora(ReferenceAttention(24, 2, r=3, dropout_rate=0.25).double()).train()
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    with ace_kernels.patch(attention) as handle, capture_dropout_masks() as masks:
        q, v, k = _inside(attention, lambda a: (attention.q_proj(a), attention.v_proj(a), attention.k_proj(a)), x)
    assert handle.stats() == {"lora_qkv": 1, "qkv cached": 2}
    keep = masks[0].double()
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    for index, (proj, out) in enumerate(zip(projections, (q, k, v), strict=True)):
        expected = F.linear(x, proj.weight, proj.bias) + proj.scaling * (
            (x * keep[index] / 0.75) @ proj.w_lora_A.t()) @ proj.w_lora_B.t()
        torch.testing.assert_close(out, expected, **FP64_TOL)

    # eval() merges B A into the weights: the patch falls back to the plain linear, exactly.
    attention.eval()
    assert attention.q_proj.merged
    expected = attention(x)
    with ace_kernels.patch(attention) as handle:
        assert handle.records[0].status == "fallback" and "merged" in handle.records[0].reason
        torch.testing.assert_close(attention(x), expected, rtol=0, atol=0)
        attention.train()  # unmerges; dropout on
        attention.q_proj.dropout.p = 0.0
        attention.k_proj.dropout.p = 0.0
        attention.v_proj.dropout.p = 0.0
        handle.reset_stats()
        torch.testing.assert_close(attention(x), _unpatched_call(attention, x), **FP64_TOL)
        assert handle.stats()["lora_qkv"] == 1


def _unpatched_call(attention, x):
    """The re-created reference forward with the projections' original methods."""
    saved = {n: getattr(attention, n).__dict__.pop("forward") for n in ("q_proj", "k_proj", "v_proj")}
    try:
        return attention(x)
    finally:
        for n, fwd in saved.items():
            getattr(attention, n).__dict__["forward"] = fwd


def test_cross_attention_inputs_and_call_order():
    """Members called with different inputs compute separately; any call order groups."""
    torch.manual_seed(7)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = ReferenceLoRALinear(16, 16, r=2)
            self.k_proj = ReferenceLoRALinear(16, 16, r=2)
            self.v_proj = ReferenceLoRALinear(16, 16, r=2)

        def forward(self, x, memory):
            return self.v_proj(memory) + self.q_proj(x) * self.k_proj(memory)

    class Reverse(Cross):
        def forward(self, x, memory):
            v, k, q = self.v_proj(x), self.k_proj(x), self.q_proj(x)
            return q * k + v

    for cls, expect in ((Cross, "grouping off"), (Reverse, "qkv cached")):
        module = _randomise_lora(cls().double()).train()
        x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
        memory = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
        before = _forward_backward(module, lambda m, a, b: m(a, b), (x, memory))
        with ace_kernels.patch(module) as handle:
            first = _forward_backward(module, lambda m, a, b: m(a, b), (x, memory))
            assert any(expect in key for key in handle.stats()), handle.stats()
            handle.reset_stats()
            second = _forward_backward(module, lambda m, a, b: m(a, b), (x, memory))
            # Once grouping is off, Cross runs three lora_linear calls per forward (no fused
            # call whose kept outputs the next member throws away); Reverse keeps grouping.
            assert handle.stats() == ({"lora_linear": 3} if cls is Cross else {"lora_qkv": 1, "qkv cached": 2}), \
                handle.stats()
        _assert_same(before, first)
        _assert_same(before, second)


def test_a_member_called_with_extra_arguments_never_gets_a_kept_output():
    """Inside the attention's forward, key called with adapter_names= (PEFT's mixed-batch inference: the first
    sample through the base layer alone) after query's grouped call runs PEFT's forward with them, never the
    output query's call kept for a plain call of key."""
    model = _bert().eval()
    layer = model.base_model.model.encoder.layer[0].attention.self
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    names = ["__base__", "default"]
    want = layer.query(x), layer.key(x, adapter_names=names), layer.value(x)
    with ace_kernels.patch(model) as handle:
        got = _inside(layer, lambda a: (layer.query(a), layer.key(a, adapter_names=names), layer.value(a)), x)
        assert handle.stats()["fallback peft-lora-linear: extra forward arguments (adapter_names)"] == 1
    for out, expected in zip(got, want, strict=True):
        torch.testing.assert_close(out, expected, **FP64_TOL)


def test_a_member_called_under_no_grad_never_gets_a_kept_output_with_a_graph():
    """k_proj called under torch.no_grad() inside its attention's forward, after q_proj's grouped call made
    with grad: it computes its own projection, without a graph, as its unpatched call does (not the output
    kept from the call with grad, which would carry a graph into a no-grad region)."""
    torch.manual_seed(0)
    attention = _randomise_lora(ReferenceAttention(16, 4).double()).train()
    x = torch.randn(2, 3, 16, dtype=torch.float64)

    def members(a):
        q = attention.q_proj(a)
        with torch.no_grad():
            k = attention.k_proj(a)
        return q, k, attention.v_proj(a)

    want = members(x)
    with ace_kernels.patch(attention):
        got = _inside(attention, members, x)
    assert [t.requires_grad for t in got] == [t.requires_grad for t in want] == [True, False, True]
    for out, expected in zip(got, want, strict=True):
        torch.testing.assert_close(out, expected, **FP64_TOL)


def test_in_place_change_of_input_invalidates_kept_outputs():
    """Inside the attention's forward (where q/k/v group), what changes between two member calls
    must invalidate the outputs kept by the first: an in-place change of the input (its version
    counter) and the grad mode (q under no_grad, k and v with grad: k must not get q's
    graph-less output, or no gradient reaches k's factors)."""

    class InPlace(ReferenceAttention):
        def forward(self, x):
            q = self.q_proj(x)
            x.mul_(3.0)  # bumps x._version: k and v kept for the old values would be stale
            return torch.stack([q, self.k_proj(x), self.v_proj(x)])

    class StopGradient(ReferenceAttention):
        def forward(self, x):
            with torch.no_grad():
                q = self.q_proj(x)
            return q * self.k_proj(x) + self.v_proj(x)

    torch.manual_seed(8)
    attention = _randomise_lora(InPlace(16, 2, r=2).double()).train()
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    with torch.no_grad():  # (autograd would refuse the in-place change of a saved input)
        want = attention(x.clone())
        with ace_kernels.patch(attention) as handle:
            got = attention(x.clone())
            assert handle.stats() == {"lora_qkv": 2, "qkv cached": 1}, handle.stats()
    torch.testing.assert_close(got, want, **FP64_TOL)

    attention = _randomise_lora(StopGradient(16, 2, r=2).double()).train()
    run = lambda m, a: m(a)  # noqa: E731
    before = _forward_backward(attention, run, (x,))
    with ace_kernels.patch(attention) as handle:
        after = _forward_backward(attention, run, (x,))
        # q, under another grad mode than the attention's forward, runs alone; k groups with v.
        assert handle.stats() == {"qkv ungrouped: called under another grad mode or saved-tensor hooks (a checkpoint "
                                  "around the member?) than its attention's forward": 1, "lora_linear": 1,
                                  "lora_qkv": 1, "qkv cached": 1}, handle.stats()
    _assert_same(before, after)


def test_input_made_to_require_grad_between_members_invalidates_kept_outputs():
    """q called on an input that needs no gradient, then ``x.requires_grad_()`` (which bumps no version), then k
    and v on the same tensor: their unpatched calls build a graph to x, so the outputs kept from q's grouped call,
    made without one, must not be served to them (x got no gradient through k and v, silently)."""

    class LateInputGrad(ReferenceAttention):
        def forward(self, x):
            q = self.q_proj(x)
            x.requires_grad_(True)
            return q * self.k_proj(x) + self.v_proj(x)

    torch.manual_seed(10)
    attention = _randomise_lora(LateInputGrad(16, 2, r=2).double()).train()
    x = torch.randn(2, 4, 16, dtype=torch.float64)

    def step():  # the gradients of every trainable parameter and of the input, which needs none when passed
        fresh = x.clone()
        out = attention(fresh)
        grads = torch.autograd.grad((out * _fixed_weights(out)).sum(), _trainable(attention) + [fresh],
                                    allow_unused=True)
        return out.detach(), [torch.zeros_like(fresh) if g is None else g for g in grads]

    before = step()
    with ace_kernels.patch(attention) as handle:
        after = step()
        # k misses q's kept outputs (x needs a gradient now) and groups with v.
        assert handle.stats() == {"lora_qkv": 2, "qkv cached": 1}, handle.stats()
    _assert_same(before, after)


def test_kept_outputs_are_not_served_to_a_member_called_under_autocast():
    """The kept outputs are keyed on the autocast state too: a member called with the same input
    inside an autocast region its attention opens after the first member's call computes in the
    autocast dtype, as its original does, not the full-precision output kept for it."""

    class AutocastKey(ReferenceAttention):
        def forward(self, x):
            q = self.q_proj(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                k = self.k_proj(x)
            return q, k, self.v_proj(x)

    torch.manual_seed(9)
    attention = _randomise_lora(AutocastKey(16, 2, r=2)).train()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        want = attention(x)
        with ace_kernels.patch(attention) as handle:
            got = attention(x)
            # k misses q's kept outputs (autocast on) and v k's (autocast off again): three calls.
            assert handle.stats() == {"lora_qkv": 3}, handle.stats()
    assert [t.dtype for t in got] == [torch.float32, torch.bfloat16, torch.float32]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_kept_outputs_never_outlive_the_attention_forward():
    """Outputs kept inside one attention forward for members it did not call are dropped when it
    returns, and when it raises (the hook runs with always_call); members called after a forward,
    outside any, keep nothing for each other. A weight written through .data in between (no
    version counter shows it) is then seen by the next call, in each of the three cases."""

    class Partial(ReferenceAttention):
        def forward(self, x, names=("q_proj", "k_proj", "v_proj"), fail=False):
            outs = [getattr(self, name)(x) for name in names]
            if fail:
                raise RuntimeError("a check after the projections fails")
            return outs

    torch.manual_seed(9)
    attention = _randomise_lora(Partial(16, 2, r=2).double()).train()
    x = torch.randn(2, 4, 16, dtype=torch.float64)

    def step(name):  # an optimizer-like write that bumps no version counter
        getattr(attention, name).w_lora_B.data.add_(1.0)

    def unpatched(name):
        layer = getattr(attention, name)
        return ReferenceLoRALinear.forward(layer, x)

    with ace_kernels.patch(attention) as handle:
        attention(x, ("q_proj", "k_proj"))  # v's output kept inside this forward only
        step("v_proj")
        torch.testing.assert_close(attention(x, ("v_proj",))[0], unpatched("v_proj"), **FP64_TOL)
        with pytest.raises(RuntimeError, match="a check after"):
            attention(x, ("q_proj",), fail=True)  # k's and v's kept, then the forward raises
        step("k_proj")
        torch.testing.assert_close(attention.k_proj(x), unpatched("k_proj"), **FP64_TOL)
        attention(x)
        attention.q_proj(x)  # after a forward, outside any: q alone
        step("v_proj")
        torch.testing.assert_close(attention.v_proj(x), unpatched("v_proj"), **FP64_TOL)
        assert handle.stats()["qkv ungrouped: called outside the attention's forward"] == 3, handle.stats()


def test_members_whose_dropout_modes_differ_are_not_grouped():
    """q's dropout put in eval on its own while k and v train with p = 0.5: the fused q/k/v call
    takes one mode, so the members run one by one and k and v still drop (q does not)."""
    torch.manual_seed(10)
    attention = _randomise_lora(ReferenceAttention(16, 2, r=2, dropout_rate=0.5).double()).train()
    attention.q_proj.dropout.eval()
    x = torch.randn(2, 4, 16, dtype=torch.float64)

    def no_dropout(layer):
        return F.linear(x, layer.weight, layer.bias) + layer.scaling * (x @ layer.w_lora_A.t()) @ layer.w_lora_B.t()

    with ace_kernels.patch(attention) as handle:
        q, k, v = _inside(attention, lambda a: (attention.q_proj(a), attention.k_proj(a), attention.v_proj(a)), x)
        assert handle.stats() == {"qkv ungrouped: members differ in scaling, dropout or dtype": 3,
                                  "lora_linear": 3}, handle.stats()
    torch.testing.assert_close(q, no_dropout(attention.q_proj), **FP64_TOL)
    assert not torch.allclose(k, no_dropout(attention.k_proj)) and not torch.allclose(v, no_dropout(attention.v_proj))


def test_a_qkv_triple_of_two_lora_layouts_patches_each_member_on_its_own():
    """A q_proj that is PEFT's LoRA layer beside a reference k_proj and v_proj is no group (one fused call reads
    one layout): each member is patched as a single layer of its own kind, and the step equals the unpatched one."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = get_peft_model(nn.Sequential(nn.Linear(16, 16)), LoraConfig(
                r=2, target_modules=["0"])).base_model.model[0]
            self.k_proj, self.v_proj = ReferenceLoRALinear(16, 16, r=2), ReferenceLoRALinear(16, 16, r=2)

        def forward(self, x):
            return self.q_proj(x) * self.k_proj(x) + self.v_proj(x)

    torch.manual_seed(0)
    module = _randomise_lora(Mixed().double()).train()
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    run = lambda m, a: m(a)  # noqa: E731
    before = _forward_backward(module, run, (x,))
    with ace_kernels.patch(module) as handle:
        assert [(r.name, r.kind, r.status) for r in handle.records] == [
            ("q_proj", "peft-lora-linear", "patched"), ("k_proj", "reference-lora-linear", "patched"),
            ("v_proj", "reference-lora-linear", "patched")]
        after = _forward_backward(module, run, (x,))
        assert handle.stats() == {"lora_linear": 3}, handle.stats()
    _assert_same(before, after)


def test_a_member_shared_by_two_attentions_is_claimed_by_the_first_group_only():
    """A LoRA layer in two attentions' q/k/v triples (a shared q_proj) belongs to the first one's group: the
    second attention's other members are patched one by one, the shared layer is not patched again, and
    the two attentions compute what they did unpatched."""
    torch.manual_seed(12)
    first, second = ReferenceAttention(16, 2, r=2), ReferenceAttention(16, 2, r=2)
    second.q_proj = first.q_proj
    model = _randomise_lora(nn.ModuleList([first, second]).double()).train()
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    run = lambda m, a: m[1](m[0](a))  # noqa: E731
    before = _forward_backward(model, run, (x,))
    with ace_kernels.patch(model) as handle:
        assert [(r.name, r.kind, r.status) for r in handle.records] == [
            ("0.{q_proj,k_proj,v_proj}", "qkv-group (reference-lora-linear x3)", "patched"),
            ("1.k_proj", "reference-lora-linear", "patched"), ("1.v_proj", "reference-lora-linear", "patched")]
        after = _forward_backward(model, run, (x,))
    _assert_same(before, after)
    _assert_original_forwards(model)


def test_group_qkv_false_keeps_members_apart():
    """patch(..., group_qkv=False), as documented for an attention that changes q in place: each
    member is its own lora_linear layer (a grouped q would be a view autograd refuses to change
    in place), and the step equals the unpatched one."""

    class InPlace(ReferenceAttention):
        def forward(self, x):
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q.mul_(self.scale)
            return (q @ k.transpose(-2, -1)).softmax(-1) @ v

    torch.manual_seed(11)
    attention = _randomise_lora(InPlace(16, 2, r=2).double()).train()
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    run = lambda m, a: m(a)  # noqa: E731
    before = _forward_backward(attention, run, (x,))
    with ace_kernels.patch(attention, group_qkv=False) as handle:
        assert [r.kind for r in handle.records] == ["reference-lora-linear"] * 3
        after = _forward_backward(attention, run, (x,))
        assert handle.stats() == {"lora_linear": 3}
    _assert_same(before, after)


def test_torch_func_transforms_fall_back():
    from torch.func import functional_call, grad

    model = _bert().eval()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, e):
        return functional_call(model, p, (), {"inputs_embeds": e}).last_hidden_state.square().sum()

    expected = grad(loss)(params, embeds)
    with ace_kernels.patch(model) as handle:
        got = grad(loss)(params, embeds)
        assert any("torch.func transform" in key for key in handle.stats())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **FP64_TOL)

    # Every other patched forward too (the fused ops' autograd Functions cannot run under
    # torch.func): apply_ace_hgat, the ACE loss (w.r.t. its parameters), the reference CLIPLoss
    # and open_clip's ClipLoss (w.r.t. the image features).
    open_clip_loss = pytest.importorskip("open_clip.loss")
    clip, ace_loss, images, texts, _ = _reference_setup()
    torch.manual_seed(15)
    features = F.normalize(torch.randn(2, 9, 20, dtype=torch.float64), dim=-1)
    attn = torch.rand(2, 8, dtype=torch.float64)
    image = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    ace_params = {k: v.detach() for k, v in ace_loss.named_parameters()}
    plain_loss, clip_loss = ReferenceCLIPLoss(logit_scale=12.0).double(), open_clip_loss.ClipLoss()
    cases = [
        (ace_loss, lambda: grad(lambda f: ace_loss.apply_ace_hgat(f, attn, encoder="img").square().sum())(features),
         "fallback apply_ace_hgat: a torch.func transform is active"),
        (ace_loss, lambda: grad(lambda p: functional_call(ace_loss, p, (clip, images, texts)))(ace_params),
         "fallback reference-ace-loss: a torch.func transform is active"),
        (plain_loss, lambda: grad(lambda i: plain_loss(i, text))(image),
         "fallback reference-clip-loss: a torch.func transform is active"),
        (clip_loss, lambda: grad(lambda i: clip_loss(i, text, 10.0))(image),
         "fallback open_clip-ClipLoss: a torch.func transform is active"),
    ]
    for module, run, key in cases:
        expected = run()
        with ace_kernels.patch(module, lora=False) as handle:
            got = run()
            assert handle.stats().get(key), handle.stats()
        torch.testing.assert_close(got, expected, **FP64_TOL)


def test_forward_mode_ad_falls_back():
    """torch.autograd.forward_ad (dual tensors) through a patched model: the fused ops' autograd Functions
    define no jvp, so every patched forward runs the original under a dual level, whose tangents are exact."""
    import torch.autograd.forward_ad as fwAD

    open_clip_loss = pytest.importorskip("open_clip.loss")
    torch.manual_seed(16)
    attention = _randomise_lora(ReferenceAttention(16, 4).double()).train()
    mlp = _randomise_lora(get_peft_model(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).double(),
                                         LoraConfig(r=2, lora_alpha=1, target_modules=["0", "2"])))
    clip, ace_loss, images, texts, frame = _reference_setup()
    tokens = torch.randn(2, 5, 16, dtype=torch.float64)
    features = F.normalize(torch.randn(2, 9, 20, dtype=torch.float64), dim=-1)
    attn = torch.rand(2, 8, dtype=torch.float64)
    image = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    plain_loss, clip_loss = ReferenceCLIPLoss(logit_scale=12.0).double(), open_clip_loss.ClipLoss()

    def tangent_of(fn, primal):
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(primal, torch.ones_like(primal)))
            return fwAD.unpack_dual(out).tangent

    cases = [
        (attention, lambda: tangent_of(attention, tokens), "fallback reference-lora-linear"),
        (mlp, lambda: tangent_of(mlp, tokens), "fallback peft-lora-linear"),
        (ace_loss, lambda: tangent_of(lambda f: ace_loss.apply_ace_hgat(f, attn, encoder="img"), features),
         "fallback apply_ace_hgat"),
        (ace_loss, lambda: tangent_of(lambda i: ace_loss(clip, i, texts, frame, [0, 1, 2, 3, 4]), images),
         "fallback reference-ace-loss"),
        (plain_loss, lambda: tangent_of(lambda i: plain_loss(i, text), image), "fallback reference-clip-loss"),
        (clip_loss, lambda: tangent_of(lambda i: clip_loss(i, text, 10.0), image), "fallback open_clip-ClipLoss"),
    ]
    for module, run, key in cases:
        expected = run()
        assert expected is not None
        with ace_kernels.patch(module, hypergraph=module is ace_loss) as handle:
            got = run()
            assert any(k.startswith(key) and "forward-mode AD" in k for k in handle.stats()), handle.stats()
        torch.testing.assert_close(got, expected, **FP64_TOL)


def test_undo_keeps_a_replacement_someone_wrapped_working():
    model = _bert().eval()
    query = model.base_model.model.encoder.layer[0].attention.self.query
    embeds = torch.randn(2, 5, 32, dtype=torch.float64)
    expected = _run_bert(model, embeds)
    handle = ace_kernels.patch(model)
    inner = query.forward
    query.forward = lambda x, *a, **k: inner(x, *a, **k)  # wrapped after patching (accelerate's hooks do so)
    with pytest.warns(RuntimeWarning, match="replaced again"):
        handle.undo()
    counts = handle.stats()
    torch.testing.assert_close(_run_bert(model, embeds), expected, **FP64_TOL)
    # The wrapped replacement now runs the original forward: no fused call, no kept outputs.
    assert handle.stats() == counts
    del query.forward


def _saved_and_loaded(obj, path=None):
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=False)`` (a whole pickled module)."""
    import io

    target = path if path is not None else io.BytesIO()
    torch.save(obj, target)
    if path is None:
        target.seek(0)
    return torch.load(target, weights_only=False)


def _assert_originals_are_the_class_methods(model):
    """Every original method a patched module's replacement (or its q/k/v group) holds is its class's
    method bound to that module (pickle's own form would look the name up on the module: the replacement)."""
    from ace_kernels.patching import _Replacement

    seen = 0
    for module in model.modules():
        for attr in ("forward", "apply_ace_hgat"):
            replacement = module.__dict__.get(attr)
            if not isinstance(replacement, _Replacement):
                continue
            group = next((v for v in replacement.state if hasattr(v, "originals")), None)
            originals = [v for v in replacement.state if inspect.ismethod(v)]
            pairs = [(module, o) for o in originals]
            pairs += list(zip(group.members, group.originals, strict=True)) if group else []
            for owner, original in pairs:
                assert original.__self__ is owner and original.__func__ is getattr(type(owner), attr), (attr, original)
                seen += 1
    assert seen > 0


def _pickled_and_deep_copied(model, check):
    """``check(copy)`` on the patched model pickled and on its deep copy; the copy runs on its own handle."""
    for copied in (_saved_and_loaded(model), copy.deepcopy(model)):
        _assert_originals_are_the_class_methods(copied)
        check(copied)


def test_patched_peft_model_pickles_and_deep_copies(tmp_path):
    """torch.save of a whole patched model (some trainers save the module) and copy.deepcopy: the copy runs the
    fused path, and its per-call fallback the original forward, with the same results."""
    import torch.autograd.forward_ad as fwAD

    model = _bert().train()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    unpatched_keys = list(model.state_dict())
    before = _forward_backward(model, _run_bert, (embeds,))
    with model.disable_adapter():
        disabled = _run_bert(model, embeds).detach()
    path = tmp_path / "model.pt"
    torch.save({"weights": model.state_dict()}, path)
    with ace_kernels.patch(model) as handle:
        assert list(model.state_dict()) == unpatched_keys  # the state dict saves while patched, with the same keys
        state = _saved_and_loaded(model.state_dict())
        assert list(state) == unpatched_keys
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        # Saved over an existing file: the whole model saves (it used to raise with the file already truncated).
        assert isinstance(_saved_and_loaded(model, path), type(model))
        replacement = model.base_model.model.encoder.layer[0].attention.self.query.__dict__["forward"]
        group = replacement.state[1]  # copy.copy shares them as they are (not in their pickled form)
        assert copy.copy(replacement).state == replacement.state and copy.copy(group).originals == group.originals

        def check(copied):
            after = _forward_backward(copied, _run_bert, (embeds,))
            _assert_same(before, after)
            member = copied.base_model.model.encoder.layer[0].attention.self.query
            copy_handle, copy_group = member.__dict__["forward"].state[:2]
            assert copy_handle is not handle and copy_handle._swaps == [] and copy_handle.active
            assert copy_handle.stats() == {"lora_qkv": 2, "qkv cached": 4}  # fused, counted on the copy's handle
            assert copy_group.members[0] is member and copy_group.calls.pending == {}
            with copied.disable_adapter():  # every member falls back to its original forward
                torch.testing.assert_close(_run_bert(copied, embeds).detach(), disabled, rtol=0, atol=0)
            with fwAD.dual_level():  # every patched forward falls back
                torch.testing.assert_close(_run_bert(copied, embeds).detach(), before[0], rtol=0, atol=0)
            with torch.no_grad():  # the copy computes with its own weights
                for p in copied.parameters():
                    p.mul_(0.5)
            assert not torch.allclose(_run_bert(copied, embeds), before[0])

        _pickled_and_deep_copied(model, check)
        torch.testing.assert_close(_run_bert(model, embeds).detach(), before[0], **FP64_TOL)
    assert handle.stats()["lora_qkv"] == 2  # the original's one call only: the copies count on their own
    undone = _saved_and_loaded(handle)
    assert not undone.active and undone.summary() == handle.summary()
    _assert_original_forwards(_saved_and_loaded(model))


def test_patched_reference_layout_pickles_and_deep_copies():
    import torch.autograd.forward_ad as fwAD

    clip, loss_fn, images, texts, frame = _reference_setup()
    model = _Pair([clip, loss_fn]).train()
    run = lambda m, *a: _run_loss(m, *a)  # noqa: E731
    inputs = (images, texts, frame, [0, 1, 2, 3, 4])
    before = _forward_backward(model, run, inputs)
    with ace_kernels.patch(model) as handle:
        assert all(r.status == "patched" for r in handle.records), str(handle)

        def check(copied):
            _assert_same(before, _forward_backward(copied, run, inputs))
            copy_handle = copied[1].__dict__["forward"].state[0]
            assert copy_handle is not handle and copy_handle._swaps == [] and copy_handle.active
            stats = copy_handle.stats()
            assert stats["lora_qkv"] == 4 and stats["ace_hypergraph cls_only"] == 2, stats
            with fwAD.dual_level():  # every patched forward (loss, apply_ace_hgat, q/k/v) falls back
                torch.testing.assert_close(run(copied, *inputs).detach(), before[0], rtol=0, atol=0)
            assert any(key.startswith("fallback apply_ace_hgat") for key in copy_handle.stats()), stats

        _pickled_and_deep_copied(model, check)


def test_reference_labels_compare_as_numpys_equality():
    """Label cells compare as the reference's numpy == does: None equals None, "1" is not 1,
    int64 above 2**53 stays exact, float64 cells equal in float32 differ, a NaN matches nothing."""
    torch.manual_seed(0)
    loss_module = ReferenceCLIPLoss(logit_scale=12.0).double()
    image = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    frames = [
        np.array([[0, 0, None, 1], [1, 0, None, 1], [2, 0, 1, 0], [3, 0, None, 0]], dtype=object),
        np.array([[0, 0, "1", 0], [1, 0, 1, 0], [2, 0, 1.0, 1], [3, 0, "0", 1]], dtype=object),
        np.array([[0, 0, 2**53], [1, 0, 2**53 + 1], [2, 0, 5], [3, 0, 6]], dtype=np.int64),
        np.array([[0, 0, np.nan, 1], [1, 0, np.nan, 1], [2, 0, 1, 0], [3, 0, 0, 0]]),
        np.array([[0, 0, 1.0], [1, 0, 1.0 + 1e-12], [2, 0, 0.5], [3, 0, 1.0]]),  # float64 cells compare as float64
        np.array([[0, 0, True], [1, 0, False], [2, 0, True], [3, 0, True]]),
    ]
    dates = np.array(["2024-01-01", "NaT", "2024-01-01", "NaT"], dtype="datetime64[ns]")
    frames.append(np.stack([dates, dates, dates], axis=1))  # NaT equals nothing, not even NaT
    # A NaT in one label column of two: rows 0 and 1 agree in every other cell and still match nothing.
    first = np.array(["2024-01-01", "2024-01-01", "2024-01-02", "2024-01-02"], dtype="datetime64[ns]")
    second = np.array(["NaT", "NaT", "2024-01-03", "2024-01-03"], dtype="datetime64[ns]")
    frames.append(np.stack([first, first, first, second], axis=1))
    for table in frames:
        frame = FakeFrame(table)
        expected = loss_module(image, text, frame, [0, 1, 2, 3])
        with ace_kernels.patch(loss_module) as handle:
            got = loss_module(image, text, frame, [0, 1, 2, 3])
            assert handle.stats() == {"label_guided_infonce": 1}
        torch.testing.assert_close(got, expected, **FP64_TOL)

    class Missing:  # pandas' NA: == gives NA again, whose truth value raises
        def __eq__(self, other):
            return self

        def __bool__(self):
            raise TypeError("boolean value of NA is ambiguous")

    from ace_kernels.patching import _labels_from_frame

    na = Missing()
    table = np.array([[0, 0, na], [1, 0, na], [2, 0, "a"], [3, 0, "a"]], dtype=object)
    ids = _labels_from_frame(FakeFrame(table), [0, 1, 2, 3], "cpu").flatten().tolist()
    assert ids[2] == ids[3] and len({ids[0], ids[1], ids[2]}) == 3  # NA rows match nothing


def test_reference_clip_loss_and_nan_guard():
    torch.manual_seed(10)
    loss_module = ReferenceCLIPLoss(logit_scale=12.0).double()
    image = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1).requires_grad_()
    # Non-numeric label cells (strings) compare as whole rows too.
    frame = FakeFrame(np.array([[0, 0, "a", "x"], [1, 0, "b", "x"], [2, 0, "a", "x"], [3, 0, "b", "y"],
                                [4, 0, "b", "x"], [5, 0, "c", "y"]], dtype=object))
    for labels in (frame, None):
        run = lambda m, u, t: m(u, t, labels, [5, 4, 3, 2, 1, 0])  # noqa: E731
        before = _forward_backward(loss_module, run, (image, text))
        with ace_kernels.patch(loss_module) as handle:
            assert [(r.kind, r.status) for r in handle.records] == [("reference-clip-loss", "patched")]
            after = _forward_backward(loss_module, run, (image, text))
            assert handle.stats() == {"label_guided_infonce": 1}
        _assert_same(before, after)

    # The ACE loss module keeps the reference's NaN check.
    clip, ace_loss, images, texts, frame = _reference_setup(mode="vision")
    images[0, 0, 0, 0] = float("nan")
    with ace_kernels.patch(ace_loss, lora=False):
        with pytest.raises(ValueError, match="NaN value in logits_per_image"):
            ace_loss(clip, images, texts, frame, [0, 1, 2, 3, 4])


# ----------------------------------------------------------------------------------------
# open_clip ClipLoss
# ----------------------------------------------------------------------------------------


def test_open_clip_clip_loss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    torch.manual_seed(9)
    image = F.normalize(torch.randn(11, 24, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(11, 24, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    loss_module = open_clip_loss.ClipLoss()

    def run(module, *inputs):
        return module(*inputs)

    before = _forward_backward(loss_module, run, (image, text, scale))
    with ace_kernels.patch(loss_module) as handle:
        assert [(r.kind, r.status) for r in handle.records] == [("open_clip-ClipLoss", "patched")]
        after = _forward_backward(loss_module, run, (image, text, scale))
        as_dict = loss_module(image, text, scale, output_dict=True)
        assert set(as_dict) == {"contrastive_loss"}
        torch.testing.assert_close(as_dict["contrastive_loss"].detach(), before[0], **FP64_TOL)
        # A logit bias (SigLIP-style use) goes to open_clip's own code.
        bias = torch.tensor(-1.5, dtype=torch.float64)
        torch.testing.assert_close(loss_module(image, text, scale, logit_bias=bias),
                                   handle_free_call(loss_module, image, text, scale, bias), rtol=0, atol=0)
        assert handle.stats()["label_guided_infonce"] == 2
        assert any(key.startswith("fallback open_clip-ClipLoss: logit_bias") for key in handle.stats())
    _assert_same(before, after)

    # A float multiplier works too.
    with ace_kernels.patch(loss_module):
        got = loss_module(image, text, 7.0)
    torch.testing.assert_close(got, open_clip_loss.ClipLoss()(image, text, 7.0), **FP64_TOL)

    # 16-bit features: the loss comes in their dtype, as open_clip's does (computed in fp32 here).
    for dtype in (torch.bfloat16, torch.float16):
        half_image, half_text = image.detach().to(dtype), text.detach().to(dtype)
        want = open_clip_loss.ClipLoss()(half_image, half_text, 7.0)
        with ace_kernels.patch(loss_module):
            got = loss_module(half_image, half_text, 7.0)
        exact = open_clip_loss.ClipLoss()(half_image.double(), half_text.double(), 7.0)
        assert got.dtype == want.dtype == dtype
        assert abs(got.double() - exact) <= abs(want.double() - exact) + 1e-2 * abs(exact)

    # Multi-process settings are reported, not silently changed.
    distributed = open_clip_loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=2)
    with ace_kernels.patch(distributed) as handle:
        record = handle.records[0]
        assert record.status == "fallback" and "world_size=2" in record.reason and "local_loss=True" in record.reason
    # A subclass with its own forward is not ClipLoss's computation.
    class ShiftedTargets(open_clip_loss.ClipLoss):  # only the targets change: never patched
        def get_ground_truth(self, device, num_logits):
            return (torch.arange(num_logits, device=device) + 1) % num_logits

    shifted = ShiftedTargets()
    with ace_kernels.patch(shifted) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [
            ("skipped", "ShiftedTargets changes ClipLoss's get_ground_truth")]
        torch.testing.assert_close(shifted(image, text, 7.0), ShiftedTargets()(image, text, 7.0), rtol=0, atol=0)
    # So is a get_logits set on the instance (a temperature clamp, say).
    clamped = open_clip_loss.ClipLoss()
    inner = clamped.get_logits
    clamped.get_logits = lambda i, t, s, logit_bias=None: inner(i, t, min(s, 5.0), logit_bias=logit_bias)
    want = clamped(image, text, 10.0)
    with ace_kernels.patch(clamped) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [
            ("skipped", "ClipLoss changes ClipLoss's get_logits")]
        torch.testing.assert_close(clamped(image, text, 10.0), want, rtol=0, atol=0)
    coca = open_clip_loss.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0)
    with ace_kernels.patch(coca) as handle:
        assert handle.records[0].status == "skipped" and "CoCaLoss" in handle.records[0].reason


def handle_free_call(module, *args):
    return type(module).forward(module, *args)


def test_inference_mode_and_no_grad():
    model = _bert().eval()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = _run_bert(model, embeds)
    with ace_kernels.patch(model) as handle:
        with torch.inference_mode():
            got = _run_bert(model, embeds)
        # Inference tensors have no version counter: computed per member, still fused.
        assert handle.stats() == {"qkv ungrouped: inference-mode input": 6, "lora_linear": 6}
        handle.reset_stats()
        with torch.no_grad():
            got_no_grad = _run_bert(model, embeds)
        assert handle.stats() == {"lora_qkv": 2, "qkv cached": 4}
    torch.testing.assert_close(got, expected, **FP64_TOL)
    torch.testing.assert_close(got_no_grad, expected, **FP64_TOL)


def test_benchmark_helper_runs_on_cpu():
    """The GPU benchmark entry point, at toy size on the CPU (timings meaningless here)."""
    from ace_kernels.patching import benchmark_patch_speedup

    result = benchmark_patch_speedup(batch=1, steps=1, warmup=1, device="cpu", dtype=torch.float32,
                                     vision_depth=1, text_layers=1, text_len=8)
    # The patched counts cover one warm-up step and one timed step.
    assert result["stats"]["lora_linear"] == 2  # the ViT's fused qkv
    assert result["stats"]["lora_qkv"] == 2 and result["stats"]["qkv cached"] == 4  # BERT's q/k/v
    assert result["patched_ms"] > 0 and result["speedup"] > 0


def test_open_clip_clip_loss_two_processes(tmp_path):
    """gloo, 2 ranks: per-rank loss and gradients equal open_clip's own, for each setting; a
    ClipLoss built with rank numbers torch.distributed does not have (swapped) runs its own forward."""
    import os
    import subprocess
    import sys

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    pytest.importorskip("open_clip.loss")
    out = tmp_path / "clip_loss"
    procs = []
    for rank in range(2):
        # A file store, not a free port picked here: another process could take the port first.
        # The checkout's packages first: run as a script, the worker would import an installed copy (an
        # editable install of another checkout) and test that code, not this one's.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, ACE_TEST_INIT_METHOD=f"file://{tmp_path / 'store'}", RANK=str(rank), WORLD_SIZE="2",
                   OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
        procs.append(subprocess.Popen([sys.executable, __file__, "--clip-loss-worker", str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [proc.communicate(timeout=240)[0] for proc in procs]  # two interpreters on a loaded 2-core box
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log
    for rank in range(2):
        results = torch.load(f"{out}.{rank}", weights_only=False)
        for (local_loss, gather_with_grad, swapped), (before, after, stats) in results.items():
            if local_loss or swapped:
                # Per-rank local losses are not the global loss, and a module whose rank is not
                # torch.distributed's computes with other rows: open_clip's own forward runs.
                assert stats and all(key.startswith("fallback open_clip-ClipLoss") for key in stats), stats
                for b, a in zip(before, after, strict=True):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
            else:
                assert stats == {"label_guided_infonce": 1}, stats
                for b, a in zip(before, after, strict=True):  # loss, d image, d text, d logit_scale
                    torch.testing.assert_close(a, b, **FP64_TOL)


def _clip_loss_worker(out: str) -> None:
    import datetime
    import os

    import torch.distributed as dist
    from open_clip.loss import ClipLoss

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ["ACE_TEST_INIT_METHOD"], rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    local = 4
    image_all = F.normalize(torch.randn(world * local, 8, dtype=torch.float64), dim=-1)
    text_all = F.normalize(torch.randn(world * local, 8, dtype=torch.float64), dim=-1)
    rows = slice(rank * local, (rank + 1) * local)
    results = {}
    for local_loss, gather_with_grad, swapped in ((False, False, False), (False, True, False), (True, True, False),
                                                  (False, False, True)):
        module = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad,
                          rank=world - 1 - rank if swapped else rank, world_size=world)

        def run():
            image = image_all[rows].clone().requires_grad_()
            text = text_all[rows].clone().requires_grad_()
            scale = torch.tensor(11.0, dtype=torch.float64, requires_grad=True)
            loss = module(image, text, scale)
            loss.backward()
            return loss.detach(), image.grad, text.grad, scale.grad

        before = run()
        with ace_kernels.patch(module) as handle:
            after = run()
            results[(local_loss, gather_with_grad, swapped)] = (before, after, handle.stats())
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--clip-loss-worker":
        from _dist_exit import exit_now

        _clip_loss_worker(sys.argv[2])
        exit_now()


# ----------------------------------------------------------------------------------------
# Review fixes: stale weights, calls from outside, threads, copies, error names, loss dtype
# ----------------------------------------------------------------------------------------


def test_reference_weight_left_attached_by_its_merge_path_is_used_detached():
    # The reference LinearLoRA's dropout-free forward replaces its weight Parameter by
    # ``W.detach() + s B A`` and then takes s B A back out of .data: W, still attached to that
    # call's graph. A patched step after such a call must not add dL/dW into A and B.
    torch.manual_seed(12)
    attention = _randomise_lora(ReferenceAttention(16, 2, r=2).double()).train()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    want = _forward_backward(attention, lambda m, a: m(a), (x,))
    for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
        delta = proj.scaling * (proj.w_lora_B @ proj.w_lora_A)
        stale = proj.weight.detach() + delta
        stale.data -= delta.detach()
        del proj.weight
        proj.weight = stale
        assert stale.requires_grad and not isinstance(proj.weight, nn.Parameter)
    with ace_kernels.patch(attention) as handle:
        got = _forward_backward(attention, lambda m, a: m(a), (x,))
        again = _forward_backward(attention, lambda m, a: m(a), (x,))  # and a second step runs
        assert handle.stats()["lora_qkv"] == 2
    _assert_same(want, got, dict(rtol=1e-12, atol=1e-12))
    _assert_same(want, again, dict(rtol=1e-12, atol=1e-12))


def test_members_called_outside_their_attention_compute_their_own_projection():
    # Outside the attention's forward nothing is kept: a mode change or a weight written through
    # .data (which bumps no version counter) between two member calls is seen by the second.
    model = _bert(lora_dropout=0.5).train()
    attention = model.base_model.model.encoder.layer[0].attention.self
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with ace_kernels.patch(model) as handle:
        attention.query(x)
        model.eval()
        got_k = attention.key(x)
        attention.value.lora_B["default"].weight.data.add_(1.0)
        got_v = attention.value(x)
        assert handle.stats() == {"qkv ungrouped: called outside the attention's forward": 3, "lora_linear": 3}
    torch.testing.assert_close(got_k, attention.key(x), **FP64_TOL)
    torch.testing.assert_close(got_v, attention.value(x), **FP64_TOL)


def test_kept_outputs_belong_to_the_thread_that_computed_them():
    import threading

    model = _bert().eval()
    attention = model.base_model.model.encoder.layer[0].attention.self
    x, y = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    want_k = attention.key(y)
    with ace_kernels.patch(model) as handle:
        group = attention.query.__dict__["forward"].state[1]
        group.enter()  # this thread is inside the attention's forward
        try:
            attention.query(x)  # keeps k and v of x for this thread
            seen = []

            def other():
                # Another thread sees no forward in progress and nothing kept, and computes its own.
                seen.append((group.calls.inside, dict(group.calls.pending), attention.key(y)))

            thread = threading.Thread(target=other)
            thread.start()
            thread.join()
            inside, pending, got_k = seen[0]
            assert inside == 0 and pending == {}
            torch.testing.assert_close(got_k, want_k, **FP64_TOL)
            assert len(group.calls.pending) == 2  # this thread's are still there
            attention.key(x)
            assert handle.stats()["qkv cached"] == 1
        finally:
            group.leave()


@pytest.mark.parametrize("where", ["hook of the call", "other thread"])
def test_a_call_already_on_its_way_when_undo_runs_computes_the_original(where):
    # nn.Module.__call__ looks the forward up before it runs the forward pre-hooks: a hook that
    # undoes the patch, or an undo in another thread while a pre-hook runs, leaves the call with
    # the replacement, which must still compute the layer's output.
    import threading

    torch.manual_seed(3)
    layer = _randomise_lora(ReferenceLoRALinear(6, 5, r=2).double())
    x = torch.randn(3, 6, dtype=torch.float64)
    want = layer(x)
    handle = ace_kernels.patch(layer, backend="torch")
    hook_running, undone = threading.Event(), threading.Event()

    def pre_hook(module, args):
        if where == "hook of the call":
            handle.undo()
        else:
            hook_running.set()
            assert undone.wait(timeout=10)

    layer.register_forward_pre_hook(pre_hook)
    outcome = []

    def call():
        try:
            outcome.append(layer(x))
        except Exception as exc:
            outcome.append(exc)

    if where == "hook of the call":
        call()
    else:
        thread = threading.Thread(target=call)
        thread.start()
        assert hook_running.wait(timeout=10)
        handle.undo()
        undone.set()
        thread.join(timeout=10)
    assert not handle.active and "forward" not in layer.__dict__
    assert isinstance(outcome[0], torch.Tensor), f"{type(outcome[0]).__name__}: {outcome[0]}"
    torch.testing.assert_close(outcome[0], want, **FP64_TOL)


def test_undo_from_two_threads_at_once_restores_once_without_warnings(monkeypatch):
    # Thread A's undo is paused after its first revert, for thread B's undo to run meanwhile: B
    # must neither revert again (an AttributeError when both delete the same attribute) nor
    # report A's reverts as "replaced again after patching".
    import threading

    from ace_kernels import patching

    model = nn.Sequential(*[ReferenceLoRALinear(4, 4, r=2).double() for _ in range(3)])
    handle = ace_kernels.patch(model, backend="torch")
    thread_a = threading.current_thread()
    b_done = threading.Event()
    revert = patching._Swap.revert
    paused = []

    def revert_pausing_a(swap):
        reverted = revert(swap)
        if threading.current_thread() is thread_a and not paused:
            paused.append(True)
            thread_b.start()
            b_done.wait(timeout=1.0)  # a fixed undo makes B wait for A instead
        return reverted

    monkeypatch.setattr(patching._Swap, "revert", revert_pausing_a)
    errors = []

    def undo_b():
        try:
            handle.undo()
        except BaseException as exc:
            errors.append(exc)
        b_done.set()

    thread_b = threading.Thread(target=undo_b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle.undo()  # B starts once A is inside it
        thread_b.join(timeout=10)
    assert paused and not errors and not thread_b.is_alive()
    assert not [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    _assert_original_forwards(model)


def test_deep_copies_of_a_patched_model_or_part_of_it():
    model = _bert().train()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    layer = model.base_model.model.encoder.layer[0]
    plain_copy = copy.deepcopy(layer)
    with ace_kernels.patch(model) as handle:
        # A copied layer is that layer only (its handle's swaps would have reached every patched module).
        layer_copy = copy.deepcopy(layer)
        assert sum(p.numel() for p in layer_copy.parameters()) == sum(p.numel() for p in plain_copy.parameters())
        assert len(list(layer_copy.modules())) == len(list(plain_copy.modules()))
        copied = copy.deepcopy(model)
        before = _forward_backward(model, _run_bert, (embeds,))
        after = _forward_backward(copied, _run_bert, (embeds,))
        assert handle.stats()["lora_qkv"] == 2  # the copy counts on its own handle
    _assert_same(before, after)
    member = copied.base_model.model.encoder.layer[0].attention.self.query
    copy_handle, copy_group = member.__dict__["forward"].state[:2]
    assert copy_handle is not handle and copy_handle._swaps == [] and copy_handle.stats()["lora_qkv"] == 2
    assert copy_group.members[0] is member


def test_errors_inside_a_patched_forward_name_the_module():
    # A named backend that cannot run a call raises; the error says which module made the call
    # (here the Triton kernels refuse float64, at the first patched projection).
    model = _bert().train()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64)
    with ace_kernels.patch(model, backend={"lora_qkv": "triton", "lora_linear": "triton"}):
        with pytest.raises(RuntimeError, match="float64") as info:
            _run_bert(model, embeds)
        copied = copy.deepcopy(model)  # a patched copy names its modules too
    with pytest.raises(RuntimeError, match="float64") as copied_info:
        _run_bert(copied, embeds)
    if sys.version_info >= (3, 11):  # BaseException.add_note
        for raised in (info.value, copied_info.value):
            notes = getattr(raised, "__notes__", [])
            assert len(notes) == 1 and "'base_model.model.encoder.layer.0.attention.self.query.forward'" in notes[0], \
                notes
    # Raised in a patched layer that a patched loss forward calls: one note, naming the layer that raised.
    clip, loss_fn, images, texts, frame = _reference_setup()
    with ace_kernels.patch(nn.ModuleList([clip, loss_fn]), backend={"lora_qkv": "triton", "lora_linear": "triton"}):
        with pytest.raises(RuntimeError, match="float64") as info:
            loss_fn(clip, images, texts, frame, [0, 1, 2, 3, 4])
    if sys.version_info >= (3, 11):
        notes = getattr(info.value, "__notes__", [])
        assert len(notes) == 1 and "(raised in ReferenceLoRALinear '0." in notes[0], notes


def test_open_clip_clip_loss_dtype_under_autocast():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    torch.manual_seed(13)
    image = F.normalize(torch.randn(6, 16), dim=-1).bfloat16()
    text = F.normalize(torch.randn(6, 16), dim=-1).bfloat16()
    loss_module = open_clip_loss.ClipLoss()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            want = loss_module(image, text, 10.0)
            with ace_kernels.patch(loss_module):
                got = loss_module(image, text, 10.0)
        assert got.dtype == want.dtype, (autocast, got.dtype, want.dtype)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_clip_losses_take_features_of_two_dtypes_under_autocast():
    """Under autocast the originals' logit matmul casts bf16 image and fp32 text features alike and computes:
    the patched losses take both in the autocast dtype (they once refused the pair), and each feature gets its
    gradient in its own dtype. Their loss is the original's in fp64 on the bf16-rounded features (fp32 text
    read as it is is off by 4e-4), their gradients that one's to bf16 precision."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    torch.manual_seed(13)
    image = F.normalize(torch.randn(6, 16), dim=-1).bfloat16().requires_grad_()
    text = F.normalize(torch.randn(6, 16), dim=-1).requires_grad_()
    frame = FakeFrame(np.array([[i, 0, i % 3] for i in range(6)], dtype=np.float64))
    for loss_module, run in ((open_clip_loss.ClipLoss(), lambda m, u, t: m(u, t, 10.0)),
                             (ReferenceCLIPLoss(), lambda m, u, t: m(u, t, frame, list(range(6))))):
        exact_inputs = [image.detach().double().requires_grad_(), text.detach().bfloat16().double().requires_grad_()]
        exact = run(loss_module, *exact_inputs)
        exact_grads = torch.autograd.grad(exact, exact_inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = run(loss_module, image, text)
            want_grads = torch.autograd.grad(want, [image, text])
        with ace_kernels.patch(loss_module) as handle:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = run(loss_module, image, text)
                got_grads = torch.autograd.grad(got, [image, text])
            assert handle.stats() == {"label_guided_infonce": 1}, handle.stats()
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=0)
        for g, w, e in zip(got_grads, want_grads, exact_grads, strict=True):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(g.double(), e, rtol=0, atol=2 ** -7 * e.abs().max().item())


def test_clip_losses_read_features_of_one_dtype_as_they_are_under_autocast():
    """Two float32 features under autocast are read as they are (a documented difference: the originals'
    logit matmul computes in bf16): the patched losses give the float32 loss of those features, not the
    loss of their bf16 roundings (off by about 1e-3 here)."""
    from ace_kernels.contrastive import label_guided_infonce

    open_clip_loss = pytest.importorskip("open_clip.loss")
    torch.manual_seed(13)
    image = F.normalize(torch.randn(6, 16), dim=-1)
    text = F.normalize(torch.randn(6, 16), dim=-1)
    frame = FakeFrame(np.array([[i, 0, i % 3] for i in range(6)], dtype=np.float64))
    labels = torch.tensor([[i % 3] for i in range(6)], dtype=torch.float64)
    for loss_module, run, want in (
            (open_clip_loss.ClipLoss(), lambda m: m(image, text, 10.0),
             label_guided_infonce(image, text, 10.0, None, backend="torch")),
            (ReferenceCLIPLoss(), lambda m: m(image, text, frame, list(range(6))),
             label_guided_infonce(image, text, 10.0, labels, backend="torch"))):
        with ace_kernels.patch(loss_module) as handle, torch.autocast("cpu", dtype=torch.bfloat16):
            got = run(loss_module)
        assert handle.stats() == {"label_guided_infonce": 1}, handle.stats()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)


def test_patch_called_inside_autocast_recognises_what_it_recognises_outside():
    """The patch-time probes run on CPU copies with the CPU's autocast off: called inside a CPU autocast region,
    patch() skipped the reference losses and apply_ace_hgat (their probes ran the originals in bf16 against the
    fused ops), saying they compute something else."""
    torch.manual_seed(2)
    for module in (ReferenceCLIPLoss(), ReferenceACELoss(20, topk=3), _Pair([TinyCLIP()])):
        with torch.autocast("cpu", dtype=torch.bfloat16), ace_kernels.patch(module) as handle:
            assert handle.records and all(r.status == "patched" for r in handle.records), handle.summary()


@pytest.mark.triton
def test_patched_training_model_without_dropout_never_merges(device):
    # PEFT's LoRA with dropout 0 (an nn.Identity) in a training model: a pass without a graph
    # (a chunked step's first pass) must compute what a pass with one computes. The layer's own
    # mode reaches the op, and Triton merges B A into the weight only in evaluation.
    model = _bert(lora_dropout=0.0).float().train().to(device)
    embeds = torch.randn(2, 5, 32, device=device)
    with ace_kernels.patch(model, backend="triton") as handle:
        with torch.no_grad():
            first = _run_bert(model, embeds)
        second = _run_bert(model, embeds).detach()
        assert handle.stats() == {"lora_qkv": 4, "qkv cached": 8}
    assert torch.equal(first, second)

    # The reference layout without dropout (dropout=None) likewise: its layers' own mode reaches the op.
    torch.manual_seed(0)
    attention = _randomise_lora(ReferenceAttention(32, 4)).train().to(device)
    for layer in (attention.q_proj, attention.k_proj, attention.v_proj):
        layer.bias.requires_grad_(False)  # the Triton kernels take a frozen base layer
    with ace_kernels.patch(attention, backend="triton") as handle:
        with torch.no_grad():
            first = attention(embeds)
        second = attention(embeds).detach()
        assert handle.stats() == {"lora_qkv": 2, "qkv cached": 4}
    assert torch.equal(first, second)


# ----------------------------------------------------------------------------------------
# What is never patched: wrappers already on the instance, look-alikes that compute otherwise
# ----------------------------------------------------------------------------------------


def test_a_layer_whose_forward_is_already_wrapped_is_left_as_it_runs():
    """accelerate-style hooks set ``forward`` on the instance: the fused call would skip the
    wrapper, so such a layer (and the q/k/v group it belongs to), or loss, is skipped, with the reason."""
    model = _bert()
    attention = model.base_model.model.encoder.layer[0].attention.self
    inner = attention.query.forward
    attention.query.forward = lambda x, *a, **k: 2.0 * inner(x, *a, **k)
    embeds = torch.randn(2, 5, 32, dtype=torch.float64)
    before = _forward_backward(model, _run_bert, (embeds,))
    with ace_kernels.patch(model) as handle:
        records = {r.name: r for r in handle.records}
        wrapped = next(r for name, r in records.items() if name.endswith("layer.0.attention.self.query"))
        assert wrapped.status == "skipped" and "replaced on the instance" in wrapped.reason
        # Its siblings go one by one; the other layer's triple still groups.
        assert sum(r.kind.startswith("qkv-group") for r in handle.records) == 1
        after = _forward_backward(model, _run_bert, (embeds,))
    _assert_same(before, after)
    del attention.query.forward

    _, loss_fn, _, _, _ = _reference_setup()
    hgat = loss_fn.apply_ace_hgat
    loss_fn.apply_ace_hgat = lambda *a, **k: hgat(*a, **k)
    with ace_kernels.patch(loss_fn) as handle:
        statuses = {r.name: (r.status, r.reason) for r in handle.records}
        assert statuses["apply_ace_hgat"][0] == "skipped" and "replaced on the instance" in statuses[
            "apply_ace_hgat"][1]
        assert statuses["forward"][0] == "patched"
    # A loss whose forward is wrapped on the instance: the fused forward would skip the wrapper.
    for loss_module in (ReferenceCLIPLoss(), loss_fn):
        inner = loss_module.forward
        loss_module.forward = lambda *a, _inner=inner, **k: _inner(*a, **k)
        with ace_kernels.patch(loss_module, hypergraph=False) as handle:
            assert [(r.status, "replaced on the instance" in r.reason) for r in handle.records] == [("skipped", True)]
            assert loss_module.forward.__name__ == "<lambda>"


def test_reference_look_alikes_that_compute_otherwise_are_skipped():
    """The reference layouts are recognised by attribute names; a subclass that keeps them and
    changes the computation is found by a probe at patch time and left alone."""

    class DoubledLoRA(ReferenceLoRALinear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    class BranchOnlyScaled(ReferenceLoRALinear):
        def forward(self, x):  # differs only in the LoRA branch, which B = 0 at init would hide
            return F.linear(x, self.weight, self.bias) + 3.0 * self.scaling * (x @ self.w_lora_A.t()) @ \
                self.w_lora_B.t()

    for cls in (DoubledLoRA, BranchOnlyScaled):
        layer = cls(6, 5, r=2).double()
        with ace_kernels.patch(layer) as handle:
            assert [(r.status, r.reason) for r in handle.records] == [
                ("skipped", "its forward does not compute x W^T + b + s (x A^T) B^T (a probe differs)")]
            assert "forward" not in layer.__dict__
    # Patched in eval mode (merged: s B A folded into the weight), the probe runs on an unmerged copy; the layer is
    # left as it was, and a later train() runs its own forward.
    merged = DoubledLoRA(6, 5, r=2).double().eval()
    weight = merged.weight.detach().clone()
    with ace_kernels.patch(merged) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [
            ("skipped", "its forward does not compute x W^T + b + s (x A^T) B^T (a probe differs)")]
        assert merged.merged and torch.equal(merged.weight, weight)
    plain = ReferenceLoRALinear(6, 5, r=2).double()
    rng_before = torch.random.get_rng_state()
    with ace_kernels.patch(plain) as handle:
        assert [r.status for r in handle.records] == ["patched"]
        assert torch.equal(torch.random.get_rng_state(), rng_before)  # the probe used its own generator
        assert torch.equal(plain.w_lora_B, torch.zeros_like(plain.w_lora_B))  # on a copy

    class ResidualHypergraph(ReferenceACELoss):
        def apply_ace_hgat(self, features, attn_weights, encoder="img"):
            return features + super().apply_ace_hgat(features, attn_weights, encoder)

    class OtherLoss(ReferenceACELoss):
        def forward(self, clip_model, images, texts, merged_df=None, indices=None):
            return 2.0 * super().forward(clip_model, images, texts, merged_df, indices)

    residual = ResidualHypergraph(20, topk=3).double()
    with ace_kernels.patch(residual) as handle:
        statuses = {r.name: (r.status, r.reason) for r in handle.records}
        assert statuses["apply_ace_hgat"] == (
            "skipped", "apply_ace_hgat (img) does not compute the reference's hypergraph (a probe differs)")

    class TextResidualHypergraph(ReferenceACELoss):
        def apply_ace_hgat(self, features, attn_weights, encoder="img"):
            out = super().apply_ace_hgat(features, attn_weights, encoder)
            return features + out if encoder == "text" else out

    with ace_kernels.patch(TextResidualHypergraph(20, topk=3).double()) as handle:  # the probe tries both encoders
        statuses = {r.name: (r.status, r.reason) for r in handle.records}
        assert statuses["apply_ace_hgat"] == (
            "skipped", "apply_ace_hgat (text) does not compute the reference's hypergraph (a probe differs)")
    other = OtherLoss(20, topk=3).double()
    with ace_kernels.patch(other) as handle:
        statuses = {r.name: (r.status, r.reason) for r in handle.records}
        assert statuses["apply_ace_hgat"][0] == "patched"
        assert statuses["forward"][0] == "skipped" and "forward comes from OtherLoss" in statuses["forward"][1]


def test_adapters_changed_after_patching_fall_back():
    """An adapter, its activation, its forward or its class replaced, or a hook put on one of its
    layers, after patching: the hypergraph runs the original again (checked per call; a new
    adapter class is probed at its first call)."""
    _, loss_fn, _, _, _ = _reference_setup()
    features = F.normalize(torch.randn(3, 9, 20, dtype=torch.float64), dim=-1).requires_grad_()
    cls_attn = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    run = lambda m, f, c: m.apply_ace_hgat(f, c, encoder="img")  # noqa: E731

    class Residual(type(loss_fn.img_node_adapter)):
        def forward(self, z):
            return z + super().forward(z)

    def gelu(m):
        m.img_edge_adapter.act = nn.GELU()

    def residual(m):
        replacement = Residual(20, 8).double()
        replacement.load_state_dict(m.img_node_adapter.state_dict())
        m.img_node_adapter = replacement

    def wrapped(m):
        adapter = m.img_edge_adapter
        adapter.forward = lambda z: 1.5 * adapter.up(adapter.act(adapter.down(z)))

    def reclassed(m):  # the same object, layers and activation; another class's forward
        m.img_node_adapter.__class__ = Residual

    def hooked(m):
        m.img_edge_adapter.up.register_forward_hook(lambda module, args, out: out * 0.5)

    for change, reason in ((gelu, "is not LeakyReLU(0.2)"), (residual, "is not up(leaky_relu(down(z), 0.2))"),
                           (wrapped, "replaced on the instance in the adapters"),
                           (reclassed, "is not up(leaky_relu(down(z), 0.2))"), (hooked, "hooks on the adapters")):
        _, loss_fn, _, _, _ = _reference_setup()
        with ace_kernels.patch(loss_fn, loss=False) as handle:
            change(loss_fn)
            after = _forward_backward(loss_fn, run, (features, cls_attn))
            assert list(handle.stats()) == [next(k for k in handle.stats() if reason in k)], handle.stats()
        before = _forward_backward(loss_fn, run, (features, cls_attn))  # the original, changed the same way
        _assert_same(before, after, dict(rtol=0, atol=0))


@pytest.mark.parametrize("tokens", [3, 4], ids=["N_eq_topk", "N_eq_topk_plus_1"])
def test_apply_ace_hgat_on_short_sequences_is_fused_and_matches_the_original(tokens):
    """N = topk and topk + 1 (topk = 3): rows with fewer finite scores than topk, where the
    original's torch.topk keeps -inf scores (weight 0). The fused op takes them, with the
    original's output and gradients."""
    torch.manual_seed(15)
    features = F.normalize(torch.randn(2, tokens, 20, dtype=torch.float64), dim=-1).requires_grad_()
    attn = torch.rand(2, tokens - 1, dtype=torch.float64, requires_grad=True)

    def run(m, f, a):
        return m.apply_ace_hgat(f, a, encoder="img")

    _, loss_fn, _, _, _ = _reference_setup()
    want = _forward_backward(loss_fn, run, (features, attn))
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        got = _forward_backward(loss_fn, run, (features, attn))
        assert handle.stats() == {"ace_hypergraph": 1}, handle.stats()
    _assert_same(want, got)


def test_apply_ace_hgat_calls_the_fused_op_does_not_take_run_as_unpatched():
    """Calls the hypergraph op would compute otherwise run the original apply_ace_hgat, with the
    same result: autocast on (the original's dtypes), and a global module hook (the original fires it for the
    adapters and their layers; here it changes their outputs); and fewer than topk tokens, or an adapter in
    another dtype than the features, where the original raises its own error. A global hook also sends the ACE
    loss's CLS-only path to the original. Two tokens with topk <= 2 (a patch row with no candidate) are the
    op's, and match."""
    torch.manual_seed(14)
    features = F.normalize(torch.randn(2, 9, 20, dtype=torch.float64), dim=-1)
    attn = torch.rand(2, 8, dtype=torch.float64)

    def few_tokens(m, topk):
        m.args.topk = topk
        return m.apply_ace_hgat(features[:, :2], attn[:, :1], encoder="img")

    for topk in (1, 2):
        _, loss_fn, _, _, _ = _reference_setup()
        want = few_tokens(loss_fn, topk)
        with ace_kernels.patch(loss_fn, loss=False) as handle:
            got = few_tokens(loss_fn, topk)
            assert handle.stats() == {"ace_hypergraph": 1}, handle.stats()
        torch.testing.assert_close(got, want, **FP64_TOL)
    _, loss_fn, _, _, _ = _reference_setup()
    with pytest.raises(RuntimeError) as original:
        few_tokens(loss_fn, 3)
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        with pytest.raises(type(original.value), match=re.escape(str(original.value))):
            few_tokens(loss_fn, 3)
        assert handle.stats() == {"fallback apply_ace_hgat: N=2 tokens < topk = 3": 1}, handle.stats()

    # An adapter in another dtype than the features: its nn.Linear refuses them (the op would cast it).
    _, loss_fn, _, _, _ = _reference_setup()
    loss_fn.img_edge_adapter.float()
    with pytest.raises(RuntimeError) as original:
        loss_fn.apply_ace_hgat(features, attn, encoder="img")
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        with pytest.raises(type(original.value), match=re.escape(str(original.value))):
            loss_fn.apply_ace_hgat(features, attn, encoder="img")
        assert handle.stats() == {"fallback apply_ace_hgat: adapter dtype torch.float32 differs from the features' "
                                  "torch.float64": 1}, handle.stats()

    def autocast(m):
        m.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m.apply_ace_hgat(features.float(), attn.float(), encoder="text")

    def global_hook(m):
        hook = _global_linear_hook()
        try:
            return m.apply_ace_hgat(features, attn, encoder="img")
        finally:
            hook.remove()

    for run, reason in ((autocast, "autocast is on"), (global_hook, "global module hooks registered")):
        _, loss_fn, _, _, _ = _reference_setup()
        want = run(loss_fn)
        with ace_kernels.patch(loss_fn, loss=False) as handle:
            got = run(loss_fn)
            assert handle.stats() == {f"fallback apply_ace_hgat: {reason}": 1}, handle.stats()
        torch.testing.assert_close(got, want, **FP64_TOL)

    clip, loss_fn, images, texts, frame = _reference_setup()
    model = _Pair([clip, loss_fn]).train()

    def hooked_loss():
        hook = _global_linear_hook()
        try:
            return _forward_backward(model, lambda m, *a: _run_loss(m, *a), (images, texts, frame, [0, 1, 2, 3, 4]))
        finally:
            hook.remove()

    before = hooked_loss()
    with ace_kernels.patch(model, lora=False) as handle:
        after = hooked_loss()
        assert handle.stats() == {"fallback apply_ace_hgat: global module hooks registered": 2,
                                  "label_guided_infonce": 1}, handle.stats()
    _assert_same(before, after)


def test_reference_losses_come_in_the_features_dtype():
    """The plain and the ACE reference losses return the dtype the reference's would (16-bit
    features: a 16-bit loss), though the fused loss computes in fp32."""
    torch.manual_seed(3)
    loss_module = ReferenceCLIPLoss(logit_scale=12.0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        image = F.normalize(torch.randn(6, 8), dim=-1).to(dtype)
        text = F.normalize(torch.randn(6, 8), dim=-1).to(dtype)
        want = loss_module(image, text)
        with ace_kernels.patch(loss_module):
            got = loss_module(image, text)
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)

    # The ACE loss module on a bf16 model: a bf16 loss, as the reference's.
    torch.manual_seed(3)
    clip, ace_loss = TinyCLIP().bfloat16(), ReferenceACELoss(20, topk=3).bfloat16()
    images, texts = torch.randn(5, 3, 16, 16).bfloat16(), torch.randint(1, 50, (5, 12))
    want = ace_loss(clip, images, texts)
    with ace_kernels.patch(ace_loss, lora=False) as handle:
        got = ace_loss(clip, images, texts)
        assert handle.stats()["label_guided_infonce"] == 1, handle.stats()
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)


def test_patch_arguments_are_checked_up_front():
    model = _bert()
    with pytest.raises(ValueError, match="'cuda' has no implementation of lora_linear, lora_qkv"):
        ace_kernels.patch(model, backend="cuda")
    with pytest.raises(ValueError, match="'cuda' has no implementation of label_guided_infonce"):
        ace_kernels.patch(model, lora=False, hypergraph=False, backend="cuda")
    _, loss_fn, _, _, _ = _reference_setup()
    with ace_kernels.patch(loss_fn, lora=False, loss=False, backend="cuda") as handle:  # the hypergraph has one
        assert [r.name for r in handle.patched] == ["apply_ace_hgat"]
    with pytest.raises(ValueError, match="argument 'backend': expected keys among"):
        ace_kernels.patch(model, backend={"lora_qkv": "torch", 3: "torch"})
    with pytest.raises(ValueError, match="argument 'backend': 'lora_linear': 'cuda' names a backend without that op"):
        ace_kernels.patch(model, backend={"lora_linear": "cuda", "lora_qkv": "torch"})

    from ace_kernels.patching import Recogniser, register_recogniser, unregister_recogniser

    with pytest.raises(ValueError, match="argument 'recogniser': its family must be one of"):
        register_recogniser(Recogniser("x", "LoRA", lambda m: False, lambda *a: None))
    with pytest.raises(ValueError, match="argument 'recogniser': 'x' is not registered"):
        unregister_recogniser(Recogniser("x", "lora", lambda m: False, lambda *a: None))
    with pytest.warns(UserWarning, match="nothing in this Linear was recognised"):
        handle = ace_kernels.patch(nn.Linear(3, 3))
    assert not handle.records


def test_probes_leave_the_model_alone_and_take_real_reference_modules():
    """The patch-time probes run on CPU copies: the user's hooks do not fire, a 16-bit reference
    hypergraph at BiomedCLIP's width is recognised (its own top-k would tie and reorder in 16
    bits), a subclass that only extends apply_ace_hgat keeps its loss patched, and a layer on the
    meta device is skipped with the reason (nothing to probe there)."""
    layer = _randomise_lora(ReferenceLoRALinear(6, 5, r=2))
    calls = []
    layer.register_forward_hook(lambda *a: calls.append("layer"))
    from torch.nn.modules.module import register_module_forward_hook

    remove = register_module_forward_hook(lambda *a: calls.append("global"))
    try:
        with ace_kernels.patch(layer) as handle:
            assert [r.status for r in handle.records] == ["patched"]
    finally:
        remove.remove()
    assert calls == []

    for dtype in (torch.bfloat16, torch.float16):
        wide = ReferenceACELoss(768, hidden=384, topk=5).to(dtype)
        with ace_kernels.patch(wide, loss=False) as handle:
            assert [(r.name, r.status) for r in handle.records] == [("apply_ace_hgat", "patched")], str(handle)

    class LoggedHgat(ReferenceACELoss):
        def apply_ace_hgat(self, features, attn_weights, encoder="img"):
            return super().apply_ace_hgat(features, attn_weights, encoder)

    with ace_kernels.patch(LoggedHgat(20, topk=3).double()) as handle:
        assert {r.name: r.status for r in handle.records} == {"apply_ace_hgat": "patched", "forward": "patched"}

    meta = ReferenceLoRALinear(6, 5, r=2).to("meta")
    with ace_kernels.patch(meta) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [
            ("skipped", "on the meta device: its forward cannot be checked (patch it once it has weights)")]
    # A reference loss module on the meta device: its hypergraph and its loss forward are skipped
    # with the reason (neither can be probed); once it has weights, a new patch takes both (no
    # reason cached).
    meta_loss = ReferenceACELoss(20, topk=3).to("meta")
    with ace_kernels.patch(meta_loss) as handle:
        assert {r.name: (r.status, r.reason) for r in handle.records} == {
            "apply_ace_hgat": ("skipped", "adapter on the meta device: cannot be checked (patch it once it has "
                                          "weights)"),
            "forward": ("skipped", "on the meta device: its forward cannot be checked (patch it once it has "
                                   "weights)")}, str(handle)
    meta_loss.to_empty(device="cpu")
    meta_loss.load_state_dict(ReferenceACELoss(20, topk=3).state_dict())
    with ace_kernels.patch(meta_loss) as handle:
        assert {r.name: r.status for r in handle.records} == {"apply_ace_hgat": "patched", "forward": "patched"}

    # Attributes a copy cannot take (a lock, an open file, a hook bound to an object holding one)
    # are shared by the probe's copy, not copied: the module is patched.
    import threading

    class Monitor:
        def __init__(self):
            self.lock = threading.Lock()

        def hook(self, *args):
            return None

    held = ReferenceACELoss(20, topk=3).double()
    held.lock = threading.Lock()
    held.register_forward_hook(Monitor().hook)
    with ace_kernels.patch(held, loss=False) as handle:
        assert [r.status for r in handle.records] == ["patched"], str(handle)


@pytest.mark.parametrize("default_dtype", [torch.bfloat16, torch.float16])
def test_probes_do_not_run_in_a_16_bit_default_dtype(default_dtype):
    """The probes copy a module into the default dtype; under torch.set_default_dtype(bfloat16)
    (or float16) the copies, their random inputs and the reference's arithmetic were 16-bit, so
    the loss modules, which compute exactly what the fused ops do, were refused ("does not compute
    the reference's loss"), while the same modules were patched under a float32 default."""
    def records():
        torch.manual_seed(0)
        modules = [ReferenceLoRALinear(6, 5, r=2), ReferenceAttention(8, 2, r=2), ReferenceACELoss(20, topk=3),
                   ReferenceCLIPLoss()]
        found = []
        for module in modules:
            with ace_kernels.patch(module) as handle:
                found.append([(r.name, r.status, r.reason) for r in handle.records])
        return found

    want = records()
    statuses = [[status for _, status, _ in found] for found in want]  # two records for the loss: forward, hgat
    assert statuses == [["patched"], ["patched"], ["patched", "patched"], ["patched"]], want
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        got = records()
    finally:
        torch.set_default_dtype(previous)
    assert got == want


def test_probes_of_cpu_modules_ignore_the_default_device():
    """Under torch.set_default_device("cuda") (the meta device stands in for it here) the probes
    drew their random inputs with a CPU generator on the default device: patch() raised (a CUDA
    default: the generator's device; meta: no data to copy) instead of probing the CPU copies."""
    def records(modules):
        found = []
        for module in modules:
            with ace_kernels.patch(module) as handle:
                found.append([(r.name, r.status, r.reason) for r in handle.records])
        return found

    def build():  # new modules each time: an adapter's check is kept once made
        torch.manual_seed(0)
        return [ReferenceLoRALinear(6, 5, r=2), ReferenceAttention(8, 2, r=2), ReferenceACELoss(20, topk=3),
                ReferenceCLIPLoss()]

    want = records(build())
    statuses = [[status for _, status, _ in found] for found in want]  # two records for the loss: forward, hgat
    assert statuses == [["patched"], ["patched"], ["patched", "patched"], ["patched"]], want
    modules = build()
    with torch.device("meta"):
        got = records(modules)
    assert got == want


class _UntypedZerosLoss(ReferenceACELoss):
    """The released code's apply_ace_hgat builds its score matrix with an untyped ``torch.zeros``
    (float32 whatever the features' dtype); the probe must run in the dtype that gives."""

    def apply_ace_hgat(self, features, attn_weights, encoder="img"):
        edge, node = (self.img_edge_adapter, self.img_node_adapter) if encoder == "img" else \
            (self.text_edge_adapter, self.text_node_adapter)
        batch, tokens, _ = features.shape
        patches = F.normalize(features[:, 1:], dim=-1)
        scores = torch.zeros(size=(batch, tokens, tokens), device=features.device)  # untyped, as released
        scores[:, 1:, 1:] = patches @ patches.transpose(1, 2)
        scores[:, 0, 1:] = attn_weights
        blocked = torch.eye(tokens, dtype=torch.bool, device=features.device).expand(batch, -1, -1).clone()
        blocked[:, 1:, 0] = True
        scores = scores.masked_fill(blocked, float("-inf"))
        top_values, top_index = scores.topk(self.args.topk, dim=-1)
        adjacency = torch.full_like(scores, float("-inf")).scatter(-1, top_index, top_values).softmax(dim=-1)
        eye = torch.eye(tokens, dtype=torch.bool, device=features.device).expand(batch, -1, -1)
        adjacency = adjacency.masked_fill(eye, 1.0)
        first_column = torch.cat([adjacency[:, :1, 0], adjacency[:, 0, 1:]], dim=1)
        adjacency = torch.cat([first_column.unsqueeze(-1), adjacency[:, :, 1:]], dim=2)
        return node(adjacency.transpose(1, 2) @ edge(adjacency @ features))


def test_loss_classes_the_probes_must_take_or_refuse():
    """The released layout (untyped zeros) and a subclass extending apply_ace_hgat are patched; a
    forward from a mixin or a base class that does not define apply_ace_hgat is not; the adapters
    are probed at patch time only (the first call does not probe them again)."""
    from ace_kernels import patching

    with ace_kernels.patch(_UntypedZerosLoss(20, topk=3)) as handle:
        assert {r.name: r.status for r in handle.records} == {"apply_ace_hgat": "patched", "forward": "patched"}, \
            str(handle)

    class OtherLoss(nn.Module):
        def forward(self, clip_model, images, texts, merged_df=None, indices=None):
            return torch.zeros(())

    class Mixed(OtherLoss, ReferenceACELoss):
        pass

    class Base(nn.Module):
        def forward(self, clip_model, images, texts, merged_df=None, indices=None):
            return torch.zeros(())

    class Sub(Base):
        def __init__(self):
            super().__init__()
            self.__dict__.update(ReferenceACELoss(20, topk=3).double().__dict__)

        apply_ace_hgat = ReferenceACELoss.apply_ace_hgat

    for module in (Mixed(20, topk=3).double(), Sub()):
        with ace_kernels.patch(module) as handle:
            forward = next(r for r in handle.records if r.name == "forward")
            assert forward.status == "skipped" and "not known to be the reference's loss" in forward.reason

    _, loss_fn, _, _, _ = _reference_setup()
    probed = []
    original = patching._adapter_reason
    patching._adapter_reason = lambda adapter: probed.append(adapter) or original(adapter)
    try:
        with ace_kernels.patch(loss_fn, loss=False):
            assert len(probed) == 4  # at patch time
            features = F.normalize(torch.randn(3, 9, 20, dtype=torch.float64), dim=-1)
            loss_fn.apply_ace_hgat(features, torch.randn(3, 8, dtype=torch.float64), encoder="img")
            assert len(probed) == 4  # not again at the call
    finally:
        patching._adapter_reason = original


def test_parametrized_adapters_are_computed_once_a_call():
    """A parametrized adapter weight is computed at each read, and spectral_norm's, in training mode, runs
    a power iteration each time (updating its u and v). The original reads each weight once a call; the
    fused paths read it in the per-call check too (the dtype), then in the op, so the power iteration ran
    twice a call: the output differed from the original's beyond rounding (1e-5 in float64) and u drifted
    away; and the patch-time probes, which compare the original with the op on a copy, saw two weights
    and skipped apply_ace_hgat as not the reference's. The check and the op (each probe's two sides) now
    share one computation (parametrize.cached), in apply_ace_hgat and in the loss's CLS-only path: the
    original's outputs, and the same u, call after call."""
    from torch.nn.utils import parametrizations

    def parametrize(loss_fn):
        for adapter in ("img_edge_adapter", "text_node_adapter"):
            parametrizations.spectral_norm(getattr(loss_fn, adapter).up)
            parametrizations.weight_norm(getattr(loss_fn, adapter).down)

    torch.manual_seed(16)
    features = F.normalize(torch.randn(2, 9, 20, dtype=torch.float64), dim=-1)
    attn = torch.rand(2, 8, dtype=torch.float64)
    for before_patch in (True, False):
        clip, loss_fn, images, texts, frame = _reference_setup()
        twin = copy.deepcopy(loss_fn)
        parametrize(twin)
        if before_patch:
            parametrize(loss_fn)
        with ace_kernels.patch(loss_fn) as handle:
            if not before_patch:
                parametrize(loss_fn)  # the same layer objects: the adapter checks made at patch time still hold
            twin.load_state_dict(loss_fn.state_dict())  # the u and v as they are now
            for _ in range(2):
                want = twin.apply_ace_hgat(features, attn, encoder="img")
                torch.testing.assert_close(loss_fn.apply_ace_hgat(features, attn, encoder="img"), want, **FP64_TOL)
                want = twin(clip, images, texts, frame, [0, 1, 2, 3, 4])
                torch.testing.assert_close(loss_fn(clip, images, texts, frame, [0, 1, 2, 3, 4]), want, **FP64_TOL)
                for key, value in twin.state_dict().items():
                    torch.testing.assert_close(loss_fn.state_dict()[key], value, **FP64_TOL)
            stats = {"ace_hypergraph": 2, "ace_hypergraph cls_only": 4, "label_guided_infonce": 2}
            assert [r.status for r in handle.records] == ["patched", "patched"] and handle.stats() == stats, \
                str(handle)


def test_patch_leaves_parametrized_weights_uncomputed():
    """patch() recognised a reference LoRA layer by its attributes, 'weight' first: on every other layer
    that read a parametrized weight, so each spectral_norm (training mode) ran a power iteration at patch
    time, changing its u and v (the unpatched run's differ from then on). The LoRA attributes are now
    looked up first: patch() leaves the state dict bit for bit as it was."""
    from torch.nn.utils import parametrizations

    _, loss_fn, _, _, _ = _reference_setup()
    torch.manual_seed(17)
    model = nn.ModuleDict({"loss": loss_fn, "head": nn.Linear(64, 48).double()})
    for layer in (model["head"], loss_fn.img_edge_adapter.up, loss_fn.text_node_adapter.down):
        parametrizations.spectral_norm(layer)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with ace_kernels.patch(model) as handle:
        assert [r.status for r in handle.records] == ["patched", "patched"], str(handle)
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key


def test_hooks_on_adapter_layers_neither_fire_nor_decide_the_adapter_check():
    """The adapter check probes a copy without hooks: a hook on an adapter's layer, registered
    before patch(), does not fire at patch time and does not make the check fail (the calls fall
    back while it is there, and once it is removed the fused op serves them, in this patch and in
    a new one). A check made while global module hooks change the layers' outputs is not kept:
    a patch after they are removed checks again."""
    _, loss_fn, _, _, _ = _reference_setup()
    torch.manual_seed(16)
    features = F.normalize(torch.randn(2, 9, 20, dtype=torch.float64), dim=-1)
    attn = torch.rand(2, 8, dtype=torch.float64)
    calls = []

    def halve(module, args, out):
        calls.append(module)
        return out * 0.5

    hook = loss_fn.img_edge_adapter.up.register_forward_hook(halve)
    want = loss_fn.apply_ace_hgat(features, attn, encoder="img")
    calls.clear()
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        assert calls == []
        # Patched, and recorded as falling back while the hook is there.
        assert [(r.status, r.reason) for r in handle.records] == [
            ("fallback", "img calls: hooks on the adapters")], str(handle)
        torch.testing.assert_close(loss_fn.apply_ace_hgat(features, attn, encoder="img"), want, rtol=0, atol=0)
        hook.remove()
        loss_fn.apply_ace_hgat(features, attn, encoder="img")
        assert handle.stats() == {"fallback apply_ace_hgat: hooks on the adapters": 1, "ace_hypergraph": 1}
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        assert [r.status for r in handle.records] == ["patched"], str(handle)

    _, loss_fn, _, _, _ = _reference_setup()
    hook = _global_linear_hook()
    try:
        with ace_kernels.patch(loss_fn, loss=False) as handle:
            assert [r.status for r in handle.records] == ["skipped"], str(handle)  # the probes see the hook
    finally:
        hook.remove()
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        assert [r.status for r in handle.records] == ["patched"], str(handle)


def test_each_fused_call_gets_the_backend_given_for_its_op(monkeypatch):
    """patch's per-op backend dict: a single LoRA layer's call gets lora_linear's backend (a
    timm-style fused qkv is one layer, not a q/k/v group), a group lora_qkv's, the ACE loss's
    CLS-only hypergraph ace_hypergraph's and its loss label_guided_infonce's. The ops are spied
    on (and run on the torch backend)."""
    import importlib

    seen = set()
    for module_name, op in (("ace_kernels.lora", "lora_linear"), ("ace_kernels.lora", "lora_qkv"),
                            ("ace_kernels.hypergraph", "ace_hypergraph"),
                            ("ace_kernels.contrastive", "label_guided_infonce")):
        module = importlib.import_module(module_name)

        def spy(*args, backend, _op=op, _real=getattr(module, op), **kwargs):
            seen.add((_op, backend))
            return _real(*args, backend="torch", **kwargs)

        monkeypatch.setattr(module, op, spy)
    clip, loss_fn, images, texts, frame = _reference_setup()
    single = _randomise_lora(ReferenceLoRALinear(8, 24, r=2).double())
    model = nn.ModuleList([clip, loss_fn, single])
    backend = {"lora_linear": "torch", "lora_qkv": "triton", "ace_hypergraph": "cuda", "label_guided_infonce": "auto"}
    with ace_kernels.patch(model, backend=backend) as handle:
        seen.clear()  # (the patch-time probes call the ops on the torch backend)
        single(torch.randn(3, 8, dtype=torch.float64))
        loss_fn(clip, images, texts, frame, [0, 1, 2, 3, 4])
        assert {"lora_linear", "lora_qkv", "ace_hypergraph cls_only", "label_guided_infonce"} <= set(handle.stats())
    assert seen == set(backend.items()), seen
    with ace_kernels.patch(single, backend={"lora_qkv": "torch"}):
        seen.clear()
        single(torch.randn(3, 8, dtype=torch.float64))
    assert seen == {("lora_linear", "auto")}, seen  # an op the dict leaves out gets "auto"


def test_an_adapter_replaced_by_another_object_of_the_same_class_is_checked_again():
    """The adapter check is per object: a new adapter of an already checked class whose forward
    reads a flag (a residual here) is probed at its first call and falls back."""

    class FlagAdapter(nn.Module):
        def __init__(self, dim, hidden, residual=False):
            super().__init__()
            self.down, self.up, self.act, self.residual = nn.Linear(dim, hidden), nn.Linear(hidden, dim), \
                nn.LeakyReLU(0.2), residual

        def forward(self, z):
            out = self.up(self.act(self.down(z)))
            return z + out if self.residual else out

    _, loss_fn, _, _, _ = _reference_setup()
    loss_fn.img_node_adapter = FlagAdapter(20, 8).double()
    features = F.normalize(torch.randn(3, 9, 20, dtype=torch.float64), dim=-1).requires_grad_()
    cls_attn = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    run = lambda m, f, c: m.apply_ace_hgat(f, c, encoder="img")  # noqa: E731
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        assert [r.status for r in handle.records] == ["patched"]
        loss_fn.img_node_adapter = FlagAdapter(20, 8, residual=True).double()
        after = _forward_backward(loss_fn, run, (features, cls_attn))
        assert list(handle.stats()) == ["fallback apply_ace_hgat: adapter forward is not up(leaky_relu(down(z), 0.2))"]
    _assert_same(_forward_backward(loss_fn, run, (features, cls_attn)), after, dict(rtol=0, atol=0))


# ----------------------------------------------------------------------------------------
# Review fixes (stop 23): loss look-alikes are probed; a base weight's gradient is kept
# ----------------------------------------------------------------------------------------


def test_loss_look_alikes_that_compute_another_loss_are_left_as_they_run():
    """The losses are recognised by names and signatures; a probe of the class's forward now
    decides. A plain-loss look-alike that keeps its multiplier as a log, and a subclass of the
    reference that adds a term (and re-declares apply_ace_hgat, which the structural check
    took as the reference's own), are skipped with the reason and compute what they did; the
    reference itself is still patched."""
    class LogScaleLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.args = SimpleNamespace()
            self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

        def forward(self, image_features, text_features, merged_df=None, indices=None):
            logits = self.logit_scale.exp() * image_features @ text_features.t()
            target = torch.arange(len(logits))
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2

    image = F.normalize(torch.randn(4, 6, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(4, 6, dtype=torch.float64), dim=-1)
    look_alike = LogScaleLoss()
    before = look_alike(image, text)
    with ace_kernels.patch(look_alike) as handle:
        (record,) = handle.records
        assert record.status == "skipped" and "does not compute the reference's loss" in record.reason, str(handle)
        torch.testing.assert_close(look_alike(image, text), before, rtol=0, atol=0)

    # A reference CLIP loss whose label handling differs (it ignores the frame) is caught by the
    # probe with labels; the reference itself is patched.
    class NoLabels(ReferenceCLIPLoss):
        def forward(self, image_features, text_features, merged_df=None, indices=None):
            return super().forward(image_features, text_features)

    with ace_kernels.patch(NoLabels()) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [
            ("skipped", "its forward does not compute the reference's loss (a probe with labels differs)")]
    with ace_kernels.patch(ReferenceCLIPLoss()) as handle:
        assert [r.status for r in handle.records] == ["patched"]

    class WithPenalty(ReferenceACELoss):
        def apply_ace_hgat(self, features, attn_weights, encoder="img"):
            return super().apply_ace_hgat(features, attn_weights, encoder)

        def forward(self, clip_model, images, texts, merged_df=None, indices=None):
            return super().forward(clip_model, images, texts, merged_df, indices) + 0.1 * self.logit_scale ** 2

    torch.manual_seed(3)
    clip = TinyCLIP().double()
    loss_fn = WithPenalty(20, topk=3).double()
    images, texts = torch.randn(5, 3, 16, 16, dtype=torch.float64), torch.randint(1, 50, (5, 12))
    before = loss_fn(clip, images, texts)
    with ace_kernels.patch(loss_fn) as handle:
        statuses = {r.name: (r.status, r.reason) for r in handle.records}
        assert statuses["apply_ace_hgat"][0] == "patched"
        assert statuses["forward"] == ("skipped", "its forward does not compute the reference's loss (a probe with "
                                                  "apply_gnn_encoders='vision', without labels, differs)")
        torch.testing.assert_close(loss_fn(clip, images, texts), before, **FP64_TOL)

    # A forward that differs only in one mode is caught in that mode.
    class TextModeDiffers(ReferenceACELoss):
        def apply_ace_hgat(self, features, attn_weights, encoder="img"):
            return super().apply_ace_hgat(features, attn_weights, encoder)

        def forward(self, clip_model, images, texts, merged_df=None, indices=None):
            loss = super().forward(clip_model, images, texts, merged_df, indices)
            return loss * 2 if self.args.apply_gnn_encoders == "text" else loss

    with ace_kernels.patch(TextModeDiffers(20, topk=3)) as handle:
        assert {r.name: r.status for r in handle.records} == {"apply_ace_hgat": "patched", "forward": "skipped"}
        assert "apply_gnn_encoders='text'" in handle.records[-1].reason

    # The probes leave the module's args and the random stream alone, also when the probed
    # forward draws random numbers (a look-alike with dropout in its loss, skipped).
    reference = ReferenceACELoss(20, topk=3, apply_gnn_encoders="vision")
    state = torch.get_rng_state()
    with ace_kernels.patch(reference) as handle:
        assert {r.name: r.status for r in handle.records} == {"apply_ace_hgat": "patched", "forward": "patched"}
    assert reference.args.apply_gnn_encoders == "vision"
    assert torch.equal(torch.get_rng_state(), state)

    class DropoutInLoss(ReferenceCLIPLoss):
        def forward(self, image_features, text_features, merged_df=None, indices=None):
            return super().forward(F.dropout(image_features, 0.5), text_features, merged_df, indices)

    state = torch.get_rng_state()
    with ace_kernels.patch(DropoutInLoss()) as handle:
        assert [r.status for r in handle.records] == ["skipped"]
    assert torch.equal(torch.get_rng_state(), state)

    # A module the probe cannot run (read-only args, a multiplier that is not a number) is
    # skipped with the reason; patch() itself does not fail.
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class FrozenArgs:
        topk: int = 3
        apply_gnn_encoders: str = "both"

    frozen = ReferenceACELoss(20, topk=3)
    frozen.args = FrozenArgs()
    with ace_kernels.patch(frozen) as handle:
        record = next(r for r in handle.records if r.name == "forward")
        assert record.status == "skipped" and "FrozenInstanceError" in record.reason, str(handle)

    class NoScale(ReferenceCLIPLoss):
        def __init__(self):
            super().__init__()
            del self.logit_scale
            self.logit_scale = None

        def forward(self, image_features, text_features, merged_df=None, indices=None):
            return _label_guided_loss(10.0 * image_features @ text_features.t(), merged_df, indices)

    from reference_modules import _label_guided_loss_dense as _label_guided_loss

    with ace_kernels.patch(NoScale()) as handle:
        (record,) = handle.records
        assert record.status == "skipped" and "the fused loss on its operands" in record.reason, str(handle)


def test_a_reference_layer_keeps_the_gradient_of_a_weight_it_is_given():
    """The reference layer's weight is used detached only when it is what the reference's merge
    path leaves (an instance attribute attached to an old graph). A weight passed through
    torch.func.functional_call gets its gradient as unpatched; a parametrized weight falls back
    (the original forward computes it)."""
    from torch.func import functional_call
    from torch.nn.utils import parametrize

    torch.manual_seed(5)
    layer = _randomise_lora(ReferenceLoRALinear(6, 5, r=2).double())
    unpatched = copy.deepcopy(layer)
    x = torch.randn(3, 6, dtype=torch.float64)

    def grads(module):
        params = {name: p.detach().clone().requires_grad_() for name, p in module.named_parameters()}
        out = functional_call(module, params, (x,))
        return [out, *torch.autograd.grad(out.square().sum(), list(params.values()))]

    want = grads(unpatched)
    with ace_kernels.patch(layer) as handle:
        got = grads(layer)
        assert handle.stats() == {"lora_linear": 1}
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, **FP64_TOL)

    class Double(nn.Module):
        def forward(self, weight):
            return 2 * weight

    parametrized = _randomise_lora(ReferenceLoRALinear(6, 5, r=2).double())
    parametrized.weight.requires_grad_(True)
    parametrize.register_parametrization(parametrized, "weight", Double())
    reference = copy.deepcopy(parametrized)
    reference(x).square().sum().backward()
    with ace_kernels.patch(parametrized) as handle:
        parametrized(x).square().sum().backward()
        assert handle.stats() == {"fallback reference-lora-linear: parametrized tensors": 1}
    torch.testing.assert_close(parametrized.parametrizations.weight.original.grad,
                               reference.parametrizations.weight.original.grad, **FP64_TOL)

    # weight_norm's pre-hook sets a recomputed weight on the instance, attached to weight_g and
    # weight_v, as the reference's merge path leaves its weight: the layer falls back, and the
    # gradients reach weight_g and weight_v.
    def weight_normed():
        torch.manual_seed(8)  # the same layer twice (a weight_norm module cannot be deep-copied)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
            return torch.nn.utils.weight_norm(_randomise_lora(ReferenceLoRALinear(6, 5, r=2).double()))

    normed, reference = weight_normed(), weight_normed()
    reference(x).square().sum().backward()
    with ace_kernels.patch(normed) as handle:
        normed(x).square().sum().backward()
        assert handle.stats() == {
            "fallback reference-lora-linear: weight recomputed by a forward pre-hook (weight_norm, spectral_norm?)": 1}
    for name in ("weight_g", "weight_v"):
        torch.testing.assert_close(getattr(normed, name).grad, getattr(reference, name).grad, **FP64_TOL)


def test_a_reference_layer_weight_computed_from_a_trainable_tensor_keeps_its_gradient():
    """A weight set on the instance from another trainable tensor (tied to a shared, trained matrix) is
    attached to a graph as the reference's merge-path leftover is, but reaches other leaves than the
    layer's A and B: the patched call used it detached, so the shared tensor silently got no gradient."""
    x = torch.randn(3, 6, dtype=torch.float64)

    def tied():
        torch.manual_seed(9)
        shared = nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
        layer = _randomise_lora(ReferenceLoRALinear(6, 5, r=2).double())
        del layer.weight
        layer.weight = shared.t()  # a view of the shared matrix, differentiable
        return shared, layer

    shared, layer = tied()
    torch.manual_seed(3)
    layer(x).square().sum().backward()
    want = shared.grad
    shared, layer = tied()
    with ace_kernels.patch(layer) as handle:
        torch.manual_seed(3)
        out = layer(x)
        assert handle.stats() == {"lora_linear": 1}
    out.square().sum().backward()
    assert shared.grad is not None and want.abs().max() > 1e-3
    torch.testing.assert_close(shared.grad, want, **FP64_TOL)


def test_reference_layers_sharded_by_fully_shard_are_skipped_with_the_reason(tmp_path):
    """patch() after FSDP2's fully_shard (one gloo rank): the reference layout's probe copied the DTensor
    shards and patch() itself raised "aten.copy_.default got mixed torch.Tensor and DTensor". The layers
    are now skipped, saying to patch before sharding, and run as unpatched."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(4)
    attention = _randomise_lora(ReferenceAttention(16, 2, r=2).double()).train()
    plain = copy.deepcopy(attention)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        fully_shard(attention, mesh=init_device_mesh("cpu", (1,)))
        with ace_kernels.patch(attention) as handle:
            assert not handle.patched and len(handle.skipped) == 3, handle.summary()
            assert all("patch the model before sharding it" in r.reason for r in handle.skipped), handle.summary()
            torch.testing.assert_close(attention(x), plain(x), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_layers_called_by_keyword_and_broadcast_attention_rows_run_as_unpatched():
    """A LoRA layer whose forward names its input otherwise (nn.Linear's ``input``) and is
    called by keyword, alone or as a q/k/v member, falls back instead of failing; an
    ``attn_weights`` the reference broadcasts ([1, N-1], [N-1]) falls back instead of raising."""

    class InputNamed(ReferenceLoRALinear):
        def forward(self, input):
            return super().forward(input)

    torch.manual_seed(6)
    layer = _randomise_lora(InputNamed(6, 5, r=2).double())
    x = torch.randn(3, 6, dtype=torch.float64)
    want = layer(input=x)
    with ace_kernels.patch(layer) as handle:
        torch.testing.assert_close(layer(input=x), want, **FP64_TOL)
        torch.testing.assert_close(layer(x), want, **FP64_TOL)
        assert handle.stats() == {"fallback reference-lora-linear: input passed by keyword": 1, "lora_linear": 1}

    class KeywordAttention(ReferenceAttention):
        def __init__(self):
            super().__init__(16, 2, r=2)
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(self, name, _randomise_lora(InputNamed(16, 16, r=2)))

        def forward(self, x):
            return self.q_proj(input=x) + self.k_proj(x) * self.v_proj(x)

    attention = KeywordAttention().double()
    y = torch.randn(2, 5, 16, dtype=torch.float64)
    want = _forward_backward(attention, lambda m, a: m(a), (y,))
    with ace_kernels.patch(attention) as handle:
        got = _forward_backward(attention, lambda m, a: m(a), (y,))
        assert handle.stats()["fallback reference-lora-linear: input passed by keyword"] == 1
    _assert_same(want, got, FP64_TOL)

    _, loss_fn, _, _, _ = _reference_setup()
    # The reference broadcasts a [1, N-1] or [N-1] row over the batch; the last case has B = N - 1, where a
    # check of the batch size alone would take the 1-D row for [B, N-1] rows.
    for batch, shape in ((2, (1, 5)), (2, (5,)), (5, (5,))):
        features = torch.randn(batch, 6, 20, dtype=torch.float64)
        row = torch.rand(shape, dtype=torch.float64)
        want = loss_fn.apply_ace_hgat(features, row, encoder="img")
        with ace_kernels.patch(loss_fn) as handle:
            torch.testing.assert_close(loss_fn.apply_ace_hgat(features, row, encoder="img"), want, **FP64_TOL)
            assert handle.stats() == {"fallback apply_ace_hgat: attn_weights is not a [B, N-1] tensor": 1}


# ----------------------------------------------------------------------------------------
# Coverage gaps: the rarer branches of the swap, the per-call checks and the probes
# ----------------------------------------------------------------------------------------


def test_a_recogniser_may_swap_a_method_already_set_on_the_instance():
    """The one swap helper keeps an instance attribute it shadows: undo puts that back, and a
    replacement someone wrapped after patching runs it once undone. A recogniser registered
    with ``first=True`` is tried before the built-in ones; anything else is refused."""
    from ace_kernels.patching import PatchRecord, Recogniser, _Replacement, recognisers, register_recogniser, \
        unregister_recogniser

    class Scale(nn.Module):
        def forward(self, x):
            return x * 2.0

    def install(name, module, handle, options):
        handle._swap(module, "forward", _Replacement(lambda m, x: x * 5.0, module), name)
        handle.records.append(PatchRecord(name, "scale", "patched", "-> x * 5"))

    with pytest.raises(ValueError, match="argument 'recogniser': expected a Recogniser, got str"):
        register_recogniser("scale")
    entry = Recogniser("scale", "lora", lambda m: isinstance(m, Scale), install)
    register_recogniser(entry, first=True)
    try:
        assert recognisers()[0] is entry
        x = torch.ones(2)
        module = Scale()
        own = lambda x: x * 3.0  # noqa: E731
        module.forward = own
        handle = ace_kernels.patch(module)
        assert repr(handle) == "<PatchHandle active: 1 patched, 0 skipped>"
        assert torch.equal(module(x), x * 5.0)
        handle.undo()
        assert repr(handle) == "<PatchHandle undone: 1 patched, 0 skipped>"
        assert module.__dict__["forward"] is own

        handle = ace_kernels.patch(module)
        replacement = module.forward
        module.forward = lambda x: replacement(x) + 1.0  # wrapped after patching
        with pytest.warns(RuntimeWarning, match="replaced again"):
            handle.undo()
        assert torch.equal(module(x), x * 3.0 + 1.0)  # the wrapped replacement runs the instance's own forward
    finally:
        unregister_recogniser(entry)


class _ExtraArgumentLoRA(ReferenceLoRALinear):
    def forward(self, x, gain=1.0):
        return gain * super().forward(x)


def _outcome(module, x, context=None):
    """``module(x)`` (in ``context``), or the exception it raised."""
    try:
        with context() if context is not None else contextlib.nullcontext():
            return module(x)
    except Exception as exc:  # noqa: BLE001 (compared with the patched call's)
        return exc


def _set_scaling_tensor(layer):
    layer.scaling = torch.tensor(0.5, dtype=torch.float64)


def _to_float8(layer):
    layer.to(torch.float8_e4m3fn)


def _cpu_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _float32_weight(layer):
    layer.weight = nn.Parameter(layer.weight.detach().float(), requires_grad=False)


# name: (change the layer, input, context, the fallback reason)
_OPERAND_CASES = {
    "integer-input": (None, lambda: torch.ones(3, 8, dtype=torch.long), None, "input is not a floating-point tensor"),
    "other-width": (None, lambda: torch.randn(3, 7, dtype=torch.float64), None,
                    "input shape does not match the weight"),
    "tensor-scaling": (_set_scaling_tensor, lambda: torch.randn(3, 8, dtype=torch.float64), None,
                       "scaling is a Tensor, not a number"),
    "meta-input": (None, lambda: torch.randn(3, 8, dtype=torch.float64, device="meta"), None,
                   "tensors on several devices ['cpu', 'meta']"),
    "float64-under-autocast": (None, lambda: torch.randn(3, 8, dtype=torch.float64), _cpu_autocast,
                               "float64 input under autocast"),
    # F.linear refuses a float32 weight beside a float64 input; the fused call would cast the weight and compute.
    "float32-weight": (_float32_weight, lambda: torch.randn(3, 8, dtype=torch.float64), None,
                       "input dtype torch.float64 differs from the weight's torch.float32"),
    "float8": (_to_float8, lambda: torch.randn(3, 8).to(torch.float8_e4m3fn), None,
               "compute dtype torch.float8_e4m3fn not supported"),
}


@pytest.mark.parametrize("case", list(_OPERAND_CASES))
def test_operands_the_fused_lora_call_cannot_take_run_the_original_forward(case):
    """An input the fused call cannot take (integers, another width, another device, float64
    under autocast, another dtype than the weight's, a float8 dtype) or a scaling that is a tensor:
    the reference layer runs its own forward, with its result or its error, and the handle counts why."""
    change, make_input, context, reason = _OPERAND_CASES[case]
    layer = _reference_single(0.0)
    if change is not None:
        change(layer)
    x = make_input()
    want = _outcome(layer, x, context)
    with ace_kernels.patch(layer) as handle:
        got = _outcome(layer, x, context)
        assert handle.stats() == {f"fallback reference-lora-linear: {reason}": 1}, handle.stats()
    if isinstance(want, Exception):
        assert type(got) is type(want) and str(got) == str(want), got
    elif want.is_meta:
        assert got.is_meta and got.shape == want.shape and got.dtype == want.dtype
    else:
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **FP64_TOL)


def test_extra_forward_arguments_of_a_reference_layer_run_its_own_forward():
    torch.manual_seed(7)
    layer = _randomise_lora(_ExtraArgumentLoRA(8, 8, r=2).double()).train()
    x = torch.randn(3, 8, dtype=torch.float64)
    want = layer(x, 2.0)
    with ace_kernels.patch(layer) as handle:
        assert [r.status for r in handle.records] == ["patched"]
        torch.testing.assert_close(layer(x, 2.0), want, **FP64_TOL)
        assert handle.stats() == {"fallback reference-lora-linear: extra forward arguments": 1}


def test_a_peft_lora_variant_other_than_dora_falls_back():
    """PEFT's LoRA variants besides DoRA are named in its lora_variant dict only (use_dora stays False): KaSA
    scales the rank-r intermediate by its lora_diag, which the fused call would drop. Such a layer is recorded
    as falling back and runs PEFT's forward, with its output and gradients."""
    kasa = getattr(pytest.importorskip("peft.tuners.lora.config"), "KasaConfig", None)
    if kasa is None:
        pytest.skip("this PEFT has no KaSA variant")
    torch.manual_seed(0)
    model = _randomise_lora(get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(
        r=2, target_modules=["0"], kasa_config=kasa())).double()).train()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    run = lambda m, a: m(a)  # noqa: E731
    before = _forward_backward(model, run, (x,))
    with ace_kernels.patch(model) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [("fallback", "a LoRA variant (DoRA or similar) "
                                                                              "is active")]
        after = _forward_backward(model, run, (x,))
        assert handle.stats() == {"fallback peft-lora-linear: a LoRA variant (DoRA or similar) is active": 1}
    _assert_same(before, after, dict(rtol=0, atol=0))


def test_an_extra_positional_argument_of_a_peft_layer_runs_its_own_forward():
    """PEFT's lora.Linear hands extra positional arguments on to its base layer: such a call runs PEFT's
    forward (here the base nn.Linear refusing the argument), never a fused call that would drop it."""
    layer = _peft_layer(_peft_single())
    x = torch.randn(3, 8, dtype=torch.float64)

    def call():
        try:
            return layer(x, 2.0)
        except TypeError as exc:
            return exc

    want = call()
    assert isinstance(want, TypeError)
    with ace_kernels.patch(layer) as handle:
        got = call()
        assert handle.stats() == {"fallback peft-lora-linear: extra forward arguments (positional)": 1}
    assert type(got) is TypeError and str(got) == str(want)


class _ThreeDOnlyLoRA(ReferenceLoRALinear):
    def forward(self, x):
        batch, tokens, width = x.shape  # a [3, in] probe cannot be unpacked
        return super().forward(x)


class _NoCopies:
    def __deepcopy__(self, memo):
        raise RuntimeError("no copies")


class _UncopyableLoRA(_NoCopies, ReferenceLoRALinear):
    pass


class _StaysMergedLoRA(ReferenceLoRALinear):
    def train(self, mode=True):  # never takes s B A back out of the weight
        return nn.Module.train(self, mode)


def _merged_without_unmerge():
    torch.manual_seed(0)
    layer = _randomise_lora(_StaysMergedLoRA(8, 8, r=2).double())
    layer.merged = True
    return layer


def _changed_reference(change):
    def build():
        layer = _reference_single(0.0)
        change(layer)
        return layer
    return build


def _three_d_weight(layer):
    layer.weight = nn.Parameter(layer.weight.detach()[..., None], requires_grad=False)


def _peft_fan_in_fan_out():
    model = _peft_single()
    _peft_layer(model).fan_in_fan_out = True
    return model


# name: (build, the record's status, its reason)
_REFERENCE_LAYER_RECORDS = {
    "fan_in_fan_out": (_changed_reference(lambda layer: setattr(layer, "fan_in_fan_out", True)), "skipped",
                       "fan_in_fan_out=True"),
    "peft-fan_in_fan_out": (_peft_fan_in_fan_out, "skipped", "fan_in_fan_out=True"),
    "r=0": (_changed_reference(lambda layer: setattr(layer, "r", 0)), "skipped", "r=0 (no LoRA branch)"),
    "3-D weight": (_changed_reference(_three_d_weight), "skipped", "weight is not a 2-D tensor"),
    "A of another rank": (_changed_reference(lambda layer: setattr(layer, "w_lora_A", nn.Parameter(torch.zeros(
        3, 8, dtype=torch.float64)))), "skipped",
        "w_lora_A [3, 8] / w_lora_B [8, 2] do not match weight [8, 8] and r=2"),
    "AlphaDropout": (_changed_reference(lambda layer: setattr(layer, "dropout", nn.AlphaDropout(0.1))), "skipped",
                     "dropout is AlphaDropout"),
    # A subclass of nn.Dropout may compute otherwise; the probe, with dropout off, would not see it.
    "nn.Dropout subclass": (_changed_reference(lambda layer: setattr(layer, "dropout", _HalvingDropout(0.1))),
                            "skipped", "dropout is _HalvingDropout"),
    "no bias": (lambda: _randomise_lora(ReferenceLoRALinear(8, 8, r=2, bias=False).double()), "patched",
                "-> lora_linear"),
    "forward fails on the probe": (lambda: _ThreeDOnlyLoRA(8, 8, r=2).double(), "skipped",
                                   "its forward fails on a [3, 8] probe (ValueError: not enough values to unpack "
                                   "(expected 3, got 2))"),
    "cannot be copied": (lambda: _UncopyableLoRA(8, 8, r=2).double(), "skipped",
                         "its forward could not be checked on a copy (RuntimeError: no copies)"),
    "merged, and train() does not unmerge": (_merged_without_unmerge, "fallback",
                                             "merged (eval mode folds B A into the weight)"),
}


@pytest.mark.parametrize("case", list(_REFERENCE_LAYER_RECORDS))
def test_lora_layers_patch_time_checks_record_why(case):
    """What the patch-time checks of a LoRA layer find, in its record: a layout the fused op
    does not compute (fan_in_fan_out, no LoRA branch, a weight or A/B of other shapes, another
    dropout), a forward the probe cannot run or a layer it cannot copy (skipped); a reference
    layer without bias (patched: its missing bias does not upset the probe's copy); a merged
    layer whose train() cannot unmerge the probe's copy (patched, falling back while merged)."""
    build, status, reason = _REFERENCE_LAYER_RECORDS[case]
    layer = build()
    x = torch.randn(3, 8, dtype=torch.float64)
    want = layer(x) if status != "skipped" else None
    with ace_kernels.patch(layer) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [(status, reason)], str(handle)
        if want is not None:
            torch.testing.assert_close(layer(x), want, **FP64_TOL)
            shown = "lora_linear" if status == "patched" else f"fallback reference-lora-linear: {reason}"
            assert handle.stats() == {shown: 1}, handle.stats()


def test_reference_members_changed_after_patching_run_ungrouped_exactly():
    """A q/k/v member that loses its bias, or gets A and B of another rank, after patching can no
    longer share one lora_qkv call: each member runs on its own, exactly."""
    def drop_key_bias(attention):
        attention.k_proj.bias = None

    def rank_3_value(attention):
        generator = torch.Generator().manual_seed(2)
        value = attention.v_proj
        value.w_lora_A = nn.Parameter(torch.randn(3, 16, generator=generator, dtype=torch.float64))
        value.w_lora_B = nn.Parameter(torch.randn(16, 3, generator=generator, dtype=torch.float64))
        value.r = 3

    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    run = lambda m, a: m(a)  # noqa: E731
    for change, reason in ((drop_key_bias, "some members have a bias and some do not"),
                           (rank_3_value, "members differ in shape or rank")):
        torch.manual_seed(12)
        attention = _randomise_lora(ReferenceAttention(16, 2, r=2).double()).train()
        with ace_kernels.patch(attention) as handle:
            assert [r.reason for r in handle.records] == ["-> lora_qkv"]
            change(attention)
            after = _forward_backward(attention, run, (x,))
            assert handle.stats() == {f"qkv ungrouped: {reason}": 3, "lora_linear": 3}, handle.stats()
        _assert_same(_forward_backward(attention, run, (x,)), after)


def test_bert_with_lora_on_query_and_value_only_patches_them_one_by_one():
    """An attention whose query/key/value are not three LoRA layers (LoRA on query and value, a
    common configuration) is no q/k/v group: the two LoRA layers are patched one by one."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = _randomise_lora(get_peft_model(BertModel(config, add_pooling_layer=False), LoraConfig(
        r=4, lora_alpha=1, target_modules=["query", "value"])).double()).train()
    embeds = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    before = _forward_backward(model, _run_bert, (embeds,))
    with ace_kernels.patch(model) as handle:
        assert [(r.name.rsplit(".", 1)[-1], r.kind, r.status) for r in handle.records] == [
            (name, "peft-lora-linear", "patched") for name in ("query", "value") * 2]
        after = _forward_backward(model, _run_bert, (embeds,))
        assert handle.stats() == {"lora_linear": 4}
    _assert_same(before, after)


class _Uncopyable(_NoCopies, nn.Module):
    pass


class _UncopyableAdapter(_NoCopies, Adapter):
    pass


class _MaskedAdapter(Adapter):
    def forward(self, z, mask):
        return super().forward(z) * mask


class _UncopyableLoss(_NoCopies, ReferenceACELoss):
    pass


class _CLSColumnHgat(ReferenceACELoss):
    def apply_ace_hgat(self, features, attn_weights, encoder="img"):
        if attn_weights.shape[1] != features.shape[1]:
            raise ValueError("expects attn_weights with the CLS column")
        return super().apply_ace_hgat(features, attn_weights[:, 1:], encoder)


class _RenamedArguments(ReferenceACELoss):
    apply_ace_hgat = ReferenceACELoss.apply_ace_hgat

    def forward(self, clip_model, images, texts, frame=None, rows=None):
        return super().forward(clip_model, images, texts, frame, rows)


class _BuiltinForward(ReferenceACELoss):
    apply_ace_hgat = ReferenceACELoss.apply_ace_hgat
    forward = torch.add  # no signature inspect can read


def _ace_loss(change=None, cls=ReferenceACELoss):
    def build():
        torch.manual_seed(0)
        loss_fn = cls(20, topk=3).double()
        if change is not None:
            change(loss_fn)
        return loss_fn
    return build


def _set_adapter(name, make):
    return lambda loss_fn: setattr(loss_fn, name, make())


def _short_down(loss_fn):
    loss_fn.img_edge_adapter.down = nn.Linear(20, 6).double()


def _meta_logit_scale(loss_fn):
    loss_fn.logit_scale = nn.Parameter(torch.empty((), device="meta"))


def _wrapped_forward(loss_fn):
    inner = loss_fn.forward
    loss_fn.forward = lambda *args: inner(*args)


def _patched_twice():
    loss_fn = _ace_loss()()
    ace_kernels.patch(loss_fn)
    return loss_fn


_UNPROBED = "its forward could not be checked"
# name: (build, {record name: (status, reason; a reason ending in "..." is the start of one that
# quotes torch's own error message)})
_ACE_LOSS_RECORDS = {
    "adapter without down/up": (_ace_loss(_set_adapter("img_edge_adapter", lambda: nn.Sequential(nn.Linear(20, 20)))), {
        "apply_ace_hgat": ("skipped", "adapter without down/up nn.Linear layers"),
        "forward": ("skipped", f"{_UNPROBED} (AttributeError: 'Sequential' object has no attribute 'down')")}),
    "adapter shapes do not chain": (_ace_loss(_short_down), {
        "apply_ace_hgat": ("skipped", "adapter down/up shapes do not chain back to the input width"),
        "forward": ("skipped", "its forward fails on a probe, or the fused forward on its operands (RuntimeError: "
                               "...")}),
    "adapter cannot be copied": (_ace_loss(_set_adapter("text_node_adapter", lambda: _UncopyableAdapter(20, 8))), {
        "apply_ace_hgat": ("skipped", "adapter forward could not be checked on a copy (RuntimeError: no copies)"),
        "forward": ("skipped", f"{_UNPROBED} on a copy (RuntimeError: no copies)")}),
    "adapter takes a mask": (_ace_loss(_set_adapter("img_node_adapter", lambda: _MaskedAdapter(20, 8).double())), {
        "apply_ace_hgat": ("skipped", "adapter forward fails on a [3, 20] probe (TypeError)"),
        "forward": ("skipped", "its forward fails on a probe, or the fused forward on its operands (TypeError: "
                               "_MaskedAdapter.forward() missing 1 required positional argument: 'mask')")}),
    "logit_scale on meta": (_ace_loss(_meta_logit_scale), {
        "apply_ace_hgat": ("skipped", "on the meta device: apply_ace_hgat cannot be checked (patch it once it has "
                                      "weights)"),
        "forward": ("skipped", "on the meta device: its forward cannot be checked (patch it once it has weights)")}),
    "module cannot be copied": (_ace_loss(cls=_UncopyableLoss), {
        "apply_ace_hgat": ("skipped", "apply_ace_hgat could not be checked on a copy (RuntimeError: no copies)"),
        "forward": ("skipped", f"{_UNPROBED} on a copy (RuntimeError: no copies)")}),
    "apply_ace_hgat fails on the probe": (_ace_loss(cls=_CLSColumnHgat), {
        "apply_ace_hgat": ("skipped", "apply_ace_hgat fails on a [2, 6, D] probe (ValueError: expects attn_weights "
                                      "with the CLS column)"),
        "forward": ("skipped", "its forward fails on a probe, or the fused forward on its operands (ValueError: "
                               "expects attn_weights with the CLS column)")}),
    "an extra child is shared by the probe": (_ace_loss(lambda m: setattr(m, "monitor", _Uncopyable())), {
        "apply_ace_hgat": ("patched", "-> ace_hypergraph"),
        "forward": ("skipped", f"{_UNPROBED} on a copy (RuntimeError: no copies)")}),
    "forward arguments renamed": (_ace_loss(cls=_RenamedArguments), {
        "apply_ace_hgat": ("patched", "-> ace_hypergraph"),
        "forward": ("skipped", "forward signature is not the reference's (clip_model, images, texts, "
                               "merged_df=None, indices=None)")}),
    "forward without a signature": (_ace_loss(cls=_BuiltinForward), {
        "apply_ace_hgat": ("patched", "-> ace_hypergraph"),
        "forward": ("skipped", "forward signature is not the reference's (clip_model, images, texts, "
                               "merged_df=None, indices=None)")}),
    "forward wrapped": (_ace_loss(_wrapped_forward), {
        "apply_ace_hgat": ("patched", "-> ace_hypergraph"),
        "forward": ("skipped", "forward replaced on the instance (a wrapper, e.g. accelerate's hooks): left as it "
                               "runs")}),
    "patched by another handle": (_patched_twice, {
        "apply_ace_hgat": ("skipped", "already patched by another handle"),
        "forward": ("skipped", "already patched by another handle")}),
}


@pytest.mark.parametrize("case", list(_ACE_LOSS_RECORDS))
def test_reference_ace_loss_patch_time_checks_record_why(case):
    """What patch() finds on a reference ACE loss module, per record: adapters that are not
    up(leaky_relu(down(z), 0.2)) by their structure or their probe, modules the probes cannot copy
    or run (skipped with the exception), an extra child the hypergraph probe shares rather than
    copies, forwards whose signature is not the reference's (or cannot be read), a wrapped forward,
    and a module another handle patched."""
    build, expected = _ACE_LOSS_RECORDS[case]
    loss_fn = build()
    with ace_kernels.patch(loss_fn) as handle:
        got = {r.name: (r.status, r.reason) for r in handle.records}
    assert got.keys() == expected.keys(), got
    for name, (status, reason) in expected.items():
        if reason.endswith("..."):
            assert got[name][0] == status and got[name][1].startswith(reason[:-3]), got[name]
        else:
            assert got[name] == (status, reason), got[name]


def test_reference_ace_loss_calls_the_fused_path_does_not_take_run_the_original():
    """apply_ace_hgat on features that are not [B, N, D] raises the original's error; a loss
    module whose apply_gnn_encoders is none of vision/text/both runs its own forward."""
    clip, loss_fn, images, texts, frame = _reference_setup(mode="neither")
    flat = torch.randn(9, 20, dtype=torch.float64)
    attn = torch.rand(9, 8, dtype=torch.float64)
    want_error = _outcome(lambda f: loss_fn.apply_ace_hgat(f, attn, encoder="img"), flat)
    model = _Pair([clip, loss_fn]).train()
    run = lambda m, *a: _run_loss(m, *a)  # noqa: E731
    before = _forward_backward(model, run, (images, texts, frame, [0, 1, 2, 3, 4]))
    with ace_kernels.patch(model, lora=False) as handle:
        # Every forward call falls back while apply_gnn_encoders is none of the three: recorded so.
        assert [(r.status, r.reason) for r in handle.records] == [
            ("patched", "-> ace_hypergraph"), ("fallback", "apply_gnn_encoders not vision/text/both")], str(handle)
        got_error = _outcome(lambda f: loss_fn.apply_ace_hgat(f, attn, encoder="img"), flat)
        after = _forward_backward(model, run, (images, texts, frame, [0, 1, 2, 3, 4]))
        assert handle.stats() == {"fallback apply_ace_hgat: features are not a [B, N, D] tensor": 1,
                                  "fallback reference-ace-loss: apply_gnn_encoders not vision/text/both": 1}, \
            handle.stats()
    assert isinstance(want_error, ValueError) and type(got_error) is type(want_error)
    assert str(got_error) == str(want_error)
    _assert_same(before, after)


class _BuiltinForwardCLIPLoss(ReferenceCLIPLoss):
    forward = torch.add  # no signature inspect can read


def test_reference_clip_loss_rare_states():
    """The plain reference loss: 3-D features run its own forward (and its error); a module on the
    meta device or patched by another handle is skipped with the reason; one whose forward has no
    readable signature is not taken for the reference's."""
    torch.manual_seed(2)
    loss_module = ReferenceCLIPLoss(logit_scale=12.0).double()
    image = torch.randn(2, 3, 8, dtype=torch.float64)
    want = _outcome(lambda f: loss_module(f, image), image)
    with ace_kernels.patch(loss_module) as handle:
        got = _outcome(lambda f: loss_module(f, image), image)
        assert handle.stats() == {"fallback reference-clip-loss: features are not [B, D]": 1}, handle.stats()
        with ace_kernels.patch(loss_module) as second:
            assert [(r.status, r.reason) for r in second.records] == [("skipped", "already patched by another handle")]
    assert isinstance(want, RuntimeError) and type(got) is type(want) and str(got) == str(want)
    with ace_kernels.patch(ReferenceCLIPLoss().to("meta")) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [
            ("skipped", "on the meta device: its forward cannot be checked (patch it once it has weights)")]
    with pytest.warns(UserWarning, match="nothing in this _BuiltinForwardCLIPLoss was recognised"):
        assert not ace_kernels.patch(_BuiltinForwardCLIPLoss()).records


def test_open_clip_clip_loss_rare_states():
    """open_clip's ClipLoss: horovod and a world size torch.distributed has not been initialised
    with are recorded as falling back, with the settings; 3-D features run open_clip's forward
    (and its error); a second handle skips the patched module."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    assert not torch.distributed.is_initialized()
    settings = "world_size=2, local_loss=False, gather_with_grad=False"
    for kwargs, reason in (({"use_horovod": True}, "horovod is not supported"),
                           ({}, "torch.distributed is not initialised")):
        with ace_kernels.patch(open_clip_loss.ClipLoss(rank=0, world_size=2, **kwargs)) as handle:
            assert [(r.status, r.reason) for r in handle.records] == [("fallback", f"{settings}: {reason}")]
    loss_module = open_clip_loss.ClipLoss()
    features = torch.randn(1, 4, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # open_clip's x.T on a 3-D tensor
        want = _outcome(lambda f: loss_module(f, f, 2.0), features)
        with ace_kernels.patch(loss_module) as handle:
            got = _outcome(lambda f: loss_module(f, f, 2.0), features)
            assert handle.stats() == {"fallback open_clip-ClipLoss: features are not [B, D]": 1}, handle.stats()
            with ace_kernels.patch(loss_module) as second:
                assert [(r.status, r.reason) for r in second.records] == [
                    ("skipped", "already patched by another handle")]
    assert isinstance(want, RuntimeError) and type(got) is type(want) and str(got) == str(want)


def test_open_clip_clip_loss_of_another_rank_than_torch_distributeds_falls_back(monkeypatch):
    """A ClipLoss whose rank is not torch.distributed's (its world size the same) is recorded as falling back,
    naming both (open_clip places the local rows by its own rank, the fused loss by the process group's).
    torch.distributed is stubbed: no process group is started."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    for rank, status, reason in ((0, "patched", "-> label_guided_infonce"),
                                 (1, "fallback", "world_size=2, local_loss=False, gather_with_grad=False: rank/world "
                                                 "size differ from torch.distributed's (0/2)")):
        with ace_kernels.patch(open_clip_loss.ClipLoss(rank=rank, world_size=2)) as handle:
            assert [(r.status, r.reason) for r in handle.records] == [(status, reason)]


# ----------------------------------------------------------------------------------------
# Audit fixes: adapters hooked or wrapped on the instance; what the summary says
# ----------------------------------------------------------------------------------------


def _wrap_adapter_forward(adapter, calls):
    """A forward set on the adapter's instance (as accelerate's hooks do) that computes what its class's does."""
    def forward(z):
        calls.append(z.dtype)
        return type(adapter).forward(adapter, z)
    adapter.forward = forward


def test_a_wrapped_adapter_forward_is_left_out_of_the_probes_and_run_at_each_call():
    """An adapter whose forward is set on the instance: the patch-time probes copy the loss module and run the
    class's methods, and the copy shared the wrapper, which ran on the float64 adapter with the probe's float32
    input, so apply_ace_hgat and the loss were skipped as failing on a probe. The copies now leave the instance
    forward out (as they leave hooks out); apply_ace_hgat is recorded as falling back, and its calls run the
    wrapper (the original) while it is there and the fused op once it is removed."""
    _, loss_fn, _, _, _ = _reference_setup()
    calls = []
    _wrap_adapter_forward(loss_fn.img_edge_adapter, calls)
    features = F.normalize(torch.randn(3, 9, 20, dtype=torch.float64), dim=-1).requires_grad_()
    cls_attn = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    run = lambda m, f, c: m.apply_ace_hgat(f, c, encoder="img")  # noqa: E731
    want = _forward_backward(loss_fn, run, (features, cls_attn))
    with ace_kernels.patch(loss_fn) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [
            ("fallback", "img calls: a forward replaced on the instance in the adapters"),
            ("patched", "-> CLS-only ace_hypergraph + label_guided_infonce")], str(handle)
        calls.clear()
        _assert_same(want, _forward_backward(loss_fn, run, (features, cls_attn)), dict(rtol=0, atol=0))
        assert calls == [torch.float64]  # the user's forward ran
        del loss_fn.img_edge_adapter.forward
        _assert_same(want, _forward_backward(loss_fn, run, (features, cls_attn)))
        assert handle.stats() == {"fallback apply_ace_hgat: a forward replaced on the instance in the adapters": 1,
                                  "ace_hypergraph": 1}, handle.stats()


@pytest.mark.parametrize("encoder", ["img", "text"])
def test_apply_ace_hgat_with_hooked_adapters_at_patch_time_is_recorded_as_falling_back(encoder):
    """apply_ace_hgat was recorded (and summarised) as patched -> ace_hypergraph while a hook on an adapter made
    every call of that encoder run the original: it is now recorded as falling back, naming the encoder and the
    reason, and the calls go as recorded (the original while the hook is there, the fused op once removed)."""
    _, loss_fn, _, _, _ = _reference_setup()
    hook = getattr(loss_fn, f"{encoder}_node_adapter").act.register_forward_pre_hook(lambda module, args: None)
    features = F.normalize(torch.randn(2, 9, 20, dtype=torch.float64), dim=-1)
    attn = torch.rand(2, 8, dtype=torch.float64)
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        assert [(r.name, r.status, r.reason) for r in handle.records] == [
            ("apply_ace_hgat", "fallback", f"{encoder} calls: hooks on the adapters")], str(handle)
        assert "0 patched, 1 patched but currently falling back" in handle.summary()
        loss_fn.apply_ace_hgat(features, attn, encoder=encoder)
        hook.remove()
        loss_fn.apply_ace_hgat(features, attn, encoder=encoder)
        assert handle.stats() == {"fallback apply_ace_hgat: hooks on the adapters": 1, "ace_hypergraph": 1}
    with ace_kernels.patch(loss_fn, loss=False) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [("patched", "-> ace_hypergraph")], str(handle)


def _wrap_peft_base(model):
    base = _peft_layer(model).base_layer
    base.forward = lambda x: nn.Linear.forward(base, x)


def _parametrize_reference(layer):
    from torch.nn.utils import parametrize

    class Halve(nn.Module):
        def forward(self, weight):
            return 0.5 * weight

    parametrize.register_parametrization(layer, "weight", Halve())


@pytest.mark.parametrize("case", [
    (_peft_single, _hook_peft_lora_a, "hooks on the base or LoRA sub-layers"),
    (_peft_single, _wrap_peft_base, "forward replaced on the base or LoRA sub-layers"),
    (_peft_single, _parametrize_peft_base, "parametrized base weight"),
    (lambda: _reference_single(0.1), _hook_reference_dropout,
     "hooks (or a replaced forward) that the dropout sub-layer's call would run"),
    (lambda: _reference_single(0.1), _parametrize_reference, "parametrized tensors"),
], ids=["peft-hooked-lora_A", "peft-wrapped-base", "peft-parametrized-base", "reference-hooked-dropout",
        "reference-parametrized"])
def test_lora_layers_whose_calls_all_fall_back_are_recorded_so(case):
    """A LoRA layer whose sub-layers had hooks or a wrapped forward, or whose weight was parametrized, when it was
    patched was recorded (and summarised) as patched -> lora_linear while every call ran its original forward;
    it is now recorded as falling back with the reason its calls give, and the calls do as recorded."""
    build, change, reason = case
    model = build()
    change(model)
    with ace_kernels.patch(model) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [("fallback", reason)], str(handle)
        model(torch.randn(3, 8, dtype=torch.float64))
        assert handle.stats() == {f"fallback {handle.records[0].kind}: {reason}": 1}, handle.stats()


@pytest.mark.parametrize("member", ["query", "value"])
def test_a_qkv_group_with_a_hooked_sub_layer_is_recorded_as_falling_back(member):
    """Whichever member's sub-layer is hooked (not only the first one's), the group's record says it falls back,
    naming that member, and its calls compute what the unpatched model does."""
    model = _bert()
    getattr(model.base_model.model.encoder.layer[0].attention.self, member).lora_A["default"].register_forward_hook(
        lambda module, args, out: out * 3.0)
    embeds = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    before = _forward_backward(model, _run_bert, (embeds,))
    with ace_kernels.patch(model) as handle:
        assert [(r.status, r.reason) for r in handle.records] == [
            ("fallback", f"{member}: hooks on the base or LoRA sub-layers"), ("patched", "-> lora_qkv")], str(handle)
        after = _forward_backward(model, _run_bert, (embeds,))
    _assert_same(before, after)
