"""Baseline techniques, each a transform of a denoiser; and the ``noise`` and ``real`` references.

Each technique is a :class:`~un0_bench.harness.core.technique.Technique` that applies on any backbone
its entry supports: ``int8`` (:mod:`~un0_bench.baselines.int8`, its kernel guard in
:mod:`~un0_bench.baselines.int_mm`; the torchao comparison in :mod:`~un0_bench.baselines.torchao_int8`),
``bf16``/``fp16`` (:mod:`~un0_bench.baselines.half`), ``cached`` and ``deepcache`` (DeepCache, ours and
its authors' package), ``tome``, ``compiled``, ``pruned`` and ``pruned-unstructured``, ``distilled``.
:mod:`~un0_bench.baselines.references` holds the quality floor and ceiling, measured like any model.
"""
