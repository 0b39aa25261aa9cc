"""Backbones: where a generator's weights and prompts come from (built-in digits, diffusers folders)."""
