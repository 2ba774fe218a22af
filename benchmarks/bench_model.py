"""The whole ACE-LoRA training step (``ace_model.ACELoRA.loss`` forward+backward).

Baseline "reference-ops": the same model with its three op calls
(``lora_qkv``, ``ace_hypergraph``, ``label_guided_infonce``) answered by the
reference approaches of :mod:`benchmarks.baselines` (three reference LoRA
linears with a dense ``B A`` per step, dense N x N hypergraph on all rows,
dense B x B loss with a host-built mask). Everything else (the frozen towers,
attention, the CLS row) is shared, so the ratio is what the ops buy in a real
step. Throughput is samples/s in ``metrics``.

CPU: the tiny config (2 layers, width 64), fp32. GPU: the full-size
BiomedCLIP architecture at B=64 under bf16 autocast (issue 6's setting:
at least 1.6x the throughput and at most 0.6x the peak memory).
"""

from __future__ import annotations

import contextlib

import torch

import ace_kernels
from benchmarks import baselines
from benchmarks.harness import Target

FAMILY = "model"


@contextlib.contextmanager
def reference_ops():
    """Route ``ace_kernels.lora_qkv/ace_hypergraph/label_guided_infonce`` to the reference approaches.

    ace_model looks these up on the ``ace_kernels`` module at call time, so
    swapping the module attributes swaps the model's ops; they are restored on exit.
    """
    saved = {name: getattr(ace_kernels, name) for name in ("lora_qkv", "ace_hypergraph", "label_guided_infonce")}
    ace_kernels.lora_qkv = baselines.reference_lora_qkv
    ace_kernels.ace_hypergraph = baselines.reference_ace_hypergraph_any_backend
    ace_kernels.label_guided_infonce = baselines.reference_label_guided_infonce_any_backend
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ace_kernels, name, fn)


def _batch(model, batch: int, device, generator):
    size = model.image_size
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    length = model.context_length
    ids = torch.randint(1, model.vocab_size, (batch, length), generator=generator)
    # Reports are shorter than the context: pad the tail of each row with the pad id.
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=generator)
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = model.pad_token_id
    labels = (torch.rand(batch, 14, generator=generator) < 0.15).float()
    return images, ids.to(device), labels.to(device)


def run(suite) -> None:
    try:
        from ace_model.model import ACELoRA
    except Exception as exc:
        suite.skip("model", f"ace_model is not importable ({type(exc).__name__}: {exc})")
        return
    device = suite.device
    if suite.quick:
        name, batch = "tiny", 8
    elif suite.is_gpu:
        name, batch = "biomedclip", 64
    else:
        name, batch = "tiny", 64
    try:
        model = ACELoRA.from_config(name).to(device)
    except Exception as exc:
        suite.skip(f"model {name}", f"could not be built ({type(exc).__name__}: {exc})")
        return
    model.train()
    generator = torch.Generator().manual_seed(3)
    images, ids, labels = _batch(model, batch, device, generator)
    params = model.trainable_parameters()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if suite.is_gpu else contextlib.nullcontext())
    dtype = "bf16-autocast" if suite.is_gpu else "float32"
    shape_text = f"{name} B={batch}"
    if suite.out_of_time(f"model {shape_text}"):
        return
    print(f" training step {shape_text} {dtype}")

    def step_with(backend):
        def step():
            model.backend = backend
            with autocast:
                loss = model.loss(images, ids, labels)
            loss.backward()

        return step

    def metrics_for(meas):
        return {"samples_per_s": round(batch / (meas.median_ms * 1e-3), 2)} if meas.median_ms else {}

    def reference_step():
        with reference_ops():
            step_with("torch")()  # the backend is not consulted: the ops are the references

    entries = [("reference-ops", reference_step, params)]
    for provider in suite.providers:
        if suite.provider_can_run(provider, step_with(provider)):
            entries.append((provider, step_with(provider), params))
    base_results, ours = {}, {}
    for name, meas in suite.measure_group(entries).items():
        (base_results if name == "reference-ops" else ours)[name] = (meas, metrics_for(meas))

    def targets(provider, baseline):
        if suite.is_gpu and provider in ("triton", "cuda") and baseline == "reference-ops":
            return [Target("speedup", 1.6, "throughput>=1.6x"), Target("memory_ratio", 1 / 0.6, "mem<=0.6x")]
        return []

    suite.add_rows(family=FAMILY, op="ace_lora_train_step", shape=shape_text, dtype=dtype, ours=ours,
                   baselines=base_results, targets=targets)
    del model
    if suite.is_gpu:
        torch.cuda.empty_cache()
