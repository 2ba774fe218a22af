"""Drop-in acceleration of an existing model: ``ace_kernels.patch(model)``.

``patch`` walks a model, recognises modules whose computation one of the fused
ops performs, and swaps their implementation **in place**: the module objects,
their parameters (the same ``Parameter`` objects), buffers, ``state_dict()``
and so optimizer state and checkpoints are untouched. ``handle.undo()``
restores the original methods, so the modules are again the original objects
running their original ``forward``.

One mechanism
-------------
Every swap is an instance attribute set on a module (``forward``, or a method
such as ``apply_ace_hgat``) that shadows the class method; undo deletes it (or
restores the instance attribute that was there before). What is swapped is
decided by a registry of :class:`Recogniser` s: a predicate on a module, the
modules it claims, and an installer that records what it did (or why it left a
module alone) and swaps methods through the one swap helper. Model families
differ only in their registry entry, never in the swap machinery
(:func:`register_recogniser` adds one). Built-in recognisers, in the order they
are tried:

``peft-lora-multihead-attention``  (``lora=True``)
    PEFT's LoRA on ``nn.MultiheadAttention`` (open_clip's towers with
    ``target_modules`` naming the attention): not fused, recorded as skipped
    with the reason, with its whole subtree (the LoRA layer PEFT puts on the
    ``out_proj`` never runs: the attention reads ``out_proj.weight`` itself).
``lora-out-proj-of-multihead-attention``  (``lora=True``)
    A LoRA linear (PEFT's, say, from ``target_modules=["out_proj"]``) as the
    ``out_proj`` of a plain ``nn.MultiheadAttention``: recorded as skipped with
    the reason (the attention reads ``out_proj.weight`` itself, so the layer's
    forward never runs, patched or not).
``qkv-group``  (``lora=True``)
    An attention module whose children ``query/key/value``, ``q_proj/k_proj/
    v_proj`` or ``q/k/v`` are three LoRA linears of one kind (below) with equal
    shapes: one ``lora_qkv`` call computes the three projections. See
    "q/k/v grouping" for how this stays exact. Members that differ, when the
    model is patched, in having a bias or in rank, scaling or dropout never
    group: each goes to ``lora_linear``, and its record says why.
``lora-linear``  (``lora=True``)
    One LoRA linear through ``lora_linear``, of either layout (the record's
    kind says which):

    ``peft-lora-linear``: ``peft.tuners.lora.Linear`` around a plain
    ``nn.Linear`` (a timm fused ``qkv`` with LoRA is one of these); its active
    adapter.

    ``reference-lora-linear``: the reference ACE-LoRA ``LinearLoRA`` layout,
    recognised by its attributes ``weight``, ``bias``, ``w_lora_A`` [r, in],
    ``w_lora_B`` [out, r], ``scaling``, ``r``, ``merged`` and ``dropout``
    (``nn.Dropout`` or None).
``reference-ace-loss``  (``hypergraph=True`` and/or ``loss=True``)
    The reference loss module (``img/text_edge/node_adapter``, ``logit_scale``,
    ``args.topk``, ``apply_ace_hgat``): ``apply_ace_hgat`` becomes
    ``ace_hypergraph``; its ``forward`` (signature ``(clip_model, images, texts,
    merged_df=None, indices=None)``) keeps the reference's calls into the CLIP
    model and replaces the dense hypergraph + numpy-mask loss with the CLS-only
    ``ace_hypergraph`` (where ``apply_ace_hgat`` is patched; else the module's
    own) and ``label_guided_infonce``.
``reference-clip-loss``  (``loss=True``)
    The reference's plain ``CLIPLoss`` (``logit_scale``, ``args`` and
    ``forward(image_features, text_features, merged_df=None, indices=None)``):
    ``label_guided_infonce`` with the frame's label rows.
``open_clip-ClipLoss``  (``loss=True``)
    ``open_clip.loss.ClipLoss`` (the class itself, not subclasses that change
    its forward): ``label_guided_infonce`` without labels (for 16-bit features
    the loss is cast to their dtype, as open_clip's comes; it is computed in
    fp32). Across processes
    (``world_size > 1``, ``local_loss=False``, torch.distributed initialised with
    the module's rank and world size) it computes the global batch's loss with
    ``group=WORLD`` and gives every rank open_clip's own per-rank gradients, with
    and without ``gather_with_grad``. ``local_loss=True`` (each rank's value is
    its own rows' loss) and horovod run open_clip's forward.

Exactness and per-call fallback
-------------------------------
A patched module checks, on every call, that the fused path computes what its
original forward would; otherwise it runs the original forward unchanged. PEFT:
merged adapters, ``disable_adapters``, several (or no) active adapters, LoRA
variants (DoRA and the like), ``lora_bias``, ``adapter_names=`` or any other
extra argument, forward hooks on the LoRA sub-layers, or a non-``nn.Dropout``
dropout, global module hooks, LoRA weights in a dtype ``F.linear`` refuses beside
``x`` while its input casting is off (``peft.helpers.disable_input_dtype_casting``).
Reference layout: ``merged`` (eval mode merges ``B A`` into the weight), extra arguments,
or ``w_lora_A``/``w_lora_B`` in a dtype its matmuls refuse (not ``x``'s; under autocast, float64).
Both: a weight or bias dtype ``F.linear`` refuses (not ``x``'s; under autocast, float64, which it
does not cast).
``apply_ace_hgat``: autocast on, fewer than ``topk`` tokens, adapters in another dtype than the
features (which their layers refuse), hooks or instance-replaced forwards on the adapters, global
module hooks, an adapter (or its activation) replaced after patching by one that is
not ``up(leaky_relu(down(z), 0.2))``. Every patched forward: a ``torch.func``
transform, or a forward-mode AD level (``torch.autograd.forward_ad``: the fused ops'
autograd Functions define no ``jvp``). States that hold at patch time are listed in
the summary; :meth:`PatchHandle.stats` counts fused and fallback calls by
reason.

What is never patched (recorded as skipped, with the reason): a module whose
``forward`` (or ``apply_ace_hgat``) is already replaced on the instance (a
wrapper such as accelerate's hooks, which the fused call would skip); an adapter whose
``down`` or ``up`` class overrides ``nn.Linear.forward`` (torch.ao's QAT ``Linear``, a
subclass reading a flag: the fused op reads the weights and would skip that forward); a layout
recognised by its attribute names whose computation differs, found by running
its class's method once at patch time on a small random probe, on a CPU copy
in the default dtype (float32 for a 16-bit default), autocast off, without hooks (its tensors
and hooks are untouched, the random streams restored; attributes other than
tensors and submodules are shared with the copy, so a method that appends to a
list or logs does so at patch time too): the reference ``LinearLoRA`` forward (dropout off, random
``A`` and ``B``) and each ``apply_ace_hgat`` encoder (against
``ace_hypergraph``'s torch backend); each adapter (once per adapter object,
again when its class, layers or activation object change; a flag its forward
reads is not re-read; a check made while global module hooks are registered is
not kept); the reference losses' ``forward`` (the plain loss on
random embeddings; the ACE loss with a stand-in CLIP model, in each
``apply_gnn_encoders`` mode; both without and with a frame of repeated labels,
against the fused forward); a reference loss whose ``forward`` comes from another
class than the one that defines ``apply_ace_hgat`` or one that class extends
(a subclass or mixin redefining the loss). Reference-layout modules on the meta
device are skipped (nothing to probe: patch them once they have weights), and so are those
holding DTensor shards (FSDP2's ``fully_shard``, tensor parallelism: patch before sharding).
A reference layer with parametrized tensors, or whose weight a forward
pre-hook recomputes (``weight_norm``), falls back at each call. Parametrized adapter weights
(``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``) are fused, each computed once a
call (and once a probe), as the original computes it; hooks on the adapters fall back (see above).

Results equal the original forward up to floating-point rounding (a different
summation order), except dropout masks: the fused ops draw their own masks
(see :mod:`ace_kernels.lora`), with the same distribution and the same
independence per projection, and exact ties at the k-th place of the
hypergraph's top-k (all-equal tokens, say), where either side may keep another
of the equal tokens (see :func:`ace_kernels.ace_hypergraph`: the CLS row, the
only one the loss reads, ties only when its attention scores do). Further
deliberate differences:

* Under ``torch.autocast`` the LoRA call runs with every operand cast to the
  autocast dtype (as ``F.linear`` would) and autocast off inside the op. The
  losses read the features in their own dtype, except a pair of two float32/16
  dtypes, which the originals' logit matmul casts: both in the autocast dtype.
* PEFT keeps adapters in fp32 on a bf16/fp16 base by default and adds the
  branch in fp32; the fused call casts the adapter weights to ``x``'s dtype
  (the cast is differentiable, gradients still reach the fp32 parameters) and
  accumulates in fp32 inside the op.
* The reference ``LinearLoRA`` with dropout 0 takes a merge path whose gradient
  of ``x`` drops the LoRA term (spec section 2) and which replaces its weight
  ``Parameter`` by a plain tensor after the first call; the patched forward
  computes the exact gradient and leaves the parameter registered (a weight
  already replaced, still attached to that call's graph, is used detached, as
  the reference's next call would; a weight set on the instance from other trainable
  tensors, whose graph reaches more than the layer's A and B, keeps its gradient).
* A fused op's error raised inside a patched forward carries a note naming the
  module (``exc.add_note``).

q/k/v grouping
--------------
Inside the attention module's forward (tracked by forward hooks on it, per
thread), the first of q, k, v called with an input tensor computes all three with
one ``lora_qkv`` call and keeps the other two outputs, keyed on the *identity* of
the input tensor object, its version counter (an in-place change in between
invalidates them), whether it requires grad, grad mode and autocast state. When
the other two members are then called with that same tensor, they return the kept
outputs; the autograd graph is the one of the ``lora_qkv`` call, so gradients
are exact. Anything else (a different input, as in cross-attention; a member whose state forbids
the fused path; hooks on another member; full backward hooks on the member
called, module or global ones, which wrap its input in a new tensor;
mismatched scaling or dropout; an inference-mode input, which has no version counter; a member called inside a
``torch.utils.checkpoint`` of its own, under another grad mode or saved-tensor hooks than its attention's forward
(its recomputation reruns that member alone); a member called outside its
attention's forward, where the mode or a weight written through ``.data`` could
change between calls unseen) computes per member. A group that once sees its
members called with different inputs stops grouping. Kept outputs are dropped
when the attention module's forward returns (a forward hook registered with
``always_call=True``) or at the next member call. Threads running the same
patched model each keep their own. Module hooks on the members still run
(their ``__call__`` is untouched). Grouped outputs are column slices of one
``[..., 3*out]`` tensor (``view``/``reshape`` into heads works; they are not
contiguous), as documented for :func:`ace_kernels.lora_qkv`; autograd refuses
in-place changes of such views when they require grad (an error, never a wrong
result: an attention that changes q, k or v in place needs
``patch(..., group_qkv=False)``).

Limits
------
Patched modules hold the replacement as an instance attribute. ``copy.deepcopy``
and pickling (``torch.save`` of the whole module, then ``torch.load`` with
``weights_only=False``) give a patched copy that computes with its own weights,
with a handle of its own (empty: no swaps to undo; fresh counters), which
nothing returns: ``undo()`` on the original leaves it patched, so copy or save
after ``undo()`` to get a plain model (or save the ``state_dict()``, whose keys
patching leaves unchanged). Copying a part of a patched model copies that part
only. ``nn.DataParallel`` replicas copy instance attributes and would call the
original module's replacement: use DDP (or patch after replicating). Under
``torch.compile`` a patched module compiles as the original does
(``fullgraph=True`` included): the members of a q/k/v group then run one by one
through ``lora_linear`` (keeping outputs across module calls needs host-side
guards that would break the graph), so their dropout masks are drawn per member,
and ``stats()`` counts only the calls made while tracing. Tested with
``aot_eager`` on PEFT BERT (grouped) and timm ViT (fused qkv).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import inspect
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize

from ace_kernels import _library
from ace_kernels._checks import check_bool, is_finite
from ace_kernels.lora import _AUTOCAST_CASTS

__all__ = [
    "patch",
    "PatchHandle",
    "PatchRecord",
    "Recogniser",
    "register_recogniser",
    "unregister_recogniser",
    "recognisers",
    "benchmark_patch_speedup",
]

_FUSED_OPS = ("lora_linear", "lora_qkv", "ace_hypergraph", "label_guided_infonce")
# The patch flags (a recogniser's family) and the fused ops each one routes to.
_FAMILIES = {"lora": ("lora_linear", "lora_qkv"), "hypergraph": ("ace_hypergraph",),
             "loss": ("label_guided_infonce",)}

# Marks every replacement callable so a second patch() leaves patched modules alone.
_MARK = "__ace_kernels_patch__"


# ----------------------------------------------------------------------------------------
# Records, stats and the handle
# ----------------------------------------------------------------------------------------


@dataclass
class PatchRecord:
    """What ``patch`` did to one module (or one q/k/v group).

    Attributes
    ----------
    name : str
        Qualified module name inside the patched model (``""`` for the root);
        for a q/k/v group ``"<attention>.{query,key,value}"``.
    kind : str
        The recogniser that matched.
    status : str
        ``"patched"``, ``"fallback"`` (patched, but the module's current state
        makes it run its original forward; it switches to the fused path by
        itself once the state changes) or ``"skipped"`` (left untouched).
    reason : str
        Why it was skipped / falls back, or what it routes to.
    """

    name: str
    kind: str
    status: str
    reason: str = ""


class _Swap:
    """One instance attribute shadowing a class method, and how to take it back."""

    __slots__ = ("module", "attr", "previous", "had_previous", "replacement")

    def __init__(self, module: nn.Module, attr: str, replacement: Callable):
        self.module = module
        self.attr = attr
        self.had_previous = attr in module.__dict__
        self.previous = module.__dict__.get(attr)
        self.replacement = replacement

    def apply(self) -> None:
        # object.__setattr__: a callable is never a Parameter/Module/buffer, and this keeps
        # nn.Module.__setattr__ bookkeeping out of the way.
        object.__setattr__(self.module, self.attr, self.replacement)

    def original(self) -> Callable:
        """The method the replacement shadows (the previous instance attribute, else the class's)."""
        if self.had_previous:
            return self.previous
        return getattr(type(self.module), self.attr).__get__(self.module, type(self.module))

    def revert(self) -> bool:
        current = self.module.__dict__.get(self.attr)
        if current is not self.replacement:
            return False
        if self.had_previous:
            object.__setattr__(self.module, self.attr, self.previous)
        else:
            delattr(self.module, self.attr)
        return True


class PatchHandle:
    """Returned by :func:`patch`: the summary, run-time counters and ``undo()``.

    Usable as a context manager: ``with ace_kernels.patch(model): ...`` undoes
    on exit.
    """

    def __init__(self, backend):
        self.backend = backend
        self.records: list[PatchRecord] = []
        self._swaps: list[_Swap] = []
        self._hooks: list = []
        self._undone = False
        self._undo_lock = threading.Lock()  # two threads undoing at once: one reverts, the other waits
        self._counts: collections.Counter = collections.Counter()

    def backend_for(self, op: str) -> str:
        """The backend passed to ``op`` (``patch``'s ``backend``, per op when a dict)."""
        if isinstance(self.backend, dict):
            return self.backend.get(op, "auto")
        return self.backend

    # -- bookkeeping used by the recognisers --
    def _count(self, key: str) -> None:
        self._counts[key] += 1

    def _swap(self, module: nn.Module, attr: str, replacement: Callable, name: str = "") -> None:
        """Install ``replacement`` as ``module.<attr>``; ``name`` (the module's qualified name)
        is added to any error raised from it."""
        if isinstance(replacement, _Replacement):
            replacement.label = f"{name}.{attr}" if name else attr
        swap = _Swap(module, attr, replacement)
        swap.apply()
        self._swaps.append(swap)

    def __deepcopy__(self, memo):
        # The handle of a deep-copied patched model (or part of one): nothing returns it and the
        # copy stays patched, so it holds no swaps or hooks (copying them would copy every module
        # the original patched, whatever part of the model was copied); fresh counters.
        new = _copied_handle(copy.deepcopy(self.backend, memo), self.records, self._undone)
        memo[id(self)] = new
        return new

    def __reduce__(self):
        # Pickled (torch.save of a patched model) as deep-copied: its lock, hook handles and swaps stay here.
        return _copied_handle, (self.backend, self.records, self._undone)

    # -- public --
    @property
    def patched(self) -> list[PatchRecord]:
        """Records with status ``patched`` or ``fallback`` (the modules that were swapped)."""
        return [r for r in self.records if r.status in ("patched", "fallback")]

    @property
    def skipped(self) -> list[PatchRecord]:
        """Records with status ``skipped`` (left untouched), each with its reason."""
        return [r for r in self.records if r.status == "skipped"]

    @property
    def active(self) -> bool:
        """True until :meth:`undo` has run."""
        return not self._undone

    def stats(self) -> dict[str, int]:
        """Run-time call counters since patching, e.g. ``{"lora_qkv": 24,
        "qkv cached": 48, "fallback peft-lora-linear: adapter merged into the base weight": 3}``."""
        return dict(self._counts)

    def reset_stats(self) -> None:
        self._counts.clear()

    def undo(self) -> None:
        """Restore every swapped method and remove the hooks ``patch`` added.

        Idempotent. If something else replaced a patched method after ``patch``
        (another wrapper), that module is left as it is and a ``RuntimeWarning``
        names it.
        """
        with self._undo_lock:
            if self._undone:
                return
            conflicts = []
            for swap in reversed(self._swaps):
                if not swap.revert():
                    conflicts.append(f"{type(swap.module).__name__}.{swap.attr}")
                if isinstance(swap.replacement, _Replacement):
                    # From now on it runs the original method: a wrapper installed after patching
                    # still calls it (a conflict), and so does a call that looked it up before this
                    # undo (nn.Module.__call__ runs the forward pre-hooks in between: one of them
                    # undoing, or another thread's undo meanwhile).
                    swap.replacement.bypass = swap.original()
            for hook in self._hooks:
                hook.remove()
            self._swaps.clear()
            self._hooks.clear()
            self._undone = True
        if conflicts:
            warnings.warn(
                "ace_kernels.patch undo: these methods were replaced again after patching and were left "
                "as they are: " + ", ".join(conflicts), RuntimeWarning, stacklevel=2)

    def summary(self) -> str:
        """A readable report: counts, then every patched group/module, then fallbacks and skips."""
        patched = [r for r in self.records if r.status == "patched"]
        fallback = [r for r in self.records if r.status == "fallback"]
        skipped = self.skipped
        state = "undone" if self._undone else "active"
        lines = [f"ace_kernels.patch ({state}, backend={self.backend!r}): {len(patched)} patched, "
                 f"{len(fallback)} patched but currently falling back, {len(skipped)} skipped"]
        for title, group in (("patched", patched), ("falling back to the original forward", fallback),
                             ("skipped", skipped)):
            if not group:
                continue
            lines.append(f"{title}:")
            for r in group:
                lines.append(f"  {r.name or '<root>'}  [{r.kind}]  {r.reason}")
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self) -> str:
        return (f"<PatchHandle {'undone' if self._undone else 'active'}: {len(self.patched)} patched, "
                f"{len(self.skipped)} skipped>")

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def _copied_handle(backend, records, undone) -> PatchHandle:
    """The handle of a copy of a patched model: its records and state, no swaps or hooks."""
    new = PatchHandle(backend)
    new.records = list(records)
    new._undone = undone
    return new


