"""ace-kernels benchmark suite: ``python -m benchmarks`` (see ``benchmarks/suite.py``).

Families: ``lora`` (fused q/k/v LoRA), ``hypergraph`` (ACE-HGNN), ``contrastive``
(label-guided InfoNCE), ``distributed`` (the loss across ranks against one process; on a GPU
it needs two cards), ``model`` (a whole ACE-LoRA training step, zero-shot, drop-in patching),
``training`` (the chunked two-pass step), ``contrastive_probe`` (GPU: the loss at
B = 1,000,000), ``tuning`` (GPU: the Triton kernels' launch configurations), plus, on a GPU,
``device`` (the card's measured copy bandwidth and bf16 matmul rate). Baselines live in
``benchmarks/baselines.py``; results in ``benchmarks/results/``.
"""

# Set by the suite in a family's process (suite.py), read there by __main__.py: the worker dies
# with the suite's process. Here, so that __main__ reads it before torch is imported.
PARENT_PID_VARIABLE = "ACE_BENCH_PARENT_PID"
