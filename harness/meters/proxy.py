"""The proxy meter: energy computed from counted work, deterministic on any machine.

Energy = FLOPs x energy per FLOP of their dtype + bytes moved x energy per byte (+ static power x
time, only for a profile that gives static power). The energies come from a profile in
``profiles.csv`` next to this module (default: ``horowitz-45nm``, Horowitz, ISSCC 2014), each row
citing its source. Users add profiles with their own CSV of the same columns, passed as an argument
or named by the ``UN0_BENCH_PROFILES`` environment variable.

The meter does not watch the hardware: the runner counts the work once with
:class:`un0_bench.harness.counters.ops.OpCounter` and hands the :class:`~un0_bench.harness.counters.records.Counts` to
:meth:`ProxyMeter.record_work` inside the window. :func:`proxy_energy` gives the same figures
without a window, split by role for the accounting boundaries.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from un0_bench.harness.core.spec import Param
from un0_bench.harness.counters.records import Counts, OpStat
from un0_bench.harness.errors import UserError
from un0_bench.harness.meters.base import Meter, Reading
from un0_bench.harness.registry import lookup

__all__ = [
    "DEFAULT_PROFILE",
    "DRAM_PROFILE",
    "MEMORY_CAVEAT",
    "PROFILES_ENV",
    "EnergyProfile",
    "ProxyBreakdown",
    "ProxyMeter",
    "get_profile",
    "load_profiles",
    "proxy_energy",
]

#: The profile every proxy figure uses unless another is named (its one home: import it, do not retype it).
DEFAULT_PROFILE = "horowitz-45nm"
#: The same costs with memory priced as DRAM accesses: shown beside the default in the report's ledger.
DRAM_PROFILE = "horowitz-45nm-dram"
#: Said wherever the proxy's memory boundary is shown (records, report, summary).
MEMORY_CAVEAT = (
    "The proxy counts every op's inputs and outputs as memory traffic, priced at its profile's memory level. "
    "That is neither an upper nor a lower bound of real traffic: fusion and caches lower it, GEMM tile "
    "re-reads raise it."
)
#: Environment variable naming a user CSV of extra profiles.
PROFILES_ENV = "UN0_BENCH_PROFILES"
COLUMNS = ("profile", "quantity", "dtype", "value", "unit", "source")

#: Quantities the proxy meter itself reads; other quantities (``oscillator_step``) are parsed and
#: kept for whoever needs them.
ADD, MULT, MEMORY, STATIC_POWER = "add", "mult", "memory_access_64bit", "static_power"

_ENERGY_UNITS = {"aJ": 1e-18, "fJ": 1e-15, "pJ": 1e-12, "nJ": 1e-9, "uJ": 1e-6, "µJ": 1e-6, "mJ": 1e-3, "J": 1.0}
_POWER_UNITS = {"uW": 1e-6, "µW": 1e-6, "mW": 1e-3, "W": 1.0, "kW": 1e3}

#: Which profile row charges a counted dtype, when the profile has no row for the dtype's own name.
# NB: int16/int64 and unsigned wider types are charged at the int32 rate and bool/uint8 at the int8
# rate (Horowitz gives only int8 and int32): an assumption, stated here and in the reports.
_DTYPE_ROW = {
    "float32": "fp32", "float": "fp32",
    "float16": "fp16", "half": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64", "double": "fp64",
    "int8": "int8", "uint8": "int8", "bool": "int8",
    "int16": "int32", "int32": "int32", "int64": "int32",
    "uint16": "int32", "uint32": "int32", "uint64": "int32",
}


@dataclass(frozen=True)
class EnergyProfile:
    """Energy per operation and per byte for one device or technology, in SI units.

    Attributes:
        name: Profile name (the ``profile`` column).
        values: (quantity, dtype) -> value in joules (or watts for ``static_power``); ``dtype`` is
            ``""`` for quantities that have none.
        sources: (quantity, dtype) -> the row's source text.
    """

    name: str
    values: dict[tuple[str, str], float] = field(default_factory=dict)
    sources: dict[tuple[str, str], str] = field(default_factory=dict)

    def quantity(self, quantity: str, dtype: str = "") -> float:
        """One value in SI units; raises :class:`UserError` naming the missing row."""
        try:
            return self.values[(quantity, dtype)]
        except KeyError:
            have = ", ".join(f"{q}/{d}" if d else q for q, d in sorted(self.values)) or "nothing"
            raise UserError(
                f"energy profile {self.name!r} has no {quantity!r}{f' for dtype {dtype!r}' if dtype else ''} "
                f"row (it has: {have}); add one to a profiles CSV"
            ) from None

    def energy_per_flop_j(self, dtype: str) -> float:
        """Energy of one FLOP of ``dtype`` in joules: (add + mult) / 2.

        One MAC is one add and one mult and counts as 2 FLOPs, so a FLOP costs their mean.
        """
        # NB: pointwise ops (1 FLOP per element) are charged the same add/mult average, although
        # an add alone is cheaper and a transcendental dearer.
        for row in (dtype, _DTYPE_ROW.get(dtype)):
            if row and (ADD, row) in self.values and (MULT, row) in self.values:
                return (self.values[(ADD, row)] + self.values[(MULT, row)]) / 2
        known = sorted({d for q, d in self.values if q in (ADD, MULT)})
        raise UserError(
            f"energy profile {self.name!r} has no add/mult energy for dtype {dtype!r}"
            f" (it has: {', '.join(known) or 'none'}); add rows for it to a profiles CSV"
        )

    @property
    def energy_per_byte_j(self) -> float:
        """Energy of moving one byte in joules: the 64-bit access energy / 8."""
        return self.quantity(MEMORY) / 8

    @property
    def memory_level(self) -> str:
        """The memory level its byte price stands for (``"SRAM 8 KB"``, ``"DRAM"``), from that row's source.

        NB: read from the source text, since the CSV has no column for it; a profile whose source
        names no level says ``"unstated"``.
        """
        source = self.sources.get((MEMORY, ""), "")
        for level in ("DRAM", "HBM"):
            if level in source:
                return level
        if "SRAM" in source:
            size = re.search(r"(\d+\s*[KM]B)", source)
            return f"SRAM {size.group(1)}" if size else "SRAM"
        return "unstated"

    @property
    def static_power_w(self) -> float | None:
        """Static power in watts, or ``None`` when the profile gives none."""
        return self.values.get((STATIC_POWER, ""))


def _parse_rows(text: str, origin: str) -> list[dict[str, str]]:
    rows = []
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    for cells in reader:
        line_no = reader.line_num
        if not cells or not "".join(cells).strip() or cells[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [c.strip() for c in cells]
            if tuple(header) != COLUMNS:
                raise UserError(f"{origin}: header must be {','.join(COLUMNS)}, got {','.join(header)}")
            continue
        if len(cells) != len(COLUMNS):
            raise UserError(f"{origin}:{line_no}: expected {len(COLUMNS)} columns, got {len(cells)}")
        rows.append({**dict(zip(COLUMNS, (c.strip() for c in cells), strict=True)), "_where": f"{origin}:{line_no}"})
    if header is None:
        raise UserError(f"{origin}: empty profiles file (expected header {','.join(COLUMNS)})")
    return rows


def _to_si(row: dict[str, str]) -> float:
    where, unit = row["_where"], row["unit"]
    try:
        value = float(row["value"])
    except ValueError:
        raise UserError(f"{where}: value {row['value']!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{where}: value must be a finite non-negative number, got {row['value']!r}")
    units = _POWER_UNITS if row["quantity"] == STATIC_POWER else _ENERGY_UNITS
    if unit not in units:
        raise UserError(f"{where}: unit {unit!r} for {row['quantity']!r}; use one of {', '.join(units)}")
    return value * units[unit]


def _builtin_text() -> tuple[str, str]:
    ref = resources.files("un0_bench.harness.meters").joinpath("profiles.csv")
    return ref.read_text(encoding="utf-8"), "harness/meters/profiles.csv"


def _profile_texts(builtin: tuple[str, str], path: str | os.PathLike[str] | None, env: str,
                   what: str) -> list[tuple[str, str]]:
    """``(text, origin)`` of the built-in CSV and of the user's at ``path`` (default: the file ``$env`` names)."""
    texts = [builtin]
    user = path if path is not None else os.environ.get(env) or None
    if user is not None:
        p = Path(user)
        if not p.is_file():
            raise UserError(f"{what} {str(p)!r} does not exist")
        texts.append((p.read_text(encoding="utf-8"), str(p)))
    return texts


