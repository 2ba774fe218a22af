"""ace_model.training on one process: the chunked two-pass step, the schedule, the loop.

The chunked step is compared with one-pass autograd on the same model; with dropout on,
the one-pass reference draws its masks chunk by chunk in the same order, which is what
the two-pass step must replay. Models: the stand-in of tests/_train_standin.py (always)
and the tiny ACELoRA (the real towers, LoRA dropout and ACE-HGNN).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ace_model.training as training
from ace_model.training import (
    NonFiniteLossError,
    TrainConfig,
    chunked_train_step,
    cosine_with_warmup,
    load_state,
    read_metrics,
    train,
)
from _corrupt import flip_a_bit_in_a_stored_tensor
from _train_standin import (
    RandomPairs,
    StandInModel,
    assert_no_zero_gradient,
    dense_label_infonce,
    make_batch,
    make_model,
    tiny_available,
    trainable_grads,
)

MODEL_KINDS = [
    "standin",
    pytest.param("tiny", marks=pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")),
]

# fp32 everywhere; the chunked and one-pass steps add the same terms in a different
# order (per-chunk backward sums, concatenated vs sliced matmuls), so they agree to a
# few ulps of the largest gradient entry, not bit for bit.
RTOL, ATOL = 1e-5, 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


def _one_pass_reference(model, images, token_ids, labels, *, seed, chunk_bounds, precision="fp32"):
    """Loss and gradients with one autograd graph over the whole batch.

    The encoders run chunk by chunk (graph kept) so dropout draws its masks in the
    same order as the two-pass step's pass 1; with one chunk this is the plain step.
    ``precision`` as the step's (the encoders under its autocast, the loss outside).
    """
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    image_parts, text_parts = [], []
    for lo, hi in chunk_bounds:
        with training.autocast_context(images.device, precision):
            image_parts.append(model.encode_image(images[lo:hi]))
            text_parts.append(model.encode_text(token_ids[lo:hi]))
    scale = training.logit_scale_parameter(model)
    loss = dense_label_infonce(torch.cat(image_parts), torch.cat(text_parts), scale, labels)
    loss.backward()
    return loss.detach(), trainable_grads(model), torch.rand(4)


def _chunked(model, images, token_ids, labels, *, seed, chunk_size):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = chunked_train_step(model, images, token_ids, labels, chunk_size=chunk_size, loss_fn=dense_label_infonce)
    return loss, trainable_grads(model), torch.rand(4)


def _bounds(batch, chunk):
    return [(lo, min(lo + chunk, batch)) for lo in range(0, batch, chunk)]


def _assert_grads_close(got: dict, want: dict):
    assert got.keys() == want.keys() and got, "the same trainable parameters must receive gradients"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("batch,chunk", [(10, 3), (7, 1), (9, 4)])
def test_chunked_step_replays_dropout(kind, batch, chunk):
    model = make_model(kind, dropout=0.3, perturb=True)  # non-zero LoRA B: lora_a gets a gradient
    images, token_ids, labels = make_batch(model, batch, seed=1)
    want_loss, want_grads, want_rng = _one_pass_reference(model, images, token_ids, labels, seed=5,
                                                          chunk_bounds=_bounds(batch, chunk))
    assert_no_zero_gradient(want_grads)
    got_loss, got_grads, got_rng = _chunked(model, images, token_ids, labels, seed=5, chunk_size=chunk)
    torch.testing.assert_close(got_loss, want_loss, rtol=RTOL, atol=ATOL)
    _assert_grads_close(got_grads, want_grads)
    # The generator ends where the one-pass step leaves it: later steps draw the same masks.
    assert torch.equal(got_rng, want_rng)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_chunked_step_equals_unchunked_step_without_dropout(kind):
    model = make_model(kind, dropout=0.0, perturb=True)
    images, token_ids, labels = make_batch(model, 11, seed=2)
    want_loss, want_grads, _ = _one_pass_reference(model, images, token_ids, labels, seed=0, chunk_bounds=[(0, 11)])
    assert_no_zero_gradient(want_grads)
    got_loss, got_grads, _ = _chunked(model, images, token_ids, labels, seed=0, chunk_size=4)
    torch.testing.assert_close(got_loss, want_loss, rtol=RTOL, atol=ATOL)
    _assert_grads_close(got_grads, want_grads)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_chunked_step_matches_model_loss_and_library_loss(kind):
    """Default loss (ace_kernels.label_guided_infonce) vs ``model.loss`` on the whole batch."""
    model = make_model(kind, dropout=0.0, perturb=True)
    images, token_ids, labels = make_batch(model, 9, seed=3)
    model.zero_grad(set_to_none=True)
    want_loss = model.loss(images, token_ids, labels)
    want_loss.backward()
    want_grads = trainable_grads(model)
    assert_no_zero_gradient(want_grads)
    model.zero_grad(set_to_none=True)
    got_loss = chunked_train_step(model, images, token_ids, labels, chunk_size=2)
    torch.testing.assert_close(got_loss, want_loss.detach(), rtol=RTOL, atol=ATOL)
    _assert_grads_close(trainable_grads(model), want_grads)


@pytest.mark.parametrize("chunk", [None, 2])
def test_the_step_uses_a_multiplier_above_100_unclamped(chunk):
    """Spec section 1: no clamp on the learned multiplier. At 150 the step's loss and its gradient
    (which a clamp at open_clip's 100 would make zero) are those of the dense loss on that multiplier."""
    model = make_model("standin", dropout=0.0, perturb=True)
    with torch.no_grad():
        model.logit_scale.fill_(150.0)
    images, token_ids, labels = make_batch(model, 6, seed=4)
    want_loss, want_grads, _ = _one_pass_reference(model, images, token_ids, labels, seed=0, chunk_bounds=[(0, 6)])
    assert want_grads["logit_scale"].abs().item() > 0
    for loss_fn in (dense_label_infonce, None):  # the caller's loss and the default (ace_kernels)
        model.zero_grad(set_to_none=True)
        got_loss = chunked_train_step(model, images, token_ids, labels, chunk_size=chunk, loss_fn=loss_fn)
        torch.testing.assert_close(got_loss, want_loss, rtol=RTOL, atol=ATOL)
        got_grads = trainable_grads(model)
        assert got_grads.keys() == want_grads.keys()
        for name, want in want_grads.items():  # fp32 at a multiplier of 150: rounding grows with it
            torch.testing.assert_close(got_grads[name], want, rtol=1e-4, atol=1e-4 * want.abs().max().item(),
                                       msg=lambda m: f"{name}: {m}")


def test_chunked_step_keeps_the_losss_own_draws():
    # A loss that draws random numbers (ours draws none) leaves the generator after its draws in
    # the one-pass step; the chunked step must too, not rewind to the end of its first pass.
    def drawing_loss(*args, **kwargs):
        return dense_label_infonce(*args, **kwargs) + 0.0 * torch.rand(())

    model = make_model("standin", dropout=0.3)
    images, token_ids, labels = make_batch(model, 10, seed=1)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    chunked_train_step(model, images, token_ids, labels, chunk_size=10, loss_fn=drawing_loss)  # one pass
    want = torch.rand(4)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    chunked_train_step(model, images, token_ids, labels, chunk_size=3, loss_fn=drawing_loss)
    # The one-pass step's encoders draw in one call per tower, the chunked step's per chunk: the
    # same count of numbers on the CPU generator, so the states agree when the loss's are kept.
    assert torch.equal(torch.rand(4), want)


def test_replay_is_what_makes_the_gradients_right(monkeypatch):
    """Negative control: without restoring the RNG, pass 2 draws new masks and the test above fails."""
    model = make_model("standin", dropout=0.5)
    images, token_ids, labels = make_batch(model, 10, seed=1)
    _, want_grads, _ = _one_pass_reference(model, images, token_ids, labels, seed=5, chunk_bounds=_bounds(10, 3))
    monkeypatch.setattr(training, "_restore_torch_rng", lambda state, device: None)
    _, got_grads, _ = _chunked(model, images, token_ids, labels, seed=5, chunk_size=3)
    assert any(not torch.allclose(got_grads[n], want_grads[n], rtol=RTOL, atol=ATOL) for n in want_grads)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("chunk", [None, 6, 50])
def test_chunk_size_of_batch_or_more_is_the_one_pass_step(chunk, dropout):
    """Against one autograd graph over the whole batch, written here (with dropout, the
    reference draws the image masks, then the text masks, for all 6 samples at once)."""
    model = make_model("standin", dropout=dropout)
    images, token_ids, labels = make_batch(model, 6, seed=4)
    want_loss, want_grads, want_rng = _one_pass_reference(model, images, token_ids, labels, seed=9,
                                                          chunk_bounds=[(0, 6)])
    calls = []
    for tower in ("encode_image", "encode_text"):
        encode = getattr(model, tower)
        setattr(model, tower, lambda x, encode=encode: calls.append(len(x)) or encode(x))
    got_loss, got_grads, got_rng = _chunked(model, images, token_ids, labels, seed=9, chunk_size=chunk)
    torch.testing.assert_close(got_loss, want_loss, rtol=RTOL, atol=ATOL)
    _assert_grads_close(got_grads, want_grads)
    assert torch.equal(got_rng, want_rng)
    # One pass indeed: each tower runs once on the whole batch (not a first pass and its replay), and the
    # loss comes back detached, as the docstring says.
    assert calls == [6, 6] and not got_loss.requires_grad


def test_another_chunk_size_draws_other_masks_with_dropout():
    """What the docs say: with dropout the masks (so the numbers) depend on the chunk size;
    without dropout they do not."""
    def grads_for(chunk, dropout):
        model = make_model("standin", dropout=dropout)
        images, token_ids, labels = make_batch(model, 10, seed=1)
        return _chunked(model, images, token_ids, labels, seed=5, chunk_size=chunk)[1]

    with_dropout = [grads_for(c, 0.5) for c in (3, 5)]
    assert any(not torch.allclose(with_dropout[0][n], with_dropout[1][n], rtol=RTOL, atol=ATOL)
               for n in with_dropout[0])
    without = [grads_for(c, 0.0) for c in (3, 5)]
    _assert_grads_close(without[0], without[1])


@pytest.mark.parametrize("frozen", ["image_head", "text_head"])
def test_a_frozen_towers_embeddings_need_a_gradient_across_ranks_chunked_or_not(frozen):
    """With a group the loss's collectives follow which embeddings need a gradient, and ranks may
    differ in chunk_size: the one-pass step passes what the chunked step's leaves are, embeddings
    that need one, also from a frozen tower (it passed that tower's output as it was: the loss then
    raised on every rank of a run whose ranks differed in chunk_size). The group is a stand-in
    here (no check between ranks; the loss function records what it gets); trainables' gradients
    are those of the step without a group."""
    seen = {}

    def loss_fn(image_emb, text_emb, logit_scale, labels=None, group=None):
        seen[chunk] = (image_emb.requires_grad, text_emb.requires_grad)
        return dense_label_infonce(image_emb, text_emb, logit_scale, labels)

    grads = {}
    for chunk in (None, 2):
        model = make_model("standin", dropout=0.0)
        getattr(model, frozen).requires_grad_(False)
        images, token_ids, labels = make_batch(model, 6, seed=4)
        training.chunked_train_step(model, images, token_ids, labels, chunk_size=chunk, group=object(),
                                    check_ranks=False, loss_fn=loss_fn)
        grads[chunk] = trainable_grads(model)
    assert seen == {None: (True, True), 2: (True, True)}
    model = make_model("standin", dropout=0.0)
    getattr(model, frozen).requires_grad_(False)
    training.chunked_train_step(model, images, token_ids, labels, chunk_size=None, loss_fn=dense_label_infonce)
    _assert_grads_close(grads[None], trainable_grads(model))
    _assert_grads_close(grads[2], trainable_grads(model))


def test_chunked_step_input_errors():
    model = make_model("standin")
    images, token_ids, labels = make_batch(model, 4)
    with pytest.raises(ValueError, match="token_ids"):
        chunked_train_step(model, images, token_ids[:3], labels, chunk_size=2, loss_fn=dense_label_infonce)
    with pytest.raises(ValueError, match="labels"):
        chunked_train_step(model, images, token_ids, labels[:2], chunk_size=2, loss_fn=dense_label_infonce)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="argument 'chunk_size': expected a positive int or None"):
            chunked_train_step(model, images, token_ids, labels, chunk_size=bad, loss_fn=dense_label_infonce)
    with pytest.raises(ValueError, match="argument 'loss_scope': expected 'global' or 'local', got 'per-rank'"):
        chunked_train_step(model, images, token_ids, labels, chunk_size=2, loss_scope="per-rank")
    # A NumPy integer is the int it holds.
    want = _chunked(model, images, token_ids, labels, seed=0, chunk_size=3)
    got = _chunked(model, images, token_ids, labels, seed=0, chunk_size=np.int64(3))
    assert torch.equal(got[0], want[0]) and all(torch.equal(got[1][n], want[1][n]) for n in want[1])


def test_cosine_with_warmup_schedule():
    warmup, total = 4, 14
    factors = [cosine_with_warmup(s, warmup, total) for s in range(total)]
    # Warm-up: 1/4, 2/4, 3/4, 4/4 -- the full rate is reached on the last warm-up step.
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    # Cosine over the remaining 10 steps, written from its definition.
    for s in range(warmup, total):
        assert math.isclose(factors[s], (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2, rel_tol=1e-12)
    assert cosine_with_warmup(0, 0, 5) == 1.0  # no warm-up starts at the full rate
    assert cosine_with_warmup(total, warmup, total) == 0.0
    # Past the end it stays at 0 (an uncapped cosine would climb back towards the full rate).
    assert [cosine_with_warmup(s, warmup, total) for s in (total + 1, total + 5, 2 * total)] == [0.0, 0.0, 0.0]


def _config(tmp_path, **overrides):
    # On the CPU unless a test names another device: "auto" (TrainConfig's default) would take a GPU where
    # there is one, and the tests that compare a run with CPU tensors or CPU expectations would then fail.
    base = dict(out_dir=str(tmp_path / "run"), model="standin", epochs=3, batch_size=4, lr=1e-2,
                warmup_epochs=1, checkpoint_every=4, keep_checkpoints=2, progress=False, seed=3, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


class _NormRecordingAdamW(torch.optim.AdamW):
    """AdamW that records, before each step, the norm of every gradient it is given to apply."""

    norms: list = []

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)))
        return super().step(closure)


class _NoReferenceWriter(StandInModel):
    """A caller's model with no ``save_reference_checkpoint``: states only."""

    def __getattribute__(self, name):
        if name == "save_reference_checkpoint":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_a_model_without_a_reference_writer_trains_and_resumes_on_its_states(tmp_path):
    """train() documents the model's save_reference_checkpoint as optional: such a run writes its
    states, a ``latest`` whose reference is null (never a name of a file not written) and no
    ace_lora.pt; it once trained to the end and then failed on the final ace_lora.pt write."""
    torch.manual_seed(3)
    model = _NoReferenceWriter()
    data = RandomPairs(model, 8, seed=1)
    config = _config(tmp_path, epochs=1, batch_size=4, checkpoint_every=1, warmup_epochs=0)
    result = train(config, model=model, dataset=data, loss_fn=dense_label_infonce)
    assert result["steps"] == 2 and result["reference"] is None and result["state"] is not None
    run = tmp_path / "run"
    assert not (run / "ace_lora.pt").exists()
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith("ace_lora-")]
    latest = json.loads((run / "checkpoints" / "latest").read_text())
    assert latest["step"] == 2 and latest["reference"] is None and latest["state"] == "state-00000002.pt"
    # Resumed with nothing left to train (the path of a run killed before its final write).
    again = train(_config(tmp_path, epochs=1, batch_size=4, checkpoint_every=1, warmup_epochs=0, resume=str(run)),
                  model=model, dataset=data, loss_fn=dense_label_infonce)
    assert again["steps"] == 2 and again["reference"] is None and again["resumed_from"] is not None
    assert not (run / "ace_lora.pt").exists()


def test_train_loop_writes_metrics_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(_NormRecordingAdamW, "norms", [])
    monkeypatch.setattr(torch.optim, "AdamW", _NormRecordingAdamW)
    model = make_model("standin", seed=3)
    data = RandomPairs(model, 18, seed=1)  # 4 steps per epoch, two samples dropped each epoch
    config = _config(tmp_path)
    result = train(config, model=model, dataset=data, loss_fn=dense_label_infonce)
    assert result["steps"] == 12

    records = read_metrics(result["metrics"])
    assert [r["step"] for r in records] == list(range(1, 13))
    assert result["final_loss"] == records[-1]["loss"] != records[0]["loss"]  # the last step's
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in records)
    # The logged gradient norm is that of every gradient the optimizer applies (each trainable's, logit_scale's too).
    assert [r["grad_norm"] for r in records] == pytest.approx(_NormRecordingAdamW.norms, rel=1e-6)
    # lr of step k (1-based) is lr * factor(k - 1): warm-up over the first epoch, then cosine.
    for r in records:
        assert math.isclose(r["lr"], 1e-2 * cosine_with_warmup(r["step"] - 1, 4, 12), rel_tol=1e-9)
    # Each line's epoch is its step's (0-based, 4 steps each).
    assert [r["epoch"] for r in records] == [(r["step"] - 1) // 4 for r in records]

    ckpt = tmp_path / "run" / "checkpoints"
    latest = json.loads((ckpt / "latest").read_text())
    assert latest["step"] == 12
    names = sorted(os.listdir(ckpt))
    # keep_checkpoints=2: steps 8 and 12 remain; 4 was pruned after 12 became durable.
    assert [n for n in names if n.startswith("state-")] == ["state-00000008.pt", "state-00000012.pt"]
    assert [n for n in names if n.startswith("ace_lora-")] == ["ace_lora-00000008.pt", "ace_lora-00000012.pt"]
    assert not [n for n in names if n.endswith(".tmp")]

    state = load_state(ckpt / "state-00000012.pt")
    assert state["step"] == 12 and state["epoch"] == 2 and state["batch_in_epoch"] == 4
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(state["trainable"][name], p.detach())
    # A line's logit_scale is the multiplier itself (spec section 1: not its log) after its step's update,
    # as the state of that step holds it.
    for step in (8, 12):
        saved = load_state(ckpt / f"state-{step:08d}.pt")["trainable"]["logit_scale"]
        assert records[step - 1]["logit_scale"] == saved.item()
    assert records[7]["logit_scale"] != records[6]["logit_scale"]  # it is learned
    final = torch.load(result["reference"], weights_only=True)
    assert torch.equal(final["logit_scale"], model.logit_scale.detach())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["batch_size"] == 4


def test_a_run_is_adamw_with_its_settings_on_the_cosine_schedule_step_by_step(tmp_path):
    """train() against the recipe written out (spec section 6): per step zero the gradients, the loss of the
    batch, backward, AdamW with the config's lr, betas, eps and weight decay, then the schedule. A batch of the
    whole dataset (one step an epoch) makes the data order irrelevant to the loss (a permutation of its rows).
    The other tests compare runs with runs, so an optimizer that dropped the weight decay (or the betas, or
    kept the last step's gradients) passed them; settings other than the defaults tell those apart."""
    settings = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    model = make_model("standin", dropout=0.0, seed=3)
    data = RandomPairs(model, 8, seed=1)
    ref = make_model("standin", dropout=0.0, seed=3)
    train(_config(tmp_path, epochs=4, batch_size=8, warmup_steps=1, checkpoint_every=0, **settings), model=model,
          dataset=data, loss_fn=dense_label_infonce)
    params = [p for p in ref.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, **settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, 1, 4))
    for _ in range(4):
        optimizer.zero_grad(set_to_none=True)
        dense_label_infonce(ref.encode_image(data.images), ref.encode_text(data.token_ids), ref.logit_scale,
                            data.labels).backward()
        optimizer.step()
        scheduler.step()
    moved = False
    for (name, got), want in zip(training.trainable_named_parameters(model), params, strict=True):
        # Row order changes only the summation order; Adam turns that into at most ~1e-6 of a weight here.
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        moved |= not torch.equal(want.detach(), make_model("standin", dropout=0.0, seed=3).get_parameter(name))
    assert moved


