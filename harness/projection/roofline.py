"""Projected time and energy per image from counted work on a named GPU profile (not a measurement).

A per-operator roofline. Every launched kernel of the counted record (``record["kernels"]``, rows of
:func:`un0_bench.harness.counters.kernels.kernel_groups`) is charged by its class::

    gpu_s(k)  = latency + max(flops_k / (rate(class, dtype, flags)), bytes_k / (memory_efficiency * bandwidth))
    call_s(k) = max(gpu_s(k), launch)                  # the host issues one kernel per `launch` seconds at best
    time_s    = sum over launches of call_s            # per batch, divided by the images
    busy_s    = sum over launches of gpu_s
    energy_j  = wait_power * time_s + (busy_power - wait_power) * busy_s

``rate`` is ``efficiency x`` the dense datasheet peak of the path the kernel takes: conv and matmul
on tensor cores in fp16/bf16/int8/fp8, in TF32 for float32 when the math flag allows it (cuDNN:
``torch.backends.cudnn.allow_tf32``, default True; cuBLAS: ``torch.backends.cuda.matmul.allow_tf32``,
default False), else the FP32 CUDA-core peak; attention at the tensor-core peak through the flash
kernel for fp16/bf16, at the FP32 CUDA-core peak through the memory-efficient kernel for float32;
normalisation and element-wise kernels at the FP32 CUDA-core peak (they are bound by bytes).

Size-dependent efficiency is Hockney's (r_inf, n_1/2) law (R. W. Hockney and C. R. Jesshope,
*Parallel Computers 2*, 1988): a kernel of work ``w`` runs at ``r(w) = r_inf * w / (w + n_half)``
with ``n_half = r_inf * latency``, i.e. ``latency + w / r_inf``: small GEMMs do not reach peak. The
fixed per-launch host cost (``launch``) bounds launch-bound models (small latents at batch 1).

Two factors are fitted on published measurements (:class:`Calibration`): ``efficiency`` (the share
of the datasheet tensor-core peak large GEMMs, convolutions and attention achieve) and
``power_fraction`` (busy power = idle + fraction x (board power - idle)). ``launch``, ``latency``,
``memory_efficiency`` and ``wait_power`` are per-profile constants in ``gpu_profiles.csv``, each with
its source or marked an assumption.

What the model assumes (every projected record carries this text in ``projection.assumes``) and
leaves out (``projection.leaves_out``) is stated in :data:`ASSUMES` and :data:`LEAVES_OUT`.

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
from un0_bench.harness.meters.proxy import _parse_rows, _profile_texts
from un0_bench.harness.registry import lookup

__all__ = [
    "ASSUMES",
    "CALIBRATION_FILE",
    "DEFAULT_FLAGS",
    "GPU_PROFILES_ENV",
    "LEAVES_OUT",
    "REQUIRED",
    "Calibration",
    "GpuProfile",
    "MathFlags",
    "fit_calibration",
    "get_gpu_profile",
    "kernel_time",
    "leave_one_out",
    "load_calibration",
    "load_gpu_profiles",
    "parse_flags",
    "project",
    "projected_record",
]

#: Environment variable naming a user CSV of extra GPU profiles (same columns as the built-in one).
GPU_PROFILES_ENV = "UN0_BENCH_GPU_PROFILES"
#: The shipped calibration, next to this module.
CALIBRATION_FILE = "projection_calibration.json"

PEAK, BANDWIDTH, BOARD, IDLE = "peak_flops", "memory_bandwidth", "board_power", "idle_power"
LAUNCH, LATENCY, MEM_EFF, WAIT = "kernel_launch", "kernel_latency", "memory_efficiency", "wait_power"
#: Rows every GPU profile must have: (quantity, dtype).
REQUIRED = ((PEAK, "fp16"), (PEAK, "fp32"), (BANDWIDTH, ""), (BOARD, ""), (IDLE, ""), (LAUNCH, ""), (LATENCY, ""),
            (MEM_EFF, ""), (WAIT, ""))

_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_UNITS = {
    PEAK: {"FLOPS": 1.0, "GFLOPS": 1e9, "TFLOPS": 1e12, "PFLOPS": 1e15},
    BANDWIDTH: {"B/s": 1.0, "GB/s": 1e9, "TB/s": 1e12},
    BOARD: {"W": 1.0, "kW": 1e3},
    IDLE: {"W": 1.0, "kW": 1e3},
    WAIT: {"W": 1.0, "kW": 1e3},
    LAUNCH: _TIME_UNITS,
    LATENCY: _TIME_UNITS,
    MEM_EFF: {"fraction": 1.0},
}
#: Quantities that may be 0 (no idle power, no latency).
_MAY_BE_ZERO = (IDLE, LATENCY, WAIT)

#: Counted dtype names -> the peak row of their tensor-core path.
_DTYPE_PEAK = {
    "float16": "fp16", "half": "fp16", "fp16": "fp16",
    "bfloat16": "bf16", "bf16": "bf16",
    "float32": "fp32", "float": "fp32", "fp32": "fp32",
    "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "fp8": "fp8",
    "int8": "int8", "uint8": "int8",
}
#: Kernel classes that run on tensor cores (when their dtype and the flags allow).
TENSOR_CLASSES = ("conv", "matmul", "attention")

ASSUMES = (
    "per-operator roofline: each launched kernel takes latency + max(FLOPs / (efficiency x the dense datasheet "
    "peak of its path: tensor cores by dtype, TF32 for float32 conv/matmul when the math flags allow, FP32 CUDA "
    "cores otherwise and for norm/element-wise kernels), bytes / (memory efficiency x bandwidth)), and at least "
    "one host launch cost; energy = wait power x time + (busy power - wait power) x busy time; efficiency and "
    "busy power fitted on the calibration points, the other constants from the GPU profile; every aten op that "
    "moves bytes is one kernel launch; counted bytes are DRAM traffic"
)
LEAVES_OUT = (
    "host CPU/DRAM and the rest of the server; PUE; overlap of host launches with long kernels (a queue the host "
    "fills ahead of the GPU); caches (counted bytes taken as DRAM traffic); kernel fusion by torch.compile or "
    "TensorRT; tokenizer and image post-processing; power or thermal throttling; multi-GPU communication"
)


@dataclass(frozen=True)
class MathFlags:
    """The torch math flags that decide a float32 kernel's path, as a run sets them.

    Attributes:
        cudnn_allow_tf32: ``torch.backends.cudnn.allow_tf32`` (torch default True): float32
            convolutions run on tensor cores in TF32.
        matmul_allow_tf32: ``torch.backends.cuda.matmul.allow_tf32`` (torch default False since 1.12):
            float32 matmuls run in TF32.
        sdpa: ``auto`` (torch's choice: flash for fp16/bf16 on tensor cores, memory-efficient for
            float32 on CUDA cores) or ``math`` (the unfused path: its matmuls on the dtype's GEMM path,
            TF32 for float32 when ``matmul_allow_tf32``). NB: the score matrix the math path writes
            and reads back is not added to the counted bytes (the counter counts the fused op).
    """

    cudnn_allow_tf32: bool = True
    matmul_allow_tf32: bool = False
    sdpa: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: torch's defaults.
DEFAULT_FLAGS = MathFlags()


def parse_flags(text: str | None) -> MathFlags:
    """``cudnn_allow_tf32=1,matmul_allow_tf32=0,sdpa=auto`` -> :class:`MathFlags` (unset keys: torch's default)."""
    if not text:
        return DEFAULT_FLAGS
    values: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in MathFlags.__dataclass_fields__:
            raise UserError(f"--flags {item!r}: expected key=value with key one of "
                            f"{', '.join(MathFlags.__dataclass_fields__)}")
        if key == "sdpa":
            if value not in ("auto", "math"):
                raise UserError(f"--flags sdpa={value!r}: expected auto or math")
            values[key] = value
        elif value in ("1", "true", "True"):
            values[key] = True
        elif value in ("0", "false", "False"):
            values[key] = False
        else:
            raise UserError(f"--flags {key}={value!r}: expected 1 or 0")
    return MathFlags(**values)


@dataclass(frozen=True)
class GpuProfile:
    """Datasheet figures and per-kernel constants of one GPU, in SI units.

    Attributes:
        name: Profile name (``a100-sxm4-40gb``).
        peak_flops: dtype row (``fp16``, ``bf16``, ``fp32``, ``fp8``, ``int8``, ``tf32``) -> dense peak FLOP/s.
        memory_bandwidth_b_per_s: Peak memory bandwidth in bytes per second.
        board_power_w: Board power (TDP) in watts.
        idle_power_w: Idle power in watts.
        kernel_launch_s: Host time to issue one kernel (framework dispatch and launch), seconds.
        kernel_latency_s: Fixed GPU time of a kernel however small (Hockney's n_1/2 / r_inf), seconds.
        memory_efficiency: Share of the peak bandwidth a streaming kernel reaches.
        wait_power_w: Board power while the GPU waits for the host between kernels, watts.
        sources: (quantity, dtype) -> the row's source text.
    """

    name: str
    peak_flops: dict[str, float]
    memory_bandwidth_b_per_s: float
    board_power_w: float
    idle_power_w: float
    kernel_launch_s: float
    kernel_latency_s: float
    memory_efficiency: float
    wait_power_w: float
    sources: dict[tuple[str, str], str] = field(default_factory=dict)

    def peak_for(self, dtype: str) -> float:
        """Dense peak FLOP/s of the row ``dtype`` maps to; :class:`UserError` if the profile has no such row."""
        row = _DTYPE_PEAK.get(dtype, dtype)
        if row not in self.peak_flops:
            raise UserError(f"GPU profile {self.name!r} has no peak_flops row for dtype {dtype!r} (row {row!r}); "
                            f"it has {', '.join(sorted(self.peak_flops))}")
        return self.peak_flops[row]

    def path(self, kernel: str, dtype: str, flags: MathFlags) -> str:
        """The peak row a kernel of class ``kernel`` in ``dtype`` runs at under ``flags``."""
        row = _DTYPE_PEAK.get(dtype, "fp32")  # int32/int64/bool arithmetic: CUDA cores
        if kernel not in TENSOR_CLASSES:
            return "fp32"  # NB: norm and element-wise kernels are bound by bytes; their FLOPs at the CUDA-core rate
        if row != "fp32":
            return row
        if kernel == "conv" and flags.cudnn_allow_tf32 or kernel == "matmul" and flags.matmul_allow_tf32:
            return "tf32"
        if kernel == "attention" and flags.sdpa == "math" and flags.matmul_allow_tf32:
            return "tf32"
        return "fp32"


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
    if not math.isfinite(value) or value < 0 or (value == 0 and quantity not in _MAY_BE_ZERO):
        raise UserError(f"{where}: {quantity} must be a finite positive number, got {row['value']!r}")
    if quantity == MEM_EFF and value > 1:
        raise UserError(f"{where}: memory_efficiency is a share of the peak bandwidth (at most 1), "
                        f"got {row['value']!r}")
    return value * _UNITS[quantity][unit]


def load_gpu_profiles(path: str | os.PathLike[str] | None = None) -> dict[str, GpuProfile]:
    """The built-in GPU profiles and, if given (or named by ``$UN0_BENCH_GPU_PROFILES``), a user CSV.

    Raises:
        UserError: A malformed row, a repeated row, a user profile reusing a built-in name, or a
            profile missing one of :data:`REQUIRED` (the message names the profile and the field).
    """
    texts = _profile_texts(_builtin_text(), path, GPU_PROFILES_ENV, "GPU profiles file")
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
            idle_power_w=vals[(IDLE, "")], kernel_launch_s=vals[(LAUNCH, "")], kernel_latency_s=vals[(LATENCY, "")],
            memory_efficiency=vals[(MEM_EFF, "")], wait_power_w=vals[(WAIT, "")], sources=sources[name])
        if profiles[name].idle_power_w >= profiles[name].board_power_w:
            raise UserError(f"GPU profile {name!r}: idle_power must be below board_power")
    return profiles


