"""``un0-bench estimate`` (issue 14, part B): project a counted architecture's time and energy on a GPU."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from un0_bench.commands.options import work_options
from un0_bench.harness.errors import UserError
from un0_bench.harness.running.config import non_negative, path_arg


def add_parser(sub: Any) -> None:
    e = sub.add_parser("estimate", help="count a real architecture (no weights) and project its time and energy "
                                        "per image on a GPU profile: a projection, not a measurement")
    e.add_argument("--arch", required=True,
                   help="architecture: sd15, sd21, sdxl, sdxl-turbo, adm-imagenet64, un0-... (as `un0-bench count`)")
    e.add_argument("--profile", default="a100-sxm4-40gb",
                   help="GPU profile(s), comma-separated (harness/meters/gpu_profiles.csv; default a100-sxm4-40gb)")
    work_options(e, guidance=non_negative)
    e.add_argument("--dtype", default="fp16", help="dtype the work is counted in (default fp16, as served on a GPU)")
    e.add_argument("--flags", default=None,
                   help="torch math flags of the run: cudnn_allow_tf32=1|0, matmul_allow_tf32=1|0, sdpa=auto|math, "
                        "comma-separated (default: torch's, cudnn_allow_tf32=1, matmul_allow_tf32=0, sdpa=auto)")
    e.add_argument("--calibration", type=path_arg, default=None,
                   help="calibration file (default: the shipped one, fitted on ML.ENERGY's SD 2.1 batch 1 and SDXL "
                        "batch 8 on A100)")
    e.add_argument("--out", type=path_arg, default=None, help="report folder (default runs/estimate-<time>)")
    e.add_argument("--no-report", action="store_true", help="write results only")


def cmd_estimate(args: argparse.Namespace) -> int:
    from un0_bench import estimate
    from un0_bench.harness.projection.roofline import load_calibration, parse_flags

    profiles = [p.strip() for p in args.profile.split(",") if p.strip()]
    if not profiles:
        raise UserError("--profile names no GPU profile")
    cal = load_calibration(args.calibration)
    flags = parse_flags(args.flags) if args.flags else None
    records = estimate.estimate_records(args.arch, profiles, calibration=cal, flags=flags, steps=args.steps,
                                        resolution=args.resolution, batch_size=args.batch_size,
                                        guidance=args.guidance, dtype=args.dtype)
    for rec in records:
        print(estimate.describe(rec))
    out = args.out or Path("runs") / time.strftime("estimate-%Y%m%d-%H%M%S", time.gmtime())
    path = estimate.write_report(records, out, report=not args.no_report)
    print(f"results: {out / 'results.jsonl'} (records marked projected)")
    if path is not None:
        print(f"report: {path}")
    return 0
