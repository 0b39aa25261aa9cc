"""``un0-bench run -- CMD``: measure an external command (see :mod:`un0_bench.external`).

The generator is imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from un0_bench.harness.errors import UserError
from un0_bench.harness.running.config import non_negative, non_negative_int, path_arg, positive_int, seed_int


def add_parser(sub: Any) -> None:
    r = sub.add_parser("run", help="measure an external command that writes --images images to a folder",
                       description="Measure CMD, which writes N images to a folder it is told as {out} (or "
                                   "$UN0_BENCH_OUT), N as {n} ($UN0_BENCH_IMAGES), the seed as {seed} "
                                   "($UN0_BENCH_SEED). Whole-process wall time and whole-device meters.")
    r.add_argument("--out", type=path_arg, required=True, help="output folder (records; the last images in OUT/images)")
    r.add_argument("--images", type=positive_int, default=2, help="images the command writes each run")
    r.add_argument("--meters", default="auto", help="comma-separated meters, or auto (every meter but proxy: the "
                                                    "command's torch operators run in another process)")
    r.add_argument("--name", default="command", help="the model name the records carry")
    r.add_argument("--seed", type=seed_int, default=0)
    r.add_argument("--min-repeats", type=positive_int, default=3)
    r.add_argument("--min-duration", type=non_negative, default=2.0, help="seconds of metered time at least")
    r.add_argument("--warmup", type=non_negative_int, default=1)
    r.add_argument("--idle", type=non_negative, default=1.0, help="seconds of each idle window (whole-device meters)")
    r.add_argument("--fresh", action="store_true", help="start --out over (earlier results moved aside)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS")


def run_command(argv: list[str], *, out: Path, images: int, meters: str = "auto", name: str = "command",
                seed: int = 0, **options: Any) -> list[dict[str, Any]]:
    """Measure the command ``argv`` into ``out``; its records (one per meter)."""
    from un0_bench.harness.registry import METERS
    from un0_bench.harness.running.config import meters_list
    from un0_bench.harness.running.custom import measure_generator

    names = [n for n in METERS.names() if n != "proxy"] if meters == "auto" else meters_list(meters)
    if any(n.partition(":")[0] == "proxy" for n in names):
        raise UserError("--meters proxy cannot measure a command: it counts torch operators in this process, and "
                        "the command runs in its own (count it with un0_bench.measure instead)")
    from un0_bench.external import CommandBackbone, CommandGenerator

    backbone = CommandBackbone()
    generator = CommandGenerator(argv, images, Path(out) / "images", seed)
    generator.command()  # bad placeholders are refused before anything runs
    return measure_generator(generator, backbone, name=name, out=out, meters=names, images=images, seed=seed,
                             quality_samples=images if images >= 2 else 0, **options)


def cmd_run(args: argparse.Namespace) -> int:
    from un0_bench.reports.build import build_report

    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    records = run_command(argv, out=args.out, images=args.images, meters=args.meters, name=args.name,
                          seed=args.seed, min_repeats=args.min_repeats, min_duration_s=args.min_duration,
                          warmup=args.warmup, idle_s=args.idle, fresh=args.fresh)
    for r in records:
        energy = r.get("energy_j_per_image")
        shown = "time only" if r["status"] == "ok" and energy is None else (
            f"{energy:.4g} J/image" if energy is not None else r["status"])
        print(f"{r['model']} {r['meter']}: {shown}; {r['duration_s_per_image']:.4g} s/image")
    quality = records[0].get("quality")
    print("quality: " + (f"FID {quality['fid']:.4g}, accuracy {quality['accuracy']:.3f}" if quality else
                         records[0].get("quality_note", "not measured")))
    print(f"report: {build_report(args.out)}")
    return 0
