"""``summary.md``: the verdicts and the main figures in GitHub-flavoured Markdown (a PR comment, a CI summary)."""

from __future__ import annotations

from typing import Any

from un0_bench.harness.ledger import BOUNDARIES, BOUNDARY_LABELS
from un0_bench.harness.meters.proxy import MEMORY_CAVEAT
from un0_bench.reports.claims import fmt_factor


def _esc(text: Any) -> str:
    """Markdown text: pipes and newlines would break a table row, and HTML is shown, not rendered."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
            .replace("\n", " "))


def _cell(row: dict[str, Any], b: str) -> str:
    cell = row["cells"][b]
    if cell["factor"] is None:
        return "—"
    text = fmt_factor(cell["factor"])
    if row["kind"] != "counted":
        text += f" ({fmt_factor(cell['ci'][0])}–{fmt_factor(cell['ci'][1])})"
    mark = {"holds": "✅", "fails": "❌", "within uncertainty": "≈"}.get(cell["status"] or "", "")
    return f"{mark} {text}".strip()


def verdict_markdown(claim: dict[str, Any]) -> list[str]:
    lines = [f"### {_esc(claim['claim'])}", "", f"**{_esc(claim['verdict'])}**", ""]
    if claim["table"]:
        lines.append("| meter | " + " | ".join(BOUNDARY_LABELS[b] for b in BOUNDARIES) + " |")
        lines.append("|---|" + "---:|" * len(BOUNDARIES))
        for row in claim["table"]:
            kind = row["kind"] + (", estimate" if row["estimate"] else "")
            lines.append(f"| {_esc(row['meter'])} ({kind}) | " + " | ".join(_cell(row, b) for b in BOUNDARIES) + " |")
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


def summary_markdown(question: dict[str, Any], claims: list[dict[str, Any]], summary_rows: list[dict[str, Any]],
                     summary_columns: list[str], failed: list[dict[str, Any]] | None = None) -> str:
    lines = ["# un0-bench summary", ""]
    if question.get("claim"):
        lines += [f"**Question:** “{_esc(question['claim'])}” — `{_esc(question['model'])}` against the reference "
                  f"`{_esc(question['reference'])}` on {', '.join(question['backbones'])}, "
                  f"host {_esc(question['host'])}.",
                  ""]
    lines += ["## Verdicts", "",
              "Times less energy per image than the reference at each accounting boundary; measured meters show "
              "the 95% CI from both models' repeats (the counted proxy has none). ✅ holds, ❌ fails, ≈ within "
              "uncertainty.", "",
              f"Boundary 3 (+ memory) of the proxy: {MEMORY_CAVEAT}", ""]
    for c in claims:
        lines += verdict_markdown(c)
    if summary_rows:
        lines += ["## Main figures", "", "| " + " | ".join(_esc(c) for c in summary_columns) + " |",
                  "|" + "---|" * len(summary_columns)]
        lines += ["| " + " | ".join(_esc(row[c]) for c in summary_columns) + " |" for row in summary_rows]
        lines.append("")
    if failed:
        lines += ["## Failed cells", "", "Not measured; the same command measures them again.", ""]
        lines += [f"- `{_esc(f['model'])}` batch {f['batch_size']} ({', '.join(f['meters'])}): {_esc(f['reason'])}"
                  for f in failed]
        lines.append("")
    return "\n".join(lines)