def load_profiles(path: str | os.PathLike[str] | None = None) -> dict[str, EnergyProfile]:
    """Read the built-in profiles and, if given, a user CSV of more profiles.

    Args:
        path: A user CSV with columns ``profile,quantity,dtype,value,unit,source``. Defaults to
            the file named by ``UN0_BENCH_PROFILES``, if set.

    Returns:
        Profiles by name.

    Raises:
        UserError: For a missing or malformed file, a row repeated within a profile, or a user
            profile that reuses a built-in name.
    """
    texts = _profile_texts(_builtin_text(), path, PROFILES_ENV, "profiles file")
    profiles: dict[str, EnergyProfile] = {}
    for text, origin in texts:
        defined_here: set[str] = set()
        for row in _parse_rows(text, origin):
            name = row["profile"]
            if not name:
                raise UserError(f"{row['_where']}: empty profile name")
            if name in profiles and name not in defined_here:
                raise UserError(f"{row['_where']}: profile {name!r} is already defined; choose another name")
            defined_here.add(name)
            prof = profiles.setdefault(name, EnergyProfile(name=name))
            key = (row["quantity"], row["dtype"])
            if key in prof.values:
                raise UserError(f"{row['_where']}: {name!r} already has a {key[0]!r} row for dtype {key[1]!r}")
            prof.values[key] = _to_si(row)
            prof.sources[key] = row["source"]
    return profiles


def get_profile(name: str, path: str | os.PathLike[str] | None = None) -> EnergyProfile:
    """The profile called ``name``; an unknown name raises :class:`UserError` with suggestions."""
    return lookup("energy profile", name, load_profiles(path))


