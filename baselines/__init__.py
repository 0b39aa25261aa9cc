"""Baseline techniques: one file per technique, each a :class:`~un0_bench.harness.technique.Technique`
(a transform of a denoiser, applied on any backbone), plus the ``noise`` and ``real`` references.
"""
