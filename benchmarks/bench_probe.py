"""The B=1,000,000 label-guided InfoNCE probe (family ``contrastive_probe``; issue 5: the
largest B that runs on one 80 GB card, embeddings given, is at least 1,000,000).

One Triton forward+backward at B=1,000,000, D=512, bf16, measured for both time and peak in
that one call, checked for finite loss and gradients and, time allowing, its loss against an
independent chunked fp32 forward; its rows are family ``contrastive``'s (op
``label_guided_infonce``), see :mod:`benchmarks.bench_contrastive`. A family of its own so that
it runs after the model and training families: it costs about a minute of device time
(B^2 scaling from the B=65,536 row: ~43 s at 185 ms there, plus the check), and is "costly"
(``--tier``). Sized from this run's B=65,536 rows, or, in a ``--tier costly`` run without
them, from one Triton step at B=65,536 timed first. GPU only.
"""

from __future__ import annotations

from benchmarks import bench_contrastive

FAMILY = "contrastive_probe"
COSTLY_ITEMS = ("label_guided_infonce B=1000000",)
ALL_COSTLY = True


def unavailable(suite) -> bool:
    """Whether this run cannot run the probe (the reason logged): no GPU, ``--quick``, or provider
    triton not selected. The suite's process asks before it starts the family's own, whose
    start-up (torch's import; 4-5 s of device time on a GPU, with --quick) would buy only this line."""
    return bench_contrastive.probe_unavailable(suite)


def run(suite) -> None:
    bench_contrastive.run(suite, probe=True)
