"""The measuring instrument: base classes, registries, stacks, meters, counters, protocol, runner.

It knows the generator, backbone and technique base classes and no concrete one (the top floor,
:mod:`un0_bench.catalog`, registers those).
"""

__version__ = "0.1.0"
