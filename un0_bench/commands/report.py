"""``un0-bench report DIR``: rebuild a folder's report from its results.jsonl alone."""

from __future__ import annotations

import argparse
from typing import Any

from un0_bench.commands.options import ledger_options, report_options
from un0_bench.harness.errors import UserError
from un0_bench.harness.running.config import path_arg


def add_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="rebuild the report of a folder from its results.jsonl alone")
    r.add_argument("dir", type=path_arg)
    ledger_options(r, overrides=True)


def cmd_report(args: argparse.Namespace) -> int:
    from un0_bench.reports.build import build_report

    if not (args.dir / "results.jsonl").is_file():
        raise UserError(f"{args.dir} has no results.jsonl")
    print(f"report: {build_report(args.dir, report_options(args))}")
    return 0
