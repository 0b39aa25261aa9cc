"""``un0-bench estimate`` and ``un0-bench calibrate``: counted real architectures projected on a GPU.

The top floor joins what the floors below keep apart: ``un0_bench.backbones.archs.count_arch`` counts an
architecture on the meta device (no weights), ``un0_bench.harness.projection.roofline`` turns counted work into
projected time and energy on a GPU profile, and ``reports`` builds the same report as ``compare``.
Every record written here is marked projected (``status: "projected"``, ``meter:
"projection:<profile>"``); none is a measurement.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from un0_bench.harness.errors import UserError
from un0_bench.harness.projection.roofline import (
    CALIBRATION_FILE,
    Calibration,
    MathFlags,
    fit_calibration,
    get_gpu_profile,
    load_calibration,
    projected_record,
)

#: The projection's calibration: the rows of ``reports/published.csv`` with role ``calibration``.
CALIBRATION_NAME = "ml-energy-a100-sd21-bs1+sdxl-bs8"
REFIT_COMMAND = "un0-bench calibrate --projection"

CountFn = Callable[..., dict[str, Any]]


def _count_arch() -> CountFn:
    from un0_bench.backbones.archs import count_arch

    return count_arch


def count(arch: str, *, steps: int | None = None, resolution: int | None = None, batch_size: int = 1,
          guidance: float | None = None, dtype: str | None = None, count_fn: CountFn | None = None) -> dict[str, Any]:
    """One counted record of ``arch`` at the given setting (defaults: the architecture's own)."""
    fn = count_fn or _count_arch()
    rec = fn(arch, steps=steps, resolution=resolution, batch_size=batch_size, guidance=guidance, dtype=dtype)
    rec = dict(rec)
    # Named by the architecture and the settings given (count_arch names the stack, e.g. "sd:steps=50",
    # the same for every architecture): one row per architecture and setting in the report.
    given = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in (("steps", steps), ("resolution", resolution), ("guidance", guidance)) if v is not None]
    rec["stack_text"] = rec.get("model")
    rec["model"] = arch + (":" + ",".join(given) if given else "")
    rec.setdefault("backbone", f"arch:{arch}")
    rec.setdefault("batch_size", batch_size)
    rec.setdefault("images", batch_size)
    rec.setdefault("uncounted_ops", {})
    rec.setdefault("config", {})
    rec.setdefault("environment", {})
    return rec


def _environment() -> dict[str, Any]:
    from un0_bench.harness.measuring.environment import environment

    return environment()


