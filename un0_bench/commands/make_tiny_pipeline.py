"""``un0-bench make-tiny-pipeline DIR``: a tiny Stable Diffusion pipeline for smoke tests."""

from __future__ import annotations

import argparse
from typing import Any

from un0_bench.harness.errors import UserError
from un0_bench.harness.running.config import path_arg


def add_parser(sub: Any) -> None:
    m = sub.add_parser("make-tiny-pipeline", help="write a tiny Stable Diffusion pipeline (for smoke tests)")
    m.add_argument("dir", type=path_arg)


def cmd_make_tiny_pipeline(args: argparse.Namespace) -> int:
    from un0_bench.backbones.tiny_pipeline import make_tiny_pipeline
    from un0_bench.harness.running.results import check_writable

    check_writable(args.dir, "pipeline folder")
    try:
        written = make_tiny_pipeline(args.dir)
    except OSError as e:
        raise UserError(f"cannot write the pipeline to {args.dir}: {e.strerror or e}") from None
    print(f"tiny pipeline written: {written}")
    return 0
