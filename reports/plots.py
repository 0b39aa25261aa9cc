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
