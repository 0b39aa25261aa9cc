"""The measuring instrument; it knows base classes and registries, and no concrete backbone or model.

Grouped by axis, one folder each:

- ``core/``: what is measured: the :class:`~un0_bench.harness.core.generator.Generator`,
  :class:`~un0_bench.harness.core.backbone.Backbone` and :class:`~un0_bench.harness.core.technique.Technique`
  base classes, models and plans (``model``), stacks of techniques (``stack``), model specs (``spec``);
- ``measuring/``: the protocol of one cell (``protocol``, ``stats``), the host's state (``hoststate``,
  ``environment``); ``meters/`` and ``counters/``: what measures and what counts;
- ``running/``: the per-axis configs (``config``), the frozen plan (``plan``), the cell (``cell``), the
  runner (``runner``), the typed record (``record``) and its stores (``results``), the Python API
  (``custom``); ``executors/``: where cells run (local, Ray);
- ``weights/``: checkpoints, the int8 weight quantiser, the energy a derivation spends;
- ``projection/``: counted work projected onto a GPU profile (``roofline``) and host calibration.

``errors`` and the registries (``registry``) serve every axis; the registries are filled by the top
floor, :mod:`un0_bench.catalog`, and by plug-ins' entry points. What only reports read (the ledger's
boundaries) lives in :mod:`un0_bench.reports.ledger`.
"""