def get_gpu_profile(name: str, path: str | os.PathLike[str] | None = None) -> GpuProfile:
    """The GPU profile called ``name``; an unknown name raises :class:`UserError` with suggestions."""
    return lookup("GPU profile", name, load_gpu_profiles(path))


# --- the per-operator roofline --------------------------------------------------------------------
def _kernels(record: dict[str, Any]) -> tuple[list[list[Any]], int]:
    """``(kernel rows, images they produce)``: the counted launches, or one coarse row per dtype.

    A record without ``kernels`` (counted before kernel classes were recorded, or written by hand) is
    charged as one large GEMM per dtype plus one element-wise pass over its bytes, per image.
    """
    if record.get("kernels"):
        return record["kernels"], max(int(record.get("images") or record.get("batch_size") or 1), 1)
    by_dtype = record.get("flops_per_image_by_dtype")
    if not by_dtype:
        if not record.get("flops_per_image"):
            raise UserError(f"record of {record.get('model')!r} has no counted FLOPs to project")
        raise UserError(f"record of {record.get('model')!r} has no flops_per_image_by_dtype: the projection needs "
                        "FLOPs split by dtype")
    nbytes = record.get("bytes_per_image")
    if nbytes is None:
        raise UserError(f"record of {record.get('model')!r} has no bytes_per_image to project")
    # NB: coarse: no launch or latency cost is known without the kernels, so none is charged but one per row.
    rows = [["", "matmul", d, 1, float(f), 0.0] for d, f in sorted(by_dtype.items()) if f]
    return rows + [["", "elementwise", "float16", 1, 0.0, float(nbytes)]], 1


