"""The measuring instrument; it knows base classes and registries, and no concrete backbone or model.

- what is measured: the :class:`~un0_bench.harness.generator.Generator`,
  :class:`~un0_bench.harness.backbone.Backbone` and :class:`~un0_bench.harness.technique.Technique`
  base classes, models and plans (``model``), stacks of techniques (``stack``), model specs (``spec``);
- what measures: meters (``meters/``), op and kernel counters (``counters/``), the host's state
  (``hoststate``, ``environment``);
- how a run goes: the configuration and its defaults (``config``), the protocol of one cell
  (``protocol``, ``stats``), the cell (``cell``), the runner (``runner``), executors (``executors/``),
  results (``results``), training runs' energy (``training``), the Python API (``custom``);
- accounting: energy per image at each boundary (``ledger``); counted work projected onto a GPU
  profile (``projection``, ``calibrate``).

The registries (``registry``) are filled by the top floor, :mod:`un0_bench.catalog`, and by plug-ins'
entry points.
"""
