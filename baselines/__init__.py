"""Baseline techniques, one file each, and the ``noise`` and ``real`` references.

Each technique is a :class:`~un0_bench.harness.technique.Technique`: a transform of a denoiser,
applied on any backbone.
"""
