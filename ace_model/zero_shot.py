"""Prompt-ensemble zero-shot classification (spec section 6), batched, with its metrics.

Text side: each class name is put into every template; the per-token text features
(L2-normalised, padding included) and the last layer's CLS attention rows are averaged
over the templates, and the averages go through the text ACE-HGNN; the CLS output,
normalised, is the class embedding. Image side: the image ACE-HGNN's normalised CLS
output. All images of a batch go through the model at once (the reference runs one
image at a time).

Scores and metrics per dataset type, as the reference evaluates them:

``multiclass`` (e.g. CheXpert 5x200)
    probabilities ``softmax(s * z_img z_text^T)``; prediction = argmax; ``accuracy`` =
    prediction equals the labelled class; ``accuracy_macro`` = the mean over classes of
    their recall (what the reference reports as accuracy: torchmetrics'
    ``MulticlassAccuracy``, macro by default; the two agree on a balanced set such as
    5x200); macro one-vs-rest AUROC of the probabilities.
``binary`` (RSNA pneumonia, SIIM pneumothorax; classes [negative, positive])
    as multiclass with two classes; AUROC of the positive-class probability, as the
    reference's scripts compute it.
``multilabel`` (NIH ChestX-ray14)
    the same probabilities ``softmax(s * z_img z_text^T)`` (spec section 6, the recipe of
    every evaluation; the reference scores this dataset only in a validation pass of its
    training, with per-image min-max scaled ``exp`` similarities); macro AUROC
    over labels. The reference reports no accuracy here; ``accuracy`` is the share of images
    with at least one positive label whose top class (the argmax) is one of them (NaN when
    no image has a positive label).

The multiplier ``s``: by default (``logit_scale="base"``) the frozen base model's own,
``exp`` of its stored log scale, which the reference's zero-shot scripts use (100 for
BiomedCLIP); ``"learned"`` takes the trained multiplier of the loss instead. Accuracy and the
binary AUROC do not depend on it; the multiclass and multilabel AUROCs do, a little.

AUROC is computed here with ties given half credit (the Mann-Whitney statistic);
classes without both positives and negatives are left out of the macro average. The metrics
rank the log-probabilities in float64 (:func:`zero_shot_scores` with ``log=True``), in the
probabilities' order: float32 probabilities round to exactly 1.0 once a class leads by about
17 logits (a cosine margin of 0.17 at ``s`` = 100), and such ties would halve the credit of
images the exact probabilities rank apart; the log-probabilities keep them apart up to a
lead of about 700 logits.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import string
import sys
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ace_kernels._checks import check_bool, check_positive_int

TEMPLATES = ("a chest X-ray image of {c}.", "Findings suggesting {c}.")
TASKS = ("multiclass", "binary", "multilabel")


# ----------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _evaluating(model, device):
    """``model`` in eval mode (no dropout) inside, in the mode it had afterwards; under the
    autocast its frozen weights need when ``ACELoRA.cast_frozen_weights`` stored them in 16 bits."""
    frozen = getattr(model, "frozen_weights_dtype", None)
    autocast = (torch.autocast(torch.device(device).type, dtype=frozen)
                if frozen is not None and frozen != torch.float32 else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    try:
        with autocast:
            yield
    finally:
        model.train(was_training)


def _check_names(name: str, values, *, what: str) -> list[str]:
    """A list of at least one non-empty string, none twice (a lone string is not a list of them)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"argument {name!r}: expected a list of {what} strings, got {type(values).__name__} "
                         f"{values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"argument {name!r}: expected at least one {what}, got none")
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"argument {name!r}: expected non-empty strings, got {value!r}")
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"argument {name!r}: {repeated[0]!r} is given {values.count(repeated[0])} times")
    return values


def check_prompts(class_names: Sequence[str], templates: Sequence[str]) -> tuple[list[str], list[str]]:
    """The class names and templates as lists, or a ``ValueError`` naming the argument: at
    least one of each, no repeats, and each template with one ``{c}`` field for the name (a
    template without it would give every class the same prompt)."""
    class_names = _check_names("class_names", class_names, what="class name")
    templates = _check_names("templates", templates, what="template")
    for template in templates:
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        except ValueError as exc:
            raise ValueError(f"argument 'templates': {template!r} is not a format string ({exc})") from None
        names = {re.split(r"[.\[]", field, maxsplit=1)[0] for field in fields}
        if "c" not in names:
            raise ValueError(f"argument 'templates': {template!r} has no {{c}} field for the class name, so "
                             "every class would get the same prompt")
        if names != {"c"}:
            raise ValueError(f"argument 'templates': {template!r} has fields other than {{c}} "
                             f"({sorted(names - {'c'})}); only the class name is filled in")
    return class_names, templates


