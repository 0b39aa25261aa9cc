"""What else the host was doing during a measurement window: load, other processes' CPU time, affinity, governor.

A whole-device meter counts every joule of the device, whoever spent it. On a shared host (this one
has 2 cores and four engineers) another process's work lands in the window, so each window records
the host's state and is flagged when something else used the CPU. GPU state (temperature, clocks,
throttle reasons, other processes) comes from the nvml meter's own readings.

The ``/proc`` and ``/sys`` roots are constructor arguments, so tests build fake trees in ``tmp_path``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Another process used the CPU during a window when its CPU time exceeds this share of one core
#: over the window (10%: more than background daemons, less than any real job).
OTHER_CPU_SHARE_FLAG = 0.10


@dataclass(frozen=True)
class CpuTimes:
    """CPU time counters at one moment, in seconds."""

    busy_s: float  # every process on every core (``/proc/stat``: all but idle and iowait)
    own_s: float  # this process, all its threads, and its waited-for children (``/proc/<pid>/stat``)


class HostProbe:
    """Reads the host's CPU state at the start and end of a window.

    Args:
        proc_root: The ``/proc`` file system.
        sys_root: The ``/sys`` file system (frequency governors).
        pid: The measuring process (default: this one).
    """

    def __init__(self, proc_root: str | Path = "/proc", sys_root: str | Path = "/sys", pid: int | None = None) -> None:
        self.proc = Path(proc_root)
        self.sys = Path(sys_root)
        self.pid = os.getpid() if pid is None else pid
        try:
            self.hz = float(os.sysconf("SC_CLK_TCK"))
        except (ValueError, OSError, AttributeError):
            self.hz = 100.0  # NB: the kernel's USER_HZ is 100 on every mainstream Linux build

    def times(self) -> CpuTimes | None:
        """CPU time counters now, or ``None`` where ``/proc`` cannot be read (not Linux)."""
        try:
            fields = (self.proc / "stat").read_text().splitlines()[0].split()
            # cpu user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
            values = [int(v) for v in fields[1:9]]
            busy = sum(values) - values[3] - values[4]
            own_fields = (self.proc / str(self.pid) / "stat").read_text().rsplit(")", 1)[1].split()
            # utime, stime, cutime, cstime (fields 14-17 of the line): the children this process has waited
            # for are its own work (the command of `un0-bench run -- CMD`, a meter's helper), not another's.
            own = sum(int(v) for v in own_fields[11:15])
        except (OSError, ValueError, IndexError):
            return None
        return CpuTimes(busy_s=busy / self.hz, own_s=own / self.hz)

    def _load_average(self) -> list[float] | None:
        try:
            return [float(v) for v in (self.proc / "loadavg").read_text().split()[:3]]
        except (OSError, ValueError):
            return None

    def _governors(self) -> list[str] | None:
        paths = sorted(self.sys.glob("devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor"))
        found = set()
        for p in paths:
            try:
                found.add(p.read_text().strip())
            except OSError:
                continue
        return sorted(found) or None

    @staticmethod
    def _affinity() -> list[int] | None:
        try:
            return sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return None

    def window(self, before: CpuTimes | None, after: CpuTimes | None, duration_s: float) -> dict[str, Any]:
        """The host's state over one window, and whether another process used the CPU in it.

        Returns:
            ``load_average`` (1, 5, 15 min at the end), ``other_cpu_s`` (CPU seconds of every other
            process during the window; ``None`` where unknown), ``affinity`` (the cores this process may run on),
            ``governors`` (the CPU frequency governors in use; ``None`` where the host exposes none,
            as VMs do) and ``other_load`` (True when ``other_cpu_s`` exceeds
            :data:`OTHER_CPU_SHARE_FLAG` of one core over the window).
        """
        other = None
        if before is not None and after is not None:
            # NB: counters tick at USER_HZ (10 ms), so a window's figure is good to about 0.02 CPU s.
            diff = (after.busy_s - before.busy_s) - (after.own_s - before.own_s)
            # A child reaped in the window brings all its CPU time at once, also what it used before the
            # window: then this process seems to have used more than the host, and the others' share is
            # unknown (None), not 0.
            other = max(0.0, diff) if diff >= -2.0 / self.hz else None
        return {
            "load_average": self._load_average(),
            "other_cpu_s": other,
            "affinity": self._affinity(),
            "governors": self._governors(),
            "other_load": bool(other is not None and duration_s > 0 and other > OTHER_CPU_SHARE_FLAG * duration_s),
        }
