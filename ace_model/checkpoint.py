"""The released ACE-LoRA checkpoint format (spec section 7), read and written exactly.

A pickled dict ``{'weights': ..., 'metadata': ...}``:

- ``weights['layer_i']`` for i = 0 .. T+V-1: text attention layers 0..T-1 first, then
  vision layers 0..V-1 (T = V = 12 for BiomedCLIP); each a dict
  ``{'q_proj'|'k_proj'|'v_proj': {'w_lora_A': [r, in], 'w_lora_B': [out, r]}}``;
- ``weights['img_edge_adapter' | 'img_node_adapter' | 'text_edge_adapter' |
  'text_node_adapter']``: state dicts (``down.weight``, ``down.bias``, ``up.weight``,
  ``up.bias``);
- ``weights['logit_scale']``: the multiplier itself (0-d tensor);
- ``metadata``: ``{'r', 'topk', 'k_nearest', 'params', 'position', 'loss_type'}``.

Files are read with ``torch.load(..., map_location="cpu", weights_only=True)`` (the
released tensors were saved on a CUDA device) and written atomically.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO, Callable

import torch

from ace_model._atomic import atomic_torch_save, torch_save_to

PROJECTIONS = ("q_proj", "k_proj", "v_proj")
LORA_KEYS = ("w_lora_A", "w_lora_B")
ADAPTER_KEYS = ("down.weight", "down.bias", "up.weight", "up.bias")
ADAPTERS = (("img_edge_adapter", "image_hgnn", "edge_adapter"),
            ("img_node_adapter", "image_hgnn", "node_adapter"),
            ("text_edge_adapter", "text_hgnn", "edge_adapter"),
            ("text_node_adapter", "text_hgnn", "node_adapter"))
LOSS_TYPES = ("clip_loss_ace_hgnn", "clip_loss_ace_hgat")
# The metadata every released-format writer records (the released file, the reference code's save_lora, ours)
# and check_metadata checks against the model; "k_nearest" is in the released file only.
RECORDED = ("r", "topk", "params", "position", "loss_type")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names the first bad key."""


def default_metadata(model) -> dict:
    rank = model.text_lora[0].rank
    return {"r": rank, "topk": model.topk, "k_nearest": model.topk, "params": ["q", "k", "v"],
            "position": "all", "loss_type": "clip_loss_ace_hgnn"}


def _lora_layers(model):
    """The model's LoRAQKV modules in checkpoint order: text first, then vision."""
    return list(model.text_lora) + list(model.image_lora)


def _adapter(model, attribute: str, which: str):
    return getattr(getattr(model, attribute), which)


def reference_weights(model) -> dict:
    """The trainable weights of ``model`` as the released ``weights`` dict (CPU fp32 copies)."""
    weights: dict = {}
    for index, lora in enumerate(_lora_layers(model)):
        layer = {}
        for p, projection in enumerate(PROJECTIONS):
            layer[projection] = {
                "w_lora_A": lora.lora_a.detach()[p].to("cpu", torch.float32).clone(),
                "w_lora_B": lora.lora_b.detach()[p].to("cpu", torch.float32).clone(),
            }
        weights[f"layer_{index}"] = layer
    for key, attribute, which in ADAPTERS:
        state = _adapter(model, attribute, which).state_dict()
        weights[key] = OrderedDict((k, state[k].detach().to("cpu", torch.float32).clone()) for k in ADAPTER_KEYS)
    weights["logit_scale"] = model.logit_scale.detach().to("cpu", torch.float32).clone()
    return weights


def save_reference_checkpoint(model, path: str | os.PathLike | BinaryIO, metadata: dict | None = None) -> None:
    """Write ``model``'s trainable weights to ``path`` in the released format.

    ``path`` is a file name, written atomically (temp file, fsync, rename), or a binary
    file object open for writing, written as is: the caller owns its atomicity (the
    training loop writes through one temp file this way, not a temp file of a temp file).

    The metadata is, in order of preference: ``metadata``, the metadata of the last
    released-format file loaded into the model (so a load/save round trip is exact) with its
    ``r`` and ``topk`` entries set to the model's own, added where that file had none (a k
    changed after the load is what the weights were trained with, and what loading checks),
    or :func:`default_metadata`.
    """
    if metadata is None:
        if model.reference_metadata is not None:
            own = default_metadata(model)
            metadata = dict(model.reference_metadata)
            metadata.update(r=own["r"], topk=own["topk"])  # in place where present, else after the others
        else:
            metadata = default_metadata(model)
    blob = {"weights": reference_weights(model), "metadata": dict(metadata)}
    if hasattr(path, "write"):
        torch_save_to(blob, path)
    else:
        atomic_torch_save(blob, path)


