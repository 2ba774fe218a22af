"""ACELoRA: structure, parameter count, and equivalence with the reference-style model.

The equivalence tests build the tiny config in float64 with the torch backend and
compare ACELoRA (fused q/k/v LoRA op, SDPA, CLS row without the N x N matrix,
ACE-HGNN op, InfoNCE op) against tests/reference_model.py (three LoRA linears with
the dense B A path, dense attention, dense HGNN, numpy-masked dense loss): the loss
and the gradient of every trainable parameter.
"""

from __future__ import annotations

import copy
import io
import math
import os
import re
import sys
import warnings

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import ace_kernels  # noqa: E402
import reference_model as ref  # noqa: E402
from _meta_init import materialise_like_fsdp  # noqa: E402
from _released import released_path  # noqa: E402
from _saved import saved_storage_bytes  # noqa: E402
from ace_model import ACELoRA  # noqa: E402
from ace_model.model import TEXT_ATTENTION, build_base_model, cls_attention_row, cls_probability_row  # noqa: E402

# float64 on both sides: the two computations differ only in summation order, so
# agreement to ~1e-10 relative is expected; 1e-9 leaves room for the softmax/LSE steps.
F64_RTOL = 1e-9


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(1234)
    return ACELoRA.from_config("tiny", backend="torch")


def _perturbed_fp64(model):
    """Copy in float64 with non-zero B, so every LoRA path carries signal."""
    model = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for lora in list(model.image_lora) + list(model.text_lora):
            lora.lora_b.copy_(torch.randn(lora.lora_b.shape, generator=gen, dtype=torch.float64) * 0.5)
    return model


def _batch(model, batch=5):
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(batch, 3, model.image_size, model.image_size, generator=gen, dtype=torch.float64)
    texts = ["Findings suggesting edema.", "There is effusion.", "edema",
             "a chest x-ray image of cardiomegaly with a small left pleural effusion.", "no finding"][:batch]
    token_ids = model.tokenizer()(texts)
    # Rows 0 and 2 share a label vector (masked as negatives of each other); row 4 is all zero.
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.float32)[:batch]
    return images, token_ids, labels


def _compare(model, reference, loss, ref_loss):
    assert torch.allclose(loss, ref_loss, rtol=F64_RTOL, atol=0), (loss.item(), ref_loss.item())
    ours = dict(model.named_trainable_parameters())
    theirs = dict(reference.named_trainable_parameters())
    assert ours.keys() == theirs.keys()
    for name, param in ours.items():
        expected = theirs[name].grad
        assert param.grad is not None and expected is not None, name
        scale = expected.abs().max().item()
        assert scale > 0 or name.endswith("lora_a"), f"{name}: reference gradient is zero, test is vacuous"
        error = (param.grad - expected).abs().max().item()
        assert error <= F64_RTOL * max(scale, 1e-12) + 1e-14, f"{name}: max error {error:.3e} vs scale {scale:.3e}"


def _check_against_reference(model, batch=5, labelled=True):
    """The loss and every trainable gradient of `model` (in eval mode) against the reference's, on a copy."""
    reference = copy.deepcopy(model)
    images, token_ids, labels = _batch(model, batch=batch)
    labels = labels if labelled else None
    loss = model.loss(images, token_ids, labels)
    loss.backward()
    ref_loss = ref.reference_loss(reference, images, token_ids, labels)
    ref_loss.backward()
    _compare(model, reference, loss, ref_loss)


def test_equivalence_eval_mode(tiny_model):
    _check_against_reference(_perturbed_fp64(tiny_model).eval())


def test_equivalence_plain_clip_loss_without_labels(tiny_model):
    _check_against_reference(_perturbed_fp64(tiny_model).eval(), batch=3, labelled=False)


def test_equivalence_with_lora_dropout(tiny_model):
    """Train mode with the paper's LoRA dropout 0.1: the masks the fused op drew are
    captured and fed to the reference's merge-style dropout path."""
    from ace_kernels.lora import capture_dropout_masks

    model = _perturbed_fp64(tiny_model).train()
    # The frozen BERT's own dropouts are random too; switch them off so that only the
    # LoRA masks (captured) are random.
    model.text_hidden_dropout = 0.0
    model.text_attention_dropout = 0.0
    reference = copy.deepcopy(model)
    images, token_ids, labels = _batch(model)
    torch.manual_seed(11)
    with capture_dropout_masks() as masks:
        loss = model.loss(images, token_ids, labels)
    layers = len(model.image_lora) + len(model.text_lora)
    assert len(masks) == layers and all(m is not None for m in masks)
    drawn = torch.cat([m.flatten().double() for m in masks])
    dropped = 1.0 - drawn.mean().item()
    # p = 0.1 within 6 standard deviations of a binomial count (about 0.005 on ~10^5 elements)
    assert abs(dropped - 0.1) < 6 * math.sqrt(0.1 * 0.9 / drawn.numel()), (dropped, drawn.numel())
    assert not torch.equal(masks[0][0], masks[0][1]), "q and k must have independent masks"
    loss.backward()
    ref_loss = ref.reference_loss(reference, images, token_ids, labels, masks=masks)
    ref_loss.backward()
    _compare(model, reference, loss, ref_loss)


def test_a_multiplier_above_open_clips_clamp_is_used_as_it_is(tiny_model):
    """Spec section 1: the loss learns the multiplier itself, with no clamp (open_clip clamps at 100, and a
    multiplier trained from the base's 14.3 or the released 78.35 can pass it): at 150 the loss and every
    gradient, the multiplier's too (zero through a clamp), are the reference's."""
    model = _perturbed_fp64(tiny_model).eval()
    with torch.no_grad():
        model.logit_scale.fill_(150.0)
    _check_against_reference(model)
    assert model.logit_scale.grad.abs().item() > 0


def test_dropout_changes_the_loss_in_train_mode_only(tiny_model):
    model = _perturbed_fp64(tiny_model)
    # Only the LoRA dropout is left random (the frozen towers' own dropouts are off), so that a
    # LoRA dropout that did nothing in train mode would fail here.
    model.text_hidden_dropout = model.text_attention_dropout = 0.0
    for module in model.clip.visual.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    images, token_ids, labels = _batch(model, batch=3)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.loss(images, token_ids, labels), model.loss(images, token_ids, labels))
        model.train()
        torch.manual_seed(0)
        first = model.loss(images, token_ids, labels)
        second = model.loss(images, token_ids, labels)
        assert not torch.equal(first, second)
        for lora in list(model.image_lora) + list(model.text_lora):
            lora.dropout_p = 0.0
        assert torch.equal(model.loss(images, token_ids, labels), model.loss(images, token_ids, labels))


def test_encoders_name_bad_inputs(tiny_model):
    model = tiny_model
    size, length = model.image_size, model.context_length
    ids = model.tokenizer()(["edema"])
    for bad, expected in ((torch.zeros(2, 3, size + 8, size), rf"expected shape \[B, 3, {size}, {size}\] with B >= 1"),
                          (torch.zeros(2, 1, size, size), rf"expected shape \[B, 3, {size}, {size}\] .* got \[2, 1, "),
                          (torch.zeros(0, 3, size, size), r"expected shape .* with B >= 1, got \[0, "),
                          (torch.zeros(2, 3, size, size, dtype=torch.uint8), "expected preprocessed floating-point")):
        with pytest.raises(ValueError, match=rf"^argument 'images': {expected}"):
            model.encode_image(bad)
    # The padding is part of the text embedding (spec section 3): another length is refused, not
    # encoded into another embedding.
    for bad in (torch.nn.functional.pad(ids, (0, 16)), ids[:, :8], ids[:0]):
        with pytest.raises(ValueError, match=rf"^argument 'token_ids': expected \[B, {length}\] with B >= 1 "):
            model.encode_text(bad)


