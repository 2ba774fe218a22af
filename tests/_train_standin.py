"""Shared pieces of the training tests: a stand-in model, datasets, a dense loss oracle.

The stand-in has ACELoRA's training interface (``encode_image``, ``encode_text``, a
learnable ``logit_scale`` multiplier, ``save_reference_checkpoint``), frozen and trainable
weights, and dropout in both towers, so the machinery of ``ace_model.training`` can be
tested on it in milliseconds. :func:`make_model` builds either it or the tiny ACELoRA.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

LABEL_WIDTH = 3


class StandInModel(nn.Module):
    """Image tower: frozen linear -> tanh -> dropout -> trainable linear -> normalise.
    Text tower: frozen embedding -> mean -> dropout -> trainable linear -> normalise."""

    image_size = 4
    context_length = 6

    def __init__(self, width: int = 16, embed_dim: int = 8, vocab: int = 32, dropout: float = 0.1):
        super().__init__()
        self.image_backbone = nn.Linear(3 * self.image_size * self.image_size, width)
        self.token_embedding = nn.Embedding(vocab, width)
        for p in list(self.image_backbone.parameters()) + list(self.token_embedding.parameters()):
            p.requires_grad_(False)
        self.image_head = nn.Linear(width, embed_dim)
        self.text_head = nn.Linear(width, embed_dim)
        self.image_dropout = nn.Dropout(dropout)
        self.text_dropout = nn.Dropout(dropout)
        self.logit_scale = nn.Parameter(torch.tensor(4.0))

    def encode_image(self, images):
        hidden = torch.tanh(self.image_backbone(images.flatten(1)))
        return F.normalize(self.image_head(self.image_dropout(hidden)), dim=-1)

    def encode_text(self, token_ids):
        hidden = self.token_embedding(token_ids).mean(1)
        return F.normalize(self.text_head(self.text_dropout(hidden)), dim=-1)

    def loss(self, images, token_ids, labels=None):
        return dense_label_infonce(self.encode_image(images), self.encode_text(token_ids), self.logit_scale, labels)

    def save_reference_checkpoint(self, path):
        torch.save({n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}, path)


def dense_label_infonce(image_emb, text_emb, logit_scale, labels=None):
    """Spec section 5 written out densely: masked B x B logits, mean of both cross-entropies."""
    logits = logit_scale * image_emb @ text_emb.T
    batch = logits.shape[0]
    if labels is not None:
        rows = labels.reshape(batch, -1)
        same = (rows[:, None, :] == rows[None, :, :]).all(-1)
        same &= ~torch.eye(batch, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(batch, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def tiny_available() -> bool:
    """ACELoRA and the synthetic data are importable (then tests must pass on the tiny model).

    ``ACE_TRAINING_TESTS_STANDIN_ONLY=1`` restricts the tests to the stand-in.
    """
    if os.environ.get("ACE_TRAINING_TESTS_STANDIN_ONLY") == "1":
        return False
    try:
        from ace_model import ACELoRA  # noqa: F401
        from ace_model.data import make_synthetic_dataset  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("ace_model", "ace_kernels"):
            raise  # the package itself is broken: that must fail, not fall back to the stand-in
        return False  # a missing optional dependency (timm, transformers, open_clip, ...)
    return True


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability in ``model``: nn.Dropout modules, the LoRA dropout
    (``LoRAQKV.dropout_p``) and ACELoRA's text-tower dropouts (plain float attributes)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        for attr in ("dropout_p", "text_hidden_dropout", "text_attention_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, p)


def make_model(kind: str, *, seed: int = 0, dropout: float | None = None, perturb: bool = False) -> nn.Module:
    """The stand-in or the tiny ACELoRA, in train mode; ``perturb``: see :func:`perturb_zero_trainables`."""
    torch.manual_seed(seed)
    if kind == "standin":
        model = StandInModel(dropout=0.1 if dropout is None else dropout)
    elif kind == "tiny":
        from ace_model import ACELoRA

        model = ACELoRA.from_config("tiny")
        if dropout is not None:
            set_dropout(model, dropout)
    else:
        raise ValueError(kind)
    if perturb:
        perturb_zero_trainables(model)
    model.train()
    return model


def perturb_zero_trainables(model: nn.Module, *, seed: int = 7, scale: float = 0.5) -> list[str]:
    """Fill every all-zero trainable parameter with seeded normal values times ``scale``, in place,
    and return their names.

    A fresh ACELoRA starts each LoRA's B at zero: every ``lora_a`` gradient is then exactly 0
    and the LoRA branch adds nothing to the gradient of its input, so a gradient comparison on a
    fresh model compares 0 with 0 there (tests/test_model.py's ``_perturbed_fp64`` does the same
    for the kernels). A generator of its own: the global stream, hence the dropout masks, is
    left as it was. The stand-in has no zero trainables.
    """
    gen = torch.Generator().manual_seed(seed)
    filled = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and not bool(param.abs().amax() > 0):
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * scale)
                filled.append(name)
    return filled


def assert_no_zero_gradient(grads: dict[str, torch.Tensor]) -> None:
    """Every gradient a test compares carries signal: an all-zero one (``lora_a`` on a model whose
    LoRA B is zero) would make its comparison 0 == 0."""
    assert grads, "no gradients to compare"
    zero = [name for name, grad in grads.items() if not bool(grad.abs().amax() > 0)]
    assert not zero, f"all-zero reference gradients, the comparison is vacuous for them: {zero}"


class RandomPairs(torch.utils.data.Dataset):
    """In-memory (image, token_ids, labels) items shaped for ``model``; labels repeat often."""

    def __init__(self, model, n: int, *, seed: int = 0, label_width: int = LABEL_WIDTH):
        gen = torch.Generator().manual_seed(seed)
        size = model.image_size if isinstance(model.image_size, int) else model.image_size[0]
        self.images = torch.randn(n, 3, size, size, generator=gen)
        self.token_ids = torch.randint(1, 30, (n, model.context_length), generator=gen)
        self.labels = torch.randint(0, 2, (n, label_width), generator=gen)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.token_ids[i], self.labels[i]


def make_batch(model, n: int, *, seed: int = 0):
    data = RandomPairs(model, n, seed=seed)
    return data.images, data.token_ids, data.labels


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