def _expect_tensor(where: str, value, expected_shape: tuple, into: torch.dtype) -> torch.Tensor:
    """``value`` as a floating tensor of ``expected_shape`` whose values are finite once copied
    into a parameter of dtype ``into`` (a float64 1e40 is an infinity in float32)."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{where}: expected a tensor of shape {expected_shape}, found {type(value).__name__}")
    if value.is_nested:  # its .shape raises
        raise CheckpointError(f"{where}: expected a dense tensor of shape {expected_shape}, found a nested tensor")
    if tuple(value.shape) != tuple(expected_shape):
        raise CheckpointError(f"{where}: expected shape {tuple(expected_shape)}, found {tuple(value.shape)}")
    if not value.is_floating_point():
        raise CheckpointError(f"{where}: expected a floating-point tensor, found {value.dtype}")
    if value.layout != torch.strided:
        raise CheckpointError(f"{where}: expected a dense tensor, found layout {value.layout}")
    if value.is_meta:  # saved from a model built on the 'meta' device (no weights allocated)
        raise CheckpointError(f"{where}: a tensor without values (device 'meta'), saved from a model whose weights "
                              "were never allocated; expected stored values")
    finite = torch.isfinite(value.to(into))
    if not bool(finite.all()):
        # Training never writes one (it stops on a non-finite loss or weight): a corrupt file.
        bad = int((~finite).sum())
        beyond = "" if value.dtype == into else f" in {str(into).replace('torch.', '')}"
        raise CheckpointError(f"{where}: {bad} of {value.numel()} values are not finite (NaN or inf){beyond}; a "
                              "trained checkpoint has none (a corrupt file?)")
    return value


def _some_keys(mapping: dict, shown: int = 8) -> str:
    """The first ``shown`` keys of ``mapping`` and how many more (a foreign state dict has hundreds)."""
    keys = list(mapping)
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{keys[:shown]}{more}"


def _expect_dict(where: str, value, keys) -> dict:
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: expected a dict with keys {list(keys)}, found {type(value).__name__}")
    for key in keys:
        if key not in value:
            raise CheckpointError(f"{where}: missing key {key!r} (found keys {_some_keys(value)})")
    return value


def _expect_only(where: str, value: dict, keys, what: str) -> None:
    """Refuse a key ``value`` has beyond ``keys``: loading would drop it, and the next save lose it."""
    extra = [key for key in value if key not in keys]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise CheckpointError(f"{where}: unexpected key {extra[0]!r}{more} ({what} {list(keys)}); loading would "
                              "drop it")


def _differs(value, want) -> bool:
    """``value != want`` as a bool; a value whose comparison has no single truth (a tensor or array of
    several values raised torch's 'Boolean value of Tensor with more than one value is ambiguous',
    naming neither the file nor the entry) differs."""
    try:
        return bool(value != want)
    except Exception:
        return True


def check_metadata(model, metadata, path) -> None:
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: 'metadata' must be a dict, found {type(metadata).__name__}")
    rank = model.text_lora[0].rank
    # "k_nearest" (5 in the release, beside topk 5) is not checked: the spec does not say what it
    # sets, the reference code neither writes nor reads it (its save_lora records the RECORDED keys;
    # the released run's hyperparameters list topk alone), and it is written back as it was loaded.
    checks = (("r", rank), ("topk", model.topk), ("position", "all"))
    for key, want in checks:
        if key in metadata and _differs(metadata[key], want):
            raise CheckpointError(f"{path}: metadata[{key!r}] is {metadata[key]!r}, this model needs {want!r}")
    if "params" in metadata and (not isinstance(metadata["params"], (list, tuple))
                                 or list(metadata["params"]) != ["q", "k", "v"]):
        raise CheckpointError(f"{path}: metadata['params'] is {metadata['params']!r}, this model adapts "
                              "['q', 'k', 'v']")
    if "loss_type" in metadata and metadata["loss_type"] not in LOSS_TYPES:
        raise CheckpointError(f"{path}: metadata['loss_type'] is {metadata['loss_type']!r}, "
                              f"expected one of {LOSS_TYPES}")


def load_reference_checkpoint(model, path: str | os.PathLike) -> dict:
    """Load a released-format checkpoint into ``model``; return its metadata.

    Every key and shape is checked before anything is copied, so a bad file leaves the
    model unchanged. A file whose metadata lacks one of :data:`RECORDED` loads with a
    ``UserWarning`` naming them: the model's ``r`` and ``topk`` could not be checked.

    Raises
    ------
    CheckpointError (a ValueError)
        Naming the first missing or mis-shaped key with the expected and found shapes,
        or a metadata entry that does not fit the model.
    """
    return apply_reference_checkpoint(model, path, read_reference_checkpoint(path))


def load_weights_only(path: str | os.PathLike):
    """``torch.load(path, map_location="cpu", weights_only=True)`` without torch's warnings (the one
    about a plain pickle's protocol: the caller's error says what the file is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def read_reference_checkpoint(path: str | os.PathLike):
    """The object stored in checkpoint file ``path`` (``torch.load``, weights only), unchecked:
    :func:`apply_reference_checkpoint` checks it against a model. A file that cannot be read
    raises :class:`CheckpointError`, a missing one included."""
    path = os.fspath(path)
    try:
        bad_member = _failed_zip_member(path)  # see read_model_file
        if bad_member is None:
            blob = load_weights_only(path)
    except Exception as exc:
        # Every error, a missing file included, is a CheckpointError here (read_model_file lets
        # missing files through); its reason is one line, as read_model_file's is.
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint "
                              f"({first_line(exc)})") from exc
    if bad_member is not None:
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint: its member "
                              f"{bad_member!r} fails its CRC-32 check (corrupt file)")
    return blob