def _class_method(module: nn.Module, name: str) -> Callable:
    """``module``'s class method ``name`` bound to it, whatever its instance attributes hold."""
    return inspect.getattr_static(type(module), name).__get__(module, type(module))


class _ClassMethod:
    """How an original method (a method of a module's class bound to the module) is pickled.

    Pickle's own form of a bound method looks its name up on the instance when it loads; once the
    module's attributes are back, that finds the replacement shadowing it, which would then call
    itself. This looks it up on the class."""

    __slots__ = ("module", "name")

    def __init__(self, module: nn.Module, name: str):
        self.module = module
        self.name = name

    def __reduce__(self):
        return _class_method, (self.module, self.name)


def _picklable(value):
    """``value``, or its :class:`_ClassMethod` when it is a method of a module's class bound to the module."""
    func = getattr(value, "__func__", None)
    module = getattr(value, "__self__", None)
    if func is None or not isinstance(module, nn.Module):
        return value
    cls = type(module)
    for name in dict.fromkeys([func.__name__] + [n for klass in cls.__mro__ for n in vars(klass)]):
        if inspect.getattr_static(cls, name, None) is func:
            return _ClassMethod(module, name)
    return value


class _Replacement:
    """A replacement method bound to its module (a callable stored as an instance attribute)."""

    def __init__(self, fn: Callable, module: nn.Module, *state):
        self.fn = fn
        self.module = module
        self.state = state
        self.label = ""  # "<qualified module name>.<method>", set by PatchHandle._swap
        self.bypass: Callable | None = None  # set by undo() when something wrapped this replacement

    def __call__(self, *args, **kwargs):
        if self.bypass is not None:
            return self.bypass(*args, **kwargs)
        try:
            return self.fn(self.module, *self.state, *args, **kwargs)
        except Exception as exc:
            # Name the module: a fused op's error (a backend that cannot run the call, say) would
            # otherwise not say which of the model's layers made it.
            if self.label and hasattr(exc, "add_note") and not getattr(exc, "_ace_kernels_noted", False):
                exc.add_note(f"(raised in {type(self.module).__name__} {self.label!r}, patched by ace_kernels.patch; "
                             "handle.summary() lists what was patched)")
                exc._ace_kernels_noted = True
            raise

    def __getstate__(self):
        # Pickled (torch.save of a patched model), the original methods come back as the class's.
        state = dict(vars(self))
        state["state"] = tuple(_picklable(value) for value in self.state)
        state["bypass"] = _picklable(self.bypass)
        return state

    def __copy__(self):
        # Shares everything (copy.copy would otherwise take __getstate__'s pickling form).
        new = _Replacement.__new__(_Replacement)
        vars(new).update(vars(self))
        return new

    def __deepcopy__(self, memo):
        new = _Replacement.__new__(_Replacement)
        memo[id(self)] = new
        new.fn = self.fn
        new.label = self.label
        new.bypass = copy.deepcopy(self.bypass, memo)
        new.module = copy.deepcopy(self.module, memo)
        new.state = copy.deepcopy(self.state, memo)
        return new


setattr(_Replacement, _MARK, True)


def _is_patched(module: nn.Module, attr: str = "forward") -> bool:
    return getattr(module.__dict__.get(attr), _MARK, False)


def _original(module: nn.Module, attr: str = "forward") -> Callable:
    """The method as resolved before patching (an instance attribute wins over the class)."""
    return getattr(module, attr)


# ----------------------------------------------------------------------------------------
# Shared per-call helpers
# ----------------------------------------------------------------------------------------


def _has_call_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(module, "_backward_hooks", None) or getattr(module, "_backward_pre_hooks", None))


def _wraps_inputs(module: nn.Module) -> bool:
    """Whether the module's call hands its forward other input tensors than its caller's: full backward
    (pre-)hooks, the module's own or global ones, wrap them in a ``BackwardHookFunction`` on every call."""
    from torch.nn.modules import module as module_mod

    full_backward = module._backward_hooks and getattr(module, "_is_full_backward_hook", None) is True
    global_full_backward = (module_mod._global_backward_hooks
                            and getattr(module_mod, "_global_is_full_backward_hook", None) is True)
    return bool(getattr(module, "_backward_pre_hooks", None) or full_backward
                or getattr(module_mod, "_global_backward_pre_hooks", None) or global_full_backward)


def _forward_replaced(module: nn.Module) -> bool:
    """A ``forward`` set on the instance (how accelerate-style wrappers hook a layer): calling
    the layer may then do more than its class's forward, which the fused call skips. (The patch
    itself sets instance forwards only on the LoRA layers it replaces, never on their parts.)"""
    return "forward" in module.__dict__


def _wrapped_reason(module: nn.Module, attr: str = "forward") -> str | None:
    """Why a module whose ``attr`` is already set on the instance, by something other than a
    patch, is left alone: that wrapper (accelerate's hooks, a user's) would be skipped by the
    fused call, whose original is then the wrapper itself."""
    if attr in module.__dict__ and not _is_patched(module, attr):
        return f"{attr} replaced on the instance (a wrapper, e.g. accelerate's hooks): left as it runs"
    return None


def _defining_class(cls: type, attr: str) -> type | None:
    return next((klass for klass in cls.__mro__ if attr in vars(klass)), None)


def _functorch_transform_active() -> bool:
    """True inside a ``torch.func`` transform (grad, vmap, ...): the fused ops' autograd Functions
    define no ``setup_context``, which ``Function.apply`` then requires."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return active is not None and active()


def _transform_reason() -> str | None:
    """Why the fused ops cannot run under the autograd machinery now in force, or None: a ``torch.func``
    transform, or a forward-mode AD level (``torch.autograd.forward_ad.dual_level``; the ops' autograd
    Functions define no ``jvp``, and the original forward propagates the tangents of dual tensors)."""
    if _functorch_transform_active():
        return "a torch.func transform is active"
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return "forward-mode AD is active (torch.autograd.forward_ad.dual_level)"
    return None


def _global_hooks_set() -> bool:
    from torch.nn.modules import module as module_mod

    return bool(module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks
                or module_mod._global_backward_hooks or getattr(module_mod, "_global_backward_pre_hooks", None))


def _context_key(x: torch.Tensor):
    # x.requires_grad too: requires_grad_() bumps no version, and outputs kept from a call on an x that needed no
    # gradient have no graph to it.
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), _library.autocast_dtype(x), x.requires_grad)


@dataclass
class _LoraOperands:
    """Everything one fused LoRA call needs, already in the compute dtype."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    dropout_p: float
    training: bool
    compute_dtype: torch.dtype
    autocast: bool


