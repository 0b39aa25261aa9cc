"""Projected time and energy per image from counted work on a named GPU profile (not a measurement).

The model (two fitted factors, both fitted on one published measurement; see :class:`Calibration`)::

    compute_s = sum over dtypes of flops_d / peak_flops_d        # datasheet dense peaks
    memory_s  = bytes / memory_bandwidth
    time_s    = max(compute_s, memory_s) / efficiency            # a roofline, one achieved-efficiency factor
    power_w   = idle_power + power_fraction * (board_power - idle_power)
    energy_j  = power_w * time_s                                 # GPU board energy only

``efficiency`` (the share of the roofline a real pipeline achieves) and ``power_fraction`` (where
between idle and board power the GPU runs while it works) are fitted so that the counted work of the
calibration setting gives the published time and energy exactly.

What the model assumes (every projected record carries this text in ``projection.assumes``):

* one efficiency for every op, phase, architecture and GPU: the calibration pipeline's mix of
  convolutions, attention and elementwise ops is taken as typical;
* one power fraction for every GPU: a GPU at work draws the same share of its idle-to-TDP range;
* time scales with the binding roof of the whole image (compute or memory), not op by op;
* counted bytes (every tensor an op reads and writes) stand for DRAM traffic.

What it leaves out (``projection.leaves_out``): host CPU, DRAM and the rest of the server; PUE;
kernel-launch and Python overhead per call (it matters for small models at batch 1); caching
effects that make bytes moved differ from counted bytes; the tokenizer and image post-processing;
clocks throttled by power or heat; multi-GPU communication.

This module is the ground floor: it reads counted records (dicts of the result schema) and knows no
architectures. Architecture counting lives in ``backbones/``; the commands that combine both live at
the top floor.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from un0_bench.harness.errors import UserError
from un0_bench.harness.meters.proxy import _parse_rows

__all__ = [
    "ASSUMES",
    "CALIBRATION_FILE",
    "GPU_PROFILES_ENV",
    "LEAVES_OUT",
    "REQUIRED",
    "Calibration",
    "GpuProfile",
    "fit_calibration",
    "get_gpu_profile",
    "load_calibration",
    "load_gpu_profiles",
    "project",
    "projected_record",
]

#: Environment variable naming a user CSV of extra GPU profiles (same columns as the built-in one).
GPU_PROFILES_ENV = "UN0_BENCH_GPU_PROFILES"
#: The shipped calibration, next to this module.
CALIBRATION_FILE = "projection_calibration.json"

PEAK, BANDWIDTH, BOARD, IDLE = "peak_flops", "memory_bandwidth", "board_power", "idle_power"
#: Rows every GPU profile must have: (quantity, dtype).
REQUIRED = ((PEAK, "fp16"), (PEAK, "fp32"), (BANDWIDTH, ""), (BOARD, ""), (IDLE, ""))

_UNITS = {
    PEAK: {"FLOPS": 1.0, "GFLOPS": 1e9, "TFLOPS": 1e12, "PFLOPS": 1e15},
    BANDWIDTH: {"B/s": 1.0, "GB/s": 1e9, "TB/s": 1e12},
    BOARD: {"W": 1.0, "kW": 1e3},
    IDLE: {"W": 1.0, "kW": 1e3},
}

#: Counted dtype names -> the peak row that runs them.
# NB: float32 FLOPs are charged at the FP32 (non-tensor-core) peak: PyTorch does not use TF32 for
# matmuls by default. int16/int32/int64 arithmetic is charged at the FP32 rate (CUDA cores).
_DTYPE_PEAK = {
    "float16": "fp16", "half": "fp16", "fp16": "fp16",
    "bfloat16": "bf16", "bf16": "bf16",
    "float32": "fp32", "float": "fp32", "fp32": "fp32",
    "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "fp8": "fp8",
    "int8": "int8", "uint8": "int8", "bool": "int8",
    "int16": "fp32", "int32": "fp32", "int64": "fp32",
}

ASSUMES = (
    "roofline time = max(sum of FLOPs per dtype / dense datasheet peak, counted bytes / memory bandwidth) "
    "/ one achieved-efficiency factor; power = idle + one fitted fraction of (board power - idle); both "
    "factors fitted on one published measurement and applied unchanged to every architecture and GPU"
)
LEAVES_OUT = (
    "host CPU/DRAM and the rest of the server; PUE; per-call kernel-launch and Python overhead; caches "
    "(counted bytes taken as DRAM traffic); tokenizer and post-processing; power or thermal throttling; "
    "multi-GPU communication"
)


@dataclass(frozen=True)
class GpuProfile:
    """Datasheet figures of one GPU, in SI units.

    Attributes:
        name: Profile name (``a100-sxm4-40gb``).
        peak_flops: dtype row (``fp16``, ``bf16``, ``fp32``, ``fp8``, ``int8``, ``tf32``) -> dense peak FLOP/s.
        memory_bandwidth_b_per_s: Peak memory bandwidth in bytes per second.
        board_power_w: Board power (TDP) in watts.
        idle_power_w: Idle power in watts.
        sources: (quantity, dtype) -> the row's source text.
    """

    name: str
    peak_flops: dict[str, float]
    memory_bandwidth_b_per_s: float
    board_power_w: float
    idle_power_w: float
    sources: dict[tuple[str, str], str] = field(default_factory=dict)

    def peak_for(self, dtype: str) -> float:
        """Dense peak FLOP/s for a counted dtype; :class:`UserError` if the profile has no row for it."""
        row = _DTYPE_PEAK.get(dtype, dtype)
        if row not in self.peak_flops:
            raise UserError(f"GPU profile {self.name!r} has no peak_flops row for dtype {dtype!r} (row {row!r}); "
                            f"it has {', '.join(sorted(self.peak_flops))}")
        return self.peak_flops[row]


def _builtin_text() -> tuple[str, str]:
    ref = resources.files("un0_bench.harness.meters").joinpath("gpu_profiles.csv")
    return ref.read_text(encoding="utf-8"), "harness/meters/gpu_profiles.csv"


def _value(row: dict[str, str]) -> float:
    where, quantity, unit = row["_where"], row["quantity"], row["unit"]
    if quantity not in _UNITS:
        raise UserError(f"{where}: unknown GPU profile quantity {quantity!r}; use one of {', '.join(_UNITS)}")
    if unit not in _UNITS[quantity]:
        raise UserError(f"{where}: unit {unit!r} for {quantity!r}; use one of {', '.join(_UNITS[quantity])}")
    try:
        value = float(row["value"])
    except ValueError:
        raise UserError(f"{where}: value {row['value']!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and quantity != IDLE):
        raise UserError(f"{where}: {quantity} must be a finite positive number, got {row['value']!r}")
    return value * _UNITS[quantity][unit]


def load_gpu_profiles(path: str | os.PathLike[str] | None = None) -> dict[str, GpuProfile]:
    """The built-in GPU profiles and, if given (or named by ``$UN0_BENCH_GPU_PROFILES``), a user CSV.

    Raises:
        UserError: A malformed row, a repeated row, a user profile reusing a built-in name, or a
            profile missing one of :data:`REQUIRED` (the message names the profile and the field).
    """
    texts = [_builtin_text()]
    user = path if path is not None else os.environ.get(GPU_PROFILES_ENV) or None
    if user is not None:
        p = Path(user)
        if not p.is_file():
            raise UserError(f"GPU profiles file {str(p)!r} does not exist")
        texts.append((p.read_text(encoding="utf-8"), str(p)))
    values: dict[str, dict[tuple[str, str], float]] = {}
    sources: dict[str, dict[tuple[str, str], str]] = {}
    origin_of: dict[str, str] = {}
    for text, origin in texts:
        for row in _parse_rows(text, origin):
            name = row["profile"]
            if not name:
                raise UserError(f"{row['_where']}: empty profile name")
            if origin_of.setdefault(name, origin) != origin:
                raise UserError(f"{row['_where']}: GPU profile {name!r} is already defined in {origin_of[name]}")
            key = (row["quantity"], row["dtype"] if row["quantity"] == PEAK else "")
            if key in values.setdefault(name, {}):
                which = f" for {key[1]!r}" if key[1] else ""
                raise UserError(f"{row['_where']}: {name!r} already has a {key[0]!r} row{which}")
            values[name][key] = _value(row)
            sources.setdefault(name, {})[key] = row["source"]
    profiles = {}
    for name, vals in values.items():
        for quantity, dtype in REQUIRED:
            if (quantity, dtype) not in vals:
                what = f"{quantity} for dtype {dtype}" if dtype else quantity
                raise UserError(f"GPU profile {name!r} ({origin_of[name]}) has no {what} row; every GPU profile needs "
                                + ", ".join(f"{q}/{d}" if d else q for q, d in REQUIRED))
        profiles[name] = GpuProfile(
            name=name, peak_flops={d: v for (q, d), v in vals.items() if q == PEAK},
            memory_bandwidth_b_per_s=vals[(BANDWIDTH, "")], board_power_w=vals[(BOARD, "")],
            idle_power_w=vals[(IDLE, "")], sources=sources[name])
        if profiles[name].idle_power_w >= profiles[name].board_power_w:
            raise UserError(f"GPU profile {name!r}: idle_power must be below board_power")
    return profiles


def get_gpu_profile(name: str, path: str | os.PathLike[str] | None = None) -> GpuProfile:
    """The GPU profile called ``name``; an unknown name raises :class:`UserError` with suggestions."""
    profiles = load_gpu_profiles(path)
    if name not in profiles:
        from un0_bench.harness.registry import unknown_name

        raise UserError(unknown_name("GPU profile", name, sorted(profiles)))
    return profiles[name]


# --- the roofline ---------------------------------------------------------------------------------
def _work(record: dict[str, Any]) -> tuple[dict[str, float], float]:
    by_dtype = record.get("flops_per_image_by_dtype")
    if not by_dtype:
        if not record.get("flops_per_image"):
            raise UserError(f"record of {record.get('model')!r} has no counted FLOPs to project")
        raise UserError(f"record of {record.get('model')!r} has no flops_per_image_by_dtype: the projection needs "
                        "FLOPs split by dtype")
    nbytes = record.get("bytes_per_image")
    if nbytes is None:
        raise UserError(f"record of {record.get('model')!r} has no bytes_per_image to project")
    return {k: float(v) for k, v in by_dtype.items() if v}, float(nbytes)


def roofline_s(record: dict[str, Any], profile: GpuProfile) -> dict[str, float]:
    """Compute-bound and memory-bound seconds per image at datasheet peaks (efficiency 1)."""
    by_dtype, nbytes = _work(record)
    compute_s = math.fsum(f / profile.peak_for(d) for d, f in sorted(by_dtype.items()))
    memory_s = nbytes / profile.memory_bandwidth_b_per_s
    return {"compute_s": compute_s, "memory_s": memory_s, "bound_s": max(compute_s, memory_s)}


@dataclass(frozen=True)
class Calibration:
    """The two fitted factors and the one published measurement they come from.

    Attributes:
        name: Calibration name, shown wherever a projection is (``ml-energy-sd2.1-a100``).
        efficiency: Achieved share of the roofline (0 < efficiency <= 1 expected).
        power_fraction: Share of (board power - idle power) drawn above idle while working.
        source: Where the measurement was published.
        setting: The setting measured (architecture, GPU, steps, resolution, guidance, batch, dtype).
        measured: ``{"time_s_per_image": ..., "energy_j_per_image": ...}`` as published.
        counted: The counted work of that setting the factors were fitted on
            (``flops_per_image_by_dtype``, ``bytes_per_image``, ``flops_per_image``).
        command: The command that recounts the setting and refits the factors.
    """

    name: str
    efficiency: float
    power_fraction: float
    source: str
    setting: dict[str, Any]
    measured: dict[str, float]
    counted: dict[str, Any]
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_calibration(counted: dict[str, Any], profile: GpuProfile, *, time_s: float, energy_j: float, name: str,
                    source: str, setting: dict[str, Any], command: str = "") -> Calibration:
    """Fit ``efficiency`` and ``power_fraction`` to one published point.

    ``counted`` on ``profile`` then gives exactly ``time_s`` and ``energy_j`` per image (two equations,
    two unknowns: no freedom left).
    """
    if time_s <= 0 or energy_j <= 0:
        raise UserError("a calibration point needs a positive time and energy per image")
    roof = roofline_s(counted, profile)
    efficiency = roof["bound_s"] / time_s
    power_w = energy_j / time_s
    fraction = (power_w - profile.idle_power_w) / (profile.board_power_w - profile.idle_power_w)
    keep = {k: counted[k] for k in ("flops_per_image", "bytes_per_image", "flops_per_image_by_dtype") if k in counted}
    return Calibration(name=name, efficiency=efficiency, power_fraction=fraction, source=source,
                       setting={**setting, "profile": profile.name},
                       measured={"time_s_per_image": time_s, "energy_j_per_image": energy_j},
                       counted=keep, command=command)


def load_calibration(path: str | os.PathLike[str] | None = None) -> Calibration:
    """The projection's calibration.

    The shipped one (``harness/projection_calibration.json``) or one written by
    ``un0-bench calibrate --projection --out FILE``.
    """
    if path is None:
        ref = resources.files("un0_bench.harness").joinpath(CALIBRATION_FILE)
        where = f"harness/{CALIBRATION_FILE}"
        if not ref.is_file():
            raise UserError(f"{where} is missing; `un0-bench calibrate --projection` recounts the published setting "
                            "and writes it")
        text = ref.read_text(encoding="utf-8")
    else:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"calibration file {str(p)!r} does not exist")
        text, where = p.read_text(encoding="utf-8"), str(p)
    try:
        data = json.loads(text)
        return Calibration(**{k: data[k] for k in Calibration.__dataclass_fields__ if k in data})
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: not a projection calibration ({e})") from None


def project(record: dict[str, Any], profile: GpuProfile, calibration: Calibration) -> dict[str, Any]:
    """Projected time and GPU energy per image of one counted record, with what was assumed.

    Returns:
        ``time_s_per_image``, ``energy_j_per_image``, ``power_w``, the roofline parts, which roof
        binds, the calibration named with its factors, ``assumes`` and ``leaves_out``.
    """
    roof = roofline_s(record, profile)
    time_s = roof["bound_s"] / calibration.efficiency
    power_w = profile.idle_power_w + calibration.power_fraction * (profile.board_power_w - profile.idle_power_w)
    return {
        "label": "projected, not measured",
        "profile": profile.name,
        "time_s_per_image": time_s,
        "energy_j_per_image": power_w * time_s,
        "power_w": power_w,
        "compute_s_at_peak": roof["compute_s"],
        "memory_s_at_peak": roof["memory_s"],
        "bound": "compute" if roof["compute_s"] >= roof["memory_s"] else "memory",
        "calibration": {"name": calibration.name, "efficiency": calibration.efficiency,
                        "power_fraction": calibration.power_fraction, "source": calibration.source,
                        "setting": calibration.setting, "measured": calibration.measured},
        "assumes": ASSUMES,
        "leaves_out": LEAVES_OUT,
    }


def projected_record(counted: dict[str, Any], profile: GpuProfile, calibration: Calibration) -> dict[str, Any]:
    """A counted record turned into a result record marked projected, never measured.

    ``status: "projected"``, ``meter: "projection:<profile>"``; energy and time come from :func:`project`.
    """
    p = project(counted, profile, calibration)
    rec = {k: v for k, v in counted.items() if k not in ("meter", "status", "meter_details")}
    rec.update({
        "meter": f"projection:{profile.name}",
        "status": "projected",
        "energy_j_per_image": p["energy_j_per_image"],
        "energy_ci95_j": None,
        "duration_s_per_image": p["time_s_per_image"],
        "projection": p,
        "meter_details": {"profile": profile.name, "calibration": calibration.name, "projected": True},
    })
    rec.setdefault("uncounted_ops", {})
    rec.setdefault("config", {})
    rec.setdefault("environment", {})
    rec.setdefault("energy_ci95_j", None)
    return rec
