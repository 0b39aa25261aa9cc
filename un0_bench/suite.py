"""``make bench``: the default suite on the digits backbone, every meter, a table and the HTML report.

Prints the table (J/image per meter, FLOPs/image, bytes/image, ms/image, FID, KID, accuracy,
quality-matched) and, at the end, how long the whole benchmark took: a figure, not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from un0_bench.harness.errors import UserError
from un0_bench.harness.running.config import DEFAULT_QUALITY_SAMPLES, ProtocolConfig, RunConfig

#: ``make bench``: the claims in about 10 minutes on 2 CPU cores. The reference (sd, 50 DDIM steps), one
#: model of each technique family, and the two quantised rows of the quantization claim: sd-int8 (every
#: conv and linear in int8, calibrated) and sd-bf16 (bfloat16, native on AMX CPUs). On the 2-core
#: Sapphire Rapids host both run at about fp32 speed or faster (README, "int8 and bf16"); the combined
#: stack is the 1-step student with torchao int8 linears.
DEFAULT_SUITE = [
    "real", "noise", "sd", "sd:steps=10", "sd-int8", "sd-bf16", "sd-cached", "sd-pruned", "sd-distilled",
    "sd-distilled:steps=1", "sd-distilled:steps=1+int8", "un0", "un0-osc",
]

#: ``make bench-full``: every baseline and variant, torchao's W8A8 and weight-only linears on the teacher too.
FULL_SUITE = [
    *DEFAULT_SUITE[:4], "sd:steps=2", *DEFAULT_SUITE[4:7], "sd+int8", "sd+int8:mode=weight-only", "sd-fp16",
    "sd-pruned-unstructured", *DEFAULT_SUITE[7:10], "sd-distilled+int8", *DEFAULT_SUITE[10:], "un0:steps=2",
    "un0:keep=0.01", "un0:keep=0.001",
]
SUITES = {"default": DEFAULT_SUITE, "full": FULL_SUITE}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m un0_bench.suite", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("reports/latest"))
    p.add_argument("--suite", choices=sorted(SUITES), default="default",
                   help=f"default: {len(DEFAULT_SUITE)} models (make bench); full: {len(FULL_SUITE)} (make bench-full)")
    p.add_argument("--models", help="comma-separated models instead of a suite")
    p.add_argument("--meters", default="auto")
    p.add_argument("--images", type=int, default=ProtocolConfig.images)
    # FID reads ~10% higher and varies ~10% between seeds at 500 samples, about 2% at 1,000 (the
    # run configuration's default), so the suites keep 1,000.
    p.add_argument("--quality-samples", type=int, default=DEFAULT_QUALITY_SAMPLES)
    p.add_argument("--quality-seeds", type=int, default=1, help="draws per model; 3 for a close call (3x the time)")
    p.add_argument("--fresh", action="store_true", help="start --out over (its earlier files are moved aside)")
    args = p.parse_args(argv)

    from un0_bench.commands.options import print_records
    from un0_bench.harness.running.config import models_list
    from un0_bench.harness.running.results import ResultStore
    from un0_bench.harness.running.runner import Runner
    from un0_bench.reports.build import build_report
    from un0_bench.reports.tables import measured

    t0 = time.perf_counter()
    models = models_list(args.models) if args.models else list(SUITES[args.suite])
    cfg = RunConfig.of(models=models, out=args.out, meters=args.meters.split(","), images=args.images,
                       batch_sizes=[args.images], min_repeats=3, min_duration_s=1.0, idle_s=1.0,
                       quality_samples=args.quality_samples, quality_seeds=args.quality_seeds, fresh=args.fresh)

    def on_event(kind: str, info: dict) -> None:
        if kind in ("cell", "quality"):
            print(f"[{time.perf_counter() - t0:6.0f} s] {kind}: {info['model']}", flush=True)

    try:
        Runner(cfg, on_event=on_event).run()
    except UserError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    # Measured records only, as compare prints them (a failed cell is the report's "failed cells" section).
    records = [r for r in measured(ResultStore(args.out).load()) if r["model"] in models]
    print_records(records)
    cells = {(r["model"], r["batch_size"]): r for r in records}.values()
    idle_s = sum(r.get("idle_added_s") or 0.0 for r in cells)
    warm_s = sum(sum((r.get("warmup") or {}).get("durations_s") or []) for r in cells)
    # What the measurement protocol adds per cell (issue 11): idle windows around each cell for
    # whole-device meters, and the warm-up until steady.
    print(f"protocol overhead: idle windows {idle_s:.1f} s, warm-up {warm_s:.1f} s over {len(cells)} cells")
    print(f"report: {build_report(args.out)}")
    print(f"benchmark wall time: {time.perf_counter() - t0:.0f} s for {len(models)} models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
