"""The ``zeus`` meter: the ML.ENERGY project's Zeus measuring the same windows, as a cross-check.

The only module that imports ``zeus``, on first use (``probe``). Each window is one Zeus window
(``ZeusMonitor.begin_window`` / ``end_window``); its GPU, CPU-package and DRAM energies become the
reading's domains (``gpu:0``, ``cpu:0``, ``dram:0``). Zeus reads the same counters as the ``nvml``
and ``rapl`` meters (NVML's total-energy counter, RAPL's ``energy_uj``), plus AMD GPUs (amdsmi) and
Apple silicon, which un0-bench's own meters do not read. Devices are synchronised by the protocol
before every stop, so Zeus is asked not to synchronise again.
"""

from __future__ import annotations

import itertools
from typing import Any

from un0_bench.harness.meters.base import Meter, MeterUnavailable, Reading

INSTALL = "pip install 'un0-bench[zeus]'"


class ZeusMeter(Meter):
    """Zeus's energy of every GPU and CPU package it sees, over the window."""

    name = "zeus"
    sees_whole_device = True
    #: NVML's energy counter updates about every 100 ms (the nvml meter's minimum too).
    min_window_s: float = 0.1

    def __init__(self) -> None:
        super().__init__()
        self._monitor: Any = None
        self._keys = (f"un0-bench-{k}" for k in itertools.count())
        self._key = ""
        self._version = ""

    def _open(self) -> Any:
        if self._monitor is None:
            try:
                import zeus
                from zeus.monitor import ZeusMonitor
            except ImportError as e:
                raise MeterUnavailable(f"zeus is not installed ({INSTALL}; {e})") from None
            self._version = getattr(zeus, "__version__", "?")
            monitor = ZeusMonitor(sync_execution_with="torch")
            if not monitor.gpu_indices and not monitor.cpu_indices and not getattr(monitor, "soc_is_present", False):
                raise MeterUnavailable("zeus sees no energy source here (no NVML or AMD GPU, no readable RAPL, "
                                       "no Apple SoC)")
            self._monitor = monitor
        return self._monitor

    def _check(self) -> None:
        self._open()

    def _probe_failure(self, exc: Exception) -> str:  # Zeus's own initialisation errors: the reason, not a traceback
        return f"zeus: {type(exc).__name__}: {exc}"

    def _start(self) -> None:
        monitor = self._open()
        self._key = next(self._keys)
        monitor.begin_window(self._key, sync_execution=False)

    def _stop(self) -> Reading:
        m = self._monitor.end_window(self._key, sync_execution=False)
        energy = {f"gpu:{i}": float(e) for i, e in (m.gpu_energy or {}).items()}
        energy.update({f"cpu:{i}": float(e) for i, e in (m.cpu_energy or {}).items()})
        energy.update({f"dram:{i}": float(e) for i, e in (m.dram_energy or {}).items()})
        return Reading(meter=self.name, duration_s=float(m.time), energy_j=energy,
                       details={"source": f"zeus {self._version} ZeusMonitor", "domains": sorted(energy)})
