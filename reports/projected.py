"""Projected records in the report: their own table, the validation table, the scale table and its plot.

Reads records only (reports never run models). A projected record has ``status: "projected"`` and
``meter: "projection:<profile>"``; its ``projection`` field names the calibration, the math flags,
the kernel classes charged, the expected range of the energy (``energy_band_j``, from the calibration's
leave-one-out spread: a projection is never shown as a bare number) and what the model assumes and
leaves out. Optional fields written by ``un0-bench estimate`` / ``make bench-scale``:

* ``published_point``: ``{"id", "source", "role", "measured_time_s", "measured_energy_j", "note"}``
  (a published measurement of the same setting: the validation table's row);
* ``scale``: ``{"family": "un0"|"diffusion", "dataset", "oscillator_steps_per_image",
  "decoder_energy_j_per_image"}`` (the bench-scale table);
* ``claim_setting``: the claim id whose setting the record projects (``reports/claims.py``).
"""

from __future__ import annotations

from typing import Any

from un0_bench.harness.running.record import Record
from un0_bench.reports import units

#: The factor an analog substrate must reach against the diffusion model (the design brief's claim).
TARGET_FACTOR = 1000.0


def is_projected(record: Record) -> bool:
    return record.get("status") == "projected" or str(record.get("meter", "")).startswith("projection:")


def _setting(r: Record) -> str:
    parts = [f"{k} {r[k]}" for k in ("steps", "resolution", "guidance", "dtype") if r.get(k) is not None]
    return ", ".join(parts + [f"batch {r['batch_size']}"])


def projected_rows(records: list[Record]) -> list[dict[str, Any]]:
    """One row per projected record: setting, GPU, projected time and energy with its band, flags, kernel classes."""
    rows = []
    for r in records:
        if not is_projected(r):
            continue
        p = r.get("projection") or {}
        cal = p.get("calibration") or {}
        rows.append({
            "model": r["model"], "setting": _setting(r), "profile": p.get("profile"), "flops": r.get("flops_per_image"),
            "bytes": r.get("bytes_per_image"), "time_s": p.get("time_s_per_image"),
            "energy_j": p.get("energy_j_per_image"), "power_w": p.get("power_w"), "bound": p.get("bound"),
            "kwh_per_1000": units.kwh_per_1000_images(p["energy_j_per_image"]) if p.get("energy_j_per_image") else None,
            "calibration": cal.get("name"), "efficiency": cal.get("efficiency"),
            "power_fraction": cal.get("power_fraction"),
            "energy_band_j": p.get("energy_band_j"), "error_band": p.get("error_band"),
            "flags": ", ".join(f"{k}={v}" for k, v in (p.get("flags") or {}).items()),
            "kernel_classes": ", ".join(f"{k} ({'/'.join(c.get('paths', []))})"
                                        for k, c in (p.get("kernel_classes") or {}).items()),
        })
    return rows


def projection_notes(records: list[Record]) -> dict[str, Any] | None:
    """What the projections of this report assume and leave out, and their calibration (once)."""
    for r in records:
        if is_projected(r) and r.get("projection"):
            p = r["projection"]
            cal = p.get("calibration") or {}
            points = "; ".join(f"{x['id']} ({x['measured'].get('time_s_per_image'):.4g} s, "
                               f"{x['measured'].get('energy_j_per_image'):.4g} J per image)"
                               for x in cal.get("points", []))
            return {"assumes": p.get("assumes"), "leaves_out": p.get("leaves_out"), "calibration": cal,
                    "points": points}
    return None


def validation_rows(records: list[Record]) -> list[dict[str, Any]]:
    """Published measurement vs projection of the same setting: source, setting, measured, projected, ratio.

    ``ratio`` is projected / measured (1.0 = the projection agrees; 0.5 = it projects half).
    """
    rows = []
    for r in records:
        pub = r.get("published_point")
        if not pub or not is_projected(r):
            continue
        p = r["projection"]
        for what, measured, projected in (("time (s)", pub.get("measured_time_s"), p["time_s_per_image"]),
                                          ("energy (J)", pub.get("measured_energy_j"), p["energy_j_per_image"])):
            if measured is None:
                continue
            band = p.get("error_band") if what == "energy (J)" else None
            rows.append({"id": pub["id"], "role": pub.get("role", "validation"), "source": pub.get("source"),
                         "model": r["model"], "setting": _setting(r), "profile": p["profile"], "quantity": what,
                         "measured": measured, "projected": projected, "ratio": projected / measured,
                         "band": [projected / band, projected * band] if band else None,
                         "within_band": (projected / band <= measured <= projected * band) if band else None,
                         "note": pub.get("note", "")})
    return rows


