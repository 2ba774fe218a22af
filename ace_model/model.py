"""ACE-LoRA on BiomedCLIP, composed from the ``ace_kernels`` functionals.

The frozen base is built offline through open_clip from the configs shipped in
``ace_model/configs`` (see :func:`build_base_model`). :class:`ACELoRA` does not
patch that model: it runs its own forward over the base's frozen modules, so that

- q, k and v of every attention layer come from one ``ace_kernels.lora_qkv`` call
  (LoRA with r=4, scaling alpha/sqrt(r)=0.5, an independent dropout mask per
  projection; spec section 2);
- attention runs through ``F.scaled_dot_product_attention``, and the last layer's
  CLS attention row (pre-softmax, head-averaged, row 0 without column 0; for text
  before the padding mask) is computed from q and k as ``q_0 . k_j``, without an
  N x N score matrix (spec section 3); ``text_attention="reference-code"`` takes the
  text row as the published code does instead (masked softmax probabilities);
- the token features go through one ACE-HGNN per encoder
  (``ace_kernels.ace_hypergraph``, ``cls_only`` for the embeddings; spec section 4)
  and the loss is ``ace_kernels.label_guided_infonce`` (spec section 5).

Layer order in the released checkpoint is text layers first, then vision layers;
:mod:`ace_model.checkpoint` does that mapping.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import ace_kernels
from ace_kernels._checks import check_bool, check_finite_number, check_positive_int, check_probability, check_tensor

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
CONFIG_NAMES = ("biomedclip", "tiny")
TOKENIZER_DIR = CONFIG_ROOT / "tokenizer"

LORA_RANK = 4
LORA_ALPHA = 1.0
LORA_DROPOUT = 0.1
HGNN_TOPK = 5
RECOMPUTE_MODES = ("none", "mlp", "layer")
# The ace_kernels ops the model calls: its backend must be one all of them have.
_MODEL_OPS = ("lora_qkv", "ace_hypergraph", "label_guided_infonce")

_TINY_VIT_NAME = "ace_vit_tiny_patch8_32"


# ----------------------------------------------------------------------------------------
# The frozen base model
# ----------------------------------------------------------------------------------------


def _register_tiny_vit() -> None:
    """Register the tiny test ViT with timm (2 blocks, width 64, 32 px, patch 8: 17 tokens)."""
    import timm
    from timm.models import register_model

    if _TINY_VIT_NAME in timm.list_models(_TINY_VIT_NAME):
        return
    from timm.models.vision_transformer import VisionTransformer

    def ace_vit_tiny_patch8_32(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{_TINY_VIT_NAME} has no pretrained weights")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        kwargs = {**dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0), **kwargs}
        model = VisionTransformer(**kwargs)
        model.default_cfg = model.pretrained_cfg = {"input_size": (3, 32, 32), "num_classes": 0}
        return model

    ace_vit_tiny_patch8_32.__module__ = "ace_model.model"
    register_model(ace_vit_tiny_patch8_32)


def _read_open_clip_config(name: str) -> tuple[Path, dict]:
    if name not in CONFIG_NAMES:
        raise ValueError(f"argument 'name': expected one of {CONFIG_NAMES}, got {name!r}")
    directory = CONFIG_ROOT / name
    with open(directory / "open_clip_config.json", encoding="utf-8") as handle:
        return directory, json.load(handle)


class _TimmTower(nn.Module):
    """open_clip's TimmModel layout (``trunk`` + ``head.drop``/``head.proj``), without open_clip."""

    def __init__(self, timm_name: str, embed_dim: int):
        super().__init__()
        import timm

        self.trunk = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="")
        self.head = nn.Sequential(OrderedDict(
            drop=nn.Dropout(0.0), proj=nn.Linear(self.trunk.num_features, embed_dim, bias=False)))


class _HFTextTower(nn.Module):
    """open_clip's HFTextEncoder layout (``transformer`` + MLP ``proj``), without open_clip."""

    def __init__(self, bert_config, embed_dim: int):
        super().__init__()
        from transformers import BertModel

        self.config = bert_config
        self.transformer = BertModel(bert_config, add_pooling_layer=False)
        width = bert_config.hidden_size
        hidden = (width + embed_dim) // 2
        self.proj = nn.Sequential(
            nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))


class _PlainCLIP(nn.Module):
    """Same parameter names and shapes as open_clip's CustomTextCLIP for this config."""

    def __init__(self, model_cfg: dict, bert_config):
        super().__init__()
        embed_dim = model_cfg["embed_dim"]
        self.visual = _TimmTower(model_cfg["vision_cfg"]["timm_model_name"], embed_dim)
        self.text = _HFTextTower(bert_config, embed_dim)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def reset_parameters(self) -> None:
        # Its own parameter only (its towers' modules have their own): the value of construction.
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1 / 0.07))


