"""The accounting-boundary ledger: energy per image as the boundary widens, and factors vs a reference.

The boundaries, each including the ones before it:

1. ``compute``  — the generator's network, gating excluded;
2. ``gating``   — + router/gate networks and the gathers they cause;
3. ``memory``   — + bytes moved;
4. ``idle``     — + static and idle power;
5. ``pue``      — x PUE (cooling and facility overhead);
6. ``training`` — + the energy spent deriving the model, amortised over ``lifetime_images``.

What each meter can say differs. The proxy splits its figure by part, so it fills every boundary
(boundary 4 adds the profile's static power, which the default profile does not give). A meter that
sees a whole device (rapl, nvml, codecarbon) cannot split compute from gating or memory: it fills
boundary 3 with its energy net of idle (everything the work drew above idle) and boundary 4 with its
gross energy. Missing data is ``null`` with the reason, never 0 J.
"""

from __future__ import annotations

from typing import Any

from un0_bench.harness.running.config import DEFAULT_LIFETIME_IMAGES, DEFAULT_PUE
from un0_bench.harness.running.record import Record

BOUNDARIES = ("compute", "gating", "memory", "idle", "pue", "training")
BOUNDARY_LABELS = {
    "compute": "1 active compute",
    "gating": "2 + gating",
    "memory": "3 + memory",
    "idle": "4 + static/idle",
    "pue": "5 x PUE",
    "training": "6 + amortised training",
}