def kernel_time(kernel: str, dtype: str, flops: float, nbytes: float, profile: GpuProfile, efficiency: float,
                flags: MathFlags = DEFAULT_FLAGS) -> tuple[float, float, str, str]:
    """One launch: ``(call seconds, GPU-busy seconds, peak row used, what binds: compute|memory|launch)``."""
    row = profile.path(kernel, dtype, flags)
    rate = profile.peak_for(row) * (efficiency if kernel in TENSOR_CLASSES else 1.0)
    compute_s = flops / rate if flops else 0.0
    memory_s = nbytes / (profile.memory_efficiency * profile.memory_bandwidth_b_per_s)
    gpu_s = profile.kernel_latency_s + max(compute_s, memory_s)
    if profile.kernel_launch_s > gpu_s:
        return profile.kernel_launch_s, gpu_s, row, "launch"
    return gpu_s, gpu_s, row, "compute" if compute_s >= memory_s else "memory"


def _roofline(record: dict[str, Any], profile: GpuProfile, efficiency: float, flags: MathFlags,
              phases: Any = None) -> dict[str, Any]:
    """Seconds per image (total and GPU-busy) and the breakdown by kernel class, of the phases kept."""
    rows, images = _kernels(record)
    by_class: dict[str, dict[str, Any]] = {}
    bound_s = {"compute": 0.0, "memory": 0.0, "launch": 0.0}
    time_s = busy_s = 0.0
    for phase, kernel, dtype, calls, flops, nbytes in rows:
        if phases is not None and not phases(phase):
            continue
        call_s, gpu_s, row, bound = kernel_time(kernel, dtype, flops, nbytes, profile, efficiency, flags)
        time_s += calls * call_s
        busy_s += calls * gpu_s
        bound_s[bound] += calls * call_s
        c = by_class.setdefault(kernel, {"launches": 0, "flops": 0.0, "bytes": 0.0, "time_s": 0.0, "paths": []})
        c["launches"] += calls
        c["flops"] += calls * flops
        c["bytes"] += calls * nbytes
        c["time_s"] += calls * call_s
        if f"{dtype}->{row}" not in c["paths"]:
            c["paths"].append(f"{dtype}->{row}")
    for c in by_class.values():
        for k in ("launches", "flops", "bytes", "time_s"):
            c[k] = c[k] / images
        c["paths"].sort()
    return {"time_s": time_s / images, "busy_s": busy_s / images, "classes": dict(sorted(by_class.items())),
            "bound_s": {k: v / images for k, v in bound_s.items()}}