def build_base_model(name: str, *, use_open_clip: bool | None = None) -> nn.Module:
    """Build the frozen CLIP base of config ``name`` with random weights, offline.

    It sets ``HF_HUB_OFFLINE=1`` in the environment, for the rest of the process, unless it
    is set already: export ``HF_HUB_OFFLINE=0`` first to keep the Hugging Face hub reachable.

    Parameters
    ----------
    name : {"biomedclip", "tiny"}
        Shipped config under ``ace_model/configs/<name>``.
    use_open_clip : bool or None
        ``None`` (default): through ``open_clip.create_model("local-dir:...")`` when
        open_clip is importable, else through timm + transformers directly (same
        parameter names and shapes); also the latter, with a warning, when an installed
        open_clip fails to import or to build the model (e.g. a timm older than it
        needs). ``True``/``False`` force one path (errors raise).

    Returns
    -------
    nn.Module
        A model with ``visual.trunk`` (timm ViT), ``visual.head.proj``,
        ``text.transformer`` (HF BERT), ``text.proj`` (MLP) and ``logit_scale`` (a log).
    """
    # Offline for the rest of the process unless the caller set it (HF_HUB_OFFLINE=0 keeps the hub).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory, config = _read_open_clip_config(name)
    if use_open_clip is not None:  # a string such as "false" took the open_clip path, being truthy
        use_open_clip = check_bool("use_open_clip", use_open_clip)
    model_cfg = config["model_cfg"]
    if name == "tiny":
        _register_tiny_vit()
    text_dir = str(directory / model_cfg["text_cfg"]["hf_model_name"])
    auto = use_open_clip is None
    if auto:
        try:
            import open_clip  # noqa: F401

            use_open_clip = True
        except ImportError:
            use_open_clip = False
        except Exception as exc:  # installed but broken (e.g. against this timm)
            warnings.warn(f"open_clip failed to import ({type(exc).__name__}: {exc}); building {name!r} "
                          "through timm + transformers directly", stacklevel=2)
            use_open_clip = False
    model = None
    if use_open_clip:
        import open_clip

        # The shipped config names the BERT config directory relative to itself; hand open_clip
        # the absolute path so it never falls back to the hub.
        text_cfg = dict(model_cfg["text_cfg"], hf_model_name=text_dir, hf_tokenizer_name=str(TOKENIZER_DIR),
                        hf_model_pretrained=False)
        # open_clip warns that the local dir holds no weights: random weights are the point here.
        root_logger = logging.getLogger()
        level = root_logger.level
        root_logger.setLevel(max(level, logging.ERROR))
        try:
            model = open_clip.create_model(
                f"local-dir:{directory}", pretrained_text=False, pretrained_image=False, text_cfg=text_cfg)
        except Exception as exc:
            if not auto:
                raise
            warnings.warn(f"open_clip could not build {name!r} ({type(exc).__name__}: {exc}); building it "
                          "through timm + transformers directly", stacklevel=2)
        finally:
            root_logger.setLevel(level)
    if model is None:
        from transformers import BertConfig

        model = _PlainCLIP(model_cfg, BertConfig.from_pretrained(text_dir))
    return model


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    from ace_model.checkpoint import load_weights_only, read_model_file

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return read_model_file(lambda: load_file(str(path), device="cpu"), ValueError,
                               f"pretrained checkpoint {path}", "a safetensors file")
    # The CRC-32s checked first: a bit flipped in BiomedCLIP's weights would load as another number (the cost is one
    # more read of the file).
    state = read_model_file(lambda: load_weights_only(path), ValueError,
                            f"pretrained checkpoint {path}", "a torch checkpoint", check_zip=path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained checkpoint {path}: expected a state dict, got {type(state).__name__}")
    _check_open_clip_state_dict(state, path)
    return state


def _check_open_clip_state_dict(state: dict, path: Path) -> None:
    """Refuse, in one line, a dict that is not ``{str: Tensor}`` (e.g. a released ACE-LoRA file)."""
    problem = None
    if {"weights", "metadata"} <= set(state) and isinstance(state.get("weights"), dict):
        problem = "it has the released ACE-LoRA layout ('weights' and 'metadata')"
    else:
        for key, value in state.items():
            if not isinstance(key, str):
                problem = f"key {key!r} is of type {type(key).__name__}, not a parameter name (str)"
                break
            if not isinstance(value, torch.Tensor):
                problem = f"key {key!r} holds a value of type {type(value).__name__}, not a tensor"
                break
    if problem is not None:
        raise ValueError(f"pretrained checkpoint {path}: not an open_clip state dict ({problem}); "
                         "a released-format ACE-LoRA checkpoint (e.g. ACE_LoRA.pt) holds only the trainable "
                         "weights: give it to --checkpoint (zero-shot) or --init-checkpoint (train), or "
                         "ACELoRA.load_reference_checkpoint")


_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                 "pytorch_model.bin", "open_clip_pytorch_model.pt")


def _tokenizer_files_in(directory: Path) -> bool:
    return (directory / "vocab.txt").is_file() or (directory / "tokenizer.json").is_file()


def resolve_pretrained(pretrained: str | os.PathLike) -> tuple[Path, Path | None]:
    """Return (weights file, tokenizer dir or None) for a checkpoint file or an HF-format dir
    (for a file: its directory, when that holds ``vocab.txt`` or ``tokenizer.json``)."""
    path = Path(pretrained)
    if path.is_dir():
        for candidate in _WEIGHT_FILES:
            if (path / candidate).is_file():
                weights = path / candidate
                break
        else:
            raise FileNotFoundError(
                f"pretrained directory {path} holds none of the weight files {list(_WEIGHT_FILES)}")
        return weights, (path if _tokenizer_files_in(path) else None)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    return path, (path.parent if _tokenizer_files_in(path.parent) else None)


def load_base_weights(base: nn.Module, pretrained: str | os.PathLike) -> Path | None:
    """Copy an open_clip state dict into ``base``, checking every key and shape first.

    Raises
    ------
    ValueError
        Naming the first key that is missing, unexpected, or of the wrong shape, with
        the expected and found shapes. Nothing is copied unless every key matches. Also
        naming the file when it is no ``{name: tensor}`` dict (e.g. a released ACE-LoRA
        checkpoint, which belongs to ``load_reference_checkpoint``).
    """
    weights_path, tokenizer_dir = resolve_pretrained(pretrained)
    state = _load_state_dict_file(weights_path)
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    expected = base.state_dict()
    for key, value in state.items():
        if key not in expected:
            # Older transformers stored these index buffers; they are constants.
            if key.endswith("position_ids") or key.endswith("token_type_ids"):
                continue
            raise ValueError(f"pretrained checkpoint {weights_path}: unexpected key {key!r} "
                             f"(found shape {tuple(value.shape)}; this architecture has no such weight)")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"pretrained checkpoint {weights_path}: key {key!r} has the wrong shape: "
                             f"expected {tuple(expected[key].shape)}, found {tuple(value.shape)}")
    for key, value in expected.items():
        if key not in state:
            raise ValueError(f"pretrained checkpoint {weights_path}: missing key {key!r} "
                             f"(expected shape {tuple(value.shape)})")
    for key, target in expected.items():  # values: a copy_ would turn an integer into a weight silently
        value = state[key]
        if value.is_floating_point() != target.is_floating_point() or value.is_complex():
            raise ValueError(f"pretrained checkpoint {weights_path}: key {key!r} holds {value.dtype} values, "
                             f"expected {'floating-point' if target.is_floating_point() else 'integer'} ones")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"pretrained checkpoint {weights_path}: key {key!r} holds non-finite values "
                             "(NaN or inf)")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])
    return tokenizer_dir


