"""fp64 dense oracle for ACE-HGNN, written straight from spec section 4.

Deliberately naive and independent of ace_kernels: per sample it builds the
N x N score matrix, keeps the top-k with torch.topk, scatters them into a -inf
matrix, takes the softmax, sets the self loops, copies the CLS row into
column 0 and runs the two dense matmuls.
"""

import torch
import torch.nn.functional as F


def oracle_adapter(z, down_w, down_b, up_w, up_b):
    h = z @ down_w.T + down_b
    h = torch.where(h >= 0, h, 0.2 * h)
    return h @ up_w.T + up_b


def oracle_incidence(x_b, c_b, topk):
    """The dense N x N matrix A of one sample (steps 1-5)."""
    n = x_b.shape[0]
    opts = dict(dtype=x_b.dtype, device=x_b.device)
    p = F.normalize(x_b[1:], dim=-1)
    s_pp = p @ p.T
    neg_inf = torch.tensor(float("-inf"), **opts)
    top_row = torch.cat([neg_inf.view(1), c_b])
    rest = torch.cat([torch.full((n - 1, 1), float("-inf"), **opts), s_pp], dim=1)
    scores = torch.cat([top_row.view(1, n), rest], dim=0)
    eye = torch.eye(n, dtype=torch.bool, device=x_b.device)
    scores = torch.where(eye, neg_inf, scores)
    vals, idx = torch.topk(scores, topk, dim=1)
    kept = torch.full((n, n), float("-inf"), **opts).scatter(1, idx, vals)
    a = torch.softmax(kept, dim=1)
    a = torch.where(eye, torch.ones((), **opts), a)
    col0 = torch.cat([a[0, :1], a[0, 1:]])  # A[i, 0] = A[0, i] for i >= 1; A[0, 0] stays 1
    a = torch.cat([col0.view(n, 1), a[:, 1:]], dim=1)
    return a


def oracle_hypergraph(x, cls_attn, edge, node, topk):
    """Full output [B, N, D] in the dtype of the inputs (use float64)."""
    outs = []
    for b in range(x.shape[0]):
        a = oracle_incidence(x[b], cls_attn[b], topk)
        e = a @ x[b]
        e = oracle_adapter(e, *edge)
        ctx = a.T @ e
        outs.append(oracle_adapter(ctx, *node))
    return torch.stack(outs)