@pytest.mark.parametrize("max_steps,steps", [(6, 6), (50, 12)])
def test_max_steps_caps_the_run_and_the_cosine_spans_the_capped_run(tmp_path, max_steps, steps):
    """TrainConfig.max_steps caps the run's 3 epochs of 4 steps, and the cosine decays over the steps the run
    takes (the capped count, not the epochs'); a cap above the epochs' steps changes nothing."""
    model = make_model("standin", seed=3)
    result = train(_config(tmp_path, max_steps=max_steps, warmup_steps=2, checkpoint_every=0), model=model,
                   dataset=RandomPairs(model, 16, seed=1), loss_fn=dense_label_infonce)
    records = read_metrics(result["metrics"])
    assert result["steps"] == steps and [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert math.isclose(r["lr"], 1e-2 * cosine_with_warmup(r["step"] - 1, 2, steps), rel_tol=1e-9), r


class _RecordingPairs(RandomPairs):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def __getitem__(self, i):
        self.seen.append(int(i))
        return super().__getitem__(i)


def test_train_data_order_is_a_seeded_permutation_per_epoch(tmp_path):
    model = make_model("standin")
    data = _RecordingPairs(model, 12, seed=0)
    train(_config(tmp_path, epochs=2, batch_size=4, checkpoint_every=0), model=model, dataset=data,
          loss_fn=dense_label_infonce)
    first, second = data.seen[:12], data.seen[12:]
    assert sorted(first) == list(range(12)) and sorted(second) == list(range(12))
    assert first != second  # a new order each epoch
    again = _RecordingPairs(make_model("standin"), 12, seed=0)
    train(_config(tmp_path, out_dir=str(tmp_path / "again"), epochs=2, batch_size=4, checkpoint_every=0),
          model=make_model("standin"), dataset=again, loss_fn=dense_label_infonce)
    assert again.seen == data.seen  # the order comes from the seed alone
    # From the run's seed, not a fixed one: another seed, another order (the same model and data).
    other = _RecordingPairs(make_model("standin"), 12, seed=0)
    train(_config(tmp_path, out_dir=str(tmp_path / "other"), epochs=2, batch_size=4, checkpoint_every=0, seed=4),
          model=make_model("standin"), dataset=other, loss_fn=dense_label_infonce)
    assert sorted(other.seen[:12]) == list(range(12)) and other.seen[:12] != data.seen[:12]


def test_a_model_passed_in_eval_mode_is_trained_in_train_mode(tmp_path):
    """train() puts the model it is given in train mode: one left in eval mode by its caller (loaded
    and evaluated first, say) would otherwise train without its dropout, silently. Its losses are
    those of the same model passed in train mode, and they differ from a run without dropout."""
    def losses(out, mode, dropout=0.3):
        model = make_model("standin", seed=3, dropout=dropout).train(mode)
        config = _config(tmp_path, out_dir=str(tmp_path / out), max_steps=4, warmup_steps=1, checkpoint_every=0)
        result = train(config, model=model, dataset=RandomPairs(model, 16, seed=1), loss_fn=dense_label_infonce)
        assert model.training
        return [r["loss"] for r in read_metrics(result["metrics"])]

    in_train_mode = losses("train", True)
    assert losses("eval", False) == in_train_mode
    assert losses("no_dropout", True, dropout=0.0) != in_train_mode  # the dropout is drawn in these steps


class _AugmentingPairs(RandomPairs):
    """RandomPairs drawing one random number per item (as an augmentation would), logged to a file:
    in a loader worker, the draw happens in another process."""

    def __init__(self, *a, log, **k):
        super().__init__(*a, **k)
        self.log = str(log)

    def __getitem__(self, i):
        with open(self.log, "a") as handle:
            handle.write(f"{torch.rand(1).item()!r}\n")
        return super().__getitem__(i)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="loader workers started by fork")
def test_loader_workers_draw_new_augmentations_each_epoch(tmp_path):
    """Each epoch's loader seeds its workers from the run's seed, the epoch and the rank: the
    workers of the next epoch draw other numbers, not the first epoch's again."""
    log = tmp_path / "draws.txt"
    model = make_model("standin")
    train(_config(tmp_path, epochs=2, batch_size=4, num_workers=1, checkpoint_every=0), model=model,
          dataset=_AugmentingPairs(model, 8, seed=0, log=log), loss_fn=dense_label_infonce)
    draws = log.read_text().split()
    assert len(draws) == 16 and len(set(draws)) == 16


class _NoisyPairs(RandomPairs):
    """RandomPairs whose images get noise from the three generators augmentations draw from."""

    def __getitem__(self, i):
        import random

        image, tokens, labels = super().__getitem__(i)
        noise = torch.rand(()).item() + random.random() + float(np.random.rand())
        return image + 0.1 * noise, tokens, labels


def test_the_loader_starts_no_more_workers_than_it_has_batches(monkeypatch):
    """Each worker loads whole batches: workers beyond the epoch's batches load nothing. A large
    --num-workers started them all anyway (--num-workers 99999999999999999999 on 4 batches hung,
    opening thousands of pipes, never training nor erring)."""
    started = []

    class Recorded(Exception):
        pass

    def record(*args, num_workers=0, **kwargs):
        started.append(num_workers)
        raise Recorded

    monkeypatch.setattr(torch.utils.data, "DataLoader", record)
    for workers, expected in ((10**20, 3), (2, 2), (0, 0)):
        with pytest.raises(Recorded):
            training._load_batches([], [[0, 1], [2, 3], [4, 5]], workers, False, 1, (1, 0, 0), 0)
        assert started.pop() == expected


@pytest.mark.skipif(not hasattr(os, "fork"), reason="loader workers started by fork")
def test_a_dataset_that_draws_trains_alike_with_workers_and_resumes_exactly(tmp_path):
    """A dataset's random draws come from a seed per batch (run seed, epoch, rank, batch): the
    same losses in the training process and in two loader workers (each of which would
    otherwise draw from its own stream), and a run resumed mid-epoch with workers continues
    exactly (its workers would otherwise start their streams afresh at the resumed batch)."""
    import shutil

    def run(out_dir, workers, resume=None):
        model = make_model("standin", seed=3)
        config = _config(tmp_path, out_dir=str(out_dir), num_workers=workers, checkpoint_every=1,
                         keep_checkpoints=20, resume=resume)
        result = train(config, model=model, dataset=_NoisyPairs(model, 16, seed=1), loss_fn=dense_label_infonce)
        return [(r["step"], r["loss"]) for r in read_metrics(result["metrics"])]

    in_process = run(tmp_path / "a", 0)
    with_workers = run(tmp_path / "b", 2)
    assert len(in_process) == 12 and with_workers == in_process
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    resumed = run(tmp_path / "c", 2, resume=str(tmp_path / "c" / "checkpoints" / "state-00000006.pt"))  # epoch 2
    assert resumed == with_workers
    # The noise is drawn (the same data without it trains otherwise), and differs between batches.
    plain = train(_config(tmp_path, out_dir=str(tmp_path / "d"), checkpoint_every=0),
                  model=make_model("standin", seed=3), dataset=RandomPairs(make_model("standin", seed=3), 16, seed=1),
                  loss_fn=dense_label_infonce)
    assert [r["loss"] for r in read_metrics(plain["metrics"])] != [loss for _, loss in in_process]
    words = {training.batch_seed_words(3, epoch, rank, batch).tobytes()
             for epoch in range(2) for rank in range(2) for batch in range(4)}
    assert len(words) == 16


def test_train_chunked_equals_unchunked_without_dropout(tmp_path):
    losses = []
    for chunk in (None, 3):
        model = make_model("standin", dropout=0.0, seed=3)
        data = RandomPairs(model, 16, seed=2)
        config = _config(tmp_path, out_dir=str(tmp_path / f"c{chunk}"), batch_size=8, chunk_size=chunk,
                         checkpoint_every=0)
        result = train(config, model=model, dataset=data, loss_fn=dense_label_infonce)
        losses.append([r["loss"] for r in read_metrics(result["metrics"])])
    # Adam amplifies ulp-level gradient differences only mildly over 6 steps.
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("poisoned", ["loss", "gradient norm"])
def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, poisoned):
    """A NaN loss, or a finite loss with a NaN gradient, stops the run before the optimizer step
    would spread it into the weights: no metrics line for that step, the last state kept."""
    model = make_model("standin")
    data = RandomPairs(model, 16, seed=1)
    calls = {"n": 0}

    def poisoned_loss(u, t, s, labels):
        calls["n"] += 1
        loss = dense_label_infonce(u, t, s, labels)
        if calls["n"] != 7:
            return loss
        if poisoned == "loss":
            return loss * float("nan")
        # Adds 0, but the branch where() leaves out has a NaN derivative: 0 * NaN reaches s.grad.
        return loss + torch.where(torch.tensor(True), 0.0 * s, torch.sqrt(s - 100.0))

    config = _config(tmp_path, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=rf"non-finite {poisoned} at step 7 .*state-00000006\.pt"):
        train(config, model=model, dataset=data, loss_fn=poisoned_loss)
    ckpt = tmp_path / "run" / "checkpoints"
    assert json.loads((ckpt / "latest").read_text())["step"] == 6
    state = load_state(ckpt / "state-00000006.pt")
    assert state["step"] == 6
    # Metrics of the six good steps are kept; nothing for step 7.
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 7))
    # And the run resumes from there.
    calls["n"] = -100
    result = train(_config(tmp_path, checkpoint_every=2, resume="auto"), model=make_model("standin"), dataset=data,
                   loss_fn=poisoned_loss)
    assert result["steps"] == 12 and result["resumed_from"].endswith("state-00000006.pt")


class _PoisonedAdamW(torch.optim.AdamW):
    """AdamW whose step number ``poison_at`` leaves a NaN in a weight, as an update that overflows
    would, after a finite loss and finite gradients."""

    poison_at = 0

    def step(self, closure=None):
        result = super().step(closure)
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        if self.steps_taken == self.poison_at:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result


@pytest.mark.parametrize("poison_at,checkpoint_every,last_good", [
    (4, 2, "state-00000002.pt"),  # a checkpoint step: its state must not be written
    (12, 0, "none written"),  # the last step: neither its state nor ace_lora.pt
])
def test_non_finite_weights_after_a_step_are_never_saved(tmp_path, monkeypatch, poison_at, checkpoint_every,
                                                         last_good):
    monkeypatch.setattr(_PoisonedAdamW, "poison_at", poison_at)
    monkeypatch.setattr(torch.optim, "AdamW", _PoisonedAdamW)
    model = make_model("standin")
    with pytest.raises(NonFiniteLossError, match=rf"parameters after the optimizer step of step {poison_at} .*"
                                                 rf"Last good state: .*{last_good}"):
        train(_config(tmp_path, checkpoint_every=checkpoint_every), model=model, dataset=RandomPairs(model, 16, seed=1),
              loss_fn=dense_label_infonce)
    ckpt = tmp_path / "run" / "checkpoints"
    states = sorted(n for n in os.listdir(ckpt) if n.startswith("state-")) if ckpt.exists() else []
    assert states == ([] if last_good == "none written" else [last_good])
    assert not (tmp_path / "run" / "ace_lora.pt").exists()


class _Stopped(Exception):
    pass


def _stop_after(function, calls):
    """``function``, raising _Stopped after its ``calls``-th call returns."""
    done = []

    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        done.append(1)
        if len(done) == calls:
            raise _Stopped
        return result

    return wrapped


def test_a_non_finite_step_after_a_resume_does_not_call_the_resumed_state_good(tmp_path, monkeypatch):
    """Nothing since the resume has checked the state it loaded (a corrupt one can load): the
    message names it as the one resumed from and says to go further back if that fails alike."""
    model = make_model("standin")
    data = RandomPairs(model, 16, seed=1)
    monkeypatch.setattr(training, "_checkpoint", _stop_after(training._checkpoint, 1))  # a run killed after state 2
    with pytest.raises(_Stopped):
        train(_config(tmp_path, checkpoint_every=2), model=model, dataset=data, loss_fn=dense_label_infonce)
    monkeypatch.undo()
    monkeypatch.setattr(_PoisonedAdamW, "poison_at", 1)
    monkeypatch.setattr(torch.optim, "AdamW", _PoisonedAdamW)
    with pytest.raises(NonFiniteLossError, match=r"Last state: .*state-00000002\.pt, the one this run resumed from "
                                                 r"\(if resuming from it fails the same way, resume from an earlier"):
        train(_config(tmp_path, checkpoint_every=2, resume="auto"), model=make_model("standin"), dataset=data,
              loss_fn=dense_label_infonce)


@pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")
def test_eps_zero_is_refused_and_its_nan_weights_never_saved(tmp_path, monkeypatch):
    """AdamW with eps = 0 turns the LoRA A weights into 0/0 at the first step (their gradient is
    exactly 0 while B is still 0), with a finite loss and gradient norm."""
    from ace_model.data import make_synthetic_dataset

    csv_path = make_synthetic_dataset(tmp_path / "data", 8, seed=0)
    config = TrainConfig(csv=str(csv_path), out_dir=str(tmp_path / "run"), model="tiny", epochs=2, batch_size=4,
                         eps=0.0, checkpoint_every=1, progress=False, seed=0)
    with pytest.raises(ValueError, match=r"^TrainConfig\.eps: expected a finite number > 0, got 0\.0"):
        train(config)
    assert not (tmp_path / "run").exists()
    # Past the check (as a caller's own optimizer settings could be), the weights are caught after the step.
    monkeypatch.setattr(TrainConfig, "validate", lambda self: None)
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*lora_a.*Last good state: none written"):
        train(config)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "ace_lora.pt").exists()


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")
@pytest.mark.parametrize("default", ["float64 dtype", "bfloat16 dtype", "meta device"])
def test_a_run_does_not_depend_on_torch_defaults(tmp_path, default):
    """train() builds its model in float32 on the CPU and moves it to config.device, whatever
    torch.set_default_dtype or torch.set_default_device says (a torch.device context stands in
    for a CUDA default here). Under a float64 or bfloat16 default the model followed it and the
    first float32 image batch failed in the patch embedding ("Input type (float) and bias type
    (double) should be the same"); under another default device the model, its data and its
    digests were made there ("Cannot copy out of meta tensor"). The losses are those of the
    usual defaults, bit for bit, and the caller's defaults are back afterwards."""
    from ace_model.data import make_synthetic_dataset

    csv_path = make_synthetic_dataset(tmp_path / "data", 8, seed=0)

    def losses(name):
        # On the CPU: "auto" would take a GPU where there is one, whose atomics (the attention backward's)
        # may change the second step's loss in its last bits between two runs.
        config = TrainConfig(csv=str(csv_path), out_dir=str(tmp_path / name), model="tiny", epochs=1, batch_size=4,
                             warmup_steps=0, progress=False, seed=0, device="cpu")
        return [record["loss"] for record in read_metrics(train(config)["metrics"]) if "loss" in record]

    want = losses("usual")
    assert len(want) == 2
    kind, what = default.split()
    context = _default_dtype(getattr(torch, kind)) if what == "dtype" else torch.device(kind)
    with context:
        got = losses("other")
        assert torch.empty(1).dtype == (getattr(torch, kind) if what == "dtype" else torch.float32)
        assert torch.empty(1).device.type == ("cpu" if what == "dtype" else kind)
    assert got == want
    assert torch.empty(1).dtype == torch.float32 and torch.empty(1).device.type == "cpu"


def test_use_labels_false_trains_a_labelled_dataset_with_the_plain_clip_loss(tmp_path):
    """A dataset passed to train() with labels (as a CSV one with label columns) and use_labels=False
    (--no-labels): every step's loss gets no labels, the plain CLIP loss. Only CSV runs had been tried, whose
    dataset then reads no label columns: a loop that passed a caller's labels on anyway trained the
    label-guided loss unnoticed."""
    for use_labels in (False, True):
        seen = []

        def loss_fn(image_emb, text_emb, logit_scale, labels=None):
            seen.append(labels)
            return dense_label_infonce(image_emb, text_emb, logit_scale, labels)

        model = make_model("standin", seed=3)
        train(_config(tmp_path, out_dir=str(tmp_path / f"run-{use_labels}"), epochs=1, checkpoint_every=0,
                      warmup_epochs=0, use_labels=use_labels),
              model=model, dataset=RandomPairs(model, 8, seed=1), loss_fn=loss_fn)
        assert len(seen) == 2
        assert all((labels is not None) == use_labels for labels in seen), use_labels


def _pairs_csv(tmp_path, name: str, column: str | None = None, cell=lambda row: "") -> dict:
    """A one-step tiny run's config on 4 synthetic pairs (image and text columns only) written to
    ``name``, with one more column ``column`` holding ``cell(row)`` when given."""
    import csv

    from ace_model.data import make_synthetic_dataset

    labelled = make_synthetic_dataset(tmp_path / "data", 4, seed=0)
    with open(labelled, newline="") as handle:
        rows = [row[:2] for row in csv.reader(handle)]
    if column is not None:
        rows = [rows[0] + [column]] + [row + [cell(i)] for i, row in enumerate(rows[1:])]
    path = labelled.with_name(name)
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    # (No warm-up: a one-step run with one would be all warm-up, and say so.)
    return dict(csv=str(path), model="tiny", epochs=1, batch_size=4, checkpoint_every=0, progress=False, seed=0,
                warmup_steps=0)


@pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")
def test_a_csv_without_usable_labels_trains_and_says_so(tmp_path):
    config = _pairs_csv(tmp_path, "plain.csv")
    with pytest.warns(UserWarning, match=r"TrainConfig\.csv: .*plain\.csv' has no label columns: training with "
                                         r"the plain CLIP loss \(as use_labels=False, --no-labels\)"):
        assert train(TrainConfig(out_dir=str(tmp_path / "a"), **config))["steps"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        assert train(TrainConfig(out_dir=str(tmp_path / "b"), use_labels=False, **config))["steps"] == 1
    # Label columns whose rows are all alike (all empty, say): every negative is masked.
    config = _pairs_csv(tmp_path, "same.csv", "a")
    with pytest.warns(UserWarning, match=r"TrainConfig\.csv: every row of .*same\.csv' has the same labels: the "
                                         r"label-guided loss masks every other sample"):
        assert train(TrainConfig(out_dir=str(tmp_path / "c"), **config))["steps"] == 1


@pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")
def test_without_labels_other_columns_are_not_read_as_labels(tmp_path):
    from ace_model.data import DataError

    # Metadata beside the pairs (MIMIC-CXR's study ids): no labels, so nothing the plain CLIP loss reads.
    config = _pairs_csv(tmp_path, "study.csv", "study_id", lambda row: f"s{row}")
    assert train(TrainConfig(out_dir=str(tmp_path / "a"), use_labels=False, **config))["steps"] == 1
    with pytest.raises(DataError, match=r"row 1: label column 'study_id' holds 's0'"):  # with labels it is one
        train(TrainConfig(out_dir=str(tmp_path / "b"), **config))


def test_bf16_on_the_cpu_is_refused_before_any_file_is_written(tmp_path):
    model = make_model("standin")
    with pytest.raises(ValueError, match=r"^TrainConfig\.precision: 'bf16' autocast needs a CUDA device, but this "
                                         r"process runs on cpu \(TrainConfig\.device 'cpu'\)"):
        train(_config(tmp_path, precision="bf16", device="cpu"), model=model, dataset=RandomPairs(model, 8),
              loss_fn=dense_label_infonce)
    assert not (tmp_path / "run").exists()


def test_a_warm_up_of_more_steps_than_a_float_holds_is_refused_before_any_file_is_written(tmp_path):
    """validate() takes any finite warmup_epochs; 1e308 epochs of 2 steps is inf steps, and the step count
    was an OverflowError (a traceback from ace-lora train) instead of an error naming the setting."""
    model = make_model("standin")
    with pytest.raises(ValueError, match=r"^TrainConfig\.warmup_epochs: 1e\+308 epochs of 2 steps each overflows "
                                         r"a float; expected"):
        train(_config(tmp_path, warmup_epochs=1e308), model=model, dataset=RandomPairs(model, 8),
              loss_fn=dense_label_infonce)
    assert not (tmp_path / "run").exists()


def test_a_warm_up_of_a_huge_whole_number_of_epochs_still_runs(tmp_path):
    """An int warmup_epochs times the steps is an exact int however large (the warm-up then never ends,
    as for any warm-up longer than the run): 10**308 epochs ran before the float overflow check, which
    then raised OverflowError ('int too large to convert to float') converting the product."""
    model = make_model("standin")
    with pytest.warns(UserWarning, match="end within its 2000"):
        result = train(_config(tmp_path, warmup_epochs=10**308, epochs=1), model=model,
                       dataset=RandomPairs(model, 8), loss_fn=dense_label_infonce)
    rates = [record["lr"] for record in read_metrics(result["metrics"]) if "loss" in record]
    assert len(rates) == 2 and all(0 < rate < 1e-300 for rate in rates), rates


@pytest.mark.skipif(not hasattr(os, "fork"), reason="flock and fork are POSIX")
def test_a_second_run_into_a_busy_out_dir_stops_naming_the_first(tmp_path):
    """Rank 0 holds out_dir/.train.lock while it writes there: a second run on the same directory
    (here a process holding the lock) stops before it writes anything, naming the holder; once
    the holder dies (SIGKILL: the system releases the lock) a run goes through."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from ace_model.training import _lock_out_dir\n"
         f"with _lock_out_dir(Path({str(out)!r})):\n print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(training.__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")) if p)})
    # The holder's writes in flight: their temp files are the clean-up's names, but not stale while it runs
    # (deleting them would fail its renames).
    in_flight = [out / ".config.json.0123456789ab.tmp", out / "checkpoints" / ".state-00000004.pt.0123456789ab.tmp"]
    in_flight[1].parent.mkdir()
    for path in in_flight:
        path.write_bytes(b"half written")
    try:
        assert holder.stdout.readline().strip() == "held"
        data = RandomPairs(make_model("standin"), 8, seed=1)
        with pytest.raises(ValueError, match=rf"^TrainConfig\.out_dir: '.*run' is being written by another training "
                                             rf"run \(pid {holder.pid} on .+, since .+\); wait for it to end, or "
                                             r"choose another directory$"):
            train(_config(tmp_path, epochs=1), model=make_model("standin"), dataset=data, loss_fn=dense_label_infonce)
        # nothing of the run written, nothing of the holder's removed
        assert sorted(p.name for p in out.iterdir()) == sorted([training.LOCK_NAME, "checkpoints", in_flight[0].name])
        assert all(path.read_bytes() == b"half written" for path in in_flight)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # The next holder replaces the dead one's line, even a longer one (a longer host name).
    (out / training.LOCK_NAME).write_text(f"pid {holder.pid} on {'a-much-longer-host-name.' * 4}, since 2020\n")
    result = train(_config(tmp_path, epochs=1), model=make_model("standin"), dataset=data, loss_fn=dense_label_infonce)
    assert result["steps"] == 2
    assert not any(path.exists() for path in in_flight)  # stale once the holder is dead: removed
    assert re.fullmatch(rf"pid {os.getpid()} on [^\n]+, since [^\n]+\n", (out / training.LOCK_NAME).read_text())
    with training._lock_out_dir(out):  # the run let go of it when it ended
        pass


@pytest.mark.skipif(not hasattr(os, "fork"), reason="flock and fork are POSIX")
def test_a_forked_child_does_not_keep_the_out_dir_lock(tmp_path):
    """flock belongs to the open file, which a fork shares: a DataLoader worker still alive after a
    failed run (a kept traceback keeps it) held the lock. Children point their copy at /dev/null."""
    import signal

    ready, tell = os.pipe()
    with training._lock_out_dir(tmp_path):
        child = os.fork()
        if child == 0:  # a worker that outlives the run (its fork hooks have run once it is here)
            os.write(tell, b"x")
            signal.pause()
            os._exit(0)
        assert os.read(ready, 1) == b"x"
    try:
        with training._lock_out_dir(tmp_path):  # free again, with the child alive
            pass
        assert os.waitpid(child, os.WNOHANG) == (0, 0)  # still running
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready)
        os.close(tell)


def test_a_run_that_appears_in_out_dir_during_set_up_is_not_overwritten(tmp_path, monkeypatch):
    """Between the set-up's check and the lock another run may finish in out_dir: a fresh run (even
    with resume='auto', which found nothing to resume at set-up) refuses instead of writing over it."""
    other = tmp_path / "other"
    data = RandomPairs(make_model("standin"), 8, seed=1)
    train(_config(tmp_path, epochs=1, out_dir=str(other)), model=make_model("standin"), dataset=data,
          loss_fn=dense_label_infonce)
    out = tmp_path / "run"
    make_dirs = training.makedirs_durable

    def other_run_lands(path):  # the writer's makedirs_durable(out_dir), just before it takes the lock
        make_dirs(path)
        if Path(path) == out and not (out / "ace_lora.pt").exists():
            import shutil

            shutil.copytree(other / "checkpoints", out / "checkpoints")
            shutil.copy(other / "ace_lora.pt", out / "ace_lora.pt")

    monkeypatch.setattr(training, "makedirs_durable", other_run_lands)
    kept = (out / "ace_lora.pt")
    with pytest.raises(ValueError, match=r"^TrainConfig\.out_dir: '.*run' now holds another run \(checkpoints/latest "
                                         r"and ace_lora\.pt\), written there while this run was being set up"):
        train(_config(tmp_path, epochs=1, resume="auto"), model=make_model("standin"), dataset=data,
              loss_fn=dense_label_infonce)
    assert kept.read_bytes() == (other / "ace_lora.pt").read_bytes()
    assert not (out / "metrics.jsonl").exists()


def test_resume_refuses_a_corrupt_state_and_keeps_the_final_weights(tmp_path):
    """A state whose weights (or optimizer moments) hold NaN or infinity is refused on resume:
    with no step left to train, its weights went to ace_lora.pt over the good ones (exit 0). So is
    a weight of another shape (copy_ would broadcast a [1, n] row over an [m, n] parameter) and a
    negative step count (as a negative second moment, AdamW never writes one)."""
    model = make_model("standin")
    data = RandomPairs(model, 8, seed=1)
    train(_config(tmp_path, epochs=1, checkpoint_every=1), model=model, dataset=data, loss_fn=dense_label_infonce)
    final = tmp_path / "run" / "ace_lora.pt"
    good = final.read_bytes()
    path = tmp_path / "run" / "checkpoints" / "state-00000002.pt"
    good_state = path.read_bytes()
    name = next(iter(load_state(path)["trainable"]))
    matrix, weight = next((n, v) for n, v in load_state(path)["trainable"].items() if v.dim() == 2)
    rows, columns = weight.shape
    corruptions = {
        "nan": (lambda s: s["trainable"][name].view(-1).__setitem__(0, float("nan")),
                rf"the state's weights hold NaN or infinity \({re.escape(name)}\)"),
        # finite in float64, infinite in the float32 parameter
        "overflow": (lambda s: s["trainable"].__setitem__(name, s["trainable"][name].double().fill_(1e300)),
                     rf"the state's weights hold NaN or infinity \({re.escape(name)}\)"),
        "moment": (lambda s: s["optimizer"]["state"][0]["exp_avg_sq"].fill_(float("inf")),
                   rf"the optimizer's 'exp_avg_sq' of {re.escape(name)} holds NaN or infinity"),
        # finite, but AdamW's sqrt of it is NaN at the first step (a flipped sign bit)
        "negative moment": (lambda s: s["optimizer"]["state"][0]["exp_avg_sq"].view(-1)[:1].fill_(-1e-8),
                            rf"the optimizer's 'exp_avg_sq' of {re.escape(name)} holds a negative value"),
        "negative step": (lambda s: s["optimizer"]["state"][0]["step"].neg_(),
                          rf"the optimizer's 'step' of {re.escape(name)} holds a negative value"),
        "shape": (lambda s: s["trainable"].__setitem__(matrix, s["trainable"][matrix][:1].clone()),
                  rf"'{re.escape(matrix)}' expected a tensor of shape \[{rows}, {columns}\], found \[1, {columns}\]"),
        # as many values, another shape: copy_ raised its own RuntimeError, naming neither file nor parameter
        "transposed": (lambda s: s["trainable"].__setitem__(matrix, s["trainable"][matrix].t().contiguous()),
                       rf"'{re.escape(matrix)}' expected a tensor of shape \[{rows}, {columns}\], found "
                       rf"\[{columns}, {rows}\]"),
    }
    for corrupt, pattern in corruptions.values():
        path.write_bytes(good_state)
        bad = load_state(path)
        corrupt(bad)
        torch.save(bad, path)
        with pytest.raises(training.TrainingStateError, match=rf"^resume from .*state-00000002\.pt: {pattern}"):
            train(_config(tmp_path, epochs=1, checkpoint_every=1, resume="auto"), model=make_model("standin"),
                  dataset=data, loss_fn=dense_label_infonce)
        assert final.read_bytes() == good
    # One bit flipped inside a stored tensor: torch.load reads it as another number; the zip's CRC-32 tells.
    path.write_bytes(good_state)
    member = flip_a_bit_in_a_stored_tensor(path)
    with pytest.raises(training.TrainingStateError,
                       match=rf"state-00000002\.pt: cannot be read as a training state: its member "
                             rf"'{re.escape(member)}' fails its CRC-32 check"):
        train(_config(tmp_path, epochs=1, checkpoint_every=1, resume="auto"), model=make_model("standin"),
              dataset=data, loss_fn=dense_label_infonce)
    assert final.read_bytes() == good
    path.write_bytes(good_state)  # resumes, with nothing left to train
    result = train(_config(tmp_path, epochs=1, checkpoint_every=1, resume="auto"), model=make_model("standin"),
                   dataset=data, loss_fn=dense_label_infonce)
    assert result["steps"] == 2 and result["resumed_from"].endswith("state-00000002.pt")


def test_resume_refuses_a_different_run(tmp_path):
    model = make_model("standin")
    data = RandomPairs(model, 8, seed=1)
    train(_config(tmp_path, epochs=1), model=model, dataset=data, loss_fn=dense_label_infonce)
    with pytest.raises(ValueError, match=r": TrainConfig\.lr was 0\.01 in the saved run, now 0\.005; resuming would "
                                         r"not continue the same run$"):
        train(_config(tmp_path, epochs=1, lr=5e-3, resume="auto"), model=make_model("standin"), dataset=data,
              loss_fn=dense_label_infonce)
    # max_steps sets the cosine's length: another one is another schedule.
    with pytest.raises(ValueError, match=r": TrainConfig\.max_steps was None in the saved run, now 1; "):
        train(_config(tmp_path, epochs=1, max_steps=1, resume="auto"), model=make_model("standin"), dataset=data,
              loss_fn=dense_label_infonce)
    with pytest.raises(FileNotFoundError, match=r"^TrainConfig\.resume: '.*missing\.pt' does not exist$"):
        train(_config(tmp_path, resume=str(tmp_path / "missing.pt")), model=make_model("standin"), dataset=data,
              loss_fn=dense_label_infonce)
    # One process has one slice: the loss scope changes nothing there, and a resume may name either.
    result = train(_config(tmp_path, epochs=1, loss_scope="local", resume="auto"), model=make_model("standin"),
                   dataset=data, loss_fn=dense_label_infonce)
    assert result["resumed_from"] is not None


def test_resume_with_another_chunk_size_continues_and_warns(tmp_path):
    """chunk_size may change on resume (a memory setting), but the losses from there are not the
    uninterrupted run's (other dropout masks): the resume says so and goes on to the end; a resume
    with the same chunk size says nothing."""
    import warnings

    data = RandomPairs(make_model("standin"), 16, seed=1)  # 4 steps per epoch, 8 in all
    config = dict(epochs=2, chunk_size=4, checkpoint_every=2, keep_checkpoints=10)
    train(_config(tmp_path, **config), model=make_model("standin"), dataset=data, loss_fn=dense_label_infonce)
    state = str(tmp_path / "run" / "checkpoints" / "state-00000004.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = train(_config(tmp_path, **config, resume=state), model=make_model("standin"), dataset=data,
                     loss_fn=dense_label_infonce)
    assert same["steps"] == 8
    with warnings.catch_warnings():  # a chunk of the whole batch is the one-pass step, as None is
        warnings.simplefilter("error")
        train(_config(tmp_path, **{**config, "chunk_size": None}, resume=state, out_dir=str(tmp_path / "b")),
              model=make_model("standin"), dataset=data, loss_fn=dense_label_infonce)
    with pytest.warns(UserWarning, match=r"TrainConfig\.chunk_size was 4, now 2; the run continues, but its losses "
                                         r"will differ from an uninterrupted run's"):
        other = train(_config(tmp_path, **{**config, "chunk_size": 2}, resume=state), model=make_model("standin"),
                      dataset=data, loss_fn=dense_label_infonce)
    assert other["steps"] == 8


def test_resume_on_another_kind_of_device_continues_and_warns(tmp_path):
    """A state written on a GPU holds the CUDA generator its dropout masks came from, one written on
    the CPU none: resumed on the other kind of device the losses are not the uninterrupted run's,
    and the resume says so (as for another chunk size) and goes on; on the same kind it says nothing."""
    data = RandomPairs(make_model("standin"), 16, seed=1)
    config = dict(epochs=2, checkpoint_every=2, keep_checkpoints=10)
    train(_config(tmp_path, **config), model=make_model("standin"), dataset=data, loss_fn=dense_label_infonce)
    state_path = tmp_path / "run" / "checkpoints" / "state-00000004.pt"
    state = load_state(state_path)
    assert state["rng"][0]["cuda"] is None
    same, record = TrainConfig.from_dict(state["config"]), training._dataset_record(data, 16, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training._check_resume_config(state, same, 1, record, "s.pt", device=torch.device("cpu"))
    with pytest.warns(UserWarning, match=r"^resume from s\.pt: the saved run ran on the CPU, this one on cuda:1; "
                                         r"the run continues, but its losses will differ from an uninterrupted run's"):
        training._check_resume_config(state, same, 1, record, "s.pt", device=torch.device("cuda", 1))
    # A state of another number of processes is refused as such, before its ranks' generators are read.
    with pytest.raises(training.TrainingStateError, match=r"the state was written by 1 processes, this run has 2$"):
        training._check_resume_config(state, same, 2, record, "s.pt", rank=1, device=torch.device("cpu"))
    state["rng"][0]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # as a GPU run's state holds its generator's
    torch.save(state, state_path)
    with pytest.warns(UserWarning, match=rf"^resume from {state_path}: the saved run ran on a CUDA GPU, this one "
                                         r"on cpu; the run continues"):
        resumed = train(_config(tmp_path, **config, resume=str(state_path)), model=make_model("standin"),
                        dataset=data, loss_fn=dense_label_infonce)
    assert (resumed["steps"], resumed["resumed_from"]) == (8, str(state_path))


def test_resume_refuses_a_dataset_of_another_size(tmp_path):
    model = make_model("standin")
    train(_config(tmp_path, epochs=2), model=model, dataset=RandomPairs(model, 8, seed=1), loss_fn=dense_label_infonce)
    state_path = tmp_path / "run" / "checkpoints" / "state-00000004.pt"
    state = load_state(state_path)
    assert (state["dataset_length"], state["steps_per_epoch"]) == (8, 2)
    for n, steps in ((12, 3), (9, 2)):  # the length is checked even when the steps per epoch agree
        with pytest.raises(training.TrainingStateError,
                           match=rf"resume from {state_path}: the saved run's dataset had 8 samples \(2 steps per "
                                 rf"epoch\), this run's has {n} \({steps} steps per epoch\)"):
            train(_config(tmp_path, epochs=2, resume="auto"), model=make_model("standin"),
                  dataset=RandomPairs(model, n, seed=1), loss_fn=dense_label_infonce)


class _FingerprintedPairs(RandomPairs):
    """RandomPairs whose fingerprint names its seed, as a CSV dataset's names its rows."""

    def __init__(self, model, n, *, seed):
        super().__init__(model, n, seed=seed)
        self.seed = seed

    def fingerprint(self):
        return hashlib.sha256(str(self.seed).encode()).hexdigest()


def test_resume_refuses_a_dataset_with_other_content(tmp_path):
    model = make_model("standin")
    train(_config(tmp_path), model=model, dataset=_FingerprintedPairs(model, 8, seed=1), loss_fn=dense_label_infonce)
    state_path = tmp_path / "run" / "checkpoints" / "state-00000004.pt"
    one, two = (hashlib.sha256(str(seed).encode()).hexdigest() for seed in (1, 2))
    assert load_state(state_path)["dataset_fingerprint"] == one
    resume = _config(tmp_path, resume=str(state_path))
    with pytest.raises(training.TrainingStateError,
                       match=rf"resume from {state_path}: the dataset's content differs from the saved run's "
                             rf"\(same 8 samples, but fingerprint {two[:12]}\.\.\. instead of {one[:12]}\.\.\."):
        train(resume, model=make_model("standin"), dataset=_FingerprintedPairs(model, 8, seed=2),
              loss_fn=dense_label_infonce)
    # The same content resumes; so does a dataset with no fingerprint (nothing to compare).
    for same in (_FingerprintedPairs(model, 8, seed=1), RandomPairs(model, 8, seed=1)):
        result = train(resume, model=make_model("standin"), dataset=same, loss_fn=dense_label_infonce)
        assert (result["steps"], result["resumed_from"]) == (6, str(state_path))


def test_resume_refuses_other_frozen_weights(tmp_path):
    """The frozen towers are the run's too: a resume on other ones (pretrained weights found anew
    under the same path, from another folder or replaced) would train the LoRA factors for other
    towers. Their digest is saved and compared; the same towers resume."""
    data = RandomPairs(make_model("standin"), 8, seed=1)
    train(_config(tmp_path), model=make_model("standin"), dataset=data, loss_fn=dense_label_infonce)
    state_path = tmp_path / "run" / "checkpoints" / "state-00000004.pt"
    saved = load_state(state_path)["frozen_weights_digest"]
    assert saved == training._frozen_weights_digest(make_model("standin"))
    other = make_model("standin", seed=1)  # other frozen (and trainable) weights
    resume = _config(tmp_path, resume=str(state_path))
    with pytest.raises(training.TrainingStateError,
                       match=rf"^resume from {state_path}: the frozen weights differ from the saved run's \(digest "
                             rf"\w{{12}}\.\.\. instead of {saved[:12]}\.\.\.\): the frozen towers built now are not "
                             r"the saved run's .*; resuming would not continue the same run$"):
        train(resume, model=other, dataset=data, loss_fn=dense_label_infonce)
    result = train(resume, model=make_model("standin"), dataset=data, loss_fn=dense_label_infonce)
    assert (result["steps"], result["resumed_from"]) == (6, str(state_path))


def test_each_rank_compares_its_own_chunk_size_on_resume():
    """Ranks may differ in chunk_size, and the saved config is rank 0's: a state records every
    rank's, and a resume warns on the rank whose own chunk size changed, not on one that kept
    its own (comparing rank 0's, rank 1 warned when nothing changed and said nothing when its
    chunk size did). A state that recorded rank 0's alone compares that, as before."""
    import warnings

    state = {"config": TrainConfig(batch_size=8, chunk_size=2).to_dict(), "world_size": 2, "chunk_sizes": [2, None]}
    record = {"dataset_length": 8, "steps_per_epoch": 1, "dataset_fingerprint": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training._check_resume_config(state, TrainConfig(batch_size=8, chunk_size=2), 2, record, "s.pt", rank=0)
        training._check_resume_config(state, TrainConfig(batch_size=8, chunk_size=None), 2, record, "s.pt", rank=1)
        training._check_resume_config(state, TrainConfig(batch_size=8, chunk_size=4), 2, record, "s.pt", rank=1)
    with pytest.warns(UserWarning, match=r"TrainConfig\.chunk_size was None, now 2; the run continues"):
        training._check_resume_config(state, TrainConfig(batch_size=8, chunk_size=2), 2, record, "s.pt", rank=1)
    del state["chunk_sizes"]
    with pytest.warns(UserWarning, match=r"TrainConfig\.chunk_size was 2, now None; the run continues"):
        training._check_resume_config(state, TrainConfig(batch_size=8, chunk_size=None), 2, record, "s.pt", rank=1)


def test_a_state_of_another_number_of_processes_is_refused():
    """The state holds one generator snapshot per rank and each rank's dropout stream: resumed by
    another number of processes, the run would not be the one saved, whichever way the count changed."""
    record = {"dataset_length": 8, "steps_per_epoch": 1, "dataset_fingerprint": None}
    for saved, now in ((2, 1), (1, 2)):
        state = {"config": TrainConfig(batch_size=8).to_dict(), "world_size": saved}
        with pytest.raises(training.TrainingStateError, match=rf"^resume from s\.pt: the state was written by "
                                                              rf"{saved} processes, this run has {now}$"):
            training._check_resume_config(state, TrainConfig(batch_size=8), now, record, "s.pt")


def test_a_no_labels_state_from_before_label_columns_were_skipped_still_resumes(tmp_path):
    """Until 2026-12-03 a use_labels=False run parsed every column beside image and text as labels
    and its state's dataset fingerprint holds them; the same CSV now reads no label column. Such a
    state resumes (its fingerprint is the with-labels parse's); another CSV's is still refused."""
    from ace_model.data import CSVImageTextDataset, make_synthetic_dataset

    csv_path = make_synthetic_dataset(tmp_path / "data", 4, seed=0)
    other_csv = make_synthetic_dataset(tmp_path / "other", 4, seed=1)
    with_labels = CSVImageTextDataset(csv_path, tokenizer=None)
    now = CSVImageTextDataset(csv_path, tokenizer=None, label_columns=[]).fingerprint()
    assert with_labels.label_columns and with_labels.fingerprint() != now
    config = TrainConfig(csv=str(csv_path), use_labels=False, batch_size=4)
    record = {"dataset_length": 4, "steps_per_epoch": 1, "dataset_fingerprint": now}
    state = {"config": config.to_dict(), "world_size": 1, "dataset_length": 4, "steps_per_epoch": 1,
             "dataset_fingerprint": with_labels.fingerprint()}
    training._check_resume_config(state, config, 1, record, "s.pt")
    state["dataset_fingerprint"] = CSVImageTextDataset(other_csv, tokenizer=None).fingerprint()
    with pytest.raises(training.TrainingStateError, match=r"the dataset's content differs from the saved run's"):
        training._check_resume_config(state, config, 1, record, "s.pt")
    # A labelled run has no such past: its fingerprint has always held the labels.
    labelled = TrainConfig(csv=str(csv_path), batch_size=4)
    state = {"config": labelled.to_dict(), "world_size": 1, "dataset_length": 4, "steps_per_epoch": 1,
             "dataset_fingerprint": now}
    with pytest.raises(training.TrainingStateError, match=r"the dataset's content differs from the saved run's"):
        training._check_resume_config(state, labelled, 1, dict(record, dataset_fingerprint=with_labels.fingerprint()),
                                      "s.pt")


def test_only_rank_0_compares_the_frozen_weights_on_resume():
    """The saved digest is rank 0's, and every rank trains the weights rank 0 broadcasts: the other
    ranks skip the comparison, so their own copies under their own paths (a per-rank field) resume.
    A state without a digest (written before it was recorded) compares the path on every rank."""
    digest = "a" * 64
    state = {"config": TrainConfig(pretrained="/r0/w.pt").to_dict(), "world_size": 2, "frozen_weights_digest": digest}
    record = {"dataset_length": 8, "steps_per_epoch": 1, "dataset_fingerprint": None}
    own_copy = TrainConfig(pretrained="/r1/w.pt")
    training._check_resume_config(state, own_copy, 2, record, "s.pt", None, rank=1)
    training._check_resume_config(state, own_copy, 2, record, "s.pt", digest, rank=0)
    with pytest.raises(training.TrainingStateError, match=r"the frozen weights differ from the saved run's"):
        training._check_resume_config(state, own_copy, 2, record, "s.pt", "b" * 64, rank=0)
    del state["frozen_weights_digest"]
    for rank, frozen in ((0, digest), (1, None)):
        with pytest.raises(training.TrainingStateError,
                           match=r"TrainConfig.pretrained was '/r0/w.pt' in the saved run, now '/r1/w.pt'"):
            training._check_resume_config(state, own_copy, 2, record, "s.pt", frozen, rank=rank)


def test_version_1_state_without_the_new_fields_still_resumes_exactly(tmp_path):
    """A state written before dataset_length/steps_per_epoch/checkpoint_steps existed. The state
    files up to its step count as its run's checkpoints, itself included: pruned as any other
    once keep_checkpoints newer ones exist. One of a later step (another run's, which went on
    further) is not its run's: counted, it would have been kept as the newest and the resumed
    run's own state pruned."""
    import shutil

    def run(out_dir, resume=None, **overrides):
        model = make_model("standin", seed=3)
        result = train(_config(tmp_path, out_dir=str(out_dir), resume=resume, **overrides), model=model,
                       dataset=RandomPairs(model, 16, seed=1), loss_fn=dense_label_infonce)
        return read_metrics(result["metrics"])

    uninterrupted = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    old = tmp_path / "b" / "checkpoints" / "state-00000008.pt"
    state = load_state(old)
    for key in ("dataset_length", "steps_per_epoch", "checkpoint_steps", "pruned_steps"):
        del state[key]
    state["version"] = 1
    torch.save(state, old)
    later = tmp_path / "b" / "checkpoints" / "state-00000016.pt"
    shutil.copy(tmp_path / "a" / "checkpoints" / "state-00000012.pt", later)
    resumed = run(tmp_path / "b", resume=str(old), keep_checkpoints=1)
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in uninterrupted]
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("state-*")) == ["state-00000012.pt",
                                                                                        later.name]


