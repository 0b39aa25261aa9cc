"""How strong are our baselines: each technique's speed-up and energy factor here next to its published figure.

Read from result records only (and ``published_speedups.csv``, each row with its source): a
technique measured here far below its published speed-up, on hardware unlike the paper's, is a
weak baseline, and the table lets a reader see that at once.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from un0_bench.harness.running.record import Record
from un0_bench.reports.ledger import find_reference

PUBLISHED = Path(__file__).with_name("published_speedups.csv")


def published() -> dict[str, dict[str, str]]:
    """Technique -> its published speed-up, setting, hardware and source."""
    with PUBLISHED.open(encoding="utf-8") as f:
        return {row["technique"]: row for row in csv.DictReader(f)}


def strength_rows(records: list[Record], reference: str) -> list[dict[str, Any]]:
    """One row per measured model whose stack holds a technique with a published figure.

    ``speedup``: the reference's wall time per image over the model's; ``energy``: meter -> the
    reference's energy per image over the model's (gross, the same meter), for every meter with energy.
    """
    figures, rows = published(), {}
    for r in records:
        layers = [layer["name"] for layer in r.get("stack") or []]
        for technique in (t for t in layers if t in figures):
            ref = find_reference(records, r, reference)
            if ref is None or r["model"] == reference:
                continue
            row = rows.setdefault((r["model"], technique), {
                "model": r["model"], "technique": technique, "backbone": r["backbone"], "speedup": None,
                "energy": {}, **{k: figures[technique][k] for k in
                                 ("published_speedup", "published_setting", "published_hardware", "source")}})
            if row["speedup"] is None and r.get("duration_s_per_image") and ref.get("duration_s_per_image"):
                row["speedup"] = ref["duration_s_per_image"] / r["duration_s_per_image"]
            if r.get("energy_j_per_image") and ref.get("energy_j_per_image"):
                row["energy"][r["meter"]] = ref["energy_j_per_image"] / r["energy_j_per_image"]
    return list(rows.values())


def strength_markdown(rows: list[dict[str, Any]], host: str) -> list[str]:
    """The table as GitHub Markdown lines (none when no measured technique has a published figure)."""
    if not rows:
        return []
    lines = ["## How strong are the baselines", "",
             f"Measured here ({host}) against the reference, next to each technique's published speed-up.", "",
             "| model | technique | speed-up here | energy factor here | published | published on | source |",
             "|---|---|---:|---|---:|---|---|"]
    for row in rows:
        speed = f"{row['speedup']:.2f}x" if row["speedup"] else "—"
        energy = ", ".join(f"{m} {f:.2f}x" for m, f in row["energy"].items()) or "—"
        lines.append(f"| `{row['model']}` | {row['technique']} | {speed} | {energy} | {row['published_speedup']}x "
                     f"({row['published_setting']}) | {row['published_hardware']} | {row['source']} |")
    return [*lines, ""]
