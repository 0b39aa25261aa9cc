"""Build ``DIR/results.csv`` and ``DIR/report.html`` from ``DIR/results.jsonl`` alone."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from reports import plots
from reports.tables import load_records, meter_statuses, write_csv


def _data_uri(png: bytes | None) -> str | None:
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode()


def _sample_grids(out_dir: Path, records: list[dict[str, Any]]) -> list[dict[str, str]]:
    grids = []
    for model in dict.fromkeys(r["model"] for r in records):
        rel = next((r.get("sample_grid") for r in records if r["model"] == model and r.get("sample_grid")), None)
        path = out_dir / rel if rel else None
        if path and path.is_file():
            grids.append({"model": model, "src": _data_uri(path.read_bytes())})
    return grids


def build_report(out_dir: Path) -> Path:
    """Write results.csv and a self-contained report.html; returns the HTML path."""
    from reports.html import render

    out_dir = Path(out_dir)
    records = load_records(out_dir)
    write_csv(records, out_dir / "results.csv")
    context = {
        "records": records,
        "meters": meter_statuses(records),
        "plots": {"energy_per_image": _data_uri(plots.energy_per_image(records))},
        "samples": _sample_grids(out_dir, records),
        "environment": records[0]["environment"] if records else {},
    }
    path = out_dir / "report.html"
    path.write_text(render(context))
    return path
