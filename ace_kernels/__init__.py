"""ace-kernels: fused kernels for ACE-LoRA training and evaluation.

Three op families, each with an exact PyTorch path and faster GPU backends:

- LoRA matmuls: :func:`lora_linear`, :func:`lora_qkv`
- hyperedge attention (ACE-HGNN): :func:`ace_hypergraph`, :class:`ACEHypergraph`
- label-guided InfoNCE: :func:`label_guided_infonce`, :class:`LabelGuidedInfoNCE`

``import ace_kernels`` never touches the GPU or the compiled extension; see
``python -m ace_kernels.info`` for what can run on this machine.
"""

from ace_kernels._dispatch import BACKENDS, available_backends
from ace_kernels.lora import lora_linear, lora_qkv, lora_qkv_packed
from ace_kernels.hypergraph import ACEHypergraph, ace_hypergraph
from ace_kernels.contrastive import LabelGuidedInfoNCE, label_guided_infonce
from ace_kernels import _dispatch

# Now that every op is declared, the measured backend orders are read (their keys checked against the ops).
_dispatch.load_measured_orders()

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ACEHypergraph",
    "LabelGuidedInfoNCE",
    "ace_hypergraph",
    "available_backends",
    "label_guided_infonce",
    "lora_linear",
    "lora_qkv",
    "lora_qkv_packed",
    "patch",
]


def __getattr__(name):
    # The drop-in patcher pulls in optional integrations; load it on first use.
    if name == "patch":
        from ace_kernels.patching import patch

        return patch
    raise AttributeError(f"module 'ace_kernels' has no attribute {name!r}")