def _busy_power_w(profile: GpuProfile, power_fraction: float) -> float:
    return profile.idle_power_w + power_fraction * (profile.board_power_w - profile.idle_power_w)


def _energy_j(roof: dict[str, Any], profile: GpuProfile, power_fraction: float) -> float:
    wait = profile.wait_power_w
    return wait * roof["time_s"] + (_busy_power_w(profile, power_fraction) - wait) * roof["busy_s"]


@dataclass(frozen=True)
class Calibration:
    """The two fitted factors, the published points they come from and how well each is predicted unseen.

    Attributes:
        name: Calibration name, shown wherever a projection is (``ml-energy-a100-sd21+sdxl``).
        efficiency: Achieved share of the dense tensor-core peak for conv, matmul and attention kernels.
        power_fraction: Busy power = idle + power_fraction x (board power - idle power).
        source: The points' sources, one line.
        points: Each calibration point: ``id``, ``source``, ``setting`` (arch, steps, batch, ...,
            profile), ``measured`` (``time_s_per_image``, ``energy_j_per_image``) and ``counted``
            (``flops_per_image``, ``bytes_per_image``, ``launches_per_image``).
        flags: The math flags the fit assumed the measured runs used (:class:`MathFlags`).
        leave_one_out: Per point: fitted on the others, its projected / measured time and energy.
        error_band: The expected error factor of a projected energy: the largest leave-one-out
            energy ratio (or its inverse); a projection E is shown as E / band .. E x band.
        command: The command that recounts the points and refits.
    """

    name: str
    efficiency: float
    power_fraction: float
    source: str
    points: list[dict[str, Any]]
    flags: dict[str, Any] = field(default_factory=lambda: DEFAULT_FLAGS.to_dict())
    leave_one_out: list[dict[str, Any]] = field(default_factory=list)
    error_band: float | None = None
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: One calibration point as :func:`fit_calibration` takes it: the point's dict, its counted record, its GPU.
Point = tuple[dict[str, Any], dict[str, Any], GpuProfile]


