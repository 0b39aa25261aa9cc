"""Matplotlib figures as PNG bytes (the HTML report embeds them)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; set before pyplot is imported anywhere in this process
import matplotlib.pyplot as plt  # noqa: E402
from un0_bench.harness.running.record import Record


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def energy_per_image(records: list[Record]) -> bytes | None:
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


def flops_vs_joules(records: list[Record]) -> bytes | None:
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


def _place_labels(ax: Any, fig: Any, points: list[tuple[float, float, str]]) -> None:
    """Annotate points, trying a few offsets per label so no two labels overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    offsets = [(4, 4), (4, -10), (-4, 4), (-4, -10), (4, 14), (4, -20), (-4, 14), (-4, -20), (4, 24), (4, -30)]
    for x, y, name in points:
        text = None
        for dx, dy in offsets:
            text = ax.annotate(name, (x, y), fontsize=7, xytext=(dx, dy), textcoords="offset points",
                               ha="left" if dx > 0 else "right")
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(other) for other in placed):
                break
            text.remove()
            text = None
        if text is None:  # every offset collides: the last one, with a leader line
            text = ax.annotate(name, (x, y), fontsize=7, xytext=offsets[-1], textcoords="offset points",
                               arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"})
        placed.append(text.get_window_extent(renderer))


def generator_front(records: list[Record], meter: str, is_reference: Any) -> list[tuple[float, float, str]]:
    """The Pareto frontier in (energy, FID) by ``meter`` over generators only: references are bounds."""
    return pareto_front([(r["energy_j_per_image"], max(r["quality"]["fid"], 1e-6), r["model"]) for r in records
                         if r["meter"] == meter and r.get("energy_j_per_image") and not is_reference(r)
                         and (r.get("quality") or {}).get("fid") is not None])


def energy_vs_quality(records: list[Record], is_reference: Any, kinds: dict[str, dict[str, Any]],
                      ) -> bytes | None:
    """Energy per image against FID, one panel per meter (counted proxy, each measured meter).

    The Pareto frontier runs over generators only; references (`real`, `noise`) are bounds drawn as
    labelled horizontal lines at their FID. Quality-matched points are filled, unmatched hollow.
    """
    meters = [m for m in kinds if any(r["meter"] == m and r.get("energy_j_per_image")
                                      and (r.get("quality") or {}).get("fid") is not None for r in records)]
    if not meters:
        return None
    fig, axes = plt.subplots(1, len(meters), figsize=(6.2 * len(meters), 4.6), squeeze=False)
    for ax, meter in zip(axes[0], meters, strict=False):
        rows = [r for r in records if r["meter"] == meter and r.get("energy_j_per_image")
                and (r.get("quality") or {}).get("fid") is not None]
        gens = [r for r in rows if not is_reference(r)]
        pts = [(r["energy_j_per_image"], max(r["quality"]["fid"], 1e-6), r["model"]) for r in gens]
        front = generator_front(records, meter, is_reference)
        matched = [p for p, r in zip(pts, gens, strict=True) if r.get("quality_matched") is True]
        unmatched = [p for p, r in zip(pts, gens, strict=True) if r.get("quality_matched") is not True]
        if matched:
            ax.scatter([p[0] for p in matched], [p[1] for p in matched], color="tab:blue", zorder=3,
                       label="quality-matched")
        if unmatched:
            ax.scatter([p[0] for p in unmatched], [p[1] for p in unmatched], facecolors="none",
                       edgecolors="tab:gray", zorder=3, label="not quality-matched")
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", lw=1, zorder=2,
                    label="Pareto frontier (generators)")
        for r in rows:
            if is_reference(r):
                fid = max(r["quality"]["fid"], 1e-6)
                ax.axhline(fid, color="tab:green", ls=":", lw=1)
                ax.annotate(f"{r['model']} (bound, FID {r['quality']['fid']:.3g})", (0.01, fid),
                            xycoords=("axes fraction", "data"), fontsize=7, color="tab:green",
                            xytext=(0, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        kind = kinds[meter]
        ax.set_title(f"{meter}: {kind['kind']}" + (", estimate" if kind.get("estimate") else ""), fontsize=9)
        ax.set_xlabel(f"energy per image, {meter} (J)")
        ax.set_ylabel("FID (lower is better)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper right")
        _place_labels(ax, fig, sorted(pts, key=lambda p: (p[1], p[0])))
    fig.tight_layout()
    return _png(fig)


def ladder(table: list[dict[str, Any]], boundaries: list[str], labels: dict[str, str], claimed: float,
           title: str = "") -> bytes | None:
    """A claim's factor across the boundaries, one line per meter (95% CI as a band), the claim as a line."""
    rows = [row for row in table if any(row["cells"][b]["factor"] and row["cells"][b]["ci"] for b in boundaries)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for row in rows:
        # A bound (net energy below the detection limit) has no interval to draw: its sentence gives it.
        xs = [i for i, b in enumerate(boundaries) if row["cells"][b]["factor"] and row["cells"][b]["ci"]]
        ys = [row["cells"][boundaries[i]]["factor"] for i in xs]
        line = ax.plot(xs, ys, marker="o", label=row["label"])[0]
        lo = [row["cells"][boundaries[i]]["ci"][0] for i in xs]
        hi = [min(row["cells"][boundaries[i]]["ci"][1], 1e30) for i in xs]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axhline(claimed, color="tab:red", ls="--", lw=1, label=f"claimed {claimed:g}x")
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_yscale("log")
    ax.set_xticks(range(len(boundaries)))
    ax.set_xticklabels([labels[b] for b in boundaries], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("x less energy than the reference")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def where_the_joules_go(records: list[Record], is_reference: Any) -> dict[str, dict[str, dict[str, float]]]:
    """Per generator, proxy J/image split by phase (from ``phases``) and by part (compute, gating, memory).

    A record's ``phases`` cover one request of ``images`` images, so each phase's energy is divided by
    ``images``. References are bounds and left out.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in records:
        if r["meter"] != "proxy" or r.get("status") != "ok" or is_reference(r) or r["model"] in out:
            continue
        images = r.get("images") or 1
        phases = {name: ph["energy_j"]["proxy"] / images for name, ph in (r.get("phases") or {}).items()
                  if (ph.get("energy_j") or {}).get("proxy") is not None}
        parts = r.get("proxy_j_per_image_by_part") or {}
        split = {"compute": parts.get("compute", 0.0), "gating": parts.get("gating", 0.0),
                 "memory": parts.get("memory", 0.0) + parts.get("gating_memory", 0.0)}
        modules = _top_groups(r.get("proxy_j_per_image_by_module") or {})
        out[r["model"]] = {"phase": phases, "part": {k: v for k, v in split.items() if v}, "module": modules}
    return out


def _top_groups(by_module: dict[str, float], keep: int = 6) -> dict[str, float]:
    """The ``keep`` costliest layer groups by name, the rest summed as ``"other modules"``."""
    ranked = sorted(by_module.items(), key=lambda kv: -kv[1])
    out = dict(ranked[:keep])
    rest = sum(v for _, v in ranked[keep:])
    if rest:
        out["other modules"] = rest
    return out


def joules_stacked(split: dict[str, dict[str, dict[str, float]]]) -> bytes | None:
    """100% stacked bars per model: share of proxy J/image by phase (left) and by part (right)."""
    models = [m for m, s in split.items() if sum(s["part"].values()) > 0 or sum(s["phase"].values()) > 0]
    if not models:
        return None
    panels = [("phase", "by phase"), ("part", "compute vs gating vs memory"), ("module", "by layer group")]
    panels = [(k, t) for k, t in panels if any(split[m].get(k) for m in models) or k != "module"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.45 * len(models) + 1.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        names = list(dict.fromkeys(n for m in models for n in split[m].get(key, {})))
        left = [0.0] * len(models)
        for name in names:
            shares = []
            for m in models:
                total = sum(split[m].get(key, {}).values())
                shares.append(100 * split[m].get(key, {}).get(name, 0.0) / total if total else 0.0)
            ax.barh(range(len(models)), shares, left=left, label=name)
            left = [a + b for a, b in zip(left, shares, strict=True)]
        ax.set_yticks(range(len(models)))
        ax.set_yticklabels([f"{m} ({sum(split[m].get(key, {}).values()):.3g} J)" for m in models], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of proxy energy per image")
        ax.set_title(title, fontsize=9)
        if names:
            ax.legend(fontsize=6 if key == "module" else 7, loc="lower right")
        else:
            ax.text(50, (len(models) - 1) / 2, "no phases recorded", ha="center", va="center", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def proxy_vs_measured(records: list[Record], is_reference: Any) -> dict[str, dict[str, Any]]:
    """Per measured meter: generators' (proxy, measured) J/image and a least-squares line in log10-log10.

    ``slope`` 1 means the meter scales with the counted figure; ``ratio`` is the median measured/proxy.
    """
    import numpy as np

    proxy = {(r["model"], r["batch_size"]): r["energy_j_per_image"] for r in records
             if r["meter"] == "proxy" and r.get("energy_j_per_image") and not is_reference(r)}
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        key = (r["model"], r["batch_size"])
        if r["meter"] == "proxy" or not r.get("energy_j_per_image") or key not in proxy or r.get("status") != "ok":
            continue
        out.setdefault(r["meter"], {"points": []})["points"].append((proxy[key], r["energy_j_per_image"], r["model"]))
    for fit in out.values():
        x = np.log10([p[0] for p in fit["points"]])
        y = np.log10([p[1] for p in fit["points"]])
        fit["n"] = len(x)
        fit["ratio"] = float(np.median(10 ** (y - x)))
        if len(x) >= 2 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            resid = y - (slope * x + intercept)
            ss = float(np.sum((y - y.mean()) ** 2))
            fit.update(slope=float(slope), intercept=float(intercept),
                       r2=1.0 - float(np.sum(resid ** 2)) / ss if ss > 0 else 1.0)
        else:
            fit.update(slope=None, intercept=None, r2=None)
    return out


def proxy_vs_measured_plot(fits: dict[str, dict[str, Any]]) -> bytes | None:
    """Scatter of proxy vs measured J/image per measured meter, with the fitted log-log line."""
    if not fits:
        return None
    fig, axes = plt.subplots(1, len(fits), figsize=(5.5 * len(fits), 4.2), squeeze=False)
    for ax, (meter, fit) in zip(axes[0], fits.items(), strict=False):
        xs, ys = [p[0] for p in fit["points"]], [p[1] for p in fit["points"]]
        ax.scatter(xs, ys, zorder=3)
        _place_labels(ax, fig, fit["points"])
        if fit["slope"] is not None:
            lo, hi = min(xs), max(xs)
            scale = 10 ** fit["intercept"]
            ax.plot([lo, hi], [scale * lo ** fit["slope"], scale * hi ** fit["slope"]], color="tab:red", lw=1,
                    label=f"fit: slope {fit['slope']:.2f}, r² {fit['r2']:.2f} (log-log)")
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("proxy J/image (counted)")
        ax.set_ylabel(f"{meter} J/image (measured)")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _png(fig)