def test_an_unreadable_or_corrupt_latest_state_names_the_earlier_state_to_resume_from(tmp_path):
    """--resume auto takes only the state latest names; when that one is truncated (or holds NaN) the
    error names the newest earlier state of the run beside it, and a resume from that one continues
    the run to the uninterrupted run's weights."""
    def run(**overrides):
        model = make_model("standin", seed=3)
        return train(_config(tmp_path, epochs=2, **overrides), model=model, dataset=RandomPairs(model, 16, seed=1),
                     loss_fn=dense_label_infonce)

    run()
    ckpt = tmp_path / "run" / "checkpoints"
    final = torch.load(tmp_path / "run" / "ace_lora.pt", weights_only=True)
    newest, earlier = ckpt / "state-00000008.pt", ckpt / "state-00000004.pt"
    good = newest.read_bytes()
    note = rf"; the newest earlier state beside it is '{re.escape(str(earlier))}': resume from it by setting " \
           r"TrainConfig\.resume to that file$"
    bad = load_state(newest)  # a readable state holding NaN: the same note
    bad["trainable"][next(iter(bad["trainable"]))].view(-1)[0] = float("nan")
    torch.save(bad, newest)
    with pytest.raises(training.TrainingStateError, match=rf"weights hold NaN or infinity .*{note}"):
        run(resume="auto")
    newest.write_bytes(good[: len(good) // 2])
    with pytest.raises(training.TrainingStateError, match=rf"state-00000008\.pt: cannot be read .*{note}"):
        run(resume="auto")
    assert run(resume=str(earlier))["steps"] == 8  # the run goes on, and its step 8 replaces the bad file
    assert load_state(newest)["step"] == 8
    again = torch.load(tmp_path / "run" / "ace_lora.pt", weights_only=True)
    assert again.keys() == final.keys() and all(torch.equal(again[k], v) for k, v in final.items())
    earlier.write_bytes(b"")  # the earliest state: no earlier one to name
    with pytest.raises(training.TrainingStateError, match=r"state-00000004\.pt: cannot be read [^;]*$"):
        run(resume=str(earlier))


def test_corrupt_or_foreign_state_files_are_named(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"format": training.STATE_FORMAT, "version": training.STATE_VERSION, "pad": torch.zeros(500)}, good)
    data = good.read_bytes()
    cases = {"truncated.pt": data[: len(data) // 2], "empty.pt": b"", "garbage.pt": b"\x80\x02 not a pickle" * 5}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(training.TrainingStateError,
                           match=rf"{tmp_path / name}: cannot be read as a training state"):
            load_state(tmp_path / name)
    torch.save({"format": training.STATE_FORMAT, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(training.TrainingStateError, match=r"future.pt: training state version 99"):
        load_state(tmp_path / "future.pt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("{not json")
    with pytest.raises(training.TrainingStateError, match=r"latest: unreadable checkpoint pointer"):
        training.resolve_resume("auto", tmp_path / "run")


def test_a_directory_given_or_named_as_a_state_is_refused_naming_it(tmp_path):
    # open() said only IsADirectoryError; the command line then exited 1, as for a fault, not 2.
    with pytest.raises(training.TrainingStateError, match=rf"{tmp_path}: a directory, not a training state file"):
        load_state(tmp_path)
    (tmp_path / "run" / "checkpoints" / "state-3.pt").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text(json.dumps({"state": "state-3.pt"}))
    named = training.resolve_resume("auto", tmp_path / "run")
    with pytest.raises(training.TrainingStateError, match=r"state-3.pt: a directory, not a training state file"):
        load_state(named)


def test_out_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("keep me")
    model = make_model("standin")
    for out_dir in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(ValueError, match=rf"TrainConfig.out_dir: '{out_dir}' cannot be a run directory"):
            train(_config(tmp_path, out_dir=str(out_dir)), model=model, dataset=RandomPairs(model, 8),
                  loss_fn=dense_label_infonce)
    assert (tmp_path / "file").read_text() == "keep me"


def test_a_checkpoints_entry_that_is_no_directory_is_refused_before_any_step(tmp_path):
    """A file (or a dangling link) named checkpoints in out_dir stopped the run only at its first checkpoint,
    its steps lost."""
    model = make_model("standin")
    for name, make in (("file", lambda at: at.write_text("keep me")),
                       ("link", lambda at: at.symlink_to(tmp_path / "nowhere"))):
        out_dir = tmp_path / name
        out_dir.mkdir()
        make(out_dir / "checkpoints")
        with pytest.raises(ValueError, match=rf"TrainConfig.out_dir: '{out_dir}' cannot be a run directory: "
                                             rf"'{out_dir / 'checkpoints'}' exists and is not a directory"):
            train(_config(tmp_path, out_dir=str(out_dir), max_steps=4, checkpoint_every=2), model=model,
                  dataset=RandomPairs(model, 8), loss_fn=dense_label_infonce)
        assert sorted(p.name for p in out_dir.iterdir()) == ["checkpoints"]


def _record_atomic_writes(monkeypatch) -> list[tuple[str, str]]:
    """(temp path, final path) of every os.replace, i.e. of every atomic write."""
    done = []
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        done.append((os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    return done


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_each_file_is_written_through_one_temp_file_that_a_restart_cleans_up(tmp_path, monkeypatch, kind):
    """The tiny ACELoRA's save_reference_checkpoint is itself atomic: it must not be
    nested in a second temp file (whose name the clean-up would not know)."""
    model = make_model(kind)
    data = RandomPairs(model, 8, seed=1)
    writes = _record_atomic_writes(monkeypatch)
    train(_config(tmp_path, epochs=1, checkpoint_every=1, keep_checkpoints=1), model=model, dataset=data,
          loss_fn=dense_label_infonce)
    monkeypatch.undo()
    finals = sorted(os.path.basename(dst) for _, dst in writes)
    assert finals == sorted(["config.json", "state-00000001.pt", "ace_lora-00000001.pt", "latest",
                             "state-00000002.pt", "ace_lora-00000002.pt", "latest", "ace_lora.pt"])
    # A SIGKILL mid-write leaves the temp file behind: put every one back, plus files
    # that only look alike, and start again (resume of a finished run: only the clean-up).
    run = tmp_path / "run"
    for tmp, _ in writes:
        Path(tmp).write_bytes(b"partial")
    lookalikes = [run / ".state-00000001.pt.mine.tmp", run / "checkpoints" / ".state-00000001.pt.backup.tmp",
                  run / "checkpoints" / "notes.tmp", run / "checkpoints" / ".latest.tmp"]
    for path in lookalikes:
        path.write_text("user file")
    first = read_metrics(run / "metrics.jsonl")[-1]
    again = train(_config(tmp_path, epochs=1, checkpoint_every=1, keep_checkpoints=1, resume="auto"),
                  model=make_model(kind), dataset=data, loss_fn=dense_label_infonce)
    # Nothing left to run: the summary gives the finished run's last step and loss, not null.
    assert (again["steps"], again["final_loss"]) == (first["step"], first["loss"])
    assert not [tmp for tmp, _ in writes if os.path.exists(tmp)], "stale temp files must be removed"
    assert all(path.read_text() == "user file" for path in lookalikes), "only this code's temp names"


def test_pruning_keeps_this_runs_newest_checkpoints_not_an_abandoned_runs(tmp_path):
    """Run A checkpoints every 3 steps (3, 6, 9, 12; keep 4). Run B resumes from A's
    step 3 and checkpoints every 4 steps, keeping 2: it must end with its own 8 and 12,
    and must not delete A's 6 and 9 (another trajectory's files)."""
    def run(**overrides):
        model = make_model("standin", seed=3)
        train(_config(tmp_path, epochs=3, **overrides), model=model, dataset=RandomPairs(model, 16, seed=1),
              loss_fn=dense_label_infonce)

    ckpt = tmp_path / "run" / "checkpoints"
    run(checkpoint_every=3, keep_checkpoints=4)
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("state-")) == [
        f"state-{s:08d}.pt" for s in (3, 6, 9, 12)]
    run(checkpoint_every=4, keep_checkpoints=2, resume=str(ckpt / "state-00000003.pt"))
    steps = sorted(int(n[6:14]) for n in os.listdir(ckpt) if n.startswith("state-"))
    refs = sorted(int(n[9:17]) for n in os.listdir(ckpt) if n.startswith("ace_lora-"))
    assert steps == refs == [6, 8, 9, 12]
    for step, every in ((6, 3), (8, 4), (9, 3), (12, 4)):
        assert load_state(ckpt / f"state-{step:08d}.pt")["config"]["checkpoint_every"] == every, step
    assert load_state(ckpt / "state-00000012.pt")["checkpoint_steps"] == [8, 12]
    # Resumed into a new directory, a run owns nothing there yet: a state file another run left in
    # its checkpoints/ (numbered as one of the resumed state's own) is never pruned.
    stray = tmp_path / "new" / "checkpoints" / "state-00000003.pt"
    stray.parent.mkdir(parents=True)
    stray.write_bytes((ckpt / "state-00000006.pt").read_bytes())
    run(checkpoint_every=3, keep_checkpoints=1, resume=str(ckpt / "state-00000006.pt"), out_dir=str(tmp_path / "new"))
    assert sorted(p.name for p in stray.parent.glob("state-*")) == ["state-00000003.pt", "state-00000012.pt"]


def test_a_fractional_warmup_rounds_to_the_nearest_step(tmp_path):
    # 0.7 of an epoch of 4 steps is 2.8 steps: a 3-step warm-up (2 if truncated).
    model = make_model("standin")
    result = train(_config(tmp_path, epochs=2, warmup_epochs=0.7), model=model, dataset=RandomPairs(model, 18, seed=1),
                   loss_fn=dense_label_infonce)
    lrs = [r["lr"] for r in read_metrics(result["metrics"])]
    assert lrs[:4] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2], rel=1e-12) and lrs[4] < 1e-2  # then cosine


def test_the_rng_snapshot_restores_python_numpy_and_torch_through_a_state_file(tmp_path):
    """A dataset or transform may draw from any of the three generators (augmentation): a resume
    continues each stream where the saved run left it, after a round trip through the state's
    weights-only torch file."""
    import random

    def draws():
        return (random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()),
                torch.rand(2).tolist())

    random.gauss(0, 1)  # leave a cached Gaussian in python's state (and below in numpy's)
    np.random.randn()
    torch.save({"rng": training._rng_snapshot(torch.device("cpu"))}, tmp_path / "rng.pt")
    want = draws()
    draws()  # move every stream on
    training._rng_restore(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"], torch.device("cpu"))
    assert draws() == want


def test_the_rng_snapshot_carries_the_cuda_generator_through_a_state_file(tmp_path, monkeypatch):
    """On a CUDA device the dropout masks come from the device's generator: its state is saved with
    the others and put back on that device. Checked with torch.cuda's two calls stood in for, so that
    a CPU-only machine checks it too (test_a_run_resumed_on_cuda_continues_as_the_uninterrupted_one
    resumes a run on a GPU)."""
    cuda = torch.device("cuda", 0)
    saved_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": saved_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    torch.save({"rng": training._rng_snapshot(cuda)}, tmp_path / "rng.pt")
    training._rng_restore(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"], cuda)
    assert len(restored) == 1
    assert torch.equal(restored[0][0], saved_state) and restored[0][1] == cuda
    # On the CPU no CUDA state is taken, and none put back.
    training._rng_restore(training._rng_snapshot(torch.device("cpu")), torch.device("cpu"))
    assert len(restored) == 1


def _run_resumed_from_the_middle_as_uninterrupted(tmp_path, kind: str, device: str, **overrides):
    """A run of 12 steps with dropout on ``device``; a copy of it resumed from its state at step 8
    must log the same losses and end on the same weights, bit for bit. Then the same resume with the
    generator that draws the masks on that device (the CUDA one on a GPU, torch's on the CPU) set to
    another state in the state file must log other losses from step 9 on: the saved generator state
    is what made them equal."""
    import shutil

    def run(out_dir, resume=None):
        model = make_model(kind, seed=3, dropout=0.3, perturb=True)
        if device != "cpu":
            _triton_ops(model)  # not the cuda hypergraph `auto` may pick: its norm gradients add with atomics
        config = _config(tmp_path, out_dir=str(out_dir), device=device, resume=resume, **overrides)
        result = train(config, model=model, dataset=RandomPairs(model, 16, seed=1), loss_fn=dense_label_infonce)
        final = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        return [(r["step"], r["loss"]) for r in read_metrics(result["metrics"])], final

    uninterrupted, want = run(tmp_path / "a")
    assert [step for step, _ in uninterrupted] == list(range(1, 13))
    state = Path("checkpoints", "state-00000008.pt")  # in each run's directory
    generator = "cuda" if device.startswith("cuda") else "torch"
    assert load_state(tmp_path / "a" / state)["rng"][0][generator] is not None
    for copy in ("b", "c"):
        shutil.copytree(tmp_path / "a", tmp_path / copy)
    resumed, got = run(tmp_path / "b", resume=str(tmp_path / "b" / state))
    assert resumed == uninterrupted
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)

    altered = tmp_path / "c" / state
    saved = load_state(altered)
    saved["rng"][0][generator] = torch.Generator(device=device).manual_seed(12345).get_state()
    torch.save(saved, altered)
    otherwise, _ = run(tmp_path / "c", resume=str(altered))
    assert otherwise[:8] == uninterrupted[:8]
    assert all(a != b for a, b in zip(otherwise[8:], uninterrupted[8:], strict=True)), (otherwise, uninterrupted)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_run_resumed_from_the_middle_continues_as_the_uninterrupted_one(tmp_path, kind):
    _run_resumed_from_the_middle_as_uninterrupted(tmp_path, kind, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda_graph"])
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_run_resumed_on_cuda_continues_as_the_uninterrupted_one(tmp_path, kind, graph):
    """On a GPU the masks come from the CUDA generator (nn.Dropout's, SDPA's, and the seeds the LoRA
    kernels draw), which the state holds and the resume puts back; with TrainConfig.cuda_graph the
    resumed run captures its graph from the restored generator state and each replay moves it on as
    an eager step does. Attention runs on SDPA's math backend and torch in its deterministic mode:
    the fused attention kernels' backward adds with atomics, which would make two uninterrupted runs
    differ in the last bits already."""
    from conftest import poisoning_empty  # deterministic mode (warn_only), the settings before restored after
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with poisoning_empty(), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # warn_only: ops without a deterministic version
        _run_resumed_from_the_middle_as_uninterrupted(tmp_path, kind, "cuda", cuda_graph=graph)


def test_numpy_numbers_in_the_config_train_as_python_ones(tmp_path):
    """validate accepts NumPy numbers; train runs them as the Python numbers they hold (they once
    failed the JSON records, the seeders and the step's own checks after config.json was written)."""
    data = RandomPairs(make_model("standin"), 8, seed=1)
    plain = dict(batch_size=4, chunk_size=3, epochs=1, max_steps=2, lr=1e-2, seed=5, warmup_epochs=0)
    numpy_values = dict(batch_size=np.int64(4), chunk_size=np.int32(3), epochs=np.int64(1), max_steps=np.int64(2),
                        lr=np.float64(1e-2), seed=np.int64(5), warmup_epochs=np.float64(0))
    runs = {}
    for name, values in (("plain", plain), ("numpy", numpy_values)):
        out = tmp_path / name
        train(_config(tmp_path, out_dir=str(out), **values), model=make_model("standin"), dataset=data,
              loss_fn=dense_label_infonce)
        runs[name] = [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl")]
    assert len(runs["plain"]) == 2 and runs["numpy"] == runs["plain"]


def test_a_resume_deletes_what_a_crash_left_between_latest_and_pruning(tmp_path, monkeypatch):
    ckpt = tmp_path / "run" / "checkpoints"
    model = make_model("standin", seed=3)
    real_unlink = os.unlink

    def crash_before_pruning(path, *args, **kwargs):
        if os.path.basename(path).startswith(("state-", "ace_lora-")):
            raise KeyboardInterrupt("killed between writing latest and pruning")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", crash_before_pruning)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, epochs=3, checkpoint_every=3, keep_checkpoints=1), model=model,
              dataset=RandomPairs(model, 16, seed=1), loss_fn=dense_label_infonce)
    monkeypatch.setattr(os, "unlink", real_unlink)
    states = lambda: sorted(n for n in os.listdir(ckpt) if n.startswith("state-"))  # noqa: E731
    assert states() == ["state-00000003.pt", "state-00000006.pt"]  # 3 should have gone
    model = make_model("standin", seed=3)
    train(_config(tmp_path, epochs=3, checkpoint_every=3, keep_checkpoints=1, resume="auto"), model=model,
          dataset=RandomPairs(model, 16, seed=1), loss_fn=dense_label_infonce)
    assert states() == ["state-00000012.pt"]


def test_a_pruned_checkpoint_that_cannot_be_deleted_warns_naming_it_and_the_run_goes_on(tmp_path, monkeypatch):
    """The new state is complete and named by latest when the old ones are deleted: a refused
    delete (a read-only folder, a file system's EPERM) leaves that file with a warning naming it,
    instead of stopping a run whose checkpoints are safe."""
    ckpt = tmp_path / "run" / "checkpoints"
    model = make_model("standin", seed=3)
    real_unlink = os.unlink

    def refuse_step_3(path, *args, **kwargs):
        if os.path.basename(path) == "state-00000003.pt":
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse_step_3)
    with pytest.warns(UserWarning, match=rf"^could not delete '{re.escape(str(ckpt / 'state-00000003.pt'))}', "
                                         r"a pruned checkpoint \(Operation not permitted\); it is left in place"):
        result = train(_config(tmp_path, epochs=3, checkpoint_every=3, keep_checkpoints=1), model=model,
                       dataset=RandomPairs(model, 16, seed=1), loss_fn=dense_label_infonce)
    assert result["steps"] == 12 and (tmp_path / "run" / "ace_lora.pt").exists()
    assert sorted(n for n in os.listdir(ckpt) if n.startswith(("state-", "ace_lora-"))) == [
        "ace_lora-00000012.pt", "state-00000003.pt", "state-00000012.pt"]


def test_a_stale_temp_file_that_cannot_be_deleted_warns_naming_it_and_the_run_goes_on(tmp_path, monkeypatch):
    """A killed run's temp file is deleted at the next start; when that is refused, it is left with a
    warning naming it (no write reads it) instead of stopping the run before its first step."""
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    stale = ckpt / ".latest.0123456789ab.tmp"
    stale.write_text("half a pointer")
    real_unlink = os.unlink

    def refuse_stale(path, *args, **kwargs):
        if os.path.basename(path) == stale.name:
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse_stale)
    model = make_model("standin", seed=3)
    with pytest.warns(UserWarning, match=rf"^could not delete '{re.escape(str(stale))}', the temp file of a write "
                                         r"that was interrupted \(Operation not permitted\); it is left in place"):
        result = train(_config(tmp_path, epochs=1), model=model, dataset=RandomPairs(model, 16, seed=1),
                       loss_fn=dense_label_infonce)
    assert result["steps"] == 4 and stale.read_text() == "half a pointer"


def test_a_state_is_written_after_its_steps_metrics_reach_the_disk(tmp_path, monkeypatch):
    """A resumed run skips the steps up to its state: their metric lines must be on the disk
    (flushed and fsynced) before the state is, or a crash could lose them for good. A run that
    stops between checkpoints fsyncs the lines it wrote since the last one before it ends."""
    real_save, real_fsync = training.atomic_torch_save, os.fsync
    synced, seen = [], []

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)
        return real_fsync(fd)

    def save(state, path, *args, **kwargs):
        metrics = tmp_path / "run" / "metrics.jsonl"
        steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines()]
        seen.append((state["step"], steps[-1], os.path.realpath(metrics) in synced))
        synced.clear()  # each state needs its own fsync of the metrics before it
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(training, "atomic_torch_save", save)
    model = make_model("standin", seed=3)
    train(_config(tmp_path, epochs=1, checkpoint_every=2, warmup_epochs=0), model=model,
          dataset=RandomPairs(model, 16, seed=1), loss_fn=dense_label_infonce)
    assert seen == [(2, 2, True), (4, 4, True)]
    synced.clear()
    with pytest.raises(RuntimeError, match="injected failure"):
        train(_config(tmp_path, epochs=1, checkpoint_every=2, warmup_epochs=0, out_dir=str(tmp_path / "failed")),
              model=make_model("standin", seed=3), dataset=RandomPairs(model, 16, seed=1), loss_fn=_failing_at(4))
    assert [step for step, _, _ in seen[2:]] == [2]  # its state of step 2; step 3's line came after it
    assert os.path.realpath(tmp_path / "failed" / "metrics.jsonl") in synced


def test_a_crash_while_latest_is_written_leaves_the_previous_state_resumable(tmp_path, monkeypatch):
    """keep_checkpoints=1: the state that ``latest`` names is deleted only after ``latest`` names
    the new one, so a crash while writing it leaves a pointer to a state that exists."""
    model = make_model("standin", seed=3)
    real_write = training.atomic_write_text
    writes = []

    def crash_at_the_second_latest(path, text, *args, **kwargs):
        if os.path.basename(path) == "latest":
            writes.append(text)
            if len(writes) == 2:
                raise KeyboardInterrupt("killed while writing latest")
        return real_write(path, text, *args, **kwargs)

    monkeypatch.setattr(training, "atomic_write_text", crash_at_the_second_latest)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, epochs=3, checkpoint_every=3, keep_checkpoints=1), model=model,
              dataset=RandomPairs(model, 16, seed=1), loss_fn=dense_label_infonce)
    monkeypatch.setattr(training, "atomic_write_text", real_write)
    assert training.resolve_resume("auto", tmp_path / "run").name == "state-00000003.pt"
    # As do the run directory and its checkpoints/ named as the state to resume (each finds its latest).
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
        assert training.resolve_resume(str(where), tmp_path / "elsewhere").name == "state-00000003.pt", where
    model = make_model("standin", seed=3)
    result = train(_config(tmp_path, epochs=3, checkpoint_every=3, keep_checkpoints=1, resume="auto"), model=model,
                   dataset=RandomPairs(model, 16, seed=1), loss_fn=dense_label_infonce)
    assert result["resumed_from"].endswith("state-00000003.pt") and result["steps"] == 12


