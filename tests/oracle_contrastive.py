"""Dense fp64 oracle of the label-guided InfoNCE loss, written from spec section 5.

Deliberately naive: the full B x B logits, the label-equality mask built by
comparing label rows element by element, and two cross-entropies. Shares no
code with ace_kernels.
"""

import torch
import torch.nn.functional as F


def label_guided_infonce_oracle(image_emb, text_emb, logit_scale, labels=None):
    """Loss in fp64; differentiable w.r.t. its (fp64) inputs."""
    u = image_emb.double()
    t = text_emb.double()
    if isinstance(logit_scale, torch.Tensor):
        s = logit_scale.double().reshape(())
    else:
        s = torch.tensor(float(logit_scale), dtype=torch.float64)
    logits = s * u @ t.T
    batch = u.shape[0]
    if labels is not None:
        rows = labels.reshape(batch, -1)
        same_labels = (rows[:, None, :] == rows[None, :, :]).all(dim=-1)
        off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=u.device)
        logits = logits.masked_fill(same_labels & off_diagonal, float("-inf"))
    target = torch.arange(batch, device=u.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
