"""label_guided_infonce(group=) on CPU with gloo: 2 and 3 processes versus one process on the concatenated batch."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ace_kernels
from _contrastive_dist_worker import make_global_batch, run, run_mismatch

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# Each rank's share is summed in a different order than the single-process loss,
# and the embedding gradients pass one all-reduce: a few fp64 ulps of O(1) values.
ATOL = 1e-10
JOIN_TIMEOUT_S = 120


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(target, world, args):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, world) + args) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(JOIN_TIMEOUT_S)
    hung = [p for p in procs if p.is_alive()]
    for proc in hung:
        proc.kill()
        proc.join()
    assert not hung, f"{len(hung)} rank(s) did not finish within {JOIN_TIMEOUT_S}s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


CASES = [
    ("2_ranks_labels", (9, 9), True),
    ("3_ranks_labels_uneven", (5, 1, 8), True),
    ("3_ranks_no_labels", (6, 6, 6), False),
]


@pytest.mark.parametrize("name,sizes,with_labels", CASES, ids=[c[0] for c in CASES])
def test_global_loss_and_gradients_match_single_process(name, sizes, with_labels, tmp_path):
    dim = 12
    _spawn(run, len(sizes), (_free_port(), sizes, dim, with_labels, str(tmp_path)))
    u, t, labels = make_global_batch(sizes, dim, with_labels)
    u.requires_grad_()
    t.requires_grad_()
    scale = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    loss = ace_kernels.label_guided_infonce(u, t, scale, labels, backend="torch")
    loss.backward()

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(sizes))]
    lo = 0
    for rank, (result, size) in enumerate(zip(results, sizes)):
        # Every rank returns the global loss.
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=0, atol=ATOL)
        # Local embeddings get exactly the gradient of the global loss.
        torch.testing.assert_close(result["grad_u"], u.grad[lo:lo + size], rtol=0, atol=ATOL)
        torch.testing.assert_close(result["grad_t"], t.grad[lo:lo + size], rtol=0, atol=ATOL)
        lo += size
    # logit_scale: the SUM over ranks is the single-process gradient (documented convention).
    summed = sum(r["grad_scale"] for r in results)
    torch.testing.assert_close(summed, scale.grad, rtol=0, atol=ATOL)


def test_cross_rank_duplicates_are_masked(tmp_path):
    # Guard that the test above can fail: the same batch without global label keys
    # (per-rank local losses) differs from the global loss.
    sizes = (9, 9)
    u, t, labels = make_global_batch(sizes, 12, True)
    global_loss = ace_kernels.label_guided_infonce(u, t, 30.0, labels, backend="torch")
    local = [ace_kernels.label_guided_infonce(u[a:b], t[a:b], 30.0, labels[a:b], backend="torch")
             for a, b in [(0, 9), (9, 18)]]
    assert abs(global_loss.item() - sum(local).item() / 2) > 1e-3


def test_mismatched_ranks_raise_on_every_rank(tmp_path):
    _spawn(run_mismatch, 2, (_free_port(), str(tmp_path)))
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert "embedding dim" in messages[0] and "[8, 9]" in messages[0]


@pytest.mark.triton
@pytest.mark.interpreter
def test_triton_backend_across_ranks(tmp_path):
    # The Triton kernels (the interpreter here) on the owned-share path, 2 uneven ranks, fp32.
    sizes, dim = (7, 12), 20
    _spawn(run, 2, (_free_port(), sizes, dim, True, str(tmp_path), "triton", torch.float32))
    u, t, labels = make_global_batch(sizes, dim, True)
    u.requires_grad_()
    t.requires_grad_()
    scale = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    loss = ace_kernels.label_guided_infonce(u, t, scale, labels, backend="torch")
    loss.backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # fp32 kernels versus the fp64 single-process loss: logits up to 30 carry ~30 * 6e-8 each.
    atol = 2e-5
    lo = 0
    for result, size in zip(results, sizes):
        torch.testing.assert_close(result["loss"].double(), loss.detach(), rtol=0, atol=atol)
        torch.testing.assert_close(result["grad_u"].double(), u.grad[lo:lo + size], rtol=0, atol=atol)
        torch.testing.assert_close(result["grad_t"].double(), t.grad[lo:lo + size], rtol=0, atol=atol)
        lo += size
    summed = sum(r["grad_scale"].double() for r in results)
    torch.testing.assert_close(summed, scale.grad, rtol=0, atol=atol)
