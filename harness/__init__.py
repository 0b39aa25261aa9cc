"""The measuring instrument: generator interface, registries, meters, counters, runner, CLI."""

__version__ = "0.1.0"
