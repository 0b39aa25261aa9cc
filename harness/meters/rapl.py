"""The rapl meter: CPU package and DRAM energy from the Linux powercap sysfs (Intel RAPL).

Layout read (one directory per zone, each with ``name``, ``energy_uj`` and ``max_energy_range_uj``)::

    /sys/class/powercap/intel-rapl:0/                  name = "package-0"
    /sys/class/powercap/intel-rapl:0/intel-rapl:0:M/   name = "core" | "uncore" | "dram"
    /sys/class/powercap/intel-rapl:1/                  name = "package-1" (second socket) or "psys"

On multi-die parts the kernel names one zone per die (``package-0-die-0``, ``package-0-die-1``). On
AMD Zen 1/2 (Threadripper, EPYC) every die can mirror the same socket-wide counter, so summing the
dies multiplies the package's energy by the die count (codecarbon issue #1274). Dies whose counters
read the same non-zero value at the start of a window and advance by the same amount are one
counter: it is recorded once, under the package's key, and the reading says which dies mirrored it.

The sysfs root is a constructor argument so tests build a fake tree in ``tmp_path``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from un0_bench.harness.core.spec import Param
from un0_bench.harness.meters.base import Meter, MeterUnavailable, Reading, unavailable

DEFAULT_SYSFS_ROOT = "/sys/class/powercap"

# Top-level zones are ``intel-rapl:N``. AMD Zen parts are served by the same intel_rapl_msr driver and
# appear under the same name; ``amd-rapl`` is accepted too because it costs nothing. ``intel-rapl-mmio:N``
# is deliberately not matched: it is a second interface to the same package counter on some Intel
# client parts, and reading both would count the package twice.
_ZONE_RE = re.compile(r"^(?P<prefix>intel-rapl|amd-rapl):(?P<index>\d+)$")

#: Subzone names recorded. ``core`` (PP0) and ``uncore`` (PP1, the integrated GPU) are not recorded:
#: they are parts of the package domain, so adding them to it would count the same joules twice.
_RECORDED_SUBZONES = ("dram",)

_PACKAGE_NAME_RE = re.compile(r"^package-(?P<package>\d+)(?:-die-(?P<die>\d+))?$")

#: Zone names that are not a CPU package. ``psys`` (platform) covers package + chipset + more, so it
#: overlaps the package domain; it is skipped for the same double-counting reason as ``core``.
_SKIPPED_ZONES = ("psys",)

# NB: fallback bound on the counter's wrap period when a zone exposes no power limit to compute it
# from. Intel's SDM (vol. 4, MSR_PKG_ENERGY_STATUS) says the 32-bit counter can wrap in about 60 s
# under high power on some parts; typical ``max_energy_range_uj`` of 262 kJ lasts ~44 min at 100 W.
_FALLBACK_WRAP_PERIOD_S = 60.0


def _read_uj(path: Path) -> int:
    """Read one integer counter file (``energy_uj``, ``max_energy_range_uj``, ``*_power_*_uw``).

    Every number the meter reads goes through here, so tests can make it raise (e.g. the
    ``PermissionError`` a non-root user gets; chmod does not deny root, who runs the tests here).
    """
    return int(Path(path).read_text().strip())


def _permission_reason(path: Path, root: Path) -> str:
    return (
        f"cannot read {path}: RAPL energy_uj is root-only since CVE-2020-8694 (Platypus, Linux 5.10 and "
        f"backports); run as root, or grant read access with "
        f"`sudo chmod o+r {root}/intel-rapl:*/energy_uj {root}/intel-rapl:*/intel-rapl:*:*/energy_uj` "
        f"(lost at reboot; a udev rule or systemd-tmpfiles entry makes it permanent)"
    )


@dataclass
class _Domain:
    """One recorded RAPL domain (a package or its DRAM subzone)."""

    key: str  # domain key in ``Reading.energy_j``, e.g. "package-0", "dram-0", "package-1-die-0"
    kind: str  # "package" or "dram"
    package: str  # socket number
    die: str | None  # die number on multi-die parts
    path: Path  # zone directory
    max_range_uj: int  # largest value ``energy_uj`` can show before it restarts at 0
    bound_w: float | None  # highest power the zone's limits allow, if it exposes any
    wrap_period_s: float  # shortest time in which the counter can wrap (see _wrap_period_s)


class RaplMeter(Meter):
    """CPU package and DRAM energy from Linux powercap RAPL counters.

    Domain keys are ``package-N`` (one per socket) and ``dram-N`` (that socket's memory, where the
    CPU exposes it); on multi-die parts ``package-N-die-D`` and ``dram-N-die-D``, or ``package-N``
    once when the dies mirror one counter (``details["mirrored_dies"]``). ``core`` and ``uncore``
    subzones are inside the package and not recorded. A package counter that did not advance over a
    window is not a measurement: the reading is unavailable.

    Counter wrap-around: each read-to-read interval is corrected for at most one wrap. The counter
    wraps in ``max_energy_range_uj / power`` (tens of minutes on most parts, but possibly ~60 s at
    high power on some). For windows that long, the runner can call :meth:`poll` between repeats to
    read the counters more often; a window in which two consecutive reads are further apart than the
    shortest possible wrap period is flagged in ``details["possible_extra_wraps"]``.

    Args:
        sysfs_root: Powercap sysfs directory (a fake tree in tests).
        clock: Monotonic clock in seconds, injectable so tests get exact durations.
    """

    name = "rapl"
    sees_whole_device = True
    #: The counters update about every millisecond in steps of 15-61 uJ: 0.1 s spans ~100 updates and
    #: keeps one energy unit far below 0.1% of any package's energy.
    min_window_s: float = 0.1
    params = {"sysfs_root": Param(str, DEFAULT_SYSFS_ROOT, "powercap sysfs directory")}

    def __init__(
        self,
        sysfs_root: str | Path = DEFAULT_SYSFS_ROOT,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__()
        self.sysfs_root = Path(sysfs_root)
        self._clock = clock
        self._domains: list[_Domain] = []
        self._last_uj: dict[str, int] = {}
        self._first_uj: dict[str, int] = {}
        self._energy_uj: dict[str, int] = {}
        self._wraps: dict[str, int] = {}
        self._suspect: set[str] = set()
        self._t0_s = 0.0
        self._last_read_s = 0.0
        self._longest_gap_s = 0.0
        self._polls = 0

    # -- discovery ------------------------------------------------------------------------------

    def _discover(self) -> list[_Domain]:
        """Find the package and DRAM domains. Raises MeterUnavailable with the reason."""
        root = self.sysfs_root
        if not root.is_dir():
            raise MeterUnavailable(f"no powercap sysfs at {root}; RAPL needs Linux on Intel/AMD CPUs")
        zones = sorted(
            (p for p in root.iterdir() if _ZONE_RE.match(p.name)),
            key=lambda p: (p.name.split(":")[0], int(p.name.split(":")[1])),
        )
        domains: list[_Domain] = []
        try:
            for zone in zones:
                name = (zone / "name").read_text().strip()
                if name in _SKIPPED_ZONES:
                    continue
                m = _PACKAGE_NAME_RE.match(name)
                # Socket and die from the name ("package-1-die-0"); the zone index if the name is another.
                package_no, die = (m["package"], m["die"]) if m else (zone.name.split(":")[1], None)
                suffix = package_no if die is None else f"{package_no}-die-{die}"
                package = self._domain(zone, key=name if m is None else f"package-{suffix}", bound_w=None,
                                       kind="package", package=package_no, die=die)
                domains.append(package)
                for sub in self._subzones(zone):
                    sub_name = (sub / "name").read_text().strip()
                    if sub_name in _RECORDED_SUBZONES:
                        # NB: DRAM zones rarely expose a power limit; the package's limit bounds DRAM
                        # power from above, which makes its wrap-period estimate conservative. The key
                        # names socket and die, so two sockets' (or dies') DRAM never collide.
                        domains.append(self._domain(sub, key=f"{sub_name}-{suffix}", bound_w=package.bound_w,
                                                    kind=sub_name, package=package_no, die=die))
        except PermissionError as exc:
            raise MeterUnavailable(_permission_reason(Path(exc.filename or root), root)) from exc
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"unreadable RAPL zone under {root}: {exc}") from exc
        if not domains:
            raise MeterUnavailable(
                f"no RAPL package zones (intel-rapl:N) under {root}; the intel_rapl_msr kernel module may "
                f"not be loaded, or this is a VM without RAPL passthrough"
            )
        keys = [d.key for d in domains]
        if len(set(keys)) != len(keys):
            raise MeterUnavailable(f"duplicate RAPL domain names under {root}: {sorted(keys)}")
        return domains

    @staticmethod
    def _subzones(zone: Path) -> list[Path]:
        # Subzones are nested in the zone directory; sysfs also links them at the top level
        # (``intel-rapl:0:0``), which is the same counter and must not be read twice.
        pattern = re.compile(rf"^{re.escape(zone.name)}:\d+$")
        return sorted(p for p in zone.iterdir() if pattern.match(p.name))

    def _domain(self, zone: Path, key: str, bound_w: float | None, kind: str, package: str,
                die: str | None) -> _Domain:
        max_range_uj = _read_uj(zone / "max_energy_range_uj")
        own_bound_w = _power_bound_w(zone)
        bound = own_bound_w if own_bound_w is not None else bound_w
        return _Domain(
            key=key,
            kind=kind,
            package=package,
            die=die,
            path=zone,
            max_range_uj=max_range_uj,
            bound_w=bound,
            wrap_period_s=_wrap_period_s(max_range_uj, bound),
        )

    # -- reading --------------------------------------------------------------------------------

    def _read_all(self, domains: list[_Domain]) -> dict[str, int]:
        try:
            return {d.key: _read_uj(d.path / "energy_uj") for d in domains}
        except PermissionError as exc:
            path = Path(exc.filename or self.sysfs_root)
            raise MeterUnavailable(_permission_reason(path, self.sysfs_root)) from exc
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"cannot read RAPL energy_uj under {self.sysfs_root}: {exc}") from exc

    def _check(self) -> None:
        """Whether every domain's counter can be read."""
        self._read_all(self._discover())

    def _probe_failure(self, exc: Exception) -> str:
        return f"cannot read RAPL counters under {self.sysfs_root}: {exc}"

    def _start(self) -> None:
        self._domains = self._discover()
        self._last_uj = self._read_all(self._domains)
        self._first_uj = dict(self._last_uj)
        self._t0_s = self._last_read_s = self._clock()
        self._energy_uj = {d.key: 0 for d in self._domains}
        self._wraps = {d.key: 0 for d in self._domains}
        self._suspect = set()
        self._longest_gap_s = 0.0
        self._polls = 0

    def poll(self) -> None:
        """Read the counters now and add what they advanced since the last read.

        The runner may call this inside a long window (e.g. between repeats) so that no read-to-read
        interval spans more than one counter wrap. Does nothing when no window is open.
        """
        if self._running:
            self._accumulate()

    def _accumulate(self) -> None:
        now_uj = self._read_all(self._domains)
        now_s = self._clock()
        gap_s = now_s - self._last_read_s
        self._longest_gap_s = max(self._longest_gap_s, gap_s)
        for d in self._domains:
            start_uj, end_uj = self._last_uj[d.key], now_uj[d.key]
            self._energy_uj[d.key] += counter_delta_uj(start_uj, end_uj, d.max_range_uj)
            if end_uj < start_uj:
                self._wraps[d.key] += 1
            if gap_s >= d.wrap_period_s:
                # The counter could have wrapped more than once in this interval; the correction
                # above assumed at most one, so the figure may be short by k x max range.
                self._suspect.add(d.key)
        self._last_uj = now_uj
        self._last_read_s = now_s
        self._polls += 1

    def _stop(self) -> Reading:
        try:
            self._accumulate()
        except MeterUnavailable as exc:
            # Access can vanish mid-run (a udev rule reapplied, a chmod undone): record why.
            reading = unavailable(self.name, str(exc))
            reading.duration_s = self._clock() - self._t0_s
            return reading
        energy_uj, mirrored = self._unmirrored()
        stuck = [d.key for d in self._domains if d.kind == "package" and self._energy_uj[d.key] == 0]
        if stuck:
            reading = unavailable(self.name, f"{', '.join(stuck)} energy counter did not advance in "
                                             f"{self._last_read_s - self._t0_s:.3g} s: no measurement")
            reading.duration_s = self._last_read_s - self._t0_s
            return reading
        return Reading(
            meter=self.name,
            duration_s=self._last_read_s - self._t0_s,
            energy_j={key: uj / 1_000_000 for key, uj in energy_uj.items()},
            details={
                "sysfs_root": str(self.sysfs_root),
                "zones": {d.key: d.path.name for d in self._domains},
                "wraps": dict(self._wraps),
                "reads": self._polls + 1,
                "longest_read_gap_s": self._longest_gap_s,
                "possible_extra_wraps": sorted(self._suspect),
                "mirrored_dies": mirrored,
            },
        )

    def _unmirrored(self) -> tuple[dict[str, int], dict[str, list[str]]]:
        """Energy per domain with mirrored dies counted once, and which dies mirrored which key.

        Dies of one package (and kind) mirror one counter when every one read the same non-zero value
        at the window's start and advanced by the same amount; independent counters never agree to the
        microjoule on both. Mirrors are recorded once, under ``package-P`` (``dram-P``).
        """
        groups: dict[tuple[str, str], list[_Domain]] = {}
        for d in self._domains:
            if d.die is not None:
                groups.setdefault((d.kind, d.package), []).append(d)
        energy = dict(self._energy_uj)
        mirrored: dict[str, list[str]] = {}
        for (kind, package), dies in groups.items():
            if len(dies) < 2:
                continue
            firsts = {self._first_uj[d.key] for d in dies}
            deltas = {self._energy_uj[d.key] for d in dies}
            if len(firsts) == 1 and len(deltas) == 1 and next(iter(firsts)) != 0:
                key = f"{kind}-{package}"
                for d in dies:
                    del energy[d.key]
                energy[key] = self._energy_uj[dies[0].key]
                mirrored[key] = [d.key for d in dies]
        return energy, mirrored