def apply_reference_checkpoint(model, path: str | os.PathLike, blob) -> dict:
    """:func:`load_reference_checkpoint` of an object already read from ``path`` (by
    :func:`read_reference_checkpoint`; ``path`` names it in errors)."""
    path = os.fspath(path)
    from ace_model.training import STATE_FORMAT  # here: ace_model.training imports this module

    if isinstance(blob, dict) and blob.get("format") == STATE_FORMAT:
        step = blob.get("step")
        name = f"ace_lora-{step:08d}.pt" if isinstance(step, int) else "ace_lora-<step>.pt"
        raise CheckpointError(f"{path}: a training state (for resuming), not a released-format checkpoint; the "
                              f"weights of that step are in {name} beside it, the run's last in its ace_lora.pt")
    blob = _expect_dict(path, blob, ("weights", "metadata"))
    _expect_only(path, blob, ("weights", "metadata"), "a released checkpoint holds")
    metadata = blob["metadata"]
    check_metadata(model, metadata, path)
    layers = _lora_layers(model)
    if isinstance(blob["weights"], dict):
        held = {key for key in blob["weights"] if isinstance(key, str) and re.fullmatch(r"layer_\d+", key)}
        another_model = held == {f"layer_{i}" for i in range(len(held))}  # layer_0.. with none skipped
        # Otherwise (none held, a gap, or a stray layer key): named below, by the first key missing or extra.
        if another_model and 0 < len(held) != len(layers):
            raise CheckpointError(f"{path}: LoRA weights for {len(held)} attention layers, this model has "
                                  f"{len(layers)} (a checkpoint of another model configuration? the command line's "
                                  "--model)")
    weights = _expect_dict(f"{path}: weights", blob["weights"],
                           [f"layer_{i}" for i in range(len(layers))] + [a[0] for a in ADAPTERS] + ["logit_scale"])
    extra_layers = [k for k in weights if isinstance(k, str) and k.startswith("layer_")
                    and k not in {f"layer_{i}" for i in range(len(layers))}]
    if extra_layers:
        raise CheckpointError(f"{path}: unexpected key weights[{extra_layers[0]!r}]: this model has "
                              f"{len(layers)} attention layers (layer_0..layer_{len(layers) - 1})")
    _expect_only(f"{path}: weights", weights, [f"layer_{i}" for i in range(len(layers))] + [a[0] for a in ADAPTERS]
                 + ["logit_scale"], "this model's entries are")

    staged: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index, lora in enumerate(layers):
        layer = _expect_dict(f"{path}: weights['layer_{index}']", weights[f"layer_{index}"], PROJECTIONS)
        _expect_only(f"{path}: weights['layer_{index}']", layer, PROJECTIONS, "this model adapts")
        for p, projection in enumerate(PROJECTIONS):
            where = f"{path}: weights['layer_{index}'][{projection!r}]"
            entry = _expect_dict(where, layer[projection], LORA_KEYS)
            _expect_only(where, entry, LORA_KEYS, "a LoRA pair is")
            a = _expect_tensor(f"{where}['w_lora_A']", entry["w_lora_A"], tuple(lora.lora_a.shape[1:]),
                               lora.lora_a.dtype)
            b = _expect_tensor(f"{where}['w_lora_B']", entry["w_lora_B"], tuple(lora.lora_b.shape[1:]),
                               lora.lora_b.dtype)
            staged.append((lora.lora_a.data[p], a))
            staged.append((lora.lora_b.data[p], b))
    for key, attribute, which in ADAPTERS:
        adapter = _adapter(model, attribute, which)
        target = adapter.state_dict()
        state = _expect_dict(f"{path}: weights[{key!r}]", weights[key], ADAPTER_KEYS)
        _expect_only(f"{path}: weights[{key!r}]", state, ADAPTER_KEYS, "an adapter is")
        for name in ADAPTER_KEYS:
            value = _expect_tensor(f"{path}: weights[{key!r}][{name!r}]", state[name], tuple(target[name].shape),
                                   target[name].dtype)
            staged.append((target[name], value))
    scale = weights["logit_scale"]
    into = model.logit_scale.dtype
    _expect_tensor(f"{path}: weights['logit_scale']", scale, (), into)
    # Judged as the parameter will hold it, as its finiteness is: a float64 1e-50 is 0.0 in float32.
    held = float(scale.to(into))
    if not held > 0:
        beyond = "" if held == float(scale) else f" ({held!r} in {str(into).replace('torch.', '')})"
        raise CheckpointError(f"{path}: weights['logit_scale'] is {float(scale)!r}{beyond}; expected a positive "
                              "multiplier (the multiplier itself is stored, e.g. 78.35 in the released file)")
    staged.append((model.logit_scale.data, scale))

    with torch.no_grad():
        for destination, source in staged:
            destination.copy_(source)
    missing = [key for key in RECORDED if key not in metadata]
    if missing:
        # Loaded, but what check_metadata would have refused (another k, another rank) could not be seen.
        warnings.warn(f"{path}: its metadata records no {', '.join(map(repr, missing))} (a released-format file "
                      f"always does), so they were not checked against this model's (r={model.text_lora[0].rank}, "
                      f"topk={model.topk}); a save records the model's r and topk", UserWarning, stacklevel=3)
    model.reference_metadata = dict(metadata)
    return dict(metadata)


