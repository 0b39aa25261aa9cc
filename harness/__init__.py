"""The measuring instrument: base classes (generator, backbone, technique), registries, stacks, meters,
counters, protocol, runner and executors. It knows no concrete backbone or technique (the commands
in :mod:`un0_bench.catalog` register them).
"""

__version__ = "0.1.0"
