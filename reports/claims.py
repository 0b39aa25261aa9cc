"""Claims versus measured: each claim from a data file next to what a run measured.

A claim's verdict is a table, not one word: for each meter that measured energy (the proxy counts,
the others measure; a meter that estimated is marked) and each accounting boundary, the factor vs the
reference with its 95% CI. The one-line verdict names where the claim holds and where it fails, and
it reads "holds" only if the claim holds on a measured meter whenever the run has one.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
from pathlib import Path
from typing import Any

from un0_bench.harness.ledger import BOUNDARIES, BOUNDARY_LABELS

CLAIMS_FILE = Path(__file__).with_name("claims.csv")

#: Models that bound the scale rather than generate: they never win a claim, never sit on a frontier.
REFERENCE_MODELS = ("real", "noise")

_PHRASES = {"compute": "active compute", "gating": "+ gating", "memory": "+ memory", "idle": "+ idle power",
            "pue": "x PUE", "training": "+ amortised training"}

HOLDS, FAILS, WITHIN = "holds", "fails", "within uncertainty"


def is_projection(meter: str) -> bool:
    """A projection of counted work on a GPU profile (``projection:<profile>``): never a measurement."""
    return meter.startswith("projection:")


def is_reference(record: dict[str, Any]) -> bool:
    """A bound (`real` data, `noise`), not a generator: by its technique, else by its name."""
    gen = (record.get("config") or {}).get("generator") or {}
    return gen.get("technique") == "reference" or record["model"] in REFERENCE_MODELS


def load_claims(path: Path | None = None) -> list[dict[str, Any]]:
    text = (path or CLAIMS_FILE).read_text()
    rows = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    out = []
    for row in csv.DictReader(io.StringIO("\n".join(rows))):
        row["models"] = row["models"].split()
        row["claimed_low"], row["claimed_high"] = float(row["claimed_low"]), float(row["claimed_high"])
        out.append(row)
    return out


def _matches(model: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(model, p) for p in patterns)


def _parameters(record: dict[str, Any]) -> float | None:
    return ((record.get("config") or {}).get("generator") or {}).get("parameters")


def fmt_factor(f: float | None) -> str:
    if f is None:
        return "—"
    if math.isinf(f):
        return "∞x"
    return f"{f:,.0f}x" if f >= 100 else f"{f:.3g}x"


def meter_kind(records: list[dict[str, Any]], meter: str) -> dict[str, Any]:
    """How a meter knows its figure: the proxy counts; others measure, some of them by estimate."""
    estimate = any((r.get("meter_details") or {}).get("estimate") for r in records if r["meter"] == meter)
    if is_projection(meter):
        return {"meter": meter, "kind": "projected", "estimate": False,
                "label": f"projected on {meter.partition(':')[2]} (not measured)"}
    if meter == "proxy":
        return {"meter": meter, "kind": "counted", "estimate": False, "label": "op-count proxy"}
    return {"meter": meter, "kind": "measured", "estimate": estimate,
            "label": f"measured {meter} energy" + (" (estimate)" if estimate else "")}


def energy_ci(record: dict[str, Any], boundary: str) -> tuple[float, float] | None:
    """95% CI of the record's energy per image at ``boundary`` (ledger already attached).

    The proxy counts, so its CI is zero width; a measured figure without an interval (one window) is
    unbounded, so no claim holds or fails on it. A measured meter's boundary 3 is its energy net of idle
    (the net CI if recorded); the other boundaries scale the gross CI by their energy (PUE multiplies;
    the amortised training term is treated as exact, so its relative CI is the gross one's, a slight
    over-statement).
    """
    e = ((record.get("ledger") or {}).get(boundary) or {}).get("energy_j_per_image")
    if e is None:
        return None
    if record["meter"] == "proxy":
        return (e, e)
    if boundary == "memory" and record.get("energy_net_ci95_j"):
        lo, hi = record["energy_net_ci95_j"]
        return (float(lo), float(hi))
    gross, ci = record.get("energy_j_per_image"), record.get("energy_ci95_j")
    if not gross or not ci:
        # One window has no interval: the measured figure could be anything, not exact.
        return (0.0, math.inf)
    return (e * ci[0] / gross, e * ci[1] / gross)


def factor_ci(mine: tuple[float, float], ref: tuple[float, float]) -> tuple[float, float]:
    """Reference / model from both CIs: lowest = ref low / model high, highest = ref high / model low."""
    lo = ref[0] / mine[1] if mine[1] > 0 else math.inf
    hi = ref[1] / mine[0] if mine[0] > 0 else math.inf
    return (lo, hi)


def cell_status(ci: tuple[float, float], claimed_low: float) -> str:
    if ci[0] >= claimed_low:
        return HOLDS
    if ci[1] < claimed_low:
        return FAILS
    return WITHIN


def _find(records: list[dict[str, Any]], model: str, meter: str, like: dict[str, Any] | None = None):
    same = [r for r in records if r["model"] == model and r["meter"] == meter
            and (like is None or r["backbone"] == like["backbone"])]
    exact = [r for r in same if like is not None and r["batch_size"] == like["batch_size"]]
    return (exact or same or [None])[0]


def verdict_table(records: list[dict[str, Any]], model: str, reference: str, claimed_low: float,
                  like: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per meter that measured ``model``'s energy: the factor with its 95% CI at each boundary."""
    meters = list(dict.fromkeys(r["meter"] for r in records if r["model"] == model and r.get("status") == "ok"
                                and r.get("energy_j_per_image")))
    meters.sort(key=lambda m: m != "proxy")  # the counted figure first, then the measured ones
    rows = []
    for meter in meters:
        mine = _find(records, model, meter, like)
        ref = _find(records, reference, meter, mine)
        cells = {}
        for b in BOUNDARIES:
            entry = (mine.get("ledger") or {}).get(b) or {}
            cell: dict[str, Any] = {"energy": entry.get("energy_j_per_image"), "factor": None, "ci": None,
                                    "status": None, "why": entry.get("why", "")}
            m_ci, r_ci = energy_ci(mine, b), energy_ci(ref, b) if ref else None
            if m_ci and r_ci and cell["energy"]:
                r_e = ref["ledger"][b]["energy_j_per_image"]
                cell["factor"] = r_e / cell["energy"]
                cell["ci"] = (cell["factor"], cell["factor"]) if meter == "proxy" else factor_ci(m_ci, r_ci)
                cell["status"] = cell_status(cell["ci"], claimed_low)
            elif ref is None:
                cell["why"] = f"{reference} not measured with {meter}"
            cells[b] = cell
        rows.append({**meter_kind(records, meter), "cells": cells})
    return rows


