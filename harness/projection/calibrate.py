"""Fit this host's energy coefficients from a meter: energy per FLOP, per byte and static power.

A fixed set of workloads with different FLOP/byte mixes (matmuls that are compute-heavy, copies and
adds that only move memory) runs inside windows of a meter; the project's op counter counts each
workload once, so every window has its counted FLOPs ``F``, counted bytes ``B``, duration ``t`` and
measured energy ``E``. Least squares fits::

    E = e_flop_j * F + e_byte_j * B + static_w * t

and, as a check of what the meter really sees, the time-only model ``E = power_w * t``. A meter that
estimates energy from time (codecarbon with no RAPL falls back to TDP x time) is revealed by the
time-only model fitting as well as the full one (relative residual near zero, FLOP and byte
coefficients near zero relative to the static term). The fitted row is written as a proxy profile, so
``--meters proxy:profile=NAME,profiles_path=FILE`` prices counted work with this host's coefficients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from un0_bench.harness.counters.ops import OpCounter
from un0_bench.harness.counters.records import Counts, OpStat
from un0_bench.harness.errors import UserError
from un0_bench.harness.meters.base import Meter

__all__ = ["WORKLOADS", "Fit", "Sample", "Workload", "fit_samples", "profile_csv", "run_workloads"]


@dataclass(frozen=True)
class Workload:
    """One calibration workload: ``kind`` (``matmul``, ``copy``, ``add``) on tensors of ``size``."""

    name: str
    kind: str
    size: int

    def build(self) -> Callable[[], Any]:
        g = torch.Generator().manual_seed(0)
        if self.kind == "matmul":
            a = torch.randn(self.size, self.size, generator=g)
            b = torch.randn(self.size, self.size, generator=g)
            return lambda: torch.mm(a, b)  # 2*n^3 FLOPs, 3*n^2*4 bytes
        x = torch.randn(self.size, generator=g)
        out = torch.empty_like(x)
        if self.kind == "copy":
            return lambda: out.copy_(x)  # 0 FLOPs, 2*n*4 bytes
        if self.kind == "add":
            y = torch.randn(self.size, generator=g)
            return lambda: torch.add(x, y, out=out)  # n FLOPs, 3*n*4 bytes
        raise ValueError(f"unknown workload kind {self.kind!r}")


#: The fixed set: compute-heavy matmuls of three sizes, memory-bound copies and adds of two sizes.
WORKLOADS = (
    Workload("matmul-256", "matmul", 256),
    Workload("matmul-512", "matmul", 512),
    Workload("matmul-1024", "matmul", 1024),
    Workload("copy-1M", "copy", 1 << 20),
    Workload("copy-8M", "copy", 1 << 23),
    Workload("add-4M", "add", 1 << 22),
)


@dataclass
class Sample:
    """One window: counted work, duration and the meter's energy (J)."""

    workload: str
    calls: int
    flops: float
    bytes: float
    duration_s: float
    energy_j: float
    details: dict[str, Any] = field(default_factory=dict)


def _counted(fn: Callable[[], Any]) -> Counts:
    with OpCounter() as c:
        fn()
    return c.counts(images=1)


def _scaled(counts: Counts, calls: int) -> Counts:
    return Counts(images=1, stats=[OpStat(op=s.op, dtype=s.dtype, role=s.role, module=s.module,
                                          calls=s.calls * calls, flops=s.flops * calls,
                                          bytes_read=s.bytes_read * calls, bytes_written=s.bytes_written * calls,
                                          counted=s.counted) for s in counts.stats])


def run_workloads(meter: Meter, workloads: tuple[Workload, ...] = WORKLOADS, *, window_s: float = 0.5,
                  windows: int = 2, clock: Callable[[], float] = time.perf_counter) -> list[Sample]:
    """Run each workload in ``windows`` meter windows of about ``window_s`` seconds each.

    The number of calls per window comes from a short timing probe; the work is counted once per
    workload with :class:`OpCounter` (outside any window) and scaled by the calls.
    """
    samples = []
    for w in workloads:
        fn = w.build()
        one = _counted(fn)
        fn()  # warm-up
        t0 = clock()
        probe = 0
        while clock() - t0 < min(0.05, window_s / 4):
            fn()
            probe += 1
        per_call = (clock() - t0) / probe
        calls = max(1, math.ceil(window_s / max(per_call, 1e-9)))
        work = _scaled(one, calls)
        for _ in range(windows):
            meter.start()
            try:
                for _ in range(calls):
                    fn()
                meter.record_work(work)
            finally:
                reading = meter.stop()
            if not reading.ok or reading.total_energy_j is None:
                raise UserError(f"meter {meter.name!r} gave no energy for workload {w.name}: {reading.status}")
            samples.append(Sample(workload=w.name, calls=calls, flops=float(work.flops()),
                                  bytes=float(work.bytes_moved()), duration_s=reading.duration_s,
                                  energy_j=reading.total_energy_j, details=dict(reading.details)))
    return samples


