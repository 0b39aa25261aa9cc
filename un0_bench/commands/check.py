"""``un0-bench check``: the CI energy gate (see :mod:`un0_bench.check`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from un0_bench.harness.running.config import models_list, non_negative, path_arg


def add_parser(sub: Any) -> None:
    k = sub.add_parser("check", help="CI energy gate: recount a small proxy-only suite against a baseline")
    k.add_argument("--baseline", type=Path, default=Path("bench/baseline.json"))
    k.add_argument("--tolerance", type=non_negative, default=0.01, help="relative change allowed (0.01 = 1%%)")
    k.add_argument("--models", type=models_list, default=None, help="default: every registered generator")
    k.add_argument("--update", action="store_true", help="rewrite the baseline with the current figures")
    k.add_argument("--run", type=path_arg, default=None, help="gate the records of a run folder (your own generator, "
                                                              "from un0_bench.measure or un0-bench run) instead of "
                                                              "the built-in suite")


def cmd_check(args: argparse.Namespace) -> int:
    from un0_bench import check

    models = args.models or check.gate_models()
    made_with = check.RUN_PROTOCOL if args.run is not None else None  # --run DIR: a user's own records
    if args.update:
        current = check.measure(models) if args.run is None else check.from_run(args.run)
        check.write_baseline(args.baseline, current, made_with)
        print(f"baseline written: {args.baseline} ({len(current)} models)")
        return 0
    baseline = check.load_baseline(args.baseline, made_with)["models"]
    if args.models:
        baseline = {m: v for m, v in baseline.items() if m in models}
    current = check.measure(models) if args.run is None else check.from_run(args.run)
    regressions, improvements, notes = check.compare(baseline, current, args.tolerance)
    for note in notes:
        print(note)
    if improvements:
        print(f"improved beyond {args.tolerance:.1%} (run with --update to lock them in):")
        print(check.format_changes(improvements))
    if regressions:
        print(f"FAILED: {len(regressions)} regression(s) beyond {args.tolerance:.1%}:", file=sys.stderr)
        print(check.format_changes(regressions), file=sys.stderr)
        return 1
    print(f"energy gate passed: {len(current)} models within {args.tolerance:.1%} of {args.baseline}")
    return 0