def _fit(points: list[Point], flags: MathFlags) -> tuple[float, float]:
    """``(efficiency, power_fraction)`` fitted on ``points`` (at least one).

    Efficiency: the geometric mean of projected / measured time is 1 (bisection: time falls as the
    efficiency rises). Power fraction: least squares of the relative energy error (the energy is
    linear in it).
    """
    def log_time_error(eff: float) -> float:
        return math.fsum(math.log(_roofline(c, gpu, eff, flags)["time_s"] / pt["measured"]["time_s_per_image"])
                         for pt, c, gpu in points)

    lo, hi = 1e-4, 10.0
    if log_time_error(hi) > 0:
        raise UserError("the model projects the calibration points slower than measured even at 10x the tensor-core "
                        "peak: their memory-bound or launch-bound time alone exceeds the measurement; check the "
                        "profile's memory_efficiency and kernel_launch, and the counted bytes")
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if log_time_error(mid) > 0 else (lo, mid)
    eff = math.sqrt(lo * hi)
    num = den = 0.0
    for pt, c, gpu in points:
        roof = _roofline(c, gpu, eff, flags)
        e = pt["measured"]["energy_j_per_image"]
        a = _energy_j(roof, gpu, 0.0) / e  # E = a + b * fraction, relative to the measurement
        b = (_energy_j(roof, gpu, 1.0) - _energy_j(roof, gpu, 0.0)) / e
        num += b * (1 - a)
        den += b * b
    return eff, num / den


