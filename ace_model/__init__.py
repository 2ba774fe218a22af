"""ACE-LoRA on open_clip's BiomedCLIP, composed from the ``ace_kernels`` ops.

- :class:`ACELoRA` -- the model (``ACELoRA.from_config("biomedclip" | "tiny")``);
- :mod:`ace_model.checkpoint` -- the released checkpoint format;
- :mod:`ace_model.data` -- tokenizer, CSV datasets, synthetic demo data;
- :mod:`ace_model.zero_shot` -- prompt-ensemble zero-shot classification and AUROC;
- :mod:`ace_model.training` -- the training loop behind ``ace-lora train``;
- :mod:`ace_model.cli` -- the ``ace-lora`` command line.
"""

from ace_model.model import ACELoRA, CONFIG_NAMES, build_base_model

__all__ = ["ACELoRA", "CONFIG_NAMES", "build_base_model"]