@dataclass(frozen=True)
class ProxyBreakdown:
    """Proxy energy of some counted work, in joules, split for the accounting boundaries.

    Attributes:
        compute_j: FLOPs of role ``"compute"`` (the generator's network).
        gating_j: FLOPs of role ``"gating"`` (gate networks and the gathers they cause).
        memory_j: Bytes moved by ``"compute"`` ops.
        gating_memory_j: Bytes moved by ``"gating"`` ops.
        static_j: Static power x duration; 0.0 when the profile gives no static power.
    """

    compute_j: float
    gating_j: float
    memory_j: float
    gating_memory_j: float
    static_j: float = 0.0

    @property
    def total_j(self) -> float:
        """Sum of all parts."""
        return math.fsum((self.compute_j, self.gating_j, self.memory_j, self.gating_memory_j, self.static_j))


def _flops_energy_j(counts: Counts, role: str, profile: EnergyProfile) -> float:
    # Integer FLOP totals per dtype first (exact), then one multiply per dtype, summed with fsum
    # in sorted order: the result does not depend on the order of the stats.
    by_dtype = counts.flops_by_dtype(role)
    return math.fsum(
        flops * profile.energy_per_flop_j(dtype) for dtype, flops in sorted(by_dtype.items()) if flops
    )


def _bytes_energy_j(counts: Counts, role: str, profile: EnergyProfile) -> float:
    n = counts.bytes_moved(role)
    return n * profile.energy_per_byte_j if n else 0.0


def proxy_energy(counts: Counts, profile: EnergyProfile | str = DEFAULT_PROFILE,
                 duration_s: float = 0.0) -> ProxyBreakdown:
    """Proxy energy of ``counts`` under ``profile``, without a measurement window.

    Args:
        counts: What a counting pass saw.
        profile: A profile or its name.
        duration_s: Time charged at the profile's static power (ignored when it gives none).

    Returns:
        The energy split by role and kind. Identical inputs give bit-identical floats.
    """
    prof = get_profile(profile) if isinstance(profile, str) else profile
    static_w = prof.static_power_w
    return ProxyBreakdown(
        compute_j=_flops_energy_j(counts, "compute", prof),
        gating_j=_flops_energy_j(counts, "gating", prof),
        memory_j=_bytes_energy_j(counts, "compute", prof),
        gating_memory_j=_bytes_energy_j(counts, "gating", prof),
        static_j=static_w * duration_s if static_w is not None else 0.0,
    )


class ProxyMeter(Meter):
    """Deterministic energy from counted work: FLOPs and bytes priced by an energy profile.

    Args:
        profile: Profile name (see ``profiles.csv``); unknown names raise :class:`UserError`.
        profiles_path: Optional user CSV of extra profiles (default: ``$UN0_BENCH_PROFILES``).
    """

    name = "proxy"
    sees_whole_device = False
    params = {
        "profile": Param(str, DEFAULT_PROFILE, "energy profile (profiles.csv or a user CSV)"),
        "profiles_path": Param(str, None, "a user CSV of more profiles"),
    }

    def __init__(self, profile: str = DEFAULT_PROFILE,
                 profiles_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.profile = get_profile(profile, profiles_path)
        self._stats: list[OpStat] = []
        self._images = 0
        self._recorded = False
        self._t0 = 0.0

    def record_work(self, counts: Counts) -> None:
        """Add the work counted for what ran in the open window (may be called more than once)."""
        if not self._running:
            raise RuntimeError("proxy meter: record_work() called outside a start()/stop() window")
        self._stats.extend(counts.stats)
        self._images += counts.images
        self._recorded = True

    def _start(self) -> None:
        self._stats = []
        self._images = 0
        self._recorded = False
        self._t0 = time.perf_counter()

    def _stop(self) -> Reading:
        duration_s = time.perf_counter() - self._t0
        if not self._recorded:
            # Never 0 J in place of a measurement: without counts the proxy has nothing to price.
            return Reading(meter=self.name, duration_s=duration_s,
                           status="unavailable: no work recorded in the window (record_work was not called)")
        counts = Counts(images=self._images, stats=self._stats)
        b = proxy_energy(counts, self.profile, duration_s)
        energy_j = {"compute": math.fsum((b.compute_j, b.gating_j)),
                    "memory": math.fsum((b.memory_j, b.gating_memory_j))}
        if self.profile.static_power_w is not None:
            energy_j["static"] = b.static_j
        details: dict[str, Any] = {
            "profile": self.profile.name,
            "memory_level": self.profile.memory_level,
            "compute_j_by_role": {"compute": b.compute_j, "gating": b.gating_j},
            "memory_j_by_role": {"compute": b.memory_j, "gating": b.gating_memory_j},
            "flops": counts.flops(),
            "bytes": counts.bytes_moved(),
            "flops_by_dtype": dict(sorted(counts.flops_by_dtype().items())),
            "uncounted_ops": counts.uncounted_ops(),
        }
        return Reading(meter=self.name, duration_s=duration_s, energy_j=energy_j, details=details)

