"""Backbones: where weights, prompts, samplers and quality come from (digits, ``diffusers:PATH``, ``arch:NAME``)."""