def _on(row: dict[str, Any], boundary: str) -> str:
    """'the <meter> (<factor>[, 95% CI lo–hi])' for one cell."""
    cell = row["cells"][boundary]
    f = fmt_factor(cell["factor"])
    if row["kind"] != "counted" and cell["ci"] and cell["ci"][0] != cell["ci"][1]:
        f += f", 95% CI {fmt_factor(cell['ci'][0])}–{fmt_factor(cell['ci'][1])}"
    return f"the {row['label']} ({f})"


def _at(boundary: str, widest: bool = False) -> str:
    n = BOUNDARY_LABELS[boundary].split(" ", 1)[0]
    return f"at {'the widest boundary' if widest else 'boundary'} {n} ({_PHRASES[boundary]})"


def summarise(table: list[dict[str, Any]], boundary: str) -> tuple[str, str]:
    """(overall, one line) from a verdict table for a claim made at ``boundary``.

    Each meter is judged at the claim's boundary, or the first wider one it fills (a whole-device meter
    cannot split compute). The overall verdict comes from the measured meters if the run has any,
    else from the proxy: any "fails" fails, all "holds" holds, anything else is within uncertainty.
    Each meter's widest boundary is named too, so the line shows how far the claim carries.
    """
    order = list(BOUNDARIES)
    start = order.index(boundary) if boundary in order else 0
    judged: list[tuple[dict[str, Any], str]] = []
    # status -> [(at-phrase, [on-phrase, ...])]: the claim's boundary first, then the widest, each
    # boundary named once with every meter that lands there.
    groups: dict[str, list[tuple[str, list[str]]]] = {HOLDS: [], FAILS: [], WITHIN: []}

    def add(status: str, at: str, on: str) -> None:
        for key, ons in groups[status]:
            if key == at:
                ons.append(on)
                return
        groups[status].append((at, [on]))

    widest_cells = []
    for row in table:
        filled = [b for b in order if row["cells"][b]["status"] is not None]
        at = next((b for b in order[start:] if b in filled), None)
        if at is None:
            continue
        judged.append((row, row["cells"][at]["status"]))
        add(row["cells"][at]["status"], _at(at), _on(row, at))
        if filled[-1] != at:
            widest_cells.append((row, filled[-1]))
    for row, b in widest_cells:
        add(row["cells"][b]["status"], _at(b, widest=True), _on(row, b))
    if not judged:
        return "not measured", "Not measured in this run"
    measured = [s for row, s in judged if row["kind"] == "measured"]
    deciding = measured or [s for _, s in judged]
    overall = FAILS if FAILS in deciding else HOLDS if all(s == HOLDS for s in deciding) else WITHIN
    parts = [f"{status} " + ", ".join(f"{at} on " + " and on ".join(ons) for at, ons in g)
             for status, g in groups.items() if g]
    return overall, f"{overall.capitalize()}: " + "; ".join(parts)


