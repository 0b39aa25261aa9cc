"""Options and output shared by several commands (``compare``, ``report``, ``estimate``, ``count``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from un0_bench.harness.errors import UserError
from un0_bench.harness.running.config import non_negative, positive_int
from un0_bench.harness.running.record import Record


def ledger_options(p: argparse.ArgumentParser, overrides: bool = False) -> None:
    from un0_bench.harness.running.config import DEFAULT_GRID_GCO2_PER_KWH, finite

    if overrides:
        # A report reads the run's own reference, PUE and lifetime from its records; these override them.
        p.add_argument("--reference", default=None, help="override the run's reference model (its energy is 1x)")
        p.add_argument("--pue", type=finite, default=None, help="override the run's power usage effectiveness")
        p.add_argument("--lifetime-images", type=positive_int, default=None,
                       help="override the run's images served over a model's life")
    p.add_argument("--grid-gco2-per-kwh", type=non_negative, default=DEFAULT_GRID_GCO2_PER_KWH,
                   help=f"grid carbon intensity for gCO2e figures (default {DEFAULT_GRID_GCO2_PER_KWH:g}, codecarbon's "
                        "world average)")


def report_options(args: argparse.Namespace) -> dict[str, Any]:
    """The report's options: after ``compare``, the run's own settings; ``report DIR`` may override them."""
    if args.command == "compare":
        return {"grid_gco2_per_kwh": args.grid_gco2_per_kwh}
    if args.pue is not None and args.pue < 1:
        raise UserError(f"--pue must be >= 1, got {args.pue}")
    return {"pue": args.pue, "lifetime_images": args.lifetime_images, "grid_gco2_per_kwh": args.grid_gco2_per_kwh,
            "reference": args.reference}


def work_options(p: argparse.ArgumentParser, guidance: Callable[[str], float]) -> None:
    """An architecture's sampling settings (``estimate``, ``count``); ``guidance`` parses the scale."""
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the architecture's)")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="image side in pixels (default: the architecture's)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per sampler run (default: 1)")
    p.add_argument("--guidance", type=guidance, default=None,
                   help="classifier-free guidance scale; above 1 doubles the denoiser passes (default: the "
                        "architecture's)")


def print_records(records: list[Record]) -> None:
    """The summary table (one row per model and batch size), then each meter's status once."""
    import pandas as pd

    from un0_bench.reports.tables import format_summary, meter_statuses, summary_frame

    if not records:
        print("no records")
        return
    with pd.option_context("display.max_columns", None, "display.width", 250):
        print(format_summary(summary_frame(records)).to_string(index=False))
    for m in meter_statuses(records):
        print(f"meter {m['meter']}: {m['status']}")
