"""Claims versus measured: each claim from a data file next to what a run measured."""

from __future__ import annotations

import csv
import fnmatch
import io
from pathlib import Path
from typing import Any

CLAIMS_FILE = Path(__file__).with_name("claims.csv")


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


def evaluate_claims(records: list[dict[str, Any]], reference: str, claims: list[dict[str, Any]] | None = None,
                    meter: str = "proxy") -> list[dict[str, Any]]:
    """One row per claim: the best model that fits it (quality-matched first) and its measured factor."""
    claims = claims if claims is not None else load_claims()
    by_model = {r["model"]: r for r in records if r["meter"] == meter and r["model"] != reference}
    ref = next((r for r in records if r["meter"] == meter and r["model"] == reference), None)
    rows = []
    for c in claims:
        candidates = []
        for model, r in by_model.items():
            if not _matches(model, c["models"]):
                continue
            if c["measure"] == "parameters":
                p, rp = _parameters(r), _parameters(ref) if ref else None
                factor = rp / p if p and rp else None
            else:
                factor = ((r.get("ledger") or {}).get(c["boundary"]) or {}).get("factor_vs_reference")
            widest = ((r.get("ledger") or {}).get("training") or {}).get("factor_vs_reference")
            if factor is not None:
                candidates.append((bool(r.get("quality_matched")), factor, model, widest, r.get("quality_matched")))
        row = {"claim": c["claim"], "source": c["source"], "measure": c["measure"],
               "boundary": c["boundary"] or "—", "claimed": _claimed(c)}
        if not candidates:
            row.update(model=None, factor=None, widest_factor=None, quality_matched=None,
                       verdict="not measured in this run")
        else:
            matched, factor, model, widest, qm = max(candidates)
            verdict = ("meets the claim" if factor >= c["claimed_low"] else
                       f"falls short: {factor:.3g}x measured vs {_claimed(c)} claimed")
            if qm is False:
                verdict += " (not quality-matched)"
            elif qm is None:
                verdict += " (quality not measured)"
            row.update(model=model, factor=factor, widest_factor=widest, quality_matched=qm, verdict=verdict)
        rows.append(row)
    return rows


def _claimed(c: dict[str, Any]) -> str:
    lo, hi = c["claimed_low"], c["claimed_high"]
    return f"{lo:g}x" if lo == hi else f"{lo:g}–{hi:g}x"