def test_encoders_name_inputs_of_another_kind_device_or_dtype(tiny_model):
    # A non-tensor raised AttributeError ('NoneType' object has no attribute 'ndim'), a NumPy array of ids
    # was refused as "expected an integer tensor [B, L], got int64 [2, L]", images of another dtype or device
    # failed inside the patch embedding, and token ids on the meta device gave uninitialised CPU memory.
    model = tiny_model
    size, length = model.image_size, model.context_length
    images, ids = torch.zeros(2, 3, size, size), torch.ones(2, length, dtype=torch.long)
    for bad, expected in ((None, "expected a torch.Tensor, got NoneType"), (images.tolist(), "expected a torch.Tensor"),
                          (images.numpy(), "expected a torch.Tensor, got ndarray"),
                          (images.to_sparse(), "expected a dense"),
                          (images.to("meta"), r"expected a tensor on cpu \(the model's device\), got meta"),
                          (images.double(), r"expected dtype float32 \(the dtype of the model's weights; or run under "
                                            r"torch.autocast\), got float64"),
                          (images.half(), "expected dtype float32 .* got float16")):
        with pytest.raises(ValueError, match=rf"^argument 'images': {expected}"):
            model.encode_image(bad)
    for bad, expected in ((None, "expected a torch.Tensor, got NoneType"), (ids.numpy(), "expected a torch.Tensor"),
                          (ids.to_sparse(), "expected a dense"),
                          (ids.to("meta"), r"expected a tensor on cpu \(the model's device\), got meta")):
        with pytest.raises(ValueError, match=rf"^argument 'token_ids': {expected}"):
            model.encode_text(bad)
    with pytest.raises(ValueError, match="^argument 'images': expected a torch.Tensor, got NoneType"):
        model.loss(None, ids)
    # all_tokens was taken for its truth (the string "False" gave every token), before the encoder ran.
    for encode, inputs in ((model.encode_image, images), (model.encode_text, ids)):
        for bad, kind in (("False", "str"), (None, "NoneType"), (1, "int")):
            with pytest.raises(ValueError, match=rf"^argument 'all_tokens': expected a bool, got {kind}$"):
                encode(inputs, all_tokens=bad)
    with pytest.raises(ValueError, match="^argument 'token_ids': expected a torch.Tensor, got list"):
        model.loss(images, ids.tolist())
    # Under autocast the convolution casts float32 images itself (what cast_frozen_weights relies on).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.encode_image(images).shape == (2, model.embed_dim)
    # A model on the meta device: the dtype check reads no autocast state there (torch raises for "meta").
    with pytest.raises(ValueError, match="^argument 'images': expected dtype float32 .* got float64$"):
        copy.deepcopy(model).to("meta").encode_image(images.to("meta", torch.float64))


def test_cast_frozen_weights_runs_under_autocast_only():
    torch.manual_seed(0)
    model = ACELoRA.from_config("tiny", backend="torch").eval()
    images, token_ids, _ = _batch(model, batch=2)
    images = images.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model.encode_image(images), model.encode_text(token_ids)
    model.cast_frozen_weights(torch.bfloat16)
    assert model.frozen_weights_dtype == torch.bfloat16
    for encode, inputs in ((model.encode_image, images), (model.encode_text, token_ids)):
        with pytest.raises(RuntimeError, match=r"stored in torch.bfloat16 \(cast_frozen_weights\), so the model runs "
                                               r"only under torch.autocast\('cpu', dtype=torch.bfloat16\)"):
            encode(inputs)
        # An autocast of the other 16-bit dtype would round the bf16 weights to float16 at every use.
        with torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError, match=r"stored in torch.bfloat16"):
            encode(inputs)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.encode_image(images), model.encode_text(token_ids)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # the same bits, as the docstring says
    model.float()  # undone: the model runs without autocast again
    assert model.frozen_weights_dtype is None
    with torch.no_grad():
        model.encode_image(images)


def test_cls_attention_row_matches_dense_scores():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 9, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(3, 4, 9, 16, generator=gen, dtype=torch.float64)
    dense = (q @ k.transpose(-2, -1) / math.sqrt(16)).mean(dim=1)[:, 0, 1:]
    assert torch.allclose(cls_attention_row(q, k), dense, rtol=1e-12, atol=1e-12)
    assert cls_attention_row(q, k).dtype == torch.float64


def test_cls_rows_of_16_bit_q_and_k_are_float32_under_autocast_too():
    """The rows feed the hypergraph's top-k: from bf16 q and k (as under autocast) they are the
    float32 rows of those values, not bf16-rounded ones, and gradients reach q and k in bf16."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(5, 4, 33, 16, generator=gen).bfloat16().requires_grad_()
    k = torch.randn(5, 4, 33, 16, generator=gen).bfloat16().requires_grad_()
    dense = (q.double() @ k.double().transpose(-2, -1) / math.sqrt(16)).mean(dim=1)[:, 0, 1:]
    keep = torch.ones(5, 1, 1, 33, dtype=torch.bool)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            row = cls_attention_row(q, k)
            probs = cls_probability_row(q, k, keep)
        assert row.dtype == torch.float32 and probs.dtype == torch.float32
        # float32 sums of exact bf16 products: far closer than bf16's 2**-8 relative spacing
        torch.testing.assert_close(row.double(), dense, rtol=1e-5, atol=1e-5)
        (row.sum() + probs.sum()).backward()
        assert q.grad.dtype == torch.bfloat16 and k.grad.abs().sum() > 0
        q.grad = k.grad = None


def test_reference_code_text_attention_is_the_published_codes(tiny_model):
    """text_attention="reference-code": the text CLS row is what the published BertAttentionLoRA
    returns, checked against transformers' own BERT (eager attention, the LoRA products folded
    into its q/k/v weights): the head-averaged, padding-masked softmax probabilities of the last
    layer, row 0 without column 0. Its attention-probability and attention-output dropouts are off
    in training; the spec's model keeps them. The row carries gradients into the last layer's LoRA."""
    model = _perturbed_fp64(tiny_model)
    model.text_attention = "reference-code"
    model.eval()
    token_ids = model.tokenizer()(["a chest x-ray", "edema and effusion are seen in both lungs here"])
    with torch.no_grad():
        tokens, row = model.text_tokens(token_ids)
    bert = _eager_bert_with_lora_folded(model)
    with torch.no_grad():
        out = bert(input_ids=token_ids, attention_mask=(token_ids != model.pad_token_id).long(), output_attentions=True)
    want = out.attentions[-1].mean(dim=1)[:, 0, 1:]
    assert row.dtype == torch.float32  # computed in float32 whatever the tower's dtype
    assert torch.allclose(row.double(), want, rtol=0, atol=1e-6), (row - want).abs().max()
    assert torch.allclose(tokens, torch.nn.functional.normalize(model.clip.text.proj(out.last_hidden_state), dim=-1),
                          atol=1e-10)
    spec = copy.deepcopy(model)
    spec.text_attention = "spec"
    assert not torch.allclose(spec.text_tokens(token_ids)[1].double(), want, atol=1e-3)

    # Training: the draws the text tower makes. The published code keeps BERT's embedding and FFN
    # dropouts (one per layer) and drops nothing in its attention; the spec's BERT also drops the
    # attention probabilities (SDPA's dropout_p) and the attention output's dense layer.
    import torch.nn.functional as F

    # Each draw at its own probability: the hidden ones at hidden_dropout_prob, the attention ones at
    # attention_probs_dropout_prob (set apart here; the config has 0.1 for both).
    layers = len(model.text_lora)
    for variant, hidden_draws, attention_draws in (("reference-code", 1 + layers, 0), ("spec", 1 + 2 * layers, layers)):
        trained = copy.deepcopy(model)
        trained.text_attention = variant
        trained.text_hidden_dropout, trained.text_attention_dropout = 0.2, 0.3
        for lora in trained.text_lora:
            lora.dropout_p = 0.0  # the LoRA branch's own dropout is not BERT's
        drawn = {"hidden": 0, "attention": 0}
        dropout, sdpa = F.dropout, F.scaled_dot_product_attention

        def counting_dropout(x, p=0.5, training=True, inplace=False):
            assert p == 0.2 or not training, p
            drawn["hidden"] += int(training and p > 0)
            return dropout(x, p, training, inplace)

        def counting_sdpa(*args, dropout_p=0.0, **kwargs):
            assert dropout_p in (0.0, 0.3), dropout_p
            drawn["attention"] += int(dropout_p > 0)
            return sdpa(*args, dropout_p=dropout_p, **kwargs)

        trained.train()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(F, "dropout", counting_dropout)
            patch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
            trained.text_tokens(token_ids)
        assert drawn == {"hidden": hidden_draws, "attention": attention_draws}, (variant, drawn)
    trained = copy.deepcopy(model).train()
    trained.text_tokens(token_ids)[1].sum().backward()
    assert trained.text_lora[-1].lora_a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"argument 'text_attention': expected one of \('spec', 'reference-code'\)"):
        ACELoRA.from_config("tiny", text_attention="published")
    with pytest.raises(ValueError, match=r"argument 'text_attention': expected one of"):
        trained.text_attention = "reference_code"  # a misspelling would silently compute the spec's row


def test_backend_and_batch_mismatch_are_named_when_given(tiny_model):
    # Checked when set, not at the first forward; cuda is no backend of the LoRA ops.
    with pytest.raises(ValueError, match=r"argument 'backend': expected one of \('auto', 'triton', 'torch'\), "
                                         r"got 'Torch'$"):
        ACELoRA.from_config("tiny", backend="Torch")
    model = copy.deepcopy(tiny_model)
    before = model.backend
    with pytest.raises(ValueError, match=r"argument 'backend': expected one of \('auto', 'triton', 'torch'\), got "
                                         r"'cuda' \(lora_qkv, label_guided_infonce: no cuda backend\)$"):
        model.backend = "cuda"
    assert model.backend == before
    images = torch.randn(3, 3, model.image_size, model.image_size)
    token_ids = model.tokenizer()(["a", "b"])
    with pytest.raises(ValueError, match=r"argument 'token_ids': expected 3 rows, one per image of 'images', got 2"):
        model.loss(images, token_ids)
    with pytest.raises(ValueError, match=r"argument 'texts': expected a string or a non-empty sequence"):
        model.tokenizer()([])
    for kwargs, expected in (({"rank": 0}, r"argument 'rank': expected"),
                             ({"lora_dropout": 1.5}, r"argument 'lora_dropout': expected a float in \[0, 1\)"),
                             # These were named 'hidden' and 'name' (ACEHypergraph's and the config reader's).
                             ({"adapter_hidden": 0}, r"^argument 'adapter_hidden': expected an integer >= 1, got 0$"),
                             ({"adapter_hidden": 2.0}, r"^argument 'adapter_hidden': expected an integer >= 1"),
                             ({"config_name": "vit-huge"}, r"^argument 'config_name': expected one of \('biomedclip', "
                                                           r"'tiny'\), got 'vit-huge'$")):
        config_name = kwargs.pop("config_name", "tiny")
        with pytest.raises(ValueError, match=expected):
            ACELoRA(build_base_model("tiny"), config_name, **kwargs)
    # Not a base of build_base_model's layout: an AttributeError ('NoneType' object has no attribute 'parameters',
    # or "'ACELoRA' object has no attribute 'vision_trunk'" from the property's own failing lookup).
    for base, name in ((None, "NoneType"), (torch.nn.Linear(2, 2), "Linear")):
        with pytest.raises(ValueError, match=rf"^argument 'base': expected a CLIP base as build_base_model builds "
                                             rf"it .*, got {name}$"):
            ACELoRA(base, "tiny")


def test_the_hypergraph_modules_settings_are_what_runs(tiny_model):
    # The model calls its ACEHypergraph modules: their topk (shown in the model's repr) is the one used.
    model = copy.deepcopy(tiny_model).eval()
    tokens, cls_row = torch.randn(2, 9, model.embed_dim), torch.rand(2, 8)
    assert model.topk == model.image_hgnn.topk
    model.image_hgnn.topk = 2
    assert "topk=2" in repr(model.image_hgnn)
    # The released format records one k: a model whose two modules differ has none to save.
    with pytest.raises(ValueError, match=r"ACELoRA.topk: image_hgnn.topk=2 and text_hgnn.topk=5 differ"):
        model.save_reference_checkpoint(io.BytesIO())
    expected = torch.nn.functional.normalize(ace_kernels.ace_hypergraph(
        tokens, cls_row, model.image_hgnn.edge_adapter, model.image_hgnn.node_adapter, topk=2, cls_only=True,
        backend="torch"), dim=-1)
    model.backend = "torch"
    torch.testing.assert_close(model.image_head(tokens, cls_row), expected, rtol=0, atol=0)
    model.text_hgnn.topk = 2
    assert model.topk == 2


def test_cls_probability_row_matches_dense_fp64_forward_and_gradients():
    """The published code's text row (masked softmax probabilities, head mean, row 0 without column 0)
    against the dense N x N computation in float64, forward and both gradients, on odd sizes with a
    padded tail of different length per sample; and torch's gradcheck on the row itself."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 5, 11, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 5, 11, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(3, 11, dtype=torch.bool)
    keep[0, 6:], keep[1, 10:] = False, False  # sample 2 has no padding
    key_keep = keep[:, None, None, :]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(7)
    dense = scores.masked_fill(~key_keep, float("-inf")).softmax(dim=-1).mean(dim=1)[:, 0, 1:]
    got = cls_probability_row(q, k, key_keep)
    assert got.dtype == torch.float32  # float32 by design; compared at float32's precision
    assert torch.allclose(got.double(), dense, rtol=0, atol=1e-6)
    assert torch.all(got[0, 5:] == 0) and torch.all(got[1, 9:] == 0)  # padding gets nothing
    weight = torch.randn(dense.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad((dense * weight).sum(), (q, k))
    have = torch.autograd.grad((got.double() * weight).sum(), (q, k))
    for name, h, w in zip(("q", "k"), have, want, strict=True):
        assert torch.allclose(h, w, rtol=0, atol=1e-6 * w.abs().max()), name

    def row64(q, k):  # the same formula in float64, for gradcheck's finite differences
        s = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k) / math.sqrt(7)
        return s.masked_fill(~keep[:, None, :], float("-inf")).softmax(dim=-1).mean(dim=1)[:, 1:]

    assert torch.allclose(row64(q, k), dense, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(row64, (q.detach().requires_grad_(), k.detach().requires_grad_()))


def test_an_all_padding_text_row_stays_finite_with_the_published_codes_row(tiny_model):
    """A token row of padding only (pad id 0 throughout): every key is masked. The published code's
    BERT masks with a large finite negative, so its row is uniform (transformers' eager attention
    agrees); a -inf mask made it NaN, and with it the whole batch's loss and every gradient."""
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 3, 6, 4, generator=gen) for _ in range(2))
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[1] = False
    row = cls_probability_row(q, k, keep)
    assert torch.allclose(row[1], torch.full((5,), 1 / 6), rtol=1e-6, atol=0)
    keep[1, ..., :3] = True  # rows with a key kept: masked columns get exactly 0, as with -inf
    want = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k).div(2).masked_fill(~keep[:, 0], float("-inf"))
    assert torch.equal(cls_probability_row(q, k, keep), want.softmax(-1).mean(1)[:, 1:])
    model = copy.deepcopy(tiny_model).train()
    model.text_attention = "reference-code"
    token_ids = model.tokenizer()(["edema", "no finding"])
    token_ids[1] = model.pad_token_id
    loss = model.loss(torch.randn(2, 3, model.image_size, model.image_size), token_ids)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.trainable_parameters())