def _fid(published: Any) -> float | None:
    """A published FID@50k: a number, or ``{"value": ...}`` with its source."""
    return published.get("value") if isinstance(published, dict) else published


def scale_rows(records: list[Record]) -> dict[str, Any]:
    """Un-0 sizes vs the diffusion model of their dataset, digitally; and the analog break-even.

    For each Un-0 record with a diffusion record of the same dataset and GPU profile: the factor
    (diffusion J / Un-0 J, both projected), and the energy per oscillator-step an analog substrate must
    reach, decoder kept digital, for the factor to reach :data:`TARGET_FACTOR`::

        e_osc_step = (E_diffusion / 1000 - E_decoder_digital) / oscillator_steps_per_image

    ``None`` where the digital decoder alone already exceeds the budget (no analog energy suffices);
    ``ceiling`` is then the factor reached with oscillators of zero energy (E_diffusion / E_decoder).
    """
    proj = [r for r in records if is_projected(r) and r.get("scale")]
    diffusion = {(r["scale"].get("dataset"), r["projection"]["profile"]): r for r in proj
                 if r["scale"].get("family") == "diffusion"}
    rows = []
    for r in proj:
        s = r["scale"]
        ref = diffusion.get((s.get("dataset"), r["projection"]["profile"]))
        e = r["projection"]["energy_j_per_image"]
        row = {"model": r["model"], "family": s.get("family"), "dataset": s.get("dataset"),
               "profile": r["projection"]["profile"], "flops": r.get("flops_per_image"), "energy_j": e,
               "time_s": r["projection"]["time_s_per_image"], "fid": _fid(r.get("published_fid50k")),
               "reference": ref["model"] if ref else None, "factor": None, "break_even_j": None, "ceiling": None,
               "digital_osc_step_j": None,
               "oscillator_steps": s.get("oscillator_steps_per_image"),
               "decoder_j": s.get("decoder_energy_j_per_image"), "why": ""}
        steps, dec = s.get("oscillator_steps_per_image"), s.get("decoder_energy_j_per_image")
        if s.get("family") == "un0" and steps and dec is not None:
            # What one oscillator-step costs simulated digitally on this GPU (the projection, not analog).
            row["digital_osc_step_j"] = (e - dec) / steps
        if s.get("family") == "un0" and ref is not None:
            e_ref = ref["projection"]["energy_j_per_image"]
            row["factor"] = e_ref / e if e else None
            if dec:
                row["ceiling"] = e_ref / dec  # the factor with oscillators at zero energy
            if steps and dec is not None:
                budget = e_ref / TARGET_FACTOR - dec
                if budget > 0:
                    row["break_even_j"] = budget / steps
                else:
                    row["why"] = (f"the digital decoder alone ({dec:.3g} J) exceeds the 1,000x budget "
                                  f"({e_ref / TARGET_FACTOR:.3g} J): no oscillator energy reaches 1,000x")
        rows.append(row)
    return {"rows": rows, "target_factor": TARGET_FACTOR}


def scale_plot(scale: dict[str, Any]) -> bytes | None:
    """Projected J per image against published FID@50k (log x), Un-0 sizes and the diffusion model."""
    rows = [r for r in scale["rows"] if r["energy_j"] and r["fid"] is not None]
    if not rows:
        return None
    from un0_bench.reports.plots import _png, plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for family, marker in (("un0", "o"), ("diffusion", "s")):
        pts = [r for r in rows if r["family"] == family]
        if pts:
            ax.scatter([r["energy_j"] for r in pts], [r["fid"] for r in pts], marker=marker, label=family)
            for r in pts:
                ax.annotate(r["model"], (r["energy_j"], r["fid"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"projected GPU energy per image (J) on {rows[0]['profile']} — projected, not measured")
    ax.set_ylabel("published FID@50k (lower is better)")
    ax.set_title("Un-0 sizes vs diffusion at real scale (digital)")
    ax.legend()
    return _png(fig)


def leave_one_out_lines(calibration: dict[str, Any]) -> list[str]:
    """The calibration's leave-one-out table as printed lines (``make bench-scale``, ``calibrate --projection``)."""
    loo = calibration.get("leave_one_out") or []
    if not loo:
        return ["leave-one-out: none (a single calibration point)"]
    lines = ["leave-one-out (fitted without the point, then projected), projected / measured:"]
    for r in loo:
        lines.append(f"  {r['id']:28} fitted on {', '.join(r['fitted_on'])}: efficiency {r['efficiency']:.3g}, power "
                     f"fraction {r['power_fraction']:.3g}; time {r['time_ratio']:.3g}, energy {r['energy_ratio']:.3g}")
    lines.append(f"  error band of a projected energy: x/{calibration.get('error_band'):.3g}")
    return lines