# ----------------------------------------------------------------------------------------
# Trainable pieces
# ----------------------------------------------------------------------------------------


class LoRAQKV(nn.Module):
    """LoRA factors for the q, k and v projections of one attention layer.

    ``lora_a[p]`` is A_p in R^{r x in}, ``lora_b[p]`` is B_p in R^{out x r}, p = q, k, v;
    the frozen base weight and bias are passed at call time (spec section 2).
    """

    def __init__(self, in_features: int, out_features: int, rank: int = LORA_RANK,
                 alpha: float = LORA_ALPHA, dropout: float = LORA_DROPOUT):
        super().__init__()
        in_features = check_positive_int("in_features", in_features)
        out_features = check_positive_int("out_features", out_features)
        rank = check_positive_int("rank", rank)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling = check_finite_number("alpha", alpha) / math.sqrt(rank)  # rsLoRA-style, as the reference (quirk)
        self.dropout_p = check_probability("dropout", dropout)
        self.lora_a = nn.Parameter(torch.empty(3, rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(3, out_features, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each projection is initialised as its own nn.Linear-style A (fan_in = in_features).
        for p in range(3):
            nn.init.kaiming_uniform_(self.lora_a.data[p], a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Under autocast lora_qkv casts its operands to the autocast dtype itself, as nn.Linear
        # would (LayerNorm hands it fp32; the fp32 master factors get the gradients).
        lora_a, lora_b = self.lora_a, self.lora_b
        return ace_kernels.lora_qkv(x, weight, bias, lora_a, lora_b, scaling=self.scaling,
                                    dropout_p=self.dropout_p, training=self.training, backend=backend)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.rank}, "
                f"scaling={self.scaling}, dropout={self.dropout_p}")


def _layer_norm_then(norm: nn.Module, then: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = norm(x)
    return a, then(a)


class _Recomputed(torch.autograd.Function):
    """``fn(x)`` whose intermediates are not kept: the backward runs ``fn`` again from ``x``.

    Only ``x`` is saved. The rerun happens under the forward's autocast state and the
    backward goes through the same autograd formulas and kernels as an ordinary call, so the
    gradient of ``x`` is that of ``fn(x)`` bit for bit (given deterministic kernels). ``fn`` must
    draw no random numbers, may have no parameters that require grad (see
    :func:`_maybe_recomputed`) and may return a tensor or a tuple of tensors.
    """

    @staticmethod
    def forward(ctx, fn, x):
        device = x.device.type
        ctx.fn = fn
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                        torch.is_autocast_cache_enabled())
        ctx.save_for_backward(x)
        return fn(x)

    @staticmethod
    def backward(ctx, *grads):
        (x,) = ctx.saved_tensors
        device, enabled, dtype, cache = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=cache):
            x = x.detach().requires_grad_(True)
            outs = ctx.fn(x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(out, grad) for out, grad in zip(outs, grads) if grad is not None and out.requires_grad]
        if not pairs:
            return None, None
        (grad_x,) = torch.autograd.grad([out for out, _ in pairs], x, [grad for _, grad in pairs])
        return None, grad_x


def _maybe_recomputed(recompute: bool, fn, x: torch.Tensor, modules: tuple[nn.Module, ...]):
    """``fn(x)``, through :class:`_Recomputed` when ``recompute`` and autograd records.

    ``modules`` are those ``fn`` calls: the rerun gives a gradient to ``x`` only, so none of
    their parameters may require grad.
    """
    if not (recompute and torch.is_grad_enabled() and x.requires_grad):
        return fn(x)
    for module in modules:
        if any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"recompute='mlp': {type(module).__name__} has parameters that require grad; only a "
                             "frozen MLP input side is rerun in the backward (recompute='layer' reruns any)")
    return _Recomputed.apply(fn, x)


TEXT_ATTENTION = ("spec", "reference-code")


def _check_tower_input(name: str, value, weight: torch.Tensor) -> None:
    """``value`` a dense tensor on the device of its tower's first ``weight``: torch raises an AttributeError
    for a non-tensor and an error of its own from inside the tower for another device, or, for token ids on
    the meta device with the model on the CPU, returns uninitialised memory as the embeddings."""
    check_tensor(name, value, dtypes=None)
    if value.device != weight.device:
        raise ValueError(f"argument '{name}': expected a tensor on {weight.device} (the model's device), "
                         f"got {value.device}")


def cls_probability_row(q: torch.Tensor, k: torch.Tensor, key_keep: torch.Tensor) -> torch.Tensor:
    """Post-softmax CLS attention row averaged over heads, without column 0 (the published
    code's text row: its ``BertAttentionLoRA`` returns the masked attention probabilities).

    q, k: ``[B, H, N, d]``; key_keep: bool, broadcastable to ``[B, 1, 1, N]`` (False: padding).
    Returns ``mean_h softmax_j(q[b,h,0] . k[b,h,j] / sqrt(d), padding masked)[1:]``, ``[B, N-1]``,
    in float32 (a 16-bit row would round the top-k's input). Padding is masked with float32's
    lowest value, as BERT's additive mask: an all-padding row is uniform, not NaN."""
    head_dim = q.shape[-1]
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float()) * (1.0 / math.sqrt(head_dim))
        scores = scores.masked_fill(~key_keep.reshape(key_keep.shape[0], 1, -1), torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1).mean(dim=1)[:, 1:]