def test_config_paths_may_be_path_objects_and_other_types_are_named(tmp_path):
    """A pathlib.Path (what make_synthetic_dataset returns) as out_dir or csv passed validate() and then failed
    deep in train(), after taking the out_dir lock, with "Object of type PosixPath is not JSON serializable"; and
    out_dir=None or resume=5 ended in pathlib's TypeError. Paths are now taken as strings, other types named."""
    model = make_model("standin")
    result = train(_config(tmp_path, out_dir=tmp_path / "run", epochs=1), model=model,
                   dataset=RandomPairs(model, 8), loss_fn=dense_label_infonce)
    assert result["steps"] == 2 and result["out_dir"] == str(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["out_dir"] == str(tmp_path / "run")
    assert TrainConfig(csv=tmp_path / "a.csv").to_dict()["csv"] == str(tmp_path / "a.csv")
    for field, value, allowed in (("out_dir", None, "a path \\(str or os.PathLike\\)"),
                                  ("resume", 5, "a path \\(str or os.PathLike\\) or None"),
                                  ("csv", b"a.csv", "a path \\(str or os.PathLike\\) or None")):
        with pytest.raises(ValueError, match=rf"^TrainConfig\.{field}: expected {allowed}, got "):
            TrainConfig(**{field: value}).validate()


def test_train_given_no_train_config_raises_a_type_error_naming_the_argument(tmp_path):
    """train(None), or a dict of the fields, ended in an AttributeError ('NoneType' object has no attribute
    'validate'), naming neither the argument nor what it takes."""
    fields = _config(tmp_path).to_dict()
    for given, named in ((None, "NoneType"), (fields, "dict \\(TrainConfig\\.from_dict builds one"), ("cfg", "str")):
        with pytest.raises(TypeError, match=rf"^train: argument 'config': expected a TrainConfig, got {named}"):
            train(given)
    assert not Path(fields["out_dir"]).exists()  # nothing done


def test_config_validation(tmp_path):
    model = make_model("standin")
    data = RandomPairs(model, 8)
    with pytest.raises(ValueError, match="batch_size"):
        train(_config(tmp_path, batch_size=9), model=model, dataset=data, loss_fn=dense_label_infonce)
    with pytest.raises(ValueError, match="precision"):
        train(_config(tmp_path, precision="fp8"), model=model, dataset=data, loss_fn=dense_label_infonce)
    with pytest.raises(ValueError, match="chunk_size"):
        TrainConfig(chunk_size=0).validate()
    # Each message names its field (the command line turns it into the flag's name).
    for field, value in (("keep_checkpoints", 0), ("checkpoint_every", -1), ("num_workers", -1),
                         ("warmup_epochs", -0.5), ("warmup_steps", -1)):
        with pytest.raises(ValueError, match=rf"^TrainConfig\.{field}: expected >= "):
            TrainConfig(**{field: value}).validate()
    assert TrainConfig.from_dict(TrainConfig(betas=(0.8, 0.9)).to_dict()) == TrainConfig(betas=(0.8, 0.9))
    # NumPy numbers, which validate() accepts, become JSON's (config.json is written from to_dict).
    numpy_config = TrainConfig(epochs=np.int64(2), lr=np.float32(0.5), betas=(np.float32(0.5), 0.25),
                               use_labels=np.bool_(False))
    numpy_config.validate()
    assert json.loads(json.dumps(numpy_config.to_dict())) == TrainConfig(
        epochs=2, lr=0.5, betas=(0.5, 0.25), use_labels=False).to_dict()
    # A model name train() would build is checked when it builds it (a model passed in may carry any).
    with pytest.raises(ValueError, match=r"^TrainConfig\.model: expected 'biomedclip' or 'tiny', got 'Tiny'$"):
        train(_config(tmp_path, model="Tiny"), dataset=data, loss_fn=dense_label_infonce)
    # A run that is all warm-up says so, once it goes on (not before an error of its set-up).
    with pytest.warns(UserWarning, match=r"^TrainConfig\.max_steps: the run's 1 step\(s\) end within its 2-step "
                                         r"warm-up \(TrainConfig\.warmup_epochs\) or one step after it: the "
                                         r"learning rate never decays"):
        train(_config(tmp_path, max_steps=1, out_dir=str(tmp_path / "warm")), model=model, dataset=data,
              loss_fn=dense_label_infonce)
    # The cosine's first step runs at the full rate: a warm-up one step shorter than the run is no better.
    for warmup, warned in ((2, True), (1, False), (0, False)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train(_config(tmp_path, max_steps=3, warmup_steps=warmup, out_dir=str(tmp_path / f"w{warmup}")),
                  model=model, dataset=data, loss_fn=dense_label_infonce)
        assert any("never decays" in str(w.message) for w in seen) == warned, warmup


@pytest.mark.parametrize("field,value,expected", [
    ("lr", -1e-3, "a finite number >= 0"),
    ("lr", float("inf"), "a finite number >= 0"),
    ("weight_decay", -0.1, "a finite number >= 0"),
    ("weight_decay", float("nan"), "a finite number >= 0"),
    ("eps", 0.0, "a finite number > 0"),  # AdamW then divides 0 by 0 where a gradient is exactly 0
    ("eps", -1e-8, "a finite number > 0"),
    ("betas", (0.9, 1.0), "two numbers in [0, 1)"),
    ("betas", (-0.1, 0.999), "two numbers in [0, 1)"),
    ("betas", (0.9,), "two numbers in [0, 1)"),
    ("warmup_epochs", float("inf"), "a finite number >= 0"),
    ("warmup_epochs", float("nan"), "a finite number >= 0"),
    ("seed", 10**20, "an integer with |seed| < 2**46"),
    ("seed", -2**46, "an integer with |seed| < 2**46"),
    ("chunk_size", 2.0, "an integer or unset (None)"),  # it failed at the first step, files written
    ("chunk_size", True, "an integer or unset (None)"),
    ("max_steps", 2.5, "an integer or unset (None)"),
    ("warmup_steps", 1.5, "an integer or unset (None)"),
    ("checkpoint_every", 1.5, "an integer"),  # it ran, checkpointing at no step
    ("batch_size", 8.0, "an integer"),
    ("epochs", "2", "an integer"),
    ("num_workers", False, "an integer"),
    ("dist_timeout_s", 0, "a finite number of seconds > 0"),  # gloo timed out at once
    ("dist_timeout_s", float("inf"), "a finite number of seconds > 0"),
    ("warmup_epochs", "1", "a finite number >= 0"),  # a TypeError from "<" before
    ("warmup_epochs", None, "a finite number >= 0"),
    ("use_labels", "no", "a bool"),  # "no" is true: the run used the labels
    ("loss_scope", "Local", "'global' or 'local'"),
    ("text_attention", "Spec", "'spec' or 'reference-code'"),
    ("progress", 1, "a bool"),
])
def test_optimizer_settings_are_validated(field, value, expected):
    with pytest.raises(ValueError, match=rf"^TrainConfig\.{field}: expected {re.escape(expected)}, got "):
        TrainConfig(**{field: value}).validate()
    TrainConfig(lr=0.0, weight_decay=0.0, betas=(0.0, 0.0), eps=1e-30).validate()  # the edges are allowed
    # NumPy's numbers are numbers (its bools are not).
    TrainConfig(lr=np.float32(1e-3), betas=(np.float32(0.9), np.float16(0.5)), eps=np.float32(1e-8)).validate()
    with pytest.raises(ValueError, match=r"^TrainConfig\.betas: "):
        TrainConfig(betas=(np.bool_(False), 0.9)).validate()
    # A finite learning rate whose first AdamW step overflows float32 (torch raised mid-run).
    with pytest.raises(ValueError, match=r"^TrainConfig\.lr: 1e\+38 / \(1 - betas\[0\]\) overflows float32"):
        TrainConfig(lr=1e38).validate()
    TrainConfig(lr=1e30).validate()


@pytest.mark.parametrize("eps", [1e-50, 1e-46, 1e-40, np.float64(1e-39)])
def test_an_eps_that_float32_loses_is_refused(eps):
    """AdamW adds eps to the weights' float32 sqrt(v): 1e-50 rounds to 0 there (a subnormal one is flushed
    to 0 in a flush-to-zero mode), so the LoRA A weights, whose first gradient is exactly 0, became 0/0
    as with eps = 0, and the run stopped at step 2 on a "non-finite loss" instead of naming the setting."""
    with pytest.raises(ValueError, match=r"^TrainConfig\.eps: expected a number >= 1\.175494e-38 \(float32's "
                                         r"smallest normal; .*\), got "):
        TrainConfig(eps=eps).validate()
    TrainConfig(eps=float(torch.finfo(torch.float32).tiny)).validate()
    TrainConfig(eps=np.float32(1e-37)).validate()


def test_read_metrics_keeps_only_the_last_run(tmp_path):
    """A fresh run appends after a "start" line; a "resume" line continues the same run."""
    path = tmp_path / "metrics.jsonl"
    lines = [{"event": "start", "step": 0}, {"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0},
             {"step": 3, "loss": 7.0},
             {"event": "start", "step": 0}, {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0},
             {"event": "resume", "step": 1}, {"step": 2, "loss": 3.0}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 3, "lo')  # torn last line
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 5.0), (2, 3.0)]
    # A resume from an older state abandons the records after it, even those it does not redo
    # (the resumed run stopped early): they belong to another trajectory.
    lines = [{"event": "start", "step": 0}, {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0},
             {"step": 3, "loss": 3.0}, {"event": "resume", "step": 1}, {"step": 2, "loss": 3.5}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 5.0), (2, 3.5)]
    # With run ids a resume continues its own run, even after another run started.
    lines = [{"event": "start", "run": "a", "step": 0}, {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0},
             {"event": "start", "run": "b", "step": 0}, {"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0},
             {"step": 3, "loss": 7.0}, {"event": "resume", "run": "a", "step": 1}, {"step": 2, "loss": 3.9}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 5.0), (2, 3.9)]
    # The resume of a state written before runs had ids continues the run last started.
    lines[-2] = {"event": "resume", "run": "c", "step": 2, "continues_last_start": True}
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 9.0), (2, 3.9)]
    # A run this file never started (resumed from another directory's state) starts afresh here.
    lines[-2] = {"event": "resume", "run": "c", "step": 1}
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(2, 3.9)]


def test_a_fresh_run_into_a_used_out_dir_is_refused_unless_overwrite(tmp_path):
    model = make_model("standin", seed=3)
    data = RandomPairs(model, 18, seed=1)
    first = train(_config(tmp_path, checkpoint_every=0), model=model, dataset=data, loss_fn=dense_label_infonce)
    assert [r["step"] for r in read_metrics(first["metrics"])] == list(range(1, 13))
    run = Path(first["out_dir"])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # Refused before anything is written: a fresh run, and a resume from a state of another directory.
    elsewhere = train(_config(tmp_path, out_dir=str(tmp_path / "other"), max_steps=2, checkpoint_every=0),
                      model=make_model("standin", seed=3), dataset=data, loss_fn=dense_label_infonce)
    for resume in (None, elsewhere["state"]):
        with pytest.raises(ValueError, match=r"^TrainConfig\.out_dir: .* holds another run \(checkpoints/latest and "
                                             r"ace_lora\.pt\), whose files a (fresh run|run resumed from .*) would "
                                             r"overwrite; continue that run with TrainConfig\.resume set to 'auto', "
                                             r"replace it with TrainConfig\.overwrite"):
            train(_config(tmp_path, max_steps=3, resume=resume), model=make_model("standin", seed=3), dataset=data,
                  loss_fn=dense_label_infonce)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # A crash mid-write tore the last line: the next run's "start" line must still be read.
    with open(first["metrics"], "a", encoding="utf-8") as handle:
        handle.write('{"step": 13, "loss": 1.0, "l')
    # An overwriting run that stops before its first checkpoint leaves none of the replaced run's
    # weights to be taken for its own.
    with pytest.raises(RuntimeError, match="injected failure"):
        train(_config(tmp_path, checkpoint_every=0, max_steps=3, lr=1e-3, overwrite=True),
              model=make_model("standin", seed=3), dataset=data, loss_fn=_failing_at(2))
    assert not (run / "ace_lora.pt").exists() and not any((run / "checkpoints").iterdir())
    # Its start line began a line of its own (the torn one was ended first): its step 1 reads back
    # as the run last started, not as a step of the replaced run.
    assert [r["step"] for r in read_metrics(first["metrics"])] == [1]
    second = train(_config(tmp_path, checkpoint_every=0, max_steps=3, lr=1e-3),
                   model=make_model("standin", seed=3), dataset=data, loss_fn=dense_label_infonce)
    records = read_metrics(second["metrics"])
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["loss"] == pytest.approx(second["final_loss"])


def test_a_state_another_run_left_in_checkpoints_is_not_resumed_over_the_run_there(tmp_path):
    """Run A checkpoints at 4 and 6; run B replaces it (overwrite: A's files go) and checkpoints at
    2. A's state at step 4, put back into checkpoints/, would overwrite B's latest and ace_lora.pt."""
    data = RandomPairs(make_model("standin", seed=3), 18, seed=1)
    a = train(_config(tmp_path, max_steps=6), model=make_model("standin", seed=3), dataset=data,
              loss_fn=dense_label_infonce)
    run = Path(a["out_dir"])
    saved = (run / "checkpoints" / "state-00000004.pt").read_bytes()
    b = train(_config(tmp_path, max_steps=2, overwrite=True), model=make_model("standin", seed=3), dataset=data,
              loss_fn=dense_label_infonce)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ace_lora-00000002.pt", "latest",
                                                                      "state-00000002.pt"]
    old_state = run / "checkpoints" / "state-00000004.pt"
    old_state.write_bytes(saved)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"^TrainConfig\.resume: .*state-00000004\.pt' is a state of another run than "
                                         r"the one .* now holds \(its checkpoints/latest names run [0-9a-f]{32}, this "
                                         r"state is of run [0-9a-f]{32}\), whose files this run would overwrite"):
        train(_config(tmp_path, max_steps=6, resume=str(old_state)), model=make_model("standin", seed=3),
              dataset=data, loss_fn=dense_label_infonce)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # B's own state resumes; A's with overwrite too.
    train(_config(tmp_path, max_steps=2, resume="auto"), model=make_model("standin", seed=3), dataset=data,
          loss_fn=dense_label_infonce)
    resumed = train(_config(tmp_path, max_steps=6, resume=str(old_state), overwrite=True),
                    model=make_model("standin", seed=3), dataset=data, loss_fn=dense_label_infonce)
    assert resumed["steps"] == 6


def test_overwrite_keeps_the_state_it_resumes_and_the_weights_it_starts_from(tmp_path, monkeypatch):
    data = RandomPairs(make_model("standin", seed=3), 18, seed=1)
    first = train(_config(tmp_path, max_steps=4, checkpoint_every=2), model=make_model("standin", seed=3),
                  dataset=data, loss_fn=dense_label_infonce)
    checkpoints = Path(first["out_dir"]) / "checkpoints"
    files = sorted(p.name for p in checkpoints.iterdir())
    # A resume of a state there, with overwrite: that run's files are its own, nothing goes.
    resumed = train(_config(tmp_path, max_steps=4, checkpoint_every=2, resume=str(checkpoints / "state-00000002.pt"),
                            overwrite=True), model=make_model("standin", seed=3), dataset=data,
                    loss_fn=dense_label_infonce)
    assert resumed["steps"] == 4 and sorted(p.name for p in checkpoints.iterdir()) == files
    # A new run starting from weights in that folder, with overwrite, keeps them (even when it fails early).
    init = checkpoints / "ace_lora-00000002.pt"
    kept = init.read_bytes()
    monkeypatch.setattr(training, "_build_model", lambda config: make_model("standin", seed=3))
    with pytest.raises(RuntimeError, match="injected failure"):
        train(_config(tmp_path, max_steps=4, overwrite=True, init_checkpoint=str(init), lr=5e-3), dataset=data,
              loss_fn=_failing_at(1))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["ace_lora-00000002.pt"] and init.read_bytes() == kept


def test_resume_auto_with_weights_but_nothing_to_resume_says_so(tmp_path):
    data = RandomPairs(make_model("standin", seed=3), 18, seed=1)
    first = train(_config(tmp_path, max_steps=2), model=make_model("standin", seed=3), dataset=data,
                  loss_fn=dense_label_infonce)
    (Path(first["out_dir"]) / "checkpoints" / "latest").unlink()
    with pytest.raises(ValueError, match=r"^TrainConfig\.out_dir: .* holds another run's ace_lora\.pt but no "
                                         r"checkpoints/latest to continue it from, and a fresh run would overwrite it; "
                                         r"replace it with TrainConfig\.overwrite, or choose another directory$"):
        train(_config(tmp_path, max_steps=2, resume="auto"), model=make_model("standin", seed=3), dataset=data,
              loss_fn=dense_label_infonce)


def _failing_at(call):
    """dense_label_infonce that raises at its ``call``-th call (a run that fails at that step)."""
    calls = []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("injected failure")
        return dense_label_infonce(*args, **kwargs)
    return loss


