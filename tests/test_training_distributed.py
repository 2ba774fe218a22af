"""Several processes over torch.distributed (gloo on the CPU), launched the way torchrun does.

Each test starts the ranks of tests/_train_dist_worker.py as subprocesses on 127.0.0.1 and
compares with one process on the concatenated batch computed here.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ace_model import training
from ace_model.training import TrainConfig, read_metrics, train
from _train_standin import (
    RandomPairs,
    assert_no_zero_gradient,
    dense_label_infonce,
    make_batch,
    make_model,
    tiny_available,
    trainable_grads,
)

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

WORKER = Path(__file__).with_name("_train_dist_worker.py")
# The tiny ACELoRA when it is importable (the stand-in only as a fallback): each launch
# costs two Python start-ups, so one model kind per test.
KIND = "tiny" if tiny_available() else "standin"
LAUNCH_TIMEOUT_S = 240  # generous: startup of two Python processes on a loaded 2-core machine


pytestmark = pytest.mark.usefixtures("one_thread")


def _launch(mode: str, world: int, out: Path, *extra: str, argv: list[str] | None = None) -> list[str]:
    """Run ``world`` ranks of the worker in ``mode`` (or of ``argv``, a command of its own), as
    torchrun would, and return their outputs; each must exit 0.

    As under torchrun, the launcher (this process) serves the rendezvous store and every rank is
    a client of it (TORCHELASTIC_USE_AGENT_STORE): a rank 0 that served the store itself could
    tear its server down while the other ranks still used it, and once aborted at exit
    ("terminate called without an active exception") after a correct run.
    """
    store = torch.distributed.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=LAUNCH_TIMEOUT_S))
    command = argv or [sys.executable, str(WORKER), "--mode", mode, "--out", str(out), *extra]
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                   TORCHELASTIC_USE_AGENT_STORE="True")
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        del store  # the server stops once no rank can still reach it
    for rank, (proc, text) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{text[-3000:]}"
    return outputs


def test_the_training_device_becomes_current_in_a_group_the_caller_made(monkeypatch):
    """NCCL collectives use the current CUDA device: in a group the caller created without
    set_device, every rank's checks went through cuda:0 while its model trained on its own GPU
    (NCCL then fails or hangs). Emulated: the calls are recorded, no GPU is needed."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(torch.device(device)))
    monkeypatch.setattr(training.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(training.dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(training.dist, "get_world_size", lambda group=None: 2)
    assert training._init_distributed(torch.device("cuda", 1), 10.0) == (training.dist.group.WORLD, 1, 2, False)
    assert calls == [torch.device("cuda", 1)]
    training._init_distributed(torch.device("cpu"), 10.0)
    assert calls == [torch.device("cuda", 1)]  # nothing on the CPU


def test_a_rank_failing_its_first_checks_in_the_callers_group_tells_them_on_its_own_device(monkeypatch):
    """A rank whose settings fail train()'s first checks tells the others in the caller's group;
    on NCCL that exchange goes through the current CUDA device, which the rank had not made its
    training device (as _init_distributed does): in a script that never set it, cuda:0 on every
    rank, beside rank 0's own exchange there. Emulated: the calls are recorded, no GPU is needed."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(torch.device(device)))
    monkeypatch.setattr(training.dist, "is_initialized", lambda: True)

    def fail_together(error, group, what):
        calls.append(what)
        raise error

    monkeypatch.setattr(training, "_fail_together", fail_together)
    config = TrainConfig(csv="unused.csv", out_dir="unused")
    with pytest.raises(ValueError, match="its own"):
        training._fail_before_setup(ValueError("its own"), config, torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1), "setting up the run (model, data and checks)"]
    calls.clear()
    with pytest.raises(ValueError, match="its own"):
        training._fail_before_setup(ValueError("its own"), config, torch.device("cpu"))
    assert calls == ["setting up the run (model, data and checks)"]  # nothing on the CPU


def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    """Chunked step, dropout on, labels repeated across ranks: loss and every gradient."""
    kind = KIND
    world, global_batch, chunk = 2, 10, 2
    _launch("step", world, tmp_path, "--kind", kind, "--global-batch", str(global_batch), "--chunk", str(chunk))

    model = make_model(kind, seed=0, dropout=0.3, perturb=True)  # as the worker: lora_a gets a gradient
    images, token_ids, labels = make_batch(model, global_batch, seed=1)
    local = global_batch // world
    # One graph over the global batch; each rank's slice draws its dropout masks from
    # that rank's seed, chunk by chunk, as the rank did.
    image_parts, text_parts = [], []
    for rank in range(world):
        torch.manual_seed(100 + rank)
        for lo in range(rank * local, (rank + 1) * local, chunk):
            hi = min(lo + chunk, (rank + 1) * local)
            image_parts.append(model.encode_image(images[lo:hi]))
            text_parts.append(model.encode_text(token_ids[lo:hi]))
    loss = dense_label_infonce(torch.cat(image_parts), torch.cat(text_parts),
                               training.logit_scale_parameter(model), labels)
    loss.backward()
    want = trainable_grads(model)
    assert_no_zero_gradient(want)

    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        # fp32: the global loss is a sum of per-rank shares and the gradients sums over
        # ranks, so only the summation order differs from the single process.
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got["grads"][name], want[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")


def _one_process_config(out_dir, kind: str) -> TrainConfig:
    """The one-process run the 2-rank runs are compared with: the worker's settings (tests/_train_dist_worker.py's
    _train_run), unchunked, on the CPU as the ranks are ("auto" would train on a GPU, in bf16 autocast)."""
    return TrainConfig(out_dir=str(out_dir), model=kind, epochs=2, batch_size=8, chunk_size=None, checkpoint_every=3,
                       progress=False, seed=3, lr=1e-2, device="cpu")


def test_two_rank_training_run_equals_one_process(tmp_path):
    """``train()`` on 2 gloo ranks (global batch 8, chunked) vs 1 process: losses step for step."""
    kind = KIND
    _launch("train", 2, tmp_path, "--kind", kind, "--chunk", "3")
    dist_losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]

    model = make_model(kind, seed=0, dropout=0.0, perturb=True)  # as the worker
    data = RandomPairs(model, 20, seed=2)
    # From the first step on every trainable, lora_a included, has a gradient to get right.
    first = copy.deepcopy(model)
    first.loss(*(t[:8] for t in (data.images, data.token_ids, data.labels))).backward()
    assert_no_zero_gradient(trainable_grads(first))
    del first
    result = train(_one_process_config(tmp_path / "single", kind), model=model, dataset=data)
    single_losses = [r["loss"] for r in read_metrics(result["metrics"])]
    assert len(dist_losses) == len(single_losses) == 4
    # Summation order differs (per-rank shares, chunked backward); Adam over 4 steps
    # keeps that at the level of fp32 rounding.
    assert dist_losses == pytest.approx(single_losses, rel=1e-5, abs=1e-6)
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    for name, p in training.trainable_named_parameters(model):
        # Adam's first steps move each weight by about lr * sign(g) whatever |g| is, so an
        # entry whose gradient is nearly zero turns ulp-level summation differences into
        # differences of a small fraction of lr (1e-2): 1e-4 absolute is 1% of one step.
        torch.testing.assert_close(final[name], p.detach(), rtol=1e-5, atol=1e-4)
    # The distributed run wrote one set of checkpoints, with every rank's RNG state.
    state = training.load_state(tmp_path / "run" / "checkpoints" / "state-00000004.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank dropout streams
    assert state["chunk_sizes"] == [3, 3]  # every rank's (a resume compares each rank's own)


def test_a_local_loss_run_equals_one_process_averaging_the_slices_losses(tmp_path):
    """``loss_scope="local"`` (the paper's multi-GPU recipe): each rank's loss over its own slice,
    gradients averaged. One process reproduces it with a loss that is the mean of the two slices'
    losses (rank r holds rows r*4 .. r*4+3 of each global batch of 8): losses step for step and the
    final weights."""
    import ace_kernels

    kind = KIND
    _launch("train", 2, tmp_path, "--kind", kind, "--chunk", "3", "--loss-scope", "local")
    # The gradient norm too: Adam's steps hardly depend on the gradients' scale, so the losses
    # and weights alone would not tell an average over the ranks from a sum.
    dist_losses = [(r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]

    def per_slice_loss(image_emb, text_emb, logit_scale, labels=None):
        halves = [slice(0, 4), slice(4, 8)]
        return sum(ace_kernels.label_guided_infonce(image_emb[h], text_emb[h], logit_scale,
                                                    None if labels is None else labels[h]) for h in halves) / 2

    runs = {}
    for name, loss_fn in (("local", per_slice_loss), ("global", None)):
        model = make_model(kind, seed=0, dropout=0.0, perturb=True)  # as the worker
        result = train(_one_process_config(tmp_path / name, kind), model=model, dataset=RandomPairs(model, 20, seed=2),
                       loss_fn=loss_fn)
        runs[name] = model, [(r["loss"], r["grad_norm"]) for r in read_metrics(result["metrics"])]
    model, single_losses = runs["local"]
    assert len(dist_losses) == len(single_losses) == 4
    for got, want in zip(dist_losses, single_losses, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    # Not the global loss: each slice meets its own negatives only.
    assert abs(dist_losses[0][0] - runs["global"][1][0][0]) > 1e-2
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    for name, p in training.trainable_named_parameters(model):
        torch.testing.assert_close(final[name], p.detach(), rtol=1e-5, atol=1e-4)  # as in the global test
    state = training.load_state(tmp_path / "run" / "checkpoints" / "state-00000004.pt")
    assert state["config"]["loss_scope"] == "local"


def test_ranks_may_differ_in_chunk_size_with_a_frozen_tower(tmp_path):
    """The README lets --chunk-size differ between ranks. With a frozen text tower, rank 0
    chunked (its loss gets leaves that need a gradient) and rank 1 running the one-pass step
    (the frozen tower's output as it was) made every rank raise at the first step that they
    disagree on whether text_emb requires grad. The run equals one process's, step for step."""
    _launch("frozen_text_tower", 2, tmp_path, "--kind", "standin", "--chunk", "3")
    dist_losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    model = make_model("standin", seed=0, dropout=0.0, perturb=True)  # as the worker
    model.text_head.requires_grad_(False)
    result = train(_one_process_config(tmp_path / "single", "standin"), model=model,
                   dataset=RandomPairs(model, 20, seed=2))
    single_losses = [r["loss"] for r in read_metrics(result["metrics"])]
    assert len(dist_losses) == len(single_losses) == 4
    assert dist_losses == pytest.approx(single_losses, rel=1e-5, abs=1e-6)
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert final.keys() == {n for n, _ in training.trainable_named_parameters(model)}
    for name, p in training.trainable_named_parameters(model):
        torch.testing.assert_close(final[name], p.detach(), rtol=1e-5, atol=1e-4)  # as in the tests above


def test_a_resumed_two_rank_run_continues_every_ranks_dropout_stream(tmp_path):
    """Each rank draws its own dropout masks; the state holds every rank's generator and a resume
    restores each rank's own: the resumed run's losses are the uninterrupted run's, step for step."""
    _launch("resume_exact", 2, tmp_path, "--kind", KIND, "--chunk", "3")
    losses = torch.load(tmp_path / "losses.pt", weights_only=True)
    assert len(losses["through"]) == 4 and losses["resumed"] == losses["through"]


def test_ranks_that_disagree_fail_clearly_instead_of_hanging(tmp_path):
    """One launch: first a step with unequal local batches, then one with a different loss scope on
    rank 1 (rank 0 waited in the loss's collectives until the timeout), then train() with a different
    lr on rank 1, then with a different loss scope (each rank would take its own, so it must agree too)."""
    _launch("mismatch", 2, tmp_path)
    for rank in range(2):
        for what, pattern in (("batch", "local batch size"),
                              ("step-scope", "'loss scope' differs (rank 0: 'global', rank 1: 'local'"),
                              ("config", "'lr' differs (rank 0: 0.01, rank 1: 0.02"),
                              ("scope", "'loss_scope' differs (rank 0: 'global', rank 1: 'local'")):
            message = (tmp_path / f"rank{rank}-{what}.err").read_text()
            assert "ranks disagree" in message and pattern in message, message


def test_resume_and_setup_disagreements_fail_on_every_rank(tmp_path):
    """One launch: a short run writes checkpoints; then rank 0 resumes it while rank 1 starts
    afresh (a node without the shared directory); then rank 1 alone fails a check (its batch
    size does not divide over the ranks), and rank 0 must not wait for it; then both resume at
    the same step from states whose weights differ (each rank loads its own); then both resume a
    state written by one process, and then the run's own state with the other loss scope (one
    process may change it, several may not): refused on every rank, saying why."""
    _launch("resume_mismatch", 2, tmp_path)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}-resume.err").read_text()
        assert "ranks disagree on the point the run resumes from" in message and "'resumed'" in message, message
    assert "must divide evenly" in (tmp_path / "rank1-setup.err").read_text()
    assert "another rank failed setting up the run" in (tmp_path / "rank0-setup.err").read_text()
    for rank in range(2):
        message = (tmp_path / f"rank{rank}-weights.err").read_text()
        assert "ranks disagree on the point the run resumes from: field 'trainable weights'" in message, message
        message = (tmp_path / f"rank{rank}-world.err").read_text()
        assert message.startswith("TrainingStateError: resume from ") and message.endswith(
            "state-one-process.pt: the state was written by 1 processes, this run has 2"), message
        message = (tmp_path / f"rank{rank}-scope.err").read_text()
        assert message.startswith("TrainingStateError: resume from ") and message.endswith(
            ": TrainConfig.loss_scope was 'global' in the saved run, now 'local'; resuming would not continue the "
            "same run"), message


def test_a_rank_that_fails_alone_stops_every_rank(tmp_path):
    """One launch: rank 0's checkpoint write fails (a full disk), then rank 1 alone fails to build
    its dataset. Each time the failing rank raises its own error and the other one an error saying
    so, instead of waiting in the next collective (the workers' group times out after 30 s)."""
    _launch("rank_failures", 2, tmp_path, "--kind", "standin")
    errors = {(rank, what): (tmp_path / f"rank{rank}-{what}.err").read_text()
              for rank in range(2) for what in ("write", "build", "prepare", "metrics", "load", "start", "final")}
    assert errors[0, "write"] == "OSError: [Errno 28] No space left on device (simulated)", errors
    assert errors[1, "write"].startswith("RankMismatchError: another rank failed writing the metrics or the "
                                         "checkpoint of step 3 on rank 0"), errors
    assert errors[1, "build"].startswith("ValueError: TrainConfig.csv: "), errors
    assert errors[0, "build"].startswith("RankMismatchError: another rank failed setting up the run"), errors
    full = "OSError: [Errno 28] No space left on device (simulated)"
    assert errors[0, "prepare"] == full and errors[0, "final"] == full, errors
    assert errors[1, "prepare"].startswith("RankMismatchError: another rank failed preparing the run directory"), errors
    assert errors[0, "metrics"].startswith("OSError: [Errno 28] No space left on device"), errors
    assert errors[1, "metrics"].startswith("RankMismatchError: another rank failed preparing the run directory"), errors
    assert errors[1, "start"] == "OSError: [Errno 24] too many open files (simulated)", errors
    assert errors[0, "start"].startswith("RankMismatchError: another rank failed loading the batch of step 1 "), errors
    assert errors[1, "load"] == "OSError: [Errno 5] cannot read image (simulated)", errors
    assert errors[0, "load"].startswith("RankMismatchError: another rank failed loading the batch of step 2 "), errors
    assert errors[1, "final"].startswith("RankMismatchError: another rank failed writing the last metrics or the "
                                         "final ace_lora.pt"), errors


def test_only_rank_0_needs_a_writable_run_directory(tmp_path):
    """Only rank 0 writes the run directory, but every rank probed it for writing (a folder made there and
    removed) before the set-up: a rank whose node sees it read-only stopped the run, through train() (here)
    and through ace-lora train (the next test). Now rank 0 alone checks it; the run equals the one where every
    rank may write."""
    _launch("read_only_out_dir", 2, tmp_path, "--kind", "standin", "--chunk", "3")
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (tmp_path / "final.pt").is_file() and (tmp_path / "run" / "ace_lora.pt").is_file()


def test_samples_per_s_counts_the_global_batch_of_every_rank(tmp_path):
    """A step record's samples_per_s is the run's: the global batch (TrainConfig.batch_size, every
    rank's slice) over the step's time, not the slice of the rank that writes it. Every rank's clock
    moves 0.25 s at each reading, so each step takes 0.25 s: 8 samples on 2 ranks are 32 a second
    (one rank's 4, 16)."""
    _launch("step_time", 2, tmp_path, "--kind", "standin", "--chunk", "3", "--clock-step", "0.25")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["samples_per_s"] for r in records] == [8 / 0.25] * 4


@pytest.mark.skipif(KIND != "tiny", reason="needs the tiny ACELoRA (open_clip and timm): the command line builds it")
def test_only_rank_0_needs_a_writable_out_dir_through_the_command_line(tmp_path):
    """As above, through ace-lora train (the test returned early, as passed, without the tiny ACELoRA)."""
    from ace_model.data import make_synthetic_dataset

    csv_path = make_synthetic_dataset(tmp_path / "data", 16, seed=1)
    out = tmp_path / "cli-run"
    out.mkdir()  # (read-only for rank 1)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import _train_dist_worker
        from _dist_exit import exit_now
        from ace_model import cli
        if os.environ["RANK"] == "1":
            _train_dist_worker._read_only_below({str(out)!r})
        status = cli.main(["train", "--csv", {str(csv_path)!r}, "--model", "tiny", "--out-dir", {str(out)!r},
                           "--batch-size", "8", "--max-steps", "2", "--device", "cpu", "--no-progress"])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    """)
    _launch("cli", 2, out, argv=[sys.executable, "-c", script])
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_every_rank_names_the_state_rank_0_wrote(tmp_path):
    """Rank 0 writes the states, but only rank 0 knew their paths: the other ranks' train() returned
    state and reference None, and after a non-finite loss their error said "Last good state: none
    written" where rank 0's named the state of step 3."""
    _launch("last_state", 2, tmp_path, "--kind", "standin")
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert results[0]["state"] == str(tmp_path / "run" / "checkpoints" / "state-00000004.pt"), results
    assert results[1] == results[0], results
    for rank in range(2):
        message = (tmp_path / f"rank{rank}-nan.err").read_text()
        assert message.startswith("NonFiniteLossError: non-finite loss at step 4 "), message
        assert f"Last good state: {tmp_path / 'run2' / 'checkpoints' / 'state-00000003.pt'};" in message, message


def test_a_rank_whose_own_settings_fail_the_first_checks_stops_every_rank(tmp_path):
    """Per-rank settings (chunk_size, device) are checked by train() before the set-up: a rank
    that failed them raised at once without telling the others, which waited for it in the group's
    rendezvous (a group train() creates) or in the set-up's first exchange (the caller's group) until the
    timeout, then failed with gloo's own error. Now they stop at once, saying a rank failed its set-up."""
    # Two launches: a process's second group on the same store is not a fresh rendezvous.
    _launch("early_failure_joined", 2, tmp_path, "--kind", "standin")
    _launch("early_failure_created", 2, tmp_path, "--kind", "standin")
    errors = {(rank, what): (tmp_path / f"rank{rank}-{what}.err").read_text()
              for rank in range(2) for what in ("created", "device")}
    assert errors[1, "created"].startswith("ValueError: TrainConfig.chunk_size: expected >= 1"), errors
    assert errors[0, "created"].startswith("RankMismatchError: another rank failed setting up the run"), errors
    assert errors[0, "device"].startswith("ValueError: TrainConfig.device: 'cuda:99'"), errors
    assert errors[1, "device"].startswith("RankMismatchError: another rank failed setting up the run"), errors
    assert not (tmp_path / "run").exists()  # nothing written


def _two_simulated_ranks(monkeypatch, all_gather, other_text: str | None = None) -> None:
    """This process as rank 0 of two over gloo, ``all_gather`` standing in for the collective and,
    with ``other_text``, rank 1's text of a differing field in the object gather."""
    monkeypatch.setattr(training.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(training.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(training.dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(training.dist, "all_gather", all_gather)
    if other_text is not None:
        monkeypatch.setattr(training.dist, "all_gather_object", lambda objects, obj, group=None: objects.__setitem__(
            slice(None), [obj, other_text]))


@pytest.mark.parametrize("differs", ["count", "names"])
def test_check_ranks_agree_with_different_fields_fails_clearly(monkeypatch, differs):
    """Two simulated ranks whose field lists differ (two code versions), in number or, as many,
    in their names: a clear error from the first, fixed-size exchange, before any exchange whose
    size would differ or whose columns would compare one field's value with another's."""
    calls = []

    def all_gather(tensors, tensor, group=None):
        calls.append(tensor.numel())
        tensors[0].copy_(tensor)
        other = tensor.clone()
        if tensor.numel() == 3:
            if differs == "count":
                other[0] += 1  # the other rank checks one field more
            else:  # as many fields, another name among them (the same values): the names' hash differs
                other[1] += 1
        tensors[1].copy_(other)

    _two_simulated_ranks(monkeypatch, all_gather)
    with pytest.raises(training.RankMismatchError, match="they check different fields"):
        training.check_ranks_agree({"a": 1}, group=object())
    assert calls == [3]


def test_check_ranks_agree_needs_one_exchange_when_the_ranks_agree(monkeypatch):
    """The per-step check costs one all-gather of three int64s when the ranks agree (the usual
    case); a differing value costs a second one, of one int64 per field and the names' hash,
    and the error names the field."""
    sent = []
    other_rank = []  # what the simulated rank 1 sends, exchange by exchange

    def all_gather(tensors, tensor, group=None):
        sent.append(tensor.clone())
        tensors[0].copy_(tensor)
        tensors[1].copy_(other_rank[len(sent) - 1] if other_rank else tensor)

    _two_simulated_ranks(monkeypatch, all_gather, other_text="7")
    values = {"local batch size": 5, "labels": "x", "steps": 3}
    training.check_ranks_agree(values, group=object())
    assert [t.numel() for t in sent] == [3]

    # Rank 1's local batch size is 7: rank 1 computes its codes and header the same way.
    codes = [training._stable_hash(list(values)), 7, training._stable_hash("x"), 3]
    other_rank[:] = [torch.tensor([3, codes[0], training._stable_hash(codes)]), torch.tensor(codes)]
    sent.clear()
    with pytest.raises(training.RankMismatchError, match=r"'local batch size' differs \(rank 0: 5, rank 1: 7"):
        training.check_ranks_agree(values, group=object())
    assert [t.numel() for t in sent] == [3, 4]
    assert sent[1].tolist()[1:] == [5, training._stable_hash("x"), 3]


def _capture_first_exchange(monkeypatch, values) -> list:
    """What rank 0 sends in check_ranks_agree's first all-gather (every rank agreeing)."""
    sent = []

    def all_gather(tensors, tensor, group=None):
        sent.append(tensor.tolist())
        for t in tensors:
            t.copy_(tensor)

    _two_simulated_ranks(monkeypatch, all_gather)
    training.check_ranks_agree(values, group=object())
    return sent


def test_equal_numbers_of_other_types_agree(monkeypatch):
    # A config read from JSON on one rank (lr 1) and built in code on another (lr 1.0) is one run.
    assert _capture_first_exchange(monkeypatch, {"lr": 1, "betas": [0.0, 0.9]}) == _capture_first_exchange(
        monkeypatch, {"lr": 1.0, "betas": [0.0, 0.9]})
    assert _capture_first_exchange(monkeypatch, {"lr": 1}) != _capture_first_exchange(monkeypatch, {"lr": 1.5})
    assert _capture_first_exchange(monkeypatch, {"x": 1e20}) == _capture_first_exchange(monkeypatch, {"x": 10**20})
    assert _capture_first_exchange(monkeypatch, {"x": np.True_}) == _capture_first_exchange(monkeypatch, {"x": True})
    assert _capture_first_exchange(monkeypatch, {"x": np.False_}) != _capture_first_exchange(monkeypatch, {"x": True})
    for odd in (10**400, float("nan"), float("inf"), np.float64(2.0), np.int64(3), True):  # no overflow on the way
        _capture_first_exchange(monkeypatch, {"x": odd})
    config = dict(model="standin", lr=1, warmup_epochs=1, betas=(0, 0.9))
    one, other = (training._config_fingerprint(training.TrainConfig(**c), 8, []) for c in (
        config, dict(config, lr=1.0, warmup_epochs=1.0, betas=(0.0, 0.9))))
    assert _capture_first_exchange(monkeypatch, one) == _capture_first_exchange(monkeypatch, other)


def test_a_rank_with_bad_step_inputs_fails_every_rank_at_once(monkeypatch):
    """A rank whose inputs its own checks refuse says so in the step's shape exchange: it raises
    its error, the others a RankMismatchError naming it, instead of waiting in the loss's collectives."""
    model = make_model("standin")
    images, token_ids, labels = make_batch(model, 4)
    bad = {"inputs valid": 0, "local batch size": -2, "image shape": -2, "token shape": -2, "labels": -2,
           "loss scope": -2}
    bad_codes = [training._stable_hash(list(bad)), *bad.values()]
    exchanges = []

    def all_gather(tensors, tensor, group=None):  # rank 1 sends an invalid rank's codes
        exchanges.append(tensor.numel())
        tensors[0].copy_(tensor)
        tensors[1].copy_(torch.tensor([6, bad_codes[0], training._stable_hash(bad_codes)]) if tensor.numel() == 3
                         else torch.tensor(bad_codes))

    _two_simulated_ranks(monkeypatch, all_gather, other_text="0")
    with pytest.raises(training.RankMismatchError, match=r"this step's inputs: field 'inputs valid' differs "
                                                         r"\(rank 0: 1, rank 1: 0"):
        training.chunked_train_step(model, images, token_ids, labels, chunk_size=2, group=object(),
                                    loss_fn=dense_label_infonce)
    assert exchanges == [3, 7]
    # On the rank whose labels are short (or 0-d): its own error, after the same exchange.
    for short in (labels[:3], labels[0, 0]):
        exchanges.clear()
        with pytest.raises(ValueError, match=r"argument 'labels': expected 4 rows like 'images'"):
            training.chunked_train_step(model, images, token_ids, short, chunk_size=2, group=object(),
                                        loss_fn=dense_label_infonce)
        assert exchanges == [3]


def test_sync_gradients_reduces_each_dtype_in_its_own_precision(monkeypatch):
    """Two simulated ranks (the collective doubles its buffer): fp64 gradients keep fp64
    precision, one collective per reduction dtype, bf16 summed in fp32."""
    calls = []

    def all_reduce(tensor, op=None, group=None):
        calls.append(tensor.dtype)
        tensor.mul_(2)  # the other rank holds the same gradient

    monkeypatch.setattr(training.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(training.dist, "all_reduce", all_reduce)
    tiny_step = 1e-12  # far below fp32 resolution at 1.0 (6e-8), well above fp64's (1e-16)
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)),
              torch.nn.Parameter(torch.zeros(2, dtype=torch.float32)),
              torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)),
              torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)),
              torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))]
    params[0].grad = torch.full((3,), 1.0 + tiny_step, dtype=torch.float64)
    params[1].grad = torch.full((2,), 0.25, dtype=torch.float32)
    params[3].grad = torch.full((2,), 0.5, dtype=torch.bfloat16)
    params[4].grad = torch.tensor([-3.0 - tiny_step], dtype=torch.float64)
    training.sync_gradients(params, group=object())
    # One collective per dtype (bf16 joins the fp32 one); which parameters have a gradient on
    # some rank rides in the first.
    assert calls == [torch.float64, torch.float32]
    assert torch.equal(params[0].grad, torch.full((3,), 2 * (1.0 + tiny_step), dtype=torch.float64))
    assert torch.equal(params[4].grad, torch.tensor([2 * (-3.0 - tiny_step)], dtype=torch.float64))
    assert params[2].grad is None  # no rank has one: left for the optimizer to skip, as in one process
    assert torch.equal(params[1].grad, torch.full((2,), 0.5)) and params[3].grad.dtype == torch.bfloat16
    assert torch.equal(params[3].grad, torch.full((2,), 1.0, dtype=torch.bfloat16))
    # average=True: the mean over the ranks (here the gradient itself), the has-a-gradient
    # counts that ride in the first bucket untouched.
    for p, g in zip(params, (1.0 + tiny_step, 0.25, None, 0.5, -3.0 - tiny_step), strict=True):
        p.grad = None if g is None else torch.full(p.shape, g, dtype=p.dtype)
    training.sync_gradients(params, group=object(), average=True)
    assert torch.equal(params[0].grad, torch.full((3,), 1.0 + tiny_step, dtype=torch.float64))
    assert torch.equal(params[1].grad, torch.full((2,), 0.25)) and params[2].grad is None
    assert torch.equal(params[3].grad, torch.full((2,), 0.5, dtype=torch.bfloat16))
    # The other rank has no gradient at all (it contributes zeros, its has-a-gradient count 0): a
    # gradient held by one rank alone is kept, as the sum says.
    monkeypatch.setattr(training.dist, "all_reduce", lambda tensor, op=None, group=None: None)
    for p, g in zip(params, (1.0, 0.25, None, 0.5, -3.0), strict=True):
        p.grad = None if g is None else torch.full(p.shape, g, dtype=p.dtype)
    training.sync_gradients(params, group=object())
    assert [None if p.grad is None else p.grad.flatten()[0].item() for p in params] == [1.0, 0.25, None, 0.5, -3.0]


