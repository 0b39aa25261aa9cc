"""un0-bench: energy accounting for image generators.

The distribution installs this one package. Its floors, each importing only the floors below it:
``un0_bench.harness`` (the instrument), ``un0_bench.backbones``, ``un0_bench.baselines``,
``un0_bench.un0_impl``, ``un0_bench.reports``, and this package's own modules, the commands
(``cli`` and ``commands``, ``check``, ``suite``, ``catalog``), which may import everything. In the repository each
floor keeps its own folder (``harness/``, ``backbones/``, ...); ``pyproject.toml`` maps them here.
"""

__version__ = "0.1.0"

from un0_bench import catalog  # noqa: E402,F401  (registers the built-in entries)

#: The Python API (``un0_bench.measure``, ``un0_bench.window``), imported on first use (it imports torch).
_API = {"measure": "measure", "window": "window", "Measurement": "Measurement"}


def __getattr__(name: str):  # noqa: ANN202  (PEP 562: lazy attributes of the package)
    if name in _API:
        from un0_bench.harness.running import custom

        return getattr(custom, _API[name])
    raise AttributeError(f"module 'un0_bench' has no attribute {name!r}")
