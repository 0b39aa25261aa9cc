"""Claims versus measured: each claim from a data file, judged in one plain sentence per class of evidence.

Evidence comes in three classes, named alike in the report, summary.md, results.csv and the CLI:

* **counted** — the op-count proxy: what the counted work would cost on the profile's hardware;
* **measured** — a power sensor read while the work ran (RAPL, NVML);
* **time-based estimate** — joules modelled from time, e.g. codecarbon with no sensor (TDP x load and
  a RAM rule), whose figure follows wall time, not work.

The class comes from what the meter did on this host (the ``evidence`` its reading recorded, else its
``estimate`` flag), never from its name. Each class with data gets one sentence per claim:

* **holds** — the point estimate and its whole 95% interval are at or above the claim;
* **fails** — the point estimate and its whole 95% interval are below the claim;
* **cannot tell** — the interval contains the claim (whichever side of it the point falls on: a
  point below the claim never holds), one window gave no interval, or only a bound is known (a
  model's net energy below the meter's detection limit) and it does not decide.

A range claim ("2-4x") promises at least its low end, so it is judged against the low end; a figure
above the high end still holds and says it is above the range. The headline is the sentence of the
most demanding class present (measured, then time-based estimate, then counted); within a class the
least favourable meter leads. Each class is judged at the claim's boundary, or where its meter cannot
split that boundary (a whole-device meter has no "active compute"), at the narrowest one it resolves:
energy net of idle.

Intervals of a factor are intervals of a ratio: on the log scale, each model's 95% half-width (the
larger side of its interval, in log units) added in quadrature (the two models are measured in
separate windows), so no end is ever negative. An interval whose low end is not above zero is a net
energy within the detection limit: the sentence then gives a bound instead ("at least 400x").
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
from pathlib import Path
from typing import Any

from un0_bench.harness.meters.codecarbon import evidence_of
from un0_bench.harness.running.record import Record
from un0_bench.reports.ledger import BOUNDARIES, below_detection_limit

CLAIMS_FILE = Path(__file__).with_name("claims.csv")

#: Models that bound the scale rather than generate: they never win a claim, never sit on a frontier.
REFERENCE_MODELS = ("real", "noise")

HOLDS, FAILS, CANNOT_TELL = "holds", "fails", "cannot tell"
COUNTED, MEASURED, ESTIMATE, PROJECTED = "counted", "measured", "time-based estimate", "projected"
#: Most demanding first: the headline is the first class present.
EVIDENCE_ORDER = (MEASURED, ESTIMATE, COUNTED)
#: Within a class, the least favourable sentence leads.
_SEVERITY = {FAILS: 0, CANNOT_TELL: 1, HOLDS: 2}

#: One sentence per class and boundary: the report's and summary.md's glossary.
GLOSSARY = {
    COUNTED: "operations and bytes the run executed, priced per operation on the proxy's hardware profile "
             "(what the work would cost there, not what this host drew); exact, so it has no interval.",
    MEASURED: "joules read from a power sensor (RAPL, NVML) while the work ran, with a 95% interval over repeats.",
    ESTIMATE: "joules modelled from time rather than sensed (codecarbon without RAPL or NVML: TDP x CPU load plus "
              "a RAM rule), so a model looks cheaper in proportion to its run time, not its work.",
}
BOUNDARY_GLOSSARY = {
    "compute": "the generator's network alone, gating excluded.",
    "gating": "adds the gate or router networks and the gathers they cause.",
    "memory": "adds bytes moved; for a whole-device meter, everything the work drew above idle (net of idle).",
    "idle": "adds static and idle power: a device meter's gross reading.",
    "pue": "multiplies by the facility's PUE (cooling and power delivery).",
    "training": "adds the energy spent training or distilling the model, spread over the images it serves.",
}
#: Where KID is shown: why it can be below zero.
KID_NOTE = ("KID is an unbiased estimator: for two image sets that are alike it scatters around 0 and can come out "
            "slightly negative; read a negative KID as 0 within its sd.")

_PHRASES = {"compute": "active compute", "gating": "+ gating", "memory": "+ memory", "idle": "+ idle power",
            "pue": "x PUE", "training": "+ amortised training"}
#: A whole-device meter's boundaries 3 and 4 are its net and gross readings.
_DEVICE_PHRASES = {**_PHRASES, "memory": "net of idle", "idle": "gross (idle included)"}
_ON = {COUNTED: "counted work", MEASURED: "measured energy", ESTIMATE: "time-based estimate"}


def is_projection(meter: str) -> bool:
    """A projection of counted work on a GPU profile (``projection:<profile>``): never a measurement."""
    return meter.startswith("projection:")


def is_reference(record: Record) -> bool:
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


def _parameters(record: Record) -> float | None:
    return ((record.get("config") or {}).get("generator") or {}).get("parameters")


def fmt_factor(f: float | None) -> str:
    if f is None:
        return "—"
    if math.isinf(f):
        return "∞x"
    return f"{f:,.0f}x" if f >= 100 else f"{f:.3g}x"


def fmt_range(lo: float, hi: float) -> str:
    """'290–370x' (one unit at the end)."""
    return f"{fmt_factor(lo).removesuffix('x')}–{fmt_factor(hi)}"


def evidence(records: list[Record], meter: str) -> dict[str, Any]:
    """The class of evidence a meter gave in these records, with a label and the reason for the class.

    Decided from what the meter recorded on this host: a reading's ``evidence`` (and
    ``evidence_reason``) where it gives one, else its ``estimate`` flag; never from the meter's name
    alone, except the proxy, which counts by construction.
    """
    if is_projection(meter):
        return {"meter": meter, "kind": PROJECTED, "label": f"projected on {meter.partition(':')[2]} (not measured)",
                "reason": "computed from counted work on a GPU profile"}
    if meter == "proxy" or meter.startswith("proxy-"):
        return {"meter": meter, "kind": COUNTED, "label": f"{meter} ({COUNTED})",
                "reason": "op-count proxy: counted operations and bytes x energy per operation"}
    details = [r.get("meter_details") or {} for r in records if r["meter"] == meter and r.get("status") == "ok"]
    recorded = next((d for d in details if d.get("evidence") in (MEASURED, ESTIMATE)), None)
    with_methods = next((d for d in details if d.get("methods")), None)
    if recorded is not None:
        kind, reason = recorded["evidence"], recorded.get("evidence_reason") or ""
    elif with_methods is not None:  # a reading from before ``evidence`` was recorded: its methods decide
        kind, reason = evidence_of(with_methods["methods"], with_methods.get("tdp_w"))
    elif any(d.get("estimate") for d in details):
        kind, reason = ESTIMATE, "the meter marked its figure an estimate"
    else:
        kind, reason = MEASURED, f"{meter} reads a hardware energy counter"
    return {"meter": meter, "kind": kind, "label": f"{meter} ({kind})", "reason": reason}


def _energy(record: Record, boundary: str) -> dict[str, Any] | None:
    """Energy per image at ``boundary`` with its 95% interval, and whether it is below the detection limit.

    The proxy counts: its interval is the point. A device meter's boundary 3 is its energy net of idle
    with the net interval; the other boundaries scale the gross interval by their energy (PUE
    multiplies; the amortised training term is treated as exact, so its relative interval is the gross
    one's, a slight over-statement). ``lo``/``hi`` are None when one window gave no interval.
    """
    entry = (record.get("ledger") or {}).get(boundary) or {}
    e = entry.get("energy_j_per_image")
    if record["meter"] == "proxy" or record["meter"].startswith("proxy-"):
        return None if e is None else {"e": e, "lo": e, "hi": e, "below": False}
    gross, gross_ci = record.get("energy_j_per_image"), record.get("energy_ci95_j") or [None, None]
    if boundary == "memory" and record.get("energy_net_j_per_image") is not None:
        net, ci = record["energy_net_j_per_image"], record.get("energy_net_ci95_j")
        limit = record.get("energy_net_detection_limit_j")
        if not ci and limit is not None:  # the net interval is net ± the detection limit
            ci = [net - limit, net + limit]
        elif not ci:  # an older record without either: the gross interval's relative width
            ci = [None, None] if not gross or gross_ci[0] is None else [net * c / gross for c in gross_ci]
        below = below_detection_limit(record) or net <= 0 or (ci[0] is not None and ci[0] <= 0)
        return {"e": net, "lo": ci[0], "hi": ci[1], "below": below, "limit": limit}
    if e is None:
        return None
    if not gross or gross_ci[0] is None or gross_ci[1] is None:
        return {"e": e, "lo": None, "hi": None, "below": False}
    return {"e": e, "lo": e * gross_ci[0] / gross, "hi": e * gross_ci[1] / gross, "below": e <= 0 or gross_ci[0] <= 0}


def _log_half(x: dict[str, Any]) -> float:
    """Half-width of an energy's interval on the log scale (its larger side); inf without an interval."""
    if x["lo"] is None or x["hi"] is None:
        return math.inf
    return max(math.log(x["hi"] / x["e"]), math.log(x["e"] / x["lo"]))


def factor_ci(mine: dict[str, Any], ref: dict[str, Any]) -> tuple[float, float]:
    """95% interval of ref / mine: log-scale half-widths added in quadrature; both ends positive.

    Needs both energies above their detection limits (positive low ends). Without an interval on
    either side the factor is unbounded: (0, inf).
    """
    f = ref["e"] / mine["e"]
    half = math.hypot(_log_half(mine), _log_half(ref))
    if math.isinf(half):
        return (0.0, math.inf)
    return (f * math.exp(-half), f * math.exp(half))


def cell_status(factor: float | None, ci: tuple[float, float] | None, claimed_low: float,
                bound: str | None = None) -> str:
    """Holds / fails / cannot tell for one factor (or a bound on it) against the claim's low end."""
    if bound == "at least":
        return HOLDS if factor >= claimed_low else CANNOT_TELL
    if bound == "at most":
        return FAILS if factor < claimed_low else CANNOT_TELL
    if bound is not None or factor is None:
        return CANNOT_TELL
    # Issue 22's rule: a point below the claim never holds, and an interval that contains the claim
    # cannot tell, whichever side of it the point falls on; so a point below fails only with its
    # whole interval below (a one-window figure, unbounded, cannot tell).
    if factor < claimed_low:
        return FAILS if ci[1] < claimed_low else CANNOT_TELL
    return HOLDS if ci[0] >= claimed_low else CANNOT_TELL


def _find(records: list[Record], model: str, meter: str, like: dict[str, Any] | None = None):
    same = [r for r in records if r["model"] == model and r["meter"] == meter
            and (like is None or r["backbone"] == like["backbone"])]
    exact = [r for r in same if like is not None and r["batch_size"] == like["batch_size"]]
    return (exact or same or [None])[0]


def _cell(mine_r: Record, ref_r: Record | None, boundary: str, claimed_low: float,
          model: str, reference: str) -> dict[str, Any]:
    """One meter at one boundary: the factor, its interval or a bound, the status and the detection note."""
    entry = (mine_r.get("ledger") or {}).get(boundary) or {}
    cell: dict[str, Any] = {"energy": entry.get("energy_j_per_image"), "factor": None, "ci": None, "bound": None,
                            "status": None, "note": "", "why": entry.get("why", "")}
    if ref_r is None:
        cell["why"] = f"{reference} not measured with {mine_r['meter']}"
        return cell
    mine, ref = _energy(mine_r, boundary), _energy(ref_r, boundary)
    if mine is None or ref is None:
        return cell
    if min(mine["e"], ref["e"]) <= 0 and not (mine["below"] or ref["below"]):
        cell["why"] = cell["why"] or "zero energy at this boundary: no factor"
        return cell
    if not mine["below"] and not ref["below"]:
        cell["factor"] = ref["e"] / mine["e"]
        cell["ci"] = factor_ci(mine, ref)
    elif mine["below"] and not ref["below"] and mine["hi"] and mine["hi"] > 0:
        # The model's net energy is at most the top of its interval: the factor is at least ref low / that.
        cell["bound"], cell["factor"] = "at least", (ref["lo"] or ref["e"]) / mine["hi"]
        cell["note"] = _below_note(model, mine)
    elif ref["below"] and not mine["below"] and ref["hi"] and mine["lo"]:
        cell["bound"], cell["factor"] = "at most", ref["hi"] / mine["lo"]
        cell["note"] = _below_note(reference, ref)
    else:
        cell["bound"] = "none"
        cell["note"] = (f"{model if mine['below'] else reference}'s net energy is below the detection limit"
                        + (f" and {reference}'s too" if mine["below"] and ref["below"] else ""))
    cell["status"] = cell_status(cell["factor"], cell["ci"], claimed_low, cell["bound"])
    return cell


def _below_note(model: str, x: dict[str, Any]) -> str:
    limit = x.get("limit")
    of = f" of {limit:.2g} J/image" if limit is not None else ""
    return f"{model}'s net energy is below the detection limit{of} (at most {x['hi']:.2g} J/image)"


def verdict_table(records: list[Record], model: str, reference: str, claimed_low: float,
                  like: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per meter that measured ``model``'s energy: the factor with its 95% CI at each boundary."""
    meters = list(dict.fromkeys(r["meter"] for r in records if r["model"] == model and r.get("status") == "ok"
                                and r.get("energy_j_per_image")))
    rows = []
    for meter in meters:
        mine = _find(records, model, meter, like)
        ref = _find(records, reference, meter, mine)
        cells = {b: _cell(mine, ref, b, claimed_low, model, reference) for b in BOUNDARIES}
        rows.append({**evidence(records, meter), "cells": cells})
    rows.sort(key=lambda row: row["kind"] != COUNTED)  # the counted figure first, then the others
    return rows


def _claimed_text(claimed_low: float, claimed_high: float) -> str:
    if claimed_low == claimed_high:
        return fmt_factor(claimed_low)
    return f"{fmt_factor(claimed_low)} (the low end of the claimed {fmt_range(claimed_low, claimed_high)})"


def sentence(row: dict[str, Any], boundary: str, claimed_low: float, claimed_high: float) -> str:
    """'fails on measured energy (rapl) at net of idle: 328x (95% CI 290–370x) < 1,000x' for one cell."""
    cell, kind = row["cells"][boundary], row["kind"]
    phrases = _PHRASES if kind == COUNTED else _DEVICE_PHRASES
    meter = "" if row["meter"] == "proxy" else f" ({row['meter']})"
    head = f"{cell['status']} on {_ON[kind]}{meter} at {phrases[boundary]}: "
    claimed = _claimed_text(claimed_low, claimed_high)
    f = cell["factor"]
    if cell["bound"] == "none":
        return head + f"no bound: {cell['note']}"
    if cell["bound"] is not None:
        cmp = "≥" if cell["status"] == HOLDS else "<" if cell["status"] == FAILS else "against"
        return head + f"{cell['bound']} {fmt_factor(f)} {cmp} {claimed}: {cell['note']}"
    lo, hi = cell["ci"]
    if kind == COUNTED:
        value = fmt_factor(f)
    elif math.isinf(hi):
        value = f"{fmt_factor(f)} (one window: no interval)"
    else:
        value = f"{fmt_factor(f)} (95% CI {fmt_range(lo, hi)})"
    if cell["status"] == CANNOT_TELL and math.isinf(hi):
        cmp = "≥" if f >= claimed_low else "<"
        return head + f"{fmt_factor(f)} {cmp} {claimed}, but one window gives no interval"
    if cell["status"] == CANNOT_TELL:
        return head + f"{fmt_factor(f)}, but CI {fmt_range(lo, hi)} spans {fmt_factor(claimed_low)}"
    cmp = "≥" if cell["status"] == HOLDS else "<"
    above = ", above the claimed range" if HOLDS == cell["status"] and claimed_low < claimed_high < lo else ""
    return head + f"{value} {cmp} {claimed}{above}"


def judged_boundary(row: dict[str, Any], boundary: str) -> str | None:
    """The claim's boundary, or the first wider one this meter resolves (a device meter cannot split compute)."""
    order = list(BOUNDARIES)
    start = order.index(boundary) if boundary in order else 0
    return next((b for b in order[start:] if row["cells"][b]["status"] is not None), None)


def sentences(table: list[dict[str, Any]], boundary: str, claimed_low: float,
              claimed_high: float) -> list[dict[str, Any]]:
    """One sentence per evidence class with data, the headline (most demanding class) first.

    A class with several meters (RAPL and NVML) is represented by its least favourable one.
    """
    judged = []
    for row in table:
        if row["kind"] not in EVIDENCE_ORDER:
            continue
        b = judged_boundary(row, boundary)
        if b is not None:
            status = row["cells"][b]["status"]
            judged.append({"evidence": row["kind"], "meter": row["meter"], "boundary": b, "status": status,
                           "text": sentence(row, b, claimed_low, claimed_high)})
    judged.sort(key=lambda s: (EVIDENCE_ORDER.index(s["evidence"]), _SEVERITY[s["status"]]))
    return [s for i, s in enumerate(judged) if s["evidence"] not in {t["evidence"] for t in judged[:i]}]


def headline_claims(claims: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The claims whose sentences lead a report.

    Those a model of the run speaks to, and those it answers "not measured" with a reason; not the
    ones merely absent from the run.
    """
    return [c for c in claims if c["model"] or c["headline"].startswith("Not measured:")]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _quality_suffix(model: str, qm: bool | None) -> str:
    if qm is False:
        return f" — {model} is not quality-matched"
    return " — quality not measured" if qm is None else ""


def _same_size_note(c: dict[str, Any], same: list[dict[str, Any]], ref: dict[str, Any], reference: str) -> str:
    """Why a 'smaller models' claim has no model: the matching ones keep the reference's size (they distil steps).

    Each such model's steps and counted energy factor are named (stacks left out: their size is their base's).
    """
    plain = sorted((r for r in same if "+" not in r["model"]), key=lambda r: r["model"]) or same
    ref_steps = ((ref.get("config") or {}).get("generator") or {}).get("steps")
    steps = [((r.get("config") or {}).get("generator") or {}).get("steps") for r in plain]
    factors = [((r.get("ledger") or {}).get("compute") or {}).get("factor_vs_reference") for r in plain]
    how = ""
    if all(steps) and all(factors) and ref_steps:
        how = (f": {'it distils' if len(plain) == 1 else 'they distil'} steps, {' and '.join(map(str, steps))} vs "
               f"{ref_steps}, for "
               f"{' and '.join(fmt_factor(f) for f in factors)} less counted energy per image")
    return (f"Not measured: no size-distilled student ({' and '.join(r['model'] for r in plain)} "
            f"keep{'s' if len(plain) == 1 else ''} "
            f"{reference}'s {_parameters(ref):,.0f} parameters{how})")


def evaluate_claims(records: list[Record], reference: str,
                    claims: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per claim: the best fitting generator, its table over meters x boundaries, the sentences.

    The generator is the best quality-matched one by its counted factor at the claim's boundary (else
    the best unmatched one, flagged). References (`real`, `noise`) are bounds and never fit a claim. A
    parameters claim ("smaller models", "compression") is judged only on models with fewer parameters
    than the reference: a step-distilled student of the teacher's size does not speak to it.
    """
    claims = claims if claims is not None else load_claims()
    absolute = [c for c in claims if c["measure"] in PROJECTED_MEASURES]
    claims = [c for c in claims if c["measure"] not in PROJECTED_MEASURES]
    proxies = {r["model"]: r for r in records if r["meter"] == "proxy" and r["model"] != reference
               and not is_reference(r)}
    ref = next((r for r in records if r["meter"] == "proxy" and r["model"] == reference), None)
    rows = []
    for c in claims:
        candidates, same_size = [], []
        for model, r in proxies.items():
            if not _matches(model, c["models"]):
                continue
            if c["measure"] == "parameters":
                p, rp = _parameters(r), _parameters(ref) if ref else None
                factor = rp / p if p and rp and p < rp else None
                if p and rp and p >= rp:
                    same_size.append(r)
            else:
                factor = ((r.get("ledger") or {}).get(c["boundary"]) or {}).get("factor_vs_reference")
            if factor is not None:
                candidates.append((r.get("quality_matched") is True, factor, model))
        row: dict[str, Any] = {"claim": c["claim"], "source": c["source"], "measure": c["measure"],
                               "boundary": c["boundary"] or "—", "claimed": _claimed(c),
                               "claimed_low": c["claimed_low"], "table": [], "overall": "not measured",
                               "sentences": [], "others": []}
        if not candidates:
            text = _same_size_note(c, same_size, ref, reference) if same_size else "Not measured in this run"
            row.update(model=None, factor=None, quality_matched=None, quality=None, quality_marginal=None,
                       reference_quality=None, verdict=text, headline=text)
            rows.append(row)
            continue
        _, factor, model = max(candidates)
        qm = proxies[model].get("quality_matched")
        row.update(model=model, factor=factor, quality_matched=qm, quality=proxies[model].get("quality"),
                   quality_marginal=proxies[model].get("quality_marginal"),
                   reference_quality=(ref or {}).get("quality"))
        if c["measure"] == "parameters":
            status = HOLDS if factor >= c["claimed_low"] else FAILS
            cmp = "≥" if status == HOLDS else "<"
            said = [{"evidence": COUNTED, "meter": "parameters", "boundary": None, "status": status,
                     "text": f"{status} on counted parameters: {model} has {fmt_factor(factor)} fewer parameters than "
                             f"{reference} {cmp} {_claimed_text(c['claimed_low'], c['claimed_high'])}"}]
        else:
            row["table"] = verdict_table(records, model, reference, c["claimed_low"], proxies[model])
            said = sentences(row["table"], c["boundary"], c["claimed_low"], c["claimed_high"])
        if not said:
            text = "Not measured in this run"
            row.update(verdict=text, headline=text)
            rows.append(row)
            continue
        headline = _capital(said[0]["text"]) + _quality_suffix(model, qm)
        row.update(overall=said[0]["status"], sentences=said, headline=headline, verdict=headline,
                   others=[_capital(s["text"]) for s in said[1:]])
        rows.append(row)
    return rows + [judge_projected(c, records) for c in absolute]


#: Claims of an absolute figure per image, judged by projected records of the settings they plausibly
#: mean: ``projected_energy_j`` (J per image) and ``projected_time_s`` (s per image on the named GPU).
PROJECTED_MEASURES = {"projected_energy_j": ("energy_j_per_image", "J"), "projected_time_s": ("time_s_per_image", "s")}


def judge_projected(c: dict[str, Any], records: list[Record]) -> dict[str, Any]:
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
                           "reference_quality": None, "factor": None, "settings": [], "sentences": [], "others": []}
    recs = [r for r in records if r.get("claim_setting") == c["claim_id"] and r.get("status") == "projected"]
    if not recs:
        row.update(model=None, overall="not measured",
                   verdict="Not projected in this run (make bench-scale projects the settings it plausibly means)")
        row["headline"] = row["verdict"]
        return row
    for r in recs:
        value = (r.get("projection") or {}).get(key)
        ok = value is not None and lo <= value <= hi
        row["settings"].append({"model": r["model"], "profile": r["projection"]["profile"], "value": value,
                                "unit": unit, "agrees": ok, "ratio": value / ((lo * hi) ** 0.5) if value else None,
                                "kwh_per_1000": value * 1000 / 3.6e6 if unit == "J" and value else None,
                                "band": r["projection"].get("energy_band_j") if unit == "J" else None})
    agree = [s for s in row["settings"] if s["agrees"]]
    overall = HOLDS if len(agree) == len(recs) else FAILS if not agree else CANNOT_TELL
    word = {HOLDS: "Consistent", FAILS: "Not consistent", CANNOT_TELL: "Depends on the setting"}[overall]

    def fmt(s: dict[str, Any]) -> str:
        extra = f" = {s['kwh_per_1000']:.3g} kWh/1,000" if s["kwh_per_1000"] is not None else ""
        where = "in" if s["agrees"] else "outside"
        return f"{s['model']} on {s['profile']} {s['value']:.3g} {unit}{extra} ({where} the band)"

    row.update(model=", ".join(f"{s['model']}@{s['profile']}" for s in row["settings"]), overall=overall,
               verdict=f"{word} (projected, not measured): " + "; ".join(fmt(s) for s in row["settings"]))
    row["headline"] = row["verdict"]
    return row


def _claimed(c: dict[str, Any]) -> str:
    lo, hi = c["claimed_low"], c["claimed_high"]
    return f"{lo:g}x" if lo == hi else f"{lo:g}–{hi:g}x"