@dataclass
class Fit:
    """Least-squares coefficients with their residuals.

    Attributes:
        e_flop_j: Energy per counted FLOP (J).
        e_byte_j: Energy per counted byte (J).
        static_w: Power over the window's duration (W).
        residuals_j: Measured minus fitted energy per sample (J).
        rel_residual: ||residuals|| / ||measured energies||.
        time_only_power_w: The time-only model's power (W), ``E = P * t``.
        time_only_rel_residual: Its relative residual.
        share_time: Share of the fitted energy of all samples that the static term explains.
        proportional_to_time: True when the time-only model fits within 5% and the static term
            explains over 95% of the energy: the meter's figure is time x a (near) constant power.
        finding: One sentence saying what the fit reveals.
    """

    e_flop_j: float
    e_byte_j: float
    static_w: float
    residuals_j: list[float]
    rel_residual: float
    time_only_power_w: float
    time_only_rel_residual: float
    share_time: float
    proportional_to_time: bool
    finding: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_samples(samples: list[Sample]) -> Fit:
    """Fit ``E = e_flop*F + e_byte*B + static*t`` (and ``E = P*t``) by least squares."""
    if len(samples) < 3:
        raise UserError(f"calibration needs at least 3 windows, got {len(samples)}")
    a = np.array([[s.flops, s.bytes, s.duration_s] for s in samples], dtype=np.float64)
    e = np.array([s.energy_j for s in samples], dtype=np.float64)
    # Columns differ by ~1e12 in scale: fit on columns scaled to unit norm, then unscale.
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    coef, *_ = np.linalg.lstsq(a / scale, e, rcond=None)
    coef = coef / scale
    resid = e - a @ coef
    norm_e = float(np.linalg.norm(e)) or 1.0
    t = a[:, 2]
    p = float(t @ e / (t @ t))
    resid_t = e - p * t
    parts = np.abs(a * coef).sum(axis=0)  # |term| summed over samples: flops, bytes, time
    share_time = float(parts[2] / (parts.sum() or 1.0))
    rel, rel_t = float(np.linalg.norm(resid)) / norm_e, float(np.linalg.norm(resid_t)) / norm_e
    # NB: 5% and 95%, not exact: codecarbon's estimate is TDP x machine-wide CPU load x time, and the load of
    # other processes on a shared host moves it by a few percent between windows.
    proportional = rel_t < 0.05 and share_time > 0.95
    if proportional:
        finding = (f"the meter's energy is proportional to time: E = {p:.4g} W x t fits within {rel_t:.2%} and the "
                   f"static term explains {share_time:.1%} of the energy, so it does not see FLOPs or bytes "
                   f"(a TDP x time estimate, not a measurement of the work)")
    else:
        finding = (f"the meter sees the work: FLOPs and bytes explain {1 - share_time:.1%} of the fitted energy; the "
                   f"time-only model leaves {rel_t:.2%} unexplained against {rel:.2%} for the full model")
    return Fit(e_flop_j=float(coef[0]), e_byte_j=float(coef[1]), static_w=float(coef[2]),
               residuals_j=[float(r) for r in resid], rel_residual=rel, time_only_power_w=p,
               time_only_rel_residual=rel_t, share_time=share_time, proportional_to_time=proportional,
               finding=finding)


#: The dtype rows a proxy profile needs (every dtype the counters report maps to one of them).
PROFILE_DTYPES = ("fp32", "fp16", "bf16", "fp64", "int8", "int32")


def profile_csv(fit: Fit, name: str, source: str, dtype: str = "fp32") -> str:
    """Rows in the proxy's profile format for ``fit``.

    add = mult = energy per FLOP of ``dtype`` (the proxy charges a FLOP (add + mult) / 2), 64-bit
    access = 8 x energy per byte, and the static power.
    """
    # NB: a negative coefficient (collinear workloads, noise) is clipped to 0: a profile prices work,
    # it cannot refund it. The fit's own figures, negative or not, are in the fit file.
    e_flop_pj = max(fit.e_flop_j, 0.0) * 1e12
    e_access_pj = max(fit.e_byte_j, 0.0) * 8 * 1e12
    static_w = max(fit.static_w, 0.0)
    src = source.replace('"', "'")
    lines = ["profile,quantity,dtype,value,unit,source"]
    for d in (dtype, *(x for x in PROFILE_DTYPES if x != dtype)):
        # NB: the workloads run in one dtype; every other dtype is charged the same (an assumption).
        why = src if d == dtype else f"{src}; fitted on {dtype} workloads, {d} assumed equal"
        lines += [f'{name},add,{d},{e_flop_pj:.6g},pJ,"{why}"', f'{name},mult,{d},{e_flop_pj:.6g},pJ,"{why}"']
    lines += [f'{name},memory_access_64bit,,{e_access_pj:.6g},pJ,"{src}"',
              f'{name},static_power,,{static_w:.6g},W,"{src}"']
    return "\n".join(lines) + "\n"
