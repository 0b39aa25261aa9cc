"""Build ``DIR/results.csv`` and ``DIR/report.html`` from ``DIR/results.jsonl`` alone (no model runs)."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

from un0_bench.harness.meters.proxy import MEMORY_CAVEAT
from un0_bench.harness.running.config import DEFAULT_GRID_GCO2_PER_KWH
from un0_bench.harness.running.record import Record
from un0_bench.harness.running.results import ResultStore
from un0_bench.reports import plots, projected, units
from un0_bench.reports.claims import (
    BOUNDARY_GLOSSARY,
    GLOSSARY,
    KID_NOTE,
    evaluate_claims,
    evidence,
    headline_claims,
    is_reference,
)
from un0_bench.reports.ledger import (
    BOUNDARIES,
    BOUNDARY_LABELS,
    below_detection_limit,
    find_reference,
    ledger,
    run_settings,
)
from un0_bench.reports.markdown import summary_markdown
from un0_bench.reports.strength import strength_markdown, strength_rows
from un0_bench.reports.tables import (
    failed_cells,
    format_summary,
    measured,
    meter_statuses,
    summary_frame,
    write_csv,
)


def _data_uri(png: bytes | None) -> str | None:
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode()


def _sample_grids(out_dir: Path, records: list[Record]) -> dict[str, str]:
    grids = {}
    for r in records:
        rel = r.get("sample_grid")
        if r["model"] in grids or not rel:
            continue
        path = (out_dir / rel).resolve()
        # Only files inside the output folder: a record cannot make the report embed arbitrary files.
        if path.is_file() and out_dir.resolve() in path.parents:
            grids[r["model"]] = _data_uri(path.read_bytes())
    return grids


def with_ledgers(records: list[Record], reference: str, pue: float, lifetime_images: int) -> list[Record]:
    """The records, each with its ledger (``ledger``) for this report's PUE, lifetime and reference.

    Whatever ledger a record was stored with (schema 1) is replaced: reports compute it from the run's settings.
    """
    out = []
    for r in records:
        ref = r if r["model"] == reference else find_reference(records, r, reference)
        book = ledger(r, ref, pue=pue, lifetime_images=lifetime_images)
        if is_reference(r):
            # A bound (real data, noise), not a generator: its energy is shown, never an efficiency factor.
            for entry in book.values():
                entry["factor_vs_reference"] = None
        out.append(r.with_fields(ledger=book))
    return out


def ledger_rows(records: list[Record], meter: str) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        if r["meter"] != meter:
            continue
        lg = r.get("ledger") or {}
        rows.append({
            "model": r["model"], "batch": r["batch_size"], "quality_matched": r.get("quality_matched"),
            "reference_bound": is_reference(r),
            "quality_marginal": r.get("quality_marginal"),
            "energy": {b: (lg.get(b) or {}).get("energy_j_per_image") for b in BOUNDARIES},
            "factors": {b: (lg.get(b) or {}).get("factor_vs_reference") for b in BOUNDARIES},
            "why": {b: (lg.get(b) or {}).get("why", "") for b in BOUNDARIES},
        })
    return rows


#: The meter name of the DRAM-priced proxy ledger (a report-side view of proxy records, never measured).
DRAM_METER = "proxy-dram"


def dram_priced(records: list[Record]) -> list[Record]:
    """Proxy records re-priced with their DRAM profile (``proxy_dram_j_per_image_by_part``), as meter ``proxy-dram``."""
    out = []
    for r in records:
        parts = r.get("proxy_dram_j_per_image_by_part")
        if r["meter"] != "proxy" or r.get("status") != "ok" or not parts:
            continue
        out.append(r.with_fields(meter=DRAM_METER, proxy_j_per_image_by_part=parts,
                                 energy_j_per_image=math.fsum(parts.values()), energy_j_per_image_by_domain={},
                                 proxy_profile=r.get("proxy_dram_profile"), proxy_memory_level="DRAM"))
    return out


def _ledgers(records: list[Record], dram: list[Record], meters: list[str]) -> dict[str, Any]:
    """Ledger rows per meter, the DRAM-priced proxy right after the proxy (side by side)."""
    out: dict[str, Any] = {}
    for m in meters:
        out[m] = ledger_rows(records, m)
        if m == "proxy" and dram:
            out[DRAM_METER] = ledger_rows(dram, DRAM_METER)
    return out


def footprint_rows(records: list[Record], pue: float, grid: float) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        e = r.get("energy_j_per_image")
        if not e:
            continue
        rows.append({
            "model": r["model"], "meter": r["meter"], "batch": r["batch_size"],
            "kwh_per_1000": units.kwh_per_1000_images(e),
            "gco2e_per_1000": units.gco2e_per_1000_images(e * pue, grid),
            "landauer_multiple": units.landauer_multiple(e, r.get("flops_per_image_by_dtype") or {}),
        })
    return rows


def build_report(out_dir: Path, options: dict[str, Any] | None = None) -> Path:
    """Write results.csv, a self-contained report.html and summary.md (Markdown); returns the HTML path.

    ``options``: ``grid_gco2_per_kwh``, and ``reference``, ``pue``, ``lifetime_images`` as overrides
    of the run's own settings (``None`` or absent: the run's).
    """
    from un0_bench.reports.html import render

    options = options or {}
    out_dir = Path(out_dir)
    stored = ResultStore(out_dir).load()  # read once: each bad line is reported once
    records, failed = measured(stored), failed_cells(stored)
    opts = {**run_settings(records, options),
            "grid_gco2_per_kwh": options.get("grid_gco2_per_kwh") or DEFAULT_GRID_GCO2_PER_KWH}
    records = with_ledgers(records, opts["reference"], opts["pue"], opts["lifetime_images"])
    write_csv(records, out_dir / "results.csv")
    meters_with_energy = list(dict.fromkeys(r["meter"] for r in records if r.get("energy_j_per_image")))
    proxy_ledger = ledger_rows(records, "proxy")
    dram = with_ledgers(dram_priced(records), opts["reference"], opts["pue"], opts["lifetime_images"])
    records = [r.with_fields(below_detection_limit=below_detection_limit(r)) for r in records]
    summary = format_summary(summary_frame(records)) if records else None
    models = list(dict.fromkeys(r["model"] for r in records))
    details = []
    for model in models:
        recs = [r for r in records if r["model"] == model]
        first = recs[0]
        details.append({
            "model": model, "config": first.get("config", {}).get("generator", {}),
            "derivation_command": first.get("derivation_command"), "derivation_energy": first.get("derivation_energy"),
            "cache": first.get("cache"), "projected": first.get("projected"), "quality": first.get("quality"),
            "cold": {k.removeprefix("cold_"): v for k, v in first.items() if k.startswith("cold_")
                     and k in ("cold_flops_per_image", "cold_gating_flops_per_image", "cold_gating_bytes_per_image",
                               "cold_bytes_per_image")},
            "flops_by_dtype": first.get("flops_per_image_by_dtype"), "uncounted_ops": first.get("uncounted_ops") or {},
            "gating_flops": first.get("gating_flops_per_image"), "gating_bytes": first.get("gating_bytes_per_image"),
            "flops": first.get("flops_per_image"), "bytes": first.get("bytes_per_image"),
            "phases": first.get("phases"), "phase_images": first.get("images"),
            "quality_note": first.get("quality_note"),
        })
    claims = evaluate_claims(records, opts["reference"])
    kinds = {m: evidence(records, m) for m in meters_with_energy}
    kinds = dict(sorted(kinds.items(), key=lambda kv: kv[0] != "proxy"))
    lead = next((c for c in claims if c["measure"] == "energy" and c["model"]), None)
    env = records[0]["environment"] if records else {}
    question = {
        "claim": lead["claim"] if lead else None, "model": lead["model"] if lead else None,
        "reference": opts["reference"],
        "backbones": sorted({r["backbone"] for r in records}),
        "host": ", ".join(str(x) for x in [env.get("cpu"), *(env.get("gpus") or [])] if x) or "unknown host",
    }
    fits = plots.proxy_vs_measured(records, is_reference)
    scale = projected.scale_rows(records)
    strength = strength_rows(records, opts["reference"])
    context = {
        "strength": strength,
        "question": question,
        "lead": lead,
        "proxy_fits": fits,
        "frontiers": {m: [name for _, _, name in plots.generator_front(records, m, is_reference)] for m in kinds},
        "records": records,
        "projected_rows": projected.projected_rows(records),
        "projection_notes": projected.projection_notes(records),
        "validation": projected.validation_rows(records),
        "scale": scale,
        "options": opts,
        "summary_columns": list(summary.columns) if summary is not None else [],
        "summary_rows": summary.to_dict("records") if summary is not None else [],
        "boundaries": list(BOUNDARIES),
        "boundary_labels": BOUNDARY_LABELS,
        "ledgers": _ledgers(records, dram, meters_with_energy),
        "ledger_titles": {DRAM_METER: "proxy-dram (the same counts, every byte priced as a DRAM access)"},
        "memory_caveat": MEMORY_CAVEAT,
        "memory_levels": sorted({str(r["proxy_memory_level"]) for r in records if r.get("proxy_memory_level")}),
        "claims": claims,
        "headlines": headline_claims(claims),
        "glossary": GLOSSARY,
        "boundary_glossary": BOUNDARY_GLOSSARY,
        "kid_note": KID_NOTE,
        "footprint": footprint_rows(records, opts["pue"], opts["grid_gco2_per_kwh"]),
        "landauer_j_per_bit": units.LANDAUER_J_PER_BIT_300K,
        "meters": meter_statuses(records),
        "failed": failed,
        "plots": {
            "energy_per_image": _data_uri(plots.energy_per_image(records)),
            "energy_vs_quality": _data_uri(plots.energy_vs_quality(records, is_reference, kinds)),
            "ladder": _data_uri(plots.ladder(lead["table"], list(BOUNDARIES), BOUNDARY_LABELS, lead["claimed_low"],
                                             f"{lead['model']} vs {opts['reference']}") if lead else None),
            "ledger": _data_uri(plots.ledger_factors(proxy_ledger, list(BOUNDARIES), BOUNDARY_LABELS)),
            "flops_vs_joules": _data_uri(plots.flops_vs_joules(records)),
            "proxy_vs_measured": _data_uri(plots.proxy_vs_measured_plot(fits)),
            "scale": _data_uri(projected.scale_plot(scale)),
            "joules": _data_uri(plots.joules_stacked(plots.where_the_joules_go(records, is_reference))),
        },
        "samples": _sample_grids(out_dir, records),
        "details": details,
        "environment": records[0]["environment"] if records else {},
        "run_config": (records[0].get("config") or {}).get("run", {}) if records else {},
    }
    path = out_dir / "report.html"
    path.write_text(render(context))
    (out_dir / "summary.md").write_text(summary_markdown(question, claims, context["summary_rows"],
                                                         context["summary_columns"], failed, context["meters"])
                                        + "\n".join(["", *strength_markdown(strength, question["host"])]))
    return path