def read_model_file(load: Callable[[], Any], error: type[Exception], subject: str, what: str,
                    check_zip: str | os.PathLike | None = None) -> Any:
    """``load()`` (a torch or safetensors load of one file); a file that cannot be read raises
    ``error("<subject>: cannot be read as <what> (corrupt or truncated file?): <reason>")``.

    ``check_zip``: the file's path, when it is a torch file (a zip) to check first. ``torch.load``
    does not check the CRC-32 each member carries, so a flipped bit inside a tensor would load as
    another number; a member that fails its check raises ``error`` naming it. The check costs one
    more read of the file (a training state, a released-format checkpoint, a pretrained tower's
    weights; the last, hundreds of MB, was not timed here).

    A missing file, a permission or directory error and a memory error are not about the
    file's content: they pass through as they are.
    """
    if check_zip is not None:
        bad = _failed_zip_member(check_zip)
        if bad is not None:
            raise error(f"{subject}: cannot be read as {what}: its member {bad!r} fails its CRC-32 check "
                        "(corrupt file)")
    try:
        return load()
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise
    except Exception as exc:
        raise error(f"{subject}: cannot be read as {what} (corrupt or truncated file?): {first_line(exc)}") from exc


def _failed_zip_member(path: str | os.PathLike) -> str | None:
    """The first member of the zip at ``path`` whose CRC-32 does not match, or None (also when
    the file is no zip or cannot be read as one: ``torch.load`` then says what it is).

    A member recorded with CRC 0 is not checked: torch writes 0 for every member when saving
    with ``torch.utils.serialization.config.save.compute_crc32 = False``, and loads such files.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                try:
                    with archive.open(info) as member:  # checks the CRC-32 when the member's end is read
                        while member.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    return info.filename
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception:
        return None
    return None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``TypeName: first sentence of the message`` (torch's load errors run to paragraphs)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    sentence_end = text.find(". ")
    if sentence_end > 0:
        text = text[: sentence_end + 1]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
