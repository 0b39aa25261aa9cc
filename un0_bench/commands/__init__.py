"""The ``un0-bench`` subcommands, one module each.

Each module has ``add_parser(sub)`` (its options, on the ``argparse`` sub-parsers) and ``cmd_<name>(args)``
(returns the exit code). Modules are light at import: ``un0_bench.cli`` imports them all to build its parser,
and each command imports what it needs (torch, rich, pandas) when it runs. Options shared by several
commands live in :mod:`un0_bench.commands.options`.
"""