def estimate_records(arch: str, profiles: list[str], *, calibration: Calibration | None = None,
                     count_fn: CountFn | None = None, flags: MathFlags | None = None,
                     **setting: Any) -> list[dict[str, Any]]:
    """Count ``arch`` once and project it on each profile: one projected record per profile."""
    cal = calibration or load_calibration()
    gpus = [get_gpu_profile(p) for p in profiles]  # unknown names refused before counting
    counted = count(arch, count_fn=count_fn, **setting)
    env = _environment()
    out = []
    for gpu in gpus:
        rec = projected_record(counted, gpu, cal, flags)
        rec["environment"] = {**env, "projected_on": gpu.name, "note": "counted on this host; time and energy "
                              "projected for the named GPU, not measured"}
        rec["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out.append(rec)
    return out


def write_report(records: list[dict[str, Any]], out: Path, *, report: bool = True) -> Path | None:
    """Append ``records`` to ``out/results.jsonl`` and build the report exactly as ``compare`` does."""
    from un0_bench.harness.running.results import ResultStore, check_writable

    check_writable(out)
    store = ResultStore(out)
    with store.lock():
        store.append(records)
    if not report:
        return None
    from un0_bench.reports.build import build_report

    return build_report(out)


def _si(v: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.4g} {prefix}{unit}"
    return f"{v:.4g} {unit}"


def describe(rec: dict[str, Any]) -> str:
    """The printed lines of one projected record: counted work, projected time and energy, calibration."""
    p = rec["projection"]
    cal = p["calibration"]
    setting = ", ".join(f"{k} {rec[k]}" for k in ("steps", "resolution", "guidance", "dtype") if rec.get(k) is not None)
    lines = [f"{rec['model']} ({setting or 'its default setting'}; batch {rec['batch_size']}) "
             f"on {p['profile']} — PROJECTED, not measured",
             f"  counted work per image: {_si(rec['flops_per_image'], 'FLOP')}, "
             f"{_si(rec['bytes_per_image'], 'B')} moved; "
             "by dtype: " + ", ".join(f"{d} {_si(v, 'FLOP')}"
                                      for d, v in sorted(rec["flops_per_image_by_dtype"].items()))]
    phases = rec.get("phases") or {}
    if phases:
        lines.append("  by phase: " + "; ".join(f"{n} {_si(ph.get('flops', 0) / max(rec.get('images', 1), 1), 'FLOP')}"
                                               for n, ph in phases.items()))
    band = p.get("energy_band_j")
    span = (f" (expected range {band[0]:.4g}-{band[1]:.4g} J: x/{p['error_band']:.3g}, the leave-one-out spread)"
            if band else " (no error band: the calibration has a single point)")
    lines.append(f"  projected: {p['time_s_per_image']:.3g} s and {p['energy_j_per_image']:.4g} J per image{span}; "
                 f"{p['power_w']:.0f} W, mostly {p['bound']}-bound")
    lines.append("  kernels per image: " + "; ".join(
        f"{k} {c['launches']:.0f} launches {c['time_s']:.3g} s [{', '.join(c['paths'])}]"
        for k, c in p["kernel_classes"].items()))
    lines.append("  math flags: " + ", ".join(f"{k}={v}" for k, v in p["flags"].items()))
    lines.append(f"  calibration: {cal['name']} (efficiency {cal['efficiency']:.4g} of the tensor-core peak, power "
                 f"fraction {cal['power_fraction']:.4g}; fitted on " + ", ".join(x["id"] for x in cal["points"]) + ")")
    return "\n".join(lines)


# --- the published points (reports/published.csv) ------------------------------------------------
PUBLISHED_FILE = Path(__file__).resolve().parent.parent / "reports" / "published.csv"

def parse_setting(text: str) -> tuple[str, dict[str, Any], str]:
    """``arch:key=value,...@profile`` -> (arch, count kwargs, profile)."""
    spec, at, profile = text.partition("@")
    if not at or not profile:
        raise UserError(f"setting {text!r}: expected arch:key=value,...@gpu-profile")
    arch, _, params = spec.partition(":")
    kwargs: dict[str, Any] = {}
    kinds = {"steps": int, "resolution": int, "batch_size": int, "guidance": float, "dtype": str}
    for item in filter(None, params.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in kinds:
            raise UserError(f"setting {text!r}: bad parameter {item!r} (known: {', '.join(kinds)})")
        kwargs[key] = kinds[key](value)
    return arch, kwargs, profile


def published_rows(path: Path) -> list[dict[str, str]]:
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


def published_points(role: str | None = None, path: Path = PUBLISHED_FILE) -> list[tuple]:
    """Rows of ``reports/published.csv`` (of ``role``, if given): ``(point, arch, count kwargs, profile)``.

    ``point`` has ``id``, ``role``, ``source``, ``note``, ``setting`` and ``measured`` (per image;
    ``None`` where not published).
    """
    out = []
    for row in published_rows(path):
        if role is not None and row["role"] != role:
            continue
        arch, kwargs, profile = parse_setting(row["setting"])
        kwargs.setdefault("dtype", "fp16")
        measured = {"time_s_per_image": float(row["measured_time_s"]) if row["measured_time_s"] else None,
                    "energy_j_per_image": float(row["measured_energy_j"]) if row["measured_energy_j"] else None}
        pt = {"id": row["point_id"], "role": row["role"], "source": row["source"], "note": row["note"],
              "setting": {"arch": arch, **kwargs}, "measured": measured}
        out.append((pt, arch, kwargs, profile))
    return out


# --- the projection's calibration -----------------------------------------------------------------
def calibration_points(count_fn: CountFn | None = None, role: str = "calibration") -> list[tuple]:
    """The published points of ``reports/published.csv`` with ``role``, each counted: ``(point, counted, GPU)``."""
    out = []
    for pt, arch, kwargs, profile in published_points(role):
        if pt["measured"]["time_s_per_image"] is None or pt["measured"]["energy_j_per_image"] is None:
            continue  # a point without both time and energy cannot fit the two factors
        out.append((pt, count(arch, count_fn=count_fn, **kwargs), get_gpu_profile(profile)))
    return out


def refit_projection(out: Path | None = None, count_fn: CountFn | None = None) -> Calibration:
    """Recount the calibration points and refit the projection's two factors (with the leave-one-out table).

    Writes them to ``out`` (default: the shipped ``harness/projection/projection_calibration.json``).
    """
    cal = fit_calibration(calibration_points(count_fn), name=CALIBRATION_NAME, command=REFIT_COMMAND)
    if out is None:
        out = Path(__file__).resolve().parent.parent / "harness" / "projection" / CALIBRATION_FILE
    out.write_text(json.dumps(cal.to_dict(), indent=1, sort_keys=True) + "\n")
    return cal


# --- a host's coefficients from a meter -----------------------------------------------------------
def calibrate_host(meter_name: str, name: str, out: Path, *, window_s: float = 0.5, windows: int = 2) -> dict[str, Any]:
    """Run the fixed workloads under ``meter_name``, fit, write ``out/profiles.csv`` and ``out/fit.json``."""
    from un0_bench.harness.projection.calibrate import WORKLOADS, fit_samples, profile_csv, run_workloads
    from un0_bench.harness.running.results import check_writable
    from un0_bench.harness.running.runner import make_meter

    check_writable(out)
    meter = make_meter(meter_name)
    if isinstance(meter, str):
        raise UserError(f"meter {meter_name!r} cannot measure on this host: {meter}")
    try:
        samples = run_workloads(meter, WORKLOADS, window_s=window_s, windows=windows)
    finally:
        meter.close()
    fit = fit_samples(samples)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    source = (f"fitted on this host by `un0-bench calibrate --meter {meter_name}` at {when}: E = e_flop*F + "
              f"e_byte*B + static*t over {len(samples)} windows, relative residual {fit.rel_residual:.3%}"
              + ("; NB the meter's energy is proportional to time" if fit.proportional_to_time else ""))
    out.mkdir(parents=True, exist_ok=True)
    (out / "profiles.csv").write_text(profile_csv(fit, name, source))
    result = {"meter": meter_name, "profile": name, "fit": fit.to_dict(),
              "samples": [vars(s) for s in samples], "environment": _environment()}
    (out / "fit.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=str) + "\n")
    return result
