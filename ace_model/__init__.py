"""ACE-LoRA on open_clip, built from ace_kernels ops (placeholder while being written)."""
