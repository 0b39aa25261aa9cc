"""``un0-bench``: list, compare, report, train.

Bad input (unknown names, bad numbers, unwritable folders) ends with one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from un0_bench.harness.errors import UserError


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad value in {text!r}") from None

    return parse


def _models(text: str) -> list[str]:
    # Commas separate models, but a spec's own parameters also use commas (un0-osc:n=1024,steps=32):
    # an item with '=' and no ':' continues the previous spec.
    out: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and out:
            out[-1] += "," + item
        else:
            out.append(item)
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list of models")
    return out


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return v


def _ledger_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pue", type=float, default=1.56,
                   help="power usage effectiveness for the ledger (default 1.56, Uptime Institute 2024 average)")
    p.add_argument("--lifetime-images", type=_positive_int, default=1_000_000,
                   help="images a model serves over its life; its training energy is divided by this")
    p.add_argument("--grid-gco2-per-kwh", type=_non_negative, default=475.0,
                   help="grid carbon intensity for gCO2e figures (default 475, codecarbon's world average)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's convention too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="un0-bench", description="Energy, FLOPs and quality per image, side by side.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("list", help="generators, backbones and meters (and whether each meter works here)")

    c = sub.add_parser("compare", help="measure models side by side and write a report")
    c.add_argument("--models", type=_models, required=True, help="comma-separated specs, e.g. sd,sd:steps=10")
    c.add_argument("--backbone", default="digits", help="digits (default) or diffusers:PATH")
    c.add_argument("--device", default=None, help="diffusers backbones: cpu (default), cuda or cuda:N")
    c.add_argument("--dtype", default=None, help="diffusers backbones: fp32 (default), fp16 or bf16")
    c.add_argument("--prompts", type=Path, default=None, help="diffusers backbones: prompts file, one per line")
    c.add_argument("--clip", default=None, help="diffusers backbones: local CLIP folder for CLIP-score quality")
    c.add_argument("--meters", type=_csv(str), default=["auto"], help="comma-separated meters, or auto")
    c.add_argument("--images", type=_positive_int, default=16, help="images per metered window")
    c.add_argument("--batch-size", type=_csv(_positive_int), default=None,
                   help="one or more batch sizes, each at most --images (default: 16, or --images if fewer)")
    c.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<UTC time>)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--min-repeats", type=_positive_int, default=3)
    c.add_argument("--max-repeats", type=_positive_int, default=100)
    c.add_argument("--min-duration", type=_non_negative, default=2.0, help="seconds of metered time at least")
    c.add_argument("--warmup", type=int, default=1, help="unmetered calls before measuring")
    c.add_argument("--idle", type=_non_negative, default=2.0, help="seconds of idle-power measurement")
    c.add_argument("--quality-samples", type=int, default=1000,
                   help="images per model for FID/KID/accuracy (0: not measured)")
    c.add_argument("--quality-seeds", type=_positive_int, default=1,
                   help="digits: disjoint draws of --quality-samples images; 2 or more give FID's spread and "
                        "mark verdicts within it as marginal")
    c.add_argument("--reference", default="sd", help="model whose quality sets the band and whose energy is 1x")
    c.add_argument("--fid-ratio", type=float, default=1.25, help="quality band: FID at most this x the reference's")
    c.add_argument("--accuracy-drop", type=float, default=0.03,
                   help="quality band: accuracy at most this much (a fraction) below the reference's")
    _ledger_options(c)
    c.add_argument("--no-report", action="store_true", help="write results only")

    r = sub.add_parser("report", help="rebuild the report of a folder from its results.jsonl alone")
    r.add_argument("dir", type=Path)
    _ledger_options(r)

    k = sub.add_parser("check", help="CI energy gate: recount a small proxy-only suite against a baseline")
    k.add_argument("--baseline", type=Path, default=Path("bench/baseline.json"))
    k.add_argument("--tolerance", type=_non_negative, default=0.01, help="relative change allowed (0.01 = 1%%)")
    k.add_argument("--models", type=_models, default=None, help="default: every registered generator")
    k.add_argument("--update", action="store_true", help="rewrite the baseline with the current figures")

    m = sub.add_parser("make-tiny-pipeline", help="write a tiny Stable Diffusion pipeline (for smoke tests)")
    m.add_argument("dir", type=Path)

    t = sub.add_parser("train", help="reproduce a shipped weights file from its seed")
    t.add_argument("target", help="what to train (see `un0-bench list`), or all")
    t.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the shipped run's)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--out", type=Path, default=None,
                   help="weights file (default: the shipped location; sd-distilled writes <stem>-4 and <stem>-1 "
                        "beside it)")
    return p


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from un0_bench.harness.registry import BACKBONES, GENERATORS, METERS, PIPELINE_GENERATORS, TRAINERS
    from un0_bench.harness.runner import make_meter

    console = Console(width=160)
    for title, reg in (("generators (digits)", GENERATORS), ("generators on diffusers:PATH", PIPELINE_GENERATORS),
                       ("un0_bench.backbones", BACKBONES), ("training targets", TRAINERS)):
        table = Table(title=title, show_lines=False)
        table.add_column("name")
        table.add_column("what it is")
        for e in reg:
            table.add_row(e.name, e.summary)
        console.print(table)
    from un0_bench.baselines.pipeline_techniques import NOT_SUPPORTED

    table = Table(title="not available on diffusers:PATH, and why")
    table.add_column("name")
    table.add_column("why")
    for name, why in NOT_SUPPORTED.items():
        table.add_row(name, why)
    console.print(table)
    table = Table(title="meters on this host")
    table.add_column("name")
    table.add_column("status")
    table.add_column("what it is")
    for e in METERS:
        m = make_meter(e.name)
        status = m if isinstance(m, str) else "ok"
        if not isinstance(m, str):
            m.close()
        table.add_row(e.name, status, e.summary)
    console.print(table)
    return 0


def print_records(records: list[dict[str, Any]]) -> None:
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


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from un0_bench.harness.results import ResultStore
    from un0_bench.harness.runner import RunConfig, Runner

    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    is_pipeline = args.backbone.partition(":")[0] == "diffusers"
    options = {k: v for k, v in (("device", args.device), ("dtype", args.dtype), ("prompts_file", args.prompts))
               if v is not None}
    if options and not is_pipeline:
        raise UserError(f"--{next(iter(options)).replace('_file', 's')} applies to diffusers:PATH backbones only")
    if args.clip and not is_pipeline:
        raise UserError("--clip applies to diffusers:PATH backbones only (digits quality uses its own judge)")
    cfg = RunConfig(models=args.models, out=out, backbone=args.backbone, meters=args.meters, images=args.images,
                    batch_sizes=args.batch_size, seed=args.seed, min_repeats=args.min_repeats,
                    max_repeats=args.max_repeats, min_duration_s=args.min_duration, warmup=args.warmup,
                    idle_s=args.idle, quality_samples=args.quality_samples, quality_seeds=args.quality_seeds,
                    reference=args.reference, fid_ratio=args.fid_ratio, accuracy_drop=args.accuracy_drop,
                    pue=args.pue, lifetime_images=args.lifetime_images, backbone_options=options, clip=args.clip)
    with Progress(transient=True) as bar:
        task = bar.add_task("measuring", total=None)

        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind == "plan":
                bar.update(task, total=info["cells"])
            elif kind == "cell":
                bar.update(task, description=f"measuring {info['model']} (batch {info['batch_size']})")
            elif kind == "quality":
                bar.update(task, description=f"quality of {info['model']}")
            elif kind == "done":
                bar.advance(task)

        runner = Runner(cfg, on_event=on_event)
        try:
            runner.run()
        except KeyboardInterrupt:
            kept = len(ResultStore(out).load())
            print(f"interrupted: {kept} finished records kept in {out}; run the same command to resume",
                  file=sys.stderr)
            return 130
    records = [r for r in ResultStore(out).load() if r["model"] in cfg.models and r["backbone"] == cfg.backbone]
    print_records(records)
    if not args.no_report:
        from un0_bench.reports.build import build_report

        path = build_report(out, report_options(args))
        print(f"report: {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from un0_bench.reports.build import build_report

    if not (args.dir / "results.jsonl").is_file():
        raise UserError(f"{args.dir} has no results.jsonl")
    print(f"report: {build_report(args.dir, report_options(args))}")
    return 0


def report_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.pue < 1:
        raise UserError(f"--pue must be >= 1, got {args.pue}")
    return {"pue": args.pue, "lifetime_images": args.lifetime_images, "grid_gco2_per_kwh": args.grid_gco2_per_kwh,
            "reference": getattr(args, "reference", "sd")}


def cmd_check(args: argparse.Namespace) -> int:
    from un0_bench import check

    models = args.models or check.gate_models()
    if args.update:
        current = check.measure(models)
        check.write_baseline(args.baseline, current)
        print(f"baseline written: {args.baseline} ({len(current)} models)")
        return 0
    baseline = check.load_baseline(args.baseline)["models"]
    if args.models:
        baseline = {m: v for m, v in baseline.items() if m in models}
    current = check.measure(models)
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


def cmd_make_tiny_pipeline(args: argparse.Namespace) -> int:
    from un0_bench.backbones.tiny_pipeline import make_tiny_pipeline

    print(f"tiny pipeline written: {make_tiny_pipeline(args.dir)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from un0_bench.harness.registry import TRAINERS

    if args.target == "all":
        targets = TRAINERS.names_in_order()
        if args.out is not None:
            raise UserError("--out names one file; it cannot be used with 'train all'")
    else:
        TRAINERS.entry(args.target)  # "did you mean" for an unknown target
        targets = [args.target]
    for name in targets:
        kwargs = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("out", args.out)) if v is not None}
        meta = TRAINERS.get(name)(**kwargs)
        energy = ", ".join(f"{m}={v.get('energy_j')}" for m, v in meta["energy"].items() if "status" in v)
        print(f"{name}: trained in {meta['duration_s']:.0f} s; energy (J): {energy}")
    return 0


COMMANDS = {"list": cmd_list, "compare": cmd_compare, "report": cmd_report, "train": cmd_train, "check": cmd_check,
            "make-tiny-pipeline": cmd_make_tiny_pipeline}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"un0-bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
