"""un0-bench: energy accounting for image generators.

The distribution installs this one package. Its floors, each importing only the floors below it:
``un0_bench.harness`` (the instrument), ``un0_bench.backbones``, ``un0_bench.baselines``,
``un0_bench.un0_impl``, ``un0_bench.reports``, and this package's own modules, the commands
(``cli``, ``check``, ``suite``, ``catalog``), which may import everything. In the repository each
floor keeps its own folder (``harness/``, ``backbones/``, ...); ``pyproject.toml`` maps them here.
"""

__version__ = "0.1.0"

from un0_bench import catalog  # noqa: E402,F401  (registers the built-in entries)
