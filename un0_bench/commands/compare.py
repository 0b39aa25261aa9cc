"""``un0-bench compare``: measure models side by side and write a report."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from un0_bench.commands.options import ledger_options, print_records, report_options
from un0_bench.harness.errors import UserError
from un0_bench.harness.running.config import path_arg

#: ``compare``'s options that go to the backbone (diffusers backbones only).
_BACKBONE_OPTIONS = (("device", "diffusers backbones: cpu (default), cuda or cuda:N"),
                     ("dtype", "diffusers backbones: fp32 (default), fp16 or bf16"),
                     ("prompts", "diffusers backbones: prompts file, one per line"))


def add_parser(sub: Any) -> None:
    c = sub.add_parser("compare", help="measure models side by side and write a report")
    _run_options(c)
    for name, text in _BACKBONE_OPTIONS:
        c.add_argument(f"--{name}", default=None, help=text, type=path_arg if name == "prompts" else str)
    ledger_options(c)
    c.add_argument("--no-report", action="store_true", help="write results only")


def _run_options(c: argparse.ArgumentParser) -> None:
    """``compare``'s options, built from the fields of the run's per-axis configs (their one home, with their help)."""
    from un0_bench.harness.running.config import axis_fields, default_of

    for _, f in axis_fields():
        meta = f.metadata
        if not meta.get("cli", False):
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = default_of(f)
        kwargs: dict[str, Any] = {"dest": f.name}
        if f.type in ("bool", bool):  # a switch: off unless given
            c.add_argument(flag, action="store_true", help=meta["help"], **kwargs)
            continue
        text = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        kwargs["help"] = meta["help"] + ("" if default is None else f" (default: {text})")
        if meta.get("parse") is not None:
            kwargs["type"] = meta["parse"]
        if f.name == "models":
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        c.add_argument(flag, **kwargs)


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from un0_bench.harness.executors import make_executor
    from un0_bench.harness.running.config import axis_fields
    from un0_bench.harness.running.results import ResultStore
    from un0_bench.harness.running.runner import RunConfig, Runner

    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    is_pipeline = args.backbone.partition(":")[0] == "diffusers"
    options = {k: v for k, v in (("device", args.device), ("dtype", args.dtype), ("prompts_file", args.prompts))
               if v is not None}
    if options and not is_pipeline:
        flag = {"device": "--device", "dtype": "--dtype", "prompts_file": "--prompts"}[next(iter(options))]
        raise UserError(f"{flag} applies to diffusers:PATH backbones only")
    if args.clip and not is_pipeline:
        raise UserError("--clip applies to diffusers:PATH backbones only (digits quality uses its own judge)")
    given = {f.name: getattr(args, f.name) for _, f in axis_fields() if f.metadata.get("cli")}
    cfg = RunConfig.of(**{**given, "out": out, "backbone_options": options})
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
    executor = make_executor(cfg.executor)
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
    from un0_bench.reports.tables import failed_cells, measured

    plan = runner.plan
    canonical = {s.canonical for _, s in plan.stacks}
    mine = [r for r in ResultStore(out).load() if r.backbone == cfg.sweep.backbone
            and (r.model in plan.models or runner.canonical_of(r) in canonical)]
    print_records(measured(mine))
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
    from un0_bench.reports.build import with_ledgers
    from un0_bench.reports.claims import evaluate_claims, headline_claims
    from un0_bench.reports.ledger import run_settings
    from un0_bench.reports.tables import load_records, meter_statuses

    records = load_records(out)
    settings = run_settings(records)
    records = with_ledgers(records, settings["reference"], settings["pue"], settings["lifetime_images"])
    for row in headline_claims(evaluate_claims(records, settings["reference"])):
        vs = f" ({row['model']} vs {settings['reference']})" if row["model"] else ""
        print(f"claim: {row['claim']}{vs}\n  {row['headline']}" + "".join(f"\n    {s}" for s in row["others"]))
    for m in meter_statuses(records):
        if m["evidence"] and m["evidence"] != "counted":
            print(f"evidence: {m['meter']}: {m['evidence']} ({m['evidence_reason']})")