def test_a_state_written_before_run_ids_resumes_and_reads_back(tmp_path):
    data = RandomPairs(make_model("standin", seed=3), 18, seed=1)

    with pytest.raises(RuntimeError):
        train(_config(tmp_path, max_steps=6), model=make_model("standin", seed=3), dataset=data, loss_fn=_failing_at(5))
    run = tmp_path / "run"
    # As the code before run ids wrote them: no id in the state, latest or the metrics lines, and no segment
    # (segments came later still; left in, the resume line's from_segment finds the history without the id).
    state_path = run / "checkpoints" / "state-00000004.pt"
    state = torch.load(state_path, weights_only=True)
    del state["run_id"], state["segment"]
    torch.save(state, state_path)
    latest = json.loads((run / "checkpoints" / "latest").read_text())
    del latest["run"]
    (run / "checkpoints" / "latest").write_text(json.dumps(latest))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("run", None)
        line.pop("segment", None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    first_four = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    train(_config(tmp_path, max_steps=6, resume="auto"), model=make_model("standin", seed=3), dataset=data,
          loss_fn=dense_label_infonce)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records[:4]] == first_four


def test_a_resume_after_another_run_failed_in_the_out_dir_reads_back_its_own_steps(tmp_path):
    """Run A checkpoints at step 4 and fails at step 5; run B (overwrite, which deletes A's
    checkpoints) fails at its step 3, before any checkpoint; A's checkpoints are put back from a
    copy and resumed: A's steps 1-4 and the resumed ones read back, none of B's."""
    import shutil

    data = RandomPairs(make_model("standin", seed=3), 18, seed=1)
    with pytest.raises(RuntimeError, match="injected failure"):
        train(_config(tmp_path, max_steps=6), model=make_model("standin", seed=3), dataset=data,
              loss_fn=_failing_at(5))
    metrics = tmp_path / "run" / "metrics.jsonl"
    a_losses = [r["loss"] for r in read_metrics(metrics)]
    assert len(a_losses) == 4
    shutil.copytree(tmp_path / "run" / "checkpoints", tmp_path / "copy")
    with pytest.raises(RuntimeError, match="injected failure"):
        train(_config(tmp_path, max_steps=6, overwrite=True, lr=1e-3), model=make_model("standin", seed=3),
              dataset=data, loss_fn=_failing_at(3))
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2]  # B's, the run last started
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    shutil.copytree(tmp_path / "copy", tmp_path / "run" / "checkpoints")
    resumed = train(_config(tmp_path, max_steps=6, resume="auto"), model=make_model("standin", seed=3), dataset=data,
                    loss_fn=dense_label_infonce)
    records = read_metrics(resumed["metrics"])
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records[:4]] == a_losses
    run_ids = {json.loads(line).get("run") for line in metrics.read_text().splitlines() if '"event"' in line}
    assert len(run_ids) == 2 and None not in run_ids  # A's start and resume share an id; B has its own
    assert torch.load(resumed["state"], weights_only=True)["run_id"] in run_ids


def test_bad_device_names_the_field_before_any_work(tmp_path, monkeypatch):
    model = make_model("standin")
    data = RandomPairs(model, 8)
    with pytest.raises(ValueError, match=r"TrainConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'foo'"):
        train(_config(tmp_path, device="foo"), model=model, dataset=data, loss_fn=dense_label_infonce)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"TrainConfig.device: 'cuda:0' needs CUDA"):
        train(_config(tmp_path, device="cuda:0"), model=model, dataset=data, loss_fn=dense_label_infonce)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")  # "cuda" takes the process's local rank
    with pytest.raises(ValueError, match=r"TrainConfig.device: 'cuda' resolves to cuda:2, but this machine has 2"):
        train(_config(tmp_path, device="cuda"), model=model, dataset=data, loss_fn=dense_label_infonce)
    assert not (tmp_path / "run").exists()
    assert training.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.slow
@pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")
def test_memory_follows_the_chunk_size_not_the_batch():
    """One step per fresh process (peak RSS only grows). Measured here: ~34 MiB extra at
    B=64 and B=256 with chunks of 16, ~185 MiB for the one-pass step at B=256, ~49 MiB at B=4096."""
    small = training.measure_chunked_step(64, 16)
    large = training.measure_chunked_step(256, 16)
    one_pass = training.measure_chunked_step(256, None)
    # 4x the batch may add only the [B, D] embeddings, their gradients and allocator
    # slack: 16 MiB is far above those (~0.1 MiB) and far below one more chunk's graph.
    assert large["step_extra_mib"] <= small["step_extra_mib"] + 16, (small, large)
    assert one_pass["step_extra_mib"] >= 2 * large["step_extra_mib"], (large, one_pass)
    assert large["peak_rss_mib"] >= large["baseline_rss_mib"] > 0 and large["seconds"] > 0
    # Issue 7's CPU setting, B=4096 (64x the batch; ~14 s here): still the chunk's memory, plus the
    # [B, D] embeddings, their gradients and the loss's O(B) buffers (measured: 48.8 against
    # 34.4 MiB at B=64), far below the one-pass step at a 16th of the batch.
    huge = training.measure_chunked_step(4096, 16)
    assert math.isfinite(huge["loss"]) and huge["batch"] == 4096
    assert huge["step_extra_mib"] <= small["step_extra_mib"] + 32, (small, huge)
    assert huge["step_extra_mib"] < one_pass["step_extra_mib"] / 2, (huge, one_pass)


@pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")
def test_train_from_a_csv_as_the_cli_does(tmp_path):
    """config.csv path: ACELoRA.from_config + CSVImageTextDataset on synthetic files."""
    from ace_model.data import make_synthetic_dataset

    csv_path = make_synthetic_dataset(tmp_path / "data", 12, seed=0)
    config = TrainConfig(csv=str(csv_path), out_dir=str(tmp_path / "run"), model="tiny", epochs=2, batch_size=4,
                         chunk_size=3, checkpoint_every=0, progress=False, seed=0)
    result = train(config)
    records = read_metrics(result["metrics"])
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in records)
    from ace_model import ACELoRA

    reloaded = ACELoRA.from_config("tiny")
    reloaded.load_reference_checkpoint(result["reference"])  # the released format round-trips
    state = load_state(result["state"])
    for name, p in reloaded.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), state["trainable"][name]), name


@pytest.mark.gpu
@pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")
def test_chunked_step_on_cuda_replays_the_cuda_dropout_stream():
    """fp32 on the GPU: the two-pass step must replay the CUDA generator (LoRA seeds, SDPA
    and BERT dropout draw there); bf16 autocast: the same step runs and agrees loosely."""
    device = torch.device("cuda")
    model = make_model("tiny", dropout=0.3, perturb=True).to(device)  # non-zero LoRA B
    images, token_ids, labels = make_batch(model, 10, seed=1)
    images, token_ids, labels = images.to(device), token_ids.to(device), labels.to(device)
    want_loss, want_grads, _ = _one_pass_reference(model, images, token_ids, labels, seed=5,
                                                   chunk_bounds=_bounds(10, 3))
    assert_no_zero_gradient(want_grads)
    want_next = torch.rand(4, device=device)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    got_loss = chunked_train_step(model, images, token_ids, labels, chunk_size=3, loss_fn=dense_label_infonce,
                                  precision="fp32")
    assert torch.equal(torch.rand(4, device=device), want_next)
    # fp32 on the GPU: TF32 is off by default for matmuls in torch; the summation order
    # of cuBLAS differs between chunk shapes, hence a few-ulp tolerance as on the CPU.
    torch.testing.assert_close(got_loss, want_loss, rtol=RTOL, atol=ATOL)
    _assert_grads_close(trainable_grads(model), want_grads)

    # bf16 autocast against the one-graph step in bf16 autocast. (Not against the fp32 step:
    # on a GPU, SDPA picks another kernel for bf16 than for fp32, which draws other dropout
    # masks, so the two losses differ by far more than bf16 rounding: 5.7% on an H200.)
    # Pass 2 recomputes each chunk with the replayed masks, so the embeddings, hence the
    # loss, are the one-graph step's; the gradients are sums in another order, in bf16.
    want16_loss, want16_grads, _ = _one_pass_reference(model, images, token_ids, labels, seed=5,
                                                       chunk_bounds=_bounds(10, 3), precision="bf16")
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    bf16_loss = chunked_train_step(model, images.cpu(), token_ids.cpu(), labels, chunk_size=3,
                                   loss_fn=dense_label_infonce, precision="bf16")
    torch.testing.assert_close(bf16_loss.float(), want16_loss.float(), rtol=1e-3, atol=1e-3)
    got16 = trainable_grads(model)
    assert got16.keys() == want16_grads.keys()
    for name, want in want16_grads.items():
        assert torch.isfinite(got16[name]).all(), name
        # bf16 products summed in another order: a few bf16 ulps of the gradient's scale.
        assert (got16[name] - want).norm() <= 3e-2 * want.norm() + 1e-6, name


# ---------------------------------------------------------------------------- the CUDA-graph step

def test_graphed_step_refuses_what_it_cannot_capture(tmp_path):
    model = make_model("standin")
    images, token_ids, labels = make_batch(model, 6, seed=1)
    # A CUDA graph needs a CUDA model; the message names the argument and the device.
    with pytest.raises(ValueError, match=r"argument 'model': .*needs a model on a CUDA device, got one on cpu"):
        training.GraphedTrainStep(model, images, token_ids, labels)
    # The captured step is the one-pass step, one process on a CUDA device: refused before any work.
    with pytest.raises(ValueError, match=r"^TrainConfig\.cuda_graph: the captured step is the one-pass step"):
        TrainConfig(cuda_graph=True, chunk_size=4).validate()
    with pytest.raises(ValueError, match=r"^TrainConfig\.cuda_graph: expected a bool"):
        TrainConfig(cuda_graph="yes").validate()
    data = RandomPairs(model, 8)
    with pytest.raises(ValueError, match=r"TrainConfig\.cuda_graph: needs one process on a CUDA device, got 1 "
                                         r"process\(es\) on cpu"):
        train(_config(tmp_path, cuda_graph=True), model=model, dataset=data, loss_fn=dense_label_infonce)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # A run and its resumption may differ in this switch (it changes no step's inputs).
    assert "cuda_graph" in TrainConfig._RESUMABLE_CHANGES


def test_cli_cuda_graph_flag_reaches_the_config(tmp_path, capsys):
    from ace_model import cli

    args = cli._parser().parse_args(["train", "--csv", "x.csv", "--cuda-graph"])
    assert cli.train_config_from_args(args).cuda_graph is True
    args = cli._parser().parse_args(["train", "--csv", "x.csv"])
    assert cli.train_config_from_args(args).cuda_graph is False
    # A bad combination is reported with the flag's name, before the data is read.
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,text,label\n")
    assert cli.main(["train", "--csv", str(csv), "--cuda-graph", "--chunk-size", "4", "--no-progress",
                     "--out-dir", str(tmp_path / "run")]) == cli.EXIT_BAD_INPUT
    assert ("--cuda-graph: the captured step is the one-pass step; it cannot be combined with --chunk-size 4"
            in capsys.readouterr().err)
    # The other combination refused names its flags too, not TrainConfig's fields.
    assert cli.main(["train", "--csv", str(csv), "--cuda-graph", "--recompute", "layer", "--no-progress",
                     "--out-dir", str(tmp_path / "run")]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--cuda-graph: --recompute 'layer' replays" in err and "use --recompute 'mlp' or no CUDA graph" in err


def _graph_inputs(kind, batch, dropout):
    device = torch.device("cuda")
    model = _triton_ops(make_model(kind, dropout=dropout, perturb=True).to(device))  # non-zero LoRA B
    images, token_ids, labels = make_batch(model, batch, seed=2)
    return model, images.to(device), token_ids.to(device), labels.to(device)


def _triton_ops(model):
    # The Triton backend's ops use no atomics; `auto` may pick the cuda hypergraph on a measured
    # card, whose norm gradients are summed with scatter_add_ (last bits vary run to run).
    if hasattr(model, "backend"):
        model.backend = "triton"
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_step_replays_the_eager_step(kind, precision):
    """Three replays against three eager steps from the same generator state, with dropout on:
    the same kernels and the same random streams give the same losses (the forward has no
    atomics) and the same gradients up to the order of atomic additions in the attention
    backward (fp32: a few ulps; bf16: a few bf16 ulps of each gradient's norm), and the
    generator ends where the eager steps leave it."""
    model, images, token_ids, labels = _graph_inputs(kind, 8, dropout=0.3)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batches = [(images, token_ids, labels)] + [
        tuple(t.to("cuda") for t in make_batch(model, 8, seed=s)) for s in (3, 4)]

    torch.manual_seed(7)
    eager = []
    for b_images, b_ids, b_labels in batches:
        model.zero_grad(set_to_none=True)
        loss = chunked_train_step(model, b_images, b_ids, b_labels, chunk_size=None, loss_fn=dense_label_infonce,
                                  precision=precision)
        eager.append((loss.clone(), trainable_grads(model)))
        assert_no_zero_gradient(eager[-1][1])
    eager_next = torch.rand(4, device="cuda")

    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    step = training.GraphedTrainStep(model, images, token_ids, labels, loss_fn=dense_label_infonce,
                                     precision=precision)
    # Building it changed nothing: no gradients, the parameters as they were.
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)
    for (b_images, b_ids, b_labels), (want_loss, want_grads) in zip(batches, eager, strict=True):
        model.zero_grad(set_to_none=True)  # harmless: the call points .grad at the graph's buffers
        got_loss = step(b_images, b_ids, b_labels)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
        got_grads = trainable_grads(model)
        if precision == "fp32":
            _assert_grads_close(got_grads, want_grads)
        else:
            assert got_grads.keys() == want_grads.keys() and got_grads
            for name, want in want_grads.items():
                assert (got_grads[name] - want).norm() <= 3e-2 * want.norm() + 1e-6, name
    assert torch.equal(torch.rand(4, device="cuda"), eager_next)


@pytest.mark.gpu
@pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")
def test_graphed_step_checks_every_batch_and_trains(tmp_path):
    model, images, token_ids, labels = _graph_inputs("tiny", 8, dropout=0.1)
    step = training.GraphedTrainStep(model, images, token_ids, labels)
    assert step.matches(images, token_ids, labels) and not step.matches(images[:4], token_ids[:4], labels[:4])
    with pytest.raises(ValueError, match=r"argument 'images': expected torch.float32 \[8, "):
        step(images[:4], token_ids[:4], labels[:4])
    with pytest.raises(ValueError, match=r"argument 'labels': the graph was captured with it, got None"):
        step(images, token_ids, None)
    # The training loop with --cuda-graph: finite losses, and the run without it (bf16 autocast,
    # six AdamW steps: the attention backward's atomic sums may move the last bits of a step's
    # gradients, which the next steps carry; hence not bit for bit).
    data = RandomPairs(make_model("tiny"), 24)
    runs = {}
    for graph in (False, True):
        out = tmp_path / f"graph{graph}"
        train(_config(out, batch_size=8, epochs=2, cuda_graph=graph, device="cuda"),
              model=_triton_ops(make_model("tiny")), dataset=data)
        runs[graph] = [r["loss"] for r in read_metrics(out / "run" / "metrics.jsonl") if "loss" in r]
    assert len(runs[True]) == 6 and all(math.isfinite(v) for v in runs[True])
    # The first step's loss: the same forward from the same state.
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    assert runs[True] == pytest.approx(runs[False], rel=1e-2, abs=1e-4)


def _cast_spy(monkeypatch):
    from ace_model import ACELoRA

    calls = []
    real = ACELoRA.cast_frozen_weights

    def spy(self, dtype):
        calls.append(dtype)
        return real(self, dtype)

    monkeypatch.setattr(ACELoRA, "cast_frozen_weights", spy)
    return calls


@pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")
def test_train_keeps_frozen_weights_on_the_cpu_and_a_callers_model(tmp_path, monkeypatch):
    # The frozen matmul weights go to bf16 only for a model the run builds itself and trains
    # under bf16 autocast (CUDA): never on the CPU, never a model the caller passed in.
    calls = _cast_spy(monkeypatch)
    data = RandomPairs(make_model("tiny"), 8)
    train(_config(tmp_path / "built", model="tiny", epochs=1, batch_size=4), dataset=data)
    mine = make_model("tiny")
    train(_config(tmp_path / "passed", model="tiny", epochs=1, batch_size=4), model=mine, dataset=data)
    assert calls == [] and all(p.dtype == torch.float32 for p in mine.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")
def test_train_on_cuda_stores_the_frozen_weights_in_bf16(tmp_path, monkeypatch):
    calls = _cast_spy(monkeypatch)
    data = RandomPairs(make_model("tiny"), 8)
    result = train(_config(tmp_path / "auto", model="tiny", epochs=1, batch_size=4, device="cuda"), dataset=data)
    assert calls == [torch.bfloat16] and math.isfinite(result["final_loss"])
    train(_config(tmp_path / "fp32", model="tiny", epochs=1, batch_size=4, device="cuda", precision="fp32"),
          dataset=data)
    mine = make_model("tiny")
    train(_config(tmp_path / "passed", model="tiny", epochs=1, batch_size=4, device="cuda"), model=mine,
          dataset=data)
    assert calls == [torch.bfloat16]  # not under fp32, not for a model passed in


@pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")
def test_train_with_recompute_is_the_same_run(tmp_path):
    # --recompute changes memory, not numbers: the same losses step for step and the same
    # trained parameters, bit for bit, with every dropout on; in the one-pass step and in the
    # chunked step (whose first pass records no graph and so reruns nothing).
    data = RandomPairs(make_model("tiny"), 12, seed=4)
    runs = {}
    for chunk in (None, 3):
        for recompute in ("none", "mlp", "layer"):
            model = make_model("tiny")
            out = tmp_path / f"c{chunk}-{recompute}"
            result = train(_config(tmp_path, out_dir=str(out), model="tiny", epochs=1, batch_size=6,
                                   chunk_size=chunk, recompute=recompute, checkpoint_every=0),
                           model=model, dataset=data)
            assert model.recompute == recompute
            runs[chunk, recompute] = ([r["loss"] for r in read_metrics(result["metrics"])],
                                      {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for chunk in (None, 3):
        losses, params = runs[chunk, "none"]
        assert len(losses) == 2
        for recompute in ("mlp", "layer"):
            rerun_losses, rerun_params = runs[chunk, recompute]
            assert losses == rerun_losses, (chunk, recompute)
            assert params.keys() == rerun_params.keys()
            assert all(torch.equal(params[n], rerun_params[n]) for n in params), (chunk, recompute)
    assert "recompute" in TrainConfig._RESUMABLE_CHANGES  # it changes no step's numbers


def test_recompute_config_and_flag(tmp_path):
    from ace_model import cli

    with pytest.raises(ValueError, match=r"^TrainConfig\.recompute: expected 'none', 'mlp' or 'layer'"):
        TrainConfig(recompute=True).validate()
    with pytest.raises(ValueError, match=r"^TrainConfig\.cuda_graph: TrainConfig\.recompute 'layer' replays"):
        TrainConfig(recompute="layer", cuda_graph=True).validate()
    TrainConfig(recompute="mlp", cuda_graph=True).validate()
    for flags, want in (([], "none"), (["--recompute", "mlp"], "mlp"), (["--recompute", "layer"], "layer")):
        args = cli._parser().parse_args(["train", "--csv", "x.csv", *flags])
        assert cli.train_config_from_args(args).recompute == want
    # A model that cannot rerun anything is named before any step.
    model = make_model("standin")
    with pytest.raises(ValueError, match="TrainConfig.recompute: the model .* has no recompute attribute"):
        train(_config(tmp_path, recompute="mlp"), model=model, dataset=RandomPairs(model, 8),
              loss_fn=dense_label_infonce)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.skipif(not tiny_available(), reason="ace_model.ACELoRA not importable")
def test_graphed_step_refuses_layer_recompute():
    model = make_model("tiny")
    model.recompute = "layer"
    images, token_ids, labels = make_batch(model, 2, seed=1)
    with pytest.raises(ValueError, match="argument 'model': its recompute='layer' replays"):
        training.GraphedTrainStep(model, images, token_ids, labels)


def test_resuming_a_finished_run_writes_its_final_weights(tmp_path):
    # Killed after its last checkpoint but before ace_lora.pt was written: the resume has no
    # step left to run, and writes the file from the weights it loaded.
    data = RandomPairs(make_model("standin"), 8, seed=1)
    first = train(_config(tmp_path, epochs=2, checkpoint_every=2), model=make_model("standin"), dataset=data,
                  loss_fn=dense_label_infonce)
    final = Path(first["reference"])
    want = torch.load(final, weights_only=True)
    final.unlink()
    again = train(_config(tmp_path, epochs=2, checkpoint_every=2, resume="auto"), model=make_model("standin"),
                  dataset=data, loss_fn=dense_label_infonce)
    assert again["steps"] == first["steps"] and again["reference"] == str(final)
    # Its summary's final loss is the last step's, which the state keeps for this case.
    assert again["final_loss"] == first["final_loss"] == read_metrics(first["metrics"])[-1]["loss"]
    got = torch.load(final, weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_new_directories_are_made_durable(tmp_path, monkeypatch):
    # Each directory a run creates is fsynced into its parent (out_dir, checkpoints/), and so is
    # a new metrics.jsonl's entry: a power loss cannot take away what was fsynced inside them.
    import ace_model._atomic as atomic

    synced = []
    real = atomic.fsync_directory

    def spy(directory):
        synced.append(Path(directory))
        real(directory)

    monkeypatch.setattr(atomic, "fsync_directory", spy)
    monkeypatch.setattr(training, "fsync_directory", spy)
    atomic.makedirs_durable(tmp_path / "x" / "y" / "z")
    assert synced == [tmp_path, tmp_path / "x", tmp_path / "x" / "y"]
    atomic.makedirs_durable(tmp_path / "x" / "y" / "z")  # nothing new: nothing to sync
    assert len(synced) == 3
    synced.clear()
    training._open_metrics_for_append(tmp_path / "metrics.jsonl").close()
    assert synced == [tmp_path]
    training._open_metrics_for_append(tmp_path / "metrics.jsonl").close()  # appending: no new entry
    assert synced == [tmp_path]

    made = []
    monkeypatch.setattr(training, "makedirs_durable", lambda d: (made.append(Path(d)), atomic.makedirs_durable(d)))
    out = tmp_path / "a" / "run"
    train(_config(tmp_path, out_dir=str(out), epochs=1, checkpoint_every=1), model=make_model("standin"),
          dataset=RandomPairs(make_model("standin"), 8, seed=1), loss_fn=dense_label_infonce)
    assert made[0] == out and out / "checkpoints" in made


def test_the_temp_name_pattern_matches_the_temp_names_atomic_writes_make_and_no_other(tmp_path):
    """A restart removes the files temp_name_pattern matches: the temp names create_temp_file makes (12 hex
    digits), never a user's file that only looks alike (the clean-up test's lookalikes hold no hex part, so a
    pattern taking any number of hex digits passed it and would delete '.latest.beef.tmp')."""
    from ace_model._atomic import create_temp_file, temp_name_pattern

    pattern = temp_name_pattern(r"latest|state-\d{8,}\.pt")
    for name in ("latest", "state-00000004.pt"):
        fd, tmp = create_temp_file(tmp_path / name)
        os.close(fd)
        assert pattern.match(os.path.basename(tmp)), tmp
    for name in (".latest.beef.tmp", ".latest.0123456789abcd.tmp", ".latest.0123456789AB.tmp", ".latest..tmp",
                 "latest.0123456789ab.tmp", ".latest.0123456789ab.tmp.bak", ".state-4.pt.0123456789ab.tmp"):
        assert not pattern.match(name), name


def test_an_atomic_write_to_a_long_name_gets_a_temp_name_that_fits(tmp_path):
    """A name the file system takes (up to 255 bytes) gets a temp name within 255 bytes too: the
    write no longer fails (ENAMETOOLONG) after the work; a multi-byte character cut in two is fine. A name of 237
    bytes is the longest whose temp name fits uncut ('.' + name + '.' + 12 hex digits + '.tmp': 255 bytes), one of
    238 the shortest that must be cut."""
    from ace_model._atomic import atomic_write_text

    for name in ("m" * 250 + ".json", "é" * 126 + ".j", "n" * 255, "o" * 237, "p" * 238):
        target = tmp_path / name
        atomic_write_text(target, "done\n")
        assert target.read_text() == "done\n"
    assert sorted(len(os.fsencode(p.name)) for p in tmp_path.iterdir()) == [237, 238, 254, 255, 255]


@pytest.mark.parametrize("what", ["state", "weights"])
def test_an_interrupt_while_a_file_is_written_is_a_keyboard_interrupt(tmp_path, monkeypatch, what):
    """Ctrl-C landing in a write of a state or of the released-format weights (as the training
    loop writes them): torch's zip writer turned it into a RuntimeError ("unexpected pos"), which
    the command line reported as a crash; the earlier file stays."""
    from ace_model._atomic import atomic_torch_save

    model = make_model("tiny") if what == "weights" else None
    if model is None:
        obj = {"weights": {f"w{i}": torch.randn(64, 64) for i in range(8)}, "step": 2}

        def save(path):
            atomic_torch_save(obj, path)
    else:
        def save(path):
            training._atomic_reference_save(model, path)

    target = tmp_path / "state.pt"
    atomic_torch_save({"step": 1}, target)
    before = target.read_bytes()
    real_fdopen = os.fdopen

    class Interrupted:
        def __init__(self, handle, at):
            self.handle, self.at, self.writes = handle, at, 0

        def write(self, data):
            self.writes += 1
            if self.writes == self.at:
                raise KeyboardInterrupt
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    for at in (1, 2, 3):
        monkeypatch.setattr(os, "fdopen", lambda fd, mode, at=at: Interrupted(real_fdopen(fd, mode), at))
        try:
            save(target)
        except KeyboardInterrupt:
            assert target.read_bytes() == before
        else:  # fewer writes than `at`: written whole
            assert torch.load(target, weights_only=True).keys() == ({"weights", "metadata"} if model else obj.keys())
            target.write_bytes(before)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temp file left


@pytest.mark.skipif(not hasattr(os, "fork"), reason="loader workers started by fork")
def test_ctrl_c_while_an_epochs_loader_workers_stop_is_raised(tmp_path, monkeypatch):
    """The workers of an epoch's loader are stopped where a KeyboardInterrupt propagates: left to
    the iterator's __del__ (garbage collection), one was printed as ignored and the run went on."""
    from torch.utils.data import dataloader

    real = dataloader._MultiProcessingDataLoaderIter._shutdown_workers
    calls = []

    def interrupted_shutdown(self):
        real(self)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_shutdown_workers", interrupted_shutdown)
    model = make_model("standin")
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, epochs=2, num_workers=1), model=model, dataset=RandomPairs(model, 8, seed=1),
              loss_fn=dense_label_infonce)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]  # the first epoch's


def test_a_failed_atomic_write_names_its_file(tmp_path, monkeypatch):
    """A full disk fails a write or fsync with an error naming no file ("[Errno 28] No space left
    on device"): it names the destination; the earlier file stays and no temp file is left."""
    import errno

    from ace_model._atomic import atomic_write, atomic_write_text

    target = tmp_path / "state.json"
    atomic_write_text(target, "before\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=rf"No space left on device: '{re.escape(str(target))}'"):
        atomic_write_text(target, "after\n")
    assert target.read_text() == "before\n" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    monkeypatch.undo()
    # An error that names a file already (the writer's own input, missing) keeps its name: the destination is
    # only given to errors that name none.
    source = tmp_path / "missing.csv"
    with pytest.raises(FileNotFoundError, match=rf"No such file or directory: '{re.escape(str(source))}'$"):
        atomic_write(target, lambda handle: handle.write(source.read_bytes()))
    assert target.read_text() == "before\n" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_atomic_write_whose_temp_file_cannot_be_removed_raises_the_writes_error(tmp_path, monkeypatch):
    """A write that fails (a full disk) and whose temp file then cannot be removed (the file system turned
    read-only) raises the write's error, naming the destination, with a note naming the temp file left behind;
    the clean-up's error used to take its place."""
    import errno

    from ace_model import _atomic

    target = tmp_path / "state.json"
    _atomic.atomic_write_text(target, "before\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def read_only(name):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), name)

    monkeypatch.setattr(os, "fsync", full_disk)
    monkeypatch.setattr(_atomic.os, "unlink", read_only)
    with pytest.raises(OSError, match=rf"No space left on device: '{re.escape(str(target))}'") as caught:
        _atomic.atomic_write_text(target, "after\n")
    monkeypatch.undo()
    left = [p for p in tmp_path.iterdir() if p.name != "state.json"]
    assert len(left) == 1 and target.read_text() == "before\n"
    assert caught.value.__notes__ == [f"and its temp file {str(left[0])!r} could not be removed: [Errno 30] "
                                      f"{os.strerror(errno.EROFS)}: {str(left[0])!r}"]


@pytest.mark.parametrize("refused", ["EINVAL", "ENOTSUP", "EACCES"])
def test_a_directory_that_cannot_be_fsynced_still_takes_atomic_writes(tmp_path, monkeypatch, refused):
    """Some file systems refuse fsync of a directory (EINVAL, ENOTSUP), and a directory that may be
    written but not read cannot be opened for it: the write, renamed into place before the directory's
    fsync, raised "[Errno 22] Invalid argument" naming no file, so every checkpoint of a run there
    failed though it was on disk. It is done, as durable as that file system makes it; another error
    of the directory's fsync (EIO) still raises, naming the directory."""
    import errno
    import stat

    from ace_model import _atomic

    real_open, real_fsync = os.open, os.fsync
    code = getattr(errno, refused)

    def open_(path, flags, *a, **k):
        if refused == "EACCES" and os.path.isdir(path):
            raise PermissionError(code, os.strerror(code), os.fspath(path))
        return real_open(path, flags, *a, **k)

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    target = tmp_path / "new" / "state.json"
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    _atomic.atomic_write_text(target, "before\n")  # makedirs_durable syncs the parent of new/ too
    _atomic.atomic_write_text(target, "after\n")
    _atomic.atomic_torch_save({"step": 1}, tmp_path / "state.pt")
    assert target.read_text() == "after\n" and os.listdir(target.parent) == ["state.json"]
    assert torch.load(tmp_path / "state.pt", weights_only=True) == {"step": 1}
    model = make_model("standin")
    summary = train(_config(tmp_path, max_steps=4, checkpoint_every=2), model=model, dataset=RandomPairs(model, 8),
                    loss_fn=dense_label_infonce)
    assert summary["steps"] == 4 and summary["state"].endswith("state-00000004.pt")

    def failing_disk(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(os, "fsync", failing_disk)
    with pytest.raises(OSError, match=rf"Input/output error: '{re.escape(str(target.parent))}'"):
        _atomic.atomic_write_text(target, "again\n")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts the descriptors in /proc/self/fd")
@pytest.mark.parametrize("refused", [None, "EINVAL"])
def test_atomic_writes_close_every_descriptor_they_open(tmp_path, monkeypatch, refused):
    """Each write opens its temp file and its directory (to fsync the rename): both are closed again, also where
    the file system refuses the directory's fsync, or a run writing a state every few steps there leaks one
    descriptor per file until it fails with EMFILE (too many open files)."""
    import errno
    import stat

    from ace_model import _atomic

    real_fsync = os.fsync

    def fsync(fd):
        if refused and stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(getattr(errno, refused), os.strerror(getattr(errno, refused)))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    before = set(os.listdir("/proc/self/fd"))
    for step in range(5):
        _atomic.atomic_write_text(tmp_path / "latest", f"{step}\n")
        _atomic.atomic_torch_save({"step": step}, tmp_path / "state.pt")
        _atomic.atomic_write_to_path(tmp_path / "w.pt", lambda path: Path(path).write_text("x"))
    # (A subset: a descriptor the garbage collector closes meanwhile is no leak.)
    after = set(os.listdir("/proc/self/fd"))
    assert after <= before, sorted(after - before)


@pytest.mark.parametrize("writer", ["atomic_write_text", "atomic_write_to_path", "atomic_torch_save"])
def test_an_atomic_write_over_a_file_keeps_its_permission_bits(tmp_path, writer):
    """Written in place, a file keeps its mode; replaced by a rename it would get a new file's
    (0666 less the umask): a checkpoint made private (0600) or read-only for the group must stay so."""
    import stat

    from ace_model import _atomic

    target = tmp_path / "state.pt"
    write = {"atomic_write_text": lambda: _atomic.atomic_write_text(target, "x\n"),
             "atomic_write_to_path": lambda: _atomic.atomic_write_to_path(target, lambda path: Path(path).write_text(
                 "x\n")),
             "atomic_torch_save": lambda: _atomic.atomic_torch_save({"step": 1}, target)}[writer]
    umask = os.umask(0o022)
    try:
        write()
        assert stat.S_IMODE(target.stat().st_mode) == 0o644  # a new file: 0666 less the umask
        for mode in (0o600, 0o640, 0o755):
            target.chmod(mode)
            write()
            assert stat.S_IMODE(target.stat().st_mode) == mode
    finally:
        os.umask(umask)


def test_an_atomic_write_over_a_symbolic_link_takes_the_mode_of_the_file_it_points_to(tmp_path):
    """A link's own mode is 0777: a write that read the mode of the link (lstat), not of its file, left the new file
    writable by anyone. The link is replaced by a file with the mode of the one it pointed to, left as it was."""
    import stat

    from ace_model import _atomic

    pointed, link = tmp_path / "kept.pt", tmp_path / "ace_lora.pt"
    pointed.write_text("old\n")
    pointed.chmod(0o600)
    link.symlink_to(pointed)
    _atomic.atomic_write_text(link, "new\n")
    assert not link.is_symlink() and link.read_text() == "new\n"
    assert stat.S_IMODE(link.stat().st_mode) == 0o600
    assert pointed.read_text() == "old\n" and stat.S_IMODE(pointed.stat().st_mode) == 0o600


@pytest.mark.parametrize("writer", ["atomic_write_text", "atomic_write_to_path", "atomic_torch_save"])
def test_an_atomic_write_to_a_bare_relative_name_writes_in_the_working_directory(tmp_path, monkeypatch, writer):
    """A file name without a directory ('ace_lora.pt') has '' for its directory: a writer that took it as it is,
    not from the absolute path, fsynced '' (FileNotFoundError) after the rename, so a save into the working
    directory failed though its file was written; every other test writes under tmp_path, an absolute path."""
    from ace_model import _atomic

    monkeypatch.chdir(tmp_path)
    {"atomic_write_text": lambda: _atomic.atomic_write_text("latest", "x\n"),
     "atomic_write_to_path": lambda: _atomic.atomic_write_to_path("latest", lambda path: Path(path).write_text("x\n")),
     "atomic_torch_save": lambda: _atomic.atomic_torch_save({"step": 1}, "latest")}[writer]()
    assert os.listdir(tmp_path) == ["latest"]
    assert (tmp_path / "latest").read_bytes() != b""


@pytest.mark.parametrize("writer", ["atomic_write_text", "atomic_write_to_path"])
def test_an_atomic_write_fsyncs_the_whole_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch,
                                                                                         writer):
    """A power loss after the rename must find the new content under the name: the temp file is
    fsynced holding all of it (the buffered writer flushed first; a writer that takes a path has
    its file opened again to fsync it), then renamed, then the directory is fsynced so that the
    rename lasts too."""
    import stat

    from ace_model import _atomic

    target, text = tmp_path / "latest", '{"step": 4, "state": "state-00000004.pt"}\n'
    write = {"atomic_write_text": lambda: _atomic.atomic_write_text(target, text),
             "atomic_write_to_path": lambda: _atomic.atomic_write_to_path(target, lambda path: Path(path).write_text(
                 text))}[writer]
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", info.st_ino, "directory" if stat.S_ISDIR(info.st_mode) else info.st_size))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", os.stat(src).st_ino, os.fspath(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write()
    monkeypatch.undo()
    written = os.stat(target).st_ino
    assert events == [("fsync", written, len(text)), ("replace", written, str(target)),
                      ("fsync", os.stat(tmp_path).st_ino, "directory")]
    assert target.read_text() == text


def test_a_state_written_before_a_field_existed_resumes_at_its_default(tmp_path):
    """A state whose config lacks a field added since (text_attention) resumes when the run keeps
    the field's default, and is refused when it sets another value."""
    data = RandomPairs(make_model("standin"), 16, seed=1)
    config = dict(epochs=2, checkpoint_every=2, keep_checkpoints=10)
    train(_config(tmp_path, **config), model=make_model("standin"), dataset=data, loss_fn=dense_label_infonce)
    state_path = tmp_path / "run" / "checkpoints" / "state-00000004.pt"
    state = torch.load(state_path, weights_only=False)
    del state["config"]["text_attention"]
    torch.save(state, state_path)
    resumed = train(_config(tmp_path, **config, resume=str(state_path)), model=make_model("standin"), dataset=data,
                    loss_fn=dense_label_infonce)
    assert resumed["steps"] == 8
    model = make_model("standin")
    model.text_attention = "reference-code"  # the stand-in has no text tower: the attribute is all train() reads
    with pytest.raises(ValueError, match=r"TrainConfig\.text_attention was None in the saved run, now "
                                         r"'reference-code'"):
        train(_config(tmp_path, **config, resume=str(state_path), text_attention="reference-code"),
              model=model, dataset=data, loss_fn=dense_label_infonce)


def test_a_model_passed_in_must_compute_the_text_attention_the_run_records(tmp_path):
    """config.json and the weights record TrainConfig.text_attention: a model passed in that computes
    the other one is refused before anything is written, as is the option on a model without it."""
    from ace_model import ACELoRA

    model = ACELoRA.from_config("tiny", text_attention="reference-code")
    with pytest.raises(ValueError, match=r"^TrainConfig\.text_attention: 'spec', but the model passed in computes "
                                         r"'reference-code'; set one to the other$"):
        train(_config(tmp_path, epochs=1), model=model, dataset=RandomPairs(make_model("standin"), 8, seed=1),
              loss_fn=dense_label_infonce)
    with pytest.raises(ValueError, match=r"^TrainConfig\.text_attention: the model \(StandInModel\) has no "
                                         r"text_attention attribute"):
        train(_config(tmp_path, epochs=1, text_attention="reference-code"), model=make_model("standin"),
              dataset=RandomPairs(make_model("standin"), 8, seed=1), loss_fn=dense_label_infonce)
    assert not (tmp_path / "run" / "config.json").exists()


def test_read_metrics_after_resuming_an_older_state_then_the_newest(tmp_path):
    """States at steps 2, 4 and 6, a failure in step 7; a resume from state 4 redoes step 5 and
    fails in step 6 (no new state); a resume of the newest state (6, written by the first
    process) then reads back the first process's steps 1-6, not the second's step 5 (and step 6,
    which the second never finished, is not lost)."""
    data = RandomPairs(make_model("standin", seed=3), 18, seed=1)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        train(_config(tmp_path, max_steps=9, checkpoint_every=2, keep_checkpoints=3),
              model=make_model("standin", seed=3), dataset=data, loss_fn=_failing_at(7))
    first = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(RuntimeError, match="injected failure"):
        train(_config(tmp_path, max_steps=9, checkpoint_every=2, keep_checkpoints=3,
                      resume=str(run / "checkpoints" / "state-00000004.pt")),
              model=make_model("standin", seed=3), dataset=data, loss_fn=_failing_at(2))
    second = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in second] == [1, 2, 3, 4, 5] and second[:4] == first[:4] and second[4] != first[4]
    train(_config(tmp_path, max_steps=9, checkpoint_every=2, keep_checkpoints=3, resume="auto"),
          model=make_model("standin", seed=3), dataset=data, loss_fn=dense_label_infonce)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 10))
    assert records[:6] == first


def test_a_negative_seed_trains_a_dataset_that_draws(tmp_path):
    """check_seed accepts |seed| < 2**46, negative ones too: the per-batch seeds must take them
    (NumPy's SeedSequence refuses negative entropy), each seed giving its own."""
    model = make_model("standin", seed=3)
    result = train(_config(tmp_path, seed=-3, epochs=2, warmup_epochs=0, checkpoint_every=0), model=model,
                   dataset=_NoisyPairs(model, 8, seed=1), loss_fn=dense_label_infonce)
    assert len(read_metrics(result["metrics"])) == 4
    assert len({training.batch_seed_words(s, 0, 0, 0).tobytes() for s in (-3, 3, -(2**46) + 1)}) == 3


class _BatchedPairs(RandomPairs):
    """A dataset that loads a batch at once (torch's ``__getitems__`` protocol)."""

    calls: list = []

    def __getitems__(self, indices):
        self.calls.append(list(indices))
        return [super(_BatchedPairs, self).__getitem__(i) for i in indices]


def test_a_dataset_with_getitems_is_asked_for_whole_batches(tmp_path):
    model = make_model("standin", seed=3)
    _BatchedPairs.calls = []
    train(_config(tmp_path, epochs=1, warmup_epochs=0, checkpoint_every=0), model=model,
          dataset=_BatchedPairs(model, 8, seed=1), loss_fn=dense_label_infonce)
    assert len(_BatchedPairs.calls) == 2 and all(len(c) == 4 for c in _BatchedPairs.calls)
    assert sorted(i for c in _BatchedPairs.calls for i in c) == list(range(8))


# ------------------------------------------------------------------ edges the coverage run found untested

def test_the_logit_scale_may_be_a_tensor_a_module_or_a_callable():
    from types import SimpleNamespace

    scale = torch.nn.Parameter(torch.tensor(3.0))
    holder = torch.nn.Module()
    holder.value = scale
    assert training.logit_scale_parameter(SimpleNamespace(logit_scale=scale)) is scale
    assert training.logit_scale_parameter(SimpleNamespace(logit_scale=holder)) is scale
    assert training.logit_scale_parameter(SimpleNamespace(logit_scale=lambda: scale)) is scale
    holder.other = torch.nn.Parameter(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"^model\.logit_scale is a module with 2 parameters; expected exactly 1$"):
        training.logit_scale_parameter(SimpleNamespace(logit_scale=holder))
    for bad, name in ((None, "NoneType"), (lambda: 2.5, "float"), (torch.nn.Module(), None)):
        want = (r"^model\.logit_scale is a module with 0 parameters" if name is None else
                rf"^model\.logit_scale: expected a tensor \(the learnable logit multiplier\), got {name}$")
        with pytest.raises(ValueError, match=want):
            training.logit_scale_parameter(SimpleNamespace(logit_scale=bad))
    # A model without parameters runs on the CPU.
    assert training._model_device(torch.nn.Module()) == torch.device("cpu")


def test_chunked_step_refuses_bad_images_and_precisions_before_any_work():
    model = make_model("standin")
    images, token_ids, labels = make_batch(model, 4)
    model.zero_grad(set_to_none=True)
    for bad, name in ((images.tolist(), "list"), (images[0, 0, 0, 0], "Tensor")):  # not batched: 0-d
        with pytest.raises(ValueError, match=rf"^argument 'images': expected a batched tensor, got {name}$"):
            chunked_train_step(model, bad, token_ids, labels, chunk_size=2, loss_fn=dense_label_infonce)
    with pytest.raises(ValueError, match=r"^argument 'images': expected at least one sample, got an empty batch$"):
        chunked_train_step(model, images[:0], token_ids[:0], labels[:0], chunk_size=2, loss_fn=dense_label_infonce)
    # A misspelt precision ran the step in fp32 without a word (autocast only knows "auto" and "bf16").
    for bad in ("fp16", "BF16", None):
        with pytest.raises(ValueError, match=rf"^argument 'precision': expected 'auto', 'bf16' or 'fp32', "
                                             rf"got {re.escape(repr(bad))}$"):
            chunked_train_step(model, images, token_ids, labels, chunk_size=2, precision=bad,
                               loss_fn=dense_label_infonce)
    # bf16 autocast needs CUDA: refused on the CPU model, in one pass as in two.
    for chunk in (None, 2):
        with pytest.raises(ValueError, match=r"^precision 'bf16' needs a CUDA device, got cpu$"):
            chunked_train_step(model, images, token_ids, labels, chunk_size=chunk, precision="bf16",
                               loss_fn=dense_label_infonce)
    assert all(p.grad is None for p in model.parameters())


def _as_rank_0_of_2(monkeypatch, all_gather, other_text: str) -> None:
    """This process as rank 0 of two over gloo; ``all_gather`` stands in for the collective and rank
    1's text of a differing field comes back from the object gather."""
    monkeypatch.setattr(training.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(training.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(training.dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(training.dist, "all_gather", all_gather)
    monkeypatch.setattr(training.dist, "all_gather_object",
                        lambda objects, obj, group=None: objects.__setitem__(slice(None), [obj, other_text]))


def test_a_rank_with_bad_inputs_raises_its_own_error_when_the_others_are_fine(monkeypatch):
    """The rank whose inputs are bad raises its own ValueError (what to fix), not the mismatch the
    exchange finds; the other ranks get the RankMismatchError (tests/test_training_distributed.py)."""
    model = make_model("standin")
    images, token_ids, labels = make_batch(model, 4)
    good = {"inputs valid": 1, "local batch size": 4, "image shape": training._shape_code(images.shape[1:]),
            "token shape": training._shape_code(token_ids.shape[1:]), "labels": training._shape_code(labels.shape[1:]),
            "loss scope": training._stable_hash("global")}
    good_codes = [training._stable_hash(list(good)), *good.values()]
    exchanges = []

    def all_gather(tensors, tensor, group=None):  # rank 1's inputs are valid
        exchanges.append(tensor.numel())
        tensors[0].copy_(tensor)
        tensors[1].copy_(torch.tensor([6, good_codes[0], training._stable_hash(good_codes)]) if tensor.numel() == 3
                         else torch.tensor(good_codes))

    _as_rank_0_of_2(monkeypatch, all_gather, other_text="1")
    with pytest.raises(ValueError, match=r"^argument 'labels': expected 4 rows like 'images', got \[3, 3\]$") as info:
        chunked_train_step(model, images, token_ids, labels[:3], chunk_size=2, group=object(),
                           loss_fn=dense_label_infonce)
    assert exchanges == [3, 7] and info.value.__suppress_context__
    # So does a rank whose options are bad (they were checked before the exchange, which the other
    # ranks then waited in until the timeout): a loss scope of none, bf16 on the CPU.
    for options, message in (({"loss_scope": "locale"}, "argument 'loss_scope': expected 'global' or 'local'"),
                             ({"precision": "bf16"}, "precision 'bf16' needs a CUDA device")):
        exchanges.clear()
        with pytest.raises(ValueError, match=message):
            chunked_train_step(model, images, token_ids, labels, chunk_size=2, group=object(),
                               loss_fn=dense_label_infonce, **options)
        assert exchanges == [3, 7], options


def test_sync_gradients_gives_a_gradient_only_another_rank_computed(monkeypatch):
    """A parameter without a gradient here but with one on another rank gets the sum (or mean)."""
    other_rank = torch.tensor([2.0, 2.0, 2.0, 5.0, 7.0, 1.0, 1.0])  # its two gradients, then "has one" flags

    def all_reduce(tensor, op=None, group=None):
        tensor.add_(other_rank)

    monkeypatch.setattr(training.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(training.dist, "all_reduce", all_reduce)
    for average, want in ((False, ([3.0, 3.0, 3.0], [5.0, 7.0])), (True, ([1.5, 1.5, 1.5], [2.5, 3.5]))):
        params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
        params[0].grad = torch.ones(3)
        training.sync_gradients(params, group=object(), average=average)
        assert [p.grad.tolist() for p in params] == list(want), average
        assert params[1].grad.dtype == torch.float32 and params[1].grad.shape == (2,)


def test_config_from_a_dict_with_unknown_fields_is_refused():
    with pytest.raises(ValueError, match=r"^TrainConfig: unknown fields \['bogus', 'learning_rate'\]$"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "learning_rate": 1e-3, "bogus": 1})


def test_collate_batch_reads_dict_items_under_each_key_spelling():
    def item(i, **keys):
        values = {"image": torch.full((3, 2, 2), float(i)), "tokens": torch.tensor([i, 1]), "label": torch.tensor([i])}
        return {spelling: values[what] for spelling, what in keys.items()}

    spellings = [dict(image="image", token_ids="tokens", labels="label"),
                 dict(images="image", tokens="tokens", label="label"),
                 dict(image="image", input_ids="tokens", labels="label")]
    images, tokens, labels = training.collate_batch([item(i, **s) for i, s in enumerate(spellings)])
    assert torch.equal(images, torch.arange(3.0)[:, None, None, None].expand(3, 3, 2, 2))
    assert tokens.tolist() == [[0, 1], [1, 1], [2, 1]] and labels.tolist() == [[0], [1], [2]]
    # An item without labels: the batch has none (the plain CLIP loss).
    _, _, labels = training.collate_batch([item(0, **spellings[0]), item(1, image="image", tokens="tokens")])
    assert labels is None


def test_the_fork_hook_points_held_lock_descriptors_at_dev_null(tmp_path, monkeypatch):
    """What a forked child runs (tests above fork one; its coverage is not recorded): each held lock
    descriptor now names /dev/null; with no descriptor left to open /dev/null, each is closed
    instead, one that is closed already passed over."""
    lock = tmp_path / "lock"
    lock.write_text("")
    fd = os.open(lock, os.O_RDONLY)
    held = {fd}
    monkeypatch.setattr(training, "_HELD_LOCKS", held)
    try:
        training._drop_locks_in_child()
        assert os.path.samestat(os.fstat(fd), os.stat(os.devnull)) and not held
    finally:
        os.close(fd)
    fd, gone = os.open(lock, os.O_RDONLY), os.open(lock, os.O_RDONLY)
    os.close(gone)
    held.update({fd, gone})

    def no_descriptor_left(*args, **kwargs):
        raise OSError(24, "Too many open files")

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", no_descriptor_left)
        training._drop_locks_in_child()
    assert not held
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_the_out_dir_lock_is_skipped_where_locks_are_unsupported(tmp_path, monkeypatch):
    """A file system that refuses flock (ENOLCK on NFS) or no fcntl at all (not POSIX): the run goes
    on unlocked, and its own errors are not chained to the lock's."""
    import errno
    import sys

    fcntl = pytest.importorskip("fcntl")

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(RuntimeError, match="the run's own") as info:
        with training._lock_out_dir(tmp_path):
            raise RuntimeError("the run's own")
    assert info.value.__context__ is None
    assert (tmp_path / training.LOCK_NAME).read_text() == "" and not training._HELD_LOCKS  # no holder line
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl raises ImportError
    with training._lock_out_dir(tmp_path / "nowhere"):
        pass
    assert not (tmp_path / "nowhere").exists()


def test_resume_paths_that_hold_nothing_resumable_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"^TrainConfig\.resume: {re.escape(repr(str(empty)))} has no 'latest' "
                                                r"file, nor has its checkpoints/$"):
        training.resolve_resume(empty, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest").write_text(json.dumps({"step": 3, "state": "state-00000003.pt"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"checkpoints/latest names state-00000003\.pt, which does not exist$"):
        training.resolve_resume("auto", tmp_path / "run")
    # JSON naming no state (hand-edited, or another tool's): named as unreadable, not a bare KeyError.
    (ckpt / "latest").write_text(json.dumps({"step": 3}) + "\n")
    with pytest.raises(training.TrainingStateError, match=r"checkpoints/latest: unreadable checkpoint pointer, "
                                                          r"expected JSON with a 'state' file name \(KeyError: "
                                                          r"'state'\)$"):
        training.resolve_resume("auto", tmp_path / "run")
    for name, content, found in (("list.pt", [1, 2], "'list'"), ("other.pt", {"format": "other"}, "'other'"),
                                 ("plain.pt", {"step": 3}, "None")):
        torch.save(content, tmp_path / name)
        with pytest.raises(training.TrainingStateError, match=rf"{name}: not an ace-lora training state \(format field "
                                                              rf"{found}, expected 'ace-lora-train-state'\)$"):
            load_state(tmp_path / name)


def test_read_metrics_skips_lines_that_are_json_but_no_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "start", "step": 0}\n{"step": 1, "loss": 2.0}\n[1, 2]\n7\n"x"\n'
                    '{"step": 2, "loss": 1.0}\n')
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 2.0), (2, 1.0)]