def run_settings(records: list[Record], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Reference, PUE and lifetime of a run, from its own records (``config.run``), unless overridden.

    The one place the ledger's settings are decided: ``un0-bench report DIR`` of a ``--reference un0``
    run keeps un0 as 1x, and a report's ``--reference``/``--pue``/``--lifetime-images`` are overrides.
    """
    runs = [(r.get("config") or {}).get("run") or {} for r in records]
    settings: dict[str, Any] = {}
    for key, default in (("reference", "sd"), ("pue", DEFAULT_PUE), ("lifetime_images", DEFAULT_LIFETIME_IMAGES)):
        seen = [run[key] for run in runs if run.get(key) is not None]
        # The newest record's setting wins when a folder was resumed with other settings.
        settings[key] = seen[-1] if seen else default
    for key, value in (overrides or {}).items():
        if value is not None and key in settings:
            settings[key] = value
    return settings


def derivation_energy_j(derivation: dict[str, Any] | None, meter: str) -> tuple[float | None, str]:
    """Energy (J) a model's derivation took by ``meter``, including what it was derived from.

    ``derivation`` is what the record stored: ``None`` when the generator recorded no derivation (its
    training energy is unknown), ``{}`` when nothing was trained (:data:`NOT_TRAINED`).

    Returns ``(energy_j, note)``; ``energy_j`` is None when the meter did not measure some part.
    """
    if derivation is None:
        # NB: unknown, not zero: a pipeline's pretraining, a user's own generator.
        return None, "training energy not recorded for this model"
    if not derivation:
        return 0.0, "nothing was trained for this model"
    own = derivation.get(meter)
    if not isinstance(own, dict) or own.get("energy_j") is None:
        status = own.get("status") if isinstance(own, dict) else "not recorded"
        return None, f"derivation energy by {meter}: {status}"
    total = float(own["energy_j"])
    for parent, parent_energy in (derivation.get("includes") or {}).items():
        e, note = derivation_energy_j(parent_energy, meter)
        if e is None:
            return None, f"{parent}: {note}"
        total += e
    return total, "includes " + ", ".join(derivation["includes"]) if derivation.get("includes") else ""


def below_detection_limit(record: Record) -> bool:
    """Whether a record's net-of-idle energy is within its uncertainty of zero (not a measurement of the work).

    Records carry the verdict (``energy_net_below_detection_limit``); older ones without it are judged
    by the sign of the net alone.
    """
    net = record.get("energy_net_j_per_image")
    if net is None:
        return False
    flag = record.get("energy_net_below_detection_limit")
    return bool(flag) if flag is not None else net <= 0


def _entry(energy: float | None, why: str = "") -> dict[str, Any]:
    return {"energy_j_per_image": energy, "factor_vs_reference": None, **({"why": why} if why else {})}


def boundaries(record: Record, pue: float = DEFAULT_PUE,
               lifetime_images: int = DEFAULT_LIFETIME_IMAGES) -> dict[str, dict[str, Any]]:
    """Energy per image at each boundary for one record (no factors yet)."""
    if pue < 1.0:
        raise ValueError(f"PUE must be >= 1, got {pue}")
    if lifetime_images < 1:
        raise ValueError(f"lifetime_images must be positive, got {lifetime_images}")
    meter = record["meter"]
    out: dict[str, dict[str, Any]] = {}
    if record.get("status") != "ok" or (record.get("energy_j_per_image") is None):
        why = record.get("status") if record.get("status") != "ok" else f"{meter} measures no energy"
        return {b: _entry(None, why) for b in BOUNDARIES}
    if meter == "proxy" or meter.startswith("proxy-"):  # proxy-dram: the same counts, memory priced as DRAM
        parts = record["proxy_j_per_image_by_part"]
        compute = parts["compute"]
        gating = compute + parts["gating"]
        memory = gating + parts["memory"] + parts["gating_memory"]
        static = (record.get("energy_j_per_image_by_domain") or {}).get("static")
        out["compute"] = _entry(compute)
        out["gating"] = _entry(gating)
        out["memory"] = _entry(memory)
        out["idle"] = _entry(memory + (static or 0.0),
                             "" if static is not None else "profile gives no static power: adds 0")
    else:
        split = f"{meter} sees the whole device and cannot split compute, gating and memory"
        out["compute"] = _entry(None, split)
        out["gating"] = _entry(None, split)
        net = record.get("energy_net_j_per_image")
        if net is None:
            out["memory"] = _entry(None, "no idle baseline was measured")
        elif below_detection_limit(record):
            # Noise, or an estimate that does not follow load: the meter cannot resolve this work above idle.
            limit = record.get("energy_net_detection_limit_j")
            within = f" (within ±{limit:.3g} J)" if limit is not None else ""
            out["memory"] = _entry(None, f"below detection limit: net of idle {net:.3g} J{within}; the meter "
                                         "cannot resolve this work above idle")
        else:
            out["memory"] = _entry(net, "energy net of idle")
        out["idle"] = _entry(record["energy_j_per_image"], "gross energy, idle power included")
    out["pue"] = _entry(out["idle"]["energy_j_per_image"] * pue, f"PUE {pue}")
    train_j, note = derivation_energy_j(record.get("derivation_energy"), meter)
    if train_j is None:
        out["training"] = _entry(None, note)
    else:
        # NB: training ran in the same facility, so its energy carries the same PUE.
        amortised = train_j * pue / lifetime_images
        out["training"] = _entry(out["pue"]["energy_j_per_image"] + amortised,
                                 f"{train_j:.4g} J x PUE / {lifetime_images:,} images" + (f"; {note}" if note else ""))
    return out


def ledger(record: Record, reference: Record | None, pue: float = DEFAULT_PUE,
           lifetime_images: int = DEFAULT_LIFETIME_IMAGES) -> dict[str, dict[str, Any]]:
    """Boundaries of ``record`` with the efficiency factor vs ``reference`` (same meter).

    ``factor_vs_reference`` = reference energy / this energy: 1,000 means 1,000x less energy.
    """
    mine = boundaries(record, pue, lifetime_images)
    ref = boundaries(reference, pue, lifetime_images) if reference else None
    for b, entry in mine.items():
        e = entry["energy_j_per_image"]
        r = ref[b]["energy_j_per_image"] if ref else None
        if e is not None and r is not None and e > 0:
            entry["factor_vs_reference"] = r / e
        elif e == 0:
            entry.setdefault("why", "zero energy at this boundary: no factor")
        elif e is not None and ref is None:
            entry.setdefault("why", "reference not measured with this meter")
    return mine


def find_reference(records: list[Record], record: Record, reference: str) -> Record | None:
    """The reference's record for the same backbone and meter, at the same batch size if there is one."""
    same = [r for r in records if r["model"] == reference and r["backbone"] == record["backbone"]
            and r["meter"] == record["meter"]]
    exact = [r for r in same if r["batch_size"] == record["batch_size"]]
    return (exact or same or [None])[0]