def _eager_bert_with_lora_folded(model):
    """A copy of the text tower's transformers BERT with each layer's q/k/v LoRA folded into its weights
    (W + s B A), run by transformers' eager attention: the towers' own forward, as an oracle."""
    bert = copy.deepcopy(model.text_transformer)
    for layer, lora in zip(bert.encoder.layer, model.text_lora, strict=True):
        attention = layer.attention.self
        for p, linear in enumerate((attention.query, attention.key, attention.value)):
            with torch.no_grad():
                linear.weight += lora.scaling * lora.lora_b[p] @ lora.lora_a[p]
    bert.config._attn_implementation = "eager"
    return bert


@pytest.mark.parametrize("text_attention", TEXT_ATTENTION)
def test_a_text_row_of_padding_only_attends_as_berts_own_forward(tiny_model, text_attention):
    """Token ids of padding only (pad id 0 throughout; the tokenizer never writes them, a caller's ids may):
    transformers' BERT, which the towers run (the published code's and open_clip's forward), masks with
    the dtype's lowest value, so every key of such a row weighs the same. SDPA's boolean mask gave the row
    a zero attention output instead: its tokens, hence its embedding, were another text's (in either
    text_attention, 0.016 off here). The other row is the same either way."""
    model = _perturbed_fp64(tiny_model).eval()
    model.text_attention = text_attention
    token_ids = model.tokenizer()(["edema", "effusion"])
    token_ids[1] = model.pad_token_id
    bert = _eager_bert_with_lora_folded(model)
    with torch.no_grad():
        tokens, _ = model.text_tokens(token_ids)
        out = bert(input_ids=token_ids, attention_mask=(token_ids != model.pad_token_id).long())
    want = torch.nn.functional.normalize(model.clip.text.proj(out.last_hidden_state), dim=-1)
    assert torch.allclose(tokens, want, rtol=0, atol=1e-10), (tokens - want).abs().amax(dim=(1, 2))


def test_the_padding_masked_is_the_text_configs_pad_token(tiny_model):
    """The padding the published code's row masks is the BERT config's pad_token_id (0 in both shipped configs):
    with 5 in the config, the keys of id 5 get probability 0 and every other key keeps its share."""
    base = copy.deepcopy(tiny_model.clip)
    base.text.transformer.config.pad_token_id = 5
    model = ACELoRA(base, "tiny", backend="torch", text_attention="reference-code").eval()
    assert model.pad_token_id == 5
    ids = model.tokenizer()(["edema"])
    length = int((ids != 0).sum())
    ids[ids == 0] = 5
    with torch.no_grad():
        _, row = model.text_tokens(ids)
    assert row[0, length - 1:].eq(0).all() and row[0, :length - 1].gt(0).all()


def test_the_tokenizer_refuses_what_is_not_a_string(tiny_model):
    # str() made a missing report (None, or pandas' NaN) the words "none" and "nan", a bytes text
    # its repr "b'...'", and a bytes object one row of digits per byte: each a wrong text, silently.
    tok = tiny_model.tokenizer()
    for bad, kind in (([None], "NoneType"), (["edema", float("nan")], "float"), ([b"edema"], "bytes"),
                      (b"edema", "bytes")):
        with pytest.raises(ValueError, match=rf"^argument 'texts': expected a string or a sequence of strings, "
                                             rf"got {kind}"):
            tok(bad)
    assert torch.equal(tok(("edema", "no finding")), tok(["edema", "no finding"]))
    assert torch.equal(tok("edema"), tok(["edema"]))
    assert torch.equal(tok(t for t in ("edema", "no finding")), tok(["edema", "no finding"]))


