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

Also the drop-in case of issue 8 (op ``peft_lora_train_step``): a PEFT LoRA
(r=4, q/k/v, dropout 0.1) timm ViT plus HF BERT training step with a CLIP
loss, as PEFT runs it (baseline ``peft``) and after ``ace_kernels.patch``
(provider ``patched:<backend>``). GPU: ViT-B/16 and BERT-base at B=64 under
bf16 autocast (target: at least 1.3x); CPU: two-layer width-64 towers.
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
    _run_ace_lora(suite)
    if not suite.out_of_time("peft_lora_train_step"):
        _run_peft_patch(suite)


def _run_ace_lora(suite) -> None:
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


def _peft_towers(suite):
    """A PEFT-LoRA timm ViT and HF BERT (random weights), q/k/v adapted with r=4, dropout 0.1."""
    import timm
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    full = suite.is_gpu and not suite.quick
    if full:
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        bert_config = BertConfig()  # BERT-base
        image_size, context = 224, 256
    else:
        vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                               num_heads=2, num_classes=0)
        bert_config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=128, max_position_embeddings=64)
        image_size, context = 32, 32
    bert = BertModel(bert_config, add_pooling_layer=False)
    vit = get_peft_model(vit, LoraConfig(r=4, lora_alpha=2, lora_dropout=0.1, target_modules=["qkv"]))
    bert = get_peft_model(bert, LoraConfig(r=4, lora_alpha=2, lora_dropout=0.1,
                                           target_modules=["query", "key", "value"]))
    towers = torch.nn.ModuleDict({"vit": vit, "bert": bert})
    return towers, image_size, context, bert_config.vocab_size, ("vit_base_patch16_224+bert-base" if full
                                                                 else "tiny vit+bert")


def _run_peft_patch(suite) -> None:
    try:
        towers, image_size, context, vocab, name = _peft_towers(suite)
    except Exception as exc:
        suite.skip("peft_lora_train_step", f"PEFT towers could not be built ({type(exc).__name__}: {exc})")
        return
    device = suite.device
    towers = towers.to(device).train()
    batch = 8 if suite.quick else 64
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    ids = torch.randint(1, vocab, (batch, context), generator=generator).to(device)
    scale = torch.tensor(14.0, device=device, requires_grad=True)
    params = [p for p in towers.parameters() if p.requires_grad] + [scale]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if suite.is_gpu else contextlib.nullcontext())
    dtype = "bf16-autocast" if suite.is_gpu else "float32"
    shape_text = f"{name} B={batch}"
    print(f" peft_lora_train_step {shape_text} {dtype}")

    def step():
        with autocast:
            image_cls = towers["vit"].forward_features(images)[:, 0]
            text_cls = towers["bert"](input_ids=ids).last_hidden_state[:, 0]
            loss = baselines.reference_label_guided_infonce(torch.nn.functional.normalize(image_cls.float(), dim=-1),
                                                            torch.nn.functional.normalize(text_cls.float(), dim=-1),
                                                            scale)
        loss.backward()

    def metrics_for(meas):
        return {"samples_per_s": round(batch / (meas.median_ms * 1e-3), 2)} if meas.median_ms else {}

    results = suite.measure_group([("peft", step, params)])
    base_results = {name_: (meas, metrics_for(meas)) for name_, meas in results.items()}
    ours = {}
    for provider in suite.providers:
        label = f"patched:{provider}"
        try:
            handle = ace_kernels.patch(towers, backend=provider)
        except Exception as exc:
            suite.skip(label, f"patch failed ({type(exc).__name__}: {exc})")
            continue
        try:
            patched = [r for r in handle.patched] if hasattr(handle, "patched") else []
            if not suite.provider_can_run(label, step):
                continue
            for label_, meas in suite.measure_group([(label, step, params)]).items():
                metrics = metrics_for(meas)
                metrics["modules_patched"] = len(patched)
                ours[label_] = (meas, metrics)
        finally:
            handle.undo()

    def targets(provider, baseline):
        if suite.is_gpu and provider in ("patched:triton", "patched:cuda") and baseline == "peft":
            return [Target("speedup", 1.3, "speedup>=1.3")]
        return []

    suite.add_rows(family=FAMILY, op="peft_lora_train_step", shape=shape_text, dtype=dtype, ours=ours,
                   baselines=base_results, targets=targets)
    del towers
    if suite.is_gpu:
        torch.cuda.empty_cache()
