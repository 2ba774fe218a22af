"""Training loop for ACE-LoRA: large contrastive batches, several processes, exact resume.

Three pieces, usable separately:

- :func:`chunked_train_step` -- one forward/backward of the contrastive loss over a batch
  of any size with memory set by the chunk size: pass 1 computes every embedding chunk
  by chunk without an autograd graph, the loss runs once on the full batch with the
  embeddings as leaves (giving dL/d(embeddings) and dL/d(logit multiplier)), and pass 2
  reruns each chunk with autograd and backpropagates the cached embedding gradients.
  The RNG state is saved before each chunk in pass 1 and restored before the same chunk
  in pass 2, so both passes draw the same dropout masks. Without dropout (``eval()`` or
  p = 0) the gradients are those of the one-pass step for any chunk size, up to
  summation order. With dropout they are those of a one-pass step that drew its masks
  chunk by chunk in the same order; another chunk size (or the one-pass step) draws
  other, identically distributed masks, so it is the same stochastic step but not the
  same numbers. Masks that do not depend on the chunking are not offered: the attention
  dropout inside ``scaled_dot_product_attention`` draws one mask per call from the
  generator, so a sample's mask depends on which samples share its call.
- torch.distributed: :func:`sync_gradients` sums the trainable gradients over ranks (see
  its docstring for the gradient convention), :func:`check_ranks_agree` fails with a
  clear error when ranks disagree on batch size or configuration instead of hanging.
- :class:`TrainConfig` and :func:`train`, the loop behind ``ace-lora train``: AdamW and a
  cosine schedule with linear warm-up (the paper's recipe), seeded data order, bf16
  autocast on GPU, JSON-lines metrics, atomic checkpoints in the released format and as a
  full resumable state, ``resume="auto"``, and a stop with an error on a non-finite loss.

Checkpoint directory layout (``<out_dir>/checkpoints``)::

    state-00000100.pt     full training state at step 100 (weights_only-loadable)
    ace_lora-00000100.pt  the trainable weights in the released ACE_LoRA.pt format
    latest                JSON naming the newest complete pair, replaced atomically

A state file is complete before ``latest`` names it, and older files are pruned only
after that, so a crash at any instant leaves the previous good state intact. Only this
run's own older checkpoints are pruned (each state lists them): files of another run,
e.g. of an abandoned run resumed from an older state, are left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import numbers
import os
import random
import re
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ace_kernels._checks import check_finite_number
from ace_model._atomic import (atomic_torch_save, atomic_write, atomic_write_text, atomic_write_to_path,
                               fsync_directory, makedirs_durable, temp_name_pattern)
from ace_model.checkpoint import (CheckpointError, apply_reference_checkpoint, first_line, load_weights_only,
                                 read_model_file, read_reference_checkpoint)
from ace_model.model import CONFIG_NAMES, TEXT_ATTENTION

STATE_FORMAT = "ace-lora-train-state"
# Version 2 added dataset_length, steps_per_epoch and checkpoint_steps (and pruned_steps,
# dataset_fingerprint and frozen_weights_digest, read when present). Version 1 states are still
# read: the dataset check is skipped and the run's checkpoints are inferred.
STATE_VERSION = 2
# Key of the released-format metadata entry that a trained weights file adds: {"model", "seed",
# "pretrained"} of the run (other readers of the format ignore keys they do not know).
TRAINED_WITH = "ace_lora_trained_with"


def recorded_text_attention(metadata: dict):
    """What a weights file's metadata records of its run's text attention (``ace-lora train``
    writes it), as found (not checked), or None."""
    trained = metadata.get(TRAINED_WITH)
    return trained.get("text_attention") if isinstance(trained, dict) else None


def recorded_model(blob) -> str | None:
    """The model configuration ("biomedclip" or "tiny") that a released-format file's object (``blob``,
    as :func:`ace_model.checkpoint.read_reference_checkpoint` returns it) records its run built, or
    None where it records none (the released ACE_LoRA.pt) or none of these (the load then names what
    does not fit)."""
    metadata = blob.get("metadata") if isinstance(blob, dict) else None
    trained = metadata.get(TRAINED_WITH) if isinstance(metadata, dict) else None
    model = trained.get("model") if isinstance(trained, dict) else None
    return model if isinstance(model, str) and model in CONFIG_NAMES else None


_READABLE_STATE_VERSIONS = (1, 2)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or parameter; no checkpoint holds it."""


class RankMismatchError(RuntimeError):
    """Processes of one distributed run disagree on batch size or configuration."""


class TrainingStateError(ValueError):
    """A training state (or its ``latest`` pointer) is unreadable or does not fit this
    run; the message names the file."""


# ----------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_default_device():
    """Tensor factories without ``device=`` make CPU tensors inside, as the code of :func:`train`
    and :func:`ace_model.zero_shot.evaluate` expects (their data is made on the CPU, their model
    moved to the run's device), whatever ``torch.set_default_device`` (or a ``torch.device``
    context around the call) says. Nothing is entered when the default device is already the CPU,
    so the usual call pays no per-op cost."""
    if torch.get_default_device().type == "cpu":
        yield
    else:
        with torch.device("cpu"):
            yield


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def logit_scale_parameter(model: nn.Module) -> torch.Tensor:
    """The learnable logit multiplier of ``model`` (spec section 1: the multiplier itself).

    Accepts ``model.logit_scale`` as a tensor, as a module holding one parameter, or as a
    zero-argument callable returning the tensor.
    """
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, nn.Module):
        params = [p for p in scale.parameters()]
        if len(params) != 1:
            raise ValueError(f"model.logit_scale is a module with {len(params)} parameters; expected exactly 1")
        scale = params[0]
    elif callable(scale) and not isinstance(scale, torch.Tensor):
        scale = scale()
    if not isinstance(scale, torch.Tensor):
        raise ValueError("model.logit_scale: expected a tensor (the learnable logit multiplier), got "
                         f"{type(scale).__name__}")
    return scale


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad``, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _default_loss_fn(model: nn.Module | None = None) -> Callable:
    """``ace_kernels.label_guided_infonce`` on the model's backend (``model.backend``) if it has one."""
    from ace_kernels import label_guided_infonce

    backend = getattr(model, "backend", None)
    if not isinstance(backend, str):
        return label_guided_infonce

    def loss(image_emb, text_emb, logit_scale, labels=None, **kwargs):
        return label_guided_infonce(image_emb, text_emb, logit_scale, labels, backend=backend, **kwargs)

    return loss


def _call_loss(loss_fn, image_emb, text_emb, scale, labels, group):
    if group is None:
        return loss_fn(image_emb, text_emb, scale, labels)
    return loss_fn(image_emb, text_emb, scale, labels, group=group)


# The step's precision: "auto" (bf16 autocast on CUDA, none on the CPU), "bf16" (CUDA only) or "fp32".
PRECISIONS = ("auto", "bf16", "fp32")


def _check_precision(where: str, precision) -> None:
    """Raise ValueError naming ``where`` (the argument or field) unless ``precision`` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"{where}: expected 'auto', 'bf16' or 'fp32', got {precision!r}")


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA when ``precision`` is "bf16" (or "auto"); nothing otherwise."""
    if device.type == "cuda" and precision in ("bf16", "auto"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16" and device.type != "cuda":
        raise ValueError(f"precision 'bf16' needs a CUDA device, got {device}")
    return contextlib.nullcontext()


def _encode_pair(model, images, token_ids, device, precision):
    images = images.to(device, non_blocking=True)
    token_ids = token_ids.to(device, non_blocking=True)
    with autocast_context(device, precision):
        image_emb = model.encode_image(images)
        text_emb = model.encode_text(token_ids)
    return image_emb, text_emb


# ----------------------------------------------------------------------------------------
# RNG capture and replay (dropout in pass 2 must see pass 1's masks)
# ----------------------------------------------------------------------------------------


def _capture_torch_rng(device: torch.device):
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def _restore_torch_rng(state, device: torch.device) -> None:
    cpu_state, cuda_state = state
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)


# ----------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------


