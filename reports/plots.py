"""Matplotlib figures as PNG bytes (the HTML report embeds them)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; set before pyplot is imported anywhere in this process
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def energy_per_image(records: list[dict[str, Any]]) -> bytes | None:
    """Energy per image per model and meter, log scale, with 95% CI bars."""
    rows = [r for r in records if r.get("energy_j_per_image")]
    if not rows:
        return None
    models = list(dict.fromkeys(f"{r['model']} (b{r['batch_size']})" for r in rows))
    meters = list(dict.fromkeys(r["meter"] for r in rows))
    width = 0.8 / len(meters)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(models) + 2), 4))
    for k, meter in enumerate(meters):
        xs, ys, lo, hi = [], [], [], []
        for r in rows:
            if r["meter"] != meter:
                continue
            x = models.index(f"{r['model']} (b{r['batch_size']})") + (k - (len(meters) - 1) / 2) * width
            y = r["energy_j_per_image"]
            ci = r.get("energy_ci95_j") or [y, y]
            xs.append(x)
            ys.append(y)
            lo.append(max(y - ci[0], 0))
            hi.append(max(ci[1] - y, 0))
        ax.bar(xs, ys, width=width, label=meter, yerr=[lo, hi], capsize=2)
    ax.set_yscale("log")
    ax.set_ylabel("energy per image (J)")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, rotation=30, ha="right")
    ax.legend(title="meter")
    ax.grid(axis="y", which="both", alpha=0.3)
    return _png(fig)


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not dominated in (energy, FID): no other point has both lower or equal, one strictly lower."""
    front = []
    for e, f, name in points:
        dominated = any((e2 <= e and f2 <= f) and (e2 < e or f2 < f) for e2, f2, _ in points)
        if not dominated:
            front.append((e, f, name))
    return sorted(front)


def energy_vs_fid(records: list[dict[str, Any]], meter: str = "proxy") -> bytes | None:
    """Energy per image against FID, the Pareto frontier marked (lower-left is better)."""
    pts = [(r["energy_j_per_image"], r["quality"]["fid"], r["model"]) for r in records
           if r["meter"] == meter and r.get("energy_j_per_image") and (r.get("quality") or {}).get("fid") is not None]
    if not pts:
        return None
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    on_front = {name for _, _, name in front}
    for e, f, name in pts:
        ax.scatter(e, max(f, 1e-6), color="tab:red" if name in on_front else "tab:blue", zorder=3)
        ax.annotate(name, (e, max(f, 1e-6)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([p[0] for p in front], [max(p[1], 1e-6) for p in front], color="tab:red", lw=1, label="Pareto frontier")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"energy per image, {meter} (J)")
    ax.set_ylabel("FID (judge features; lower is better)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def ledger_factors(rows: list[dict[str, Any]], boundaries: list[str], labels: dict[str, str]) -> bytes | None:
    """Efficiency factor vs the reference at each boundary, grouped by model (log scale)."""
    rows = [r for r in rows if any(r["factors"].get(b) for b in boundaries)]
    if not rows:
        return None
    width = 0.8 / len(boundaries)
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(rows) + 2), 4.5))
    for k, b in enumerate(boundaries):
        xs = [i + (k - (len(boundaries) - 1) / 2) * width for i, r in enumerate(rows) if r["factors"].get(b)]
        ys = [r["factors"][b] for r in rows if r["factors"].get(b)]
        ax.bar(xs, ys, width=width, label=labels[b])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1000.0, color="tab:red", lw=0.8, ls="--", label="1,000x claim")
    ax.set_yscale("log")
    ax.set_ylabel("x less energy than the reference")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["model"] for r in rows], rotation=30, ha="right")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    return _png(fig)


def flops_vs_joules(records: list[dict[str, Any]]) -> bytes | None:
    """Counted FLOPs against measured joules per image, one series per meter: how well counts track meters."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if r.get("energy_j_per_image") and r.get("flops_per_image"):
            series.setdefault(r["meter"], []).append((r["flops_per_image"], r["energy_j_per_image"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for meter, pts in series.items():
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=meter)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("counted FLOPs per image")
    ax.set_ylabel("energy per image (J)")
    ax.legend(title="meter")
    ax.grid(alpha=0.3, which="both")
    return _png(fig)