@torch.no_grad()
def class_embeddings(model, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Prompt-ensembled class embeddings ``[C, D]`` (normalised), in eval mode.

    All C x T prompts are encoded in one batch; token features and CLS rows are averaged
    over the T templates before the text ACE-HGNN.
    """
    class_names, templates = check_prompts(class_names, templates)
    device = device or next(model.parameters()).device
    prompts = [template.format(c=name) for name in class_names for template in templates]
    token_ids = model.tokenizer()(prompts).to(device)
    with _evaluating(model, device):
        tokens, cls_row = model.text_tokens(token_ids)
        count = len(templates)
        tokens = tokens.reshape(len(class_names), count, *tokens.shape[1:]).mean(dim=1)
        cls_row = cls_row.reshape(len(class_names), count, -1).mean(dim=1)
        return model.text_head(tokens, cls_row, cls_only=True)


@torch.no_grad()
def image_embeddings(model, batches: Iterable,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image of ``batches`` (``(images, labels)`` pairs) in eval mode; returns
    (z [N, D], labels [N, C])."""
    device = device or next(model.parameters()).device
    embeddings, labels = [], []
    with _evaluating(model, device):
        for images, batch_labels in batches:
            embeddings.append(model.encode_image(images.to(device)).float().cpu())
            labels.append(batch_labels.float().cpu())
    if not embeddings:
        raise ValueError("zero-shot evaluation got no images")
    return torch.cat(embeddings), torch.cat(labels)


# ----------------------------------------------------------------------------------------
# AUROC
# ----------------------------------------------------------------------------------------


def binary_auroc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` [N] for 0/1 ``targets`` [N].

    Equal to the probability that a random positive scores above a random negative,
    ties counting one half (so it does not depend on how ties are ordered). NaN when
    ``targets`` has no positives or no negatives. A NaN score is a ``ValueError`` (it has no
    rank: sorted last, it would pass for the highest score); infinities rank as usual.
    """
    # A tensor stays on its device (torch.as_tensor would move it to a default device set with
    # torch.set_default_device); anything else becomes a CPU tensor.
    scores = (scores.double() if isinstance(scores, torch.Tensor)
              else torch.as_tensor(scores, dtype=torch.float64, device="cpu")).flatten()
    targets = (targets if isinstance(targets, torch.Tensor) else torch.as_tensor(targets, device="cpu")).flatten() > 0.5
    if scores.shape != targets.shape:
        raise ValueError(f"binary_auroc: scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ")
    nan = int(torch.isnan(scores).sum())
    if nan:
        raise ValueError(f"binary_auroc: {nan} of {scores.numel()} scores are NaN, which have no rank (expected "
                         "finite scores or infinities)")
    positives = int(targets.sum())
    negatives = targets.numel() - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    # Average ranks (1-based) over runs of tied scores.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mean_rank_of_run = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank_of_run[inverse]
    rank_sum = ranks[targets].sum().item()
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def per_class_auroc(scores: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """AUROC of each column of ``scores`` [N, C] against 0/1 ``targets`` [N, C] (one-vs-rest
    for multiclass); NaN for a column without both positives and negatives."""
    # Checked: fewer score columns than target columns would leave the others out unsaid.
    if scores.dim() != 2 or tuple(scores.shape) != tuple(targets.shape):
        raise ValueError(f"per_class_auroc: expected scores and targets of one shape [N, C], got scores "
                         f"{tuple(scores.shape)} and targets {tuple(targets.shape)}")
    return [binary_auroc(scores[:, j], targets[:, j]) for j in range(scores.shape[1])]


def macro_auroc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean of per-column AUROCs of ``scores`` [N, C] against 0/1 ``targets`` [N, C]
    (one-vs-rest for multiclass); columns without both classes are skipped."""
    return _mean_of_defined(per_class_auroc(scores, targets))


def _mean_of_defined(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return float(sum(values) / len(values)) if values else float("nan")


# ----------------------------------------------------------------------------------------
# Scores and metrics
# ----------------------------------------------------------------------------------------


def resolve_logit_scale(model, logit_scale: str | float) -> float:
    """The multiplier ``evaluate`` uses: see its ``logit_scale``. It must be finite and positive
    whatever its source: a model's NaN or negative multiplier (a corrupt or foreign checkpoint)
    would give NaN scores or invert every ranking, not an error."""
    if logit_scale in ("base", "learned"):
        if logit_scale == "base":
            value, source = float(model.clip.logit_scale.detach().float().exp()), "the base model's exp(logit_scale)"
        else:
            value, source = float(model.logit_scale.detach().float()), "the model's learned logit_scale"
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"argument 'logit_scale': {logit_scale!r} takes {source}, which is {value!r}; expected a "
                             "finite positive multiplier (are the model's weights corrupt?)")
        return value
    if isinstance(logit_scale, torch.Tensor) and logit_scale.numel() == 1 and logit_scale.dim() <= 1 \
            and logit_scale.dtype != torch.bool and not logit_scale.is_complex():
        logit_scale = float(logit_scale.detach())
    if isinstance(logit_scale, numbers.Real) and not isinstance(logit_scale, (bool, np.bool_)) \
            and math.isfinite(logit_scale) and logit_scale > 0:
        return float(logit_scale)
    raise ValueError(f"argument 'logit_scale': expected 'base', 'learned' or a finite positive number, "
                     f"got {logit_scale!r}")


def zero_shot_scores(image_emb: torch.Tensor, class_emb: torch.Tensor, logit_scale: float | torch.Tensor,
                     task: str, *, log: bool = False) -> torch.Tensor:
    """Per-image class scores ``[N, C]`` as the reference computes them for ``task``: float32
    probabilities; with ``log=True`` their logarithms in float64, which rank as the exact
    probabilities do (what :func:`evaluate` hands to the metrics: see the module docstring)."""
    if task not in TASKS:
        raise ValueError(f"argument 'task': expected one of {TASKS}, got {task!r}")
    similarity = image_emb.float() @ class_emb.float().T
    logits = float(logit_scale) * similarity
    if not log:
        return logits.softmax(dim=-1)
    # log p = l - max - log1p(sum of the others' exp(l - max)): a row's top class keeps its
    # distance from 1 (log_softmax's log(1 + tiny) rounds it to 0 past about 37 logits).
    logits = logits.double()
    top = logits.argmax(dim=-1, keepdim=True)
    shifted = logits - logits.gather(-1, top)
    others = shifted.exp().scatter(-1, top, 0.0).sum(dim=-1, keepdim=True)
    return shifted - torch.log1p(others)


def check_single_label(labels: torch.Tensor, task: str) -> None:
    """Labels must be 0 or 1 (for every task); for ``multiclass`` and ``binary``, every label
    row must be one-hot.

    Raises
    ------
    ValueError
        Naming the first rows (numbered from 1 in dataset order, as in the CSV) with a value
        other than 0 and 1 (an uncertain -1 or a soft label: map them first, as
        ``ace_model.data`` maps -1 and empty to 0), or, with the dataset type, the first rows
        with no positive class or with several.
    """
    odd = (labels != 0) & (labels != 1)
    if bool(odd.any()):
        rows = (torch.nonzero(odd.any(dim=1)).flatten() + 1).tolist()
        first = labels[rows[0] - 1][odd[rows[0] - 1]][0].item()
        raise ValueError(f"labels: expected 0 or 1, found {first!r} in row {rows[0]}"
                         f"{f' and {len(rows) - 1} more row(s)' if len(rows) > 1 else ''}; rows are numbered from 1 "
                         "in dataset order (map uncertain -1 and missing labels to 0 first)")
    if task == "multilabel":
        return
    positives = (labels.float() != 0).sum(dim=1)
    problems = []
    for what, mask in (("no positive class", positives == 0), ("several positive classes", positives > 1)):
        rows = (torch.nonzero(mask).flatten() + 1).tolist()
        if rows:
            shown = ", ".join(str(r) for r in rows[:5]) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
            problems.append(f"{len(rows)} row(s) with {what} (row {shown})")
    if problems:
        raise ValueError(f"{task} labels: expected exactly one positive class per row, found "
                         f"{'; '.join(problems)}; rows are numbered from 1 in dataset order. "
                         "Use task 'multilabel' for rows with several or no positive classes")


def zero_shot_metrics(scores: torch.Tensor, labels: torch.Tensor, task: str) -> dict:
    """Accuracy and AUROC for ``task`` from scores and 0/1 labels, both ``[N, C]``.

    ``scores``: probabilities, or anything that ranks as they do within each column and row
    (``zero_shot_scores(..., log=True)``); only their order and each row's argmax are used.

    ``multiclass`` and ``binary`` need one-hot label rows (:func:`check_single_label`).
    ``multiclass`` and ``multilabel`` also give ``auroc_per_class`` (NaN for a class without
    both positives and negatives, which the macro ``auroc`` leaves out).
    """
    if scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ in shape")
    if task not in TASKS:
        raise ValueError(f"argument 'task': expected one of {TASKS}, got {task!r}")
    check_single_label(labels, task)
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        # A NaN ranks anywhere in an AUROC and never in an argmax: the metrics would look plausible.
        raise ValueError(f"scores: {bad} of {scores.numel()} entries are not finite (NaN or inf): the model's "
                         "outputs are not finite (corrupt weights?), so no metric can be computed")
    labels = labels.float()
    extra = {}
    if task == "multilabel":
        # Over a softmax at most one class reaches 0.5, so a threshold says little: the argmax
        # (spec section 6's prediction) counts when it is one of the image's positives.
        labelled = labels.sum(dim=1) > 0
        hits = labels.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1) > 0
        labelled_count = int(labelled.sum())
        accuracy = int(hits[labelled].sum()) / labelled_count if labelled_count else float("nan")
        extra["auroc_per_class"] = per_class_auroc(scores, labels)
        auroc = _mean_of_defined(extra["auroc_per_class"])
    else:
        predicted = scores.argmax(dim=1)
        truth = labels.argmax(dim=1)
        hits = int((predicted == truth).sum())
        accuracy = hits / predicted.numel() if predicted.numel() else float("nan")  # exact: 51/200 prints 0.255
        if task == "multiclass":
            extra["accuracy_macro"] = macro_accuracy(predicted, truth, scores.shape[1])
        if task == "binary":
            _check_binary_classes(scores.shape[1])
            auroc = binary_auroc(scores[:, 1], labels[:, 1])
        else:
            one_hot = F.one_hot(truth, scores.shape[1]).float()
            extra["auroc_per_class"] = per_class_auroc(scores, one_hot)
            auroc = _mean_of_defined(extra["auroc_per_class"])
    return {"task": task, "n": int(scores.shape[0]), "accuracy": accuracy, **extra, "auroc": auroc}


def _check_binary_classes(count: int) -> None:
    if count != 2:
        raise ValueError(f"binary task: expected 2 classes [negative, positive], got {count}")


def macro_accuracy(predicted: torch.Tensor, truth: torch.Tensor, classes: int) -> float:
    """Mean over classes of ``tp / (tp + fn)`` (recall), as torchmetrics' ``MulticlassAccuracy``
    averages by default: a class that is neither labelled nor predicted is left out; one that is
    only predicted counts with recall 0."""
    # On truth's device (not the default one, nor the CPU for CUDA labels).
    hits = torch.zeros(classes, dtype=torch.float64, device=truth.device)
    support = torch.zeros(classes, dtype=torch.float64, device=truth.device)
    predicted_count = torch.zeros(classes, dtype=torch.float64, device=truth.device)
    support.index_add_(0, truth, torch.ones_like(truth, dtype=torch.float64))
    predicted_count.index_add_(0, predicted, torch.ones_like(predicted, dtype=torch.float64))
    hits.index_add_(0, truth, (predicted == truth).double())
    present = (support + predicted_count) > 0
    recall = torch.where(support > 0, hits / support.clamp_min(1), torch.zeros_like(hits))
    return float(recall[present].mean()) if present.any() else float("nan")


@torch.no_grad()
def evaluate(model, dataset, class_names: Sequence[str], task: str = "multiclass", *, batch_size: int = 64,
             templates: Sequence[str] = TEMPLATES, device: torch.device | str | None = None,
             num_workers: int = 0, logit_scale: str | float = "base", progress: bool = False) -> dict:
    """Zero-shot evaluation of ``model`` on ``dataset`` (items ``(image, labels [C])``).

    ``class_names`` name the label columns in order; a dataset with ``label_columns`` (the CSV
    datasets) that has one of them at another position is refused.

    ``logit_scale``: ``"base"`` (the frozen base model's multiplier, as the reference's
    zero-shot scripts), ``"learned"`` (``model.logit_scale``) or a positive number.

    ``progress``: a tqdm bar over the image batches on stderr (``ace-lora zero-shot`` shows it
    unless ``--no-progress``, as ``train`` shows its steps'); off by default.

    Returns a dict with ``task``, ``n``, ``accuracy`` (and ``accuracy_macro`` for
    ``multiclass``), ``auroc_per_class`` (``multiclass`` and ``multilabel``: class name ->
    AUROC, NaN for a class without both positive and negative samples, left out of the macro
    mean), ``auroc``, ``logit_scale`` and ``images_per_s``; ``auroc`` is NaN when no class
    has both.

    A default device set with ``torch.set_default_device`` does not apply inside: the scores
    and metrics are computed on the CPU, as they are without one.
    """
    from ace_model.training import cpu_default_device

    with cpu_default_device():
        return _evaluate(model, dataset, class_names, task, batch_size, templates, device, num_workers, logit_scale,
                         progress)


def _evaluate(model, dataset, class_names, task, batch_size, templates, device, num_workers, logit_scale,
              progress) -> dict:
    import time

    if task not in TASKS:
        raise ValueError(f"argument 'task': expected one of {TASKS}, got {task!r}")
    scale = resolve_logit_scale(model, logit_scale)
    # Before any work: None or a string would fail this comparison with a TypeError naming no argument,
    # True would pass as batches of one.
    batch_size = check_positive_int("batch_size", batch_size)
    num_workers = check_positive_int("num_workers", num_workers, minimum=0)
    progress = check_bool("progress", progress)
    class_names, templates = check_prompts(class_names, templates)
    if task == "binary":  # before the images are encoded
        _check_binary_classes(len(class_names))
    dataset_labels = getattr(dataset, "labels", None)
    if isinstance(dataset_labels, torch.Tensor) and dataset_labels.dim() == 2:
        if dataset_labels.shape[1] != len(class_names):  # before the images are encoded
            raise ValueError(f"dataset has {dataset_labels.shape[1]} label columns but {len(class_names)} class names")
        try:
            check_single_label(dataset_labels, task)  # before the images are encoded
        except ValueError as exc:
            where = getattr(dataset, "csv_path", None)
            raise ValueError(f"{where}: {exc}" if where else str(exc)) from None
    columns = getattr(dataset, "label_columns", None)  # the CSV datasets' names of their label columns
    if isinstance(columns, (list, tuple)) and all(isinstance(c, str) for c in columns):
        # Scores column j is class_names[j], labels column j is columns[j]: a class named like another
        # position's column would score each class against another class's labels, with no error.
        moved = [name for j, name in enumerate(class_names) if name in columns and columns.index(name) != j]
        if moved:
            raise ValueError(f"argument 'class_names': {moved[0]!r} is class {class_names.index(moved[0]) + 1} but "
                             f"label column {list(columns).index(moved[0]) + 1} of the dataset (label columns: "
                             f"{list(columns)}); give the class names in the order of the label columns")
    device = device or next(model.parameters()).device
    text = class_embeddings(model, class_names, templates, device).float().cpu()
    # One batch of every row at most (a batch_size past sys.maxsize fails inside the sampler, naming nothing).
    batch_size = min(batch_size, max(len(dataset), 1) if hasattr(dataset, "__len__") else sys.maxsize)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        # tqdm takes the loader's length itself, and goes without a total for a dataset that has none.
        batches = tqdm(loader, desc="zero-shot", unit="batch")
    start = time.perf_counter()
    try:
        image, labels = image_embeddings(model, batches, device)
    finally:
        if progress:
            batches.close()  # the loop's end closes it too, an error does not
    elapsed = time.perf_counter() - start
    if labels.shape[1] != len(class_names):
        raise ValueError(f"dataset has {labels.shape[1]} label columns but {len(class_names)} class names")
    scores = zero_shot_scores(image, text, scale, task, log=True)
    result = zero_shot_metrics(scores, labels, task)
    if "auroc_per_class" in result:
        result["auroc_per_class"] = dict(zip(class_names, result["auroc_per_class"]))
    result["logit_scale"] = scale
    result["images_per_s"] = image.shape[0] / max(elapsed, 1e-9)
    return result
