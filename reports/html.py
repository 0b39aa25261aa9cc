"""Render the self-contained HTML report (jinja2, autoescaped: every user-supplied string is escaped)."""

from __future__ import annotations

import math
from typing import Any

import jinja2
from un0_bench.reports.claims import fmt_factor, fmt_range

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("un0_bench.reports", "templates"),
    autoescape=True,  # model specs, prompts and paths come from users
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def fmt_j(value: float | None) -> str:
    """Joules with an SI prefix (display only)."""
    if value is None:
        return "—"
    for scale, unit in ((1.0, "J"), (1e-3, "mJ"), (1e-6, "µJ"), (1e-9, "nJ"), (1e-12, "pJ")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} J"


def fmt_num(value: float | None) -> str:
    if value is None:
        return "—"
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


_ENV.filters["joules"] = fmt_j
_ENV.filters["num"] = fmt_num
_ENV.filters["factor"] = fmt_factor
_ENV.filters["yesno"] = lambda v: "—" if v is None else ("yes" if v else "no")
_ENV.filters["ms"] = lambda s: "—" if s is None else f"{s * 1e3:.3g} ms"


def ratio_ci(ci: tuple[float, float] | None) -> str:
    """A factor's 95% interval, '290–370x'; 'no interval' for one window (an unbounded end)."""
    if ci is None:
        return "—"
    return "no interval" if math.isinf(ci[1]) else fmt_range(*ci)


_ENV.filters["ratio_ci"] = ratio_ci


def render(context: dict[str, Any]) -> str:
    return _ENV.get_template("report.html.j2").render(**context)
