"""Result records -> pandas tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from un0_bench.harness.running.record import Record
from un0_bench.harness.running.results import ResultStore
from un0_bench.reports.claims import evidence

#: Columns of ``results.csv`` (flat; nested fields stay in results.jsonl).
CSV_COLUMNS = [
    "model", "backbone", "batch_size", "meter", "status", "evidence", "evidence_reason", "images", "repeats",
    "energy_j_per_image",
    "energy_ci95_lo_j", "energy_ci95_hi_j", "energy_net_j_per_image", "idle_power_w", "flops_per_image",
    "gating_flops_per_image", "bytes_per_image", "gating_bytes_per_image", "duration_s_per_image",
    "uncounted_ops", "fid", "fid_std", "kid", "kid_std", "accuracy", "quality_samples", "quality_seeds",
    "quality_matched", "quality_marginal", "measured_at",
]

#: ``quality`` keys flattened into the CSV (``samples`` becomes ``quality_samples``).
_QUALITY_COLUMNS = {"fid": "fid", "fid_std": "fid_std", "kid": "kid", "kid_std": "kid_std", "accuracy": "accuracy",
                    "samples": "quality_samples", "seeds": "quality_seeds"}


def measured(records: list[Record]) -> list[Record]:
    """The records of cells that were measured (failed cells are listed apart: :func:`failed_cells`)."""
    return [r for r in records if not r.failed]


def load_records(out_dir: Path) -> list[Record]:
    """The measured records of a folder."""
    return measured(ResultStore(out_dir).load())


def failed_cells(records: list[Record]) -> list[dict[str, Any]]:
    """Each cell recorded as failed and not measured since: model, batch size, meters, reason."""
    done = {(r.model, r.backbone, r.batch_size, r.meter) for r in records if not r.failed}
    cells: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in records:
        if r.failed and (r.model, r.backbone, r.batch_size, r.meter) not in done:
            cell = cells.setdefault((r.model, r.backbone, r.batch_size), {
                "model": r.model, "backbone": r.backbone, "batch_size": r.batch_size, "meters": [],
                "reason": r.status.removeprefix("failed: "), "executor": r.get("executor")})
            if r.meter not in cell["meters"]:
                cell["meters"].append(r.meter)
    return list(cells.values())


def results_frame(records: list[Record]) -> pd.DataFrame:
    """One row per record, in flat columns.

    The CI is split into lo/hi, uncounted ops become ``op:calls`` text, the quality figures are
    empty where quality was not measured, and a record with energy names its class of evidence
    (counted, measured, time-based estimate) and why.
    """
    classes = {m: evidence(records, m) for m in {r["meter"] for r in records if r.get("energy_j_per_image")}}
    rows = []
    for r in records:
        ci = r.get("energy_ci95_j") or [None, None]
        ev = classes.get(r["meter"]) if r.get("energy_j_per_image") else None
        rows.append({
            **{k: r.get(k) for k in CSV_COLUMNS if k in r},
            "evidence": ev and ev["kind"], "evidence_reason": ev and ev["reason"],
            "energy_ci95_lo_j": ci[0],
            "energy_ci95_hi_j": ci[1],
            "uncounted_ops": "; ".join(f"{k}:{v}" for k, v in (r.get("uncounted_ops") or {}).items()),
            **{col: (r.get("quality") or {}).get(key) for key, col in _QUALITY_COLUMNS.items()},
        })
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def write_csv(records: list[Record], path: Path) -> None:
    results_frame(records).to_csv(path, index=False)


def meter_statuses(records: list[Record]) -> list[dict[str, str]]:
    """Each meter once: its status (the first non-ok reason wins), class of evidence with why, and details."""
    seen: dict[str, dict[str, str]] = {}
    for r in records:
        m = seen.setdefault(r["meter"], {"meter": r["meter"], "status": r["status"], "details": "",
                                         "evidence": "", "evidence_reason": ""})
        if r.get("energy_j_per_image") and not m["evidence"]:
            ev = evidence(records, r["meter"])
            m["evidence"], m["evidence_reason"] = ev["kind"], ev["reason"]
        if r["status"] != "ok":
            m["status"] = r["status"]
        details = r.get("meter_details") or {}
        shown = {k: v for k, v in details.items() if isinstance(v, (str, int, float, bool)) and k != "profile"
                 or k == "profile"}
        if shown and not m["details"]:
            m["details"] = json.dumps(shown, sort_keys=True, default=str)
    return list(seen.values())


def summary_frame(records: list[Record]) -> pd.DataFrame:
    """One row per (model, batch size): J/image for each meter, counts, time and quality.

    Energy columns are named ``J/image <meter> (<class of evidence>)``; a meter that was unavailable
    shows ``None`` (its reason is in the meters table), never 0.
    """
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    # Only meters that gave energy somewhere: an unavailable meter's reason is in the meters table, once.
    meters = list(dict.fromkeys(r["meter"] for r in records if r.get("energy_j_per_image") is not None))
    # Each column names its class of evidence: codecarbon without a sensor is a time-based estimate.
    classes = {m: evidence(records, m)["kind"] for m in meters}

    def col(meter: str) -> str:
        if meter.startswith("projection:"):
            band = next(((r.get("projection") or {}).get("error_band") for r in records if r["meter"] == meter), None)
            return f"J/image {meter} (projected, not measured" + (f"; x/{band:.3g} expected)" if band else ")")
        return f"J/image {meter} ({classes[meter]})"

    for r in records:
        row = rows.setdefault((r["model"], r["batch_size"]), {
            "model": r["model"], "batch": r["batch_size"],
            **{col(m): None for m in meters if m != "wall"},
            "FLOPs/image": r["flops_per_image"], "bytes/image": r["bytes_per_image"], "ms/image": None,
            "FID": None, "KID": None, "accuracy": None, "quality-matched": r.get("quality_matched"),
        })
        if r.get("quality_marginal") and r.get("quality_matched") is not None:
            row["quality-matched"] = ("yes" if r["quality_matched"] else "no") + " (marginal)"
        if r["meter"] in meters and r["meter"] != "wall":
            row[col(r["meter"])] = r.get("energy_j_per_image")
        if r["meter"] == "wall" or (row["ms/image"] is None and r["status"] != "projected"):
            d = r.get("duration_s_per_image")
            row["ms/image"] = None if d is None else d * 1e3
        q = r.get("quality") or {}
        row["FID"], row["KID"], row["accuracy"] = q.get("fid"), q.get("kid"), q.get("accuracy")
    return pd.DataFrame(list(rows.values()))


def _si(v: float) -> str:
    """3 significant digits with an SI suffix: 6.62e9 -> 6.62G."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def format_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """The summary as display strings (3 significant digits, counts with SI suffixes, accuracy in %)."""

    def fmt(col: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "—"
        if col == "accuracy":
            return f"{100 * v:.1f}%"
        if col == "quality-matched":
            return v if isinstance(v, str) else ("yes" if v else "no")
        if col in ("FLOPs/image", "bytes/image") and isinstance(v, (int, float)):
            return _si(float(v))
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    return pd.DataFrame({c: [fmt(c, v) for v in frame[c]] for c in frame.columns})
