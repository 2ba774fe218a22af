"""ace-kernels benchmark suite: ``python -m benchmarks`` (see ``benchmarks/suite.py``).

Families: ``lora`` (fused q/k/v LoRA), ``hypergraph`` (ACE-HGNN), ``contrastive``
(label-guided InfoNCE), ``model`` (a whole ACE-LoRA training step), plus, on a
GPU, ``device`` (the card's measured copy bandwidth and bf16 matmul rate).
Baselines live in ``benchmarks/baselines.py``; results in ``benchmarks/results/``.
"""