def test_the_tokenizer_pads_to_a_context_length_given_per_call_and_refuses_no_texts(tiny_model):
    tok = tiny_model.tokenizer()
    short = tok(["pleural effusion"], context_length=7)
    assert short.shape == (1, 7) and torch.equal(short[0, :3], tok(["pleural effusion"])[0, :3])
    assert tok(["pleural effusion"]).shape == (1, tiny_model.context_length)
    for empty in ([], ()):  # no rows: an empty batch the model would fail on later, far from its cause
        with pytest.raises(ValueError, match=r"^argument 'texts': expected a string or a non-empty sequence"):
            tok(empty)


def test_the_loss_runs_each_hypergraph_for_its_cls_output_only(tiny_model, monkeypatch):
    """Spec section 4: the loss needs only the CLS output, whose k+1-row shortcut is exact. An encoder that
    ran the full N-token hypergraph and took its row 0 gives the same loss, at O(N^2 D) work and memory per
    sample instead of O(k N D): only the calls tell the two apart."""
    model = copy.deepcopy(tiny_model).train()
    calls = []
    for name in ("image_hgnn", "text_hgnn"):
        module = getattr(model, name)

        def spy(*args, _real=module.forward, _name=name, **kwargs):
            calls.append((_name, kwargs.get("cls_only")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "forward", spy)
    images, token_ids, labels = _batch(model, batch=3)
    model.loss(images.float(), token_ids, labels).backward()
    assert calls == [("image_hgnn", True), ("text_hgnn", True)]


def test_only_adapters_lora_and_scale_train(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    images, token_ids, labels = _batch(model, batch=3)
    model.loss(images.float(), token_ids, labels).backward()
    for name, param in model.clip.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    names = [n for n, _ in model.named_trainable_parameters()]
    assert all(n == "logit_scale" or "_lora." in n or "_hgnn." in n for n in names), names
    for _, param in model.named_trainable_parameters():
        assert param.grad is not None


def test_lora_init_and_logit_multiplier(tiny_model):
    model = tiny_model
    for lora in list(model.image_lora) + list(model.text_lora):
        assert lora.scaling == 0.5 and lora.rank == 4 and lora.dropout_p == 0.1
        assert torch.count_nonzero(lora.lora_b) == 0
        bound = 1.0 / math.sqrt(lora.in_features)  # kaiming_uniform(a=sqrt(5)) on [r, in]
        assert lora.lora_a.abs().max() <= bound
        assert lora.lora_a.abs().max() > 0.5 * bound
        assert not torch.equal(lora.lora_a[0], lora.lora_a[1])
    assert torch.allclose(model.logit_scale, model.clip.logit_scale.exp())
    assert model.logit_scale.requires_grad and not model.clip.logit_scale.requires_grad


def test_the_rank_and_lora_dropout_given_reach_every_layer():
    model = ACELoRA(build_base_model("tiny", use_open_clip=False), "tiny", rank=2, lora_dropout=0.25)
    for lora in list(model.image_lora) + list(model.text_lora):
        assert lora.rank == 2 and lora.lora_a.shape[1] == 2 and lora.dropout_p == 0.25


def test_trainable_modules_materialised_from_meta_have_the_construction_init():
    """Deferred init: ACELoRA built on the meta device, its frozen base given its weights (a state
    dict), then its own modules materialised as FSDP1 does by default (to_empty, then
    reset_parameters on each module with parameters of its own). ACELoRA itself had no
    reset_parameters (AttributeError, and to_empty alone leaves the multiplier garbage) and the
    adapters came out kaiming-uniform. Now the LoRA factors and the multiplier are those of an eager
    build with the same seed, bit for bit, and the adapters kaiming-normal; the generator ends where
    construction leaves it. The direct build's base resets its own log scale too."""
    torch.manual_seed(0)
    base = build_base_model("tiny", use_open_clip=False)
    before = torch.get_rng_state()
    eager = ACELoRA(base, "tiny", backend="torch")
    after = torch.get_rng_state()
    with torch.device("meta"):
        model = ACELoRA(build_base_model("tiny", use_open_clip=False), "tiny", backend="torch")
    model.clip.to_empty(device="cpu")
    model.clip.load_state_dict(base.state_dict())
    torch.set_rng_state(before)
    called = materialise_like_fsdp(model, skip=[model.clip])
    assert called[:1 + len(model.image_lora) + len(model.text_lora)] == [model, *model.image_lora, *model.text_lora]
    assert torch.equal(torch.get_rng_state(), after)
    assert not any(p.is_meta for p in model.parameters())
    for name, param in eager.named_trainable_parameters():
        got = model.get_parameter(name)
        if "_hgnn." not in name:
            assert torch.equal(got, param), name
        elif name.endswith("weight"):  # kaiming_normal_ (nn.Linear's kaiming-uniform has a 2.4x smaller std)
            std = (2 / got.shape[1]) ** 0.5
            assert abs(got.std().item() - std) < 0.1 * std and abs(param.std().item() - std) < 0.1 * std, name
    # The multiplier of a model whose base had another scale (loaded weights) resets to that one's.
    with torch.no_grad():
        base.logit_scale.fill_(4.5)
    model = ACELoRA(base, "tiny", backend="torch")
    want = model.logit_scale.detach().clone()
    with torch.no_grad():
        model.logit_scale.mul_(2.0)
        base.logit_scale.fill_(-1.0)
    model.reset_parameters()
    base.reset_parameters()
    assert torch.equal(model.logit_scale, want) and torch.equal(want, torch.tensor(4.5).exp())
    assert torch.equal(base.logit_scale, torch.tensor(math.log(1 / 0.07)))  # eager.clip is base itself


def test_encoders_shapes_and_normalisation(tiny_model):
    model = copy.deepcopy(tiny_model).eval()
    images, token_ids, _ = _batch(model, batch=2)
    with torch.no_grad():
        image = model.encode_image(images.float())
        text = model.encode_text(token_ids)
        image_all = model.encode_image(images.float(), all_tokens=True)
        text_all = model.encode_text(token_ids, all_tokens=True)
    assert image.shape == (2, model.embed_dim) and text.shape == (2, model.embed_dim)
    assert torch.allclose(image.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    tokens = (model.image_size // 8) ** 2 + 1
    assert image_all.shape == (2, tokens, model.embed_dim)
    # cls_only is exact: token 0 of the full output is the CLS embedding (fp32 sums).
    assert torch.allclose(image_all[:, 0], image, atol=1e-5)
    assert text_all.shape == (2, model.context_length, model.embed_dim)
    assert torch.allclose(text_all[:, 0], text, atol=1e-5)
    # int32 ids (what a tokenizer other than ours, or an int32 data pipeline, gives) are the same text.
    with torch.no_grad():
        assert torch.equal(model.encode_text(token_ids.to(torch.int32)), text)


def test_bad_inputs_name_the_argument(tiny_model):
    with pytest.raises(ValueError, match="images"):
        tiny_model.encode_image(torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="token_ids"):
        tiny_model.encode_text(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="name"):
        ACELoRA.from_config("vit-huge")


def test_builder_without_open_clip_has_the_same_layout():
    with_open_clip = build_base_model("tiny", use_open_clip=True).state_dict()
    plain = build_base_model("tiny", use_open_clip=False).state_dict()
    assert {k: tuple(v.shape) for k, v in with_open_clip.items()} == {k: tuple(v.shape) for k, v in plain.items()}


def test_builder_without_open_clip_computes_as_open_clips_towers():
    # The same layout is not enough: the direct build's modules (the text MLP projection's activation, say) run
    # the same functions too, so one set of weights gives the same embeddings and loss through either base.
    bases = [build_base_model("tiny", use_open_clip=flag) for flag in (True, False)]
    bases[1].load_state_dict(bases[0].state_dict())
    losses = []
    for base in bases:
        torch.manual_seed(0)
        model = ACELoRA(base, "tiny", backend="torch").double().eval()
        with torch.no_grad():
            losses.append(model.loss(*_batch(model, batch=3)))
    assert torch.allclose(losses[0], losses[1], rtol=F64_RTOL, atol=0), losses


def test_the_open_clip_build_leaves_the_root_loggers_level_as_it_was():
    """open_clip's warning about the local config's missing weights is silenced by raising the root logger's
    level for the build only: the caller's level (INFO here) is restored, or its own log records would be
    dropped for the rest of the process."""
    import logging

    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.INFO)
        build_base_model("tiny", use_open_clip=True)
        assert root.level == logging.INFO
    finally:
        root.setLevel(level)


def test_a_broken_open_clip_falls_back_to_the_direct_build(monkeypatch):
    # An installed open_clip that cannot build the model (e.g. against an older timm, as a GPU
    # image with carried wheels may have): the default path warns and builds through timm +
    # transformers; asking for open_clip explicitly raises.
    import open_clip

    def broken(*args, **kwargs):
        raise AttributeError("module 'timm' has no attribute 'something_new'")

    monkeypatch.setattr(open_clip, "create_model", broken)
    with pytest.warns(UserWarning, match="open_clip could not build 'tiny'.*something_new"):
        model = build_base_model("tiny")
    plain = build_base_model("tiny", use_open_clip=False).state_dict()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in plain.items()}
    with pytest.raises(AttributeError, match="something_new"):
        build_base_model("tiny", use_open_clip=True)



def test_use_open_clip_takes_bools_only():
    # A string was taken for its truth: use_open_clip="false" built through open_clip, silently.
    for bad in ("false", "no", 0, 1.0):
        with pytest.raises(ValueError, match=rf"^argument 'use_open_clip': expected a bool, got {type(bad).__name__}$"):
            build_base_model("tiny", use_open_clip=bad)
    with pytest.raises(ValueError, match="^argument 'use_open_clip': expected a bool, got str$"):
        ACELoRA.from_config("tiny", use_open_clip="False")
    # A NumPy bool is a bool, as for the ops' flags.
    assert type(build_base_model("tiny", use_open_clip=np.bool_(False))).__name__ == "_PlainCLIP"

def test_pretrained_file_loads_and_mismatch_names_key(tmp_path, tiny_model):
    source = build_base_model("tiny")
    with torch.no_grad():
        source.logit_scale.fill_(math.log(50.0))
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(source.state_dict(), path)
    for pretrained in (path, tmp_path):  # a file, and an HF-format directory holding it
        model = ACELoRA.from_config("tiny", pretrained=str(pretrained))
        for key, value in source.state_dict().items():
            assert torch.equal(model.clip.state_dict()[key], value), key
        assert torch.allclose(model.logit_scale, torch.tensor(50.0))
    # A foreign checkpoint: one tensor of the wrong shape.
    state = source.state_dict()
    key = "visual.head.proj.weight"
    state[key] = torch.zeros(3, 5)
    bad = tmp_path / "bad.bin"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"visual\.head\.proj\.weight.*expected \(64, 64\), found \(3, 5\)"):
        ACELoRA.from_config("tiny", pretrained=str(bad))
    del state[key]
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"missing key 'visual\.head\.proj\.weight'"):
        ACELoRA.from_config("tiny", pretrained=str(bad))
    # Values copy_ would take silently: integers (or bools) for a weight, NaN.
    for value, found in ((torch.ones(64, 64, dtype=torch.int64), r"holds torch\.int64 values, expected "
                                                                  r"floating-point ones"),
                         (torch.full((64, 64), float("nan")), r"holds non-finite values")):
        torch.save({**source.state_dict(), key: value}, bad)
        with pytest.raises(ValueError, match=rf"bad\.bin: key 'visual\.head\.proj\.weight' {found}"):
            ACELoRA.from_config("tiny", pretrained=str(bad))
    # Garbage and a truncated file: a ValueError naming the file, not a raw loader traceback.
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"pretrained checkpoint .*bad\.bin: cannot be read"):
        ACELoRA.from_config("tiny", pretrained=str(bad))
    # A plain pickle: the one-line error alone, without torch's warning about its pickle protocol above it.
    bad.write_bytes(__import__("pickle").dumps({"step": 4}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"pretrained checkpoint .*bad\.bin: cannot be read"):
            ACELoRA.from_config("tiny", pretrained=str(bad))
    assert not [w for w in caught if "pickle" in str(w.message)], [str(w.message) for w in caught]
    torch.save(source.state_dict(), bad)
    bad.write_bytes(bad.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"pretrained checkpoint .*bad\.bin: cannot be read"):
        ACELoRA.from_config("tiny", pretrained=str(bad))
    # One bit flipped inside a stored tensor: torch.load reads it as another number; the zip's CRC-32 tells.
    from _corrupt import flip_a_bit_in_a_stored_tensor

    torch.save(source.state_dict(), bad)
    member = flip_a_bit_in_a_stored_tensor(bad)
    with pytest.raises(ValueError, match=rf"^pretrained checkpoint .*bad\.bin: cannot be read as a torch checkpoint: "
                                         rf"its member '{re.escape(member)}' fails its CRC-32 check \(corrupt file\)$"):
        ACELoRA.from_config("tiny", pretrained=str(bad))



@pytest.mark.parametrize("layout", ["old transformers buffers", "DistributedDataParallel", "open_clip training"])
def test_pretrained_files_in_other_saved_layouts_load(tmp_path, layout):
    """State dicts as other tools save them load with every weight in place: older transformers
    kept the text tower's constant ``position_ids``/``token_type_ids`` buffers (skipped, this
    tower has none), a DDP-wrapped model prefixes each key with ``module.``, and open_clip's
    training script saves ``{'epoch': ..., 'state_dict': {...}}`` (DDP-prefixed too)."""
    source = build_base_model("tiny")
    with torch.no_grad():
        source.logit_scale.fill_(math.log(50.0))
    state = source.state_dict()
    embeddings = "text.transformer.embeddings."
    assert not any(k.endswith(("position_ids", "token_type_ids")) for k in state)  # else the first case is vacuous
    saved = {
        "old transformers buffers": {**state, embeddings + "position_ids": torch.arange(32)[None],
                                     embeddings + "token_type_ids": torch.zeros(1, 32, dtype=torch.int64)},
        "DistributedDataParallel": {"module." + k: v for k, v in state.items()},
        "open_clip training": {"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in state.items()}},
    }[layout]
    path = tmp_path / "weights.pt"
    torch.save(saved, path)
    model = ACELoRA.from_config("tiny", pretrained=str(path))
    loaded = model.clip.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert torch.allclose(model.logit_scale, torch.tensor(50.0))


RELEASED = str(released_path())  # tests/_released.py: the workplace's copy, else the one in tests/data


def test_pretrained_that_is_no_open_clip_state_dict_is_named(tmp_path, tiny_model):
    """A released ACE-LoRA file (nested dicts) or non-string keys: one line naming the file
    and where such a checkpoint goes, not an AttributeError from inside the loader."""
    released = tmp_path / "released.pt"
    tiny_model.save_reference_checkpoint(released)
    numbered = tmp_path / "numbered.pt"
    torch.save({0: torch.zeros(2), 1: torch.ones(2)}, numbered)
    nested = tmp_path / "nested.pt"
    torch.save({"visual.proj": {"weight": torch.zeros(2)}}, nested)
    files = [(released, "released ACE-LoRA layout"), (numbered, "key 0 is of type int"),
             (nested, "key 'visual.proj' holds a value of type dict")]
    if os.path.isfile(RELEASED):
        files.append((RELEASED, "released ACE-LoRA layout"))
    for path, problem in files:
        with pytest.raises(ValueError) as info:
            ACELoRA.from_config("tiny", pretrained=str(path))
        message = str(info.value)
        assert "\n" not in message and str(path) in message and "not an open_clip state dict" in message
        assert problem in message and "--checkpoint" in message and "--init-checkpoint" in message


def test_biomedclip_trainable_parameter_count():
    model = ACELoRA.from_config("biomedclip")
    assert model.num_trainable_parameters() == 969_217
    lora = sum(p.numel() for n, p in model.named_trainable_parameters() if "_lora." in n)
    adapters = sum(p.numel() for n, p in model.named_trainable_parameters() if "_hgnn." in n)
    assert (lora, adapters) == (442_368, 526_848)
    assert len(model.image_lora) == len(model.text_lora) == 12
    assert (model.image_size, model.context_length, model.embed_dim) == (224, 256, 512)
    assert model.vision_trunk.patch_embed.num_patches + 1 == 197
    assert all(not p.requires_grad for p in model.clip.parameters())


def test_pretrained_directory_supplies_its_tokenizer(tmp_path):
    source = build_base_model("tiny")
    torch.save(source.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    # A user's HF-format directory with its own vocabulary: ids must come from it.
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "pneumothorax"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    model = ACELoRA.from_config("tiny", pretrained=str(tmp_path))
    ids = model.tokenizer()(["Pneumothorax"])
    assert ids[0, :3].tolist() == [101, 104, 102]
    assert ids.shape == (1, model.context_length)


@pytest.mark.parametrize("tokenizer_file", ["vocab.txt", "tokenizer.json", "vocab.txt, tokenizer_config.json"])
def test_a_vocabulary_file_alone_beside_the_weights_supplies_the_tokenizer(tmp_path, tokenizer_file):
    # What the warning for BiomedCLIP weights without a tokenizer asks for: PubMedBERT's vocab.txt (or its
    # tokenizer.json) beside the weights, with no tokenizer_config.json naming a class. AutoTokenizer could
    # not tell what such a vocab.txt is, and read a lone tokenizer.json without a padding token.
    from transformers import AutoTokenizer

    source = build_base_model("tiny")
    torch.save(source.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "pneumothorax"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "vocab.txt").write_text("\n".join(words) + "\n")
    (full / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    if tokenizer_file.startswith("vocab.txt"):
        (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
        if "tokenizer_config.json" in tokenizer_file:  # one that names no tokenizer class
            (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": true, "model_max_length": 512}')
    else:
        AutoTokenizer.from_pretrained(str(full)).backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    model = ACELoRA.from_config("tiny", pretrained=str(tmp_path))
    ids = model.tokenizer()(["Pneumothorax", "a"])
    assert ids[0, :3].tolist() == [101, 104, 102] and ids[0, 3:].eq(0).all()  # [PAD] = 0 pads the row
    assert ids[1, :3].tolist() == [101, 100, 102]  # a word not in the vocabulary is [UNK]
    assert ids.shape == (2, model.context_length)


@pytest.mark.parametrize("config,problem", [('{"tokenizer_class": ', "cannot be read as JSON"),
                                            ('["BertTokenizer"]', "is not a JSON object"),
                                            (b'{"tokenizer_class": "Bert\xe9"}', "cannot be read as JSON")])
def test_a_tokenizer_config_that_is_no_json_object_is_an_error_naming_it(tmp_path, config, problem):
    # AutoTokenizer read it again and failed with a bare JSON error, or a TypeError, naming no file.
    from ace_model.data import TextTokenizer

    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "pneumothorax"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    path = tmp_path / "tokenizer_config.json"
    path.write_bytes(config if isinstance(config, bytes) else config.encode())
    with pytest.raises(ValueError, match=rf"^tokenizer config '{re.escape(str(path))}' {problem}"):
        TextTokenizer(tmp_path, 8)
    path.unlink()  # none at all: read as BERT's, as before
    assert TextTokenizer(tmp_path, 8)(["Pneumothorax"])[0, :3].tolist() == [101, 104, 102]


def test_biomedclip_full_size_forward_and_backward():
    """One small step of the full architecture: 197 image tokens, 256 text tokens, 512-d."""
    torch.manual_seed(0)
    model = ACELoRA.from_config("biomedclip").train()
    images = torch.randn(2, 3, 224, 224)
    token_ids = model.tokenizer()(["Findings suggesting edema.", "No acute cardiopulmonary process."])
    assert token_ids.shape == (2, 256)
    tokens, cls_row = model.image_tokens(images)
    assert tokens.shape == (2, 197, 512) and cls_row.shape == (2, 196)
    loss = model.loss(images, token_ids, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    loss.backward()
    assert torch.isfinite(loss)
    # B = 0 at init, so only B (and the adapters and the multiplier) receive gradient first.
    assert model.image_lora[11].lora_b.grad.abs().sum() > 0
    assert model.text_lora[0].lora_b.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None


def test_bf16_autocast_runs_the_lora_op_in_bf16(tiny_model):
    """Under autocast the fused op gets bf16 operands (it is not cast by autocast itself)."""
    model = copy.deepcopy(tiny_model).eval()
    images, token_ids, labels = _batch(model, batch=3)
    images = images.float()
    seen = []
    original = model.image_lora[0].forward

    def spy(x, weight, bias, backend="auto"):
        out = original(x, weight, bias, backend)
        seen.append(out[0].dtype)
        return out

    model.image_lora[0].forward = spy
    with torch.no_grad():
        reference = model.loss(images, token_ids, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.loss(images, token_ids, labels)
    assert seen == [torch.float32, torch.bfloat16]
    # bf16 keeps ~3 significant digits; a loss of O(1) through 4 layers stays within a few 1e-2.
    assert torch.isfinite(low) and abs(low.float().item() - reference.item()) < 5e-2


def test_cast_frozen_weights_is_bit_identical_under_autocast(tiny_model):
    # bf16 autocast casts the frozen linear/conv weights at every use (and keeps the copies for
    # the backward); stored in bf16 they give the same losses and gradients, bit for bit.
    # Non-zero B and LoRA dropout: every path carries signal. CPU autocast, torch backend.
    model = copy.deepcopy(tiny_model)
    model.train()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for lora in list(model.image_lora) + list(model.text_lora):
            lora.lora_b.copy_(torch.randn(lora.lora_b.shape, generator=gen) * 0.5)
    cast = copy.deepcopy(model).cast_frozen_weights(torch.bfloat16)
    images, token_ids, labels = _batch(model)
    images = images.float()

    def run(m):
        torch.manual_seed(5)  # the same LoRA and attention dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m.loss(images, token_ids, labels)
        return loss, torch.autograd.grad(loss, m.trainable_parameters())

    (loss, grads), (cast_loss, cast_grads) = run(model), run(cast)
    assert torch.equal(loss, cast_loss)
    assert len(grads) == len(cast_grads) and all(g.abs().max() > 0 for g in grads[:1])
    for name, got, want in zip([n for n, _ in cast.named_trainable_parameters()], cast_grads, grads, strict=True):
        assert torch.equal(got, want), name


def test_cast_frozen_weights_frees_the_copies_autocast_kept_but_not_the_stacked_text_qkv(tiny_model):
    # What the bf16 weights take off the saved tensors, counted exactly (README, "Memory"): one bf16
    # copy of each frozen weight, but for the text layers' q, k and v (stacked into a new tensor at
    # every call, which the LoRA op keeps either way but in the first layer), the patch embedding and
    # the first vision layer's qkv (their inputs need no gradient, so nothing keeps their weights).
    # Biases are never kept. BiomedCLIP: 282 of 327 MiB.
    model = _perturbed_train_copy(tiny_model)
    cast = copy.deepcopy(model).cast_frozen_weights(torch.bfloat16)
    images, token_ids, labels = _batch(model)
    images = images.float()
    kept, _ = _saved_bytes(model, images, token_ids, labels, torch.bfloat16)
    cast_kept, _ = _saved_bytes(cast, images, token_ids, labels, torch.bfloat16)
    never_copied = {id(m) for layer in model.text_transformer.encoder.layer
                    for m in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value)}
    never_copied.update((id(model.vision_trunk.patch_embed.proj), id(model.vision_trunk.blocks[0].attn.qkv)))
    copies = sum(m.weight.numel() * 2 for m in model.clip.modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and id(m) not in never_copied)
    assert kept - cast_kept == copies, (kept, cast_kept, copies)


def test_cast_frozen_weights_casts_only_the_frozen_matmul_weights(tiny_model):
    model = copy.deepcopy(tiny_model).cast_frozen_weights(torch.bfloat16)
    kinds = {}
    for module in model.clip.modules():
        for name, param in module.named_parameters(recurse=False):
            kinds.setdefault(type(module).__name__, set()).add(param.dtype)
    assert kinds["Linear"] == {torch.bfloat16} and kinds["Conv2d"] == {torch.bfloat16}
    assert kinds["LayerNorm"] == {torch.float32} and kinds["Embedding"] == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    assert model.logit_scale.dtype == torch.float32
    # Frozen weights only, and an autocast dtype (float64 weights would run under no autocast).
    for dtype in (torch.int8, torch.float64, torch.float32):
        with pytest.raises(ValueError, match=r"argument 'dtype': expected torch.bfloat16 or torch.float16 \(an "
                                             r"autocast dtype\), got torch\."):
            copy.deepcopy(tiny_model).cast_frozen_weights(dtype)
    unfrozen = copy.deepcopy(tiny_model)
    unfrozen.clip.visual.head.proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="Linear.weight requires grad"):
        unfrozen.cast_frozen_weights(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in unfrozen.clip.parameters())  # nothing half cast
    tied = copy.deepcopy(tiny_model)
    embeddings = tied.text_transformer.embeddings.word_embeddings
    head = torch.nn.Linear(embeddings.weight.shape[1], embeddings.weight.shape[0], bias=False)
    head.weight = embeddings.weight  # an MLM-style head tied to the word embeddings
    tied.clip.add_module("tied_head", head)
    with pytest.raises(ValueError, match="tied to a parameter of a module that is neither"):
        tied.cast_frozen_weights(torch.bfloat16)
    assert embeddings.weight.dtype == torch.float32


def _perturbed_train_copy(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for lora in list(model.image_lora) + list(model.text_lora):
            lora.lora_b.copy_(torch.randn(lora.lora_b.shape, generator=gen) * 0.5)
    return model


def _step_with(model, recompute, images, token_ids, labels, autocast=False):
    """Loss, the trainable parameters' gradients and the generator's next draws, of one step
    from the same generator state with ``model.recompute = recompute``."""
    model.recompute = recompute
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(images, token_ids, labels)
    return loss, torch.autograd.grad(loss, model.trainable_parameters()), torch.rand(3)


@pytest.mark.parametrize("mode", ["mlp", "layer"])
@pytest.mark.parametrize("autocast", [False, True])
def test_recompute_is_bit_identical(tiny_model, autocast, mode):
    # Rerunning in the backward what is not kept changes no number: the same loss and the same
    # gradient of every trainable parameter, bit for bit, with every dropout on (LoRA, BERT hidden
    # and attention dropout: "layer" replays their draws), in fp32 and under CPU bf16 autocast
    # (the rerun must happen under the forward's autocast state); and the generator ends where
    # the plain step leaves it.
    model = _perturbed_train_copy(tiny_model)
    images, token_ids, labels = _batch(model)
    inputs = (images.float(), token_ids, labels)
    loss, grads, after = _step_with(model, "none", *inputs, autocast=autocast)
    rerun_loss, rerun_grads, rerun_after = _step_with(model, mode, *inputs, autocast=autocast)
    assert torch.equal(loss, rerun_loss) and torch.equal(after, rerun_after)
    names = [n for n, _ in model.named_trainable_parameters()]
    assert len(grads) == len(rerun_grads) == len(names)
    for name, got, want in zip(names, rerun_grads, grads, strict=True):
        assert want.abs().max() > 0 or name.endswith("lora_a"), f"{name}: zero gradient, test is vacuous"
        assert torch.equal(got, want), name


def test_recompute_layer_replays_the_dropout_draws(tiny_model, monkeypatch):
    # Negative control: without the generator states restored, the rerun layers draw other
    # dropout masks than their forward did, and the gradients differ.
    import ace_model.model as model_module
    from torch.utils.checkpoint import checkpoint

    model = _perturbed_train_copy(tiny_model)
    images, token_ids, labels = _batch(model)
    inputs = (images.float(), token_ids, labels)
    _, want, _ = _step_with(model, "none", *inputs)
    monkeypatch.setattr(model_module, "checkpoint",
                        lambda run, *args, **kwargs: checkpoint(run, *args, **{**kwargs, "preserve_rng_state": False}))
    _, got, _ = _step_with(model, "layer", *inputs)
    assert any(not torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_recompute_lowers_the_peak(tiny_model):
    # The peak of a training step above what was live before it (the profiler's CPU allocations,
    # as the benchmark measures on a CPU): each mode keeps less than the one before.
    from benchmarks.harness import peak_memory_mib

    model = _perturbed_train_copy(tiny_model)
    gen = torch.Generator().manual_seed(2)
    batch = 16
    images = torch.randn(batch, 3, model.image_size, model.image_size, generator=gen)
    token_ids = torch.randint(1, model.vocab_size, (batch, model.context_length), generator=gen)
    peaks = {}
    for mode in ("none", "mlp", "layer"):
        model.recompute = mode
        peaks[mode] = peak_memory_mib(lambda: model.loss(images, token_ids).backward(), device=torch.device("cpu"),
                                      grads=model.trainable_parameters())
    assert peaks["none"] > peaks["mlp"] > peaks["layer"] > 0, peaks


def _saved_bytes(model, images, token_ids, labels, autocast_dtype=None):
    """Bytes of the distinct storages autograd keeps for the backward, parameters excluded."""
    autocast = torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with autocast:
        return saved_storage_bytes(lambda: model.loss(images, token_ids, labels), list(model.parameters()))


@pytest.mark.parametrize("device,autocast_dtype", [
    ("cpu", None), ("cpu", torch.bfloat16), pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
def test_recompute_mlp_keeps_no_gelu_input(tiny_model, device, autocast_dtype):
    # What the switch saves, exactly: per layer and token, the GELU's input (the MLP's hidden
    # width, in the compute dtype: float32, or bf16 under autocast) and the MLP LayerNorm's mean
    # and rstd (float32 each: its input is the float32 residual stream); the
    # LayerNorm's float32 input, the one thing the rerun needs, was kept without the switch too.
    model = _perturbed_train_copy(tiny_model).to(device)
    if autocast_dtype is not None:
        # As training runs it: without weights stored in the autocast dtype, autocast's per-use
        # copy of each frozen fc1 weight would be kept by the plain step only, and counted here.
        model.cast_frozen_weights(autocast_dtype)
    if device == "cuda":
        model.backend = "triton"
    images, token_ids, labels = (t.to(device) for t in _batch(model))
    images = images.float()
    batch = images.shape[0]
    itemsize = (autocast_dtype or torch.float32).itemsize
    per_token = [(block.mlp.fc1.out_features * itemsize + 8, model.vision_trunk.patch_embed.num_patches + 1)
                 for block in model.vision_trunk.blocks]
    per_token += [(layer.intermediate.dense.out_features * itemsize + 8, token_ids.shape[1])
                  for layer in model.text_transformer.encoder.layer]
    expected = sum(size * batch * tokens for size, tokens in per_token)
    model.recompute = "none"
    kept, _ = _saved_bytes(model, images, token_ids, labels, autocast_dtype)
    model.recompute = "mlp"
    rerun_kept, loss = _saved_bytes(model, images, token_ids, labels, autocast_dtype)
    assert kept - rerun_kept == expected, (kept, rerun_kept, expected)
    loss.backward()  # the graph it kept is enough for the backward
    # Without autograd (evaluation, the chunked step's first pass) nothing is rerun or kept.
    autocast = torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with torch.no_grad(), autocast:
        assert model.loss(images, token_ids, labels).grad_fn is None


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["mlp", "layer"])
def test_recompute_on_cuda_gives_the_eager_numbers(tiny_model, mode):
    # On a GPU under bf16 autocast with the Triton ops and bf16 frozen weights (as training runs
    # it): the same loss bit for bit (the forward has no atomics) and the same gradients up to
    # the order of the attention backward's atomic additions (measured against a second plain
    # run: the rerun may differ from the plain step by no more than two plain runs differ).
    model = _perturbed_train_copy(tiny_model).cuda().cast_frozen_weights(torch.bfloat16)
    model.backend = "triton"
    images, token_ids, labels = (t.cuda() for t in _batch(model))
    images = images.float()

    def run(recompute):
        model.recompute = recompute
        torch.manual_seed(5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(images, token_ids, labels)
        return loss, torch.autograd.grad(loss, model.trainable_parameters())

    (loss, grads), (again_loss, again), (rerun_loss, rerun) = run("none"), run("none"), run(mode)
    assert torch.equal(loss, again_loss) and torch.equal(loss, rerun_loss)
    names = [n for n, _ in model.named_trainable_parameters()]
    for name, want, other, got in zip(names, grads, again, rerun, strict=True):
        noise = (other - want).norm().item()
        assert (got - want).norm().item() <= max(4 * noise, 1e-3 * want.norm().item()), name


def test_recompute_mlp_refuses_a_trainable_mlp(tiny_model):
    model = _perturbed_train_copy(tiny_model)
    images, token_ids, labels = _batch(model, batch=2)
    images = images.float()
    model.vision_trunk.blocks[0].norm2.weight.requires_grad_(True)
    model.recompute = "mlp"
    with pytest.raises(ValueError, match="recompute='mlp': LayerNorm has parameters that require grad"):
        model.loss(images, token_ids, labels)
    for mode in ("none", "layer"):  # without the switch, or rerunning whole layers, it trains them
        model.recompute = mode
        model.vision_trunk.blocks[0].norm2.weight.grad = None
        model.loss(images, token_ids, labels).backward()
        assert model.vision_trunk.blocks[0].norm2.weight.grad is not None
    with pytest.raises(ValueError, match="argument 'recompute': expected one of 'none', 'mlp', 'layer', got 'yes'"):
        ACELoRA.from_config("tiny", recompute="yes")
    with pytest.raises(ValueError, match="argument 'recompute'"):
        model.recompute = True
    assert ACELoRA.from_config("tiny", recompute="layer").recompute == "layer"


# ---------------------------------------------------------------------------------------
# Gaps a coverage run found: paths no other test reached
# ---------------------------------------------------------------------------------------


def test_tiny_vit_has_no_pretrained_weights():
    import timm

    ACELoRA.from_config("tiny")  # registers it with timm
    with pytest.raises(ValueError, match="^ace_vit_tiny_patch8_32 has no pretrained weights$"):
        timm.create_model("ace_vit_tiny_patch8_32", pretrained=True)


def test_without_open_clip_the_direct_build_is_silent_and_a_broken_import_warns(monkeypatch):
    import builtins
    import warnings

    layout = {k: tuple(v.shape) for k, v in build_base_model("tiny", use_open_clip=False).state_dict().items()}
    monkeypatch.setitem(sys.modules, "open_clip", None)  # not installed: `import open_clip` raises ImportError
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_base_model("tiny")
    assert type(model).__name__ == "_PlainCLIP"
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    monkeypatch.delitem(sys.modules, "open_clip")
    real_import = builtins.__import__

    def broken_import(name, *args, **kwargs):  # installed, but its import fails (e.g. against this timm)
        if name == "open_clip":
            raise AttributeError("module 'timm' has no attribute 'something_new'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken_import)
    with pytest.warns(UserWarning, match=r"^open_clip failed to import \(AttributeError: module 'timm' has no "
                                         r"attribute 'something_new'\); building 'tiny' through timm \+ "
                                         r"transformers directly$"):
        model = build_base_model("tiny")
    assert type(model).__name__ == "_PlainCLIP"
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout


def test_pretrained_safetensors_file_and_directory_load(tmp_path):
    from safetensors.torch import save_file

    source = build_base_model("tiny")
    with torch.no_grad():
        source.logit_scale.fill_(math.log(50.0))
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    for pretrained in (tmp_path / "open_clip_model.safetensors", tmp_path):
        loaded = ACELoRA.from_config("tiny", pretrained=str(pretrained)).clip.state_dict()
        assert loaded.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(loaded[key], value), key
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"pretrained checkpoint .*bad\.safetensors: cannot be read as a safetensors "
                                         r"file"):
        ACELoRA.from_config("tiny", pretrained=str(tmp_path / "bad.safetensors"))


def test_pretrained_that_is_missing_no_dict_or_has_an_unknown_key_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^pretrained weights not found: {tmp_path}/missing\.bin$"):
        ACELoRA.from_config("tiny", pretrained=str(tmp_path / "missing.bin"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"^pretrained directory {empty} holds none of the weight files "
                                                r"\['open_clip_model\.safetensors', 'open_clip_pytorch_model\.bin', "):
        ACELoRA.from_config("tiny", pretrained=str(empty))
    listed = tmp_path / "listed.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(ValueError, match=rf"^pretrained checkpoint {listed}: expected a state dict, got list$"):
        ACELoRA.from_config("tiny", pretrained=str(listed))
    extra = tmp_path / "extra.pt"
    torch.save({**build_base_model("tiny").state_dict(), "visual.head.extra": torch.zeros(3, 5)}, extra)
    with pytest.raises(ValueError, match=rf"^pretrained checkpoint {extra}: unexpected key 'visual\.head\.extra' "
                                         r"\(found shape \(3, 5\); this architecture has no such weight\)$"):
        ACELoRA.from_config("tiny", pretrained=str(extra))


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "argument 'rank': expected an integer >= 1, got 0"),
    (dict(rank=-1), "argument 'rank': expected an integer >= 1, got -1"),
    (dict(rank=2.5), "argument 'rank': expected an integer >= 1, got 2.5"),
    (dict(in_features=0), "argument 'in_features': expected an integer >= 1, got 0"),
    (dict(out_features=True), "argument 'out_features': expected an integer >= 1, got True"),
    (dict(alpha=float("nan")), "argument 'alpha': expected a finite number, got nan"),
    (dict(dropout=1.0), r"argument 'dropout': expected a float in \[0, 1\), got 1.0"),
])
def test_lora_module_refuses_bad_sizes_naming_the_argument(kwargs, match):
    """rank=0 was a ZeroDivisionError, rank=-1 a 'math domain error', 2.5 a TypeError from torch.empty."""
    from ace_model.model import LoRAQKV

    with pytest.raises(ValueError, match=f"^{match}$"):
        LoRAQKV(**{"in_features": 8, "out_features": 6, **kwargs})


def test_lora_module_takes_numpy_numbers_as_python_ones():
    """NumPy numbers are numbers: the module keeps Python ones (a np.float32 alpha kept as it is made the scaling
    alpha / sqrt(rank) in float32, not the float64 a Python alpha gives)."""
    import numpy as np

    from ace_model.model import LoRAQKV

    lora = LoRAQKV(np.int64(8), np.int64(6), rank=np.int64(3), alpha=np.float32(0.1), dropout=np.float32(0.25))
    assert (lora.in_features, lora.out_features, lora.rank) == (8, 6, 3)
    assert type(lora.rank) is int and type(lora.scaling) is float and type(lora.dropout_p) is float
    assert lora.scaling == float(np.float32(0.1)) / math.sqrt(3) and lora.dropout_p == 0.25


def test_lora_module_repr_and_trainable_state_dict(tiny_model):
    lora = tiny_model.image_lora[0]
    assert repr(lora) == "LoRAQKV(in=64, out=64, r=4, scaling=0.5, dropout=0.1)"  # per projection
    state = tiny_model.trainable_state_dict()
    params = dict(tiny_model.named_trainable_parameters())
    assert list(state) == list(params)
    for name, value in state.items():
        assert torch.equal(value, params[name]) and not value.requires_grad, name
        assert value.data_ptr() != params[name].data_ptr(), f"{name}: not a copy"


def test_model_repr_names_the_settings_that_change_what_runs(tiny_model):
    # ACELoRA's repr was the module tree alone: a model computing the published code's text row, recomputing
    # in the backward or forced onto one backend printed as the default one.
    assert repr(tiny_model).startswith("ACELoRA(\n  config='tiny', backend='torch'\n  (clip): ")
    model = copy.deepcopy(tiny_model)
    model.backend, model.text_attention, model.recompute = "auto", "reference-code", "layer"
    assert model.extra_repr() == "config='tiny', text_attention='reference-code', recompute='layer'"
    model.text_attention, model.recompute = "spec", "none"
    assert model.extra_repr() == "config='tiny'"


def test_recomputed_output_that_does_not_depend_on_the_input_gives_it_no_gradient():
    from ace_model.model import _Recomputed

    x = torch.randn(3, requires_grad=True)
    y = _Recomputed.apply(lambda t: torch.ones(3), x)  # a function of x as autograd sees it, a constant here
    assert y.requires_grad and torch.equal(y, torch.ones(3))
    (grad,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
    assert grad is None


def test_a_gated_attention_block_runs_as_timms(tiny_model):
    """timm's gated attention (``attn.gate``: the output times sigmoid(gate(input))): the image
    tokens equal timm's own forward of the trunk (the LoRA factors B are zero at init)."""
    model = copy.deepcopy(tiny_model).double().eval()
    gen = torch.Generator().manual_seed(9)
    images = torch.randn(2, 3, model.image_size, model.image_size, generator=gen, dtype=torch.float64)
    ungated, _ = model.image_tokens(images)
    for block in model.vision_trunk.blocks:
        width = block.attn.qkv.in_features
        block.attn.gate = torch.nn.Linear(width, width, dtype=torch.float64).requires_grad_(False)
    tokens, _ = model.image_tokens(images)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.clip.visual.head(model.vision_trunk.forward_features(images)),
                                                 dim=-1)
    assert torch.allclose(tokens, expected, rtol=F64_RTOL, atol=1e-15)
    assert (tokens - ungated).abs().max() > 1e-3  # the gate is applied: the test is not vacuous


def test_timms_optional_block_pieces_run_as_timms(tiny_model):
    """The pieces of a timm ViT that the tiny and BiomedCLIP towers leave as identities (the pre-norm, q/k
    norms, the attention output's norm, layer scales, the MLP's norm; an attention dropout, off in eval mode):
    given weights, each is applied where timm applies it, so the image tokens equal timm's own forward of the
    trunk (the LoRA factors B are zero)."""
    from timm.layers import LayerScale

    model = copy.deepcopy(tiny_model).double().eval()
    trunk = model.vision_trunk
    gen = torch.Generator().manual_seed(10)
    images = torch.randn(2, 3, model.image_size, model.image_size, generator=gen, dtype=torch.float64)
    plain, _ = model.image_tokens(images)

    def norm(width):
        layer = torch.nn.LayerNorm(width, dtype=torch.float64).requires_grad_(False)
        layer.weight.copy_(1 + 0.5 * torch.randn(width, generator=gen, dtype=torch.float64))
        layer.bias.copy_(0.5 * torch.randn(width, generator=gen, dtype=torch.float64))
        return layer

    def scale(width):
        layer = LayerScale(width, init_values=1.0).double().requires_grad_(False)
        layer.gamma.copy_(0.5 + torch.rand(width, generator=gen, dtype=torch.float64))
        return layer

    width = trunk.embed_dim
    trunk.norm_pre = norm(width)
    for block in trunk.blocks:
        head_dim = width // block.attn.num_heads
        block.attn.q_norm, block.attn.k_norm, block.attn.norm = norm(head_dim), norm(head_dim), norm(width)
        block.ls1, block.ls2 = scale(width), scale(width)
        block.mlp.norm = norm(block.mlp.fc1.out_features)
        block.attn.attn_drop.p = 0.5  # in eval mode, as timm's: no draw
    tokens, _ = model.image_tokens(images)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.clip.visual.head(trunk.forward_features(images)), dim=-1)
    assert torch.allclose(tokens, expected, rtol=F64_RTOL, atol=1e-15)
    assert (tokens - plain).abs().max() > 1e-2  # the pieces change the tokens: the test is not vacuous


def test_loss_passes_the_group_and_forward_is_the_loss(tiny_model, monkeypatch):
    model = copy.deepcopy(tiny_model).eval()
    images, token_ids, labels = _batch(model, batch=3)
    images = images.float()
    expected = model.loss(images, token_ids, labels)
    assert torch.equal(model(images, token_ids, labels), expected)
    real = ace_kernels.label_guided_infonce
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.pop("group", "no group"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ace_kernels, "label_guided_infonce", spy)
    group = object()
    assert torch.equal(model.loss(images, token_ids, labels, group=group), expected)
    assert torch.equal(model.loss(images, token_ids, labels), expected)
    assert seen[0] is group and seen[1] == "no group"