def evaluate_claims(records: list[dict[str, Any]], reference: str,
                    claims: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per claim: the best fitting generator, its verdict table over meters x boundaries, the verdict.

    The generator is the best quality-matched one by its counted factor at the claim's boundary (else
    the best unmatched one, flagged). References (`real`, `noise`) are bounds and never fit a claim.
    """
    claims = claims if claims is not None else load_claims()
    absolute = [c for c in claims if c["measure"] in PROJECTED_MEASURES]
    claims = [c for c in claims if c["measure"] not in PROJECTED_MEASURES]
    proxies = {r["model"]: r for r in records if r["meter"] == "proxy" and r["model"] != reference
               and not is_reference(r)}
    ref = next((r for r in records if r["meter"] == "proxy" and r["model"] == reference), None)
    rows = []
    for c in claims:
        candidates = []
        for model, r in proxies.items():
            if not _matches(model, c["models"]):
                continue
            if c["measure"] == "parameters":
                p, rp = _parameters(r), _parameters(ref) if ref else None
                factor = rp / p if p and rp else None
            else:
                factor = ((r.get("ledger") or {}).get(c["boundary"]) or {}).get("factor_vs_reference")
            if factor is not None:
                candidates.append((r.get("quality_matched") is True, factor, model))
        row: dict[str, Any] = {"claim": c["claim"], "source": c["source"], "measure": c["measure"],
                               "boundary": c["boundary"] or "—", "claimed": _claimed(c),
                               "claimed_low": c["claimed_low"], "table": [], "overall": "not measured"}
        if not candidates:
            row.update(model=None, factor=None, quality_matched=None, quality=None, quality_marginal=None,
                       reference_quality=None, verdict="Not measured in this run")
            rows.append(row)
            continue
        _, factor, model = max(candidates)
        qm = proxies[model].get("quality_matched")
        row.update(model=model, factor=factor, quality_matched=qm, quality=proxies[model].get("quality"),
                   quality_marginal=proxies[model].get("quality_marginal"),
                   reference_quality=(ref or {}).get("quality"))
        if c["measure"] == "parameters":
            overall = HOLDS if factor >= c["claimed_low"] else FAILS
            verdict = f"{overall.capitalize()}: {fmt_factor(factor)} fewer parameters (counted)"
        else:
            row["table"] = verdict_table(records, model, reference, c["claimed_low"], proxies[model])
            overall, verdict = summarise(row["table"], c["boundary"])
        if qm is False:
            verdict += f" — {model} is not quality-matched"
        elif qm is None:
            verdict += " — quality not measured"
        row.update(overall=overall, verdict=verdict)
        rows.append(row)
    return rows + [judge_projected(c, records) for c in absolute]


#: Claims of an absolute figure per image, judged by projected records of the settings they plausibly
#: mean: ``projected_energy_j`` (J per image) and ``projected_time_s`` (s per image on the named GPU).
PROJECTED_MEASURES = {"projected_energy_j": ("energy_j_per_image", "J"), "projected_time_s": ("time_s_per_image", "s")}


def judge_projected(c: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """An absolute claim against the projection of each setting it plausibly means (``claim_setting``).

    A setting agrees when its projected figure lies in [claimed_low, claimed_high] (the claim's own
    "roughly" written as a band in claims.csv). The verdict names every setting with its figure; it is
    a projection's verdict, never a measurement's.
    """
    key, unit = PROJECTED_MEASURES[c["measure"]]
    lo, hi = c["claimed_low"], c["claimed_high"]
    row: dict[str, Any] = {"claim": c["claim"], "source": c["source"], "measure": c["measure"], "boundary": "—",
                           "claimed": f"{lo:g}–{hi:g} {unit} per image", "claimed_low": lo, "table": [],
                           "quality_matched": None, "quality": None, "quality_marginal": None,
                           "reference_quality": None, "factor": None, "settings": []}
    recs = [r for r in records if r.get("claim_setting") == c["claim_id"] and r.get("status") == "projected"]
    if not recs:
        row.update(model=None, overall="not measured",
                   verdict="Not projected in this run (make bench-scale projects the settings it plausibly means)")
        return row
    for r in recs:
        value = (r.get("projection") or {}).get(key)
        ok = value is not None and lo <= value <= hi
        row["settings"].append({"model": r["model"], "profile": r["projection"]["profile"], "value": value,
                                "unit": unit, "agrees": ok, "ratio": value / ((lo * hi) ** 0.5) if value else None,
                                "kwh_per_1000": value * 1000 / 3.6e6 if unit == "J" and value else None,
                                "band": r["projection"].get("energy_band_j") if unit == "J" else None})
    agree = [s for s in row["settings"] if s["agrees"]]
    overall = HOLDS if len(agree) == len(recs) else FAILS if not agree else WITHIN
    word = {HOLDS: "Consistent", FAILS: "Not consistent", WITHIN: "Depends on the setting"}[overall]

    def fmt(s: dict[str, Any]) -> str:
        extra = f" = {s['kwh_per_1000']:.3g} kWh/1,000" if s["kwh_per_1000"] is not None else ""
        where = "in" if s["agrees"] else "outside"
        return f"{s['model']} on {s['profile']} {s['value']:.3g} {unit}{extra} ({where} the band)"

    row.update(model=", ".join(f"{s['model']}@{s['profile']}" for s in row["settings"]), overall=overall,
               verdict=f"{word} (projected, not measured): " + "; ".join(fmt(s) for s in row["settings"]))
    return row


def _claimed(c: dict[str, Any]) -> str:
    lo, hi = c["claimed_low"], c["claimed_high"]
    return f"{lo:g}x" if lo == hi else f"{lo:g}–{hi:g}x"