def test_single_process_helpers_are_no_ops_without_a_group():
    model = make_model("standin")
    images, token_ids, labels = make_batch(model, 4)
    training.chunked_train_step(model, images, token_ids, labels, chunk_size=2, loss_fn=dense_label_infonce)
    before = trainable_grads(model)
    training.sync_gradients([p for _, p in training.trainable_named_parameters(model)], None)
    training.check_ranks_agree({"x": 1}, None)
    after = trainable_grads(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_mismatch_shows_where_the_ranks_values_differ():
    """Two long values that differ near their end read differently in the message (cut at the
    first difference, not at the start)."""
    shapes = repr([(f"layer{i}.lora_A", (4, 768)) for i in range(80)])
    other = shapes.replace("('layer79.lora_A', (4, 768))", "('layer79.lora_A', (8, 768))")
    shown = training._where_they_differ([shapes, other])
    assert shown[0] != shown[1] and shown[0].startswith("...") and "(4, 768)" in shown[0] and "(8, 768)" in shown[1]
    assert training._where_they_differ(["0.01", "0.02"]) == ["0.01", "0.02"]


@pytest.mark.skipif(KIND != "tiny", reason="needs the tiny ACELoRA (open_clip and timm)")
def test_the_command_line_trains_across_processes(tmp_path):
    """`torchrun ... -m ace_model.cli train --csv ...` (the README's command) with 2 gloo ranks on
    a CSV: train() creates the group from torchrun's variables, each rank reads its share of the
    CSV's rows, rank 0 alone writes metrics, states (every rank's RNG in them) and ace_lora.pt."""
    from ace_model.data import make_synthetic_dataset

    csv_path = make_synthetic_dataset(tmp_path / "data", 24, seed=1)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "ace_model.cli", "train", "--csv", str(csv_path), "--model", "tiny",
            "--out-dir", str(out), "--batch-size", "8", "--max-steps", "3", "--chunk-size", "2",
            "--checkpoint-every", "2", "--device", "cpu", "--no-progress"]
    for rank, text in enumerate(_launch("cli", 2, out, argv=argv)):
        assert "Traceback" not in text, f"rank {rank}:\n{text[-3000:]}"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("event") for line in lines if "event" in line] == ["start"]
    assert lines[0]["world_size"] == 2 and lines[0]["chunk_size"] == 2
    steps = read_metrics(out / "metrics.jsonl")
    assert [record["step"] for record in steps] == [1, 2, 3]  # once each: only rank 0 writes
    assert all(math.isfinite(record["loss"]) for record in steps)
    state = training.load_state(out / "checkpoints" / "state-00000003.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert (out / "ace_lora.pt").is_file()


def test_each_rank_draws_its_own_augmentations(tmp_path):
    """The per-batch seed includes the rank: batch k of two ranks draws different numbers."""
    tests = Path(__file__).parent
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(tests)!r})
        import torch
        from _dist_exit import exit_now
        from _train_standin import RandomPairs, make_model
        from ace_model import training
        torch.set_num_threads(1)
        log = os.path.join({str(tmp_path)!r}, "draws-" + os.environ["RANK"])
        class Logging(RandomPairs):
            def __getitem__(self, i):
                with open(log, "a") as h:
                    h.write(repr(torch.rand(()).item()) + "\\n")
                return super().__getitem__(i)
        model = make_model("standin", seed=0)
        # On the CPU over gloo: device "auto" would put rank 1 on cuda:1.
        config = training.TrainConfig(out_dir={str(tmp_path / "run")!r}, model="standin", epochs=1,
                                      batch_size=8, checkpoint_every=0, progress=False, seed=3,
                                      dist_timeout_s=60, device="cpu")
        training.train(config, model=model, dataset=Logging(model, 16, seed=2))
        exit_now()
    """)
    _launch("draws", 2, tmp_path, argv=[sys.executable, "-c", script])
    draws = [(tmp_path / f"draws-{rank}").read_text().split() for rank in (0, 1)]
    assert len(draws[0]) == len(draws[1]) == 8
    assert not set(draws[0]) & set(draws[1])