def cls_attention_row(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Pre-softmax CLS attention row averaged over heads, without column 0.

    q, k: ``[B, H, N, d]``. Returns ``c[b, j-1] = mean_h q[b,h,0] . k[b,h,j] / sqrt(d)`` for
    j = 1..N-1, shape ``[B, N-1]``: only row 0 of the score matrix is ever formed. In float32
    for 16-bit q and k too (under autocast as well): a 16-bit row would round the top-k's input
    (about one bf16 row in thirty selected other tokens than float32 in a test of random rows).
    """
    heads, head_dim = q.shape[1], q.shape[-1]
    with torch.autocast(q.device.type, enabled=False):
        wide = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64
        rows = torch.einsum("bhd,bhnd->bn", q[:, :, 0].to(wide), k[:, :, 1:].to(wide))
        return rows * (1.0 / (heads * math.sqrt(head_dim)))


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


class ACELoRA(nn.Module):
    """BiomedCLIP with ACE-LoRA: LoRA on q/k/v, two ACE-HGNNs, label-guided InfoNCE.

    Build it with :meth:`from_config`. Only the LoRA factors, the four adapters and the
    logit multiplier require grad (969,217 parameters for ``biomedclip``).

    Attributes
    ----------
    clip : nn.Module
        The frozen base (open_clip CustomTextCLIP layout).
    image_lora, text_lora : nn.ModuleList of LoRAQKV
        One per attention layer.
    image_hgnn, text_hgnn : ace_kernels.ACEHypergraph
    logit_scale : nn.Parameter
        The multiplier itself, ``exp`` of the base's stored log scale (spec section 1).
    backend : {"auto", "triton", "torch"}
        Passed to every ace_kernels call (checked when set: "cuda" is refused, as only
        ``ace_hypergraph`` has it; "auto" takes it there where it was measured faster).
    text_attention : {"spec", "reference-code"}
        ``"spec"`` (default): the text tower's CLS row is the pre-softmax scaled scores before
        the padding mask (spec section 3) and BERT keeps its attention-probability and
        attention-output dropouts. ``"reference-code"``: what the published code computes (its
        ``BertAttentionLoRA`` replaces every BERT attention): the row is the head-averaged
        post-softmax probabilities with padding masked, and neither dropout is applied. The
        released weights were trained that way; the spec describes the other. The image side is
        the same in both.
    recompute : {"none", "mlp", "layer"}
        What the backward recomputes instead of keeping (losses and gradients unchanged, bit for
        bit). ``"mlp"``: each layer's MLP input side (the ViT block's ``norm2 -> fc1 -> GELU``,
        the BERT layer's attention-output LayerNorm and intermediate dense + GELU) keeps only its
        float32 input, which the LayerNorm keeps anyway, and is rerun: the GELU's input (4 x
        width per token, in the autocast dtype) is not kept; one more fc1 GEMM per layer.
        ``"layer"``: each transformer layer keeps only its input and is rerun whole in the
        backward (``torch.utils.checkpoint``, non-reentrant), its random draws (LoRA, attention
        and hidden dropout) replayed from the generator states of the forward; one more forward
        of the towers. ``"none"`` by default.
    image_size, context_length, embed_dim : int
    """

    def __init__(self, base: nn.Module, config_name: str, *, tokenizer_dir: Path | None = None,
                 adapter_hidden: int | None = None, rank: int = LORA_RANK, lora_dropout: float = LORA_DROPOUT,
                 topk: int = HGNN_TOPK, backend: str = "auto", recompute: str = "none",
                 text_attention: str = "spec"):
        super().__init__()
        # Named here: the config, the adapters and the towers would fail under other names (the config's
        # 'name', ACEHypergraph's 'hidden') or as an AttributeError from the attribute lookups below.
        if config_name not in CONFIG_NAMES:
            raise ValueError(f"argument 'config_name': expected one of {CONFIG_NAMES}, got {config_name!r}")
        if adapter_hidden is not None:
            adapter_hidden = check_positive_int("adapter_hidden", adapter_hidden)
        if not all(isinstance(getattr(getattr(base, tower, None), part, None), nn.Module)
                   for tower, part in (("visual", "trunk"), ("visual", "head"), ("text", "transformer"),
                                       ("text", "proj"))):
            raise ValueError(f"argument 'base': expected a CLIP base as build_base_model builds it (visual.trunk, "
                             f"visual.head, text.transformer, text.proj), got {type(base).__name__}")
        self.text_attention = text_attention  # validated by the property
        self.config_name = config_name
        self.backend = backend
        self.recompute = recompute
        rank = check_positive_int("rank", rank)
        lora_dropout = check_probability("lora_dropout", lora_dropout)
        self.clip = base
        for p in self.clip.parameters():
            p.requires_grad_(False)

        trunk = self.vision_trunk
        bert = self.text_transformer
        self.embed_dim = self.clip.visual.head.proj.out_features
        self.image_size = int(trunk.patch_embed.img_size[0])
        self.context_length = int(_read_open_clip_config(config_name)[1]["model_cfg"]["text_cfg"]["context_length"])
        self.pad_token_id = int(bert.config.pad_token_id or 0)
        self.vocab_size = int(bert.config.vocab_size)
        self.text_hidden_dropout = float(bert.config.hidden_dropout_prob)
        self.text_attention_dropout = float(bert.config.attention_probs_dropout_prob)
        self._tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else TOKENIZER_DIR
        self._tokenizer = None

        vit_width = trunk.embed_dim
        bert_width = bert.config.hidden_size
        self.image_lora = nn.ModuleList(
            LoRAQKV(vit_width, vit_width, rank, dropout=lora_dropout) for _ in trunk.blocks)
        self.text_lora = nn.ModuleList(
            LoRAQKV(bert_width, bert_width, rank, dropout=lora_dropout) for _ in bert.encoder.layer)
        hidden = adapter_hidden if adapter_hidden is not None else self.embed_dim // 4
        self.image_hgnn = ace_kernels.ACEHypergraph(dim=self.embed_dim, hidden=hidden, topk=topk)
        self.text_hgnn = ace_kernels.ACEHypergraph(dim=self.embed_dim, hidden=hidden, topk=topk)
        self.logit_scale = nn.Parameter(self.clip.logit_scale.detach().clone().float().exp())
        # What reset_parameters sets it to again: its value here. A base on the meta device has no value yet:
        # that of its random init, log(1 / 0.07) (_PlainCLIP's and open_clip's), stands in.
        self._logit_scale_init = (
            torch.full(self.logit_scale.shape, math.log(1 / 0.07), dtype=torch.float32, device="cpu").exp()
            if self.logit_scale.is_meta else self.logit_scale.detach().clone())
        # Metadata of the last released-format checkpoint loaded, written back on save so
        # that a load/save round trip is exact (see ace_model.checkpoint).
        self.reference_metadata: dict | None = None

    def reset_parameters(self) -> None:
        """Set ``logit_scale`` (this module's own parameter) back to its value at construction, the
        LoRA factors and adapters having their own ``reset_parameters`` (FSDP's meta-device
        materialisation calls it on each module with parameters; the frozen base's are its own)."""
        with torch.no_grad():
            self.logit_scale.copy_(self._logit_scale_init)

    def extra_repr(self) -> str:
        # The settings that change what runs, when not the defaults (the tree below shows the modules only).
        settings = [f"config={self.config_name!r}"]
        for name, value, default in (("backend", self.backend, "auto"), ("text_attention", self.text_attention, "spec"),
                                     ("recompute", self.recompute, "none")):
            if value != default:
                settings.append(f"{name}={value!r}")
        return ", ".join(settings)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_config(cls, name: str, pretrained: str | os.PathLike | None = None, *,
                    backend: str = "auto", use_open_clip: bool | None = None,
                    recompute: str = "none", text_attention: str = "spec") -> "ACELoRA":
        """Build ACE-LoRA on the shipped config ``name`` ("biomedclip" or "tiny").

        Parameters
        ----------
        name : {"biomedclip", "tiny"}
        pretrained : path, optional
            A local open_clip checkpoint file (``.bin``/``.pt``/``.safetensors``) or an
            HF-format directory holding one (the first found of ``open_clip_model.safetensors``,
            ``open_clip_pytorch_model.bin``, ``model.safetensors``, ``pytorch_model.bin``,
            ``open_clip_pytorch_model.pt``). A directory with ``vocab.txt`` or
            ``tokenizer.json`` also supplies the tokenizer (real BiomedCLIP weights need
            the real PubMedBERT vocabulary). ``None``: random base weights.
        backend : str
            ace_kernels backend for every op call.
        use_open_clip : bool or None
            How the frozen towers are built: see :func:`build_base_model` (``None``: through
            open_clip when it imports, else timm + transformers directly).
        recompute : {"none", "mlp", "layer"}
            See the class attribute: less activation memory, the same numbers.
        text_attention : {"spec", "reference-code"}
            See the class attribute: the text tower's CLS row and attention dropouts.
        """
        _, config = _read_open_clip_config(name)
        base = build_base_model(name, use_open_clip=use_open_clip)
        tokenizer_dir = None
        if pretrained is not None:
            tokenizer_dir = load_base_weights(base, pretrained)
            if tokenizer_dir is None and name == "biomedclip":
                warnings.warn(f"pretrained weights {os.fspath(pretrained)!r} come with no vocab.txt or tokenizer.json "
                              "(beside the file, or in the directory): texts are tokenised with the small stand-in "
                              "vocabulary shipped for tests, not PubMedBERT's, so the token ids do not match the "
                              "weights' embeddings; put the tokenizer files beside the weights", UserWarning,
                              stacklevel=2)
        extra = config.get("ace_lora", {})
        return cls(base, name, tokenizer_dir=tokenizer_dir, adapter_hidden=extra.get("adapter_hidden"),
                   backend=backend, recompute=recompute, text_attention=text_attention)

    # -- the text tower's attention (spec or published code) -----------------------------

    @property
    def text_attention(self) -> str:
        return self._text_attention

    @text_attention.setter
    def text_attention(self, value: str) -> None:
        if value not in TEXT_ATTENTION:
            raise ValueError(f"argument 'text_attention': expected one of {TEXT_ATTENTION}, got {value!r}")
        self._text_attention = value

    # -- backend --------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = ace_kernels._dispatch.check_backend(value, ops=_MODEL_OPS)

    # -- recomputation ------------------------------------------------------------------

    @property
    def recompute(self) -> str:
        return self._recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"argument 'recompute': expected one of {', '.join(map(repr, RECOMPUTE_MODES))}, "
                             f"got {mode!r}")
        self._recompute = mode

    def _layer(self, run, *args):
        """``run(*args)`` (one transformer layer), through ``torch.utils.checkpoint`` when
        ``recompute == "layer"`` and autograd records."""
        if self._recompute == "layer" and torch.is_grad_enabled():
            return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
        return run(*args)

    # -- frozen towers --------------------------------------------------------------------

    @property
    def vision_trunk(self) -> nn.Module:
        return self.clip.visual.trunk

    @property
    def text_transformer(self) -> nn.Module:
        return self.clip.text.transformer

    # -- trainable parameters -----------------------------------------------------------

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) for the LoRA factors, the adapters and the logit multiplier."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.named_trainable_parameters()}

    # -- frozen weights -------------------------------------------------------------------

    def cast_frozen_weights(self, dtype: torch.dtype) -> "ACELoRA":
        """Store the frozen base's matmul weights (the weights and biases of every ``nn.Linear``
        and ``nn.Conv2d`` of :attr:`clip`) in ``dtype``; returns ``self``.

        For a model that runs only under ``torch.autocast(dtype=dtype)``, as ``train`` runs it
        on a GPU with bf16 (``zero_shot.evaluate`` runs such a model under that autocast too).
        Autocast casts those weights to its dtype at
        every use, and the copy made for a frozen layer is kept for the backward (``dX = dY W``);
        stored in ``dtype`` they are used as they are. The values are the same bit for bit (the
        cast rounds the same way), so losses and gradients are unchanged, without the casts of
        every step or the copies they keep alive (about 282 MiB for ``biomedclip`` in bf16, and
        half the frozen weights' own memory; not the text layers' q, k and v weights, which
        :meth:`text_tokens` stacks into a new tensor at every call, kept for the backward in
        either case but in the first layer, nor the patch embedding's or the first vision
        layer's qkv, whose inputs need no gradient). LayerNorms,
        embeddings, positional and class embeddings and every trainable parameter keep their
        dtype (autocast computes with those in float32). Outside autocast the model no longer
        runs (those float32 layers and the ``dtype`` weights meet in one product): the encoders
        say so instead of failing inside.
        """
        if dtype not in (torch.bfloat16, torch.float16):  # autocast's dtypes
            raise ValueError(f"argument 'dtype': expected torch.bfloat16 or torch.float16 (an autocast dtype), "
                             f"got {dtype!r}")
        params = [(module, name, param) for module in self.clip.modules()
                  if isinstance(module, (nn.Linear, nn.Conv2d))
                  for name, param in module.named_parameters(recurse=False)]
        # A weight tied to another kind of module (an embedding, say) would change that one too.
        elsewhere = {id(param) for module in self.clip.modules()
                     if not isinstance(module, (nn.Linear, nn.Conv2d)) for param in module.parameters(recurse=False)}
        for module, name, param in params:  # checked before any is cast: nothing half done
            if param.requires_grad:
                raise ValueError(f"cast_frozen_weights: {type(module).__name__}.{name} requires grad; "
                                 "only the frozen base's weights can be cast")
            if id(param) in elsewhere:
                raise ValueError(f"cast_frozen_weights: {type(module).__name__}.{name} is tied to a parameter of "
                                 "a module that is neither nn.Linear nor nn.Conv2d; it is left to autocast")
        for _, _, param in params:
            param.data = param.data.to(dtype)
        return self

    @property
    def frozen_weights_dtype(self) -> torch.dtype | None:
        """The dtype the frozen matmul weights are stored in when it is not the rest of the
        model's (:meth:`cast_frozen_weights`; read from the weights, so a later ``.float()``
        undoes it); None when the whole base has one dtype."""
        pairs = ((self.vision_trunk.patch_embed.proj.weight, self.vision_trunk.norm),
                 (self.text_transformer.encoder.layer[0].attention.self.query.weight,
                  self.text_transformer.embeddings.LayerNorm))
        for weight, norm in pairs:
            norm_weight = getattr(norm, "weight", None)
            reference = norm_weight.dtype if isinstance(norm_weight, torch.Tensor) else self.logit_scale.dtype
            if weight.dtype != reference:
                return weight.dtype
        return None

    def _check_autocast(self, device: torch.device) -> None:
        frozen = self.frozen_weights_dtype
        if frozen is None:
            return
        if not (torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == frozen):
            raise RuntimeError(f"ACELoRA: the frozen weights are stored in {frozen} (cast_frozen_weights), so the "
                               f"model runs only under torch.autocast({device.type!r}, dtype={frozen})")

    # -- tokenizer ----------------------------------------------------------------------

    def tokenizer(self):
        """The text tokenizer: ``tok(list_of_str) -> LongTensor [B, context_length]``."""
        if self._tokenizer is None:
            from ace_model.data import TextTokenizer

            self._tokenizer = TextTokenizer(self._tokenizer_dir, self.context_length,
                                            image_size=self.image_size)
        return self._tokenizer

    # -- encoders: token features and CLS rows --------------------------------------------

    def image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All image tokens through the head, L2-normalised, and the last layer's CLS row.

        Parameters
        ----------
        images : Tensor ``[B, 3, H, W]``, preprocessed (OpenAI CLIP mean/std).

        Returns
        -------
        tokens : ``[B, N, D]`` (N = 197 for biomedclip), c : ``[B, N-1]``.
        """
        size = self.image_size
        weight = self.vision_trunk.patch_embed.proj.weight
        _check_tower_input("images", images, weight)
        if images.ndim != 4 or images.shape[1:] != (3, size, size) or images.shape[0] == 0:
            raise ValueError(f"argument 'images': expected shape [B, 3, {size}, {size}] with B >= 1, "
                             f"got {list(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"argument 'images': expected preprocessed floating-point images, got {images.dtype}")
        self._check_autocast(images.device)
        if images.dtype != weight.dtype and ace_kernels._library.autocast_dtype(images) is None:
            # Outside autocast the patch embedding's convolution takes its weight's dtype only (autocast_dtype:
            # torch.is_autocast_enabled raises for the meta device).
            raise ValueError(f"argument 'images': expected dtype {str(weight.dtype).replace('torch.', '')} (the "
                             f"dtype of the model's weights; or run under torch.autocast), got "
                             f"{str(images.dtype).replace('torch.', '')}")
        trunk = self.vision_trunk
        x = trunk.patch_embed(images)
        x = trunk._pos_embed(x)
        x = trunk.patch_drop(x)
        x = trunk.norm_pre(x)
        cls_row = None
        last = len(trunk.blocks) - 1
        for index, (block, lora) in enumerate(zip(trunk.blocks, self.image_lora)):
            x, row = self._layer(self._vit_block, block, lora, x, index == last)
            if row is not None:
                cls_row = row
        x = trunk.norm(x)
        tokens = self.clip.visual.head(x)
        return F.normalize(tokens, dim=-1), cls_row

    def _vit_block(self, block: nn.Module, lora: LoRAQKV, x: torch.Tensor, need_cls_row: bool):
        attn = block.attn
        batch, length, width = x.shape
        h = block.norm1(x)
        q, k, v = lora(h.reshape(batch * length, width), attn.qkv.weight, attn.qkv.bias, self.backend)
        heads = attn.num_heads
        q, k, v = (t.reshape(batch, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = attn.q_norm(q), attn.k_norm(k)
        cls_row = cls_attention_row(q, k) if need_cls_row else None
        drop = attn.attn_drop.p if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        o = o.transpose(1, 2).reshape(batch, length, -1)
        o = attn.norm(o)
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(h).sigmoid()
        o = attn.proj_drop(attn.proj(o))
        x = x + block.drop_path1(block.ls1(o))
        mlp = block.mlp  # timm's Mlp.forward, its first three steps rerun in the backward if asked
        h = _maybe_recomputed(self._recompute == "mlp", lambda t: mlp.act(mlp.fc1(block.norm2(t))), x,
                              (block.norm2, mlp.fc1, mlp.act))
        h = mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(h))))
        x = x + block.drop_path2(block.ls2(h))
        return x, cls_row

    def text_tokens(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All text tokens (padding included) through the MLP projection, L2-normalised,
        and the last layer's CLS row (``text_attention``: "spec", pre-softmax before the padding
        mask; "reference-code", the masked softmax probabilities).

        Parameters
        ----------
        token_ids : LongTensor ``[B, L]`` (L = 256 for biomedclip), pad id 0.

        Returns
        -------
        tokens : ``[B, L, D]``, c : ``[B, L-1]``.
        """
        _check_tower_input("token_ids", token_ids, self.text_transformer.embeddings.word_embeddings.weight)
        if token_ids.ndim != 2 or token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"argument 'token_ids': expected an integer tensor [B, L], got "
                             f"{token_ids.dtype} {list(token_ids.shape)}")
        if token_ids.shape[1] != self.context_length or token_ids.shape[0] == 0:
            # Padding tokens take part in the hypergraph and the CLS row (spec section 3): the same text
            # padded to another length gets another embedding.
            raise ValueError(f"argument 'token_ids': expected [B, {self.context_length}] with B >= 1 (the "
                             f"tokenizer's context length; the padding is part of the embedding), got "
                             f"{list(token_ids.shape)}")
        self._check_autocast(token_ids.device)
        bert = self.text_transformer
        token_ids = token_ids.long()
        key_keep = (token_ids != self.pad_token_id)[:, None, None, :]  # [B, 1, 1, L]
        x = self._bert_embeddings(bert.embeddings, token_ids)
        cls_row = None
        last = len(bert.encoder.layer) - 1
        for index, (layer, lora) in enumerate(zip(bert.encoder.layer, self.text_lora)):
            x, row = self._layer(self._bert_layer, layer, lora, x, key_keep, index == last)
            if row is not None:
                cls_row = row
        tokens = self.clip.text.proj(x)
        return F.normalize(tokens, dim=-1), cls_row

    def _bert_embeddings(self, emb: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        # BERT's embedding sum, written out so that its dropout follows text_hidden_dropout
        # like every other dropout of the frozen text tower.
        length = token_ids.shape[1]
        positions = torch.arange(length, device=token_ids.device)
        x = (emb.word_embeddings(token_ids) + emb.token_type_embeddings(torch.zeros_like(token_ids))
             + emb.position_embeddings(positions)[None])
        x = emb.LayerNorm(x)
        return F.dropout(x, self.text_hidden_dropout, self.training)

    def _bert_layer(self, layer: nn.Module, lora: LoRAQKV, x: torch.Tensor, key_keep: torch.Tensor,
                    need_cls_row: bool):
        self_attn = layer.attention.self
        batch, length, width = x.shape
        # BERT keeps q, k, v as separate linears; stack their frozen weights for one call.
        weight = torch.cat([self_attn.query.weight, self_attn.key.weight, self_attn.value.weight])
        bias = torch.cat([self_attn.query.bias, self_attn.key.bias, self_attn.value.bias])
        q, k, v = lora(x.reshape(batch * length, width), weight, bias, self.backend)
        heads = self_attn.num_attention_heads
        q, k, v = (t.reshape(batch, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        published = self.text_attention == "reference-code"
        if not need_cls_row:
            cls_row = None
        elif published:
            cls_row = cls_probability_row(q, k, key_keep)
        else:
            cls_row = cls_attention_row(q, k)
        # The published code's BertAttentionLoRA has no dropout on the probabilities nor after
        # the attention output's dense layer; BERT's own layers (spec) have both.
        drop = self.text_attention_dropout if self.training and not published else 0.0
        # BERT's additive mask (the dtype's lowest value on padding keys), not a boolean one: the same
        # output where a row keeps a key, and a row of padding only attends uniformly, as transformers'
        # BERT (the towers' own forward) does, where SDPA's boolean mask gave it a zero attention output.
        mask = torch.zeros(key_keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~key_keep,
                                                                                      torch.finfo(q.dtype).min)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        o = o.transpose(1, 2).reshape(batch, length, width)
        hidden_drop = self.text_hidden_dropout if self.training else 0.0
        out = layer.attention.output
        attn_out = out.dense(o)
        if not published:
            attn_out = F.dropout(attn_out, hidden_drop, self.training)
        s = attn_out + x
        a, inter = _maybe_recomputed(self._recompute == "mlp",
                                     lambda t: _layer_norm_then(out.LayerNorm, layer.intermediate, t), s,
                                     (out.LayerNorm, layer.intermediate))
        final = layer.output
        y = final.LayerNorm(F.dropout(final.dense(inter), hidden_drop, self.training) + a)
        return y, cls_row

    # -- ACE-HGNN heads -------------------------------------------------------------------

    @property
    def topk(self) -> int:
        """The hypergraphs' k: their modules' ``topk``, which the released format records once, so
        a model whose image and text modules differ has none (a ValueError)."""
        if self.image_hgnn.topk != self.text_hgnn.topk:
            raise ValueError(f"ACELoRA.topk: image_hgnn.topk={self.image_hgnn.topk} and text_hgnn.topk="
                             f"{self.text_hgnn.topk} differ; the released format records one k")
        return self.image_hgnn.topk

    def _hgnn(self, module: nn.Module, tokens: torch.Tensor, cls_row: torch.Tensor, cls_only: bool):
        # The module's own topk and deterministic: what it shows is what runs.
        return module(tokens, cls_row, cls_only=cls_only, backend=self.backend)

    def image_head(self, tokens: torch.Tensor, cls_row: torch.Tensor, *, cls_only: bool = True) -> torch.Tensor:
        """Image ACE-HGNN, then L2-normalise: ``[B, D]`` (cls_only) or ``[B, N, D]``."""
        return F.normalize(self._hgnn(self.image_hgnn, tokens, cls_row, cls_only), dim=-1)

    def text_head(self, tokens: torch.Tensor, cls_row: torch.Tensor, *, cls_only: bool = True) -> torch.Tensor:
        """Text ACE-HGNN, then L2-normalise: ``[B, D]`` (cls_only) or ``[B, L, D]``."""
        return F.normalize(self._hgnn(self.text_hgnn, tokens, cls_row, cls_only), dim=-1)

    def encode_image(self, images: torch.Tensor, *, all_tokens: bool = False) -> torch.Tensor:
        """Image embeddings ``[B, D]``, normalised, after the image ACE-HGNN (spec 4.7).

        ``all_tokens=True`` returns every token of the HGNN output, ``[B, N, D]``.
        """
        all_tokens = check_bool("all_tokens", all_tokens)  # "False" was taken for its truth: every token
        tokens, cls_row = self.image_tokens(images)
        return self.image_head(tokens, cls_row, cls_only=not all_tokens)

    def encode_text(self, token_ids: torch.Tensor, *, all_tokens: bool = False) -> torch.Tensor:
        """Text embeddings ``[B, D]``, normalised, after the text ACE-HGNN (spec 4.7)."""
        all_tokens = check_bool("all_tokens", all_tokens)
        tokens, cls_row = self.text_tokens(token_ids)
        return self.text_head(tokens, cls_row, cls_only=not all_tokens)

    # -- loss -----------------------------------------------------------------------------

    def loss(self, images: torch.Tensor, token_ids: torch.Tensor, labels: torch.Tensor | None = None,
             group: Any = None) -> torch.Tensor:
        """Label-guided InfoNCE of a batch (plain CLIP loss when ``labels`` is None).

        ``labels`` ``[B, C]``: pairs whose label rows are equal are not negatives of each other
        (``ace_kernels.label_guided_infonce``). Every distinct row is its own class, so the
        reference's 0/1 rows are expected: map uncertain labels (-1) to 0 first, as
        ``ace_model.data`` does (values are not checked here: that would wait on the device).
        """
        if isinstance(images, torch.Tensor) and isinstance(token_ids, torch.Tensor) and images.dim() >= 1 \
                and token_ids.dim() >= 1 and images.shape[0] != token_ids.shape[0]:
            raise ValueError(f"argument 'token_ids': expected {images.shape[0]} rows, one per image of 'images', "
                             f"got {token_ids.shape[0]}")
        image_emb = self.encode_image(images)
        text_emb = self.encode_text(token_ids)
        kwargs = {"backend": self.backend}
        if group is not None:
            kwargs["group"] = group
        return ace_kernels.label_guided_infonce(image_emb, text_emb, self.logit_scale, labels, **kwargs)

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor, labels: torch.Tensor | None = None):
        return self.loss(images, token_ids, labels)

    # -- released checkpoint format -------------------------------------------------------

    def load_reference_checkpoint(self, path: str | os.PathLike) -> dict:
        """Load a released-format ACE-LoRA checkpoint (spec section 7); returns its metadata.

        Only weights are loaded: :attr:`text_attention` stays as it is. When the checkpoint
        records another one (``ace-lora train`` writes it), or one this version does not know, a
        warning says so."""
        from ace_model.checkpoint import load_reference_checkpoint
        from ace_model.training import recorded_text_attention  # here: ace_model.training imports this module

        metadata = load_reference_checkpoint(self, path)
        recorded = recorded_text_attention(metadata)
        if recorded is not None and recorded not in TEXT_ATTENTION:
            warnings.warn(f"{os.fspath(path)}: records text_attention={recorded!r}, which this version does not "
                          f"know (expected one of {TEXT_ATTENTION}); this model computes {self.text_attention!r}",
                          UserWarning, stacklevel=2)
        elif recorded in TEXT_ATTENTION and recorded != self.text_attention:
            warnings.warn(f"{os.fspath(path)}: trained with text_attention={recorded!r}, this model computes "
                          f"{self.text_attention!r}; set model.text_attention = {recorded!r} to evaluate it as "
                          "trained", UserWarning, stacklevel=2)
        return metadata

    def save_reference_checkpoint(self, path: str | os.PathLike | BinaryIO) -> None:
        """Write the trainable weights in the released format: to a file name atomically,
        or into a binary file object open for writing."""
        from ace_model.checkpoint import save_reference_checkpoint

        save_reference_checkpoint(self, path)
