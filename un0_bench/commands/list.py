"""``un0-bench list``: generators, techniques, backbones, training targets, architectures and meters."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    sub.add_parser("list", help="generators, techniques, backbones, meters (and whether each works here), "
                                         "training targets, architectures")


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from un0_bench.harness.registry import BACKBONES, GENERATORS, METERS, TECHNIQUES, TRAINERS
    from un0_bench.harness.running.runner import make_meter

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