def test_a_model_with_nothing_to_train_is_refused_before_any_file_is_written(tmp_path):
    data = RandomPairs(make_model("standin"), 8)
    frozen = make_model("standin").requires_grad_(False)
    with pytest.raises(ValueError, match=r"^the model has no parameters with requires_grad=True$"):
        train(_config(tmp_path), model=frozen, dataset=data, loss_fn=dense_label_infonce)
    fixed_scale = make_model("standin")
    fixed_scale.logit_scale.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^model\.logit_scale is not among the trainable parameters$"):
        train(_config(tmp_path), model=fixed_scale, dataset=data, loss_fn=dense_label_infonce)
    assert not (tmp_path / "run").exists()


class _DiskFillsUp:
    """``metrics.jsonl`` on a disk that is full after ``lines`` lines: each later write fails (and,
    with ``flush_fails``, each flush and the close, as a full disk's buffered writes do), every
    error numbered so that a test sees which one a run raised."""

    def __init__(self, path, lines: int, flush_fails: bool):
        self.file = open(path, "a", encoding="utf-8")
        self.left, self.flush_fails, self.full, self.errors = lines, flush_fails, False, []

    def _error(self):
        self.errors.append(OSError(28, f"No space left on device (simulated #{len(self.errors) + 1})"))
        return self.errors[-1]

    def write(self, text):
        if self.left <= 0:
            self.full = True
            raise self._error()
        self.left -= text.count("\n")
        return self.file.write(text)

    def flush(self):
        if self.full and self.flush_fails:
            raise self._error()
        self.file.flush()

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self.file.close()
        if self.full and self.flush_fails:
            raise self._error()


def test_a_metrics_line_that_cannot_be_written_stops_the_run_with_its_error(tmp_path, monkeypatch):
    """The step whose line fails finishes; the next one stops before its step with that error (not
    the flush's or close's that fail after it); a failure at the last step's line stops the run
    before the final ace_lora.pt, and at a checkpoint's step before its state, even when the
    flush then succeeds (a resume from it would go on past a step the metrics lack)."""
    model = make_model("standin")  # shapes the data
    steps = []
    step = training.chunked_train_step
    monkeypatch.setattr(training, "chunked_train_step", lambda *a, **k: steps.append(1) or step(*a, **k))
    for name, lines, flush_fails, max_steps, ran in (("mid", 2, True, None, 2), ("last", 2, False, 2, 2),
                                                     ("checkpoint", 2, False, 3, 2)):
        disks = []
        monkeypatch.setattr(training, "_open_metrics_for_append",
                            lambda path: disks.append(_DiskFillsUp(path, lines, flush_fails)) or disks[-1])
        steps.clear()
        out = tmp_path / name
        data = _RecordingPairs(model, 8, seed=1)
        with pytest.raises(OSError, match=r"simulated #1\)$"):
            train(_config(out, max_steps=max_steps, warmup_epochs=0, checkpoint_every=2 if name == "checkpoint" else 4),
                  model=make_model("standin"), dataset=data, loss_fn=dense_label_infonce)
        assert len(steps) == ran and len(data.seen) == 4 * ran, name  # nor was the next batch loaded
        assert [r["step"] for r in read_metrics(out / "run" / "metrics.jsonl")] == [1], name
        assert len(disks[0].errors) == (3 if flush_fails else 1), name  # the flush and close after it were tried
        assert disks[0].file.closed and not (out / "run" / "ace_lora.pt").exists(), name
        assert not list((out / "run").rglob("state-*")), name  # no state past the last metrics line


def test_a_state_for_other_or_reordered_trainable_parameters_is_refused(tmp_path):
    """Another parameter name is refused; so is another order of the same names: the optimizer's
    moments are stored by position, so such a model would resume with moments swapped between
    same-shaped parameters (the error names the first position that differs)."""
    model = make_model("standin")
    data = RandomPairs(model, 8, seed=1)
    train(_config(tmp_path, epochs=1, warmup_epochs=0), model=model, dataset=data, loss_fn=dense_label_infonce)

    def renamed(trainable):
        trainable["image_head.scale"] = trainable.pop("image_head.bias")
        return (r"renamed\.pt: trainable parameters differ \(missing \['image_head\.bias'\], "
                r"unexpected \['image_head\.scale'\]\)$")

    def added(trainable):  # every parameter there, and one more the model lacks: loading would drop it
        trainable["image_head.scale"] = torch.ones(8)
        return r"added\.pt: trainable parameters differ \(missing \[\], unexpected \['image_head\.scale'\]\)$"

    def reordered(trainable):
        first = next(iter(trainable))
        trainable[first] = trainable.pop(first)  # the same entries, the first moved last
        return (r"reordered\.pt: the trainable parameters come in another order than the state's "
                rf"\(position 0: '{first}' now")

    for edit in (renamed, added, reordered):
        state = load_state(tmp_path / "run" / "checkpoints" / "state-00000002.pt")
        pattern = edit(state["trainable"])
        torch.save(state, tmp_path / f"{edit.__name__}.pt")
        with pytest.raises(training.TrainingStateError, match=pattern):
            train(_config(tmp_path, epochs=1, warmup_epochs=0, resume=str(tmp_path / f"{edit.__name__}.pt"),
                          out_dir=str(tmp_path / f"again-{edit.__name__}")),
                  model=make_model("standin"), dataset=data, loss_fn=dense_label_infonce)


def test_train_reads_a_csv_whose_images_live_under_image_root(tmp_path):
    from ace_model.data import make_synthetic_dataset

    if not tiny_available():
        pytest.skip("ace_model.ACELoRA not importable")
    csv_path = make_synthetic_dataset(tmp_path / "data", 8, seed=0)
    moved = tmp_path / "elsewhere" / "train.csv"  # the CSV's image paths are relative to its old folder
    moved.parent.mkdir()
    csv_path.rename(moved)
    config = TrainConfig(csv=str(moved), image_root=str(tmp_path / "data"), out_dir=str(tmp_path / "run"),
                         model="tiny", epochs=1, batch_size=4, max_steps=1, warmup_epochs=0, checkpoint_every=0,
                         progress=False)
    result = train(config)
    assert result["steps"] == 1 and math.isfinite(result["final_loss"])


def test_a_failed_measurement_says_what_its_process_wrote(monkeypatch):
    import subprocess

    ran = []

    def failing(cmd, **kwargs):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="x" * 5000 + "ValueError: no such model")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(RuntimeError) as info:
        training.measure_chunked_step(8, 2, model="none")
    assert str(info.value) == ("measure_chunked_step(8, 2) failed:\n"
                               + ("x" * 5000 + "ValueError: no such model")[-4000:])
    assert ran[0][ran[0].index("--chunk-size") + 1] == "2" and ran[0][ran[0].index("--model") + 1] == "none"


@pytest.mark.parametrize("flag", ["--steps", "--batch", "--threads", "--chunk-size"])
def test_the_measuring_command_refuses_counts_below_one_naming_the_flag(flag, monkeypatch, capsys):
    # --steps 0 built the model, then divided by zero.
    monkeypatch.setattr(training, "_measure_in_this_process", lambda *a: pytest.fail("measured"))
    argv = ["measure", "--batch", "2", "--steps", "1", "--threads", "1", "--chunk-size", "1"]
    argv[argv.index(flag) + 1] = "0"
    with pytest.raises(SystemExit) as info:
        training._main(argv)
    assert info.value.code == 2 and f"argument {flag}: expected >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--device", "gpu"], "argument --device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (["--device", "cuda:99"], "argument --device: 'cuda:99'"),
    (["--device", "cpu", "--precision", "bf16"], "argument --precision: 'bf16' autocast needs a CUDA device, got "
                                                 "--device 'cpu'"),
    (["--model", "huge"], "argument --model: invalid choice: 'huge' (choose from 'biomedclip', 'tiny')")])
def test_the_measuring_command_refuses_a_device_or_precision_it_cannot_run_before_building(flags, message,
                                                                                        monkeypatch, capsys):
    # Each was a traceback from torch or the step, the last two after the model was built (a --model that
    # ACELoRA.from_config does not know: its ValueError's traceback).
    monkeypatch.setattr(training, "_measure_in_this_process", lambda *a: pytest.fail("measured"))
    with pytest.raises(SystemExit) as info:
        training._main(["measure", "--batch", "2", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err
    measured = []
    monkeypatch.setattr(training, "_measure_in_this_process", lambda *a: measured.append(a) or {})
    assert training._main(["measure", "--batch", "2", "--device", "auto"]) == 0
    assert measured[0][5] == str(training.resolve_device("auto"))  # a device torch.device takes


@pytest.mark.gpu
def test_the_measuring_command_stores_the_frozen_weights_in_bf16_on_cuda_as_train_does(monkeypatch):
    # It measured a model with float32 frozen weights under bf16 autocast: every step's peak carried
    # autocast's copies of them, which ace-lora train (cast_frozen_weights) never makes.
    from ace_model.model import ACELoRA

    cast, real = [], ACELoRA.cast_frozen_weights
    monkeypatch.setattr(ACELoRA, "cast_frozen_weights", lambda self, dtype: cast.append(dtype) or real(self, dtype))
    result = training._measure_in_this_process(4, 2, "tiny", 0, 1, "cuda", 1, "auto")
    assert cast == [torch.bfloat16] and math.isfinite(result["loss"])
    cast.clear()
    training._measure_in_this_process(4, 2, "tiny", 0, 1, "cuda", 1, "fp32")
    assert cast == []


def test_an_atomic_write_that_finds_no_free_temp_name_says_so(tmp_path, monkeypatch):
    from ace_model import _atomic

    target = tmp_path / "state.json"
    monkeypatch.setattr(_atomic.secrets, "token_hex", lambda n: "0" * (2 * n))
    (tmp_path / ".state.json.000000000000.tmp").write_text("another write's")
    tries = []
    real_open = os.open
    monkeypatch.setattr(_atomic.os, "open", lambda *a, **k: tries.append(1) or real_open(*a, **k))
    with pytest.raises(FileExistsError, match=rf"^no free temporary name for {re.escape(repr(str(target)))} after 100 "
                                              r"tries$"):
        _atomic.atomic_write_text(target, "x")
    assert len(tries) == 100 and not target.exists()
    # Any other error (a read-only file system, a directory it may not write) is no taken name: raised at once, as it
    # is, not tried 100 times and then reported as no free name.
    import errno

    tries.clear()

    def read_only(*args, **kwargs):
        tries.append(1)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), args[0])

    monkeypatch.setattr(_atomic.os, "open", read_only)
    with pytest.raises(OSError, match="Read-only file system") as info:
        _atomic.atomic_write_text(target, "x")
    assert info.value.errno == errno.EROFS and len(tries) == 1


def test_a_writer_that_removed_its_temp_file_fails_with_its_own_error(tmp_path):
    from ace_model._atomic import atomic_write_to_path

    def writer(tmp):
        os.unlink(tmp)
        raise RuntimeError("the writer's own")

    with pytest.raises(RuntimeError, match="^the writer's own$") as info:
        atomic_write_to_path(tmp_path / "weights.pt", writer)
    assert info.value.__context__ is None and list(tmp_path.iterdir()) == []