def _operands(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training, *, lora_matmul=False):
    """Cast the operands to the dtype the original forward computes in, or give a reason.

    ``lora_matmul``: the original multiplies ``x`` by ``lora_a`` and ``lora_b`` as they are (the
    reference layout; PEFT with its input casting off), so their dtypes must be the ones its products
    accept (PEFT otherwise casts ``x`` to theirs)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return "input is not a floating-point tensor"
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return "input shape does not match the weight"
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        return f"scaling is a {type(scaling).__name__}, not a number"
    if not is_finite(scaling):  # the ops refuse it; the original forward computes with it
        return f"scaling is {scaling!r}, not finite"
    transform = _transform_reason()
    if transform:
        return transform
    devices = {t.device for t in (x, weight, bias, lora_a, lora_b) if t is not None}
    if len(devices) != 1:
        return f"tensors on several devices {sorted(str(d) for d in devices)}"
    cast = _library.autocast_dtype(x)
    if cast is None:
        # F.linear would raise; let the original forward raise its own error.
        if weight.dtype != x.dtype:
            return f"input dtype {x.dtype} differs from the weight's {weight.dtype}"
        if bias is not None and bias.dtype != x.dtype:
            return f"input dtype {x.dtype} differs from the bias's {bias.dtype}"
        if lora_matmul and (lora_a.dtype != x.dtype or lora_b.dtype != x.dtype):
            return f"input dtype {x.dtype} differs from the LoRA weights' {lora_a.dtype}/{lora_b.dtype}"
        compute = x.dtype
    elif x.dtype == torch.float64:
        return "float64 input under autocast"
    else:
        # Autocast casts float32/16 operands only: F.linear (and a matmul) refuses a float64 one beside them.
        for what, tensors in (("weight", (weight,)), ("bias", (bias,)),
                              ("LoRA weight", (lora_a, lora_b) if lora_matmul else ())):
            odd = next((t.dtype for t in tensors if t is not None and t.dtype not in _AUTOCAST_CASTS), None)
            if odd is not None:
                return f"{odd} {what} under autocast"
        compute = cast
    if compute not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"compute dtype {compute} not supported"

    def to(t):
        return t if t is None or t.dtype == compute else t.to(compute)

    return _LoraOperands(to(weight), to(bias), to(lora_a), to(lora_b), float(scaling), float(dropout_p),
                         bool(training), compute, cast is not None)


def _run_lora_linear(handle, x, ops: _LoraOperands):
    from ace_kernels.lora import lora_linear

    # lora_linear turns autocast off around its own work; the operands are already in the compute dtype.
    x_in = x if x.dtype == ops.compute_dtype else x.to(ops.compute_dtype)
    return lora_linear(x_in, ops.weight, ops.bias, ops.lora_a, ops.lora_b, scaling=ops.scaling,
                       dropout_p=ops.dropout_p, training=ops.training, backend=handle.backend_for("lora_linear"))


# ----------------------------------------------------------------------------------------
# LoRA linear kinds: how to read a module's operands, per call
# ----------------------------------------------------------------------------------------


class _LoraKind:
    """How one LoRA-linear layout is recognised and read."""

    name: str = ""

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def static_reason(self, module: nn.Module) -> str | None:
        """Why this module can never take the fused path (None: it can)."""
        return None

    def state_reason(self, module: nn.Module) -> str | None:
        """Why the module's *current* state makes it fall back (None: fused)."""
        raise NotImplementedError

    def operands(self, module: nn.Module, x, args, kwargs):
        """``_LoraOperands`` for this call, or a reason string to fall back."""
        raise NotImplementedError

    def features(self, module: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def group_signature(self, module: nn.Module) -> tuple | None:
        """What the members of a q/k/v group must share, read at patch time: (no bias, rank,
        scaling, dropout p); None when the current state decides nothing (e.g. no active adapter)."""
        return None


def _peft_lora_layer_class(name: str):
    """PEFT's LoRA layer class ``name`` (``Linear``, ``MultiheadAttention``), or None. Only
    looks at PEFT when the model already imported it: patching a model without PEFT layers
    never imports peft."""
    layer_mod = sys.modules.get("peft.tuners.lora.layer")
    return getattr(layer_mod, name, None) if layer_mod is not None else None


class _PeftLoraKind(_LoraKind):
    name = "peft-lora-linear"

    def matches(self, module):
        cls = _peft_lora_layer_class("Linear")
        return cls is not None and isinstance(module, cls)

    def static_reason(self, module):
        cls = _peft_lora_layer_class("Linear")
        if type(module) is not cls:
            return f"subclass {type(module).__name__} of peft's lora.Linear"
        base = module.get_base_layer()
        if type(base).forward is not nn.Linear.forward or not isinstance(base, nn.Linear):
            # The module too: torch.ao's QAT layer is also called Linear.
            return f"base layer is {type(base).__name__} ({type(base).__module__}), not a plain nn.Linear"
        if getattr(module, "fan_in_fan_out", False):
            return "fan_in_fan_out=True"
        return None

    def features(self, module):
        base = module.get_base_layer()
        return base.in_features, base.out_features

    def _adapter(self, module):
        """(adapter name, None) or (None, reason)."""
        if module.disable_adapters:
            return None, "adapters disabled"
        if module.merged:
            return None, "adapter merged into the base weight"
        active = [a for a in module.active_adapters if a in module.lora_A]
        if len(active) != 1:
            return None, f"{len(active)} active adapters (the fused path takes exactly one)"
        adapter = active[0]
        if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter, False):
            return None, "a LoRA variant (DoRA or similar) is active"
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
            return None, f"lora_A/lora_B are {type(lora_a).__name__}/{type(lora_b).__name__}, not nn.Linear"
        if lora_a.bias is not None or lora_b.bias is not None:
            return None, "lora_bias=True"
        dropout = module.lora_dropout[adapter]
        if type(dropout) not in (nn.Dropout, nn.Identity):
            return None, f"dropout is {type(dropout).__name__}"
        if not isinstance(module.scaling.get(adapter), (int, float)):
            return None, "scaling is not a number"
        return adapter, None

    def _state(self, module):
        """(adapter name, None), or (None, why its calls run the original): :meth:`_adapter`, then what its
        sub-layers' calls would do that the fused call skips."""
        adapter, reason = self._adapter(module)
        if reason:
            return None, reason
        base = module.get_base_layer()
        parts = (base, module.lora_A[adapter], module.lora_B[adapter], module.lora_dropout[adapter])
        if any(_has_call_hooks(m) for m in parts):
            return None, "hooks on the base or LoRA sub-layers"
        if any(_forward_replaced(m) for m in parts):
            return None, "forward replaced on the base or LoRA sub-layers"
        if _global_hooks_set():
            # Global module hooks would fire for lora_A/lora_B/base_layer, which the fused call skips.
            return None, "global module hooks registered"
        if getattr(base, "parametrizations", None) is not None:
            return None, "parametrized base weight"
        return adapter, None

    def state_reason(self, module):
        return self._state(module)[1]

    def group_signature(self, module):
        adapter, reason = self._adapter(module)
        if reason:
            return None
        dropout = module.lora_dropout[adapter]
        return (module.get_base_layer().bias is None, module.lora_A[adapter].weight.shape[0],
                module.scaling[adapter], dropout.p if isinstance(dropout, nn.Dropout) else 0.0)

    def operands(self, module, x, args, kwargs):
        if args or kwargs:
            return "extra forward arguments (" + ", ".join(list(kwargs) or ["positional"]) + ")"
        adapter, reason = self._state(module)
        if reason:
            return reason
        base = module.get_base_layer()
        lora_a, lora_b, dropout = module.lora_A[adapter], module.lora_B[adapter], module.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout):
            p, training = dropout.p, dropout.training
        else:
            # No dropout: p = 0, and the layer's own mode (in training the ops never merge B A into
            # the weight, so a pass without a graph computes what a pass with one does).
            p, training = 0.0, module.training
        if p >= 1.0:
            return "dropout p = 1"
        # With its input casting off (peft.helpers.disable_input_dtype_casting), x meets lora_A as it is.
        return _operands(x, base.weight, base.bias, lora_a.weight, lora_b.weight, module.scaling[adapter], p,
                         training, lora_matmul=not getattr(module, "cast_input_dtype_enabled", True))


class _ReferenceLoraKind(_LoraKind):
    name = "reference-lora-linear"
    # The LoRA attributes first: every other layer is told apart without reading its weight, which a
    # parametrization computes at each read (spectral_norm's power iteration updates its u and v).
    _ATTRS = ("w_lora_A", "w_lora_B", "scaling", "r", "merged", "dropout", "weight", "bias")

    def matches(self, module):
        if not all(hasattr(module, a) for a in self._ATTRS):
            return False
        a, b = getattr(module, "w_lora_A"), getattr(module, "w_lora_B")
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2

    def static_reason(self, module):
        if getattr(module, "fan_in_fan_out", False):
            return "fan_in_fan_out=True"
        if not (isinstance(module.r, int) and module.r > 0):
            return f"r={module.r!r} (no LoRA branch)"
        weight = module.weight
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return "weight is not a 2-D tensor"
        if module.w_lora_A.shape != (module.r, weight.shape[1]) or module.w_lora_B.shape != (weight.shape[0], module.r):
            return (f"w_lora_A {list(module.w_lora_A.shape)} / w_lora_B {list(module.w_lora_B.shape)} do not match "
                    f"weight {list(weight.shape)} and r={module.r}")
        if module.dropout is not None and type(module.dropout) is not nn.Dropout:
            return f"dropout is {type(module.dropout).__name__}"
        return _reference_lora_probe_reason(module)

    def features(self, module):
        return module.weight.shape[1], module.weight.shape[0]

    def state_reason(self, module):
        if module.merged:
            return "merged (eval mode folds B A into the weight)"
        dropout = module.dropout
        if dropout is not None and (_has_call_hooks(dropout) or _global_hooks_set() or _forward_replaced(dropout)):
            return "hooks (or a replaced forward) that the dropout sub-layer's call would run"
        if getattr(module, "parametrizations", None) is not None:
            return "parametrized tensors"
        if "weight" in vars(module) and module.weight.grad_fn is not None and module._forward_pre_hooks:
            # weight_norm and spectral_norm recompute ``weight`` in a pre-hook, attached to their parameters:
            # not the reference's leftover, and not known to be frozen.
            return "weight recomputed by a forward pre-hook (weight_norm, spectral_norm?)"
        return None

    def group_signature(self, module):
        return (module.bias is None, module.r, module.scaling,
                module.dropout.p if isinstance(module.dropout, nn.Dropout) else 0.0)

    def operands(self, module, x, args, kwargs):
        if args or kwargs:
            return "extra forward arguments"
        reason = self.state_reason(module)
        if reason:
            return reason
        dropout = module.dropout
        if dropout is not None and module.training and dropout.p > 0:
            # The reference applies its nn.Dropout only when the layer trains and p > 0.
            p, training = dropout.p, bool(dropout.training)
        else:
            p, training = 0.0, bool(module.training)
        if p >= 1.0:
            return "dropout p = 1"
        weight = module.weight
        if "weight" in vars(module) and weight.grad_fn is not None:  # no pre-hook recomputes it (state_reason)
            # The reference's dropout-free forward swaps ``weight`` for ``W.detach() + s B A`` and
            # takes s B A back out of its .data afterwards: what remains is W, an instance
            # attribute still attached to that call's graph. The reference never differentiates
            # through it (its next call detaches it again); neither may we. Any other weight (a
            # tensor torch.func.functional_call put in _parameters, one computed from another
            # layer's trainable weight) keeps its gradient.
            if _left_by_merge_path(module, weight):
                weight = weight.detach()
        return _operands(x, weight, module.bias, module.w_lora_A, module.w_lora_B, module.scaling, p, training,
                         lora_matmul=True)