def _predict(pt: dict[str, Any], counted: dict[str, Any], gpu: GpuProfile, eff: float, fraction: float,
             flags: MathFlags) -> dict[str, Any]:
    roof = _roofline(counted, gpu, eff, flags)
    m = pt["measured"]
    e = _energy_j(roof, gpu, fraction)
    return {"id": pt["id"], "time_ratio": roof["time_s"] / m["time_s_per_image"],
            "energy_ratio": e / m["energy_j_per_image"], "projected_time_s": roof["time_s"], "projected_energy_j": e}


def leave_one_out(points: list[Point], flags: MathFlags = DEFAULT_FLAGS) -> list[dict[str, Any]]:
    """For each point: fit on all the others, project it. Needs two points or more.

    Returns:
        One row per point: ``id``, ``fitted_on`` (the other ids), ``efficiency``, ``power_fraction``,
        projected time and energy and their ratios to the measurement.
    """
    if len(points) < 2:
        raise UserError("leave-one-out needs at least two calibration points")
    out = []
    for i, (pt, counted, gpu) in enumerate(points):
        rest = points[:i] + points[i + 1:]
        eff, fraction = _fit(rest, flags)
        out.append({**_predict(pt, counted, gpu, eff, fraction, flags), "fitted_on": [p["id"] for p, _, _ in rest],
                    "efficiency": eff, "power_fraction": fraction})
    return out


def fit_calibration(points: list[Point], *, name: str, flags: MathFlags = DEFAULT_FLAGS,
                    command: str = "") -> Calibration:
    """Fit ``efficiency`` and ``power_fraction`` on published points; leave-one-out when there are two or more.

    Each point is ``(point, counted record, GPU profile)`` where ``point`` has ``id``, ``source``,
    ``setting`` and ``measured`` (``time_s_per_image``, ``energy_j_per_image``). With one point the fit
    gives it back exactly (two equations, two unknowns) and no error band can be estimated.
    """
    for pt, _, _ in points:
        m = pt["measured"]
        if m["time_s_per_image"] <= 0 or m["energy_j_per_image"] <= 0:
            raise UserError(f"calibration point {pt['id']!r} needs a positive time and energy per image")
    eff, fraction = _fit(points, flags)
    loo = leave_one_out(points, flags) if len(points) > 1 else []
    band = max(max(r["energy_ratio"], 1 / r["energy_ratio"]) for r in loo) if loo else None
    kept = []
    for pt, counted, gpu in points:
        rows, images = _kernels(counted)
        kept.append({**pt, "setting": {**pt.get("setting", {}), "profile": gpu.name},
                     "counted": {"flops_per_image": counted.get("flops_per_image"),
                                 "bytes_per_image": counted.get("bytes_per_image"),
                                 "launches_per_image": sum(r[3] for r in rows) / images}})
    return Calibration(name=name, efficiency=eff, power_fraction=fraction,
                       source="; ".join(pt["source"] for pt, _, _ in points), points=kept, flags=flags.to_dict(),
                       leave_one_out=loo, error_band=band, command=command)