def _check_step_inputs(images, token_ids, labels, chunk_size):
    if not isinstance(images, torch.Tensor) or images.dim() < 1:
        raise ValueError(f"argument 'images': expected a batched tensor, got {type(images).__name__}")
    batch = images.shape[0]
    if batch == 0:
        raise ValueError("argument 'images': expected at least one sample, got an empty batch")
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() < 1 or token_ids.shape[0] != batch:
        got = list(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise ValueError(f"argument 'token_ids': expected {batch} rows like 'images', got {got}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.dim() < 1 or labels.shape[0] != batch):
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"argument 'labels': expected {batch} rows like 'images', got {got}")
    if chunk_size is not None and (not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"argument 'chunk_size': expected a positive int or None, got {chunk_size!r}")


def chunked_train_step(
    model: nn.Module,
    images: torch.Tensor,
    token_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    chunk_size: int | None,
    group=None,
    loss_fn: Callable | None = None,
    precision: str = "auto",
    check_ranks: bool = True,
    loss_scope: str = "global",
) -> torch.Tensor:
    """Forward and backward of the contrastive loss, ``chunk_size`` samples at a time.

    Gradients are accumulated into ``.grad`` of the trainable parameters (call
    ``zero_grad`` first) exactly as ``loss.backward()`` of one autograd graph over the
    whole batch would, up to floating-point summation order, when that graph draws its
    dropout masks chunk by chunk in the same order. Without dropout this is the one-pass
    step for any ``chunk_size``; with dropout a different ``chunk_size`` draws different
    (identically distributed) masks -- see the module docstring. Peak activation memory
    is that of one chunk; what grows with the batch is only the ``[B, D]`` embeddings and
    their gradients.

    Parameters
    ----------
    model : nn.Module
        Provides ``encode_image(images) -> [b, D]``, ``encode_text(token_ids) -> [b, D]``
        (normalised, after ACE-HGNN) and the learnable ``logit_scale`` multiplier.
    images, token_ids : Tensor
        The local batch, ``B`` rows each. They may stay on the CPU (pinned for speed):
        each chunk is moved to the model's device when it is needed, so device memory
        does not grow with ``B`` through the inputs either.
    labels : Tensor or None
        Label vectors ``[B, L]`` for the label-guided mask; None gives the CLIP loss.
    chunk_size : int or None
        Samples per chunk. None, or a value >= B, runs the one-pass step.
    group : ProcessGroup or None
        With a group the loss is that of the global batch (all ranks' batches
        concatenated in rank order) and ranks must agree on the batch size; gradients are
        left as the loss function returns them: call :func:`sync_gradients` afterwards.
    loss_fn : callable, optional
        ``loss_fn(image_emb, text_emb, logit_scale, labels[, group=])``; defaults to
        ``ace_kernels.label_guided_infonce``.
    precision : {"auto", "bf16", "fp32"}
        "auto" is bf16 autocast for the encoders on CUDA, none on the CPU.
    check_ranks : bool
        With a group, first all-gather the batch shape and the loss scope, and fail on disagreement.
    loss_scope : {"global", "local"}
        With a group: "global" as above; "local", the loss of this rank's batch alone (the
        paper's multi-GPU runs), no collective in the loss, the ranks' checks as with
        "global"; average the gradients with ``sync_gradients(params, group, average=True)``.

    Returns
    -------
    Tensor
        The loss (detached, scalar).
    """
    try:
        if loss_scope not in LOSS_SCOPES:
            raise ValueError(f"argument 'loss_scope': expected 'global' or 'local', got {loss_scope!r}")
        _check_precision("argument 'precision'", precision)
        autocast_context(_model_device(model), precision)  # bf16 off CUDA raises here, not in the encoders
        _check_step_inputs(images, token_ids, labels, chunk_size)
        local_error = None
    except ValueError as exc:
        local_error = exc
    if group is not None and check_ranks:
        # A rank whose inputs or options are bad says so in the same exchange (its shapes are not
        # read): the others raise naming it at once instead of waiting in the loss's collectives.
        # The loss scope too: a "global" rank waits in the loss's collectives, a "local" one not.
        valid = local_error is None
        try:
            check_ranks_agree(
                {
                    "inputs valid": int(valid),
                    "local batch size": images.shape[0] if valid else -2,
                    "image shape": _shape_code(images.shape[1:]) if valid else -2,
                    "token shape": _shape_code(token_ids.shape[1:]) if valid else -2,
                    "labels": -2 if not valid else -1 if labels is None else _shape_code(labels.shape[1:]),
                    "loss scope": loss_scope if valid else -2,
                },
                group,
                what="this step's inputs",
            )
        except RankMismatchError:
            if local_error is not None:
                raise local_error from None
            raise
    if local_error is not None:
        raise local_error
    chunk_size = None if chunk_size is None else int(chunk_size)  # a NumPy integer as the int it holds
    if loss_scope == "local":
        group = None  # the loss's: the ranks were checked above
    loss_fn = loss_fn or _default_loss_fn(model)
    device = _model_device(model)
    batch = images.shape[0]
    scale = logit_scale_parameter(model)
    labels_dev = None if labels is None else labels.to(device, non_blocking=True)

    if chunk_size is None or chunk_size >= batch:
        image_emb, text_emb = _encode_pair(model, images, token_ids, device, precision)
        if group is not None:
            # The loss gets what the chunked step passes it, leaves that need a gradient, also from a
            # frozen tower: its collectives follow which embeddings need one, and ranks may differ in
            # chunk_size (one rank chunked, another not: an error on every rank at the first step).
            image_emb, text_emb = (emb if emb.requires_grad else emb.detach().requires_grad_(True)
                                   for emb in (image_emb, text_emb))
        loss = _call_loss(loss_fn, image_emb, text_emb, scale, labels_dev, group)
        loss.backward()
        return loss.detach()

    bounds = [(lo, min(lo + chunk_size, batch)) for lo in range(0, batch, chunk_size)]
    rng_before_chunk = []
    image_parts, text_parts = [], []
    with torch.no_grad():
        for lo, hi in bounds:
            rng_before_chunk.append(_capture_torch_rng(device))
            image_emb, text_emb = _encode_pair(model, images[lo:hi], token_ids[lo:hi], device, precision)
            image_parts.append(image_emb)
            text_parts.append(text_emb)
    image_leaf = torch.cat(image_parts).requires_grad_(True)
    text_leaf = torch.cat(text_parts).requires_grad_(True)
    del image_parts, text_parts
    # The multiplier's gradient comes from this backward; the embedding gradients are
    # parked on the leaves and pushed through the encoders in pass 2.
    loss = _call_loss(loss_fn, image_leaf, text_leaf, scale, labels_dev, group)
    loss.backward()
    rng_after_loss = _capture_torch_rng(device)
    image_grad, text_grad = image_leaf.grad, text_leaf.grad
    del image_leaf, text_leaf

    for (lo, hi), rng_state in zip(bounds, rng_before_chunk):
        _restore_torch_rng(rng_state, device)
        image_emb, text_emb = _encode_pair(model, images[lo:hi], token_ids[lo:hi], device, precision)
        outputs, grads = [], []
        for out, grad in ((image_emb, image_grad), (text_emb, text_grad)):
            # A frozen tower (or no gradient reaching it) gives nothing to push back.
            if out.requires_grad and grad is not None:
                outputs.append(out)
                grads.append(grad[lo:hi].to(out.dtype))
        if outputs:
            torch.autograd.backward(outputs, grads)
    # Leave the generator where the one-pass step would: after every chunk's draws once, then
    # the loss's (if it draws any).
    _restore_torch_rng(rng_after_loss, device)
    return loss.detach()


class GraphedTrainStep:
    """One training step (forward, loss, backward) captured once as a CUDA graph and replayed.

    A BiomedCLIP step at B = 64 launches thousands of small kernels, and on an H200 its time
    follows the host's load more than the card's (stop 15's two runs: the same step took
    58 and 98 ms): the GPU waits for the launches. Replaying a captured graph launches all of
    them in one call. The graph holds the very kernels of the eager step (the Triton and
    CUDA kernels of ``ace_kernels`` included) and draws its random numbers from the same
    generator offsets (PyTorch's graph-safe Philox: a replay advances the generator exactly as
    the eager step would), so a replay computes what the eager step computes from the same
    state.

    Usage::

        step = GraphedTrainStep(model, images, token_ids, labels)   # warm-up and capture
        for images, token_ids, labels in batches:                     # same shapes every step
            loss = step(images, token_ids, labels)                    # param.grad set for you
            optimizer.step()

    * Construction warms the step up three times on a side stream (Triton compiles, cuBLAS
      workspaces, the allocator) and captures it once. The generator states (CPU and CUDA)
      are restored afterwards and the parameters' gradients put back as they were, so building
      the step changes nothing for a model without running statistics (ACE-LoRA's towers have
      none; a BatchNorm's would see the warm-up batches): the first call computes what an
      eager step would have.
    * Each call copies the batch into the graph's static input buffers, replays the graph,
      points every trainable parameter's ``.grad`` at the graph's gradient buffers (so
      ``optimizer.zero_grad(set_to_none=True)`` between steps does no harm, and is not needed:
      a replay writes the gradients, it does not add to them) and returns the loss (a copy).
      The gradients are overwritten by the next call: no accumulation over calls.
    * Every call must have the construction's shapes and dtypes (``matches`` says whether
      a batch does); labels given at construction must be given every time, and vice versa.
    * The optimizer and scheduler stay outside the graph, so learning-rate schedules work.
    * CUDA only, one process (the cross-rank loss's collectives are not captured), the
      one-pass step (no ``chunk_size``). Autocast's weight-cast cache is off while capturing
      (a cached cast would be captured once and never refreshed).
    * Memory: the graph keeps its own pool for the step's activations between calls, about
      the eager step's peak.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, token_ids: torch.Tensor,
                 labels: torch.Tensor | None = None, *, loss_fn: Callable | None = None, precision: str = "auto",
                 warmup: int = 3):
        if getattr(model, "recompute", "none") == "layer":
            raise ValueError("argument 'model': its recompute='layer' replays each layer's random draws from "
                             "generator states saved in the forward, which a CUDA graph capture does not allow; "
                             "set model.recompute to 'mlp' or 'none'")
        device = _model_device(model)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"argument 'model': GraphedTrainStep captures a CUDA graph and needs a model on a "
                             f"CUDA device, got one on {device}")
        _check_step_inputs(images, token_ids, labels, None)
        _check_precision("argument 'precision'", precision)
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"argument 'warmup': expected a positive int, got {warmup!r}")
        self.model, self.device, self.precision = model, device, precision
        self.loss_fn = loss_fn or _default_loss_fn(model)
        self.params = [p for _, p in trainable_named_parameters(model)]
        if not self.params:
            raise ValueError("argument 'model': no parameter requires grad")
        self._inputs = tuple(None if t is None else t.detach().to(device).clone() for t in (images, token_ids, labels))
        # Warm-up, capture and replay on the model's device: torch.cuda.graph captures on the
        # current device, and ops on another one would run at capture time instead of being
        # recorded (an empty graph, every replay a no-op).
        with torch.cuda.device(device):
            self._build(warmup)
        missing = [i for i, g in enumerate(self._grads) if g is None]
        if missing:
            raise ValueError(f"argument 'model': {len(missing)} trainable parameters got no gradient in the "
                             "captured step (they do not reach the loss)")

    def _build(self, warmup: int) -> None:
        device = self.device
        rng = _capture_torch_rng(device)
        grads_before = [p.grad for p in self.params]
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    for p in self.params:
                        p.grad = None
                    self._forward_backward()
            torch.cuda.current_stream(device).wait_stream(side)
            for p in self.params:
                p.grad = None
            _restore_torch_rng(rng, device)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: a data loader's pinning thread may call CUDA meanwhile.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self._loss = self._forward_backward()
            self._grads = [p.grad for p in self.params]
        finally:
            torch.set_autocast_cache_enabled(cache)
            _restore_torch_rng(rng, device)
            for p, g in zip(self.params, grads_before):
                p.grad = g

    def _forward_backward(self) -> torch.Tensor:
        images, token_ids, labels = self._inputs
        image_emb, text_emb = _encode_pair(self.model, images, token_ids, self.device, self.precision)
        # Looked up each time: a model whose multiplier is computed (a callable) builds it anew.
        loss = _call_loss(self.loss_fn, image_emb, text_emb, logit_scale_parameter(self.model), labels, None)
        loss.backward()
        return loss.detach()

    def _mismatch(self, images, token_ids, labels) -> str | None:
        """Why a batch cannot be replayed (the first argument that differs from the captured one), or None."""
        for name, static, given in zip(("images", "token_ids", "labels"), self._inputs, (images, token_ids, labels)):
            if (static is None) != (given is None):
                return (f"argument '{name}': the graph was captured {'without' if static is None else 'with'} it, "
                        f"got {'a tensor' if given is not None else 'None'}")
            if static is not None and (tuple(given.shape) != tuple(static.shape) or given.dtype != static.dtype):
                return (f"argument '{name}': expected {static.dtype} {list(static.shape)} as captured, got "
                        f"{given.dtype} {list(given.shape)}; build another GraphedTrainStep for it")
        return None

    def matches(self, images: torch.Tensor, token_ids: torch.Tensor, labels: torch.Tensor | None = None) -> bool:
        """Whether a batch has the shapes and dtypes the graph was captured with."""
        return self._mismatch(images, token_ids, labels) is None

    def __call__(self, images: torch.Tensor, token_ids: torch.Tensor,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        problem = self._mismatch(images, token_ids, labels)
        if problem is not None:
            raise ValueError(problem)
        for static, given in zip(self._inputs, (images, token_ids, labels)):
            if static is not None:
                static.copy_(given, non_blocking=True)
        with torch.cuda.device(self.device):
            self.graph.replay()
        for p, g in zip(self.params, self._grads):
            p.grad = g
        return self._loss.clone()


def sync_gradients(params: Sequence[torch.Tensor], group=None, average: bool = False) -> None:
    """Sum the gradients of ``params`` over the ranks of ``group`` (one flat all-reduce per dtype),
    or with ``average`` take their mean (DDP's convention, for a loss computed per rank:
    ``chunked_train_step(..., loss_scope="local")``).

    Gradient convention (matching ``label_guided_infonce(..., group=)``): on each rank the
    loss is the global-batch loss and the gradient it returns for the local embeddings is
    the exact partial derivative of that loss with respect to them, while the logit
    multiplier's gradient on each rank is the local share, so that summing over ranks
    gives every parameter the gradient of the single process on the concatenated batch.
    A parameter without a gradient counts as zero so every rank reduces the same buffer; one
    that has no gradient on any rank keeps ``grad = None`` (as in one process, where the
    optimizer then skips it: no weight decay, no moment update).

    Gradients are summed in their own dtype (fp64 stays fp64), except that fp16 and bf16
    are summed in fp32; one collective per such reduction dtype, in the order of first
    appearance in ``params`` (the same on every rank), the first also carrying which
    parameters have a gradient on some rank.
    """
    if group is None or dist.get_world_size(group) == 1:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    buckets: dict[torch.dtype, list[int]] = {}
    for index, g in enumerate(grads):
        buckets.setdefault(torch.promote_types(g.dtype, torch.float32), []).append(index)
    somewhere = None
    for dtype, indices in buckets.items():
        pieces = [grads[i].reshape(-1).to(dtype) for i in indices]
        if somewhere is None:
            # Which parameters have a gradient on some rank rides at the end of the first bucket
            # (a count of ranks, exact in any float type here), not in a collective of its own.
            pieces.append(torch.tensor([float(p.grad is not None) for p in params], dtype=dtype,
                                       device=grads[indices[0]].device))
        flat = torch.cat(pieces)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        carried = len(params) if somewhere is None else 0
        if somewhere is None:
            somewhere = [count > 0 for count in flat[flat.numel() - len(params):].tolist()]
        if average:
            flat[:flat.numel() - carried].div_(dist.get_world_size(group))
        offset = 0
        for i in indices:
            p, g = params[i], grads[i]
            n = g.numel()
            reduced = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n
            if not somewhere[i]:
                p.grad = None  # no rank computed one
            elif p.grad is None:
                p.grad = reduced
            else:
                p.grad.copy_(reduced)


# ----------------------------------------------------------------------------------------
# Rank agreement
# ----------------------------------------------------------------------------------------


def _stable_hash(value: Any) -> int:
    digest = hashlib.sha256(repr(value).encode("utf-8")).digest()
    return int.from_bytes(digest[:7], "little")  # 56 bits: fits int64 exactly


def _shape_code(shape) -> int:
    return _stable_hash(tuple(int(s) for s in shape))


def _comm_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fail_together(error: BaseException | None, group, what: str) -> None:
    """Raise ``error`` (this rank's, or None) on this rank, and on every other rank an error
    saying that a rank failed ``what``, instead of leaving them to wait in the next collective."""
    if group is not None:
        try:
            check_ranks_agree({"failed": int(error is not None)}, group, what=f"whether {what} succeeded")
        except RankMismatchError:
            if error is not None:
                raise error from None
            raise RankMismatchError(f"another rank failed {what} (its own error says why); this rank stops "
                                    "too") from None
    if error is not None:
        raise error


def check_ranks_agree(values: dict[str, Any], group, *, what: str = "configuration") -> None:
    """All-gather a fixed-size fingerprint of ``values`` and raise if any rank differs.

    One all-gather of three int64s (the number of fields, a hash of their names and a hash
    of their values) settles the usual case, where the ranks agree. Only when the values'
    hashes differ does a second all-gather, of one int64 per field, find the field; the
    first exchange has made sure by then that every rank sends as many int64s, so a
    disagreement (ranks running different code versions, say) cannot turn into a
    mismatched collective.

    Raises
    ------
    RankMismatchError
        Naming the first differing field and the value on each rank.
    """
    if group is None or dist.get_world_size(group) == 1:
        return
    keys = list(values)
    world = dist.get_world_size(group)
    codes = [_stable_hash(keys)]
    for key in keys:
        v = values[key]
        # 1 and 1.0 are one setting (a config read from JSON on one rank, built in code on another),
        # as are True and NumPy's True (which is neither Integral nor Real).
        if isinstance(v, np.bool_):
            v = bool(v)
        elif isinstance(v, numbers.Integral) and not isinstance(v, bool):
            v = int(v)
        elif isinstance(v, numbers.Real) and math.isfinite(v) and float(v).is_integer():
            v = int(float(v))
        codes.append(int(v) if isinstance(v, (int, bool)) and abs(int(v)) < 2**62 else _stable_hash(v))
    header = torch.tensor([len(keys), codes[0], _stable_hash(codes)], dtype=torch.int64,
                          device=_comm_device(group))
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    if any(bool((h[:2] != header[:2]).any()) for h in headers):
        counts = ", ".join(f"rank {r}: {int(h[0])}" for r, h in enumerate(headers))
        raise RankMismatchError(f"ranks disagree on {what}: they check different fields ({counts} fields; "
                                "different code versions?)")
    if all(bool((h == header).all()) for h in headers):
        return
    mine = torch.tensor(codes, dtype=torch.int64, device=_comm_device(group))
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    rank = dist.get_rank(group)
    for col, key in enumerate(keys, start=1):
        column = table[:, col]
        if bool((column != column[0]).any()):
            # Every rank sees the same table, so every rank gathers the field's values here.
            texts: list = [None] * world
            dist.all_gather_object(texts, repr(values[key]), group=group)
            shown = _where_they_differ(texts)
            per_rank = ", ".join(f"rank {r}: {shown[r]}" for r in range(world))
            raise RankMismatchError(f"ranks disagree on {what}: field {key!r} differs ({per_rank}; this is rank "
                                    f"{rank})")


def _where_they_differ(texts: list[str], width: int = 100) -> list[str]:
    """Each rank's text of one value, cut to ``width`` characters around where they first differ
    (two long lists that differ near their end would otherwise read the same)."""
    first = 0
    while all(first < len(t) for t in texts) and len({t[first] for t in texts}) == 1:
        first += 1
    start = max(0, first - width // 4)
    return [("..." if start else "") + t[start:start + width] + ("..." if len(t) > start + width else "")
            for t in texts]


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------


# TrainConfig.loss_scope: one loss over the global batch, or one per process over its own slice.
LOSS_SCOPES = ("global", "local")


@dataclass
class TrainConfig:
    """Everything :func:`train` needs; defaults are the paper's recipe (spec section 6), but for
    ``precision``: "auto" trains under bf16 autocast on a GPU, where the paper ran fp32 ("fp32").

    ``batch_size`` is the global batch: with several processes each takes an equal slice
    of it. ``loss_scope`` "global" (the default) computes one loss over that whole batch, so
    the run computes the loss one process would and every sample meets every process's
    negatives; "local" is the paper's multi-GPU recipe ("batch 64 per GPU on 3 GPUs, loss per
    GPU", spec section 6: ``batch_size=192`` on 3 processes): each process's loss over its own
    slice, the gradients averaged over the processes as DDP does. With one process both are the
    same.
    """

    csv: str | None = None  # CSV with image path, report text and label columns
    image_root: str | None = None  # relative image paths are resolved against this
    out_dir: str = "runs/ace-lora"
    model: str = "biomedclip"  # "biomedclip" or "tiny"
    pretrained: str | None = None  # local open_clip checkpoint or HF directory
    init_checkpoint: str | None = None  # start from a released-format ACE-LoRA checkpoint
    epochs: int = 40
    # Cap on total steps; the cosine schedule spans the capped run, the warm-up stays warmup_epochs
    # of an epoch's steps (a run that is all warm-up warns).
    max_steps: int | None = None
    batch_size: int = 64
    chunk_size: int | None = None  # two-pass chunked step when set and < local batch
    lr: float = 1e-3
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    seed: int = 1
    use_labels: bool = True
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA), "bf16", "fp32"
    checkpoint_every: int = 500  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    resume: str | None = None  # a state file, a run/checkpoint directory, or "auto"
    # DataLoader worker processes. A dataset that draws random numbers (augmentation) draws each
    # batch's from a seed of its own (batch_seed_words): the same with any number of workers,
    # and resumed runs continue exactly.
    num_workers: int = 0
    progress: bool = True
    dist_timeout_s: float = 600.0
    cuda_graph: bool = False  # replay each step as a captured CUDA graph (GraphedTrainStep)
    recompute: str = "none"  # ACELoRA.recompute: "none", "mlp" or "layer" (rerun in the backward, not kept)
    # ACELoRA.text_attention: "spec" (section 3's pre-softmax text row, BERT's dropouts) or
    # "reference-code" (what the published code computes: masked probabilities, no attention dropouts)
    text_attention: str = "spec"
    loss_scope: str = "global"  # with several processes: "global" (one loss over the global batch) or "local"
    overwrite: bool = False  # let a new run replace another run in out_dir (its weights and checkpoints go)

    # Fields that may change between a run and its resumption. Most leave every number of
    # the run as it was; not all: with dropout on, a new chunk_size draws other
    # (identically distributed) masks, so losses differ from the uninterrupted run (with
    # dropout off only the summation order changes; the resume warns); a new device changes kernels, RNG
    # streams and, with precision "auto", autocast. csv and image_root may point at moved
    # data: the dataset length is checked against the state. init_checkpoint only starts a run:
    # a resume replaces every weight it loads with the state's (it may be left out, moved, or
    # named per rank, as _PER_RANK_FIELDS allows; given, it must still be readable).
    _RESUMABLE_CHANGES = frozenset(
        {"out_dir", "resume", "num_workers", "progress", "dist_timeout_s", "checkpoint_every",
         "keep_checkpoints", "chunk_size", "csv", "image_root", "device", "cuda_graph", "recompute",
         "overwrite", "init_checkpoint"}
    )

    def to_dict(self) -> dict:
        """The fields as JSON types: NumPy numbers (which ``validate`` accepts) as Python's, and paths given
        as ``os.PathLike`` (a ``pathlib.Path``, which ``make_synthetic_dataset`` returns) as strings."""
        d = {name: os.fspath(value) if name in _PATH_FIELDS and isinstance(value, os.PathLike)
             else _plain_number(value) for name, value in dataclasses.asdict(self).items()}
        d["betas"] = [_plain_number(b) for b in d["betas"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def validate(self) -> None:
        """Raise a ``ValueError`` starting with ``TrainConfig.<field>:`` for the first bad field
        (the command line rewrites that prefix to the flag's name)."""
        for name in _PATH_FIELDS:
            value, optional = getattr(self, name), name != "out_dir"
            if not (isinstance(value, (str, os.PathLike)) or (value is None and optional)):
                allowed = "a path (str or os.PathLike)" + (" or None" if optional else "")
                raise ValueError(f"TrainConfig.{name}: expected {allowed}, got {type(value).__name__} {value!r}")
        for name in ("epochs", "batch_size", "keep_checkpoints", "checkpoint_every", "num_workers"):
            _check_integer(self, name)
        for name in ("chunk_size", "max_steps", "warmup_steps"):
            if getattr(self, name) is not None:
                _check_integer(self, name, "or unset (None)")
        if not (_is_finite_number(self.dist_timeout_s) and self.dist_timeout_s > 0):
            raise ValueError(f"TrainConfig.dist_timeout_s: expected a finite number of seconds > 0, got "
                             f"{self.dist_timeout_s!r}")
        for name in ("epochs", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if int(self.batch_size) < 2:
            # The contrastive loss of a batch of one is 0 with a zero gradient: nothing would learn. (0 and
            # below get this message too: "expected >= 1" would send the user to 1, refused next.)
            raise ValueError(f"TrainConfig.batch_size: expected >= 2 (a contrastive batch), got {self.batch_size}")
        for name in ("chunk_size", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name}: expected >= 1 or unset (None), got {value}")
        if not _is_finite_number(self.warmup_epochs):
            raise ValueError(f"TrainConfig.warmup_epochs: expected a finite number >= 0, got {self.warmup_epochs!r}")
        for name in ("checkpoint_every", "num_workers", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}: expected >= 0, got {getattr(self, name)}")
        check_seed(self.seed, "TrainConfig.seed")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps: expected >= 0 or unset (None), got {self.warmup_steps}")
        for name in ("lr", "weight_decay"):
            if not (_is_finite_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"TrainConfig.{name}: expected a finite number >= 0, got {getattr(self, name)!r}")
        if not (_is_finite_number(self.eps) and self.eps > 0):
            # AdamW divides by sqrt(v) + eps, and v stays 0 where a gradient is exactly 0 (ACE-LoRA's
            # LoRA A at the first step, its B starting at zero): eps = 0 turns those weights into 0/0.
            raise ValueError(f"TrainConfig.eps: expected a finite number > 0, got {self.eps!r}")
        if float(self.eps) < torch.finfo(torch.float32).tiny:
            # AdamW adds eps to the float32 sqrt(v): below 1.4e-45 it rounds to 0 there (a flush-to-zero
            # mode drops any subnormal), and the weights become 0/0 as with eps = 0.
            raise ValueError(f"TrainConfig.eps: expected a number >= {torch.finfo(torch.float32).tiny:.7g} (float32's "
                             f"smallest normal; AdamW adds eps in the weights' float32), got {self.eps!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(_is_finite_number(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"TrainConfig.betas: expected two numbers in [0, 1), got {self.betas!r}")
        if self.lr / (1.0 - float(betas[0])) > torch.finfo(torch.float32).max:
            # AdamW's first step moves each weight by lr / (1 - beta1) times a factor it casts to
            # the weights' float32: torch raises there, after the set-up, with a traceback.
            raise ValueError(f"TrainConfig.lr: {self.lr!r} / (1 - betas[0]) overflows float32 in AdamW's first step")
        _check_precision("TrainConfig.precision", self.precision)
        for name in ("cuda_graph", "overwrite", "use_labels", "progress"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"TrainConfig.{name}: expected a bool, got {getattr(self, name)!r}")
        if self.loss_scope not in LOSS_SCOPES:
            raise ValueError(f"TrainConfig.loss_scope: expected 'global' or 'local', got {self.loss_scope!r}")
        if self.text_attention not in TEXT_ATTENTION:
            raise ValueError(f"TrainConfig.text_attention: expected 'spec' or 'reference-code', got "
                             f"{self.text_attention!r}")
        if self.recompute not in ("none", "mlp", "layer"):
            raise ValueError(f"TrainConfig.recompute: expected 'none', 'mlp' or 'layer', got {self.recompute!r}")
        if self.cuda_graph and self.recompute == "layer":
            # TrainConfig.<field> in messages: the command line names its flag instead (cli._flags_in).
            raise ValueError("TrainConfig.cuda_graph: TrainConfig.recompute 'layer' replays each layer's random "
                             "draws from generator states saved in the forward, which a CUDA graph capture does "
                             "not allow; use TrainConfig.recompute 'mlp' or no CUDA graph")
        if self.cuda_graph and self.chunk_size is not None:
            raise ValueError(f"TrainConfig.cuda_graph: the captured step is the one-pass step; it cannot be "
                             f"combined with TrainConfig.chunk_size {self.chunk_size}")


# The TrainConfig fields that name a file or folder: a str, an os.PathLike or (but out_dir) None.
_PATH_FIELDS = ("csv", "image_root", "out_dir", "pretrained", "init_checkpoint", "resume")


def _plain_number(value):
    """A NumPy number as the Python number it holds (``json`` writes only those); else ``value``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _check_integer(config, name: str, unset: str = "") -> None:
    value = getattr(config, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"TrainConfig.{name}: expected an integer{' ' + unset if unset else ''}, got {value!r}")


def check_seed(seed, name: str = "seed") -> int:
    """An integer with ``|seed| < 2**46``: the data order's generators are seeded with
    ``seed * 100003 + ...``, which must fit torch's 64-bit seeds."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or not abs(seed) < 2**46:
        raise ValueError(f"{name}: expected an integer with |seed| < 2**46, got {seed!r}")
    return int(seed)


def _is_finite_number(value) -> bool:
    """A finite real number, Python's or NumPy's (not a bool): the kernels' own check."""
    try:
        check_finite_number("value", value)
    except ValueError:
        return False
    return True


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor at 0-based ``step``: linear warm-up to 1, then cosine down to 0 at the end.

    The warm-up reaches the full rate at its last step ((step + 1) / warmup_steps), as
    open_clip's ``cosine_lr`` does. The reference code uses transformers'
    ``get_cosine_schedule_with_warmup`` (factor ``step / warmup_steps``): its first step
    runs at lr 0, moving Adam's moments but no weight, and every warm-up step one step
    behind this one; the cosine part is the same. The spec says only "cosine schedule with
    one epoch of warm-up"; this form does not spend a step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def collate_batch(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stack dataset items into ``(images, token_ids, labels or None)``.

    Items are ``(image, token_ids[, labels])`` tuples or dicts with keys ``image``,
    ``token_ids`` (or ``tokens``/``input_ids``) and optionally ``labels``.
    """
    images, tokens, labels = [], [], []
    for item in items:
        if isinstance(item, dict):
            image = item.get("image", item.get("images"))
            tok = item.get("token_ids", item.get("tokens", item.get("input_ids")))
            lab = item.get("labels", item.get("label"))
        else:
            image, tok = item[0], item[1]
            lab = item[2] if len(item) > 2 else None
        images.append(torch.as_tensor(image))
        tokens.append(torch.as_tensor(tok))
        labels.append(None if lab is None else torch.as_tensor(lab))
    label_tensor = None if any(l is None for l in labels) else torch.stack(labels)
    return torch.stack(images), torch.stack(tokens), label_tensor


class _SeededBatch(list):
    """One batch's dataset indices, with the seed its items' random draws come from."""

    def __init__(self, indices, seed_words):
        super().__init__(indices)
        self.seed_words = seed_words  # pickled with the indices (a list subclass's __dict__ is)


def batch_seed_words(seed: int, epoch: int, rank: int, batch: int) -> np.ndarray:
    """The 128-bit seed (four uint32 words) of batch ``batch`` of ``epoch`` on ``rank`` in a run
    seeded ``seed``: what that batch's items draw their random numbers from (:class:`_PerBatchDraws`)."""
    return np.random.SeedSequence([seed + 2**46, epoch, rank, batch]).generate_state(4)  # |seed| < 2**46


class _PerBatchDraws(torch.utils.data.Dataset):
    """``dataset``, whose items draw each batch's random numbers (an augmentation's, from torch's
    CPU generator, Python's ``random`` or NumPy's global generator) from that batch's own seed:
    the same draws whatever ``num_workers`` (a worker otherwise draws from its own stream, which
    depends on the batches it fetched before), and a resumed run draws what the uninterrupted
    one drew. In the training process itself (``num_workers=0``) the generators are put back
    afterwards, so that loading leaves the step's dropout stream as it was."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, batch: _SeededBatch) -> list:
        words = batch.seed_words
        cpu = torch.device("cpu")  # the CUDA generators are not touched here
        saved = _rng_snapshot(cpu) if torch.utils.data.get_worker_info() is None else None
        try:
            random.seed(int.from_bytes(words.tobytes(), "little"))
            np.random.seed(words)
            torch.default_generator.manual_seed(int(words[0]) | int(words[1]) << 32)
            getitems = getattr(self.dataset, "__getitems__", None)
            return getitems(list(batch)) if getitems else [self.dataset[i] for i in batch]
        finally:
            if saved is not None:
                _rng_restore(saved, cpu)


def _load_batches(dataset, index_lists: list[list[int]], num_workers: int, pin: bool, seed: int,
                  draws: tuple[int, int, int], first_batch: int) -> Iterable:
    """The batches of ``index_lists``, the first being batch ``first_batch`` of its epoch; their
    items' random draws come from ``batch_seed_words(*draws, batch)``."""
    batches = [_SeededBatch(indices, batch_seed_words(*draws, first_batch + j))
               for j, indices in enumerate(index_lists)]
    # A private generator: a DataLoader iterator otherwise draws its base seed from the
    # global torch RNG, which would shift the dropout stream of a resumed run.
    loader = torch.utils.data.DataLoader(
        _PerBatchDraws(dataset),
        batch_sampler=batches,
        num_workers=min(num_workers, len(batches)),  # each loads whole batches: no idle ones
        collate_fn=collate_batch,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


# ----------------------------------------------------------------------------------------
# RNG state (all generators a step can touch), stored weights_only-loadable
# ----------------------------------------------------------------------------------------


def _rng_snapshot(device: torch.device) -> dict:
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    snap = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return snap


def _rng_restore(snap: dict, device: torch.device) -> None:
    version, internal, gauss = snap["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = snap["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(snap["torch"])
    if snap.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(snap["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

_STATE_RE = re.compile(r"^state-(\d+)\.pt$")
_REFERENCE_RE = re.compile(r"^ace_lora-(\d+)\.pt$")
# The temp names of this module's atomic writes (see ace_model._atomic), per directory;
# a killed run can leave these behind, and only these are removed on the next start.
_CKPT_TEMP_RE = temp_name_pattern(r"state-\d{8,}\.pt|ace_lora-\d{8,}\.pt|latest")
_RUN_TEMP_RE = temp_name_pattern(r"config\.json|ace_lora\.pt")


def _atomic_reference_save(model: nn.Module, path: Path) -> None:
    """``model.save_reference_checkpoint`` into one temp file, fsync, rename.

    ``ACELoRA`` writes into the open temp file, so there is exactly one temp file per write,
    with a name :data:`_CKPT_TEMP_RE` / :data:`_RUN_TEMP_RE` knows. Any other model is given
    the temp file's path (its method may take only a path); a temp file of its own, if it
    makes one, is its business.
    """
    from ace_model.model import ACELoRA

    if isinstance(model, ACELoRA):
        atomic_write(path, model.save_reference_checkpoint)
    else:
        atomic_write_to_path(path, model.save_reference_checkpoint)


def _checkpoint_names(step: int) -> tuple[str, str]:
    return f"state-{step:08d}.pt", f"ace_lora-{step:08d}.pt"


LOCK_NAME = ".train.lock"

# The lock files this process holds. flock belongs to the open file, which a fork shares: a
# forked child (a DataLoader worker) would keep the lock after the run let go of it, so each
# child points its copies of these descriptors at /dev/null.
_HELD_LOCKS: set = set()


def _drop_locks_in_child() -> None:
    if not _HELD_LOCKS:
        return
    try:
        null = os.open(os.devnull, os.O_RDONLY)
    except OSError:  # no descriptor left: close ours instead (the lock goes with the last copy)
        null = None
    for fd in list(_HELD_LOCKS):
        try:
            if null is None:
                os.close(fd)
            else:
                os.dup2(null, fd, inheritable=False)  # the child's fd now names /dev/null
        except OSError:
            pass
    if null is not None:
        os.close(null)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


@contextlib.contextmanager
def _lock_out_dir(out_dir: Path):
    """Hold ``out_dir/.train.lock`` (an exclusive ``flock``) while this run writes there, so that a
    second training process started on the same directory stops at once, naming the first,
    instead of interleaving checkpoints and deleting its temp files. The operating system
    releases the lock when the process ends, however it ends (forked children do not keep it);
    the file itself stays (deleting it would race with a process about to lock it). Where locks
    are not supported (no ``fcntl``, a file system that refuses them) the run goes on unlocked."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = out_dir / LOCK_NAME
    handle = open(path, "a+", encoding="utf-8")
    # Registered before the flock (a fork in between redirects a descriptor not yet locked: harmless).
    _HELD_LOCKS.add(handle.fileno())
    try:
        unsupported = False
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(f"TrainConfig.out_dir: {str(out_dir)!r} is being written by another training run "
                             f"({holder}); wait for it to end, or choose another directory") from None
        except OSError:  # e.g. ENOLCK on a network file system: nothing to hold
            unsupported = True
        if unsupported:
            yield  # outside the except: the run's own errors are not chained to the lock's
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {_hostname()}, since "
                     f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}\n")
        handle.flush()
        yield
    finally:
        _HELD_LOCKS.discard(handle.fileno())
        handle.close()  # releases the lock


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _remove_stale_temp_files(out_dir: Path) -> None:
    """Delete temp files of writes a crash interrupted (never a complete file, never a
    name this module does not create). One that cannot be deleted is left with a warning: no
    write reads it (each takes a new temp name), so it is no reason to stop the run."""
    for directory, pattern in ((out_dir, _RUN_TEMP_RE), (out_dir / "checkpoints", _CKPT_TEMP_RE)):
        if directory.is_dir():
            for name in os.listdir(directory):
                if pattern.match(name):
                    _unlink_or_warn(directory / name, "the temp file of a write that was interrupted")


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, model: nn.Module | None, keep: int,
                    previous_steps: Sequence[int] = ()) -> Path:
    """Write the state (and the released-format weights), point ``latest`` at them, prune.

    ``previous_steps`` are the steps of this run's checkpoints in ``ckpt_dir`` (the
    ``checkpoint_steps`` of the state it continues). The newest ``keep`` of them and
    ``step`` are kept; ``state["checkpoint_steps"]`` is set to those before it is written,
    and the others' files are deleted once ``latest`` names the new state (a file that cannot be
    deleted is left, with a warning naming it: the new state is safe); those steps are
    recorded too (``state["pruned_steps"]``), so that a resume after a crash between the
    two deletes them again. Files of any other step (an abandoned run resumed from an older
    state, another run's files) are never deleted: they do not count towards ``keep``.
    """
    makedirs_durable(ckpt_dir)
    ours = sorted(set(int(s) for s in previous_steps) | {step})
    kept = ours[-keep:]
    pruned = ours[: len(ours) - len(kept)]
    state["checkpoint_steps"] = kept
    state["pruned_steps"] = pruned
    state_name, ref_name = _checkpoint_names(step)
    atomic_torch_save(state, ckpt_dir / state_name)
    if model is not None and hasattr(model, "save_reference_checkpoint"):
        _atomic_reference_save(model, ckpt_dir / ref_name)
    else:
        ref_name = None
    atomic_write_text(ckpt_dir / "latest", json.dumps({"step": step, "state": state_name, "reference": ref_name,
                                                       "run": state.get("run_id")}) + "\n")
    for old in pruned:
        for name in _checkpoint_names(old):
            # The new checkpoint is complete and named by latest: a file that cannot go (its folder
            # made read-only, a file system that refuses) is left, and the run goes on.
            _unlink_or_warn(ckpt_dir / name, "a pruned checkpoint")
    return ckpt_dir / state_name


def _unlink_or_warn(path: Path, what: str) -> None:
    """Delete ``path`` (gone already: fine); one that cannot be deleted is left, with a warning naming it
    as ``what``: no reason to stop a run whose own files are safe."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        warnings.warn(f"could not delete {str(path)!r}, {what} ({exc.strerror or exc}); it is left in place "
                      "(delete it by hand)", UserWarning, stacklevel=3)


def _resumed_checkpoint_steps(state: dict, state_path: Path, ckpt_dir: Path) -> list[int]:
    """Steps of the resumed run's checkpoints that live in ``ckpt_dir`` (pruning candidates)."""
    if not _lives_in(state_path, ckpt_dir):
        return []  # a new directory: nothing in it belongs to this run yet
    if "checkpoint_steps" in state:
        # With the steps it was deleting: a crash may have come before their files went.
        return sorted(int(s) for s in [*state["checkpoint_steps"], *state.get("pruned_steps", ())])
    # Version 1 states did not record them: the state files up to the state's own step.
    return sorted(int(m.group(1)) for name in os.listdir(ckpt_dir)
                  if (m := _STATE_RE.match(name)) and int(m.group(1)) <= state["step"])


def resolve_resume(resume: str | os.PathLike | None, out_dir: str | os.PathLike) -> Path | None:
    """Path of the state file to resume from, or None to start fresh.

    ``"auto"``: the run directory's ``checkpoints/latest`` if there is one, else None.
    A directory: its ``latest`` (or ``checkpoints/latest``). A ``latest`` pointer: the state it
    names. Another file: itself.
    """
    if resume is None:
        return None
    if str(resume) == "auto":
        latest = Path(out_dir) / "checkpoints" / "latest"
        return _read_latest(latest) if latest.exists() else None
    path = Path(resume)
    if path.is_dir():
        for latest in (path / "latest", path / "checkpoints" / "latest"):
            if latest.exists():
                return _read_latest(latest)
        raise FileNotFoundError(f"TrainConfig.resume: {str(resume)!r} has no 'latest' file, nor has its checkpoints/")
    if not path.exists():
        raise FileNotFoundError(f"TrainConfig.resume: {str(resume)!r} does not exist")
    if path.name == "latest":  # a run's pointer (JSON), not a state: the state it names
        return _read_latest(path)
    return path


def _read_latest(latest: Path) -> Path:
    try:
        record = json.loads(latest.read_text(encoding="utf-8"))
        path = latest.parent / record["state"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainingStateError(f"TrainConfig.resume: {latest}: unreadable checkpoint pointer, expected JSON with "
                                 f"a 'state' file name ({first_line(exc)})") from exc
    if not path.exists():
        raise FileNotFoundError(f"TrainConfig.resume: {latest} names {record['state']}, which does not exist")
    return path


def _earlier_state_note(path) -> str:
    """For an error about the state at ``path`` (unreadable or corrupt): the newest state beside it
    of an earlier step, which a resume can be pointed at (``--resume auto`` takes only the one
    ``latest`` names), or ``""`` when there is none."""
    path = Path(path)
    match = _STATE_RE.match(path.name)
    if match is None:  # not a run's state-<step>.pt: no order to go by
        return ""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return ""
    steps = [int(m.group(1)) for name in names if (m := _STATE_RE.match(name))]
    earlier = [s for s in steps if s < int(match.group(1))]
    if not earlier:
        return ""
    return (f"; the newest earlier state beside it is {str(path.parent / _checkpoint_names(max(earlier))[0])!r}: "
            "resume from it by setting TrainConfig.resume to that file")


def _read_resume_state(path: Path) -> dict:
    """:func:`load_state`, its error naming the setting (``TrainConfig.resume``, the command line's
    ``--resume``) and the newest earlier state beside it (if any) to resume from."""
    try:
        return load_state(path)
    except TrainingStateError as exc:
        exc.args = (f"TrainConfig.resume: {exc.args[0]}{_earlier_state_note(path)}",)
        raise


def load_state(path: str | os.PathLike) -> dict:
    """Load a full training state written by :func:`train` (``weights_only=True``).

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    TrainingStateError (a ValueError)
        Naming ``path``, when it is a directory, when the file cannot be read (corrupt,
        truncated, not a torch file) or is not a training state of a version this code reads.
    """
    if os.path.isdir(path):  # (open() would say only IsADirectoryError) a run's or a `latest` naming one
        raise TrainingStateError(f"{path}: a directory, not a training state file (a run's states are its "
                                 "checkpoints/state-<step>.pt; TrainConfig.resume also takes a run directory, "
                                 "whose 'latest' it follows)")
    state = read_model_file(lambda: load_weights_only(path), TrainingStateError, str(path), "a training state",
                            check_zip=path)
    if isinstance(state, dict) and {"weights", "metadata"} <= set(state) and "format" not in state:
        raise TrainingStateError(f"{path}: a released-format weights file (for train --init-checkpoint or "
                                 "zero-shot --checkpoint), not a training state; a run's states are its "
                                 "checkpoints/state-<step>.pt")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise TrainingStateError(f"{path}: not an ace-lora training state (format field {found!r}, "
                                 f"expected {STATE_FORMAT!r})")
    if state.get("version") not in _READABLE_STATE_VERSIONS:
        raise TrainingStateError(f"{path}: training state version {state.get('version')!r}, this code reads "
                                 f"versions {list(_READABLE_STATE_VERSIONS)}")
    return state


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Step records of the last run in a ``metrics.jsonl``, one per step (the last written wins).

    Each fresh run into an existing ``out_dir`` appends to the same file after an
    ``{"event": "start", "run": ID}`` line, so only the records after the last such line are
    kept; a ``{"event": "resume", "step": S, "run": ID}`` line continues run ID (the one whose
    state was loaded, even when another run started after it) from its state at step S: the
    records of that run after S that came before it (of the trajectory the resume abandoned)
    are dropped, and the resumed run's records take their place. Lines without a run id
    (written before runs had one), or marked ``"continues_last_start"`` (the resume of a state
    written before runs had ids), continue the run last started; a resume of a run this file
    never started (a state from another directory) starts its records afresh. A torn line (a crash
    mid-write) is ignored.

    A step record holds ``step``, ``epoch``, ``loss`` (the run's: with ``loss_scope="local"`` the
    mean of the ranks'), ``lr`` (the rate the step used), ``samples_per_s`` (the global batch,
    ``TrainConfig.batch_size`` over every rank, over rank 0's time from its batch in hand to the
    optimizer step done), ``grad_norm`` (of the synchronised gradients), ``logit_scale`` and ``time``
    (Unix seconds); rank 0 writes it.

    Each process's stretch of a run is a ``segment`` (its start or resume line names it, and the
    states it writes record it); a resume line's ``from_segment`` names the stretch that wrote
    the state it loaded. Such a resume continues exactly the records that stretch had up to the
    state's step, whatever ran in between: a resume from an older state, then one from the
    newest again, gives the newest's history, not a mix.
    """
    runs: dict[str, dict[int, dict]] = {}
    segments: dict[str, dict[int, dict]] = {}  # each stretch's history, itself included
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            run, segment = record.get("run"), record.get("segment")
            if record.get("event") == "start":
                by_step = {}
                if isinstance(run, str):
                    runs[run] = by_step
                if isinstance(segment, str):
                    segments[segment] = by_step
            elif record.get("event") == "resume" and isinstance(record.get("step"), int):
                source = segments.get(record.get("from_segment"))
                if source is None and isinstance(run, str):
                    if record.get("continues_last_start") or run in runs:
                        # A state written before runs had ids continues the run last started.
                        source = runs.get(run, by_step)
                    else:  # a run started elsewhere (resumed from another directory's state)
                        source = {}
                elif source is None:
                    source = by_step
                # A copy: the stretch it continues keeps its own records (a later resume may
                # continue that stretch from a later state).
                by_step = {s: r for s, r in source.items() if s <= record["step"]}
                if isinstance(run, str):
                    runs[run] = by_step
                if isinstance(segment, str):
                    segments[segment] = by_step
            elif "step" in record and "loss" in record:
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _open_metrics_for_append(path: Path):
    """Open ``metrics.jsonl`` for appending, first ending a torn last line (a crash
    mid-write) so that the next record starts a line of its own and stays readable."""
    torn = False
    created = not path.exists()
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
    metrics = open(path, "a", encoding="utf-8")
    if created:
        fsync_directory(path.parent)  # the new file's entry is as durable as the lines fsynced into it
    if torn:
        metrics.write("\n")
    return metrics


# ----------------------------------------------------------------------------------------
# Distributed set-up
# ----------------------------------------------------------------------------------------


def resolve_device(spec: str, local_rank: int = 0, *, name: str = "TrainConfig.device") -> torch.device:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> a device this machine has.

    ``"auto"`` and ``"cuda"`` take the GPU ``local_rank`` when CUDA is available. Raises a
    one-line ``ValueError`` naming ``name`` for a spec torch cannot parse, a device type
    other than cpu and cuda, CUDA on a machine without it, or an index beyond the GPUs present.
    """
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {spec!r} needs CUDA, but torch sees no CUDA device on this machine "
                             "(use 'cpu' or 'auto')")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(f"{name}: {spec!r} resolves to cuda:{device.index}, but this machine has {count} "
                             "CUDA device(s)")
    return device


def _init_distributed(device: torch.device, timeout_s: float):
    """Join the torchrun process group if WORLD_SIZE > 1; returns (group, rank, world, created).

    On CUDA the training device becomes the current one, also in a group the caller created:
    NCCL collectives (the checks between ranks, the broadcast, the state gather) use the current
    device, which is cuda:0 on every rank of a script that never set it.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD, dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, 0, 1, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size(), True


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------


def _check_out_dir(out_dir: Path, name: str = "TrainConfig.out_dir") -> None:
    """Fail before any work when ``out_dir`` or a folder above it exists but is no directory, or
    when the nearest existing one (``out_dir`` itself, or the folder it would be created in)
    takes no new folder: one is made there and removed (a permission bit says less than trying:
    root may still be refused, on a read-only mount or in /sys). Its ``checkpoints``, where one exists, must be
    a directory too: a file of that name would stop the run only at its first checkpoint."""
    checkpoints = out_dir / "checkpoints"
    if (checkpoints.exists() or checkpoints.is_symlink()) and not checkpoints.is_dir():
        raise ValueError(f"{name}: {str(out_dir)!r} cannot be a run directory: {str(checkpoints)!r} exists and is "
                         "not a directory (the run's checkpoints go there)")
    for candidate in (out_dir, *out_dir.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                where = "it" if candidate == out_dir else f"{str(candidate)!r}"
                raise ValueError(f"{name}: {str(out_dir)!r} cannot be a run directory: {where} "
                                 "exists and is not a directory")
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".ace-lora-probe-", dir=candidate))
            except OSError as exc:
                where = "it cannot be written" if candidate == out_dir else f"{str(candidate)!r} takes no new folder"
                raise ValueError(f"{name}: {str(out_dir)!r} cannot be a run directory: {where} "
                                 f"({exc.strerror or exc})") from None
            return


def _run_files(out_dir: Path) -> list[str]:
    """The files that mark ``out_dir`` as holding a run (``checkpoints/latest``, ``ace_lora.pt``) it has."""
    return [name for name in ("checkpoints/latest", "ace_lora.pt") if (out_dir / name).exists()]


def _check_no_other_run(config: TrainConfig, out_dir: Path, resume_path: Path | None = None,
                        state: dict | None = None) -> None:
    """Refuse, before anything is written, a run that would overwrite another run's files in ``out_dir``.

    ``out_dir`` holds a run when it has ``checkpoints/latest`` or ``ace_lora.pt``. Only a
    resume of that run (a state in its own ``checkpoints/``, of the run ``latest`` names)
    continues it; a fresh run, a resume from a state elsewhere, or of a state another run
    left in ``checkpoints/`` would replace its ``ace_lora.pt``, its ``latest`` and its
    same-numbered checkpoints, so it needs ``overwrite=True``. A run that stopped before its
    first checkpoint left only ``config.json`` (rewritten by the next run) and
    ``metrics.jsonl`` (appended to): nothing to lose.

    Called twice: at set-up with the configuration only, then with the loaded ``state`` (and
    its ``resume_path``), whose run id is compared with the one ``latest`` names.
    """
    if config.overwrite:
        return
    held = _run_files(out_dir)
    if not held:
        return
    if state is None:
        try:
            resume_path = resolve_resume(config.resume, out_dir)
        except Exception:  # noqa: BLE001 - reported where the state is loaded, with its own message
            return
    same_dir = _lives_in(resume_path, out_dir / "checkpoints")
    choices = "replace it with TrainConfig.overwrite, or choose another directory"
    if same_dir:
        latest_run = _latest_run(out_dir / "checkpoints" / "latest")
        if state is None or latest_run is None or state.get("run_id") in (None, latest_run):
            return  # the run latest names (or states written before runs had ids: not comparable)
        raise ValueError(
            f"TrainConfig.resume: {str(resume_path)!r} is a state of another run than the one {str(out_dir)!r} now "
            f"holds (its checkpoints/latest names run {latest_run}, this state is of run {state['run_id']}), whose "
            f"files this run would overwrite; continue the run it holds with TrainConfig.resume set to 'auto', "
            f"{choices}")
    if resume_path is None and str(config.resume) == "auto":
        raise ValueError(f"TrainConfig.out_dir: {str(out_dir)!r} holds another run's ace_lora.pt but no "
                         f"checkpoints/latest to continue it from, and a fresh run would overwrite it; {choices}")
    doing = "a fresh run" if resume_path is None else f"a run resumed from {str(resume_path)!r}"
    raise ValueError(
        f"TrainConfig.out_dir: {str(out_dir)!r} holds another run ({' and '.join(held)}), whose files {doing} would "
        f"overwrite; continue that run with TrainConfig.resume set to 'auto', {choices}")


def _remove_other_run(out_dir: Path, resume_path: Path | None, keep: Sequence = ()) -> None:
    """``overwrite=True``: delete the files of the run this one replaces (its ``ace_lora.pt``,
    ``checkpoints/latest`` and the checkpoints beside it), so that none of them is taken for
    this run's if it stops early. Nothing is deleted when this run resumes a state in that
    ``checkpoints/`` (it continues from those files), nor a file named in ``keep`` (this run's
    ``init_checkpoint`` or ``pretrained`` weights); ``metrics.jsonl`` is kept (appended to)."""
    ckpt_dir = out_dir / "checkpoints"
    if _lives_in(resume_path, ckpt_dir):
        return
    doomed = [out_dir / "ace_lora.pt", ckpt_dir / "latest"]
    if ckpt_dir.is_dir():
        doomed += [ckpt_dir / name for name in sorted(os.listdir(ckpt_dir))
                   if _STATE_RE.match(name) or _REFERENCE_RE.match(name)]
    kept = [Path(k) for k in keep if k]
    for path in doomed:  # latest goes before the files it names
        if not any(_same_file(path, k) for k in kept):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _lives_in(path, directory: Path) -> bool:
    """``path`` (a file, or None) is in ``directory`` (an existing one; links resolved)."""
    return path is not None and _same_file(Path(path).parent, directory)


def latest_record(latest: Path) -> dict:
    """The JSON a ``checkpoints/latest`` pointer holds (``step``, ``state``, ``reference``, ``run``),
    or ``{}`` when there is none or it cannot be read (:func:`resolve_resume` reports that)."""
    try:
        record = json.loads(latest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _latest_run(latest: Path) -> str | None:
    """The run id a ``latest`` pointer names (None: unreadable, or written before runs had ids)."""
    run = latest_record(latest).get("run")
    return run if isinstance(run, str) else None


@contextlib.contextmanager
def _named_init_checkpoint():
    """A CheckpointError (it names the file) raised again naming the setting too (the command line
    says --init-checkpoint for it)."""
    try:
        yield
    except CheckpointError as exc:
        raise CheckpointError(f"TrainConfig.init_checkpoint: {exc}") from exc


def _build_model(config: TrainConfig) -> nn.Module:
    from ace_model import ACELoRA

    if config.model not in CONFIG_NAMES:  # (a model passed to train() may carry any name)
        raise ValueError(f"TrainConfig.model: expected 'biomedclip' or 'tiny', got {config.model!r}")
    blob = None
    if config.init_checkpoint:
        # Read, and the model it records compared, before the model is built (BiomedCLIP's towers take
        # seconds): an unreadable file, or one of the other configuration, is refused without that wait.
        with _named_init_checkpoint():
            blob = read_reference_checkpoint(config.init_checkpoint)
        recorded = recorded_model(blob)
        if recorded is not None and recorded != config.model:
            raise CheckpointError(f"TrainConfig.init_checkpoint: {os.fspath(config.init_checkpoint)}: trained with "
                                  f"TrainConfig.model {recorded!r} (its metadata records it), this run builds "
                                  f"{config.model!r}: its LoRA layers and adapters fit only a {recorded!r} model")
    # In float32 whatever torch.set_default_dtype says: the run's images are float32 and its trainable
    # parameters are (a float64 or bfloat16 default gave a model that refused the first batch).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = ACELoRA.from_config(config.model, pretrained=config.pretrained, text_attention=config.text_attention)
    finally:
        torch.set_default_dtype(previous)
    if blob is not None:
        # The loader itself, not the model's method: its advice (set model.text_attention) is said
        # here as the run's.
        with _named_init_checkpoint():
            metadata = apply_reference_checkpoint(model, config.init_checkpoint, blob)
        del blob  # copied into the model
        recorded = recorded_text_attention(metadata)
        if recorded is not None and recorded not in TEXT_ATTENTION:
            warnings.warn(f"TrainConfig.init_checkpoint: {config.init_checkpoint!r} records text_attention="
                          f"{recorded!r}, which this version does not know (expected one of {TEXT_ATTENTION}); "
                          f"this run computes {config.text_attention!r} (TrainConfig.text_attention)",
                          UserWarning, stacklevel=2)
        elif recorded in TEXT_ATTENTION and recorded != config.text_attention:
            warnings.warn(f"TrainConfig.init_checkpoint: {config.init_checkpoint!r} was trained with "
                          f"text_attention={recorded!r}, this run computes {config.text_attention!r} "
                          f"(TrainConfig.text_attention)", UserWarning, stacklevel=2)
    return record_trained_with(model, config)


def record_trained_with(model, config: TrainConfig):
    """``model``, with the record of how ``config`` builds it in the metadata of the weights files
    it writes (``config.model``, ``seed``, ``pretrained``, ``text_attention``): zero-shot follows
    it, or warns where it builds the frozen towers otherwise (without pretrained weights they
    are the seed's random towers). :func:`train` records the models it builds; a model passed to
    it that was built the same way (seeded with ``config.seed``, then
    ``ACELoRA.from_config(config.model, ...)``) may carry the record too."""
    from ace_model.checkpoint import default_metadata

    metadata = model.reference_metadata if model.reference_metadata is not None else default_metadata(model)
    # The absolute path: an evaluation run from another folder compares it with the file it is given.
    pretrained = os.path.abspath(config.pretrained) if config.pretrained else config.pretrained
    model.reference_metadata = {**metadata, TRAINED_WITH: {"model": config.model, "seed": config.seed,
                                                           "pretrained": pretrained,
                                                           "text_attention": config.text_attention}}
    return model


def _build_dataset(config: TrainConfig, model: nn.Module):
    if not config.csv:
        raise ValueError("TrainConfig.csv: a CSV of image path, report text and label columns is required")
    from ace_model.data import CSVImageTextDataset

    kwargs = {}
    if config.image_root:
        kwargs["image_root"] = config.image_root
    if not config.use_labels:
        # The plain CLIP loss reads no labels: columns beside image and text (study ids, say) are not
        # parsed as 0/1 labels, which would refuse them.
        kwargs["label_columns"] = []
    dataset = CSVImageTextDataset(config.csv, tokenizer=model.tokenizer(), **kwargs)
    if config.use_labels and not dataset.label_columns:
        warnings.warn(f"TrainConfig.csv: {config.csv!r} has no label columns: training with the plain CLIP loss "
                      "(as use_labels=False, --no-labels), which masks no false negatives", stacklevel=2)
    elif config.use_labels and len(dataset) > 1 and bool((dataset.labels == dataset.labels[0]).all()):
        warnings.warn(f"TrainConfig.csv: every row of {config.csv!r} has the same labels: the label-guided loss "
                      "masks every other sample as a false negative, so it has nothing to learn from (the plain "
                      "CLIP loss: use_labels=False, --no-labels)", stacklevel=2)
    return dataset


def _dataset_fingerprint(dataset) -> str | None:
    """``dataset.fingerprint()`` when the dataset has one (the CSV datasets do), else None."""
    method = getattr(dataset, "fingerprint", None)
    return None if not callable(method) else str(method())


# Fields ranks may set differently: where a rank finds its files (the content is compared: the
# dataset's fingerprint here, the weights broadcast from rank 0) and how it computes its own share
# (chunk size, loader workers) or reports it.
_PER_RANK_FIELDS = ("out_dir", "resume", "overwrite", "progress", "device", "csv", "image_root", "pretrained",
                    "init_checkpoint", "chunk_size", "num_workers", "dist_timeout_s")


def _config_fingerprint(config: TrainConfig, dataset_len: int, trainable, dataset_fingerprint=None) -> dict:
    fields = {k: v for k, v in config.to_dict().items() if k not in _PER_RANK_FIELDS}
    fields["betas"] = [float(b) for b in fields["betas"]]  # (0, 0.9) and (0.0, 0.9) are one setting
    fields["dataset length"] = dataset_len
    fields["dataset fingerprint"] = dataset_fingerprint
    fields["trainable shapes"] = [(n, tuple(p.shape)) for n, p in trainable]
    return fields


def train(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    dataset=None,
    loss_fn: Callable | None = None,
) -> dict:
    """Train ACE-LoRA's trainable parameters; the loop behind ``ace-lora train``.

    Parameters
    ----------
    config : TrainConfig
    model : nn.Module, optional
        Used instead of ``ACELoRA.from_config(config.model, ...)`` (which is built in float32
        whatever ``torch.set_default_dtype`` says). It must have the same parameters on
        every rank (built from the same seed); the frozen weights are broadcast from rank 0
        anyway. Its ``save_reference_checkpoint(path)``, if it has one, is called with a temp
        path that the loop fsyncs and renames.
    dataset : Dataset, optional
        Map-style dataset of ``(image, token_ids, labels)`` items, used instead of
        ``CSVImageTextDataset(config.csv)``. When it has a ``fingerprint()`` method (the CSV
        datasets do), its string is saved in the state, compared on resume and across ranks.
    loss_fn : callable, optional
        Defaults to ``ace_kernels.label_guided_infonce``.

    Returns
    -------
    dict
        ``steps`` (the last step run), ``final_loss``, ``out_dir``, ``metrics`` (path),
        ``state`` and ``reference`` (paths of the last checkpoint; on every rank the files rank 0
        wrote), ``resumed_from``.

    Raises
    ------
    NonFiniteLossError
        On a NaN/inf loss or gradient, before the optimizer step; or on NaN/inf parameters
        after it, found before the checkpoint (or final ``ace_lora.pt``) they would go into.
        The last checkpoint and every metrics line already written stay as they were.
    RankMismatchError
        When processes disagree on the configuration or the batch.
    ValueError
        Naming the ``TrainConfig`` field, before anything is written: a bad setting, or an
        ``out_dir`` that holds another run this one would overwrite (unless ``overwrite``).
    TypeError
        When ``config`` is no :class:`TrainConfig` (None, a dict of its fields), before anything is done.

    A default device set with ``torch.set_default_device`` does not apply inside: the model is
    built on the CPU and moved to ``config.device``, as it is without one.
    """
    if not isinstance(config, TrainConfig):
        # Its fields are read below (validate, to_dict): None or a dict failed there with an AttributeError.
        hint = " (TrainConfig.from_dict builds one from a dict of its fields)" if isinstance(config, dict) else ""
        raise TypeError(f"train: argument 'config': expected a TrainConfig, got {type(config).__name__}{hint}")
    with cpu_default_device():
        return _train_entry(config, model, dataset, loss_fn)


def _train_entry(config, model, dataset, loss_fn) -> dict:
    # Settings a rank may hold on its own (its device, chunk_size, ...), checked before the process group
    # is joined: a rank that fails them tells the others (_fail_before_setup), which would otherwise wait
    # for it in the group's rendezvous or the set-up's first exchange until the timeout. (The out_dir,
    # which only rank 0 writes, rank 0 checks first thing in the set-up.)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = early_error = None
    try:
        config.validate()
        # NumPy numbers (which validate accepts) as the Python ones they hold, for what follows: JSON
        # records, the seeders, the step's own checks.
        config = TrainConfig.from_dict(config.to_dict())
    except Exception as exc:
        early_error = exc
    try:
        device = resolve_device(config.device, local_rank)
    except Exception as exc:
        early_error = early_error or exc
    if early_error is not None:
        _fail_before_setup(early_error, config, device)
    group, rank, world, created_group = _init_distributed(device, config.dist_timeout_s)
    try:
        with contextlib.ExitStack() as held:  # the out_dir lock (rank 0), released however the run ends
            return _train(config, model, dataset, loss_fn, device, group, rank, world, held)
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def _fail_before_setup(error: BaseException, config: TrainConfig, device: torch.device | None) -> None:
    """Raise ``error``, this rank's failed check of its own settings before the set-up, once the other ranks
    know: in the caller's group, or in the group torchrun's variables name (joined for this, when this rank's
    device resolved), they fail the set-up's first exchange with an error saying so."""
    if dist.is_available() and dist.is_initialized():
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL exchanges on the current device, as _init_distributed says
        _fail_together(error, dist.group.WORLD, "setting up the run (model, data and checks)")
    elif dist.is_available() and device is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        timeout = config.dist_timeout_s
        if not (_is_finite_number(timeout) and timeout > 0):
            timeout = TrainConfig.dist_timeout_s  # the bad setting may be this one
        try:
            group = _init_distributed(device, float(timeout))[0]
        except Exception:  # noqa: BLE001 - this rank's own error is the one to report
            raise error from None
        try:
            _fail_together(error, group, "setting up the run (model, data and checks)")
        finally:
            dist.destroy_process_group()
    raise error


def _train(config, model, dataset, loss_fn, device, group, rank, world, held: contextlib.ExitStack) -> dict:
    from tqdm.auto import tqdm

    out_dir = Path(config.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    is_writer = rank == 0

    setup_error = None
    resume_path = state = None
    try:
        # Everything a rank can fail on its own (its device, its model files, its CSV, its share
        # of the batch) is in here, so that it fails the other ranks through _fail_together below
        # instead of leaving them in their first collective until the timeout.
        if is_writer:  # who writes out_dir, whose files would be overwritten; a refusal stops every rank below
            _check_out_dir(out_dir)
            _check_no_other_run(config, out_dir)
        if config.cuda_graph and (device.type != "cuda" or world > 1):
            raise ValueError("TrainConfig.cuda_graph: needs one process on a CUDA device, got "
                             f"{world} process(es) on {device}")
        if config.precision == "bf16" and device.type != "cuda":
            # Checked here, not at the first step: by then config.json and metrics.jsonl are written.
            raise ValueError(f"TrainConfig.precision: 'bf16' autocast needs a CUDA device, but this process runs "
                             f"on {device} (TrainConfig.device {config.device!r}); use 'auto' or 'fp32' there")
        # The state to resume from is read, and the model it records compared, before the model is built
        # (BiomedCLIP's towers take seconds): an unreadable state, or one of the other configuration, is
        # refused without that wait. The rest of it is checked against the run once the run is set up.
        resume_path = resolve_resume(config.resume, out_dir)
        if resume_path is not None:
            state = _read_resume_state(resume_path)
            _check_resume_model(state, config, resume_path)
        # The model is built under the base seed on every rank, so ranks start identical;
        # dropout then draws per-rank streams (seed + rank) so ranks do not share masks.
        seed_everything(config.seed)
        built_here = model is None
        if built_here:
            model = _build_model(config)
        # As built (or given), before the bf16 cast below, which a resume on another device may
        # not make: a resume compares it with the saved run's (see _check_resume_config). Rank 0's
        # only: every rank trains the weights rank 0 broadcasts at set-up.
        frozen_digest = _frozen_weights_digest(model) if rank == 0 else None
        model = model.to(device)
        if built_here and device.type == "cuda" and config.precision in ("bf16", "auto"):
            # Every forward of this run is under bf16 autocast: the frozen matmul weights stored in
            # bf16 give the same bits without a cast per use or a copy kept for each backward.
            # (A model passed in is the caller's, and is left as it is.)
            model.cast_frozen_weights(torch.bfloat16)
        if config.recompute != "none":
            if not hasattr(model, "recompute"):
                raise ValueError(f"TrainConfig.recompute: the model ({type(model).__name__}) has no recompute "
                                 "attribute (ace_model.ACELoRA has)")
            model.recompute = config.recompute
        # What the run records (config.json, the weights' metadata) must be what the model computes.
        have = getattr(model, "text_attention", None)
        if have is None and config.text_attention != "spec":
            raise ValueError(f"TrainConfig.text_attention: the model ({type(model).__name__}) has no "
                             "text_attention attribute (ace_model.ACELoRA has)")
        if have is not None and have != config.text_attention:
            raise ValueError(f"TrainConfig.text_attention: {config.text_attention!r}, but the model passed in computes "
                             f"{have!r}; set one to the other")
        model.train()
        if dataset is None:
            dataset = _build_dataset(config, model)
        loss_fn = loss_fn or _default_loss_fn(model)
        trainable = trainable_named_parameters(model)
        if not trainable:
            raise ValueError("the model has no parameters with requires_grad=True")
        params = [p for _, p in trainable]
        scale = logit_scale_parameter(model)
        if not any(p is scale for p in params):
            raise ValueError("model.logit_scale is not among the trainable parameters")
        n = len(dataset)
        if config.batch_size % world:
            raise ValueError(f"TrainConfig.batch_size: the global batch {config.batch_size} must divide evenly "
                             f"over {world} processes")
        local_batch = config.batch_size // world
        steps_per_epoch = n // config.batch_size
        if steps_per_epoch == 0:
            raise ValueError(f"TrainConfig.batch_size: {config.batch_size} exceeds the dataset's {n} samples "
                             "(incomplete batches are dropped)")
        total_steps = config.epochs * steps_per_epoch
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        warmup = config.warmup_steps
        if warmup is None:
            warmup = config.warmup_epochs * steps_per_epoch  # an int's product is exact, however large
            if isinstance(warmup, float):
                if not math.isfinite(warmup):  # a finite warmup_epochs (validate's check) times the steps can overflow
                    raise ValueError(f"TrainConfig.warmup_epochs: {config.warmup_epochs!r} epochs of {steps_per_epoch} "
                                     "steps each overflows a float; expected a warm-up of finitely many steps (the run "
                                     "has TrainConfig.epochs epochs), or set TrainConfig.warmup_steps")
                warmup = int(round(warmup))
        dataset_record = _dataset_record(dataset, n, steps_per_epoch)
    except Exception as exc:  # re-raised below, once every rank knows
        setup_error = exc
    _fail_together(setup_error, group, "setting up the run (model, data and checks)")

    if group is not None:
        check_ranks_agree(_config_fingerprint(config, n, trainable, dataset_record["dataset_fingerprint"]), group,
                          what="the training configuration")
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                comm = tensor.data if _comm_device(group) == tensor.device else tensor.data.to(_comm_device(group))
                dist.broadcast(comm, src=0, group=group)
                if comm is not tensor.data:
                    tensor.data.copy_(comm)

    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, warmup, total_steps))
    data_gen = torch.Generator().manual_seed(config.seed)
    seed_everything(config.seed + rank)

    step, epoch, batch_in_epoch = 0, 0, 0
    epoch_gen_state = None
    checkpoint_steps: list[int] = []
    run_id = uuid.uuid4().hex  # names this run's lines in metrics.jsonl and its states (read_metrics)
    # Names this process's stretch of the run: its states record it, so that a resume says in
    # metrics.jsonl which stretch's records up to its step it continues (read_metrics).
    segment = uuid.uuid4().hex
    last_loss = None  # the last step's loss (a resumed run starts with its state's)
    resume_error = None
    legacy_state = False
    resumed_run = resumed_segment = None
    try:
        if resume_path is not None:  # its state read at set-up
            if is_writer:
                _check_no_other_run(config, out_dir, resume_path, state)
            _check_resume_config(state, config, world, dataset_record, resume_path, frozen_digest, rank, device)
            _load_trainable(trainable, state["trainable"], resume_path)
            optimizer.load_state_dict(state["optimizer"])
            _check_finite_optimizer(optimizer, trainable, resume_path)
            scheduler.load_state_dict(state["scheduler"])
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            legacy_state = "run_id" not in state  # written before runs had ids: it gets one now
            run_id = state.get("run_id") or run_id
            last_loss = state.get("loss")
            epoch_gen_state = state["data_generator_epoch_start"]
            _rng_restore(state["rng"][rank], device)
            checkpoint_steps = _resumed_checkpoint_steps(state, Path(resume_path), ckpt_dir)
            resumed_run, resumed_segment = state.get("run_id"), state.get("segment")
    except Exception as exc:  # re-raised below, once every rank knows
        resume_error = exc
    _fail_together(resume_error, group, "loading the state to resume from")
    if group is not None:
        # Every rank must continue the same run from the same point: a rank that found no state
        # (a node without the shared checkpoint directory) or another one would train, and write
        # checkpoints, out of step with the others.
        # Each rank loads the state itself (after the set-up's broadcast), so two states of the
        # same step (two runs' files) would leave the ranks training different weights: the
        # states' run ids and the weights loaded must agree too.
        check_ranks_agree({"resumed": int(resume_path is not None), "step": step, "epoch": epoch,
                           "batch in epoch": batch_in_epoch, "run": resumed_run,
                           "trainable weights": _weights_digest(trainable) if resume_path else None}, group,
                          what="the point the run resumes from")

    metrics_path = out_dir / "metrics.jsonl"
    metrics = None
    prepare_error = None
    try:
        if is_writer:
            makedirs_durable(out_dir)
            held.enter_context(_lock_out_dir(out_dir))
            # A run that ended in out_dir since the set-up's check (and released the lock): a fresh run
            # (this run decided so before the other's files were there) is refused unless it may
            # overwrite; a resume is checked against the state it loaded, as before.
            arrived = _run_files(out_dir)
            if resume_path is None and arrived and not config.overwrite:
                raise ValueError(f"TrainConfig.out_dir: {str(out_dir)!r} now holds another run "
                                 f"({' and '.join(arrived)}), written there while this run was being set up, "
                                 "whose files this run would overwrite; choose another directory, or replace it "
                                 "with TrainConfig.overwrite")
            if resume_path is not None:
                _check_no_other_run(config, out_dir, resume_path, state)
        if is_writer and config.overwrite:
            _remove_other_run(out_dir, resume_path, keep=(config.init_checkpoint, config.pretrained))
        if is_writer:
            _remove_stale_temp_files(out_dir)  # safe: no other run writes here while we hold the lock
            atomic_write_text(out_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
            metrics = _open_metrics_for_append(metrics_path)
            event = {"event": "resume" if resume_path else "start", "run": run_id, "segment": segment, "step": step,
                     "time": time.time(), "world_size": world, "total_steps": total_steps,
                     "steps_per_epoch": steps_per_epoch, "chunk_size": config.chunk_size}
            if resume_path:
                event["from"] = str(resume_path)
                if resumed_segment:
                    event["from_segment"] = resumed_segment
                if legacy_state:
                    event["continues_last_start"] = True
            metrics.write(json.dumps(event) + "\n")
            metrics.flush()
    except Exception as exc:  # re-raised below, once every rank knows (the others would wait in step 1)
        prepare_error = exc
        if metrics is not None:
            try:
                metrics.close()  # flushes again what a full disk refused: raises again
            except OSError:
                pass
            metrics = None
    _fail_together(prepare_error, group, "preparing the run directory (rank 0 writes it)")
    # The cosine's first step runs at the full rate: a warm-up of total - 1 steps leaves no decay either.
    if 0 < warmup and total_steps - 1 <= warmup and total_steps > step and config.lr > 0 and is_writer:
        capped = config.max_steps is not None and config.max_steps < config.epochs * steps_per_epoch
        given = "TrainConfig.warmup_steps" if config.warmup_steps is not None else "TrainConfig.warmup_epochs"
        warnings.warn(f"{'TrainConfig.max_steps' if capped else 'TrainConfig.epochs'}: the run's {total_steps} "
                      f"step(s) end within its {warmup}-step warm-up ({given}) or one step after it: the learning "
                      "rate never decays; set a shorter TrainConfig.warmup_steps", UserWarning, stacklevel=2)

    last_state = resume_path
    last_reference = None
    pending_error = None  # this rank's error, raised on every rank at the next agreement
    graphed = None  # the GraphedTrainStep, built at the first batch when config.cuda_graph
    pin = device.type == "cuda"
    bar = tqdm(total=total_steps, initial=step, disable=not (config.progress and is_writer),
               dynamic_ncols=True, desc="train")
    try:
        while step < total_steps:
            if epoch_gen_state is None:
                epoch_gen_state = data_gen.get_state()
            else:
                data_gen.set_state(epoch_gen_state)
            order = torch.randperm(n, generator=data_gen)
            index_lists = []
            for b in range(batch_in_epoch, steps_per_epoch):
                global_idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                index_lists.append(global_idx[rank * local_batch : (rank + 1) * local_batch].tolist())
            index_lists = index_lists[: total_steps - step]
            batches = None
            for _ in index_lists:  # every rank has as many batches
                # A rank that cannot load its batch (an unreadable image on its node, loader
                # workers that cannot start), or whose metrics write failed after the last step,
                # fails every rank here, before the step's collectives would leave them waiting
                # until the timeout.
                try:
                    if pending_error is not None:
                        raise pending_error
                    if batches is None:  # starts the loader's workers: inside the try
                        batches = _load_batches(dataset, index_lists, config.num_workers, pin,
                                                seed=config.seed * 100003 + epoch * 1009 + rank,
                                                draws=(config.seed, epoch, rank), first_batch=batch_in_epoch)
                    images, token_ids, labels = next(batches)
                except Exception as exc:
                    pending_error = exc
                if group is not None or pending_error is not None:
                    _fail_together(pending_error, group, f"loading the batch of step {step + 1} or writing "
                                                         "the metrics of the step before")
                started = time.perf_counter()
                if not config.use_labels:
                    labels = None
                if config.cuda_graph and graphed is None:
                    graphed = GraphedTrainStep(model, images, token_ids, labels, loss_fn=loss_fn,
                                               precision=config.precision)
                if graphed is not None and graphed.matches(images, token_ids, labels):
                    loss = graphed(images, token_ids, labels)  # copied into the graph's buffers
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss = chunked_train_step(model, images, token_ids, labels, chunk_size=config.chunk_size,
                                              group=group, loss_fn=loss_fn, precision=config.precision,
                                              check_ranks=group is not None, loss_scope=config.loss_scope)
                local_loss = config.loss_scope == "local" and group is not None
                sync_gradients(params, group, average=local_loss)
                if local_loss:  # the run's loss: the mean of the ranks' (the same number on every rank)
                    loss = loss.detach().clone()
                    dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=group)
                    loss /= world
                grad_norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]))
                loss_value, grad_norm_value = float(loss), float(grad_norm)
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
                    raise NonFiniteLossError(
                        f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} at step {step + 1} "
                        f"(epoch {epoch}, loss {loss_value}, grad norm {grad_norm_value}); stopped before the "
                        f"optimizer step. {_last_state_note(last_state, resume_path)}; nothing was written after it.")
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                step += 1
                batch_in_epoch += 1
                last_loss = loss_value
                elapsed = time.perf_counter() - started
                if is_writer:
                    try:
                        metrics.write(json.dumps({
                            "step": step, "epoch": epoch, "loss": loss_value, "lr": lr,
                            "samples_per_s": config.batch_size / max(elapsed, 1e-9),
                            "grad_norm": grad_norm_value, "logit_scale": float(scale.detach()),
                            "time": time.time()}) + "\n")
                        metrics.flush()
                    except Exception as exc:  # raised on every rank at the next step (or after the last)
                        pending_error = exc
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                if step == total_steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    # The loss and gradients were finite, yet the step can still make weights
                    # non-finite (an overflow in the update), and none may reach a checkpoint or, after
                    # the last step's, ace_lora.pt. Checked here rather than every step: one host sync
                    # per checkpoint, not per step; a weight that turns non-finite in between makes
                    # a later loss non-finite or is caught here. Every rank decides alike: they hold
                    # the same weights (broadcast from rank 0 at set-up, or one state loaded on
                    # resume, then the same all-reduced gradients through the same AdamW).
                    non_finite = _non_finite_tensors(trainable)
                    if non_finite:
                        raise NonFiniteLossError(
                            f"non-finite parameters after the optimizer step of step {step} (epoch {epoch}; "
                            f"{_first_names(non_finite)}); they were not saved. "
                            f"{_last_state_note(last_state, resume_path)}; no checkpoint was written after it.")
                    last_state, last_reference, checkpoint_steps = _checkpoint(
                        config, ckpt_dir, model, trainable, optimizer, scheduler, step, epoch, batch_in_epoch,
                        epoch_gen_state, device, group, rank, world, metrics,
                        dataset_record, checkpoint_steps, run_id, last_loss, segment, pending_error,
                        frozen_digest)
            if batches is not None:
                # Run out (its sampler holds just these batches): the loader stops its workers
                # here, where a Ctrl-C meanwhile is raised. Left to garbage collection, they
                # stopped in __del__, which swallowed it and the run went on.
                next(batches, None)
            if batch_in_epoch >= steps_per_epoch or step < total_steps:
                epoch += 1
                batch_in_epoch = 0
                epoch_gen_state = None
    finally:
        bar.close()
        if metrics is not None:
            try:
                metrics.flush()
                os.fsync(metrics.fileno())
            except Exception as exc:
                pending_error = pending_error or exc
            try:
                metrics.close()
            except OSError as exc:  # what the flush above refused
                pending_error = pending_error or exc

    final_reference = None
    # Also after a resume with nothing left to train (a run killed between its last
    # checkpoint and this write): the weights loaded are the final ones.
    try:
        if pending_error is not None:
            raise pending_error
        # A model of the caller's without a released-format writer has its states only.
        if is_writer and last_state is not None and hasattr(model, "save_reference_checkpoint"):
            final_reference = out_dir / "ace_lora.pt"
            _atomic_reference_save(model, final_reference)
    except Exception as exc:
        pending_error = exc
    _fail_together(pending_error, group, "writing the last metrics or the final ace_lora.pt (rank 0 writes them)")
    if group is not None:  # as the states' paths (_checkpoint)
        names = [final_reference]
        dist.broadcast_object_list(names, src=0, group=group)
        final_reference = names[0]
    return {
        "steps": step,
        "final_loss": last_loss,
        "out_dir": str(out_dir),
        "metrics": str(metrics_path),
        "state": None if last_state is None else str(last_state),
        "reference": None if final_reference is None else str(final_reference),
        "resumed_from": None if resume_path is None else str(resume_path),
    }


def _non_finite_tensors(named) -> list[str]:
    """Names of the ``(name, tensor)`` pairs holding a NaN or an infinity, in order: one host sync
    per device the tensors lie on (AdamW keeps its step counts on the CPU beside CUDA moments)."""
    by_device: dict = {}
    for index, (_, value) in enumerate(named):
        by_device.setdefault(value.device, []).append(index)
    bad = []
    for indices in by_device.values():
        finite = torch.stack([torch.isfinite(named[i][1].detach()).all() for i in indices]).cpu().tolist()
        bad += [i for i, ok in zip(indices, finite) if not ok]
    return [named[i][0] for i in sorted(bad)]


def _last_state_note(last_state, resume_path) -> str:
    """Which state to go back to after a non-finite step: one this run wrote passed the finite
    checks; the one it resumed from, when no state followed, may itself be the cause."""
    if not last_state:
        return "Last good state: none written"
    if resume_path is not None and str(last_state) == str(resume_path):
        return (f"Last state: {last_state}, the one this run resumed from (if resuming from it fails the same "
                "way, resume from an earlier state)")
    return f"Last good state: {last_state}"


def _first_names(names: list[str], shown: int = 3) -> str:
    """``"a, b, c and 4 more"``."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _checkpoint(config, ckpt_dir, model, trainable, optimizer, scheduler, step, epoch, batch_in_epoch,
                epoch_gen_state, device, group, rank, world, metrics, dataset_record, checkpoint_steps, run_id,
                loss, segment, metrics_error=None, frozen_digest=None):
    """Write this step's state (rank 0), with ``dataset_record`` (see :func:`_dataset_record`) in it
    and the ``segment`` that wrote it (see :func:`read_metrics`). ``metrics_error``: rank 0's failed
    write of a metrics line since the last state; then no state is written and every rank raises.
    ``frozen_digest``: :func:`_frozen_weights_digest` of the model as the run built it."""
    snapshot = _rng_snapshot(device)
    if group is not None:
        # Each rank's chunk size rides with its generators (ranks may differ in it; the config saved is
        # rank 0's): a resume compares its own (_check_resume_config).
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (snapshot, config.chunk_size), group=group)
        rng_all = [rng for rng, _ in gathered]
        chunk_sizes = [chunk for _, chunk in gathered]
    else:
        rng_all, chunk_sizes = [snapshot], [config.chunk_size]
    path = reference = None
    write_error = None
    if rank == 0 and metrics_error is not None:
        # A state now would resume after steps whose metrics lines are missing (a flush that
        # succeeds does not bring back a write that failed): the last good state stays the last.
        write_error = metrics_error
    elif rank == 0:
        try:
            state = {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "data_generator_epoch_start": epoch_gen_state,
                "trainable": {n: p.detach().cpu().clone() for n, p in trainable},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_all,
                "chunk_sizes": chunk_sizes,  # each rank's TrainConfig.chunk_size, in rank order
                "world_size": world,
                "config": config.to_dict(),
                "run_id": run_id,
                "segment": segment,
                "loss": loss,  # this step's, for the summary of a resume with nothing left to run
                "frozen_weights_digest": frozen_digest,
                **dataset_record,
                # "checkpoint_steps" (this run's checkpoints kept after this one) is set by save_checkpoint.
            }
            # Metrics before the state: a resumed run never misses lines of steps it skips.
            metrics.flush()
            os.fsync(metrics.fileno())
            path = save_checkpoint(ckpt_dir, step, state, model, config.keep_checkpoints, checkpoint_steps)
            checkpoint_steps = state["checkpoint_steps"]
            if hasattr(model, "save_reference_checkpoint"):
                reference = ckpt_dir / _checkpoint_names(step)[1]
        except Exception as exc:  # re-raised below, once every rank knows
            write_error = exc
    # This exchange is also the barrier (no rank runs ahead of a checkpoint that may fail), and when
    # rank 0's write fails the others stop too instead of waiting for it in the next collective.
    _fail_together(write_error, group, f"writing the metrics or the checkpoint of step {step} on rank 0")
    if group is not None:  # every rank names the files rank 0 wrote (its errors, train()'s result)
        names = [path, reference]
        dist.broadcast_object_list(names, src=0, group=group)
        path, reference = names
    return path, reference, checkpoint_steps


def _dataset_record(dataset, n: int, steps_per_epoch: int) -> dict:
    """What a state records of the dataset, and a resume compares."""
    return {"dataset_length": n, "dataset_fingerprint": _dataset_fingerprint(dataset),
            "steps_per_epoch": steps_per_epoch}


def _fingerprint_with_every_label_column(config: TrainConfig) -> str | None:
    """For states of ``use_labels=False`` runs saved before 2026-12-03, when every CSV column beside
    image and text was parsed as labels even without labels (they are not read now, so the rows'
    fingerprint has none): the fingerprint such a run recorded. None for a labelled run, without a
    CSV, or where that parse fails (such a CSV could not train then)."""
    if config.use_labels or not config.csv:
        return None
    from ace_model.data import CSVImageTextDataset, DataError

    kwargs = {"image_root": config.image_root} if config.image_root else {}
    try:
        return CSVImageTextDataset(config.csv, tokenizer=None, **kwargs).fingerprint()
    except DataError:
        return None


def _check_resume_model(state: dict, config: TrainConfig, path) -> None:
    """The saved run's TrainConfig.model against this run's, before the model is built (as
    :func:`_check_resume_config`, which compares every field once it is, would say it)."""
    saved = state.get("config")
    saved_model = saved.get("model") if isinstance(saved, dict) else None
    if saved_model is not None and saved_model != config.model:
        raise TrainingStateError(f"resume from {path}: TrainConfig.model was {saved_model!r} in the saved run, now "
                                 f"{config.model!r}; resuming would not continue the same run (its trainable "
                                 "weights fit only its model)")


def _check_resume_config(state: dict, config: TrainConfig, world: int, dataset_record: dict, path,
                         frozen_digest: str | None = None, rank: int = 0,
                         device: torch.device | None = None) -> None:
    saved = state["config"]
    now = config.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved_digest = state.get("frozen_weights_digest")
    # The frozen weights themselves are compared when both runs recorded them (states written before
    # the digest was recorded compare the pretrained path as given): the same weights under another
    # path (moved, or named otherwise: 'w.pt' and './w.pt') continue the run; other weights under the
    # same path (a relative path from another folder, a replaced file) do not. On rank 0 only (the
    # saved digest is rank 0's): the other ranks' weights are replaced by rank 0's broadcast.
    by_content = saved_digest is not None and (frozen_digest is not None or rank != 0)
    # The settings first: without pretrained weights another seed draws other towers too, and the
    # error names the seed, not only their digest.
    for key in sorted(set(saved) | set(now)):
        if key in TrainConfig._RESUMABLE_CHANGES:
            continue
        if key == "pretrained" and by_content:
            continue  # compared below by content (on rank 0)
        if key == "loss_scope" and world == 1 and state["world_size"] == 1:
            continue  # one process: one slice, the same loss either way
        if key not in saved and now.get(key) == defaults.get(key):
            continue  # a field added since that state was written, at the value the run had
        if saved.get(key) != now.get(key):
            raise TrainingStateError(f"resume from {path}: TrainConfig.{key} was {saved.get(key)!r} in the saved "
                                     f"run, now {now.get(key)!r}; resuming would not continue the same run")
    if by_content and frozen_digest is not None and saved_digest != frozen_digest:
        source = (f"TrainConfig.pretrained {config.pretrained!r} holds other weights than the saved run's "
                  f"{saved.get('pretrained')!r} did" if config.pretrained or saved.get("pretrained")
                  else "the frozen towers built now are not the saved run's (a model passed in with other "
                  "weights, or another version of timm, transformers or open_clip drawing other random ones?)")
        raise TrainingStateError(f"resume from {path}: the frozen weights differ from the saved run's (digest "
                                 f"{frozen_digest[:12]}... instead of {saved_digest[:12]}...): {source}; resuming "
                                 "would not continue the same run")
    # Allowed, but the losses from here are not the uninterrupted run's (with dropout, other masks;
    # without, another summation order): say so. A chunk of the local batch or more is the one-pass step.
    def passes(chunk):
        return None if chunk is None or chunk >= config.batch_size // max(world, 1) else chunk

    # This rank's own chunk size in the saved run (ranks may differ in it); states that did not record
    # every rank's have rank 0's, in the config.
    saved_chunks = state.get("chunk_sizes")
    saved_chunk = saved_chunks[rank] if isinstance(saved_chunks, list) and rank < len(saved_chunks) \
        else saved.get("chunk_size")
    if passes(saved_chunk) != passes(config.chunk_size):
        warnings.warn(f"resume from {path}: TrainConfig.chunk_size was {saved_chunk!r}, now "
                      f"{config.chunk_size!r}; the run continues, but its losses will differ from an uninterrupted "
                      "run's (dropout masks drawn in another order, sums taken in another order)", stacklevel=3)
    if state["world_size"] != world:
        raise TrainingStateError(f"resume from {path}: the state was written by {state['world_size']} processes, "
                                 f"this run has {world}")
    n, steps_per_epoch = dataset_record["dataset_length"], dataset_record["steps_per_epoch"]
    # Version 1 states did not record the dataset: nothing to compare then.
    if "dataset_length" in state and (state["dataset_length"], state["steps_per_epoch"]) != (n, steps_per_epoch):
        raise TrainingStateError(
            f"resume from {path}: the saved run's dataset had {state['dataset_length']} samples "
            f"({state['steps_per_epoch']} steps per epoch), this run's has {n} ({steps_per_epoch} steps per "
            "epoch); a different dataset changes the data order and the schedule, so resuming would not "
            "continue the same run")
    # Checked when both runs' datasets have a fingerprint (the CSV datasets do; a custom one may not).
    saved_fingerprint, dataset_fingerprint = state.get("dataset_fingerprint"), dataset_record["dataset_fingerprint"]
    if saved_fingerprint is not None and dataset_fingerprint is not None and saved_fingerprint != dataset_fingerprint \
            and saved_fingerprint != _fingerprint_with_every_label_column(config):
        raise TrainingStateError(
            f"resume from {path}: the dataset's content differs from the saved run's (same {n} samples, but "
            f"fingerprint {dataset_fingerprint[:12]}... instead of {saved_fingerprint[:12]}...: a row, its order, "
            "a text or a label changed), so resuming would not continue the same run")
    # Last, once nothing above refused the state (it holds the generators of as many ranks as wrote it).
    # The device may change, but a CUDA run draws its dropout masks from the GPU's generator: a state
    # written on the CPU holds none, and a CPU run cannot use the one a GPU run's state holds; the
    # arithmetic differs too (bf16 autocast on a GPU). Say so, as for the chunk size. A resume on
    # another GPU takes the state as it is.
    if device is not None:
        saved_on = "cuda" if state["rng"][rank].get("cuda") is not None else "cpu"
        if saved_on != device.type:
            where = "a CUDA GPU" if saved_on == "cuda" else "the CPU"
            warnings.warn(f"resume from {path}: the saved run ran on {where}, this one on {device}; the run "
                          "continues, but its losses will differ from an uninterrupted run's (dropout masks from "
                          "another generator, other arithmetic)", stacklevel=3)


def _weights_digest(trainable) -> str:
    """A SHA-256 of the ``(name, tensor)`` pairs' names, dtypes, shapes and bytes (the bytes hashed
    in place: no copy of a CPU tensor)."""
    digest = hashlib.sha256()
    for name, p in trainable:
        digest.update(f"{name}:{p.dtype}:{list(p.shape)}:".encode())
        tensor = p.detach().cpu().contiguous().reshape(-1)
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def _frozen_weights_digest(model: nn.Module) -> str:
    """:func:`_weights_digest` of ``model``'s frozen parameters (those without ``requires_grad``): the
    towers that pretrained weights (or, without them, the seed) built, which a resume must find again.
    About half a second for BiomedCLIP's 196M weights on the build machine's CPU, once per run."""
    return _weights_digest([(name, p) for name, p in model.named_parameters() if not p.requires_grad])


def _load_trainable(trainable, saved: dict, path) -> None:
    names = {n for n, _ in trainable}
    missing = sorted(names - set(saved))
    extra = sorted(set(saved) - names)
    if missing or extra:
        raise TrainingStateError(f"resume from {path}: trainable parameters differ (missing {missing[:3]}, "
                                 f"unexpected {extra[:3]})")
    # The optimizer's state holds the moments by position, in this order: another order (a model
    # class changed between the runs) would give same-shaped parameters each other's moments.
    order, saved_order = [n for n, _ in trainable], list(saved)
    if saved_order != order:
        at = next(i for i, (now, then) in enumerate(zip(order, saved_order)) if now != then)
        raise TrainingStateError(f"resume from {path}: the trainable parameters come in another order than the "
                                 f"state's (position {at}: {order[at]!r} now, {saved_order[at]!r} in the state), "
                                 "and the optimizer's moments are stored by position")
    with torch.no_grad():
        for name, p in trainable:
            value = saved[name]
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                found = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise TrainingStateError(f"resume from {path}: {name!r} expected a tensor of shape {list(p.shape)}, "
                                         f"found {found}")
            p.copy_(value)
    # Checked as the parameters hold them (a float64 value can overflow float32): a corrupt
    # state must not be trained on, nor (with no step left) reach ace_lora.pt.
    non_finite = _non_finite_tensors(trainable)
    if non_finite:
        raise TrainingStateError(f"resume from {path}: the state's weights hold NaN or infinity "
                                 f"({_first_names(non_finite)}): the file is corrupt; resume from an earlier state"
                                 f"{_earlier_state_note(path)}")


def _check_finite_optimizer(optimizer, trainable, path) -> None:
    """Refuse an optimizer state holding NaN or infinity, or a negative step count or second
    moment (AdamW's sqrt would make it NaN): its first step would spread it."""
    names = {id(p): name for name, p in trainable}
    moments = [(f"the optimizer's {key!r} of {names.get(id(p), '?')}", key, value)
               for p, per_param in optimizer.state.items() for key, value in per_param.items()
               if isinstance(value, torch.Tensor) and value.is_floating_point()]
    non_finite = _non_finite_tensors([(name, value) for name, _, value in moments])
    if non_finite:
        raise TrainingStateError(f"resume from {path}: {non_finite[0]} holds NaN or infinity: the file is corrupt; "
                                 f"resume from an earlier state{_earlier_state_note(path)}")
    signed = [(name, value) for name, key, value in moments if key in _NON_NEGATIVE_OPTIMIZER_STATE]
    negative = [name for name, value in signed if bool((value < 0).any())]
    if negative:
        raise TrainingStateError(f"resume from {path}: {negative[0]} holds a negative value, which AdamW never "
                                 "writes: the file is corrupt; resume from an earlier state"
                                 f"{_earlier_state_note(path)}")


# AdamW's per-parameter state that is never negative: the step count and the second moments.
_NON_NEGATIVE_OPTIMIZER_STATE = ("step", "exp_avg_sq", "max_exp_avg_sq")


# ----------------------------------------------------------------------------------------
# Memory demonstration
# ----------------------------------------------------------------------------------------


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    # VmHWM belongs to this process's address space. getrusage's ru_maxrss does not:
    # Linux carries the parent's high-water mark across fork+exec, so a measuring
    # child of a large process (a long pytest run) would report the parent's peak.
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("VmHWM missing from /proc/self/status")


def _measure_in_this_process(batch: int, chunk_size: int | None, model_name: str, seed: int, threads: int,
                             device: str = "cpu", steps: int = 1, precision: str = "auto") -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    from ace_model import ACELoRA

    dev = torch.device(device)
    model = ACELoRA.from_config(model_name).to(dev)
    if dev.type == "cuda" and precision in ("bf16", "auto"):
        model.cast_frozen_weights(torch.bfloat16)  # as train runs it under bf16 autocast (see train)
    model.train()
    image_shape, context = _input_geometry(model)
    # Inputs stay on the host (pinned on CUDA): chunks travel to the device one at a time.
    images = torch.randn(batch, *image_shape)
    token_ids = torch.randint(1, 100, (batch, context))
    labels = torch.randint(0, 2, (batch, 14))
    if dev.type == "cuda":
        images, token_ids, labels = images.pin_memory(), token_ids.pin_memory(), labels.pin_memory()
        # Warm-up (kernel compilation, allocator growth) outside the timed and measured steps.
        chunked_train_step(model, images[: min(batch, 64)], token_ids[: min(batch, 64)], labels[: min(batch, 64)],
                           chunk_size=chunk_size, precision=precision)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        baseline = torch.cuda.memory_allocated(dev) / 2**20
    else:
        baseline = _current_rss_mib()
    started = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss = chunked_train_step(model, images, token_ids, labels, chunk_size=chunk_size, precision=precision)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = (time.perf_counter() - started) / steps
    result = {
        "batch": batch,
        "chunk_size": chunk_size,
        "model": model_name,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "precision": precision,
        "threads": threads,
        "steps": steps,
        "loss": float(loss),
        "seconds": seconds,
        "samples_per_s": batch / seconds,
        "input_mib": (images.numel() * images.element_size() + token_ids.numel() * token_ids.element_size()) / 2**20,
    }
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
        result.update(baseline_cuda_mib=baseline, peak_cuda_mib=peak, step_extra_mib=peak - baseline)
    else:
        peak = _peak_rss_mib()
        result.update(baseline_rss_mib=baseline, peak_rss_mib=peak, step_extra_mib=peak - baseline)
    return result


def _input_geometry(model) -> tuple[tuple[int, ...], int]:
    image_size = getattr(model, "image_size", None)
    context = getattr(model, "context_length", None)
    if image_size is None or context is None:
        raise ValueError("the model must expose image_size and context_length for measure_chunked_step")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    return (3, *image_size), int(context)


def measure_chunked_step(batch: int, chunk_size: int | None, *, model: str = "tiny", seed: int = 0,
                         threads: int = 1, device: str = "cpu", steps: int = 1, precision: str = "auto",
                         timeout_s: float = 900) -> dict:
    """Run training steps of ``model`` in a fresh process and report memory and time.

    A fresh process per measurement, because the peak RSS of a process only grows.
    The inputs live on the host (pinned on CUDA) as in :func:`train`.

    Parameters
    ----------
    batch, chunk_size : int
        Batch of the step; ``chunk_size=None`` is the one-pass step.
    model : {"tiny", "biomedclip"}
    device : str
        "cpu" or "cuda[:N]". On CUDA one small warm-up step runs first and memory is
        ``torch.cuda.max_memory_allocated``; with ``precision`` "bf16" or "auto" the frozen
        weights are stored in bf16 first, as :func:`train` stores them.
    steps : int
        Timed steps (``seconds`` is their mean).
    precision : {"auto", "bf16", "fp32"}

    Returns
    -------
    dict
        CPU: ``peak_rss_mib`` (whole process), ``baseline_rss_mib`` (model and inputs
        built, before the step). CUDA: ``peak_cuda_mib``, ``baseline_cuda_mib``. Both:
        ``step_extra_mib`` (peak minus baseline: what the steps themselves needed),
        ``input_mib``, ``seconds`` per step, ``samples_per_s``, ``loss``, the arguments.
    """
    import subprocess

    cmd = [sys.executable, "-m", "ace_model.training", "measure", "--batch", str(batch), "--model", model,
           "--seed", str(seed), "--threads", str(threads), "--device", device, "--steps", str(steps),
           "--precision", precision]
    if chunk_size is not None:
        cmd += ["--chunk-size", str(chunk_size)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"measure_chunked_step({batch}, {chunk_size}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ace_model.training")
    sub = parser.add_subparsers(dest="command", required=True)
    measure = sub.add_parser("measure", help="one chunked step in this process; prints JSON")
    measure.add_argument("--batch", type=int, required=True)
    measure.add_argument("--chunk-size", type=int, default=None)
    from ace_model.model import CONFIG_NAMES

    measure.add_argument("--model", default="tiny", choices=CONFIG_NAMES)  # (another was a traceback, after torch)
    measure.add_argument("--seed", type=int, default=0)
    measure.add_argument("--threads", type=int, default=1)
    measure.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    measure.add_argument("--steps", type=int, default=1)
    measure.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = parser.parse_args(argv)
    for flag, least in (("batch", 1), ("steps", 1), ("threads", 1), ("chunk_size", 1)):
        value = getattr(args, flag)
        if value is not None and value < least:  # (--steps 0 divided by zero after building the model)
            parser.error(f"argument --{flag.replace('_', '-')}: expected >= {least}, got {value}")
    # Before anything is built, as train and zero-shot check theirs: a device type torch does not know, CUDA
    # or a card this machine lacks, and bf16 autocast off CUDA were tracebacks (the last three after the build).
    try:
        device = resolve_device(args.device, name="argument --device")
    except ValueError as exc:
        parser.error(str(exc))
    if args.precision == "bf16" and device.type != "cuda":
        parser.error(f"argument --precision: 'bf16' autocast needs a CUDA device, got --device {args.device!r}")
    result = _measure_in_this_process(args.batch, args.chunk_size, args.model, args.seed, args.threads,
                                      str(device), args.steps, args.precision)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
