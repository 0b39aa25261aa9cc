"""``un0-bench``: the entry point; each subcommand lives in its own module of :mod:`un0_bench.commands`.

Bad input (unknown names, bad numbers, unwritable folders) ends with one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from un0_bench.commands import calibrate, check, compare, count, estimate, make_tiny_pipeline, report, run, train
from un0_bench.commands import list as list_
from un0_bench.harness.errors import UserError

#: The subcommands' modules, in the order ``--help`` lists them; each has ``add_parser(sub)``.
_MODULES = (list_, compare, report, check, estimate, calibrate, make_tiny_pipeline, count, run, train)

#: Subcommand -> the function that runs it (returns the exit code).
COMMANDS = {"list": list_.cmd_list, "compare": compare.cmd_compare, "report": report.cmd_report,
            "train": train.cmd_train, "check": check.cmd_check,
            "make-tiny-pipeline": make_tiny_pipeline.cmd_make_tiny_pipeline, "count": count.cmd_count,
            "estimate": estimate.cmd_estimate, "calibrate": calibrate.cmd_calibrate, "run": run.cmd_run}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's convention too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="un0-bench", description="Energy, FLOPs and quality per image, side by side.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in _MODULES:
        module.add_parser(sub)
    return p


def _ours(filename: str) -> bool:
    """Whether a warning comes from this project's code (not from a third-party library)."""
    root = str(Path(__file__).resolve().parent.parent)
    return filename.startswith(root) and "site-packages" not in filename and "/.venv/" not in filename


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    # Warnings are held back while the command runs: a refused command prints its one line first (and
    # third-party warnings, e.g. of imports, not at all); a finished one shows them after its output,
    # except third-party deprecation notices (addressed to those libraries' callers' authors, not users).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = COMMANDS[args.command](args)
            failed = False
        except UserError as e:
            print(f"un0-bench: error: {e}", file=sys.stderr)
            code, failed = 2, True
    for w in caught:
        if _ours(w.filename) or not (failed or issubclass(w.category, DeprecationWarning)):
            print(warnings.formatwarning(w.message, w.category, w.filename, w.lineno), file=sys.stderr, end="")
    return code


if __name__ == "__main__":
    sys.exit(main())
