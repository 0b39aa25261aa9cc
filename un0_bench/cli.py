"""``un0-bench``: list, compare, report, train, count.

Bad input (unknown names, bad numbers, unwritable folders) ends with one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from un0_bench.command import add_run_parser, cmd_run
from un0_bench.harness.config import finite, models_list, non_negative, non_negative_int, path_arg, positive_int
from un0_bench.harness.errors import UserError

#: ``compare``'s options that go to the backbone (diffusers backbones only).
_BACKBONE_OPTIONS = (("device", "diffusers backbones: cpu (default), cuda or cuda:N"),
                     ("dtype", "diffusers backbones: fp32 (default), fp16 or bf16"),
                     ("prompts", "diffusers backbones: prompts file, one per line"))


def _ledger_options(p: argparse.ArgumentParser, overrides: bool = False) -> None:
    from un0_bench.harness.config import DEFAULT_GRID_GCO2_PER_KWH

    if overrides:
        # A report reads the run's own reference, PUE and lifetime from its records; these override them.
        p.add_argument("--reference", default=None, help="override the run's reference model (its energy is 1x)")
        p.add_argument("--pue", type=finite, default=None, help="override the run's power usage effectiveness")
        p.add_argument("--lifetime-images", type=positive_int, default=None,
                       help="override the run's images served over a model's life")
    p.add_argument("--grid-gco2-per-kwh", type=non_negative, default=DEFAULT_GRID_GCO2_PER_KWH,
                   help=f"grid carbon intensity for gCO2e figures (default {DEFAULT_GRID_GCO2_PER_KWH:g}, codecarbon's "
                        "world average)")


def _run_options(c: argparse.ArgumentParser) -> None:
    """``compare``'s options, built from :class:`RunConfig`'s fields (their one home, with their help)."""
    import dataclasses

    from un0_bench.harness.config import RunConfig

    for f in dataclasses.fields(RunConfig):
        meta = f.metadata
        if not meta.get("cli", False):
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        text = ",".join(map(str, default)) if isinstance(default, list) else default
        shown = "" if default is None else f" (default: {text})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"] + shown}
        if meta.get("parse") is not None:
            kwargs["type"] = meta["parse"]
        if f.name == "models":
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        c.add_argument(flag, **kwargs)


def _executor_options(c: argparse.ArgumentParser) -> None:
    from un0_bench.harness.config import DEFAULT_CELL_CPUS, DEFAULT_CELL_RETRIES, DEFAULT_EXECUTOR

    c.add_argument("--executor", default=DEFAULT_EXECUTOR,
                   help="where cells run: local, ray (the cluster at RAY_ADDRESS, else a local one) or ray:ADDRESS "
                        f"(default: {DEFAULT_EXECUTOR})")
    c.add_argument("--allow-mixed", action="store_true",
                   help="ray: run even if nodes differ in un0-bench version or weights (recorded in every record)")
    c.add_argument("--retries", type=non_negative_int, default=DEFAULT_CELL_RETRIES,
                   help=f"ray: times a cell whose worker died is tried again (default: {DEFAULT_CELL_RETRIES})")
    c.add_argument("--cell-cpus", type=positive_int, default=DEFAULT_CELL_CPUS,
                   help=f"ray: CPUs (torch threads) a CPU cell asks for (default: {DEFAULT_CELL_CPUS})")


def make_executor(args: argparse.Namespace) -> Any:
    from un0_bench.harness.config import DEFAULT_CELL_CPUS, DEFAULT_CELL_RETRIES
    from un0_bench.harness.executors import make_executor as make

    if args.executor.partition(":")[0] != "ray":
        for flag, given in (("--allow-mixed", args.allow_mixed), ("--retries", args.retries != DEFAULT_CELL_RETRIES),
                            ("--cell-cpus", args.cell_cpus != DEFAULT_CELL_CPUS)):
            if given:
                raise UserError(f"{flag} applies to --executor ray only")
        return make(args.executor)
    return make(args.executor, retries=args.retries, allow_mixed=args.allow_mixed, cpus_per_cell=args.cell_cpus)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's convention too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="un0-bench", description="Energy, FLOPs and quality per image, side by side.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("list", help="generators, backbones and meters (and whether each meter works here)")

    c = sub.add_parser("compare", help="measure models side by side and write a report")
    _run_options(c)
    for name, text in _BACKBONE_OPTIONS:
        c.add_argument(f"--{name}", default=None, help=text, type=path_arg if name == "prompts" else str)
    _ledger_options(c)
    _executor_options(c)
    c.add_argument("--no-report", action="store_true", help="write results only")
    c.add_argument("--fresh", action="store_true", help="start --out over: its earlier results are moved aside "
                                                        "(needed when they were measured with other options)")

    r = sub.add_parser("report", help="rebuild the report of a folder from its results.jsonl alone")
    r.add_argument("dir", type=path_arg)
    _ledger_options(r, overrides=True)

    k = sub.add_parser("check", help="CI energy gate: recount a small proxy-only suite against a baseline")
    k.add_argument("--baseline", type=Path, default=Path("bench/baseline.json"))
    k.add_argument("--tolerance", type=non_negative, default=0.01, help="relative change allowed (0.01 = 1%%)")
    k.add_argument("--models", type=models_list, default=None, help="default: every registered generator")
    k.add_argument("--update", action="store_true", help="rewrite the baseline with the current figures")
    k.add_argument("--run", type=path_arg, default=None, help="gate the records of a run folder (your own generator, "
                                                              "from un0_bench.measure or un0-bench run) instead of "
                                                              "the built-in suite")

    _estimate_options(sub)

    m = sub.add_parser("make-tiny-pipeline", help="write a tiny Stable Diffusion pipeline (for smoke tests)")
    m.add_argument("dir", type=path_arg)

    _count_parser(sub)
    add_run_parser(sub)  # issue 23: un0-bench run -- CMD

    t = sub.add_parser("train", help="reproduce a shipped weights file from its seed")
    t.add_argument("target", help="what to train (see `un0-bench list`), or all")
    t.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the shipped run's)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--out", type=path_arg, default=None,
                   help="weights file (default: the shipped location; sd-distilled writes <stem>-4 and <stem>-1 "
                        "beside it)")
    return p


def _estimate_options(sub: Any) -> None:
    """``estimate`` and ``calibrate`` (issue 14, part B): projections of counted architectures."""
    e = sub.add_parser("estimate", help="count a real architecture (no weights) and project its time and energy "
                                        "per image on a GPU profile: a projection, not a measurement")
    e.add_argument("--arch", required=True,
                   help="architecture: sd15, sd21, sdxl, sdxl-turbo, adm-imagenet64, un0-... (as `un0-bench count`)")
    e.add_argument("--profile", default="a100-sxm4-40gb",
                   help="GPU profile(s), comma-separated (harness/meters/gpu_profiles.csv; default a100-sxm4-40gb)")
    e.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the architecture's)")
    e.add_argument("--resolution", type=positive_int, default=None,
                   help="image side in pixels (default: the architecture's)")
    e.add_argument("--batch-size", type=positive_int, default=1)
    e.add_argument("--guidance", type=non_negative, default=None,
                   help="classifier-free guidance scale; above 1 doubles the denoiser passes (default: the "
                        "architecture's)")
    e.add_argument("--dtype", default="fp16", help="dtype the work is counted in (default fp16, as served on a GPU)")
    e.add_argument("--flags", default=None,
                   help="torch math flags of the run: cudnn_allow_tf32=1|0, matmul_allow_tf32=1|0, sdpa=auto|math, "
                        "comma-separated (default: torch's, cudnn_allow_tf32=1, matmul_allow_tf32=0, sdpa=auto)")
    e.add_argument("--calibration", type=path_arg, default=None,
                   help="calibration file (default: the shipped one, fitted on ML.ENERGY's SD 2.1 batch 1 and SDXL "
                        "batch 8 on A100)")
    e.add_argument("--out", type=path_arg, default=None, help="report folder (default runs/estimate-<time>)")
    e.add_argument("--no-report", action="store_true", help="write results only")

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


def cmd_estimate(args: argparse.Namespace) -> int:
    from un0_bench import estimate
    from un0_bench.harness.projection import load_calibration, parse_flags

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

def _count_parser(sub: Any) -> None:
    """``un0-bench count``: its options."""
    c = sub.add_parser("count", help="count the work of a real architecture on the meta device (no weights, no "
                                     "download): FLOPs and bytes per image, per phase and per module")
    c.add_argument("--arch", required=True, type=models_list,
                   help="architecture(s), comma-separated (see `un0-bench list`: sd15, sd21, sdxl, sdxl-turbo, "
                        "adm-imagenet64, un0-imagenet64-16384, ...)")
    c.add_argument("--models", type=models_list, default=None,
                   help="stacks to count, as in compare (sd, sd+cached, sd-int8, sd-fp16); default: the arch's own "
                        "model (sd; un0-osc for un0-*)")
    c.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the arch's)")
    c.add_argument("--resolution", type=positive_int, default=None, help="image side in pixels (default: the arch's)")
    c.add_argument("--batch-size", type=positive_int, default=1, help="images per sampler run (default: 1)")
    c.add_argument("--guidance", type=finite, default=None,
                   help="classifier-free guidance scale (default: the arch's; above 1 doubles the denoiser batch)")
    c.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="dtype of every component (default: the arch's; fp16 for the SD family)")
    c.add_argument("--out", type=path_arg, default=None,
                   help="folder for results.jsonl (default: runs/count-<UTC time>); records are appended")


def cmd_count(args: argparse.Namespace) -> int:
    """Count each arch x model once and append the counted records (``status: counted``) to results.jsonl."""
    from un0_bench.backbones.archs import count_arch, default_model
    from un0_bench.harness.results import ResultStore, check_writable
    from un0_bench.reports.counts import format_counted

    out = args.out or Path("runs") / time.strftime("count-%Y%m%d-%H%M%S", time.gmtime())
    check_writable(out)
    store = ResultStore(out)
    for arch in args.arch:
        for model in args.models or [default_model(arch)]:
            record = count_arch(arch, model, steps=args.steps, resolution=args.resolution, batch_size=args.batch_size,
                                guidance=args.guidance, dtype=args.dtype)
            store.append([record])
            print(format_counted(record))
    print(f"counted records (work, not measurements) appended to {store.path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from un0_bench.harness.registry import BACKBONES, GENERATORS, METERS, TECHNIQUES, TRAINERS
    from un0_bench.harness.runner import make_meter

    console = Console(width=180)
    kinds = BACKBONES.names()
    table = Table(title="generators: base models, and names that stand for stacks")
    table.add_column("name")
    table.add_column("what it is")
    for kind in kinds:
        table.add_column(f"on {kind}")
    for e in GENERATORS:
        cells = [(f"= {e.alias[k]}" if e.is_alias(k) else "yes") if e.supports(k) else f"no: {e.why_not(k)}"
                 for k in kinds]
        table.add_row(e.name, e.summary, *cells)
    console.print(table)
    table = Table(title="techniques: stack left to right on sd and its derived models (sd-distilled+int8, "
                        "sd:steps=20+cached:interval=3)")
    table.add_column("name")
    table.add_column("what it is")
    table.add_column("parameters")
    table.add_column("stacks")
    for kind in kinds:
        table.add_column(f"on {kind}")
    for e in TECHNIQUES:
        tech = TECHNIQUES.get(e.name)
        params = ", ".join(f"{k} ({p.valid_range()}, default {p.default})" for k, p in tech.params.items()) or "-"
        cells = ["yes" if e.supports(k) else f"no: {e.why_not(k)}" for k in kinds]
        table.add_row(e.name, e.summary, params, tech.stacking, *cells)
    console.print(table)
    for title, reg in (("backbones", BACKBONES), ("training targets", TRAINERS)):
        table = Table(title=title, show_lines=False)
        table.add_column("name")
        table.add_column("what it is")
        for e in reg:
            table.add_row(e.name, e.summary)
        console.print(table)
    _list_archs(console)
    table = Table(title="meters on this host")
    table.add_column("name")
    table.add_column("status")
    table.add_column("what it is")
    for e in METERS:
        m = make_meter(e.name)
        status = m if isinstance(m, str) else "ok"
        if not isinstance(m, str):
            m.close()
        table.add_row(e.name, escape(status), escape(e.summary))  # "un0-bench[zeus]" is text, not rich markup
    console.print(table)
    return 0


def _list_archs(console: Any) -> None:
    """The table of shipped architectures (``--backbone arch:NAME``, ``un0-bench count --arch NAME``)."""
    from rich.table import Table

    from un0_bench.backbones.archs import ARCH_NAMES, arch_config

    table = Table(title="architectures (arch:NAME): shipped configs, built on the meta device and counted, never run")
    for col in ("name", "what it is", "family", "steps", "resolution", "guidance", "dtype"):
        table.add_column(col)
    for name in ARCH_NAMES:
        cfg = arch_config(name)
        d = cfg.get("defaults", {})
        table.add_row(name, cfg.get("title", ""), cfg["family"], str(d.get("steps")), str(d.get("resolution")),
                      str(d.get("guidance")), str(d.get("dtype")))
    console.print(table)


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
    import dataclasses

    from rich.progress import Progress

    from un0_bench.harness.results import ResultStore
    from un0_bench.harness.runner import RunConfig, Runner

    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    is_pipeline = args.backbone.partition(":")[0] == "diffusers"
    options = {k: v for k, v in (("device", args.device), ("dtype", args.dtype), ("prompts_file", args.prompts))
               if v is not None}
    if options and not is_pipeline:
        flag = {"device": "--device", "dtype": "--dtype", "prompts_file": "--prompts"}[next(iter(options))]
        raise UserError(f"{flag} applies to diffusers:PATH backbones only")
    if args.clip and not is_pipeline:
        raise UserError("--clip applies to diffusers:PATH backbones only (digits quality uses its own judge)")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if f.metadata.get("cli")}
    cfg = RunConfig(**{**given, "out": out, "backbone_options": options, "fresh": args.fresh})
    live: dict[str, Any] = {}

    def on_event(kind: str, info: dict[str, Any]) -> None:
        bar, task = live.get("bar"), live.get("task")
        if kind == "note":
            if bar is not None:
                bar.console.print(f"un0-bench: note: {info['text']}", markup=False, highlight=False)
            else:
                print(f"un0-bench: note: {info['text']}", file=sys.stderr)
        elif bar is None:
            return
        elif kind == "plan":
            bar.update(task, total=info["cells"])
        elif kind == "cell":
            bar.update(task, description=f"measuring {info['model']} (batch {info['batch_size']})")
        elif kind == "quality":
            bar.update(task, description=f"quality of {info['model']}")
        elif kind in ("done", "failed") and "progress" not in live:
            bar.advance(task)
        elif kind == "progress":  # a cluster: cells done / running / failed, in all and per node
            live["progress"] = info
            nodes = "; ".join(f"{node[:8]} {n['done']}/{n['running']}/{n['failed']}"
                              for node, n in sorted(info["nodes"].items()))
            bar.update(task, completed=info["done"] + info["failed"],
                       description=f"{info['done']} done, {info['running']} running, {info['failed']} failed"
                                   + (f" (per node done/running/failed: {nodes})" if nodes else ""))

    # Pre-flight (names, stacks, numbers, the folder, the cluster) before any progress bar: a refused run
    # prints one line.
    executor = make_executor(args)
    try:
        runner = Runner(cfg, on_event=on_event, executor=executor)
        with Progress(transient=True) as bar:
            live.update(bar=bar, task=bar.add_task("measuring", total=None))
            try:
                runner.run()
            except KeyboardInterrupt:
                kept = len(ResultStore(out).load())
                print(f"interrupted: {kept} finished records kept in {out}; run the same command to resume",
                      file=sys.stderr)
                return 130
    finally:
        getattr(executor, "shutdown", lambda: None)()
    from un0_bench.reports.tables import failed_cells, is_failed

    measured = {s.canonical for s in runner.stacks.values()}
    mine = [r for r in ResultStore(out).load() if r["backbone"] == cfg.backbone
            and (r["model"] in cfg.models or runner.canonical_of(r) in measured)]
    print_records([r for r in mine if not is_failed(r)])
    for f in failed_cells(mine):
        print(f"failed: {f['model']} (batch {f['batch_size']}): {f['reason']}")
    if not args.no_report:
        from un0_bench.reports.build import build_report

        path = build_report(out, report_options(args))
        print_verdicts(out)
        print(f"report: {path}")
    return 0


def print_verdicts(out: Path) -> None:
    """Each claim's headline sentence and the other classes beneath it, as the report's first screen gives them."""
    from un0_bench.harness.ledger import run_settings
    from un0_bench.reports.build import with_ledgers
    from un0_bench.reports.claims import evaluate_claims, headline_claims
    from un0_bench.reports.tables import load_records, meter_statuses

    records = load_records(out)
    settings = run_settings(records)
    with_ledgers(records, settings["reference"], settings["pue"], settings["lifetime_images"])
    for row in headline_claims(evaluate_claims(records, settings["reference"])):
        vs = f" ({row['model']} vs {settings['reference']})" if row["model"] else ""
        print(f"claim: {row['claim']}{vs}\n  {row['headline']}" + "".join(f"\n    {s}" for s in row["others"]))
    for m in meter_statuses(records):
        if m["evidence"] and m["evidence"] != "counted":
            print(f"evidence: {m['meter']}: {m['evidence']} ({m['evidence_reason']})")


def cmd_report(args: argparse.Namespace) -> int:
    from un0_bench.reports.build import build_report

    if not (args.dir / "results.jsonl").is_file():
        raise UserError(f"{args.dir} has no results.jsonl")
    print(f"report: {build_report(args.dir, report_options(args))}")
    return 0


def report_options(args: argparse.Namespace) -> dict[str, Any]:
    """The report's options: after ``compare``, the run's own settings; ``report DIR`` may override them."""
    if args.command == "compare":
        return {"grid_gco2_per_kwh": args.grid_gco2_per_kwh}
    if args.pue is not None and args.pue < 1:
        raise UserError(f"--pue must be >= 1, got {args.pue}")
    return {"pue": args.pue, "lifetime_images": args.lifetime_images, "grid_gco2_per_kwh": args.grid_gco2_per_kwh,
            "reference": args.reference}


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


def cmd_make_tiny_pipeline(args: argparse.Namespace) -> int:
    from un0_bench.backbones.tiny_pipeline import make_tiny_pipeline
    from un0_bench.harness.results import check_writable

    check_writable(args.dir, "pipeline folder")
    try:
        written = make_tiny_pipeline(args.dir)
    except OSError as e:
        raise UserError(f"cannot write the pipeline to {args.dir}: {e.strerror or e}") from None
    print(f"tiny pipeline written: {written}")
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
    if args.out is not None:
        from un0_bench.harness.results import check_file_writable

        check_file_writable(args.out, "weights file")  # before training, not minutes after
    for name in targets:
        kwargs = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("out", args.out)) if v is not None}
        meta = TRAINERS.get(name)(**kwargs)
        energy = ", ".join(f"{m}={v.get('energy_j')}" for m, v in meta["energy"].items() if "status" in v)
        print(f"{name}: trained in {meta['duration_s']:.0f} s; energy (J): {energy}")
    return 0


COMMANDS = {"list": cmd_list, "compare": cmd_compare, "report": cmd_report, "train": cmd_train, "check": cmd_check,
            "make-tiny-pipeline": cmd_make_tiny_pipeline, "count": cmd_count}


def _ours(filename: str) -> bool:
    """Whether a warning comes from this project's code (not from a third-party library)."""
    root = str(Path(__file__).resolve().parent.parent)
    return filename.startswith(root) and "site-packages" not in filename and "/.venv/" not in filename


COMMANDS.update(estimate=cmd_estimate, calibrate=cmd_calibrate)  # issue 14, part B
COMMANDS.update(run=cmd_run)  # issue 23


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