def counter_delta_uj(start_uj: int, end_uj: int, max_range_uj: int) -> int:
    """Energy in microjoules between two reads of a RAPL counter, allowing for one wrap.

    The counter shows values ``0 .. max_range_uj`` inclusive (the kernel reports the largest value
    it can show, ``0xFFFFFFFF x energy unit``) and restarts at 0 after it, so it counts modulo
    ``max_range_uj + 1``: ``end - start`` if it did not wrap, else ``end + (max_range + 1) - start``.
    Using ``max_range_uj`` alone as the modulus would lose 1 uJ per wrap.

    NB: the hardware steps in its energy unit (15-61 uJ), not 1 uJ, so a wrap really spans
    ``max_range + unit``; the unit is not in sysfs, so up to one unit (< 0.1 mJ) per wrap is lost.
    """
    return (end_uj - start_uj) % (max_range_uj + 1)


def _power_bound_w(zone: Path) -> float | None:
    """Highest power limit the zone exposes (``constraint_*_{power_limit,max_power}_uw``), in watts."""
    limits_uw = []
    for f in zone.glob("constraint_*_uw"):
        if f.name.endswith(("_power_limit_uw", "_max_power_uw")):
            try:
                limits_uw.append(_read_uj(f))
            except (OSError, ValueError):
                continue  # limits are a nicety for the wrap check; the counter is what matters
    positive = [v for v in limits_uw if v > 0]
    return max(positive) / 1_000_000 if positive else None


def _wrap_period_s(max_range_uj: int, bound_w: float | None) -> float:
    """Shortest time in which the counter can wrap: its range divided by the highest possible power."""
    if bound_w is None:
        return _FALLBACK_WRAP_PERIOD_S
    # NB: package power can briefly exceed every configured limit (PL4 peaks), so halve the period
    # for margin rather than trusting the limit exactly.
    return max_range_uj / 1_000_000 / bound_w / 2