def _left_by_merge_path(module: nn.Module, weight: torch.Tensor) -> bool:
    """Whether ``weight``, an instance attribute attached to a graph, is what the reference's merge path
    leaves (``W.detach() + s B A``): a graph whose only leaves are the layer's own ``w_lora_A`` and
    ``w_lora_B``. A weight computed from other trainable tensors (tied to another layer's, say) is not."""
    own = {id(module.w_lora_A), id(module.w_lora_B)}
    seen: dict[int, Any] = {}  # holds the nodes visited, so that no id is reused while walking
    stack = [weight.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        if len(seen) > 256:
            return False  # far larger than W.detach() + s B A makes
        seen[id(node)] = node
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf that requires grad
            if id(node.variable) not in own:
                return False
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return True


_MODULE_CONTAINERS = ("_parameters", "_buffers", "_modules")


class _OnMeta(Exception):
    """A tensor of a module to probe is on the meta device: there is nothing to compute with."""


def _probe(check: Callable) -> Callable:
    """Decorator for a probe, which runs a module's own method on CPU copies: with the CPU's autocast
    off, as the fused ops compute (inside a caller's autocast region the original's products would drop
    to 16 bits, differ, and the module be skipped as computing something else)."""

    @functools.wraps(check)
    def run(*args):
        with _library.autocast_off("cpu"):
            return check(*args)

    return run


def _probe_dtype() -> torch.dtype:
    """The probes' dtype: torch's default (the dtype a module's untyped ``torch.zeros`` gives),
    but float32 for a 16-bit default, whose copies, inputs and arithmetic would differ from the
    fused ops' float32 accumulation (and make ties) in modules that compute what they do."""
    return torch.promote_types(torch.get_default_dtype(), torch.float32)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """A ``torch.distributed.tensor.DTensor`` (only a model that imported it can hold one)."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


def _probe_copy(module: nn.Module, children: Sequence[str] | None = None) -> nn.Module:
    """A CPU copy of ``module`` in :func:`_probe_dtype` (float32 unless the default dtype is
    float64; float32 also keeps random probe inputs free of the ties that 16 bits would make) for a
    probe. Only ``children`` (names; all when None) are copied, the other submodules shared.
    Parameters, buffers and tensor attributes are converted first (no full-size copy on the device;
    a weight the reference's merge path left attached to a graph copies detached); hook dictionaries
    start empty (a probe is not a call of the user's model, and a hook's owner is never copied), and a
    ``forward`` set on a copied module's instance is left out (the class's runs); every other attribute
    (args, locks, files) is shared, not copied. Raises :class:`_OnMeta` for a tensor on the meta device.
    The probes' inputs are made on the CPU too (``device="cpu"``: not on a default device set with
    ``torch.set_default_device``)."""
    dtype = _probe_dtype()
    memo: dict = {}
    if children is not None:
        for name, child in module._modules.items():
            if name not in children and child is not None:
                memo[id(child)] = child
    copied = [module] + [m for name, child in module._modules.items()
                         if child is not None and (children is None or name in children) for m in child.modules()]
    for sub in copied:
        for key, value in vars(sub).items():
            if key in _MODULE_CONTAINERS or id(value) in memo:
                continue
            if "hooks" in key and isinstance(value, dict):
                memo[id(value)] = type(value)()
            elif not isinstance(value, (torch.Tensor, nn.Module)):
                memo[id(value)] = value
        for tensor in [*sub._parameters.values(), *sub._buffers.values(),
                       *(v for v in vars(sub).values() if isinstance(v, torch.Tensor))]:
            if tensor is None or id(tensor) in memo:
                continue
            if tensor.is_meta:
                raise _OnMeta
            if _is_dtensor(tensor):
                # A shard: its values are not the layer's (gathering them is a collective, which a probe on
                # one rank cannot start), and a DTensor copy refuses the probe's plain tensors.
                raise ValueError(f"{tensor.__class__.__name__} {type(sub).__name__} tensors (sharded by fully_shard "
                                 "or tensor parallelism): patch the model before sharding it")
            data = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).clone()
            memo[id(tensor)] = (nn.Parameter(data, requires_grad=tensor.requires_grad)
                                if isinstance(tensor, nn.Parameter) else data)
    probe = copy.deepcopy(module, memo)
    for sub in copied:
        # A forward set on the instance (a wrapper's, a lambda over the module's own layers) is shared with the
        # copy and would run on the module, in its dtype and with its hooks: left out, as the hooks are.
        clone = memo.get(id(sub))
        if clone is not None and clone is not sub:
            clone.__dict__.pop("forward", None)
    return probe


@_probe
def _reference_lora_probe_reason(module) -> str | None:
    """Why the layer's forward is not known to compute ``x W^T + b + s (x A^T) B^T`` (None: it is).

    The layout is recognised by attribute names, which a subclass can keep while changing the
    computation: its class's forward runs once, on a CPU copy (:func:`_probe_copy`; the layer is
    untouched, its hooks do not run) with dropout off, unmerged, and random A and B (B starts at
    zeros, which would hide the branch). A layer on the meta device cannot be checked: skipped."""
    try:
        probe = _probe_copy(module)
        probe.train(True)  # the reference's train() takes s B A back out of a merged weight
    except _OnMeta:
        return "on the meta device: its forward cannot be checked (patch it once it has weights)"
    except Exception as exc:
        return f"its forward could not be checked on a copy ({type(exc).__name__}: {exc})"
    if getattr(probe, "merged", False):
        return None  # cannot unmerge the copy: each call falls back while the layer is merged
    generator = torch.Generator().manual_seed(0)
    dtype = probe.weight.dtype
    with torch.no_grad():
        if isinstance(probe.dropout, nn.Dropout):
            probe.dropout.p = 0.0
        for tensor in (probe.w_lora_A, probe.w_lora_B):
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=dtype, device="cpu"))
        x = torch.randn(3, probe.weight.shape[1], generator=generator, dtype=dtype, device="cpu")
        want = F.linear(x, probe.weight, probe.bias) + probe.scaling * ((x @ probe.w_lora_A.t()) @ probe.w_lora_B.t())
        try:
            with torch.random.fork_rng(devices=[]):
                got = type(probe).forward(probe, x)
        except Exception as exc:
            return f"its forward fails on a [3, {probe.weight.shape[1]}] probe ({type(exc).__name__}: {exc})"
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    if not isinstance(got, torch.Tensor) or got.shape != want.shape \
            or not torch.allclose(got, want, rtol=tolerance, atol=tolerance):
        return "its forward does not compute x W^T + b + s (x A^T) B^T (a probe differs)"
    return None


_LORA_KINDS: list[_LoraKind] = [_PeftLoraKind(), _ReferenceLoraKind()]


def _lora_kind(module: nn.Module) -> _LoraKind | None:
    for kind in _LORA_KINDS:
        if kind.matches(module):
            return kind
    return None


# ----------------------------------------------------------------------------------------
# Replacement forwards: single LoRA linear and q/k/v group
# ----------------------------------------------------------------------------------------


def _single_lora_forward(module, handle, kind, original, *args, **kwargs):
    if not args:
        handle._count(f"fallback {kind.name}: input passed by keyword")
        return original(**kwargs)
    x, args = args[0], args[1:]
    ops = kind.operands(module, x, args, kwargs)
    if isinstance(ops, str):
        handle._count(f"fallback {kind.name}: {ops}")
        return original(x, *args, **kwargs)
    handle._count("lora_linear")
    return _run_lora_linear(handle, x, ops)


def _call_scope() -> tuple:
    """What a checkpoint around part of a forward changes: grad mode (the reentrant one runs the
    forward without a graph) and the innermost saved-tensor hooks (the non-reentrant one's)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return torch.is_grad_enabled(), hooks[0] if hooks is not None else None


class _QKVCallState(threading.local):
    """Per thread: the depth of the attention module's forward calls in progress, and the
    outputs one lora_qkv call computed for the members not called yet (kept only inside that
    forward, which drops them when it returns)."""

    def __init__(self):
        self.scopes: list[tuple] = []  # _call_scope() at each attention forward in progress, innermost last
        self.pending: dict[int, torch.Tensor] = {}
        self.pending_key = None
        self.pending_input = None

    @property
    def inside(self) -> int:
        """The depth of the attention module's forward calls in progress."""
        return len(self.scopes)


class _QKVGroup:
    """Shared state of one attention module's q/k/v members.

    Outputs are kept for the other members only while the attention module's forward runs, in
    the thread that runs it: a member called from elsewhere (a test, a probe) computes its own
    projection, since between two such calls anything may change (the mode, a weight written
    through ``.data``) without a version counter to show it.
    """

    def __init__(self, parent_name: str, members: list[nn.Module], names: tuple[str, str, str], kind: _LoraKind):
        self.parent_name = parent_name
        self.members = members
        self.names = names
        self.kind = kind
        self.grouping = True
        self.originals: list[Callable] = []
        self.calls = _QKVCallState()

    def enter(self, *unused) -> None:
        # While compiling nothing groups (see _group_member_forward), and Dynamo cannot trace the hooks' query.
        self.calls.scopes.append(None if torch.compiler.is_compiling() else _call_scope())

    def clear(self, *unused) -> None:
        calls = self.calls
        calls.pending.clear()
        calls.pending_key = None
        calls.pending_input = None

    def leave(self, *unused) -> None:
        if self.calls.scopes:
            self.calls.scopes.pop()
        self.clear()

    def __deepcopy__(self, memo):
        # A copy of a patched model gets its own group over the copied members, with no call in
        # progress and nothing kept (kept outputs are graph tensors, which cannot be deep-copied).
        new = _QKVGroup.__new__(_QKVGroup)
        memo[id(self)] = new
        new.parent_name, new.names, new.kind, new.grouping = self.parent_name, self.names, self.kind, self.grouping
        new.members = copy.deepcopy(self.members, memo)
        new.originals = copy.deepcopy(self.originals, memo)
        new.calls = _QKVCallState()
        return new

    def __getstate__(self):
        # Pickled as deep-copied: no call in progress, nothing kept; the originals as the class's.
        state = dict(vars(self))
        del state["calls"]
        state["originals"] = [_picklable(original) for original in self.originals]
        return state

    def __setstate__(self, state):
        vars(self).update(state)
        self.calls = _QKVCallState()

    def __copy__(self):
        # Shares everything, the call state included (copy.copy would otherwise take __getstate__'s form).
        new = _QKVGroup.__new__(_QKVGroup)
        vars(new).update(vars(self))
        return new


def _group_member_forward(module, handle, group: _QKVGroup, index: int, *args, **kwargs):
    original = group.originals[index]
    kind = group.kind
    if not args:
        handle._count(f"fallback {kind.name}: input passed by keyword")
        return original(**kwargs)
    x, args = args[0], args[1:]
    if torch.compiler.is_compiling():
        # Under torch.compile each member runs on its own: the kept outputs are guarded by host
        # state (version counters, inference mode) that would break the graph (fullgraph=True
        # would fail), and the compiler schedules the three projections itself.
        return _single_lora_forward(module, handle, kind, original, x, *args, **kwargs)
    calls = group.calls
    if calls.pending:
        hit = (calls.pending_input is x and index in calls.pending and not args and not kwargs
               and not x.is_inference() and calls.pending_key == (x._version, _context_key(x)))
        if hit:
            handle._count("qkv cached")
            out = calls.pending.pop(index)
            if not calls.pending:
                group.clear()
            return out
        if index in calls.pending and calls.pending_input is not x:
            # The members take different inputs here (cross-attention): stop grouping.
            group.grouping = False
            handle._count(f"qkv group {group.parent_name}: members called with different inputs, grouping off")
        group.clear()
    ops = kind.operands(module, x, args, kwargs)
    if isinstance(ops, str):
        handle._count(f"fallback {kind.name}: {ops}")
        return original(x, *args, **kwargs)
    if group.grouping and not calls.inside:
        handle._count("qkv ungrouped: called outside the attention's forward")
    elif group.grouping and calls.scopes and calls.scopes[-1] != _call_scope():
        # The member runs inside a region its attention's forward is not in: checkpoint() (or
        # checkpoint_wrapper) around the member alone, whose recomputation reruns this member only,
        # outside the attention's forward (it would find other tensors saved than the grouped call's).
        handle._count("qkv ungrouped: called under another grad mode or saved-tensor hooks (a checkpoint "
                      "around the member?) than its attention's forward")
    elif group.grouping and x.is_inference():
        # Inference tensors have no version counter to guard the kept outputs with.
        handle._count("qkv ungrouped: inference-mode input")
    elif group.grouping:
        all_ops = []
        for j, member in enumerate(group.members):
            all_ops.append(ops if j == index else kind.operands(member, x, (), {}))
        # Hooks on another member could change its input or output; this one's backward hooks wrap x in a new
        # tensor, which the other members' calls would never match (turning grouping off for good).
        reason = _group_reason(all_ops, [_has_call_hooks(m) for j, m in enumerate(group.members) if j != index]
                               + [_wraps_inputs(module)])
        if reason is None:
            handle._count("lora_qkv")
            outs = _run_lora_qkv(handle, x, all_ops)
            calls.pending = {j: outs[j] for j in range(3) if j != index}
            calls.pending_input = x
            calls.pending_key = (x._version, _context_key(x))
            return outs[index]
        handle._count(f"qkv ungrouped: {reason}")
    handle._count("lora_linear")
    return _run_lora_linear(handle, x, ops)


def _group_reason(all_ops, other_hooks) -> str | None:
    if any(other_hooks):
        # A hook on another member could change its input or output: let it run as usual.
        return "hooks on a member"
    for ops in all_ops:
        if isinstance(ops, str):
            return ops
    first = all_ops[0]
    for ops in all_ops[1:]:
        if (ops.scaling, ops.dropout_p, ops.training, ops.compute_dtype, ops.autocast) != (
                first.scaling, first.dropout_p, first.training, first.compute_dtype, first.autocast):
            return "members differ in scaling, dropout or dtype"
        if (ops.bias is None) != (first.bias is None):
            return "some members have a bias and some do not"
        if ops.weight.shape != first.weight.shape or ops.lora_a.shape != first.lora_a.shape:
            return "members differ in shape or rank"
    return None


def _run_lora_qkv(handle, x, all_ops):
    from ace_kernels.lora import lora_qkv

    first = all_ops[0]
    # Stacking the frozen weights costs one copy of 3*out*in elements per call, small
    # beside the GEMM; caching it would go stale when weights change through .data.
    weight = torch.cat([o.weight for o in all_ops], dim=0)
    bias = torch.cat([o.bias for o in all_ops], dim=0) if first.bias is not None else None
    lora_a = torch.stack([o.lora_a for o in all_ops], dim=0)
    lora_b = torch.stack([o.lora_b for o in all_ops], dim=0)
    x_in = x if x.dtype == first.compute_dtype else x.to(first.compute_dtype)
    return lora_qkv(x_in, weight, bias, lora_a, lora_b, scaling=first.scaling, dropout_p=first.dropout_p,
                    training=first.training, backend=handle.backend_for("lora_qkv"))


# ----------------------------------------------------------------------------------------
# Reference ACE loss module
# ----------------------------------------------------------------------------------------

_ADAPTER_NAMES = ("img_edge_adapter", "img_node_adapter", "text_edge_adapter", "text_node_adapter")
_REFERENCE_FORWARD_PARAMS = ["clip_model", "images", "texts", "merged_df", "indices"]


def _adapter_structure_reason(adapter) -> str | None:
    """What the adapter's attributes show against ``up(leaky_relu(down(z), 0.2))`` (None: no
    difference); cheap enough for every call."""
    from ace_kernels.hypergraph import _is_op_activation, _is_uninitialised_lazy

    down, up = getattr(adapter, "down", None), getattr(adapter, "up", None)
    for part, layer in (("down", down), ("up", up)):
        if _is_uninitialised_lazy(layer):
            return f"adapter {part} is an uninitialised {type(layer).__name__} (patch it once it has weights)"
    if not (isinstance(down, nn.Linear) and isinstance(up, nn.Linear)):
        return "adapter without down/up nn.Linear layers"
    for part, layer in (("down", down), ("up", up)):
        if type(layer).forward is not nn.Linear.forward:
            # Its own forward (QAT's fake quantisation, a flag it reads) is what the op, reading the weights, skips.
            kind = type(layer)
            return f"adapter {part} is a {kind.__module__}.{kind.__qualname__}, whose forward is not nn.Linear's"
    act = getattr(adapter, "act", None)
    if act is not None and not _is_op_activation(act):
        return f"adapter activation {act!r} is not LeakyReLU(0.2)"
    if down.out_features != up.in_features or up.out_features != down.in_features:
        return "adapter down/up shapes do not chain back to the input width"
    return None


@_probe
def _adapter_reason(adapter) -> str | None:
    """Why ``adapter`` is not ``up(leaky_relu(down(z), 0.2))`` (None: it is)."""
    reason = _adapter_structure_reason(adapter)
    if reason:
        return reason
    # The attributes cannot show a residual or another activation in forward: probe it once, on
    # a CPU copy (:func:`_probe_copy`) whose layers have no hooks, so the user's hooks on down, up
    # or act neither fire here nor decide the result (a private generator, so the caller's random
    # stream is untouched). A forward set on the instance (a wrapper, a lambda over the adapter's
    # own layers) would still run on the adapter, not the copy: it is probed on the adapter, in its
    # dtype (every call falls back while it is there; such a check is not kept).
    if _forward_replaced(adapter):
        copied = adapter
    else:
        try:
            copied = _probe_copy(adapter)
        except Exception as exc:
            return f"adapter forward could not be checked on a copy ({type(exc).__name__}: {exc})"
    down, up = copied.down, copied.up
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(3, down.in_features, generator=generator, device="cpu").to(down.weight)
    with torch.no_grad(), parametrize.cached():  # a parametrized weight computed once, for both (see _read_once)
        expected = F.linear(F.leaky_relu(F.linear(probe, down.weight, down.bias), 0.2), up.weight, up.bias)
        try:
            with torch.random.fork_rng(devices=[]):
                got = copied.forward(probe)  # not through __call__: the adapter's own hooks do not run
        except Exception as exc:  # e.g. a forward that takes more arguments: not this adapter
            return f"adapter forward fails on a [3, {down.in_features}] probe ({type(exc).__name__})"
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape \
            or not torch.allclose(got, expected, rtol=1e-3, atol=1e-3):
        return "adapter forward is not up(leaky_relu(down(z), 0.2))"
    return None


def _reference_loss_matches(module) -> bool:
    return (all(hasattr(module, n) for n in _ADAPTER_NAMES) and hasattr(module, "logit_scale")
            and hasattr(getattr(module, "args", None), "topk") and callable(getattr(module, "apply_ace_hgat", None)))


def _adapters_for(module, encoder):
    if encoder == "img":
        return module.img_edge_adapter, module.img_node_adapter
    if encoder == "text":
        return module.text_edge_adapter, module.text_node_adapter
    raise ValueError(f"encoder must be img or text but given {encoder}")


def _probe_tolerance(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4


@_probe
def _hgat_probe_reason(module) -> str | None:
    """Why the module's ``apply_ace_hgat`` is not known to be the reference's (None: it is).

    A subclass may keep the reference's names and change the computation (a residual, another
    normalisation): its class's ``apply_ace_hgat`` runs once per encoder, on a CPU copy of the
    module and its four adapters (:func:`_probe_copy`: hooks left out, 16-bit ties avoided, other
    submodules shared), on a small random input (B=2, N=topk+3; a private generator, so the
    caller's random stream is untouched) against ``ace_hypergraph``'s torch backend on the copy's
    adapters. A module on the meta device cannot be checked: skipped."""
    from ace_kernels.hypergraph import ace_hypergraph

    try:
        probe = _probe_copy(module, children=_ADAPTER_NAMES)
    except _OnMeta:
        return "on the meta device: apply_ace_hgat cannot be checked (patch it once it has weights)"
    except Exception as exc:
        return f"apply_ace_hgat could not be checked on a copy ({type(exc).__name__}: {exc})"
    topk = int(probe.args.topk)
    generator = torch.Generator().manual_seed(0)
    dtype = _probe_dtype()
    for encoder in ("img", "text"):
        edge, node = _adapters_for(probe, encoder)
        features = torch.randn(2, topk + 3, edge.down.in_features, generator=generator, dtype=dtype, device="cpu")
        attn = torch.rand(2, topk + 2, generator=generator, dtype=dtype, device="cpu")
        with torch.no_grad(), torch.random.fork_rng(devices=[]), parametrize.cached():
            try:
                got = type(probe).apply_ace_hgat(probe, features, attn, encoder=encoder)
            except Exception as exc:
                return f"apply_ace_hgat fails on a [2, {topk + 3}, D] probe ({type(exc).__name__}: {exc})"
            want = ace_hypergraph(features, attn, edge, node, topk=topk, backend="torch")
        scale = float(want.abs().max()) or 1.0
        if not isinstance(got, torch.Tensor) or got.shape != want.shape \
                or not float((got.double() - want.double()).abs().max()) <= _probe_tolerance(dtype) * scale:
            return f"apply_ace_hgat ({encoder}) does not compute the reference's hypergraph (a probe differs)"
    return None


# The adapters checked so far (at patch time, or at a call after one was replaced): the adapter,
# to what its check depended on and its reason (None: it computes up(leaky_relu(down(z), 0.2))).
_ADAPTER_CHECKS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _adapter_reason_now(adapter) -> str | None:
    """An adapter's check, run once per adapter object and again when its class, layers or
    activation object change (a user may reassign them after patching); its attributes are read
    at every call. Its other state (a flag its forward reads) is not re-read. While torch.compile
    traces, only the attributes are checked (compiled code keeps no host-side cache)."""
    reason = _adapter_structure_reason(adapter)
    if reason or torch.compiler.is_compiling():
        return reason
    if any(t.is_meta for layer in (adapter.down, adapter.up) for t in layer.parameters()):
        # Not cached: the same adapter may get its weights later (to_empty, load_state_dict(assign=True)).
        return "adapter on the meta device: cannot be checked (patch it once it has weights)"
    parts = (type(adapter), adapter.down, adapter.up, getattr(adapter, "act", None))
    cached = _ADAPTER_CHECKS.get(adapter)
    if cached is None or len(cached[0]) != len(parts) or any(a is not b for a, b in zip(cached[0], parts)):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # The probe synchronises, which a CUDA graph capture forbids: this call falls back.
            return "adapter not checked yet (changed after patching; a CUDA graph is being captured)"
        cached = (parts, _adapter_reason(adapter))  # the parts themselves: no id can be reused under us
        if _global_hooks_set() or _forward_replaced(adapter):
            # Global module hooks fire for the copy's layers in the probe, and a forward set on the
            # instance runs the adapter's own layers with their hooks: either may have changed the
            # result, which is not kept (the next check, a call or a new patch, probes again).
            return cached[1]
        _ADAPTER_CHECKS[adapter] = cached
    return cached[1]


def _adapter_calls_reason(edge, node) -> str | None:
    """Why calling the adapters would do more than the fused op computes (None: nothing more): hooks, or a
    forward set on an instance, on the adapters, their layers or activations (they run in the original), or
    global module hooks."""
    parts = [m for a in (edge, node) for m in (a, getattr(a, "down", None), getattr(a, "up", None),
                                                getattr(a, "act", None)) if isinstance(m, nn.Module)]
    if any(_has_call_hooks(m) for m in parts):
        return "hooks on the adapters"
    if _global_hooks_set():
        # Global module hooks would fire for the adapters and their layers, which the fused call skips.
        return "global module hooks registered"
    if any(_forward_replaced(m) for m in parts):
        return "a forward replaced on the instance in the adapters"
    return None


def _hypergraph_reason(module, features, attn_weights, edge, node) -> str | None:
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        return "features are not a [B, N, D] tensor"
    if not isinstance(attn_weights, torch.Tensor) or attn_weights.shape != (features.shape[0], features.shape[1] - 1):
        # The reference broadcasts others ([1, N-1], [N-1]) into its score matrix.
        return "attn_weights is not a [B, N-1] tensor"
    if _library.autocast_dtype(features) is not None:
        return "autocast is on"
    transform = _transform_reason()
    if transform:
        return transform
    topk = int(module.args.topk)
    if features.shape[1] < topk:
        # What the op refuses, as the reference's torch.topk does (the original raises its own error).
        return f"N={features.shape[1]} tokens < topk = {topk}"
    reason = _adapter_calls_reason(edge, node) or _adapter_reason_now(edge) or _adapter_reason_now(node)
    if reason:
        return reason
    # The original runs the adapters' nn.Linear layers on tensors in the features' dtype, which F.linear
    # refuses beside another parameter dtype (the op would cast the parameters): its own error, then.
    odd = next((p.dtype for a in (edge, node) for layer in (a.down, a.up) for p in (layer.weight, layer.bias)
                if p is not None and p.dtype != features.dtype), None)
    if odd is not None:
        return f"adapter dtype {odd} differs from the features' {features.dtype}"
    return None


def _read_once(edge, node):
    """A context in which each parametrized adapter weight is computed once (``parametrize.cached``):
    the per-call check reads the weights (their dtype) before the op or the original does, and a
    ``spectral_norm`` in training mode runs a power iteration at each read, which the original runs
    once a call. A plain context otherwise (a dictionary lookup per layer)."""
    layers = (getattr(a, name, None) for a in (edge, node) for name in ("down", "up"))
    if any(isinstance(layer, nn.Module) and "parametrizations" in layer._modules for layer in layers):
        return parametrize.cached()
    return contextlib.nullcontext()


def _ace_hgat_forward(module, handle, original, features, attn_weights, encoder="img"):
    from ace_kernels.hypergraph import ace_hypergraph

    edge, node = _adapters_for(module, encoder)
    with _read_once(edge, node):
        reason = _hypergraph_reason(module, features, attn_weights, edge, node)
        if reason:
            handle._count(f"fallback apply_ace_hgat: {reason}")
            return original(features, attn_weights, encoder)
        handle._count("ace_hypergraph")
        return ace_hypergraph(features, attn_weights, edge, node, topk=int(module.args.topk),
                              backend=handle.backend_for("ace_hypergraph"))


def _ace_cls_embedding(module, handle, features, attn_weights, encoder):
    """normalize(apply_ace_hgat(features, c)[:, 0]) -- via the CLS-only op when hypergraph is patched."""
    from ace_kernels.hypergraph import ace_hypergraph

    if _is_patched(module, "apply_ace_hgat"):
        edge, node = _adapters_for(module, encoder)
        with _read_once(edge, node):
            if _hypergraph_reason(module, features, attn_weights, edge, node) is None:
                handle._count("ace_hypergraph cls_only")
                cls = ace_hypergraph(features, attn_weights, edge, node, topk=int(module.args.topk), cls_only=True,
                                     backend=handle.backend_for("ace_hypergraph"))  # [B, D] on every backend
                return F.normalize(cls, dim=-1)
            out = module.apply_ace_hgat(features, attn_weights, encoder=encoder)  # falls back: read there
            return F.normalize(out, dim=-1)[:, 0]
    out = module.apply_ace_hgat(features, attn_weights, encoder=encoder)
    return F.normalize(out, dim=-1)[:, 0]


def _labels_from_frame(merged_df, indices, device) -> torch.Tensor:
    """The rows the reference compares, as a tensor ``label_guided_infonce`` compares the same way."""
    import numpy as np

    rows = merged_df.iloc[indices, 2:].to_numpy()
    # Numeric columns compare as numpy's == compares them: floats as float64 (a NaN matches
    # nothing), integers and bools exactly as int64 (a float64 copy would merge ints above 2**53).
    if rows.dtype.kind == "f":
        return torch.as_tensor(rows.astype(np.float64), device=device)
    if rows.dtype.kind in "biu":
        return torch.as_tensor(rows.astype(np.int64), device=device)
    unmatched = np.zeros(len(rows), dtype=bool)
    if rows.dtype.kind in "Mm":
        # Datetimes: NaT equals nothing (numpy's == on datetime64); the rest compare as int64.
        unmatched = np.isnat(rows).reshape(len(rows), -1).any(axis=1)
        rows = rows.view(np.int64)
    # Anything else (object columns: strings, None, mixed types, pandas' NA): one integer key
    # per distinct row, by Python equality as numpy's == on objects; a row holding a value not
    # equal to itself (a float NaN, NaT, pd.NA, whose == is not even a bool) matches nothing.
    keys, ids = {}, []
    for i, row in enumerate(rows):
        values = tuple(row.tolist())
        if unmatched[i] or not all(_equals_itself(v) for v in values):
            ids.append(-1 - i)
            continue
        ids.append(keys.setdefault(values, len(keys)))
    return torch.tensor(ids, device=device, dtype=torch.long).reshape(-1, 1)


def _in_features_dtype(loss: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The loss in the dtype the reference's would come in: 16-bit features give 16-bit logits and
    loss outside autocast (ours is computed in fp32); under autocast the cross-entropy is fp32."""
    if features.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(features.device.type):
        return loss.to(features.dtype)
    return loss


def _autocast_features(image: torch.Tensor, text):
    """The features as the original's logit matmul reads them under autocast: two different float32/16
    dtypes (which it casts to the autocast dtype, and computes) both in that dtype; otherwise as given
    (the same dtype, read as it is; or a pair the original refuses too, which the loss's check names)."""
    cast = _library.autocast_dtype(image)
    if (cast is not None and isinstance(text, torch.Tensor) and text.dtype != image.dtype
            and image.dtype in _AUTOCAST_CASTS and text.dtype in _AUTOCAST_CASTS):
        return image.to(cast), text.to(cast)
    return image, text


def _equals_itself(value) -> bool:
    try:
        return bool(value == value)
    except (TypeError, ValueError):  # pd.NA: its == returns NA, whose truth value raises
        return False


def _reference_loss_forward(module, handle, original, clip_model, images, texts, merged_df=None, indices=None):
    from ace_kernels.contrastive import label_guided_infonce

    mode = getattr(module.args, "apply_gnn_encoders", None)
    if mode not in ("vision", "text", "both"):
        handle._count("fallback reference-ace-loss: apply_gnn_encoders not vision/text/both")
        return original(clip_model, images, texts, merged_df, indices)
    transform = _transform_reason()
    if transform:
        handle._count(f"fallback reference-ace-loss: {transform}")
        return original(clip_model, images, texts, merged_df, indices)
    device = images.device
    # The same calls into the CLIP model as the reference forward, in the same order
    # (so the LoRA dropout masks are drawn in the same sequence).
    clip_model.visual.trunk.global_pool = ""
    image_tokens, img_attn_scores = clip_model.visual.trunk.get_attn_scores(images)
    image_tokens = F.normalize(clip_model.visual.head(image_tokens), dim=-1)
    text_tokens, text_attn_scores = clip_model.encode_text(texts, normalize=True, output_attentions=True,
                                                           output_tokens=True)
    # Row 0 of the head-averaged scores, without column 0; slicing before the mean skips
    # averaging the N x N maps.
    img_cls_attn = img_attn_scores[:, :, 0, 1:].mean(dim=1)
    text_cls_attn = text_attn_scores[-1][:, :, 0, 1:].mean(dim=1)
    if mode in ("vision", "both"):
        image_emb = _ace_cls_embedding(module, handle, image_tokens, img_cls_attn, "img")
    else:
        image_emb = image_tokens[:, 0]
    if mode in ("text", "both"):
        text_emb = _ace_cls_embedding(module, handle, text_tokens, text_cls_attn, "text")
    else:
        text_emb = text_tokens[:, 0]
    labels = _labels_from_frame(merged_df, indices, device) if merged_df is not None else None
    image_emb, text_emb = _autocast_features(image_emb, text_emb)
    handle._count("label_guided_infonce")
    loss = label_guided_infonce(image_emb, text_emb, module.logit_scale, labels,
                                backend=handle.backend_for("label_guided_infonce"))
    # The reference raises on NaN logits (one host sync per step there too); a NaN loss is
    # what NaN logits produce.
    if torch.isnan(loss).item():
        raise ValueError("NaN value in logits_per_image")
    return _in_features_dtype(loss, image_emb)


def _reference_forward_signature_ok(module) -> bool:
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        return False
    return params == _REFERENCE_FORWARD_PARAMS


_REFERENCE_CLIP_LOSS_PARAMS = ["image_features", "text_features", "merged_df", "indices"]


def _reference_clip_loss_matches(module) -> bool:
    # The reference's plain CLIPLoss: a logit multiplier, args, and the label-frame forward.
    if _reference_loss_matches(module) or not hasattr(module, "logit_scale") or not hasattr(module, "args"):
        return False
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        return False
    return params == _REFERENCE_CLIP_LOSS_PARAMS


def _reference_clip_loss_forward(module, handle, original, image_features, text_features, merged_df=None,
                                 indices=None):
    from ace_kernels.contrastive import label_guided_infonce

    if not (isinstance(image_features, torch.Tensor) and image_features.dim() == 2):
        handle._count("fallback reference-clip-loss: features are not [B, D]")
        return original(image_features, text_features, merged_df, indices)
    transform = _transform_reason()
    if transform:
        handle._count(f"fallback reference-clip-loss: {transform}")
        return original(image_features, text_features, merged_df, indices)
    labels = _labels_from_frame(merged_df, indices, image_features.device) if merged_df is not None else None
    image_features, text_features = _autocast_features(image_features, text_features)
    handle._count("label_guided_infonce")
    return _in_features_dtype(label_guided_infonce(image_features, text_features, module.logit_scale, labels,
                                                   backend=handle.backend_for("label_guided_infonce")), image_features)


class _ProbeFrame:
    """The part of a pandas DataFrame the reference's losses read,
    ``frame.iloc[indices, 2:].to_numpy()`` (or ``.values``), over a small table: a probe's labels."""

    def __init__(self, table):
        self.table = table
        self.iloc = self

    def __getitem__(self, key):
        import numpy as np
        from types import SimpleNamespace

        rows, cols = key
        part = self.table[np.asarray(rows)][:, cols]
        return SimpleNamespace(to_numpy=lambda: part, values=part)


class _ProbeHandle:
    """What a replacement forward asks of its handle, for a probe: the torch backend, no counts."""

    def backend_for(self, op: str) -> str:
        return "torch"

    def _count(self, key: str) -> None:
        pass


def _probe_frames(batch: int):
    """(merged_df, indices) pairs a loss probe runs: no labels, and a frame whose label column
    repeats values (false negatives to mask), read in a shuffled order."""
    import numpy as np

    table = np.array([[row, 100 + row, label] for row, label in enumerate([0, 1, 0, 2, 1, 3, 0])])
    indices = [4, 0, 6, 2, 3, 1][:batch]
    return [(None, None), (_ProbeFrame(table), indices)]


def _loss_probe_copy(module):
    """(a probe copy of a loss module, None) or (None, why it cannot be checked).

    The copy (:func:`_probe_copy`) leaves out what is set on the instance in place of its class's
    ``forward`` and ``apply_ace_hgat`` (a patch's, a wrapper's: shared with the module, they would
    run on it, not on the copy). The probe compares the class's forward with the fused one; at a
    call both reach the same ``apply_ace_hgat``."""
    try:
        probe = _probe_copy(module)
    except _OnMeta:
        return None, "on the meta device: its forward cannot be checked (patch it once it has weights)"
    except Exception as exc:
        return None, f"its forward could not be checked on a copy ({type(exc).__name__}: {exc})"
    for attr in ("forward", "apply_ace_hgat"):
        probe.__dict__.pop(attr, None)
    return probe, None


def _same_loss(got, want, dtype) -> bool:
    return (isinstance(got, torch.Tensor) and got.numel() == 1
            and float((got.double() - want.double()).abs()) <= _probe_tolerance(dtype) * max(1.0, float(want.abs())))


@_probe
def _clip_loss_probe_reason(module) -> str | None:
    """Why the module's forward is not known to be the reference's plain CLIP loss (None: it is).

    The loss is recognised by its attribute names and forward signature, which a look-alike can
    keep while computing another loss (a multiplier stored as a log, say): its class's forward
    runs on a CPU copy (:func:`_probe_copy`) with B=6 random embeddings, with no labels and with a
    frame of repeated labels, against ``label_guided_infonce``'s torch backend. A module on the
    meta device cannot be checked: skipped."""
    from ace_kernels.contrastive import label_guided_infonce

    probe, reason = _loss_probe_copy(module)
    if reason:
        return reason
    generator = torch.Generator().manual_seed(0)
    dtype = _probe_dtype()
    image = F.normalize(torch.randn(6, 8, generator=generator, dtype=dtype, device="cpu"), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=generator, dtype=dtype, device="cpu"), dim=-1)
    for frame, indices in _probe_frames(6):
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            try:
                got = type(probe).forward(probe, image, text, frame, indices)
                labels = None if frame is None else _labels_from_frame(frame, indices, "cpu")
                want = label_guided_infonce(image, text, probe.logit_scale, labels, backend="torch")
            except Exception as exc:
                return f"its forward fails on a probe, or the fused loss on its operands ({type(exc).__name__}: {exc})"
        if not _same_loss(got, want, dtype):
            return ("its forward does not compute the reference's loss (a probe "
                    f"{'without' if frame is None else 'with'} labels differs)")
    return None


@_probe
def _reference_loss_probe_reason(module) -> str | None:
    """Why the module's forward is not known to be the reference's ACE loss (None: it is).

    Its class's forward runs on a CPU copy (:func:`_probe_copy`) with a stand-in CLIP model that
    answers the reference's four calls with fixed random tokens and attention scores (B=6,
    N=topk+3 image and topk+4 text tokens), for each ``apply_gnn_encoders`` mode, with no labels
    and with a frame of repeated labels, against the fused forward on the same copy (torch
    backend; both call the copy's own ``apply_ace_hgat``, which its own probe checks). A
    subclass that adds a term to the loss, or a look-alike that computes another one, is left
    as it runs. A module on the meta device cannot be checked: skipped."""
    from types import SimpleNamespace

    probe, reason = _loss_probe_copy(module)
    if reason:
        return reason
    generator = torch.Generator().manual_seed(0)
    dtype = _probe_dtype()
    try:
        topk = int(probe.args.topk)
        dims = [_adapters_for(probe, encoder)[0].down.in_features for encoder in ("img", "text")]
        args = copy.copy(probe.args)
    except Exception as exc:
        return f"its forward could not be checked ({type(exc).__name__}: {exc})"
    batch, heads = 6, 2
    tokens = []
    for n, dim in ((topk + 3, dims[0]), (topk + 4, dims[1])):
        tokens.append((torch.randn(batch, n, dim, generator=generator, dtype=dtype, device="cpu"),
                       torch.randn(batch, heads, n, n, generator=generator, dtype=dtype, device="cpu")))
    (image_tokens, image_scores), (text_tokens, text_scores) = tokens
    text_tokens = F.normalize(text_tokens, dim=-1)  # encode_text(normalize=True)
    trunk = SimpleNamespace(global_pool="token", get_attn_scores=lambda images: (image_tokens, image_scores))
    clip_model = SimpleNamespace(visual=SimpleNamespace(trunk=trunk, head=lambda t: t),
                                 encode_text=lambda texts, **kwargs: (text_tokens, (text_scores,)))
    images = torch.zeros(batch, 1, dtype=dtype, device="cpu")
    texts = torch.zeros(batch, 1, dtype=torch.long, device="cpu")

    def original(*call):
        return type(probe).forward(probe, *call)

    for mode in ("vision", "text", "both"):
        for frame, indices in _probe_frames(batch):
            with torch.no_grad(), torch.random.fork_rng(devices=[]), parametrize.cached():
                try:
                    args.apply_gnn_encoders = mode
                    probe.args = args
                    got = original(clip_model, images, texts, frame, indices)
                    want = _reference_loss_forward(probe, _ProbeHandle(), original, clip_model, images, texts,
                                                   frame, indices)
                except Exception as exc:
                    return (f"its forward fails on a probe, or the fused forward on its operands "
                            f"({type(exc).__name__}: {exc})")
            if not _same_loss(got, want, dtype):
                return (f"its forward does not compute the reference's loss (a probe with apply_gnn_encoders="
                        f"{mode!r}, {'without' if frame is None else 'with'} labels, differs)")
    return None


# ----------------------------------------------------------------------------------------
# open_clip ClipLoss
# ----------------------------------------------------------------------------------------


def _clip_loss_class():
    loss_mod = sys.modules.get("open_clip.loss")
    return getattr(loss_mod, "ClipLoss", None) if loss_mod is not None else None


def _clip_loss_matches(module) -> bool:
    cls = _clip_loss_class()
    return cls is not None and isinstance(module, cls)


def _clip_loss_structure_reason(module) -> str | None:
    cls = _clip_loss_class()
    for name in ("forward", "get_logits", "get_ground_truth"):
        # The class's methods, and (but for the forward patching installs) none on the instance.
        if getattr(type(module), name) is not getattr(cls, name) or (name != "forward" and name in vars(module)):
            return f"{type(module).__name__} changes ClipLoss's {name}"
    return None


def _clip_loss_reason(module) -> str | None:
    """Why this ClipLoss cannot take the fused path now (None: it can)."""
    reason = _clip_loss_structure_reason(module)
    if reason or module.world_size == 1:
        return reason
    settings = (f"world_size={module.world_size}, local_loss={module.local_loss}, "
                f"gather_with_grad={module.gather_with_grad}")
    if getattr(module, "use_horovod", False):
        return f"{settings}: horovod is not supported"
    if module.local_loss:
        # Each rank's value is the loss of its own rows against all columns, not the global loss.
        return f"{settings}: local_loss=True per-rank values are not label_guided_infonce's global loss"
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return f"{settings}: torch.distributed is not initialised"
    if dist.get_world_size() != module.world_size or dist.get_rank() != module.rank:
        return (f"{settings}: rank/world size differ from torch.distributed's "
                f"({dist.get_rank()}/{dist.get_world_size()})")
    return None


class _SumGradAcrossRanks(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over the group."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, tensor, factor: float):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _clip_loss_forward(module, handle, original, image_features, text_features, logit_scale, logit_bias=None,
                       output_dict=False):
    from ace_kernels.contrastive import label_guided_infonce

    # Re-checked per call: world_size and the process group can change after patching.
    reason = _clip_loss_reason(module)
    if reason is None and logit_bias is not None:
        reason = "logit_bias given (SigLIP-style bias is not part of label_guided_infonce)"
    if reason is None and (not isinstance(image_features, torch.Tensor) or image_features.dim() != 2):
        reason = "features are not [B, D]"
    if reason is None:
        reason = _transform_reason()
    if reason is not None:
        handle._count(f"fallback open_clip-ClipLoss: {reason}")
        return original(image_features, text_features, logit_scale, logit_bias=logit_bias, output_dict=output_dict)
    image_features, text_features = _autocast_features(image_features, text_features)
    group = None
    if module.world_size > 1:
        import torch.distributed as dist

        # open_clip (local_loss=False) gives every rank the global loss. label_guided_infonce
        # does too, and the gradient of the global loss w.r.t. the local rows, which is
        # open_clip's without gather_with_grad; with it, open_clip's all_gather backward sums
        # the (identical) per-rank gradients: world_size times that. logit_scale: open_clip
        # gives every rank the full gradient, label_guided_infonce this rank's share of it,
        # so the shares are summed over ranks in backward.
        group = dist.group.WORLD
        if isinstance(logit_scale, torch.Tensor) and logit_scale.requires_grad:
            logit_scale = _SumGradAcrossRanks.apply(logit_scale, group)
        if module.gather_with_grad:
            image_features = _ScaleGrad.apply(image_features, float(module.world_size))
            text_features = _ScaleGrad.apply(text_features, float(module.world_size))
    handle._count("label_guided_infonce")
    loss = label_guided_infonce(image_features, text_features, logit_scale, None, group=group,
                                backend=handle.backend_for("label_guided_infonce"))
    loss = _in_features_dtype(loss, image_features)  # as open_clip's loss comes
    return {"contrastive_loss": loss} if output_dict else loss


# ----------------------------------------------------------------------------------------
# The recogniser registry
# ----------------------------------------------------------------------------------------


@dataclass
class Recogniser:
    """One entry of the registry ``patch`` consults for every module.

    Parameters
    ----------
    name : str
        Shown in the summary.
    family : str
        ``"lora"``, ``"hypergraph"`` or ``"loss"``: the ``patch`` flag that
        enables it (``"loss+hypergraph"``: either).
    matches : callable(module) -> bool
        Whether this recogniser is responsible for the module.
    install : callable(name, module, handle, options) -> None
        Adds :class:`PatchRecord` s and performs swaps through
        ``handle._swap(module, attr, replacement)`` (the one swap mechanism).
    claims : callable(module) -> list of modules, optional
        The modules this recogniser takes over when it matches (default: the
        module itself). Claimed modules are not offered to later recognisers;
        a q/k/v group claims its three members, not the attention module.
    """

    name: str
    family: str
    matches: Callable[[nn.Module], bool]
    install: Callable[[str, nn.Module, PatchHandle, dict], None]
    claims: Callable[[nn.Module], list] | None = None


_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))


def _qkv_members(module: nn.Module):
    """(names, members, kind) when the module holds a q/k/v triple of one LoRA kind."""
    children = module._modules
    for names in _QKV_NAMES:
        members = [children.get(n) for n in names]
        if any(m is None for m in members):
            continue
        kinds = [_lora_kind(m) for m in members]
        if kinds[0] is None or any(k is not kinds[0] for k in kinds):
            continue
        return names, members, kinds[0]
    return None


def _install_lora_single(name, module, handle, options, kind=None, note="", static=False):
    """``static``: the member's ``kind.static_reason``, when the q/k/v group already has it (its
    probe is not run twice)."""
    kind = kind or _lora_kind(module)
    if _is_patched(module):
        handle.records.append(PatchRecord(name, kind.name, "skipped", "already patched by another handle"))
        return
    reason = _wrapped_reason(module) or (kind.static_reason(module) if static is False else static)
    if reason:
        handle.records.append(PatchRecord(name, kind.name, "skipped", reason))
        return
    original = _original(module)
    handle._swap(module, "forward", _Replacement(_single_lora_forward, module, handle, kind, original), name)
    _record_state(handle, name, kind.name, kind.state_reason(module), "-> lora_linear" + note)


def _record_state(handle, name, kind_name, state_reason, route):
    if state_reason:
        handle.records.append(PatchRecord(name, kind_name, "fallback", state_reason))
    else:
        handle.records.append(PatchRecord(name, kind_name, "patched", route))


def _install_qkv_group(name, module, handle, options):
    names, members, kind = _qkv_members(module)
    prefix = f"{name}." if name else ""
    label = prefix + "{" + ",".join(names) + "}"
    reasons = [kind.static_reason(m) for m in members]
    shapes = {kind.features(m) for m, reason in zip(members, reasons) if reason is None}
    note = ""
    signatures = [kind.group_signature(m) for m in members]
    if None not in signatures and len(set(signatures)) > 1:
        # Known now: every call would fall back to the members one by one; record them so.
        note = (" (q/k/v not grouped: some members have a bias and some do not)"
                if len({s[0] for s in signatures}) > 1 else
                " (q/k/v not grouped: members differ in rank, scaling or dropout)")
    if (any(reasons) or len(shapes) != 1 or not options["group_qkv"] or any(_forward_replaced(m) for m in members)
            or note):
        # Not groupable: each member on its own.
        for member_name, member, reason in zip(names, members, reasons):
            _install_lora_single(prefix + member_name, member, handle, options, kind, note, static=reason)
        return
    group = _QKVGroup(name, members, names, kind)
    group.originals = [_original(m) for m in members]
    for index, (member_name, member) in enumerate(zip(names, members)):
        handle._swap(member, "forward", _Replacement(_group_member_forward, member, handle, group, index),
                     prefix + member_name)
    handle._hooks.append(module.register_forward_pre_hook(group.enter))
    handle._hooks.append(module.register_forward_hook(group.leave, always_call=True))
    states = [kind.state_reason(m) for m in members]
    state = next((f"{n}: {s}" for n, s in zip(names, states) if s), None)
    _record_state(handle, label, f"qkv-group ({kind.name} x3)", state, "-> lora_qkv")


def _install_reference_loss(name, module, handle, options):
    kind = "reference-ace-loss"
    if options["hypergraph"]:
        # Checked through the per-object cache, so the first call does not probe them again.
        reason = next((r for r in (_adapter_reason_now(getattr(module, n)) for n in _ADAPTER_NAMES) if r), None)
        if _is_patched(module, "apply_ace_hgat"):
            reason = "already patched by another handle"
        reason = reason or _wrapped_reason(module, "apply_ace_hgat") or _hgat_probe_reason(module)
        if reason:
            handle.records.append(PatchRecord(f"{name}.apply_ace_hgat" if name else "apply_ace_hgat", kind,
                                              "skipped", reason))
        else:
            original = _original(module, "apply_ace_hgat")
            handle._swap(module, "apply_ace_hgat", _Replacement(_ace_hgat_forward, module, handle, original), name)
            # Hooks or wrapped forwards on an encoder's adapters make its calls run the original until removed.
            state = "; ".join(f"{encoder} calls: {why}" for encoder in ("img", "text")
                              if (why := _adapter_calls_reason(*_adapters_for(module, encoder))))
            _record_state(handle, f"{name}.apply_ace_hgat" if name else "apply_ace_hgat", kind, state,
                          "-> ace_hypergraph")
    if options["loss"]:
        label = f"{name}.forward" if name else "forward"
        defined = _defining_class(type(module), "forward")
        hgat_class = _defining_class(type(module), "apply_ace_hgat")
        if _is_patched(module):
            handle.records.append(PatchRecord(label, kind, "skipped", "already patched by another handle"))
        elif _wrapped_reason(module):
            handle.records.append(PatchRecord(label, kind, "skipped", _wrapped_reason(module)))
        elif not (defined is hgat_class or (defined is not None and hgat_class is not None
                                            and issubclass(hgat_class, defined) and "apply_ace_hgat" in vars(defined))):
            # A subclass that redefines forward may compute another loss: the fused forward would
            # silently replace it (apply_ace_hgat itself is checked by a probe).
            handle.records.append(PatchRecord(label, kind, "skipped",
                                              f"forward comes from {getattr(defined, '__name__', defined)}, not from "
                                              "the class that defines apply_ace_hgat or one it extends: not known to "
                                              "be the reference's loss"))
        elif not _reference_forward_signature_ok(module):
            handle.records.append(PatchRecord(label, kind, "skipped",
                                              "forward signature is not the reference's (clip_model, images, "
                                              "texts, merged_df=None, indices=None)"))
        elif reason := _reference_loss_probe_reason(module):
            handle.records.append(PatchRecord(label, kind, "skipped", reason))
        else:
            original = _original(module)
            handle._swap(module, "forward", _Replacement(_reference_loss_forward, module, handle, original), name)
            # The CLS-only op serves the hypergraph only where apply_ace_hgat is patched (_ace_cls_embedding).
            route = ("-> CLS-only ace_hypergraph + label_guided_infonce" if _is_patched(module, "apply_ace_hgat")
                     else "-> label_guided_infonce (apply_ace_hgat not patched: its own, full output)")
            mode = getattr(module.args, "apply_gnn_encoders", None)
            state = None if mode in ("vision", "text", "both") else "apply_gnn_encoders not vision/text/both"
            _record_state(handle, label, kind, state, route)


def _install_reference_clip_loss(name, module, handle, options):
    kind = "reference-clip-loss"
    if _is_patched(module):
        handle.records.append(PatchRecord(name, kind, "skipped", "already patched by another handle"))
        return
    reason = _wrapped_reason(module) or _clip_loss_probe_reason(module)
    if reason:
        handle.records.append(PatchRecord(name, kind, "skipped", reason))
        return
    original = _original(module)
    handle._swap(module, "forward", _Replacement(_reference_clip_loss_forward, module, handle, original), name)
    handle.records.append(PatchRecord(name, kind, "patched", "-> label_guided_infonce"))


def _install_clip_loss(name, module, handle, options):
    kind = "open_clip-ClipLoss"
    if _is_patched(module):
        handle.records.append(PatchRecord(name, kind, "skipped", "already patched by another handle"))
        return
    structure = _wrapped_reason(module) or _clip_loss_structure_reason(module)
    if structure:
        handle.records.append(PatchRecord(name, kind, "skipped", structure))
        return
    reason = _clip_loss_reason(module)
    original = _original(module)
    handle._swap(module, "forward", _Replacement(_clip_loss_forward, module, handle, original), name)
    _record_state(handle, name, kind, reason, "-> label_guided_infonce")


def _peft_mha_matches(module) -> bool:
    cls = _peft_lora_layer_class("MultiheadAttention")
    return cls is not None and isinstance(module, cls)


def _install_peft_mha(name, module, handle, options):
    # Claims its whole subtree: the LoRA layer PEFT puts on its out_proj never runs (the
    # attention reads out_proj.weight directly), so patching it would only overstate the summary.
    handle.records.append(PatchRecord(name, "peft-lora-multihead-attention", "skipped",
                                      "PEFT LoRA on nn.MultiheadAttention (it merges the LoRA weights into the "
                                      "attention's own projections around each call): left as PEFT runs it"))


def _lora_out_proj_of_mha(module) -> bool:
    out_proj = module._modules.get("out_proj") if isinstance(module, nn.MultiheadAttention) else None
    return out_proj is not None and _lora_kind(out_proj) is not None


def _install_lora_out_proj_of_mha(name, module, handle, options):
    # Claims the out_proj alone (the attention itself has nothing to patch).
    handle.records.append(PatchRecord(f"{name}.out_proj" if name else "out_proj",
                                      _lora_kind(module.out_proj).name, "skipped",
                                      "the out_proj of an nn.MultiheadAttention, which reads out_proj.weight itself: "
                                      "this LoRA layer's forward never runs, patched or not"))


_RECOGNISERS: list[Recogniser] = [
    Recogniser("peft-lora-multihead-attention", "lora", _peft_mha_matches, _install_peft_mha,
               claims=lambda m: list(m.modules())),
    Recogniser("lora-out-proj-of-multihead-attention", "lora", _lora_out_proj_of_mha, _install_lora_out_proj_of_mha,
               claims=lambda m: [m.out_proj]),
    Recogniser("qkv-group", "lora", lambda m: _qkv_members(m) is not None, _install_qkv_group,
               claims=lambda m: list(_qkv_members(m)[1])),
    Recogniser("lora-linear", "lora", lambda m: _lora_kind(m) is not None, _install_lora_single),
    Recogniser("reference-ace-loss", "loss+hypergraph", _reference_loss_matches, _install_reference_loss),
    Recogniser("reference-clip-loss", "loss", _reference_clip_loss_matches, _install_reference_clip_loss),
    Recogniser("open_clip-ClipLoss", "loss", _clip_loss_matches, _install_clip_loss),
]


def register_recogniser(recogniser: Recogniser, *, first: bool = False) -> None:
    """Add a recogniser to the registry (tried after the built-in ones unless ``first``)."""
    if not isinstance(recogniser, Recogniser):
        raise ValueError(f"argument 'recogniser': expected a Recogniser, got {type(recogniser).__name__}")
    family = recogniser.family
    if not isinstance(family, str) or not family or any(f not in _FAMILIES for f in family.split("+")):
        raise ValueError(f"argument 'recogniser': its family must be one of {list(_FAMILIES)} or several joined by "
                         f"'+' (the patch flags that enable it), got {family!r}")
    if first:
        _RECOGNISERS.insert(0, recogniser)
    else:
        _RECOGNISERS.append(recogniser)


def unregister_recogniser(recogniser: Recogniser) -> None:
    """Remove a recogniser added with :func:`register_recogniser`."""
    if not any(entry is recogniser for entry in _RECOGNISERS):
        raise ValueError(f"argument 'recogniser': {getattr(recogniser, 'name', recogniser)!r} is not registered")
    _RECOGNISERS[:] = [entry for entry in _RECOGNISERS if entry is not recogniser]


def recognisers() -> list[Recogniser]:
    """The registry, in the order ``patch`` tries it."""
    return list(_RECOGNISERS)


def _check_backend_has_ops(backend, options: dict) -> None:
    """A named backend (not ``auto``) must implement each op it is given for that the enabled
    flags route to: ``backend="cuda"`` would otherwise fail at every LoRA call, not here."""
    from ace_kernels import _dispatch

    needed = {op for flag, ops in _FAMILIES.items() if options[flag] for op in ops}
    chosen = backend if isinstance(backend, dict) else {op: backend for op in _FUSED_OPS}
    missing = [op for op in _FUSED_OPS
               if op in needed and chosen.get(op, "auto") != "auto" and chosen[op] not in _dispatch._OPS[op].impls]
    if not missing:
        return
    if isinstance(backend, dict):
        raise ValueError(f"argument 'backend': {', '.join(f'{op!r}: {chosen[op]!r}' for op in missing)} names a "
                         "backend without that op")
    raise ValueError(f"argument 'backend': {backend!r} has no implementation of {', '.join(missing)} (which the "
                     f"flags given route to); pass a dict, e.g. {{'ace_hypergraph': {backend!r}}}, for the ops "
                     "that have one, and 'auto' for the rest")


def _family_enabled(family: str, options: dict) -> bool:
    return any(options.get(f, False) for f in family.split("+"))


# ----------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------


def patch(model_or_module: nn.Module, *, lora: bool = True, hypergraph: bool = True, loss: bool = True,
          group_qkv: bool = True, backend: str | dict[str, str] = "auto") -> PatchHandle:
    """Swap recognised modules of a model to the fused ace_kernels ops, in place.

    Parameters
    ----------
    model_or_module : nn.Module
        Any module; it and every submodule are examined (a loss module that is not
        part of the model can be patched with its own call).
    lora : bool, default True
        Patch PEFT LoRA linears and the reference ACE-LoRA linears (q/k/v triples
        are grouped into ``lora_qkv`` calls).
    hypergraph : bool, default True
        Replace the reference loss module's ``apply_ace_hgat`` with ``ace_hypergraph``.
    loss : bool, default True
        Replace the reference loss module's loss computation and open_clip's
        ``ClipLoss`` with ``label_guided_infonce``.
    group_qkv : bool, default True
        Group q/k/v LoRA triples into one ``lora_qkv`` call (see the module docstring).
    backend : str or dict, default "auto"
        ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``, passed to every fused
        op call; or a dict from op name (``"lora_linear"``, ``"lora_qkv"``,
        ``"ace_hypergraph"``, ``"label_guided_infonce"``) to backend, ``"auto"``
        for the ops it leaves out. One name for every op must implement each op the
        flags route to (``"cuda"`` has only ``ace_hypergraph``: give it in a dict).
        A named backend that cannot run a call raises ``RuntimeError`` from that
        call, as the op itself does.

    Returns
    -------
    PatchHandle
        ``handle.undo()`` restores everything; ``str(handle)`` / ``handle.summary()``
        lists what was patched, what falls back and what was skipped, with reasons;
        ``handle.stats()`` counts calls. Also a context manager.

    Raises
    ------
    ValueError
        When ``model_or_module`` is not an ``nn.Module``, a flag is not a bool, or
        ``backend`` is not a backend name or an op-to-name dict, or names a backend
        without an op the flags route to.

    Warns
    -----
    UserWarning
        When nothing in the model was recognised.
    """
    if not isinstance(model_or_module, nn.Module):
        raise ValueError(f"argument 'model_or_module': expected a torch.nn.Module, got "
                         f"{type(model_or_module).__name__}")
    # NumPy's bools too, as the ops take them (a NumPy bool was refused as "expected a bool, got bool").
    options = {key: check_bool(key, value) for key, value in
               (("lora", lora), ("hypergraph", hypergraph), ("loss", loss), ("group_qkv", group_qkv))}
    from ace_kernels._dispatch import requested_backend

    if isinstance(backend, dict):
        unknown = [key for key in backend if key not in _FUSED_OPS]
        if unknown:
            raise ValueError(f"argument 'backend': expected keys among {list(_FUSED_OPS)}, got {unknown}")
        for name in backend.values():
            requested_backend(name)
        backend = dict(backend)
        _check_backend_has_ops(backend, options)
    else:
        requested_backend(backend)  # validates the name (ValueError) without fixing the env choice
        _check_backend_has_ops(backend, options)
    handle = PatchHandle(backend)
    handled: set[int] = set()
    # named_modules() visits a parent before its children, so a recogniser that claims
    # children (the q/k/v group) sees them before the per-module recognisers do.
    try:
        for name, module in model_or_module.named_modules():
            for recogniser in _RECOGNISERS:
                if not _family_enabled(recogniser.family, options) or not recogniser.matches(module):
                    continue
                claimed = recogniser.claims(module) if recogniser.claims is not None else [module]
                if any(id(m) in handled for m in claimed):
                    continue
                recogniser.install(name, module, handle, options)
                handled.update(id(m) for m in claimed)
                if any(m is module for m in claimed):
                    break
    except BaseException:
        # Nothing half-patched is left behind without a handle to undo it.
        handle.undo()
        raise
    if not handle.records:
        warnings.warn(f"ace_kernels.patch: nothing in this {type(model_or_module).__name__} was recognised (no PEFT or "
                      "reference LoRA linear, reference loss module or open_clip ClipLoss with the flags given): "
                      "it runs as before", stacklevel=2)
    return handle


# ----------------------------------------------------------------------------------------
# GPU benchmark helper (the issue's target: >= 1.3x on a PEFT ViT-B/16 + BERT step)
# ----------------------------------------------------------------------------------------


def benchmark_patch_speedup(*, batch: int = 64, rank: int = 4, dropout: float = 0.1, dtype=torch.bfloat16,
                            steps: int = 20, warmup: int = 5, device: str = "cuda", vision_depth: int = 12,
                            text_layers: int = 12, text_len: int = 256) -> dict[str, Any]:
    """Time a PEFT LoRA ViT-B/16 + BERT-base training step before and after :func:`patch`.

    Builds timm ``VisionTransformer`` (ViT-B/16, 224 px, random weights) and HF
    ``BertModel`` (BERT-base, random weights), wraps both with PEFT LoRA on q/k/v
    (timm's fused ``qkv``; BERT's ``query/key/value``), r=``rank``, ``lora_alpha``
    1, dropout ``dropout``, casts the models to ``dtype``, and times
    forward + backward + AdamW step of the sum of both encoders' mean outputs, in
    the same process: unpatched, patched, unpatched again (the two unpatched
    timings bracket drift). Needs timm, transformers and peft; made for one GPU.

    Returns
    -------
    dict
        ``{"unpatched_ms", "patched_ms", "unpatched_again_ms", "speedup", "stats", "summary", ...}``
    """
    import time

    from peft import LoraConfig, get_peft_model
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=vision_depth, num_heads=12,
                            num_classes=0, global_pool="")
    bert = BertModel(BertConfig(hidden_size=768, num_hidden_layers=text_layers, num_attention_heads=12,
                                intermediate_size=3072, max_position_embeddings=512), add_pooling_layer=False)
    vit = get_peft_model(vit, LoraConfig(r=rank, lora_alpha=1, lora_dropout=dropout, target_modules=["qkv"]))
    bert = get_peft_model(bert, LoraConfig(r=rank, lora_alpha=1, lora_dropout=dropout,
                                           target_modules=["query", "key", "value"]))
    models = nn.ModuleList([vit, bert]).to(device=device, dtype=dtype).train()
    params = [p for p in models.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    images = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    tokens = torch.randint(1, 30000, (batch, text_len), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = vit(images).float().mean() + bert(input_ids=tokens).last_hidden_state.float().mean()
        out.backward()
        optimizer.step()

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    def timed():
        for _ in range(warmup):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return (time.perf_counter() - start) / steps * 1e3

    before = timed()
    handle = patch(models)
    handle.reset_stats()
    after = timed()
    stats = handle.stats()
    summary = handle.summary()
    handle.undo()
    again = timed()
    return {"unpatched_ms": before, "patched_ms": after, "unpatched_again_ms": again,
            "speedup": min(before, again) / after, "stats": stats, "summary": summary, "batch": batch,
            "rank": rank, "dropout": dropout, "dtype": str(dtype),
            "device_name": torch.cuda.get_device_name() if device == "cuda" else device}
