"""``summary.md``: the verdicts and the main figures in GitHub-flavoured Markdown (a PR comment, a CI summary)."""

from __future__ import annotations

from typing import Any

from un0_bench.harness.meters.proxy import MEMORY_CAVEAT
from un0_bench.reports.claims import (
    BOUNDARY_GLOSSARY,
    ESTIMATE,
    GLOSSARY,
    KID_NOTE,
    fmt_factor,
    fmt_range,
    headline_claims,
)
from un0_bench.reports.ledger import BOUNDARIES, BOUNDARY_LABELS

_MARKS = {"holds": "✅", "fails": "❌", "cannot tell": "❔"}


def _esc(text: Any) -> str:
    """Markdown text: pipes and newlines would break a table row, and HTML is shown, not rendered."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
            .replace("\n", " "))


def _cell(row: dict[str, Any], b: str) -> str:
    cell = row["cells"][b]
    if cell["bound"] == "none":
        text = "no bound"
    elif cell["bound"]:
        text = f"{'≥' if cell['bound'] == 'at least' else '≤'} {fmt_factor(cell['factor'])} (detection limit)"
    elif cell["factor"] is None:
        return "—"
    else:
        text = fmt_factor(cell["factor"])
        if row["kind"] != "counted":
            lo, hi = cell["ci"]
            text += " (no interval)" if hi == float("inf") else f" ({fmt_range(lo, hi)})"
    return f"{_MARKS.get(cell['status'] or '', '')} {text}".strip()


def _sentences(claim: dict[str, Any]) -> list[str]:
    """The claim's headline in bold, the other classes beneath it."""
    return [f"- **{_esc(claim['claim'])}** — {_MARKS.get(claim['overall'], '')} {_esc(claim['headline'])}".replace(
        "—  ", "— "), *[f"  - {_esc(s)}" for s in claim.get("others") or []]]


def verdict_markdown(claim: dict[str, Any]) -> list[str]:
    lines = [f"### {_esc(claim['claim'])}", "", _esc(claim["headline"]), ""]
    if claim["table"]:
        lines.append("| meter | " + " | ".join(BOUNDARY_LABELS[b] for b in BOUNDARIES) + " |")
        lines.append("|---|" + "---:|" * len(BOUNDARIES))
        for row in claim["table"]:
            lines.append(f"| {_esc(row['meter'])} ({row['kind']}) | " + " | ".join(_cell(row, b) for b in BOUNDARIES)
                         + " |")
        lines.append("")
    for s in claim.get("settings") or []:
        band = f", expected {s['band'][0]:.3g}-{s['band'][1]:.3g} {s['unit']}" if s.get("band") else ""
        lines.append(f"- `{_esc(s['model'])}` on {_esc(s['profile'])}: projected {s['value']:.3g} {s['unit']} per "
                     "image "
                     f"({'agrees' if s['agrees'] else 'disagrees'}{band})")
    if claim.get("settings"):
        lines.append("")
    elif claim["model"]:
        qm = {True: "quality-matched", False: "not quality-matched"}.get(claim["quality_matched"],
                                                                          "quality not measured")
        lines += [f"Model: `{_esc(claim['model'])}` ({qm}); claimed {claim['claimed']} at boundary "
                  f"`{claim['boundary']}`.", ""]
    return lines


def glossary_markdown(meters: list[dict[str, str]]) -> list[str]:
    """One line per class of evidence (with why each meter of this run is in its class) and per boundary."""
    lines = [f"- *{kind}*: {_esc(text)}" for kind, text in GLOSSARY.items()]
    lines += [f"- `{_esc(m['meter'])}` on this host is {'a ' if m['evidence'] == ESTIMATE else ''}*{m['evidence']}*: "
              f"{_esc(m['evidence_reason'])}."
              for m in meters if m.get("evidence") and m["evidence"] != "counted"]
    lines += [f"- boundary {BOUNDARY_LABELS[b]}: {BOUNDARY_GLOSSARY[b]}" for b in BOUNDARIES]
    return [*lines, "- holds: the point and the whole 95% interval clear the claim; "
                    "fails: the point and the whole interval are below it; "
                    "cannot tell: otherwise (the interval spans it, or only a bound is known).", ""]


def summary_markdown(question: dict[str, Any], claims: list[dict[str, Any]], summary_rows: list[dict[str, Any]],
                     summary_columns: list[str], failed: list[dict[str, Any]] | None = None,
                     meters: list[dict[str, str]] | None = None) -> str:
    lines = ["# un0-bench summary", ""]
    lines += [line for c in headline_claims(claims) for line in _sentences(c)]
    lines.append("")
    if question.get("claim"):
        lines += [f"**Question:** “{_esc(question['claim'])}” — `{_esc(question['model'])}` against the reference "
                  f"`{_esc(question['reference'])}` on {', '.join(question['backbones'])}, "
                  f"host {_esc(question['host'])}.",
                  ""]
    lines += glossary_markdown(meters or [])
    lines += ["## Verdicts", "",
              "Times less energy per image than the reference at each accounting boundary, with the 95% CI of the "
              "ratio (log scale; counted work is exact). ✅ holds, ❌ fails, ❔ cannot tell.", "",
              f"Boundary 3 (+ memory) of the proxy: {MEMORY_CAVEAT}", ""]
    for c in claims:
        lines += verdict_markdown(c)
    if summary_rows:
        lines += ["## Main figures", "", "| " + " | ".join(_esc(c) for c in summary_columns) + " |",
                  "|" + "---|" * len(summary_columns)]
        lines += ["| " + " | ".join(_esc(row[c]) for c in summary_columns) + " |" for row in summary_rows]
        lines.append("")
        if any(str(row.get("KID", "")).startswith("-") for row in summary_rows):
            lines += [KID_NOTE, ""]
    if failed:
        lines += ["## Failed cells", "", "Not measured; the same command measures them again.", ""]
        lines += [f"- `{_esc(f['model'])}` batch {f['batch_size']} ({', '.join(f['meters'])}): {_esc(f['reason'])}"
                  for f in failed]
        lines.append("")
    return "\n".join(lines)