def load_calibration(path: str | os.PathLike[str] | None = None) -> Calibration:
    """The projection's calibration.

    The shipped one (``harness/projection/projection_calibration.json``) or one written by
    ``un0-bench calibrate --projection --out FILE``.
    """
    if path is None:
        ref = resources.files("un0_bench.harness.projection").joinpath(CALIBRATION_FILE)
        where = f"harness/{CALIBRATION_FILE}"
        if not ref.is_file():
            raise UserError(f"{where} is missing; `un0-bench calibrate --projection` recounts the published points "
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


def project(record: dict[str, Any], profile: GpuProfile, calibration: Calibration,
            flags: MathFlags | None = None, phases: Any = None) -> dict[str, Any]:
    """Projected time and GPU energy per image of one counted record, with what was assumed.

    Args:
        record: A counted record (with ``kernels``, else charged coarsely: see :func:`_kernels`).
        profile: The GPU.
        calibration: The fitted factors.
        flags: The run's math flags (default: the calibration's, which are torch's defaults).
        phases: Optional predicate on a phase name: project only the kernels of the phases it keeps.

    Returns:
        ``time_s_per_image``, ``energy_j_per_image`` with ``energy_band_j`` (low, high) from the
        calibration's leave-one-out spread, ``power_w``, ``busy_s_per_image``, the time by binding
        (``bound_s``) and the ``bound`` with the largest share, ``kernel_classes`` (launches,
        FLOPs, bytes, seconds and dtype->peak paths per class), ``flags``, the calibration, ``assumes``
        and ``leaves_out``.
    """
    flags = flags or MathFlags(**calibration.flags)
    roof = _roofline(record, profile, calibration.efficiency, flags, phases)
    energy = _energy_j(roof, profile, calibration.power_fraction)
    band = calibration.error_band
    return {
        "label": "projected, not measured",
        "profile": profile.name,
        "time_s_per_image": roof["time_s"],
        "energy_j_per_image": energy,
        "energy_band_j": [energy / band, energy * band] if band else None,
        "error_band": band,
        "power_w": energy / roof["time_s"] if roof["time_s"] else 0.0,
        "busy_s_per_image": roof["busy_s"],
        "bound_s": roof["bound_s"],
        "bound": max(roof["bound_s"], key=roof["bound_s"].get),
        "kernel_classes": roof["classes"],
        "flags": flags.to_dict(),
        "calibration": {"name": calibration.name, "efficiency": calibration.efficiency,
                        "power_fraction": calibration.power_fraction, "source": calibration.source,
                        "points": [{"id": p["id"], "setting": p["setting"], "measured": p["measured"]}
                                   for p in calibration.points],
                        "error_band": band},
        "constants": {"kernel_launch_s": profile.kernel_launch_s, "kernel_latency_s": profile.kernel_latency_s,
                      "memory_efficiency": profile.memory_efficiency, "wait_power_w": profile.wait_power_w,
                      "busy_power_w": _busy_power_w(profile, calibration.power_fraction)},
        "assumes": ASSUMES,
        "leaves_out": LEAVES_OUT,
    }


def projected_record(counted: dict[str, Any], profile: GpuProfile, calibration: Calibration,
                     flags: MathFlags | None = None) -> dict[str, Any]:
    """A counted record turned into a result record marked projected, never measured.

    ``status: "projected"``, ``meter: "projection:<profile>"``; energy and time come from :func:`project`.
    The kernel rows are dropped from the result (the projection's ``kernel_classes`` sums them).
    """
    p = project(counted, profile, calibration, flags)
    rec = {k: v for k, v in counted.items() if k not in ("meter", "status", "meter_details", "kernels")}
    rec.update({
        "meter": f"projection:{profile.name}",
        "status": "projected",
        "energy_j_per_image": p["energy_j_per_image"],
        "energy_ci95_j": None,
        "duration_s_per_image": p["time_s_per_image"],
        "projection": p,
        "meter_details": {"profile": profile.name, "calibration": calibration.name, "projected": True,
                          "flags": p["flags"]},
    })
    rec.setdefault("uncounted_ops", {})
    rec.setdefault("config", {})
    rec.setdefault("environment", {})
    rec.setdefault("energy_ci95_j", None)
    return rec
