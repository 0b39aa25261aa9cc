"""``un0-bench calibrate`` (issue 14, part B): fit this host's energy coefficients, or the projection's."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from un0_bench.harness.errors import UserError
from un0_bench.harness.running.config import finite, path_arg


def add_parser(sub: Any) -> None:
    c = sub.add_parser("calibrate", help="fit energy coefficients: this host's from a meter (--meter), or the "
                                         "projection's from its published point (--projection)")
    how = c.add_mutually_exclusive_group(required=True)
    how.add_argument("--meter", help="rapl, nvml or codecarbon: run fixed workloads and fit E = e_flop*F + e_byte*B + "
                                     "static*t")
    how.add_argument("--projection", action="store_true",
                     help="recount the calibration points of reports/published.csv (ML.ENERGY, A100: SD 2.1 batch 1 "
                          "and SDXL batch 8, 50 steps) and refit the projection, with its leave-one-out table")
    c.add_argument("--name", default=None, help="profile name to save (default host-<meter>)")
    c.add_argument("--out", type=path_arg, default=None,
                   help="--meter: folder for profiles.csv and fit.json (default runs/calibrate-<meter>); "
                        "--projection: calibration file (default: the shipped one)")
    c.add_argument("--window-s", type=finite, default=0.5, help="--meter: seconds per window (default 0.5)")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from un0_bench import estimate

    if args.projection:
        cal = estimate.refit_projection(args.out)
        from un0_bench.reports.projected import leave_one_out_lines

        print(f"calibration {cal.name}: efficiency {cal.efficiency:.6g}, power fraction {cal.power_fraction:.6g}")
        for pt in cal.points:
            print(f"  fitted on {pt['id']}: {pt['setting']} measured {pt['measured']}")
        print("\n".join(leave_one_out_lines(cal.to_dict())))
        return 0
    if args.meter not in ("rapl", "nvml", "codecarbon"):
        raise UserError(f"--meter must be rapl, nvml or codecarbon, got {args.meter!r}")
    name = args.name or f"host-{args.meter}"
    out = args.out or Path("runs") / f"calibrate-{args.meter}"
    result = estimate.calibrate_host(args.meter, name, out, window_s=args.window_s)
    fit = result["fit"]
    print(f"{len(result['samples'])} windows; fit E = e_flop*F + e_byte*B + static*t:")
    print(f"  energy per FLOP {fit['e_flop_j']:.4g} J, per byte {fit['e_byte_j']:.4g} J, "
          f"static {fit['static_w']:.4g} W; "
          f"relative residual {fit['rel_residual']:.3%}")
    print(f"  time only: E = {fit['time_only_power_w']:.4g} W x t, "
          f"relative residual {fit['time_only_rel_residual']:.3%}")
    print(f"  finding: {fit['finding']}")
    print(f"profile {name!r} written to {out / 'profiles.csv'} (fit and samples in {out / 'fit.json'}); use it with\n"
          f"  UN0_BENCH_PROFILES={out / 'profiles.csv'} un0-bench compare ... --meters proxy:profile={name}")
    return 0
